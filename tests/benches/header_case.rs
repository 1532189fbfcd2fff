//! Issue 17, item 5: what keeping HTTP/1 header-name case costs a request through the
//! mesh. Two proxy pairs on the same two-hop path (client → outbound → mTLS HTTP/2 →
//! inbound → HTTP/1 backend), one with `--header-case preserve` (the default) and one
//! with `--header-case lower` (no head is read: the cost before the change), one
//! worker thread each. Each round sends the same keep-alive HTTP/1 requests through
//! each pair, rounds interleaved; the figure is user + system CPU of both proxies per
//! request, median of the rounds:
//!
//! * all-lower-case requests through `preserve` against `lower`: the cost of reading
//!   heads that need nothing (must stay within 2 %);
//! * Title-Case requests (as curl and browsers send) through `preserve`: the cost of
//!   carrying and restoring the spellings.
//!
//! `benches/run header-case`.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wary_tests::{App, ControlPlane, MeshDir, Proxy, service, workload_as};

const NET: &str = "127.0.55";
const ROUNDS: usize = 11;
const CONNECTIONS: usize = 1;
const PER_CONNECTION: usize = 20_000;

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A request a browser-like client sends: ten headers, in `title` case or lower case.
fn request(service: &str, title: bool) -> Vec<u8> {
    let authority = format!("{service}.default:9090");
    let headers = [
        ("host", authority.as_str()),
        (
            "user-agent",
            "Mozilla/5.0 (X11; Linux x86_64) Gecko/20100101 Firefox/133.0",
        ),
        ("accept", "application/json"),
        ("accept-language", "en-GB,en;q=0.5"),
        ("accept-encoding", "gzip, deflate, br"),
        ("x-request-id", "7f3c2a9e-5b1d-4c8e-9a2f-0d6b4e1c3a57"),
        ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        ("authorization", "Bearer eyJhbGciOiJIUzI1NiJ9.e30.abc"),
        ("cache-control", "no-cache"),
        ("x-forwarded-proto", "https"),
    ];
    let mut text = format!("GET http://{authority}/api/orders/42 HTTP/1.1\r\n");
    for (name, value) in headers {
        let name = if title {
            name.split('-')
                .map(|w| w[..1].to_ascii_uppercase() + &w[1..])
                .collect::<Vec<_>>()
                .join("-")
        } else {
            name.to_string()
        };
        text.push_str(&format!("{name}: {value}\r\n"));
    }
    text.push_str("\r\n");
    text.into_bytes()
}

/// Sends `request` `PER_CONNECTION` times on each of `CONNECTIONS` keep-alive
/// connections to `entry`, one at a time per connection; every answer must be a 200.
async fn load(entry: SocketAddr, request: &[u8]) {
    let mut tasks = Vec::new();
    for _ in 0..CONNECTIONS {
        let request = request.to_vec();
        tasks.push(tokio::spawn(async move {
            let mut tcp = TcpStream::connect(entry).await.unwrap();
            tcp.set_nodelay(true).unwrap();
            let mut buf = Vec::with_capacity(4096);
            for _ in 0..PER_CONNECTION {
                tcp.write_all(&request).await.unwrap();
                read_answer(&mut tcp, &mut buf).await;
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

/// Reads one answer (head and `Content-Length` body) and checks it is a 200.
async fn read_answer(tcp: &mut TcpStream, buf: &mut Vec<u8>) {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            let length: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .expect("a content-length");
            while buf.len() < end + 4 + length {
                read_more(tcp, buf).await;
            }
            buf.drain(..end + 4 + length);
            return;
        }
        read_more(tcp, buf).await;
    }
}

async fn read_more(tcp: &mut TcpStream, buf: &mut Vec<u8>) {
    let mut chunk = [0u8; 4096];
    let n = tcp.read(&mut chunk).await.unwrap();
    assert!(n > 0, "the proxy closed the connection");
    buf.extend_from_slice(&chunk[..n]);
}

/// CPU microseconds of `pids` per request over one load, from the scheduler's own
/// nanosecond count of the time each process ran (`/proc/<pid>/schedstat`, summed over
/// its threads).
async fn cpu_per_request(pids: &[u32], entry: SocketAddr, request: &[u8]) -> f64 {
    let before: u64 = pids.iter().map(|pid| run_ns(*pid)).sum();
    load(entry, request).await;
    let after: u64 = pids.iter().map(|pid| run_ns(*pid)).sum();
    (after - before) as f64 / 1e3 / (CONNECTIONS * PER_CONNECTION) as f64
}

fn run_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    // Pair "preserve": web-p (.1) → backend-p (.2); pair "lower": web-l (.3) → backend-l (.4).
    let mesh = MeshDir::new();
    for (service_name, web, backend, web_ip, backend_ip) in [
        ("backend-p", "web-p", "backend-p-1", 1, 2),
        ("backend-l", "web-l", "backend-l-1", 3, 4),
    ] {
        mesh.write(&format!("{service_name}.yaml"), &service(service_name, 9090));
        mesh.write(
            &format!("{web}.yaml"),
            &workload_as(web, web, "web", &format!("{NET}.{web_ip}"), 8080),
        );
        mesh.write(
            &format!("{backend}.yaml"),
            &workload_as(backend, service_name, "backend", &format!("{NET}.{backend_ip}"), 8080),
        );
    }
    let _app_p = App::start(addr(&format!("{NET}.2:8080")), "backend-p").await;
    let _app_l = App::start(addr(&format!("{NET}.4:8080")), "backend-l").await;
    let cp = ControlPlane::start(&mesh).await;
    let mut pairs = Vec::new();
    for (case, web, backend, web_ip, backend_ip) in [
        ("preserve", "web-p", "backend-p-1", 1, 2),
        ("lower", "web-l", "backend-l-1", 3, 4),
    ] {
        let env = [
            ("WARY_WORKER_THREADS", "1"),
            ("RUST_LOG", "warn"),
            ("WARY_HEADER_CASE", case),
        ];
        let b = Proxy::start_with(
            &cp,
            backend,
            addr(&format!("{NET}.{backend_ip}:4143")),
            addr("127.0.0.1:0"),
            &env,
        )
        .await;
        let w = Proxy::start_with(
            &cp,
            web,
            addr(&format!("{NET}.{web_ip}:4143")),
            addr(&format!("{NET}.{web_ip}:4140")),
            &env,
        )
        .await;
        w.wait_ready().await;
        b.wait_ready().await;
        pairs.push((w, b));
    }
    let preserve = [pairs[0].0.pid(), pairs[0].1.pid()];
    let lower = [pairs[1].0.pid(), pairs[1].1.pid()];
    let (entry_p, entry_l) = (pairs[0].0.outbound, pairs[1].0.outbound);
    let (lower_p, lower_l) = (request("backend-p", false), request("backend-l", false));
    let title_p = request("backend-p", true);

    // A warm-up round, not counted.
    load(entry_p, &lower_p).await;
    load(entry_l, &lower_l).await;
    let (mut kept, mut before, mut title) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        // Alternate which goes first, so neither always runs on a warmer machine.
        if round % 2 == 0 {
            before.push(cpu_per_request(&lower, entry_l, &lower_l).await);
            kept.push(cpu_per_request(&preserve, entry_p, &lower_p).await);
        } else {
            kept.push(cpu_per_request(&preserve, entry_p, &lower_p).await);
            before.push(cpu_per_request(&lower, entry_l, &lower_l).await);
        }
        title.push(cpu_per_request(&preserve, entry_p, &title_p).await);
        eprintln!(
            "round {round}: lower-case requests {:.2} µs (preserve) vs {:.2} µs (lower); Title-Case {:.2} µs",
            kept[round], before[round], title[round]
        );
    }
    // Each round's ratio pairs measurements taken moments apart, so the machine's
    // drift between rounds cancels.
    let ratio = |a: &[f64], b: &[f64]| median(a.iter().zip(b).map(|(a, b)| a / b).collect());
    let (kept_ratio, title_ratio) = (ratio(&kept, &before), ratio(&title, &before));
    let (kept, before, title) = (median(kept), median(before), median(title));
    let requests = CONNECTIONS * PER_CONNECTION;
    println!(
        "CPU of both proxies per request, median of {ROUNDS} rounds of {requests} keep-alive HTTP/1 requests \
         ({CONNECTIONS} connections), one worker thread each:"
    );
    println!("  --header-case lower     (lower-case requests, the cost before) {before:8.2} µs");
    println!(
        "  --header-case preserve  (lower-case requests)                  {kept:8.2} µs  {:+.1} % (median round ratio)",
        (kept_ratio - 1.0) * 100.0
    );
    println!(
        "  --header-case preserve  (Title-Case requests)                  {title:8.2} µs  {:+.1} % (median round ratio)",
        (title_ratio - 1.0) * 100.0
    );
    println!(
        "result header_case lower_us={before:.3} preserve_lower_case_us={kept:.3} preserve_title_case_us={title:.3} \
         lower_case_ratio={kept_ratio:.4} title_case_ratio={title_ratio:.4}"
    );
}
