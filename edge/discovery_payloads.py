"""Home Assistant MQTT discovery: pure builders of the messages that make predictions appear as entities.

Nothing here touches the network. The daemon's MQTT layer publishes what these functions return and
feeds back what it reads from the broker (see ``docs/homeassistant.md`` for the whole life cycle).

Shape of what is announced, following Home Assistant's current MQTT documentation:

* **Device-based discovery**: one retained message per Home Assistant device on
  ``<prefix>/device/<object_id>/config`` with the device (``dev``), the origin (``o``) and all of
  its entities as components (``cmps``), each with a ``platform``, a stable ``unique_id`` and a
  ``default_entity_id`` (``object_id`` is deprecated).
* **A bridge device** for the daemon itself with diagnostic sensors read from the retained
  ``<base>/bridge/info`` JSON (see :func:`bridge_info_payload`).
* **One device per physical source device**, linked ``via_device`` to the bridge, with per pipeline
  output: the label as an ``enum`` sensor with ``options`` (classification), the value with unit and
  ``state_class`` (regression), a ``binary_sensor`` (anomaly, or a classification declared binary),
  and confidence / anomaly score as diagnostic sensors.
* **Availability** as a list, ``availability_mode: all``: the daemon's ``<base>/status`` and, when
  known, the source device's own availability topic. ``expire_after`` comes from the cadence.
* **Removal**: an empty retained payload removes a whole device; a component that disappears from a
  device that stays is first announced as ``{"platform": ...}`` alone and then left out, which is the
  documented way to remove a single component. :class:`DiscoveryTracker` works out both.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from edge.commands import button_discovery
from edge.corrections import agreement_components, correction_components
from edge.manifest import Task
from edge.quality import quality_components

ORIGIN_NAME: Final = "edge-infer"
DEFAULT_DISCOVERY_PREFIX: Final = "homeassistant"
DEFAULT_HA_STATUS_TOPIC: Final = "homeassistant/status"
PAYLOAD_ONLINE: Final = "online"
PAYLOAD_OFFLINE: Final = "offline"
ANOMALY_LABEL: Final = "anomaly"
NORMAL_LABEL: Final = "normal"
UNKNOWN_LABEL: Final = "unknown"  # edge.outputs.UNKNOWN_LABEL: an open-set classifier's unlike input

Platform = Literal["sensor", "binary_sensor", "select", "button"]

# Keys of the retained ``<base>/bridge/info`` JSON that the bridge's diagnostic sensors read.
BRIDGE_INFO_KEYS: Final = ("version", "started", "messages_per_s", "drops", "latency_ms")

_TOPIC_ID = re.compile(r"[^a-zA-Z0-9_-]+")
_SLUG = re.compile(r"[^a-z0-9]+")

# Units Home Assistant accepts per sensor device class, and the state classes each class allows.
# Written from Home Assistant's sensor documentation (device classes and their units) for the
# classes a smart-home prediction plausibly has; a class not listed here is passed through unchecked.
# Since Home Assistant 2025.7 a unit that does not fit its device class is an error.
SENSOR_DEVICE_CLASS_UNITS: Final[Mapping[str, frozenset[str | None]]] = {
    "apparent_power": frozenset({"VA", "kVA", "mVA"}),
    "aqi": frozenset({None}),
    "battery": frozenset({"%"}),
    "carbon_dioxide": frozenset({"ppm"}),
    "carbon_monoxide": frozenset({"ppm"}),
    "current": frozenset({"A", "mA"}),
    "distance": frozenset({"km", "m", "cm", "mm", "mi", "nmi", "yd", "ft", "in"}),
    "duration": frozenset({"d", "h", "min", "s", "ms"}),
    "energy": frozenset({"Wh", "kWh", "MWh", "GWh", "TWh", "MJ", "GJ", "cal", "kcal", "Mcal", "Gcal"}),
    "frequency": frozenset({"Hz", "kHz", "MHz", "GHz"}),
    "gas": frozenset({"m³", "ft³", "CCF"}),
    "humidity": frozenset({"%"}),
    "illuminance": frozenset({"lx"}),
    "moisture": frozenset({"%"}),
    "ph": frozenset({None}),
    "pm1": frozenset({"µg/m³"}),
    "pm10": frozenset({"µg/m³"}),
    "pm25": frozenset({"µg/m³"}),
    "power": frozenset({"W", "kW", "MW", "GW", "TW"}),
    "power_factor": frozenset({"%", None}),
    "pressure": frozenset({"Pa", "kPa", "hPa", "bar", "cbar", "mbar", "mmHg", "inHg", "psi"}),
    "signal_strength": frozenset({"dB", "dBm"}),
    "sound_pressure": frozenset({"dB", "dBA"}),
    "temperature": frozenset({"°C", "°F", "K"}),
    "volatile_organic_compounds": frozenset({"µg/m³"}),
    "volatile_organic_compounds_parts": frozenset({"ppm", "ppb"}),
    "voltage": frozenset({"V", "mV", "kV"}),
    "volume": frozenset({"L", "mL", "gal", "fl. oz.", "m³", "ft³", "CCF"}),
    "volume_flow_rate": frozenset({"m³/h", "ft³/min", "L/min", "gal/min"}),
    "water": frozenset({"L", "m³", "ft³", "CCF", "gal"}),
    "weight": frozenset({"kg", "g", "mg", "µg", "oz", "lb", "st"}),
}
_ANY_STATE_CLASS: Final = frozenset({"measurement", "total", "total_increasing"})
_TOTALS: Final = frozenset({"total", "total_increasing"})
SENSOR_DEVICE_CLASS_STATE_CLASSES: Final[Mapping[str, frozenset[str]]] = {
    **{name: frozenset({"measurement"}) for name in SENSOR_DEVICE_CLASS_UNITS},
    "distance": _ANY_STATE_CLASS,
    "duration": _ANY_STATE_CLASS,
    "weight": _ANY_STATE_CLASS,
    "energy": _TOTALS,
    "gas": _TOTALS,
    "volume": _TOTALS,
    "water": _TOTALS,
}
BINARY_SENSOR_DEVICE_CLASSES: Final = frozenset(
    {
        "battery", "battery_charging", "carbon_monoxide", "cold", "connectivity", "door",
        "garage_door", "gas", "heat", "light", "lock", "moisture", "motion", "moving", "occupancy",
        "opening", "plug", "power", "presence", "problem", "running", "safety", "smoke", "sound",
        "tamper", "update", "vibration", "window",
    }
)  # fmt: skip


# A retained discovery config read back from the broker larger than this is junk, not ours.
MAX_READBACK_BYTES = 256 * 1024


class DiscoveryError(ValueError):
    """A description that cannot be announced (an empty id, a classification without labels)."""


@dataclass(frozen=True)
class DiscoveryMessage:
    """One MQTT message to publish. ``payload == ""`` removes what was announced on ``topic``."""

    topic: str
    payload: str
    retain: bool = True
    qos: int = 1

    @property
    def is_removal(self) -> bool:
        return self.payload == ""


@dataclass(frozen=True)
class AvailabilityTopic:
    """An availability topic Home Assistant watches (the source device's, e.g. Zigbee2MQTT's);
    not :class:`edge.decode.Availability`, which is a device's online/offline event."""

    topic: str
    payload_available: str = PAYLOAD_ONLINE
    payload_not_available: str = PAYLOAD_OFFLINE
    value_template: str | None = None  # e.g. "{{ value_json.state }}" for JSON availability payloads

    def config(self) -> dict[str, str]:
        out = {
            "topic": self.topic,
            "payload_available": self.payload_available,
            "payload_not_available": self.payload_not_available,
        }
        if self.value_template is not None:
            out["value_template"] = self.value_template
        return out


@dataclass(frozen=True)
class BridgeInfo:
    """What the daemon knows about itself."""

    version: str
    base_topic: str = "edge-infer"
    instance_id: str = "default"
    discovery_prefix: str = DEFAULT_DISCOVERY_PREFIX
    name: str | None = None  # Home Assistant device name; default "edge-infer" (+ instance id)
    support_url: str | None = None  # origin "url": where users get help
    configuration_url: str | None = None  # device "configuration_url", e.g. the add-on page

    def __post_init__(self) -> None:
        if not self.instance_id.strip():
            raise DiscoveryError("bridge instance_id must not be empty")
        for topic in (self.base_topic, self.discovery_prefix):
            if not topic or any(c in topic for c in "+#\0") or topic.startswith("/") or topic.endswith("/"):
                raise DiscoveryError(f"{topic!r} is not a plain topic prefix")

    @property
    def status_topic(self) -> str:
        """``<base>/status``: ``online``/``offline``, retained; also the daemon's last will."""
        return f"{self.base_topic}/status"

    @property
    def info_topic(self) -> str:
        """``<base>/bridge/info``: retained JSON made by :func:`bridge_info_payload`."""
        return f"{self.base_topic}/bridge/info"

    @property
    def identifier(self) -> str:
        """The bridge device's identifier; also the prefix of every object id and unique id."""
        return "edge_infer_" + topic_id(self.instance_id)

    @property
    def display_name(self) -> str:
        if self.name:
            return self.name
        return ORIGIN_NAME if self.instance_id == "default" else f"{ORIGIN_NAME} {self.instance_id}"

    @property
    def discovery_subscription(self) -> str:
        """Filter to read back retained device configs (see :meth:`DiscoveryTracker.observe_retained`)."""
        return f"{self.discovery_prefix}/device/+/config"

    def origin(self) -> dict[str, str]:
        out = {"name": ORIGIN_NAME, "sw": self.version}
        if self.support_url:
            out["url"] = self.support_url
        return out


@dataclass(frozen=True)
class Identity:
    """How the source family's own Home Assistant integration identifies a device: MQTT
    ``identifiers`` (Zigbee2MQTT's ``zigbee2mqtt_<ieee>``) and/or ``connections`` such as
    ``("mac", "aa:bb:cc:dd:ee:ff")`` (Tasmota, ESPHome, Shelly). Home Assistant's device registry
    puts entities whose device shares one identifier or one connection on the same device."""

    identifiers: tuple[str, ...] = ()
    connections: tuple[tuple[str, str], ...] = ()
    name: str | None = None  # the name the family gives the device (the same as its integration's)


@dataclass(frozen=True)
class SourceDevice:
    """A physical device whose readings feed pipelines (names come from its device profile).

    With an ``identity`` its entities are attached to the family's own Home Assistant device
    (the plug's page); without one edge-infer makes its own device, linked ``via_device`` to the
    bridge."""

    id: str
    name: str | None = None
    model: str | None = None
    manufacturer: str | None = None
    suggested_area: str | None = None
    availability: AvailabilityTopic | None = None
    identity: Identity | None = None

    @property
    def display_name(self) -> str:
        return self.name or self.id

    @property
    def linked(self) -> bool:
        return self.identity is not None and bool(self.identity.identifiers or self.identity.connections)


@dataclass(frozen=True)
class OutputEntity:
    """One pipeline's output for one source device, as Home Assistant should show it.

    The state topic carries the prediction JSON: ``label``, ``confidence``, ``value``, ``score``,
    ``model``, ``model_version``, ``latency_ms``, ``ts``; fields that do not apply are ``null``.

    * classification: ``labels`` become the enum ``options``; a ``null`` label shows as unknown.
      With ``open_set`` (a model with an OOD score) ``"unknown"`` is one more option, the answer's
      label when its input is unlike the training data, and ``ood_score`` an attribute.
      With ``explain`` (``output.explain`` on) the answer's ``explain`` attribution is one more
      attribute (of a regression's or binary sensor's entity too).
      With ``binary_on`` set it is a ``binary_sensor`` instead (on when ``label == binary_on``),
      e.g. labels ``["empty", "occupied"]``, ``binary_on="occupied"``, ``device_class="occupancy"``.
    * regression: ``value`` with ``unit``, ``device_class`` and ``state_class`` (default measurement).
    * anomaly: a ``binary_sensor`` (``device_class`` default ``problem``) that is on when ``label`` is
      ``"anomaly"`` (off for ``"normal"``), or, with a ``null`` label, when ``score >= threshold``;
      plus the score as a diagnostic sensor.
    """

    pipeline: str
    task: Task
    state_topic: str
    labels: tuple[str, ...] = ()
    unit: str | None = None
    device_class: str | None = None
    state_class: str | None = None
    binary_on: str | None = None
    threshold: float | None = None
    cadence_s: float | None = None  # longest expected gap between two publishes (heartbeat)
    name: str | None = None  # entity name; default: the pipeline name, humanised
    icon: str | None = None
    display_precision: int | None = None
    # Readable class names, one per label (classification); the state shows these, the raw label
    # stays in the entity's ``label`` attribute. Empty: the raw labels.
    label_names: tuple[str, ...] = ()
    open_set: bool = False  # the model has an OOD score: ``unknown`` is a state, the score an attribute
    explain: bool = False  # output.explain is on: the answer's ``explain`` is an attribute of the entity
    inputs_watched: bool = False  # training_stats: a problem sensor on <state_topic>/inputs (edge/watch.py)
    # Corrections (edge/corrections.py): ``<base>/<pipeline>/<device>``, or None for no correction entities
    command_topic: str | None = None
    correct_options: tuple[str, ...] = ()
    correct_buttons: bool = False

    @property
    def display_name(self) -> str:
        return self.name or humanise(self.pipeline)

    @property
    def readable_labels(self) -> dict[str, str]:
        """raw label -> readable name, when ``label_names`` fits (one distinct name per label)."""
        names = self.label_names
        if len(names) != len(self.labels) or len(set(names)) != len(names) or not all(names):
            return {}
        return {raw: name for raw, name in zip(self.labels, names, strict=True) if raw != name}

    @property
    def platform(self) -> Platform:
        if self.task == "anomaly" or self.binary_on is not None:
            return "binary_sensor"
        return "sensor"


@dataclass(frozen=True)
class Component:
    """One entity inside a device discovery payload."""

    key: str  # the key under "cmps"; part of Home Assistant's discovery id
    platform: Platform
    config: dict[str, Any]


# --------------------------------------------------------------------------------------------- ids


def topic_id(text: str) -> str:
    """A stable id made of ``[a-zA-Z0-9_-]`` (what discovery topics and component keys allow).

    Text that is already clean stays as it is; otherwise the cleaned text gets a short hash of the
    original so that ``"living room"`` and ``"living_room"`` never collide.
    """
    if not text:
        raise DiscoveryError("an id must not be empty")
    clean = _TOPIC_ID.sub("_", text).strip("_")
    if clean == text:
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:6]
    return f"{clean}_{digest}" if clean else digest


def slug(text: str) -> str:
    """A lower-case entity object id (``[a-z0-9_]``) for ``default_entity_id``."""
    return _SLUG.sub("_", text.lower()).strip("_") or "edge_infer"


def humanise(name: str) -> str:
    words = re.sub(r"[_\-.]+", " ", name).strip()
    return words[:1].upper() + words[1:] if words else name


def device_identifier(bridge: BridgeInfo, device: SourceDevice) -> str:
    return f"{bridge.identifier}_{topic_id(device.id)}"


def device_topic(bridge: BridgeInfo, device: SourceDevice | None = None) -> str:
    """The device discovery topic of ``device``, or of the bridge when ``device`` is ``None``."""
    object_id = bridge.identifier if device is None else device_identifier(bridge, device)
    return f"{bridge.discovery_prefix}/device/{object_id}/config"


def expire_after(cadence_s: float | None) -> int | None:
    """Seconds without a message after which Home Assistant shows the entity unavailable.

    Three missed publishes, and never less than a minute more than one cadence, so that jitter and
    a broker reconnect do not flap the entity. ``None`` when there is no cadence (never expires).
    """
    if cadence_s is None or cadence_s <= 0 or not math.isfinite(cadence_s):
        return None
    return math.ceil(max(3 * cadence_s, cadence_s + 60))


# ------------------------------------------------------------------------------------- validation


def check_output(output: OutputEntity) -> list[str]:
    """Problems Home Assistant would reject or warn about; empty when the output is fine.

    :func:`device_discovery` never announces a combination listed here: it drops the offending
    ``device_class``/``state_class`` instead. Call this at config load to tell the user.
    """
    problems: list[str] = []
    where = f"pipeline {output.pipeline!r}"
    if output.task == "classification" and not output.labels:
        problems.append(f"{where}: a classification needs labels (they become the enum options)")
    if output.binary_on is not None and output.binary_on not in output.labels and output.labels:
        problems.append(f"{where}: binary_on {output.binary_on!r} is not one of the labels {output.labels}")
    if output.platform == "binary_sensor":
        if output.device_class is not None and output.device_class not in BINARY_SENSOR_DEVICE_CLASSES:
            problems.append(f"{where}: {output.device_class!r} is not a binary_sensor device class")
        return problems
    if output.task != "regression":
        if output.device_class not in (None, "enum"):
            problems.append(f"{where}: a classification sensor is an enum; device_class is ignored")
        return problems
    device_class, unit, state_class = output.device_class, output.unit, output.state_class
    if state_class is not None and state_class not in _ANY_STATE_CLASS:
        problems.append(f"{where}: state_class {state_class!r} is not measurement, total or total_increasing")
    if device_class is None or device_class not in SENSOR_DEVICE_CLASS_UNITS:
        return problems
    allowed_units = SENSOR_DEVICE_CLASS_UNITS[device_class]
    if unit not in allowed_units:
        shown = ", ".join(sorted(u if u is not None else "no unit" for u in allowed_units))
        problems.append(f"{where}: unit {unit!r} does not fit device class {device_class!r} ({shown})")
    allowed_states = SENSOR_DEVICE_CLASS_STATE_CLASSES[device_class]
    effective = state_class or _default_state_class(device_class)
    if effective not in allowed_states:
        problems.append(
            f"{where}: state_class {effective!r} does not fit device class {device_class!r} "
            f"({', '.join(sorted(allowed_states))})"
        )
    return problems


def _default_state_class(device_class: str | None) -> str:
    allowed = SENSOR_DEVICE_CLASS_STATE_CLASSES.get(device_class or "", _ANY_STATE_CLASS)
    return "measurement" if "measurement" in allowed else "total"


# ---------------------------------------------------------------------------------------- builders


def _field(name: str) -> str:
    # dict.get: a missing key renders as None (unknown) instead of an undefined-variable warning.
    return f"value_json.get('{name}')"


def _explain_attributes(output: OutputEntity, main: dict[str, Any]) -> None:
    """With ``explain`` on: the answer's attribution (and its model) as the entity's attributes."""
    if output.explain:
        main["json_attributes_topic"] = output.state_topic
        main["json_attributes_template"] = (
            "{{ {'model': " + _field("model") + ", 'model_version': " + _field("model_version")
            + ", 'explain': " + _field("explain") + "} | tojson }}"
        )  # fmt: skip


def _common(output: OutputEntity) -> dict[str, Any]:
    out: dict[str, Any] = {"state_topic": output.state_topic}
    expiry = expire_after(output.cadence_s)
    if expiry is not None:
        out["expire_after"] = expiry
    return out


def output_components(bridge: BridgeInfo, device: SourceDevice, output: OutputEntity) -> list[Component]:
    """The entities of one pipeline output on one device (main entity first, diagnostics after)."""
    if output.task == "classification" and not output.labels:
        raise DiscoveryError(f"pipeline {output.pipeline!r}: a classification needs labels")
    base_key = topic_id(output.pipeline)
    base_uid = f"{device_identifier(bridge, device)}_{base_key}".lower()
    base_eid = f"{slug(device.display_name)}_{slug(output.pipeline)}"
    name = output.display_name
    components: list[Component] = []

    def add(kind: str, platform: Platform, config: dict[str, Any]) -> None:
        suffix = "" if kind == "state" else f"_{kind}"
        full = {
            "platform": platform,
            "unique_id": f"{base_uid}{suffix}",
            "default_entity_id": f"{platform}.{base_eid}{suffix}",
            **_common(output),
            **config,
        }
        components.append(Component(f"{base_key}{suffix}", platform, full))

    main: dict[str, Any] = {"name": name}
    if output.icon:
        main["icon"] = output.icon
    if output.platform == "binary_sensor":
        device_class = output.device_class or ("problem" if output.task == "anomaly" else None)
        if device_class in BINARY_SENSOR_DEVICE_CLASSES:
            main["device_class"] = device_class
        main["payload_on"] = "ON"
        main["payload_off"] = "OFF"
        main["value_template"] = _binary_template(output)
        _explain_attributes(output, main)
        add("state", "binary_sensor", main)
    elif output.task == "classification":
        readable = output.readable_labels
        main["device_class"] = "enum"
        main["options"] = [readable.get(label, label) for label in output.labels]
        if readable:
            names = json.dumps(readable, ensure_ascii=False, sort_keys=True)
            main["value_template"] = (
                "{% set l = " + _field("label") + " %}{{ 'None' if l is none else " + names + ".get(l, l) }}"
            )
        else:
            main["value_template"] = "{{ " + _field("label") + " }}"
        # the raw label (what automations compare), the model and its version as attributes
        main["json_attributes_topic"] = output.state_topic
        main["json_attributes_template"] = (
            "{{ {'label': " + _field("label") + ", 'model': " + _field("model")
            + ", 'model_version': " + _field("model_version")
            + (", 'ood_score': " + _field("ood_score") if output.open_set else "")
            + (", 'explain': " + _field("explain") if output.explain else "")
            + "} | tojson }}"
        )  # fmt: skip
        if output.open_set:  # an answer unlike the training data: label "unknown", its ood_score
            main["options"].append(UNKNOWN_LABEL)
        add("state", "sensor", main)
    else:  # regression
        device_class = output.device_class
        state_class = output.state_class
        if device_class is not None and device_class in SENSOR_DEVICE_CLASS_UNITS:
            if output.unit not in SENSOR_DEVICE_CLASS_UNITS[device_class]:
                device_class = None  # a unit that does not fit is an error in current Home Assistant
            elif state_class not in SENSOR_DEVICE_CLASS_STATE_CLASSES[device_class]:
                state_class = None  # None stays None: the default is chosen below
        if state_class is not None and state_class not in _ANY_STATE_CLASS:
            state_class = None
        if device_class is not None:
            main["device_class"] = device_class
        if output.unit is not None:
            main["unit_of_measurement"] = output.unit
        main["state_class"] = state_class or _default_state_class(device_class)
        if output.display_precision is not None:
            main["suggested_display_precision"] = output.display_precision
        main["value_template"] = "{{ " + _field("value") + " }}"
        _explain_attributes(output, main)
        add("state", "sensor", main)

    if output.task == "classification":
        add(
            "confidence",
            "sensor",
            {
                "name": f"{name} confidence",
                "entity_category": "diagnostic",
                "unit_of_measurement": "%",
                "state_class": "measurement",
                "suggested_display_precision": 1,
                "icon": "mdi:percent-circle-outline",
                "value_template": (
                    "{% set c = " + _field("confidence") + " %}"
                    "{{ (c * 100) | round(2) if c is number else 'None' }}"
                ),
            },
        )
    elif output.task == "anomaly":
        add(
            "score",
            "sensor",
            {
                "name": f"{name} score",
                "entity_category": "diagnostic",
                "state_class": "measurement",
                "suggested_display_precision": 3,
                "icon": "mdi:chart-bell-curve",
                "value_template": "{{ " + _field("score") + " }}",
            },
        )
    if output.inputs_watched:
        components.append(inputs_component(base_key, base_uid, base_eid, name, output.state_topic))
    if output.command_topic is not None:  # the select and buttons of edge/corrections.py
        for suffix, platform, config in correction_components(
            output.command_topic, output.correct_options, output.correct_buttons, name
        ):
            full = {
                "platform": platform,
                "unique_id": f"{base_uid}_{suffix}",
                "default_entity_id": f"{platform}.{base_eid}_{suffix}",
                **config,
            }
            components.append(Component(f"{base_key}_{suffix}", platform, full))  # type: ignore[arg-type]
    return components


def inputs_component(key: str, uid: str, eid: str, name: str, state_topic: str) -> Component:
    """The "Inputs unlike training" problem sensor; its attributes name each feature's diagnostic."""
    topic = state_topic + "/inputs"
    config = {
        "platform": "binary_sensor",
        "unique_id": f"{uid}_inputs",
        "default_entity_id": f"binary_sensor.{eid}_inputs",
        "name": f"{name} inputs unlike training",
        "device_class": "problem",
        "entity_category": "diagnostic",
        "state_topic": topic,
        "value_template": "{{ value_json.problem }}",
        "payload_on": "ON",
        "payload_off": "OFF",
        "json_attributes_topic": topic,
        "json_attributes_template": "{{ {'diagnostics': value_json.diagnostics} | tojson }}",
    }
    return Component(f"{key}_inputs", "binary_sensor", config)


def _binary_template(output: OutputEntity) -> str:
    on = output.binary_on if output.binary_on is not None else ANOMALY_LABEL
    on_lit = json.dumps(on)
    parts = ["{% set l = " + _field("label") + " %}"]
    if output.task == "anomaly" and output.threshold is not None:
        parts.append("{% set s = " + _field("score") + " %}")
        limit = repr(float(output.threshold))
        parts.append(
            "{% if l is none %}"
            "{{ 'None' if s is not number else ('ON' if s >= " + limit + " else 'OFF') }}"
            "{% else %}{{ 'ON' if l == " + on_lit + " else 'OFF' }}{% endif %}"
        )
    else:
        parts.append("{{ 'None' if l is none else ('ON' if l == " + on_lit + " else 'OFF') }}")
    return "".join(parts)


def _availability(bridge: BridgeInfo, device: SourceDevice | None) -> dict[str, Any]:
    entries = [AvailabilityTopic(bridge.status_topic).config()]
    if device is not None and device.availability is not None:
        entries.append(device.availability.config())
    return {"availability": entries, "availability_mode": "all"}


def device_config(
    bridge: BridgeInfo, device: SourceDevice, outputs: Sequence[OutputEntity]
) -> dict[str, Any]:
    """The device discovery payload (as a dict) of one source device and its pipeline outputs."""
    if not outputs:
        raise DiscoveryError(f"device {device.id!r}: nothing to announce (no outputs)")
    dev: dict[str, Any]
    if device.linked:
        # The family's own device: only what identifies it and the name it has there, so that
        # neither config overwrites the other's model, manufacturer or via_device.
        assert device.identity is not None
        dev = {}
        if device.identity.identifiers:
            dev["identifiers"] = list(device.identity.identifiers)
        if device.identity.connections:
            dev["connections"] = [list(c) for c in device.identity.connections]
        if device.identity.name:
            dev["name"] = device.identity.name
    else:
        dev = {
            "identifiers": [device_identifier(bridge, device)],
            "name": device.display_name,
            "via_device": bridge.identifier,
            "manufacturer": device.manufacturer or "edge-infer",
            "model": device.model or "Predictions",
        }
        if device.suggested_area:
            dev["suggested_area"] = device.suggested_area
    cmps: dict[str, Any] = {}
    for output in sorted(outputs, key=lambda o: o.pipeline):
        for component in output_components(bridge, device, output):
            if component.key in cmps:
                raise DiscoveryError(f"device {device.id!r}: two outputs make component {component.key!r}")
            cmps[component.key] = component.config
    return {"dev": dev, "o": bridge.origin(), **_availability(bridge, device), "cmps": cmps}


def bridge_config(
    bridge: BridgeInfo,
    models: Sequence[str] = (),
    corrected: Sequence[str] = (),
    *,
    quality: Mapping[str, Sequence[str]] | None = None,
    retrain: Sequence[RetrainEntity] = (),
) -> dict[str, Any]:
    """The bridge device's discovery payload (as a dict): diagnostics read from ``bridge/info``,
    with a version and a holdout accuracy sensor per model in ``models``."""
    dev: dict[str, Any] = {
        "identifiers": [bridge.identifier],
        "name": bridge.display_name,
        "manufacturer": ORIGIN_NAME,
        "model": "Edge inference bridge",
        "sw_version": bridge.version,
    }
    if bridge.configuration_url:
        dev["configuration_url"] = bridge.configuration_url
    uid = bridge.identifier
    eid = slug(bridge.display_name)

    def sensor(key: str, name: str, info_key: str, **extra: Any) -> tuple[str, dict[str, Any]]:
        return key, {
            "platform": "sensor",
            "name": name,
            "unique_id": f"{uid}_{key}",
            "default_entity_id": f"sensor.{eid}_{key}",
            "state_topic": bridge.info_topic,
            "value_template": "{{ " + _field(info_key) + " }}",
            "entity_category": "diagnostic",
            **extra,
        }

    cmps = dict(
        [
            sensor("version", "Version", "version", icon="mdi:tag-outline"),
            sensor("started", "Started", "started", device_class="timestamp", icon="mdi:clock-start"),
            sensor("messages_per_s", "Messages per second", "messages_per_s", unit_of_measurement="msg/s",
                   state_class="measurement", suggested_display_precision=1, icon="mdi:swap-vertical"),
            sensor("drops", "Dropped messages", "drops", state_class="total_increasing",
                   icon="mdi:delete-alert-outline"),
            sensor("latency", "Inference latency", "latency_ms", device_class="duration",
                   unit_of_measurement="ms", state_class="measurement", suggested_display_precision=2),
        ]
    )  # fmt: skip
    for model in sorted(set(models)):
        key = f"model_{topic_id(model)}"
        model_field = "value_json.get('models', {}).get(" + json.dumps(model) + ", {})"
        label = humanise(model)
        cmps[f"{key}_version"] = sensor(
            f"{key}_version", f"{label} model version", "version", icon="mdi:tag-outline"
        )[1]
        cmps[f"{key}_version"]["value_template"] = "{{ " + model_field + ".get('version') }}"
        cmps[f"{key}_accuracy"] = sensor(
            f"{key}_accuracy",
            f"{label} holdout accuracy",
            "accuracy",
            unit_of_measurement="%",
            suggested_display_precision=1,
            icon="mdi:bullseye-arrow",
        )[1]
        cmps[f"{key}_accuracy"]["value_template"] = (
            "{% set a = " + model_field + ".get('accuracy') %}"
            "{{ (a * 100) | round(2) if a is number else 'None' }}"
        )  # fmt: skip
    for pipeline in corrected:  # pipelines taking corrections: their rolling agreement
        cmps.update(agreement_components(uid, eid, bridge.info_topic, pipeline))
    for model, kinds in sorted((quality or {}).items()):  # edge/quality.py: model -> its entities
        key = f"model_{topic_id(model)}"
        cmps.update(quality_components(uid, eid, bridge.info_topic, model, kinds, key=key))
    for entity in retrain:  # learnable pipelines: Retrain now, training state, last trained
        cmps.update(retrain_components(uid, eid, bridge.status_topic, entity))
    return {"dev": dev, "o": bridge.origin(), **_availability(bridge, None), "cmps": cmps}


def _encode(config: Mapping[str, Any]) -> str:
    return json.dumps(config, ensure_ascii=False, separators=(",", ":"), sort_keys=True)


def bridge_discovery(bridge: BridgeInfo, models: Sequence[str] = ()) -> DiscoveryMessage:
    """The retained discovery message of the bridge device."""
    return DiscoveryMessage(device_topic(bridge), _encode(bridge_config(bridge, models)))


def device_discovery(
    bridge: BridgeInfo, device: SourceDevice, outputs: Sequence[OutputEntity]
) -> DiscoveryMessage:
    """The retained discovery message of one source device with all its pipeline outputs."""
    return DiscoveryMessage(device_topic(bridge, device), _encode(device_config(bridge, device, outputs)))


def removal(topic: str) -> DiscoveryMessage:
    """An empty retained payload: Home Assistant removes the device and its entities, the broker
    forgets the retained config."""
    return DiscoveryMessage(topic, "")


def device_removal(bridge: BridgeInfo, device: SourceDevice | None = None) -> DiscoveryMessage:
    return removal(device_topic(bridge, device))


def bridge_info_payload(
    *,
    version: str,
    uptime_s: float,
    messages_per_s: float,
    drops: int,
    latency_ms: float | None,
    started: str | None = None,
    **extra: Any,
) -> str:
    """The retained ``<base>/bridge/info`` JSON, with the keys the bridge's sensors read.

    ``extra`` (models, pipelines, counters) is carried along for people and tools.
    """
    info: dict[str, Any] = {
        "version": version,
        "uptime_s": round(uptime_s, 1),
        "started": started,  # ISO 8601 with time zone: the Started timestamp sensor
        "messages_per_s": round(messages_per_s, 3),
        "drops": drops,
        "latency_ms": None if latency_ms is None else round(latency_ms, 3),
        **extra,
    }
    return json.dumps(info, separators=(",", ":"), sort_keys=True, default=str)


# ------------------------------------------------------------------------ the families' identities

_IEEE = re.compile(r"0x[0-9a-fA-F]{16}")
_MAC = re.compile(r"[0-9a-fA-F]{12}")


def mac_connection(mac: str) -> tuple[str, str] | None:
    """``("mac", "aa:bb:cc:dd:ee:ff")`` from a MAC in any usual spelling, as Home Assistant's
    device registry normalises it; ``None`` for anything else."""
    digits = re.sub(r"[:\-.]", "", mac.strip())
    if not _MAC.fullmatch(digits):
        return None
    digits = digits.lower()
    return ("mac", ":".join(digits[i : i + 2] for i in range(0, 12, 2)))


def zigbee2mqtt_identities(devices: Any) -> dict[str, Identity]:
    """Friendly name -> identity from Zigbee2MQTT's retained ``<base>/bridge/devices`` (a JSON
    list of devices with ``ieee_address`` and ``friendly_name``). Zigbee2MQTT's own discovery
    identifies each device as ``zigbee2mqtt_<ieee_address>``. Entries that do not fit are skipped;
    the coordinator has no entities."""
    out: dict[str, Identity] = {}
    if not isinstance(devices, list):
        return out
    for entry in devices:
        if not isinstance(entry, Mapping) or entry.get("type") == "Coordinator":
            continue
        ieee, name = entry.get("ieee_address"), entry.get("friendly_name")
        if isinstance(ieee, str) and _IEEE.fullmatch(ieee) and isinstance(name, str) and name:
            out[name] = Identity(identifiers=(f"zigbee2mqtt_{ieee}",), name=name)
    return out


def tasmota_identity(config: Any) -> tuple[str, Identity] | None:
    """(topic, identity) from Tasmota's retained ``tasmota/discovery/<MAC>/config``: the
    device's ``t`` (its ``%topic%``, the device id in ``tele/<topic>/SENSOR``) and ``mac``, which
    Home Assistant's Tasmota integration registers as the device's connection."""
    if not isinstance(config, Mapping):
        return None
    topic, mac = config.get("t"), config.get("mac")
    if not (isinstance(topic, str) and topic and isinstance(mac, str)):
        return None
    connection = mac_connection(mac)
    if connection is None:
        return None
    name = config.get("dn")
    return topic, Identity(connections=(connection,), name=name if isinstance(name, str) and name else None)


def esphome_identity(config: Any) -> tuple[str, Identity] | None:
    """(node, identity) from one of ESPHome's own MQTT discovery configs
    (``<prefix>/<component>/<node>/<object_id>/config``): its ``dev`` gives the identifier
    (the MAC, as ESPHome writes it) and the MAC ``connections``; the node is the topic prefix of
    its availability topic ``<node>/status`` (or the first level of its state topic), the device
    id of the esphome profile. ``None`` for configs that are not ESPHome's."""
    if not isinstance(config, Mapping):
        return None
    dev = config.get("dev", config.get("device"))
    origin = config.get("o", config.get("origin"))
    if not isinstance(dev, Mapping):
        return None
    sw = dev.get("sw", dev.get("sw_version"))
    by_origin = isinstance(origin, Mapping) and str(origin.get("name", "")).lower() == "esphome"
    if not (by_origin or (isinstance(sw, str) and sw.lower().startswith("esphome"))):
        return None
    node = None
    availability = config.get("avty_t", config.get("availability_topic"))
    state = config.get("stat_t", config.get("state_topic"))
    if isinstance(availability, str) and availability.endswith("/status") and len(availability) > 7:
        node = availability[: -len("/status")]
    elif isinstance(state, str) and "/" in state:
        node = state.split("/", 1)[0]
    if not node:
        return None
    ids = dev.get("ids", dev.get("identifiers"))
    ids = [ids] if isinstance(ids, str) else ids
    identifiers = tuple(i for i in ids if isinstance(i, str) and i) if isinstance(ids, list) else ()
    cns = dev.get("cns", dev.get("connections"))
    connections: list[tuple[str, str]] = []
    for entry in cns if isinstance(cns, list) else []:
        if (
            isinstance(entry, list | tuple)
            and len(entry) == 2
            and entry[0] == "mac"
            and isinstance(entry[1], str)
        ):
            connection = mac_connection(entry[1])
            if connection is not None and connection not in connections:
                connections.append(connection)
    if not identifiers and not connections:
        return None
    name = dev.get("name")
    return node, Identity(identifiers, tuple(connections), name if isinstance(name, str) and name else None)


# ------------------------------------------------------------------------------ Home Assistant birth


def is_ha_online(payload: bytes | str) -> bool:
    """Whether a message on Home Assistant's status topic is its birth message."""
    text = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else payload
    return text.strip() == PAYLOAD_ONLINE


def reannounce_delay(rng: random.Random | None = None, low_s: float = 0.5, high_s: float = 5.0) -> float:
    """A random pause before re-announcing after Home Assistant's birth, as its documentation asks,
    so that many publishers do not all answer at the same instant."""
    return (rng or random.Random()).uniform(low_s, high_s)


# ------------------------------------------------------------------------------------------ tracker


@dataclass
class DiscoveryTracker:
    """Remembers what is announced and works out what to publish and what to clear.

    Pure: it returns messages and assumes the caller publishes them (all retained, QoS 1).

    * :meth:`plan` with the devices and outputs of the current config returns the messages that
      bring Home Assistant from what was announced to that: removals of devices that are gone,
      component removals for pipelines that left a device, and (re)announcements of what changed.
    * :meth:`observe_retained` feeds retained configs read back from the broker after a restart
      (subscribe to :attr:`BridgeInfo.discovery_subscription`); the next :meth:`plan` then clears
      devices this instance announced in an earlier run but no longer has: no ghosts.
    * :meth:`announce_all` repeats every current config, for Home Assistant's birth message.
    * :meth:`clear_all` removes everything (discovery switched off).
    """

    bridge: BridgeInfo
    _announced: dict[str, dict[str, Any]] = field(default_factory=dict)
    readback_rejected: int = 0  # retained configs too large or unparseable (junk on the prefix)

    @property
    def topics(self) -> frozenset[str]:
        return frozenset(self._announced)

    def plan(
        self,
        devices: Iterable[tuple[SourceDevice, Sequence[OutputEntity]]],
        *,
        include_bridge: bool = True,
        models: Sequence[str] = (),
        corrected: Sequence[str] = (),
        quality: Mapping[str, Sequence[str]] | None = None,
        retrain: Sequence[RetrainEntity] = (),
    ) -> list[DiscoveryMessage]:
        desired: dict[str, dict[str, Any]] = {}
        if include_bridge:
            bridge = bridge_config(self.bridge, models, corrected, quality=quality, retrain=retrain)
            desired[device_topic(self.bridge)] = bridge
        for device, outputs in devices:
            if not outputs:
                continue
            topic = device_topic(self.bridge, device)
            if topic in desired:
                raise DiscoveryError(f"device {device.id!r} is listed twice (or collides with another id)")
            desired[topic] = device_config(self.bridge, device, outputs)

        messages = [removal(topic) for topic in sorted(self._announced.keys() - desired.keys())]
        for topic, config in desired.items():
            old = self._announced.get(topic)
            if old == config:
                continue
            if old is not None:
                stub = _component_removals(old, config)
                if stub is not None:
                    messages.append(DiscoveryMessage(topic, _encode(stub)))
            messages.append(DiscoveryMessage(topic, _encode(config)))
        self._announced = desired
        return messages

    def announced_state_topics(self) -> list[str]:
        """The state topics of every component announced (or read back), bridge's included."""
        topics: list[str] = []
        for config in self._announced.values():
            cmps = config.get("cmps", config.get("components"))
            if not isinstance(cmps, Mapping):
                continue
            for component in cmps.values():
                topic = (
                    component.get("state_topic", component.get("stat_t"))
                    if isinstance(component, Mapping)
                    else None
                )
                if isinstance(topic, str) and topic not in topics:
                    topics.append(topic)
        return topics

    def announced_identities(self) -> list[tuple[Identity, list[str]]]:
        """The family identities that announced (or read back) linked configs attach to, each
        with its components' state topics: a restart links those devices again at once, before
        their family tells the identity anew. Only MAC connections and plain identifiers of
        configs without ``via_device`` count (edge-infer's own devices have one)."""
        found: list[tuple[Identity, list[str]]] = []
        for config in self._announced.values():
            dev = config.get("dev", config.get("device"))
            cmps = config.get("cmps", config.get("components"))
            if not isinstance(dev, Mapping) or not isinstance(cmps, Mapping):
                continue
            if dev.get("via_device", dev.get("via_dev")) is not None:
                continue
            ids = dev.get("identifiers", dev.get("ids"))
            ids = [ids] if isinstance(ids, str) else ids
            identifiers = tuple(
                i for i in (ids if isinstance(ids, list) else [])
                if isinstance(i, str) and 0 < len(i) <= 256 and i != self.bridge.identifier
            )  # fmt: skip
            cns = dev.get("connections", dev.get("cns"))
            connections: list[tuple[str, str]] = []
            for entry in cns if isinstance(cns, list) else []:
                pair = entry if isinstance(entry, list) and len(entry) == 2 else None
                if pair is not None and pair[0] == "mac" and isinstance(pair[1], str):
                    connection = mac_connection(pair[1])
                    if connection is not None and connection not in connections:
                        connections.append(connection)
            if not identifiers and not connections:
                continue
            name = dev.get("name")
            name = name if isinstance(name, str) and 0 < len(name) <= 256 else None
            topics = [
                t for c in cmps.values() if isinstance(c, Mapping)
                and isinstance(t := c.get("state_topic", c.get("stat_t")), str)
            ]  # fmt: skip
            found.append((Identity(identifiers[:8], tuple(connections[:8]), name), topics))
        return found

    def announce_all(self) -> list[DiscoveryMessage]:
        return [DiscoveryMessage(topic, _encode(config)) for topic, config in self._announced.items()]

    def clear_all(self) -> list[DiscoveryMessage]:
        messages = [removal(topic) for topic in sorted(self._announced)]
        self._announced = {}
        return messages

    def observe_retained(self, topic: str, payload: bytes | str) -> bool:
        """Take note of a retained config found on the broker; ``True`` if it is this instance's.

        Configs of other publishers, and of other edge-infer instances, are ignored.
        """
        prefix = f"{self.bridge.discovery_prefix}/device/"
        if not (topic.startswith(prefix) and topic.endswith("/config")):
            return False
        if len(payload) > MAX_READBACK_BYTES:
            self.readback_rejected += 1
            return False
        text = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else payload
        if not text:
            return False
        try:
            config = json.loads(text)
        except (ValueError, RecursionError):
            # Not JSON, a nesting deeper than the interpreter's stack, or an integer past
            # Python's digit limit: junk on the prefix is counted, never raised.
            self.readback_rejected += 1
            return False
        if not isinstance(config, dict) or not self._owns(config):
            return False
        self._announced.setdefault(topic, config)
        return True

    def _owns(self, config: Mapping[str, Any]) -> bool:
        origin = config.get("o", config.get("origin"))
        dev = config.get("dev", config.get("device"))
        if not (isinstance(origin, Mapping) and isinstance(dev, Mapping)):
            return False
        if origin.get("name") != ORIGIN_NAME:
            return False
        ids = dev.get("identifiers", dev.get("ids"))
        ids = [ids] if isinstance(ids, str) else ids
        via = dev.get("via_device", dev.get("via_dev"))
        if via == self.bridge.identifier or (isinstance(ids, list) and self.bridge.identifier in ids):
            return True
        # a device attached to the family's own device: every component's unique id is ours
        cmps = config.get("cmps", config.get("components"))
        if not isinstance(cmps, Mapping) or not cmps:
            return False
        mine = f"{self.bridge.identifier}_".lower()
        return all(
            isinstance(c, Mapping) and str(c.get("unique_id", c.get("uniq_id", ""))).lower().startswith(mine)
            for c in cmps.values()
        )


def _component_removals(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any] | None:
    """The intermediate config that removes components present in ``old`` but not in ``new``."""
    old_cmps = old.get("cmps", old.get("components"))
    if not isinstance(old_cmps, Mapping):
        return None
    new_cmps: Mapping[str, Any] = new["cmps"]
    gone = sorted(set(old_cmps) - set(new_cmps))
    if not gone:
        return None
    stubs: dict[str, Any] = {}
    for key in gone:
        component = old_cmps[key]
        platform = component.get("platform", component.get("p")) if isinstance(component, Mapping) else None
        stubs[key] = {"platform": platform or "sensor"}
    return {**new, "cmps": {**new_cmps, **stubs}}


# ---------------------------------------------------------------------------- retrain (edge/retrain.py)


@dataclass(frozen=True)
class RetrainEntity:
    """A learnable pipeline's entities on the bridge device: the button (only with the command
    topics subscribed, ``corrections.enabled``) and the two sensors."""

    pipeline: str
    base_topic: str  # mqtt.base_topic: where the command and state topics are
    button: bool = True


def retrain_components(
    uid: str, eid: str, status_topic: str, entity: RetrainEntity
) -> dict[str, dict[str, Any]]:
    """The bridge's components of one learnable pipeline: "Retrain now <pipeline>" (a button,
    :func:`edge.commands.button_discovery`), "<Pipeline> training" (the state text; the JSON as
    attributes) and "<Pipeline> last trained" (a timestamp)."""
    pipeline = entity.pipeline
    key = "retrain_" + "".join(c if c.isalnum() or c in "_-" else "_" for c in pipeline)
    title = pipeline.replace("_", " ").capitalize()
    state_topic = f"{entity.base_topic}/{pipeline}/retrain/state"
    common = {"state_topic": state_topic, "entity_category": "diagnostic"}
    out: dict[str, dict[str, Any]] = {}
    if entity.button:
        button = button_discovery(
            base_topic=entity.base_topic,
            pipeline=pipeline,
            action="retrain",
            availability_topic=status_topic,
            unique_prefix=uid,
        )
        out[key] = button | {"default_entity_id": f"button.{eid}_{key}", "icon": "mdi:school-outline"}
    out[f"{key}_state"] = {
        "platform": "sensor",
        "name": f"{title} training",
        "unique_id": f"{uid}_{key}_state",
        "default_entity_id": f"sensor.{eid}_{key}_state",
        "value_template": "{{ value_json.status }}",
        "json_attributes_topic": state_topic,
        "icon": "mdi:school",
        **common,
    }
    out[f"{key}_last"] = {
        "platform": "sensor",
        "name": f"{title} last trained",
        "unique_id": f"{uid}_{key}_last",
        "default_entity_id": f"sensor.{eid}_{key}_last",
        "device_class": "timestamp",
        "value_template": "{{ value_json.last_trained or 'None' }}",
        "icon": "mdi:calendar-clock",
        **common,
    }
    return out
