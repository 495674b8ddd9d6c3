"""edge-infer learn: the time-block split with its purge gap, and the refusal when data is short."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from edge.learn.split import DAY, TooLittleData, check_enough, class_order, time_split, window_span_s
from edge.learn.table import Table
from edge.runtime import ModelSpec

SPEC = ModelSpec(
    name="m",
    path=Path("m.onnx"),
    task="classification",
    layout="window",
    input_name="x",
    output_name="y",
    output_kind="probabilities",
    sample_shape=(10, 1),
    features=("power",),
    labels=(),
    threshold=None,
    unit=None,
    version="0",
    sha256="",
    sample_period_s=60.0,
)


def table(n: int, step: float = 60.0, labels: list[str] | None = None, devices: int = 2) -> Table:
    ts = np.repeat(np.arange(n // devices) * step, devices)[:n].astype(np.float64)
    names = [f"d{i % devices}" for i in range(n)]
    labs = labels or ["on" if (i // 50) % 2 else "off" for i in range(n)]
    x = np.zeros((n, 10, 1), dtype=np.float32)
    return Table("p", SPEC, ts, names, labs, x, float(ts[0]), float(ts[-1]) + step, Counter())


def test_window_span_is_size_times_period() -> None:
    t = table(200)
    assert window_span_s(t, 60.0) == 600.0
    assert window_span_s(t, None, hop=1) == 600.0  # size x the median step between one device's rows


def test_blocks_are_contiguous_in_time_and_the_purge_gap_separates_them() -> None:
    t = table(2000)
    purge = window_span_s(t, 60.0)
    split = time_split(t, 0.25, 0.15, purge)
    blocks = np.array(split.blocks)
    order = np.argsort(t.ts, kind="stable")
    seq = [b for b in blocks[order] if b != "purged"]
    # train, then val, then test: each one contiguous run
    runs = [b for i, b in enumerate(seq) if i == 0 or seq[i - 1] != b]
    assert runs == ["train", "val", "test"]
    first = {b: t.ts[blocks == b].min() for b in ("train", "val", "test")}
    last = {b: t.ts[blocks == b].max() for b in ("train", "val", "test")}
    # no window crosses a boundary: a window ending at ts holds samples back to ts - span
    assert first["val"] - purge >= last["train"]
    assert first["test"] - purge >= last["val"]
    assert (blocks == "purged").sum() > 0
    share = (blocks == "test").sum() / len(blocks)
    assert 0.2 < share < 0.3


def test_without_validation_the_purge_is_before_the_test_block() -> None:
    t = table(500)
    split = time_split(t, 0.3, 0.0, 600.0)
    blocks = np.array(split.blocks)
    assert "val" not in split.blocks
    assert t.ts[blocks == "test"].min() - 600.0 >= t.ts[blocks == "train"].max()


def test_refusal_says_how_many_examples_and_days_are_missing() -> None:
    labels = ["off"] * 997 + ["on"] * 3
    t = table(1000, step=60.0 * 2, labels=labels, devices=1)  # 1000 rows, 2 min apart: ~1.4 days
    split = time_split(t, 0.25, 0.0, 1200.0)
    with pytest.raises(TooLittleData) as info:
        check_enough(t, split, class_order(t, ["off", "on"]), 20)
    message = str(info.value)
    days = (t.end - t.start) / DAY
    expected = round((20 - 3) / (3 / days))
    assert f"class `on` has 3 examples; at the current rate about {expected} more days are needed" in message


def test_refusal_for_a_class_never_seen_and_one_missing_from_the_holdout() -> None:
    t = table(400, labels=["off"] * 400)
    with pytest.raises(TooLittleData, match="class `on` has no examples"):
        check_enough(t, time_split(t, 0.25, 0.0, 600.0), class_order(t, ["off", "on"]), 5)
    late_gone = ["on"] * 100 + ["off"] * 300  # "on" only in the oldest part: absent from the test block
    t = table(400, labels=late_gone)
    with pytest.raises(TooLittleData, match="class `on` has no examples in the test block"):
        check_enough(t, time_split(t, 0.25, 0.0, 600.0), class_order(t, ["off", "on"]), 5)


def test_enough_data_passes() -> None:
    t = table(1000)
    check_enough(t, time_split(t, 0.25, 0.15, 600.0), class_order(t, ["off", "on"]), 20)
