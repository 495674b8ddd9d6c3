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
                "timestamp_field": "ts",
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


def test_client_ids_differ_between_simulators_started_together() -> None:
    """Two simulators share a broker in the e2e test; a shared client id makes it drop one of them."""
    ids = {client_kwargs("mqtt://h")["identifier"] for _ in range(50)}
    assert len(ids) == 50
    # 23 characters: what every MQTT 3.1.1 server allows
    assert all(i.startswith("edge-infer-sim-") and len(i) <= 23 for i in ids)


def _decode(decoder: Any, messages: list[tuple[str, bytes]]) -> list[Decoded]:
    return [
        e
        for topic, payload in messages
        if any(_covered(f, topic) for f in decoder.filters)
        for e in decoder.decode(topic, payload)
        if isinstance(e, Decoded)
    ]


@pytest.mark.parametrize("meter", ["shelly", "tasmota"])
def test_mains_meter_is_the_plugs_plus_a_base_load(meter: str) -> None:
    """Step by step, the meter reads the replayed plugs' sum plus the base load, and decodes
    through the Shelly (em1:0.act_power) or Tasmota profile as a real meter's messages would."""
    cfg = SimConfig(devices=2, seed=5, families=("z2m_plug", "tasmota_plug"), mains=meter, mains_base_w=200)
    sim = Simulator(cfg)
    plain = Simulator(SimConfig(devices=2, seed=5, families=("z2m_plug", "tasmota_plug")))
    assert [d.name for d in sim.devices[:-1]] == [d.name for d in plain.devices]  # the others unchanged
    plugs, mains = sim.devices[:-1], sim.devices[-1]
    assert mains.family == f"mains_{meter}" and mains.truth["components"] == [p.name for p in plugs]
    if meter == "shelly":
        decoder = devices.build_decoder("shelly", readings={"power": "em1:0.act_power"}, options={})
    else:
        decoder = devices.build_decoder(
            "tasmota", readings={"power": "power"}, options={"devices": [mains.name]}
        )
    plug_decoders = {
        "z2m_plug": devices.build_decoder("zigbee2mqtt", readings={"power": "power"}, options={}),
        "tasmota_plug": devices.build_decoder("tasmota", readings={"power": "power"}, options={}),
    }
    residuals = []
    on_changes = 0
    last_on: Any = None
    for step in range(0, 8640, 7):  # a day, every 7th sample
        ts = 1_764_000_000.0 + step * 10
        (reading,) = _decode(decoder, mains.messages(step, ts))
        assert reading.device == mains.name
        plug_sum = 0.0
        for plug in plugs:
            (p,) = _decode(plug_decoders[plug.family], plug.messages(step, ts))
            plug_sum += float(p.values["power"])
        residuals.append(float(reading.values["power"]) - plug_sum)
        assert mains.truth_at is not None
        on = mains.truth_at(step)["on"]
        on_changes += on != last_on
        last_on = on
    # the base load: 200 W ±20 % daily swing, ±1 % noise (the sum is rounded to 0.1 W)
    assert min(residuals) > 200 * 0.8 - 10 and max(residuals) < 200 * 1.2 + 10
    assert max(residuals) - min(residuals) > 40  # it does swing
    assert on_changes > 2  # appliances switch on and off through the day


def test_mains_meter_off_by_default_and_on_the_broker(fresh_broker: Mosquitto) -> None:
    assert not any(d.family.startswith("mains") for d in Simulator(SimConfig()).devices)
    with pytest.raises(ValueError, match="sums the plugs"):
        SimConfig(families=("z2m_climate",), mains="shelly")
    with pytest.raises(ValueError, match="use one of shelly, tasmota"):
        SimConfig(mains="kettle")
    mosquitto = fresh_broker.start()
    collector = Collector(mosquitto)
    sim = Simulator(SimConfig(speed=200, devices=1, seed=2, families=("z2m_plug",), mains="shelly"))
    counts = asyncio.run(sim.run(mosquitto.url, duration=1.0))
    time.sleep(0.3)
    messages = collector.stop()
    mains = sim.devices[-1]
    assert counts["mains_shelly"] >= 10
    decoder = devices.build_decoder("shelly", readings={"power": "em1:0.act_power"}, options={})
    events = [
        e
        for t, p, _ in messages
        if any(_covered(f, t) for f in decoder.filters)
        for e in decoder.decode(t, p)
    ]
    online = [e.online for e in events if isinstance(e, Availability)]
    assert online[0] is True and online[-1] is False
    assert sum(isinstance(e, Decoded) and e.device == mains.name for e in events) >= 10
    truth = [json.loads(p) for t, p, _ in messages if t == f"edge-infer-sim/truth/{mains.name}"]
    assert truth[0]["kind"] == "mains" and truth[0]["components"] == [sim.devices[0].name]
