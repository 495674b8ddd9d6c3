"""The daemon's latency at 100 msg/s while ``edge-infer learn`` trains beside it.

    python -m bench.learn_beside [--seconds 30]

One daemon (the benchmark's snapshot pipeline, 50 devices, a real Mosquitto) answers 100 msg/s
in three phases: idle, while ``python -m bench.learn_bench --days 14 --nilm-days 0`` runs (its
table, then its niced training process), and idle again. Printed: p50/p99/max per phase and the
p99 difference (goal: within 2 ms of idle). On a shared machine the noise of the other tenants
is in every phase; run it a few times.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import models
from bench.runner import Bench, Settings
from bench.systems import ROOT, PipelineSpec, edge_infer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each phase")
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="edge-learn-beside-"))
    bench = Bench(Settings(mode="ab", devices=50), workdir, print)
    spec = PipelineSpec("snap", bench.ff, tuple(models.FF_FEATURES), None, 50)
    system = edge_infer(
        "learn-beside", "edge-infer", bench.run_id, workdir, port=bench.port, pipelines=[spec]
    )
    count = int(args.seconds * args.rate)
    phases: dict[str, Any] = {}
    learner: subprocess.Popen[bytes] | None = None
    try:
        bench.start(system)
        bench.warm_up(system)
        phases["idle_before"] = bench.phase(system, count, args.rate)
        learner = subprocess.Popen(
            [sys.executable, "-m", "bench.learn_bench", "--days", "14", "--nilm-days", "0"],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(3.0)  # into the table building
        phases["learn_running"] = bench.phase(system, count, args.rate)
        phases["learn_still_running"] = learner.poll() is None
        learner.wait(timeout=900)
        phases["idle_after"] = bench.phase(system, count, args.rate)
    finally:
        if learner is not None and learner.poll() is None:
            learner.kill()
        system.stop()
        bench.close()
        shutil.rmtree(workdir, ignore_errors=True)
    out: dict[str, Any] = {}
    for name, r in phases.items():
        if isinstance(r, dict):
            out[name] = {k: r["latency_ms"][k] for k in ("p50", "p99", "max")} | {"lost": r["lost"]}
        else:
            out[name] = r
    idle = min(out["idle_before"]["p99"], out["idle_after"]["p99"])
    out["p99_learn_minus_idle_ms"] = round(out["learn_running"]["p99"] - idle, 3)
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
