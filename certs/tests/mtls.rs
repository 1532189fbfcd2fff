//! Real TLS 1.3 handshakes over loopback with the mesh configs: who gets in, who does
//! not, and why.

use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use wary_certs::ca::{DEFAULT_ANCHOR_LIFETIME, MeshCa};
use wary_certs::credentials::{Credentials, TrustBundle, WorkloadKey};
use wary_certs::tls::{
    ALPN_H2, ClientAuth, HandshakeFailure, client_config, peer_identity, server_config, server_name,
};
use wary_certs::{SpiffeId, TrustDomain};

struct Ca {
    ca: MeshCa,
    bundle: TrustBundle,
}

fn new_ca() -> Ca {
    let anchor = MeshCa::create_anchor(&TrustDomain::default(), DEFAULT_ANCHOR_LIFETIME).unwrap();
    Ca {
        ca: MeshCa::from_pem(&anchor.cert, &anchor.key).unwrap(),
        bundle: TrustBundle::from_pem(&anchor.cert).unwrap(),
    }
}

fn id(sa: &str) -> SpiffeId {
    format!("spiffe://cluster.local/ns/default/sa/{sa}").parse().unwrap()
}

/// Credentials for `sa` issued by `issuer`, trusting `trusts`.
fn creds(issuer: &Ca, trusts: &TrustBundle, sa: &str) -> Arc<Credentials> {
    let c = Credentials::new(issuer.bundle.clone()).unwrap();
    let key = WorkloadKey::generate().unwrap();
    let cert = issuer
        .ca
        .sign(&key.csr(&id(sa)).unwrap(), &id(sa), Duration::from_secs(600))
        .unwrap();
    c.set_certificate(vec![cert], &key, Some(&id(sa))).unwrap();
    c.set_trust_bundle(trusts.clone()).unwrap();
    c
}

/// Accepts one connection with `server`; returns the handshake result on the server
/// side and the client's.
async fn handshake(
    server: &Arc<Credentials>,
    client: &Arc<Credentials>,
    expect: &SpiffeId,
) -> (Result<SpiffeId, HandshakeFailure>, Result<(), HandshakeFailure>) {
    handshake_with(server, client_config(client, &[ALPN_H2]), expect).await
}

async fn handshake_with(
    server: &Arc<Credentials>,
    client: Arc<rustls::ClientConfig>,
    expect: &SpiffeId,
) -> (Result<SpiffeId, HandshakeFailure>, Result<(), HandshakeFailure>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(server_config(server, ClientAuth::Required, &[ALPN_H2]));
    let server_side = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        match acceptor.accept(tcp).await {
            Ok(mut tls) => {
                let peer = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
                let mut buf = [0u8; 4];
                tls.read_exact(&mut buf).await.unwrap();
                tls.write_all(b"pong").await.unwrap();
                Ok(peer_identity(&peer).unwrap())
            }
            Err(e) => Err(HandshakeFailure::classify(&e)),
        }
    });
    let connector = TlsConnector::from(client);
    let tcp = TcpStream::connect(addr).await.unwrap();
    let client_side = match connector.connect(server_name(expect).unwrap(), tcp).await {
        Ok(mut tls) => {
            // TLS 1.3: the server checks the client's certificate after the client's
            // handshake completes, so exchange data to see the verdict.
            let result = async {
                tls.write_all(b"ping").await?;
                let mut buf = [0u8; 4];
                tls.read_exact(&mut buf).await?;
                Ok::<_, std::io::Error>(())
            }
            .await;
            result.map_err(|e| HandshakeFailure::classify(&e))
        }
        Err(e) => Err(HandshakeFailure::classify(&e)),
    };
    (server_side.await.unwrap(), client_side)
}

#[tokio::test]
async fn mesh_peers_get_in_and_learn_each_other() {
    let ca = new_ca();
    let server = creds(&ca, &ca.bundle, "orders");
    let client = creds(&ca, &ca.bundle, "web");
    let (s, c) = handshake(&server, &client, &id("orders")).await;
    assert_eq!(s, Ok(id("web")));
    assert_eq!(c, Ok(()));
}

#[tokio::test]
async fn plaintext_is_refused_as_not_tls() {
    let ca = new_ca();
    let server = creds(&ca, &ca.bundle, "orders");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(server_config(&server, ClientAuth::Required, &[ALPN_H2]));
    let accept = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        acceptor
            .accept(tcp)
            .await
            .map(|_| ())
            .map_err(|e| HandshakeFailure::classify(&e))
    });
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: orders\r\n\r\n").await.unwrap();
    assert_eq!(accept.await.unwrap(), Err(HandshakeFailure::NotTls));
}

#[tokio::test]
async fn a_client_from_another_ca_is_refused_as_unknown_ca() {
    let (ours, theirs) = (new_ca(), new_ca());
    let server = creds(&ours, &ours.bundle, "orders");
    let intruder = creds(&theirs, &ours.bundle, "web");
    let (s, c) = handshake(&server, &intruder, &id("orders")).await;
    assert_eq!(s, Err(HandshakeFailure::UnknownCa));
    assert!(c.is_err());
}

#[tokio::test]
async fn expired_and_not_yet_valid_clients_are_refused() {
    let ca = new_ca();
    let server = creds(&ca, &ca.bundle, "orders");
    let now = OffsetDateTime::now_utc();
    for (from, to, want) in [
        (
            now - time::Duration::hours(2),
            now - time::Duration::hours(1),
            HandshakeFailure::Expired,
        ),
        (
            now + time::Duration::hours(1),
            now + time::Duration::hours(2),
            HandshakeFailure::NotYetValid,
        ),
    ] {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let csr = rcgen::CertificateParams::default().serialize_request(&key).unwrap();
        let cert = ca.ca.sign_with_validity(csr.der(), &id("web"), from, to).unwrap();
        // Our own credentials refuse to install such a certificate...
        let ours = Credentials::new(ca.bundle.clone()).unwrap();
        let err = ours
            .set_certificate(vec![cert.clone()], &WorkloadKey::generate().unwrap(), None)
            .unwrap_err();
        assert!(err.to_string().contains("certificate refused"), "{err}");
        // ...so present it with a hand-built rustls client.
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.bundle.anchors()[0].clone()).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(
                vec![cert],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        let (s, _) = handshake_with(&server, Arc::new(client), &id("orders")).await;
        assert_eq!(s, Err(want));
    }
}

#[tokio::test]
async fn a_server_with_the_wrong_identity_is_refused_by_the_client() {
    let ca = new_ca();
    let impostor = creds(&ca, &ca.bundle, "billing");
    let client = creds(&ca, &ca.bundle, "web");
    let (_, c) = handshake(&impostor, &client, &id("orders")).await;
    assert_eq!(c, Err(HandshakeFailure::WrongIdentity));
}

#[tokio::test]
async fn rotation_swaps_certificates_and_anchors_in_place() {
    let (old, new) = (new_ca(), new_ca());
    let both = TrustBundle::new([old.bundle.anchors(), new.bundle.anchors()].concat()).unwrap();
    let server = creds(&old, &old.bundle, "orders");
    let client = creds(&old, &old.bundle, "web");
    assert!(handshake(&server, &client, &id("orders")).await.0.is_ok());

    // Step 1: both trust both anchors. Step 2: re-issue from the new anchor.
    server.set_trust_bundle(both.clone()).unwrap();
    client.set_trust_bundle(both.clone()).unwrap();
    for (c, sa) in [(&server, "orders"), (&client, "web")] {
        let key = WorkloadKey::generate().unwrap();
        let cert = new
            .ca
            .sign(&key.csr(&id(sa)).unwrap(), &id(sa), Duration::from_secs(600))
            .unwrap();
        c.set_certificate(vec![cert], &key, Some(&id(sa))).unwrap();
    }
    assert!(handshake(&server, &client, &id("orders")).await.0.is_ok());
    // Step 3: drop the old anchor; an old-anchor client is now refused.
    server.set_trust_bundle(new.bundle.clone()).unwrap();
    assert!(handshake(&server, &client, &id("orders")).await.0.is_ok());
    let stale = creds(&old, &both, "web");
    assert_eq!(
        handshake(&server, &stale, &id("orders")).await.0,
        Err(HandshakeFailure::UnknownCa)
    );
}
