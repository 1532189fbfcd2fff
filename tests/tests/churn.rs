//! Memory follows the live endpoints: after 100 endpoints come and go under load, the
//! client's proxy keeps no metric series and no connection of theirs (within the 30 s
//! grace the README documents for idle connections).
//!
//! The network: `127.0.76.1` is the client workload `web-1`, `127.0.76.2` the backend
//! that stays, `127.0.77.1`–`127.0.77.100` the backends that come and go (no proxy of
//! their own: plaintext endpoints, the connections hyper's pool keeps).

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use wary_tests::{App, ControlPlane, MeshDir, Proxy, curl_via, service, wait_until, wait_until_within};

const PORT: u16 = 9090;
const CHURNED: u8 = 100;
const BATCH: u8 = 10;
/// The grace the README documents: idle connections to a removed endpoint are closed
/// 15 to 30 s after their last use.
const GRACE: Duration = Duration::from_secs(30);

/// A plaintext backend workload (no proxy): `inboundPort: 0`.
fn plain_backend(name: &str, address: &str) -> String {
    format!(
        "apiVersion: local.wary.io/v1alpha1
kind: Workload
metadata:
  name: {name}
  labels: {{app: backend}}
spec:
  serviceAccount: backend
  address: {address}
  inboundPort: 0
  ports:
  - {{name: http, port: {PORT}}}
"
    )
}

/// The `wary_proxy_endpoint_*` sample lines on `/metrics`.
async fn endpoint_series(proxy: &Proxy) -> Vec<String> {
    proxy
        .admin_get("/metrics")
        .await
        .lines()
        .filter(|l| l.starts_with("wary_proxy_endpoint_"))
        .map(str::to_string)
        .collect()
}

/// The process's open sockets whose peer is in `127.0.77.0/24`, from its fds and the
/// kernel's TCP table.
fn sockets_to_churned(pid: u32) -> usize {
    let inodes: HashSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter_map(|l| {
                    let l = l.to_string_lossy().into_owned();
                    l.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
                })
                .collect()
        })
        .unwrap_or_default();
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let remote = cols.get(2)?.split(':').next()?;
            let ip = Ipv4Addr::from(u32::from_str_radix(remote, 16).ok()?.to_le_bytes());
            let inode: u64 = cols.get(9)?.parse().ok()?;
            (ip.octets()[..3] == [127, 0, 77] && inodes.contains(&inode)).then_some(())
        })
        .count()
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_endpoints_come_and_go_and_leave_no_series_or_connection_behind() {
    let mesh = MeshDir::new();
    mesh.write("service.yaml", &service("backend", PORT));
    mesh.write("web.yaml", &wary_tests::workload("web-1", "web", "127.0.76.1", 8080));
    mesh.write("stable.yaml", &plain_backend("backend-0", "127.0.76.2"));
    let cp = ControlPlane::start(&mesh).await;
    let web = Proxy::start_at(&cp, "web-1", "127.0.76.1:4143".parse().unwrap()).await;
    web.wait_ready().await;
    let _stable = App::start("127.0.76.2:9090".parse().unwrap(), "backend-0").await;
    let url = format!("http://backend.default:{PORT}/");

    // Steady load throughout, 50 requests a second, none of which may fail.
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn({
        let (stop, url, outbound) = (stop.clone(), url.clone(), web.outbound);
        async move {
            let mut failed = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            // Bounded: at most five minutes of it.
            for _ in 0..15_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                tick.tick().await;
                let (status, text) = curl_via(outbound, &url, &[]).await;
                if status != 200 {
                    failed.push(format!("{status}: {text}"));
                }
            }
            failed
        }
    });
    wait_until("the stable backend serves", || async {
        (curl_via(web.outbound, &url, &[]).await.0 == 200).then_some(())
    })
    .await;
    let baseline_series = endpoint_series(&web).await;
    let baseline_fds = fds(web.pid());
    assert!(!baseline_series.is_empty(), "the stable endpoint has its series");
    assert!(
        baseline_series.iter().all(|l| l.contains("127.0.76.2:9090")),
        "{baseline_series:?}"
    );

    // 100 endpoints, ten at a time: each joins, serves, and leaves.
    let started = Instant::now();
    let mut peak_series = 0;
    // The apps stay up: connections to them close because the proxy closes them.
    let mut churned_apps = Vec::new();
    for batch in 0..CHURNED / BATCH {
        let ids: Vec<u8> = (1..=BATCH).map(|i| batch * BATCH + i).collect();
        let mut apps = Vec::new();
        for &i in &ids {
            let address = format!("127.0.77.{i}");
            apps.push(App::start(format!("{address}:{PORT}").parse().unwrap(), &format!("b-{i}")).await);
            mesh.write(
                &format!("churn-{i}.yaml"),
                &plain_backend(&format!("backend-{i}"), &address),
            );
        }
        wait_until("every new endpoint serves a request", || async {
            apps.iter().all(|a| a.served.load(Ordering::Relaxed) > 0).then_some(())
        })
        .await;
        peak_series = peak_series.max(endpoint_series(&web).await.len());
        for &i in &ids {
            mesh.remove(&format!("churn-{i}.yaml"));
        }
        wait_until("the batch leaves the proxy's endpoints", || async {
            let dump = web.config_dump().await.to_string();
            (!dump.contains(&format!("127.0.77.{}:{PORT}", ids[0]))).then_some(())
        })
        .await;
        churned_apps.extend(apps);
    }
    let removed = Instant::now();
    eprintln!(
        "{CHURNED} endpoints joined and left in {:?}; series at the peak {peak_series}, baseline {}",
        started.elapsed(),
        baseline_series.len()
    );
    assert!(
        peak_series > baseline_series.len(),
        "the churned endpoints had series of their own"
    );

    // Series follow the live set at once; connections within the grace.
    let series = endpoint_series(&web).await;
    assert_eq!(series.len(), baseline_series.len(), "{series:#?}");
    assert!(series.iter().all(|l| l.contains("127.0.76.2:9090")), "{series:#?}");
    // The grace, plus a little for a busy machine to notice.
    wait_until_within(
        "every connection to a removed endpoint closes",
        GRACE + Duration::from_secs(5),
        || async { (sockets_to_churned(web.pid()) == 0).then_some(()) },
    )
    .await;
    let closed_after = removed.elapsed();
    eprintln!(
        "connections to removed endpoints all closed {closed_after:?} after the last removal; fds {} (baseline {baseline_fds})",
        fds(web.pid())
    );
    assert!(
        fds(web.pid()) <= baseline_fds + 4,
        "fds {} against a baseline of {baseline_fds}",
        fds(web.pid())
    );
    stop.store(true, Ordering::Relaxed);
    let failed = load.await.unwrap();
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    drop(churned_apps);
}
