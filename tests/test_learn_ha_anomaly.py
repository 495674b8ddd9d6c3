"""An anomaly model learned through a real Home Assistant Core from a healthy fridge, no labels.

A fridge plug's power (devices/faults.py's healthy fridge, one reading every ``SIM_PERIOD_S``
simulated seconds) is published at ``SPEED`` times real time to the test's own Mosquitto, where
Home Assistant (``recorder:`` and ``history:`` on SQLite) has it as an MQTT power sensor, so its
recorder stores the states with real timestamps. ``edge-infer learn`` reads the history over the
WebSocket API, takes every window as normal, trains the autoencoder in its own process, sets
the threshold on the validation block for the target false alarms a day, passes the gate on the
newest block and deploys. A daemon started on the learned file then watches the same plug live:
healthy readings raise no alarm, and when the compressor gets stuck on the problem sensor goes on.
The same history read from a copy of the recorder's SQLite file gives the identical table.

One clock: Home Assistant stamps a state when it receives it, so the pipeline resamples onto a
grid of ``WALL_PERIOD_S`` wall seconds and its model counts "days" on that clock: the target is
0.1 false alarms a simulated day, ``0.1 * SPEED`` a wall day.

Needs ``EDGE_INFER_HA_VENV`` (tests/test_ha_real.py) and the train extra (torch).
"""

from __future__ import annotations

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

from devices.faults import fridge_power
from edge.config import load_config
from edge.learn.ha_ws import HaWebSocketSource
from edge.learn.recorder_db import RecorderDbSource, copy_recorder_db
from edge.manifest import read_manifest
from tests.broker import Mosquitto
from tests.harness import ROOT, Collector, fast_mqtt, spawn_daemon, write_config
from tests.test_ha_real import HomeAssistant, _hass_binary, _publish, _publisher

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.torch, pytest.mark.timeout(1200)]

SIM_PERIOD_S = 120.0  # a reading every two simulated minutes
SPEED = 3000.0
WALL_PERIOD_S = SIM_PERIOD_S / SPEED  # published every 40 ms
WINDOW, HOP = 60, 5  # two simulated hours, a score every ten simulated minutes
HEALTHY_DAYS = 6.0  # simulated days recorded before learning (~3 wall minutes)
TOPIC = "plug/fridge/power"
ENTITY = "sensor.fridge_power"


class Feeder(threading.Thread):
    """Publishes ``series`` on TOPIC, one reading every WALL_PERIOD_S (absolute schedule)."""

    def __init__(self, client: Any, series: np.ndarray) -> None:
        super().__init__(daemon=True)
        self.client, self.series = client, series
        self.sent = 0
        self.stop = threading.Event()

    def run(self) -> None:
        start = time.monotonic()
        for i, watts in enumerate(self.series):
            if self.stop.is_set():
                return
            delay = start + i * WALL_PERIOD_S - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self.client.publish(TOPIC, json.dumps({"power": round(float(watts), 1)}), qos=0)
            self.sent += 1


def _discovery() -> tuple[str, dict[str, Any]]:
    return (
        "homeassistant/sensor/fridge_plug/power/config",
        {
            "name": "Power",
            "unique_id": "fridge_plug_power",
            "state_topic": TOPIC,
            "value_template": "{{ value_json.power }}",
            "device_class": "power",
            "unit_of_measurement": "W",
            "state_class": "measurement",
            "device": {
                "identifiers": ["sim_fridge"],
                "name": "fridge",
                "manufacturer": "edge-infer simulator",
            },
        },
    )


def _config(tmp_path: Path, mqtt_url: str, ha_url: str, token_file: Path) -> Path:
    return write_config(
        {
            "mqtt": fast_mqtt(mqtt_url, "anomaly"),
            "homeassistant": {"enabled": False},
            "models": {"fridge": {"path": str(tmp_path / "models" / "fridge.onnx")}},
            "pipelines": {
                "fridge": {
                    "model": "fridge",
                    # the plug's own topic, stamped on arrival (as Home Assistant stamps it)
                    "source": {"profile": "json", "topics": ["plug/{device}/power"]},
                    "inputs": {"power": "power"},
                    "features": {
                        "type": "window",
                        "size": WINDOW,
                        "hop": HOP,
                        "resample_period_s": WALL_PERIOD_S,
                        "max_gap_s": 50 * WALL_PERIOD_S,
                    },
                    "output": {"publish": "always"},
                    "learn": {
                        "source": {"ha": {"url": ha_url, "token_file": str(token_file)}},
                        "days": (HEALTHY_DAYS * 86400 / SPEED + 60) / 86400,
                        "inputs": {"fridge": {"power": ENTITY}},
                        "min_examples_per_class": 50,
                        "val_fraction": 0.35,
                        "anomaly": {"false_alarms_per_day": 0.1 * SPEED, "view": "sorted_steps"},
                        "train": {"threads": 1},
                        "work_dir": str(tmp_path / "learn"),
                    },
                }
            },
        },
        tmp_path / "edge-infer.yaml",
    )


def test_a_healthy_fridge_teaches_its_anomaly_model_through_home_assistant(
    tmp_path: Path, fresh_broker: Mosquitto
) -> None:
    pytest.importorskip("torch", reason="learn trains with the train extra")
    hass = _hass_binary()
    mosquitto = fresh_broker.start()
    ha = HomeAssistant(hass, tmp_path / "ha", extra_config="recorder:\n  commit_interval: 1\nhistory:\n")
    healthy = fridge_power(int(HEALTHY_DAYS * 86400 / SIM_PERIOD_S), np.random.default_rng(11), SIM_PERIOD_S)
    # live, after learning: a simulated day healthy, then the compressor stuck on for half a day
    live = fridge_power(
        int(1.5 * 86400 / SIM_PERIOD_S), np.random.default_rng(12), SIM_PERIOD_S, "fridge_stuck_on", 86400.0
    )
    onset_index = int(86400 / SIM_PERIOD_S)
    answers = "anomaly/ei/fridge/fridge"
    collector = Collector(mosquitto.url, answers)
    client = None
    daemon = None
    topic, discovery = _discovery()
    try:
        ha.start()
        ha.onboard()
        ha.add_mqtt(mosquitto.port)
        assert ha.token is not None
        client = _publisher(mosquitto)
        _publish(client, topic, json.dumps(discovery), retain=True)
        _publish(client, TOPIC, json.dumps({"power": 2.0}))
        ha._wait(lambda: ENTITY in ha.states() or None, ENTITY, 60)
        token_file = tmp_path / "ha.token"
        token_file.write_text(ha.token + "\n")
        token_file.chmod(0o600)
        ha_url = f"http://127.0.0.1:{ha.port}"
        config_path = _config(tmp_path, mosquitto.url, ha_url, token_file)
        config = load_config(config_path)  # a config error shows now, not after the recording

        feeder = Feeder(client, healthy)
        feeder.start()
        feeder.join()
        time.sleep(2.5)  # the recorder commits every second
        learn_at = time.time()
        learned = subprocess.run(
            [sys.executable, "-m", "edge.cli", "learn", "-c", str(config_path), "fridge", "--json"],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=ROOT,
            env=dict(os.environ),
        )
        assert learned.returncode == 0, learned.stdout[-3000:] + learned.stderr[-5000:]
        assert ha.token not in learned.stdout + learned.stderr
        report = json.loads(learned.stdout[: learned.stdout.rindex("}") + 1])
        print(learned.stderr[-2000:])

        # the same history from a copy of the recorder's SQLite file: the identical table
        from edge.learn.run import make_table

        with HaWebSocketSource(url=ha_url, token=ha.token) as ws:
            over_ws, _ = make_table("fridge", config, learn_at, ws)
        copy = copy_recorder_db(tmp_path / "ha" / "home-assistant_v2.db", tmp_path / "copy.db")
        with RecorderDbSource(path=copy) as db:
            from_db, _ = make_table("fridge", config, learn_at, db)

        # the learned file served live: healthy readings, then the compressor stuck on
        daemon = spawn_daemon(config_path)
        time.sleep(3.0)  # connected and subscribed
        live_feed = Feeder(client, live)
        live_feed.start()
        live_feed.join()
        time.sleep(1.0)
        messages = [m.json() for m in collector.messages]
    finally:
        if daemon is not None:
            daemon.terminate()
            try:
                daemon.wait(30)
            except subprocess.TimeoutExpired:
                daemon.kill()
        if client is not None:
            _publish(client, topic, "", retain=True)
            client.loop_stop()
            client.disconnect()
        collector.close()
        ha.stop()

    assert len(over_ws) > 0.8 * len(healthy) / HOP
    assert np.array_equal(over_ws.ts, from_db.ts) and np.array_equal(over_ws.x, from_db.x)
    assert report["task"] == "anomaly" and report["gate"]["promote"] is True
    assert report["examples"] == len(over_ws)
    manifest = read_manifest(tmp_path / "models" / "fridge.onnx")
    assert manifest is not None and manifest.task == "anomaly"
    assert manifest.input.window == WINDOW and manifest.input.sample_period_s == WALL_PERIOD_S
    card = (tmp_path / "models" / "fridge.onnx.card.md").read_text()
    assert "**Target**: 300 false alarms a day" in card and "Home Assistant" in card

    # answers in order; each is stamped with its reading's arrival: split at the onset by count
    assert len(messages) > 0.8 * (len(live) - WINDOW) / HOP, len(messages)
    flags = [bool(m["anomaly"]) for m in messages]
    onset_answer = max(0, (onset_index - WINDOW) // HOP)
    before, after = flags[:onset_answer], flags[onset_answer:]
    rises_before = sum(1 for i, f in enumerate(before) if f and (i == 0 or not before[i - 1]))
    print(
        f"\nfridge anomaly e2e: {report['examples']} windows over WS == recorder copy; test block "
        f"{report['holdout']['candidate']['false_alarms']} false alarms in "
        f"{report['holdout']['candidate']['days'] * SPEED:.2f} simulated days; live: {len(before)} healthy "
        f"answers with {rises_before} alarms, stuck on: first alarm after "
        f"{(after.index(True) if True in after else -1) * HOP * SIM_PERIOD_S / 3600:.2f} simulated h"
    )
    assert rises_before <= 1  # a simulated day at 0.1 a day: at most one, not a stream
    assert True in after, "the stuck compressor raised no alarm"
    assert after.index(True) * HOP * SIM_PERIOD_S <= 6 * 3600  # within 6 simulated hours
