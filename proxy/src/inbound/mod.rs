//! The inbound side: requests from peer proxies to this workload's app.
//!
//! ```text
//! peer proxy ─HTTP/2 over mTLS─▶ <workload address>:4143
//!   TLS 1.3, client certificate required and verified against the trust bundle
//!   ─▶ the peer's SPIFFE ID (URI SAN) ─▶ `wary-client-id` header for the app
//!   ─▶ the app at <workload address>:<wary-dst-port>, in the client's own protocol
//! ```
//!
//! A failed handshake (plaintext, another CA, an expired certificate...) is logged and
//! counted by reason, and the connection closed.
//!
//! In `permissive` mTLS mode (the workload's, or one port's), a connection whose first
//! byte is not a TLS handshake record is served as plaintext, for clients not yet in the
//! mesh: its app port is the one it was redirected from (`SO_ORIGINAL_DST`), or in
//! explicit mode the workload's first declared port; its requests carry no
//! `wary-client-id` and are authorized as an unauthenticated client; it is counted in
//! `wary_proxy_inbound_plaintext_connections_total`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::upgrade::OnUpgrade;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use wary_certs::SpiffeId;
use wary_certs::tls::{HandshakeFailure, peer_identity};
use wary_proto::discovery::{MtlsMode, Protocol};

use crate::authorize;
use crate::detect;
use crate::drain::Drain;
use crate::header_case::{self, CaseTap, HEADER_CASE, Role, Spellings, TapConnector};
use crate::http::{self as h, Body, error_response};
use crate::metrics as m;
use crate::state::Cache;
use crate::tunnel;

mod connect;
use connect::TunnelConn;

/// The most TLS handshakes in progress at once: 1024.
pub const MAX_HANDSHAKES: usize = 1024;

/// The longest a peer may take to complete its TLS handshake: 10 s.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a connection on a permissive port may stay silent before it is taken for a
/// plaintext client whose server speaks first: 1 s (a TLS client sends its ClientHello
/// at once).
pub const PLAINTEXT_DETECT_TIMEOUT: Duration = Duration::from_secs(1);

/// The most plaintext connections (permissive mode) open at once: 4096. Beyond, new
/// ones are closed and counted (`decision="overloaded"`), so clients without any
/// credential cannot exhaust the proxy's or the app's file descriptors.
pub const MAX_PLAINTEXT_CONNECTIONS: usize = 4096;

/// The first byte of a TLS handshake record (RFC 8446 §5.1, ContentType handshake).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// The peer of one connection.
struct Peer {
    /// Its verified SPIFFE ID; `None` for a plaintext client (permissive mode).
    id: Option<SpiffeId>,
    /// The same, as the `wary-client-id` value for the app.
    header: Option<HeaderValue>,
    /// `wary_proxy_responses_total` for this caller, by status class 1xx to 5xx.
    responses: [metrics::Counter; 5],
    /// `wary_proxy_response_latency_seconds` for this caller.
    latency: metrics::Histogram,
}

impl Peer {
    /// The peer `id` (`None`: unauthenticated) of workload `policy`, with its metrics.
    fn new(policy: &str, id: Option<SpiffeId>) -> Option<Self> {
        let header = match &id {
            Some(id) => Some(HeaderValue::from_str(&id.to_string()).ok()?),
            None => None,
        };
        // Labels are bounded: callers are mesh identities, issued by the CA.
        let client = id
            .as_ref()
            .map_or_else(|| "unauthenticated".to_string(), ToString::to_string);
        let labels = [
            ("direction", "inbound".to_string()),
            ("service", policy.to_string()),
            ("client", client),
        ];
        Some(Self {
            id,
            header,
            responses: ["1xx", "2xx", "3xx", "4xx", "5xx"].map(|code| {
                let mut labels = labels.to_vec();
                labels.push(("code", code.to_string()));
                metrics::counter!(m::RESPONSES, &labels)
            }),
            latency: metrics::histogram!(m::RESPONSE_LATENCY, &labels),
        })
    }
}

/// The inbound proxy.
pub struct Inbound {
    app_ip: IpAddr,
    cache: Arc<Cache>,
    policy: String,
    reserved: Vec<u16>,
    /// Ports opaque unless the workload declares their protocol (the proxy's
    /// `--opaque-ports`).
    opaque_ports: Vec<u16>,
    http1: Client<TapConnector, Body>,
    http2: AppH2,
    drain: Arc<Drain>,
    /// Plaintext connections open at once (permissive mode), at most
    /// [`MAX_PLAINTEXT_CONNECTIONS`].
    plaintext: Arc<tokio::sync::Semaphore>,
}

impl Inbound {
    /// Forwards to the app at `app_ip` (the workload's address), only on the ports the
    /// workload's inbound policy `policy` (`<workload>.<namespace>`) declares, and never
    /// on the proxy's own `reserved` ports (its outbound and admin listeners: a peer
    /// reaching those would act with this workload's identity). A port in
    /// `opaque_ports` whose protocol the workload leaves to detection carries opaque
    /// streams, as one declared `appProtocol: tcp` does. Each request and tunnel counts
    /// as open work for `drain` until it ends.
    pub fn new(
        app_ip: IpAddr,
        cache: Arc<Cache>,
        policy: String,
        reserved: Vec<u16>,
        opaque_ports: Vec<u16>,
        drain: Arc<Drain>,
    ) -> Self {
        Self {
            app_ip,
            cache,
            policy,
            reserved,
            opaque_ports,
            // Idle connections to the app close after 90 s (hyper's default, which needs
            // the timer to run).
            http1: Client::builder(TokioExecutor::new())
                .pool_timer(TokioTimer::new())
                .pool_idle_timeout(Duration::from_secs(90))
                .build(TapConnector(HttpConnector::new())),
            http2: AppH2::default(),
            drain,
            plaintext: Arc::new(tokio::sync::Semaphore::new(MAX_PLAINTEXT_CONNECTIONS)),
        }
    }

    /// Whether a peer may reach `port`: the refusal to send when not.
    fn refuse_port(&self, port: u16) -> Option<Response<Body>> {
        if self.reserved.contains(&port) {
            return Some(error_response(
                StatusCode::FORBIDDEN,
                "port-forbidden",
                format!("port {port} is the proxy's own, not the app's"),
            ));
        }
        let state = self.cache.load();
        let Some(policy) = state.inbound.items.get(&self.policy) else {
            return Some(error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "no-inbound-policy",
                format!("this proxy has no inbound policy for {} yet", self.policy),
            ));
        };
        if !policy.ports.iter().any(|p| p.port == u32::from(port)) {
            return Some(error_response(
                StatusCode::FORBIDDEN,
                "port-forbidden",
                format!(
                    "{} serves no port {port}: declare it in the Workload's ports",
                    self.policy
                ),
            ));
        }
        None
    }

    /// Serves mTLS connections on `listener` with `tls` until the process ends (and
    /// plaintext ones on permissive ports).
    pub async fn serve(self: Arc<Self>, listener: TcpListener, tls: Arc<rustls::ServerConfig>) {
        let acceptor = TlsAcceptor::from(tls);
        let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "inbound accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            // A flood of connections that never finish their handshake holds at most
            // MAX_HANDSHAKES tasks; beyond that, new ones are closed at once.
            let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                metrics::counter!(m::TLS_HANDSHAKE_FAILURES, "direction" => "inbound", "reason" => "overloaded")
                    .increment(1);
                continue;
            };
            let (acceptor, inbound) = (acceptor.clone(), self.clone());
            tokio::spawn(async move {
                // Strict everywhere (the default): no peeking, TLS or nothing.
                if inbound.any_permissive() && !starts_with_tls(&tcp).await {
                    drop(permit);
                    let Ok(_slot) = inbound.plaintext.clone().try_acquire_owned() else {
                        metrics::counter!(m::INBOUND_PLAINTEXT, "decision" => "overloaded").increment(1);
                        return;
                    };
                    return inbound.serve_plaintext(tcp, peer).await;
                }
                let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                drop(permit);
                let tls = match handshake {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        let reason = HandshakeFailure::classify(&e);
                        metrics::counter!(m::TLS_HANDSHAKE_FAILURES, "direction" => "inbound", "reason" => reason.as_str())
                            .increment(1);
                        tracing::info!(%peer, %reason, error = %e, "refused an inbound connection");
                        return;
                    }
                    Err(_) => {
                        metrics::counter!(m::TLS_HANDSHAKE_FAILURES, "direction" => "inbound", "reason" => "timeout")
                            .increment(1);
                        tracing::info!(%peer, "inbound TLS handshake timed out");
                        return;
                    }
                };
                // Verified in the handshake: the chain leads to the trust bundle.
                let client = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(peer_identity);
                let client: SpiffeId = match client {
                    Some(Ok(id)) => id,
                    other => {
                        metrics::counter!(m::TLS_HANDSHAKE_FAILURES, "direction" => "inbound", "reason" => "no_identity")
                            .increment(1);
                        tracing::info!(%peer, ?other, "refused an inbound connection without a SPIFFE identity");
                        return;
                    }
                };
                metrics::counter!(m::TLS_HANDSHAKES, "direction" => "inbound").increment(1);
                // The app's header and the metrics are made once per connection.
                let Some(client) = Peer::new(&inbound.policy, Some(client)) else {
                    return;
                };
                let client = Arc::new(client);
                let service = service_fn(move |req| inbound.clone().serve_request(req, client.clone(), Origin::Mesh));
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .max_header_list_size(h::H2_MAX_REQUEST_HEADER_LIST_SIZE)
                    // A peer whose machine vanished (no FIN) is noticed in 15 s, and its
                    // tunnels and their app connections closed.
                    .keep_alive_interval(Duration::from_secs(10))
                    .keep_alive_timeout(Duration::from_secs(5))
                    .timer(TokioTimer::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    }

    /// One request, counted in the caller's metrics and as open work for the drain.
    ///
    /// A request the app never processed (its HTTP/2 server refused the stream, or
    /// it arrived above the last stream id of the app's GOAWAY) is answered to a peer
    /// proxy with RST_STREAM(REFUSED_STREAM), so the peer may retry it whatever its
    /// method (RFC 9113 §8.7); no answer the app writes can say this.
    async fn serve_request(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        client: Arc<Peer>,
        origin: Origin,
    ) -> Result<Response<Body>, h2::Error> {
        let active = self.drain.track();
        let started = tokio::time::Instant::now();
        let response = match origin {
            // The port may have turned strict since the connection was accepted.
            Origin::Plaintext(port) if !self.port_permissive(port) => error_response(
                StatusCode::FORBIDDEN,
                "plaintext-refused",
                format!("port {port} now requires mesh mTLS; plaintext is no longer served"),
            ),
            Origin::Plaintext(port) | Origin::Tunnel(port) => match as_mesh_request(&mut req, port) {
                None => self.handle(req, &client).await,
                Some(refused) => refused,
            },
            Origin::Mesh => self.handle(req, &client).await,
        };
        if origin == Origin::Mesh && response.extensions().get::<NotProcessed>().is_some() {
            metrics::counter!(m::INBOUND_REFUSED_STREAMS).increment(1);
            return Err(h2::Error::from(h2::Reason::REFUSED_STREAM));
        }
        let class = usize::from(response.status().as_u16() / 100).clamp(1, 5) - 1;
        client.responses[class].increment(1);
        client.latency.record(started.elapsed().as_secs_f64());
        Ok(response.map(|body| {
            body.map_frame(move |frame| {
                let _active = &active;
                frame
            })
            .boxed()
        }))
    }

    /// Whether `port` carries opaque streams: the workload declares it `appProtocol:
    /// tcp`, or leaves it to detection and it is in the proxy's opaque ports (MySQL's
    /// 3306 and the other servers that speak first).
    fn declared_opaque(&self, port: u16) -> bool {
        let state = self.cache.load();
        state.inbound.items.get(&self.policy).is_some_and(|p| {
            p.ports.iter().any(|d| {
                d.port == u32::from(port)
                    && (d.protocol == Protocol::Opaque as i32
                        || (d.protocol == Protocol::Detect as i32 && self.opaque_ports.contains(&port)))
            })
        })
    }

    /// Whether `port` accepts plaintext now (its mode, or the workload's).
    fn port_permissive(&self, port: u16) -> bool {
        let state = self.cache.load();
        state.inbound.items.get(&self.policy).is_some_and(|policy| {
            let mode = policy
                .ports
                .iter()
                .find(|p| p.port == u32::from(port))
                .and_then(|p| p.mtls_mode)
                .unwrap_or(policy.mtls_mode);
            mode == MtlsMode::Permissive as i32
        })
    }

    /// Whether the workload, or any of its ports, accepts plaintext.
    fn any_permissive(&self) -> bool {
        let state = self.cache.load();
        state.inbound.items.get(&self.policy).is_some_and(|p| {
            p.mtls_mode == MtlsMode::Permissive as i32
                || p.ports
                    .iter()
                    .any(|port| port.mtls_mode == Some(MtlsMode::Permissive as i32))
        })
    }

    /// The app port a plaintext connection is for, and whether that port accepts
    /// plaintext: the port it was redirected from, else the first declared one.
    fn plaintext_port(&self, tcp: &TcpStream) -> Option<(u16, bool)> {
        let state = self.cache.load();
        let policy = state.inbound.items.get(&self.policy)?;
        let port = match detect::original_dst(tcp) {
            Some(dst) => u32::from(dst.port()),
            None => policy.ports.first()?.port,
        };
        let mode = policy
            .ports
            .iter()
            .find(|p| p.port == port)
            .and_then(|p| p.mtls_mode)
            .unwrap_or(policy.mtls_mode);
        Some((u16::try_from(port).ok()?, mode == MtlsMode::Permissive as i32))
    }

    /// A plaintext connection (permissive mode): HTTP is served request by request
    /// like a peer's, anything else is joined to the app port as bytes, after the same
    /// authorization as an opaque stream.
    async fn serve_plaintext(self: Arc<Self>, mut tcp: TcpStream, peer: SocketAddr) {
        let Some((port, true)) = self.plaintext_port(&tcp) else {
            metrics::counter!(m::INBOUND_PLAINTEXT, "decision" => "refused").increment(1);
            tracing::info!(%peer, "refused a plaintext connection: mTLS is strict on its port");
            return;
        };
        metrics::counter!(m::INBOUND_PLAINTEXT, "decision" => "served").increment(1);
        tracing::debug!(%peer, port, "serving a plaintext connection (permissive mode)");
        let Some(client) = Peer::new(&self.policy, None) else {
            return;
        };
        // A port declared opaque gets bytes; any other gets HTTP only, parsed by the
        // proxy, so no identity header can ride through unseen.
        if self.declared_opaque(port) {
            return self
                .splice_plaintext(detect::Prefixed::new(bytes::Bytes::new(), tcp), port, peer)
                .await;
        }
        let mut prefix = bytes::BytesMut::new();
        let protocol = detect::detect(&mut tcp, &mut prefix, PLAINTEXT_DETECT_TIMEOUT).await;
        if protocol == detect::Protocol::Opaque {
            tracing::info!(%peer, port, "closed a plaintext connection that is not HTTP on a port not declared opaque");
            return;
        }
        let io = CaseTap::new(detect::Prefixed::new(prefix.freeze(), tcp), Role::Requests);
        let case = io.log();
        let client = Arc::new(client);
        let inbound = self.clone();
        let service = service_fn(move |mut req| {
            header_case::note_request(&case, &mut req);
            inbound
                .clone()
                .serve_request(req, client.clone(), Origin::Plaintext(port))
        });
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        // As the outbound listener: half-close is not cancellation, and a client gets
        // 30 s to send its request head.
        builder.http1().half_close(true).timer(TokioTimer::new());
        builder.http2().max_header_list_size(h::H2_MAX_REQUEST_HEADER_LIST_SIZE);
        let _ = builder.serve_connection(TokioIo::new(io), service).await;
    }

    /// A plaintext opaque stream, authorized as one with no client identity, joined to
    /// the app port.
    async fn splice_plaintext(&self, mut io: detect::Prefixed<TcpStream>, port: u16, peer: SocketAddr) {
        if self.refuse_port(port).is_some() {
            return;
        }
        if self
            .authorize(None, None, None, port, &http::HeaderMap::new())
            .is_some()
        {
            tracing::info!(%peer, port, "closed a plaintext TCP stream: denied");
            return;
        }
        let app = SocketAddr::new(self.app_ip, port);
        let Ok(Ok(mut upstream)) = tokio::time::timeout(APP_CONNECT_TIMEOUT, TcpStream::connect(app)).await else {
            tracing::info!(%peer, %app, "closed a plaintext TCP stream: the app did not accept");
            return;
        };
        let _ = upstream.set_nodelay(true);
        let _active = self.drain.track();
        let _ = tokio::io::copy_bidirectional(&mut io, &mut upstream).await;
    }

    async fn handle(self: &Arc<Self>, mut req: Request<Incoming>, peer: &Arc<Peer>) -> Response<Body> {
        let client = peer.id.as_ref();
        let port = req
            .headers()
            .get(h::DST_PORT)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u16>().ok());
        let Some(port) = port else {
            return error_response(
                StatusCode::BAD_REQUEST,
                "not-mesh",
                "not a mesh request: the wary-dst-port header is missing".into(),
            );
        };
        if let Some(refused) = self.refuse_port(port) {
            return refused;
        }
        // HTTP/2 decodes larger blocks than the mesh carries (for the trailers, see
        // `h::H2_MAX_REQUEST_HEADER_LIST_SIZE`); headers are held to the mesh's limit,
        // counting only what the client sent (not the spellings its proxy added).
        let case = req.headers_mut().remove(HEADER_CASE);
        if let Some(refused) = h::refuse_large_headers(req.headers()) {
            return refused;
        }
        if let Some(case) = case {
            req.headers_mut().insert(HEADER_CASE, case);
        }
        let proto = req.headers().get(h::ORIG_PROTO).map(HeaderValue::as_bytes);
        let kind = match (req.method() == Method::CONNECT, proto) {
            (false, Some(b"h2")) => Kind::Http2,
            (false, _) => Kind::Http1,
            (true, Some(b"tcp")) => Kind::Tcp,
            (true, Some(b"h1-upgrade")) => Kind::Upgrade,
            (true, _) => {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    "not-mesh",
                    "a CONNECT between proxies names its protocol in wary-orig-proto (tcp or h1-upgrade)".into(),
                );
            }
        };
        let header = |name| {
            req.headers()
                .get(name)
                .and_then(|v: &HeaderValue| std::str::from_utf8(v.as_bytes()).ok())
        };
        let (method, path) = match kind {
            Kind::Http1 | Kind::Http2 => (Some(req.method().as_str()), Some(req.uri().path())),
            Kind::Upgrade => match (header(h::METHOD), header(h::PATH), req.headers().get(h::UPGRADE)) {
                // Only WebSocket: after any other switch (h2c above all) the app would
                // take later requests on this connection past authorization and with
                // whatever identity header the peer wrote. The peer proxy refuses
                // others from its app; this one does not rely on it.
                (_, _, Some(protocol)) if !tunnel::is_websocket(protocol) => {
                    return error_response(
                        StatusCode::NOT_IMPLEMENTED,
                        "upgrade-refused",
                        format!(
                            "the mesh carries WebSocket upgrades only, not {:?}",
                            String::from_utf8_lossy(protocol.as_bytes())
                        ),
                    );
                }
                (Some(method), Some(path), Some(_)) => (Some(method), Some(path.split('?').next().unwrap_or(path))),
                _ => {
                    return error_response(
                        StatusCode::BAD_REQUEST,
                        "not-mesh",
                        "an h1-upgrade CONNECT carries wary-method, wary-path and wary-upgrade".into(),
                    );
                }
            },
            Kind::Tcp => (None, None),
        };
        // An origin-form path only: anything else could redirect the connection to the
        // app (`@host:port` reads as userinfo and a new authority).
        if let Some(path) = path
            && !path.starts_with('/')
            && !(path == "*" && method == Some("OPTIONS"))
        {
            return error_response(
                StatusCode::BAD_REQUEST,
                "bad-path",
                format!(
                    "the request path must start with '/': {:?}",
                    path.escape_debug().to_string()
                ),
            );
        }
        // Authorization sees the normalized path, and so does the app: `//secret`,
        // `/./secret` and `/%73ecret` are all `/secret` to both.
        let normalized = match path.map(h::normalize_path) {
            Some(Err(why)) => {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    "bad-path",
                    format!("the request path has {why}; send it without"),
                );
            }
            Some(Ok(std::borrow::Cow::Owned(p))) => Some(p),
            _ => None,
        };
        let path = normalized.as_deref().or(path);
        // A tunnel to a port not declared opaque is judged by what it carries: each
        // HTTP request on its own, or TLS as an opaque stream (see `carry_tunnel`).
        // Decided once: a tunnel to a port not declared opaque is judged by what it
        // carries, each HTTP request on its own, or TLS as an opaque stream (see
        // `tunnel.rs`); a declaration changing meanwhile changes nothing for it.
        let opaque = kind == Kind::Tcp && self.declared_opaque(port);
        let judged_later = kind == Kind::Tcp && !opaque;
        if !judged_later && let Some(denied) = self.authorize(client, method, path, port, req.headers()) {
            return denied;
        }
        if let Some(normalized) = normalized
            && with_path(&mut req, kind, &normalized).is_none()
        {
            return error_response(StatusCode::BAD_REQUEST, "bad-path", "request path is invalid".into());
        }
        metrics::counter!(m::REQUESTS, "direction" => "inbound", "service" => "local").increment(1);
        let app = std::net::SocketAddr::new(self.app_ip, port);
        match kind {
            Kind::Tcp if opaque => self.tunnel_tcp(req, app).await,
            Kind::Tcp => self.open_tunnel(req, app, peer),
            Kind::Upgrade => self.tunnel_upgrade(req, app, peer).await,
            Kind::Http1 | Kind::Http2 => self.forward(req, app, peer, kind == Kind::Http2).await,
        }
    }

    /// The verdict on a request (`method` and `path` are `None` for an opaque stream):
    /// `None` to go on, or the refusal to send.
    fn authorize(
        &self,
        client: Option<&SpiffeId>,
        method: Option<&str>,
        path: Option<&str>,
        port: u16,
        headers: &http::HeaderMap,
    ) -> Option<Response<Body>> {
        let state = self.cache.load();
        let policy = state.inbound.items.get(&self.policy)?;
        let request = authorize::Request {
            client,
            http: method.zip(path),
            port,
            permissive: client.is_none(),
        };
        let decision = authorize::authorize(policy, &request);
        let (verdict, label) = match &decision {
            authorize::Decision::Allow(_) => ("allow", decision.policy_label()),
            authorize::Decision::Deny(_) => ("deny", decision.policy_label()),
        };
        metrics::counter!(m::AUTHORIZATIONS, "decision" => verdict, "policy" => label.to_string()).increment(1);
        let authorize::Decision::Deny(by) = decision else {
            return None;
        };
        let what = match method.zip(path) {
            Some((method, path)) => format!("{method} {path}"),
            None => "open a TCP stream".to_string(),
        };
        let message = match client {
            Some(client) => format!("{client} may not {what} on {} port {port}: denied by {by}", self.policy),
            None => format!(
                "an unauthenticated (plaintext) client may not {what} on {} port {port}: denied by {by}",
                self.policy
            ),
        };
        tracing::debug!(%message, "denied");
        let grpc = headers
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        Some(if grpc {
            h::grpc_error(7, "forbidden", message)
        } else {
            error_response(StatusCode::FORBIDDEN, "forbidden", message)
        })
    }

    /// A request and its response, in the client's protocol.
    async fn forward(&self, req: Request<Incoming>, app: SocketAddr, peer: &Peer, http2: bool) -> Response<Body> {
        let (mut parts, body) = req.into_parts();
        let tunnel_conn = parts.extensions.remove::<TunnelConn>();
        let grpc = h::is_grpc(&parts.headers);
        // The spellings of the client's header names: from its outbound proxy, or read
        // here from a plaintext HTTP/1 client.
        let client_h1 = parts.version != Version::HTTP_2;
        let case = match parts.extensions.remove::<Spellings>() {
            Some(Spellings(case)) => Some(case),
            None => parts.headers.remove(HEADER_CASE),
        };
        h::strip_hop_by_hop(&mut parts.headers);
        h::strip_wary_headers(&mut parts.headers);
        if let Some(id) = &peer.header {
            parts.headers.insert(h::CLIENT_ID, id.clone());
        }
        if http2 {
            // The app sees the :authority the client used; the connection goes to the
            // app's port whatever it names.
            parts.version = Version::HTTP_2;
            let body = h::body_for_app(body, None);
            return match self.http2.send(app, Request::from_parts(parts, body)).await {
                Ok(response) => h::relay(response),
                Err(AppH2Error::NotProcessed(e)) => {
                    let mut refused = error_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "app-refused-stream",
                        format!("the app at {app} refused the request unprocessed: {e}"),
                    );
                    refused.extensions_mut().insert(NotProcessed);
                    refused
                }
                Err(AppH2Error::BadAnswer(e)) => {
                    let message = format!(
                        "the app at {app} answered with a malformed response or headers over the {} bytes the mesh \
                         reads: {e}",
                        h::H2_MAX_RESPONSE_HEADER_LIST_SIZE
                    );
                    if grpc {
                        h::grpc_error(13, "app-answer-unreadable", message)
                    } else {
                        error_response(StatusCode::BAD_GATEWAY, "app-answer-unreadable", message)
                    }
                }
                Err(AppH2Error::Failed(e)) => app_unavailable(grpc, app, &e),
            };
        }
        // The app sees the authority the client used.
        if let Some(authority) = parts.uri.authority()
            && let Ok(host) = HeaderValue::from_str(authority.as_str())
        {
            parts.headers.insert(http::header::HOST, host);
        }
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        parts.uri = match app_uri(app, path) {
            // A tunnel's own connection takes the origin form, as the client sent it.
            Some(uri) if tunnel_conn.is_some() => match uri.path_and_query() {
                Some(p) => Uri::from(p.clone()),
                None => uri,
            },
            Some(uri) => uri,
            None => return error_response(StatusCode::BAD_REQUEST, "bad-path", "request path is invalid".into()),
        };
        parts.version = Version::HTTP_11;
        // hyper's HTTP/1 client sends a GET, HEAD or CONNECT body of unknown length as
        // no body at all unless the framing is explicit (linkerd2#3310): a body that came
        // without a length (chunked, or HTTP/2 with no content-length) is sent chunked.
        if !hyper::body::Body::is_end_stream(&body) && !parts.headers.contains_key(http::header::CONTENT_LENGTH) {
            parts
                .headers
                .insert(http::header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        }
        if let Some(case) = &case {
            header_case::restore_into(&mut parts.extensions, case).await;
        }
        let declared = Some(h::declared_trailers(&parts.headers));
        let req = Request::from_parts(parts, h::body_for_app(body, declared));
        let answer = match tunnel_conn {
            Some(conn) => conn.send(req).await,
            None => self.http1.request(req).await.map_err(|e| crate::control::causes(&e)),
        };
        match answer {
            Ok(mut response) => {
                let case = header_case::take_response_case(&mut response);
                let mut response = h::relay(response);
                // Restored if this proxy writes the answer as HTTP/1; else carried to the
                // peer's proxy (a plaintext HTTP/2 client gets none).
                if let Some(case) = case {
                    if client_h1 {
                        header_case::restore_into(response.extensions_mut(), &case).await;
                    } else if peer.id.is_some() {
                        response.headers_mut().insert(HEADER_CASE, case);
                    }
                }
                response
            }
            Err(e) => app_unavailable(grpc, app, &e),
        }
    }

    /// An opaque stream to a port declared opaque: a TCP connection to the app, joined
    /// to the peer's `CONNECT` as bytes. Any other port's tunnel goes to
    /// [`Inbound::open_tunnel`].
    async fn tunnel_tcp(&self, mut req: Request<Incoming>, app: SocketAddr) -> Response<Body> {
        let Some(downstream) = req.extensions_mut().remove::<OnUpgrade>() else {
            return error_response(
                StatusCode::BAD_REQUEST,
                "bad-connect",
                "this CONNECT cannot be tunnelled".into(),
            );
        };
        match tokio::time::timeout(APP_CONNECT_TIMEOUT, TcpStream::connect(app)).await {
            Ok(Ok(tcp)) => {
                let _ = tcp.set_nodelay(true);
                tunnel::spawn_bridge(downstream, tcp, app.to_string(), self.drain.track());
                Response::new(h::empty())
            }
            Ok(Err(e)) => app_unavailable(false, app, &e),
            Err(_) => error_response(
                StatusCode::GATEWAY_TIMEOUT,
                "app-unavailable",
                format!("the app at {app} did not accept within {APP_CONNECT_TIMEOUT:?}"),
            ),
        }
    }

    /// An HTTP/1.1 `Upgrade`: the request rebuilt for the app; if the app switches
    /// protocols, its connection is joined to the peer's `CONNECT`.
    async fn tunnel_upgrade(&self, mut req: Request<Incoming>, app: SocketAddr, peer: &Peer) -> Response<Body> {
        let Some(downstream) = req.extensions_mut().remove::<OnUpgrade>() else {
            return error_response(
                StatusCode::BAD_REQUEST,
                "bad-connect",
                "this CONNECT cannot be tunnelled".into(),
            );
        };
        let (parts, _) = req.into_parts();
        let mut headers = parts.headers;
        let take = |headers: &mut http::HeaderMap, name| {
            headers
                .remove(name)
                .and_then(|v| std::str::from_utf8(v.as_bytes()).ok().map(str::to_owned))
        };
        let (Some(method), Some(path), Some(protocol)) = (
            take(&mut headers, h::METHOD).and_then(|m| Method::from_bytes(m.as_bytes()).ok()),
            take(&mut headers, h::PATH),
            headers.remove(h::UPGRADE),
        ) else {
            return error_response(
                StatusCode::BAD_REQUEST,
                "not-mesh",
                "an h1-upgrade CONNECT carries wary-method, wary-path and wary-upgrade".into(),
            );
        };
        let Some(uri) = app_uri(app, &path) else {
            return error_response(StatusCode::BAD_REQUEST, "bad-path", "request path is invalid".into());
        };
        let case = headers.remove(HEADER_CASE);
        h::strip_hop_by_hop(&mut headers);
        h::strip_wary_headers(&mut headers);
        if let Some(id) = &peer.header {
            headers.insert(h::CLIENT_ID, id.clone());
        }
        if let Some(authority) = parts.uri.authority()
            && let Ok(host) = HeaderValue::from_str(authority.as_str())
        {
            headers.insert(http::header::HOST, host);
        }
        let asked = protocol.clone();
        tunnel::ask_upgrade(&mut headers, protocol);
        let mut upgrade = Request::new(h::empty());
        *upgrade.method_mut() = method;
        *upgrade.uri_mut() = uri;
        *upgrade.headers_mut() = headers;
        if let Some(case) = &case {
            header_case::restore_into(upgrade.extensions_mut(), case).await;
        }
        let mut response = match self.http1.request(upgrade).await {
            Ok(response) => response,
            Err(e) => return app_unavailable(false, app, &crate::control::causes(&e)),
        };
        let case = header_case::take_response_case(&mut response);
        let status = response.status();
        if status == StatusCode::SWITCHING_PROTOCOLS
            && let Some(upstream) = response.extensions_mut().remove::<OnUpgrade>()
        {
            let switched = response.headers().get(http::header::UPGRADE).cloned();
            let (mut parts, _) = response.into_parts();
            h::strip_hop_by_hop(&mut parts.headers);
            h::strip_mesh_headers(&mut parts.headers);
            // A 101 without its Upgrade header switched to what was asked.
            parts.headers.insert(h::UPGRADE, switched.unwrap_or(asked));
            if let Some(case) = case {
                parts.headers.insert(HEADER_CASE, case);
            }
            parts.status = StatusCode::OK;
            tunnel::spawn_joined(downstream, upstream, app.to_string(), self.drain.track());
            return Response::from_parts(parts, h::empty());
        }
        if status != StatusCode::OK {
            let mut response = h::relay(response);
            if let Some(case) = case {
                response.headers_mut().insert(HEADER_CASE, case);
            }
            return response;
        }
        // Declined with a 200: a 200 opens the peer's tunnel, so the body goes through it.
        let (mut parts, body) = response.into_parts();
        h::strip_hop_by_hop(&mut parts.headers);
        h::strip_mesh_headers(&mut parts.headers);
        parts.headers.remove(http::header::CONTENT_LENGTH);
        if let Some(case) = case {
            parts.headers.insert(HEADER_CASE, case);
        }
        tokio::spawn(async move {
            let Ok(down) = downstream.await else { return };
            let mut down = TokioIo::new(down);
            let mut body = std::pin::pin!(body);
            while let Some(Ok(frame)) = body.frame().await {
                if let Ok(data) = frame.into_data()
                    && down.write_all(&data).await.is_err()
                {
                    return;
                }
            }
            let _ = down.shutdown().await;
        });
        Response::from_parts(parts, h::empty())
    }
}

/// HTTP/2 (prior knowledge) connections to the app, one per app port, shared by all
/// requests. Unlike a pooling client keyed by the URI's authority, this keeps the
/// client's `:authority` on the request while always dialling the app.
#[derive(Default)]
struct AppH2 {
    conns: std::sync::Mutex<std::collections::HashMap<SocketAddr, AppSlot>>,
}

type AppSlot = Arc<tokio::sync::Mutex<Option<hyper::client::conn::http2::SendRequest<Body>>>>;

impl AppH2 {
    /// Sends `req` to the app at `app` over its shared connection, opening one first if
    /// there is none (concurrent callers wait for a single connect).
    async fn send(&self, app: SocketAddr, req: Request<Body>) -> Result<Response<Incoming>, AppH2Error> {
        let slot = {
            let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
            conns.entry(app).or_default().clone()
        };
        let mut sender = {
            let mut slot = slot.lock().await;
            match slot.as_ref() {
                Some(sender) if !sender.is_closed() => sender.clone(),
                _ => {
                    let sender = Self::connect(app).await.map_err(AppH2Error::Failed)?;
                    *slot = Some(sender.clone());
                    sender
                }
            }
        };
        // A connection that closed before the request was sent (the app's GOAWAY
        // raced it): the app never saw the request.
        if sender.ready().await.is_err() {
            return Err(AppH2Error::NotProcessed("its connection closed first".into()));
        }
        sender.send_request(req).await.map_err(|e| {
            let h2 = std::error::Error::source(&e).and_then(|s| s.downcast_ref::<h2::Error>());
            // RFC 9113 §8.7: REFUSED_STREAM, or a stream above the last stream id of
            // the server's GOAWAY, was not processed; nor was one hyper never sent
            // because the connection closed first (canceled).
            let unprocessed = e.is_canceled()
                || h2.is_some_and(|h2| {
                    h2.reason() == Some(h2::Reason::REFUSED_STREAM) || (h2.is_go_away() && h2.is_remote())
                });
            // h2 resets a stream itself (PROTOCOL_ERROR) when the answer is malformed
            // or its header block is over what it decodes.
            let refused_answer = h2
                .is_some_and(|h2| h2.is_library() && h2.is_reset() && h2.reason() == Some(h2::Reason::PROTOCOL_ERROR));
            let why = crate::control::causes(&e);
            if unprocessed {
                AppH2Error::NotProcessed(why)
            } else if refused_answer {
                AppH2Error::BadAnswer(why)
            } else {
                AppH2Error::Failed(why)
            }
        })
    }

    async fn connect(app: SocketAddr) -> Result<hyper::client::conn::http2::SendRequest<Body>, String> {
        let tcp = tokio::time::timeout(APP_CONNECT_TIMEOUT, TcpStream::connect(app))
            .await
            .map_err(|_| format!("no connection within {APP_CONNECT_TIMEOUT:?}"))?
            .map_err(|e| e.to_string())?;
        let _ = tcp.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_header_list_size(h::H2_MAX_RESPONSE_HEADER_LIST_SIZE)
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%app, error = %e, "app connection ended");
            }
        });
        Ok(sender)
    }
}

/// The answer when the app did not answer: 502 `app-unavailable` (for a gRPC call,
/// `grpc-status` UNAVAILABLE) saying why.
fn app_unavailable(grpc: bool, app: SocketAddr, why: &dyn std::fmt::Display) -> Response<Body> {
    h::proxy_error(
        grpc,
        StatusCode::BAD_GATEWAY,
        "app-unavailable",
        format!("the app at {app} did not answer: {why}"),
    )
}

/// Why [`AppH2::send`] got no answer.
enum AppH2Error {
    /// The app did not process the request (RFC 9113 §8.7): safe to send again.
    NotProcessed(String),
    /// No connection, or the stream broke: the app may have seen the request.
    Failed(String),
    /// The app's answer could not be read: malformed, or a header block over
    /// [`h::H2_MAX_RESPONSE_HEADER_LIST_SIZE`].
    BadAnswer(String),
}

/// Marks a refusal whose request the app never processed, for [`Inbound::serve_request`].
#[derive(Clone, Copy)]
struct NotProcessed;

/// Where a request came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// A peer proxy's HTTP/2 stream, with its mesh headers.
    Mesh,
    /// A plaintext client's connection to this app port (permissive mode).
    Plaintext(u16),
    /// HTTP/1 inside a peer's opaque stream to this app port, not declared opaque.
    Tunnel(u16),
}

/// What a peer's request carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Http1,
    Http2,
    Tcp,
    Upgrade,
}

/// How long the inbound waits for the app to accept a tunnelled TCP connection: 1 s.
const APP_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Puts the normalized `path` in place of the request's (its query kept): the URI's
/// path, or for an upgrade the `wary-path` header. `None` when the result is not a
/// valid path.
fn with_path(req: &mut Request<Incoming>, kind: Kind, path: &str) -> Option<()> {
    if kind == Kind::Upgrade {
        let original = req
            .headers()
            .get(h::PATH)
            .map(|v| v.as_bytes().to_vec())
            .unwrap_or_default();
        let query = original
            .iter()
            .position(|b| *b == b'?')
            .map(|i| &original[i..])
            .unwrap_or(&[]);
        let value = HeaderValue::from_bytes(&[path.as_bytes(), query].concat()).ok()?;
        req.headers_mut().insert(h::PATH, value);
        return Some(());
    }
    let query = req.uri().query().map(|q| format!("?{q}")).unwrap_or_default();
    let mut parts = req.uri().clone().into_parts();
    parts.path_and_query = Some(format!("{path}{query}").parse().ok()?);
    *req.uri_mut() = Uri::from_parts(parts).ok()?;
    Some(())
}

/// `http://<app><path>`, built from parts: the authority is always the app's.
fn app_uri(app: SocketAddr, path: &str) -> Option<Uri> {
    Uri::builder()
        .scheme("http")
        .authority(app.to_string())
        .path_and_query(path)
        .build()
        .ok()
        .filter(|uri| uri.authority().is_some_and(|a| a.as_str() == app.to_string()))
}

/// Whether a connection's first byte opens a TLS handshake. A client silent for
/// [`PLAINTEXT_DETECT_TIMEOUT`] is not TLS (a TLS client speaks first).
async fn starts_with_tls(tcp: &TcpStream) -> bool {
    let mut first = [0u8; 1];
    matches!(
        tokio::time::timeout(PLAINTEXT_DETECT_TIMEOUT, tcp.peek(&mut first)).await,
        Ok(Ok(1)) if first[0] == TLS_HANDSHAKE_RECORD
    )
}

/// Makes a plaintext request, or one read from a peer's tunnel, look like a peer's for
/// [`Inbound::handle`]: mesh headers the client set are dropped (it cannot name an
/// identity, a port or a protocol), the app port is the connection's, and HTTP/2 is
/// marked as such. HTTP/1.1 upgrades (WebSocket) and `CONNECT` are refused: they are
/// carried only as a peer's own `CONNECT` over mTLS.
/// Returns the refusal to send, if any.
fn as_mesh_request(req: &mut Request<Incoming>, port: u16) -> Option<Response<Body>> {
    if req.headers().contains_key(http::header::UPGRADE) || req.method() == Method::CONNECT {
        return Some(error_response(
            StatusCode::NOT_IMPLEMENTED,
            "plaintext-upgrade",
            "no upgrade or CONNECT from a plaintext client or inside a tunnel: call through the mesh for \
             WebSocket and tunnels"
                .into(),
        ));
    }
    h::strip_mesh_headers(req.headers_mut());
    req.headers_mut().insert(h::DST_PORT, HeaderValue::from(port));
    if req.version() == Version::HTTP_2 {
        req.headers_mut().insert(h::ORIG_PROTO, HeaderValue::from_static("h2"));
    }
    None
}
