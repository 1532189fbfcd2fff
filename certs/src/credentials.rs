//! A workload's key, its CSR, and the credentials its TLS configs read.
//!
//! [`Credentials`] holds the current certificate and trust bundle behind `ArcSwap`s.
//! The rustls configs from [`crate::tls`] consult it at every handshake, so a renewed
//! certificate or a rotated trust bundle takes effect for new connections at once while
//! established ones carry on untouched.

use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::{ArcSwap, ArcSwapOption};
use rcgen::{CertificateParams, KeyPair};
use rustls::RootCertStore;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::sign::CertifiedKey;

use crate::SpiffeId;
use crate::tls::peer_identity;

/// Why credentials could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// The key could not be generated or used.
    #[error("key: {0}")]
    Key(String),
    /// The trust bundle has no usable anchor.
    #[error("trust bundle: {0}")]
    Bundle(String),
    /// The certificate does not lead to the trust bundle, has expired, or names another
    /// identity than expected.
    #[error("certificate refused: {0}")]
    Certificate(String),
}

/// A workload's private key (ECDSA P-256). It never leaves the process: only CSRs do.
pub struct WorkloadKey {
    key: KeyPair,
}

impl std::fmt::Debug for WorkloadKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WorkloadKey(..)")
    }
}

impl WorkloadKey {
    /// Generates a fresh key.
    ///
    /// # Errors
    /// [`CredentialError::Key`] if the system RNG fails.
    pub fn generate() -> Result<Self, CredentialError> {
        let key =
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| CredentialError::Key(e.to_string()))?;
        Ok(Self { key })
    }

    /// A PKCS#10 CSR (DER) for `identity`, signed with this key. The CA decides what the
    /// certificate says; the identity here is only a request.
    ///
    /// # Errors
    /// [`CredentialError::Key`] if the request cannot be serialized.
    pub fn csr(&self, identity: &SpiffeId) -> Result<Vec<u8>, CredentialError> {
        self.csr_for(Some(identity))
    }

    /// A CSR that names `identity` if given, and nothing otherwise (a first request,
    /// before the workload knows its identity).
    ///
    /// # Errors
    /// [`CredentialError::Key`] if the request cannot be serialized.
    pub fn csr_for(&self, identity: Option<&SpiffeId>) -> Result<Vec<u8>, CredentialError> {
        let mut params = CertificateParams::default();
        if let Some(identity) = identity {
            let uri = identity
                .to_string()
                .try_into()
                .map_err(|e: rcgen::Error| CredentialError::Key(e.to_string()))?;
            params.subject_alt_names = vec![rcgen::SanType::URI(uri)];
        }
        let csr = params
            .serialize_request(&self.key)
            .map_err(|e| CredentialError::Key(e.to_string()))?;
        Ok(csr.der().to_vec())
    }

    fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.serialize_der()))
    }
}

/// The trust anchors a workload accepts peers from; may hold two during a rotation.
#[derive(Debug, Clone)]
pub struct TrustBundle {
    anchors: Vec<CertificateDer<'static>>,
    roots: Arc<RootCertStore>,
}

impl TrustBundle {
    /// A bundle of the given anchors (DER).
    ///
    /// # Errors
    /// [`CredentialError::Bundle`] when the list is empty or an anchor does not parse.
    pub fn new(anchors: Vec<CertificateDer<'static>>) -> Result<Self, CredentialError> {
        let mut roots = RootCertStore::empty();
        for a in &anchors {
            roots
                .add(a.clone())
                .map_err(|e| CredentialError::Bundle(format!("anchor does not parse: {e}")))?;
        }
        if roots.is_empty() {
            return Err(CredentialError::Bundle("no trust anchor".into()));
        }
        Ok(Self {
            anchors,
            roots: Arc::new(roots),
        })
    }

    /// A bundle from PEM text with one or more certificates.
    ///
    /// # Errors
    /// [`CredentialError::Bundle`] when the text has no usable certificate.
    pub fn from_pem(pem: &str) -> Result<Self, CredentialError> {
        let certs = crate::certificates_from_pem(pem).map_err(|e| CredentialError::Bundle(e.to_string()))?;
        Self::new(certs)
    }

    /// The anchors, DER.
    pub fn anchors(&self) -> &[CertificateDer<'static>] {
        &self.anchors
    }

    /// The anchors as PEM.
    pub fn to_pem(&self) -> String {
        crate::certificates_to_pem(&self.anchors)
    }
}

/// The verifiers built for one trust bundle.
#[derive(Debug)]
pub(crate) struct Verifiers {
    pub(crate) server: Arc<dyn ServerCertVerifier>,
    pub(crate) client_required: Arc<dyn ClientCertVerifier>,
    pub(crate) client_optional: Arc<dyn ClientCertVerifier>,
}

/// What the current certificate says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateInfo {
    /// The identity in its URI SAN.
    pub identity: SpiffeId,
    /// Its `notAfter`.
    pub not_after: SystemTime,
    /// Its `notBefore`.
    pub not_before: SystemTime,
    /// Its issuer's distinguished name, e.g. `O=Wary, CN=wary root cluster.local 1795…`.
    pub issuer: String,
}

/// A workload's current certificate and trust bundle, swappable in place.
#[derive(Debug)]
pub struct Credentials {
    pub(crate) provider: Arc<CryptoProvider>,
    pub(crate) certified: ArcSwapOption<CertifiedKey>,
    info: ArcSwapOption<CertificateInfo>,
    /// The bundle and the verifiers built from it, swapped together.
    pub(crate) trust: ArcSwap<Trust>,
}

/// A trust bundle and its verifiers.
#[derive(Debug)]
pub(crate) struct Trust {
    pub(crate) bundle: TrustBundle,
    pub(crate) verifiers: Verifiers,
}

impl Credentials {
    /// Credentials with a trust bundle and no certificate yet.
    ///
    /// # Errors
    /// [`CredentialError::Bundle`] if verifiers cannot be built from the bundle.
    pub fn new(bundle: TrustBundle) -> Result<Arc<Self>, CredentialError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifiers = verifiers(&bundle, &provider)?;
        Ok(Arc::new(Self {
            provider,
            certified: ArcSwapOption::empty(),
            info: ArcSwapOption::empty(),
            trust: ArcSwap::from_pointee(Trust { bundle, verifiers }),
        }))
    }

    /// Installs a certificate chain (leaf first) for `key`, after checking that it leads
    /// to the trust bundle, is valid now, and names `expected` (when given). New
    /// handshakes use it at once; open connections are not disturbed.
    ///
    /// # Errors
    /// [`CredentialError::Certificate`] when any check fails; the previous certificate
    /// stays in place.
    pub fn set_certificate(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key: &WorkloadKey,
        expected: Option<&SpiffeId>,
    ) -> Result<CertificateInfo, CredentialError> {
        let refused = |m: String| CredentialError::Certificate(m);
        let leaf = chain.first().ok_or_else(|| refused("empty certificate chain".into()))?;
        let info = certificate_info(leaf).map_err(refused)?;
        if let Some(expected) = expected
            && &info.identity != expected
        {
            return Err(refused(format!("it names {}, expected {expected}", info.identity)));
        }
        let now = UnixTime::now();
        self.trust
            .load()
            .verifiers
            .client_required
            .verify_client_cert(leaf, &chain[1..], now)
            .map_err(|e| refused(format!("{e}")))?;
        let signing = self
            .provider
            .key_provider
            .load_private_key(key.private_key())
            .map_err(|e| CredentialError::Key(e.to_string()))?;
        let certified = CertifiedKey::new(chain, signing);
        certified
            .keys_match()
            .map_err(|e| refused(format!("it does not match the key: {e}")))?;
        self.certified.store(Some(Arc::new(certified)));
        self.info.store(Some(Arc::new(info.clone())));
        Ok(info)
    }

    /// Replaces the trust bundle: new handshakes verify peers against it at once.
    ///
    /// # Errors
    /// [`CredentialError::Bundle`] if verifiers cannot be built; the old bundle stays.
    pub fn set_trust_bundle(&self, bundle: TrustBundle) -> Result<(), CredentialError> {
        let v = verifiers(&bundle, &self.provider)?;
        self.trust.store(Arc::new(Trust { bundle, verifiers: v }));
        Ok(())
    }

    /// The current trust bundle.
    pub fn trust_bundle(&self) -> TrustBundle {
        self.trust.load().bundle.clone()
    }

    /// What the current certificate says; `None` before the first.
    pub fn certificate(&self) -> Option<Arc<CertificateInfo>> {
        self.info.load_full()
    }
}

fn verifiers(bundle: &TrustBundle, provider: &Arc<CryptoProvider>) -> Result<Verifiers, CredentialError> {
    let err = |e: rustls::server::VerifierBuilderError| CredentialError::Bundle(e.to_string());
    let roots = bundle.roots.clone();
    Ok(Verifiers {
        server: WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| CredentialError::Bundle(e.to_string()))?,
        client_required: WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(err)?,
        client_optional: WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
            .allow_unauthenticated()
            .build()
            .map_err(err)?,
    })
}

/// Reads identity and validity from a certificate.
///
/// # Errors
/// A message when the certificate does not parse or has no SPIFFE URI SAN.
pub fn certificate_info(cert: &CertificateDer<'_>) -> Result<CertificateInfo, String> {
    let identity = peer_identity(cert).map_err(|e| e.to_string())?;
    let (_, x509) =
        x509_parser::parse_x509_certificate(cert).map_err(|e| format!("certificate does not parse: {e}"))?;
    let ts = |t: x509_parser::time::ASN1Time| {
        SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(u64::try_from(t.timestamp()).unwrap_or(0))
    };
    Ok(CertificateInfo {
        identity,
        not_after: ts(x509.validity().not_after),
        not_before: ts(x509.validity().not_before),
        issuer: x509.issuer().to_string(),
    })
}
