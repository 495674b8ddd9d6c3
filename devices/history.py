"""Home Assistant history of a simulated home, as a recorder would hold it (for learn's tests and bench).

Rooms from :mod:`devices.roomsim`: four climate entities per room
(``sensor.<room>_temperature``, ``_humidity``, ``_illuminance``, ``_co2``) and a
PIR motion sensor (``binary_sensor.<room>_motion``). Like the recorder, a state
is stored only when it changes. The motion sensor triggers in a minute with an
occupant awake with probability ``motion_p`` (asleep: a tenth of it) and holds
``on`` for ``hold_s``, as PIR sensors do, so "motion in the last N minutes" is
a teacher that is right most of the time but not always, like a real one.
Optional outages make every entity of a room ``unavailable`` for a while. The ground truth is
there too, as ``input_boolean.<room>_occupied_truth``, for measuring a model, not for teaching it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from devices.roomsim import RoomConfig, simulate_room
from edge.learn.history import EntityHistory, StateChange

CLIMATE = ("temperature", "humidity", "illuminance", "co2")
_FORMAT = {"temperature": "{:.2f}", "humidity": "{:.1f}", "illuminance": "{:.0f}", "co2": "{:.0f}"}


@dataclass
class SimRoom:
    name: str
    config: RoomConfig
    t: np.ndarray  # epoch seconds of the simulation samples
    occupancy: np.ndarray  # ground truth 0/1 at t


def _changes(ts: np.ndarray, states: list[str]) -> list[StateChange]:
    out: list[StateChange] = []
    last = None
    for t, s in zip(ts.tolist(), states, strict=True):
        if s != last:
            out.append(StateChange(float(t), s))
            last = s
    return out


def room_history(
    rooms: list[tuple[str, RoomConfig]],
    *,
    start: float,
    days: float,
    period_s: float = 60.0,
    seed: int = 0,
    motion_p: float = 0.6,
    hold_s: float = 90.0,
    outages: int = 0,
    outage_s: float = 1800.0,
) -> tuple[EntityHistory, list[SimRoom]]:
    """History of ``rooms`` (name, config) from ``start`` (epoch s) for ``days``, one sample
    every ``period_s``; also the ground truth of each room."""
    history: EntityHistory = {}
    sims: list[SimRoom] = []
    for index, (name, cfg) in enumerate(rooms):
        data = simulate_room(cfg, hours=days * 24.0, period_s=period_s, seed=seed * 1000 + index)
        ts = start + data["t"]
        rng = np.random.default_rng(seed * 7919 + index)
        down = np.zeros(len(ts), dtype=bool)
        for _ in range(outages):
            a = int(rng.integers(0, max(1, len(ts) - 1)))
            down[a : a + int(outage_s / period_s)] = True
        for feature in CLIMATE:
            fmt = _FORMAT[feature]
            states = [
                "unavailable" if d else fmt.format(v)
                for v, d in zip(data[feature].tolist(), down, strict=True)
            ]
            history[f"sensor.{name}_{feature}"] = _changes(ts, states)
        occupied = data["occupancy"] > 0.5
        # asleep at night in bedrooms: a PIR sees little movement
        hour = (data["t"] / 3600.0) % 24
        asleep = (cfg.schedule == "bedroom") & ((hour >= 23) | (hour < 7))
        p = np.where(asleep, motion_p / 10, motion_p)
        triggered = occupied & (rng.random(len(ts)) < p)
        motion = np.zeros(len(ts), dtype=bool)
        hold = max(1, round(hold_s / period_s))
        for i in np.flatnonzero(triggered):
            motion[i : i + hold] = True
        states = ["unavailable" if d else ("on" if m else "off") for m, d in zip(motion, down, strict=True)]
        history[f"binary_sensor.{name}_motion"] = _changes(ts, states)
        # the ground truth, as a helper entity would hold it (for measuring, not for teaching)
        truth = ["on" if o > 0.5 else "off" for o in data["occupancy"].tolist()]
        history[f"input_boolean.{name}_occupied_truth"] = _changes(ts, truth)
        sims.append(SimRoom(name, cfg, ts, data["occupancy"]))
    return history, sims


def mains_history(
    *,
    start: float,
    days: float,
    teacher: str = "fridge_freezer",
    others: tuple[str, ...] = ("computer_station", "television", "lamp_cfl", "microwave_oven"),
    base_w: float = 120.0,
    seed: int = 0,
) -> tuple[EntityHistory, dict[str, str]]:
    """A mains meter (``sensor.mains_power``) that sees the sum of replayed real ACS-F1 plug traces
    plus a drifting base load, and the teacher appliance's own plug (``sensor.<teacher>_plug_power``).

    Each appliance replays its class's recorded series one after the other (4 h each, 10 s
    samples), starting at a random offset, so the sum never repeats exactly. Returns the history
    and ``{"mains": entity, "plug": entity}``.
    """
    from devices.simulate import TRACES, acsf1_watts

    with np.load(TRACES / "acsf1.npz") as npz:
        traces = {k: npz[k] for k in npz.files}
    classes = [str(c) for c in traces["classes"]]
    rng = np.random.default_rng(seed)
    n = int(days * 86400 / 10) + 1
    ts = start + np.arange(n) * 10.0

    def replay(name: str) -> np.ndarray:
        series = [i for i, c in enumerate(traces["label"].tolist()) if classes[c] == name]
        loops = [acsf1_watts(traces, s) for s in series]
        out = np.concatenate([loops[i % len(loops)] for i in range(n // 1460 + 2)])
        offset = int(rng.integers(0, 1460))
        return np.asarray(out[offset : offset + n], dtype=np.float64)

    plug = replay(teacher)
    total = plug.copy()
    for name in others:
        total += replay(name)
    drift = np.cumsum(rng.normal(0, 0.5, n))
    drift -= np.linspace(0, drift[-1], n)  # a random walk that returns to the base
    total += base_w + drift + rng.normal(0, 3.0, n)
    history: EntityHistory = {
        "sensor.mains_power": _changes(ts, [f"{v:.1f}" for v in np.maximum(total, 0).tolist()]),
        f"sensor.{teacher}_plug_power": _changes(ts, [f"{v:.1f}" for v in plug.tolist()]),
    }
    return history, {"mains": "sensor.mains_power", "plug": f"sensor.{teacher}_plug_power"}
