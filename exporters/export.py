"""Export: a checkpoint in, one self-contained ONNX file with its manifest out."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from edge.drift import FeatureStats
from edge.manifest import InputSpec, Manifest, Normalisation, OutputSpec
from exporters.onnxutil import (
    ExportError,
    check_batch_axes,
    created_now,
    run_onnx,
    session,
    set_manifest,
    tool_versions,
)
from exporters.recipe import PER_WINDOW_KINDS
from exporters.train import Checkpoint, load_checkpoint, predict

OPSET = 17
INPUT_NAME = "input"


def output_name(task: str) -> str:
    return "probabilities" if task == "classification" else "value"


def dynamic_time(ckpt: Checkpoint) -> bool:
    """Whether the architecture takes any window length (pooling or recurrence over time)."""
    return ckpt.meta["layout"] == "window" and ckpt.recipe.model.family in ("cnn1d", "lstm", "gru")


def headline_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    keep = ("accuracy", "macro_f1", "mae", "rmse", "n")
    return {k: v for k, v in metrics.items() if k in keep}


def build_manifest(ckpt: Checkpoint, quantization: dict[str, Any] | None = None) -> Manifest:
    meta, recipe = ckpt.meta, ckpt.recipe
    layout = meta["layout"]
    grid = tuple(meta["grid"]) if meta.get("grid") else None
    input_spec = InputSpec(
        name=INPUT_NAME,
        layout=layout,
        features=meta["features"] if layout != "grid" else [],
        window=meta["window"] if layout == "window" else None,
        sample_period_s=meta.get("sample_period_s") if layout == "window" else None,
        grid=grid,
        units=meta["units"],
    )
    task = meta["task"]
    output = OutputSpec(
        name=output_name(task),
        kind="probabilities" if task == "classification" else "value",
        unit=recipe.output_unit,
    )
    norm = recipe.model.normalisation
    metrics: dict[str, Any] = {}
    if "test" in ckpt.metrics:
        metrics["pytorch_test"] = headline_metrics(ckpt.metrics["test"])
    if "val" in ckpt.metrics:
        metrics["pytorch_val"] = headline_metrics(ckpt.metrics["val"])
    graph_norm: dict[str, Any] = {"kind": norm}
    if norm in ("zscore", "per_window_level"):  # per_window_level: of the log level
        graph_norm.update(mean=meta["norm_mean"], std=meta["norm_std"])
    stats = meta.get("training_stats")
    return Manifest(
        training_stats=[FeatureStats.model_validate(s) for s in stats] if stats else None,
        name=recipe.name,
        version=recipe.version,
        task=task,
        description=recipe.description,
        input=input_spec,
        output=output,
        labels=meta["labels"] if task == "classification" else [],
        normalisation=Normalisation(kind="in_graph", per_window=norm in PER_WINDOW_KINDS),
        metrics=metrics,
        dataset=meta["dataset"],
        created=created_now(),
        weights_sha256=ckpt.weights_sha256,
        quantization=quantization,
        provenance={
            "recipe": recipe.model_dump(mode="json"),
            "seed": recipe.train.seed,
            "tools": tool_versions(),
            "graph_normalisation": graph_norm,
            "family": recipe.model.family,
            "dynamic_time_axis": dynamic_time(ckpt),
        },
    )


def _simplify(model: onnx.ModelProto, sample: np.ndarray) -> tuple[onnx.ModelProto, str]:
    """Constant folding and dead-code removal with onnxscript, kept only if outputs are unchanged."""
    try:
        import onnxscript.optimizer
    except ImportError:
        return model, "skipped (onnxscript not installed)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            simplified = onnxscript.optimizer.optimize(model)
        onnx.checker.check_model(simplified, full_check=True)
        before = run_onnx(session(model.SerializeToString()), sample)
        after = run_onnx(session(simplified.SerializeToString()), sample)
    except Exception as exc:
        return model, f"skipped ({type(exc).__name__}: {exc})"
    if not np.allclose(before, after, rtol=1e-5, atol=1e-6):
        return model, "skipped (outputs changed)"
    return simplified, f"onnxscript optimizer: {len(model.graph.node)} -> {len(simplified.graph.node)} nodes"


def export(
    checkpoint: Path | Checkpoint, out: Path, opset: int = OPSET, sample: np.ndarray | None = None
) -> dict[str, Any]:
    """Export to ``out`` (fp32). Returns a summary with parity and axis checks."""
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    served = ckpt.served.eval()
    shape = tuple(ckpt.meta["sample_shape"])
    time_dyn = dynamic_time(ckpt)
    out_name = output_name(ckpt.meta["task"])
    axes: dict[str, dict[int, str]] = {INPUT_NAME: {0: "batch"}, out_name: {0: "batch"}}
    if time_dyn:
        axes[INPUT_NAME][1] = "time"
    dummy = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter announces its deprecation
        torch.onnx.export(
            served,
            (dummy,),
            str(Path(tmp) / "model.onnx"),
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[out_name],
            dynamic_axes=axes,  # type: ignore[arg-type,unused-ignore]
            opset_version=opset,
            do_constant_folding=True,
        )
        model = onnx.load_model(str(Path(tmp) / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    if sample is None:
        sample = np.random.default_rng(1).normal(size=(16, *shape)).astype(np.float32) * 3.0
    model, simplification = _simplify(model, sample)
    model.producer_name = "edge-infer exporters"
    model.doc_string = f"{ckpt.recipe.name} {ckpt.recipe.version}: {ckpt.recipe.description}".strip()
    manifest = build_manifest(ckpt)
    set_manifest(model, manifest)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(out), save_as_external_data=False)
    if out.with_name(out.name + ".data").exists():
        raise ExportError(f"{out}: an external data file was written; the model must be self-contained")
    sess = session(out)
    axes_ok = check_batch_axes(sess, shape, time_dyn)
    ref = predict(served, sample)
    got = run_onnx(sess, sample)
    max_abs = float(np.abs(ref - got).max())
    tolerance = 1e-4 * max(1.0, float(np.abs(ref).max()))  # values in large units: relative
    if max_abs > tolerance:
        raise ExportError(
            f"ONNX fp32 differs from PyTorch by {max_abs:.2e} (> {tolerance:.1e}) on a random batch"
        )
    return {
        "path": str(out),
        "size_bytes": out.stat().st_size,
        "opset": opset,
        "dynamic_axes": {k: {str(a): n for a, n in v.items()} for k, v in axes.items()},
        "axes_check": axes_ok,
        "simplification": simplification,
        "random_input_max_abs_diff": max_abs,
    }
