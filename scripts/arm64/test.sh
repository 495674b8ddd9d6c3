#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# make test-arm64: build or reuse the cache ($ARM64_CACHE), then run the checks under emulation.
# Arguments go to check.py (e.g. --only zoo, --require-zoo, --report FILE). Needs the host's $PYTHON
# with the dev and train extras (onnx, paho-mqtt) and Mosquitto for the daemon check.
set -euo pipefail
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"

start=$(date +%s)
"$REPO/scripts/arm64/build-sysroot.sh"
"$REPO/scripts/arm64/fetch-wheels.sh"
log "cache ready in $(($(date +%s) - start)) s: $ARM64_CACHE"
exec "$PYTHON" "$REPO/scripts/arm64/check.py" "$@"
