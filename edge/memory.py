"""Giving memory back after a backlog (glibc only; elsewhere these do nothing).

A backlog after an outage passes thousands of inputs and answers through the daemon at once.
Once it is worked off the memory is free inside the process, but the C allocator keeps it:
large buffers (the packed held inputs, socket and batch buffers) stay in the heap once glibc's
dynamic mmap threshold has risen past their size, and freed pages in the middle of the heap
are not returned until ``malloc_trim``. So the daemon

- fixes the mmap threshold at :data:`MMAP_THRESHOLD` (allocations at least that big get their
  own mapping and go back to the system when freed, whatever came before), and
- calls :func:`trim` once a backlog has been worked off (see ``Daemon._memory_tick``).

Python's own small-object arenas are not affected; what keeps them small is that the daemon
bounds what a backlog brings in (docs/reliability.md, *Slow consumers*).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("edge.memory")

MMAP_THRESHOLD = 256 * 1024  # bytes
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number

_libc: ctypes.CDLL | None = None
try:
    _name = ctypes.util.find_library("c")
    if _name:
        _candidate = ctypes.CDLL(_name)
        if hasattr(_candidate, "malloc_trim") and hasattr(_candidate, "mallopt"):
            _libc = _candidate  # glibc; musl (Alpine, the Home Assistant add-on base) has neither
except OSError:  # pragma: no cover - no C library to load
    _libc = None


def available() -> bool:
    """Whether this process can tune and trim its allocator (glibc)."""
    return _libc is not None


def tune() -> bool:
    """Fix glibc's mmap threshold (see the module docstring). True when it was set."""
    if _libc is None:
        return False
    return bool(_libc.mallopt(ctypes.c_int(_M_MMAP_THRESHOLD), ctypes.c_int(MMAP_THRESHOLD)))


def trim() -> bool:
    """Return the free pages of every malloc arena to the system. True when some were."""
    if _libc is None:
        return False
    return bool(_libc.malloc_trim(ctypes.c_size_t(0)))
