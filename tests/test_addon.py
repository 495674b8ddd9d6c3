"""The Home Assistant add-on in addon/: config against the add-on linter's schema, files, start script."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

import edge
from edge.config import Zigbee2MqttOptions, Zigbee2MqttSource, parse_config

ROOT = Path(__file__).resolve().parent.parent
ADDON = ROOT / "addon"
SCHEMA = ROOT / "tests" / "data" / "addon_linter" / "config.schema.json"
SERVICE = ADDON / "rootfs" / "etc" / "s6-overlay" / "s6-rc.d" / "edge-infer"
CONFIG_WRITER = ADDON / "rootfs" / "usr" / "lib" / "edge-infer" / "addon_config.py"

# Option types the Supervisor understands (developers.home-assistant.io, add-on configuration).
_OPTION_TYPE = re.compile(
    r"^(str(\(\d*,\d*\))?|bool|int(\(-?\d*,-?\d*\))?|float(\([\d.-]*,[\d.-]*\))?|email|url|password|port"
    r"|match\(.+\)|list\([^|()]+(\|[^|()]+)*\)|device(\(.+\))?)\??$"
)


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    data = yaml.safe_load((ADDON / "config.yaml").read_text())
    assert isinstance(data, dict)
    return data


def test_config_validates_against_the_linter_schema(config: dict[str, Any]) -> None:
    jsonschema = pytest.importorskip("jsonschema", reason="pip install jsonschema (dev extra)")
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(config), key=str)
    assert not errors, "\n".join(e.message for e in errors)


def test_config_sets_no_key_to_its_default(config: dict[str, Any]) -> None:
    """The linter's own extra rule: a key set to its schema default should be removed."""
    schema = json.loads(SCHEMA.read_text())
    for key, value in config.items():
        prop = schema["properties"].get(key, {})
        assert "default" not in prop or value != prop["default"], f"{key!r} uses its default value"


def test_config_essentials(config: dict[str, Any]) -> None:
    assert config["version"] == edge.__version__
    assert set(config["arch"]) == {"aarch64", "amd64"}
    assert config["services"] == ["mqtt:need"]
    assert re.fullmatch(r"[a-z0-9_]+", config["slug"])
    assert config["init"] is False  # s6-overlay v3 base images bring their own init
    assert {m["type"] for m in config["map"]} >= {"addon_config"}  # the user's own models
    assert "image" not in config  # built locally by the Supervisor from the Dockerfile
    for key in ("webui", "watchdog", "auto_uart", "full_access", "host_network"):
        assert key not in config


def test_options_and_schema_agree(config: dict[str, Any]) -> None:
    options, schema = config["options"], config["schema"]
    assert set(options) <= set(schema)
    required = {k for k, v in schema.items() if isinstance(v, str) and not v.endswith("?")}
    assert required <= set(options), "a required scalar option needs a default"

    def check(node: Any, where: str) -> None:
        if isinstance(node, str):
            assert _OPTION_TYPE.fullmatch(node), f"{where}: {node!r} is not an add-on option type"
        elif isinstance(node, list):
            assert len(node) == 1, f"{where}: a list schema has one item"
            check(node[0], f"{where}[]")
        elif isinstance(node, dict):
            for key, value in node.items():
                check(value, f"{where}.{key}")
        else:
            pytest.fail(f"{where}: unexpected {node!r}")

    check(schema, "schema")
    assert isinstance(schema["models"], list)
    assert isinstance(schema["pipelines"], list)


def test_regex_options_accept_their_defaults(config: dict[str, Any]) -> None:
    for key in ("base_topic", "discovery_prefix"):
        pattern = re.fullmatch(r"match\((.+)\)", config["schema"][key])
        assert pattern is not None
        assert re.fullmatch(pattern.group(1), config["options"][key])
        assert not re.fullmatch(pattern.group(1), "bad/#")


def test_translations_cover_the_schema(config: dict[str, Any]) -> None:
    translations = yaml.safe_load((ADDON / "translations" / "en.yaml").read_text())
    names = translations["configuration"]
    assert set(names) == set(config["schema"])
    for key, node in config["schema"].items():
        assert names[key]["name"]
        assert names[key]["description"]
        if isinstance(node, list) and isinstance(node[0], dict):
            assert set(names[key]["fields"]) == set(node[0])


def test_repository_yaml() -> None:
    data = yaml.safe_load((ROOT / "repository.yaml").read_text())
    assert data["name"]


def test_docs_changelog_and_apparmor(config: dict[str, Any]) -> None:
    assert (ADDON / "DOCS.md").read_text().startswith("# edge-infer")
    assert f"## {config['version']}" in (ADDON / "CHANGELOG.md").read_text()
    apparmor = (ADDON / "apparmor.txt").read_text()
    assert re.search(r"^profile \S+ flags=\(attach_disconnected,mediate_deleted\) \{$", apparmor, re.M)
    assert "/data/** rw," in apparmor
    assert "/config/** r," in apparmor  # the user's models: read only


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_icon_and_logo() -> None:
    assert _png_size(ADDON / "icon.png") == (128, 128)  # square icon
    width, height = _png_size(ADDON / "logo.png")
    assert width > height  # landscape logo (250x100 recommended)


def test_dockerfile_follows_current_base_image_conventions() -> None:
    dockerfile = (ADDON / "Dockerfile").read_text()
    from_lines = [line for line in dockerfile.splitlines() if line.startswith("FROM ")]
    assert from_lines == ["FROM ghcr.io/home-assistant/base-debian:trixie"]  # multi-platform, glibc
    instructions = [line for line in dockerfile.splitlines() if line and not line.startswith("#")]
    assert not any("BUILD_FROM" in line for line in instructions)
    assert not (ADDON / "build.yaml").exists()
    assert not (ADDON / "build.json").exists()
    assert 'io.hass.type="addon"' in dockerfile
    assert "COPY rootfs /" in dockerfile
    assert re.search(r'ARG EDGE_INFER_VERSION="([^"]+)"', dockerfile).group(1) == edge.__version__  # type: ignore[union-attr]


def test_dockerfile_installs_a_cpu_torch_then_the_trainer_extra() -> None:
    """Retrain runs `learn` in the add-on: the image carries the trainer extra, with a CPU torch
    installed first on both arches (PyPI's amd64 torch pulls CUDA)."""
    dockerfile = (ADDON / "Dockerfile").read_text()
    version = re.search(r'ARG TORCH_VERSION="([^"]+)"', dockerfile).group(1)  # type: ignore[union-attr]
    assert re.fullmatch(r"\d+\.\d+\.\d+", version)
    cpu = '--index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}+cpu"'
    assert cpu in dockerfile
    assert '"torch==${TORCH_VERSION}"' in dockerfile  # aarch64: PyPI's wheel is a CPU build
    torch_at = dockerfile.index(cpu)
    wheel_at = dockerfile.index('py3-none-any.whl[trainer]"')
    assert torch_at < wheel_at
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {re.split(r"[<>=!~; \[]", req, maxsplit=1)[0] for req in extras["trainer"]}
    assert {"torch", "onnx", "onnxscript", "pandas", "websockets"} <= names
    assert not names & {"matplotlib", "aeon", "pyarrow"}  # the heavy parts learn does not need


def test_s6_service_start_script() -> None:
    run = SERVICE / "run"
    text = run.read_text()
    assert text.startswith("#!/command/with-contenv bashio\n")
    assert run.stat().st_mode & 0o111, "run must be executable"
    assert (SERVICE / "finish").stat().st_mode & 0o111
    assert (SERVICE / "type").read_text().strip() == "longrun"
    assert (SERVICE / "dependencies.d" / "base").exists()
    assert (SERVICE.parent / "user" / "contents.d" / "edge-infer").exists()
    assert 'bashio::services mqtt "host"' in text
    assert 'bashio::services mqtt "password"' in text
    assert "${EDGE_INFER_ADDON_DATA:-/data}" in text and "options.json" in text
    assert 'exec edge-infer run -c "${CONFIG}"' in text


@pytest.mark.parametrize("script", ["run", "finish"])
def test_scripts_parse_with_bash(script: str) -> None:
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash not installed")
    subprocess.run([bash, "-n", str(SERVICE / script)], check=True)
    shellcheck = shutil.which("shellcheck")
    if shellcheck is not None:
        subprocess.run([shellcheck, "--shell=bash", "-e", "SC1008,SC2155", str(SERVICE / script)], check=True)


def test_run_script_stays_in_sync_with_the_git_index() -> None:
    """The executable bits must be committed, not just set in this checkout."""
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(
        [git, "ls-files", "-s", "addon/rootfs/etc/s6-overlay/s6-rc.d/edge-infer"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    modes = {line.split("\t")[1].rsplit("/", 1)[1]: line.split()[0] for line in out.splitlines()}
    if not modes:
        pytest.skip("add-on files not committed yet")
    assert modes["run"] == "100755"
    assert modes["finish"] == "100755"


# ------------------------------------------------------------------ the config the start script writes


@pytest.fixture(scope="module")
def writer() -> ModuleType:
    spec = importlib.util.spec_from_file_location("addon_config", CONFIG_WRITER)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["addon_config"] = module
    spec.loader.exec_module(module)
    return module


MQTT_ENV = {
    "EDGE_INFER_MQTT_HOST": "core-mosquitto",
    "EDGE_INFER_MQTT_PORT": "1883",
    "EDGE_INFER_MQTT_USERNAME": "addons",
    "EDGE_INFER_MQTT_PASSWORD": "s3cret",
    "EDGE_INFER_MQTT_SSL": "false",
}
OPTIONS = {
    "log_level": "info",
    "base_topic": "edge-infer",
    "discovery": True,
    "discovery_prefix": "homeassistant",
    "models": [{"name": "appliance", "file": "models/appliance.onnx"}],
    "pipelines": [
        {
            "name": "appliance",
            "model": "appliance",
            "profile": "zigbee2mqtt",
            "prefix": "z2m",
            "availability_topic": "z2m/{device}/availability",
            "inputs": "power=power",
            "devices": "kitchen_plug, washer",
            "window_hop": 6,
            "resample_period_s": 10,
            "max_gap_s": 120,
            "publish": "on_change",
            "heartbeat_s": 60,
            "min_confidence": 0.6,
            "entity_name": "Appliance",
        }
    ],
}


def test_written_config_is_a_valid_edge_infer_config(
    writer: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    options = tmp_path / "options.json"
    options.write_text(json.dumps(OPTIONS))
    out = tmp_path / "edge-infer.yaml"
    for key, value in MQTT_ENV.items():
        monkeypatch.setenv(key, value)
    # --no-validate: /config/models/appliance.onnx is not here (tests/test_addon_run.py validates)
    args = ["--options", str(options), "--config-dir", "/config", "--out", str(out), "--no-validate"]
    assert writer.main(args) == 0
    text = out.read_text()
    assert "s3cret" not in text  # the password stays in the environment
    data = yaml.safe_load(text)
    assert data["mqtt"] == {
        "url": "mqtt://core-mosquitto:1883",
        "username": "addons",
        "password_env": "EDGE_INFER_MQTT_PASSWORD",
        "base_topic": "edge-infer",
    }
    assert data["models"] == {"appliance": {"path": "/config/models/appliance.onnx"}}
    config = parse_config(data, str(out))
    assert config.mqtt.resolved_password() == "s3cret"
    pipeline = config.pipelines["appliance"]
    assert isinstance(pipeline.source, Zigbee2MqttSource)
    assert pipeline.source.options == Zigbee2MqttOptions(base_topic="z2m")
    # availability_topic is a json-profile setting: Zigbee2MQTT's own availability topic is used,
    # and the option is left out with a warning naming it (edge-infer would refuse the key)
    assert data["pipelines"]["appliance"]["source"] == {
        "profile": "zigbee2mqtt",
        "options": {"base_topic": "z2m"},
    }
    err = capsys.readouterr().err
    assert "warning: option pipelines[0].availability_topic: ignored" in err, err
    assert "zigbee2mqtt profile" in err, err
    assert pipeline.inputs == {"power": "power"}
    assert pipeline.devices == ["kitchen_plug", "washer"]
    assert pipeline.features.type == "window"
    assert (pipeline.features.hop, pipeline.features.resample_period_s, pipeline.features.max_gap_s) == (
        6,
        10,
        120,
    )
    assert pipeline.output.publish == "on_change"
    assert pipeline.output.heartbeat_s == 60
    assert pipeline.homeassistant.name == "Appliance"
    assert config.homeassistant.enabled is True
    assert config.homeassistant.discovery_prefix == "homeassistant"


def test_written_config_names_bundled_models(writer: ModuleType) -> None:
    pipe = {"name": "p", "model": "zoo:appliance", "profile": "tasmota", "inputs": "power=power"}
    data = writer.build_config({**OPTIONS, "models": [], "pipelines": [pipe]}, MQTT_ENV, Path("/config"))
    assert data["models"] == {"appliance": {"path": "zoo:appliance"}}
    # the model's manifest says window: the features default to it
    assert data["pipelines"]["p"]["features"] == {"type": "window"}
    parse_config(data)


def test_written_config_tls_and_anonymous_broker(writer: ModuleType) -> None:
    env = {
        "EDGE_INFER_MQTT_HOST": "broker.lan",
        "EDGE_INFER_MQTT_PORT": "8883",
        "EDGE_INFER_MQTT_SSL": "true",
    }
    data = writer.build_config({**OPTIONS, "discovery": False}, env, Path("/config"))
    assert data["mqtt"]["url"] == "mqtts://broker.lan:8883"
    assert "username" not in data["mqtt"]
    assert "password_env" not in data["mqtt"]
    assert data["homeassistant"]["enabled"] is False
    parse_config(data)


def test_written_config_from_a_user_config_file(writer: ModuleType, tmp_path: Path) -> None:
    user = {
        "mqtt": {"url": "mqtt://elsewhere:1883", "password": "old", "keepalive": 20},
        "models": {"m": {"path": "m.onnx"}},
        "pipelines": {"p": {"model": "m", "source": {"topics": ["x/{device}"]}}},
    }
    (tmp_path / "edge-infer.yaml").write_text(yaml.safe_dump(user))
    data = writer.build_config({**OPTIONS, "config_file": "edge-infer.yaml"}, MQTT_ENV, tmp_path)
    assert data["mqtt"]["url"] == "mqtt://core-mosquitto:1883"  # the Supervisor's broker wins
    assert data["mqtt"]["keepalive"] == 20  # the user's other settings stay
    assert "password" not in data["mqtt"]
    assert data["models"]["m"]["path"] == str(tmp_path / "m.onnx")
    assert set(data["pipelines"]) == {"p"}
    parse_config(data)


def test_learn_paths_of_a_user_config_file_resolve_against_its_folder(
    writer: ModuleType, tmp_path: Path
) -> None:
    """The daemon runs with the generated config in /data and its Retrain hands that file to
    `edge-infer learn`: the learn section's relative paths are made absolute against the user's
    file's folder, absolute ones and the rest are left as they are."""
    learn = {
        "source": {"record": "rows.csv"},
        "work_dir": "learn/p",
        "train": {"epochs": 4},
    }
    ha_learn = {
        "source": {"ha": {"url": "http://supervisor/core", "token_file": "token"}},
        "inputs": {"plug": {"power": "sensor.plug_power"}},
        "labels": {"teacher": {"entity": "sensor.plug_power", "above": 5}},
        "work_dir": "/share/learn",
    }
    user = {
        "models": {"m": {"path": "m.onnx"}},
        "pipelines": {
            "p": {"model": "m", "source": {"topics": ["x/{device}"]}, "learn": learn},
            "q": {"model": "m", "source": {"topics": ["y/{device}"]}, "learn": ha_learn},
        },
    }
    (tmp_path / "edge-infer.yaml").write_text(yaml.safe_dump(user))
    data = writer.build_config({**OPTIONS, "config_file": "edge-infer.yaml"}, MQTT_ENV, tmp_path)
    got = data["pipelines"]["p"]["learn"]
    assert got["source"]["record"] == str(tmp_path / "rows.csv")
    assert got["work_dir"] == str(tmp_path / "learn" / "p")
    assert got["train"] == {"epochs": 4}
    other = data["pipelines"]["q"]["learn"]
    assert other["source"]["ha"]["token_file"] == str(tmp_path / "token")
    assert other["work_dir"] == "/share/learn"
    assert other["source"]["ha"]["url"] == "http://supervisor/core"


def test_written_config_errors(writer: ModuleType) -> None:
    with pytest.raises(writer.AddonConfigError, match="no pipelines"):
        writer.build_config({**OPTIONS, "pipelines": []}, MQTT_ENV, Path("/config"))
    bad = {**OPTIONS, "pipelines": [{**OPTIONS["pipelines"][0], "model": "nope"}]}  # type: ignore[dict-item]
    with pytest.raises(writer.AddonConfigError, match=r"option pipelines\[0\]\.model: 'nope' is neither"):
        writer.build_config(bad, MQTT_ENV, Path("/config"))
    bad = {**OPTIONS, "pipelines": [{**OPTIONS["pipelines"][0], "inputs": "power"}]}  # type: ignore[dict-item]
    with pytest.raises(writer.AddonConfigError, match=r"option pipelines\[0\]\.inputs"):
        writer.build_config(bad, MQTT_ENV, Path("/config"))
    with pytest.raises(writer.AddonConfigError, match="no MQTT broker"):
        writer.build_config(OPTIONS, {}, Path("/config"))
