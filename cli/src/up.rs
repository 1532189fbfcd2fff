//! `wary up [DIR]`: a whole mesh on this machine, from a directory of YAML.
//!
//! ```text
//! DIR ──read, errors with file:line──▶ workloads
//! wary-control-plane --config-dir DIR (a fresh CA in the state directory)
//! per workload: a join token, then wary-proxy on <address>:4143 / :4140 / :4191
//! per workload with a `command`: the app, HTTP_PROXY=http://<address>:4140
//! every proxy /ready, then the front door answers ─▶ "mesh ready: <url>"
//! every second: the live view (see `view`)
//! Ctrl-C, SIGTERM or SIGHUP: apps, then proxies, then the control plane; SIGKILL
//! after 5 s
//! ```
//!
//! Every child runs in its own process group, so what an app starts goes with it; if
//! `wary up` itself fails or panics, dropping the set of children kills every group.
//! Logs go to `<state>/logs/<name>.log`; the state directory (a private temporary
//! directory by default) is removed at the end unless something crashed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use wary_control_plane::ca_store::CaStore;
use wary_control_plane::local::WorkloadSpec;
use wary_control_plane::source::{Body, ConfigDir};

use crate::view;

/// The label that marks the workload whose first port is the mesh's front door.
pub const FRONT_DOOR_LABEL: &str = "wary.io/front-door";

/// How the live view is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ViewMode {
    /// Redrawn in place on a terminal, printed block after block otherwise.
    Auto,
    /// Redrawn in place.
    Tty,
    /// A new block each second (for logs and scripts).
    Plain,
    /// No view.
    None,
}

/// `wary up`'s arguments.
#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// The mesh's directory of YAML documents.
    #[arg(default_value = "examples/quickstart")]
    dir: PathBuf,
    /// How to show the live view.
    #[arg(long, value_enum, default_value = "auto")]
    view: ViewMode,
    /// Where the CA, tokens and logs go; default a fresh private directory under the
    /// system's temporary directory, removed at the end.
    #[arg(long)]
    state_dir: Option<PathBuf>,
}

/// One workload as `wary up` runs it.
struct Workload {
    name: String,
    namespace: String,
    spec: WorkloadSpec,
    front_door: bool,
}

/// A child process and what to call it.
struct Proc {
    name: String,
    child: Child,
    /// Its process group (its own pid), kept after the child is reaped.
    pgid: Option<Pid>,
    exited: bool,
}

/// Everything started, in start order, and where their logs go.
struct Procs {
    procs: Vec<Proc>,
    logs: PathBuf,
    /// A child exited on its own: the logs are kept for the user.
    crashed: bool,
}

impl Drop for Procs {
    /// On any way out (an error, a panic), nothing started may outlive `wary up`.
    fn drop(&mut self) {
        for p in &self.procs {
            if let Some(pgid) = p.pgid {
                let _ = killpg(pgid, Signal::SIGKILL);
            }
        }
    }
}

impl Procs {
    fn new(logs: PathBuf) -> Self {
        Self {
            procs: Vec::new(),
            logs,
            crashed: false,
        }
    }

    /// Starts `cmd` in its own process group, its stderr (and stdout unless `piped`)
    /// in `<logs>/<name>.log`.
    fn spawn(&mut self, name: &str, cmd: &mut Command, piped: bool) -> anyhow::Result<&mut Child> {
        let path = self.logs.join(format!("{name}.log"));
        let log =
            std::fs::File::create(&path).with_context(|| format!("cannot create the log file {}", path.display()))?;
        let stdout = if piped {
            Stdio::piped()
        } else {
            Stdio::from(log.try_clone()?)
        };
        let child = cmd
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| {
                format!(
                    "cannot start {name} ({:?}): build every binary with `cargo build --release --workspace --bins` \
                     and run the wary next to them",
                    cmd.as_std().get_program()
                )
            })?;
        let pgid = child.id().and_then(|id| i32::try_from(id).ok()).map(Pid::from_raw);
        self.procs.push(Proc {
            name: name.to_string(),
            child,
            pgid,
            exited: false,
        });
        Ok(&mut self.procs.last_mut().expect("just pushed").child)
    }

    /// Reports children that exited since the last call, once each.
    fn reap(&mut self) -> Vec<String> {
        let mut gone = Vec::new();
        for p in &mut self.procs {
            if !p.exited
                && let Ok(Some(status)) = p.child.try_wait()
            {
                p.exited = true;
                self.crashed = true;
                let log = self.logs.join(format!("{}.log", p.name));
                gone.push(format!("{} exited ({status}); its log is {}", p.name, log.display()));
            }
        }
        gone
    }

    /// Stops everything, newest first (apps, then proxies, then the control plane):
    /// SIGTERM to each process group, then SIGKILL to what is left after `grace`.
    async fn stop(&mut self, grace: Duration) {
        for p in self.procs.iter().rev() {
            if let Some(pgid) = p.pgid {
                let _ = killpg(pgid, Signal::SIGTERM);
            }
        }
        let deadline = tokio::time::Instant::now() + grace;
        for p in self.procs.iter_mut().rev() {
            if tokio::time::timeout_at(deadline, p.child.wait()).await.is_err() {
                eprintln!("{} did not stop within {grace:?}: killing it", p.name);
            }
            // The group too: anything the child started must not outlive it.
            if let Some(pgid) = p.pgid.take() {
                let _ = killpg(pgid, Signal::SIGKILL);
            }
            let _ = p.child.wait().await;
        }
    }
}

/// Reads the first line a child prints (its addresses), then drains the rest.
async fn first_line(child: &mut Child, name: &str) -> anyhow::Result<String> {
    let stdout = child.stdout.take().context("stdout was not piped")?;
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .with_context(|| format!("{name} printed nothing within 30 s; see its log"))?
        .with_context(|| format!("reading {name}'s output"))?
        .with_context(|| format!("{name} exited at start-up; see its log"))?;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(line)
}

/// The value after `key` (`admin=`...) in a start-up line.
fn field(line: &str, key: &str) -> anyhow::Result<String> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .map(str::to_string)
        .with_context(|| format!("no {key} in {line:?}"))
}

/// A sibling binary of this one (they are built together), or one on PATH.
fn binary(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join(name)))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(name))
}

fn read_workloads(dir: &Path) -> anyhow::Result<Vec<Workload>> {
    if !dir.is_dir() {
        bail!(
            "{} is not a directory: run `wary up` from the repository root (for examples/quickstart) or name your mesh's directory",
            dir.display()
        );
    }
    let loaded = ConfigDir::new(dir)
        .load()
        .with_context(|| format!("cannot read {}", dir.display()))?;
    if !loaded.errors.is_empty() {
        for e in &loaded.errors {
            eprintln!("{e}");
        }
        bail!("{} has errors (above): fix them and run `wary up` again", dir.display());
    }
    Ok(loaded
        .documents
        .into_iter()
        .filter_map(|d| match d.body {
            Body::Workload(spec) => Some(Workload {
                front_door: d.labels.get(FRONT_DOOR_LABEL).is_some_and(|v| v == "true"),
                name: d.name,
                namespace: d.namespace,
                spec,
            }),
            _ => None,
        })
        .collect())
}

/// Runs the mesh until Ctrl-C, SIGTERM or SIGHUP.
pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    let dir = args.dir.canonicalize().unwrap_or(args.dir.clone());
    let workloads = read_workloads(&dir)?;
    let (state, temporary) = match args.state_dir {
        Some(s) => (s, false),
        // A private (0700) directory of its own: it holds the CA key and join tokens.
        None => (
            tempfile::Builder::new()
                .prefix("wary-up-")
                .tempdir()
                .context("cannot create a state directory")?
                .keep(),
            true,
        ),
    };
    let logs = state.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    let mut procs = Procs::new(logs.clone());
    let outcome = start_and_watch(&dir, &workloads, &state, args.view, &mut procs).await;
    eprintln!("stopping everything wary up started...");
    procs.stop(Duration::from_secs(5)).await;
    if temporary && outcome.is_ok() && !procs.crashed {
        let _ = std::fs::remove_dir_all(&state);
    } else {
        eprintln!("logs kept in {}", logs.display());
    }
    eprintln!("stopped");
    outcome
}

async fn start_and_watch(
    dir: &Path,
    workloads: &[Workload],
    state: &Path,
    view_mode: ViewMode,
    procs: &mut Procs,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let (mut term, mut interrupt, mut hangup) = (
        signal(SignalKind::terminate())?,
        signal(SignalKind::interrupt())?,
        signal(SignalKind::hangup())?,
    );
    // Ctrl-C, SIGTERM, or the terminal closing: at any point, start-up included.
    let stopped = async {
        tokio::select! {
            _ = term.recv() => {}
            _ = interrupt.recv() => {}
            _ = hangup.recv() => {}
        }
    };
    tokio::pin!(stopped);
    let (url, admins, cp_admin) = tokio::select! {
        started = start(dir, workloads, state, procs) => started?,
        _ = &mut stopped => return Ok(()),
    };
    println!("mesh ready: {url}");
    watch(&url, &admins, &cp_admin, view_mode, procs, stopped).await
}

/// Starts everything; the front door's URL, the proxies' admin addresses and the
/// control plane's, once all are ready.
async fn start(
    dir: &Path,
    workloads: &[Workload],
    state: &Path,
    procs: &mut Procs,
) -> anyhow::Result<(String, BTreeMap<String, String>, String)> {
    let ca_dir = state.join("ca");
    let store = CaStore::open_or_create(&ca_dir, &wary_certs::TrustDomain::default())
        .with_context(|| format!("cannot create the mesh CA in {}", ca_dir.display()))?;
    let cp = procs.spawn(
        "control-plane",
        Command::new(binary("wary-control-plane"))
            .arg("--config-dir")
            .arg(dir)
            .arg("--ca-dir")
            .arg(&ca_dir)
            .args(["--discovery-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"]),
        true,
    )?;
    let line = first_line(cp, "the control plane").await?;
    let (discovery, cp_admin, anchors) = (
        field(&line, "discovery=")?,
        field(&line, "admin=")?,
        field(&line, "trust_anchors=")?,
    );
    println!(
        "control-plane admin=http://{cp_admin} discovery={discovery} logs={}",
        procs.logs.display()
    );

    let token_key = store.current()?.token_key.clone();
    let mut admins: BTreeMap<String, String> = BTreeMap::new();
    for w in workloads.iter().filter(|w| w.spec.inbound_port != 0) {
        let token = wary_control_plane::tokens::mint(&token_key, &w.namespace, &w.name, Duration::from_secs(86_400));
        let address = w.spec.address;
        let name = format!("proxy-{}", w.name);
        let child = procs.spawn(
            &name,
            Command::new(binary("wary-proxy"))
                .env("WARY_CONTROL_PLANE", format!("https://{discovery}"))
                .env("WARY_TRUST_ANCHORS", &anchors)
                .env("WARY_JOIN_TOKEN", token)
                .env("WARY_WORKLOAD", &w.name)
                .env("WARY_NAMESPACE", &w.namespace)
                .env(
                    "WARY_INBOUND_ADDR",
                    SocketAddr::new(address, w.spec.inbound_port).to_string(),
                )
                .env("WARY_OUTBOUND_ADDR", SocketAddr::new(address, 4140).to_string())
                .env("WARY_ADMIN_ADDR", SocketAddr::new(address, 4191).to_string()),
            true,
        )?;
        let line = first_line(child, &name).await?;
        let admin = field(&line, "admin=")?;
        println!(
            "proxy {} admin=http://{admin} inbound={} outbound={}",
            w.name,
            field(&line, "inbound=")?,
            field(&line, "outbound=")?
        );
        admins.insert(w.name.clone(), admin);
    }
    for w in workloads.iter().filter(|w| !w.spec.command.is_empty()) {
        let program = match w.spec.command[0].as_str() {
            "wary" => std::env::current_exe().context("cannot find the wary binary itself")?,
            other => PathBuf::from(other),
        };
        let mut cmd = Command::new(program);
        // Relative paths in a command are the mesh directory's, like the YAML's own.
        cmd.args(&w.spec.command[1..])
            .current_dir(dir)
            .envs(&w.spec.env)
            .env("WARY_WORKLOAD_NAME", &w.name)
            .env("WARY_ADDRESS", w.spec.address.to_string());
        if w.spec.inbound_port != 0 {
            let proxy = format!("http://{}", SocketAddr::new(w.spec.address, 4140));
            cmd.env("HTTP_PROXY", &proxy).env("http_proxy", &proxy);
        }
        if let Some(port) = w.spec.ports.first() {
            cmd.env("WARY_LISTEN", SocketAddr::new(w.spec.address, port.port).to_string())
                .env("WARY_PORT", port.port.to_string());
        }
        procs.spawn(&w.name, &mut cmd, false)?;
    }
    for w in workloads.iter().filter(|w| w.spec.command.is_empty()) {
        if let Some(port) = w.spec.ports.first() {
            println!(
                "app {} has no command: start it yourself on {}",
                w.name,
                SocketAddr::new(w.spec.address, port.port)
            );
        }
    }

    // Ready: every proxy, then the front door.
    for (workload, admin) in &admins {
        let ready = format!("http://{admin}/ready");
        wait_for(&format!("the proxy of {workload} to be ready"), &ready, true, procs).await?;
    }
    let door = workloads.iter().find(|w| w.front_door).and_then(|w| {
        let port = w.spec.ports.first()?;
        Some(format!("http://{}/", SocketAddr::new(w.spec.address, port.port)))
    });
    let url = match door {
        Some(url) => {
            // Any HTTP answer: the app serves (its `/` may well be a 404).
            wait_for("the front door to answer", &url, false, procs).await?;
            url
        }
        None => format!("http://{cp_admin}/proxies"),
    };
    Ok((url, admins, cp_admin))
}

/// The live view, and children's exits, until `stopped`.
async fn watch(
    url: &str,
    admins: &BTreeMap<String, String>,
    cp_admin: &str,
    view_mode: ViewMode,
    procs: &mut Procs,
    mut stopped: std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
) -> anyhow::Result<()> {
    let tty = match view_mode {
        ViewMode::Auto => std::io::IsTerminal::is_terminal(&std::io::stdout()),
        ViewMode::Tty => true,
        ViewMode::Plain | ViewMode::None => false,
    };
    let mut then = (view::now(), view::Snapshot::default());
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut first = true;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut stopped => return Ok(()),
        }
        for gone in procs.reap() {
            eprintln!("{gone}");
        }
        if view_mode == ViewMode::None {
            continue;
        }
        let mut pages = Vec::new();
        for admin in admins.values() {
            let url = format!("http://{admin}/metrics");
            let page = tokio::select! {
                page = view::fetch(&url, true) => page,
                _ = &mut stopped => return Ok(()),
            };
            if let Some(page) = page {
                pages.push(page);
            }
        }
        let now = (view::now(), view::Snapshot::from_pages(&pages));
        if first {
            // Rates need two readings.
            first = false;
            then = now;
            continue;
        }
        let seconds = now.0.duration_since(then.0).as_secs_f64().max(0.001);
        let config_url = format!("http://{cp_admin}/config");
        let config = view::fetch(&config_url, true).await.unwrap_or_default();
        let header = format!(
            "wary up: {} proxies, front door {url}; {}; Ctrl-C stops everything",
            admins.len(),
            view::config_line(&config, &config_url)
        );
        let table = view::render(&then.1, &now.1, seconds, &header);
        if tty {
            print!("\x1b[H\x1b[2J{table}");
        } else {
            println!("{table}");
        }
        then = now;
    }
}

/// Polls `url` until it answers (2xx when `success`; any HTTP answer otherwise),
/// within 60 s; fails at once if anything started has exited meanwhile.
async fn wait_for(what: &str, url: &str, success: bool, procs: &mut Procs) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while tokio::time::Instant::now() < deadline {
        if view::fetch(url, success).await.is_some() {
            return Ok(());
        }
        let gone = procs.reap();
        if !gone.is_empty() {
            bail!("{} before the mesh was ready", gone.join("; "));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let answer = if success { "a 2xx answer" } else { "any HTTP answer" };
    bail!("timed out after 60 s waiting for {what} ({url}, {answer}); see the logs")
}
