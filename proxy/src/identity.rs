//! The proxy's identity: a key that never leaves the process, a certificate from the
//! control plane, renewed before it lapses.
//!
//! ```text
//! start ─▶ key + CSR ─▶ Certify(join token) ─▶ certificate + trust bundle ─▶ ready
//!             ▲                                         │
//!             │        renew at 65–75 % of the lifetime (jittered, so a fleet does
//!             │        not renew in step); proof = the current certificate (mTLS)
//!             └─────────────────────────────────────────┘
//!   on failure: keep the valid certificate, retry with full-jitter backoff
//!   (1 s doubling to 30 s, never past the certificate's expiry)
//! ```
//!
//! After ztunnel's identity manager and Linkerd's identity client.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rand::Rng;
use wary_certs::CertificateDer;
use wary_certs::credentials::{CertificateInfo, Credentials, TrustBundle, WorkloadKey};
use wary_proto::identity::identity_client::IdentityClient;
use wary_proto::identity::{CertifyRequest, certify_request};

use crate::control::ControlPlane;
use crate::discovery::Backoff;
use crate::metrics as m;

/// Where the proof of identity comes from. Its `Debug` never shows the token.
#[derive(Clone)]
pub enum TokenSource {
    /// A join token given directly.
    Inline(String),
    /// A file holding the token, re-read at every request (so a rotated token is used).
    File(std::path::PathBuf),
    /// A Kubernetes service-account token file (the injector projects one with audience
    /// `wary.io`), re-read at every request as the kubelet rotates it; the control plane
    /// verifies it with a TokenReview.
    ServiceAccountFile(std::path::PathBuf),
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenSource::Inline(_) => f.write_str("Inline(..)"),
            TokenSource::File(p) => f.debug_tuple("File").field(p).finish(),
            TokenSource::ServiceAccountFile(p) => f.debug_tuple("ServiceAccountFile").field(p).finish(),
        }
    }
}

impl TokenSource {
    fn read(&self) -> Result<String, String> {
        match self {
            TokenSource::Inline(t) => Ok(t.trim().to_string()),
            TokenSource::File(path) => std::fs::read_to_string(path)
                .map(|t| t.trim().to_string())
                .map_err(|e| format!("cannot read the join token file {}: {e}", path.display())),
            TokenSource::ServiceAccountFile(path) => std::fs::read_to_string(path)
                .map(|t| t.trim().to_string())
                .map_err(|e| format!("cannot read the service-account token {}: {e}", path.display())),
        }
    }

    /// The proof to send.
    fn proof(&self) -> Result<certify_request::Proof, String> {
        let token = self.read()?;
        Ok(match self {
            TokenSource::ServiceAccountFile(_) => certify_request::Proof::ServiceAccountToken(token),
            TokenSource::Inline(_) | TokenSource::File(_) => certify_request::Proof::JoinToken(token),
        })
    }
}

/// How the proxy obtains its certificate.
#[derive(Clone, Debug)]
pub struct IdentityConfig {
    /// The control plane.
    pub control_plane: ControlPlane,
    /// The proof for the first certificate (and whenever the current one has lapsed).
    pub token: TokenSource,
    /// Retry backoff after a failed request; default 1 s doubling to 30 s.
    pub backoff: Backoff,
    /// The trust anchors file the proxy started with, re-read when it falls back to its
    /// join token (the bundle it holds may no longer verify the control plane).
    pub trust_anchors: Option<std::path::PathBuf>,
}

impl IdentityConfig {
    /// The defaults for everything but the control plane and token.
    pub fn new(control_plane: ControlPlane, token: TokenSource) -> Self {
        Self {
            control_plane,
            token,
            backoff: Backoff {
                base: Duration::from_secs(1),
                max: Duration::from_secs(30),
            },
            trust_anchors: None,
        }
    }
}

/// Requests one certificate and installs it (and the trust bundle that came with it).
/// Renews with the current certificate as proof; with `bootstrap`, or without a valid
/// certificate, proves itself with the join token on a connection that presents no
/// certificate (the way back when the current one is no longer trusted, e.g. its anchor
/// was dropped too early).
///
/// # Errors
/// A message saying what failed: connecting, the control plane's refusal (with its
/// reason), or a certificate that does not verify.
pub async fn certify(
    config: &IdentityConfig,
    creds: &Arc<Credentials>,
    bootstrap: bool,
) -> Result<CertificateInfo, String> {
    let renewing = !bootstrap
        && creds
            .certificate()
            .is_some_and(|c| c.not_after > SystemTime::now() + Duration::from_secs(1));
    let proof = if renewing { None } else { Some(config.token.proof()?) };
    let key = WorkloadKey::generate().map_err(|e| e.to_string())?;
    let asked = creds.certificate().map(|c| c.identity.clone());
    let csr = key.csr_for(asked.as_ref()).map_err(|e| e.to_string())?;
    let channel = if renewing {
        config.control_plane.connect(creds).await?
    } else {
        // Present nothing; trust the bundle held plus the anchors file as it is now.
        let mut anchors = creds.trust_bundle().anchors().to_vec();
        if let Some(path) = &config.trust_anchors
            && let Ok(pem) = std::fs::read_to_string(path)
            && let Ok(file) = TrustBundle::from_pem(&pem)
        {
            anchors.extend(file.anchors().iter().cloned());
        }
        let bundle = TrustBundle::new(anchors).map_err(|e| e.to_string())?;
        let anonymous = Credentials::new(bundle).map_err(|e| e.to_string())?;
        config.control_plane.connect(&anonymous).await?
    };
    let response = IdentityClient::new(channel)
        .certify(CertifyRequest {
            identity: asked.map(|a| a.to_string()).unwrap_or_default(),
            csr,
            proof,
        })
        .await
        .map_err(|s| {
            format!(
                "the control plane refused a certificate ({:?}): {}",
                s.code(),
                s.message()
            )
        })?
        .into_inner();
    let anchors = response.trust_anchors.into_iter().map(CertificateDer::from).collect();
    let bundle = TrustBundle::new(anchors).map_err(|e| format!("the control plane sent an unusable bundle: {e}"))?;
    creds.set_trust_bundle(bundle).map_err(|e| e.to_string())?;
    let chain = std::iter::once(response.certificate)
        .chain(response.intermediates)
        .map(CertificateDer::from)
        .collect();
    let info = creds.set_certificate(chain, &key, None).map_err(|e| e.to_string())?;
    let expiry = info
        .not_after
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    metrics::gauge!(m::CERT_EXPIRY).set(expiry.as_secs_f64());
    Ok(info)
}

/// When to renew a certificate received at `received`: 65–75 % of the way from then to
/// its expiry. Measured from receipt, not `notBefore`, which the CA backdates by a
/// minute for clock skew (with a 10 s certificate, 70 % from `notBefore` is already past).
pub fn renewal_delay(info: &CertificateInfo, received: SystemTime) -> Duration {
    let remaining = info.not_after.duration_since(received).unwrap_or_default();
    remaining.mul_f64(rand::rng().random_range(0.65..=0.75))
}

/// Keeps the proxy certified: the first certificate (retrying until it comes), then
/// renewals. Runs until the process ends. `first` is called once the first certificate
/// is installed.
pub async fn run(config: IdentityConfig, creds: Arc<Credentials>, first: impl FnOnce()) {
    let mut first = Some(first);
    let mut attempt = 0u32;
    loop {
        let received = SystemTime::now();
        // After two failed renewals in a row, fall back to the join token.
        match certify(&config, &creds, attempt >= 2).await {
            Ok(info) => {
                attempt = 0;
                metrics::counter!(m::CERT_RENEWALS, "result" => "ok").increment(1);
                let delay = renewal_delay(&info, received);
                tracing::info!(
                    identity = %info.identity, renew_in_ms = delay.as_millis() as u64,
                    "certificate installed"
                );
                if let Some(f) = first.take() {
                    f();
                }
                tokio::time::sleep(delay).await;
            }
            Err(e) => {
                metrics::counter!(m::CERT_RENEWALS, "result" => "error").increment(1);
                let mut delay = config.backoff.delay(attempt);
                attempt = attempt.saturating_add(1);
                // Never sleep past the expiry of the certificate still in use.
                if let Some(left) = creds
                    .certificate()
                    .and_then(|c| c.not_after.duration_since(SystemTime::now()).ok())
                {
                    delay = delay.min(left / 2);
                }
                let held = if creds.certificate().is_some() {
                    "keeping the current certificate"
                } else {
                    "not ready until one is issued"
                };
                tracing::warn!(
                    retry_in_ms = delay.as_millis() as u64,
                    "certificate request failed: {e}; {held}"
                );
                tokio::time::sleep(delay.max(Duration::from_millis(500))).await;
            }
        }
    }
}
