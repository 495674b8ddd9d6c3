"""The daemon: the composition root of one edge-infer instance; ``run`` and ``check`` commands.

:class:`Daemon` builds the parts and wires them: the MQTT link (edge/mqtt.py) and its intake
bounds (edge/intake.py), the engine that owns the message path (edge/engine.py: routing, decode,
answers, publish policy, acks; no I/O), one batcher per model (edge/batcher.py), discovery
(edge/discovery.py), the cluster (edge/cluster.py), corrections, retraining, input watch and
quality, reporting (bridge info, ``/metrics``, systemd status) and the state file. Every task it
runs lives in the one :class:`asyncio.TaskGroup` of :meth:`Daemon.run`; it also reloads.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import hashlib
import json
import logging
import os
import signal
import socket
import ssl
import stat
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edge import __version__, memory
from edge.batcher import Batcher
from edge.cluster import Cluster, own_topics
from edge.config import (
    MAX_CONFIG_BYTES,
    Config,
    ConfigError,
    config_warnings,
    load_config,
    mask_url,
    read_limited,
)
from edge.corrections import Corrections, CorrectionsCollector
from edge.discovery import Discovery, holdout_accuracy
from edge.engine import Engine, iso
from edge.features import WindowBudget
from edge.intake import Intake
from edge.logsetup import RateLimitedLogger, setup_logging
from edge.metrics import DaemonMetrics, MetricsServer, Reading
from edge.mqtt import AckToken, MqttLink, Outgoing, tls_context
from edge.partition import OwnedDecoder
from edge.pipeline import Pipeline, WorkItem
from edge.quality import QualityBook, confusion_topic
from edge.retrain import Retrainer
from edge.runtime import LoadedModel, ModelLoadError, file_sha256
from edge.sdnotify import Liveness, Notifier, Watchdog, status_line
from edge.statefile import restore as restore_state
from edge.statefile import snapshot as snapshot_state
from edge.statefile import write as write_state
from edge.watch import InputWatch

log = logging.getLogger("edge.daemon")
MEMORY_CHECK_S = 5.0  # how often to look whether a backlog was worked off (memory given back)
QUIET_QUEUE = 16  # queued items below which a backlog counts as worked off


def load_models(config: Config, reuse: dict[str, LoadedModel] | None = None) -> dict[str, LoadedModel]:
    """Load every model used by an enabled pipeline; ModelLoadError names the model key.

    With ``reuse`` (a reload), a model whose config and file are unchanged is kept as it is.
    """
    used = {p.model for p in config.pipelines.values() if p.enabled}
    models: dict[str, LoadedModel] = {}
    for name in sorted(used):
        cfg = config.models[name]
        check_model_file(name, cfg.path)
        old = (reuse or {}).get(name)
        unchanged = old is not None and old.config == cfg and cfg.path.is_file()
        if old is not None and unchanged and file_sha256(cfg.path) == old.spec.sha256:
            models[name] = old
            continue
        models[name] = LoadedModel(name, cfg, config.runtime)
    return models


def check_model_file(name: str, path: Path) -> None:
    """A model path must be a readable, non-empty regular file: a device, a FIFO or a ``/proc``
    file (``/proc/self/mem`` says it is a regular file of 0 bytes) is refused before reading."""
    key = f"models.{name}.path"
    try:
        info = path.stat()
    except OSError as exc:
        if isinstance(exc, FileNotFoundError):
            return  # LoadedModel says it does not exist, naming the key
        raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(key, f"{path} is not a regular file")
    if info.st_size == 0:
        raise ConfigError(key, f"{path} is empty (or a special file that reports no size)")
    try:
        with path.open("rb") as handle:
            handle.read(16)
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from None


def check_startup(config: Config) -> None:
    """What ``run`` would refuse at start beyond the config's own validation; ``check`` and
    ``run`` both call it (through :func:`prepare`). Raises ConfigError naming the key:
    the password (file readable, variable set), the TLS files (loaded as the link loads them),
    the state file (a regular file if it exists) and the metrics port (free to bind)."""
    mqtt = config.mqtt
    mqtt.resolved_password()
    if mqtt.tls_enabled:
        tls = mqtt.tls
        for key in ("ca_file", "cert_file", "key_file"):
            file = getattr(tls, key, None) if tls is not None else None
            if file is not None:
                read_limited(file, f"mqtt.tls.{key}", MAX_CONFIG_BYTES, "the TLS file")
        try:
            tls_context(mqtt)
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise ConfigError("mqtt.tls", f"cannot set up TLS with these files: {exc}") from None
    state = config.state.file
    if state is not None:
        try:
            info = state.stat()
        except FileNotFoundError:
            info = None
        except OSError as exc:
            raise ConfigError("state.file", f"cannot use {state}: {exc.strerror}") from None
        if info is not None and not stat.S_ISREG(info.st_mode):
            raise ConfigError("state.file", f"{state} is not a regular file")
    metrics = config.metrics
    if metrics.enabled and metrics.port != 0:
        try:
            infos = socket.getaddrinfo(metrics.host, metrics.port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise ConfigError("metrics.host", f"{metrics.host!r}: {exc}") from None
        for family, kind, proto, _, address in infos[:1]:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind(address)
                except OSError as exc:
                    raise ConfigError(
                        "metrics.port", f"cannot listen on {metrics.host}:{metrics.port}: {exc.strerror}"
                    ) from None


def subscriptions_record(config: Config) -> Path:
    """Where the link remembers its client id's subscriptions (docs/operations.md): beside the
    state file when there is one, else in ``$STATE_DIRECTORY`` (systemd's StateDirectory),
    ``$XDG_STATE_HOME/edge-infer`` or ``~/.local/state/edge-infer``; one file per client id."""
    client_id = config.instance_mqtt().resolved_client_id()
    name = f"subscriptions-{hashlib.sha256(client_id.encode()).hexdigest()[:12]}.json"
    if config.state.file is not None:
        return config.state.file.parent / f"{config.state.file.name}.{name}"
    folder = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    if folder:
        return Path(folder) / name
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "edge-infer" / name


def build_pipelines(
    config: Config, models: dict[str, LoadedModel], reuse: dict[str, Pipeline] | None = None
) -> dict[str, Pipeline]:
    """Build the enabled pipelines. With ``reuse``, an unchanged pipeline whose model takes the
    same input keeps its object (and so its per-device windows and counters)."""
    pipelines: dict[str, Pipeline] = {}
    for name, cfg in config.pipelines.items():
        if not cfg.enabled:
            continue
        spec = models[cfg.model].spec
        old = (reuse or {}).get(name)
        if old is not None and old.cfg == cfg and old.base == config.mqtt.base_topic and old.same_input(spec):
            pipelines[name] = old
            continue
        try:
            pipelines[name] = Pipeline(name, cfg, spec, config)
        except ValueError as exc:
            text = str(exc)
            key, _, message = text.partition(": ")
            raise ConfigError(
                key if key.startswith("pipelines.") else f"pipelines.{name}", message or text
            ) from None
    budget = WindowBudget(config.limits.max_window_bytes)  # over all pipelines, kept ones too
    for pipeline in pipelines.values():
        pipeline.store.budget = budget
        budget.stores.append(pipeline.store)
    return pipelines


class Daemon:
    """One running edge-infer instance: the parts wired together under one TaskGroup."""

    def __init__(
        self,
        config: Config,
        models: dict[str, LoadedModel] | None = None,
        *,
        config_path: Path | None = None,
        mqtt_url: str | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.mqtt_url = mqtt_url
        self.models = models if models is not None else load_models(config)
        pipelines = build_pipelines(config, self.models)
        base = config.mqtt.base_topic
        self.base = base
        self.instance: str | None = config.cluster.resolved_instance() if config.cluster.enabled else None
        self.status_topic, self.info_topic = own_topics(config)
        self.started = time.time()
        self.ratelog = RateLimitedLogger(log, config.log_interval_s)
        self.metrics = DaemonMetrics(self.metrics_reading)
        self.notifier = Notifier()
        self.liveness = Liveness()
        self.liveness.add_check(self._models_alive)
        self.link = MqttLink(
            config.instance_mqtt(),
            subscriptions=self.subscriptions,
            on_message=self.on_message,
            on_connected=self._on_connected,
            status_topic=self.status_topic,
            subscriptions_file=subscriptions_record(config),
            max_payload_bytes=config.limits.max_payload_bytes,
            intake=Intake(
                max_queued_inputs=config.limits.max_queued_inputs,
                publish_queue=config.instance_mqtt().publish_queue,
            ),
        )
        self.intake = self.link.intake
        self.watch = InputWatch(self.link.publish, self.ratelog, config.state.file)  # edge/watch.py
        self.metrics.registry.register(self.watch.collector())
        # The message path (edge/engine.py): routing, decode, features, answers, publish policy.
        self.engine = Engine(
            config,
            pipelines,
            publish=self._publish,
            ack=self.link.ack,
            submit=self._submit,
            control=self._control,
            observe=self.watch.observe,
            ratelog=self.ratelog,
            metrics=self.metrics,
            instance=self.instance,
        )
        # edge/cluster.py: membership, partitions, the leader's topics (None outside a cluster)
        self.cluster: Cluster | None = None
        if config.cluster.enabled:
            self.cluster = Cluster(
                config,
                publish=self._publish,
                connected=self.link.connected.is_set,
                update_subscriptions=self.link.update_subscriptions,
                forget=self.engine.forget,
                pipelines=self._current_pipelines,
            )
            self.cluster.bind(pipelines)
        self.corrections = Corrections(config, lambda: self.pipelines, self.ratelog, self._background)
        self.engine.corrections = self.corrections
        self.metrics.registry.register(CorrectionsCollector(self.corrections))
        self.retrainer = Retrainer(  # edge/retrain.py: learn in a child process, one at a time
            lambda: self.config, config_path, self.link.publish, self.ratelog, is_leader=self.is_leader
        )
        self.corrections.on_retrain = self.retrainer.on_command
        self.metrics.registry.register(self.retrainer.collector())
        self.link.on_room = self._room_made
        self.discovery = Discovery(
            config,
            self.link.publish,
            self._current_pipelines,
            is_leader=self.is_leader,
            spawn=self._background,
        )
        self.discovery.on_ha_online = self._republish_states
        if self.cluster is not None:
            self.cluster.on_leader = self.discovery.replan
        self.discovery.warn_unsupported()
        self.engine.retains = self.discovery.retains
        self.engine.device_seen = self.discovery.device_seen
        self.quality = QualityBook()  # edge/quality.py: each model's record and confusion PNG
        self.quality.refresh(self._model_files())
        self.discovery.quality = self.quality.entities
        self._quality_pending = set(self.models)  # published at the first connect, then on change
        self.batchers: dict[str, Batcher] = {}
        self._batcher_tasks: dict[str, asyncio.Task[None]] = {}
        self._intake_watchdog: asyncio.TimerHandle | None = None
        self.state_write_errors = 0
        self.memory_trims = 0
        self._memory_marker: tuple[int, int] = (0, 0)
        self._stop = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._group: asyncio.TaskGroup | None = None
        self.ready = asyncio.Event()
        self.reloads = 0
        self._rate_mark = (time.monotonic(), 0)
        for name, model in self.models.items():
            self.metrics.set_model_info(name, model.spec.version, model.spec.sha256)

    @property
    def pipelines(self) -> dict[str, Pipeline]:
        """The running pipelines (the engine's; replaced as a whole by a reload)."""
        return self.engine.pipelines

    @property
    def messages_in(self) -> int:
        return self.engine.messages_in

    @property
    def unrouted(self) -> int:
        return self.engine.unrouted

    @property
    def guarded(self) -> dict[str, str]:
        """output.guard: pipeline -> sha256 of the model it caught (edge/engine.py)."""
        return self.engine.guarded

    @property
    def guard_counts(self) -> dict[str, dict[str, int]]:
        return self.engine.guard_counts

    def _current_pipelines(self) -> Iterable[Pipeline]:
        return self.engine.pipelines.values()

    def _publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        self.link.publish(Outgoing(topic, payload, qos, retain))

    # ------------------------------------------------------------------ scale-out

    def is_leader(self) -> bool:
        """Outside a cluster always; in one, the live instance with the smallest id."""
        return self.cluster is None or self.cluster.is_leader()

    def _start_batcher(self, name: str, model: LoadedModel) -> None:
        batcher = Batcher(
            model, functools.partial(self._sink, model), room=self._outgoing_room, taken=self._batch_taken
        )
        self.batchers[name] = batcher
        self._batcher_tasks[name] = self._spawn(batcher.run(), f"batcher-{name}")

    def _models_alive(self) -> tuple[bool, str]:
        limit = self.config.watchdog_stall_s
        for name, model in self.models.items():
            stalled = model.stalled_for()
            if stalled > limit:
                return (
                    False,
                    f"model {name} stuck in one inference call for {stalled:.1f}s (limit {limit:g}s)",
                )
        return True, "ok"

    # ------------------------------------------------------------------ MQTT in

    def subscriptions(self) -> list[tuple[str, int]]:
        subs: dict[str, int] = {}
        for name, pipeline in self.pipelines.items():
            mode = self.config.scale_out(name)
            group = pipeline.cfg.source.shared_group
            if mode == "shared":
                group = group or self.config.cluster.shared_group
                if self.cluster is not None and self.cluster.leaving:
                    continue
            elif mode == "partition":
                group = None  # every instance sees every message and keeps its own devices
                if self.cluster is not None and self.cluster.left:
                    continue
            for f in pipeline.filters:
                topic = f"$share/{group}/{f}" if group else f
                subs[topic] = max(subs.get(topic, 0), pipeline.cfg.source.qos)
        if self.cluster is not None:
            subs.update(self.cluster.subscriptions())
        for topic, qos in [*self.discovery.subscriptions(), *self.corrections.subscriptions()]:
            subs[topic] = max(subs.get(topic, 0), qos)
        return sorted(subs.items())

    def on_message(self, topic: str, payload: bytes, ack: AckToken | None = None) -> None:
        """Called for every incoming message, on the event loop; never raises. The engine
        routes, decodes and hands inputs to the batchers (edge/engine.py); answers made faster
        than the broker takes them pause the intake."""
        if self.engine.on_message(topic, payload, ack, time.perf_counter(), time.time()) and (
            self.link.outgoing_full()
        ):
            self._pause_intake()

    def _submit(self, item: WorkItem) -> bool:
        """The engine's hand-off to batching: ``False`` when the model's queue is full."""
        batcher = self.batchers[item.pipeline.cfg.model]
        if not batcher.put(item):
            return False
        if self.intake.inputs_full(len(batcher.queue)):
            self._pause_intake()
        return True

    def _control(self, topic: str, payload: bytes) -> bool:
        """A topic no pipeline reads: the cluster's (edge/partition.py) or discovery's."""
        if self.cluster is not None and self.cluster.handles(topic):
            self.cluster.on_message(topic, payload)
            return True
        if self.discovery.handles(topic):
            self.discovery.on_message(topic, payload)
            return True
        return False

    async def _outgoing_room(self) -> None:
        """Before each batch: wait while the outgoing queue is full (MqttLink.outgoing_full) and
        the broker is connected (it is draining), so answers are never made faster than the
        broker takes them and then dropped or piled up in memory; the model queues fill instead
        and pause the intake. While the broker is away the queue fills up to mqtt.publish_queue
        and its policy drops (counted)."""
        await self.link.wait_outgoing_room()  # woken by the link when its queue drains, no polling

    def _pause_intake(self) -> None:
        """Back-pressure: a model's queue is at limits.max_queued_inputs, or the outgoing queue
        is full (answers made faster than the broker takes them: MqttLink.outgoing_full). Inputs
        are held back (MqttLink.pause_intake: a few hundred in the link, then in the broker and
        TCP buffers, unacknowledged) until the model queues are down to half and the outgoing
        queue has drained (edge/intake.py). The resume is driven by progress: each batch a
        batcher takes (:meth:`_batch_taken`) and each hand-over of answers to the socket
        (MqttLink.on_room) asks :meth:`Intake.may_resume`; no timer decides it."""
        link = self.link
        if link.intake_paused or not link.connected.is_set():
            return
        link.pause_intake()
        loop = asyncio.get_running_loop()
        if self._intake_watchdog is None:
            self._intake_watchdog = loop.call_later(self.config.mqtt.keepalive / 3, self._intake_keepalive)

    def _batch_taken(self) -> None:
        """A batcher took a batch from its queue: room was made, resume now if it is enough."""
        if self.link.intake_paused:
            self._room_made("batch")

    def _room_made(self, reason: str) -> None:
        link = self.link
        queued = (len(b.queue) for b in self.batchers.values())
        if self.intake.may_resume(queued, len(link.queue), reason):
            link.resume_intake()  # hands the held inputs over; a full queue pauses it again

    def _intake_keepalive(self) -> None:
        """While paused, every mqtt.keepalive / 3: once HOLD_MAX inputs are held the socket is no
        longer read, so read once for the PINGRESP that keeps the connection alive (and the
        PUBACKs queued behind inputs). It re-checks for room too, a safety net counted apart
        (Intake.resumes["watchdog"]); batches and answers resume the intake long before."""
        self._intake_watchdog = None
        link = self.link
        if not link.intake_paused:
            return
        link.read_through()
        self._room_made("watchdog")
        if link.intake_paused:
            loop = asyncio.get_running_loop()
            self._intake_watchdog = loop.call_later(self.config.mqtt.keepalive / 3, self._intake_keepalive)

    # ------------------------------------------------------------------ inference out

    def _sink(
        self,
        model: LoadedModel,
        batch: list[WorkItem],
        outputs: npt.NDArray[np.float32] | None,
        seconds: float,
        error: Exception | None,
    ) -> None:
        """A batcher's answers: the engine post-processes, publishes and acknowledges them."""
        self.engine.finish(
            model.name,
            model.spec,
            batch,
            outputs,
            error,
            seconds=seconds,
            done=time.perf_counter(),
            wall=time.time(),
        )

    # ------------------------------------------------------------------ lifecycle

    async def _on_connected(self) -> None:
        if self.cluster is not None:
            self.cluster.reconnected()
        self.publish_bridge_info()
        self._publish_quality()
        self._background(self.discovery.connected(), "discovery")
        if not self.ready.is_set():
            self.ready.set()
            self.notifier.ready(self.status_text())
            log.info("ready: %s", self.status_text())

    def _republish_states(self) -> None:
        """After Home Assistant restarts: the last prediction of every device, and bridge info."""
        self.publish_bridge_info()
        self.engine.republish()

    def status_text(self) -> str:
        elapsed = max(time.time() - self.started, 1e-9)
        rate = self.messages_in / elapsed
        return status_line(len(self.models), len(self.pipelines), rate, self.link.connected.is_set())

    def metrics_reading(self) -> Reading:
        """The daemon's plain counters for the scrape-time collector (on the event loop)."""
        dropped: dict[tuple[str, str], int] = {}
        for name, p in self.pipelines.items():
            for reason, count in p.stats.dropped.items():
                dropped[(name, reason)] = count
        return Reading(
            messages_in={name: p.stats.received for name, p in self.pipelines.items()},
            messages_out={name: p.stats.published for name, p in self.pipelines.items()},
            dropped=dropped,
            reconnects=self.link.reconnects,
            connected=self.link.connected.is_set(),
            queue_depth={name: len(b.queue) for name, b in self.batchers.items()},
        )

    def render_metrics(self) -> str:
        return self.metrics.render()

    def health(self) -> tuple[bool, str]:
        if not self.link.connected.is_set():
            return False, f"broker disconnected ({self.link.last_error or 'connecting'})"
        return self.liveness.check()

    def bridge_info(self) -> dict[str, Any]:
        now = time.monotonic()
        last_at, last_count = self._rate_mark
        rate = (self.messages_in - last_count) / (now - last_at) if now > last_at else 0.0
        self._rate_mark = (now, self.messages_in)
        return {
            "version": __version__,
            "uptime_s": round(time.time() - self.started, 1),
            "started": iso(self.started),  # the bridge's Started timestamp sensor
            "messages_per_s": round(rate, 3),
            "drops": sum(sum(p.stats.dropped.values()) for p in self.pipelines.values()),
            "latency_ms": None if (latency := self.engine.latency_ms) is None else round(latency, 3),
            "connected": self.link.connected.is_set(),
            "reconnects": self.link.reconnects,
            "reloads": self.reloads,
            "messages_in": self.messages_in,
            "unrouted": self.unrouted,
            "publish_queue": len(self.link.queue),
            "publish_dropped": self.link.dropped,
            "intake_pauses": self.link.intake_pauses,
            "state_write_errors": self.state_write_errors,
            "memory_trims": self.memory_trims,
            "failed_batches": self.engine.failed_batches,
            "models": {
                name: {
                    "version": m.spec.version,
                    "task": m.spec.task,
                    "sha256": m.spec.sha256,
                    "providers": m.providers,
                    "accuracy": holdout_accuracy(m.spec),  # the bridge's per-model diagnostic
                    **self.quality.info(name),  # examples_per_class, trained_at, metric (edge/quality.py)
                    "batches": self.batchers[name].batches if name in self.batchers else 0,
                    "items": self.batchers[name].items if name in self.batchers else 0,
                    "explained": self.batchers[name].explained if name in self.batchers else 0,
                    "explain_rows": self.batchers[name].explain_rows if name in self.batchers else 0,
                }
                for name, m in self.models.items()
            },
            "pipelines": {name: self._pipeline_info(name, p) for name, p in self.pipelines.items()},
            "corrections": self.corrections.info(),
            "quality_errors": self.quality.errors,
            "guard": self.engine.guard_info(),
            "retrain": self.retrainer.info(),
            **(self.cluster.fields() if self.cluster is not None else {}),
        }

    def _pipeline_info(self, name: str, p: Pipeline) -> dict[str, Any]:
        info: dict[str, Any] = {"model": p.cfg.model, "devices": len(p.store.states), **p.stats.as_dict()}
        if (inputs := self.watch.info(name)) is not None:
            info["inputs"] = inputs
        if self.cluster is not None:
            info["scale_out"] = self.config.scale_out(name)
        if isinstance(p.decoder, OwnedDecoder):
            info["not_owned"] = p.decoder.skipped
            info["not_member"] = p.decoder.inactive
        return info

    def publish_bridge_info(self) -> None:
        info = self.bridge_info()
        self.link.publish(Outgoing(self.info_topic, json.dumps(info).encode(), 1, True))
        if self.cluster is not None:
            self.cluster.own_info_published(info)  # the leader publishes the cluster's too

    async def save_state(self) -> None:
        """Write the state file (if configured): the snapshot on the loop, the write off it."""
        path = self.config.state.file
        if path is None:
            return
        await self.watch.save()
        try:
            document = snapshot_state(self.pipelines, self.discovery.last_seen())
            await asyncio.to_thread(write_state, path, document)
        except OSError as exc:
            self.state_write_errors += 1
            log.warning("could not write the state file %s: %s", path, exc)

    async def _keep_state(self) -> None:
        while True:
            await asyncio.sleep(self.config.state.interval_s)
            await self.save_state()

    async def _every(self, seconds: float, action: Any) -> None:
        while True:
            await asyncio.sleep(seconds)
            action()

    def _memory_tick(self) -> None:
        """Once a backlog is worked off (the intake paused or the link reconnected since the last
        look, and every queue is nearly empty now), collect garbage and hand freed memory back
        to the system (edge/memory.py); a few milliseconds, only after a backlog."""
        link = self.link
        marker = (link.intake_pauses, link.reconnects)
        if marker == self._memory_marker:
            return
        if (
            link.intake_paused
            or len(link.queue) > QUIET_QUEUE
            or any(len(b.queue) > QUIET_QUEUE for b in self.batchers.values())
        ):
            return  # still working it off: look again next time
        self._memory_marker = marker
        gc.collect()
        if memory.available():
            memory.trim()  # False when nothing was free: still a look that was due
            self.memory_trims += 1

    def _bridge_tick(self) -> None:
        if self.link.connected.is_set():
            self.publish_bridge_info()

    # ------------------------------------------------------------------ quality (edge/quality.py)

    def _model_files(self) -> dict[str, tuple[Path, str]]:
        return {name: (m.config.path, m.spec.sha256) for name, m in self.models.items()}

    def _publish_quality(self) -> None:
        """The confusion PNG of each model in ``_quality_pending``, retained on its own topic (an
        empty retained message clears the image of a model that has none now)."""
        for name in sorted(self._quality_pending):
            png = self.quality.png(name)
            self.link.publish(Outgoing(confusion_topic(self.info_topic, name), png or b"", 1, True))
        self._quality_pending.clear()

    async def _quality_reload(self) -> None:
        """After a reload: the records of replaced models read and rendered off the loop; the
        images that changed published again."""
        try:
            changed = await asyncio.to_thread(self.quality.refresh, self._model_files())
        except Exception as exc:  # a record that breaks the renderer must not stop the daemon
            self.quality.errors += 1
            log.warning("quality records not refreshed: %s: %s", type(exc).__name__, exc)
            return
        self._quality_pending.update(changed)
        self._publish_quality()

    # ------------------------------------------------------------------ reload

    def _prepare_reload(self) -> tuple[Config, dict[str, LoadedModel], dict[str, Pipeline]]:
        """Runs in a worker thread: new config, new models loaded and warmed up, pipelines checked."""
        config = self.config
        if self.config_path is not None:
            config = load_config(self.config_path, self.mqtt_url, self.config.cluster.instance)
            if config.mqtt != self.config.mqtt:
                log.warning("reload: changes under 'mqtt' take effect at the next restart")
                config = config.model_copy(update={"mqtt": self.config.mqtt})
            if config.cluster != self.config.cluster:
                log.warning("reload: changes under 'cluster' take effect at the next restart")
                config = config.model_copy(update={"cluster": self.config.cluster})
        models = load_models(config, reuse=self.models)
        pipelines = build_pipelines(config, models, reuse=self.pipelines)
        return config, models, pipelines

    async def reload(self, reason: str = "SIGHUP") -> bool:
        """Atomically replace config and models; a broken new config or model is refused."""
        async with self._reload_lock:
            self.notifier.reloading(f"reloading ({reason})")
            loop = asyncio.get_running_loop()
            try:
                config, models, pipelines = await loop.run_in_executor(None, self._prepare_reload)
            except (ConfigError, ModelLoadError) as exc:
                log.error("reload (%s) refused, the running models keep serving: %s", reason, exc)
                self.metrics.reloads.labels(result="refused").inc()
                self.notifier.ready(self.status_text())
                return False
            changed = self._swap(config, models, pipelines)
            await self._quality_reload()
            self.engine.guard_check()
            await self.link.update_subscriptions()
            self.discovery.replan()
            self.reloads += 1
            self.metrics.reloads.labels(result="ok").inc()
            log.info("reload (%s) done: %s", reason, ", ".join(changed) or "nothing changed")
            self.publish_bridge_info()
            self.notifier.ready(self.status_text())
            return True

    def _swap(
        self, config: Config, models: dict[str, LoadedModel], pipelines: dict[str, Pipeline]
    ) -> list[str]:
        """On the event loop, in one step: new messages go to the new pipelines and models."""
        changed: list[str] = []
        old_models = self.models
        for name, pipeline in pipelines.items():
            spec = models[pipeline.cfg.model].spec
            if pipeline.spec is not spec:
                if self.pipelines.get(name) is pipeline:
                    pipeline.rebind(spec)
                else:
                    pipeline.spec = spec
        changed += [f"pipeline {n} added" for n in pipelines if n not in self.pipelines]
        changed += [f"pipeline {n} removed" for n in self.pipelines if n not in pipelines]
        changed += [
            f"pipeline {n} restarted"
            for n, p in pipelines.items()
            if n in self.pipelines and self.pipelines[n] is not p
        ]
        self.config = config
        self.models = models
        if self.cluster is not None:
            self.cluster.bind(pipelines)
        self.engine.swap(config, pipelines)
        self.corrections.rebuild()
        for name, model in models.items():
            if old_models.get(name) is not model:
                changed.append(
                    f"model {name} {'replaced' if name in old_models else 'added'}"
                    f" (v{model.spec.version}, sha256 {model.spec.sha256[:12]})"
                )
                old_batcher = self.batchers.get(name)
                old_task = self._batcher_tasks.get(name)
                self._start_batcher(name, model)
                if old_batcher is not None and old_task is not None:
                    self._background(self._retire(old_batcher, old_task), f"retire-{name}")
                self.metrics.set_model_info(name, model.spec.version, model.spec.sha256)
        for name in [n for n in old_models if n not in models]:
            changed.append(f"model {name} unloaded")
            batcher, task = self.batchers.pop(name), self._batcher_tasks.pop(name)
            self._background(self._retire(batcher, task), f"retire-{name}")
            self.metrics.forget_model(name)
        return changed

    async def _retire(self, batcher: Batcher, task: asyncio.Task[None]) -> None:
        """Let a replaced model answer what was queued for it, then close it."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(batcher.drained(), 30)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        batcher.model.close()

    async def _watch_models(self) -> None:
        """Reload when a model file is replaced; waits until the new file stops changing."""

        def snapshot() -> dict[Path, tuple[int, int, int]]:
            result = {}
            for model in self.models.values():
                with contextlib.suppress(OSError):
                    st = model.config.path.stat()
                    result[model.config.path] = (st.st_mtime_ns, st.st_size, st.st_ino)
            return result

        seen = snapshot()
        pending: dict[Path, tuple[int, int, int]] | None = None
        while True:
            await asyncio.sleep(self.config.reload.interval_s)
            if not self.config.reload.watch_models:
                continue
            now = snapshot()
            if now == seen:
                pending = None
                continue
            if pending != now:
                pending = now  # changed: wait one more interval for the writer to finish
                continue
            pending = None
            await self.reload("model file changed")
            seen = snapshot()

    # ------------------------------------------------------------------ run

    def request_stop(self) -> None:
        self._stop.set()

    def request_reload(self) -> None:
        if self._group is None:
            log.warning("reload (SIGHUP) ignored: the daemon is not running yet")
            return
        self._background(self.reload("SIGHUP"), "reload")

    def _background(self, coro: Any, name: str) -> None:
        self._spawn(coro, name, self._tasks)

    def _spawn(self, coro: Any, name: str, into: set[asyncio.Task[Any]] | None = None) -> asyncio.Task[Any]:
        """A task in the daemon's one TaskGroup: if it fails, the daemon stops with its error."""
        if self._group is None:
            coro.close()
            raise RuntimeError(f"task {name} started outside Daemon.run")
        task = self._group.create_task(self._supervised(coro, name), name=name)
        if into is not None:
            into.add(task)
            task.add_done_callback(into.discard)
        return task

    @staticmethod
    async def _supervised(coro: Any, name: str) -> Any:
        try:
            return await coro
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.critical(
                "task %s failed, stopping the daemon: %s: %s", name, type(exc).__name__, exc, exc_info=exc
            )
            raise

    async def _run_link(self) -> None:
        """The MQTT link; its ending on its own (not asked to) stops the daemon in order."""
        await self.link.run()
        self._stop.set()

    async def run(self) -> None:
        """Run until :meth:`request_stop`; then stop intake, flush batches, publish offline, disconnect.

        Every task the daemon runs (link, batchers, periodic ticks, reloads) lives in one
        :class:`asyncio.TaskGroup`: when one fails, the others are cancelled and ``run`` raises
        that task's error (logged with the task's name), so a supervisor restarts the daemon
        instead of it carrying on without, say, its state ticks."""
        server: MetricsServer | None = None
        if self.config.metrics.enabled:
            server = MetricsServer(
                self.render_metrics, self.health, self.config.metrics.host, self.config.metrics.port
            )
            try:
                await server.start()
            except OSError as exc:  # taken since check_startup looked
                metrics = self.config.metrics
                raise ConfigError(
                    "metrics.port", f"cannot listen on {metrics.host}:{metrics.port}: {exc.strerror}"
                ) from None
            self.metrics_port = server.port
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                await self._serve()
        except BaseExceptionGroup as failed:
            errors = [e for e in failed.exceptions if not isinstance(e, asyncio.CancelledError)]
            raise (errors or list(failed.exceptions))[0] from None
        finally:
            self._group = None
            if server is not None:
                await server.close()
            self.discovery.close()
            self.corrections.close()
            for model in self.models.values():
                model.close()
            self.ratelog.flush()  # what the rate limit held back since its last line, per key
        log.info(
            "stopped: %d messages in, %s",
            self.messages_in,
            ", ".join(f"{n}: {p.stats.published} published" for n, p in self.pipelines.items()),
        )

    async def _serve(self) -> None:
        """The body of :meth:`run` inside its TaskGroup: start, wait for stop, shut down in order."""
        for name, model in self.models.items():
            self._start_batcher(name, model)
        periodic = [
            self._spawn(self._every(self.config.bridge_info_interval_s, self._bridge_tick), "bridge"),
            self._spawn(
                self._every(self.config.status_interval_s, lambda: self.notifier.status(self.status_text())),
                "status",
            ),
            self._spawn(self._every(MEMORY_CHECK_S, self._memory_tick), "memory"),
            self._spawn(self._watch_models(), "watch-models"),
            self._spawn(Watchdog(self.notifier, self.liveness).run(), "watchdog"),
        ]
        periodic.append(self._spawn(self.retrainer.run(), "retrain"))  # edge/retrain.py
        if self.config.state.file is not None:
            restored = restore_state(self.config.state.file, self.pipelines)
            for name, pipeline in self.pipelines.items():  # announced at once, not at their next answer
                self.discovery.remember(name, pipeline.store.states)
            self.discovery.restore_seen(restored.last_seen)  # forget_after_days runs across restarts
            periodic.append(self._spawn(self._keep_state(), "state"))
        link_task = self._spawn(self._run_link(), "mqtt")
        try:
            await self._stop.wait()
            self.notifier.stopping("stopping: handing over and flushing in-flight batches")
            if self.cluster is not None:
                await self.cluster.leave()  # shared subscriptions handed over first
            self.engine.intake_open = False
            timeout = self.config.shutdown_timeout_s
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.gather(*(b.drained() for b in self.batchers.values())), timeout / 2
                )
            self.publish_bridge_info()
            await self.save_state()
            self.link.stop()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(link_task), timeout / 2)
        finally:
            for task in [*periodic, *self._tasks, *self._batcher_tasks.values(), link_task]:
                task.cancel()


# ---------------------------------------------------------------------- CLI


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("-c", "--config", required=True, type=Path, help="YAML configuration file")
    parser.add_argument("--mqtt-url", help="broker URL, overrides mqtt.url (also EDGE_INFER_MQTT_URL)")
    parser.add_argument(
        "--instance", help="cluster instance id, overrides cluster.instance (also EDGE_INFER_INSTANCE)"
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def _setup_logging(level: str) -> None:
    setup_logging(level, quiet=("aiomqtt", "asyncio", "edge.mqtt.client"))


def prepare(
    config_path: Path, mqtt_url: str | None, instance: str | None = None
) -> tuple[Config, dict[str, LoadedModel], dict[str, Pipeline]]:
    """Load config and models and build pipelines; raises ConfigError or ModelLoadError."""
    config = load_config(config_path, mqtt_url, instance)
    for warning in config_warnings(config, config_path):
        log.warning("%s", warning)
    check_startup(config)
    models = load_models(config)
    pipelines = build_pipelines(config, models)
    return config, models, pipelines


def describe_plan(config: Config, models: dict[str, LoadedModel], pipelines: dict[str, Pipeline]) -> str:
    lines = [
        f"broker: {mask_url(config.mqtt.url)} "
        f"(client id {config.instance_mqtt().resolved_client_id()}, MQTT {config.mqtt.protocol})"
    ]
    base = config.mqtt.base_topic
    cluster = config.cluster
    if cluster.enabled:
        instance = cluster.resolved_instance()
        members = (
            ", ".join(cluster.members) if cluster.members else f"discovered from {base}/instances/+/status"
        )
        lines.append(f"cluster: instance {instance}; members: {members}")
        base = f"{base}/instances/{instance}"
    lines.append(f"status: {base}/status, bridge info: {base}/bridge/info")
    lines.append("models:")
    for name, model in models.items():
        spec = model.spec
        lines.append(
            f"  {name}: {spec.path} v{spec.version} {spec.task}, {spec.layout} "
            f"[batch, {', '.join(map(str, spec.sample_shape))}], providers {','.join(model.providers)}"
        )
        if spec.labels:
            lines.append(f"    labels: {', '.join(spec.labels)}")
    lines.append("pipelines:")
    for name, p in pipelines.items():
        fcfg = p.cfg.features
        lines.append(f"  {name}: profile {p.cfg.source.profile} -> {fcfg.type} -> model {p.cfg.model}")
        mode = config.scale_out(name)
        if mode != "none":
            group = p.cfg.source.shared_group or cluster.shared_group
            how = f"shared subscription $share/{group}/" if mode == "shared" else "partition by device hash"
            lines.append(f"    scale-out: {how}")
        for f in p.filters:
            lines.append(f"    in:  {f} (qos {p.cfg.source.qos})")
        lines.append("    readings: " + ", ".join(f"{k}<-{v}" for k, v in p.readings.items()))
        lines.append(
            f"    out: {p.output_topic('{device}')} (qos {p.cfg.output.qos}, {p.cfg.output.publish})"
        )
    return "\n".join(lines)


def cli_check(argv: Sequence[str]) -> int:
    parser = _parser("edge-infer check", "Validate a config, load its models and print the plan.")
    args = parser.parse_args(argv)
    _setup_logging(args.log_level)
    try:
        config, models, pipelines = prepare(args.config, args.mqtt_url, args.instance)
    except (ConfigError, ModelLoadError) as exc:
        print(f"edge-infer: config error: {exc}", file=sys.stderr)
        return 2
    print(describe_plan(config, models, pipelines))
    print("config OK")
    for model in models.values():
        model.close()
    return 0


def cli_run(argv: Sequence[str]) -> int:
    args = _parser("edge-infer run", "Run the inference daemon.").parse_args(argv)
    _setup_logging(args.log_level)
    try:
        config, models, _ = prepare(args.config, args.mqtt_url, args.instance)
    except (ConfigError, ModelLoadError) as exc:
        print(f"edge-infer: config error: {exc}", file=sys.stderr)
        return 2

    async def main() -> None:
        daemon = Daemon(config, models, config_path=args.config, mqtt_url=args.mqtt_url)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, daemon.request_stop)
        loop.add_signal_handler(signal.SIGHUP, daemon.request_reload)
        log.info(
            "edge-infer %s starting: %d models, %d pipelines", __version__, len(models), len(daemon.pipelines)
        )
        await daemon.run()

    try:
        asyncio.run(main())
    except ConfigError as exc:
        print(f"edge-infer: config error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a task failed: logged with its name and traceback by Daemon._supervised
        print(f"edge-infer: stopped by an error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0
