//! The data path with real clients: `curl`, `h2load`, a tonic gRPC client and a
//! WebSocket client talk to their proxy (`HTTP_PROXY` style), which carries the traffic
//! over mTLS to the peer proxy and on to real servers.
//!
//! Every test has its own loopback network (127.0.20.x, 127.0.21.x...): `.1` is the
//! client workload `web-1`, `.2` the server workload `backend-1`, `.9` a server outside
//! the mesh.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::Command;
use tokio_tungstenite::tungstenite::Message;
use wary_tests::upstream::{self, Upstream, pb};
use wary_tests::{ControlPlane, DEADLINE, MeshDir, Proxy, ProxyConnector, wait_until};

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// The backend's ports: HTTP/1.1 and h2c, gRPC, an HTTP/1.0 server, and a server that
/// speaks first on a MySQL-like port.
const HTTP: u16 = 9090;
const GRPC: u16 = 9091;
const OLD: u16 = 9092;
const DB: u16 = 3306;

fn mesh_config(net: &str) -> String {
    format!(
        "apiVersion: local.wary.io/v1alpha1
kind: Service
metadata:
  name: backend
spec:
  selector:
    app: backend
  ports:
  - {{name: http, port: {HTTP}, targetPort: http}}
  - {{name: grpc, port: {GRPC}, targetPort: grpc}}
  - {{name: old, port: {OLD}, targetPort: old}}
  - {{name: db, port: {DB}, targetPort: db}}
---
apiVersion: local.wary.io/v1alpha1
kind: Workload
metadata:
  name: backend-1
  labels: {{app: backend}}
spec:
  serviceAccount: backend
  address: {net}.2
  ports:
  - {{name: http, port: {HTTP}}}
  - {{name: grpc, port: {GRPC}}}
  - {{name: old, port: {OLD}}}
  - {{name: db, port: {DB}}}
---
apiVersion: local.wary.io/v1alpha1
kind: Workload
metadata:
  name: web-1
  labels: {{app: web}}
spec:
  serviceAccount: web
  address: {net}.1
  ports:
  - {{name: http, port: 8080}}
"
    )
}

/// A running mesh: the client's proxy (`web`) and the backend's, both ready.
struct Mesh {
    mesh: MeshDir,
    _cp: ControlPlane,
    web: Proxy,
    backend: Proxy,
}

async fn mesh(net: &str) -> Mesh {
    mesh_with(net, &[]).await
}

/// As [`mesh`], the client's proxy started with `env`.
async fn mesh_with(net: &str, env: &[(&str, &str)]) -> Mesh {
    let mesh = MeshDir::new();
    mesh.write("mesh.yaml", &mesh_config(net));
    let cp = ControlPlane::start(&mesh).await;
    let web = Proxy::start_with(&cp, "web-1", addr(&format!("{net}.1:4143")), addr("127.0.0.1:0"), env).await;
    let backend = Proxy::start_at(&cp, "backend-1", addr(&format!("{net}.2:4143"))).await;
    web.wait_ready().await;
    backend.wait_ready().await;
    Mesh {
        mesh,
        _cp: cp,
        web,
        backend,
    }
}

/// Runs curl through `proxy` with `args`; returns stdout, failing the test if curl fails.
async fn curl(proxy: SocketAddr, args: &[&str]) -> String {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "60", "-x", &format!("http://{proxy}")])
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_keeps_connections_streams_chunks_carries_trailers_and_lets_the_server_refuse_an_upload() {
    let net = "127.0.20";
    // The proxy holds an Expect: 100-continue body up to 5 s for the server's answer,
    // so the refusal below does not depend on how busy the machine is.
    let m = mesh_with(net, &[("WARY_EXPECT_CONTINUE_WAIT_MS", "5000")]).await;
    let app = Upstream::start(addr(&format!("{net}.2:{HTTP}")), "backend-1").await;
    let old_body: Arc<Vec<u8>> = Arc::new((0..1_000_000u32).map(|i| (i % 251) as u8).collect());
    let _old = upstream::http10(addr(&format!("{net}.2:{OLD}")), old_body.clone()).await;
    let url = format!("http://backend.default:{HTTP}");

    // Keep-alive: three requests, one connection.
    let hello = format!("{url}/hello");
    let connects = curl(
        m.web.outbound,
        &[
            "-o",
            "/dev/null",
            "-o",
            "/dev/null",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}:%{num_connects} ",
            &hello,
            &hello,
            &hello,
        ],
    )
    .await;
    assert_eq!(connects.trim(), "200:1 200:0 200:0", "{connects}");

    // A chunked upload streamed back, and a chunked response's trailers.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("chunked");
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 13) as u8 + b'a').collect();
    std::fs::write(&file, &payload).unwrap();
    let echoed = curl(
        m.web.outbound,
        &[
            "-H",
            "Transfer-Encoding: chunked",
            "--data-binary",
            &format!("@{}", file.display()),
            &format!("{url}/echo"),
        ],
    )
    .await;
    assert!(
        echoed.as_bytes() == payload,
        "the echo differs: {} bytes back",
        echoed.len()
    );
    let trailers = curl(
        m.web.outbound,
        &["-D", "-", "-H", "TE: trailers", &format!("{url}/trailers")],
    )
    .await;
    assert!(trailers.contains("part1part2"), "{trailers}");
    assert!(trailers.to_lowercase().contains("x-checksum: 42"), "{trailers}");

    // A request's trailers arrive too (curl cannot send them; hyper can).
    let sent = request_trailers_echoed(m.web.outbound, &format!("{url}/echo")).await;
    assert_eq!(sent, Some("sent-by-the-client".to_string()));

    // 100-continue: the server refuses before reading, and the body is never sent.
    let big = dir.path().join("big");
    std::fs::write(&big, vec![b'x'; 4 << 20]).unwrap();
    let refused = curl(
        m.web.outbound,
        &[
            "-i",
            "-H",
            "Expect: 100-continue",
            "--data-binary",
            &format!("@{}", big.display()),
            "-w",
            "\nuploaded=%{size_upload}",
            &format!("{url}/upload"),
        ],
    )
    .await;
    assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");
    assert!(!refused.contains("100 Continue"), "{refused}");
    // curl's own count: the client never sent a byte of the body.
    assert!(refused.ends_with("uploaded=0"), "{refused}");
    let _ = &app;
    let accepted = curl(
        m.web.outbound,
        &[
            "-i",
            "-H",
            "Expect: 100-continue",
            "-H",
            "Authorization: Bearer x",
            "--data-binary",
            &format!("@{}", big.display()),
            &format!("{url}/upload"),
        ],
    )
    .await;
    assert!(accepted.contains("HTTP/1.1 100 Continue"), "{accepted}");
    assert!(accepted.trim_end().ends_with(&(4u64 << 20).to_string()), "{accepted}");

    // An HTTP/1.0 server's close-delimited body arrives whole.
    let old = Command::new("curl")
        .args(["-sS", "--max-time", "60", "-x", &format!("http://{}", m.web.outbound)])
        .arg(format!("http://backend.default:{OLD}/"))
        .output()
        .await
        .unwrap();
    assert!(old.status.success(), "{}", String::from_utf8_lossy(&old.stderr));
    assert!(
        old.stdout == *old_body,
        "got {} of {} bytes",
        old.stdout.len(),
        old_body.len()
    );
    let _ = (&m.mesh, &m.backend);
}

/// Sends a chunked request with the trailer `x-client-trailer` to `/echo`; returns the
/// trailer the response carried back.
async fn request_trailers_echoed(proxy: SocketAddr, url: &str) -> Option<String> {
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::Frame;
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-client-trailer", "sent-by-the-client".parse().unwrap());
    let frames = futures::stream::iter([
        Ok::<_, std::convert::Infallible>(Frame::data(bytes::Bytes::from_static(b"some body"))),
        Ok(Frame::trailers(trailers)),
    ]);
    let tcp = TcpStream::connect(proxy).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::post(url)
        .header("te", "trailers")
        .header("trailer", "x-client-trailer")
        .body(StreamBody::new(frames))
        .unwrap();
    let response = sender.send_request(req).await.unwrap();
    assert_eq!(response.status(), 200);
    let collected = response.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned();
    assert_eq!(&collected.to_bytes()[..], b"some body");
    trailers?
        .get("x-client-trailer")
        .map(|v| v.to_str().unwrap().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_prior_knowledge_clients_multiplex_through_the_mesh() {
    let net = "127.0.21";
    let m = mesh(net).await;
    let _app = Upstream::start(addr(&format!("{net}.2:{HTTP}")), "backend-1").await;
    let connect_to = format!(
        "backend.default:{HTTP}:{}:{}",
        m.web.outbound.ip(),
        m.web.outbound.port()
    );
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--http2-prior-knowledge", "-i"])
        .args(["--connect-to", &connect_to])
        .arg(format!("http://backend.default:{HTTP}/hello"))
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("HTTP/2 200"),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("hello from backend-1"), "{text}");
    assert!(
        text.contains("x-seen-client-id: spiffe://cluster.local/ns/default/sa/web"),
        "{text}"
    );
    assert!(
        text.contains(&format!("x-seen-authority: backend.default:{HTTP}")),
        "{text}"
    );

    // h2load: 4 connections, up to 50 concurrent streams each.
    let out = Command::new("h2load")
        .args(["-n", "4000", "-c", "4", "-m", "50", "-T", "30"])
        .arg(format!(
            "--connect-to={}:{}",
            m.web.outbound.ip(),
            m.web.outbound.port()
        ))
        .arg(format!("http://backend.default:{HTTP}/hello"))
        .output()
        .await
        .expect("run h2load (apt install nghttp2-client)");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains("4000 succeeded, 0 failed, 0 errored"), "{report}");
    assert!(report.contains("status codes: 4000 2xx"), "{report}");
    let _ = (&m.mesh, &m.backend);
}

async fn grpc_client(proxy: SocketAddr) -> pb::echo_client::EchoClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://backend.default:{GRPC}"))
        .unwrap()
        .http2_max_header_list_size(64 * 1024)
        .connect_with_connector(ProxyConnector(proxy))
        .await
        .expect("connect to the outbound proxy");
    pb::echo_client::EchoClient::new(channel)
        .max_decoding_message_size(32 << 20)
        .max_encoding_message_size(32 << 20)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_large_messages_error_trailers_and_a_slow_streaming_reader() {
    let net = "127.0.22";
    let m = mesh(net).await;
    let (service, _server) = upstream::grpc(addr(&format!("{net}.2:{GRPC}"))).await;
    let mut client = grpc_client(m.web.outbound).await;

    for size in [5, 1 << 20, 16 << 20] {
        let answer = client
            .unary(pb::Payload { data: vec![1; size] })
            .await
            .unwrap_or_else(|e| panic!("unary of {size} bytes: {e:?}"));
        assert_eq!(answer.into_inner().bytes, size as u64);
    }

    // An error whose trailers carry 16 KiB of metadata arrives intact.
    let status = client
        .fail(pb::FailRequest {
            code: tonic::Code::ResourceExhausted as i32,
            metadata_bytes: 16 * 1024,
        })
        .await
        .expect_err("the call fails");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert_eq!(status.message(), "failed as asked");
    for i in 0..16 {
        let value = status.metadata().get(format!("x-detail-{i}").as_str());
        assert_eq!(
            value.map(|v| v.len()),
            Some(1024),
            "x-detail-{i} in {:?}",
            status.metadata()
        );
    }

    // 10,000 messages of 16 KiB (160 MiB) to a reader that pauses: the server is held
    // back by flow control, and neither proxy buffers the difference.
    let mut stream = client
        .server_stream(pb::StreamRequest {
            count: 10_000,
            size: 16 * 1024,
        })
        .await
        .unwrap()
        .into_inner();
    let mut read = 0u32;
    while let Some(message) = stream.next().await {
        assert_eq!(message.unwrap().data.len(), 16 * 1024);
        read += 1;
        if read == 1000 {
            // However long the pause, the server gets only a window ahead.
            let ahead = wait_until("the server to be stalled by flow control", || async {
                let before = service.produced.load(Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(300)).await;
                let after = service.produced.load(Ordering::Relaxed);
                (before == after).then_some(after)
            })
            .await;
            eprintln!("the server stalled at {ahead} messages with the reader at 1000");
            assert!(
                ahead < 3000,
                "the server ran {ahead} messages ahead of a reader at 1000"
            );
        }
    }
    assert_eq!(read, 10_000);
    for proxy in [&m.web, &m.backend] {
        let rss = proxy.peak_rss();
        assert!(rss < 64 << 20, "a proxy's peak RSS was {} MiB", rss >> 20);
    }
    let _ = &m.mesh;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_session_survives_twenty_configuration_pushes() {
    let net = "127.0.23";
    let m = mesh(net).await;
    let _app = Upstream::start(addr(&format!("{net}.2:{HTTP}")), "backend-1").await;
    let tcp = TcpStream::connect(m.web.outbound).await.unwrap();
    let (mut ws, response) = tokio_tungstenite::client_async(format!("ws://backend.default:{HTTP}/ws"), tcp)
        .await
        .expect("the WebSocket handshake through the mesh");
    assert_eq!(response.status(), 101);
    for push in 0..20 {
        // An unrelated service appears: a new route table, the session untouched.
        m.mesh.write(
            &format!("other-{push}.yaml"),
            &wary_tests::service(&format!("other-{push}"), 80),
        );
        let name = format!("other-{push}.default");
        m.web
            .wait_for_dump(&format!("{name} reaches the proxy"), |d| {
                d["services"]
                    .as_array()
                    .is_some_and(|s| s.iter().any(|s| s["name"] == name.as_str()))
            })
            .await;
        let text = format!("message {push}");
        ws.send(Message::text(text.clone())).await.unwrap();
        let echo = tokio::time::timeout(DEADLINE, ws.next())
            .await
            .expect("an echo in time");
        assert_eq!(echo.unwrap().unwrap().into_text().unwrap().as_str(), text);
    }
    ws.close(None).await.unwrap();
    let _ = &m.backend;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_tunnels_a_server_that_speaks_first_and_carries_a_half_close() {
    let net = "127.0.24";
    let m = mesh(net).await;
    let _db = upstream::speaks_first(addr(&format!("{net}.2:{DB}")), b"220 db ready\r\n").await;
    let _outside = upstream::speaks_first(addr(&format!("{net}.9:7000")), b"outside\r\n").await;

    for (target, greeting) in [
        (format!("backend.default:{DB}"), "220 db ready\r\n"),
        (format!("{net}.9:7000"), "outside\r\n"),
    ] {
        let mut tcp = TcpStream::connect(m.web.outbound).await.unwrap();
        tcp.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let head = read_until(&mut tcp, b"\r\n\r\n").await;
        assert!(head.starts_with("HTTP/1.1 200"), "CONNECT {target}: {head}");
        let opened = Instant::now();
        let hello = read_until(&mut tcp, greeting.as_bytes()).await;
        let waited = opened.elapsed();
        assert_eq!(hello, greeting);
        // The figure is for the record; a tunnel has no detection to wait out.
        eprintln!("{target}: greeting {waited:?} after the tunnel opened");

        tcp.write_all(b"ping").await.unwrap();
        assert_eq!(read_until(&mut tcp, b"ping").await, "ping");
        // Half-close: the server sees the end of our stream and still answers.
        tcp.shutdown().await.unwrap();
        let mut rest = String::new();
        tokio::time::timeout(DEADLINE, tcp.read_to_string(&mut rest))
            .await
            .expect("the server's last words in time")
            .unwrap();
        assert_eq!(rest, "bye");
    }
    let metrics = m.web.admin_get("/metrics").await;
    assert!(
        metrics.contains("wary_proxy_requests_total{direction=\"outbound\",service=\"passthrough\"} 1"),
        "{metrics}"
    );
    let _ = (&m.mesh, &m.backend);
}

async fn read_until(tcp: &mut TcpStream, end: &[u8]) -> String {
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    tokio::time::timeout(DEADLINE, async {
        while !got.ends_with(end) {
            match tcp.read(&mut byte).await {
                Ok(0) | Err(_) => break,
                Ok(_) => got.push(byte[0]),
            }
        }
    })
    .await
    .expect("an answer in time");
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_and_ambiguous_lengths_never_reach_the_server_and_a_half_close_is_no_cancellation() {
    let net = "127.0.25";
    let m = mesh(net).await;
    let app = Upstream::start(addr(&format!("{net}.2:{HTTP}")), "backend-1").await;
    let host = format!("backend.default:{HTTP}");

    // Content-Length and Transfer-Encoding, then a second request in the same bytes.
    let attack = format!(
        "POST /first HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n\
         0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: {host}\r\n\r\n"
    );
    let answer = exchange(m.web.outbound, attack.as_bytes(), false).await;
    assert_eq!(
        answer.matches("HTTP/1.1 ").count(),
        1,
        "one answer, then close: {answer}"
    );
    // Conflicting lengths are refused outright.
    let conflicting =
        format!("POST /second HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!");
    let answer = exchange(m.web.outbound, conflicting.as_bytes(), false).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");

    // A client that shuts down its side after the request still gets the answer.
    let request = format!("GET /after-half-close HTTP/1.1\r\nHost: {host}\r\n\r\n");
    let answer = exchange(m.web.outbound, request.as_bytes(), true).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("hello from backend-1"), "{answer}");

    // A request whose destination is the proxy itself comes back marked: 508, once.
    let own = format!("http://{}/loop", m.web.outbound);
    let looped = curl(m.web.outbound, &["-i", &own]).await;
    assert!(looped.starts_with("HTTP/1.1 508"), "{looped}");
    assert!(looped.contains("wary-error: loop-detected"), "{looped}");
    // Headers beyond what the mesh carries: 431 for this client alone.
    let huge = format!("x-big: {}", "a".repeat(70 * 1024));
    let refused = curl(m.web.outbound, &["-i", "-H", &huge, &format!("http://{host}/")]).await;
    assert!(
        refused.starts_with("HTTP/1.1 431"),
        "{}",
        &refused[..200.min(refused.len())]
    );
    // A port the service does not have is named as such.
    let wrong = curl(m.web.outbound, &["-i", "http://backend.default:4191/"]).await;
    assert!(
        wrong.starts_with("HTTP/1.1 404") && wrong.contains("has no port 4191"),
        "{wrong}"
    );

    let seen = app.seen.requests.lock().unwrap().clone();
    assert!(
        !seen.iter().any(|r| r.contains("smuggled") || r.contains("second")),
        "{seen:?}"
    );
    assert!(seen.contains(&"GET /after-half-close".to_string()), "{seen:?}");
    let _ = (&m.mesh, &m.backend);
}

/// Writes `bytes` to a new connection to `proxy` (then shuts its side down if
/// `half_close`) and reads until the proxy closes the connection.
async fn exchange(proxy: SocketAddr, bytes: &[u8], half_close: bool) -> String {
    let mut tcp = TcpStream::connect(proxy).await.unwrap();
    tcp.write_all(bytes).await.unwrap();
    if half_close {
        tcp.shutdown().await.unwrap();
    }
    let mut answer = Vec::new();
    tokio::time::timeout(DEADLINE, tcp.read_to_end(&mut answer))
        .await
        .expect("the proxy answers and closes")
        .unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gibibyte_each_way_in_bounded_memory() {
    let net = "127.0.26";
    let m = mesh(net).await;
    let app = Upstream::start(addr(&format!("{net}.2:{HTTP}")), "backend-1").await;
    const GIB: u64 = 1 << 30;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gibibyte");
    // Sparse: reads as zeros, costs no disk.
    std::fs::File::create(&file).unwrap().set_len(GIB).unwrap();

    let started = Instant::now();
    let up = curl(
        m.web.outbound,
        &[
            "--max-time",
            "300",
            "-T",
            &file.display().to_string(),
            &format!("http://backend.default:{HTTP}/sink"),
        ],
    )
    .await;
    assert_eq!(up.trim(), GIB.to_string());
    assert_eq!(app.seen.body_bytes.load(Ordering::Relaxed), GIB);
    let up_time = started.elapsed();

    let started = Instant::now();
    let down = curl(
        m.web.outbound,
        &[
            "--max-time",
            "300",
            "-o",
            "/dev/null",
            "-w",
            "%{size_download}",
            &format!("http://backend.default:{HTTP}/bytes?n={GIB}"),
        ],
    )
    .await;
    assert_eq!(down.trim(), GIB.to_string());
    eprintln!("1 GiB up in {up_time:?}, down in {:?}", started.elapsed());
    for proxy in [&m.web, &m.backend] {
        let rss = proxy.peak_rss();
        eprintln!("peak RSS {} MiB", rss >> 20);
        assert!(rss < 64 << 20, "a proxy's peak RSS was {} MiB", rss >> 20);
    }
    let _ = &m.mesh;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_fails_readiness_keeps_carrying_the_apps_traffic_and_exits_once_it_drains() {
    let net = "127.0.27";
    let mut m = mesh(net).await;
    let app = wary_tests::App::start(addr(&format!("{net}.2:{HTTP}")), "backend-1").await;
    // Long enough that the first request is still in flight after SIGTERM, the
    // readiness check and the second request have all happened.
    app.delay_ms.store(4000, Ordering::Relaxed);
    let url = format!("http://backend.default:{HTTP}/slow");
    let outbound = m.web.outbound;
    let in_flight = tokio::spawn({
        let url = url.clone();
        async move { wary_tests::curl_via(outbound, &url, &[]).await }
    });
    wait_until("the first request reaches the app", || async {
        (app.served.load(Ordering::Relaxed) >= 1).then_some(())
    })
    .await;

    let started = Instant::now();
    m.web.terminate().await;
    wait_until("/ready fails", || async {
        let ready = m.web.admin_get("/ready").await;
        ready.contains("shutting down").then_some(())
    })
    .await;
    // The app, shutting down too, still calls out.
    let (status, text) = wary_tests::curl_via(outbound, &url, &[]).await;
    assert_eq!(status, 200, "a new request while draining: {text}");
    let (status, text) = in_flight.await.unwrap();
    assert_eq!(status, 200, "the in-flight request: {text}");
    // Both clients are gone: the proxy exits well before the 30 s grace period.
    let exit = m.web.wait_exit().await;
    assert!(exit.success(), "{exit:?}");
    eprintln!("exited {:?} after SIGTERM", started.elapsed());
    m.web
        .logs
        .wait_for(&["proxy stopped", "the app's traffic drained"])
        .await;
    let _ = (&m.mesh, &m.backend);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_grpc_call_gets_permission_denied_and_a_denied_tcp_stream_is_closed() {
    let net = "127.0.28";
    let m = mesh(net).await;
    let (_service, _server) = upstream::grpc(addr(&format!("{net}.2:{GRPC}"))).await;
    let _db = upstream::speaks_first(addr(&format!("{net}.2:{DB}")), b"220 db ready\r\n").await;
    let mut client = grpc_client(m.web.outbound).await;
    assert!(client.unary(pb::Payload { data: vec![1; 5] }).await.is_ok());

    m.mesh.write(
        "deny.yaml",
        "apiVersion: policy.wary.io/v1alpha1
kind: AuthorizationPolicy
metadata:
  name: no-web
spec:
  targetRef: {kind: Service, name: backend}
  action: DENY
  rules:
  - from:
    - source:
        principals: [\"spiffe://cluster.local/ns/default/sa/web\"]
",
    );
    let status = wait_until("the DENY applies to gRPC", || {
        let mut client = client.clone();
        async move {
            client
                .unary(pb::Payload { data: vec![1; 5] })
                .await
                .err()
                .filter(|s| s.code() == tonic::Code::PermissionDenied)
        }
    })
    .await;
    assert!(status.message().contains("denied by no-web.default"), "{status:?}");

    // An opaque stream: the CONNECT is refused (the connection stays HTTP, RFC 9110
    // §9.3.6) and the server never greets the client.
    let mut tcp = TcpStream::connect(m.web.outbound).await.unwrap();
    let target = format!("backend.default:{DB}");
    tcp.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let head = read_until(&mut tcp, b"\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    let body = read_until(&mut tcp, b"denied by no-web.default").await;
    assert!(body.contains("web may not open a TCP stream"), "{body}");
    assert!(!body.contains("220 db ready"), "{body}");
    let _ = &m.backend;
}

#[tokio::test]
async fn an_identity_header_from_a_peer_is_replaced_by_the_verified_one() {
    use http_body_util::{BodyExt, Empty};

    let net = "127.0.29";
    let m = mesh(net).await;
    let app = Upstream::start(addr(&format!("{net}.2:{HTTP}")), "backend-1").await;
    // A peer holding web's real certificate claims to be admin in the mesh's own header.
    let backend_id = "spiffe://cluster.local/ns/default/sa/backend";
    let mut sender = m._cp.peer_h2("web-1", backend_id, m.backend.inbound).await;
    let req = http::Request::get(format!("http://backend.default:{HTTP}/hello"))
        .header("wary-dst-port", HTTP.to_string())
        .header("wary-client-id", "spiffe://cluster.local/ns/default/sa/admin")
        .body(Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = sender.send_request(req).await.unwrap();
    assert_eq!(response.status(), 200);
    let seen: Vec<_> = response.headers().get_all("x-seen-client-id").iter().cloned().collect();
    assert_eq!(seen, ["spiffe://cluster.local/ns/default/sa/web"], "what the app saw");
    let _ = response.into_body().collect().await.unwrap();
    let _ = (&app, &m.web);
}
