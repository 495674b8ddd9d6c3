"""Corrections in service: commands from Home Assistant, the inputs they correct, the label store.

The daemon owns one :class:`Corrections`. It

* remembers, per pipeline and device, the last ``corrections.ring`` inputs the model answered
  (:class:`InputRing`: the window or vector, its sample time, the predicted label, the model
  version). Bounded: at most ``ring`` entries per device and ``pipelines.<name>.max_devices``
  devices per pipeline (the least recently answered device is forgotten first), so the memory
  is at most ``ring x max_devices x`` one input's float32 bytes per pipeline;
* checks every message on its command topics (:func:`edge.commands.command_filters`) with
  :class:`edge.commands.CommandValidator`: refusals are counted per reason (bridge/info
  ``corrections.refused``, ``edge_infer_corrections_refused_total{reason}``) and logged
  rate-limited; nothing a command carries can stop the daemon;
* stores an accepted correction with the newest input of that device (the answer Home Assistant
  shows when the user corrects it) through :meth:`LabelStore.add_async`, off the event loop, in
  :func:`corrections_dir` (the state directory);
* keeps the rolling agreement per pipeline (:class:`Agreement`).

"False alarm" on an anomaly output stores ``normal``, "Missed" stores ``anomaly``; on a
binary output (``homeassistant.binary_on``) "False alarm" stores the other label and "Missed"
``binary_on``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edge.commands import REASONS, Command, CommandValidator, PipelineCommands, Refusal, command_filters
from edge.decode import sanitise_segment
from edge.labelstore import FILENAME, NONE_OF_THESE, LabelStore, LabelStoreError

if TYPE_CHECKING:
    from edge.config import Config
    from edge.logsetup import RateLimitedLogger
    from edge.pipeline import Pipeline, WorkItem

log = logging.getLogger("edge.corrections")

ANOMALY = "anomaly"
NORMAL = "normal"
SUFFIXES = ("/correct/set", "/false_alarm/press", "/missed/press", "/retrain/press")
STORE_REASONS = ("no_input", "store_failed")  # accepted commands that could not be stored


def corrections_dir(config: Config) -> Path:
    """Where the label store lives: beside ``state.file`` when set, else the daemon's default
    state directory (``$STATE_DIRECTORY``, ``$XDG_STATE_HOME/edge-infer`` or
    ``~/.local/state/edge-infer``, as the MQTT subscriptions record). ``learn`` reads it there."""
    if config.state.file is not None:
        return config.state.file.parent
    folder = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    if folder:
        return Path(folder)
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "edge-infer"


@dataclass(frozen=True, slots=True)
class Seen:
    """One input the model answered."""

    device: str  # the device id (the ring is keyed by its topic segment)
    ts: float
    input: npt.NDArray[np.float32]
    predicted: str
    model_version: str


class InputRing:
    """The last ``size`` inputs per device, for at most ``max_devices`` devices (LRU)."""

    def __init__(self, size: int, max_devices: int) -> None:
        if size < 1 or max_devices < 1:
            raise ValueError("ring size and max_devices must be at least 1")
        self.size = size
        self.max_devices = max_devices
        self._devices: OrderedDict[str, deque[Seen]] = OrderedDict()
        self.evicted = 0

    def add(self, device: str, seen: Seen) -> None:
        ring = self._devices.get(device)
        if ring is None:
            if len(self._devices) >= self.max_devices:
                self._devices.popitem(last=False)
                self.evicted += 1
            ring = self._devices[device] = deque(maxlen=self.size)
        else:
            self._devices.move_to_end(device)
        ring.append(seen)

    def latest(self, device: str) -> Seen | None:
        ring = self._devices.get(device)
        return ring[-1] if ring else None

    def devices(self) -> list[str]:
        return list(self._devices)

    def entries(self) -> int:
        return sum(len(r) for r in self._devices.values())

    def __contains__(self, device: object) -> bool:
        return device in self._devices

    def __len__(self) -> int:
        return len(self._devices)


class _RingDevices:
    """The devices a pipeline accepts corrections for: those it has answered (its ring)."""

    def __init__(self, ring: InputRing) -> None:
        self.ring = ring

    def __contains__(self, device: object) -> bool:
        return device in self.ring

    def __len__(self) -> int:
        return len(self.ring)

    def __iter__(self) -> Iterator[str]:
        return iter(self.ring.devices())


class Agreement:
    """Rolling agreement of one pipeline: of the last ``window`` corrections, the fraction whose
    label equals the label the model had predicted for that input. ``none of these`` and a
    button press always disagree (the user says the answer was wrong)."""

    def __init__(self, window: int) -> None:
        self.recent: deque[bool] = deque(maxlen=window)

    def add(self, agreed: bool) -> None:
        self.recent.append(agreed)

    @property
    def count(self) -> int:
        return len(self.recent)

    @property
    def value(self) -> float | None:
        return sum(self.recent) / len(self.recent) if self.recent else None


def is_problem(value: float | None, count: int, holdout: float | None, minimum: int, margin: float) -> bool:
    """At least ``minimum`` corrections, and an agreement below ``holdout - margin``."""
    return value is not None and holdout is not None and count >= minimum and value < holdout - margin


def button_label(pipeline: Pipeline, action: str) -> str | None:
    """The label a "False alarm" / "Missed" press stores (None: the output has no buttons)."""
    spec = pipeline.spec
    if spec.task == "anomaly":
        return NORMAL if action == "false_alarm" else ANOMALY
    on = pipeline.cfg.homeassistant.binary_on
    if on is not None and spec.task == "classification":
        if action == "missed":
            return on
        others = [label for label in spec.labels if label != on]
        return others[0] if len(others) == 1 else None
    return None


def has_buttons(pipeline: Pipeline) -> bool:
    return button_label(pipeline, "false_alarm") is not None


def select_options(pipeline: Pipeline) -> tuple[str, ...]:
    """The labels a correction may name (the select's options, ``none of these`` added)."""
    spec = pipeline.spec
    if spec.task == "anomaly":
        return (NORMAL, ANOMALY)
    return tuple(spec.labels)


class Corrections:
    """Validation, input ring, storage and agreement for the daemon's correction commands."""

    def __init__(
        self,
        config: Config,
        pipelines: Callable[[], dict[str, Pipeline]],
        ratelog: RateLimitedLogger,
        spawn: Callable[[Any, str], None],
    ) -> None:
        self.config = config
        self.cfg = config.corrections
        self.base = config.mqtt.base_topic
        self._pipelines = pipelines
        self.ratelog = ratelog
        self.spawn = spawn
        self.rings: dict[str, InputRing] = {}
        self.agreement: dict[str, Agreement] = {}
        self.stored = 0
        self.not_stored: dict[str, int] = dict.fromkeys(STORE_REASONS, 0)
        self.directory = corrections_dir(config)
        self._store: LabelStore | None = None
        self.validator = CommandValidator(self.base, {})
        self.on_retrain: Callable[[str], None] | None = None  # edge/retrain.py's Retrainer.on_command
        self.rebuild()

    # -- wiring --------------------------------------------------------------
    def rebuild(self) -> None:
        """(Re)build the validator's view of the pipelines (at start and after a reload)."""
        specs: dict[str, PipelineCommands] = {}
        for name, pipeline in self._pipelines().items():
            ring = self.rings.get(name)
            if ring is None or ring.max_devices != pipeline.cfg.max_devices:
                ring = self.rings[name] = InputRing(self.cfg.ring, pipeline.cfg.max_devices)
            self.agreement.setdefault(name, Agreement(self.cfg.agreement_window))
            specs[name] = PipelineCommands(
                select_options(pipeline), _RingDevices(ring), has_buttons(pipeline)
            )
        for gone in [n for n in self.rings if n not in specs]:
            del self.rings[gone]
        self.validator.pipelines = specs

    def subscriptions(self) -> list[tuple[str, int]]:
        return [(f, 1) for f in command_filters(self.base)] if self.cfg.enabled else []

    def handles(self, topic: str) -> bool:
        return self.cfg.enabled and topic.startswith(self.base + "/") and topic.endswith(SUFFIXES)

    def seen(self, pipeline: Pipeline, item: WorkItem, fields: dict[str, Any], version: str) -> None:
        """An answered input (from the daemon's sink, on the event loop; one small copy), kept
        under the device's topic segment (what the command topic names)."""
        ring = self.rings.get(pipeline.name)
        if ring is None or not self.cfg.enabled:
            return
        label = fields.get("label")
        predicted = str(label) if label is not None else ""
        seen = Seen(item.device, item.ts, item.vector, predicted, version)  # a copy already (features)
        ring.add(sanitise_segment(item.device), seen)

    # -- commands ------------------------------------------------------------
    def on_message(self, topic: str, payload: bytes) -> None:
        """A message on a command topic (on the event loop). Never raises."""
        try:
            result = self.validator.check(topic, payload)
        except Exception as exc:  # a bug in the validator must not stop the daemon
            self.validator.refused["bad_payload"] += 1
            result = Refusal("bad_payload", f"{topic[:200]}: {type(exc).__name__}: {exc}")
        if isinstance(result, Refusal):
            self.ratelog.warning(
                "corrections", result.reason, "command refused (%s): %s", result.reason, result.detail
            )
            return
        self._accept(result)

    def _accept(self, command: Command) -> None:
        pipelines = self._pipelines()
        pipeline = pipelines.get(command.pipeline)
        if command.action == "retrain":
            if self.on_retrain is not None:  # handed over to the daemon's Retrainer (edge/retrain.py)
                self.on_retrain(command.pipeline)
            return
        if pipeline is None or command.device is None:
            return
        label = command.label if command.action == "correct" else button_label(pipeline, command.action)
        seen = self.rings[command.pipeline].latest(command.device)
        if label is None or seen is None:
            self._not_stored("no_input", f"{command.pipeline}/{command.device}: no answered input to correct")
            return
        agreed = command.action == "correct" and label == seen.predicted and label != NONE_OF_THESE
        self.agreement[command.pipeline].add(agreed)
        self.spawn(self._store_one(command, label, seen), "correction")

    async def _store_one(self, command: Command, label: str, seen: Seen) -> None:
        assert command.device is not None
        try:
            store = self._store
            if store is None:
                store = self._store = await asyncio.to_thread(
                    LabelStore,
                    self.directory / FILENAME,  # a directory not made yet would be taken for the file
                    max_rows=self.cfg.max_rows,
                    max_bytes=int(self.cfg.max_mib * 1024 * 1024),
                )
            await store.add_async(
                device=seen.device,
                pipeline=command.pipeline,
                predicted=seen.predicted,
                label=label,
                model_version=seen.model_version,
                input=seen.input,
                ts=seen.ts,
            )
        except (OSError, LabelStoreError, ValueError) as exc:  # sqlite3.Error is not an OSError
            self._not_stored("store_failed", f"{self.directory}: {type(exc).__name__}: {exc}")
            return
        except Exception as exc:  # sqlite3.Error and the like: counted, never fatal
            self._not_stored("store_failed", f"{self.directory}: {type(exc).__name__}: {exc}")
            return
        self.stored += 1
        log.info(
            "correction stored: %s/%s predicted %r, corrected to %r",
            command.pipeline,
            command.device[:40],
            seen.predicted,
            label,
        )

    def _not_stored(self, reason: str, detail: str) -> None:
        self.not_stored[reason] += 1
        self.ratelog.warning("corrections", reason, "correction not stored (%s): %s", reason, detail)

    # -- reporting -----------------------------------------------------------
    def judge(self, name: str) -> dict[str, Any]:
        """One pipeline's agreement, the model card's holdout accuracy and whether it is a problem:
        at least ``agreement_min`` corrections and an agreement below the holdout accuracy minus
        ``agreement_margin`` (never a problem for a card without a holdout accuracy)."""
        from edge.discovery import holdout_accuracy  # edge.discovery imports this module

        a = self.agreement[name]
        pipeline = self._pipelines().get(name)
        holdout = holdout_accuracy(pipeline.spec) if pipeline is not None else None
        value = a.value
        problem = is_problem(value, a.count, holdout, self.cfg.agreement_min, self.cfg.agreement_margin)
        return {
            "value": None if value is None else round(value, 4),
            "count": a.count,
            "holdout": holdout,
            "problem": problem,
        }

    def info(self) -> dict[str, Any]:
        """The ``corrections`` part of bridge/info."""
        return {
            "enabled": self.cfg.enabled,
            "accepted": self.validator.accepted,
            "stored": self.stored,
            "refused": {k: v for k, v in self.validator.refused.items() if v},
            "not_stored": {k: v for k, v in self.not_stored.items() if v},
            "store": str(self.directory),
            "ring_entries": sum(r.entries() for r in self.rings.values()),
            "agreement": {name: self.judge(name) for name in self.agreement if name in self.rings},
        }

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None


class CorrectionsCollector(Collector):
    """``edge_infer_corrections_*`` at scrape time, from the plain counters."""

    def __init__(self, corrections: Corrections) -> None:
        self.corrections = corrections

    def collect(self) -> Iterator[Metric]:
        c = self.corrections
        refused = CounterMetricFamily(
            "edge_infer_corrections_refused", "Correction commands refused, by reason.", labels=["reason"]
        )
        for reason in REASONS:
            refused.add_metric([reason], c.validator.refused.get(reason, 0))
        yield refused
        yield CounterMetricFamily(
            "edge_infer_corrections_accepted", "Correction commands accepted.", value=c.validator.accepted
        )
        yield CounterMetricFamily(
            "edge_infer_corrections_stored", "Corrections written to the label store.", value=c.stored
        )
        failed = CounterMetricFamily(
            "edge_infer_corrections_not_stored",
            "Accepted corrections not stored, by reason.",
            labels=["reason"],
        )
        for reason in STORE_REASONS:
            failed.add_metric([reason], c.not_stored[reason])
        yield failed
        agreement = GaugeMetricFamily(
            "edge_infer_corrections_agreement",
            "Fraction of the recent corrections that agreed with the prediction, per pipeline.",
            labels=["pipeline"],
        )
        for name, a in sorted(c.agreement.items()):
            if a.value is not None and name in c.rings:
                agreement.add_metric([name], a.value)
        yield agreement


def correction_components(
    command_topic: str, options: tuple[str, ...], buttons: bool, name: str
) -> list[tuple[str, str, dict[str, Any]]]:
    """The correction entities of one output on one device, as ``(suffix, platform, config)``:
    the ``select`` (``options`` plus ``none of these``) and, with ``buttons``, "False alarm" and
    "Missed". ``command_topic`` is ``<base>/<pipeline>/<device segment>``. No ``state_topic``:
    Home Assistant keeps the select optimistic (it shows the last correction made)."""
    out: list[tuple[str, str, dict[str, Any]]] = [
        (
            "correct",
            "select",
            {
                "name": f"Correct {name}",
                "command_topic": f"{command_topic}/correct/set",
                "options": [*options, NONE_OF_THESE],
                "entity_category": "config",
                "icon": "mdi:tag-edit",
            },
        )
    ]
    if buttons:
        for action, title, icon in (
            ("false_alarm", "False alarm", "mdi:alarm-off"),
            ("missed", "Missed", "mdi:alarm-plus"),
        ):
            out.append(
                (
                    action,
                    "button",
                    {
                        "name": f"{title} ({name})",
                        "command_topic": f"{command_topic}/{action}/press",
                        "payload_press": "PRESS",
                        "entity_category": "config",
                        "icon": icon,
                    },
                )
            )
    return out


def correction_fields(pipeline: Pipeline, device: str) -> dict[str, Any]:
    """The :class:`edge.discovery_payloads.OutputEntity` fields that announce the correction entities."""
    return {
        "command_topic": f"{pipeline.base}/{pipeline.name}/{sanitise_segment(device)}",
        "correct_options": select_options(pipeline),
        "correct_buttons": has_buttons(pipeline),
    }


def agreement_components(uid: str, eid: str, info_topic: str, pipeline: str) -> dict[str, dict[str, Any]]:
    """The bridge device's diagnostics of one pipeline's rolling agreement (read from bridge/info):
    a sensor (%, unknown before the first correction) and a ``problem`` binary sensor."""
    key = "agreement_" + "".join(c if c.isalnum() or c in "_-" else "_" for c in pipeline)
    entry = "value_json.get('corrections', {}).get('agreement', {}).get(" + json.dumps(pipeline) + ", {})"
    title = pipeline.replace("_", " ").capitalize()
    common = {"state_topic": info_topic, "entity_category": "diagnostic"}
    return {
        key: {
            "platform": "sensor",
            "name": f"{title} agreement with corrections",
            "unique_id": f"{uid}_{key}",
            "default_entity_id": f"sensor.{eid}_{key}",
            "unit_of_measurement": "%",
            "state_class": "measurement",
            "suggested_display_precision": 1,
            "icon": "mdi:account-check-outline",
            "value_template": "{% set a = " + entry + ".get('value') %}"
            "{{ (a * 100) | round(2) if a is number else 'None' }}",
            **common,
        },
        f"{key}_problem": {
            "platform": "binary_sensor",
            "name": f"{title} disagrees with corrections",
            "unique_id": f"{uid}_{key}_problem",
            "default_entity_id": f"binary_sensor.{eid}_{key}_problem",
            "device_class": "problem",
            "payload_on": "ON",
            "payload_off": "OFF",
            "value_template": "{{ 'ON' if " + entry + ".get('problem') else 'OFF' }}",
            **common,
        },
    }
