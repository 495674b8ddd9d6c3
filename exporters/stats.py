"""``python -m exporters stats RECIPE MODEL.onnx...``: add ``training_stats`` to models already built.

The figures come from the training split of the data the recipe names (the same loader and seed
as ``exporters train``), in raw units, without retraining: only the manifest in the ONNX file's
``metadata_props`` changes, so the graph and its answers stay the same. A ``report.json``
beside the models that lists them gets their new sizes and sha256.

Data sets whose arrays are not in the units the daemon is fed (ACSF1's series are z-normalised
in the file) get none: the figures would flag every served input.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from edge.drift import FeatureStats, training_stats
from exporters.data import DataSet


def stats_of_split(ds: DataSet) -> list[dict[str, Any]] | None:
    """The manifest's ``training_stats``: per feature, over the training split in raw units
    (the whole series of a window sample, not only its served crop); ``None`` for grids and
    data not in served units."""
    if ds.layout == "grid" or len(ds.x_train) == 0 or not ds.describes_served_inputs:
        return None
    return [s.model_dump(mode="json") for s in training_stats(ds.features, ds.x_train, pooled=ds.pooled)]


def add_stats(model_path: Path, stats: list[dict[str, Any]]) -> dict[str, Any]:
    """Write ``stats`` into the model's manifest; returns its new size and sha256."""
    import onnx

    from exporters.onnxutil import get_manifest, set_manifest

    model = onnx.load(str(model_path))
    manifest = get_manifest(model)
    if manifest is None:
        raise ValueError(f"{model_path}: no edge-infer manifest")
    updated = manifest.model_copy(update={"training_stats": [FeatureStats.model_validate(s) for s in stats]})
    type(manifest).from_json(updated.to_json(), str(model_path))  # validated as the daemon will read it
    set_manifest(model, updated)
    onnx.save_model(model, str(model_path), save_as_external_data=False)
    data = model_path.read_bytes()
    return {"size_bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def update_report(report_path: Path, changed: dict[str, dict[str, Any]]) -> None:
    if not report_path.is_file():
        return
    report = json.loads(report_path.read_text())
    for entry in report.get("files", {}).values():
        if isinstance(entry, dict) and entry.get("path") in changed:
            entry.update(changed[entry["path"]])
    report_path.write_text(json.dumps(report, indent=2) + "\n")


def cli_stats(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m exporters stats",
        description="Add training_stats (per-feature training figures, docs/drift.md) to built models.",
    )
    parser.add_argument("recipe", type=Path, help="the recipe the models were trained from")
    parser.add_argument("models", type=Path, nargs="+", help="ONNX files to update in place")
    parser.add_argument("--data", type=Path, default=None, help="the table the recipe was trained on")
    args = parser.parse_args(argv)
    from exporters.data import load_dataset
    from exporters.recipe import RecipeError, load_recipe

    try:
        recipe = load_recipe(args.recipe)
        ds = load_dataset(recipe, args.data)
    except (RecipeError, OSError, ValueError) as exc:
        print(f"python -m exporters stats: {exc}", file=sys.stderr)
        return 2
    stats = stats_of_split(ds)
    if stats is None:
        print(f"{recipe.name}: no training_stats ({ds.layout} layout or data not in served units)")
        return 0
    changed: dict[str, dict[str, Any]] = {}
    for path in args.models:
        try:
            changed[path.name] = add_stats(path, stats)
        except (OSError, ValueError) as exc:
            print(f"python -m exporters stats: {exc}", file=sys.stderr)
            return 2
        print(f"{path}: training_stats for {', '.join(s['name'] for s in stats)} ({len(ds.x_train)} samples)")
    for report in {p.parent / "report.json" for p in args.models}:
        update_report(report, {k: v for k, v in changed.items() if (report.parent / k).exists()})
    return 0
