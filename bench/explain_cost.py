"""Cost of ``output.explain`` (occlusion) per answer: batch-1 latency with and without it.

CPU, one thread (as on a Pi), the zoo's appliance (window 1460 x 1) and occupancy (11 x 4)
models. ``python -m bench.explain_cost [--repeats N]``; the figures are in docs/models.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from edge.batcher import batch_cap
from edge.config import ExplainConfig, ModelConfig, RuntimeConfig
from edge.explain import explain_batch, plan
from edge.runtime import LoadedModel

ROOT = Path(__file__).resolve().parent.parent
MODELS = {
    "appliance": "models/appliance/appliance.fp32.onnx",
    "occupancy": "models/occupancy/occupancy.fp32.onnx",
}


def measure(name: str, repeats: int) -> dict[str, float]:
    model = LoadedModel(name, ModelConfig(path=ROOT / MODELS[name]), RuntimeConfig(intra_op_threads=1))
    p = plan(model.spec, ExplainConfig(), f"{name}.explain")
    cap = batch_cap(model)
    x = np.random.default_rng(0).normal(size=(1, *model.spec.sample_shape)).astype(np.float32)
    plain, explained = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = model.run_sync(x)
        t1 = time.perf_counter()
        explain_batch(model.run_sync, [(p, x[0], out[0])], cap)  # as the batcher calls it
        t2 = time.perf_counter()
        plain.append((t1 - t0) * 1e3)
        explained.append((t2 - t0) * 1e3)
    model.close()
    base, full = statistics.median(plain), statistics.median(explained)
    return {"rows": p.rows, "plain_ms": base, "explain_ms": full, "ratio": full / base}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    for name in MODELS:
        r = measure(name, args.repeats)
        print(
            f"{name}: +{r['rows']} rows/answer, batch-1 median {r['plain_ms']:.3f} ms -> "
            f"{r['explain_ms']:.3f} ms with explain (x{r['ratio']:.1f})"
        )


if __name__ == "__main__":
    main()
