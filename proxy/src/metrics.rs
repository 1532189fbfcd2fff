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
