//! The outbound side: the app's requests to other services.
//!
//! ```text
//! app ─HTTP/1.1 or h2c─▶ 127.0.0.1:4140 ─▶ destination (absolute URI, Host, :authority)
//!   ─▶ discovery: which service? ──no──▶ passthrough (forwarded as is, counted)
//!          │yes
//!          ▼
//!      endpoint (balance) ─▶ PeerPool: HTTP/2 over mTLS to <endpoint>:<mesh port>,
//!                            the app port and the client's protocol in headers
//! ```
//!
//! The destination is read through one seam ([`destination`]), so the transparent mode's
//! original destination (`SO_ORIGINAL_DST`) plugs in there.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::BytesMut;
use http::uri::{Authority, Scheme};
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper::service::service_fn;
use hyper::upgrade::OnUpgrade;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use wary_certs::SpiffeId;

use crate::balance::{Balancers, Pick};
use crate::routes::{RouteTable, Via};

use crate::detect::{self, Prefixed, Protocol};
use crate::drain::Drain;
use crate::http::{self as h, Body, error_response};
use crate::metrics as m;
use crate::pool::{ConnectError, PeerPool};
use crate::state::Cache;
use crate::tunnel;

/// The outbound proxy.
pub struct Outbound {
    pool: Arc<PeerPool>,
    namespace: String,
    passthrough: Client<HttpConnector, Body>,
    balancers: Arc<Balancers>,
    routes: Arc<ArcSwap<RouteTable>>,
    opaque_ports: Vec<u16>,
    drain: Arc<Drain>,
}

impl Outbound {
    /// Routes with the discovery state in `cache`, for a client in `namespace`, over
    /// connections from `pool`. Redirected connections to `opaque_ports` skip protocol
    /// detection (default [`detect::DEFAULT_OPAQUE_PORTS`]). Each app connection counts
    /// as open work for `drain` while it lasts.
    pub fn new(
        cache: Arc<Cache>,
        pool: Arc<PeerPool>,
        namespace: String,
        opaque_ports: Vec<u16>,
        drain: Arc<Drain>,
    ) -> Self {
        let balancers = Arc::new(Balancers::default());
        let routes = Arc::new(ArcSwap::from_pointee(RouteTable::build(&cache.load(), &balancers)));
        tokio::spawn(follow_discovery(
            cache.clone(),
            routes.clone(),
            balancers.clone(),
            pool.clone(),
        ));
        let mut connector = HttpConnector::new();
        // Linkerd's connect timeout, also outside the mesh.
        connector.set_connect_timeout(Some(PASSTHROUGH_CONNECT_TIMEOUT));
        connector.set_nodelay(true);
        Self {
            pool,
            namespace,
            passthrough: Client::builder(TokioExecutor::new()).build(connector),
            balancers,
            routes,
            opaque_ports,
            drain,
        }
    }

    /// The balancers, for admin pages.
    pub fn balancers(&self) -> Arc<Balancers> {
        self.balancers.clone()
    }

    /// Serves the app's connections on `listener` until the process ends: HTTP/1.1 or
    /// HTTP/2 with prior knowledge sent to the proxy (explicit mode), or any connection
    /// iptables redirected here (transparent mode).
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (tcp, _) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "outbound accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let outbound = self.clone();
            let active = self.drain.track();
            tokio::spawn(async move {
                let _active = active;
                match detect::original_dst(&tcp) {
                    None => outbound.serve_http(tcp, None).await,
                    Some(original) => outbound.transparent(tcp, original).await,
                }
            });
        }
    }

    /// A redirected connection: opaque at once on an opaque port (the proxy's list, or
    /// a service port declared `appProtocol: tcp`), else as its first bytes say.
    async fn transparent(self: Arc<Self>, mut tcp: TcpStream, original: SocketAddr) {
        let mut first = BytesMut::new();
        let declared_opaque = || {
            let routes = self.routes.load();
            routes.by_original(original).is_some_and(|(_, targets)| targets.opaque)
        };
        let protocol = if self.opaque_ports.contains(&original.port()) || declared_opaque() {
            Protocol::Opaque
        } else {
            detect::detect(&mut tcp, &mut first, detect::DETECT_TIMEOUT).await
        };
        let io = Prefixed::new(first.freeze(), tcp);
        match protocol {
            Protocol::Http => self.serve_http(io, Some(original)).await,
            Protocol::Opaque => self.opaque(io, original).await,
        }
    }

    /// HTTP on one connection; `original` is where a redirected connection was going.
    async fn serve_http<I>(self: Arc<Self>, io: I, original: Option<SocketAddr>)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let service = service_fn(move |req| {
            let outbound = self.clone();
            async move { Ok::<_, Infallible>(outbound.handle(req, original).await) }
        });
        let mut server = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        // A client that shuts its side down after sending a request still awaits the
        // answer (RFC 9112 §9.6): that is not a cancellation.
        server.http1().half_close(true);
        server.http2().max_header_list_size(h::MAX_HEADER_LIST_SIZE);
        let _ = server.serve_connection_with_upgrades(TokioIo::new(io), service).await;
    }

    /// An opaque stream that was going to `original`: to the endpoint's proxy in a
    /// `CONNECT` tunnel, or as it is outside the mesh.
    async fn opaque<I>(&self, io: I, original: SocketAddr)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let routes = self.routes.load();
        let Some((route, targets)) = routes.by_original(original) else {
            metrics::counter!(m::REQUESTS, "direction" => "outbound", "service" => "passthrough").increment(1);
            drop(routes);
            return match connect_plain(original).await {
                Ok(tcp) => tunnel::bridge(io, tcp, &original.to_string()).await,
                Err(e) => {
                    tracing::info!(%original, error = %e, "opaque passthrough failed; closing the client's connection")
                }
            };
        };
        route.requests.increment(1);
        let Some(mut pick) = route.balancer.pick(&targets.addrs, &route.settings) else {
            tracing::info!(service = %route.name, "no ready endpoints; closing the client's connection");
            return;
        };
        let target = targets.targets[pick.index].clone();
        drop(routes);
        let what = format!("{original} via {}", target.app);
        match target.via {
            Via::Plain => match connect_plain(target.app).await {
                Ok(tcp) => {
                    pick.first_byte();
                    tunnel::bridge(io, tcp, &what).await;
                }
                Err(e) => tracing::info!(%what, error = %e, "opaque connect failed; closing the client's connection"),
            },
            Via::Mesh { peer, identity } => {
                let dst = authority_of(original);
                let hop = Hop {
                    dst: &dst,
                    peer,
                    identity: &identity,
                    app_port: u32::from(target.app.port()),
                };
                let mut connect = connect_request(&dst);
                connect
                    .headers_mut()
                    .insert(h::ORIG_PROTO, HeaderValue::from_static("tcp"));
                match self.open_tunnel(connect, &hop).await {
                    Ok(mut response) => {
                        pick.first_byte();
                        if let Some(upstream) = response.extensions_mut().remove::<OnUpgrade>()
                            && let Ok(up) = upstream.await
                        {
                            tunnel::bridge(io, TokioIo::new(up), &what).await;
                        }
                    }
                    Err(refused) => tracing::info!(
                        %what,
                        status = %refused.status(),
                        cause = ?refused.headers().get(h::ERROR),
                        "the peer refused an opaque stream; closing the client's connection"
                    ),
                }
            }
        }
    }

    async fn handle(&self, mut req: Request<Incoming>, original: Option<SocketAddr>) -> Response<Body> {
        let Some(dst) = destination(&req).or_else(|| original.map(authority_of)) else {
            return error_response(
                StatusCode::BAD_REQUEST,
                "no-destination",
                "no destination: send an absolute-form URI (HTTP_PROXY), a Host header, or CONNECT host:port".into(),
            );
        };
        let mode = if req.method() == Method::CONNECT {
            let Some(downstream) = req.extensions_mut().remove::<OnUpgrade>() else {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    "bad-connect",
                    "CONNECT cannot be tunnelled here".into(),
                );
            };
            if dst.port_u16().is_none() {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    "bad-connect",
                    format!("CONNECT {dst}: name the port, as in CONNECT host:port"),
                );
            }
            Mode::Tcp(downstream)
        } else if let Some(protocol) = tunnel::upgrade_protocol(&req) {
            match req.extensions_mut().remove::<OnUpgrade>() {
                Some(downstream) => Mode::Upgrade(protocol, downstream),
                None => Mode::Http,
            }
        } else {
            Mode::Http
        };
        let port = dst.port_u16().unwrap_or(80);
        let routes = self.routes.load();
        let found = match original {
            // Redirected: where the app was going decides, not what its Host says.
            Some(original) => routes.by_original(original),
            None => routes.by_name(dst.host(), port, &self.namespace),
        };
        let Some((route, targets)) = found else {
            metrics::counter!(m::REQUESTS, "direction" => "outbound", "service" => "passthrough").increment(1);
            return self.forward_plain(req, mode, dst, original, None).await;
        };
        route.requests.increment(1);
        let Some(pick) = route.balancer.pick(&targets.addrs, &route.settings) else {
            return error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "no-endpoints",
                format!("{}:{port}: no ready endpoints", route.name),
            );
        };
        let target = &targets.targets[pick.index];
        match &target.via {
            Via::Plain => {
                let to = target.app;
                self.forward_plain(req, mode, dst, Some(to), Some(pick)).await
            }
            Via::Mesh { peer, identity } => {
                let (peer, identity, app_port) = (*peer, identity.clone(), target.app.port());
                drop(routes);
                let hop = Hop {
                    dst: &dst,
                    peer,
                    identity: &identity,
                    app_port: u32::from(app_port),
                };
                match mode {
                    Mode::Http => self.forward_mesh(req, &hop, pick).await,
                    tunnel => self.tunnel_mesh(req, tunnel, &hop, pick).await,
                }
            }
        }
    }

    /// Over the mesh: HTTP/2 over mTLS to the peer proxy.
    async fn forward_mesh(&self, req: Request<Incoming>, hop: &Hop<'_>, mut pick: Pick) -> Response<Body> {
        let expect_continue = h::expects_continue(&req);
        let (mut parts, body) = req.into_parts();
        let proto = if parts.version == Version::HTTP_2 { "h2" } else { "h1" };
        h::strip_hop_by_hop(&mut parts.headers);
        h::strip_mesh_headers(&mut parts.headers);
        parts.headers.insert(h::DST_PORT, HeaderValue::from(hop.app_port));
        parts.headers.insert(h::ORIG_PROTO, HeaderValue::from_static(proto));
        parts.headers.remove(http::header::HOST);
        parts.uri = with_authority(&parts.uri, hop.dst);
        parts.version = Version::HTTP_2;
        let mut sender = match self.pool.get(hop.peer, hop.identity).await {
            Ok(s) => s,
            Err(e) => return connect_error(&e),
        };
        let body = h::request_body(expect_continue, body);
        match sender.send_request(Request::from_parts(parts, body)).await {
            Ok(response) => {
                pick.first_byte();
                hold_until_body_ends(h::relay(response), pick)
            }
            Err(e) => self.peer_failed(&sender, hop, &e),
        }
    }

    /// A tunnel over the mesh: one HTTP/2 `CONNECT` stream to the peer proxy, carrying
    /// an opaque stream or an upgraded HTTP/1.1 connection (see [`tunnel`]).
    async fn tunnel_mesh(&self, req: Request<Incoming>, mode: Mode, hop: &Hop<'_>, mut pick: Pick) -> Response<Body> {
        let (parts, _) = req.into_parts();
        let mut connect = connect_request(hop.dst);
        let headers = connect.headers_mut();
        let (downstream, asked) = match mode {
            Mode::Tcp(downstream) => {
                headers.insert(h::ORIG_PROTO, HeaderValue::from_static("tcp"));
                (downstream, None)
            }
            Mode::Upgrade(protocol, downstream) => {
                *headers = parts.headers;
                h::strip_hop_by_hop(headers);
                h::strip_mesh_headers(headers);
                headers.remove(http::header::HOST);
                headers.insert(h::ORIG_PROTO, HeaderValue::from_static("h1-upgrade"));
                headers.insert(h::UPGRADE, protocol.clone());
                headers.insert(
                    h::METHOD,
                    HeaderValue::from_str(parts.method.as_str()).expect("methods are tokens"),
                );
                let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
                headers.insert(h::PATH, HeaderValue::from_str(path).expect("paths are visible ASCII"));
                (downstream, Some(protocol))
            }
            Mode::Http => unreachable!("plain requests are not tunnelled"),
        };
        let mut response = match self.open_tunnel(connect, hop).await {
            Ok(response) => response,
            // Refused (authorization, the app's port closed...) or the app answered the
            // upgrade with an error: relayed as is.
            Err(refused) => return hold_until_body_ends(refused, pick),
        };
        pick.first_byte();
        let Some(upstream) = response.extensions_mut().remove::<OnUpgrade>() else {
            return error_response(
                StatusCode::BAD_GATEWAY,
                "peer-failed",
                "the peer's tunnel did not open".into(),
            );
        };
        let what = format!("{} via {}", hop.dst, hop.peer);
        let switched = response.headers().get(h::UPGRADE).cloned();
        let (mut parts, _) = response.into_parts();
        h::strip_hop_by_hop(&mut parts.headers);
        h::strip_mesh_headers(&mut parts.headers);
        match (asked, switched) {
            (None, _) => {
                tunnel::spawn_joined(downstream, upstream, what, pick);
                Response::new(h::empty())
            }
            (Some(_), Some(protocol)) => {
                tunnel::ask_upgrade(&mut parts.headers, protocol);
                parts.status = StatusCode::SWITCHING_PROTOCOLS;
                tunnel::spawn_joined(downstream, upstream, what, pick);
                Response::from_parts(parts, h::empty())
            }
            // The app answered 200 without switching: its body follows in the stream.
            (Some(_), None) => match upstream.await {
                Ok(up) => Response::from_parts(parts, tunnel::body_from(TokioIo::new(up))),
                Err(e) => error_response(StatusCode::BAD_GATEWAY, "peer-failed", format!("{what}: {e}")),
            },
        }
    }

    /// Sends a `CONNECT` to the peer proxy of `hop`: its 200 answer (the tunnel is
    /// open), or the answer to relay instead.
    async fn open_tunnel(
        &self,
        mut connect: Request<Body>,
        hop: &Hop<'_>,
    ) -> Result<Response<Incoming>, Response<Body>> {
        connect
            .headers_mut()
            .insert(h::DST_PORT, HeaderValue::from(hop.app_port));
        let mut sender = self
            .pool
            .get(hop.peer, hop.identity)
            .await
            .map_err(|e| connect_error(&e))?;
        let response = sender
            .send_request(connect)
            .await
            .map_err(|e| self.peer_failed(&sender, hop, &e))?;
        if response.status() == StatusCode::OK {
            Ok(response)
        } else {
            Err(h::relay(response))
        }
    }

    fn peer_failed(&self, sender: &SendRequest<Body>, hop: &Hop<'_>, e: &hyper::Error) -> Response<Body> {
        // One failed stream (a reset, an aborted upload) is no reason to drop a
        // multiplexed connection; a closed one is.
        if sender.is_closed() {
            self.pool.evict(hop.peer, hop.identity);
        }
        error_response(
            StatusCode::BAD_GATEWAY,
            "peer-failed",
            format!("request to {} failed: {e}", hop.peer),
        )
    }

    /// Outside the mesh (or to an endpoint without a proxy): plain HTTP/1.1 to `to`, or
    /// to the destination itself; a tunnel is a TCP connection there.
    async fn forward_plain(
        &self,
        req: Request<Incoming>,
        mode: Mode,
        dst: Authority,
        to: Option<SocketAddr>,
        pick: Option<Pick>,
    ) -> Response<Body> {
        let target = match to {
            Some(addr) => Authority::try_from(addr.to_string().as_str()).unwrap_or(dst.clone()),
            None => dst.clone(),
        };
        let expect_continue = h::expects_continue(&req);
        let (mut parts, body) = req.into_parts();
        let protocol = match mode {
            Mode::Tcp(downstream) => {
                let connect = tokio::time::timeout(
                    PASSTHROUGH_CONNECT_TIMEOUT,
                    TcpStream::connect((target.host(), target.port_u16().unwrap_or(80))),
                );
                return match connect.await {
                    Ok(Ok(tcp)) => {
                        let _ = tcp.set_nodelay(true);
                        tunnel::spawn_bridge(downstream, tcp, target.to_string(), pick);
                        Response::new(h::empty())
                    }
                    Ok(Err(e)) => error_response(StatusCode::BAD_GATEWAY, "connect-failed", format!("{target}: {e}")),
                    Err(_) => error_response(
                        StatusCode::GATEWAY_TIMEOUT,
                        "connect-failed",
                        format!("{target}: no answer within {PASSTHROUGH_CONNECT_TIMEOUT:?}"),
                    ),
                };
            }
            Mode::Upgrade(protocol, downstream) => Some((protocol, downstream)),
            Mode::Http => None,
        };
        h::strip_hop_by_hop(&mut parts.headers);
        h::strip_mesh_headers(&mut parts.headers);
        if let Some((protocol, _)) = &protocol {
            tunnel::ask_upgrade(&mut parts.headers, protocol.clone());
        }
        if !parts.headers.contains_key(http::header::HOST)
            && let Ok(host) = HeaderValue::from_str(dst.as_str())
        {
            parts.headers.insert(http::header::HOST, host);
        }
        parts.uri = with_authority(&parts.uri, &target);
        parts.version = Version::HTTP_11;
        let body = h::request_body(expect_continue, body);
        let mut response = match self.passthrough.request(Request::from_parts(parts, body)).await {
            Ok(response) => response,
            Err(e) => {
                return error_response(
                    StatusCode::BAD_GATEWAY,
                    "connect-failed",
                    format!("{target}: {}", crate::control::causes(&e)),
                );
            }
        };
        if let Some((_, downstream)) = protocol
            && response.status() == StatusCode::SWITCHING_PROTOCOLS
            && let Some(upstream) = response.extensions_mut().remove::<OnUpgrade>()
        {
            // The 101 keeps its Connection and Upgrade headers: they are this hop's too.
            let (parts, _) = response.into_parts();
            let what = target.to_string();
            tunnel::spawn_joined(downstream, upstream, what, pick);
            return Response::from_parts(parts, h::empty());
        }
        match pick {
            Some(mut pick) => {
                pick.first_byte();
                hold_until_body_ends(h::relay(response), pick)
            }
            None => h::relay(response),
        }
    }
}

/// How a request travels.
enum Mode {
    /// A request and its response.
    Http,
    /// `CONNECT`: an opaque byte stream once the app's side is upgraded.
    Tcp(OnUpgrade),
    /// An HTTP/1.1 `Upgrade` to the protocol named.
    Upgrade(HeaderValue, OnUpgrade),
}

/// One trip to a peer proxy.
struct Hop<'a> {
    dst: &'a Authority,
    peer: SocketAddr,
    identity: &'a SpiffeId,
    app_port: u32,
}

/// How long a `CONNECT` outside the mesh waits for TCP: 1 s, Linkerd's connect timeout.
const PASSTHROUGH_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// After every discovery update: rebuilds the route table, and forgets balancer
/// statistics and pooled connections of endpoints that are gone, so the proxy's memory
/// follows the mesh's size.
async fn follow_discovery(
    cache: Arc<Cache>,
    routes: Arc<ArcSwap<RouteTable>>,
    balancers: Arc<Balancers>,
    pool: Arc<PeerPool>,
) {
    let mut changed = cache.subscribe();
    while changed.changed().await.is_ok() {
        let state = cache.load();
        routes.store(Arc::new(RouteTable::build(&state, &balancers)));
        let peers = state
            .endpoints
            .items
            .values()
            .flat_map(|e| e.endpoints.iter())
            .filter_map(|e| {
                Some(SocketAddr::new(
                    e.address.parse().ok()?,
                    u16::try_from(e.mesh_port).ok()?,
                ))
            })
            .collect();
        pool.retain(&peers);
        let current = state
            .endpoints
            .items
            .iter()
            .map(|(name, e)| {
                let addrs = e
                    .endpoints
                    .iter()
                    .filter_map(|e| Some(SocketAddr::new(e.address.parse().ok()?, u16::try_from(e.port).ok()?)))
                    .collect();
                (name.clone(), addrs)
            })
            .collect();
        balancers.prune(&current);
    }
}

/// The endpoint stays "in flight" for the balancer until the response body has been
/// relayed (or dropped), not just until its headers arrive.
fn hold_until_body_ends(response: Response<Body>, pick: Pick) -> Response<Body> {
    response.map(|body| {
        body.map_frame(move |frame| {
            let _in_flight = &pick;
            frame
        })
        .boxed()
    })
}

/// Where the app wants to go: the absolute-form URI's authority (`HTTP_PROXY` clients),
/// the HTTP/2 `:authority`, or the `Host` header. The one seam for the destination.
pub fn destination<B>(req: &Request<B>) -> Option<Authority> {
    if let Some(a) = req.uri().authority() {
        return Some(a.clone());
    }
    req.headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.parse().ok())
}

/// `ip:port` as an authority.
fn authority_of(addr: SocketAddr) -> Authority {
    Authority::try_from(addr.to_string()).expect("an address is an authority")
}

/// An HTTP/2 `CONNECT` to a peer proxy for `dst`, its protocol and port still to add.
fn connect_request(dst: &Authority) -> Request<Body> {
    let mut connect = Request::new(h::empty());
    *connect.method_mut() = Method::CONNECT;
    *connect.uri_mut() = Uri::from(dst.clone());
    connect
}

/// A TCP connection outside the mesh, within [`PASSTHROUGH_CONNECT_TIMEOUT`].
async fn connect_plain(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let tcp = tokio::time::timeout(PASSTHROUGH_CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer within 1 s"))??;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

fn with_authority(uri: &Uri, authority: &Authority) -> Uri {
    let mut parts = uri.clone().into_parts();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = Some(authority.clone());
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    Uri::from_parts(parts).unwrap_or_else(|_| uri.clone())
}

fn connect_error(e: &ConnectError) -> Response<Body> {
    let (status, cause) = match e {
        ConnectError::Tcp { .. } => (StatusCode::SERVICE_UNAVAILABLE, "connect-failed"),
        ConnectError::Tls { .. } => (StatusCode::BAD_GATEWAY, "tls-failed"),
        ConnectError::Http2 { .. } => (StatusCode::BAD_GATEWAY, "http2-failed"),
    };
    error_response(status, cause, e.to_string())
}
