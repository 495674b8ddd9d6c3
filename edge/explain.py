"""Why this prediction: occlusion attributions per answer (``output.explain``, docs/configuration.md).

Occlusion replaces one part of the input by a baseline and runs the model again: how much the
predicted class's probability drops (classification) or the value / score changes (regression,
anomaly) is that part's attribution. A snapshot model gets one occluded row per feature; a window
model one per channel (the whole channel over the window) and one per time segment (every channel
over that stretch of the window). All occluded rows of the answers of one batch go to ONNX Runtime
together, in the model's worker thread (:meth:`edge.runtime.LoadedModel.call`), never on the event
loop; at most ``max_rows`` rows per answer, checked when the pipeline is built.

Published as the answer's ``explain`` field::

    {"method": "occlusion", "target": "kettle", "baseline": "window_mean", "rows": 9,
     "channels": {"power": {"share": 1.0, "delta": 0.41}},
     "segments": [{"start": 0, "end": 183, "share": 0.02, "delta": 0.01}, ...]}

(a snapshot model has ``features`` in place of ``channels`` and ``segments``). ``delta`` is the
raw change, positive when the part supported the answer (the probability or value fell without
it); ``share`` is ``|delta|`` over the sum of ``|delta|`` of its group (features, channels or
segments), so the shares of a group add up to 1 (all 0 when nothing changed). Deterministic: no
sampling, the same input gives the same attribution. Pure numpy, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from edge.config import ExplainConfig
from edge.runtime import ModelSpec

Run = Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float32]]


class ExplainError(ValueError):
    """An explain configuration that does not fit the model; ``key`` is the config key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


def _softmax(logits: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    result: npt.NDArray[np.float32] = exp / exp.sum(axis=-1, keepdims=True)
    return result


def segment_bounds(window: int, segments: int) -> list[tuple[int, int]]:
    """``segments`` contiguous [start, end) stretches covering ``window`` samples, sizes differing
    by at most one (fewer when the window is shorter than ``segments``)."""
    count = max(1, min(segments, window))
    edges = [round(i * window / count) for i in range(count + 1)]
    return [(edges[i], edges[i + 1]) for i in range(count)]


@dataclass(frozen=True)
class ExplainPlan:
    """How one model's answers are occluded: the parts, the baseline, the rows per answer."""

    spec: ModelSpec
    config: ExplainConfig
    baseline: str  # manifest_mean | window_mean | zero (what "auto" resolved to)
    mean: npt.NDArray[np.float32] | None  # per feature / channel, for manifest_mean
    segments: tuple[tuple[int, int], ...]  # window models: [start, end) of each time segment

    @property
    def rows(self) -> int:
        """Occluded rows (extra inference rows) per explained answer."""
        if self.spec.layout == "snapshot":
            return self.spec.sample_shape[0]
        return self.spec.sample_shape[1] + len(self.segments)

    def occlude(self, vector: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """The occluded copies of one input, ``[rows, *sample_shape]``, in the order of the parts."""
        rows = np.repeat(vector[None].astype(np.float32, copy=False), self.rows, axis=0)
        if self.spec.layout == "snapshot":
            fill = self.mean if self.mean is not None else np.zeros(vector.shape[0], dtype=np.float32)
            idx = np.arange(vector.shape[0])
            rows[idx, idx] = fill
            return rows
        channels = vector.shape[1]
        if self.mean is not None:
            fill = self.mean
        elif self.baseline == "window_mean":
            fill = vector.mean(axis=0, dtype=np.float64).astype(np.float32)
        else:
            fill = np.zeros(channels, dtype=np.float32)
        for c in range(channels):
            rows[c, :, c] = fill[c]
        for s, (start, end) in enumerate(self.segments):
            rows[channels + s, start:end, :] = fill
        return rows

    def target(self, raw: npt.NDArray[np.float32]) -> tuple[int, str]:
        """The output column explained for one answer's raw output row and its name."""
        spec = self.spec
        if spec.task == "classification":
            width = len(spec.labels)
            best = int(np.argmax(raw[:width])) if np.isfinite(raw[:width]).all() else 0
            return best, spec.labels[best]
        return 0, "value" if spec.task == "regression" else "score"

    def scores(self, raw: npt.NDArray[np.float32], column: int) -> npt.NDArray[np.float64]:
        """The explained quantity of ``column`` for output rows ``raw`` ``[n, width]``."""
        spec = self.spec
        if spec.task == "classification":
            width = len(spec.labels)
            probs = raw[:, :width] if spec.output_kind == "probabilities" else _softmax(raw[:, :width])
            return np.asarray(probs[:, column], dtype=np.float64)
        return np.asarray(raw[:, column], dtype=np.float64)

    def attribution(self, base: npt.NDArray[np.float32], occluded: npt.NDArray[np.float32]) -> dict[str, Any]:
        """The ``explain`` field of one answer from its output row and its occluded rows' outputs."""
        column, name = self.target(base)
        reference = float(self.scores(base[None], column)[0])
        deltas = (reference - self.scores(occluded, column)).tolist()
        body: dict[str, Any] = {
            "method": "occlusion",
            "target": name,
            "baseline": self.baseline,
            "rows": self.rows,
        }
        features = self.spec.features
        if self.spec.layout == "snapshot":
            body["features"] = dict(zip(features, _parts(deltas), strict=True))
            return body
        channels = self.spec.sample_shape[1]
        body["channels"] = dict(zip(features, _parts(deltas[:channels]), strict=True))
        body["segments"] = [
            {"start": start, "end": end, **part}
            for (start, end), part in zip(self.segments, _parts(deltas[channels:]), strict=True)
        ]
        return body


def _parts(deltas: list[float]) -> list[dict[str, float | None]]:
    """``share`` (|delta| over the group's sum, 4 decimals) and ``delta`` (6 decimals) per part;
    a delta that is not finite is null and counts for nothing in the shares."""
    sizes = [abs(d) if math.isfinite(d) else 0.0 for d in deltas]
    total = sum(sizes)
    return [
        {
            "share": round(size / total, 4) if total > 0 else 0.0,
            "delta": round(d, 6) if math.isfinite(d) else None,
        }
        for d, size in zip(deltas, sizes, strict=True)
    ]


def plan(spec: ModelSpec, config: ExplainConfig, key: str) -> ExplainPlan:
    """The occlusion plan of ``spec`` under ``config``; :class:`ExplainError` (naming ``key``, the
    pipeline's ``output.explain``) when it does not fit the model."""
    if spec.layout not in ("snapshot", "window"):
        raise ExplainError(
            key, f"model {spec.name!r} takes a {spec.layout} input; explain needs snapshot or window"
        )
    width = spec.sample_shape[-1]
    manifest_mean = None
    norm = spec.manifest.normalisation if spec.manifest is not None else None
    if norm is not None and norm.mean is not None and len(norm.mean) == width and norm.kind != "zscore":
        manifest_mean = np.asarray(norm.mean, dtype=np.float32)
    baseline = config.baseline
    if baseline == "auto":
        if manifest_mean is not None:
            baseline = "manifest_mean"
        else:
            baseline = "window_mean" if spec.layout == "window" else "zero"
    if baseline == "manifest_mean" and manifest_mean is None:
        raise ExplainError(
            f"{key}.baseline",
            f"model {spec.name!r} has no normalisation mean (in raw units) in its manifest; "
            "use auto, window_mean or zero",
        )
    if baseline == "window_mean" and spec.layout != "window":
        raise ExplainError(
            f"{key}.baseline", "window_mean needs a window model; use auto, manifest_mean or zero"
        )
    segments = tuple(segment_bounds(spec.sample_shape[0], config.segments)) if spec.layout == "window" else ()
    result = ExplainPlan(
        spec, config, baseline, manifest_mean if baseline == "manifest_mean" else None, segments
    )
    if result.rows > config.max_rows:
        parts = (
            f"{width} features"
            if spec.layout == "snapshot"
            else f"{width} channels + {len(segments)} segments"
        )
        raise ExplainError(
            f"{key}.max_rows",
            f"model {spec.name!r} needs {result.rows} occluded rows per answer ({parts}), "
            f"more than max_rows {config.max_rows}",
        )
    return result


def explain_batch(
    run: Run,
    jobs: list[tuple[ExplainPlan, npt.NDArray[np.float32], npt.NDArray[np.float32]]],
    chunk: int,
) -> list[dict[str, Any]]:
    """The attributions of several answers, each ``(plan, input vector, output row)``: their
    occluded rows stacked and run through ``run`` (the model's ``run_sync``) in calls of at most
    ``chunk`` rows (the batcher's cap), one answer's rows split over calls where they are more:
    ONNX Runtime's activations grow with the rows of a call (the appliance CNN: ~0.8 MB a row),
    and they set the daemon's peak RSS (docs/performance.md, Memory). Runs in the model's
    worker thread."""
    blocks = [p.occlude(vector) for p, vector, _ in jobs]
    stacked = np.ascontiguousarray(np.concatenate(blocks, axis=0))
    size = max(1, chunk)
    outputs = np.concatenate([run(stacked[i : i + size]) for i in range(0, len(stacked), size)], axis=0)
    results: list[dict[str, Any]] = []
    at = 0
    for (p, _, base), block in zip(jobs, blocks, strict=True):
        results.append(p.attribution(base, outputs[at : at + len(block)]))
        at += len(block)
    return results
