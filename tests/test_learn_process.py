"""edge-infer learn's training process: niced, threads bounded, stopped above its memory bound."""

from __future__ import annotations

import sys
from pathlib import Path

from edge.learn.run import run_training


def test_training_process_is_niced_with_bounded_threads(tmp_path: Path) -> None:
    code = "import os; print(os.nice(0), os.environ['OMP_NUM_THREADS'], os.environ['MKL_NUM_THREADS'])"
    with (tmp_path / "out.txt").open("w+") as handle:
        result = run_training([sys.executable, "-c", code], threads=2, nice=7, memory_mb=512, stream=handle)
        handle.seek(0)
        nice, omp, mkl = handle.read().split()
    assert result.returncode == 0 and not result.killed_for_memory
    assert int(nice) >= 7 and omp == mkl == "2"


def test_training_process_is_stopped_above_its_memory_bound() -> None:
    code = "import time\nx = bytearray(600 * 1024 * 1024)\nx[::4096] = b'1' * len(x[::4096])\ntime.sleep(20)"
    result = run_training([sys.executable, "-c", code], threads=1, nice=0, memory_mb=300)
    assert result.killed_for_memory
    assert result.returncode == -9  # SIGKILL: stopped, not waited for
