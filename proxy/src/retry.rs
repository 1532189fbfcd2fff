//! Retries within a budget, bodies kept for replay, and the per-service bulkhead.
//!
//! * **Which requests.** Only requests that are safe to retry: an idempotent method
//!   (GET, HEAD, OPTIONS, PUT, DELETE, TRACE; RFC 9110 §9.2.2) failing as `retry_on`
//!   says, or any method when it provably never reached the app (the connection to its
//!   proxy failed, or the stream was refused). A POST that reached a backend which
//!   then answered 503 is never sent again (istio#50506).
//! * **How often.** [`RetryBudget`]: retries may add at most `ratio` (20 %) of the
//!   service's requests plus `min_retries_per_second` (10/s), counted over `ttl`
//!   (10 s), shared by every request to the service; a retry counts from the moment it
//!   is decided, backoff included (envoy#30205). Linkerd's budget, Envoy's names.
//! * **When.** Full-jitter exponential backoff: attempt n waits uniform(0, min(cap,
//!   base × 2^n)), base 25 ms and cap 250 ms (Envoy; AWS Architecture Blog,
//!   "Exponential Backoff And Jitter"). A retry prefers another endpoint.
//! * **With what body.** [`ReplayBody`] keeps what the first attempt sent, up to
//!   `max_body_bytes` (64 KiB, Linkerd); a body that outgrows it is never retried and
//!   never replayed truncated.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use hyper::body::{Frame, SizeHint};
use rand::Rng;
use tokio::time::Instant;

/// Attempts per request, the first included, when the policy sets none: 3.
pub const DEFAULT_ATTEMPTS: u32 = 3;
/// Retry budget ratio when the policy sets none: 0.2 (Linkerd).
pub const DEFAULT_BUDGET_RATIO: f64 = 0.2;
/// Retries per second always allowed when the policy sets none: 10 (Linkerd).
pub const DEFAULT_MIN_RETRIES_PER_SECOND: u32 = 10;
/// The budget's window when the policy sets none: 10 s (Linkerd).
pub const DEFAULT_BUDGET_TTL: Duration = Duration::from_secs(10);
/// First backoff bound when the policy sets none: 25 ms (Envoy).
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(25);
/// Backoff cap when the policy sets none: 250 ms (Envoy).
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_millis(250);
/// The largest body kept for replay when the policy sets none: 64 KiB (Linkerd).
pub const DEFAULT_MAX_BODY_BYTES: usize = 64 * 1024;

/// The `retry_on` conditions (Envoy's names), as bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryOn(pub u16);

impl RetryOn {
    /// `connect-failure`: the connection to the endpoint failed.
    pub const CONNECT_FAILURE: RetryOn = RetryOn(1);
    /// `reset`: the stream or connection broke before a response.
    pub const RESET: RetryOn = RetryOn(1 << 1);
    /// `refused-stream`: the peer refused the stream (never processed).
    pub const REFUSED_STREAM: RetryOn = RetryOn(1 << 2);
    /// `5xx`: any 5xx answer.
    pub const FIVE_XX: RetryOn = RetryOn(1 << 3);
    /// `gateway-error`: 502, 503 or 504.
    pub const GATEWAY_ERROR: RetryOn = RetryOn(1 << 4);
    /// `retriable-status-codes`: the codes listed in the policy.
    pub const STATUS_CODES: RetryOn = RetryOn(1 << 5);
    /// `unavailable`: gRPC UNAVAILABLE (14).
    pub const UNAVAILABLE: RetryOn = RetryOn(1 << 6);
    /// `cancelled`: gRPC CANCELLED (1).
    pub const CANCELLED: RetryOn = RetryOn(1 << 7);
    /// `deadline-exceeded`: gRPC DEADLINE_EXCEEDED (4).
    pub const DEADLINE_EXCEEDED: RetryOn = RetryOn(1 << 8);
    /// `resource-exhausted`: gRPC RESOURCE_EXHAUSTED (8).
    pub const RESOURCE_EXHAUSTED: RetryOn = RetryOn(1 << 9);

    /// The default: `connect-failure`, `reset`, `refused-stream`, `gateway-error`,
    /// `unavailable`.
    pub const DEFAULT: RetryOn = RetryOn(1 | 1 << 1 | 1 << 2 | 1 << 4 | 1 << 6);

    /// The condition named `name`, or `None` for an unknown one.
    pub fn named(name: &str) -> Option<RetryOn> {
        Some(match name {
            "connect-failure" => Self::CONNECT_FAILURE,
            "reset" => Self::RESET,
            "refused-stream" => Self::REFUSED_STREAM,
            "5xx" => Self::FIVE_XX,
            "gateway-error" => Self::GATEWAY_ERROR,
            "retriable-status-codes" => Self::STATUS_CODES,
            "unavailable" => Self::UNAVAILABLE,
            "cancelled" => Self::CANCELLED,
            "deadline-exceeded" => Self::DEADLINE_EXCEEDED,
            "resource-exhausted" => Self::RESOURCE_EXHAUSTED,
            _ => return None,
        })
    }

    /// Both sets.
    pub fn union(self, other: RetryOn) -> RetryOn {
        RetryOn(self.0 | other.0)
    }

    /// Whether `self` has every bit of `other`.
    pub fn has(self, other: RetryOn) -> bool {
        self.0 & other.0 == other.0
    }
}

/// Retry settings for one service (`TrafficPolicy.retries`).
#[derive(Debug, Clone, PartialEq)]
pub struct RetrySettings {
    /// Attempts including the first; 1 disables retries. Default [`DEFAULT_ATTEMPTS`].
    pub attempts: u32,
    /// What makes an attempt retryable; default [`RetryOn::DEFAULT`].
    pub retry_on: RetryOn,
    /// Extra retryable status codes (with `retriable-status-codes`).
    pub status_codes: Vec<u16>,
    /// The budget's ratio; default [`DEFAULT_BUDGET_RATIO`].
    pub budget_ratio: f64,
    /// Retries per second always allowed; default [`DEFAULT_MIN_RETRIES_PER_SECOND`].
    pub min_retries_per_second: u32,
    /// The budget's window; default [`DEFAULT_BUDGET_TTL`].
    pub budget_ttl: Duration,
    /// First backoff bound; default [`DEFAULT_BACKOFF_BASE`].
    pub backoff_base: Duration,
    /// Backoff cap; default [`DEFAULT_BACKOFF_MAX`].
    pub backoff_max: Duration,
    /// Bodies up to this many bytes are kept for replay; default
    /// [`DEFAULT_MAX_BODY_BYTES`].
    pub max_body_bytes: usize,
}

impl Default for RetrySettings {
    fn default() -> Self {
        Self {
            attempts: DEFAULT_ATTEMPTS,
            retry_on: RetryOn::DEFAULT,
            status_codes: Vec::new(),
            budget_ratio: DEFAULT_BUDGET_RATIO,
            min_retries_per_second: DEFAULT_MIN_RETRIES_PER_SECOND,
            budget_ttl: DEFAULT_BUDGET_TTL,
            backoff_base: DEFAULT_BACKOFF_BASE,
            backoff_max: DEFAULT_BACKOFF_MAX,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
        }
    }
}

impl RetrySettings {
    /// The wait before retry number `retry` (1 for the first retry): uniform(0,
    /// min(max, base × 2^(retry − 1))).
    pub fn backoff(&self, retry: u32) -> Duration {
        let bound = self
            .backoff_base
            .saturating_mul(1u32 << retry.saturating_sub(1).min(16))
            .min(self.backoff_max);
        bound.mul_f64(rand::rng().random_range(0.0..1.0))
    }

    /// Whether an answer with `status` (and, for gRPC, the `grpc-status` in its
    /// headers) is retryable.
    pub fn retryable_answer(&self, status: StatusCode, headers: &HeaderMap) -> bool {
        let code = status.as_u16();
        if (self.retry_on.has(RetryOn::FIVE_XX) && status.is_server_error())
            || (self.retry_on.has(RetryOn::GATEWAY_ERROR) && matches!(code, 502..=504))
            || (self.retry_on.has(RetryOn::STATUS_CODES) && self.status_codes.contains(&code))
        {
            return true;
        }
        let grpc = headers
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u32>().ok());
        match grpc {
            Some(14) => self.retry_on.has(RetryOn::UNAVAILABLE),
            Some(1) => self.retry_on.has(RetryOn::CANCELLED),
            Some(4) => self.retry_on.has(RetryOn::DEADLINE_EXCEEDED),
            Some(8) => self.retry_on.has(RetryOn::RESOURCE_EXHAUSTED),
            _ => false,
        }
    }
}

/// Whether a method is idempotent (RFC 9110 §9.2.2), so a request that may have
/// reached the app can be sent again.
pub fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// Buckets the budget's window is counted in: 10.
const BUCKETS: usize = 10;

/// A service's retry budget; see the module docs. Counted in [`BUCKETS`] time buckets
/// over the window, behind one short lock.
#[derive(Debug, Default)]
pub struct RetryBudget {
    window: Mutex<VecDeque<(Instant, u64, u64)>>,
}

impl RetryBudget {
    /// Counts a request (a first attempt).
    pub fn deposit(&self, ttl: Duration) {
        self.with_current(ttl, |bucket| bucket.1 += 1);
    }

    /// Takes one retry from the budget: false when it is spent.
    pub fn withdraw(&self, settings: &RetrySettings) -> bool {
        let ttl = settings.budget_ttl;
        let mut allowed = false;
        self.with_current(ttl, |_| ());
        let mut window = self.window.lock().unwrap_or_else(|e| e.into_inner());
        let (requests, retries) = window.iter().fold((0u64, 0u64), |(q, r), b| (q + b.1, r + b.2));
        let reserve = f64::from(settings.min_retries_per_second) * ttl.as_secs_f64();
        if (retries as f64) < settings.budget_ratio * requests as f64 + reserve
            && let Some(current) = window.back_mut()
        {
            current.2 += 1;
            allowed = true;
        }
        allowed
    }

    /// Runs `f` on the current bucket, opening it and dropping buckets older than
    /// `ttl` first.
    fn with_current(&self, ttl: Duration, f: impl FnOnce(&mut (Instant, u64, u64))) {
        let now = Instant::now();
        let width = ttl / BUCKETS as u32;
        let mut window = self.window.lock().unwrap_or_else(|e| e.into_inner());
        while window.front().is_some_and(|b| now.duration_since(b.0) >= ttl) {
            window.pop_front();
        }
        if window.back().is_none_or(|b| now.duration_since(b.0) >= width) {
            window.push_back((now, 0, 0));
        }
        if let Some(current) = window.back_mut() {
            f(current);
        }
    }
}

/// Bulkhead limits for one service (`TrafficPolicy.connectionPool`); unset means
/// unlimited (Envoy's default of 1024 bites users who never set it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolLimits {
    /// Requests in flight to the service at once.
    pub max_requests: Option<u32>,
    /// Requests waiting for a slot when `max_requests` are in flight; unset: no
    /// limit on waiting. 0: nobody waits.
    pub max_pending_requests: Option<u32>,
}

/// A service's requests in flight and waiting, against [`PoolLimits`].
#[derive(Debug, Default)]
pub struct Bulkhead {
    in_flight: AtomicU32,
    pending: AtomicU32,
    freed: tokio::sync::Notify,
}

/// Why the bulkhead refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// `max_pending_requests` were already waiting.
    Pending(u32),
}

/// A request's place in the bulkhead; frees it when dropped.
#[derive(Debug)]
pub struct Slot(Option<Arc<Bulkhead>>);

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(b) = self.0.take() {
            b.in_flight.fetch_sub(1, Ordering::AcqRel);
            b.freed.notify_one();
        }
    }
}

impl Bulkhead {
    /// A slot for one request: at once below `max_requests`; else waiting among at most
    /// `max_pending_requests`; else refused.
    ///
    /// # Errors
    /// [`Overflow`] when the waiting line is full.
    pub async fn admit(self: &Arc<Self>, limits: PoolLimits) -> Result<Slot, Overflow> {
        let Some(max) = limits.max_requests else {
            return Ok(Slot(None));
        };
        if self.try_take(max) {
            return Ok(Slot(Some(self.clone())));
        }
        let waiting = self.pending.fetch_add(1, Ordering::AcqRel) + 1;
        let _waiting = PendingMark(self);
        if limits.max_pending_requests.is_some_and(|p| waiting > p) {
            return Err(Overflow::Pending(limits.max_pending_requests.unwrap_or(0)));
        }
        loop {
            // Registered before the check, so a slot freed in between still wakes us.
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if self.try_take(max) {
                return Ok(Slot(Some(self.clone())));
            }
            freed.await;
        }
    }

    fn try_take(&self, max: u32) -> bool {
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .is_ok()
    }
}

struct PendingMark<'a>(&'a Bulkhead);

impl Drop for PendingMark<'_> {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a [`ReplayBody`] has kept of the original body.
#[derive(Debug, Default)]
struct Kept {
    chunks: Vec<Bytes>,
    bytes: usize,
    trailers: Option<HeaderMap>,
    /// The original ended (every chunk and the trailers are kept).
    complete: bool,
    /// It outgrew the limit: no replay.
    overflowed: bool,
}

/// The shared part: the original body (read by whichever attempt gets there first) and
/// what was kept of it.
struct Shared<B> {
    inner: Option<B>,
    kept: Kept,
    limit: usize,
    /// Bumped by each [`ReplayBody::replay`]: only the newest body may read on, so an
    /// abandoned attempt still being drained cannot take chunks a replay needs.
    epoch: u32,
}

/// A request body that can be sent more than once: the first attempt streams the
/// original and keeps a copy (up to the limit); a later attempt replays the copy, then
/// goes on with whatever of the original is still unread.
pub struct ReplayBody<B> {
    shared: Arc<Mutex<Shared<B>>>,
    epoch: u32,
    /// The next kept chunk this attempt replays.
    position: usize,
    trailers_sent: bool,
}

impl<B> ReplayBody<B> {
    /// Wraps `inner`, keeping up to `limit` bytes for replay.
    pub fn new(inner: B, limit: usize) -> Self {
        Self {
            shared: Arc::new(Mutex::new(Shared {
                inner: Some(inner),
                kept: Kept::default(),
                limit,
                epoch: 0,
            })),
            epoch: 0,
            position: 0,
            trailers_sent: false,
        }
    }

    /// A handle on what is kept, for later [`ReplayBody::replay`] calls; it never
    /// reads (polled, it is empty) and does not supersede the body it came from.
    pub fn keeper(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            epoch: u32::MAX,
            position: 0,
            trailers_sent: false,
        }
    }

    /// A body for another attempt, superseding every earlier one (they end at once if
    /// still being read): what was kept, then whatever of the original is still
    /// unread (a stream refused while its body was on the way is sent again whole).
    /// `None` when the original outgrew the limit or failed: a replay must never be
    /// truncated.
    pub fn replay(&self) -> Option<Self> {
        let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        let readable = shared.kept.complete || shared.inner.is_some();
        if shared.kept.overflowed || !readable {
            return None;
        }
        shared.epoch += 1;
        Some(Self {
            epoch: shared.epoch,
            shared: self.shared.clone(),
            position: 0,
            trailers_sent: false,
        })
    }
}

/// What an attempt's body reads once a later attempt superseded it: an error, so the
/// attempt's stream is reset rather than ended as if its body were complete (an app
/// still reading it would otherwise take a truncated body for the whole).
#[derive(Debug, thiserror::Error)]
#[error("the request body went to a retry")]
pub struct Superseded;

impl<B> hyper::body::Body for ReplayBody<B>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: Into<crate::http::BoxError>,
{
    type Data = Bytes;
    type Error = crate::http::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, crate::http::BoxError>>> {
        let this = &mut *self;
        let mut shared = this.shared.lock().unwrap_or_else(|e| e.into_inner());
        if this.epoch == u32::MAX {
            // The keeper reads nothing.
            return Poll::Ready(None);
        }
        if this.epoch != shared.epoch {
            return Poll::Ready(Some(Err(Superseded.into())));
        }
        if let Some(chunk) = shared.kept.chunks.get(this.position) {
            this.position += 1;
            return Poll::Ready(Some(Ok(Frame::data(chunk.clone()))));
        }
        if shared.kept.complete {
            return match shared.kept.trailers.clone() {
                Some(t) if !this.trailers_sent => {
                    this.trailers_sent = true;
                    Poll::Ready(Some(Ok(Frame::trailers(t))))
                }
                _ => Poll::Ready(None),
            };
        }
        let Some(inner) = shared.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = std::task::ready!(Pin::new(inner).poll_frame(cx));
        let shared = &mut *shared;
        match &frame {
            Some(Ok(f)) => {
                if let Some(data) = f.data_ref() {
                    shared.kept.bytes += data.len();
                    if shared.kept.bytes > shared.limit {
                        shared.kept.overflowed = true;
                        shared.kept.chunks.clear();
                    } else {
                        shared.kept.chunks.push(data.clone());
                        this.position = shared.kept.chunks.len();
                    }
                } else if let Some(t) = f.trailers_ref() {
                    shared.kept.trailers = Some(t.clone());
                    this.trailers_sent = true;
                }
            }
            None => shared.kept.complete = true,
            Some(Err(_)) => shared.kept.overflowed = true,
        }
        frame.map_or(Poll::Ready(None), |f| Poll::Ready(Some(f.map_err(Into::into))))
    }

    fn is_end_stream(&self) -> bool {
        let shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        let replayed_all = self.position >= shared.kept.chunks.len();
        match &shared.inner {
            _ if shared.kept.complete => replayed_all && (shared.kept.trailers.is_none() || self.trailers_sent),
            Some(inner) => replayed_all && inner.is_end_stream(),
            None => replayed_all,
        }
    }

    fn size_hint(&self) -> SizeHint {
        let shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        match &shared.inner {
            _ if shared.kept.complete => SizeHint::with_exact(shared.kept.bytes as u64),
            Some(inner) if shared.kept.bytes == 0 => inner.size_hint(),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn chunked(
        parts: &[&'static [u8]],
    ) -> http_body_util::StreamBody<impl futures::Stream<Item = Result<Frame<Bytes>, std::convert::Infallible>> + Unpin>
    {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-sum", "3".parse().unwrap());
        let frames: Vec<_> = parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::from_static(p))))
            .chain([Ok(Frame::trailers(trailers))])
            .collect();
        http_body_util::StreamBody::new(futures::stream::iter(frames))
    }

    #[tokio::test]
    async fn a_replayed_body_is_byte_identical_and_a_large_one_is_not_replayed() {
        let first = ReplayBody::new(chunked(&[b"ab", b"cd", b"e"]), 64);
        let keeper = first.keeper();
        let sent = first.collect().await.unwrap();
        assert_eq!(sent.trailers().unwrap()["x-sum"], "3");
        assert_eq!(&sent.to_bytes()[..], b"abcde");
        let replayed = keeper.replay().unwrap().collect().await.unwrap();
        assert_eq!(replayed.trailers().unwrap()["x-sum"], "3");
        assert_eq!(&replayed.to_bytes()[..], b"abcde");

        let mut big = ReplayBody::new(chunked(&[b"0123456789", b"0123456789"]), 15);
        let keeper = big.keeper();
        let _ = big.frame().await;
        let mut replay = keeper.replay().expect("read part-way: the kept part, then the rest");
        let over = big.frame().await.expect("a frame");
        assert!(
            over.is_err(),
            "the first attempt fails: its stream must not end as if whole"
        );
        let _ = replay.frame().await;
        assert_eq!(replay.collect().await.unwrap().to_bytes().len(), 10, "the rest");
        assert!(keeper.replay().is_none(), "outgrew 15 bytes: no replay");
    }

    #[tokio::test]
    async fn a_body_read_part_way_replays_whole() {
        let mut first = ReplayBody::new(chunked(&[b"ab", b"cd", b"e"]), 64);
        let keeper = first.keeper();
        let _ = first.frame().await;
        let replay = keeper.replay().unwrap();
        let replayed = replay.collect().await.unwrap();
        assert_eq!(&replayed.to_bytes()[..], b"abcde");
    }

    #[tokio::test]
    async fn an_unread_body_replays_from_the_original_and_supersedes_the_first() {
        let first = ReplayBody::new(chunked(&[b"ab", b"cd"]), 64);
        let keeper = first.keeper();
        let replay = keeper.replay().unwrap();
        // The first attempt is over: it fails rather than end as if empty were whole.
        assert!(first.collect().await.is_err());
        assert_eq!(&replay.collect().await.unwrap().to_bytes()[..], b"abcd");
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_allows_a_ratio_of_requests_plus_a_reserve() {
        let s = RetrySettings {
            min_retries_per_second: 1,
            ..RetrySettings::default()
        };
        let b = RetryBudget::default();
        for _ in 0..100 {
            b.deposit(s.budget_ttl);
        }
        // 20 % of 100 plus 1/s over 10 s.
        let allowed = (0..100).filter(|_| b.withdraw(&s)).count();
        assert_eq!(allowed, 30);
        tokio::time::advance(s.budget_ttl).await;
        assert_eq!((0..100).filter(|_| b.withdraw(&s)).count(), 10, "the reserve alone");
    }

    #[tokio::test]
    async fn the_bulkhead_lets_a_few_wait_and_refuses_the_rest() {
        let b = Arc::new(Bulkhead::default());
        let limits = PoolLimits {
            max_requests: Some(1),
            max_pending_requests: Some(1),
        };
        let first = b.admit(limits).await.unwrap();
        let waiter = tokio::spawn({
            let b = b.clone();
            async move { b.admit(limits).await.map(|_| ()) }
        });
        while b.pending.load(Ordering::Acquire) == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(b.admit(limits).await.unwrap_err(), Overflow::Pending(1));
        drop(first);
        waiter.await.unwrap().unwrap();
        assert!(idempotent(&Method::PUT) && !idempotent(&Method::POST));
        let s = RetrySettings::default();
        assert!(s.retryable_answer(StatusCode::SERVICE_UNAVAILABLE, &HeaderMap::new()));
        assert!(!s.retryable_answer(StatusCode::INTERNAL_SERVER_ERROR, &HeaderMap::new()));
        assert!(s.backoff(10) <= s.backoff_max);
    }
}
