//! The mesh CA: one signing certificate and key (the issuer), and the trust anchors
//! every workload trusts.
//!
//! The CA never takes a CSR's word for who the workload is: [`MeshCa::sign`] replaces
//! every name in the request with the identity the caller checked (from a join token or
//! a service-account token), and keeps only the request's public key (whose signature
//! rcgen verifies). Certificates are backdated by [`BACKDATE`] for clock skew (istio
//! PR #32176).

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer};
use time::OffsetDateTime;

use crate::{SpiffeId, TrustDomain};

/// How far `notBefore` is set in the past, so a peer whose clock is a little behind
/// still accepts a fresh certificate: 1 min (Linkerd, istio PR #32176).
pub const BACKDATE: Duration = Duration::from_secs(60);

/// The default lifetime of a workload certificate: 24 h (Linkerd, Istio).
pub const DEFAULT_CERT_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// The default lifetime of a trust anchor created by [`MeshCa::create_anchor`]: 1 year.
pub const DEFAULT_ANCHOR_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

/// Why the CA could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// The CSR does not parse, or its signature does not match its key.
    #[error("invalid certificate signing request: {0}")]
    Csr(rcgen::Error),
    /// The CA's own certificate or key is unusable.
    #[error("invalid CA material: {0}; create a new one with `wary-control-plane ca init --ca-dir <empty dir>`")]
    Material(String),
    /// Signing failed.
    #[error("cannot sign: {0}")]
    Sign(rcgen::Error),
}

/// A trust anchor (self-signed root) and its private key, both PEM. Its `Debug` never
/// shows the key.
#[derive(Clone)]
pub struct AnchorPem {
    /// The root certificate, PEM.
    pub cert: String,
    /// Its PKCS#8 private key, PEM. Keep it secret (file mode 0600).
    pub key: String,
}

impl std::fmt::Debug for AnchorPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnchorPem")
            .field("cert", &self.cert)
            .finish_non_exhaustive()
    }
}

/// The signing half of the mesh CA.
pub struct MeshCa {
    issuer: Issuer<'static, KeyPair>,
    certificate: CertificateDer<'static>,
}

impl std::fmt::Debug for MeshCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshCa").finish_non_exhaustive()
    }
}

impl MeshCa {
    /// Creates a new self-signed trust anchor for `trust_domain`, valid for `lifetime`.
    ///
    /// # Errors
    /// [`CaError::Sign`] if rcgen cannot produce the certificate.
    pub fn create_anchor(trust_domain: &TrustDomain, lifetime: Duration) -> Result<AnchorPem, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(CaError::Sign)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Wary");
        let now = OffsetDateTime::now_utc();
        // Unique per anchor (nanoseconds), so two anchors in one bundle never share a
        // subject: chain building and operators both tell them apart by it.
        dn.push(
            DnType::CommonName,
            format!("wary root {trust_domain} {}", now.unix_timestamp_nanos()),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = now - BACKDATE;
        params.not_after = now + lifetime;
        params.use_authority_key_identifier_extension = true;
        let cert = params.self_signed(&key).map_err(CaError::Sign)?;
        Ok(AnchorPem {
            cert: cert.pem(),
            key: key.serialize_pem(),
        })
    }

    /// Loads the issuer from its certificate and key, both PEM.
    ///
    /// # Errors
    /// [`CaError::Material`] when either does not parse.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| CaError::Material(format!("CA key: {e}")))?;
        let certificate = crate::certificates_from_pem(cert_pem)
            .map_err(|e| CaError::Material(format!("CA certificate: {e}")))?
            .swap_remove(0);
        // A certificate and key from two different anchors (a rotation caught half-way)
        // must not sign anything.
        let (_, x509) = x509_parser::parse_x509_certificate(&certificate)
            .map_err(|e| CaError::Material(format!("CA certificate does not parse: {e}")))?;
        if x509.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(CaError::Material(
                "the CA key does not belong to the CA certificate".into(),
            ));
        }
        let issuer = Issuer::from_ca_cert_der(&certificate, key)
            .map_err(|e| CaError::Material(format!("CA certificate: {e}")))?;
        Ok(Self { issuer, certificate })
    }

    /// The issuer's certificate (DER).
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.certificate
    }

    /// Signs a certificate for `identity` over the public key in `csr` (PKCS#10 DER),
    /// valid from now − [`BACKDATE`] for `lifetime`. The certificate carries the SPIFFE
    /// ID as its URI SAN and [`SpiffeId::dns_name`] as a DNS SAN, and is usable for both
    /// server and client authentication. Whatever names the CSR asks for are ignored.
    ///
    /// # Errors
    /// [`CaError::Csr`] for a CSR that does not parse or whose signature is wrong;
    /// [`CaError::Sign`] if signing fails.
    pub fn sign(
        &self,
        csr: &[u8],
        identity: &SpiffeId,
        lifetime: Duration,
    ) -> Result<CertificateDer<'static>, CaError> {
        let now = OffsetDateTime::now_utc();
        self.sign_with_validity(csr, identity, now - BACKDATE, now + lifetime)
    }

    /// As [`MeshCa::sign`] with explicit validity bounds (UTC); tests use it for
    /// expired and not-yet-valid certificates.
    ///
    /// # Errors
    /// As [`MeshCa::sign`].
    pub fn sign_with_validity(
        &self,
        csr: &[u8],
        identity: &SpiffeId,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<CertificateDer<'static>, CaError> {
        let mut request = CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr))
            .map_err(CaError::Csr)?;
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![
            SanType::URI(identity.to_string().try_into().map_err(CaError::Sign)?),
            SanType::DnsName(identity.dns_name().try_into().map_err(CaError::Sign)?),
        ];
        params.distinguished_name = DistinguishedName::new();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        // Random serials (RFC 5280 §4.1.2.2 wants them unique per issuer; rcgen's default
        // derives them from the key, which repeats if a key is reused).
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&random_serial()));
        params.not_before = not_before;
        params.not_after = not_after;
        // Only the requested public key survives from the CSR.
        request.params = params;
        Ok(request.signed_by(&self.issuer).map_err(CaError::Sign)?.der().clone())
    }
}

/// 16 random bytes with the top bit clear (a positive INTEGER).
fn random_serial() -> [u8; 16] {
    let mut serial = [0u8; 16];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut serial)
        .expect("the system RNG is available");
    serial[0] &= 0x7f;
    serial
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credentials::WorkloadKey;
    use crate::tls::peer_identity;

    #[test]
    fn signs_only_the_checked_identity() {
        let td = TrustDomain::default();
        let anchor = MeshCa::create_anchor(&td, DEFAULT_ANCHOR_LIFETIME).unwrap();
        let ca = MeshCa::from_pem(&anchor.cert, &anchor.key).unwrap();
        let asked: SpiffeId = "spiffe://cluster.local/ns/default/sa/admin".parse().unwrap();
        let key = WorkloadKey::generate().unwrap();
        let csr = key.csr(&asked).unwrap();
        let granted: SpiffeId = "spiffe://cluster.local/ns/default/sa/web".parse().unwrap();
        let cert = ca.sign(&csr, &granted, Duration::from_secs(600)).unwrap();
        assert_eq!(peer_identity(&cert).unwrap(), granted);
    }

    #[test]
    fn refuses_a_tampered_csr() {
        let key = WorkloadKey::generate().unwrap();
        let mut csr = key.csr(&"spiffe://cluster.local/ns/a/sa/b".parse().unwrap()).unwrap();
        let last = csr.len() - 1;
        csr[last] ^= 0xff;
        let anchor = MeshCa::create_anchor(&TrustDomain::default(), DEFAULT_ANCHOR_LIFETIME).unwrap();
        let ca = MeshCa::from_pem(&anchor.cert, &anchor.key).unwrap();
        let err = ca
            .sign(
                &csr,
                &"spiffe://cluster.local/ns/a/sa/b".parse().unwrap(),
                Duration::from_secs(60),
            )
            .unwrap_err();
        assert!(matches!(err, CaError::Csr(_)), "{err}");
    }
}
