//! Each policy object's `Accepted` condition, written to its `status` in a cluster so
//! `kubectl get trafficpolicies` (and `describe`) says whether the control plane took
//! it, and if not, why — the same problems `/config` lists.
//!
//! After every publish the control plane compares, for each TrafficPolicy,
//! AuthorizationPolicy and MeshConfig it sees, the condition it would write with the
//! one the object carries, and patches only those that differ. Replicas write the same
//! thing (the transition time is kept while the status holds), so two of them do not
//! fight; a write that fails (e.g. RBAC without `patch` on `<kind>/status`) is logged
//! and retried on the next change.

use std::collections::HashMap;

use kube::api::{Api, Patch, PatchParams};
use kube::{Client, Resource, ResourceExt};

use crate::kubernetes::Stores;
use crate::policy::{PolicyCondition, PolicyStatus};

/// The condition type, as the Gateway API names it.
pub const ACCEPTED: &str = "Accepted";

/// The longest message written (Kubernetes allows 32 KiB; a screenful is enough).
const MAX_MESSAGE: usize = 4096;

/// The problems of each object, from the published errors (`kubernetes:<Kind>/<ns>/<name>:
/// <problem>`, or `kubernetes:<Kind>/<name>: ...` for cluster-scoped kinds), by that
/// `<Kind>/<ns>/<name>` (`<Kind>/<name>` when cluster-scoped).
fn problems_by_object(errors: &[String]) -> HashMap<&str, Vec<&str>> {
    let mut out: HashMap<&str, Vec<&str>> = HashMap::new();
    for e in errors {
        if let Some(rest) = e.strip_prefix("kubernetes:")
            && let Some((object, problem)) = rest.split_once(": ")
        {
            out.entry(object).or_default().push(problem);
        }
    }
    out
}

/// The condition the control plane holds for an object with `problems`, at
/// `generation`, keeping `current`'s transition time while the status is unchanged.
fn condition(problems: Option<&Vec<&str>>, generation: i64, current: Option<&PolicyCondition>) -> PolicyCondition {
    let (status, reason, message) = match problems {
        None => ("True", "Accepted", "in force".to_string()),
        Some(problems) => {
            let conflicted = problems.iter().any(|p| p.contains("(left out; the rest is served)"));
            let mut message = problems.join("; ");
            if !conflicted && !problems.iter().any(|p| p.contains("no earlier valid version")) {
                message.push_str("; the last valid version stays in force");
            }
            if message.len() > MAX_MESSAGE {
                let mut cut = MAX_MESSAGE;
                while !message.is_char_boundary(cut) {
                    cut -= 1;
                }
                message.truncate(cut);
                message.push('…');
            }
            ("False", if conflicted { "Conflicted" } else { "Invalid" }, message)
        }
    };
    let last_transition_time = match current {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => now_rfc3339(),
    };
    PolicyCondition {
        type_: ACCEPTED.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time,
    }
}

/// Now, as RFC 3339 in UTC with seconds (what `metav1.Time` holds).
fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_default()
}

/// Writes the `Accepted` condition of every policy object in `stores` whose status
/// differs from what `errors` (the latest publish's) say.
pub async fn write(client: &Client, stores: &Stores, errors: &[String]) {
    let problems = problems_by_object(errors);
    let namespaced = |ns: &str| Api::namespaced(client.clone(), ns);
    sync(&stores.traffic.state(), "TrafficPolicy", &problems, namespaced).await;
    let namespaced = |ns: &str| Api::namespaced(client.clone(), ns);
    sync(
        &stores.authorization.state(),
        "AuthorizationPolicy",
        &problems,
        namespaced,
    )
    .await;
    sync(&stores.mesh.state(), "MeshConfig", &problems, |_: &str| {
        Api::all(client.clone())
    })
    .await;
}

/// The policy kinds: each carries a [`PolicyStatus`].
trait HasPolicyStatus {
    fn policy_status(&self) -> Option<&PolicyStatus>;
}

impl HasPolicyStatus for crate::policy::TrafficPolicy {
    fn policy_status(&self) -> Option<&PolicyStatus> {
        self.status.as_ref()
    }
}

impl HasPolicyStatus for crate::policy::AuthorizationPolicy {
    fn policy_status(&self) -> Option<&PolicyStatus> {
        self.status.as_ref()
    }
}

impl HasPolicyStatus for crate::policy::MeshConfig {
    fn policy_status(&self) -> Option<&PolicyStatus> {
        self.status.as_ref()
    }
}

/// Patches the status of each of `objects` whose condition differs; `api` gives the
/// API of an object's namespace (`""` when cluster-scoped).
async fn sync<K>(
    objects: &[std::sync::Arc<K>],
    kind: &str,
    problems: &HashMap<&str, Vec<&str>>,
    api: impl Fn(&str) -> Api<K>,
) where
    K: Resource<DynamicType = ()> + HasPolicyStatus + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    for object in objects {
        let (ns, name) = (object.namespace().unwrap_or_default(), object.name_any());
        let key = if ns.is_empty() {
            format!("{kind}/{name}")
        } else {
            format!("{kind}/{ns}/{name}")
        };
        let current = object
            .policy_status()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == ACCEPTED));
        let generation = object.meta().generation.unwrap_or(0);
        let want = condition(problems.get(key.as_str()), generation, current);
        if current == Some(&want) {
            continue;
        }
        let patch = serde_json::json!({"status": {"conditions": [want]}});
        match api(&ns)
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => tracing::info!(object = %key, accepted = %want.status, reason = %want.reason, "wrote its status"),
            Err(e) => {
                tracing::warn!(object = %key, error = %e, "cannot write its status (RBAC: patch on its status subresource); retried on the next change")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_are_found_by_object_and_conditions_say_them() {
        let errors = vec![
            "kubernetes:AuthorizationPolicy/shop/callers: spec.rules[0].from[0].source.principals[0]: \"x\" is not a SPIFFE ID".to_string(),
            "kubernetes:TrafficPolicy/shop/two: targets orders, as TrafficPolicy/shop/one does (left out; the rest is served)".to_string(),
            "kubernetes:MeshConfig/mesh: spec.trustDomain: bad".to_string(),
            "kubernetes:MeshConfig/mesh: not in force until it is fixed (no earlier valid version)".to_string(),
            "some other error".to_string(),
        ];
        let by = problems_by_object(&errors);
        assert_eq!(by.len(), 3);

        let invalid = condition(by.get("AuthorizationPolicy/shop/callers"), 3, None);
        assert_eq!(
            (
                invalid.status.as_str(),
                invalid.reason.as_str(),
                invalid.observed_generation
            ),
            ("False", "Invalid", 3)
        );
        assert!(
            invalid.message.contains("is not a SPIFFE ID")
                && invalid.message.ends_with("the last valid version stays in force")
        );

        let conflicted = condition(by.get("TrafficPolicy/shop/two"), 1, None);
        assert_eq!(conflicted.reason, "Conflicted");
        assert!(!conflicted.message.contains("last valid"));

        let never_valid = condition(by.get("MeshConfig/mesh"), 1, None);
        assert!(
            !never_valid.message.contains("last valid version stays"),
            "{}",
            never_valid.message
        );

        let ok = condition(None, 4, None);
        assert_eq!((ok.status.as_str(), ok.reason.as_str()), ("True", "Accepted"));
        // The transition time holds while the status does; a change renews it.
        let old = PolicyCondition {
            last_transition_time: "2020-01-01T00:00:00Z".into(),
            ..ok.clone()
        };
        assert_eq!(
            condition(None, 5, Some(&old)).last_transition_time,
            "2020-01-01T00:00:00Z"
        );
        assert_ne!(
            condition(by.get("TrafficPolicy/shop/two"), 5, Some(&old)).last_transition_time,
            "2020-01-01T00:00:00Z"
        );
    }

    #[test]
    fn long_messages_are_cut_on_a_character_boundary() {
        let long = "é".repeat(MAX_MESSAGE);
        let problems = vec![long.as_str()];
        let c = condition(Some(&problems), 1, None);
        assert!(c.message.len() <= MAX_MESSAGE + '…'.len_utf8());
        assert!(c.message.ends_with('…'));
    }
}
