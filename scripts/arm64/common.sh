# shellcheck shell=bash
# Shared settings of the arm64 emulation scripts; sourced, never run.
#
#   ARM64_CACHE   cache directory (default: <repo>/.cache/arm64); relative paths are taken from the repo
#   ARM64_CPU     qemu CPU model: cortex-a72 (Raspberry Pi 4, default) or cortex-a76 (Pi 5)
#   ARM64_MIRROR  Debian mirror for the sysroot (default http://deb.debian.org/debian)
#   PYTHON        host Python whose package versions the aarch64 site pins (default python3)

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
ARM64_CACHE="${ARM64_CACHE:-.cache/arm64}"
case "$ARM64_CACHE" in
  /*) ;;
  *) ARM64_CACHE="$REPO/$ARM64_CACHE" ;;
esac
ARM64_CPU="${ARM64_CPU:-cortex-a72}"
ARM64_MIRROR="${ARM64_MIRROR:-http://deb.debian.org/debian}"
PYTHON="${PYTHON:-python3}"
SYSROOT="$ARM64_CACHE/sysroot"
SITE="$ARM64_CACHE/site"
WHEELS="$ARM64_CACHE/wheels"
TOOLS="$ARM64_CACHE/tools"
export REPO ARM64_CACHE ARM64_CPU ARM64_MIRROR PYTHON SYSROOT SITE WHEELS TOOLS

log() { printf 'arm64: %s\n' "$*" >&2; }
die() { printf 'arm64: error: %s\n' "$*" >&2; exit 1; }

# Path of a program: on PATH, or unpacked from its Debian package into $TOOLS (no system change).
# usage: find_tool PROGRAM PACKAGE
find_tool() {
  local prog="$1" pkg="$2" found
  found="$(command -v "$prog" 2>/dev/null || true)"
  if [ -z "$found" ]; then
    for dir in /usr/sbin /usr/bin "$TOOLS/usr/sbin" "$TOOLS/usr/bin"; do
      if [ -x "$dir/$prog" ]; then found="$dir/$prog"; break; fi
    done
  fi
  if [ -z "$found" ]; then
    log "$prog not installed: fetching Debian package $pkg into $TOOLS"
    mkdir -p "$TOOLS/debs"
    if ! (cd "$TOOLS/debs" && apt-get download "$pkg" >/dev/null 2>&1); then
      [ "$(id -u)" = 0 ] || die "apt-get download $pkg failed; run 'apt-get update' or install $pkg"
      apt-get update -qq >/dev/null
      (cd "$TOOLS/debs" && apt-get download "$pkg" >/dev/null) || die "apt-get download $pkg failed"
    fi
    for deb in "$TOOLS/debs/${pkg}"_*.deb; do dpkg-deb -x "$deb" "$TOOLS"; done
    for dir in "$TOOLS/usr/sbin" "$TOOLS/usr/bin"; do
      if [ -x "$dir/$prog" ]; then found="$dir/$prog"; break; fi
    done
    [ -n "$found" ] || die "$pkg does not provide $prog"
  fi
  printf '%s\n' "$found"
}

# A Raspberry Pi style /proc/cpuinfo for the emulated CPU. onnxruntime's cpuinfo reads /proc/cpuinfo,
# which qemu -L resolves inside the sysroot first; the host's x86 one makes onnxruntime 1.32 crash.
pi_cpuinfo() {
  local features part variant revision model hardware i
  case "$1" in
    cortex-a76)
      features="fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp"
      part=0xd0b; variant=0x4; revision=1; hardware=BCM2712; model="Raspberry Pi 5 Model B Rev 1.0" ;;
    *)
      features="fp asimd evtstrm crc32 cpuid"
      part=0xd08; variant=0x0; revision=3; hardware=BCM2835; model="Raspberry Pi 4 Model B Rev 1.1" ;;
  esac
  for i in 0 1 2 3; do
    printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: %s\nCPU implementer\t: 0x41\n' "$i" "$features"
    printf 'CPU architecture: 8\nCPU variant\t: %s\nCPU part\t: %s\nCPU revision\t: %s\n\n' \
      "$variant" "$part" "$revision"
  done
  printf 'Hardware\t: %s\nRevision\t: c03111\nSerial\t\t: 10000000e0e1e2e3\nModel\t\t: %s\n' \
    "$hardware" "$model"
}
