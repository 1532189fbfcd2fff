//! The proxy's admin server (port 4191): `/live`, `/ready` (200 once discovery has
//! delivered every subscribed type), `/metrics` (Prometheus) and `/config_dump` (the
//! proxy's current view of the mesh, JSON). Read-only.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::state::{Cache, DiscoveryState};

/// What the admin pages read.
#[derive(Clone)]
pub struct Admin {
    /// Renders `/metrics`.
    pub prometheus: PrometheusHandle,
    /// The discovery state.
    pub cache: Arc<Cache>,
    /// The type URLs that must be synced before `/ready` answers 200.
    pub required: Vec<&'static str>,
}

impl Admin {
    /// Serves admin requests on `listener` until the process ends.
    pub async fn serve(self, listener: TcpListener) {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    continue;
                }
            };
            let admin = self.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let admin = admin.clone();
                    async move { Ok::<_, Infallible>(admin.route(req)) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    }

    fn route(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET {
            return text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n".into());
        }
        match req.uri().path() {
            "/metrics" => {
                let mut r = text(StatusCode::OK, self.prometheus.render());
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                r
            }
            "/live" => text(StatusCode::OK, "ok\n".into()),
            "/ready" => {
                if self.cache.load().synced(&self.required) {
                    text(StatusCode::OK, "ok\n".into())
                } else {
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "not ready: waiting for the first configuration from the control plane\n"
                            .into(),
                    )
                }
            }
            "/config_dump" => {
                let body =
                    serde_json::to_vec_pretty(&config_dump(&self.cache.load())).unwrap_or_default();
                let mut r = Response::new(Full::new(Bytes::from(body)));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("application/json"),
                );
                r
            }
            other => text(
                StatusCode::NOT_FOUND,
                format!("no admin page {other}: try /metrics, /ready, /live or /config_dump\n"),
            ),
        }
    }
}

/// The proxy's view as JSON: versions, services with ports, endpoints, inbound policy.
pub fn config_dump(state: &DiscoveryState) -> Value {
    let mut services: Vec<_> = state
        .services
        .items
        .iter()
        .map(|(name, s)| {
            json!({
                "name": name,
                "version": state.services.versions.get(name),
                "ports": s.ports.iter().map(|p| p.port).collect::<Vec<_>>(),
                "hostnames": s.hostnames,
                "traffic_policy": s.traffic_policy.as_ref().map(|tp| tp.source.clone()),
            })
        })
        .collect();
    services.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    let mut endpoints: Vec<_> = state
        .endpoints
        .items
        .iter()
        .map(|(name, e)| {
            json!({
                "service": name,
                "version": state.endpoints.versions.get(name),
                "endpoints": e.endpoints.iter().map(|ep| json!({
                    "address": format!("{}:{}", ep.address, ep.port),
                    "service_port": ep.service_port,
                    "mesh_port": ep.mesh_port,
                    "identity": ep.identity,
                    "workload": ep.workload,
                    "ready": ep.ready,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    endpoints.sort_by(|a, b| a["service"].as_str().cmp(&b["service"].as_str()));
    let inbound: Vec<_> = state
        .inbound
        .items
        .iter()
        .map(|(name, p)| {
            json!({
                "name": name,
                "identity": p.identity,
                "ports": p.ports.iter().map(|p| p.port).collect::<Vec<_>>(),
                "authorizations": p.authorizations.iter().map(|a| a.name.clone()).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({
        "generation": state.generation,
        "versions": {
            "service": state.services.version_info,
            "endpoints": state.endpoints.version_info,
            "inbound_policy": state.inbound.version_info,
        },
        "services": services,
        "endpoints": endpoints,
        "inbound_policies": inbound,
    })
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}
