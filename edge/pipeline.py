"""A pipeline: decode -> features -> (batch, model) -> post-process -> output topic.

Everything here runs on the event loop and is cheap; inference happens in the
model's worker (see :mod:`edge.batcher`). Rejections raise or count a
:class:`~edge.decode.DecodeError` reason and never affect other devices.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from edge.alarm import DeviceAlarms
from edge.config import Config, JsonSource, PipelineConfig, SnapshotFeatures, WindowFeatures
from edge.decode import (
    Availability,
    Decoded,
    DecodeError,
    Decoder,
    check_timestamp,
    forbidden_in_topic,
    sanitise_segment,
)
from edge.explain import ExplainError, ExplainPlan, plan
from edge.families import JsonTopicsError, build_decoder
from edge.features import FeatureStore, SlidingWindow, SnapshotJoin
from edge.outputs import PostProcessor, PublishPolicy
from edge.runtime import ModelLoadError, ModelSpec

log = logging.getLogger("edge.pipeline")


@dataclass
class PipelineStats:
    received: int = 0
    predicted: int = 0
    published: int = 0
    dropped: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {
            "received": self.received,
            "predicted": self.predicted,
            "published": self.published,
            "dropped": dict(self.dropped),
        }


@dataclass(slots=True)
class PendingAck:
    """An input message's acknowledgement, sent when the last of its work items is answered."""

    token: tuple[int, int, int]
    remaining: int


@dataclass(slots=True)
class WorkItem:
    """One input vector waiting for inference."""

    pipeline: Pipeline
    device: str
    vector: npt.NDArray[np.float32]
    received: float  # time.perf_counter() when the message arrived
    ts: float  # sample time (epoch seconds)
    ack: PendingAck | None = None
    explain: dict[str, Any] | None = None  # the answer's attribution (output.explain), set by the batcher


def pipeline_decoder(pipeline: str, cfg: PipelineConfig, readings: dict[str, str]) -> Decoder:
    """The source's decoder (:func:`edge.families.build_decoder` with the typed source's
    options); profile problems become errors naming the pipeline's keys."""
    src = cfg.source
    key = f"pipelines.{pipeline}.source"
    if isinstance(src, JsonSource) and not src.topics:
        raise ValueError(f"{key}.topics: the json profile needs at least one topic pattern")
    try:
        return build_decoder(src.profile, readings=readings, options=src.family_options())
    except JsonTopicsError as exc:
        raise ValueError(f"{key}.topics: {exc}") from None
    except ValueError as exc:
        raise ValueError(f"{key}.profile: {exc}") from None


class Pipeline:
    """State and logic of one configured pipeline."""

    def __init__(self, name: str, cfg: PipelineConfig, spec: ModelSpec, config: Config) -> None:
        self.name = name
        self.cfg = cfg
        self.spec = spec
        self.base = config.mqtt.base_topic
        self.max_skew_s = config.limits.max_clock_skew_s
        features = list(spec.features)
        inputs = cfg.inputs or {f: f for f in features}
        unknown = [k for k in inputs if k not in features]
        if unknown:
            raise ModelLoadError(
                spec.name,
                f"pipelines.{name}.inputs names {unknown} but model {spec.name!r} takes {features}",
            )
        missing = [f for f in features if f not in inputs]
        if missing and spec.layout != "grid":
            raise ModelLoadError(
                spec.name, f"pipelines.{name}.inputs: model {spec.name!r} also needs {missing}"
            )
        self.readings = {feature: inputs[feature] for feature in features}
        self.decoder = pipeline_decoder(name, cfg, self.readings)
        bound = getattr(self.decoder, "bound_devices", None)
        if callable(bound):  # a decoder with per-device state of its own (device profiles)
            bound(cfg.max_devices)
        self.filters = self.decoder.filters
        self.store = FeatureStore(
            self._state_factory(name, cfg), max_devices=cfg.max_devices, allowed=cfg.devices
        )
        self.post = PostProcessor(spec, cfg.output)
        self.explain_plan = self._explain_plan(spec)
        self.policy = PublishPolicy(cfg.output)
        self.alarms = DeviceAlarms(cfg.max_devices)  # anomaly models: the alarm per device
        self.stats = PipelineStats()
        self.topic_template = cfg.output.topic
        self._topics: dict[str, str] = {}
        self.availability: dict[str, bool] = {}
        self.last_published: dict[str, bytes] = {}  # republished when Home Assistant restarts

    def same_input(self, spec: ModelSpec) -> bool:
        """Whether a (reloaded) model takes exactly the input this pipeline builds."""
        old = self.spec
        return (old.layout, old.sample_shape, old.features) == (spec.layout, spec.sample_shape, spec.features)

    def rebind(self, spec: ModelSpec) -> None:
        """Serve a reloaded model that takes the same input; windows and counters are kept."""
        assert self.same_input(spec)
        self.spec = spec
        self.post = PostProcessor(spec, self.cfg.output)
        try:
            self.explain_plan = self._explain_plan(spec)
        except ModelLoadError as exc:  # on the loop, mid-swap: answers go out without attributions
            log.warning("pipeline %s: explain is off for model v%s: %s", self.name, spec.version, exc)
            self.explain_plan = None

    def _explain_plan(self, spec: ModelSpec) -> ExplainPlan | None:
        """The occlusion plan when ``output.explain`` is on; a misfit fails the load naming the key."""
        config = self.cfg.output.explain
        if config is None:
            return None
        try:
            return plan(spec, config, f"pipelines.{self.name}.output.explain")
        except ExplainError as exc:
            raise ModelLoadError(spec.name, str(exc)) from None

    def _state_factory(self, name: str, cfg: PipelineConfig) -> Callable[[], Any]:
        features = list(self.readings)
        spec = self.spec
        fcfg = cfg.features
        if isinstance(fcfg, SnapshotFeatures):
            if spec.layout != "snapshot":
                raise ModelLoadError(
                    spec.name,
                    f"pipelines.{name}.features.type is snapshot but model {spec.name!r} takes a "
                    f"{spec.layout} of shape [batch, {', '.join(map(str, spec.sample_shape))}]",
                )
            return lambda: SnapshotJoin(features, fcfg.max_age_s)
        assert isinstance(fcfg, WindowFeatures)
        if spec.layout != "window":
            raise ModelLoadError(
                spec.name,
                f"pipelines.{name}.features.type is window but model {spec.name!r} takes a "
                f"{spec.layout} of shape [batch, {', '.join(map(str, spec.sample_shape))}]",
            )
        size = fcfg.size or spec.sample_shape[0]
        if size != spec.sample_shape[0]:
            raise ModelLoadError(
                spec.name,
                f"pipelines.{name}.features.size is {size} but model {spec.name!r} takes windows of "
                f"{spec.sample_shape[0]} samples: [batch, {spec.sample_shape[0]}, {spec.sample_shape[1]}]",
            )
        period = fcfg.resample_period_s
        return lambda: SlidingWindow(features, size, fcfg.hop, period, fcfg.max_gap_s)

    def output_topic(self, device: str) -> str:
        topic = self._topics.get(device)
        if topic is None:
            if len(self._topics) > 4 * self.cfg.max_devices:
                self._topics.clear()
            topic = (
                self.topic_template.replace("{base}", self.base)
                .replace("{pipeline}", self.name)
                .replace("{device}", sanitise_segment(device))
            )
            self._topics[device] = topic
        return topic

    def handle(
        self,
        topic: str,
        payload: bytes,
        received: float,
        on_availability: Callable[[Pipeline, str, bool], None],
    ) -> list[WorkItem]:
        """Decode one message; return what is ready for inference. Raises DecodeError to reject."""
        self.stats.received += 1
        events = self.decoder.decode(topic, payload)
        items: list[WorkItem] = []
        now = time.time()
        for event in events:  # every event checked before any changes state: all or nothing
            if forbidden_in_topic(event.device):
                raise DecodeError(
                    "bad_device_id",
                    f"device id {event.device[:40]!r} on {topic!r} holds a control character or "
                    "non-character, which no topic may carry",
                )
            if isinstance(event, Decoded) and event.ts is not None:
                check_timestamp(event.ts, now, self.max_skew_s, f"sample time on {topic!r}")
        for event in events:
            if isinstance(event, Availability):
                if not event.online:
                    self.store.reset(event.device)
                on_availability(self, event.device, event.online)
                continue
            assert isinstance(event, Decoded)
            ts = event.ts if event.ts is not None else now
            vector = self.store.update(event.device, event.values, ts)
            if self.availability.get(event.device) is False:
                # Data from a device that said it was offline: it is back (its window restarted then).
                on_availability(self, event.device, True)
            if vector is not None:
                items.append(WorkItem(self, event.device, vector, received, ts))
        return items

    def reject(self, reason: str) -> None:
        self.stats.dropped[reason] += 1
