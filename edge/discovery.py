"""Home Assistant discovery at run time: what to announce, when, and reading back what was announced.

The payloads themselves are built by the pure :mod:`edge.discovery_payloads`; this
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
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from typing import Any

from edge import __version__
from edge.config import Config, Zigbee2MqttSource
from edge.corrections import correction_fields
from edge.decode import TopicPattern, sanitise_segment
from edge.discovery_payloads import (
    AvailabilityTopic,
    BridgeInfo,
    DiscoveryMessage,
    DiscoveryTracker,
    Identity,
    OutputEntity,
    RetrainEntity,
    SourceDevice,
    check_output,
    esphome_identity,
    humanise,
    is_ha_online,
    mac_connection,
    reannounce_delay,
    tasmota_identity,
    zigbee2mqtt_identities,
)
from edge.mqtt import Outgoing
from edge.pipeline import Pipeline
from edge.retrain import retrain_entities
from edge.runtime import ModelSpec
from edge.safejson import loads_bounded
from edge.watch import watched_stats

log = logging.getLogger("edge.discovery")

READBACK_S = 1.0
TASMOTA_DISCOVERY = "tasmota/discovery/+/config"  # Tasmota's own discovery (SetOption19 0)
MAX_IDENTITIES = 100_000  # Tasmota identities kept at most
SWEEP_MAX_S = 3600.0  # how often, at most, devices are checked for having answered


def output_entity(pipeline: Pipeline, device: str, corrections: bool = False) -> OutputEntity:
    spec = pipeline.spec
    ha = pipeline.cfg.homeassistant
    out = pipeline.cfg.output
    cadence = out.heartbeat_s if out.publish == "on_change" else None
    return OutputEntity(
        pipeline=pipeline.name,
        task=spec.task,
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
        label_names=readable_labels(spec.labels, ha.label_names),
        open_set=spec.task == "classification" and spec.ood_output is not None,
        explain=getattr(pipeline, "explain_plan", None) is not None,
        inputs_watched=watched_stats(spec) is not None,
        **(correction_fields(pipeline, device) if corrections else {}),
    )


def holdout_accuracy(spec: ModelSpec) -> float | None:
    """The accuracy the model's manifest gives for held-out data (a ``*test*`` entry of its
    ``metrics`` first, e.g. ``pytorch_test``), or ``None`` when it gives none."""
    metrics = spec.manifest.metrics if spec.manifest is not None else {}
    for key in sorted(metrics, key=lambda k: ("test" not in k, k)):
        entry = metrics[key]
        value = entry.get("accuracy") if isinstance(entry, dict) else None
        if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 1:
            return float(value)
    return None


def readable_labels(labels: Iterable[str], names: dict[str, str] | None) -> tuple[str, ...]:
    """The state names Home Assistant shows: ``homeassistant.label_names`` where given, else the
    model card's labels made readable (``fridge_freezer`` -> ``Fridge freezer``)."""
    given = names or {}
    return tuple(given.get(label) or humanise(label) for label in labels)


def payload_mac(pipeline: Pipeline, device: str) -> tuple[str, str] | None:
    """The MAC connection ``device``'s own payloads gave ``pipeline``'s decoder (Shelly's ``sys``
    status), checked again with :func:`mac_connection`; ``None`` when none (or not a MAC)."""
    info = getattr(pipeline.decoder, "device_info", None)
    mac = info(device).mac if callable(info) else None
    if not (isinstance(mac, tuple) and len(mac) == 2 and mac[0] == "mac" and isinstance(mac[1], str)):
        return None
    return mac_connection(mac[1])


def source_device(pipeline: Pipeline, device: str, identity: Identity | None = None) -> SourceDevice:
    info = getattr(pipeline.decoder, "device_info", None)
    name = model = manufacturer = None
    if callable(info):
        details = info(device)
        name, model, manufacturer = details.name, details.model, details.manufacturer
    availability = AvailabilityTopic(topic=pipeline.output_topic(device) + "/availability")
    return SourceDevice(
        id=device,
        name=name,
        model=model,
        manufacturer=manufacturer,
        availability=availability,
        identity=identity,
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
        spawn: Callable[[Coroutine[Any, Any, None], str], object] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        ha = config.homeassistant
        self.enabled = ha.enabled
        self.corrections = config.corrections.enabled  # the select/buttons of edge/corrections.py
        self._corrected: list[str] = []  # pipelines whose agreement the bridge shows
        self.quality: Callable[[], dict[str, tuple[str, ...]]] = dict  # edge/quality.py: model -> entities
        self._retrain: list[RetrainEntity] = []  # learnable pipelines: the bridge's retrain entities
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
        self.plans = 0  # replans done (tests wait on it)
        self.forgotten = 0  # (pipeline, device) pairs removed for being unseen
        days = ha.forget_after_days
        self.forget_after_s: float | None = None if days is None else days * 86400.0
        # pipeline -> devices announced before this run (read back from the broker's retained
        # configs, or restored from the state file): announced at once, never removed on restart
        self._restored: dict[str, set[str]] = {}
        self._seen: dict[tuple[str, str], float] = {}  # (pipeline, device) -> last answered (wall)
        self._marks: dict[tuple[str, str], bytes] = {}  # the last_published payload last looked at
        self._sweeper: asyncio.Task[None] | None = None
        self._spawn = spawn  # the daemon's TaskGroup: a failing sweep stops the daemon, not silently
        self._sweeping = False
        # identity source (Zigbee2MQTT's bridge/devices topic, Tasmota's discovery filter) ->
        # device id -> how the family's own integration identifies it in Home Assistant
        self._identities: dict[str, dict[str, Identity]] = {}
        self._tasmota_topics: dict[str, str] = {}  # Tasmota discovery topic -> its device's topic
        # (pipeline, device) -> the identity its config of an earlier run linked it by (read back)
        self._readback_identities: dict[tuple[str, str], Identity] = {}
        self.identity_rejected = 0  # identity payloads that were not what the family publishes
        self._clock = clock  # wall time: when devices answered (tests pass their own)

    def retains(self, pipeline: Pipeline) -> bool:
        """Whether ``pipeline``'s predictions are published retained for Home Assistant.

        Home Assistant subscribes to a state topic only when it creates the entity, so a state sent
        before that is lost and, with ``expire_after``, the entity stays unavailable until the next
        one (minutes). Retained, the broker hands the last state over on subscribing, whatever the
        order of config and state; staleness is left to ``expire_after`` and the availability.
        """
        return self.enabled and pipeline.cfg.homeassistant.enabled

    def _availability_patterns(self) -> list[tuple[str, TopicPattern]]:
        """In a cluster: the retained availability topics of every pipeline's devices, whichever
        instance answers them (only where ``{device}`` is a whole segment of the output topic)."""
        if self.shared is None:
            return []
        return self._output_patterns("/availability")

    def _output_patterns(self, suffix: str = "") -> list[tuple[str, TopicPattern]]:
        """(pipeline, pattern) of each announced pipeline's output topic plus ``suffix``, where
        ``{device}`` is a whole segment of it (so the device can be read back from a topic)."""
        patterns = []
        for pipeline in self._pipelines():
            if not pipeline.cfg.homeassistant.enabled:
                continue
            text = pipeline.topic_template.replace("{base}", pipeline.base).replace(
                "{pipeline}", pipeline.name
            )
            try:
                pattern = TopicPattern(text + suffix)
            except ValueError:
                continue
            if pattern.names == ["device"]:
                patterns.append((pipeline.name, pattern))
        return patterns

    def _identity_sources(self) -> dict[str, set[str]]:
        """Where the families publish their devices' identities -> the pipelines they serve:
        Zigbee2MQTT's retained ``<base_topic>/bridge/devices``, Tasmota's retained discovery."""
        sources: dict[str, set[str]] = {}
        for pipeline in self._pipelines():
            if not pipeline.cfg.homeassistant.enabled:
                continue
            source = pipeline.cfg.source
            if isinstance(source, Zigbee2MqttSource):
                base = source.options.base_topic
                sources.setdefault(f"{base}/bridge/devices", set()).add(pipeline.name)
            elif source.profile == "tasmota":
                sources.setdefault(TASMOTA_DISCOVERY, set()).add(pipeline.name)
            elif source.profile == "esphome":  # ESPHome's own discovery, one config per entity
                sources.setdefault(f"{self.bridge.discovery_prefix}/+/+/+/config", set()).add(pipeline.name)
        return sources

    def identity(self, pipeline: str, device: str) -> Identity | None:
        """The family's own identity of ``device`` as served by ``pipeline``, when known: from the
        family's identity topics, else from the device's own payloads (Shelly's MAC), else the
        one a config of an earlier run carried (read back: a restart does not unlink a device
        whose family tells its identity only now and then)."""
        for source, pipelines in self._identity_sources().items():
            if pipeline in pipelines:
                found = self._identities.get(source, {}).get(device)
                if found is not None:
                    return found
        for candidate in self._pipelines():
            if candidate.name == pipeline and candidate.cfg.homeassistant.enabled:
                mac = payload_mac(candidate, device)
                if mac is not None:
                    return Identity(connections=(mac,))
        return self._readback_identities.get((pipeline, device))

    def subscriptions(self) -> list[tuple[str, int]]:
        if not self.enabled:
            return []
        # The configs at QoS 0: the read-back after a (re)connect must see what the broker retains
        # now. At QoS 1 a persistent session also hands over what was queued or left unacknowledged
        # for the previous run, e.g. the echo of a config it published just before stopping, which
        # the read-back would take for a config still retained after someone cleared it.
        subs = [(self.status_topic, 1), (self.bridge.discovery_subscription, 0)]
        subs += [(pattern.filter, 1) for _, pattern in self._availability_patterns()]
        subs += [(source, 1) for source in sorted(self._identity_sources())]
        return subs

    def handles(self, topic: str) -> bool:
        return self.enabled and (
            topic == self.status_topic
            or topic.startswith(f"{self.bridge.discovery_prefix}/")
            or (self.shared is not None and topic.endswith("/availability"))
            or self._identity_source_of(topic) is not None
        )

    def _identity_source_of(self, topic: str) -> str | None:
        if topic.endswith("/bridge/devices"):
            return topic if topic in self._identity_sources() else None
        if topic.startswith("tasmota/discovery/") and topic.endswith("/config") and topic.count("/") == 3:
            return TASMOTA_DISCOVERY if TASMOTA_DISCOVERY in self._identity_sources() else None
        prefix = f"{self.bridge.discovery_prefix}/"
        if topic.startswith(prefix) and topic.endswith("/config") and topic[len(prefix) :].count("/") == 3:
            esphome = f"{prefix}+/+/+/config"
            return esphome if esphome in self._identity_sources() else None
        return None

    def _learn_identity(self, source: str, topic: str, payload: bytes) -> None:
        before = dict(self._identities.get(source, {}))
        try:
            data = loads_bounded(payload) if payload else None
        except ValueError:  # BoundedJsonError too: too large, too deep, too many digits
            self.identity_rejected += 1
            if self.identity_rejected == 1 or self.identity_rejected % 1000 == 0:
                log.warning(
                    "%s: not JSON, device identities not read (%d such payloads)",
                    topic,
                    self.identity_rejected,
                )
            return
        if source == TASMOTA_DISCOVERY:
            known = self._identities.setdefault(source, {})
            old = self._tasmota_topics.pop(topic, None)
            if old is not None:
                known.pop(old, None)
            found = tasmota_identity(data) if data is not None else None
            if found is not None and len(known) < MAX_IDENTITIES:
                known[found[0]] = found[1]
                self._tasmota_topics[topic] = found[0]
        elif source.endswith("/+/+/+/config"):  # ESPHome: every entity's config names its node
            known = self._identities.setdefault(source, {})
            found = esphome_identity(data) if data is not None else None
            if found is not None and (found[0] in known or len(known) < MAX_IDENTITIES):
                known[found[0]] = found[1]
        else:
            self._identities[source] = zigbee2mqtt_identities(data)
        if self._identities.get(source, {}) != before:
            self.device_seen()

    def on_message(self, topic: str, payload: bytes) -> None:
        source = self._identity_source_of(topic)
        if source is not None:
            self._learn_identity(source, topic, payload)
            return
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
        self._restore_from_readback()
        self.replan()
        if self.forget_after_s is not None and not self._sweeping:
            self._sweeping = True
            if self._spawn is not None:
                self._spawn(self._sweep(), "discovery-sweep")
            else:
                self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    def remember(self, pipeline: str, devices: Iterable[str]) -> None:
        """Devices of ``pipeline`` known from before this run (the state file): they are announced
        with the first plan, before their first new answer."""
        self._restored.setdefault(pipeline, set()).update(devices)

    def _restore_from_readback(self) -> None:
        """Which (pipeline, device) pairs the retained configs of an earlier run announced, from
        each component's state topic and the configured pipelines' output topics: a restart with
        the same config re-announces them instead of removing them."""
        patterns = self._output_patterns()
        trackers = [self.tracker] if self.shared is None else [self.tracker, self.shared]
        for tracker in trackers:
            for state_topic in tracker.announced_state_topics():
                for name, pattern in patterns:
                    match = pattern.match(state_topic)
                    if match is not None:
                        self._restored.setdefault(name, set()).add(match["device"])
            for identity, state_topics in tracker.announced_identities():
                for state_topic in state_topics:
                    for name, pattern in patterns:
                        match = pattern.match(state_topic)
                        if match is not None:
                            self._readback_identities[(name, match["device"])] = identity

    async def _sweep(self) -> None:
        """Now and then: note which devices answered, and remove those unseen for too long."""
        assert self.forget_after_s is not None
        interval = min(SWEEP_MAX_S, self.forget_after_s / 4)
        while True:
            await asyncio.sleep(interval)
            self.replan()

    def _note(self, pipeline: Pipeline, device: str, now: float) -> None:
        """Notes whether ``device`` answered since the last look (a new published payload)."""
        key = (pipeline.name, device)
        payload = pipeline.last_published.get(device)
        if payload is not None and self._marks.get(key) is not payload:
            self._marks[key] = payload
            self._seen[key] = now

    def _unseen(self, pipeline: Pipeline, device: str, now: float) -> bool:
        """Notes whether ``device`` answered since the last look; ``True`` when it has not for
        ``forget_after_s``. The clock runs from the last answer the state file kept
        (:meth:`restore_seen`); a device known only otherwise (the broker's retained configs, no
        state file) counts from the restart."""
        self._note(pipeline, device, now)
        seen = self._seen.setdefault((pipeline.name, device), now)
        return self.forget_after_s is not None and now - seen > self.forget_after_s

    def _announced(self) -> dict[str, Pipeline]:
        return {p.name: p for p in self._pipelines() if p.cfg.homeassistant.enabled}

    def _drop_seen_of_gone_pipelines(self, names: Iterable[str]) -> None:
        keep = set(names)
        for key in [k for k in self._seen if k[0] not in keep]:
            self._seen.pop(key, None)
            self._marks.pop(key, None)

    def last_seen(self) -> dict[str, dict[str, float]]:
        """Pipeline -> device -> wall time it last answered, for the state file: one entry per
        device known to an announced pipeline (answers since the last look noted now), none for
        pipelines no longer configured. Empty when discovery is off."""
        if not self.enabled:
            return {}
        pipelines = self._announced()
        now = self._clock()
        for pipeline in pipelines.values():
            for device in pipeline.last_published:
                self._note(pipeline, device, now)
        self._drop_seen_of_gone_pipelines(pipelines)
        out: dict[str, dict[str, float]] = {}
        for (name, device), seen in self._seen.items():
            out.setdefault(name, {})[device] = seen
        return out

    def restore_seen(self, seen: Mapping[str, Mapping[str, float]]) -> int:
        """The last-answered times the state file kept (:func:`edge.statefile.restore` checked
        them), so ``forget_after_days`` counts across restarts: for announced pipelines only, a
        time ahead of the clock (the clock was set back) taken as now. Those devices are
        remembered like the state file's windows (announced at once, forgotten once too old).
        Returns the number restored."""
        if not self.enabled:
            return 0
        pipelines = self._announced()
        now = self._clock()
        restored = 0
        for name, devices in seen.items():
            if name not in pipelines:
                continue
            for device, when in devices.items():
                self._seen[(name, device)] = min(float(when), now)
                restored += 1
            self.remember(name, devices)
        return restored

    def _forget(self, pipeline: Pipeline, device: str) -> None:
        key = (pipeline.name, device)
        self._seen.pop(key, None)
        self._marks.pop(key, None)
        self._restored.get(pipeline.name, set()).discard(device)
        self._readback_identities.pop(key, None)
        pipeline.last_published.pop(device, None)  # its next answer announces it again
        pipeline.availability.pop(device, None)
        topic = pipeline.output_topic(device)  # no stale retained state or availability left behind
        for retained in (topic, topic + "/availability"):
            self._publish(Outgoing(retained, b"", 1, True))
        self.forgotten += 1
        log.info(
            "pipeline=%s device %r unseen for %.1f days: removed from Home Assistant",
            pipeline.name,
            device[:64],
            (self.forget_after_s or 0) / 86400,
        )

    def warn_unsupported(self) -> None:
        for pipeline in self._pipelines():
            for problem in check_output(output_entity(pipeline, "_")):
                log.warning("pipeline=%s Home Assistant: %s", pipeline.name, problem)

    def replan(self) -> None:
        if not self.enabled:
            return
        self.plans += 1
        now = self._clock()
        for pipeline in self._pipelines():  # a MAC a device's payload gives later re-announces it
            watch = getattr(pipeline.decoder, "notify_identity", None)
            if callable(watch):
                watch(self._identity_learned)
        devices: list[tuple[SourceDevice, list[OutputEntity]]] = []
        by_device: dict[str, list[tuple[Pipeline, OutputEntity]]] = {}
        self._drop_seen_of_gone_pipelines(self._announced())  # one entry per known device
        for pipeline in self._pipelines():
            if not pipeline.cfg.homeassistant.enabled:
                continue
            known = {sanitise_segment(d): d for d in self._restored.get(pipeline.name, ())}
            known.update({sanitise_segment(d): d for d in self._learned.get(pipeline.name, ())})
            known.update({sanitise_segment(d): d for d in pipeline.last_published})
            learned = self._learned.get(pipeline.name, set())  # another instance answers those
            for device in known.values():
                if device not in learned and self._unseen(pipeline, device, now):
                    self._forget(pipeline, device)
                    continue
                by_device.setdefault(device, []).append(
                    (pipeline, output_entity(pipeline, device, self.corrections))
                )
        for device, entries in sorted(by_device.items()):
            identity = next((i for p, _ in entries if (i := self.identity(p.name, device)) is not None), None)
            devices.append((source_device(entries[0][0], device, identity), [e for _, e in entries]))
        models = sorted({p.cfg.model for p in self._pipelines()})
        self._corrected = sorted(p.name for p in self._pipelines()) if self.corrections else []
        self._retrain = retrain_entities(self._pipelines(), self.corrections)  # edge/retrain.py
        if self.shared is None:
            self._plan(self.tracker, devices, models)
            return
        self._send(
            self.tracker.plan(
                [], models=models, corrected=self._corrected, quality=self.quality(), retrain=self._retrain
            )
        )
        if self._is_leader():
            self._plan(self.shared, devices, [])

    def _plan(
        self,
        tracker: DiscoveryTracker,
        devices: list[tuple[SourceDevice, list[OutputEntity]]],
        models: list[str],
    ) -> None:
        """Publish a plan, then clear the retained states of the entities it removed (a pipeline
        that left the config, in this run or since the last, a device gone): they were retained
        for Home Assistant only."""
        before = set(tracker.announced_state_topics())
        corrected = self._corrected if tracker is self.tracker else []  # the instance's bridge/info
        quality = self.quality() if tracker is self.tracker else None
        retrain = self._retrain if tracker is self.tracker else []
        self._send(
            tracker.plan(devices, models=models, corrected=corrected, quality=quality, retrain=retrain)
        )
        for topic in sorted(before - set(tracker.announced_state_topics())):
            if topic != tracker.bridge.info_topic:
                self._publish(Outgoing(topic, b"", 1, True))

    def _identity_learned(self, device: str) -> None:
        """A decoder learned ``device``'s MAC from its payload: announce it linked soon."""
        self.device_seen()

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
        for task in (self._pending, self._announce, self._sweeper):
            if task is not None:
                task.cancel()

    def status(self) -> dict[str, Any]:
        shared = len(self.shared.topics) if self.shared is not None else 0
        return {"enabled": self.enabled, "announced": len(self.tracker.topics) + shared}
