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
use wary_proto::discovery::load_balancer::Algorithm as Algorithm_;
use wary_proto::discovery::{Endpoint, Service};

use crate::balance::{Algorithm, Balancers, Pick, Settings};

use crate::http::{self as h, Body, error_response};
use crate::metrics as m;
use crate::pool::{ConnectError, PeerPool};
use crate::state::Cache;

/// The outbound proxy.
pub struct Outbound {
    cache: Arc<Cache>,
    pool: Arc<PeerPool>,
    namespace: String,
    passthrough: Client<HttpConnector, Body>,
    balancers: Arc<Balancers>,
}

impl Outbound {
    /// Routes with the discovery state in `cache`, for a client in `namespace`, over
    /// connections from `pool`.
    pub fn new(cache: Arc<Cache>, pool: Arc<PeerPool>, namespace: String) -> Self {
        let balancers = Arc::new(Balancers::default());
        tokio::spawn(prune(cache.clone(), balancers.clone(), pool.clone()));
        let mut connector = HttpConnector::new();
        // Linkerd's connect timeout, also outside the mesh.
        connector.set_connect_timeout(Some(Duration::from_secs(1)));
        connector.set_nodelay(true);
        Self {
            cache,
            pool,
            namespace,
            passthrough: Client::builder(TokioExecutor::new()).build(connector),
            balancers,
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
        let state = self.cache.load();
        let service = state.resolve(dst.host(), &self.namespace).filter(|s| {
            s.ports
                .iter()
                .any(|p| p.port == u32::from(dst.port_u16().unwrap_or(80)))
        });
        let Some(service) = service else {
            metrics::counter!(m::REQUESTS, "direction" => "outbound", "service" => "passthrough").increment(1);
            return self.forward_plain(req, dst.clone(), None, None).await;
        };
        let port = u32::from(dst.port_u16().unwrap_or(80));
        let name = format!("{}.{}", service.name, service.namespace);
        let ready: Vec<&Endpoint> = state
            .endpoints
            .items
            .get(&name)
            .map(|e| {
                e.endpoints
                    .iter()
                    .filter(|e| e.ready && e.service_port == port)
                    .collect()
            })
            .unwrap_or_default();
        metrics::counter!(m::REQUESTS, "direction" => "outbound", "service" => name.clone()).increment(1);
        if ready.is_empty() {
            return error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "no-endpoints",
                format!("{name}:{port}: no ready endpoints"),
            );
        }
        let addrs: Vec<SocketAddr> = ready
            .iter()
            .filter_map(|e| Some(SocketAddr::new(e.address.parse().ok()?, u16::try_from(e.port).ok()?)))
            .collect();
        if addrs.len() != ready.len() {
            return error_response(
                StatusCode::BAD_GATEWAY,
                "bad-endpoint",
                format!("{name}: bad endpoint address"),
            );
        }
        let settings = balance_settings(service);
        let Some(pick) = self.balancers.get(&name).pick(&addrs, &settings) else {
            return error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "no-endpoints",
                format!("{name}:{port}: no ready endpoints"),
            );
        };
        let endpoint = ready[pick.index];
        let ip = addrs[pick.index].ip();
        if endpoint.mesh_port == 0 {
            let to = SocketAddr::new(ip, endpoint.port as u16);
            return self.forward_plain(req, dst, Some(to), Some(pick)).await;
        }
        let identity: SpiffeId = match endpoint.identity.parse() {
            Ok(id) => id,
            Err(_) => {
                return error_response(
                    StatusCode::BAD_GATEWAY,
                    "bad-endpoint",
                    format!("{name}: endpoint has no identity"),
                );
            }
        };
        let peer = SocketAddr::new(ip, endpoint.mesh_port as u16);
        self.forward_mesh(req, &dst, peer, &identity, endpoint.port, pick).await
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

/// After every discovery update, forgets balancer statistics and pooled connections of
/// endpoints that are gone, so the proxy's memory follows the mesh's size.
async fn prune(cache: Arc<Cache>, balancers: Arc<Balancers>, pool: Arc<PeerPool>) {
    let mut changed = cache.subscribe();
    while changed.changed().await.is_ok() {
        let state = cache.load();
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

/// The balancer settings a service's traffic policy asks for.
fn balance_settings(service: &Service) -> Settings {
    let lb = service.traffic_policy.as_ref().and_then(|tp| tp.load_balancer.as_ref());
    let duration = |d: Option<&prost_types::Duration>| {
        d.and_then(|d| {
            Some(Duration::new(
                u64::try_from(d.seconds).ok()?,
                u32::try_from(d.nanos).ok()?,
            ))
        })
    };
    let defaults = Settings::default();
    Settings {
        algorithm: match lb.map(|lb| lb.algorithm()) {
            Some(Algorithm_::RoundRobin) => Algorithm::RoundRobin,
            _ => Algorithm::Ewma,
        },
        decay: duration(lb.and_then(|lb| lb.decay.as_ref()))
            .filter(|d| !d.is_zero())
            .unwrap_or(defaults.decay),
        default_rtt: duration(lb.and_then(|lb| lb.default_rtt.as_ref())).unwrap_or(defaults.default_rtt),
    }
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
