//! The outbound route table: everything the request path needs, computed once per
//! discovery update so that a request does lookups only (no parsing, no formatting, no
//! scans over services).
//!
//! ```text
//! DiscoveryState ──(each update)──▶ RouteTable
//!                                     host name ─▶ Route (service, balancer settings,
//!                                                   requests counter, and per service
//!                                                   port: ready targets + addresses)
//! ```

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use wary_certs::SpiffeId;
use wary_proto::discovery::Service;
use wary_proto::discovery::load_balancer::Algorithm as PbAlgorithm;

use crate::balance::{Algorithm, Balancer, Balancers, Settings};
use crate::metrics as m;
use crate::state::DiscoveryState;

/// Where one endpoint is reached.
#[derive(Debug, Clone)]
pub enum Via {
    /// Through its proxy: HTTP/2 over mTLS to `peer`, which must present `identity`.
    Mesh {
        /// The peer proxy's inbound address.
        peer: SocketAddr,
        /// The identity it must present.
        identity: SpiffeId,
    },
    /// Directly, in plaintext (an endpoint without a proxy).
    Plain,
}

/// One ready endpoint of a service port.
#[derive(Debug, Clone)]
pub struct Target {
    /// The app's address (the balancer's key).
    pub app: SocketAddr,
    /// How to reach it.
    pub via: Via,
}

/// The ready endpoints of one service port.
#[derive(Debug, Default)]
pub struct PortTargets {
    /// The targets.
    pub targets: Vec<Target>,
    /// Their app addresses, in the same order, for the balancer.
    pub addrs: Vec<SocketAddr>,
}

/// A destination service.
#[derive(Debug)]
pub struct Route {
    /// `<name>.<namespace>`.
    pub name: String,
    /// Balancer settings from its TrafficPolicy.
    pub settings: Settings,
    /// Its balancer (statistics survive updates).
    pub balancer: Arc<Balancer>,
    /// Requests to it, `wary_proxy_requests_total{direction="outbound",service=…}`.
    pub requests: metrics::Counter,
    /// Ready targets by service port.
    pub ports: HashMap<u16, PortTargets>,
}

/// Routes by every name a client may use.
#[derive(Debug, Default)]
pub struct RouteTable {
    by_name: HashMap<String, Arc<Route>>,
}

impl RouteTable {
    /// Builds the table from discovery state, reusing `balancers`' statistics.
    /// Endpoints whose address does not parse are skipped (discovery already refuses
    /// them, so none should reach here).
    pub fn build(state: &DiscoveryState, balancers: &Balancers) -> Self {
        let mut by_name = HashMap::new();
        for (name, service) in &state.services.items {
            let mut ports: HashMap<u16, PortTargets> = HashMap::new();
            for e in state.endpoints.items.get(name).iter().flat_map(|e| e.endpoints.iter()) {
                let (Ok(ip), Ok(port), Ok(service_port)) =
                    (e.address.parse(), u16::try_from(e.port), u16::try_from(e.service_port))
                else {
                    continue;
                };
                if !e.ready {
                    continue;
                }
                let via = match (u16::try_from(e.mesh_port), e.identity.parse::<SpiffeId>()) {
                    (Ok(0), _) => Via::Plain,
                    (Ok(mesh), Ok(identity)) => Via::Mesh {
                        peer: SocketAddr::new(ip, mesh),
                        identity,
                    },
                    _ => continue,
                };
                let app = SocketAddr::new(ip, port);
                let slot = ports.entry(service_port).or_default();
                slot.targets.push(Target { app, via });
                slot.addrs.push(app);
            }
            for p in &service.ports {
                if let Ok(port) = u16::try_from(p.port) {
                    ports.entry(port).or_default();
                }
            }
            let route = Arc::new(Route {
                name: name.clone(),
                settings: settings(service),
                balancer: balancers.get(name),
                requests: metrics::counter!(m::REQUESTS, "direction" => "outbound", "service" => name.clone()),
                ports,
            });
            by_name.insert(name.clone(), route.clone());
            for host in &service.hostnames {
                by_name.insert(host.clone(), route.clone());
            }
        }
        Self { by_name }
    }

    /// The route a client in `namespace` means by `host`: a resource or host name, or a
    /// bare name in the client's own namespace.
    pub fn resolve(&self, host: &str, namespace: &str) -> Option<&Arc<Route>> {
        match self.by_name.get(host) {
            Some(r) => Some(r),
            None if !host.contains('.') => self.by_name.get(&format!("{host}.{namespace}")),
            None => None,
        }
    }
}

/// The balancer settings a service's traffic policy asks for.
fn settings(service: &Service) -> Settings {
    let lb = service.traffic_policy.as_ref().and_then(|tp| tp.load_balancer.as_ref());
    let duration = |d: Option<&prost_types::Duration>| {
        d.and_then(|d| {
            Some(Duration::new(
                u64::try_from(d.seconds).ok()?,
                u32::try_from(d.nanos).ok()?,
            ))
        })
    };
    let defaults = Settings::default();
    Settings {
        algorithm: match lb.map(|lb| lb.algorithm()) {
            Some(PbAlgorithm::RoundRobin) => Algorithm::RoundRobin,
            _ => Algorithm::Ewma,
        },
        decay: duration(lb.and_then(|lb| lb.decay.as_ref()))
            .filter(|d| !d.is_zero())
            .unwrap_or(defaults.decay),
        default_rtt: duration(lb.and_then(|lb| lb.default_rtt.as_ref())).unwrap_or(defaults.default_rtt),
    }
}
