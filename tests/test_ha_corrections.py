"""Corrections through a real Home Assistant Core (skipped without EDGE_INFER_HA_VENV, like
tests/test_ha_real.py, whose fixtures it uses): the daemon announces the "Correct" select and the
"False alarm"/"Missed" buttons on the prediction's device; ``select.select_option`` and
``button.press`` on those entities reach the daemon, which stores each with the input its model
saw; Home Assistant's log has no MQTT warning."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge.discovery_payloads import BridgeInfo
from tests.broker import Mosquitto
from tests.harness import DaemonThread, Publisher, make_config
from tests.test_ha_real import (
    HomeAssistant,
    _clear_discovery,
    _mqtt_problems,
    _small_config,
    home_assistant,  # noqa: F401 (the fixture)
)

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.timeout(600)]


def test_a_correction_made_in_home_assistant_is_stored_with_its_input(
    home_assistant: HomeAssistant,  # noqa: F811 (the imported fixture)
    mosquitto: Mosquitto,
    topic_prefix: str,
    tmp_path: Path,
) -> None:
    data = _small_config(mosquitto.url, topic_prefix, tmp_path)
    data["pipelines"]["occupancy"]["homeassistant"] = {"binary_on": "occupied", "device_class": "occupancy"}
    data["state"] = {"file": str(tmp_path / "state" / "state.json")}
    bridge_id = BridgeInfo(version="0", instance_id=topic_prefix).identifier
    pub = Publisher(mosquitto.url)
    try:
        with DaemonThread(make_config(data, tmp_path)) as runner:
            daemon = runner.daemon
            assert daemon is not None
            pub.send(f"{topic_prefix}/z2m/hall_sensor", {"temperature": 21, "co2": 900})

            def entities() -> dict[str, dict[str, Any]] | None:
                listed = home_assistant.ws({"type": "config/entity_registry/list"})[0]
                prefix = f"{bridge_id}_hall_sensor_occupancy"
                mine = {e["unique_id"][len(prefix) :]: e for e in listed if e["unique_id"].startswith(prefix)}
                wanted = {"", "_correct", "_false_alarm", "_missed"}
                return mine if wanted <= set(mine) else None

            found = home_assistant._wait(entities, "the correction entities in the registry", timeout=90)
            main, select = found[""], found["_correct"]
            assert select["entity_id"].startswith("select.") and found["_missed"]["entity_id"].startswith(
                "button."
            )
            assert select["device_id"] == main["device_id"] == found["_missed"]["device_id"]  # one HA device
            state = home_assistant._wait(
                lambda: (
                    s
                    if (s := home_assistant.states().get(select["entity_id"])) and s["state"] != "unavailable"
                    else None
                ),
                "the select available",
                timeout=30,
            )
            assert state["attributes"]["options"] == ["empty", "occupied", "none of these"]

            def stored() -> int:
                return int(runner.call(lambda: daemon.corrections.stored))

            home_assistant._request(
                "POST",
                "/api/services/select/select_option",
                {"entity_id": select["entity_id"], "option": "empty"},
            )
            home_assistant._wait(lambda: stored() >= 1 or None, "the correction stored", timeout=30)
            home_assistant._request(
                "POST", "/api/services/button/press", {"entity_id": found["_missed"]["entity_id"]}
            )
            home_assistant._wait(lambda: stored() >= 2 or None, "the button's correction stored", timeout=30)
            info = runner.call(daemon.corrections.info)
            runner.call(daemon.publish_bridge_info)  # the agreement, without waiting for the tick

            def agreement() -> tuple[dict[str, Any], dict[str, Any]] | None:
                listed = home_assistant.ws({"type": "config/entity_registry/list"})[0]
                ids = {e["unique_id"]: e["entity_id"] for e in listed}
                sensor, problem = (
                    ids.get(f"{bridge_id}_agreement_occupancy"),
                    ids.get(f"{bridge_id}_agreement_occupancy_problem"),
                )
                states = home_assistant.states()
                if (
                    sensor is None
                    or problem is None
                    or states.get(sensor, {}).get("state") in (None, "unknown")
                ):
                    return None
                return states[sensor], states[problem]

            sensor, problem = home_assistant._wait(
                agreement, "the agreement sensors with a state", timeout=60
            )
            # two corrections; the button always disagrees: 0 % or 50 %
            expected = info["agreement"]["occupancy"]["value"] * 100
            assert float(sensor["state"]) == pytest.approx(expected) and expected in (0.0, 50.0), sensor
            assert problem["state"] == "off" and problem["attributes"]["device_class"] == "problem", problem
        with sqlite3.connect(tmp_path / "state" / "labels.sqlite3") as db:
            rows = db.execute("SELECT device, pipeline, label, input FROM corrections ORDER BY id").fetchall()
        assert [(d, p, label) for d, p, label, _ in rows] == [
            ("hall_sensor", "occupancy", "empty"),
            ("hall_sensor", "occupancy", "occupied"),  # "Missed" on a binary output: binary_on
        ]
        for *_, blob in rows:
            assert sorted(np.frombuffer(blob, dtype=np.float32).tolist()) == [21.0, 900.0]  # what it saw
        assert info["refused"] == {}, info
        problems = _mqtt_problems(home_assistant)
        assert not problems, "\n".join(problems)
    finally:
        pub.close()
        _clear_discovery(mosquitto.url, bridge_id)
