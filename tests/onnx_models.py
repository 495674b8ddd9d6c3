"""Small ONNX models built with onnx.helper for daemon tests (no torch needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edge.manifest import MANIFEST_KEY, InputSpec, Manifest, OutputSpec


def _save(graph: onnx.GraphProto, path: Path, manifest: Manifest | None) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    if manifest is not None:
        entry = model.metadata_props.add()
        entry.key = MANIFEST_KEY
        entry.value = manifest.to_json()
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def _snapshot_manifest(name: str, features: list[str], labels: list[str]) -> Manifest:
    return Manifest(
        name=name,
        version="1.0.0",
        task="classification",
        input=InputSpec(name="x", layout="snapshot", features=features),
        output=OutputSpec(name="probs", kind="probabilities"),
        labels=labels,
    )


def weights(features: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(features, classes)).astype(np.float32),
        rng.normal(size=(classes,)).astype(np.float32),
    )


def snapshot_classifier(
    path: Path,
    features: list[str],
    labels: list[str],
    *,
    seed: int = 0,
    name: str = "snap",
    with_manifest: bool = True,
) -> Path:
    """x[B,F] -> softmax(x @ W + b) as 'probs'."""
    w, b = weights(len(features), len(labels), seed)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
        ],
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", len(features)])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", len(labels)])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")],
    )
    manifest = _snapshot_manifest(name, features, labels)
    return _save(graph, path, manifest if with_manifest else None)


def slow_classifier(
    path: Path,
    features: list[str],
    labels: list[str],
    *,
    width: int = 1024,
    depth: int = 16,
    name: str = "slow",
) -> Path:
    """A snapshot classifier that costs width² × depth multiply-adds per item (about 16 M by default):
    for tests that need a model slower than its inputs. One shared weight keeps the file small."""
    rng = np.random.default_rng(7)
    w_in = (rng.normal(size=(len(features), width)) / np.sqrt(len(features))).astype(np.float32)
    w_mid = (rng.normal(size=(width, width)) / np.sqrt(width)).astype(np.float32)
    w_out = (rng.normal(size=(width, len(labels))) / np.sqrt(width)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W_in"], ["h0"])]
    for i in range(depth):
        nodes += [
            helper.make_node("MatMul", [f"h{i}", "W_mid"], [f"m{i}"]),
            helper.make_node("Tanh", [f"m{i}"], [f"h{i + 1}"]),
        ]
    nodes += [
        helper.make_node("MatMul", [f"h{depth}", "W_out"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", len(features)])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", len(labels)])],
        [numpy_helper.from_array(a, n) for a, n in ((w_in, "W_in"), (w_mid, "W_mid"), (w_out, "W_out"))],
    )
    manifest = _snapshot_manifest(name, features, labels)
    return _save(graph, path, manifest)


def window_classifier(
    path: Path, channels: list[str], window: int, labels: list[str], *, seed: int = 1, name: str = "win"
) -> Path:
    """x[B,T,C] -> softmax(mean_t(x) @ W + b + last(x) @ W)."""
    w, b = weights(len(channels), len(labels), seed)
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["x", "axes"], ["m"], keepdims=0),
            helper.make_node("Gather", ["x", "last"], ["l"], axis=1),
            helper.make_node("Add", ["m", "l"], ["ml"]),
            helper.make_node("MatMul", ["ml", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
        ],
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", window, len(channels)])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", len(labels)])],
        [
            numpy_helper.from_array(w, "W"),
            numpy_helper.from_array(b, "b"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "axes"),
            numpy_helper.from_array(np.array(window - 1, dtype=np.int64), "last"),
        ],
    )
    manifest = Manifest(
        name=name,
        version="2.0.0",
        task="classification",
        input=InputSpec(name="x", layout="window", features=channels, window=window),
        output=OutputSpec(name="probs", kind="probabilities"),
        labels=labels,
    )
    return _save(graph, path, manifest)


def regressor(path: Path, features: list[str], *, name: str = "reg", unit: str = "W") -> Path:
    """x[B,F] -> sum(x * w) as 'y' [B,1]."""
    w = np.arange(1, len(features) + 1, dtype=np.float32).reshape(-1, 1)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", len(features)])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])],
        [numpy_helper.from_array(w, "W")],
    )
    manifest = Manifest(
        name=name,
        task="regression",
        input=InputSpec(name="x", layout="snapshot", features=features),
        output=OutputSpec(name="y", kind="value", unit=unit),
    )
    return _save(graph, path, manifest)
