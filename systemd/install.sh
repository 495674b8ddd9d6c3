#!/usr/bin/env bash
# Install or upgrade edge-infer as a systemd service. Safe to run again: upgrades the
# virtual environment and the units, keeps /etc/edge-infer/config.yaml and the models.
#
#   sudo systemd/install.sh                    # from a checkout: installs that checkout
#   sudo systemd/install.sh --source 'edge-infer==0.2.0'
#   sudo systemd/install.sh --jetson --onnxruntime /path/to/onnxruntime_gpu-*.whl
#   sudo systemd/install.sh --trainer          # + what `edge-infer learn` trains with (CPU torch)
#   systemd/install.sh --dry-run               # print what would be done, change nothing
#   systemd/install.sh --prefix /tmp/root      # install under a root of your choosing
#                                              # (no systemctl; for packaging and tests)
#
# Layout (relative to --prefix, default /):
#   /opt/edge-infer/venv                 the virtual environment (python3 -m venv)
#   /opt/edge-infer/docs                 operations.md, install.md
#   /etc/edge-infer/config.yaml          created from the example only if absent
#   /etc/edge-infer/config.yaml.example  refreshed on every run
#   /etc/edge-infer/models/              ONNX models (config paths are relative to /etc/edge-infer)
#   /etc/edge-infer/secrets/             0700, for LoadCredential= (MQTT password, TLS key)
#   /etc/systemd/system/edge-infer.service, edge-infer@.service (+ .d/ drop-ins)
#
# The service runs as a systemd DynamicUser named edge-infer, so no account is created.
set -euo pipefail

PREFIX=""
DRY_RUN=0
SOURCE=""
ORT=""
JETSON="auto"
DO_PIP=1
ENABLE=1
START_NOW=0
PYTHON="${PYTHON:-python3}"
PIP_ARGS=()
TRAINER=0
TORCH_SPEC=""

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "$SCRIPT_DIR/.." && pwd)"

usage() {
    sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    cat <<'EOF'

options:
  --prefix DIR        install under DIR instead of / (implies no systemctl)
  --dry-run           print the actions, change nothing
  --source SPEC       what pip installs (default: this checkout, else 'edge-infer' from PyPI)
  --onnxruntime SPEC  replace the CPU onnxruntime by SPEC (an onnxruntime-gpu wheel on Jetson)
  --jetson            install the Jetson GPU drop-in (default: auto-detect /etc/nv_tegra_release)
  --no-jetson         do not install it (and remove one installed earlier)
  --trainer           also install the trainer extra (torch CPU build, onnx, onnxscript, pandas) so
                      `edge-infer learn` and the Retrain button train beside the daemon
  --torch SPEC        the torch to install first with --trainer (default: torch==2.9.1, on x86_64
                      the +cpu build from PyTorch's CPU index; PyPI's x86_64 wheel pulls CUDA)
  --pip-arg ARG       extra argument for pip install (repeatable), e.g. --pip-arg=--no-index
  --no-pip            do not create or upgrade the virtual environment
  --no-enable         do not enable the unit
  --now               start (or restart) the service now
  --python PY         interpreter for the venv (default: python3, needs >= 3.11)
EOF
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --prefix) PREFIX="${2:?--prefix needs a directory}"; shift 2 ;;
        --prefix=*) PREFIX="${1#*=}"; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        --source) SOURCE="${2:?}"; shift 2 ;;
        --source=*) SOURCE="${1#*=}"; shift ;;
        --onnxruntime) ORT="${2:?}"; shift 2 ;;
        --onnxruntime=*) ORT="${1#*=}"; shift ;;
        --jetson) JETSON=1; shift ;;
        --no-jetson) JETSON=0; shift ;;
        --trainer) TRAINER=1; shift ;;
        --torch) TORCH_SPEC="${2:?--torch needs a requirement}"; shift 2 ;;
        --torch=*) TORCH_SPEC="${1#*=}"; shift ;;
        --pip-arg) PIP_ARGS+=("${2:?}"); shift 2 ;;
        --pip-arg=*) PIP_ARGS+=("${1#*=}"); shift ;;
        --no-pip) DO_PIP=0; shift ;;
        --no-enable) ENABLE=0; shift ;;
        --now) START_NOW=1; shift ;;
        --python) PYTHON="${2:?}"; shift 2 ;;
        --python=*) PYTHON="${1#*=}"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

if [[ -n "$PREFIX" ]]; then
    [[ $DRY_RUN -eq 1 ]] || mkdir -p "$PREFIX"
    case "$PREFIX" in /*) ;; *) PREFIX="$PWD/$PREFIX" ;; esac
    PREFIX="${PREFIX%/}"
fi
OPT="$PREFIX/opt/edge-infer"
VENV="$OPT/venv"
ETC="$PREFIX/etc/edge-infer"
UNITDIR="$PREFIX/etc/systemd/system"
USE_SYSTEMCTL=1
[[ -n "$PREFIX" ]] && USE_SYSTEMCTL=0

say() { printf 'install.sh: %s\n' "$*"; }
run() {
    if [[ $DRY_RUN -eq 1 ]]; then
        printf '+ %s\n' "$*"
    else
        "$@"
    fi
}
# put SRC DST MODE: install a file if its content changed
put() {
    local src="$1" dst="$2" mode="$3"
    if [[ -f "$dst" ]] && cmp -s "$src" "$dst"; then
        say "unchanged $dst"
        return
    fi
    run install -D -m "$mode" "$src" "$dst"
    [[ $DRY_RUN -eq 1 ]] || say "wrote $dst"
}
# put_text DST MODE <<< TEXT
put_text() {
    local tmp
    tmp="$(mktemp)"
    cat >"$tmp"
    put "$tmp" "$1" "$2"
    rm -f "$tmp"
}
remove() {
    if [[ -e "$1" ]]; then
        run rm -f "$1"
        [[ $DRY_RUN -eq 1 ]] || say "removed $1"
    fi
}

# --- preconditions -------------------------------------------------------------------------
if [[ $DRY_RUN -eq 0 && -z "$PREFIX" && "$(id -u)" -ne 0 ]]; then
    echo "install.sh: run as root (sudo), or use --dry-run / --prefix" >&2
    exit 1
fi
if [[ $DO_PIP -eq 1 ]]; then
    if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo "install.sh: $PYTHON is missing or older than 3.11 (try --python python3.11)" >&2
        exit 1
    fi
fi
if [[ -z "$SOURCE" ]]; then
    if [[ -f "$REPO_DIR/pyproject.toml" ]]; then SOURCE="$REPO_DIR"; else SOURCE="edge-infer"; fi
fi
if [[ "$JETSON" == "auto" ]]; then
    if [[ -e "$PREFIX/etc/nv_tegra_release" ]]; then JETSON=1; else JETSON=0; fi
fi
say "prefix=${PREFIX:-/} source=$SOURCE jetson=$JETSON dry_run=$DRY_RUN"

# --- virtual environment --------------------------------------------------------------------
if [[ $DO_PIP -eq 1 ]]; then
    if [[ ! -x "$VENV/bin/python" ]]; then
        run "$PYTHON" -m venv "$VENV"
    else
        say "upgrading the existing virtual environment $VENV"
    fi
    run "$VENV/bin/python" -m pip install --quiet --upgrade pip ${PIP_ARGS[@]+"${PIP_ARGS[@]}"}
    if [[ $TRAINER -eq 1 ]]; then
        # torch first, a CPU build, so the extra's torch>=2.4 is met and never pulls a CUDA one.
        if [[ -n "$TORCH_SPEC" ]]; then
            run "$VENV/bin/python" -m pip install --quiet ${PIP_ARGS[@]+"${PIP_ARGS[@]}"} "$TORCH_SPEC"
        elif [[ "$(uname -m)" == x86_64 ]]; then
            run "$VENV/bin/python" -m pip install --quiet ${PIP_ARGS[@]+"${PIP_ARGS[@]}"} \
                --index-url https://download.pytorch.org/whl/cpu "torch==2.9.1+cpu"
        else
            run "$VENV/bin/python" -m pip install --quiet ${PIP_ARGS[@]+"${PIP_ARGS[@]}"} "torch==2.9.1"
        fi
        # the extra goes on the project name: "edge-infer==0.2.0" -> "edge-infer[trainer]==0.2.0"
        if [[ "$SOURCE" =~ ^([A-Za-z0-9._-]+)([<>=!~].*)$ ]]; then
            WANT="${BASH_REMATCH[1]}[trainer]${BASH_REMATCH[2]}"
        else
            WANT="${SOURCE}[trainer]"
        fi
    else
        WANT="$SOURCE"
    fi
    run "$VENV/bin/python" -m pip install --quiet --upgrade ${PIP_ARGS[@]+"${PIP_ARGS[@]}"} "$WANT"
    if [[ -n "$ORT" ]]; then
        # onnxruntime and onnxruntime-gpu install the same 'onnxruntime' package: never both.
        run "$VENV/bin/python" -m pip uninstall --quiet --yes onnxruntime
        run "$VENV/bin/python" -m pip install --quiet --upgrade ${PIP_ARGS[@]+"${PIP_ARGS[@]}"} "$ORT"
    fi
    # ProtectSystem=strict makes /opt read-only for the service: compile the bytecode now.
    run "$VENV/bin/python" -m compileall -q "$VENV/lib"
fi

# --- documentation (the unit's Documentation= points here) ---------------------------------
for doc in operations.md install.md; do
    if [[ -f "$REPO_DIR/docs/$doc" ]]; then
        put "$REPO_DIR/docs/$doc" "$OPT/docs/$doc" 0644
    fi
done

# --- configuration: never overwrite the user's ----------------------------------------------
run install -d -m 0755 "$ETC" "$ETC/models"
run install -d -m 0700 "$ETC/secrets"
EXAMPLE="$(mktemp)"
trap 'rm -f "$EXAMPLE"' EXIT
if [[ -f "$REPO_DIR/examples/config.yaml" ]]; then
    cp "$REPO_DIR/examples/config.yaml" "$EXAMPLE"
else
    cat >"$EXAMPLE" <<'EOF'
# edge-infer configuration (example written by systemd/install.sh).
# Relative paths are relative to this file's directory, /etc/edge-infer.
# Check it with: /opt/edge-infer/venv/bin/edge-infer check -c /etc/edge-infer/config.yaml
mqtt:
  url: mqtt://localhost:1883
  # Secrets: not in this world-readable file. See docs/operations.md, "Secrets":
  # password_file: /run/credentials/edge-infer.service/mqtt-password

models:
  # A bundled model (edge-infer models list). Your own: path: models/NAME.onnx
  # (relative to this file: /etc/edge-infer/models/NAME.onnx).
  appliance:
    path: zoo:appliance

pipelines:
  # Which appliance each Zigbee2MQTT smart plug powers, from its last 1460 power readings on a
  # 10 s grid (about 4 hours; docs/models.md). Enable Zigbee2MQTT's advanced.last_seen so that
  # samples carry their time.
  appliance:
    model: appliance
    source:
      profile: zigbee2mqtt
      options: {base_topic: zigbee2mqtt}
    inputs: {power: power}
    features: {type: window, hop: 6, resample_period_s: 10, max_gap_s: 120}
    output: {publish: on_change, heartbeat_s: 600}

metrics:
  enabled: false                       # true: http://127.0.0.1:9109/metrics and /healthz
  host: 127.0.0.1
  port: 9109
EOF
fi
put "$EXAMPLE" "$ETC/config.yaml.example" 0644
if [[ -e "$ETC/config.yaml" ]]; then
    say "keeping existing $ETC/config.yaml"
else
    put "$EXAMPLE" "$ETC/config.yaml" 0644
fi

# --- units ---------------------------------------------------------------------------------
put "$SCRIPT_DIR/edge-infer.service" "$UNITDIR/edge-infer.service" 0644
put "$SCRIPT_DIR/edge-infer@.service" "$UNITDIR/edge-infer@.service" 0644
for unit in edge-infer.service edge-infer@.service; do
    if [[ $JETSON -eq 1 ]]; then
        put "$SCRIPT_DIR/jetson.conf" "$UNITDIR/$unit.d/jetson.conf" 0644
    else
        remove "$UNITDIR/$unit.d/jetson.conf"
    fi
done

# --- MemoryDenyWriteExecute=yes vs. libraries that want an executable stack ----------------
# glibc must make the stack executable to load such a library, which the unit's
# MemoryDenyWriteExecute=yes forbids: the import fails. Official onnxruntime wheels are
# fine; some source builds are not. Scan the venv and relax the unit only if needed.
EXECSTACK=""
if [[ -d "$VENV/lib" ]]; then
    EXECSTACK="$("$PYTHON" - "$VENV/lib" <<'EOF'
import os, struct, sys

PT_GNU_STACK, PF_X = 0x6474E551, 1

def wants_exec_stack(path):
    with open(path, "rb") as f:
        head = f.read(64)
        if len(head) < 52 or head[:4] != b"\x7fELF":
            return False
        end = "<" if head[5] == 1 else ">"
        if head[4] == 2:  # ELF64
            phoff = struct.unpack_from(end + "Q", head, 0x20)[0]
            phentsize, phnum = struct.unpack_from(end + "HH", head, 0x36)
            flags_at = 4
        else:  # ELF32
            phoff = struct.unpack_from(end + "I", head, 0x1C)[0]
            phentsize, phnum = struct.unpack_from(end + "HH", head, 0x2A)
            flags_at = 24
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    for i in range(phnum):
        entry = table[i * phentsize:(i + 1) * phentsize]
        if len(entry) < flags_at + 4:
            break
        if struct.unpack_from(end + "I", entry, 0)[0] == PT_GNU_STACK:
            return bool(struct.unpack_from(end + "I", entry, flags_at)[0] & PF_X)
    return True  # no PT_GNU_STACK header: the loader assumes an executable stack

for root, _, files in os.walk(sys.argv[1]):
    for name in files:
        if name.endswith(".so") or ".so." in name:
            path = os.path.join(root, name)
            try:
                if not os.path.islink(path) and wants_exec_stack(path):
                    print(path)
            except OSError:
                pass
EOF
)"
fi
if [[ -n "$EXECSTACK" ]]; then
    say "WARNING: these libraries need an executable stack; MemoryDenyWriteExecute is turned off:"
    printf '    %s\n' $EXECSTACK
fi
for unit in edge-infer.service edge-infer@.service; do
    if [[ -n "$EXECSTACK" ]]; then
        put_text "$UNITDIR/$unit.d/execstack.conf" 0644 <<EOF
# Written by install.sh: these libraries in the venv ask for an executable stack, which
# MemoryDenyWriteExecute=yes forbids (the import would fail). Rebuild them with
# -Wl,-z,noexecstack (or use the official wheels), rerun install.sh, and this file goes.
$(printf '#   %s\n' $EXECSTACK)
[Service]
MemoryDenyWriteExecute=no
EOF
    else
        remove "$UNITDIR/$unit.d/execstack.conf"
    fi
done

# --- systemd -------------------------------------------------------------------------------
if [[ $USE_SYSTEMCTL -eq 1 ]]; then
    run systemctl daemon-reload
    if [[ $ENABLE -eq 1 ]]; then
        run systemctl enable edge-infer.service
    fi
    if [[ $START_NOW -eq 1 ]]; then
        run systemctl restart edge-infer.service
    else
        # an upgrade takes effect in the instances that are running; stopped ones stay stopped
        run systemctl try-restart edge-infer.service 'edge-infer@*.service'
    fi
else
    say "prefix install: skipping systemctl (daemon-reload, enable)"
fi

cat <<EOF
install.sh: done.
  1. edit $ETC/config.yaml (it serves the bundled appliance model; your own models go in $ETC/models/)
  2. check it:   $VENV/bin/edge-infer check -c $ETC/config.yaml
  3. start it:   systemctl start edge-infer   (status: systemctl status edge-infer)
  4. logs:       journalctl -u edge-infer -f
EOF
