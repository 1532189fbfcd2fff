//! `Identity.Certify`: the mesh CA behind a proof check, and the control plane's own
//! serving certificate.
//!
//! ```text
//! CSR + proof ──▶ ProofVerifier (join token; a Kubernetes SA token later)
//!      │              └─▶ workload <ns>/<name> ─▶ its SPIFFE ID (from the configuration)
//!      └─ no proof: the mesh certificate on this connection (renewal of the same ID)
//!                                   ─▶ MeshCa::sign(csr, that ID, lifetime)
//! ```
//!
//! The CA signs only the identity the proof is for; the CSR's own names are ignored.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::{Request, Response, Status};
use wary_certs::credentials::{Credentials, WorkloadKey};
use wary_certs::{SpiffeId, TrustDomain, tls::peer_identity};
use wary_proto::TypedResource;
use wary_proto::discovery::InboundPolicy;
use wary_proto::identity::identity_server::Identity;
use wary_proto::identity::{CertifyRequest, CertifyResponse, certify_request};

use crate::ca_store::CaStore;
use crate::metrics as m;
use crate::snapshot::Snapshot;
use crate::tokens;

/// The namespace and service account of the control plane's own identity.
pub const CONTROL_PLANE_NAMESPACE: &str = "wary-system";
/// See [`CONTROL_PLANE_NAMESPACE`].
pub const CONTROL_PLANE_SERVICE_ACCOUNT: &str = "wary-control-plane";

/// The control plane's SPIFFE ID in `trust_domain`:
/// `spiffe://<td>/ns/wary-system/sa/wary-control-plane`. Proxies check it.
pub fn control_plane_identity(trust_domain: &TrustDomain) -> SpiffeId {
    SpiffeId::new(
        trust_domain.clone(),
        CONTROL_PLANE_NAMESPACE,
        CONTROL_PLANE_SERVICE_ACCOUNT,
    )
    .expect("constant names are valid labels")
}

/// A workload a proof was checked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadRef {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// The service account the proof says it runs as, when the proof says (a
    /// Kubernetes token does; a join token names only the workload). It must be the
    /// workload's configured one.
    pub service_account: Option<String>,
}

/// A proof of who a workload is. Its `Debug` never shows the token.
#[derive(Clone)]
pub enum Proof {
    /// A join token minted by this control plane.
    JoinToken(String),
    /// A Kubernetes service-account token.
    ServiceAccountToken(String),
}

impl std::fmt::Debug for Proof {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Proof::JoinToken(_) => "JoinToken(..)",
            Proof::ServiceAccountToken(_) => "ServiceAccountToken(..)",
        })
    }
}

/// Checks proofs. Pluggable, so a cluster can check Kubernetes service-account tokens
/// (TokenReview) the way local mode checks join tokens.
#[tonic::async_trait]
pub trait ProofVerifier: Send + Sync {
    /// The workload the proof is for.
    ///
    /// # Errors
    /// A gRPC status saying why the proof was refused (UNAUTHENTICATED,
    /// UNIMPLEMENTED for a kind of proof this verifier does not take).
    async fn verify(&self, proof: &Proof) -> Result<WorkloadRef, Status>;
}

/// Verifies join tokens signed with the CA directory's token key.
pub struct JoinTokens(pub Arc<CaStore>);

#[tonic::async_trait]
impl ProofVerifier for JoinTokens {
    async fn verify(&self, proof: &Proof) -> Result<WorkloadRef, Status> {
        match proof {
            Proof::JoinToken(token) => {
                let material = self.0.current().map_err(|e| Status::unavailable(e.to_string()))?;
                let subject =
                    tokens::verify(&material.token_key, token).map_err(|e| Status::unauthenticated(e.to_string()))?;
                Ok(WorkloadRef {
                    namespace: subject.namespace,
                    name: subject.workload,
                    service_account: None,
                })
            }
            Proof::ServiceAccountToken(_) => Err(Status::unimplemented(
                "service-account tokens are checked in cluster mode (--kubernetes); in local mode use a join token",
            )),
        }
    }
}

/// The `Identity` gRPC service.
pub struct IdentityService {
    ca: Arc<CaStore>,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    verifier: Arc<dyn ProofVerifier>,
}

impl IdentityService {
    /// Signs with `ca`, resolving workloads in the latest snapshot.
    pub fn new(ca: Arc<CaStore>, snapshots: watch::Receiver<Arc<Snapshot>>, verifier: Arc<dyn ProofVerifier>) -> Self {
        Self {
            ca,
            snapshots,
            verifier,
        }
    }

    /// Refuses to renew an identity no configured workload runs as any more (a deleted
    /// workload, a changed service account): its certificate lapses instead.
    fn still_configured(&self, id: &SpiffeId) -> Result<(), Status> {
        let wanted = id.to_string();
        if self.snapshots.borrow().runs_as(&wanted) {
            Ok(())
        } else {
            Err(Status::permission_denied(format!(
                "no configured workload runs as {wanted} any more: renewal refused"
            )))
        }
    }

    /// The identity configured for a workload: its InboundPolicy carries it.
    fn identity_of(&self, w: &WorkloadRef) -> Result<SpiffeId, Status> {
        let snapshot = self.snapshots.borrow().clone();
        let name = format!("{}.{}", w.name, w.namespace);
        let policy = snapshot
            .get(InboundPolicy::TYPE_URL)
            .and_then(|t| t.resources.get(&name))
            .and_then(|r| r.resource.as_ref())
            .and_then(|any| InboundPolicy::from_any(any).ok())
            .ok_or_else(|| {
                if w.service_account.is_some() {
                    // A Kubernetes token: the workload is a pod.
                    Status::not_found(format!(
                        "no running pod {}/{} in the configuration: it has no IP yet or is not running (the proxy retries), or the control plane's configuration is stuck (see its /config page)",
                        w.namespace, w.name
                    ))
                } else {
                    Status::not_found(format!(
                        "no Workload {}/{} in the configuration: add its Workload document, or use its own token",
                        w.namespace, w.name
                    ))
                }
            })?;
        let id: SpiffeId = policy
            .identity
            .parse()
            .map_err(|e| Status::internal(format!("workload {name}: {e}")))?;
        if id.namespace() == CONTROL_PLANE_NAMESPACE && id.service_account() == CONTROL_PLANE_SERVICE_ACCOUNT {
            return Err(Status::permission_denied(format!(
                "{id} is the control plane's own identity and is never issued to a workload"
            )));
        }
        Ok(id)
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn certify(&self, request: Request<CertifyRequest>) -> Result<Response<CertifyResponse>, Status> {
        let result = self.certify_inner(request).await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(s) if s.code() == tonic::Code::PermissionDenied => "denied",
            Err(s) if s.code() == tonic::Code::Unauthenticated => "unauthenticated",
            Err(_) => "error",
        };
        metrics::counter!(m::CERTIFICATES_ISSUED, "result" => outcome).increment(1);
        if let Err(status) = &result {
            tracing::warn!(code = ?status.code(), reason = %status.message(), "refused a certificate request");
        }
        result
    }
}

impl IdentityService {
    async fn certify_inner(&self, request: Request<CertifyRequest>) -> Result<Response<CertifyResponse>, Status> {
        let peer_cert = request
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(|info| info.peer_certs())
            .and_then(|certs| certs.first().cloned());
        let req = request.into_inner();
        let granted = match req.proof {
            Some(certify_request::Proof::JoinToken(t)) => {
                let w = self.verifier.verify(&Proof::JoinToken(t)).await?;
                self.identity_of(&w)?
            }
            Some(certify_request::Proof::ServiceAccountToken(t)) => {
                let w = self.verifier.verify(&Proof::ServiceAccountToken(t)).await?;
                let id = self.identity_of(&w)?;
                if let Some(sa) = &w.service_account
                    && sa != id.service_account()
                {
                    return Err(Status::permission_denied(format!(
                        "the token is for service account {}/{sa}, but pod {}/{} runs as {id}",
                        w.namespace, w.namespace, w.name
                    )));
                }
                id
            }
            // Renewal: the handshake already verified this certificate against the bundle;
            // the identity must still belong to a configured workload.
            None => match peer_cert {
                Some(cert) => {
                    let id = peer_identity(&cert).map_err(|e| Status::unauthenticated(e.to_string()))?;
                    self.still_configured(&id)?;
                    id
                }
                None => {
                    return Err(Status::unauthenticated(
                        "no proof: send a join token, or present your mesh certificate to renew it",
                    ));
                }
            },
        };
        if !req.identity.is_empty() && req.identity != granted.to_string() {
            return Err(Status::permission_denied(format!(
                "the proof is for {granted}, not {}: a workload gets only its own identity",
                req.identity
            )));
        }
        let lifetime = self.snapshots.borrow().mesh.certificate_lifetime;
        let material = self.ca.current().map_err(|e| Status::unavailable(e.to_string()))?;
        let cert = material
            .issuer
            .sign(&req.csr, &granted, lifetime)
            .map_err(|e| match e {
                wary_certs::ca::CaError::Csr(_) => Status::invalid_argument(e.to_string()),
                _ => Status::internal(e.to_string()),
            })?;
        let not_after = SystemTime::now() + lifetime;
        tracing::info!(identity = %granted, lifetime_s = lifetime.as_secs(), "issued a workload certificate");
        Ok(Response::new(CertifyResponse {
            certificate: cert.to_vec(),
            intermediates: Vec::new(),
            trust_anchors: material.bundle.anchors().iter().map(|a| a.to_vec()).collect(),
            not_after: Some(prost_types::Timestamp::from(not_after)),
            identity: granted.to_string(),
        }))
    }
}

/// Keeps the control plane's own serving certificate and trust bundle current: issues
/// itself a certificate from the CA directory, and again when the issuer or bundle
/// changes or 70 % of the lifetime has passed. Runs until the process ends.
pub async fn serve_own_certificate(
    ca: Arc<CaStore>,
    creds: Arc<Credentials>,
    identity: SpiffeId,
    snapshots: watch::Receiver<Arc<Snapshot>>,
) {
    let mut issued: Option<(Arc<crate::ca_store::CaMaterial>, tokio::time::Instant)> = None;
    loop {
        match ca.current() {
            Ok(material) => {
                let due = issued
                    .as_ref()
                    .is_none_or(|(m, renew_at)| !Arc::ptr_eq(m, &material) || tokio::time::Instant::now() >= *renew_at);
                if due {
                    let lifetime = snapshots.borrow().mesh.certificate_lifetime;
                    match issue_own(&material, &creds, &identity, lifetime) {
                        Ok(()) => {
                            let renew_at = tokio::time::Instant::now() + lifetime.mul_f64(0.7);
                            issued = Some((material, renew_at));
                        }
                        Err(e) => tracing::error!("cannot issue the control plane's own certificate: {e}"),
                    }
                }
            }
            Err(e) => tracing::error!("the CA directory is unusable: {e}; keeping the current certificate"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Issues the control plane's certificate once, from `material`.
///
/// # Errors
/// A message when signing or installing fails.
pub fn issue_own(
    material: &crate::ca_store::CaMaterial,
    creds: &Credentials,
    identity: &SpiffeId,
    lifetime: Duration,
) -> Result<(), String> {
    creds
        .set_trust_bundle(material.bundle.clone())
        .map_err(|e| e.to_string())?;
    let key = WorkloadKey::generate().map_err(|e| e.to_string())?;
    let csr = key.csr(identity).map_err(|e| e.to_string())?;
    let cert = material
        .issuer
        .sign(&csr, identity, lifetime)
        .map_err(|e| e.to_string())?;
    creds
        .set_certificate(vec![cert], &key, Some(identity))
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// Verifies Kubernetes service-account tokens with the API server's TokenReview
/// (audience `wary.io`, bound to a pod: what the injector projects), in `--kubernetes`
/// mode. The pod named in the token is the workload; the token's service account must
/// be the pod's.
pub struct TokenReviews(pub kube::Client);

/// The audience a proxy's token must be issued for.
pub const TOKEN_AUDIENCE: &str = crate::inject::TOKEN_AUDIENCE;

#[tonic::async_trait]
impl ProofVerifier for TokenReviews {
    async fn verify(&self, proof: &Proof) -> Result<WorkloadRef, Status> {
        use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
        let Proof::ServiceAccountToken(token) = proof else {
            return Err(Status::unimplemented(
                "join tokens are for local mode; in a cluster the proxy proves itself with its service-account token (WARY_SERVICE_ACCOUNT_TOKEN_FILE)",
            ));
        };
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.clone(),
                audiences: Some(vec![TOKEN_AUDIENCE.to_string()]),
            },
            ..TokenReview::default()
        };
        let api: kube::Api<TokenReview> = kube::Api::all(self.0.clone());
        let reviewed = api
            .create(&kube::api::PostParams::default(), &review)
            .await
            .map_err(|e| Status::unavailable(format!("cannot review the token with the API server: {e}")))?;
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(Status::unauthenticated(format!(
                "the API server did not accept the token: {}",
                status.error.unwrap_or_else(|| "no reason given".into())
            )));
        }
        if !status.audiences.iter().flatten().any(|a| a == TOKEN_AUDIENCE) {
            return Err(Status::unauthenticated(format!(
                "the token is not for audience {TOKEN_AUDIENCE}: project one with that audience (the injector does)"
            )));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let Some((namespace, service_account)) = username
            .strip_prefix("system:serviceaccount:")
            .and_then(|rest| rest.split_once(':'))
        else {
            return Err(Status::unauthenticated(format!(
                "{username:?} is not a service account"
            )));
        };
        let pod = user
            .extra
            .as_ref()
            .and_then(|extra| extra.get("authentication.kubernetes.io/pod-name"))
            .and_then(|names| names.first())
            .ok_or_else(|| {
                Status::unauthenticated(
                    "the token is not bound to a pod: mount a projected service-account token (the injector does)",
                )
            })?;
        Ok(WorkloadRef {
            namespace: namespace.to_string(),
            name: pod.clone(),
            service_account: Some(service_account.to_string()),
        })
    }
}
