//! Wary identity: who a workload is, and how it proves it.
//!
//! * [`id`]: [`TrustDomain`] and [`SpiffeId`]
//!   (`spiffe://<trust-domain>/ns/<ns>/sa/<sa>`, the SPIFFE-ID standard's shape).
//! * [`ca`]: the mesh CA: creates a trust anchor (rcgen), signs CSRs for exactly the
//!   identity a proof was checked for, backdating `notBefore` by 1 min for clock skew.
//! * [`credentials`]: a workload's key and CSR, and [`credentials::Credentials`]: the
//!   certificate and trust bundle, swappable in place while connections stay up.
//! * [`tls`]: rustls server and client configs (TLS 1.3 only) that read the current
//!   credentials at each handshake, and peer-identity extraction.
//!
//! Crypto is rustls with *ring*; keys are ECDSA P-256.

#![forbid(unsafe_code)]

pub mod ca;
pub mod credentials;
pub mod id;
pub mod tls;

pub use id::{IdentityError, SpiffeId, TrustDomain, check_label};
pub use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Parses every `CERTIFICATE` block of a PEM text, in order.
///
/// # Errors
/// [`PemError`] when the text has no certificate or a block does not decode.
pub fn certificates_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, PemError> {
    use rustls::pki_types::pem::PemObject;
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PemError(format!("not a PEM certificate list: {e}")))?;
    if certs.is_empty() {
        return Err(PemError("no CERTIFICATE block found".into()));
    }
    Ok(certs)
}

/// Encodes certificates as PEM `CERTIFICATE` blocks.
pub fn certificates_to_pem(certs: &[CertificateDer<'_>]) -> String {
    certs.iter().map(|c| pem_block("CERTIFICATE", c.as_ref())).collect()
}

fn pem_block(label: &str, der: &[u8]) -> String {
    pem::encode(&pem::Pem::new(label, der.to_vec()))
}

/// A PEM text that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PemError(pub String);
