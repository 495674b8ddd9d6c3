"""The NILM path end to end against a real Home Assistant Core: a plug teaches the mains meter.

The simulated home (devices/simulate.py) runs at ``SPEED`` times real time with two replayed
ACS-F1 plugs and a Shelly Pro EM mains meter (their sum plus a base load) on the test's own
Mosquitto. Home Assistant (``recorder:`` and ``history:`` on SQLite) has the meter's and the
fridge plug's power as MQTT sensors, so its recorder stores their states with real timestamps.
A daemon serves a pipeline on the mains meter with a poor model. Then ``edge-infer learn`` reads
the history over the WebSocket API, labels it with the teacher rule "fridge plug above 5 W",
trains in its own process, passes the gate (beats the majority baseline and the deployed model)
and deploys; the running daemon hot-reloads, and its predictions on the following samples are
compared with the simulator's truth (the fridge plug's power at the same step). The same
history read from a copy of the recorder's SQLite file gives the identical training table.

Needs ``EDGE_INFER_HA_VENV`` (tests/test_ha_real.py) and the train extra (torch).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from devices.simulate import SimConfig, Simulator
from edge.config import load_config
from edge.learn.ha_ws import HaWebSocketSource
from edge.learn.recorder_db import RecorderDbSource, copy_recorder_db
from tests.broker import Mosquitto
from tests.harness import ROOT, Collector, fast_mqtt, spawn_daemon, write_config
from tests.onnx_models import window_classifier
from tests.test_ha_real import HomeAssistant, _hass_binary, _publish, _publisher

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.torch, pytest.mark.timeout(1200)]

SPEED = 20.0  # a 10 s plug sample every 0.5 s
WINDOW = 4
RECORD_S = 180.0  # wall seconds of history before learning (an hour of the simulated home)
SERVE_S = 45.0  # wall seconds of predictions compared with the truth after the reload
MAINS_ENTITY = "sensor.mains_meter_power"
PLUG_ENTITY = "sensor.fridge_plug_power"


class SimThread:
    def __init__(self, sim: Simulator, url: str) -> None:
        self.sim = sim
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, args=(url,), daemon=True)

    def _main(self, url: str) -> None:
        try:
            asyncio.run(self.sim.run(url, duration=None, goodbye_s=2.0))
        except BaseException as exc:
            self.error = exc

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.sim.stop()
        self.thread.join(30)


@pytest.mark.parametrize("plugs", [2, 3], ids=["fridge+tv", "fridge+coffee+printer"])
def test_a_plug_teaches_the_mains_meter_through_home_assistant(
    tmp_path: Path, fresh_broker: Mosquitto, plugs: int
) -> None:
    """With 2 plugs the fridge's 30-160 W pulses stand out over a ~1 W television and the base
    load; with 3 a coffee machine (1-1400 W) and a printer (3-450 W) share the meter."""
    pytest.importorskip("torch", reason="learn trains with the train extra")
    hass = _hass_binary()
    mosquitto = fresh_broker.start()
    ha = HomeAssistant(hass, tmp_path / "ha", extra_config="recorder:\n  commit_interval: 1\nhistory:\n")
    sim = Simulator(SimConfig(speed=SPEED, devices=plugs, seed=4, families=("z2m_plug",), mains="shelly"))
    plug, mains = sim.devices[0], sim.devices[-1]
    assert plug.name.endswith("fridge_freezer") and mains.family == "mains_shelly"
    prefix = "e2e"
    collector = Collector(mosquitto.url, f"zigbee2mqtt/{plug.name}", f"{prefix}/ei/nilm/#")
    sim_thread = SimThread(sim, mosquitto.url)
    daemon = None
    client = None
    try:
        ha.start()
        ha.onboard()
        ha.add_mqtt(mosquitto.port)
        assert ha.token is not None
        client = _publisher(mosquitto)
        # the user's integrations: the meter and the plug as Home Assistant sensors over MQTT
        for object_id, config in (
            (
                "mains_power",
                {
                    "name": "Power",
                    "unique_id": "e2e_mains_power",
                    "state_topic": f"{mains.name}/status/em1:0",
                    "value_template": "{{ value_json.act_power }}",
                    "availability_topic": f"{mains.name}/online",
                    "payload_available": "true",
                    "payload_not_available": "false",
                    "device_class": "power",
                    "unit_of_measurement": "W",
                    "state_class": "measurement",
                    "device": {"identifiers": ["e2e_mains"], "name": "Mains meter", "manufacturer": "Shelly"},
                },
            ),
            (
                "fridge_power",
                {
                    "name": "Power",
                    "unique_id": "e2e_fridge_power",
                    "state_topic": f"zigbee2mqtt/{plug.name}",
                    "value_template": "{{ value_json.power }}",
                    "availability_topic": f"zigbee2mqtt/{plug.name}/availability",
                    "availability_template": "{{ value_json.state }}",
                    "device_class": "power",
                    "unit_of_measurement": "W",
                    "state_class": "measurement",
                    "device": {"identifiers": ["e2e_fridge"], "name": "Fridge plug"},
                },
            ),
        ):
            _publish(client, f"homeassistant/sensor/e2e/{object_id}/config", json.dumps(config), retain=True)
        ha._wait(lambda: {MAINS_ENTITY, PLUG_ENTITY} <= set(ha.states()) or None, "the two sensors", 60)

        token_file = tmp_path / "ha.token"
        token_file.write_text(ha.token + "\n")
        token_file.chmod(0o600)
        model = window_classifier(tmp_path / "models" / "nilm.onnx", ["power"], WINDOW, ["off", "on"], seed=3)
        config_path = write_config(
            {
                "mqtt": fast_mqtt(mosquitto.url, prefix),
                "homeassistant": {"enabled": False},
                "reload": {"watch_models": True, "interval_s": 0.5},
                "models": {"nilm": {"path": str(model)}},
                "pipelines": {
                    "nilm": {
                        "model": "nilm",
                        "source": {"profile": "shelly"},
                        "inputs": {"power": "em1:0.act_power"},
                        "features": {"type": "window", "size": WINDOW, "max_gap_s": 30},
                        "output": {"publish": "always", "top_k": 0},
                        "learn": {
                            "source": {
                                "ha": {"url": f"http://127.0.0.1:{ha.port}", "token_file": str(token_file)}
                            },
                            "days": (RECORD_S + 120) / 86400,
                            "inputs": {mains.name: {"power": MAINS_ENTITY}},
                            "labels": {"teacher": {"entity": PLUG_ENTITY, "above": 5}},
                            "min_examples_per_class": 10,
                            "gate": {"margin": 0.02},
                            "train": {"epochs": 30, "threads": 1},
                            "work_dir": str(tmp_path / "learn"),
                        },
                    }
                },
            },
            tmp_path / "edge-infer.yaml",
        )
        daemon = spawn_daemon(config_path)
        sim_thread.start()
        time.sleep(RECORD_S)
        assert sim_thread.error is None, sim_thread.error
        predictions = f"{prefix}/ei/nilm/{mains.name}"
        old = [m for m in collector.messages if m.topic == predictions]
        if not old:
            daemon.terminate()
            pytest.fail(f"the daemon served nothing:\n{daemon.communicate(timeout=30)[0][-3000:]}")
        old_version = old[-1].json()["model_version"]

        started = time.monotonic()
        learned = subprocess.run(
            [sys.executable, "-m", "edge.cli", "learn", "-c", str(config_path), "nilm", "--json"],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=ROOT,
            env=dict(os.environ),
        )
        learn_s = time.monotonic() - started
        assert learned.returncode == 0, learned.stdout[-3000:] + learned.stderr[-5000:]
        assert ha.token not in learned.stdout + learned.stderr
        report = json.loads(learned.stdout[: learned.stdout.rindex("}") + 1])
        print(learned.stderr[-2000:], learned.stdout.splitlines()[-1])
        holdout = report["holdout"]

        # the running daemon picks up the new file
        def reloaded() -> list[Any] | None:
            new = [
                m.json()
                for m in collector.messages
                if m.topic == predictions and m.json()["model_version"] != old_version
            ]
            return new or None

        first_new = ha._wait(reloaded, "the daemon to serve the learned model", timeout=60)
        assert first_new[0]["model_version"].startswith("1.0.0+learn.")
        mark = len(collector.messages)
        time.sleep(SERVE_S)
        served = collector.messages[mark:]
    finally:
        sim_thread.stop()
        if daemon is not None:
            daemon.terminate()
            try:
                daemon.wait(30)
            except subprocess.TimeoutExpired:
                daemon.kill()
        if client is not None:
            for object_id in ("mains_power", "fridge_power"):
                _publish(client, f"homeassistant/sensor/e2e/{object_id}/config", "", retain=True)
            client.loop_stop()
            client.disconnect()
        collector.close()
        ha.stop()

    # each prediction against the fridge plug's power at the same step: the plug's message of a
    # step is published just before the meter's, the prediction follows the meter's
    truth: bool | None = None
    pairs: list[tuple[bool, bool]] = []
    for m in served:
        if m.topic == f"zigbee2mqtt/{plug.name}":
            truth = float(m.json()["power"]) > 5.0
        elif m.topic == predictions and truth is not None:
            pairs.append((m.json()["label"] == "on", truth))
    predicted = np.array([p for p, _ in pairs])
    actual = np.array([t for _, t in pairs])
    agreement = float((predicted == actual).mean())
    false_on = float(predicted[~actual].mean())
    missed = float((~predicted[actual]).mean())
    print(
        f"\nNILM e2e: learn {learn_s:.1f} s ({report['training']['seconds']:.1f} s training, peak RSS "
        f"{report['training']['peak_rss_mb']:.0f} MB), {report['examples']} examples; holdout "
        f"n={holdout['n']} accuracy {holdout['candidate']['accuracy']:.4f} macro-F1 "
        f"{holdout['candidate']['macro_f1']:.4f} (baseline {holdout['baseline']['macro_f1']:.4f}, deployed "
        f"{holdout['deployed']['macro_f1']:.4f}); served {len(pairs)} predictions after the reload: "
        f"agreement {agreement:.4f}, false-on {false_on:.4f}, missed-on {missed:.4f} ({plugs} plugs)"
    )
    assert report["gate"]["promote"] is True
    assert len(pairs) > SERVE_S * SPEED / 10 * 0.6
    assert actual.any() and (~actual).any()
    majority = max(actual.mean(), 1 - actual.mean())
    assert agreement > majority, (agreement, majority, false_on, missed)
    if plugs == 2:
        assert agreement >= 0.9, (agreement, false_on, missed)
        assert false_on <= 0.1


def test_ha_ws_and_recorder_copy_give_the_identical_training_table(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """learn's table from the WebSocket source equals the one from the recorder copy, on a
    shorter recording of the same simulated home (no training)."""
    hass = _hass_binary()
    ha = HomeAssistant(hass, tmp_path / "ha", extra_config="recorder:\n  commit_interval: 1\nhistory:\n")
    sim = Simulator(SimConfig(speed=40, devices=1, seed=4, families=("z2m_plug",), mains="shelly"))
    plug, mains = sim.devices
    client = None
    sim_thread = SimThread(sim, mosquitto.url)
    prefix = f"t{int(time.time() * 1000) % 10**8}"
    try:
        ha.start()
        ha.onboard()
        ha.add_mqtt(mosquitto.port)
        assert ha.token is not None
        client = _publisher(mosquitto)
        for object_id, topic, template, name in (
            ("mains", f"{mains.name}/status/em1:0", "{{ value_json.act_power }}", "Mains meter"),
            ("fridge", f"zigbee2mqtt/{plug.name}", "{{ value_json.power }}", "Fridge plug"),
        ):
            config = {
                "name": "Power",
                "unique_id": f"{prefix}_{object_id}",
                "state_topic": topic,
                "value_template": template,
                "device_class": "power",
                "unit_of_measurement": "W",
                "device": {"identifiers": [f"{prefix}_{object_id}"], "name": name},
            }
            _publish(
                client, f"homeassistant/sensor/{prefix}/{object_id}/config", json.dumps(config), retain=True
            )
        ha._wait(lambda: {MAINS_ENTITY, PLUG_ENTITY} <= set(ha.states()) or None, "the two sensors", 60)
        token_file = tmp_path / "ha.token"
        token_file.write_text(ha.token)
        config_path = write_config(
            {
                "mqtt": {"url": mosquitto.url},
                "models": {"nilm": {"path": str(tmp_path / "nilm.onnx")}},  # none yet: the config's spec
                "pipelines": {
                    "nilm": {
                        "model": "nilm",
                        "source": {"profile": "shelly"},
                        "inputs": {"power": "em1:0.act_power"},
                        "features": {"type": "window", "size": WINDOW, "max_gap_s": 30},
                        "learn": {
                            "source": {
                                "ha": {"url": f"http://127.0.0.1:{ha.port}", "token_file": str(token_file)}
                            },
                            "days": 0.01,
                            "inputs": {mains.name: {"power": MAINS_ENTITY}},
                            "labels": {"teacher": {"entity": PLUG_ENTITY, "above": 5}},
                        },
                    }
                },
            },
            tmp_path / "edge-infer.yaml",
        )
        sim_thread.start()
        time.sleep(20)
        sim_thread.stop()
        time.sleep(2.5)  # the recorder commits every second
        from edge.learn.run import make_table

        config = load_config(config_path)
        now = time.time()
        with HaWebSocketSource(url=f"http://127.0.0.1:{ha.port}", token=ha.token) as ws:
            over_ws, _ = make_table("nilm", config, now, ws)
        copy = copy_recorder_db(tmp_path / "ha" / "home-assistant_v2.db", tmp_path / "copy.db")
        with RecorderDbSource(path=copy) as db:
            from_db, _ = make_table("nilm", config, now, db)
    finally:
        sim_thread.stop()
        if client is not None:
            for object_id in ("mains", "fridge"):
                _publish(client, f"homeassistant/sensor/{prefix}/{object_id}/config", "", retain=True)
            client.loop_stop()
            client.disconnect()
        ha.stop()
    assert len(over_ws) > 20
    assert set(over_ws.labels) == {"on", "off"}
    assert over_ws.labels == from_db.labels
    assert np.array_equal(over_ws.ts, from_db.ts)
    assert np.array_equal(over_ws.x, from_db.x)
    assert over_ws.devices == from_db.devices == [mains.name] * len(over_ws)
