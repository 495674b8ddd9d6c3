"""A real Home Assistant Core reads edge-infer's discovery from the test's Mosquitto.

Home Assistant lives in its own virtual environment (it pins its own dependencies and needs a
newer Python than edge-infer): create it with ``tests/ha/setup_ha_venv.sh`` and point
``EDGE_INFER_HA_VENV`` at it. Without that the test is skipped with the reason. The test boots
Home Assistant on a free loopback port, onboards a user and adds the MQTT integration through the
REST API, publishes discovery built by ``edge/discovery_payloads.py`` plus predictions, and reads back
through the REST API that every announced entity exists with the right device class, unit, state
and availability; then that a removed pipeline's entities disappear, and that Home Assistant's log
has no WARNING/ERROR line from its MQTT integration (rejected discovery payloads are logged there).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from edge.discovery_payloads import (
    AvailabilityTopic,
    BridgeInfo,
    DiscoveryMessage,
    DiscoveryTracker,
    OutputEntity,
    SourceDevice,
    bridge_info_payload,
    humanise,
)
from tests.broker import Mosquitto, free_port, wait_port
from tests.harness import ROOT, Collector, DaemonThread, Publisher, make_config
from tests.onnx_models import snapshot_classifier

HOME = ROOT / "examples" / "home.yaml"

ENV_VENV = "EDGE_INFER_HA_VENV"
BOOT_TIMEOUT_S = 240.0
T = TypeVar("T")

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.timeout(600)]


def _hass_binary() -> Path:
    venv = os.environ.get(ENV_VENV)
    if not venv:
        pytest.skip(
            f"needs a real Home Assistant: run tests/ha/setup_ha_venv.sh and set {ENV_VENV}=.cache/ha-venv "
            "(or use `make test-ha`)"
        )
    hass = Path(venv) / "bin" / "hass"
    if not hass.exists():
        pytest.skip(f"{ENV_VENV}={venv} has no bin/hass: run tests/ha/setup_ha_venv.sh {venv}")
    return hass


class HomeAssistant:
    """A Home Assistant Core process with its own config directory, driven over HTTP."""

    def __init__(self, hass: Path, config_dir: Path, extra_config: str = "") -> None:
        self.hass = hass
        self.config_dir = config_dir
        self.extra_config = extra_config  # more configuration.yaml (e.g. recorder:, history:)
        self.port = free_port()
        self.log_file = config_dir / "home-assistant.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.token: str | None = None

    def start(self) -> None:
        self.config_dir.mkdir(parents=True, exist_ok=True)
        (self.config_dir / "configuration.yaml").write_text(
            "homeassistant:\n"
            "  name: edge-infer test\n"
            "  latitude: 52.5\n"
            "  longitude: 13.4\n"
            "  elevation: 0\n"
            "  unit_system: metric\n"
            "  time_zone: UTC\n"
            "  currency: EUR\n"
            "  country: DE\n"
            "http:\n"
            "  server_host: 127.0.0.1\n"
            f"  server_port: {self.port}\n"
            "api:\n"
            "logger:\n"
            "  default: warning\n" + self.extra_config
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
        self.process = subprocess.Popen(
            [str(self.hass), "-c", str(self.config_dir), "--skip-pip", "--log-file", str(self.log_file)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        wait_port(self.port, timeout=BOOT_TIMEOUT_S)
        self._wait(lambda: self._get_json("/api/onboarding", auth=False), "onboarding API")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    # ------------------------------------------------------------------------------------- HTTP

    def _request(
        self, method: str, path: str, body: Any = None, *, auth: bool = True, form: bool = False
    ) -> Any:
        url = f"http://127.0.0.1:{self.port}{path}"
        headers: dict[str, str] = {}
        data: bytes | None = None
        if body is not None:
            if form:
                data = "&".join(f"{k}={v}" for k, v in body.items()).encode()
                headers["Content-Type"] = "application/x-www-form-urlencoded"
            else:
                data = json.dumps(body).encode()
                headers["Content-Type"] = "application/json"
        if auth and self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        with urllib.request.urlopen(request, timeout=30) as response:
            text = response.read().decode()
        return json.loads(text) if text else None

    def _get_json(self, path: str, *, auth: bool = True) -> Any:
        return self._request("GET", path, auth=auth)

    def _wait(
        self, probe: Callable[[], T | None], what: str | Callable[[], str], timeout: float = BOOT_TIMEOUT_S
    ) -> T:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                pytest.fail(
                    f"Home Assistant exited ({self.process.returncode}) waiting for {what}:\n{self.log()}"
                )
            try:
                result = probe()
                if result is not None and result is not False:
                    return result
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError) as exc:
                last = exc
            time.sleep(0.5)
        what = what() if callable(what) else what
        pytest.fail(f"timed out waiting for {what} ({last}):\n{self.log()[-5000:]}")

    def onboard(self) -> None:
        client_id = f"http://127.0.0.1:{self.port}/"
        created = self._request(
            "POST",
            "/api/onboarding/users",
            {
                "client_id": client_id,
                "name": "Test",
                "username": "test",
                "password": "test-pass-1234",
                "language": "en",
            },
            auth=False,
        )
        token = self._request(
            "POST",
            "/auth/token",
            {"grant_type": "authorization_code", "code": created["auth_code"], "client_id": client_id},
            auth=False,
            form=True,
        )
        self.token = token["access_token"]

    def add_mqtt(self, broker_port: int) -> None:
        flow = self._request("POST", "/api/config/config_entries/flow", {"handler": "mqtt"})
        if flow.get("type") == "menu":  # newer releases ask first how to set up the broker
            flow = self._request(
                "POST", f"/api/config/config_entries/flow/{flow['flow_id']}", {"next_step_id": "broker"}
            )
        result = self._request(
            "POST",
            f"/api/config/config_entries/flow/{flow['flow_id']}",
            {"broker": "127.0.0.1", "port": broker_port},
        )
        assert result["type"] == "create_entry", result

    def states(self) -> dict[str, dict[str, Any]]:
        return {s["entity_id"]: s for s in self._get_json("/api/states")}

    def mqtt_states(self) -> dict[str, dict[str, Any]]:
        ids = self._request(
            "POST", "/api/template", {"template": "{{ integration_entities('mqtt') | tojson }}"}
        )
        wanted = set(ids if isinstance(ids, list) else json.loads(ids))
        return {k: v for k, v in self.states().items() if k in wanted}

    def ws(self, *commands: dict[str, Any]) -> list[Any]:
        """WebSocket API commands (registry edits exist only there), through tests/ha/ws.py run by
        Home Assistant's own Python; the result of each, in order."""
        script = Path(__file__).parent / "ha" / "ws.py"
        url = f"ws://127.0.0.1:{self.port}/api/websocket"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
        done = subprocess.run(
            [str(self.hass.parent / "python"), str(script), url, self.token or ""],
            input=json.dumps(list(commands)).encode(),
            capture_output=True,
            timeout=120,
            env=env,
            check=False,
        )
        assert done.returncode == 0, done.stderr.decode(errors="replace")
        results = json.loads(done.stdout)
        for command, result in zip(commands, results, strict=True):
            assert result.get("success"), (command, result)
        return [r.get("result") for r in results]

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else "(no log)"


@pytest.fixture
def home_assistant(tmp_path: Path, mosquitto: Mosquitto) -> Iterator[HomeAssistant]:
    instance = HomeAssistant(_hass_binary(), tmp_path / "ha-config")
    try:
        instance.start()
        instance.onboard()
        instance.add_mqtt(mosquitto.port)
        yield instance
    finally:
        instance.stop()


def _publisher(mosquitto: Mosquitto) -> Any:
    mqtt = pytest.importorskip("paho.mqtt.client", reason="paho-mqtt (dev extra) publishes the test messages")
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"ha-real-{os.getpid()}")
    client.connect("127.0.0.1", mosquitto.port)
    client.loop_start()
    return client


def _publish(client: Any, topic: str, payload: str, retain: bool = False) -> None:
    client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(timeout=10)


def _publish_all(client: Any, messages: list[DiscoveryMessage]) -> None:
    for message in messages:
        _publish(client, message.topic, message.payload, retain=message.retain)


def test_home_assistant_accepts_the_discovery(
    home_assistant: HomeAssistant, mosquitto: Mosquitto, topic_prefix: str
) -> None:
    base = f"{topic_prefix}/edge-infer"
    bridge = BridgeInfo(version="0.1.0", base_topic=base, instance_id=topic_prefix)
    plug_availability = f"{topic_prefix}/z2m/kitchen_plug/availability"
    plug = SourceDevice(
        "kitchen_plug",
        name="Kitchen plug",
        model="BW-SHP13",
        manufacturer="BlitzWolf",
        availability=AvailabilityTopic(plug_availability, value_template="{{ value_json.state }}"),
    )
    appliance = OutputEntity(
        "appliance",
        "classification",
        f"{base}/appliance/kitchen_plug",
        labels=("fridge", "kettle", "off"),
        cadence_s=60,
    )
    forecast = OutputEntity(
        "power_forecast", "regression", f"{base}/power_forecast/kitchen_plug", unit="W", device_class="power"
    )
    anomaly = OutputEntity("anomaly", "anomaly", f"{base}/anomaly/kitchen_plug", threshold=0.8)
    outputs = [appliance, forecast, anomaly]

    tracker = DiscoveryTracker(bridge)
    client = _publisher(mosquitto)
    try:
        _publish(client, bridge.status_topic, "online", retain=True)
        _publish(client, plug_availability, json.dumps({"state": "online"}), retain=True)
        info = bridge_info_payload(
            version="0.1.0",
            uptime_s=42,
            messages_per_s=3.5,
            drops=1,
            latency_ms=0.75,
            started="2026-12-03T16:00:00.123Z",
        )
        _publish(client, bridge.info_topic, info, retain=True)
        _publish_all(client, tracker.plan([(plug, outputs)]))
        expected = {
            "Kitchen plug Appliance": (
                "kettle",
                {"device_class": "enum", "options": ["fridge", "kettle", "off"]},
            ),
            "Kitchen plug Appliance confidence": ("97.0", {"unit_of_measurement": "%"}),
            "Kitchen plug Power forecast": (
                "93.4",
                {"device_class": "power", "unit_of_measurement": "W", "state_class": "measurement"},
            ),
            "Kitchen plug Anomaly": ("on", {"device_class": "problem"}),
            "Kitchen plug Anomaly score": ("0.93", {"state_class": "measurement"}),
            f"{bridge.display_name} Version": ("0.1.0", {}),
            f"{bridge.display_name} Started": ("2026-12-03T16:00:00+00:00", {"device_class": "timestamp"}),
            f"{bridge.display_name} Messages per second": ("3.5", {"unit_of_measurement": "msg/s"}),
            f"{bridge.display_name} Dropped messages": ("1", {"state_class": "total_increasing"}),
            f"{bridge.display_name} Inference latency": (
                "0.75",
                {"device_class": "duration", "unit_of_measurement": "ms"},
            ),
        }

        def by_name() -> dict[str, dict[str, Any]]:
            return {s["attributes"].get("friendly_name"): s for s in home_assistant.mqtt_states().values()}

        def all_exist() -> bool | None:
            return set(expected) <= set(by_name()) or None

        # the entities first (Home Assistant subscribes to the state topics when it creates them),
        # then the predictions: what the daemon does after every (re-)announcement
        home_assistant._wait(all_exist, "every announced entity", timeout=60)
        prediction = {"confidence": 0.97, "model": "m", "model_version": "1", "latency_ms": 0.8, "ts": "now"}

        def publish_states() -> None:
            _publish(
                client,
                appliance.state_topic,
                json.dumps({**prediction, "label": "kettle", "value": None, "score": None}),
            )
            _publish(
                client,
                forecast.state_topic,
                json.dumps({**prediction, "label": None, "value": 93.4, "score": None}),
            )
            _publish(
                client,
                anomaly.state_topic,
                json.dumps({**prediction, "label": "anomaly", "value": None, "score": 0.93}),
            )

        publish_states()
        seen: dict[str, Any] = {"published": time.monotonic()}

        def all_there() -> dict[str, dict[str, Any]] | None:
            states = by_name()
            seen["last"] = {name: state["state"] for name, state in states.items()}
            ready = all(
                name in states and states[name]["state"] == want for name, (want, _) in expected.items()
            )
            if not ready and time.monotonic() - seen["published"] > 3:
                # States are not retained (the daemon's are not either): one sent before Home
                # Assistant had subscribed to the new entity's topic is gone. The daemon sends
                # them again at its heartbeat; so does the test.
                publish_states()
                seen["published"] = time.monotonic()
            return states if ready else None

        states = home_assistant._wait(
            all_there, lambda: f"every announced entity with its state; seen: {seen.get('last')}", timeout=60
        )
        assert len(states) == len(expected), sorted(states)
        for name, (_, attributes) in expected.items():
            for key, value in attributes.items():
                assert states[name]["attributes"].get(key) == value, (name, key, states[name]["attributes"])

        # availability: the source device going offline makes its entities unavailable, not the bridge's
        _publish(client, plug_availability, json.dumps({"state": "offline"}), retain=True)

        def plug_unavailable() -> dict[str, dict[str, Any]] | None:
            states = by_name()
            plug_states = [s["state"] for n, s in states.items() if n.startswith("Kitchen plug")]
            ok = plug_states and all(s == "unavailable" for s in plug_states)
            return states if ok and states[f"{bridge.display_name} Version"]["state"] == "0.1.0" else None

        home_assistant._wait(plug_unavailable, "the plug's entities to become unavailable", timeout=30)
        _publish(client, plug_availability, json.dumps({"state": "online"}), retain=True)
        _publish(client, bridge.status_topic, "offline", retain=True)

        def all_unavailable() -> bool | None:
            return all(s["state"] == "unavailable" for s in by_name().values()) or None

        home_assistant._wait(all_unavailable, "every entity unavailable with the daemon offline", timeout=30)
        _publish(client, bridge.status_topic, "online", retain=True)

        # a removed pipeline: its entities disappear, the others stay
        _publish_all(client, tracker.plan([(plug, [appliance, anomaly])]))

        def forecast_gone() -> dict[str, dict[str, Any]] | None:
            states = by_name()
            return (
                states
                if "Kitchen plug Power forecast" not in states and "Kitchen plug Appliance" in states
                else None
            )

        home_assistant._wait(forecast_gone, "the removed pipeline's entity to disappear", timeout=30)

        # a removed device: all its entities go, the bridge stays
        _publish_all(client, tracker.plan([]))

        def plug_gone() -> dict[str, dict[str, Any]] | None:
            states = by_name()
            return states if not any(n.startswith("Kitchen plug") for n in states) and states else None

        home_assistant._wait(plug_gone, "the removed device's entities to disappear", timeout=30)
    finally:
        _publish_all(client, tracker.clear_all())  # the discovery prefix is shared by the session
        client.loop_stop()
        client.disconnect()

    rejected = [
        line
        for line in home_assistant.log().splitlines()
        if (" WARNING " in line or " ERROR " in line)
        and any(source in line for source in ("components.mqtt", "components.sensor", "helpers.template"))
    ]
    assert not rejected, "\n".join(rejected)


# ----------------------------------------------------------------------- the daemon, simulate, real HA

SIM_SPEED = 1000.0  # a plug's 1460 x 10 s window (4 h) fills in ~15 s if the machine keeps up
SIM_FAMILIES = ("z2m_plug", "tasmota_plug", "wearable", "z2m_climate", "esphome_climate")
STATE_WITHIN_S = 5.0


def _home_config(url: str, prefix: str, **homeassistant: Any) -> dict[str, Any]:
    """examples/home.yaml as it is, on the test's broker, with this test's own base topic and
    bridge id (Home Assistant reads the shared ``homeassistant`` discovery prefix)."""
    data = yaml.safe_load(HOME.read_text())
    data["mqtt"] = {
        **data["mqtt"],
        "url": url,
        "base_topic": f"{prefix}/edge-infer",
        "client_id": f"ei-{prefix}",
    }
    data["homeassistant"] = {**data["homeassistant"], "instance_id": prefix, **homeassistant}
    return data


def _simulate(url: str, log: Path, devices: int = 2, seed: int = 5) -> subprocess.Popen[bytes]:
    argv = ["--mqtt-url", url, "--speed", str(SIM_SPEED), "--devices", str(devices), "--seed", str(seed)]
    argv += ["--families", ",".join(SIM_FAMILIES), "--imu-speed", "3"]
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "edge.cli", "simulate", *argv],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )


def _stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


CONTROLS = ("_correct", "_false_alarm", "_missed")  # the correction entities' unique-id suffixes


def _predictions_and_select(ours: list[dict[str, Any]]) -> bool:
    """The prediction and its confidence, and the "Correct ..." select (docs/corrections.md)."""
    predictions = [e for e in ours if not e["unique_id"].endswith(CONTROLS)]
    return len(predictions) == 2 and any(e["unique_id"].endswith("_correct") for e in ours)


class EntityClock:
    """Polls Home Assistant and notes, per entity, when it first exists and when it first has a
    state that came from a message (not ``unavailable``: every entity here has ``expire_after``,
    which keeps it unavailable until its first message)."""

    def __init__(self, ha: HomeAssistant, exclude_prefix: str) -> None:
        self.ha = ha
        self.exclude_prefix = exclude_prefix
        self.created: dict[str, float] = {}
        self.stated: dict[str, float] = {}
        self.states: dict[str, dict[str, Any]] = {}
        self.controls: dict[str, dict[str, Any]] = {}  # the correction selects and buttons

    def poll(self) -> None:
        now = time.monotonic()
        for entity_id, state in self.ha.mqtt_states().items():
            name = state["attributes"].get("friendly_name", "")
            if name.startswith(self.exclude_prefix):
                continue
            if entity_id.startswith(("select.", "button.")):  # commands, not predictions: no state
                self.controls[entity_id] = state
                continue
            self.states[entity_id] = state
            self.created.setdefault(entity_id, now)
            if state["state"] != "unavailable":
                self.stated.setdefault(entity_id, now)

    def late(self, within_s: float) -> dict[str, float | None]:
        """Entities without a state within ``within_s`` of appearing (None: no state at all)."""
        out: dict[str, float | None] = {}
        for entity_id, created in self.created.items():
            stated = self.stated.get(entity_id)
            if stated is None or stated - created > within_s:
                out[entity_id] = None if stated is None else round(stated - created, 2)
        return out


def test_every_prediction_entity_has_a_state_within_5_s_of_its_announcement(
    home_assistant: HomeAssistant, mosquitto: Mosquitto, topic_prefix: str, tmp_path: Path
) -> None:
    """The daemon serves `edge-infer simulate` at 1000x with examples/home.yaml: every prediction
    entity Home Assistant creates has its first state within 5 s (its first prediction is retained,
    so Home Assistant reads it when it subscribes on creating the entity)."""
    data = _home_config(mosquitto.url, topic_prefix)
    bridge_name = f"edge-infer {topic_prefix}"
    devices = 2
    expected_entities = 2 * devices * len(SIM_FAMILIES)  # main entity + confidence per device
    # plus "inputs unlike training" per device whose model has training_stats (activity: the
    # wearable; occupancy: the two climate families; not appliance: docs/drift.md)
    expected_entities += devices * 3
    clock = EntityClock(home_assistant, bridge_name)
    sim = _simulate(mosquitto.url, tmp_path / "simulate.log", devices=devices)
    try:
        with DaemonThread(make_config(data, HOME.parent)):

            def all_created() -> bool | None:
                clock.poll()
                return (len(clock.created) >= expected_entities and not clock.late(STATE_WITHIN_S)) or None

            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and not all_created():
                # an entity still waiting for its state counts as late only once 5 s have passed
                if len(clock.created) >= expected_entities and all(
                    time.monotonic() - clock.created[e] > STATE_WITHIN_S + 1
                    for e in clock.late(STATE_WITHIN_S)
                ):
                    break
                time.sleep(0.5)
            bridge_states = [
                s
                for s in home_assistant.mqtt_states().values()
                if s["attributes"].get("friendly_name", "").startswith(bridge_name)
            ]
    finally:
        _stop_process(sim)
        _clear_discovery(mosquitto.url, BridgeInfo(version="0", instance_id=topic_prefix).identifier)
    spans = sorted(clock.stated[e] - clock.created[e] for e in clock.stated if e in clock.created)
    print(
        f"entities {len(clock.created)}, with a state {len(clock.stated)}; "
        f"state after creation: max {max(spans, default=float('nan')):.2f} s"
    )
    assert len(clock.created) == expected_entities, sorted(clock.created)
    # a "Correct ..." select per device (corrections.enabled, the default; docs/corrections.md),
    # offering the model's labels and "none of these"
    selects = {e: st for e, st in clock.controls.items() if e.startswith("select.")}
    # occupancy is a binary output: "False alarm" and "Missed" buttons on its 2 x 2 climate devices
    buttons = {e for e in clock.controls if e.startswith("button.")}
    assert len(selects) == devices * len(SIM_FAMILIES), sorted(selects)
    assert len(buttons) == 2 * devices * 2 and all("occupancy" in e for e in buttons), sorted(buttons)
    assert all("none of these" in st["attributes"]["options"] for st in selects.values()), selects
    # the readable class names of the model card's labels, the raw label beside them
    appliances = [
        s for s in clock.states.values() if s["attributes"].get("options") and "appliance" in s["entity_id"]
    ]
    assert appliances and all(
        s["state"] in s["attributes"]["options"] for s in appliances if s["state"] != "unavailable"
    )
    assert "Fridge freezer" in appliances[0]["attributes"]["options"]
    # the clean simulated home: every "inputs unlike training" problem sensor is off
    inputs = {e: st["state"] for e, st in clock.states.items() if "_inputs" in e}
    print(f"inputs sensors: {inputs}")
    assert len(inputs) == devices * 3 and set(inputs.values()) == {"off"}, inputs
    for state in appliances:  # the readable name shown, the card's raw label kept as attribute
        assert state["state"] == humanise(state["attributes"]["label"]), state
    # the bridge's start time and, per model, version and holdout accuracy (models/*/card.md)
    bridge = {s["attributes"]["friendly_name"]: s["state"] for s in bridge_states}
    assert bridge[f"{bridge_name} Appliance model version"] == "1.0.0", bridge
    assert bridge[f"{bridge_name} Appliance holdout accuracy"] == "90.0", bridge
    assert bridge[f"{bridge_name} Started"].endswith("+00:00"), bridge
    # per zoo classifier, its quality from the report shipped beside it (edge/quality.py): the
    # confusion matrix images (counted apart from the bridge's sensors, as the selects and buttons
    # are from the predictions), the training set's size and when it was trained; not for the
    # open-set and anomaly models, whose reports hold none of these
    images = {s["entity_id"] for s in bridge_states if s["entity_id"].startswith("image.")}
    assert len(images) == 3, sorted(images)  # appliance, activity, occupancy
    for model, trained, examples in (
        ("Appliance", "2026-12-05T06:57:29+00:00", "100"),  # report re-written by --requantize
        ("Activity", "2026-12-03T13:52:48+00:00", "40"),
        ("Occupancy", "2026-12-03T13:46:35+00:00", "57560"),
    ):
        assert bridge[f"{bridge_name} {model} confusion matrix"] not in ("unknown", "unavailable"), bridge
        assert bridge[f"{bridge_name} {model} trained"] == trained, bridge
        assert bridge[f"{bridge_name} {model} training examples"] == examples, bridge
    assert not [n for n in bridge if "Appliance open set" in n and ("trained" in n or "matrix" in n)]
    assert not clock.late(STATE_WITHIN_S), (
        clock.late(STATE_WITHIN_S),
        {e: clock.states[e]["state"] for e in clock.late(STATE_WITHIN_S)},
    )


def _clear_discovery(url: str, bridge_identifier: str) -> None:
    """Remove every retained config of this test's bridge (the session's broker and discovery
    prefix are shared with the next test's Home Assistant)."""
    seen = Collector(url, "homeassistant/device/+/config")
    time.sleep(1.0)
    topics = {m.topic for m in seen.messages if m.payload and bridge_identifier in m.topic}
    seen.close()
    pub = Publisher(url)
    for topic in sorted(topics):
        pub.send(topic, "", retain=True)
    pub.close()


def _small_config(url: str, prefix: str, tmp_path: Path) -> dict[str, Any]:
    """One occupancy classification of Zigbee2MQTT-style rooms, announced to the real HA."""
    snapshot_classifier(tmp_path / "occ.onnx", ["temperature", "co2"], ["empty", "occupied"], name="occ")
    return {
        "mqtt": {"url": url, "base_topic": f"{prefix}/ei", "client_id": f"ei-{prefix}"},
        "models": {"occ": {"path": "occ.onnx"}},
        "pipelines": {
            "occupancy": {
                "model": "occ",
                "source": {"profile": "zigbee2mqtt", "options": {"base_topic": f"{prefix}/z2m"}},
                "output": {"publish": "on_change", "heartbeat_s": 600},
            },
        },
        "homeassistant": {"instance_id": prefix},
    }


def _wait_plans(runner: DaemonThread, count: int = 1, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if runner.daemon is not None and runner.daemon.discovery.plans >= count:
            return
        time.sleep(0.1)
    pytest.fail("the daemon's discovery did not plan")


def test_a_rename_and_an_area_set_in_home_assistant_survive_a_daemon_restart(
    home_assistant: HomeAssistant, mosquitto: Mosquitto, topic_prefix: str, tmp_path: Path
) -> None:
    """Rename the prediction entity and give its device an area through Home Assistant's API,
    restart the daemon with the same config: the broker records no empty config from the second
    run, and Home Assistant still has the name, the area and the entity with its state."""
    data = _small_config(mosquitto.url, topic_prefix, tmp_path)
    bridge_id = BridgeInfo(version="0", instance_id=topic_prefix).identifier
    reading = f"{topic_prefix}/z2m/hall_sensor"
    pub = Publisher(mosquitto.url)
    record = Collector(mosquitto.url, "homeassistant/device/+/config")
    try:
        with DaemonThread(make_config(data, tmp_path)):
            pub.send(reading, {"temperature": 21, "co2": 900})

            def entity() -> dict[str, Any] | None:
                entries = home_assistant.ws({"type": "config/entity_registry/list"})[0]
                mine = [e for e in entries if e["unique_id"].startswith(f"{bridge_id}_hall_sensor_occupancy")]
                main = [e for e in mine if not e["unique_id"].endswith(("_confidence", *CONTROLS))]
                return main[0] if main else None

            main = home_assistant._wait(entity, "the prediction entity in the entity registry", timeout=60)
            area = home_assistant.ws({"type": "config/area_registry/create", "name": f"Hall {topic_prefix}"})[
                0
            ]
            home_assistant.ws(
                {
                    "type": "config/entity_registry/update",
                    "entity_id": main["entity_id"],
                    "name": "Hall presence",
                },
                {
                    "type": "config/device_registry/update",
                    "device_id": main["device_id"],
                    "area_id": area["area_id"],
                },
            )
        mark = len(record.messages)
        runner = DaemonThread(make_config(data, tmp_path)).start()
        try:
            _wait_plans(runner)
            pub.send(reading, {"temperature": 22, "co2": 400})
            time.sleep(3.0)  # Home Assistant has handled whatever the second run sent
            second = [m for m in record.messages[mark:] if bridge_id in m.topic]
            # the retained configs are what the config still means: nothing to send, nothing removed
            assert not [m.topic for m in second if not m.payload], "the restart removed devices"
            after = entity()
            assert after is not None, "the entity was removed and not re-created"
            assert after["entity_id"] == main["entity_id"] and after["name"] == "Hall presence", after
            devices = home_assistant.ws({"type": "config/device_registry/list"})[0]
            device = next(d for d in devices if d["id"] == main["device_id"])
            assert device["area_id"] == area["area_id"], device
            state = home_assistant._wait(
                lambda: (
                    s
                    if (s := home_assistant.states()[main["entity_id"]])["state"] in ("Empty", "Occupied")
                    else None
                ),
                lambda: (
                    f"a readable state for {main['entity_id']}: {home_assistant.states()[main['entity_id']]}"
                ),
                timeout=30,
            )  # the card's labels, readable
            assert state["attributes"]["friendly_name"] == "Hall presence"
            assert state["attributes"]["label"] in ("empty", "occupied")  # the raw label, for automations
        finally:
            runner.stop()
    finally:
        record.close()
        pub.close()
        _clear_discovery(mosquitto.url, bridge_id)


def _mqtt_problems(ha: HomeAssistant) -> list[str]:
    """Rejected or deprecated discovery, except what Home Assistant blames on the simulated
    Zigbee2MQTT (2026.x warns about the ``object_id`` Zigbee2MQTT 2.1 still sends)."""
    return [
        line
        for line in ha.log().splitlines()
        if (" WARNING " in line or " ERROR " in line)
        and any(source in line for source in ("components.mqtt", "components.sensor", "helpers.template"))
        and "maintainer of Zigbee2MQTT" not in line
    ]


def test_a_zigbee2mqtt_device_and_its_prediction_are_one_home_assistant_device(
    home_assistant: HomeAssistant, mosquitto: Mosquitto, topic_prefix: str, tmp_path: Path
) -> None:
    """A simulated Zigbee2MQTT publishes its retained bridge/devices and its own discovery for a
    climate sensor (as Zigbee2MQTT 2.x does: one config per entity, ``zigbee2mqtt_<ieee>``
    identifiers, via its bridge); the daemon's prediction for that sensor ends on the same Home
    Assistant device, which holds both, and there is no second device of that name."""
    z2m = f"{topic_prefix}/z2m"
    ieee = "0x00158d0001a2b3c4"
    data = _small_config(mosquitto.url, topic_prefix, tmp_path)
    bridge_id = BridgeInfo(version="0", instance_id=topic_prefix).identifier
    z2m_device = {
        "identifiers": [f"zigbee2mqtt_{ieee}"],
        "manufacturer": "Aqara",
        "model": "Temperature and humidity sensor",
        "model_id": "WSDCGQ11LM",
        "name": "hall_sensor",
        "via_device": "zigbee2mqtt_bridge_0x00124b0012345678",
    }
    z2m_origin = {"name": "Zigbee2MQTT", "sw": "2.1.0", "url": "https://www.zigbee2mqtt.io"}
    z2m_configs = {
        f"homeassistant/sensor/{ieee}/{key}/config": {
            "availability": [{"topic": f"{z2m}/bridge/state", "value_template": "{{ value_json.state }}"}],
            "device": z2m_device,
            "device_class": key,
            "object_id": f"hall_sensor_{key}",
            "origin": z2m_origin,
            "state_class": "measurement",
            "state_topic": f"{z2m}/hall_sensor",
            "unique_id": f"{ieee}_{key}_zigbee2mqtt",
            "unit_of_measurement": unit,
            "value_template": "{{ value_json." + key + " }}",
        }
        for key, unit in (("temperature", "°C"), ("carbon_dioxide", "ppm"))
    }
    bridge_devices = [
        {"ieee_address": "0x00124b0012345678", "type": "Coordinator", "friendly_name": "Coordinator"},
        {
            "ieee_address": ieee,
            "type": "EndDevice",
            "friendly_name": "hall_sensor",
            "definition": {"model": "WSDCGQ11LM", "vendor": "Aqara"},
        },
    ]
    pub = Publisher(mosquitto.url)
    try:
        pub.send(f"{z2m}/bridge/state", {"state": "online"}, retain=True)
        pub.send(f"{z2m}/bridge/devices", bridge_devices, retain=True)
        for topic, config in z2m_configs.items():
            pub.send(topic, config, retain=True)
        with DaemonThread(make_config(data, tmp_path)):
            pub.send(f"{z2m}/hall_sensor", {"temperature": 21.5, "carbon_dioxide": 900, "co2": 900})

            def linked() -> tuple[list[Any], list[Any]] | None:
                entities = home_assistant.ws({"type": "config/entity_registry/list"})[0]
                ours = [e for e in entities if e["unique_id"].startswith(f"{bridge_id}_hall_sensor")]
                theirs = [e for e in entities if e["unique_id"].startswith(f"{ieee}_")]
                return (ours, theirs) if _predictions_and_select(ours) and len(theirs) == 2 else None

            ours, theirs = home_assistant._wait(linked, "both families' entities", timeout=60)
            device_ids = {e["device_id"] for e in ours + theirs}
            devices = home_assistant.ws({"type": "config/device_registry/list"})[0]
            named = [
                d for d in devices if d["name"] == "hall_sensor" or d.get("name_by_user") == "hall_sensor"
            ]
            print(
                f"devices named hall_sensor: {len(named)}; devices holding the 4 entities: {len(device_ids)}"
            )
            assert len(device_ids) == 1, (ours, theirs)
            assert len(named) == 1, named
            device = named[0]
            assert device["id"] in device_ids
            assert ["mqtt", f"zigbee2mqtt_{ieee}"] in device["identifiers"], device
            assert device["manufacturer"] == "Aqara" and device["model"] == "Temperature and humidity sensor"
            main = next(e for e in ours if not e["unique_id"].endswith(("_confidence", *CONTROLS)))

            # the registry lists the entity as soon as its config is handled; its state follows once
            # Home Assistant has read the retained availability and state on subscribing
            def shown() -> str | None:
                state = home_assistant.states().get(main["entity_id"], {}).get("state")
                return state if state in ("Empty", "Occupied") else None

            home_assistant._wait(shown, lambda: f"a state for {main['entity_id']}", timeout=30)
    finally:
        for topic in (*z2m_configs, f"{z2m}/bridge/devices", f"{z2m}/bridge/state"):
            pub.send(topic, "", retain=True)
        pub.close()
        _clear_discovery(mosquitto.url, bridge_id)
    assert not _mqtt_problems(home_assistant), "\n".join(_mqtt_problems(home_assistant))


def test_an_esphome_node_and_its_prediction_are_one_home_assistant_device(
    home_assistant: HomeAssistant, mosquitto: Mosquitto, topic_prefix: str, tmp_path: Path
) -> None:
    """An ESPHome node with the MQTT component: its own discovery (abbreviated keys, the MAC as
    identifier and connection) and its plain state topics; the daemon's prediction for the node
    lands on ESPHome's device."""
    node = f"esp{topic_prefix}"
    mac = "b4e62d0a1b2c"
    snapshot_classifier(tmp_path / "occ.onnx", ["temperature", "co2"], ["empty", "occupied"], name="occ")
    data = {
        "mqtt": {"url": mosquitto.url, "base_topic": f"{topic_prefix}/ei", "client_id": f"ei-{topic_prefix}"},
        "models": {"occ": {"path": "occ.onnx"}},
        "pipelines": {
            "occupancy": {"model": "occ", "source": {"profile": "esphome", "options": {"prefix": node}}}
        },
        "homeassistant": {"instance_id": topic_prefix},
    }
    bridge_id = BridgeInfo(version="0", instance_id=topic_prefix).identifier
    dev = {"ids": mac, "name": node, "sw": "esphome v2025.2.0 Feb 12 2025", "mdl": "esp32dev",
           "mf": "espressif", "cns": [["mac", mac]]}  # fmt: skip
    esp_configs = {
        f"homeassistant/sensor/{node}/{key}/config": {
            "dev_cla": device_class,
            "unit_of_meas": unit,
            "stat_cla": "measurement",
            "name": key.title(),
            "stat_t": f"{node}/sensor/{key}/state",
            "avty_t": f"{node}/status",
            "uniq_id": f"ESPsensor{key}{topic_prefix}",
            "dev": dev,
        }
        for key, device_class, unit in (
            ("temperature", "temperature", "°C"),
            ("co2", "carbon_dioxide", "ppm"),
        )
    }
    pub = Publisher(mosquitto.url)
    try:
        pub.send(f"{node}/status", "online", retain=True)
        for topic, config in esp_configs.items():
            pub.send(topic, config, retain=True)
        with DaemonThread(make_config(data, tmp_path)):
            pub.send(f"{node}/sensor/temperature/state", "21.5")
            pub.send(f"{node}/sensor/co2/state", "900")

            def linked() -> tuple[list[Any], list[Any]] | None:
                entities = home_assistant.ws({"type": "config/entity_registry/list"})[0]
                ours = [e for e in entities if e["unique_id"].startswith(f"{bridge_id}_{node}_")]
                theirs = [
                    e
                    for e in entities
                    if e["unique_id"].startswith("ESPsensor") and topic_prefix in e["unique_id"]
                ]
                seen["ours"], seen["theirs"] = (
                    [e["unique_id"] for e in ours],
                    [e["unique_id"] for e in theirs],
                )
                return (ours, theirs) if _predictions_and_select(ours) and len(theirs) == 2 else None

            seen: dict[str, Any] = {}
            ours, theirs = home_assistant._wait(
                linked, lambda: f"both families' entities, seen {seen}", timeout=60
            )
            device_ids = {e["device_id"] for e in ours + theirs}
            devices = home_assistant.ws({"type": "config/device_registry/list"})[0]
            named = [d for d in devices if d["name"] == node]
            print(f"devices named {node}: {len(named)}; devices holding the 4 entities: {len(device_ids)}")
            assert len(device_ids) == 1 and len(named) == 1, (named, ours, theirs)
            assert ["mac", "b4:e6:2d:0a:1b:2c"] in named[0]["connections"], named[0]
            assert named[0]["model"] == "esp32dev" and named[0]["manufacturer"] == "espressif"
    finally:
        for topic in (*esp_configs, f"{node}/status"):
            pub.send(topic, "", retain=True)
        pub.close()
        _clear_discovery(mosquitto.url, bridge_id)
    assert not _mqtt_problems(home_assistant), "\n".join(_mqtt_problems(home_assistant))


def test_setup_script_exists_and_is_executable() -> None:
    script = Path(__file__).parent / "ha" / "setup_ha_venv.sh"
    assert script.stat().st_mode & 0o111
    bash = shutil.which("bash")
    if bash is not None:
        subprocess.run([bash, "-n", str(script)], check=True)
