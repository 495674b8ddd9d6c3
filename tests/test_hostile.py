"""Hostile input against a real Mosquitto: one device's bad payload is counted under its reason and
acknowledged, and good devices of the same model keep being answered, also after a restart."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from tests.broker import Mosquitto
from tests.harness import Collector, DaemonThread, Publisher, make_config
from tests.test_daemon import base_config

pytestmark = pytest.mark.broker

MAX = 1 << 20
GOOD = {"temperature": 21.0, "humidity": 40.0, "co2": 500.0}


def _strict(payload: bytes) -> Any:
    def refuse(name: str) -> None:
        raise AssertionError(f"{name} in a published payload: {payload[:200]!r}")

    return json.loads(payload, parse_constant=refuse)


def _answers(out: Collector, prefix: str, pipeline: str) -> dict[str, int]:
    """Answers per output topic leaf (availability topics left out)."""
    root = f"{prefix}/ei/{pipeline}/"
    counts: dict[str, int] = {}
    for m in out.messages:
        leaf = m.topic[len(root) :] if m.topic.startswith(root) else None
        if leaf and "/" not in leaf:
            _strict(m.payload)
            counts[leaf] = counts.get(leaf, 0) + 1
    return counts


def _send_window(pub: Publisher, prefix: str, device: str, start: float, n: int) -> None:
    for i in range(n):
        pub.send(f"{prefix}/tele/{device}/SENSOR", {"ENERGY": {"Power": 50.0 + i}, "t": start + i})


@pytest.mark.parametrize(
    "times",
    [
        [1e15 + i * 1e4 for i in range(8)],  # milliseconds far in the future (year 33658)
        [-1e11 + i for i in range(8)],  # before year 1
        [f"9999-12-31T12:00:0{i}-12:00" for i in range(8)],  # after 9999-12-31 in UTC
    ],
    ids=["ms_1e15", "s_-1e11", "iso_9999"],
)
def test_a_hostile_timestamp_is_dropped_and_never_silences_the_model(
    mosquitto: Mosquitto, topic_prefix: str, tmp_path: Path, times: list[Any]
) -> None:
    p = topic_prefix
    data = base_config(mosquitto.url, p, tmp_path)
    out = Collector(mosquitto.url, f"{p}/ei/#")
    pub = Publisher(mosquitto.url)
    now = time.time()
    with DaemonThread(make_config(data, tmp_path)) as runner:
        for t in times:  # a full window of them: the device would be answered if they were taken
            pub.send(f"{p}/tele/evil/SENSOR", {"ENERGY": {"Power": 5.0}, "t": t})
        for d in range(4):
            _send_window(pub, p, f"good{d}", now - 100, 8)  # 8 samples, hop 2: 2 answers each
        out.wait(lambda _m: sum(_answers(out, p, "plug").values()) >= 8, timeout=30)
        dropped = runner.call(lambda: dict(runner.daemon.pipelines["plug"].stats.dropped))
    answers = _answers(out, p, "plug")
    assert answers == {f"good{d}": 2 for d in range(4)}, answers
    assert dropped.get("bad_timestamp") == len(times), dropped
    # Restarted on the same persistent session: the hostile inputs were acknowledged, so the broker
    # does not bring them back, and good devices keep being answered.
    out.messages.clear()
    with DaemonThread(make_config(data, tmp_path)) as runner:
        for d in range(4):
            _send_window(pub, p, f"again{d}", now - 50, 8)
        out.wait(lambda _m: sum(_answers(out, p, "plug").values()) >= 8, timeout=30)
        dropped = runner.call(lambda: dict(runner.daemon.pipelines["plug"].stats.dropped))
    pub.close()
    out.close()
    assert _answers(out, p, "plug") == {f"again{d}": 2 for d in range(4)}
    assert "bad_timestamp" not in dropped, dropped  # nothing redelivered


def test_a_value_infinite_as_float32_is_not_finite_and_answers_stay_strict_json(
    mosquitto: Mosquitto, topic_prefix: str, tmp_path: Path
) -> None:
    p = topic_prefix
    data = base_config(mosquitto.url, p, tmp_path)
    out = Collector(mosquitto.url, f"{p}/ei/#")
    pub = Publisher(mosquitto.url)
    with DaemonThread(make_config(data, tmp_path)) as runner:
        pub.send(f"{p}/z2m/evil", b'{"temperature": 1e39, "humidity": 40, "co2": 500}')
        pub.send(f"{p}/z2m/evil2", b'{"temperature": 21, "humidity": -1e39, "co2": 500}')
        for d in range(5):
            pub.send(f"{p}/z2m/good{d}", GOOD)
        out.wait(lambda _m: len(_answers(out, p, "room")) >= 5, timeout=20)
        dropped = runner.call(lambda: dict(runner.daemon.pipelines["room"].stats.dropped))
    pub.close()
    out.close()
    assert set(_answers(out, p, "room")) == {f"good{d}" for d in range(5)}
    assert dropped.get("not_finite") == 2, dropped
    for m in out.messages:  # every payload on the daemon's topics is strict JSON or online/offline
        if m.payload not in (b"online", b"offline", b""):
            _strict(m.payload)


def test_device_ids_map_to_distinct_topics_and_forbidden_ones_are_rejected(
    mosquitto: Mosquitto, topic_prefix: str, tmp_path: Path
) -> None:
    p = topic_prefix
    data = base_config(mosquitto.url, p, tmp_path)
    data["pipelines"]["byid"] = {
        "model": "snap",
        "source": {"topics": [f"{p}/json/in"], "device_field": "id"},
        "features": {"type": "snapshot", "max_age_s": 60},
    }
    safe = ["kitchen_plug", "kitchen/plug", "kitchen+plug", "kitchen#plug", "$SYS", "émoji🙂"]
    forbidden = [
        "bad\x85c1",
        "bad\ufdd0",
        "bad\uffff",
        "bad\U0010ffff",
        "bad\x00nul",
        "bad\x1besc",
        "bad\ud800lone",
    ]
    out = Collector(mosquitto.url, f"{p}/ei/#")
    pub = Publisher(mosquitto.url)
    with DaemonThread(make_config(data, tmp_path)) as runner:
        for device in forbidden:
            pub.send(f"{p}/json/in", json.dumps({"id": device, **GOOD}))  # json escapes: \u0085 ...
        for device in safe:
            pub.send(f"{p}/json/in", json.dumps({"id": device, **GOOD}))
        out.wait(lambda _m: len(_answers(out, p, "byid")) >= len(safe), timeout=20)
        dropped = runner.call(lambda: dict(runner.daemon.pipelines["byid"].stats.dropped))
        reconnects = runner.call(lambda: runner.daemon.link.reconnects)
    pub.close()
    out.close()
    leaves = _answers(out, p, "byid")
    assert len(leaves) == len(safe), leaves  # one topic each: no device speaks as another
    assert "kitchen_plug" in leaves and "émoji🙂" in leaves  # ids that need no change keep it
    mapped = [leaf for leaf in leaves if leaf not in ("kitchen_plug", "émoji🙂")]
    assert all(re.fullmatch(r"[^/+#$]+~[0-9a-f]{8}", leaf) for leaf in mapped), mapped
    assert dropped.get("bad_device_id") == len(forbidden), dropped
    assert reconnects == 0  # the broker never saw a malformed topic


def test_an_item_that_cannot_be_answered_fails_alone_and_is_acknowledged(
    mosquitto: Mosquitto, topic_prefix: str, tmp_path: Path
) -> None:
    """With the timestamp window opened wide, a sample time of year 33658 passes decoding but no
    answer can carry it: that item alone is counted (answer_failed) and acknowledged, the batcher
    keeps answering the model's other devices, and a restart brings nothing back."""
    p = topic_prefix
    data = base_config(mosquitto.url, p, tmp_path, limits={"max_clock_skew_s": 1e13})
    out = Collector(mosquitto.url, f"{p}/ei/#")
    pub = Publisher(mosquitto.url)
    now = time.time()
    for round_ in range(2):
        with DaemonThread(make_config(data, tmp_path)) as runner:
            if round_ == 0:
                _send_window(pub, p, "evil", 1e15, 8)  # ms: year 33658; two full windows, two items
            for d in range(3):
                _send_window(pub, p, f"good{round_}{d}", now - 100, 8)
            want = 6 * (round_ + 1)
            out.wait(lambda _m, want=want: sum(_answers(out, p, "plug").values()) >= want, timeout=30)
            dropped = runner.call(lambda: dict(runner.daemon.pipelines["plug"].stats.dropped))
        assert dropped.get("answer_failed", 0) == (2 if round_ == 0 else 0), dropped
    pub.close()
    out.close()
    assert _answers(out, p, "plug") == {f"good{r}{d}": 2 for r in range(2) for d in range(3)}


def test_bounded_json_refuses_size_depth_digits_and_constants_as_one_error() -> None:
    from edge.safejson import BoundedJsonError, loads_bounded, nesting_depth

    assert loads_bounded(b'{"a": [1, {"b": "[[[["}], "n": -12}') == {"a": [1, {"b": "[[[["}], "n": -12}
    assert nesting_depth(b'[[{"x": "]]]]"}]]') == 3
    hostile = [
        b"[" * 100_000 + b"]" * 100_000,  # RecursionError in json.loads
        b"1" * 5000,  # ValueError: int max str digits
        b'{"a": ' + b"9" * 65 + b"}",
        b'{"a": NaN}',
        b"[Infinity]",
        b" " * (MAX + 1),
        b"\xff\xfe",
        b'{"a": 1',
    ]
    for payload in hostile:
        with pytest.raises(BoundedJsonError):
            loads_bounded(payload, max_bytes=MAX)
    assert loads_bounded(b"[" * 64 + b"]" * 64) is not None  # the default depth itself is fine


def test_healthz_answers_while_idle_clients_hold_every_connection() -> None:
    """16 clients connect and send nothing (the cap is 16): each of 8 probes still gets its 200."""
    import asyncio

    from edge.metrics import MetricsServer

    async def main() -> tuple[list[bytes], int]:
        server = MetricsServer(lambda: "", lambda: (True, "ok"), "127.0.0.1", 0, timeout=30.0)
        await server.start()
        idle = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(16)]
        await asyncio.sleep(0.2)  # all 16 accepted and waiting for a request
        answers = []
        for _ in range(8):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            answers.append(await asyncio.wait_for(reader.read(), 10))
            writer.close()
        evicted = server.evicted
        for _, w in idle:
            w.close()
        await server.close()
        return answers, evicted

    answers, evicted = asyncio.run(main())
    assert all(a.startswith(b"HTTP/1.1 200") and a.endswith(b"ok\n") for a in answers), answers
    assert evicted == 1  # the oldest idle connection made room; the probes then share its slot


def test_max_window_bytes_drops_and_counts_devices_beyond_it(
    mosquitto: Mosquitto, topic_prefix: str, tmp_path: Path
) -> None:
    """limits.max_window_bytes=1024 and windows of 6 float32 samples x 2 (48 bytes): 21 devices fit;
    the 9 beyond are dropped and counted (unknown_device), the 21 answered."""
    p = topic_prefix
    data = base_config(mosquitto.url, p, tmp_path, limits={"max_window_bytes": 1024})
    out = Collector(mosquitto.url, f"{p}/ei/#")
    pub = Publisher(mosquitto.url)
    now = time.time()
    with DaemonThread(make_config(data, tmp_path)) as runner:
        for d in range(30):
            _send_window(pub, p, f"d{d:02}", now - 100, 8)
        out.wait(lambda _m: sum(_answers(out, p, "plug").values()) >= 42, timeout=30)
        # The answers can arrive before the last device's messages are taken in: wait for all 240.
        deadline = time.monotonic() + 30
        while runner.call(lambda: runner.daemon.pipelines["plug"].stats.received) < 30 * 8:
            assert time.monotonic() < deadline, "not every message was taken in"
            time.sleep(0.05)
        dropped, held = runner.call(
            lambda: (
                dict(runner.daemon.pipelines["plug"].stats.dropped),
                sum(pl.store.nbytes() for pl in runner.daemon.pipelines.values()),
            )
        )
    pub.close()
    out.close()
    assert _answers(out, p, "plug") == {f"d{d:02}": 2 for d in range(21)}
    assert dropped == {"unknown_device": 9 * 8}, dropped
    assert held <= 1024, held


def test_shelly_status_overlay_is_bounded_by_max_devices(
    mosquitto: Mosquitto, topic_prefix: str, tmp_path: Path
) -> None:
    """A Shelly source with max_devices 5 and statuses of 40 devices (each with a component no
    reading needs): the profile keeps the status of 5 devices and only the needed component,
    the rest is counted (unknown_device), and the 5 are answered."""
    p = topic_prefix
    data = base_config(mosquitto.url, p, tmp_path)
    data["pipelines"] = {
        "shelly": {
            "model": "snap",
            "source": {"profile": "shelly"},
            "inputs": {"temperature": "power", "humidity": "voltage", "co2": "current"},
            "features": {"type": "snapshot", "max_age_s": 60},
            "max_devices": 5,
        }
    }
    out = Collector(mosquitto.url, f"{p}/ei/#")
    pub = Publisher(mosquitto.url)
    status = {"id": 0, "apower": 12.5, "voltage": 230.1, "current": 0.06, "output": True}
    with DaemonThread(make_config(data, tmp_path)) as runner:
        for d in range(40):
            device = f"{p}-plug{d:02}"
            pub.send(f"{device}/status/sys", {"uptime": d, "padding": "x" * 2000})  # not kept
            pub.send(f"{device}/status/switch:0", status)
        out.wait(lambda _m: len(_answers(out, p, "shelly")) >= 5, timeout=30)
        kept, dropped = runner.call(
            lambda: (
                runner.daemon.pipelines["shelly"].decoder.held_status(),
                dict(runner.daemon.pipelines["shelly"].stats.dropped),
            )
        )
    pub.close()
    out.close()
    assert sorted(_answers(out, p, "shelly")) == [f"{p}-plug{d:02}" for d in range(5)]
    assert kept == {f"{p}-plug{d:02}": ["switch:0"] for d in range(5)}, kept
    assert dropped == {"unknown_device": 35}, dropped


def test_the_broker_never_sends_a_payload_far_beyond_max_payload_bytes(
    mosquitto: Mosquitto, topic_prefix: str, tmp_path: Path
) -> None:
    """MQTT 5 CONNECT Maximum Packet Size from limits.max_payload_bytes: Mosquitto drops a 4 MB
    PUBLISH for the daemon instead of sending it; one just above the limit still arrives and is
    counted as oversized; good devices are answered."""
    p = topic_prefix
    data = base_config(mosquitto.url, p, tmp_path, limits={"max_payload_bytes": 4096})
    out = Collector(mosquitto.url, f"{p}/ei/#")
    pub = Publisher(mosquitto.url)
    with DaemonThread(make_config(data, tmp_path)) as runner:
        before = runner.call(lambda: runner.daemon.messages_in)
        pub.send(f"{p}/z2m/huge", b'{"temperature": 1, "pad": "' + b"x" * 4_000_000 + b'"}')
        pub.send(f"{p}/z2m/big", b'{"temperature": 1, "pad": "' + b"x" * 8_000 + b'"}')
        pub.send(f"{p}/z2m/good", GOOD)
        out.wait(lambda _m: "good" in _answers(out, p, "room"), timeout=20)
        seen, dropped = runner.call(
            lambda: (runner.daemon.messages_in - before, dict(runner.daemon.pipelines["room"].stats.dropped))
        )
    pub.close()
    out.close()
    assert seen == 2  # 'big' and 'good': 'huge' never came over the socket
    assert dropped == {"oversized": 1}, dropped
