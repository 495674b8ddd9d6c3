"""Home Assistant discovery at run time: what to announce, when, and reading back what was announced.

The payloads themselves are built by the pure :mod:`edge.homeassistant`; this
module decides *when*: after connecting (once the retained configs of an
earlier run have been read back, so pipelines or devices that are gone are
cleared), when a device is first seen, after a reload, and after Home
Assistant's birth message (with a small random delay, then the last states
are republished because Home Assistant only reads state topics of entities it
has created).

In a cluster (``cluster.enabled``, see ``docs/scale-out.md``) each instance announces its own
bridge device (diagnostics from ``<base>/instances/<id>/bridge/info``, available while that
instance is), and only the leader (the live instance with the smallest id) announces the shared
ones: a cluster bridge device reading ``<base>/bridge/info`` and ``<base>/status``, which the leader
keeps, and one device per source device with the pipeline entities. The shared configs are named
after ``homeassistant.instance_id`` (not the instance), so whichever instance leads publishes the
same retained configs with the same unique ids: a change of leader re-announces identical
messages, never a second copy. The leader knows every device the cluster serves from the
retained ``<output>/availability`` topics the answering instances publish.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any

from edge import __version__
from edge.config import Config
from edge.decode import TopicPattern, sanitise_segment
from edge.homeassistant import (
    Availability,
    BridgeInfo,
    DiscoveryMessage,
    DiscoveryTracker,
    OutputEntity,
    SourceDevice,
    check_output,
    is_ha_online,
    reannounce_delay,
)
from edge.mqtt import Outgoing
from edge.pipeline import Pipeline

log = logging.getLogger("edge.discovery")

READBACK_S = 1.0


def output_entity(pipeline: Pipeline, device: str) -> OutputEntity:
    spec = pipeline.spec
    ha = pipeline.cfg.homeassistant
    out = pipeline.cfg.output
    cadence = out.heartbeat_s if out.publish == "on_change" else None
    return OutputEntity(
        pipeline=pipeline.name,
        task=spec.task,  # type: ignore[arg-type]
        state_topic=pipeline.output_topic(device),
        labels=spec.labels,
        unit=ha.unit or spec.unit,
        device_class=ha.device_class,
        state_class=ha.state_class,
        binary_on=ha.binary_on,
        threshold=spec.threshold,
        cadence_s=cadence,
        name=ha.name,
        icon=ha.icon,
        open_set=spec.task == "classification" and spec.ood_output is not None,
    )


def source_device(pipeline: Pipeline, device: str) -> SourceDevice:
    info = getattr(pipeline.decoder, "device_info", None)
    name = model = manufacturer = None
    if callable(info):
        details = info(device)
        name, model, manufacturer = details.name, details.model, details.manufacturer
    availability = Availability(topic=pipeline.output_topic(device) + "/availability")
    return SourceDevice(
        id=device, name=name, model=model, manufacturer=manufacturer, availability=availability
    )


class Discovery:
    """Announces and clears Home Assistant entities for the daemon's pipelines and devices."""

    def __init__(
        self,
        config: Config,
        publish: Callable[[Outgoing], None],
        pipelines: Callable[[], Iterable[Pipeline]],
        *,
        is_leader: Callable[[], bool] | None = None,
    ) -> None:
        ha = config.homeassistant
        self.enabled = ha.enabled
        self.status_topic = ha.status_topic
        base = config.mqtt.base_topic
        # Outside a cluster one tracker announces the bridge and every device; in a cluster
        # `tracker` is this instance's bridge and `shared` what the leader announces.
        self.shared: DiscoveryTracker | None = None
        if config.cluster.enabled:
            instance = config.cluster.resolved_instance()
            self.bridge = BridgeInfo(
                version=__version__,
                base_topic=f"{base}/instances/{instance}",
                instance_id=instance,
                discovery_prefix=ha.discovery_prefix,
            )
            cluster_name = "edge-infer" if ha.instance_id == "default" else f"edge-infer {ha.instance_id}"
            self.shared_bridge = BridgeInfo(
                version=__version__,
                base_topic=base,
                instance_id=ha.instance_id,
                discovery_prefix=ha.discovery_prefix,
                name=f"{cluster_name} cluster",
            )
            self.shared = DiscoveryTracker(self.shared_bridge)
        else:
            self.bridge = BridgeInfo(
                version=__version__,
                base_topic=base,
                instance_id=ha.instance_id,
                discovery_prefix=ha.discovery_prefix,
            )
            self.shared_bridge = self.bridge
        self.tracker = DiscoveryTracker(self.bridge)
        self._is_leader = is_leader or (lambda: True)
        self._learned: dict[str, set[str]] = {}  # pipeline -> devices seen on availability topics
        self._publish = publish
        self._pipelines = pipelines
        self._reading_back = False
        self._pending: asyncio.Task[None] | None = None
        self._announce: asyncio.Task[None] | None = None
        self.on_ha_online: Callable[[], None] | None = None
        self.announcements = 0

    def _availability_patterns(self) -> list[tuple[str, TopicPattern]]:
        """In a cluster: the retained availability topics of every pipeline's devices, whichever
        instance answers them (only where ``{device}`` is a whole segment of the output topic)."""
        if self.shared is None:
            return []
        patterns = []
        for pipeline in self._pipelines():
            if not pipeline.cfg.homeassistant.enabled:
                continue
            text = (
                pipeline.topic_template.replace("{base}", pipeline.base).replace("{pipeline}", pipeline.name)
                + "/availability"
            )
            try:
                pattern = TopicPattern(text)
            except ValueError:
                continue
            if pattern.names == ["device"]:
                patterns.append((pipeline.name, pattern))
        return patterns

    def subscriptions(self) -> list[tuple[str, int]]:
        if not self.enabled:
            return []
        subs = [(self.status_topic, 1), (self.bridge.discovery_subscription, 1)]
        subs += [(pattern.filter, 1) for _, pattern in self._availability_patterns()]
        return subs

    def handles(self, topic: str) -> bool:
        return self.enabled and (
            topic == self.status_topic
            or topic.startswith(f"{self.bridge.discovery_prefix}/")
            or (self.shared is not None and topic.endswith("/availability"))
        )

    def on_message(self, topic: str, payload: bytes) -> None:
        if topic == self.status_topic:
            if is_ha_online(payload):
                log.info("Home Assistant is online: re-announcing")
                self._schedule_reannounce()
            return
        if self.shared is not None and topic.endswith("/availability"):
            self._learn(topic, payload)
            return
        if self._reading_back:
            self.tracker.observe_retained(topic, payload)
            if self.shared is not None:
                self.shared.observe_retained(topic, payload)

    def _learn(self, topic: str, payload: bytes) -> None:
        if not payload:
            return
        for name, pattern in self._availability_patterns():
            match = pattern.match(topic)
            if match is None:
                continue
            known = self._learned.setdefault(name, set())
            if match["device"] not in known:
                known.add(match["device"])
                if self._is_leader():
                    self.device_seen()

    async def connected(self) -> None:
        """After (re)connecting: read back retained configs briefly, then announce."""
        if not self.enabled:
            return
        self._reading_back = True
        await asyncio.sleep(READBACK_S)
        self._reading_back = False
        self.replan()

    def warn_unsupported(self) -> None:
        for pipeline in self._pipelines():
            for problem in check_output(output_entity(pipeline, "_")):
                log.warning("pipeline=%s Home Assistant: %s", pipeline.name, problem)

    def replan(self) -> None:
        if not self.enabled:
            return
        devices: list[tuple[SourceDevice, list[OutputEntity]]] = []
        by_device: dict[str, list[tuple[Pipeline, OutputEntity]]] = {}
        for pipeline in self._pipelines():
            if not pipeline.cfg.homeassistant.enabled:
                continue
            known = {sanitise_segment(d): d for d in self._learned.get(pipeline.name, ())}
            known.update({sanitise_segment(d): d for d in pipeline.last_published})
            for device in known.values():
                by_device.setdefault(device, []).append((pipeline, output_entity(pipeline, device)))
        for device, entries in sorted(by_device.items()):
            devices.append((source_device(entries[0][0], device), [e for _, e in entries]))
        if self.shared is None:
            self._send(self.tracker.plan(devices))
            return
        self._send(self.tracker.plan([]))
        if self._is_leader():
            self._send(self.shared.plan(devices))

    def device_seen(self) -> None:
        """A device's first prediction: announce it soon, coalescing a burst of new devices."""
        if not self.enabled or self._reading_back:
            return
        if self._pending is None or self._pending.done():
            self._pending = asyncio.get_running_loop().create_task(self._replan_soon())

    async def _replan_soon(self) -> None:
        await asyncio.sleep(0.2)
        self.replan()

    def _schedule_reannounce(self) -> None:
        if self._announce is not None and not self._announce.done():
            return
        self._announce = asyncio.get_running_loop().create_task(self._reannounce())

    async def _reannounce(self) -> None:
        await asyncio.sleep(reannounce_delay())
        self._send(self.tracker.announce_all())
        if self.shared is not None and self._is_leader():
            self._send(self.shared.announce_all())
        if self.on_ha_online is not None:
            self.on_ha_online()

    def _send(self, messages: list[DiscoveryMessage]) -> None:
        for message in messages:
            self._publish(Outgoing(message.topic, message.payload.encode(), 1, message.retain))
        self.announcements += len(messages)

    def close(self) -> None:
        for task in (self._pending, self._announce):
            if task is not None:
                task.cancel()

    def status(self) -> dict[str, Any]:
        shared = len(self.shared.topics) if self.shared is not None else 0
        return {"enabled": self.enabled, "announced": len(self.tracker.topics) + shared}
