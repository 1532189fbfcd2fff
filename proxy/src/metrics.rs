//! The proxy's metrics: every name in one place, each with its help text. Labels are
//! bounded: `type` is `service`, `endpoints` or `inbound_policy`; `result` is `ack` or
//! `nack`.
//!
//! Per-endpoint series (`wary_proxy_endpoint_*`) are not in the `metrics` registry,
//! which can never drop a series: each endpoint's balancer keeps them
//! ([`EndpointStats`]) and `/metrics` renders them from the live endpoints
//! ([`render_endpoints`]), so they leave the page the moment discovery removes the
//! endpoint, and a proxy under endpoint churn keeps only the live set's series.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics::{Unit, describe_counter, describe_gauge};
use metrics_exporter_prometheus::Distribution;

/// Gauge: 1 while the discovery stream is up, 0 otherwise.
pub const DISCOVERY_CONNECTED: &str = "wary_proxy_discovery_connected";
/// Counter: discovery sessions that ended (each is followed by a reconnect attempt).
pub const DISCOVERY_RECONNECTS: &str = "wary_proxy_discovery_reconnects_total";
/// Counter, by `type` and `result`: discovery responses applied (ACK) or rejected (NACK).
pub const DISCOVERY_UPDATES: &str = "wary_proxy_discovery_updates_total";
/// Gauge, by `type`: the version in force, as a number (the first 52 bits of the
/// content-hash version, exact in a float): proxies with the same value hold the same
/// configuration of that type. The full version is on `/config_dump`.
pub const DISCOVERY_VERSION: &str = "wary_proxy_discovery_version";

/// Gauge: the current workload certificate's notAfter, Unix seconds.
pub const CERT_EXPIRY: &str = "wary_proxy_identity_certificate_expiry_timestamp_seconds";
/// Counter, by `result` (`ok`, `error`): certificate requests (first and renewals).
pub const CERT_RENEWALS: &str = "wary_proxy_identity_certificate_requests_total";
/// Counter, by `direction` (`inbound`, `outbound`, `control_plane`) and `reason` (see
/// `wary_certs::tls::HandshakeFailure`): TLS handshakes that failed.
pub const TLS_HANDSHAKE_FAILURES: &str = "wary_proxy_tls_handshake_failures_total";
/// Counter, by `direction`: TLS handshakes that succeeded.
pub const TLS_HANDSHAKES: &str = "wary_proxy_tls_handshakes_total";
/// Gauge: pooled HTTP/2 connections to peer proxies.
pub const PEER_CONNECTIONS: &str = "wary_proxy_peer_connections";

/// Counter, by `direction` and `service` (`<name>.<namespace>` from the mesh's own
/// configuration, `passthrough` outside the mesh, `local` inbound): requests proxied.
pub const REQUESTS: &str = "wary_proxy_requests_total";

/// Gauge, by `service` and `endpoint`: the Peak-EWMA RTT estimate, seconds.
pub const ENDPOINT_EWMA: &str = "wary_proxy_endpoint_ewma_seconds";
/// Gauge, by `service` and `endpoint`: requests in flight.
pub const ENDPOINT_IN_FLIGHT: &str = "wary_proxy_endpoint_in_flight";
/// Counter, by `service` and `endpoint`: requests sent to the endpoint.
pub const ENDPOINT_REQUESTS: &str = "wary_proxy_endpoint_requests_total";
/// Counter, by `service`, `endpoint` and `outcome` (`success`, `failure`: a 5xx,
/// connect failure, reset or timeout): attempts answered.
pub const ENDPOINT_RESPONSES: &str = "wary_proxy_endpoint_responses_total";
/// Summary, by `service` and `endpoint`: time to the first response byte, seconds
/// (quantiles over a rolling window of about a minute).
pub const ENDPOINT_LATENCY: &str = "wary_proxy_endpoint_response_latency_seconds";
/// Gauge, by `service` and `endpoint`: 1 while the endpoint is out of rotation
/// (ejected by outlier detection, or on probation), else 0.
pub const ENDPOINT_EJECTED: &str = "wary_proxy_endpoint_ejected";
/// Counter, by `service` and `endpoint`: times the endpoint was ejected after
/// consecutive failures (failed probes not included).
pub const ENDPOINT_EJECTIONS: &str = "wary_proxy_endpoint_ejections_total";

/// Counter, by `service` and `result` (`sent`, `budget_exhausted`, `not_retryable`
/// for a request with a body too large to replay): retries.
pub const RETRIES: &str = "wary_proxy_retries_total";
/// Counter, by `service`: requests refused at once by the bulkhead
/// (`TrafficPolicy.connectionPool`).
pub const OVERFLOWS: &str = "wary_proxy_bulkhead_overflows_total";
/// Counter, by `direction` and `service` and `code` (the status class, `2xx`...`5xx`),
/// and inbound by `client` (the caller's SPIFFE ID): responses returned to the
/// client, after any retries.
pub const RESPONSES: &str = "wary_proxy_responses_total";
/// Histogram, by `direction` and `service` (inbound also `client`): time from the
/// request to the response's headers, retries included, seconds. Buckets:
/// [`LATENCY_BUCKETS`].
pub const RESPONSE_LATENCY: &str = "wary_proxy_response_latency_seconds";
/// The buckets of [`RESPONSE_LATENCY`], seconds: 1 ms to 10 s.
pub const LATENCY_BUCKETS: [f64; 12] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];
/// Counter: opaque streams carried (TCP via `CONNECT` or transparent mode, and
/// upgraded HTTP/1.1 connections), counted when they end.
pub const TCP_STREAMS: &str = "wary_proxy_tcp_streams_total";
/// Counter, by `flow` (`to_server`, `to_client`): bytes carried in opaque streams.
pub const TCP_BYTES: &str = "wary_proxy_tcp_bytes_total";

/// Counter, by `decision` (`allow`, `deny`) and `policy` (the deciding
/// AuthorizationPolicy's `<name>.<namespace>`, or `default`): inbound requests
/// authorized.
pub const AUTHORIZATIONS: &str = "wary_proxy_inbound_authorizations_total";

/// Counter, by `reason` (`endpoint_removed`): app connections the outbound listener
/// closed gracefully (HTTP/1 `Connection: close`, HTTP/2 GOAWAY) because where they
/// were going is gone, so the app reconnects.
pub const CLIENT_CONNECTIONS_CLOSED: &str = "wary_proxy_client_connections_closed_total";

/// Counter, by `decision` (`served`, `refused`): plaintext connections on the inbound
/// listener where some port is `permissive` (elsewhere plaintext fails the TLS
/// handshake, counted in `wary_proxy_tls_handshake_failures_total{reason="not_tls"}`).
pub const INBOUND_PLAINTEXT: &str = "wary_proxy_inbound_plaintext_connections_total";

/// Counter: requests from peer proxies the app never processed (its HTTP/2 server
/// refused the stream or sent a GOAWAY below it), answered with RST_STREAM
/// (REFUSED_STREAM) so the peer may send them again.
pub const INBOUND_REFUSED_STREAMS: &str = "wary_proxy_inbound_refused_streams_total";
/// HTTP/1 connections whose header-name case stopped being kept part-way, by `reason`:
/// `mismatch`, `unreadable`, `too_large`, `queue_full` (see [`crate::header_case`]).
pub const HEADER_CASE_LOST: &str = "wary_proxy_header_case_lost_total";

/// Registers the help text and unit of every metric (Prometheus `# HELP` lines).
pub fn describe() {
    use metrics::describe_histogram;
    describe_gauge!(
        DISCOVERY_CONNECTED,
        Unit::Count,
        "1 while the discovery stream to the control plane is up."
    );
    describe_counter!(
        DISCOVERY_RECONNECTS,
        Unit::Count,
        "Discovery sessions that ended and were retried with backoff."
    );
    describe_counter!(
        DISCOVERY_UPDATES,
        Unit::Count,
        "Discovery responses by resource type and result (ack, nack)."
    );
    describe_gauge!(
        DISCOVERY_VERSION,
        Unit::Count,
        "The configuration version in force by type, as a number (first 52 bits of its hash)."
    );
    describe_gauge!(
        PEER_CONNECTIONS,
        Unit::Count,
        "Pooled HTTP/2 connections to peer proxies."
    );
    describe_gauge!(
        CERT_EXPIRY,
        Unit::Seconds,
        "The workload certificate's notAfter, Unix seconds."
    );
    describe_counter!(
        CERT_RENEWALS,
        Unit::Count,
        "Certificate requests (first and renewals) by result."
    );
    describe_counter!(
        TLS_HANDSHAKE_FAILURES,
        Unit::Count,
        "TLS handshakes that failed, by direction and reason."
    );
    describe_counter!(
        TLS_HANDSHAKES,
        Unit::Count,
        "TLS handshakes that succeeded, by direction."
    );
    describe_counter!(REQUESTS, Unit::Count, "Requests proxied, by direction and service.");
    describe_counter!(
        RETRIES,
        Unit::Count,
        "Retries by service and result (sent, budget_exhausted, not_retryable)."
    );
    describe_counter!(
        OVERFLOWS,
        Unit::Count,
        "Requests refused at once by a service's bulkhead."
    );
    describe_counter!(
        RESPONSES,
        Unit::Count,
        "Responses returned to the client after any retries, by direction, service, status class (and client inbound)."
    );
    describe_histogram!(
        RESPONSE_LATENCY,
        Unit::Seconds,
        "Time from request to response headers, retries included, seconds."
    );
    describe_counter!(
        TCP_STREAMS,
        Unit::Count,
        "Opaque streams carried (CONNECT, transparent TCP, upgrades)."
    );
    describe_counter!(TCP_BYTES, Unit::Bytes, "Bytes carried in opaque streams, by flow.");
    describe_counter!(
        CLIENT_CONNECTIONS_CLOSED,
        Unit::Count,
        "App connections closed gracefully because the endpoint they were going to left, by reason."
    );
    describe_counter!(
        INBOUND_PLAINTEXT,
        Unit::Count,
        "Plaintext inbound connections in permissive mTLS mode, by decision (served, refused)."
    );
    describe_counter!(
        INBOUND_REFUSED_STREAMS,
        Unit::Count,
        "Requests the app never processed, refused to the peer proxy so it may send them again."
    );
    describe_counter!(
        HEADER_CASE_LOST,
        Unit::Count,
        "HTTP/1 connections whose header names went out in lower case from some point on, by reason."
    );
    describe_counter!(
        AUTHORIZATIONS,
        Unit::Count,
        "Inbound requests authorized, by decision and deciding policy."
    );
    describe_counter!(
        crate::access::DROPPED,
        Unit::Count,
        "Access log lines dropped because the writer fell behind."
    );
}

/// The quantiles of each endpoint's response-time summary: p50, p90, p99.
pub const ENDPOINT_QUANTILES: [f64; 3] = [0.5, 0.9, 0.99];

/// The rolling window of each endpoint's response-time summary: three buckets of 20 s,
/// about the last minute (the same as every other summary of the proxy).
const SUMMARY_BUCKET: Duration = Duration::from_secs(20);

/// One endpoint's counters and response-time summary, kept by its balancer and rendered
/// by [`render_endpoints`]. Counting costs an atomic add; a response time is pushed
/// lock-free and folded into the summary when `/metrics` is rendered or every 5 s.
pub struct EndpointStats {
    /// Requests sent to the endpoint.
    pub requests: AtomicU64,
    /// Attempts it answered without failing.
    pub successes: AtomicU64,
    /// Attempts it failed (5xx, connect failure, reset, timeout).
    pub failures: AtomicU64,
    /// Times it was ejected after consecutive failures.
    pub ejections: AtomicU64,
    latency: metrics_util::storage::AtomicBucket<f64>,
    summary: Mutex<Distribution>,
}

impl Default for EndpointStats {
    fn default() -> Self {
        let quantiles = ENDPOINT_QUANTILES.map(metrics_util::Quantile::new).to_vec();
        let buckets = std::num::NonZeroU32::new(3).unwrap_or(std::num::NonZeroU32::MIN);
        Self {
            requests: AtomicU64::new(0),
            successes: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            ejections: AtomicU64::new(0),
            latency: metrics_util::storage::AtomicBucket::new(),
            summary: Mutex::new(Distribution::new_summary(Arc::new(quantiles), SUMMARY_BUCKET, buckets)),
        }
    }
}

impl EndpointStats {
    /// Records one time to first byte, seconds.
    pub fn record_latency(&self, seconds: f64) {
        self.latency.push(seconds);
    }

    /// Folds the pushed response times into the rolling summary, so they never pile up.
    pub fn drain(&self) {
        let now = quanta::Instant::now();
        let mut summary = self.summary.lock().unwrap_or_else(|e| e.into_inner());
        self.latency.clear_with(|samples| {
            let timed: Vec<(f64, quanta::Instant)> = samples.iter().map(|s| (*s, now)).collect();
            summary.record_samples(&timed);
        });
    }

    /// The summary now: the value at each of [`ENDPOINT_QUANTILES`], the sum and count.
    fn summary(&self) -> ([f64; 3], f64, u64) {
        self.drain();
        let summary = self.summary.lock().unwrap_or_else(|e| e.into_inner());
        match &*summary {
            Distribution::Summary(rolling, _, sum) => {
                let snapshot = rolling.snapshot(quanta::Instant::now());
                let values = ENDPOINT_QUANTILES.map(|q| snapshot.quantile(q).unwrap_or(0.0));
                (values, *sum, rolling.count() as u64)
            }
            _ => ([0.0; 3], 0.0, 0),
        }
    }
}

/// One live endpoint, as [`render_endpoints`] shows it.
pub struct EndpointRow<'a> {
    /// Its service, `<name>.<namespace>`.
    pub service: &'a str,
    /// Its app address.
    pub endpoint: SocketAddr,
    /// Its Peak-EWMA RTT estimate, s.
    pub ewma: f64,
    /// Requests in flight to it.
    pub in_flight: u32,
    /// Out of rotation (ejected, on probation or probed).
    pub ejected: bool,
    /// Its counters and summary.
    pub stats: &'a EndpointStats,
}

/// Appends the `wary_proxy_endpoint_*` families of `rows` to a Prometheus text page
/// (format 0.0.4), with their `# HELP` and `# TYPE` lines; nothing when there are none.
pub fn render_endpoints(rows: &[EndpointRow<'_>], out: &mut String) {
    if rows.is_empty() {
        return;
    }
    let labels: Vec<String> = rows
        .iter()
        .map(|r| format!("service=\"{}\",endpoint=\"{}\"", escape(r.service), r.endpoint))
        .collect();
    let mut family = |name: &str, kind: &str, help: &str, value: &dyn Fn(&EndpointRow<'_>) -> f64| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (row, labels) in rows.iter().zip(&labels) {
            let _ = writeln!(out, "{name}{{{labels}}} {}", value(row));
        }
        out.push('\n');
    };
    let count = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
    family(
        ENDPOINT_EWMA,
        "gauge",
        "Peak-EWMA RTT estimate of each endpoint, seconds.",
        &|r| r.ewma,
    );
    family(
        ENDPOINT_IN_FLIGHT,
        "gauge",
        "Requests in flight to each endpoint.",
        &|r| f64::from(r.in_flight),
    );
    family(ENDPOINT_REQUESTS, "counter", "Requests sent to each endpoint.", &|r| {
        count(&r.stats.requests)
    });
    family(
        ENDPOINT_EJECTED,
        "gauge",
        "1 while outlier detection holds the endpoint out.",
        &|r| {
            if r.ejected { 1.0 } else { 0.0 }
        },
    );
    family(
        ENDPOINT_EJECTIONS,
        "counter",
        "Ejections of each endpoint after consecutive failures.",
        &|r| count(&r.stats.ejections),
    );
    let _ = writeln!(
        out,
        "# HELP {ENDPOINT_RESPONSES} Attempts answered by each endpoint, by outcome (success, failure).\n# TYPE \
         {ENDPOINT_RESPONSES} counter"
    );
    for (row, labels) in rows.iter().zip(&labels) {
        for (outcome, n) in [("success", &row.stats.successes), ("failure", &row.stats.failures)] {
            let _ = writeln!(
                out,
                "{ENDPOINT_RESPONSES}{{{labels},outcome=\"{outcome}\"}} {}",
                count(n)
            );
        }
    }
    out.push('\n');
    let _ = writeln!(
        out,
        "# HELP {ENDPOINT_LATENCY} Time to each endpoint's first response byte, seconds (rolling-minute \
         quantiles).\n# TYPE {ENDPOINT_LATENCY} summary"
    );
    for (row, labels) in rows.iter().zip(&labels) {
        let (values, sum, n) = row.stats.summary();
        for (q, v) in ENDPOINT_QUANTILES.iter().zip(values) {
            let _ = writeln!(out, "{ENDPOINT_LATENCY}{{{labels},quantile=\"{q}\"}} {v}");
        }
        let _ = writeln!(
            out,
            "{ENDPOINT_LATENCY}_sum{{{labels}}} {sum}\n{ENDPOINT_LATENCY}_count{{{labels}}} {n}"
        );
    }
    out.push('\n');
}

/// A label value as the Prometheus text format writes it.
fn escape(value: &str) -> std::borrow::Cow<'_, str> {
    if !value.contains(['\\', '"', '\n']) {
        return std::borrow::Cow::Borrowed(value);
    }
    std::borrow::Cow::Owned(value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_series_are_rendered_from_the_live_rows_only() {
        let stats = EndpointStats::default();
        stats.requests.fetch_add(3, Ordering::Relaxed);
        stats.successes.fetch_add(2, Ordering::Relaxed);
        stats.record_latency(0.004);
        let row = EndpointRow {
            service: "b.default",
            endpoint: "127.0.0.1:9090".parse().unwrap(),
            ewma: 0.002,
            in_flight: 1,
            ejected: false,
            stats: &stats,
        };
        let mut page = String::new();
        render_endpoints(&[row], &mut page);
        let l = "service=\"b.default\",endpoint=\"127.0.0.1:9090\"";
        for line in [
            format!("wary_proxy_endpoint_requests_total{{{l}}} 3"),
            format!("wary_proxy_endpoint_responses_total{{{l},outcome=\"success\"}} 2"),
            format!("wary_proxy_endpoint_responses_total{{{l},outcome=\"failure\"}} 0"),
            format!("wary_proxy_endpoint_in_flight{{{l}}} 1"),
            // The summary's sketch is accurate to about 1 %.
            format!("wary_proxy_endpoint_response_latency_seconds{{{l},quantile=\"0.99\"}} 0.00399"),
            format!("wary_proxy_endpoint_response_latency_seconds_count{{{l}}} 1"),
            "# TYPE wary_proxy_endpoint_response_latency_seconds summary".to_string(),
        ] {
            assert!(page.contains(&line), "{line} in\n{page}");
        }
        let mut empty = String::new();
        render_endpoints(&[], &mut empty);
        assert!(empty.is_empty());
        assert_eq!(escape("a\"b"), "a\\\"b");
    }
}
