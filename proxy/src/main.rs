//! The `wary-proxy` binary. Configured by `WARY_*` environment variables (what the
//! injector sets) or the same names as flags.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use tokio::net::TcpListener;
use wary_certs::credentials::{Credentials, TrustBundle};
use wary_certs::{SpiffeId, TrustDomain};
use wary_proto::discovery::Node;
use wary_proxy::control::ControlPlane;
use wary_proxy::drain::Drain;
use wary_proxy::identity::{IdentityConfig, TokenSource};
use wary_proxy::inbound::Inbound;
use wary_proxy::outbound::{Outbound, OutboundConfig};
use wary_proxy::pool::PeerPool;
use wary_proxy::{admin::Admin, detect, discovery, identity, metrics as m, state::Cache};

/// Wary's sidecar proxy. `wary-proxy init` installs a pod's iptables rules
/// (transparent mode).
#[derive(Parser, Debug)]
#[command(
    version,
    about,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Args {
    #[command(subcommand)]
    command: Option<Subcommand>,
    /// The control plane's address (discovery and identity, over TLS).
    #[arg(long, env = "WARY_CONTROL_PLANE", default_value = "https://127.0.0.1:8086")]
    control_plane: String,
    /// The trust bundle (PEM) that verifies the control plane and peers:
    /// `wary-control-plane ca bundle` prints it.
    #[arg(long, env = "WARY_TRUST_ANCHORS", required_unless_present = "trust_anchors_pem")]
    trust_anchors: Option<PathBuf>,
    /// The trust bundle itself (PEM), instead of a file: what the injector sets.
    #[arg(
        long,
        env = "WARY_TRUST_ANCHORS_PEM",
        conflicts_with = "trust_anchors",
        hide_env_values = true
    )]
    trust_anchors_pem: Option<String>,
    /// This workload's join token (`wary-control-plane token --workload NAME`).
    #[arg(
        long,
        env = "WARY_JOIN_TOKEN",
        conflicts_with = "join_token_file",
        hide_env_values = true
    )]
    join_token: Option<String>,
    /// A file holding the join token, re-read at each certificate request.
    #[arg(long, env = "WARY_JOIN_TOKEN_FILE", conflicts_with = "service_account_token_file")]
    join_token_file: Option<PathBuf>,
    /// A Kubernetes service-account token file (projected with audience `wary.io`, what
    /// the injector mounts), re-read at each certificate request: the proof of identity
    /// in a cluster.
    #[arg(long, env = "WARY_SERVICE_ACCOUNT_TOKEN_FILE", conflicts_with = "join_token")]
    service_account_token_file: Option<PathBuf>,
    /// The mesh's trust domain.
    #[arg(long, env = "WARY_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// The identity the control plane must present; default
    /// `spiffe://<trust-domain>/ns/wary-system/sa/wary-control-plane`.
    #[arg(long, env = "WARY_CONTROL_PLANE_IDENTITY")]
    control_plane_identity: Option<String>,
    /// The workload this proxy fronts (its `Workload` document or pod name).
    #[arg(long, env = "WARY_WORKLOAD", required = true)]
    workload: Option<String>,
    /// The workload's namespace.
    #[arg(long, env = "WARY_NAMESPACE", default_value = "default")]
    namespace: String,
    /// A unique name for this proxy in the control plane's logs; default
    /// `<workload>.<namespace>/<pid>`.
    #[arg(long, env = "WARY_PROXY_ID")]
    id: Option<String>,
    /// Where the app sends its outbound requests (explicit mode: set
    /// HTTP_PROXY=http://<this address>).
    #[arg(long, env = "WARY_OUTBOUND_ADDR", default_value = "127.0.0.1:4140")]
    outbound_addr: SocketAddr,
    /// Where peers reach this workload over mTLS; its IP is the workload's address, where
    /// the app listens. Default 127.0.0.1:4143.
    #[arg(long, env = "WARY_INBOUND_ADDR", default_value = "127.0.0.1:4143")]
    inbound_addr: SocketAddr,
    /// Ports whose redirected connections are carried as opaque TCP without protocol
    /// detection (transparent mode): servers that speak first, like SMTP and MySQL.
    /// Comma-separated; an empty value turns detection on everywhere.
    #[arg(long, env = "WARY_OPAQUE_PORTS", value_parser = PortList::parse, default_value_t = PortList(detect::DEFAULT_OPAQUE_PORTS.to_vec()))]
    opaque_ports: PortList,
    /// How long protocol detection waits for a redirected connection's first bytes
    /// before carrying it as opaque TCP, ms (transparent mode).
    #[arg(long, env = "WARY_DETECT_TIMEOUT_MS", default_value_t = 1000)]
    detect_timeout_ms: u64,
    /// How long a request that says `Expect: 100-continue` holds its body back while
    /// the server may still refuse it, ms.
    #[arg(long, env = "WARY_EXPECT_CONTINUE_WAIT_MS", default_value_t = 250)]
    expect_continue_wait_ms: u64,
    /// TCP + TLS connect timeout to peers, ms (Linkerd's default).
    #[arg(long, env = "WARY_CONNECT_TIMEOUT_MS", default_value_t = 1000)]
    connect_timeout_ms: u64,
    /// Address of the admin server (/metrics, /ready, /live, /config_dump).
    #[arg(long, env = "WARY_ADMIN_ADDR", default_value = "127.0.0.1:4191")]
    admin_addr: SocketAddr,
    /// After SIGTERM, the longest the proxy keeps carrying the app's traffic before it
    /// exits, s; it exits sooner once the app's connections have closed. Kubernetes'
    /// default termination grace period, so the kubelet's SIGKILL may come first: set
    /// it below the pod's `terminationGracePeriodSeconds` to see "proxy stopped".
    #[arg(long, env = "WARY_SHUTDOWN_GRACE_PERIOD_S", default_value_t = 30)]
    shutdown_grace_period_s: u64,
    /// Access logs: `off`, or `json` (one JSON object a line on stdout per request sent
    /// on).
    #[arg(long, env = "WARY_ACCESS_LOG", default_value = "off")]
    access_log: String,
    /// Continue W3C trace context (`traceparent`) with a span for the proxy's hop, and
    /// record trace and span ids in access logs.
    #[arg(long, env = "WARY_TRACING")]
    tracing: bool,
    /// Log format: `text` or `json`. The level is set with RUST_LOG (default `info`).
    #[arg(long, env = "WARY_LOG_FORMAT", default_value = "text")]
    log_format: String,
    /// The kubelet probes the injector moved to the admin port (JSON: admin path →
    /// `{"http": {"port", "path", "headers"}}` or `{"tcp": {"port"}}`); the proxy makes
    /// each to the app at the inbound address's IP.
    #[arg(long, env = "WARY_APP_PROBES", hide_env_values = true)]
    app_probes: Option<String>,
    /// Threads carrying traffic; default: the CPUs the process may use (its cgroup's
    /// CPU limit included). A sidecar with a one-CPU limit runs one. The admin server
    /// has a thread of its own besides.
    #[arg(long, env = "WARY_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    worker_threads: Option<u16>,
    /// HTTP/1 header names: `preserve` their case end to end (reading each HTTP/1 head
    /// as it passes), or write them in `lower` case, as HTTP/2 carries them.
    #[arg(long, env = "WARY_HEADER_CASE", value_enum, default_value = "preserve")]
    header_case: HeaderCase,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum HeaderCase {
    Preserve,
    Lower,
}

#[derive(clap::Subcommand, Debug)]
enum Subcommand {
    /// Install the pod's iptables rules: inbound TCP to the inbound port, outbound TCP
    /// to the outbound port, except the proxy's own connections and skipped ports.
    /// Needs NET_ADMIN and NET_RAW; run once per pod, before the app (the injected init
    /// step). Running it again replaces the rules.
    Init(InitArgs),
}

#[derive(clap::Args, Debug)]
struct InitArgs {
    /// The UID the proxy runs as: its connections are never redirected.
    #[arg(long, env = "WARY_PROXY_UID", default_value_t = wary_proxy::init::DEFAULT_PROXY_UID)]
    proxy_uid: u32,
    /// The proxy's inbound (mTLS) port: inbound TCP is redirected here.
    #[arg(long, env = "WARY_INBOUND_PORT", default_value_t = 4143)]
    inbound_port: u16,
    /// The proxy's outbound port: outbound TCP is redirected here.
    #[arg(long, env = "WARY_OUTBOUND_PORT", default_value_t = 4140)]
    outbound_port: u16,
    /// The proxy's admin port, never redirected inbound (probes, Prometheus).
    #[arg(long, env = "WARY_ADMIN_PORT", default_value_t = 4191)]
    admin_port: u16,
    /// More inbound ports left alone, comma-separated (e.g. 22).
    #[arg(long, env = "WARY_SKIP_INBOUND_PORTS", value_parser = PortList::parse, default_value = "")]
    skip_inbound_ports: PortList,
    /// Outbound ports left alone, comma-separated (e.g. 5432 for a database outside
    /// the mesh).
    #[arg(long, env = "WARY_SKIP_OUTBOUND_PORTS", value_parser = PortList::parse, default_value = "")]
    skip_outbound_ports: PortList,
    /// Print the rules (iptables-restore input) instead of installing them.
    #[arg(long)]
    print: bool,
}

fn init(args: InitArgs) -> anyhow::Result<()> {
    if args.proxy_uid == 0 {
        bail!(
            "--proxy-uid 0 would exempt every root process, and so most apps, from the mesh: run the proxy as its own UID (default 2102)"
        );
    }
    let ports = [
        ("--inbound-port", args.inbound_port),
        ("--outbound-port", args.outbound_port),
        ("--admin-port", args.admin_port),
    ];
    for (i, (a, pa)) in ports.iter().enumerate() {
        for (b, pb) in &ports[i + 1..] {
            if pa == pb {
                bail!("{a} and {b} are both {pa}: the proxy's ports must differ, or traffic loops");
            }
        }
    }
    let mut skip_inbound = vec![args.admin_port];
    skip_inbound.extend(args.skip_inbound_ports.0);
    let rules = wary_proxy::init::Rules {
        proxy_uid: args.proxy_uid,
        inbound_port: args.inbound_port,
        outbound_port: args.outbound_port,
        skip_inbound_ports: skip_inbound,
        skip_outbound_ports: args.skip_outbound_ports.0,
    };
    if args.print {
        print!("{}", rules.restore_input());
        return Ok(());
    }
    rules.apply()?;
    eprintln!(
        "wary-proxy init: installed the iptables rules (inbound to :{}, outbound to :{}, UID {} exempt)",
        args.inbound_port, args.outbound_port, args.proxy_uid
    );
    Ok(())
}

/// A comma-separated list of ports; empty for none.
#[derive(Debug, Clone)]
struct PortList(Vec<u16>);

impl PortList {
    fn parse(s: &str) -> Result<Self, String> {
        s.split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| match p.parse::<u16>() {
                Ok(port) if port > 0 => Ok(port),
                _ => Err(format!("{p:?} is not a port (1-65535); give ports like 25,3306")),
            })
            .collect::<Result<_, _>>()
            .map(PortList)
    }
}

impl std::fmt::Display for PortList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ports: Vec<String> = self.0.iter().map(u16::to_string).collect();
        f.write_str(&ports.join(","))
    }
}

fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if let Some(Subcommand::Init(init_args)) = args.command.take() {
        return init(init_args);
    }
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.worker_threads {
        runtime.worker_threads(usize::from(n));
    }
    runtime
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only on a terminal: log files and collectors get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match args.log_format.as_str() {
        "text" => logs.init(),
        "json" => logs.json().init(),
        other => bail!("--log-format {other:?}: use text or json"),
    }
    // Latency summaries: p50, p90, p99 over a rolling minute (3 buckets of 20 s).
    let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_quantiles(&[0.5, 0.9, 0.99])
        .context("quantiles")?
        .set_bucket_duration(Duration::from_secs(20))
        .context("bucket duration")?
        // Service latency as a real histogram, so PromQL can aggregate it.
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(m::RESPONSE_LATENCY.into()),
            &m::LATENCY_BUCKETS,
        )
        .context("latency buckets")?
        .install_recorder()
        .context("cannot install the metrics recorder")?;
    // Histogram samples pile up until drained: drain them every 5 s even if nobody
    // scrapes /metrics, so memory stays bounded.
    tokio::spawn({
        let prometheus = prometheus.clone();
        async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                prometheus.run_upkeep();
            }
        }
    });
    m::describe();

    let token = match (args.join_token, args.join_token_file, args.service_account_token_file) {
        (Some(t), _, _) => TokenSource::Inline(t),
        (None, Some(f), _) => TokenSource::File(f),
        (None, None, Some(f)) => TokenSource::ServiceAccountFile(f),
        (None, None, None) => bail!(
            "no proof of identity: set WARY_JOIN_TOKEN or --join-token-file (mint one with `wary-control-plane token --workload NAME`), or in a cluster --service-account-token-file"
        ),
    };
    // Required by clap unless a subcommand runs.
    let workload = args.workload.context("--workload is required")?;
    let (anchors, origin) = match (&args.trust_anchors, args.trust_anchors_pem) {
        (Some(file), _) => (
            std::fs::read_to_string(file).with_context(|| {
                format!(
                    "cannot read --trust-anchors {}: print the bundle with `wary-control-plane ca bundle`",
                    file.display()
                )
            })?,
            format!("--trust-anchors {}", file.display()),
        ),
        (None, Some(pem)) => (pem, "WARY_TRUST_ANCHORS_PEM".to_string()),
        (None, None) => bail!("--trust-anchors FILE (or WARY_TRUST_ANCHORS_PEM) is required"),
    };
    let bundle = TrustBundle::from_pem(&anchors).with_context(|| origin.clone())?;
    let creds = Credentials::new(bundle)?;
    let trust_domain = TrustDomain::new(&args.trust_domain)?;
    let cp_identity: SpiffeId = match args.control_plane_identity {
        Some(id) => id.parse()?,
        None => SpiffeId::new(trust_domain, "wary-system", "wary-control-plane")?,
    };
    ControlPlane::validate_url(&args.control_plane).map_err(anyhow::Error::msg)?;
    let control_plane = ControlPlane::new(args.control_plane, cp_identity);

    let id = args
        .id
        .unwrap_or_else(|| format!("{}.{}/{}", workload, args.namespace, std::process::id()));
    let node = Node {
        id,
        workload,
        namespace: args.namespace,
        proxy_version: env!("CARGO_PKG_VERSION").to_string(),
    };
    let namespace = node.namespace.clone();
    let (workload_name, workload_namespace) = (node.workload.clone(), node.namespace.clone());
    let config = discovery::DiscoveryConfig::new(control_plane.clone(), creds.clone(), node);
    let cache = Arc::new(Cache::default());

    let admin_listener = std::net::TcpListener::bind(args.admin_addr).with_context(|| {
        format!(
            "cannot listen on {} for admin: pick another with --admin-addr",
            args.admin_addr
        )
    })?;
    let admin_addr = admin_listener.local_addr()?;
    let outbound_listener = TcpListener::bind(args.outbound_addr).await.with_context(|| {
        format!(
            "cannot listen on {} for outbound traffic: pick another with --outbound-addr",
            args.outbound_addr
        )
    })?;
    let inbound_listener = TcpListener::bind(args.inbound_addr).await.with_context(|| {
        format!(
            "cannot listen on {} for inbound traffic: pick another with --inbound-addr",
            args.inbound_addr
        )
    })?;
    let (outbound_addr, inbound_addr) = (outbound_listener.local_addr()?, inbound_listener.local_addr()?);
    let pool = Arc::new(PeerPool::new(
        creds.clone(),
        Duration::from_millis(args.connect_timeout_ms),
    ));
    let drain = Arc::new(Drain::default());
    let shutdown = Arc::new(tokio::sync::Notify::new());
    wary_proxy::header_case::set_enabled(args.header_case == HeaderCase::Preserve);
    let outbound_config = OutboundConfig {
        namespace,
        opaque_ports: args.opaque_ports.0.clone(),
        detect_timeout: Duration::from_millis(args.detect_timeout_ms),
        expect_continue_wait: Duration::from_millis(args.expect_continue_wait_ms),
        access_log: match args.access_log.as_str() {
            "off" => None,
            "json" => Some(wary_proxy::access::AccessLog::start()),
            other => bail!("--access-log {other:?}: use off or json"),
        },
        tracing: args.tracing,
    };
    let outbound = Arc::new(Outbound::new(cache.clone(), pool, outbound_config, drain.clone()));
    let admin = Admin {
        prometheus,
        cache: cache.clone(),
        subscriptions: config.subscriptions(),
        creds: creds.clone(),
        balancers: outbound.balancers(),
        drain: drain.clone(),
        shutdown: shutdown.clone(),
        app_probes: Arc::new(match &args.app_probes {
            Some(json) => wary_proxy::probes::AppProbes::parse(json, inbound_addr.ip()).map_err(anyhow::Error::msg)?,
            None => wary_proxy::probes::AppProbes::default(),
        }),
    };
    admin
        .serve_on_own_thread(admin_listener)
        .context("cannot start the admin server's thread")?;
    // The per-endpoint response times too (see `metrics::EndpointStats`).
    tokio::spawn({
        let balancers = outbound.balancers();
        async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                balancers.drain_metrics();
            }
        }
    });
    tokio::spawn(outbound.serve(outbound_listener));
    let reserved = vec![admin_addr.port(), outbound_addr.port(), inbound_addr.port()];
    let policy_name = format!("{}.{}", workload_name, workload_namespace);
    let inbound = Arc::new(Inbound::new(
        inbound_addr.ip(),
        cache.clone(),
        policy_name,
        reserved,
        args.opaque_ports.0,
        drain.clone(),
    ));
    let inbound_tls = wary_certs::tls::server_config(
        &creds,
        wary_certs::tls::ClientAuth::Required,
        &[wary_certs::tls::ALPN_H2],
    );
    tokio::spawn(inbound.serve(inbound_listener, inbound_tls));

    // Discovery starts once the proxy holds its mesh certificate, and presents it.
    let (certified_tx, certified) = tokio::sync::oneshot::channel();
    let mut identity_config = IdentityConfig::new(control_plane, token);
    // Re-read on fallback to the join token: it may hold anchors this proxy lacks.
    identity_config.trust_anchors = args.trust_anchors.clone();
    tokio::spawn(identity::run(identity_config, creds, move || {
        let _ = certified_tx.send(());
    }));
    tokio::spawn(async move {
        if certified.await.is_ok() {
            discovery::run(config, cache).await;
        }
    });

    tracing::info!(%admin_addr, %inbound_addr, %outbound_addr, "proxy started");
    println!("wary-proxy admin={admin_addr} inbound={inbound_addr} outbound={outbound_addr}");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    tokio::select! {
        _ = interrupt.recv() => {}
        _ = term.recv() => {}
        _ = shutdown.notified() => {}
    }
    let grace = Duration::from_secs(args.shutdown_grace_period_s);
    drain.start();
    tracing::info!(
        open = drain.active(),
        grace_period_s = grace.as_secs(),
        "shutting down: /ready now fails; carrying the app's traffic until it drains"
    );
    let why = tokio::select! {
        _ = drain.idle() => "the app's traffic drained",
        _ = tokio::time::sleep(grace) => "the grace period ended",
        _ = interrupt.recv() => "a second signal",
        _ = term.recv() => "a second signal",
    };
    tracing::info!(open = drain.active(), "proxy stopped: {why}");
    Ok(())
}
