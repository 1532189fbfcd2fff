//! Inbound authorization with real proxies: the policy that decides is named in the 403,
//! DENY overrides ALLOW, a policy change takes effect under load within a second without
//! failing allowed traffic, and the mTLS modes (strict refuses plaintext, permissive
//! serves and counts it, per port).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use wary_tests::{App, ControlPlane, MeshDir, Proxy, curl_via, load, service, wait_until, workload_as};

fn policy(name: &str, action: &str, principal: &str, paths: &str) -> String {
    format!(
        "apiVersion: policy.wary.io/v1alpha1
kind: AuthorizationPolicy
metadata:
  name: {name}
spec:
  targetRef:
    kind: Service
    name: backend
  action: {action}
  rules:
  - from:
    - source:
        principals: [\"{principal}\"]
    to:
    - operation:
        paths: [{paths}]
"
    )
}

async fn get(proxy: SocketAddr, path: &str) -> (u16, String) {
    curl_via(proxy, &format!("http://backend.default:9090{path}"), &[]).await
}

#[tokio::test]
async fn policies_allow_deny_and_name_themselves() {
    let mesh = MeshDir::new();
    mesh.write("service.yaml", &service("backend", 9090));
    mesh.write("web.yaml", &workload_as("web-1", "web", "web", "127.0.9.1", 8080));
    mesh.write(
        "backend.yaml",
        &workload_as("backend-1", "backend", "backend", "127.0.9.2", 8080),
    );
    // Only `ops` may call the backend.
    mesh.write(
        "allow.yaml",
        &policy(
            "ops-only",
            "ALLOW",
            "spiffe://cluster.local/ns/default/sa/ops",
            "\"/*\"",
        ),
    );
    let cp = ControlPlane::start(&mesh).await;
    let _app = App::start("127.0.9.2:8080".parse().unwrap(), "backend-1").await;
    let web = Proxy::start_at(&cp, "web-1", "127.0.9.1:4143".parse().unwrap()).await;
    let backend = Proxy::start_at(&cp, "backend-1", "127.0.9.2:4143".parse().unwrap()).await;
    web.wait_ready().await;
    backend.wait_ready().await;

    let (status, text) = get(web.outbound, "/").await;
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("wary-error: forbidden"), "{text}");
    assert!(text.contains("spiffe://cluster.local/ns/default/sa/web may not GET / on backend-1.default port 8080: denied by no ALLOW policy matched"), "{text}");

    // Allow web on /api/*, deny /api/admin*: DENY wins where both match.
    mesh.write(
        "allow.yaml",
        &policy(
            "web-api",
            "ALLOW",
            "spiffe://cluster.local/ns/default/sa/web",
            "\"/api/*\"",
        ),
    );
    mesh.write("deny.yaml", &policy("no-admin", "DENY", "*", "\"/api/admin*\""));
    wait_until("the new policies apply", || async {
        (get(web.outbound, "/api/orders").await.0 == 200).then_some(())
    })
    .await;
    let (status, text) = get(web.outbound, "/api/admin/users").await;
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("denied by no-admin.default"), "{text}");
    assert_eq!(get(web.outbound, "/other").await.0, 403);
    // The DENY holds however the path is spelled: authorization (and the app) see it
    // normalized; an encoded slash is refused outright.
    for spelled in [
        "//api/admin/users",
        "/api/./admin/users",
        "/api/x/../admin/users",
        "/api/%61dmin/users",
    ] {
        let url = format!("http://backend.default:9090{spelled}");
        let (status, text) = curl_via(web.outbound, &url, &["--path-as-is"]).await;
        assert_eq!(status, 403, "{spelled}: {text}");
    }
    // So is a dot segment with path parameters, which Java servers resolve as `..`.
    for url in [
        "http://backend.default:9090/api%2fadmin/users",
        "http://backend.default:9090/api/orders/..;/admin/users",
    ] {
        let (status, text) = curl_via(web.outbound, url, &["--path-as-is"]).await;
        assert_eq!(status, 400, "{url}: {text}");
        assert!(text.contains("wary-error: bad-path"), "{url}: {text}");
    }

    let metrics = backend.admin_get("/metrics").await;
    assert!(
        metrics.contains("wary_proxy_inbound_authorizations_total{decision=\"deny\",policy=\"no-admin.default\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("wary_proxy_inbound_authorizations_total{decision=\"allow\",policy=\"web-api.default\"}"),
        "{metrics}"
    );
}

/// An ALLOW policy on the backend for exactly these principals.
fn allow_only(principals: &[&str]) -> String {
    let list: Vec<String> = principals
        .iter()
        .map(|p| format!("\"spiffe://cluster.local/ns/default/sa/{p}\""))
        .collect();
    format!(
        "apiVersion: policy.wary.io/v1alpha1
kind: AuthorizationPolicy
metadata:
  name: callers
spec:
  targetRef:
    kind: Service
    name: backend
  action: ALLOW
  rules:
  - from:
    - source:
        principals: [{}]
",
        list.join(", ")
    )
}

#[tokio::test]
async fn a_policy_change_under_load_applies_within_a_second_and_drops_no_allowed_request() {
    let mesh = MeshDir::new();
    mesh.write("service.yaml", &service("backend", 9090));
    mesh.write("web.yaml", &workload_as("web-1", "web", "web", "127.0.9.21", 8080));
    mesh.write("ops.yaml", &workload_as("ops-1", "ops", "ops", "127.0.9.22", 8080));
    mesh.write(
        "backend.yaml",
        &workload_as("backend-1", "backend", "backend", "127.0.9.23", 8080),
    );
    mesh.write("allow.yaml", &allow_only(&["web", "ops"]));
    let cp = ControlPlane::start(&mesh).await;
    let _app = App::start("127.0.9.23:8080".parse().unwrap(), "backend-1").await;
    let web = Proxy::start_at(&cp, "web-1", "127.0.9.21:4143".parse().unwrap()).await;
    let ops = Proxy::start_at(&cp, "ops-1", "127.0.9.22:4143".parse().unwrap()).await;
    let backend = Proxy::start_at(&cp, "backend-1", "127.0.9.23:4143".parse().unwrap()).await;
    for p in [&web, &ops, &backend] {
        p.wait_ready().await;
    }
    assert_eq!(get(ops.outbound, "/").await.0, 200);

    // web calls steadily at 200 requests/s for 4 s; part-way, ops loses its access.
    let url = "http://backend.default:9090/steady";
    let steady = tokio::spawn(load(web.outbound, url, 200, Duration::from_secs(4)));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let changed = Instant::now();
    mesh.write("allow.yaml", &allow_only(&["web"]));
    let took = loop {
        let (status, text) = get(ops.outbound, "/").await;
        if status == 403 {
            assert!(text.contains("denied by no ALLOW policy matched"), "{text}");
            break changed.elapsed();
        }
        assert_eq!(status, 200, "{text}");
        assert!(
            changed.elapsed() < Duration::from_secs(10),
            "the new policy never applied"
        );
    };
    println!("the policy change applied in {took:?}");
    assert!(took < Duration::from_secs(1), "the policy change took {took:?}");

    let report = steady.await.unwrap();
    assert_eq!(report.sent, 800);
    assert_eq!(report.failed, 0, "allowed requests failed: {:?}", report.failures);
}

/// A plaintext GET straight to `addr` (a client outside the mesh), claiming to be `admin`.
async fn plaintext_get(addr: SocketAddr) -> Result<(u16, String), String> {
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "-i", "--max-time", "10"])
        .args(["-H", "wary-client-id: spiffe://cluster.local/ns/default/sa/admin"])
        .arg(format!("http://{addr}/hello"))
        .output()
        .await
        .expect("run curl");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).to_string());
    }
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_default();
    Ok((status, text))
}

fn backend_with_ports(ports: &str) -> String {
    format!(
        "apiVersion: local.wary.io/v1alpha1
kind: Workload
metadata:
  name: backend-1
  labels:
    app: backend
spec:
  serviceAccount: backend
  address: 127.0.9.32
  ports:
{ports}"
    )
}

#[tokio::test]
async fn strict_refuses_plaintext_and_permissive_serves_and_counts_it_per_port() {
    let mesh = MeshDir::new();
    mesh.write("service.yaml", &service("backend", 9090));
    mesh.write("web.yaml", &workload_as("web-1", "web", "web", "127.0.9.31", 8080));
    mesh.write("backend.yaml", &backend_with_ports("  - {name: http, port: 8080}\n"));
    let cp = ControlPlane::start(&mesh).await;
    let _app = App::start("127.0.9.32:8080".parse().unwrap(), "backend-1").await;
    let web = Proxy::start_at(&cp, "web-1", "127.0.9.31:4143".parse().unwrap()).await;
    let backend = Proxy::start_at(&cp, "backend-1", "127.0.9.32:4143".parse().unwrap()).await;
    web.wait_ready().await;
    backend.wait_ready().await;
    let inbound = backend.inbound;

    // Strict (the default): plaintext fails the handshake.
    let refused = plaintext_get(inbound).await.unwrap_err();
    assert!(!refused.is_empty());
    backend
        .logs
        .wait_for(&["refused an inbound connection", "reason=not_tls"])
        .await;

    // The port turns permissive: plaintext is served, with no identity (the forged one
    // is dropped), and counted; mesh traffic keeps its verified identity.
    mesh.write(
        "backend.yaml",
        &backend_with_ports("  - {name: http, port: 8080, mtls: {mode: permissive}}\n"),
    );
    let (status, text) = wait_until("plaintext is served", || async { plaintext_get(inbound).await.ok() }).await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("hello from backend-1"), "{text}");
    assert!(!text.to_lowercase().contains("x-seen-client-id"), "{text}");
    let (status, text) = get(web.outbound, "/").await;
    assert_eq!(status, 200, "{text}");
    assert!(
        text.to_lowercase()
            .contains("x-seen-client-id: spiffe://cluster.local/ns/default/sa/web"),
        "{text}"
    );
    let metrics = backend.admin_get("/metrics").await;
    for series in [
        "wary_proxy_inbound_plaintext_connections_total{decision=\"served\"}",
        "client=\"unauthenticated\",code=\"2xx\"",
    ] {
        assert!(metrics.contains(series), "{series} in {metrics}");
    }

    // Policies naming identities never match a plaintext client.
    mesh.write("allow.yaml", &allow_only(&["web"]));
    let (status, text) = wait_until("the policy applies", || async {
        plaintext_get(inbound).await.ok().filter(|(status, _)| *status == 403)
    })
    .await;
    assert_eq!(status, 403);
    assert!(
        text.contains("an unauthenticated (plaintext) client may not GET /hello on backend-1.default port 8080"),
        "{text}"
    );
    assert_eq!(get(web.outbound, "/").await.0, 200);
    mesh.remove("allow.yaml");

    // Permissive on another port only: plaintext to this one (explicit mode: the first
    // declared port) is refused, and counted.
    mesh.write(
        "backend.yaml",
        &backend_with_ports("  - {name: http, port: 8080}\n  - {name: legacy, port: 8081, mtls: {mode: permissive}}\n"),
    );
    wait_until("plaintext is refused on the strict port", || async {
        let m = backend.admin_get("/metrics").await;
        let refused = plaintext_get(inbound).await.is_err();
        (refused && m.contains("wary_proxy_inbound_plaintext_connections_total{decision=\"refused\"}")).then_some(())
    })
    .await;
    assert_eq!(get(web.outbound, "/").await.0, 200);

    // Permissive mesh-wide, through MeshConfig.
    mesh.write("backend.yaml", &backend_with_ports("  - {name: http, port: 8080}\n"));
    mesh.write(
        "mesh.yaml",
        "apiVersion: policy.wary.io/v1alpha1
kind: MeshConfig
metadata:
  name: mesh
spec:
  mtls:
    mode: permissive
",
    );
    let (status, text) = wait_until("plaintext is served mesh-wide", || async {
        plaintext_get(inbound).await.ok().filter(|(status, _)| *status == 200)
    })
    .await;
    assert!(text.contains("hello from backend-1"), "{status} {text}");
}
