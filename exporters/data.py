"""Data sets for training: built-in ones and the CSV/Parquet tables ``record`` writes.

Everything is returned as a :class:`DataSet` of numpy arrays in **raw units**
(watts, °C, ppm): normalisation is part of the model, so the arrays here are what
the daemon will feed the exported graph. Layouts are batch-first:

* snapshot ``[N, F]``; window ``[N, L, C]`` (``L >= window``: longer series are
  cropped by the trainer, the last ``window`` samples are evaluated); grid ``[N, H, W]``.

Table formats (CSV or Parquet), with a label column (``label`` by default), optionally
a time column (``ts`` or ``timestamp``: rows are sorted by it) and a group column such
as ``device`` or ``room``:

* what ``edge-infer record`` writes: one row per model input, ``ts, device, pipeline,
  label`` and the features, ``<feature>`` for snapshots and ``<channel>@<i>`` for
  windows (i = 0 is the oldest sample). Rows without a label are skipped.
* one row per reading: one column per feature/channel. Snapshot rows are samples.
  Window samples are cut from each run of consecutive rows with the same group and
  label, ``window`` rows long, every ``stride`` rows; a ``window_id`` column, when
  present, delimits runs instead.
* grid rows hold one frame, its cells in the feature columns in row-major order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from exporters.recipe import DataSpec, Recipe, RecipeError

FloatArray = NDArray[np.float32]
IntArray = NDArray[np.int64]

#: ACSF1 class i, in the order of the data set's header (its labels are "0".."9").
ACSF1_CLASSES = [
    "mobile_phone_charger",
    "coffee_machine",
    "computer_station",
    "fridge_freezer",
    "hifi_system",
    "lamp_cfl",
    "laptop_charger",
    "microwave_oven",
    "printer",
    "television",
]
BASICMOTIONS_CHANNELS = ["acc_x", "acc_y", "acc_z", "gyro_x", "gyro_y", "gyro_z"]


@dataclass
class DataSet:
    """Train/validation/test arrays plus what the manifest needs to describe them."""

    name: str
    task: str
    layout: str
    features: list[str]
    x_train: FloatArray
    y_train: NDArray[Any]
    x_val: FloatArray
    y_val: NDArray[Any]
    x_test: FloatArray
    y_test: NDArray[Any]
    labels: list[str] = field(default_factory=list)
    units: dict[str, str] = field(default_factory=dict)
    window: int | None = None
    sample_period_s: float | None = None
    grid: tuple[int, int] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    #: False when the arrays are not what a device sends the daemon (ACSF1's series are
    #: z-normalised in the file): then no training_stats are written, they would flag every input
    describes_served_inputs: bool = True
    #: True when the training split pools many devices whose own spreads are narrower (roomsim's
    #: 24 rooms: one clean room has a PSI of 1-8 against the pool, docs/drift.md): the
    #: training_stats then say drift is not judged; range and stuck still are
    pooled: bool = False

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.x_train), "val": len(self.x_val), "test": len(self.x_test)}

    def model_input(self, x: FloatArray) -> FloatArray:
        """What the model is fed for evaluation: the last ``window`` samples of each series."""
        if self.layout == "window" and self.window is not None and x.shape[1] > self.window:
            return np.ascontiguousarray(x[:, -self.window :, :])
        return x

    def describe(self) -> dict[str, Any]:
        return {**self.info, "sizes": self.sizes()}


# ---------------------------------------------------------------------------- splitting


def _stratified_split(
    y: NDArray[Any], fraction: float, rng: np.random.Generator, stratify: bool
) -> tuple[IntArray, IntArray]:
    """Indices (keep, held_out) with ``fraction`` held out, per class when ``stratify``."""
    n = len(y)
    if fraction <= 0:
        return np.arange(n), np.zeros(0, dtype=np.int64)
    if not stratify:
        perm = rng.permutation(n)
        k = max(1, round(n * fraction))
        return np.sort(perm[k:]), np.sort(perm[:k])
    held: list[int] = []
    for cls in np.unique(y):
        idx = np.flatnonzero(y == cls)
        idx = idx[rng.permutation(len(idx))]
        k = round(len(idx) * fraction)
        held.extend(idx[:k].tolist())
    held_arr = np.array(sorted(held), dtype=np.int64)
    keep = np.setdiff1d(np.arange(n), held_arr)
    return keep, held_arr


def split_official(
    x_train: FloatArray,
    y_train: NDArray[Any],
    x_test: FloatArray,
    y_test: NDArray[Any],
    spec: DataSpec,
    *,
    seed: int,
    classification: bool,
) -> tuple[FloatArray, NDArray[Any], FloatArray, NDArray[Any], FloatArray, NDArray[Any]]:
    rng = np.random.default_rng(seed)
    keep, val = _stratified_split(y_train, spec.val_fraction, rng, classification)
    return x_train[keep], y_train[keep], x_train[val], y_train[val], x_test, y_test


def split_random(
    x: FloatArray, y: NDArray[Any], spec: DataSpec, seed: int, classification: bool
) -> tuple[FloatArray, NDArray[Any], FloatArray, NDArray[Any], FloatArray, NDArray[Any]]:
    rng = np.random.default_rng(seed)
    rest, test = _stratified_split(y, spec.test_fraction, rng, classification)
    val_share = spec.val_fraction / max(1e-9, 1.0 - spec.test_fraction)
    keep, val = _stratified_split(y[rest], val_share, rng, classification)
    return x[rest][keep], y[rest][keep], x[rest][val], y[rest][val], x[test], y[test]


def split_groups(
    x: FloatArray, y: NDArray[Any], groups: NDArray[Any], spec: DataSpec, seed: int
) -> tuple[FloatArray, NDArray[Any], FloatArray, NDArray[Any], FloatArray, NDArray[Any], dict[str, Any]]:
    """Whole groups (rooms, devices) go to one split, so test groups are never seen in training."""
    rng = np.random.default_rng(seed)
    names = np.unique(groups)
    if len(names) < 3:
        raise RecipeError(f"split 'group' needs at least 3 groups, found {len(names)}")
    names = names[rng.permutation(len(names))]
    n_test = max(1, round(len(names) * spec.test_fraction))
    n_val = max(1, round(len(names) * spec.val_fraction)) if spec.val_fraction > 0 else 0
    test_g, val_g = names[:n_test], names[n_test : n_test + n_val]
    test = np.isin(groups, test_g)
    val = np.isin(groups, val_g)
    train = ~(test | val)
    info = {
        "test_groups": sorted(str(g) for g in test_g),
        "val_groups": sorted(str(g) for g in val_g),
        "train_groups": len(names) - n_test - n_val,
    }
    return x[train], y[train], x[val], y[val], x[test], y[test], info


# ---------------------------------------------------------------------------- built-ins


def _aeon(name: str) -> tuple[FloatArray, NDArray[Any], FloatArray, NDArray[Any], list[str]]:
    try:
        from aeon.datasets import load_classification
    except ImportError as exc:  # pragma: no cover - aeon is in the train extra
        raise RecipeError(f"data set {name} needs aeon: pip install 'edge-infer[train]'") from exc
    x_tr, y_tr, meta = load_classification(name, split="train", return_metadata=True)
    x_te, y_te = load_classification(name, split="test")
    classes = [str(c) for c in meta["class_values"]]
    index = {c: i for i, c in enumerate(classes)}
    # aeon gives [N, C, L]; our window layout is [N, L, C]
    xtr = np.ascontiguousarray(np.transpose(x_tr, (0, 2, 1)), dtype=np.float32)
    xte = np.ascontiguousarray(np.transpose(x_te, (0, 2, 1)), dtype=np.float32)
    ytr = np.array([index[str(v)] for v in y_tr], dtype=np.int64)
    yte = np.array([index[str(v)] for v in y_te], dtype=np.int64)
    return xtr, ytr, xte, yte, classes


def _acsf1(spec: DataSpec, seed: int) -> DataSet:
    xtr, ytr, xte, yte, classes = _aeon("ACSF1")
    if classes != [str(i) for i in range(10)]:
        raise RecipeError(f"unexpected ACSF1 class values {classes}")
    parts = split_official(xtr, ytr, xte, yte, spec, seed=seed, classification=True)
    return DataSet(
        "ACSF1",
        "classification",
        "window",
        ["power"],
        *parts,
        labels=list(ACSF1_CLASSES),
        units={"power": "W"},
        window=spec.window or xtr.shape[1],
        sample_period_s=spec.sample_period_s or 10.0,
        describes_served_inputs=False,
        info={
            "name": "ACSF1",
            "source": "aeon.datasets.load_classification('ACSF1') (UCR/UEA archive)",
            "split": "official train/test; validation carved from train"
            if spec.val_fraction > 0
            else "official train/test",
            "series_length": int(xtr.shape[1]),
            "note": "series are z-normalised one by one in the file; the model z-normalises "
            "each input window itself, so raw watts go in",
        },
    )


def _basicmotions(spec: DataSpec, seed: int) -> DataSet:
    xtr, ytr, xte, yte, classes = _aeon("BasicMotions")
    parts = split_official(xtr, ytr, xte, yte, spec, seed=seed, classification=True)
    return DataSet(
        "BasicMotions",
        "classification",
        "window",
        list(BASICMOTIONS_CHANNELS),
        *parts,
        labels=classes,
        # the data set does not document its units (at rest |acc| is about 0.8, so neither g
        # nor m/s² with gravity): say so rather than guess
        units=dict.fromkeys(BASICMOTIONS_CHANNELS, "undocumented (as the watch reports)"),
        window=spec.window or xtr.shape[1],
        sample_period_s=spec.sample_period_s or 0.1,
        pooled=True,  # four motions by four people: one watch doing one of them is not the mix
        info={
            "name": "BasicMotions",
            "source": "aeon.datasets.load_classification('BasicMotions') (UCR/UEA archive)",
            "split": "official train/test; validation carved from train"
            if spec.val_fraction > 0
            else "official train/test",
            "series_length": int(xtr.shape[1]),
        },
    )


def _synthetic(kind: str, spec: DataSpec, seed: int) -> DataSet:
    """Small generated problems in raw units, for tests and smoke runs."""
    p = spec.params
    n = int(p.get("n", 600))
    rng = np.random.default_rng(int(p.get("seed", 1234)))
    if kind == "snapshot":
        features = ["temperature", "humidity", "illuminance", "co2"]
        units = {"temperature": "°C", "humidity": "%", "illuminance": "lx", "co2": "ppm"}
        y = rng.integers(0, 3, n)
        centre = np.array([[20.0, 40.0, 50.0, 450.0], [22.0, 45.0, 300.0, 800.0], [21.0, 60.0, 20.0, 1200.0]])
        scale = np.array([1.0, 6.0, 60.0, 120.0])
        x = centre[y] + rng.normal(size=(n, 4)) * scale
        labels = ["empty", "present", "asleep"]
        task, layout = "classification", "snapshot"
    elif kind == "regression":
        features = ["voltage", "current", "power_factor"]
        units = {"voltage": "V", "current": "A", "power_factor": ""}
        x = np.stack([rng.normal(230, 3, n), rng.uniform(0.1, 8.0, n), rng.uniform(0.5, 1.0, n)], axis=1)
        y = (x[:, 0] * x[:, 1] * x[:, 2] + rng.normal(0, 5, n)).astype(np.float32)
        labels = []
        task, layout = "regression", "snapshot"
    elif kind == "window":
        t_len = int(p.get("length", spec.window or 32))
        features = ["power", "current"]
        units = {"power": "W", "current": "A"}
        y = rng.integers(0, 3, n)
        t = np.arange(t_len)
        freq = np.array([0.05, 0.2, 0.0])[y][:, None]
        phase = rng.uniform(0, 2 * np.pi, (n, 1))
        base = np.sin(2 * np.pi * freq * t + phase)
        step = (t[None, :] > rng.integers(4, t_len - 4, (n, 1))).astype(float)
        sig = np.where((y == 2)[:, None], step, base) + rng.normal(0, 0.3, (n, t_len))
        power = 120.0 + 80.0 * sig
        x = np.stack([power, power / 230.0 + rng.normal(0, 0.01, (n, t_len))], axis=2)
        labels = ["slow_cycle", "fast_cycle", "switch_on"]
        task, layout = "classification", "window"
    elif kind == "grid":
        h, w = 8, 8
        features = [f"px{i}" for i in range(h * w)]
        units = {"frame": "°C"}
        y = rng.integers(0, 3, n)
        x = 20.0 + rng.normal(0, 0.4, (n, h, w))
        yy, xx = np.mgrid[0:h, 0:w]
        for i in range(n):
            for _ in range(int(y[i])):
                cy, cx = rng.uniform(1, h - 2), rng.uniform(1, w - 2)
                x[i] += 9.0 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 1.5)
        labels = ["empty", "one_person", "two_people"]
        task, layout = "classification", "grid"
    else:
        raise RecipeError(f"unknown built-in data set 'synthetic-{kind}'")
    x = x.astype(np.float32)
    classification = task == "classification"
    y = y.astype(np.int64) if classification else y.astype(np.float32)
    parts = split_random(x, y, spec, seed, classification)
    return DataSet(
        f"synthetic-{kind}",
        task,
        layout,
        [] if layout == "grid" else features,
        *parts,
        labels=labels,
        units=units,
        window=x.shape[1] if layout == "window" else None,
        sample_period_s=1.0 if layout == "window" else None,
        grid=(8, 8) if layout == "grid" else None,
        info={"name": f"synthetic-{kind}", "source": "generated (exporters.data)", "split": "random"},
    )


def _occupancy(spec: DataSpec, seed: int) -> DataSet:
    try:
        from devices import roomsim  # type: ignore[attr-defined,unused-ignore]
    except ImportError as exc:
        raise RecipeError(
            "builtin:occupancy needs the room simulator devices/roomsim.py, which is not present"
        ) from exc
    from exporters.occupancy import occupancy_dataset

    dataset: DataSet = occupancy_dataset(roomsim, spec, seed)
    return dataset


def load_builtin(name: str, spec: DataSpec, seed: int) -> DataSet:
    if name == "acsf1":
        return _acsf1(spec, seed)
    if name == "basicmotions":
        return _basicmotions(spec, seed)
    if name == "occupancy":
        return _occupancy(spec, seed)
    if name.startswith("synthetic-"):
        return _synthetic(name.removeprefix("synthetic-"), spec, seed)
    raise RecipeError(f"unknown built-in data set {name!r}")


# ---------------------------------------------------------------------------- tables


def read_table(path: Path) -> Any:
    import pandas as pd

    if not path.exists():
        raise RecipeError(f"data file {path} does not exist")
    if path.suffix.lower() in (".parquet", ".pq"):
        return pd.read_parquet(path)
    if path.suffix.lower() in (".csv", ".gz", ".txt"):
        return pd.read_csv(path)
    raise RecipeError(f"{path}: expected a .csv or .parquet file")


def _windows_from_table(
    df: Any, spec: DataSpec, label: str, group: str | None
) -> tuple[FloatArray, NDArray[Any], NDArray[Any]]:
    assert spec.window is not None
    t_len, stride = spec.window, spec.stride or spec.window
    time_col = next((c for c in ("ts", "timestamp") if c in df.columns), None)
    if time_col:
        keys = [c for c in (group, time_col) if c]
        df = df.sort_values(keys, kind="stable")
    run_key = df["window_id"] if "window_id" in df.columns else None
    if run_key is None:
        change = df[label].ne(df[label].shift())
        if group:
            change |= df[group].ne(df[group].shift())
        run_key = change.cumsum()
    xs: list[FloatArray] = []
    ys: list[Any] = []
    gs: list[Any] = []
    for _, run in df.groupby(run_key, sort=False):
        values = run[spec.features].to_numpy(dtype=np.float32)
        for start in range(0, len(values) - t_len + 1, stride):
            xs.append(values[start : start + t_len])
            ys.append(run[label].iloc[start + t_len - 1])
            gs.append(run[group].iloc[0] if group else 0)
    if not xs:
        raise RecipeError(f"no run of {t_len} consecutive rows with one label: lower data.window")
    return np.stack(xs), np.array(ys), np.array(gs)


def load_table(recipe: Recipe, override: Path | None = None) -> DataSet:
    spec = recipe.data
    path = override or Path(spec.source)
    df = read_table(path)
    if spec.layout is None:
        raise RecipeError("a table data set needs data.layout (snapshot, window or grid)")
    if not spec.features:
        raise RecipeError("a table data set needs data.features (column names, in order)")
    wide = spec.layout == "window" and all(f"{c}@0" in df.columns for c in spec.features)
    steps = 0
    while wide and all(f"{c}@{steps}" in df.columns for c in spec.features):
        steps += 1
    value_cols = [f"{c}@{i}" for i in range(steps) for c in spec.features] if wide else list(spec.features)
    missing = [c for c in [*value_cols, spec.label] if c not in df.columns]
    if missing:
        raise RecipeError(f"{path}: missing columns {missing[:8]}; has {list(df.columns)[:12]}...")
    group = spec.group
    if group and group not in df.columns:
        raise RecipeError(f"{path}: group column {group!r} not found")
    if spec.split == "column":
        if "split" not in df.columns:
            raise RecipeError(f"{path}: data.split 'column' needs a 'split' column (train/val/test)")
        df = df[df["split"].isin(["train", "val", "test"])]
    df = df.dropna(subset=[*value_cols, spec.label])
    df = df[df[spec.label].astype(str).str.len() > 0]
    window = spec.window
    if wide:  # rows are whole windows, as 'edge-infer record' writes them
        window = min(spec.window or steps, steps)
        x = df[value_cols].to_numpy(dtype=np.float32).reshape(len(df), steps, len(spec.features))
        x = np.ascontiguousarray(x[:, steps - window :, :])
        y_raw = df[spec.label].to_numpy()
        groups = df[group].to_numpy() if group else np.zeros(len(df))
    elif spec.layout == "window":
        if spec.window is None:
            raise RecipeError("layout 'window' needs data.window")
        x, y_raw, groups = _windows_from_table(df, spec, spec.label, group)
    else:
        x = df[spec.features].to_numpy(dtype=np.float32)
        if spec.layout == "grid":
            if spec.grid is None or spec.grid[0] * spec.grid[1] != len(spec.features):
                raise RecipeError("layout 'grid' needs data.grid with height*width == len(features)")
            x = x.reshape(-1, *spec.grid)
        y_raw = df[spec.label].to_numpy()
        groups = df[group].to_numpy() if group else np.zeros(len(df))
    classification = recipe.task == "classification"
    labels: list[str] = []
    if classification:
        labels = recipe.labels or sorted({str(v) for v in y_raw})
        index = {name: i for i, name in enumerate(labels)}
        unknown = sorted({str(v) for v in y_raw} - set(index))
        if unknown:
            raise RecipeError(f"labels {unknown} in the data are not in recipe.labels")
        y: NDArray[Any] = np.array([index[str(v)] for v in y_raw], dtype=np.int64)
    else:
        y = y_raw.astype(np.float32)
    info: dict[str, Any] = {"name": path.stem, "source": str(path), "split": spec.split}
    if spec.split == "column":
        blocks = df["split"].to_numpy()
        if len(blocks) != len(x):
            raise RecipeError("data.split 'column' needs one row per model input (record's wide rows)")
        tr, va, te = (blocks == "train"), (blocks == "val"), (blocks == "test")
        x_tr, y_tr, x_va, y_va, x_te, y_te = x[tr], y[tr], x[va], y[va], x[te], y[te]
    elif spec.split == "group":
        if not group:
            raise RecipeError("split 'group' needs data.group")
        x_tr, y_tr, x_va, y_va, x_te, y_te, extra = split_groups(x, y, groups, spec, recipe.train.seed)
        info.update(extra)
    else:
        x_tr, y_tr, x_va, y_va, x_te, y_te = split_random(x, y, spec, recipe.train.seed, classification)
    return DataSet(
        path.stem,
        recipe.task,
        spec.layout,
        [] if spec.layout == "grid" else list(spec.features),
        x_tr,
        y_tr,
        x_va,
        y_va,
        x_te,
        y_te,
        labels=labels,
        units=dict(spec.units),
        window=window if spec.layout == "window" else None,
        sample_period_s=spec.sample_period_s,
        grid=spec.grid,
        info=info,
    )


def load_dataset(recipe: Recipe, override: Path | None = None) -> DataSet:
    """Load the recipe's data (``override`` replaces a table path)."""
    source = recipe.data.source
    if override is None and source.startswith("builtin:"):
        ds = load_builtin(source.removeprefix("builtin:"), recipe.data, recipe.train.seed)
    else:
        ds = load_table(recipe, override)
    if recipe.labels and ds.task == "classification":
        if len(recipe.labels) != len(ds.labels):
            raise RecipeError(f"recipe.labels has {len(recipe.labels)} names, data has {len(ds.labels)}")
        ds.labels = list(recipe.labels)
    if recipe.data.window is not None and ds.layout == "window":
        longest = ds.x_train.shape[1]
        if recipe.data.window > longest:
            raise RecipeError(f"data.window {recipe.data.window} exceeds the series length {longest}")
        ds.window = recipe.data.window
    if ds.task != recipe.task:
        raise RecipeError(f"recipe task {recipe.task!r} but data set {ds.name} is {ds.task!r}")
    return ds
