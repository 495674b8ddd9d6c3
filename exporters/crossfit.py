"""Out-of-fold outputs for fitting a temperature when the recipe keeps no validation split.

The zoo's small official splits (ACSF1: 100 training series, BasicMotions: 40) put every
training series into training, so there is no held-out data of the served model itself.
The standard substitute (as scikit-learn's ``CalibratedClassifierCV`` with cross-validation)
is a K-fold cross-fit: K models of the *same recipe*, each trained without one stratified
fold, exported and quantized exactly like the served model, each predicting the fold it did
not see. Their out-of-fold probabilities (fp32 and int8) stand in for the served model's
behaviour on unseen series; the temperature fitted on them is folded into the served files.
The test split is never used.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from exporters.data import DataSet
from exporters.recipe import Recipe


def stratified_folds(y: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """``k`` disjoint index arrays, each class spread evenly over them."""
    rng = np.random.default_rng(seed)
    folds: list[list[int]] = [[] for _ in range(k)]
    offset = 0
    for cls in np.unique(y):
        idx = np.flatnonzero(y == cls)
        idx = idx[rng.permutation(len(idx))]
        for j, i in enumerate(idx):
            folds[(j + offset) % k].append(int(i))
        offset += len(idx)
    return [np.array(sorted(f), dtype=np.int64) for f in folds]


def crossfit_outputs(recipe: Recipe, ds: DataSet, k: int = 5, *, cache: Path | None = None) -> dict[str, Any]:
    """Out-of-fold fp32 and int8 probabilities for every training series (cached in ``cache``)."""
    import json

    # what the fold models depend on: the recipe except the calibration settings themselves
    key = json.dumps(recipe.model_dump(mode="json", exclude={"calibration", "limitations"}), sort_keys=True)
    if cache is not None and cache.exists():
        blob = np.load(cache)
        same = "recipe" in blob.files and str(blob["recipe"]) == key
        if same and int(blob["k"]) == k and np.array_equal(blob["y"], ds.y_train):
            return {
                "fp32": blob["fp32"],
                "int8": blob["int8"],
                "y": blob["y"],
                "k": k,
                "seconds": float(blob["seconds"]),
            }
    from exporters.export import export
    from exporters.onnxutil import run_onnx, session
    from exporters.quantize import calibration_inputs, quantize_model
    from exporters.train import train

    started = time.monotonic()
    n, n_out = len(ds.y_train), len(ds.labels)
    out = {"fp32": np.zeros((n, n_out), np.float32), "int8": np.zeros((n, n_out), np.float32)}
    for fold in stratified_folds(ds.y_train, k, recipe.train.seed):
        keep = np.setdiff1d(np.arange(n), fold)
        sub = dataclasses.replace(
            ds,
            x_train=ds.x_train[keep],
            y_train=ds.y_train[keep],
            x_val=ds.x_val[:0],
            y_val=ds.y_val[:0],
            x_test=ds.x_train[fold],
            y_test=ds.y_train[fold],
        )
        with tempfile.TemporaryDirectory() as tmp:
            result = train(recipe, Path(tmp), progress=False, dataset=sub, checkpoint=Path(tmp) / "fold.pt")
            fp32, int8 = Path(tmp) / "fold.fp32.onnx", Path(tmp) / "fold.int8.onnx"
            export(result.checkpoint, fp32)
            quantize_model(
                fp32,
                int8,
                recipe.quantize,
                calibration_inputs(sub, recipe.quantize.calibration_samples),
                recipe.quantize.mode,
            )
            x = sub.model_input(sub.x_test)
            out["fp32"][fold] = run_onnx(session(fp32), x, batch=1)
            out["int8"][fold] = run_onnx(session(int8), x, batch=1)
    seconds = round(time.monotonic() - started, 1)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(
            cache,
            fp32=out["fp32"],
            int8=out["int8"],
            y=ds.y_train,
            k=k,
            seconds=seconds,
            recipe=np.array(key),
        )
    return {**out, "y": ds.y_train, "k": k, "seconds": seconds}


def _main() -> None:  # python -m exporters.crossfit NAME: fill the cache ahead of the zoo build
    import sys

    from exporters.data import load_dataset
    from exporters.recipe import load_recipe

    root = Path(__file__).resolve().parent.parent
    for name in sys.argv[1:]:
        recipe = load_recipe(root / "models" / name / "recipe.yaml")
        ds = load_dataset(recipe)
        res = crossfit_outputs(recipe, ds, cache=root / "build" / "zoo" / name / "crossfit.npz")
        acc = {key: float((res[key].argmax(1) == res["y"]).mean()) for key in ("fp32", "int8")}
        print(f"{name}: out-of-fold accuracy {acc} in {res['seconds']} s")


if __name__ == "__main__":
    _main()
