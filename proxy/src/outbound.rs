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
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use wary_certs::SpiffeId;

use crate::balance::{Balancers, Pick};
use crate::retry::{self, Overflow, ReplayBody, RetryOn};
use crate::routes::{Policy, PortTargets, Route, RouteTable, Target, Via};

use crate::access::{self, AccessLog};
use crate::detect::{self, Prefixed, Protocol};
use crate::drain::Drain;
use crate::header_case::{self, CaseTap, HEADER_CASE, Role, Spellings, TapConnector};
use crate::http::{self as h, Body, error_response};
use crate::metrics as m;
use crate::pool::{ConnectError, PeerPool};
use crate::state::Cache;
use crate::tunnel;

/// The outbound proxy.
pub struct Outbound {
    pool: Arc<PeerPool>,
    namespace: String,
    passthrough: Client<TapConnector, Body>,
    balancers: Arc<Balancers>,
    routes: Arc<ArcSwap<RouteTable>>,
    opaque_ports: Vec<u16>,
    /// This proxy's `Via` entry on requests it forwards outside the mesh; seeing it
    /// come back means a loop.
    via: HeaderValue,
    detect_timeout: Duration,
    expect_continue_wait: Duration,
    access_log: Option<Arc<AccessLog>>,
    tracing: bool,
    drain: Arc<Drain>,
}

/// How the outbound side behaves; `main` fills it from flags.
#[derive(Debug, Clone)]
pub struct OutboundConfig {
    /// The client's namespace, for bare host names.
    pub namespace: String,
    /// Redirected connections to these ports skip protocol detection (default
    /// [`detect::DEFAULT_OPAQUE_PORTS`]).
    pub opaque_ports: Vec<u16>,
    /// How long detection waits for a redirected connection's first bytes (default
    /// [`detect::DETECT_TIMEOUT`], 1 s).
    pub detect_timeout: Duration,
    /// How long a request with `Expect: 100-continue` holds its body back for the
    /// server's answer (default [`h::EXPECT_CONTINUE_WAIT`], 250 ms).
    pub expect_continue_wait: Duration,
    /// Where access log lines go; `None` (the default): no access log.
    pub access_log: Option<Arc<AccessLog>>,
    /// Continue (or start) W3C trace context on each request; default off.
    pub tracing: bool,
}

impl Outbound {
    /// Routes with the discovery state in `cache` over connections from `pool`, as
    /// `config` says. Each app connection and tunnel counts as open work for `drain`
    /// while it lasts.
    pub fn new(cache: Arc<Cache>, pool: Arc<PeerPool>, config: OutboundConfig, drain: Arc<Drain>) -> Self {
        let balancers = Arc::new(Balancers::default());
        let routes = Arc::new(ArcSwap::from_pointee(RouteTable::build(&cache.load(), &balancers)));
        tokio::spawn(follow_discovery(
            cache.clone(),
            routes.clone(),
            balancers.clone(),
            pool.clone(),
        ));
        tokio::spawn({
            let pool = pool.clone();
            async move {
                let mut tick = tokio::time::interval(Duration::from_secs(10));
                loop {
                    tick.tick().await;
                    pool.close_idle();
                }
            }
        });
        let mut connector = HttpConnector::new();
        // Linkerd's connect timeout, also outside the mesh.
        connector.set_connect_timeout(Some(PASSTHROUGH_CONNECT_TIMEOUT));
        connector.set_nodelay(true);
        Self {
            pool,
            namespace: config.namespace,
            // Plain connections (outside the mesh, or to endpoints without a proxy)
            // close after PLAIN_IDLE_TIMEOUT unused, at most 8 kept per host: hyper's
            // pool cannot drop one host's connections, so this bounds how long an
            // endpoint discovery removed keeps its file descriptors.
            passthrough: Client::builder(TokioExecutor::new())
                .pool_timer(TokioTimer::new())
                .pool_idle_timeout(PLAIN_IDLE_TIMEOUT)
                .pool_max_idle_per_host(8)
                .build(TapConnector(connector)),
            via: HeaderValue::try_from(format!("1.1 wary-{:08x}", rand::random::<u32>()))
                .expect("a token is a header value"),
            balancers,
            routes,
            opaque_ports: config.opaque_ports,
            detect_timeout: config.detect_timeout,
            expect_continue_wait: config.expect_continue_wait,
            access_log: config.access_log,
            tracing: config.tracing,
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
            detect::detect(&mut tcp, &mut first, self.detect_timeout).await
        };
        if protocol == Protocol::Opaque && first.is_empty() {
            tracing::info!(
                %original,
                "the client sent nothing for {:?}: carried as opaque TCP; if its server speaks first, \
                 add port {} to WARY_OPAQUE_PORTS or declare the Service port appProtocol: tcp",
                self.detect_timeout,
                original.port()
            );
        }
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
        let client = Arc::new(ClientConn::default());
        let closing = client.clone();
        let io = CaseTap::new(io, Role::Requests);
        let case = io.log();
        let service = service_fn(move |mut req| {
            header_case::note_request(&case, &mut req);
            let (outbound, client) = (self.clone(), client.clone());
            async move { Ok::<_, Infallible>(outbound.handle(req, original, &client).await) }
        });
        let mut server = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        // A client that shuts its side down after sending a request still awaits the
        // answer (RFC 9112 §9.6): that is not a cancellation.
        // A client gets 30 s to send its request head (hyper's default once it has a
        // timer): slow-header clients cannot hold connections forever.
        server.http1().half_close(true).timer(TokioTimer::new());
        server
            .http2()
            .max_header_list_size(h::H2_MAX_REQUEST_HEADER_LIST_SIZE)
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5));
        let connection = server.serve_connection_with_upgrades(TokioIo::new(io), service);
        tokio::pin!(connection);
        tokio::select! {
            _ = connection.as_mut() => return,
            () = closing.close.notified() => connection.as_mut().graceful_shutdown(),
        }
        let _ = connection.await;
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
                    pick.success();
                    tunnel::bridge(io, tcp, &what).await;
                }
                Err(e) => {
                    pick.failure();
                    tracing::info!(%what, error = %e, "opaque connect failed; closing the client's connection");
                }
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
                match self.open_tunnel(connect, &hop, &mut pick).await {
                    Ok(mut response) => {
                        pick.first_byte();
                        pick.success();
                        if let Some(upstream) = response.extensions_mut().remove::<OnUpgrade>()
                            && let Ok(up) = upstream.await
                        {
                            tunnel::bridge(io, TokioIo::new(up), &what).await;
                        }
                    }
                    Err(refused) => {
                        report(&mut pick, refused.status());
                        tracing::info!(
                            %what,
                            status = %refused.status(),
                            cause = ?refused.headers().get(h::ERROR),
                            "the peer refused an opaque stream; closing the client's connection"
                        );
                    }
                }
            }
        }
    }

    async fn handle(
        &self,
        mut req: Request<Incoming>,
        original: Option<SocketAddr>,
        client: &ClientConn,
    ) -> Response<Body> {
        if req
            .headers()
            .get_all(http::header::VIA)
            .iter()
            .any(|v| v.as_bytes().windows(self.via.len()).any(|w| w == self.via.as_bytes()))
        {
            return error_response(
                StatusCode::LOOP_DETECTED,
                "loop-detected",
                "this request already passed through this proxy: its destination leads back here".into(),
            );
        }
        // Between proxies a header block may be at most 64 KiB; refuse a larger one
        // here, where it is one client's problem, rather than on the shared connection.
        if let Some(refused) = h::refuse_large_headers(req.headers()) {
            return refused;
        }
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
        let routes = self.routes.load_full();
        let found = match original {
            // Redirected: where the app was going decides, not what its Host says.
            // The same address now serving another service (a reused pod IP) counts as
            // the endpoint gone: this connection's requests stay with their service.
            Some(original) => match routes.by_original(original).filter(|_| {
                client.home.get().is_none_or(|(service, port)| {
                    routes
                        .endpoint_service(original)
                        .is_none_or(|(s, p)| s == service && p == *port)
                })
            }) {
                Some(found) => {
                    if client.home.get().is_none()
                        && let Some((service, port)) = routes.endpoint_service(original)
                    {
                        let _ = client.home.set((service.to_string(), port));
                    }
                    Some(found)
                }
                // The endpoint this connection was going to left: this request goes to
                // its service's others, and the connection closes after it (HTTP/1
                // `Connection: close`, HTTP/2 GOAWAY), so the client reconnects to a
                // live one rather than fail on a dead address.
                None => client.home.get().and_then(|(service, port)| {
                    if !client.closing.swap(true, std::sync::atomic::Ordering::Relaxed) {
                        tracing::info!(%original, %service, "the endpoint this connection was going to left; serving its requests through the service and closing the connection");
                        metrics::counter!(m::CLIENT_CONNECTIONS_CLOSED, "reason" => "endpoint_removed").increment(1);
                        client.close.notify_one();
                    }
                    routes.by_name(service, *port, &self.namespace)
                }),
            },
            None => routes.by_name(dst.host(), port, &self.namespace),
        };
        let Some((route, targets)) = found else {
            if original.is_none()
                && let Some(service) = routes.resolve(dst.host(), &self.namespace)
            {
                let mut ports: Vec<u16> = service.ports.keys().copied().collect();
                ports.sort_unstable();
                return error_response(
                    StatusCode::NOT_FOUND,
                    "no-such-port",
                    format!("{} has no port {port}; its ports: {ports:?}", service.name),
                );
            }
            metrics::counter!(m::REQUESTS, "direction" => "outbound", "service" => "passthrough").increment(1);
            return self.forward_plain(req, mode, dst, original, None).await;
        };
        route.requests.increment(1);
        if let Mode::Http = mode {
            return self.forward_http(req, &dst, route, targets).await;
        }
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
                self.tunnel_mesh(req, mode, &hop, pick).await
            }
        }
    }

    /// A request to a mesh service: admitted by its bulkhead, within its deadline,
    /// tried on up to `attempts` endpoints as its retry policy and budget allow.
    async fn forward_http(
        &self,
        mut req: Request<Incoming>,
        dst: &Authority,
        route: &Route,
        targets: &PortTargets,
    ) -> Response<Body> {
        let started = tokio::time::Instant::now();
        let hop = self.tracing.then(|| access::continue_trace(req.headers_mut()));
        // Copied only when there is an access log to write.
        let logged = self
            .access_log
            .as_ref()
            .map(|_| (req.method().to_string(), req.uri().path().to_string()));
        let grpc = h::is_grpc(req.headers());
        let client_deadline = h::grpc_timeout(req.headers());
        let deadline = match (route.policy.request_timeout, client_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        // The deadline covers waiting in the bulkhead too.
        let work = async {
            let slot = match route.balancer.bulkhead.admit(route.policy.pool).await {
                Ok(slot) => slot,
                Err(Overflow::Pending(waiting)) => {
                    route.overflows.increment(1);
                    return h::proxy_error(
                        grpc,
                        StatusCode::SERVICE_UNAVAILABLE,
                        "overloaded",
                        format!(
                            "{}: {} requests in flight and {waiting} waiting, the most its connectionPool allows",
                            route.name,
                            route.policy.pool.max_requests.unwrap_or(0)
                        ),
                    );
                }
            };
            let response = self.attempts(req, dst, route, targets, grpc).await;
            // The slot is held while the response streams.
            response.map(|body| {
                body.map_frame(move |frame| {
                    let _slot = &slot;
                    frame
                })
                .boxed()
            })
        };
        let response = match deadline {
            None => work.await,
            Some(deadline) => match tokio::time::timeout(deadline, work).await {
                Ok(response) => response,
                Err(_) => h::proxy_error(
                    grpc,
                    StatusCode::GATEWAY_TIMEOUT,
                    "request-timeout",
                    format!("{}: no answer within {deadline:?}", route.name),
                ),
            },
        };
        let took = started.elapsed();
        route.count_response(response.status());
        route.latency.record(took.as_secs_f64());
        if let (Some(log), Some((method, path))) = (&self.access_log, &logged) {
            let header = |name| response.headers().get(name).and_then(|v: &HeaderValue| v.to_str().ok());
            log.record(&access::Entry {
                time: access::now(),
                direction: "outbound",
                service: &route.name,
                client: None,
                method,
                authority: dst.as_str(),
                path,
                status: response.status().as_u16(),
                attempts: header(h::ATTEMPTS).and_then(|a| a.parse().ok()),
                duration_ms: took.as_secs_f64() * 1e3,
                error: header(h::ERROR),
                trace_id: hop.as_ref().map(|h| h.trace_id.as_str()),
                span_id: hop.as_ref().map(|h| h.span_id.as_str()),
            });
        }
        response
    }

    /// The attempts of one request; see [`crate::retry`].
    async fn attempts(
        &self,
        req: Request<Incoming>,
        dst: &Authority,
        route: &Route,
        targets: &PortTargets,
        grpc: bool,
    ) -> Response<Body> {
        let retry = &route.policy.retry;
        let expect_continue = h::expects_continue(&req);
        let (mut parts, body) = req.into_parts();
        let proto = if parts.version == Version::HTTP_2 { "h2" } else { "h1" };
        h::strip_hop_by_hop(&mut parts.headers);
        h::strip_mesh_headers(&mut parts.headers);
        parts.headers.insert(h::ORIG_PROTO, HeaderValue::from_static(proto));
        if let Some(Spellings(case)) = parts.extensions.remove() {
            parts.headers.insert(HEADER_CASE, case);
        }
        let idempotent = retry::idempotent(&parts.method);
        let first = ReplayBody::new(body, retry.max_body_bytes);
        // A handle on what the first attempt keeps; each retry replays from it.
        let kept = first.keeper();
        let mut body = h::gate_body(expect_continue.then_some(self.expect_continue_wait), first);
        route.balancer.budget.deposit(retry.budget_ttl);
        let mut avoid = None;
        for attempt in 1..=retry.attempts {
            let Some(mut pick) = route.balancer.pick_avoiding(&targets.addrs, &route.settings, avoid) else {
                return h::proxy_error(
                    grpc,
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no-endpoints",
                    format!("{}:{}: no ready endpoints", route.name, dst.port_u16().unwrap_or(80)),
                );
            };
            let target = &targets.targets[pick.index];
            let head = clone_head(&parts);
            let sent = self.send_once(head, body, dst, target, &route.policy, grpc, &mut pick);
            let outcome = sent.await;
            let (response, retryable, reached) = match outcome {
                Ok(mut response) => {
                    pick.first_byte();
                    // The answer's header-name case: from the peer's proxy, or read here
                    // from an endpoint without one (whose own header counts for nothing).
                    let case = match target.via {
                        Via::Mesh { .. } => response.headers_mut().remove(HEADER_CASE),
                        Via::Plain => header_case::take_response_case(&mut response),
                    };
                    let status = response.status();
                    if status.is_server_error() {
                        pick.failure();
                    } else {
                        pick.success();
                    }
                    let retryable = retry.retryable_answer(status, response.headers());
                    let mut response = h::relay(response);
                    if proto == "h1"
                        && let Some(case) = case
                    {
                        header_case::restore_into(response.extensions_mut(), &case).await;
                    }
                    (hold_until_body_ends(response, pick), retryable, true)
                }
                Err((failure, response)) => {
                    // A refused stream says nothing about the endpoint's health.
                    if failure != Failure::RefusedStream {
                        pick.failure();
                    }
                    drop(pick);
                    let retryable = retry.retry_on.has(failure.condition());
                    (response, retryable, failure.reached())
                }
            };
            let last = attempt == retry.attempts;
            // A request the app may have seen is sent again only if it is idempotent.
            let safe = idempotent || !reached;
            if !retryable || last || !safe {
                return with_attempts(response, attempt);
            }
            let Some(replay) = kept.replay() else {
                route.retries_not_replayable.increment(1);
                return with_attempts(response, attempt);
            };
            if !route.balancer.budget.withdraw(retry) {
                route.retries_budget_exhausted.increment(1);
                tracing::debug!(service = %route.name, "retry budget exhausted");
                return with_attempts(response, attempt);
            }
            route.retries_sent.increment(1);
            drop(response);
            avoid = Some(target.app);
            body = replay.boxed();
            tokio::time::sleep(retry.backoff(attempt)).await;
        }
        unreachable!("the last attempt returns")
    }

    /// One attempt to `target`: through its proxy over mTLS, or plain when it has none.
    /// `pick`'s RTT clock starts once a connection to the peer is ready.
    #[allow(clippy::too_many_arguments)]
    async fn send_once(
        &self,
        head: Head,
        body: Body,
        dst: &Authority,
        target: &Target,
        policy: &Policy,
        grpc: bool,
        pick: &mut Pick,
    ) -> Result<Response<Incoming>, (Failure, Response<Body>)> {
        let (per_try, connect_timeout, idle) = (policy.per_try_timeout, policy.connect_timeout, policy.idle_timeout);
        let send = async {
            match &target.via {
                Via::Mesh { peer, identity } => {
                    let mut parts = head.into_parts();
                    parts.headers.insert(h::DST_PORT, HeaderValue::from(target.app.port()));
                    parts.headers.remove(http::header::HOST);
                    parts.uri = with_authority(&parts.uri, dst);
                    parts.version = Version::HTTP_2;
                    let mut sender = match self.pool.get(*peer, identity, connect_timeout, idle).await {
                        Ok(sender) => sender,
                        Err(e) => return Err((Failure::Connect, connect_error(&e))),
                    };
                    pick.connected();
                    match sender.try_send_request(Request::from_parts(parts, body)).await {
                        Ok(response) => Ok(response),
                        Err(e) => {
                            // Handed back unsent: the connection closed first.
                            let failure = if e.message().is_some() {
                                Failure::Connect
                            } else {
                                Failure::of(e.error())
                            };
                            let hop = Hop {
                                dst,
                                peer: *peer,
                                identity,
                                app_port: u32::from(target.app.port()),
                            };
                            Err((failure, self.peer_failed(&sender, &hop, e.error())))
                        }
                    }
                }
                Via::Plain => {
                    let mut parts = head.into_parts();
                    parts.headers.remove(h::ORIG_PROTO);
                    if let Some(case) = parts.headers.remove(HEADER_CASE) {
                        header_case::restore_into(&mut parts.extensions, &case).await;
                    }
                    if !parts.headers.contains_key(http::header::HOST)
                        && let Ok(host) = HeaderValue::from_str(dst.as_str())
                    {
                        parts.headers.insert(http::header::HOST, host);
                    }
                    parts.uri = with_authority(&parts.uri, &authority_of(target.app));
                    parts.version = Version::HTTP_11;
                    match self.passthrough.request(Request::from_parts(parts, body)).await {
                        Ok(response) => Ok(response),
                        Err(e) => {
                            let failure = if e.is_connect() {
                                Failure::Connect
                            } else {
                                Failure::Reset
                            };
                            let message = format!("{}: {}", target.app, crate::control::causes(&e));
                            Err((
                                failure,
                                error_response(StatusCode::BAD_GATEWAY, "connect-failed", message),
                            ))
                        }
                    }
                }
            }
        };
        let Some(per_try) = per_try else {
            return send.await;
        };
        match tokio::time::timeout(per_try, send).await {
            Ok(outcome) => outcome,
            Err(_) => Err((
                Failure::Timeout,
                h::proxy_error(
                    grpc,
                    StatusCode::GATEWAY_TIMEOUT,
                    "per-try-timeout",
                    format!("{}: no answer within the per-try timeout {per_try:?}", target.app),
                ),
            )),
        }
    }

    /// A tunnel over the mesh: one HTTP/2 `CONNECT` stream to the peer proxy, carrying
    /// an opaque stream or an upgraded HTTP/1.1 connection (see [`tunnel`]).
    async fn tunnel_mesh(&self, req: Request<Incoming>, mode: Mode, hop: &Hop<'_>, mut pick: Pick) -> Response<Body> {
        let (mut parts, _) = req.into_parts();
        let case = parts.extensions.remove::<Spellings>();
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
                headers.insert(
                    h::PATH,
                    HeaderValue::from_str(path).expect("a URI's path is a valid header value"),
                );
                if let Some(Spellings(case)) = case {
                    headers.insert(HEADER_CASE, case);
                }
                (downstream, Some(protocol))
            }
            Mode::Http => unreachable!("plain requests are not tunnelled"),
        };
        let mut response = match self.open_tunnel(connect, hop, &mut pick).await {
            Ok(response) => response,
            // Refused (authorization, the app's port closed...) or the app answered the
            // upgrade with an error: relayed as is.
            Err(refused) => {
                report(&mut pick, refused.status());
                return hold_until_body_ends(refused, pick);
            }
        };
        pick.first_byte();
        // The tunnel is open: the endpoint answered. (A probe must not wait for the
        // end of a stream that may last hours.)
        pick.success();
        let Some(upstream) = response.extensions_mut().remove::<OnUpgrade>() else {
            return error_response(
                StatusCode::BAD_GATEWAY,
                "peer-failed",
                "the peer's tunnel did not open".into(),
            );
        };
        let what = format!("{} via {}", hop.dst, hop.peer);
        let switched = response.headers().get(h::UPGRADE).cloned();
        let case = response.headers_mut().remove(HEADER_CASE);
        let (mut parts, _) = response.into_parts();
        h::strip_hop_by_hop(&mut parts.headers);
        h::strip_mesh_headers(&mut parts.headers);
        if asked.is_some()
            && let Some(case) = case
        {
            header_case::restore_into(&mut parts.extensions, &case).await;
        }
        match (asked, switched) {
            (None, _) => {
                tunnel::spawn_joined(downstream, upstream, what, (pick, self.drain.track()));
                Response::new(h::empty())
            }
            (Some(_), Some(protocol)) => {
                tunnel::ask_upgrade(&mut parts.headers, protocol);
                parts.status = StatusCode::SWITCHING_PROTOCOLS;
                tunnel::spawn_joined(downstream, upstream, what, (pick, self.drain.track()));
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
    /// `pick`'s RTT clock starts once the connection to the peer is ready.
    async fn open_tunnel(
        &self,
        mut connect: Request<Body>,
        hop: &Hop<'_>,
        pick: &mut Pick,
    ) -> Result<Response<Incoming>, Response<Body>> {
        connect
            .headers_mut()
            .insert(h::DST_PORT, HeaderValue::from(hop.app_port));
        let mut sender = self
            .pool
            .get(hop.peer, hop.identity, None, None)
            .await
            .map_err(|e| connect_error(&e))?;
        pick.connected();
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
            self.pool.evict(hop.peer);
        }
        error_response(
            StatusCode::BAD_GATEWAY,
            "peer-failed",
            format!("request to {} failed: {}", hop.peer, crate::control::causes(e)),
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
                let mut pick = pick;
                let connected = connect.await;
                if let Some(pick) = pick.as_mut() {
                    if matches!(connected, Ok(Ok(_))) {
                        pick.success()
                    } else {
                        pick.failure()
                    }
                }
                return match connected {
                    Ok(Ok(tcp)) => {
                        let _ = tcp.set_nodelay(true);
                        tunnel::spawn_bridge(downstream, tcp, target.to_string(), (pick, self.drain.track()));
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
        parts.headers.append(http::header::VIA, self.via.clone());
        parts.uri = with_authority(&parts.uri, &target);
        let client_h1 = parts.version != Version::HTTP_2;
        parts.version = Version::HTTP_11;
        if let Some(Spellings(case)) = parts.extensions.remove() {
            header_case::restore_into(&mut parts.extensions, &case).await;
        }
        let body = h::gate_body(expect_continue.then_some(self.expect_continue_wait), body);
        let mut pick = pick;
        let mut response = match self.passthrough.request(Request::from_parts(parts, body)).await {
            Ok(response) => response,
            Err(e) => {
                if let Some(pick) = pick.as_mut() {
                    pick.failure();
                }
                return error_response(
                    StatusCode::BAD_GATEWAY,
                    "connect-failed",
                    format!("{target}: {}", crate::control::causes(&e)),
                );
            }
        };
        if let Some(pick) = pick.as_mut() {
            report(pick, response.status());
        }
        let case = header_case::take_response_case(&mut response);
        if let Some((_, downstream)) = protocol
            && response.status() == StatusCode::SWITCHING_PROTOCOLS
            && let Some(upstream) = response.extensions_mut().remove::<OnUpgrade>()
        {
            // The 101 keeps its Connection and Upgrade headers: they are this hop's too.
            if let Some(case) = &case {
                header_case::restore_into(response.extensions_mut(), case).await;
            }
            let (parts, _) = response.into_parts();
            let what = target.to_string();
            tunnel::spawn_joined(downstream, upstream, what, (pick, self.drain.track()));
            return Response::from_parts(parts, h::empty());
        }
        let mut response = h::relay(response);
        if client_h1 && let Some(case) = case {
            header_case::restore_into(response.extensions_mut(), &case).await;
        }
        match pick {
            Some(mut pick) => {
                pick.first_byte();
                hold_until_body_ends(response, pick)
            }
            None => response,
        }
    }
}

/// Tells the circuit breaker how an endpoint answered: a 5xx is a failure.
fn report(pick: &mut Pick, status: StatusCode) {
    if status.is_server_error() {
        pick.failure();
    } else {
        pick.success();
    }
}

/// A request's method, URI, version and headers, copied for each attempt.
struct Head {
    method: Method,
    uri: Uri,
    version: Version,
    headers: http::HeaderMap,
}

impl Head {
    fn into_parts(self) -> http::request::Parts {
        let mut req = Request::new(());
        *req.method_mut() = self.method;
        *req.uri_mut() = self.uri;
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers;
        req.into_parts().0
    }
}

fn clone_head(parts: &http::request::Parts) -> Head {
    Head {
        method: parts.method.clone(),
        uri: parts.uri.clone(),
        version: parts.version,
        headers: parts.headers.clone(),
    }
}

/// How an attempt failed without an answer from the app.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// No connection to the endpoint (or its proxy): the request never left.
    Connect,
    /// The peer refused the stream (HTTP/2 REFUSED_STREAM): never processed.
    RefusedStream,
    /// The stream or connection broke: the app may have seen the request.
    Reset,
    /// No answer within the per-try timeout: the app may have seen it.
    Timeout,
}

impl Failure {
    /// A refused stream, or one above the last stream id of the peer's GOAWAY (a
    /// restarting proxy), was never processed; anything else may have been.
    fn of(e: &hyper::Error) -> Failure {
        let h2 = std::error::Error::source(e).and_then(|s| s.downcast_ref::<h2::Error>());
        let refused =
            h2.is_some_and(|h2| h2.reason() == Some(h2::Reason::REFUSED_STREAM) || (h2.is_go_away() && h2.is_remote()));
        if refused {
            Failure::RefusedStream
        } else {
            Failure::Reset
        }
    }

    /// The `retry_on` condition this failure is.
    fn condition(self) -> RetryOn {
        match self {
            Failure::Connect => RetryOn::CONNECT_FAILURE,
            Failure::RefusedStream => RetryOn::REFUSED_STREAM,
            Failure::Reset => RetryOn::RESET,
            Failure::Timeout => RetryOn::GATEWAY_ERROR,
        }
    }

    /// Whether the app may have seen the request.
    fn reached(self) -> bool {
        matches!(self, Failure::Reset | Failure::Timeout)
    }
}

/// Records the attempts on the response for the app: `wary-attempts: <n>`.
fn with_attempts(mut response: Response<Body>, attempts: u32) -> Response<Body> {
    response.headers_mut().insert(h::ATTEMPTS, HeaderValue::from(attempts));
    response
}

/// How a request travels.
/// One client connection, in transparent mode.
#[derive(Default)]
struct ClientConn {
    /// The service and service port of the endpoint the connection was going to, once
    /// a request found it.
    home: std::sync::OnceLock<(String, u16)>,
    /// Set once the connection is to close.
    closing: std::sync::atomic::AtomicBool,
    /// Wakes the connection's task to close it gracefully.
    close: tokio::sync::Notify,
}

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

/// How long an unused plain HTTP/1 connection (outside the mesh, or to an endpoint
/// without a proxy) is kept: 15 s. hyper's pool looks for idle connections once per
/// this timeout, so one is closed 15 to 30 s after its last use: connections to an
/// endpoint discovery removed are gone within 30 s (hyper's default is 90 s).
pub const PLAIN_IDLE_TIMEOUT: Duration = Duration::from_secs(15);

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
