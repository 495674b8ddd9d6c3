"""Recipes: everything needed to rebuild a model, as YAML or CLI options.

A recipe is validated with pydantic (like the manifest) and embedded verbatim in
the exported model's manifest (``provenance.recipe``), so ``quantize`` and
``verify`` can reload the same data and split from the ONNX file alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Family = Literal["mlp", "cnn1d", "cnn2d", "lstm", "gru"]
#: the normalisations that z-score each window by its own statistics (the manifest's per_window)
PER_WINDOW_KINDS = ("per_window", "per_window_level")
Layout = Literal["snapshot", "window", "grid"]
Task = Literal["classification", "regression"]


class RecipeError(ValueError):
    """A recipe that cannot be read or is inconsistent."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataSpec(_Strict):
    """Where the data comes from and how it is shaped."""

    source: str = Field(
        description="'builtin:NAME' (acsf1, basicmotions, occupancy, synthetic-snapshot, "
        "synthetic-window, synthetic-grid, synthetic-regression) or a CSV/Parquet path."
    )
    params: dict[str, Any] = Field(default_factory=dict, description="Options of a built-in data set.")
    layout: Layout | None = Field(default=None, description="Required for table files.")
    features: list[str] = Field(default_factory=list, description="Feature/channel columns, in order.")
    label: str = Field(default="label", description="Target column of a table file.")
    units: dict[str, str] = Field(default_factory=dict)
    window: int | None = Field(default=None, ge=1, description="Samples per window the model takes.")
    stride: int | None = Field(default=None, ge=1, description="Step between windows cut from a table.")
    sample_period_s: float | None = Field(default=None, gt=0)
    grid: tuple[int, int] | None = None
    group: str | None = Field(
        default=None, description="Column that groups rows (device, room): windows never span groups."
    )
    split: Literal["official", "random", "group", "column"] = Field(
        default="random",
        description="official: the data set's own train/test split. column: a table's 'split' column "
        "says train/val/test per row (edge-infer learn's time blocks); other rows are left out.",
    )
    val_fraction: float = Field(default=0.2, ge=0.0, lt=1.0)
    test_fraction: float = Field(default=0.2, ge=0.0, lt=1.0)


class TemplateSpec(_Strict):
    """Which network template and its size (the recipe's `model:`; not edge.runtime.ModelSpec, what
    the daemon knows of a served model)."""

    family: Family
    hidden: list[int] = Field(default_factory=lambda: [64, 64])
    kernel_sizes: list[int] = Field(default_factory=lambda: [7, 5, 3])
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    normalisation: Literal["zscore", "per_window", "per_window_level", "none"] = Field(
        default="zscore",
        description="zscore: per-feature mean/std of the training set; per_window: each window "
        "z-normalised by its own statistics; per_window_level: the same plus, per channel, the "
        "window's log level (log of its std, z-scored with training-set statistics) as a second "
        "channel, for data whose amplitude tells classes apart (a heater from a bulb). All live "
        "inside the exported graph.",
    )
    rocket_features: int = Field(
        default=0,
        ge=0,
        le=50_000,
        description="0: none. N > 0 (classifiers over windows, cnn1d/lstm/gru): a MiniRocket-style "
        "branch of about N fixed-convolution PPV features (exporters/rocket.py) beside the network, "
        "fitted on the training windows after the network trained; the model answers the mean of "
        "the two probabilities. In the graph: convolutions, comparisons and means.",
    )
    rocket_l2: float = Field(
        default=0.05, gt=0, description="L2 penalty of the rocket branch's linear head (mean cross-entropy)."
    )


class TrainSpec(_Strict):
    """Optimisation settings."""

    epochs: int = Field(default=50, ge=1)
    batch_size: int = Field(default=32, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    patience: int = Field(default=10, ge=1, description="Early stopping on validation loss.")
    seed: int = 0
    class_weights: bool = Field(default=True, description="Inverse-frequency weights in the loss.")
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=1.0)
    random_crop: bool = Field(
        default=False, description="Train on random crops of 'window' samples from longer series."
    )
    crop_length: int | None = Field(
        default=None,
        ge=2,
        description="With random_crop: length of the training crops (default: data.window). Models "
        "with a dynamic time axis may train on shorter crops than the window they serve.",
    )
    noise: float = Field(default=0.0, ge=0.0, description="Gaussian noise (in normalised units).")
    threads: int = Field(default=1, ge=1, description="torch threads (1 keeps runs bit-reproducible).")


class QuantizeSpec(_Strict):
    """How ``quantize`` treats this model."""

    mode: Literal["auto", "static", "dynamic"] = Field(
        default="auto",
        description="auto = static: calibrated QDQ, a row's answer independent of its batch mates. "
        "dynamic: activation scales per batch (answers move with batch mates).",
    )
    per_channel: bool = True
    reduce_range: bool = Field(
        default=True,
        description="7-bit weights: u8 x s8 products cannot saturate the 16-bit pair sums of "
        "x86 AVX2 kernels without VNNI, so results match ARM and VNNI exactly.",
    )
    calibration_samples: int = Field(default=256, ge=1)
    keep_first_layer_float: bool = Field(
        default=False,
        description="Leave the first Conv/MatMul in float: it sees the normalised input, whose dynamic "
        "range (rare spikes next to subtle idle levels) 8 bits may not resolve. It is usually tiny.",
    )
    calibration_method: Literal["minmax", "percentile", "entropy"] = "minmax"
    budget_points: float = Field(
        default=1.0,
        description="Max accuracy loss of int8 vs fp32 in points (regression: percent of the fp32 MAE). "
        "A negative budget demands that int8 beat fp32.",
    )


class CalibrationSpec(_Strict):
    """How ``export`` calibrates a classifier's probabilities (exporters/calibrate.py)."""

    method: Literal["temperature", "none"] = Field(
        default="temperature",
        description="temperature: one scalar fitted on held-out data, folded into the graph. none: "
        "the zoo still fits and reports it, without applying it.",
    )
    note: str = Field(default="", description="Why, when method is none; written into the model card.")
    folds: int = Field(
        default=5,
        ge=2,
        description="Without a validation split: folds of the cross-fit whose out-of-fold outputs "
        "the temperature is fitted on (the number of training series = leave-one-out).",
    )
    held_out: Literal["crossfit", "resamples"] = Field(
        default="crossfit",
        description="Without a validation split (zoo only): crossfit = out-of-fold outputs of the "
        "cross-fit; resamples = outputs of this recipe's models trained on stratified resamples of "
        "train + test (python -m exporters.resamples, as many training series as the served model) on "
        "the official training series they did not train on (never an official test series).",
    )


class Recipe(_Strict):
    """A complete, reproducible description of one model."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    version: str = "0.1.0"
    description: str = ""
    task: Task = "classification"
    labels: list[str] = Field(default_factory=list, description="Overrides the data set's class names.")
    output_unit: str | None = None
    data: DataSpec
    model: TemplateSpec
    train: TrainSpec = Field(default_factory=TrainSpec)
    quantize: QuantizeSpec = Field(default_factory=QuantizeSpec)
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    baseline: Literal["none", "minirocket"] = "none"
    limitations: str = Field(default="", description="Written into the model card.")

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        if self.train.random_crop and self.data.window is None:
            raise ValueError("train.random_crop needs data.window")
        if self.model.rocket_features and (
            self.task != "classification" or self.model.family not in ("cnn1d", "lstm", "gru")
        ):
            raise ValueError(
                "model.rocket_features needs a classifier over windows (family cnn1d, lstm or gru), "
                f"not a {self.task} {self.model.family}"
            )
        return self


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise RecipeError(f"{path}: cannot read recipe: {exc}") from exc
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping")
    return recipe_from_dict(raw, str(path))


def recipe_from_dict(raw: dict[str, Any], source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(root)"
        raise RecipeError(f"{source}: recipe key {where!r}: {first['msg']}") from exc


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
