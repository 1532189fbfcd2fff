//! Access logs and trace context.
//!
//! * **Access logs** (`--access-log json`, off by default): one JSON object a line on
//!   stdout per request the proxy sends on, written by a task of its own from a
//!   bounded queue of [`QUEUE`] lines; when the queue is full a line is dropped and
//!   counted (`wary_proxy_access_log_dropped_total`), so logging never slows traffic.
//! * **Trace context** (`--tracing`, off by default): the W3C `traceparent` header
//!   (Trace Context Level 1) is continued, or started when absent, with a new span id
//!   for the proxy's hop, which the access log records. Off, the header passes
//!   untouched like any other.

use std::sync::Arc;

use http::{HeaderMap, HeaderValue};
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

/// Lines waiting to be written, at most: 4096.
pub const QUEUE: usize = 4096;

/// Counter: access log lines dropped because the writer fell behind.
pub const DROPPED: &str = "wary_proxy_access_log_dropped_total";

/// One request, as the access log records it.
#[derive(Debug, Serialize)]
pub struct Entry<'a> {
    /// RFC 3339, UTC.
    pub time: String,
    /// `outbound` or `inbound`.
    pub direction: &'static str,
    /// The destination service (outbound) or this workload (inbound).
    pub service: &'a str,
    /// The caller's SPIFFE ID (inbound).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client: Option<&'a str>,
    /// The request's method.
    pub method: &'a str,
    /// Its authority (`Host`).
    pub authority: &'a str,
    /// Its path, without the query.
    pub path: &'a str,
    /// The status returned.
    pub status: u16,
    /// Attempts (retries + 1), outbound.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    /// Time to the response headers, ms.
    pub duration_ms: f64,
    /// The `wary-error` cause, when the proxy answered itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'a str>,
    /// The trace id, when tracing is on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<&'a str>,
    /// The proxy's span id for this hop, when tracing is on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub span_id: Option<&'a str>,
}

/// The access log writer.
#[derive(Debug)]
pub struct AccessLog {
    lines: mpsc::Sender<String>,
    dropped: metrics::Counter,
}

impl AccessLog {
    /// Starts the writer task (stdout).
    pub fn start() -> Arc<Self> {
        let (lines, mut rx) = mpsc::channel::<String>(QUEUE);
        tokio::spawn(async move {
            let mut out = tokio::io::BufWriter::new(tokio::io::stdout());
            while let Some(line) = rx.recv().await {
                let _ = out.write_all(line.as_bytes()).await;
                // Flush when the queue is empty, so lines appear promptly at low rates
                // and in batches at high ones.
                if rx.is_empty() {
                    let _ = out.flush().await;
                }
            }
        });
        Arc::new(Self {
            lines,
            dropped: metrics::counter!(DROPPED),
        })
    }

    /// Queues `entry`, or drops and counts it when the writer is behind.
    pub fn record(&self, entry: &Entry<'_>) {
        let Ok(mut line) = serde_json::to_string(entry) else {
            return;
        };
        line.push('\n');
        if self.lines.try_send(line).is_err() {
            self.dropped.increment(1);
        }
    }
}

/// Now, RFC 3339 in UTC.
pub fn now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// A hop's trace context: the trace it belongs to and the proxy's span in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hop {
    /// 32 lowercase hex digits.
    pub trace_id: String,
    /// 16 lowercase hex digits: this hop's span.
    pub span_id: String,
}

/// Continues the request's `traceparent` (or starts a trace when it has none or an
/// invalid one) with a new span for this hop, and sets the header to it.
pub fn continue_trace(headers: &mut HeaderMap) -> Hop {
    let incoming = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_traceparent);
    let (trace_id, flags) = incoming.unwrap_or_else(|| (hex(&rand::random::<[u8; 16]>()), "01".to_string()));
    let span_id = hex(&rand::random::<[u8; 8]>());
    if let Ok(v) = HeaderValue::from_str(&format!("00-{trace_id}-{span_id}-{flags}")) {
        headers.insert("traceparent", v);
    }
    Hop { trace_id, span_id }
}

/// The trace id and flags of a version-00 `traceparent`, if it is valid (all-zero ids
/// are not).
fn parse_traceparent(v: &str) -> Option<(String, String)> {
    let mut parts = v.trim().split('-');
    let (version, trace, parent, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let lower_hex =
        |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    let valid = version == "00"
        && parts.next().is_none()
        && lower_hex(trace, 32)
        && lower_hex(parent, 16)
        && lower_hex(flags, 2)
        && trace.bytes().any(|b| b != b'0')
        && parent.bytes().any(|b| b != b'0');
    valid.then(|| (trace.to_string(), flags.to_string()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trace_is_continued_with_a_new_span_or_started() {
        let mut h = HeaderMap::new();
        h.insert(
            "traceparent",
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        let hop = continue_trace(&mut h);
        assert_eq!(hop.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(hop.span_id, "00f067aa0ba902b7");
        assert_eq!(
            h["traceparent"],
            format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{}-01", hop.span_id).as_str()
        );
        let mut bad = HeaderMap::new();
        bad.insert("traceparent", HeaderValue::from_static("00-0000-zz-01"));
        let started = continue_trace(&mut bad);
        assert_eq!(started.trace_id.len(), 32);
        assert!(parse_traceparent(bad["traceparent"].to_str().unwrap()).is_some());
    }
}
