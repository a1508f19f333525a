#!/usr/bin/env bash
# Deploys one region of the fleet to its Kubernetes cluster (issue 18): checks the
# prerequisites, builds and pushes the image, creates or rotates the Secrets from key files,
# applies the region's overlay (deploy/k8s/overlays/<region>) and waits until every edge node,
# discovery and the router answer ready on /health. See docs/deploy.md.
#
#   scripts/deploy.sh --region R --keys DIR --image REG/edgeroute:TAG [options]
#
#   --region R          a directory of deploy/k8s/overlays (toronto, montreal, vancouver)
#   --keys DIR          key files (layout below; default $EDGEROUTE_KEYS)
#   --image REF         where the cluster pulls edgeroute from (default $EDGEROUTE_IMAGE);
#                       built with scripts/build-image.sh and pushed there with skopeo
#   --skip-build        REF is already in the registry: build and push nothing
#   --triton-image REF  default $EDGEROUTE_TRITON_IMAGE or nvcr.io/nvidia/tritonserver:26.07-vllm-python-py3
#   --context NAME      the kubectl context of the region's cluster (default: the current one)
#   --timeout S         how long to wait for the rollout and /health, all told (default 600)
#   --dry-run           check the prerequisites (read-only calls), render the manifests, and
#                       print every other step without running it: nothing is built, pushed,
#                       created or applied
#
# Key files (never committed; `edgeroute token jwk`, `edgeroute bus credentials`, your CA):
#   DIR/fleet/jwks.json             JWT public keys: tenants' tokens, operators' admin tokens
#   DIR/fleet/fleet-ca.crt          the fleet CA (nodes, discovery, router, NATS certificates)
#   DIR/fleet/hf-token              Hugging Face token (only the watch sidecars mount it)
#   DIR/R/tls.crt, DIR/R/tls.key    the region's certificate: its nodes' public names and
#                                   *.edgeroute.svc, under the fleet CA
#   DIR/R/nats-gateway.crt, .key    the region's NATS gateway certificate, under the fleet CA
#   DIR/R/seal.key, DIR/R/seal.pub  the region's model-seal key pair (Ed25519, PKCS#8 PEM)
#   DIR/R/discovery-probe.jwt       inference token discovery's correctness probes carry
#   DIR/R/metrics.jwt               admin token Prometheus reads the router's /metrics with
#   DIR/R/bus/<id>.nk, <id>.user.conf   per node, and discovery.*, dns.*: bus identities;
#                                   every DIR/R/bus/*.user.conf goes into the NATS users list
#
# Exit codes: 0 deployed (or dry run done), 2 usage, 3 a prerequisite is missing, 4 the image
# could not be built or pushed, 5 kubectl refused a Secret or the manifests, 6 not ready in
# time. Test seams: KUBECTL, SKOPEO, EDGEROUTE_BUILD_IMAGE, EDGEROUTE_DEPLOY_POLL_S.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"

E_USAGE=2 E_PREREQ=3 E_BUILD=4 E_APPLY=5 E_READY=6
NS=edgeroute
KUBECTL="${KUBECTL:-kubectl}"
SKOPEO="${SKOPEO:-skopeo}"
BUILD_IMAGE="${EDGEROUTE_BUILD_IMAGE:-$ROOT/scripts/build-image.sh}"
POLL_S="${EDGEROUTE_DEPLOY_POLL_S:-5}"

REGION=""
KEYS="${EDGEROUTE_KEYS:-}"
IMAGE="${EDGEROUTE_IMAGE:-}"
TRITON_IMAGE="${EDGEROUTE_TRITON_IMAGE:-nvcr.io/nvidia/tritonserver:26.07-vllm-python-py3}"
SKIP_BUILD=0
CONTEXT=""
TIMEOUT=600
DRY_RUN=0

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
fail() { local code="$1"; shift; printf 'deploy: %s\n' "$*" >&2; exit "$code"; }
step() { printf '\n==> %s\n' "$*"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --region|--keys|--image|--triton-image|--context|--timeout)
      [ $# -ge 2 ] || fail "$E_USAGE" "$1 needs a value"
      case "$1" in
        --region) REGION="$2" ;;
        --keys) KEYS="$2" ;;
        --image) IMAGE="$2" ;;
        --triton-image) TRITON_IMAGE="$2" ;;
        --context) CONTEXT="$2" ;;
        --timeout) TIMEOUT="$2" ;;
      esac
      shift 2 ;;
    --skip-build) SKIP_BUILD=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) fail "$E_USAGE" "unknown argument \`$1\` (see --help)" ;;
  esac
done

OVERLAYS="$ROOT/deploy/k8s/overlays"
[ -n "$REGION" ] || fail "$E_USAGE" "give --region (one of: $(ls "$OVERLAYS" | tr '\n' ' '))"
[ -d "$OVERLAYS/$REGION" ] && [[ "$REGION" =~ ^[a-z0-9-]+$ ]] \
  || fail "$E_USAGE" "no overlay for region \`$REGION\` (known: $(ls "$OVERLAYS" | tr '\n' ' '))"
[ -n "$KEYS" ] || fail "$E_USAGE" "give --keys DIR (or EDGEROUTE_KEYS): the key files (see --help)"
[ -n "$IMAGE" ] || fail "$E_USAGE" "give --image REGISTRY/edgeroute:TAG (or EDGEROUTE_IMAGE): where the cluster pulls the image from"
[[ "$TIMEOUT" =~ ^[0-9]+$ ]] && [ "$TIMEOUT" -gt 0 ] || fail "$E_USAGE" "--timeout takes seconds (> 0)"

# REF is NAME:TAG or NAME@DIGEST (kustomize's images transformer takes them apart).
split_ref() {
  local ref="$1" last="${1##*/}"
  if [[ "$ref" == *@* ]]; then printf '%s\n%s\n%s\n' "${ref%@*}" digest "${ref#*@}"
  elif [[ "$last" == *:* ]]; then printf '%s\n%s\n%s\n' "${ref%:*}" newTag "${ref##*:}"
  else fail "$E_USAGE" "image \`$ref\` names no tag or digest (NAME:TAG or NAME@sha256:...)"
  fi
}
mapfile -t EDGE_REF < <(split_ref "$IMAGE")
mapfile -t TRITON_REF < <(split_ref "$TRITON_IMAGE")
[ "${#EDGE_REF[@]}" = 3 ] && [ "${#TRITON_REF[@]}" = 3 ] || exit "$E_USAGE"
[ "$SKIP_BUILD" = 1 ] || [ "${EDGE_REF[1]}" = newTag ] \
  || fail "$E_USAGE" "to build, give --image a tag (NAME:TAG), not a digest (or --skip-build)"

OVERLAY="$OVERLAYS/$REGION"
NODES=()
for d in "$OVERLAY"/nodes/*/; do NODES+=("$(basename "$d")"); done
[ "${#NODES[@]}" -gt 0 ] || fail "$E_USAGE" "$OVERLAY/nodes holds no node"

# Every kubectl call names the context, so a changed current context mid-run cannot redirect it.
K=("$KUBECTL")
[ -n "$CONTEXT" ] && K+=(--context "$CONTEXT")

# A read-only call: printed and run.
show() { printf '+ %s\n' "$*"; }
# A call that changes something: printed, and run unless --dry-run.
mutating() {
  if [ "$DRY_RUN" = 1 ]; then printf '+ (dry run: not run) %s\n' "$*"; return 1; fi
  printf '+ %s\n' "$*"
}

# --- 1. prerequisites -------------------------------------------------------------------
step "checking the prerequisites of region $REGION (nodes: ${NODES[*]})"
command -v "$KUBECTL" >/dev/null || fail "$E_PREREQ" "kubectl is missing: install it (https://kubernetes.io/docs/tasks/tools/)"

if [ -n "$CONTEXT" ]; then
  show "$KUBECTL config get-contexts -o name"
  "$KUBECTL" config get-contexts -o name 2>/dev/null | grep -qxF -- "$CONTEXT" \
    || fail "$E_PREREQ" "kubectl has no context \`$CONTEXT\`: kubectl config get-contexts lists them"
else
  show "$KUBECTL config current-context"
  CONTEXT_SHOWN="$("$KUBECTL" config current-context 2>/dev/null)" && [ -n "$CONTEXT_SHOWN" ] \
    || fail "$E_PREREQ" "kubectl has no current context: kubectl config use-context <the $REGION cluster>, or pass --context"
  echo "    context: $CONTEXT_SHOWN"
fi

show "${K[*]} get runtimeclass kata -o name"
if ! err="$("${K[@]}" get runtimeclass kata -o name 2>&1)"; then
  fail "$E_PREREQ" "RuntimeClass \`kata\` is missing in the cluster (the gateways run in Kata VMs): install Kata Containers (kata-deploy creates it). kubectl said: $err"
fi

GPU_QUERY='{range .items[*]}{.metadata.name}{" "}{.status.allocatable.nvidia\.com/gpu}{"\n"}{end}'
show "${K[*]} get nodes -o jsonpath=$GPU_QUERY"
gpu_lines="$("${K[@]}" get nodes -o "jsonpath=$GPU_QUERY" 2>&1)" \
  || fail "$E_PREREQ" "could not list the cluster's machines: $gpu_lines"
gpus=0
while read -r _machine count; do
  [[ "${count:-}" =~ ^[0-9]+$ ]] && gpus=$((gpus + count))
done <<<"$gpu_lines"
echo "    nvidia.com/gpu allocatable: $gpus (Triton pods to place: ${#NODES[@]})"
[ "$gpus" -ge "${#NODES[@]}" ] \
  || fail "$E_PREREQ" "the cluster offers $gpus nvidia.com/gpu, the ${#NODES[@]} Triton pods of $REGION need ${#NODES[@]}: install the NVIDIA device plugin (or the GPU Operator) on the GPU machines, or add GPU machines"

show "${K[*]} get crd servicemonitors.monitoring.coreos.com prometheusrules.monitoring.coreos.com -o name"
if ! err="$("${K[@]}" get crd servicemonitors.monitoring.coreos.com prometheusrules.monitoring.coreos.com -o name 2>&1)"; then
  fail "$E_PREREQ" "the Prometheus Operator's CRDs (ServiceMonitor, PrometheusRule) are missing: install the Prometheus Operator (e.g. kube-prometheus-stack). kubectl said: $err"
fi

# Every key file, and how to make the missing ones.
missing=()
need() { [ -s "$KEYS/$1" ] || missing+=("$KEYS/$1: $2"); }
need fleet/jwks.json "the JWT public keys (edgeroute token jwk --public-key PEM --kid KID, as a {\"keys\": [...]} JWKS)"
need fleet/fleet-ca.crt "the fleet CA certificate (PEM)"
need fleet/hf-token "a Hugging Face access token (read scope)"
need "$REGION/tls.crt" "the region's certificate (PEM) for its nodes' names and *.edgeroute.svc, signed by the fleet CA"
need "$REGION/tls.key" "its private key"
need "$REGION/nats-gateway.crt" "the region's NATS gateway certificate, signed by the fleet CA"
need "$REGION/nats-gateway.key" "its private key"
need "$REGION/seal.key" "the model-seal private key (openssl genpkey -algorithm ed25519 -out seal.key)"
need "$REGION/seal.pub" "its public key (openssl pkey -in seal.key -pubout -out seal.pub)"
need "$REGION/discovery-probe.jwt" "an inference token for discovery's correctness probes (edgeroute token mint --sub edgeroute-discovery --scope inference ...)"
need "$REGION/metrics.jwt" "an admin token for Prometheus to read the router's /metrics (edgeroute token mint --scope admin --region $REGION ...)"
for id in "${NODES[@]}"; do
  need "$REGION/bus/$id.nk" "node $id's bus seed (edgeroute bus credentials --node $id --region $REGION --out $KEYS/$REGION/bus)"
  need "$REGION/bus/$id.user.conf" "node $id's NATS user entry (written beside its seed)"
done
for name in discovery dns; do
  need "$REGION/bus/$name.nk" "the $name replicas' bus seed (edgeroute bus credentials --discovery $name --out $KEYS/$REGION/bus)"
  need "$REGION/bus/$name.user.conf" "the $name replicas' NATS user entry (written beside its seed)"
done
if [ "${#missing[@]}" -gt 0 ]; then
  printf 'deploy: missing key file(s):\n' >&2
  printf '  %s\n' "${missing[@]}" >&2
  exit "$E_PREREQ"
fi
echo "    key files: complete in $KEYS"

if [ "$SKIP_BUILD" = 0 ]; then
  [ -x "$BUILD_IMAGE" ] || fail "$E_PREREQ" "the image build script $BUILD_IMAGE is missing"
  command -v "$SKOPEO" >/dev/null || fail "$E_PREREQ" "skopeo is missing (it pushes the built image): apt-get install skopeo, or build and push yourself and pass --skip-build"
fi

# --- 2. image ---------------------------------------------------------------------------

if [ "$SKIP_BUILD" = 1 ]; then
  step "image: $IMAGE (--skip-build: already in the registry)"
else
  step "building and pushing $IMAGE"
  OCI="$ROOT/target/image"
  if mutating "$BUILD_IMAGE --tag ${EDGE_REF[2]} --out $OCI"; then
    "$BUILD_IMAGE" --tag "${EDGE_REF[2]}" --out "$OCI" || fail "$E_BUILD" "the image build failed ($BUILD_IMAGE)"
  fi
  if mutating "$SKOPEO copy oci:$OCI:${EDGE_REF[2]} docker://$IMAGE"; then
    "$SKOPEO" copy "oci:$OCI:${EDGE_REF[2]}" "docker://$IMAGE" \
      || fail "$E_BUILD" "pushing to $IMAGE failed (skopeo login to the registry?)"
  fi
fi

# --- 3. render --------------------------------------------------------------------------
WORK="$(mktemp -d "${TMPDIR:-/tmp}/edgeroute-deploy.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
cat >"$WORK/kustomization.yaml" <<EOF
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - $(realpath --relative-to="$WORK" "$OVERLAY")
images:
  - name: edgeroute
    newName: ${EDGE_REF[0]}
    ${EDGE_REF[1]}: "${EDGE_REF[2]}"
  - name: triton
    newName: ${TRITON_REF[0]}
    ${TRITON_REF[1]}: "${TRITON_REF[2]}"
EOF
step "rendering deploy/k8s/overlays/$REGION (edgeroute: $IMAGE, triton: $TRITON_IMAGE)"
show "$KUBECTL kustomize deploy/k8s/overlays/$REGION (with those images) > $WORK/manifests.yaml"
"$KUBECTL" kustomize "$WORK" >"$WORK/manifests.yaml" || fail "$E_APPLY" "kustomize could not render $OVERLAY"
echo "    $(grep -c '^kind:' "$WORK/manifests.yaml") objects"

# --- 4. namespace and secrets -----------------------------------------------------------
step "namespace $NS and secrets (created, or replaced when a key file changed)"
# The overlay's own Namespace object (kustomize puts it first), so the full apply leaves it be.
awk '/^---$/ { exit } { print }' "$WORK/manifests.yaml" >"$WORK/namespace.yaml"
grep -qx "kind: Namespace" "$WORK/namespace.yaml" || fail "$E_APPLY" "the rendered manifests do not begin with the Namespace"
if mutating "${K[*]} apply -f namespace.yaml"; then
  "${K[@]}" apply -f "$WORK/namespace.yaml" || fail "$E_APPLY" "kubectl refused the namespace"
fi
# Each Secret is printed by `create --dry-run=client` (which checks its files: a TLS pair must
# load) and all are applied together: the same files leave them unchanged, a new file replaces
# its Secret. Only paths are shown, never contents.
secret() {
  local name="$1"; shift
  show "${K[*]} -n $NS create secret $* --dry-run=client -o yaml >> secrets.yaml"
  { echo "---"; "${K[@]}" -n "$NS" create secret "$@" --dry-run=client -o yaml; } >>"$WORK/secrets.yaml" \
    || fail "$E_APPLY" "kubectl could not make Secret $name from its key files"
}
R="$KEYS/$REGION"
secret edgeroute-jwt generic edgeroute-jwt --from-file=jwks.json="$KEYS/fleet/jwks.json"
secret edgeroute-fleet-ca generic edgeroute-fleet-ca --from-file=ca.crt="$KEYS/fleet/fleet-ca.crt"
secret edgeroute-hf generic edgeroute-hf --from-file=token="$KEYS/fleet/hf-token"
secret edgeroute-tls tls edgeroute-tls --cert="$R/tls.crt" --key="$R/tls.key"
secret nats-gateway-tls tls nats-gateway-tls --cert="$R/nats-gateway.crt" --key="$R/nats-gateway.key"
secret edgeroute-seal generic edgeroute-seal --from-file=seal.key="$R/seal.key" --from-file=seal.pub="$R/seal.pub"
secret edgeroute-discovery-token generic edgeroute-discovery-token --from-file=token="$R/discovery-probe.jwt"
secret edgeroute-metrics-token generic edgeroute-metrics-token --from-file=token="$R/metrics.jwt"
bus_files=()
for id in "${NODES[@]}" discovery dns; do bus_files+=("--from-file=$id.nk=$R/bus/$id.nk"); done
secret edgeroute-bus generic edgeroute-bus "${bus_files[@]}"
{ echo "users: ["; cat "$R"/bus/*.user.conf; echo "]"; } >"$WORK/users.conf"
secret nats-users generic nats-users --from-file=users.conf="$WORK/users.conf"
if mutating "${K[*]} apply -f secrets.yaml"; then
  applied="$("${K[@]}" apply -f "$WORK/secrets.yaml")" || fail "$E_APPLY" "kubectl refused the Secrets"
  printf '%s\n' "$applied"
  # Only the JWKS is re-read while running; pods read the other keys at start.
  rotated="$(printf '%s\n' "$applied" | sed -n 's#^secret/\(.*\) configured$#\1#p' | { grep -vx edgeroute-jwt || true; } | tr '\n' ' ')"
  [ -z "$rotated" ] || echo "    rotated: $rotated— the pods mounting them load them at start: restart them one node at a time (docs/deploy.md)"
fi

# --- 5. apply ---------------------------------------------------------------------------
step "applying the $REGION overlay"
if mutating "${K[*]} apply -f $WORK/manifests.yaml"; then
  "${K[@]}" apply -f "$WORK/manifests.yaml" || fail "$E_APPLY" "kubectl refused the manifests of $REGION"
fi

# --- 6. ready ---------------------------------------------------------------------------
DEADLINE=$((SECONDS + TIMEOUT))
left() { local l=$((DEADLINE - SECONDS)); [ "$l" -gt 0 ] && echo "$l" || echo 1; }
WORKLOADS=(statefulset/nats)
for id in "${NODES[@]}"; do WORKLOADS+=("statefulset/triton-$id" "deployment/gateway-$id"); done
WORKLOADS+=(deployment/discovery deployment/router deployment/dns)

step "waiting for the rollout (at most ${TIMEOUT}s in all)"
for w in "${WORKLOADS[@]}"; do
  if mutating "${K[*]} -n $NS rollout status $w --timeout=<left>s"; then
    "${K[@]}" -n "$NS" rollout status "$w" --timeout="$(left)s" \
      || fail "$E_READY" "$w is not ready after ${TIMEOUT}s: kubectl -n $NS describe $w; kubectl -n $NS logs $w --all-containers"
  fi
done

# Each edge node's own report (through the API server's service proxy): ready, and the node
# it claims to be. Discovery and the router: ready (discovery is `degraded` without its bus).
step "checking /health of every node, discovery and the router"
CHECKS=()
for id in "${NODES[@]}"; do CHECKS+=("node $id|https:gateway-$id:8443|\"ready\":true|\"node_id\":\"$id\""); done
CHECKS+=("discovery|https:discovery:7070|\"status\":\"ready\"|" "router|https:router:8090|\"status\":\"ready\"|")
if [ "$DRY_RUN" = 1 ]; then
  for c in "${CHECKS[@]}"; do
    IFS='|' read -r what svc _ _ <<<"$c"
    printf '+ (dry run: not run) %s get --raw /api/v1/namespaces/%s/services/%s/proxy/health  # %s\n' "${K[*]}" "$NS" "$svc" "$what"
  done
  step "dry run done: nothing was built, pushed, created or applied"
  exit 0
fi
while :; do
  waiting=()
  for c in "${CHECKS[@]}"; do
    IFS='|' read -r what svc want1 want2 <<<"$c"
    body="$("${K[@]}" get --raw "/api/v1/namespaces/$NS/services/$svc/proxy/health" 2>&1)" || body=""
    if [[ "$body" == *"$want1"* ]] && [[ -z "$want2" || "$body" == *"$want2"* ]]; then
      :
    else
      waiting+=("$what")
    fi
  done
  if [ "${#waiting[@]}" = 0 ]; then break; fi
  if [ "$SECONDS" -ge "$DEADLINE" ]; then
    fail "$E_READY" "not ready on /health after ${TIMEOUT}s: ${waiting[*]} (kubectl -n $NS logs deployment/gateway-<id>; kubectl -n $NS get --raw /api/v1/namespaces/$NS/services/https:gateway-<id>:8443/proxy/health)"
  fi
  echo "    waiting for: ${waiting[*]}"
  sleep "$POLL_S"
done
echo "    ready: ${NODES[*]}, discovery, router"
step "region $REGION deployed (${#NODES[@]} nodes)"
