//! The control plane's metrics: every name in one place, each with its help text.
//! Labels are bounded: `type` is one of `service`, `endpoints`, `inbound_policy`;
//! `result` is `ok` or `error`. Per-proxy detail is on the admin `/proxies` page, not in
//! labels, so the series count does not grow with the mesh.

use metrics::{Unit, describe_counter, describe_gauge};

/// Gauge: proxies with an open discovery stream.
pub const CONNECTED_PROXIES: &str = "wary_control_plane_connected_proxies";
/// Counter, by `type`: discovery responses sent.
pub const RESPONSES: &str = "wary_control_plane_discovery_responses_total";
/// Counter, by `type`: resources sent in discovery responses.
pub const RESOURCES_SENT: &str = "wary_control_plane_discovery_resources_sent_total";
/// Counter, by `type`: ACKs received.
pub const ACKS: &str = "wary_control_plane_discovery_acks_total";
/// Counter, by `type`: NACKs received.
pub const NACKS: &str = "wary_control_plane_discovery_nacks_total";
/// Counter, by `result`: reads of the configuration.
pub const CONFIG_RELOADS: &str = "wary_control_plane_config_reloads_total";
/// Gauge: problems found in the configuration by the latest read (0 when clean).
pub const CONFIG_ERRORS: &str = "wary_control_plane_config_errors";
/// Gauge: resources served, by `type`.
pub const RESOURCES: &str = "wary_control_plane_resources";

/// Counter, by `result` (`ok`, `denied`, `unauthenticated`, `error`): certificate
/// requests answered.
pub const CERTIFICATES_ISSUED: &str = "wary_control_plane_certificate_requests_total";

/// Counter, by `reason` (see `wary_certs::tls::HandshakeFailure`, plus `timeout`): TLS
/// handshakes refused on the control plane's port.
pub const TLS_HANDSHAKE_FAILURES: &str = "wary_control_plane_tls_handshake_failures_total";

/// Counter, by `reason` (`unauthenticated`, `permission_denied`, `invalid_argument`,
/// `resource_exhausted`, `unavailable`): discovery streams the control plane ended.
pub const STREAMS_REFUSED: &str = "wary_control_plane_discovery_streams_refused_total";

/// Summary, by `type`: from sending a discovery response to the proxy's ACK of it,
/// seconds (the push's round trip, the proxy's validation included).
pub const PUSH_SECONDS: &str = "wary_control_plane_push_seconds";

/// Counter, by `outcome` (`injected`, `skipped`, `refused`): pods the admission
/// webhook answered.
pub const INJECTIONS: &str = "wary_control_plane_injections_total";

/// Registers the help text and unit of every metric.
pub fn describe() {
    metrics::describe_histogram!(
        PUSH_SECONDS,
        Unit::Seconds,
        "From sending a discovery response to its ACK, by resource type, seconds."
    );
    describe_gauge!(CONNECTED_PROXIES, Unit::Count, "Proxies with an open discovery stream.");
    describe_counter!(RESPONSES, Unit::Count, "Discovery responses sent, by resource type.");
    describe_counter!(
        RESOURCES_SENT,
        Unit::Count,
        "Resources sent in discovery responses, by resource type."
    );
    describe_counter!(
        ACKS,
        Unit::Count,
        "Discovery responses acknowledged (ACK) by proxies, by resource type."
    );
    describe_counter!(
        NACKS,
        Unit::Count,
        "Discovery responses rejected (NACK) by proxies, by resource type; see /proxies for reasons."
    );
    describe_counter!(
        CONFIG_RELOADS,
        Unit::Count,
        "Reads of the configuration, by result (ok, error)."
    );
    describe_gauge!(
        CONFIG_ERRORS,
        Unit::Count,
        "Problems found by the latest read of the configuration; the last good state stays in force."
    );
    describe_gauge!(RESOURCES, Unit::Count, "Resources served, by resource type.");
    describe_counter!(
        TLS_HANDSHAKE_FAILURES,
        Unit::Count,
        "TLS handshakes refused on the control plane's port, by reason."
    );
    describe_counter!(
        STREAMS_REFUSED,
        Unit::Count,
        "Discovery streams refused or ended by the control plane, by reason (unauthenticated, permission_denied, ...)."
    );
    describe_counter!(
        CERTIFICATES_ISSUED,
        Unit::Count,
        "Certificate requests (Identity.Certify), by result: ok, denied, unauthenticated, error."
    );
    describe_counter!(
        INJECTIONS,
        Unit::Count,
        "Pods the admission webhook answered, by outcome: injected, skipped, refused."
    );
}
