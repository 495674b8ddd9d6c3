"""Metrics: a small registry, Prometheus text exposition 0.0.4, and a loopback HTTP listener.

Why not ``prometheus-client``: the daemon needs a dozen metrics, a ``snapshot()`` for its
retained ``edge-infer/bridge/info`` message and a listener on its own event loop; this
module does that in a few hundred lines with no dependency on the Pi. The tests parse the
output with ``prometheus_client``'s own parser, so the format stays honest.

Hot path: look a labelled child up once and keep it::

    m = DaemonMetrics()
    inc_in = m.messages_in.labels(pipeline="appliance").inc   # bound method, cached
    inc_in()                                                   # one lock, one add

Every child guards its value with its own lock, so increments from the inference worker
thread and reads from the event loop never lose an update.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Generic, TypeVar

from edge import __version__

__all__ = [
    "CONTENT_TYPE",
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "DROP_REASONS",
    "Counter",
    "DaemonMetrics",
    "Gauge",
    "Histogram",
    "MetricsServer",
    "Registry",
]

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9109  # edge.config.MetricsConfig.port

_NAME_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

LabelKey = tuple[str, ...]


def _fmt(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels_text(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape_label(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


# ---------------------------------------------------------------------------- children


class CounterChild:
    """One labelled series of a counter."""

    __slots__ = ("_lock", "_value")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        with self._lock:
            self._value += amount

    @property
    def value(self) -> float:
        return self._value


class GaugeChild:
    """One labelled series of a gauge."""

    __slots__ = ("_lock", "_value")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value = 0.0

    def set(self, value: float) -> None:
        self._value = float(value)  # a single store: no lock needed

    def inc(self, amount: float = 1.0) -> None:
        with self._lock:
            self._value += amount

    def dec(self, amount: float = 1.0) -> None:
        with self._lock:
            self._value -= amount

    @property
    def value(self) -> float:
        return self._value


class HistogramChild:
    """One labelled series of a histogram: per-bucket counts, sum and count."""

    __slots__ = ("_bounds", "_count", "_counts", "_lock", "_sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds  # upper bounds, sorted, without +Inf
        self._lock = threading.Lock()
        self._counts = [0] * (len(bounds) + 1)  # last slot: above every bound (+Inf only)
        self._sum = 0.0
        self._count = 0

    def observe(self, value: float) -> None:
        i = bisect_left(self._bounds, value)  # first bound >= value: "le" is inclusive
        with self._lock:
            self._counts[i] += 1
            self._sum += value
            self._count += 1

    def time(self) -> _Timer:
        """``with child.time(): ...`` observes the elapsed seconds."""
        return _Timer(self)

    def state(self) -> tuple[list[int], float, int]:
        """Cumulative bucket counts (including +Inf), sum, count; a consistent copy."""
        with self._lock:
            counts, total, count = list(self._counts), self._sum, self._count
        cumulative, running = [], 0
        for c in counts:
            running += c
            cumulative.append(running)
        return cumulative, total, count

    @property
    def count(self) -> int:
        return self._count

    @property
    def sum(self) -> float:
        return self._sum


class _Timer:
    __slots__ = ("_child", "_start")

    def __init__(self, child: HistogramChild) -> None:
        self._child = child
        self._start = 0.0

    def __enter__(self) -> _Timer:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self._child.observe(time.perf_counter() - self._start)


# ---------------------------------------------------------------------------- metrics

ChildT = TypeVar("ChildT", CounterChild, GaugeChild, HistogramChild)


class _Metric(Generic[ChildT]):
    kind = "untyped"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> None:
        if not _NAME_RE.match(name):
            raise ValueError(f"invalid metric name {name!r}")
        for label in labelnames:
            if not _LABEL_RE.match(label) or label.startswith("__"):
                raise ValueError(f"invalid label name {label!r} for {name}")
        if len(set(labelnames)) != len(labelnames):
            raise ValueError(f"duplicate label names for {name}")
        self.name = name
        self.documentation = documentation
        self.labelnames: tuple[str, ...] = tuple(labelnames)
        self._children: dict[LabelKey, ChildT] = {}
        self._lock = threading.Lock()
        self._default: ChildT | None = None if labelnames else self._get(())

    def _new_child(self) -> ChildT:
        raise NotImplementedError

    def _get(self, key: LabelKey) -> ChildT:
        child = self._children.get(key)
        if child is None:
            with self._lock:
                child = self._children.get(key)
                if child is None:
                    child = self._new_child()
                    self._children[key] = child
        return child

    def _key(self, args: tuple[str, ...], kwargs: dict[str, str]) -> LabelKey:
        if args and kwargs:
            raise TypeError("pass label values either by position or by name, not both")
        if kwargs:
            if set(kwargs) != set(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {tuple(kwargs)}")
            return tuple(str(kwargs[n]) for n in self.labelnames)
        if len(args) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {len(args)} value(s)")
        return tuple(str(a) for a in args)

    def labels(self, *values: str, **labels: str) -> ChildT:
        """The child for these label values, created on first use. Keep it for the hot path."""
        if not self.labelnames:
            raise ValueError(f"{self.name} has no labels")
        return self._get(self._key(values, labels))

    def remove(self, *values: str, **labels: str) -> None:
        """Drop one series (e.g. the old version's ``model_info`` after a reload)."""
        key = self._key(values, labels)
        with self._lock:
            self._children.pop(key, None)

    def clear(self) -> None:
        if self.labelnames:
            with self._lock:
                self._children.clear()

    def series(self) -> list[tuple[LabelKey, ChildT]]:
        with self._lock:
            return list(self._children.items())

    def _unlabelled(self) -> ChildT:
        if self._default is None:
            raise ValueError(f"{self.name} has labels {self.labelnames}: call .labels(...) first")
        return self._default

    # exposition -------------------------------------------------------------------
    def header(self) -> list[str]:
        return [f"# HELP {self.name} {_escape_help(self.documentation)}", f"# TYPE {self.name} {self.kind}"]

    def samples(self) -> Iterator[str]:
        raise NotImplementedError

    def render(self) -> list[str]:
        return [*self.header(), *self.samples()]

    def snapshot(self) -> Any:
        raise NotImplementedError


_Series = Sequence[tuple[LabelKey, CounterChild | GaugeChild]]


def _scalar_samples(name: str, labelnames: Sequence[str], series: _Series) -> Iterator[str]:
    for key, child in sorted(series, key=lambda kv: kv[0]):
        yield f"{name}{_labels_text(labelnames, key)} {_fmt(child.value)}"


def _scalar_snapshot(labelnames: Sequence[str], series: _Series) -> Any:
    """JSON-ready: a number when unlabelled, else a list of ``{labels..., "value": v}``."""
    if not labelnames:
        return series[0][1].value
    return [
        {**dict(zip(labelnames, key, strict=True)), "value": child.value}
        for key, child in sorted(series, key=lambda kv: kv[0])
    ]


class Counter(_Metric[CounterChild]):
    """A monotonically increasing count. By convention the name ends in ``_total``."""

    kind = "counter"

    def _new_child(self) -> CounterChild:
        return CounterChild()

    def samples(self) -> Iterator[str]:
        return _scalar_samples(self.name, self.labelnames, self.series())

    def snapshot(self) -> Any:
        return _scalar_snapshot(self.labelnames, self.series())

    def inc(self, amount: float = 1.0) -> None:
        self._unlabelled().inc(amount)

    @property
    def value(self) -> float:
        return self._unlabelled().value

    def total(self) -> float:
        """Sum over all series (for a messages/s figure in ``STATUS=``)."""
        return sum(child.value for _, child in self.series())


class Gauge(_Metric[GaugeChild]):
    """A value that goes up and down."""

    kind = "gauge"

    def _new_child(self) -> GaugeChild:
        return GaugeChild()

    def samples(self) -> Iterator[str]:
        return _scalar_samples(self.name, self.labelnames, self.series())

    def snapshot(self) -> Any:
        return _scalar_snapshot(self.labelnames, self.series())

    def set(self, value: float) -> None:
        self._unlabelled().set(value)

    def inc(self, amount: float = 1.0) -> None:
        self._unlabelled().inc(amount)

    def dec(self, amount: float = 1.0) -> None:
        self._unlabelled().dec(amount)

    @property
    def value(self) -> float:
        return self._unlabelled().value


class Histogram(_Metric[HistogramChild]):
    """Observations counted into cumulative buckets, plus their sum and count."""

    kind = "histogram"

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str] = (), *, buckets: Iterable[float]
    ) -> None:
        bounds = sorted(float(b) for b in buckets if not math.isinf(float(b)))
        if not bounds:
            raise ValueError(f"{name}: at least one finite bucket bound is required")
        if len(set(bounds)) != len(bounds):
            raise ValueError(f"{name}: duplicate bucket bounds")
        if "le" in labelnames:
            raise ValueError(f"{name}: 'le' is reserved for histogram buckets")
        self.bounds: tuple[float, ...] = tuple(bounds)
        super().__init__(name, documentation, labelnames)

    def _new_child(self) -> HistogramChild:
        return HistogramChild(self.bounds)

    def observe(self, value: float) -> None:
        self._unlabelled().observe(value)

    def time(self) -> _Timer:
        return self._unlabelled().time()

    def samples(self) -> Iterator[str]:
        les = [_fmt(b) for b in self.bounds] + ["+Inf"]
        for key, child in sorted(self.series(), key=lambda kv: kv[0]):
            cumulative, total, count = child.state()
            for le, c in zip(les, cumulative, strict=True):
                extra = f'le="{le}"'
                yield f"{self.name}_bucket{_labels_text(self.labelnames, key, extra)} {c}"
            lbl = _labels_text(self.labelnames, key)
            yield f"{self.name}_sum{lbl} {_fmt(total)}"
            yield f"{self.name}_count{lbl} {count}"

    def snapshot(self) -> Any:
        """``{"count": n, "sum": s}`` per series (buckets stay on ``/metrics``)."""

        def one(child: HistogramChild) -> dict[str, float]:
            _, total, count = child.state()
            return {"count": count, "sum": total}

        if not self.labelnames:
            return one(self._unlabelled())
        return [
            {**dict(zip(self.labelnames, key, strict=True)), **one(child)}
            for key, child in sorted(self.series(), key=lambda kv: kv[0])
        ]


AnyMetric = Counter | Gauge | Histogram


class Registry:
    """An ordered set of metrics rendered together."""

    def __init__(self) -> None:
        self._metrics: dict[str, AnyMetric] = {}
        self._lock = threading.Lock()

    def register(self, metric: AnyMetric) -> AnyMetric:
        with self._lock:
            if metric.name in self._metrics:
                raise ValueError(f"metric {metric.name} is already registered")
            self._metrics[metric.name] = metric
        return metric

    def counter(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Counter:
        m = Counter(name, documentation, labelnames)
        self.register(m)
        return m

    def gauge(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Gauge:
        m = Gauge(name, documentation, labelnames)
        self.register(m)
        return m

    def histogram(
        self, name: str, documentation: str, labelnames: Sequence[str] = (), *, buckets: Iterable[float]
    ) -> Histogram:
        m = Histogram(name, documentation, labelnames, buckets=buckets)
        self.register(m)
        return m

    def metrics(self) -> list[AnyMetric]:
        with self._lock:
            return list(self._metrics.values())

    def get(self, name: str) -> AnyMetric:
        return self._metrics[name]

    def render(self) -> str:
        """The Prometheus text exposition format, version 0.0.4."""
        lines: list[str] = []
        for metric in self.metrics():
            lines.extend(metric.render())
        return "\n".join(lines) + "\n"

    def snapshot(self) -> dict[str, Any]:
        """``{metric name: value}`` for JSON (``edge-infer/bridge/info``)."""
        return {m.name: m.snapshot() for m in self.metrics()}


# ---------------------------------------------------------------------------- the daemon's set

#: The drop reasons the daemon reports in ``edge_infer_dropped_total{reason}``; a fixed,
#: small set keeps the series count bounded.
DROP_REASONS = (
    "decode_error",  # payload is not what the device profile expects
    "unknown_device",  # topic matched but no device could be derived
    "stale",  # a snapshot join whose readings are older than the staleness limit
    "queue_full",  # the model's queue is at capacity (back-pressure)
    "inference_error",  # the model raised; see predictions_failed_total
    "shutdown",  # still queued when the bounded shutdown flush ran out
)

#: Seconds. A small model on a Pi 4 answers in 0.1-2 ms; a Jetson batch in 1-20 ms.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class DaemonMetrics:
    """The standard metric set of the daemon, with typed attributes.

    The same registry feeds ``/metrics`` (:meth:`render`) and ``edge-infer/bridge/info``
    (:meth:`snapshot`).
    """

    def __init__(self, registry: Registry | None = None, version: str = __version__) -> None:
        r = self.registry = registry if registry is not None else Registry()
        self.messages_in = r.counter(
            "edge_infer_messages_in_total", "MQTT messages received per pipeline.", ["pipeline"]
        )
        self.messages_out = r.counter(
            "edge_infer_messages_out_total", "Predictions published per pipeline.", ["pipeline"]
        )
        self.dropped = r.counter(
            "edge_infer_dropped_total", "Messages dropped, by pipeline and reason.", ["pipeline", "reason"]
        )
        self.predictions_failed = r.counter(
            "edge_infer_predictions_failed_total", "Inference calls that raised, per model.", ["model"]
        )
        self.inference_seconds = r.histogram(
            "edge_infer_inference_seconds",
            "Wall time of one inference call (one batch), per model.",
            ["model"],
            buckets=LATENCY_BUCKETS,
        )
        self.batch_size = r.histogram(
            "edge_infer_batch_size", "Rows per inference batch, per model.", ["model"], buckets=BATCH_BUCKETS
        )
        self.queue_depth = r.gauge("edge_infer_queue_depth", "Rows waiting in the model's queue.", ["model"])
        self.model_info = r.gauge(
            "edge_infer_model_info", "The loaded model: always 1.", ["model", "version", "sha256"]
        )
        self.broker_connected = r.gauge(
            "edge_infer_broker_connected", "1 while the MQTT connection is up, else 0."
        )
        self.reconnects = r.counter("edge_infer_reconnects_total", "MQTT reconnections since start.")
        self.reloads = r.counter(
            "edge_infer_reloads_total", "Reload attempts by result (ok, refused).", ["result"]
        )
        self.build_info = r.gauge("edge_infer_build_info", "The running edge-infer: always 1.", ["version"])
        self.start_time = r.gauge(
            "edge_infer_start_time_seconds", "Start time of the daemon since the Unix epoch, in seconds."
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
                self.model_info.remove(model, *old)
            self._model_versions[model] = (version, sha256)
        self.model_info.labels(model=model, version=version, sha256=sha256).set(1)

    def forget_model(self, model: str) -> None:
        """Remove every series of a model that was unloaded."""
        with self._lock:
            old = self._model_versions.pop(model, None)
        if old is not None:
            self.model_info.remove(model, *old)
        for metric in (self.inference_seconds, self.batch_size, self.queue_depth, self.predictions_failed):
            with contextlib.suppress(ValueError):
                metric.remove(model=model)

    def render(self) -> str:
        return self.registry.render()

    def snapshot(self) -> dict[str, Any]:
        return self.registry.snapshot()


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
