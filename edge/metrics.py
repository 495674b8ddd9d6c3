"""Metrics: the daemon's Prometheus metrics on ``prometheus_client``, and a loopback HTTP listener.

Two kinds of series:

* Counted where they happen (per batch, per reload): inference time, batch size, failed
  inference calls, reloads, model info. These are ``prometheus_client`` metrics in the
  daemon's own :class:`~prometheus_client.CollectorRegistry` (never the global one).
* Counted by the daemon anyway, on its hot path, as plain integers (messages in and out,
  drops by reason, reconnects, the broker connection, queue depths): a custom collector
  reads them at scrape time (:class:`Reading`), so a message costs no metric call at all.

The listener (:class:`MetricsServer`) is the daemon's own small asyncio server for
``/metrics`` and ``/healthz`` on the daemon's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edge import __version__
from edge.decode import REASONS

__all__ = [
    "CONTENT_TYPE",
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "DROP_REASONS",
    "DaemonMetrics",
    "MetricsServer",
    "Reading",
]

log = logging.getLogger(__name__)

# The text exposition format 0.0.4; `_created` series are left out (the daemon's start time
# is its own gauge, and a Pi's scrape stays small).
CONTENT_TYPE = CONTENT_TYPE_LATEST
disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in prometheus_client 0.2x
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9109  # edge.config.MetricsConfig.port

#: The drop reasons the daemon reports in ``edge_infer_dropped_total{reason}``: the decoder's
#: fixed set (edge/decode.py), so the series count stays bounded.
DROP_REASONS = REASONS

#: Seconds. A small model on a Pi 4 answers in 0.1-2 ms; a Jetson batch in 1-20 ms.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True, slots=True)
class Reading:
    """The daemon's plain counters at one moment, as the scrape-time collector reads them."""

    messages_in: Mapping[str, int] = field(default_factory=dict)  # per pipeline
    messages_out: Mapping[str, int] = field(default_factory=dict)  # per pipeline
    dropped: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (pipeline, reason)
    reconnects: int = 0
    connected: bool = False
    queue_depth: Mapping[str, int] = field(default_factory=dict)  # per model


class _ReadingCollector(Collector):
    """Turns a :class:`Reading` into metric families when Prometheus scrapes."""

    def __init__(self, read: Callable[[], Reading]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        r = self._read()
        c = CounterMetricFamily(
            "edge_infer_messages_in", "MQTT messages received per pipeline.", labels=["pipeline"]
        )
        for pipeline, n in sorted(r.messages_in.items()):
            c.add_metric([pipeline], n)
        yield c
        c = CounterMetricFamily(
            "edge_infer_messages_out", "Predictions published per pipeline.", labels=["pipeline"]
        )
        for pipeline, n in sorted(r.messages_out.items()):
            c.add_metric([pipeline], n)
        yield c
        c = CounterMetricFamily(
            "edge_infer_dropped", "Messages dropped, by pipeline and reason.", labels=["pipeline", "reason"]
        )
        for (pipeline, reason), n in sorted(r.dropped.items()):
            c.add_metric([pipeline, reason], n)
        yield c
        yield CounterMetricFamily(
            "edge_infer_reconnects", "MQTT reconnections since start.", value=r.reconnects
        )
        yield GaugeMetricFamily(
            "edge_infer_broker_connected",
            "1 while the MQTT connection is up, else 0.",
            value=1.0 if r.connected else 0.0,
        )
        g = GaugeMetricFamily(
            "edge_infer_queue_depth", "Rows waiting in the model's queue.", labels=["model"]
        )
        for model, n in sorted(r.queue_depth.items()):
            g.add_metric([model], n)
        yield g


class DaemonMetrics:
    """The daemon's metric set in a registry of its own; :meth:`render` is ``/metrics``."""

    def __init__(self, read: Callable[[], Reading] = Reading, version: str = __version__) -> None:
        r = self.registry = CollectorRegistry(auto_describe=False)
        r.register(_ReadingCollector(read))
        self.predictions_failed = Counter(
            "edge_infer_predictions_failed", "Inference calls that raised, per model.", ["model"], registry=r
        )
        self.inference_seconds = Histogram(
            "edge_infer_inference_seconds",
            "Wall time of one inference call (one batch), per model.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "edge_infer_batch_size",
            "Rows per inference batch, per model.",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.model_info = Gauge(
            "edge_infer_model_info", "The loaded model: always 1.", ["model", "version", "sha256"], registry=r
        )
        self.reloads = Counter(
            "edge_infer_reloads", "Reload attempts by result (ok, refused).", ["result"], registry=r
        )
        self.build_info = Gauge(
            "edge_infer_build_info", "The running edge-infer: always 1.", ["version"], registry=r
        )
        self.start_time = Gauge(
            "edge_infer_start_time_seconds",
            "Start time of the daemon since the Unix epoch, in seconds.",
            registry=r,
        )
        self.build_info.labels(version=version).set(1)
        self.start_time.set(time.time())
        self._model_versions: dict[str, tuple[str, str]] = {}
        self._lock = threading.Lock()

    def set_model_info(self, model: str, version: str, sha256: str) -> None:
        """Record the loaded model; a reload replaces the previous version's series."""
        with self._lock:
            old = self._model_versions.get(model)
            if old is not None and old != (version, sha256):
                with contextlib.suppress(KeyError):
                    self.model_info.remove(model, *old)
            self._model_versions[model] = (version, sha256)
        self.model_info.labels(model=model, version=version, sha256=sha256).set(1)

    def forget_model(self, model: str) -> None:
        """Remove every series of a model that was unloaded."""
        with self._lock:
            old = self._model_versions.pop(model, None)
        if old is not None:
            with contextlib.suppress(KeyError):
                self.model_info.remove(model, *old)
        for metric in (self.inference_seconds, self.batch_size, self.predictions_failed):
            with contextlib.suppress(KeyError):
                metric.remove(model)

    def render(self) -> str:
        """The Prometheus text exposition format, version 0.0.4."""
        return generate_latest(self.registry).decode()


# ---------------------------------------------------------------------------- HTTP listener

HealthCheck = Callable[[], tuple[bool, str]]

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}
_MAX_HEADER = 8192


class MetricsServer:
    """``/metrics`` and ``/healthz`` over HTTP/1.1 on ``asyncio.start_server``.

    ``health()`` returns ``(ok, reason)``; ``/healthz`` answers 200 ``ok`` or 503 with the
    reason (an exception from it is a 503 too). Everything else is 404, methods other than
    GET/HEAD 405, malformed or oversized requests 400, slow clients are cut off after
    ``timeout`` seconds. At most ``max_connections`` are open at once; at the cap a new
    connection closes the one that has waited longest without sending its request, so idle
    clients never keep ``/healthz`` from answering. Each response closes its connection.

    Use ``await server.start()`` / ``await server.close()``, or ``async with``; with
    ``port=0`` the bound port is in :attr:`port` after start.
    """

    def __init__(
        self,
        render: Callable[[], str],
        health: HealthCheck,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        *,
        timeout: float = 5.0,
        max_connections: int = 16,
    ) -> None:
        self.render = render
        self.health = health
        self.host = host
        self.port = port
        self.timeout = timeout
        self.max_connections = max_connections
        self.evicted = 0  # idle connections closed to make room for a new one
        self._active: set[asyncio.Task[Any]] = set()
        # connections still waiting for their request, oldest first (a dict keeps insertion order)
        self._reading: dict[asyncio.Task[Any], None] = {}
        self._evicted: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, self.host, self.port, limit=_MAX_HEADER, reuse_address=True
        )
        sock = self._server.sockets[0]
        self.port = int(sock.getsockname()[1])
        log.info("metrics listener on http://%s:%d/metrics", self.host, self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> MetricsServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def serve_forever(self) -> None:
        """Start (if needed) and serve until cancelled: a TaskGroup-friendly task."""
        if self._server is None:
            await self.start()
        assert self._server is not None
        try:
            await self._server.serve_forever()
        finally:
            await self.close()

    def _route(self, method: str, target: str) -> tuple[int, str, str]:
        path = target.split("?", 1)[0]
        if path not in ("/metrics", "/healthz"):
            return 404, "text/plain; charset=utf-8", "not found\n"
        if method not in ("GET", "HEAD"):
            return 405, "text/plain; charset=utf-8", "method not allowed\n"
        if path == "/metrics":
            try:
                return 200, CONTENT_TYPE, self.render()
            except Exception:
                log.exception("rendering /metrics failed")
                return 503, "text/plain; charset=utf-8", "metrics unavailable\n"
        try:
            ok, reason = self.health()
        except Exception as exc:
            ok, reason = False, f"health check failed: {exc!r}"
        if ok:
            return 200, "text/plain; charset=utf-8", "ok\n"
        return 503, "text/plain; charset=utf-8", " ".join(str(reason).split()) + "\n"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._active) >= self.max_connections:
            # At the cap: the connection waiting longest for its request (an idle client) makes
            # room, so idle connections can never keep a probe out. When every connection is
            # busy answering, the newcomer is closed.
            victim = next(iter(self._reading), None)
            if victim is None:
                writer.close()
                return
            del self._reading[victim]
            self._evicted.add(victim)
            self.evicted += 1
            victim.cancel()
        self._active.add(task)
        self._reading[task] = None
        try:
            status, ctype, body, head = await asyncio.wait_for(self._respond(reader), self.timeout)
            self._reading.pop(task, None)
            payload = body.encode()
            headers = (
                f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
                f"Content-Type: {ctype}\r\n"
                f"Content-Length: {len(payload)}\r\n"
                "Cache-Control: no-store\r\n"
                "Connection: close\r\n\r\n"
            )
            writer.write(headers.encode() + (b"" if head else payload))
            await asyncio.wait_for(writer.drain(), self.timeout)
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            if task not in self._evicted:
                raise
        except Exception:
            log.exception("metrics listener: unexpected error")
        finally:
            self._active.discard(task)
            self._reading.pop(task, None)
            self._evicted.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _respond(self, reader: asyncio.StreamReader) -> tuple[int, str, str, bool]:
        try:
            raw = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.LimitOverrunError, ValueError):
            return 400, "text/plain; charset=utf-8", "bad request\n", False
        except asyncio.IncompleteReadError as exc:
            raw = exc.partial  # a client that sends a request line and closes: still answer
            if not raw.strip():
                raise
        try:
            request_line = raw.split(b"\r\n", 1)[0].decode("ascii")
            method, target, version = request_line.split(" ")
        except (UnicodeDecodeError, ValueError):
            return 400, "text/plain; charset=utf-8", "bad request\n", False
        if not version.startswith("HTTP/1.") or not target.startswith("/"):
            return 400, "text/plain; charset=utf-8", "bad request\n", False
        status, ctype, body = self._route(method, target)
        return status, ctype, body, method == "HEAD"
