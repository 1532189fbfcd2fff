//! Wary against a real Kubernetes: etcd, kube-apiserver and kube-controller-manager
//! built from source at the versions `kube/go.mod` pins (`scripts/kube`), the real
//! `helm` and `kubectl`. Skipped only with an explicit `WARY_SKIP_KUBE=1`.

use std::path::Path;

use serde_json::Value;
use wary_tests::cluster::{self, Cluster};
use wary_tests::node::{Node, POD_DEADLINE, wait_for};
use wary_tests::workspace_root;

const CRDS: [&str; 3] = [
    "trafficpolicies.policy.wary.io",
    "authorizationpolicies.policy.wary.io",
    "meshconfigs.policy.wary.io",
];

/// The chart as it was at `rev`, unpacked under `dir`.
fn chart_at(rev: &str, dir: &Path) -> std::path::PathBuf {
    let archive = std::process::Command::new("git")
        .current_dir(workspace_root())
        .args(["archive", "--format=tar", rev, "charts/wary"])
        .output()
        .expect("git archive");
    assert!(
        archive.status.success(),
        "git archive {rev}: {}",
        String::from_utf8_lossy(&archive.stderr)
    );
    let mut tar = std::process::Command::new("tar")
        .arg("-x")
        .arg("-C")
        .arg(dir)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("tar");
    std::io::Write::write_all(tar.stdin.as_mut().expect("stdin"), &archive.stdout).expect("write tar");
    drop(tar.stdin.take());
    assert!(tar.wait().expect("tar").success());
    dir.join("charts/wary")
}

/// `value` with every number as an `f64`: the API server writes `1.0` back as `1`.
fn numbers_as_f64(value: &Value) -> Value {
    match value {
        Value::Number(n) => n.as_f64().map(Value::from).unwrap_or(Value::Null),
        Value::Array(items) => items.iter().map(numbers_as_f64).collect(),
        Value::Object(map) => map.iter().map(|(k, v)| (k.clone(), numbers_as_f64(v))).collect(),
        other => other.clone(),
    }
}

fn read(path: &str) -> String {
    std::fs::read_to_string(workspace_root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// What `kubectl get` shows of the quickstart's custom resources, without what the
/// API server adds.
fn custom_resources(cluster: &Cluster) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for kind in ["trafficpolicies", "authorizationpolicies", "meshconfigs"] {
        for item in cluster.get(&[kind, "-A"])["items"].as_array().expect("items") {
            out.push((
                format!("{kind}/{}", item["metadata"]["name"].as_str().expect("name")),
                item["spec"].clone(),
            ));
        }
    }
    out
}

/// The chart from its first release (0.1.0, whose CRDs sat in `crds/`, which Helm never
/// upgrades) to this one along the README's upgrade path; then uninstall and install
/// again. Every object must be accepted by the real API server, the CRDs must change
/// and every custom resource must survive.
#[test]
fn the_chart_installs_upgrades_from_0_1_0_uninstalls_and_installs_again() {
    if cluster::skip("the_chart_installs_upgrades_from_0_1_0_uninstalls_and_installs_again") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = Cluster::start(dir.path());

    // The API server reports the pinned release, which the chart's kubeVersion checks.
    let version: Value = serde_json::from_str(&cluster.kubectl(&["get", "--raw", "/version"])).expect("/version");
    assert_eq!(
        version["gitVersion"],
        cluster::pinned("k8s.io/kubernetes").as_str(),
        "{version}"
    );

    // 0.1.0, and the quickstart's policies in its CRDs.
    let old = chart_at("1304d73", dir.path());
    let installed = cluster.helm(&[
        "install",
        "wary",
        old.to_str().unwrap(),
        "-n",
        "wary-system",
        "--create-namespace",
    ]);
    installed.unwrap_or_else(|e| panic!("helm install of chart 0.1.0: {e}\n{}", cluster.logs()));
    for file in ["examples/quickstart/policy.yaml", "examples/quickstart/mesh.yaml"] {
        cluster
            .apply(&read(file))
            .unwrap_or_else(|e| panic!("apply {file}: {e}"));
    }
    let resources = custom_resources(&cluster);
    assert_eq!(resources.len(), 3, "{resources:?}");
    let old_schema = cluster.get(&["crd", CRDS[0]])["spec"]["versions"].clone();

    // The README's upgrade path: let the release adopt the CRDs, then upgrade.
    for crd in CRDS {
        cluster.kubectl(&["label", "crd", crd, "app.kubernetes.io/managed-by=Helm"]);
        cluster.kubectl(&[
            "annotate",
            "crd",
            crd,
            "meta.helm.sh/release-name=wary",
            "meta.helm.sh/release-namespace=wary-system",
        ]);
    }
    let upgraded = cluster
        .helm(&[
            "upgrade",
            "wary",
            workspace_root().join("charts/wary").to_str().unwrap(),
            "-n",
            "wary-system",
        ])
        .unwrap_or_else(|e| panic!("helm upgrade to this chart: {e}\n{}", cluster.logs()));
    assert!(
        !upgraded.to_lowercase().contains("warning"),
        "the API server warned:\n{upgraded}"
    );

    // The CRDs are now this chart's, and the release's; nothing stored was dropped.
    let shipped: Vec<Value> = serde_yaml::Deserializer::from_str(&read("charts/wary/templates/crds.yaml"))
        .map(|d| serde::Deserialize::deserialize(d).expect("a CRD"))
        .collect();
    for want in &shipped {
        let name = want["metadata"]["name"].as_str().expect("name");
        let live = cluster.get(&["crd", name]);
        assert_eq!(
            live["metadata"]["annotations"]["helm.sh/resource-policy"], "keep",
            "{name}"
        );
        assert_eq!(
            live["metadata"]["labels"]["app.kubernetes.io/managed-by"], "Helm",
            "{name}"
        );
        for (i, version) in want["spec"]["versions"]
            .as_array()
            .expect("versions")
            .iter()
            .enumerate()
        {
            assert_eq!(
                numbers_as_f64(&live["spec"]["versions"][i]["schema"]),
                numbers_as_f64(&version["schema"]),
                "{name}: the API server does not hold the schema this chart ships"
            );
        }
        let served: Vec<&Value> = live["spec"]["versions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| &v["name"])
            .collect();
        for stored in live["status"]["storedVersions"].as_array().expect("storedVersions") {
            assert!(served.contains(&stored), "{name}: stored version {stored} is gone");
        }
    }
    assert_ne!(
        cluster.get(&["crd", CRDS[0]])["spec"]["versions"],
        old_schema,
        "helm upgrade did not change the CRDs"
    );
    assert_eq!(
        custom_resources(&cluster),
        resources,
        "the upgrade changed custom resources"
    );

    // The schema refuses what it can describe: a negative count, an unknown field.
    let negative = read("examples/quickstart/policy.yaml").replacen(
        "  retries:\n    attempts: 3",
        "  connectionPool:\n    maxConnections: -1\n  retries:\n    attempts: 3",
        1,
    );
    let err = cluster.apply(&negative).expect_err("maxConnections: -1 was accepted");
    assert!(
        err.contains("spec.connectionPool.maxConnections") && err.contains("greater than or equal to 0"),
        "{err}"
    );
    let unknown = read("examples/quickstart/mesh.yaml").replace("  mtls:", "  mtlss:");
    let err = cluster.apply(&unknown).expect_err("an unknown field was accepted");
    assert!(err.contains(".spec.mtlss: field not declared in schema"), "{err}");
    assert_eq!(
        custom_resources(&cluster),
        resources,
        "a refused apply changed something"
    );

    // Uninstall keeps the CRDs and what is in them; installing again adopts them.
    cluster
        .helm(&["uninstall", "wary", "-n", "wary-system", "--wait"])
        .expect("helm uninstall");
    assert!(
        cluster
            .kubectl_with(&["get", "deployment", "wary-control-plane", "-n", "wary-system"], "")
            .status
            .code()
            != Some(0),
        "helm uninstall left the control plane's Deployment"
    );
    for crd in CRDS {
        cluster.kubectl(&["get", "crd", crd]);
    }
    assert_eq!(
        custom_resources(&cluster),
        resources,
        "helm uninstall removed custom resources"
    );
    let again = cluster
        .helm(&[
            "install",
            "wary",
            workspace_root().join("charts/wary").to_str().unwrap(),
            "-n",
            "wary-system",
        ])
        .unwrap_or_else(|e| panic!("helm install after uninstall: {e}"));
    assert!(
        !again.to_lowercase().contains("warning"),
        "the API server warned:\n{again}"
    );
    let deployment = cluster.get(&["deployment", "wary-control-plane", "-n", "wary-system"]);
    assert_eq!(
        deployment["metadata"]["annotations"]["meta.helm.sh/release-name"],
        "wary"
    );
}

/// A node and the cluster inside it. Bind it as `OnNode { cluster, mut node }`: locals
/// drop in reverse order, so the node's pods stop before the API server they watch
/// (which otherwise waits 10 s on their watches before it is killed).
struct OnNode {
    node: Node,
    cluster: Cluster,
}

/// Installs the chart in a cluster on a new node with `replicas` control planes, and
/// runs them there; returns once the EndpointSlice controller lists them all ready and
/// the node routes the Services' ClusterIPs to them.
fn install(tag: &str, dir: &Path, replicas: usize) -> OnNode {
    install_with(tag, dir, replicas, false)
}

/// [`install`], with the Gateway API's standard CRDs installed first when
/// `gateway_api` (the control plane must start cleanly with them and without).
fn install_with(tag: &str, dir: &Path, replicas: usize, gateway_api: bool) -> OnNode {
    let mut node = Node::new(tag);
    let cluster = node.start_cluster(dir);
    if gateway_api {
        for crd in cluster::gateway_api_crds() {
            let yaml = std::fs::read_to_string(&crd).expect("a Gateway API CRD");
            cluster
                .apply(&yaml)
                .unwrap_or_else(|e| panic!("apply {}: {e}", crd.display()));
        }
        for kind in ["gateways", "httproutes", "grpcroutes"] {
            let name = format!("crd/{kind}.gateway.networking.k8s.io");
            cluster.kubectl(&["wait", "--for=condition=Established", &name, "--timeout=60s"]);
        }
    }
    let chart = workspace_root().join("charts/wary");
    let replicas_value = format!("controlPlane.replicas={replicas}");
    cluster
        .helm(&[
            "install",
            "wary",
            chart.to_str().unwrap(),
            "-n",
            "wary-system",
            "--create-namespace",
            "--set",
            &replicas_value,
        ])
        .unwrap_or_else(|e| panic!("helm install: {e}\n{}", cluster.logs()));

    // The ReplicaSet controller makes the Deployment's pods; the node runs them.
    let pods = wait_for("the control plane's pods", POD_DEADLINE, || {
        let list = cluster.get(&[
            "pods",
            "-n",
            "wary-system",
            "-l",
            "app.kubernetes.io/component=control-plane",
        ]);
        let names: Vec<String> = list["items"]
            .as_array()?
            .iter()
            .map(|p| p["metadata"]["name"].as_str().unwrap().to_string())
            .collect();
        (names.len() == replicas).then_some(names)
    });
    for pod in &pods {
        node.run_pod(&cluster, "wary-system", pod, dir);
    }
    wait_for("ready endpoints of the control plane's Service", POD_DEADLINE, || {
        let slices = cluster.get(&[
            "endpointslices",
            "-n",
            "wary-system",
            "-l",
            "kubernetes.io/service-name=wary-control-plane",
        ]);
        let ready = slices["items"]
            .as_array()?
            .iter()
            .flat_map(|s| s["endpoints"].as_array().into_iter().flatten())
            .filter(|e| e["conditions"]["ready"] == true)
            .count();
        (ready == replicas).then_some(())
    });
    node.sync_services(&cluster);
    OnNode { node, cluster }
}

/// Names of the containers in `list` (`spec.containers`, `spec.initContainers`).
fn names(list: &Value) -> Vec<&str> {
    list.as_array()
        .into_iter()
        .flatten()
        .map(|c| c["name"].as_str().unwrap())
        .collect()
}

const APP_POD: &str = r#"apiVersion: v1
kind: Pod
metadata:
  name: NAME
  namespace: NAMESPACE
  labels: {app: shop}
spec:
  containers:
  - name: app
    image: registry.example/shop:1
    ports: [{containerPort: 8080}]
    readinessProbe:
      httpGet: {path: /healthz, port: 8080}
    livenessProbe:
      tcpSocket: {port: 8080}
"#;

fn app_pod(namespace: &str, name: &str) -> String {
    APP_POD.replace("NAMESPACE", namespace).replace("NAME", name)
}

/// The chart's control plane runs (two replicas, as a kubelet would run them, in pods
/// of their own with the chart's arguments, mounts, user and service-account token;
/// the Gateway API's standard CRDs installed beside Wary's);
/// the real EndpointSlice controller publishes them; the API server calls their webhook
/// over TLS with the chart's `caBundle` when a pod is created in an injected namespace,
/// and stores what it returns. With the webhook down, `failurePolicy` decides.
#[test]
fn the_api_server_calls_the_chart_s_webhook_and_stores_injected_pods() {
    if cluster::skip("the_api_server_calls_the_chart_s_webhook_and_stores_injected_pods") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    // With the Gateway API's CRDs beside Wary's (the other tests run without them).
    let OnNode { cluster, mut node } = install_with("hook", dir.path(), 2, true);
    let chart = workspace_root().join("charts/wary");
    let chart = chart.to_str().unwrap();
    // One CA for both replicas: the first made the Secret, the other read it.
    cluster.get(&["secret", "wary-ca", "-n", "wary-system"]);
    let logs: Vec<String> = node.pods().iter().map(|p| p.log("control-plane")).collect();
    let created = logs
        .iter()
        .filter(|l| l.contains("created a new mesh CA and stored it in its Secret"))
        .count();
    let used = logs
        .iter()
        .filter(|l| l.contains("using the mesh CA from its Secret"))
        .count();
    assert_eq!(
        (created, used),
        (1, 1),
        "one replica must make the CA and the other use it:\n{logs:#?}"
    );

    // An injected namespace: the stored pod has the init step, the native sidecar and
    // its probes moved to the proxy.
    cluster
        .apply("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  labels: {wary.io/inject: enabled}\n")
        .unwrap();
    cluster
        .apply("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: plain\n")
        .unwrap();
    let created = cluster
        .apply(&app_pod("shop", "web"))
        .unwrap_or_else(|e| panic!("create a pod: {e}\n{}", cluster.logs()));
    let stored = cluster.get(&["pod", "web", "-n", "shop"]);
    let spec = &stored["spec"];
    assert_eq!(
        names(&spec["initContainers"]),
        ["wary-init", "wary-proxy"],
        "{created}\n{stored:#}"
    );
    assert_eq!(spec["initContainers"][1]["restartPolicy"], "Always", "{stored:#}");
    assert_eq!(names(&spec["containers"]), ["app"]);
    let app = &spec["containers"][0];
    assert_eq!(
        app["readinessProbe"]["httpGet"]["path"], "/app-health/app/readiness",
        "{app:#}"
    );
    assert_eq!(app["readinessProbe"]["httpGet"]["port"], 4191, "{app:#}");
    assert_eq!(
        app["livenessProbe"]["httpGet"]["path"], "/app-health/app/liveness",
        "{app:#}"
    );
    let proxy_image = spec["initContainers"][1]["image"].as_str().unwrap();
    assert!(
        proxy_image.starts_with("ghcr.io/wary-mesh/wary-proxy:"),
        "{proxy_image}"
    );

    // A namespace without the label is left alone.
    cluster.apply(&app_pod("plain", "web")).unwrap();
    let plain = cluster.get(&["pod", "web", "-n", "plain"]);
    assert_eq!(names(&plain["spec"]["initContainers"]), Vec::<&str>::new(), "{plain:#}");
    assert_eq!(
        plain["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"],
        8080
    );

    // The webhook down: with the chart's default (Ignore) the pod is created as it is...
    for pod in node.pods() {
        pod.kill();
    }
    cluster
        .apply(&app_pod("shop", "while-down"))
        .unwrap_or_else(|e| panic!("failurePolicy Ignore refused a pod: {e}"));
    let uninjected = cluster.get(&["pod", "while-down", "-n", "shop"]);
    assert_eq!(
        names(&uninjected["spec"]["initContainers"]),
        Vec::<&str>::new(),
        "{uninjected:#}"
    );
    // ...and with Fail it is refused, saying why.
    cluster
        .helm(&[
            "upgrade",
            "wary",
            chart,
            "-n",
            "wary-system",
            "--reuse-values",
            "--set",
            "webhook.failurePolicy=Fail",
        ])
        .expect("helm upgrade");
    let refused = cluster
        .apply(&app_pod("shop", "refused"))
        .expect_err("failurePolicy Fail let a pod through");
    assert!(
        refused.contains("failed calling webhook \"namespace.inject.wary.io\""),
        "{refused}"
    );
}

const SHOP: &str = r#"apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels: {wary.io/inject: enabled}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: backend, namespace: shop}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: client, namespace: shop}
---
apiVersion: v1
kind: Service
metadata: {name: backend, namespace: shop}
spec:
  selector: {app: backend}
  ports: [{name: http, port: 80, targetPort: 8080}]
"#;

/// A demo app pod (the `wary` image's `demo-app backend`) as service account `sa`.
fn demo_pod(name: &str, sa: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: shop
  labels: {{app: {name}}}
spec:
  serviceAccountName: {sa}
  containers:
  - name: app
    image: ghcr.io/wary-mesh/wary:0.2.0
    args: [demo-app, backend, --listen, "0.0.0.0:8080", --name, {name}]
    ports: [{{containerPort: 8080}}]
    readinessProbe:
      httpGet: {{path: /api/work, port: 8080}}
"#
    )
}

fn authorization(principal: &str) -> String {
    format!(
        r#"apiVersion: policy.wary.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: backend-callers, namespace: shop}}
spec:
  targetRef: {{kind: Service, name: backend}}
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["{principal}"]
"#
    )
}

/// AuthorizationPolicy `name` (namespace shop)'s `Accepted` condition, once it
/// describes the object's current generation.
fn accepted(cluster: &Cluster, name: &str) -> Option<Value> {
    let policy = cluster.get(&["authorizationpolicy", name, "-n", "shop"]);
    let condition = policy["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Accepted")?;
    (condition["observedGeneration"] == policy["metadata"]["generation"]).then(|| condition.clone())
}

/// The whole path on a real API server: pods injected by the chart's webhook run with
/// their init step's iptables rules and the proxy beside the app; the proxies prove who
/// they are with TokenRequest tokens the control plane checks with TokenReview; a plain
/// request to a Service's name crosses both proxies over mTLS and the backend sees the
/// caller's SPIFFE ID; policies applied to the API server reach the proxies, and one
/// the schema accepts but Wary refuses keeps the last good version in force, and says
/// why on `/config` and in its own `Accepted` condition.
#[test]
fn injected_pods_talk_over_mtls_and_follow_policies_applied_to_the_api_server() {
    if cluster::skip("injected_pods_talk_over_mtls_and_follow_policies_applied_to_the_api_server") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let OnNode { cluster, mut node } = install("mesh", dir.path(), 1);
    cluster.apply(SHOP).unwrap();
    for (name, sa) in [("backend", "backend"), ("client", "client")] {
        cluster
            .apply(&demo_pod(name, sa))
            .unwrap_or_else(|e| panic!("create pod {name}: {e}"));
        node.run_pod(&cluster, "shop", name, dir.path());
    }
    let cp_ip = node.pods()[0].ip;
    let client = node.pods().iter().position(|p| p.name == "client").unwrap();
    let call = |node: &mut Node| -> (u16, String) {
        let out = node.pods()[client].exec(&[
            "curl",
            "-sS",
            "--max-time",
            "10",
            "-w",
            "\n%{http_code}",
            "http://backend.shop.svc/api/work",
        ]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or((&text, "0"));
        (code.parse().unwrap_or(0), body.to_string())
    };
    let (code, body) = call(&mut node);
    assert_eq!(
        (code, body.trim()),
        (200, "work done by backend for spiffe://cluster.local/ns/shop/sa/client"),
        "the backend must see the client's verified identity"
    );

    // A policy applied to the API server reaches the proxies.
    cluster
        .apply(&authorization("spiffe://cluster.local/ns/shop/sa/someone-else"))
        .unwrap();
    wait_for("the backend's proxy to refuse the client", POD_DEADLINE, || {
        (call(&mut node).0 == 403).then_some(())
    });

    // One the schema cannot refuse, Wary does: the last good version stays, and the
    // control plane says why.
    cluster.apply(&authorization("client")).unwrap();
    let config_url = format!("http://{cp_ip}:9990/config");
    let why = wait_for("the control plane to report the bad policy", POD_DEADLINE, || {
        let out = node.exec(&["curl", "-sS", "--max-time", "5", &config_url]);
        let config = String::from_utf8_lossy(&out.stdout).into_owned();
        config
            .contains("AuthorizationPolicy/shop/backend-callers")
            .then_some(config)
    });
    assert!(why.contains("is not a SPIFFE ID"), "{why}");
    assert_eq!(call(&mut node).0, 403, "a refused policy replaced the last good one");
    // ...and so does the object's own status, which `kubectl get` shows.
    let refused = wait_for("Accepted=False on the refused policy", POD_DEADLINE, || {
        accepted(&cluster, "backend-callers").filter(|c| c["status"] == "False")
    });
    assert_eq!(refused["reason"], "Invalid", "{refused}");
    let message = refused["message"].as_str().unwrap();
    assert!(
        message.contains("is not a SPIFFE ID") && message.contains("keeps this object's last valid version"),
        "{message}"
    );
    let table = cluster.kubectl(&["get", "authorizationpolicies", "-n", "shop"]);
    assert!(table.contains("ACCEPTED") && table.contains("False"), "{table}");

    // Corrected, it is in force again.
    cluster
        .apply(&authorization("spiffe://cluster.local/ns/shop/sa/client"))
        .unwrap();
    wait_for("the backend's proxy to let the client in", POD_DEADLINE, || {
        (call(&mut node).0 == 200).then_some(())
    });
    wait_for("Accepted=True on the corrected policy", POD_DEADLINE, || {
        accepted(&cluster, "backend-callers").filter(|c| c["status"] == "True" && c["reason"] == "Accepted")
    });
}

/// The control plane's `/config` page, from the node.
fn control_plane_config(node: &Node, ip: std::net::Ipv4Addr) -> Option<Value> {
    let out = node.exec(&["curl", "-sS", "--max-time", "5", &format!("http://{ip}:9990/config")]);
    serde_json::from_slice(&out.stdout).ok()
}

fn service(namespace: &str, name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {namespace}}}\n\
         spec: {{selector: {{app: {name}}}, ports: [{{port: 80}}]}}\n"
    )
}

/// The API server restarts after etcd was compacted to now: every watch of the control
/// plane resumes from a revision that no longer exists, gets 410 Gone, relists, and the
/// control plane converges on what the cluster holds.
#[test]
fn watches_that_get_410_gone_after_a_compaction_relist_and_converge() {
    if cluster::skip("watches_that_get_410_gone_after_a_compaction_relist_and_converge") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let OnNode { cluster, mut node } = install("relist", dir.path(), 1);
    let cp_ip = node.pods()[0].ip;
    cluster
        .apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: demo}\n")
        .unwrap();
    cluster.apply(&service("demo", "one")).unwrap();
    let counts =
        |node: &Node| control_plane_config(node, cp_ip).map(|c| c["counts"].as_str().unwrap_or("").to_string());
    wait_for("the control plane to see Service one", POD_DEADLINE, || {
        counts(&node).filter(|c| c.contains("service=2")).map(|_| ())
    });

    // A write the control plane does not watch moves etcd past every watch's revision;
    // then the API server stops, etcd forgets the history, and the API server returns.
    cluster
        .apply("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: bump, namespace: demo}\ndata: {a: b}\n")
        .unwrap();
    let before = node.pods()[0].log("control-plane").len();
    cluster.stop_api_server();
    let revision = cluster.compact_etcd();
    cluster.start_api_server();

    // Every watch resumes from before `revision`: 410 Gone, then a relist.
    let gone = wait_for(
        "the control plane's watches to be told their revision is gone",
        POD_DEADLINE,
        || {
            let log = node.pods()[0].log("control-plane");
            log[before..]
                .lines()
                .find(|l| l.contains("watch failed; retrying") && l.contains("too old resource version"))
                .map(str::to_string)
        },
    );
    eprintln!("the control plane was told: {gone}");

    // And it converges: what changes now is what it serves.
    cluster.kubectl(&["delete", "service", "one", "-n", "demo"]);
    cluster.apply(&service("demo", "two")).unwrap();
    cluster.apply(&service("demo", "three")).unwrap();
    cluster
        .apply(&authorization("not-a-spiffe-id").replace("namespace: shop", "namespace: demo"))
        .unwrap();
    let config = wait_for("the control plane to converge after the relist", POD_DEADLINE, || {
        let config = control_plane_config(&node, cp_ip)?;
        let ok = config["counts"].as_str()?.contains("service=3")
            && config["errors"]
                .to_string()
                .contains("AuthorizationPolicy/demo/backend-callers");
        ok.then_some(config)
    });
    assert!(
        config["errors"].to_string().contains("is not a SPIFFE ID"),
        "{config} (compacted at {revision})"
    );
}

/// With native sidecars a Job's pod completes when its app exits: the API server stores
/// the proxy as an init container with `restartPolicy: Always`, the kubelet (the test)
/// stops it with SIGTERM once the app is done and it ends at once, and the Job
/// controller marks the Job Complete.
#[test]
fn a_job_whose_app_exits_completes_with_the_proxy_injected() {
    if cluster::skip("a_job_whose_app_exits_completes_with_the_proxy_injected") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let OnNode { cluster, mut node } = install("job", dir.path(), 1);
    cluster.apply(SHOP).unwrap();
    cluster
        .apply(
            r#"apiVersion: batch/v1
kind: Job
metadata: {name: report, namespace: shop}
spec:
  backoffLimit: 0
  template:
    spec:
      restartPolicy: Never
      serviceAccountName: client
      containers:
      - name: app
        image: ghcr.io/wary-mesh/wary:0.2.0
        args: ["--version"]
"#,
        )
        .unwrap();
    let pod = wait_for("the Job's pod", POD_DEADLINE, || {
        let list = cluster.get(&["pods", "-n", "shop", "-l", "job-name=report"]);
        list["items"].as_array()?.first()?["metadata"]["name"]
            .as_str()
            .map(str::to_string)
    });
    let stored = cluster.get(&["pod", &pod, "-n", "shop"]);
    assert_eq!(
        names(&stored["spec"]["initContainers"]),
        ["wary-init", "wary-proxy"],
        "{stored:#}"
    );
    assert_eq!(stored["spec"]["initContainers"][1]["restartPolicy"], "Always");

    node.run_pod(&cluster, "shop", &pod, dir.path());
    let running = node.pods().len() - 1;
    let started = std::time::Instant::now();
    let (phase, exits) = node.finish_pod(&cluster, running);
    let proxy_log = node.pods()[running].log("wary-proxy");
    assert_eq!(phase, "Succeeded", "{exits:?}\n{proxy_log}");
    // The proxy ends on the kubelet's SIGTERM, promptly, not by the SIGKILL 30 s later.
    assert!(matches!(exits["wary-proxy"], 0 | 143), "{exits:?}\n{proxy_log}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(25),
        "the proxy took {:?} to stop",
        started.elapsed()
    );
    wait_for("the Job to be Complete", POD_DEADLINE, || {
        let job = cluster.get(&["job", "report", "-n", "shop"]);
        job["status"]["conditions"]
            .as_array()?
            .iter()
            .any(|c| c["type"] == "Complete" && c["status"] == "True")
            .then_some(())
    });
}
