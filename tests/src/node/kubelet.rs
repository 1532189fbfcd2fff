//! The kubelet's part of [`super::Node`]: running a pod's containers from its spec,
//! its volumes, environment, mounts, user and probes, and reporting its status.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{KUBERNETES_SERVICE_IP, NODE_IP, Node, POD_DEADLINE, hosts, sh, wait_for};
use crate::cluster::Cluster;

/// A pod the node runs: its network namespace and its containers' processes.
pub struct RunningPod {
    pub namespace: String,
    pub name: String,
    pub ip: Ipv4Addr,
    pub netns: String,
    /// Each container's name, process, and whether it is a native sidecar.
    processes: Vec<(String, Child, bool)>,
    /// Where its volumes live (removed with the test's directory).
    pub root: PathBuf,
}

impl RunningPod {
    /// Stops the pod's processes (SIGKILL), as a crashed or deleted pod.
    pub fn kill(&mut self) {
        for (_, child, _) in &mut self.processes {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Where container `name`'s stdout and stderr go.
    pub fn log_path(&self, name: &str) -> PathBuf {
        let dir = self.root.join("logs");
        std::fs::create_dir_all(&dir).expect("logs dir");
        dir.join(format!("{name}.log"))
    }

    /// What container `name` has written so far.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.log_path(name)).unwrap_or_default()
    }

    /// Runs `cmd` in the pod's network namespace, as root, with its `/etc/hosts`.
    pub fn exec(&self, cmd: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.netns])
            .args(cmd)
            .output()
            .expect("ip netns exec")
    }
}

impl Drop for RunningPod {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Node {
    /// The pod `namespace/name` as the kubelet would run it (see the module docs);
    /// returns once it is Running, its readiness probes pass and its status says so.
    pub fn run_pod(&mut self, cluster: &Cluster, namespace: &str, name: &str, root: &Path) -> &mut RunningPod {
        let ip = Ipv4Addr::new(10, 244, 0, self.next_ip);
        self.next_ip += 1;
        let netns = format!("{}-p{}", self.netns, ip.octets()[3]);
        self.namespaces.push(netns.clone());
        sh(&["ip", "netns", "add", &netns]);
        sh(&["ip", "-n", &netns, "link", "set", "lo", "up"]);
        let veth = format!("veth{}", ip.octets()[3]);
        sh(&[
            "ip",
            "-n",
            &self.netns,
            "link",
            "add",
            &veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &netns,
        ]);
        sh(&["ip", "-n", &self.netns, "link", "set", &veth, "master", "br0", "up"]);
        sh(&["ip", "-n", &netns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        sh(&["ip", "-n", &netns, "link", "set", "eth0", "up"]);
        sh(&[
            "ip",
            "-n",
            &netns,
            "route",
            "add",
            "default",
            "via",
            &NODE_IP.to_string(),
        ]);
        // The cluster DNS's part: every Service's name, as of now.
        let hosts_dir = PathBuf::from("/etc/netns").join(&netns);
        std::fs::create_dir_all(&hosts_dir).expect("/etc/netns/<pod>");
        std::fs::write(hosts_dir.join("hosts"), hosts(cluster, namespace)).expect("write the pod's hosts");

        // The scheduler's part.
        let binding = json!({"apiVersion": "v1", "kind": "Binding",
                             "metadata": {"name": name, "namespace": namespace},
                             "target": {"apiVersion": "v1", "kind": "Node", "name": self.node_name()}});
        let bound = cluster.kubectl_with(&["create", "-f", "-"], &binding.to_string());
        assert!(
            bound.status.success(),
            "bind {namespace}/{name}: {}",
            String::from_utf8_lossy(&bound.stderr)
        );

        let pod = cluster.get(&["pod", name, "-n", namespace]);
        let root = root.join(format!("{namespace}-{name}"));
        std::fs::create_dir_all(&root).expect("pod dir");
        let volumes = write_volumes(cluster, &pod, &root);
        let mut running = RunningPod {
            namespace: namespace.into(),
            name: name.into(),
            ip,
            netns: netns.clone(),
            processes: Vec::new(),
            root,
        };
        let spec = &pod["spec"];
        // As a kubelet does once the sandbox has its network: the pod is Pending, with
        // its address, while its init containers (the proxy among them) start.
        let pending = json!({"status": {
            "phase": "Pending",
            "hostIP": NODE_IP.to_string(), "hostIPs": [{"ip": NODE_IP.to_string()}],
            "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}],
            "conditions": [{"type": "PodScheduled", "status": "True"}],
        }});
        patch_status(cluster, namespace, name, &pending);
        // Init containers in order: each runs to completion, except native sidecars
        // (restartPolicy: Always), which start and stay.
        for c in spec["initContainers"].as_array().into_iter().flatten() {
            let log = running.log_path(c["name"].as_str().unwrap());
            let mut child = start_container(&pod, c, &volumes, &netns, ip, &log);
            if c["restartPolicy"] == "Always" {
                running
                    .processes
                    .push((c["name"].as_str().unwrap().into(), child, true));
                wait_ready(&self.netns, c, ip, &log);
            } else {
                let what = format!("init container {} of {namespace}/{name} to finish", c["name"]);
                let status = wait_for(&what, POD_DEADLINE, || child.try_wait().expect("wait"));
                assert!(
                    status.success(),
                    "init container {} of {namespace}/{name} failed: {status}\n{}",
                    c["name"],
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
        }
        for c in spec["containers"].as_array().expect("containers") {
            let log = running.log_path(c["name"].as_str().unwrap());
            let child = start_container(&pod, c, &volumes, &netns, ip, &log);
            running
                .processes
                .push((c["name"].as_str().unwrap().into(), child, false));
        }
        for c in spec["containers"].as_array().expect("containers") {
            wait_ready(&self.netns, c, ip, &running.log_path(c["name"].as_str().unwrap()));
        }
        let now = "2026-01-01T00:00:00Z";
        let condition = |t: &str| json!({"type": t, "status": "True", "lastTransitionTime": now});
        let container_status = |c: &Value| {
            json!({"name": c["name"], "image": c["image"], "imageID": "", "ready": true, "started": true,
                   "restartCount": 0, "state": {"running": {"startedAt": now}}})
        };
        let conditions = ["PodScheduled", "Initialized", "ContainersReady", "Ready"].map(condition);
        let status = json!({"status": {
            "phase": "Running",
            "hostIP": NODE_IP.to_string(), "hostIPs": [{"ip": NODE_IP.to_string()}],
            "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}],
            "startTime": now,
            "conditions": conditions,
            "containerStatuses": spec["containers"].as_array().unwrap().iter().map(container_status).collect::<Vec<_>>(),
            "initContainerStatuses": spec["initContainers"].as_array().into_iter().flatten().map(container_status).collect::<Vec<_>>(),
        }});
        patch_status(cluster, namespace, name, &status);
        self.pods.push(running);
        self.pods.last_mut().unwrap()
    }

    /// Runs pod `index` to its end, as a kubelet does for `restartPolicy: Never`: waits
    /// for its containers to exit, then stops its native sidecars (SIGTERM, in reverse
    /// order, SIGKILL after 30 s), and reports the pod `Succeeded` (every container
    /// exited 0) or `Failed`, with each container's exit code. Returns the phase and
    /// every container's exit code (143: a sidecar that ended on SIGTERM).
    pub fn finish_pod(&mut self, cluster: &Cluster, index: usize) -> (String, BTreeMap<String, i32>) {
        let pod = &mut self.pods[index];
        let mut exits: BTreeMap<String, i32> = BTreeMap::new();
        let (sidecars, containers): (Vec<_>, Vec<_>) = pod.processes.iter_mut().partition(|(_, _, sidecar)| *sidecar);
        for (name, child, _) in containers {
            let status = wait_for(&format!("container {name} to exit"), POD_DEADLINE, || {
                child.try_wait().ok().flatten()
            });
            exits.insert(name.clone(), status.code().unwrap_or(137));
        }
        for (name, child, _) in sidecars.into_iter().rev() {
            let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
            let end = Instant::now() + Duration::from_secs(30);
            let status = loop {
                if let Ok(Some(status)) = child.try_wait() {
                    break status;
                }
                if Instant::now() > end {
                    let _ = child.kill();
                    break child.wait().expect("wait");
                }
                std::thread::sleep(Duration::from_millis(50));
            };
            // As a kubelet reports a sidecar it stopped: terminated by SIGTERM is 143.
            exits.insert(
                name.clone(),
                status.code().unwrap_or(128 + status.signal().unwrap_or(9)),
            );
        }
        let spec = cluster.get(&["pod", &pod.name, "-n", &pod.namespace]);
        let regular: Vec<String> = spec["spec"]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap().to_string())
            .collect();
        let phase = if regular.iter().all(|c| exits.get(c) == Some(&0)) {
            "Succeeded"
        } else {
            "Failed"
        };
        let now = "2026-01-01T00:00:01Z";
        let terminated = |c: &Value| {
            let code = exits.get(c["name"].as_str().unwrap()).copied().unwrap_or(0);
            json!({"name": c["name"], "image": c["image"], "imageID": "", "ready": false, "started": false,
                   "restartCount": 0,
                   "state": {"terminated": {"exitCode": code, "reason": if code == 0 { "Completed" } else { "Error" },
                                            "startedAt": "2026-01-01T00:00:00Z", "finishedAt": now}}})
        };
        let not_ready =
            |t: &str| json!({"type": t, "status": "False", "reason": "PodCompleted", "lastTransitionTime": now});
        let status = json!({"status": {
            "phase": phase,
            "conditions": [not_ready("Ready"), not_ready("ContainersReady")],
            "containerStatuses": spec["spec"]["containers"].as_array().unwrap().iter().map(terminated).collect::<Vec<_>>(),
            "initContainerStatuses": spec["spec"]["initContainers"].as_array().into_iter().flatten().map(terminated).collect::<Vec<_>>(),
        }});
        patch_status(cluster, &pod.namespace, &pod.name, &status);
        (phase.to_string(), exits)
    }
}

/// Patches pod `namespace/name`'s status (`{"status": ...}`, merged), as a kubelet
/// reports it.
fn patch_status(cluster: &Cluster, namespace: &str, name: &str, status: &Value) {
    let patch = status.to_string();
    cluster.kubectl(&[
        "patch",
        "pod",
        name,
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        &patch,
    ]);
}

/// A container's image as the workspace binary it names (`.../wary-proxy:<tag>` is
/// `wary-proxy`), the tests' stand-in for pulling it.
fn image_binary(image: &str) -> PathBuf {
    let name = image.rsplit('/').next().unwrap_or(image);
    let name = name.split(['@', ':']).next().unwrap_or(name);
    crate::binary(name)
}

/// Writes each volume of `pod` under `root/volumes/<name>`: name → directory.
fn write_volumes(cluster: &Cluster, pod: &Value, root: &Path) -> BTreeMap<String, PathBuf> {
    let namespace = pod["metadata"]["namespace"].as_str().unwrap();
    let mut out = BTreeMap::new();
    for v in pod["spec"]["volumes"].as_array().into_iter().flatten() {
        let name = v["name"].as_str().unwrap();
        let dir = root.join("volumes").join(name);
        std::fs::create_dir_all(&dir).expect("volume dir");
        let mut files: Vec<(String, Vec<u8>)> = Vec::new();
        if let Some(secret) = v["secret"]["secretName"].as_str() {
            let s = cluster.get(&["secret", secret, "-n", namespace]);
            for (k, b64) in s["data"].as_object().into_iter().flatten() {
                files.push((k.clone(), decode(b64.as_str().unwrap())));
            }
        }
        if let Some(cm) = v["configMap"]["name"].as_str() {
            files.extend(config_map(cluster, namespace, cm, &v["configMap"]["items"]));
        }
        for source in v["projected"]["sources"].as_array().into_iter().flatten() {
            if let Some(token) = source.get("serviceAccountToken") {
                files.push((
                    token["path"].as_str().unwrap().into(),
                    service_account_token(cluster, pod, token).into(),
                ));
            }
            if let Some(cm) = source.get("configMap") {
                files.extend(config_map(
                    cluster,
                    namespace,
                    cm["name"].as_str().unwrap(),
                    &cm["items"],
                ));
            }
            for item in source["downwardAPI"]["items"].as_array().into_iter().flatten() {
                let value = field(pod, item["fieldRef"]["fieldPath"].as_str().unwrap(), None);
                files.push((item["path"].as_str().unwrap().into(), value.into()));
            }
        }
        for (path, bytes) in files {
            let file = dir.join(path);
            std::fs::create_dir_all(file.parent().unwrap()).expect("volume subdir");
            std::fs::write(&file, bytes).expect("write a volume file");
        }
        // Readable by any container user (Secrets' defaultMode 0644); emptyDirs writable.
        sh(&["chmod", "-R", "a+rX", dir.to_str().unwrap()]);
        if v.get("emptyDir").is_some() {
            sh(&["chmod", "1777", dir.to_str().unwrap()]);
        }
        out.insert(name.to_string(), dir);
    }
    out
}

fn decode(b64: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(b64).expect("base64")
}

fn config_map(cluster: &Cluster, namespace: &str, name: &str, items: &Value) -> Vec<(String, Vec<u8>)> {
    let cm = wait_for(&format!("ConfigMap {namespace}/{name}"), POD_DEADLINE, || {
        let out = cluster.kubectl_with(&["get", "configmap", name, "-n", namespace, "-o", "json"], "");
        out.status
            .success()
            .then(|| serde_json::from_slice::<Value>(&out.stdout).expect("json"))
    });
    let data = cm["data"].as_object().cloned().unwrap_or_default();
    match items.as_array() {
        Some(items) => items
            .iter()
            .map(|i| {
                (
                    i["path"].as_str().unwrap().into(),
                    data[i["key"].as_str().unwrap()].as_str().unwrap().into(),
                )
            })
            .collect(),
        None => data
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().into()))
            .collect(),
    }
}

/// A token for the pod's service account from the TokenRequest API, bound to the pod.
fn service_account_token(cluster: &Cluster, pod: &Value, source: &Value) -> String {
    let meta = &pod["metadata"];
    let sa = pod["spec"]["serviceAccountName"].as_str().unwrap_or("default");
    let mut args = vec![
        "create".to_string(),
        "token".into(),
        sa.into(),
        "-n".into(),
        meta["namespace"].as_str().unwrap().into(),
        "--bound-object-kind=Pod".into(),
        format!("--bound-object-name={}", meta["name"].as_str().unwrap()),
        format!("--bound-object-uid={}", meta["uid"].as_str().unwrap()),
        format!("--duration={}s", source["expirationSeconds"].as_u64().unwrap_or(3600)),
    ];
    if let Some(audience) = source["audience"].as_str() {
        args.push(format!("--audience={audience}"));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    cluster.kubectl(&args).trim().to_string()
}

/// The value of a downward-API field reference.
fn field(pod: &Value, path: &str, ip: Option<Ipv4Addr>) -> String {
    match path {
        "metadata.name" => pod["metadata"]["name"].as_str().unwrap().into(),
        "metadata.namespace" => pod["metadata"]["namespace"].as_str().unwrap().into(),
        "metadata.uid" => pod["metadata"]["uid"].as_str().unwrap().into(),
        "spec.serviceAccountName" => pod["spec"]["serviceAccountName"].as_str().unwrap_or("default").into(),
        "spec.nodeName" => pod["spec"]["nodeName"].as_str().unwrap_or_default().into(),
        "status.podIP" | "status.podIPs" => ip.expect("the pod's IP").to_string(),
        "status.hostIP" | "status.hostIPs" => NODE_IP.to_string(),
        other => panic!("the test kubelet does not know field {other}"),
    }
}

/// Starts container `c` of `pod` in `netns`: its mounts in a mount namespace of its
/// own, as its `runAsUser` (container's, else the pod's), its image's binary with
/// `command`/`args`.
fn start_container(
    pod: &Value,
    c: &Value,
    volumes: &BTreeMap<String, PathBuf>,
    netns: &str,
    ip: Ipv4Addr,
    log: &Path,
) -> Child {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("container log");
    let name = c["name"].as_str().unwrap();
    for unsupported in ["envFrom", "workingDir", "lifecycle"] {
        assert!(
            c.get(unsupported).is_none(),
            "the test kubelet does not support {unsupported} (container {name})"
        );
    }
    // The image's binary (or the one a command names by its in-image path), reached
    // through /mnt/bin: the container's own mounts (an emptyDir at /tmp) could hide
    // the build directory it lives in.
    let mut argv: Vec<String> = match c["command"].as_array() {
        Some(cmd) => cmd.iter().map(|a| a.as_str().unwrap().to_string()).collect(),
        None => vec![c["image"].as_str().unwrap().to_string()],
    };
    let binary = image_binary(&argv[0]);
    let (bin_dir, bin_name) = (binary.parent().unwrap(), binary.file_name().unwrap().to_str().unwrap());
    argv[0] = format!("/mnt/bin/{bin_name}");
    argv.extend(
        c["args"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|a| a.as_str().unwrap().to_string()),
    );

    let mut env: Vec<(String, String)> = vec![
        ("KUBERNETES_SERVICE_HOST".into(), KUBERNETES_SERVICE_IP.to_string()),
        ("KUBERNETES_SERVICE_PORT".into(), "443".into()),
        ("HOSTNAME".into(), pod["metadata"]["name"].as_str().unwrap().into()),
        ("PATH".into(), std::env::var("PATH").unwrap_or_default()),
    ];
    for e in c["env"].as_array().into_iter().flatten() {
        let value = match (e["value"].as_str(), e["valueFrom"]["fieldRef"]["fieldPath"].as_str()) {
            (Some(v), _) => expand(v, &env),
            (None, Some(path)) => field(pod, path, Some(ip)),
            (None, None) if e.get("valueFrom").is_none() => String::new(),
            (None, None) => panic!(
                "the test kubelet does not support {} (container {name})",
                e["valueFrom"]
            ),
        };
        env.push((e["name"].as_str().unwrap().into(), value));
    }
    for arg in argv.iter_mut().skip(1) {
        *arg = expand(arg, &env);
    }

    let mut script = format!(
        "set -e\nmount -t tmpfs wary-test-bin /mnt\nmkdir /mnt/bin\nmount --bind '{}' /mnt/bin\n",
        bin_dir.display()
    );
    // A mount over a directory that holds volumes (an emptyDir at /tmp, where the test's
    // directory is) goes last, or it would hide the others' sources.
    let mut mounts: Vec<&Value> = c["volumeMounts"].as_array().into_iter().flatten().collect();
    mounts.sort_by_key(|m| {
        let target = Path::new(m["mountPath"].as_str().unwrap());
        volumes.values().any(|source| source.starts_with(target))
    });
    for m in mounts {
        assert!(
            m.get("subPath").is_none(),
            "the test kubelet does not support subPath (container {name})"
        );
        let source = &volumes[m["name"].as_str().unwrap()];
        let target = m["mountPath"].as_str().unwrap();
        script.push_str(&format!(
            "mkdir -p '{target}'\nmount --bind '{}' '{target}'\n",
            source.display()
        ));
        if m["readOnly"] == true {
            script.push_str(&format!("mount -o remount,bind,ro '{target}'\n"));
        }
    }
    let security = |field: &str| {
        c["securityContext"][field]
            .as_u64()
            .or(pod["spec"]["securityContext"][field].as_u64())
    };
    script.push_str("exec ");
    if let Some(uid) = security("runAsUser") {
        let gid = security("runAsGroup").unwrap_or(uid);
        script.push_str(&format!("setpriv --reuid {uid} --regid {gid} --clear-groups -- "));
    }
    script.push_str("\"$@\"\n");
    Command::new("ip")
        .args(["netns", "exec", netns, "sh", "-c", &script, name])
        .args(&argv)
        .env_clear()
        .envs(env)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("log"))
        .stderr(out)
        .spawn()
        .unwrap_or_else(|e| panic!("start container {name}: {e}"))
}

/// `$(NAME)` in `value` replaced by the variable defined before it, as the kubelet
/// expands `env` values, `command` and `args`; `$$` is a `$`; an unknown name stays.
fn expand(value: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        if let Some(after) = rest.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some((name, after)) = rest.strip_prefix("$(").and_then(|r| r.split_once(')'))
            && let Some((_, v)) = env.iter().rev().find(|(n, _)| n == name)
        {
            out.push_str(v);
            rest = after;
        } else {
            out.push('$');
            rest = &rest[1..];
        }
    }
    out.push_str(rest);
    out
}

/// Waits until container `c`'s startup and readiness probes (HTTP GET, or TCP) pass,
/// from the node as the kubelet probes; at once when it has none.
fn wait_ready(node_netns: &str, c: &Value, ip: Ipv4Addr, log: &Path) {
    let waited = std::panic::catch_unwind(|| {
        for probe in ["startupProbe", "readinessProbe"] {
            wait_probe(node_netns, c, &c[probe], ip);
        }
    });
    if let Err(e) = waited {
        let log = std::fs::read_to_string(log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        let why = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        panic!("{why}\nits log ends:\n{}", tail.join("\n"));
    }
}

fn wait_probe(node_netns: &str, c: &Value, probe: &Value, ip: Ipv4Addr) {
    let port = |p: &Value| -> u16 {
        match p {
            Value::Number(n) => n.as_u64().unwrap() as u16,
            Value::String(name) => c["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|cp| cp["name"] == name.as_str())
                .and_then(|cp| cp["containerPort"].as_u64())
                .unwrap_or_else(|| panic!("no port named {name} in {}", c["name"]))
                as u16,
            _ => panic!("a probe port must be a number or a name"),
        }
    };
    if let Some(get) = probe.get("httpGet") {
        let url = format!(
            "http://{ip}:{}{}",
            port(&get["port"]),
            get["path"].as_str().unwrap_or("/")
        );
        wait_for(
            &format!("container {}'s readiness ({url})", c["name"]),
            POD_DEADLINE,
            || {
                let out = Command::new("ip")
                    .args([
                        "netns",
                        "exec",
                        node_netns,
                        "curl",
                        "-s",
                        "-o",
                        "/dev/null",
                        "-w",
                        "%{http_code}",
                        "--max-time",
                        "2",
                        &url,
                    ])
                    .output()
                    .ok()?;
                let code: u16 = String::from_utf8_lossy(&out.stdout).parse().ok()?;
                (200..400).contains(&code).then_some(())
            },
        );
    } else if let Some(tcp) = probe.get("tcpSocket") {
        let target = format!("{ip}:{}", port(&tcp["port"]));
        wait_for(
            &format!("container {}'s readiness ({target})", c["name"]),
            POD_DEADLINE,
            || {
                Command::new("ip")
                    .args([
                        "netns",
                        "exec",
                        node_netns,
                        "bash",
                        "-c",
                        &format!("exec 3<>/dev/tcp/{}/{}", ip, port(&tcp["port"])),
                    ])
                    .status()
                    .ok()?
                    .success()
                    .then_some(())
            },
        );
    }
}
