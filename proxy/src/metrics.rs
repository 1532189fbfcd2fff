//! The proxy's metrics: every name in one place, each with its help text. Labels are
//! bounded: `type` is `service`, `endpoints` or `inbound_policy`; `result` is `ack` or
//! `nack`.

use metrics::{Unit, describe_counter, describe_gauge};

/// Gauge: 1 while the discovery stream is up, 0 otherwise.
pub const DISCOVERY_CONNECTED: &str = "wary_proxy_discovery_connected";
/// Counter: discovery sessions that ended (each is followed by a reconnect attempt).
pub const DISCOVERY_RECONNECTS: &str = "wary_proxy_discovery_reconnects_total";
/// Counter, by `type` and `result`: discovery responses applied (ACK) or rejected (NACK).
pub const DISCOVERY_UPDATES: &str = "wary_proxy_discovery_updates_total";

/// Gauge: the current workload certificate's notAfter, Unix seconds.
pub const CERT_EXPIRY: &str = "wary_proxy_identity_certificate_expiry_timestamp_seconds";
/// Counter, by `result` (`ok`, `error`): certificate requests (first and renewals).
pub const CERT_RENEWALS: &str = "wary_proxy_identity_certificate_requests_total";
/// Counter, by `direction` (`inbound`, `outbound`, `control_plane`) and `reason` (see
/// `wary_certs::tls::HandshakeFailure`): TLS handshakes that failed.
pub const TLS_HANDSHAKE_FAILURES: &str = "wary_proxy_tls_handshake_failures_total";
/// Counter, by `direction`: TLS handshakes that succeeded.
pub const TLS_HANDSHAKES: &str = "wary_proxy_tls_handshakes_total";

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
/// Counter, by `direction` and `service` and `code` (the status class, `2xx`...`5xx`):
/// responses returned to the client, after any retries.
pub const RESPONSES: &str = "wary_proxy_responses_total";

/// Counter, by `decision` (`allow`, `deny`) and `policy` (the deciding
/// AuthorizationPolicy's `<name>.<namespace>`, or `default`): inbound requests
/// authorized.
pub const AUTHORIZATIONS: &str = "wary_proxy_inbound_authorizations_total";

/// Registers the help text and unit of every metric.
pub fn describe() {
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
}
