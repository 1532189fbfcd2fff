//! `wary inject`: adds the sidecar to the pods of a manifest offline, with the same
//! patch the admission webhook applies (`wary_control_plane::inject::patch`).
//!
//! Reads YAML documents (a file, or `-` for stdin) and prints them with every pod
//! template injected: Pods, Deployments, StatefulSets, DaemonSets, ReplicaSets, Jobs,
//! CronJobs, and the items of a List. Anything else passes through unchanged. Pods
//! that say `wary.io/inject: disabled`, or already run the proxy, are left alone (and
//! said so on stderr), so running it twice changes nothing.

use std::io::Read;
use std::path::PathBuf;

use anyhow::{Context, bail};
use serde::Deserialize;
use serde_json::Value;
use wary_control_plane::inject::{InjectConfig, patch};

/// `wary inject`.
#[derive(Debug, clap::Args)]
pub struct InjectArgs {
    /// The manifest (YAML, one or more documents); `-` reads stdin.
    file: PathBuf,
    /// The mesh's trust bundle (PEM): `wary-control-plane ca bundle` prints it.
    /// Default: the local CA's (`~/.local/state/wary/ca/trust-bundle.pem`).
    #[arg(long, env = "WARY_TRUST_ANCHORS")]
    trust_anchors: Option<PathBuf>,
    /// The proxy image. Default: ghcr.io/wary-mesh/wary-proxy:<this version>.
    #[arg(long)]
    proxy_image: Option<String>,
    /// The discovery URL the proxies dial.
    #[arg(long, default_value = "https://wary-control-plane.wary-system.svc:8086")]
    control_plane: String,
    /// The mesh's trust domain.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Inject a native sidecar (Kubernetes 1.29 and later); false: a regular container.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    native_sidecars: bool,
}

/// Runs `wary inject`.
pub fn run(args: InjectArgs) -> anyhow::Result<()> {
    let anchors_path = match args.trust_anchors {
        Some(p) => p,
        None => std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_default()
            .join(".local/state/wary/ca/trust-bundle.pem"),
    };
    let trust_anchors_pem = std::fs::read_to_string(&anchors_path).with_context(|| {
        format!(
            "cannot read the trust bundle {}: give --trust-anchors FILE (`wary-control-plane ca bundle > FILE` writes it)",
            anchors_path.display()
        )
    })?;
    // It goes into every pod spec: it must be certificates, and never a key.
    if trust_anchors_pem.contains("PRIVATE KEY") {
        bail!(
            "{} holds a private key: give the trust bundle (`wary-control-plane ca bundle`), never the CA's key",
            anchors_path.display()
        );
    }
    wary_certs::credentials::TrustBundle::from_pem(&trust_anchors_pem).map_err(|e| {
        anyhow::anyhow!(
            "{} is not a trust bundle ({e}): `wary-control-plane ca bundle > FILE` writes one",
            anchors_path.display()
        )
    })?;
    let trust_anchors_pem = trust_anchors_pem.replace("\r\n", "\n");
    let defaults = InjectConfig::default();
    let config = InjectConfig {
        image: args.proxy_image.unwrap_or(defaults.image.clone()),
        control_plane: args.control_plane,
        trust_domain: args.trust_domain,
        trust_anchors_pem,
        native_sidecar: args.native_sidecars,
        ..defaults
    };
    let text = if args.file.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s).context("cannot read stdin")?;
        s
    } else {
        std::fs::read_to_string(&args.file).with_context(|| format!("cannot read {}", args.file.display()))?
    };
    let out = inject_manifest(&text, &config, &mut |what| eprintln!("wary inject: {what}"))?;
    print!("{out}");
    Ok(())
}

/// Injects every pod template in the YAML documents of `text`; `note` hears of each
/// pod left alone and why.
///
/// # Errors
/// A document is not YAML, or a pod cannot be injected (a malformed
/// `config.wary.io/*` annotation); the message names the document.
pub fn inject_manifest(text: &str, config: &InjectConfig, note: &mut dyn FnMut(String)) -> anyhow::Result<String> {
    let mut out = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let mut value = Value::deserialize(doc).with_context(|| format!("document {}: not YAML", i + 1))?;
        if value.is_null() {
            continue;
        }
        inject_object(&mut value, config, note).with_context(|| format!("document {}", i + 1))?;
        out.push(serde_yaml::to_string(&value)?);
    }
    Ok(out.join("---\n"))
}

fn inject_object(object: &mut Value, config: &InjectConfig, note: &mut dyn FnMut(String)) -> anyhow::Result<()> {
    let kind = object
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let name = object
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("(unnamed)")
        .to_string();
    let template = match kind.as_str() {
        "List" => {
            for item in object
                .get_mut("items")
                .and_then(Value::as_array_mut)
                .into_iter()
                .flatten()
            {
                inject_object(item, config, note)?;
            }
            return Ok(());
        }
        "Pod" => Some(object),
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" | "ReplicationController" => {
            object.pointer_mut("/spec/template")
        }
        "CronJob" => object.pointer_mut("/spec/jobTemplate/spec/template"),
        _ => {
            if !kind.is_empty() && object.pointer("/spec/template/spec").is_some() {
                note(format!(
                    "{kind} {name} passed through: wary inject does not know this kind; inject its pods with the webhook"
                ));
            }
            return Ok(());
        }
    };
    let Some(template) = template else {
        bail!("{kind} {name} has no pod template");
    };
    match patch(template, None, config).map_err(|e| anyhow::anyhow!("{kind} {name}: {e}"))? {
        Ok(injection) => {
            json_patch::patch(template, &injection.patch)
                .with_context(|| format!("{kind} {name}: applying the patch"))?;
            note(format!("{kind} {name} injected"));
            for w in injection.warnings {
                note(format!("{kind} {name}: warning: {w}"));
            }
        }
        Err(skipped) => note(format!("{kind} {name} left as it is: {skipped}")),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MANIFEST: &str = r#"apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata:
      labels: {app: web}
      annotations: {config.wary.io/skip-outbound-ports: "5432"}
    spec:
      containers: [{name: web, image: nginx, futureField: kept}]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: settings}
data: {a: b}
"#;

    #[test]
    fn a_deployment_is_injected_once_and_other_kinds_pass_through() {
        let config = InjectConfig::default();
        let mut notes = Vec::new();
        let once = inject_manifest(MANIFEST, &config, &mut |n| notes.push(n)).unwrap();
        assert_eq!(notes, ["Deployment web injected"]);
        notes.clear();
        let docs: Vec<Value> = serde_yaml::Deserializer::from_str(&once)
            .map(|d| Value::deserialize(d).unwrap())
            .collect();
        let spec = docs[0].pointer("/spec/template/spec").unwrap();
        let inits: Vec<&str> = spec["initContainers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(inits, ["wary-init", "wary-proxy"]);
        assert_eq!(spec["initContainers"][1]["restartPolicy"], "Always");
        assert_eq!(
            spec["initContainers"][0]["args"],
            serde_json::json!(["init", "--proxy-uid", "2102", "--skip-outbound-ports", "5432"])
        );
        // A field this build does not know survives: the patch touches only what it adds.
        assert_eq!(spec["containers"][0]["futureField"], "kept");
        assert_eq!(docs[1]["kind"], "ConfigMap");

        let twice = inject_manifest(&once, &config, &mut |n| notes.push(n)).unwrap();
        assert_eq!(once, twice);
        assert_eq!(notes, ["Deployment web left as it is: already injected"]);
    }

    #[test]
    fn existing_init_containers_and_unknown_fields_stay_as_they_were() {
        let manifest = MANIFEST.replace(
            "      containers: [{name: web, image: nginx, futureField: kept}]",
            "      initContainers: [{name: migrate, image: migrate, futureField: mine}]\n      containers: [{name: web, image: nginx, futureField: kept}]",
        );
        let config = InjectConfig {
            native_sidecar: false,
            ..InjectConfig::default()
        };
        let out = inject_manifest(&manifest, &config, &mut |_| {}).unwrap();
        let doc: Value = serde_yaml::from_str(out.split("---\n").next().unwrap()).unwrap();
        let spec = doc.pointer("/spec/template/spec").unwrap();
        let name = |c: &Value| c["name"].as_str().unwrap().to_string();
        let inits: Vec<String> = spec["initContainers"].as_array().unwrap().iter().map(name).collect();
        let containers: Vec<String> = spec["containers"].as_array().unwrap().iter().map(name).collect();
        assert_eq!(inits, ["wary-init", "migrate"]);
        assert_eq!(containers, ["wary-proxy", "web"]);
        assert_eq!(spec["initContainers"][1]["futureField"], "mine");
        assert_eq!(spec["containers"][1]["futureField"], "kept");
        assert!(spec["initContainers"][0].get("futureField").is_none());
    }

    #[test]
    fn a_malformed_annotation_is_named() {
        let bad = MANIFEST.replace("\"5432\"", "\"54x2\"");
        let err = inject_manifest(&bad, &InjectConfig::default(), &mut |_| {}).unwrap_err();
        let chain = format!("{err:#}");
        assert!(chain.contains("document 1"), "{chain}");
        assert!(
            chain.contains("config.wary.io/skip-outbound-ports: \"54x2\" is not a port"),
            "{chain}"
        );
    }
}
