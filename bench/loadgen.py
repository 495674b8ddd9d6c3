"""Load generation and measurement: publisher processes, an independent subscriber, latency matching.

Publishers run in their own processes (paho, QoS 0) and put the send time ``t`` (epoch seconds) in
every payload. The subscriber, another process, records the arrival time of every answer. Baselines
echo ``t`` back; edge-infer answers carry the sample time only to the millisecond (``ts``), so its
answers are matched to the publishers' send log per input stream, in order (each stream is published
by one process, and the daemon answers a device's inputs in order), with ``ts`` to resynchronise
after a lost message.
"""

from __future__ import annotations

import collections
import contextlib
import json
import multiprocessing as mp
import multiprocessing.connection
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

CTX = mp.get_context("fork")  # quick to start; the parent runs no threads when it forks


@dataclass(frozen=True)
class Stream:
    """One input topic and the topic its answers come back on."""

    in_topic: str
    out_topic: str
    fields: tuple[str, ...]


def _connect(port: int) -> Any:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    connected = threading.Event()
    client.on_connect = lambda *_a: connected.set()
    client.connect("127.0.0.1", port, keepalive=60)
    _nodelay(client)
    client.loop_start()
    if not connected.wait(10):
        raise RuntimeError("publisher could not connect")
    return client


def _nodelay(client: Any) -> None:
    """The harness's own sockets send at once (no Nagle), so they add no delay of their own."""
    sock = client.socket()
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _publisher(
    port: int,
    *,
    streams: list[Stream],
    indices: list[int],
    count: int,
    rate: float | None,
    start_at: float,
    seed: int,
    results: Any,
    qos: int = 0,
) -> None:
    """Publish ``count`` messages round-robin over ``indices``; ``rate`` None = as fast as possible."""
    rng = np.random.default_rng(seed)
    client = _connect(port)
    topics = [streams[i].in_topic for i in indices]
    # payload = '{"t": <send time>, <fields with fixed random values>}'
    tails = []
    for i in indices:
        values = ", ".join(f'"{f}": {rng.normal():.4f}' for f in streams[i].fields)
        tails.append((", " + values if values else "") + "}")
    sent_idx = np.empty(count, dtype=np.int32)
    sent_t = np.empty(count, dtype=np.float64)
    n = len(indices)
    delay = start_at - time.time()
    if delay > 0:
        time.sleep(delay)
    begin = time.time()
    publish = client.publish
    now = time.time
    for k in range(count):
        if rate is not None:
            due = begin + k / rate
            wait = due - now()
            if wait > 0.0005:
                time.sleep(wait)
        j = k % n
        t = now()
        publish(topics[j], '{"t": ' + repr(t) + tails[j], qos)
        sent_idx[k] = indices[j]
        sent_t[k] = t
    time.sleep(0.05)
    client.loop_stop()
    client.disconnect()
    results.put((sent_idx, sent_t))


def publish(
    port: int,
    streams: list[Stream],
    count: int,
    rate: float | None,
    *,
    processes: int = 1,
    seed: int = 0,
    qos: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Publish ``count`` messages over ``streams`` from ``processes`` publishers; return the send log."""
    processes = max(1, min(processes, len(streams)))
    results = CTX.Queue()
    start_at = time.time() + 0.3  # fork and connect first, then start together
    procs = []
    for p in range(processes):
        indices = list(range(p, len(streams), processes))
        share = count // processes + (1 if p < count % processes else 0)
        proc = CTX.Process(
            target=_publisher,
            args=(port,),
            kwargs={
                "streams": streams,
                "indices": indices,
                "count": share,
                "rate": None if rate is None else rate / processes,
                "start_at": start_at,
                "seed": seed + p,
                "results": results,
                "qos": qos,
            },
            daemon=True,
        )
        proc.start()
        procs.append(proc)
    logs = [results.get(timeout=600) for _ in procs]
    for proc in procs:
        proc.join(10)
    idx = np.concatenate([log[0] for log in logs])
    ts = np.concatenate([log[1] for log in logs])
    order = np.argsort(ts, kind="stable")
    return idx[order], ts[order]


# ---------------------------------------------------------------------- the subscriber


def _subscriber(port: int, filters: list[str], conn: multiprocessing.connection.Connection) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    records: list[tuple[float, str, bytes]] = []
    lock = threading.Lock()
    subscribed = threading.Event()
    now = time.time

    def on_message(_c: Any, _u: Any, message: Any) -> None:
        topic = message.topic
        if topic.endswith("/availability"):
            return
        records.append((now(), topic, message.payload))

    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    client.on_message = on_message
    client.on_subscribe = lambda *_a: subscribed.set()
    client.connect("127.0.0.1", port, keepalive=60)
    _nodelay(client)
    client.subscribe([(f, 0) for f in filters])
    client.loop_start()
    subscribed.wait(10)
    conn.send("ready")
    while True:
        command = conn.recv()
        if command == "count":
            conn.send(len(records))
        elif command == "take":
            with lock:
                taken, records = records, []
            conn.send(taken)
        elif command == "stop":
            break
    client.loop_stop()
    client.disconnect()


class Subscriber:
    """The independent subscriber process; ``take`` returns (arrival time, topic, payload) records."""

    def __init__(self, port: int, filters: list[str]) -> None:
        self._conn, child = CTX.Pipe()
        self._proc = CTX.Process(target=_subscriber, args=(port, filters, child), daemon=True)
        self._proc.start()
        if not self._conn.poll(20) or self._conn.recv() != "ready":
            raise RuntimeError("benchmark subscriber did not start")

    @property
    def pid(self) -> int | None:
        """The subscriber process's pid (for its CPU time)."""
        return self._proc.pid

    def count(self) -> int:
        self._conn.send("count")
        return int(self._conn.recv())

    def take(self) -> list[tuple[float, str, bytes]]:
        self._conn.send("take")
        return list(self._conn.recv())

    def settle(self, expected: int, idle_s: float = 1.0, timeout_s: float = 60.0) -> int:
        """Wait until ``expected`` answers arrived, or none for ``idle_s``, or ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        last, last_change = -1, time.monotonic()
        while time.monotonic() < deadline:
            n = self.count()
            if n >= expected:
                return n
            if n != last:
                last, last_change = n, time.monotonic()
            elif time.monotonic() - last_change > idle_s:
                return n
            time.sleep(0.05)
        return self.count()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.send("stop")
        self._proc.join(5)
        if self._proc.is_alive():
            self._proc.kill()


# ---------------------------------------------------------------------- analysis


def _iso_ms(text: str) -> int:
    return round(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)


@dataclass
class Matched:
    latencies_s: np.ndarray
    arrivals: np.ndarray
    answers: int
    unmatched: int = 0
    notes: list[str] = field(default_factory=list)


def match(
    records: list[tuple[float, str, bytes]],
    streams: list[Stream],
    sent_idx: np.ndarray,
    sent_t: np.ndarray,
) -> Matched:
    """Latency of every answer: echoed ``t`` when present, else in-order matching per stream."""
    by_out = {s.out_topic: i for i, s in enumerate(streams)}
    pending: dict[int, collections.deque[float]] = collections.defaultdict(collections.deque)
    for i, t in zip(sent_idx.tolist(), sent_t.tolist(), strict=True):
        pending[i].append(t)
    lat: list[float] = []
    arrivals: list[float] = []
    unmatched = 0
    for arrived, topic, payload in records:
        stream = by_out.get(topic)
        if stream is None:
            continue
        arrivals.append(arrived)
        try:
            body = json.loads(payload)
        except ValueError:
            unmatched += 1
            continue
        if isinstance(body, dict) and isinstance(body.get("t"), float):
            lat.append(arrived - body["t"])
            continue
        queue = pending[stream]
        ts = body.get("ts") if isinstance(body, dict) else None
        if isinstance(ts, str):
            want = _iso_ms(ts)
            # drop sends whose answer never came (their ms is before this answer's)
            while queue and int(queue[0] * 1000) < want - 1:
                queue.popleft()
        if not queue:
            unmatched += 1
            continue
        lat.append(arrived - queue.popleft())
    return Matched(
        np.array(lat, dtype=np.float64), np.array(arrivals, dtype=np.float64), len(arrivals), unmatched
    )


def percentiles(
    ms: np.ndarray, quantiles: tuple[float, ...] = (50, 95, 99), *, digits: int = 3, mean: bool = True
) -> dict[str, float | int | None]:
    """Count, the given percentiles (keys ``p50``, ``p99.9``, ...), max and (optionally) mean of
    values in milliseconds; None for each when there are none."""
    keys = [f"p{q:g}" for q in quantiles]
    tail = ["max", *(["mean"] if mean else [])]
    if ms.size == 0:
        return {"n": 0, **dict.fromkeys(keys + tail)}
    out: dict[str, float | int | None] = {"n": int(ms.size)}
    for key, value in zip(keys, np.percentile(ms, list(quantiles)), strict=True):
        out[key] = round(float(value), digits)
    out["max"] = round(float(ms.max()), digits)
    if mean:
        out["mean"] = round(float(ms.mean()), digits)
    return out


def percentiles_ms(latencies_s: np.ndarray) -> dict[str, float | int | None]:
    """Latencies in seconds: count, p50/p95/p99, max and mean in milliseconds."""
    return percentiles(latencies_s * 1000.0)


def cdf_points(latencies_s: np.ndarray, points: int = 101) -> list[float]:
    """Latency (ms) at evenly spaced quantiles 0..1, for the CDF plot."""
    if latencies_s.size == 0:
        return []
    return [round(float(v), 4) for v in np.quantile(latencies_s * 1000.0, np.linspace(0, 1, points))]
