"""Anomaly alarms as episodes: the persistence rule an anomaly model's manifest states.

An anomaly model scores one window at a time; a score at or above the threshold is one window
*over* it. The alarm (the ``anomaly`` field of the answer, the HA ``binary_sensor``) goes on
after ``persist`` windows over it in a row and goes off after ``clear`` windows under it in a
row; between the two it keeps its state. One rising edge is one alarm (one episode). The
manifest says the rule in ``provenance.alarm`` (``{"persist": 2, "clear": 6}``); a model
without it is served as before (every window over the threshold is an alarm window).

The same code counts the false alarms when the threshold is set and the card's figures are
measured (``exporters/anomaly.py``): :func:`gate` runs :class:`AlarmState` over a series,
as the daemon runs it over one device's answers. Pure Python and numpy, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:  # edge.outputs imports edge.runtime, which imports this module
    from edge.outputs import Prediction


class AlarmRuleError(ValueError):
    """A ``provenance.alarm`` record that is not a persistence rule (names the place)."""


@dataclass(frozen=True, slots=True)
class AlarmRule:
    """On after ``persist`` windows in a row at or over the threshold, off after ``clear`` under it."""

    persist: int = 1
    clear: int = 1

    @classmethod
    def from_record(cls, record: Any, where: str) -> AlarmRule:
        if not isinstance(record, dict):
            raise AlarmRuleError(f"{where} is not an object")
        values: dict[str, int] = {}
        for key in ("persist", "clear"):
            value = record.get(key, 1)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise AlarmRuleError(f"{where}.{key} {value!r} is not a whole number >= 1")
            values[key] = value
        return cls(**values)

    def record(self) -> dict[str, int]:
        return {"persist": self.persist, "clear": self.clear}


@dataclass(slots=True)
class AlarmState:
    """One device's alarm: :meth:`step` takes whether its latest window is over the threshold."""

    on: bool = False
    over: int = 0  # windows over the threshold in a row, up to the latest
    under: int = 0  # windows under it in a row

    def step(self, over_threshold: bool, rule: AlarmRule) -> bool:
        if over_threshold:
            self.over += 1
            self.under = 0
        else:
            self.under += 1
            self.over = 0
        if not self.on and self.over >= rule.persist:
            self.on = True
        elif self.on and self.under >= rule.clear:
            self.on = False
        return self.on


def gate(scores: npt.NDArray[Any], threshold: float, rule: AlarmRule) -> npt.NDArray[np.bool_]:
    """The alarm after each window of a series of scores (one device, in order, from a fresh state)."""
    state = AlarmState()
    over: list[bool] = (np.asarray(scores, dtype=np.float64) >= threshold).tolist()
    return np.array([state.step(x, rule) for x in over], dtype=bool)


def episodes(alarm: npt.NDArray[Any]) -> int:
    """Rising edges of the alarm: how many times it went on."""
    a = np.asarray(alarm, dtype=bool)
    return int(a[0]) + int((a[1:] & ~a[:-1]).sum()) if len(a) else 0


class DeviceAlarms:
    """One pipeline's alarm per device (at most ``max_devices``; past that the oldest is forgotten)."""

    def __init__(self, max_devices: int) -> None:
        self.max_devices = max(1, max_devices)
        self._states: dict[str, AlarmState] = {}

    def apply(self, device: str, rule: AlarmRule | None, prediction: Prediction) -> None:
        """Gate an anomaly answer (edge.outputs) by ``rule``: ``anomaly`` and ``label`` become the
        device's alarm, ``over_threshold`` says whether this window alone is over the threshold.
        No rule, or no threshold: the answer stays as it is."""
        fields = prediction.fields
        if rule is None or fields.get("threshold") is None or "anomaly" not in fields:
            return
        state = self._states.get(device)
        if state is None:
            if len(self._states) >= self.max_devices:
                del self._states[next(iter(self._states))]
            state = self._states[device] = AlarmState()
        over = bool(fields["anomaly"])
        on = state.step(over, rule)
        fields["label"] = "anomaly" if on else "normal"
        fields["anomaly"] = on
        fields["over_threshold"] = over
        prediction.key = on
        prediction.head = None  # the answer is json.dumps of the fields

    def forget(self, device: str) -> None:
        self._states.pop(device, None)
