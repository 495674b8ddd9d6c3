"""Retraining through a real Home Assistant Core (skipped without EDGE_INFER_HA_VENV, like
tests/test_ha_real.py, whose fixtures it uses): the daemon announces "Retrain now", "<pipeline>
training" and "<pipeline> last trained" on its bridge device; ``button.press`` on the announced
button runs ``edge-infer learn`` in a child process; Home Assistant's training sensor goes to
``promoted`` (its attributes carry the gate's numbers), the timestamp sensor gets the finish
time, and Home Assistant's log has no MQTT warning."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from edge.homeassistant import BridgeInfo
from edge.manifest import read_manifest
from tests.broker import Mosquitto
from tests.harness import DaemonThread, make_config
from tests.test_ha_real import (
    HomeAssistant,
    _clear_discovery,
    _mqtt_problems,
    home_assistant,  # noqa: F401 (the fixture)
)
from tests.test_retrain import _setup

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.timeout(900)]


def test_retrain_now_pressed_in_home_assistant_trains_and_promotes(
    home_assistant: HomeAssistant,  # noqa: F811 (the imported fixture)
    mosquitto: Mosquitto,
    topic_prefix: str,
    tmp_path: Path,
) -> None:
    p = topic_prefix
    path, data = _setup(tmp_path, p, mosquitto.url)
    del data["pipelines"]["small"]
    data["homeassistant"] = {"instance_id": p}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    bridge_id = BridgeInfo(version="0", instance_id=p).identifier
    try:
        with DaemonThread(make_config(data, tmp_path), config_path=path) as runner:
            daemon = runner.daemon
            assert daemon is not None

            def entities() -> dict[str, str] | None:
                listed = home_assistant.ws({"type": "config/entity_registry/list"})[0]
                ids = {e["unique_id"]: e["entity_id"] for e in listed}
                wanted = {
                    "button": ids.get(f"{bridge_id}_rooms_retrain"),
                    "state": ids.get(f"{bridge_id}_retrain_rooms_state"),
                    "last": ids.get(f"{bridge_id}_retrain_rooms_last"),
                }
                return wanted if all(wanted.values()) else None  # type: ignore[return-value]

            found = home_assistant._wait(entities, "the retrain entities in the registry", timeout=90)
            assert found["button"].startswith("button.") and found["state"].startswith("sensor.")
            assert f"{bridge_id}_plain_retrain" not in {  # no learn section: no button
                e["unique_id"] for e in home_assistant.ws({"type": "config/entity_registry/list"})[0]
            }

            def state_of(entity: str) -> dict[str, Any] | None:
                s = home_assistant.states().get(entity)
                return s if s is not None and s["state"] not in ("unavailable",) else None

            idle = home_assistant._wait(lambda: state_of(found["state"]), "the training sensor", timeout=60)
            assert idle["state"] == "idle", idle
            button = home_assistant._wait(lambda: state_of(found["button"]), "the button available", 30)
            assert button["attributes"]["friendly_name"].endswith("Retrain now rooms"), button

            home_assistant._request("POST", "/api/services/button/press", {"entity_id": found["button"]})

            def finished() -> dict[str, Any] | None:
                s = state_of(found["state"])
                return (
                    s
                    if s is not None and s["attributes"].get("phase") in ("promoted", "kept", "failed")
                    else None
                )

            done = home_assistant._wait(finished, "the retrain to finish", timeout=600)
            assert done["state"] == "promoted", done
            attributes = done["attributes"]
            assert attributes["gate"]["new"] > attributes["gate"]["baseline"], attributes
            assert attributes["trigger"] == "button" and attributes["duration_s"] > 0
            assert done["attributes"]["friendly_name"].endswith("Rooms training")
            last = home_assistant._wait(
                lambda: s if (s := state_of(found["last"])) and s["state"] != "unknown" else None,
                "the last-trained timestamp",
                timeout=30,
            )
            assert last["attributes"]["device_class"] == "timestamp"
            assert datetime.fromisoformat(last["state"]).timestamp() > 0
            manifest = read_manifest(tmp_path / "occupancy.onnx")
            assert manifest is not None and "+learn." in manifest.version
            info = runner.call(daemon.bridge_info)
            assert info["retrain"]["pipelines"]["rooms"]["phase"] == "promoted"
        problems = _mqtt_problems(home_assistant)
        assert not problems, "\n".join(problems)
    finally:
        _clear_discovery(mosquitto.url, bridge_id)
