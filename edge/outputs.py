"""Post-processing by task, the answer's JSON and the publish policy. Pure numpy and plain Python, no I/O."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import numpy.typing as npt

from edge.config import OutputConfig
from edge.runtime import ModelSpec


def softmax(logits: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    result: npt.NDArray[np.float32] = exp / exp.sum(axis=-1, keepdims=True)
    return result


_SECONDS: dict[int, str] = {}  # epoch second -> ISO 8601 up to the seconds, for iso_ms


def iso_ms(ts: float) -> str:
    """``2026-11-30T07:19:34.123Z``: the same text as
    ``datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")`` with ``Z``, built
    from a per-second cache (the microseconds rounded half to even, as datetime does)."""
    if not 0.0 <= ts < 253402300799.0:  # outside year 1..9999 from 1970 on: let datetime say
        return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    second = math.floor(ts)
    micros = round((ts - second) * 1e6)
    if micros >= 1_000_000:
        second += 1
        micros -= 1_000_000
    prefix = _SECONDS.get(second)
    if prefix is None:
        if len(_SECONDS) > 4096:
            _SECONDS.clear()
        prefix = _SECONDS[second] = datetime.fromtimestamp(second, UTC).isoformat(timespec="seconds")[:19]
    return f"{prefix}.{micros // 1000:03d}Z"


@dataclass(slots=True)
class Prediction:
    """One device's post-processed result; ``key`` is what 'changed' compares.

    ``head`` is ``fields`` as JSON without the closing brace (what :meth:`PostProcessor.answer`
    continues), built with the batch; ``None`` when ``fields`` must go through ``json.dumps``.
    """

    fields: dict[str, Any]
    key: Any
    numeric: float | None = None
    head: str | None = None


class PostProcessor:
    """Turns a batch of raw model outputs into per-item result dicts."""

    def __init__(self, spec: ModelSpec, output: OutputConfig) -> None:
        self.spec = spec
        self.output = output
        self.labels = list(spec.labels)
        self._label_heads = ['{"label": ' + json.dumps(label) + ', "confidence": ' for label in self.labels]
        self._tail = (
            f', "model": {json.dumps(spec.name)}, "model_version": {json.dumps(spec.version)}, "latency_ms": '
        )
        self._instances: dict[str, str] = {}

    def answer(
        self, prediction: Prediction, latency_ms: float, ts: float, instance: str | None = None
    ) -> bytes:
        """The published JSON of one prediction: byte for byte ``json.dumps`` of
        ``{**fields, "model", "model_version", "latency_ms" (ms, 3 decimals), "ts" (ISO 8601, ms)}``
        (and ``"instance"`` in a cluster), built from the batch's prepared pieces."""
        latency = round(latency_ms, 3)
        head = prediction.head
        if head is None or latency - latency != 0.0:
            body = {
                **prediction.fields,
                "model": self.spec.name,
                "model_version": self.spec.version,
                "latency_ms": latency,
                "ts": iso_ms(ts),
            }
            if instance is not None:
                body["instance"] = instance
            return json.dumps(body).encode()
        if instance is None:
            end = '"}'
        else:
            end = self._instances.get(instance) or self._instances.setdefault(
                instance, '", "instance": ' + json.dumps(instance) + "}"
            )
        return (head + self._tail + repr(latency) + ', "ts": "' + iso_ms(ts) + end).encode()

    def __call__(self, raw: npt.NDArray[np.float32]) -> list[Prediction]:
        task = self.spec.task
        if task == "classification":
            return self._classify(raw)
        if task == "anomaly":
            return self._anomaly(raw)
        return self._regress(raw)

    def _classify(self, raw: npt.NDArray[np.float32]) -> list[Prediction]:
        probs = raw if self.spec.output_kind == "probabilities" else softmax(raw)
        top = np.argsort(-probs, axis=1)[:, : max(1, self.output.top_k)]
        # Whole-batch numpy, then plain Python floats: no numpy scalar per row.
        best_of = top[:, 0].tolist()
        confidences = np.take_along_axis(probs, top[:, :1], axis=1)[:, 0].tolist()
        labels = self.labels
        heads = self._label_heads
        minimum = self.output.min_confidence
        top_k = self.output.top_k
        rows = probs.tolist() if top_k else None
        results: list[Prediction] = []
        for n, (best, raw_confidence) in enumerate(zip(best_of, confidences, strict=True)):
            confidence = round(raw_confidence, 4)
            sure = raw_confidence >= minimum
            label = labels[best] if sure else None
            fields: dict[str, Any] = {"label": label, "confidence": confidence}
            head = None
            if rows is not None:
                row = rows[n]
                fields["top_k"] = [{"label": labels[i], "p": round(row[i], 4)} for i in top[n].tolist()]
            elif confidence - confidence == 0.0:  # finite: json.dumps writes repr()
                head = (heads[best] if sure else '{"label": null, "confidence": ') + repr(confidence)
            results.append(Prediction(fields, label, None, head))
        return results

    def _regress(self, raw: npt.NDArray[np.float32]) -> list[Prediction]:
        results = []
        for row in raw:
            value = float(row[0])
            fields: dict[str, Any] = {"value": round(value, 6) if math.isfinite(value) else None}
            if self.spec.unit:
                fields["unit"] = self.spec.unit
            results.append(Prediction(fields, fields["value"], value))
        return results

    def _anomaly(self, raw: npt.NDArray[np.float32]) -> list[Prediction]:
        threshold = self.spec.threshold
        results = []
        for row in raw:
            score = float(row[0])
            anomaly = bool(threshold is not None and score >= threshold)
            fields = {
                "label": None if threshold is None else ("anomaly" if anomaly else "normal"),
                "score": round(score, 6),
                "threshold": threshold,
                "anomaly": anomaly,
            }
            results.append(Prediction(fields, anomaly, score))
        return results


@dataclass(slots=True)
class _DeviceOutputState:
    published_key: Any = None
    published_numeric: float | None = None
    published_at: float = -math.inf
    candidate_key: Any = None
    candidate_count: int = 0
    has_published: bool = False


@dataclass
class PublishPolicy:
    """Decides per device whether a prediction is published: on change, debounce, rate, heartbeat."""

    config: OutputConfig
    states: dict[str, _DeviceOutputState] = field(default_factory=dict)

    def should_publish(self, device: str, prediction: Prediction, now: float) -> bool:
        cfg = self.config
        state = self.states.get(device)
        if state is None:
            state = self.states[device] = _DeviceOutputState()
        # Debounce: a new key must be seen `debounce` times in a row before it counts.
        if cfg.debounce > 1 and state.has_published and prediction.key != state.published_key:
            if prediction.key == state.candidate_key:
                state.candidate_count += 1
            else:
                state.candidate_key = prediction.key
                state.candidate_count = 1
            if state.candidate_count < cfg.debounce:
                return False
        state.candidate_key = None
        state.candidate_count = 0
        if now - state.published_at < cfg.min_interval_s:
            return False
        if cfg.publish == "on_change" and state.has_published and not self._changed(state, prediction):
            return self._heartbeat(state, now)
        state.published_key = prediction.key
        state.published_numeric = prediction.numeric
        state.published_at = now
        state.has_published = True
        return True

    def _changed(self, state: _DeviceOutputState, prediction: Prediction) -> bool:
        if (
            prediction.numeric is not None
            and state.published_numeric is not None
            and self.config.change_delta
        ):
            return abs(prediction.numeric - state.published_numeric) >= self.config.change_delta
        return bool(prediction.key != state.published_key)

    def _heartbeat(self, state: _DeviceOutputState, now: float) -> bool:
        beat = self.config.heartbeat_s
        if beat is not None and now - state.published_at >= beat:
            state.published_at = now
            return True
        return False

    def forget(self, device: str) -> None:
        self.states.pop(device, None)
