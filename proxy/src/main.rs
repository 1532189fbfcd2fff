//! The `wary-proxy` binary. Configured by `WARY_*` environment variables (what the
//! injector sets) or the same names as flags.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Parser;
use tokio::net::TcpListener;
use wary_proto::discovery::Node;
use wary_proxy::{admin::Admin, discovery, metrics as m, state::Cache};

/// Wary's sidecar proxy.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// The control plane's discovery URL.
    #[arg(long, env = "WARY_CONTROL_PLANE", default_value = "http://127.0.0.1:8086")]
    control_plane: String,
    /// The workload this proxy fronts (its `Workload` document or pod name). Empty for
    /// a proxy that only sends traffic.
    #[arg(long, env = "WARY_WORKLOAD", default_value = "")]
    workload: String,
    /// The workload's namespace.
    #[arg(long, env = "WARY_NAMESPACE", default_value = "default")]
    namespace: String,
    /// A unique name for this proxy in the control plane's logs; default
    /// `<workload>.<namespace>/<pid>`.
    #[arg(long, env = "WARY_PROXY_ID")]
    id: Option<String>,
    /// Address of the admin server (/metrics, /ready, /live, /config_dump).
    #[arg(long, env = "WARY_ADMIN_ADDR", default_value = "127.0.0.1:4191")]
    admin_addr: SocketAddr,
    /// Log format: `text` or `json`. The level is set with RUST_LOG (default `info`).
    #[arg(long, env = "WARY_LOG_FORMAT", default_value = "text")]
    log_format: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
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
    let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .context("cannot install the metrics recorder")?;
    m::describe();

    let id = args
        .id
        .unwrap_or_else(|| format!("{}.{}/{}", args.workload, args.namespace, std::process::id()));
    let node = Node {
        id,
        workload: args.workload,
        namespace: args.namespace,
        proxy_version: env!("CARGO_PKG_VERSION").to_string(),
    };
    let config = discovery::DiscoveryConfig::new(args.control_plane, node);
    let cache = Arc::new(Cache::default());
    let subscriptions = config.subscriptions();

    let admin_listener = TcpListener::bind(args.admin_addr).await.with_context(|| {
        format!(
            "cannot listen on {} for admin: pick another with --admin-addr",
            args.admin_addr
        )
    })?;
    let admin_addr = admin_listener.local_addr()?;
    tokio::spawn(
        Admin {
            prometheus,
            cache: cache.clone(),
            subscriptions,
        }
        .serve(admin_listener),
    );
    tokio::spawn(discovery::run(config, cache));

    tracing::info!(%admin_addr, "proxy started");
    println!("wary-proxy admin={admin_addr}");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("proxy stopped");
    Ok(())
}
