"""The engine: one message in, its answers and acknowledgement out; no I/O.

:class:`Engine` holds the message path between the MQTT link and the models:

* :meth:`Engine.on_message` (``topic, payload, ack, received, wall``): routing (which pipelines
  a topic feeds, or the command and control topics that are not sensor data), the payload
  bound, decode and features (:meth:`edge.pipeline.Pipeline.handle`), device availability, and
  the hand-off of ready inputs to batching through ``submit``;
* :meth:`Engine.finish` (a batch's outputs from a model): post-processing, the guard
  (``output.guard``), the publish policy (``output.publish``), the answer's JSON, first-answer
  availability, and the acknowledgement of an input once its last answer is published;
* rejections: counted under their reason (:data:`edge.decode.REASONS`), logged rate limited,
  acknowledged, and sent to the dead-letter topic within ``dead_letter.max_per_s``.

Everything leaves through plain callables given at construction: ``publish(topic, payload,
qos, retain)``, ``ack(token)`` and ``submit(item) -> bool``. The engine imports no networking and
starts no task; the daemon (edge/daemon.py) wires it to the link and the batchers, and tests feed
it plain values (tests/test_engine.py). It owns the per-device output state of its pipelines
(``availability``, ``last_published``, the publish policy's) and the guard's.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

import numpy as np
import numpy.typing as npt

from edge.config import Config
from edge.corrections import Agreement, Corrections
from edge.decode import DecodeError, TopicPattern
from edge.logsetup import RateLimitedLogger
from edge.metrics import DaemonMetrics
from edge.outputs import PostProcessor, add_explain
from edge.pipeline import PendingAck, Pipeline, WorkItem
from edge.runtime import ModelSpec

log = logging.getLogger("edge.engine")
ROUTE_CACHE_MAX = 50_000  # topics whose routing is remembered; past that the cache starts again

Publish = Callable[[str, bytes, int, bool], None]  # topic, payload, qos, retain
AckToken = tuple[int, int, int]  # the link's token of an input to acknowledge (edge/mqtt.py)


def iso(ts: float) -> str:
    """An epoch time as ISO 8601 UTC with milliseconds, ``Z`` suffixed."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _never(_topic: str, _payload: bytes) -> bool:
    return False


class Engine:
    """Routing, decode, features, batching hand-off, answers and the publish policy of one
    daemon's pipelines, with no I/O (see the module docstring)."""

    def __init__(
        self,
        config: Config,
        pipelines: dict[str, Pipeline],
        corrections: Corrections | None = None,
        *,
        publish: Publish,
        ack: Callable[[AckToken | None], None],
        submit: Callable[[WorkItem], bool],
        control: Callable[[str, bytes], bool] = _never,
        observe: Callable[[Pipeline, list[WorkItem]], None] | None = None,
        retains: Callable[[Pipeline], bool] | None = None,
        device_seen: Callable[[], None] | None = None,
        ratelog: RateLimitedLogger | None = None,
        metrics: DaemonMetrics | None = None,
        instance: str | None = None,
    ) -> None:
        """``corrections``: the command topics and the inputs kept for them (edge/corrections.py;
        the daemon sets it after construction, since it reads :attr:`pipelines`).
        ``control(topic, payload)``: a topic no pipeline reads (the cluster's, discovery's);
        ``True`` when it was handled. ``observe``: the inputs a message made (edge/watch.py).
        ``retains(pipeline)``: answers retained for Home Assistant (edge/discovery.py).
        ``device_seen()``: a device's first answer (discovery announces it)."""
        self.config = config
        self.pipelines = pipelines
        self.corrections = corrections
        self.publish = publish
        self.ack = ack
        self.submit = submit
        self.control = control
        self.observe = observe
        self.retains = retains or (lambda _pipeline: False)
        self.device_seen = device_seen or (lambda: None)
        self.ratelog = ratelog or RateLimitedLogger(log, config.log_interval_s)
        self.metrics = metrics
        self.instance = instance
        self.base = config.mqtt.base_topic
        self.intake_open = True  # False while stopping: inputs are left unacknowledged
        self.messages_in = 0
        self.unrouted = 0
        self.failed_batches = 0
        self.latency_ms: float | None = None  # moving average of message-to-prediction latency
        self.guarded: dict[str, str] = {}  # output.guard: pipeline -> sha256 of the model it caught
        self.guard_counts: dict[str, dict[str, int]] = {}  # pipeline -> engaged / released / withheld
        self._dead_letter_tokens = float(config.dead_letter.max_per_s)
        self._dead_letter_at: float | None = None
        self._routes: list[tuple[TopicPattern, Pipeline]] = []
        self._route_cache: dict[str, list[Pipeline]] = {}
        self._rebuild_routes()

    # ------------------------------------------------------------------ routing

    def swap(self, config: Config, pipelines: dict[str, Pipeline]) -> None:
        """A reload: new messages go to these pipelines (routes rebuilt in the same step)."""
        self.config = config
        self.pipelines = pipelines
        self._rebuild_routes()

    def _rebuild_routes(self) -> None:
        self._routes = [(TopicPattern(f), p) for p in self.pipelines.values() for f in p.filters]
        self._route_cache = {}
        # Topics that are never sensor data, whatever a source's wildcard says: this daemon's own
        # status and bridge topics, the cluster's, Home Assistant's status and its discovery
        # prefix (an ESPHome source's '+/status' also matches 'edge-infer/status' and
        # 'homeassistant/status').
        base = self.config.mqtt.base_topic
        ha = self.config.homeassistant
        self._not_sources = (f"{base}/status", ha.status_topic)
        self._not_source_prefixes = (
            f"{base}/bridge/",
            f"{base}/instances/",
            f"{ha.discovery_prefix}/",
        )

    def route(self, topic: str) -> list[Pipeline]:
        """The pipelines a topic feeds (none for the daemon's own and Home Assistant's topics)."""
        routed = self._route_cache.get(topic)
        if routed is None:
            routed = []
            own = topic in self._not_sources or topic.startswith(self._not_source_prefixes)
            for pattern, pipeline in () if own else self._routes:
                if pipeline not in routed and pattern.match(topic) is not None:
                    routed.append(pipeline)
            if len(self._route_cache) > ROUTE_CACHE_MAX:
                self._route_cache.clear()
            self._route_cache[topic] = routed
        return routed

    # ------------------------------------------------------------------ in

    def on_message(
        self, topic: str, payload: bytes, ack: AckToken | None, received: float, wall: float
    ) -> int:
        """One incoming message (``received``: ``time.perf_counter()``, ``wall``: ``time.time()``
        at arrival); returns how many inputs it made (each handed to ``submit``, taken or not).
        Never raises.

        A QoS 1/2 input (``ack`` set) is acknowledged once it is answered: after its answers are
        published (or withheld by the publish policy), or at once when it makes none or is
        rejected. Inputs that arrive while stopping are left unacknowledged (redelivered).
        """
        self.messages_in += 1
        if not self.intake_open:
            return 0
        corrections = self.corrections
        if corrections is not None and corrections.handles(
            topic
        ):  # the daemon's own command topics (edge/corrections.py)
            corrections.on_message(topic, payload)
            self.guard_check()  # output.guard: the agreement may have crossed its line
            self.ack(ack)
            return 0
        pipelines = self.route(topic)
        if not pipelines:
            if not self.control(topic, payload):
                self.unrouted += 1
            self.ack(ack)
            return 0
        limit = self.config.limits.max_payload_bytes
        if len(payload) > limit:
            for pipeline in pipelines:
                pipeline.stats.received += 1
                detail = f"payload on {topic!r} is {len(payload)} bytes (limits.max_payload_bytes={limit})"
                self.reject(
                    pipeline, topic, payload, DecodeError("oversized", detail), now=received, wall=wall
                )
            self.ack(ack)
            return 0
        ready: list[WorkItem] = []
        for pipeline in pipelines:
            try:
                items = pipeline.handle(topic, payload, received, self.availability)
            except DecodeError as exc:
                self.reject(pipeline, topic, payload, exc, now=received, wall=wall)
                continue
            except Exception as exc:  # a bug in a decoder must not stop other devices
                error = DecodeError("decoder_error", f"{type(exc).__name__}: {exc}")
                self.reject(pipeline, topic, payload, error, now=received, wall=wall)
                continue
            if items:
                ready.extend(items)
                if self.observe is not None:
                    self.observe(pipeline, items)
        if not ready:
            self.ack(ack)
            return 0
        if ack is not None:
            pending = PendingAck(ack, len(ready))
            for item in ready:
                item.ack = pending
        for item in ready:
            if self.submit(item):
                continue
            pipeline = item.pipeline
            error = DecodeError("queue_full", f"model {pipeline.cfg.model!r} queue is full")
            self.reject(pipeline, topic, payload, error, now=received, wall=wall)
            self.settle(item)
        return len(ready)

    def availability(self, pipeline: Pipeline, device: str, online: bool) -> None:
        """A source device said it is offline or online (or sent data after saying offline)."""
        if device not in pipeline.last_published:
            # Never answered by this pipeline (a device of the same family that another pipeline
            # serves, or one still filling its window): it has no entity and no output to mark.
            # 'offline' is remembered, so its data counts as its return; its first answer marks
            # it online.
            if online:
                pipeline.availability.pop(device, None)
            elif len(pipeline.availability) < 4 * pipeline.cfg.max_devices:
                pipeline.availability[device] = False
            return
        if pipeline.availability.get(device) is online:
            return
        pipeline.availability[device] = online
        self.publish(
            pipeline.output_topic(device) + "/availability", self.available(pipeline, online), 1, True
        )

    def reject(
        self, pipeline: Pipeline, topic: str, payload: bytes, exc: DecodeError, *, now: float, wall: float
    ) -> None:
        """Count a dropped input under its reason, log it (rate limited) and dead-letter it."""
        pipeline.reject(exc.reason)
        self.ratelog.warning(
            pipeline.name, exc.reason, "dropped (%s): %s", exc.reason, exc.detail, pipeline=pipeline.name
        )
        dl = self.config.dead_letter
        if not dl.enabled:
            return
        last = now if self._dead_letter_at is None else self._dead_letter_at
        self._dead_letter_tokens = min(dl.max_per_s, self._dead_letter_tokens + (now - last) * dl.max_per_s)
        self._dead_letter_at = now
        if self._dead_letter_tokens < 1:
            return
        self._dead_letter_tokens -= 1
        body = {
            "pipeline": pipeline.name,
            "topic": topic,
            "reason": exc.reason,
            "detail": exc.detail,
            "payload": payload[:1024].decode("utf-8", errors="replace"),
            "ts": iso(wall),
        }
        dl_topic = dl.topic.replace("{base}", self.base).replace("{pipeline}", pipeline.name)
        self.publish(dl_topic, json.dumps(body).encode(), 0, False)

    def settle(self, item: WorkItem) -> None:
        """One answer of an input is done; the last one acknowledges the input."""
        pending = item.ack
        if pending is not None:
            pending.remaining -= 1
            if pending.remaining == 0:
                self.ack(pending.token)

    # ------------------------------------------------------------------ out

    def finish(
        self,
        model: str,
        spec: ModelSpec,
        batch: list[WorkItem],
        outputs: npt.NDArray[np.float32] | None,
        error: Exception | None = None,
        *,
        seconds: float,
        done: float,
        wall: float,
    ) -> None:
        """A batch's outputs from ``model`` (``None`` and ``error`` when inference failed), at
        ``done`` (``time.perf_counter()``) and ``wall`` (``time.time()``): every item answered,
        withheld or failed alone, and settled."""
        metrics = self.metrics
        if outputs is None:
            self.failed_batches += 1
            if metrics is not None:
                metrics.predictions_failed.labels(model=model).inc()
            for item in batch:
                item.pipeline.reject("inference_failed")
                self.settle(item)
            self.ratelog.warning(
                "model", model, "inference failed for a batch of %d: %s", len(batch), error, model=model
            )
            return
        if metrics is not None:
            metrics.inference_seconds.labels(model=model).observe(seconds)
            metrics.batch_size.labels(model=model).observe(len(batch))
        latest = (done - batch[-1].received) * 1000.0
        self.latency_ms = latest if self.latency_ms is None else 0.9 * self.latency_ms + 0.1 * latest
        by_pipeline: dict[int, list[int]] = {}
        for index, item in enumerate(batch):
            by_pipeline.setdefault(id(item.pipeline), []).append(index)
        for indices in by_pipeline.values():
            pipeline = batch[indices[0]].pipeline
            # Items queued before a reload are answered by the model that inferred them.
            try:
                post = pipeline.post if pipeline.spec is spec else PostProcessor(spec, pipeline.cfg.output)
                predictions = post(outputs[indices])
            except Exception as exc:  # this pipeline's part of the batch fails alone
                for index in indices:
                    self._answer_failed(pipeline, batch[index], exc)
                continue
            out = pipeline.cfg.output
            retain = out.retain or self.retains(pipeline)  # HA reads it on subscribing
            guarded = pipeline.name in self.guarded
            corrections = self.corrections
            for index, prediction in zip(indices, predictions, strict=True):
                item = batch[index]
                pipeline.stats.predicted += 1
                pipeline.alarms.apply(item.device, spec.alarm, prediction)  # anomaly: edge/alarm.py
                if corrections is not None:  # the input kept for a correction (edge/corrections.py)
                    corrections.seen(pipeline, item, prediction.fields, spec.version)
                if item.explain is not None:  # output.explain: the batcher's attribution
                    add_explain(prediction, item.explain)
                if guarded:  # output.guard: unavailable instead of guesses
                    self._guard_counts(pipeline.name)["withheld"] += 1
                    self.settle(item)
                    continue
                try:
                    if not pipeline.policy.should_publish(item.device, prediction, wall):
                        self.settle(item)
                        continue
                    # {**fields, model, model_version, latency_ms, ts[, instance]} as JSON, from
                    # pieces the post-processor prepared for the whole batch (edge/outputs.py)
                    encoded = post.answer(prediction, (done - item.received) * 1000.0, item.ts, self.instance)
                    topic = pipeline.output_topic(item.device)
                except Exception as exc:  # one item that cannot be answered fails alone
                    self._answer_failed(pipeline, item, exc)
                    continue
                if item.device not in pipeline.last_published:
                    self._first_answer(pipeline, item.device)
                pipeline.last_published[item.device] = encoded
                self.publish(topic, encoded, out.qos, retain)
                pipeline.stats.published += 1
                self.settle(item)

    def _answer_failed(self, pipeline: Pipeline, item: WorkItem, exc: Exception) -> None:
        """An item whose answer could not be built: counted (answer_failed), logged rate-limited
        and acknowledged, so neither it nor a redelivery of it holds up anyone else."""
        pipeline.reject("answer_failed")
        self.ratelog.warning(
            pipeline.name,
            "answer_failed",
            "dropped (answer_failed): device %r: %s: %s",
            item.device[:40],
            type(exc).__name__,
            exc,
            pipeline=pipeline.name,
        )
        self.settle(item)

    def _first_answer(self, pipeline: Pipeline, device: str) -> None:
        """A device's first answer from a pipeline: its output goes online and Home Assistant
        learns of it (once per device and pipeline, whatever its availability said before)."""
        if pipeline.availability.get(device) is not True:
            pipeline.availability[device] = True
            self.publish(
                pipeline.output_topic(device) + "/availability", self.available(pipeline, True), 1, True
            )
        self.device_seen()

    def republish(self) -> None:
        """Every device's availability and last answer again (Home Assistant restarted)."""
        for pipeline in self.pipelines.values():
            out = pipeline.cfg.output
            retain = out.retain or self.retains(pipeline)
            for device, payload in pipeline.last_published.items():
                online = pipeline.availability.get(device, True)
                self.publish(
                    pipeline.output_topic(device) + "/availability", self.available(pipeline, online), 1, True
                )
                self.publish(pipeline.output_topic(device), payload, out.qos, retain)

    def forget(self, pipelines: Iterable[Pipeline], owns: Callable[[str], bool]) -> int:
        """Forget every device of these pipelines that ``owns`` refuses (a cluster's partition
        moved it away): its window, joins and publish state; returns how many."""
        moved = 0
        for pipeline in pipelines:
            for device in [d for d in pipeline.store.states if not owns(d)]:
                del pipeline.store.states[device]
                pipeline.policy.states.pop(device, None)
                pipeline.last_published.pop(device, None)
                pipeline.availability.pop(device, None)
                moved += 1
        return moved

    # ------------------------------------------------------------------ guard (output.guard)

    def available(self, pipeline: Pipeline, online: bool) -> bytes:
        """A device's availability payload: offline while its pipeline is guarded."""
        return b"online" if online and pipeline.name not in self.guarded else b"offline"

    def guard_check(self) -> None:
        """``output.guard``: a pipeline whose rolling agreement with corrections is a problem
        (edge/corrections.py) goes unavailable on every device and publishes no predictions;
        it comes back when the agreement recovers, or when a new model replaces the one that
        failed (whose agreement then starts afresh), or when the guard is switched off."""
        corrections = self.corrections
        if corrections is None:
            return
        for name, pipeline in self.pipelines.items():
            guard = pipeline.cfg.output.guard and self.config.corrections.enabled
            caught = self.guarded.get(name)
            if caught is not None and (not guard or caught != pipeline.spec.sha256):
                if guard:  # another model now: judged on its own corrections
                    corrections.agreement[name] = Agreement(self.config.corrections.agreement_window)
                self._guard_release(pipeline, "a new model" if guard else "the guard is off")
                continue
            if not guard or name not in corrections.agreement:
                continue
            judged = corrections.judge(name)
            if judged["problem"] and caught is None:
                self._guard_engage(pipeline, judged)
            elif not judged["problem"] and caught is not None:
                self._guard_release(pipeline, f"agreement {judged['value']} over {judged['count']}")

    def _guard_counts(self, name: str) -> dict[str, int]:
        return self.guard_counts.setdefault(name, {"engaged": 0, "released": 0, "withheld": 0})

    def _guard_engage(self, pipeline: Pipeline, judged: dict[str, Any]) -> None:
        self.guarded[pipeline.name] = pipeline.spec.sha256
        self._guard_counts(pipeline.name)["engaged"] += 1
        log.warning(
            "guard: pipeline %s unavailable: its agreement with corrections %s over the last %d is "
            "below the holdout accuracy %s by more than corrections.agreement_margin",
            pipeline.name,
            judged["value"],
            judged["count"],
            judged["holdout"],
        )
        for device in pipeline.last_published:
            self.publish(pipeline.output_topic(device) + "/availability", b"offline", 1, True)

    def _guard_release(self, pipeline: Pipeline, why: str) -> None:
        del self.guarded[pipeline.name]
        self._guard_counts(pipeline.name)["released"] += 1
        log.info("guard: pipeline %s available again (%s)", pipeline.name, why)
        for device in pipeline.last_published:
            online = pipeline.availability.get(device, True)
            self.publish(
                pipeline.output_topic(device) + "/availability", self.available(pipeline, online), 1, True
            )

    def guard_info(self) -> dict[str, Any]:
        return {
            name: {"active": name in self.guarded, **self._guard_counts(name)}
            for name, p in self.pipelines.items()
            if p.cfg.output.guard or name in self.guard_counts
        }
