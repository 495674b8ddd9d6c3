"""The path a user takes without a checkout: build the sdist and wheel, install the wheel into a
fresh virtual environment outside the checkout, and run the bundled models and the demo from an
empty directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import edge
from edge import zoo

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.install]


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # --no-isolation: build with this venv's setuptools (no download); the wheel is built from the
    # sdist, so the sdist must carry everything the wheel needs.
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return out


@pytest.fixture(scope="module")
def venv(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    env_dir = tmp_path_factory.mktemp("venv") / "v"
    # Without PYTHONPATH: the checkout (and its egg-info) must not count as installed.
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True, timeout=120, env=_clean_env())
    wheel = next(dist.glob("*.whl"))
    subprocess.run(
        [str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q", f"{wheel}[demo]"],
        check=True,
        timeout=600,
        env=_clean_env(),
        cwd=env_dir.parent,
    )
    return env_dir


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "EDGE_INFER_MQTT_URL")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def test_sdist_and_wheel_carry_the_zoo_and_the_examples(dist: Path) -> None:
    version = edge.__version__
    wheel = dist / f"edge_infer-{version}-py3-none-any.whl"
    assert wheel.is_file(), sorted(p.name for p in dist.iterdir())
    assert (dist / f"edge_infer-{version}.tar.gz").is_file()
    names = set(zipfile.ZipFile(wheel).namelist())
    for model in zoo.names():
        variants = [entry["path"] for entry in zoo.report(model)["files"].values()]  # fp32 (+ int8)
        for item in (*variants, "card.md", "report.json"):
            assert f"edge/_bundled/models/{model}/{item}" in names
    assert "edge/_bundled/examples/home.yaml" in names
    assert any(n.startswith("devices/traces/") for n in names)
    metadata = zipfile.ZipFile(wheel).read(f"edge_infer-{version}.dist-info/METADATA").decode()
    assert f"Version: {version}" in metadata
    # every runtime dependency is declared with an upper bound
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    runtime = [r for r in requires if "extra ==" not in r]
    assert {r.split()[1].split(">")[0].split("<")[0].lower() for r in runtime} >= {
        "onnxruntime",
        "numpy",
        "pyyaml",
        "pydantic",
    }
    # no MQTT client library: the daemon speaks MQTT itself (edge/mqttcodec.py)
    assert not {r.split()[1].split(">")[0].split("<")[0].lower() for r in runtime} & {"aiomqtt", "paho-mqtt"}
    assert all("<" in r for r in runtime), runtime
    # the simulated home (edge-infer simulate, the demo) publishes with aiomqtt: the demo extra has it
    assert any(r.split()[1].startswith("aiomqtt") and 'extra == "demo"' in r for r in requires), requires


def test_installed_wheel_lists_and_resolves_the_zoo(venv: Path, tmp_path: Path) -> None:
    exe = venv / "bin" / "edge-infer"
    out = subprocess.run(
        [str(exe), "models", "list", "--json"],
        cwd=tmp_path,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    listed = {m["name"]: m for m in json.loads(out.stdout)}
    assert set(listed) == set(zoo.names())
    appliance = listed["appliance"]
    assert appliance["window"] == 1460 and appliance["features"] == ["power"]
    assert appliance["accuracy"]["int8"] == pytest.approx(zoo.summary("appliance")["accuracy"]["int8"])
    # the files come from the installed package, not from this checkout
    assert str(venv) in appliance["card"]
    config = tmp_path / "c.yaml"
    config.write_text(
        "models:\n  a: {path: 'zoo:appliance'}\n  b: {path: 'zoo:nope'}\n"
        "pipelines:\n  p: {model: a, source: {profile: zigbee2mqtt}, inputs: {power: power},\n"
        "      features: {type: window}}\n"
    )
    bad = subprocess.run(
        [str(exe), "check", "-c", str(config)],
        cwd=tmp_path,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2
    assert "models.b.path" in bad.stderr and "zoo:appliance" in bad.stderr


def test_demo_runs_from_the_installed_wheel_in_an_empty_directory(venv: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run(
        [str(venv / "bin" / "edge-infer"), "demo", "--duration", "40", "--no-ui", "--json"],
        cwd=empty,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    pipelines = summary["pipelines"]
    expected = {"activity", "appliance_tasmota", "appliance_z2m", "occupancy_esphome", "occupancy_z2m"}
    assert set(pipelines) == expected | {"appliance_open_set", "fridge_anomaly", "water_flow_anomaly"}
    unseen = pipelines["appliance_open_set"]["answers"]["shellyplusplugs-unseen"]
    assert set(unseen["labels"]) == {"unknown"} and "explain" in unseen  # the bundled open-set model
    for name, result in pipelines.items():
        assert result["predictions"] > 0, (name, result, proc.stderr[-2000:])
        assert result["devices"] >= 1, (name, result)
    assert list(empty.iterdir()) == []  # nothing written where the user stood
