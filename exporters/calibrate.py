"""Confidence calibration: temperature scaling fitted on held-out data, folded into the graph.

A classifier's probabilities are ``softmax(z)``. Temperature scaling (Guo et al. 2017)
replaces them by ``softmax(z / T)`` with one scalar ``T`` chosen to minimise the
negative log-likelihood on data the network was not trained on: ``T > 1`` softens an
over-confident model, ``T < 1`` sharpens an under-confident one. The argmax (and so
the accuracy) does not change. ``log p`` equals ``z`` up to a constant per row, and
softmax ignores such constants, so ``T`` is fitted on the exported model's own
probabilities and needs neither torch nor the logits.

Folding: a ``Mul`` by ``1/T`` goes in front of the graph's final ``Softmax``, so the
exported file returns calibrated probabilities and the daemon changes nothing.

Held-out data: the recipe's validation split when it has one; otherwise (the zoo's
small official splits put every training series into training) out-of-fold outputs of
a K-fold cross-fit: K models of the same recipe, each trained without one fold, each
predicting the fold it did not see (see ``exporters.zoo``).

Measures: expected calibration error (ECE; 15 equal-width confidence bins, the
weighted mean of |accuracy - mean confidence| per bin), NLL and a reliability diagram.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from numpy.typing import NDArray

#: bins of the expected calibration error (equal width over (0, 1])
ECE_BINS = 15
#: fitted temperatures are kept within these bounds
T_MIN, T_MAX = 0.05, 20.0
_EPS = 1e-12


def reliability(probs: NDArray[Any], y: NDArray[Any], bins: int = ECE_BINS) -> list[dict[str, float]]:
    """Per confidence bin: range, count, accuracy and mean confidence (empty bins left out)."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y
    edges = np.linspace(0.0, 1.0, bins + 1)
    rows: list[dict[str, float]] = []
    for lo, hi in itertools.pairwise(edges):
        mask = (conf > lo) & (conf <= hi)
        if mask.any():
            rows.append(
                {
                    "lo": float(lo),
                    "hi": float(hi),
                    "n": int(mask.sum()),
                    "accuracy": float(correct[mask].mean()),
                    "confidence": float(conf[mask].mean()),
                }
            )
    return rows


def ece(probs: NDArray[Any], y: NDArray[Any], bins: int = ECE_BINS) -> float:
    """Expected calibration error of the top-class confidence."""
    n = len(y)
    if n == 0:
        return 0.0
    return float(sum(r["n"] / n * abs(r["accuracy"] - r["confidence"]) for r in reliability(probs, y, bins)))


def nll(probs: NDArray[Any], y: NDArray[Any]) -> float:
    """Mean negative log-likelihood of the true class."""
    if len(y) == 0:
        return 0.0
    p = probs[np.arange(len(y)), y.astype(np.int64)]
    return float(-np.log(np.clip(p, _EPS, 1.0)).mean())


def calibration_metrics(probs: NDArray[Any], y: NDArray[Any]) -> dict[str, Any]:
    return {
        "ece": ece(probs, y),
        "nll": nll(probs, y),
        "mean_confidence": float(probs.max(axis=1).mean()) if len(y) else 0.0,
        "accuracy": float((probs.argmax(axis=1) == y).mean()) if len(y) else 0.0,
        "bins": ECE_BINS,
        "reliability": reliability(probs, y),
    }


def ece_noise_floor(probs: NDArray[Any], draws: int = 2000, seed: int = 0) -> dict[str, float]:
    """ECE that a *perfectly calibrated* model with these confidences shows on this many samples.

    Each sample is right with probability equal to its confidence; the ECE of such draws is pure
    sampling noise. On small test splits it is far from zero (100 samples in 15 bins: several
    points), so a measured ECE below its 90th percentile shows no detectable miscalibration.
    """
    rng = np.random.default_rng(seed)
    conf = probs.max(axis=1)
    pred = probs.argmax(axis=1)
    other = (pred + 1) % probs.shape[1]
    values = [ece(probs, np.where(rng.random(len(conf)) < conf, pred, other)) for _ in range(draws)]
    return {
        "mean": float(np.mean(values)),
        "p90": float(np.percentile(values, 90)),
        "p_at_most_0.03": float(np.mean(np.array(values) <= 0.03)),
        "draws": draws,
    }


def apply_temperature(probs: NDArray[Any], temperature: float) -> NDArray[np.float64]:
    """``softmax(log p / T)``: what the folded graph returns for a model that returned ``p``."""
    z = np.log(np.clip(probs.astype(np.float64), _EPS, 1.0)) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    out: NDArray[np.float64] = e / e.sum(axis=1, keepdims=True)
    return out


def fit_temperature(probs: NDArray[Any], y: NDArray[Any]) -> float:
    """The T in [T_MIN, T_MAX] minimising the NLL of ``softmax(log p / T)`` (golden-section on log T)."""
    if len(y) == 0:
        raise ValueError("no held-out samples to fit a temperature on")

    def loss(log_t: float) -> float:
        return nll(apply_temperature(probs, float(np.exp(log_t))), y)

    # coarse grid first (the NLL in log T is unimodal for softmax models, but be safe), then refine
    grid = np.linspace(np.log(T_MIN), np.log(T_MAX), 61)
    best = int(np.argmin([loss(g) for g in grid]))
    a, b = grid[max(0, best - 1)], grid[min(len(grid) - 1, best + 1)]
    ratio = (np.sqrt(5.0) - 1.0) / 2.0
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = loss(c), loss(d)
    for _ in range(60):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = loss(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = loss(d)
    return float(np.exp((a + b) / 2.0))


def fold_temperature(model: onnx.ModelProto, temperature: float, output: str = "probabilities") -> None:
    """Insert ``Mul(x, 1/T)`` before the Softmax that writes ``output`` (in place)."""
    from onnx import helper, numpy_helper

    nodes = list(model.graph.node)
    idx = next((i for i, n in enumerate(nodes) if n.op_type == "Softmax" and output in n.output), None)
    if idx is None:
        raise ValueError(f"no Softmax node writes the graph output {output!r}: cannot fold a temperature")
    softmax = nodes[idx]
    if any(n.name == "calibration_temperature" for n in nodes):
        raise ValueError("the graph already carries a calibration temperature")
    scale = "calibration_inv_temperature"
    scaled = "calibration_scaled_logits"
    model.graph.initializer.append(numpy_helper.from_array(np.array(1.0 / temperature, np.float32), scale))
    mul = helper.make_node("Mul", [softmax.input[0], scale], [scaled], name="calibration_temperature")
    softmax.input[0] = scaled
    nodes.insert(idx, mul)
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def calibration_record(
    temperature: float,
    held_out: str,
    n_held_out: int,
    before_val: dict[str, Any],
    after_val: dict[str, Any],
) -> dict[str, Any]:
    """What goes into the manifest's ``calibration`` (and the report)."""
    return {
        "method": "temperature scaling (one scalar, NLL on held-out data), folded into the graph",
        "temperature": temperature,
        "fitted_on": held_out,
        "n": n_held_out,
        "held_out_before": {k: before_val[k] for k in ("ece", "nll")},
        "held_out_after": {k: after_val[k] for k in ("ece", "nll")},
    }


def strip_temperature(model: onnx.ModelProto) -> bool:
    """Remove a folded temperature (in place); True if there was one. Re-calibration starts from here."""
    nodes = list(model.graph.node)
    mul = next((n for n in nodes if n.name == "calibration_temperature"), None)
    if mul is None:
        return False
    for node in nodes:
        node.input[:] = [mul.input[0] if name == mul.output[0] else name for name in node.input]
    nodes.remove(mul)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    keep = [i for i in model.graph.initializer if i.name != mul.input[1]]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return True


def calibrate_file(
    src: Path, dst: Path, probs_held_out: NDArray[Any], y_held_out: NDArray[Any], fitted_on: str
) -> dict[str, Any]:
    """Fit T on ``src``'s held-out probabilities, write ``src`` with T folded in to ``dst``.

    The manifest keeps everything and gains ``provenance.calibration`` (the daemon ignores it).
    """
    from edge.manifest import Manifest
    from exporters.onnxutil import get_manifest, set_manifest

    temperature = fit_temperature(probs_held_out, y_held_out)
    before = calibration_metrics(probs_held_out, y_held_out)
    after = calibration_metrics(apply_temperature(probs_held_out, temperature), y_held_out)
    record = calibration_record(temperature, fitted_on, len(y_held_out), before, after)
    model = onnx.load(str(src))
    strip_temperature(model)
    fold_temperature(model, temperature)
    manifest = get_manifest(model)
    if manifest is not None:
        data = manifest.model_dump(mode="json")
        data["provenance"] = {**data.get("provenance", {}), "calibration": record}
        set_manifest(model, Manifest.model_validate(data))
    onnx.checker.check_model(model)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(dst), save_as_external_data=False)
    return record


def calibrate_files(
    raw: dict[str, Path],
    final: dict[str, Path],
    *,
    x_test: NDArray[Any],
    y_test: NDArray[Any],
    probs_held_out: dict[str, NDArray[Any]],
    y_held_out: NDArray[Any],
    fitted_on: str,
    plot: Path | None = None,
    name: str = "model",
    apply: bool = True,
) -> dict[str, Any]:
    """Calibrate each ``raw[kind]`` into ``final[kind]``; test-split ECE/NLL before and after.

    ``apply=False`` (recipe ``calibration.method: none``) fits and reports the temperature but
    writes the files unchanged: the card then shows what it would have done.
    """
    from exporters.onnxutil import run_onnx, session

    files: dict[str, Any] = {}
    curves: dict[str, list[dict[str, float]]] = {}
    for kind, src in raw.items():
        before = run_onnx(session(src), x_test, batch=1)  # measured before the source is replaced
        record = calibrate_file(src, final[kind], probs_held_out[kind], y_held_out, fitted_on)
        after = run_onnx(session(final[kind]), x_test, batch=1)
        if not apply:
            candidate = {
                "temperature": record["temperature"],
                "test_ece_if_applied": ece(after, y_test),
                "test_nll_if_applied": nll(after, y_test),
            }
            model = onnx.load(str(src))
            strip_temperature(model)
            onnx.save_model(model, str(final[kind]), save_as_external_data=False)
            after = before
            record = {
                "temperature": 1.0,
                "held_out_before": record["held_out_before"],
                "held_out_after": record["held_out_before"],
                "not_applied": candidate,
            }
        files[kind] = {
            "temperature": record["temperature"],
            "held_out_before": record["held_out_before"],
            "held_out_after": record["held_out_after"],
            "test_before": calibration_metrics(before, y_test),
            "test_after": calibration_metrics(after, y_test),
            # the folded graph returns what softmax(log p / T) predicts
            "graph_vs_formula_max_abs_diff": float(
                np.abs(apply_temperature(before, record["temperature"]) - after).max()
            ),
        }
        files[kind]["ece_if_perfectly_calibrated"] = ece_noise_floor(after)
        if "not_applied" in record:
            files[kind]["not_applied"] = record["not_applied"]
            curves[f"{kind} (served, T=1)"] = files[kind]["test_before"]["reliability"]
        else:
            curves[f"{kind} before (T=1)"] = files[kind]["test_before"]["reliability"]
            curves[f"{kind} after (T={record['temperature']:.2f})"] = files[kind]["test_after"]["reliability"]
    if plot is not None:
        from exporters.plots import plot_reliability

        plot_reliability(curves, plot, f"{name}: reliability on the test split")
    return {
        "method": "temperature scaling: one scalar T per file minimising the NLL on held-out data, "
        "folded into the graph (Mul by 1/T before the final Softmax; argmax unchanged)"
        if apply
        else "none: a temperature was fitted on the held-out data below but NOT applied (see the note)",
        "applied": apply,
        "fitted_on": fitted_on,
        "bins": ECE_BINS,
        "files": files,
    }
