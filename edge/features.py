"""Per-device feature state: snapshot joins and sliding windows.

Pure logic, no I/O. Each pipeline owns one :class:`FeatureStore`, which keeps a
small state object per device; readings of one device never reach another's
state. ``update`` returns a ready input vector (a copy the caller may keep) or
``None`` when the device has nothing to predict yet, and raises
:class:`~edge.decode.DecodeError` for data it rejects (stale, out of order,
too many devices).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from edge.decode import DecodeError

FloatArray = npt.NDArray[np.float32]


class DeviceState(Protocol):
    def update(self, values: dict[str, float], ts: float) -> FloatArray | None: ...

    def reset(self) -> None: ...

    def nbytes(self) -> int: ...

    def to_state(self) -> dict[str, Any]: ...

    def load_state(self, state: dict[str, Any]) -> None: ...


@dataclass
class SnapshotJoin:
    """The latest value of each reading with its time; ready when all are present and fresh.

    Plain Python lists, not numpy arrays: a join holds a handful of readings, and numpy's
    per-element assignment and ``min`` cost more than the work itself (docs/performance.md).
    """

    names: Sequence[str]
    max_age_s: float
    values: list[float] = field(init=False)
    times: list[float] = field(init=False)
    _index: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.values = [math.nan] * len(self.names)
        self.times = [-math.inf] * len(self.names)
        self._index = {name: i for i, name in enumerate(self.names)}

    def update(self, values: dict[str, float], ts: float) -> FloatArray | None:
        index = self._index
        times = self.times
        current = self.values
        touched = False
        for name, value in values.items():
            i = index.get(name)
            if i is None:
                continue
            if ts < times[i]:
                raise DecodeError("out_of_order", f"reading {name!r} at {ts:.3f} is older than the last one")
            current[i] = value
            times[i] = ts
            touched = True
        if not touched:
            return None
        oldest = min(times)
        if oldest == -math.inf:
            return None  # still waiting for a first value of some reading: not an error
        if ts - oldest > self.max_age_s:
            stale = [n for n, t in zip(self.names, times, strict=True) if ts - t > self.max_age_s]
            raise DecodeError(
                "stale", f"reading(s) {', '.join(stale)} older than max_age_s={self.max_age_s:g}"
            )
        return np.array(current, dtype=np.float32)

    def missing(self) -> list[str]:
        return [n for n, t in zip(self.names, self.times, strict=True) if t == -math.inf]

    def reset(self) -> None:
        self.values[:] = [math.nan] * len(self.values)
        self.times[:] = [-math.inf] * len(self.times)

    def nbytes(self) -> int:
        return 16 * len(self.values)  # two float64 per reading, as the numpy version counted

    def to_state(self) -> dict[str, Any]:
        return {"values": list(self.values), "times": list(self.times)}

    def load_state(self, state: dict[str, Any]) -> None:
        self.values[:] = [float(v) for v in state["values"]]
        self.times[:] = [float(t) for t in state["times"]]


@dataclass
class SlidingWindow:
    """The last ``size`` samples of each channel, oldest first, predicted every ``hop`` samples.

    Without resampling, a sample is complete when every channel has a new value
    (one message carrying all channels is one sample; channels arriving on
    separate topics are joined). With ``period_s`` the readings are resampled by
    sample-and-hold onto a fixed grid, as the model was trained on. A silence
    longer than ``max_gap_s`` restarts the window so samples from before an
    outage never mix with those after it.
    """

    channels: Sequence[str]
    size: int
    hop: int = 1
    period_s: float | None = None
    max_gap_s: float | None = None
    buffer: FloatArray = field(init=False)
    count: int = field(init=False, default=0)  # samples written since the last reset
    since_prediction: int = field(init=False, default=0)
    last_ts: float = field(init=False, default=-math.inf)
    next_tick: float | None = field(init=False, default=None)
    _pending: npt.NDArray[np.float64] = field(init=False)
    _seen: npt.NDArray[np.bool_] = field(init=False)
    _held: npt.NDArray[np.float64] = field(init=False)
    _index: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        # Twice the window, so the ready window is always one contiguous slice.
        self.buffer = np.zeros((2 * self.size, len(self.channels)), dtype=np.float32)
        self._pending = np.full(len(self.channels), np.nan)
        self._seen = np.zeros(len(self.channels), dtype=bool)
        self._held = np.full(len(self.channels), np.nan)
        self._index = {name: i for i, name in enumerate(self.channels)}

    def _append(self, sample: npt.NDArray[np.float64]) -> None:
        pos = self.count % self.size
        self.buffer[pos] = sample
        self.buffer[pos + self.size] = sample
        self.count += 1
        self.since_prediction += 1

    def _ready(self) -> FloatArray | None:
        if self.count < self.size or self.since_prediction < self.hop:
            return None
        self.since_prediction = 0
        start = self.count % self.size
        return self.buffer[start : start + self.size].copy()

    def update(self, values: dict[str, float], ts: float) -> FloatArray | None:
        if ts < self.last_ts:
            raise DecodeError("out_of_order", f"sample at {ts:.3f} is older than the last one")
        if self.max_gap_s is not None and self.last_ts != -math.inf and ts - self.last_ts > self.max_gap_s:
            self.reset()
        touched = False
        for name, value in values.items():
            i = self._index.get(name)
            if i is not None:
                self._pending[i] = value
                self._seen[i] = True
                touched = True
        if not touched:
            return None
        self.last_ts = ts
        if self.period_s is None:
            if not self._seen.all():
                return None
            self._append(self._pending)
            self._seen[:] = False
            return self._ready()
        return self._resample(ts)

    def _resample(self, ts: float) -> FloatArray | None:
        assert self.period_s is not None
        if np.isnan(self._held).any():
            self._held = np.where(self._seen, self._pending, self._held)
            if np.isnan(self._held).any():
                return None
            self.next_tick = ts
        assert self.next_tick is not None
        # Ticks up to ts take the values held before this message (sample and hold).
        ticks = math.floor((ts - self.next_tick) / self.period_s) + 1 if ts >= self.next_tick else 0
        ready: FloatArray | None = None
        if ticks > 0:
            skip = max(0, ticks - self.size)  # a long jump only needs the last `size` ticks
            for _ in range(ticks - skip):
                self._append(self._held)
                window = self._ready()
                if window is not None:
                    ready = window
            self.next_tick += ticks * self.period_s
        self._held = np.where(self._seen, self._pending, self._held)
        self._seen[:] = False
        return ready

    def reset(self) -> None:
        self.count = 0
        self.since_prediction = 0
        self.last_ts = -math.inf
        self.next_tick = None
        self._pending[:] = np.nan
        self._seen[:] = False
        self._held[:] = np.nan

    def nbytes(self) -> int:
        return int(self.buffer.nbytes)

    def to_state(self) -> dict[str, Any]:
        start = self.count % self.size
        filled = min(self.count, self.size)
        recent = self.buffer[start + self.size - filled : start + self.size] if filled else self.buffer[:0]
        return {"samples": recent.tolist(), "last_ts": self.last_ts, "since": self.since_prediction}

    def load_state(self, state: dict[str, Any]) -> None:
        self.reset()
        samples = np.asarray(state["samples"], dtype=np.float64).reshape(-1, len(self.channels))
        for sample in samples[-self.size :]:
            self._append(sample)
        self.last_ts = float(state["last_ts"])
        self.since_prediction = int(state["since"])


class WindowBudget:
    """``limits.max_window_bytes``: one memory bound over the feature stores of all pipelines."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.stores: list[FeatureStore] = []

    def used(self) -> int:
        """Bytes the stores' device states hold (the states of one store are all one size)."""
        return sum(store.held_bytes() for store in self.stores)


class FeatureStore:
    """Per-device states of one pipeline, bounded in count and memory."""

    def __init__(
        self,
        make_state: Callable[[], DeviceState],
        *,
        max_devices: int,
        allowed: Sequence[str] | None = None,
        budget: WindowBudget | None = None,
    ) -> None:
        self._make_state = make_state
        self.max_devices = max_devices
        self.allowed = frozenset(allowed) if allowed is not None else None
        self.states: dict[str, DeviceState] = {}
        self.budget = budget
        self._state_bytes = 0  # of one device's state, known after the first

    def held_bytes(self) -> int:
        return len(self.states) * self._state_bytes

    def get(self, device: str) -> DeviceState:
        state = self.states.get(device)
        if state is not None:
            return state
        if self.allowed is not None and device not in self.allowed:
            raise DecodeError(
                "unknown_device", f"device {device[:64]!r} is not in the pipeline's devices list"
            )
        if len(self.states) >= self.max_devices:
            raise DecodeError(
                "unknown_device", f"device {device[:64]!r} is beyond max_devices={self.max_devices}"
            )
        state = self._make_state()
        self._state_bytes = state.nbytes()
        budget = self.budget
        if budget is not None and budget.used() + self._state_bytes > budget.limit:
            raise DecodeError(
                "unknown_device",
                f"device {device[:64]!r} is beyond limits.max_window_bytes={budget.limit} "
                f"(windows of all pipelines hold {budget.used()} bytes)",
            )
        self.states[device] = state

        return state

    def update(self, device: str, values: dict[str, float], ts: float) -> FloatArray | None:
        return self.get(device).update(values, ts)

    def reset(self, device: str) -> None:
        state = self.states.get(device)
        if state is not None:
            state.reset()

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.states.values())
