"""A simulated home on MQTT: real data replayed in the real formats of the device families.

* **Appliance plugs** replay ACSF1 power series (one sample every 10 s in the data set) as
  Zigbee2MQTT plugs (``zigbee2mqtt/<name>``, JSON with power/voltage/current/energy/state and
  ``last_seen`` as with Zigbee2MQTT's ``advanced.last_seen: ISO_8601``) and
  Tasmota plugs (``tele/<name>/SENSOR`` with a nested ``ENERGY`` object and a ``Time``).
* **Wearables** replay BasicMotions accelerometer/gyroscope series (10 Hz) as generic JSON on
  ``wearables/<name>/imu`` (``{"ts": ms, "accel": {x,y,z}, "gyro": {x,y,z}}``).
* **Rooms** from :mod:`devices.roomsim` (one sample a minute) as Zigbee2MQTT climate sensors
  (``zigbee2mqtt/<name>``: temperature, humidity, illuminance, co2) and ESPHome nodes
  (``<name>/sensor/<object_id>/state`` plain values).
* Availability: Zigbee2MQTT ``<base>/<name>/availability`` ``{"state":"online"}``, Tasmota
  ``tele/<name>/LWT`` Online/Offline, ESPHome ``<name>/status``, wearables
  ``wearables/<name>/status``; all retained, offline at the end (and during simulated outages).
* A **mains meter** (``SimConfig(mains="shelly")`` or ``"tasmota"``, ``--mains``; off by default):
  the sum of the simulated plugs' replayed ACSF1 power plus a base load, as a Shelly Pro EM
  publishes it (``<id>/status/em1:0`` with ``act_power``, ``<id>/status/em1data:0`` energy
  totals, ``<id>/online``) or as a Tasmota energy meter (``tele/<name>/SENSOR`` ``ENERGY``), so
  a plug can teach the mains meter to recognise its appliance (NILM). Its truth lists the plugs
  drawing more than ``MAINS_ON_W`` as they change.
* **Faults** (``SimConfig(faults=...)``, ``--fault``; none by default, devices/faults.py): a
  fridge on a Shelly plug whose compressor creeps to a 100 % duty cycle, short-cycles or sticks
  on, a water-flow sensor that never returns to zero, an appliance the open-set model never
  trained on; each begins after ``fault_onset_h`` simulated hours (``--fault-onset-h``).
* The truth, for tests and the demo, on retained ``edge-infer-sim/truth/<device>`` JSON topics
  (appliance class, activity, room occupancy as it changes) and the device list on the retained
  ``edge-infer-sim/devices``. Device names carry the true class too (``sim_plug_03_fridge_freezer``).

Simulated time runs ``speed`` times faster than the wall clock from the moment ``run`` starts;
payload timestamps (Tasmota ``Time``, Zigbee2MQTT ``last_seen``, the wearable ``ts``) are
simulated time, so their spacing is the data set's sample period whatever the speed. Wearables
run at ``imu_speed`` (default ``min(speed, 2)``), since a 10 Hz stream sped up 100 times would
be 1000 messages a second each.

Use it as a library (``await Simulator(SimConfig(...)).run("mqtt://host:1883", duration=60)``)
or as ``edge-infer simulate --mqtt-url mqtt://127.0.0.1:1883 --speed 100 --devices 3``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import heapq
import json
import math
import secrets
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np

from devices.faults import FAULTS, check_faults, fault_devices
from devices.roomsim import SCHEDULES, RoomConfig, simulate_room
from edge.config import mask_url

TRACES = Path(__file__).resolve().parent / "traces"
FAMILIES = ("z2m_plug", "tasmota_plug", "wearable", "z2m_climate", "esphome_climate")
TRUTH_PREFIX = "edge-infer-sim/truth"
DEVICES_TOPIC = "edge-infer-sim/devices"
ROOM_PERIOD_S = 60.0
PLUG_PERIOD_S = 10.0
IMU_PERIOD_S = 0.1
MAINS_FORMATS = ("shelly", "tasmota")
MAINS_ON_W = 5.0  # a plug above this counts as "on" in the mains meter's truth


@dataclass
class SimConfig:
    """What to simulate. ``devices`` is the number of devices of each family."""

    speed: float = 1.0
    devices: int = 2
    seed: int = 0
    families: tuple[str, ...] = FAMILIES
    imu_speed: float | None = None
    z2m_base: str = "zigbee2mqtt"
    tele_prefix: str = "tele"
    wearable_prefix: str = "wearables"
    truth_prefix: str = TRUTH_PREFIX
    outages: bool = False  # now and then a device drops off for a few (simulated) minutes
    qos: int = 0
    mains: str | None = None  # "shelly" or "tasmota": a mains meter summing the plugs (off: None)
    mains_base_w: float = 150.0  # the rest of the house: base load (with a slow swing and noise)
    faults: tuple[str, ...] = ()  # devices that go wrong (devices/faults.py, --fault)
    fault_onset_h: float = 4.0  # simulated hours of normal behaviour before a fault starts

    def __post_init__(self) -> None:
        if not self.speed > 0 or not math.isfinite(self.speed):
            raise ValueError(f"speed must be a positive number, not {self.speed}")
        if self.devices < 1:
            raise ValueError("devices must be at least 1")
        unknown = set(self.families) - set(FAMILIES)
        if unknown:
            raise ValueError(f"unknown families {sorted(unknown)}; known: {', '.join(FAMILIES)}")
        check_faults(tuple(self.faults))
        if not (self.fault_onset_h >= 0 and math.isfinite(self.fault_onset_h)):
            raise ValueError(f"fault_onset_h must be a non-negative number, not {self.fault_onset_h}")
        if self.mains is not None:
            if self.mains not in MAINS_FORMATS:
                raise ValueError(f"mains {self.mains!r}: use one of {', '.join(MAINS_FORMATS)}")
            if not {"z2m_plug", "tasmota_plug"} & set(self.families):
                raise ValueError("a mains meter sums the plugs: keep z2m_plug or tasmota_plug in families")
            if not (self.mains_base_w >= 0 and math.isfinite(self.mains_base_w)):
                raise ValueError(f"mains_base_w must be a non-negative number, not {self.mains_base_w}")


@dataclass
class SimDevice:
    """One simulated device: its family, name, the topics it uses and its (initial) truth."""

    name: str
    family: str
    period_s: float  # simulated seconds between messages
    speed: float
    truth: dict[str, Any]
    topics: dict[str, str]
    messages: Callable[[int, float], list[tuple[str, bytes]]] = field(repr=False)
    truth_at: Callable[[int], dict[str, Any] | None] | None = field(default=None, repr=False)
    online_payload: tuple[str, bytes, bytes] = field(default=("", b"", b""), repr=False)  # topic, on, off
    power_w: Callable[[int], float] | None = field(default=None, repr=False)  # plugs: watts at a step


def acsf1_watts(acsf1: dict[str, np.ndarray], series: int) -> np.ndarray:
    """ACSF1 series ``series`` back in watts: a positive affine map of its z-scores, standby at
    the minimum and the class's peak at the maximum (the traces keep z-scores, not watts)."""
    standby, peak = (float(v) for v in acsf1["watts"][int(acsf1["label"][series])])
    z = acsf1["power_z"][series].astype(np.float64)
    return np.asarray(standby + (z - z.min()) / max(float(z.max() - z.min()), 1e-9) * (peak - standby))


def _load_traces() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    with np.load(TRACES / "acsf1.npz") as a, np.load(TRACES / "basicmotions.npz") as b:
        return {k: a[k] for k in a.files}, {k: b[k] for k in b.files}


def _iso_local(ts: float) -> str:
    return datetime.fromtimestamp(ts).replace(microsecond=0).isoformat()


def _iso_utc_ms(ts: float) -> str:
    """Zigbee2MQTT's ``last_seen`` with ``advanced.last_seen: ISO_8601``."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Simulator:
    """Builds the simulated devices and publishes them; ``run`` is the asyncio entry point."""

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        self.devices: list[SimDevice] = []
        self.counts: Counter[str] = Counter()
        # Set by stop(): the publishing loop ends at its next step. A cancel() alone can be lost:
        # on Python 3.11 asyncio.wait_for (inside aiomqtt's publish) swallows a cancellation
        # that arrives as the PUBACK does, and a fast home publishes on.
        self._stop_requested = False
        self._build()

    # ----------------------------------------------------------------- devices

    def _build(self) -> None:
        cfg = self.config
        rng = np.random.default_rng(cfg.seed)
        acsf1, motions = _load_traces()
        n_series = len(acsf1["label"])
        # plugs: spread the classes over the devices (each plug a different class while possible)
        order = rng.permutation(n_series)
        by_class: dict[int, list[int]] = {}
        for i in order:
            by_class.setdefault(int(acsf1["label"][i]), []).append(int(i))
        classes_cycle = list(rng.permutation(sorted(by_class)))
        plug_series: list[int] = []
        k = 0
        while len(plug_series) < 2 * cfg.devices:
            cls = int(classes_cycle[k % len(classes_cycle)])
            plug_series.append(by_class[cls][(k // len(classes_cycle)) % len(by_class[cls])])
            k += 1
        imu_speed = cfg.imu_speed if cfg.imu_speed is not None else min(cfg.speed, 2.0)
        number = 0
        for family in ("z2m_plug", "tasmota_plug"):
            if family not in cfg.families:
                plug_series = plug_series[cfg.devices :]
                continue
            for _ in range(cfg.devices):
                series = plug_series.pop(0)
                number += 1
                self.devices.append(self._plug(family, number, series, acsf1, rng))
        if "wearable" in cfg.families:
            labels = motions["label"]
            classes = [str(c) for c in motions["classes"]]
            for i in range(cfg.devices):
                cls = i % len(classes)
                candidates = np.flatnonzero(labels == cls)
                series = int(candidates[int(rng.integers(len(candidates)))])
                self.devices.append(self._wearable(i + 1, series, motions, classes, imu_speed))
        room_no = 0
        for family in ("z2m_climate", "esphome_climate"):
            if family not in cfg.families:
                continue
            for _ in range(cfg.devices):
                room_no += 1
                schedule = SCHEDULES[(room_no - 1) % len(SCHEDULES)]
                room = RoomConfig.random(rng, schedule)
                self.devices.append(self._room(family, room_no, room, cfg.seed * 100 + room_no))
        if cfg.mains is not None:  # last, with its own random stream: the other devices stay as they were
            plugs = [d for d in self.devices if d.power_w is not None]
            self.devices.append(mains_meter(cfg, plugs, np.random.default_rng(cfg.seed + 7717)))
        # faults last, each from its own random stream: the rest of the home stays as it was
        onset_s = cfg.fault_onset_h * 3600.0
        for spec in fault_devices(
            tuple(cfg.faults), cfg.seed, onset_s, acsf1, lambda series: acsf1_watts(acsf1, series)
        ):
            self.devices.append(SimDevice(speed=cfg.speed, **spec))

    def _plug(
        self, family: str, number: int, series: int, acsf1: dict[str, np.ndarray], rng: np.random.Generator
    ) -> SimDevice:
        cfg = self.config
        cls = int(acsf1["label"][series])
        label = str(acsf1["classes"][cls])
        watts = np.round(acsf1_watts(acsf1, series), 2)
        voltage = 230.0 + rng.normal(0, 1.5)
        kind = "plug" if family == "z2m_plug" else "tasmota"
        name = f"sim_{kind}_{number:02d}_{label}"
        truth = {
            "device": name,
            "family": family,
            "kind": "appliance",
            "label": label,
            "class_index": cls,
            "dataset": "ACSF1",
            "split": "test",
            "test_index": int(acsf1["test_index"][series]),
        }
        energy = [float(rng.uniform(1, 300))]  # kWh counter

        def watts_at(step: int) -> float:
            return float(watts[step % len(watts)])

        def power_at(step: int) -> tuple[float, float, float]:
            p = watts_at(step)
            v = round(voltage + 0.8 * math.sin(step / 37.0), 1)
            energy[0] += p * PLUG_PERIOD_S / 3.6e6
            return p, v, round(p / v, 3)

        if family == "z2m_plug":
            topic = f"{cfg.z2m_base}/{name}"

            def z2m_msgs(step: int, ts: float) -> list[tuple[str, bytes]]:
                p, v, i = power_at(step)
                payload = {
                    "current": i,
                    "energy": round(energy[0], 3),
                    "last_seen": _iso_utc_ms(ts),
                    "linkquality": 120 + step % 17,
                    "power": p,
                    "state": "ON",
                    "voltage": v,
                }
                return [(topic, json.dumps(payload).encode())]

            return SimDevice(
                name,
                family,
                PLUG_PERIOD_S,
                cfg.speed,
                truth,
                {"state": topic, "availability": f"{topic}/availability"},
                z2m_msgs,
                online_payload=(f"{topic}/availability", b'{"state":"online"}', b'{"state":"offline"}'),
                power_w=watts_at,
            )
        sensor = f"{cfg.tele_prefix}/{name}/SENSOR"
        start_time = _iso_local(time.time())
        today = [float(rng.uniform(0, 2))]

        def tasmota_msgs(step: int, ts: float) -> list[tuple[str, bytes]]:
            p, v, i = power_at(step)
            today[0] += p * PLUG_PERIOD_S / 3.6e6
            apparent = round(p * 1.08 + 0.5, 1)
            reactive = round(math.sqrt(max(apparent**2 - p**2, 0.0)), 1)
            energy_obj = {
                "TotalStartTime": start_time,
                "Total": round(energy[0], 3),
                "Yesterday": 0.412,
                "Today": round(today[0], 3),
                "Period": round(p * PLUG_PERIOD_S / 3600.0, 2),
                "Power": p,
                "ApparentPower": apparent,
                "ReactivePower": reactive,
                "Factor": round(p / apparent, 2) if apparent else 0.0,
                "Voltage": round(v),
                "Current": i,
            }
            return [(sensor, json.dumps({"Time": _iso_local(ts), "ENERGY": energy_obj}).encode())]

        lwt = f"{cfg.tele_prefix}/{name}/LWT"
        return SimDevice(
            name,
            family,
            PLUG_PERIOD_S,
            cfg.speed,
            truth,
            {"state": sensor, "availability": lwt},
            tasmota_msgs,
            online_payload=(lwt, b"Online", b"Offline"),
            power_w=watts_at,
        )

    def _wearable(
        self, number: int, series: int, motions: dict[str, np.ndarray], classes: list[str], speed: float
    ) -> SimDevice:
        cfg = self.config
        cls = int(motions["label"][series])
        name = f"sim_wrist_{number:02d}_{classes[cls]}"
        imu = motions["imu"][series].astype(np.float64)  # (6, 100)
        topic = f"{cfg.wearable_prefix}/{name}/imu"
        status = f"{cfg.wearable_prefix}/{name}/status"
        truth = {
            "device": name,
            "family": "wearable",
            "kind": "activity",
            "label": classes[cls],
            "class_index": cls,
            "dataset": "BasicMotions",
            "split": "test",
            "test_index": series,
        }

        def msgs(step: int, ts: float) -> list[tuple[str, bytes]]:
            s = imu[:, step % imu.shape[1]]
            payload = {
                "ts": int(ts * 1000),
                "accel": {"x": round(s[0], 5), "y": round(s[1], 5), "z": round(s[2], 5)},
                "gyro": {"x": round(s[3], 5), "y": round(s[4], 5), "z": round(s[5], 5)},
            }
            return [(topic, json.dumps(payload).encode())]

        return SimDevice(
            name,
            "wearable",
            IMU_PERIOD_S,
            speed,
            truth,
            {"state": topic, "availability": status},
            msgs,
            online_payload=(status, b"online", b"offline"),
        )

    def _room(self, family: str, number: int, room: RoomConfig, seed: int) -> SimDevice:
        cfg = self.config
        chunk_h = 24.0
        cache: dict[int, dict[str, np.ndarray]] = {}
        per_chunk = int(chunk_h * 3600 / ROOM_PERIOD_S)

        def sample(step: int) -> dict[str, float]:
            chunk, idx = divmod(step, per_chunk)
            if chunk not in cache:
                cache.clear()
                day = room.with_(
                    day_of_year=(room.day_of_year + chunk) % 365,
                    start_weekday=(room.start_weekday + chunk) % 7,
                )
                cache[chunk] = simulate_room(
                    day, hours=chunk_h, period_s=ROOM_PERIOD_S, seed=seed + 7919 * chunk
                )
            data = cache[chunk]
            return {
                key: float(data[key][idx])
                for key in ("temperature", "humidity", "illuminance", "co2", "occupants", "occupancy")
            }

        def truth_at(step: int) -> dict[str, Any]:
            s = sample(step)
            return {"occupancy": int(s["occupancy"]), "occupants": int(s["occupants"])}

        base_truth = {
            "device": "",
            "family": family,
            "kind": "room",
            "schedule": room.schedule,
            "room": room.as_dict(),
        }
        if family == "z2m_climate":
            name = f"sim_room_{number:02d}_{room.schedule}"
            topic = f"{cfg.z2m_base}/{name}"

            def z2m_msgs(step: int, ts: float) -> list[tuple[str, bytes]]:
                s = sample(step)
                payload = {
                    "battery": 97,
                    "co2": int(s["co2"]),
                    "humidity": round(s["humidity"], 1),
                    "illuminance": int(s["illuminance"]),
                    "last_seen": _iso_utc_ms(ts),
                    "linkquality": 90 + step % 23,
                    "temperature": round(s["temperature"], 2),
                    "voltage": 3000,
                }
                return [(topic, json.dumps(payload).encode())]

            return SimDevice(
                name,
                family,
                ROOM_PERIOD_S,
                cfg.speed,
                base_truth | {"device": name},
                {"state": topic, "availability": f"{topic}/availability"},
                z2m_msgs,
                truth_at,
                online_payload=(f"{topic}/availability", b'{"state":"online"}', b'{"state":"offline"}'),
            )
        name = f"sim-room-{number:02d}-{room.schedule.replace('_', '-')}"

        def esphome_msgs(step: int, ts: float) -> list[tuple[str, bytes]]:
            s = sample(step)
            return [
                (f"{name}/sensor/temperature/state", f"{s['temperature']:.1f}".encode()),
                (f"{name}/sensor/humidity/state", f"{s['humidity']:.1f}".encode()),
                (f"{name}/sensor/illuminance/state", f"{s['illuminance']:.0f}".encode()),
                (f"{name}/sensor/co2/state", f"{s['co2']:.0f}".encode()),
            ]

        return SimDevice(
            name,
            family,
            ROOM_PERIOD_S,
            cfg.speed,
            base_truth | {"device": name},
            {"state": f"{name}/sensor/+/state", "availability": f"{name}/status"},
            esphome_msgs,
            truth_at,
            online_payload=(f"{name}/status", b"online", b"offline"),
        )

    # ----------------------------------------------------------------- publishing

    def schedule(self, duration_s: float) -> Iterator[tuple[float, SimDevice, int]]:
        """(wall-clock offset, device, step) of every sample within ``duration_s``, in time order."""
        heap: list[tuple[float, int, int]] = [(0.0, index, 0) for index in range(len(self.devices))]
        while heap:
            at, index, step = heapq.heappop(heap)
            if at > duration_s:
                break
            dev = self.devices[index]
            yield at, dev, step
            heapq.heappush(heap, ((step + 1) * dev.period_s / dev.speed, index, step + 1))

    def device_list(self) -> list[dict[str, Any]]:
        return [
            {
                "device": d.name,
                "family": d.family,
                "topics": d.topics,
                "period_s": d.period_s,
                "speed": d.speed,
            }
            for d in self.devices
        ]

    async def run(
        self,
        client_or_url: Any,
        duration: float | None = None,
        *,
        announce: bool = True,
        goodbye_s: float = 5.0,
    ) -> Counter[str]:
        """Publish until ``duration`` wall-clock seconds pass (``None``: until cancelled).

        ``client_or_url`` is a connected ``aiomqtt.Client`` or an ``mqtt://`` / ``mqtts://`` URL.
        Returns messages published per family. When it ends (or is cancelled) the devices say
        goodbye (offline) for at most ``goodbye_s`` seconds.
        """
        if isinstance(client_or_url, str):
            try:
                import aiomqtt
            except ImportError as exc:  # the daemon needs no MQTT client library; the simulator does
                raise SystemExit(
                    "edge-infer simulate needs the demo extra (aiomqtt): pip install 'edge-infer[demo]'"
                ) from exc

            kwargs = client_kwargs(client_or_url)
            async with aiomqtt.Client(**kwargs) as client:
                return await self._run(client, duration, announce, goodbye_s)
        return await self._run(client_or_url, duration, announce, goodbye_s)

    def stop(self) -> None:
        """End :meth:`run` at the next step (the devices then say goodbye, bounded)."""
        self._stop_requested = True

    async def _run(
        self, client: Any, duration: float | None, announce: bool, goodbye_s: float = 5.0
    ) -> Counter[str]:
        cfg = self.config
        qos = cfg.qos
        rng = np.random.default_rng(cfg.seed + 1)
        start_wall = time.time()
        loop_start = time.monotonic()
        offline_until: dict[str, float] = {}
        last_truth: dict[str, dict[str, Any] | None] = {}

        async def pub(topic: str, payload: bytes, retain: bool = False, family: str | None = None) -> None:
            await client.publish(topic, payload, qos=qos, retain=retain)
            if family is not None:
                self.counts[family] += 1

        if announce:
            await pub(DEVICES_TOPIC, json.dumps(self.device_list()).encode(), retain=True)
            if any(d.family.startswith("z2m") for d in self.devices):
                await pub(f"{cfg.z2m_base}/bridge/state", b'{"state":"online"}', retain=True)
            for dev in self.devices:
                await pub(f"{cfg.truth_prefix}/{dev.name}", json.dumps(dev.truth).encode(), retain=True)
                topic, on, _ = dev.online_payload
                await pub(topic, on, retain=True, family=dev.family)
        horizon = math.inf if duration is None else duration
        try:
            for at, dev, step in self.schedule(horizon):
                if self._stop_requested:
                    break
                delay = at - (time.monotonic() - loop_start)
                if delay > 0:
                    await asyncio.sleep(delay)
                sim_ts = start_wall + step * dev.period_s
                if cfg.outages:
                    until = offline_until.get(dev.name)
                    if until is not None:
                        if at < until:
                            continue
                        del offline_until[dev.name]
                        topic, on, _ = dev.online_payload
                        await pub(topic, on, retain=True, family=dev.family)
                    elif step > 0 and rng.random() < dev.period_s / 3600.0 / 4:  # ~ every 4 simulated hours
                        topic, _, off = dev.online_payload
                        await pub(topic, off, retain=True, family=dev.family)
                        offline_until[dev.name] = at + rng.uniform(120, 900) / dev.speed
                        continue
                if dev.truth_at is not None:
                    truth = dev.truth_at(step)
                    if truth != last_truth.get(dev.name):
                        last_truth[dev.name] = truth
                        current = dev.truth | (truth or {}) | {"sim_ts": round(sim_ts, 3)}
                        await pub(f"{cfg.truth_prefix}/{dev.name}", json.dumps(current).encode(), retain=True)
                for topic, payload in dev.messages(step, sim_ts):
                    await pub(topic, payload, family=dev.family)
                await asyncio.sleep(0)
        finally:
            if announce:

                async def goodbye() -> None:
                    for dev in self.devices:
                        topic, _, off = dev.online_payload
                        await pub(topic, off, retain=True, family=dev.family)

                # bounded: a broker that stopped reading must not hold up a cancelled simulator
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(goodbye(), goodbye_s)
        return self.counts


# --------------------------------------------------------------------------- mains meter


def mains_meter(cfg: SimConfig, plugs: list[SimDevice], rng: np.random.Generator) -> SimDevice:
    """The house's mains meter: the plugs' power at each 10 s step plus a base load (a slow
    daily swing of ±20 % and ±1 % noise), published as a Shelly Pro EM or a Tasmota meter."""
    assert cfg.mains in MAINS_FORMATS
    names = [p.name for p in plugs]
    feeds = [p.power_w for p in plugs if p.power_w is not None]
    base = cfg.mains_base_w
    phase = float(rng.uniform(0, 2 * math.pi))
    noise_seed = int(rng.integers(2**31))
    voltage = 230.0 + float(rng.normal(0, 1.0))
    energy_wh = [float(rng.uniform(1e5, 5e6))]  # the meter's lifetime total

    def base_at(step: int) -> float:
        swing = 0.2 * base * math.sin(2 * math.pi * step * PLUG_PERIOD_S / 86400.0 + phase)
        jitter = np.random.default_rng((noise_seed, step)).normal(0, 0.01 * base) if base else 0.0
        return max(0.0, base + swing + float(jitter))

    def total_at(step: int) -> float:
        return round(base_at(step) + sum(feed(step) for feed in feeds), 1)

    def truth_at(step: int) -> dict[str, Any]:
        return {"on": [n for n, feed in zip(names, feeds, strict=True) if feed(step) > MAINS_ON_W]}

    truth = {
        "device": "",
        "family": f"mains_{cfg.mains}",
        "kind": "mains",
        "components": names,
        "base_w": base,
        "on_above_w": MAINS_ON_W,
    }
    if cfg.mains == "shelly":
        name = "shellyproem50-5a11e0000001"
        status = f"{name}/status/em1:0"
        data = f"{name}/status/em1data:0"

        def shelly_msgs(step: int, ts: float) -> list[tuple[str, bytes]]:
            p = total_at(step)
            v = round(voltage + 0.6 * math.sin(step / 41.0), 1)
            apparent = round(p * 1.05 + 3.0, 1)
            energy_wh[0] += p * PLUG_PERIOD_S / 3600.0
            out = [
                (
                    status,
                    json.dumps(
                        {
                            "id": 0,
                            "current": round(apparent / v, 3),
                            "voltage": v,
                            "act_power": p,
                            "aprt_power": apparent,
                            "pf": round(p / apparent, 2) if apparent else 0.0,
                            "freq": 50.0,
                            "calibration": "factory",
                        }
                    ).encode(),
                )
            ]
            if step % 6 == 0:  # the energy counters once a minute
                payload = {"id": 0, "total_act_energy": round(energy_wh[0], 2), "total_act_ret_energy": 0.0}
                out.append((data, json.dumps(payload).encode()))
            return out

        return SimDevice(
            name,
            f"mains_{cfg.mains}",
            PLUG_PERIOD_S,
            cfg.speed,
            truth | {"device": name},
            {"state": f"{name}/status/+", "availability": f"{name}/online"},
            shelly_msgs,
            truth_at,
            online_payload=(f"{name}/online", b"true", b"false"),
        )
    name = "sim_mains_meter"
    sensor = f"{cfg.tele_prefix}/{name}/SENSOR"
    start_time = _iso_local(time.time())

    def tasmota_msgs(step: int, ts: float) -> list[tuple[str, bytes]]:
        p = total_at(step)
        v = round(voltage + 0.6 * math.sin(step / 41.0))
        apparent = round(p * 1.05 + 3.0, 1)
        energy_wh[0] += p * PLUG_PERIOD_S / 3600.0
        energy_obj = {
            "TotalStartTime": start_time,
            "Total": round(energy_wh[0] / 1000.0, 3),
            "Period": round(p * PLUG_PERIOD_S / 3600.0, 2),
            "Power": p,
            "ApparentPower": apparent,
            "ReactivePower": round(math.sqrt(max(apparent**2 - p**2, 0.0)), 1),
            "Factor": round(p / apparent, 2) if apparent else 0.0,
            "Voltage": v,
            "Current": round(apparent / v, 3),
        }
        return [(sensor, json.dumps({"Time": _iso_local(ts), "ENERGY": energy_obj}).encode())]

    lwt = f"{cfg.tele_prefix}/{name}/LWT"
    return SimDevice(
        name,
        f"mains_{cfg.mains}",
        PLUG_PERIOD_S,
        cfg.speed,
        truth | {"device": name},
        {"state": sensor, "availability": lwt},
        tasmota_msgs,
        truth_at,
        online_payload=(lwt, b"Online", b"Offline"),
    )


# --------------------------------------------------------------------------- CLI


def client_kwargs(url: str) -> dict[str, Any]:
    """aiomqtt.Client arguments for ``mqtt://[user:pass@]host[:port]`` (``mqtts://`` for TLS)."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise ValueError(f"--mqtt-url {mask_url(url)!r}: use mqtt://host:port or mqtts://host:port")
    tls = parts.scheme in ("mqtts", "ssl")
    kwargs: dict[str, Any] = {
        "hostname": parts.hostname or "127.0.0.1",
        "port": parts.port or (8883 if tls else 1883),
        # random, not time-based: two simulators started together (as the e2e test does) got the
        # same millisecond id, and the broker then closed the first one's connection, as MQTT
        # requires of a second client with an id already connected
        "identifier": f"edge-infer-sim-{secrets.token_hex(4)}",  # 23 chars: every server allows
    }
    if parts.username:
        kwargs["username"] = unquote(parts.username)
        kwargs["password"] = unquote(parts.password) if parts.password else None
    if tls:
        import ssl

        kwargs["tls_context"] = ssl.create_default_context()
    return kwargs


def cli_simulate(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="edge-infer simulate",
        description="Publish a simulated home (real data in real device formats) to an MQTT broker.",
    )
    parser.add_argument(
        "--mqtt-url", default="mqtt://127.0.0.1:1883", help="broker URL (mqtt:// or mqtts://)"
    )
    parser.add_argument("--speed", type=float, default=1.0, help="simulated seconds per wall-clock second")
    parser.add_argument(
        "--imu-speed", type=float, default=None, help="speed of wearables (default min(speed, 2))"
    )
    parser.add_argument("--devices", type=int, default=2, help="devices of each family")
    parser.add_argument(
        "--duration", type=float, default=None, help="stop after S seconds (default: run until ^C)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--families", default=",".join(FAMILIES), help=f"comma-separated subset of {','.join(FAMILIES)}"
    )
    parser.add_argument("--outages", action="store_true", help="devices now and then go offline for a while")
    parser.add_argument(
        "--mains",
        choices=MAINS_FORMATS,
        default=None,
        help="add a mains meter (sum of the plugs plus a base load) as a Shelly Pro EM or a Tasmota meter",
    )
    parser.add_argument(
        "--fault",
        action="append",
        choices=FAULTS,
        default=[],
        help="add a device that goes wrong (repeatable; docs/devices.md#faults)",
    )
    parser.add_argument(
        "--fault-onset-h",
        type=float,
        default=4.0,
        help="simulated hours of normal behaviour before the faults start (default 4)",
    )
    parser.add_argument(
        "--list", action="store_true", help="print the simulated devices and their topics, then exit"
    )
    args = parser.parse_args(argv)
    try:
        config = SimConfig(
            speed=args.speed,
            devices=args.devices,
            seed=args.seed,
            families=tuple(f.strip() for f in args.families.split(",") if f.strip()),
            imu_speed=args.imu_speed,
            outages=args.outages,
            mains=args.mains,
            faults=tuple(args.fault),
            fault_onset_h=args.fault_onset_h,
        )
        sim = Simulator(config)
        if args.list:
            print(json.dumps(sim.device_list(), indent=2))
            return 0
        client_kwargs(args.mqtt_url)
    except ValueError as exc:
        print(f"edge-infer simulate: {exc}", file=sys.stderr)
        return 2
    shown = mask_url(args.mqtt_url)
    print(f"simulating {len(sim.devices)} devices at speed {args.speed} on {shown}", file=sys.stderr)
    try:
        counts = asyncio.run(sim.run(args.mqtt_url, args.duration))
    except KeyboardInterrupt:
        counts = sim.counts
    except Exception as exc:  # a broker that is not there, refused credentials
        text = str(exc).replace(args.mqtt_url, shown)
        print(f"edge-infer simulate: {type(exc).__name__}: {text}", file=sys.stderr)
        return 1
    for family, count in sorted(counts.items()):
        print(f"{family}: {count} messages")
    return 0
