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
use wary_proto::discovery::load_balancer::Algorithm as PbAlgorithm;
use wary_proto::discovery::{Protocol, Service};

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
    /// The port is declared opaque (`appProtocol: tcp`): redirected connections skip
    /// protocol detection.
    pub opaque: bool,
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

/// Routes by every name a client may use, and by the addresses a redirected
/// connection may have been going to (transparent mode).
#[derive(Debug, Default)]
pub struct RouteTable {
    by_name: HashMap<String, Arc<Route>>,
    /// Services' virtual IPs (host names that are IP addresses, e.g. a ClusterIP).
    by_vip: HashMap<std::net::IpAddr, Arc<Route>>,
    /// Each ready endpoint's app address: a connection to a workload's own address
    /// goes to that workload, as Linkerd does for pod IPs.
    by_endpoint: HashMap<SocketAddr, (Arc<Route>, PortTargets)>,
}

impl RouteTable {
    /// Builds the table from discovery state, reusing `balancers`' statistics.
    /// Endpoints whose address does not parse are skipped (discovery already refuses
    /// them, so none should reach here).
    pub fn build(state: &DiscoveryState, balancers: &Balancers) -> Self {
        let (mut by_name, mut by_vip, mut by_endpoint) = (HashMap::new(), HashMap::new(), HashMap::new());
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
                    ports.entry(port).or_default().opaque = p.protocol() == Protocol::Opaque;
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
                if let Ok(ip) = host.parse() {
                    by_vip.insert(ip, route.clone());
                }
            }
            for port in route.ports.values() {
                for target in &port.targets {
                    let only = PortTargets {
                        targets: vec![target.clone()],
                        addrs: vec![target.app],
                        opaque: port.opaque,
                    };
                    by_endpoint.insert(target.app, (route.clone(), only));
                }
            }
        }
        Self {
            by_name,
            by_vip,
            by_endpoint,
        }
    }

    /// The route and targets for `host:port` as a client in `namespace` names them.
    pub fn by_name(&self, host: &str, port: u16, namespace: &str) -> Option<(&Arc<Route>, &PortTargets)> {
        let route = self.resolve(host, namespace)?;
        Some((route, route.ports.get(&port)?))
    }

    /// The route and targets for a connection that was going to `addr`: a service's
    /// virtual IP (every ready endpoint of that port), or one endpoint's own address
    /// (that endpoint alone).
    pub fn by_original(&self, addr: SocketAddr) -> Option<(&Arc<Route>, &PortTargets)> {
        if let Some(route) = self.by_vip.get(&addr.ip()) {
            return Some((route, route.ports.get(&addr.port())?));
        }
        self.by_endpoint.get(&addr).map(|(route, only)| (route, only))
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
