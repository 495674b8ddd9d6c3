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
        {"topics": "w/{device}/imu", "timestamp_path": "ts", "availability_topic": "w/{device}/status"},
    ),
    ("json", {"x": "x"}, {"topics": ["j/{device}/one", "j/{device}/two"], "device_path": "id"}),
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
