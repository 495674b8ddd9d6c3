"""devices/motion.py: the simulated rooms' PIR motion sensors (the occupancy path's teacher)."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest

import devices
from devices.motion import MOTION_FAMILY, add_motion_sensors, pir_sensor
from devices.simulate import SimConfig, SimDevice, Simulator
from edge.decode import Decoded
from tests.broker import Mosquitto
from tests.test_simulate import Collector, _covered

DAYS = 3
STEPS = DAYS * 1440


def _home(seed: int, rooms: int = 3, **kw: float) -> tuple[Simulator, list[SimDevice]]:
    sim = Simulator(SimConfig(speed=600, devices=rooms, seed=seed, families=("z2m_climate",)))
    return sim, add_motion_sensors(sim, seed=seed, **kw)  # type: ignore[arg-type]


def _motion(pir: SimDevice, steps: range | list[int]) -> dict[int, bool]:
    return {s: bool(json.loads(pir.messages(s, 1.7e9 + 60 * s)[0][1])["occupancy"]) for s in steps}


def _occupied(room: SimDevice) -> np.ndarray:
    assert room.truth_at is not None
    return np.array([bool((room.truth_at(s) or {})["occupancy"]) for s in range(STEPS)])


def test_a_pir_sees_the_occupants_of_its_room_and_nothing_else() -> None:
    sim, pirs = _home(seed=3)
    rooms = sim.devices[:3]
    assert [r.truth["schedule"] for r in rooms] == ["home_office", "family", "bedroom"]
    assert [p.name for p in pirs] == [f"{r.name}/motion" for r in rooms]
    assert sim.devices[3:] == pirs and all(p.family == MOTION_FAMILY for p in pirs)
    for room, pir in zip(rooms, pirs, strict=True):
        occupied = _occupied(room)
        states = _motion(pir, range(STEPS))
        motion = np.array([states[s] for s in range(STEPS)])
        assert occupied.any() and motion.any()
        # motion only while someone is there, or for the hold (90 s: 2 steps) after they left
        seen_lately = occupied | np.concatenate([[False], occupied[:-1]])
        assert not (motion & ~seen_lately).any(), room.name
        hour = (np.arange(STEPS) / 60.0) % 24
        night = (hour >= 23) | (hour < 7)
        awake = occupied & np.concatenate([[False], occupied[:-1]])  # occupied this and the last step
        if room.truth["schedule"] == "bedroom":
            awake &= ~night
            asleep = occupied & night
            assert asleep.sum() > 300
            # a tenth of the trigger rate: 1 - (1 - 0.06)^2 = 0.12 of the steps
            assert motion[asleep].mean() < 0.25, motion[asleep].mean()
        # p = 0.6 a minute, held two steps: 1 - 0.4^2 = 0.84 of the steps
        assert 0.75 < motion[awake].mean() < 0.93, (room.name, motion[awake].mean())


def test_the_pir_is_seeded_and_order_free() -> None:
    steps = list(range(600, 1400))
    _, pirs = _home(seed=5, rooms=2)
    first = _motion(pirs[1], steps)
    _, again = _home(seed=5, rooms=2)
    backwards = _motion(again[1], steps[::-1])
    skipping = _motion(_home(seed=5, rooms=2)[1][1], steps[::7])
    assert backwards == first
    assert skipping == {s: first[s] for s in steps[::7]}
    assert any(first.values()) and not all(first.values())
    # the sensor's own seed: the same room, another draw of its triggers
    sim, _ = _home(seed=5, rooms=2)
    other = pir_sensor(sim.devices[1], seed=6)
    assert _motion(other, steps) != first


def test_bad_arguments_are_refused() -> None:
    plugs = Simulator(SimConfig(devices=1, families=("z2m_plug",)))
    with pytest.raises(ValueError, match="no Zigbee2MQTT rooms"):
        add_motion_sensors(plugs)
    with pytest.raises(ValueError, match="not a simulated room"):
        pir_sensor(plugs.devices[0])
    sim = Simulator(SimConfig(devices=1, families=("z2m_climate",)))
    with pytest.raises(ValueError, match="motion_p"):
        pir_sensor(sim.devices[0], motion_p=1.5)
    with pytest.raises(ValueError, match="hold_s"):
        pir_sensor(sim.devices[0], hold_s=0)


@pytest.mark.broker
def test_the_pirs_on_the_broker_after_their_rooms(fresh_broker: Mosquitto) -> None:
    mosquitto = fresh_broker.start()
    collector = Collector(mosquitto)
    sim, pirs = _home(seed=2, rooms=2)
    counts = asyncio.run(sim.run(mosquitto.url, duration=1.5))
    time.sleep(0.3)
    messages = collector.stop()
    assert counts[MOTION_FAMILY] >= 2 * 10
    rooms = [d.name for d in sim.devices[:2]]
    for room, pir in zip(rooms, pirs, strict=True):
        states = [json.loads(p) for t, p, _ in messages if t == f"zigbee2mqtt/{pir.name}"]
        assert len(states) >= 10
        assert all(isinstance(s["occupancy"], bool) and s["last_seen"].endswith("Z") for s in states)
        # each step: the room's climate sample, then its PIR
        pair = [f"zigbee2mqtt/{room}", f"zigbee2mqtt/{pir.name}"]
        order = [t for t, _, _ in messages if t in pair]
        assert order[: len(order) // 2 * 2] == pair * (len(order) // 2)
        availability = [p for t, p, _ in messages if t == f"zigbee2mqtt/{pir.name}/availability"]
        assert availability[0] == b'{"state":"online"}' and availability[-1] == b'{"state":"offline"}'
    # the rooms read as generic JSON on one topic segment: the PIRs (<room>/motion) stay out
    decoder = devices.build_decoder(
        "json",
        readings={"temperature": "temperature", "co2": "co2"},
        options={"topics": "zigbee2mqtt/{device}"},
    )
    events = [
        e
        for t, p, _ in messages
        if any(_covered(f, t) for f in decoder.filters)
        for e in decoder.decode(t, p)  # a PIR here would raise: no temperature in its payload
    ]
    assert {e.device for e in events if isinstance(e, Decoded)} == set(rooms)
