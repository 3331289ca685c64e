#!/usr/bin/env bash
# Put nghttp2's `h2load` (a C HTTP/2 load generator) where the benchmarks find it (.tools/bin/h2load),
# unless one is on PATH. The Triton benchmark drives Triton's gRPC endpoint with it: a Python gRPC
# client costs about 50 us of CPU per call, which on a small machine is CPU the server does not get.
#
# Only package registries are reachable from the build machines, so h2load comes from Debian's
# nghttp2-client package and the libraries it needs beyond a base system, unpacked (no root, no
# install) under .tools/h2load and started through a wrapper that sets LD_LIBRARY_PATH.
#
#   scripts/fetch_h2load.sh            # idempotent; `make tools` runs it
#   FORCE=1 scripts/fetch_h2load.sh    # fetch even when h2load is on PATH or already in .tools/bin
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/.tools"
PACKAGES=(nghttp2-client libnghttp2-14 libev4 libjansson4 libjemalloc2)

if [[ -z "${FORCE:-}" ]]; then
  if command -v h2load >/dev/null 2>&1; then
    echo "h2load on PATH: $(command -v h2load)"
    exit 0
  fi
  if [[ -x "$DEST/bin/h2load" ]] && "$DEST/bin/h2load" --version >/dev/null 2>&1; then
    echo "h2load in .tools/bin: $("$DEST/bin/h2load" --version | head -1)"
    exit 0
  fi
fi

if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg >/dev/null 2>&1; then
  echo "fetch_h2load.sh: needs apt-get and dpkg (Debian/Ubuntu); elsewhere install nghttp2's h2load and put it on PATH" >&2
  exit 1
fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
chmod 755 "$TMP"  # apt's unprivileged downloader writes here

echo "fetching h2load from Debian (${PACKAGES[*]})"
(cd "$TMP" && apt-get download -q "${PACKAGES[@]}" 2>&1 | grep -v '^W: Download is performed unsandboxed' || true)
for pkg in "${PACKAGES[@]}"; do
  compgen -G "$TMP/${pkg}_*.deb" >/dev/null || {
    echo "fetch_h2load.sh: apt-get could not download $pkg (run 'apt-get update' or install nghttp2-client)" >&2
    exit 1
  }
done

rm -rf "$DEST/h2load" && mkdir -p "$DEST/h2load" "$DEST/bin"
for deb in "$TMP"/*.deb; do dpkg-deb -x "$deb" "$DEST/h2load"; done
LIBS="$(dirname "$(find "$DEST/h2load" -name 'libnghttp2.so.14' | head -1)")"
LIBS="${LIBS#"$DEST/"}"  # relative to .tools: the wrapper works wherever the checkout is copied
cat > "$DEST/bin/.h2load.part" <<WRAPPER
#!/usr/bin/env bash
# written by scripts/fetch_h2load.sh: h2load from the unpacked Debian packages under .tools/h2load
TOOLS="\$(cd "\$(dirname "\${BASH_SOURCE[0]}")/.." && pwd)"
LD_LIBRARY_PATH="\$TOOLS/$LIBS\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "\$TOOLS/h2load/usr/bin/h2load" "\$@"
WRAPPER
chmod 755 "$DEST/bin/.h2load.part"
mv "$DEST/bin/.h2load.part" "$DEST/bin/h2load"

"$DEST/bin/h2load" --version | head -1
echo "h2load installed: $DEST/bin/h2load"
