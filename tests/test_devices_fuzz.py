"""Property-based fuzzing of every device decoder: whatever arrives, only DecodeError escapes."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import devices
from edge.decode import REASONS, Availability, Decoded, DecodeError

CONFIGS: list[tuple[str, dict[str, str], dict[str, Any]]] = [
    ("zigbee2mqtt", {"t": "temperature", "p": "power"}, {}),
    ("zigbee2mqtt", {"t": "temperature"}, {"devices": ["a", "b"]}),
    ("tasmota", {"p": "power", "v": "voltage", "x": "ENERGY.Power[0]"}, {}),
    ("shelly", {"p": "power", "e": "energy", "q": "switch:1.apower"}, {}),
    ("shelly", {"p": "power"}, {"prefix": "a"}),
    ("esphome", {"t": "temperature", "m": "binary_sensor/motion"}, {}),
    ("statestream", {"s": "state", "b": "brightness"}, {}),
    ("statestream", {"t": "sensor.a", "u": "climate.a:temperature"}, {"device": "room"}),
    (
        "json",
        {"x": "a.x", "y": "b[0]"},
        {"topics": "w/{device}/imu", "timestamp_field": "ts", "availability_topic": "w/{device}/status"},
    ),
    ("json", {"x": "x"}, {"topics": ["j/{device}/one", "j/{device}/two"], "device_field": "id"}),
    ("json", {"x": "x"}, {"topics": "p/{device}/{reading}", "format": "plain"}),
]
DECODERS = [devices.build_decoder(p, readings=r, options=o) for p, r, o in CONFIGS]

segment = st.sampled_from(
    [
        "zigbee2mqtt",
        "tele",
        "a",
        "b",
        "w",
        "j",
        "p",
        "status",
        "online",
        "events",
        "rpc",
        "switch:0",
        "switch:1",
        "SENSOR",
        "LWT",
        "availability",
        "sensor",
        "binary_sensor",
        "temperature",
        "motion",
        "state",
        "homeassistant",
        "light",
        "climate",
        "brightness",
        "imu",
        "one",
        "two",
        "x",
        "",
        "+",
        "#",
    ]
) | st.text(min_size=0, max_size=8)
topics = st.lists(segment, min_size=1, max_size=6).map("/".join)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**20), max_value=10**20)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["online", "offline", "Online", "true", "false", "ON", "unavailable", "NaN", "1e400"])
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "ENERGY",
                    "Power",
                    "Voltage",
                    "Time",
                    "temperature",
                    "power",
                    "state",
                    "method",
                    "params",
                    "ts",
                    "switch:0",
                    "switch:1",
                    "apower",
                    "aenergy",
                    "total",
                    "a",
                    "b",
                    "x",
                    "id",
                    "last_seen",
                ]
            )
            | st.text(max_size=6),
            children,
            max_size=5,
        )
    ),
    max_leaves=20,
)


def _encode(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


def _check(decoder: Any, topic: str, payload: bytes) -> None:
    reason = None
    events: list[Any] = []
    try:
        events = decoder.decode(topic, payload)
    except DecodeError as exc:
        reason = exc.reason
    assert reason is None or reason in REASONS
    assert isinstance(events, list)
    for event in events:
        assert isinstance(event, Decoded | Availability)
        assert isinstance(event.device, str)
        if isinstance(event, Decoded):
            assert all(isinstance(v, float) and math.isfinite(v) for v in event.values.values())


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("decoder", DECODERS, ids=[f"{p}-{i}" for i, (p, _, _) in enumerate(CONFIGS)])
@FUZZ
@given(data=st.data())
def test_random_bytes(decoder: Any, data: st.DataObject) -> None:
    filters = decoder.filters
    topic = data.draw(st.sampled_from(filters).map(lambda f: f.replace("+", "dev")) | topics)
    _check(decoder, topic, data.draw(st.binary(max_size=200)))


@pytest.mark.parametrize("decoder", DECODERS, ids=[f"{p}-{i}" for i, (p, _, _) in enumerate(CONFIGS)])
@FUZZ
@given(data=st.data())
def test_random_json(decoder: Any, data: st.DataObject) -> None:
    filters = decoder.filters
    topic = data.draw(
        st.sampled_from(filters).flatmap(
            lambda f: st.lists(
                st.sampled_from(["a", "dev", "x", "room"]), min_size=f.count("+"), max_size=f.count("+")
            ).map(lambda fills: _fill(f, fills))
        )
        | topics
    )
    for _ in range(3):  # stateful decoders: several messages in a row
        _check(decoder, topic, _encode(data.draw(json_values)))


def _fill(filt: str, fills: list[str]) -> str:
    out = []
    it = iter(fills)
    for part in filt.split("/"):
        out.append(next(it) if part == "+" else part)
    return "/".join(out)


# ----------------------------------------------------------------- through a pipeline's checks

_FORBIDDEN_CHARS = (
    [chr(c) for c in range(0x20)]
    + [chr(c) for c in range(0x7F, 0xA0)]
    + [chr(c) for c in range(0xFDD0, 0xFDF0)]
    + [chr(plane * 0x10000 + low) for plane in range(17) for low in (0xFFFE, 0xFFFF)]
    + ["\ud800", "\udfff"]
)
hostile_ids = (
    st.text(max_size=12)
    | st.lists(
        st.sampled_from([*_FORBIDDEN_CHARS, "/", "+", "#", "$", "~", " ", "a", "é", "🙂", "~0123abcd"]),
        min_size=1,
        max_size=8,
    ).map("".join)
    | st.integers(min_value=-(10**30), max_value=10**30)
)
hostile_times = (
    st.floats(allow_nan=True, allow_infinity=True)
    | st.integers(min_value=-(10**25), max_value=10**25)
    | st.floats(min_value=9e8, max_value=3e9)  # around now, in seconds
    | st.floats(min_value=9e11, max_value=3e12)  # around now, in milliseconds
    | st.datetimes(timezones=st.none() | st.timezones()).map(lambda d: d.isoformat())
    | st.sampled_from(["9999-12-31T12:00-12:00", "0001-01-01T00:00+14:00", "0001-01-01T00:00", "Z", ""])
    | st.text(max_size=20)
)
huge_numbers = (
    st.floats(allow_nan=False, allow_infinity=False)
    | st.integers(min_value=-(10**45), max_value=10**45)
    | st.sampled_from([1e39, -1e39, 3.4028235e38, 3.5e38, 1e-45, "1e39", "-3.5e38", 1e308])
)


@pytest.fixture(scope="module")
def room_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from edge.config import parse_config
    from edge.daemon import build_pipelines, load_models
    from tests.onnx_models import snapshot_classifier

    base = tmp_path_factory.mktemp("fuzz")
    snapshot_classifier(base / "snap.onnx", ["temperature", "humidity", "co2"], ["a", "b", "c"])
    data = {
        "mqtt": {"url": "mqtt://127.0.0.1:1", "base_topic": "ei"},
        "models": {"snap": {"path": "snap.onnx"}},
        "pipelines": {
            "room": {
                "model": "snap",
                "source": {"topics": ["f/in"], "device_field": "id", "timestamp_field": "ts"},
                "features": {"type": "snapshot", "max_age_s": 1e12},
                "max_devices": 100_000,
            }
        },
        "homeassistant": {"enabled": False},
    }
    config = parse_config(data, "fuzz", base)
    return build_pipelines(config, load_models(config))["room"]


_TOPIC_FORBIDDEN = set(_FORBIDDEN_CHARS) | {"+", "#"}


@FUZZ
@given(device=hostile_ids, ts=hostile_times, value=huge_numbers)
def test_pipeline_refuses_hostile_times_numbers_and_ids_by_reason(
    room_pipeline: Any, device: Any, ts: Any, value: Any
) -> None:
    """Whatever the id, sample time and value: either a DecodeError with a documented reason, or
    items whose time lies in the window, whose vector is finite as float32, and whose output topic
    a broker accepts and no other device shares."""
    import time

    import numpy as np

    from edge.decode import EARLIEST_TS, sanitise_segment

    body = {"id": device, "ts": ts, "temperature": value, "humidity": 40, "co2": 500}
    payload = json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")
    now = time.time()
    reason = None
    items = []
    try:
        items = room_pipeline.handle("f/in", payload, 0.0, lambda *_a: None)
    except DecodeError as exc:
        reason = exc.reason
    assert reason is None or reason in REASONS
    skew = room_pipeline.max_skew_s
    for item in items:
        assert item.ts >= EARLIEST_TS and item.ts - now <= skew + 5, item.ts
        assert np.isfinite(item.vector).all() and item.vector.dtype == np.float32
        topic = room_pipeline.output_topic(item.device)
        assert not (set(topic) & _TOPIC_FORBIDDEN), topic
        leaf = topic.rsplit("/", 1)[1]
        assert leaf == item.device or sanitise_segment(leaf) != leaf  # mapped leaves are never ids
        assert len(leaf.encode("utf-8")) <= 4 * 128
        topic.encode("utf-8")  # no lone surrogate
