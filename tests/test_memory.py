"""edge.memory: glibc allocator tuning and trimming (no-ops elsewhere)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from edge import memory

# Run in a fresh interpreter, so the heap holds only what this script puts there (in the test
# process, earlier tests leave free space behind that the blocks would land in).
_SCRIPT = r"""
import ctypes, ctypes.util, json
from edge import memory
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def rss_kib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 // 1024
assert memory.tune()
blocks, pins = [], []
for _ in range(800):  # 50 MiB in the heap, each block followed by a small one that stays
    blocks.append(libc.malloc(64 * 1024))
    ctypes.memset(blocks[-1], 1, 64 * 1024)  # touched: resident
    pins.append(libc.malloc(2048))
for b in blocks:
    libc.free(b)
before = rss_kib()
trimmed = memory.trim()
after = rss_kib()
print(json.dumps({"before": before, "after": after, "trimmed": trimmed}))
"""


def test_available_on_glibc_and_calls_succeed() -> None:
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc: tune and trim are no-ops")
    assert memory.available()
    assert memory.tune() is True
    assert isinstance(memory.trim(), bool)


def test_trim_hands_freed_heap_pages_back() -> None:
    """Blocks below the mmap threshold are freed while small blocks between them stay: the free
    space is in the middle of the heap, and glibc keeps its pages until malloc_trim."""
    if not memory.available():
        pytest.skip("not glibc")
    out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["trimmed"] is True, got
    assert got["before"] - got["after"] > 30 * 1024, got  # most of the 50 MiB went back
