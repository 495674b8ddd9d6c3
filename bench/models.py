"""The benchmark's own models, built with onnx.helper (no torch): a feed-forward classifier for
snapshot pipelines and a small windowed classifier. Their weights are also saved as .npz so the
PyTorch baseline runs exactly the same network in eager mode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edge.manifest import MANIFEST_KEY, InputSpec, Manifest, OutputSpec

FF_FEATURES = [f"f{i}" for i in range(8)]
FF_HIDDEN = 32
LABELS = ["idle", "low", "mid", "high"]
WINDOW_CHANNELS = ["x", "y", "z"]
WINDOW_SIZE = 16


def _save(graph: onnx.GraphProto, path: Path, manifest: Manifest) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    entry = model.metadata_props.add()
    entry.key = MANIFEST_KEY
    entry.value = manifest.to_json()
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def _mlp_weights(inputs: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "W1": (rng.normal(size=(inputs, FF_HIDDEN)) / np.sqrt(inputs)).astype(np.float32),
        "b1": rng.normal(size=(FF_HIDDEN,)).astype(np.float32) * 0.1,
        "W2": (rng.normal(size=(FF_HIDDEN, len(LABELS))) / np.sqrt(FF_HIDDEN)).astype(np.float32),
        "b2": rng.normal(size=(len(LABELS),)).astype(np.float32) * 0.1,
    }


def _mlp_nodes(source: str) -> list[onnx.NodeProto]:
    return [
        helper.make_node("MatMul", [source, "W1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h"]),
        helper.make_node("MatMul", ["h", "W2"], ["l0"]),
        helper.make_node("Add", ["l0", "b2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
    ]


def feed_forward(path: Path, seed: int = 0) -> Path:
    """x[B, 8] -> Linear(32) -> ReLU -> Linear(4) -> softmax; weights also in ``path.with_suffix('.npz')``."""
    w = _mlp_weights(len(FF_FEATURES), seed)
    np.savez(path.with_suffix(".npz"), **w)  # type: ignore[arg-type]
    graph = helper.make_graph(
        _mlp_nodes("x"),
        "bench_ff",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", len(FF_FEATURES)])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", len(LABELS)])],
        [numpy_helper.from_array(v, k) for k, v in w.items()],
    )
    manifest = Manifest(
        name="bench_ff",
        version="1.0.0",
        task="classification",
        input=InputSpec(name="x", layout="snapshot", features=FF_FEATURES),
        output=OutputSpec(name="probs", kind="probabilities"),
        labels=LABELS,
    )
    return _save(graph, path, manifest)


def windowed(path: Path, seed: int = 1) -> Path:
    """x[B, 16, 3] -> flatten -> the same MLP shape."""
    w = _mlp_weights(WINDOW_SIZE * len(WINDOW_CHANNELS), seed)
    shape = numpy_helper.from_array(np.array([-1, WINDOW_SIZE * len(WINDOW_CHANNELS)], np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["flat"]), *_mlp_nodes("flat")],
        "bench_window",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WINDOW_SIZE, len(WINDOW_CHANNELS)])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", len(LABELS)])],
        [shape, *(numpy_helper.from_array(v, k) for k, v in w.items())],
    )
    manifest = Manifest(
        name="bench_window",
        version="1.0.0",
        task="classification",
        input=InputSpec(name="x", layout="window", features=WINDOW_CHANNELS, window=WINDOW_SIZE),
        output=OutputSpec(name="probs", kind="probabilities"),
        labels=LABELS,
    )
    return _save(graph, path, manifest)
