//! Each policy object's `Accepted` condition, written to its `status` in a cluster so
//! `kubectl get trafficpolicies` (and `describe`) says whether the control plane took
//! it, and if not, why: the problems `/config` lists for it.
//!
//! A task of its own ([`run`]) compares, after every publish, the condition it would
//! write for each TrafficPolicy, AuthorizationPolicy and MeshConfig with the one the
//! object carries, and patches only those that differ. The condition depends only on
//! the object (its problems and generation), never on what this process saw before,
//! so replicas write the same thing and never undo each other; the transition time is
//! kept while the status holds. A write that fails (RBAC without `patch` on
//! `<kind>/status`, a timeout) is logged and retried after [`RETRY`].

use std::collections::HashMap;
use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use kube::core::object::HasStatus;
use kube::{Client, Resource, ResourceExt};
use tokio::sync::watch;

use crate::kubernetes::Stores;
use crate::policy::{PolicyCondition, PolicyStatus};

/// The condition type, as the Gateway API names it.
pub const ACCEPTED: &str = "Accepted";

/// The longest message written (Kubernetes allows 32 KiB; a screenful is enough).
const MAX_MESSAGE: usize = 4096;

/// How long one status write may take before it counts as failed.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long after a failed write the statuses are written again.
pub const RETRY: Duration = Duration::from_secs(5);

/// What an `Invalid` condition adds to the problems (the same on every replica).
const KEPT: &str = "the control plane keeps this object's last valid version, if it saw one, in force";

/// The problems of each object, from the published errors (`kubernetes:<Kind>/<ns>/<name>:
/// <problem>`, or `kubernetes:<Kind>/<name>: ...` for cluster-scoped kinds), by that
/// `<Kind>/<ns>/<name>` (`<Kind>/<name>` when cluster-scoped). Whether this process
/// holds an earlier valid version is left out: it differs between replicas.
fn problems_by_object(errors: &[String]) -> HashMap<&str, Vec<&str>> {
    let mut out: HashMap<&str, Vec<&str>> = HashMap::new();
    for e in errors {
        if let Some(rest) = e.strip_prefix("kubernetes:")
            && let Some((object, problem)) = rest.split_once(": ")
            && !problem.contains("(no earlier valid version)")
        {
            out.entry(object).or_default().push(problem);
        }
    }
    out
}

/// The condition for an object with `problems`, at `generation`, keeping `current`'s
/// transition time while the status is unchanged.
fn condition(problems: Option<&Vec<&str>>, generation: i64, current: Option<&PolicyCondition>) -> PolicyCondition {
    let (status, reason, message) = match problems {
        None => ("True", "Accepted", "in force".to_string()),
        Some(problems) => {
            let conflicted = problems.iter().any(|p| p.contains(crate::config_watch::LEFT_OUT));
            let mut message = problems.join("; ");
            if !conflicted {
                message = format!("{message}; {KEPT}");
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

/// Now, as RFC 3339 in UTC with whole seconds (what `metav1.Time` holds).
fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    let now = now.replace_nanosecond(0).unwrap_or(now);
    now.format(&time::format_description::well_known::Rfc3339)
        .expect("a UTC time formats as RFC 3339")
}

/// Writes the statuses each time `problems` (the latest publish's errors) is sent,
/// and again [`RETRY`] after a pass in which a write failed. Runs until the sender
/// is dropped.
pub async fn run(client: Client, stores: Stores, mut problems: watch::Receiver<Vec<String>>) {
    loop {
        let errors = problems.borrow_and_update().clone();
        let failed = write(&client, &stores, &errors).await;
        let next = if failed {
            tokio::time::timeout(RETRY, problems.changed()).await.unwrap_or(Ok(()))
        } else {
            problems.changed().await
        };
        if next.is_err() {
            return;
        }
    }
}

/// Writes the `Accepted` condition of every policy object in `stores` whose status
/// differs from what `errors` say. True when a write failed.
pub async fn write(client: &Client, stores: &Stores, errors: &[String]) -> bool {
    let problems = problems_by_object(errors);
    // One closure per kind: `Api::namespaced` is typed by the kind.
    let traffic = |ns: &str| Api::namespaced(client.clone(), ns);
    let authorization = |ns: &str| Api::namespaced(client.clone(), ns);
    let mut failed = sync(&stores.traffic.state(), "TrafficPolicy", &problems, traffic).await;
    failed |= sync(
        &stores.authorization.state(),
        "AuthorizationPolicy",
        &problems,
        authorization,
    )
    .await;
    failed |= sync(&stores.mesh.state(), "MeshConfig", &problems, |_: &str| {
        Api::all(client.clone())
    })
    .await;
    failed
}

/// Patches the status of each of `objects` whose condition differs; `api` gives the
/// API of an object's namespace (`""` when cluster-scoped). True when a write failed.
async fn sync<K>(
    objects: &[std::sync::Arc<K>],
    kind: &str,
    problems: &HashMap<&str, Vec<&str>>,
    api: impl Fn(&str) -> Api<K>,
) -> bool
where
    K: Resource<DynamicType = ()>
        + HasStatus<Status = PolicyStatus>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let mut failed = false;
    for object in objects {
        let (ns, name) = (object.namespace().unwrap_or_default(), object.name_any());
        let key = if ns.is_empty() {
            format!("{kind}/{name}")
        } else {
            format!("{kind}/{ns}/{name}")
        };
        let current = object
            .status()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == ACCEPTED));
        let generation = object.meta().generation.unwrap_or(0);
        let want = condition(problems.get(key.as_str()), generation, current);
        if current == Some(&want) {
            continue;
        }
        let patch = serde_json::json!({"status": {"conditions": [want]}});
        let api = api(&ns);
        let written = tokio::time::timeout(
            WRITE_TIMEOUT,
            api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch)),
        )
        .await;
        match written {
            Ok(Ok(_)) => {
                tracing::info!(object = %key, accepted = %want.status, reason = %want.reason, "wrote its status")
            }
            // Deleted meanwhile: nothing to say.
            Ok(Err(kube::Error::Api(e))) if e.code == 404 => {}
            Ok(Err(e)) => {
                failed = true;
                tracing::warn!(object = %key, error = %e, retry_in_s = RETRY.as_secs(), "cannot write its status (the chart's RBAC lets the control plane patch <kind>/status)");
            }
            Err(_) => {
                failed = true;
                tracing::warn!(object = %key, timeout_s = WRITE_TIMEOUT.as_secs(), retry_in_s = RETRY.as_secs(), "writing its status timed out");
            }
        }
    }
    failed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_are_found_by_object_and_conditions_say_them() {
        let errors = vec![
            "kubernetes:AuthorizationPolicy/shop/callers: spec.rules[0].from[0].source.principals[0]: \"x\" is not a SPIFFE ID".to_string(),
            format!("kubernetes:TrafficPolicy/shop/two: targets orders, as TrafficPolicy/shop/one does {}", crate::config_watch::LEFT_OUT),
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
        assert!(invalid.message.contains("is not a SPIFFE ID") && invalid.message.ends_with(KEPT));

        let conflicted = condition(by.get("TrafficPolicy/shop/two"), 1, None);
        assert_eq!(conflicted.reason, "Conflicted");
        assert!(!conflicted.message.contains(KEPT));

        // What this process happened to see is not in the condition: replicas agree.
        let mesh = condition(by.get("MeshConfig/mesh"), 1, None);
        assert_eq!(mesh.message, format!("spec.trustDomain: bad; {KEPT}"));

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
