"""Label store: bounded, crash-safe (a real SIGKILL), exported in the recording format."""

from __future__ import annotations

import asyncio
import csv
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edge.labelstore import NONE_OF_THESE, LabelStore, LabelStoreError
from edge.record import columns_for
from edge.runtime import ModelSpec


def _add(store: LabelStore, i: int, shape: tuple[int, ...] = (4, 2), label: str = "kettle") -> int:
    return store.add(
        device=f"plug{i % 3}",
        pipeline="appliance",
        predicted="toaster",
        label=label,
        model_version="1.2.0",
        input=np.full(shape, i, dtype=np.float32),
        ts=1_700_000_000.0 + i,
    )


def test_round_trip_and_wal(tmp_path: Path) -> None:
    store = LabelStore(tmp_path)
    window = np.arange(8, dtype=np.float32).reshape(4, 2) / 3
    store.add(device="d", pipeline="p", predicted="a", label="b", model_version="v", input=window, ts=5.0)
    (c,) = list(store.corrections())
    assert (c.device, c.pipeline, c.predicted, c.label, c.model_version, c.ts) == (
        "d",
        "p",
        "a",
        "b",
        "v",
        5.0,
    )
    assert c.input.shape == (4, 2) and np.array_equal(c.input, window)
    mode = sqlite3.connect(tmp_path / "labels.sqlite3").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    store.close()


def test_bounded_by_rows_and_bytes_oldest_dropped_and_counted(tmp_path: Path) -> None:
    store = LabelStore(tmp_path, max_rows=5)
    for i in range(12):
        _add(store, i)
    assert store.rows == 5 and store.dropped == 7
    assert [int(c.input[0, 0]) for c in store.corrections()] == [7, 8, 9, 10, 11]
    store.close()
    # the drop count and the bound survive a reopen; bytes bound: 8 floats = 32 bytes a row
    store = LabelStore(tmp_path, max_rows=100, max_bytes=3 * 32)
    assert store.dropped == 7
    _add(store, 99)
    assert store.rows == 3 and store.bytes == 96 and store.dropped == 7 + 3
    with pytest.raises(LabelStoreError, match="exceeds max_bytes"):
        _add(store, 1, shape=(100,))
    with pytest.raises(LabelStoreError, match="NaN"):
        store.add(device="d", pipeline="p", predicted="", label="x", model_version="", input=[np.nan])
    assert store.rows == 3
    store.close()


def test_export_in_recording_format(tmp_path: Path) -> None:
    spec = ModelSpec(
        name="m", path=tmp_path / "m.onnx", task="classification", layout="window", input_name="x",
        output_name="y", output_kind="probabilities", sample_shape=(4, 2), features=("power", "current"),
        labels=("kettle", "toaster"), threshold=None, unit=None, version="1", sha256="", sample_period_s=1.0,
    )  # fmt: skip
    columns = columns_for(spec)
    store = LabelStore(tmp_path)
    _add(store, 1)
    _add(store, 2, label=NONE_OF_THESE)
    _add(store, 3, shape=(3,))  # an older model's input: not this spec
    window = np.array([[1, 10], [2, 20], [3, 30], [4, 40]], dtype=np.float32)
    store.add(device="plug9", pipeline="appliance", predicted="t", label="toaster", model_version="1",
              input=window, ts=1_700_000_000.5)  # fmt: skip
    assert store.export_csv(tmp_path / "c.csv", "appliance", columns) == 2
    rows = list(csv.reader((tmp_path / "c.csv").open()))
    assert rows[0] == ["ts", "device", "pipeline", "label", "power@0", "current@0", "power@1", "current@1",
                       "power@2", "current@2", "power@3", "current@3"]  # fmt: skip
    assert rows[1][:4] == ["2023-11-14T22:13:21.000+00:00", "plug1", "appliance", "kettle"]
    assert rows[2] == ["2023-11-14T22:13:20.500+00:00", "plug9", "appliance", "toaster",
                       "1.0", "10.0", "2.0", "20.0", "3.0", "30.0", "4.0", "40.0"]  # fmt: skip
    store.close()


def test_add_async_runs_off_the_loop(tmp_path: Path) -> None:
    store = LabelStore(tmp_path)

    async def main() -> int:
        import threading

        loop_thread = threading.get_ident()
        seen: list[int] = []
        original = store.add

        def spy(**kw: object) -> int:
            seen.append(threading.get_ident())
            return original(**kw)  # type: ignore[arg-type]

        store.add = spy  # type: ignore[method-assign]
        rid = await store.add_async(device="d", pipeline="p", predicted="a", label="b", model_version="v",
                                    input=[1.0])  # fmt: skip
        assert seen and seen[0] != loop_thread
        return rid

    assert asyncio.run(main()) == 1
    store.close()


_WRITER = """
import sys, numpy as np
from pathlib import Path
from edge.labelstore import LabelStore
store = LabelStore(Path(sys.argv[1]))
i = 0
while True:
    store.add(device="d", pipeline="p", predicted="a", label="b", model_version="v",
              input=np.full((60, 3), i, dtype=np.float32))
    print(i, flush=True)
    i += 1
"""


def test_sigkill_mid_writes_loses_at_most_the_uncommitted_one(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)], stdout=subprocess.PIPE, env=env)
    assert proc.stdout is not None
    acknowledged = -1
    deadline = time.monotonic() + 60
    while acknowledged < 200 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        acknowledged = int(line)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert acknowledged >= 200, "writer did not get going"
    store = LabelStore(tmp_path)
    assert store.integrity_ok()
    values = [int(c.input[0, 0]) for c in store.corrections()]
    # every correction whose commit returned is there, in order, readable; at most one more
    # (committed but not yet printed) - nothing torn
    assert values == list(range(len(values)))
    assert len(values) >= acknowledged + 1
    assert all(c.input.shape == (60, 3) for c in store.corrections())
    _add(store, 5)  # still writable
    store.close()
