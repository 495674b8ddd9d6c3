"""Shelly Gen2+ device linking: the MAC from the device's own sys status links its predictions
to the Shelly integration's Home Assistant device (``connections: [["mac", ...]]``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import devices
from edge.discovery_payloads import BridgeInfo, DiscoveryTracker
from tests.broker import Mosquitto
from tests.harness import Collector, DaemonThread, Publisher, make_config
from tests.onnx_models import snapshot_classifier


def test_shelly_mac_from_status_sys_and_full_status() -> None:
    decoder = devices.build_decoder("shelly", readings={"power": "power"}, options={})
    seen: list[str] = []
    decoder.notify_identity(seen.append)  # type: ignore[attr-defined]
    dev = "shellyplus1pm-a8032ab12345"
    assert decoder.device_info(dev).mac is None  # type: ignore[attr-defined]
    decoder.decode(f"{dev}/status/sys", json.dumps({"mac": "A8032AB12345", "uptime": 3}).encode())
    assert decoder.device_info(dev).mac == ("mac", "a8:03:2a:b1:23:45")  # type: ignore[attr-defined]
    assert seen == [dev]
    decoder.decode(f"{dev}/status/sys", json.dumps({"mac": "A8032AB12345", "uptime": 4}).encode())
    assert seen == [dev]  # the same MAC again: no re-announcement
    other = "shellyplusht-b8d61a8b17cc"
    full = {"src": other, "method": "NotifyFullStatus", "params": {"ts": 1.0, "sys": {"mac": "B8D61A8B17CC"}}}
    assert decoder.decode(f"{other}/events/rpc", json.dumps(full).encode()) == []
    assert decoder.device_info(other).mac == ("mac", "b8:d6:1a:8b:17:cc")  # type: ignore[attr-defined]
    assert seen == [dev, other]


def test_a_hostile_or_odd_mac_is_refused() -> None:
    decoder = devices.build_decoder("shelly", readings={"power": "power"}, options={})
    dev = "shellyplug-1"
    for bad in ("A8032AB1234", "zz032ab12345", "a8:03:2a:b1:23:45/../x", "x" * 5000, 12345, None):
        decoder.decode(f"{dev}/status/sys", json.dumps({"mac": bad}).encode())
    assert decoder.device_info(dev).mac is None  # type: ignore[attr-defined]
    assert decoder.mac_rejected == 6  # type: ignore[attr-defined]


def test_readback_gives_the_linked_identity_back() -> None:
    bridge = BridgeInfo(version="1", base_topic="ei", instance_id="t")
    config = {
        "dev": {"connections": [["mac", "A8032AB12345"]]},
        "o": {"name": "edge-infer"},
        "cmps": {"p": {"platform": "sensor", "unique_id": "edge_infer_t_x_p", "state_topic": "ei/p/x"}},
    }
    own = {
        "dev": {"identifiers": ["edge_infer_t_y"], "via_device": "edge_infer_t"},
        "o": {"name": "edge-infer"},
        "cmps": {"p": {"platform": "sensor", "unique_id": "edge_infer_t_y_p", "state_topic": "ei/p/y"}},
    }
    tracker = DiscoveryTracker(bridge)
    assert tracker.observe_retained("homeassistant/device/edge_infer_t_x/config", json.dumps(config))
    assert tracker.observe_retained("homeassistant/device/edge_infer_t_y/config", json.dumps(own))
    found = tracker.announced_identities()
    assert len(found) == 1
    identity, topics = found[0]
    assert identity.connections == (("mac", "a8:03:2a:b1:23:45"),) and topics == ["ei/p/x"]


@pytest.mark.broker
def test_daemon_links_a_shelly_by_the_mac_of_its_sys_status(
    mosquitto: Mosquitto, topic_prefix: str, tmp_path: Path
) -> None:
    """On the real Mosquitto: first announced as edge-infer's own device (no MAC yet), then, once
    the Shelly's sys status gives its MAC, re-announced with ``connections`` only (no name, model
    or via_device that would overwrite the Shelly integration's description)."""
    p = topic_prefix
    snapshot_classifier(tmp_path / "occ.onnx", ["power"], ["off", "on"], name="occ")
    dev = f"shellyplus1pm-{p[-6:]}"
    data: dict[str, Any] = {
        "mqtt": {"url": mosquitto.url, "base_topic": f"{p}/ei", "client_id": f"ei-{p}"},
        "models": {"occ": {"path": "occ.onnx"}},
        "pipelines": {"sh": {"model": "occ", "source": {"profile": "shelly", "options": {"prefix": dev}}}},
        "homeassistant": {"discovery_prefix": f"{p}/ha", "status_topic": f"{p}/ha/status", "instance_id": p},
    }
    pub = Publisher(mosquitto.url)
    watch = Collector(mosquitto.url, f"{p}/ha/device/+/config")
    topic = f"{p}/ha/device/edge_infer_{p}_{dev}/config"

    def dev_of() -> Any:
        last = [m for m in watch.messages if m.topic == topic and m.payload]
        return last[-1].json()["dev"] if last else None

    try:
        with DaemonThread(make_config(data, tmp_path)):
            pub.send(f"{dev}/status/switch:0", {"id": 0, "apower": 3.0, "output": True})
            watch.wait(lambda m: dev_of() is not None, timeout=15)
            assert "via_device" in dev_of()
            pub.send(f"{dev}/status/sys", {"mac": "A8032A" + p[-6:].upper(), "uptime": 5})
            mac = ":".join(f"a8032a{p[-6:].lower()}"[i : i + 2] for i in range(0, 12, 2))
            watch.wait(lambda m: dev_of() == {"connections": [["mac", mac]]}, timeout=15)
    finally:
        pub.close()
        watch.close()
