#!/usr/bin/env bash
# Checks deploy/k8s (part of `make test`):
#  1. both overlays render (`kubectl kustomize`, Debian's kubernetes-client);
#  2. every rendered object validates against the Kubernetes schemas, strictly
#     (kubernetes-validate, PyPI), and the KEDA and Prometheus Operator objects against their
#     CRD schemas (deploy/k8s/validate: @kubernetes-models, npm, pinned);
#  3. checkov (PyPI) passes on the rendered overlays and the Dockerfile; each skip is an
#     annotation with its reason beside the object it concerns;
#  4. every environment variable the manifests give the service is one it reads: a
#     MEDIA_CLUSTERING__ key the binary accepts (`media-clustering config` refuses unknown
#     keys), or a name from the service's own alias table (src/config.rs WELL_KNOWN), or
#     one the code reads directly.
# Usage: scripts/check-k8s.sh BIN   (a media-clustering binary, for step 4)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BIN="$1"
log() { echo "check-k8s: $*" >&2; }
die() { echo "check-k8s: FAILED: $*" >&2; exit 1; }

command -v kubectl >/dev/null 2>&1 || {
    log "installing kubectl (Debian package kubernetes-client)"
    { apt-get install -y -qq kubernetes-client || { apt-get update -qq && apt-get install -y -qq kubernetes-client; }; } >/dev/null
}
TOOLS="$ROOT/target/k8stools"
if ! "$TOOLS/bin/python" -c 'import checkov, kubernetes_validate, yaml' >/dev/null 2>&1; then
    log "preparing $TOOLS (checkov, kubernetes-validate)"
    scripts/venv.sh "$TOOLS"
    PIP_DISABLE_PIP_VERSION_CHECK=1 "$TOOLS/bin/pip" install -q 'checkov==3.*' 'kubernetes-validate==1.37.*'
fi
NODE="$ROOT/target/k8s-node"
if ! cmp -s deploy/k8s/validate/package.json "$NODE/package.json" || [ ! -d "$NODE/node_modules/@kubernetes-models/keda" ]; then
    log "installing the CRD schemas (npm)"
    mkdir -p "$NODE"
    cp deploy/k8s/validate/package.json "$NODE/"
    (cd "$NODE" && npm install --no-audit --no-fund --loglevel=error >/dev/null)
fi
cp deploy/k8s/validate/crds.mjs "$NODE/"

OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
for overlay in dev prod; do
    kubectl kustomize "deploy/k8s/overlays/$overlay" >"$OUT/$overlay.yaml" || die "overlay $overlay does not render"

    # Strict: an unexpected property is an error. Custom kinds are checked below.
    "$TOOLS/bin/kubernetes-validate" -k 1.32.0 --strict --quiet --no-warn "$OUT/$overlay.yaml" >"$OUT/kv.txt" 2>&1 \
        || { cat "$OUT/kv.txt" >&2; die "$overlay: Kubernetes schema validation"; }
    if grep -q '^ERROR' "$OUT/kv.txt"; then cat "$OUT/kv.txt" >&2; die "$overlay: Kubernetes schema validation"; fi

    "$TOOLS/bin/python" - "$OUT/$overlay.yaml" >"$OUT/custom.jsonl" <<'PY'
import json, sys, yaml
for d in yaml.safe_load_all(open(sys.argv[1])):
    if d and d["apiVersion"].split("/")[0] in ("keda.sh", "monitoring.coreos.com"):
        print(json.dumps(d))
PY
    [ -s "$OUT/custom.jsonl" ] || die "$overlay: no ScaledObject or ServiceMonitor rendered"
    node "$NODE/crds.mjs" <"$OUT/custom.jsonl" || die "$overlay: CRD schema validation"

    # The dev overlay follows a moving tag by design (CKV_K8S_43: digest; prod pins one).
    skip=()
    [ "$overlay" = dev ] && skip=(--skip-check CKV_K8S_43)
    "$TOOLS/bin/checkov" --quiet --compact --skip-download --framework kubernetes "${skip[@]}" \
        -f "$OUT/$overlay.yaml" >"$OUT/checkov.txt" 2>&1 || { cat "$OUT/checkov.txt" >&2; die "$overlay: checkov"; }

    # Step 4: the environment the manifests give the service.
    "$TOOLS/bin/python" - "$OUT/$overlay.yaml" src/config.rs >"$OUT/env.txt" <<'PY'
import re, sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
aliases = set(re.findall(r'\("([A-Z][A-Z0-9_]*)", "[a-z_.]+"\)', open(sys.argv[2]).read()))
# Read by the code or by libraries it uses, outside the alias table.
direct = {"APP_ENV", "MEDIA_CLUSTERING_CONFIG_DIR", "ORT_DYLIB_PATH", "NODE_IP",
          "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_ENDPOINT"}
configmaps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
names, bad = {}, []
for d in docs:
    if d["kind"] != "Deployment" or d["metadata"]["labels"].get("app.kubernetes.io/name") != "media-clustering":
        continue
    for c in d["spec"]["template"]["spec"]["containers"]:
        for src in c.get("envFrom", []):
            for k, v in configmaps[src["configMapRef"]["name"]].items():
                names[k] = v
        for e in c.get("env", []):
            names[e["name"]] = e.get("value", "x" * 40)
for k in sorted(names):
    if not (k.startswith("MEDIA_CLUSTERING__") or k in aliases or k in direct):
        bad.append(k)
if bad:
    sys.exit(f"not read by the service: {', '.join(bad)}")
if not aliases:
    sys.exit("no WELL_KNOWN table found in src/config.rs")
for k, v in sorted(names.items()):
    print(f"{k}={v}")
PY
    # The binary must accept every key (it refuses unknown ones); secrets get stand-ins,
    # and values that only the cluster resolves ($(NODE_IP)) a local one.
    env_args=()
    while IFS= read -r kv; do
        kv="${kv//\$(NODE_IP)/127.0.0.1}"
        env_args+=("$kv")
    done <"$OUT/env.txt"
    env -i PATH="$PATH" "${env_args[@]}" \
        AUTH_JWT_SECRET="check-k8s-jwt-secret-0123456789abcdef0123" \
        INTERNAL_METRICS_TOKEN="check-k8s-internal-token-0123456789abcdef" \
        DATABASE_URL="postgres://u:p@db:5432/media" REDIS_URL="redis://redis:6379/0" \
        MEDIA_CLUSTERING_CONFIG_DIR="$ROOT/config" \
        "$BIN" config >"$OUT/config.txt" 2>&1 || { cat "$OUT/config.txt" >&2; die "$overlay: the service refuses its manifests' settings"; }
    log "$overlay: renders, validates (Kubernetes and CRD schemas), passes checkov, and sets only keys the service reads"
done
"$TOOLS/bin/checkov" --quiet --compact --skip-download --framework dockerfile -f Dockerfile >"$OUT/checkov.txt" 2>&1 \
    || { cat "$OUT/checkov.txt" >&2; die "Dockerfile: checkov"; }
log "Dockerfile passes checkov"
