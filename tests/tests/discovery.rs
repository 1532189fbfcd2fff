//! The discovery spine, end to end: a real `wary-control-plane` process on a temporary
//! directory, real discovery clients (the proxy's own, in process, and the `wary-proxy`
//! binary), and a raw gRPC stream where the bytes on the wire are the point.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use wary_proto::discovery::discovery_client::DiscoveryClient;
use wary_proto::discovery::{DiscoveryRequest, DiscoveryResponse, Node, Service};
use wary_proto::{TypedResource, WILDCARD};
use wary_tests::{Client, ControlPlane, DEADLINE, MeshDir, Proxy, service, wait_until, workload};

fn port_of(state: &wary_proxy::state::DiscoveryState, svc: &str) -> Option<u32> {
    state.service(svc).and_then(|s| s.ports.first()).map(|p| p.port)
}

#[tokio::test]
async fn an_edit_reaches_the_client_within_one_second() {
    let mesh = MeshDir::new();
    mesh.write("orders.yaml", &service("orders", 80));
    mesh.write("orders-1.yaml", &workload("orders-1", "orders", "127.0.1.1", 8080));
    let cp = ControlPlane::start(&mesh).await;
    let client = Client::connect(&cp, "edit-test");
    // Services and endpoints arrive in separate responses: wait for both.
    let state = client
        .wait_for("orders on port 80 with its endpoint", |s| {
            port_of(s, "orders.default") == Some(80) && s.endpoints.items.contains_key("orders.default")
        })
        .await;
    let eps = &state.endpoints.items["orders.default"].endpoints;
    assert_eq!(eps.len(), 1);
    assert_eq!((eps[0].address.as_str(), eps[0].port), ("127.0.1.1", 8080));
    assert_eq!(eps[0].identity, "spiffe://cluster.local/ns/default/sa/orders");

    let written = Instant::now();
    mesh.write("orders.yaml", &service("orders", 81));
    client
        .wait_for_within("orders on port 81 within 1 s", Duration::from_secs(1), |s| {
            port_of(s, "orders.default") == Some(81)
        })
        .await;
    eprintln!("edit reached the client in {:?}", written.elapsed());

    // A new workload shows up as an endpoint; removing it removes the endpoint.
    mesh.write("orders-2.yaml", &workload("orders-2", "orders", "127.0.1.2", 8080));
    client
        .wait_for("two endpoints", |s| {
            s.endpoints
                .items
                .get("orders.default")
                .is_some_and(|e| e.endpoints.len() == 2)
        })
        .await;
    mesh.remove("orders.yaml");
    client
        .wait_for("orders removed", |s| {
            s.service("orders.default").is_none() && !s.endpoints.items.contains_key("orders.default")
        })
        .await;
}

#[tokio::test]
async fn an_invalid_document_is_reported_and_the_last_good_state_stays() {
    let mesh = MeshDir::new();
    mesh.write("orders.yaml", &service("orders", 80));
    let cp = ControlPlane::start(&mesh).await;
    let client = Client::connect(&cp, "invalid-test");
    let good = client
        .wait_for("orders", |s| port_of(s, "orders.default") == Some(80))
        .await;
    let good_version = good.services.version_info.clone();

    // Line 10 is `    port: eighty`.
    mesh.write(
        "orders.yaml",
        &service("orders", 80).replace("port: 80", "port: eighty"),
    );
    let line = cp
        .logs
        .wait_for(&["orders.yaml:10:", "spec.ports[0].port", "invalid type"])
        .await;
    assert!(line.contains("last good version stays in force"), "{line}");
    let status = wait_until("the error on /config", || async {
        let s = cp.config_status().await;
        (!s["errors"].as_array()?.is_empty()).then_some(s)
    })
    .await;
    let error = status["errors"][0].as_str().unwrap();
    assert!(
        error.contains("orders.yaml:10: Service is invalid: spec.ports[0].port"),
        "{error}"
    );
    assert!(
        cp.admin_get("/metrics")
            .await
            .contains("wary_control_plane_config_errors 1")
    );

    // A valid edit elsewhere still flows while the broken file keeps its last good state.
    mesh.write("billing.yaml", &service("billing", 90));
    let state = client
        .wait_for("billing", |s| s.service("billing.default").is_some())
        .await;
    assert_eq!(
        port_of(&state, "orders.default"),
        Some(80),
        "the broken file's last good state stays"
    );
    assert_ne!(state.services.version_info, good_version);

    // A cross-document conflict keeps the whole previous state.
    let before = state.services.version_info.clone();
    mesh.write("billing-copy.yaml", &service("billing", 91));
    cp.logs
        .wait_for(&["Service default/billing is already declared at", "billing"])
        .await;

    // Fixing both recovers.
    mesh.remove("billing-copy.yaml");
    mesh.write("orders.yaml", &service("orders", 82));
    let state = client
        .wait_for("orders fixed", |s| port_of(s, "orders.default") == Some(82))
        .await;
    assert_eq!(port_of(&state, "billing.default"), Some(90));
    assert_ne!(state.services.version_info, before);
    wait_until("no errors on /config", || async {
        let s = cp.config_status().await;
        s["errors"].as_array()?.is_empty().then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_nack_is_recorded_and_later_updates_still_flow() {
    let mesh = MeshDir::new();
    mesh.write("orders.yaml", &service("orders", 80));
    let cp = ControlPlane::start(&mesh).await;
    // This client refuses any service named `legacy`, as a proxy refuses what it
    // cannot use.
    let refuse = Arc::new(|type_url: &str, r: &wary_proto::discovery::Resource| {
        if type_url == Service::TYPE_URL && r.name == "legacy.default" {
            Err("legacy services are not supported by this proxy".to_string())
        } else {
            Ok(())
        }
    });
    let client = Client::connect_with(&cp, "nack-test", Some(refuse));
    let first = client
        .wait_for("orders", |s| s.service("orders.default").is_some())
        .await;

    mesh.write("legacy.yaml", &service("legacy", 70));
    let line = cp.logs.wait_for(&["proxy NACKed an update", "nack-test"]).await;
    assert!(
        line.contains("legacy services are not supported by this proxy"),
        "{line}"
    );
    assert!(
        line.contains(&format!("kept_version=\"{}\"", first.services.version_info)),
        "{line}"
    );
    let proxies = wait_until("the NACK on /proxies", || async {
        let p: serde_json::Value = serde_json::from_str(&cp.admin_get("/proxies").await).ok()?;
        let nack = p[0]["types"]["service"]["last_nack"].clone();
        (!nack.is_null()).then_some(p)
    })
    .await;
    let nack = &proxies[0]["types"]["service"]["last_nack"];
    assert_eq!(proxies[0]["id"], "nack-test");
    assert_eq!(nack["rejected_resources"][0], "legacy.default");
    assert!(
        nack["reason"]
            .as_str()
            .unwrap()
            .contains("legacy services are not supported")
    );
    assert!(
        cp.admin_get("/metrics")
            .await
            .contains("wary_control_plane_discovery_nacks_total{type=\"service\"} 1")
    );
    assert!(
        client.cache.load().service("legacy.default").is_none(),
        "a NACKed resource is not applied"
    );

    // Later valid updates keep coming.
    mesh.write("billing.yaml", &service("billing", 90));
    mesh.write("orders.yaml", &service("orders", 81));
    client
        .wait_for("billing and the new orders", |s| {
            s.service("billing.default").is_some() && port_of(s, "orders.default") == Some(81)
        })
        .await;
}

#[tokio::test]
async fn a_proxy_rides_out_a_control_plane_restart() {
    let mesh = MeshDir::new();
    mesh.write("orders.yaml", &service("orders", 80));
    mesh.write("audit.yaml", &service("audit", 81));
    mesh.write("billing.yaml", &service("billing", 82));
    mesh.write("orders-1.yaml", &workload("orders-1", "orders", "127.0.1.1", 8080));
    let cp = ControlPlane::start(&mesh).await;
    let discovery = cp.discovery;
    let proxy = Proxy::start(&cp, "orders-1").await;
    let client = Client::connect(&cp, "restart-test");
    proxy
        .wait_for_dump("three services, their endpoints and the inbound policy", |d| {
            d["services"].as_array().is_some_and(|s| s.len() == 3)
                && d["endpoints"].as_array().is_some_and(|e| e.len() == 3)
                && d["inbound_policies"][0]["name"] == "orders-1.default"
        })
        .await;
    client
        .wait_for("three services and their endpoints", |s| {
            s.services.items.len() == 3 && s.endpoints.items.len() == 3
        })
        .await;
    assert_eq!(proxy.admin_get("/ready").await, "ok\n");

    cp.kill().await;
    proxy
        .logs
        .wait_for(&["discovery unavailable; serving the last good configuration"])
        .await;
    // While the control plane is away the proxy still serves its last good state.
    let dump = proxy.config_dump().await;
    assert_eq!(dump["services"].as_array().unwrap().len(), 3);
    let orders = dump["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["service"] == "orders.default")
        .cloned();
    assert_eq!(orders.unwrap()["endpoints"][0]["address"], "127.0.1.1:8080");
    assert_eq!(proxy.admin_get("/ready").await, "ok\n");
    assert!(
        proxy
            .admin_get("/metrics")
            .await
            .contains("wary_proxy_discovery_connected 0")
    );
    assert_eq!(client.cache.load().services.items.len(), 3);

    // The configuration changes while the control plane is down: one service changes,
    // one goes, one comes, one stays as it was.
    mesh.write("orders.yaml", &service("orders", 90));
    mesh.remove("audit.yaml");
    mesh.write("shipping.yaml", &service("shipping", 83));
    let cp = ControlPlane::start_at(&mesh, discovery).await;
    let back = Instant::now();
    let bound = wary_proxy::discovery::Backoff::default().max;
    let converged = |s: &wary_proxy::state::DiscoveryState| {
        port_of(s, "orders.default") == Some(90)
            && s.service("audit.default").is_none()
            && s.service("shipping.default").is_some()
            && port_of(s, "billing.default") == Some(82)
    };
    client.wait_for("the client converges", converged).await;
    proxy
        .wait_for_dump("the proxy converges", |d| {
            let names: Vec<_> = d["services"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["name"].clone())
                .collect();
            names == ["billing.default", "orders.default", "shipping.default"]
        })
        .await;
    let took = back.elapsed();
    eprintln!("converged {took:?} after the control plane came back (backoff bound {bound:?})");
    // The backoff bound plus generous room for process start-up on a busy machine.
    assert!(took < bound + DEADLINE / 2, "reconnected after {took:?}");
    assert!(
        proxy
            .admin_get("/metrics")
            .await
            .contains("wary_proxy_discovery_connected 1")
    );
    // Resumed, not restarted: the proxy sent the versions it held, so only the changed
    // and new services travelled, plus the removal; billing did not.
    let push = cp.logs.wait_for(&["kind=\"service\"", "changed=2", "removed=1"]).await;
    assert!(
        !cp.logs
            .all()
            .iter()
            .any(|l| l.contains("kind=\"service\"") && l.contains("changed=3")),
        "{push}"
    );
}

#[tokio::test]
async fn sigterm_stops_the_control_plane_with_proxies_connected() {
    let mesh = MeshDir::new();
    mesh.write("orders.yaml", &service("orders", 80));
    let cp = ControlPlane::start(&mesh).await;
    let client = Client::connect(&cp, "sigterm-test");
    client
        .wait_for("orders", |s| s.service("orders.default").is_some())
        .await;
    let logs = cp.logs.clone();
    let status = cp.terminate().await;
    assert!(status.success(), "{status}");
    logs.wait_for(&["control plane stopped"]).await;
}

#[tokio::test]
async fn a_broken_file_at_start_up_holds_discovery_until_it_is_fixed() {
    let mesh = MeshDir::new();
    mesh.write("billing.yaml", &service("billing", 90));
    mesh.write("web-1.yaml", &workload("web-1", "web", "127.0.1.5", 8080));
    mesh.write("orders.yaml", &service("orders", 80).replace("port: 80", "port: -1"));
    let cp = ControlPlane::start(&mesh).await;
    cp.logs.wait_for(&["orders.yaml:10:", "spec.ports[0].port"]).await;
    let ready = cp.admin_get("/ready").await;
    assert!(
        ready.starts_with("HTTP 503") && ready.contains("orders.yaml:10"),
        "{ready}"
    );
    let proxy = Proxy::start(&cp, "web-1").await;
    proxy
        .logs
        .wait_for(&["configuration has errors", "serves nothing until"])
        .await;
    let not_ready = proxy.admin_get("/ready").await;
    assert!(
        not_ready.contains("waiting for the first service update"),
        "{not_ready}"
    );

    mesh.write("orders.yaml", &service("orders", 80));
    proxy
        .wait_for_dump("both services", |d| {
            d["services"].as_array().is_some_and(|s| s.len() == 2)
        })
        .await;
    assert_eq!(cp.admin_get("/ready").await, "ok\n");
}

/// Opens a raw stream subscribed to every Service, with `held` as the versions held.
async fn raw_stream(
    cp: &ControlPlane,
    held: std::collections::BTreeMap<String, String>,
) -> (mpsc::Sender<DiscoveryRequest>, tonic::Streaming<DiscoveryResponse>) {
    let mut grpc = DiscoveryClient::new(cp.channel(&cp.mesh_credentials("discovery-test")).await);
    let (tx, rx) = mpsc::channel(4);
    tx.send(DiscoveryRequest {
        node: Some(Node {
            id: "wire-test".into(),
            ..Default::default()
        }),
        type_url: Service::TYPE_URL.into(),
        resource_names_subscribe: vec![WILDCARD.into()],
        initial_resource_versions: held,
        ..Default::default()
    })
    .await
    .unwrap();
    let responses = grpc
        .stream(ReceiverStream::new(rx))
        .await
        .expect("open stream")
        .into_inner();
    (tx, responses)
}

async fn next(responses: &mut tonic::Streaming<DiscoveryResponse>) -> DiscoveryResponse {
    tokio::time::timeout(DEADLINE, responses.message())
        .await
        .expect("a response in time")
        .expect("stream ok")
        .expect("stream open")
}

#[tokio::test]
async fn changing_one_of_a_hundred_services_sends_one_resource() {
    let mesh = MeshDir::new();
    for i in 0..100 {
        mesh.write(&format!("svc-{i}.yaml"), &service(&format!("svc-{i}"), 8000 + i));
    }
    let cp = ControlPlane::start(&mesh).await;
    let (tx, mut responses) = raw_stream(&cp, Default::default()).await;

    let full = next(&mut responses).await;
    assert_eq!(full.resources.len(), 100, "the first response is the full state");
    tx.send(DiscoveryRequest {
        type_url: Service::TYPE_URL.into(),
        response_nonce: full.nonce.clone(),
        version_info: full.version_info.clone(),
        ..Default::default()
    })
    .await
    .unwrap();

    mesh.write("svc-42.yaml", &service("svc-42", 9042));
    let delta = next(&mut responses).await;
    let names: Vec<_> = delta.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["svc-42.default"], "only the changed service travels");
    assert!(delta.removed_resources.is_empty());
    assert_ne!(delta.nonce, full.nonce);
    assert_ne!(delta.version_info, full.version_info);
    let svc = Service::from_any(delta.resources[0].resource.as_ref().unwrap()).unwrap();
    assert_eq!(svc.ports[0].port, 9042);

    mesh.remove("svc-7.yaml");
    let removal = next(&mut responses).await;
    assert!(removal.resources.is_empty());
    assert_eq!(removal.removed_resources, ["svc-7.default"]);

    // A stream that resumes with every version it holds gets nothing but the sync.
    let mut held: std::collections::BTreeMap<String, String> = full
        .resources
        .iter()
        .map(|r| (r.name.clone(), r.version.clone()))
        .collect();
    held.insert("svc-42.default".into(), delta.resources[0].version.clone());
    held.remove("svc-7.default");
    let (_tx, mut resumed) = raw_stream(&cp, held).await;
    let sync = next(&mut resumed).await;
    assert!(
        sync.resources.is_empty() && sync.removed_resources.is_empty(),
        "{sync:?}"
    );
    assert_eq!(sync.version_info, removal.version_info);
}

#[tokio::test]
async fn a_stream_without_a_node_id_is_refused_with_a_reason() {
    let mesh = MeshDir::new();
    let cp = ControlPlane::start(&mesh).await;
    let mut grpc = DiscoveryClient::new(cp.channel(&cp.mesh_credentials("discovery-test")).await);
    let (tx, rx) = mpsc::channel(1);
    tx.send(DiscoveryRequest {
        type_url: Service::TYPE_URL.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut responses = grpc.stream(ReceiverStream::new(rx)).await.unwrap().into_inner();
    let status = tokio::time::timeout(DEADLINE, responses.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("node.id"), "{status}");
}

/// Sends a request on a raw stream.
async fn send(tx: &mpsc::Sender<DiscoveryRequest>, req: DiscoveryRequest) {
    tx.send(req).await.expect("stream open");
}

#[tokio::test]
async fn the_protocol_handles_stale_nacks_late_names_and_unsubscribe() {
    let mesh = MeshDir::new();
    mesh.write("orders.yaml", &service("orders", 80));
    let cp = ControlPlane::start(&mesh).await;
    let mut grpc = DiscoveryClient::new(cp.channel(&cp.mesh_credentials("discovery-test")).await);
    let (tx, rx) = mpsc::channel(8);
    // Subscribe by name to a service that does not exist yet.
    send(
        &tx,
        DiscoveryRequest {
            node: Some(Node {
                id: "protocol-test".into(),
                ..Default::default()
            }),
            type_url: Service::TYPE_URL.into(),
            resource_names_subscribe: vec!["billing.default".into()],
            ..Default::default()
        },
    )
    .await;
    let mut responses = grpc.stream(ReceiverStream::new(rx)).await.unwrap().into_inner();
    let first = next(&mut responses).await;
    assert!(first.resources.is_empty(), "only what was named: {first:?}");

    mesh.write("billing.yaml", &service("billing", 90));
    let r1 = next(&mut responses).await;
    assert_eq!(
        r1.resources.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
        ["billing.default"]
    );
    // A second change arrives before the proxy answered the first...
    mesh.write("billing.yaml", &service("billing", 91));
    let r2 = next(&mut responses).await;
    assert_ne!(r1.nonce, r2.nonce);
    // ...and the proxy NACKs the first one late: still recorded.
    send(
        &tx,
        DiscoveryRequest {
            type_url: Service::TYPE_URL.into(),
            response_nonce: r1.nonce.clone(),
            version_info: first.version_info.clone(),
            error_detail: Some(wary_proto::discovery::ErrorDetail {
                code: 3,
                message: "billing is not welcome".into(),
                rejected_resources: vec!["billing.default".into()],
            }),
            ..Default::default()
        },
    )
    .await;
    cp.logs
        .wait_for(&["proxy NACKed an update", "billing is not welcome"])
        .await;
    let proxies: serde_json::Value = serde_json::from_str(&cp.admin_get("/proxies").await).unwrap();
    let services = &proxies[0]["types"]["service"];
    assert_eq!(services["nacks"], 1);
    assert!(services["rejected"]["billing.default"].is_string(), "{services}");

    // Unsubscribing stops updates for that name; the orders change is not sent either.
    send(
        &tx,
        DiscoveryRequest {
            type_url: Service::TYPE_URL.into(),
            response_nonce: r2.nonce.clone(),
            version_info: r2.version_info.clone(),
            resource_names_unsubscribe: vec!["billing.default".into()],
            ..Default::default()
        },
    )
    .await;
    let reloads = cp.config_status().await["reloads"].as_u64().unwrap();
    mesh.write("billing.yaml", &service("billing", 92));
    mesh.write("orders.yaml", &service("orders", 81));
    wait_until("the control plane read both changes", || async {
        let s = cp.config_status().await;
        (s["reloads"].as_u64()? > reloads && s["counts"].as_str()?.contains("service=2")).then_some(())
    })
    .await;
    // Subscribing to the wildcard now brings everything the stream lacks, in one go.
    send(
        &tx,
        DiscoveryRequest {
            type_url: Service::TYPE_URL.into(),
            resource_names_subscribe: vec![WILDCARD.into()],
            ..Default::default()
        },
    )
    .await;
    let all = next(&mut responses).await;
    let mut names: Vec<_> = all.resources.iter().map(|r| r.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["billing.default", "orders.default"], "{all:?}");
}

#[tokio::test]
async fn an_unknown_type_is_refused_with_the_known_ones() {
    let mesh = MeshDir::new();
    let cp = ControlPlane::start(&mesh).await;
    let mut grpc = DiscoveryClient::new(cp.channel(&cp.mesh_credentials("discovery-test")).await);
    let (tx, rx) = mpsc::channel(1);
    send(
        &tx,
        DiscoveryRequest {
            node: Some(Node {
                id: "type-test".into(),
                ..Default::default()
            }),
            type_url: "type.googleapis.com/envoy.config.cluster.v3.Cluster".into(),
            resource_names_subscribe: vec![WILDCARD.into()],
            ..Default::default()
        },
    )
    .await;
    let mut responses = grpc.stream(ReceiverStream::new(rx)).await.unwrap().into_inner();
    let status = tokio::time::timeout(DEADLINE, responses.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("wary.discovery.v1.Service"), "{status}");
}

/// The first response (or the refusal) on a stream opened with `creds` and `first`.
async fn open_with(
    cp: &ControlPlane,
    creds: &Arc<wary_certs::credentials::Credentials>,
    first: DiscoveryRequest,
) -> Result<DiscoveryResponse, tonic::Status> {
    let mut grpc = DiscoveryClient::new(cp.channel(creds).await);
    let (tx, rx) = mpsc::channel(1);
    send(&tx, first).await;
    let mut responses = grpc.stream(ReceiverStream::new(rx)).await?.into_inner();
    let first = tokio::time::timeout(DEADLINE, responses.message())
        .await
        .expect("an answer in time")?;
    drop(tx);
    Ok(first.expect("stream open"))
}

fn policies(names: &[&str], namespace: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        node: Some(Node {
            id: "auth-test".into(),
            namespace: namespace.into(),
            ..Default::default()
        }),
        type_url: wary_proto::discovery::InboundPolicy::TYPE_URL.into(),
        resource_names_subscribe: names.iter().map(|n| n.to_string()).collect(),
        ..Default::default()
    }
}

#[tokio::test]
async fn discovery_needs_the_mesh_certificate_and_serves_only_ones_own_policy() {
    let mesh = MeshDir::new();
    mesh.write("web.yaml", &workload("web-1", "web", "127.0.2.31", 8080));
    mesh.write("backend.yaml", &workload("backend-1", "backend", "127.0.2.32", 8080));
    let cp = ControlPlane::start(&mesh).await;

    // TLS that verifies the control plane, but no client certificate.
    let refused = open_with(&cp, &cp.bootstrap_credentials(), policies(&["web-1.default"], ""))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused}");
    assert!(
        refused.message().contains("discovery requires the mesh certificate"),
        "{refused}"
    );

    // web's certificate reads web's policy...
    let web = cp.mesh_credentials("web");
    let own = open_with(&cp, &web, policies(&["web-1.default"], "")).await.unwrap();
    let names: Vec<_> = own.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["web-1.default"]);

    // ...and not backend's, by name or by wildcard.
    for names in [
        &["backend-1.default"][..],
        &["web-1.default", "backend-1.default"],
        &["*"],
    ] {
        let denied = open_with(&cp, &web, policies(names, "")).await.unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{names:?}: {denied}");
        assert!(denied.message().contains("reads only its own workload's"), "{denied}");
    }
    // A policy that does not exist yet may be subscribed to, but arrives only for the
    // identity its workload runs as.
    let pending = open_with(&cp, &web, policies(&["late-1.default"], "")).await.unwrap();
    assert!(pending.resources.is_empty(), "{pending:?}");

    // A node in another namespace than the certificate's.
    let denied = open_with(&cp, &web, policies(&["web-1.default"], "payments"))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied}");
    assert!(
        denied.message().contains("not the namespace of this proxy's identity"),
        "{denied}"
    );

    let metrics = cp.admin_get("/metrics").await;
    for reason in ["unauthenticated", "permission_denied"] {
        let series = format!("wary_control_plane_discovery_streams_refused_total{{reason=\"{reason}\"}}");
        assert!(metrics.contains(&series), "{series} in {metrics}");
    }
}
