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
    describe_gauge!(
        ENDPOINT_EWMA,
        Unit::Seconds,
        "Peak-EWMA RTT estimate of each endpoint, seconds."
    );
    describe_gauge!(ENDPOINT_IN_FLIGHT, Unit::Count, "Requests in flight to each endpoint.");
    describe_counter!(ENDPOINT_REQUESTS, Unit::Count, "Requests sent to each endpoint.");
    describe_counter!(
        ENDPOINT_RESPONSES,
        Unit::Count,
        "Attempts answered by each endpoint, by outcome (success, failure)."
    );
    describe_histogram!(
        ENDPOINT_LATENCY,
        Unit::Seconds,
        "Time to each endpoint's first response byte, seconds (rolling-minute quantiles)."
    );
    describe_gauge!(
        ENDPOINT_EJECTED,
        Unit::Count,
        "1 while outlier detection holds the endpoint out."
    );
    describe_counter!(
        ENDPOINT_EJECTIONS,
        Unit::Count,
        "Ejections of each endpoint after consecutive failures."
    );
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
