"""ACSF1 resamples (exporters/resamples.py): the split rule, and the committed figures are what
their per-resample accuracies give and what the appliance card and docs/models.md say."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from exporters.resamples import markdown, resample

ROOT = Path(__file__).resolve().parent.parent
SAVED = ROOT / "models" / "appliance" / "resamples"


def test_resample_zero_is_the_official_split_and_others_keep_its_class_counts() -> None:
    y_train = np.repeat(np.arange(4), [3, 5, 2, 4])
    y_test = np.repeat(np.arange(4), [4, 2, 5, 3])
    y = np.concatenate([y_train, y_test])
    tr, te = resample(y_train, y_test, 0)
    assert tr.tolist() == list(range(14)) and te.tolist() == list(range(14, 28))
    seen = set()
    for seed in range(1, 8):
        tr, te = resample(y_train, y_test, seed)
        assert np.array_equal(np.bincount(y[tr], minlength=4), np.bincount(y_train, minlength=4))
        assert np.array_equal(np.bincount(y[te], minlength=4), np.bincount(y_test, minlength=4))
        assert not set(tr) & set(te) and len(tr) + len(te) == len(y)
        assert np.array_equal(tr, resample(y_train, y_test, seed)[0])  # seeded
        seen.add(tuple(tr))
    assert len(seen) > 1


@pytest.mark.skipif(not (SAVED / "report.json").exists(), reason="no committed resample run")
def test_committed_figures_follow_from_the_accuracies_and_are_in_card_and_docs() -> None:
    report = json.loads((SAVED / "report.json").read_text())
    assert {"minirocket", "cnn"} <= set(report["models"])
    for m in report["models"].values():
        acc = np.array(m["accuracies"])
        assert len(acc) == m["n"] and m["n"] <= report["n_requested"]
        assert m["mean"] == pytest.approx(acc.mean()) and m["official"] == acc[0]
        assert m["std"] == pytest.approx(acc.std(ddof=1) if len(acc) > 1 else 0.0)
    assert report["models"]["minirocket"]["n"] == 30
    assert (SAVED / "card.md").read_text() == markdown(report, "#")
    assert markdown(report) in (ROOT / "models" / "appliance" / "card.md").read_text()
    assert markdown(report) in (ROOT / "docs" / "models.md").read_text()
    card = json.loads((ROOT / "models" / "appliance" / "report.json").read_text())
    assert card["resamples"] == report
