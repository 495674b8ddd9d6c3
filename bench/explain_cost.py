"""Cost of ``output.explain`` (occlusion) per answer: batch-1 latency and resident memory with and
without it, and of the open-set (OOD) appliance file beside the plain one.

CPU, one ONNX Runtime thread (as on a Pi), the zoo's appliance (window 1460 x 1) and occupancy
(11 x 4) models. Each case runs in a process of its own (the model loaded as the daemon loads it,
:class:`edge.runtime.LoadedModel`), so its peak RSS is that case's alone. ``python -m bench`` runs
it as a section of its report (``explain_cost``); ``python -m bench.explain_cost [--repeats N]``
prints it alone. The figures are in docs/performance.md and docs/models.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MODELS = {
    "appliance": "models/appliance/appliance.fp32.onnx",
    "occupancy": "models/occupancy/occupancy.fp32.onnx",
}
#: the appliance CNN with an out-of-distribution output beside its (calibrated) probabilities
OPEN_SET = ("appliance_open_set", "models/appliance_open_set/appliance_open_set.fp32.onnx")


def peak_mb() -> float:
    """This process's peak RSS (VmHWM: its own address space's, unlike ru_maxrss, which keeps the
    parent's size at fork across the exec)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 1024 / 1024


def measure(name: str, path: str, explain: bool, repeats: int) -> dict[str, Any]:
    """One case, in this process: median batch-1 latency (ms) of ``repeats`` answers, RSS (MB)
    after loading and after answering, peak RSS."""
    from edge.batcher import batch_cap
    from edge.config import ExplainConfig, ModelConfig, RuntimeConfig
    from edge.explain import explain_batch, plan
    from edge.runtime import LoadedModel

    before = rss_mb()
    model = LoadedModel(name, ModelConfig(path=ROOT / path), RuntimeConfig(intra_op_threads=1))
    p = plan(model.spec, ExplainConfig(), f"{name}.explain") if explain else None
    cap = batch_cap(model)  # explain's occluded rows go in calls of at most this, as the batcher does
    x = np.random.default_rng(0).normal(size=(1, *model.spec.sample_shape)).astype(np.float32)
    loaded = rss_mb()
    for _ in range(max(3, repeats // 10)):  # warm-up, untimed (first-call allocations)
        out = model.run_sync(x)
        if p is not None:
            explain_batch(model.run_sync, [(p, x[0], out[0])], cap)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = model.run_sync(x)
        if p is not None:
            explain_batch(model.run_sync, [(p, x[0], out[0])], cap)
        times.append((time.perf_counter() - t0) * 1e3)
    answered = rss_mb()
    model.close()
    return {
        "model": name,
        "explain": explain,
        "rows_per_answer": 1 + (p.rows if p is not None else 0),
        "median_ms": statistics.median(times),
        "p90_ms": float(np.percentile(times, 90)),
        "rss_before_mb": before,
        "rss_loaded_mb": loaded,
        "rss_mb": answered,
        "peak_rss_mb": peak_mb(),
    }


def _case(name: str, path: str, explain: bool, repeats: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.explain_cost", "--case", name, path, "--repeats", str(repeats)]
    if explain:
        cmd.append("--explain")
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT, timeout=600)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def measure_all(repeats: int = 50) -> dict[str, Any]:
    """Every model plain and with explain, and the open-set appliance file plain, a process each."""
    rows: list[dict[str, Any]] = []
    for name, path in MODELS.items():
        if (ROOT / path).is_file():
            rows += [_case(name, path, False, repeats), _case(name, path, True, repeats)]
    if (ROOT / OPEN_SET[1]).is_file():
        rows.append(_case(*OPEN_SET, False, repeats))
    return {"repeats": repeats, "threads": 1, "cases": rows}


def markdown(cost: dict[str, Any]) -> list[str]:
    cases = cost["cases"]
    lines = [
        f"Cost of `output.explain` (occlusion, 8 segments) and of the open-set file, batch 1, one "
        f"ONNX Runtime thread, {cost['repeats']} answers, a process per case:",
        "",
        "| model | explain | rows per answer | median ms | p90 ms | RSS loaded MB | RSS answering MB "
        "| peak RSS MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in cases:
        lines.append(
            f"| {r['model']} | {'yes' if r['explain'] else 'no'} | {r['rows_per_answer']} | "
            f"{r['median_ms']:.3f} | {r['p90_ms']:.3f} | {r['rss_loaded_mb']:.1f} | {r['rss_mb']:.1f} "
            f"| {r['peak_rss_mb']:.1f} |"
        )
    by = {(r["model"], r["explain"]): r for r in cases}
    notes = []
    for name in MODELS:
        plain, full = by.get((name, False)), by.get((name, True))
        if plain and full:
            notes.append(
                f"{name}: {plain['median_ms']:.3f} -> {full['median_ms']:.3f} ms "
                f"(x{full['median_ms'] / plain['median_ms']:.1f}), peak RSS {plain['peak_rss_mb']:.1f} -> "
                f"{full['peak_rss_mb']:.1f} MB"
            )
    plain, ood = by.get(("appliance", False)), by.get((OPEN_SET[0], False))
    if plain and ood:
        notes.append(
            f"open set (OOD output): {plain['median_ms']:.3f} -> {ood['median_ms']:.3f} ms, peak RSS "
            f"{plain['peak_rss_mb']:.1f} -> {ood['peak_rss_mb']:.1f} MB"
        )
    return [*lines, "", *(f"- {n}" for n in notes)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.explain_cost", description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--case", nargs=2, metavar=("NAME", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--explain", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(measure(args.case[0], args.case[1], args.explain, args.repeats)))
        return 0
    cost = measure_all(args.repeats)
    print(json.dumps(cost, indent=2) if args.json else "\n".join(markdown(cost)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
