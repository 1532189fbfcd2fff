//! Observability with real processes: both `/metrics` pages pass `promtool check
//! metrics`; a real Prometheus scrapes a running mesh and answers PromQL for request
//! rate and p99 latency per service; hostile traffic cannot grow the series count;
//! `/config_dump` shows what was pushed and no key; access logs carry the trace
//! context; `POST /shutdown` stops a proxy.
//!
//! Networks: 127.0.60.x, 127.0.61.x... (`.1` the client `web-1`, `.2` `backend-1`).

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;
use wary_tests::{App, ControlPlane, DEADLINE, MeshDir, Proxy, ProxyConnector, load, service, wait_until, workload_as};

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

struct Pair {
    mesh: MeshDir,
    cp: ControlPlane,
    web: Proxy,
    backend: Proxy,
    _app: App,
}

async fn pair(net: &str, env: &[(&str, &str)]) -> Pair {
    let mesh = MeshDir::new();
    mesh.write("service.yaml", &service("backend", 9090));
    mesh.write(
        "web.yaml",
        &workload_as("web-1", "web", "web", &format!("{net}.1"), 8080),
    );
    mesh.write(
        "backend.yaml",
        &workload_as("backend-1", "backend", "backend", &format!("{net}.2"), 9090),
    );
    let cp = ControlPlane::start(&mesh).await;
    let app = App::start(addr(&format!("{net}.2:9090")), "backend-1").await;
    let web = Proxy::start_with(&cp, "web-1", addr(&format!("{net}.1:4143")), addr("127.0.0.1:0"), env).await;
    let backend = Proxy::start_at(&cp, "backend-1", addr(&format!("{net}.2:4143"))).await;
    web.wait_ready().await;
    backend.wait_ready().await;
    Pair {
        mesh,
        cp,
        web,
        backend,
        _app: app,
    }
}

/// Runs `promtool check metrics` on a page; its complaints, if any.
async fn promtool(page: &str) -> Option<String> {
    use tokio::io::AsyncWriteExt;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool (apt install prometheus)");
    child.stdin.take().unwrap().write_all(page.as_bytes()).await.unwrap();
    let out = child.wait_with_output().await.unwrap();
    (!out.status.success()).then(|| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// The samples (not comments) on a metrics page.
fn series(page: &str) -> usize {
    page.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_the_mesh_and_answers_rate_and_p99_per_service() {
    let net = "127.0.60";
    let p = pair(net, &[]).await;
    let traffic = tokio::spawn(load(
        p.web.outbound,
        "http://backend.default:9090/",
        50,
        Duration::from_secs(15),
    ));
    wait_until("traffic is counted", || async {
        let page = p.web.admin_get("/metrics").await;
        page.contains("wary_proxy_response_latency_seconds_bucket")
            .then_some(())
    })
    .await;
    // Both kinds of page pass Prometheus's own linter.
    for (what, page) in [
        ("client proxy", p.web.admin_get("/metrics").await),
        ("server proxy", p.backend.admin_get("/metrics").await),
        ("control plane", p.cp.admin_get("/metrics").await),
    ] {
        assert_eq!(promtool(&page).await, None, "{what}: {page}");
    }

    let dir = tempfile::tempdir().unwrap();
    let targets: Vec<String> = [p.web.admin, p.backend.admin]
        .iter()
        .map(|a| format!("'{a}'"))
        .collect();
    std::fs::write(
        dir.path().join("prometheus.yml"),
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
             scrape_configs:\n\
             - job_name: wary\n  static_configs: [{{targets: [{}]}}]\n",
            targets.join(", ")
        ),
    )
    .unwrap();
    let listen = format!("{net}.9:9090");
    let _prometheus = Command::new("prometheus")
        .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
        .arg(format!("--web.listen-address={listen}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start prometheus (apt install prometheus)");
    let query = |q: &'static str| {
        let listen = listen.clone();
        async move {
            let out = Command::new("curl")
                .args(["-sS", "--max-time", "5", "-G", &format!("http://{listen}/api/v1/query")])
                .args(["--data-urlencode", &format!("query={q}")])
                .output()
                .await
                .ok()?;
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            let result = v["data"]["result"].as_array()?.clone();
            // Until two scrapes have seen traffic, rates are 0 and quantiles NaN.
            let value: f64 = result.first()?["value"][1].as_str()?.parse().ok()?;
            (value.is_finite() && value > 0.0).then_some(result)
        }
    };
    let rate = wait_until("Prometheus has a request rate per service", || {
        query("sum by (service) (rate(wary_proxy_requests_total{direction=\"outbound\"}[5s]))")
    })
    .await;
    assert_eq!(rate[0]["metric"]["service"], "backend.default", "{rate:?}");
    let p99 = wait_until("Prometheus has a p99 per service", || {
        query(
            "histogram_quantile(0.99, sum by (le, service) \
             (rate(wary_proxy_response_latency_seconds_bucket{direction=\"outbound\"}[5s])))",
        )
    })
    .await;
    let seconds: f64 = p99[0]["value"][1].as_str().unwrap().parse().unwrap();
    assert!(seconds > 0.0 && seconds < 10.0, "{p99:?}");
    eprintln!("rate {:?}, p99 {seconds} s", rate[0]["value"]);

    // The dashboard in the chart works against these names: every query is valid
    // PromQL, and every metric it reads is in the catalog.
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../charts/wary/dashboards/wary-mesh.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let catalog = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let out = Command::new("curl")
                .args(["-sS", "--max-time", "5", "-G", &format!("http://{listen}/api/v1/query")])
                .args(["--data-urlencode", &format!("query={expr}")])
                .output()
                .await
                .unwrap();
            let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(answer["status"], "success", "{}: {expr}: {answer}", panel["title"]);
            for name in expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("wary_"))
            {
                // A counter appears once it has counted; the catalog lists them all.
                let base = name.trim_end_matches("_bucket");
                assert!(
                    catalog.contains(&format!("`{base}`")),
                    "{}: {name} is not in the README's metric catalog",
                    panel["title"]
                );
            }
        }
    }
    let report = traffic.await.unwrap();
    assert_eq!(report.failed, 0, "{report:?}");
    let _ = &p.mesh;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_odd_requests_leave_the_series_count_bounded() {
    let net = "127.0.61";
    let p = pair(net, &[]).await;
    let client: hyper_util::client::legacy::Client<_, http_body_util::Empty<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(ProxyConnector(p.web.outbound));
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..10_000u32 {
        if calls.len() >= 50 {
            calls.join_next().await;
        }
        let client = client.clone();
        // Half to hosts outside the mesh (closed ports on this machine's loopback:
        // refused at once), half to the mesh service; every path different.
        let host = if i % 2 == 0 {
            format!("127.0.61.{}:{}", 100 + i % 100, 20_000 + i)
        } else {
            "backend.default:9090".to_string()
        };
        calls.spawn(async move {
            let uri: hyper::Uri = format!("http://{host}/item/{i}/{}", rand_path(i)).parse().unwrap();
            let _ = tokio::time::timeout(Duration::from_secs(10), client.get(uri)).await;
        });
    }
    while calls.join_next().await.is_some() {}
    let (web, backend) = (p.web.admin_get("/metrics").await, p.backend.admin_get("/metrics").await);
    let total = series(&web) + series(&backend);
    eprintln!("series after 10,000 requests: {total}");
    assert!(total < 500, "{total} series:\n{web}\n{backend}");
    assert!(
        web.contains("wary_proxy_requests_total{direction=\"outbound\",service=\"passthrough\"} 5000"),
        "{web}"
    );
    let _ = (&p.mesh, &p.cp);
}

fn rand_path(i: u32) -> String {
    format!("{:x}", i.wrapping_mul(2_654_435_761))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_dump_access_logs_trace_context_and_shutdown() {
    let net = "127.0.62";
    let mut p = pair(net, &[("WARY_ACCESS_LOG", "json"), ("WARY_TRACING", "true")]).await;
    // What the control plane pushed, and no key.
    let dump = p.web.admin_get("/config_dump").await;
    assert!(
        dump.contains("backend.default") && dump.contains(&format!("{net}.2:9090")),
        "{dump}"
    );
    assert!(dump.contains("web-1.default"), "the inbound policy: {dump}");
    assert!(!dump.contains("PRIVATE KEY"), "{dump}");

    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let (status, _) = wary_tests::curl_via(
        p.web.outbound,
        "http://backend.default:9090/traced",
        &["-H", &format!("traceparent: 00-{trace}-00f067aa0ba902b7-01")],
    )
    .await;
    assert_eq!(status, 200);
    let line = p.web.stdout.wait_for(&["\"path\":\"/traced\""]).await;
    let entry: serde_json::Value = serde_json::from_str(&line).expect("a JSON access log line");
    assert_eq!(entry["direction"], "outbound");
    assert_eq!(entry["service"], "backend.default");
    assert_eq!(entry["status"], 200);
    assert_eq!(entry["attempts"], 1);
    assert_eq!(entry["trace_id"], trace);
    assert_eq!(entry["span_id"].as_str().map(str::len), Some(16));

    // POST /shutdown from loopback: the proxy drains and exits.
    let out = Command::new("curl")
        .args(["-sS", "-X", "POST", &format!("http://{}/shutdown", p.web.admin)])
        .output()
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("shutting down"));
    let exit = tokio::time::timeout(DEADLINE, p.web.wait_exit()).await.expect("exits");
    assert!(exit.success(), "{exit:?}");
    let _ = (&p.mesh, &p.backend);
}
