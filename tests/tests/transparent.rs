//! Transparent mode with real iptables: in a network namespace of its own, the client
//! app's connections are redirected to its proxy's outbound listener, which finds the
//! original destination (`SO_ORIGINAL_DST`), detects the protocol, and carries the
//! traffic over mTLS to the backend's proxy — the app is configured with nothing.
//!
//! The test re-runs itself inside the namespace (`ip netns exec`), so the control
//! plane, both proxies, the servers and the clients all live there; the host's network
//! is never touched. The rule here redirects only connections from the client
//! workload's address, so the proxies' own connections pass untouched; `pods.rs` runs
//! the real rules `wary-proxy init` installs, two pods apart.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use wary_tests::upstream::{self, Upstream};
use wary_tests::{ControlPlane, DEADLINE, MeshDir, Proxy};

const NET: &str = "127.0.30";
const OUTBOUND: &str = "127.0.0.1:4140";
const INSIDE: &str = "WARY_TEST_IN_NETNS";

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Runs a command, failing the test with its output if it fails.
fn run(cmd: &[&str]) {
    let out = Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (transparent-mode tests need root, iproute2 and iptables)"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Deletes the namespace when the test ends, however it ends.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "delete", &self.0]).status();
    }
}

#[test]
fn redirected_connections_are_detected_and_carried_over_mtls() {
    if std::env::var_os(INSIDE).is_some() {
        return tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(inside());
    }
    let ns = Netns(format!("wary-test-{}", std::process::id()));
    run(&["ip", "netns", "add", &ns.0]);
    let exec = ["ip", "netns", "exec", &ns.0];
    run(&[&exec[..], &["ip", "link", "set", "lo", "up"]].concat());
    let client = format!("{NET}.1");
    run(&[
        &exec[..],
        &["iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-s", &client],
        &["-j", "REDIRECT", "--to-ports", "4140"],
    ]
    .concat());
    let status = Command::new("ip")
        .args(["netns", "exec", &ns.0])
        .arg(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "redirected_connections_are_detected_and_carried_over_mtls",
            "--nocapture",
        ])
        .env(INSIDE, "1")
        // Detection waits 30 s, longer than any wait in the test: a server-first port
        // that is not treated as opaque shows as a timeout, not as a slow figure.
        .env("WARY_DETECT_TIMEOUT_MS", "30000")
        .status()
        .expect("run the test inside the namespace");
    assert!(
        status.success(),
        "the test failed inside the namespace (its output is above)"
    );
}

async fn inside() {
    let mesh = MeshDir::new();
    let config = format!(
        "apiVersion: local.wary.io/v1alpha1
kind: Service
metadata: {{name: backend}}
spec:
  selector: {{app: backend}}
  ports:
  - {{name: http, port: 9090, targetPort: http}}
  - {{name: db, port: 3306, targetPort: db}}
  - {{name: raw, port: 7001, targetPort: raw}}
  - {{name: mail, port: 2525, targetPort: mail, appProtocol: tcp}}
---
apiVersion: local.wary.io/v1alpha1
kind: Workload
metadata:
  name: backend-1
  labels: {{app: backend}}
spec:
  serviceAccount: backend
  address: {NET}.2
  ports:
  - {{name: http, port: 9090}}
  - {{name: db, port: 3306}}
  - {{name: raw, port: 7001}}
  - {{name: mail, port: 2525}}
---
apiVersion: local.wary.io/v1alpha1
kind: Workload
metadata:
  name: web-1
  labels: {{app: web}}
spec:
  serviceAccount: web
  address: {NET}.1
  ports:
  - {{name: http, port: 8080}}
"
    );
    mesh.write("mesh.yaml", &config);
    let cp = ControlPlane::start(&mesh).await;
    let web = Proxy::start_listening(&cp, "web-1", addr(&format!("{NET}.1:4143")), addr(OUTBOUND)).await;
    let backend = Proxy::start_at(&cp, "backend-1", addr(&format!("{NET}.2:4143"))).await;
    web.wait_ready().await;
    backend.wait_ready().await;
    let _app = Upstream::start(addr(&format!("{NET}.2:9090")), "backend-1").await;
    let _db = upstream::speaks_first(addr(&format!("{NET}.2:3306")), b"220 db ready\r\n").await;
    let _raw = upstream::speaks_first(addr(&format!("{NET}.2:7001")), b"").await;
    let _mail = upstream::speaks_first(addr(&format!("{NET}.2:2525")), b"220 mail ready\r\n").await;
    let _outside = Upstream::start(addr(&format!("{NET}.9:8000")), "outside").await;

    // Plain HTTP/1.1 and HTTP/2 to the backend's own address, no proxy configured: the
    // backend's app sees the client's verified identity, so it came over mTLS.
    for extra in [&[][..], &["--http2-prior-knowledge"][..]] {
        let out = curl(&[extra, &["-i", &format!("http://{NET}.2:9090/hello")]].concat());
        assert!(out.contains(" 200"), "{out}");
        assert!(out.contains("hello from backend-1"), "{out}");
        assert!(
            out.contains("x-seen-client-id: spiffe://cluster.local/ns/default/sa/web"),
            "{out}"
        );
    }
    // Outside the mesh: forwarded as is.
    let out = curl(&["-i", &format!("http://{NET}.9:8000/hello")]);
    assert!(
        out.contains("hello from outside") && !out.contains("x-seen-client-id"),
        "{out}"
    );

    // A server that speaks first on an opaque port greets at once (no detection wait).
    let mut db = connect_from_client(&format!("{NET}.2:3306")).await;
    let started = Instant::now();
    assert_eq!(read_exactly(&mut db, 14).await, "220 db ready\r\n");
    eprintln!("opaque port: greeting {:?} after connect", started.elapsed());
    // The same on a port the Service declares `appProtocol: tcp`.
    let mut mail = connect_from_client(&format!("{NET}.2:2525")).await;
    let started = Instant::now();
    assert_eq!(read_exactly(&mut mail, 16).await, "220 mail ready\r\n");
    eprintln!("appProtocol: tcp port: greeting {:?} after connect", started.elapsed());
    // A client that speaks first, not HTTP: detected as opaque and carried whole.
    let mut raw = connect_from_client(&format!("{NET}.2:7001")).await;
    // A TLS ClientHello record's first bytes: carried whole to a port not declared
    // opaque (anything that is neither TLS nor HTTP would be refused there).
    raw.write_all(b"\x16\x03\x01\x00\x05\x01 hello").await.unwrap();
    assert_eq!(
        read_exactly(&mut raw, 12).await,
        "\u{16}\u{3}\u{1}\u{0}\u{5}\u{1} hello"
    );
    raw.shutdown().await.unwrap();
    assert_eq!(read_exactly(&mut raw, 3).await, "bye");

    let metrics = curl_plain(&format!("http://{}/metrics", web.admin));
    for line in [
        "wary_proxy_requests_total{direction=\"outbound\",service=\"backend.default\"} 5",
        "wary_proxy_requests_total{direction=\"outbound\",service=\"passthrough\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }

    // backend-2 joins; then backend-1, which the app's open connections were going to,
    // leaves. Their next requests are served by backend-2, and each connection closes
    // after its answer (HTTP/1 `Connection: close`, HTTP/2 GOAWAY), so the app reconnects.
    mesh.write(
        "backend-2.yaml",
        &format!(
            "apiVersion: local.wary.io/v1alpha1
kind: Workload
metadata: {{name: backend-2, labels: {{app: backend}}}}
spec:
  serviceAccount: backend
  address: {NET}.3
  ports: [{{name: http, port: 9090}}]
"
        ),
    );
    let backend2 = Proxy::start_at(&cp, "backend-2", addr(&format!("{NET}.3:4143"))).await;
    backend2.wait_ready().await;
    let _app2 = Upstream::start(addr(&format!("{NET}.3:9090")), "backend-2").await;
    let mut h1 = connect_from_client(&format!("{NET}.2:9090")).await;
    let (head, body) = http1_get(&mut h1).await;
    assert!(
        head.starts_with("HTTP/1.1 200") && body.contains("backend-1"),
        "{head}{body}"
    );
    let (mut h2, h2_done) = h2_client(connect_from_client(&format!("{NET}.2:9090")).await).await;
    assert!(h2_get(&mut h2).await.contains("backend-1"));

    mesh.write(
        "mesh.yaml",
        &config.replace(
            &format!("address: {NET}.2\n"),
            &format!("address: {NET}.2\n  ready: false\n"),
        ),
    );
    web.wait_for_dump("backend-1 gone", |d| !d.to_string().contains(&format!("{NET}.2:9090")))
        .await;

    let (head, body) = http1_get(&mut h1).await;
    assert!(
        head.starts_with("HTTP/1.1 200") && body.contains("backend-2"),
        "{head}{body}"
    );
    assert!(head.to_lowercase().contains("connection: close"), "{head}");
    let mut rest = Vec::new();
    tokio::time::timeout(DEADLINE, h1.read_to_end(&mut rest))
        .await
        .expect("the proxy closes the connection")
        .unwrap();
    assert!(h2_get(&mut h2).await.contains("backend-2"));
    tokio::time::timeout(DEADLINE, h2_done)
        .await
        .expect("the proxy ends the HTTP/2 connection (GOAWAY)")
        .unwrap();
    let metrics = curl_plain(&format!("http://{}/metrics", web.admin));
    let closed = "wary_proxy_client_connections_closed_total{reason=\"endpoint_removed\"} 2";
    assert!(metrics.contains(closed), "{closed} in {metrics}");
    let _ = (&mesh, &backend);
}

/// One HTTP/1.1 GET on an open connection: the response head and body.
async fn http1_get(tcp: &mut TcpStream) -> (String, String) {
    tcp.write_all(b"GET /hello HTTP/1.1\r\nHost: backend\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(DEADLINE, tcp.read(&mut byte))
            .await
            .expect("a response head in time")
            .unwrap();
        assert_eq!(
            n,
            1,
            "the connection closed mid-head: {}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.to_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .expect("a content-length");
    (head, read_exactly(tcp, length).await)
}

type H2 = hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>;

/// An HTTP/2 (prior knowledge) client on `tcp`, and its connection task, which ends
/// when the connection does.
async fn h2_client(tcp: TcpStream) -> (H2, tokio::task::JoinHandle<()>) {
    let (sender, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    (
        sender,
        tokio::spawn(async move {
            let _ = conn.await;
        }),
    )
}

async fn h2_get(sender: &mut H2) -> String {
    use http_body_util::BodyExt;
    let req = http::Request::get("http://backend/hello")
        .body(http_body_util::Empty::new())
        .unwrap();
    let response = tokio::time::timeout(DEADLINE, sender.send_request(req))
        .await
        .expect("an HTTP/2 answer in time")
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&body).into_owned()
}

/// curl from the client workload's address (so the redirect applies), with no proxy.
fn curl(args: &[&str]) -> String {
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "--noproxy",
            "*",
            "--interface",
            &format!("{NET}.1"),
        ])
        .args(args)
        .output()
        .expect("run curl");
    assert!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn curl_plain(url: &str) -> String {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", url])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn connect_from_client(to: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(addr(&format!("{NET}.1:0"))).unwrap();
    tokio::time::timeout(DEADLINE, socket.connect(addr(to)))
        .await
        .expect("connect in time")
        .unwrap()
}

async fn read_exactly(tcp: &mut TcpStream, n: usize) -> String {
    let mut buf = vec![0u8; n];
    tokio::time::timeout(DEADLINE, tcp.read_exact(&mut buf))
        .await
        .expect("an answer in time")
        .unwrap();
    String::from_utf8_lossy(&buf).into_owned()
}
