"""PNG plots of training curves and confusion matrices (matplotlib, headless).

matplotlib is optional: the ``trainer`` extra (what the add-on image and a systemd install carry for
``edge-infer learn``) leaves it out. Without it every ``plot_*`` draws nothing and returns ``None``,
and the card says so (``MISSING_NOTE``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

MISSING_NOTE = "Plots not drawn: matplotlib is not installed (`pip install matplotlib` draws them)."


def available() -> bool:
    """Whether matplotlib can be imported (the plots are drawn)."""
    return importlib.util.find_spec("matplotlib") is not None


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_history(history: list[dict[str, float]], path: Path, title: str) -> Path | None:
    if not available():
        return None
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], label="train")
    if any("val_loss" in h for h in history):
        ax_loss.plot(epochs, [h.get("val_loss", float("nan")) for h in history], label="validation")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    key = "accuracy" if "train_accuracy" in history[0] else "mae"
    ax_metric.plot(epochs, [h[f"train_{key}"] for h in history], label="train")
    if any(f"val_{key}" in h for h in history):
        ax_metric.plot(epochs, [h.get(f"val_{key}", float("nan")) for h in history], label="validation")
    ax_metric.set_xlabel("epoch")
    ax_metric.set_ylabel(key)
    ax_metric.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_confusion(cm: list[list[int]], labels: list[str], path: Path, title: str) -> Path | None:
    if not available():
        return None
    plt = _pyplot()
    n = len(labels)
    size = max(4.0, 0.55 * n + 2.0)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = max(max(row) for row in cm) if cm else 0
    for i in range(n):
        for j in range(n):
            if cm[i][j]:
                colour = "white" if cm[i][j] > top / 2 else "black"
                ax.text(j, i, str(cm[i][j]), ha="center", va="center", color=colour, fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_reliability(curves: dict[str, list[dict[str, float]]], path: Path, title: str) -> Path | None:
    """Reliability diagram: accuracy vs mean confidence per bin, one line per curve (bins with data)."""
    if not available():
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfectly calibrated")
    for label, rows in curves.items():
        conf = [r["confidence"] for r in rows]
        acc = [r["accuracy"] for r in rows]
        biggest = max([1, *(x["n"] for x in rows)])
        sizes = [12 + 60 * r["n"] / biggest for r in rows]
        ax.plot(conf, acc, marker="o", markersize=3, label=label)
        ax.scatter(conf, acc, s=sizes, alpha=0.3)
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("mean confidence in bin")
    ax.set_ylabel("accuracy in bin")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
