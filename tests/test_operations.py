"""Operations against a real Mosquitto: reload under load, refused broken models, sd_notify, /metrics."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.broker import Mosquitto, free_port
from tests.harness import Collector, DaemonThread, Publisher, make_config, write_config
from tests.onnx_models import snapshot_classifier

pytestmark = pytest.mark.broker

FEATURES = ["temperature", "humidity"]


def _config(url: str, prefix: str, tmp_path: Path, **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "mqtt": {"url": url, "base_topic": f"{prefix}/ei", "client_id": f"ei-{prefix}"},
        "models": {"m": {"path": "model.onnx"}},
        "pipelines": {
            "room": {"model": "m", "source": {"topics": [f"{prefix}/in/{{device}}"]}, "max_devices": 100_000}
        },
        "homeassistant": {"enabled": False},
        "reload": {"interval_s": 0.2},
    }
    data.update(extra)
    return data


def _refused_reloads(runner: DaemonThread) -> Any:
    def read() -> float:
        value = runner.daemon.metrics.registry.get_sample_value(  # type: ignore[union-attr]
            "edge_infer_reloads_total", {"result": "refused"}
        )
        return value or 0.0

    return read


def _replace_atomically(src: Path, dst: Path) -> None:
    tmp = dst.with_suffix(".tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def test_model_swap_under_load_answers_every_input_once(
    mosquitto: Mosquitto, topic_prefix: str, tmp_path: Path
) -> None:
    p = topic_prefix
    model = tmp_path / "model.onnx"
    snapshot_classifier(model, FEATURES, ["a", "b"], name="m")
    v2 = tmp_path / "v2" / "model.onnx"
    snapshot_classifier(v2, FEATURES, ["a", "b"], seed=7, name="m")
    # A second version: same input, its manifest says 2.0.0.
    import onnx

    proto = onnx.load(str(v2))
    for prop in proto.metadata_props:
        if prop.key == "edge_infer.manifest":
            prop.value = prop.value.replace('"version": "1.0.0"', '"version": "2.0.0"')
    onnx.save(proto, str(v2))
    cfg = make_config(_config(mosquitto.url, p, tmp_path), tmp_path)
    out = Collector(mosquitto.url, f"{p}/ei/room/+")
    total = 600
    with DaemonThread(cfg) as runner:
        pub = Publisher(mosquitto.url)

        def send() -> None:
            for i in range(total):
                pub.client.publish(f"{p}/in/d{i}", f'{{"temperature": {i % 30}, "humidity": 50}}', qos=1)
                time.sleep(0.004)

        sender = threading.Thread(target=send)
        sender.start()
        time.sleep(0.8)
        _replace_atomically(v2, model)
        sender.join()
        out.wait_count(f"{p}/ei/room/", total, timeout=30)
        reloads = runner.call(lambda: runner.daemon.reloads)
        time.sleep(0.5)
        pub.close()
    answered: dict[str, int] = {}
    versions = []
    for message in out.messages:
        answered[message.topic] = answered.get(message.topic, 0) + 1
        versions.append(message.json()["model_version"])
    assert len(answered) == total and set(answered.values()) == {1}
    assert reloads == 1
    assert versions[0] == "1.0.0" and versions[-1] == "2.0.0"
    # Once the new model answers, the old never does again (one atomic switch).
    first_new = versions.index("2.0.0")
    assert set(versions[first_new:]) == {"2.0.0"}
    out.close()


def test_broken_model_or_config_is_refused_and_old_keeps_answering(
    mosquitto: Mosquitto, topic_prefix: str, tmp_path: Path
) -> None:
    p = topic_prefix
    model = tmp_path / "model.onnx"
    snapshot_classifier(model, FEATURES, ["a", "b"], name="m")
    path = write_config(_config(mosquitto.url, p, tmp_path), tmp_path / "c.yaml")
    cfg = make_config(_config(mosquitto.url, p, tmp_path), tmp_path)
    out = Collector(mosquitto.url, f"{p}/ei/room/+")
    pub = Publisher(mosquitto.url)
    runner = DaemonThread(cfg)
    runner.start()
    try:
        runner.daemon.config_path = path  # type: ignore[union-attr]
        broken = tmp_path / "broken.onnx"
        broken.write_bytes(b"this is not an onnx model")
        _replace_atomically(broken, model)
        deadline = time.monotonic() + 10
        while runner.call(_refused_reloads(runner)) < 1:
            assert time.monotonic() < deadline, "broken model was not noticed"
            time.sleep(0.1)
        pub.send(f"{p}/in/x", {"temperature": 20, "humidity": 40})
        out.wait_count(f"{p}/ei/room/x", 1)
        # A broken config on SIGHUP-style reload is refused too.
        path.write_text("models: {m: {path: model.onnx}}\npipelines: {room: {model: nope}}\n")
        import asyncio

        ok = asyncio.run_coroutine_threadsafe(runner.daemon.reload("test"), runner.loop).result(20)  # type: ignore[union-attr]
        assert ok is False
        pub.send(f"{p}/in/y", {"temperature": 20, "humidity": 40})
        out.wait_count(f"{p}/ei/room/y", 1)
    finally:
        runner.stop()
        pub.close()
        out.close()


def _notify_socket(tmp_path: Path) -> tuple[socket.socket, str]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    sock.bind(path)
    sock.settimeout(0.2)
    return sock, path


def test_sd_notify_lifecycle_and_watchdog(
    mosquitto: Mosquitto, topic_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    snapshot_classifier(tmp_path / "model.onnx", FEATURES, ["a", "b"], name="m")
    sock, path = _notify_socket(tmp_path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "400000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    cfg = make_config(_config(mosquitto.url, topic_prefix, tmp_path, status_interval_s=0.3), tmp_path)
    received: list[str] = []

    def drain(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            with contextlib.suppress(TimeoutError):
                received.append(sock.recv(4096).decode())

    runner = DaemonThread(cfg).start()
    drain(1.5)
    import asyncio

    assert asyncio.run_coroutine_threadsafe(runner.daemon.reload("test"), runner.loop).result(20)  # type: ignore[union-attr]
    drain(0.5)
    runner.stop()
    drain(0.3)
    sock.close()
    text = "\n".join(received)
    ready = next(i for i, m in enumerate(received) if "READY=1" in m)
    assert "STATUS=1 model, 1 pipeline" in text
    assert text.count("WATCHDOG=1") >= 4  # every 0.2 s for 1.5 s
    reloading = next(i for i, m in enumerate(received) if "RELOADING=1" in m)
    assert ready < reloading
    assert "MONOTONIC_USEC=" in received[reloading]
    assert any("READY=1" in m for m in received[reloading + 1 :])
    assert "STOPPING=1" in received[-1] or any("STOPPING=1" in m for m in received[-3:])


def test_metrics_endpoint_parses_and_counts(mosquitto: Mosquitto, topic_prefix: str, tmp_path: Path) -> None:
    p = topic_prefix
    snapshot_classifier(tmp_path / "model.onnx", FEATURES, ["a", "b"], name="m")
    port = free_port()
    cfg = make_config(_config(mosquitto.url, p, tmp_path, metrics={"enabled": True, "port": port}), tmp_path)
    with DaemonThread(cfg):
        out = Collector(mosquitto.url, f"{p}/ei/room/+")
        pub = Publisher(mosquitto.url)
        for i in range(5):
            pub.send(f"{p}/in/d{i}", {"temperature": 20, "humidity": 40})
        pub.send(f"{p}/in/d0", "garbage")
        out.wait_count(f"{p}/ei/room/", 5)
        time.sleep(0.2)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        health = urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)
        assert health.status == 200
        pub.close()
        out.close()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }
    assert samples[("edge_infer_messages_in_total", (("pipeline", "room"),))] == 6
    assert samples[("edge_infer_messages_out_total", (("pipeline", "room"),))] == 5
    assert samples[("edge_infer_dropped_total", (("pipeline", "room"), ("reason", "malformed_json")))] == 1
    assert samples[("edge_infer_broker_connected", ())] == 1
    assert samples[("edge_infer_batch_size_count", (("model", "m"),))] >= 1


def test_a_stalled_inference_stops_the_watchdog_pings(
    mosquitto: Mosquitto, topic_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An inference call that hangs (a wedged GPU driver, a deadlocked provider) must make systemd
    restart the service: the daemon stops its WATCHDOG=1 pings once the call has run longer than
    watchdog_stall_s, and resumes them when the call returns."""
    p = topic_prefix
    snapshot_classifier(tmp_path / "model.onnx", FEATURES, ["a", "b"], name="m")
    sock, path = _notify_socket(tmp_path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # pings every 0.2 s
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    cfg = make_config(_config(mosquitto.url, p, tmp_path, watchdog_stall_s=0.5), tmp_path)
    pings: list[float] = []

    def drain(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            with contextlib.suppress(TimeoutError):
                if "WATCHDOG=1" in sock.recv(4096).decode():
                    pings.append(time.monotonic())

    release = threading.Event()
    runner = DaemonThread(cfg).start()
    model = runner.daemon.models["m"]  # type: ignore[union-attr]

    class HangingSession:  # the real session behind a call that blocks until released
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def run(self, *args: Any, **kwargs: Any) -> Any:
            release.wait(30)
            return self.inner.run(*args, **kwargs)

    model.session = HangingSession(model.session)  # type: ignore[assignment]
    out = Collector(mosquitto.url, f"{p}/ei/room/+")
    pub = Publisher(mosquitto.url)
    try:
        drain(1.0)
        pub.send(f"{p}/in/a", {"temperature": 20, "humidity": 50})
        hung_at = time.monotonic()
        drain(2.0)
        release.set()
        resumed_at = time.monotonic()
        out.wait_count(f"{p}/ei/room/a", 1)
        drain(1.0)
    finally:
        release.set()
        runner.stop()
        sock.close()
        pub.close()
        out.close()
    before = [t for t in pings if t < hung_at]
    silent = [t for t in pings if hung_at + 0.5 + 0.3 < t < resumed_at]
    after = [t for t in pings if t > resumed_at]
    assert len(before) >= 3, pings
    assert silent == [], f"pings went on {len(silent)} times while inference hung"
    assert len(after) >= 2, "pings did not resume after the call returned"
