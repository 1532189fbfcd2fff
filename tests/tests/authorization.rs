//! Inbound authorization with real proxies: the policy that decides is named in the 403,
//! DENY overrides ALLOW, and a policy change takes effect without a restart.

use std::net::SocketAddr;

use wary_tests::{App, ControlPlane, MeshDir, Proxy, curl_via, service, wait_until, workload_as};

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
    let url = "http://backend.default:9090/api%2fadmin/users";
    let (status, text) = curl_via(web.outbound, url, &["--path-as-is"]).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("wary-error: bad-path"), "{text}");

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
