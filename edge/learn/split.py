"""The honest split: contiguous time blocks with a purge gap, and the refusal when data is short.

Windows overlap in time: a window ending at t holds samples back to
``t - span``. A random split would put near-identical windows in train and
test. Here the newest ``test_fraction`` of the examples is the test block, the
``val_fraction`` before it the validation block, the rest (oldest) is trained
on, and every example whose window would reach across a block boundary is
dropped: the purge gap is at least one window span, so no window crosses it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge.learn.table import Table

DAY = 86400.0


class TooLittleData(ValueError):
    """Not enough examples to train and judge a model honestly; the message says what is missing."""


def window_span_s(table: Table, period_s: float | None, hop: int = 1) -> float:
    """Seconds one example reaches back: ``size * period`` for resampled windows, else
    ``size`` (1 for snapshots) times the median step between one device's examples."""
    spec = table.spec
    size = spec.sample_shape[0] if spec.layout == "window" else 1
    if spec.layout == "window" and period_s:
        return float(size * period_s)
    steps: list[float] = []
    devices = np.array(table.devices)
    for device in set(table.devices):
        ts = table.ts[devices == device]
        if len(ts) > 1:
            steps.extend(np.diff(ts).tolist())
    step = float(np.median(steps)) if steps else 0.0
    return size * step / max(hop, 1) if spec.layout == "window" else step


@dataclass
class Split:
    """Which block each example is in: ``train``, ``val``, ``test`` or ``purged``."""

    blocks: list[str]
    purge_s: float
    bounds: dict[str, tuple[float, float]] = field(default_factory=dict)

    def counts(self, table: Table) -> dict[str, dict[str, int]]:
        out: dict[str, Counter[str]] = {}
        for block, label in zip(self.blocks, table.labels, strict=True):
            out.setdefault(block, Counter())[label] += 1
        return {k: dict(sorted(v.items())) for k, v in sorted(out.items())}

    def indices(self, block: str) -> np.ndarray[Any, np.dtype[np.intp]]:
        return np.flatnonzero(np.array(self.blocks) == block)


def time_split(table: Table, test_fraction: float, val_fraction: float, purge_s: float) -> Split:
    """Blocks by time (oldest train, then val, then test), purging ``purge_s`` before each boundary."""
    n = len(table)
    ts = table.ts
    order = np.argsort(ts, kind="stable")
    blocks = ["train"] * n
    if n == 0:
        return Split(blocks, purge_s)
    test_start = float(ts[order[min(n - 1, round(n * (1 - test_fraction)))]])
    val_start = (
        float(ts[order[min(n - 1, round(n * (1 - test_fraction - val_fraction)))]])
        if val_fraction > 0
        else test_start
    )
    for i in range(n):
        t = float(ts[i])
        if t >= test_start:
            blocks[i] = "test"
        elif t > test_start - purge_s:
            blocks[i] = "purged"
        elif val_fraction > 0 and t >= val_start:
            blocks[i] = "val"
        elif val_fraction > 0 and t > val_start - purge_s:
            blocks[i] = "purged"
    bounds = {}
    for block in ("train", "val", "test"):
        times = [float(ts[i]) for i in range(n) if blocks[i] == block]
        if times:
            bounds[block] = (min(times), max(times))
    return Split(blocks, purge_s, bounds)


def check_enough(table: Table, split: Split, classes: list[str], min_per_class: int) -> None:
    """Raise :class:`TooLittleData` with a plain message when the table cannot train and judge a model."""
    span_days = max((table.end - table.start) / DAY, 1e-9)
    if len(table) == 0:
        raise TooLittleData(
            f"no labelled examples in {span_days:.1f} days of history: check learn.inputs and "
            "learn.labels name entities that have history"
            + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(table.stats.items()))})" if table.stats else "")
        )
    counts = Counter(table.labels)
    if len(classes) < 2:
        raise TooLittleData(
            f"only one class ({classes[0] if classes else 'none'}) in {span_days:.1f} days: "
            "a model needs examples of at least two"
        )
    problems = []
    for cls in classes:
        have = counts.get(cls, 0)
        if have < min_per_class:
            rate = have / span_days
            if have == 0:
                problems.append(f"class `{cls}` has no examples in {span_days:.1f} days")
            else:
                more = (min_per_class - have) / rate
                problems.append(
                    f"class `{cls}` has {have} examples; at the current rate about "
                    f"{max(1, round(more))} more days are needed"
                )
    per_block = split.counts(table)
    for block in ("train", "test"):
        for cls in classes:
            if cls in counts and per_block.get(block, {}).get(cls, 0) == 0 and counts[cls] >= min_per_class:
                where = "newest" if block == "test" else "oldest"
                problems.append(
                    f"class `{cls}` has no examples in the {block} block (the {where} part of the "
                    "history): wait until it occurs again, or lower learn.test_fraction"
                )
    if problems:
        raise TooLittleData("; ".join(problems) + f" (learn.min_examples_per_class is {min_per_class})")


def class_order(table: Table, preferred: list[str] | None = None) -> list[str]:
    """Class names in output order: the ``preferred`` ones first (the classes the labels can
    take, seen or not: an unseen one is reported as missing), then the others seen, sorted."""
    head = list(dict.fromkeys(preferred or []))
    return head + sorted(set(table.labels) - set(head))
