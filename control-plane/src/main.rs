//! The `wary-control-plane` binary: the control plane itself, and the operator
//! commands for its CA (`ca`) and join tokens (`token`).

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;
use tokio::sync::watch;
use wary_certs::TrustDomain;
use wary_certs::credentials::Credentials;
use wary_control_plane::ca_store::CaStore;
use wary_control_plane::inject::NativeSidecars;
use wary_control_plane::{
    admin::Admin, config_watch, discovery, identity, kubernetes, metrics as m, snapshot::Snapshot,
};
use wary_proto::discovery::discovery_server::DiscoveryServer;
use wary_proto::identity::identity_server::IdentityServer;

/// Wary's control plane: serves topology, policy and workload certificates to every
/// proxy.
#[derive(Parser, Debug)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Read topology and policy from this directory of YAML documents, and watch it.
    #[arg(long, env = "WARY_CONFIG_DIR")]
    config_dir: Option<PathBuf>,
    /// Read topology and policy from the Kubernetes API (in a cluster).
    #[arg(long, conflicts_with = "config_dir")]
    kubernetes: bool,
    /// Print the CustomResourceDefinitions of the policy documents (YAML) and exit.
    #[arg(long)]
    print_crds: bool,
    /// The mesh CA's directory (trust bundle, issuer, token key); created on first use.
    /// Default: $HOME/.local/state/wary/ca.
    #[arg(long, env = "WARY_CA_DIR")]
    ca_dir: Option<PathBuf>,
    /// Address of the discovery and identity (gRPC over TLS) server. Port 0 picks a free
    /// port.
    #[arg(long, env = "WARY_DISCOVERY_ADDR", default_value = "127.0.0.1:8086")]
    discovery_addr: SocketAddr,
    /// Address of the admin server (/metrics, /ready, /config, /proxies).
    #[arg(long, env = "WARY_ADMIN_ADDR", default_value = "127.0.0.1:9990")]
    admin_addr: SocketAddr,
    /// Quiet time after the last file change before the directory is re-read, in ms.
    #[arg(long, env = "WARY_DEBOUNCE_MS", default_value_t = 100)]
    debounce_ms: u64,
    /// Log format: `text` or `json`. The level is set with RUST_LOG (default `info`).
    #[arg(long, env = "WARY_LOG_FORMAT", default_value = "text")]
    log_format: String,
    #[command(flatten)]
    webhook: WebhookArgs,
}

/// The sidecar-injection webhook (off unless --webhook-addr is given).
#[derive(clap::Args, Debug)]
struct WebhookArgs {
    /// Serve the mutating admission webhook (`POST /inject`, over TLS) here, e.g.
    /// 0.0.0.0:9443 (what the chart sets).
    #[arg(long, env = "WARY_WEBHOOK_ADDR", requires_all = ["webhook_cert", "webhook_key"])]
    webhook_addr: Option<SocketAddr>,
    /// The webhook's TLS certificate chain (PEM), for its Service's DNS name.
    #[arg(long, env = "WARY_WEBHOOK_CERT", requires = "webhook_addr")]
    webhook_cert: Option<PathBuf>,
    /// The webhook's TLS private key (PEM).
    #[arg(long, env = "WARY_WEBHOOK_KEY", requires = "webhook_addr")]
    webhook_key: Option<PathBuf>,
    /// The CPU request of injected proxies (Kubernetes quantity).
    #[arg(long, env = "WARY_PROXY_CPU_REQUEST", default_value = "100m")]
    proxy_cpu_request: String,
    /// The memory request of injected proxies.
    #[arg(long, env = "WARY_PROXY_MEMORY_REQUEST", default_value = "32Mi")]
    proxy_memory_request: String,
    /// The memory limit of injected proxies.
    #[arg(long, env = "WARY_PROXY_MEMORY_LIMIT", default_value = "256Mi")]
    proxy_memory_limit: String,
    /// The image injected proxies (and their init step) run.
    #[arg(long, env = "WARY_PROXY_IMAGE")]
    proxy_image: Option<String>,
    /// Its pull policy: Always, IfNotPresent or Never.
    #[arg(long, env = "WARY_PROXY_IMAGE_PULL_POLICY", default_value = "IfNotPresent")]
    proxy_image_pull_policy: String,
    /// The discovery URL injected proxies dial.
    #[arg(
        long,
        env = "WARY_INJECT_CONTROL_PLANE_URL",
        default_value = "https://wary-control-plane.wary-system.svc:8086"
    )]
    inject_control_plane_url: String,
    /// Inject the proxy as a native sidecar (an init container with restartPolicy:
    /// Always): auto (on Kubernetes 1.29 and later, from the API server's version),
    /// true, or false (the proxy as the first regular container).
    #[arg(long, env = "WARY_NATIVE_SIDECARS", value_enum, default_value_t = NativeSidecars::Auto)]
    native_sidecars: NativeSidecars,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print a join token for one workload: its proxy's proof of identity at start-up.
    Token {
        /// The workload (its Workload document's name).
        #[arg(long)]
        workload: String,
        /// Its namespace.
        #[arg(long, default_value = "default")]
        namespace: String,
        /// How long the token is valid, e.g. 24h, 30m.
        #[arg(long, default_value = "24h")]
        ttl: String,
        /// The mesh CA's directory.
        #[arg(long, env = "WARY_CA_DIR")]
        ca_dir: Option<PathBuf>,
    },
    /// Create or rotate the mesh's trust anchor.
    Ca {
        #[command(subcommand)]
        action: CaAction,
        /// The mesh CA's directory.
        #[arg(long, env = "WARY_CA_DIR", global = true)]
        ca_dir: Option<PathBuf>,
        /// The trust domain of new anchors.
        #[arg(long, default_value = "cluster.local", global = true)]
        trust_domain: String,
    },
}

#[derive(Subcommand, Debug)]
enum CaAction {
    /// Create the CA directory (a trust anchor, issuer and token key) if it is empty.
    Init,
    /// Print the trust bundle (PEM): give it to proxies as --trust-anchors.
    Bundle,
    /// Rotation step 1: create a new anchor and trust it alongside the old one.
    AddAnchor,
    /// Rotation step 2: sign new certificates with the new anchor.
    UseNext,
    /// Rotation step 3: stop trusting the old anchor.
    DropOld,
}

/// Where topology and policy come from.
enum Source {
    /// A watched directory of YAML.
    Dir {
        dir: PathBuf,
        config: config_watch::ConfigWatch,
    },
    /// The cluster's API server.
    Kubernetes {
        client: kube::Client,
        stores: kubernetes::Stores,
        changed: Arc<tokio::sync::Notify>,
    },
}

fn default_ca_dir() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
        .join(".local/state/wary/ca")
}

fn operator(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Token {
            workload,
            namespace,
            ttl,
            ca_dir,
        } => {
            let ttl = wary_control_plane::duration::Duration::parse(&ttl).map_err(anyhow::Error::msg)?;
            wary_certs::check_label("workload", &workload)?;
            wary_certs::check_label("namespace", &namespace)?;
            let dir = ca_dir.unwrap_or_else(default_ca_dir);
            let store = CaStore::open_or_create(&dir, &TrustDomain::default())?;
            let material = store.current()?;
            println!(
                "{}",
                wary_control_plane::tokens::mint(&material.token_key, &namespace, &workload, ttl.0)
            );
        }
        Command::Ca {
            action,
            ca_dir,
            trust_domain,
        } => {
            let dir = ca_dir.unwrap_or_else(default_ca_dir);
            let td = TrustDomain::new(&trust_domain)?;
            let done = |what: &str| eprintln!("{what} in {}", dir.display());
            match action {
                CaAction::Init => {
                    CaStore::open_or_create(&dir, &td)?;
                    done("the mesh CA is ready");
                }
                CaAction::Bundle => {
                    let store = CaStore::open_or_create(&dir, &td)?;
                    let pem = wary_control_plane::ca_store::bundle_pem(&*store.current()?);
                    print!("{}", pem.replace("\r\n", "\n"));
                }
                CaAction::AddAnchor => {
                    CaStore::add_anchor(&dir, &td)?;
                    done("added a new anchor to the trust bundle; once proxies have renewed, run `ca use-next`");
                }
                CaAction::UseNext => {
                    CaStore::use_next(&dir)?;
                    done("new certificates are signed by the new anchor; once proxies have renewed, run `ca drop-old`");
                }
                CaAction::DropOld => {
                    CaStore::drop_old(&dir)?;
                    done("the old anchor is no longer trusted");
                }
            }
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(command) = args.command {
        return operator(command);
    }
    if args.print_crds {
        print!("{}", wary_control_plane::policy::crds_yaml()?);
        return Ok(());
    }
    init_logging(&args.log_format)?;
    let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .context("cannot install the metrics recorder")?;
    m::describe();

    let (snapshots, rx) = watch::channel(Arc::new(Snapshot::default()));
    let (status, status_rx) = watch::channel(config_watch::ConfigStatus::default());
    let debounce = Duration::from_millis(args.debounce_ms);
    // The admin server first: /live and /ready (503, saying why) answer while the
    // configuration is still being read (a cluster may take a while to list).
    let (serving_tx, serving) = watch::channel(false);
    let registry = Arc::new(discovery::ProxyRegistry::default());
    let admin_listener = TcpListener::bind(args.admin_addr).await.with_context(|| {
        format!(
            "cannot listen on {} for admin: pick another with --admin-addr",
            args.admin_addr
        )
    })?;
    let admin_addr = admin_listener.local_addr()?;
    let admin = Admin {
        prometheus,
        registry: registry.clone(),
        status: status_rx.clone(),
        serving: serving.clone(),
    };
    tokio::spawn(admin.serve(admin_listener));
    // The first read happens before the discovery server starts, so the first proxy
    // gets the configuration rather than an empty state.
    let source = if args.kubernetes {
        let config = kube::Config::infer().await.context(
            "no Kubernetes API to read: in a pod the service account's credentials are used, elsewhere KUBECONFIG",
        )?;
        let cluster = config.cluster_url.clone();
        let client = kube::Client::try_from(config).context("cannot set up the Kubernetes client")?;
        let changed = Arc::new(tokio::sync::Notify::new());
        let stores = kubernetes::watch_cluster(&client, changed.clone());
        tracing::info!(%cluster, "listing Services, EndpointSlices, Pods, Namespaces and the policy CRDs (discovery starts once all are listed; a failing list is retried and logged)");
        stores.ready().await?;
        let mut last_good = kubernetes::LastGood::default();
        let (docs, errors) = stores.documents(&mut last_good);
        let on_conflict = config_watch::OnConflict::LeaveOut;
        config_watch::publish(&docs, errors, on_conflict, "kubernetes", &snapshots, &status);
        Source::Kubernetes {
            client,
            stores,
            changed,
        }
    } else {
        let dir = args
            .config_dir
            .clone()
            .context("--config-dir DIR is required: a directory of YAML documents (e.g. examples/quickstart); in a cluster, --kubernetes")?;
        if !dir.exists() {
            bail!(
                "--config-dir {}: does not exist; point it at a directory of YAML documents (e.g. examples/quickstart)",
                dir.display()
            );
        }
        if !dir.is_dir() {
            bail!(
                "--config-dir {}: not a directory; point it at a directory of YAML documents (e.g. examples/quickstart)",
                dir.display()
            );
        }
        let mut config = config_watch::ConfigWatch::start(dir.clone())?;
        config.reload(&snapshots, &status).await;
        Source::Dir { dir, config }
    };
    let mesh = snapshots.borrow().mesh.clone();
    let ca_dir = match (&source, args.ca_dir.clone()) {
        (_, Some(dir)) => dir,
        (Source::Dir { .. }, None) => default_ca_dir(),
        (Source::Kubernetes { client, .. }, None) => {
            // The CA lives in a Secret every replica shares; each keeps a private copy.
            let dir = std::env::temp_dir().join(format!("wary-ca-{}", std::process::id()));
            let namespace = std::env::var("WARY_NAMESPACE").unwrap_or_else(|_| client.default_namespace().to_string());
            kubernetes::ca_from_secret(client, &namespace, &mesh.trust_domain, &dir).await?;
            dir
        }
    };
    let ca = Arc::new(CaStore::open_or_create(&ca_dir, &mesh.trust_domain).with_context(|| {
        format!(
            "the CA directory {} is unusable: fix it, or point --ca-dir at an empty directory to create a new CA",
            ca_dir.display()
        )
    })?);
    let own_identity = identity::control_plane_identity(&mesh.trust_domain);
    let creds = Credentials::new(ca.current()?.bundle.clone())?;
    identity::issue_own(&*ca.current()?, &creds, &own_identity, mesh.certificate_lifetime)
        .map_err(|e| anyhow::anyhow!("cannot issue the control plane's certificate: {e}"))?;
    tokio::spawn(identity::serve_own_certificate(
        ca.clone(),
        creds.clone(),
        own_identity,
        snapshots.subscribe(),
    ));
    // The injected layout follows the API server's version (native sidecars from 1.29).
    let setting = args.webhook.native_sidecars;
    let native_sidecar = match &source {
        Source::Kubernetes { client, .. } if args.webhook.webhook_addr.is_some() && setting == NativeSidecars::Auto => {
            match client.apiserver_version().await {
                Ok(info) => {
                    let native = setting.native(Some((&info.major, &info.minor)));
                    tracing::info!(native, api_server = %info.git_version, "the injected proxy's layout");
                    native
                }
                Err(e) => {
                    // Unknown counts as too old: the regular layout works everywhere.
                    tracing::warn!(error = %e, "cannot read the API server's version: injecting the proxy as a regular container");
                    false
                }
            }
        }
        _ => setting.native(None),
    };
    let (where_from, verifier, namespace_labels, watch_task): (
        String,
        Arc<dyn identity::ProofVerifier>,
        wary_control_plane::webhook::NamespaceLabels,
        _,
    ) = match source {
        Source::Dir { dir, config } => (
            dir.display().to_string(),
            Arc::new(identity::JoinTokens(ca.clone())),
            // Local mode knows no namespaces (none is labelled): only pod labels ask
            // for injection.
            Arc::new(|_: &str| Some(std::collections::BTreeMap::new())),
            tokio::spawn(config.run(snapshots, status, debounce)),
        ),
        Source::Kubernetes {
            client,
            stores,
            changed,
        } => (
            "kubernetes".to_string(),
            Arc::new(identity::TokenReviews(client.clone())),
            Arc::new({
                let stores = stores.clone();
                move |ns: &str| stores.namespace_labels(ns)
            }),
            tokio::spawn(kubernetes::run(client, stores, changed, snapshots, status, debounce)),
        ),
    };

    // Discovery is served only once the directory has read clean: a file that is broken
    // at start-up has no last good version, and serving without it would tell every
    // reconnecting proxy to remove what that file declares.
    let mut clean = status_rx.clone();
    // In a cluster an invalid object is left out (or kept at its last good version)
    // and the rest is served: one team's bad policy must not stop the mesh.
    let kubernetes_mode = args.kubernetes;
    tokio::spawn(async move {
        if kubernetes_mode || clean.borrow().errors.is_empty() {
            let _ = serving_tx.send(true);
            return;
        }
        tracing::error!("not serving discovery until the configuration reads clean: fix the errors above");
        if clean.wait_for(|s| s.errors.is_empty()).await.is_ok() {
            tracing::info!("the configuration reads clean: serving discovery");
            let _ = serving_tx.send(true);
        }
    });

    let discovery_listener = TcpListener::bind(args.discovery_addr).await.with_context(|| {
        format!(
            "cannot listen on {} for discovery: is another control plane running? Pick another with --discovery-addr",
            args.discovery_addr
        )
    })?;
    let discovery_addr = discovery_listener.local_addr()?;

    let (shutdown_tx, shutdown) = watch::channel(false);
    let id = format!("wary-control-plane/{}", std::process::id());
    let identity_service = identity::IdentityService::new(ca.clone(), rx.clone(), verifier);
    let service = discovery::DiscoveryService::new(rx, registry, id, shutdown, serving);

    let webhook_addr = match args.webhook.webhook_addr {
        None => None,
        Some(addr) => {
            let w = &args.webhook;
            let (cert, key) = (w.webhook_cert.as_deref(), w.webhook_key.as_deref());
            let tls = wary_control_plane::webhook::tls_config(
                cert.context("--webhook-cert is required with --webhook-addr")?,
                key.context("--webhook-key is required with --webhook-addr")?,
            )?;
            let listener = TcpListener::bind(addr).await.with_context(|| {
                format!("cannot listen on {addr} for the webhook: pick another with --webhook-addr")
            })?;
            let bound = listener.local_addr()?;
            let defaults = wary_control_plane::inject::InjectConfig::default();
            let webhook = wary_control_plane::webhook::Webhook {
                config: wary_control_plane::inject::InjectConfig {
                    image: w.proxy_image.clone().unwrap_or(defaults.image.clone()),
                    image_pull_policy: w.proxy_image_pull_policy.clone(),
                    control_plane: w.inject_control_plane_url.clone(),
                    trust_domain: mesh.trust_domain.to_string(),
                    trust_anchors_pem: ca.current()?.bundle.to_pem().replace("\r\n", "\n"),
                    native_sidecar,
                    cpu_request: w.proxy_cpu_request.clone(),
                    memory_request: w.proxy_memory_request.clone(),
                    memory_limit: w.proxy_memory_limit.clone(),
                    ..defaults
                },
                namespace_labels,
            };
            tokio::spawn(Arc::new(webhook).serve(listener, tls));
            Some(bound)
        }
    };
    tracing::info!(%discovery_addr, %admin_addr, ?webhook_addr, source = %where_from, "control plane started");
    // One machine-readable line on stdout, for scripts and tests that pick port 0.
    let webhook_field = webhook_addr.map(|a| format!(" webhook={a}")).unwrap_or_default();
    println!(
        "wary-control-plane discovery={discovery_addr} admin={admin_addr} trust_anchors={}{webhook_field}",
        ca_dir.join("trust-bundle.pem").display()
    );

    let (stopping_tx, stopping) = tokio::sync::oneshot::channel::<()>();
    let server = tonic::transport::Server::builder()
        // Find proxies that vanished without closing (the network fails).
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .tcp_keepalive(Some(Duration::from_secs(30)))
        .add_service(
            DiscoveryServer::new(service)
                // Requests carry the versions a proxy holds; room for large meshes.
                .max_decoding_message_size(MAX_REQUEST_BYTES)
                .max_encoding_message_size(MAX_RESPONSE_BYTES),
        )
        .add_service(IdentityServer::new(identity_service))
        .serve_with_incoming_shutdown(
            wary_control_plane::tls_listener::incoming(
                discovery_listener,
                wary_certs::tls::server_config(
                    &creds,
                    wary_certs::tls::ClientAuth::Optional,
                    &[wary_certs::tls::ALPN_H2],
                ),
            ),
            async {
                let _ = stopping.await;
            },
        );
    tokio::pin!(server);
    tokio::select! {
        r = &mut server => r.context("discovery server failed")?,
        _ = watch_task => bail!("the configuration watcher stopped"),
        _ = shutdown_signal() => {
            tracing::info!("stopping: closing every discovery stream");
            let _ = shutdown_tx.send(true);
            let _ = stopping_tx.send(());
            if tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await.is_err() {
                tracing::warn!("streams still open after {SHUTDOWN_GRACE:?}; stopping anyway");
            }
        }
    }
    tracing::info!("control plane stopped");
    Ok(())
}

/// The largest discovery request accepted: 16 MiB (room for the versions a proxy of a
/// 100 000-resource mesh holds).
const MAX_REQUEST_BYTES: usize = 16 << 20;
/// The largest discovery response sent: 64 MiB. Proxies accept the same.
const MAX_RESPONSE_BYTES: usize = 64 << 20;
/// How long open streams get to close on shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn init_logging(format: &str) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only on a terminal: log files and collectors get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        "text" => builder.init(),
        "json" => builder.json().init(),
        other => bail!("--log-format {other:?}: use text or json"),
    }
    Ok(())
}
