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

use tokio::sync::watch;

use crate::config_watch::ConfigStatus;
use crate::discovery::ProxyRegistry;

/// What the admin pages read.
#[derive(Clone)]
pub struct Admin {
    /// Renders `/metrics`.
    pub prometheus: PrometheusHandle,
    /// Connected proxies.
    pub registry: Arc<ProxyRegistry>,
    /// The configuration's state.
    pub status: watch::Receiver<ConfigStatus>,
    /// True once discovery is served (the configuration has read clean once).
    pub serving: watch::Receiver<bool>,
}

impl Admin {
    /// Serves admin requests on `listener` until the process ends.
    pub async fn serve(self, listener: TcpListener) {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    // Out of file descriptors, say: back off rather than spin.
                    tracing::warn!(error = %e, "admin accept failed; retrying in 100 ms");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
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
            "/live" => text(StatusCode::OK, "ok\n".into()),
            "/ready" => {
                if *self.serving.borrow() {
                    text(StatusCode::OK, "ok\n".into())
                } else {
                    let status = self.status.borrow();
                    let why = if status.reloads == 0 {
                        "not ready: still reading the configuration (in a cluster, listing its objects: see the log if this lasts)\n".to_string()
                    } else {
                        format!(
                            "not ready: the configuration has errors; fix them and it will serve:\n{}\n",
                            status.errors.join("\n")
                        )
                    };
                    text(StatusCode::SERVICE_UNAVAILABLE, why)
                }
            }
            "/config" => json(&*self.status.borrow()),
            "/proxies" => json(&self.registry.list()),
            other => text(
                StatusCode::NOT_FOUND,
                format!("no admin page {other}: try /metrics, /ready, /live, /config or /proxies\n"),
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
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot encode: {e}\n")),
    }
}
