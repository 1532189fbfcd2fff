//! Real servers for data-path tests: an HTTP/1.1 + HTTP/2 (h2c) server with routes that
//! exercise streaming, trailers, `Expect: 100-continue` and WebSocket; an HTTP/1.0
//! server with close-delimited bodies; a server that speaks first; and a gRPC server.
//! Each stops when dropped.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::{SinkExt, Stream, StreamExt};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::Role;

/// The generated gRPC test service (`tests/proto/echo.proto`).
pub mod pb {
    tonic::include_proto!("wary.test.v1");
}

type Body = BoxBody<Bytes, hyper::Error>;

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// What an [`Upstream`] saw.
#[derive(Default)]
pub struct Seen {
    /// Request bodies' bytes read by `/sink` and `/upload`.
    pub body_bytes: AtomicU64,
    /// Every request's `<method> <path>`, in order.
    pub requests: Mutex<Vec<String>>,
    /// How many of the next `/flaky` requests answer 503 (after reading the body).
    pub fail_next: AtomicU64,
    /// Every `/flaky` request's body, in order.
    pub bodies: Mutex<Vec<Bytes>>,
}

/// An HTTP/1.1 and HTTP/2 (prior knowledge) server:
///
/// * `/echo`: the request body streamed back, its trailers as the response's trailers;
/// * `/trailers`: a chunked body `part1part2` and the trailer `x-checksum: 42`;
/// * `/upload`: 401 without reading the body unless `authorization` is set, else the
///   body's size;
/// * `/sink`: reads the body and answers its size;
/// * `/bytes?n=N`: N zero bytes, streamed in 64 KiB chunks;
/// * `/ws`: a WebSocket echo;
/// * `/flaky`: reads and records the body, then answers 503 while
///   [`Seen::fail_next`] counts down, 200 after;
/// * anything else: `hello from <name>`, with the request's `wary-client-id`, `host`
///   and `expect` echoed in `x-seen-*` headers, and an HTTP/2 request's `:authority` in
///   `x-seen-authority`.
pub struct Upstream {
    task: JoinHandle<()>,
    /// What it saw.
    pub seen: Arc<Seen>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
    /// Serves on `addr`.
    pub async fn start(addr: SocketAddr, name: &str) -> Self {
        let listener = TcpListener::bind(addr)
            .await
            .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        let seen = Arc::new(Seen::default());
        let (name, seen2) = (Arc::new(name.to_string()), seen.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (name, seen) = (name.clone(), seen2.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let (name, seen) = (name.clone(), seen.clone());
                        async move { Ok::<_, Infallible>(route(req, &name, &seen).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        Self { task, seen }
    }
}

async fn route(mut req: Request<Incoming>, name: &str, seen: &Seen) -> Response<Body> {
    seen.requests
        .lock()
        .unwrap()
        .push(format!("{} {}", req.method(), req.uri().path()));
    match req.uri().path() {
        "/echo" => {
            let declared = req.headers().get("trailer").cloned();
            let mut response = Response::new(req.into_body().boxed());
            if let Some(declared) = declared {
                response.headers_mut().insert("trailer", declared);
            }
            response
                .headers_mut()
                .insert("content-type", HeaderValue::from_static("application/octet-stream"));
            response
        }
        "/trailers" => {
            let mut trailers = HeaderMap::new();
            trailers.insert("x-checksum", HeaderValue::from_static("42"));
            let frames = futures::stream::iter([
                Ok::<_, hyper::Error>(Frame::data(Bytes::from_static(b"part1"))),
                Ok(Frame::data(Bytes::from_static(b"part2"))),
                Ok(Frame::trailers(trailers)),
            ]);
            let mut response = Response::new(BodyExt::boxed(StreamBody::new(frames)));
            response
                .headers_mut()
                .insert("trailer", HeaderValue::from_static("x-checksum"));
            response
        }
        "/flaky" => {
            let body = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            seen.bodies.lock().unwrap().push(body);
            let failing = seen
                .fail_next
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                .is_ok();
            let mut r = Response::new(full(if failing { "failing as asked\n" } else { "ok\n" }));
            if failing {
                *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            }
            r
        }
        "/upload" if !req.headers().contains_key("authorization") => {
            let mut r = Response::new(full("log in first\n"));
            *r.status_mut() = StatusCode::UNAUTHORIZED;
            r
        }
        "/upload" | "/sink" => {
            let mut body = req.into_body();
            let mut total = 0u64;
            while let Some(Ok(frame)) = body.frame().await {
                if let Ok(data) = frame.into_data() {
                    total += data.len() as u64;
                    seen.body_bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
            }
            Response::new(full(format!("{total}\n")))
        }
        "/bytes" => {
            let n: u64 = req
                .uri()
                .query()
                .and_then(|q| q.strip_prefix("n="))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            const CHUNK: u64 = 64 * 1024;
            let zeros = Bytes::from(vec![0u8; CHUNK as usize]);
            let frames = futures::stream::unfold(n, move |left| {
                let zeros = zeros.clone();
                async move {
                    (left > 0).then(|| {
                        let take = left.min(CHUNK);
                        (
                            Ok::<_, hyper::Error>(Frame::data(zeros.slice(..take as usize))),
                            left - take,
                        )
                    })
                }
            });
            let mut r = Response::new(BodyExt::boxed(StreamBody::new(frames)));
            r.headers_mut().insert("content-length", HeaderValue::from(n));
            r
        }
        "/ws" => {
            let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
                let mut r = Response::new(full("not a websocket request\n"));
                *r.status_mut() = StatusCode::BAD_REQUEST;
                return r;
            };
            let upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let Ok(io) = upgrade.await else { return };
                let mut ws =
                    tokio_tungstenite::WebSocketStream::from_raw_socket(TokioIo::new(io), Role::Server, None).await;
                while let Some(Ok(msg)) = ws.next().await {
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        return;
                    }
                }
            });
            let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
            let mut r = Response::new(full(Bytes::new()));
            *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            let h = r.headers_mut();
            h.insert("connection", HeaderValue::from_static("upgrade"));
            h.insert("upgrade", HeaderValue::from_static("websocket"));
            h.insert("sec-websocket-accept", HeaderValue::from_str(&accept).unwrap());
            r
        }
        _ => {
            let mut r = Response::new(full(format!("hello from {name}")));
            if let Some(authority) = req.uri().authority() {
                r.headers_mut()
                    .insert("x-seen-authority", HeaderValue::from_str(authority.as_str()).unwrap());
            }
            for (from, to) in [
                ("wary-client-id", "x-seen-client-id"),
                ("host", "x-seen-host"),
                ("expect", "x-seen-expect"),
            ] {
                if let Some(v) = req.headers().get(from) {
                    r.headers_mut().insert(to, v.clone());
                }
            }
            r
        }
    }
}

/// A raw TCP server: `hello` is written as soon as a connection is accepted (a server
/// that speaks first, like SMTP or MySQL); then everything received is echoed back,
/// and when the client half-closes, `bye` is written before closing.
pub async fn speaks_first(addr: SocketAddr, hello: &'static [u8]) -> JoinHandle<()> {
    let listener = TcpListener::bind(addr)
        .await
        .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                if tcp.write_all(hello).await.is_err() {
                    return;
                }
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    match tcp.read(&mut buf).await {
                        Ok(0) => {
                            let _ = tcp.write_all(b"bye").await;
                            let _ = tcp.shutdown().await;
                            return;
                        }
                        Ok(n) => {
                            if tcp.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                        Err(_) => return,
                    }
                }
            });
        }
    })
}

/// An HTTP/1.0 server: answers every request with `HTTP/1.0 200 OK`, no length, `body`,
/// and closes the connection (a close-delimited body, RFC 9112 §6.3).
pub async fn http10(addr: SocketAddr, body: Arc<Vec<u8>>) -> JoinHandle<()> {
    let listener = TcpListener::bind(addr)
        .await
        .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                continue;
            };
            let body = body.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = tcp
                    .write_all(b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\n")
                    .await;
                // Written in pieces, so the proxy sees a body arrive over time.
                for piece in body.chunks(7919) {
                    if tcp.write_all(piece).await.is_err() {
                        return;
                    }
                }
                let _ = tcp.shutdown().await;
            });
        }
    })
}

/// The gRPC test server, counting the stream messages it has handed to the transport.
#[derive(Clone, Default)]
pub struct EchoService {
    /// `ServerStream` messages produced so far.
    pub produced: Arc<AtomicU64>,
}

type PayloadStream = Pin<Box<dyn Stream<Item = Result<pb::Payload, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl pb::echo_server::Echo for EchoService {
    async fn unary(&self, req: tonic::Request<pb::Payload>) -> Result<tonic::Response<pb::Size>, tonic::Status> {
        Ok(tonic::Response::new(pb::Size {
            bytes: req.into_inner().data.len() as u64,
        }))
    }

    type ServerStreamStream = PayloadStream;

    async fn server_stream(
        &self,
        req: tonic::Request<pb::StreamRequest>,
    ) -> Result<tonic::Response<PayloadStream>, tonic::Status> {
        let pb::StreamRequest { count, size } = req.into_inner();
        let produced = self.produced.clone();
        let data = Bytes::from(vec![7u8; size as usize]);
        // Lazy: a message is made only when the transport asks for the next one, so
        // `produced` shows how far flow control let the server run ahead.
        let stream = futures::stream::iter(0..count).map(move |_| {
            produced.fetch_add(1, Ordering::Relaxed);
            Ok(pb::Payload { data: data.to_vec() })
        });
        Ok(tonic::Response::new(Box::pin(stream)))
    }

    async fn fail(&self, req: tonic::Request<pb::FailRequest>) -> Result<tonic::Response<pb::Size>, tonic::Status> {
        Err(failure(req.into_inner()))
    }

    type FailAfterMessageStream = PayloadStream;

    async fn fail_after_message(
        &self,
        req: tonic::Request<pb::FailRequest>,
    ) -> Result<tonic::Response<PayloadStream>, tonic::Status> {
        let status = failure(req.into_inner());
        let stream = futures::stream::iter([Ok(pb::Payload { data: vec![1; 16] }), Err(status)]);
        Ok(tonic::Response::new(Box::pin(stream)))
    }
}

/// The status `Fail` asks for, with `metadata_bytes` of metadata in 1 KiB values, as
/// real services attach error details.
fn failure(req: pb::FailRequest) -> tonic::Status {
    let pb::FailRequest { code, metadata_bytes } = req;
    let mut status = tonic::Status::new(tonic::Code::from_i32(code), "failed as asked");
    let chunk = "x".repeat(1024);
    for i in 0..metadata_bytes / 1024 {
        let key: tonic::metadata::MetadataKey<tonic::metadata::Ascii> =
            format!("x-detail-{i}").parse().expect("a metadata key");
        status.metadata_mut().insert(key, chunk.parse().expect("ASCII"));
    }
    status
}

/// Serves [`EchoService`] over HTTP/2 prior knowledge on `addr`, accepting messages of
/// up to 32 MiB.
pub async fn grpc(addr: SocketAddr) -> (EchoService, JoinHandle<()>) {
    let listener = TcpListener::bind(addr)
        .await
        .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    let service = EchoService::default();
    let server = pb::echo_server::EchoServer::new(service.clone())
        .max_decoding_message_size(32 << 20)
        .max_encoding_message_size(32 << 20);
    let task = tokio::spawn(async move {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let _ = tonic::transport::Server::builder()
            .add_service(server)
            .serve_with_incoming(incoming)
            .await;
    });
    (service, task)
}

/// A request as an HTTP/1.1 server read it off the wire.
#[derive(Debug, Clone)]
pub struct RawRequest {
    /// The request line and header lines, exactly as received (names in their case).
    pub head: String,
    /// How the body was framed: `chunked`, `length` or `none`.
    pub framing: &'static str,
    /// The body, chunked encoding removed.
    pub body: Vec<u8>,
}

/// What a [`recorder`] saw, in order.
pub type Recorded = Arc<Mutex<Vec<RawRequest>>>;

/// An HTTP/1.1 server that records each request as the bytes arrived (see
/// [`RawRequest`]) and answers `200` with the body echoed, `X-Echo-Framing` naming its
/// framing and a mixed-case `X-Mixed-Case: Yes`; connections are kept alive, except
/// after a request for `/close`, answered with `Connection: close` and closed. It reads
/// the wire itself, since a parsing server would hide header case and framing.
pub async fn recorder(addr: SocketAddr) -> (Recorded, JoinHandle<()>) {
    let listener = TcpListener::bind(addr)
        .await
        .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    let recorded = Recorded::default();
    let seen = recorded.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut conn = RawConn {
                    tcp,
                    buf: bytes::BytesMut::new(),
                };
                while let Some(request) = conn.request().await {
                    let close = request.head.split(' ').nth(1) == Some("/close");
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\nX-Mixed-Case: Yes\r\nX-Echo-Framing: {}\r\nContent-Length: {}\r\n{}\r\n",
                        request.framing,
                        request.body.len(),
                        if close { "Connection: close\r\n" } else { "" }
                    );
                    let body = request.body.clone();
                    seen.lock().unwrap().push(request);
                    if conn.tcp.write_all(answer.as_bytes()).await.is_err()
                        || conn.tcp.write_all(&body).await.is_err()
                        || close
                    {
                        let _ = conn.tcp.shutdown().await;
                        return;
                    }
                }
            });
        }
    });
    (recorded, task)
}

struct RawConn {
    tcp: tokio::net::TcpStream,
    buf: bytes::BytesMut,
}

impl RawConn {
    /// Reads more bytes; `false` at the end of the stream.
    async fn more(&mut self) -> bool {
        matches!(self.tcp.read_buf(&mut self.buf).await, Ok(n) if n > 0)
    }

    /// The next line (without its CRLF).
    async fn line(&mut self) -> Option<Vec<u8>> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = self.buf.split_to(i + 2);
                return Some(line[..i].to_vec());
            }
            if !self.more().await {
                return None;
            }
        }
    }

    async fn exactly(&mut self, n: usize) -> Option<Vec<u8>> {
        while self.buf.len() < n {
            if !self.more().await {
                return None;
            }
        }
        Some(self.buf.split_to(n).to_vec())
    }

    async fn request(&mut self) -> Option<RawRequest> {
        let mut head = String::new();
        loop {
            let line = self.line().await?;
            if line.is_empty() && !head.is_empty() {
                break;
            }
            if !line.is_empty() {
                head.push_str(&String::from_utf8_lossy(&line));
                head.push_str("\r\n");
            }
        }
        let header = |name: &str| {
            head.lines().skip(1).find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
            })
        };
        let chunked = header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
        let length = header("content-length").and_then(|v| v.parse::<usize>().ok());
        let (framing, body) = if chunked {
            let mut body = Vec::new();
            loop {
                let size = self.line().await?;
                let size = String::from_utf8_lossy(&size);
                let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
                if size == 0 {
                    while !self.line().await?.is_empty() {}
                    break;
                }
                body.extend(self.exactly(size).await?);
                self.line().await?;
            }
            ("chunked", body)
        } else if let Some(n) = length {
            ("length", self.exactly(n).await?)
        } else {
            ("none", Vec::new())
        };
        Some(RawRequest { head, framing, body })
    }
}
