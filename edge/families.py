"""Declarative device-family profiles and the decoders built from them.

A profile (``edge/family_profiles/<name>.yaml``) says which topics a family uses
(with ``{device}`` and option placeholders), how payloads are read (JSON, plain
values, availability), the readings it knows with their field paths and units,
the timestamp field and the options a pipeline may set. Families whose payloads
need memory get a small decoder class here: Shelly (NotifyStatus deltas overlaid
on the last full status) and Home Assistant statestream (state and attributes
arrive on separate topics and are joined).

The daemon (edge.pipeline) calls :func:`build_decoder`; everything is precompiled there so that
``decode`` does only the matching and the field lookups.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal, cast

import yaml
from pydantic import ValidationError
from pydantic.fields import FieldInfo

from edge.config import FAMILY_OPTIONS, FamilyOptions
from edge.decode import (
    Availability,
    Decoded,
    DecodeError,
    Decoder,
    Event,
    ReadingSpec,
    RuleDecoder,
    TopicPattern,
    TopicRule,
    compile_path,
    json_rules,
    parse_timestamp,
    to_float,
)
from edge.discovery_payloads import mac_connection

PROFILE_DIR = Path(__file__).resolve().parent / "family_profiles"
_OPTION_REF = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_OBJECT_ID = re.compile(r"^(?:[a-z_]+/)?[a-z0-9_]+$")
_MAX_PAYLOAD = 64 * 1024


# --------------------------------------------------------------------------- profile model


@dataclass(frozen=True)
class ReadingDef:
    name: str
    path: str
    unit: str = ""
    description: str = ""


@dataclass(frozen=True)
class OptionDef:
    name: str
    default: Any = None
    help: str = ""
    device: bool = False  # when unset, this topic segment is the device id


@dataclass(frozen=True)
class TopicDef:
    pattern: str
    format: Literal["json", "plain", "availability"]


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    decoder: str
    topics: tuple[TopicDef, ...]
    readings: Mapping[str, ReadingDef]
    options: Mapping[str, OptionDef]
    raw_paths: str
    timestamp: str | None = None
    manufacturer: str | None = None
    model: str | None = None
    exclude_devices: frozenset[str] = frozenset()


def _is_device_option(field: FieldInfo) -> bool:
    extra = field.json_schema_extra
    return isinstance(extra, dict) and extra.get("device") is True


def _load(path: Path) -> Profile:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    readings = {
        name: ReadingDef(name, str(spec["path"]), str(spec.get("unit", "")), str(spec.get("description", "")))
        for name, spec in (data.get("readings") or {}).items()
    }
    name = str(data["name"])
    if "options" in data:
        raise ValueError(f"profile file {path.name}: options are typed in edge.config ({name} options)")
    if name not in FAMILY_OPTIONS:
        raise ValueError(f"profile file {path.name}: edge.config has no options model for {name!r}")
    options = {
        key: OptionDef(key, field.default, field.description or "", _is_device_option(field))
        for key, field in FAMILY_OPTIONS[name].model_fields.items()
        if key != "devices"
    }
    topics = tuple(TopicDef(str(t["pattern"]), t.get("format", "json")) for t in data.get("topics") or ())
    return Profile(
        name=name,
        description=" ".join(str(data.get("description", "")).split()),
        decoder=str(data.get("decoder", "rules")),
        topics=topics,
        readings=readings,
        options=options,
        raw_paths=str(data.get("raw_paths", "any")),
        timestamp=data.get("timestamp"),
        manufacturer=data.get("manufacturer"),
        model=data.get("model"),
        exclude_devices=frozenset(data.get("exclude_devices") or ()),
    )


@cache
def load_profiles() -> dict[str, Profile]:
    """Every profile under ``edge/family_profiles``, by name."""
    profiles = {}
    for path in sorted(PROFILE_DIR.glob("*.yaml")):
        profile = _load(path)
        if profile.name != path.stem:
            raise ValueError(f"profile file {path.name} names itself {profile.name!r}")
        profiles[profile.name] = profile
    return profiles


def list_profiles() -> list[str]:
    return sorted(load_profiles())


def get_profile(name: str) -> Profile:
    profiles = load_profiles()
    if name not in profiles:
        raise ValueError(f"unknown device profile {name!r}; known: {', '.join(sorted(profiles))}")
    return profiles[name]


def profile_info(name: str) -> dict[str, Any]:
    """What a profile offers, for docs and ``edge-infer check``."""
    profile = get_profile(name)
    return {
        "name": profile.name,
        "description": profile.description,
        "topics": [{"pattern": t.pattern, "format": t.format} for t in profile.topics],
        "readings": {
            r.name: {
                "path": r.path,
                "unit": r.unit,
                **({"description": r.description} if r.description else {}),
            }
            for r in profile.readings.values()
        },
        "options": {o.name: {"default": o.default, "help": o.help} for o in profile.options.values()}
        | {"devices": {"default": None, "help": "only these device ids (a non-empty list)"}},
        "timestamp": profile.timestamp,
        "manufacturer": profile.manufacturer,
        "raw_paths": profile.raw_paths,
    }


def reading_unit(profile: str, reading: str) -> str | None:
    """The unit of a profile reading (alias or raw path), when the profile knows it."""
    prof = get_profile(profile)
    spec = prof.readings.get(reading)
    if spec is not None:
        return spec.unit
    for known in prof.readings.values():
        if known.path == reading:
            return known.unit
    return None


# --------------------------------------------------------------------------- device info


@dataclass
class DeviceInfo:
    """What is known about a source device, for Home Assistant's device registry."""

    id: str
    name: str
    manufacturer: str | None = None
    model: str | None = None
    via: str | None = None  # the family / bridge
    # ("mac", "aa:bb:cc:dd:ee:ff") where the device's own payloads carry its MAC (Shelly's sys
    # status): the connection its own Home Assistant integration registers the device with
    mac: tuple[str, str] | None = None


class _InfoMixin:
    _profile: Profile
    _models: dict[str, str]
    # Per-device state a decoder keeps (Shelly's status overlay, statestream's latest readings,
    # device models) holds at most this many devices; the pipeline sets its max_devices.
    max_devices: int = 100_000

    def bound_devices(self, max_devices: int) -> None:
        """Bound the per-device state this decoder keeps to ``max_devices`` devices."""
        self.max_devices = max_devices

    def _room_for(self, held: Mapping[str, Any] | set[str], device: str, topic: str) -> None:
        if device not in held and len(held) >= self.max_devices:
            raise DecodeError(
                "unknown_device",
                f"device {device[:64]!r} on {topic!r} is beyond max_devices={self.max_devices}",
            )

    def device_info(self, device: str) -> DeviceInfo:
        """Name, manufacturer and model of ``device`` as far as the family tells them."""
        return DeviceInfo(
            id=device,
            name=device,
            manufacturer=self._profile.manufacturer,
            model=self._models.get(device, self._profile.model),
            via=self._profile.name,
            mac=self._mac(device),
        )

    def _mac(self, device: str) -> tuple[str, str] | None:
        """The device's MAC connection, where its family's payloads carry it (Shelly)."""
        return None


# --------------------------------------------------------------------------- option checks


def check_options(profile: str, options: Mapping[str, Any] | FamilyOptions) -> dict[str, Any]:
    """Every option of ``profile`` resolved (defaults filled in), validated by its typed model in
    :mod:`edge.config`; a problem is a ``ValueError`` naming the option and the profile."""
    model = FAMILY_OPTIONS[profile]
    if isinstance(options, FamilyOptions):
        if not isinstance(options, model):
            raise ValueError(f"{type(options).__name__} are not the options of profile {profile!r}")
        return options.model_dump()
    try:
        return model.model_validate(dict(options)).model_dump()
    except ValidationError as exc:
        first = exc.errors()[0]
        inner = (first.get("ctx") or {}).get("error")
        # a config validator's error carries its key apart ("message"): the message alone here
        message = getattr(inner, "message", str(inner)) if isinstance(inner, ValueError) else first["msg"]
        if message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        if first["loc"] and not str(message).startswith(("option ", "profile ", "unknown option ")):
            message = f"option {first['loc'][0]!r} of profile {profile!r}: {message}"
        raise ValueError(message) from None


def _resolve_readings(profile: Profile, readings: Mapping[str, str]) -> dict[str, str]:
    """Pipeline reading name -> field path (or object id) in the family's payloads."""
    if not readings:
        raise ValueError(f"device profile {profile.name!r} needs at least one reading")
    resolved: dict[str, str] = {}
    for name, ref in readings.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"reading name {name!r} must be a non-empty string")
        if not isinstance(ref, str) or not ref:
            raise ValueError(f"reading {name!r}: {ref!r} is not a reading of profile {profile.name!r}")
        spec = profile.readings.get(ref)
        if spec is not None:
            resolved[name] = spec.path
            continue
        resolved[name] = _raw_path(profile, name, ref)
    return resolved


def _raw_path(profile: Profile, name: str, ref: str) -> str:
    known = ", ".join(profile.readings) or "(none: give field paths)"
    kind = profile.raw_paths
    if kind == "object_id":
        if not _OBJECT_ID.match(ref):
            raise ValueError(
                f"reading {name!r}: {ref!r} is neither a reading of profile {profile.name!r} ({known}) "
                "nor an ESPHome object id such as 'co2' or 'binary_sensor/motion'"
            )
        return ref if "/" in ref else f"sensor/{ref}"
    if kind == "statestream":
        return ref  # checked by the statestream decoder
    try:
        compile_path(ref)
    except ValueError:
        raise ValueError(
            f"reading {name!r}: {ref!r} is neither a reading of profile {profile.name!r} ({known}) "
            "nor a valid field path"
        ) from None
    if kind == "nested" and "." not in ref and "[" not in ref:
        raise ValueError(
            f"reading {name!r}: {ref!r} is not a reading of profile {profile.name!r} ({known}); "
            "a field path names the sensor object, e.g. 'ENERGY.Power' or 'BME280.Temperature'"
        )
    if kind == "component" and ":" not in ref.split(".", maxsplit=1)[0]:
        raise ValueError(
            f"reading {name!r}: {ref!r} is not a reading of profile {profile.name!r} ({known}); "
            "a field path starts with the component, e.g. 'switch:0.apower'"
        )
    return ref


# --------------------------------------------------------------------------- rule-based families


def _escape(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


class ProfileRuleDecoder(_InfoMixin):
    """A declarative family: topic rules expanded from the profile's patterns."""

    def __init__(self, profile: Profile, rules: list[TopicRule], exclude: frozenset[str]) -> None:
        self._profile = profile
        self._inner = RuleDecoder(rules)
        self._filters = self._inner.filters
        self._exclude = exclude
        self._models = {}

    @property
    def filters(self) -> list[str]:
        return self._filters

    def decode(self, topic: str, payload: bytes) -> list[Event]:
        if len(payload) > _MAX_PAYLOAD:
            raise DecodeError("oversized", f"payload on {topic!r} is {len(payload)} bytes")
        events = self._inner.decode(topic, payload)
        if self._exclude and events and events[0].device in self._exclude:
            return []
        return events


def _expand(
    template: str, options: Mapping[str, Any], device_opts: set[str], reading_path: str | None
) -> tuple[str, str | None]:
    """The topic pattern for ``template`` and, when the device id is an option's value, that value."""
    device_literal: str | None = None
    parts: list[str] = []
    for segment in template.split("/"):
        ref = _OPTION_REF.fullmatch(segment)
        if ref is None:
            parts.append(segment)
            continue
        key = ref.group(1)
        if key == "device":
            parts.append("{device}")
        elif key == "reading":
            assert reading_path is not None
            parts.append(reading_path)
        elif key in device_opts:
            value = options.get(key)
            if value is None:
                parts.append("{device}")
            else:
                parts.append(str(value))
                device_literal = str(value)
        else:
            parts.append(str(options[key]))
    return "/".join(parts), device_literal


def _build_rules(
    profile: Profile, readings: Mapping[str, str], options: Mapping[str, Any]
) -> list[TopicRule]:
    device_opts = {name for name, spec in profile.options.items() if spec.device}
    devices: list[str] | None = list(options["devices"]) if options.get("devices") else None
    rules: list[TopicRule] = []
    for topic in profile.topics:
        per_reading: list[tuple[str | None, str | None]] = (
            list(readings.items()) if "{reading}" in topic.pattern else [(None, None)]
        )
        for reading_name, reading_path in per_reading:
            pattern, device_literal = _expand(topic.pattern, options, device_opts, reading_path)
            targets: list[tuple[str, str | None]] = [(pattern, device_literal)]
            if devices is not None:
                if device_literal is not None:
                    if device_literal not in devices:
                        raise ValueError(
                            f"profile {profile.name!r}: 'devices' {devices} excludes the device "
                            f"{device_literal!r} its options name"
                        )
                elif "{device}" in pattern:
                    targets = [(pattern.replace("{device}", dev), dev) for dev in devices]
            for concrete, literal in targets:
                template = _escape(literal) if literal is not None else None
                if topic.format == "availability":
                    rules.append(TopicRule(TopicPattern(concrete), "availability", device_template=template))
                elif topic.format == "plain":
                    assert reading_name is not None, f"plain topic {topic.pattern!r} needs a {{reading}}"
                    rules.append(
                        TopicRule(
                            TopicPattern(concrete),
                            "plain",
                            device_template=template,
                            plain_reading=_escape(reading_name),
                        )
                    )
                else:
                    specs = [ReadingSpec(name, path) for name, path in readings.items()]
                    rules.append(
                        TopicRule(
                            TopicPattern(concrete),
                            "json",
                            specs,
                            device_template=template,
                            timestamp_path=profile.timestamp,
                            ignore_if_absent=devices is None,
                        )
                    )
    return rules


# --------------------------------------------------------------------------- generic json


class JsonTopicsError(ValueError):
    """The json family's topics do not fit its other settings (a config names ``source.topics``)."""


class JsonDecoder(_InfoMixin):
    """The generic ``json`` profile: readings at field paths on topics the user names."""

    def __init__(self, profile: Profile, readings: Mapping[str, str], options: Mapping[str, Any]) -> None:
        self._profile = profile
        self._models = {}
        topics = options.get("topics")
        if not topics:
            raise ValueError("profile 'json' needs option 'topics': a topic pattern or a list of them")
        fmt = cast(Literal["json", "plain"], options.get("format") or "json")
        devices = options.get("devices")
        self._devices = frozenset(devices) if devices else None
        try:
            rules = json_rules(
                topics,
                readings,
                device_path=options.get("device_field"),
                timestamp_path=options.get("timestamp_field"),
                payload_format=fmt,
                availability_topic=options.get("availability_topic"),
            )
        except ValueError as exc:
            raise JsonTopicsError(str(exc)) from None
        self._inner = RuleDecoder(rules)
        self._filters = self._inner.filters

    @property
    def filters(self) -> list[str]:
        return self._filters

    def decode(self, topic: str, payload: bytes) -> list[Event]:
        # no size bound of its own: the payloads are the user's (limits.max_payload_bytes)
        events = self._inner.decode(topic, payload)
        if self._devices is not None:
            return [e for e in events if e.device in self._devices]
        return events


# --------------------------------------------------------------------------- shelly gen2


def _overlay(base: dict[str, Any], delta: Mapping[str, Any]) -> None:
    """Overlay a NotifyStatus delta on a known status, in place (null removes a key)."""
    for key, value in delta.items():
        if value is None:
            base.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _overlay(base[key], value)
        elif isinstance(value, Mapping):
            fresh: dict[str, Any] = {}
            _overlay(fresh, value)
            base[key] = fresh
        else:
            base[key] = value


class ShellyDecoder(_InfoMixin):
    """Shelly Gen2+: full component status, NotifyStatus deltas overlaid on it, online flag."""

    def __init__(self, profile: Profile, readings: Mapping[str, str], options: Mapping[str, Any]) -> None:
        self._profile = profile
        self._models = {}
        component = str(options.get("component") or "switch:0")  # checked by ShellyOptions
        self._specs: list[tuple[str, str, str, Callable[[Any], Any]]] = []
        components: set[str] = set()
        for name, ref in readings.items():  # resolved: alias paths are relative to `component`
            path = ref if ":" in ref.split(".")[0] else f"{component}.{ref}"
            first = path.split(".")[0]
            components.add(first)
            self._specs.append((name, path, first, compile_path(path)))
        self._components = frozenset(components)
        prefix = options.get("prefix")
        devices = options.get("devices")
        self._devices = frozenset(devices) if devices else None
        self._fixed: str | None
        if prefix is not None:
            self._prefixes: list[str] | None = [str(prefix)]
            self._filters = [f"{prefix}/online", f"{prefix}/status/+", f"{prefix}/events/rpc"]
            self._fixed = str(prefix)
        elif self._devices is not None:
            self._prefixes = sorted(self._devices)
            self._filters = [f"{d}/{t}" for d in self._prefixes for t in ("online", "status/+", "events/rpc")]
            self._fixed = None
        else:
            self._prefixes = None
            self._filters = ["+/online", "+/status/+", "+/events/rpc"]
            self._fixed = None
        self._status: dict[str, dict[str, Any]] = {}  # device -> {component: status}
        self._macs: dict[str, tuple[str, str]] = {}  # device -> its MAC connection (sys status)
        self._on_identity: Callable[[str], None] | None = None
        self.mac_rejected = 0  # sys statuses whose mac is not a MAC (not used, counted)

    def notify_identity(self, callback: Callable[[str], None] | None) -> None:
        """Call ``callback(device)`` when a device's MAC is first learned or changes (Home
        Assistant discovery then links the device to the Shelly integration's device)."""
        self._on_identity = callback

    def _mac(self, device: str) -> tuple[str, str] | None:
        return self._macs.get(device)

    def _note_mac(self, device: str, sys_status: Any) -> None:
        """The MAC from a ``sys`` status (``status/sys``, NotifyFullStatus, NotifyStatus):
        as Shelly writes it (``A8032AB12345``), kept only when it is one (mac_connection)."""
        if not isinstance(sys_status, Mapping) or "mac" not in sys_status:
            return
        raw = sys_status["mac"]
        connection = mac_connection(raw) if isinstance(raw, str) and len(raw) <= 32 else None
        if connection is None:
            self.mac_rejected += 1
            return
        if self._macs.get(device) == connection:
            return
        if device not in self._macs and len(self._macs) >= self.max_devices:
            return
        self._macs[device] = connection
        if self._on_identity is not None:
            self._on_identity(device)

    @property
    def filters(self) -> list[str]:
        return self._filters

    def held_status(self) -> dict[str, list[str]]:
        """The devices whose status is kept, each with its kept components (bounded state)."""
        return {device: sorted(state) for device, state in self._status.items()}

    def _device(self, prefix: str) -> str | None:
        if self._fixed is not None:
            return self._fixed if prefix == self._fixed else None
        if self._devices is not None and prefix not in self._devices:
            return None
        if not prefix or len(prefix) > 256:
            raise DecodeError("bad_device_id", f"device id {prefix[:40]!r} is empty or longer than 256")
        return prefix

    def decode(self, topic: str, payload: bytes) -> list[Event]:
        if len(payload) > _MAX_PAYLOAD:
            raise DecodeError("oversized", f"payload on {topic!r} is {len(payload)} bytes")
        parts = topic.split("/")
        n = len(parts)
        if n == 2 and parts[1] == "online":
            device = self._device(parts[0])
            if device is None:
                return []
            text = payload.strip()
            if text == b"true":
                return [Availability(device, True)]
            if text == b"false":
                return [Availability(device, False)]
            raise DecodeError("bad_availability", f"{topic!r} is {text[:40]!r}, neither true nor false")
        if n == 3 and parts[1] == "status":
            device = self._device(parts[0])
            if device is None:
                return []
            data = _parse_object(payload, topic)
            comp = parts[2]
            self._note_model(device)
            if comp == "sys":
                self._note_mac(device, data)
            if comp not in self._components:  # not kept: no reading comes from it
                return []
            self._room_for(self._status, device, topic)
            state = self._status.setdefault(device, {})
            state[comp] = data
            return self._emit(device, state, topic, None, strict=comp)
        if n == 3 and parts[1] == "events" and parts[2] == "rpc":
            device = self._device(parts[0])
            if device is None:
                return []
            data = _parse_object(payload, topic)
            method = data.get("method")
            params = data.get("params")
            if method in ("NotifyStatus", "NotifyFullStatus") and isinstance(params, dict):
                self._note_mac(device, params.get("sys"))
            if method != "NotifyStatus":
                return []
            if not isinstance(params, dict):
                raise DecodeError("missing_field", f"NotifyStatus on {topic!r} has no params object")
            self._note_model(device)
            deltas = [
                (comp, delta)
                for comp, delta in params.items()
                if comp in self._components and isinstance(delta, dict)
            ]
            if not deltas:  # only components no reading comes from: nothing kept
                return []
            self._room_for(self._status, device, topic)
            state = self._status.setdefault(device, {})
            for comp, delta in deltas:
                _overlay(state.setdefault(comp, {}), delta)
            ts = None
            if params.get("ts") is not None:
                ts = parse_timestamp(params["ts"], f"params.ts on {topic!r}")
            # a delta before any full status may lack readings: not an error, just not yet complete
            return self._emit(device, state, topic, ts, strict=None)
        return []

    def _emit(
        self, device: str, state: dict[str, Any], topic: str, ts: float | None, *, strict: str | None
    ) -> list[Event]:
        """Readings from the merged status; a reading of ``strict`` (the component whose full
        status just came) must be there, others may still be unknown (nothing emitted yet)."""
        values: dict[str, float] = {}
        for name, path, comp, getter in self._specs:
            try:
                raw = getter(state)
            except (KeyError, IndexError, TypeError):
                if comp == strict:
                    raise DecodeError(
                        "missing_field", f"field {path!r} absent in status of {topic!r}"
                    ) from None
                return []
            if raw is None:
                if comp == strict:
                    raise DecodeError("missing_field", f"field {path!r} is null on {topic!r}")
                return []
            values[name] = to_float(raw, f"field {path!r} on {topic!r}")
        return [Decoded(device, values, ts)]

    def _note_model(self, device: str) -> None:
        if device not in self._models and "-" in device and len(self._models) < self.max_devices:
            self._models[device] = device.rsplit("-", 1)[0]


def _parse_object(payload: bytes, topic: str) -> dict[str, Any]:
    try:
        data = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DecodeError("malformed_json", f"payload on {topic!r} is not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise DecodeError("malformed_json", f"payload on {topic!r} is not a JSON object")
    return data


# --------------------------------------------------------------------------- home assistant statestream

_ENTITY_REF = re.compile(r"^([a-z0-9_]+)\.([a-z0-9_]+)(?::([A-Za-z0-9_]+))?$")
_ATTRIBUTE = re.compile(r"^[A-Za-z0-9_]+$")
_UNAVAILABLE = ("unavailable",)
_NO_VALUE = ("unknown", "", "none", "null")


class StatestreamDecoder(_InfoMixin):
    """Home Assistant mqtt_statestream: state and attribute topics joined per device."""

    def __init__(self, profile: Profile, readings: Mapping[str, str], options: Mapping[str, Any]) -> None:
        self._profile = profile
        self._models = {}
        base = str(options.get("base_topic") or "homeassistant")
        self._base = base
        self._base_len = base.count("/") + 1
        entity_refs = {name: _ENTITY_REF.match(ref) for name, ref in readings.items()}
        specific = [name for name, m in entity_refs.items() if m is not None]
        if specific and len(specific) != len(readings):
            generic = [name for name in readings if name not in specific]
            raise ValueError(
                f"profile 'statestream': readings {generic} name an attribute of every entity while "
                f"{specific} name specific entities; use one form for all"
            )
        # key (domain, entity, attribute) -> reading names; per-entity: (None, None, attribute)
        self._keys: dict[tuple[str | None, str | None, str], list[str]] = {}
        self._names = list(readings)
        domains = options.get("domains")  # checked by StatestreamOptions
        self._domains = frozenset(domains) if domains else None
        devices = options.get("devices")
        self._devices = frozenset(devices) if devices else None
        if specific:
            first = entity_refs[specific[0]]
            assert first is not None
            self._device: str | None = str(options.get("device") or f"{first.group(1)}.{first.group(2)}")
            filters = []
            for name in specific:
                m = entity_refs[name]
                assert m is not None
                attr = m.group(3) or "state"
                self._keys.setdefault((m.group(1), m.group(2), attr), []).append(name)
                filters.append(f"{base}/{m.group(1)}/{m.group(2)}/{attr}")
            self._filters = list(dict.fromkeys(filters))
        else:
            if options.get("device") is not None:
                raise ValueError(
                    "option 'device' of profile 'statestream' needs readings of specific entities"
                )
            self._device = None
            filters = []
            for name, ref in readings.items():
                if not _ATTRIBUTE.match(ref):
                    raise ValueError(
                        f"reading {name!r}: {ref!r} is not 'state', an attribute name, an entity "
                        "(sensor.kitchen_co2) or an entity attribute (climate.kitchen:current_temperature)"
                    )
                self._keys.setdefault((None, None, ref), []).append(name)
                doms = sorted(self._domains) if self._domains else ["+"]
                filters += [f"{base}/{d}/+/{ref}" for d in doms]
            self._filters = list(dict.fromkeys(filters))
        self._latest: dict[str, dict[str, float]] = {}
        self._offline: set[str] = set()

    @property
    def filters(self) -> list[str]:
        return self._filters

    def decode(self, topic: str, payload: bytes) -> list[Event]:
        if len(payload) > _MAX_PAYLOAD:
            raise DecodeError("oversized", f"payload on {topic!r} is {len(payload)} bytes")
        if not topic.startswith(self._base + "/"):
            return []
        parts = topic.split("/")[self._base_len :]
        if len(parts) != 3:
            return []
        domain, entity, attr = parts
        if self._device is not None:
            names = self._keys.get((domain, entity, attr))
            device = self._device
        else:
            if self._domains is not None and domain not in self._domains:
                return []
            names = self._keys.get((None, None, attr))
            device = f"{domain}.{entity}"
            if self._devices is not None and device not in self._devices:
                return []
        if names is None:
            return []
        try:
            value = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            value = payload.decode(errors="replace").strip()  # tolerate unquoted strings
        events: list[Event] = []
        if attr == "state" and isinstance(value, str):
            lowered = value.strip().lower()
            if lowered in _UNAVAILABLE:
                self._room_for(self._offline, device, topic)
                self._offline.add(device)
                return [Availability(device, False)]
            if lowered in _NO_VALUE:
                return []
        if value is None:
            return []
        if isinstance(value, dict | list):
            raise DecodeError("non_numeric", f"{topic!r} carries a JSON {type(value).__name__}, not a number")
        number = to_float(value, f"value on {topic!r}")
        if device in self._offline:
            self._offline.discard(device)
            events.append(Availability(device, True))
        self._room_for(self._latest, device, topic)
        latest = self._latest.setdefault(device, {})
        for name in names:
            latest[name] = number
        if len(latest) == len(self._names):
            events.append(Decoded(device, dict(latest)))
        return events


# --------------------------------------------------------------------------- the entry point


def build_decoder(
    profile: str, *, readings: Mapping[str, str], options: Mapping[str, Any] | FamilyOptions
) -> Decoder:
    """A decoder for ``profile`` producing the pipeline's ``readings`` (name -> reading or field path),
    with ``options`` as the family's typed options (edge.config) or a mapping validated by them.
    The one entry point: the daemon (edge.pipeline) calls it with a config's typed source.

    Raises ``ValueError`` naming the unknown profile, reading or option.
    """
    prof = get_profile(profile)
    opts = check_options(prof.name, options or {})
    if prof.decoder == "json":
        if not readings:
            raise ValueError("profile 'json' needs at least one reading (name -> field path)")
        if opts.get("format", "json") == "json":
            for name, path in readings.items():
                _raw_path(prof, name, path)
        return JsonDecoder(prof, readings, opts)
    resolved = _resolve_readings(prof, readings)
    if prof.decoder == "shelly":
        return ShellyDecoder(prof, resolved, opts)
    if prof.decoder == "statestream":
        return StatestreamDecoder(prof, resolved, opts)
    if prof.decoder != "rules":
        raise ValueError(f"profile {prof.name!r} names an unknown decoder {prof.decoder!r}")
    rules = _build_rules(prof, resolved, opts)
    return ProfileRuleDecoder(prof, rules, prof.exclude_devices)


def decode_all(decoder: Decoder, messages: Iterable[tuple[str, bytes]]) -> list[Event]:
    """Decode a sequence of messages in order (a convenience for tests and replays)."""
    out: list[Event] = []
    for topic, payload in messages:
        out.extend(decoder.decode(topic, payload))
    return out
