//! Resilience with real processes: retries that stay safe and within their budget,
//! circuit breaking, bulkheads and deadlines, through a client proxy to up to three
//! backends, each with its own proxy.
//!
//! Every test has its own loopback network (127.0.40.x, 127.0.41.x...): `.1` is the
//! client workload `web-1`, `.2`–`.4` the backends `backend-1`–`backend-3`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::process::Command;
use wary_tests::upstream::Upstream;
use wary_tests::{App, ControlPlane, MeshDir, Proxy, ProxyConnector, load, wait_until};

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Service `backend` on port 9090 with `backends` workloads, the client `web-1`, and
/// `policy` (YAML for the TrafficPolicy's `spec`, after `targetRef`), if any.
fn config(net: &str, backends: u8, policy: &str) -> String {
    let mut yaml = String::from(
        "apiVersion: local.wary.io/v1alpha1
kind: Service
metadata: {name: backend}
spec:
  selector: {app: backend}
  ports: [{name: http, port: 9090, targetPort: http}]
",
    );
    for i in 1..=backends {
        yaml += &format!(
            "---
apiVersion: local.wary.io/v1alpha1
kind: Workload
metadata:
  name: backend-{i}
  labels: {{app: backend}}
spec:
  serviceAccount: backend
  address: {net}.{}
  ports: [{{name: http, port: 9090}}]
",
            i + 1
        );
    }
    yaml += &format!(
        "---
apiVersion: local.wary.io/v1alpha1
kind: Workload
metadata:
  name: web-1
  labels: {{app: web}}
spec:
  serviceAccount: web
  address: {net}.1
  ports: [{{name: http, port: 8080}}]
"
    );
    if !policy.is_empty() {
        yaml += &format!(
            "---
apiVersion: policy.wary.io/v1alpha1
kind: TrafficPolicy
metadata: {{name: backend}}
spec:
  targetRef: {{kind: Service, name: backend}}
{policy}"
        );
    }
    yaml
}

struct Mesh {
    _dir: MeshDir,
    _cp: ControlPlane,
    web: Proxy,
    backends: Vec<Proxy>,
}

async fn mesh(net: &str, backends: u8, policy: &str) -> Mesh {
    let dir = MeshDir::new();
    dir.write("mesh.yaml", &config(net, backends, policy));
    let cp = ControlPlane::start(&dir).await;
    let web = Proxy::start_at(&cp, "web-1", addr(&format!("{net}.1:4143"))).await;
    let mut proxies = Vec::new();
    for i in 1..=backends {
        let p = Proxy::start_at(&cp, &format!("backend-{i}"), addr(&format!("{net}.{}:4143", i + 1))).await;
        proxies.push(p);
    }
    web.wait_ready().await;
    for p in &proxies {
        p.wait_ready().await;
    }
    Mesh {
        _dir: dir,
        _cp: cp,
        web,
        backends: proxies,
    }
}

async fn apps(net: &str, n: u8) -> Vec<App> {
    let mut apps = Vec::new();
    for i in 1..=n {
        apps.push(App::start(addr(&format!("{net}.{}:9090", i + 1)), &format!("backend-{i}")).await);
    }
    apps
}

fn served(apps: &[App]) -> u64 {
    apps.iter().map(|a| a.served.load(Ordering::Relaxed)).sum()
}

/// `curl -i` through `proxy` with `args`; the output, headers included.
async fn curl(proxy: SocketAddr, args: &[&str]) -> String {
    let out = Command::new("curl")
        .args(["-sS", "-i", "--max-time", "60", "-x", &format!("http://{proxy}")])
        .args(args)
        .output()
        .await
        .expect("run curl");
    assert!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The value of the first sample of `metric` (with its labels) on a metrics page.
fn sample(metrics: &str, metric: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(metric) && l[metric.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_killed_under_load_costs_the_client_nothing() {
    let net = "127.0.40";
    let mut m = mesh(net, 3, "").await;
    let _apps = apps(net, 3).await;
    let url = "http://backend.default:9090/";
    let load = tokio::spawn(load(m.web.outbound, url, 500, Duration::from_secs(6)));
    // A second into the load, backend-3's proxy dies: its connections reset, new ones
    // are refused.
    wait_until("traffic flows", || async {
        let metrics = m.web.admin_get("/metrics").await;
        sample(
            &metrics,
            "wary_proxy_requests_total{direction=\"outbound\",service=\"backend.default\"}",
        )
        .filter(|n| *n >= 500.0)
    })
    .await;
    let dead = m.backends.pop().unwrap();
    drop(dead);
    let report = load.await.unwrap();
    assert_eq!(report.failed, 0, "{report:?}");
    assert_eq!(report.ok, report.sent);
    let metrics = m.web.admin_get("/metrics").await;
    let ejected =
        format!("wary_proxy_endpoint_ejections_total{{service=\"backend.default\",endpoint=\"{net}.4:9090\"}}");
    assert!(sample(&metrics, &ejected).is_some_and(|n| n >= 1.0), "{metrics}");
    eprintln!(
        "retries: {:?}",
        sample(
            &metrics,
            "wary_proxy_retries_total{service=\"backend.default\",result=\"sent\"}"
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_that_reached_the_backend_is_sent_once_and_a_get_is_retried() {
    let net = "127.0.41";
    let m = mesh(net, 1, "").await;
    let apps = apps(net, 1).await;
    apps[0].status.store(503, Ordering::Relaxed);
    let post = curl(
        m.web.outbound,
        &["-X", "POST", "-d", "order=1", "http://backend.default:9090/orders"],
    )
    .await;
    assert!(post.starts_with("HTTP/1.1 503"), "{post}");
    assert!(post.contains("wary-attempts: 1"), "{post}");
    assert_eq!(served(&apps), 1, "the backend saw the POST once");

    let get = curl(m.web.outbound, &["http://backend.default:9090/orders"]).await;
    assert!(get.starts_with("HTTP/1.1 503"), "{get}");
    assert!(get.contains("wary-attempts: 3"), "{get}");
    assert_eq!(served(&apps), 4, "the GET was tried three times");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_against_failing_backends_stay_within_the_budget() {
    let net = "127.0.42";
    let m = mesh(net, 2, "").await;
    let apps = apps(net, 2).await;
    for app in &apps {
        app.status.store(503, Ordering::Relaxed);
    }
    let report = load(
        m.web.outbound,
        "http://backend.default:9090/",
        500,
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(report.sent, 1000);
    let seen = served(&apps);
    // 20 % of 1,000 requests, plus 10 retries/s over the 10 s window.
    assert!(
        seen <= 1200 + 100,
        "the backends saw {seen} attempts for 1,000 requests"
    );
    let metrics = m.web.admin_get("/metrics").await;
    let exhausted = sample(
        &metrics,
        "wary_proxy_retries_total{service=\"backend.default\",result=\"budget_exhausted\"}",
    );
    assert!(exhausted.is_some_and(|n| n > 0.0), "{metrics}");
    eprintln!("1,000 requests, {seen} attempts, budget exhausted {exhausted:?} times");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_backend_is_ejected_probed_and_readmitted() {
    let net = "127.0.43";
    let policy = "  outlierDetection: {consecutiveFailures: 3, baseEjectionTime: 1s}\n  retries: {attempts: 1}\n";
    let m = mesh(net, 2, policy).await;
    let apps = apps(net, 2).await;
    apps[1].status.store(500, Ordering::Relaxed);
    let gauge = format!("wary_proxy_endpoint_ejected{{service=\"backend.default\",endpoint=\"{net}.3:9090\"}}");
    let ejections =
        format!("wary_proxy_endpoint_ejections_total{{service=\"backend.default\",endpoint=\"{net}.3:9090\"}}");
    // Steady traffic until the test has seen it all, however slow the machine.
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = tokio::spawn(steady(m.web.outbound, stop.clone()));
    wait_until("backend-2 is ejected", || async {
        let metrics = m.web.admin_get("/metrics").await;
        (sample(&metrics, &gauge) == Some(1.0) && sample(&metrics, &ejections) == Some(1.0)).then_some(())
    })
    .await;
    // Ejected, it gets only probes: one per ejection time (1 s, then 2 s...).
    let at_ejection = apps[1].served.load(Ordering::Relaxed);
    wait_until("a probe reaches backend-2", || async {
        (apps[1].served.load(Ordering::Relaxed) > at_ejection).then_some(())
    })
    .await;
    // The probe failed: backend-2 is still out of rotation, backend-1 serves.
    let dump = m.web.config_dump().await;
    let state = |addr: String| {
        dump["load"][0]["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["address"] == addr.as_str())
            .map(|e| e["state"].as_str().unwrap().to_string())
    };
    assert_eq!(state(format!("{net}.2:9090")).as_deref(), Some("admitted"), "{dump}");
    let flaky = state(format!("{net}.3:9090"));
    assert!(
        matches!(flaky.as_deref(), Some("ejected" | "probation" | "probing")),
        "{flaky:?} in {dump}"
    );
    // Healthy again: the next probe readmits it, and it takes traffic again.
    apps[1].status.store(200, Ordering::Relaxed);
    wait_until("backend-2 is readmitted", || async {
        let metrics = m.web.admin_get("/metrics").await;
        (sample(&metrics, &gauge) == Some(0.0)).then_some(())
    })
    .await;
    let readmitted = apps[1].served.load(Ordering::Relaxed);
    let deadline = tokio::time::Instant::now() + wary_tests::DEADLINE;
    while apps[1].served.load(Ordering::Relaxed) < readmitted + 10 {
        // On failure, say what the balancer saw.
        assert!(
            tokio::time::Instant::now() < deadline,
            "backend-2 took no traffic after readmission; served {:?}; the client's view: {}",
            apps.iter()
                .map(|a| a.served.load(Ordering::Relaxed))
                .collect::<Vec<_>>(),
            m.web.config_dump().await["load"]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let (sent, failed) = traffic.await.unwrap();
    // Only the failures before the ejection and the failed probes reached the client.
    assert!(failed <= 10, "{failed} of {sent} requests failed");
    let metrics = m.web.admin_get("/metrics").await;
    assert_eq!(
        sample(&metrics, &ejections),
        Some(1.0),
        "failed probes re-eject without counting anew"
    );
}

/// Sends a request every 20 ms until `stop`; returns (sent, failed).
async fn steady(proxy: SocketAddr, stop: Arc<AtomicBool>) -> (u32, u32) {
    let client: hyper_util::client::legacy::Client<_, http_body_util::Empty<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(ProxyConnector(proxy));
    let (mut sent, mut failed) = (0, 0);
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    while !stop.load(Ordering::Relaxed) && sent < 10_000 {
        tick.tick().await;
        sent += 1;
        let uri: hyper::Uri = "http://backend.default:9090/".parse().unwrap();
        let ok = tokio::time::timeout(Duration::from_secs(10), client.get(uri))
            .await
            .is_ok_and(|r| r.is_ok_and(|r| r.status() == 200));
        failed += u32::from(!ok);
    }
    (sent, failed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bulkhead_answers_the_overflow_at_once() {
    let net = "127.0.44";
    let policy = "  connectionPool: {maxRequests: 20, maxPendingRequests: 10}\n";
    let m = mesh(net, 1, policy).await;
    let apps = apps(net, 1).await;
    // Far slower than any overflow answer may take, however busy the machine.
    apps[0].delay_ms.store(10_000, Ordering::Relaxed);
    let client: hyper_util::client::legacy::Client<_, http_body_util::Empty<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(ProxyConnector(m.web.outbound));
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..200 {
        let client = client.clone();
        calls.spawn(async move {
            let started = Instant::now();
            let uri: hyper::Uri = "http://backend.default:9090/slow".parse().unwrap();
            let response = tokio::time::timeout(Duration::from_secs(60), client.get(uri))
                .await
                .expect("an answer within 60 s")
                .expect("an answer");
            let cause = response.headers().get("wary-error").cloned();
            (response.status().as_u16(), cause, started.elapsed())
        });
    }
    let (mut ok, mut overloaded) = (0, 0);
    while let Some(call) = calls.join_next().await {
        let (status, cause, took) = call.unwrap();
        match (status, cause) {
            (200, _) => ok += 1,
            (503, Some(cause)) if cause == "overloaded" => {
                overloaded += 1;
                // Refused without waiting for the slow backend.
                assert!(took < Duration::from_secs(5), "an overflow took {took:?}");
            }
            other => panic!("unexpected answer {other:?}"),
        }
    }
    // 20 in flight and 10 waiting are served; everything beyond is refused.
    assert_eq!(ok + overloaded, 200);
    assert!(ok >= 30 && overloaded >= 100, "ok {ok}, overloaded {overloaded}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_chunked_body_arrives_identical_and_a_large_one_is_not_retried() {
    let net = "127.0.45";
    let m = mesh(net, 1, "").await;
    let app = Upstream::start(addr(&format!("{net}.2:9090")), "backend-1").await;
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small");
    let payload: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&small, &payload).unwrap();
    app.seen.fail_next.store(1, Ordering::Relaxed);
    let put = curl(
        m.web.outbound,
        &[
            "-X",
            "PUT",
            "-H",
            "Transfer-Encoding: chunked",
            "--data-binary",
            &format!("@{}", small.display()),
            "http://backend.default:9090/flaky",
        ],
    )
    .await;
    assert!(put.starts_with("HTTP/1.1 200"), "{put}");
    assert!(put.contains("wary-attempts: 2"), "{put}");
    {
        let bodies = app.seen.bodies.lock().unwrap();
        assert_eq!(bodies.len(), 2);
        assert!(bodies.iter().all(|b| b[..] == payload[..]), "a replayed body differs");
    }

    // Over the 64 KiB replay buffer: the 503 goes back to the client untried.
    let large = dir.path().join("large");
    std::fs::write(&large, vec![7u8; 100 * 1024]).unwrap();
    app.seen.fail_next.store(1, Ordering::Relaxed);
    let put = curl(
        m.web.outbound,
        &[
            "-X",
            "PUT",
            "-H",
            "Transfer-Encoding: chunked",
            "--data-binary",
            &format!("@{}", large.display()),
            "http://backend.default:9090/flaky",
        ],
    )
    .await;
    assert!(put.starts_with("HTTP/1.1 503"), "{put}");
    assert!(put.contains("wary-attempts: 1"), "{put}");
    assert_eq!(app.seen.bodies.lock().unwrap().len(), 3);
    let metrics = m.web.admin_get("/metrics").await;
    let not_retryable = "wary_proxy_retries_total{service=\"backend.default\",result=\"not_retryable\"}";
    assert_eq!(sample(&metrics, not_retryable), Some(1.0), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_are_the_clients_own_and_an_empty_service_answers_at_once() {
    let net = "127.0.46";
    let m = mesh(net, 1, "").await;
    let apps = apps(net, 1).await;
    // A 20 s call with a 30 s client deadline: no default timeout cuts it short.
    apps[0].delay_ms.store(20_000, Ordering::Relaxed);
    let long = curl(
        m.web.outbound,
        &["-H", "grpc-timeout: 30S", "http://backend.default:9090/long"],
    );
    // A 1 s deadline on the same call: the proxy answers DEADLINE_EXCEEDED at 1 s.
    let short = curl(
        m.web.outbound,
        &[
            "-H",
            "grpc-timeout: 1S",
            "-H",
            "content-type: application/grpc",
            "http://backend.default:9090/short",
        ],
    );
    let (long, short) = tokio::join!(long, short);
    assert!(long.starts_with("HTTP/1.1 200"), "{long}");
    assert!(short.starts_with("HTTP/1.1 200"), "{short}");
    assert!(short.contains("grpc-status: 4"), "{short}");
    assert!(short.contains("wary-error: request-timeout"), "{short}");

    // A service without endpoints: 503 at once, naming the service.
    m._dir.write(
        "empty.yaml",
        "apiVersion: local.wary.io/v1alpha1\nkind: Service\nmetadata: {name: empty}\nspec:\n  selector: {app: nobody}\n  ports: [{name: http, port: 80}]\n",
    );
    m.web
        .wait_for_dump("the empty service is known", |d| {
            d["services"]
                .as_array()
                .is_some_and(|s| s.iter().any(|s| s["name"] == "empty.default"))
        })
        .await;
    let client: hyper_util::client::legacy::Client<_, http_body_util::Empty<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(ProxyConnector(m.web.outbound));
    let mut fastest = Duration::MAX;
    for _ in 0..3 {
        let started = Instant::now();
        let response = client.get("http://empty.default/".parse().unwrap()).await.unwrap();
        fastest = fastest.min(started.elapsed());
        assert_eq!(response.status(), 503);
        assert_eq!(response.headers()["wary-error"], "no-endpoints");
    }
    // The best of three, so a busy machine's scheduling hiccup is not a failure; a
    // proxy that waited for endpoints would miss every time.
    assert!(fastest < Duration::from_millis(100), "no-endpoints took {fastest:?}");
    let _ = &m.backends;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_closed_and_the_next_request_opens_another() {
    let net = "127.0.47";
    let m = mesh(net, 1, "  timeouts: {idle: 1s}\n").await;
    let _apps = apps(net, 1).await;
    let get = || curl(m.web.outbound, &["http://backend.default:9090/"]);
    assert!(get().await.starts_with("HTTP/1.1 200"));
    let handshakes = "wary_proxy_tls_handshakes_total{direction=\"outbound\"}";
    let first = sample(&m.web.admin_get("/metrics").await, handshakes).unwrap();
    // Unused for its idle timeout, the pooled connection goes (checked every 10 s).
    wait_until("the idle connection is closed", || async {
        let metrics = m.web.admin_get("/metrics").await;
        (sample(&metrics, "wary_proxy_peer_connections") == Some(0.0)).then_some(())
    })
    .await;
    assert!(get().await.starts_with("HTTP/1.1 200"));
    let second = sample(&m.web.admin_get("/metrics").await, handshakes).unwrap();
    assert_eq!(second, first + 1.0, "a new connection, a new handshake");
}
