"""Judging a candidate on the holdout: the trivial baseline, the deployed model, the gate.

Everything here scores class *names*, so the deployed model is judged on the
same holdout even when its classes differ (a class it cannot answer is an
error, as it would be in the home). Scoring runs the ONNX files with ONNX
Runtime: no torch in this process.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort


def scores(truth: Sequence[str], predicted: Sequence[str], classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro-F1 over ``classes`` and per-class precision/recall/support."""
    n = len(truth)
    correct = sum(t == p for t, p in zip(truth, predicted, strict=True))
    per_class: dict[str, dict[str, float]] = {}
    f1s = []
    for cls in classes:
        tp = sum(t == cls and p == cls for t, p in zip(truth, predicted, strict=True))
        fp = sum(t != cls and p == cls for t, p in zip(truth, predicted, strict=True))
        fn = sum(t == cls and p != cls for t, p in zip(truth, predicted, strict=True))
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[cls] = {"precision": precision, "recall": recall, "f1": f1, "support": tp + fn}
        f1s.append(f1)
    return {
        "n": n,
        "accuracy": correct / n if n else 0.0,
        "macro_f1": float(np.mean(f1s)) if f1s else 0.0,
        "per_class": per_class,
    }


def majority_baseline(train_labels: Sequence[str], n: int) -> tuple[str, list[str]]:
    """The trivial baseline: always the most frequent training class."""
    top = Counter(train_labels).most_common(1)[0][0]
    return top, [top] * n


class NotComparable(ValueError):
    """A model that cannot answer these inputs (another input shape or features)."""


def onnx_predict(path: Path, x: npt.NDArray[np.float32], batch: int = 256) -> list[str]:
    """Class names an ONNX classifier with an edge-infer manifest gives for ``x``."""
    from edge.manifest import manifest_from_metadata

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    manifest = manifest_from_metadata(session.get_modelmeta().custom_metadata_map, str(path))
    if manifest is None:
        raise NotComparable(f"{path} has no edge-infer manifest")
    if manifest.task != "classification" or not manifest.labels:
        raise NotComparable(f"{path} is a {manifest.task} model, not a classifier")
    shape = manifest.input.sample_shape()
    if tuple(shape) != tuple(x.shape[1:]):
        raise NotComparable(
            f"{path} takes inputs of shape {list(shape)}, the holdout has {list(x.shape[1:])}"
        )
    name = session.get_inputs()[0].name
    out: list[str] = []
    labels = manifest.labels
    for i in range(0, len(x), batch):
        probs = session.run([manifest.output.name], {name: np.ascontiguousarray(x[i : i + batch])})[0]
        out.extend(labels[int(j)] for j in np.asarray(probs).reshape(len(probs), -1).argmax(axis=1))
    return out


@dataclass
class Verdict:
    promote: bool
    reason: str


def decide(
    metric: str,
    margin: float,
    *,
    new: float,
    baseline: float,
    deployed: float | None,
    deployed_note: str = "",
) -> Verdict:
    """Promote only when ``new`` beats the baseline and the deployed model by ``margin``."""
    if not (new > baseline and new >= baseline + margin):
        return Verdict(
            False,
            f"the new model's holdout {metric} {new:.4f} does not beat the trivial baseline's "
            f"{baseline:.4f} by the margin {margin:g}: the deployed model is kept",
        )
    if deployed is not None and not (new > deployed and new >= deployed + margin):
        return Verdict(
            False,
            f"the new model's holdout {metric} {new:.4f} does not beat the deployed model's "
            f"{deployed:.4f} by the margin {margin:g}: the deployed model is kept",
        )
    against = (
        f"the deployed model's {deployed:.4f}"
        if deployed is not None
        else f"no deployed model ({deployed_note})"
    )
    return Verdict(
        True,
        f"holdout {metric} {new:.4f} beats the baseline's {baseline:.4f} and {against} "
        f"by at least {margin:g}: promoted",
    )
