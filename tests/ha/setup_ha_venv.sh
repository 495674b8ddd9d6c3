#!/usr/bin/env bash
# Create a separate virtual environment with a real Home Assistant Core for tests/test_ha_real.py.
#
#   tests/ha/setup_ha_venv.sh [VENV_DIR]        (default: .cache/ha-venv)
#   EDGE_INFER_HA_VENV=.cache/ha-venv pytest tests/test_ha_real.py
#
# Home Assistant 2025.4.4 is the newest release whose Requires-Python admits Python 3.13.0
# (later releases ask for 3.13.2). It is installed under its own package_constraints.txt,
# together with the frontend (without it Home Assistant boots into recovery mode), the
# requirements of the integrations the tests load (mqtt; tasmota, whose HATasmota links a Tasmota
# device in tests/test_ha_linking.py, and camera and stream, which its camera platform imports:
# 2025.4.4's homeassistant package still required their numpy and PyTurboJPEG, 2026.x's not), and
# pyotp/PyQRCode (auth modules). Each integration's pinned requirements come from its
# manifest.json in the wheel, so they match the release.
# Takes a few minutes and about 1 GB of disk on a fresh machine.
#
# Newer releases (HA_VERSION=2026.2.3, say) ask for Python 3.13.2. With only 3.13.0 at hand,
# HA_LOWER_PYTHON_GATE=1 installs them past their Requires-Python (pip --ignore-requires-python)
# and lowers the installed homeassistant/const.py REQUIRED_PYTHON_VER to the running Python,
# the only gate Home Assistant itself checks at start. This is for testing only.
set -euo pipefail

HA_VERSION="${HA_VERSION:-2025.4.4}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${1:-${ROOT}/.cache/ha-venv}"

find_python() {
    if [[ -n "${HA_PYTHON:-}" ]]; then echo "${HA_PYTHON}"; return; fi
    for candidate in "${HOME}/.pyenv/versions/3.13.0/bin/python" python3.13; do
        if command -v "${candidate}" >/dev/null 2>&1; then command -v "${candidate}"; return; fi
    done
    echo "setup_ha_venv: no Python 3.13 found; set HA_PYTHON=/path/to/python3.13" >&2
    exit 2
}

PY="$(find_python)"
echo "setup_ha_venv: Home Assistant ${HA_VERSION} on $("${PY}" -V) into ${VENV}"
"${PY}" -m venv "${VENV}"
VPY="${VENV}/bin/python"
"${VPY}" -m pip install --quiet --upgrade pip wheel

IGNORE=()
if [[ "${HA_LOWER_PYTHON_GATE:-0}" == 1 ]]; then IGNORE=(--ignore-requires-python); fi

WORK="$(mktemp -d)"
trap 'rm -rf "${WORK}"' EXIT
"${VPY}" -m pip download --quiet --no-deps "${IGNORE[@]}" --dest "${WORK}" "homeassistant==${HA_VERSION}"
WHEEL="$(ls "${WORK}"/homeassistant-*.whl)"

# Pull the constraints and the pinned integration requirements out of the wheel.
"${VPY}" - "${WHEEL}" "${WORK}" <<'PY'
import json, sys, zipfile
wheel, work = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as zf:
    constraints = zf.read("homeassistant/package_constraints.txt").decode()
    reqs = []
    for integration in ("frontend", "mqtt", "tasmota", "camera", "stream", "onboarding", "auth", "http", "api"):
        name = f"homeassistant/components/{integration}/manifest.json"
        try:
            reqs += json.loads(zf.read(name)).get("requirements", [])
        except KeyError:
            pass
open(f"{work}/constraints.txt", "w").write(constraints)
reqs = list(dict.fromkeys(reqs))  # camera and stream both pin PyTurboJPEG
open(f"{work}/requirements.txt", "w").write("\n".join(reqs + ["pyotp", "PyQRCode"]) + "\n")
PY
echo "setup_ha_venv: integration requirements: $(tr '\n' ' ' < "${WORK}/requirements.txt")"

"${VPY}" -m pip install --quiet "${IGNORE[@]}" -c "${WORK}/constraints.txt" "${WHEEL}" -r "${WORK}/requirements.txt"
if [[ "${HA_LOWER_PYTHON_GATE:-0}" == 1 ]]; then
    "${VPY}" - <<'PY'
import re, sys, sysconfig
from pathlib import Path
const = Path(sysconfig.get_paths()["purelib"]) / "homeassistant" / "const.py"
text = const.read_text()
lowered = re.sub(r"^REQUIRED_PYTHON_VER: Final\[tuple\[int, int, int\]\] = \([^)]*\)",
                 "REQUIRED_PYTHON_VER: Final[tuple[int, int, int]] = (%d, %d, %d)" % sys.version_info[:3],
                 text, count=1, flags=re.M)
if lowered == text:
    sys.exit(f"setup_ha_venv: REQUIRED_PYTHON_VER not found in {const}")
const.write_text(lowered)
print("setup_ha_venv: Python gate lowered to %d.%d.%d in" % sys.version_info[:3], const)
PY
fi
"${VPY}" -c "import homeassistant.const as c; print('setup_ha_venv: installed Home Assistant', c.__version__)"
