//! The outbound route table: everything the request path needs, computed once per
//! discovery update so that a request does lookups only (no parsing, no formatting, no
//! scans over services).
//!
//! ```text
//! DiscoveryState ──(each update)──▶ RouteTable
//!                                     host name ─▶ Route (service, balancer settings,
//!                                                   requests counter, and per service
//!                                                   port: ready targets + addresses)
//! ```

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use wary_certs::SpiffeId;
use wary_proto::discovery::load_balancer::Algorithm as PbAlgorithm;
use wary_proto::discovery::{Protocol, Service};

use crate::balance::{Algorithm, Balancer, Balancers, Settings};
use crate::metrics as m;
use crate::outlier::OutlierSettings;
use crate::retry::{PoolLimits, RetryOn, RetrySettings};
use crate::state::DiscoveryState;

/// Where one endpoint is reached.
#[derive(Debug, Clone)]
pub enum Via {
    /// Through its proxy: HTTP/2 over mTLS to `peer`, which must present `identity`.
    Mesh {
        /// The peer proxy's inbound address.
        peer: SocketAddr,
        /// The identity it must present.
        identity: SpiffeId,
    },
    /// Directly, in plaintext (an endpoint without a proxy).
    Plain,
}

/// One ready endpoint of a service port.
#[derive(Debug, Clone)]
pub struct Target {
    /// The app's address (the balancer's key).
    pub app: SocketAddr,
    /// How to reach it.
    pub via: Via,
}

/// The ready endpoints of one service port.
#[derive(Debug, Default)]
pub struct PortTargets {
    /// The targets.
    pub targets: Vec<Target>,
    /// Their app addresses, in the same order, for the balancer.
    pub addrs: Vec<SocketAddr>,
    /// The port is declared opaque (`appProtocol: tcp`): redirected connections skip
    /// protocol detection.
    pub opaque: bool,
}

/// A destination service.
#[derive(Debug)]
pub struct Route {
    /// `<name>.<namespace>`.
    pub name: String,
    /// Balancer settings from its TrafficPolicy.
    pub settings: Settings,
    /// Retries, bulkhead and timeouts from its TrafficPolicy.
    pub policy: Policy,
    /// Its balancer (statistics survive updates).
    pub balancer: Arc<Balancer>,
    /// Requests to it, `wary_proxy_requests_total{direction="outbound",service=…}`.
    pub requests: metrics::Counter,
    /// Ready targets by service port.
    pub ports: HashMap<u16, PortTargets>,
    /// `wary_proxy_retries_total{result="sent"}` for this service.
    pub retries_sent: metrics::Counter,
    /// `wary_proxy_retries_total{result="budget_exhausted"}`.
    pub retries_budget_exhausted: metrics::Counter,
    /// `wary_proxy_retries_total{result="not_retryable"}`: a body too large to replay.
    pub retries_not_replayable: metrics::Counter,
    /// `wary_proxy_bulkhead_overflows_total`.
    pub overflows: metrics::Counter,
    /// `wary_proxy_responses_total` by status class, 1xx to 5xx.
    pub responses: [metrics::Counter; 5],
    /// `wary_proxy_response_latency_seconds`.
    pub latency: metrics::Histogram,
}

impl Route {
    /// Counts a response returned to the client.
    pub fn count_response(&self, status: http::StatusCode) {
        let class = usize::from(status.as_u16() / 100).clamp(1, 5) - 1;
        self.responses[class].increment(1);
    }
}

/// Routes by every name a client may use, and by the addresses a redirected
/// connection may have been going to (transparent mode).
#[derive(Debug, Default)]
pub struct RouteTable {
    by_name: HashMap<String, Arc<Route>>,
    /// Services' virtual IPs (host names that are IP addresses, e.g. a ClusterIP).
    by_vip: HashMap<std::net::IpAddr, Arc<Route>>,
    /// Each ready endpoint's app address: a connection to a workload's own address
    /// goes to that workload, as Linkerd does for pod IPs.
    by_endpoint: HashMap<SocketAddr, (Arc<Route>, PortTargets, u16)>,
}

impl RouteTable {
    /// Builds the table from discovery state, reusing `balancers`' statistics.
    /// Endpoints whose address does not parse are skipped (discovery already refuses
    /// them, so none should reach here).
    pub fn build(state: &DiscoveryState, balancers: &Balancers) -> Self {
        let (mut by_name, mut by_vip) = (HashMap::new(), HashMap::new());
        let mut by_endpoint: HashMap<SocketAddr, (Arc<Route>, PortTargets, u16)> = HashMap::new();
        for (name, service) in &state.services.items {
            let mut ports: HashMap<u16, PortTargets> = HashMap::new();
            for e in state.endpoints.items.get(name).iter().flat_map(|e| e.endpoints.iter()) {
                let (Ok(ip), Ok(port), Ok(service_port)) =
                    (e.address.parse(), u16::try_from(e.port), u16::try_from(e.service_port))
                else {
                    continue;
                };
                if !e.ready {
                    continue;
                }
                let via = match (u16::try_from(e.mesh_port), e.identity.parse::<SpiffeId>()) {
                    (Ok(0), _) => Via::Plain,
                    (Ok(mesh), Ok(identity)) => Via::Mesh {
                        peer: SocketAddr::new(ip, mesh),
                        identity,
                    },
                    _ => continue,
                };
                let app = SocketAddr::new(ip, port);
                let slot = ports.entry(service_port).or_default();
                slot.targets.push(Target { app, via });
                slot.addrs.push(app);
            }
            for p in &service.ports {
                if let Ok(port) = u16::try_from(p.port) {
                    ports.entry(port).or_default().opaque = p.protocol() == Protocol::Opaque;
                }
            }
            let route = Arc::new(Route {
                name: name.clone(),
                settings: settings(service),
                policy: policy(service),
                balancer: balancers.get(name),
                requests: metrics::counter!(m::REQUESTS, "direction" => "outbound", "service" => name.clone()),
                ports,
                retries_sent: metrics::counter!(m::RETRIES, "service" => name.clone(), "result" => "sent"),
                retries_budget_exhausted: metrics::counter!(m::RETRIES, "service" => name.clone(), "result" => "budget_exhausted"),
                retries_not_replayable: metrics::counter!(m::RETRIES, "service" => name.clone(), "result" => "not_retryable"),
                overflows: metrics::counter!(m::OVERFLOWS, "service" => name.clone()),
                latency: metrics::histogram!(m::RESPONSE_LATENCY, "direction" => "outbound", "service" => name.clone()),
                responses: ["1xx", "2xx", "3xx", "4xx", "5xx"].map(|code| {
                    metrics::counter!(m::RESPONSES, "direction" => "outbound", "service" => name.clone(), "code" => code)
                }),
            });
            by_name.insert(name.clone(), route.clone());
            for host in &service.hostnames {
                by_name.insert(host.clone(), route.clone());
                if let Ok(ip) = host.parse() {
                    by_vip.insert(ip, route.clone());
                }
            }
            for (service_port, port) in &route.ports {
                for target in &port.targets {
                    let only = PortTargets {
                        targets: vec![target.clone()],
                        addrs: vec![target.app],
                        opaque: port.opaque,
                    };
                    // An address in two services (or two ports of one) goes to the first
                    // by name and port, whatever the maps' order, so it does not flip
                    // between updates.
                    match by_endpoint.entry(target.app) {
                        std::collections::hash_map::Entry::Occupied(e)
                            if (e.get().0.name.as_str(), e.get().2) <= (route.name.as_str(), *service_port) => {}
                        entry => {
                            let _ = entry.insert_entry((route.clone(), only, *service_port));
                        }
                    }
                }
            }
        }
        Self {
            by_name,
            by_vip,
            by_endpoint,
        }
    }

    /// The route and targets for `host:port` as a client in `namespace` names them.
    pub fn by_name(&self, host: &str, port: u16, namespace: &str) -> Option<(&Arc<Route>, &PortTargets)> {
        let route = self.resolve(host, namespace)?;
        Some((route, route.ports.get(&port)?))
    }

    /// The route and targets for a connection that was going to `addr`: a service's
    /// virtual IP (every ready endpoint of that port), or one endpoint's own address
    /// (that endpoint alone).
    pub fn by_original(&self, addr: SocketAddr) -> Option<(&Arc<Route>, &PortTargets)> {
        if let Some(route) = self.by_vip.get(&addr.ip()) {
            return Some((route, route.ports.get(&addr.port())?));
        }
        self.by_endpoint.get(&addr).map(|(route, only, _)| (route, only))
    }

    /// The service and service port a ready endpoint's app address `addr` serves, if
    /// it is one: where a connection to that endpoint can go once the endpoint leaves.
    pub fn endpoint_service(&self, addr: SocketAddr) -> Option<(&str, u16)> {
        self.by_endpoint
            .get(&addr)
            .map(|(route, _, port)| (route.name.as_str(), *port))
    }

    /// The route a client in `namespace` means by `host`: a resource or host name, or a
    /// bare name in the client's own namespace.
    pub fn resolve(&self, host: &str, namespace: &str) -> Option<&Arc<Route>> {
        match self.by_name.get(host) {
            Some(r) => Some(r),
            None if !host.contains('.') => self.by_name.get(&format!("{host}.{namespace}")),
            None => None,
        }
    }
}

/// What a service's traffic policy asks of requests, beyond endpoint choice.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Retries.
    pub retry: RetrySettings,
    /// Bulkhead limits.
    pub pool: PoolLimits,
    /// The whole request, retries included; `None`: no limit but the client's own
    /// (`grpc-timeout`).
    pub request_timeout: Option<Duration>,
    /// Each attempt; `None`: no limit.
    pub per_try_timeout: Option<Duration>,
    /// TCP + TLS connect to an endpoint's proxy; `None`: the proxy's
    /// `--connect-timeout-ms` (1 s).
    pub connect_timeout: Option<Duration>,
    /// Close a pooled connection unused this long; `None`: 1 h.
    pub idle_timeout: Option<Duration>,
}

fn duration(d: Option<&prost_types::Duration>) -> Option<Duration> {
    d.and_then(|d| {
        Some(Duration::new(
            u64::try_from(d.seconds).ok()?,
            u32::try_from(d.nanos).ok()?,
        ))
    })
    .filter(|d| !d.is_zero())
}

/// The retry, bulkhead and timeout settings a service's traffic policy asks for.
fn policy(service: &Service) -> Policy {
    let tp = service.traffic_policy.as_ref();
    let mut retry = RetrySettings::default();
    if let Some(r) = tp.and_then(|tp| tp.retries.as_ref()) {
        if let Some(attempts) = r.attempts {
            retry.attempts = attempts.max(1);
        }
        if !r.retry_on.is_empty() {
            // The control plane refuses unknown names, so none are lost here.
            retry.retry_on = r
                .retry_on
                .iter()
                .filter_map(|n| RetryOn::named(n))
                .fold(RetryOn(0), RetryOn::union);
        }
        retry.status_codes = r
            .retriable_status_codes
            .iter()
            .filter_map(|c| u16::try_from(*c).ok())
            .collect();
        if let Some(b) = &r.budget {
            retry.budget_ratio = b.ratio.unwrap_or(retry.budget_ratio).clamp(0.0, 1.0);
            retry.min_retries_per_second = b.min_retries_per_second.unwrap_or(retry.min_retries_per_second);
            retry.budget_ttl = duration(b.ttl.as_ref()).unwrap_or(retry.budget_ttl);
        }
        if let Some(b) = &r.backoff {
            retry.backoff_base = duration(b.base_interval.as_ref()).unwrap_or(retry.backoff_base);
            retry.backoff_max = duration(b.max_interval.as_ref()).unwrap_or(retry.backoff_max);
        }
        if let Some(max) = r.max_body_bytes {
            retry.max_body_bytes = usize::try_from(max).unwrap_or(usize::MAX);
        }
    }
    let pool = tp
        .and_then(|tp| tp.connection_pool.as_ref())
        .map_or(PoolLimits::default(), |p| PoolLimits {
            max_requests: p.max_requests,
            max_pending_requests: p.max_pending_requests,
        });
    let timeouts = tp.and_then(|tp| tp.timeouts.as_ref());
    Policy {
        retry,
        pool,
        request_timeout: duration(timeouts.and_then(|t| t.request.as_ref())),
        per_try_timeout: duration(timeouts.and_then(|t| t.per_try.as_ref())),
        connect_timeout: duration(timeouts.and_then(|t| t.connect.as_ref())),
        idle_timeout: duration(timeouts.and_then(|t| t.idle.as_ref())),
    }
}

/// The balancer settings a service's traffic policy asks for.
fn settings(service: &Service) -> Settings {
    let lb = service.traffic_policy.as_ref().and_then(|tp| tp.load_balancer.as_ref());
    let od = service
        .traffic_policy
        .as_ref()
        .and_then(|tp| tp.outlier_detection.as_ref());
    let defaults = Settings::default();
    let mut outlier = OutlierSettings::default();
    if let Some(od) = od {
        outlier.consecutive_failures = od.consecutive_failures.unwrap_or(outlier.consecutive_failures);
        outlier.base_ejection_time = duration(od.base_ejection_time.as_ref()).unwrap_or(outlier.base_ejection_time);
        outlier.max_ejection_time = duration(od.max_ejection_time.as_ref()).unwrap_or(outlier.max_ejection_time);
        outlier.max_ejection_percent = od.max_ejection_percent.unwrap_or(100).min(100);
    }
    Settings {
        algorithm: match lb.map(|lb| lb.algorithm()) {
            Some(PbAlgorithm::RoundRobin) => Algorithm::RoundRobin,
            _ => Algorithm::Ewma,
        },
        decay: duration(lb.and_then(|lb| lb.decay.as_ref())).unwrap_or(defaults.decay),
        default_rtt: duration(lb.and_then(|lb| lb.default_rtt.as_ref())).unwrap_or(defaults.default_rtt),
        outlier,
    }
}
