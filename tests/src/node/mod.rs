//! A Kubernetes node played by the test: the CNI, the scheduler's binding and the
//! kubelet, around a real cluster ([`Cluster`]) that runs inside the node.
//!
//! ```text
//! node netns: lo (etcd, controller manager), bridge 10.244.0.1 (the API server)
//!   ├─ veth ─ pod netns 10.244.0.10: the pod's containers, as processes
//!   └─ veth ─ pod netns 10.244.0.11: ...
//! ```
//!
//! The test process stays in the host's namespaces and reaches the cluster through
//! `ip netns exec` (kubectl, helm); the host's network is never touched.
//!
//! Running a pod ([`Node::run_pod`]) does what a kubelet does with its spec: binds it
//! to the node, gives it a network namespace and an address, writes its volumes
//! (Secrets, ConfigMaps, emptyDirs, and projected service-account tokens from the real
//! TokenRequest API, bound to the pod), starts each container's process (the image
//! names a workspace binary) with its arguments, environment (values and field
//! references), mounts and user, waits for its readiness probes, and reports the pod
//! Running and Ready with its address. Service names resolve through each pod's
//! `/etc/netns/<pod>/hosts` (the cluster DNS's job); ClusterIPs are DNAT rules in the
//! node (`kube-proxy`'s job, [`Node::sync_services`]); the `kubernetes` Service
//! (10.96.0.1:443) leads to the API server.
//!
//! Mount points are made in a mount namespace of the container's own (`ip netns exec`
//! makes one), so they never show on the host; the empty directories they need
//! (e.g. `/etc/wary/webhook`) are created on the host if missing.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::cluster::Cluster;

mod kubelet;
pub use kubelet::RunningPod;

/// The node's address on its bridge, where the API server listens.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
/// The `kubernetes` Service's ClusterIP (the first of 10.96.0.0/16).
pub const KUBERNETES_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
/// How long a pod, a probe or a condition may take on a busy two-core machine.
pub const POD_DEADLINE: Duration = Duration::from_secs(60);

/// Runs `cmd`; its stdout on success, else a panic with its output.
pub fn sh(cmd: &[&str]) -> String {
    let out = Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (these tests need root and iproute2)"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls `poll` every 100 ms until it returns `Some`, for at most `deadline`.
pub fn wait_for<T>(what: &str, deadline: Duration, mut poll: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = poll() {
            return v;
        }
        assert!(Instant::now() < end, "timed out after {deadline:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A node: its network namespace with a bridge, and the pods it runs.
pub struct Node {
    pub netns: String,
    pods: Vec<RunningPod>,
    namespaces: Vec<String>,
    next_ip: u8,
}

impl Node {
    /// A node netns named `wary-node-<pid>-<tag>` with `lo` up and a bridge at
    /// [`NODE_IP`]/24.
    pub fn new(tag: &str) -> Node {
        sweep_stale_namespaces();
        let netns = format!("wary-node-{}-{tag}", std::process::id());
        let node = Node {
            netns: netns.clone(),
            pods: Vec::new(),
            namespaces: vec![netns.clone()],
            next_ip: 10,
        };
        sh(&["ip", "netns", "add", &netns]);
        sh(&["ip", "-n", &netns, "link", "set", "lo", "up"]);
        sh(&["ip", "-n", &netns, "link", "add", "br0", "type", "bridge"]);
        sh(&[
            "ip",
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{NODE_IP}/24"),
            "dev",
            "br0",
        ]);
        sh(&["ip", "-n", &netns, "link", "set", "br0", "up"]);
        sh(&[
            "ip",
            "netns",
            "exec",
            &netns,
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.ip_forward=1",
        ]);
        let out = node.exec_with(
            &["iptables-restore", "-w"],
            "*nat\n:WARY_TEST_SERVICES - [0:0]\n-A PREROUTING -j WARY_TEST_SERVICES\n-A OUTPUT -j WARY_TEST_SERVICES\n\
             -A POSTROUTING -m conntrack --ctstate DNAT -o br0 -j MASQUERADE\nCOMMIT\n",
        );
        assert!(
            out.status.success(),
            "node iptables: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        node
    }

    /// Starts a cluster inside this node, its API server on [`NODE_IP`], and creates
    /// the Node object (named after the netns) the pods are bound to.
    pub fn start_cluster(&self, dir: &Path) -> Cluster {
        let cluster = Cluster::start_in(dir, Some(&self.netns), Some(NODE_IP.into()));
        cluster
            .apply(&format!(
                "apiVersion: v1\nkind: Node\nmetadata:\n  name: {}\n  labels:\n    kubernetes.io/hostname: {0}\n",
                self.node_name()
            ))
            .unwrap_or_else(|e| panic!("create the Node: {e}\n{}", cluster.logs()));
        self.sync_services(&cluster);
        cluster
    }

    pub fn node_name(&self) -> &str {
        &self.netns
    }

    /// kube-proxy's part: DNAT rules in the node for every Service's ClusterIP and
    /// port, to its first ready endpoint (from its EndpointSlices), and masquerading, so
    /// replies come back through the node. The `kubernetes` Service leads to the API
    /// server. Call it again when endpoints change.
    pub fn sync_services(&self, cluster: &Cluster) {
        let mut rules = String::from("*nat\n:WARY_TEST_SERVICES - [0:0]\n");
        rules.push_str(&format!(
            "-A WARY_TEST_SERVICES -d {KUBERNETES_SERVICE_IP}/32 -p tcp --dport 443 -j DNAT --to-destination {NODE_IP}:{}\n",
            cluster.api_port()
        ));
        let slices = cluster.get(&["endpointslices", "-A"]);
        for svc in cluster.get(&["services", "-A"])["items"].as_array().unwrap() {
            let (ns, name) = (
                svc["metadata"]["namespace"].as_str().unwrap(),
                svc["metadata"]["name"].as_str().unwrap(),
            );
            let Some(cluster_ip) = svc["spec"]["clusterIP"].as_str().filter(|ip| ip.contains('.')) else {
                continue;
            };
            for port in svc["spec"]["ports"].as_array().into_iter().flatten() {
                let mut slices = slices["items"].as_array().unwrap().iter().filter(|s| {
                    s["metadata"]["namespace"] == ns && s["metadata"]["labels"]["kubernetes.io/service-name"] == name
                });
                let target = slices.find_map(|slice| {
                    // An unnamed port is "" in a slice and absent in its Service.
                    let named = |v: &Value| v.as_str().unwrap_or("").to_string();
                    let port = slice["ports"]
                        .as_array()?
                        .iter()
                        .find(|p| named(&p["name"]) == named(&port["name"]))?;
                    let ep = slice["endpoints"]
                        .as_array()?
                        .iter()
                        .find(|e| e["conditions"]["ready"] == true)?;
                    Some(format!("{}:{}", ep["addresses"][0].as_str()?, port["port"]))
                });
                if let Some(target) = target {
                    rules.push_str(&format!(
                        "-A WARY_TEST_SERVICES -d {cluster_ip}/32 -p tcp --dport {} -j DNAT --to-destination {target}\n",
                        port["port"]
                    ));
                }
            }
        }
        rules.push_str("COMMIT\n");
        let out = self.exec_with(&["iptables-restore", "--noflush", "-w"], &rules);
        assert!(
            out.status.success(),
            "iptables-restore: {}\n{rules}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The pods this node runs.
    pub fn pods(&mut self) -> &mut [RunningPod] {
        &mut self.pods
    }

    /// Runs `cmd` in this node's network namespace (e.g. `curl` to a pod).
    pub fn exec(&self, cmd: &[&str]) -> std::process::Output {
        self.exec_with(cmd, "")
    }

    fn exec_with(&self, cmd: &[&str], stdin: &str) -> std::process::Output {
        use std::io::Write;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.netns])
            .args(cmd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("ip netns exec");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(stdin.as_bytes())
            .expect("write stdin");
        child.wait_with_output().expect("wait")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.pods.clear();
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "delete", ns]).status();
            let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(ns));
        }
    }
}

/// Deletes the namespaces (and their `/etc/netns` entries) of test processes that are
/// gone: a test killed by a timeout never runs its `Drop`.
fn sweep_stale_namespaces() {
    for entry in std::fs::read_dir("/run/netns").into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("wary-node-").and_then(|r| r.split('-').next()) else {
            continue;
        };
        if Path::new("/proc").join(pid).exists() {
            continue;
        }
        let _ = Command::new("ip").args(["netns", "delete", &name]).status();
        let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(&name));
    }
}

/// `/etc/hosts` for a pod in `namespace`: every Service with a ClusterIP by its
/// `name.namespace.svc[.cluster.local]` names (and `name` in the pod's namespace).
fn hosts(cluster: &Cluster, namespace: &str) -> String {
    let mut out = String::from("127.0.0.1 localhost\n");
    for svc in cluster.get(&["services", "-A"])["items"].as_array().unwrap() {
        let (ns, name) = (
            svc["metadata"]["namespace"].as_str().unwrap(),
            svc["metadata"]["name"].as_str().unwrap(),
        );
        if let Some(ip) = svc["spec"]["clusterIP"].as_str().filter(|ip| ip.contains('.')) {
            let short = if ns == namespace {
                format!(" {name}")
            } else {
                String::new()
            };
            out.push_str(&format!(
                "{ip} {name}.{ns}.svc {name}.{ns}.svc.cluster.local {name}.{ns}{short}\n"
            ));
        }
    }
    out
}
