//! Endpoint choice: power of two choices (P2C) over Peak-EWMA cost.
//!
//! ```text
//! ready endpoints ─▶ pick two at random ─▶ the one with the lower cost (costs within
//!                                          noise: either, at random)
//!    cost = Peak-EWMA RTT × (in-flight + 1)
//!    RTT: sampled at the first response byte; a sample above the estimate replaces
//!         it at once (peak), one below pulls it down with weight e^(−Δt/decay);
//!         with no samples the estimate decays, so an idle endpoint is tried again
//!    stale: a seed, or no response for a fifth of the decay time ─▶ the next
//!           comparison that draws it sends it one request (a probe), whose answer
//!           replaces the estimate
//! ```
//!
//! Sources: Mitzenmacher, "The Power of Two Choices in Randomized Load Balancing"
//! (2001); Peak-EWMA from Finagle, as Linkerd and tower-balance use it. A service's
//! first endpoints start at the default RTT (30 ms); an endpoint that joins later starts
//! at its peers' mean estimate, so it competes at once instead of waiting for a high
//! seed to decay (tower#134). Every estimate is floored at 1 ms so none looks free.
//!
//! Stale probes are Wary's addition to tower's Peak-EWMA. Decay alone brings a 50 ms
//! estimate down to its 1.5 ms peers only after about ln(50 / 1.5) ≈ 3.5 decay times
//! (35 s at the default), so an endpoint that recovered would wait that long for its
//! traffic; and at low concurrency one slow answer (a peak) parks an endpoint as good as
//! its peers for seconds. An estimate no response has refreshed for a fifth of the
//! decay time (2 s at the default) says little about the endpoint now: one request
//! re-measures it. So a recovered or unlucky endpoint is back within about 2 s, and one
//! that is still slow costs one slow request per 2 s (under 1 % of requests, so not the
//! p99, from 50 requests/s up). A seed (the default RTT, or the peers' mean for a joining or
//! readmitted endpoint) is a guess in the same way: the endpoint's first answer
//! replaces it, so an endpoint is measured as soon as it is drawn, never starved by a
//! guess.
//!
//! The balancer knows nothing of discovery: it is handed the ready endpoints of a
//! request and keeps per-endpoint statistics by address, which survive updates.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

use crate::metrics as m;
use crate::outlier::{Outlier, OutlierSettings};

/// An estimate no response refreshed for `decay / STALE_DIVISOR` (2 s at the default
/// decay) is stale and re-measured by the next request that draws it (see the module
/// notes). Wary's choice: short enough that no endpoint idles for long on one unlucky
/// answer, long enough that a slow one costs under 1 % of requests from 50/s up.
pub const STALE_DIVISOR: u32 = 5;

/// Two P2C costs closer than this fraction of the larger (or than [`RTT_FLOOR`]) are a
/// tie, broken at random: 0.25. Wary's choice. A +50 ms endpoint among 1–2 ms peers,
/// or one with twice their in-flight requests, is still always avoided.
pub const TIE_FRACTION: f64 = 0.25;

/// Peak-EWMA decay time constant when the policy sets none: 10 s (Linkerd).
pub const DEFAULT_DECAY: Duration = Duration::from_secs(10);
/// RTT assumed for an endpoint without samples: 30 ms (Linkerd).
pub const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// No estimate goes below 1 ms: a near-zero seed would make an endpoint look free.
pub const RTT_FLOOR: Duration = Duration::from_millis(1);

/// The algorithm, per service (`TrafficPolicy.loadBalancer.algorithm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// P2C over Peak-EWMA (the default).
    Ewma,
    /// Round robin, for comparison.
    RoundRobin,
}

/// Balancer settings for one service.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    /// The algorithm; default [`Algorithm::Ewma`].
    pub algorithm: Algorithm,
    /// Peak-EWMA decay time constant; default [`DEFAULT_DECAY`] (10 s).
    pub decay: Duration,
    /// The RTT of an endpoint without samples; default [`DEFAULT_RTT`] (30 ms), floored
    /// at [`RTT_FLOOR`] (1 ms).
    pub default_rtt: Duration,
    /// Circuit breaking per endpoint.
    pub outlier: OutlierSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            algorithm: Algorithm::Ewma,
            decay: DEFAULT_DECAY,
            default_rtt: DEFAULT_RTT,
            outlier: OutlierSettings::default(),
        }
    }
}

/// One endpoint's load statistics, and its metric handles (registered once, so the
/// request path only bumps numbers).
pub struct EndpointLoad {
    /// The RTT estimate, when it was last touched (decayed or sampled), and when a
    /// response last sampled it (`None`: a seed no response has confirmed yet).
    ewma: Mutex<(f64, Instant, Option<Instant>)>,
    in_flight: AtomicU32,
    /// A request has claimed the stale estimate's re-measurement.
    probing: std::sync::atomic::AtomicBool,
    /// Circuit-breaker state.
    pub outlier: Outlier,
    /// Its counters and response-time summary, rendered on `/metrics` while it lives.
    stats: m::EndpointStats,
}

impl std::fmt::Debug for EndpointLoad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointLoad")
            .field("ewma", &self.ewma)
            .field("in_flight", &self.in_flight)
            .finish_non_exhaustive()
    }
}

impl EndpointLoad {
    fn new(default_rtt: Duration) -> Self {
        let seed = default_rtt.max(RTT_FLOOR).as_secs_f64();
        Self {
            ewma: Mutex::new((seed, Instant::now(), None)),
            in_flight: AtomicU32::new(0),
            probing: std::sync::atomic::AtomicBool::new(false),
            outlier: Outlier::default(),
            stats: m::EndpointStats::default(),
        }
    }

    /// The estimate now, after decay since the last touch, in seconds. Applies (and so
    /// records) that decay.
    pub fn rtt(&self, decay: Duration) -> f64 {
        let mut g = self.ewma.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(g.1).as_secs_f64();
        // Decaying toward the floor while idle lets a once-slow endpoint be tried again.
        let w = (-elapsed / decay.as_secs_f64()).exp();
        g.0 = (g.0 * w).max(RTT_FLOOR.as_secs_f64());
        g.1 = now;
        g.0
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Cost: RTT estimate × (in-flight + 1).
    pub fn cost(&self, decay: Duration) -> f64 {
        self.rtt(decay) * f64::from(self.in_flight() + 1)
    }

    /// Whether the estimate is stale, and no request is in flight to refresh it: it is
    /// a seed no response has confirmed, or no response sampled it for
    /// `decay / STALE_DIVISOR`. A stale endpoint gets the next request it is drawn
    /// for, as a probe.
    /// Only one request claims it, however many draw it at once.
    fn stale(&self, decay: Duration) -> bool {
        self.in_flight() == 0
            && {
                let g = self.ewma.lock().unwrap_or_else(|e| e.into_inner());
                g.2.is_none_or(|sampled| sampled.elapsed() >= decay / STALE_DIVISOR)
            }
            && !self.probing.swap(true, Ordering::AcqRel)
    }

    fn observe(&self, sample: Duration, decay: Duration) {
        let sample = sample.max(RTT_FLOOR).as_secs_f64();
        let mut g = self.ewma.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        // The estimate as reads see it now (decayed since the last touch)...
        let idle = now.saturating_duration_since(g.1).as_secs_f64();
        let current = (g.0 * (-idle / decay.as_secs_f64()).exp()).max(RTT_FLOOR.as_secs_f64());
        let since_sample = g.2.map_or(decay, |sampled| now.saturating_duration_since(sampled));
        if sample > current || since_sample >= decay / STALE_DIVISOR {
            // Peak: a slowdown is believed at once; and a seed, or an estimate no
            // response refreshed for a while, was stale: the sample is all we know.
            g.0 = sample;
        } else {
            // ...pulled toward a lower sample by the time since the previous sample,
            // not since the last read: P2C reads estimates far more often than
            // responses arrive, and weighing by reads would all but ignore the samples
            // (tower's estimate then only decays, at 1/decay, whatever the endpoint does).
            let w = (-since_sample.as_secs_f64() / decay.as_secs_f64()).exp();
            g.0 = current * w + sample * (1.0 - w);
        }
        g.1 = now;
        g.2 = Some(now);
        self.probing.store(false, Ordering::Release);
    }
}

/// An endpoint chosen for one request. Counts as in flight until dropped; call
/// [`Pick::first_byte`] when the response starts, to feed the RTT estimate, and
/// [`Pick::success`] or [`Pick::failure`] with the outcome, for circuit breaking.
pub struct Pick {
    /// The chosen endpoint's index in the slice given to [`Balancer::pick`].
    pub index: usize,
    load: Arc<EndpointLoad>,
    balancer: Arc<Balancer>,
    /// Endpoints the choice was among.
    of: usize,
    outlier: OutlierSettings,
    /// This request is an ejected endpoint's probe.
    probe: bool,
    reported: bool,
    decay: Duration,
    started: Instant,
    sampled: bool,
}

impl Pick {
    /// Restarts the RTT clock: the connection is ready and the request goes out now.
    /// Connection set-up (TCP and TLS handshakes) is not the endpoint's response time:
    /// counted in, a new connection's first sample would be a peak that keeps the
    /// endpoint out of P2C for up to a decay time (as tower measures from `call`, after
    /// the connection is ready).
    pub fn connected(&mut self) {
        self.started = Instant::now();
    }

    /// Records the time to the first response byte as an RTT sample.
    pub fn first_byte(&mut self) {
        if !self.sampled {
            self.sampled = true;
            let rtt = self.started.elapsed();
            self.load.stats.record_latency(rtt.as_secs_f64());
            self.load.observe(rtt, self.decay);
        }
    }
}

impl Pick {
    /// The endpoint answered (anything but a failure): its failure count starts over,
    /// and a successful probe readmits it.
    pub fn success(&mut self) {
        self.reported = true;
        self.load.stats.successes.fetch_add(1, Ordering::Relaxed);
        if self.load.outlier.success(self.probe) {
            self.balancer.ejected.fetch_sub(1, Ordering::Relaxed);
            self.balancer.reseed(&self.load);
            tracing::info!(service = %self.balancer.service, "the probe succeeded: endpoint readmitted");
        }
    }

    /// The endpoint failed this request (5xx, connect failure, reset, timeout): counts
    /// toward its ejection, which the balancer allows only while at least one other
    /// endpoint stays in rotation and within `max_ejection_percent`.
    pub fn failure(&mut self) {
        self.reported = true;
        self.load.stats.failures.fetch_add(1, Ordering::Relaxed);
        if self.load.outlier.failure(self.probe, &self.outlier) {
            self.balancer.eject(&self.load, self.of, &self.outlier);
        } else if self.probe {
            tracing::info!(service = %self.balancer.service, "the probe failed: endpoint ejected again");
        }
    }
}

impl Drop for Pick {
    fn drop(&mut self) {
        if !self.sampled {
            // No answer to measure (refused, reset, cancelled): the endpoint was tried
            // now, so it is not stale; a failing one must not win every draw.
            let mut g = self.load.ewma.lock().unwrap_or_else(|e| e.into_inner());
            g.2 = Some(Instant::now());
            self.load.probing.store(false, Ordering::Release);
        }
        self.load.in_flight.fetch_sub(1, Ordering::Relaxed);
        if self.probe && !self.reported {
            // The probe never got an answer to judge: let another request probe.
            self.load.outlier.release_probe();
        }
    }
}

/// The balancer of one service: load statistics and circuit-breaker state by endpoint
/// address, and the service's retry budget and bulkhead.
#[derive(Debug, Default)]
pub struct Balancer {
    service: String,
    loads: Mutex<HashMap<SocketAddr, Arc<EndpointLoad>>>,
    next: AtomicUsize,
    /// Endpoints out of rotation (ejected, on probation or probing).
    ejected: AtomicUsize,
    /// Retries to this service may add only so much load.
    pub budget: crate::retry::RetryBudget,
    /// Requests in flight to this service, and waiting for a slot.
    pub bulkhead: Arc<crate::retry::Bulkhead>,
}

impl Balancer {
    /// Chooses among `endpoints` with `settings`; `None` when there are none.
    pub fn pick(self: &Arc<Self>, endpoints: &[SocketAddr], settings: &Settings) -> Option<Pick> {
        self.pick_avoiding(endpoints, settings, None)
    }

    /// As [`Balancer::pick`], preferring any endpoint but `avoid` (a retry goes
    /// elsewhere when it can). Ejected endpoints are skipped; one whose ejection is
    /// over gets this request as its probe; when all are out, all are used.
    pub fn pick_avoiding(
        self: &Arc<Self>,
        endpoints: &[SocketAddr],
        settings: &Settings,
        avoid: Option<SocketAddr>,
    ) -> Option<Pick> {
        let n = endpoints.len();
        if n == 0 {
            return None;
        }
        if avoid.is_none() && self.ejected.load(Ordering::Relaxed) == 0 {
            // The common case: everyone admitted, no allocation.
            let index = self.choose(endpoints, settings, 0..n);
            return Some(self.make_pick(endpoints, index, settings, false));
        }
        let loads: Vec<Arc<EndpointLoad>> = endpoints.iter().map(|a| self.load(*a, settings)).collect();
        if let Some(index) = loads.iter().position(|l| l.outlier.claim_probe()) {
            return Some(self.make_pick(endpoints, index, settings, true));
        }
        let mut candidates: Vec<usize> = (0..n).filter(|&i| !loads[i].outlier.is_out()).collect();
        if candidates.is_empty() {
            // Panic mode: better to try an ejected endpoint than to fail for certain.
            candidates = (0..n).collect();
        }
        if let Some(avoid) = avoid
            && candidates.len() > 1
        {
            candidates.retain(|&i| endpoints[i] != avoid);
        }
        let index = self.choose(endpoints, settings, candidates.into_iter());
        Some(self.make_pick(endpoints, index, settings, false))
    }

    /// P2C (or round robin) among the `candidates` indexes of `endpoints`.
    fn choose(
        &self,
        endpoints: &[SocketAddr],
        settings: &Settings,
        candidates: impl ExactSizeIterator<Item = usize> + Clone,
    ) -> usize {
        let n = candidates.len();
        let nth = |k: usize| candidates.clone().nth(k).unwrap_or(0);
        match (n, settings.algorithm) {
            (0 | 1, _) => nth(0),
            (n, Algorithm::RoundRobin) => nth(self.next.fetch_add(1, Ordering::Relaxed) % n),
            (n, Algorithm::Ewma) => {
                let mut rng = rand::rng();
                let a = rng.random_range(0..n);
                let b = (a + rng.random_range(1..n)) % n;
                let (a, b) = (nth(a), nth(b));
                let (la, lb) = (self.load(endpoints[a], settings), self.load(endpoints[b], settings));
                if la.stale(settings.decay) {
                    return a;
                }
                if lb.stale(settings.decay) {
                    return b;
                }
                let (ca, cb) = (la.cost(settings.decay), lb.cost(settings.decay));
                // Costs closer than measurement noise are a tie, broken at random: on
                // equal endpoints one slightly higher recent sample would otherwise
                // decide every comparison and starve one of them for seconds.
                let noise = (ca.max(cb) * TIE_FRACTION).max(RTT_FLOOR.as_secs_f64());
                if (ca - cb).abs() <= noise {
                    if rng.random_bool(0.5) { a } else { b }
                } else if cb < ca {
                    b
                } else {
                    a
                }
            }
        }
    }

    fn make_pick(self: &Arc<Self>, endpoints: &[SocketAddr], index: usize, settings: &Settings, probe: bool) -> Pick {
        let load = self.load(endpoints[index], settings);
        load.in_flight.fetch_add(1, Ordering::Relaxed);
        load.stats.requests.fetch_add(1, Ordering::Relaxed);
        Pick {
            index,
            load,
            balancer: self.clone(),
            of: endpoints.len(),
            outlier: settings.outlier,
            probe,
            reported: false,
            decay: settings.decay,
            started: Instant::now(),
            sampled: false,
        }
    }

    /// The statistics of `addr`, created on first sight at the mean estimate of the
    /// service's other endpoints, or at the default RTT when it has none.
    ///
    /// Seeding with the default alone starves newcomers among fast endpoints (tower#134):
    /// next to 2 ms backends a 30 ms seed loses every P2C comparison until it decays,
    /// which at a 10 s decay takes about 25 s. Seeded with its peers' mean it competes at
    /// once, and its first slow answer (a peak) still sends traffic away at once.
    pub fn load(&self, addr: SocketAddr, settings: &Settings) -> Arc<EndpointLoad> {
        let mut loads = self.loads.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(load) = loads.get(&addr) {
            return load.clone();
        }
        let peers: Vec<f64> = loads
            .values()
            .map(|l| l.ewma.lock().unwrap_or_else(|e| e.into_inner()).0)
            .collect();
        let seed = if peers.is_empty() {
            settings.default_rtt
        } else {
            Duration::from_secs_f64(peers.iter().sum::<f64>() / peers.len() as f64)
        };
        let load = Arc::new(EndpointLoad::new(seed));
        loads.insert(addr, load.clone());
        load
    }

    /// Starts a readmitted endpoint's estimate afresh at its peers' mean, as for a
    /// joining endpoint: what it measured before its ejection is stale, and a peak
    /// from then would otherwise keep it starved for several decay times (tower#134).
    fn reseed(&self, load: &Arc<EndpointLoad>) {
        let loads = self.loads.lock().unwrap_or_else(|e| e.into_inner());
        let peers: Vec<f64> = loads
            .values()
            .filter(|l| !Arc::ptr_eq(l, load))
            .map(|l| l.ewma.lock().unwrap_or_else(|e| e.into_inner()).0)
            .collect();
        drop(loads);
        if peers.is_empty() {
            return;
        }
        let mean = peers.iter().sum::<f64>() / peers.len() as f64;
        let mut g = load.ewma.lock().unwrap_or_else(|e| e.into_inner());
        *g = (mean.max(RTT_FLOOR.as_secs_f64()), Instant::now(), None);
    }

    /// Forgets endpoints that are no longer in `current` (after a discovery update).
    pub fn retain(&self, current: &[SocketAddr]) {
        self.loads.lock().unwrap_or_else(|e| e.into_inner()).retain(|a, load| {
            let keep = current.contains(a);
            if !keep && load.outlier.retire() {
                self.ejected.fetch_sub(1, Ordering::Relaxed);
            }
            keep
        });
    }

    /// Ejects `load` (among `of` endpoints) if it is still this balancer's, still
    /// admitted, and the limits allow: at least one other endpoint stays in rotation,
    /// and at most `max_ejection_percent` are out. Under the endpoints' lock, so
    /// concurrent failures and removals cannot miscount.
    fn eject(&self, load: &Arc<EndpointLoad>, of: usize, settings: &OutlierSettings) {
        let loads = self.loads.lock().unwrap_or_else(|e| e.into_inner());
        if !loads.values().any(|l| Arc::ptr_eq(l, load)) {
            return;
        }
        let out = self.ejected.load(Ordering::Relaxed);
        let percent = usize::try_from(settings.max_ejection_percent).unwrap_or(100);
        if out + 1 >= of || (out + 1) * 100 > of * percent {
            return;
        }
        if let Some(time) = load.outlier.eject(settings) {
            self.ejected.fetch_add(1, Ordering::Relaxed);
            load.stats.ejections.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                service = %self.service,
                ejection_ms = time.as_millis(),
                "endpoint ejected after consecutive failures"
            );
        }
    }

    /// Every endpoint's state, for admin pages. Reading does not decay or otherwise
    /// change the estimates.
    pub fn snapshot(&self) -> Vec<EndpointSnapshot> {
        let loads = self.loads.lock().unwrap_or_else(|e| e.into_inner());
        loads
            .iter()
            .map(|(a, l)| EndpointSnapshot {
                addr: *a,
                rtt: l.ewma.lock().unwrap_or_else(|e| e.into_inner()).0,
                in_flight: l.in_flight(),
                state: l.outlier.state(),
            })
            .collect()
    }
}

/// One endpoint as admin pages show it.
#[derive(Debug, Clone, Copy)]
pub struct EndpointSnapshot {
    /// Its app address.
    pub addr: SocketAddr,
    /// The last Peak-EWMA RTT estimate, s.
    pub rtt: f64,
    /// Requests in flight.
    pub in_flight: u32,
    /// Its circuit-breaker state.
    pub state: crate::outlier::State,
}

/// Balancers for every service, by `<name>.<namespace>`.
#[derive(Debug, Default)]
pub struct Balancers {
    services: Mutex<HashMap<String, Arc<Balancer>>>,
}

impl Balancers {
    /// The balancer of `service`, created on first use.
    pub fn get(&self, service: &str) -> Arc<Balancer> {
        let mut services = self.services.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = services.get(service) {
            return b.clone();
        }
        let balancer = Arc::new(Balancer {
            service: service.to_string(),
            ..Balancer::default()
        });
        services.insert(service.to_string(), balancer.clone());
        balancer
    }

    /// Drops the statistics of services and endpoints that discovery no longer has:
    /// `current` maps each service to its endpoint addresses.
    pub fn prune(&self, current: &HashMap<String, Vec<SocketAddr>>) {
        let mut services = self.services.lock().unwrap_or_else(|e| e.into_inner());
        services.retain(|name, b| match current.get(name) {
            Some(addrs) => {
                b.retain(addrs);
                true
            }
            None => false,
        });
    }

    /// Every endpoint's state, by service.
    pub fn snapshot(&self) -> HashMap<String, Vec<EndpointSnapshot>> {
        let services = self.services.lock().unwrap_or_else(|e| e.into_inner());
        services.iter().map(|(name, b)| (name.clone(), b.snapshot())).collect()
    }

    /// The live endpoints with their statistics, taken under the locks and released
    /// before anything is rendered from them.
    fn live(&self) -> Vec<(Arc<Balancer>, SocketAddr, Arc<EndpointLoad>)> {
        let services: Vec<Arc<Balancer>> = self
            .services
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        let mut live = Vec::new();
        for balancer in services {
            let loads = balancer.loads.lock().unwrap_or_else(|e| e.into_inner());
            let endpoints: Vec<_> = loads.iter().map(|(a, l)| (*a, l.clone())).collect();
            drop(loads);
            live.extend(endpoints.into_iter().map(|(a, l)| (balancer.clone(), a, l)));
        }
        live
    }

    /// Appends the per-endpoint series of the endpoints discovery has now (see
    /// [`m::render_endpoints`]), sorted by service and endpoint.
    pub fn render_metrics(&self, out: &mut String) {
        let mut live = self.live();
        live.sort_by(|a, b| (&a.0.service, a.1).cmp(&(&b.0.service, b.1)));
        let rows: Vec<m::EndpointRow<'_>> = live
            .iter()
            .map(|(balancer, addr, load)| m::EndpointRow {
                service: &balancer.service,
                endpoint: *addr,
                ewma: load.ewma.lock().unwrap_or_else(|e| e.into_inner()).0,
                in_flight: load.in_flight(),
                ejected: load.outlier.is_out(),
                stats: &load.stats,
            })
            .collect();
        m::render_endpoints(&rows, out);
    }

    /// Folds every endpoint's pending response times into its summary, so they do not
    /// pile up between scrapes.
    pub fn drain_metrics(&self) {
        for (_, _, load) in self.live() {
            load.stats.drain();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(n: u8) -> Vec<SocketAddr> {
        (1..=n).map(|i| SocketAddr::from(([127, 0, 0, i], 80))).collect()
    }

    /// Simulates steady load with `concurrency` requests in flight for `steps` ms of
    /// paused time; `rtt(i)` is endpoint i's response time. Returns picks per endpoint.
    async fn simulate(
        b: &Arc<Balancer>,
        eps: &[SocketAddr],
        concurrency: usize,
        steps: u32,
        rtt: impl Fn(usize) -> u64,
    ) -> Vec<u32> {
        let s = Settings::default();
        let mut share = vec![0u32; eps.len()];
        let mut pending: Vec<(Instant, Pick)> = Vec::new();
        for _ in 0..steps {
            while pending.len() < concurrency {
                let pick = b.pick(eps, &s).unwrap();
                share[pick.index] += 1;
                let due = Instant::now() + Duration::from_millis(rtt(pick.index));
                pending.push((due, pick));
            }
            tokio::time::advance(Duration::from_millis(1)).await;
            let now = Instant::now();
            pending.retain_mut(|(due, pick)| {
                if *due <= now {
                    pick.first_byte();
                    false
                } else {
                    true
                }
            });
        }
        share
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_endpoint_loses_its_share_and_wins_it_back_when_idle() {
        let b = Arc::new(Balancer::default());
        let eps = addrs(3);
        simulate(&b, &eps, 6, 2000, |_| 10).await;
        // Endpoint 0 slows by 50 ms: within 2 s it gets under 10 % of requests.
        let share = simulate(&b, &eps, 6, 2000, |i| if i == 0 { 60 } else { 10 }).await;
        let total: u32 = share.iter().sum();
        assert!(share[0] * 10 < total, "the slow endpoint got {share:?}");
        // Idle for three decay times: the penalty fades and it is tried again.
        tokio::time::advance(Duration::from_secs(30)).await;
        let s = Settings::default();
        let rtt = b.load(eps[0], &s).rtt(s.decay);
        assert!(rtt < 0.005, "{rtt}");
        let share = simulate(&b, &eps, 6, 2000, |_| 10).await;
        let total: u32 = share.iter().sum();
        assert!(share[0] * 5 > total, "the recovered endpoint got {share:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_recovered_endpoint_wins_its_share_back_within_seconds() {
        let b = Arc::new(Balancer::default());
        let eps = addrs(3);
        simulate(&b, &eps, 6, 2000, |_| 2).await;
        let share = simulate(&b, &eps, 6, 5000, |i| if i == 0 { 52 } else { 2 }).await;
        let total: u32 = share.iter().sum();
        // Still slow: one probe per 2 s, nowhere near 1 %.
        assert!(share[0] * 100 < total, "the slow endpoint got {share:?}");
        // It recovers: within 2 s of its last answer it is probed, and from the next
        // second on it takes a fair share.
        let mut windows = Vec::new();
        for _ in 0..4 {
            let share = simulate(&b, &eps, 6, 1000, |_| 2).await;
            let total: u32 = share.iter().sum();
            windows.push(share.clone());
            if share[0] * 4 > total {
                return;
            }
        }
        panic!("the recovered endpoint never got its share back: {windows:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_endpoint_is_tried_and_not_starved() {
        let b = Arc::new(Balancer::default());
        let mut eps = addrs(3);
        simulate(&b, &eps, 6, 2000, |_| 10).await;
        eps.push(SocketAddr::from(([127, 0, 0, 9], 80)));
        let share = simulate(&b, &eps, 6, 2000, |_| 10).await;
        let total: u32 = share.iter().sum();
        assert!(share[3] * 100 >= total * 15, "the new endpoint got {share:?}");
    }

    #[test]
    fn in_flight_counts_until_the_pick_is_dropped() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            let b = Arc::new(Balancer::default());
            let s = Settings::default();
            let eps = addrs(1);
            let p = b.pick(&eps, &s).unwrap();
            assert_eq!(b.load(eps[0], &s).in_flight(), 1);
            drop(p);
            assert_eq!(b.load(eps[0], &s).in_flight(), 0);
            let rr = Settings {
                algorithm: Algorithm::RoundRobin,
                ..s
            };
            let three = addrs(3);
            let order: Vec<usize> = (0..6).map(|_| b.pick(&three, &rr).unwrap().index).collect();
            assert_eq!(order, [0, 1, 2, 0, 1, 2]);
        });
    }
}
