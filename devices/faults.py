"""Faults for the simulated home (``edge-infer simulate --fault NAME``): devices that go wrong.

Each fault adds one device to the home; everything else stays as it was (the fault devices
draw from their own random streams, seeded from ``SimConfig.seed``):

* ``fridge_creep``: a fridge on a Shelly Plus Plug S (``shellyplusplugs-fridge``) whose
  compressor runs ever longer from the onset: each run lasts ``1 + t / ramp`` times its
  normal length (``FRIDGE_RAMP_H``), until from ``ramp`` on it never stops (duty cycle 100 %),
  as with a failing door seal or a refrigerant leak.
* ``fridge_short_cycle``: the same fridge, short-cycling from the onset (runs of ~4 min,
  pauses of ~5 min: a failing start relay or thermostat).
* ``fridge_stuck_on``: the same fridge, compressor stuck on from the onset.
* ``water_leak``: a water-flow sensor (generic JSON on ``water/sim_water_01/flow``, L/min)
  whose flow never returns to zero from the onset (``LEAK_LPM``, a running toilet).
* ``unseen_appliance``: a Shelly plug (``shellyplusplugs-unseen``) replaying an ACSF1 test
  series of a class the open-set appliance model never trained on (``HELD_OUT``:
  fridge_freezer and printer, models/appliance/open_set), chosen by the seed.

Before the onset (``SimConfig.fault_onset_h`` simulated hours) the fridge and the water
sensor behave normally. Their normal behaviour is the one the bundled anomaly model
``zoo:fridge_anomaly`` learned (:func:`fridge_power` with no fault; ``python -m
exporters.fridge_zoo``). The truth topic of each fault device says when the fault is on
(``"fault_active"``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import NDArray

FRIDGE_FAULTS = ("fridge_creep", "fridge_short_cycle", "fridge_stuck_on")
FAULTS = (*FRIDGE_FAULTS, "water_leak", "unseen_appliance")
FRIDGE_PERIOD_S = 60.0  # a Shelly plug reporting its power once a minute
WATER_PERIOD_S = 60.0
FRIDGE_RAMP_H = 4.0  # fridge_creep: runs twice as long after 4 h, 100 % duty cycle from then on
LEAK_LPM = 1.0
HELD_OUT = ("fridge_freezer", "printer")  # the classes models/appliance/open_set never trained on
FRIDGE_ID = "shellyplusplugs-fridge"
UNSEEN_ID = "shellyplusplugs-unseen"
WATER_NAME = "sim_water_01"
DAY_S = 86400.0

FloatArray = NDArray[np.float32]


def check_faults(faults: tuple[str, ...]) -> None:
    """ValueError naming the bad entry: unknown names, two faults of the one fridge, repeats."""
    unknown = [f for f in faults if f not in FAULTS]
    if unknown:
        raise ValueError(f"unknown fault {unknown[0]!r}; known: {', '.join(FAULTS)}")
    if len(set(faults)) != len(faults):
        raise ValueError(f"a fault is given twice: {', '.join(faults)}")
    fridge = [f for f in faults if f in FRIDGE_FAULTS]
    if len(fridge) > 1:
        raise ValueError(f"one fridge, one fault: choose one of {', '.join(fridge)}")


def fridge_power(  # noqa: PLR0917 - the generator's parameters, like water_flow's
    n: int,
    rng: np.random.Generator,
    period_s: float = FRIDGE_PERIOD_S,
    fault: str | None = None,
    onset_s: float = 0.0,
    ramp_s: float = FRIDGE_RAMP_H * 3600.0,
) -> FloatArray:
    """``n`` readings (W, one every ``period_s``) of a fridge: compressor runs of ~20 min at
    ~90 W, pauses of ~40 min at ~2 W, jittered; from ``onset_s`` the ``fault`` (a name of
    :data:`FRIDGE_FAULTS` or None)."""
    if fault is not None and fault not in FRIDGE_FAULTS:
        raise ValueError(f"fridge fault {fault!r}: use one of {', '.join(FRIDGE_FAULTS)}")
    out = np.empty(n, dtype=np.float32)
    t, i = 0.0, 0
    while i < n:
        on = max(5.0, rng.normal(20.0, 2.0)) * 60.0
        off = max(10.0, rng.normal(40.0, 4.0)) * 60.0
        level = float(rng.normal(90.0, 3.0))
        if t >= onset_s and fault == "fridge_short_cycle":
            on = max(2.0, rng.normal(4.0, 0.5)) * 60.0
            off = max(2.0, rng.normal(5.0, 0.5)) * 60.0
        elif t >= onset_s and fault == "fridge_creep":
            since = t - onset_s
            on = math.inf if since >= ramp_s else on * (1.0 + since / ramp_s)
        elif t >= onset_s and fault == "fridge_stuck_on":
            on = math.inf
        for length, watts in ((on, level), (off, 2.0)):
            if i >= n:
                break
            dur = length
            if fault == "fridge_stuck_on" and watts < 10 and t + dur > onset_s:
                dur = max(period_s, onset_s - t)  # a pause the fault cuts short
            k = n - i if math.isinf(dur) else min(n - i, max(1, round(dur / period_s)))
            out[i : i + k] = watts + rng.normal(0, 1.0, k).astype(np.float32)
            i += k
            t += k * period_s
    return np.clip(out, 0.0, None)


def water_flow(
    n: int,
    rng: np.random.Generator,
    period_s: float = WATER_PERIOD_S,
    leak_lpm: float = 0.0,
    onset_s: float = 0.0,
) -> FloatArray:
    """``n`` readings (L/min) of a household water-flow sensor: draws of 2-10 min at 4-12 L/min,
    ~10 a day, more in the morning and evening, zero between; ``leak_lpm > 0``: from
    ``onset_s`` the flow never returns to zero."""
    noise = np.random.default_rng(int(rng.integers(2**31)))  # its own stream: a longer n keeps the prefix
    t = np.arange(n) * period_s

    def rate(seconds: NDArray[Any]) -> NDArray[np.float64]:
        hour = (seconds % DAY_S) / 3600.0
        r = 0.15 + 1.2 * np.exp(-((hour - 7.5) ** 2) / 2) + 1.0 * np.exp(-((hour - 19.5) ** 2) / 3)
        return np.asarray(r, dtype=np.float64)

    day_mean = float(rate(np.arange(0.0, DAY_S, period_s)).mean())
    p_start = rate(t) / day_mean * 10.0 / (DAY_S / period_s)
    flow = np.zeros(n, dtype=np.float32)
    i = 0
    while i < n:
        if rng.random() < p_start[i]:
            k = max(1, int(rng.integers(2, 11) * 60.0 / period_s))
            flow[i : i + k] = rng.uniform(4.0, 12.0)
            i += k
        else:
            i += 1
    flow += np.abs(noise.normal(0.0, 0.02, n)).astype(np.float32) * (flow > 0)
    if leak_lpm > 0:
        flow[t >= onset_s] += leak_lpm
    return flow


def unseen_series(acsf1: dict[str, NDArray[Any]], seed: int) -> int:
    """The ACSF1 series (index into the traces) the unseen appliance replays: one of the
    held-out classes' test series, the ``seed % 6``-th (0: fridge_freezer test series 15)."""
    classes = [str(c) for c in acsf1["classes"]]
    held = [classes.index(name) for name in HELD_OUT]
    candidates = np.flatnonzero(np.isin(acsf1["label"], held))
    return int(candidates[seed % len(candidates)])


class _Lazy:
    """A generated series extended in chunks as steps ask for it (deterministic: one stream)."""

    def __init__(self, make: Callable[[int], FloatArray], chunk: int = 4096) -> None:
        self._make = make
        self._chunk = chunk
        self._data: FloatArray = np.zeros(0, np.float32)

    def __call__(self, step: int) -> float:
        while step >= len(self._data):
            self._data = self._make(len(self._data) + self._chunk)
        return float(self._data[step])


def shelly_status(power: float, voltage: float, energy_wh: float) -> bytes:
    """A Shelly Plus Plug S ``status/switch:0`` (generic status update)."""
    current = round(power / voltage, 3) if voltage else 0.0
    payload = {
        "id": 0,
        "source": "init",
        "output": True,
        "apower": round(power, 1),
        "voltage": round(voltage, 1),
        "current": current,
        "aenergy": {"total": round(energy_wh, 3)},
        "temperature": {"tC": 31.5, "tF": 88.7},
    }
    return json.dumps(payload).encode()


def fault_devices(
    faults: tuple[str, ...],
    seed: int,
    onset_s: float,
    acsf1: dict[str, NDArray[Any]],
    watts_of: Callable[[int], NDArray[Any]],
) -> list[dict[str, Any]]:
    """What :class:`devices.simulate.Simulator` needs of each fault device: name, family, period,
    truth, topics, ``messages(step, ts)``, ``truth_at(step)``, online payloads, ``power_w``."""
    check_faults(faults)
    out: list[dict[str, Any]] = []
    fridge = next((f for f in faults if f in FRIDGE_FAULTS), None)
    if fridge is not None:
        # regenerating from the start with the same seed gives the same prefix: chunks agree
        def make_fridge(n: int) -> FloatArray:
            return fridge_power(n, np.random.default_rng((seed, 1201)), fault=fridge, onset_s=onset_s)

        out.append(_shelly_device(FRIDGE_ID, "fridge", fridge, onset_s, _Lazy(make_fridge), FRIDGE_PERIOD_S))
    if "unseen_appliance" in faults:
        series = unseen_series(acsf1, seed)
        watts = np.asarray(watts_of(series), dtype=np.float64)
        label = str(acsf1["classes"][int(acsf1["label"][series])])
        dev = _shelly_device(
            UNSEEN_ID,
            "unseen_appliance",
            "unseen_appliance",
            0.0,
            lambda s: float(watts[s % len(watts)]),
            10.0,
        )
        dev["truth"] |= {
            "label": label,
            "class_index": int(acsf1["label"][series]),
            "dataset": "ACSF1",
            "split": "test",
            "test_index": int(acsf1["test_index"][series]),
            "unseen_by": "models/appliance/open_set",
        }
        out.append(dev)
    if "water_leak" in faults:
        out.append(_water_device(seed, onset_s))
    return out


def _fault_truth(name: str, family: str, fault: str, onset_s: float, period_s: float) -> dict[str, Any]:
    return {
        "device": name,
        "family": family,
        "kind": "fault",
        "fault": fault,
        "onset_s": onset_s,
        "period_s": period_s,
    }


def _shelly_device(  # noqa: PLR0917 - private, one call per kind
    name: str, family: str, fault: str, onset_s: float, power: Callable[[int], float], period_s: float
) -> dict[str, Any]:
    energy = [0.0]

    def messages(step: int, ts: float) -> list[tuple[str, bytes]]:
        p = power(step)
        energy[0] += p * period_s / 3600.0
        return [(f"{name}/status/switch:0", shelly_status(p, 230.0 + math.sin(step / 29.0), energy[0]))]

    def truth_at(step: int) -> dict[str, Any]:
        return {"fault_active": step * period_s >= onset_s} if family != "unseen_appliance" else {}

    return {
        "name": name,
        "family": family,
        "period_s": period_s,
        "truth": _fault_truth(name, family, fault, onset_s, period_s),
        "topics": {"state": f"{name}/status/switch:0", "availability": f"{name}/online"},
        "messages": messages,
        "truth_at": truth_at,
        "online_payload": (f"{name}/online", b"true", b"false"),
        "power_w": power,
    }


def _water_device(seed: int, onset_s: float) -> dict[str, Any]:
    def make(n: int) -> FloatArray:
        return water_flow(n, np.random.default_rng((seed, 1301)), leak_lpm=LEAK_LPM, onset_s=onset_s)

    flow = _Lazy(make)
    topic = f"water/{WATER_NAME}/flow"
    status = f"water/{WATER_NAME}/status"

    def messages(step: int, ts: float) -> list[tuple[str, bytes]]:
        return [(topic, json.dumps({"ts": int(ts * 1000), "flow": round(flow(step), 3)}).encode())]

    def truth_at(step: int) -> dict[str, Any]:
        return {"fault_active": step * WATER_PERIOD_S >= onset_s}

    return {
        "name": WATER_NAME,
        "family": "water_flow",
        "period_s": WATER_PERIOD_S,
        "truth": _fault_truth(WATER_NAME, "water_flow", "water_leak", onset_s, WATER_PERIOD_S)
        | {"leak_lpm": LEAK_LPM},
        "topics": {"state": topic, "availability": status},
        "messages": messages,
        "truth_at": truth_at,
        "online_payload": (status, b"online", b"offline"),
        "power_w": None,
    }
