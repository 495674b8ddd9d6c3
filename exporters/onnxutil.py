"""ONNX and ONNX Runtime helpers shared by export, quantize and verify (no torch needed)."""

from __future__ import annotations

import datetime as dt
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edge.manifest import MANIFEST_KEY, Manifest


class ExportError(RuntimeError):
    """The exported graph failed a check (shape, parity, dynamic axes)."""


def tool_versions() -> dict[str, str]:
    import importlib.metadata

    import onnxruntime

    from edge import __version__

    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = "not installed"
    return {
        "edge_infer": __version__,
        "torch": torch_version,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
    }


def created_now() -> str:
    """ISO 8601 UTC time; ``SOURCE_DATE_EPOCH`` pins it for reproducible builds."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    moment = dt.datetime.fromtimestamp(int(epoch), tz=dt.UTC) if epoch else dt.datetime.now(tz=dt.UTC)
    return moment.replace(microsecond=0).isoformat()


def set_manifest(model: onnx.ModelProto, manifest: Manifest) -> None:
    """Write (or replace) the manifest in ``metadata_props``."""
    kept = [p for p in model.metadata_props if p.key != MANIFEST_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=MANIFEST_KEY, value=manifest.to_json())


def get_manifest(model: onnx.ModelProto) -> Manifest | None:
    for prop in model.metadata_props:
        if prop.key == MANIFEST_KEY:
            return Manifest.from_json(prop.value, "model")
    return None


def session(path_or_bytes: Path | bytes, threads: int = 1) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    source = str(path_or_bytes) if isinstance(path_or_bytes, Path) else path_or_bytes
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run_onnx(sess: Any, x: np.ndarray, batch: int = 256) -> np.ndarray:
    name = sess.get_inputs()[0].name
    outs = [
        sess.run(None, {name: np.ascontiguousarray(x[i : i + batch], dtype=np.float32)})[0]
        for i in range(0, len(x), batch)
    ]
    return np.concatenate(outs)


def check_batch_axes(sess: Any, sample_shape: tuple[int, ...], time_dynamic: bool) -> dict[str, Any]:
    """Run batch 1 and 7 (and a shorter window when the time axis is dynamic)."""
    rng = np.random.default_rng(0)
    name = sess.get_inputs()[0].name
    shapes: dict[str, Any] = {}
    for b in (1, 7):
        out = sess.run(None, {name: rng.normal(size=(b, *sample_shape)).astype(np.float32)})[0]
        if out.shape[0] != b:
            raise ExportError(f"batch {b} gave output shape {out.shape}")
        shapes[f"batch_{b}"] = list(out.shape)
    if time_dynamic:
        shorter = (max(2, sample_shape[0] // 2), *sample_shape[1:])
        out = sess.run(None, {name: rng.normal(size=(3, *shorter)).astype(np.float32)})[0]
        shapes[f"time_{shorter[0]}"] = list(out.shape)
    return shapes
