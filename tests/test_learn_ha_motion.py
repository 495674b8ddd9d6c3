"""The occupancy path end to end against a real Home Assistant Core: motion teaches the climate sensors.

The simulated home (devices/simulate.py) runs two rooms, a home office and a living room, at
``SPEED`` times real time (a simulated minute every 0.1 s) on the test's own Mosquitto: each a
Zigbee2MQTT climate sensor (temperature, humidity, illuminance, CO₂) and, from
devices/motion.py, a Zigbee2MQTT PIR motion sensor fed by the room's true occupancy. Home
Assistant (``recorder:`` and ``history:`` on SQLite) has them as MQTT sensors and binary
sensors, so its recorder stores their states with real timestamps. A daemon serves an
occupancy pipeline on the climate sensors with a poor model. Then ``edge-infer learn`` reads the
history over the WebSocket API, labels each window with the motion teacher (``any_on`` the
room's motion sensor ``within_s`` ten simulated minutes), trains in its own process, passes the
gate and deploys; the running daemon hot-reloads, and its predictions on the following
simulated hours are compared with the simulator's truth (the room's occupancy), side by side
with the majority baseline and the teacher itself. The same history read from a copy of the
recorder's SQLite file gives the identical training table.

One clock for both sides: Home Assistant stamps a state when it receives it, so the daemon
reads the rooms as generic JSON stamped on arrival (profile ``json``), on a grid of
``60 / SPEED`` wall seconds (a simulated minute). At home the ``zigbee2mqtt`` profile does this
with Zigbee2MQTT's ``last_seen``; the sped-up simulator stamps ``last_seen`` in simulated time,
which runs ahead of the wall clock.

Needs ``EDGE_INFER_HA_VENV`` (tests/test_ha_real.py) and the train extra (torch).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from devices.motion import add_motion_sensors
from devices.simulate import TRUTH_PREFIX, SimConfig, Simulator
from edge.config import load_config
from edge.learn.ha_ws import HaWebSocketSource
from edge.learn.recorder_db import RecorderDbSource, copy_recorder_db
from tests.broker import Mosquitto
from tests.harness import ROOT, Collector, fast_mqtt, spawn_daemon, write_config
from tests.onnx_models import window_classifier
from tests.test_ha_real import HomeAssistant, _hass_binary, _publish, _publisher
from tests.test_learn_ha_e2e import SimThread

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.torch, pytest.mark.timeout(1200)]

SPEED = 600.0  # a simulated minute (one room sample) every 0.1 s
PERIOD_S = 60.0 / SPEED  # the pipeline's grid in wall seconds: one simulated minute
WINDOW = 11  # ten simulated minutes, as the bundled occupancy model
WITHIN_S = 600.0 / SPEED  # the teacher: motion within the last ten simulated minutes
RECORD_S = 150.0  # wall seconds of history before learning (25 simulated hours)
SERVE_S = 45.0  # wall seconds of predictions compared with the truth after the reload
SEED = 7
CHANNELS = ["temperature", "humidity", "illuminance", "co2"]
SENSORS = {  # model feature -> (entity name, device class, unit)
    "temperature": ("Temperature", "temperature", "°C"),
    "humidity": ("Humidity", "humidity", "%"),
    "illuminance": ("Illuminance", "illuminance", "lx"),
    "co2": ("CO2", "carbon_dioxide", "ppm"),
}


def _discovery(room: str) -> list[tuple[str, dict[str, Any]]]:
    """The user's integrations: a room's climate sensor and its PIR as MQTT entities of one
    Home Assistant device named after the room (so ``sensor.<room>_co2``, ``binary_sensor.<room>_motion``)."""
    device = {"identifiers": [f"sim_{room}"], "name": room, "manufacturer": "edge-infer simulator"}
    out: list[tuple[str, dict[str, Any]]] = []
    for feature, (name, device_class, unit) in SENSORS.items():
        out.append(
            (
                f"homeassistant/sensor/{room}/{feature}/config",
                {
                    "name": name,
                    "unique_id": f"{room}_{feature}",
                    "state_topic": f"zigbee2mqtt/{room}",
                    "value_template": f"{{{{ value_json.{feature} }}}}",
                    "availability_topic": f"zigbee2mqtt/{room}/availability",
                    "availability_template": "{{ value_json.state }}",
                    "device_class": device_class,
                    "unit_of_measurement": unit,
                    "state_class": "measurement",
                    "device": device,
                },
            )
        )
    out.append(
        (
            f"homeassistant/binary_sensor/{room}/motion/config",
            {
                "name": "Motion",
                "unique_id": f"{room}_motion",
                "state_topic": f"zigbee2mqtt/{room}/motion",
                "value_template": "{{ 'ON' if value_json.occupancy else 'OFF' }}",
                "availability_topic": f"zigbee2mqtt/{room}/motion/availability",
                "availability_template": "{{ value_json.state }}",
                "device_class": "motion",
                "device": device,
            },
        )
    )
    return out


def _entities(room: str) -> dict[str, str]:
    return {feature: f"sensor.{room}_{feature}" for feature in SENSORS}


def _pipeline(rooms: list[str], ha_url: str, token_file: Path, work_dir: Path) -> dict[str, Any]:
    return {
        "model": "occupancy",
        # one segment: the rooms, not their PIRs (<room>/motion) nor availability or bridge topics
        "source": {"profile": "json", "topics": ["zigbee2mqtt/{device}"]},
        "inputs": {c: c for c in CHANNELS},
        "features": {
            "type": "window",
            "size": WINDOW,
            "resample_period_s": PERIOD_S,
            "max_gap_s": 30 * PERIOD_S,
        },
        "output": {"publish": "always", "top_k": 0},
        "learn": {
            "source": {"ha": {"url": ha_url, "token_file": str(token_file)}},
            "days": (RECORD_S + 120) / 86400,
            "inputs": {room: _entities(room) for room in rooms},
            "labels": {
                "teacher": {
                    "any_on": ["binary_sensor.{device}_motion"],
                    "within_s": WITHIN_S,
                    "on": "occupied",
                    "off": "empty",
                }
            },
            "min_examples_per_class": 20,
            "gate": {"margin": 0.02},
            "train": {"epochs": 30, "threads": 1},
            "work_dir": str(work_dir),
        },
    }


def _score(
    messages: list[Any], rooms: list[str], predictions: str, start: int = 0, end: int | None = None
) -> dict[str, np.ndarray]:
    """Each prediction in ``messages[start:end]`` beside the room's truth and the teacher at the
    same step, by message order: the simulator publishes a room's truth (retained, on change) and
    its climate sample, then its PIR; the daemon's prediction follows the climate sample it was
    triggered by. The truth and the PIR are followed from the first message on."""
    truth: dict[str, bool] = {}
    since_motion: dict[str, int] = {}  # PIR samples since the last one that saw motion
    hold = round(WITHIN_S / PERIOD_S)
    rows: list[tuple[bool, bool, bool]] = []
    for index, m in enumerate(messages[:end]):
        if m.topic.startswith(f"{TRUTH_PREFIX}/"):
            room = m.topic[len(TRUTH_PREFIX) + 1 :]
            state = m.json()
            if room in rooms and "occupancy" in state:  # the announcement before the first step has none
                truth[room] = bool(state["occupancy"])
        elif m.topic.endswith("/motion") and m.topic.startswith("zigbee2mqtt/"):
            room = m.topic[len("zigbee2mqtt/") : -len("/motion")]
            since_motion[room] = 0 if m.json()["occupancy"] else since_motion.get(room, hold + 1) + 1
        elif m.topic.startswith(f"{predictions}/"):
            room = m.topic[len(predictions) + 1 :]
            if index >= start and room in rooms and room in truth and room in since_motion:
                teacher = since_motion[room] <= hold
                rows.append((m.json()["label"] == "occupied", truth[room], teacher))
    array = np.array(rows, dtype=bool).reshape(-1, 3)
    return {"predicted": array[:, 0], "truth": array[:, 1], "teacher": array[:, 2]}


def test_motion_teaches_the_climate_sensors_through_home_assistant(
    tmp_path: Path, fresh_broker: Mosquitto
) -> None:
    pytest.importorskip("torch", reason="learn trains with the train extra")
    hass = _hass_binary()
    mosquitto = fresh_broker.start()
    ha = HomeAssistant(hass, tmp_path / "ha", extra_config="recorder:\n  commit_interval: 1\nhistory:\n")
    sim = Simulator(SimConfig(speed=SPEED, devices=2, seed=SEED, families=("z2m_climate",)))
    pirs = add_motion_sensors(sim, seed=SEED)
    rooms = [d.name for d in sim.devices if d.family == "z2m_climate"]
    assert [p.name for p in pirs] == [f"{r}/motion" for r in rooms]
    prefix = "motion"
    predictions = f"{prefix}/ei/occupancy"
    collector = Collector(mosquitto.url, f"{TRUTH_PREFIX}/+", "zigbee2mqtt/+/motion", f"{predictions}/#")
    sim_thread = SimThread(sim, mosquitto.url)
    daemon = None
    client = None
    discovery = [item for room in rooms for item in _discovery(room)]
    try:
        ha.start()
        ha.onboard()
        ha.add_mqtt(mosquitto.port)
        assert ha.token is not None
        client = _publisher(mosquitto)
        for topic, config in discovery:
            _publish(client, topic, json.dumps(config), retain=True)
        wanted = {e for room in rooms for e in [*_entities(room).values(), f"binary_sensor.{room}_motion"]}
        ha._wait(lambda: wanted <= set(ha.states()) or None, "the rooms' ten entities", 60)

        token_file = tmp_path / "ha.token"
        token_file.write_text(ha.token + "\n")
        token_file.chmod(0o600)
        model = window_classifier(
            tmp_path / "models" / "occupancy.onnx", CHANNELS, WINDOW, ["empty", "occupied"], seed=3
        )
        ha_url = f"http://127.0.0.1:{ha.port}"
        config_path = write_config(
            {
                "mqtt": fast_mqtt(mosquitto.url, prefix),
                "homeassistant": {"enabled": False},
                "reload": {"watch_models": True, "interval_s": 0.5},
                "models": {"occupancy": {"path": str(model)}},
                "pipelines": {"occupancy": _pipeline(rooms, ha_url, token_file, tmp_path / "learn")},
            },
            tmp_path / "edge-infer.yaml",
        )
        config = load_config(config_path)  # a config error shows now, not after the recording
        daemon = spawn_daemon(config_path)
        sim_thread.start()
        time.sleep(RECORD_S)
        assert sim_thread.error is None, sim_thread.error
        answers = {f"{predictions}/{room}" for room in rooms}  # not the daemon's status topics below
        old = [m for m in collector.messages if m.topic in answers]
        if not old:
            daemon.terminate()
            pytest.fail(f"the daemon served nothing:\n{daemon.communicate(timeout=30)[0][-3000:]}")
        old_version = old[-1].json()["model_version"]
        before = _score(list(collector.messages), rooms, predictions)

        learn_at = time.time()
        learned = subprocess.run(
            [sys.executable, "-m", "edge.cli", "learn", "-c", str(config_path), "occupancy", "--json"],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=ROOT,
            env=dict(os.environ),
        )
        learn_s = time.time() - learn_at
        assert learned.returncode == 0, learned.stdout[-3000:] + learned.stderr[-5000:]
        assert ha.token not in learned.stdout + learned.stderr
        report = json.loads(learned.stdout[: learned.stdout.rindex("}") + 1])
        print(learned.stderr[-2500:])

        def reloaded() -> list[Any] | None:
            new = [
                m.json()
                for m in collector.messages
                if m.topic in answers and m.json()["model_version"] != old_version
            ]
            return new or None

        first_new = ha._wait(reloaded, "the daemon to serve the learned model", timeout=60)
        assert first_new[0]["model_version"].startswith("1.0.0+learn.")
        mark = len(collector.messages)
        time.sleep(SERVE_S)
        messages = list(collector.messages)
        sim_thread.stop()
        assert sim_thread.error is None, sim_thread.error

        # the same history from a copy of the recorder's SQLite file: the identical table
        time.sleep(2.5)  # the recorder commits every second
        from edge.learn.run import make_table

        with HaWebSocketSource(url=ha_url, token=ha.token) as ws:
            over_ws, _ = make_table("occupancy", config, learn_at, ws)
        copy = copy_recorder_db(tmp_path / "ha" / "home-assistant_v2.db", tmp_path / "copy.db")
        with RecorderDbSource(path=copy) as db:
            from_db, _ = make_table("occupancy", config, learn_at, db)
    finally:
        sim_thread.stop()
        if daemon is not None:
            daemon.terminate()
            try:
                daemon.wait(30)
            except subprocess.TimeoutExpired:
                daemon.kill()
        if client is not None:
            for topic, _config in discovery:
                _publish(client, topic, "", retain=True)
            client.loop_stop()
            client.disconnect()
        collector.close()
        ha.stop()

    assert len(over_ws) > 1000
    assert set(over_ws.labels) == {"occupied", "empty"}
    assert over_ws.labels == from_db.labels
    assert np.array_equal(over_ws.ts, from_db.ts)
    assert np.array_equal(over_ws.x, from_db.x)
    assert over_ws.devices == from_db.devices

    after = _score(messages, rooms, predictions, start=mark)
    predicted, truth, teacher = after["predicted"], after["truth"], after["teacher"]
    accuracy = float((predicted == truth).mean())
    majority = float(max(truth.mean(), 1 - truth.mean()))
    teacher_accuracy = float((teacher == truth).mean())
    agreement = float((predicted == teacher).mean())
    old_accuracy = float((before["predicted"] == before["truth"]).mean())
    false_on = float(predicted[~truth].mean())
    missed = float((~predicted[truth]).mean())
    holdout = report["holdout"]
    print(
        f"\noccupancy e2e: learn {learn_s:.1f} s ({report['training']['seconds']:.1f} s training, peak RSS "
        f"{report['training']['peak_rss_mb']:.0f} MB), {report['examples']} examples, table over WS == "
        f"recorder copy ({len(over_ws)} rows); holdout (teacher's labels) n={holdout['n']} accuracy "
        f"{holdout['candidate']['accuracy']:.4f} macro-F1 {holdout['candidate']['macro_f1']:.4f} (baseline "
        f"{holdout['baseline']['macro_f1']:.4f}, deployed {holdout['deployed']['macro_f1']:.4f}); served "
        f"{len(truth)} predictions after the reload ({truth.mean():.2f} occupied): accuracy vs truth "
        f"{accuracy:.4f}, majority baseline {majority:.4f}, the teacher itself {teacher_accuracy:.4f}, "
        f"agreement with the teacher {agreement:.4f}, false-occupied {false_on:.4f}, missed {missed:.4f}; "
        f"the poor model before: {old_accuracy:.4f} on {len(before['truth'])}"
    )
    assert report["gate"]["promote"] is True
    assert len(truth) > SERVE_S / PERIOD_S * len(rooms) * 0.5
    assert truth.any() and (~truth).any()
    assert accuracy >= majority + 0.05, (accuracy, majority, teacher_accuracy)
    assert accuracy >= 0.8, (accuracy, false_on, missed)
    assert accuracy > old_accuracy
