"""Build the bundled model zoo: ``python -m exporters.zoo [NAME ...]`` (what ``make models`` runs).

For each ``models/<name>/recipe.yaml``: train (deterministic seed, one torch
thread), export, quantize, measure (plus, for window classifiers with a MiniRocket
baseline, a sweep over window lengths), verify, and write into ``models/<name>/``
the fp32 and int8 ONNX files, ``card.md``, ``report.json``, the plots and
``test_split.npz`` (the test inputs in raw units and their labels, so the zoo test
needs neither aeon nor torch). Checkpoints go to ``build/zoo/<name>/``. Finally
``docs/models.md`` is regenerated from the reports.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from exporters.cli import verify_models
from exporters.data import DataSet, load_dataset
from exporters.recipe import Recipe, load_recipe

ROOT = Path(__file__).resolve().parent.parent
INTRO = (
    "Built by `make models` (`python -m exporters.zoo`) from `models/<name>/recipe.yaml` with fixed seeds; "
    "every number below is measured by that command on the official (or held-out) test split and written "
    "into each model's `card.md` and `report.json`. All models take raw units and return probabilities "
    "(normalisation and softmax are inside the graph); the daemon needs only the topic and field names. "
    "Latency: median, one thread, batch 1, onnxruntime CPU, same run for fp32 and int8"
)
OUTRO = (
    "How the files are made and checked: [exporting.md](exporting.md). `tests/test_zoo.py` reloads every "
    "int8 model with ONNX Runtime alone and checks that the accuracy in its card is what it measures on "
    "the committed test split."
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


def build_one(
    name: str, models_dir: Path, build_dir: Path, progress: bool, reuse: bool = False
) -> dict[str, Any]:
    from exporters.export import export
    from exporters.quantize import quantize
    from exporters.train import load_checkpoint, train

    out = models_dir / name
    recipe: Recipe = load_recipe(out / "recipe.yaml")
    started = time.monotonic()
    checkpoint = build_dir / name / f"{name}.pt"
    if reuse and checkpoint.exists():  # re-export, re-quantize and re-measure a trained model
        ckpt = load_checkpoint(checkpoint)
        if ckpt.recipe != recipe:
            raise SystemExit(
                f"[{name}] {checkpoint} was trained from another recipe: rebuild without --reuse"
            )
        ds, train_metrics = load_dataset(recipe), ckpt.metrics
    else:
        result = train(recipe, out, progress=progress, checkpoint=checkpoint)
        ds, train_metrics = result.dataset, result.metrics
    fp32 = out / f"{name}.fp32.onnx"
    export(checkpoint, fp32)
    q = quantize(fp32, out / f"{name}.int8.onnx", ds, recipe.quantize, mode=recipe.quantize.mode)
    print(f"[{name}] {q.message}", file=sys.stderr)
    if q.refused:
        raise SystemExit(f"[{name}] quantization refused: {q.message}")
    extra: dict[str, Any] = {
        "rebuild": f"`make models` (or `python -m exporters.zoo {name}`), recipe "
        f"`models/{name}/recipe.yaml`, seed {recipe.train.seed}",
        "training": {
            "best_epoch": train_metrics["best_epoch"],
            "epochs_run": train_metrics["epochs_run"],
            "seconds": round(time.monotonic() - started, 1),
        },
    }
    if (
        ds.layout == "window"
        and recipe.model.family in ("cnn1d", "lstm", "gru")
        and recipe.baseline != "none"
    ):
        series = ds.x_test.shape[1]
        lengths = sorted({*(int(series * f) for f in (0.25, 0.5, 0.75)), series, ds.window or series})
        extra["window_sweep"] = window_sweep(ds, fp32, q.path, lengths, baseline=True)
    save_test_split(ds, out / "test_split.npz")
    return verify_models(fp32, recipe, out, int8=q.path, checkpoint=checkpoint, extra=extra)


def models_table(models_dir: Path) -> str:
    """docs/models.md: one table of every bundled model, from the reports."""
    rows = [
        "| model | task | data | input | accuracy fp32 / int8 | macro-F1 int8 | size fp32 / int8 "
        "| latency b1 fp32 / int8 | baseline |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    details: list[str] = []
    for report_path in sorted(models_dir.glob("*/report.json")):
        r = json.loads(report_path.read_text())
        name = r["name"]
        m, f, lat = r["metrics"], r["files"], r["latency_single_thread"]
        inp = r["input"]
        shape = f"{inp['layout']} {inp.get('window', '')}x{len(inp.get('features', []))}".replace(" x", " ")
        base = r.get("baseline")
        base_txt = f"MiniRocket {base['accuracy']:.2f} (same T)" if base else "-"
        rows.append(
            f"| [{name}](../models/{name}/card.md) | {r['task']} ({len(r['labels'])} classes) "
            f"| {r['dataset'].get('name')} | {shape} "
            f"| {m['fp32']['accuracy']:.3f} / {m['int8']['accuracy']:.3f} | {m['int8']['macro_f1']:.3f} "
            f"| {f['fp32']['size_bytes'] / 1024:.0f} / {f['int8']['size_bytes'] / 1024:.0f} KiB "
            f"| {lat['fp32']['batch_1']['median_ms']:.3f} / {lat['int8']['batch_1']['median_ms']:.3f} ms "
            f"| {base_txt} |"
        )
        details.append(
            f"- **{name}**: {r['dataset'].get('split')}. Recommended file here: {r['recommended']}."
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
    machine = ""
    if details:
        first = json.loads(next(iter(sorted(models_dir.glob("*/report.json")))).read_text())
        machine = f"{first['machine']['processor']}, {first['machine']['platform']}"
    return "\n".join(
        [
            "# Bundled models",
            "",
            INTRO + (f" ({machine})." if machine else "."),
            "",
            *rows,
            "",
            *details,
            "",
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
    args = p.parse_args(argv)
    names = args.names or sorted(d.parent.name for d in args.models_dir.glob("*/recipe.yaml"))
    if not args.docs_only:
        for name in names:
            report = build_one(
                name, args.models_dir, args.build_dir, progress=not args.no_progress, reuse=args.reuse
            )
            m = report["metrics"]
            print(
                f"{name}: pytorch {m['pytorch']['accuracy']:.4f} fp32 {m['fp32']['accuracy']:.4f} "
                f"int8 {m['int8']['accuracy']:.4f}"
                + (f" baseline {report['baseline']['accuracy']:.4f}" if "baseline" in report else "")
                + f"; recommended {report['recommended']}"
            )
    args.docs.write_text(models_table(args.models_dir), encoding="utf-8")
    print(f"wrote {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["build_one", "load_dataset", "main", "models_table"]
