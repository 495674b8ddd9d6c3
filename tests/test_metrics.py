"""Metrics: exposition checked by Prometheus' own parser, and the HTTP listener over a real socket."""

from __future__ import annotations

import asyncio
import json
import math
import threading

import pytest

from edge.metrics import (
    CONTENT_TYPE,
    DaemonMetrics,
    MetricsServer,
    Registry,
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


def _busy_metrics() -> DaemonMetrics:
    m = DaemonMetrics(version="9.9.9")
    m.messages_in.labels(pipeline="appliance").inc()
    m.messages_in.labels(pipeline="appliance").inc(4)
    m.messages_in.labels(pipeline="occupancy").inc()
    m.messages_out.labels(pipeline="appliance").inc(3)
    m.dropped.labels(pipeline="appliance", reason="decode_error").inc()
    m.predictions_failed.labels(model="appliance").inc(0)
    inf = m.inference_seconds.labels(model="appliance")
    for v in (0.0003, 0.0008, 0.001, 0.04, 3.0):
        inf.observe(v)
    m.batch_size.labels(model="appliance").observe(1)
    m.batch_size.labels(model="appliance").observe(17)
    m.queue_depth.labels(model="appliance").set(7)
    m.set_model_info("appliance", "1.2.0", "ab" * 32)
    m.broker_connected.set(1)
    m.reconnects.inc()
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
    assert types["edge_infer_inference_seconds"] == "histogram"
    assert types["edge_infer_batch_size"] == "histogram"
    assert types["edge_infer_queue_depth"] == "gauge"
    assert types["edge_infer_model_info"] == "gauge"
    assert types["edge_infer_broker_connected"] == "gauge"

    s = _samples(text)
    assert s[("edge_infer_messages_in_total", (("pipeline", "appliance"),))] == 5
    assert s[("edge_infer_messages_in_total", (("pipeline", "occupancy"),))] == 1
    assert s[("edge_infer_dropped_total", (("pipeline", "appliance"), ("reason", "decode_error")))] == 1
    assert s[("edge_infer_queue_depth", (("model", "appliance"),))] == 7
    assert (
        s[("edge_infer_model_info", (("model", "appliance"), ("sha256", "ab" * 32), ("version", "1.2.0")))]
        == 1
    )
    assert s[("edge_infer_broker_connected", ())] == 1
    assert s[("edge_infer_reconnects_total", ())] == 1
    assert s[("edge_infer_build_info", (("version", "9.9.9"),))] == 1

    def bucket(le: str) -> float:
        return s[("edge_infer_inference_seconds_bucket", (("le", le), ("model", "appliance")))]

    assert bucket("0.00025") == 0
    assert bucket("0.0005") == 1
    assert bucket("0.001") == 3, "le is inclusive: 0.001 lands in le=0.001"
    assert bucket("0.05") == 4
    assert bucket("1") == 4
    assert bucket("+Inf") == 5
    assert s[("edge_infer_inference_seconds_count", (("model", "appliance"),))] == 5
    assert s[("edge_infer_inference_seconds_sum", (("model", "appliance"),))] == pytest.approx(3.0421)
    assert s[("edge_infer_batch_size_bucket", (("le", "16"), ("model", "appliance")))] == 1
    assert s[("edge_infer_batch_size_bucket", (("le", "32"), ("model", "appliance")))] == 2


def test_help_type_lines_and_escaping() -> None:
    r = Registry()
    c = r.counter("x_total", 'Help with a backslash \\ and\na newline and "quotes".', ["path"])
    c.labels(path='C:\\dir\n"quoted"').inc()
    g = r.gauge("temp", "Plain.")
    g.set(float("nan"))
    g2 = r.gauge("neg", "Minus infinity.")
    g2.set(float("-inf"))
    text = r.render()
    lines = text.splitlines()
    assert lines[0] == '# HELP x_total Help with a backslash \\\\ and\\na newline and "quotes".'
    assert lines[1] == "# TYPE x_total counter"
    assert lines[2] == 'x_total{path="C:\\\\dir\\n\\"quoted\\""} 1'
    assert text.endswith("\n")
    fams = list(parser.text_string_to_metric_families(text))
    assert fams[0].documentation == 'Help with a backslash \\ and\na newline and "quotes".'
    assert fams[0].samples[0].labels == {"path": 'C:\\dir\n"quoted"'}
    assert math.isnan(fams[1].samples[0].value)
    assert fams[2].samples[0].value == float("-inf")


def test_label_and_name_validation() -> None:
    r = Registry()
    with pytest.raises(ValueError, match="invalid metric name"):
        r.counter("bad-name", "x")
    with pytest.raises(ValueError, match="invalid label name"):
        r.counter("ok_total", "x", ["__reserved"])
    with pytest.raises(ValueError, match="reserved"):
        r.histogram("h", "x", ["le"], buckets=[1])
    c = r.counter("c_total", "x", ["a", "b"])
    with pytest.raises(ValueError, match="takes labels"):
        c.labels(a="1")
    with pytest.raises(ValueError, match="takes labels"):
        c.labels("1")
    with pytest.raises(ValueError, match="already registered"):
        r.counter("c_total", "again")
    with pytest.raises(ValueError, match="only goes up"):
        c.labels("1", "2").inc(-1)
    with pytest.raises(ValueError, match=r"call \.labels"):
        c.inc()
    assert c.labels("1", "2") is c.labels(a="1", b="2"), "positional and named find the same child"


def test_reload_replaces_model_info_and_forget_model() -> None:
    m = DaemonMetrics()
    m.set_model_info("appliance", "1.0.0", "aa")
    m.set_model_info("appliance", "1.1.0", "bb")
    m.inference_seconds.labels(model="appliance").observe(0.001)
    info = [s for s in _samples(m.render()) if s[0] == "edge_infer_model_info"]
    assert info == [
        ("edge_infer_model_info", (("model", "appliance"), ("sha256", "bb"), ("version", "1.1.0")))
    ]
    m.forget_model("appliance")
    text = m.render()
    assert 'model="appliance"' not in text


def test_snapshot_is_json_ready() -> None:
    snap = _busy_metrics().snapshot()
    json.dumps(snap)
    assert snap["edge_infer_messages_in_total"] == [
        {"pipeline": "appliance", "value": 5.0},
        {"pipeline": "occupancy", "value": 1.0},
    ]
    assert snap["edge_infer_broker_connected"] == 1.0
    assert snap["edge_infer_reconnects_total"] == 1.0
    hist = snap["edge_infer_inference_seconds"]
    assert hist[0]["model"] == "appliance"
    assert hist[0]["count"] == 5
    assert hist[0]["sum"] == pytest.approx(3.0421)


def test_increments_from_threads_are_not_lost() -> None:
    m = DaemonMetrics()
    inc = m.messages_in.labels(pipeline="p").inc
    hist = m.batch_size.labels(model="m")

    def work() -> None:
        for _ in range(20_000):
            inc()
            hist.observe(2)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert m.messages_in.total() == 80_000
    assert hist.count == 80_000


def test_histogram_timer() -> None:
    r = Registry()
    h = r.histogram("t_seconds", "x", buckets=[0.5, 10])
    with h.time():
        pass
    assert h.snapshot()["count"] == 1


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
