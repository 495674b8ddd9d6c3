"""Runs inside the emulated interpreter (and, for comparison, on the host): versions and batch inference.

Only the standard library, numpy and onnxruntime are used, so the same file runs under
``qemu-aarch64`` (arm64), natively on x86 and under ``qemu-x86_64 -cpu Haswell`` (an AVX2 x86
without VNNI). Sessions use the daemon's defaults (edge.config.RuntimeConfig: one intra-op and one
inter-op thread, all graph optimizations, no spinning), so the numbers are what the daemon computes.

    python guest.py info
    python guest.py infer JOBS.json

JOBS.json is a list of ``{"model": PATH, "input": NPZ, "output": NPZ, "feeds": {INPUT_NAME: NPZ_KEY},
"batch": N}``; every graph output is written to the output .npz under its own name.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path
from typing import Any


def _versions() -> dict[str, Any]:
    import importlib.metadata as md

    info: dict[str, Any] = {
        "machine": platform.machine(),
        "python": platform.python_version(),
        "implementation": sys.implementation.name,
    }
    for name in ("numpy", "onnxruntime", "pydantic", "pyyaml", "prometheus-client"):
        try:
            info[name] = md.version(name)
        except md.PackageNotFoundError:
            info[name] = None
    try:
        import onnxruntime as ort

        info["providers"] = ort.get_available_providers()
    except Exception as exc:  # reported, not raised: the caller decides
        info["onnxruntime_error"] = f"{type(exc).__name__}: {exc}"
    try:
        import edge

        info["edge"] = edge.__version__
        info["edge_path"] = str(Path(edge.__file__).parent)
    except Exception as exc:
        info["edge_error"] = f"{type(exc).__name__}: {exc}"
    try:
        text = Path("/proc/cpuinfo").read_text()
        model = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Model")]
        part = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("CPU part")]
        info["cpuinfo"] = model[0] if model else (part[0] if part else "unknown")
    except OSError:
        info["cpuinfo"] = "unreadable"
    return info


def session(path: str) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def infer(jobs_path: str) -> int:
    import numpy as np

    jobs = json.loads(Path(jobs_path).read_text())
    for job in jobs:
        start = time.perf_counter()
        sess = session(job["model"])
        data = np.load(job["input"])
        feeds_spec: dict[str, str] = job.get("feeds") or {sess.get_inputs()[0].name: data.files[0]}
        arrays = {name: data[key] for name, key in feeds_spec.items()}
        n = len(next(iter(arrays.values())))
        batch = int(job.get("batch") or n) or 1
        names = [o.name for o in sess.get_outputs()]
        parts: dict[str, list[Any]] = {name: [] for name in names}
        for i in range(0, n, batch):
            result = sess.run(names, {k: v[i : i + batch] for k, v in arrays.items()})
            for name, value in zip(names, result, strict=True):
                parts[name].append(value)
        np.savez(job["output"], **{name: np.concatenate(values) for name, values in parts.items()})
        print(
            json.dumps({"model": job["model"], "rows": n, "seconds": round(time.perf_counter() - start, 3)}),
            flush=True,
        )
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["info"]:
        print(json.dumps(_versions()))
        return 0
    if argv[:1] == ["infer"] and len(argv) == 2:
        return infer(argv[1])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
