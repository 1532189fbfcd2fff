//! Wary against a real Kubernetes: etcd, kube-apiserver and kube-controller-manager
//! built from source at the versions `kube/go.mod` pins (`scripts/kube`), the real
//! `helm` and `kubectl`. Skipped only with an explicit `WARY_SKIP_KUBE=1`.

use std::path::Path;

use serde_json::Value;
use wary_tests::cluster::{self, Cluster};

const CRDS: [&str; 3] = [
    "trafficpolicies.policy.wary.io",
    "authorizationpolicies.policy.wary.io",
    "meshconfigs.policy.wary.io",
];

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root")
}

/// The chart as it was at `rev`, unpacked under `dir`.
fn chart_at(rev: &str, dir: &Path) -> std::path::PathBuf {
    let archive = std::process::Command::new("git")
        .current_dir(root())
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
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
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
    let cluster = Cluster::start(dir.path(), None);

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
            root().join("charts/wary").to_str().unwrap(),
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
            root().join("charts/wary").to_str().unwrap(),
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
