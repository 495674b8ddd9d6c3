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

UNKNOWN_LABEL = "unknown"
"""The label of a classification whose OOD score is above the model's threshold (open set)."""


def softmax(logits: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    result: npt.NDArray[np.float32] = exp / exp.sum(axis=-1, keepdims=True)
    return result


_SECONDS: dict[int, str] = {}  # epoch second -> ISO 8601 up to the seconds, for iso_ms


def _finite(value: float, digits: int) -> float | None:
    """``value`` rounded, or ``None`` (JSON null) when it is NaN or infinite."""
    return round(value, digits) if math.isfinite(value) else None


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


_P4_TEXTS: list[str | None] = [None] * 10_001  # repr(k / 10000), filled as values occur


def _p4_text(k: int) -> str:
    text = _P4_TEXTS[k]
    if text is None:
        text = _P4_TEXTS[k] = repr(k / 10000)
    return text


def _ten_thousandths(values: npt.NDArray[Any]) -> list[list[int] | None] | None:
    """Per row, ``round(v, 4)`` of each value as an integer count of ten-thousandths, or None for a
    row with a value outside [0, 1] or not finite; None when ``values`` is not float32.

    Exact: a float32 times 10,000 fits a float64 without rounding (24 + 14 bits), ``rint`` rounds
    half to even as ``round`` does on the exact value, and ``k / 10000`` is the double nearest
    to k/10^4, which is what ``round(v, 4)`` returns. Tested against ``round`` itself.
    """
    if values.dtype != np.float32:
        return None
    scaled = np.rint(values.astype(np.float64) * 10000.0)
    good: npt.NDArray[np.bool_] = np.asarray(
        ((scaled >= 0.0) & (scaled <= 10000.0)).all(axis=1)
    )  # NaN: False
    ks = np.where(good[:, None], scaled, 0.0).astype(np.int64).tolist()
    flags: list[bool] = good.tolist()
    return [k if ok else None for k, ok in zip(ks, flags, strict=True)]


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


def add_explain(prediction: Prediction, explain: dict[str, Any]) -> None:
    """Give an answer its ``explain`` field (edge/explain.py), after the other fields, as
    ``json.dumps`` of the whole answer would place it."""
    prediction.fields["explain"] = explain
    if prediction.head is not None:
        prediction.head += ', "explain": ' + json.dumps(explain, allow_nan=False)


class PostProcessor:
    """Turns a batch of raw model outputs into per-item result dicts."""

    def __init__(self, spec: ModelSpec, output: OutputConfig) -> None:
        self.spec = spec
        self.output = output
        self.labels = list(spec.labels)
        self._label_heads = ['{"label": ' + json.dumps(label) + ', "confidence": ' for label in self.labels]
        self._alternatives = ['{"label": ' + json.dumps(label) + ', "p": ' for label in self.labels]
        self._tail = (
            f', "model": {json.dumps(spec.name)}, "model_version": {json.dumps(spec.version)}, "latency_ms": '
        )
        self._instances: dict[str, str] = {}
        # open set: the model's OOD score is the last output column (edge.runtime); getattr keeps
        # spec-like stand-ins without the field (benchmarks, tests) working as before
        self.ood_threshold: float | None = getattr(spec, "ood_threshold", None)
        self.open_set = getattr(spec, "ood_output", None) is not None

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
                "latency_ms": latency if latency - latency == 0.0 else None,
                "ts": iso_ms(ts),
            }
            if instance is not None:
                body["instance"] = instance
            return json.dumps(body, allow_nan=False).encode()
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
            if self.open_set:
                return self._open_set(self._classify(raw[:, :-1]), raw[:, -1].tolist())
            return self._classify(raw)
        if task == "anomaly":
            return self._anomaly(raw)
        return self._regress(raw)

    def _classify(self, raw: npt.NDArray[np.float32]) -> list[Prediction]:
        probs = raw if self.spec.output_kind == "probabilities" else softmax(raw)
        top = np.argsort(-probs, axis=1)[:, : max(1, self.output.top_k)]
        # Whole-batch numpy, then plain Python ints and floats: no numpy scalar per row.
        orders = top.tolist()
        picked = np.take_along_axis(probs, top, axis=1)
        confidences = picked[:, 0].tolist()
        tenths = _ten_thousandths(picked)
        labels = self.labels
        heads = self._label_heads
        alternatives = self._alternatives
        minimum = self.output.min_confidence
        top_k = self.output.top_k
        values = picked.tolist()
        results: list[Prediction] = []
        for n, (order, raw_confidence) in enumerate(zip(orders, confidences, strict=True)):
            best = order[0]
            sure = raw_confidence >= minimum
            label = labels[best] if sure else None
            ks = tenths[n] if tenths is not None else None
            if ks is not None:  # every rounded value and its JSON text from the table
                confidence = ks[0] / 10000
                head = (heads[best] if sure else '{"label": null, "confidence": ') + _p4_text(ks[0])
                fields: dict[str, Any] = {"label": label, "confidence": confidence}
                if top_k:
                    fields["top_k"] = [
                        {"label": labels[i], "p": k / 10000} for i, k in zip(order, ks, strict=True)
                    ]
                    head += (
                        ', "top_k": ['
                        + "}, ".join([alternatives[i] + _p4_text(k) for i, k in zip(order, ks, strict=True)])
                        + "}]"
                    )
                results.append(Prediction(fields, label, None, head))
                continue
            # Not finite or not in [0, 1]: as json.dumps of the fields, a value that is not finite
            # as null (JSON has no NaN or Infinity; answers are always strict JSON).
            fields = {"label": label, "confidence": _finite(raw_confidence, 4)}
            if top_k:
                fields["top_k"] = [
                    {"label": labels[i], "p": _finite(p, 4)} for i, p in zip(order, values[n], strict=True)
                ]
            results.append(Prediction(fields, label, None, None))
        return results

    def _open_set(self, predictions: list[Prediction], scores: list[float]) -> list[Prediction]:
        """Each answer gains ``ood_score``; above the model's OOD threshold its label is ``unknown``
        (confidence and ``top_k`` stay those of the closest known classes)."""
        threshold = self.ood_threshold
        for prediction, raw_score in zip(predictions, scores, strict=True):
            score = _finite(raw_score, 4)
            if threshold is not None and score is not None and raw_score > threshold:
                prediction.fields["label"] = prediction.key = UNKNOWN_LABEL
                if prediction.head is not None:  # '{"label": X, "confidence": ...' -> "unknown"
                    rest = prediction.head[prediction.head.index(', "confidence": ') :]
                    prediction.head = '{"label": "' + UNKNOWN_LABEL + '"' + rest
            prediction.fields["ood_score"] = score
            if prediction.head is not None:
                prediction.head += ', "ood_score": ' + json.dumps(score)
        return predictions

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
                "score": _finite(score, 6),
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
