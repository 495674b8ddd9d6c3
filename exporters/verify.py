"""Verify: parity, accuracy, latency and explanations of exported models; card and report.

Everything is measured in one run on this machine, so the fp32/int8 latency
comparison and the accuracies are comparable. Outputs: ``report.json`` (all
numbers) and ``card.md`` (the model card) in ``out_dir``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edge.manifest import read_manifest
from exporters.calibrate import apply_temperature, ece, nll
from exporters.data import DataSet
from exporters.metrics import evaluate, headline
from exporters.onnxutil import check_batch_axes, created_now, get_manifest, run_onnx, session, tool_versions

#: PyTorch vs ONNX fp32: max abs difference for probabilities, relative to the largest
#: output for values in large units
TOL_TORCH_FP32 = 1e-4
#: a row's output alone vs inside a batch: "identical within float rounding". Kernels may sum in
#: another order at another batch size: the appliance fp32 (1460-sample convolutions) moves by up
#: to 3.5e-5; the zoo's static int8 moves by exactly 0; per-batch (dynamic) int8 by 1.8e-4 to 4e-2
TOL_BATCH = 1e-4
BATCH_MATES = (7, 64)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def parity(a: np.ndarray, b: np.ndarray, task: str) -> dict[str, Any]:
    out: dict[str, Any] = {"max_abs_diff": float(np.abs(a - b).max()) if a.size else 0.0}
    if a.size:
        out["mean_abs_diff"] = float(np.abs(a - b).mean())
    if task == "classification" and a.size:
        out["argmax_agreement"] = float((a.argmax(-1) == b.argmax(-1)).mean())
    return out


def kernel_check(int8: Path, x: np.ndarray, task: str) -> dict[str, Any]:
    """ONNX Runtime's fused int8 kernels against a float simulation of the same quantized graph.

    The reference is ``onnx.reference`` (pure numpy, exact integer MatMulInteger) where it
    supports every op, otherwise ONNX Runtime with graph optimizations off (QDQ pairs then
    run as separate Dequantize/float/Quantize nodes). A saturating kernel shows up as a
    large difference here while staying invisible in a plain accuracy number.
    """
    import onnxruntime as ort

    got = run_onnx(session(int8), x, batch=1)
    model = onnx.load(str(int8))
    try:
        from onnx import version_converter
        from onnx.reference import ReferenceEvaluator

        opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
        if opset < 21:  # the reference implements QuantizeLinear/DequantizeLinear from opset 19 on
            model = version_converter.convert_version(model, 21)
        ref_eval = ReferenceEvaluator(model)
        feed = model.graph.input[0].name
        rows: list[np.ndarray] = []
        for i in range(len(x)):
            result: Any = ref_eval.run(None, {feed: x[i : i + 1]})
            rows.append(np.asarray(result[0]))
        ref = np.concatenate(rows)
        method = "onnx.reference.ReferenceEvaluator"
    except Exception as exc:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.intra_op_num_threads = 1
        options.log_severity_level = 3
        sess = ort.InferenceSession(str(int8), options, providers=["CPUExecutionProvider"])
        ref = run_onnx(sess, x, batch=1)
        method = (
            f"onnxruntime without graph optimizations (onnx.reference cannot run this graph: "
            f"{type(exc).__name__}: {str(exc)[:80]})"
        )
    return {"method": method, "samples": len(x), **parity(ref.astype(np.float32), got, task)}


def batch_independence(
    path: Path, x: np.ndarray, *, rows: int = 16, batches: tuple[int, ...] = BATCH_MATES, seed: int = 0
) -> dict[str, Any]:
    """A row's output alone vs the same row inside batches of other rows (``batches`` sizes).

    The batch mates are other inputs of ``x`` (drawn with replacement when ``x`` is short), the
    row at a random position. Passed when every difference is within ``TOL_BATCH``: the answer
    for one device then depends on that device's input only.
    """
    sess = session(path)
    name = sess.get_inputs()[0].name
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(x), min(rows, len(x)), replace=False)
    worst, flips, checked = 0.0, 0, 0
    per_batch: dict[str, float] = {}
    for b in batches:
        batch_worst = 0.0
        for i in picked:
            alone = sess.run(None, {name: np.ascontiguousarray(x[i : i + 1], dtype=np.float32)})[0][0]
            others = np.delete(np.arange(len(x)), i) if len(x) > 1 else np.arange(len(x))
            mates = rng.choice(others, b, replace=len(others) < b)
            pos = int(rng.integers(b))
            mates[pos] = i
            inside = sess.run(None, {name: np.ascontiguousarray(x[mates], dtype=np.float32)})[0][pos]
            diff = float(np.abs(inside.astype(np.float64) - alone.astype(np.float64)).max())
            batch_worst = max(batch_worst, diff)
            flips += int(inside.argmax() != alone.argmax()) if inside.ndim and inside.size > 1 else 0
            checked += 1
        per_batch[f"batch_{b}"] = batch_worst
        worst = max(worst, batch_worst)
    return {
        "rows": len(picked),
        "checks": checked,
        "batches": list(batches),
        "max_abs_diff": worst,
        "max_abs_diff_per_batch": per_batch,
        "argmax_changes": flips,
        "tolerance": TOL_BATCH,
        "independent": worst <= TOL_BATCH,
    }


def latency(
    paths: dict[str, Path],
    sample: np.ndarray,
    batches: tuple[int, ...] = (1, 32),
    min_runs: int = 30,
    seconds: float = 1.0,
) -> dict[str, dict[str, Any]]:
    """Single-thread latency (ms) per model and batch size, models interleaved in one run."""
    sessions = {k: session(p, threads=1) for k, p in paths.items()}
    result: dict[str, dict[str, Any]] = {k: {} for k in paths}
    for b in batches:
        reps = int(np.ceil(b / len(sample)))
        x = np.ascontiguousarray(np.concatenate([sample] * reps)[:b], dtype=np.float32)
        timings: dict[str, list[float]] = {k: [] for k in paths}
        for sess in sessions.values():  # warm-up
            for _ in range(5):
                sess.run(None, {sess.get_inputs()[0].name: x})
        deadline = time.perf_counter() + seconds * len(paths)
        while min(len(t) for t in timings.values()) < min_runs or time.perf_counter() < deadline:
            for key, sess in sessions.items():
                t0 = time.perf_counter_ns()
                sess.run(None, {sess.get_inputs()[0].name: x})
                timings[key].append((time.perf_counter_ns() - t0) / 1e6)
            if min(len(t) for t in timings.values()) >= 5000:
                break
        for key, values in timings.items():
            arr = np.array(values)
            result[key][f"batch_{b}"] = {
                "median_ms": float(np.median(arr)),
                "p90_ms": float(np.percentile(arr, 90)),
                "runs": len(arr),
            }
    return result


def permutation_importance(
    sess: Any, ds: DataSet, x: np.ndarray, y: np.ndarray, *, repeats: int = 3, seed: int = 0
) -> dict[str, Any]:
    """Drop of the headline metric (accuracy, or -MAE) when one input group is shuffled across samples."""
    rng = np.random.default_rng(seed)
    base = headline(ds.task, evaluate(ds.task, y, run_onnx(sess, x), ds.labels))
    groups: dict[str, list[tuple[slice | int, ...]]] = {}
    if ds.layout == "snapshot":
        groups["feature"] = [(slice(None), i) for i in range(x.shape[1])]
        names = {"feature": ds.features}
    elif ds.layout == "window":
        groups["channel"] = [(slice(None), slice(None), i) for i in range(x.shape[2])]
        t_len = x.shape[1]
        edges = np.linspace(0, t_len, 5).astype(int)
        groups["time_segment"] = [(slice(None), slice(int(a), int(b))) for a, b in itertools.pairwise(edges)]
        names = {
            "channel": ds.features,
            "time_segment": [f"samples {a}-{b - 1} (oldest first)" for a, b in itertools.pairwise(edges)],
        }
    else:
        h, w = x.shape[1], x.shape[2]
        groups["row"] = [(slice(None), r) for r in range(h)]
        groups["column"] = [(slice(None), slice(None), c) for c in range(w)]
        names = {"row": [f"row {r}" for r in range(h)], "column": [f"column {c}" for c in range(w)]}
    out: dict[str, Any] = {
        "baseline": base,
        "metric": "accuracy" if ds.task == "classification" else "-MAE",
        "repeats": repeats,
    }
    for kind, index_list in groups.items():
        drops: dict[str, float] = {}
        for name, index in zip(names[kind], index_list, strict=True):
            scores = []
            for _ in range(repeats):
                shuffled = x.copy()
                perm = rng.permutation(len(x))
                shuffled[index] = x[perm][index]
                scores.append(headline(ds.task, evaluate(ds.task, y, run_onnx(sess, shuffled), ds.labels)))
            drops[name] = float(base - np.mean(scores))
        out[kind] = drops
    return out


def minirocket_baseline(ds: DataSet, seed: int = 0) -> dict[str, Any]:
    """MiniRocket (aeon) on the same windows the model sees: last T samples, same train/test split."""
    from aeon.classification.convolution_based import MiniRocketClassifier

    x_fit = np.concatenate([ds.model_input(ds.x_train), ds.model_input(ds.x_val)])
    y_fit = np.concatenate([ds.y_train, ds.y_val])
    t0 = time.perf_counter()
    clf = MiniRocketClassifier(random_state=seed, n_jobs=1)
    clf.fit(np.transpose(x_fit, (0, 2, 1)).astype(np.float64), y_fit)
    pred = clf.predict(np.transpose(ds.model_input(ds.x_test), (0, 2, 1)).astype(np.float64))
    return {
        "name": "MiniRocket (aeon MiniRocketClassifier, default settings)",
        "window": ds.window,
        "fit_on": "train + validation series (same as the network's training data)",
        "accuracy": float((pred.astype(np.int64) == ds.y_test).mean()),
        "seconds": round(time.perf_counter() - t0, 1),
        "seed": seed,
    }


def verify(
    fp32: Path,
    ds: DataSet,
    out_dir: Path,
    *,
    int8: Path | None = None,
    torch_outputs: np.ndarray | None = None,
    baseline: str = "none",
    budget_points: float = 1.0,
    quick: bool = False,
    extra: dict[str, Any] | None = None,
    compare: dict[str, Path] | None = None,
) -> dict[str, Any]:
    """Measure everything, write ``report.json`` and ``card.md`` into ``out_dir``, return the report."""
    from exporters.card import render_card

    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(fp32)  # the daemon's own reader
    if manifest is None:
        raise ValueError(f"{fp32}: no edge-infer manifest (export it with 'edge-infer export')")
    stored = get_manifest(onnx.load(str(fp32)))
    if stored != manifest:
        raise ValueError(f"{fp32}: manifest does not round-trip through ONNX Runtime")
    x = ds.model_input(ds.x_test)
    y = ds.y_test
    task = ds.task
    paths = {"fp32": fp32} | ({"int8": int8} if int8 else {})
    report: dict[str, Any] = {
        "name": manifest.name,
        "version": manifest.version,
        "task": task,
        "created": created_now(),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
        },
        "tools": tool_versions(),
        "dataset": ds.describe(),
        "input": manifest.input.model_dump(mode="json", exclude_none=True),
        "output": manifest.output.model_dump(mode="json", exclude_none=True),
        "labels": manifest.labels,
        "files": {},
        "parity": {},
        "metrics": {},
        "batch_independence": {},
        "notes": [],
    }
    outputs: dict[str, np.ndarray] = {}
    for key, path in paths.items():
        m = read_manifest(path)
        sess = session(path)
        report["files"][key] = {
            "path": path.name,
            "size_bytes": path.stat().st_size,
            "sha256": sha256_file(path),
            "manifest_reads": m is not None,
            "axes": check_batch_axes(sess, manifest.input.sample_shape(), False),
        }
        if m is not None and m.quantization:
            report["files"][key]["quantization"] = m.quantization
        # int8 at batch 1: dynamic quantization scales activations per batch, so a sample's
        # int8 output depends (slightly) on its batch mates; batch 1 is one device at a time
        outputs[key] = run_onnx(sess, x, batch=1 if key == "int8" else 256)
        report["metrics"][key] = evaluate(task, y, outputs[key], ds.labels)
        if task == "classification":
            report["metrics"][key].update(ece=ece(outputs[key], y), nll=nll(outputs[key], y))
        report["batch_independence"][key] = batch_independence(path, x, rows=4 if quick else 16)
        if not report["batch_independence"][key]["independent"]:
            report["notes"].append(
                f"{key}: a row's output changes with its batch mates "
                f"(max abs diff {report['batch_independence'][key]['max_abs_diff']:.2e})"
            )
    temperature = (manifest.provenance.get("calibration") or {}).get("temperature")
    if torch_outputs is not None and temperature and task == "classification":
        # the checkpoint predates calibration: compare with the same temperature applied
        torch_outputs = apply_temperature(torch_outputs, float(temperature)).astype(np.float32)
        report["notes"].append(
            f"PyTorch outputs compared with the folded temperature {temperature:.3f} applied"
        )
    if torch_outputs is not None:
        report["metrics"]["pytorch"] = evaluate(task, y, torch_outputs, ds.labels)
        tolerance = TOL_TORCH_FP32 * max(1.0, float(np.abs(torch_outputs).max()))
        report["parity"]["pytorch_vs_fp32"] = parity(torch_outputs, outputs["fp32"], task) | {
            "tolerance_max_abs": tolerance
        }
        if report["parity"]["pytorch_vs_fp32"]["max_abs_diff"] > tolerance:
            report["notes"].append("ONNX fp32 differs from PyTorch beyond the tolerance")
    if int8:
        quant = report["files"]["int8"].get("quantization", {})
        if quant.get("mode") == "dynamic":
            report["notes"].append(
                "int8 is dynamically quantized: activation scales come from each batch, so a sample's "
                "output can change slightly with its batch mates; int8 numbers here are measured at batch 1"
            )
        report["parity"]["fp32_vs_int8"] = parity(outputs["fp32"], outputs["int8"], task)
        n_ref = min(len(x), 4 if quick else 16)
        report["parity"]["int8_kernels_vs_reference"] = kernel_check(int8, x[:n_ref], task)
        loss = headline(task, report["metrics"]["fp32"]) - headline(task, report["metrics"]["int8"])
        report["int8_loss_points"] = float(100.0 * loss) if task == "classification" else float(loss)
    report["latency_single_thread"] = latency(
        paths | (compare or {}), x[:32], seconds=0.2 if quick else 1.0, min_runs=10 if quick else 50
    )
    report["importance"] = permutation_importance(session(fp32), ds, x, y, repeats=1 if quick else 3)
    if baseline == "minirocket" and task == "classification" and ds.layout == "window":
        report["baseline"] = minirocket_baseline(ds)
    if task == "classification":
        from exporters.plots import plot_confusion

        best = "int8" if int8 else "fp32"
        plot_confusion(
            report["metrics"][best]["confusion_matrix"],
            ds.labels,
            out_dir / "confusion_matrix.png",
            f"{manifest.name}: test confusion ({best} ONNX)",
        )
    report["recommended"], reason = _recommend(report, budget_points)
    report["notes"].append(reason)
    if extra:
        report.update(extra)
    (out_dir / "report.json").write_text(
        json.dumps(report, indent=2, sort_keys=False) + "\n", encoding="utf-8"
    )
    (out_dir / "card.md").write_text(render_card(report, manifest), encoding="utf-8")
    return report


def _recommend(report: dict[str, Any], budget_points: float) -> tuple[str, str]:
    if "int8" not in report["files"]:
        return "fp32", "no int8 model: fp32 is the file to use"
    lat = report["latency_single_thread"]
    f1, i1 = lat["fp32"]["batch_1"]["median_ms"], lat["int8"]["batch_1"]["median_ms"]
    loss = report["int8_loss_points"] if report["task"] == "classification" else 0.0
    if loss > budget_points:
        return "fp32", f"int8 loses {loss:.2f} accuracy points (budget {budget_points}): use fp32"
    if i1 > f1:
        return "fp32", (
            f"int8 is slower than fp32 on this CPU at batch 1 ({i1:.3f} ms vs {f1:.3f} ms, "
            "single thread): fp32 stays the recommended file here; int8 still saves "
            "size and may be faster on ARM"
        )
    return "int8", f"int8 is within budget and faster at batch 1 ({i1:.3f} ms vs {f1:.3f} ms)"
