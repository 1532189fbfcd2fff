//! Local-only documents, `apiVersion: local.wary.io/v1alpha1`: what Kubernetes would
//! otherwise provide.
//!
//! * `Service`: a name clients dial, its ports, and a label selector for its workloads
//!   (the shape of a Kubernetes Service, reduced to what the mesh uses).
//! * `Workload`: one running instance (what a Pod is in a cluster): its address, labels,
//!   service account, app ports, and its proxy's inbound port.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::policy::FieldError;

/// The `apiVersion` of local documents.
pub const API_VERSION: &str = "local.wary.io/v1alpha1";

/// The proxy inbound port when a workload does not name one (DESIGN.md, Ports).
pub const DEFAULT_INBOUND_PORT: u16 = 4143;

/// The application protocol of a port, as users write it.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AppProtocol {
    /// Detect per connection (the default).
    #[default]
    Detect,
    /// HTTP/1.1.
    Http,
    /// HTTP/2 with prior knowledge.
    Http2,
    /// gRPC.
    Grpc,
    /// Opaque TCP.
    Tcp,
}

/// `spec` of a local `Service`.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceSpec {
    /// Workloads (same namespace) whose labels include all of these serve the service.
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    /// The ports clients dial; at least one.
    pub ports: Vec<ServicePort>,
    /// Virtual IPs clients may dial instead of the name (a Kubernetes Service's
    /// `clusterIPs`): transparent mode recognizes connections to them. Optional.
    #[serde(default, rename = "clusterIPs", skip_serializing_if = "Vec::is_empty")]
    pub cluster_ips: Vec<IpAddr>,
}

/// One service port.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    /// Port name, e.g. `http`; optional.
    #[serde(default)]
    pub name: String,
    /// The port clients dial, 1–65535.
    pub port: u16,
    /// The workloads' port: a number, or the name of a workload port. Default `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<TargetPort>,
    /// The protocol; default `detect`.
    #[serde(default)]
    pub app_protocol: AppProtocol,
    /// mTLS on this port, overriding the mesh's `MeshConfig.spec.mtls` (after Istio's
    /// `portLevelMtls`): e.g. `{mode: permissive}` while this port's clients migrate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<crate::policy::Mtls>,
}

/// A target port, by number or by the name of a workload port.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq)]
#[serde(untagged)]
pub enum TargetPort {
    /// A port number.
    Number(u16),
    /// The name of a port in the workload's `ports`.
    Name(String),
}

/// `spec` of a local `Workload`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSpec {
    /// The service account the workload runs as: its identity is
    /// `spiffe://<trust-domain>/ns/<namespace>/sa/<serviceAccount>`. Default `default`.
    #[serde(default = "default_service_account")]
    pub service_account: String,
    /// The workload's IP address; its app and proxy listen here. Default `127.0.0.1`.
    /// Give each workload its own loopback address (`127.0.1.1`, `127.0.1.2`...) so
    /// every proxy can use the standard ports.
    #[serde(default = "default_address")]
    pub address: IpAddr,
    /// The ports the app serves.
    #[serde(default)]
    pub ports: Vec<WorkloadPort>,
    /// The proxy's inbound (mTLS) port; default 4143. 0: no proxy, plaintext to the app.
    #[serde(default = "default_inbound_port")]
    pub inbound_port: u16,
    /// Topology zone; optional.
    #[serde(default)]
    pub zone: String,
    /// Relative weight, 1–1000; default 100.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// False takes the workload out of every service's endpoints; default true.
    #[serde(default = "default_true")]
    pub ready: bool,
    /// For `wary up`: the app's command line, run with `HTTP_PROXY` pointing at the
    /// workload's proxy and `WARY_LISTEN` at `<address>:<first port>`. A first word of
    /// `wary` runs the `wary` binary itself (its demo apps). Empty: the app is already
    /// running (or runs elsewhere). The control plane ignores it.
    #[serde(default)]
    pub command: Vec<String>,
    /// For `wary up`: extra environment for `command`.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// One app port of a workload.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadPort {
    /// Port name, for a service's named `targetPort`; optional.
    #[serde(default)]
    pub name: String,
    /// The port, 1–65535.
    pub port: u16,
    /// The protocol; default `detect`.
    #[serde(default)]
    pub app_protocol: AppProtocol,
    /// mTLS on this port, overriding the mesh's `MeshConfig.spec.mtls` (after Istio's
    /// `portLevelMtls`): e.g. `{mode: permissive}` while this port's clients migrate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<crate::policy::Mtls>,
}

fn default_service_account() -> String {
    "default".to_string()
}

fn default_address() -> IpAddr {
    IpAddr::from([127, 0, 0, 1])
}

fn default_inbound_port() -> u16 {
    DEFAULT_INBOUND_PORT
}

fn default_weight() -> u32 {
    100
}

fn default_true() -> bool {
    true
}

impl ServiceSpec {
    /// Every field-level problem, with its path.
    pub fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if self.ports.is_empty() {
            errors.push(FieldError::new("spec.ports", "a service needs at least one port"));
        }
        let mut seen = BTreeMap::new();
        for (i, p) in self.ports.iter().enumerate() {
            if p.port == 0 {
                errors.push(FieldError::new(
                    format!("spec.ports[{i}].port"),
                    "port 0 is not a port: use 1 to 65535",
                ));
            }
            if let Some(j) = seen.insert(p.port, i) {
                errors.push(FieldError::new(
                    format!("spec.ports[{i}].port"),
                    format!("port {} is listed twice (also spec.ports[{j}])", p.port),
                ));
            }
            if p.target_port == Some(TargetPort::Number(0)) {
                errors.push(FieldError::new(
                    format!("spec.ports[{i}].targetPort"),
                    "port 0 is not a port: use 1 to 65535, or a workload port's name",
                ));
            }
        }
        errors
    }
}

impl WorkloadSpec {
    /// Every field-level problem, with its path.
    pub fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if let Err(e) = wary_certs::check_label("service account", &self.service_account) {
            errors.push(FieldError::new("spec.serviceAccount", e.to_string()));
        }
        if !(1..=1000).contains(&self.weight) {
            errors.push(FieldError::new(
                "spec.weight",
                format!("{} is out of range: use 1 to 1000", self.weight),
            ));
        }
        for (i, p) in self.ports.iter().enumerate() {
            if p.port == 0 {
                errors.push(FieldError::new(
                    format!("spec.ports[{i}].port"),
                    "port 0 is not a port: use 1 to 65535",
                ));
            }
            if self.inbound_port != 0 && p.port == self.inbound_port {
                errors.push(FieldError::new(
                    format!("spec.ports[{i}].port"),
                    format!(
                        "port {} is the proxy's inbound port: move the app or set spec.inboundPort",
                        p.port
                    ),
                ));
            }
        }
        errors
    }
}
