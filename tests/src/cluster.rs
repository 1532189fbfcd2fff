//! A real Kubernetes for tests: etcd, kube-apiserver and kube-controller-manager built
//! from source at the versions `kube/go.mod` pins, started by `scripts/kube up`, with the
//! `kubectl` and `helm` built beside them.
//!
//! Tests that need it call [`skip`] first: the only way to skip them is an explicit
//! `WARY_SKIP_KUBE=1`, and a skipped test says so.

use std::io::{BufRead, BufReader};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::workspace_root;

/// True, after saying so on stderr, when `WARY_SKIP_KUBE=1` asks to skip the tests that
/// need a real API server.
pub fn skip(test: &str) -> bool {
    let skip = std::env::var("WARY_SKIP_KUBE").is_ok_and(|v| v == "1");
    if skip {
        eprintln!("{test}: skipped, WARY_SKIP_KUBE=1 (it needs a real Kubernetes API server)");
    }
    skip
}

/// The directory holding the Kubernetes binaries: `WARY_KUBE_BIN` (set by
/// `scripts/test` after `scripts/kube build`), else whatever `scripts/kube build`
/// prints (a cache hit after the first build).
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(dir) = std::env::var_os("WARY_KUBE_BIN") {
            return PathBuf::from(dir);
        }
        let out = Command::new(workspace_root().join("scripts/kube"))
            .arg("build")
            .stderr(Stdio::inherit())
            .output()
            .expect("run scripts/kube build");
        assert!(out.status.success(), "scripts/kube build failed");
        PathBuf::from(String::from_utf8(out.stdout).expect("a path").trim())
    })
}

/// The version `kube/go.mod` pins for `module`.
pub fn pinned(module: &str) -> String {
    let gomod = std::fs::read_to_string(workspace_root().join("kube/go.mod")).expect("kube/go.mod");
    gomod
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some(module)).then(|| words.next()).flatten()
        })
        .find(|v| v.starts_with('v'))
        .unwrap_or_else(|| panic!("kube/go.mod pins no {module}"))
        .to_string()
}

/// The Gateway API's standard CRDs (`config/crd/standard/*.yaml`) at the version
/// `kube/go.mod` pins, from the Go module cache (downloaded there if missing).
pub fn gateway_api_crds() -> Vec<PathBuf> {
    let out = Command::new("go")
        .current_dir(workspace_root().join("kube"))
        .args(["mod", "download", "-json", "sigs.k8s.io/gateway-api"])
        .output()
        .expect("run go mod download");
    assert!(
        out.status.success(),
        "go mod download sigs.k8s.io/gateway-api: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("go mod download -json");
    let dir = PathBuf::from(info["Dir"].as_str().expect("Dir")).join("config/crd/standard");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml") && !p.ends_with("kustomization.yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no CRDs in {}", dir.display());
    files
}

/// A running cluster (no kubelet: tests play it). Stopped, by PID, on drop.
pub struct Cluster {
    child: Child,
    /// The network namespace it runs in (see `node`); `None`: the host's.
    netns: Option<String>,
    stdin: Option<ChildStdin>,
    dir: PathBuf,
    kubeconfig: PathBuf,
    helm_home: PathBuf,
}

impl Cluster {
    /// Starts a cluster whose state lives in `dir`; its API server listens on
    /// `address` (127.0.0.1 when `None`). Returns once `/readyz` answers.
    pub fn start(dir: &Path) -> Cluster {
        Cluster::start_in(dir, None, None)
    }

    /// Starts a cluster in network namespace `netns` (the host's when `None`), its API
    /// server on `address` (127.0.0.1 when `None`).
    pub fn start_in(dir: &Path, netns: Option<&str>, address: Option<IpAddr>) -> Cluster {
        bin_dir();
        let started = Instant::now();
        let mut cmd = command(netns, &workspace_root().join("scripts/kube"));
        cmd.arg("up").arg(dir);
        if let Some(address) = address {
            cmd.arg(address.to_string());
        }
        // A process group of its own: etcd, the API server and the controller manager
        // can be stopped together if the script cannot stop them.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("run scripts/kube up");
        let stdin = child.stdin.take();
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read scripts/kube up");
        let kubeconfig = PathBuf::from(line.trim());
        let helm_home = dir.join("helm");
        let cluster = Cluster {
            child,
            netns: netns.map(str::to_string),
            stdin,
            dir: dir.to_path_buf(),
            kubeconfig,
            helm_home,
        };
        assert!(
            cluster.kubeconfig.is_file(),
            "scripts/kube up did not start a cluster:\n{}",
            cluster.logs()
        );
        eprintln!(
            "a Kubernetes API server answered in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        cluster
    }

    /// The API server's port (from the kubeconfig).
    pub fn api_port(&self) -> u16 {
        let config = std::fs::read_to_string(&self.kubeconfig).expect("kubeconfig");
        config
            .lines()
            .find_map(|l| l.trim().strip_prefix("server: https://"))
            .and_then(|hostport| hostport.rsplit(':').next()?.parse().ok())
            .expect("a server URL in the kubeconfig")
    }

    /// Stops the API server (etcd and the controller manager stay), as `scripts/kube`
    /// does on SIGUSR1 with `DIR/apiserver-hold`; every watch breaks.
    pub fn stop_api_server(&self) {
        std::fs::write(self.dir.join("apiserver-hold"), "").expect("hold file");
        self.signal("USR1");
        crate::node::wait_for("the API server to stop", Duration::from_secs(30), || {
            (std::fs::read_to_string(self.dir.join("apiserver-state")).ok()?.trim() == "stopped").then_some(())
        });
    }

    /// Starts the API server again (SIGUSR2) and waits until `/readyz` answers.
    pub fn start_api_server(&self) {
        let _ = std::fs::remove_file(self.dir.join("apiserver-hold"));
        self.signal("USR2");
        crate::node::wait_for("the API server to be ready again", Duration::from_secs(60), || {
            self.kubectl_with(&["get", "--raw", "/readyz"], "")
                .status
                .success()
                .then_some(())
        });
    }

    fn signal(&self, signal: &str) {
        let pid = std::fs::read_to_string(self.dir.join("pid")).expect("scripts/kube's pid");
        let status = Command::new("kill")
            .args([&format!("-{signal}"), pid.trim()])
            .status()
            .expect("kill");
        assert!(status.success(), "signal scripts/kube");
    }

    /// Compacts etcd's history up to its current revision (physically), through its
    /// JSON gateway, so no watch can resume from before now; returns that revision.
    pub fn compact_etcd(&self) -> u64 {
        let url = std::fs::read_to_string(self.dir.join("etcd-url")).expect("etcd-url");
        let url = url.trim();
        let post = |path: &str, body: &str| -> serde_json::Value {
            let out = command(self.netns.as_deref(), Path::new("curl"))
                .args([
                    "-sS",
                    "--max-time",
                    "10",
                    "-X",
                    "POST",
                    &format!("{url}{path}"),
                    "-d",
                    body,
                ])
                .output()
                .expect("curl etcd");
            assert!(
                out.status.success(),
                "etcd {path}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("etcd {path}: {e}"))
        };
        // Any key: the header carries the store's revision.
        let range = post("/v3/kv/range", r#"{"key": "Lw=="}"#);
        let revision: u64 = range["header"]["revision"]
            .as_str()
            .and_then(|r| r.parse().ok())
            .expect("a revision");
        let compacted = post(
            "/v3/kv/compaction",
            &format!(r#"{{"revision": "{revision}", "physical": true}}"#),
        );
        assert!(
            compacted.get("error").is_none() && compacted.get("code").is_none(),
            "compaction: {compacted}"
        );
        revision
    }

    /// The last lines of every component's log, for a failing test's message.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for name in ["kube-apiserver", "kube-controller-manager", "etcd"] {
            let log = std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            out.push_str(&format!("--- {name} (last 20 lines)\n"));
            for l in &lines[lines.len().saturating_sub(20)..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    /// Runs `kubectl ARGS` against this cluster, with `stdin` as its input.
    pub fn kubectl_with(&self, args: &[&str], stdin: &str) -> Output {
        run(
            command(self.netns.as_deref(), &bin_dir().join("kubectl"))
                .arg("--kubeconfig")
                .arg(&self.kubeconfig)
                .args(args),
            stdin,
        )
    }

    /// Runs `kubectl ARGS`; fails the test unless it succeeds; returns its stdout.
    pub fn kubectl(&self, args: &[&str]) -> String {
        ok(&format!("kubectl {}", args.join(" ")), self.kubectl_with(args, ""))
    }

    /// `kubectl get ... -o json`, parsed.
    pub fn get(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["get"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["-o", "json"]);
        serde_json::from_str(&self.kubectl(&all)).expect("kubectl get -o json")
    }

    /// `kubectl apply --server-side -f -` of `yaml` (strict field validation):
    /// its output, or its error.
    pub fn apply(&self, yaml: &str) -> Result<String, String> {
        let out = self.kubectl_with(
            &[
                "apply",
                "--server-side",
                "--field-manager=wary-test",
                "--validate=strict",
                "-f",
                "-",
            ],
            yaml,
        );
        result(out)
    }

    /// Runs the real `helm` CLI against this cluster (its caches in the cluster's
    /// directory): its output, or its error.
    pub fn helm(&self, args: &[&str]) -> Result<String, String> {
        let mut cmd = command(self.netns.as_deref(), &bin_dir().join("helm"));
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .env("HELM_CACHE_HOME", self.helm_home.join("cache"))
            .env("HELM_CONFIG_HOME", self.helm_home.join("config"))
            .env("HELM_DATA_HOME", self.helm_home.join("data"));
        result(run(&mut cmd, ""))
    }
}

impl Drop for Cluster {
    /// Closes `scripts/kube up`'s stdin, which stops the controller manager, the API
    /// server and etcd by PID, and waits for it (at most 40 s: each gets 10 s before
    /// SIGKILL), then kills whatever is left of its process group. (If the test process
    /// itself is killed, the closed stdin still stops them.)
    fn drop(&mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(40);
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.child.wait();
    }
}

/// `program`, in network namespace `netns` when given.
fn command(netns: Option<&str>, program: &Path) -> Command {
    match netns {
        Some(ns) => {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", ns]).arg(program);
            cmd
        }
        None => Command::new(program),
    }
}

fn run(cmd: &mut Command, stdin: &str) -> Output {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    let mut input = child.stdin.take().expect("stdin");
    input.write_all(stdin.as_bytes()).expect("write stdin");
    drop(input);
    child.wait_with_output().expect("wait")
}

/// Stdout (with stderr's warnings after it) on success, else stdout and stderr.
fn result(out: Output) -> Result<String, String> {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        Ok(stdout + &stderr)
    } else {
        Err(format!("{stdout}{stderr}"))
    }
}

fn ok(what: &str, out: Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{what} failed: {stderr}");
    String::from_utf8(out.stdout).expect("utf-8 output")
}
