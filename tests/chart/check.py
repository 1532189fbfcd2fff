"""Renders and lints the Helm chart with the real Helm library (helm-python-sdk, which
embeds Helm 4), and validates every manifest it renders, and any extra manifests given
(pods patched by the injector), with kubernetes-validate in strict mode against
Kubernetes 1.26 (the chart's oldest; 1.29 for injected pods, which may carry native
sidecars) and the newest version it knows.

Usage: check.py CHART_DIR [MANIFEST.yaml ...]; exit status 1 with every problem listed.
"""

import sys

import helm_python as helm
import kubernetes_validate
import yaml

OLDEST = "1.26.0"
NATIVE_SIDECARS_SINCE = "1.29.0"


def validate(docs, origin, problems, oldest=OLDEST):
    newest = kubernetes_validate.utils.latest_version()
    for doc in docs:
        if not doc:
            continue
        what = f"{origin}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        for version in (oldest, newest):
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                problems.append(f"{what} against {version}: {path}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                problems.append(f"{what} against {version}: no schema ({e.message})")
    return len(docs)


def main():
    chart_dir, extra = sys.argv[1], sys.argv[2:]
    problems = []

    report = helm.lint(chart_dir, strict=True, namespace="wary-system", kube_version="v1.29.0")
    for m in report.get("messages") or []:
        if m["severity"] >= 2:  # warnings and errors (strict)
            problems.append(f"helm lint: {m['path']}: {m['error']}")
    problems += [f"helm lint: {e}" for e in report.get("errors") or []]

    chart = helm.Chart.load(chart_dir)
    chart.validate_schema({})
    try:
        chart.validate_schema({"webhook": {"failurePolicy": "Sometimes"}})
        problems.append("values.schema.json accepted webhook.failurePolicy: Sometimes")
    except helm.HelmError:
        pass

    count = 0
    for values in ({}, {"proxy": {"nativeSidecar": False}, "dashboard": {"enabled": False}}):
        rendered = chart.render(values, name="wary", namespace="wary-system", is_install=True)
        docs = []
        for path, text in sorted(rendered.items()):
            if path.endswith("NOTES.txt") or not text.strip():
                continue
            docs += [d for d in yaml.safe_load_all(text) if d]
        kinds = {d["kind"] for d in docs}
        for needed in ("Deployment", "Service", "ServiceAccount", "ClusterRole", "MutatingWebhookConfiguration", "Secret",
                       "CustomResourceDefinition"):
            if needed not in kinds:
                problems.append(f"the chart rendered no {needed} (values {values})")
        count += validate(docs, f"rendered (values {values})", problems)
    # Values that change what is rendered: one replica (no PodDisruptionBudget), the HA
    # file, prometheus-operator's PodMonitors (not validated: their CRD is not
    # Kubernetes').
    def kinds_of(values):
        rendered = chart.render(values, name="wary", namespace="wary-system", is_install=True)
        docs = [d for path, text in rendered.items() if not path.endswith("NOTES.txt")
                for d in yaml.safe_load_all(text) if d]
        return docs, [d["kind"] for d in docs]
    _, kinds = kinds_of({"controlPlane": {"replicas": 1}})
    if "PodDisruptionBudget" in kinds:
        problems.append("one replica rendered a PodDisruptionBudget")
    with open(f"{chart_dir}/values-ha.yaml") as f:
        ha = yaml.safe_load(f)
    docs, kinds = kinds_of(ha)
    count += validate([d for d in docs], "rendered (values-ha.yaml)", problems)
    if "PodDisruptionBudget" not in kinds:
        problems.append("values-ha.yaml rendered no PodDisruptionBudget")
    hooks = [d for d in docs if d["kind"] == "MutatingWebhookConfiguration"][0]["webhooks"]
    if any(h["failurePolicy"] != "Fail" for h in hooks):
        problems.append("values-ha.yaml did not set failurePolicy: Fail")
    deployment = [d for d in docs if d["kind"] == "Deployment"][0]
    if deployment["spec"].get("strategy", {}).get("rollingUpdate", {}).get("maxSurge") != 0:
        problems.append("values-ha.yaml (one replica per node) must roll out with maxSurge: 0, or a rollout waits forever")
    _, kinds = kinds_of({"metrics": {"podMonitor": {"enabled": True, "labels": {"release": "prometheus"}}}})
    if kinds.count("PodMonitor") != 2:
        problems.append(f"metrics.podMonitor.enabled rendered {kinds.count('PodMonitor')} PodMonitors, not 2")
    notes = chart.render({}, name="wary", namespace="wary-system", is_install=True).get("wary/templates/NOTES.txt", "")
    for needed in ("wary.io/inject=enabled", "wary-ca", "kubectl delete crd"):
        if needed not in notes:
            problems.append(f"NOTES.txt does not mention {needed}")

    if chart.crds:
        problems.append("the chart has a crds/ folder: CRDs belong in templates/crds.yaml, so upgrades change them")
    for path in extra:
        with open(path) as f:
            # Injected pods may carry native sidecars, which need 1.29.
            count += validate(list(yaml.safe_load_all(f)), path, problems, oldest=NATIVE_SIDECARS_SINCE)

    if problems:
        print("\n".join(problems))
        return 1
    print(f"chart lints clean; {count} manifests validate against {OLDEST} and {kubernetes_validate.utils.latest_version()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
