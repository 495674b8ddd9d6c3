"""The daemon: wires MQTT, pipelines, batchers and outputs; ``run`` and ``check`` commands."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edge import __version__
from edge.batcher import Batcher
from edge.config import Config, ConfigError, config_warnings, load_config
from edge.decode import DecodeError, TopicPattern
from edge.mqtt import MqttLink, Outgoing
from edge.pipeline import Pipeline, WorkItem
from edge.runtime import LoadedModel, ModelLoadError

log = logging.getLogger("edge.daemon")


class RateLimitedLog:
    """Logs the first occurrence of a key, then at most once per interval with a count."""

    def __init__(self, logger: logging.Logger, interval_s: float) -> None:
        self.logger = logger
        self.interval = interval_s
        self._last: dict[tuple[str, str], float] = {}
        self._suppressed: dict[tuple[str, str], int] = {}

    def warning(self, key: tuple[str, str], message: str) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        if len(self._last) > 10_000:
            self._last.clear()
            self._suppressed.clear()
        suppressed = self._suppressed.pop(key, 0)
        more = f" ({suppressed} more like it since the last report)" if suppressed else ""
        self._last[key] = now
        self.logger.warning("%s%s", message, more)


def load_models(config: Config) -> dict[str, LoadedModel]:
    """Load every model used by an enabled pipeline; ModelLoadError names the model key."""
    used = {p.model for p in config.pipelines.values() if p.enabled}
    models: dict[str, LoadedModel] = {}
    for name in sorted(used):
        models[name] = LoadedModel(name, config.models[name], config.runtime)
    return models


def build_pipelines(config: Config, models: dict[str, LoadedModel]) -> dict[str, Pipeline]:
    pipelines: dict[str, Pipeline] = {}
    for name, cfg in config.pipelines.items():
        if not cfg.enabled:
            continue
        try:
            pipelines[name] = Pipeline(name, cfg, models[cfg.model].spec, config)
        except ValueError as exc:
            text = str(exc)
            key, _, message = text.partition(": ")
            raise ConfigError(
                key if key.startswith("pipelines.") else f"pipelines.{name}", message or text
            ) from None
    return pipelines


class Daemon:
    """One running edge-infer instance."""

    def __init__(self, config: Config, models: dict[str, LoadedModel] | None = None) -> None:
        self.config = config
        self.models = models if models is not None else load_models(config)
        self.pipelines = build_pipelines(config, self.models)
        base = config.mqtt.base_topic
        self.base = base
        self.status_topic = f"{base}/status"
        self.started = time.time()
        self.ratelog = RateLimitedLog(log, config.log_interval_s)
        self.link = MqttLink(
            config.mqtt,
            subscriptions=self.subscriptions,
            on_message=self.on_message,
            on_connected=self._on_connected,
            status_topic=self.status_topic,
        )
        self.batchers = {name: Batcher(model, self._sink) for name, model in self.models.items()}
        self._routes: list[tuple[TopicPattern, Pipeline]] = [
            (TopicPattern(f), p) for p in self.pipelines.values() for f in p.filters
        ]
        self._route_cache: dict[str, list[Pipeline]] = {}
        self._stop = asyncio.Event()
        self.ready = asyncio.Event()
        self.intake_open = True
        self.messages_in = 0
        self.oversized = 0
        self.unrouted = 0
        self.failed_batches = 0
        self._dead_letter_tokens = config.dead_letter.max_per_s
        self._dead_letter_at = time.monotonic()

    # ------------------------------------------------------------------ MQTT in

    def subscriptions(self) -> list[tuple[str, int]]:
        subs: dict[str, int] = {}
        for pipeline in self.pipelines.values():
            group = pipeline.cfg.source.shared_group
            for f in pipeline.filters:
                topic = f"$share/{group}/{f}" if group else f
                subs[topic] = max(subs.get(topic, 0), pipeline.cfg.source.qos)
        return sorted(subs.items())

    def _route(self, topic: str) -> list[Pipeline]:
        routed = self._route_cache.get(topic)
        if routed is None:
            routed = []
            for pattern, pipeline in self._routes:
                if pipeline not in routed and pattern.match(topic) is not None:
                    routed.append(pipeline)
            if len(self._route_cache) > 50_000:
                self._route_cache.clear()
            self._route_cache[topic] = routed
        return routed

    def on_message(self, topic: str, payload: bytes) -> None:
        """Called for every incoming message, on the event loop. Never raises."""
        received = time.perf_counter()
        self.messages_in += 1
        if not self.intake_open:
            return
        pipelines = self._route(topic)
        if not pipelines:
            self.unrouted += 1
            return
        if len(payload) > self.config.limits.max_payload_bytes:
            for pipeline in pipelines:
                pipeline.stats.received += 1
                self._reject(
                    pipeline,
                    topic,
                    payload,
                    DecodeError(
                        "oversized",
                        f"payload on {topic!r} is {len(payload)} bytes "
                        f"(limits.max_payload_bytes={self.config.limits.max_payload_bytes})",
                    ),
                )
            return
        for pipeline in pipelines:
            try:
                items = pipeline.handle(topic, payload, received, self._availability)
            except DecodeError as exc:
                self._reject(pipeline, topic, payload, exc)
                continue
            except Exception as exc:  # a bug in a decoder must not stop other devices
                self._reject(
                    pipeline, topic, payload, DecodeError("malformed_json", f"{type(exc).__name__}: {exc}")
                )
                continue
            batcher = self.batchers[pipeline.cfg.model]
            for item in items:
                if not batcher.put(item):
                    self._reject(
                        pipeline,
                        topic,
                        payload,
                        DecodeError("inference_failed", f"model {pipeline.cfg.model!r} queue is full"),
                    )

    def _reject(self, pipeline: Pipeline, topic: str, payload: bytes, exc: DecodeError) -> None:
        pipeline.reject(exc.reason)
        self.ratelog.warning((pipeline.name, exc.reason), f"pipeline={pipeline.name} dropped: {exc.detail}")
        dl = self.config.dead_letter
        if not dl.enabled:
            return
        now = time.monotonic()
        self._dead_letter_tokens = min(
            dl.max_per_s, self._dead_letter_tokens + (now - self._dead_letter_at) * dl.max_per_s
        )
        self._dead_letter_at = now
        if self._dead_letter_tokens < 1:
            return
        self._dead_letter_tokens -= 1
        body = {
            "pipeline": pipeline.name,
            "topic": topic,
            "reason": exc.reason,
            "detail": exc.detail,
            "payload": payload[:1024].decode("utf-8", errors="replace"),
            "ts": _iso(time.time()),
        }
        dl_topic = dl.topic.replace("{base}", self.base).replace("{pipeline}", pipeline.name)
        self.link.publish(Outgoing(dl_topic, json.dumps(body).encode(), 0, False))

    def _availability(self, pipeline: Pipeline, device: str, online: bool) -> None:
        if pipeline.availability.get(device) is online:
            return
        pipeline.availability[device] = online
        topic = pipeline.output_topic(device) + "/availability"
        self.link.publish(Outgoing(topic, b"online" if online else b"offline", 1, True))

    # ------------------------------------------------------------------ inference out

    def _sink(
        self,
        batch: list[WorkItem],
        outputs: npt.NDArray[np.float32] | None,
        seconds: float,
        error: Exception | None,
    ) -> None:
        if outputs is None:
            self.failed_batches += 1
            for item in batch:
                item.pipeline.reject("inference_failed")
            model = batch[0].pipeline.cfg.model if batch else "?"
            self.ratelog.warning(
                ("model", model), f"model={model} inference failed for a batch of {len(batch)}: {error}"
            )
            return
        done = time.perf_counter()
        wall = time.time()
        by_pipeline: dict[int, list[int]] = {}
        for index, item in enumerate(batch):
            by_pipeline.setdefault(id(item.pipeline), []).append(index)
        for indices in by_pipeline.values():
            pipeline = batch[indices[0]].pipeline
            predictions = pipeline.post(outputs[indices])
            spec = pipeline.spec
            out = pipeline.cfg.output
            for index, prediction in zip(indices, predictions, strict=True):
                item = batch[index]
                pipeline.stats.predicted += 1
                if not pipeline.policy.should_publish(item.device, prediction, wall):
                    continue
                if pipeline.availability.get(item.device) is None:
                    self._availability(pipeline, item.device, True)
                body = {
                    **prediction.fields,
                    "model": spec.name,
                    "model_version": spec.version,
                    "latency_ms": round((done - item.received) * 1000.0, 3),
                    "ts": _iso(item.ts),
                }
                self.link.publish(
                    Outgoing(
                        pipeline.output_topic(item.device), json.dumps(body).encode(), out.qos, out.retain
                    )
                )
                pipeline.stats.published += 1

    # ------------------------------------------------------------------ lifecycle

    async def _on_connected(self) -> None:
        self.publish_bridge_info()
        self.ready.set()

    def bridge_info(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "uptime_s": round(time.time() - self.started, 1),
            "connected": self.link.connected.is_set(),
            "reconnects": self.link.reconnects,
            "messages_in": self.messages_in,
            "unrouted": self.unrouted,
            "publish_queue": len(self.link.queue),
            "publish_dropped": self.link.dropped,
            "failed_batches": self.failed_batches,
            "models": {
                name: {
                    "version": m.spec.version,
                    "task": m.spec.task,
                    "sha256": m.spec.sha256,
                    "providers": m.providers,
                    "batches": self.batchers[name].batches,
                    "items": self.batchers[name].items,
                }
                for name, m in self.models.items()
            },
            "pipelines": {
                name: {"model": p.cfg.model, "devices": len(p.store.states), **p.stats.as_dict()}
                for name, p in self.pipelines.items()
            },
        }

    def publish_bridge_info(self) -> None:
        payload = json.dumps(self.bridge_info()).encode()
        self.link.publish(Outgoing(f"{self.base}/bridge/info", payload, 1, True))

    async def _bridge_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.bridge_info_interval_s)
            if self.link.connected.is_set():
                self.publish_bridge_info()

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Run until :meth:`request_stop`; then stop intake, flush batches, publish offline, disconnect."""
        tasks = [asyncio.create_task(b.run(), name=f"batcher-{n}") for n, b in self.batchers.items()]
        tasks.append(asyncio.create_task(self._bridge_loop(), name="bridge-info"))
        link_task = asyncio.create_task(self.link.run(), name="mqtt")
        stop_task = asyncio.create_task(self._stop.wait(), name="stop")
        try:
            done, _ = await asyncio.wait({link_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
            if link_task in done:
                link_task.result()  # an unexpected end of the link is an error
            self.intake_open = False
            timeout = self.config.shutdown_timeout_s
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.gather(*(b.drained() for b in self.batchers.values())), timeout / 2
                )
            self.publish_bridge_info()
            self.link.stop()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(link_task), timeout / 2)
        finally:
            for task in [*tasks, link_task, stop_task]:
                task.cancel()
            await asyncio.gather(*tasks, link_task, stop_task, return_exceptions=True)
            for model in self.models.values():
                model.close()
        log.info(
            "stopped: %d messages in, %s",
            self.messages_in,
            ", ".join(f"{n}: {p.stats.published} published" for n, p in self.pipelines.items()),
        )


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# ---------------------------------------------------------------------- CLI


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("-c", "--config", required=True, type=Path, help="YAML configuration file")
    parser.add_argument("--mqtt-url", help="broker URL, overrides mqtt.url (also EDGE_INFER_MQTT_URL)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("edge.mqtt.client").setLevel(logging.WARNING)


def prepare(
    config_path: Path, mqtt_url: str | None
) -> tuple[Config, dict[str, LoadedModel], dict[str, Pipeline]]:
    """Load config and models and build pipelines; raises ConfigError or ModelLoadError."""
    config = load_config(config_path, mqtt_url)
    for warning in config_warnings(config, config_path):
        log.warning("%s", warning)
    models = load_models(config)
    pipelines = build_pipelines(config, models)
    return config, models, pipelines


def describe_plan(config: Config, models: dict[str, LoadedModel], pipelines: dict[str, Pipeline]) -> str:
    lines = [
        f"broker: {config.mqtt.url} "
        f"(client id {config.mqtt.resolved_client_id()}, MQTT {config.mqtt.protocol})"
    ]
    lines.append(
        f"status: {config.mqtt.base_topic}/status, bridge info: {config.mqtt.base_topic}/bridge/info"
    )
    lines.append("models:")
    for name, model in models.items():
        spec = model.spec
        lines.append(
            f"  {name}: {spec.path} v{spec.version} {spec.task}, {spec.layout} "
            f"[batch, {', '.join(map(str, spec.sample_shape))}], providers {','.join(model.providers)}"
        )
        if spec.labels:
            lines.append(f"    labels: {', '.join(spec.labels)}")
    lines.append("pipelines:")
    for name, p in pipelines.items():
        fcfg = p.cfg.features
        lines.append(f"  {name}: profile {p.cfg.source.profile} -> {fcfg.type} -> model {p.cfg.model}")
        for f in p.filters:
            lines.append(f"    in:  {f} (qos {p.cfg.source.qos})")
        lines.append("    readings: " + ", ".join(f"{k}<-{v}" for k, v in p.readings.items()))
        lines.append(
            f"    out: {p.output_topic('{device}')} (qos {p.cfg.output.qos}, {p.cfg.output.publish})"
        )
    return "\n".join(lines)


def cli_check(argv: Sequence[str]) -> int:
    args = _parser("edge-infer check", "Validate a config, load its models and print the plan.").parse_args(
        argv
    )
    _setup_logging(args.log_level)
    try:
        config, models, pipelines = prepare(args.config, args.mqtt_url)
    except (ConfigError, ModelLoadError) as exc:
        print(f"edge-infer: config error: {exc}", file=sys.stderr)
        return 2
    print(describe_plan(config, models, pipelines))
    print("config OK")
    for model in models.values():
        model.close()
    return 0


def cli_run(argv: Sequence[str]) -> int:
    args = _parser("edge-infer run", "Run the inference daemon.").parse_args(argv)
    _setup_logging(args.log_level)
    try:
        config, models, _ = prepare(args.config, args.mqtt_url)
    except (ConfigError, ModelLoadError) as exc:
        print(f"edge-infer: config error: {exc}", file=sys.stderr)
        return 2

    async def main() -> None:
        daemon = Daemon(config, models)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, daemon.request_stop)
        log.info(
            "edge-infer %s starting: %d models, %d pipelines", __version__, len(models), len(daemon.pipelines)
        )
        await daemon.run()

    asyncio.run(main())
    return 0
