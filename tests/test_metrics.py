"""Metrics: exposition checked by Prometheus' own parser, and the HTTP listener over a real socket."""

from __future__ import annotations

import asyncio
import threading

import pytest

from edge.metrics import (
    CONTENT_TYPE,
    DaemonMetrics,
    MetricsServer,
    Reading,
)

parser = pytest.importorskip("prometheus_client.parser", reason="pip install prometheus-client")


def _families(text: str) -> dict[str, object]:
    return {f.name: f for f in parser.text_string_to_metric_families(text)}


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in parser.text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


BUSY = Reading(
    messages_in={"appliance": 5, "occupancy": 1},
    messages_out={"appliance": 3},
    dropped={("appliance", "decode_error"): 1},
    reconnects=1,
    connected=True,
    queue_depth={"appliance": 7},
)


def _busy_metrics() -> DaemonMetrics:
    m = DaemonMetrics(lambda: BUSY, version="9.9.9")
    m.predictions_failed.labels(model="appliance").inc(0)
    inf = m.inference_seconds.labels(model="appliance")
    for v in (0.0003, 0.0008, 0.001, 0.04, 3.0):
        inf.observe(v)
    m.batch_size.labels(model="appliance").observe(1)
    m.batch_size.labels(model="appliance").observe(17)
    m.set_model_info("appliance", "1.2.0", "ab" * 32)
    return m


def test_daemon_metric_set_parses_with_prometheus() -> None:
    text = _busy_metrics().render()
    fams = _families(text)
    # the parser names counter families without their _total suffix
    types = {name: fam.type for name, fam in fams.items()}  # type: ignore[attr-defined]
    assert types["edge_infer_messages_in"] == "counter"
    assert types["edge_infer_messages_out"] == "counter"
    assert types["edge_infer_dropped"] == "counter"
    assert types["edge_infer_reconnects"] == "counter"
    assert types["edge_infer_predictions_failed"] == "counter"
    assert types["edge_infer_reloads"] == "counter"
    assert types["edge_infer_inference_seconds"] == "histogram"
    assert types["edge_infer_batch_size"] == "histogram"
    assert types["edge_infer_queue_depth"] == "gauge"
    assert types["edge_infer_model_info"] == "gauge"
    assert types["edge_infer_broker_connected"] == "gauge"
    assert types["edge_infer_start_time_seconds"] == "gauge"

    s = _samples(text)
    assert s[("edge_infer_messages_in_total", (("pipeline", "appliance"),))] == 5
    assert s[("edge_infer_messages_in_total", (("pipeline", "occupancy"),))] == 1
    assert s[("edge_infer_messages_out_total", (("pipeline", "appliance"),))] == 3
    assert s[("edge_infer_dropped_total", (("pipeline", "appliance"), ("reason", "decode_error")))] == 1
    assert s[("edge_infer_queue_depth", (("model", "appliance"),))] == 7
    assert (
        s[("edge_infer_model_info", (("model", "appliance"), ("sha256", "ab" * 32), ("version", "1.2.0")))]
        == 1
    )
    assert s[("edge_infer_broker_connected", ())] == 1
    assert s[("edge_infer_reconnects_total", ())] == 1
    assert s[("edge_infer_build_info", (("version", "9.9.9"),))] == 1
    assert s[("edge_infer_predictions_failed_total", (("model", "appliance"),))] == 0
    assert not [name for name, _ in s if name.endswith("_created")], "no _created series"

    def bucket(le: str) -> float:
        return s[("edge_infer_inference_seconds_bucket", (("le", le), ("model", "appliance")))]

    assert bucket("0.00025") == 0
    assert bucket("0.0005") == 1
    assert bucket("0.001") == 3, "le is inclusive: 0.001 lands in le=0.001"
    assert bucket("0.05") == 4
    assert bucket("1.0") == 4
    assert bucket("+Inf") == 5
    assert s[("edge_infer_inference_seconds_count", (("model", "appliance"),))] == 5
    assert s[("edge_infer_inference_seconds_sum", (("model", "appliance"),))] == pytest.approx(3.0421)
    assert s[("edge_infer_batch_size_bucket", (("le", "16.0"), ("model", "appliance")))] == 1
    assert s[("edge_infer_batch_size_bucket", (("le", "32.0"), ("model", "appliance")))] == 2


def test_counters_are_read_when_scraped() -> None:
    """The hot-path counters are the daemon's own integers, read by the collector at scrape time."""
    counts = {"p": 0}
    m = DaemonMetrics(lambda: Reading(messages_in=dict(counts), connected=False))
    assert _samples(m.render())[("edge_infer_messages_in_total", (("pipeline", "p"),))] == 0
    counts["p"] = 12_345
    s = _samples(m.render())
    assert s[("edge_infer_messages_in_total", (("pipeline", "p"),))] == 12_345
    assert s[("edge_infer_broker_connected", ())] == 0


def test_hostile_label_values_are_escaped() -> None:
    name = 'C:\\dir\n"quoted"'
    m = DaemonMetrics(lambda: Reading(messages_in={name: 2}, dropped={(name, "stale"): 1}))
    fams = {f.name: f for f in parser.text_string_to_metric_families(m.render())}
    assert fams["edge_infer_messages_in"].samples[0].labels == {"pipeline": name}
    assert fams["edge_infer_dropped"].samples[0].labels == {"pipeline": name, "reason": "stale"}


def test_registries_are_per_daemon() -> None:
    """Two daemons in one process (the tests, the bench) never share or collide on series."""
    a, b = DaemonMetrics(), DaemonMetrics()
    a.reloads.labels(result="ok").inc()
    assert _samples(a.render())[("edge_infer_reloads_total", (("result", "ok"),))] == 1
    assert ("edge_infer_reloads_total", (("result", "ok"),)) not in _samples(b.render())


def test_reload_replaces_model_info_and_forget_model() -> None:
    m = DaemonMetrics()
    m.set_model_info("appliance", "1.0.0", "aa")
    m.set_model_info("appliance", "1.1.0", "bb")
    m.inference_seconds.labels(model="appliance").observe(0.001)
    m.predictions_failed.labels(model="appliance").inc()
    info = [s for s in _samples(m.render()) if s[0] == "edge_infer_model_info"]
    assert info == [
        ("edge_infer_model_info", (("model", "appliance"), ("sha256", "bb"), ("version", "1.1.0")))
    ]
    m.forget_model("appliance")
    m.forget_model("never-loaded")
    text = m.render()
    assert 'model="appliance"' not in text


def test_observations_from_threads_are_not_lost() -> None:
    m = DaemonMetrics()
    hist = m.batch_size.labels(model="m")
    failed = m.predictions_failed.labels(model="m")

    def work() -> None:
        for _ in range(20_000):
            hist.observe(2)
            failed.inc()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = _samples(m.render())
    assert s[("edge_infer_batch_size_count", (("model", "m"),))] == 80_000
    assert s[("edge_infer_predictions_failed_total", (("model", "m"),))] == 80_000


# ---------------------------------------------------------------------------- HTTP


async def _request(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
    return status, headers, body


async def _get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    return await _request(port, f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())


def test_http_metrics_and_healthz_on_a_free_port() -> None:
    m = _busy_metrics()
    healthy = {"ok": True, "reason": "ok"}

    def health() -> tuple[bool, str]:
        return bool(healthy["ok"]), str(healthy["reason"])

    async def scenario() -> None:
        async with MetricsServer(m.render, health, port=0) as server:
            assert server.host == "127.0.0.1"
            assert server.port > 0
            status, headers, body = await _get(server.port, "/metrics")
            assert status == 200
            assert headers["content-type"] == CONTENT_TYPE
            assert int(headers["content-length"]) == len(body)
            fams = _families(body.decode())
            assert "edge_infer_inference_seconds" in fams

            status, _, body = await _get(server.port, "/healthz")
            assert (status, body) == (200, b"ok\n")
            healthy.update(ok=False, reason="broker disconnected\nsince 12s")
            status, _, body = await _get(server.port, "/healthz?verbose=1")
            assert (status, body) == (503, b"broker disconnected since 12s\n")

            status, _, _ = await _get(server.port, "/")
            assert status == 404
            status, _, _ = await _get(server.port, "/metrics/../etc/passwd")
            assert status == 404
            status, _, _ = await _request(server.port, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
            assert status == 405
            status, headers, body = await _request(server.port, b"HEAD /metrics HTTP/1.1\r\n\r\n")
            assert status == 200
            assert body == b""
            assert int(headers["content-length"]) > 0

            # robustness: garbage, a request line without the blank line, oversized headers
            status, _, _ = await _request(server.port, b"\x00\xff garbage\r\n\r\n")
            assert status == 400
            status, _, _ = await _request(server.port, b"GET /metrics SPDY/9\r\n\r\n")
            assert status == 400
            status, _, _ = await _request(server.port, b"GET /x" + b"a" * 20_000 + b" HTTP/1.1\r\n\r\n")
            assert status == 400
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"GET /healthz HTTP/1.1\r\n")
            writer.write_eof()
            data = await asyncio.wait_for(reader.read(), 5)
            assert data.startswith(b"HTTP/1.1 503"), "a half request that ends is still answered"
            writer.close()
            # still serving after all that
            status, _, _ = await _get(server.port, "/metrics")
            assert status == 200

    asyncio.run(scenario())


def test_http_slow_client_is_cut_off_and_health_exceptions_are_503() -> None:
    def broken() -> tuple[bool, str]:
        raise RuntimeError("boom")

    async def scenario() -> None:
        server = MetricsServer(lambda: "", broken, port=0, timeout=0.3)
        await server.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"GET /metr")  # and then nothing
            data = await asyncio.wait_for(reader.read(), 5)
            assert data == b"", "the connection is closed without an answer"
            writer.close()
            status, _, body = await _get(server.port, "/healthz")
            assert status == 503
            assert b"boom" in body
        finally:
            await server.close()

    asyncio.run(scenario())


def test_serve_forever_is_cancellable() -> None:
    async def scenario() -> None:
        server = MetricsServer(lambda: "", lambda: (True, "ok"), port=0)
        task = asyncio.create_task(server.serve_forever())
        for _ in range(100):
            await asyncio.sleep(0.01)
            if server.port:
                break
        status, _, _ = await _get(server.port, "/healthz")
        assert status == 200
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
