"""Unit tests of the Home Assistant discovery payloads (edge/discovery_payloads.py): no broker needed."""

from __future__ import annotations

import json
import random
import re
from typing import Any

import pytest

from edge.discovery_payloads import (
    BINARY_SENSOR_DEVICE_CLASSES,
    BRIDGE_INFO_KEYS,
    SENSOR_DEVICE_CLASS_STATE_CLASSES,
    SENSOR_DEVICE_CLASS_UNITS,
    AvailabilityTopic,
    BridgeInfo,
    DiscoveryError,
    DiscoveryMessage,
    DiscoveryTracker,
    Identity,
    OutputEntity,
    SourceDevice,
    bridge_discovery,
    bridge_info_payload,
    check_output,
    device_discovery,
    device_removal,
    device_topic,
    esphome_identity,
    expire_after,
    is_ha_online,
    mac_connection,
    reannounce_delay,
    slug,
    tasmota_identity,
    topic_id,
    zigbee2mqtt_identities,
)

BRIDGE = BridgeInfo(version="1.2.3", instance_id="home", support_url="https://example.invalid/support")
PLUG = SourceDevice(
    "kitchen_plug",
    name="Kitchen plug",
    model="BW-SHP13",
    manufacturer="BlitzWolf",
    suggested_area="Kitchen",
    availability=AvailabilityTopic(
        "zigbee2mqtt/kitchen_plug/availability", value_template="{{ value_json.state }}"
    ),
)
APPLIANCE = OutputEntity(
    "appliance",
    "classification",
    "edge-infer/appliance/kitchen_plug",
    labels=("fridge", "kettle", "washing_machine", "off"),
    cadence_s=30,
)
FORECAST = OutputEntity(
    "power_forecast", "regression", "edge-infer/power_forecast/kitchen_plug", unit="W", device_class="power"
)
ANOMALY = OutputEntity("anomaly", "anomaly", "edge-infer/anomaly/kitchen_plug", threshold=0.8, cadence_s=10)
OCCUPANCY = OutputEntity(
    "occupancy",
    "classification",
    "edge-infer/occupancy/kitchen_plug",
    labels=("empty", "occupied"),
    binary_on="occupied",
    device_class="occupancy",
)
ALL = [APPLIANCE, FORECAST, ANOMALY, OCCUPANCY]


def render(template: str, payload: dict[str, Any]) -> str:
    """Render a value template the way Home Assistant's MQTT integration does (to a string)."""
    sandbox = pytest.importorskip("jinja2.sandbox", reason="jinja2 renders Home Assistant's value templates")
    env = sandbox.ImmutableSandboxedEnvironment()
    env.tests["number"] = lambda v: isinstance(v, int | float) and not isinstance(v, bool)
    return str(env.from_string(template).render(value_json=payload))


def payload_of(message: DiscoveryMessage) -> dict[str, Any]:
    data = json.loads(message.payload)
    assert isinstance(data, dict)
    return data


def cmps(message: DiscoveryMessage) -> dict[str, dict[str, Any]]:
    return payload_of(message)["cmps"]  # type: ignore[no-any-return]


PREDICTION = {
    "label": "kettle",
    "confidence": 0.9731,
    "value": None,
    "score": None,
    "model": "appliance",
    "model_version": "1.2.0",
    "latency_ms": 0.8,
    "ts": "2025-01-01T00:00:00Z",
}


# ------------------------------------------------------------------------------------------ topics


def test_device_topic_and_shared_shape() -> None:
    message = device_discovery(BRIDGE, PLUG, ALL)
    assert message.topic == "homeassistant/device/edge_infer_home_kitchen_plug/config"
    assert message.retain is True
    assert message.qos == 1
    data = payload_of(message)
    assert set(data) == {"dev", "o", "availability", "availability_mode", "cmps"}
    assert data["o"] == {"name": "edge-infer", "sw": "1.2.3", "url": "https://example.invalid/support"}
    assert data["dev"] == {
        "identifiers": ["edge_infer_home_kitchen_plug"],
        "name": "Kitchen plug",
        "model": "BW-SHP13",
        "manufacturer": "BlitzWolf",
        "suggested_area": "Kitchen",
        "via_device": "edge_infer_home",
    }


def test_topic_ids_are_clean_and_stable() -> None:
    for text in ("kitchen_plug", "Living-Room_2", "0x00158d0001a2b3c4"):
        assert topic_id(text) == text
    messy = topic_id("living room/lamp")
    assert re.fullmatch(r"[a-zA-Z0-9_-]+", messy)
    assert messy == topic_id("living room/lamp")  # deterministic
    assert messy != topic_id("living_room_lamp")  # no collision with the clean spelling
    assert topic_id("über") != topic_id("ber")
    with pytest.raises(DiscoveryError):
        topic_id("")
    assert slug("Kitchen Plug #2") == "kitchen_plug_2"
    assert slug("!!!") == "edge_infer"
    topic = device_topic(BRIDGE, SourceDevice("living room/lamp"))
    assert "+" not in topic
    assert "#" not in topic
    assert re.fullmatch(r"homeassistant/device/[a-zA-Z0-9_-]+/config", topic)


def test_bridge_rejects_bad_prefixes() -> None:
    with pytest.raises(DiscoveryError):
        BridgeInfo(version="1", base_topic="edge/#")
    with pytest.raises(DiscoveryError):
        BridgeInfo(version="1", discovery_prefix="/homeassistant")
    with pytest.raises(DiscoveryError):
        BridgeInfo(version="1", instance_id=" ")
    custom = BridgeInfo(version="1", discovery_prefix="ha", base_topic="site/edge")
    assert custom.status_topic == "site/edge/status"
    assert custom.info_topic == "site/edge/bridge/info"
    assert device_topic(custom) == "ha/device/edge_infer_default/config"
    assert custom.display_name == "edge-infer"
    assert custom.discovery_subscription == "ha/device/+/config"
    assert "url" not in custom.origin()


# -------------------------------------------------------------------------------------- components


def test_every_component_has_platform_unique_id_and_default_entity_id() -> None:
    components = cmps(device_discovery(BRIDGE, PLUG, ALL))
    assert set(components) == {
        "appliance",
        "appliance_confidence",
        "power_forecast",
        "anomaly",
        "anomaly_score",
        "occupancy",
        "occupancy_confidence",
    }
    unique_ids = set()
    for key, component in components.items():
        assert re.fullmatch(r"[a-zA-Z0-9_-]+", key)
        platform = component["platform"]
        assert platform in ("sensor", "binary_sensor")
        assert component["unique_id"].startswith("edge_infer_home_kitchen_plug_")
        unique_ids.add(component["unique_id"])
        domain, object_id = component["default_entity_id"].split(".")
        assert domain == platform
        assert re.fullmatch(r"[a-z0-9_]+", object_id)
        assert "object_id" not in component  # deprecated in favour of default_entity_id
        assert component["state_topic"].startswith("edge-infer/")
        assert component["name"]
    assert len(unique_ids) == len(components)


def test_classification_is_an_enum_sensor_with_options() -> None:
    component = cmps(device_discovery(BRIDGE, PLUG, [APPLIANCE]))["appliance"]
    assert component["platform"] == "sensor"
    assert component["device_class"] == "enum"
    assert component["options"] == ["fridge", "kettle", "washing_machine", "off"]
    # options exclude a unit and a state class (Home Assistant rejects the combination)
    assert "unit_of_measurement" not in component
    assert "state_class" not in component
    assert component["default_entity_id"] == "sensor.kitchen_plug_appliance"
    assert component["name"] == "Appliance"
    assert render(component["value_template"], PREDICTION) == "kettle"
    # a null label (below min_confidence) shows as unknown: Home Assistant maps "None" to unknown
    assert render(component["value_template"], {**PREDICTION, "label": None}) == "None"
    assert render(component["value_template"], {"confidence": 0.1}) == "None"


def test_confidence_is_a_diagnostic_percentage() -> None:
    component = cmps(device_discovery(BRIDGE, PLUG, [APPLIANCE]))["appliance_confidence"]
    assert component["platform"] == "sensor"
    assert component["entity_category"] == "diagnostic"
    assert component["unit_of_measurement"] == "%"
    assert component["state_class"] == "measurement"
    assert "device_class" not in component
    assert float(render(component["value_template"], PREDICTION)) == pytest.approx(97.31)
    assert render(component["value_template"], {**PREDICTION, "confidence": None}) == "None"


def test_regression_has_unit_device_class_and_state_class() -> None:
    component = cmps(device_discovery(BRIDGE, PLUG, [FORECAST]))["power_forecast"]
    assert component["device_class"] == "power"
    assert component["unit_of_measurement"] == "W"
    assert component["state_class"] == "measurement"
    assert render(component["value_template"], {**PREDICTION, "value": 93.4}) == "93.4"
    assert render(component["value_template"], PREDICTION) == "None"
    assert "expire_after" not in component  # no cadence given: never expires


def test_regression_energy_defaults_to_a_total_state_class() -> None:
    energy = OutputEntity("energy", "regression", "t/energy/d", unit="kWh", device_class="energy")
    component = cmps(device_discovery(BRIDGE, PLUG, [energy]))["energy"]
    assert component["state_class"] == "total"
    assert check_output(energy) == []


def test_regression_without_device_class_keeps_any_unit() -> None:
    plain = OutputEntity("comfort", "regression", "t/comfort/d", unit="points", display_precision=1)
    component = cmps(device_discovery(BRIDGE, PLUG, [plain]))["comfort"]
    assert "device_class" not in component
    assert component["unit_of_measurement"] == "points"
    assert component["state_class"] == "measurement"
    assert component["suggested_display_precision"] == 1


def test_unit_that_does_not_fit_the_device_class_is_never_announced() -> None:
    wrong = OutputEntity("power_forecast", "regression", "t/p/d", unit="kWh", device_class="power")
    problems = check_output(wrong)
    assert len(problems) == 1
    assert "does not fit device class 'power'" in problems[0]
    component = cmps(device_discovery(BRIDGE, PLUG, [wrong]))["power_forecast"]
    assert "device_class" not in component  # dropped, the unit stays
    assert component["unit_of_measurement"] == "kWh"


def test_state_class_that_does_not_fit_is_replaced() -> None:
    wrong = OutputEntity(
        "t", "regression", "t/t/d", unit="°C", device_class="temperature", state_class="total"
    )
    assert any("state_class 'total'" in p for p in check_output(wrong))
    component = cmps(device_discovery(BRIDGE, PLUG, [wrong]))["t"]
    assert component["device_class"] == "temperature"
    assert component["state_class"] == "measurement"


@pytest.mark.parametrize(
    ("device_class", "unit"),
    [
        ("power", "W"),
        ("power", "kW"),
        ("energy", "kWh"),
        ("temperature", "°C"),
        ("temperature", "°F"),
        ("humidity", "%"),
        ("illuminance", "lx"),
        ("carbon_dioxide", "ppm"),
        ("current", "A"),
        ("voltage", "V"),
        ("duration", "s"),
        ("water", "L"),
        ("pressure", "hPa"),
    ],
)
def test_units_valid_for_device_class(device_class: str, unit: str) -> None:
    output = OutputEntity("x", "regression", "t/x/d", unit=unit, device_class=device_class)
    assert check_output(output) == []
    component = cmps(device_discovery(BRIDGE, PLUG, [output]))["x"]
    assert component["device_class"] == device_class
    assert component["unit_of_measurement"] == unit
    assert component["state_class"] in SENSOR_DEVICE_CLASS_STATE_CLASSES[device_class]


def test_every_announced_sensor_combination_is_consistent() -> None:
    """Whatever is announced: units fit device classes, state classes fit, options stand alone."""
    messages = [bridge_discovery(BRIDGE), device_discovery(BRIDGE, PLUG, ALL)]
    for message in messages:
        for component in cmps(message).values():
            device_class = component.get("device_class")
            if component["platform"] == "binary_sensor":
                assert device_class is None or device_class in BINARY_SENSOR_DEVICE_CLASSES
                continue
            if "options" in component:
                assert device_class == "enum"
                assert "unit_of_measurement" not in component
                assert "state_class" not in component
            if device_class in SENSOR_DEVICE_CLASS_UNITS:
                assert component.get("unit_of_measurement") in SENSOR_DEVICE_CLASS_UNITS[device_class]
                if "state_class" in component:
                    assert component["state_class"] in SENSOR_DEVICE_CLASS_STATE_CLASSES[device_class]
            if component.get("entity_category") is not None:
                assert component["entity_category"] == "diagnostic"  # the only category sensors allow


def test_anomaly_is_a_problem_binary_sensor_with_score() -> None:
    components = cmps(device_discovery(BRIDGE, PLUG, [ANOMALY]))
    binary = components["anomaly"]
    assert binary["platform"] == "binary_sensor"
    assert binary["device_class"] == "problem"
    assert binary["payload_on"] == "ON"
    assert binary["payload_off"] == "OFF"
    assert binary["expire_after"] == 70
    template = binary["value_template"]
    assert render(template, {"label": "anomaly", "score": 0.95}) == "ON"
    assert render(template, {"label": "normal", "score": 0.95}) == "OFF"
    assert render(template, {"label": None, "score": 0.85}) == "ON"
    assert render(template, {"label": None, "score": 0.5}) == "OFF"
    assert render(template, {"label": None, "score": None}) == "None"
    score = components["anomaly_score"]
    assert score["entity_category"] == "diagnostic"
    assert score["name"] == "Anomaly score"
    assert render(score["value_template"], {"score": 0.125}) == "0.125"


def test_anomaly_without_threshold_follows_the_label() -> None:
    plain = OutputEntity("leak", "anomaly", "t/leak/d", device_class="moisture")
    binary = cmps(device_discovery(BRIDGE, PLUG, [plain]))["leak"]
    assert binary["device_class"] == "moisture"
    assert render(binary["value_template"], {"label": "anomaly"}) == "ON"
    assert render(binary["value_template"], {"label": "normal"}) == "OFF"
    assert render(binary["value_template"], {"label": None, "score": 3.0}) == "None"


def test_binary_classification_is_an_occupancy_binary_sensor() -> None:
    components = cmps(device_discovery(BRIDGE, PLUG, [OCCUPANCY]))
    binary = components["occupancy"]
    assert binary["platform"] == "binary_sensor"
    assert binary["device_class"] == "occupancy"
    assert binary["default_entity_id"] == "binary_sensor.kitchen_plug_occupancy"
    assert render(binary["value_template"], {"label": "occupied"}) == "ON"
    assert render(binary["value_template"], {"label": "empty"}) == "OFF"
    assert render(binary["value_template"], {"label": None}) == "None"
    assert components["occupancy_confidence"]["entity_category"] == "diagnostic"


def test_bad_binary_device_class_is_reported_and_dropped() -> None:
    bad = OutputEntity("x", "anomaly", "t/x/d", device_class="power_factor")
    assert check_output(bad)
    assert "device_class" not in cmps(device_discovery(BRIDGE, PLUG, [bad]))["x"]


def test_classification_without_labels_is_refused() -> None:
    bad = OutputEntity("x", "classification", "t/x/d")
    assert check_output(bad)
    with pytest.raises(DiscoveryError):
        device_discovery(BRIDGE, PLUG, [bad])
    with pytest.raises(DiscoveryError):
        device_discovery(BRIDGE, PLUG, [])


# ------------------------------------------------------------------------------------ availability


def test_availability_is_a_list_of_daemon_and_source_with_mode_all() -> None:
    data = payload_of(device_discovery(BRIDGE, PLUG, ALL))
    assert data["availability_mode"] == "all"
    assert data["availability"] == [
        {"topic": "edge-infer/status", "payload_available": "online", "payload_not_available": "offline"},
        {
            "topic": "zigbee2mqtt/kitchen_plug/availability",
            "payload_available": "online",
            "payload_not_available": "offline",
            "value_template": "{{ value_json.state }}",
        },
    ]
    for component in data["cmps"].values():
        assert "availability" not in component
        assert "availability_topic" not in component


def test_availability_without_source_topic() -> None:
    data = payload_of(device_discovery(BRIDGE, SourceDevice("sensor_1"), [FORECAST]))
    assert [a["topic"] for a in data["availability"]] == ["edge-infer/status"]
    assert data["availability_mode"] == "all"
    assert data["dev"]["name"] == "sensor_1"


@pytest.mark.parametrize(
    ("cadence", "expected"), [(None, None), (0, None), (-1, None), (1, 61), (30, 90), (300, 900), (0.5, 61)]
)
def test_expire_after_from_cadence(cadence: float | None, expected: int | None) -> None:
    assert expire_after(cadence) == expected


def test_expire_after_on_every_entity_of_an_output() -> None:
    for key, component in cmps(device_discovery(BRIDGE, PLUG, [APPLIANCE, ANOMALY])).items():
        assert component["expire_after"] == (90 if key.startswith("appliance") else 70)


# ------------------------------------------------------------------------------------------ bridge


def test_bridge_device_and_diagnostics() -> None:
    message = bridge_discovery(BRIDGE)
    assert message.topic == "homeassistant/device/edge_infer_home/config"
    data = payload_of(message)
    assert data["dev"]["identifiers"] == ["edge_infer_home"]
    assert data["dev"]["sw_version"] == "1.2.3"
    assert data["dev"]["name"] == "edge-infer home"
    assert "via_device" not in data["dev"]
    assert data["availability"] == [
        {"topic": "edge-infer/status", "payload_available": "online", "payload_not_available": "offline"}
    ]
    assert data["availability_mode"] == "all"
    components = data["cmps"]
    assert set(components) == {"version", "started", "messages_per_s", "drops", "latency"}
    for component in components.values():
        assert component["platform"] == "sensor"
        assert component["entity_category"] == "diagnostic"
        assert component["state_topic"] == "edge-infer/bridge/info"
        assert component["unique_id"].startswith("edge_infer_home_")
        assert component["default_entity_id"].startswith("sensor.edge_infer_home_")
    assert components["latency"]["device_class"] == "duration"
    assert components["latency"]["unit_of_measurement"] == "ms"
    # uptime as the start time: one state per run, not one per bridge info in the recorder
    assert components["started"]["device_class"] == "timestamp"
    assert "state_class" not in components["started"] and "unit_of_measurement" not in components["started"]


def test_bridge_templates_read_bridge_info() -> None:
    info = json.loads(
        bridge_info_payload(
            version="1.2.3",
            uptime_s=3600.04,
            messages_per_s=12.5,
            drops=3,
            latency_ms=0.8123,
            started="2026-12-03T16:00:00.000Z",
            models=["m"],
        )
    )
    assert set(BRIDGE_INFO_KEYS) <= set(info)
    assert info["models"] == ["m"]
    components = cmps(bridge_discovery(BRIDGE))
    assert render(components["version"]["value_template"], info) == "1.2.3"
    assert render(components["started"]["value_template"], info) == "2026-12-03T16:00:00.000Z"
    assert render(components["messages_per_s"]["value_template"], info) == "12.5"
    assert render(components["drops"]["value_template"], info) == "3"
    assert render(components["latency"]["value_template"], info) == "0.812"
    no_latency = json.loads(
        bridge_info_payload(version="1", uptime_s=1, messages_per_s=0, drops=0, latency_ms=None)
    )
    assert render(components["latency"]["value_template"], no_latency) == "None"


# ----------------------------------------------------------------------------------------- removal


def test_removal_is_an_empty_retained_payload() -> None:
    message = device_removal(BRIDGE, PLUG)
    assert message == DiscoveryMessage("homeassistant/device/edge_infer_home_kitchen_plug/config", "")
    assert message.retain
    assert message.is_removal
    assert device_removal(BRIDGE).topic == "homeassistant/device/edge_infer_home/config"


def test_ha_birth_helpers() -> None:
    assert is_ha_online(b"online")
    assert is_ha_online("online\n")
    assert not is_ha_online(b"offline")
    delays = {reannounce_delay(random.Random(seed)) for seed in range(20)}
    assert all(0.5 <= d <= 5.0 for d in delays)
    assert len(delays) > 1
    assert reannounce_delay(random.Random(1)) == reannounce_delay(random.Random(1))


# ----------------------------------------------------------------------------------------- tracker


def _by_topic(messages: list[DiscoveryMessage]) -> dict[str, list[DiscoveryMessage]]:
    out: dict[str, list[DiscoveryMessage]] = {}
    for message in messages:
        out.setdefault(message.topic, []).append(message)
    return out


def test_tracker_first_plan_announces_bridge_and_devices() -> None:
    tracker = DiscoveryTracker(BRIDGE)
    fan = SourceDevice("fan")
    messages = tracker.plan([(PLUG, [APPLIANCE]), (fan, [FORECAST]), (SourceDevice("idle"), [])])
    topics = [m.topic for m in messages]
    assert topics[0] == device_topic(BRIDGE)  # the bridge first: via_device must exist
    assert set(topics) == {device_topic(BRIDGE), device_topic(BRIDGE, PLUG), device_topic(BRIDGE, fan)}
    assert not any(m.is_removal for m in messages)
    assert tracker.topics == frozenset(topics)


def test_tracker_is_quiet_when_nothing_changed() -> None:
    tracker = DiscoveryTracker(BRIDGE)
    tracker.plan([(PLUG, [APPLIANCE])])
    assert tracker.plan([(PLUG, [APPLIANCE])]) == []


def test_tracker_announce_all_repeats_current_configs() -> None:
    tracker = DiscoveryTracker(BRIDGE)
    first = tracker.plan([(PLUG, [APPLIANCE, FORECAST])])
    again = tracker.announce_all()
    assert sorted((m.topic, m.payload) for m in again) == sorted((m.topic, m.payload) for m in first)
    assert all(m.retain for m in again)


def test_tracker_removes_a_device_that_is_gone() -> None:
    tracker = DiscoveryTracker(BRIDGE)
    fan = SourceDevice("fan")
    tracker.plan([(PLUG, [APPLIANCE]), (fan, [FORECAST])])
    messages = tracker.plan([(PLUG, [APPLIANCE])])
    assert messages == [device_removal(BRIDGE, fan)]


def test_tracker_removes_a_pipeline_that_left_a_device() -> None:
    tracker = DiscoveryTracker(BRIDGE)
    tracker.plan([(PLUG, [APPLIANCE, FORECAST])])
    messages = _by_topic(tracker.plan([(PLUG, [APPLIANCE])]))
    stub, final = messages[device_topic(BRIDGE, PLUG)]
    # step 1: the removed component is announced with its platform only, as the documentation asks
    stub_cmps = payload_of(stub)["cmps"]
    assert stub_cmps["power_forecast"] == {"platform": "sensor"}
    assert "unique_id" in stub_cmps["appliance"]
    # step 2: the clean config without it, which is what stays retained
    assert set(payload_of(final)["cmps"]) == {"appliance", "appliance_confidence"}
    assert final.retain


def test_tracker_updates_a_changed_output_in_place() -> None:
    tracker = DiscoveryTracker(BRIDGE)
    tracker.plan([(PLUG, [APPLIANCE])])
    more_labels = OutputEntity(
        "appliance", "classification", APPLIANCE.state_topic, labels=(*APPLIANCE.labels, "toaster")
    )
    messages = tracker.plan([(PLUG, [more_labels])])
    assert len(messages) == 1
    assert "toaster" in payload_of(messages[0])["cmps"]["appliance"]["options"]


def test_tracker_clears_ghosts_from_an_earlier_run() -> None:
    """After a restart with a changed config, retained configs read back from the broker are
    compared with the new config: devices that are gone are cleared."""
    earlier = DiscoveryTracker(BRIDGE)
    fan = SourceDevice("fan")
    retained = {m.topic: m.payload for m in earlier.plan([(PLUG, [APPLIANCE, FORECAST]), (fan, [FORECAST])])}

    other_bridge = BridgeInfo(version="1", instance_id="garage")
    foreign = device_discovery(other_bridge, SourceDevice("door"), [ANOMALY])
    retained[foreign.topic] = foreign.payload
    retained["homeassistant/device/zigbee2mqtt_0x1234/config"] = json.dumps(
        {"dev": {"ids": ["zigbee2mqtt_0x1234"]}, "o": {"name": "Zigbee2MQTT"}, "cmps": {}}
    )
    retained["homeassistant/device/broken/config"] = "{not json"
    retained["homeassistant/sensor/x/config"] = "{}"

    restarted = DiscoveryTracker(BRIDGE)
    owned = {
        topic for topic, payload in retained.items() if restarted.observe_retained(topic, payload.encode())
    }
    assert owned == {device_topic(BRIDGE), device_topic(BRIDGE, PLUG), device_topic(BRIDGE, fan)}
    assert not restarted.observe_retained(device_topic(BRIDGE, fan), b"")

    messages = _by_topic(restarted.plan([(PLUG, [APPLIANCE])]))
    assert messages[device_topic(BRIDGE, fan)] == [device_removal(BRIDGE, fan)]
    stub, final = messages[device_topic(BRIDGE, PLUG)]
    assert payload_of(stub)["cmps"]["power_forecast"] == {"platform": "sensor"}
    assert "power_forecast" not in payload_of(final)["cmps"]
    assert device_topic(BRIDGE) not in messages  # unchanged bridge config: nothing to publish
    assert foreign.topic not in messages  # another instance's devices are left alone


def test_tracker_clear_all() -> None:
    tracker = DiscoveryTracker(BRIDGE)
    tracker.plan([(PLUG, [APPLIANCE])])
    messages = tracker.clear_all()
    assert {m.topic for m in messages} == {device_topic(BRIDGE), device_topic(BRIDGE, PLUG)}
    assert all(m.is_removal and m.retain for m in messages)
    assert tracker.topics == frozenset()
    assert tracker.clear_all() == []


def test_tracker_refuses_duplicate_devices() -> None:
    tracker = DiscoveryTracker(BRIDGE)
    with pytest.raises(DiscoveryError):
        tracker.plan([(PLUG, [APPLIANCE]), (SourceDevice("kitchen_plug"), [FORECAST])])


def test_payloads_are_deterministic() -> None:
    one = device_discovery(BRIDGE, PLUG, [FORECAST, APPLIANCE])
    two = device_discovery(BRIDGE, PLUG, [APPLIANCE, FORECAST])
    assert one == two


def test_readback_junk_is_counted_never_raised() -> None:
    """Issue 19: a deep array, a 5,000-digit integer or an oversized payload retained on the
    discovery prefix is counted, not raised (it used to kill the daemon at start)."""
    from edge.discovery_payloads import MAX_READBACK_BYTES, BridgeInfo, DiscoveryTracker

    tracker = DiscoveryTracker(
        BridgeInfo(version="0", base_topic="edge", instance_id="main", discovery_prefix="homeassistant")
    )
    topic = "homeassistant/device/x/config"
    junk = [b"[" * 200_000 + b"]" * 200_000, b"9" * 5000, b" " * (MAX_READBACK_BYTES + 1)]
    for payload in junk:
        assert tracker.observe_retained(topic, payload) is False
    assert tracker.readback_rejected == len(junk)


def test_tracker_lists_the_state_topics_it_read_back() -> None:
    """What the daemon matches against its pipelines' output topics to re-announce, not remove,
    the devices of an earlier run that the config still covers."""
    earlier = DiscoveryTracker(BRIDGE)
    retained = earlier.plan([(PLUG, [APPLIANCE, FORECAST])])
    restarted = DiscoveryTracker(BRIDGE)
    for message in retained:
        restarted.observe_retained(message.topic, message.payload.encode())
    topics = restarted.announced_state_topics()
    assert APPLIANCE.state_topic in topics and FORECAST.state_topic in topics
    assert BRIDGE.info_topic in topics
    assert len(topics) == len(set(topics)) == 3


# ------------------------------------------------------------------------------ device linking

Z2M_DEVICES = [
    {"ieee_address": "0x00124b0012345678", "type": "Coordinator", "friendly_name": "Coordinator"},
    {
        "ieee_address": "0x00158d0001a2b3c4",
        "type": "Router",
        "friendly_name": "kitchen_plug",
        "definition": {"model": "BW-SHP13", "vendor": "BlitzWolf"},
    },
    {"ieee_address": "not-an-ieee", "type": "EndDevice", "friendly_name": "junk"},
    {"ieee_address": "0x00158d0001a2b3c5", "type": "EndDevice"},
    "not a device",
]


def test_zigbee2mqtt_identities_from_bridge_devices() -> None:
    identities = zigbee2mqtt_identities(Z2M_DEVICES)
    assert identities == {
        "kitchen_plug": Identity(identifiers=("zigbee2mqtt_0x00158d0001a2b3c4",), name="kitchen_plug")
    }
    assert zigbee2mqtt_identities({"not": "a list"}) == {}


def test_tasmota_identity_and_mac_spellings() -> None:
    config = {"t": "tasmota_1A2B3C", "mac": "A4CF121A2B3C", "dn": "Dryer plug", "ip": "10.0.0.9"}
    assert tasmota_identity(config) == (
        "tasmota_1A2B3C",
        Identity(connections=(("mac", "a4:cf:12:1a:2b:3c"),), name="Dryer plug"),
    )
    assert tasmota_identity({"t": "x", "mac": "nope"}) is None
    assert tasmota_identity(["t"]) is None
    for spelling in ("A4:CF:12:1A:2B:3C", "a4-cf-12-1a-2b-3c", "a4cf.121a.2b3c"):
        assert mac_connection(spelling) == ("mac", "a4:cf:12:1a:2b:3c")


def test_a_linked_device_is_the_familys_own_device() -> None:
    """Only what identifies the device and its name: no via_device, model or manufacturer that
    would fight the family's own config over the same Home Assistant device."""
    linked = SourceDevice(
        "kitchen_plug",
        name="Kitchen plug",
        model="BW-SHP13",
        manufacturer="BlitzWolf",
        identity=Identity(identifiers=("zigbee2mqtt_0x00158d0001a2b3c4",), name="kitchen_plug"),
    )
    dev = payload_of(device_discovery(BRIDGE, linked, [APPLIANCE]))["dev"]
    assert dev == {"identifiers": ["zigbee2mqtt_0x00158d0001a2b3c4"], "name": "kitchen_plug"}
    tasmota = SourceDevice("dryer", identity=Identity(connections=(("mac", "a4:cf:12:1a:2b:3c"),)))
    dev = payload_of(device_discovery(BRIDGE, tasmota, [APPLIANCE]))["dev"]
    assert dev == {"connections": [["mac", "a4:cf:12:1a:2b:3c"]]}
    # the topic and unique ids stay edge-infer's, whatever device the entities sit on
    assert device_discovery(BRIDGE, linked, [APPLIANCE]).topic == device_topic(BRIDGE, PLUG)


def test_a_linked_device_read_back_is_recognised_as_ours() -> None:
    """A linked config names neither the bridge as via_device nor an edge-infer identifier: it is
    recognised by its origin and its components' unique ids, so restarts handle it like the rest."""
    linked = SourceDevice("kitchen_plug", identity=Identity(identifiers=("zigbee2mqtt_0x00158d0001a2b3c4",)))
    message = device_discovery(BRIDGE, linked, [APPLIANCE])
    assert DiscoveryTracker(BRIDGE).observe_retained(message.topic, message.payload.encode())
    other = BridgeInfo(version="1", instance_id="garage")
    assert not DiscoveryTracker(other).observe_retained(message.topic, message.payload.encode())


def test_own_devices_have_a_model_and_manufacturer() -> None:
    dev = payload_of(device_discovery(BRIDGE, SourceDevice("fan"), [FORECAST]))["dev"]
    assert dev["manufacturer"] == "edge-infer" and dev["model"] == "Predictions"
    assert dev["via_device"] == BRIDGE.identifier


# ---------------------------------------------------------------------------------- extras


def test_readable_class_names_with_the_raw_label_as_attribute() -> None:
    named = OutputEntity(
        "appliance",
        "classification",
        "edge-infer/appliance/kitchen_plug",
        labels=("fridge_freezer", "coffee_machine", "off"),
        label_names=("Fridge freezer", "Coffee machine", "Off"),
    )
    component = cmps(device_discovery(BRIDGE, PLUG, [named]))["appliance"]
    assert component["options"] == ["Fridge freezer", "Coffee machine", "Off"]
    prediction = {**PREDICTION, "label": "coffee_machine"}
    assert render(component["value_template"], prediction) == "Coffee machine"
    assert render(component["value_template"], {**PREDICTION, "label": None}) == "None"
    assert component["json_attributes_topic"] == named.state_topic
    attributes = json.loads(render(component["json_attributes_template"], prediction))
    assert attributes == {"label": "coffee_machine", "model": "appliance", "model_version": "1.2.0"}
    # names that do not fit (too few, or two labels with one name) leave the raw labels
    for names in (("Fridge",), ("Same", "Same", "Off")):
        odd = OutputEntity("a", "classification", "t", labels=named.labels, label_names=names)
        assert cmps(device_discovery(BRIDGE, PLUG, [odd]))["a"]["options"] == list(named.labels)


def test_readable_labels_from_config_or_the_card() -> None:
    from edge.discovery import readable_labels

    assert readable_labels(["fridge_freezer", "tv"], None) == ("Fridge freezer", "Tv")
    assert readable_labels(["fridge_freezer", "tv"], {"tv": "Television"}) == ("Fridge freezer", "Television")


def test_bridge_has_version_and_holdout_accuracy_per_model() -> None:
    components = cmps(DiscoveryMessage("t", json.dumps(bridge_config_of(["appliance", "occupancy"]))))
    info = {"models": {"appliance": {"version": "1.0.0", "accuracy": 0.9}, "occupancy": {"version": "2"}}}
    assert render(components["model_appliance_version"]["value_template"], info) == "1.0.0"
    assert render(components["model_appliance_accuracy"]["value_template"], info) == "90.0"
    assert render(components["model_occupancy_accuracy"]["value_template"], info) == "None"
    assert components["model_appliance_accuracy"]["unit_of_measurement"] == "%"
    assert all(c["entity_category"] == "diagnostic" for c in components.values())
    assert len({c["unique_id"] for c in components.values()}) == len(components)


def bridge_config_of(models: list[str]) -> dict[str, Any]:
    from edge.discovery_payloads import bridge_config

    return bridge_config(BRIDGE, models)


def test_holdout_accuracy_from_the_manifest() -> None:
    from edge.discovery import holdout_accuracy
    from edge.manifest import Manifest

    class Spec:
        def __init__(self, metrics: dict[str, Any] | None) -> None:
            self.manifest = None if metrics is None else Manifest.model_construct(metrics=metrics)

    assert holdout_accuracy(Spec({"train": {"accuracy": 1.0}, "pytorch_test": {"accuracy": 0.9}})) == 0.9  # type: ignore[arg-type]
    assert holdout_accuracy(Spec({"val": {"accuracy": 0.8}})) == 0.8  # type: ignore[arg-type]
    assert holdout_accuracy(Spec({"test": {"f1": 0.8}})) is None  # type: ignore[arg-type]
    assert holdout_accuracy(Spec(None)) is None  # type: ignore[arg-type]


def test_esphome_identity_from_its_own_discovery() -> None:
    config = {
        "stat_t": "livingroom/sensor/temperature/state",
        "avty_t": "livingroom/status",
        "dev": {"ids": "a4cf12abcdef", "name": "livingroom", "sw": "esphome v2025.2.0",
                "cns": [["mac", "a4cf12abcdef"]]},
    }  # fmt: skip
    assert esphome_identity(config) == (
        "livingroom",
        Identity(("a4cf12abcdef",), (("mac", "a4:cf:12:ab:cd:ef"),), "livingroom"),
    )
    no_availability = {**config, "avty_t": None}
    assert esphome_identity(no_availability) == esphome_identity(config)  # node from the state topic
    zigbee = {**config, "dev": {"ids": ["zigbee2mqtt_0x1"], "sw": "2.1.0"}, "o": {"name": "Zigbee2MQTT"}}
    assert esphome_identity(zigbee) is None
    assert esphome_identity({**config, "dev": {"sw": "esphome v1"}}) is None  # nothing to link by
    assert esphome_identity("junk") is None
