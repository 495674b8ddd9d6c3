"""``python -m bench.faultsoak``: 1,000,000 numbered QoS 1 messages with faults injected at random.

A real Mosquitto (persistence on, autosave every second) on a free loopback port; the daemon
(``python -m edge.cli run -c CONFIG``, a real subprocess, snapshot pipeline with the bench's
feed-forward model, QoS 1 in and out, persistent MQTT 5 session) reaches it through a small TCP
proxy on loopback, so faults can hit its connection. A publisher process sends message ``n`` (0..N-1)
to device ``d<n % D>`` at a fixed rate, QoS 1; a known fraction are deliberately bad (malformed JSON,
a missing field, NaN, a string for a number, a bad timestamp, an oversized payload, a device that is
not in the pipeline's ``devices`` list). An independent subscriber process (persistent session, QoS 1)
records every answer and every dead letter.

Every message carries its number twice: as ``"n"`` at the start of the payload (the dead letter quotes
the first 1,024 bytes of a rejected payload) and in its sample time ``t = T0 + n/1000 + 0.0005`` s,
which the daemon copies, to the millisecond, into the answer's ``ts``.

Faults, at seeded random times (each waits for the previous one to be over): the proxy resets the
connection (``proxy_cut``); the proxy black-holes it (``proxy_stall``: a half-open connection the
daemon must detect by keepalive); the broker is SIGKILLed and restarted from its persistence file
(``broker_kill``); the daemon is SIGKILLed (``daemon_kill``) or SIGTERMed (``daemon_term``) and
started again; the daemon reloads on SIGHUP (``daemon_hup``).

At the end every number is *answered* (seen on an output topic; duplicates counted apart, as
at-least-once allows), *dead-lettered* with the daemon's reason, or *unaccounted*. The daemon's own
drop counters (``/metrics``, scraped every second and just before each stop, since a restart resets
them) are added up per lifetime as a cross-check. The daemon's RSS and open file descriptors are
sampled every second; each process lifetime must be flat after its warm-up (RSS within 5 %).

Writes ``<out>/<date>-faultsoak.json``, ``.md`` and ``.png`` (with matplotlib).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing as mp
import multiprocessing.connection
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from bench import models
from bench.loadgen import percentiles
from bench.runner import default_out_dir, machine
from tests.broker import MOSQUITTO_HINT, FaultProxy, Mosquitto, find_mosquitto, free_port

ROOT = Path(__file__).resolve().parent.parent
CTX = mp.get_context("fork")  # the helpers are forked before the parent starts any thread

#: The deliberately bad messages and the reason the daemon must give for each.
BAD_KINDS: dict[str, str] = {
    "malformed_json": "malformed_json",
    "missing_field": "missing_field",
    "nan": "not_finite",
    "non_numeric": "non_numeric",
    "bad_timestamp": "bad_timestamp",
    "oversized": "oversized",
    "unknown_device": "unknown_device",
}
KIND_NAMES = ["good", *BAD_KINDS]  # index 0 is a good message
FAULT_KINDS = ("proxy_cut", "proxy_stall", "broker_kill", "daemon_kill", "daemon_term", "daemon_hup")
UNPLANNED = ("daemon_died",)  # not injected: the daemon exited on its own and was restarted
FAULT_WEIGHTS = {
    "proxy_cut": 3,
    "proxy_stall": 2,
    "broker_kill": 2,
    "daemon_kill": 1,
    "daemon_term": 1,
    "daemon_hup": 2,
}
MAX_PAYLOAD = 2048  # limits.max_payload_bytes of the daemon under test
AUTOSAVE_S = 1  # Mosquitto autosave_interval: what a broker SIGKILL can lose
KEEPALIVE_S = 5
PREFIX = "fsoak"
N_FIELD = re.compile(rb'"n": (\d+)')


# ---------------------------------------------------------------------- the plan


@dataclass
class Plan:
    messages: int = 1_000_000
    devices: int = 1000
    rate: float = 1500.0
    seed: int = 1
    bad_fraction: float = 0.01
    fault_every_s: float = 30.0  # mean spacing of faults
    faults: list[str] | None = None  # fixed fault kinds in order (the smoke test); None: at random
    first_fault_s: float | None = None  # the first fault no earlier than this (default: 5 % of the run)
    warmup_s: float = 20.0  # per daemon lifetime, before its RSS/fd flatness is judged
    settle_s: float = 20.0  # after the last message: wait this long without news before counting
    keep: bool = False  # keep the working folder (broker and daemon logs) for a post-mortem

    @property
    def duration_s(self) -> float:
        return self.messages / self.rate

    def kinds(self) -> np.ndarray:
        """Kind index per message number (0 good); the first ``devices`` numbers are always good."""
        rng = np.random.default_rng(self.seed)
        kinds = np.zeros(self.messages, dtype=np.int8)
        bad = rng.random(self.messages) < self.bad_fraction
        bad[: self.devices] = False
        kinds[bad] = rng.integers(1, len(KIND_NAMES), size=int(bad.sum()), dtype=np.int8)
        return kinds

    def fault_schedule(self) -> list[tuple[float, str]]:
        """(seconds after the first message, kind): every kind at least once, then drawn by weight."""
        rng = random.Random(self.seed)
        start = self.first_fault_s if self.first_fault_s is not None else max(10.0, 0.05 * self.duration_s)
        end = self.duration_s - min(30.0, 0.1 * self.duration_s)
        if self.faults is not None:
            kinds = list(self.faults)
        else:
            count = max(len(FAULT_KINDS), int((end - start) / self.fault_every_s))
            kinds = list(FAULT_KINDS)
            names = list(FAULT_WEIGHTS)
            kinds += rng.choices(names, weights=[FAULT_WEIGHTS[n] for n in names], k=count - len(kinds))
            rng.shuffle(kinds)
        if not kinds:
            return []
        # Stratified: one fault at a random time within each of len(kinds) equal slots, so they
        # neither bunch up nor leave long quiet stretches.
        slot = max(0.0, end - start) / len(kinds)
        times = [start + (i + rng.uniform(0.1, 0.9)) * slot for i in range(len(kinds))]
        return list(zip(times, kinds, strict=True))


def t0_of(run_start: float) -> int:
    return int(run_start)


def sample_time(t0: int, n: int) -> float:
    """Message ``n``'s sample time: the answer's ``ts`` (milliseconds) gives ``n`` back exactly."""
    return t0 + n / 1000.0 + 0.0005


def message(n: int, kind: int, devices: int, t0: int, values: str) -> tuple[str, bytes]:
    """Topic and payload of message ``n``; ``values`` is '"f0": .., ..., "f7": ..'."""
    device = f"d{n % devices}"
    head = f'{{"n": {n}, "t": {sample_time(t0, n)!r}, '
    name = KIND_NAMES[kind]
    topic = f"{PREFIX}/in/{device}"
    if name == "good":
        body = head + values + "}"
    elif name == "malformed_json":
        body = head + values[: len(values) // 2]  # cut off mid-way
    elif name == "missing_field":
        body = head + re.sub(r'"f3": [^,]+, ', "", values) + "}"
    elif name == "nan":
        body = head + values.replace('"f2": ', '"f2": NaN, "was": ', 1) + "}"
    elif name == "non_numeric":
        body = head + values.replace('"f1": ', '"f1": "warm", "was": ', 1) + "}"
    elif name == "bad_timestamp":
        body = f'{{"n": {n}, "t": "yesterday", ' + values + "}"
    elif name == "oversized":
        body = head + values + ', "pad": "' + "x" * (MAX_PAYLOAD + 100) + '"}'
    elif name == "unknown_device":
        topic = f"{PREFIX}/in/x{n % 97}"
        body = head + values + "}"
    else:  # pragma: no cover
        raise ValueError(name)
    return topic, body.encode()


# ---------------------------------------------------------------------- publisher and subscriber


def _paho(client_id: str, clean: bool) -> Any:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311, clean_session=clean
    )
    client.reconnect_delay_set(0.1, 1.0)  # type: ignore[arg-type]  # paho sleeps floats
    return client


def _nodelay(client: Any) -> None:
    """No Nagle on the harness's sockets (set at every connect): a QoS 1 PUBACK held back 40 ms by
    Nagle and delayed ACKs caps a subscriber at one in-flight window per 40 ms."""
    sock = client.socket()
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _publisher(port: int, plan: Plan, t0: int, run: str, conn: multiprocessing.connection.Connection) -> None:
    """Publish every message at QoS 1 at ``plan.rate``, in order; send back send times and PUBACK flags.

    paho alone reorders around a reconnect: a message published while the CONNACK is on its way goes
    out at once, ahead of those it still holds from before (they are resent when the CONNACK
    arrives). So while the link is down, or paho still holds messages to resend, this publisher keeps
    its messages in a backlog of its own and sends them in order afterwards, as a device that
    buffers would. ``sent_t`` is when each message was due (offered), not when it left.
    """
    from paho.mqtt.client import mqtt_ms_wait_for_puback

    kinds = plan.kinds()
    rng = np.random.default_rng(plan.seed + 1)
    device_values = [
        ", ".join(f'"{f}": {v:.4f}' for f, v in zip(models.FF_FEATURES, rng.normal(size=8), strict=True))
        for _ in range(plan.devices)
    ]
    client = _paho(f"{PREFIX}-pub-{run}", clean=True)
    client.max_inflight_messages_set(0)  # no paho-side queue: sent at once or held by us
    client.max_queued_messages_set(0)
    up = threading.Event()

    def on_connect(c: Any, *_a: Any) -> None:
        _nodelay(c)
        up.set()

    client.on_connect = on_connect
    client.on_disconnect = lambda *_a: up.clear()
    client.connect("127.0.0.1", port, keepalive=30)
    client.loop_start()
    up.wait(10)
    sent_t = np.full(plan.messages, np.nan)
    acked = np.zeros(plan.messages, dtype=bool)
    pending: list[tuple[int, Any]] = []
    backlog: list[int] = []
    flowing = True

    def resent() -> bool:
        """paho has (re)sent everything it holds: nothing it still has to send after a CONNACK."""
        if not (up.is_set() and client.is_connected()):
            return False
        with client._out_message_mutex:
            return all(m.state == mqtt_ms_wait_for_puback for m in client._out_messages.values())

    def send(n: int) -> bool:
        topic, payload = message(n, int(kinds[n]), plan.devices, t0, device_values[n % plan.devices])
        info = client.publish(topic, payload, qos=1)
        pending.append((n, info))
        return bool(info.rc == 0)

    conn.send("ready")
    begin = float(conn.recv())  # the orchestrator says when
    now = time.time
    for n in range(plan.messages):
        due = begin + n / plan.rate
        wait = due - now()
        if wait > 0.0005:
            time.sleep(wait)
        sent_t[n] = due
        if flowing and not up.is_set():
            flowing = False
        if not flowing and resent():
            for m in backlog:
                send(m)
            backlog.clear()
            flowing = True
        if flowing:
            flowing = send(n)  # NO_CONN: paho holds it and sends it first after the CONNACK
        else:
            backlog.append(n)
        if len(pending) >= 4000:
            pending = _sweep(pending, acked)
    deadline = time.monotonic() + 180
    while (backlog or pending) and time.monotonic() < deadline:
        if backlog and resent():
            for m in backlog:
                send(m)
            backlog.clear()
        time.sleep(0.2)
        pending = _sweep(pending, acked)
    client.loop_stop()
    client.disconnect()
    conn.send({"sent_t": sent_t, "acked": acked, "kinds": kinds})


def _sweep(pending: list[tuple[int, Any]], acked: np.ndarray) -> list[tuple[int, Any]]:
    keep = []
    for n, info in pending:
        # Not is_published(): it raises for a message published while disconnected, which paho
        # still holds and sends after the reconnect (QoS 1).
        if info._published:
            acked[n] = True
        else:
            keep.append((n, info))
    return keep


def _subscriber(
    port: int, plan: Plan, t0: int, run: str, conn: multiprocessing.connection.Connection
) -> None:
    """Record the first arrival and count of every answer, and every dead letter, by number."""
    arrival = np.full(plan.messages, np.nan)
    answers = np.zeros(plan.messages, dtype=np.uint16)
    dead: list[tuple[int, str, float]] = []  # (number or -1, reason, time)
    other: Counter[str] = Counter()
    per_second: Counter[int] = Counter()
    out_prefix = f"{PREFIX}/out/"
    dl_prefix = f"{PREFIX}/ei/dead_letter/"
    state = {"messages": 0}
    subscribed = threading.Event()

    def on_connect(client: Any, *_a: Any) -> None:
        _nodelay(client)
        client.subscribe([(f"{out_prefix}+", 1), (f"{dl_prefix}#", 1)])

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        now = time.time()
        state["messages"] += 1
        topic = msg.topic
        try:
            if topic.startswith(out_prefix):
                ts = json.loads(msg.payload)["ts"]
                stamp = datetime.fromisoformat(ts).timestamp()
                n = round((stamp - t0) * 1000.0)
                if not 0 <= n < plan.messages:
                    other["answer_out_of_range"] += 1
                    return
                if answers[n] == 0:
                    arrival[n] = now
                answers[n] += 1
                per_second[int(now)] += 1
            elif topic.startswith(dl_prefix):
                body = json.loads(msg.payload)
                found = N_FIELD.search(str(body.get("payload", "")).encode())
                dead.append((int(found.group(1)) if found else -1, str(body.get("reason")), now))
            else:
                other[topic.split("/")[1] if "/" in topic else topic] += 1
        except (ValueError, KeyError, TypeError):
            other["unparsed"] += 1

    client = _paho(f"{PREFIX}-sub-{run}", clean=False)
    client.on_connect = on_connect
    client.on_message = on_message
    client.on_subscribe = lambda *_a: subscribed.set()
    client.connect("127.0.0.1", port, keepalive=30)
    client.loop_start()
    subscribed.wait(10)
    conn.send("ready")
    while True:
        command = conn.recv()
        if command == "count":
            conn.send((int(np.count_nonzero(answers)), len(dead), state["messages"]))
        elif command == "take":
            conn.send(
                {
                    "arrival": arrival,
                    "answers": answers,
                    "dead": dead,
                    "other": dict(other),
                    "per_second": dict(per_second),
                }
            )
        elif command == "stop":
            break
    client.loop_stop()
    client.disconnect()


class Helper:
    """A forked helper process spoken to over a pipe."""

    def __init__(self, target: Any, *args: Any) -> None:
        self.conn, child = CTX.Pipe()
        self.proc = CTX.Process(target=target, args=(*args, child), daemon=True)
        self.proc.start()
        if not self.conn.poll(30) or self.conn.recv() != "ready":
            raise RuntimeError(f"{target.__name__} did not start")

    def ask(self, command: Any, timeout: float = 60.0) -> Any:
        self.conn.send(command)
        if not self.conn.poll(timeout):
            raise TimeoutError(f"no answer to {command!r}")
        return self.conn.recv()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send("stop")
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()


# ---------------------------------------------------------------------- the daemon


@dataclass
class Lifetime:
    pid: int
    spawned: float
    ready: float | None = None
    ended: float | None = None
    how: str = "running"  # how it ended: SIGKILL, SIGTERM, end-of-run
    exit_code: int | None = None
    counters: dict[str, float] = field(default_factory=dict)  # last scrape
    samples: list[tuple[float, float, int]] = field(default_factory=list)  # (time, RSS MB, fds)


class Daemon:
    """``python -m edge.cli run -c CONFIG`` started, scraped, signalled and started again."""

    def __init__(self, config: Path, metrics_port: int, log_path: Path) -> None:
        self.config = config
        self.metrics_port = metrics_port
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.lifetimes: list[Lifetime] = []
        self.lock = threading.RLock()
        self.restarting = threading.Lock()  # a planned restart and a crash restart never overlap

    def start(self, timeout: float = 60.0) -> Lifetime:
        with self.lock, self.log_path.open("ab") as log:
            log.write(f"\n==== start at {time.time():.3f}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edge.cli", "run", "-c", str(self.config), "--log-level", "WARNING"],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
            life = Lifetime(self.proc.pid, time.time())
            self.lifetimes.append(life)
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                if not self.lifetimes[1:]:
                    raise RuntimeError(f"daemon did not become ready; see {self.log_path}")
                # Mid-run: note it and carry on (an exit is seen and restarted by the sampler).
                life.how = "running, not ready in time"
                return life
            time.sleep(0.05)
        life.ready = time.time()
        return life

    def _get(self, path: str, timeout: float = 2.0) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}{path}", timeout=timeout) as r:
                return int(r.status), r.read().decode()
        except urllib.error.HTTPError as exc:
            return int(exc.code), ""
        except OSError:
            return 0, ""

    def healthy(self) -> bool:
        return self._get("/healthz", 1.0)[0] == 200

    def scrape(self) -> dict[str, float] | None:
        """The drop, in and out counters of the running lifetime (kept as its last word)."""
        status, text = self._get("/metrics")
        if status != 200:
            return None
        counters: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("edge_infer_dropped_total{"):
                reason = re.search(r'reason="([^"]+)"', line)
                if reason:
                    counters["dropped:" + reason.group(1)] = float(line.rsplit(" ", 1)[1])
            elif line.startswith(("edge_infer_messages_in_total{", "edge_infer_messages_out_total{")):
                counters[line.split("{", 1)[0]] = float(line.rsplit(" ", 1)[1])
            elif line.startswith("edge_infer_reconnects_total "):
                counters["reconnects"] = float(line.rsplit(" ", 1)[1])
        with self.lock:
            if self.lifetimes and self.lifetimes[-1].ended is None:
                self.lifetimes[-1].counters = counters
        return counters

    def sample(self) -> None:
        with self.lock:
            if self.proc is None or not self.lifetimes or self.lifetimes[-1].ended is not None:
                return
            if self.proc.poll() is not None:
                return  # it died: see crashed()
            pid = self.proc.pid
            life = self.lifetimes[-1]
        try:
            rss_kb = 0
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss_kb = int(line.split()[1])
            fds = len(os.listdir(f"/proc/{pid}/fd"))
        except (OSError, ValueError):
            return
        life.samples.append((time.time(), rss_kb / 1024.0, fds))

    def crashed(self) -> Lifetime | None:
        """The running lifetime if its process exited on its own (then marked ended), else None."""
        with self.lock:
            if self.proc is None or not self.lifetimes or self.lifetimes[-1].ended is not None:
                return None
            code = self.proc.poll()
            if code is None:
                return None
            life = self.lifetimes[-1]
            life.ended = time.time()
            life.exit_code = code
            life.how = f"died unplanned (exit {code})"
            self.proc = None
            return life

    def signal(self, sig: signal.Signals) -> None:
        with self.lock:
            if self.proc is None:
                return
            if sig in (signal.SIGKILL, signal.SIGTERM):
                self.scrape()  # the lifetime's last counters: a restart resets them
            self.proc.send_signal(sig)
            if sig not in (signal.SIGKILL, signal.SIGTERM):
                return
            life = self.lifetimes[-1]
            life.ended = time.time()
            life.how = sig.name
        try:
            code = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
            life.how += " (then SIGKILL after 30 s)"
        life.exit_code = code
        life.ended = time.time()
        with self.lock:
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.signal(signal.SIGTERM)
            self.lifetimes[-1].how = "end of run (SIGTERM)"


def daemon_config(workdir: Path, plan: Plan, proxy_port: int, metrics_port: int, run: str) -> Path:
    config = {
        "mqtt": {
            "url": f"mqtt://127.0.0.1:{proxy_port}",
            "base_topic": f"{PREFIX}/ei",
            "client_id": f"{PREFIX}-daemon-{run}",
            "keepalive": KEEPALIVE_S,
            "reconnect_min_s": 0.2,
            "reconnect_max_s": 1.0,
            "persistent_session": True,
        },
        "models": {"ff": {"path": "ff.onnx"}},
        "pipelines": {
            "snap": {
                "model": "ff",
                "source": {"topics": [f"{PREFIX}/in/{{device}}"], "qos": 1, "timestamp_field": "t"},
                "output": {"topic": f"{PREFIX}/out/{{device}}", "qos": 1},
                "max_devices": plan.devices,
                "devices": [f"d{i}" for i in range(plan.devices)],
            }
        },
        "limits": {"max_payload_bytes": MAX_PAYLOAD},
        "dead_letter": {"enabled": True, "max_per_s": 100_000.0},
        "metrics": {"enabled": True, "host": "127.0.0.1", "port": metrics_port},
        "homeassistant": {"enabled": False},
        "reload": {"watch_models": False},
        "bridge_info_interval_s": 10.0,
    }
    path = workdir / "daemon.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# ---------------------------------------------------------------------- the run


@dataclass
class Fault:
    kind: str
    at: float  # time.time() of injection
    planned_s: float  # seconds after the first message, as drawn
    detail: dict[str, Any] = field(default_factory=dict)
    over: float | None = None  # the fault's own handling is done (broker/daemon back, reconnected)


def faultsoak(plan: Plan, out_dir: Path | None, log: Any = print) -> dict[str, Any]:
    """Run the soak; write results under ``out_dir`` (None: write nothing); return the result."""
    began = time.time()
    run = uuid.uuid4().hex[:8]
    workdir = Path(tempfile.mkdtemp(prefix="edge-faultsoak-"))
    t0 = t0_of(began)
    broker = Mosquitto(
        workdir / "mosquitto",
        persistence=True,
        autosave_interval_s=AUTOSAVE_S,
        # Per client: QoS 1 messages queued beyond those in flight. Mosquitto drops (silently,
        # counted in $SYS) what does not fit; 1,000,000 is far above any outage's backlog here.
        max_queued_messages=1_000_000,
        # Dead letters are QoS 0: keep them for the (persistent) subscriber while it reconnects.
        extra_config="max_inflight_messages 1000\nqueue_qos0_messages true\nset_tcp_nodelay true",
        log_information=False,
    )
    broker.start()
    models.feed_forward(workdir / "ff.onnx")
    sub = Helper(_subscriber, broker.port, plan, t0, run)
    pub = Helper(_publisher, broker.port, plan, t0, run)
    proxy = FaultProxy(broker.port)
    metrics_port = free_port()
    config = daemon_config(workdir, plan, proxy.port, metrics_port, run)
    daemon = Daemon(config, metrics_port, workdir / "daemon.log")
    faults: list[Fault] = []
    progress: list[tuple[float, int, int]] = []  # (time, answered numbers, dead letters)
    stop = threading.Event()
    errors: list[str] = []

    def sampler() -> None:
        tick = 0
        while not stop.wait(1.0):
            try:
                with daemon.restarting:
                    dead = daemon.crashed()
                    if dead is not None:  # restart it, as systemd's Restart= would, and say so
                        at = dead.ended or time.time()
                        fault = Fault("daemon_died", at, round(at - start, 1))
                        fault.detail["exit_code"] = dead.exit_code
                        log(f"  t={at - start:6.1f}s the daemon died (exit {dead.exit_code}); restarting")
                        life = daemon.start()
                        fault.detail["restart_ready_s"] = (
                            None if life.ready is None else round(life.ready - at, 2)
                        )
                        fault.over = time.time()
                        faults.append(fault)
                daemon.sample()
                daemon.scrape()
                answered, dead, _ = sub.ask("count", 10)
                progress.append((time.time(), answered, dead))
                tick += 1
                if tick % 30 == 0:
                    life = daemon.lifetimes[-1]
                    rss = f"{life.samples[-1][1]:.1f} MB, {life.samples[-1][2]} fds" if life.samples else "-"
                    log(
                        f"  t={time.time() - start:6.0f}s answered {answered:,} dead-lettered {dead:,}; {rss}"
                    )
            except Exception as exc:  # the sampler must not die quietly
                errors.append(f"sampler: {type(exc).__name__}: {exc}")

    start = time.time()
    result: dict[str, Any]
    try:
        first = daemon.start()
        log(
            f"faultsoak {run}: broker :{broker.port}, proxy :{proxy.port}, daemon pid {first.pid} ready in "
            f"{(first.ready or 0) - first.spawned:.2f}s; {plan.messages:,} messages at {plan.rate:g}/s, "
            f"{plan.devices} devices, about {plan.duration_s:.0f}s"
        )
        threading.Thread(target=sampler, name="sampler", daemon=True).start()
        start = time.time() + 0.5
        pub.conn.send(start)
        for planned, kind in plan.fault_schedule():
            wait = start + planned - time.time()
            if wait > 0:
                time.sleep(wait)
            fault = inject(kind, planned, broker=broker, proxy=proxy, daemon=daemon, log=log, start=start)
            faults.append(fault)
        log("  publishing done soon; waiting for the publisher")
        if not pub.conn.poll(plan.duration_s + 600):
            raise TimeoutError("publisher never finished")
        published = pub.conn.recv()
        log(f"  all published at t={time.time() - start:.0f}s; settling")
        settle(sub, plan, published, log)
        stop.set()
        daemon.scrape()
        daemon.stop()
        received = sub.ask("take", 120)
        ended = time.time()
        result = analyse(
            plan,
            run,
            began=began,
            start=start,
            ended=ended,
            published=published,
            received=received,
            faults=faults,
            daemon=daemon,
            progress=progress,
        )
        result["errors"] = errors
        result["daemon_log_tail"] = _tail(daemon.log_path, 40)
        result["broker_log_warnings"] = _broker_warnings(broker.workdir / "mosquitto.log")
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            daemon.stop()
        pub.close()
        sub.close()
        proxy.close()
        broker.stop()
    if out_dir is not None:
        write(result, out_dir)
    if plan.keep:
        result["workdir"] = str(workdir)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def inject(
    kind: str, planned: float, *, broker: Mosquitto, proxy: FaultProxy, daemon: Daemon, log: Any, start: float
) -> Fault:
    rng = random.Random(f"{kind}-{planned}")
    link_fault = kind in ("proxy_cut", "proxy_stall", "broker_kill")
    reconnects = (daemon.scrape() or {}).get("reconnects", 0.0) if link_fault else 0.0
    fault = Fault(kind, time.time(), round(planned, 1))
    if kind == "proxy_cut":
        fault.detail["connections"] = proxy.cut()
        fault.over = time.time()
    elif kind == "proxy_stall":
        before = len(proxy.accepted)
        fault.detail["connections"] = proxy.stall()
        deadline = time.monotonic() + 60
        while len(proxy.accepted) == before and time.monotonic() < deadline:
            time.sleep(0.05)
        fault.over = time.time()
        fault.detail["detected_and_reconnected_s"] = round(fault.over - fault.at, 2)
    elif kind == "broker_kill":
        broker.stop(kill=True)
        down = rng.uniform(0.5, 3.0)
        time.sleep(down)
        broker.start()
        fault.detail["down_s"] = round(down, 2)
        deadline = time.monotonic() + 30
        while not daemon.healthy() and time.monotonic() < deadline:
            time.sleep(0.05)
        fault.over = time.time()
    elif kind in ("daemon_kill", "daemon_term"):
        with daemon.restarting:
            daemon.signal(signal.SIGKILL if kind == "daemon_kill" else signal.SIGTERM)
            stopped = time.time()
            fault.detail["stop_s"] = round(stopped - fault.at, 2)
            fault.detail["exit_code"] = daemon.lifetimes[-1].exit_code
            life = daemon.start()
        fault.detail["restart_ready_s"] = None if life.ready is None else round(life.ready - stopped, 2)
        fault.over = time.time()
    elif kind == "daemon_hup":
        with daemon.lock:
            if daemon.proc is not None:
                daemon.proc.send_signal(signal.SIGHUP)
        fault.over = time.time()
    else:
        raise ValueError(kind)
    if link_fault:
        # The daemon's link is back: its reconnect counter moved and /healthz says connected.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            now = daemon.scrape() or {}
            if now.get("reconnects", 0.0) > reconnects and daemon.healthy():
                fault.detail["reconnected_s"] = round(time.time() - fault.at, 2)
                break
            time.sleep(0.05)
    log(f"  t={fault.at - start:6.1f}s fault {kind} {fault.detail}")
    return fault


def settle(sub: Helper, plan: Plan, published: dict[str, Any], log: Any) -> None:
    """Wait until every number is answered or dead-lettered, or nothing new for ``settle_s``."""
    good = int(np.count_nonzero(published["kinds"] == 0))
    bad = plan.messages - good
    last: tuple[int, int] | None = None
    changed = time.monotonic()
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        answered, dead, _ = sub.ask("count", 10)
        if answered >= good and dead >= bad:
            time.sleep(2.0)  # late duplicates
            return
        if (answered, dead) != last:
            last, changed = (answered, dead), time.monotonic()
        elif time.monotonic() - changed > plan.settle_s:
            log(f"  settled with {answered:,}/{good:,} answered, {dead:,} dead letters")
            return
        time.sleep(0.5)


# ---------------------------------------------------------------------- analysis


def analyse(
    plan: Plan,
    run: str,
    *,
    began: float,
    start: float,
    ended: float,
    published: dict[str, Any],
    received: dict[str, Any],
    faults: list[Fault],
    daemon: Daemon,
    progress: list[tuple[float, int, int]],
) -> dict[str, Any]:
    kinds: np.ndarray = published["kinds"]
    sent_t: np.ndarray = published["sent_t"]
    acked: np.ndarray = published["acked"]
    arrival: np.ndarray = received["arrival"]
    answers: np.ndarray = received["answers"]
    n = plan.messages
    good = kinds == 0
    answered = answers > 0
    dl_reasons: dict[int, Counter[str]] = {}
    dl_by_reason: Counter[str] = Counter()
    unnamed_dl = 0
    for number, reason, _ in received["dead"]:
        dl_by_reason[reason] += 1
        if 0 <= number < n:
            dl_reasons.setdefault(number, Counter())[reason] += 1
        else:
            unnamed_dl += 1
    dead = np.zeros(n, dtype=bool)
    if dl_reasons:
        dead[np.fromiter(dl_reasons, dtype=np.int64)] = True

    # Bad messages: dead-lettered with the expected reason, never answered.
    bad_rows = {}
    mismatched: list[dict[str, Any]] = []
    for k, name in enumerate(KIND_NAMES[1:], start=1):
        numbers = np.flatnonzero(kinds == k)
        expected = BAD_KINDS[name]
        right = sum(1 for i in numbers.tolist() if expected in dl_reasons.get(i, {}))
        for i in numbers.tolist():
            got = dl_reasons.get(i)
            if got and expected not in got and len(mismatched) < 20:
                mismatched.append({"n": i, "kind": name, "reasons": dict(got)})
        bad_rows[name] = {
            "reason": expected,
            "sent": int(numbers.size),
            "dead_lettered_with_reason": right,
            "answered": int(np.count_nonzero(answered[numbers])),
        }

    unaccounted = np.flatnonzero(~answered & ~dead)
    kill_windows = [
        (f.at - AUTOSAVE_S - 2.0, f.at) for f in faults if f.kind == "broker_kill"
    ]  # PUBACKed or answered since the last autosave: lost with the broker's memory

    def near_broker_kill(i: int) -> bool:
        t = sent_t[i]
        return any(lo <= t <= hi for lo, hi in kill_windows)

    by_design = [int(i) for i in unaccounted.tolist() if near_broker_kill(i)]
    unexplained = [int(i) for i in unaccounted.tolist() if not near_broker_kill(i)]
    good_dead_only = np.flatnonzero(good & dead & ~answered)
    redelivered_rejects: Counter[str] = Counter()
    for i, reasons in dl_reasons.items():
        if answered[i] and good[i]:
            redelivered_rejects.update(reasons)
    duplicates = int(np.sum(np.maximum(answers.astype(np.int64) - 1, 0)))

    counted: Counter[str] = Counter()
    for life in daemon.lifetimes:
        for key, value in life.counters.items():
            if key.startswith("dropped:"):
                counted[key.split(":", 1)[1]] += int(value)

    accounting = {
        "messages": n,
        "good": int(good.sum()),
        "bad": int((~good).sum()),
        "broker_accepted": int(acked.sum()),
        "answered": int(answered.sum()),
        "answered_good": int((answered & good).sum()),
        "answered_bad": int((answered & ~good).sum()),
        "duplicates": duplicates,
        "numbers_answered_more_than_once": int(np.count_nonzero(answers > 1)),
        "dead_lettered_not_answered": int((dead & ~answered).sum()),
        "dead_lettered_not_answered_by_reason": dict(
            Counter(r for i in np.flatnonzero(dead & ~answered).tolist() for r in dl_reasons[i])
        ),
        "dead_letters_received": int(sum(dl_by_reason.values())),
        "dead_letters_by_reason": dict(dl_by_reason),
        "dead_letters_unnamed": unnamed_dl,
        "good_dead_lettered_never_answered": [
            {"n": int(i), "reasons": dict(dl_reasons[int(i)])} for i in good_dead_only[:20]
        ],
        "good_dead_lettered_never_answered_count": int(good_dead_only.size),
        "good_dead_lettered_never_answered_by_nearest_fault": dict(
            Counter(
                min(faults, key=lambda f: abs(f.at - sent_t[i])).kind if faults else "none"
                for i in good_dead_only.tolist()
            )
        ),
        "answered_and_also_dead_lettered_on_redelivery": dict(redelivered_rejects),
        "bad_kinds": bad_rows,
        "bad_with_wrong_reason": mismatched,
        "unaccounted": int(unaccounted.size),
        "unaccounted_lost_by_broker_kill": len(by_design),
        "unaccounted_unexplained": len(unexplained),
        "unaccounted_first": [
            _describe(i, sent_t=sent_t, acked=acked, kinds=kinds, faults=faults, start=start)
            for i in unaccounted[:20]
        ],
        "daemon_counted_drops_by_reason": dict(counted),
        "daemon_counted_drops": int(sum(counted.values())),
        "subscriber_other": received["other"],
    }

    fault_rows = [
        _recovery(f, faults=faults, sent_t=sent_t, arrival=arrival, good=good, start=start) for f in faults
    ]
    lifetimes = [_lifetime_row(i, life, plan, start) for i, life in enumerate(daemon.lifetimes)]
    judged = [row for row in lifetimes if row["judged"]]
    latency = arrival - sent_t
    ok = good & answered & np.isfinite(latency)
    lat_ms = latency[ok] * 1000.0
    samples = [
        (round(t - start, 1), round(rss, 2), fds, i)
        for i, life in enumerate(daemon.lifetimes)
        for t, rss, fds in life.samples
    ]
    return {
        "date": datetime.fromtimestamp(began, UTC).isoformat(timespec="seconds"),
        "command": (
            f"python -m bench.faultsoak --messages {plan.messages} --devices {plan.devices} "
            f"--rate {plan.rate:g} --seed {plan.seed} --bad-fraction {plan.bad_fraction:g} "
            + (
                f"--fault-every {plan.fault_every_s:g}"
                if plan.faults is None
                else f"--faults {','.join(plan.faults)}"
            )
        ),
        "machine": machine(),
        "plan": {
            "messages": plan.messages,
            "devices": plan.devices,
            "rate_msg_s": plan.rate,
            "seed": plan.seed,
            "bad_fraction": plan.bad_fraction,
            "fault_every_s": plan.fault_every_s,
            "warmup_s": plan.warmup_s,
            "keepalive_s": KEEPALIVE_S,
            "mosquitto_autosave_interval_s": AUTOSAVE_S,
            "max_payload_bytes": MAX_PAYLOAD,
        },
        "run_id": run,
        "runtime_s": round(ended - began, 1),
        "publish_s": round(float(np.nanmax(sent_t) - np.nanmin(sent_t)), 1),
        "send_rate_msg_s": round(n / max(1e-9, float(np.nanmax(sent_t) - np.nanmin(sent_t))), 1),
        "latency_ms": percentiles(lat_ms, (50, 99, 99.9), digits=2, mean=False),
        "accounting": accounting,
        "complete": accounting["unaccounted_unexplained"] == 0
        and accounting["answered_bad"] == 0
        and not mismatched,
        "faults": fault_rows,
        "lifetimes": lifetimes,
        "memory_flat": bool(judged) and all(row["flat"] for row in judged),
        "samples": samples,
        "progress": [(round(t - start, 1), a, d) for t, a, d in progress],
        "answers_per_s": sorted((math.floor(k - start), v) for k, v in received["per_second"].items()),
    }


def _describe(
    i: int, *, sent_t: np.ndarray, acked: np.ndarray, kinds: np.ndarray, faults: list[Fault], start: float
) -> dict[str, Any]:
    t = float(sent_t[i])
    nearest = min(faults, key=lambda f: abs(f.at - t), default=None)
    return {
        "n": int(i),
        "kind": KIND_NAMES[int(kinds[i])],
        "sent_s": round(t - start, 3),
        "broker_acked": bool(acked[i]),
        "nearest_fault": None
        if nearest is None
        else {
            "kind": nearest.kind,
            "at_s": round(nearest.at - start, 3),
            "sent_minus_fault_s": round(t - nearest.at, 3),
        },
    }


def _recovery(
    f: Fault, *, faults: list[Fault], sent_t: np.ndarray, arrival: np.ndarray, good: np.ndarray, start: float
) -> dict[str, Any]:
    """Answers flow again: the first answer to a message sent after the fault. Caught up: from then
    on every message (until the next fault) is answered within a second."""
    later = [g.at for g in faults if g.at > f.at]
    until = min(later) if later else math.inf
    window = good & (sent_t >= f.at) & (sent_t < until)
    row: dict[str, Any] = {
        "kind": f.kind,
        "at_s": round(f.at - start, 2),
        **f.detail,
        "handled_s": None if f.over is None else round(f.over - f.at, 2),
    }
    if not window.any():
        return {**row, "answers_again_s": None, "caught_up_s": None}
    arrivals = arrival[window]
    answered = np.isfinite(arrivals)
    row["answers_again_s"] = round(float(np.nanmin(arrivals) - f.at), 2) if answered.any() else None
    latency = np.where(answered, arrivals - sent_t[window], np.inf)
    # Slow answers that arrived after the next fault are that fault's doing, not this one's.
    slow = np.flatnonzero((latency > 1.0) & ~(arrivals >= until))
    if slow.size == 0:
        row["caught_up_s"] = row["answers_again_s"]
    else:
        last = slow[-1]
        row["caught_up_s"] = round(float(arrivals[last] - f.at), 2) if np.isfinite(arrivals[last]) else None
    row["late_answers_over_1s"] = int(slow.size)
    return row


def _lifetime_row(i: int, life: Lifetime, plan: Plan, start: float) -> dict[str, Any]:
    row: dict[str, Any] = {
        "index": i,
        "pid": life.pid,
        "started_s": round(life.spawned - start, 1),
        "ready_in_s": None if life.ready is None else round(life.ready - life.spawned, 2),
        "ended_s": None if life.ended is None else round(life.ended - start, 1),
        "how": life.how,
        "exit_code": life.exit_code,
        "counters": life.counters,
    }
    samples = [(t - start, rss, fds) for t, rss, fds in life.samples]
    row.update(_judge(samples, life.spawned - start, plan.warmup_s))
    return row


def _judge(samples: list[tuple[float, float, int]], spawned: float, warmup_s: float) -> dict[str, Any]:
    """RSS and fd figures of one process lifetime from its (time, RSS MB, fds) samples; samples of a
    process that is gone (no fds: it died and was not yet reaped) are left out."""
    died = next((t for t, _, fds in samples if fds == 0), None)
    live = [x for x in samples if x[2] > 0]
    row: dict[str, Any] = {"judged": False, "died_unplanned_s": None if died is None else round(died, 1)}
    if not live:
        return row
    after = [x for x in live if x[0] >= spawned + warmup_s and x[0] >= 0]
    row.update(
        rss_first_mb=round(live[0][1], 1),
        rss_last_mb=round(live[-1][1], 1),
        rss_peak_mb=round(max(x[1] for x in live), 1),
        fds_first=live[0][2],
        fds_last=live[-1][2],
    )
    if len(after) < 30:  # under half a minute after warm-up: too short to judge a trend
        return row
    k = max(5, len(after) // 10)
    base = statistics.median(x[1] for x in after[:k])
    end = statistics.median(x[1] for x in after[-k:])
    high = max(x[1] for x in after)
    low = min(x[1] for x in after)
    fd_base = statistics.median_low([x[2] for x in after[:k]])
    fd_end = statistics.median_low([x[2] for x in after[-k:]])
    drift = (end - base) / base
    row.update(
        judged=True,
        seconds_judged=round(after[-1][0] - after[0][0], 1),
        rss_after_warmup_mb=round(base, 2),
        rss_end_mb=round(end, 2),
        rss_max_after_warmup_mb=round(high, 2),
        rss_min_after_warmup_mb=round(low, 2),
        rss_drift=round(drift, 4),
        rss_range=round((high - low) / base, 4),
        fds_after_warmup=fd_base,
        fds_end=fd_end,
        fds_max_after_warmup=max(x[2] for x in after),
        flat=abs(drift) <= 0.05 and high <= base * 1.05 and fd_end <= fd_base,
    )
    return row


def rejudge(result: dict[str, Any]) -> dict[str, Any]:
    """Recompute the per-lifetime memory figures from the samples kept in a result (``--rewrite``)."""
    for row in result["lifetimes"]:
        samples = [(t, rss, fds) for t, rss, fds, life in result["samples"] if life == row["index"]]
        for key in [k for k in row if k.startswith(("rss_", "fds_", "seconds_judged", "flat"))]:
            del row[key]
        row.update(_judge(samples, row["started_s"], result["plan"]["warmup_s"]))
    judged = [row for row in result["lifetimes"] if row["judged"]]
    result["memory_flat"] = bool(judged) and all(row["flat"] for row in judged)
    return result


def _tail(path: Path, lines: int) -> list[str]:
    if not path.exists():
        return []
    return path.read_text(errors="replace").splitlines()[-lines:]


def _broker_warnings(path: Path) -> list[str]:
    if not path.exists():
        return []
    keep = [
        line
        for line in path.read_text(errors="replace").splitlines()
        if any(w in line.lower() for w in ("warning", "error", "drop", "outgoing messages are being"))
    ]
    return keep[:40]


# ---------------------------------------------------------------------- output


def write(result: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem: Path = out_dir / (str(result["date"])[:19].replace(":", "") + "-faultsoak")
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    plot(result, stem.with_name(stem.name + ".png"))
    return stem


def markdown(r: dict[str, Any]) -> str:
    a = r["accounting"]
    p = r["plan"]
    lines = [
        f"# Fault soak: {p['messages']:,} messages with faults at random ({r['date']})",
        "",
        f"`{r['command']}`: {p['devices']:,} devices, {p['rate_msg_s']:g} msg/s offered "
        f"(sent at {r['send_rate_msg_s']:g}/s over {r['publish_s']:g} s), QoS 1 in and out, "
        f"{p['bad_fraction']:.0%} deliberately bad, keepalive {p['keepalive_s']} s, Mosquitto persistence "
        f"with autosave every {p['mosquitto_autosave_interval_s']} s. Runtime {r['runtime_s']:g} s "
        f"on {r['machine']['usable_cpus']} CPUs (load average at start "
        f"{', '.join(map(str, r['machine']['loadavg_start']))}).",
        "",
        "## Accounting",
        "",
        "| | messages |",
        "|---|---:|",
        f"| published (QoS 1) | {a['messages']:,} |",
        f"| accepted by the broker (PUBACK) | {a['broker_accepted']:,} |",
        f"| good / deliberately bad | {a['good']:,} / {a['bad']:,} |",
        f"| **answered** (distinct numbers) | **{a['answered']:,}** |",
        f"| duplicate answers (at-least-once) | {a['duplicates']:,} over "
        f"{a['numbers_answered_more_than_once']:,} numbers |",
        f"| **dead-lettered with a reason**, not answered | **{a['dead_lettered_not_answered']:,}** |",
        f"| **unaccounted** | **{a['unaccounted']:,}** |",
        "| of which lost with a broker SIGKILL (not yet autosaved) | "
        f"{a['unaccounted_lost_by_broker_kill']:,} |",
        f"| of which unexplained | {a['unaccounted_unexplained']:,} |",
        f"| bad messages answered (must be 0) | {a['answered_bad']:,} |",
        "| good messages dead-lettered, never answered (a later reading came first) | "
        f"{a['good_dead_lettered_never_answered_count']:,} |",
        "",
        "Deliberately bad messages, by kind:",
        "",
        "| kind | reason expected | sent | dead-lettered with that reason | answered |",
        "|---|---|---:|---:|---:|",
    ]
    for name, row in a["bad_kinds"].items():
        lines.append(
            f"| {name} | `{row['reason']}` | {row['sent']:,} | {row['dead_lettered_with_reason']:,} "
            f"| {row['answered']:,} |"
        )
    lines += [
        "",
        "Drops by reason: dead letters received (each names its message; redeliveries make some "
        "twice) beside the daemon's own counters (`edge_infer_dropped_total`, summed over its "
        f"{len(r['lifetimes'])} process lifetimes, each read just before it was stopped):",
        "",
        "| reason | dead letters | daemon counters |",
        "|---|---:|---:|",
    ]
    reasons = sorted(set(a["dead_letters_by_reason"]) | set(a["daemon_counted_drops_by_reason"]))
    for reason in reasons:
        lines.append(
            f"| `{reason}` | {a['dead_letters_by_reason'].get(reason, 0):,} "
            f"| {a['daemon_counted_drops_by_reason'].get(reason, 0):,} |"
        )
    if a["answered_and_also_dead_lettered_on_redelivery"]:
        lines += [
            "",
            "Good messages answered *and* rejected on a redelivery (at-least-once: the broker sent an "
            "input again whose acknowledgement died with the connection; by then a later reading of "
            "that device had been taken): "
            + ", ".join(f"`{k}` {v:,}" for k, v in a["answered_and_also_dead_lettered_on_redelivery"].items())
            + ".",
        ]
    if a["good_dead_lettered_never_answered_count"]:
        lines += [
            "",
            "Good messages dead-lettered and never answered, by the nearest fault: "
            + ", ".join(
                f"{k} {v:,}" for k, v in a["good_dead_lettered_never_answered_by_nearest_fault"].items()
            )
            + ". First of them:",
            "",
            "```",
            *map(json.dumps, a["good_dead_lettered_never_answered"][:10]),
            "```",
        ]
    if a["unaccounted_first"]:
        lines += [
            "",
            "First unaccounted numbers:",
            "",
            "```",
            *map(json.dumps, a["unaccounted_first"]),
            "```",
        ]
    lines += [
        "",
        "## Faults",
        "",
        "*answers again*: from the fault to the first answer to a message sent after it; *caught up*: "
        "to the last answer that took more than 1 s (the backlog worked off).",
        "",
        "| # | t (s) | fault | detail | answers again (s) | caught up (s) |",
        "|---:|---:|---|---|---:|---:|",
    ]
    for i, f in enumerate(r["faults"], 1):
        skip = {"kind", "at_s", "answers_again_s", "caught_up_s", "late_answers_over_1s", "handled_s"}
        detail = ", ".join(f"{k} {v}" for k, v in f.items() if k not in skip)
        lines.append(
            f"| {i} | {f['at_s']:.1f} | {f['kind']} | {detail} | {_fmt(f.get('answers_again_s'))} "
            f"| {_fmt(f.get('caught_up_s'))} |"
        )
    lines += [
        "",
        f"Answer latency (good messages, send to arrival at the subscriber, faults included): "
        f"p50 {r['latency_ms'].get('p50')} ms, p99 {r['latency_ms'].get('p99')} ms, "
        f"p99.9 {r['latency_ms'].get('p99.9')} ms, max {r['latency_ms'].get('max')} ms.",
        "",
        "## Memory and file descriptors, per daemon process",
        "",
        f"Sampled every second (VmRSS, entries of /proc/PID/fd). Judged after a {p['warmup_s']:g} s "
        "warm-up for lifetimes with at least 30 s after it: *drift* compares the median of the first and "
        "last tenth; flat = |drift| ≤ 5 %, the maximum within 5 % of the post-warm-up level, and no more "
        "fds at the end than after the warm-up.",
        "",
        "| # | pid | from (s) | to (s) | ended by | ready in (s) | RSS after warm-up → end (MB) | "
        "RSS max (MB) | drift | fds after warm-up → end (max) | flat |",
        "|---:|---:|---:|---:|---|---:|---|---:|---:|---|---|",
    ]
    for row in r["lifetimes"]:
        life = row
        if row.get("died_unplanned_s") is not None and not str(row["how"]).startswith("died"):
            life = {
                **row,
                "how": f"**died by itself** at {life['died_unplanned_s']} s (exit {life['exit_code']}); "
                f"reaped by the next planned {life['how']}",
            }
        if life["judged"]:
            rss = f"{life['rss_after_warmup_mb']:.1f} → {life['rss_end_mb']:.1f}"
            lines.append(
                f"| {life['index']} | {life['pid']} | {life['started_s']} | {life['ended_s']} "
                f"| {life['how']} "
                f"| {_fmt(life['ready_in_s'])} | {rss} | {life['rss_max_after_warmup_mb']:.1f} "
                f"| {life['rss_drift']:+.1%} | {life['fds_after_warmup']} → {life['fds_end']} "
                f"({life['fds_max_after_warmup']}) | {'yes' if life['flat'] else '**no**'} |"
            )
        else:
            rss = (
                f"{life.get('rss_first_mb', '-')} → {life.get('rss_last_mb', '-')}"
                if "rss_first_mb" in life
                else "-"
            )
            lines.append(
                f"| {life['index']} | {life['pid']} | {life['started_s']} | {life['ended_s']} "
                f"| {life['how']} "
                f"| {_fmt(life['ready_in_s'])} | {rss} (too short to judge) | {life.get('rss_peak_mb', '-')} "
                f"| - | {life.get('fds_first', '-')} → {life.get('fds_last', '-')} | - |"
            )
    lines += [
        "",
        f"Memory flat in every judged lifetime: **{'yes' if r['memory_flat'] else 'no'}**. "
        f"Accounting complete (nothing unexplained): **{'yes' if r['complete'] else 'no'}**.",
        "",
        "## What cannot be answered, by design",
        "",
        "- Mosquitto keeps its state in memory and writes it to `mosquitto.db` every "
        "`autosave_interval` seconds (mosquitto.conf(5)); a SIGKILL loses what arrived since the last "
        "save: QoS 1 messages it had already acknowledged to the publisher, and answers it had already "
        "acknowledged to the daemon. Such numbers are listed as *lost with a broker SIGKILL* when sent "
        f"within {AUTOSAVE_S + 2} s before the kill. A SIGTERM (or `autosave_on_changes`) saves first.",
        "- Messages Mosquitto queues for a client beyond `max_queued_messages` are dropped by the broker "
        "(counted only in its `$SYS` tree); the soak sets it to 1,000,000, far above any backlog here.",
        "- Dead letters are published at QoS 0 and rate-limited (`dead_letter.max_per_s`, here 100,000): "
        "with a lower limit, or a lost QoS 0 publish, a rejected message is still counted in "
        "`edge_infer_dropped_total` but not named.",
        "",
    ]
    if r.get("errors"):
        lines += ["Harness errors:", "", *(f"- {e}" for e in r["errors"]), ""]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def plot(r: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True, height_ratios=[3, 2])
    colours = dict(
        zip(
            (*FAULT_KINDS, *UNPLANNED),
            ["tab:orange", "tab:purple", "tab:red", "black", "tab:brown", "tab:green", "magenta"],
            strict=True,
        )
    )
    fx = ax.twinx()
    lifetimes = sorted({s[3] for s in r["samples"]})
    for life in lifetimes:
        pts = [s for s in r["samples"] if s[3] == life]
        ax.plot(
            [s[0] for s in pts],
            [s[1] for s in pts],
            color="tab:blue",
            lw=1.2,
            label="daemon RSS (MB)" if life == lifetimes[0] else None,
        )
        fx.plot(
            [s[0] for s in pts],
            [s[2] for s in pts],
            color="tab:gray",
            lw=0.8,
            ls=":",
            label="open fds" if life == lifetimes[0] else None,
        )
    ax.set_ylabel("RSS (MB)")
    fx.set_ylabel("open file descriptors")
    rss = [s[1] for s in r["samples"]]
    if rss:
        ax.set_ylim(0, max(rss) * 1.3)
    fds = [s[2] for s in r["samples"]]
    if fds:
        fx.set_ylim(0, max(fds) * 1.5)
    per_s = r["answers_per_s"]
    bx.plot([x for x, _ in per_s], [y for _, y in per_s], color="tab:blue", lw=0.8, label="answers/s")
    bx.axhline(r["plan"]["rate_msg_s"], color="grey", ls="--", lw=0.8, label="offered msg/s")
    bx.set_ylabel("answers per second")
    bx.set_xlabel("seconds since the first message")
    seen: set[str] = set()
    for f in r["faults"]:
        for axis in (ax, bx):
            axis.axvline(
                f["at_s"],
                color=colours[f["kind"]],
                lw=1.0,
                alpha=0.8,
                label=f["kind"] if axis is ax and f["kind"] not in seen else None,
            )
        seen.add(f["kind"])
    handles, labels = ax.get_legend_handles_labels()
    h2, l2 = fx.get_legend_handles_labels()
    ax.legend(handles + h2, labels + l2, loc="upper left", fontsize=7, ncol=4)
    bx.legend(loc="lower left", fontsize=7)
    a = r["accounting"]
    ax.set_title(
        f"Fault soak: {a['messages']:,} messages, {len(r['faults'])} faults; answered {a['answered']:,}, "
        f"dead-lettered {a['dead_lettered_not_answered']:,}, unaccounted {a['unaccounted']:,}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.faultsoak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=1500.0, help="offered msg/s (below saturation)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--bad-fraction", type=float, default=0.01)
    parser.add_argument("--fault-every", type=float, default=30.0, help="mean seconds between faults")
    parser.add_argument(
        "--faults",
        default=None,
        help=f"comma-separated fault kinds in order instead of random ({', '.join(FAULT_KINDS)})",
    )
    parser.add_argument(
        "--warmup", type=float, default=20.0, help="seconds per daemon lifetime before judging memory"
    )
    parser.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    parser.add_argument("--keep", action="store_true", help="keep the working folder with the logs")
    parser.add_argument(
        "--rewrite",
        type=Path,
        default=None,
        help="recompute the memory figures of a result JSON and rewrite it",
    )
    opts = parser.parse_args(argv)
    if opts.rewrite is not None:
        result = rejudge(json.loads(opts.rewrite.read_text()))
        print(write(result, opts.rewrite.parent))
        return 0
    if find_mosquitto() is None:
        print(f"faultsoak: {MOSQUITTO_HINT}", file=sys.stderr)
        return 2
    faults = None if opts.faults is None else [f.strip() for f in opts.faults.split(",") if f.strip()]
    for f in faults or []:
        if f not in FAULT_KINDS:
            parser.error(f"unknown fault {f!r}")
    plan = Plan(
        messages=opts.messages,
        devices=opts.devices,
        rate=opts.rate,
        seed=opts.seed,
        bad_fraction=opts.bad_fraction,
        fault_every_s=opts.fault_every,
        faults=faults,
        warmup_s=opts.warmup,
        keep=opts.keep,
    )
    result = faultsoak(plan, opts.out or default_out_dir(), log=lambda line: print(line, flush=True))
    shown = {k: v for k, v in result.items() if k not in ("samples", "progress", "answers_per_s", "machine")}
    print(json.dumps(shown, indent=1))
    return 0 if result["complete"] and result["memory_flat"] else 1


if __name__ == "__main__":
    sys.exit(main())
