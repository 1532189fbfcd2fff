//! A snapshot: every resource the control plane serves, by type and name, with
//! content-derived versions.
//!
//! Versions are hashes of content, never counters, so the control plane stays stateless:
//! a restarted or second replica names the same state the same way, and a proxy that
//! reconnects with `initial_resource_versions` gets only what really differs.

use std::collections::BTreeMap;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use wary_proto::TypedResource;
use wary_proto::discovery::{Endpoints, InboundPolicy, Resource, Service};

/// Every resource of one type.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TypeSnapshot {
    /// Hash of every (name, version) pair: the type-level `version_info`.
    pub version: String,
    /// Resources by name.
    pub resources: BTreeMap<String, Arc<Resource>>,
}

/// Every resource the control plane serves, and the mesh-wide settings it serves them
/// under.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    types: BTreeMap<&'static str, TypeSnapshot>,
    /// Who may read each InboundPolicy: its name (`<workload>.<namespace>`) → the SPIFFE
    /// ID the workload runs as. Discovery serves a policy only to a proxy presenting
    /// that identity.
    owners: BTreeMap<String, String>,
    /// Mesh-wide settings (from `MeshConfig`).
    pub mesh: MeshSettings,
}

/// Mesh-wide settings the control plane itself acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshSettings {
    /// The SPIFFE trust domain; default `cluster.local`.
    pub trust_domain: wary_certs::TrustDomain,
    /// Workload certificate lifetime; default 24 h.
    pub certificate_lifetime: std::time::Duration,
}

impl Default for MeshSettings {
    fn default() -> Self {
        Self {
            trust_domain: wary_certs::TrustDomain::default(),
            certificate_lifetime: wary_certs::ca::DEFAULT_CERT_LIFETIME,
        }
    }
}

/// The type URLs a snapshot holds, in the order they are served.
pub const TYPE_URLS: [&str; 3] = [Service::TYPE_URL, Endpoints::TYPE_URL, InboundPolicy::TYPE_URL];

impl Default for Snapshot {
    fn default() -> Self {
        SnapshotBuilder::default().build()
    }
}

impl Snapshot {
    /// The resources of one type; `None` for a type URL the control plane does not serve.
    pub fn get(&self, type_url: &str) -> Option<&TypeSnapshot> {
        self.types.get(type_url)
    }

    /// The SPIFFE ID the workload of InboundPolicy `name` runs as, if it exists.
    pub fn inbound_owner(&self, name: &str) -> Option<&str> {
        self.owners.get(name).map(String::as_str)
    }

    /// Whether some configured workload runs as `identity` (a SPIFFE ID).
    pub fn runs_as(&self, identity: &str) -> bool {
        self.owners.values().any(|o| o == identity)
    }

    /// The type-level versions, for logs: `service=ab12… endpoints=…`.
    pub fn versions(&self) -> String {
        self.types
            .iter()
            .map(|(t, s)| format!("{}={}", wary_proto::kind_of(t), s.version))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Resource count per type, for logs.
    pub fn counts(&self) -> String {
        self.types
            .iter()
            .map(|(t, s)| format!("{}={}", wary_proto::kind_of(t), s.resources.len()))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Collects resources, then hashes them into a [`Snapshot`].
#[derive(Debug, Default)]
pub struct SnapshotBuilder {
    types: BTreeMap<&'static str, BTreeMap<String, prost_types::Any>>,
    mesh: MeshSettings,
}

impl SnapshotBuilder {
    /// Adds (or replaces) one resource.
    pub fn add<T: TypedResource>(&mut self, name: String, resource: &T) {
        self.types
            .entry(T::TYPE_URL)
            .or_default()
            .insert(name, resource.to_any());
    }

    /// Sets the mesh-wide settings.
    pub fn mesh(&mut self, mesh: MeshSettings) {
        self.mesh = mesh;
    }

    /// Hashes every resource and the per-type state.
    pub fn build(mut self) -> Snapshot {
        let owners = self
            .types
            .get(InboundPolicy::TYPE_URL)
            .into_iter()
            .flatten()
            .filter_map(|(name, any)| Some((name.clone(), InboundPolicy::from_any(any).ok()?.identity)))
            .collect();
        let types = TYPE_URLS
            .iter()
            .map(|type_url| {
                let resources: BTreeMap<String, Arc<Resource>> = self
                    .types
                    .remove(type_url)
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(name, any)| {
                        let version = hash([any.value.as_slice()]);
                        let resource = Resource {
                            name: name.clone(),
                            version,
                            resource: Some(any),
                        };
                        (name, Arc::new(resource))
                    })
                    .collect();
                let version = hash(
                    resources
                        .iter()
                        .flat_map(|(n, r)| [n.as_bytes(), b"\0", r.version.as_bytes(), b"\n"]),
                );
                (*type_url, TypeSnapshot { version, resources })
            })
            .collect();
        Snapshot {
            types,
            owners,
            mesh: self.mesh,
        }
    }
}

/// SHA-256 of the parts, first 8 bytes in hex: short enough for logs, long enough that a
/// collision between two states of one mesh is not a concern.
fn hash<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    hex::encode(&h.finalize()[..8])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str, port: u32) -> Service {
        Service {
            name: name.into(),
            namespace: "default".into(),
            ports: vec![wary_proto::discovery::ServicePort {
                port,
                target_port: port,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn versions_follow_content() {
        let build = |port| {
            let mut b = SnapshotBuilder::default();
            b.add("a.default".into(), &svc("a", 80));
            b.add("b.default".into(), &svc("b", port));
            b.build()
        };
        let (one, same, other) = (build(80), build(80), build(81));
        assert_eq!(one, same);
        let t = Service::TYPE_URL;
        let (s1, s2) = (one.get(t).unwrap(), other.get(t).unwrap());
        assert_ne!(s1.version, s2.version);
        assert_eq!(s1.resources["a.default"].version, s2.resources["a.default"].version);
        assert_ne!(s1.resources["b.default"].version, s2.resources["b.default"].version);
        assert_eq!(one.get(Endpoints::TYPE_URL).unwrap().resources.len(), 0);
    }
}
