"""examples/*.yaml: every example passes ``edge-infer check``, and examples/home.yaml fits the
simulated home that ``edge-infer demo`` runs it against (every simulated device reaches its model)."""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from devices.simulate import FAMILIES, SimConfig, Simulator
from edge.config import load_config
from edge.daemon import build_pipelines, load_models
from edge.demo import DEFAULT_CONFIG, DEMO_FAULTS, demo_config
from tests.harness import ROOT, run_cli

EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
HOME = ROOT / "examples" / "home.yaml"

# which pipeline of examples/home.yaml serves which simulated family
PIPELINE_OF = {
    "z2m_plug": "appliance_z2m",
    "tasmota_plug": "appliance_tasmota",
    "wearable": "activity",
    "z2m_climate": "occupancy_z2m",
    "esphome_climate": "occupancy_esphome",
}
# and which serves the fault devices of the demo's default faults (devices/faults.py)
FAULT_PIPELINE_OF = {
    "unseen_appliance": "appliance_open_set",
    "fridge": "fridge_anomaly",
    "water_flow": "water_flow_anomaly",
}


def test_there_are_examples() -> None:
    assert HOME in EXAMPLES
    assert DEFAULT_CONFIG.resolve() == HOME.resolve()  # the demo runs the example itself


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_check_passes(path: Path) -> None:
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 0, result.stderr
    assert "config OK" in result.stdout
    config = load_config(path)
    for name in config.pipelines:
        assert f"  {name}: " in result.stdout


def test_home_example_uses_the_zoo_and_discovery() -> None:
    config = load_config(HOME)
    assert config.homeassistant.enabled
    # (not resolved: zoo:appliance_open_set is a link to models/appliance/open_set/)
    assert {m.path.parent.parent.resolve() for m in config.models.values()} == {(ROOT / "models").resolve()}
    profiles = {p.source.profile for p in config.pipelines.values()}
    assert profiles == {"zigbee2mqtt", "tasmota", "json", "esphome", "shelly"}
    assert set(PIPELINE_OF.values()) | set(FAULT_PIPELINE_OF.values()) == set(config.pipelines)
    assert set(PIPELINE_OF) == set(FAMILIES)


def test_demo_config_changes_only_the_broker_and_output_intervals() -> None:
    config = load_config(HOME)
    demo = demo_config(config, "mqtt://127.0.0.1:1999", 600.0, "3.1.1")
    assert (demo.mqtt.url, demo.mqtt.protocol) == ("mqtt://127.0.0.1:1999", "3.1.1")
    assert demo.models == config.models
    assert demo.homeassistant == config.homeassistant
    for name, pipeline in config.pipelines.items():
        sped = demo.pipelines[name]
        assert sped.model_copy(update={"output": pipeline.output}) == pipeline
        if pipeline.output.heartbeat_s is not None:
            assert sped.output.heartbeat_s == max(pipeline.output.heartbeat_s / 600.0, 0.5)


def test_every_simulated_device_reaches_its_pipeline() -> None:
    """Offline: the simulator's payloads through the example's own pipelines fill every window."""
    config = load_config(HOME)
    models = load_models(config)
    try:
        pipelines = build_pipelines(config, models)
        sim = Simulator(SimConfig(speed=1.0, devices=2, seed=5))
        windows: dict[str, set[str]] = defaultdict(set)
        start = time.time()
        for dev in sim.devices:
            window = models[config.pipelines[PIPELINE_OF[dev.family]].model].spec.sample_shape[0]
            for step in range(window + 2):  # +1: resampling holds each value until the next sample
                for topic, payload in dev.messages(step, start + step * dev.period_s):
                    for name, pipeline in pipelines.items():
                        if not any(mqtt.topic_matches_sub(f, topic) for f in pipeline.filters):
                            continue
                        for item in pipeline.handle(topic, payload, 0.0, lambda *_: None):
                            windows[name].add(item.device)
        for dev in sim.devices:
            assert dev.name in windows[PIPELINE_OF[dev.family]], (dev.family, dev.name, dict(windows))
        for name, pipeline in pipelines.items():
            assert not pipeline.stats.dropped, (name, dict(pipeline.stats.dropped))
            served = {d.name for d in sim.devices if PIPELINE_OF[d.family] == name}
            assert windows[name] == served  # no pipeline predicts for another family's devices
    finally:
        for model in models.values():
            model.close()


def test_the_demo_faults_reach_their_pipelines() -> None:
    """Offline: the unseen appliance's plug fills the open-set pipeline's window, the fridge's the
    anomaly pipeline's, and no other pipeline takes either (nor do they take the others)."""
    config = load_config(HOME)
    models = load_models(config)
    try:
        pipelines = build_pipelines(config, models)
        sim = Simulator(SimConfig(speed=1.0, devices=1, seed=0, faults=DEMO_FAULTS))
        windows: dict[str, set[str]] = defaultdict(set)
        start = time.time()
        for dev in sim.devices:
            if dev.family not in FAULT_PIPELINE_OF:
                continue
            window = models[config.pipelines[FAULT_PIPELINE_OF[dev.family]].model].spec.sample_shape[0]
            for step in range(window + 2):
                for topic, payload in dev.messages(step, start + step * dev.period_s):
                    for name, pipeline in pipelines.items():
                        if not any(mqtt.topic_matches_sub(f, topic) for f in pipeline.filters):
                            continue
                        for item in pipeline.handle(topic, payload, 0.0, lambda *_: None):
                            windows[name].add(item.device)
        assert dict(windows) == {p: {d.name} for d in sim.devices if (p := FAULT_PIPELINE_OF.get(d.family))}
        for name in FAULT_PIPELINE_OF.values():
            assert not pipelines[name].stats.dropped, (name, dict(pipelines[name].stats.dropped))
    finally:
        for model in models.values():
            model.close()
