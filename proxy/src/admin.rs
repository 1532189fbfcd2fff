//! The proxy's admin server (port 4191): `/live`, `/ready` (200 once discovery has
//! delivered every subscribed type, 503 again once shutdown has begun), `/metrics` (Prometheus) and `/config_dump` (the
//! proxy's current view of the mesh, JSON); `POST /shutdown`, from loopback only,
//! shuts the proxy down as SIGTERM does (for Jobs whose app has finished);
//! `/app-health/<container>/<kind>` answers the kubelet probes the injector moved here
//! ([`crate::probes`]).

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

use wary_proto::TypedResource;
use wary_proto::discovery::InboundPolicy;

use wary_certs::credentials::Credentials;

use crate::balance::Balancers;
use crate::drain::Drain;
use crate::state::{Cache, DiscoveryState};

/// What the admin pages read.
#[derive(Clone)]
pub struct Admin {
    /// Renders `/metrics`.
    pub prometheus: PrometheusHandle,
    /// The discovery state.
    pub cache: Arc<Cache>,
    /// What the proxy subscribed to (type URL, names): each type must have arrived,
    /// and each named resource must exist, before `/ready` answers 200.
    pub subscriptions: Vec<(&'static str, Vec<String>)>,
    /// The workload certificate and trust bundle.
    pub creds: Arc<Credentials>,
    /// Per-endpoint load, for `/config_dump`.
    pub balancers: Arc<Balancers>,
    /// Shutdown state: a draining proxy is not ready.
    pub drain: Arc<Drain>,
    /// Notified by `POST /shutdown` (from loopback only): the proxy then shuts down as
    /// on SIGTERM.
    pub shutdown: Arc<tokio::sync::Notify>,
    /// The kubelet probes the injector moved here (`/app-health/...`).
    pub app_probes: Arc<crate::probes::AppProbes>,
}

impl Admin {
    /// Serves admin requests on `listener` until the process ends, on a thread and
    /// runtime of its own so a scrape never takes time from the data path.
    ///
    /// # Errors
    /// When the thread cannot be started.
    pub fn serve_on_own_thread(self, listener: std::net::TcpListener) -> std::io::Result<()> {
        listener.set_nonblocking(true)?;
        std::thread::Builder::new().name("wary-admin".into()).spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => return tracing::error!(error = %e, "cannot start the admin runtime"),
            };
            runtime.block_on(async move {
                match TcpListener::from_std(listener) {
                    Ok(listener) => self.serve(listener).await,
                    Err(e) => tracing::error!(error = %e, "cannot serve the admin listener"),
                }
            });
        })?;
        Ok(())
    }

    /// Serves admin requests on `listener` until the process ends.
    pub async fn serve(self, listener: TcpListener) {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    // Out of file descriptors, say: back off rather than spin.
                    tracing::warn!(error = %e, "admin accept failed; retrying in 100 ms");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let admin = self.clone();
            let shutdown = self.shutdown.clone();
            // Set by POST /shutdown; acted on once this connection has closed, so the
            // answer reaches the client before the proxy begins to exit.
            let requested = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let asked = requested.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let (admin, asked) = (admin.clone(), asked.clone());
                    async move {
                        if req.uri().path().starts_with("/app-health/")
                            && let Some((status, body)) = admin.app_probes.answer(req.uri().path()).await
                        {
                            return Ok::<_, Infallible>(text(status, body));
                        }
                        Ok::<_, Infallible>(admin.route(req, peer, &asked))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
                if requested.load(std::sync::atomic::Ordering::Acquire) {
                    shutdown.notify_one();
                }
            });
        }
    }

    fn route(
        &self,
        req: Request<Incoming>,
        peer: std::net::SocketAddr,
        shutdown_requested: &std::sync::atomic::AtomicBool,
    ) -> Response<Full<Bytes>> {
        if req.uri().path() == "/shutdown" {
            return match (req.method(), peer.ip().is_loopback()) {
                (&Method::POST, true) => {
                    tracing::info!(%peer, "shutdown requested on the admin endpoint");
                    let mut r = text(
                        StatusCode::ACCEPTED,
                        "shutting down: draining the app's traffic\n".into(),
                    );
                    if req.version() == http::Version::HTTP_2 {
                        self.shutdown.notify_one();
                    } else {
                        // The client closes, and the shutdown starts once it has the
                        // answer (an idle proxy exits at once).
                        shutdown_requested.store(true, std::sync::atomic::Ordering::Release);
                        r.headers_mut()
                            .insert(header::CONNECTION, header::HeaderValue::from_static("close"));
                    }
                    r
                }
                (&Method::POST, false) => text(
                    StatusCode::FORBIDDEN,
                    "POST /shutdown is accepted from loopback only\n".into(),
                ),
                _ => text(StatusCode::METHOD_NOT_ALLOWED, "use POST /shutdown\n".into()),
            };
        }
        if req.method() != Method::GET {
            return text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n".into());
        }
        match req.uri().path() {
            "/metrics" => {
                let mut page = self.prometheus.render();
                self.balancers.render_metrics(&mut page);
                let mut r = text(StatusCode::OK, page);
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                r
            }
            "/live" => text(StatusCode::OK, "ok\n".into()),
            "/ready" if self.drain.is_draining() => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready:\nshutting down: draining the app's traffic\n".into(),
            ),
            "/ready" => {
                let missing = self.missing();
                if missing.is_empty() {
                    text(StatusCode::OK, "ok\n".into())
                } else {
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("not ready:\n{}\n", missing.join("\n")),
                    )
                }
            }
            // The mesh's topology and who may call whom: not for every pod in the cluster
            // (the admin port is on the pod IP for probes and Prometheus).
            "/config_dump" if !peer.ip().is_loopback() => text(
                StatusCode::FORBIDDEN,
                "/config_dump is served to loopback only: use `kubectl port-forward POD 4191` and ask from there\n"
                    .into(),
            ),
            "/config_dump" => {
                let mut dump = config_dump(&self.cache.load());
                dump["certificate"] = certificate_dump(&self.creds);
                dump["load"] = load_dump(&self.balancers);
                let body = serde_json::to_vec_pretty(&dump).unwrap_or_default();
                let mut r = Response::new(Full::new(Bytes::from(body)));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("application/json"),
                );
                r
            }
            other => text(
                StatusCode::NOT_FOUND,
                format!("no admin page {other}: try /metrics, /ready, /live, /config_dump or POST /shutdown\n"),
            ),
        }
    }
}

impl Admin {
    /// Why the proxy is not ready, one reason a line; empty when it is.
    pub fn missing(&self) -> Vec<String> {
        let state = self.cache.load();
        let mut missing = Vec::new();
        match self.creds.certificate() {
            None => {
                missing.push("waiting for a workload certificate from the control plane (see this proxy's log)".into())
            }
            Some(c) if c.not_after <= std::time::SystemTime::now() => missing.push(format!(
                "the workload certificate for {} has expired and renewal keeps failing (see this proxy's log)",
                c.identity
            )),
            Some(_) => {}
        }
        for (type_url, names) in &self.subscriptions {
            let kind = wary_proto::kind_of(type_url);
            if !state.synced(&[type_url]) {
                missing.push(format!("waiting for the first {kind} update from the control plane"));
                continue;
            }
            for name in names.iter().filter(|n| n.as_str() != wary_proto::WILDCARD) {
                if type_url == &<InboundPolicy as TypedResource>::TYPE_URL && !state.inbound.items.contains_key(name) {
                    missing.push(format!(
                        "the control plane has no workload {name}: check --workload and --namespace against its Workload documents"
                    ));
                }
            }
        }
        if !missing.is_empty() && !self.cache.connected() {
            missing.push("the discovery stream is down: is the control plane running? (see this proxy's log)".into());
        }
        missing
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

/// Each endpoint's Peak-EWMA RTT (ms), requests in flight and circuit-breaker state
/// (`admitted`, `ejected`, `probation`, `probing`), by service.
pub fn load_dump(balancers: &Balancers) -> Value {
    let mut services: Vec<_> = balancers.snapshot().into_iter().collect();
    services.sort_by(|a, b| a.0.cmp(&b.0));
    Value::Array(
        services
            .into_iter()
            .map(|(service, mut endpoints)| {
                endpoints.sort_by_key(|e| e.addr);
                json!({
                    "service": service,
                    "endpoints": endpoints.iter().map(|e| json!({
                        "address": e.addr.to_string(),
                        "ewma_ms": (e.rtt * 1e6).round() / 1e3,
                        "in_flight": e.in_flight,
                        "state": format!("{:?}", e.state).to_lowercase(),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect(),
    )
}

/// The certificate's subject and validity, and the trust anchors' count — never a key.
pub fn certificate_dump(creds: &Credentials) -> Value {
    let unix = |t: std::time::SystemTime| {
        t.duration_since(std::time::SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default()
    };
    match creds.certificate() {
        Some(c) => json!({
            "identity": c.identity.to_string(),
            "not_before_unix_seconds": unix(c.not_before),
            "not_after_unix_seconds": unix(c.not_after),
            "issuer": c.issuer,
            "trust_anchors": creds.trust_bundle().anchors().len(),
        }),
        None => Value::Null,
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}
