//! rustls configs for mesh mTLS, and what a handshake tells about the peer.
//!
//! Both configs are TLS 1.3 only and read [`Credentials`] at each handshake: the
//! certificate through a resolver, the trust bundle through verifiers that delegate to
//! the bundle in force. So rotation never rebuilds a config or touches open connections.
//!
//! * Server: requires (or, for bootstrap and permissive ports, allows) a client
//!   certificate that leads to the bundle. [`peer_identity`] then reads its SPIFFE ID.
//! * Client: checks the server's chain against the bundle *and* its identity, by asking
//!   for the server name [`server_name`]`(expected)`, which the CA writes into every
//!   certificate as a DNS SAN next to the SPIFFE URI.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ClientConfig, ResolvesClientCert};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, ServerConfig};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::SpiffeId;
use crate::credentials::Credentials;

/// ALPN protocol between proxies: HTTP/2 (DESIGN.md: one connection, many requests).
pub const ALPN_H2: &[u8] = b"h2";

/// Whether a server asks for client certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// A valid mesh certificate is required (mesh mTLS, `strict`).
    Required,
    /// A certificate is verified if presented, and may be absent (the control plane's
    /// bootstrap, `permissive` ports).
    Optional,
}

/// A server config serving the current certificate, verifying clients per `auth`.
/// `alpn` lists the protocols offered, e.g. `[ALPN_H2]`.
pub fn server_config(creds: &Arc<Credentials>, auth: ClientAuth, alpn: &[&[u8]]) -> Arc<ServerConfig> {
    let mut config = ServerConfig::builder_with_provider(creds.provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("ring supports TLS 1.3")
        .with_client_cert_verifier(Arc::new(ClientVerifier {
            creds: creds.clone(),
            auth,
        }))
        .with_cert_resolver(Arc::new(Resolver(creds.clone())));
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // No session resumption: a resumed session skips certificate verification, so a
    // dropped anchor or an expired certificate would stay accepted for the ticket's life.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Arc::new(config)
}

/// A client config presenting the current certificate (if any) and verifying servers
/// against the current bundle. Connect with [`server_name`] of the expected identity.
pub fn client_config(creds: &Arc<Credentials>, alpn: &[&[u8]]) -> Arc<ClientConfig> {
    let mut config = ClientConfig::builder_with_provider(creds.provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("ring supports TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ServerVerifier(creds.clone())))
        .with_client_cert_resolver(Arc::new(Resolver(creds.clone())));
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // See `server_config`: every handshake is verified in full.
    config.resumption = rustls::client::Resumption::disabled();
    Arc::new(config)
}

/// The TLS server name that asks for `identity`: its DNS-like form.
///
/// # Errors
/// Never for identities built by [`SpiffeId`]; the error type is rustls's.
pub fn server_name(identity: &SpiffeId) -> Result<ServerName<'static>, rustls::pki_types::InvalidDnsNameError> {
    ServerName::try_from(identity.dns_name())
}

/// Why a peer's certificate carries no usable identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerIdentityError {
    /// The certificate does not parse.
    #[error("peer certificate does not parse: {0}")]
    Malformed(String),
    /// No `spiffe://` URI SAN, or more than one.
    #[error("peer certificate has {0} SPIFFE URI SANs; expected exactly one")]
    UriCount(usize),
    /// The URI is not a valid SPIFFE ID.
    #[error(transparent)]
    Invalid(#[from] crate::IdentityError),
}

/// The SPIFFE ID in a certificate's URI SAN. Call it on a leaf the handshake already
/// verified.
///
/// # Errors
/// [`PeerIdentityError`] when there is not exactly one valid SPIFFE URI SAN.
pub fn peer_identity(cert: &CertificateDer<'_>) -> Result<SpiffeId, PeerIdentityError> {
    let (_, x509) =
        x509_parser::parse_x509_certificate(cert).map_err(|e| PeerIdentityError::Malformed(e.to_string()))?;
    let san = x509
        .subject_alternative_name()
        .map_err(|e| PeerIdentityError::Malformed(e.to_string()))?;
    let uris: Vec<&str> = san
        .iter()
        .flat_map(|s| s.value.general_names.iter())
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) if u.starts_with("spiffe://") => Some(*u),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [one] => Ok(one.parse()?),
        other => Err(PeerIdentityError::UriCount(other.len())),
    }
}

/// Why a mesh TLS handshake failed, as a bounded metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// The peer did not speak TLS (plaintext to an mTLS port).
    NotTls,
    /// The client presented no certificate where one is required.
    NoClientCertificate,
    /// The peer's chain does not lead to the trust bundle (another CA).
    UnknownCa,
    /// The peer's certificate has expired.
    Expired,
    /// The peer's certificate is not valid yet.
    NotYetValid,
    /// The server's certificate names another identity than the one expected.
    WrongIdentity,
    /// The peer refused our certificate (it sent an alert).
    PeerRefused,
    /// The connection failed during the handshake (reset, timeout, EOF).
    Io,
    /// Anything else.
    Other,
}

impl HandshakeFailure {
    /// The metric label: `not_tls`, `no_client_certificate`, `unknown_ca`, `expired`,
    /// `not_yet_valid`, `wrong_identity`, `peer_refused`, `io`, `other`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotTls => "not_tls",
            Self::NoClientCertificate => "no_client_certificate",
            Self::UnknownCa => "unknown_ca",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::WrongIdentity => "wrong_identity",
            Self::PeerRefused => "peer_refused",
            Self::Io => "io",
            Self::Other => "other",
        }
    }

    /// Classifies the error a tokio-rustls accept or connect returned.
    pub fn classify(err: &std::io::Error) -> Self {
        let Some(tls) = err.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) else {
            return Self::Io;
        };
        match tls {
            rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => Self::NotTls,
            rustls::Error::NoCertificatesPresented => Self::NoClientCertificate,
            rustls::Error::InvalidCertificate(c) => match c {
                CertificateError::UnknownIssuer | CertificateError::BadSignature => Self::UnknownCa,
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => Self::Expired,
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => Self::NotYetValid,
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                    Self::WrongIdentity
                }
                _ => Self::Other,
            },
            rustls::Error::AlertReceived(_) => Self::PeerRefused,
            _ => Self::Other,
        }
    }
}

impl std::fmt::Display for HandshakeFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Serves and presents the current certificate.
#[derive(Debug)]
struct Resolver(Arc<Credentials>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.certified.load_full()
    }
}

impl ResolvesClientCert for Resolver {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.0.certified.load_full()
    }

    fn has_certs(&self) -> bool {
        self.0.certified.load().is_some()
    }
}

/// Verifies clients against the bundle in force at the handshake.
#[derive(Debug)]
struct ClientVerifier {
    creds: Arc<Credentials>,
    auth: ClientAuth,
}

impl ClientVerifier {
    fn current(&self) -> Arc<dyn ClientCertVerifier> {
        let t = self.creds.trust.load();
        match self.auth {
            ClientAuth::Required => t.verifiers.client_required.clone(),
            ClientAuth::Optional => t.verifiers.client_optional.clone(),
        }
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.auth == ClientAuth::Required
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Hints are optional (RFC 8446 §4.2.4); every client has one mesh certificate.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.current().verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.current().supported_verify_schemes()
    }
}

/// Verifies servers (chain and name) against the bundle in force at the handshake.
#[derive(Debug)]
struct ServerVerifier(Arc<Credentials>);

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.0.trust.load().verifiers.server.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0
            .trust
            .load()
            .verifiers
            .server
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0
            .trust
            .load()
            .verifiers
            .server
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.trust.load().verifiers.server.supported_verify_schemes()
    }
}
