//! The Kubernetes source of truth (`--kubernetes`): watchers on the cluster, turned
//! into the same documents a configuration directory holds, so everything after
//! ([`crate::resources`], discovery) is the same code in both modes.
//!
//! ```text
//! kube watchers (list, then watch; relist on expiry) ─▶ reflector stores
//!   Services, EndpointSlices, Pods, Namespaces, TrafficPolicy, AuthorizationPolicy,
//!   MeshConfig ─▶ changed ─▶ quiet for `debounce` ─▶ documents() ─▶ publish
//! ```
//!
//! The mapping:
//! * a Service with a selector ─▶ `Service` (its ports, `appProtocol`, `clusterIPs`);
//!   one without (endpoints managed elsewhere) or of type ExternalName is not meshed;
//! * a running Pod with an IP, not on the host network ─▶ `Workload`: its labels,
//!   service account, and app ports (its containers' TCP ports and the target ports of
//!   the Services that select it); meshed (inbound 4143) when it runs `wary-proxy`,
//!   else reached in plaintext; ready and zoned as its EndpointSlices say (their
//!   `ready` condition), or by its own Ready condition when no slice lists it;
//! * the policy CRDs ─▶ themselves, validated as in a file; an invalid object keeps
//!   its last good version in force and is reported like a file error.
//!
//! Discovery is served only once every watcher has listed (as the file source waits
//! for a clean first read), so a restarted control plane never tells proxies to drop
//! what it has not read yet.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use tokio::sync::{Notify, watch};

use crate::config_watch::{ConfigStatus, OnConflict, publish};
use crate::local::{AppProtocol, ServicePort, ServiceSpec, TargetPort, WorkloadPort, WorkloadSpec};
use crate::policy::{AuthorizationPolicy, MeshConfig, TrafficPolicy};
use crate::snapshot::Snapshot;
use crate::source::{Body, Document, Origin};

/// The container that marks a pod as meshed.
const PROXY_CONTAINER: &str = crate::inject::PROXY_CONTAINER;

/// The cluster as the watchers last saw it.
#[derive(Clone)]
pub struct Stores {
    /// Services, all namespaces.
    pub services: Store<Service>,
    /// EndpointSlices, all namespaces.
    pub slices: Store<EndpointSlice>,
    /// Pods, all namespaces (without `managedFields`).
    pub pods: Store<Pod>,
    /// Namespaces (their labels say whether to inject).
    pub namespaces: Store<Namespace>,
    /// TrafficPolicies.
    pub traffic: Store<TrafficPolicy>,
    /// AuthorizationPolicies.
    pub authorization: Store<AuthorizationPolicy>,
    /// MeshConfigs (cluster-scoped; at most one).
    pub mesh: Store<MeshConfig>,
}

/// Starts a watcher per kind on `client`; `changed` is notified on every event.
pub fn watch_cluster(client: &Client, changed: Arc<Notify>) -> Stores {
    fn start<K>(api: Api<K>, changed: Arc<Notify>) -> Store<K>
    where
        K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
        K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
    {
        let (reader, writer) = reflector::store();
        let kind = K::kind(&K::DynamicType::default()).to_string();
        let stream = watcher(api, watcher::Config::default())
            .default_backoff()
            // managedFields are most of a Pod's size and nothing the mesh reads.
            .modify(|o: &mut K| o.meta_mut().managed_fields = None)
            .reflect(writer);
        tokio::spawn(async move {
            futures::pin_mut!(stream);
            while let Some(event) = stream.next().await {
                match event {
                    Ok(_) => changed.notify_one(),
                    // The backoff retries; the stores keep the last state seen.
                    Err(e) => tracing::warn!(kind, error = %e, "watch failed; retrying"),
                }
            }
        });
        reader
    }
    Stores {
        services: start(Api::all(client.clone()), changed.clone()),
        slices: start(Api::all(client.clone()), changed.clone()),
        pods: start(Api::all(client.clone()), changed.clone()),
        namespaces: start(Api::all(client.clone()), changed.clone()),
        traffic: start(Api::all(client.clone()), changed.clone()),
        authorization: start(Api::all(client.clone()), changed.clone()),
        mesh: start(Api::all(client.clone()), changed),
    }
}

impl Stores {
    /// Waits until every watcher has listed its kind once.
    ///
    /// # Errors
    /// A watcher stopped before it listed (the process is shutting down).
    pub async fn ready(&self) -> anyhow::Result<()> {
        let stopped = |_| anyhow::anyhow!("a Kubernetes watcher stopped before its first list");
        self.services.wait_until_ready().await.map_err(stopped)?;
        self.slices.wait_until_ready().await.map_err(stopped)?;
        self.pods.wait_until_ready().await.map_err(stopped)?;
        self.namespaces.wait_until_ready().await.map_err(stopped)?;
        self.traffic.wait_until_ready().await.map_err(stopped)?;
        self.authorization.wait_until_ready().await.map_err(stopped)?;
        self.mesh.wait_until_ready().await.map_err(stopped)?;
        Ok(())
    }

    /// A namespace's labels, `None` when it is not (yet) known.
    pub fn namespace_labels(&self, name: &str) -> Option<BTreeMap<String, String>> {
        self.namespaces
            .get(&reflector::ObjectRef::new(name))
            .map(|ns| ns.labels().clone())
    }

    /// The documents the cluster says, and what could not be read (each
    /// `kubernetes:<Kind>/<namespace>/<name>: reason`).
    pub fn documents(&self, last_good: &mut LastGood) -> (Vec<Document>, Vec<String>) {
        let services = self.services.state();
        let slices = self.slices.state();
        let pods = self.pods.state();
        let traffic = self.traffic.state();
        let authorization = self.authorization.state();
        let mesh = self.mesh.state();
        documents(&services, &slices, &pods, &traffic, &authorization, &mesh, last_good)
    }
}

/// The last valid version of each policy object, kept in force while a newer version
/// is invalid.
#[derive(Debug, Default)]
pub struct LastGood(HashMap<String, Document>);

fn origin(kind: &str, namespace: &str, name: &str) -> Origin {
    let path = if namespace.is_empty() {
        format!("kubernetes:{kind}/{name}")
    } else {
        format!("kubernetes:{kind}/{namespace}/{name}")
    };
    Origin {
        file: PathBuf::from(path),
        line: 0,
    }
}

/// The documents of a cluster's objects (see the module notes for the mapping).
pub fn documents(
    services: &[Arc<Service>],
    slices: &[Arc<EndpointSlice>],
    pods: &[Arc<Pod>],
    traffic: &[Arc<TrafficPolicy>],
    authorization: &[Arc<AuthorizationPolicy>],
    mesh: &[Arc<MeshConfig>],
    last_good: &mut LastGood,
) -> (Vec<Document>, Vec<String>) {
    let mut docs = Vec::new();
    let mut errors = Vec::new();

    let meshed_services: Vec<(&Service, ServiceSpec)> = services
        .iter()
        .filter_map(|s| Some((s.as_ref(), service_spec(s)?)))
        .collect();
    // By namespace, so each pod looks only at its own namespace's Services.
    let mut services_in: HashMap<String, Vec<&ServiceSpec>> = HashMap::new();
    for (svc, spec) in &meshed_services {
        services_in
            .entry(svc.namespace().unwrap_or_default())
            .or_default()
            .push(spec);
    }
    for (s, spec) in &meshed_services {
        let (ns, name) = (s.namespace().unwrap_or_default(), s.name_any());
        docs.push(Document {
            origin: origin("Service", &ns, &name),
            name,
            namespace: ns,
            labels: s.labels().clone(),
            body: Body::Service(spec.clone()),
        });
    }

    // What the EndpointSlices say of each pod (by UID, so a recreated StatefulSet pod
    // does not inherit its predecessor's entry): ready, and its zone. Slices of a
    // Service that publishes not-ready addresses say nothing about readiness.
    let publishes_not_ready: std::collections::HashSet<(String, String)> = services
        .iter()
        .filter(|s| s.spec.as_ref().and_then(|s| s.publish_not_ready_addresses) == Some(true))
        .map(|s| (s.namespace().unwrap_or_default(), s.name_any()))
        .collect();
    let mut listed: HashMap<String, (bool, String)> = HashMap::new();
    for slice in slices {
        let ns = slice.namespace().unwrap_or_default();
        let service = slice
            .labels()
            .get("kubernetes.io/service-name")
            .cloned()
            .unwrap_or_default();
        if publishes_not_ready.contains(&(ns, service)) {
            continue;
        }
        for e in slice.endpoints.iter().flatten() {
            let Some(uid) = e
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .and_then(|r| r.uid.clone())
            else {
                continue;
            };
            let ready = e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            let zone = e.zone.clone().unwrap_or_default();
            let entry = listed.entry(uid).or_insert((false, zone));
            entry.0 |= ready;
        }
    }

    for pod in pods {
        let (ns, name) = (pod.namespace().unwrap_or_default(), pod.name_any());
        let Some(mut spec) = workload_spec(pod) else { continue };
        let labels = pod.labels().clone();
        // The ports its Services send to, which a container need not declare.
        for sspec in services_in.get(&ns).into_iter().flatten() {
            if !sspec.selector.iter().all(|(k, v)| labels.get(k) == Some(v)) {
                continue;
            }
            for p in &sspec.ports {
                let port = match &p.target_port {
                    Some(TargetPort::Number(n)) => *n,
                    Some(TargetPort::Name(_)) => continue,
                    None => p.port,
                };
                match spec.ports.iter_mut().find(|w| w.port == port) {
                    Some(w) if w.app_protocol == AppProtocol::Detect => w.app_protocol = p.app_protocol,
                    Some(_) => {}
                    None => spec.ports.push(WorkloadPort {
                        name: String::new(),
                        port,
                        app_protocol: p.app_protocol,
                        mtls: None,
                    }),
                }
            }
        }
        if let Some((ready, zone)) = pod.uid().and_then(|uid| listed.get(&uid)) {
            // A terminating pod is out whatever its slice says.
            spec.ready = *ready && pod.metadata.deletion_timestamp.is_none();
            spec.zone = zone.clone();
        }
        docs.push(Document {
            origin: origin("Pod", &ns, &name),
            name,
            namespace: ns,
            labels,
            body: Body::Workload(spec),
        });
    }

    // Objects seen now: the last good version of a deleted object is forgotten.
    let mut seen: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut policy = |kind: &str,
                      ns: String,
                      name: String,
                      labels: BTreeMap<String, String>,
                      body: Body,
                      problems: Vec<crate::policy::FieldError>| {
        let key = format!("{kind}/{ns}/{name}");
        seen.insert(key.clone());
        let doc = Document {
            origin: origin(kind, &ns, &name),
            name,
            namespace: ns,
            labels,
            body,
        };
        if problems.is_empty() {
            last_good.0.insert(key, doc.clone());
            docs.push(doc);
        } else {
            for p in &problems {
                errors.push(format!("{}: {}: {}", doc.origin.file.display(), p.path, p.reason));
            }
            match last_good.0.get(&key) {
                Some(good) => docs.push(good.clone()),
                None => errors.push(format!(
                    "{}: not in force until it is fixed (no earlier valid version)",
                    doc.origin.file.display()
                )),
            }
        }
    };
    for tp in traffic {
        let problems = tp.spec.validate();
        let (ns, name, labels) = (tp.namespace().unwrap_or_default(), tp.name_any(), tp.labels().clone());
        policy(
            "TrafficPolicy",
            ns,
            name,
            labels,
            Body::TrafficPolicy(Box::new(tp.as_ref().clone())),
            problems,
        );
    }
    for ap in authorization {
        let problems = ap.spec.validate();
        let (ns, name, labels) = (ap.namespace().unwrap_or_default(), ap.name_any(), ap.labels().clone());
        policy(
            "AuthorizationPolicy",
            ns,
            name,
            labels,
            Body::AuthorizationPolicy(Box::new(ap.as_ref().clone())),
            problems,
        );
    }
    for mc in mesh {
        let problems = mc.spec.validate();
        let (name, labels) = (mc.name_any(), mc.labels().clone());
        policy(
            "MeshConfig",
            String::new(),
            name,
            labels,
            Body::MeshConfig(Box::new(mc.spec.clone())),
            problems,
        );
    }
    last_good.0.retain(|key, _| seen.contains(key));
    // Documents in a stable order, so the same cluster always computes the same thing.
    docs.sort_by(|a, b| (a.body.kind(), &a.namespace, &a.name).cmp(&(b.body.kind(), &b.namespace, &b.name)));
    (docs, errors)
}

/// Kubernetes `appProtocol` values (IANA names, `kubernetes.io/h2c`, and the
/// mesh's own) as the mesh's protocols; anything else is detected.
fn app_protocol(value: Option<&str>) -> AppProtocol {
    match value.map(str::to_ascii_lowercase).as_deref() {
        Some("http" | "http/1.1") => AppProtocol::Http,
        Some("kubernetes.io/h2c" | "h2c" | "http2") => AppProtocol::Http2,
        Some("grpc") => AppProtocol::Grpc,
        Some("tcp" | "kubernetes.io/tcp" | "opaque") => AppProtocol::Tcp,
        _ => AppProtocol::Detect,
    }
}

fn service_spec(s: &Service) -> Option<ServiceSpec> {
    let spec = s.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    let selector = spec.selector.clone().filter(|s| !s.is_empty())?;
    let ports: Vec<ServicePort> = spec
        .ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter_map(|p| {
            Some(ServicePort {
                name: p.name.clone().unwrap_or_default(),
                port: u16::try_from(p.port).ok()?,
                target_port: match &p.target_port {
                    Some(IntOrString::Int(n)) => Some(TargetPort::Number(u16::try_from(*n).ok()?)),
                    Some(IntOrString::String(name)) => Some(TargetPort::Name(name.clone())),
                    None => None,
                },
                app_protocol: app_protocol(p.app_protocol.as_deref()),
                mtls: None,
            })
        })
        .collect();
    if ports.is_empty() {
        return None;
    }
    let cluster_ips = spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(spec.cluster_ip.iter())
        .filter_map(|ip| ip.parse::<IpAddr>().ok())
        .fold(Vec::new(), |mut v, ip| {
            if !v.contains(&ip) {
                v.push(ip);
            }
            v
        });
    Some(ServiceSpec {
        selector,
        ports,
        cluster_ips,
    })
}

fn workload_spec(pod: &Pod) -> Option<WorkloadSpec> {
    let spec = pod.spec.as_ref()?;
    let status = pod.status.as_ref()?;
    if spec.host_network == Some(true) || matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return None;
    }
    let service_account = spec
        .service_account_name
        .clone()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".into());
    // The control plane's own pods: its identity is never a workload's.
    if pod.namespace().as_deref() == Some(crate::identity::CONTROL_PLANE_NAMESPACE)
        && service_account == crate::identity::CONTROL_PLANE_SERVICE_ACCOUNT
    {
        return None;
    }
    let address: IpAddr = status.pod_ip.as_deref()?.parse().ok()?;
    let meshed = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .any(|c| c.name == PROXY_CONTAINER);
    let mut ports: Vec<WorkloadPort> = Vec::new();
    for p in spec
        .containers
        .iter()
        .filter(|c| c.name != PROXY_CONTAINER)
        .flat_map(|c| c.ports.iter().flatten())
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
    {
        // The API server lets a pod declare a port twice; the mesh needs it once.
        match u16::try_from(p.container_port) {
            Ok(port) if port != crate::local::DEFAULT_INBOUND_PORT && !ports.iter().any(|w| w.port == port) => ports
                .push(WorkloadPort {
                    name: p.name.clone().unwrap_or_default(),
                    port,
                    app_protocol: AppProtocol::Detect,
                    mtls: None,
                }),
            _ => {}
        }
    }
    let ready = pod.metadata.deletion_timestamp.is_none()
        && status
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True");
    Some(WorkloadSpec {
        service_account,
        address,
        ports,
        inbound_port: if meshed { crate::local::DEFAULT_INBOUND_PORT } else { 0 },
        zone: String::new(),
        weight: 100,
        ready,
        command: Vec::new(),
        env: BTreeMap::new(),
    })
}

/// Recomputes and publishes whenever the cluster changes: `debounce` after the last
/// event (at most [`crate::config_watch::MAX_DEBOUNCE`] after the first), then writes
/// each policy object's `Accepted` condition ([`crate::policy_status`]). Runs until
/// the process ends.
pub async fn run(
    client: Client,
    stores: Stores,
    changed: Arc<Notify>,
    snapshots: watch::Sender<Arc<Snapshot>>,
    status: watch::Sender<ConfigStatus>,
    debounce: Duration,
) {
    let mut last_good = LastGood::default();
    // Each policy object's Accepted condition says what /config says of it; written by
    // a task of its own, so a slow API server never holds up what proxies are sent.
    let (problems, problems_rx) = watch::channel(Vec::new());
    tokio::spawn(crate::policy_status::run(client, stores.clone(), problems_rx));
    loop {
        let (docs, errors) = stores.documents(&mut last_good);
        publish(&docs, errors, OnConflict::LeaveOut, "kubernetes", &snapshots, &status);
        // Sent on every pass (not only when different): a new object needs its status
        // even when the errors are unchanged.
        problems.send_replace(status.borrow().errors.clone());
        changed.notified().await;
        let started = tokio::time::Instant::now();
        while started.elapsed() < crate::config_watch::MAX_DEBOUNCE
            && tokio::time::timeout(debounce, changed.notified()).await.is_ok()
        {}
    }
}

/// The Secret, in the control plane's namespace, that holds the mesh CA.
pub const CA_SECRET: &str = "wary-ca";

/// The CA directory's files, as the Secret's keys.
const CA_FILES: [&str; 6] = [
    "trust-bundle.pem",
    "issuer.pem",
    "issuer-key.pem",
    "next.pem",
    "next-key.pem",
    "token.key",
];

/// Fills `dir` (created, 0700) with the mesh CA from Secret [`CA_SECRET`] in
/// `namespace`; when there is none, creates a CA there and stores it in the Secret.
/// Replicas starting together race to create it: the loser reads the winner's, so
/// every replica signs with the same CA.
///
/// # Errors
/// The API refused (RBAC: get and create on that Secret), or the files cannot be
/// written.
pub async fn ca_from_secret(
    client: &Client,
    namespace: &str,
    trust_domain: &wary_certs::TrustDomain,
    dir: &std::path::Path,
) -> anyhow::Result<()> {
    use anyhow::Context;
    use k8s_openapi::ByteString;
    use k8s_openapi::api::core::v1::Secret;
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};

    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let write_all = |secret: &Secret| -> anyhow::Result<()> {
        for name in CA_FILES {
            let path = dir.join(name);
            match secret.data.as_ref().and_then(|d| d.get(name)) {
                Some(ByteString(bytes)) => {
                    std::fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))?;
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
                }
                None => {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        Ok(())
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let not_allowed = |e: kube::Error| {
        anyhow::anyhow!(
            "cannot read or create Secret {namespace}/{CA_SECRET} (the mesh CA): {e}; the control plane's Role needs get and create on it"
        )
    };
    if let Some(secret) = api.get_opt(CA_SECRET).await.map_err(not_allowed)? {
        tracing::info!(namespace, secret = CA_SECRET, "using the mesh CA from its Secret");
        return write_all(&secret);
    }
    crate::ca_store::CaStore::open_or_create(dir, trust_domain)?;
    let mut data = BTreeMap::new();
    for name in CA_FILES {
        if let Ok(bytes) = std::fs::read(dir.join(name)) {
            data.insert(name.to_string(), ByteString(bytes));
        }
    }
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(CA_SECRET.into()),
            namespace: Some(namespace.into()),
            labels: Some(BTreeMap::from([("app.kubernetes.io/name".into(), "wary".into())])),
            ..Default::default()
        },
        data: Some(data),
        type_: Some("Opaque".into()),
        ..Default::default()
    };
    match api.create(&kube::api::PostParams::default(), &secret).await {
        Ok(_) => {
            tracing::info!(
                namespace,
                secret = CA_SECRET,
                "created a new mesh CA and stored it in its Secret"
            );
            Ok(())
        }
        // Another replica created it first: use theirs.
        Err(kube::Error::Api(status)) if status.code == 409 => {
            let winner = api.get(CA_SECRET).await.map_err(not_allowed)?;
            tracing::info!(
                namespace,
                secret = CA_SECRET,
                "another replica created the mesh CA: using it"
            );
            write_all(&winner)
        }
        Err(e) => Err(not_allowed(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(attempts: u32) -> Arc<TrafficPolicy> {
        let v = serde_json::json!({"apiVersion": "policy.wary.io/v1alpha1", "kind": "TrafficPolicy",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"targetRef": {"kind": "Service", "name": "web"}, "retries": {"attempts": attempts}}});
        Arc::new(serde_json::from_value(v).unwrap())
    }

    fn attempts(docs: &[Document]) -> Vec<Option<u32>> {
        docs.iter()
            .filter_map(|d| match &d.body {
                Body::TrafficPolicy(tp) => Some(tp.spec.retries.as_ref().and_then(|r| r.attempts)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn an_invalid_policy_keeps_its_last_good_version() {
        let mut last_good = LastGood::default();
        let (docs, errors) = documents(&[], &[], &[], &[tp(3)], &[], &[], &mut last_good);
        assert!(errors.is_empty());
        assert_eq!(attempts(&docs), [Some(3)]);
        let (docs, errors) = documents(&[], &[], &[], &[tp(0)], &[], &[], &mut last_good);
        assert_eq!(attempts(&docs), [Some(3)]);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].starts_with("kubernetes:TrafficPolicy/shop/web: spec.retries.attempts"),
            "{errors:?}"
        );
        // Never valid: left out, and said so.
        let (docs, errors) = documents(&[], &[], &[], &[tp(0)], &[], &[], &mut LastGood::default());
        assert!(attempts(&docs).is_empty());
        assert_eq!(errors.len(), 2, "{errors:?}");
    }
}
