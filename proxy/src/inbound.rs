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

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use wary_certs::SpiffeId;
use wary_certs::tls::{HandshakeFailure, peer_identity};

use crate::authorize;
use crate::http::{self as h, Body, error_response};
use crate::metrics as m;
use crate::state::Cache;

/// The most TLS handshakes in progress at once: 1024.
pub const MAX_HANDSHAKES: usize = 1024;

/// The longest a peer may take to complete its TLS handshake: 10 s.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A verified peer of one connection.
struct Peer {
    /// Its SPIFFE ID.
    id: SpiffeId,
    /// The same, as the `wary-client-id` value for the app.
    header: HeaderValue,
}

/// The inbound proxy.
pub struct Inbound {
    app_ip: IpAddr,
    cache: Arc<Cache>,
    policy: String,
    reserved: Vec<u16>,
    http1: Client<HttpConnector, Body>,
    http2: Client<HttpConnector, Body>,
}

impl Inbound {
    /// Forwards to the app at `app_ip` (the workload's address), only on the ports the
    /// workload's inbound policy `policy` (`<workload>.<namespace>`) declares, and never
    /// on the proxy's own `reserved` ports (its outbound and admin listeners: a peer
    /// reaching those would act with this workload's identity).
    pub fn new(app_ip: IpAddr, cache: Arc<Cache>, policy: String, reserved: Vec<u16>) -> Self {
        Self {
            app_ip,
            cache,
            policy,
            reserved,
            http1: Client::builder(TokioExecutor::new()).build_http(),
            http2: Client::builder(TokioExecutor::new()).http2_only(true).build_http(),
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

    /// Serves mTLS connections on `listener` with `tls` until the process ends.
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
                // The app's header is formatted once per connection, not per request.
                let Ok(header) = HeaderValue::from_str(&client.to_string()) else {
                    return;
                };
                let client = Arc::new(Peer { id: client, header });
                let service = service_fn(move |req| {
                    let (inbound, client) = (inbound.clone(), client.clone());
                    async move { Ok::<_, Infallible>(inbound.handle(req, &client).await) }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    }

    async fn handle(&self, req: Request<Incoming>, peer: &Peer) -> Response<Body> {
        let client = &peer.id;
        let (mut parts, body) = req.into_parts();
        let port = parts
            .headers
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
        let state = self.cache.load();
        if let Some(policy) = state.inbound.items.get(&self.policy) {
            let request = authorize::Request {
                client: Some(client),
                method: parts.method.as_str(),
                path: parts.uri.path(),
                port,
            };
            let decision = authorize::authorize(policy, &request);
            let (verdict, label) = match &decision {
                authorize::Decision::Allow(_) => ("allow", decision.policy_label()),
                authorize::Decision::Deny(_) => ("deny", decision.policy_label()),
            };
            metrics::counter!(m::AUTHORIZATIONS, "decision" => verdict, "policy" => label.to_string()).increment(1);
            if let authorize::Decision::Deny(by) = decision {
                let grpc = parts
                    .headers
                    .get(http::header::CONTENT_TYPE)
                    .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
                let message = format!(
                    "{client} may not {} {} on {}: denied by {by}",
                    parts.method,
                    parts.uri.path(),
                    self.policy
                );
                tracing::debug!(%message, "denied");
                return if grpc {
                    h::grpc_error(7, "forbidden", message)
                } else {
                    error_response(StatusCode::FORBIDDEN, "forbidden", message)
                };
            }
        }
        let http2 = parts.headers.get(h::ORIG_PROTO).is_some_and(|v| v == "h2");
        h::strip_hop_by_hop(&mut parts.headers);
        h::strip_mesh_headers(&mut parts.headers);
        parts.headers.insert(h::CLIENT_ID, peer.header.clone());
        // The app sees the authority the client used.
        if !http2
            && let Some(authority) = parts.uri.authority()
            && let Ok(host) = HeaderValue::from_str(authority.as_str())
        {
            parts.headers.insert(http::header::HOST, host);
        }
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        parts.uri = match format!("http://{}{path}", std::net::SocketAddr::new(self.app_ip, port)).parse::<Uri>() {
            Ok(uri) => uri,
            Err(_) => return error_response(StatusCode::BAD_REQUEST, "bad-path", "request path is invalid".into()),
        };
        parts.version = if http2 { Version::HTTP_2 } else { Version::HTTP_11 };
        let app = if http2 { &self.http2 } else { &self.http1 };
        metrics::counter!(m::REQUESTS, "direction" => "inbound", "service" => "local").increment(1);
        match app.request(Request::from_parts(parts, body.boxed())).await {
            Ok(response) => h::relay(response),
            Err(e) => error_response(
                StatusCode::BAD_GATEWAY,
                "app-unavailable",
                format!(
                    "the app at {}:{port} did not answer: {}",
                    self.app_ip,
                    crate::control::causes(&e)
                ),
            ),
        }
    }
}
