"""End to end, as ``edge-infer demo`` runs it, but as separate processes on a real Mosquitto.

``edge-infer simulate`` publishes every family at once, fast-forwarded: Zigbee2MQTT and Tasmota plugs
replaying ACSF1 test series, wearables replaying BasicMotions, Zigbee2MQTT and ESPHome climate
sensors from the room simulator. ``edge-infer run -c examples/home.yaml --mqtt-url URL`` serves
them with the bundled models. Every simulated device must get predictions, and the appliance
predictions must match the replayed series' true classes at the accuracy the model card states,
within binomial noise.

Each plug replays one ACSF1 test series from its first sample; the first window the daemon fills
(1460 samples resampled onto the 10 s grid) is that series, so each plug's first prediction is
one independent trial of the model on its test split. Later windows of the same plug are
rotations of the same series, correlated with the first, so they are not counted as trials.
"""

from __future__ import annotations

import contextlib
import math
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from devices.simulate import SimConfig, Simulator
from edge.config import load_config
from tests.broker import Mosquitto
from tests.harness import ROOT, Collector

pytestmark = pytest.mark.broker

HOME = ROOT / "examples" / "home.yaml"
CARD = ROOT / "models" / "appliance" / "appliance.int8.onnx"
PLUGS_PER_FAMILY = 8  # 16 plugs: 16 distinct ACSF1 test series, every class at least once
SPEED = 1000.0  # a 1460 x 10 s window (4 h) fills in ~15 s if the machine keeps up
ALPHA = 1e-3  # chance that a daemon as accurate as the card fails this test
PIPELINE_OF = {
    "z2m_plug": "appliance_z2m",
    "tasmota_plug": "appliance_tasmota",
    "wearable": "activity",
    "z2m_climate": "occupancy_z2m",
    "esphome_climate": "occupancy_esphome",
}


def card_accuracy(model: Path) -> float:
    """The test accuracy the model card states for this file (the int8 row of its results table)."""
    kind = model.name.split(".")[-2]  # appliance.int8.onnx -> int8
    card = (model.parent / "card.md").read_text()
    match = re.search(rf"^\| {kind} \| ([0-9.]+) \|", card, re.MULTILINE)
    assert match, f"no {kind} accuracy in {model.parent / 'card.md'}"
    return float(match.group(1))


def binomial_min_correct(n: int, p: float, alpha: float) -> int:
    """The largest k with P(X < k) <= alpha for X ~ Binomial(n, p): fewer correct than k would
    happen with probability at most alpha if the true accuracy were p."""
    cdf = 0.0
    for k in range(n + 1):
        term = math.comb(n, k) * p**k * (1 - p) ** (n - k)
        if cdf + term > alpha:
            return k
        cdf += term
    return n


def test_binomial_bound() -> None:
    assert binomial_min_correct(20, 0.9, 1e-3) == 13  # P(X <= 12) = 4.2e-4, P(X <= 13) = 2.4e-3
    assert binomial_min_correct(10, 0.5, 0.05) == 2  # P(X <= 1) = 0.011, P(X <= 2) = 0.055


def _start(*args: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "edge.cli", *args], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT
        )


def _stop(proc: subprocess.Popen[bytes]) -> int | None:
    if proc.poll() is None:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(15)
    if proc.poll() is None:
        proc.kill()
        proc.wait(5)
        return None
    return proc.returncode


def _simulator(
    families: tuple[str, ...], devices: int, seed: int, imu_speed: float | None = None
) -> tuple[Simulator, list[str]]:
    """The simulated devices (built here, to know their truth) and the same home's simulate argv."""
    sim = Simulator(
        SimConfig(speed=SPEED, devices=devices, seed=seed, families=families, imu_speed=imu_speed)
    )
    argv = ["--speed", str(SPEED), "--devices", str(devices), "--seed", str(seed)]
    argv += ["--families", ",".join(families)]
    if imu_speed is not None:
        argv += ["--imu-speed", str(imu_speed)]
    return sim, argv


def _predictions(collector: Collector) -> dict[tuple[str, str], list[dict[str, Any]]]:
    by_device: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for message in list(collector.messages):
        parts = message.topic.split("/")
        if len(parts) == 3 and parts[1] in PIPELINE_OF.values():
            by_device.setdefault((parts[1], parts[2]), []).append(message.json())
    return by_device


def test_simulated_home_through_the_example_config(fresh_broker: Mosquitto, tmp_path: Path) -> None:
    broker = fresh_broker.start()
    url = broker.url
    plugs, plug_argv = _simulator(("z2m_plug", "tasmota_plug"), PLUGS_PER_FAMILY, seed=11)
    # 30 IMU messages/s per wearable: a 100-sample window in ~3.5 s
    others, other_argv = _simulator(("wearable", "z2m_climate", "esphome_climate"), 2, 12, imu_speed=3.0)
    devices = plugs.devices + others.devices
    assert len({d.name for d in devices}) == len(devices)
    expected = {(PIPELINE_OF[d.family], d.name) for d in devices}

    collector = Collector(url, "edge-infer/#", "homeassistant/device/+/config")
    daemon_log = tmp_path / "daemon.log"
    daemon = _start("run", "-c", str(HOME), "--mqtt-url", url, log=daemon_log)
    sims: list[subprocess.Popen[bytes]] = []
    started = time.monotonic()
    try:
        collector.wait(
            lambda ms: any(m.topic == "edge-infer/status" and m.payload == b"online" for m in ms), 30
        )
        ready_s = time.monotonic() - started
        for i, argv in enumerate((plug_argv, other_argv)):
            sims.append(_start("simulate", "--mqtt-url", url, *argv, log=tmp_path / f"simulate-{i}.log"))
        try:
            # ~20 s on an idle 2-core machine (23k plug messages); the bound only guards a stall
            collector.wait(lambda _: expected <= set(_predictions(collector)), timeout=120)
        except AssertionError:
            got = set(_predictions(collector))
            logs = "\n".join(p.read_text()[-1500:] for p in sorted(tmp_path.glob("*.log")))
            raise AssertionError(f"no predictions for {sorted(expected - got)}; logs:\n{logs}") from None
        simulated_s = time.monotonic() - started - ready_s
        for sim in sims:
            assert sim.poll() is None, "a simulator ended early"
        predictions = _predictions(collector)
        assert set(predictions) == expected  # every device, and none by another family's pipeline

        # appliance: each plug's first prediction is one trial on its ACSF1 test series
        p_card = card_accuracy(CARD)
        trials = [
            predictions[(PIPELINE_OF[dev.family], dev.name)][0]["label"] == dev.truth["label"]
            for dev in plugs.devices
        ]
        n, correct = len(trials), sum(trials)
        k_min = binomial_min_correct(n, p_card, ALPHA)
        published = [
            body["label"] == dev.truth["label"]
            for dev in plugs.devices
            for body in predictions[(PIPELINE_OF[dev.family], dev.name)]
        ]
        print(
            f"\nappliance: {correct}/{n} plugs right on their first window ({correct / n:.2f}; card "
            f"{p_card:.2f}, at least {k_min} needed at alpha {ALPHA:g}); all published appliance "
            f"predictions {sum(published)}/{len(published)} right; daemon ready after {ready_s:.1f} s, "
            f"every device predicted {simulated_s:.1f} s after the simulators started"
        )
        assert correct >= k_min, (
            f"{correct}/{n} appliance predictions right, card says {p_card}: "
            f"below {k_min}, which has probability < {ALPHA} at the card's accuracy"
        )

        # activity: BasicMotions, card accuracy 1.00; occupancy: a label of the model's
        for dev in others.devices:
            body = predictions[(PIPELINE_OF[dev.family], dev.name)][0]
            if dev.family == "wearable":
                assert body["label"] == dev.truth["label"], (dev.name, body)
            else:
                assert body["label"] in ("empty", "occupied"), (dev.name, body)
    finally:
        for sim in sims:
            _stop(sim)
        code = _stop(daemon)
        collector.close()
    assert code == 0, daemon_log.read_text()[-3000:]


def test_every_simulated_device_is_announced_once_with_its_own_entity(
    fresh_broker: Mosquitto, tmp_path: Path
) -> None:
    """Home Assistant discovery is on in the example: each simulated device appears as one HA device
    with the entity of the pipeline that serves it, and nothing else appears."""
    broker = fresh_broker.start()
    sim, argv = _simulator(("wearable", "z2m_climate", "esphome_climate"), 1, 3, imu_speed=3.0)
    collector = Collector(broker.url, "edge-infer/#", "homeassistant/device/+/config")
    daemon = _start("run", "-c", str(HOME), "--mqtt-url", broker.url, log=tmp_path / "daemon.log")
    simulate = None
    try:
        collector.wait(
            lambda ms: any(m.topic == "edge-infer/status" and m.payload == b"online" for m in ms), 30
        )
        simulate = _start("simulate", "--mqtt-url", broker.url, *argv, log=tmp_path / "simulate.log")
        expected = {(PIPELINE_OF[d.family], d.name) for d in sim.devices}
        collector.wait(lambda _: expected <= set(_predictions(collector)), timeout=30)
        time.sleep(2.0)  # discovery coalesces new devices for a moment
        configs = {
            m.topic: m.json()
            for m in collector.messages
            if m.topic.startswith("homeassistant/device/") and m.payload
        }
    finally:
        if simulate is not None:
            _stop(simulate)
        _stop(daemon)
        collector.close()
    instance_id = load_config(HOME).homeassistant.instance_id  # derived from the config (operations.md)
    prefix = f"homeassistant/device/edge_infer_{instance_id}_"  # then the device id (clean ids stay)
    announced = {
        topic.removeprefix(prefix).removesuffix("/config"): {
            key for key in body.get("cmps", {}) if key in PIPELINE_OF.values()
        }
        for topic, body in configs.items()
        if topic.startswith(prefix)
    }
    wanted = {d.name: {PIPELINE_OF[d.family]} for d in sim.devices}
    assert announced == wanted
