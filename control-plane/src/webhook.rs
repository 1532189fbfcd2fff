//! The mutating admission webhook: `POST /inject`, an `AdmissionReview` (v1) in, the
//! same review with a JSON Patch that adds the sidecar out ([`crate::inject`]).
//!
//! ```text
//! API server ─HTTPS─▶ :9443 /inject ─▶ AdmissionReview.request.object (a Pod)
//!   ─▶ asked for? (pod label wary.io/inject, else its namespace's) ─▶ inject::patch
//!   ─▶ response: allowed, patchType JSONPatch, patch (base64 of the JSON array)
//! ```
//!
//! A pod is always admitted, injected or not, except when one of its
//! `config.wary.io/*` annotations is malformed: then it is refused with a message
//! naming the annotation (for a bare Pod at `kubectl apply`; for a Deployment's pods
//! in its ReplicaSet's `FailedCreate` events). Served over TLS
//! with the certificate the chart issues for the webhook's Service name.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use tokio::net::TcpListener;
use tokio_stream::StreamExt;

use crate::inject::{self, InjectConfig};
use crate::metrics as m;

/// The largest AdmissionReview accepted: 4 MiB (an object in etcd is at most 1.5 MiB;
/// the review may carry it twice).
pub const MAX_REVIEW_BYTES: usize = 4 << 20;

/// A namespace's labels by name; `None` when the namespace is not known yet (the pod
/// is then injected: the webhook configuration's namespaceSelector sent it).
pub type NamespaceLabels = Arc<dyn Fn(&str) -> Option<BTreeMap<String, String>> + Send + Sync>;

/// The webhook: what to inject, and how to read a namespace's labels.
pub struct Webhook {
    /// What every injected proxy gets.
    pub config: InjectConfig,
    /// Namespace labels: from the cluster in `--kubernetes` mode; in local mode no
    /// namespace is labelled, so only pod labels ask for injection.
    pub namespace_labels: NamespaceLabels,
}

impl Webhook {
    /// Answers one `AdmissionReview` (JSON): the review to send back (JSON).
    ///
    /// # Errors
    /// The body is not an `AdmissionReview` with a request; the message says why (the
    /// caller answers 400).
    pub fn review(&self, body: &[u8]) -> Result<Vec<u8>, String> {
        let review: AdmissionReview<DynamicObject> =
            serde_json::from_slice(body).map_err(|e| format!("not an AdmissionReview: {e}"))?;
        let request: AdmissionRequest<DynamicObject> = review
            .try_into()
            .map_err(|_| "the AdmissionReview carries no request".to_string())?;
        let response = self.respond(&request);
        let mut review = serde_json::to_value(response.into_review()).map_err(|e| e.to_string())?;
        // kube-core serializes `patch` (bytes) as an array of numbers (kube-rs#1781);
        // the API server reads a []byte field as base64, and refuses anything else.
        if let Some(patch) = review.pointer_mut("/response/patch")
            && let Some(bytes) = patch.as_array()
        {
            let bytes: Vec<u8> = bytes.iter().filter_map(|b| b.as_u64()?.try_into().ok()).collect();
            *patch = base64::engine::general_purpose::STANDARD.encode(bytes).into();
        }
        serde_json::to_vec(&review).map_err(|e| e.to_string())
    }

    fn respond(&self, request: &AdmissionRequest<DynamicObject>) -> AdmissionResponse {
        let allow = AdmissionResponse::from(request);
        let outcome = |o: &'static str| metrics::counter!(m::INJECTIONS, "outcome" => o).increment(1);
        let Some(object) = &request.object else {
            outcome("skipped");
            return allow;
        };
        let pod = match serde_json::to_value(object) {
            Ok(v) => v,
            Err(e) => {
                outcome("refused");
                return allow.deny(format!("wary: cannot read the pod: {e}"));
            }
        };
        let namespace = request.namespace.as_deref().unwrap_or("default");
        // A namespace the watcher has not seen yet (just created, or labelled a moment
        // ago): the API server's namespaceSelector already asked for injection, so
        // trust it rather than admit the pod without its proxy.
        let labels = (self.namespace_labels)(namespace);
        let name = object
            .metadata
            .name
            .as_deref()
            .or(object.metadata.generate_name.as_deref());
        match inject::patch(&pod, labels.as_ref(), &self.config) {
            Ok(Ok(injection)) => match allow.clone().with_patch(injection.patch) {
                Ok(mut patched) => {
                    outcome("injected");
                    tracing::info!(namespace, pod = name, warnings = ?injection.warnings, "injected the proxy");
                    // Shown by kubectl to whoever created the pod.
                    if !injection.warnings.is_empty() {
                        patched.warnings = Some(injection.warnings.iter().map(|w| format!("wary: {w}")).collect());
                    }
                    patched
                }
                Err(e) => {
                    outcome("refused");
                    allow.deny(format!("wary: cannot encode the patch: {e}"))
                }
            },
            Ok(Err(skipped)) => {
                outcome("skipped");
                tracing::debug!(namespace, pod = name, %skipped, "not injected");
                allow
            }
            Err(e) => {
                outcome("refused");
                tracing::info!(namespace, pod = name, error = %e, "refused a pod");
                allow.deny(format!("wary: {e}"))
            }
        }
    }

    /// Serves `POST /inject` on `listener` over TLS with `tls`, forever.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, tls: Arc<rustls::ServerConfig>) {
        let mut incoming = crate::tls_listener::incoming(listener, tls);
        while let Some(Ok(stream)) = incoming.next().await {
            let webhook = self.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let webhook = webhook.clone();
                    async move { Ok::<_, Infallible>(webhook.handle(req).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let reply = |status: StatusCode, body: Vec<u8>, json: bool| {
            let mut r = Response::new(Full::new(Bytes::from(body)));
            *r.status_mut() = status;
            let kind = if json {
                "application/json"
            } else {
                "text/plain; charset=utf-8"
            };
            r.headers_mut()
                .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(kind));
            r
        };
        if req.uri().path() != "/inject" {
            return reply(
                StatusCode::NOT_FOUND,
                b"the webhook serves POST /inject\n".to_vec(),
                false,
            );
        }
        if req.method() != Method::POST {
            return reply(StatusCode::METHOD_NOT_ALLOWED, b"use POST /inject\n".to_vec(), false);
        }
        let body = match Limited::new(req.into_body(), MAX_REVIEW_BYTES).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                let msg = format!("cannot read the review (at most {MAX_REVIEW_BYTES} bytes): {e}\n");
                return reply(StatusCode::PAYLOAD_TOO_LARGE, msg.into_bytes(), false);
            }
        };
        match self.review(&body) {
            Ok(json) => reply(StatusCode::OK, json, true),
            Err(e) => reply(StatusCode::BAD_REQUEST, format!("{e}\n").into_bytes(), false),
        }
    }
}

/// A TLS server configuration from a PEM certificate chain and key (the webhook's
/// Secret, mounted by the chart).
///
/// # Errors
/// A file is unreadable or holds no certificate or key; the message names the file.
pub fn tls_config(cert: &std::path::Path, key: &std::path::Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use anyhow::Context;
    use rustls::pki_types::pem::PemObject;
    let read = |p: &std::path::Path| std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()));
    let chain = wary_certs::certificates_from_pem(&read(cert)?)
        .with_context(|| format!("{}: not a PEM certificate chain", cert.display()))?;
    if chain.is_empty() {
        anyhow::bail!("{}: holds no certificate", cert.display());
    }
    let key_pem = read(key)?;
    let key_der = rustls::pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| anyhow::anyhow!("{}: not a PEM private key: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .with_context(|| format!("{} and {} do not make a TLS identity", cert.display(), key.display()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
