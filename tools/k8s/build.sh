#!/usr/bin/env bash
# Build the real kube-apiserver and etcd from their published Go modules (tools/k8s/apiserver and
# tools/k8s/etcd pin the versions) into a cache outside the clone, then link them into .tools/bin.
#
#   tools/k8s/build.sh            # `make k8s-tools`; does nothing but link when both binaries are cached
#   FORCE=1 tools/k8s/build.sh    # rebuild even when they are cached
#
# Cache: ${RECSERVE_TOOLS_CACHE:-$HOME/.cache/recserve-tools}/k8s-<k8s version>-etcd-<etcd version>/
# Needs Go >= the `go` line of the two go.mod files and the Go module proxy; no cgo.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
DEST="$ROOT/.tools/bin"

K8S_VERSION="$(awk '$1 == "require" && $2 == "k8s.io/kubernetes" {print $3}' "$HERE/apiserver/go.mod")"
ETCD_VERSION="$(awk '$1 == "require" && $2 == "go.etcd.io/etcd/server/v3" {print $3}' "$HERE/etcd/go.mod")"
[[ -n "$K8S_VERSION" && -n "$ETCD_VERSION" ]] || { echo "build.sh: cannot read the pinned versions from the go.mod files" >&2; exit 1; }

CACHE="${RECSERVE_TOOLS_CACHE:-$HOME/.cache/recserve-tools}/k8s-${K8S_VERSION}-etcd-${ETCD_VERSION}"

link() {
  mkdir -p "$DEST"
  ln -sfn "$CACHE/kube-apiserver" "$DEST/kube-apiserver"
  ln -sfn "$CACHE/etcd" "$DEST/etcd"
  echo "linked: $DEST/kube-apiserver -> $CACHE/kube-apiserver"
  echo "linked: $DEST/etcd -> $CACHE/etcd"
}

if [[ -z "${FORCE:-}" && -x "$CACHE/kube-apiserver" && -x "$CACHE/etcd" ]]; then
  echo "cached: kube-apiserver ${K8S_VERSION}, etcd ${ETCD_VERSION} in $CACHE"
  link
  exit 0
fi

command -v go >/dev/null 2>&1 || { echo "build.sh: go not found on PATH" >&2; exit 1; }
echo "building kube-apiserver ${K8S_VERSION} and etcd ${ETCD_VERSION} with $(go version) into $CACHE"
mkdir -p "$CACHE"

export CGO_ENABLED=0
export GOFLAGS="${GOFLAGS:+$GOFLAGS }-mod=readonly -buildvcs=false"

# /usr/bin/time (GNU) reports the peak memory of the largest process of a step, where it is installed
TIME=()
if [[ -x /usr/bin/time ]] && /usr/bin/time -f '' true 2>/dev/null; then
  TIME=(/usr/bin/time -f '  (%e s wall, peak RSS of one process %M KiB)')
fi

step() {  # step NAME DIR CMD...: run CMD in DIR and print how long it took
  local name="$1" dir="$2"; shift 2
  local t0 t1
  t0="$(date +%s.%N)"
  (cd "$dir" && "${TIME[@]}" "$@")
  t1="$(date +%s.%N)"
  awk -v n="$name" -v a="$t0" -v b="$t1" 'BEGIN {printf "%s: %.1f s\n", n, b - a}'
}

step "module download (etcd)" "$HERE/etcd" go mod download
step "module download (kube-apiserver)" "$HERE/apiserver" go mod download

# the version a release build stamps in (otherwise /version says v0.0.0-master, and clients such as
# helm that compare the server's version against a chart's kubeVersion would refuse it)
minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
VPKG="k8s.io/component-base/version"
K8S_LDFLAGS="-s -w -X ${VPKG}.gitVersion=${K8S_VERSION} -X ${VPKG}.gitMajor=1 -X ${VPKG}.gitMinor=${minor} -X ${VPKG}.gitTreeState=clean"

# build to a temporary name and rename, so that an interrupted build never leaves a binary that looks cached
step "build etcd" "$HERE/etcd" \
  go build -trimpath -ldflags="-s -w" -o "$CACHE/etcd.tmp" ./cmd/etcd
mv -f "$CACHE/etcd.tmp" "$CACHE/etcd"
step "build kube-apiserver" "$HERE/apiserver" \
  go build -trimpath -ldflags="$K8S_LDFLAGS" -o "$CACHE/kube-apiserver.tmp" k8s.io/kubernetes/cmd/kube-apiserver
mv -f "$CACHE/kube-apiserver.tmp" "$CACHE/kube-apiserver"

ls -l "$CACHE"
"$CACHE/etcd" --version | head -1
"$CACHE/kube-apiserver" --version
link
