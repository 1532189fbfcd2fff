//! What the proxy knows of the mesh: the last good resources from discovery.
//!
//! [`Cache`] holds one immutable [`DiscoveryState`] behind an `ArcSwap`: the request
//! path reads it with one atomic load and no lock ([`Cache::load`]); the discovery
//! client replaces it whole after each update and wakes anyone waiting on
//! [`Cache::subscribe`]. While the control plane is away the last good state stays.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;
use tokio::sync::watch;
use wary_proto::TypedResource;
use wary_proto::discovery::{Endpoints, InboundPolicy, Service};

/// The resources of one type, by resource name, with their versions.
#[derive(Debug, Clone)]
pub struct Resources<T> {
    /// Resources by name (`orders.default`).
    pub items: HashMap<String, Arc<T>>,
    /// Per-resource versions, as the control plane named them; resent on reconnect.
    pub versions: HashMap<String, String>,
    /// The type-level version last accepted (empty before the first response).
    pub version_info: String,
    /// True once a response for this type has been applied on some stream.
    pub synced: bool,
}

impl<T> Default for Resources<T> {
    fn default() -> Self {
        Self {
            items: HashMap::new(),
            versions: HashMap::new(),
            version_info: String::new(),
            synced: false,
        }
    }
}

/// Everything discovery has delivered.
#[derive(Debug, Clone, Default)]
pub struct DiscoveryState {
    /// Services, by `<name>.<namespace>`. Each type sits behind its own `Arc`, so an
    /// update copies only the type it changes.
    pub services: Arc<Resources<Service>>,
    /// Endpoints, by service `<name>.<namespace>`.
    pub endpoints: Arc<Resources<Endpoints>>,
    /// Inbound policies, by `<workload>.<namespace>` (a proxy subscribes to its own).
    pub inbound: Arc<Resources<InboundPolicy>>,
    /// Bumped on every change; 0 before the first.
    pub generation: u64,
}

impl DiscoveryState {
    /// The versions held for a type URL, for `initial_resource_versions`.
    pub fn versions(&self, type_url: &str) -> HashMap<String, String> {
        match type_url {
            Service::TYPE_URL => self.services.versions.clone(),
            Endpoints::TYPE_URL => self.endpoints.versions.clone(),
            InboundPolicy::TYPE_URL => self.inbound.versions.clone(),
            _ => HashMap::new(),
        }
    }

    /// The type-level version held for a type URL.
    pub fn version_info(&self, type_url: &str) -> &str {
        match type_url {
            Service::TYPE_URL => &self.services.version_info,
            Endpoints::TYPE_URL => &self.endpoints.version_info,
            InboundPolicy::TYPE_URL => &self.inbound.version_info,
            _ => "",
        }
    }

    /// True once every type in `type_urls` has been synced at least once.
    pub fn synced(&self, type_urls: &[&str]) -> bool {
        type_urls.iter().all(|t| match *t {
            Service::TYPE_URL => self.services.synced,
            Endpoints::TYPE_URL => self.endpoints.synced,
            InboundPolicy::TYPE_URL => self.inbound.synced,
            _ => false,
        })
    }

    /// The service with resource name `name` (`orders.default`), or with `name` among
    /// its qualified host names (`orders.default.svc.cluster.local`). Linear in the
    /// number of services for host names: the request path uses the indexed
    /// [`crate::routes::RouteTable`] instead.
    pub fn service(&self, name: &str) -> Option<&Arc<Service>> {
        self.services.items.get(name).or_else(|| {
            self.services
                .items
                .values()
                .find(|s| s.hostnames.iter().any(|h| h == name))
        })
    }
}

/// The shared, lock-free view of [`DiscoveryState`].
#[derive(Debug)]
pub struct Cache {
    state: ArcSwap<DiscoveryState>,
    changed: watch::Sender<u64>,
    connected: AtomicBool,
}

impl Default for Cache {
    fn default() -> Self {
        Self {
            state: ArcSwap::from_pointee(DiscoveryState::default()),
            changed: watch::channel(0).0,
            connected: AtomicBool::new(false),
        }
    }
}

impl Cache {
    /// The current state: one atomic load, no lock.
    pub fn load(&self) -> Arc<DiscoveryState> {
        self.state.load_full()
    }

    /// Replaces the state (bumping its generation) and wakes subscribers.
    pub fn store(&self, mut state: DiscoveryState) {
        state.generation = self.state.load().generation + 1;
        let generation = state.generation;
        self.state.store(Arc::new(state));
        self.changed.send_replace(generation);
    }

    /// A receiver that wakes after each [`Cache::store`], carrying the generation.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Whether the discovery stream is up right now.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Records whether the discovery stream is up.
    pub fn set_connected(&self, up: bool) {
        self.connected.store(up, Ordering::Relaxed);
    }
}
