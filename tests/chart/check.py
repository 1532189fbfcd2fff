"""Renders and lints the Helm chart with the real Helm library (helm-python-sdk, which
embeds Helm 4), and validates every manifest it renders, and any extra manifests given
(pods patched by the injector), with kubernetes-validate in strict mode against
Kubernetes 1.29 and the newest version it knows.

Usage: check.py CHART_DIR [MANIFEST.yaml ...]; exit status 1 with every problem listed.
"""

import sys

import helm_python as helm
import kubernetes_validate
import yaml

OLDEST = "1.29.0"


def validate(docs, origin, problems):
    newest = kubernetes_validate.utils.latest_version()
    for doc in docs:
        if not doc:
            continue
        what = f"{origin}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        for version in (OLDEST, newest):
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
    if chart.crds:
        problems.append("the chart has a crds/ folder: CRDs belong in templates/crds.yaml, so upgrades change them")
    for path in extra:
        with open(path) as f:
            count += validate(list(yaml.safe_load_all(f)), path, problems)

    if problems:
        print("\n".join(problems))
        return 1
    print(f"chart lints clean; {count} manifests validate against {OLDEST} and {kubernetes_validate.utils.latest_version()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
