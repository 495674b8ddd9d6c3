"""Turning MQTT messages into readings: topic patterns, field paths, decoders.

A *decoder* turns one ``(topic, payload)`` into zero or more :class:`Decoded`
readings of a device and :class:`Availability` changes, or raises
:class:`DecodeError` with a short machine-readable reason and a precise detail.
This module has the generic engine (JSON with field paths, plain numbers) that
the device-family profiles in ``devices/`` are built from.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, Protocol

MATCH_CACHE = 50_000  # topics whose rule match a decoder remembers

# Reasons are metric label values: keep the set small and stable.
REASONS = (
    "oversized",
    "malformed_json",
    "missing_field",
    "non_numeric",
    "not_finite",
    "bad_device_id",
    "bad_timestamp",
    "unknown_device",
    "out_of_order",
    "stale",
    "bad_availability",  # an availability payload that is neither online nor offline
    "decoder_error",  # a bug in a decoder (its exception is logged): never the payload's fault alone
    "queue_full",  # the model's input queue is at its bound (back-pressure)
    "inference_failed",  # the model raised on the batch the input was in
    "answer_failed",
)


class DecodeError(ValueError):
    """A message that cannot become readings. ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(slots=True)
class Decoded:
    """Readings of one device from one message."""

    device: str
    values: dict[str, float]
    ts: float | None = None  # seconds since the epoch, from the payload when it has one


@dataclass(slots=True, frozen=True)
class Availability:
    """A device announced itself online or offline."""

    device: str
    online: bool


Event = Decoded | Availability


class Decoder(Protocol):
    """What the daemon needs from a source: filters to subscribe and a decode function."""

    @property
    def filters(self) -> list[str]: ...

    def decode(self, topic: str, payload: bytes) -> list[Event]: ...


# --------------------------------------------------------------------------- topics

_VAR = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")


@dataclass(frozen=True)
class TopicPattern:
    """An MQTT topic filter whose single-level segments may be named: ``tele/{device}/SENSOR``.

    ``{name}`` stands for ``+`` and captures that segment; ``+`` and a final ``#``
    keep their MQTT meaning without capturing.
    """

    pattern: str
    filter: str = field(init=False)
    _segments: tuple[str | None, ...] = field(init=False, repr=False)  # None = '+', '' name = literal
    _names: tuple[str | None, ...] = field(init=False, repr=False)
    _multi: bool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.pattern or "\0" in self.pattern:
            raise ValueError("a topic pattern must be a non-empty string without NUL")
        parts = self.pattern.split("/")
        segments: list[str | None] = []
        names: list[str | None] = []
        multi = False
        for index, part in enumerate(parts):
            var = _VAR.match(part)
            if part == "#":
                if index != len(parts) - 1:
                    raise ValueError(f"'#' must be the last segment of {self.pattern!r}")
                multi = True
                break
            if var:
                segments.append(None)
                names.append(var.group(1))
            elif part == "+":
                segments.append(None)
                names.append(None)
            elif "+" in part or "#" in part or "{" in part or "}" in part:
                raise ValueError(f"segment {part!r} of {self.pattern!r} mixes wildcards with text")
            else:
                segments.append(part)
                names.append(None)
        mqtt = ["+" if s is None else s for s in segments]
        if multi:
            mqtt.append("#")
        object.__setattr__(self, "filter", "/".join(mqtt))
        object.__setattr__(self, "_segments", tuple(segments))
        object.__setattr__(self, "_names", tuple(names))
        object.__setattr__(self, "_multi", multi)

    @property
    def names(self) -> list[str]:
        return [n for n in self._names if n is not None]

    def match(self, topic: str) -> dict[str, str] | None:
        """The named segments of ``topic`` if it matches, else ``None``."""
        parts = topic.split("/")
        n = len(self._segments)
        if len(parts) < n or (len(parts) > n and not self._multi):
            return None
        captured: dict[str, str] = {}
        for part, seg, name in zip(parts, self._segments, self._names, strict=False):
            if seg is None:
                if name is not None:
                    captured[name] = part
            elif seg != part:
                return None
        return captured


# --------------------------------------------------------------------------- payload paths

_PATH_TOKEN = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def compile_path(path: str) -> Callable[[Any], Any]:
    """A getter for ``ENERGY.Power``, ``sensors[0].value`` or ``a.b``; raises KeyError when absent.

    A key that itself contains dots can be written in brackets with quotes: ``["temp.c"]``.
    """
    if not path:
        raise ValueError("empty field path")
    steps: list[str | int] = []
    quoted = re.fullmatch(r'\["(.+)"\]', path)
    if quoted:
        steps.append(quoted.group(1))
    else:
        pos = 0
        for match in _PATH_TOKEN.finditer(path):
            if match.start() != pos and path[pos : match.start()] != ".":
                raise ValueError(f"bad field path {path!r}")
            steps.append(match.group(1) if match.group(1) is not None else int(match.group(2)))
            pos = match.end()
        if pos != len(path):
            raise ValueError(f"bad field path {path!r}")
    if len(steps) == 1:
        key = steps[0]

        def get_one(obj: Any) -> Any:
            return obj[key]

        return get_one

    def get(obj: Any) -> Any:
        for step in steps:
            obj = obj[step]
        return obj

    return get


FLOAT32_MAX = 3.4028234663852886e38  # larger magnitudes are infinite in the model's float32 input

# Sample times before this (2000-01-01T00:00:00Z) are a device's clock that was never set or a
# hostile payload; see check_timestamp for the window around the receive time.
EARLIEST_TS = 946684800.0


def check_timestamp(ts: float, now: float, max_skew_s: float, what: str) -> float:
    """``ts`` if it is not before 2000 and at most ``max_skew_s`` ahead of ``now``, else
    DecodeError ``bad_timestamp``: a window stamped far ahead would make every later sample of
    its device look out of order, and a time outside years 1-9999 cannot be written as a date.
    Older times (a replay of recorded data, a clock that is behind) are the device's own
    business: out of order or stale for it alone."""
    if ts < EARLIEST_TS or ts - now > max_skew_s:
        raise DecodeError(
            "bad_timestamp",
            f"{what} {ts:.3f} is before 2000 or more than {max_skew_s:g} s ahead of the receive time "
            f"(limits.max_clock_skew_s)",
        )
    return ts


def to_float(value: Any, what: str) -> float:
    """A finite float from a JSON value (numbers, numeric strings, booleans), else DecodeError."""
    if type(value) is float:  # the common case first: a JSON number with a fraction
        if value - value == 0.0 and -FLOAT32_MAX <= value <= FLOAT32_MAX:  # finite, also as float32
            return value
        raise DecodeError("not_finite", f"{what} is {value} (not finite as float32)")
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        text = value.strip()
        lowered = text.lower()
        if lowered in ("on", "true", "open", "detected", "occupied", "home"):
            return 1.0
        if lowered in ("off", "false", "closed", "clear", "not_home", "away"):
            return 0.0
        try:
            number = float(text)
        except ValueError:
            raise DecodeError("non_numeric", f"{what} is {value[:40]!r}, not a number") from None
    else:
        raise DecodeError("non_numeric", f"{what} is {type(value).__name__}, not a number")
    if not (math.isfinite(number) and -FLOAT32_MAX <= number <= FLOAT32_MAX):
        raise DecodeError("not_finite", f"{what} is {number} (not finite as float32)")
    return number


def parse_timestamp(value: Any, what: str) -> float:
    """Epoch seconds (or milliseconds, detected by size) or an ISO 8601 string -> epoch seconds."""
    if isinstance(value, bool):
        raise DecodeError("bad_timestamp", f"{what} is a boolean")
    if isinstance(value, int | float):
        ts = float(value)
        if not math.isfinite(ts):
            raise DecodeError("bad_timestamp", f"{what} is {ts}")
        return ts / 1000.0 if ts > 1e11 else ts
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
            if parsed.tzinfo is None:
                # Tasmota and others send local time without an offset: read it as local time.
                return parsed.astimezone().timestamp()
            return parsed.timestamp()
        except (ValueError, OverflowError, OSError):  # not ISO 8601, or a date the OS cannot place
            raise DecodeError("bad_timestamp", f"{what} {value[:40]!r} is not an ISO 8601 time") from None
    raise DecodeError("bad_timestamp", f"{what} is {type(value).__name__}")


def parse_json(payload: bytes, topic: str) -> Any:
    try:
        return json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: too deep
        raise DecodeError("malformed_json", f"payload on {topic!r} is not JSON ({exc})") from None


# --------------------------------------------------------------------------- a topic rule


@dataclass(frozen=True)
class ReadingSpec:
    """One reading a rule extracts: its name, where it is, whether its absence is an error."""

    name: str
    path: str
    required: bool = True
    scale: float = 1.0


@dataclass
class TopicRule:
    """How one topic pattern becomes readings.

    ``format`` is ``json`` (readings at field paths), ``plain`` (the payload is
    one number, named ``plain_reading``, which may be ``{var}`` from the topic),
    or ``availability`` (payload compared with ``online``/``offline`` values, or a
    JSON ``state`` field as Zigbee2MQTT sends).
    """

    pattern: TopicPattern
    format: Literal["json", "plain", "availability"] = "json"
    readings: Sequence[ReadingSpec] = ()
    device_var: str | None = "device"
    device_path: str | None = None
    device_template: str | None = None
    timestamp_path: str | None = None
    plain_reading: str | None = None
    online_values: frozenset[str] = frozenset({"online", "Online", "true", "1"})
    offline_values: frozenset[str] = frozenset({"offline", "Offline", "false", "0"})
    availability_path: str | None = None
    # a payload carrying none of the readings is another kind of device, not an error
    ignore_if_absent: bool = False
    _getters: list[tuple[ReadingSpec, Callable[[Any], Any]]] = field(init=False, repr=False)
    _device_getter: Callable[[Any], Any] | None = field(init=False, repr=False)
    _ts_getter: Callable[[Any], Any] | None = field(init=False, repr=False)
    _avail_getter: Callable[[Any], Any] | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._getters = [(spec, compile_path(spec.path)) for spec in self.readings]
        self._device_getter = compile_path(self.device_path) if self.device_path else None
        self._ts_getter = compile_path(self.timestamp_path) if self.timestamp_path else None
        self._avail_getter = compile_path(self.availability_path) if self.availability_path else None
        no_topic_var = self.device_var is None or self.device_var not in self.pattern.names
        if self._device_getter is None and self.device_template is None and no_topic_var:
            raise ValueError(
                f"topic {self.pattern.pattern!r} has no {{{self.device_var}}} segment; "
                "name one, or give the device id's payload field"
            )
        if self.format == "plain" and not self.plain_reading:
            raise ValueError("a plain topic needs the name of its reading")

    def device_of(self, captured: Mapping[str, str], data: Any, topic: str) -> str:
        if self._device_getter is not None:
            try:
                raw = self._device_getter(data)
            except (KeyError, IndexError, TypeError):
                raise DecodeError(
                    "missing_field", f"device id field {self.device_path!r} absent on {topic!r}"
                ) from None
            if isinstance(raw, bool) or not isinstance(raw, str | int):
                raise DecodeError("bad_device_id", f"device id field {self.device_path!r} is not a string")
            device = str(raw)
        elif self.device_template is not None:
            device = self.device_template.format_map(captured)
        else:
            assert self.device_var is not None
            device = captured[self.device_var]
        if not device or len(device) > 256:
            raise DecodeError("bad_device_id", f"device id on {topic!r} is empty or longer than 256")
        return device

    def decode(self, topic: str, captured: Mapping[str, str], payload: bytes) -> list[Event]:
        if self.format == "availability":
            return [self._availability(topic, captured, payload)]
        if self.format == "plain":
            device = self.device_of(captured, None, topic)
            assert self.plain_reading is not None
            name = self.plain_reading.format_map(captured)
            try:
                text = payload.decode()
            except UnicodeDecodeError:
                raise DecodeError("non_numeric", f"payload on {topic!r} is not text") from None
            return [Decoded(device, {name: to_float(text, f"payload on {topic!r}")})]
        data = parse_json(payload, topic)
        device = self.device_of(captured, data, topic)
        values: dict[str, float] = {}
        for spec, getter in self._getters:
            try:
                raw = getter(data)
            except (KeyError, IndexError, TypeError):
                if spec.required:
                    if self.ignore_if_absent and not self._any_present(data):
                        return []
                    raise DecodeError(
                        "missing_field", f"field {spec.path!r} absent in payload on {topic!r}"
                    ) from None
                continue
            if raw is None and not spec.required:
                continue
            number = to_float(raw, f"field {spec.path!r} on {topic!r}")
            values[spec.name] = number * spec.scale if spec.scale != 1.0 else number
        ts = None
        if self._ts_getter is not None:
            try:
                raw_ts = self._ts_getter(data)
            except (KeyError, IndexError, TypeError):
                raw_ts = None
            if raw_ts is not None:
                ts = parse_timestamp(raw_ts, f"timestamp {self.timestamp_path!r} on {topic!r}")
        if not values:
            return []
        return [Decoded(device, values, ts)]

    def _any_present(self, data: Any) -> bool:
        for _, getter in self._getters:
            try:
                getter(data)
            except (KeyError, IndexError, TypeError):
                continue
            return True
        return False

    def _availability(self, topic: str, captured: Mapping[str, str], payload: bytes) -> Availability:
        text = payload.decode(errors="replace").strip()
        state = text
        data: Any = None
        if text.startswith("{"):
            data = parse_json(payload, topic)
            getter = self._avail_getter or compile_path("state")
            try:
                state = str(getter(data))
            except (KeyError, IndexError, TypeError):
                raise DecodeError("missing_field", f"availability state absent on {topic!r}") from None
        device = self.device_of(captured, data, topic)
        if state in self.online_values:
            return Availability(device, True)
        if state in self.offline_values:
            return Availability(device, False)
        raise DecodeError(
            "bad_availability", f"availability {state[:40]!r} on {topic!r} is neither online nor offline"
        )


@dataclass
class RuleDecoder:
    """A decoder made of topic rules; the first rule whose pattern matches decodes."""

    rules: list[TopicRule]
    # topic -> its rule and captured segments (None: no rule matches); bounded like the daemon's
    # route cache. Matching splits the topic and walks the segments: once per topic is enough.
    _matched: dict[str, tuple[TopicRule, dict[str, str]] | None] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @property
    def filters(self) -> list[str]:
        seen: dict[str, None] = {}
        for rule in self.rules:
            seen.setdefault(rule.pattern.filter, None)
        return list(seen)

    def _match(self, topic: str) -> tuple[TopicRule, dict[str, str]] | None:
        for rule in self.rules:
            captured = rule.pattern.match(topic)
            if captured is not None:
                return rule, captured
        return None

    def decode(self, topic: str, payload: bytes) -> list[Event]:
        matched = self._matched
        try:
            found = matched[topic]
        except KeyError:
            if len(matched) >= MATCH_CACHE:
                matched.clear()
            found = matched[topic] = self._match(topic)
        if found is None:
            return []
        rule, captured = found
        return rule.decode(topic, captured, payload)


def json_rules(
    topics: Iterable[str],
    readings: Mapping[str, str],
    *,
    device_path: str | None = None,
    timestamp_path: str | None = None,
    payload_format: Literal["json", "plain"] = "json",
    availability_topic: str | None = None,
) -> list[TopicRule]:
    """Rules for the generic ``json`` profile: every topic carries the readings at their paths.

    With several topics (a join of readings published on different topics), a
    reading absent from one topic's payload is not an error there; the feature
    stage reports which reading a device never sent.
    """
    topic_list = list(topics)
    several = len(topic_list) > 1
    rules: list[TopicRule] = []
    for topic in topic_list:
        pattern = TopicPattern(topic)
        if payload_format == "plain":
            if len(readings) != 1 and "reading" not in pattern.names:
                raise ValueError(
                    f"plain topic {topic!r} carries one number: name one reading, or a {{reading}} segment"
                )
            name = "{reading}" if "reading" in pattern.names else next(iter(readings))
            rules.append(TopicRule(pattern, "plain", device_path=None, plain_reading=name))
            continue
        specs = [ReadingSpec(name, path, required=not several) for name, path in readings.items()]
        rules.append(
            TopicRule(pattern, "json", specs, device_path=device_path, timestamp_path=timestamp_path)
        )
    if availability_topic:
        rules.insert(0, TopicRule(TopicPattern(availability_topic), "availability"))
    return rules


# --------------------------------------------------------------------------- output topics

_UNSAFE = re.compile(r"[/+#\x00-\x1f\x7f-\x9f]")
# A segment this mapping produced: the sanitised id, '~' and 8 hex digits of a hash of the original.
# Ids that already look like that are mapped too, so no id can take another's topic.
_MAPPED = re.compile(r"~[0-9a-f]{8}\Z")
# Code points the MQTT spec forbids (U+0000, surrogates) or lets a broker refuse (C0/C1 controls,
# non-characters) in a topic: an id holding one is rejected as bad_device_id (docs/reliability.md).
_FORBIDDEN = re.compile(
    "[\x00-\x1f\x7f-\x9f\ufdd0-\ufdef\ud800-\udfff"
    + "".join(f"{chr(plane * 0x10000 + 0xFFFE)}{chr(plane * 0x10000 + 0xFFFF)}" for plane in range(17))
    + "]"
)


def forbidden_in_topic(value: str) -> bool:
    """Whether ``value`` holds a character that must never reach a topic (see :data:`_FORBIDDEN`)."""
    return _FORBIDDEN.search(value) is not None


def sanitise_segment(value: str, max_len: int = 128) -> str:
    """The topic segment of a device id; distinct ids always get distinct segments.

    An id that is a safe segment as it is (no '/', '+', '#', control characters, leading '$' or
    surrounding spaces, at most ``max_len`` characters) is its own segment. Any other id is
    sanitised (those characters replaced by '_', cut to length) and suffixed with '~' and 8 hex
    digits of a hash of the original, so ``kitchen/plug`` and ``kitchen+plug`` no longer both
    answer on ``kitchen_plug``. Ids ending in '~' and 8 hex digits are mapped too, so an id can
    never claim another's mapped segment."""
    if (
        value
        and len(value) <= max_len
        and value[0] != "$"
        and value.strip() == value
        and _UNSAFE.search(value) is None
        and _MAPPED.search(value) is None
    ):
        return value
    digest = hashlib.blake2s(value.encode("utf-8", "surrogatepass"), digest_size=4).hexdigest()
    cleaned = _UNSAFE.sub("_", value).strip()
    if cleaned.startswith("$"):
        cleaned = "_" + cleaned[1:]
    return f"{cleaned[: max_len - 9]}~{digest}"
