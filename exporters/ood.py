"""Open set: an out-of-distribution score computed in the graph, beside the probabilities.

A classifier always answers one of its classes, also for an appliance it has never seen.
This module adds a second named graph output, ``ood_score``, to an exported classifier:
the energy score (Liu et al. 2020) of the logits that feed the final ``Softmax``,

    ood_score = -logsumexp(z)        (shape [batch, 1]; higher = less like the training data)

where ``z`` is the Softmax input (the logits, divided by the calibration temperature when
one is folded in). The branch only reads ``z``: the ``probabilities`` output is bit for bit
what it was, and the daemon, which reads the output named in the manifest, keeps working.

The threshold is chosen on held-out data of the known classes only (no unseen examples are
needed): the ``1 - tpr`` quantile of their scores, so that a share ``tpr`` (default 0.95) of
known inputs stays below it. It is recorded in the manifest under
``provenance["ood"] = {"output": "ood_score", "score": "energy", "threshold": t, ...}``.

Limitation (stated in docs/exporting.md): energy is low for inputs far from everything when
a model's logits grow without bound away from the data (a linear head does); it flags inputs
that excite no class strongly.

``python -m exporters.ood acsf1 --holdout 3 8`` runs the leave-classes-out experiment on the
appliance recipe (ACSF1: the held-out appliance types never reach training); ``python -m exporters.ood
plaid`` the same on PLAID (sktime's data files; the recipe with ``per_window_level`` and no input
noise: docs/exporting.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import helper

OOD_OUTPUT = "ood_score"
DEFAULT_TPR = 0.95


def auroc(known: NDArray[Any], unknown: NDArray[Any]) -> float:
    """Area under the ROC curve of ``score`` as a detector of ``unknown`` (Mann-Whitney, ties halved)."""
    k = np.asarray(known, dtype=np.float64).ravel()
    u = np.asarray(unknown, dtype=np.float64).ravel()
    if len(k) == 0 or len(u) == 0:
        raise ValueError("AUROC needs known and unknown scores")
    allv = np.concatenate([k, u])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv))
    ranks[order] = np.arange(1, len(allv) + 1)
    # average ranks of ties
    _, inv, counts = np.unique(allv, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    ranks = (sums / counts)[inv]
    r_u = ranks[len(k) :].sum()
    return float((r_u - len(u) * (len(u) + 1) / 2) / (len(k) * len(u)))


def energy(logits: NDArray[Any]) -> NDArray[np.float64]:
    """``-logsumexp(z)`` per row (numpy reference of the graph branch)."""
    z = np.asarray(logits, dtype=np.float64)
    m = z.max(axis=1, keepdims=True)
    out: NDArray[np.float64] = -(m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]
    return out


def choose_threshold(known_scores: NDArray[Any], tpr: float = DEFAULT_TPR) -> float:
    """The score below which a share ``tpr`` of held-out known inputs falls."""
    s = np.asarray(known_scores, dtype=np.float64).ravel()
    if len(s) == 0:
        raise ValueError("no held-out scores to choose an OOD threshold on")
    if not 0.0 < tpr < 1.0:
        raise ValueError(f"tpr must be in (0, 1), not {tpr}")
    return float(np.quantile(s, tpr, method="higher"))


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)


def add_energy_output(model: onnx.ModelProto, output: str = "probabilities") -> None:
    """Add ``ood_score = -ReduceLogSumExp(softmax input)`` as a graph output (in place)."""
    graph = model.graph
    if any(o.name == OOD_OUTPUT for o in graph.output):
        return
    softmax = next((n for n in graph.node if n.op_type == "Softmax" and output in n.output), None)
    if softmax is None:
        raise ValueError(f"no Softmax node writes the graph output {output!r}: cannot add an OOD score")
    lse = "ood_logsumexp"
    if _opset(model) >= 18:
        axes = helper.make_tensor("ood_axes", onnx.TensorProto.INT64, [1], [1])
        graph.initializer.append(axes)
        node = helper.make_node(
            "ReduceLogSumExp", [softmax.input[0], "ood_axes"], [lse], keepdims=1, name="ood_lse"
        )
    else:
        node = helper.make_node(
            "ReduceLogSumExp", [softmax.input[0]], [lse], axes=[1], keepdims=1, name="ood_lse"
        )
    graph.node.append(node)
    graph.node.append(helper.make_node("Neg", [lse], [OOD_OUTPUT], name="ood_energy"))
    graph.output.append(helper.make_tensor_value_info(OOD_OUTPUT, onnx.TensorProto.FLOAT, ["batch", 1]))
    onnx.checker.check_model(model)


def penultimate(model: onnx.ModelProto, output: str = "probabilities") -> str:
    """Name of the tensor the classifier head (the last Gemm / MatMul before the Softmax) reads."""
    producers = {o: n for n in model.graph.node for o in n.output}
    consts = {i.name for i in model.graph.initializer} | {
        n.output[0] for n in model.graph.node if n.op_type == "Constant"
    }
    softmax = next((n for n in model.graph.node if n.op_type == "Softmax" and output in n.output), None)
    if softmax is None:
        raise ValueError(f"no Softmax node writes {output!r}")
    name = softmax.input[0]
    for _ in range(8):
        node = producers.get(name)
        if node is None:
            break
        if node.op_type in ("Gemm", "MatMul"):
            return str(node.input[0])
        # calibration Mul, bias Add, DequantizeLinear/QuantizeLinear around the head: walk back
        data = [i for i in node.input if i and i not in consts]
        if not data:
            break
        name = data[0]
    raise ValueError("cannot find the classifier head (Gemm / MatMul) before the Softmax")


def fit_feature_distance(
    feats: NDArray[Any], y: NDArray[Any], shrinkage: float = 0.1
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Class means and a whitening ``L`` (``L @ L.T`` = shrunk inverse shared covariance)."""
    f = np.asarray(feats, dtype=np.float64)
    classes = np.unique(y)
    means = np.stack([f[y == c].mean(axis=0) for c in classes])
    centred = f - means[np.searchsorted(classes, y)]
    cov = centred.T @ centred / max(1, len(f) - len(classes))
    cov = (1 - shrinkage) * cov + shrinkage * np.trace(cov) / len(cov) * np.eye(len(cov))
    prec = np.linalg.inv(cov)
    w, v = np.linalg.eigh((prec + prec.T) / 2)
    whiten = v * np.sqrt(np.clip(w, 0, None))
    return means.astype(np.float32), whiten.astype(np.float32)


def add_feature_distance_output(
    model: onnx.ModelProto, means: NDArray[np.float32], whiten: NDArray[np.float32], feature: str
) -> None:
    """``ood_score = min_k |(f - mu_k) L|^2`` (Mahalanobis distance to the nearest class mean)."""
    from onnx import numpy_helper

    graph = model.graph
    if any(o.name == OOD_OUTPUT for o in graph.output):
        raise ValueError("the graph already has an OOD output")
    m = means @ whiten  # [K, D]
    graph.initializer.extend(
        [
            numpy_helper.from_array(whiten.astype(np.float32), "ood_whiten"),
            numpy_helper.from_array(m.T.astype(np.float32), "ood_means_t"),
            numpy_helper.from_array((m**2).sum(axis=1)[None, :].astype(np.float32), "ood_means_sq"),
            numpy_helper.from_array(np.array(-2.0, np.float32), "ood_minus_two"),
        ]
    )
    graph.node.extend(
        [
            helper.make_node("Flatten", [feature], ["ood_f"], axis=1, name="ood_flatten"),
            helper.make_node("MatMul", ["ood_f", "ood_whiten"], ["ood_g"], name="ood_g"),
            helper.make_node("Mul", ["ood_g", "ood_g"], ["ood_g2"], name="ood_g2"),
            helper.make_node("ReduceSum", ["ood_g2"], ["ood_gsq"], keepdims=1, name="ood_gsq"),
            helper.make_node("MatMul", ["ood_g", "ood_means_t"], ["ood_cross"], name="ood_cross"),
            helper.make_node("Mul", ["ood_cross", "ood_minus_two"], ["ood_cross2"], name="ood_cross2"),
            helper.make_node("Add", ["ood_gsq", "ood_cross2"], ["ood_d0"], name="ood_d0"),
            helper.make_node("Add", ["ood_d0", "ood_means_sq"], ["ood_d"], name="ood_d"),
        ]
    )
    # ReduceMin takes its axes as an input from opset 18, as an attribute before
    if _opset(model) >= 18:
        graph.node.append(
            helper.make_node("ReduceMin", ["ood_d", "ood_axis1"], [OOD_OUTPUT], keepdims=1, name="ood_min")
        )
    else:
        graph.node.append(
            helper.make_node("ReduceMin", ["ood_d"], [OOD_OUTPUT], axes=[1], keepdims=1, name="ood_min")
        )
    # ReduceSum takes axes as an input from opset 13: default (all axes) is wrong, give axis 1
    gsq = next(n for n in graph.node if n.name == "ood_gsq")
    graph.initializer.append(numpy_helper.from_array(np.array([1], np.int64), "ood_axis1"))
    gsq.input.append("ood_axis1")
    graph.output.append(helper.make_tensor_value_info(OOD_OUTPUT, onnx.TensorProto.FLOAT, ["batch", 1]))
    onnx.checker.check_model(model)


def features_of(model: onnx.ModelProto, x: NDArray[np.float32], feature: str) -> NDArray[np.float32]:
    from exporters.onnxutil import session

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(onnx.ValueInfoProto(name=feature))
    out = session(probe.SerializeToString()).run([feature], {"input": x})[0]
    return np.asarray(out, dtype=np.float32).reshape(len(x), -1)


def ood_record(
    threshold: float, tpr: float, held_out: str, n: int, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "output": OOD_OUTPUT,
        "score": "energy",
        "definition": "-logsumexp(softmax input); higher = less like the training data",
        "threshold": threshold,
        "known_tpr": tpr,
        "threshold_data": held_out,
        "threshold_n": n,
        **(extra or {}),
    }


def add_ood_to_file(
    src: Path,
    dst: Path,
    held_out_x: NDArray[np.float32],
    held_out: str,
    *,
    tpr: float = DEFAULT_TPR,
    score: str = "energy",
    train: tuple[NDArray[np.float32], NDArray[Any]] | None = None,
) -> dict[str, Any]:
    """Copy ``src`` to ``dst`` with the OOD output and a threshold chosen on ``held_out_x``.

    ``score``: ``energy`` or ``feature_distance`` (Mahalanobis distance of the penultimate
    features to the nearest class mean; class means and covariance fitted on ``train``).
    The probabilities are checked unchanged on ``held_out_x``. Returns the manifest record.
    """
    from exporters.onnxutil import get_manifest, session, set_manifest

    model = onnx.load_model(str(src))
    before = session(model.SerializeToString()).run(["probabilities"], {"input": held_out_x})[0]
    extra: dict[str, Any] = {}
    if score == "energy":
        add_energy_output(model)
    elif score == "feature_distance":
        if train is None:
            raise ValueError("feature_distance needs the training inputs and labels")
        feature = penultimate(model)
        means, whiten = fit_feature_distance(features_of(model, train[0], feature), train[1])
        add_feature_distance_output(model, means, whiten, feature)
        extra = {
            "definition": "min over classes of the squared Mahalanobis distance of the penultimate "
            "features to the class mean (shared covariance, shrinkage 0.1, fitted on the training inputs)",
            "feature": feature,
        }
    else:
        raise ValueError(f"unknown OOD score {score!r}")
    sess = session(model.SerializeToString())
    probs, scores = sess.run(["probabilities", OOD_OUTPUT], {"input": held_out_x})
    if not np.array_equal(before, probs):
        raise RuntimeError("adding the OOD output changed the probabilities")
    record = ood_record(choose_threshold(scores, tpr), tpr, held_out, len(held_out_x), extra)
    record["score"] = score
    manifest = get_manifest(model)
    if manifest is not None:
        provenance = {**manifest.provenance, "ood": record}
        set_manifest(model, manifest.model_copy(update={"provenance": provenance}))
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(dst))
    return record


def ood_scores(path: Path, x: NDArray[np.float32]) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Probabilities and OOD scores of an exported file (ONNX Runtime only)."""
    from exporters.onnxutil import session

    sess = session(path)
    probs, scores = sess.run(["probabilities", OOD_OUTPUT], {"input": x})
    return probs, scores[:, 0]


# ------------------------------------------------------------------ leave-classes-out on ACSF1


def acsf1_leave_classes_out(
    holdout: list[int], out: Path, *, epochs: int, val_per_class: int, seed: int = 0, tpr: float = DEFAULT_TPR
) -> dict[str, Any]:
    """Train the appliance recipe (shortened to ``epochs``) without the ``holdout`` classes.

    Known classes: ``val_per_class`` training series each are kept out of training to choose
    the threshold on. Measured on the official test split: known-class accuracy, and AUROC of
    the OOD score for the held-out appliance types (their train and test series: the model
    saw none of them) against the known classes' test series.
    """
    from exporters.data import ACSF1_CLASSES, _aeon

    xtr, ytr, xte, yte, _ = _aeon("ACSF1")
    return leave_classes_out(
        (xtr, ytr, xte, yte),
        ACSF1_CLASSES,
        holdout,
        out,
        epochs=epochs,
        val_per_class=val_per_class,
        seed=seed,
        tpr=tpr,
        feature=("power", "W", 10.0),
        info={"name": "ACSF1", "split": f"leave classes {holdout} out"},
    )


def leave_classes_out(
    data: tuple[NDArray[Any], NDArray[Any], NDArray[Any], NDArray[Any]],
    class_names: list[str],
    holdout: list[int],
    out: Path,
    *,
    epochs: int,
    val_per_class: int,
    seed: int,
    tpr: float,
    feature: tuple[str, str, float],
    info: dict[str, Any],
    model_updates: dict[str, Any] | None = None,
    train_updates: dict[str, Any] | None = None,
    baseline: str | None = None,
) -> dict[str, Any]:
    """The appliance recipe trained on ``data`` (train/test inputs ``[N, T, 1]`` and labels)
    without the ``holdout`` classes; AUROC of its OOD scores for them (see
    :func:`acsf1_leave_classes_out`). ``baseline`` (an aeon model of
    :func:`exporters.resamples.fit_aeon`) is fitted on the same training series and measured on
    the same known test series, side by side."""
    from exporters.data import DataSet
    from exporters.export import export
    from exporters.recipe import load_recipe
    from exporters.train import train

    xtr, ytr, xte, yte = data
    repo = Path(__file__).resolve().parent.parent
    recipe = load_recipe(repo / "models" / "appliance" / "recipe.yaml")
    known = [c for c in range(len(class_names)) if c not in holdout]
    remap = {c: i for i, c in enumerate(known)}
    labels = [class_names[c] for c in known]
    recipe = recipe.model_copy(
        update={
            "name": "appliance_open_set",
            "labels": labels,
            "train": recipe.train.model_copy(
                update={"epochs": epochs, "seed": seed, **(train_updates or {})}
            ),
            "model": recipe.model.model_copy(update=model_updates or {}),
        }
    )
    rng = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    for c in known:
        idx = rng.permutation(np.flatnonzero(ytr == c))
        val_idx += list(idx[:val_per_class])
        train_idx += list(idx[val_per_class:])
    tr, va = np.array(train_idx), np.array(val_idx)
    kte = np.isin(yte, known)
    ds = DataSet(
        f"{info['name']}-open-set",
        "classification",
        "window",
        [feature[0]],
        xtr[tr],
        np.array([remap[int(v)] for v in ytr[tr]]),
        xtr[va],
        np.array([remap[int(v)] for v in ytr[va]]),
        xte[kte],
        np.array([remap[int(v)] for v in yte[kte]]),
        labels=labels,
        units={feature[0]: feature[1]},
        window=xtr.shape[1],
        sample_period_s=feature[2],
        info=info,
    )
    out.mkdir(parents=True, exist_ok=True)
    result = train(recipe, out, progress=False, dataset=ds)
    fp32 = out / "open_set.fp32.onnx"
    export(result.checkpoint, fp32)
    with_ood = out / "open_set.ood.onnx"
    unseen_x = np.concatenate([xtr[np.isin(ytr, holdout)], xte[np.isin(yte, holdout)]])
    per_score: dict[str, Any] = {}
    for score in ("energy", "feature_distance"):
        with_ood = out / f"open_set.{score}.onnx"
        record = add_ood_to_file(
            fp32,
            with_ood,
            ds.x_val,
            f"{len(va)} held-out training series of the known classes",
            tpr=tpr,
            score=score,
            train=(ds.x_train, ds.y_train),
        )
        p_known, s_known = ood_scores(with_ood, ds.x_test)
        _, s_unseen = ood_scores(with_ood, unseen_x)
        thr = record["threshold"]
        per_score[score] = {
            "auroc_unseen": auroc(s_known, s_unseen),
            "threshold": thr,
            "known_test_flagged": float((s_known > thr).mean()),
            "unseen_flagged": float((s_unseen > thr).mean()),
        }
    np.savez_compressed(
        out / "split.npz",
        known_x=np.asarray(ds.x_test, np.float32),
        known_y=ds.y_test,
        unseen_x=np.asarray(unseen_x, np.float32),
        labels=np.array(labels),
    )
    side_by_side: dict[str, Any] = {}
    if baseline is not None:
        from exporters.resamples import NAMES, fit_aeon

        pred = fit_aeon(baseline, ds.x_train, ds.y_train, ds.x_test, seed)
        side_by_side["baseline"] = {
            "model": NAMES[baseline],
            "known_test_accuracy": float((pred == ds.y_test).mean()),
        }
    majority = float((ds.y_test == np.bincount(ds.y_train).argmax()).mean())
    return {
        "data": info["name"],
        "holdout": [class_names[c] for c in holdout],
        "epochs": epochs,
        "seed": seed,
        "n_train": len(tr),
        "n_val": len(va),
        "known_test_n": int(kte.sum()),
        "unseen_n": len(unseen_x),
        "known_test_accuracy": float((p_known.argmax(1) == ds.y_test).mean()),
        "majority_known_test_accuracy": majority,
        **side_by_side,
        **per_score,
    }


PLAID_CLASSES = [  # the order of the UCR file's header (class i)
    "air_conditioner",
    "compact_fluorescent_lamp",
    "fan",
    "fridge",
    "hairdryer",
    "heater",
    "incandescent_light_bulb",
    "laptop",
    "microwave",
    "vacuum",
    "washing_machine",
]
#: PLAID series vary in length (100 to 1344 points): each is linearly resampled to this many
PLAID_LENGTH = 300


def load_plaid() -> tuple[NDArray[Any], NDArray[Any], NDArray[Any], NDArray[Any]]:
    """PLAID (UCR edition, multi-home plug-load current traces) as sktime ships it, read with aeon.

    Needs the ``sktime`` package files only (``pip install --no-deps sktime``): the ``.ts`` files
    are read by aeon's loader, sktime itself is not imported.
    """
    import importlib.util

    from aeon.datasets import load_from_ts_file

    spec = importlib.util.find_spec("sktime")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("PLAID needs the sktime package's data files: pip install --no-deps sktime")
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "PLAID"
    parts: list[NDArray[Any]] = []
    for part in ("TRAIN", "TEST"):
        xs, y = load_from_ts_file(str(folder / f"PLAID_{part}.ts"))
        grid = np.linspace(0.0, 1.0, PLAID_LENGTH)
        x = np.stack([np.interp(grid, np.linspace(0.0, 1.0, s.shape[-1]), np.asarray(s)[0]) for s in xs])
        parts += [x[:, :, None].astype(np.float32), np.asarray(y).astype(np.int64)]
    return parts[0], parts[1], parts[2], parts[3]


def open_set_markdown(report: dict[str, Any], heading: str = "##") -> str:
    """The leave-classes-out figures as Markdown (open_set/card.md and docs/models.md)."""
    if report.get("data", "ACSF1") == "PLAID":
        return _plaid_open_set_markdown(report, heading)
    lines = [
        f"{heading} Open set: appliance types never seen in training",
        "",
        f"The appliance recipe trained without {' and '.join(report['holdout'])} ({report['epochs']} epochs, "
        f"seed {report.get('seed', 0)}; {report['n_train']} training series, {report['n_val']} more of the "
        "known classes held out to choose the threshold on), exported with an `ood_score` output "
        "(`exporters/ood.py`). Known: the official test series of the other classes "
        f"(n={report['known_test_n']}); unseen: every train and test series of the held-out types "
        f"(n={report['unseen_n']}). Threshold: 95 % of the held-out known series below it. "
        "Goal: AUROC >= 0.90. Reproduce: "
        f"`{report.get('command', 'python -m exporters.ood acsf1')}`; `tests/test_open_set_zoo.py` "
        "recomputes every figure from the committed files with ONNX Runtime alone.",
        "",
        *_score_table(report),
        "",
        f"Known-class test accuracy of this model: {report['known_test_accuracy']:.4f} "
        f"(the served 10-class appliance model: 0.90 on all 100 test series; not the same task). "
        "The served appliance files carry an `ood_score` of their own (threshold on leave-one-out "
        "distances of their training series; their card's open-set section): every class is known "
        "to them, so this leave-classes-out model is what measures unseen appliance types.",
        "",
    ]
    return "\n".join(lines)


def _score_table(report: dict[str, Any]) -> list[str]:
    rows = ["| score | AUROC unseen vs known | threshold | known test flagged | unseen flagged |"]
    rows.append("|---|---|---|---|---|")
    for score in ("feature_distance", "energy"):
        f = report[score]
        rows.append(
            f"| {score} | {f['auroc_unseen']:.3f} | {f['threshold']:.4g} | "
            f"{f['known_test_flagged']:.3f} | {f['unseen_flagged']:.3f} |"
        )
    return rows


def _plaid_open_set_markdown(report: dict[str, Any], heading: str) -> str:
    base = report.get("baseline")
    side = (
        f"; {base['model']} on the same training and known test series: {base['known_test_accuracy']:.4f}"
        if base
        else ""
    )
    lines = [
        f"{heading} Open set on PLAID: appliance types never seen in training, traces of many homes",
        "",
        "PLAID is the UCR edition of the plug-load current traces of 56 homes (read from the data "
        "files the `sktime` package ships; each series linearly resampled to "
        f"{PLAID_LENGTH} points). It is current, not a plug's power readings, so the served "
        "appliance model cannot be applied to it; its recipe is trained on it instead, with two "
        "changes `exporters/ood.py` explains: each window's shape plus its log level "
        "(`normalisation: per_window_level`), and no input noise or crops. Trained without "
        f"{' and '.join(report['holdout'])} ({report['epochs']} epochs, seed {report.get('seed', 0)}; "
        f"{report['n_train']} training series, {report['n_val']} more of the known classes held out "
        "to choose the threshold on). Known: the official test series of the other classes "
        f"(n={report['known_test_n']}); unseen: every train and test series of the held-out types "
        f"(n={report['unseen_n']}). Threshold: 95 % of the held-out known series below it. "
        f"Goal: AUROC >= 0.90. Reproduce: `{report.get('command', 'python -m exporters.ood plaid')}`; "
        "`tests/test_open_set_zoo.py` recomputes every figure from the committed files with ONNX "
        "Runtime alone.",
        "",
        *_score_table(report),
        "",
        f"Known-class test accuracy of this model: {report['known_test_accuracy']:.4f}{side}; "
        f"majority class: {report['majority_known_test_accuracy']:.4f}. " + report.get("note", ""),
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------ the served zoo classifiers

#: share of held-out known inputs below the served classifiers' thresholds
SERVED_TPR = 0.95
#: seed of the generated unlike inputs (tests/test_zoo.py regenerates them from the test split)
PROBE_SEED = 22


def strip_ood(model: onnx.ModelProto) -> bool:
    """Remove an OOD branch added by this module (in place); True if there was one."""
    if not any(o.name == OOD_OUTPUT for o in model.graph.output):
        return False
    keep_nodes = [n for n in model.graph.node if not n.name.startswith("ood_")]
    keep_init = [i for i in model.graph.initializer if not i.name.startswith("ood_")]
    keep_out = [o for o in model.graph.output if o.name != OOD_OUTPUT]
    del model.graph.node[:]
    model.graph.node.extend(keep_nodes)
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep_init)
    del model.graph.output[:]
    model.graph.output.extend(keep_out)
    return True


def feature_distances(
    feats: NDArray[Any], means: NDArray[np.float32], whiten: NDArray[np.float32]
) -> NDArray[np.float64]:
    """``min_k |(f - mu_k) L|^2`` per row (numpy reference of the graph branch)."""
    g = np.asarray(feats, np.float64) @ whiten.astype(np.float64)
    m = means.astype(np.float64) @ whiten.astype(np.float64)
    out: NDArray[np.float64] = ((g[:, None, :] - m[None]) ** 2).sum(axis=-1).min(axis=1)
    return out


def leave_one_out_distances(feats: NDArray[Any], y: NDArray[Any]) -> NDArray[np.float64]:
    """Each training row's distance to class means and covariance fitted without it."""
    out = np.empty(len(feats))
    for i in range(len(feats)):
        keep = np.arange(len(feats)) != i
        means, whiten = fit_feature_distance(feats[keep], y[keep])
        out[i] = feature_distances(feats[i : i + 1], means, whiten)[0]
    return out


def unlike_inputs(x: NDArray[Any], seed: int = PROBE_SEED) -> dict[str, NDArray[np.float32]]:
    """Inputs unlike the data, made from the test inputs themselves (so a test can regenerate them).

    ``noise``: independent Gaussian samples with each feature's mean and std over the test
    inputs (right units and scale, no structure); ``shuffled``: each test input with its time
    steps permuted (right values, wrong order).
    """
    rng = np.random.default_rng(seed)
    x = np.asarray(x, np.float32)
    flat = x.reshape(-1, x.shape[-1]).astype(np.float64)
    noise = flat.mean(axis=0) + flat.std(axis=0) * rng.standard_normal(x.shape)
    shuffled = np.stack([row[rng.permutation(len(row))] for row in x])
    return {"noise": noise.astype(np.float32), "shuffled": shuffled.astype(np.float32)}


def add_served_ood(
    path: Path,
    x_train: NDArray[np.float32],
    y_train: NDArray[Any],
    x_val: NDArray[np.float32] | None,
    *,
    tpr: float = SERVED_TPR,
    max_train: int = 20000,
) -> dict[str, Any]:
    """Give the classifier file ``path`` (in place) a feature-distance ``ood_score`` and a threshold.

    Class means and shared covariance of the penultimate features are fitted on the training
    inputs (every ``len // max_train``-th row when there are more). The threshold is the ``tpr``
    quantile of held-out known scores: the validation split when there is one, else the
    leave-one-out distances of the training inputs (means and covariance refitted without each
    row; the network itself did train on them: stated in the record).
    """
    from exporters.onnxutil import get_manifest, session, set_manifest

    model = onnx.load_model(str(path))
    strip_ood(model)
    probe_x = x_train[:64]
    before = session(model.SerializeToString()).run(["probabilities"], {"input": probe_x})[0]
    feature = penultimate(model)
    step = max(1, len(x_train) // max_train)
    xt, yt = x_train[::step], np.asarray(y_train)[::step]
    f_train = features_of(model, xt, feature)
    means, whiten = fit_feature_distance(f_train, yt)
    if x_val is not None and len(x_val):
        held = feature_distances(features_of(model, x_val, feature), means, whiten)
        held_out = f"the validation split ({len(x_val)} inputs, never trained on)"
    else:
        held = leave_one_out_distances(f_train, yt)
        held_out = (
            f"leave-one-out distances of the {len(xt)} training inputs (no validation split: class means "
            "and covariance refitted without each input; the network did train on them)"
        )
    add_feature_distance_output(model, means, whiten, feature)
    probs = session(model.SerializeToString()).run(["probabilities"], {"input": probe_x})[0]
    if not np.array_equal(before, probs):
        raise RuntimeError(f"{path}: adding the OOD output changed the probabilities")
    record = ood_record(
        choose_threshold(held, tpr),
        tpr,
        held_out,
        len(held),
        {
            "score": "feature_distance",
            "definition": "min over classes of the squared Mahalanobis distance of the penultimate "
            "features to the class mean (shared covariance, shrinkage 0.1, fitted on "
            f"{len(xt)} training inputs)",
            "feature": feature,
        },
    )
    manifest = get_manifest(model)
    if manifest is not None:
        provenance = {**manifest.provenance, "ood": record}
        set_manifest(model, manifest.model_copy(update={"provenance": provenance}))
    onnx.save_model(model, str(path))
    return record


def served_ood_figures(path: Path, x_test: NDArray[np.float32], y_test: NDArray[Any]) -> dict[str, Any]:
    """What a file's OOD output does on the test split and on :func:`unlike_inputs` (ONNX Runtime)."""
    from edge.manifest import read_manifest

    manifest = read_manifest(path)
    if manifest is None:
        raise ValueError(f"{path}: no manifest")
    thr = float(manifest.provenance["ood"]["threshold"])
    probs, known = ood_scores(path, x_test)
    flagged = known > thr
    correct = probs.argmax(axis=1) == y_test
    probes = {}
    for name, x in unlike_inputs(x_test).items():
        _, s = ood_scores(path, x)
        probes[name] = {"n": len(s), "flagged": float((s > thr).mean()), "auroc_vs_known": auroc(known, s)}
    branch = sum(len(i.raw_data) for i in onnx.load(str(path)).graph.initializer if i.name.startswith("ood_"))
    return {
        "threshold": thr,
        "branch_bytes": branch,
        "known_test_flagged": float(flagged.mean()),
        "accuracy": float(correct.mean()),
        "accuracy_unknown_counted_wrong": float((correct & ~flagged).mean()),
        "unlike": probes,
    }


def served_ood(files: dict[str, Path], ds: Any, *, tpr: float = SERVED_TPR) -> dict[str, Any]:
    """OOD output and threshold into each served file (in place), and its figures (report['ood'])."""
    x_train = ds.model_input(ds.x_train).astype(np.float32)
    x_val = ds.model_input(ds.x_val).astype(np.float32) if len(ds.x_val) else None
    x_test = ds.model_input(ds.x_test).astype(np.float32)
    out: dict[str, Any] = {"files": {}}
    for kind, path in files.items():
        record = add_served_ood(path, x_train, ds.y_train, x_val, tpr=tpr)
        out["threshold_data"] = record["threshold_data"]
        out["definition"] = record["definition"]
        out["files"][kind] = served_ood_figures(path, x_test, ds.y_test)
    out["known_tpr"] = tpr
    out["unlike_note"] = (
        "unlike inputs made from the test split (seed "
        f"{PROBE_SEED}, exporters.ood.unlike_inputs): noise = independent Gaussian samples with each "
        "feature's mean and std; shuffled = each test input with its time steps permuted"
    )
    return out


def served_ood_markdown(ood: dict[str, Any]) -> list[str]:
    """The card's open-set section."""
    lines = [
        "",
        "## Open set: `unknown` for unlike inputs",
        "",
        f"Each file has a second output `ood_score`: {ood['definition']}. Threshold: "
        f"{ood['known_tpr']:.0%} of the held-out known scores below it, on {ood['threshold_data']}; "
        "the daemon publishes `unknown` above it. Test split, and "
        f"{ood['unlike_note']}. The branch adds "
        + " / ".join(f"{f['branch_bytes'] / 1024:.1f} KiB" for f in ood["files"].values())
        + f" ({' / '.join(ood['files'])}, float constants in both) to the file sizes above:",
        "",
        "| file | threshold | known test flagged | accuracy | accuracy, `unknown` counted wrong "
        "| noise flagged (AUROC) | shuffled flagged (AUROC) |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, f in ood["files"].items():
        u = f["unlike"]
        lines.append(
            f"| {kind} | {f['threshold']:.4g} | {f['known_test_flagged']:.3f} | {f['accuracy']:.4f} | "
            f"{f['accuracy_unknown_counted_wrong']:.4f} | {u['noise']['flagged']:.3f} "
            f"({u['noise']['auroc_vs_known']:.3f}) | {u['shuffled']['flagged']:.3f} "
            f"({u['shuffled']['auroc_vs_known']:.3f}) |"
        )
    lines.append("")
    return lines


def served_zoo(names: list[str], models_dir: Path, tpr: float = SERVED_TPR) -> None:
    """``python -m exporters.ood zoo``: the OOD branch into the committed zoo files; report and card."""
    from edge.manifest import read_manifest
    from exporters.card import render_card
    from exporters.data import load_dataset
    from exporters.recipe import load_recipe

    for name in names:
        out = models_dir / name
        recipe = load_recipe(out / "recipe.yaml")
        ds = load_dataset(recipe)
        files = {k: out / f"{name}.{k}.onnx" for k in ("fp32", "int8")}
        report = json.loads((out / "report.json").read_text())
        report["ood"] = served_ood(files, ds, tpr=tpr)
        report["ood"]["command"] = f"python -m exporters.ood zoo {name}"
        for kind, path in files.items():
            report["files"][kind]["size_bytes"] = path.stat().st_size
            report["files"][kind]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        (out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
        manifest = read_manifest(files["fp32"])
        assert manifest is not None
        (out / "card.md").write_text(render_card(report, manifest), encoding="utf-8")
        f = report["ood"]["files"]
        print(
            f"{name}: "
            + "; ".join(
                f"{k} thr {v['threshold']:.4g} known flagged {v['known_test_flagged']:.3f} "
                f"acc {v['accuracy']:.4f} -> {v['accuracy_unknown_counted_wrong']:.4f} "
                f"noise {v['unlike']['noise']['flagged']:.3f} "
                f"shuffled {v['unlike']['shuffled']['flagged']:.3f}"
                for k, v in f.items()
            )
        )


def _without_note(argv: list[str]) -> list[str]:
    """The command line less ``--note TEXT`` / ``--note=TEXT`` (the card's prose, not an input)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--note":
            skip = True
        elif not arg.startswith("--note="):
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m exporters.ood", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("acsf1", help="leave-classes-out experiment on the appliance recipe")
    pl = sub.add_parser("plaid", help="the same on PLAID (sktime's copy; several homes per appliance type)")
    pl.add_argument("--lr", type=float, default=None, help="learning rate (default: the recipe's)")
    pl.add_argument("--hidden", type=int, nargs="+", default=None, help="widths (default: the recipe's)")
    pl.add_argument("--kernel-sizes", type=int, nargs="+", default=None, help="(default: the recipe's)")
    for sp in (a, pl):
        sp.add_argument("--holdout", type=int, nargs="+", default=[3, 8])
        sp.add_argument("--epochs", type=int, default=60)
        sp.add_argument("--val-per-class", type=int, default=2)
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--out", type=Path, default=None, help="work directory (default: a temporary one)")
        sp.add_argument("--note", default="", help="sentences for the card (what else was measured)")
        sp.add_argument(
            "--save",
            type=Path,
            default=None,
            help="write the two OOD files, split.npz (known test and unseen inputs) and report.json here "
            "(models/appliance/open_set: what tests/test_open_set_zoo.py recomputes with ONNX Runtime)",
        )
    z = sub.add_parser("zoo", help="OOD output and threshold into the committed served zoo classifiers")
    z.add_argument("names", nargs="*", default=["activity", "appliance", "occupancy"])
    z.add_argument("--models-dir", type=Path, default=Path(__file__).resolve().parent.parent / "models")
    args = parser.parse_args(argv)
    if args.cmd == "zoo":
        served_zoo(args.names, args.models_dir)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        work = args.out or Path(tmp)
        if args.cmd == "plaid":
            res = leave_classes_out(
                load_plaid(),
                PLAID_CLASSES,
                args.holdout,
                work,
                epochs=args.epochs,
                val_per_class=args.val_per_class,
                seed=args.seed,
                tpr=DEFAULT_TPR,
                feature=("current", "A", 1.0 / 60.0 / PLAID_LENGTH),
                # the shape of each window (per-window z-score, as the appliance recipe) plus its
                # log level as a second channel: the amplitude tells a heater from a bulb, and the
                # series' levels span 1e-4 to 180 A, so one z-score over the training data squashes
                # most of them to zero. No input noise: the recipe's noise is scaled by the training
                # data's global std (33 A here), which buries every low-power series. The
                # series are 300 points, so no 1024-point crops; every epoch runs.
                model_updates={
                    "normalisation": "per_window_level",
                    **({"hidden": args.hidden} if args.hidden else {}),
                    **({"kernel_sizes": args.kernel_sizes} if args.kernel_sizes else {}),
                },
                train_updates={
                    "patience": args.epochs,
                    "noise": 0.0,
                    "random_crop": False,
                    **({"lr": args.lr} if args.lr is not None else {}),
                },
                baseline="minirocket",
                info={
                    "name": "PLAID",
                    "split": f"leave classes {args.holdout} out; series resampled to {PLAID_LENGTH} points",
                },
            )
        else:
            res = acsf1_leave_classes_out(
                args.holdout,
                work,
                epochs=args.epochs,
                val_per_class=args.val_per_class,
                seed=args.seed,
            )
        res["command"] = "python -m exporters.ood " + " ".join(
            _without_note(argv if argv is not None else sys.argv[1:])
        )
        if args.note:
            res["note"] = args.note
        if args.save is not None:
            args.save.mkdir(parents=True, exist_ok=True)
            for name in ("open_set.energy.onnx", "open_set.feature_distance.onnx", "split.npz"):
                (args.save / name).write_bytes((work / name).read_bytes())
            (args.save / "report.json").write_text(json.dumps(res, indent=2) + "\n")
            (args.save / "card.md").write_text(open_set_markdown(res, "#"))
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
