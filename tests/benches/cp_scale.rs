//! Issue 10's control-plane scale: 1,000 services with 10,000 endpoints, 1,000
//! simulated proxies each on its own mTLS connection subscribed to every Service and
//! Endpoints; then a config change (one service gains an endpoint), timed from the file
//! write to each proxy's receipt (and ACK) of the update: p50, p99 and the last, over
//! several changes; and the control plane's RSS and CPU.
//!
//! `benches/run cp-scale`. The simulated proxies are discovery clients in this process
//! that ACK every response at once, as the real proxy does after validating.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use wary_proto::discovery::discovery_client::DiscoveryClient;
use wary_proto::discovery::{DiscoveryRequest, Endpoints, Node, Service};
use wary_proto::{TypedResource, WILDCARD};
use wary_tests::{ControlPlane, MeshDir, proc_cpu_seconds, proc_status_bytes};

const SERVICES: usize = 1000;
const ENDPOINTS_PER_SERVICE: usize = 10;
const PROXIES: usize = 1000;
const CHANGES: usize = 5;

/// One service, its Service document and its workloads, in one file.
fn service_file(s: usize, extra: usize) -> String {
    let mut yaml = format!(
        "apiVersion: local.wary.io/v1alpha1
kind: Service
metadata: {{name: svc-{s}}}
spec:
  selector: {{app: svc-{s}}}
  ports: [{{name: http, port: 80, targetPort: http}}]
"
    );
    for e in 0..ENDPOINTS_PER_SERVICE + extra {
        let n = s * 100 + e;
        yaml.push_str(&format!(
            "---
apiVersion: local.wary.io/v1alpha1
kind: Workload
metadata: {{name: svc-{s}-{e}, labels: {{app: svc-{s}}}}}
spec:
  serviceAccount: svc-{s}
  address: 10.{}.{}.{}
  ports: [{{name: http, port: 8080}}]
",
            n / 65536 % 256,
            n / 256 % 256,
            n % 256
        ));
    }
    yaml
}

fn mib(pid: u32, field: &str) -> f64 {
    proc_status_bytes(pid, field) as f64 / f64::from(1 << 20)
}

/// A simulated proxy: subscribes to every Service and Endpoints, ACKs each response,
/// and reports when each response arrived.
async fn proxy(cp: Arc<ControlPlane>, i: usize, arrivals: mpsc::UnboundedSender<(usize, Instant, usize)>) {
    let creds = cp.mesh_credentials("sim");
    let mut grpc = DiscoveryClient::new(cp.channel(&creds).await)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let (tx, rx) = mpsc::channel(8);
    for (n, type_url) in [Service::TYPE_URL, Endpoints::TYPE_URL].into_iter().enumerate() {
        tx.send(DiscoveryRequest {
            node: (n == 0).then(|| Node {
                id: format!("sim-{i}"),
                ..Default::default()
            }),
            type_url: type_url.into(),
            resource_names_subscribe: vec![WILDCARD.into()],
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let mut responses = grpc
        .stream(ReceiverStream::new(rx))
        .await
        .expect("open a stream")
        .into_inner();
    while let Ok(Some(r)) = responses.message().await {
        let at = Instant::now();
        let _ = tx
            .send(DiscoveryRequest {
                type_url: r.type_url.clone(),
                response_nonce: r.nonce.clone(),
                version_info: r.version_info.clone(),
                ..Default::default()
            })
            .await;
        let _ = arrivals.send((i, at, r.resources.len()));
    }
}

fn percentile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let mesh = MeshDir::new();
    for s in 0..SERVICES {
        mesh.write(&format!("svc-{s}.yaml"), &service_file(s, 0));
    }
    let cp = Arc::new(ControlPlane::start_logging(&mesh, "127.0.0.1:0".parse().unwrap(), "warn").await);
    let pid = cp.pid();
    let idle_rss = mib(pid, "VmRSS");
    let (arrivals_tx, mut arrivals) = mpsc::unbounded_channel();
    let started = Instant::now();
    let cpu0 = proc_cpu_seconds(pid);
    for i in 0..PROXIES {
        tokio::spawn(proxy(cp.clone(), i, arrivals_tx.clone()));
    }
    // Every proxy gets its two full responses.
    let mut first = vec![0u8; PROXIES];
    let mut synced = 0;
    while synced < PROXIES {
        let (i, _, _) = tokio::time::timeout(Duration::from_secs(300), arrivals.recv())
            .await
            .expect("proxies sync within 5 minutes")
            .unwrap();
        first[i] += 1;
        if first[i] == 2 {
            synced += 1;
        }
    }
    let sync = started.elapsed();
    let sync_cpu = proc_cpu_seconds(pid) - cpu0;
    let synced_rss = mib(pid, "VmRSS");
    println!(
        "{PROXIES} proxies synced {SERVICES} services / {} endpoints in {:.1} s; control plane CPU {sync_cpu:.1} s, RSS {idle_rss:.0} MiB before, {synced_rss:.0} MiB after",
        SERVICES * ENDPOINTS_PER_SERVICE,
        sync.as_secs_f64()
    );

    let mut latencies = Vec::new();
    let mut lasts = Vec::new();
    let cpu1 = proc_cpu_seconds(pid);
    for change in 0..CHANGES {
        tokio::time::sleep(Duration::from_secs(1)).await;
        while arrivals.try_recv().is_ok() {}
        let s = change * 7;
        let at = Instant::now();
        mesh.write(&format!("svc-{s}.yaml"), &service_file(s, 1));
        let mut got = vec![false; PROXIES];
        let mut count = 0;
        let mut last = Duration::ZERO;
        while count < PROXIES {
            let (i, when, _) = tokio::time::timeout(Duration::from_secs(60), arrivals.recv())
                .await
                .expect("every proxy gets the change within a minute")
                .unwrap();
            if !got[i] {
                got[i] = true;
                count += 1;
                let took = when.duration_since(at);
                last = last.max(took);
                latencies.push(took.as_secs_f64() * 1000.0);
            }
        }
        lasts.push(last.as_secs_f64() * 1000.0);
    }
    let change_cpu = (proc_cpu_seconds(pid) - cpu1) / CHANGES as f64;
    let (p50, p99) = (percentile(&mut latencies, 0.50), percentile(&mut latencies, 0.99));
    let last = percentile(&mut lasts, 1.0);
    println!(
        "config change → proxies, over {CHANGES} changes × {PROXIES} proxies: p50 {p50:.0} ms, p99 {p99:.0} ms, last {last:.0} ms (the file watcher's debounce included)"
    );
    println!(
        "control plane: RSS {:.0} MiB (peak {:.0} MiB), CPU {change_cpu:.2} s per change (idle time between changes included)",
        mib(pid, "VmRSS"),
        mib(pid, "VmHWM")
    );
    println!(
        "result cp_scale proxies={PROXIES} services={SERVICES} endpoints={} sync_s={:.1} change_p50_ms={p50:.0} change_p99_ms={p99:.0} change_last_ms={last:.0} rss_mib={:.0} rss_peak_mib={:.0}",
        SERVICES * ENDPOINTS_PER_SERVICE,
        sync.as_secs_f64(),
        mib(pid, "VmRSS"),
        mib(pid, "VmHWM")
    );
}
