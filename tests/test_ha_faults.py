"""What Home Assistant shows of the open-set, anomaly and explain outputs, served for real.

A real Home Assistant Core (skipped without ``EDGE_INFER_HA_VENV``, as tests/test_ha_real.py),
the daemon with examples/home.yaml's Shelly-plug and water pipelines as they are, and
``edge-infer simulate --fault unseen_appliance --fault fridge_creep --fault water_leak``:

* the unseen appliance's entity shows ``unknown`` (a state of its enum), with ``ood_score`` and
  the answer's attributions (``output.explain``: 8 stretches of the window) as attributes;
* the fridge's and the water sensor's ``problem`` binary sensors are ``off`` while they are
  healthy and turn ``on`` after the fault, each with its anomaly score as a numeric sensor;
* Home Assistant's log has no MQTT, sensor or template warning about any of it.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from edge.discovery_payloads import BridgeInfo
from tests.broker import Mosquitto
from tests.harness import DaemonThread, make_config
from tests.test_ha_real import (
    HOME,
    HomeAssistant,
    _clear_discovery,
    _mqtt_problems,
    _stop_process,
    home_assistant,
)

__all__ = ["home_assistant"]  # the fixture, imported for pytest

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parent.parent
PIPELINES = ("appliance_open_set", "fridge_anomaly", "water_flow_anomaly")
SPEED = 1000.0
ONSET_H = 4.0


def _config(url: str, prefix: str) -> dict[str, Any]:
    data = yaml.safe_load(HOME.read_text())
    data["pipelines"] = {name: data["pipelines"][name] for name in PIPELINES}
    data["models"] = {name: spec for name, spec in data["models"].items() if name in PIPELINES}
    data["mqtt"] = {
        **data["mqtt"],
        "url": url,
        "base_topic": f"{prefix}/edge-infer",
        "client_id": f"ei-{prefix}",
    }
    data["homeassistant"] = {**data["homeassistant"], "instance_id": prefix}
    return data


def _simulate(url: str, log: Path) -> subprocess.Popen[bytes]:
    argv = [
        "--mqtt-url",
        url,
        "--speed",
        str(SPEED),
        "--devices",
        "1",
        "--seed",
        "0",
        "--families",
        "z2m_plug",
    ]
    argv += ["--fault", "unseen_appliance", "--fault", "fridge_creep", "--fault", "water_leak"]
    argv += ["--fault-onset-h", str(ONSET_H)]
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "edge.cli", "simulate", *argv],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )


def test_home_assistant_shows_unknown_with_attributions_and_the_faults_as_problems(
    home_assistant: HomeAssistant, mosquitto: Mosquitto, topic_prefix: str, tmp_path: Path
) -> None:
    data = _config(mosquitto.url, topic_prefix)
    assert set(data["models"]) == set(PIPELINES), "examples/home.yaml names its models after the pipelines"
    history: dict[str, list[str]] = {}  # entity id -> the distinct states seen, in order

    def poll() -> dict[str, dict[str, Any]]:
        states = {
            e: s for e, s in home_assistant.mqtt_states().items() if not e.startswith(("select.", "button."))
        }
        for entity_id, state in states.items():
            seen = history.setdefault(entity_id, [])
            if not seen or seen[-1] != state["state"]:
                seen.append(state["state"])
        return states

    def problem(states: dict[str, dict[str, Any]], word: str) -> str | None:
        return next(
            (
                e
                for e, s in states.items()
                if e.startswith("binary_sensor.")
                and word in e
                and not e.startswith("binary_sensor.edge_infer_")  # the bridge's own diagnostics
                and s["attributes"].get("device_class") == "problem"
            ),
            None,
        )

    sim = None
    unknown: dict[str, Any] | None = None
    try:
        with DaemonThread(make_config(data, HOME.parent)):
            sim = _simulate(mosquitto.url, tmp_path / "simulate.log")
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                states = poll()
                unknown = unknown or next(
                    (
                        s
                        for s in states.values()
                        if s["state"] == "unknown" and s["attributes"].get("label") == "unknown"
                    ),
                    None,
                )
                fridge, water = problem(states, "fridge"), problem(states, "water")
                if unknown and fridge and water and "on" in history[fridge] and "on" in history[water]:
                    break
                time.sleep(0.5)
            states = poll()
    finally:
        if sim is not None:
            _stop_process(sim)
        _clear_discovery(mosquitto.url, BridgeInfo(version="0", instance_id=topic_prefix).identifier)
    log = (tmp_path / "simulate.log").read_text()[-2000:]

    assert unknown is not None, (
        f"no entity showed unknown with its label; simulate: {log}; states: {sorted(states)}"
    )
    attrs = unknown["attributes"]
    # the raw label `unknown` is an option of the enum (the known classes by their readable names);
    # Home Assistant's UI shows it as "Unknown", the `label` attribute and the score tell it apart
    # from a sensor without a value
    assert attrs["options"][-1] == "unknown" and "Television" in attrs["options"], attrs
    assert attrs["ood_score"] > 100, attrs
    explain = attrs["explain"]
    assert explain["method"] == "occlusion" and len(explain["segments"]) == 8, explain
    assert all(0.0 <= s["share"] <= 1.0 for s in explain["segments"]), explain
    assert abs(sum(s["share"] for s in explain["segments"]) - 1.0) < 0.01, explain

    for word in ("fridge", "water"):
        entity = problem(states, word)
        assert entity is not None, (word, sorted(states))
        seen = [s for s in history[entity] if s != "unavailable"]
        # healthy first (the first answers' windows end before the onset), then flagged
        assert seen[:1] == ["off"] and "on" in seen, (entity, history[entity])
        scores = [
            s
            for e, s in states.items()
            if e.startswith("sensor.")
            and word in e
            and e.endswith("_score")
            and s["state"] not in ("unavailable", "unknown")
        ]
        assert scores and all(float(s["state"]) >= 0 for s in scores), (word, sorted(states))

    rejected = _mqtt_problems(home_assistant)
    assert not rejected, "\n".join(rejected)
