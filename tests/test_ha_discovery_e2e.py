"""Home Assistant discovery end to end: the daemon, a real Mosquitto, retained configs read back."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.broker import Mosquitto
from tests.harness import Collector, DaemonThread, Publisher, make_config, write_config
from tests.onnx_models import regressor, snapshot_classifier

pytestmark = pytest.mark.broker


def _config(url: str, prefix: str, tmp_path: Path) -> dict[str, Any]:
    snapshot_classifier(tmp_path / "occ.onnx", ["temperature", "co2"], ["empty", "occupied"], name="occ")
    regressor(tmp_path / "reg.onnx", ["temperature", "co2"], name="reg", unit="W")
    return {
        "mqtt": {"url": url, "base_topic": f"{prefix}/ei", "client_id": f"ei-{prefix}"},
        "models": {"occ": {"path": "occ.onnx"}, "reg": {"path": "reg.onnx"}},
        "pipelines": {
            "occupancy": {
                "model": "occ",
                "source": {"topics": [f"{prefix}/z2m/{{device}}"]},
                "homeassistant": {"binary_on": "occupied", "device_class": "occupancy"},
            },
            "power": {
                "model": "reg",
                "source": {"topics": [f"{prefix}/z2m/{{device}}"]},
                "homeassistant": {"device_class": "power"},
            },
        },
        "homeassistant": {
            "discovery_prefix": f"{prefix}/ha",
            "status_topic": f"{prefix}/ha/status",
            "instance_id": prefix,
        },
    }


def _configs(collector: Collector, prefix: str) -> dict[str, Any]:
    """The latest discovery payload per topic (empty payload = removed)."""
    latest: dict[str, Any] = {}
    for message in collector.messages:
        if message.topic.startswith(f"{prefix}/ha/device/"):
            latest[message.topic] = message.json() if message.payload else None
    return latest


def test_discovery_announce_birth_and_removal(
    mosquitto: Mosquitto, topic_prefix: str, tmp_path: Path
) -> None:
    p = topic_prefix
    data = _config(mosquitto.url, p, tmp_path)
    path = write_config(data, tmp_path / "c.yaml")
    watch = Collector(mosquitto.url, f"{p}/ha/device/+/config")
    pub = Publisher(mosquitto.url)
    runner = DaemonThread(make_config(data, tmp_path)).start()
    try:
        runner.daemon.config_path = path  # type: ignore[union-attr]
        for device in ("kitchen", "office"):
            pub.send(f"{p}/z2m/{device}", {"temperature": 21, "co2": 800})

        def announced(msgs: list[Any]) -> bool:
            configs = _configs(watch, p)
            return sum(1 for c in configs.values() if c and "via_device" in c.get("dev", {})) == 2

        watch.wait(announced, timeout=15)
        configs = _configs(watch, p)
        kitchen = next(c for c in configs.values() if c and c["dev"].get("name") == "kitchen")
        platforms = sorted(c["platform"] for c in kitchen["cmps"].values())
        assert platforms.count("binary_sensor") == 1 and "sensor" in platforms
        occupancy = next(c for c in kitchen["cmps"].values() if c["platform"] == "binary_sensor")
        assert occupancy["device_class"] == "occupancy"
        assert occupancy["state_topic"] == f"{p}/ei/occupancy/kitchen"
        power = next(c for c in kitchen["cmps"].values() if c.get("device_class") == "power")
        assert power["unit_of_measurement"] == "W"
        topics = (
            [a["topic"] for a in kitchen["availability"]]
            if "availability" in kitchen
            else [a["topic"] for c in kitchen["cmps"].values() for a in c.get("availability", [])]
        )
        assert f"{p}/ei/status" in topics
        # Retained: a late subscriber (Home Assistant starting later) sees them too.
        late = Collector(mosquitto.url, f"{p}/ha/device/+/config")
        late.wait(lambda m: len(m) >= 3)
        assert all(m.retain for m in late.messages)
        late.close()

        # Home Assistant's birth message: configs and the last states come again.
        states = Collector(mosquitto.url, f"{p}/ei/occupancy/kitchen")
        before = len(watch.messages)
        pub.send(f"{p}/ha/status", "online")
        watch.wait(lambda m: len(m) >= before + 3, timeout=10)
        states.wait(lambda m: any(not x.retain for x in m), timeout=10)
        states.close()

        # A pipeline removed by a reload: its entities are cleared, the others stay.
        del data["pipelines"]["power"]
        write_config(data, path)
        assert asyncio.run_coroutine_threadsafe(runner.daemon.reload("test"), runner.loop).result(20)  # type: ignore[union-attr]
        time.sleep(0.5)
        configs = _configs(watch, p)
        kitchen = next(c for c in configs.values() if c and c["dev"].get("name") == "kitchen")
        classes = [c.get("device_class") for c in kitchen["cmps"].values()]
        assert "occupancy" in classes and "power" not in classes
        assert not [key for key in kitchen["cmps"] if "power" in key]
    finally:
        runner.stop()
        pub.close()

    # A restart with no occupancy pipeline at all: the ghosts of the earlier run are removed.
    data["pipelines"] = {"power": _config(mosquitto.url, p, tmp_path)["pipelines"]["power"]}
    with DaemonThread(make_config(data, tmp_path)):

        def cleared(msgs: list[Any]) -> bool:
            configs = _configs(watch, p)
            return sum(1 for c in configs.values() if c and "via_device" in c.get("dev", {})) == 0

        watch.wait(cleared, timeout=15)
    removed = [t for t, c in _configs(watch, p).items() if c is None]
    assert len(removed) == 2, removed
    watch.close()
    assert json.dumps(removed)


def test_predictions_of_announced_pipelines_are_retained(
    mosquitto: Mosquitto, topic_prefix: str, tmp_path: Path
) -> None:
    """Home Assistant subscribes to a state topic only when it creates the entity: the state is
    retained so that it reads the first prediction then, whether it came before or after the
    config. A pipeline left out of discovery keeps its output's own ``retain`` (False)."""
    p = topic_prefix
    data = _config(mosquitto.url, p, tmp_path)
    data["pipelines"]["power"]["homeassistant"]["enabled"] = False
    pub = Publisher(mosquitto.url)
    with DaemonThread(make_config(data, tmp_path)):
        watch = Collector(mosquitto.url, f"{p}/ei/occupancy/kitchen", f"{p}/ei/power/kitchen")
        pub.send(f"{p}/z2m/kitchen", {"temperature": 21, "co2": 800})
        watch.wait(lambda m: {x.topic for x in m} >= {f"{p}/ei/occupancy/kitchen", f"{p}/ei/power/kitchen"})
        late = Collector(mosquitto.url, f"{p}/ei/occupancy/kitchen", f"{p}/ei/power/kitchen")
        got = late.wait(lambda m: len(m) >= 1, timeout=10)
        time.sleep(0.5)  # a retained power state would have arrived with the other one
        assert [m.topic for m in late.messages] == [f"{p}/ei/occupancy/kitchen"], got
        assert late.messages[0].retain and late.messages[0].json()["label"] in ("empty", "occupied")
        watch.close()
        late.close()
    pub.close()


def _wait_plans(runner: DaemonThread, count: int = 1, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        daemon = runner.daemon
        if daemon is not None and daemon.discovery.plans >= count:
            return
        time.sleep(0.05)
    raise AssertionError("discovery did not plan")


def _device_configs(collector: Collector, prefix: str, since: int = 0) -> list[Any]:
    return [m for m in collector.messages[since:] if m.topic.startswith(f"{prefix}/ha/device/")]


def test_restart_with_the_same_config_removes_nothing(
    mosquitto: Mosquitto, topic_prefix: str, tmp_path: Path
) -> None:
    """The broker records every discovery message of two runs: the second run sends no empty
    config, and re-announces both devices (read back from the retained configs) before either
    has sent anything new."""
    p = topic_prefix
    data = _config(mosquitto.url, p, tmp_path)
    watch = Collector(mosquitto.url, f"{p}/ha/device/+/config")
    pub = Publisher(mosquitto.url)
    with DaemonThread(make_config(data, tmp_path)):
        for device in ("kitchen", "office"):
            pub.send(f"{p}/z2m/{device}", {"temperature": 21, "co2": 800})
        watch.wait(
            lambda m: sum(1 for c in _configs(watch, p).values() if c and "via_device" in c["dev"]) == 2
        )
    mark = len(watch.messages)
    runner = DaemonThread(make_config(data, tmp_path)).start()
    try:
        _wait_plans(runner)
        time.sleep(0.5)  # what the plan published has reached the collector
        second = _device_configs(watch, p, mark)
        assert not [m.topic for m in second if not m.payload], "a restart removed devices"
        assert runner.daemon is not None
        announced = {t for t, c in _configs(watch, p).items() if c and "via_device" in c["dev"]}
        assert len(announced) == 2 and runner.daemon.discovery.status()["announced"] == 3
    finally:
        runner.stop()
        pub.close()
    watch.close()


def test_devices_restored_from_the_state_file_are_announced_at_once(
    mosquitto: Mosquitto, topic_prefix: str, tmp_path: Path
) -> None:
    p = topic_prefix
    data = _config(mosquitto.url, p, tmp_path)
    data["state"] = {"file": str(tmp_path / "state.json")}
    pub = Publisher(mosquitto.url)
    watch = Collector(mosquitto.url, f"{p}/ha/device/+/config")
    with DaemonThread(make_config(data, tmp_path)):
        pub.send(f"{p}/z2m/kitchen", {"temperature": 21, "co2": 800})
        watch.wait(
            lambda m: any(c and c["dev"].get("name") == "kitchen" for c in _configs(watch, p).values())
        )
    assert (tmp_path / "state.json").exists()
    # the broker forgets every retained config: only the state file knows the kitchen now
    for topic in {m.topic for m in watch.messages}:
        pub.send(topic, "", retain=True)
    time.sleep(0.3)
    mark = len(watch.messages)
    runner = DaemonThread(make_config(data, tmp_path)).start()
    try:
        _wait_plans(runner)
        watch.wait(
            lambda m: any(
                x.payload and json.loads(x.payload)["dev"].get("name") == "kitchen" for x in m[mark:]
            ),
            timeout=10,
        )
    finally:
        runner.stop()
        pub.close()
    watch.close()


def test_a_device_unseen_for_forget_after_is_removed(
    mosquitto: Mosquitto, topic_prefix: str, tmp_path: Path
) -> None:
    """``forget_after_days`` (here 2 s): the silent device is removed, the answering one stays."""
    p = topic_prefix
    data = _config(mosquitto.url, p, tmp_path)
    data["homeassistant"]["forget_after_days"] = 2.0 / 86400
    pub = Publisher(mosquitto.url)
    watch = Collector(mosquitto.url, f"{p}/ha/device/+/config", f"{p}/ei/occupancy/office")
    with DaemonThread(make_config(data, tmp_path)) as runner:
        for device in ("kitchen", "office"):
            pub.send(f"{p}/z2m/{device}", {"temperature": 21, "co2": 800})
        watch.wait(
            lambda m: sum(1 for c in _configs(watch, p).values() if c and "via_device" in c["dev"]) == 2
        )
        office = next(t for t, c in _configs(watch, p).items() if c and c["dev"].get("name") == "office")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and _configs(watch, p).get(office) is not None:
            pub.send(f"{p}/z2m/kitchen", {"temperature": 21 + time.monotonic() % 1, "co2": 800})
            time.sleep(0.3)
        configs = _configs(watch, p)
        assert configs[office] is None, "the silent device was not removed"
        kitchen = [t for t, c in configs.items() if c and c["dev"].get("name") == "kitchen"]
        assert kitchen, "the device that kept answering was removed"
        assert runner.daemon is not None and runner.daemon.discovery.forgotten == 2  # both pipelines
        cleared = [m for m in watch.on(f"{p}/ei/occupancy/office") if not m.payload]
        assert cleared, "its retained state was left on the broker"
    pub.close()
    watch.close()


def test_devices_are_linked_to_zigbee2mqtt_tasmota_and_esphome_identities(
    mosquitto: Mosquitto, topic_prefix: str, tmp_path: Path
) -> None:
    """Zigbee2MQTT's retained bridge/devices gives the plug's ``zigbee2mqtt_<ieee>``, Tasmota's
    retained discovery its MAC, ESPHome's own discovery its identifier and MAC: the prediction
    entities go on those devices. A device the family
    does not describe keeps its own device, linked via_device to the bridge."""
    p = topic_prefix
    snapshot_classifier(tmp_path / "occ.onnx", ["power"], ["off", "on"], name="occ")
    mac_topic = f"tasmota/discovery/A4CF12{p[-6:].upper()}/config"
    data: dict[str, Any] = {
        "mqtt": {"url": mosquitto.url, "base_topic": f"{p}/ei", "client_id": f"ei-{p}"},
        "models": {"occ": {"path": "occ.onnx"}},
        "pipelines": {
            "z2m": {
                "model": "occ",
                "source": {"profile": "zigbee2mqtt", "options": {"base_topic": f"{p}/z2m"}},
            },
            "tas": {
                "model": "occ",
                "source": {"profile": "tasmota", "options": {"tele_prefix": f"{p}/tele"}},
            },
            "esp": {"model": "occ", "source": {"profile": "esphome", "options": {"prefix": f"esp{p}"}}},
        },
        "homeassistant": {
            "discovery_prefix": f"{p}/ha",
            "status_topic": f"{p}/ha/status",
            "instance_id": p,
        },
    }
    pub = Publisher(mosquitto.url)
    devices = [
        {"ieee_address": "0x00124b0012345678", "type": "Coordinator", "friendly_name": "Coordinator"},
        {"ieee_address": "0x00158d0001a2b3c4", "type": "Router", "friendly_name": "plug1"},
    ]
    pub.send(f"{p}/z2m/bridge/devices", devices, retain=True)
    pub.send(mac_topic, {"t": "dryer", "mac": f"A4CF12{p[-6:].upper()}", "dn": "Dryer"}, retain=True)
    # ESPHome's own discovery of one of its sensors (abbreviated keys, as ESPHome writes them)
    esp_topic = f"{p}/ha/sensor/esp{p}/power/config"
    esp_config = {
        "name": "Power",
        "stat_t": f"esp{p}/sensor/power/state",
        "avty_t": f"esp{p}/status",
        "uniq_id": f"esp{p}sensorpower",
        "dev": {"ids": "b4e62d0a1b2c", "name": f"esp{p}", "sw": "esphome v2025.2.0", "mf": "espressif",
                "cns": [["mac", "b4e62d0a1b2c"]]},
    }  # fmt: skip
    pub.send(esp_topic, esp_config, retain=True)
    watch = Collector(mosquitto.url, f"{p}/ha/device/+/config")
    try:
        with DaemonThread(make_config(data, tmp_path)):
            pub.send(f"{p}/z2m/plug1", {"power": 3})
            pub.send(f"{p}/z2m/plug2", {"power": 3})
            pub.send(f"{p}/tele/dryer/SENSOR", {"ENERGY": {"Power": 3}})
            pub.send(f"esp{p}/sensor/power/state", "3")

            bridge_topic = f"{p}/ha/device/edge_infer_{p}/config"

            def devs() -> dict[str, Any]:
                return {t: c["dev"] for t, c in _configs(watch, p).items() if c and t != bridge_topic}

            watch.wait(lambda m: len(devs()) == 4, timeout=15)
            by_kind = {json.dumps(d, sort_keys=True) for d in devs().values()}
            assert (
                json.dumps(
                    {"identifiers": ["zigbee2mqtt_0x00158d0001a2b3c4"], "name": "plug1"}, sort_keys=True
                )
                in by_kind
            )
            mac = ":".join(f"a4cf12{p[-6:].lower()}"[i : i + 2] for i in range(0, 12, 2))
            assert json.dumps({"connections": [["mac", mac]], "name": "Dryer"}, sort_keys=True) in by_kind
            esphome = {
                "identifiers": ["b4e62d0a1b2c"],
                "connections": [["mac", "b4:e6:2d:0a:1b:2c"]],
                "name": f"esp{p}",
            }
            assert json.dumps(esphome, sort_keys=True) in by_kind
            own = [d for d in devs().values() if d.get("name") == "plug2"]
            assert own and own[0]["via_device"] == f"edge_infer_{p}"
    finally:
        pub.send(f"{p}/z2m/bridge/devices", "", retain=True)
        pub.send(mac_topic, "", retain=True)
        pub.send(esp_topic, "", retain=True)
        watch.close()
        pub.close()


def test_a_pipeline_removed_by_a_reload_leaves_no_retained_state(
    mosquitto: Mosquitto, topic_prefix: str, tmp_path: Path
) -> None:
    """The states were retained for Home Assistant; when the pipeline's entities are removed, so
    are its retained states. The pipeline that stays keeps its own."""
    p = topic_prefix
    data = _config(mosquitto.url, p, tmp_path)
    path = write_config(data, tmp_path / "c.yaml")
    pub = Publisher(mosquitto.url)
    runner = DaemonThread(make_config(data, tmp_path)).start()
    try:
        assert runner.daemon is not None
        runner.daemon.config_path = path
        watch = Collector(mosquitto.url, f"{p}/ei/power/kitchen", f"{p}/ei/occupancy/kitchen")
        pub.send(f"{p}/z2m/kitchen", {"temperature": 21, "co2": 800})
        watch.wait(lambda m: {x.topic for x in m} >= {f"{p}/ei/power/kitchen", f"{p}/ei/occupancy/kitchen"})
        configs = Collector(mosquitto.url, f"{p}/ha/device/+/config")
        configs.wait(
            lambda m: any(c and c["dev"].get("name") == "kitchen" for c in _configs(configs, p).values())
        )
        configs.close()
        del data["pipelines"]["power"]
        write_config(data, path)
        assert asyncio.run_coroutine_threadsafe(runner.daemon.reload("test"), runner.loop).result(20)
        watch.wait(lambda m: any(x.topic == f"{p}/ei/power/kitchen" and not x.payload for x in m), timeout=10)
        late = Collector(mosquitto.url, f"{p}/ei/power/kitchen", f"{p}/ei/occupancy/kitchen")
        late.wait(lambda m: len(m) >= 1, timeout=10)
        time.sleep(0.5)
        assert [m.topic for m in late.messages] == [f"{p}/ei/occupancy/kitchen"]
        watch.close()
        late.close()
    finally:
        runner.stop()
        pub.close()
