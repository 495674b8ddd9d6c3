"""Test harness: a real paho subscriber, a publisher, and the daemon in a thread or a subprocess."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import yaml

from edge.config import Config, parse_config
from edge.daemon import Daemon

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool

    def json(self) -> Any:
        return json.loads(self.payload)


def _client(url: str, client_id: str = "", **tls: Any) -> mqtt.Client:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
    if parts.username:
        client.username_pw_set(parts.username, parts.password)
    if parts.scheme == "mqtts":
        client.tls_set(ca_certs=tls.get("ca"), certfile=tls.get("cert"), keyfile=tls.get("key"))
    client.connect(parts.hostname or "127.0.0.1", parts.port or 1883, keepalive=30)
    return client


class Collector:
    """Subscribes with paho and keeps every message; ``wait`` blocks until a predicate holds."""

    def __init__(self, url: str, *filters: str, **tls: Any) -> None:
        self.messages: list[Received] = []
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self.client = _client(url, **tls)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.loop_start()
        self.client.subscribe([(f, 1) for f in filters])
        if not self._subscribed.wait(10):
            raise TimeoutError("subscription not acknowledged")

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(Received(message.topic, bytes(message.payload), bool(message.retain)))
            self._cond.notify_all()

    def on(self, topic: str) -> list[Received]:
        with self._cond:
            return [m for m in self.messages if m.topic == topic]

    def wait(self, predicate: Callable[[list[Received]], bool], timeout: float = 15.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self.messages):
                left = deadline - time.monotonic()
                if left <= 0:
                    shown = [(m.topic, m.payload[:80]) for m in self.messages[-10:]]
                    raise AssertionError(f"timed out; last messages: {shown}")
                self._cond.wait(left)
            return list(self.messages)

    def wait_count(self, topic_prefix: str, count: int, timeout: float = 15.0) -> list[Received]:
        def enough(msgs: list[Received]) -> bool:
            return sum(1 for m in msgs if m.topic.startswith(topic_prefix)) >= count

        self.wait(enough, timeout)
        return [m for m in self.messages if m.topic.startswith(topic_prefix)]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class Publisher:
    def __init__(self, url: str, **tls: Any) -> None:
        self.client = _client(url, **tls)
        self.client.loop_start()

    def send(self, topic: str, payload: Any, qos: int = 1, retain: bool = False) -> None:
        if isinstance(payload, dict | list):
            payload = json.dumps(payload)
        self.client.publish(topic, payload, qos=qos, retain=retain).wait_for_publish(10)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class DaemonThread:
    """The daemon in-process, on its own event loop in a thread."""

    def __init__(self, config: Config, config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path  # the daemon's config file (what a retrain hands learn)
        self.loop = asyncio.new_event_loop()
        self.daemon: Daemon | None = None
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def main() -> None:
            self.daemon = Daemon(self.config, config_path=self.config_path)
            ready_waiter = asyncio.create_task(self.daemon.ready.wait())
            ready_waiter.add_done_callback(lambda _t: self._ready.set())
            await self.daemon.run()

        try:
            self.loop.run_until_complete(main())
        except BaseException as exc:  # surfaced by stop()
            self.error = exc
        finally:
            self._ready.set()

    def start(self, timeout: float = 20.0) -> DaemonThread:
        self.thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("daemon not ready")
        if self.error is not None:
            raise self.error
        return self

    def call(self, func: Callable[[], Any]) -> Any:
        """Run ``func`` on the daemon's loop and return its result."""
        future: asyncio.Future[Any] = asyncio.run_coroutine_threadsafe(_call(func), self.loop)  # type: ignore[arg-type]
        return future.result(10)

    def stop(self, timeout: float = 20.0) -> None:
        if self.daemon is not None and self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.daemon.request_stop)
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "daemon did not stop"
        if self.error is not None:
            raise self.error

    def __enter__(self) -> DaemonThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def _call(func: Callable[[], Any]) -> Any:
    return func()


def fast_mqtt(url: str, prefix: str, **extra: Any) -> dict[str, Any]:
    """The daemon's mqtt settings for tests: a stable client id and a short keepalive and
    backoff, so faults and reconnects show within seconds."""
    return {
        "url": url,
        "base_topic": f"{prefix}/ei",
        "client_id": f"ei-{prefix}",
        "keepalive": 5,
        "reconnect_min_s": 0.2,
        "reconnect_max_s": 1.0,
        **extra,
    }


def make_config(data: dict[str, Any], base_dir: Path) -> Config:
    return parse_config(data, "test", base_dir)


def write_config(data: dict[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
    )


def start_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """``run_cli`` without waiting: the same command, its output piped (``communicate`` reads it)."""
    return subprocess.Popen(
        [sys.executable, "-m", "edge.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
    )


def spawn_daemon(config: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "edge.cli", "run", "-c", str(config), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
    )
