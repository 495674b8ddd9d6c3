"""The bundled models: ONNX Runtime alone reproduces the accuracy their cards state.

Needs neither torch nor aeon: each ``models/<name>/test_split.npz`` holds the
official (appliance, activity) or held-out-room (occupancy) test inputs in raw
units, exactly as ``make models`` measured them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from edge.manifest import read_manifest

MODELS = Path(__file__).resolve().parent.parent / "models"
NAMES = sorted(p.parent.name for p in MODELS.glob("*/recipe.yaml"))
ACSF1_HEADER_ORDER = [
    "mobile_phone_charger",
    "coffee_machine",
    "computer_station",
    "fridge_freezer",
    "hifi_system",
    "lamp_cfl",
    "laptop_charger",
    "microwave_oven",
    "printer",
    "television",
]
GOALS = {"appliance": 0.90, "activity": 0.95}


def _report(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((MODELS / name / "report.json").read_text())
    return data


def _card_accuracy(name: str, row: str) -> float:
    card = (MODELS / name / "card.md").read_text()
    match = re.search(rf"^\| {row} \| ([0-9.]+) \|", card, re.MULTILINE)
    assert match, f"no '{row}' row in {name}/card.md"
    return float(match.group(1))


def _measure(path: Path, name: str, kind: str) -> tuple[float, int]:
    split = np.load(MODELS / name / "test_split.npz")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x, y = split["x"], split["y"]
    batch = 1 if kind == "int8" else 512  # dynamic int8 scales activations per batch: measured at batch 1
    probs = np.concatenate([sess.run(None, {"input": x[i : i + batch]})[0] for i in range(0, len(x), batch)])
    return float((probs.argmax(axis=1) == y).mean()), len(y)


def test_the_zoo_is_there() -> None:
    assert {"appliance", "activity", "occupancy"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", ["int8", "fp32"])
def test_accuracy_in_card_is_what_onnxruntime_measures(name: str, kind: str) -> None:
    accuracy, n = _measure(MODELS / name / f"{name}.{kind}.onnx", name, kind)
    stated = _report(name)["metrics"][kind]["accuracy"]
    # the same integers on every CPU (reduce_range); allow one sample for float ties across platforms
    assert abs(accuracy - stated) <= 1.0 / n + 1e-9, f"{name} {kind}: measured {accuracy}, card {stated}"
    assert abs(_card_accuracy(name, kind) - accuracy) <= 1.0 / n + 5e-5


@pytest.mark.parametrize("name", NAMES)
def test_goals_and_files(name: str) -> None:
    report = _report(name)
    fp32, int8 = report["metrics"]["fp32"]["accuracy"], report["metrics"]["int8"]["accuracy"]
    assert int8 >= fp32 - 0.01, "int8 must stay within 1 point of fp32"
    if name in GOALS:
        assert int8 >= GOALS[name]
    for path in (MODELS / name).iterdir():
        assert path.stat().st_size < 5 * 1024 * 1024, path
        assert not path.name.endswith(".onnx.data")
    if name == "appliance":  # weight-heavy: int8 must really be smaller
        assert report["files"]["int8"]["size_bytes"] <= 0.35 * report["files"]["fp32"]["size_bytes"]
        assert report["baseline"]["window"] == report["input"]["window"]
        for kind in ("fp32", "int8"):
            assert report["latency_single_thread"][kind]["batch_1"]["median_ms"] > 0


@pytest.mark.parametrize("name", NAMES)
def test_daemon_reads_manifest_raw_units_in_probabilities_out(name: str) -> None:
    for kind in ("fp32", "int8"):
        path = MODELS / name / f"{name}.{kind}.onnx"
        manifest = read_manifest(path)
        assert manifest is not None
        assert manifest.output.kind == "probabilities"
        assert manifest.normalisation.kind == "in_graph"
        assert all(f in manifest.input.units for f in manifest.input.features)
        assert (manifest.quantization is not None) == (kind == "int8")
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        x = np.load(MODELS / name / "test_split.npz")["x"]
        for batch in (1, 7):
            probs = sess.run(None, {"input": x[:batch]})[0]
            assert probs.shape == (batch, len(manifest.labels))
            np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-3)


def test_appliance_labels_follow_the_data_set_header() -> None:
    manifest = read_manifest(MODELS / "appliance" / "appliance.int8.onnx")
    assert manifest is not None
    assert manifest.labels == ACSF1_HEADER_ORDER
    assert manifest.input.layout == "window" and manifest.input.features == ["power"]
    assert manifest.input.units == {"power": "W"} and manifest.normalisation.per_window


def test_appliance_takes_raw_watts() -> None:
    """Per-window z-normalisation is in the graph: scaling watts does not change the answer."""
    path = MODELS / "appliance" / "appliance.fp32.onnx"
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.load(MODELS / "appliance" / "test_split.npz")["x"][:8]
    watts = x * 40.0 + 120.0  # a z-normalised trace back in plausible watts
    a = sess.run(None, {"input": x})[0]
    b = sess.run(None, {"input": watts.astype(np.float32)})[0]
    np.testing.assert_array_equal(a.argmax(1), b.argmax(1))
