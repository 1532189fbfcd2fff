//! Two "pods" as a cluster node would run them, each in a network namespace of its
//! own, joined to a "node" namespace by veth links on a bridge:
//!
//! ```text
//! node ns: bridge 10.77.0.1 ── control plane :8086
//!   ├─ veth ─ pod-a 10.77.0.2: `wary-proxy init` rules, proxy (UID 2102), curl (root)
//!   └─ veth ─ pod-b 10.77.0.3: `wary-proxy init` rules, proxy (UID 2102), demo backend :8080
//! ```
//!
//! The apps know nothing of the mesh: the client's plain `curl http://10.77.0.3:8080`
//! is redirected to its proxy, carried over mTLS to the server pod's proxy, and handed
//! to the app, which sees the client's SPIFFE ID. The proxies' own connections (to the
//! control plane, to each other, to the app) must not be redirected back to them.
//! The host's network is never touched; the namespaces go when the test ends.

use std::process::Stdio;

use tokio::process::{Child, Command};
use wary_tests::{MeshDir, binary, wait_until};

const PROXY_UID: &str = "2102";

/// Runs a command to completion; its stdout on success, else `Err` with its output.
async fn output(cmd: &[&str]) -> Result<String, String> {
    let out = Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .await
        .map_err(|e| format!("{cmd:?}: {e} (these tests need root, iproute2, iptables and curl)"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{cmd:?}: {}{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Runs a command that must succeed.
async fn run(cmd: &[&str]) -> String {
    output(cmd).await.unwrap_or_else(|e| panic!("{e}"))
}

/// Network namespaces deleted when the test ends, however it ends.
struct Namespaces(Vec<String>);

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = std::process::Command::new("ip").args(["netns", "delete", ns]).status();
        }
    }
}

/// A long-running process in namespace `ns`, killed on drop (`ip netns exec` and
/// `setpriv` exec the command, so the child is the process itself).
fn spawn_in(ns: &str, cmd: &[&str], env: &[(&str, &str)]) -> Child {
    Command::new("ip")
        .args(["netns", "exec", ns])
        .args(cmd)
        .envs(env.iter().copied())
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("start {cmd:?} in {ns}: {e}"))
}

/// An iptables rule's packet count in `ns` (`iptables -L -v -x` of the nat table),
/// for the first rule of `chain` whose text contains `matching`.
async fn packets(ns: &str, chain: &str, matching: &str) -> u64 {
    let listing = run(&[
        "ip", "netns", "exec", ns, "iptables", "-w", "-t", "nat", "-L", chain, "-v", "-n", "-x",
    ])
    .await;
    listing
        .lines()
        .find(|l| l.contains(matching))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no rule with {matching:?} in {chain} of {ns}:\n{listing}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_request_between_pods_crosses_both_proxies_over_mtls() {
    let id = std::process::id();
    let (node, pod_a, pod_b) = (
        format!("wary-node-{id}"),
        format!("wary-a-{id}"),
        format!("wary-b-{id}"),
    );
    let _namespaces = Namespaces(vec![node.clone(), pod_a.clone(), pod_b.clone()]);
    for ns in [&node, &pod_a, &pod_b] {
        run(&["ip", "netns", "add", ns]).await;
        run(&["ip", "-n", ns, "link", "set", "lo", "up"]).await;
    }
    run(&["ip", "-n", &node, "link", "add", "br0", "type", "bridge"]).await;
    run(&["ip", "-n", &node, "addr", "add", "10.77.0.1/24", "dev", "br0"]).await;
    run(&["ip", "-n", &node, "link", "set", "br0", "up"]).await;
    for (pod, ip, veth) in [(&pod_a, "10.77.0.2/24", "veth-a"), (&pod_b, "10.77.0.3/24", "veth-b")] {
        run(&[
            "ip", "-n", &node, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", pod,
        ])
        .await;
        run(&["ip", "-n", &node, "link", "set", veth, "master", "br0", "up"]).await;
        run(&["ip", "-n", pod, "addr", "add", ip, "dev", "eth0"]).await;
        run(&["ip", "-n", pod, "link", "set", "eth0", "up"]).await;
    }

    // Each pod's init step, as injected; pod-a's runs twice (a restarted pod keeps its
    // namespace), which must leave one set of rules.
    let proxy = binary("wary-proxy");
    let proxy = proxy.to_str().unwrap();
    for pod in [&pod_a, &pod_a, &pod_b] {
        run(&["ip", "netns", "exec", pod, proxy, "init", "--proxy-uid", PROXY_UID]).await;
    }
    let rules = run(&["ip", "netns", "exec", &pod_a, "iptables-save", "-t", "nat"]).await;
    assert_eq!(rules.matches("-A OUTPUT -p tcp -j WARY_OUTBOUND").count(), 1, "{rules}");
    assert_eq!(
        rules.matches("-A PREROUTING -p tcp -j WARY_INBOUND").count(),
        1,
        "{rules}"
    );
    assert_eq!(rules.matches("--to-ports 4140").count(), 1, "{rules}");

    // The mesh: a server Service, and a Workload per pod.
    let mesh = MeshDir::new();
    mesh.write(
        "mesh.yaml",
        r#"apiVersion: local.wary.io/v1alpha1
kind: Service
metadata: {name: server}
spec: {selector: {app: server}, ports: [{port: 8080}]}
---
apiVersion: local.wary.io/v1alpha1
kind: Workload
metadata: {name: server, labels: {app: server}}
spec: {serviceAccount: server, address: 10.77.0.3, ports: [{port: 8080}]}
---
apiVersion: local.wary.io/v1alpha1
kind: Workload
metadata: {name: client, labels: {app: client}}
spec: {serviceAccount: client, address: 10.77.0.2}
"#,
    );
    let cp_bin = binary("wary-control-plane");
    let cp_bin = cp_bin.to_str().unwrap();
    let ca = mesh.ca_path().to_str().unwrap().to_string();
    run(&[cp_bin, "ca", "init", "--ca-dir", &ca]).await;
    // The trust bundle inline, as the injector hands it to a pod's proxy.
    let anchors = run(&[cp_bin, "ca", "bundle", "--ca-dir", &ca]).await;

    let _cp = spawn_in(
        &node,
        &[cp_bin, "--config-dir", mesh.path().to_str().unwrap(), "--ca-dir", &ca],
        &[
            ("WARY_DISCOVERY_ADDR", "10.77.0.1:8086"),
            ("WARY_ADMIN_ADDR", "127.0.0.1:9990"),
        ],
    );
    let mut proxies = Vec::new();
    // The server pod's kubelet probes, as the injector moves them to the admin port.
    let probes = r#"{"/app-health/app/readiness": {"http": {"port": 8080, "path": "/api/work"}},
                     "/app-health/app/liveness": {"tcp": {"port": 8080}},
                     "/app-health/app/startup": {"tcp": {"port": 8081}}}"#;
    for (pod, workload, ip) in [(&pod_a, "client", "10.77.0.2"), (&pod_b, "server", "10.77.0.3")] {
        let token = run(&[cp_bin, "token", "--workload", workload, "--ca-dir", &ca]).await;
        let inbound = format!("{ip}:4143");
        proxies.push(spawn_in(
            pod,
            &[
                "setpriv",
                "--reuid",
                PROXY_UID,
                "--regid",
                PROXY_UID,
                "--clear-groups",
                "--",
                proxy,
            ],
            &[
                ("WARY_CONTROL_PLANE", "https://10.77.0.1:8086"),
                ("WARY_TRUST_ANCHORS_PEM", &anchors),
                ("WARY_JOIN_TOKEN", token.trim()),
                ("WARY_WORKLOAD", workload),
                ("WARY_INBOUND_ADDR", &inbound),
                ("WARY_OUTBOUND_ADDR", "127.0.0.1:4140"),
                ("WARY_ADMIN_ADDR", "0.0.0.0:4191"),
                ("WARY_APP_PROBES", probes),
            ],
        ));
    }
    let _server = spawn_in(
        &pod_b,
        &[
            binary("wary").to_str().unwrap(),
            "demo-app",
            "backend",
            "--listen",
            "10.77.0.3:8080",
            "--name",
            "server",
        ],
        &[],
    );

    // The admin port is not redirected: the node reaches each proxy's /ready (which
    // also says it holds its certificate and its configuration).
    for ip in ["10.77.0.2", "10.77.0.3"] {
        let url = format!("http://{ip}:4191/ready");
        wait_until(&format!("the proxy at {ip} is ready"), || {
            let (node, url) = (node.clone(), url.clone());
            async move {
                output(&["ip", "netns", "exec", &node, "curl", "-sf", "--max-time", "2", &url])
                    .await
                    .ok()
            }
        })
        .await;
    }
    // The server's app is up (its proxy reaches it: UID 2102 is not redirected).
    wait_until("the server app listens", || {
        let pod_b = pod_b.clone();
        async move {
            output(&["ip", "netns", "exec", &pod_b, "ss", "-Htln", "sport = :8080"])
                .await
                .ok()
                .filter(|s| !s.trim().is_empty())
        }
    })
    .await;

    // The client app, as root, knows nothing of the mesh.
    let answer = run(&[
        "ip",
        "netns",
        "exec",
        &pod_a,
        "curl",
        "-sS",
        "--fail-with-body",
        "--max-time",
        "10",
        "http://10.77.0.3:8080/api/work",
    ])
    .await;
    assert_eq!(
        answer.trim(),
        "work done by server for spiffe://cluster.local/ns/default/sa/client",
        "the server app must see the client's verified identity"
    );

    // The client's connection was redirected; the proxies' own connections (to the
    // control plane, to the peer, to the app) were not: nothing reached pod-b's
    // outbound redirect, and both proxies' connections matched the owner rule.
    assert!(packets(&pod_a, "WARY_OUTBOUND", "redir ports 4140").await >= 1);
    assert_eq!(packets(&pod_b, "WARY_OUTBOUND", "redir ports 4140").await, 0);
    for pod in [&pod_a, &pod_b] {
        assert!(packets(pod, "WARY_OUTBOUND", &format!("owner UID match {PROXY_UID}")).await >= 1);
    }
    // The peer proxy's connection arrived at 4143 directly, the app port saw nothing
    // but redirected traffic.
    assert!(packets(&pod_b, "WARY_INBOUND", "dpt:4143").await >= 1);

    // A client outside the mesh cannot reach the app around the proxy: its plaintext
    // request to the app port is redirected to the inbound listener, which (mTLS
    // strict, the default) refuses it.
    let around = output(&[
        "ip",
        "netns",
        "exec",
        &node,
        "curl",
        "-sS",
        "--max-time",
        "5",
        "http://10.77.0.3:8080/api/work",
    ])
    .await;
    assert!(around.is_err(), "plaintext reached the app: {around:?}");
    assert!(packets(&pod_b, "WARY_INBOUND", "redir ports 4143").await >= 1);

    // The kubelet's probes, moved to the admin port, reach the app through the proxy
    // (a node's plaintext to the app port itself is refused above).
    let probe = |path: &str| {
        let (node, url) = (node.clone(), format!("http://10.77.0.3:4191{path}"));
        async move {
            output(&[
                "ip",
                "netns",
                "exec",
                &node,
                "curl",
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "5",
                &url,
            ])
            .await
            .unwrap_or_else(|e| panic!("{e}"))
        }
    };
    assert_eq!(probe("/app-health/app/readiness").await, "200");
    assert_eq!(probe("/app-health/app/liveness").await, "200");
    assert_eq!(probe("/app-health/app/startup").await, "503", "nothing listens on 8081");
    // The proxy's view of the mesh is not for the cluster.
    assert_eq!(probe("/config_dump").await, "403");
    drop(proxies);
}
