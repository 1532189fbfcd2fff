//! Circuit breaking per endpoint: outlier detection by consecutive failures.
//!
//! ```text
//!   ┌──────────┐ N consecutive failures ┌─────────┐ ejection time over ┌───────────┐
//!   │ admitted │───────────────────────▶│ ejected │───────────────────▶│ probation │
//!   └──────────┘                        └─────────┘                    └───────────┘
//!        ▲ the probe succeeds                ▲ the probe fails (time doubles)  │
//!        └───────────────────────────────────┴──────────── one probe request ──┘
//! ```
//!
//! A failure is a 5xx answer, a failed connect, a reset or a timeout (Envoy
//! `consecutive_5xx`, Linkerd failure accrual); any other answer resets the count. The
//! ejection time starts at `base_ejection_time` (1 s), doubles with each ejection in a
//! row up to `max_ejection_time` (60 s), and carries up to 10 % jitter so endpoints
//! ejected together are not probed together. The balancer never ejects below one
//! admitted endpoint, nor beyond `max_ejection_percent`; if every endpoint is ejected
//! anyway it uses all of them (Envoy's panic mode) rather than fail every request.
//!
//! State is a handful of atomics per endpoint, so the request path takes no lock.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

/// Consecutive failures that eject an endpoint when the policy sets none: 5 (Envoy).
pub const DEFAULT_CONSECUTIVE_FAILURES: u32 = 5;
/// First ejection time when the policy sets none: 1 s (Envoy `base_ejection_time`).
pub const DEFAULT_BASE_EJECTION_TIME: Duration = Duration::from_secs(1);
/// Cap on the ejection time when the policy sets none: 60 s.
pub const DEFAULT_MAX_EJECTION_TIME: Duration = Duration::from_secs(60);

/// Outlier detection settings for one service (`TrafficPolicy.outlierDetection`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OutlierSettings {
    /// Consecutive failures that eject; 0 disables ejection. Default
    /// [`DEFAULT_CONSECUTIVE_FAILURES`].
    pub consecutive_failures: u32,
    /// First ejection time; default [`DEFAULT_BASE_EJECTION_TIME`].
    pub base_ejection_time: Duration,
    /// Longest ejection time; default [`DEFAULT_MAX_EJECTION_TIME`].
    pub max_ejection_time: Duration,
    /// At most this percentage of a service's endpoints ejected at once, 0–100;
    /// default 100 (bounded anyway by the one endpoint always kept).
    pub max_ejection_percent: u32,
}

impl Default for OutlierSettings {
    fn default() -> Self {
        Self {
            consecutive_failures: DEFAULT_CONSECUTIVE_FAILURES,
            base_ejection_time: DEFAULT_BASE_EJECTION_TIME,
            max_ejection_time: DEFAULT_MAX_EJECTION_TIME,
            max_ejection_percent: 100,
        }
    }
}

impl OutlierSettings {
    /// The ejection time after `ejections` ejections in a row (1 for the first):
    /// `base × 2^(ejections − 1)`, capped at the maximum, plus up to 10 % jitter.
    pub fn ejection_time(&self, ejections: u32) -> Duration {
        let doubled = self
            .base_ejection_time
            .saturating_mul(1u32 << ejections.saturating_sub(1).min(16));
        let time = doubled.min(self.max_ejection_time);
        time.mul_f64(1.0 + rand::rng().random_range(0.0..0.1))
    }
}

/// The [`now_ms`] at which an ejection of `time` ends (never 0).
fn deadline(time: Duration) -> u64 {
    now_ms() + u64::try_from(time.as_millis()).unwrap_or(u64::MAX / 2).max(1)
}

/// Milliseconds since this process's clock origin; 0 is never a valid deadline.
fn now_ms() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    let origin = *ORIGIN.get_or_init(|| Instant::now() - Duration::from_millis(1));
    u64::try_from(origin.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Where an endpoint stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Takes traffic.
    Admitted,
    /// Takes no traffic until its ejection time is over.
    Ejected,
    /// Its ejection time is over: the next request to it is the probe.
    Probation,
    /// The probe is in flight; nothing else goes to it meanwhile.
    Probing,
}

/// One endpoint's outlier state.
#[derive(Debug, Default)]
pub struct Outlier {
    consecutive: AtomicU32,
    /// The end of the current ejection, [`now_ms`] scale; 0 when admitted.
    ejected_until: AtomicU64,
    /// Ejections in a row (the backoff exponent); reset by a successful probe.
    ejections: AtomicU32,
    probing: AtomicBool,
}

impl Outlier {
    /// Where the endpoint stands now.
    pub fn state(&self) -> State {
        match self.ejected_until.load(Ordering::Acquire) {
            0 => State::Admitted,
            _ if self.probing.load(Ordering::Acquire) => State::Probing,
            until if until > now_ms() => State::Ejected,
            _ => State::Probation,
        }
    }

    /// Whether it is out of rotation (ejected, on probation or being probed).
    pub fn is_out(&self) -> bool {
        self.ejected_until.load(Ordering::Acquire) != 0
    }

    /// Claims the probe of an endpoint on probation: true for exactly one caller.
    pub fn claim_probe(&self) -> bool {
        self.state() == State::Probation
            && self
                .probing
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }

    /// Gives a claimed probe back unused (its request never went out).
    pub fn release_probe(&self) {
        self.probing.store(false, Ordering::Release);
    }

    /// Records a success: the count starts over; a successful probe readmits the
    /// endpoint. Returns true when this call readmitted it (exactly one caller sees
    /// true per ejection, even racing [`Outlier::retire`]).
    pub fn success(&self, probe: bool) -> bool {
        self.consecutive.store(0, Ordering::Relaxed);
        if probe {
            self.ejections.store(0, Ordering::Relaxed);
            self.probing.store(false, Ordering::Release);
            return self.ejected_until.swap(0, Ordering::AcqRel) != 0;
        }
        false
    }

    /// Counts a failure; true when it reaches the threshold, so the caller should try
    /// [`Outlier::eject`]. A failed probe re-ejects at once (for the next, doubled
    /// time) and returns false.
    pub fn failure(&self, probe: bool, settings: &OutlierSettings) -> bool {
        if probe {
            let time = settings.ejection_time(self.ejections.fetch_add(1, Ordering::Relaxed) + 1);
            // Still out of rotation: the deadline moves, the count of ejected stays.
            let _ = self
                .ejected_until
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |until| {
                    (until != 0).then(|| deadline(time))
                });
            self.probing.store(false, Ordering::Release);
            return false;
        }
        if settings.consecutive_failures == 0 || self.is_out() {
            return false;
        }
        let failures = self.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
        failures >= settings.consecutive_failures
    }

    /// Ejects an admitted endpoint: the ejection time when this call did it, `None`
    /// when it was already out (a concurrent failure won).
    pub fn eject(&self, settings: &OutlierSettings) -> Option<Duration> {
        let time = settings.ejection_time(self.ejections.load(Ordering::Relaxed) + 1);
        self.ejected_until
            .compare_exchange(0, deadline(time), Ordering::AcqRel, Ordering::Acquire)
            .ok()?;
        self.ejections.fetch_add(1, Ordering::Relaxed);
        self.consecutive.store(0, Ordering::Relaxed);
        Some(time)
    }

    /// Takes a removed endpoint out of the books: true when it was out of rotation
    /// (and so counted among the ejected), exactly once per ejection.
    pub fn retire(&self) -> bool {
        self.ejected_until.swap(0, Ordering::AcqRel) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn ejected_after_n_failures_probed_once_then_readmitted() {
        let s = OutlierSettings::default();
        let o = Outlier::default();
        for _ in 0..4 {
            assert!(!o.failure(false, &s));
        }
        assert!(o.failure(false, &s), "the fifth failure reaches the threshold");
        let time = o.eject(&s).expect("admitted, so this call ejects");
        assert_eq!(o.eject(&s), None, "a racing second ejection loses");
        assert!(time >= s.base_ejection_time && time <= s.base_ejection_time.mul_f64(1.1));
        assert_eq!(o.state(), State::Ejected);
        tokio::time::advance(time).await;
        assert_eq!(o.state(), State::Probation);
        assert!(o.claim_probe());
        assert!(!o.claim_probe(), "one probe at a time");
        // The probe fails: ejected again, for twice as long.
        assert!(!o.failure(true, &s));
        assert_eq!(o.state(), State::Ejected);
        tokio::time::advance(s.base_ejection_time).await;
        assert_eq!(o.state(), State::Ejected, "the second ejection lasts at least 2 s");
        tokio::time::advance(s.base_ejection_time.mul_f64(1.25)).await;
        assert!(o.claim_probe());
        assert!(o.success(true));
        assert_eq!(o.state(), State::Admitted);
    }

    #[test]
    fn a_success_resets_the_count_and_backoff_is_capped() {
        let s = OutlierSettings::default();
        let o = Outlier::default();
        for _ in 0..4 {
            o.failure(false, &s);
        }
        o.success(false);
        assert!(!o.failure(false, &s), "the count started over");
        assert!(s.ejection_time(30) <= s.max_ejection_time.mul_f64(1.1));
        // Removal while out counts once, and a late probe success does not count again.
        o.eject(&s).unwrap();
        assert!(o.retire());
        assert!(!o.success(true));
    }
}
