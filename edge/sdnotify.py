"""systemd's notification protocol (``sd_notify``) in-process, without a dependency.

The service manager passes ``NOTIFY_SOCKET`` (a filesystem path, or an abstract socket
written with a leading ``@``) to a ``Type=notify`` service; the service sends newline
separated ``KEY=VALUE`` datagrams to it. Outside systemd the variable is unset and every
call here is a cheap no-op, so the daemon calls the same methods in tests, in a terminal
and under systemd.

Two pieces:

* :class:`Notifier` sends ``READY=1``, ``STATUS=...``, ``RELOADING=1`` (with
  ``MONOTONIC_USEC``), ``STOPPING=1``, ``WATCHDOG=1`` and ``EXTEND_TIMEOUT_USEC``.
* :class:`Watchdog` pings at half of ``WATCHDOG_USEC`` but only while a liveness check
  passes. Running it as a task on the daemon's event loop means a blocked loop stops the
  pings by itself; the liveness check covers the inference worker thread (see
  :class:`Heartbeat` and :class:`Liveness`). A hung worker therefore lets systemd's
  watchdog fire and restart the service, which is the point.

Nothing here does I/O on import; the socket is opened on the first send.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

__all__ = [
    "Heartbeat",
    "Liveness",
    "Notifier",
    "Watchdog",
    "monotonic_usec",
    "status_line",
    "watchdog_usec_from_env",
]

log = logging.getLogger(__name__)


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, the clock systemd compares ``MONOTONIC_USEC`` with."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def _socket_address(value: str) -> str | bytes | None:
    """Translate ``NOTIFY_SOCKET`` into an ``AF_UNIX`` address, or None if unsupported."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    # vsock:CID:PORT (systemd 254+, for VMs) and anything else: not for this daemon.
    return None


def _clean(text: str) -> str:
    """One line: the protocol separates assignments by newlines."""
    return " ".join(text.split())


class Notifier:
    """Sends state changes to the service manager; a no-op when ``NOTIFY_SOCKET`` is unset.

    ``env`` defaults to ``os.environ`` and is read once, at construction. Sending never
    raises: a failure is logged at debug level and reported as ``False``, because losing
    a status line must never take the daemon down. The socket is non-blocking, so a
    stuck service manager cannot stall the event loop.
    """

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        source = os.environ if env is None else env
        raw = source.get("NOTIFY_SOCKET", "")
        self.socket_name = raw
        self._address = _socket_address(raw) if raw else None
        if raw and self._address is None:
            log.warning("NOTIFY_SOCKET=%s is not an AF_UNIX socket; systemd notifications disabled", raw)
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` assignments in one datagram; True when it was sent."""
        if self._address is None or not assignments:
            return False
        payload = "\n".join(assignments).encode()
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                    self._sock.setblocking(False)
                self._sock.sendto(payload, self._address)
            except OSError as exc:
                log.debug("sd_notify %r to %s failed: %s", assignments, self.socket_name, exc)
                return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """``READY=1``: start-up (or a reload) is complete. Send it only once connected,
        subscribed and with every model loaded."""
        if status is None:
            return self.notify("READY=1")
        return self.notify("READY=1", f"STATUS={_clean(status)}")

    def status(self, text: str) -> bool:
        """``STATUS=``: the one-line summary ``systemctl status`` shows."""
        return self.notify(f"STATUS={_clean(text)}")

    def reloading(self, status: str | None = None) -> bool:
        """``RELOADING=1`` with ``MONOTONIC_USEC``; follow it with :meth:`ready` when done
        (also when the reload was refused and the old configuration keeps running)."""
        fields = ["RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}"]
        if status is not None:
            fields.append(f"STATUS={_clean(status)}")
        return self.notify(*fields)

    def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1``: shutdown has begun."""
        if status is None:
            return self.notify("STOPPING=1")
        return self.notify("STOPPING=1", f"STATUS={_clean(status)}")

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: a keep-alive ping. Prefer :class:`Watchdog`, which gates it."""
        return self.notify("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """``EXTEND_TIMEOUT_USEC``: ask for more time while starting, reloading or stopping
        (a TensorRT engine build on a Jetson takes minutes)."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={max(0, round(seconds * 1_000_000))}")

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def watchdog_usec_from_env(env: Mapping[str, str] | None = None, pid: int | None = None) -> int | None:
    """``WATCHDOG_USEC`` when the watchdog is meant for this process, else None.

    Mirrors ``sd_watchdog_enabled()``: ``WATCHDOG_PID``, when set, must be our pid (a child
    that inherited the environment must not ping on its parent's behalf).
    """
    source = os.environ if env is None else env
    raw = source.get("WATCHDOG_USEC")
    if not raw:
        return None
    try:
        usec = int(raw)
    except ValueError:
        return None
    if usec <= 0:
        return None
    wpid = source.get("WATCHDOG_PID")
    if wpid:
        try:
            if int(wpid) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            return None
    return usec


class Heartbeat:
    """Progress marker for one loop that must keep turning (e.g. the inference worker).

    The worker calls :meth:`beat` every iteration, including idle ones: a worker that
    blocks on its queue with a timeout (``queue.get(timeout=1)``) beats at least once a
    second when idle, so "no beat for ``max_stall`` seconds" means stuck, not idle.
    :meth:`beat` is a single attribute store, safe and cheap from any thread.
    """

    __slots__ = ("_clock", "last", "max_stall", "name")

    def __init__(self, name: str, max_stall: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.max_stall = max_stall
        self._clock = clock
        self.last = clock()

    def beat(self) -> None:
        self.last = self._clock()

    def age(self) -> float:
        return self._clock() - self.last

    def stalled(self) -> bool:
        return self.age() > self.max_stall


class Liveness:
    """Combines heartbeats (and optional extra checks) into the daemon's ``is_alive``.

    ``check()`` returns ``(ok, reason)`` for ``/healthz``; calling the object returns only
    the bool, for :class:`Watchdog`. Extra checks are callables returning ``(ok, reason)``,
    e.g. "the broker is connected" for health (but keep broker outages *out* of the
    watchdog: a restart does not bring the broker back).
    """

    def __init__(self, *heartbeats: Heartbeat) -> None:
        self.heartbeats: list[Heartbeat] = list(heartbeats)
        self.checks: list[Callable[[], tuple[bool, str]]] = []

    def add(self, heartbeat: Heartbeat) -> Heartbeat:
        self.heartbeats.append(heartbeat)
        return heartbeat

    def add_check(self, check: Callable[[], tuple[bool, str]]) -> None:
        self.checks.append(check)

    def add_stall(self, name: str, stalled_for: Callable[[], float], limit: float) -> None:
        """Fail while ``stalled_for()`` (seconds the current call has been running, 0 when
        idle; e.g. ``LoadedModel.stalled_for``) exceeds ``limit``."""

        def check() -> tuple[bool, str]:
            age = stalled_for()
            if age > limit:
                return False, f"{name} stuck in one call for {age:.1f}s (limit {limit:g}s)"
            return True, "ok"

        self.checks.append(check)

    def check(self) -> tuple[bool, str]:
        for hb in self.heartbeats:
            age = hb.age()
            if age > hb.max_stall:
                return False, f"{hb.name} made no progress for {age:.1f}s (limit {hb.max_stall:g}s)"
        for extra in self.checks:
            ok, reason = extra()
            if not ok:
                return False, reason
        return True, "ok"

    def __call__(self) -> bool:
        return self.check()[0]


class Watchdog:
    """Pings ``WATCHDOG=1`` every ``WATCHDOG_USEC / 2`` while ``is_alive()`` holds.

    ``enabled`` is False (and :meth:`run` returns at once) when the notifier is disabled
    or the service has no ``WatchdogSec=``. Run it as a task of the daemon's TaskGroup::

        tg.create_task(Watchdog(notifier, liveness).run())

    ``is_alive`` runs on the event loop and must be cheap (compare timestamps, no I/O). An
    exception from it counts as "not alive". ``interval`` overrides the computed period
    (tests); ``env`` defaults to ``os.environ``.
    """

    def __init__(
        self,
        notifier: Notifier,
        is_alive: Callable[[], bool],
        *,
        env: Mapping[str, str] | None = None,
        interval: float | None = None,
    ) -> None:
        self.notifier = notifier
        self.is_alive = is_alive
        usec = watchdog_usec_from_env(env)
        self.timeout: float | None = None if usec is None else usec / 1_000_000
        if interval is not None:
            self.interval: float | None = interval
        else:
            self.interval = None if self.timeout is None else self.timeout / 2
        self.pings = 0
        self.withheld = 0
        self._withholding = False

    @property
    def enabled(self) -> bool:
        return self.notifier.enabled and self.interval is not None

    def tick(self) -> bool:
        """One period: ping if alive. Returns whether a ping was sent."""
        try:
            alive = bool(self.is_alive())
        except Exception:
            log.exception("watchdog liveness check raised; treating the daemon as not alive")
            alive = False
        if not alive:
            self.withheld += 1
            if not self._withholding:
                self._withholding = True
                log.error(
                    "watchdog: liveness check failed, withholding WATCHDOG=1 "
                    "(systemd restarts the service after %ss without a ping)",
                    "?" if self.timeout is None else f"{self.timeout:g}",
                )
            return False
        if self._withholding:
            self._withholding = False
            log.warning("watchdog: liveness restored after %d withheld ping(s)", self.withheld)
        sent = self.notifier.watchdog()
        if sent:
            self.pings += 1
        return sent

    async def run(self) -> None:
        """Ping until cancelled; returns immediately when the watchdog is not enabled."""
        if not self.enabled or self.interval is None:
            return
        interval = self.interval
        log.debug("watchdog: pinging every %.3fs", interval)
        while True:
            self.tick()
            await asyncio.sleep(interval)


def status_line(models: int, pipelines: int, msgs_per_s: float, connected: bool, extra: str = "") -> str:
    """The one-line ``STATUS=`` summary, e.g.
    ``"2 models, 3 pipelines, 41.5 msg/s, broker connected"``."""
    parts = [
        f"{models} model{'s' if models != 1 else ''}",
        f"{pipelines} pipeline{'s' if pipelines != 1 else ''}",
        f"{msgs_per_s:.1f} msg/s",
        "broker connected" if connected else "broker DISCONNECTED",
    ]
    if extra:
        parts.append(extra)
    return ", ".join(parts)
