#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Build (or reuse) a Debian 12 arm64 sysroot with python3.11 under $ARM64_CACHE/sysroot.
#
# debootstrap --foreign only downloads and unpacks the "required" set; the packages we --include
# (python3.11 and its libraries) are unpacked here with tar --keep-directory-symlink, because dpkg -x
# would replace the /lib -> usr/lib link with a directory and the arm64 loader would not be found.
# No second stage runs: nothing is configured, we only need the files. The stdlib is precompiled on
# the host so an emulated start does not recompile it every time. Idempotent; a no-op when cached.
set -euo pipefail
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"

STAMP="$SYSROOT/.edge-arm64-sysroot"
WANT="v1 bookworm arm64 minbase +python3.11 +libstdc++6"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && [ -x "$SYSROOT/usr/bin/python3.11" ]; then
  log "sysroot cached: $SYSROOT"
  exit 0
fi

mkdir -p "$ARM64_CACHE"
exec 9>"$ARM64_CACHE/.sysroot.lock"
flock 9
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  log "sysroot built meanwhile by another run: $SYSROOT"
  exit 0
fi

QEMU="$(find_tool qemu-aarch64-static qemu-user-static)"
DEBOOTSTRAP="$(find_tool debootstrap debootstrap)"
case "$DEBOOTSTRAP" in
  "$TOOLS"/*) export DEBOOTSTRAP_DIR="$TOOLS/usr/share/debootstrap" ;;
esac
[ "$(id -u)" = 0 ] || die "debootstrap needs root for the first build of the sysroot (later runs reuse it)"

start=$(date +%s)
tmp="$ARM64_CACHE/sysroot.tmp"
rm -rf "$tmp"
log "debootstrap --foreign bookworm arm64 from $ARM64_MIRROR into $tmp"
"$DEBOOTSTRAP" --foreign --arch=arm64 --variant=minbase --include=python3.11,libstdc++6 \
  bookworm "$tmp" "$ARM64_MIRROR" >"$ARM64_CACHE/debootstrap.log" 2>&1 \
  || { tail -20 "$ARM64_CACHE/debootstrap.log" >&2; die "debootstrap failed (log: $ARM64_CACHE/debootstrap.log)"; }

# Unpack what the first stage only downloaded (the 'base' list: python3.11 and its libraries).
unpacked=0
while read -r pkg; do
  deb="$(awk -v p="$pkg" '$1 == p { print $2 }' "$tmp/debootstrap/debpaths")"
  if [ -z "$deb" ] || [ ! -f "$tmp$deb" ]; then die "debootstrap did not download $pkg"; fi
  dpkg-deb --fsys-tarfile "$tmp$deb" | tar -x --keep-directory-symlink -C "$tmp"
  unpacked=$((unpacked + 1))
done < <(tr ' ' '\n' <"$tmp/debootstrap/base" | sed '/^$/d')
[ -L "$tmp/lib" ] || die "/lib is no longer a link to usr/lib in the sysroot"
[ -x "$tmp/usr/bin/python3.11" ] || die "python3.11 missing from the sysroot"
log "unpacked $unpacked packages on top of the required set"
rm -f "$tmp"/var/cache/apt/archives/*.deb

# In a container debootstrap links proc -> /proc (the host's!): replace it by a directory holding only
# a Pi-style cpuinfo; other /proc paths fall through to the host because qemu -L only redirects
# paths that exist in the sysroot.
if [ -L "$tmp/proc" ]; then rm -f "$tmp/proc"; fi
mkdir -p "$tmp/proc"
pi_cpuinfo "$ARM64_CPU" >"$tmp/proc/cpuinfo"

# Precompile the standard library (this machine sets PYTHONDONTWRITEBYTECODE, and emulated compiling
# is slow). Bytecode is architecture independent; the host must be 3.11 for the same magic number.
excl='/(test|idlelib|tkinter|turtledemo|lib2to3/tests)/'
if "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
  "$PYTHON" -m compileall -q -j0 -s "$tmp" -p / -x "$excl" "$tmp/usr/lib/python3.11" >/dev/null \
    || log "some stdlib files did not compile (ignored)"
else
  log "host $PYTHON is not 3.11: precompiling the stdlib under emulation (slower)"
  "$QEMU" -cpu "$ARM64_CPU" -L "$tmp" "$tmp/usr/bin/python3.11" -m compileall -q -x "$excl" \
    /usr/lib/python3.11 >/dev/null || log "some stdlib files did not compile (ignored)"
fi

version="$("$QEMU" -cpu "$ARM64_CPU" -L "$tmp" "$tmp/usr/bin/python3.11" -c \
  'import platform, sqlite3, ssl, asyncio; print(platform.machine(), platform.python_version())')"
[ "${version%% *}" = aarch64 ] || die "emulated python reports '$version', expected aarch64"

rm -rf "$SYSROOT"
mv "$tmp" "$SYSROOT"
printf '%s\n' "$WANT" >"$STAMP"
log "sysroot ready: $SYSROOT ($version, $(du -sh "$SYSROOT" | cut -f1), $(($(date +%s) - start)) s)"
