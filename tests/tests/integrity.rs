//! What the app receives is what the client sent, from whom the mesh says: a tunnel
//! to a port not declared opaque carries only TLS or HTTP that the inbound authorizes
//! and sanitizes request by request; a peer cannot switch a connection to h2c past
//! authorization; a body on any method arrives byte for byte; gRPC trailers arrive
//! whole or the call fails saying why; a request the app never processed is sent again
//! whatever its method, and only then.
//!
//! Every test has its own loopback network (127.0.70.x, 127.0.71.x...): `.1` is the
//! client workload `web-1`, `.2` the server workload `backend-1`.

use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Empty;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::Command;
use wary_tests::upstream::{self, RawRequest, Upstream};
use wary_tests::{ControlPlane, DEADLINE, MeshDir, Proxy, wait_until};

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// The backend's ports: a recording HTTP/1.1 server, an HTTP/1.1 + h2c server, and a
/// TLS echo server, none declared opaque.
const RAW: u16 = 9090;
const H2: u16 = 9093;
const TLS: u16 = 9443;
const GRPC: u16 = 9091;

const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";
const ADMIN: &str = "spiffe://cluster.local/ns/default/sa/admin";

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
  - {{name: raw, port: {RAW}, targetPort: raw}}
  - {{name: h2, port: {H2}, targetPort: h2}}
  - {{name: tls, port: {TLS}, targetPort: tls}}
  - {{name: grpc, port: {GRPC}, targetPort: grpc}}
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
  - {{name: raw, port: {RAW}}}
  - {{name: h2, port: {H2}}}
  - {{name: tls, port: {TLS}}}
  - {{name: grpc, port: {GRPC}}}
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

struct Mesh {
    mesh: MeshDir,
    cp: ControlPlane,
    web: Proxy,
    backend: Proxy,
}

async fn mesh(net: &str) -> Mesh {
    let mesh = MeshDir::new();
    mesh.write("mesh.yaml", &mesh_config(net));
    let cp = ControlPlane::start(&mesh).await;
    let web = Proxy::start_at(&cp, "web-1", addr(&format!("{net}.1:4143"))).await;
    let backend = Proxy::start_at(&cp, "backend-1", addr(&format!("{net}.2:4143"))).await;
    web.wait_ready().await;
    backend.wait_ready().await;
    Mesh { mesh, cp, web, backend }
}

/// Opens `CONNECT target` through the proxy at `proxy`; returns the tunnel.
async fn connect(proxy: SocketAddr, target: &str) -> TcpStream {
    let mut tcp = TcpStream::connect(proxy).await.unwrap();
    tcp.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut tcp).await;
    assert!(head.starts_with("HTTP/1.1 200"), "CONNECT {target}: {head}");
    tcp
}

/// Reads byte by byte (so nothing after it is consumed) up to and including `end`.
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

/// Reads one response head.
async fn read_head(tcp: &mut TcpStream) -> String {
    read_until(tcp, b"\r\n\r\n").await
}

/// Reads one line, with its CRLF.
async fn read_line(tcp: &mut TcpStream) -> String {
    read_until(tcp, b"\r\n").await
}

/// Sends one request into a tunnel and reads its answer: status line, head, body.
async fn exchange_in(tunnel: &mut TcpStream, request: &str) -> (String, String) {
    tunnel.write_all(request.as_bytes()).await.unwrap();
    let head = read_head(tunnel).await;
    if head.to_lowercase().contains("transfer-encoding: chunked") {
        let mut body = Vec::new();
        loop {
            let size = usize::from_str_radix(read_line(tunnel).await.trim(), 16).expect("a chunk size");
            if size == 0 {
                read_line(tunnel).await;
                break;
            }
            let mut chunk = vec![0u8; size + 2];
            tunnel.read_exact(&mut chunk).await.expect("a chunk");
            body.extend_from_slice(&chunk[..size]);
        }
        return (head, String::from_utf8_lossy(&body).into_owned());
    }
    let length = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    tokio::time::timeout(DEADLINE, tunnel.read_exact(&mut body))
        .await
        .expect("a body in time")
        .expect("the body");
    (head, String::from_utf8_lossy(&body).into_owned())
}

/// The `wary-client-id` values in a recorded request head, whatever their case.
fn client_ids(request: &RawRequest) -> Vec<String> {
    request
        .head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| k.trim().eq_ignore_ascii_case("wary-client-id"))
        .map(|(_, v)| v.trim().to_string())
        .collect()
}

fn allow_paths(paths: &str) -> String {
    format!(
        "apiVersion: policy.wary.io/v1alpha1
kind: AuthorizationPolicy
metadata:
  name: web-paths
spec:
  targetRef: {{kind: Service, name: backend}}
  action: ALLOW
  rules:
  - from:
    - source:
        principals: [\"{WEB}\"]
    to:
    - operation:
        paths: [{paths}]
"
    )
}

/// Requests with methods the old first-bytes heuristic did not know, each with a
/// forged identity header in two spellings.
fn tunnelled_requests(host: &str) -> Vec<(String, String)> {
    ["PROPFIND", "PURGE", "QUERY", "MKCOL", "get", "GET"]
        .iter()
        .enumerate()
        .map(|(i, method)| {
            let path = format!("/allowed/{i}");
            let request = format!(
                "{method} {path} HTTP/1.1\r\nHost: {host}\r\nwary-client-id: {ADMIN}\r\nWary_Client_Id: {ADMIN}\r\n\
                 Content-Length: 0\r\n\r\n"
            );
            (path, request)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_to_a_port_not_declared_opaque_carries_only_authorized_http_or_tls() {
    let net = "127.0.70";
    let m = mesh(net).await;
    let (recorded, _raw) = upstream::recorder(addr(&format!("{net}.2:{RAW}"))).await;
    let (tls_client, _tls) = tls_echo(addr(&format!("{net}.2:{TLS}"))).await;
    let target = format!("backend.default:{RAW}");

    // Under the default all-authenticated policy: every request in the tunnel reaches
    // the app, each with web's verified identity and no other.
    let mut tunnel = connect(m.web.outbound, &target).await;
    for (path, request) in tunnelled_requests(&target) {
        let (head, _) = exchange_in(&mut tunnel, &request).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{path}: {head}");
    }
    {
        let seen = recorded.lock().unwrap();
        assert_eq!(seen.len(), 6, "{seen:#?}");
        for request in seen.iter() {
            assert_eq!(client_ids(request), [WEB], "{request:#?}");
            assert!(!request.head.to_lowercase().contains("wary_client_id"), "{request:#?}");
            assert!(!request.head.contains(ADMIN), "{request:#?}");
        }
        let methods: Vec<&str> = seen.iter().map(|r| r.head.split(' ').next().unwrap()).collect();
        assert_eq!(methods, ["PROPFIND", "PURGE", "QUERY", "MKCOL", "get", "GET"]);
    }

    // With path rules: each request in a tunnel is judged on its own.
    m.mesh.write("allow.yaml", &allow_paths("\"/allowed/*\""));
    wait_until("the path rule applies", || async {
        let (status, _) = wary_tests::curl_via(m.web.outbound, &format!("http://{target}/secret"), &[]).await;
        (status == 403).then_some(())
    })
    .await;
    recorded.lock().unwrap().clear();
    let mut tunnel = connect(m.web.outbound, &target).await;
    let (head, _) = exchange_in(&mut tunnel, &tunnelled_requests(&target)[0].1).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let secret =
        format!("purge /secret HTTP/1.1\r\nHost: {target}\r\nwary-client-id: {ADMIN}\r\nContent-Length: 0\r\n\r\n");
    let (head, body) = exchange_in(&mut tunnel, &secret).await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    assert!(head.contains("wary-error: forbidden"), "{head}");
    assert!(body.contains(&format!("{WEB} may not purge /secret")), "{body}");
    let (head, _) = exchange_in(&mut tunnel, &tunnelled_requests(&target)[5].1).await;
    assert!(
        head.starts_with("HTTP/1.1 200"),
        "the tunnel carries on after a refusal: {head}"
    );
    // Pipelined in one write: each judged on its own.
    let pipelined = format!(
        "GET /allowed/p1 HTTP/1.1\r\nHost: {target}\r\nwary-client-id: {ADMIN}\r\n\r\n\
         GET /secret HTTP/1.1\r\nHost: {target}\r\n\r\nGET /allowed/p2 HTTP/1.1\r\nHost: {target}\r\n\r\n"
    );
    tunnel.write_all(pipelined.as_bytes()).await.unwrap();
    for want in ["HTTP/1.1 200", "HTTP/1.1 403", "HTTP/1.1 200"] {
        let (head, _) = exchange_in(&mut tunnel, "").await;
        assert!(head.starts_with(want), "pipelined: {head}");
    }
    // The app closes its connection: the tunnel's next request gets a new one.
    for path in ["/allowed/close", "/allowed/after-close"] {
        let request = format!("GET {path} HTTP/1.1\r\nHost: {target}\r\n\r\n");
        let (head, _) = exchange_in(&mut tunnel, &request).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{path}: {head}");
    }
    {
        let seen = recorded.lock().unwrap();
        let paths: Vec<&str> = seen.iter().map(|r| r.head.split(' ').nth(1).unwrap()).collect();
        assert_eq!(
            paths,
            [
                "/allowed/0",
                "/allowed/5",
                "/allowed/p1",
                "/allowed/p2",
                "/allowed/close",
                "/allowed/after-close"
            ],
            "{seen:#?}"
        );
        assert!(seen.iter().all(|r| client_ids(r) == [WEB]), "{seen:#?}");
    }
    m.mesh.remove("allow.yaml");

    // TLS, as an app through HTTPS_PROXY: carried as bytes to a port not declared opaque.
    wait_until("the path rule is gone", || async {
        let (status, _) = wary_tests::curl_via(m.web.outbound, &format!("http://{target}/secret"), &[]).await;
        (status == 200).then_some(())
    })
    .await;
    let tunnel = connect(m.web.outbound, &format!("backend.default:{TLS}")).await;
    let mut tls = tls_client
        .connect(rustls::pki_types::ServerName::try_from("tls.test").unwrap(), tunnel)
        .await
        .expect("a TLS handshake through the tunnel");
    tls.write_all(b"secret bytes").await.unwrap();
    let mut echoed = [0u8; 12];
    tokio::time::timeout(DEADLINE, tls.read_exact(&mut echoed))
        .await
        .expect("the echo in time")
        .unwrap();
    assert_eq!(&echoed, b"secret bytes");

    // Anything else is refused, naming why, before a byte reaches the app: a Redis
    // command, and a TLS record type byte followed by HTTP.
    let before = recorded.lock().unwrap().len();
    let smuggled = format!("\x16GET /x HTTP/1.1\r\nHost: {target}\r\nwary-client-id: {ADMIN}\r\n\r\n");
    for bytes in [&b"*1\r\n$4\r\nPING\r\n"[..], smuggled.as_bytes()] {
        let mut tunnel = connect(m.web.outbound, &target).await;
        tunnel.write_all(bytes).await.unwrap();
        let mut answer = String::new();
        tokio::time::timeout(DEADLINE, tunnel.read_to_string(&mut answer))
            .await
            .expect("refused and closed in time")
            .unwrap();
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(answer.contains("wary-error: not-http"), "{answer}");
        assert!(answer.contains("declare the port opaque"), "{answer}");
    }
    assert_eq!(recorded.lock().unwrap().len(), before);

    let metrics = m.backend.admin_get("/metrics").await;
    assert!(
        metrics.contains("wary_proxy_inbound_authorizations_total{decision=\"deny\",policy=\"not-http-in-tunnel\"} 2"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_cannot_upgrade_to_h2c_and_a_websocket_is_authorized() {
    let net = "127.0.71";
    let m = mesh(net).await;
    let app = Upstream::start(addr(&format!("{net}.2:{H2}")), "backend-1").await;
    // A peer holding web's real certificate, talking HTTP/2 straight to the backend's inbound.
    let backend_id = "spiffe://cluster.local/ns/default/sa/backend";
    let mut peer = m.cp.peer_h2("web-1", backend_id, m.backend.inbound).await;
    let upgrade = |protocol: &str, path: &str| {
        let mut req = http::Request::new(Empty::<bytes::Bytes>::new());
        *req.method_mut() = http::Method::CONNECT;
        *req.uri_mut() = format!("backend.default:{H2}").parse().unwrap();
        let h = req.headers_mut();
        h.insert("wary-dst-port", H2.into());
        h.insert("wary-orig-proto", "h1-upgrade".parse().unwrap());
        h.insert("wary-upgrade", protocol.parse().unwrap());
        h.insert("wary-method", "GET".parse().unwrap());
        h.insert("wary-path", path.parse().unwrap());
        h.insert("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA".parse().unwrap());
        h.insert("wary-client-id", ADMIN.parse().unwrap());
        req
    };
    for protocol in ["h2c", "H2C", "websocket, h2c", "TLS/1.2"] {
        let response = peer.send_request(upgrade(protocol, "/a")).await.unwrap();
        assert_eq!(response.status(), 501, "{protocol}");
        assert_eq!(response.headers()["wary-error"], "upgrade-refused", "{protocol}");
    }
    assert!(app.seen.requests.lock().unwrap().is_empty(), "the app saw an upgrade");

    // A WebSocket upgrade is still carried, and authorized: path rules apply to it.
    let ws_url = format!("ws://backend.default:{H2}/ws");
    let (mut ws, _) = websocket(m.web.outbound, &ws_url)
        .await
        .expect("a WebSocket through the mesh");
    use futures::{SinkExt, StreamExt};
    ws.send(tokio_tungstenite::tungstenite::Message::text("hi"))
        .await
        .unwrap();
    let echoed = tokio::time::timeout(DEADLINE, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(echoed.into_text().unwrap().as_str(), "hi");
    m.mesh.write("allow.yaml", &allow_paths("\"/other\""));
    let refused = wait_until("the path rule applies to upgrades", || async {
        websocket(m.web.outbound, &ws_url).await.err()
    })
    .await;
    assert!(refused.contains("403"), "{refused}");
}

/// Opens a WebSocket to `url` through the proxy at `proxy`; `Err` names the refusal.
async fn websocket(
    proxy: SocketAddr,
    url: &str,
) -> Result<
    (
        tokio_tungstenite::WebSocketStream<TcpStream>,
        tokio_tungstenite::tungstenite::handshake::client::Response,
    ),
    String,
> {
    let tcp = TcpStream::connect(proxy).await.unwrap();
    tokio_tungstenite::client_async(url, tcp)
        .await
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_on_any_method_arrives_byte_for_byte_whatever_its_framing() {
    let net = "127.0.72";
    let m = mesh(net).await;
    let (recorded, _raw) = upstream::recorder(addr(&format!("{net}.2:{RAW}"))).await;
    let _h2_app = Upstream::start(addr(&format!("{net}.2:{H2}")), "backend-1").await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("body");
    let body: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&file, &body).unwrap();
    let data = format!("@{}", file.display());

    for method in ["GET", "DELETE", "OPTIONS"] {
        for framing in ["length", "chunked"] {
            recorded.lock().unwrap().clear();
            let mut args = vec![
                "-X",
                method,
                "--data-binary",
                &data,
                "-H",
                "Content-Type: application/octet-stream",
            ];
            if framing == "chunked" {
                args.extend(["-H", "Transfer-Encoding: chunked"]);
            }
            // HTTP/1 → mesh → HTTP/1.
            let url = format!("http://backend.default:{RAW}/body");
            let echoed = curl_bytes(m.web.outbound, &args, &url).await;
            let seen = recorded.lock().unwrap().clone();
            assert_eq!(seen.len(), 1, "{method} {framing}");
            assert!(
                seen[0].head.starts_with(&format!("{method} /body ")),
                "{:?}",
                seen[0].head
            );
            assert_ne!(
                seen[0].framing, "none",
                "{method} {framing}: the app got no body framing"
            );
            assert!(
                seen[0].body == body,
                "{method} {framing}: the app got {} bytes",
                seen[0].body.len()
            );
            assert!(
                echoed == body,
                "{method} {framing}: the client got {} bytes back",
                echoed.len()
            );

            // HTTP/2 → mesh → HTTP/2.
            let url = format!("http://backend.default:{H2}/echo");
            let mut h2_args = args.clone();
            h2_args.push("--http2-prior-knowledge");
            let echoed = curl_bytes(m.web.outbound, &h2_args, &url).await;
            assert!(
                echoed == body,
                "{method} {framing} over h2: {} bytes back",
                echoed.len()
            );
        }
    }
    // Request trailers to an HTTP/1 app: declared ones arrive, an undeclared one (which
    // HTTP/1 cannot carry) fails the request instead of vanishing.
    for (declare, want) in [("Trailer: x-t\r\n", "HTTP/1.1 200"), ("", "HTTP/1.1 502")] {
        recorded.lock().unwrap().clear();
        let mut tcp = TcpStream::connect(m.web.outbound).await.unwrap();
        let request = format!(
            "POST /trailers HTTP/1.1\r\nHost: backend.default:{RAW}\r\n{declare}Transfer-Encoding: chunked\r\n\r\n\
             5\r\nhello\r\n0\r\nx-t: 1\r\n\r\n"
        );
        tcp.write_all(request.as_bytes()).await.unwrap();
        let head = read_head(&mut tcp).await;
        assert!(head.starts_with(want), "{declare:?}: {head}");
        let seen = recorded.lock().unwrap().len();
        assert_eq!(
            seen,
            usize::from(!declare.is_empty()),
            "{declare:?}: the app got a whole request, or none"
        );
    }
    // A GET without a body still arrives as one.
    recorded.lock().unwrap().clear();
    curl_bytes(m.web.outbound, &[], &format!("http://backend.default:{RAW}/plain")).await;
    let seen = recorded.lock().unwrap().clone();
    assert_eq!(seen[0].framing, "none", "{:?}", seen[0].head);
    let _ = (&m.mesh, &m.backend);
}

/// curl through `proxy` (as `HTTP_PROXY`), `args` then `url`; stdout's bytes.
async fn curl_bytes(proxy: SocketAddr, args: &[&str], url: &str) -> Vec<u8> {
    let out = Command::new("curl")
        .args(["-sS", "--fail", "--max-time", "60", "-x", &format!("http://{proxy}")])
        .args(args)
        .arg(url)
        .output()
        .await
        .expect("run curl");
    assert!(
        out.status.success(),
        "curl {args:?} {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A TLS echo server for `tls.test` with a self-signed certificate, and a client that
/// trusts it.
async fn tls_echo(at: SocketAddr) -> (tokio_rustls::TlsConnector, tokio::task::JoinHandle<()>) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["tls.test".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let der = cert.der().clone();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![der.clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = tokio::net::TcpListener::bind(at).await.unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let (mut r, mut w) = tokio::io::split(tls);
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    (tokio_rustls::TlsConnector::from(Arc::new(client)), task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posts_an_h2_app_never_processed_are_sent_again_and_each_reaches_it_once() {
    use tokio::io::AsyncBufReadExt;
    let net = "127.0.73";
    let m = mesh(net).await;
    // The app: GOAWAY every 20 requests, with streams in flight above its last id.
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/goaway_server.py");
    let mut server = Command::new(wary_tests::python())
        .args([script, &format!("{net}.2"), &H2.to_string(), "20"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the HTTP/2 server (python h2, installed by scripts/test)");
    let mut lines = tokio::io::BufReader::new(server.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(DEADLINE, lines.next_line())
        .await
        .expect("the server starts");
    assert_eq!(first.unwrap().as_deref(), Some("listening"));
    let log = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let logger = tokio::spawn({
        let log = log.clone();
        async move {
            while let Ok(Some(line)) = lines.next_line().await {
                log.lock().unwrap().push(line);
            }
        }
    });

    // An HTTP/2 client: 200 POSTs a second for 30 s, each body its own id.
    let tcp = TcpStream::connect(m.web.outbound).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let post = |path: &str, id: String| {
        let mut req = http::Request::new(http_body_util::Full::new(bytes::Bytes::from(id)));
        *req.method_mut() = http::Method::POST;
        *req.uri_mut() = format!("http://backend.default:{H2}{path}").parse().unwrap();
        req
    };
    const POSTS: usize = 6000;
    let mut interval = tokio::time::interval(std::time::Duration::from_millis(5));
    // A stall on a busy machine is not made up with a burst.
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut calls = Vec::with_capacity(POSTS);
    for id in 0..POSTS {
        interval.tick().await;
        let (mut sender, req) = (sender.clone(), post("/post", id.to_string()));
        calls.push(tokio::spawn(async move {
            let answer = tokio::time::timeout(DEADLINE, async {
                sender.ready().await.map_err(|e| e.to_string())?;
                sender.send_request(req).await.map_err(|e| e.to_string())
            })
            .await
            .map_err(|_| "no answer in time".to_string())?;
            answer.map(|r| (r.status(), r.headers().get("wary-attempts").cloned()))
        }));
    }
    let mut failed = Vec::new();
    let mut retried = 0;
    for (id, call) in calls.into_iter().enumerate() {
        match call.await.unwrap() {
            Ok((status, _)) if status != 200 => failed.push(format!("{id}: {status}")),
            Ok((_, attempts)) => retried += usize::from(attempts.is_some_and(|a| a != "1")),
            Err(e) => failed.push(format!("{id}: {e}")),
        }
    }
    let goaways = || {
        log.lock()
            .unwrap()
            .iter()
            .filter(|l| l.starts_with("GOAWAY") && !l.ends_with("in_flight=0"))
            .count()
    };
    eprintln!(
        "{POSTS} POSTs: {} failed, {retried} retried; {} GOAWAYs with streams in flight",
        failed.len(),
        goaways()
    );
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(20)]
    );

    // A POST the app received and then reset is not sent again.
    let mut s = sender.clone();
    s.ready().await.unwrap();
    let response = s.send_request(post("/reset", "reset-1".into())).await.unwrap();
    assert_eq!(response.status(), 502);
    wait_until("the server's log has every POST", || async {
        (log.lock().unwrap().iter().filter(|l| l.starts_with("POST ")).count() > POSTS).then_some(())
    })
    .await;
    let log = log.lock().unwrap().clone();
    let mut seen = std::collections::HashMap::<&str, usize>::new();
    for line in log.iter().filter_map(|l| l.strip_prefix("POST ")) {
        *seen.entry(line).or_default() += 1;
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "processed more than once: {twice:?}");
    let missing: Vec<usize> = (0..POSTS)
        .filter(|id| !seen.contains_key(id.to_string().as_str()))
        .collect();
    assert!(missing.is_empty(), "never processed: {missing:?}");
    assert_eq!(seen.get("reset-1"), Some(&1));
    // The test proves something only if the app did leave streams unprocessed.
    assert!(
        log.iter()
            .any(|l| l.starts_with("GOAWAY") && !l.ends_with("in_flight=0")),
        "no GOAWAY left a stream in flight"
    );
    let metrics = m.backend.admin_get("/metrics").await;
    let refused: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("wary_proxy_inbound_refused_streams_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    assert!(
        refused > 0.0,
        "the app's refusals reached the peer as REFUSED_STREAM: {metrics}"
    );
    logger.abort();
    let _ = (&m.mesh, &m.web);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_trailers_arrive_whole_or_the_call_fails_saying_why() {
    use futures::StreamExt;
    use wary_tests::upstream::pb;
    let net = "127.0.74";
    let m = mesh(net).await;
    let (_service, _server) = upstream::grpc(addr(&format!("{net}.2:{GRPC}"))).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://backend.default:{GRPC}"))
        .unwrap()
        .http2_max_header_list_size(4 << 20)
        .connect_with_connector(wary_tests::ProxyConnector(m.web.outbound))
        .await
        .unwrap();
    let mut client = pb::echo_client::EchoClient::new(channel);
    let fail = |kib: u32| pb::FailRequest {
        code: tonic::Code::NotFound as i32,
        metadata_bytes: kib * 1024,
    };
    // The status after a message: HTTP/2 trailers.
    let after_message = |mut client: pb::echo_client::EchoClient<_>, kib| async move {
        let mut stream = client
            .fail_after_message(fail(kib))
            .await
            .expect("the call starts")
            .into_inner();
        let first = stream.next().await.expect("a message").expect("the message");
        assert_eq!(first.data.len(), 16);
        stream.next().await.expect("the status").expect_err("the call fails")
    };
    for kib in [1, 16, 64] {
        // As trailers after a message, and as a trailers-only answer (headers).
        let trailers = after_message(client.clone(), kib).await;
        let trailers_only = client.fail(fail(kib)).await.expect_err("the call fails as asked");
        for (how, status) in [("trailers", trailers), ("trailers-only", trailers_only)] {
            assert_eq!(status.code(), tonic::Code::NotFound, "{kib} KiB {how}: {status:?}");
            assert_eq!(status.message(), "failed as asked");
            let details: Vec<_> = status
                .metadata()
                .iter()
                .filter_map(|kv| match kv {
                    tonic::metadata::KeyAndValueRef::Ascii(k, v) if k.as_str().starts_with("x-detail-") => {
                        Some(v.len())
                    }
                    _ => None,
                })
                .collect();
            assert_eq!(
                details.len(),
                kib as usize,
                "{kib} KiB {how}: every metadata entry arrives"
            );
            assert!(details.iter().all(|len| *len == 1024), "{kib} KiB {how}: each whole");
        }
    }
    // 1 MiB: h2 would deliver the trailers cut short; the mesh fails the call instead.
    let status = after_message(client.clone(), 1024).await;
    assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
    assert!(status.message().contains("the trailers take at least"), "{status:?}");
    assert!(
        status.message().contains("the mesh carries at most 131072"),
        "{status:?}"
    );
    assert!(
        !status.metadata().keys().any(|k| format!("{k:?}").contains("x-detail")),
        "no part of the app's trailers arrives: {status:?}"
    );
    // As a trailers-only answer (a header block over what h2 decodes): failed too.
    let status = client.fail(fail(1024)).await.expect_err("the call fails");
    assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
    assert!(status.message().contains("1048576"), "{status:?}");
    let _ = (&m.mesh, &m.backend);
}

/// The header lines of a head, without the start line, as sent.
fn header_lines(head: &str) -> Vec<&str> {
    head.split("\r\n").skip(1).filter(|l| !l.is_empty()).collect()
}

/// Reads one response (head and `Content-Length` body) off `tcp`: its head.
async fn read_response(tcp: &mut TcpStream) -> String {
    let head = read_head(tcp).await;
    let length = header_lines(&head)
        .iter()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .expect("a content-length");
    let mut body = vec![0u8; length];
    tokio::time::timeout(DEADLINE, tcp.read_exact(&mut body))
        .await
        .expect("a body in time")
        .expect("the body");
    head
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_names_keep_their_case_both_ways_through_the_mesh_and_outside_it() {
    let net = "127.0.75";
    let m = mesh(net).await;
    let (recorded, _raw) = upstream::recorder(addr(&format!("{net}.2:{RAW}"))).await;
    // An HTTP/1 server outside the mesh, reached through the outbound's passthrough.
    let (outside, _outside) = upstream::recorder(addr(&format!("{net}.3:{RAW}"))).await;

    for (authority, seen) in [
        (format!("backend.default:{RAW}"), &recorded),
        (format!("{net}.3:{RAW}"), &outside),
    ] {
        seen.lock().unwrap().clear();
        let mut tcp = TcpStream::connect(m.web.outbound).await.unwrap();
        // Two requests pipelined: mixed case with a body, repeated names in three
        // spellings; then all lower case, with a forged case list that must change
        // nothing and reach no one.
        let requests = format!(
            "POST http://{authority}/mixed HTTP/1.1\r\nHost: {authority}\r\nX-Custom-Header: 1\r\n\
             x-bread: a\r\nX-BREAD: b\r\nx-Bread: c\r\naccept: */*\r\nContent-Length: 5\r\n\r\nhello\
             GET http://{authority}/lower HTTP/1.1\r\nhost: {authority}\r\nx-lower: 1\r\n\
             wary-header-case: X-LOWER,HOST\r\n\r\n"
        );
        tcp.write_all(requests.as_bytes()).await.unwrap();
        let answers = [read_response(&mut tcp).await, read_response(&mut tcp).await];
        for answer in &answers {
            assert!(answer.starts_with("HTTP/1.1 200"), "{authority}: {answer}");
            let lines = header_lines(answer);
            assert!(
                lines.contains(&"X-Mixed-Case: Yes"),
                "{authority}: the client got {answer:?}"
            );
            assert!(
                lines.iter().any(|l| l.starts_with("X-Echo-Framing: ")),
                "{authority}: {answer:?}"
            );
            assert!(
                !answer.to_lowercase().contains("wary-header-case"),
                "{authority}: {answer:?}"
            );
        }
        let heads: Vec<String> = seen.lock().unwrap().iter().map(|r| r.head.clone()).collect();
        assert_eq!(heads.len(), 2, "{authority}: {heads:?}");
        let mixed = header_lines(&heads[0]);
        for line in ["X-Custom-Header: 1", "accept: */*", "Content-Length: 5"] {
            assert!(mixed.contains(&line), "{authority}: no {line:?} in {mixed:?}");
        }
        assert!(mixed.iter().any(|l| l.starts_with("Host: ")), "{authority}: {mixed:?}");
        let breads: Vec<&str> = mixed
            .iter()
            .copied()
            .filter(|l| l.to_lowercase().starts_with("x-bread:"))
            .collect();
        assert_eq!(breads, ["x-bread: a", "X-BREAD: b", "x-Bread: c"], "{authority}");
        let lower = header_lines(&heads[1]);
        assert!(lower.contains(&"x-lower: 1"), "{authority}: {lower:?}");
        assert!(lower.iter().any(|l| l.starts_with("host: ")), "{authority}: {lower:?}");
        assert!(
            !heads[1].to_lowercase().contains("wary-header-case"),
            "{authority}: {lower:?}"
        );
    }

    // HTTP/1 inside a CONNECT tunnel through the mesh, to a port not declared opaque:
    // the inbound reads each request, and keeps case too.
    recorded.lock().unwrap().clear();
    let mut tunnel = connect(m.web.outbound, &format!("backend.default:{RAW}")).await;
    let (answer, _) = exchange_in(
        &mut tunnel,
        "GET /tunnel HTTP/1.1\r\nHost: backend\r\nX-Tunnel-Case: 1\r\nx-lower: 2\r\n\r\n",
    )
    .await;
    assert!(header_lines(&answer).contains(&"X-Mixed-Case: Yes"), "{answer:?}");
    assert!(!answer.to_lowercase().contains("wary-header-case"), "{answer:?}");
    let head = recorded.lock().unwrap()[0].head.clone();
    let lines = header_lines(&head);
    assert!(
        lines.contains(&"X-Tunnel-Case: 1") && lines.contains(&"x-lower: 2"),
        "{lines:?}"
    );

    // An upgrade through the mesh (here declined with a 200, the recorder's answer to
    // everything): its request and answer keep their case too.
    recorded.lock().unwrap().clear();
    let mut tcp = TcpStream::connect(m.web.outbound).await.unwrap();
    let upgrade = format!(
        "GET http://backend.default:{RAW}/ws HTTP/1.1\r\nHost: backend.default:{RAW}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    tcp.write_all(upgrade.as_bytes()).await.unwrap();
    let answer = read_head(&mut tcp).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert!(header_lines(&answer).contains(&"X-Mixed-Case: Yes"), "{answer:?}");
    let head = recorded.lock().unwrap()[0].head.clone();
    let lines = header_lines(&head);
    assert!(
        lines.contains(&"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==") && lines.contains(&"Sec-WebSocket-Version: 13"),
        "{lines:?}"
    );

    // A plaintext HTTP/1 client of the backend's inbound, once its port is permissive.
    m.mesh.write(
        "mesh.yaml",
        &mesh_config(net).replace(
            &format!("- {{name: raw, port: {RAW}}}"),
            &format!("- {{name: raw, port: {RAW}, mtls: {{mode: permissive}}}}"),
        ),
    );
    let plain = "GET /plain HTTP/1.1\r\nHost: backend\r\nX-Plain-Case: 1\r\nWary-Header-Case: HOST\r\n\r\n";
    let answer = wait_until("plaintext is served", || async {
        let mut tcp = TcpStream::connect(m.backend.inbound).await.ok()?;
        tcp.write_all(plain.as_bytes()).await.ok()?;
        let head = read_head(&mut tcp).await;
        head.starts_with("HTTP/1.1 200").then_some(head)
    })
    .await;
    assert!(header_lines(&answer).contains(&"X-Mixed-Case: Yes"), "{answer:?}");
    assert!(!answer.to_lowercase().contains("wary-header-case"), "{answer:?}");
    let head = recorded.lock().unwrap().last().unwrap().head.clone();
    let lines = header_lines(&head);
    assert!(
        lines.contains(&"X-Plain-Case: 1") && lines.contains(&"Host: backend"),
        "{lines:?}"
    );
    assert!(!head.to_lowercase().contains("wary-header-case"), "{lines:?}");

    // An HTTP/2 client of an HTTP/1 server (outside the mesh: inside, the app speaks
    // what the client spoke) gets lower case, as HTTP/2 has nothing else.
    let tcp = TcpStream::connect(m.web.outbound).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let request = http::Request::get(format!("http://{net}.3:{RAW}/h2"))
        .body(Empty::<bytes::Bytes>::new())
        .unwrap();
    let answer = sender.send_request(request).await.unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.headers().get("x-mixed-case").unwrap(), "Yes");
    assert!(answer.headers().get("wary-header-case").is_none(), "{answer:?}");
    let _ = (&m.mesh, &m.backend);
}
