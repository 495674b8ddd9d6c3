"""The simulated home against a real Mosquitto: every family arrives and decodes through its profile."""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections import defaultdict
from typing import Any

import paho.mqtt.client as mqtt
import pytest

import devices
from devices.simulate import DEVICES_TOPIC, FAMILIES, SimConfig, Simulator, cli_simulate, client_kwargs
from edge.decode import Availability, Decoded
from tests.broker import Mosquitto

pytestmark = pytest.mark.broker

IMU = {
    "acc_x": "accel.x",
    "acc_y": "accel.y",
    "acc_z": "accel.z",
    "gyro_x": "gyro.x",
    "gyro_y": "gyro.y",
    "gyro_z": "gyro.z",
}
CLIMATE = {"temperature": "temperature", "humidity": "humidity", "illuminance": "illuminance", "co2": "co2"}


class Collector:
    """A paho subscriber that records every message."""

    def __init__(self, broker: Mosquitto) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"collector-{time.monotonic_ns()}"
        )
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        assert self.ready.wait(10)
        time.sleep(0.2)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        client.subscribe("#")
        self.ready.set()

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))

    def stop(self) -> list[tuple[str, bytes, bool]]:
        self.client.loop_stop()
        self.client.disconnect()
        with self.lock:
            return list(self.messages)


def _pipelines() -> dict[str, Any]:
    """A decoder per simulated family, configured as examples/home.yaml would."""
    return {
        "z2m_plug": devices.build_decoder(
            "zigbee2mqtt", readings={"power": "power"}, options={"base_topic": "zigbee2mqtt"}
        ),
        "tasmota_plug": devices.build_decoder("tasmota", readings={"power": "power"}, options={}),
        "wearable": devices.build_decoder(
            "json",
            readings=IMU,
            options={
                "topics": "wearables/{device}/imu",
                "timestamp_path": "ts",
                "availability_topic": "wearables/{device}/status",
            },
        ),
        "z2m_climate": devices.build_decoder("zigbee2mqtt", readings=CLIMATE, options={}),
        "esphome_climate": devices.build_decoder("esphome", readings=CLIMATE, options={}),
    }


def _covered(filt: str, topic: str) -> bool:
    fp, tp = filt.split("/"), topic.split("/")
    if len(fp) != len(tp):
        return False
    return all(f in ("+", t) for f, t in zip(fp, tp, strict=True))


def test_every_family_arrives_and_decodes(fresh_broker: Mosquitto) -> None:
    # A broker of its own: other tests' simulators leave retained truth topics in the session's.
    mosquitto = fresh_broker.start()
    collector = Collector(mosquitto)
    sim = Simulator(SimConfig(speed=600, devices=2, seed=3, imu_speed=5))
    counts = asyncio.run(sim.run(mosquitto.url, duration=2.0))
    time.sleep(0.5)
    messages = collector.stop()
    assert set(counts) == set(FAMILIES)
    truths = {
        topic.rsplit("/", 1)[1]: json.loads(payload)
        for topic, payload, _ in messages
        if topic.startswith("edge-infer-sim/truth/")
    }
    names = {d.name for d in sim.devices}
    assert set(truths) == names
    listed = next(json.loads(p) for t, p, _ in messages if t == DEVICES_TOPIC)
    assert {d["device"] for d in listed} == names

    decoders = _pipelines()
    family_of = {d.name: d.family for d in sim.devices}
    readings: dict[str, int] = defaultdict(int)
    availability: dict[str, list[bool]] = defaultdict(list)
    for topic, payload, _ in messages:
        for family, decoder in decoders.items():
            if not any(_covered(f, topic) for f in decoder.filters):
                continue
            for event in decoder.decode(topic, payload):
                if family_of.get(event.device) != family:
                    continue  # a z2m climate sensor seen by the z2m plug pipeline, say
                if isinstance(event, Decoded):
                    readings[event.device] += 1
                elif isinstance(event, Availability):
                    availability[event.device].append(event.online)
    for dev in sim.devices:
        assert readings[dev.name] >= 3, (dev.name, dict(readings))
        assert availability[dev.name][0] is True
        assert availability[dev.name][-1] is False
    for dev in sim.devices:
        truth = truths[dev.name]
        if truth["kind"] in ("appliance", "activity"):
            assert dev.name.endswith(truth["label"])  # the true class is in the name too
        else:
            assert truth["occupancy"] in (0, 1)


def test_plug_timing_and_watts(mosquitto: Mosquitto) -> None:
    """At speed S a plug publishes every 10/S s; Tasmota's Time advances 10 s per sample."""
    collector = Collector(mosquitto)
    sim = Simulator(SimConfig(speed=50, devices=1, seed=1, families=("tasmota_plug",)))
    asyncio.run(sim.run(mosquitto.url, duration=1.0))
    time.sleep(0.3)
    name = sim.devices[0].name
    decoder = devices.build_decoder("tasmota", readings={"power": "power"}, options={"devices": [name]})
    decoded = [
        e
        for topic, payload, _ in collector.stop()
        if topic == f"tele/{name}/SENSOR"
        for e in decoder.decode(topic, payload)
        if isinstance(e, Decoded)
    ]
    assert 4 <= len(decoded) <= 7
    stamps = [e.ts for e in decoded]
    assert all(b - a == pytest.approx(10.0) for a, b in itertools.pairwise(stamps))  # type: ignore[operator]
    assert all(e.values["power"] >= 0 for e in decoded)


def test_cli(mosquitto: Mosquitto, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--mqtt-url", mosquitto.url, "--speed", "200", "--devices", "1", "--duration", "0.5"]
    assert cli_simulate([*argv, "--families", "z2m_plug,esphome_climate"]) == 0
    out = capsys.readouterr().out
    assert "z2m_plug:" in out
    assert "esphome_climate:" in out
    assert cli_simulate(["--families", "toaster", "--list"]) == 2
    assert cli_simulate(["--mqtt-url", "http://x", "--duration", "1"]) == 2


def test_client_kwargs() -> None:
    kw = client_kwargs("mqtt://user:p%40ss@broker.local:1884")
    assert (kw["hostname"], kw["port"], kw["username"], kw["password"]) == (
        "broker.local",
        1884,
        "user",
        "p@ss",
    )
    assert client_kwargs("mqtts://h")["port"] == 8883
    with pytest.raises(ValueError, match="mqtt://"):
        client_kwargs("http://h")
