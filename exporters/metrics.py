"""Metrics without scikit-learn: accuracy, macro-F1, confusion matrix, per-class P/R, MAE."""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray


def confusion_matrix(y_true: NDArray[Any], y_pred: NDArray[Any], n_classes: int) -> NDArray[np.int64]:
    """``cm[i, j]`` = number of samples of true class i predicted as j."""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (y_true.astype(np.int64), y_pred.astype(np.int64)), 1)
    return cm


def per_class(cm: NDArray[np.int64], labels: list[str]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for i, name in enumerate(labels):
        tp = float(cm[i, i])
        predicted, actual = float(cm[:, i].sum()), float(cm[i, :].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out[name] = {"precision": precision, "recall": recall, "f1": f1, "support": int(actual)}
    return out


def classification_metrics(y_true: NDArray[Any], probs: NDArray[Any], labels: list[str]) -> dict[str, Any]:
    y_pred = probs.argmax(axis=-1)
    cm = confusion_matrix(y_true, y_pred, len(labels))
    classes = per_class(cm, labels)
    present = [c for c in classes.values() if c["support"] > 0]
    return {
        "accuracy": float((y_pred == y_true).mean()) if len(y_true) else 0.0,
        "macro_f1": float(np.mean([c["f1"] for c in present])) if present else 0.0,
        "confusion_matrix": cm.tolist(),
        "per_class": classes,
        "n": len(y_true),
    }


def regression_metrics(y_true: NDArray[Any], y_pred: NDArray[Any]) -> dict[str, Any]:
    err = y_pred.reshape(-1) - y_true.reshape(-1)
    return {
        "mae": float(np.abs(err).mean()) if len(err) else 0.0,
        "rmse": float(np.sqrt((err**2).mean())) if len(err) else 0.0,
        "n": len(err),
    }


def evaluate(task: str, y_true: NDArray[Any], output: NDArray[Any], labels: list[str]) -> dict[str, Any]:
    """Metrics of model ``output`` (probabilities or values) against ``y_true``."""
    if task == "classification":
        return classification_metrics(y_true, output, labels)
    return regression_metrics(y_true, output)


def headline(task: str, metrics: dict[str, Any]) -> float:
    """The single number a budget is checked against: accuracy, or minus MAE."""
    return float(metrics["accuracy"]) if task == "classification" else -float(metrics["mae"])
