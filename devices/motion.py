"""PIR motion sensors for the simulated home's rooms: the teacher of learn's occupancy path.

:func:`add_motion_sensors` gives every Zigbee2MQTT climate room of a
:class:`devices.simulate.Simulator` a PIR motion sensor of its own, published as Zigbee2MQTT
publishes one (an Aqara/IKEA-style sensor with the friendly name ``<room>/motion``):
``<z2m_base>/<room>/motion`` with ``{"occupancy": true|false, "battery", "voltage",
"linkquality", "last_seen"}`` once per room step (a minute of simulated time), availability on
``<z2m_base>/<room>/motion/availability``. The slash keeps the sensor off the one-segment
pattern ``<z2m_base>/{device}`` that reads the climate rooms as generic JSON.

The PIR model is the one of :func:`devices.history.room_history`: in a minute with an occupant
awake the sensor triggers with probability ``motion_p`` (asleep, in a bedroom between 23:00 and
07:00 simulated time: a tenth of it), and a trigger holds ``occupancy: true`` for ``hold_s``.
So "motion in the last N minutes" is a teacher that is right most of the time but not always,
as a real one is (people who sit still or sleep go unseen; it stays on for a while after they
leave). The room's truth comes from the room's own ``truth_at`` (the simulator's occupancy), so
sensor and room never disagree about who is there.

Seeded and order-free: whether the sensor triggered at a step is a pure function of
``(seed, room, step)`` (one small generator per step), so the published states do not depend
on which steps were published before (outages skip steps) and a rerun publishes the same.

It adds devices to a built simulator and changes nothing else (the rooms, their random
streams and their messages stay as they were)::

    sim = Simulator(SimConfig(speed=600, devices=2, families=("z2m_climate",)))
    pirs = add_motion_sensors(sim, seed=1)
    await sim.run("mqtt://127.0.0.1:1883", duration=60)
"""

from __future__ import annotations

import json
import zlib
from datetime import UTC, datetime
from typing import Any

import numpy as np

from devices.simulate import SimDevice, Simulator

MOTION_FAMILY = "z2m_motion"


def _last_seen(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _asleep(schedule: str, step: int, period_s: float) -> bool:
    hour = (step * period_s / 3600.0) % 24.0  # a room's simulated time starts at midnight
    return schedule == "bedroom" and (hour >= 23.0 or hour < 7.0)


def pir_sensor(
    room: SimDevice,
    *,
    seed: int = 0,
    motion_p: float = 0.6,
    hold_s: float = 90.0,
    z2m_base: str = "zigbee2mqtt",
) -> SimDevice:
    """A Zigbee2MQTT PIR motion sensor in ``room`` (a ``z2m_climate`` device of a simulator)."""
    if room.truth_at is None or room.truth.get("kind") != "room":
        raise ValueError(f"{room.name} is not a simulated room")
    if not 0.0 <= motion_p <= 1.0:
        raise ValueError(f"motion_p must be within 0..1, not {motion_p}")
    if not hold_s > 0:
        raise ValueError(f"hold_s must be positive, not {hold_s}")
    truth_at = room.truth_at
    schedule = str(room.truth.get("schedule", ""))
    period_s = room.period_s
    hold = max(1, round(hold_s / period_s))
    name = f"{room.name}/motion"
    topic = f"{z2m_base}/{name}"
    key = [seed, zlib.crc32(room.name.encode())]
    triggered: dict[int, bool] = {}

    def trigger(step: int) -> bool:
        if step in triggered:
            return triggered[step]
        truth = truth_at(step) or {}
        p = motion_p / 10.0 if _asleep(schedule, step, period_s) else motion_p
        u = float(np.random.default_rng([*key, step]).random())
        value = bool(truth.get("occupancy")) and u < p
        if len(triggered) >= 4 * hold:  # a memo of the last few steps: only they are asked again
            del triggered[min(triggered)]
        triggered[step] = value
        return value

    def motion_at(step: int) -> bool:
        return any(trigger(s) for s in range(max(0, step - hold + 1), step + 1))

    def msgs(step: int, ts: float) -> list[tuple[str, bytes]]:
        payload: dict[str, Any] = {
            "battery": 100,
            "last_seen": _last_seen(ts),
            "linkquality": 120 + step % 17,
            "occupancy": motion_at(step),
            "voltage": 3005,
        }
        return [(topic, json.dumps(payload).encode())]

    return SimDevice(
        name,
        MOTION_FAMILY,
        period_s,
        room.speed,
        {"device": name, "family": MOTION_FAMILY, "kind": "motion", "room": room.name},
        {"state": topic, "availability": f"{topic}/availability"},
        msgs,
        None,
        online_payload=(f"{topic}/availability", b'{"state":"online"}', b'{"state":"offline"}'),
    )


def add_motion_sensors(
    sim: Simulator, *, seed: int = 0, motion_p: float = 0.6, hold_s: float = 90.0
) -> list[SimDevice]:
    """Give each Zigbee2MQTT room of ``sim`` a PIR motion sensor (appended to ``sim.devices``,
    so the simulator publishes it after its room at each step); returns the sensors."""
    rooms = [d for d in sim.devices if d.family == "z2m_climate"]
    if not rooms:
        raise ValueError("the simulator has no Zigbee2MQTT rooms: keep z2m_climate in its families")
    pirs = [
        pir_sensor(r, seed=seed, motion_p=motion_p, hold_s=hold_s, z2m_base=sim.config.z2m_base)
        for r in rooms
    ]
    sim.devices.extend(pirs)
    return pirs
