"""Quantization to int8 with ONNX Runtime, batch-independent by default, and checked.

Settings and why:

* **Static QDQ for every family** (the default, ``mode: auto`` = ``static``): int8
  activations with scales calibrated once on training windows, int8 symmetric
  per-channel weights. Every scale is a constant of the graph, so a row's output
  depends on that row alone, whichever devices share its batch (``verify`` checks it:
  a row alone vs inside batches of 7 and 64). Conv, MatMul and Gemm run on integer
  kernels.
* **Recurrent layers** (LSTM, GRU) have no static integer kernel in ONNX Runtime: their
  weights are stored as int8 (symmetric, per output row) behind a ``DequantizeLinear``
  and the recurrence runs in float: 4 x smaller weights, answers still independent of
  batch mates.
* **Dynamic quantization** (``mode: dynamic``) stays available but is not used by the
  zoo: it picks activation scales from each batch, so a device's answer moves with its
  batch mates (0.07-0.13 % of labels in issue 17's measurement).
* **reduce_range=True everywhere**: weights use 7 bits. ONNX Runtime's x86 integer
  kernels without VNNI (AVX2 ``vpmaddubsw``) add two u8 x s8 products into a signed
  16-bit lane, which saturates when both products are large (255·127·2 > 32767):
  the same model is exact on ARM and on VNNI CPUs and silently wrong on AVX2 ones.
  With 7-bit weights the pair sum is at most 255·64·2 = 32640, so no CPU saturates,
  and every CPU computes the same integers. ``verify`` checks the int8 graph against
  a float simulation of the same quantized graph (ONNX reference evaluator, or ONNX
  Runtime with fusions off) to catch kernel-level errors.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edge.manifest import Manifest
from exporters.data import DataSet
from exporters.metrics import evaluate, headline
from exporters.onnxutil import get_manifest, run_onnx, session, set_manifest
from exporters.recipe import QuantizeSpec


class QuantizeRefused(RuntimeError):
    """int8 lost more than the accuracy budget."""


@dataclass
class QuantizeResult:
    path: Path | None
    mode: str
    settings: dict[str, Any]
    fp32_metrics: dict[str, Any]
    int8_metrics: dict[str, Any]
    loss_points: float
    refused: bool
    message: str


def choose_mode(model: onnx.ModelProto, requested: str) -> str:
    """``auto`` is static QDQ for every architecture: the only batch-independent int8 here."""
    return "static" if requested == "auto" else requested


RECURRENT = ("LSTM", "GRU", "RNN")


def int8_weights_for_recurrent(model: onnx.ModelProto) -> list[str]:
    """Store the W and R initializers of recurrent nodes as int8 behind DequantizeLinear (in place).

    Symmetric per output row (axis 1 of ``[directions, gates*hidden, inputs]``): scale =
    max |w| / 127, zero point 0. The recurrence itself runs in float on the dequantized
    weights, so the result does not depend on other rows of the batch.
    """
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    consumers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    new_nodes: list[onnx.NodeProto] = []
    done: list[str] = []
    for node in model.graph.node:
        if node.op_type in RECURRENT:
            for slot in (1, 2):  # W, R
                name = node.input[slot] if len(node.input) > slot else ""
                if name not in inits or consumers.get(name, 0) != 1:
                    continue
                w = numpy_helper.to_array(inits[name]).astype(np.float32)
                scale = np.abs(w).max(axis=(0, 2)) / 127.0
                scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
                q = np.clip(np.round(w / scale[None, :, None]), -127, 127).astype(np.int8)
                model.graph.initializer.remove(inits[name])
                model.graph.initializer.extend(
                    [
                        numpy_helper.from_array(q, name + "_int8"),
                        numpy_helper.from_array(scale, name + "_scale"),
                        numpy_helper.from_array(np.zeros_like(q[0, :, 0]), name + "_zero"),
                    ]
                )
                new_nodes.append(
                    helper.make_node(
                        "DequantizeLinear",
                        [name + "_int8", name + "_scale", name + "_zero"],
                        [name],
                        name=name + "_dequantize",
                        axis=1,
                    )
                )
                done.append(node.name or node.op_type)
        new_nodes.append(node)
    if done:
        del model.graph.node[:]
        model.graph.node.extend(new_nodes)
    return sorted(set(done))


class _Reader:
    """Calibration data: batches of training inputs."""

    def __init__(self, input_name: str, x: np.ndarray, batch: int = 32) -> None:
        self.items = [{input_name: np.ascontiguousarray(x[i : i + batch])} for i in range(0, len(x), batch)]
        self.pos = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.pos >= len(self.items):
            return None
        self.pos += 1
        return self.items[self.pos - 1]

    def rewind(self) -> None:
        self.pos = 0


def calibration_inputs(ds: DataSet, n: int, seed: int = 0) -> np.ndarray:
    x = ds.model_input(ds.x_train)
    if len(x) > n:
        idx = np.sort(np.random.default_rng(seed).choice(len(x), n, replace=False))
        x = x[idx]
    return np.ascontiguousarray(x, dtype=np.float32)


def _gemm_to_matmul(model: onnx.ModelProto) -> int:
    """Rewrite Gemm(transB=1, alpha=beta=1) as MatMul + Add so dynamic quantization can use MatMulInteger."""
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    new_nodes: list[onnx.NodeProto] = []
    changed = 0
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (
            node.op_type == "Gemm"
            and attrs.get("transA", 0) == 0
            and attrs.get("alpha", 1.0) == 1.0
            and attrs.get("beta", 1.0) == 1.0
            and node.input[1] in inits
        ):
            weight = numpy_helper.to_array(inits[node.input[1]])
            if attrs.get("transB", 0):
                weight = weight.T
            name_w = node.input[1] + "_matmul"
            model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight), name_w))
            mid = node.output[0] + "_mm" if len(node.input) > 2 else node.output[0]
            new_nodes.append(
                helper.make_node("MatMul", [node.input[0], name_w], [mid], name=node.name + "_matmul")
            )
            if len(node.input) > 2:
                new_nodes.append(
                    helper.make_node("Add", [mid, node.input[2]], [node.output[0]], name=node.name + "_add")
                )
            changed += 1
        else:
            new_nodes.append(node)
    if changed:
        del model.graph.node[:]
        model.graph.node.extend(new_nodes)
        used = {i for n in model.graph.node for i in n.input}
        keep = [i for i in model.graph.initializer if i.name in used]
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
    return changed


def compact(model: onnx.ModelProto) -> None:
    """Short names for nodes and internal tensors, no value_info or doc strings: the int8 graph's
    bookkeeping (long generated names such as ``/model/body/.../Relu_output_0_QuantizeLinear_Output``)
    otherwise costs as much as the weights of a small model. Graph inputs and outputs keep their names."""
    keep = {i.name for i in model.graph.input} | {o.name for o in model.graph.output}
    names: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in keep:
            return name
        return names.setdefault(name, f"t{len(names)}")

    for init in model.graph.initializer:
        init.name = short(init.name)
    for i, node in enumerate(model.graph.node):
        node.name = f"n{i}"
        node.doc_string = ""
        node.input[:] = [short(n) for n in node.input]
        node.output[:] = [short(n) for n in node.output]
    del model.graph.value_info[:]


def quantize_model(
    fp32: Path, out: Path, spec: QuantizeSpec, calibration: np.ndarray, mode: str = "auto"
) -> dict[str, Any]:
    """Write the int8 model (manifest included); return the settings used."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_dynamic,
        quantize_static,
    )

    model = onnx.load(str(fp32))
    manifest = get_manifest(model)
    chosen = choose_mode(model, mode)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src.onnx"
        pre = Path(tmp) / "pre.onnx"
        rewritten = _gemm_to_matmul(model) if chosen == "dynamic" else 0
        excluded: list[str] = []
        if spec.keep_first_layer_float:
            first = next((n for n in model.graph.node if n.op_type in ("Conv", "MatMul", "Gemm")), None)
            excluded = [first.name] if first is not None and first.name else []
        onnx.save_model(model, str(src))
        logging.getLogger("root").setLevel(logging.ERROR)
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=False)
        settings: dict[str, Any] = {
            "mode": chosen,
            "per_channel": spec.per_channel,
            "reduce_range": spec.reduce_range,
            "weight_type": "int8 symmetric",
            "preprocess": "onnxruntime.quantization.quant_pre_process",
            "kept_float": excluded,
        }
        if chosen == "static":
            method = {
                "minmax": CalibrationMethod.MinMax,
                "percentile": CalibrationMethod.Percentile,
                "entropy": CalibrationMethod.Entropy,
            }[spec.calibration_method]
            input_name = model.graph.input[0].name
            quantize_static(
                str(pre),
                str(out),
                _Reader(input_name, calibration, batch=32 if spec.calibration_method == "minmax" else 1),
                quant_format=QuantFormat.QDQ,
                nodes_to_exclude=excluded,
                op_types_to_quantize=["Conv", "MatMul", "Gemm"],
                per_channel=spec.per_channel,
                reduce_range=spec.reduce_range,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=method,
                extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
            )
            recurrent = int8_weights_for_recurrent(staged := onnx.load(str(out)))
            if recurrent:
                onnx.save_model(staged, str(out))
                settings["recurrent_weight_only"] = {
                    "nodes": recurrent,
                    "weights": "int8 symmetric per row behind DequantizeLinear; recurrence in float",
                }
            settings.update(
                format="QDQ",
                batch_independent=True,
                activation_type="int8 asymmetric (static, calibrated)",
                calibration={
                    "method": spec.calibration_method,
                    "samples": len(calibration),
                    "source": "training set",
                },
                op_types=["Conv", "MatMul", "Gemm"],
            )
        else:
            ops = ["MatMul", "LSTM"]
            quantize_dynamic(
                str(pre),
                str(out),
                op_types_to_quantize=ops,
                nodes_to_exclude=excluded,
                per_channel=spec.per_channel,
                reduce_range=spec.reduce_range,
                weight_type=QuantType.QInt8,
            )
            settings.update(
                format="QOperator (dynamic)",
                batch_independent=False,
                activation_type="uint8 (dynamic, per batch)",
                op_types=ops,
                gemm_rewritten_to_matmul=rewritten,
            )
    qmodel = onnx.load(str(out))
    compact(qmodel)
    settings["int8_ops"] = sorted(
        {
            n.op_type
            for n in qmodel.graph.node
            if "Integer" in n.op_type or "quantize" in n.op_type.lower() or n.op_type.startswith("QLinear")
        }
    )
    if manifest is not None:
        data = manifest.model_dump(mode="json")
        data["quantization"] = settings
        set_manifest(qmodel, Manifest.model_validate(data))
    onnx.checker.check_model(qmodel)
    onnx.save_model(qmodel, str(out), save_as_external_data=False)
    return settings


def quantize(
    fp32: Path,
    out: Path,
    ds: DataSet,
    spec: QuantizeSpec,
    *,
    mode: str = "auto",
    force: bool = False,
) -> QuantizeResult:
    """Quantize, measure fp32 and int8 on the test split, enforce the accuracy budget."""
    calib = calibration_inputs(ds, spec.calibration_samples)
    settings = quantize_model(fp32, out, spec, calib, mode)
    x_test = ds.model_input(ds.x_test)
    fp32_m = evaluate(ds.task, ds.y_test, run_onnx(session(fp32), x_test), ds.labels)
    int8_m = evaluate(ds.task, ds.y_test, run_onnx(session(out), x_test, batch=1), ds.labels)
    if ds.task == "classification":
        loss = 100.0 * (headline(ds.task, fp32_m) - headline(ds.task, int8_m))
        what = f"accuracy fp32 {fp32_m['accuracy']:.4f} -> int8 {int8_m['accuracy']:.4f}"
    else:  # regression: budget in percent of the fp32 MAE
        base = max(fp32_m["mae"], 1e-9)
        loss = 100.0 * (int8_m["mae"] - fp32_m["mae"]) / base
        what = f"MAE fp32 {fp32_m['mae']:.4g} -> int8 {int8_m['mae']:.4g}"
    refused = loss > spec.budget_points and not force
    if loss > spec.budget_points:
        message = f"int8 loses {loss:.2f} points ({what}), over the budget of {spec.budget_points} points"
        if refused:
            with contextlib.suppress(FileNotFoundError):
                out.unlink()
            message += "; not written (use --force to keep it, or raise --budget)"
        else:
            message += "; kept because of --force"
    else:
        message = f"int8 within budget: {what} (loss {loss:.2f} points, budget {spec.budget_points})"
    return QuantizeResult(
        None if refused else out, settings["mode"], settings, fp32_m, int8_m, loss, refused, message
    )
