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

RULES=$(mktemp /tmp/bulwark-rules.XXXXXX.yaml)
trap 'rm -f "$RULES"' EXIT
python3 - prometheus-rules.yaml "$RULES" <<'PY'
import sys, yaml
doc = yaml.safe_load(open(sys.argv[1]))
assert doc["kind"] == "PrometheusRule", doc["kind"]
yaml.safe_dump(doc["spec"], open(sys.argv[2], "w"))
PY
promtool check rules "$RULES"

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
print(f"grafana dashboard: {len(dashboard['panels'])} panels, {len(used)} metric names, all exported")
PY
