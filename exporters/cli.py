"""``edge-infer train | export | quantize | verify``: argument parsing and orchestration.

Exit codes: 0 success; 1 quantization refused (accuracy budget) or a failed check;
2 usage or recipe error.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge.manifest import ManifestError
from exporters.recipe import Recipe, RecipeError, load_recipe, recipe_from_dict


def _err(prog: str, message: str) -> None:
    print(f"{prog}: {message}", file=sys.stderr)


def _missing(prog: str, modules: tuple[str, ...] = ("torch", "onnx")) -> int | None:
    """Exit status 3 with install instructions when a dependency of the train extra is missing."""
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            from edge.cli import INSTALL_HINT

            _err(prog, f"missing dependency {name!r}; {INSTALL_HINT['train']}")
            return 3
    return None


# ---------------------------------------------------------------------------- shared steps


@dataclass
class BuildResult:
    checkpoint: Path
    fp32: Path
    int8: Path | None
    report: dict[str, Any]
    quantize_message: str
    refused: bool


def recipe_from_model(model: Path, recipe_path: Path | None) -> Recipe:
    """The recipe embedded in a model's manifest (or the one given explicitly)."""
    if recipe_path is not None:
        return load_recipe(recipe_path)
    from edge.manifest import read_manifest

    manifest = read_manifest(model)
    if manifest is None or "recipe" not in manifest.provenance:
        raise RecipeError(f"{model}: no embedded recipe; pass --recipe")
    return recipe_from_dict(manifest.provenance["recipe"], str(model))


def verify_models(
    fp32: Path,
    recipe: Recipe,
    out_dir: Path,
    *,
    int8: Path | None = None,
    checkpoint: Path | None = None,
    data: Path | None = None,
    baseline: str | None = None,
    quick: bool = False,
    extra: dict[str, Any] | None = None,
    compare: dict[str, Path] | None = None,
) -> dict[str, Any]:
    from exporters.data import load_dataset
    from exporters.verify import verify

    ds = load_dataset(recipe, data)
    torch_out = None
    if checkpoint is not None:
        from exporters.train import load_checkpoint, predict

        torch_out = predict(load_checkpoint(checkpoint).served, ds.model_input(ds.x_test))
    if recipe.limitations:
        extra = {"limitations": recipe.limitations, **(extra or {})}
    return verify(
        fp32,
        ds,
        out_dir,
        int8=int8,
        torch_outputs=torch_out,
        baseline=baseline if baseline is not None else recipe.baseline,
        budget_points=recipe.quantize.budget_points,
        quick=quick,
        extra=extra,
        compare=compare,
    )


def build(
    recipe: Recipe,
    out_dir: Path,
    *,
    checkpoint: Path | None = None,
    data: Path | None = None,
    progress: bool = True,
    quantize: bool = True,
    force: bool = False,
    quick: bool = False,
    extra: dict[str, Any] | None = None,
) -> BuildResult:
    """train -> export -> quantize -> verify, all files into ``out_dir``."""
    from exporters.export import export
    from exporters.quantize import quantize as run_quantize
    from exporters.train import train

    result = train(recipe, out_dir, data, progress=progress, checkpoint=checkpoint)
    fp32 = out_dir / f"{recipe.name}.fp32.onnx"
    export(result.checkpoint, fp32)
    int8: Path | None = None
    message, refused = "", False
    if quantize:
        q = run_quantize(
            fp32,
            out_dir / f"{recipe.name}.int8.onnx",
            result.dataset,
            recipe.quantize,
            mode=recipe.quantize.mode,
            force=force,
        )
        int8, message, refused = q.path, q.message, q.refused
    ds = result.dataset
    if recipe.task == "classification" and recipe.calibration.method == "temperature" and len(ds.x_val):
        from exporters.calibrate import calibrate_files
        from exporters.onnxutil import run_onnx, session

        files = {"fp32": fp32} | ({"int8": int8} if int8 else {})
        x_val = ds.model_input(ds.x_val)
        held = {k: run_onnx(session(p), x_val, batch=1) for k, p in files.items()}
        fitted_on = f"the validation split ({len(ds.y_val)} samples, never trained on)"
        extra = {
            **(extra or {}),
            "calibration": calibrate_files(
                files,
                files,
                x_test=ds.model_input(ds.x_test),
                y_test=ds.y_test,
                probs_held_out=held,
                y_held_out=ds.y_val,
                fitted_on=fitted_on,
                plot=out_dir / "reliability.png",
                name=recipe.name,
            ),
        }
    report = verify_models(
        fp32, recipe, out_dir, int8=int8, checkpoint=result.checkpoint, data=data, quick=quick, extra=extra
    )
    return BuildResult(result.checkpoint, fp32, int8, report, message, refused)


def _summary(report: dict[str, Any]) -> str:
    parts = []
    for key in ("pytorch", "fp32", "int8"):
        m = report["metrics"].get(key)
        if m is not None:
            value = f"acc {m['accuracy']:.4f}" if "accuracy" in m else f"MAE {m['mae']:.4g}"
            parts.append(f"{key} {value}")
    if "baseline" in report:
        parts.append(f"baseline acc {report['baseline']['accuracy']:.4f}")
    lat = report["latency_single_thread"]
    parts += [f"{k} b1 {v['batch_1']['median_ms']:.3f} ms" for k, v in lat.items()]
    parts.append(f"recommended: {report['recommended']}")
    return "; ".join(parts)


# ---------------------------------------------------------------------------- train


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edge-infer train",
        description="Train a model from a YAML recipe and/or options. With --quantize it also exports, "
        "quantizes and verifies (the whole pipeline).",
    )
    p.add_argument("recipe", nargs="?", type=Path, help="recipe YAML (options below override it)")
    p.add_argument("--data", help="CSV/Parquet file (as 'record' writes) or builtin:NAME")
    p.add_argument("--out", type=Path, help="output directory (default: build/<name>)")
    p.add_argument("--checkpoint", type=Path, help="checkpoint path (default: <out>/<name>.pt)")
    p.add_argument("--name")
    p.add_argument("--task", choices=["classification", "regression"])
    p.add_argument("--layout", choices=["snapshot", "window", "grid"])
    p.add_argument("--features", help="comma-separated feature/channel columns, in order")
    p.add_argument("--units", help="comma-separated name=unit pairs, e.g. power=W,co2=ppm")
    p.add_argument("--label", help="label column (default: label)")
    p.add_argument("--labels", help="comma-separated class names: output index i = name i")
    p.add_argument("--window", type=int, help="samples per window")
    p.add_argument("--stride", type=int)
    p.add_argument("--sample-period", type=float, help="seconds between window samples")
    p.add_argument("--group", help="column grouping rows (device, room)")
    p.add_argument("--split", choices=["official", "random", "group"])
    p.add_argument("--family", choices=["mlp", "cnn1d", "cnn2d", "lstm", "gru"])
    p.add_argument("--hidden", help="comma-separated layer widths")
    p.add_argument("--dropout", type=float, help="dropout probability (default: recipe, 0.1)")
    p.add_argument(
        "--normalisation",
        choices=["zscore", "per_window", "per_window_level", "none"],
        help="in-graph input normalisation (default: recipe, zscore)",
    )
    p.add_argument("--val-fraction", type=float, help="share of the data held out for validation")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--patience", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--no-class-weights", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--export", action="store_true", help="also export (and verify) the fp32 model")
    p.add_argument("--quantize", action="store_true", help="also export, quantize and verify")
    p.add_argument("--force", action="store_true", help="keep int8 even when over the accuracy budget")
    p.add_argument("--print-recipe", action="store_true", help="print the effective recipe and exit")
    return p


def _recipe_from_args(args: argparse.Namespace) -> Recipe:
    raw: dict[str, Any] = (
        load_recipe(args.recipe).model_dump(mode="json")
        if args.recipe
        else {"data": {}, "model": {}, "train": {}}
    )
    raw.setdefault("train", {})
    data, model, train = raw["data"], raw["model"], raw["train"]

    def csv(text: str) -> list[str]:
        return [t.strip() for t in text.split(",") if t.strip()]

    for key, value in (
        ("name", args.name),
        ("task", args.task),
        ("labels", csv(args.labels) if args.labels else None),
    ):
        if value is not None:
            raw[key] = value
    for key, value in (
        ("source", args.data),
        ("layout", args.layout),
        ("label", args.label),
        ("window", args.window),
        ("stride", args.stride),
        ("sample_period_s", args.sample_period),
        ("group", args.group),
        ("split", args.split),
        ("val_fraction", args.val_fraction),
        ("features", csv(args.features) if args.features else None),
        ("units", dict(kv.split("=", 1) for kv in csv(args.units)) if args.units else None),
    ):
        if value is not None:
            data[key] = value
    if args.family:
        model["family"] = args.family
    if args.hidden:
        model["hidden"] = [int(h) for h in csv(args.hidden)]
    if args.dropout is not None:
        model["dropout"] = args.dropout
    if args.normalisation:
        model["normalisation"] = args.normalisation
    for key, value in (
        ("epochs", args.epochs),
        ("batch_size", args.batch_size),
        ("lr", args.lr),
        ("patience", args.patience),
        ("seed", args.seed),
    ):
        if value is not None:
            train[key] = value
    if args.no_class_weights:
        train["class_weights"] = False
    if "name" not in raw:
        raw["name"] = Path(str(data.get("source", "model"))).stem.replace("builtin:", "") or "model"
    return recipe_from_dict(raw, str(args.recipe or "command line"))


def cli_train(argv: list[str]) -> int:
    prog = "edge-infer train"
    if (status := _missing(prog)) is not None:
        return status
    args = _train_parser().parse_args(argv)
    try:
        recipe = _recipe_from_args(args)
    except (RecipeError, ValueError) as exc:
        _err(prog, str(exc))
        return 2
    if args.print_recipe:
        from exporters.recipe import dump_recipe

        print(dump_recipe(recipe), end="")
        return 0
    out = args.out or Path("build") / recipe.name
    data_override = Path(args.data) if args.data and not args.data.startswith("builtin:") else None
    try:
        if args.quantize or args.export:
            res = build(
                recipe,
                out,
                checkpoint=args.checkpoint,
                data=data_override,
                progress=not args.no_progress,
                quantize=args.quantize,
                force=args.force,
            )
            print(
                f"checkpoint {res.checkpoint}\nfp32 {res.fp32}" + (f"\nint8 {res.int8}" if res.int8 else "")
            )
            if res.quantize_message:
                print(res.quantize_message, file=sys.stderr if res.refused else sys.stdout)
            print(_summary(res.report))
            print(f"card {out / 'card.md'}, report {out / 'report.json'}")
            return 1 if res.refused else 0
        from exporters.train import train

        result = train(recipe, out, data_override, progress=not args.no_progress, checkpoint=args.checkpoint)
    except (RecipeError, ValueError) as exc:
        _err(prog, str(exc))
        return 2
    print(f"checkpoint {result.checkpoint}")
    for split in ("val", "test"):
        m = result.metrics.get(split)
        if m:
            value = (
                f"accuracy {m['accuracy']:.4f} macro-F1 {m['macro_f1']:.4f}"
                if "accuracy" in m
                else (f"MAE {m['mae']:.4g}")
            )
            print(f"{split}: {value} (n={m['n']})")
    print("plots " + ", ".join(str(p) for p in result.plots))
    print(f"next: edge-infer export {result.checkpoint}")
    return 0


# ---------------------------------------------------------------------------- export


def cli_export(argv: list[str]) -> int:
    prog = "edge-infer export"
    if (status := _missing(prog)) is not None:
        return status
    p = argparse.ArgumentParser(
        prog=prog,
        description="Export a checkpoint to one self-contained ONNX file "
        "(raw units in, probabilities/values out) with its manifest, then verify it.",
    )
    p.add_argument("checkpoint", type=Path, help="checkpoint written by 'edge-infer train'")
    p.add_argument(
        "-o", "--out", type=Path, help="output .onnx (default: beside the checkpoint, NAME.fp32.onnx)"
    )
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--data", type=Path, help="data file for verification, if it moved since training")
    p.add_argument("--no-verify", action="store_true")
    args = p.parse_args(argv)
    from exporters.export import export
    from exporters.onnxutil import ExportError
    from exporters.train import load_checkpoint

    try:
        ckpt = load_checkpoint(args.checkpoint)
        out = args.out or args.checkpoint.with_name(f"{ckpt.recipe.name}.fp32.onnx")
        summary = export(ckpt, out, args.opset)
    except (OSError, ValueError, ExportError) as exc:
        _err(prog, str(exc))
        return 1
    print(json.dumps(summary, indent=2))
    if not args.no_verify:
        try:
            report = verify_models(
                out, ckpt.recipe, out.parent, checkpoint=args.checkpoint, data=args.data, quick=True
            )
        except (RecipeError, ManifestError, ValueError) as exc:
            _err(prog, f"exported, but verification could not run: {exc}")
            return 1
        print(_summary(report))
        print(f"card {out.parent / 'card.md'}")
    return 0


# ---------------------------------------------------------------------------- quantize


def cli_quantize(argv: list[str]) -> int:
    prog = "edge-infer quantize"
    if (status := _missing(prog, ("onnx", "onnxruntime.quantization"))) is not None:
        return status
    p = argparse.ArgumentParser(
        prog=prog,
        description="Quantize an exported model to int8 (static QDQ for convolutions, dynamic for linear and "
        "recurrent layers, 7-bit weights so results are exact on x86 with or without VNNI and on ARM), "
        "then verify. Refuses when int8 loses more accuracy than the budget.",
    )
    p.add_argument("model", type=Path, help="fp32 .onnx written by 'edge-infer export'")
    p.add_argument("-o", "--out", type=Path, help="output (default: NAME.int8.onnx beside the input)")
    p.add_argument("--mode", choices=["auto", "static", "dynamic"])
    p.add_argument("--budget", type=float, help="max accuracy loss in points (default: recipe, 1.0)")
    p.add_argument("--force", action="store_true", help="write int8 even when over budget")
    p.add_argument("--calibration-samples", type=int)
    p.add_argument(
        "--no-reduce-range",
        action="store_true",
        help="8-bit weights: can saturate on x86 CPUs without VNNI (not recommended)",
    )
    p.add_argument("--recipe", type=Path, help="recipe (default: the one embedded in the model)")
    p.add_argument("--data", type=Path, help="data file, if it moved since training")
    p.add_argument("--checkpoint", type=Path, help="checkpoint, for PyTorch parity in the report")
    p.add_argument("--no-verify", action="store_true")
    args = p.parse_args(argv)
    from exporters.data import load_dataset
    from exporters.quantize import quantize

    try:
        recipe = recipe_from_model(args.model, args.recipe)
        spec = recipe.quantize.model_copy()
        if args.budget is not None:
            spec.budget_points = args.budget
        if args.calibration_samples:
            spec.calibration_samples = args.calibration_samples
        if args.no_reduce_range:
            spec.reduce_range = False
        ds = load_dataset(recipe, args.data)
        stem = args.model.name.removesuffix(".onnx").removesuffix(".fp32")
        out = args.out or args.model.with_name(f"{stem}.int8.onnx")
        result = quantize(args.model, out, ds, spec, mode=args.mode or spec.mode, force=args.force)
    except (RecipeError, ManifestError, OSError, ValueError) as exc:
        _err(prog, str(exc))
        return 2
    if result.refused:
        _err(prog, result.message)
        return 1
    print(result.message)
    print(f"int8 {out} ({result.mode}: {result.settings.get('format')})")
    if not args.no_verify:
        recipe = recipe.model_copy(update={"quantize": spec})
        report = verify_models(
            args.model, recipe, out.parent, int8=out, checkpoint=args.checkpoint, data=args.data, quick=True
        )
        print(_summary(report))
        if report["recommended"] == "fp32":
            print(f"note: {report['notes'][-1]}")
    return 0


# ---------------------------------------------------------------------------- verify


def cli_verify(argv: list[str]) -> int:
    prog = "edge-infer verify"
    if (status := _missing(prog, ("onnx",))) is not None:
        return status
    p = argparse.ArgumentParser(
        prog=prog,
        description="Parity (PyTorch/fp32/int8), test accuracy, single-thread latency at batch 1 and 32, "
        "permutation importance; writes card.md and report.json beside the model.",
    )
    p.add_argument("model", type=Path, help="fp32 .onnx")
    p.add_argument("--int8", type=Path, help="int8 .onnx (default: NAME.int8.onnx beside it, if present)")
    p.add_argument("--checkpoint", type=Path, help="PyTorch checkpoint for parity")
    p.add_argument("--recipe", type=Path, help="recipe (default: the one embedded in the model)")
    p.add_argument("--data", type=Path, help="data file, if it moved since training")
    p.add_argument(
        "--out-dir", type=Path, help="where card.md and report.json go (default: beside the model)"
    )
    p.add_argument("--baseline", choices=["none", "minirocket"], help="default: the recipe's")
    p.add_argument("--quick", action="store_true", help="shorter latency runs and one importance repeat")
    p.add_argument("--json", action="store_true", help="print the whole report")
    args = p.parse_args(argv)
    int8 = args.int8
    if int8 is None:
        stem = args.model.name.removesuffix(".onnx").removesuffix(".fp32")
        candidate = args.model.with_name(f"{stem}.int8.onnx")
        int8 = candidate if candidate.exists() and candidate != args.model else None
    try:
        recipe = recipe_from_model(args.model, args.recipe)
        report = verify_models(
            args.model,
            recipe,
            args.out_dir or args.model.parent,
            int8=int8,
            checkpoint=args.checkpoint,
            data=args.data,
            baseline=args.baseline,
            quick=args.quick,
        )
    except (RecipeError, ManifestError, OSError, ValueError) as exc:
        _err(prog, str(exc))
        return 2
    print(json.dumps(report, indent=2) if args.json else _summary(report))
    failed = [n for n in report["notes"] if "beyond the tolerance" in n]
    return 1 if failed else 0
