"""The daemon end to end against a real Mosquitto, driven by real paho clients."""

from __future__ import annotations

import json
import logging
import math
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from tests.broker import Mosquitto, make_tls
from tests.harness import (
    Collector,
    DaemonThread,
    Publisher,
    fast_mqtt,
    make_config,
    spawn_daemon,
    write_config,
)
from tests.onnx_models import snapshot_classifier, window_classifier

pytestmark = pytest.mark.broker

FEATURES = ["temperature", "humidity", "co2"]
LABELS = ["empty", "one", "many"]


def _ort(path: Path, batch: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": batch.astype(np.float32)})[0]


def base_config(url: str, prefix: str, tmp_path: Path, **extra: Any) -> dict[str, Any]:
    snapshot_classifier(tmp_path / "snap.onnx", FEATURES, LABELS)
    window_classifier(tmp_path / "win.onnx", ["power"], 6, ["off", "fridge", "kettle"])
    config: dict[str, Any] = {
        "mqtt": fast_mqtt(url, prefix),
        "models": {"snap": {"path": "snap.onnx"}, "win": {"path": "win.onnx"}},
        "pipelines": {
            "room": {
                "model": "snap",
                "source": {"topics": [f"{prefix}/z2m/{{device}}"]},
                "features": {"type": "snapshot", "max_age_s": 60},
            },
            "plug": {
                "model": "win",
                "source": {"topics": [f"{prefix}/tele/{{device}}/SENSOR"], "timestamp_field": "t"},
                "inputs": {"power": "ENERGY.Power"},
                "features": {"type": "window", "hop": 2},
            },
        },
        "homeassistant": {"enabled": False},
    }
    for key, value in extra.items():
        config[key] = value
    return config


def test_predictions_equal_onnxruntime_and_devices_do_not_mix(
    mosquitto: Mosquitto, topic_prefix: str, tmp_path: Path
) -> None:
    p = topic_prefix
    cfg = make_config(base_config(mosquitto.url, p, tmp_path), tmp_path)
    out = Collector(mosquitto.url, f"{p}/ei/#")
    pub = Publisher(mosquitto.url)
    rng = np.random.default_rng(3)
    with DaemonThread(cfg):
        # Snapshot: two rooms, readings interleaved, each device's own values only.
        rooms = {
            "kitchen": rng.normal(size=(5, 3)) * [5, 10, 300] + [21, 45, 600],
            "bedroom": rng.normal(size=(5, 3)) * [5, 10, 300] + [18, 55, 900],
        }
        for i in range(5):
            for device, rows in rooms.items():
                pub.send(f"{p}/z2m/{device}", dict(zip(FEATURES, rows[i].tolist(), strict=True)))
        # Window: two plugs interleaved sample by sample, explicit increasing timestamps.
        plugs = {"p1": np.arange(10, dtype=float) * 10.0, "p2": 1000.0 - np.arange(10, dtype=float) * 7}
        for i in range(10):
            for device, series in plugs.items():
                pub.send(
                    f"{p}/tele/{device}/SENSOR", {"t": 1_700_000_000 + i, "ENERGY": {"Power": series[i]}}
                )
        out.wait_count(f"{p}/ei/room/kitchen", 5)
        out.wait_count(f"{p}/ei/room/bedroom", 5)
        out.wait(lambda m: sum(x.topic == f"{p}/ei/plug/p2" for x in m) >= 3)
        out.wait(lambda m: sum(x.topic == f"{p}/ei/plug/p1" for x in m) >= 3)
    for device, rows in rooms.items():
        expected = _ort(tmp_path / "snap.onnx", rows)
        got = [m.json() for m in out.on(f"{p}/ei/room/{device}")]
        assert len(got) == 5
        for row, message in zip(expected, got, strict=True):
            assert message["label"] == LABELS[int(np.argmax(row))]
            assert message["confidence"] == pytest.approx(float(row.max()), abs=1e-4)
            assert message["model"] == "snap" and message["model_version"] == "1.0.0"
            assert message["latency_ms"] >= 0
    for device, series in plugs.items():
        windows = np.stack([series[i - 5 : i + 1] for i in (5, 7, 9)])[:, :, None]
        expected = _ort(tmp_path / "win.onnx", windows)
        got = [m.json() for m in out.on(f"{p}/ei/plug/{device}")]
        assert len(got) == 3, got
        for row, message in zip(expected, got, strict=True):
            assert message["confidence"] == pytest.approx(float(row.max()), abs=1e-4)
            probs = {alt["label"]: alt["p"] for alt in message["top_k"]}
            assert probs["kettle"] == pytest.approx(float(row[2]), abs=1e-4)
        assert got[0]["ts"].startswith("2023-11-14T22:13:25")  # sample time of the window's last reading
    # Availability of outputs is announced, retained.
    assert [m.payload for m in out.on(f"{p}/ei/plug/p1/availability")] == [b"online"]
    # Status went online, then offline at shutdown.
    # (the broker forwards the daemon's last status to this subscriber asynchronously: wait for it)
    out.wait(lambda ms: any(m.topic == f"{p}/ei/status" and m.payload == b"offline" for m in ms), 10)
    assert [m.payload for m in out.on(f"{p}/ei/status")][-1] == b"offline"
    out.close()
    pub.close()


def test_bad_input_is_counted_and_survived(mosquitto: Mosquitto, topic_prefix: str, tmp_path: Path) -> None:
    p = topic_prefix
    data = base_config(mosquitto.url, p, tmp_path)
    data["pipelines"]["room"]["max_devices"] = 2
    data["limits"] = {"max_payload_bytes": 512}
    data["dead_letter"] = {"enabled": True, "max_per_s": 1000}
    cfg = make_config(data, tmp_path)
    out = Collector(mosquitto.url, f"{p}/ei/#")
    pub = Publisher(mosquitto.url)
    good = {"temperature": 21.0, "humidity": 40.0, "co2": 500.0}
    with DaemonThread(cfg) as runner:
        bad: list[tuple[str, Any, str | None]] = [
            (f"{p}/z2m/a", good, None),
            (f"{p}/z2m/a", "{not json", "malformed_json"),
            (f"{p}/z2m/a", {"temperature": 21, "humidity": 40}, "missing_field"),
            (f"{p}/z2m/a", {**good, "co2": "lots"}, "non_numeric"),
            (f"{p}/z2m/a", '{"temperature": NaN, "humidity": 40, "co2": 500}', "not_finite"),
            (f"{p}/z2m/a", '{"temperature": Infinity, "humidity": 40, "co2": 500}', "not_finite"),
            (f"{p}/z2m/a", json.dumps({**good, "pad": "x" * 600}), "oversized"),
            (f"{p}/tele/p1/SENSOR", {"t": 1_700_002_000, "ENERGY": {"Power": 1}}, None),
            (f"{p}/tele/p1/SENSOR", {"t": 1_700_001_000, "ENERGY": {"Power": 1}}, "out_of_order"),
            (f"{p}/z2m/b", good, None),
            (f"{p}/z2m/c", good, "unknown_device"),  # a, b tracked already: c is one too many
        ]
        for topic, payload, _ in bad:
            pub.send(topic, payload)
        pub.send(f"{p}/z2m/a", good)  # a still works after all of that
        out.wait_count(f"{p}/ei/room/a", 2)
        out.wait_count(f"{p}/ei/dead_letter/", sum(1 for *_, r in bad if r))
        stats = runner.call(lambda: {n: pl.stats.as_dict() for n, pl in runner.daemon.pipelines.items()})
    room = stats["room"]["dropped"]
    assert room == {
        "malformed_json": 1,
        "missing_field": 1,
        "non_numeric": 1,
        "not_finite": 2,
        "oversized": 1,
        "unknown_device": 1,
    }
    assert stats["plug"]["dropped"] == {"out_of_order": 1}
    assert out.on(f"{p}/ei/room/c") == []
    letters = [m.json() for m in out.on(f"{p}/ei/dead_letter/room")]
    missing = next(x for x in letters if x["reason"] == "missing_field")
    assert "co2" in missing["detail"] and missing["topic"] == f"{p}/z2m/a"
    out.close()
    pub.close()


def test_reconnects_after_broker_restart(fresh_broker: Mosquitto, topic_prefix: str, tmp_path: Path) -> None:
    p = topic_prefix
    fresh_broker.start()
    cfg = make_config(base_config(fresh_broker.url, p, tmp_path), tmp_path)
    good = {"temperature": 21.0, "humidity": 40.0, "co2": 500.0}
    with DaemonThread(cfg) as runner:
        out = Collector(fresh_broker.url, f"{p}/ei/room/#")
        pub = Publisher(fresh_broker.url)
        pub.send(f"{p}/z2m/k", good)
        out.wait_count(f"{p}/ei/room/k", 1)
        out.close()
        pub.close()
        fresh_broker.stop(kill=True)
        time.sleep(1.5)  # the daemon notices and retries with backoff, without a busy loop
        fresh_broker.start()
        deadline = time.monotonic() + 15
        while not runner.call(lambda: runner.daemon.link.connected.is_set()):
            assert time.monotonic() < deadline, "daemon did not reconnect"
            time.sleep(0.1)
        out = Collector(fresh_broker.url, f"{p}/ei/room/#")
        pub = Publisher(fresh_broker.url)
        pub.send(f"{p}/z2m/k", {**good, "co2": 900.0})
        out.wait_count(f"{p}/ei/room/k", 1)
        reconnects = runner.call(lambda: runner.daemon.link.reconnects)
        out.close()
        pub.close()
    assert reconnects >= 1


def test_tls_and_password_auth(tmp_path: Path, topic_prefix: str) -> None:
    p = topic_prefix
    tls = make_tls(tmp_path / "tls")
    broker = Mosquitto(tmp_path / "mq", users={"edge": "s3cret!", "tester": "t"}, tls=tls).start()
    try:
        (tmp_path / "pw").write_text("s3cret!\n")
        (tmp_path / "pw").chmod(0o600)
        data = base_config(broker.url, p, tmp_path)
        data["mqtt"].update(
            {"username": "edge", "password_file": str(tmp_path / "pw"), "tls": {"ca_file": str(tls.ca)}}
        )
        cfg = make_config(data, tmp_path)
        url = broker.url.replace("mqtts://", "mqtts://tester:t@")
        with DaemonThread(cfg):
            out = Collector(url, f"{p}/ei/#", ca=str(tls.ca))
            pub = Publisher(url, ca=str(tls.ca))
            pub.send(f"{p}/z2m/x", {"temperature": 20, "humidity": 50, "co2": 450})
            out.wait_count(f"{p}/ei/room/x", 1)
            out.close()
            pub.close()
    finally:
        broker.stop()
    assert "as edge" in broker.log() or "u'edge'" in broker.log(), broker.log()[-2000:]


def test_wrong_password_retries_slowly(tmp_path: Path, topic_prefix: str) -> None:
    broker = Mosquitto(tmp_path / "mq", users={"edge": "right"}).start()
    try:
        data = base_config(broker.url, topic_prefix, tmp_path)
        data["mqtt"].update(
            {"username": "edge", "password": "wrong", "reconnect_min_s": 0.5, "reconnect_max_s": 2}
        )
        runner = DaemonThread(make_config(data, tmp_path))
        runner.thread.start()
        time.sleep(4)
        assert runner.thread.is_alive()
        assert runner.daemon is not None
        error = runner.call(lambda: runner.daemon.link.last_error)
        assert error is not None and ("authori" in error.lower() or "password" in error.lower()), error
        runner.stop()
    finally:
        broker.stop()
    attempts = broker.log().count("not authorised")
    assert 2 <= attempts <= 8, f"{attempts} attempts in 4 s: backoff is not working"


def test_subprocess_sigterm_publishes_offline(
    mosquitto: Mosquitto, topic_prefix: str, tmp_path: Path
) -> None:
    p = topic_prefix
    path = write_config(base_config(mosquitto.url, p, tmp_path), tmp_path / "c.yaml")
    out = Collector(mosquitto.url, f"{p}/ei/status", f"{p}/ei/room/#")
    proc = spawn_daemon(path, "--mqtt-url", mosquitto.url)
    try:
        out.wait(lambda m: any(x.payload == b"online" for x in m), timeout=20)
        pub = Publisher(mosquitto.url)
        pub.send(f"{p}/z2m/sub", {"temperature": 20, "humidity": 50, "co2": 450})
        out.wait_count(f"{p}/ei/room/sub", 1)
        pub.close()
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=15)
        elapsed = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
    log = proc.stdout.read() if proc.stdout else ""
    assert code == 0, log
    assert elapsed < 10
    out.wait(lambda m: [x.payload for x in m if x.topic.endswith("/status")][-1:] == [b"offline"])
    # The retained status is offline for anyone who looks later.
    late = Collector(mosquitto.url, f"{p}/ei/status")
    late.wait(lambda m: len(m) >= 1)
    assert late.messages[0].payload == b"offline" and late.messages[0].retain
    late.close()
    out.close()


def test_killed_daemon_leaves_last_will(mosquitto: Mosquitto, topic_prefix: str, tmp_path: Path) -> None:
    p = topic_prefix
    data = base_config(mosquitto.url, p, tmp_path)
    path = write_config(data, tmp_path / "c.yaml")
    out = Collector(mosquitto.url, f"{p}/ei/status")
    proc = spawn_daemon(path, env={"EDGE_INFER_MQTT_URL": mosquitto.url})
    try:
        out.wait(lambda m: any(x.payload == b"online" for x in m), timeout=20)
        proc.kill()
        proc.wait(10)
        # keepalive is 5 s: the broker publishes the will within 1.5 x keepalive.
        out.wait(lambda m: m[-1].payload == b"offline", timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    out.close()


def test_bridge_info_is_retained_with_counters(
    mosquitto: Mosquitto, topic_prefix: str, tmp_path: Path
) -> None:
    p = topic_prefix
    data = base_config(mosquitto.url, p, tmp_path, bridge_info_interval_s=0.5)
    with DaemonThread(make_config(data, tmp_path)):
        pub = Publisher(mosquitto.url)
        pub.send(f"{p}/z2m/k", {"temperature": 20, "humidity": 50, "co2": 450})
        pub.send(f"{p}/z2m/k", "garbage")
        out = Collector(mosquitto.url, f"{p}/ei/bridge/info")

        def counted(msgs: list[Any]) -> bool:
            info = msgs[-1].json() if msgs else {}
            return info.get("pipelines", {}).get("room", {}).get("published") == 1

        msgs = out.wait(counted)
        pub.close()
        out.close()
    info = msgs[-1].json()
    assert info["pipelines"]["room"]["dropped"] == {"malformed_json": 1}
    assert info["models"]["snap"]["version"] == "1.0.0"
    assert len(info["models"]["snap"]["sha256"]) == 64
    assert math.isfinite(info["uptime_s"])


def test_check_prints_plan(tmp_path: Path, topic_prefix: str) -> None:
    path = write_config(base_config("mqtt://127.0.0.1:1", topic_prefix, tmp_path), tmp_path / "c.yaml")
    result = subprocess.run(
        [sys.executable, "-m", "edge.cli", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert f"in:  {topic_prefix}/z2m/+" in result.stdout
    assert f"out: {topic_prefix}/ei/room/{{device}}" in result.stdout
    assert "window [batch, 6, 1]" in result.stdout


def test_a_decoder_bug_is_counted_as_decoder_error_and_other_devices_go_on(
    mosquitto: Mosquitto, topic_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A decoder that raises something other than DecodeError is a bug, not a malformed payload:
    counted as `decoder_error` (was `malformed_json`), and the next device is still answered."""
    from edge.pipeline import Pipeline

    handle = Pipeline.handle

    def buggy(self: Pipeline, topic: str, *args: Any, **kwargs: Any) -> Any:
        if topic.endswith("/z2m/bug"):
            raise KeyError("a decoder bug")
        return handle(self, topic, *args, **kwargs)

    monkeypatch.setattr(Pipeline, "handle", buggy)
    p = topic_prefix
    cfg = make_config(base_config(mosquitto.url, p, tmp_path), tmp_path)
    out = Collector(mosquitto.url, f"{p}/ei/room/+")
    pub = Publisher(mosquitto.url)
    good = {"temperature": 21.0, "humidity": 40.0, "co2": 500.0}
    with DaemonThread(cfg) as runner:
        pub.send(f"{p}/z2m/bug", good)
        pub.send(f"{p}/z2m/fine", good)
        out.wait_count(f"{p}/ei/room/fine", 1)
        dropped = runner.call(lambda: dict(runner.daemon.pipelines["room"].stats.dropped))
    out.close()
    pub.close()
    assert dropped == {"decoder_error": 1}
    assert out.on(f"{p}/ei/room/bug") == []


def test_suppressed_warnings_are_reported_at_shutdown(
    mosquitto: Mosquitto, topic_prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Five malformed payloads in one log interval: one warning, and at shutdown a line saying the
    four others were suppressed (was: the count was lost)."""
    p = topic_prefix
    cfg = make_config(base_config(mosquitto.url, p, tmp_path), tmp_path)
    out = Collector(mosquitto.url, f"{p}/ei/room/+")
    pub = Publisher(mosquitto.url)
    good = {"temperature": 21.0, "humidity": 40.0, "co2": 500.0}
    with caplog.at_level(logging.INFO, logger="edge.daemon"), DaemonThread(cfg):
        for _ in range(5):
            pub.send(f"{p}/z2m/a", "{not json")
        pub.send(f"{p}/z2m/a", good)
        out.wait_count(f"{p}/ei/room/a", 1)
    out.close()
    pub.close()
    dropped = [r for r in caplog.records if r.getMessage().startswith("dropped (malformed_json)")]
    assert len(dropped) == 1
    summary = [r.getMessage() for r in caplog.records if "event(s) were suppressed" in r.getMessage()]
    assert summary == ["4 more room event(s) were suppressed"], summary
