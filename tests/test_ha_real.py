"""A real Home Assistant Core reads edge-infer's discovery from the test's Mosquitto.

Home Assistant lives in its own virtual environment (it pins its own dependencies and needs a
newer Python than edge-infer): create it with ``tests/ha/setup_ha_venv.sh`` and point
``EDGE_INFER_HA_VENV`` at it. Without that the test is skipped with the reason. The test boots
Home Assistant on a free loopback port, onboards a user and adds the MQTT integration through the
REST API, publishes discovery built by ``edge/homeassistant.py`` plus predictions, and reads back
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
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from edge.homeassistant import (
    Availability,
    BridgeInfo,
    DiscoveryMessage,
    DiscoveryTracker,
    OutputEntity,
    SourceDevice,
    bridge_info_payload,
)
from tests.broker import Mosquitto, free_port, wait_port

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
        availability=Availability(plug_availability, value_template="{{ value_json.state }}"),
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
        info = bridge_info_payload(version="0.1.0", uptime_s=42, messages_per_s=3.5, drops=1, latency_ms=0.75)
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
            f"{bridge.display_name} Uptime": (
                "42",
                {"device_class": "duration", "unit_of_measurement": "s"},
            ),
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


def test_setup_script_exists_and_is_executable() -> None:
    script = Path(__file__).parent / "ha" / "setup_ha_venv.sh"
    assert script.stat().st_mode & 0o111
    bash = shutil.which("bash")
    if bash is not None:
        subprocess.run([bash, "-n", str(script)], check=True)
