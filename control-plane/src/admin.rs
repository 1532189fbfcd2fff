//! The control plane's admin server (port 9990): `/metrics` (Prometheus), `/live`,
//! `/ready`, `/config` (versions in force and the latest problems, JSON) and `/proxies`
//! (each connected proxy's acknowledged versions and last NACK, JSON). Read-only.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;

use crate::config_watch::SharedStatus;
use crate::discovery::ProxyRegistry;

/// What the admin pages read.
#[derive(Clone)]
pub struct Admin {
    /// Renders `/metrics`.
    pub prometheus: PrometheusHandle,
    /// Connected proxies.
    pub registry: Arc<ProxyRegistry>,
    /// The configuration's state.
    pub status: SharedStatus,
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
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                "the admin server is read-only: use GET\n".into(),
            );
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
            "/live" | "/ready" => text(StatusCode::OK, "ok\n".into()),
            "/config" => {
                let status = self
                    .status
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                json(&status)
            }
            "/proxies" => json(&self.registry.list()),
            other => text(
                StatusCode::NOT_FOUND,
                format!(
                    "no admin page {other}: try /metrics, /ready, /live, /config or /proxies\n"
                ),
            ),
        }
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}

fn json<T: serde::Serialize>(value: &T) -> Response<Full<Bytes>> {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => {
            let mut r = Response::new(Full::new(Bytes::from(body)));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            r
        }
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode: {e}\n"),
        ),
    }
}
