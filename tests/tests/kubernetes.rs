//! Kubernetes, without a cluster: the Helm chart rendered and linted with the real Helm
//! library, every manifest validated against the Kubernetes schemas, and the admission
//! webhook answering real AdmissionReview requests over TLS.

use std::path::Path;
use std::process::Stdio;

use base64::Engine as _;
use serde_json::Value;
use wary_tests::kube_api::FakeApi;
use wary_tests::{ControlPlane, MeshDir, binary, check_chart};

/// A TLS certificate for `localhost` and 127.0.0.1, as the chart issues one for the
/// webhook's Service name: (certificate, key) PEM files in `dir`.
fn webhook_certificate(dir: &Path) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params
        .subject_alt_names
        .push(rcgen::SanType::IpAddress([127, 0, 0, 1].into()));
    let cert = params.self_signed(&key).unwrap();
    let (c, k) = (dir.join("webhook.crt"), dir.join("webhook.key"));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c.to_str().unwrap().to_string(), k.to_str().unwrap().to_string())
}

/// POSTs `review` to the webhook with curl (verifying its certificate); the response
/// review.
async fn post_review(url: &str, ca: &str, review: &Value) -> Value {
    let mut curl = tokio::process::Command::new("curl")
        .args(["-sS", "--fail-with-body", "--max-time", "10", "--cacert", ca])
        .args(["-H", "Content-Type: application/json", "--data-binary", "@-", url])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run curl");
    use tokio::io::AsyncWriteExt;
    let mut stdin = curl.stdin.take().unwrap();
    stdin.write_all(&serde_json::to_vec(review).unwrap()).await.unwrap();
    drop(stdin);
    let out = curl.wait_with_output().await.unwrap();
    assert!(
        out.status.success(),
        "curl {url}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the webhook answers JSON")
}

/// The response's JSON Patch, decoded; `None` when it carries none.
fn patch_of(response: &Value) -> Option<json_patch::Patch> {
    let encoded = response["response"]["patch"].as_str()?;
    assert_eq!(response["response"]["patchType"], "JSONPatch");
    let bytes = base64::engine::general_purpose::STANDARD.decode(encoded).unwrap();
    Some(serde_json::from_slice(&bytes).expect("a JSON Patch"))
}

fn fixture(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/admission")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn names(containers: &Value) -> Vec<&str> {
    containers
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| c["name"].as_str().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_injects_labelled_pods_once_and_leaves_others_alone() {
    let mesh = MeshDir::new();
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = webhook_certificate(certs.path());
    let cp = ControlPlane::start_with_args(
        &mesh,
        "127.0.0.1:0".parse().unwrap(),
        "info",
        &[
            "--webhook-addr",
            "127.0.0.1:0",
            "--webhook-cert",
            &cert,
            "--webhook-key",
            &key,
            "--proxy-image",
            "registry.example/wary-proxy:test",
        ],
    )
    .await;
    let url = format!("https://localhost:{}/inject", cp.webhook.expect("webhook=").port());

    // A labelled pod: admitted with a patch that yields the injected pod.
    let review = fixture("pod-labelled.json");
    let answer = post_review(&url, &cert, &review).await;
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    assert_eq!(answer["response"]["uid"], review["request"]["uid"]);
    assert_eq!(answer["response"]["allowed"], true);
    let patch = patch_of(&answer).unwrap_or_else(|| panic!("a labelled pod gets a patch: {answer}"));
    let mut pod = review["request"]["object"].clone();
    json_patch::patch(&mut pod, &patch).expect("the patch applies to the pod sent");

    let spec = &pod["spec"];
    assert_eq!(names(&spec["initContainers"]), ["wary-init", "wary-proxy", "migrate"]);
    assert_eq!(names(&spec["containers"]), ["orders"]);
    // The kubelet's probes move to the proxy's admin port, which makes them to the app.
    let app = &spec["containers"][0];
    assert_eq!(app["readinessProbe"]["httpGet"]["path"], "/app-health/orders/readiness");
    assert_eq!(app["readinessProbe"]["httpGet"]["port"], 4191);
    assert_eq!(app["readinessProbe"]["periodSeconds"], 5, "the probe's timing is kept");
    assert_eq!(app["livenessProbe"]["httpGet"]["path"], "/app-health/orders/liveness");
    assert!(app["livenessProbe"].get("tcpSocket").is_none(), "{app}");
    let (init, proxy) = (&spec["initContainers"][0], &spec["initContainers"][1]);
    assert_eq!(
        init["args"],
        serde_json::json!(["init", "--proxy-uid", "2102", "--skip-outbound-ports", "5432"])
    );
    assert_eq!(
        init["securityContext"]["capabilities"]["add"],
        serde_json::json!(["NET_ADMIN", "NET_RAW"])
    );
    assert_eq!(proxy["restartPolicy"], "Always", "a native sidecar");
    assert_eq!(proxy["image"], "registry.example/wary-proxy:test");
    assert_eq!(proxy["securityContext"]["runAsUser"], 2102);
    assert_eq!(proxy["startupProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(proxy["livenessProbe"]["httpGet"]["port"], 4191);
    let env: std::collections::BTreeMap<&str, &Value> = proxy["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap(), e))
        .collect();
    assert_eq!(env["WARY_OPAQUE_PORTS"]["value"], "6379");
    let probes: Value = serde_json::from_str(env["WARY_APP_PROBES"]["value"].as_str().unwrap()).unwrap();
    assert_eq!(
        probes,
        serde_json::json!({
            "/app-health/orders/readiness": {"http": {"port": 8080, "path": "/healthz", "headers": []}},
            "/app-health/orders/liveness": {"tcp": {"port": 8080}},
        })
    );
    assert_eq!(env["WARY_INBOUND_ADDR"]["value"], "$(POD_IP):4143");
    assert_eq!(
        env["WARY_WORKLOAD"]["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.name"
    );
    let bundle = std::fs::read_to_string(&cp.trust_anchors).unwrap();
    assert_eq!(env["WARY_TRUST_ANCHORS_PEM"]["value"], bundle.as_str());
    assert_eq!(
        env["WARY_SERVICE_ACCOUNT_TOKEN_FILE"]["value"],
        "/var/run/secrets/wary.io/serviceaccount/token"
    );
    let token = spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "wary-identity-token")
        .expect("the projected token volume");
    assert_eq!(
        token["projected"]["sources"][0]["serviceAccountToken"]["audience"],
        "wary.io"
    );
    let annotations = &pod["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], "4191");
    assert_eq!(
        annotations["config.wary.io/skip-outbound-ports"], "5432",
        "the pod's own stay"
    );

    // The patched pod validates against the Kubernetes schemas (1.29 and the newest).
    let dir = tempfile::tempdir().unwrap();
    let patched = dir.path().join("patched-pod.yaml");
    std::fs::write(&patched, serde_yaml::to_string(&pod).unwrap()).unwrap();
    eprintln!("{}", check_chart(&[&patched]));

    // What cannot be done as asked is said, and kubectl shows it: a gRPC probe stays
    // where strict mTLS refuses it, and a misspelt annotation does nothing.
    let mut warned = review.clone();
    warned["request"]["object"]["spec"]["containers"][0]["startupProbe"] = serde_json::json!({"grpc": {"port": 9000}});
    warned["request"]["object"]["metadata"]["annotations"]["config.wary.io/skip-outbond-ports"] = "5432".into();
    let answer = post_review(&url, &cert, &warned).await;
    assert_eq!(answer["response"]["allowed"], true);
    let warnings = answer["response"]["warnings"].to_string();
    assert!(
        warnings.contains("container orders: its startup probe (gRPC) is not moved"),
        "{warnings}"
    );
    assert!(
        warnings.contains("annotation config.wary.io/skip-outbond-ports is not one Wary reads"),
        "{warnings}"
    );

    // A second pass (the API server may call again) changes nothing.
    let mut again = review.clone();
    again["request"]["object"] = pod.clone();
    let answer = post_review(&url, &cert, &again).await;
    assert_eq!(answer["response"]["allowed"], true);
    assert!(patch_of(&answer).is_none(), "a second pass patched: {answer}");

    // A pod without the label is admitted untouched.
    let answer = post_review(&url, &cert, &fixture("pod-unlabelled.json")).await;
    assert_eq!(answer["response"]["allowed"], true);
    assert!(patch_of(&answer).is_none(), "an unlabelled pod was patched: {answer}");

    // A malformed annotation is refused with a message that names it.
    let mut bad = review.clone();
    bad["request"]["object"]["metadata"]["annotations"]["config.wary.io/opaque-ports"] = "redis".into();
    let answer = post_review(&url, &cert, &bad).await;
    assert_eq!(answer["response"]["allowed"], false);
    let message = answer["response"]["status"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("config.wary.io/opaque-ports: \"redis\" is not a port"),
        "{answer}"
    );

    // Anything but an AdmissionReview is a 400 that says so, and the webhook serves on.
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert", &cert, "-w", "%{http_code}"])
        .args(["--data-binary", "{\"kind\": 1}", &url])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.ends_with("400") && text.contains("not an AdmissionReview"),
        "{text}"
    );
    let metrics = cp.admin_get("/metrics").await;
    for outcome in ["injected", "skipped", "refused"] {
        assert!(
            metrics.contains(&format!("wary_control_plane_injections_total{{outcome=\"{outcome}\"}}")),
            "{metrics}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_and_injected_manifests_validate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let cp = binary("wary-control-plane");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(&cp).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    run(&["ca", "init", "--ca-dir", ca.to_str().unwrap()]);
    let anchors = dir.path().join("anchors.pem");
    std::fs::write(&anchors, run(&["ca", "bundle", "--ca-dir", ca.to_str().unwrap()])).unwrap();

    let manifest = dir.path().join("app.yaml");
    std::fs::write(
        &manifest,
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {name: orders, namespace: shop}
spec:
  selector: {matchLabels: {app: orders}}
  template:
    metadata:
      labels: {app: orders}
      annotations: {config.wary.io/skip-inbound-ports: "22"}
    spec:
      containers: [{name: orders, image: registry.example/orders:1, ports: [{containerPort: 8080}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: debug, namespace: shop}
spec:
  containers: [{name: shell, image: busybox}]
"#,
    )
    .unwrap();
    let mut outputs = Vec::new();
    for native in ["true", "false"] {
        let out = std::process::Command::new(binary("wary"))
            .args(["inject", "--native-sidecars", native, "--trust-anchors"])
            .arg(&anchors)
            .arg(&manifest)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout).unwrap();
        assert_eq!(text.matches("name: wary-proxy").count(), 2, "{text}");
        let path = dir.path().join(format!("injected-native-{native}.yaml"));
        std::fs::write(&path, text).unwrap();
        outputs.push(path);
    }
    // The CA's key is never taken for the trust bundle that goes into every pod spec.
    let out = std::process::Command::new(binary("wary"))
        .args(["inject", "--trust-anchors"])
        .arg(ca.join("issuer-key.pem"))
        .arg(&manifest)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("holds a private key"), "{err}");
    let report = check_chart(&outputs.iter().map(|p| p.as_path()).collect::<Vec<_>>());
    eprintln!("{report}");
    assert!(report.contains("chart lints clean"), "{report}");
}

/// The recorded cluster: `kubectl get -o json` of each object.
fn cluster() -> Vec<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/kubernetes/cluster.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn object<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the recording"))
}

/// The documents a directory holds for the same topology, in the shape users write.
fn local_topology(web: &[(&str, &str, &str, bool)], client: bool, attempts: u32, authz: bool) -> String {
    let mut out = String::from(
        "apiVersion: local.wary.io/v1alpha1\nkind: Service\nmetadata: {name: web, namespace: shop, labels: {app: web}}\n\
         spec:\n  selector: {app: web}\n  ports: [{name: http, port: 80, targetPort: 8080, appProtocol: http}]\n  clusterIPs: [10.96.0.10]\n",
    );
    for (name, ip, zone, ready) in web {
        out += &format!(
            "---\napiVersion: local.wary.io/v1alpha1\nkind: Workload\n\
             metadata: {{name: {name}, namespace: shop, labels: {{app: web, pod-template-hash: 6b7f9c}}}}\n\
             spec: {{serviceAccount: web, address: {ip}, zone: {zone}, ready: {ready}, ports: [{{name: http, port: 8080, appProtocol: http}}]}}\n"
        );
    }
    if client {
        out += "---\napiVersion: local.wary.io/v1alpha1\nkind: Workload\nmetadata: {name: client-1, namespace: shop, labels: {app: client}}\n\
                spec: {serviceAccount: client, address: 10.244.1.20}\n";
    }
    out += &format!(
        "---\napiVersion: policy.wary.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: web, namespace: shop}}\n\
         spec: {{targetRef: {{kind: Service, name: web}}, timeouts: {{perTry: 500ms}}, retries: {{attempts: {attempts}}}}}\n"
    );
    if authz {
        out += "---\napiVersion: policy.wary.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: web-from-client, namespace: shop}\n\
                spec:\n  targetRef: {kind: Service, name: web}\n  action: ALLOW\n  rules:\n  - from:\n    - source:\n        principals: [\"spiffe://cluster.local/ns/shop/sa/client\"]\n";
    }
    out += "---\napiVersion: policy.wary.io/v1alpha1\nkind: MeshConfig\nmetadata: {name: mesh}\n\
            spec: {trustDomain: cluster.local, mtls: {mode: strict}, defaultInboundPolicy: all-authenticated}\n";
    out
}

/// Waits until both control planes serve the same resources (their content-hash
/// versions agree); fails with both `/config` pages if they never do.
async fn same_resources(cluster: &ControlPlane, dir: &ControlPlane, what: &str) {
    let agreed = tokio::time::timeout(wary_tests::DEADLINE, async {
        loop {
            let (a, b) = (cluster.config_status().await, dir.config_status().await);
            if a["versions"] == b["versions"] && b["errors"].as_array().is_some_and(Vec::is_empty) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    if agreed.is_err() {
        panic!(
            "{what}: the cluster's resources never matched the directory's\ncluster: {}\ndirectory: {}",
            cluster.config_status().await,
            dir.config_status().await
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watchers_compute_what_the_directory_does_through_changes_deletes_and_a_relist() {
    let recorded = cluster();
    let api = FakeApi::start(&recorded).await;
    let cp = ControlPlane::start_kubernetes(api.kubeconfig()).await;
    let mesh = MeshDir::new();
    let web = |n: &str, ip: &'static str, zone: &'static str, ready: bool| (n.to_string(), ip, zone, ready);
    let write = |w: &[(String, &str, &str, bool)], client: bool, attempts: u32, authz: bool| {
        let w: Vec<(&str, &str, &str, bool)> = w.iter().map(|(n, i, z, r)| (n.as_str(), *i, *z, *r)).collect();
        mesh.write("mesh.yaml", &local_topology(&w, client, attempts, authz));
    };

    // The recording as it was listed: web-2 is not ready (its slice says so), the
    // finished pod and the Services without a selector are not meshed.
    write(
        &[
            web("web-1", "10.244.1.11", "zone-a", true),
            web("web-2", "10.244.2.12", "zone-b", false),
        ],
        true,
        2,
        true,
    );
    let dir = ControlPlane::start(&mesh).await;
    same_resources(&cp, &dir, "after the first list").await;

    // The mesh CA went into a Secret, and a second replica signs with the same CA.
    let secret = api.secret("wary-system", "wary-ca").expect("the CA Secret");
    assert!(secret["data"]["issuer-key.pem"].is_string(), "{secret}");
    // It looks before the first has created the Secret, creates a CA of its own, and
    // loses the create (409): it must use the winner's.
    api.miss_next_secret_get();
    let replica = ControlPlane::start_kubernetes(api.kubeconfig()).await;
    let creates = api
        .requests()
        .iter()
        .filter(|r| *r == "POST /api/v1/namespaces/wary-system/secrets")
        .count();
    assert_eq!(
        creates,
        2,
        "the replica tried to create the CA and lost: {:?}",
        api.requests()
    );
    assert_eq!(
        std::fs::read_to_string(&replica.trust_anchors).unwrap(),
        std::fs::read_to_string(&cp.trust_anchors).unwrap(),
        "every replica serves one trust bundle"
    );
    drop(replica);

    // A proxy proves itself with its pod's service-account token (TokenReview).
    let tokens = tempfile::tempdir().unwrap();
    let token = tokens.path().join("token");
    std::fs::write(&token, "token-client-1").unwrap();
    api.accept_token("token-client-1", "shop", "client", "client-1", &["wary.io"]);
    let env = [
        ("WARY_NAMESPACE", "shop"),
        ("WARY_SERVICE_ACCOUNT_TOKEN_FILE", token.to_str().unwrap()),
    ];
    let any = "127.0.0.1:0".parse().unwrap();
    let proxy = wary_tests::Proxy::start_with(&cp, "client-1", any, any, &env).await;
    proxy.wait_ready().await;
    assert_eq!(
        proxy.certificate().await["identity"],
        "spiffe://cluster.local/ns/shop/sa/client"
    );
    // A token of another service account naming this pod is refused.
    let stolen = tokens.path().join("stolen");
    std::fs::write(&stolen, "token-web-as-client").unwrap();
    api.accept_token("token-web-as-client", "shop", "web", "client-1", &["wary.io"]);
    let env = [
        ("WARY_NAMESPACE", "shop"),
        ("WARY_SERVICE_ACCOUNT_TOKEN_FILE", stolen.to_str().unwrap()),
    ];
    let _impostor = wary_tests::Proxy::start_with(&cp, "client-1", any, any, &env).await;
    wary_tests::wait_until("the impostor is refused", || async {
        cp.admin_get("/metrics")
            .await
            .contains("wary_control_plane_certificate_requests_total{result=\"denied\"}")
            .then_some(())
    })
    .await;
    assert!(requests_contain(
        &api,
        "POST /apis/authentication.k8s.io/v1/tokenreviews"
    ));

    // Watch events: web-2 turns ready, web-1 is deleted, web-3 is added, the
    // TrafficPolicy changes.
    let mut web2 = object(&recorded, "Pod", "web-2").clone();
    web2["status"]["conditions"][2]["status"] = "True".into();
    api.apply(web2);
    let pod1 = object(&recorded, "Pod", "web-1").clone();
    api.delete(&pod1);
    let mut web3 = object(&recorded, "Pod", "web-2").clone();
    web3["metadata"]["name"] = "web-3".into();
    web3["metadata"]["uid"] = "pod-web-3".into();
    web3["status"]["podIP"] = "10.244.2.13".into();
    web3["status"]["podIPs"] = serde_json::json!([{"ip": "10.244.2.13"}]);
    web3["status"]["conditions"][2]["status"] = "True".into();
    api.apply(web3);
    let mut slice = object(&recorded, "EndpointSlice", "web-x7k2p").clone();
    let mut e3 = slice["endpoints"][1].clone();
    e3["addresses"] = serde_json::json!(["10.244.2.13"]);
    e3["conditions"]["ready"] = true.into();
    e3["targetRef"]["name"] = "web-3".into();
    e3["targetRef"]["uid"] = "pod-web-3".into();
    slice["endpoints"][1]["conditions"]["ready"] = true.into();
    slice["endpoints"] = serde_json::json!([slice["endpoints"][1].clone(), e3]);
    api.apply(slice);
    let mut tp = object(&recorded, "TrafficPolicy", "web").clone();
    tp["spec"]["retries"]["attempts"] = 3.into();
    api.apply(tp.clone());
    let after_events = [
        web("web-2", "10.244.2.12", "zone-b", true),
        web("web-3", "10.244.2.13", "zone-b", true),
    ];
    reread(&dir, || write(&after_events, true, 3, true)).await;
    same_resources(&cp, &dir, "after watch events").await;

    // A second TrafficPolicy for the same Service conflicts: it is left out and
    // reported, and the rest of the cluster is still served as before.
    let mut dup = tp.clone();
    dup["metadata"]["name"] = "web-dup".into();
    dup["metadata"]["uid"] = "tp-web-dup".into();
    api.apply(dup.clone());
    reported(&cp, "kubernetes:TrafficPolicy/shop/web-dup", "left out").await;
    same_resources(&cp, &dir, "with a conflicting TrafficPolicy").await;
    api.delete(&dup);

    // An invalid change keeps the last good version in force, and says why.
    let mut bad = tp.clone();
    bad["spec"]["retries"]["attempts"] = 0.into();
    api.apply(bad);
    reported(&cp, "kubernetes:TrafficPolicy/shop/web: spec.retries.attempts", "").await;
    same_resources(&cp, &dir, "with an invalid TrafficPolicy").await;
    api.apply(tp);

    // Changes the watches never saw (deleted while they were down), found by a relist.
    api.delete_quietly(object(&recorded, "AuthorizationPolicy", "web-from-client"));
    api.delete_quietly(object(&recorded, "Pod", "client-1"));
    api.expire_watches();
    reread(&dir, || write(&after_events, false, 3, false)).await;
    same_resources(&cp, &dir, "after a relist").await;
    let status = cp.config_status().await;
    assert!(status["errors"].as_array().is_some_and(Vec::is_empty), "{status}");
}

/// Runs `write` (a change to the directory) and waits until the directory's control
/// plane has read it, so a comparison that follows is not made against the old state.
async fn reread(dir: &ControlPlane, write: impl FnOnce()) {
    let before = dir.config_status().await["versions"].clone();
    write();
    wary_tests::wait_until("the directory is re-read", || async {
        (dir.config_status().await["versions"] != before).then_some(())
    })
    .await;
}

/// Waits until `/config` reports an error that starts with `starts` and contains
/// `contains`.
async fn reported(cp: &ControlPlane, starts: &str, contains: &str) {
    wary_tests::wait_until(&format!("{starts} is reported"), || async {
        let status = cp.config_status().await;
        status["errors"]
            .as_array()?
            .iter()
            .any(|e| {
                e.as_str()
                    .is_some_and(|e| e.starts_with(starts) && e.contains(contains))
            })
            .then_some(())
    })
    .await;
}

fn requests_contain(api: &FakeApi, what: &str) -> bool {
    api.requests().iter().any(|r| r == what)
}
