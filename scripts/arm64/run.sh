#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Run the sysroot's aarch64 python3.11 under qemu user emulation, with the aarch64 site and the repo
# on its path:  scripts/arm64/run.sh -m edge.cli check -c examples/home.yaml
#
# No binfmt_misc: qemu runs the interpreter directly, so threads, fork and asyncio work, but an
# emulated program cannot exec another arm64 executable. Build the cache first (scripts/arm64/test.sh
# or build-sysroot.sh + fetch-wheels.sh). Timing under emulation says nothing about a real Pi.
set -euo pipefail
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"

QEMU="$(find_tool qemu-aarch64-static qemu-user-static)"
PY="$SYSROOT/usr/bin/python3.11"
[ -x "$PY" ] || die "no sysroot at $SYSROOT: run scripts/arm64/build-sysroot.sh"
[ -f "$SITE/.edge-arm64-site" ] || die "no aarch64 site at $SITE: run scripts/arm64/fetch-wheels.sh"

# The Pi-style cpuinfo follows ARM64_CPU (written atomically, only when it changes).
cpuinfo="$(pi_cpuinfo "$ARM64_CPU")"
if [ "$(cat "$SYSROOT/proc/cpuinfo" 2>/dev/null)" != "$cpuinfo" ]; then
  printf '%s\n' "$cpuinfo" >"$SYSROOT/proc/cpuinfo.$$"
  mv -f "$SYSROOT/proc/cpuinfo.$$" "$SYSROOT/proc/cpuinfo"
fi

# Nothing of the host's Python environment may leak into the arm64 interpreter.
unset PYTHONHOME PYTHONSTARTUP PYTHONEXECUTABLE VIRTUAL_ENV
export PYTHONPATH="$SITE:$REPO${ARM64_PYTHONPATH:+:$ARM64_PYTHONPATH}"
export PYTHONNOUSERSITE=1 PYTHONDONTWRITEBYTECODE=1
exec "$QEMU" -cpu "$ARM64_CPU" -L "$SYSROOT" "$PY" "$@"
