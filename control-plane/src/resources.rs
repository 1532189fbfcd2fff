//! From documents to resources: cross-document checks, then the `Service`,
//! `Endpoints` and `InboundPolicy` each proxy receives.
//!
//! * `Service` `<name>.<ns>`: the local Service, its ports, host names, and the
//!   TrafficPolicy that targets it.
//! * `Endpoints` `<name>.<ns>`: one endpoint per (selected Workload × service port).
//! * `InboundPolicy` `<workload>.<ns>`: the workload's identity and ports, the mesh's
//!   mTLS mode and default policy, and every AuthorizationPolicy that applies to it.

use std::collections::{BTreeMap, HashMap};

use wary_certs::{SpiffeId, TrustDomain};
use wary_proto::discovery as pb;

use crate::local::{AppProtocol, ServicePort, ServiceSpec, TargetPort, WorkloadSpec};
use crate::policy::{self, AuthorizationPolicy, MeshConfigSpec, TrafficPolicy};
use crate::snapshot::{Snapshot, SnapshotBuilder};
use crate::source::{Body, ConfigError, Document, Origin};

/// Checks the documents against each other and computes the snapshot, with warnings
/// for what is valid but probably not meant (a policy whose target does not exist).
///
/// # Errors
/// Every cross-document problem: the same object declared twice, two TrafficPolicies
/// for one Service, two MeshConfigs, two workloads on one address and port.
pub fn compute(docs: &[Document]) -> Result<(Snapshot, Vec<ConfigError>), Vec<ConfigError>> {
    let mut errors = Vec::new();
    let conflict = |errors: &mut Vec<ConfigError>, at: &Origin, what: String, first: &Origin| {
        errors.push(ConfigError {
            file: at.file.clone(),
            line: at.line,
            reason: format!("{what} is already declared at {first}: remove one of them"),
        });
    };

    let mut seen: BTreeMap<(&str, &str, &str), &Origin> = BTreeMap::new();
    for d in docs {
        if let Some(first) = seen.insert((d.body.kind(), &d.namespace, &d.name), &d.origin) {
            conflict(
                &mut errors,
                &d.origin,
                format!("{} {}/{}", d.body.kind(), d.namespace, d.name),
                first,
            );
        }
    }

    let mut mesh: Option<(&MeshConfigSpec, &Origin)> = None;
    let mut services = Vec::new();
    let mut workloads = Vec::new();
    let mut traffic: BTreeMap<(&str, &str), (&TrafficPolicy, &Origin)> = BTreeMap::new();
    let mut authz = Vec::new();
    for d in docs {
        match &d.body {
            Body::MeshConfig(spec) => match mesh {
                Some((_, first)) => conflict(&mut errors, &d.origin, "a MeshConfig".into(), first),
                None => mesh = Some((spec, &d.origin)),
            },
            Body::Service(spec) => services.push((d, spec)),
            Body::Workload(spec) => workloads.push((d, spec)),
            Body::TrafficPolicy(tp) => {
                let key = (d.namespace.as_str(), tp.spec.target_ref.name.as_str());
                match traffic.get(&key) {
                    Some((_, first)) => conflict(
                        &mut errors,
                        &d.origin,
                        format!("a TrafficPolicy for Service {}/{}", key.0, key.1),
                        first,
                    ),
                    None => {
                        traffic.insert(key, (tp, &d.origin));
                    }
                }
            }
            Body::AuthorizationPolicy(ap) => authz.push((d, ap.as_ref())),
        }
    }

    for (d, w) in &workloads {
        if d.namespace == crate::identity::CONTROL_PLANE_NAMESPACE
            && w.service_account == crate::identity::CONTROL_PLANE_SERVICE_ACCOUNT
        {
            errors.push(ConfigError {
                file: d.origin.file.clone(),
                line: d.origin.line,
                reason: format!(
                    "Workload {}: service account {}/{} is reserved for the control plane: use another",
                    d.name, d.namespace, w.service_account
                ),
            });
        }
    }
    let mut bound: BTreeMap<(std::net::IpAddr, u16), &Origin> = BTreeMap::new();
    for (d, w) in &workloads {
        let ports = w
            .ports
            .iter()
            .map(|p| p.port)
            .chain((w.inbound_port != 0).then_some(w.inbound_port));
        for port in ports {
            if let Some(first) = bound.insert((w.address, port), &d.origin) {
                conflict(
                    &mut errors,
                    &d.origin,
                    format!("address {}:{} (Workload {})", w.address, port, d.name),
                    first,
                );
            }
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let warnings = dangling_targets(&services, &workloads, &traffic, &authz);

    let default_mesh = MeshConfigSpec::default();
    let mesh = mesh.map_or(&default_mesh, |(m, _)| m);
    // Validated when parsed; the default is `cluster.local`.
    let trust_domain = mesh
        .trust_domain
        .as_deref()
        .and_then(|td| TrustDomain::new(td).ok())
        .unwrap_or_default();
    let cluster_domain = mesh.cluster_domain.as_deref().unwrap_or("cluster.local");

    let mut out = SnapshotBuilder::default();
    out.mesh(crate::snapshot::MeshSettings {
        trust_domain: trust_domain.clone(),
        certificate_lifetime: mesh
            .certificate_lifetime
            .map_or(wary_certs::ca::DEFAULT_CERT_LIFETIME, |d| d.0),
    });
    // Workloads by (namespace, label, value): a selector's candidates are the workloads
    // carrying its first label, so matching costs what matches, not services ×
    // workloads (1,000 × 10,000 took half a second).
    let mut by_label: HashMap<(&str, &str, &str), Vec<usize>> = HashMap::new();
    for (i, (w, _)) in workloads.iter().enumerate() {
        for (k, v) in &w.labels {
            by_label.entry((&w.namespace, k, v)).or_default().push(i);
        }
    }
    // For each workload, the names of the services that select it.
    let mut services_of: Vec<Vec<&str>> = vec![Vec::new(); workloads.len()];
    // For each workload, the protocols its selecting Services declare for its ports
    // (`appProtocol`), used where the Workload leaves a port to detection.
    let mut declared_of: Vec<BTreeMap<u16, AppProtocol>> = vec![BTreeMap::new(); workloads.len()];
    for (d, spec) in &services {
        let name = format!("{}.{}", d.name, d.namespace);
        let policy = traffic.get(&(d.namespace.as_str(), d.name.as_str())).map(|(tp, _)| *tp);
        out.add(name.clone(), &service(d, spec, policy, cluster_domain));
        let candidates = spec
            .selector
            .iter()
            .next()
            .and_then(|(k, v)| by_label.get(&(d.namespace.as_str(), k.as_str(), v.as_str())))
            .map_or(&[][..], Vec::as_slice);
        let selected: Vec<usize> = candidates
            .iter()
            .copied()
            .filter(|&i| selects(&spec.selector, &workloads[i].0.labels))
            .collect();
        for &i in &selected {
            services_of[i].push(d.name.as_str());
            for sp in spec.ports.iter().filter(|sp| sp.app_protocol != AppProtocol::Detect) {
                if let Some(port) = target_port(sp, workloads[i].1) {
                    // Two Services disagreeing: an HTTP protocol wins over `tcp`, so
                    // the inbound reads and authorizes every request rather than
                    // carry bytes that could hold a forged identity header.
                    let declared = declared_of[i].entry(port).or_insert(sp.app_protocol);
                    if *declared == AppProtocol::Tcp {
                        *declared = sp.app_protocol;
                    }
                }
            }
        }
        let endpoints = selected
            .iter()
            .map(|&i| workloads[i])
            .filter(|(_, wspec)| wspec.ready)
            .flat_map(|(w, wspec)| endpoints_of(spec, w, wspec, &trust_domain))
            .collect();
        out.add(
            name,
            &pb::Endpoints {
                service: d.name.clone(),
                namespace: d.namespace.clone(),
                endpoints,
            },
        );
    }
    for (((w, spec), in_services), declared) in workloads.iter().zip(&services_of).zip(&declared_of) {
        let authorizations = authz
            .iter()
            .filter(|(a, ap)| a.namespace == w.namespace && applies(ap, &w.labels, in_services))
            .map(|(a, ap)| authorization(a, ap))
            .collect();
        let identity = SpiffeId::new(trust_domain.clone(), &w.namespace, &spec.service_account)
            .map(|id| id.to_string())
            .unwrap_or_default();
        out.add(
            format!("{}.{}", w.name, w.namespace),
            &pb::InboundPolicy {
                workload: w.name.clone(),
                namespace: w.namespace.clone(),
                identity,
                mtls_mode: mtls_mode(mesh.mtls.as_ref().map(|m| m.mode).unwrap_or_default()) as i32,
                default_policy: match mesh.default_inbound_policy {
                    policy::DefaultInboundPolicy::AllAuthenticated => pb::DefaultInboundPolicy::AllAuthenticated,
                    policy::DefaultInboundPolicy::Deny => pb::DefaultInboundPolicy::Deny,
                    policy::DefaultInboundPolicy::AllUnauthenticated => pb::DefaultInboundPolicy::AllUnauthenticated,
                } as i32,
                ports: spec
                    .ports
                    .iter()
                    .map(|p| pb::InboundPort {
                        port: u32::from(p.port),
                        protocol: protocol(match p.app_protocol {
                            AppProtocol::Detect => declared.get(&p.port).copied().unwrap_or(AppProtocol::Detect),
                            own => own,
                        }) as i32,
                        mtls_mode: p.mtls.as_ref().map(|m| mtls_mode(m.mode) as i32),
                    })
                    .collect(),
                authorizations,
            },
        );
    }
    Ok((out.build(), warnings))
}

fn mtls_mode(mode: policy::MtlsMode) -> pb::MtlsMode {
    match mode {
        policy::MtlsMode::Strict => pb::MtlsMode::Strict,
        policy::MtlsMode::Permissive => pb::MtlsMode::Permissive,
    }
}

/// Policies that apply to nothing: a typo in a target silently leaves the default in
/// force, which for authorization is a security surprise.
fn dangling_targets(
    services: &[(&Document, &ServiceSpec)],
    workloads: &[(&Document, &WorkloadSpec)],
    traffic: &BTreeMap<(&str, &str), (&TrafficPolicy, &Origin)>,
    authz: &[(&Document, &AuthorizationPolicy)],
) -> Vec<ConfigError> {
    let service_exists = |ns: &str, name: &str| services.iter().any(|(s, _)| s.namespace == ns && s.name == name);
    let warn = |at: &Origin, reason: String| ConfigError {
        file: at.file.clone(),
        line: at.line,
        reason,
    };
    let mut warnings = Vec::new();
    for ((ns, name), (_, origin)) in traffic {
        if !service_exists(ns, name) {
            warnings.push(warn(
                origin,
                format!("TrafficPolicy targets Service {ns}/{name}, which does not exist: it applies to nothing"),
            ));
        }
    }
    for (d, ap) in authz {
        if let Some(t) = &ap.spec.target_ref
            && !service_exists(&d.namespace, &t.name)
        {
            warnings.push(warn(
                &d.origin,
                format!(
                    "AuthorizationPolicy {} targets Service {}/{}, which does not exist: it protects nothing",
                    d.name, d.namespace, t.name
                ),
            ));
        }
        if let Some(sel) = &ap.spec.selector
            && !workloads
                .iter()
                .any(|(w, _)| w.namespace == d.namespace && sel.matches(&w.labels))
        {
            warnings.push(warn(
                &d.origin,
                format!(
                    "AuthorizationPolicy {} selects no workload in namespace {}: it protects nothing",
                    d.name, d.namespace
                ),
            ));
        }
    }
    warnings
}

/// A Service with an empty selector selects nothing (as in Kubernetes, where it means
/// "endpoints are managed elsewhere").
fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn applies(ap: &AuthorizationPolicy, labels: &BTreeMap<String, String>, in_services: &[&str]) -> bool {
    match (&ap.spec.target_ref, &ap.spec.selector) {
        (Some(t), _) => in_services.contains(&t.name.as_str()),
        (None, Some(sel)) => sel.matches(labels),
        (None, None) => true,
    }
}

fn protocol(p: AppProtocol) -> pb::Protocol {
    match p {
        AppProtocol::Detect => pb::Protocol::Detect,
        AppProtocol::Http => pb::Protocol::Http1,
        AppProtocol::Http2 => pb::Protocol::Http2,
        AppProtocol::Grpc => pb::Protocol::Grpc,
        AppProtocol::Tcp => pb::Protocol::Opaque,
    }
}

fn service(d: &Document, spec: &ServiceSpec, policy: Option<&TrafficPolicy>, cluster_domain: &str) -> pb::Service {
    let (name, ns) = (&d.name, &d.namespace);
    pb::Service {
        name: name.clone(),
        namespace: ns.clone(),
        ports: spec
            .ports
            .iter()
            .map(|p| pb::ServicePort {
                name: p.name.clone(),
                port: u32::from(p.port),
                target_port: match &p.target_port {
                    Some(TargetPort::Number(n)) => u32::from(*n),
                    // A named target port resolves per workload; see `endpoints_of`.
                    Some(TargetPort::Name(_)) | None => u32::from(p.port),
                },
                protocol: protocol(p.app_protocol) as i32,
            })
            .collect(),
        traffic_policy: policy.map(|tp| traffic_policy(tp, ns)),
        // A bare `<name>` is resolved by the proxy in its own namespace, as Kubernetes DNS
        // does, so it is not listed: two namespaces may both have an `orders`.
        hostnames: [format!("{name}.{ns}.svc"), format!("{name}.{ns}.svc.{cluster_domain}")]
            .into_iter()
            .chain(spec.cluster_ips.iter().map(ToString::to_string))
            .collect(),
    }
}

/// The workload port a Service port leads to: its `targetPort` by number or by the
/// workload port's name, else its own number. `None`: the workload has no port of that
/// name, so it does not serve this Service port.
fn target_port(sp: &ServicePort, spec: &WorkloadSpec) -> Option<u16> {
    match &sp.target_port {
        None => Some(sp.port),
        Some(TargetPort::Number(n)) => Some(*n),
        Some(TargetPort::Name(n)) => spec.ports.iter().find(|p| &p.name == n).map(|p| p.port),
    }
}

fn endpoints_of(svc: &ServiceSpec, w: &Document, spec: &WorkloadSpec, td: &TrustDomain) -> Vec<pb::Endpoint> {
    let identity = if spec.inbound_port == 0 {
        String::new()
    } else {
        SpiffeId::new(td.clone(), &w.namespace, &spec.service_account)
            .map(|id| id.to_string())
            .unwrap_or_default()
    };
    svc.ports
        .iter()
        .filter_map(|sp| {
            let port = target_port(sp, spec)?;
            Some(pb::Endpoint {
                address: spec.address.to_string(),
                service_port: u32::from(sp.port),
                port: u32::from(port),
                mesh_port: u32::from(spec.inbound_port),
                identity: identity.clone(),
                zone: spec.zone.clone(),
                weight: spec.weight,
                // Kept, as EndpointSlice keeps them, so a proxy can tell "not ready" from
                // "gone"; the balancer skips them.
                ready: spec.ready,
                workload: w.name.clone(),
            })
        })
        .collect()
}

fn traffic_policy(tp: &TrafficPolicy, ns: &str) -> pb::TrafficPolicy {
    let s = &tp.spec;
    let d = |d: &Option<crate::duration::Duration>| d.map(Into::into);
    pb::TrafficPolicy {
        source: format!("{}.{ns}", tp.metadata.name.as_deref().unwrap_or_default()),
        load_balancer: s.load_balancer.as_ref().map(|lb| pb::LoadBalancer {
            algorithm: match lb.algorithm {
                policy::Algorithm::Ewma => pb::load_balancer::Algorithm::Ewma,
                policy::Algorithm::RoundRobin => pb::load_balancer::Algorithm::RoundRobin,
            } as i32,
            decay: d(&lb.decay),
            default_rtt: d(&lb.default_rtt),
        }),
        timeouts: s.timeouts.as_ref().map(|t| pb::Timeouts {
            request: d(&t.request),
            per_try: d(&t.per_try),
            idle: d(&t.idle),
            connect: d(&t.connect),
        }),
        retries: s.retries.as_ref().map(|r| pb::RetryPolicy {
            attempts: r.attempts,
            retry_on: r.retry_on.clone(),
            retriable_status_codes: r.retriable_status_codes.clone(),
            budget: r.budget.as_ref().map(|b| pb::RetryBudget {
                ratio: b.ratio,
                min_retries_per_second: b.min_retries_per_second,
                ttl: d(&b.ttl),
            }),
            backoff: r.backoff.as_ref().map(|b| pb::Backoff {
                base_interval: d(&b.base_interval),
                max_interval: d(&b.max_interval),
            }),
            max_body_bytes: r.max_body_bytes,
        }),
        outlier_detection: s.outlier_detection.as_ref().map(|o| pb::OutlierDetection {
            consecutive_failures: o.consecutive_failures,
            base_ejection_time: d(&o.base_ejection_time),
            max_ejection_time: d(&o.max_ejection_time),
            max_ejection_percent: o.max_ejection_percent,
        }),
        connection_pool: s.connection_pool.as_ref().map(|c| pb::ConnectionPool {
            max_connections: c.max_connections,
            max_pending_requests: c.max_pending_requests,
            max_requests: c.max_requests,
        }),
    }
}

fn authorization(d: &Document, ap: &AuthorizationPolicy) -> pb::Authorization {
    let s = &ap.spec;
    pb::Authorization {
        name: format!("{}.{}", d.name, d.namespace),
        action: match s.action {
            policy::Action::Allow => pb::authorization::Action::Allow,
            policy::Action::Deny => pb::authorization::Action::Deny,
        } as i32,
        rules: s
            .rules
            .iter()
            .map(|r| pb::Rule {
                from: r
                    .from
                    .iter()
                    .map(|f| pb::Source {
                        principals: f.source.principals.clone(),
                        namespaces: f.source.namespaces.clone(),
                        service_accounts: f.source.service_accounts.clone(),
                        not_principals: f.source.not_principals.clone(),
                        not_namespaces: f.source.not_namespaces.clone(),
                    })
                    .collect(),
                to: r
                    .to
                    .iter()
                    .map(|t| pb::Operation {
                        methods: t.operation.methods.clone(),
                        paths: t.operation.paths.clone(),
                        ports: t.operation.ports.iter().map(|p| u32::from(*p)).collect(),
                        not_methods: t.operation.not_methods.clone(),
                        not_paths: t.operation.not_paths.clone(),
                    })
                    .collect(),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::parse_file;
    use std::path::Path;
    use wary_proto::TypedResource;

    const MESH: &str = "\
apiVersion: local.wary.io/v1alpha1
kind: Service
metadata: {name: orders}
spec:
  selector: {app: orders}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: local.wary.io/v1alpha1
kind: Workload
metadata: {name: orders-1, labels: {app: orders}}
spec:
  serviceAccount: orders
  address: 127.0.1.1
  ports: [{name: http, port: 8080}]
---
apiVersion: local.wary.io/v1alpha1
kind: Workload
metadata: {name: orders-2, labels: {app: orders}}
spec:
  address: 127.0.1.2
  ports: [{name: web, port: 8080}]
---
apiVersion: policy.wary.io/v1alpha1
kind: TrafficPolicy
metadata: {name: orders}
spec:
  targetRef: {kind: Service, name: orders}
  retries: {attempts: 2}
---
apiVersion: policy.wary.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: web-only}
spec:
  targetRef: {kind: Service, name: orders}
  rules: [{from: [{source: {serviceAccounts: [default/web]}}]}]
";

    #[test]
    fn computes_services_endpoints_and_inbound_policy() {
        let docs = parse_file(Path::new("m.yaml"), MESH).unwrap();
        let (snap, warnings) = compute(&docs).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        let any = |t: &str, n: &str| snap.get(t).unwrap().resources[n].resource.clone().unwrap();
        let svc = pb::Service::from_any(&any(pb::Service::TYPE_URL, "orders.default")).unwrap();
        assert_eq!(svc.traffic_policy.unwrap().retries.unwrap().attempts, Some(2));
        let eps = pb::Endpoints::from_any(&any(pb::Endpoints::TYPE_URL, "orders.default")).unwrap();
        // orders-2 has no port named `http`, so it serves no endpoint of this port.
        assert_eq!(eps.endpoints.len(), 1);
        let ep = &eps.endpoints[0];
        assert_eq!((ep.address.as_str(), ep.port, ep.mesh_port), ("127.0.1.1", 8080, 4143));
        assert_eq!(ep.identity, "spiffe://cluster.local/ns/default/sa/orders");
        let inbound = pb::InboundPolicy::from_any(&any(pb::InboundPolicy::TYPE_URL, "orders-1.default")).unwrap();
        assert_eq!(inbound.authorizations.len(), 1);
        assert_eq!(inbound.authorizations[0].name, "web-only.default");
    }

    #[test]
    fn a_workload_port_left_to_detection_takes_its_services_declared_protocol() {
        let mesh = "\
apiVersion: local.wary.io/v1alpha1
kind: Service
metadata: {name: db}
spec:
  selector: {app: a}
  ports: [{name: db, port: 5000, targetPort: 5000, appProtocol: tcp}, {name: web, port: 9300, appProtocol: tcp}]
---
apiVersion: local.wary.io/v1alpha1
kind: Service
metadata: {name: api}
spec:
  selector: {app: a}
  ports: [{name: web, port: 9300, appProtocol: http}]
---
apiVersion: local.wary.io/v1alpha1
kind: Workload
metadata: {name: a-1, labels: {app: a}}
spec:
  address: 127.0.1.1
  ports: [{name: db, port: 5000}, {name: web, port: 9300}, {name: own, port: 7000, appProtocol: http}, {name: x, port: 6379}]
";
        let docs = parse_file(Path::new("m.yaml"), mesh).unwrap();
        let (snap, _) = compute(&docs).unwrap();
        let any = snap.get(pb::InboundPolicy::TYPE_URL).unwrap().resources["a-1.default"]
            .resource
            .clone()
            .unwrap();
        let inbound = pb::InboundPolicy::from_any(&any).unwrap();
        let protocols: Vec<(u32, i32)> = inbound.ports.iter().map(|p| (p.port, p.protocol)).collect();
        assert_eq!(
            protocols,
            [
                (5000, pb::Protocol::Opaque as i32),
                // One Service says tcp, another http: the requests are read.
                (9300, pb::Protocol::Http1 as i32),
                (7000, pb::Protocol::Http1 as i32),
                (6379, pb::Protocol::Detect as i32),
            ]
        );
    }

    #[test]
    fn duplicates_are_refused_with_both_places() {
        let text = format!("{MESH}---\n{}", MESH.split("---\n").nth(3).unwrap());
        let docs = parse_file(Path::new("m.yaml"), &text).unwrap();
        let Err(errs) = compute(&docs) else {
            panic!("a duplicate must be refused")
        };
        assert!(
            errs.iter().any(|e| e
                .reason
                .contains("TrafficPolicy default/orders is already declared at m.yaml:23")),
            "{errs:?}"
        );
    }
}
