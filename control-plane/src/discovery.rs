//! The discovery server: one task per proxy stream, sending each proxy what it lacks.
//!
//! ```text
//!            snapshots (watch) ──────────────┐
//!                                            ▼
//! proxy ──requests──▶ stream task: per type {subscription, sent versions, nonce}
//!       ◀─responses──     │  diff(snapshot, what the proxy holds) → changed + removed
//!                         ▼
//!                   ProxyRegistry (acked version, last NACK) → /proxies, metrics
//! ```
//!
//! Every stream is authenticated: the proxy presents the mesh certificate it obtained
//! at bootstrap (Identity.Certify with a join token), and receives only the
//! InboundPolicy of workloads running as that identity, so no workload can read another's
//! authorization rules.
//!
//! Versions are content hashes (see [`crate::snapshot`]); what a proxy holds is tracked
//! by name → version, seeded from `initial_resource_versions` on reconnect, so after the
//! first response only what changed travels.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use futures::Stream;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::{Request, Response, Status, Streaming};
use wary_certs::SpiffeId;
use wary_certs::tls::peer_identity;
use wary_proto::discovery::discovery_server::Discovery;
use wary_proto::discovery::{DiscoveryRequest, DiscoveryResponse, InboundPolicy, Node};
use wary_proto::{TypedResource, WILDCARD, kind_of};

use crate::metrics as m;
use crate::snapshot::Snapshot;

/// The most resource names one stream may subscribe to per type, so a peer cannot grow
/// the control plane's memory without bound.
pub const MAX_NAMES: usize = 10_000;

/// The most resources a proxy may claim to hold per type on reconnect.
pub const MAX_HELD: usize = 1_000_000;

/// The longest resource name or node field accepted, bytes (a DNS name's limit).
pub const MAX_NAME_BYTES: usize = 253;

/// NACK reasons are kept and logged up to this many characters.
pub const MAX_REASON_CHARS: usize = 4096;

/// What the control plane knows of one connected proxy, served as JSON on `/proxies`.
#[derive(Debug, Clone, Serialize, Default)]
pub struct ProxyStatus {
    /// The proxy's `Node.id`.
    pub id: String,
    /// Its workload and namespace, as it announced them.
    pub workload: String,
    /// Namespace (`default` when unset).
    pub namespace: String,
    /// Its build version.
    pub proxy_version: String,
    /// Its remote address.
    pub peer: String,
    /// The SPIFFE ID of the certificate it presented.
    pub identity: String,
    /// When the stream opened, seconds since the Unix epoch.
    pub connected_at_unix_seconds: u64,
    /// Per resource kind (`service`, `endpoints`, `inbound_policy`).
    pub types: BTreeMap<&'static str, TypeStatus>,
}

/// One proxy's state for one resource type.
#[derive(Debug, Clone, Serialize, Default)]
pub struct TypeStatus {
    /// The names subscribed to (`*` for all).
    pub subscribed: Vec<String>,
    /// The version of the last response sent.
    pub sent_version: String,
    /// The version the proxy last acknowledged.
    pub acked_version: String,
    /// ACKs received.
    pub acks: u64,
    /// NACKs received.
    pub nacks: u64,
    /// The most recent NACK, if any.
    pub last_nack: Option<Nack>,
    /// Resources the proxy rejected and still runs an older version of: name → the
    /// rejected version. An entry goes when a newer version is sent.
    pub rejected: BTreeMap<String, String>,
}

/// A rejected response.
#[derive(Debug, Clone, Serialize)]
pub struct Nack {
    /// The nonce of the rejected response.
    pub nonce: String,
    /// The version it kept.
    pub kept_version: String,
    /// The proxy's reason.
    pub reason: String,
    /// The resources it rejected.
    pub rejected_resources: Vec<String>,
    /// When, seconds since the Unix epoch.
    pub at_unix_seconds: u64,
}

/// Connected proxies, by stream id.
#[derive(Debug, Default)]
pub struct ProxyRegistry {
    proxies: Mutex<BTreeMap<u64, ProxyStatus>>,
}

impl ProxyRegistry {
    /// Every connected proxy.
    pub fn list(&self) -> Vec<ProxyStatus> {
        self.lock().values().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, ProxyStatus>> {
        // A panic while holding this lock cannot leave the table inconsistent in a way
        // that matters more than losing the admin view, so recover from poisoning.
        self.proxies.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update(&self, stream: u64, f: impl FnOnce(&mut ProxyStatus)) {
        if let Some(p) = self.lock().get_mut(&stream) {
            f(p);
        }
    }

    fn insert(&self, stream: u64, status: ProxyStatus) {
        let mut proxies = self.lock();
        proxies.insert(stream, status);
        metrics::gauge!(m::CONNECTED_PROXIES).set(proxies.len() as f64);
    }

    fn remove(&self, stream: u64) {
        let mut proxies = self.lock();
        proxies.remove(&stream);
        metrics::gauge!(m::CONNECTED_PROXIES).set(proxies.len() as f64);
    }
}

/// The `Discovery` gRPC service.
pub struct DiscoveryService {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    registry: Arc<ProxyRegistry>,
    next_stream: AtomicU64,
    id: String,
    shutdown: watch::Receiver<bool>,
    serving: watch::Receiver<bool>,
}

impl DiscoveryService {
    /// Serves the snapshots published on `snapshots`; `id` names this replica in
    /// responses. When `shutdown` turns true every stream ends with UNAVAILABLE, so
    /// proxies reconnect elsewhere and the server can stop (streams never end by
    /// themselves). Until `serving` turns true, streams are refused with UNAVAILABLE
    /// and the reason.
    pub fn new(
        snapshots: watch::Receiver<Arc<Snapshot>>,
        registry: Arc<ProxyRegistry>,
        id: String,
        shutdown: watch::Receiver<bool>,
        serving: watch::Receiver<bool>,
    ) -> Self {
        Self {
            snapshots,
            registry,
            next_stream: AtomicU64::new(1),
            id,
            shutdown,
            serving,
        }
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Discovery for DiscoveryService {
    type StreamStream = ResponseStream;

    async fn stream(&self, request: Request<Streaming<DiscoveryRequest>>) -> Result<Response<ResponseStream>, Status> {
        if !*self.serving.borrow() {
            return Err(Status::unavailable(
                "the control plane's configuration has errors (see its log or /config) and it serves nothing until \
                 they are fixed; proxies keep their last good state and retry",
            ));
        }
        let peer = request.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        let identity = authenticate(&request).inspect_err(|status| {
            metrics::counter!(m::STREAMS_REFUSED, "reason" => "unauthenticated").increment(1);
            tracing::warn!(%peer, reason = %status.message(), "refused an unauthenticated discovery stream");
        })?;
        let (tx, rx) = mpsc::channel(16);
        let stream = ProxyStream {
            id: self.next_stream.fetch_add(1, Ordering::Relaxed),
            peer,
            identity: identity.to_string(),
            namespace: identity.namespace().to_string(),
            control_plane_id: self.id.clone(),
            registry: self.registry.clone(),
            tx,
            types: HashMap::new(),
            nonce: 0,
            node: None,
        };
        tokio::spawn(stream.run(request.into_inner(), self.snapshots.clone(), self.shutdown.clone()));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// The SPIFFE ID of the mesh certificate the client presented in the TLS handshake
/// (already verified against the trust bundle there).
///
/// # Errors
/// UNAUTHENTICATED, saying how to get a certificate, when it presented none or one
/// without a SPIFFE ID.
fn authenticate<T>(request: &Request<T>) -> Result<SpiffeId, Status> {
    let cert = request
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(TlsConnectInfo::peer_certs)
        .and_then(|certs| certs.first().cloned())
        .ok_or_else(|| {
            Status::unauthenticated(
                "discovery requires the mesh certificate: obtain one with Identity.Certify (a join token proves \
                 who you are) and present it on the discovery connection",
            )
        })?;
    peer_identity(&cert)
        .map_err(|e| Status::unauthenticated(format!("the client certificate has no mesh identity: {e}")))
}

/// One proxy's stream.
struct ProxyStream {
    id: u64,
    peer: String,
    /// The SPIFFE ID the proxy authenticated as.
    identity: String,
    /// Its namespace: a proxy may announce only a node in it.
    namespace: String,
    control_plane_id: String,
    registry: Arc<ProxyRegistry>,
    tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
    types: HashMap<String, TypeStream>,
    nonce: u64,
    node: Option<Node>,
}

/// One resource type on one stream.
#[derive(Default)]
struct TypeStream {
    wildcard: bool,
    names: BTreeSet<String>,
    /// What the proxy holds or has been sent: name → version.
    held: HashMap<String, String>,
    /// The nonce of the latest response; ACK/NACKs of older ones are stale.
    nonce: String,
    sent_version: String,
    /// When the latest response was sent, for the push latency.
    sent_at: Option<std::time::Instant>,
}

impl TypeStream {
    fn subscribed(&self, name: &str) -> bool {
        self.wildcard || self.names.contains(name)
    }
}

/// Ends a stream: the proxy went away, or broke the protocol (the status says how).
enum End {
    Closed,
    Refused(Status),
}

impl ProxyStream {
    async fn run(
        mut self,
        mut incoming: Streaming<DiscoveryRequest>,
        mut snapshots: watch::Receiver<Arc<Snapshot>>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut snapshot = snapshots.borrow_and_update().clone();
        let end = loop {
            let step = tokio::select! {
                _ = async { shutdown.wait_for(|down| *down).await.map(|_| ()) } => Err(End::Refused(Status::unavailable(
                    "the control plane is shutting down; reconnect to another replica",
                ))),
                msg = incoming.message() => match msg {
                    Ok(Some(req)) => self.on_request(req, &snapshot).await,
                    Ok(None) => Err(End::Closed),
                    Err(status) => {
                        tracing::debug!(stream = self.id, %status, "discovery stream broke");
                        Err(End::Closed)
                    }
                },
                changed = snapshots.changed() => match changed {
                    Ok(()) => {
                        snapshot = snapshots.borrow_and_update().clone();
                        self.push_all(&snapshot).await
                    }
                    Err(_) => Err(End::Closed),
                },
            };
            if let Err(end) = step {
                break end;
            }
        };
        if let End::Refused(status) = end {
            let reason = match status.code() {
                tonic::Code::PermissionDenied => "permission_denied",
                tonic::Code::InvalidArgument => "invalid_argument",
                tonic::Code::ResourceExhausted => "resource_exhausted",
                tonic::Code::Unavailable => "unavailable",
                _ => "other",
            };
            metrics::counter!(m::STREAMS_REFUSED, "reason" => reason).increment(1);
            tracing::warn!(stream = self.id, peer = %self.peer, %status, "refused a discovery stream");
            let _ = self.tx.send(Err(status)).await;
        }
        if let Some(node) = &self.node {
            tracing::info!(proxy = ?node.id, peer = %self.peer, "proxy disconnected");
        }
        self.registry.remove(self.id);
    }

    async fn on_request(&mut self, req: DiscoveryRequest, snapshot: &Snapshot) -> Result<(), End> {
        if self.node.is_none() {
            let node = req.node.clone().unwrap_or_default();
            if node.id.len() > MAX_NAME_BYTES
                || node.workload.len() > MAX_NAME_BYTES
                || node.namespace.len() > MAX_NAME_BYTES
            {
                return Err(End::Refused(Status::invalid_argument(format!(
                    "node.id, node.workload and node.namespace must be at most {MAX_NAME_BYTES} bytes"
                ))));
            }
            let namespace = if node.namespace.is_empty() {
                "default"
            } else {
                &node.namespace
            };
            if namespace != self.namespace {
                return Err(End::Refused(Status::permission_denied(format!(
                    "node.namespace {namespace:?} is not the namespace of this proxy's identity {}",
                    self.identity
                ))));
            }
            if node.id.is_empty() {
                return Err(End::Refused(Status::invalid_argument(
                    "the first DiscoveryRequest of a stream must carry node.id (a unique name for the proxy)",
                )));
            }
            // Peer-controlled strings are logged with `?` (escaped), so they cannot forge
            // log lines.
            tracing::info!(proxy = ?node.id, workload = ?node.workload, peer = %self.peer, "proxy connected");
            self.registry.insert(
                self.id,
                ProxyStatus {
                    id: node.id.clone(),
                    workload: node.workload.clone(),
                    namespace: if node.namespace.is_empty() {
                        "default".into()
                    } else {
                        node.namespace.clone()
                    },
                    proxy_version: node.proxy_version.clone(),
                    peer: self.peer.clone(),
                    identity: self.identity.clone(),
                    connected_at_unix_seconds: unix_now(),
                    types: BTreeMap::new(),
                },
            );
            self.node = Some(node);
        }
        if snapshot.get(&req.type_url).is_none() {
            return Err(End::Refused(Status::invalid_argument(format!(
                "unknown type_url {:?}: this control plane serves {}",
                req.type_url,
                crate::snapshot::TYPE_URLS.join(", ")
            ))));
        }
        let kind = kind_of(&req.type_url);
        let too_long = req
            .resource_names_subscribe
            .iter()
            .chain(req.initial_resource_versions.keys())
            .any(|n| n.len() > MAX_NAME_BYTES);
        if too_long {
            return Err(End::Refused(Status::invalid_argument(format!(
                "a resource name is longer than {MAX_NAME_BYTES} bytes"
            ))));
        }
        if req.type_url == InboundPolicy::TYPE_URL {
            self.may_read_policies(&req.resource_names_subscribe, snapshot)?;
        }
        let first = !self.types.contains_key(&req.type_url);
        let ts = self.types.entry(req.type_url.clone()).or_default();
        if first {
            if req.initial_resource_versions.len() > MAX_HELD {
                return Err(End::Refused(Status::resource_exhausted(format!(
                    "more than {MAX_HELD} initial_resource_versions for {kind}"
                ))));
            }
            ts.held = req.initial_resource_versions.into_iter().collect();
        }
        if let Some(err) = req.error_detail {
            // A NACK is recorded even when a newer response superseded the one it answers:
            // delta responses are not cumulative, so its rejections would otherwise be lost.
            metrics::counter!(m::NACKS, "type" => kind).increment(1);
            let proxy = self.node.as_ref().map(|n| n.id.as_str()).unwrap_or_default();
            let reason: String = err.message.chars().take(MAX_REASON_CHARS).collect();
            tracing::warn!(
                proxy, kind, nonce = ?req.response_nonce, kept_version = ?req.version_info,
                rejected = ?err.rejected_resources.iter().take(16).collect::<Vec<_>>(),
                reason = ?reason, "proxy NACKed an update"
            );
            let rejected: Vec<(String, String)> = err
                .rejected_resources
                .iter()
                .take(MAX_NAMES)
                .filter_map(|n| ts.held.get(n).map(|v| (n.clone(), v.clone())))
                .collect();
            let nack = Nack {
                nonce: req.response_nonce.clone(),
                kept_version: req.version_info.clone(),
                reason,
                rejected_resources: err.rejected_resources.into_iter().take(MAX_NAMES).collect(),
                at_unix_seconds: unix_now(),
            };
            let current = req.response_nonce == ts.nonce;
            self.registry.update(self.id, |p| {
                let t = p.types.entry(kind).or_default();
                t.nacks += 1;
                if current {
                    t.acked_version = nack.kept_version.clone();
                }
                t.rejected.extend(rejected);
                t.last_nack = Some(nack);
            });
        } else if !req.response_nonce.is_empty() {
            if req.response_nonce == ts.nonce {
                metrics::counter!(m::ACKS, "type" => kind).increment(1);
                if let Some(sent) = ts.sent_at.take() {
                    metrics::histogram!(m::PUSH_SECONDS, "type" => kind).record(sent.elapsed().as_secs_f64());
                }
                tracing::debug!(stream = self.id, kind, version = %req.version_info, "ACK");
                self.registry.update(self.id, |p| {
                    let t = p.types.entry(kind).or_default();
                    t.acks += 1;
                    t.acked_version = req.version_info.clone();
                });
            } else {
                // An ACK of a response a newer one superseded; the newer one's answer
                // will follow (xDS semantics).
                tracing::debug!(stream = self.id, kind, nonce = %req.response_nonce, "ignoring stale ACK");
            }
        }
        if ts.names.len() + req.resource_names_subscribe.len() > MAX_NAMES {
            return Err(End::Refused(Status::resource_exhausted(format!(
                "more than {MAX_NAMES} {kind} names subscribed on one stream: subscribe to `*` instead"
            ))));
        }
        let mut changed = first;
        for name in req.resource_names_subscribe {
            changed = true;
            if name == WILDCARD {
                ts.wildcard = true;
            } else {
                ts.names.insert(name);
            }
        }
        let unsubscribed = !req.resource_names_unsubscribe.is_empty();
        for name in req.resource_names_unsubscribe {
            if name == WILDCARD {
                ts.wildcard = false;
            } else {
                ts.names.remove(&name);
            }
        }
        if unsubscribed {
            // The proxy drops what it unsubscribed from itself (delta xDS).
            let (wildcard, names) = (ts.wildcard, &ts.names);
            ts.held.retain(|n, _| wildcard || names.contains(n));
        }
        if changed || unsubscribed {
            // The admin view shows the first names only: it must stay cheap to render.
            let shown = 100;
            let mut subscribed: Vec<String> = ts
                .wildcard
                .then(|| WILDCARD.to_string())
                .into_iter()
                .chain(ts.names.iter().take(shown).cloned())
                .collect();
            if ts.names.len() > shown {
                subscribed.push(format!("… and {} more", ts.names.len() - shown));
            }
            self.registry
                .update(self.id, |p| p.types.entry(kind).or_default().subscribed = subscribed);
        }
        if changed {
            // The first request of a type is always answered, even with nothing, so the
            // proxy knows it is in sync.
            self.push(&req.type_url, snapshot, first).await?;
        }
        Ok(())
    }

    /// Refuses a subscription to InboundPolicy names this proxy may not read: every
    /// policy (`*`), or one of a workload running as another identity.
    fn may_read_policies(&self, names: &[String], snapshot: &Snapshot) -> Result<(), End> {
        for name in names {
            if name == WILDCARD {
                return Err(End::Refused(Status::permission_denied(
                    "a proxy reads only its own workload's inbound policy: subscribe to <workload>.<namespace>, \
                     not `*`",
                )));
            }
            // The owner is not named: a proxy learns nothing of other workloads here.
            if snapshot.inbound_owner(name).is_some_and(|owner| owner != self.identity) {
                return Err(End::Refused(Status::permission_denied(format!(
                    "this proxy is {} and reads only its own workload's inbound policy, not {name}: check its \
                     --workload and --namespace",
                    self.identity
                ))));
            }
        }
        Ok(())
    }

    async fn push_all(&mut self, snapshot: &Snapshot) -> Result<(), End> {
        let type_urls: Vec<String> = self.types.keys().cloned().collect();
        for type_url in type_urls {
            self.push(&type_url, snapshot, false).await?;
        }
        Ok(())
    }

    /// Sends what the proxy lacks of one type: changed resources and removed names.
    async fn push(&mut self, type_url: &str, snapshot: &Snapshot, always: bool) -> Result<(), End> {
        let (Some(ts), Some(snap)) = (self.types.get_mut(type_url), snapshot.get(type_url)) else {
            return Ok(());
        };
        // A policy is served only to proxies running as its workload's identity; one
        // whose workload changed service account is withdrawn like a deleted one.
        let policies = type_url == InboundPolicy::TYPE_URL;
        let identity = self.identity.as_str();
        let visible = |name: &str| ts.subscribed(name) && (!policies || snapshot.inbound_owner(name) == Some(identity));
        let resources: Vec<_> = snap
            .resources
            .iter()
            .filter(|(name, r)| visible(name) && ts.held.get(*name) != Some(&r.version))
            .map(|(_, r)| r.as_ref().clone())
            .collect();
        let removed: Vec<String> = ts
            .held
            .keys()
            .filter(|name| !snap.resources.contains_key(*name) || !visible(name))
            .cloned()
            .collect();
        if resources.is_empty() && removed.is_empty() && !always {
            return Ok(());
        }
        for name in &removed {
            ts.held.remove(name);
        }
        for r in &resources {
            ts.held.insert(r.name.clone(), r.version.clone());
        }
        self.nonce += 1;
        ts.nonce = self.nonce.to_string();
        ts.sent_version = snap.version.clone();
        ts.sent_at = Some(std::time::Instant::now());
        let kind = kind_of(type_url);
        metrics::counter!(m::RESPONSES, "type" => kind).increment(1);
        metrics::counter!(m::RESOURCES_SENT, "type" => kind).increment(resources.len() as u64);
        tracing::debug!(
            stream = self.id, kind, version = %snap.version, changed = resources.len(),
            removed = removed.len(), "push"
        );
        let version = snap.version.clone();
        self.registry
            .update(self.id, |p| p.types.entry(kind).or_default().sent_version = version);
        let response = DiscoveryResponse {
            type_url: type_url.to_string(),
            version_info: snap.version.clone(),
            nonce: ts.nonce.clone(),
            resources,
            removed_resources: removed,
            control_plane_id: self.control_plane_id.clone(),
        };
        self.tx.send(Ok(response)).await.map_err(|_| End::Closed)
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}
