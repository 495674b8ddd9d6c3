"""sd_notify against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from edge.sdnotify import (
    Heartbeat,
    Liveness,
    Notifier,
    Watchdog,
    monotonic_usec,
    status_line,
    watchdog_usec_from_env,
)


@dataclass
class FakeSystemd:
    """The receiving end of NOTIFY_SOCKET: collects datagrams with their arrival times."""

    sock: socket.socket
    name: str
    received: list[tuple[float, dict[str, str]]] = field(default_factory=list)
    collected: list[tuple[float, dict[str, str]]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _collector: threading.Thread | None = None

    def env(self, **extra: str) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.name, **extra}

    def recv(self, timeout: float = 2.0) -> dict[str, str]:
        self.sock.settimeout(timeout)
        fields = _parse(self.sock.recv(4096))
        self.received.append((time.monotonic(), fields))
        return fields

    def drain(self) -> list[tuple[float, dict[str, str]]]:
        """Everything the background collector received (see :meth:`collect`), or what
        is queued right now when no collector runs."""
        if self._collector is not None:
            self._stop.set()
            self._collector.join(2)
            self._collector = None
            out, self.collected = self.collected, []
            return out
        out = []
        self.sock.setblocking(False)
        try:
            while True:
                out.append((time.monotonic(), _parse(self.sock.recv(4096))))
        except BlockingIOError:
            pass
        return out

    def collect(self) -> None:
        """Receive in a thread, stamping each datagram with its arrival time."""
        self._stop.clear()
        self.sock.settimeout(0.02)

        def loop() -> None:
            while not self._stop.is_set():
                try:
                    data = self.sock.recv(4096)
                except TimeoutError:
                    continue
                self.collected.append((time.monotonic(), _parse(data)))

        self._collector = threading.Thread(target=loop, daemon=True)
        self._collector.start()


def _parse(data: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in data.decode().split("\n"))


def _path_socket() -> Iterator[FakeSystemd]:
    # A short directory of our own: AF_UNIX paths are limited to 108 bytes.
    d = tempfile.mkdtemp(prefix="sdn", dir="/tmp")
    path = os.path.join(d, "notify")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    try:
        yield FakeSystemd(s, path)
    finally:
        s.close()
        shutil.rmtree(d, ignore_errors=True)


def _abstract_socket() -> Iterator[FakeSystemd]:
    name = f"edge-infer-test-{uuid.uuid4().hex}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(b"\0" + name.encode())
    try:
        yield FakeSystemd(s, "@" + name)
    finally:
        s.close()


@pytest.fixture(params=["path", "abstract"])
def systemd(request: pytest.FixtureRequest) -> Iterator[FakeSystemd]:
    factory = _path_socket if request.param == "path" else _abstract_socket
    yield from factory()


@pytest.fixture
def path_systemd() -> Iterator[FakeSystemd]:
    yield from _path_socket()


def test_ready_status_reload_stopping_sequence(systemd: FakeSystemd) -> None:
    n = Notifier(systemd.env())
    assert n.enabled
    assert n.ready(status="2 models, 3 pipelines")
    assert systemd.recv() == {"READY": "1", "STATUS": "2 models, 3 pipelines"}

    assert n.status("warming up\nmodel 'appliance'")
    assert systemd.recv() == {"STATUS": "warming up model 'appliance'"}, "one line only"

    before = monotonic_usec()
    assert n.reloading()
    msg = systemd.recv()
    after = monotonic_usec()
    assert msg["RELOADING"] == "1"
    assert before <= int(msg["MONOTONIC_USEC"]) <= after, "CLOCK_MONOTONIC in microseconds"

    assert n.ready()
    assert systemd.recv() == {"READY": "1"}

    assert n.stopping(status="shutting down")
    assert systemd.recv() == {"STOPPING": "1", "STATUS": "shutting down"}

    assert n.extend_timeout(90)
    assert systemd.recv() == {"EXTEND_TIMEOUT_USEC": "90000000"}
    n.close()


def test_monotonic_usec_matches_clock_monotonic() -> None:
    a = time.clock_gettime(time.CLOCK_MONOTONIC)
    b = monotonic_usec() / 1e6
    assert abs(b - a) < 1.0


def test_noop_without_notify_socket() -> None:
    n = Notifier({})
    assert not n.enabled
    assert n.ready() is False
    assert n.watchdog() is False
    wd = Watchdog(n, lambda: True, env={"WATCHDOG_USEC": "1000000"})
    assert not wd.enabled
    asyncio.run(asyncio.wait_for(wd.run(), 1.0))  # returns at once


def test_unsupported_socket_kind_is_disabled() -> None:
    assert not Notifier({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled


def test_send_failure_is_reported_not_raised() -> None:
    n = Notifier({"NOTIFY_SOCKET": "/nonexistent/dir/notify"})
    assert n.enabled
    assert n.ready() is False


def test_watchdog_usec_and_pid() -> None:
    assert watchdog_usec_from_env({}) is None
    assert watchdog_usec_from_env({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_usec_from_env({"WATCHDOG_USEC": "junk"}) is None
    assert watchdog_usec_from_env({"WATCHDOG_USEC": "30000000"}) == 30_000_000
    mine = {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_usec_from_env(mine) == 30_000_000
    other = {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert watchdog_usec_from_env(other) is None, "a child must not ping for its parent"
    wd = Watchdog(Notifier({"NOTIFY_SOCKET": "@x"}), lambda: True, env={"WATCHDOG_USEC": "30000000"})
    assert wd.interval == 15.0
    assert wd.timeout == 30.0


async def _run_for(wd: Watchdog, seconds: float) -> None:
    task = asyncio.create_task(wd.run())
    await asyncio.sleep(seconds)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_watchdog_pings_at_half_the_timeout(systemd: FakeSystemd) -> None:
    usec = 200_000  # WatchdogSec=0.2s, so a ping every 0.1s
    n = Notifier(systemd.env(WATCHDOG_USEC=str(usec), WATCHDOG_PID=str(os.getpid())))
    wd = Watchdog(n, lambda: True, env=systemd.env(WATCHDOG_USEC=str(usec)))
    assert wd.enabled
    assert wd.interval == pytest.approx(0.1)
    systemd.collect()
    start = time.monotonic()
    asyncio.run(_run_for(wd, 0.75))
    got = systemd.drain()
    assert all(fields == {"WATCHDOG": "1"} for _, fields in got)
    # first ping at once, then one per 0.1s: 8 in 0.75s; allow scheduling noise on a busy box
    assert 6 <= len(got) <= 9, len(got)
    times = [start] + [t for t, _ in got]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert max(gaps) < usec / 1e6, f"a gap reached WATCHDOG_USEC: {gaps}"
    assert wd.pings == len(got)


def test_stalled_worker_stops_the_pings(path_systemd: FakeSystemd) -> None:
    """A real worker thread that beats its heartbeat, then hangs: pings stop until it recovers."""
    env = path_systemd.env(WATCHDOG_USEC="200000")
    hb = Heartbeat("inference worker", max_stall=0.25)
    liveness = Liveness(hb)
    hang = threading.Event()
    release = threading.Event()
    stop = threading.Event()

    def worker() -> None:
        while not stop.is_set():
            if hang.is_set():
                release.wait()  # a stuck ONNX Runtime call, say
                hang.clear()
            hb.beat()
            time.sleep(0.01)

    t = threading.Thread(target=worker, daemon=True)
    t.start()
    path_systemd.collect()
    wd = Watchdog(Notifier(env), liveness, env=env)

    async def scenario() -> tuple[float, float]:
        task = asyncio.create_task(wd.run())
        await asyncio.sleep(0.45)  # healthy
        hang.set()
        hung_at = time.monotonic()
        await asyncio.sleep(1.0)  # hung, well past the 0.2s WatchdogSec
        release.set()
        resumed_at = time.monotonic()
        await asyncio.sleep(0.45)  # healthy again
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return hung_at, resumed_at

    try:
        hung_at, resumed_at = asyncio.run(scenario())
    finally:
        stop.set()
        release.set()
        t.join(2)
    pings = [ts for ts, fields in path_systemd.drain() if fields == {"WATCHDOG": "1"}]
    before = [p for p in pings if p < hung_at]
    during = [p for p in pings if hung_at + hb.max_stall + 0.11 < p < resumed_at]
    after = [p for p in pings if p > resumed_at]
    assert len(before) >= 3
    assert during == [], "a hung worker must let the watchdog fire"
    # the longest silence covers the hang: longer than WatchdogSec, so systemd would restart us
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert max(gaps) > 0.6
    assert len(after) >= 2, "pings resume when the worker progresses again"
    assert wd.withheld >= 5


def test_liveness_exception_counts_as_dead(path_systemd: FakeSystemd) -> None:
    def boom() -> bool:
        raise RuntimeError("loop check broke")

    wd = Watchdog(Notifier(path_systemd.env()), boom, interval=0.01)
    assert wd.tick() is False
    assert path_systemd.drain() == []


def test_heartbeat_and_liveness_with_a_fake_clock() -> None:
    now = [100.0]
    hb = Heartbeat("worker", max_stall=5.0, clock=lambda: now[0])
    live = Liveness(hb)
    assert live.check() == (True, "ok")
    assert live()
    now[0] += 6
    ok, reason = live.check()
    assert not ok
    assert "worker made no progress for 6.0s" in reason
    hb.beat()
    assert live()
    live.checks.append(lambda: (False, "broker disconnected"))
    assert live.check() == (False, "broker disconnected")


def test_liveness_stall_check_for_a_call_that_never_returns() -> None:
    busy = [0.0]
    live = Liveness()
    live.add_stall("model appliance", lambda: busy[0], limit=10)
    assert live()
    busy[0] = 12.5
    assert live.check() == (False, "model appliance stuck in one call for 12.5s (limit 10s)")
    busy[0] = 0.0
    assert live()


def test_status_line() -> None:
    assert status_line(2, 3, 41.52, True) == "2 models, 3 pipelines, 41.5 msg/s, broker connected"
    assert status_line(1, 1, 0, False, "reloading") == (
        "1 model, 1 pipeline, 0.0 msg/s, broker DISCONNECTED, reloading"
    )
