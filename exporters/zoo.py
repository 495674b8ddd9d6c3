"""Build the bundled model zoo: ``python -m exporters.zoo [NAME ...]`` (what ``make models`` runs).

For each ``models/<name>/recipe.yaml``: train (deterministic seed, one torch
thread), export, quantize (static QDQ: batch-independent), calibrate (a temperature
fitted on the validation split, or on out-of-fold outputs of a cross-fit when the
recipe keeps none, folded into both graphs), measure (plus, for window classifiers
with a MiniRocket baseline, a sweep over window lengths), verify, and write into
``models/<name>/`` the fp32 and int8 ONNX files, ``card.md``, ``report.json``, the
plots and ``test_split.npz`` (the test inputs in raw units and their labels, so the
zoo test needs neither aeon nor torch). Checkpoints go to ``build/zoo/<name>/``.
Finally ``docs/models.md`` is regenerated from the reports.

``--requantize`` keeps the committed fp32 weights and redoes everything after
training (quantize, calibrate, measure): retraining on another machine or torch
build does not reproduce the weights bit for bit.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from exporters.cli import verify_models
from exporters.data import DataSet, load_dataset
from exporters.ood import open_set_markdown
from exporters.recipe import Recipe, load_recipe, recipe_from_dict

ROOT = Path(__file__).resolve().parent.parent
INTRO = (
    "Weights built by `make models` (`python -m exporters.zoo`) from `models/<name>/recipe.yaml` with"
    " fixed seeds; quantization, calibration and every number below by `python -m exporters.zoo "
    "--requantize` (keeps the committed fp32 weights: retraining on another machine or torch build "
    "does not reproduce them bit for bit), measured on the official (or held-out) test split and "
    "written into each model's `card.md` and `report.json`. All models take raw units and return "
    "probabilities (normalisation, softmax and the calibration temperature are inside the graph); the"
    " daemon needs only the topic and field names. Latency: median, one thread, batch 1, onnxruntime "
    "CPU, same run for fp32 and int8"
)
CALIBRATION = (
    "Classifier probabilities are temperature-scaled inside the graph (`exporters/calibrate.py`): one"
    " scalar T per file, fitted by NLL on data the served weights never trained on, folded in as a "
    "Mul before the final Softmax (accuracy unchanged). Occupancy has a validation split. "
    "BasicMotions puts every training series into training, so T is fitted on leave-one-out outputs "
    "of 40 models of the same recipe. For appliance (ACSF1, same situation) T is fitted on the "
    "outputs of models of the same recipe trained on stratified resamples (`python -m "
    "exporters.resamples`), on the official training series each did not train on, and reported but "
    "not applied: those models are over-confident on held-out series (T > 1) while the served one is "
    "under-confident on the official test split, an easier split for this recipe than a resample's, "
    "so applied it would raise the test ECE (a 5-fold cross-fit before: the same); the card gives "
    "the figures. The test split is never used "
    "for fitting. Test split figures (ECE: 15 equal-width confidence bins); reliability diagrams in "
    "each card. Goal: ECE <= 0.03; the last column is the ECE that a perfectly calibrated model with "
    "the same confidences shows on a test split of that size (sampling noise alone)"
)
QUANT = (
    "The shipped int8 files are static QDQ (activation scales calibrated on training windows, "
    "constants of the graph): a row's answer is the same alone and inside batches of 7 and 64 other "
    "test rows. The dynamic int8 the zoo shipped before for activity and occupancy (scales picked per"
    " batch) is rebuilt from the same fp32 weights and measured in the same run for comparison; it is"
    " not shipped. Latency: median, one thread"
)
SERVED_OOD = (
    "Every served classifier file (fp32 and int8) has a second output `ood_score` beside its "
    "probabilities (`python -m exporters.ood zoo`, also run by the zoo build): the squared Mahalanobis "
    "distance of its penultimate features to the nearest class mean (shared covariance, shrinkage "
    "0.1, fitted on the training inputs), computed in the graph; the probabilities are bit for bit "
    "those without it. The threshold in the manifest (`provenance.ood`) leaves 95 % of held-out known "
    "scores below it: occupancy's validation rooms; appliance and activity keep no validation split, so"
    " leave-one-out distances of the training inputs (class means and covariance refitted without "
    "each; the network did see them). The daemon publishes `unknown` above it. Test split figures; "
    "noise and shuffled are unlike inputs generated from the test split (`exporters.ood.unlike_inputs`:"
    " Gaussian samples with each feature's mean and std; each test input's time steps permuted). "
    "`tests/test_zoo.py` recomputes them with ONNX Runtime alone"
)
OUTRO = (
    "How the files are made and checked: [exporting.md](exporting.md). `tests/test_zoo.py` reloads "
    "every model with ONNX Runtime alone and checks that the accuracy, ECE and NLL in its card are "
    "what it measures on the committed test split, and that every file answers a row alone as inside "
    "batches of 7 and 64."
)


def window_sweep(
    ds: DataSet, fp32: Path, int8: Path | None, lengths: list[int], baseline: bool
) -> dict[str, Any]:
    """Accuracy of the same model (dynamic time axis) and of MiniRocket on the last T samples, per T."""
    from exporters.metrics import evaluate
    from exporters.onnxutil import run_onnx, session
    from exporters.verify import minirocket_baseline

    rows = []
    served_t = ds.window
    for t_len in lengths:
        ds.window = t_len
        x = ds.model_input(ds.x_test)
        row: dict[str, Any] = {"window": t_len}
        if ds.sample_period_s:
            row["minutes"] = round(t_len * ds.sample_period_s / 60.0, 1)
        row["fp32"] = evaluate(ds.task, ds.y_test, run_onnx(session(fp32), x), ds.labels)["accuracy"]
        if int8 is not None:
            row["int8"] = evaluate(ds.task, ds.y_test, run_onnx(session(int8), x, batch=1), ds.labels)[
                "accuracy"
            ]
        if baseline:
            row["minirocket"] = minirocket_baseline(ds)["accuracy"]
        rows.append(row)
    ds.window = served_t
    return {
        "note": "the model was trained for, and is served with, the window in the manifest; its time axis is "
        "dynamic, so it is also evaluated here on the last T samples of each test series",
        "rows": rows,
    }


def save_test_split(ds: DataSet, path: Path) -> None:
    x = ds.model_input(ds.x_test).astype(np.float32)
    np.savez_compressed(path, x=x, y=ds.y_test, labels=np.array(ds.labels))


def held_out_outputs(
    recipe: Recipe, ds: DataSet, files: dict[str, Path], work: Path, folds: int
) -> tuple[dict[str, np.ndarray], np.ndarray, str]:
    """Probabilities on data the served weights never trained on: the validation split, else a cross-fit."""
    from exporters.onnxutil import run_onnx, session

    if len(ds.x_val):
        x = ds.model_input(ds.x_val)
        probs = {k: run_onnx(session(p), x, batch=1 if k == "int8" else 256) for k, p in files.items()}
        return probs, ds.y_val, f"the recipe's validation split ({len(ds.y_val)} samples, never trained on)"
    if recipe.calibration.held_out == "resamples":
        return resample_outputs(recipe, ds, files)
    from exporters.crossfit import crossfit_outputs

    cf = crossfit_outputs(recipe, ds, folds, cache=work / "crossfit.npz")
    what = (
        f"no validation split (every training series trains the model), so out-of-fold outputs of a "
        f"{folds}-fold cross-fit on the training series ({len(cf['y'])}): {folds} models of this recipe, "
        f"each trained without one stratified fold, exported and quantized like the served files, each "
        f"predicting the fold it did not see ({cf['seconds']:.0f} s); the test split is never used"
    )
    return {k: cf[k] for k in files}, cf["y"], what


def resample_outputs(
    recipe: Recipe, ds: DataSet, files: dict[str, Path]
) -> tuple[dict[str, np.ndarray], np.ndarray, str]:
    """Held-out outputs from the resample fits (``python -m exporters.resamples acsf1 --cnn N``).

    Each resample's model (this recipe, as many training series as the served one) predicted the
    series it did not train on; only those that are official training series are kept, so no
    official test series reaches the fit. The same outputs serve fp32 and int8 (the fits are fp32).
    """
    from exporters.resamples import held_out_training_outputs

    probs, y, what = held_out_training_outputs(ROOT / "build" / "resamples", len(ds.y_train))
    return dict.fromkeys(files, probs), y, what


def finish(
    name: str,
    recipe: Recipe,
    ds: DataSet,
    raw_fp32: Path,
    out: Path,
    *,
    work: Path,
    extra: dict[str, Any],
    checkpoint: Path | None,
    sweep_minirocket: dict[int, float] | None = None,
) -> dict[str, Any]:
    """Uncalibrated fp32 in; static int8, dynamic int8 for comparison, temperature, verify, card out."""
    from exporters.calibrate import calibrate_files
    from exporters.metrics import evaluate
    from exporters.onnxutil import run_onnx, session
    from exporters.quantize import calibration_inputs, quantize, quantize_model
    from exporters.verify import batch_independence

    raw_int8 = work / f"{name}.uncalibrated.int8.onnx"
    q = quantize(raw_fp32, raw_int8, ds, recipe.quantize, mode=recipe.quantize.mode)
    print(f"[{name}] {q.message}", file=sys.stderr)
    if q.refused:
        raise SystemExit(f"[{name}] quantization refused: {q.message}")
    x_test = ds.model_input(ds.x_test)
    dynamic = work / f"{name}.dynamic.int8.onnx"
    quantize_model(
        raw_fp32,
        dynamic,
        recipe.quantize,
        calibration_inputs(ds, recipe.quantize.calibration_samples),
        "dynamic",
    )
    dyn_probs = run_onnx(session(dynamic), x_test, batch=1)
    extra["int8_dynamic"] = {
        "accuracy": evaluate(ds.task, ds.y_test, dyn_probs, ds.labels)["accuracy"],
        "size_bytes": dynamic.stat().st_size,
        "batch_independence": batch_independence(dynamic, x_test),
        "note": "dynamic int8 built here from the same uncalibrated fp32 weights with the dynamic settings "
        "the zoo used for its linear and recurrent models before (quantize_dynamic over MatMul/LSTM, int8 "
        "per-channel weights, reduce_range); not shipped",
    }
    final = {"fp32": out / f"{name}.fp32.onnx", "int8": out / f"{name}.int8.onnx"}
    raw = {"fp32": raw_fp32, "int8": raw_int8}
    if ds.task == "classification":
        probs, y_held, fitted_on = held_out_outputs(recipe, ds, raw, work, recipe.calibration.folds)
        extra["calibration"] = calibrate_files(
            raw,
            final,
            x_test=x_test,
            y_test=ds.y_test,
            probs_held_out=probs,
            y_held_out=y_held,
            fitted_on=fitted_on,
            plot=out / "reliability.png",
            name=name,
            apply=recipe.calibration.method == "temperature",
        )
        if recipe.calibration.note:
            extra["calibration"]["note"] = recipe.calibration.note
        from exporters.ood import served_ood

        extra["ood"] = served_ood(final, ds)
        extra["ood"]["command"] = f"python -m exporters.ood zoo {name} (also part of this build)"
    else:
        for kind in ("fp32", "int8"):
            final[kind].write_bytes(raw[kind].read_bytes())
    if "window_sweep" in extra or (
        ds.layout == "window"
        and recipe.model.family in ("cnn1d", "lstm", "gru")
        and recipe.baseline != "none"
    ):
        series = ds.x_test.shape[1]
        lengths = sorted({*(int(series * f) for f in (0.25, 0.5, 0.75)), series, ds.window or series})
        extra["window_sweep"] = window_sweep(
            ds, final["fp32"], final["int8"], lengths, baseline=sweep_minirocket is None
        )
        if sweep_minirocket is not None:
            for row in extra["window_sweep"]["rows"]:
                if row["window"] in sweep_minirocket:
                    row["minirocket"] = sweep_minirocket[row["window"]]
            extra["window_sweep"]["note"] += (
                " (MiniRocket column carried from the original build: same data, same seed, not refitted)"
            )
    save_test_split(ds, out / "test_split.npz")
    baseline = "none" if "baseline" in extra else recipe.baseline
    return verify_models(
        final["fp32"],
        recipe,
        out,
        int8=final["int8"],
        checkpoint=checkpoint,
        extra=extra,
        baseline=baseline,
        compare={"int8_dynamic": dynamic},
    )


def build_one(
    name: str, models_dir: Path, build_dir: Path, progress: bool, reuse: bool = False
) -> dict[str, Any]:
    """Train (or reuse the checkpoint), export, quantize, calibrate, measure."""
    from exporters.export import export
    from exporters.train import load_checkpoint, train

    out = models_dir / name
    recipe: Recipe = load_recipe(out / "recipe.yaml")
    started = time.monotonic()
    work = build_dir / name
    checkpoint = work / f"{name}.pt"
    if reuse and checkpoint.exists():  # re-export, re-quantize and re-measure a trained model
        ckpt = load_checkpoint(checkpoint)
        if ckpt.recipe.model_dump(exclude={"quantize", "calibration"}) != recipe.model_dump(
            exclude={"quantize", "calibration"}
        ):
            raise SystemExit(
                f"[{name}] {checkpoint} was trained from another recipe: rebuild without --reuse"
            )
        ds, train_metrics = load_dataset(recipe), ckpt.metrics
    else:
        result = train(recipe, out, progress=progress, checkpoint=checkpoint)
        ds, train_metrics = result.dataset, result.metrics
    raw_fp32 = work / f"{name}.uncalibrated.fp32.onnx"
    export(checkpoint, raw_fp32)
    extra: dict[str, Any] = {
        "rebuild": f"`make models` (or `python -m exporters.zoo {name}`), recipe "
        f"`models/{name}/recipe.yaml`, seed {recipe.train.seed}",
        "training": {
            "best_epoch": train_metrics["best_epoch"],
            "epochs_run": train_metrics["epochs_run"],
            "seconds": round(time.monotonic() - started, 1),
        },
    }
    return finish(name, recipe, ds, raw_fp32, out, work=work, extra=extra, checkpoint=checkpoint)


def requantize_one(name: str, models_dir: Path, build_dir: Path) -> dict[str, Any]:
    """Keep the committed fp32 weights; re-quantize, re-calibrate and re-measure them.

    For a zoo whose retraining does not reproduce bit for bit on another machine or torch
    build: the weights stay those the card's training section describes.
    """
    import onnx

    from edge.manifest import Manifest
    from exporters.calibrate import strip_temperature
    from exporters.onnxutil import get_manifest, set_manifest
    from exporters.ood import strip_ood

    out = models_dir / name
    recipe: Recipe = load_recipe(out / "recipe.yaml")
    old = json.loads((out / "report.json").read_text())
    work = build_dir / name
    work.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(out / f"{name}.fp32.onnx"))
    strip_temperature(model)
    strip_ood(model)
    manifest = get_manifest(model)
    if manifest is None:
        raise SystemExit(f"[{name}] the committed fp32 model has no manifest")
    trained = recipe_from_dict(manifest.provenance["recipe"], name)
    skip = {"quantize", "calibration"}
    if trained.model_dump(exclude=skip) != recipe.model_dump(exclude=skip):
        raise SystemExit(f"[{name}] recipe.yaml changed what training does: rebuild with `make models`")
    data = manifest.model_dump(mode="json")
    data["provenance"] = {**data["provenance"], "recipe": recipe.model_dump(mode="json")}
    data["provenance"].pop("calibration", None)
    data["provenance"].pop("ood", None)
    set_manifest(model, Manifest.model_validate(data))
    raw_fp32 = work / f"{name}.uncalibrated.fp32.onnx"
    onnx.save_model(model, str(raw_fp32))
    ds = load_dataset(recipe)
    committed = np.load(out / "test_split.npz")
    if not np.array_equal(committed["x"], ds.model_input(ds.x_test).astype(np.float32)):
        raise SystemExit(f"[{name}] the data set no longer gives the committed test split")
    extra: dict[str, Any] = {
        "rebuild": f"weights: `make models` (or `python -m exporters.zoo {name}`), recipe "
        f"`models/{name}/recipe.yaml`, seed {recipe.train.seed}, trained {manifest.created}; "
        f"quantization, calibration and every figure here: `python -m exporters.zoo --requantize {name}` "
        "(keeps the committed fp32 weights)",
        "training": old["training"],
    }
    for key in ("baseline", "weights_trained", "resamples"):
        if key in old:
            extra[key] = old[key]
    if "pytorch_vs_fp32" in old.get("parity", {}):
        extra["pytorch_parity_at_training"] = old["parity"]["pytorch_vs_fp32"]
    sweep = None
    if "window_sweep" in old:
        sweep = {r["window"]: r["minirocket"] for r in old["window_sweep"]["rows"] if "minirocket" in r}
        extra["window_sweep"] = old["window_sweep"]
    return finish(
        name, recipe, ds, raw_fp32, out, work=work, extra=extra, checkpoint=None, sweep_minirocket=sweep
    )


def also_bundled(models_dir: Path) -> list[str]:
    """docs/models.md's list of the bundled entries without a recipe (zoo:appliance_open_set,
    zoo:fridge_anomaly): what each is and its headline figures, from its report.json."""
    lines: list[str] = []
    for path in sorted(models_dir.glob("*/report.json")):
        if (path.parent / "recipe.yaml").is_file():
            continue
        r = json.loads(path.read_text())
        m = r["metrics"]["fp32"]
        if r["task"] == "anomaly":
            delays = ", ".join(
                f"{k} {'missed' if v is None else f'{v:.2f} h'}" for k, v in m["detection_delay_h"].items()
            )
            rule = r.get("alarm", {"persist": 1, "clear": 1})
            figures = (
                f"alarm on after {rule['persist']} scores in a row over the threshold, off after "
                f"{rule['clear']} under it (edge/alarm.py); {m['test_false_alarms_per_day']:.3f} false "
                f"alarms/day on the {r.get('test_days', 0):g} test days "
                f"({m.get('test_false_alarms', '?')} alarms; target "
                f"{r['threshold']['target_false_alarms_per_day']:g})"
                + (
                    f", {r['check']['false_alarms_per_day']:.3f} on {r['check']['days']:g} more "
                    "normal days the command regenerates"
                    if "check" in r
                    else ""
                )
                + f"; detection delay {delays}; "
                f"baseline ({r['baseline']['name']}): "
                f"{r['baseline']['test_false_alarms_per_day']:.3f} false alarms/day, "
                + ", ".join(
                    f"{k} {'missed' if v is None else f'{v:.2f} h'}"
                    for k, v in r["baseline"]["detection_delay_h"].items()
                )
            )
        else:
            figures = (
                f"known-class test accuracy {m['accuracy']:.4f}, AUROC unseen vs known "
                f"{m['auroc_unseen']:.3f}, unseen flagged {m['unseen_flagged']:.3f}, known test "
                f"flagged {m['known_test_flagged']:.3f}"
            )
        lines.append(
            f"- [`zoo:{r['name']}`](../models/{r['name']}/card.md) ({r['task']}, "
            f"window {r['input']['window']} x {r['input']['sample_period_s']:g} s of "
            f"{', '.join(r['input']['features'])}; fp32 only): {r['dataset']['split']}. {figures}. "
            f"Reproduce: `{r['command']}`."
        )
    return ["## Also bundled", "", *lines, ""] if lines else []


def served_open_set(reports: list[dict[str, Any]]) -> list[str]:
    """docs/models.md: the served classifiers' ``ood_score`` (report['ood'], exporters.ood.served_ood)."""
    rows = [
        "| model | threshold data | threshold fp32 / int8 | known test flagged fp32 / int8 "
        "| accuracy, `unknown` counted wrong, fp32 / int8 | noise flagged | shuffled flagged |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        ood = r.get("ood")
        if not ood:
            continue
        f = ood["files"]
        held = (
            "validation split"
            if ood["threshold_data"].startswith("the validation")
            else ("leave-one-out on train")
        )

        def both(get: Any, fmt: str = ".3f", f: dict[str, Any] = f) -> str:
            return " / ".join(f"{get(f[k]):{fmt}}" for k in ("fp32", "int8"))

        rows.append(
            f"| {r['name']} | {held} | {both(lambda v: v['threshold'], '.4g')} "
            f"| {both(lambda v: v['known_test_flagged'])} "
            f"| {both(lambda v: v['accuracy_unknown_counted_wrong'], '.4f')} "
            f"(argmax {both(lambda v: v['accuracy'], '.4f')}) "
            f"| {both(lambda v: v['unlike']['noise']['flagged'])} "
            f"| {both(lambda v: v['unlike']['shuffled']['flagged'])} |"
        )
    if len(rows) == 2:
        return []
    return [
        "## Open set: `unknown` from the served classifiers",
        "",
        SERVED_OOD + ".",
        "",
        *rows,
        "",
    ]


def models_table(models_dir: Path) -> str:
    """docs/models.md: every bundled model, from the reports."""
    rows = [
        "| model | task | data and split | input | accuracy fp32 / int8 | macro-F1 int8 | size fp32 / int8 "
        "| latency b1 fp32 / int8 | baseline (same split) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    cal_rows = [
        "| model | held-out data for T | T fp32 / int8 | ECE fp32 before -> after | ECE int8 before -> after "
        "| NLL fp32 before -> after | NLL int8 before -> after | ECE if perfectly calibrated, fp32 (mean) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    q_rows = [
        "| model | int8 scheme | accuracy | size | latency b1 / b32 | alone vs inside batches of 7 and 64 |",
        "|---|---|---|---|---|---|",
    ]
    details: list[str] = []
    # the trained zoo (a recipe each); the other bundled entries are listed after it (also_bundled)
    reports = [
        json.loads(p.read_text())
        for p in sorted(models_dir.glob("*/report.json"))
        if (p.parent / "recipe.yaml").is_file()
    ]
    open_set = [  # leave-classes-out figures (python -m exporters.ood acsf1 --save DIR/open_set)
        open_set_markdown(json.loads(p.read_text()))
        for p in sorted(models_dir.glob("*/open_set*/report.json"))
    ]
    from exporters.resamples import markdown as resamples_markdown

    resamples = [  # official split and stratified resamples (python -m exporters.resamples acsf1)
        resamples_markdown(json.loads(p.read_text()))
        for p in sorted(models_dir.glob("*/resamples/report.json"))
    ]
    for r in reports:
        name = r["name"]
        m, f, lat = r["metrics"], r["files"], r["latency_single_thread"]
        inp = r["input"]
        shape = f"{inp['layout']} {inp.get('window', '')}x{len(inp.get('features', []))}".replace(" x", " ")
        base = r.get("baseline")
        base_txt = f"MiniRocket {base['accuracy']:.2f} (same T)" if base else "-"
        rows.append(
            f"| [{name}](../models/{name}/card.md) | {r['task']} ({len(r['labels'])} classes) "
            f"| {r['dataset'].get('name')}, {r['dataset'].get('split')} (test n={m['fp32']['n']}) | {shape} "
            f"| {m['fp32']['accuracy']:.3f} / {m['int8']['accuracy']:.3f} | {m['int8']['macro_f1']:.3f} "
            f"| {f['fp32']['size_bytes'] / 1024:.0f} / {f['int8']['size_bytes'] / 1024:.0f} KiB "
            f"| {lat['fp32']['batch_1']['median_ms']:.3f} / {lat['int8']['batch_1']['median_ms']:.3f} ms "
            f"| {base_txt} |"
        )
        cal = r.get("calibration")
        if cal:
            c = cal["files"]
            folds = re.search(r"(\d+)-fold cross-fit", cal["fitted_on"])
            held = "validation split" if folds is None else f"{folds.group(1)}-fold cross-fit on train"
            if "exporters.resamples" in cal["fitted_on"]:
                held = "resample fits, on official train series they did not see"
            figures = [
                f"{c[k]['test_before'][metric]:.4f} -> {c[k]['test_after'][metric]:.4f}"
                for metric in ("ece", "nll")
                for k in ("fp32", "int8")
            ]
            temps = f"{c['fp32']['temperature']:.2f} / {c['int8']['temperature']:.2f}"
            if not cal.get("applied", True):
                fitted = " / ".join(f"{c[k]['not_applied']['temperature']:.2f}" for k in ("fp32", "int8"))
                temps = f"not applied (fitted {fitted})"
            floor = c["fp32"].get("ece_if_perfectly_calibrated", {}).get("mean")
            floor_txt = f"{floor:.4f}" if floor is not None else "-"
            cal_rows.append(f"| {name} | {held} | {temps} | " + " | ".join(figures) + f" | {floor_txt} |")
        dyn = r.get("int8_dynamic")
        bi = r.get("batch_independence", {})
        if dyn:

            def ind(x: dict[str, Any] | None) -> str:
                if not x:
                    return "-"
                verdict = "identical" if x["independent"] else "**differs**"
                return f"{verdict} (max diff {x['max_abs_diff']:.1e}, {x['argmax_changes']} label changes)"

            for label, key, acc, size, bind in (
                (
                    "static QDQ (shipped)",
                    "int8",
                    m["int8"]["accuracy"],
                    f["int8"]["size_bytes"],
                    bi.get("int8"),
                ),
                (
                    "dynamic (before)",
                    "int8_dynamic",
                    dyn["accuracy"],
                    dyn["size_bytes"],
                    dyn["batch_independence"],
                ),
            ):
                q_rows.append(
                    f"| {name} | {label} | {acc:.3f} | {size / 1024:.1f} KiB "
                    f"| {lat[key]['batch_1']['median_ms']:.3f} / {lat[key]['batch_32']['median_ms']:.3f} ms "
                    f"| {ind(bind)} |"
                )
        details.append(
            f"- **{name}**: {r['dataset'].get('split')}. Recommended file here: {r['recommended']}. "
            f"Reproduce: {r.get('rebuild', '`make models`')}."
        )
        if "window_sweep" in r:
            sweep = r["window_sweep"]["rows"]
            details.append(
                "  Window length vs accuracy (fp32 / int8 / MiniRocket): "
                + "; ".join(
                    f"T={row['window']}: {row['fp32']:.2f} / {row.get('int8', float('nan')):.2f} / "
                    f"{row.get('minirocket', float('nan')):.2f}"
                    for row in sweep
                )
            )
    machine = (
        f" ({reports[0]['machine']['processor']}, {reports[0]['machine']['platform']})" if reports else ""
    )
    return "\n".join(
        [
            "# Bundled models",
            "",
            INTRO + machine + ".",
            "",
            *rows,
            "",
            *details,
            "",
            "## Calibrated probabilities",
            "",
            CALIBRATION,
            "",
            *cal_rows,
            "",
            "## int8: static (batch-independent) vs dynamic",
            "",
            QUANT,
            "",
            *q_rows,
            "",
            *served_open_set(reports),
            *open_set,
            *resamples,
            *also_bundled(models_dir),
            OUTRO,
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m exporters.zoo", description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", help="models to build (default: every models/*/recipe.yaml)")
    p.add_argument("--models-dir", type=Path, default=ROOT / "models")
    p.add_argument("--build-dir", type=Path, default=ROOT / "build" / "zoo")
    p.add_argument("--docs", type=Path, default=ROOT / "docs" / "models.md")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--docs-only", action="store_true", help="only regenerate docs/models.md")
    p.add_argument("--reuse", action="store_true", help="reuse checkpoints in --build-dir (skip training)")
    p.add_argument(
        "--requantize",
        action="store_true",
        help="keep the committed fp32 weights: re-quantize, re-calibrate and re-measure only",
    )
    args = p.parse_args(argv)
    names = args.names or sorted(d.parent.name for d in args.models_dir.glob("*/recipe.yaml"))
    if not args.docs_only:
        for name in names:
            if args.requantize:
                report = requantize_one(name, args.models_dir, args.build_dir)
            else:
                report = build_one(
                    name, args.models_dir, args.build_dir, progress=not args.no_progress, reuse=args.reuse
                )
            m = report["metrics"]
            torch_txt = f"pytorch {m['pytorch']['accuracy']:.4f} " if "pytorch" in m else ""
            print(
                f"{name}: {torch_txt}fp32 {m['fp32']['accuracy']:.4f} "
                f"int8 {m['int8']['accuracy']:.4f}"
                + (f" baseline {report['baseline']['accuracy']:.4f}" if "baseline" in report else "")
                + f"; recommended {report['recommended']}"
            )
    text = models_table(args.models_dir)
    if args.docs.exists():  # hand-written sections after the generated part (e.g. explain) are kept
        old = args.docs.read_text(encoding="utf-8")
        end = old.find(OUTRO)
        if end >= 0:
            text = text.rstrip("\n") + "\n" + old[end + len(OUTRO) :].split("\n", 1)[1]
    args.docs.write_text(text, encoding="utf-8")
    print(f"wrote {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["build_one", "load_dataset", "main", "models_table"]
