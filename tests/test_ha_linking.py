"""A Tasmota device and edge-infer's prediction for it are one device in a real Home Assistant.

Home Assistant's Tasmota integration (HATasmota, installed by tests/ha/setup_ha_venv.sh from the
integration's manifest) reads Tasmota's own retained discovery, ``tasmota/discovery/<MAC>/config``
and ``.../sensors``, and registers the device by its MAC connection. edge-infer reads the same
retained config (``t``: the device's topic, ``mac``) and announces the prediction entities with that
MAC in ``connections`` (the rule it also uses for ESPHome and Shelly, whose integrations talk to
the devices over the network and are shown broker-only). Home Assistant's device registry then
holds one device with both config entries. Uses the Home Assistant fixtures of
tests/test_ha_real.py (``EDGE_INFER_HA_VENV``).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from edge.discovery_payloads import BridgeInfo
from tests.broker import Mosquitto
from tests.harness import DaemonThread, Publisher, make_config
from tests.onnx_models import snapshot_classifier
from tests.test_ha_real import (
    CONTROLS,
    HomeAssistant,
    _clear_discovery,
    _mqtt_problems,
    _predictions_and_select,
    home_assistant,
)

__all__ = ["home_assistant"]  # the fixture, imported for pytest

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.timeout(600)]


def tasmota_config(mac: str, topic: str, full_topic: str, name: str) -> dict[str, Any]:
    """``tasmota/discovery/<MAC>/config`` as Tasmota 14 publishes it (SetOption19 0, the default)
    for a power-monitoring plug with one relay; the keys HATasmota's discovery schema requires,
    including those added since 9.x (``bat``, ``dslp``, ``sho``, ``sht``)."""
    return {
        "ip": "192.0.2.17",
        "dn": name,
        "fn": [name, None, None, None, None, None, None, None],
        "hn": f"{topic}-2876",
        "mac": mac,
        "md": "Sonoff Pow R2",
        "ty": 0,
        "if": 0,
        "cam": 0,
        "ofln": "Offline",
        "onln": "Online",
        "state": ["OFF", "ON", "TOGGLE", "HOLD"],
        "sw": "14.3.0",
        "t": topic,
        "ft": full_topic,
        "tp": ["cmnd", "stat", "tele"],
        "rl": [1, 0, 0, 0, 0, 0, 0, 0],
        "swc": [-1, -1, -1, -1, -1, -1, -1, -1],
        "swn": [None, None, None, None, None, None, None, None],
        "btn": [0, 0, 0, 0, 0, 0, 0, 0],
        "so": {"4": 0, "11": 0, "13": 0, "17": 0, "20": 0, "30": 0, "68": 0, "73": 0, "82": 0,
               "114": 0, "117": 0},
        "lk": 0,
        "lt_st": 0,
        "bat": 0,
        "dslp": 0,
        "sho": [],
        "sht": [],
        "ver": 1,
    }  # fmt: skip


def tasmota_sensors(power: float) -> dict[str, Any]:
    """``tasmota/discovery/<MAC>/sensors``: the device's SENSOR telemetry as a template."""
    return {"sn": {"Time": "2026-12-04T20:00:00", "ENERGY": energy(power)}, "ver": 1}


def energy(power: float) -> dict[str, Any]:
    return {
        "TotalStartTime": "2026-01-01T00:00:00",
        "Total": 12.345,
        "Yesterday": 0.321,
        "Today": 0.123,
        "Power": power,
        "ApparentPower": power + 2,
        "ReactivePower": 1,
        "Factor": 0.9,
        "Voltage": 231,
        "Current": round(power / 231, 3),
    }


def _tasmota_ready(ha: HomeAssistant) -> None:
    """Home Assistant's MQTT integration saw the retained Tasmota discovery and opened a Tasmota
    config flow (``mqtt`` source, ``confirm`` step); confirm it through the REST config-flow API."""

    def discovered() -> dict[str, Any] | None:
        flows = ha.ws({"type": "config_entries/flow/progress"})[0]
        return next((f for f in flows if f["handler"] == "tasmota"), None)

    flow = ha._wait(discovered, "Home Assistant to discover Tasmota over MQTT", timeout=60)
    assert flow["context"]["source"] == "mqtt" and flow["step_id"] == "confirm", flow
    shown = ha._request("GET", f"/api/config/config_entries/flow/{flow['flow_id']}")
    assert shown["step_id"] == "confirm", shown
    result = ha._request("POST", f"/api/config/config_entries/flow/{flow['flow_id']}", {})
    assert result["type"] == "create_entry", result
    assert result["result"]["domain"] == "tasmota", result


def _tasmota_installed(ha: HomeAssistant) -> None:
    """Skip, saying how to fix it, on a venv made before tests/ha/setup_ha_venv.sh installed the
    tasmota integration's requirements (HATasmota; numpy for the camera platform it loads)."""
    probe = "import hatasmota, homeassistant.components.camera"
    done = subprocess.run([str(ha.hass.parent / "python"), "-c", probe], capture_output=True, check=False)
    if done.returncode != 0:
        last = done.stderr.decode(errors="replace").strip().splitlines()[-1:]
        pytest.skip(
            f"{ha.hass.parent.parent} cannot load Home Assistant's tasmota integration ({last}): it predates "
            "tests/ha/setup_ha_venv.sh installing its requirements; run the script into a new venv"
        )


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:  # "unknown", "unavailable"
        return None


def _tasmota_problems(ha: HomeAssistant) -> list[str]:
    return [
        line
        for line in ha.log().splitlines()
        if (" WARNING " in line or " ERROR " in line)
        and ("[hatasmota" in line or "components.tasmota" in line)
    ]


def test_a_tasmota_device_and_its_prediction_are_one_home_assistant_device(
    home_assistant: HomeAssistant, mosquitto: Mosquitto, topic_prefix: str, tmp_path: Path
) -> None:
    """Tasmota's retained discovery for a plug (its topic under this test's prefix through the
    FullTopic), Home Assistant's Tasmota integration set up from its MQTT discovery flow; the
    daemon's prediction for the plug lands on the device the Tasmota integration registered."""
    ha = home_assistant
    _tasmota_installed(ha)
    p = topic_prefix
    mac = f"A4CF12{p[-6:].upper()}"
    topic = f"tasmota_{mac[-6:]}"
    name = f"Dryer {p}"
    full_topic = f"{p}/%prefix%/%topic%/"  # FullTopic: telemetry on <p>/tele/<topic>/SENSOR
    tele = f"{p}/tele/{topic}"
    discovery = {
        f"tasmota/discovery/{mac}/config": tasmota_config(mac, topic, full_topic, name),
        f"tasmota/discovery/{mac}/sensors": tasmota_sensors(3.0),
    }
    snapshot_classifier(tmp_path / "occ.onnx", ["power", "current"], ["idle", "running"], name="occ")
    data = {
        "mqtt": {"url": mosquitto.url, "base_topic": f"{p}/ei", "client_id": f"ei-{p}"},
        "models": {"occ": {"path": "occ.onnx"}},
        "pipelines": {
            "dryer": {
                "model": "occ",
                "source": {"profile": "tasmota", "options": {"tele_prefix": f"{p}/tele"}},
            }
        },
        "homeassistant": {"instance_id": p},
    }
    bridge_id = BridgeInfo(version="0", instance_id=p).identifier
    connection = ["mac", ":".join(mac.lower()[i : i + 2] for i in range(0, 12, 2))]
    pub = Publisher(mosquitto.url)
    try:
        pub.send(f"{tele}/LWT", "Online", retain=True)
        for where, payload in discovery.items():
            pub.send(where, payload, retain=True)
        _tasmota_ready(ha)

        def tasmota_device() -> dict[str, Any] | None:
            devices = ha.ws({"type": "config/device_registry/list"})[0]
            return next((d for d in devices if connection in d["connections"]), None)

        registered = ha._wait(tasmota_device, "the Tasmota integration's device", timeout=60)
        assert registered["manufacturer"] == "Tasmota" and registered["model"] == "Sonoff Pow R2", registered
        with DaemonThread(make_config(data, tmp_path)):
            pub.send(f"{tele}/SENSOR", {"Time": "2026-12-04T20:00:10", "ENERGY": energy(1800.0)})

            def linked() -> tuple[list[Any], list[Any]] | None:
                entities = ha.ws({"type": "config/entity_registry/list"})[0]
                ours = [e for e in entities if e["unique_id"].startswith(f"{bridge_id}_{topic.lower()}")]
                theirs = [
                    e for e in entities if e["platform"] == "tasmota" and e["unique_id"].startswith(mac)
                ]
                seen["ours"], seen["theirs"] = (
                    [e["unique_id"] for e in ours],
                    [e["unique_id"] for e in theirs],
                )
                power = [e for e in theirs if e["unique_id"].endswith("_ENERGY_Power")]
                return (ours, theirs) if _predictions_and_select(ours) and power else None

            seen: dict[str, Any] = {}
            ours, theirs = ha._wait(linked, lambda: f"both integrations' entities, seen {seen}", timeout=60)
            devices = ha.ws({"type": "config/device_registry/list"})[0]
            entries = {
                e["entry_id"]: e["domain"] for e in ha._request("GET", "/api/config/config_entries/entry")
            }
            holding = {e["device_id"] for e in ours + theirs}
            named = [d for d in devices if d["name"] == name]
            print(
                f"devices named {name!r}: {len(named)}; devices holding the {len(ours) + len(theirs)} "
                f"entities: {len(holding)}; its config entries: "
                f"{sorted(entries.get(c, c) for d in named for c in d['config_entries'])}"
            )
            assert holding == {registered["id"]}, (registered, ours, theirs)
            assert len(named) == 1 and named[0]["id"] == registered["id"], named
            device = named[0]
            assert sorted(entries[c] for c in device["config_entries"]) == ["mqtt", "tasmota"], device
            assert connection in device["connections"], device
            assert device["manufacturer"] == "Tasmota" and device["model"] == "Sonoff Pow R2", device
            main = next(e for e in ours if not e["unique_id"].endswith(("_confidence", *CONTROLS)))
            power = next(e for e in theirs if e["unique_id"].endswith("_ENERGY_Power"))

            def shown() -> dict[str, str] | None:
                states = ha.states()
                prediction = states.get(main["entity_id"], {}).get("state")
                watts = states.get(power["entity_id"], {}).get("state")
                if prediction in ("Idle", "Running") and _number(watts) == 1800.0:
                    return {"prediction": prediction, "power": watts}
                pub.send(f"{tele}/SENSOR", {"Time": "2026-12-04T20:00:20", "ENERGY": energy(1800.0)})
                return None

            got = ha._wait(
                shown, lambda: f"states for {main['entity_id']} and {power['entity_id']}", timeout=60
            )
            print(f"states: {got}")
    finally:
        for where in (*discovery, f"{tele}/LWT"):
            pub.send(where, "", retain=True)
        pub.close()
        _clear_discovery(mosquitto.url, bridge_id)
    assert not _mqtt_problems(ha), "\n".join(_mqtt_problems(ha))
    assert not _tasmota_problems(ha), "\n".join(_tasmota_problems(ha))
