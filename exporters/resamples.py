"""ACSF1 accuracy on the official split and on stratified resamples: ``python -m exporters.resamples acsf1``.

The published accuracies of time-series classifiers on the UCR archive are means over 30
resamples (Middlehurst et al. 2024, "Bake off redux"): resample 0 is the official train/test
split, resample ``i`` pools the official train and test series and draws, per class and with
seed ``i``, as many training series as the official split has (the rest is the test split), so
every resample keeps the official class counts. This module measures, on the same resamples,

* ``minirocket``: aeon's MiniRocketClassifier (default settings, ``random_state`` = resample);
* ``multirocket``: aeon's MultiRocketClassifier (default settings): a published reference
  (0.850 over 30 resamples), so it checks that these resamples are comparable;
* ``quant``: aeon's QUANTClassifier (default settings);
* ``cnn``: the zoo's appliance recipe (``models/appliance/recipe.yaml``: the served model family,
  400 epochs, seed 0), exported to ONNX and measured with ONNX Runtime. About 4 minutes per fit
  on a 2-core machine, so ``--cnn N`` runs it on the first N resamples only (the report says N);
* ``rocket``: the MiniRocket-style branch of ``exporters/rocket.py`` alone (``ROCKET_FEATURES``
  features, per-window normalisation as the recipe's; about 6 s a fit);
* ``cnn+rocket``: the mean of the two models' probabilities, which is what a recipe with
  ``model.rocket_features`` answers: the network beside the branch trains to the same weights as
  without it (tests/test_exporters.py checks that), so the cached outputs of both are combined.

Results are cached per (model, resample) in ``--cache`` (JSON), so runs can be split and resumed.
``--save DIR`` writes ``report.json`` and ``card.md`` there (``models/appliance/resamples``) and the
summary into the appliance card (``models/appliance/report.json`` -> ``card.md``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

ROOT = Path(__file__).resolve().parent.parent
#: published figures beside which ours are shown (30-resample means; official-split figures)
PUBLISHED = {
    "resamples": {"HIVE-COTE 2": 0.848, "MultiRocket": 0.850},
    "official": {"QUANT": 0.926, "WEASEL-2.0": 0.93},
}
MODELS = ("minirocket", "multirocket", "quant", "cnn", "rocket", "cnn+rocket")
#: features of the rocket branch measured here (``model.rocket_features`` of a recipe)
ROCKET_FEATURES = 4000


def resample(
    y_train: NDArray[Any], y_test: NDArray[Any], seed: int
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Indices into ``concat(train, test)`` of resample ``seed`` (0: the official split)."""
    n_train = len(y_train)
    y = np.concatenate([y_train, y_test])
    if seed == 0:
        return np.arange(n_train), np.arange(n_train, len(y))
    rng = np.random.default_rng(seed)
    train: list[int] = []
    for cls in np.unique(y):
        idx = np.flatnonzero(y == cls)
        train += rng.permutation(idx)[: int((y_train == cls).sum())].tolist()
    tr = np.array(sorted(train), dtype=np.int64)
    return tr, np.setdiff1d(np.arange(len(y)), tr)


def fit_aeon(model: str, x_tr: NDArray[Any], y_tr: NDArray[Any], x_te: NDArray[Any], seed: int) -> Any:
    from aeon.classification.convolution_based import MiniRocketClassifier, MultiRocketClassifier
    from aeon.classification.interval_based import QUANTClassifier

    clf = {
        "minirocket": lambda: MiniRocketClassifier(random_state=seed, n_jobs=1),
        "multirocket": lambda: MultiRocketClassifier(random_state=seed, n_jobs=1),
        "quant": lambda: QUANTClassifier(random_state=seed),
    }[model]()
    # aeon takes [N, C, L]; ours is [N, L, C]
    clf.fit(np.transpose(x_tr, (0, 2, 1)).astype(np.float64), y_tr)
    return clf.predict(np.transpose(x_te, (0, 2, 1)).astype(np.float64)).astype(np.int64)


def _fit_cnn(x_tr: NDArray[Any], y_tr: NDArray[Any], x_te: NDArray[Any], y_te: NDArray[Any]) -> Any:
    from exporters.data import ACSF1_CLASSES, DataSet
    from exporters.export import export
    from exporters.onnxutil import run_onnx, session
    from exporters.recipe import load_recipe
    from exporters.train import train

    recipe = load_recipe(ROOT / "models" / "appliance" / "recipe.yaml")
    ds = DataSet(
        "ACSF1-resample",
        "classification",
        "window",
        ["power"],
        x_tr,
        y_tr,
        x_tr[:0],
        y_tr[:0],
        x_te,
        y_te,
        labels=list(ACSF1_CLASSES),
        units={"power": "W"},
        window=x_tr.shape[1],
        sample_period_s=10.0,
        info={"name": "ACSF1", "split": "resample"},
    )
    with tempfile.TemporaryDirectory() as tmp:
        result = train(recipe, Path(tmp), progress=False, dataset=ds)
        export(result.checkpoint, Path(tmp) / "cnn.onnx")
        return run_onnx(session(Path(tmp) / "cnn.onnx"), ds.model_input(x_te), batch=256)


def _fit_rocket(x_tr: NDArray[Any], y_tr: NDArray[Any], x_te: NDArray[Any], seed: int) -> Any:
    """The recipe's rocket branch alone (exporters/rocket.py) on per-window-normalised windows."""
    import torch

    from exporters.recipe import load_recipe
    from exporters.rocket import RocketBranch
    from exporters.templates import InputNorm

    torch.set_num_threads(1)
    spec = load_recipe(ROOT / "models" / "appliance" / "recipe.yaml").model
    if spec.normalisation != "per_window":
        raise SystemExit(f"the rocket rows assume per_window windows, the recipe has {spec.normalisation}")
    norm = InputNorm(spec.normalisation, [], [])
    with torch.no_grad():
        a = norm(torch.from_numpy(x_tr.astype(np.float32)))
        b = norm(torch.from_numpy(x_te.astype(np.float32)))
    branch = RocketBranch(x_tr.shape[1], x_tr.shape[2], ROCKET_FEATURES, int(y_tr.max()) + 1)
    branch.fit_biases(a, seed)
    branch.fit_head(a, torch.from_numpy(y_tr.astype(np.int64)), None)
    with torch.no_grad():
        return torch.softmax(branch(b), dim=-1).numpy()


def run(
    n: int,
    *,
    cnn: int,
    cache: Path,
    budget_s: float | None,
    models: tuple[str, ...],
    probs_dir: Path | None = None,
) -> dict[str, Any]:
    from exporters.data import _aeon

    xtr, ytr, xte, yte, _ = _aeon("ACSF1")
    x, y = np.concatenate([xtr, xte]), np.concatenate([ytr, yte]).astype(np.int64)
    done: dict[str, dict[str, float]] = json.loads(cache.read_text()) if cache.exists() else {}
    started = time.monotonic()
    for model in models:
        todo = range(cnn if model in ("cnn", "cnn+rocket") else n)
        for seed in todo:
            key = str(seed)
            if key in done.get(model, {}):
                continue
            if budget_s is not None and time.monotonic() - started > budget_s:
                print(f"budget spent: {model} stops before resample {seed}", file=sys.stderr)
                break
            tr, te = resample(ytr, yte, seed)
            t0 = time.perf_counter()
            if model in ("cnn", "rocket"):
                if model == "cnn":
                    fit = _fit_cnn(x[tr], y[tr], x[te], y[te])
                else:
                    fit = _fit_rocket(x[tr], y[tr], x[te], seed)
                pred = fit.argmax(axis=1)
                if probs_dir is not None:  # held-out outputs, kept for calibration and cnn+rocket
                    probs_dir.mkdir(parents=True, exist_ok=True)
                    np.savez_compressed(probs_dir / f"{model}_{seed}.npz", index=te, probs=fit, y=y[te])
            elif model == "cnn+rocket":  # the mean of the two: what a recipe with both answers
                if probs_dir is None:
                    raise SystemExit("cnn+rocket needs the cnn and rocket outputs: run those models first")
                parts = [np.load(probs_dir / f"{m}_{seed}.npz") for m in ("cnn", "rocket")]
                if not all(np.array_equal(p["index"], te) for p in parts):
                    raise SystemExit(f"resample {seed}: cached cnn and rocket outputs of other splits")
                pred = (0.5 * parts[0]["probs"] + 0.5 * parts[1]["probs"]).argmax(axis=1)
            else:
                pred = fit_aeon(model, x[tr], y[tr], x[te], seed)
            acc = float((pred == y[te]).mean())
            done.setdefault(model, {})[key] = acc
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(done, indent=1, sort_keys=True) + "\n")
            print(f"{model} resample {seed}: {acc:.3f} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return summarise(done, n)


def summarise(done: dict[str, dict[str, float]], n: int) -> dict[str, Any]:
    out: dict[str, Any] = {"n_requested": n, "published": PUBLISHED, "models": {}}
    for model, accs in done.items():
        values = [accs[str(i)] for i in range(n) if str(i) in accs]
        if not values:
            continue
        out["models"][model] = {
            "official": accs.get("0"),
            "n": len(values),
            "mean": float(np.mean(values)),
            "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "accuracies": values,
        }
    return out


def held_out_training_outputs(work: Path, n_train: int) -> tuple[NDArray[Any], NDArray[Any], str]:
    """The CNN resample fits' probabilities on official training series they did not train on."""
    files = sorted((work / "probs").glob("cnn_*.npz"), key=lambda p: int(p.stem.split("_")[1]))
    probs, ys, used = [], [], []
    for path in files:
        seed = int(path.stem.split("_")[1])
        if seed == 0:  # the official split: its held-out series are the official test series
            continue
        d = np.load(path)
        keep = d["index"] < n_train
        probs.append(d["probs"][keep])
        ys.append(d["y"][keep])
        used.append(seed)
    if not probs:
        raise SystemExit(f"no resample outputs in {work / 'probs'}: run python -m exporters.resamples first")
    p, y = np.concatenate(probs), np.concatenate(ys)
    what = (
        f"outputs of {len(used)} models of this recipe (resamples {', '.join(map(str, used))} of "
        "`python -m exporters.resamples acsf1`: each trained on 100 series drawn per class from the "
        f"pooled official train + test series) on the official training series each did not train on "
        f"({len(y)} outputs); no official test series is used"
    )
    return p, y, what


NAMES = {
    "minirocket": "MiniRocket (aeon, default settings)",
    "multirocket": "MultiRocket (aeon, default settings)",
    "quant": "QUANT (aeon, default settings)",
    "cnn": "zoo CNN (models/appliance/recipe.yaml, fp32 ONNX)",
    "rocket": f"rocket branch alone (exporters/rocket.py, {ROCKET_FEATURES} features)",
    "cnn+rocket": f"zoo CNN + rocket branch (`model.rocket_features: {ROCKET_FEATURES}`, not yet served)",
}


def markdown(report: dict[str, Any], heading: str = "##") -> str:
    """The resample figures as Markdown (resamples/card.md, the appliance card, docs/models.md)."""
    pub_r = ", ".join(f"{k} {v:.3f}" for k, v in report["published"]["resamples"].items())
    pub_o = ", ".join(f"{k} {v:g}" for k, v in report["published"]["official"].items())
    rows = [
        "| model | official split | resamples: mean ± std | resamples measured |",
        "|---|---|---|---|",
    ]
    for model in MODELS:
        m = report["models"].get(model)
        if m is None:
            continue
        official = "-" if m["official"] is None else f"{m['official']:.3f}"
        rows.append(f"| {NAMES[model]} | {official} | {m['mean']:.3f} ± {m['std']:.3f} | {m['n']} |")
    lines = [
        f"{heading} ACSF1 on the official split and on stratified resamples",
        "",
        "Resample 0 is the official split; resample i pools the 200 official series and draws per "
        "class, seed i, as many training series as the official split has (10 per class; the other 10 "
        f"test). Published 30-resample means: {pub_r}; published on the official split: {pub_o}. "
        f"Reproduce: `{report.get('command', 'python -m exporters.resamples acsf1')}` "
        "(std: sample standard deviation over the resamples).",
        "",
        *rows,
        "",
        report.get("note", ""),
        "",
    ]
    return "\n".join(lines)


def into_card(report: dict[str, Any], model_dir: Path) -> None:
    """The summary into ``model_dir``'s report.json (``resamples``) and its card, re-rendered."""
    from edge.manifest import read_manifest
    from exporters.card import render_card

    path = model_dir / "report.json"
    card = json.loads(path.read_text())
    card["resamples"] = report
    path.write_text(json.dumps(card, indent=2, sort_keys=False) + "\n")
    manifest = read_manifest(model_dir / f"{card['name']}.fp32.onnx")
    if manifest is None:
        raise ValueError(f"{model_dir}: no manifest")
    (model_dir / "card.md").write_text(render_card(card, manifest), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m exporters.resamples", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("acsf1", help="ACSF1: official split and stratified resamples")
    a.add_argument("--n", type=int, default=30, help="resamples (0 = the official split)")
    a.add_argument("--cnn", type=int, default=0, help="fit the zoo CNN on the first N resamples only")
    a.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    a.add_argument("--cache", type=Path, default=ROOT / "build" / "resamples" / "acsf1.json")
    a.add_argument("--budget-s", type=float, default=None, help="stop starting fits after this long")
    a.add_argument("--note", default="", help="a sentence for the card (what bounds the figures)")
    a.add_argument("--save", type=Path, default=None, help="models/appliance/resamples")
    args = parser.parse_args(argv)
    report = run(
        args.n,
        cnn=args.cnn,
        cache=args.cache,
        budget_s=args.budget_s,
        models=tuple(args.models),
        probs_dir=args.cache.parent / "probs",
    )
    report["command"] = f"python -m exporters.resamples acsf1 --n {args.n}" + (
        f" --cnn {args.cnn}" if args.cnn else ""
    )
    if args.note:
        report["note"] = args.note
    if args.save is not None:
        args.save.mkdir(parents=True, exist_ok=True)
        (args.save / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.save / "card.md").write_text(markdown(report, "#"))
        into_card(report, args.save.parent)
    print(json.dumps({k: v for k, v in report.items() if k != "published"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
