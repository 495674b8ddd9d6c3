"""``edge-infer record`` against a real Mosquitto: features as the model would see them, with labels."""

from __future__ import annotations

import csv
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.broker import Mosquitto
from tests.harness import ROOT, Collector, Publisher, write_config

pytestmark = pytest.mark.broker


def record_config(url: str, prefix: str, tmp_path: Path) -> dict[str, Any]:
    return {
        "mqtt": {"url": url, "base_topic": f"{prefix}/ei"},
        "models": {"future": {"path": "not-trained-yet.onnx"}},
        "pipelines": {
            "plugs": {
                "model": "future",
                "source": {"topics": [f"{prefix}/tele/{{device}}/SENSOR"], "timestamp_field": "t"},
                "inputs": {"power": "ENERGY.Power", "voltage": "ENERGY.Voltage"},
                "features": {"type": "window", "size": 3, "hop": 3},
            }
        },
    }


def test_record_windows_with_per_device_labels(
    mosquitto: Mosquitto, topic_prefix: str, tmp_path: Path
) -> None:
    p = topic_prefix
    path = write_config(record_config(mosquitto.url, p, tmp_path), tmp_path / "c.yaml")
    out = tmp_path / "rec.csv"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edge.cli",
            "record",
            "-c",
            str(path),
            "--out",
            str(out),
            "--label-topic",
            f"{p}/label/{{device}}",
            "--label-field",
            "state",
            "--max-rows",
            "4",
            "--duration",
            "30",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Wait until the recorder is connected and subscribed (its status topic goes online).
        status = Collector(mosquitto.url, f"{p}/ei/record/status")
        status.wait(lambda m: any(x.payload == b"online" for x in m), timeout=20)
        time.sleep(0.3)
        pub = Publisher(mosquitto.url)
        pub.send(f"{p}/label/a", {"state": "kettle"})
        pub.send(f"{p}/label/b", {"state": "fridge"})
        for i in range(6):
            for device, base in (("a", 2000.0), ("b", 100.0)):
                pub.send(
                    f"{p}/tele/{device}/SENSOR",
                    {"t": 1_700_000_000 + i, "ENERGY": {"Power": base + i, "Voltage": 230 + i}},
                )
        pub.send(f"{p}/tele/a/SENSOR", "{broken")
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "recorded 4 rows of 6 features" in err
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == [
        "ts",
        "device",
        "pipeline",
        "label",
        "power@0",
        "voltage@0",
        "power@1",
        "voltage@1",
        "power@2",
        "voltage@2",
    ]
    by_device = {d: [r for r in rows if r["device"] == d] for d in ("a", "b")}
    assert [r["label"] for r in by_device["a"]] == ["kettle", "kettle"]
    assert [r["label"] for r in by_device["b"]] == ["fridge", "fridge"]
    first = by_device["a"][0]
    assert [float(first[f"power@{i}"]) for i in range(3)] == [2000.0, 2001.0, 2002.0]
    assert float(by_device["b"][1]["voltage@2"]) == 235.0
    assert first["ts"].startswith("2023-11-14T22:13:22")


def test_record_refuses_without_feature_names(tmp_path: Path) -> None:
    data = record_config("mqtt://127.0.0.1:1", "x", tmp_path)
    del data["pipelines"]["plugs"]["inputs"]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge.cli",
            "record",
            "-c",
            str(write_config(data, tmp_path / "c.yaml")),
            "--out",
            str(tmp_path / "o.csv"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "pipelines.plugs.inputs" in result.stderr
