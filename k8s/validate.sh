#!/usr/bin/env bash
# Validates the Kubernetes material: every built-in manifest with kubernetes-validate
# --strict, the alert rules with promtool, and the dashboard's metric names against the
# ones bulwark exports. (The ConfigMap's embedded config is checked by `cargo test`.)
set -euo pipefail
cd "$(dirname "$0")"

# Built-in kinds only: ServiceMonitor and PrometheusRule are CRDs with no schema here.
# Against the lowest Kubernetes version supported (1.30: preStop `sleep`) and the newest
# the validator knows.
BUILTIN=(namespace.yaml configmap.yaml deployment.yaml service.yaml origin-services.yaml hpa.yaml pdb.yaml ingress.yaml redis.yaml networkpolicy.yaml)
LOWEST=1.30.0
for version in "$LOWEST" ""; do
    kubernetes-validate --strict --quiet ${version:+-k "$version"} "${BUILTIN[@]}"
    echo "kubernetes-validate --strict ${version:-(newest)}: ${#BUILTIN[@]} files passed"
done

# The rules file is the PrometheusRule's spec; its unit tests sit beside it as rules.yaml.
RULES_DIR=$(mktemp -d /tmp/bulwark-rules.XXXXXX)
trap 'rm -rf "$RULES_DIR"' EXIT
python3 - prometheus-rules.yaml prometheus-rules.test.yaml "$RULES_DIR/rules.yaml" <<'PY'
import sys, yaml
doc = yaml.safe_load(open(sys.argv[1]))
assert doc["kind"] == "PrometheusRule", doc["kind"]
yaml.safe_dump(doc["spec"], open(sys.argv[3], "w"))
alerts = [r for g in doc["spec"]["groups"] for r in g["rules"] if "alert" in r]
tested = {t["alertname"] for case in yaml.safe_load(open(sys.argv[2]))["tests"] for t in case.get("alert_rule_test", [])}
missing = [a["alert"] for a in alerts if "runbook_url" not in a.get("annotations", {})]
if missing:
    sys.exit(f"alerts without a runbook_url: {missing}")
untested = [a["alert"] for a in alerts if a["alert"] not in tested]
if untested:
    sys.exit(f"alerts without a unit test in prometheus-rules.test.yaml: {untested}")
import re
# GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens.
anchors = {re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
           for h in re.findall(r"^#+ (.+)$", open("../docs/runbook.md").read(), re.M)}
dangling = [(a["alert"], u) for a in alerts for u in [a["annotations"]["runbook_url"]] if u.split("#", 1)[-1] not in anchors]
if dangling:
    sys.exit(f"runbook_url anchors with no section in docs/runbook.md: {dangling}")
print(f"{len(alerts)} alerts, each with a runbook_url to a section of docs/runbook.md and a unit test")
PY
cp prometheus-rules.test.yaml "$RULES_DIR/"
promtool check rules "$RULES_DIR/rules.yaml"
promtool test rules "$RULES_DIR/prometheus-rules.test.yaml"

python3 - grafana-dashboard.json ../src/metrics.rs <<'PY'
import json, re, sys
dashboard = json.load(open(sys.argv[1]))
exported = set(re.findall(r'"(bulwark_[a-z0-9_]+)"', open(sys.argv[2]).read()))
used = set()
for panel in dashboard["panels"]:
    for target in panel["targets"]:
        used |= set(re.findall(r"bulwark_[a-z0-9_]+", target["expr"]))
unknown = {m for m in used if re.sub(r"_(bucket|count|sum)$", "", m) not in exported}
if unknown:
    sys.exit(f"dashboard uses metrics bulwark does not export: {sorted(unknown)}")
variables = {v["name"] for v in dashboard["templating"]["list"]}
if not {"namespace", "job"} <= variables:
    sys.exit(f"dashboard lacks the namespace and job variables: {sorted(variables)}")
# Every series a panel reads is scoped to the chosen namespace and job.
unscoped = [(p["title"], m.group(0)) for p in dashboard["panels"] for t in p["targets"]
            for m in re.finditer(r"bulwark_[a-z0-9_]+(\{[^}]*\})?", t["expr"])
            if 'namespace=~"$namespace"' not in m.group(0) or 'job=~"$job"' not in m.group(0)]
if unscoped:
    sys.exit(f"dashboard series not scoped to $namespace and $job: {unscoped}")
print(f"grafana dashboard: {len(dashboard['panels'])} panels, {len(used)} metric names, all exported")
PY
