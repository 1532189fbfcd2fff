//! A small harness for end-to-end tests: real `wary-control-plane` and `wary-proxy`
//! processes on loopback, a real discovery client, and `curl` for admin pages.
//!
//! ```ignore
//! let mesh = MeshDir::new();
//! mesh.write("orders.yaml", &service("orders", 80));
//! let cp = ControlPlane::start(&mesh).await;
//! let client = Client::connect(&cp, "test-proxy");
//! client.wait_for("orders is known", |s| s.service("orders.default").is_some()).await;
//! ```
//!
//! Every wait is on a condition with a generous deadline ([`DEADLINE`]); nothing sleeps
//! for a fixed time.

pub mod cluster;
pub mod kube_api;
pub mod node;
pub mod upstream;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::Notify;
use wary_certs::credentials::{Credentials, TrustBundle};
use wary_proto::discovery::Node;
use wary_proxy::discovery::{DiscoveryConfig, ExtraCheck};
use wary_proxy::state::{Cache, DiscoveryState};

/// How long any condition may take before a test fails: generous, because this runs
/// on busy two-core machines. Tight timing belongs in `benches/`.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// Builds the workspace binaries once per test process, so tests never run stale ones.
fn ensure_built() {
    static BUILD: Once = Once::new();
    BUILD.call_once(|| {
        // scripts/test builds the binaries once before the run.
        if std::env::var_os("WARY_TEST_SKIP_BUILD").is_some() {
            return;
        }
        let root = workspace_root();
        let mut cmd = std::process::Command::new(env!("CARGO"));
        // `--workspace`, as scripts/test builds: the same feature set, so no rebuild.
        cmd.current_dir(&root)
            .args(["build", "--quiet", "--workspace", "--bins"]);
        if profile_dir().ends_with("release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build for the binaries");
        assert!(status.success(), "cargo build of the wary binaries failed");
    });
}

/// The workspace's root directory (where `Cargo.toml`, `charts/` and `scripts/` are).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// `target/<profile>`: the test executable lives in `target/<profile>/deps`.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .to_path_buf()
}

/// The path of a workspace binary, built if needed.
pub fn binary(name: &str) -> PathBuf {
    ensure_built();
    let path = profile_dir().join(name);
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// The Python with helm-python-sdk and kubernetes-validate (the chart tests):
/// `WARY_TEST_PYTHON`, which `scripts/test` sets after installing them in
/// `target/pyenv`, else that venv's.
pub fn python() -> PathBuf {
    let path = std::env::var_os("WARY_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/pyenv/bin/python"));
    assert!(
        path.exists(),
        "{} is missing: run scripts/test, which installs helm-python-sdk and kubernetes-validate there",
        path.display()
    );
    path
}

/// Renders and lints `charts/wary` with the real Helm library and validates every
/// manifest it renders, and `manifests`, with `kubernetes-validate --strict` against
/// Kubernetes 1.29 and the newest version it knows (`tests/chart/check.py`). Returns
/// its report; fails the test with it on any problem.
pub fn check_chart(manifests: &[&Path]) -> String {
    let root = workspace_root();
    let out = std::process::Command::new(python())
        .arg(root.join("tests/chart/check.py"))
        .arg(root.join("charts/wary"))
        .args(manifests)
        .output()
        .expect("run tests/chart/check.py");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "the chart or a manifest does not validate:\n{report}"
    );
    report
}

/// A size field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`), bytes; 0 when unreadable.
pub fn proc_status_bytes(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// User + system CPU time of a process so far, seconds (`/proc/<pid>/stat` fields 14
/// and 15, in clock ticks of 1/100 s); 0 when unreadable.
pub fn proc_cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at field 3.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// Log lines of a child process, shared with the task that reads them.
#[derive(Clone, Default)]
pub struct Logs {
    lines: Arc<Mutex<Vec<String>>>,
    added: Arc<Notify>,
}

impl Logs {
    fn follow(&self, name: String, stream: impl tokio::io::AsyncRead + Unpin + Send + 'static) {
        let logs = self.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stream).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("[{name}] {line}");
                logs.lines.lock().unwrap().push(line);
                logs.added.notify_waiters();
            }
        });
    }

    fn follow_lines(&self, name: String, mut lines: StdoutLines) {
        let logs = self.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("[{name}] {line}");
                logs.lines.lock().unwrap().push(line);
                logs.added.notify_waiters();
            }
        });
    }

    /// Every line so far.
    pub fn all(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits until a line contains every one of `needles`, and returns it.
    pub async fn wait_for(&self, needles: &[&str]) -> String {
        let found = || {
            self.lines
                .lock()
                .unwrap()
                .iter()
                .find(|l| needles.iter().all(|n| l.contains(n)))
                .cloned()
        };
        let wait = async {
            loop {
                let added = self.added.notified();
                if let Some(line) = found() {
                    return line;
                }
                added.await;
            }
        };
        tokio::time::timeout(DEADLINE, wait)
            .await
            .unwrap_or_else(|_| panic!("no log line with {needles:?} within {DEADLINE:?}"))
    }
}

/// A running `wary-control-plane`, killed on drop.
pub struct ControlPlane {
    child: Child,
    /// The discovery server's address.
    pub discovery: SocketAddr,
    /// The admin server's address.
    pub admin: SocketAddr,
    /// The trust bundle file proxies are given.
    pub trust_anchors: PathBuf,
    /// The CA directory.
    pub ca_dir: PathBuf,
    /// The admission webhook's address, when started with `--webhook-addr`.
    pub webhook: Option<SocketAddr>,
    /// Its stderr (logs), line by line.
    pub logs: Logs,
}

impl ControlPlane {
    /// Starts a control plane on `mesh`, on free ports.
    pub async fn start(mesh: &MeshDir) -> Self {
        Self::start_at(mesh, "127.0.0.1:0".parse().unwrap()).await
    }

    /// Starts a control plane on `mesh` with its discovery server on `discovery`.
    pub async fn start_at(mesh: &MeshDir, discovery: SocketAddr) -> Self {
        Self::start_logging(mesh, discovery, "info,wary_control_plane=debug").await
    }

    /// As [`ControlPlane::start_at`], logging at `rust_log` (benchmarks use `warn`).
    pub async fn start_logging(mesh: &MeshDir, discovery: SocketAddr, rust_log: &str) -> Self {
        Self::start_with_args(mesh, discovery, rust_log, &[]).await
    }

    /// As [`ControlPlane::start_logging`], with more command-line arguments.
    pub async fn start_with_args(mesh: &MeshDir, discovery: SocketAddr, rust_log: &str, args: &[&str]) -> Self {
        let mut cmd = Command::new(binary("wary-control-plane"));
        cmd.args(args)
            .arg("--config-dir")
            .arg(mesh.path())
            .arg("--ca-dir")
            .arg(mesh.ca_path())
            .args(["--discovery-addr", &discovery.to_string()]);
        Self::spawn(cmd, rust_log).await
    }

    /// Starts a control plane reading the cluster `kubeconfig` points at
    /// (`--kubernetes`), in namespace `wary-system`, its CA in that namespace's Secret.
    pub async fn start_kubernetes(kubeconfig: &Path) -> Self {
        let mut cmd = Command::new(binary("wary-control-plane"));
        cmd.args(["--kubernetes", "--discovery-addr", "127.0.0.1:0", "--debounce-ms", "20"])
            .env("KUBECONFIG", kubeconfig)
            .env("WARY_NAMESPACE", "wary-system");
        Self::spawn(cmd, "info,wary_control_plane=debug").await
    }

    async fn spawn(mut cmd: Command, rust_log: &str) -> Self {
        let mut child = cmd
            .args(["--admin-addr", "127.0.0.1:0"])
            .env("RUST_LOG", rust_log)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start wary-control-plane");
        let logs = Logs::default();
        logs.follow("control-plane".into(), child.stderr.take().unwrap());
        let line = first_line(&mut child).await;
        let trust_anchors: PathBuf = field(&line, "trust_anchors=");
        Self {
            discovery: field(&line, "discovery="),
            admin: field(&line, "admin="),
            ca_dir: trust_anchors.parent().expect("the CA directory").to_path_buf(),
            trust_anchors,
            webhook: line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("webhook="))
                .map(|a| a.parse().expect("the webhook's address")),
            child,
            logs,
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("the control plane is running")
    }

    /// `https://<discovery address>`.
    pub fn discovery_url(&self) -> String {
        format!("https://{}", self.discovery)
    }

    /// How a proxy reaches this control plane (with the default identity).
    pub fn control_plane(&self) -> wary_proxy::control::ControlPlane {
        let identity = "spiffe://cluster.local/ns/wary-system/sa/wary-control-plane"
            .parse()
            .unwrap();
        wary_proxy::control::ControlPlane::new(self.discovery_url(), identity)
    }

    /// Credentials that trust this control plane's bundle and hold no certificate yet.
    pub fn bootstrap_credentials(&self) -> Arc<Credentials> {
        let pem = std::fs::read_to_string(&self.trust_anchors).expect("read the trust bundle");
        Credentials::new(TrustBundle::from_pem(&pem).expect("a trust bundle")).expect("credentials")
    }

    /// Credentials holding a mesh certificate for service account `sa` in `default`,
    /// signed directly with this control plane's CA (as the Identity service would for a
    /// workload running as `sa`).
    pub fn mesh_credentials(&self, sa: &str) -> Arc<Credentials> {
        let read = |f: &str| std::fs::read_to_string(self.ca_dir.join(f)).expect("read the CA");
        let issuer_pem = read("issuer.pem");
        let ca = wary_certs::ca::MeshCa::from_pem(&issuer_pem, &read("issuer-key.pem")).expect("the CA");
        let id: wary_certs::SpiffeId = format!("spiffe://cluster.local/ns/default/sa/{sa}").parse().unwrap();
        let key = wary_certs::credentials::WorkloadKey::generate().unwrap();
        let leaf = ca
            .sign(&key.csr(&id).unwrap(), &id, Duration::from_secs(3600))
            .expect("sign");
        let chain = std::iter::once(leaf)
            .chain(wary_certs::certificates_from_pem(&issuer_pem).expect("issuer certificate"))
            .collect();
        let creds = self.bootstrap_credentials();
        creds
            .set_certificate(chain, &key, Some(&id))
            .expect("a mesh certificate");
        creds
    }

    /// A gRPC channel over TLS with `creds` (no client certificate unless they hold one).
    pub async fn channel(&self, creds: &Arc<Credentials>) -> tonic::transport::Channel {
        self.control_plane()
            .connect(creds)
            .await
            .expect("connect to the control plane")
    }

    /// Runs one `wary-control-plane ca <step>` on this control plane's CA directory.
    pub async fn ca(&self, step: &str) {
        let out = Command::new(binary("wary-control-plane"))
            .args(["ca", step, "--ca-dir"])
            .arg(&self.ca_dir)
            .output()
            .await
            .expect("run wary-control-plane ca");
        assert!(
            out.status.success(),
            "ca {step}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Mints a join token for `workload` in `default` with the real CLI.
    pub async fn token(&self, workload: &str) -> String {
        let out = Command::new(binary("wary-control-plane"))
            .arg("token")
            .args(["--workload", workload, "--ca-dir"])
            .arg(&self.ca_dir)
            .output()
            .await
            .expect("run wary-control-plane token");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).expect("utf-8").trim().to_string()
    }

    /// GETs an admin page.
    /// A hand-made peer of `server`'s proxy: an HTTP/2 connection over mTLS to
    /// `inbound` holding `workload`'s real certificate, sending whatever a compromised
    /// or home-made proxy could (`server` is the SPIFFE ID the proxy must present).
    pub async fn peer_h2(
        &self,
        workload: &str,
        server: &str,
        inbound: SocketAddr,
    ) -> hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>> {
        use wary_proxy::identity::{IdentityConfig, TokenSource, certify};
        let creds = self.bootstrap_credentials();
        let token = self.token(workload).await;
        certify(
            &IdentityConfig::new(self.control_plane(), TokenSource::Inline(token)),
            &creds,
            true,
        )
        .await
        .expect("a certificate for the peer");
        let tls = tokio_rustls::TlsConnector::from(wary_certs::tls::client_config(&creds, &[wary_certs::tls::ALPN_H2]));
        let server = wary_certs::tls::server_name(&server.parse().expect("a SPIFFE ID")).expect("a server name");
        let tcp = tokio::net::TcpStream::connect(inbound)
            .await
            .expect("connect to the inbound");
        let tls = tls.connect(server, tcp).await.expect("mTLS to the inbound");
        let (sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tls),
        )
        .await
        .expect("HTTP/2 to the inbound");
        tokio::spawn(conn);
        sender
    }

    pub async fn admin_get(&self, path: &str) -> String {
        curl(&format!("http://{}{path}", self.admin)).await
    }

    /// The `/config` page, parsed.
    pub async fn config_status(&self) -> serde_json::Value {
        serde_json::from_str(&self.admin_get("/config").await).expect("/config is JSON")
    }

    /// Kills the process (SIGKILL: no goodbye to the proxies) and waits for it.
    pub async fn kill(mut self) {
        self.child.kill().await.expect("kill the control plane");
    }

    /// Sends SIGTERM and waits for the process to exit; returns its exit status.
    pub async fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().expect("the control plane is running");
        let sent = Command::new("kill").args(["-TERM", &pid.to_string()]).status().await;
        assert!(sent.is_ok_and(|s| s.success()), "kill -TERM {pid}");
        tokio::time::timeout(DEADLINE, self.child.wait())
            .await
            .expect("the control plane exits after SIGTERM")
            .expect("wait for the control plane")
    }
}

/// The value of `key` (e.g. `admin=`) in a binary's start-up line.
fn field<T: std::str::FromStr>(line: &str, key: &str) -> T {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
}

async fn first_line(child: &mut Child) -> String {
    let (line, mut lines) = first_line_and_rest(child).await;
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    line
}

type StdoutLines = tokio::io::Lines<BufReader<tokio::process::ChildStdout>>;

/// The first line a child prints, and the reader of the rest.
async fn first_line_and_rest(child: &mut Child) -> (String, StdoutLines) {
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(DEADLINE, lines.next_line())
        .await
        .expect("the process printed its addresses in time")
        .expect("read stdout")
        .expect("the process exited before printing its addresses");
    (line, lines)
}

/// A running `wary-proxy`, killed on drop.
pub struct Proxy {
    _child: Child,
    /// Its admin server's address.
    pub admin: SocketAddr,
    /// Its inbound (mTLS) listener.
    pub inbound: SocketAddr,
    /// Its outbound listener (the app's HTTP_PROXY).
    pub outbound: SocketAddr,
    /// Its stderr (logs).
    pub logs: Logs,
    /// Its stdout after the start-up line (access logs).
    pub stdout: Logs,
}

impl Proxy {
    /// Starts a proxy for `workload` (a Workload in the mesh) with a fresh join token,
    /// its inbound on a free port of 127.0.0.1 (for tests that carry no traffic).
    pub async fn start(cp: &ControlPlane, workload: &str) -> Self {
        Self::start_at(cp, workload, "127.0.0.1:0".parse().unwrap()).await
    }

    /// Starts a proxy for `workload` with its inbound listener on `inbound` (the
    /// workload's address and inbound port, where peers reach it).
    pub async fn start_at(cp: &ControlPlane, workload: &str, inbound: SocketAddr) -> Self {
        Self::start_listening(cp, workload, inbound, "127.0.0.1:0".parse().unwrap()).await
    }

    /// As [`Proxy::start_at`], with the outbound listener on `outbound` (where iptables
    /// redirects, in transparent mode).
    pub async fn start_listening(cp: &ControlPlane, workload: &str, inbound: SocketAddr, outbound: SocketAddr) -> Self {
        Self::start_with(cp, workload, inbound, outbound, &[]).await
    }

    /// As [`Proxy::start_listening`], with extra environment (`WARY_*` settings).
    pub async fn start_with(
        cp: &ControlPlane,
        workload: &str,
        inbound: SocketAddr,
        outbound: SocketAddr,
        env: &[(&str, &str)],
    ) -> Self {
        // In a cluster the proof is the service-account token the caller gives.
        let token = if env.iter().any(|(k, _)| *k == "WARY_SERVICE_ACCOUNT_TOKEN_FILE") {
            None
        } else {
            Some(cp.token(workload).await)
        };
        let mut cmd = Command::new(binary("wary-proxy"));
        if let Some(token) = token {
            cmd.env("WARY_JOIN_TOKEN", token);
        }
        let mut child = cmd
            .args(["--control-plane", &cp.discovery_url(), "--workload", workload])
            .args(["--admin-addr", "127.0.0.1:0", "--outbound-addr", &outbound.to_string()])
            .args(["--inbound-addr", &inbound.to_string()])
            .arg("--trust-anchors")
            .arg(&cp.trust_anchors)
            .env("RUST_LOG", "info,wary_proxy=debug")
            // The caller's settings win, RUST_LOG included.
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start wary-proxy");
        let logs = Logs::default();
        logs.follow(format!("proxy {workload}"), child.stderr.take().unwrap());
        let (line, rest) = first_line_and_rest(&mut child).await;
        // The rest of stdout: access logs, when they are on.
        let stdout = Logs::default();
        stdout.follow_lines(format!("proxy {workload} stdout"), rest);
        Self {
            admin: field(&line, "admin="),
            inbound: field(&line, "inbound="),
            outbound: field(&line, "outbound="),
            _child: child,
            logs,
            stdout,
        }
    }

    /// Sends SIGTERM (graceful shutdown) without waiting.
    pub async fn terminate(&self) {
        let pid = self._child.id().expect("the proxy is running");
        let sent = Command::new("kill").args(["-TERM", &pid.to_string()]).status().await;
        assert!(sent.is_ok_and(|s| s.success()), "kill -TERM {pid}");
    }

    /// Waits for the process to exit, within [`DEADLINE`]; returns its exit status.
    pub async fn wait_exit(&mut self) -> std::process::ExitStatus {
        tokio::time::timeout(DEADLINE, self._child.wait())
            .await
            .expect("the proxy exits in time")
            .expect("wait for the proxy")
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self._child.id().expect("the proxy is running")
    }

    /// Its peak resident memory so far (`VmHWM`), bytes.
    pub fn peak_rss(&self) -> u64 {
        let bytes = proc_status_bytes(self.pid(), "VmHWM");
        assert!(bytes > 0, "no VmHWM in /proc/{}/status", self.pid());
        bytes
    }

    /// The certificate as `/config_dump` shows it (identity, validity, issuer, anchors).
    pub async fn certificate(&self) -> serde_json::Value {
        self.config_dump().await["certificate"].clone()
    }

    /// Waits until `/ready` answers 200.
    pub async fn wait_ready(&self) {
        wait_until("the proxy is ready", || async {
            (self.admin_get("/ready").await == "ok\n").then_some(())
        })
        .await;
    }

    /// GETs an admin page; see [`curl`] for the shape of the answer.
    pub async fn admin_get(&self, path: &str) -> String {
        curl(&format!("http://{}{path}", self.admin)).await
    }

    /// The `/config_dump` page, parsed.
    pub async fn config_dump(&self) -> serde_json::Value {
        serde_json::from_str(&self.admin_get("/config_dump").await).expect("/config_dump is JSON")
    }

    /// Waits until `/config_dump` satisfies `cond`.
    pub async fn wait_for_dump(&self, what: &str, cond: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        wait_until(what, || async {
            let dump = self.config_dump().await;
            cond(&dump).then_some(dump)
        })
        .await
    }
}

/// GETs a URL with curl; returns `<status> <body>` so callers can assert on both.
pub async fn curl(url: &str) -> String {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5", "-w", "\n%{http_code}", url])
        .output()
        .await
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    if code == "200" {
        body.to_string()
    } else {
        format!("HTTP {code}: {body}")
    }
}

/// `curl -i -x <proxy> <url>` with extra arguments, as an app with `HTTP_PROXY` set;
/// returns the status and the headers and body.
pub async fn curl_via(proxy: SocketAddr, url: &str, extra: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "-i", "--max-time", "10", "-x", &format!("http://{proxy}"), url])
        .args(extra)
        .output()
        .await
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_default();
    (status, text)
}

/// Polls an async condition until it yields a value, within [`DEADLINE`]. For state that
/// only a poll can see (another process's admin page).
pub async fn wait_until<T, F, Fut>(what: &str, poll: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    wait_until_within(what, DEADLINE, poll).await
}

/// As [`wait_until`], for a condition the product promises within `deadline` (a grace
/// longer than [`DEADLINE`]).
pub async fn wait_until_within<T, F, Fut>(what: &str, deadline: Duration, mut poll: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let wait = async {
        let mut interval = tokio::time::interval(Duration::from_millis(50));
        loop {
            interval.tick().await;
            if let Some(v) = poll().await {
                return v;
            }
        }
    };
    tokio::time::timeout(deadline, wait)
        .await
        .unwrap_or_else(|_| panic!("timed out after {deadline:?} waiting for {what}"))
}

/// A real discovery client (the proxy's own) running in the test process.
pub struct Client {
    /// The state it holds.
    pub cache: Arc<Cache>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Client {
    /// Connects as proxy `id` with the default checks, presenting a mesh certificate
    /// for `sa/discovery-test` (so it reads every Service and Endpoints, and no
    /// workload's inbound policy).
    pub fn connect(cp: &ControlPlane, id: &str) -> Self {
        Self::connect_with(cp, id, None)
    }

    /// Connects as proxy `id`, with an extra resource check (to provoke NACKs).
    pub fn connect_with(cp: &ControlPlane, id: &str, extra_check: Option<ExtraCheck>) -> Self {
        let node = Node {
            id: id.to_string(),
            ..Default::default()
        };
        let mut config = DiscoveryConfig::new(cp.control_plane(), cp.mesh_credentials("discovery-test"), node);
        config.extra_check = extra_check;
        let cache = Arc::new(Cache::default());
        let task = tokio::spawn(wary_proxy::discovery::run(config, cache.clone()));
        Self { cache, task }
    }

    /// Waits until the state satisfies `cond` and returns that state.
    pub async fn wait_for(&self, what: &str, cond: impl Fn(&DiscoveryState) -> bool) -> Arc<DiscoveryState> {
        self.wait_for_within(what, DEADLINE, cond).await
    }

    /// Like [`Client::wait_for`], with a deadline of its own (for acceptance bounds).
    pub async fn wait_for_within(
        &self,
        what: &str,
        deadline: Duration,
        cond: impl Fn(&DiscoveryState) -> bool,
    ) -> Arc<DiscoveryState> {
        let mut changed = self.cache.subscribe();
        let wait = async {
            loop {
                let state = self.cache.load();
                if cond(&state) {
                    return state;
                }
                if changed.changed().await.is_err() {
                    panic!("the discovery cache was dropped");
                }
            }
        };
        tokio::time::timeout(deadline, wait)
            .await
            .unwrap_or_else(|_| panic!("timed out after {deadline:?} waiting for {what}"))
    }
}

/// A temporary configuration directory.
pub struct MeshDir {
    dir: tempfile::TempDir,
    ca: tempfile::TempDir,
}

impl Default for MeshDir {
    fn default() -> Self {
        Self::new()
    }
}

impl MeshDir {
    /// An empty directory.
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("temp dir"),
            ca: tempfile::tempdir().expect("temp dir"),
        }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The CA directory that goes with it (outside the configuration directory).
    pub fn ca_path(&self) -> &Path {
        self.ca.path()
    }

    /// Writes (or replaces) a file atomically, the way editors and `kubectl`-style tools
    /// do: write a hidden temporary file, then rename it into place.
    pub fn write(&self, name: &str, text: &str) {
        let tmp = self.dir.path().join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).expect("write config");
        std::fs::rename(&tmp, self.dir.path().join(name)).expect("rename config");
    }

    /// Removes a file.
    pub fn remove(&self, name: &str) {
        std::fs::remove_file(self.dir.path().join(name)).expect("remove config");
    }
}

/// A local Service document selecting `app: <name>`, one port.
pub fn service(name: &str, port: u16) -> String {
    format!(
        "apiVersion: local.wary.io/v1alpha1
kind: Service
metadata:
  name: {name}
spec:
  selector:
    app: {name}
  ports:
  - name: http
    port: {port}
    targetPort: http
"
    )
}

/// A local Workload document labelled `app: <app>`, running as service account `<app>`.
pub fn workload(name: &str, app: &str, address: &str, port: u16) -> String {
    workload_as(name, app, app, address, port)
}

/// A local Workload document labelled `app: <app>`, running as service account `sa`.
pub fn workload_as(name: &str, app: &str, sa: &str, address: &str, port: u16) -> String {
    format!(
        "apiVersion: local.wary.io/v1alpha1
kind: Workload
metadata:
  name: {name}
  labels:
    app: {app}
spec:
  serviceAccount: {sa}
  address: {address}
  ports:
  - name: http
    port: {port}
"
    )
}

/// A tiny HTTP/1.1 app: answers every request with 200, `hello from <name>`, and echoes
/// the `wary-client-id` it received in `x-seen-client-id`. Stops when dropped.
pub struct App {
    task: tokio::task::JoinHandle<()>,
    /// Requests served.
    pub served: Arc<std::sync::atomic::AtomicU64>,
    /// Extra time before each answer, ms: set it to slow the app down on command.
    pub delay_ms: Arc<std::sync::atomic::AtomicU64>,
    /// The status every answer carries (200 unless set): make the app fail on command.
    pub status: Arc<std::sync::atomic::AtomicU16>,
}

impl Drop for App {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl App {
    /// Serves on `addr` (a loopback address).
    pub async fn start(addr: SocketAddr, name: &str) -> Self {
        use http_body_util::Full;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        let served = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let delay_ms = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let status = Arc::new(std::sync::atomic::AtomicU16::new(200));
        let (name, count, delay, code) = (name.to_string(), served.clone(), delay_ms.clone(), status.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (name, count, delay, code) = (name.clone(), count.clone(), delay.clone(), code.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let delay = delay.clone();
                        let seen = req.headers().get("wary-client-id").cloned();
                        let body = format!("hello from {name}");
                        let wait = Duration::from_millis(delay.load(std::sync::atomic::Ordering::Relaxed));
                        let code = code.load(std::sync::atomic::Ordering::Relaxed);
                        async move {
                            if !wait.is_zero() {
                                tokio::time::sleep(wait).await;
                            }
                            let mut response = hyper::Response::new(Full::new(bytes::Bytes::from(body)));
                            *response.status_mut() = hyper::StatusCode::from_u16(code).unwrap_or_default();
                            if let Some(seen) = seen {
                                response.headers_mut().insert("x-seen-client-id", seen);
                            }
                            Ok::<_, std::convert::Infallible>(response)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        Self {
            task,
            served,
            delay_ms,
            status,
        }
    }
}

/// What a load run saw.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Requests sent.
    pub sent: u64,
    /// Answered 200.
    pub ok: u64,
    /// Every other outcome, with the first few described.
    pub failed: u64,
    /// Up to 10 failures, described.
    pub failures: Vec<String>,
}

/// One request of a load run.
#[derive(Debug, Clone)]
pub struct Sample {
    /// When it was sent, from the start of the run.
    pub sent_at: Duration,
    /// From sending to the whole response read.
    pub latency: Duration,
    /// The response body (an [`App`] names itself in it); empty for a failure.
    pub body: String,
    /// Whether it was answered 200.
    pub ok: bool,
}

/// Sends `rate` requests per second for `duration` through the proxy at `proxy` (as an
/// `HTTP_PROXY` client would: absolute-form URIs) to `url`. Each request is its own
/// task, so a slow answer does not lower the rate. Bounded in count and time.
pub async fn load(proxy: SocketAddr, url: &str, rate: u32, duration: Duration) -> LoadReport {
    load_samples(proxy, url, rate, duration).await.0
}

/// As [`load`], with every request's [`Sample`], in the order they were sent.
pub async fn load_samples(proxy: SocketAddr, url: &str, rate: u32, duration: Duration) -> (LoadReport, Vec<Sample>) {
    use http_body_util::BodyExt;
    let client: hyper_util::client::legacy::Client<_, http_body_util::Empty<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(ProxyConnector(proxy));
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
    let total = u64::from(rate) * duration.as_secs();
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..total {
        tick.tick().await;
        let client = client.clone();
        let uri: hyper::Uri = url.parse().expect("a URL");
        tasks.push(tokio::spawn(async move {
            let sent = tokio::time::Instant::now();
            let exchange = async {
                let response = client.get(uri).await.map_err(|e| format!("client error: {e:?}"))?;
                let (status, error) = (response.status(), response.headers().get("wary-error").cloned());
                let body = response.into_body().collect().await.map_err(|e| format!("body: {e}"))?;
                if status != 200 {
                    return Err(format!("{status} {error:?}"));
                }
                Ok(String::from_utf8_lossy(&body.to_bytes()).into_owned())
            };
            let outcome = tokio::time::timeout(Duration::from_secs(10), exchange)
                .await
                .unwrap_or_else(|_| Err("no answer within 10 s".to_string()));
            (sent - start, sent.elapsed(), outcome)
        }));
    }
    let mut report = LoadReport {
        sent: total,
        ..LoadReport::default()
    };
    let mut samples = Vec::with_capacity(tasks.len());
    for task in tasks {
        let (sent_at, latency, outcome) = task.await.expect("a request task");
        let ok = outcome.is_ok();
        if ok {
            report.ok += 1;
        } else {
            report.failed += 1;
        }
        let body = match outcome {
            Ok(body) => body,
            Err(failure) => {
                if report.failures.len() < 10 {
                    report.failures.push(failure);
                }
                String::new()
            }
        };
        samples.push(Sample {
            sent_at,
            latency,
            body,
            ok,
        });
    }
    (report, samples)
}

/// Connects every request to the proxy, whatever its URI says (an `HTTP_PROXY` client,
/// or a gRPC client whose channel is pointed at the proxy).
#[derive(Clone)]
pub struct ProxyConnector(pub SocketAddr);

impl tower::Service<hyper::Uri> for ProxyConnector {
    type Response = hyper_util::rt::TokioIo<tokio::net::TcpStream>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: hyper::Uri) -> Self::Future {
        let addr = self.0;
        Box::pin(async move {
            tokio::net::TcpStream::connect(addr)
                .await
                .map(hyper_util::rt::TokioIo::new)
        })
    }
}
