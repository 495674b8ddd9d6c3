#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Download aarch64 wheels of the daemon's dependencies from PyPI and install them into $ARM64_CACHE/site.
#
# Versions are pinned to those installed in the host's $PYTHON, so the x86 and the arm64 runs use the
# same onnxruntime and numpy. pip does not widen the manylinux tag for a foreign --platform by itself:
# every tag up to glibc 2.36 (Debian 12) is listed. Idempotent; a no-op when the site matches.
set -euo pipefail
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"

PACKAGES=(onnxruntime numpy pydantic pyyaml prometheus-client)
if [ -n "${ARM64_REQUIREMENTS:-}" ]; then
  read -r -a reqs <<<"$ARM64_REQUIREMENTS"
else
  mapfile -t reqs < <("$PYTHON" - "${PACKAGES[@]}" <<'PY'
import importlib.metadata as md
import sys

for name in sys.argv[1:]:
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        print(name)
PY
  )
fi
[ "${#reqs[@]}" -gt 0 ] || die "no requirements"

STAMP="$SITE/.edge-arm64-site"
WANT="v1 cp311 aarch64 ${reqs[*]}"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  log "aarch64 site cached: $SITE (${reqs[*]})"
  exit 0
fi

mkdir -p "$ARM64_CACHE" "$WHEELS"
exec 9>"$ARM64_CACHE/.site.lock"
flock 9
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  log "aarch64 site built meanwhile by another run: $SITE"
  exit 0
fi

start=$(date +%s)
target=(--only-binary=:all: --python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none
  --platform manylinux2014_aarch64)
for minor in $(seq 17 36); do target+=(--platform "manylinux_2_${minor}_aarch64"); done
target+=(--platform any)

log "pip download (aarch64, cp311): ${reqs[*]}"
"$PYTHON" -m pip download -q --disable-pip-version-check -d "$WHEELS" "${target[@]}" "${reqs[@]}" \
  2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)

tmp="$SITE.tmp"
rm -rf "$tmp"
"$PYTHON" -m pip install -q --disable-pip-version-check --no-warn-script-location --no-index \
  --find-links "$WHEELS" --target "$tmp" "${target[@]}" "${reqs[@]}" \
  2> >(grep -v -e 'is ignored: it is neither a file nor a directory' -e "Running pip as the 'root' user" >&2)
# Bytecode is architecture independent: compile on the host, not under emulation at every start.
if "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
  "$PYTHON" -m compileall -q -j0 -s "$tmp" -p "$SITE" "$tmp" >/dev/null || log "some files did not compile (ignored)"
fi
rm -rf "$SITE"
mv "$tmp" "$SITE"
printf '%s\n' "$WANT" >"$STAMP"
log "aarch64 site ready: $SITE ($(du -sh "$SITE" | cut -f1), $(($(date +%s) - start)) s)"
