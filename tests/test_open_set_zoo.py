"""The appliance open-set figures: ONNX Runtime alone reproduces what models/appliance/open_set
(ACSF1) and models/appliance/open_set_plaid (PLAID, the recipe trained on it) state: AUROC of
``ood_score`` for appliance types never seen in training, the threshold's flag rates,
known-class accuracy; and the card and docs/models.md carry them.

Needs neither torch nor aeon: ``split.npz`` holds the known classes' official test series and
every series of the held-out types, in raw units, as ``python -m exporters.ood acsf1|plaid --save``
measured them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from edge.manifest import read_manifest
from exporters.ood import OOD_OUTPUT, auroc, open_set_markdown

ROOT = Path(__file__).resolve().parent.parent
OPEN_SETS = [ROOT / "models" / "appliance" / name for name in ("open_set", "open_set_plaid")]
GOAL_AUROC = 0.90
folders = pytest.mark.parametrize("folder", OPEN_SETS, ids=lambda p: p.name)


def _report(folder: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((folder / "report.json").read_text())
    return data


def _run(path: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    outs = [sess.run(["probabilities", OOD_OUTPUT], {"input": x[i : i + 64]}) for i in range(0, len(x), 64)]
    return np.concatenate([o[0] for o in outs]), np.concatenate([o[1][:, 0] for o in outs])


@folders
@pytest.mark.parametrize("score", ["feature_distance", "energy"])
def test_open_set_figures_are_what_onnxruntime_measures(folder: Path, score: str) -> None:
    report = _report(folder)
    split = np.load(folder / "split.npz")
    path = folder / f"open_set.{score}.onnx"
    manifest = read_manifest(path)
    assert manifest is not None
    record = manifest.provenance["ood"]
    assert record["output"] == OOD_OUTPUT and record["score"] == score
    thr = record["threshold"]
    probs, s_known = _run(path, split["known_x"])
    _, s_unseen = _run(path, split["unseen_x"])
    assert len(s_known) == report["known_test_n"] and len(s_unseen) == report["unseen_n"]
    figures = report[score]
    assert figures["threshold"] == pytest.approx(thr, rel=1e-6)
    assert auroc(s_known, s_unseen) == pytest.approx(figures["auroc_unseen"], abs=1e-9)
    assert float((s_known > thr).mean()) == pytest.approx(figures["known_test_flagged"], abs=1e-9)
    assert float((s_unseen > thr).mean()) == pytest.approx(figures["unseen_flagged"], abs=1e-9)
    accuracy = float((probs.argmax(axis=1) == split["known_y"]).mean())
    assert accuracy == pytest.approx(report["known_test_accuracy"], abs=1e-9)
    assert list(manifest.labels) == split["labels"].tolist()
    assert not set(report["holdout"]) & set(manifest.labels)  # the unseen types really are unseen


@folders
def test_feature_distance_meets_the_auroc_goal(folder: Path) -> None:
    assert _report(folder)["feature_distance"]["auroc_unseen"] >= GOAL_AUROC


def test_plaid_reports_its_baseline_side_by_side() -> None:
    report = _report(OPEN_SETS[1])
    assert report["data"] == "PLAID" and report["baseline"]["model"].startswith("MiniRocket")
    assert report["majority_known_test_accuracy"] < report["known_test_accuracy"]


@folders
def test_card_and_docs_carry_the_figures(folder: Path) -> None:
    report = _report(folder)
    section = open_set_markdown(report)
    assert (folder / "card.md").read_text() == open_set_markdown(report, "#")
    assert section in (ROOT / "docs" / "models.md").read_text()
    assert f"| feature_distance | {report['feature_distance']['auroc_unseen']:.3f} |" in section
