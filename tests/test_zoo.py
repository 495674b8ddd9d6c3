"""The bundled models: ONNX Runtime alone reproduces the accuracy their cards state.

Needs neither torch nor aeon: each ``models/<name>/test_split.npz`` holds the
official (appliance, activity) or held-out-room (occupancy) test inputs in raw
units, exactly as ``make models`` measured them.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import onnx
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
        # the OOD branch is float constants in both files: the classifier's own weights are compared
        ood = {k: v["branch_bytes"] for k, v in report["ood"]["files"].items()}
        assert report["files"]["int8"]["size_bytes"] - ood["int8"] <= 0.35 * (
            report["files"]["fp32"]["size_bytes"] - ood["fp32"]
        )
        for kind in ("fp32", "int8"):
            size = (MODELS / name / f"{name}.{kind}.onnx").stat().st_size
            assert report["files"][kind]["size_bytes"] == size
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


# ---------------------------------------------------------------- issue 17: batch-independent int8


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", ["int8", "fp32"])
def test_answers_do_not_depend_on_batch_mates(name: str, kind: str) -> None:
    """A test row alone vs the same row inside batches of 7 and 64 other test rows: the same output."""
    sess = ort.InferenceSession(
        str(MODELS / name / f"{name}.{kind}.onnx"), providers=["CPUExecutionProvider"]
    )
    x = np.load(MODELS / name / "test_split.npz")["x"]
    rng = np.random.default_rng(7)
    worst = 0.0
    for batch in (7, 64):
        for i in rng.choice(len(x), 12, replace=False):
            alone = sess.run(None, {"input": x[i : i + 1]})[0][0]
            mates = rng.choice(np.delete(np.arange(len(x)), i), batch, replace=len(x) - 1 < batch)
            pos = int(rng.integers(batch))
            mates[pos] = i
            inside = sess.run(None, {"input": x[mates]})[0][pos]
            worst = max(worst, float(np.abs(inside - alone).max()))
    # float kernels may sum in another order at another batch size (appliance fp32: ~3e-5)
    assert worst <= 1e-4, f"{name} {kind}: a row's output moves by {worst:.2e} with its batch mates"
    report = _report(name)
    assert report["batch_independence"][kind]["independent"]
    if kind == "int8":
        q = report["files"]["int8"]["quantization"]
        assert q["mode"] == "static" and q["batch_independent"] is True
        # the scheme it replaced is shown beside it, and fails the same check
        assert report["int8_dynamic"]["batch_independence"]["independent"] is False


# ---------------------------------------------------------------- issue 22: calibrated probabilities

ECE_GOAL = 0.03


def _ece_nll(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> tuple[float, float]:
    conf, correct = probs.max(axis=1), probs.argmax(axis=1) == y
    edges = np.linspace(0.0, 1.0, bins + 1)
    total = 0.0
    for lo, hi in itertools.pairwise(edges):
        mask = (conf > lo) & (conf <= hi)
        if mask.any():
            total += mask.mean() * abs(correct[mask].mean() - conf[mask].mean())
    nll = float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, 1.0)).mean())
    return float(total), nll


def _card_row(name: str, row: str) -> list[str]:
    card = (MODELS / name / "card.md").read_text()
    match = re.search(rf"^\| {row} \| (.*) \|$", card, re.MULTILINE)
    assert match, f"no '{row}' row in {name}/card.md"
    return [c.strip() for c in match.group(1).split("|")]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", ["int8", "fp32"])
def test_calibration_figures_are_what_onnxruntime_measures(name: str, kind: str) -> None:
    """ECE and NLL recomputed from the committed test split with ONNX Runtime alone match the card."""
    split = np.load(MODELS / name / "test_split.npz")
    sess = ort.InferenceSession(
        str(MODELS / name / f"{name}.{kind}.onnx"), providers=["CPUExecutionProvider"]
    )
    probs = np.concatenate(
        [sess.run(None, {"input": split["x"][i : i + 64]})[0] for i in range(0, len(split["x"]), 64)]
    )
    ece, nll = _ece_nll(probs.astype(np.float64), split["y"])
    report = _report(name)
    stated = report["metrics"][kind]
    assert ece == pytest.approx(stated["ece"], abs=1e-3)
    assert nll == pytest.approx(stated["nll"], abs=1e-3)
    row = _card_row(name, kind)  # | kind | accuracy | macro-F1 | ECE | NLL | n |
    assert float(row[2]) == pytest.approx(ece, abs=1e-3) and float(row[3]) == pytest.approx(nll, abs=1e-3)
    cal = report["calibration"]["files"][kind]
    assert cal["test_after"]["ece"] == pytest.approx(stated["ece"], abs=1e-6)
    calibrated = _card_row(name, f"{kind} \\| {cal['temperature']:.3f}")  # the calibration table's row
    assert float(calibrated[1]) == pytest.approx(ece, abs=1e-3)
    # the temperature lives in the graph, and the manifest says where it came from
    path = MODELS / name / f"{name}.{kind}.onnx"
    folded = "calibration_temperature" in {n.name for n in onnx.load(str(path)).graph.node}
    manifest = read_manifest(path)
    assert manifest is not None
    if report["calibration"]["applied"]:
        assert folded
        assert manifest.provenance["calibration"]["temperature"] == pytest.approx(cal["temperature"])
    else:  # fitted and reported, not applied: the card says why
        assert not folded and cal["temperature"] == 1.0 and "not_applied" in cal
        assert report["calibration"]["note"] and report["calibration"]["note"][:60] in " ".join(
            (MODELS / name / "card.md").read_text().split()
        )


# appliance: 100 test series; a perfectly calibrated model with its confidences shows ECE ~0.07
# there (report.json: ece_if_perfectly_calibrated), and the only held-out outputs (the resample fits'
# and a cross-fit's) give a temperature that raises the test ECE (the card's calibration note).
# Strict: passing means update this.
ECE_GOAL_NOT_MET = {"appliance"}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(
            n,
            marks=pytest.mark.xfail(strict=True, reason="ECE goal below what 100 test series resolve"),
        )
        if n in ECE_GOAL_NOT_MET
        else n
        for n in NAMES
    ],
)
def test_ece_goal(name: str) -> None:
    for kind in ("fp32", "int8"):
        ece = _report(name)["metrics"][kind]["ece"]
        assert ece <= ECE_GOAL, f"{name} {kind}: ECE {ece:.4f} above the goal {ECE_GOAL}"


# ---------------------------------------------------------------- issue 22: `unknown` from every classifier


def _scores(path: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    outs = [sess.run(["probabilities", "ood_score"], {"input": x[i : i + 64]}) for i in range(0, len(x), 64)]
    return np.concatenate([o[0] for o in outs]), np.concatenate([o[1][:, 0] for o in outs])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", ["int8", "fp32"])
def test_ood_figures_are_what_onnxruntime_measures(name: str, kind: str) -> None:
    """Every served classifier has an ``ood_score`` with a threshold in its manifest; the flag rates,
    the accuracy with ``unknown`` counted wrong and the unlike-input figures in its report and card
    are what ONNX Runtime measures on the committed test split; known accuracy is unchanged."""
    from exporters.ood import auroc, served_ood_markdown, unlike_inputs

    path = MODELS / name / f"{name}.{kind}.onnx"
    manifest = read_manifest(path)
    assert manifest is not None
    record = manifest.provenance["ood"]
    assert record["output"] == "ood_score" and record["score"] == "feature_distance"
    report = _report(name)
    figures = report["ood"]["files"][kind]
    thr = record["threshold"]
    assert figures["threshold"] == pytest.approx(thr, rel=1e-9)
    split = np.load(MODELS / name / "test_split.npz")
    probs, known = _scores(path, split["x"])
    correct = probs.argmax(axis=1) == split["y"]
    flagged = known > thr
    assert float(correct.mean()) == pytest.approx(report["metrics"][kind]["accuracy"], abs=1e-9)
    assert float(flagged.mean()) == pytest.approx(figures["known_test_flagged"], abs=1e-9)
    assert float((correct & ~flagged).mean()) == pytest.approx(
        figures["accuracy_unknown_counted_wrong"], abs=1e-9
    )
    # the goal: most known inputs stay known (within the threshold's 5 % plus sampling noise)
    assert figures["known_test_flagged"] <= 0.05
    for probe, x in unlike_inputs(split["x"]).items():
        _, s = _scores(path, x)
        assert float((s > thr).mean()) == pytest.approx(figures["unlike"][probe]["flagged"], abs=1e-9)
        assert auroc(known, s) == pytest.approx(figures["unlike"][probe]["auroc_vs_known"], abs=1e-9)
    assert "\n".join(served_ood_markdown(report["ood"])) in (MODELS / name / "card.md").read_text()


def test_docs_carry_the_served_ood_figures() -> None:
    from exporters.zoo import served_open_set

    docs = (MODELS.parent / "docs" / "models.md").read_text()
    assert "\n".join(served_open_set([_report(n) for n in NAMES])) in docs
