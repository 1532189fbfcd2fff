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
use http::uri::{Authority, Scheme};
use http::{HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use wary_certs::SpiffeId;

use crate::balance::{Balancers, Pick};
use crate::routes::{RouteTable, Via};

use crate::http::{self as h, Body, error_response};
use crate::metrics as m;
use crate::pool::{ConnectError, PeerPool};
use crate::state::Cache;

/// The outbound proxy.
pub struct Outbound {
    pool: Arc<PeerPool>,
    namespace: String,
    passthrough: Client<HttpConnector, Body>,
    balancers: Arc<Balancers>,
    routes: Arc<ArcSwap<RouteTable>>,
}

impl Outbound {
    /// Routes with the discovery state in `cache`, for a client in `namespace`, over
    /// connections from `pool`.
    pub fn new(cache: Arc<Cache>, pool: Arc<PeerPool>, namespace: String) -> Self {
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
        connector.set_connect_timeout(Some(Duration::from_secs(1)));
        connector.set_nodelay(true);
        Self {
            pool,
            namespace,
            passthrough: Client::builder(TokioExecutor::new()).build(connector),
            balancers,
            routes,
        }
    }

    /// The balancers, for admin pages.
    pub fn balancers(&self) -> Arc<Balancers> {
        self.balancers.clone()
    }

    /// Serves the app's connections on `listener` (HTTP/1.1, or HTTP/2 with prior
    /// knowledge) until the process ends.
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
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let outbound = outbound.clone();
                    async move { Ok::<_, Infallible>(outbound.handle(req).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let Some(dst) = destination(&req) else {
            return error_response(
                StatusCode::BAD_REQUEST,
                "no-destination",
                "no destination: send an absolute-form URI (HTTP_PROXY) or a Host header".into(),
            );
        };
        let port = dst.port_u16().unwrap_or(80);
        let routes = self.routes.load();
        let route = routes.resolve(dst.host(), &self.namespace);
        let Some((route, targets)) = route.and_then(|r| Some((r, r.ports.get(&port)?))) else {
            metrics::counter!(m::REQUESTS, "direction" => "outbound", "service" => "passthrough").increment(1);
            return self.forward_plain(req, dst, None, None).await;
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
                self.forward_plain(req, dst, Some(to), Some(pick)).await
            }
            Via::Mesh { peer, identity } => {
                let (peer, identity, app_port) = (*peer, identity.clone(), target.app.port());
                drop(routes);
                self.forward_mesh(req, &dst, peer, &identity, u32::from(app_port), pick)
                    .await
            }
        }
    }

    /// Over the mesh: HTTP/2 over mTLS to the peer proxy.
    async fn forward_mesh(
        &self,
        req: Request<Incoming>,
        dst: &Authority,
        peer: SocketAddr,
        identity: &SpiffeId,
        app_port: u32,
        mut pick: Pick,
    ) -> Response<Body> {
        let (mut parts, body) = req.into_parts();
        let proto = if parts.version == Version::HTTP_2 { "h2" } else { "h1" };
        h::strip_hop_by_hop(&mut parts.headers);
        h::strip_mesh_headers(&mut parts.headers);
        parts.headers.insert(h::DST_PORT, HeaderValue::from(app_port));
        parts.headers.insert(h::ORIG_PROTO, HeaderValue::from_static(proto));
        parts.headers.remove(http::header::HOST);
        parts.uri = with_authority(&parts.uri, dst);
        parts.version = Version::HTTP_2;
        let mut sender = match self.pool.get(peer, identity).await {
            Ok(s) => s,
            Err(e) => return connect_error(&e),
        };
        match sender.send_request(Request::from_parts(parts, body.boxed())).await {
            Ok(response) => {
                pick.first_byte();
                hold_until_body_ends(h::relay(response), pick)
            }
            Err(e) => {
                // One failed stream (a reset, an aborted upload) is no reason to drop a
                // multiplexed connection; a closed one is.
                if sender.is_closed() {
                    self.pool.evict(peer, identity);
                }
                error_response(
                    StatusCode::BAD_GATEWAY,
                    "peer-failed",
                    format!("request to {peer} failed: {e}"),
                )
            }
        }
    }

    /// Outside the mesh (or to an endpoint without a proxy): plain HTTP/1.1 to `to`, or
    /// to the destination itself.
    async fn forward_plain(
        &self,
        req: Request<Incoming>,
        dst: Authority,
        to: Option<SocketAddr>,
        pick: Option<Pick>,
    ) -> Response<Body> {
        let (mut parts, body) = req.into_parts();
        h::strip_hop_by_hop(&mut parts.headers);
        h::strip_mesh_headers(&mut parts.headers);
        let target = match to {
            Some(addr) => Authority::try_from(addr.to_string().as_str()).unwrap_or(dst.clone()),
            None => dst.clone(),
        };
        if !parts.headers.contains_key(http::header::HOST)
            && let Ok(host) = HeaderValue::from_str(dst.as_str())
        {
            parts.headers.insert(http::header::HOST, host);
        }
        parts.uri = with_authority(&parts.uri, &target);
        parts.version = Version::HTTP_11;
        match self.passthrough.request(Request::from_parts(parts, body.boxed())).await {
            Ok(response) => match pick {
                Some(mut pick) => {
                    pick.first_byte();
                    hold_until_body_ends(h::relay(response), pick)
                }
                None => h::relay(response),
            },
            Err(e) => error_response(
                StatusCode::BAD_GATEWAY,
                "connect-failed",
                format!("{target}: {}", crate::control::causes(&e)),
            ),
        }
    }
}

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
