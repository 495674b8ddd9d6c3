"""Post-processing by task and the publish policy. Pure numpy and plain Python, no I/O."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
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


@dataclass(slots=True)
class Prediction:
    """One device's post-processed result; ``key`` is what 'changed' compares."""

    fields: dict[str, Any]
    key: Any
    numeric: float | None = None


class PostProcessor:
    """Turns a batch of raw model outputs into per-item result dicts."""

    def __init__(self, spec: ModelSpec, output: OutputConfig) -> None:
        self.spec = spec
        self.output = output
        self.labels = list(spec.labels)

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
        results: list[Prediction] = []
        for row, order in zip(probs, top, strict=True):
            best = int(order[0])
            confidence = float(row[best])
            label = self.labels[best] if confidence >= self.output.min_confidence else None
            fields: dict[str, Any] = {"label": label, "confidence": round(confidence, 4)}
            if self.output.top_k:
                fields["top_k"] = [
                    {"label": self.labels[int(i)], "p": round(float(row[int(i)]), 4)} for i in order
                ]
            results.append(Prediction(fields, label))
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
