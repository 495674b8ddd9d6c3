"""The simulated home's faults (devices/faults.py, ``edge-infer simulate --fault``)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from devices.faults import (
    FAULTS,
    FRIDGE_FAULTS,
    FRIDGE_ID,
    HELD_OUT,
    LEAK_LPM,
    UNSEEN_ID,
    fridge_power,
    water_flow,
)
from devices.simulate import SimConfig, Simulator, acsf1_watts, cli_simulate

HOUR = 60  # readings an hour at one a minute
ONSET_H = 4


def _on(series: np.ndarray) -> np.ndarray:
    return series > 10.0


def _runs(on: np.ndarray) -> list[int]:
    """Lengths (readings) of the compressor's runs that start and end inside ``on``."""
    edges = np.flatnonzero(np.diff(on.astype(int)))
    starts = [e + 1 for e in edges if not on[e]]
    ends = [e + 1 for e in edges if on[e]]
    return [min(e for e in ends if e > s) - s for s in starts if any(e > s for e in ends)]


def test_healthy_fridge_cycles_about_a_third_of_the_time() -> None:
    p = fridge_power(7 * 24 * HOUR, np.random.default_rng(3))
    duty = _on(p).mean()
    assert 0.28 < duty < 0.40
    runs = _runs(_on(p))
    assert 15 <= np.median(runs) <= 25  # ~20 min runs
    assert 80 < np.median(p[_on(p)]) < 100 and np.median(p[~_on(p)]) < 5


def test_creep_runs_ever_longer_then_never_stops() -> None:
    onset = ONSET_H * 3600.0
    p = fridge_power(
        24 * HOUR, np.random.default_rng(3), fault="fridge_creep", onset_s=onset, ramp_s=4 * 3600.0
    )
    before = _on(p[: ONSET_H * HOUR]).mean()
    ramp = _on(p[ONSET_H * HOUR : 8 * HOUR]).mean()
    after = _on(p[9 * HOUR :]).mean()
    assert before < 0.45 < ramp < 1.0
    assert after == 1.0  # 100 % duty cycle once the ramp is over
    healthy = fridge_power(24 * HOUR, np.random.default_rng(3))
    np.testing.assert_array_equal(p[: ONSET_H * HOUR - 60], healthy[: ONSET_H * HOUR - 60])


def test_short_cycling_and_stuck_on() -> None:
    onset = ONSET_H * 3600.0
    short = fridge_power(24 * HOUR, np.random.default_rng(4), fault="fridge_short_cycle", onset_s=onset)
    runs_after = _runs(_on(short[(ONSET_H + 1) * HOUR :]))
    assert len(runs_after) > 60 and np.median(runs_after) <= 5  # ~4 min runs, ~9 min cycles
    stuck = fridge_power(24 * HOUR, np.random.default_rng(4), fault="fridge_stuck_on", onset_s=onset)
    assert _on(stuck[ONSET_H * HOUR + 60 :]).all()
    assert not _on(stuck[: ONSET_H * HOUR]).all()


def test_water_leak_never_returns_to_zero() -> None:
    onset = ONSET_H * 3600.0
    clean = water_flow(3 * 24 * HOUR, np.random.default_rng(5))
    leak = water_flow(3 * 24 * HOUR, np.random.default_rng(5), leak_lpm=LEAK_LPM, onset_s=onset)
    assert (clean == 0).mean() > 0.8  # zero between draws
    assert (leak[ONSET_H * HOUR :] >= LEAK_LPM).all()
    np.testing.assert_array_equal(leak[: ONSET_H * HOUR], clean[: ONSET_H * HOUR])


@pytest.mark.parametrize("fault", FRIDGE_FAULTS)
def test_generators_are_deterministic_and_extend_their_prefix(fault: str) -> None:
    a = fridge_power(3000, np.random.default_rng(9), fault=fault, onset_s=7200.0)
    b = fridge_power(9000, np.random.default_rng(9), fault=fault, onset_s=7200.0)
    np.testing.assert_array_equal(a, b[:3000])  # what the simulator's lazy chunks rely on
    w1, w2 = (
        water_flow(3000, np.random.default_rng(9), 60.0, 1.0, 0.0),
        water_flow(9000, np.random.default_rng(9), 60.0, 1.0, 0.0),
    )
    np.testing.assert_array_equal(w1, w2[:3000])


def _fault_device(sim: Simulator, name: str):  # type: ignore[no-untyped-def]
    return next(d for d in sim.devices if d.name == name)


def test_simulator_adds_fault_devices_and_keeps_the_home() -> None:
    plain = Simulator(SimConfig(seed=2))
    faulty = Simulator(SimConfig(seed=2, faults=("fridge_creep", "water_leak", "unseen_appliance")))
    assert [d.name for d in faulty.devices[: len(plain.devices)]] == [d.name for d in plain.devices]
    ts = time.time()
    for a, b in zip(plain.devices, faulty.devices, strict=False):
        assert a.messages(5, ts) == b.messages(5, ts)  # the rest of the home is unchanged
    fridge = _fault_device(faulty, FRIDGE_ID)
    assert fridge.topics["state"] == f"{FRIDGE_ID}/status/switch:0" and fridge.period_s == 60.0
    body = json.loads(fridge.messages(0, ts)[0][1])
    assert {"apower", "voltage", "current", "aenergy"} <= set(body)
    assert fridge.truth_at is not None
    onset_step = int(4 * 3600 / 60)
    assert fridge.truth_at(onset_step - 1) == {"fault_active": False}
    assert fridge.truth_at(onset_step) == {"fault_active": True}
    # the fridge's power over a simulated day follows fridge_power with the fault (lazy chunks agree)
    watts = [json.loads(fridge.messages(s, ts)[0][1])["apower"] for s in range(24 * HOUR)]
    assert np.mean(np.array(watts[ONSET_H * HOUR + 7 * HOUR :]) > 10) == 1.0
    # deterministic with the seed
    faults = ("fridge_creep", "water_leak", "unseen_appliance")
    once, again = (Simulator(SimConfig(seed=2, faults=faults)) for _ in range(2))
    for a, b in zip(once.devices, again.devices, strict=True):
        assert a.messages(1234, ts) == b.messages(1234, ts)


def test_unseen_appliance_replays_a_held_out_class() -> None:
    seen: set[str] = set()
    for seed in range(12):
        sim = Simulator(SimConfig(seed=seed, families=("z2m_plug",), faults=("unseen_appliance",)))
        dev = _fault_device(sim, UNSEEN_ID)
        assert dev.truth["label"] in HELD_OUT and dev.period_s == 10.0
        seen.add(dev.truth["label"])
        data = np.load("devices/traces/acsf1.npz")
        acsf1 = {k: data[k] for k in data.files}
        series = int(np.flatnonzero(acsf1["test_index"] == dev.truth["test_index"])[0])
        expected = acsf1_watts(acsf1, series)
        got = [json.loads(dev.messages(s, 0.0)[0][1])["apower"] for s in range(20)]
        np.testing.assert_allclose(got, np.round(expected[:20], 1))
    assert seen == set(HELD_OUT)  # the seed draws from both held-out classes


def test_bad_faults_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="unknown fault 'toaster_fire'"):
        SimConfig(faults=("toaster_fire",))
    with pytest.raises(ValueError, match="one fridge, one fault"):
        SimConfig(faults=("fridge_creep", "fridge_stuck_on"))
    with pytest.raises(ValueError, match="fault_onset_h"):
        SimConfig(faults=("water_leak",), fault_onset_h=-1)
    assert set(FAULTS) >= {
        "fridge_creep",
        "fridge_short_cycle",
        "fridge_stuck_on",
        "water_leak",
        "unseen_appliance",
    }


def test_cli_lists_the_fault_devices(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_simulate(["--fault", "fridge_stuck_on", "--fault", "water_leak", "--list"]) == 0
    names = {d["device"] for d in json.loads(capsys.readouterr().out)}
    assert {FRIDGE_ID, "sim_water_01"} <= names
    with pytest.raises(SystemExit) as exit_info:
        cli_simulate(["--fault", "nope", "--list"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err
