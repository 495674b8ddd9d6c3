"""Retraining through a real Home Assistant Core (skipped without EDGE_INFER_HA_VENV, like
tests/test_ha_real.py, whose fixtures it uses): the daemon announces "Retrain now", "<pipeline>
training" and "<pipeline> last trained" on its bridge device; ``button.press`` on the announced
button runs ``edge-infer learn`` in a child process; Home Assistant's training sensor goes to
``promoted`` (its attributes carry the gate's numbers), the timestamp sensor gets the finish
time, the promoted model's version, holdout accuracy, training examples and confusion-matrix image
update on the bridge device (the image as Home Assistant's proxy serves it), and Home Assistant's
log has no MQTT warning."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from edge.discovery_payloads import BridgeInfo
from edge.manifest import read_manifest
from edge.quality import confusion_topic
from tests.broker import Mosquitto
from tests.harness import Collector, DaemonThread, make_config
from tests.test_ha_quality import proxied
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

            # the promoted model's quality in Home Assistant: the running daemon hot-reloaded it
            # with the quality record learn wrote beside it, and the bridge now shows its version,
            # holdout accuracy, training examples and the holdout confusion matrix as an image
            record = json.loads((tmp_path / "occupancy.onnx.quality.json").read_text())
            runner.call(daemon.publish_bridge_info)  # the sensors' states, without the tick's wait

            def quality() -> dict[str, dict[str, Any]] | None:
                listed = home_assistant.ws({"type": "config/entity_registry/list"})[0]
                prefix = f"{bridge_id}_model_occupancy_"
                mine = {e["unique_id"][len(prefix) :]: e["entity_id"] for e in listed
                        if e["unique_id"].startswith(prefix)}  # fmt: skip
                if not {"version", "accuracy", "examples", "trained", "confusion"} <= set(mine):
                    return None
                states = {k: state_of(v) for k, v in mine.items()}
                if states["version"] is None or states["version"]["state"] != manifest.version:
                    return None
                # each sensor's state is its own message: wait until every one has one, not
                # just the version (CI once read `examples` while it was still unavailable)
                for key in ("accuracy", "examples", "trained"):
                    if states[key] is None or states[key]["state"] in ("unknown", "None", ""):
                        return None
                return {k: v for k, v in states.items() if v is not None} | {
                    "ids": {"image": mine["confusion"]}
                }

            shown = home_assistant._wait(quality, "the promoted model's quality entities", timeout=90)
            assert shown["version"]["state"] == manifest.version, shown["version"]
            assert float(shown["examples"]["state"]) == record.get(
                "examples", sum(record["examples_per_class"].values())
            ), shown
            assert datetime.fromisoformat(shown["trained"]["state"]).timestamp() > 0, shown["trained"]
            accuracy = shown["accuracy"]["state"]
            assert accuracy not in ("unknown", "None") and 0 < float(accuracy) <= 100, shown["accuracy"]
            image = shown["ids"]["image"]
            assert isinstance(image, str) and image.startswith("image.")
            served = home_assistant._wait(lambda: proxied(home_assistant, image), "the confusion image", 60)
            retained = Collector(mosquitto.url, confusion_topic(f"{p}/ei/bridge/info", "occupancy"))
            png = retained.wait(lambda ms: bool(ms) and bool(ms[-1].payload), timeout=20)[-1].payload
            retained.close()
            assert served == (png, "image/png") and png.startswith(b"\x89PNG\r\n\x1a\n"), len(served[0])
        problems = _mqtt_problems(home_assistant)
        assert not problems, "\n".join(problems)
    finally:
        _clear_discovery(mosquitto.url, bridge_id)
