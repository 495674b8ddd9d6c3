"""Device profiles: every documented payload decodes to the expected readings; errors are precise."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import devices
from edge.decode import Availability, Decoded, DecodeError, parse_timestamp
from edge.families import load_profiles

FIXTURES = Path(devices.__file__).resolve().parent / "fixtures"
FIXTURE_FILES = sorted(FIXTURES.glob("*/*.json"))


def _events(case: dict[str, Any]) -> list[Any]:
    decoder = devices.build_decoder(case["profile"], readings=case["readings"], options=case["options"])
    out: list[Any] = []
    for msg in case["messages"]:
        topic = msg["topic"]
        events = decoder.decode(topic, msg["payload"].encode())
        if not any(_matches(f, topic) for f in decoder.filters):
            assert events == [], f"{topic} is not subscribed ({decoder.filters}) yet decodes"
        out.extend(events)
    return out


def _matches(filt: str, topic: str) -> bool:
    fp, tp = filt.split("/"), topic.split("/")
    for i, part in enumerate(fp):
        if part == "#":
            return True
        if i >= len(tp) or (part != "+" and part != tp[i]):
            return False
    return len(fp) == len(tp)


def test_every_family_has_fixtures() -> None:
    families = {p.parent.name for p in FIXTURE_FILES}
    assert families >= set(devices.list_profiles())


@pytest.mark.parametrize("path", FIXTURE_FILES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_fixture_decodes_to_expected(path: Path) -> None:
    case = json.loads(path.read_text(encoding="utf-8"))
    assert case["source"]
    events = _events(case)
    expected = case["expect"]
    assert len(events) == len(expected), events
    for got, want in zip(events, expected, strict=True):
        assert got.device == want["device"]
        if "online" in want:
            assert isinstance(got, Availability)
            assert got.online is want["online"]
            continue
        assert isinstance(got, Decoded)
        assert got.values == pytest.approx(want["values"])
        assert set(got.values) == set(want["values"])
        if "ts" in want:
            assert got.ts == pytest.approx(parse_timestamp(want["ts"], "expected"))


# --------------------------------------------------------------------------- profiles and API


def test_list_and_info() -> None:
    names = devices.list_profiles()
    assert names == sorted(["esphome", "json", "shelly", "statestream", "tasmota", "zigbee2mqtt"])
    info = devices.profile_info("tasmota")
    assert info["readings"]["power"] == {"path": "ENERGY.Power", "unit": "W"}
    assert info["topics"][1]["pattern"] == "{tele_prefix}/{device}/SENSOR"
    assert "devices" in info["options"]
    for name in names:
        assert devices.profile_info(name)["description"]
    assert devices.reading_unit("shelly", "power") == "W"
    assert devices.reading_unit("tasmota", "ENERGY.Power") == "W"


def test_filters() -> None:
    z = devices.build_decoder("zigbee2mqtt", readings={"power": "power"}, options={"base_topic": "z2m"})
    assert z.filters == ["z2m/+/availability", "z2m/+"]
    z = devices.build_decoder("zigbee2mqtt", readings={"power": "power"}, options={"devices": ["a", "b"]})
    assert z.filters == [
        "zigbee2mqtt/a/availability",
        "zigbee2mqtt/b/availability",
        "zigbee2mqtt/a",
        "zigbee2mqtt/b",
    ]
    e = devices.build_decoder(
        "esphome", readings={"t": "temperature", "m": "binary_sensor/motion"}, options={}
    )
    assert e.filters == ["+/status", "+/sensor/temperature/state", "+/binary_sensor/motion/state"]
    s = devices.build_decoder("shelly", readings={"p": "power"}, options={"prefix": "shellyplug-1"})
    assert s.filters == ["shellyplug-1/online", "shellyplug-1/status/+", "shellyplug-1/events/rpc"]
    h = devices.build_decoder("statestream", readings={"t": "sensor.a_t", "h": "sensor.a_h"}, options={})
    assert h.filters == ["homeassistant/sensor/a_t/state", "homeassistant/sensor/a_h/state"]
    t = devices.build_decoder("tasmota", readings={"p": "power"}, options={"tele_prefix": "home/tele"})
    assert t.filters == ["home/tele/+/LWT", "home/tele/+/SENSOR"]


def test_devices_option_restricts() -> None:
    d = devices.build_decoder("zigbee2mqtt", readings={"t": "temperature"}, options={"devices": ["kitchen"]})
    assert d.decode("zigbee2mqtt/kitchen", b'{"temperature": 20}') == [Decoded("kitchen", {"t": 20.0})]
    assert d.decode("zigbee2mqtt/garage", b'{"temperature": 20}') == []
    # a restricted device that lacks the reading is an error, not another kind of device
    with pytest.raises(DecodeError) as err:
        d.decode("zigbee2mqtt/kitchen", b'{"humidity": 20}')
    assert err.value.reason == "missing_field"


def test_bridge_topics_are_not_devices() -> None:
    d = devices.build_decoder("zigbee2mqtt", readings={"t": "temperature"}, options={})
    assert d.decode("zigbee2mqtt/bridge", b'{"temperature": 1}') == []
    assert d.decode("zigbee2mqtt/bridge/state", b'{"state":"online"}') == []
    assert d.decode("zigbee2mqtt/bridge/devices", b"[]") == []


def test_shelly_raw_component_path_and_info() -> None:
    d = devices.build_decoder("shelly", readings={"p1": "switch:1.apower", "p0": "power"}, options={})
    status0 = json.dumps({"id": 0, "apower": 5.5}).encode()
    status1 = json.dumps({"id": 1, "apower": 7.5}).encode()
    assert d.decode("shellypro2pm-abc/status/switch:0", status0) == []  # switch:1 not yet known
    with pytest.raises(DecodeError):
        d.decode("shellypro2pm-abc/status/switch:1", b'{"id":1}')
    assert d.decode("shellypro2pm-abc/status/switch:1", status1) == [
        Decoded("shellypro2pm-abc", {"p1": 7.5, "p0": 5.5})
    ]
    info = d.device_info("shellypro2pm-abc")  # type: ignore[attr-defined]
    assert info.manufacturer == "Shelly"
    assert info.model == "shellypro2pm"


def test_shelly_null_removes_key() -> None:
    d = devices.build_decoder("shelly", readings={"p": "power"}, options={})
    d.decode("s-1/status/switch:0", b'{"id":0,"apower":3}')
    delta = {"method": "NotifyStatus", "params": {"ts": 1.0, "switch:0": {"apower": None}}}
    assert d.decode("s-1/events/rpc", json.dumps(delta).encode()) == []
    assert d.decode("s-1/events/rpc", b'{"method":"NotifyEvent","params":{"ts":2,"events":[]}}') == []


def test_statestream_per_entity_domains() -> None:
    d = devices.build_decoder(
        "statestream", readings={"t": "state"}, options={"domains": ["sensor"], "base_topic": "ha/stream"}
    )
    assert d.filters == ["ha/stream/sensor/+/state"]
    assert d.decode("ha/stream/sensor/kitchen_temp/state", b'"19.5"') == [
        Decoded("sensor.kitchen_temp", {"t": 19.5})
    ]
    assert d.decode("ha/stream/light/x/state", b'"on"') == []
    assert d.decode("ha/stream/sensor/kitchen_temp/state", b'"unknown"') == []
    with pytest.raises(DecodeError) as err:
        d.decode("ha/stream/sensor/kitchen_temp/state", b'"cloudy"')
    assert err.value.reason == "non_numeric"


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("profile", "readings", "topic", "payload", "reason"),
    [
        (
            "tasmota",
            {"p": "power", "v": "voltage"},
            "tele/x/SENSOR",
            b'{"ENERGY":{"Power":5}}',
            "missing_field",
        ),
        ("tasmota", {"p": "power"}, "tele/x/SENSOR", b'{"ENERGY":{"Power":"n/a"}}', "non_numeric"),
        ("tasmota", {"p": "power"}, "tele/x/SENSOR", b'{"ENERGY":{"Power":NaN}}', "not_finite"),
        ("tasmota", {"p": "power"}, "tele/x/SENSOR", b'{"ENERGY":{"Power":Infinity}}', "not_finite"),
        ("tasmota", {"p": "power"}, "tele/x/SENSOR", b'{"ENERGY":', "malformed_json"),
        (
            "tasmota",
            {"p": "power"},
            "tele/x/SENSOR",
            b'{"Time":"yesterday","ENERGY":{"Power":1}}',
            "bad_timestamp",
        ),
        ("tasmota", {"p": "power"}, "tele/x/LWT", b"Maybe", "bad_availability"),
        (
            "zigbee2mqtt",
            {"t": "temperature"},
            "zigbee2mqtt/a",
            b'{"temperature":null,"humidity":3}',
            "non_numeric",
        ),
        ("zigbee2mqtt", {"t": "temperature"}, "zigbee2mqtt/a", b'{"temperature":[1]}', "non_numeric"),
        ("zigbee2mqtt", {"t": "temperature"}, "zigbee2mqtt/a/availability", b'{"status":1}', "missing_field"),
        ("esphome", {"t": "temperature"}, "n/sensor/temperature/state", b"nan", "not_finite"),
        ("esphome", {"t": "temperature"}, "n/sensor/temperature/state", b"warm", "non_numeric"),
        ("esphome", {"t": "temperature"}, "n/sensor/temperature/state", b"\xff\xfe", "non_numeric"),
        ("shelly", {"p": "power"}, "s/status/switch:0", b'{"id":0}', "missing_field"),
        ("shelly", {"p": "power"}, "s/status/switch:0", b'{"apower":"x"}', "non_numeric"),
        ("shelly", {"p": "power"}, "s/status/switch:0", b"[1,2]", "malformed_json"),
        ("shelly", {"p": "power"}, "s/events/rpc", b'{"method":"NotifyStatus"}', "missing_field"),
        ("shelly", {"p": "power"}, "s/online", b"maybe", "bad_availability"),
        ("statestream", {"t": "state"}, "homeassistant/sensor/a/state", b'{"a":1}', "non_numeric"),
        ("shelly", {"p": "power"}, "s/status/switch:0", b"{" + b" " * 70000 + b"}", "oversized"),
    ],
)
def test_decode_errors(
    profile: str, readings: dict[str, str], topic: str, payload: bytes, reason: str
) -> None:
    decoder = devices.build_decoder(profile, readings=readings, options={})
    with pytest.raises(DecodeError) as err:
        decoder.decode(topic, payload)
    assert err.value.reason == reason


@pytest.mark.parametrize(
    ("profile", "readings", "options", "match"),
    [
        ("zigbee3mqtt", {"p": "power"}, {}, "unknown device profile 'zigbee3mqtt'"),
        ("tasmota", {"p": "powr"}, {}, "'powr' is not a reading of profile 'tasmota'"),
        ("tasmota", {"p": "power"}, {"prefix": "x"}, "unknown option 'prefix' for device profile 'tasmota'"),
        ("zigbee2mqtt", {"p": "a..b"}, {}, "nor a valid field path"),
        ("zigbee2mqtt", {}, {}, "at least one reading"),
        ("zigbee2mqtt", {"p": "power"}, {"base_topic": "z/+"}, "without wildcards"),
        ("zigbee2mqtt", {"p": "power"}, {"devices": "kitchen"}, "non-empty list"),
        ("esphome", {"t": "Temperature Sensor"}, {}, "ESPHome object id"),
        ("shelly", {"p": "apower2"}, {}, "starts with the component"),
        ("shelly", {"p": "power"}, {"component": "switch 0"}, "not like 'switch:0'"),
        ("statestream", {"t": "sensor.a", "h": "humidity"}, {}, "use one form for all"),
        ("statestream", {"t": "st-ate"}, {}, "is not 'state', an attribute name"),
        ("json", {"x": "a.b"}, {}, "needs option 'topics'"),
        ("json", {"x": "a.b"}, {"topics": "a/b"}, "no {device} segment"),
        ("json", {"x": "a.b"}, {"topics": "a/{device}", "format": "xml"}, "json or plain"),
    ],
)
def test_config_errors(profile: str, readings: dict[str, str], options: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace("[", r"\[").replace("+", r"\+")):
        devices.build_decoder(profile, readings=readings, options=options)


def test_profiles_load() -> None:
    profiles = load_profiles()
    for profile in profiles.values():
        for reading in profile.readings.values():
            assert reading.path


# --------------------------------------------------------------------------- room simulator


def test_roomsim_physics() -> None:
    from devices.roomsim import SCHEDULES, RoomConfig, simulate_room

    rng = np.random.default_rng(7)
    for schedule in SCHEDULES:
        cfg = RoomConfig.random(rng, schedule)
        data = simulate_room(cfg, hours=72, period_s=120, seed=3)
        n = len(data["t"])
        assert n == 72 * 30 + 1
        for key in ("temperature", "humidity", "illuminance", "co2", "occupancy", "occupants"):
            assert data[key].shape == (n,)
            assert np.isfinite(data[key]).all()
        occ = data["occupancy"] > 0
        assert 0.03 < occ.mean() < 0.9, schedule
        # occupants raise CO2 above the empty room's level; outdoor air is the floor
        assert data["true_co2"][occ].mean() > data["true_co2"][~occ].mean() + 50
        assert data["true_co2"].min() > 400
        assert 5 < data["temperature"].mean() < 30
        assert data["humidity"].min() >= 0
        assert data["humidity"].max() <= 100
    # deterministic per seed
    cfg = RoomConfig()
    a = simulate_room(cfg, hours=24, period_s=60, seed=1)
    b = simulate_room(cfg, hours=24, period_s=60, seed=1)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_roomsim_steady_state_co2() -> None:
    """A room always occupied by one seated adult tends to C_out + G/Q."""
    from devices.roomsim import OUTDOOR_CO2_PPM, RoomConfig

    cfg = RoomConfig(floor_area_m2=10, height_m=2.5, ach=1.0)
    q = cfg.ach * cfg.volume_m3 / 3600.0
    expected = OUTDOOR_CO2_PPM + 0.005e-3 / q * 1e6
    assert 1100 < expected < 1200  # the textbook ~700 ppm above outdoors for 25 m³ at 1 ACH
