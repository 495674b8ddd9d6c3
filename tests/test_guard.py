"""output.guard (Predbat-style): a pipeline whose rolling agreement with corrections is a problem
publishes its entities unavailable instead of guesses, and comes back when the agreement recovers;
counted. Unit (the daemon's guard on its outgoing queue, no broker) and against a real Mosquitto."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import onnx
import pytest

from edge.config import ConfigError
from edge.daemon import Daemon
from edge.manifest import MANIFEST_KEY
from tests.broker import Mosquitto
from tests.harness import Collector, DaemonThread, Publisher, make_config
from tests.test_daemon import base_config


def with_holdout_accuracy(path: Path, accuracy: float) -> Path:
    """The test model with a card that gives a holdout accuracy (what the agreement is judged by)."""
    model = onnx.load(str(path))
    for entry in model.metadata_props:
        if entry.key == MANIFEST_KEY:
            manifest = json.loads(entry.value)
            manifest["metrics"] = {"pytorch_test": {"accuracy": accuracy}}
            entry.value = json.dumps(manifest)
    onnx.save(model, str(path))
    return path


def guarded_config(url: str, prefix: str, tmp_path: Path, guard: bool = True) -> dict[str, Any]:
    data = base_config(url, prefix, tmp_path)
    with_holdout_accuracy(tmp_path / "win.onnx", 0.9)
    with_holdout_accuracy(tmp_path / "snap.onnx", 0.9)
    data["pipelines"]["plug"]["output"] = {"guard": guard}
    data["corrections"] = {"agreement_min": 3, "agreement_window": 4, "agreement_margin": 0.1}
    return data


def test_the_guard_is_off_unless_asked_and_a_boolean() -> None:
    from edge.config import OutputConfig

    assert OutputConfig().guard is False
    assert OutputConfig(guard=True).guard is True
    source = {"profile": "json", "topics": ["home/{device}/power"]}
    bad = {
        "models": {"m": {"path": "/nonexistent/m.onnx"}},
        "pipelines": {"p": {"model": "m", "source": source, "output": {"guard": "sometimes"}}},
    }
    with pytest.raises(ConfigError, match=r"pipelines\.p\.output\.guard"):
        make_config(bad, Path("."))


def _availability(daemon: Daemon, topic: str) -> list[bytes]:
    return [m.payload for m in daemon.link.queue if m.topic == topic]


def test_the_guard_takes_a_pipeline_away_while_its_agreement_is_a_problem(tmp_path: Path) -> None:
    asyncio.run(_guard_unit(tmp_path))


async def _guard_unit(tmp_path: Path) -> None:  # the MQTT client is made on a running loop
    data = guarded_config("mqtt://127.0.0.1:1", "u", tmp_path)
    daemon = Daemon(make_config(data, tmp_path))
    plug = daemon.pipelines["plug"]
    plug.last_published["p1"] = b"{}"  # answered once: it has an entity
    plug.availability["p1"] = True
    topic = plug.output_topic("p1") + "/availability"
    agreement = daemon.corrections.agreement["plug"]
    for _ in range(2):
        agreement.add(False)
    daemon.engine.guard_check()
    assert "plug" not in daemon.guarded  # 2 corrections: too few to judge
    agreement.add(False)
    daemon.engine.guard_check()
    assert daemon.guarded == {"plug": plug.spec.sha256}
    assert _availability(daemon, topic) == [b"offline"]
    daemon.engine.availability(plug, "p1", False)
    daemon.engine.availability(plug, "p1", True)  # the source device is back: still guarded
    assert _availability(daemon, topic) == [b"offline", b"offline", b"offline"]
    for _ in range(4):
        agreement.add(True)
    daemon.engine.guard_check()
    assert "plug" not in daemon.guarded and _availability(daemon, topic)[-1] == b"online"
    info = daemon.bridge_info()["guard"]
    assert info == {"plug": {"active": False, "engaged": 1, "released": 1, "withheld": 0}}
    assert "room" not in info  # no guard there
    # a new model in place of the one it caught: released, its agreement starts afresh
    for _ in range(4):
        agreement.add(False)
    daemon.engine.guard_check()
    assert "plug" in daemon.guarded
    daemon.guarded["plug"] = "0" * 64  # as if the model it caught was another file
    daemon.engine.guard_check()
    assert not daemon.guarded and _availability(daemon, topic)[-1] == b"online"
    assert daemon.corrections.agreement["plug"].count == 0
    # a pipeline without the guard never engages, whatever its agreement
    daemon.corrections.agreement["room"].recent.extend([False] * 4)
    assert daemon.corrections.judge("room")["problem"] is True
    daemon.engine.guard_check()
    assert not daemon.guarded


@pytest.mark.broker
def test_a_guarded_pipeline_goes_unavailable_and_comes_back_on_a_real_broker(
    mosquitto: Mosquitto, topic_prefix: str, tmp_path: Path
) -> None:
    p = topic_prefix
    data = guarded_config(mosquitto.url, p, tmp_path)
    out = Collector(mosquitto.url, f"{p}/ei/plug/#")
    pub = Publisher(mosquitto.url)
    availability = f"{p}/ei/plug/p1/availability"
    state = f"{p}/ei/plug/p1"
    now = time.time() - 200

    def window(start: float) -> None:
        for i in range(6):
            pub.send(f"{p}/tele/p1/SENSOR", {"ENERGY": {"Power": 10.0 * (i + 1)}, "t": start + i})

    with DaemonThread(make_config(data, tmp_path)) as runner:
        daemon = runner.daemon
        assert daemon is not None
        window(now)
        out.wait(lambda m: any(x.topic == state for x in m))
        assert [m.payload for m in out.on(availability)] == [b"online"]
        for _ in range(3):  # "none of these" always disagrees: 0 of 3, below 0.9 - 0.1
            pub.send(f"{p}/ei/plug/p1/correct/set", "none of these")
        out.wait(lambda m: [x.payload for x in m if x.topic == availability][-1:] == [b"offline"])
        answered = len(out.on(state))
        window(now + 6)  # answered by the model, but published as nothing: withheld, counted
        deadline = time.monotonic() + 15
        while runner.call(lambda: daemon.guard_counts["plug"]["withheld"]) < 3:
            assert time.monotonic() < deadline, runner.call(daemon.bridge_info)["guard"]
            time.sleep(0.05)
        latest = runner.call(lambda: daemon.corrections.rings["plug"].latest("p1").predicted)
        for _ in range(4):  # the last 4 corrections agree: 1.0, the problem is gone
            pub.send(f"{p}/ei/plug/p1/correct/set", latest)
        out.wait(lambda m: [x.payload for x in m if x.topic == availability][-1:] == [b"online"])
        info = runner.call(daemon.bridge_info)
        assert info["guard"]["plug"]["engaged"] == 1 and info["guard"]["plug"]["released"] == 1
        assert info["corrections"]["agreement"]["plug"]["problem"] is False
        assert len(out.on(state)) == answered  # nothing published while guarded
        window(now + 12)
        out.wait(lambda m: len([x for x in m if x.topic == state]) > answered)  # guesses again
    assert [m.payload for m in out.on(availability)][:3] == [b"online", b"offline", b"online"]
    out.close()
    pub.close()
