"""zoo:fridge_anomaly and zoo:water_flow_anomaly: ONNX Runtime alone reproduces the figures their
cards and reports state, from the committed evaluation traces (models/<name>/test_split.npz);
zoo:appliance_open_set is the open-set file; docs/models.md lists them."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from devices.faults import FRIDGE_PERIOD_S
from edge import zoo
from edge.alarm import AlarmRule, episodes, gate
from edge.manifest import read_manifest

MODELS = Path(__file__).resolve().parent.parent / "models"
DIR = MODELS / "fridge_anomaly"
# the baselines, recomputed here in numpy: duty cycle above 10 W, the window's lowest flow (float32
# as the exporter's: a duty cycle of exactly the threshold compares the same)
BASELINES = {
    "fridge_anomaly": lambda x: (x > 10.0).mean(axis=1).astype(np.float32),
    "water_flow_anomaly": lambda x: x.min(axis=1),
}
ONSET_S = 2 * 86400.0


def _report(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((MODELS / name / "report.json").read_text())
    return data


def _windows(series: np.ndarray, window: int, hop: int) -> np.ndarray:
    ends = np.arange(window, len(series) + 1, hop)
    return np.stack([series[e - window : e] for e in ends])[:, :, None].astype(np.float32)


def _figures(  # noqa: PLR0917
    scores: dict[str, np.ndarray],
    threshold: float,
    n: dict[str, int],
    window: int,
    hop: int,
    faults: list[str],
    rule: AlarmRule,
) -> dict[str, Any]:
    """Alarms as the daemon publishes them (edge/alarm.py, the manifest's rule): false alarms are
    its episodes on the normal days, a delay is the first window after the onset with it on."""
    delays: dict[str, float | None] = {}
    for fault in faults:
        t = (np.arange(window, n[fault] + 1, hop) - 1.0) * FRIDGE_PERIOD_S
        hit = np.flatnonzero((t >= ONSET_S) & gate(scores[fault], threshold, rule))
        delays[fault] = None if len(hit) == 0 else round(float(t[hit[0]] - ONSET_S) / 3600.0, 2)
    alarms = episodes(gate(scores["normal"], threshold, rule))
    return {
        "false_alarms": alarms,
        "false_alarms_per_day": alarms / (n["normal"] * FRIDGE_PERIOD_S / 86400.0),
        "delays": delays,
    }


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_card_figures_are_what_onnxruntime_measures(name: str) -> None:
    report = _report(name)
    faults = report["faults"]
    window, hop = report["input"]["window"], report["input"]["hop"]
    split = np.load(MODELS / name / "test_split.npz")
    assert set(split.files) == {"normal", *faults}
    n = {k: len(split[k]) for k in split.files}
    path = MODELS / name / f"{name}.fp32.onnx"
    manifest = read_manifest(path)
    assert manifest is not None and manifest.task == "anomaly"
    rule = AlarmRule.from_record(manifest.provenance["alarm"], "provenance.alarm")
    assert rule.record() == report["alarm"] and rule.persist > 1  # the card's rule is the served one
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = {k: _windows(split[k], window, hop) for k in split.files}
    scores = {k: sess.run(["score"], {"input": x[k]})[0][:, 0] for k in split.files}
    base = {k: BASELINES[name](x[k][:, :, 0]) for k in split.files}
    card = (MODELS / name / "card.md").read_text()
    for row, stated, got in (
        (
            "fp32",
            report["metrics"]["fp32"],
            _figures(scores, report["metrics"]["fp32"]["threshold"], n, window, hop, faults, rule),
        ),
        (
            re.escape(report["baseline"]["name"]),
            report["baseline"],
            _figures(base, report["baseline"]["threshold"], n, window, hop, faults, rule),
        ),
    ):
        assert got["false_alarms_per_day"] == stated["test_false_alarms_per_day"]
        assert got["false_alarms"] == stated["test_false_alarms"]
        assert got["delays"] == stated["detection_delay_h"]
        match = re.search(rf"^\| {row} \| [0-9.e-]+ \| ([0-9.]+) \| [0-9.]+ \| (.*) \|$", card, re.MULTILINE)
        assert match, f"no {row} row in the card"
        assert float(match.group(1)) == round(got["false_alarms_per_day"], 3)
        cells = [c.strip() for c in match.group(2).split("|")]
        assert cells == [
            "missed" if got["delays"][f] is None else f"{got['delays'][f]:.2f} h" for f in faults
        ]
    # every fault is found, and the model's threshold is the one in the file's manifest
    assert all(d is not None for d in report["metrics"]["fp32"]["detection_delay_h"].values())
    assert manifest.threshold == report["metrics"]["fp32"]["threshold"]
    # the false-alarm figure: more than a week of test days, the count the card states
    fp32 = report["metrics"]["fp32"]
    days = n["normal"] * FRIDGE_PERIOD_S / 86400.0
    assert days == report["test_days"] > 7
    assert fp32["test_false_alarms"] == round(fp32["test_false_alarms_per_day"] * days)
    assert f"{days:g} test days" in card and f"{fp32['test_false_alarms']} false alarms" in card
    target = report["threshold"]["target_false_alarms_per_day"]
    assert ("within" if fp32["test_false_alarms_per_day"] <= target else "**above**") in card
    assert report["command"] in card and "Split:" in card


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_it_is_in_the_zoo(name: str) -> None:
    assert name in zoo.names()
    assert zoo.resolve(f"zoo:{name}").path == MODELS / name / f"{name}.fp32.onnx"
    summary = zoo.summary(name)
    assert summary["task"] == "anomaly" and summary["variants"] == ["fp32"]


def test_appliance_open_set_is_the_open_set_file_served_from_the_zoo() -> None:
    """zoo:appliance_open_set is models/appliance/open_set's feature-distance file (a link, so the
    figures tests/test_open_set_zoo.py recomputes are this file's), its report the same figures."""
    models = DIR.parent
    entry = models / "appliance_open_set"
    served = zoo.resolve("zoo:appliance_open_set").path
    source = models / "appliance" / "open_set" / "open_set.feature_distance.onnx"
    assert served.read_bytes() == source.read_bytes()
    report = json.loads((entry / "report.json").read_text())
    measured = json.loads((models / "appliance" / "open_set" / "report.json").read_text())
    fd = measured["feature_distance"]
    assert report["metrics"]["fp32"] == {
        "accuracy": measured["known_test_accuracy"],
        "auroc_unseen": fd["auroc_unseen"],
        "known_test_flagged": fd["known_test_flagged"],
        "unseen_flagged": fd["unseen_flagged"],
        "ood_threshold": fd["threshold"],
    }
    manifest = read_manifest(served)
    assert manifest is not None and manifest.provenance["ood"]["threshold"] == fd["threshold"]
    assert not set(report["dataset"]["holdout"]) & set(manifest.labels)
    card = (entry / "card.md").read_text()
    assert f"| fp32 | {measured['known_test_accuracy']:.4f} | {fd['auroc_unseen']:.3f} |" in card


def test_docs_list_the_entries_without_a_recipe() -> None:
    from exporters.zoo import also_bundled

    section = "\n".join(also_bundled(DIR.parent))
    assert "zoo:fridge_anomaly" in section and "zoo:appliance_open_set" in section
    assert section in (DIR.parent.parent / "docs" / "models.md").read_text()
