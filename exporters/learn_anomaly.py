"""``python -m exporters.learn_anomaly SPEC.json --out DIR``: the training process of an anomaly
``edge-infer learn`` (edge/learn/anomaly.py starts it, niced and bounded, as it starts
``python -m exporters train`` for a classifier).

``SPEC.json`` holds ``recipe`` (the fields of :class:`exporters.anomaly.AnomalyRecipe`) and
``data``: an ``.npz`` with ``train`` ([N, window, C] windows marked normal, oldest block) and
``calibration`` (the held-out normal windows the threshold is set on, one device after the
other, each in time order). Writes ``DIR/NAME.fp32.onnx`` (manifest with ``task: anomaly``,
``threshold`` and ``provenance.alarm``), ``DIR/report.json`` and ``DIR/card.md``.

Exit status: 0 written; 2 the data cannot train a model (too few windows; the reason printed).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from exporters.anomaly import AnomalyRecipe, fit_windows


def train(spec: dict[str, Any], out: Path) -> dict[str, Any]:
    recipe = AnomalyRecipe(**spec["recipe"])
    with np.load(spec["data"]) as data:
        x_train, x_cal = data["train"], data["calibration"]
    out.mkdir(parents=True, exist_ok=True)
    model = out / f"{recipe.name}.fp32.onnx"
    started = time.monotonic()
    print(f"training the autoencoder on {len(x_train)} normal windows, {recipe.epochs} epochs", flush=True)
    result = fit_windows(
        x_train,
        x_cal,
        recipe,
        model,
        dataset={
            "name": "this home's normal readings (edge-infer learn)",
            "train_windows": len(x_train),
            "held_out_windows": len(x_cal),
        },
    )
    report: dict[str, Any] = {
        "name": recipe.name,
        "task": "anomaly",
        "recommended": "fp32",
        "files": {"fp32": {"path": model.name, "size_bytes": model.stat().st_size}},
        "train_windows": result.train_windows,
        "calibration_windows": len(x_cal),
        "threshold": result.threshold,
        "alarm": recipe.alarm.record(),
        "seconds": time.monotonic() - started,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    thr = result.threshold
    (out / "card.md").write_text(
        "\n".join(
            [
                f"# {recipe.name}: anomaly model learned from normal behaviour",
                "",
                f"{recipe.description}",
                "",
                f"Autoencoder (exporters/anomaly.py, `view: {recipe.view}`"
                + (", `log1p`" if recipe.log1p else "")
                + f") over windows of {recipe.window} readings ({', '.join(recipe.features)}, one every "
                f"{recipe.sample_period_s:g} s), scored every {recipe.hop}; trained on "
                f"{result.train_windows} normal windows, no labels. Threshold {thr['threshold']:.4g} for "
                f"{thr['target_false_alarms_per_day']:g} false alarms a day on {len(x_cal)} held-out "
                f"normal windows ({thr['method']}). Alarm: on after {recipe.persist} scores in a row at "
                f"or over it, off after {recipe.clear} under it (edge/alarm.py).",
                "",
            ]
        )
    )
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m exporters.learn_anomaly", description=__doc__.split("\n")[0]
    )
    parser.add_argument("spec", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        report = train(json.loads(args.spec.read_text()), args.out)
    except ValueError as exc:
        print(f"exporters.learn_anomaly: {exc}", file=sys.stderr)
        return 2
    print(f"threshold {report['threshold']['threshold']:.4g}: {report['threshold']['method']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
