//! Identity end to end: join tokens, certificates, renewal and root rotation, with the
//! real control plane, real proxies and the real `wary-control-plane` CLI.

use tokio::process::Command;
use wary_certs::credentials::{Credentials, TrustBundle, WorkloadKey};
use wary_certs::tls::peer_identity;
use wary_proto::identity::identity_client::IdentityClient;
use wary_proto::identity::{CertifyRequest, certify_request};
use wary_tests::{ControlPlane, MeshDir, Proxy, binary, curl, wait_until, workload};

const MESH_CONFIG_10S: &str = "apiVersion: policy.wary.io/v1alpha1
kind: MeshConfig
metadata:
  name: mesh
spec:
  certificateLifetime: 10s
";

async fn certify(cp: &ControlPlane, token: &str, identity: &str) -> Result<String, tonic::Status> {
    let creds = cp.bootstrap_credentials();
    let mut client = IdentityClient::new(cp.channel(&creds).await);
    let key = WorkloadKey::generate().unwrap();
    let response = client
        .certify(CertifyRequest {
            identity: identity.to_string(),
            csr: key.csr_for(None).unwrap(),
            proof: Some(certify_request::Proof::JoinToken(token.to_string())),
        })
        .await?
        .into_inner();
    Ok(peer_identity(&response.certificate.into()).unwrap().to_string())
}

#[tokio::test]
async fn a_join_token_gets_only_its_own_identity() {
    let mesh = MeshDir::new();
    mesh.write("a.yaml", &workload("a-1", "alpha", "127.0.2.1", 8080));
    mesh.write("b.yaml", &workload("b-1", "beta", "127.0.2.2", 8080));
    let cp = ControlPlane::start(&mesh).await;
    let token_a = cp.token("a-1").await;
    let alpha = "spiffe://cluster.local/ns/default/sa/alpha";
    let beta = "spiffe://cluster.local/ns/default/sa/beta";

    assert_eq!(certify(&cp, &token_a, "").await.unwrap(), alpha);
    assert_eq!(certify(&cp, &token_a, alpha).await.unwrap(), alpha);
    let denied = certify(&cp, &token_a, beta).await.unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    assert!(
        denied
            .message()
            .contains(&format!("the proof is for {alpha}, not {beta}")),
        "{denied}"
    );

    let forged = token_a.replace(".a-1.", ".b-1.");
    let refused = certify(&cp, &forged, "").await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    assert!(refused.message().contains("signature does not verify"), "{refused}");

    let ghost = cp.token("ghost-1").await;
    let missing = certify(&cp, &ghost, "").await.unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    assert!(missing.message().contains("no Workload default/ghost-1"), "{missing}");

    let metrics = cp.admin_get("/metrics").await;
    assert!(
        metrics.contains("wary_control_plane_certificate_requests_total{result=\"denied\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("wary_control_plane_certificate_requests_total{result=\"ok\"} 2"),
        "{metrics}"
    );
}

#[tokio::test]
async fn the_control_plane_refuses_plaintext_and_strangers_refuse_it() {
    let mesh = MeshDir::new();
    let cp = ControlPlane::start(&mesh).await;
    // Plaintext HTTP to the TLS port.
    let answer = curl(&format!("http://{}/", cp.discovery)).await;
    assert!(!answer.starts_with("HTTP 200"), "{answer}");
    cp.logs.wait_for(&["refused a TLS handshake", "reason=not_tls"]).await;
    wait_until("the not_tls metric", || async {
        let m = cp.admin_get("/metrics").await;
        m.contains("wary_control_plane_tls_handshake_failures_total{reason=\"not_tls\"}")
            .then_some(())
    })
    .await;
    // A client that trusts another CA refuses the control plane, saying why.
    let other = MeshDir::new();
    let out = Command::new(binary("wary-control-plane"))
        .args(["ca", "bundle", "--ca-dir"])
        .arg(other.ca_path())
        .output()
        .await
        .unwrap();
    let foreign = Credentials::new(TrustBundle::from_pem(&String::from_utf8(out.stdout).unwrap()).unwrap()).unwrap();
    let err = cp.control_plane().connect(&foreign).await.unwrap_err();
    assert!(
        err.contains("TLS handshake with the control plane failed (unknown_ca)"),
        "{err}"
    );
}

#[tokio::test]
async fn a_proxy_renews_and_follows_a_root_rotation() {
    let mesh = MeshDir::new();
    mesh.write("mesh.yaml", MESH_CONFIG_10S);
    mesh.write("web.yaml", &workload("web-1", "web", "127.0.2.3", 8080));
    let cp = ControlPlane::start(&mesh).await;
    let proxy = Proxy::start(&cp, "web-1").await;
    let first = wait_until("a certificate", || async {
        let c = proxy.certificate().await;
        (!c.is_null()).then_some(c)
    })
    .await;
    assert_eq!(first["identity"], "spiffe://cluster.local/ns/default/sa/web");
    let lifetime =
        first["not_after_unix_seconds"].as_u64().unwrap() - first["not_before_unix_seconds"].as_u64().unwrap();
    assert_eq!(lifetime, 70, "10 s plus the 60 s backdate");
    wait_until("ready", || async {
        (proxy.admin_get("/ready").await == "ok\n").then_some(())
    })
    .await;

    // Two renewals (at 65–75 % of 10 s), each a new certificate, with the proxy ready
    // throughout.
    let mut seen = first["not_after_unix_seconds"].as_u64().unwrap();
    for _ in 0..2 {
        let next = wait_until("a renewal", || async {
            let after = proxy.certificate().await["not_after_unix_seconds"].as_u64()?;
            (after > seen).then_some(after)
        })
        .await;
        // Renewed at 65-75 % of 10 s, not at once: expiries at least 5 s apart.
        assert!(next >= seen + 5, "renewed too early: {seen} -> {next}");
        seen = next;
        assert_eq!(proxy.admin_get("/ready").await, "ok\n");
    }
    let metrics = proxy.admin_get("/metrics").await;
    assert!(
        metrics.contains("wary_proxy_identity_certificate_expiry_timestamp_seconds"),
        "{metrics}"
    );

    // Root rotation: add an anchor, switch the issuer, drop the old anchor.
    let old_issuer = proxy.certificate().await["issuer"].clone();
    cp.ca("add-anchor").await;
    wait_until("the proxy trusts two anchors", || async {
        (proxy.certificate().await["trust_anchors"] == 2).then_some(())
    })
    .await;
    cp.ca("use-next").await;
    wait_until("a certificate from the new anchor", || async {
        let c = proxy.certificate().await;
        (c["issuer"] != old_issuer && c["trust_anchors"] == 2).then_some(())
    })
    .await;
    cp.ca("drop-old").await;
    wait_until("the proxy trusts only the new anchor", || async {
        (proxy.certificate().await["trust_anchors"] == 1).then_some(())
    })
    .await;
    // Still connected to the control plane, which re-issued its own certificate.
    let renewed = proxy.certificate().await["not_after_unix_seconds"].as_u64().unwrap();
    wait_until("a renewal after the rotation", || async {
        let after = proxy.certificate().await["not_after_unix_seconds"].as_u64()?;
        (after > renewed).then_some(())
    })
    .await;
    assert_eq!(proxy.admin_get("/ready").await, "ok\n");
}

#[tokio::test]
async fn the_control_plane_identity_is_never_a_workloads() {
    let mesh = MeshDir::new();
    mesh.write(
        "evil.yaml",
        "apiVersion: local.wary.io/v1alpha1
kind: Workload
metadata:
  name: evil-1
  namespace: wary-system
spec:
  serviceAccount: wary-control-plane
  address: 127.0.2.9
",
    );
    let cp = ControlPlane::start(&mesh).await;
    cp.logs
        .wait_for(&["evil.yaml:1:", "is reserved for the control plane"])
        .await;
    let ready = cp.admin_get("/ready").await;
    assert!(ready.starts_with("HTTP 503"), "{ready}");
}

#[tokio::test]
async fn a_deleted_workload_cannot_renew() {
    let mesh = MeshDir::new();
    mesh.write("mesh.yaml", MESH_CONFIG_10S);
    mesh.write("web.yaml", &workload("web-1", "web", "127.0.2.4", 8080));
    mesh.write("other.yaml", &workload("other-1", "other", "127.0.2.5", 8080));
    let cp = ControlPlane::start(&mesh).await;
    let proxy = Proxy::start(&cp, "web-1").await;
    proxy.wait_ready().await;
    mesh.remove("web.yaml");
    proxy
        .logs
        .wait_for(&[
            "certificate request failed",
            "no configured workload runs as spiffe://cluster.local/ns/default/sa/web",
        ])
        .await;
}

/// An operator who rotates the root in one go (without waiting for renewals) strands
/// certificates from the old anchor; the proxy finds its way back with its join token
/// and the trust anchors file.
#[tokio::test]
async fn a_proxy_recovers_from_a_rotation_done_too_fast() {
    let mesh = MeshDir::new();
    mesh.write("mesh.yaml", MESH_CONFIG_10S);
    mesh.write("web.yaml", &workload("web-1", "web", "127.0.2.6", 8080));
    let cp = ControlPlane::start(&mesh).await;
    let proxy = Proxy::start(&cp, "web-1").await;
    proxy.wait_ready().await;
    let old_issuer = proxy.certificate().await["issuer"].clone();
    cp.ca("add-anchor").await;
    cp.ca("use-next").await;
    cp.ca("drop-old").await;
    wait_until("a certificate from the new anchor", || async {
        let c = proxy.certificate().await;
        (c["issuer"] != old_issuer && c["trust_anchors"] == 1).then_some(())
    })
    .await;
    proxy.logs.wait_for(&["certificate request failed"]).await;
    assert_eq!(proxy.admin_get("/ready").await, "ok\n");
}
