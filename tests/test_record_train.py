"""The training loop closed on a real broker: ``record`` -> ``train`` -> the daemon loads the result.

The simulated home's wearables replay BasicMotions IMU data on ``wearables/<name>/imu``; the
simulator's retained truth (``edge-infer-sim/truth/<name>``, JSON with ``label``) is the label
topic, as a Home Assistant ``input_select`` mirrored to MQTT would be. ``edge-infer record``
captures the windows the pipeline would feed a model that does not exist yet, ``edge-infer
train`` trains a small model on that file and exports it to where the same config expects it,
and ``edge-infer models show`` / ``edge-infer check`` accept it.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from devices.simulate import SimConfig, Simulator
from tests.broker import Mosquitto
from tests.harness import ROOT, write_config

pytestmark = pytest.mark.broker

CHANNELS = ["acc_x", "acc_y", "acc_z", "gyro_x", "gyro_y", "gyro_z"]
AXES = ["accel.x", "accel.y", "accel.z", "gyro.x", "gyro.y", "gyro.z"]
WINDOW = 20
ROWS = 240


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge.cli", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def test_record_then_train_then_serve(fresh_broker: Mosquitto, tmp_path: Path) -> None:
    pytest.importorskip("torch", reason="edge-infer train needs torch (the train extra)")
    pytest.importorskip("onnx", reason="edge-infer train needs onnx (the train extra)")
    broker = fresh_broker.start()
    out_dir = tmp_path / "model"
    model_path = out_dir / "wrist.fp32.onnx"  # what train --export will write
    config = write_config(
        {
            "mqtt": {"url": broker.url},
            "homeassistant": {"enabled": False},
            "models": {"wrist": {"path": str(model_path)}},
            "pipelines": {
                "activity": {
                    "model": "wrist",
                    "source": {
                        "profile": "json",
                        "topics": ["wearables/{device}/imu"],
                        "timestamp_field": "ts",
                        "availability_topic": "wearables/{device}/status",
                    },
                    "inputs": dict(zip(CHANNELS, AXES, strict=True)),
                    "features": {"type": "window", "size": WINDOW, "hop": 10},
                }
            },
        },
        tmp_path / "wrist.yaml",
    )
    recording = tmp_path / "recording.csv"
    # Four wearables, one per activity (device i replays a series of class i % 4), at 20x: 200 IMU
    # messages a second each, a row per device every 10 samples.
    sim_config = SimConfig(speed=20.0, imu_speed=20.0, devices=4, seed=2, families=("wearable",))
    truth = {d.name: d.truth["label"] for d in Simulator(sim_config).devices}
    assert len(set(truth.values())) == 4
    record = subprocess.Popen(
        [
            sys.executable, "-m", "edge.cli", "record", "-c", str(config), "--out", str(recording),
            "--label-topic", "edge-infer-sim/truth/{device}", "--label-field", "label",
            "--max-rows", str(ROWS), "--duration", "60", "--quiet",
        ],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    simulate = None
    try:
        # the recorder's status goes online once it is connected and subscribed
        _wait_online(broker, "edge-infer/record/status")
        simulate = subprocess.Popen(
            [
                sys.executable, "-m", "edge.cli", "simulate", "--mqtt-url", broker.url,
                "--speed", "20", "--imu-speed", "20", "--devices", "4", "--seed", "2",
                "--families", "wearable",
            ],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        _, err = record.communicate(timeout=90)
    finally:
        for proc in (record, simulate):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(10)
    assert record.returncode == 0, err
    assert f"recorded {ROWS} rows of {WINDOW * len(CHANNELS)} features" in err

    rows = list(csv.DictReader(recording.open()))
    assert len(rows) == ROWS
    assert list(rows[0])[:4] == ["ts", "device", "pipeline", "label"]
    assert list(rows[0])[4:10] == [f"{c}@0" for c in CHANNELS]
    assert {r["device"] for r in rows} == set(truth)
    assert all(r["label"] == truth[r["device"]] for r in rows)  # labels from the truth topic

    trained = _cli(
        "train", "--name", "wrist", "--data", str(recording), "--layout", "window",
        "--features", ",".join(CHANNELS), "--family", "mlp", "--hidden", "16", "--epochs", "3",
        "--split", "random", "--sample-period", "0.1", "--out", str(out_dir), "--export", "--no-progress",
        timeout=300,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stdout + trained.stderr
    assert model_path.is_file()
    report = json.loads((out_dir / "report.json").read_text())
    assert set(report["metrics"]) >= {"pytorch", "fp32"}
    assert (out_dir / "card.md").is_file()

    shown = _cli("models", "show", str(model_path))
    assert shown.returncode == 0, shown.stderr
    assert f"window {WINDOW}" in shown.stdout
    assert "labels  " in shown.stdout
    for label in truth.values():
        assert label in shown.stdout

    # the config that recorded the data now runs the model trained on it
    checked = _cli("check", "-c", str(config))
    assert checked.returncode == 0, checked.stderr
    assert "config OK" in checked.stdout


def _wait_online(broker: Mosquitto, topic: str) -> None:
    from tests.harness import Collector

    collector = Collector(broker.url, topic)
    try:
        collector.wait(lambda ms: any(m.payload == b"online" for m in ms), timeout=30)
    finally:
        collector.close()
