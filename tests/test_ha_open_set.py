"""A real Home Assistant Core shows an open-set classifier's ``unknown`` as a state of its enum and
``ood_score`` as an attribute (skipped without ``EDGE_INFER_HA_VENV``, as tests/test_ha_real.py)."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from edge.discovery_payloads import BridgeInfo, DiscoveryTracker, OutputEntity, SourceDevice
from tests.broker import Mosquitto
from tests.test_ha_real import HomeAssistant, _publish, _publish_all, _publisher, home_assistant

__all__ = ["home_assistant"]  # the fixture, imported for pytest

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.timeout(600)]


def test_home_assistant_shows_unknown_and_the_ood_score(
    home_assistant: HomeAssistant, mosquitto: Mosquitto, topic_prefix: str
) -> None:
    base = f"{topic_prefix}/edge-infer"
    bridge = BridgeInfo(version="0.1.0", base_topic=base, instance_id=topic_prefix)
    plug = SourceDevice("plug", name="Plug")
    appliance = OutputEntity(
        "appliance", "classification", f"{base}/appliance/plug", labels=("fridge", "kettle"), open_set=True
    )
    tracker = DiscoveryTracker(bridge)
    client = _publisher(mosquitto)
    try:
        _publish(client, bridge.status_topic, "online", retain=True)
        _publish_all(client, tracker.plan([(plug, [appliance])]))

        def entity() -> dict[str, Any] | None:
            states = home_assistant.mqtt_states().values()
            return next((s for s in states if s["attributes"].get("friendly_name") == "Plug Appliance"), None)

        home_assistant._wait(entity, "the appliance entity", timeout=60)
        answer = {"confidence": 0.99, "model": "m", "model_version": "1", "latency_ms": 0.8, "ts": "now"}

        def shows(label: str, score: float) -> dict[str, Any] | None:
            payload = json.dumps({**answer, "label": label, "ood_score": score})
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # states are not retained: send until it is read
                _publish(client, appliance.state_topic, payload)
                time.sleep(1.0)
                state = entity()
                if state and state["state"] == label and state["attributes"].get("ood_score") == score:
                    return state
            pytest.fail(f"Home Assistant did not show {label!r} with ood_score {score}: {entity()}")

        state = shows("kettle", 1.5)
        assert state["attributes"]["options"] == ["fridge", "kettle", "unknown"]
        assert state["attributes"]["device_class"] == "enum"
        shows("unknown", 412.25)
    finally:
        _publish_all(client, tracker.clear_all())
        client.loop_stop()
        client.disconnect()
    rejected = [
        line
        for line in home_assistant.log().splitlines()
        if (" WARNING " in line or " ERROR " in line)
        and any(source in line for source in ("components.mqtt", "components.sensor", "helpers.template"))
    ]
    assert not rejected, "\n".join(rejected)
