"""Correction and retrain commands on the daemon's own command topics, validated.

Topic layout (``<base>`` is ``mqtt.base_topic``; names are single topic levels):

* ``<base>/<pipeline>/<device>/correct/set`` - payload: one of the model's
  labels or ``none of these`` (what an HA MQTT ``select`` sends).
* ``<base>/<pipeline>/<device>/false_alarm/press`` and
  ``<base>/<pipeline>/<device>/missed/press`` - payload ``PRESS`` (HA MQTT
  ``button``), for anomaly and binary outputs only.
* ``<base>/<pipeline>/retrain/press`` - payload ``PRESS``.

Subscription filters: :func:`command_filters`. Every message is checked like
any input, in this order, and a refusal names its reason (counted per reason
in :attr:`CommandValidator.refused`): ``too_large`` (before anything is
decoded), ``not_utf8``, ``bad_topic``, ``unknown_pipeline``, ``rate_limited``
(a token bucket per pipeline, checked before the device and label so a flood
costs a dictionary lookup each), ``unknown_device``, ``not_supported`` (a
button the pipeline's output kind has no use for), ``unknown_label``,
``bad_payload``.

Pure logic, no I/O: the daemon's message handler calls :meth:`CommandValidator.check`
and hands an accepted :class:`Command` to the label store in a worker thread.
:func:`select_discovery` and :func:`button_discovery` return the HA discovery
component configs (dicts) for the Home Assistant module to publish.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Literal

from edge.labelstore import NONE_OF_THESE

Action = Literal["correct", "false_alarm", "missed", "retrain"]
PRESS = "PRESS"
MAX_PAYLOAD = 256
REASONS = (
    "too_large",
    "not_utf8",
    "bad_topic",
    "unknown_pipeline",
    "rate_limited",
    "unknown_device",
    "not_supported",
    "unknown_label",
    "bad_payload",
)


@dataclass(frozen=True)
class PipelineCommands:
    """What a pipeline accepts: its model's labels, its devices, whether it has buttons."""

    labels: tuple[str, ...]
    devices: Collection[str]
    buttons: bool = False  # anomaly and binary outputs: false alarm / missed


@dataclass(frozen=True)
class Command:
    action: Action
    pipeline: str
    device: str | None
    label: str | None  # the correction for "correct"; None otherwise


@dataclass(frozen=True)
class Refusal:
    reason: str
    detail: str


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved; O(1) per call."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.last = now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


@dataclass
class CommandValidator:
    base_topic: str
    pipelines: dict[str, PipelineCommands]
    rate_per_s: float = 2.0
    burst: float = 20.0
    max_payload: int = MAX_PAYLOAD
    clock: Callable[[], float] = time.monotonic
    accepted: int = 0
    refused: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))
    _buckets: dict[str, TokenBucket] = field(default_factory=dict)

    def _refuse(self, reason: str, detail: str) -> Refusal:
        self.refused[reason] += 1
        return Refusal(reason, detail)

    def check(self, topic: str, payload: bytes) -> Command | Refusal:
        if len(payload) > self.max_payload:
            return self._refuse("too_large", f"{topic}: payload of {len(payload)} bytes > {self.max_payload}")
        prefix = self.base_topic + "/"
        if len(topic) > 4 * self.max_payload or not topic.startswith(prefix):
            return self._refuse("bad_topic", f"{topic[:200]}: not a command topic under {prefix}")
        parts = topic[len(prefix) :].split("/")
        if len(parts) == 3 and parts[1:] == ["retrain", "press"]:
            pipeline, device, action = parts[0], None, "retrain"
        elif len(parts) == 4 and (parts[2], parts[3]) in {
            ("correct", "set"),
            ("false_alarm", "press"),
            ("missed", "press"),
        }:
            pipeline, device, action = parts[0], parts[1], parts[2]
        else:
            return self._refuse("bad_topic", f"{topic}: not a command topic")
        spec = self.pipelines.get(pipeline)
        if spec is None:
            return self._refuse("unknown_pipeline", f"{topic}: no pipeline {pipeline!r}")
        bucket = self._buckets.get(pipeline)
        now = self.clock()
        if bucket is None:
            bucket = self._buckets[pipeline] = TokenBucket(self.rate_per_s, self.burst, now)
        if not bucket.take(now):
            return self._refuse("rate_limited", f"{topic}: over {self.rate_per_s:g}/s for {pipeline}")
        if device is not None and device not in spec.devices:
            return self._refuse("unknown_device", f"{topic}: {pipeline} has no device {device!r}")
        if action in {"false_alarm", "missed"} and not spec.buttons:
            return self._refuse("not_supported", f"{topic}: {pipeline} has no {action} button")
        try:
            text = payload.decode("utf-8").strip()
        except UnicodeDecodeError:
            return self._refuse("not_utf8", f"{topic}: payload is not UTF-8")
        label: str | None = None
        if action == "correct":
            if text not in spec.labels and text != NONE_OF_THESE:
                return self._refuse("unknown_label", f"{topic}: {text[:60]!r} is not a label of {pipeline}")
            label = text
        elif text != PRESS:
            return self._refuse("bad_payload", f"{topic}: expected {PRESS}, got {text[:60]!r}")
        self.accepted += 1
        return Command(action, pipeline, device, label)  # type: ignore[arg-type]


def command_filters(base_topic: str) -> list[str]:
    """The MQTT filters the daemon subscribes to for commands."""
    return [
        f"{base_topic}/+/+/correct/set",
        f"{base_topic}/+/+/false_alarm/press",
        f"{base_topic}/+/+/missed/press",
        f"{base_topic}/+/retrain/press",
    ]


def _availability(availability_topic: str) -> list[dict[str, str]]:
    return [{"topic": availability_topic, "payload_available": "online", "payload_not_available": "offline"}]


def select_discovery(
    *,
    base_topic: str,
    pipeline: str,
    device: str,
    labels: tuple[str, ...],
    availability_topic: str,
    unique_prefix: str,
) -> dict[str, Any]:
    """HA MQTT ``select`` "Correct appliance" component config (a device-discovery component).

    No ``state_topic``: HA keeps the select optimistic, showing the last correction made.
    """
    return {
        "platform": "select",
        "name": f"Correct {pipeline}",
        "unique_id": f"{unique_prefix}_{pipeline}_{device}_correct",
        "command_topic": f"{base_topic}/{pipeline}/{device}/correct/set",
        "options": [*labels, NONE_OF_THESE],
        "availability": _availability(availability_topic),
        "entity_category": "config",
        "icon": "mdi:tag-edit",
    }


def button_discovery(
    *,
    base_topic: str,
    pipeline: str,
    action: Literal["false_alarm", "missed", "retrain"],
    availability_topic: str,
    unique_prefix: str,
    device: str | None = None,
) -> dict[str, Any]:
    """HA MQTT ``button`` component config.

    "False alarm" / "Missed" per device, "Retrain now" per pipeline (``device=None``).
    """
    if (action == "retrain") != (device is None):
        raise ValueError("retrain is per pipeline; false_alarm and missed are per device")
    names = {"false_alarm": "False alarm", "missed": "Missed", "retrain": "Retrain now"}
    topic = f"{base_topic}/{pipeline}/{action}/press" if device is None else (
        f"{base_topic}/{pipeline}/{device}/{action}/press"
    )  # fmt: skip
    who = pipeline if device is None else f"{pipeline}_{device}"
    return {
        "platform": "button",
        "name": f"{names[action]} ({pipeline})" if device is not None else f"{names[action]} {pipeline}",
        "unique_id": f"{unique_prefix}_{who}_{action}",
        "command_topic": topic,
        "payload_press": PRESS,
        "availability": _availability(availability_topic),
        "entity_category": "config" if action != "retrain" else "diagnostic",
    }
