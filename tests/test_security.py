"""Security by default: pinned model files, hostile topics and payloads taken as data only."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from edge.decode import sanitise_segment
from tests.broker import Mosquitto
from tests.harness import Collector, DaemonThread, Publisher, make_config, run_cli, write_config
from tests.onnx_models import snapshot_classifier
from tests.test_daemon import base_config


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_sha256_pins_refuse_a_changed_model_file(tmp_path: Path, topic_prefix: str) -> None:
    data = base_config("mqtt://127.0.0.1:1", topic_prefix, tmp_path)
    data["models"]["snap"]["sha256"] = _sha(tmp_path / "snap.onnx")
    path = write_config(data, tmp_path / "c.yaml")
    assert run_cli("check", "-c", str(path)).returncode == 0
    # Someone swaps the file (same input and output, other weights): the pin refuses it.
    snapshot_classifier(tmp_path / "snap.onnx", ["temperature", "humidity", "co2"], ["a", "b", "c"], seed=9)
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "models.snap.sha256" in result.stderr and "not the pinned" in result.stderr, result.stderr
    result = run_cli("run", "-c", str(path))  # the daemon will not start on it either
    assert result.returncode == 2 and "models.snap.sha256" in result.stderr, result.stderr


HOSTILE_DEVICES = [
    "{device.__class__.__init__.__globals__}",
    "{{7*7}}",
    "${jndi:ldap:x}",
    "%s%s%n",
    "..",
    "$SYS",
]


@pytest.mark.broker
def test_hostile_topics_and_payloads_are_data_not_code(
    mosquitto: Mosquitto, topic_prefix: str, tmp_path: Path
) -> None:
    """Device names taken from topics and strings inside payloads are never formatted, templated or
    evaluated: each answer lands on a sanitised literal topic, and its payload carries no result of
    an evaluation."""
    p = topic_prefix
    data = base_config(mosquitto.url, p, tmp_path)
    out = Collector(mosquitto.url, f"{p}/ei/#")
    pub = Publisher(mosquitto.url)
    good = {"temperature": 21.0, "humidity": 40.0, "co2": 500.0}
    with DaemonThread(make_config(data, tmp_path)) as runner:
        for device in HOSTILE_DEVICES:
            pub.send(f"{p}/z2m/{device}", {**good, "note": "{{ 7*7 }} {__import__('os')}"})
        out.wait(lambda m: len(_answers(out, p)) >= len(HOSTILE_DEVICES), timeout=20)
        devices = runner.call(lambda: sorted(runner.daemon.pipelines["room"].store.states))
    pub.close()
    out.close()
    leaves = sorted(_answers(out, p))
    # Each name became one literal topic level: sanitised ('/', '+', '#' replaced), never evaluated.
    assert leaves == sorted(sanitise_segment(d) for d in HOSTILE_DEVICES), leaves
    for message in out.messages:
        try:
            document = json.loads(message.payload)
        except ValueError:
            document = message.payload.decode()  # online/offline
        for text in _strings(document):
            assert text != "49" and "<function" not in text and "<module" not in text, text
    assert set(devices) == set(HOSTILE_DEVICES), devices  # kept as the literal names


def _answers(out: Collector, prefix: str) -> list[str]:
    room = f"{prefix}/ei/room/"
    return [
        m.topic[len(room) :]
        for m in out.messages
        if m.topic.startswith(room) and "/" not in m.topic[len(room) :]
    ]


def _strings(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return []
