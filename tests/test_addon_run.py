"""The add-on as the Supervisor runs it, as far as this machine allows without its base image.

The add-on's filesystem is assembled the way addon/Dockerfile does it: the same install step (a venv
at /opt/edge-infer, pip install of the wheel in the build context), the rootfs copied over. Then the
add-on's own s6 ``run`` script starts, through a stand-in for ``with-contenv bashio`` that provides
exactly the bashio functions the script uses, with /data/options.json and /config in a temporary
root. For the default options and each family profile the generated config passes edge-infer's
check, the daemon starts against a real Mosquitto and answers simulated or fixture devices.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

import edge
from tests.harness import Collector, Publisher

ROOT = Path(__file__).resolve().parent.parent
ADDON = ROOT / "addon"
RUN = "etc/s6-overlay/s6-rc.d/edge-infer/run"

pytestmark = [pytest.mark.slow, pytest.mark.install]

# The bashio functions the run script uses, reading what the Supervisor would give from STUB_*.
BASHIO = r"""
bashio::log.info() { echo "[INFO] $*" >&2; }
bashio::log.warning() { echo "[WARNING] $*" >&2; }
bashio::log.error() { echo "[ERROR] $*" >&2; }
bashio::exit.nok() { echo "[FATAL] $*" >&2; exit 1; }
bashio::services.available() { [[ "$1" == "mqtt" && -n "${STUB_MQTT_HOST:-}" ]]; }
bashio::services() {
    local key="STUB_MQTT_${2^^}"
    echo "${!key:-null}"
}
bashio::config() {
    python3 - "${EDGE_INFER_ADDON_DATA}/options.json" "$1" "${2:-}" <<'PY'
import json, sys
value = json.load(open(sys.argv[1])).get(sys.argv[2])
print(sys.argv[3] if value is None else value)
PY
}
"""
WITH_CONTENV = """#!/usr/bin/env bash
# stand-in for s6-overlay's /command/with-contenv: argv is (bashio, script)
shift
source "$STUB_BASHIO"
source "$1"
"""


def _dockerfile_wheel() -> str:
    text = (ADDON / "Dockerfile").read_text()
    version = re.search(r'ARG EDGE_INFER_VERSION="([^"]+)"', text).group(1)  # type: ignore[union-attr]
    spec = re.search(r'/opt/edge-infer/bin/pip install --no-cache-dir "(/tmp/wheels/[^"]+)"', text).group(1)  # type: ignore[union-attr]
    assert spec.startswith("/tmp/wheels/"), "the Dockerfile installs from its build context"
    name = spec.replace("/tmp/wheels/", "").replace("${EDGE_INFER_VERSION}", version)
    return re.sub(r"\[[a-z,]+\]$", "", name)


def _dockerfile_extras() -> str:
    """The extras the Dockerfile installs the wheel with (``[trainer]``)."""
    text = (ADDON / "Dockerfile").read_text()
    spec = re.search(r'/opt/edge-infer/bin/pip install --no-cache-dir "(/tmp/wheels/[^"]+)"', text).group(1)  # type: ignore[union-attr]
    extras = re.search(r"(\[[a-z,]+\])$", spec)
    return extras.group(1) if extras else ""


# The Dockerfile installs a CPU torch before the wheel (2.9.1 for the image's Python 3.13); this
# machine's Python takes the CPU build on local disk that the Makefile pins.
TORCH_HERE = "torch==2.13.0"


def test_versions_agree() -> None:
    config = yaml.safe_load((ADDON / "config.yaml").read_text())
    dockerfile = (ADDON / "Dockerfile").read_text()
    arg = re.search(r'ARG EDGE_INFER_VERSION="([^"]+)"', dockerfile).group(1)  # type: ignore[union-attr]
    assert config["version"] == arg == edge.__version__
    assert _dockerfile_wheel() == f"edge_infer-{edge.__version__}-py3-none-any.whl"
    assert [p.name for p in (ADDON / "wheels").iterdir()] == [_dockerfile_wheel()]


def test_the_wheel_in_the_build_context_is_this_tree(tmp_path: Path) -> None:
    """Stale wheel -> run `make addon` (and commit addon/wheels/)."""
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    fresh = zipfile.ZipFile(next(tmp_path.glob("*.whl")))
    shipped = zipfile.ZipFile(ADDON / "wheels" / _dockerfile_wheel())

    def contents(z: zipfile.ZipFile) -> dict[str, bytes]:
        return {n: z.read(n) for n in z.namelist() if not n.endswith(("/RECORD", "/WHEEL"))}

    a, b = contents(shipped), contents(fresh)
    changed = sorted(n for n in a.keys() | b.keys() if a.get(n) != b.get(n))
    assert not changed, (
        f"addon/wheels is stale ({len(changed)} files differ, e.g. {changed[:5]}): run `make addon`"
    )


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The add-on's filesystem: the Dockerfile's install step from its build context, then rootfs."""
    root = tmp_path_factory.mktemp("addon-root")
    context = root / "build-context"
    shutil.copytree(ADDON, context)
    venv = root / "opt" / "edge-infer"
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=clean, timeout=120)
    if "[trainer]" in _dockerfile_extras():
        subprocess.run(
            [str(venv / "bin" / "pip"), "install", "-q", "--no-cache-dir", TORCH_HERE],
            check=True,
            env=clean,
            cwd=root,
            timeout=900,
        )
    subprocess.run(
        [
            str(venv / "bin" / "pip"),
            "install",
            "-q",
            "--no-cache-dir",
            str(context / "wheels" / _dockerfile_wheel()) + _dockerfile_extras(),
        ],
        check=True,
        env=clean,
        cwd=root,
        timeout=600,
    )
    subprocess.run([str(venv / "bin" / "edge-infer"), "--version"], check=True, env=clean, timeout=60)
    shutil.copytree(context / "rootfs", root, dirs_exist_ok=True)
    (root / "command").mkdir()
    (root / "command" / "with-contenv").write_text(WITH_CONTENV)
    (root / "command" / "with-contenv").chmod(0o755)
    (root / "bashio.sh").write_text(BASHIO)
    return root


class Addon:
    def __init__(self, image: Path, tmp: Path, broker_port: int, options: dict[str, Any]) -> None:
        self.data = tmp / "data"
        self.config_dir = tmp / "config"
        self.data.mkdir()
        self.config_dir.mkdir(exist_ok=True)  # a test may put the user's files there first
        (self.data / "options.json").write_text(json.dumps(options))
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "EDGE_INFER_MQTT_URL")}
        env.update(
            PATH=f"{image / 'opt' / 'edge-infer' / 'bin'}:{os.environ['PATH']}",  # the image's ENV PATH
            PYTHONUNBUFFERED="1",
            EDGE_INFER_ADDON_DATA=str(self.data),
            EDGE_INFER_ADDON_CONFIG=str(self.config_dir),
            EDGE_INFER_ADDON_ROOTFS=str(image),
            STATE_DIRECTORY=str(self.data),
            STUB_BASHIO=str(image / "bashio.sh"),
            STUB_MQTT_HOST="127.0.0.1",
            STUB_MQTT_PORT=str(broker_port),
            STUB_MQTT_USERNAME="addons",
            STUB_MQTT_PASSWORD="s3cret",
            STUB_MQTT_SSL="false",
        )
        # exactly what the kernel runs for '#!/command/with-contenv bashio'
        self.proc = subprocess.Popen(
            [str(image / "command" / "with-contenv"), "bashio", str(image / RUN)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
        out, _ = self.proc.communicate(timeout=30)
        return out


def _simulate(url: str, families: str, seconds: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edge.cli",
            "simulate",
            "--mqtt-url",
            url,
            "--families",
            families,
            "--devices",
            "1",
            "--speed",
            "600",
            "--duration",
            str(seconds),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def _shelly(pub: Publisher) -> None:
    for i in range(1500):
        payload = {"id": 0, "source": "timer", "output": True, "apower": 60.0 + (i % 7), "voltage": 230.0}
        pub.send("shellyplug-s-0001/status/switch:0", payload, qos=0)


def _statestream(pub: Publisher) -> None:
    for i in range(14):
        for entity, value in (
            ("temperature", 21 + i * 0.01),
            ("humidity", 45.0),
            ("illuminance", 300.0),
            ("co2", 600 + i),
        ):
            pub.send(f"statestream/sensor/office_{entity}/state", json.dumps(str(value)), qos=1)


OCCUPANCY = {
    "model": "zoo:occupancy",
    "inputs": "temperature=temperature,humidity=humidity,illuminance=illuminance,co2=co2",
}
APPLIANCE = {
    "model": "zoo:appliance",
    "inputs": "power=power",
    "window_hop": 6,
    "resample_period_s": 10,
    "max_gap_s": 120,
}
CASES: dict[str, tuple[dict[str, Any] | None, str]] = {
    # name: (pipeline options, or None for the add-on's defaults; what feeds it)
    "default": (None, "sim:z2m_plug"),
    "tasmota": ({"name": "plugs", "profile": "tasmota", "prefix": "tele", **APPLIANCE}, "sim:tasmota_plug"),
    "zigbee2mqtt-climate": (
        {"name": "rooms", "profile": "zigbee2mqtt", "resample_period_s": 60, "max_gap_s": 600, **OCCUPANCY},
        "sim:z2m_climate",
    ),
    "esphome": (
        {"name": "rooms", "profile": "esphome", "max_gap_s": 600, **OCCUPANCY},
        "sim:esphome_climate",
    ),
    "json": (
        {
            "name": "activity",
            "model": "zoo:activity",
            "profile": "json",
            "topics": "wearables/{device}/imu",
            "timestamp_field": "ts",
            "availability_topic": "wearables/{device}/status",
            "inputs": "acc_x=accel.x,acc_y=accel.y,acc_z=accel.z,gyro_x=gyro.x,gyro_y=gyro.y,gyro_z=gyro.z",
            "window_hop": 10,
            "max_gap_s": 2,
        },
        "sim:wearable",
    ),
    "shelly": (
        {
            "name": "plugs",
            "profile": "shelly",
            "model": "zoo:appliance",
            "inputs": "power=power",
            "window_hop": 50,
        },
        "shelly",
    ),
    "statestream": (
        {
            "name": "office",
            "profile": "statestream",
            # mqtt_statestream's base_topic; not the discovery prefix, whose topics the daemon
            # does not take as sensor input
            "prefix": "statestream",
            "model": "zoo:occupancy",
            "inputs": "temperature=sensor.office_temperature,humidity=sensor.office_humidity,"
            "illuminance=sensor.office_illuminance,co2=sensor.office_co2",
        },
        "statestream",
    ),
}


def _options(pipeline: dict[str, Any] | None) -> dict[str, Any]:
    defaults = yaml.safe_load((ADDON / "config.yaml").read_text())["options"]
    options = dict(defaults)
    if pipeline is not None:
        options["pipelines"] = [pipeline]
    return options


@pytest.mark.broker
@pytest.mark.parametrize("case", list(CASES))
def test_the_run_script_serves_predictions(case: str, image: Path, tmp_path: Path, fresh_broker: Any) -> None:
    fresh_broker.start()  # a broker of its own: nothing retained from another case
    pipeline, feed = CASES[case]
    options = _options(pipeline)
    name = options["pipelines"][0]["name"]
    collector = Collector(fresh_broker.url, f"edge-infer/{name}/#", "edge-infer/status")
    addon = Addon(image, tmp_path, fresh_broker.port, options)
    feeder: subprocess.Popen[str] | None = None
    try:
        collector.wait(
            lambda ms: any(m.topic == "edge-infer/status" and m.payload == b"online" for m in ms), 90
        )
        generated = json.loads((addon.data / "edge-infer.yaml").read_text())
        assert generated["mqtt"]["password_env"] == "EDGE_INFER_MQTT_PASSWORD"
        assert "s3cret" not in (addon.data / "edge-infer.yaml").read_text()
        if feed.startswith("sim:"):
            feeder = _simulate(fresh_broker.url, feed[4:], 150)
        else:
            pub = Publisher(fresh_broker.url)
            try:
                (_shelly if feed == "shelly" else _statestream)(pub)
            finally:
                pub.close()

        def answered(ms: list[Any]) -> bool:
            return any(
                m.topic.count("/") == 2
                and m.topic.startswith(f"edge-infer/{name}/")
                and b'"label"' in m.payload
                for m in ms
            )

        got = collector.wait(answered, timeout=150)
        answer = next(
            m
            for m in got
            if m.topic.count("/") == 2
            and b'"label"' in m.payload
            and m.topic.startswith(f"edge-infer/{name}/")
        )
        assert answer.json()["label"] is None or isinstance(answer.json()["label"], str)
        assert addon.proc.poll() is None
    finally:
        if feeder is not None:
            feeder.terminate()
            feeder.communicate(timeout=30)
        out = addon.stop()
        collector.close()
    assert "Starting edge-infer" in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]


@pytest.mark.broker
def test_retrain_now_trains_inside_the_addon(image: Path, tmp_path: Path, fresh_broker: Any) -> None:
    """The add-on with a user's config file (config_file) whose pipeline has a learn: section: the
    Retrain command (what Home Assistant's "Retrain now" button sends) runs `edge-infer learn` in
    the add-on's own venv (the trainer extra the Dockerfile installs, no checkout on the path), and
    the new model is promoted where the running add-on loads it."""
    from edge.manifest import read_manifest
    from tests.test_retrain import _setup

    broker = fresh_broker.start()
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    _, data = _setup(config_dir, "addon", broker.url)
    for name in ("small", "plain"):
        del data["pipelines"][name]
    data["models"]["occupancy"]["path"] = "occupancy.onnx"  # relative to the user's file's folder
    (config_dir / "edge-infer.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    before = read_manifest(config_dir / "occupancy.onnx")
    options = {**_options(None), "config_file": "edge-infer.yaml"}
    collector = Collector(broker.url, "edge-infer/rooms/retrain/state", "edge-infer/status")
    addon = Addon(image, tmp_path, broker.port, options)
    try:
        collector.wait(
            lambda ms: any(m.topic == "edge-infer/status" and m.payload == b"online" for m in ms), 90
        )
        generated = json.loads((addon.data / "edge-infer.yaml").read_text())
        assert generated["pipelines"]["rooms"]["learn"]["source"]["record"] == str(config_dir / "rows.csv")
        collector.wait(lambda ms: any(m.topic.endswith("/retrain/state") and m.payload for m in ms), 30)
        pub = Publisher(broker.url)
        try:
            pub.send("edge-infer/rooms/retrain/press", "PRESS", qos=1)
        finally:
            pub.close()

        def finished(ms: list[Any]) -> bool:
            return any(
                m.topic.endswith("/retrain/state")
                and m.payload
                and m.json().get("phase") in ("promoted", "kept", "failed")
                for m in ms
            )

        got = collector.wait(finished, timeout=400)
        final = next(
            m.json()
            for m in reversed(got)
            if m.topic.endswith("/retrain/state")
            and m.payload
            and m.json().get("phase") in ("promoted", "kept", "failed")
        )
        phases = [m.json().get("phase") for m in got if m.topic.endswith("/retrain/state") and m.payload]
        assert final["phase"] == "promoted", final
        assert "training" in phases, phases
        after = read_manifest(config_dir / "occupancy.onnx")
        assert after is not None and before is not None and "+learn." in after.version, after
        assert (config_dir / "occupancy.onnx.previous").is_file()
        assert addon.proc.poll() is None
    finally:
        out = addon.stop()
        collector.close()
    assert "Traceback" not in out, out[-3000:]


@pytest.mark.parametrize(
    ("change", "option"),
    [
        ({"window_size": 512}, "pipelines[0].window_size"),
        ({"model": "zoo:nope"}, "pipelines[0].model"),
        ({"inputs": "power"}, "pipelines[0].inputs"),
        (
            {"features": "snapshot", "window_hop": None, "resample_period_s": None, "max_gap_s": None},
            "pipelines[0].features",
        ),
        ({"profile": "json", "prefix": "x"}, "pipelines[0].prefix"),
    ],
)
def test_invalid_options_stop_the_addon_naming_the_option(
    change: dict[str, Any], option: str, image: Path, tmp_path: Path
) -> None:
    options = _options(None)
    pipe = {**options["pipelines"][0], **change}
    options["pipelines"] = [{k: v for k, v in pipe.items() if v is not None}]
    addon = Addon(image, tmp_path, 1, options)
    out = addon.proc.communicate(timeout=120)[0]
    assert addon.proc.returncode != 0, out
    assert f"option {option}:" in out, out
    assert "[FATAL]" in out
    assert "Traceback" not in out


def test_no_broker_stops_the_addon(image: Path, tmp_path: Path) -> None:
    (tmp_path / "options.json").write_text(json.dumps(_options(None)))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "STUB_MQTT_HOST")}
    env.update(STUB_BASHIO=str(image / "bashio.sh"), EDGE_INFER_ADDON_DATA=str(tmp_path))
    proc = subprocess.run(
        [str(image / "command" / "with-contenv"), "bashio", str(image / RUN)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "No MQTT broker found" in proc.stderr
