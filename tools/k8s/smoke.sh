#!/usr/bin/env bash
# Smoke test of the binaries `make k8s-tools` puts in .tools/bin: start etcd and kube-apiserver on
# loopback (free ports, a temp dir), check authn, RBAC, PodSecurity and the ModelRollout CRD with
# curl, then stop both. Leaves nothing running. Needs curl, openssl and .venv (PyYAML).
#
#   tools/k8s/smoke.sh                   # exit 0 when every check passed
#   KEEP=1 tools/k8s/smoke.sh            # keep the temp dir (logs, certs) for a look afterwards
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
BIN="$ROOT/.tools/bin"
PY="$ROOT/.venv/bin/python"
[[ -x "$PY" ]] || PY=python3
CRD="$ROOT/helm/recserve/crds/modelrollouts.recserve.io.yaml"

for b in etcd kube-apiserver; do
  [[ -x "$BIN/$b" ]] || { echo "smoke.sh: $BIN/$b missing: run \`make k8s-tools\` first" >&2; exit 1; }
done

T="$(mktemp -d -t recserve-k8s.XXXXXX)"
ETCD_PID=""; API_PID=""
stop() {  # stop PID: SIGTERM, then SIGKILL after 10 s
  local pid="$1"
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  stop "$API_PID"; stop "$ETCD_PID"
  if [[ -n "${KEEP:-}" ]]; then echo "kept: $T"; else rm -rf "$T"; fi
}
trap cleanup EXIT

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN {printf "%.1f", b - a}'; }

FAILED=0
check() {  # check NAME EXPECTED ACTUAL
  if [[ "$2" == "$3" ]]; then echo "PASS $1: $3"; else echo "FAIL $1: expected $2, got $3"; FAILED=$((FAILED + 1)); fi
}

# ---- etcd
ETCD_CLIENT="$(free_port)"; ETCD_PEER="$(free_port)"
ETCD_URL="http://127.0.0.1:$ETCD_CLIENT"
t0="$(now)"
"$BIN/etcd" --name=smoke --data-dir="$T/etcd" \
  --listen-client-urls="$ETCD_URL" --advertise-client-urls="$ETCD_URL" \
  --listen-peer-urls="http://127.0.0.1:$ETCD_PEER" --initial-advertise-peer-urls="http://127.0.0.1:$ETCD_PEER" \
  --initial-cluster="smoke=http://127.0.0.1:$ETCD_PEER" --log-level=warn >"$T/etcd.log" 2>&1 &
ETCD_PID=$!
for _ in $(seq 300); do
  curl -fsS "$ETCD_URL/health" 2>/dev/null | grep -q '"health":"true"' && break
  kill -0 "$ETCD_PID" 2>/dev/null || { echo "etcd exited:"; tail -20 "$T/etcd.log"; exit 1; }
  sleep 0.1
done
echo "etcd $("$BIN/etcd" --version | head -1 | awk '{print $3}') healthy on $ETCD_URL after $(since "$t0") s"

# ---- kube-apiserver
openssl genrsa -out "$T/sa.key" 2048 2>/dev/null
openssl rsa -in "$T/sa.key" -pubout -out "$T/sa.pub" 2>/dev/null
TOKEN="$("$PY" -c 'import secrets; print(secrets.token_hex(16))')"
echo "$TOKEN,admin,admin-uid,\"system:masters\"" >"$T/tokens.csv"
API_PORT="$(free_port)"
API="https://127.0.0.1:$API_PORT"
AUTH=(-H "Authorization: Bearer $TOKEN")

start_apiserver() {  # start_apiserver [extra flags...]
  t0="$(now)"
  "$BIN/kube-apiserver" \
    --etcd-servers="$ETCD_URL" \
    --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$API_PORT" \
    --endpoint-reconciler-type=none \
    --cert-dir="$T/certs" \
    --service-account-issuer=https://kubernetes.default.svc \
    --service-account-key-file="$T/sa.pub" --service-account-signing-key-file="$T/sa.key" \
    --token-auth-file="$T/tokens.csv" \
    --authorization-mode=RBAC \
    --enable-admission-plugins=PodSecurity \
    --service-cluster-ip-range=10.96.0.0/24 \
    "$@" >"$T/apiserver.log" 2>&1 &
  API_PID=$!
  local code=""
  for _ in $(seq 1200); do
    code="$(curl -ksS -o /dev/null -w '%{http_code}' "${AUTH[@]}" "$API/readyz" 2>/dev/null || true)"
    [[ "$code" == 200 ]] && break
    kill -0 "$API_PID" 2>/dev/null || { echo "kube-apiserver exited:"; tail -30 "$T/apiserver.log"; exit 1; }
    sleep 0.1
  done
  [[ "$code" == 200 ]] || { echo "kube-apiserver not ready after 120 s:"; tail -30 "$T/apiserver.log"; exit 1; }
  echo "kube-apiserver ready on $API after $(since "$t0") s ($*)"
}
code() { curl -ksS -o "$T/body.json" -w '%{http_code}' "$@"; }
jq_py() { "$PY" -c "import json,sys; d=json.load(open('$T/body.json')); print($1)"; }

start_apiserver --anonymous-auth=false
check "GET /version (token)" 200 "$(code "${AUTH[@]}" "$API/version")"
echo "     gitVersion=$(jq_py "d['gitVersion']")"
check "GET /api/v1/namespaces (token)" 200 "$(code "${AUTH[@]}" "$API/api/v1/namespaces")"
check "GET /api/v1/namespaces (no token, --anonymous-auth=false)" 401 "$(code "$API/api/v1/namespaces")"
check "GET /api/v1/namespaces (wrong token)" 401 "$(code -H 'Authorization: Bearer nope' "$API/api/v1/namespaces")"

# PodSecurity: a namespace that enforces `restricted` refuses a pod that does not meet it
"$PY" - "$T" <<'EOF'
import json, sys
t = sys.argv[1]
json.dump({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "psa", "labels": {
    "pod-security.kubernetes.io/enforce": "restricted"}}}, open(f"{t}/ns.json", "w"))
json.dump({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default"}}, open(f"{t}/sa.json", "w"))
# (a privileged container would be refused before admission: --allow-privileged is false by default)
json.dump({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "plain"}, "spec": {
    "containers": [{"name": "c", "image": "busybox"}]}}, open(f"{t}/pod.json", "w"))
json.dump({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "restricted"}, "spec": {
    "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
    "containers": [{"name": "c", "image": "busybox", "securityContext": {
        "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}}]}},
    open(f"{t}/pod-ok.json", "w"))
EOF
JSON=(-H "Content-Type: application/json")
check "POST namespace psa (enforce=restricted)" 201 "$(code "${AUTH[@]}" "${JSON[@]}" -d @"$T/ns.json" "$API/api/v1/namespaces")"
# no kube-controller-manager here, so nothing creates the namespace's default ServiceAccount
check "POST serviceaccount psa/default" 201 "$(code "${AUTH[@]}" "${JSON[@]}" -d @"$T/sa.json" "$API/api/v1/namespaces/psa/serviceaccounts")"
check "POST pod without securityContext in psa (PodSecurity refuses)" 403 "$(code "${AUTH[@]}" "${JSON[@]}" -d @"$T/pod.json" "$API/api/v1/namespaces/psa/pods")"
echo "     message: $(jq_py "d.get('message','')[:200]")"
check "POST restricted-compliant pod in psa" 201 "$(code "${AUTH[@]}" "${JSON[@]}" -d @"$T/pod-ok.json" "$API/api/v1/namespaces/psa/pods")"

# ---- the ModelRollout CRD
"$PY" -c 'import json,sys,yaml; json.dump(yaml.safe_load(open(sys.argv[1])), open(sys.argv[2], "w"))' "$CRD" "$T/crd.json"
CRD_URL="$API/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
check "POST CRD modelrollouts.recserve.io" 201 "$(code "${AUTH[@]}" "${JSON[@]}" -d @"$T/crd.json" "$CRD_URL")"
t0="$(now)"; est=""
for _ in $(seq 300); do
  code "${AUTH[@]}" "$CRD_URL/modelrollouts.recserve.io" >/dev/null
  est="$(jq_py "next((c['status'] for c in d.get('status',{}).get('conditions',[]) if c['type']=='Established'), '')")"
  [[ "$est" == True ]] && break
  sleep 0.1
done
check "CRD Established (after $(since "$t0") s)" True "$est"

"$PY" - "$T" <<'EOF'
import json, sys
t = sys.argv[1]
report = {"gate": {"passed": True, "checks": [{"name": "recall@10", "value": 0.41, "min": 0.4}]},
          "sha256": "ab" * 32, "arbitrary": {"nested": {"deeper": {"list": [1, "two", {"three": 3.5}],
                                                                     "null": None, "bool": False}}}}
json.dump(report, open(f"{t}/report.json", "w"))
json.dump({"apiVersion": "recserve.io/v1alpha1", "kind": "ModelRollout", "metadata": {"name": "smoke"},
           "spec": {"model": "ranker", "stableVersion": "1", "candidateVersion": "2",
                    "steps": [{"weight": 10, "pauseSeconds": 5}],
                    "triton": {"grpcUrl": "triton:8001", "metricsUrl": "http://triton:8002/metrics"},
                    "router": {}, "compressionReport": report}}, open(f"{t}/mro.json", "w"))
EOF
MRO_URL="$API/apis/recserve.io/v1alpha1/namespaces/default/modelrollouts"
c=""
for _ in $(seq 100); do  # the new group's endpoint can lag Established by a moment
  c="$(code "${AUTH[@]}" "${JSON[@]}" -d @"$T/mro.json" "$MRO_URL")"
  [[ "$c" == 404 ]] || break
  sleep 0.1
done
check "POST ModelRollout default/smoke" 201 "$c"
check "GET ModelRollout default/smoke" 200 "$(code "${AUTH[@]}" "$MRO_URL/smoke")"
check "spec.compressionReport kept whole (not pruned)" True \
  "$(jq_py "d['spec']['compressionReport'] == json.load(open('$T/report.json'))")"
# and a field the schema does not know is pruned, as it should be
"$PY" -c 'import json,sys; d=json.load(open(sys.argv[1])); d["metadata"]["name"]="smoke2"; d["spec"]["notInSchema"]=1; json.dump(d, open(sys.argv[1], "w"))' "$T/mro.json"
check "POST ModelRollout default/smoke2 (unknown spec field)" 201 "$(code "${AUTH[@]}" "${JSON[@]}" -d @"$T/mro.json" "$MRO_URL")"
check "unknown spec field pruned" False "$(jq_py "'notInSchema' in d['spec']")"

# ---- default anonymous auth: unauthenticated requests become system:anonymous, which RBAC forbids
stop "$API_PID"; API_PID=""
start_apiserver
check "GET /api/v1/namespaces (no token, anonymous auth on by default)" 403 "$(code "$API/api/v1/namespaces")"
check "GET /readyz (no token, anonymous auth on by default)" 200 "$(code "$API/readyz")"
check "GET ModelRollout default/smoke after restart (from etcd)" 200 "$(code "${AUTH[@]}" "$MRO_URL/smoke")"

echo "---"
if [[ "$FAILED" -eq 0 ]]; then echo "smoke: all checks passed"; else echo "smoke: $FAILED check(s) failed"; exit 1; fi
