"""Corrections in service (edge/corrections.py): the bounded input ring, the agreement, button
labels; and against a real Mosquitto a daemon that stores a correction with the window its model
saw and refuses hostile commands (counted) while good devices are still answered."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest

from edge.corrections import Agreement, InputRing, Seen, agreement_components, corrections_dir, is_problem
from tests.broker import Mosquitto
from tests.harness import Collector, DaemonThread, Publisher, make_config
from tests.test_daemon import base_config


def _seen(i: int) -> Seen:
    return Seen(f"d{i}", float(i), np.full((6, 1), i, dtype=np.float32), "off", "1")


def test_the_ring_keeps_the_last_inputs_of_at_most_max_devices() -> None:
    ring = InputRing(size=3, max_devices=4)
    for i in range(10):
        ring.add("plug", _seen(i))
    latest = ring.latest("plug")
    assert latest is not None and latest.ts == 9.0
    assert ring.entries() == 3  # size bounds one device
    for d in range(10):
        ring.add(f"dev{d}", _seen(d))
    assert len(ring) == 4 and ring.entries() == 4  # max_devices bounds the devices, oldest out
    assert "plug" not in ring and ring.latest("dev0") is None and "dev9" in ring
    assert ring.evicted == 7
    ring.add("dev6", _seen(99))  # answered again: the most recent, so dev7 is forgotten next
    ring.add("new", _seen(1))
    assert "dev6" in ring and "dev7" not in ring
    with pytest.raises(ValueError, match="at least 1"):
        InputRing(0, 1)


def test_agreement_is_the_fraction_of_the_last_window() -> None:
    a = Agreement(window=4)
    assert a.value is None and a.count == 0
    for agreed in [False, False, True, True, True, True]:
        a.add(agreed)
    assert a.count == 4 and a.value == 1.0
    a.add(False)
    assert a.value == 0.75


def test_a_problem_needs_enough_corrections_below_the_card_minus_the_margin() -> None:
    assert not is_problem(0.5, 19, 0.9, 20, 0.1)  # too few to judge
    assert is_problem(0.79, 20, 0.9, 20, 0.1)
    assert not is_problem(0.8, 20, 0.9, 20, 0.1)  # at the margin: not below it
    assert not is_problem(0.1, 50, None, 20, 0.1)  # a card without a holdout accuracy
    assert not is_problem(None, 50, 0.9, 20, 0.1)
    cmps = agreement_components("uid", "eid", "base/bridge/info", "plug")
    assert set(cmps) == {"agreement_plug", "agreement_plug_problem"}
    assert cmps["agreement_plug_problem"]["device_class"] == "problem"


def test_the_store_lives_beside_the_state_file_else_in_the_default_state_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = {"profile": "json", "topics": ["home/{device}/power"]}
    pipeline = {"model": "m", "source": source, "features": {"type": "snapshot"}}
    data = {"models": {"m": {"path": "/nonexistent/m.onnx"}}, "pipelines": {"p": pipeline}}
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "sd"))
    assert corrections_dir(make_config(data, tmp_path)) == tmp_path / "sd"
    monkeypatch.delenv("STATE_DIRECTORY")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert corrections_dir(make_config(data, tmp_path)) == tmp_path / "xdg" / "edge-infer"
    with_state = {**data, "state": {"file": str(tmp_path / "s" / "state.json")}}
    assert corrections_dir(make_config(with_state, tmp_path)) == tmp_path / "s"


def _window(pub: Publisher, p: str, device: str, start: float, values: list[float]) -> None:
    for i, v in enumerate(values):
        pub.send(f"{p}/tele/{device}/SENSOR", {"ENERGY": {"Power": v}, "t": start + i})


def _rows(db: Path) -> list[tuple[str, str, str, str, bytes, str]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(
            "SELECT device, pipeline, predicted, label, input, shape FROM corrections ORDER BY id"
        ).fetchall()


@pytest.mark.broker
def test_a_correction_is_stored_with_its_window_and_hostile_commands_are_refused(
    mosquitto: Mosquitto, topic_prefix: str, tmp_path: Path
) -> None:
    p = topic_prefix
    data = base_config(mosquitto.url, p, tmp_path, state={"file": str(tmp_path / "state" / "state.json")})
    out = Collector(mosquitto.url, f"{p}/ei/#")
    pub = Publisher(mosquitto.url)
    now = time.time() - 200
    db = tmp_path / "state" / "labels.sqlite3"
    values = [10.0, 20.0, 30.0, 40.0, 50.0, 60.0]
    with DaemonThread(make_config(data, tmp_path)) as runner:
        daemon = runner.daemon
        assert daemon is not None
        _window(pub, p, "p1", now, values)
        out.wait(lambda _m: bool(out.on(f"{p}/ei/plug/p1")))
        predicted = json.loads(out.on(f"{p}/ei/plug/p1")[-1].payload)["label"]
        pub.send(f"{p}/ei/plug/p1/correct/set", "kettle")
        deadline = time.monotonic() + 15
        while runner.call(lambda: daemon.corrections.stored) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        rows = _rows(db)
        assert len(rows) == 1, rows
        device, pipeline, pred, label, blob, shape = rows[0]
        assert (device, pipeline, pred, label, shape) == ("p1", "plug", predicted, "kettle", "6,1")
        assert np.frombuffer(blob, dtype=np.float32).tolist() == values  # the window the model saw

        # Hostile: an unknown label, an unknown device, a button this output has not, then a flood.
        pub.send(f"{p}/ei/plug/p1/correct/set", "rm -rf /")
        pub.send(f"{p}/ei/plug/nobody/correct/set", "kettle")
        pub.send(f"{p}/ei/plug/p1/false_alarm/press", "PRESS")
        pub.send(f"{p}/ei/plug/p1/correct/set", b"x" * 10_000)
        for _ in range(10_000):
            pub.client.publish(f"{p}/ei/plug/p1/correct/set", "fridge", qos=1)
        pub.send(f"{p}/ei/plug/p1/correct/set", "off")  # waited for: the flood was sent before it

        def counted() -> int:
            info = daemon.corrections.info()
            return int(info["accepted"]) + sum(info["refused"].values())

        deadline = time.monotonic() + 60
        while runner.call(counted) < 10_006 and time.monotonic() < deadline:
            time.sleep(0.1)
        info = runner.call(daemon.corrections.info)
        refused = info["refused"]
        assert refused["unknown_label"] == 1 and refused["unknown_device"] == 1, info
        assert refused["not_supported"] == 1 and refused["too_large"] == 1, info
        assert refused["rate_limited"] >= 9_900, info  # 2/s, burst 20 (edge/commands.py)
        assert info["accepted"] + sum(refused.values()) == 10_006, info
        # Good devices are still answered after the flood.
        _window(pub, p, "p2", now, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
        out.wait(lambda _m: bool(out.on(f"{p}/ei/plug/p2")))
        bridge = runner.call(daemon.bridge_info)
        assert bridge["corrections"]["refused"]["rate_limited"] == refused["rate_limited"]
        agreement = bridge["corrections"]["agreement"]["plug"]
        deadline = time.monotonic() + 15
        while (
            runner.call(lambda: daemon.corrections.stored) < info["accepted"] and time.monotonic() < deadline
        ):
            time.sleep(0.05)  # stored off the loop, after being counted
        labels = [r[3] for r in _rows(db)][-50:]  # corrections.agreement_window
        # all for p1's one answer: agreement is the share of corrections naming its prediction
        assert agreement["count"] == len(labels) == min(info["accepted"], 50), (agreement, labels)
        assert agreement["value"] == round(labels.count(predicted) / len(labels), 4), (agreement, predicted)
        assert agreement["problem"] is False  # the test model's card has no holdout accuracy
        metrics = runner.call(daemon.render_metrics)
        assert 'edge_infer_corrections_refused_total{reason="unknown_label"} 1.0' in metrics
        assert "edge_infer_corrections_stored_total" in metrics
        stored = runner.call(lambda: daemon.corrections.stored)
    rows = _rows(db)
    assert len(rows) == stored == info["accepted"]  # every accepted correction, none refused
    assert {r[3] for r in rows} <= {"kettle", "fridge", "off"}
    out.close()
    pub.close()


def test_learn_reads_the_store_where_the_daemon_writes_it_without_a_state_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edge.labelstore import FILENAME, LabelStore
    from edge.learn.run import make_table
    from tests.test_learn_table import T0, learn_cfg

    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "sd"))
    data = {
        "models": {"m": {"path": "/nonexistent/m.onnx"}},
        "pipelines": {
            "p": {
                "model": "m",
                "source": {"profile": "json", "topics": ["home/{device}/power"]},
                "inputs": {"power": "power"},
                "features": {"type": "window", "size": 3, "resample_period_s": 10},
                "learn": learn_cfg(labels={"corrections": True}, days=30, end="2026-11-10T00:00:00Z"),
            }
        },
    }
    config = make_config(data, tmp_path)
    store = LabelStore(corrections_dir(config) / FILENAME)
    store.add(device="plug", pipeline="p", predicted="x", label="kettle", model_version="1",
              input=[[1.0], [2.0], [3.0]], ts=T0)  # fmt: skip
    store.close()
    table, described = make_table("p", config)
    assert str(tmp_path / "sd") in described
    assert table.labels == ["kettle"] and table.x[:, :, 0].tolist() == [[1, 2, 3]]
