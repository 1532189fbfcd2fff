//! Sidecar injection: what the mutating admission webhook adds to a pod, and what
//! `wary inject` adds to a manifest offline — one function, [`patch`], for both.
//!
//! ```text
//! pod (or a workload's pod template)
//!   ├─ labelled wary.io/inject=disabled, or already holding wary-proxy ─▶ unchanged
//!   └─ otherwise ─▶ + init container wary-init (`wary-proxy init`: iptables, NET_ADMIN)
//!                   + wary-proxy: a native sidecar (an init container with
//!                     restartPolicy: Always, Kubernetes ≥ 1.29) or, where the cluster
//!                     lacks them, the first regular container
//!                   + the projected service-account token (audience wary.io), the
//!                     WARY_* environment, probes on the admin port 4191
//!                   + prometheus.io/* scrape annotations (unless the pod sets them)
//! ```
//!
//! The patch (RFC 6902) only adds (the containers at the front of `initContainers`,
//! volumes at the end, annotations by key) and replaces the probes it moves to the
//! admin port, so nothing else in the pod, fields this build does not know included,
//! is touched. Annotations a pod may carry (after Linkerd's `config.linkerd.io/*`):
//! `config.wary.io/skip-inbound-ports`, `config.wary.io/skip-outbound-ports` (for
//! the init step's rules) and `config.wary.io/opaque-ports` (for the proxy's
//! detection).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource, HTTPGetAction,
    ObjectFieldSelector, PodTemplateSpec, Probe, ProjectedVolumeSource, ResourceRequirements, SecurityContext,
    ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::Value;

/// The label that asks for injection, on a namespace or a pod: `enabled`; on a pod,
/// `disabled` opts it out of an enabled namespace.
pub const INJECT_LABEL: &str = "wary.io/inject";
/// The proxy container's name; its presence marks a pod as injected.
pub const PROXY_CONTAINER: &str = "wary-proxy";
/// The init step's container name.
pub const INIT_CONTAINER: &str = "wary-init";
/// Annotation: more inbound ports the init step leaves alone, comma-separated.
pub const SKIP_INBOUND_PORTS: &str = "config.wary.io/skip-inbound-ports";
/// Annotation: outbound ports the init step leaves alone, comma-separated.
pub const SKIP_OUTBOUND_PORTS: &str = "config.wary.io/skip-outbound-ports";
/// Annotation: ports the proxy carries as opaque TCP without detection.
pub const OPAQUE_PORTS: &str = "config.wary.io/opaque-ports";
/// The audience of the projected service-account token the proxy proves itself with.
pub const TOKEN_AUDIENCE: &str = "wary.io";
/// Where that token is mounted in the proxy container.
pub const TOKEN_DIR: &str = "/var/run/secrets/wary.io/serviceaccount";
/// The proxy's admin port (probes, `/metrics`).
pub const ADMIN_PORT: u16 = 4191;
/// The proxy's inbound (mTLS) port.
pub const INBOUND_PORT: u16 = crate::local::DEFAULT_INBOUND_PORT;
/// The proxy's outbound port.
pub const OUTBOUND_PORT: u16 = 4140;

/// What every injected proxy is given: the chart's values (`proxy.*`), or
/// `wary inject`'s flags.
#[derive(Debug, Clone, PartialEq)]
pub struct InjectConfig {
    /// The proxy image (it also runs the init step).
    pub image: String,
    /// `Always`, `IfNotPresent` or `Never`; default `IfNotPresent`.
    pub image_pull_policy: String,
    /// The control plane's discovery URL, e.g.
    /// `https://wary-control-plane.wary-system.svc:8086`.
    pub control_plane: String,
    /// The mesh's trust domain; default `cluster.local`.
    pub trust_domain: String,
    /// The trust bundle (PEM) the proxy verifies the control plane and peers with,
    /// passed inline in `WARY_TRUST_ANCHORS_PEM` (a pod cannot mount another
    /// namespace's ConfigMap).
    pub trust_anchors_pem: String,
    /// The proxy's UID, exempt from the outbound redirect; default 2102.
    pub proxy_uid: i64,
    /// Inject the proxy as a native sidecar (Kubernetes ≥ 1.29); default true.
    pub native_sidecar: bool,
    /// The proxy's CPU request; default `100m`.
    pub cpu_request: String,
    /// The proxy's memory request; default `32Mi`.
    pub memory_request: String,
    /// The proxy's memory limit; default `256Mi` (its memory is bounded by design).
    pub memory_limit: String,
}

/// Whether to inject the proxy as a native sidecar: `auto` (the default) asks the API
/// server's version, since native sidecars (init containers with `restartPolicy:
/// Always`) are on by default from Kubernetes 1.29 (KEP-753).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NativeSidecars {
    /// Native on Kubernetes 1.29 and later, else the proxy as the first container.
    Auto,
    /// Always native.
    True,
    /// Never: the proxy is the first regular container (the layout before 1.29).
    False,
}

/// The first Kubernetes minor release whose API server runs native sidecars by default.
pub const NATIVE_SIDECARS_SINCE: (u32, u32) = (1, 29);

impl NativeSidecars {
    /// The decision for an API server reporting `major`.`minor` (as `/version` does:
    /// `"1"`, `"29+"` on some providers). A version that cannot be read counts as too
    /// old: the regular layout works everywhere, a native sidecar on a kubelet without
    /// them is an init container that never ends. `None` (no API server: `wary
    /// inject`, local mode) counts as native.
    pub fn native(self, version: Option<(&str, &str)>) -> bool {
        match self {
            NativeSidecars::True => true,
            NativeSidecars::False => false,
            NativeSidecars::Auto => {
                let number = |s: &str| s.trim_end_matches(|c: char| !c.is_ascii_digit()).parse::<u32>().ok();
                match version {
                    None => true,
                    Some((major, minor)) => match (number(major), number(minor)) {
                        (Some(major), Some(minor)) => (major, minor) >= NATIVE_SIDECARS_SINCE,
                        _ => false,
                    },
                }
            }
        }
    }
}

impl Default for InjectConfig {
    fn default() -> Self {
        Self {
            image: format!("ghcr.io/wary-mesh/wary-proxy:{}", env!("CARGO_PKG_VERSION")),
            image_pull_policy: "IfNotPresent".into(),
            control_plane: "https://wary-control-plane.wary-system.svc:8086".into(),
            trust_domain: "cluster.local".into(),
            trust_anchors_pem: String::new(),
            proxy_uid: i64::from(DEFAULT_PROXY_UID),
            native_sidecar: true,
            cpu_request: "100m".into(),
            memory_request: "32Mi".into(),
            memory_limit: "256Mi".into(),
        }
    }
}

/// The proxy's UID by default: 2102, as Linkerd's (and `wary-proxy init`'s default).
pub const DEFAULT_PROXY_UID: u32 = 2102;

/// Why a pod was left as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skipped {
    /// It already runs `wary-proxy`.
    AlreadyInjected,
    /// It is labelled `wary.io/inject: disabled`.
    OptedOut,
    /// Neither it nor its namespace asks for injection.
    NotRequested,
    /// It shares the node's network (`hostNetwork`): iptables rules would capture the
    /// node's traffic.
    HostNetwork,
}

impl std::fmt::Display for Skipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Skipped::AlreadyInjected => "already injected",
            Skipped::OptedOut => "labelled wary.io/inject=disabled",
            Skipped::NotRequested => "neither the pod nor its namespace is labelled wary.io/inject=enabled",
            Skipped::HostNetwork => "it uses the host's network",
        })
    }
}

/// What injecting a pod takes: the patch, and what the user should know (a probe
/// that could not be moved, an annotation Wary does not read).
#[derive(Debug, Clone)]
pub struct Injection {
    /// The JSON Patch (RFC 6902) to apply to the pod as given.
    pub patch: json_patch::Patch,
    /// Warnings, one sentence each, saying what to do.
    pub warnings: Vec<String>,
}

/// The `config.wary.io/*` annotations Wary reads.
pub const CONFIG_ANNOTATIONS: [&str; 3] = [SKIP_INBOUND_PORTS, SKIP_OUTBOUND_PORTS, OPAQUE_PORTS];

/// A pod (or pod template) the injector cannot read.
#[derive(Debug, thiserror::Error)]
#[error("cannot inject this pod: {0}")]
pub struct InjectError(String);

/// Whether a pod whose labels are `pod_labels` (and annotations `pod_annotations`:
/// `wary.io/inject` is honoured there too, as Linkerd users write it), in a namespace
/// labelled `namespace_labels` (`None`: unknown, as offline), asks for injection.
pub fn requested(
    pod_labels: &BTreeMap<String, String>,
    pod_annotations: &BTreeMap<String, String>,
    namespace_labels: Option<&BTreeMap<String, String>>,
) -> Result<(), Skipped> {
    let asked = pod_labels
        .get(INJECT_LABEL)
        .or_else(|| pod_annotations.get(INJECT_LABEL));
    match asked.map(String::as_str) {
        Some("disabled") => Err(Skipped::OptedOut),
        Some("enabled") => Ok(()),
        _ => match namespace_labels {
            None => Ok(()),
            Some(ns) if ns.get(INJECT_LABEL).map(String::as_str) == Some("enabled") => Ok(()),
            Some(_) => Err(Skipped::NotRequested),
        },
    }
}

/// The JSON Patch that adds the sidecar to `template` (a Pod, or a workload's pod
/// template: any object with `metadata` and `spec` of a PodSpec), or why none is
/// needed. `namespace_labels` is `None` offline (`wary inject` injects what it is
/// given); the webhook passes the pod's namespace's labels.
///
/// # Errors
/// The object is not a pod (no readable `spec`), or an annotation holds something
/// other than a port list; the message names it.
pub fn patch(
    template: &Value,
    namespace_labels: Option<&BTreeMap<String, String>>,
    config: &InjectConfig,
) -> Result<Result<Injection, Skipped>, InjectError> {
    let pod: PodTemplateSpec =
        serde_json::from_value(template.clone()).map_err(|e| InjectError(format!("it is not a pod: {e}")))?;
    let meta = pod.metadata.clone().unwrap_or_default();
    let Some(spec) = pod.spec.as_ref() else {
        return Err(InjectError("it has no spec".into()));
    };
    let labels = meta.labels.clone().unwrap_or_default();
    if let Err(skipped) = requested(&labels, &meta.annotations.clone().unwrap_or_default(), namespace_labels) {
        return Ok(Err(skipped));
    }
    let has_proxy = |cs: &Option<Vec<Container>>| cs.iter().flatten().any(|c| c.name == PROXY_CONTAINER);
    if has_proxy(&spec.init_containers) || has_proxy(&Some(spec.containers.clone())) {
        return Ok(Err(Skipped::AlreadyInjected));
    }
    if spec.host_network == Some(true) {
        return Ok(Err(Skipped::HostNetwork));
    }
    let annotations = meta.annotations.clone().unwrap_or_default();
    let ports = |key: &str| -> Result<String, InjectError> {
        let Some(v) = annotations.get(key) else {
            return Ok(String::new());
        };
        for p in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            if !matches!(p.parse::<u16>(), Ok(1..)) {
                return Err(InjectError(format!(
                    "annotation {key}: {p:?} is not a port (1-65535); give ports like \"25,3306\""
                )));
            }
        }
        Ok(v.split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .collect::<Vec<_>>()
            .join(","))
    };
    let (skip_in, skip_out, opaque) = (
        ports(SKIP_INBOUND_PORTS)?,
        ports(SKIP_OUTBOUND_PORTS)?,
        ports(OPAQUE_PORTS)?,
    );
    let (rewritten, app_probes, mut warnings) = rewrite_probes(&spec.containers);
    for key in annotations.keys() {
        if key.starts_with("config.wary.io/") && !CONFIG_ANNOTATIONS.contains(&key.as_str()) {
            warnings.push(format!(
                "annotation {key} is not one Wary reads ({}): it does nothing; check its spelling",
                CONFIG_ANNOTATIONS.join(", ")
            ));
        }
    }
    let (init, proxy, volumes) = sidecar(config, &skip_in, &skip_out, &opaque, &app_probes);

    // The patch adds what the proxy needs and replaces only the probes it moves, so
    // nothing else in the pod (fields this build does not know included) is touched,
    // and no array element shifts under an index-based diff.
    let mut ops: Vec<Value> = Vec::new();
    let mut add = |path: String, value: Value| ops.push(serde_json::json!({"op": "add", "path": path, "value": value}));
    let mut new_annotations: BTreeMap<String, String> = [
        ("prometheus.io/scrape", "true".to_string()),
        ("prometheus.io/port", ADMIN_PORT.to_string()),
        ("prometheus.io/path", "/metrics".to_string()),
    ]
    .into_iter()
    .filter(|(k, _)| !annotations.contains_key(*k))
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    new_annotations.insert("wary.io/proxy-version".into(), env!("CARGO_PKG_VERSION").into());
    if template.pointer("/metadata/annotations").is_some_and(Value::is_object) {
        for (k, v) in new_annotations {
            add(format!("/metadata/annotations/{}", escape(&k)), v.into());
        }
    } else if template.get("metadata").is_some_and(Value::is_object) {
        add("/metadata/annotations".into(), value(&new_annotations)?);
    } else {
        add("/metadata".into(), serde_json::json!({"annotations": new_annotations}));
    }
    for (i, field, probe) in &rewritten {
        ops.push(serde_json::json!({"op": "replace", "path": format!("/spec/containers/{i}/{field}"), "value": value(probe)?}));
    }
    let mut add = |path: String, value: Value| ops.push(serde_json::json!({"op": "add", "path": path, "value": value}));
    if template.pointer("/spec/volumes").is_some_and(Value::is_array) {
        for v in &volumes {
            add("/spec/volumes/-".into(), value(v)?);
        }
    } else {
        add("/spec/volumes".into(), value(&volumes)?);
    }
    // The init step runs before any other init container (theirs may make network
    // calls), and a native sidecar right after it, so it serves them too.
    let has_inits = template.pointer("/spec/initContainers").is_some_and(Value::is_array);
    if config.native_sidecar {
        if has_inits {
            add("/spec/initContainers/0".into(), value(&init)?);
            add("/spec/initContainers/1".into(), value(&proxy)?);
        } else {
            add("/spec/initContainers".into(), value(&vec![init, proxy])?);
        }
    } else {
        if has_inits {
            add("/spec/initContainers/0".into(), value(&init)?);
        } else {
            add("/spec/initContainers".into(), value(&vec![init])?);
        }
        add("/spec/containers/0".into(), value(&proxy)?);
    }
    let patch =
        serde_json::from_value(Value::Array(ops)).map_err(|e| InjectError(format!("building the patch: {e}")))?;
    Ok(Ok(Injection { patch, warnings }))
}

/// A JSON Pointer token (RFC 6901): `~` and `/` escaped.
fn escape(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

fn value<T: serde::Serialize>(v: &T) -> Result<Value, InjectError> {
    serde_json::to_value(v).map_err(|e| InjectError(e.to_string()))
}

/// A probe moved to the admin port: the container's index, the probe's field
/// (`readinessProbe`...), and the probe as it now reads.
type MovedProbe = (usize, &'static str, Probe);

/// The path on the admin port a moved probe answers on.
fn app_health_path(container: &str, kind: &str) -> String {
    format!("/app-health/{container}/{kind}")
}

/// Kubelet probes to the app's ports arrive in plaintext, which strict mTLS refuses:
/// each HTTP (`httpGet`, scheme HTTP) and `tcpSocket` probe of an app container moves
/// to the proxy's admin port (`/app-health/<container>/<readiness|liveness|startup>`),
/// and the proxy makes the original probe to the app (Istio's probe rewrite). Returns
/// the moved probes (container index, field, new probe) and the originals for
/// `WARY_APP_PROBES` (JSON: path → `{"http": {"port", "path", "headers"}}` or
/// `{"tcp": {"port"}}`). A probe on a named port the container does not declare, or
/// over HTTPS or gRPC, is left as it is, with a warning.
fn rewrite_probes(containers: &[Container]) -> (Vec<MovedProbe>, BTreeMap<String, Value>, Vec<String>) {
    let mut moved = Vec::new();
    let mut originals = BTreeMap::new();
    let mut warnings = Vec::new();
    for (i, c) in containers.iter().enumerate() {
        let port_of = |p: &IntOrString| -> Option<u16> {
            match p {
                IntOrString::Int(n) => u16::try_from(*n).ok(),
                IntOrString::String(name) => c
                    .ports
                    .iter()
                    .flatten()
                    .find(|p| p.name.as_deref() == Some(name))
                    .and_then(|p| u16::try_from(p.container_port).ok()),
            }
        };
        for (field, kind, probe) in [
            ("readinessProbe", "readiness", &c.readiness_probe),
            ("livenessProbe", "liveness", &c.liveness_probe),
            ("startupProbe", "startup", &c.startup_probe),
        ] {
            let Some(probe) = probe else { continue };
            let unmoved = |why: &str| {
                format!(
                    "container {}: its {kind} probe ({why}) is not moved to the proxy, and strict mTLS refuses the kubelet's plaintext on the app port: probe over HTTP or TCP, or list the port in {SKIP_INBOUND_PORTS} (it is then reachable without mTLS)",
                    c.name
                )
            };
            if probe.grpc.is_some() {
                warnings.push(unmoved("gRPC"));
                continue;
            }
            let original = if let Some(get) = &probe.http_get {
                let plain = get.scheme.as_deref().is_none_or(|s| s.eq_ignore_ascii_case("HTTP"));
                if !plain {
                    warnings.push(unmoved("HTTPS"));
                    continue;
                }
                match port_of(&get.port) {
                    Some(port) => serde_json::json!({"http": {
                        "port": port,
                        "path": get.path.clone().unwrap_or_else(|| "/".into()),
                        "headers": get.http_headers.iter().flatten()
                            .map(|h| (h.name.clone(), h.value.clone())).collect::<Vec<_>>(),
                    }}),
                    None => {
                        warnings.push(unmoved("a port the container does not declare"));
                        continue;
                    }
                }
            } else if let Some(tcp) = &probe.tcp_socket {
                match port_of(&tcp.port) {
                    Some(port) => serde_json::json!({"tcp": {"port": port}}),
                    None => {
                        warnings.push(unmoved("a port the container does not declare"));
                        continue;
                    }
                }
            } else {
                continue;
            };
            let path = app_health_path(&c.name, kind);
            originals.insert(path.clone(), original);
            let mut probe = probe.clone();
            probe.tcp_socket = None;
            probe.http_get = Some(HTTPGetAction {
                path: Some(path),
                port: IntOrString::Int(i32::from(ADMIN_PORT)),
                ..HTTPGetAction::default()
            });
            moved.push((i, field, probe));
        }
    }
    (moved, originals, warnings)
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..EnvVar::default()
    }
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn http_probe(path: &str, period_s: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(i32::from(ADMIN_PORT)),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period_s),
        failure_threshold: Some(failures),
        ..Probe::default()
    }
}

/// The init step, the proxy, and the volumes they use.
fn sidecar(
    config: &InjectConfig,
    skip_in: &str,
    skip_out: &str,
    opaque: &str,
    app_probes: &BTreeMap<String, Value>,
) -> (Container, Container, Vec<Volume>) {
    let token_volume = "wary-identity-token";
    let volumes = vec![
        Volume {
            name: token_volume.into(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(TOKEN_AUDIENCE.into()),
                        expiration_seconds: Some(3600),
                        path: "token".into(),
                        ..ServiceAccountTokenProjection::default()
                    }),
                    ..VolumeProjection::default()
                }]),
                ..ProjectedVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: "wary-xtables-lock".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
    ];

    let mut init_args = vec!["init".to_string(), "--proxy-uid".into(), config.proxy_uid.to_string()];
    if !skip_in.is_empty() {
        init_args.extend(["--skip-inbound-ports".into(), skip_in.into()]);
    }
    if !skip_out.is_empty() {
        init_args.extend(["--skip-outbound-ports".into(), skip_out.into()]);
    }
    let init = Container {
        name: INIT_CONTAINER.into(),
        image: Some(config.image.clone()),
        image_pull_policy: Some(config.image_pull_policy.clone()),
        args: Some(init_args),
        security_context: Some(SecurityContext {
            // iptables needs root with NET_ADMIN and NET_RAW, and nothing else (the
            // namespace's Pod Security level must allow that: `privileged`, as for
            // Linkerd's and Istio's init containers).
            run_as_user: Some(0),
            run_as_non_root: Some(false),
            seccomp_profile: Some(runtime_default_seccomp()),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".into(), "NET_RAW".into()]),
                drop: Some(vec!["ALL".into()]),
            }),
            ..SecurityContext::default()
        }),
        // iptables' lock file, on a read-only root.
        volume_mounts: Some(vec![VolumeMount {
            name: "wary-xtables-lock".into(),
            mount_path: "/run".into(),
            ..VolumeMount::default()
        }]),
        resources: Some(requests(config)),
        ..Container::default()
    };

    let mut proxy_env = vec![
        field_env("WARY_WORKLOAD", "metadata.name"),
        field_env("WARY_NAMESPACE", "metadata.namespace"),
        field_env("POD_IP", "status.podIP"),
        env("WARY_INBOUND_ADDR", format!("$(POD_IP):{INBOUND_PORT}")),
        env("WARY_OUTBOUND_ADDR", format!("127.0.0.1:{OUTBOUND_PORT}")),
        // Probes and Prometheus reach it on the pod IP; POST /shutdown still only
        // from loopback.
        env("WARY_ADMIN_ADDR", format!("0.0.0.0:{ADMIN_PORT}")),
        env("WARY_CONTROL_PLANE", config.control_plane.clone()),
        env("WARY_TRUST_DOMAIN", config.trust_domain.clone()),
        env("WARY_TRUST_ANCHORS_PEM", config.trust_anchors_pem.clone()),
        env("WARY_SERVICE_ACCOUNT_TOKEN_FILE", format!("{TOKEN_DIR}/token")),
        env("WARY_LOG_FORMAT", "json"),
    ];
    if !opaque.is_empty() {
        proxy_env.push(env("WARY_OPAQUE_PORTS", opaque));
    }
    if !app_probes.is_empty() {
        proxy_env.push(env(
            "WARY_APP_PROBES",
            serde_json::to_string(app_probes).unwrap_or_default(),
        ));
    }
    let port = |name: &str, port: u16| ContainerPort {
        name: Some(name.into()),
        container_port: i32::from(port),
        ..ContainerPort::default()
    };
    let proxy = Container {
        name: PROXY_CONTAINER.into(),
        image: Some(config.image.clone()),
        image_pull_policy: Some(config.image_pull_policy.clone()),
        env: Some(proxy_env),
        ports: Some(vec![port("wary-inbound", INBOUND_PORT), port("wary-admin", ADMIN_PORT)]),
        // The app starts once the proxy holds its certificate and configuration.
        startup_probe: Some(http_probe("/ready", 1, 120)),
        readiness_probe: Some(http_probe("/ready", 10, 3)),
        liveness_probe: Some(http_probe("/live", 10, 3)),
        restart_policy: config.native_sidecar.then(|| "Always".to_string()),
        security_context: Some(SecurityContext {
            run_as_user: Some(config.proxy_uid),
            run_as_group: Some(config.proxy_uid),
            run_as_non_root: Some(true),
            seccomp_profile: Some(runtime_default_seccomp()),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![VolumeMount {
            name: token_volume.into(),
            mount_path: TOKEN_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        }]),
        resources: Some(ResourceRequirements {
            limits: Some(BTreeMap::from([(
                "memory".to_string(),
                Quantity(config.memory_limit.clone()),
            )])),
            ..requests(config)
        }),
        ..Container::default()
    };

    (init, proxy, volumes)
}

fn runtime_default_seccomp() -> k8s_openapi::api::core::v1::SeccompProfile {
    k8s_openapi::api::core::v1::SeccompProfile {
        type_: "RuntimeDefault".into(),
        ..Default::default()
    }
}

fn requests(config: &InjectConfig) -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_string(), Quantity(config.cpu_request.clone())),
            ("memory".to_string(), Quantity(config.memory_request.clone())),
        ])),
        ..ResourceRequirements::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn native_sidecars_follow_the_api_server_version_when_auto() {
        let auto = NativeSidecars::Auto;
        assert!(auto.native(Some(("1", "29"))));
        assert!(auto.native(Some(("1", "37"))));
        assert!(auto.native(Some(("1", "30+"))), "a provider's 30+ is 30");
        assert!(!auto.native(Some(("1", "28"))));
        assert!(!auto.native(Some(("1", "27+"))));
        assert!(auto.native(None), "no API server to ask: native");
        assert!(
            !auto.native(Some(("1", "x"))),
            "an unreadable version counts as too old"
        );
        assert!(!NativeSidecars::False.native(Some(("1", "37"))));
        assert!(NativeSidecars::True.native(Some(("1", "20"))));
    }
}
