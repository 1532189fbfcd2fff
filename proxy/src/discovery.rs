//! The discovery client: one stream to the control plane, kept alive for the life of
//! the proxy.
//!
//! ```text
//!  connect ──▶ subscribe every type, sending the versions held ──▶ for each response:
//!     ▲            (initial_resource_versions)                     decode + check each
//!     │                                                            resource; apply the
//!  backoff (full jitter,                                           good ones; ACK, or
//!  100 ms doubling to 5 s)                                         NACK naming the bad
//!     └──── stream ends or fails; the last good state stays ◀──────────────┘
//! ```
//!
//! After ztunnel's delta xDS client: every error of a response is gathered into one
//! NACK, versions are recorded only for resources that were applied, and they are
//! resent on reconnect so the control plane sends only what differs.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use wary_certs::SpiffeId;
use wary_certs::credentials::Credentials;
use wary_proto::discovery::discovery_client::DiscoveryClient as GrpcClient;
use wary_proto::discovery::{
    DiscoveryRequest, DiscoveryResponse, Endpoints, ErrorDetail, InboundPolicy, Node, Resource, Service, load_balancer,
};
use wary_proto::{TypedResource, WILDCARD, kind_of};

use crate::control::ControlPlane;
use crate::metrics as m;
use crate::state::{Cache, DiscoveryState, Resources};

/// A session that lasted this long and delivered updates resets the reconnect backoff:
/// 10 s.
pub const HEALTHY_SESSION: Duration = Duration::from_secs(10);

/// The largest discovery response accepted: 64 MiB, as the control plane's limit.
pub const MAX_RESPONSE_BYTES: usize = 64 << 20;

/// Reconnection backoff: full jitter (AWS Architecture Blog, "Exponential Backoff And
/// Jitter"), attempt n waits uniform(0, min(max, base × 2^n)).
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// Default 100 ms.
    pub base: Duration,
    /// Default 5 s: the longest a proxy waits to reconnect once the control plane is
    /// back.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(100),
            max: Duration::from_secs(5),
        }
    }
}

impl Backoff {
    /// The delay before reconnect attempt `attempt` (0-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self.base.saturating_mul(1 << attempt.min(20)).min(self.max);
        rand::rng().random_range(Duration::ZERO..=ceiling)
    }
}

/// A check the embedder adds to the built-in ones: return `Err(reason)` to refuse a
/// resource, which is then NACKed and not applied. Given the type URL and the resource.
pub type ExtraCheck = Arc<dyn Fn(&str, &Resource) -> Result<(), String> + Send + Sync>;

/// How to reach the control plane and what to ask it for.
#[derive(Clone)]
pub struct DiscoveryConfig {
    /// The control plane.
    pub control_plane: ControlPlane,
    /// This proxy's credentials: the trust bundle that verifies the control plane, and
    /// the mesh certificate presented to it once issued.
    pub creds: Arc<Credentials>,
    /// Who this proxy is.
    pub node: Node,
    /// Reconnection backoff.
    pub backoff: Backoff,
    /// Extra resource checks; none by default.
    pub extra_check: Option<ExtraCheck>,
}

impl DiscoveryConfig {
    /// Defaults for everything but the control plane, credentials and node.
    pub fn new(control_plane: ControlPlane, creds: Arc<Credentials>, node: Node) -> Self {
        Self {
            control_plane,
            creds,
            node,
            backoff: Backoff::default(),
            extra_check: None,
        }
    }

    /// The type URLs this proxy subscribes to, with their names: every Service and
    /// Endpoints, and its own InboundPolicy when it fronts a workload.
    pub fn subscriptions(&self) -> Vec<(&'static str, Vec<String>)> {
        let mut subs = vec![
            (Service::TYPE_URL, vec![WILDCARD.to_string()]),
            (Endpoints::TYPE_URL, vec![WILDCARD.to_string()]),
        ];
        if !self.node.workload.is_empty() {
            let ns = if self.node.namespace.is_empty() {
                "default"
            } else {
                &self.node.namespace
            };
            subs.push((InboundPolicy::TYPE_URL, vec![format!("{}.{ns}", self.node.workload)]));
        }
        subs
    }
}

/// Why a discovery session ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The control plane could not be reached.
    #[error("{0}; is it running, and is --control-plane right?")]
    Connect(String),
    /// The stream was refused or broke.
    #[error("discovery stream failed: {0}")]
    Stream(#[from] tonic::Status),
    /// The control plane closed the stream.
    #[error("the control plane closed the discovery stream")]
    Closed,
}

/// Runs discovery for the life of the proxy: connects, applies updates into `cache`,
/// and reconnects with backoff whenever the stream ends. Never returns.
pub async fn run(config: DiscoveryConfig, cache: Arc<Cache>) {
    let mut attempt = 0u32;
    loop {
        let mut progressed = false;
        let started = tokio::time::Instant::now();
        let result = session(&config, &cache, &mut progressed).await;
        metrics::gauge!(m::DISCOVERY_CONNECTED).set(0.0);
        cache.set_connected(false);
        // Back off afresh only after a stream that delivered and stayed up a while: a
        // control plane that answers once and hangs up must not cause a reconnect storm.
        if progressed && started.elapsed() >= HEALTHY_SESSION {
            attempt = 0;
        }
        let delay = config.backoff.delay(attempt);
        attempt = attempt.saturating_add(1);
        metrics::counter!(m::DISCOVERY_RECONNECTS).increment(1);
        if let Err(e) = result {
            tracing::warn!(
                error = %e, retry_in_ms = delay.as_millis() as u64,
                "discovery unavailable; serving the last good configuration"
            );
        }
        tokio::time::sleep(delay).await;
    }
}

/// One stream: returns when it ends. `progressed` is set once a response was applied,
/// so the caller resets its backoff.
async fn session(config: &DiscoveryConfig, cache: &Cache, progressed: &mut bool) -> Result<(), SessionError> {
    let channel = config
        .control_plane
        .connect(&config.creds)
        .await
        .map_err(SessionError::Connect)?;
    let (tx, rx) = mpsc::channel(16);
    let held = cache.load();
    for (i, (type_url, names)) in config.subscriptions().into_iter().enumerate() {
        let request = DiscoveryRequest {
            node: (i == 0).then(|| config.node.clone()),
            type_url: type_url.to_string(),
            resource_names_subscribe: names,
            initial_resource_versions: held.versions(type_url).into_iter().collect(),
            ..Default::default()
        };
        // The channel has room for every initial request.
        let _ = tx.try_send(request);
    }
    let mut responses = GrpcClient::new(channel)
        .max_decoding_message_size(MAX_RESPONSE_BYTES)
        .stream(ReceiverStream::new(rx))
        .await?
        .into_inner();
    metrics::gauge!(m::DISCOVERY_CONNECTED).set(1.0);
    cache.set_connected(true);
    tracing::info!(control_plane = %config.control_plane.url, "discovery connected");
    while let Some(response) = responses.message().await? {
        let answer = apply(config.extra_check.as_ref(), cache, response);
        *progressed = true;
        if tx.send(answer).await.is_err() {
            break;
        }
    }
    Err(SessionError::Closed)
}

/// Applies one response to the cache and returns its ACK or NACK.
fn apply(extra_check: Option<&ExtraCheck>, cache: &Cache, response: DiscoveryResponse) -> DiscoveryRequest {
    let type_url = response.type_url.as_str();
    let kind = kind_of(type_url);
    let mut state = DiscoveryState::clone(&cache.load());
    let previous_version = state.version_info(type_url).to_string();
    let mut errors = Vec::new();
    let check = |r: &Resource| extra_check.map_or(Ok(()), |c| c(type_url, r));
    match type_url {
        Service::TYPE_URL => merge(Arc::make_mut(&mut state.services), &response, &mut errors, |r| {
            check(r)?;
            check_service(decode(r)?)
        }),
        Endpoints::TYPE_URL => merge(Arc::make_mut(&mut state.endpoints), &response, &mut errors, |r| {
            check(r)?;
            check_endpoints(decode(r)?)
        }),
        InboundPolicy::TYPE_URL => merge(Arc::make_mut(&mut state.inbound), &response, &mut errors, |r| {
            check(r)?;
            check_inbound(decode(r)?)
        }),
        other => errors.push(("(response)".into(), format!("unknown resource type {other:?}"))),
    }
    let nack = !errors.is_empty();
    let version_info = if nack {
        previous_version
    } else {
        response.version_info.clone()
    };
    set_version(&mut state, type_url, &version_info);
    cache.store(state);
    // The version as a number: proxies showing the same value hold the same config.
    if let Ok(v) = u64::from_str_radix(version_info.get(..13).unwrap_or(&version_info), 16) {
        metrics::gauge!(m::DISCOVERY_VERSION, "type" => kind).set(v as f64);
    }
    metrics::counter!(m::DISCOVERY_UPDATES, "type" => kind, "result" => if nack { "nack" } else { "ack" }).increment(1);
    let error_detail = nack.then(|| {
        let message = errors
            .iter()
            .map(|(name, e)| format!("{kind} {name}: {e}"))
            .collect::<Vec<_>>()
            .join("\n");
        tracing::warn!(kind, version = %response.version_info, %message, "rejected part of a discovery update (NACK)");
        ErrorDetail {
            code: tonic::Code::InvalidArgument as i32,
            message,
            rejected_resources: errors.into_iter().map(|(name, _)| name).collect(),
        }
    });
    if error_detail.is_none() {
        tracing::debug!(kind, version = %version_info, "applied discovery update (ACK)");
    }
    DiscoveryRequest {
        type_url: response.type_url,
        response_nonce: response.nonce,
        version_info,
        error_detail,
        ..Default::default()
    }
}

fn decode<T: TypedResource>(r: &Resource) -> Result<T, String> {
    let any = r.resource.as_ref().ok_or("resource is empty")?;
    T::from_any(any).map_err(|e| e.to_string())
}

/// Applies the decodable, valid resources and the removals of one response.
fn merge<T>(
    into: &mut Resources<T>,
    response: &DiscoveryResponse,
    errors: &mut Vec<(String, String)>,
    decode: impl Fn(&Resource) -> Result<T, String>,
) {
    for r in &response.resources {
        if r.name.is_empty() {
            errors.push(("(unnamed)".into(), "resource has no name".into()));
            continue;
        }
        match decode(r) {
            Ok(item) => {
                into.items.insert(r.name.clone(), Arc::new(item));
                into.versions.insert(r.name.clone(), r.version.clone());
            }
            Err(e) => errors.push((r.name.clone(), e)),
        }
    }
    for name in &response.removed_resources {
        into.items.remove(name);
        into.versions.remove(name);
    }
    into.synced = true;
}

fn set_version(state: &mut DiscoveryState, type_url: &str, version: &str) {
    let v = match type_url {
        Service::TYPE_URL => &mut Arc::make_mut(&mut state.services).version_info,
        Endpoints::TYPE_URL => &mut Arc::make_mut(&mut state.endpoints).version_info,
        InboundPolicy::TYPE_URL => &mut Arc::make_mut(&mut state.inbound).version_info,
        _ => return,
    };
    *v = version.to_string();
}

fn port(p: u32, what: &str) -> Result<(), String> {
    if (1..=65535).contains(&p) {
        Ok(())
    } else {
        Err(format!("{what} {p} is not a port"))
    }
}

fn check_service(s: Service) -> Result<Service, String> {
    for p in &s.ports {
        port(p.port, "port")?;
        port(p.target_port, "target port")?;
        wary_proto::discovery::Protocol::try_from(p.protocol)
            .map_err(|_| format!("unknown protocol {}", p.protocol))?;
    }
    if let Some(lb) = s.traffic_policy.as_ref().and_then(|tp| tp.load_balancer.as_ref()) {
        load_balancer::Algorithm::try_from(lb.algorithm)
            .map_err(|_| format!("unknown load balancer algorithm {}", lb.algorithm))?;
    }
    Ok(s)
}

fn check_endpoints(e: Endpoints) -> Result<Endpoints, String> {
    for ep in &e.endpoints {
        ep.address
            .parse::<IpAddr>()
            .map_err(|_| format!("endpoint address {:?} is not an IP address", ep.address))?;
        port(ep.port, "endpoint port")?;
        if ep.mesh_port != 0 {
            port(ep.mesh_port, "mesh port")?;
            ep.identity.parse::<SpiffeId>().map_err(|e| e.to_string())?;
        }
    }
    Ok(e)
}

fn check_inbound(p: InboundPolicy) -> Result<InboundPolicy, String> {
    use wary_proto::discovery::{DefaultInboundPolicy, MtlsMode, Protocol, authorization::Action};
    p.identity.parse::<SpiffeId>().map_err(|e| e.to_string())?;
    MtlsMode::try_from(p.mtls_mode).map_err(|_| format!("unknown mTLS mode {}", p.mtls_mode))?;
    DefaultInboundPolicy::try_from(p.default_policy)
        .map_err(|_| format!("unknown default inbound policy {}", p.default_policy))?;
    for port_ in &p.ports {
        port(port_.port, "port")?;
        Protocol::try_from(port_.protocol).map_err(|_| format!("unknown protocol {}", port_.protocol))?;
        if let Some(m) = port_.mtls_mode {
            MtlsMode::try_from(m).map_err(|_| format!("unknown mTLS mode {m} on port {}", port_.port))?;
        }
    }
    for a in &p.authorizations {
        match Action::try_from(a.action) {
            Ok(Action::Allow | Action::Deny) => {}
            // Failing closed: a policy whose action is unknown must not allow anything.
            _ => return Err(format!("authorization {} has no known action ({})", a.name, a.action)),
        }
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_bounded_and_grows() {
        let b = Backoff::default();
        for attempt in 0..40 {
            assert!(b.delay(attempt) <= b.max);
        }
        assert!(b.delay(0) <= Duration::from_millis(100));
        // Full jitter draws from [0, ceiling]: the largest of many draws at attempt 5
        // (ceiling 3.2 s) is far above attempt 0's ceiling.
        let most = (0..200).map(|_| b.delay(5)).max().unwrap();
        assert!(most > Duration::from_secs(1), "{most:?}");
    }

    fn response(resources: Vec<Resource>, removed: Vec<String>, version: &str) -> DiscoveryResponse {
        DiscoveryResponse {
            type_url: Endpoints::TYPE_URL.into(),
            version_info: version.into(),
            nonce: "1".into(),
            resources,
            removed_resources: removed,
            control_plane_id: String::new(),
        }
    }

    fn endpoints(name: &str, address: &str) -> Resource {
        let e = Endpoints {
            service: name.into(),
            namespace: "default".into(),
            endpoints: vec![wary_proto::discovery::Endpoint {
                address: address.into(),
                port: 8080,
                ready: true,
                ..Default::default()
            }],
        };
        Resource {
            name: format!("{name}.default"),
            version: address.into(),
            resource: Some(e.to_any()),
        }
    }

    #[test]
    fn applies_good_resources_and_nacks_bad_ones() {
        let cache = Cache::default();
        let ack = apply(None, &cache, response(vec![endpoints("a", "127.0.0.1")], vec![], "v1"));
        assert!(ack.error_detail.is_none());
        assert_eq!(ack.version_info, "v1");

        let nack = apply(
            None,
            &cache,
            response(
                vec![endpoints("a", "not-an-ip"), endpoints("b", "127.0.0.2")],
                vec![],
                "v2",
            ),
        );
        let detail = nack.error_detail.expect("a NACK");
        assert_eq!(detail.rejected_resources, ["a.default"]);
        assert!(
            detail.message.contains("\"not-an-ip\" is not an IP address"),
            "{}",
            detail.message
        );
        assert_eq!(nack.version_info, "v1", "a NACK carries the version still in use");
        let state = cache.load();
        assert_eq!(
            state.endpoints.items["a.default"].endpoints[0].address, "127.0.0.1",
            "kept the good one"
        );
        assert!(
            state.endpoints.items.contains_key("b.default"),
            "applied the valid resource"
        );

        let ack = apply(None, &cache, response(vec![], vec!["b.default".into()], "v3"));
        assert!(ack.error_detail.is_none());
        assert!(!cache.load().endpoints.items.contains_key("b.default"));
    }
}
