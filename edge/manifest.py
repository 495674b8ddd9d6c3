"""The model manifest: what an ONNX file says about itself.

The exporter writes one JSON document into the ONNX file's ``metadata_props``
under the key :data:`MANIFEST_KEY`; the daemon reads it so that a pipeline only
has to say which topics and fields feed the model. This module is the single
definition of that format, shared by ``edge/`` and ``exporters/``; it needs
neither torch nor onnx (reading goes through ONNX Runtime's model metadata).

Tensor layouts (batch axis first, always dynamic):

* ``snapshot``: ``[batch, features]`` - one reading per named feature.
* ``window``: ``[batch, window, channels]`` - the last ``window`` samples of
  each named channel, oldest first.
* ``grid``: ``[batch, height, width]`` - one frame of a sensor array.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edge.drift import FeatureStats

MANIFEST_KEY = "edge_infer.manifest"
SCHEMA_VERSION = 1

Task = Literal["classification", "regression", "anomaly"]
Layout = Literal["snapshot", "window", "grid"]
OutputKind = Literal["probabilities", "logits", "value", "score"]


class ManifestError(ValueError):
    """A manifest that is missing, unreadable or inconsistent with its model."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Strict):
    """How the model's single input tensor is laid out."""

    name: str = Field(description="Name of the ONNX graph input.")
    layout: Layout = Field(description="snapshot, window or grid (see module docstring).")
    features: list[str] = Field(
        default_factory=list,
        description="Feature (snapshot) or channel (window) names in tensor order.",
    )
    window: int | None = Field(default=None, ge=1, description="Samples per window (window layout).")
    sample_period_s: float | None = Field(
        default=None, gt=0, description="Seconds between window samples the model was trained on."
    )
    grid: tuple[int, int] | None = Field(default=None, description="Height and width (grid layout).")
    units: dict[str, str] = Field(default_factory=dict, description="Unit of each feature, e.g. W, °C.")

    @model_validator(mode="after")
    def _layout_fields(self) -> InputSpec:
        if self.layout in ("snapshot", "window") and not self.features:
            raise ValueError(f"layout {self.layout!r} needs a non-empty 'features' list")
        if self.layout == "window" and self.window is None:
            raise ValueError("layout 'window' needs 'window' (samples per window)")
        if self.layout == "grid" and self.grid is None:
            raise ValueError("layout 'grid' needs 'grid' (height, width)")
        return self

    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one batch item; ``window`` may be ``None`` only for non-window layouts."""
        if self.layout == "snapshot":
            return (len(self.features),)
        if self.layout == "window":
            assert self.window is not None  # guaranteed by the validator
            return (self.window, len(self.features))
        assert self.grid is not None
        return self.grid


class OutputSpec(_Strict):
    """How to read the model's output tensor."""

    name: str = Field(description="Name of the ONNX graph output to read.")
    kind: OutputKind = Field(description="probabilities (softmax in graph), logits, value or score.")
    unit: str | None = Field(default=None, description="Unit of a regression value.")


class Normalisation(_Strict):
    """Where input scaling happens. ``in_graph`` means the model takes raw units."""

    kind: Literal["in_graph", "zscore", "none"] = "in_graph"
    mean: list[float] | None = None
    std: list[float] | None = None
    per_window: bool = Field(
        default=False, description="The graph z-normalises each window by its own mean/std."
    )


class Manifest(_Strict):
    """Everything the daemon needs to serve a model, and its provenance."""

    schema_version: int = SCHEMA_VERSION
    name: str
    version: str = "0.0.0"
    task: Task
    description: str = ""
    input: InputSpec
    output: OutputSpec
    labels: list[str] = Field(default_factory=list, description="Class names, output index i = labels[i].")
    threshold: float | None = Field(default=None, description="Anomaly score threshold.")
    normalisation: Normalisation = Field(default_factory=Normalisation)
    metrics: dict[str, Any] = Field(default_factory=dict)
    dataset: dict[str, Any] = Field(default_factory=dict, description="Data set name, split, sizes.")
    created: str | None = Field(default=None, description="ISO 8601 creation time.")
    weights_sha256: str | None = None
    quantization: dict[str, Any] | None = Field(default=None, description="None for fp32 models.")
    provenance: dict[str, Any] = Field(default_factory=dict, description="Tool versions, recipe, seed.")
    training_stats: list[FeatureStats] | None = Field(
        default=None, description="Per feature, in input order: the training split's figures (edge/drift.py)."
    )

    @model_validator(mode="after")
    def _task_fields(self) -> Manifest:
        if self.training_stats is not None:
            names = [s.name for s in self.training_stats]
            if self.input.layout == "grid" or names != self.input.features:
                raise ValueError(
                    f"training_stats names {names} must be the input features {self.input.features}, in order"
                )
        if self.task == "classification" and not self.labels:
            raise ValueError("a classification manifest needs 'labels'")
        if self.schema_version > SCHEMA_VERSION:
            raise ValueError(
                f"schema_version {self.schema_version} is newer than this edge-infer "
                f"understands ({SCHEMA_VERSION}); upgrade edge-infer"
            )
        return self

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", exclude_none=True), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "manifest") -> Manifest:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ManifestError(source, f"manifest is not valid JSON: {exc}") from exc
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "(root)"
            raise ManifestError(source, f"manifest key {where!r}: {first['msg']}") from exc


def read_manifest(path: str | Path) -> Manifest | None:
    """Read the manifest of an ONNX file through ONNX Runtime; ``None`` if it has none."""
    import onnxruntime as ort

    path = Path(path)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ManifestError(str(path), f"cannot load model: {exc}") from exc
    return manifest_from_metadata(session.get_modelmeta().custom_metadata_map, str(path))


def manifest_from_metadata(metadata: dict[str, str], source: str) -> Manifest | None:
    text = metadata.get(MANIFEST_KEY)
    if text is None:
        return None
    return Manifest.from_json(text, source)
