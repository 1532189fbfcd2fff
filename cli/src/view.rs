//! The live view: every second, each proxy's `/metrics`, summed per service and
//! endpoint into one table of what the clients saw.
//!
//! | column | from |
//! |---|---|
//! | RPS, SHARE | `wary_proxy_endpoint_requests_total`, per second; share of the service |
//! | SUCCESS | `wary_proxy_endpoint_responses_total` by `outcome` |
//! | P50, P99 | `wary_proxy_endpoint_response_latency_seconds` (rolling minute) |
//! | EWMA | `wary_proxy_endpoint_ewma_seconds`, the balancer's estimate |
//! | BREAKER | `wary_proxy_endpoint_ejected`: `closed`, or `OPEN` while ejected |
//! | EJECTIONS | `wary_proxy_endpoint_ejections_total` |
//! | RETRIES/S | `wary_proxy_retries_total{result="sent"}`, per service |

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Instant;

/// One sample: its metric name, labels and value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The metric's name.
    pub name: String,
    /// Its labels, in order.
    pub labels: Vec<(String, String)>,
    /// Its value.
    pub value: f64,
}

impl Sample {
    /// The value of `label`, or "".
    pub fn label(&self, label: &str) -> &str {
        self.labels
            .iter()
            .find(|(k, _)| k == label)
            .map_or("", |(_, v)| v.as_str())
    }
}

/// Parses the Prometheus text format's sample lines (comments skipped).
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let value = value.parse().ok()?;
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            let labels = labels
                .split("\",")
                .filter(|kv| !kv.is_empty())
                .filter_map(|kv| {
                    let (k, v) = kv.split_once("=\"")?;
                    Some((k.to_string(), v.trim_end_matches('"').to_string()))
                })
                .collect();
            Some(Sample {
                name: name.to_string(),
                labels,
                value,
            })
        })
        .collect()
}

/// The view's numbers for one endpoint.
#[derive(Debug, Default, Clone)]
struct Row {
    requests: f64,
    successes: f64,
    failures: f64,
    p50: f64,
    p99: f64,
    ewma: f64,
    ejected: bool,
    ejections: f64,
}

/// What one refresh saw, summed over every proxy.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    rows: BTreeMap<(String, String), Row>,
    retries: BTreeMap<String, f64>,
}

impl Snapshot {
    /// Sums the samples of every proxy's metrics page.
    pub fn from_pages(pages: &[String]) -> Self {
        let mut s = Snapshot::default();
        for page in pages {
            for sample in parse(page) {
                let service = sample.label("service").to_string();
                if sample.name == "wary_proxy_retries_total" && sample.label("result") == "sent" {
                    *s.retries.entry(service).or_default() += sample.value;
                    continue;
                }
                let endpoint = sample.label("endpoint").to_string();
                if endpoint.is_empty() {
                    continue;
                }
                let row = s.rows.entry((service, endpoint)).or_default();
                match (sample.name.as_str(), sample.label("outcome"), sample.label("quantile")) {
                    ("wary_proxy_endpoint_requests_total", _, _) => row.requests += sample.value,
                    ("wary_proxy_endpoint_responses_total", "success", _) => row.successes += sample.value,
                    ("wary_proxy_endpoint_responses_total", "failure", _) => row.failures += sample.value,
                    ("wary_proxy_endpoint_response_latency_seconds", _, "0.5") => row.p50 = row.p50.max(sample.value),
                    ("wary_proxy_endpoint_response_latency_seconds", _, "0.99") => row.p99 = row.p99.max(sample.value),
                    ("wary_proxy_endpoint_ewma_seconds", _, _) => row.ewma = row.ewma.max(sample.value),
                    ("wary_proxy_endpoint_ejected", _, _) => row.ejected |= sample.value > 0.0,
                    ("wary_proxy_endpoint_ejections_total", _, _) => row.ejections += sample.value,
                    _ => {}
                }
            }
        }
        s
    }
}

/// Renders the table: rates from the difference between `then` and `now`, `seconds`
/// apart.
pub fn render(then: &Snapshot, now: &Snapshot, seconds: f64, header: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{header}");
    let _ = writeln!(
        out,
        "{:<18} {:<20} {:>7} {:>6} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9}",
        "SERVICE", "ENDPOINT", "RPS", "SHARE", "SUCCESS", "P50", "P99", "EWMA", "BREAKER", "EJECTIONS", "RETRIES/S"
    );
    let rate = |now: f64, then: f64| ((now - then) / seconds).max(0.0);
    let ms = |s: f64| format!("{:.1}ms", s * 1e3);
    let mut totals: BTreeMap<&str, f64> = BTreeMap::new();
    for ((service, endpoint), row) in &now.rows {
        let before = then
            .rows
            .get(&(service.clone(), endpoint.clone()))
            .cloned()
            .unwrap_or_default();
        *totals.entry(service.as_str()).or_default() += rate(row.requests, before.requests);
    }
    for ((service, endpoint), row) in &now.rows {
        let before = then
            .rows
            .get(&(service.clone(), endpoint.clone()))
            .cloned()
            .unwrap_or_default();
        let rps = rate(row.requests, before.requests);
        let total = totals.get(service.as_str()).copied().unwrap_or_default();
        let share = if total > 0.0 { rps / total * 100.0 } else { 0.0 };
        let (ok, failed) = (row.successes - before.successes, row.failures - before.failures);
        let success = if ok + failed > 0.0 {
            format!("{:.1}%", ok / (ok + failed) * 100.0)
        } else {
            "-".to_string()
        };
        let retries = rate(
            now.retries.get(service).copied().unwrap_or_default(),
            then.retries.get(service).copied().unwrap_or_default(),
        );
        let _ = writeln!(
            out,
            "{:<18} {:<20} {:>7.1} {:>5.0}% {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9.1}",
            service,
            endpoint,
            rps,
            share,
            success,
            ms(row.p50),
            ms(row.p99),
            ms(row.ewma),
            if row.ejected { "OPEN" } else { "closed" },
            row.ejections,
            retries
        );
    }
    if now.rows.is_empty() {
        let _ = writeln!(out, "(no traffic between services yet)");
    }
    out
}

/// Fetches a page over plain HTTP within 2 s: its body when it answers 2xx (or any
/// status, unless `success`); `None` otherwise.
pub async fn fetch(url: &str, success: bool) -> Option<String> {
    tokio::time::timeout(std::time::Duration::from_secs(2), fetch_now(url, success))
        .await
        .ok()
        .flatten()
}

async fn fetch_now(url: &str, success: bool) -> Option<String> {
    let uri: http::Uri = url.parse().ok()?;
    let authority = uri.authority()?.clone();
    let tcp = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        tokio::net::TcpStream::connect(authority.as_str()),
    )
    .await
    .ok()?
    .ok()?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .ok()?;
    tokio::spawn(conn);
    let req = http::Request::get(uri.path())
        .header(http::header::HOST, authority.as_str())
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .ok()?;
    let response = tokio::time::timeout(std::time::Duration::from_secs(2), sender.send_request(req))
        .await
        .ok()?
        .ok()?;
    let status = response.status();
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .ok()?
        .to_bytes();
    (status.is_success() || !success).then(|| String::from_utf8_lossy(&body).into_owned())
}

/// The configuration's state from the control plane's `/config` (JSON with `errors`):
/// `configuration ok`, or the first error and where to see them all.
pub fn config_line(config: &str, url: &str) -> String {
    let status: serde_json::Value = serde_json::from_str(config).unwrap_or_default();
    let errors = status["errors"].as_array().cloned().unwrap_or_default();
    match errors.first().and_then(|e| e.as_str()) {
        None => "configuration ok".to_string(),
        Some(first) => format!(
            "CONFIGURATION ERRORS ({}, last good kept): {first} (all: {url})",
            errors.len()
        ),
    }
}

/// When a refresh started, for rates.
pub fn now() -> Instant {
    Instant::now()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_summed_into_rows_and_rendered_with_rates() {
        let page = |n: u32, ejected: u8| {
            format!(
                "# TYPE x counter\n\
                 wary_proxy_endpoint_requests_total{{service=\"b.default\",endpoint=\"127.0.1.11:9090\"}} {n}\n\
                 wary_proxy_endpoint_responses_total{{service=\"b.default\",endpoint=\"127.0.1.11:9090\",outcome=\"success\"}} {n}\n\
                 wary_proxy_endpoint_response_latency_seconds{{service=\"b.default\",endpoint=\"127.0.1.11:9090\",quantile=\"0.99\"}} 0.004\n\
                 wary_proxy_endpoint_ejected{{service=\"b.default\",endpoint=\"127.0.1.11:9090\"}} {ejected}\n\
                 wary_proxy_retries_total{{service=\"b.default\",result=\"sent\"}} {n}\n"
            )
        };
        let then = Snapshot::from_pages(&[page(10, 0)]);
        let now = Snapshot::from_pages(&[page(30, 1)]);
        let table = render(&then, &now, 2.0, "header");
        let row = table.lines().nth(2).unwrap();
        assert!(row.contains("b.default") && row.contains("127.0.1.11:9090"), "{table}");
        assert!(
            row.contains(" 10.0 ") && row.contains("100%") && row.contains("100.0%"),
            "{table}"
        );
        assert!(row.contains("4.0ms") && row.contains("OPEN"), "{table}");
        assert_eq!(config_line(r#"{"errors":[]}"#, "u"), "configuration ok");
        let bad = config_line(r#"{"errors":["a.yaml:3: bad","b.yaml:1: worse"]}"#, "u");
        assert!(bad.contains("(2, last good kept): a.yaml:3: bad (all: u)"), "{bad}");
    }
}
