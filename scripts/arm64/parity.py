"""arm64 parity of an ONNX model, for callers such as ``exporters.verify``: outputs under emulation.

Standard library and numpy only. ``scripts/`` is not a package; load this file by path::

    import importlib.util
    spec = importlib.util.spec_from_file_location("edge_arm64_parity", "scripts/arm64/parity.py")
    parity = importlib.util.module_from_spec(spec); spec.loader.exec_module(parity)

    if parity.available():
        result = parity.arm64_parity(int8_path, x_test, x86_outputs, task="classification")

API:

* ``available(cache=None) -> bool``: the emulation cache (sysroot and aarch64 site, built by
  ``scripts/arm64/test.sh``, i.e. ``make test-arm64``) and qemu are present. Never builds or downloads.
* ``unavailable_reason(cache=None) -> str | None``: why not, for a report.
* ``arm64_outputs(model, x, *, input_name=None, batch=64, cache=None, timeout=1800) -> dict[str, ndarray]``:
  every graph output of ``model`` on ``x`` (float32, first axis = batch), computed by onnxruntime on
  the emulated arm64 CPU (Cortex-A72 unless ARM64_CPU says otherwise) with the daemon's session
  defaults (1 intra-op thread, all graph optimizations). Raises ``Arm64Unavailable`` or
  ``RuntimeError``.
* ``arm64_parity(model, x, reference, task, *, output_name=None, ...) -> dict``: compares the arm64
  output with ``reference`` (the x86 output, same batching): ``{"available", "platform",
  "max_abs_diff", "mean_abs_diff", "argmax_agreement" (classification), "rows", "seconds"}``; when the
  emulation is absent, ``{"available": False, "reason": ...}`` instead of raising.

Dynamic quantization computes the activation scale per batch: compare outputs computed with the same
``batch`` on both sides (the x86 reference should use the same slicing, default 64).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent


class Arm64Unavailable(RuntimeError):
    """The emulation cache or qemu is missing (run make test-arm64 once)."""


def _cache(cache: Path | str | None) -> Path:
    value = Path(cache or os.environ.get("ARM64_CACHE", ".cache/arm64"))
    return value if value.is_absolute() else REPO / value


def unavailable_reason(cache: Path | str | None = None) -> str | None:
    root = _cache(cache)
    qemu = shutil.which("qemu-aarch64-static") or next(
        (
            str(p)
            for p in (Path("/usr/bin/qemu-aarch64-static"), root / "tools/usr/bin/qemu-aarch64-static")
            if p.exists()
        ),
        None,
    )
    if qemu is None:
        return "qemu-aarch64-static not found (apt-get install qemu-user-static, or make test-arm64)"
    if not (root / "sysroot/.edge-arm64-sysroot").is_file():
        return f"no arm64 sysroot under {root} (make test-arm64 builds it)"
    if not (root / "site/.edge-arm64-site").is_file():
        return f"no aarch64 site under {root} (make test-arm64 builds it)"
    return None


def available(cache: Path | str | None = None) -> bool:
    return unavailable_reason(cache) is None


def arm64_outputs(
    model: Path | str,
    x: np.ndarray,
    *,
    input_name: str | None = None,
    batch: int = 64,
    cache: Path | str | None = None,
    timeout: float = 1800,
) -> dict[str, np.ndarray]:
    reason = unavailable_reason(cache)
    if reason is not None:
        raise Arm64Unavailable(reason)
    with tempfile.TemporaryDirectory(prefix="edge-arm64-parity-") as tmp_name:
        tmp = Path(tmp_name)
        np.savez(tmp / "in.npz", x=np.ascontiguousarray(x, dtype=np.float32))
        job: dict[str, Any] = {
            "model": str(Path(model).resolve()),
            "input": str(tmp / "in.npz"),
            "output": str(tmp / "out.npz"),
            "batch": batch,
        }
        if input_name is not None:
            job["feeds"] = {input_name: "x"}
        (tmp / "jobs.json").write_text(json.dumps([job]))
        env = {**os.environ, "ARM64_CACHE": str(_cache(cache))}
        proc = subprocess.run(
            [str(HERE / "run.sh"), str(HERE / "guest.py"), "infer", str(tmp / "jobs.json")],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"arm64 inference failed (rc {proc.returncode}): {proc.stderr[-2000:]}")
        with np.load(tmp / "out.npz") as data:
            return {k: data[k] for k in data.files}


def arm64_parity(
    model: Path | str,
    x: np.ndarray,
    reference: np.ndarray,
    task: str,
    *,
    output_name: str | None = None,
    input_name: str | None = None,
    batch: int = 64,
    cache: Path | str | None = None,
    timeout: float = 1800,
) -> dict[str, Any]:
    reason = unavailable_reason(cache)
    if reason is not None:
        return {"available": False, "reason": reason}
    start = time.monotonic()
    outputs = arm64_outputs(model, x, input_name=input_name, batch=batch, cache=cache, timeout=timeout)
    got = np.asarray(outputs[output_name] if output_name else next(iter(outputs.values())), dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64).reshape(got.shape)
    diff = np.abs(got - ref)
    result: dict[str, Any] = {
        "available": True,
        "platform": f"arm64 under qemu-user ({os.environ.get('ARM64_CPU', 'cortex-a72')}), onnxruntime CPU",
        "rows": len(got),
        "max_abs_diff": float(diff.max()) if diff.size else 0.0,
        "mean_abs_diff": float(diff.mean()) if diff.size else 0.0,
        "seconds": round(time.monotonic() - start, 1),
    }
    if task == "classification" and got.size:
        result["argmax_agreement"] = float((got.argmax(-1) == ref.argmax(-1)).mean())
    return result
