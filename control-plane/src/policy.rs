//! The policy documents users write: `TrafficPolicy`, `AuthorizationPolicy` and
//! `MeshConfig`, group `policy.wary.io`, version `v1alpha1`.
//!
//! Each is a Kubernetes custom resource (`kube::CustomResource`), so the same types
//! read a local YAML file today and a cluster's CRDs later, and the CRD schemas in the
//! Helm chart are generated from them. Field names follow Envoy, Istio and the Gateway
//! API where one exists. Unknown fields are refused, so a typo is an error with a line
//! number rather than a silently ignored setting.
//!
//! Field-level checks (ranges, names) live in each spec's `validate`, which returns
//! every problem with the path of the field it concerns.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::duration::Duration;

/// One problem found in a document: the field it concerns (a dotted path such as
/// `spec.retries.budget.ratio`) and what is wrong, phrased so the user knows the fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted path from the document root, with `[n]` for list items.
    pub path: String,
    /// What is wrong and what is accepted.
    pub reason: String,
}

impl FieldError {
    pub(crate) fn new(path: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

/// A reference to the object a policy applies to (Gateway API `PolicyTargetReference`).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TargetRef {
    /// API group of the target; empty (the core group) for a Service.
    #[serde(default)]
    pub group: String,
    /// Kind of the target; only `Service` is supported.
    pub kind: String,
    /// Name of the target, in the policy's namespace.
    pub name: String,
}

impl TargetRef {
    fn validate(&self, path: &str, errors: &mut Vec<FieldError>) {
        if self.kind != "Service" || !(self.group.is_empty() || self.group == "core") {
            errors.push(FieldError::new(
                format!("{path}.kind"),
                format!(
                    "unsupported target kind {:?}: only kind: Service (core group) can be targeted",
                    self.kind
                ),
            ));
        }
        if let Err(e) = wary_certs::check_label("service name", &self.name) {
            errors.push(FieldError::new(format!("{path}.name"), e.to_string()));
        }
    }
}

// ---------------------------------------------------------------------------------
// Status, written by the control plane in a cluster
// ---------------------------------------------------------------------------------

/// What the control plane says of a policy object in a cluster (`kubectl get` shows
/// its `Accepted` column). Written only by the control plane, on the `status`
/// subresource; local mode reports the same on `/config`.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    /// One condition today, `Accepted`, as Gateway API resources report it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<PolicyCondition>,
}

/// A condition of a policy object (the shape of Kubernetes' `metav1.Condition`).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyCondition {
    /// `Accepted`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True` (in force) or `False`.
    pub status: String,
    /// `Accepted`, `Invalid` (the control plane refused this version: the last valid
    /// one, if any, stays in force) or `Conflicted` (another object claims the same
    /// thing: this one is left out).
    pub reason: String,
    /// What was found, each problem as `<field>: <reason>`.
    pub message: String,
    /// The `metadata.generation` this condition describes.
    #[serde(default)]
    pub observed_generation: i64,
    /// When `status` last changed (RFC 3339).
    pub last_transition_time: String,
}

// ---------------------------------------------------------------------------------
// TrafficPolicy
// ---------------------------------------------------------------------------------

/// How clients talk to one service: balancing, timeouts, retries, outlier detection
/// (circuit breaking) and connection-pool limits (bulkheads). Every field is optional;
/// an unset field takes the default written next to it.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "policy.wary.io",
    version = "v1alpha1",
    kind = "TrafficPolicy",
    status = "PolicyStatus",
    namespaced,
    shortname = "tp",
    printcolumn = r#"{"name":"Service","type":"string","jsonPath":".spec.targetRef.name"}"#,
    printcolumn = r#"{"name":"Balancer","type":"string","jsonPath":".spec.loadBalancer.algorithm"}"#,
    printcolumn = r#"{"name":"Attempts","type":"integer","jsonPath":".spec.retries.attempts"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficPolicySpec {
    /// The Service this policy applies to (same namespace).
    pub target_ref: TargetRef,
    /// Endpoint choice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
    /// Request, per-try, idle and connect timeouts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<Timeouts>,
    /// Retries with a budget and backoff.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<Retries>,
    /// Per-endpoint circuit breaking by consecutive failures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    /// Bulkhead limits for the whole service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPool>,
}

/// The load-balancing algorithm.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Algorithm {
    /// Power of two choices over Peak-EWMA latency (the default).
    #[default]
    Ewma,
    /// Round robin, for comparison.
    RoundRobin,
}

/// Endpoint choice for one service.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancer {
    /// `ewma` (default) or `roundRobin`.
    #[serde(default)]
    pub algorithm: Algorithm,
    /// Peak-EWMA decay time constant; default `10s` (Linkerd).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decay: Option<Duration>,
    /// RTT assumed for an endpoint with no sample; default `30ms`, floored at `1ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_rtt: Option<Duration>,
}

/// Timeouts; unset means the default written on each.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Timeouts {
    /// The whole request, retries included; default none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<Duration>,
    /// Each attempt; default none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try: Option<Duration>,
    /// Close an idle connection after this; default `1h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle: Option<Duration>,
    /// TCP + TLS connect; default `1s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect: Option<Duration>,
}

/// The retry conditions a user may name (Envoy `retry_on` names).
pub const RETRY_ON: &[&str] = &[
    "connect-failure",
    "reset",
    "refused-stream",
    "5xx",
    "gateway-error",
    "retriable-status-codes",
    "unavailable",
    "cancelled",
    "deadline-exceeded",
    "resource-exhausted",
];

/// Retries. Only requests that are safe to retry are retried, within the budget.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Retries {
    /// Maximum attempts including the first, 1–10; default 3. `1` disables retries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10))]
    pub attempts: Option<u32>,
    /// Retryable conditions (see [`RETRY_ON`]); default `connect-failure`, `reset`,
    /// `refused-stream`, `gateway-error`, `unavailable`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retry_on: Vec<String>,
    /// Extra status codes retried with `retriable-status-codes`, 100–599.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retriable_status_codes: Vec<u32>,
    /// The retry budget shared by all requests to the service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<RetryBudget>,
    /// Backoff between attempts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Backoff>,
    /// Largest body buffered for replay, bytes; default 65536.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_body_bytes: Option<u32>,
}

/// A retry budget: `ratio` of requests plus `minRetriesPerSecond`, over `ttl`.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryBudget {
    /// 0.0–1.0; default 0.2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub ratio: Option<f64>,
    /// Default 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_retries_per_second: Option<u32>,
    /// Default `10s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<Duration>,
}

/// Full-jitter exponential backoff.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Backoff {
    /// Default `25ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_interval: Option<Duration>,
    /// Default `250ms`; at least `baseInterval`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_interval: Option<Duration>,
}

/// Circuit breaking per endpoint by consecutive failures.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetection {
    /// Failures in a row that eject an endpoint; default 5; 0 disables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_failures: Option<u32>,
    /// First ejection; doubles per ejection. Default `1s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_ejection_time: Option<Duration>,
    /// Cap on the ejection time; default `60s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_time: Option<Duration>,
    /// 0–100; default 100 (never below one ready endpoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 100))]
    pub max_ejection_percent: Option<u32>,
}

/// Bulkhead limits for the whole service; unset means unlimited.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConnectionPool {
    /// Connections to all endpoints together, at least 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Requests waiting for a connection or endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<u32>,
    /// Requests in flight, at least 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
}

impl TrafficPolicySpec {
    /// Every field-level problem, with its path.
    pub fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        self.target_ref.validate("spec.targetRef", &mut errors);
        if let Some(lb) = &self.load_balancer {
            positive(&lb.decay, "spec.loadBalancer.decay", &mut errors);
            positive(&lb.default_rtt, "spec.loadBalancer.defaultRtt", &mut errors);
        }
        if let Some(t) = &self.timeouts {
            for (d, name) in [
                (&t.request, "request"),
                (&t.per_try, "perTry"),
                (&t.idle, "idle"),
                (&t.connect, "connect"),
            ] {
                positive(d, &format!("spec.timeouts.{name}"), &mut errors);
            }
        }
        if let Some(r) = &self.retries {
            if let Some(a) = r.attempts
                && !(1..=10).contains(&a)
            {
                errors.push(FieldError::new(
                    "spec.retries.attempts",
                    format!("{a} is out of range: use 1 to 10 (1 disables retries)"),
                ));
            }
            for (i, cond) in r.retry_on.iter().enumerate() {
                if !RETRY_ON.contains(&cond.as_str()) {
                    errors.push(FieldError::new(
                        format!("spec.retries.retryOn[{i}]"),
                        format!("unknown retry condition {cond:?}: use one of {}", RETRY_ON.join(", ")),
                    ));
                }
            }
            for (i, code) in r.retriable_status_codes.iter().enumerate() {
                if !(100..=599).contains(code) {
                    errors.push(FieldError::new(
                        format!("spec.retries.retriableStatusCodes[{i}]"),
                        format!("{code} is not an HTTP status code (100 to 599)"),
                    ));
                }
            }
            if let Some(b) = &r.budget {
                if let Some(ratio) = b.ratio
                    && !(0.0..=1.0).contains(&ratio)
                {
                    errors.push(FieldError::new(
                        "spec.retries.budget.ratio",
                        format!("{ratio} is out of range: use 0.0 to 1.0 (0.2 lets retries add 20 % load)"),
                    ));
                }
                positive(&b.ttl, "spec.retries.budget.ttl", &mut errors);
            }
            if let Some(b) = &r.backoff {
                positive(&b.base_interval, "spec.retries.backoff.baseInterval", &mut errors);
                if let (Some(base), Some(max)) = (&b.base_interval, &b.max_interval)
                    && max.0 < base.0
                {
                    errors.push(FieldError::new(
                        "spec.retries.backoff.maxInterval",
                        format!("{max} is shorter than baseInterval {base}"),
                    ));
                }
            }
        }
        if let Some(o) = &self.outlier_detection {
            positive(
                &o.base_ejection_time,
                "spec.outlierDetection.baseEjectionTime",
                &mut errors,
            );
            if let Some(p) = o.max_ejection_percent
                && p > 100
            {
                errors.push(FieldError::new(
                    "spec.outlierDetection.maxEjectionPercent",
                    format!("{p} is out of range: use 0 to 100"),
                ));
            }
            if let (Some(base), Some(max)) = (&o.base_ejection_time, &o.max_ejection_time)
                && max.0 < base.0
            {
                errors.push(FieldError::new(
                    "spec.outlierDetection.maxEjectionTime",
                    format!("{max} is shorter than baseEjectionTime {base}"),
                ));
            }
        }
        if let Some(c) = &self.connection_pool {
            for (v, name) in [(c.max_connections, "maxConnections"), (c.max_requests, "maxRequests")] {
                if v == Some(0) {
                    errors.push(FieldError::new(
                        format!("spec.connectionPool.{name}"),
                        "0 would refuse every request: use at least 1, or leave it unset for no limit",
                    ));
                }
            }
        }
        errors
    }
}

fn positive(d: &Option<Duration>, path: &str, errors: &mut Vec<FieldError>) {
    if let Some(d) = d
        && d.0.is_zero()
    {
        errors.push(FieldError::new(
            path,
            "must be longer than 0; leave it unset for the default",
        ));
    }
}

// ---------------------------------------------------------------------------------
// AuthorizationPolicy
// ---------------------------------------------------------------------------------

/// Who may call a workload's ports (after Istio's `AuthorizationPolicy`). Applies to
/// the workloads behind `targetRef`, or those matching `selector`, or, with neither,
/// every workload in the namespace.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "policy.wary.io",
    version = "v1alpha1",
    kind = "AuthorizationPolicy",
    status = "PolicyStatus",
    namespaced,
    shortname = "authz",
    printcolumn = r#"{"name":"Action","type":"string","jsonPath":".spec.action"}"#,
    printcolumn = r#"{"name":"Service","type":"string","jsonPath":".spec.targetRef.name"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    /// The Service whose workloads this policy protects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<TargetRef>,
    /// Or: the workloads whose labels match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
    /// `ALLOW` (default) or `DENY`. DENY wins over ALLOW.
    #[serde(default)]
    pub action: Action,
    /// A request matches the policy if it matches any rule.
    #[serde(default)]
    pub rules: Vec<Rule>,
}

/// A label selector (`matchLabels` only).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelector {
    /// Every label here must be on the workload with this value.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

impl LabelSelector {
    /// True when every label of the selector is on `labels` with the same value.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// What a matching policy does.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    /// Allow matching requests.
    #[default]
    Allow,
    /// Deny matching requests; wins over any ALLOW.
    Deny,
}

/// A rule matches when some `from` and some `to` match (an empty list matches all).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    /// Client matchers.
    #[serde(default)]
    pub from: Vec<From>,
    /// Request matchers.
    #[serde(default)]
    pub to: Vec<To>,
}

/// One client matcher (Istio `Rule.From`).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct From {
    /// The client.
    pub source: Source,
}

/// One request matcher (Istio `Rule.To`).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct To {
    /// The request.
    pub operation: Operation,
}

/// Who the client is; each non-empty list must match. `*` wildcards as prefix or suffix.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    /// SPIFFE IDs, e.g. `spiffe://cluster.local/ns/default/sa/web`.
    #[serde(default)]
    pub principals: Vec<String>,
    /// Client namespaces.
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// Client service accounts, `<namespace>/<name>`.
    #[serde(default)]
    pub service_accounts: Vec<String>,
    /// Principals that must not match.
    #[serde(default)]
    pub not_principals: Vec<String>,
    /// Namespaces that must not match.
    #[serde(default)]
    pub not_namespaces: Vec<String>,
}

/// What the request does; each non-empty list must match.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    /// HTTP methods, upper case.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Paths, exact or with a `*` prefix/suffix wildcard.
    #[serde(default)]
    pub paths: Vec<String>,
    /// App ports.
    #[serde(default)]
    pub ports: Vec<u16>,
    /// Methods that must not match.
    #[serde(default)]
    pub not_methods: Vec<String>,
    /// Paths that must not match.
    #[serde(default)]
    pub not_paths: Vec<String>,
}

impl AuthorizationPolicySpec {
    /// Every field-level problem, with its path.
    pub fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if let Some(t) = &self.target_ref {
            t.validate("spec.targetRef", &mut errors);
            if self.selector.is_some() {
                errors.push(FieldError::new(
                    "spec.selector",
                    "set either targetRef or selector, not both",
                ));
            }
        }
        for (r, rule) in self.rules.iter().enumerate() {
            for (f, from) in rule.from.iter().enumerate() {
                let path = format!("spec.rules[{r}].from[{f}].source");
                for (list, name) in [
                    (&from.source.principals, "principals"),
                    (&from.source.not_principals, "notPrincipals"),
                ] {
                    for (i, p) in list.iter().enumerate() {
                        check_pattern(p, &format!("{path}.{name}[{i}]"), &mut errors);
                        if !p.starts_with("spiffe://") && !p.starts_with('*') {
                            errors.push(FieldError::new(format!("{path}.{name}[{i}]"), format!("{p:?} is not a SPIFFE ID: write spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>")));
                        }
                    }
                }
                for (i, sa) in from.source.service_accounts.iter().enumerate() {
                    check_pattern(sa, &format!("{path}.serviceAccounts[{i}]"), &mut errors);
                    if !sa.contains('/') && sa != "*" {
                        errors.push(FieldError::new(
                            format!("{path}.serviceAccounts[{i}]"),
                            format!("{sa:?} needs its namespace: write <namespace>/<name>"),
                        ));
                    }
                }
            }
            for (t, to) in rule.to.iter().enumerate() {
                let path = format!("spec.rules[{r}].to[{t}].operation");
                for (list, name) in [
                    (&to.operation.methods, "methods"),
                    (&to.operation.not_methods, "notMethods"),
                ] {
                    for (i, m) in list.iter().enumerate() {
                        if m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()) {
                            errors.push(FieldError::new(
                                format!("{path}.{name}[{i}]"),
                                format!("{m:?} is not an HTTP method: use upper case, e.g. GET"),
                            ));
                        }
                    }
                }
                for (list, name) in [(&to.operation.paths, "paths"), (&to.operation.not_paths, "notPaths")] {
                    for (i, p) in list.iter().enumerate() {
                        check_pattern(p, &format!("{path}.{name}[{i}]"), &mut errors);
                        if !p.starts_with('/') && !p.starts_with('*') {
                            errors.push(FieldError::new(
                                format!("{path}.{name}[{i}]"),
                                format!("{p:?} is not a path: start it with /"),
                            ));
                        }
                    }
                }
                for (i, port) in to.operation.ports.iter().enumerate() {
                    if *port == 0 {
                        errors.push(FieldError::new(
                            format!("{path}.ports[{i}]"),
                            "port 0 is not a port: use 1 to 65535",
                        ));
                    }
                }
            }
        }
        errors
    }
}

/// A match value may be `*`, or have one `*` at its start or end.
fn check_pattern(value: &str, path: &str, errors: &mut Vec<FieldError>) {
    let inner = value
        .strip_prefix('*')
        .or_else(|| value.strip_suffix('*'))
        .unwrap_or(value);
    if value.is_empty() || inner.contains('*') {
        errors.push(FieldError::new(
            path,
            format!("{value:?} is not a match value: use an exact value, `*`, or one `*` at the start or the end"),
        ));
    }
}

// ---------------------------------------------------------------------------------
// MeshConfig
// ---------------------------------------------------------------------------------

/// Mesh-wide settings. At most one per mesh; without one every default applies.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "policy.wary.io",
    version = "v1alpha1",
    kind = "MeshConfig",
    status = "PolicyStatus",
    printcolumn = r#"{"name":"Trust domain","type":"string","jsonPath":".spec.trustDomain"}"#,
    printcolumn = r#"{"name":"mTLS","type":"string","jsonPath":".spec.mtls.mode"}"#,
    printcolumn = r#"{"name":"Default policy","type":"string","jsonPath":".spec.defaultInboundPolicy"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshConfigSpec {
    /// The SPIFFE trust domain; default `cluster.local`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_domain: Option<String>,
    /// The DNS suffix of service host names (`<svc>.<ns>.svc.<clusterDomain>`);
    /// default `cluster.local`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_domain: Option<String>,
    /// mTLS on inbound connections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<Mtls>,
    /// Workload certificate lifetime; default `24h`, at least `10s`. Proxies renew at
    /// about 70 % of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_lifetime: Option<Duration>,
    /// What happens to requests no AuthorizationPolicy matched; default
    /// `all-authenticated`.
    #[serde(default)]
    pub default_inbound_policy: DefaultInboundPolicy,
}

/// mTLS settings.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Mtls {
    /// `strict` (default): mesh mTLS only. `permissive`: plaintext is served too, for
    /// clients not yet in the mesh, as an unauthenticated client (no `wary-client-id`;
    /// policies naming identities do not match it; `defaultInboundPolicy: deny` still
    /// refuses it), and counted in `wary_proxy_inbound_plaintext_connections_total`.
    #[serde(default)]
    pub mode: MtlsMode,
}

/// mTLS mode on inbound connections.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum MtlsMode {
    /// Mesh mTLS only (the default).
    #[default]
    Strict,
    /// mTLS or plaintext, for migrations.
    Permissive,
}

/// The inbound policy when no AuthorizationPolicy matched.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum DefaultInboundPolicy {
    /// Any client with a mesh certificate (the default).
    #[default]
    AllAuthenticated,
    /// Nobody.
    Deny,
    /// Anyone.
    AllUnauthenticated,
}

impl MeshConfigSpec {
    /// Every field-level problem, with its path.
    pub fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if let Some(td) = &self.trust_domain
            && let Err(e) = wary_certs::TrustDomain::new(td)
        {
            errors.push(FieldError::new("spec.trustDomain", e.to_string()));
        }
        if let Some(cd) = &self.cluster_domain
            && wary_certs::TrustDomain::new(cd).is_err()
        {
            errors.push(FieldError::new(
                "spec.clusterDomain",
                format!("{cd:?} is not a DNS suffix: use lower-case letters, digits, '.' and '-'"),
            ));
        }
        if let Some(l) = &self.certificate_lifetime
            && l.0 < std::time::Duration::from_secs(10)
        {
            errors.push(FieldError::new(
                "spec.certificateLifetime",
                format!(
                    "{l} is too short: use at least 10s (24h is the default; short lifetimes are for testing rotation)"
                ),
            ));
        }
        errors
    }
}

/// The three CRDs as one multi-document YAML stream, as shipped in
/// `charts/wary/templates/crds.yaml` (a test keeps that file equal to this).
///
/// # Errors
/// Only if a CRD cannot be serialized, which would be a bug in these types.
pub fn crds_yaml() -> Result<String, serde_yaml::Error> {
    use kube::CustomResourceExt;
    let mut out = String::from("# Generated by `wary-control-plane --print-crds`; do not edit.\n");
    for crd in [TrafficPolicy::crd(), AuthorizationPolicy::crd(), MeshConfig::crd()] {
        let mut crd = serde_json::to_value(&crd).map_err(<serde_yaml::Error as serde::ser::Error>::custom)?;
        kubernetes_integer_formats(&mut crd);
        // Helm installs and upgrades them as part of the release (a chart's `crds/`
        // folder is installed once and never upgraded), and keeps them on uninstall,
        // with every custom resource in them.
        crd["metadata"]["annotations"] = serde_json::json!({"helm.sh/resource-policy": "keep"});
        crd["metadata"]["labels"] = serde_json::json!({"app.kubernetes.io/part-of": "wary"});
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd)?);
    }
    Ok(out)
}

/// Rewrites schemars' unsigned integer formats (`uint16`, `uint32`, ...), which the
/// Kubernetes API server does not know (it warns `unrecognized format` on every apply),
/// as the formats it does know (`int32`, `int64`; OpenAPI 3.0 data types) with the
/// type's range as `minimum`/`maximum`, so the API server still refuses what the Rust
/// type cannot hold; and writes integers' bounds as integers.
fn kubernetes_integer_formats(value: &mut serde_json::Value) {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            let range = match map.get("format").and_then(Value::as_str) {
                Some("uint8") => Some(("int32", u64::from(u8::MAX))),
                Some("uint16") => Some(("int32", u64::from(u16::MAX))),
                Some("uint32") => Some(("int64", u64::from(u32::MAX))),
                Some("uint64" | "uint") => Some(("int64", i64::MAX as u64)),
                _ => None,
            };
            if let Some((format, max)) = range {
                map.insert("format".into(), format.into());
                if map.get("minimum").and_then(Value::as_f64).is_none_or(|m| m < 0.0) {
                    map.insert("minimum".into(), 0.into());
                }
                if map
                    .get("maximum")
                    .and_then(Value::as_f64)
                    .is_none_or(|m| m > max as f64)
                {
                    map.insert("maximum".into(), max.into());
                }
            }
            // An integer's bounds as integers (schemars writes `minimum: 0.0`).
            if map.get("type").and_then(Value::as_str) == Some("integer") {
                for bound in ["minimum", "maximum"] {
                    if let Some(b) = map.get(bound).and_then(Value::as_f64)
                        && b.fract() == 0.0
                    {
                        map.insert(bound.into(), (b as i64).into());
                    }
                }
            }
            map.values_mut().for_each(kubernetes_integer_formats);
        }
        Value::Array(items) => items.iter_mut().for_each(kubernetes_integer_formats),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chart_ships_the_crds_these_types_define() {
        let shipped = include_str!("../../charts/wary/templates/crds.yaml");
        assert!(
            shipped == crds_yaml().unwrap(),
            "charts/wary/templates/crds.yaml is stale: run `cargo run -p wary-control-plane -- --print-crds > charts/wary/templates/crds.yaml`"
        );
    }

    #[test]
    fn traffic_policy_validation_names_fields() {
        let spec: TrafficPolicySpec = serde_yaml::from_str(
            "targetRef: {kind: Service, name: orders}\nretries: {attempts: 0, retryOn: [5xx, nope], budget: {ratio: 1.5}}\n",
        )
        .unwrap();
        let paths: Vec<_> = spec.validate().into_iter().map(|e| e.path).collect();
        assert_eq!(
            paths,
            [
                "spec.retries.attempts",
                "spec.retries.retryOn[1]",
                "spec.retries.budget.ratio"
            ]
        );
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err =
            serde_yaml::from_str::<TrafficPolicySpec>("targetRef: {kind: Service, name: a}\nretry: {}\n").unwrap_err();
        assert!(err.to_string().contains("unknown field `retry`"), "{err}");
    }

    #[test]
    fn crds_carry_group_and_version() {
        use kube::CustomResourceExt;
        let crd = TrafficPolicy::crd();
        assert_eq!(crd.spec.group, "policy.wary.io");
        assert_eq!(crd.spec.versions[0].name, "v1alpha1");
        assert_eq!(MeshConfig::crd().spec.scope, "Cluster");
        assert_eq!(AuthorizationPolicy::crd().spec.scope, "Namespaced");
    }
}
