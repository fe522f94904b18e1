#!/usr/bin/env bash
# The Helm chart: lint, then render it with the default values and with
# every option on (charts/eventplane/ci/all-options-values.yaml) and
# validate every manifest offline against the Kubernetes 1.37 schemas,
# strictly (unknown fields fail). The chart's CRDs must be the generated
# ones. Custom resources of the Prometheus Operator have no schema there
# and are checked by tests/tests/chart.rs instead.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
chart=charts/eventplane

die() { echo "chart: error: $*" >&2; exit 1; }
for tool in helm kubernetes-validate; do
    command -v "$tool" >/dev/null || die "$tool not found (tests/ensure-services.sh installs it)"
done

diff -r crds "$chart/crds" --exclude examples ||
    die "$chart/crds differs from crds/: run cargo run -p eventplane-operator --bin crdgen"

helm lint --strict "$chart"
helm lint --strict "$chart" -f "$chart/ci/all-options-values.yaml"

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
helm template eventplane "$chart" --namespace eventplane --include-crds >"$out/default.yaml"
helm template eventplane "$chart" --namespace eventplane --include-crds \
    -f "$chart/ci/all-options-values.yaml" >"$out/all-options.yaml"
for rendered in default all-options; do
    echo "chart: validating the $rendered rendering ($(grep -c '^kind:' "$out/$rendered.yaml") manifests)"
    rc=0
    kubernetes-validate --strict --quiet "$out/$rendered.yaml" >"$out/$rendered.log" 2>&1 || rc=$?
    # Only the Prometheus Operator's kinds may lack a schema.
    if grep -v "Couldn't find schema for kind \(ServiceMonitor\|PrometheusRule\) with api version monitoring.coreos.com/v1" "$out/$rendered.log"; then
        die "the $rendered rendering does not validate"
    fi
    [ "$rc" = 0 ] || die "kubernetes-validate failed on the $rendered rendering (exit $rc)"
done
echo "chart: ok"
