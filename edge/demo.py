"""``edge-infer demo``: an embedded broker, a simulated home replaying real data, the daemon, a live view.

Everything runs in one process on one event loop except the broker when a local
Mosquitto is used. The simulated devices publish replayed ACSF1 smart-plug power
traces (Zigbee2MQTT and Tasmota plugs), BasicMotions IMU data (a wearable) and
the room simulator (Zigbee2MQTT and ESPHome climate sensors), and by default two
faults (``DEMO_FAULTS``): a Shelly plug with an appliance the open-set model never
trained on (answered ``unknown``), a fridge whose compressor starts to run ever
longer and a water-flow sensor that stops returning to zero after ``--fault-onset-h``
simulated hours (the anomaly models raise them). The
daemon runs ``examples/home.yaml`` with the bundled models; the view compares each
prediction with the simulator's ground truth and shows the attributions
(``output.explain``) of the pipelines that ask for them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devices.faults import FAULTS
from edge import zoo
from edge.config import Config, ConfigError, load_config
from edge.daemon import Daemon, load_models
from edge.runtime import LoadedModel, ModelLoadError

log = logging.getLogger("edge.demo")

DEFAULT_CONFIG = zoo.example("home.yaml")  # the checkout's examples/, or the wheel's copy
TRUTH_PREFIX = "edge-infer-sim/truth/"
DEMO_FAULTS = ("unseen_appliance", "fridge_creep", "water_leak")
DEMO_FAULT_ONSET_H = 3.0  # the fridge's first 3 h window is healthy, then its runs grow longer


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedBroker:
    """A local Mosquitto when one is installed (faster), else the pure-Python amqtt."""

    def __init__(self, port: int, kind: str, bind: str) -> None:
        self.port = port
        self.kind = kind
        self.bind = bind
        self._process: subprocess.Popen[bytes] | None = None
        self._amqtt: Any = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @staticmethod
    def mosquitto_binary() -> str | None:
        for candidate in (shutil.which("mosquitto"), "/usr/sbin/mosquitto"):
            if candidate and Path(candidate).exists():
                return candidate
        return None

    async def start(self) -> None:
        binary = self.mosquitto_binary()
        if self.kind == "auto":
            self.kind = "mosquitto" if binary else "amqtt"
        if self.kind == "mosquitto":
            if binary is None:
                raise RuntimeError(
                    "mosquitto is not installed (apt-get install mosquitto), use --broker amqtt"
                )
            self._dir = tempfile.TemporaryDirectory(prefix="edge-infer-demo-")
            conf = Path(self._dir.name) / "mosquitto.conf"
            lines = [f"listener {self.port} {self.bind}", "allow_anonymous true", "log_dest none"]
            if os.geteuid() == 0:
                lines.append("user root")
            conf.write_text("\n".join(lines) + "\n")
            self._process = subprocess.Popen(  # noqa: ASYNC220 - returns at once, the broker runs on its own
                [binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
        else:
            try:
                from amqtt.broker import Broker
            except ImportError as exc:
                raise RuntimeError("the embedded broker needs amqtt: pip install 'edge-infer[demo]'") from exc
            logging.getLogger("amqtt").setLevel(logging.WARNING)
            logging.getLogger("transitions").setLevel(logging.WARNING)
            self._amqtt = Broker(
                {"listeners": {"default": {"type": "tcp", "bind": f"{self.bind}:{self.port}"}}}
            )
            await self._amqtt.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
                return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"the {self.kind} broker did not start on port {self.port}")

    async def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(5)
            if self._process.poll() is None:
                self._process.kill()
        if self._amqtt is not None:
            with contextlib.suppress(Exception):  # TimeoutError included: never hang the exit
                await asyncio.wait_for(self._amqtt.shutdown(), 5)
        if self._dir is not None:
            self._dir.cleanup()


@dataclass
class DeviceRow:
    pipeline: str
    device: str
    label: str | None = None
    value: float | None = None
    confidence: float | None = None
    latency_ms: float | None = None
    count: int = 0
    correct: int = 0
    judged: int = 0
    explain: dict[str, Any] | None = None
    ood_score: float | None = None
    score: float | None = None
    labels: Counter[str] = field(default_factory=Counter)  # every answer's label, counted
    first_anomaly: float | None = None  # monotonic time of the first answer with anomaly: true


@dataclass
class Board:
    """What the live view shows: latest prediction per (pipeline, device) against the truth."""

    labels: dict[str, list[str]]
    rows: dict[tuple[str, str], DeviceRow] = field(default_factory=dict)
    truth: dict[str, dict[str, Any]] = field(default_factory=dict)
    per_pipeline: Counter[str] = field(default_factory=Counter)
    started: float = field(default_factory=time.monotonic)
    first: dict[str, float] = field(default_factory=dict)  # pipeline -> monotonic time of its first

    def on_prediction(self, pipeline: str, device: str, body: dict[str, Any]) -> None:
        row = self.rows.setdefault((pipeline, device), DeviceRow(pipeline, device))
        row.label = body.get("label")
        row.value = body.get("value")
        row.confidence = body.get("confidence")
        row.latency_ms = body.get("latency_ms")
        row.explain = body.get("explain") if isinstance(body.get("explain"), dict) else row.explain
        row.ood_score = body.get("ood_score")
        row.score = body.get("score")
        row.labels[str(row.label)] += 1
        if body.get("anomaly") is True and row.first_anomaly is None:
            row.first_anomaly = time.monotonic()
        row.count += 1
        self.per_pipeline[pipeline] += 1
        self.first.setdefault(pipeline, time.monotonic())
        expected = self.expected(pipeline, device)
        if expected is not None and row.label is not None:
            row.judged += 1
            row.correct += int(row.label == expected)

    def expected(self, pipeline: str, device: str) -> str | None:
        truth = self.truth.get(device)
        if truth is None:
            return None
        labels = self.labels.get(pipeline, [])
        if "fault_active" in truth:  # a fault device: the anomaly model should say so once it began
            return "anomaly" if truth["fault_active"] else "normal"
        if truth.get("unseen_by") and labels and truth.get("label") not in labels:
            return "unknown"  # an appliance type the open-set model never trained on
        if labels and truth.get("label") in labels:
            return str(truth["label"])
        if "class_index" in truth and labels and 0 <= int(truth["class_index"]) < len(labels):
            return labels[int(truth["class_index"])]
        if "occupancy" in truth and len(labels) == 2:
            return labels[1] if truth["occupancy"] else labels[0]
        return None

    def accuracy(self, pipeline: str) -> tuple[int, int]:
        rows = [r for r in self.rows.values() if r.pipeline == pipeline]
        return sum(r.correct for r in rows), sum(r.judged for r in rows)

    def wrong_series(self, pipeline: str) -> list[str]:
        """Devices whose replayed series the model gets wrong most of the time (judged 3+ times)."""
        return sorted(
            r.device
            for r in self.rows.values()
            if r.pipeline == pipeline and r.judged >= 3 and r.correct * 2 < r.judged
        )


def card_accuracy(model: LoadedModel) -> float | None:
    """The test accuracy the model card reports (the manifest's ``metrics``), if any."""
    manifest = model.spec.manifest
    metrics = manifest.metrics if manifest is not None else {}
    for key in sorted(metrics, key=lambda k: "test" not in k):
        value = metrics[key]
        if isinstance(value, dict) and isinstance(value.get("accuracy"), int | float):
            return float(value["accuracy"])
    return None


def accuracy_note(pipeline: str, accuracy: float | None, wrong: list[str]) -> str | None:
    """What a card accuracy below 1 means for what the demo shows (red rows): a replayed series
    the model gets wrong is wrong every time it is predicted."""
    if accuracy is None or accuracy >= 1.0 or not wrong:
        return None
    missed = max(1, round((1 - accuracy) * 10))
    return (
        f"{pipeline}: {', '.join(wrong)} is predicted wrong every time. The model card's test "
        f"accuracy is {accuracy:.2f}: about {missed} in 10 recorded series are misclassified, and "
        "a replayed series is one of them or not, the same way each time. The model, not the demo."
    )


def render(board: Board, daemon: Daemon, broker: str, cards: dict[str, float | None] | None = None) -> Any:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    elapsed = time.monotonic() - board.started
    table = Table(title=f"edge-infer demo — {broker} — {elapsed:.0f}s", expand=True)
    for column in ("pipeline", "device", "prediction", "confidence", "truth", "right", "n", "latency"):
        table.add_column(
            column, justify="right" if column in ("confidence", "n", "latency", "right") else "left"
        )
    for (pipeline, device), row in sorted(board.rows.items()):
        expected = board.expected(pipeline, device)
        shown = row.label if row.label is not None else ("—" if row.value is None else f"{row.value:.3g}")
        style = "" if expected is None else ("green" if row.label == expected else "red")
        table.add_row(
            pipeline,
            device,
            Text(str(shown), style=style),
            "" if row.confidence is None else f"{row.confidence:.2f}",
            expected or "",
            f"{row.correct}/{row.judged}" if row.judged else "",
            str(row.count),
            "" if row.latency_ms is None else f"{row.latency_ms:.1f} ms",
        )
    info = daemon.bridge_info()
    drops = sum(sum(p["dropped"].values()) for p in info["pipelines"].values())
    summary = Text(
        f"messages in {info['messages_in']} ({info['messages_in'] / max(elapsed, 1e-9):.0f}/s), "
        f"predictions published {sum(board.per_pipeline.values())}, dropped {drops}. Ctrl-C to stop."
    )
    notes = [
        note
        for name, accuracy in sorted((cards or {}).items())
        if (note := accuracy_note(name, accuracy, board.wrong_series(name)))
    ]
    why = [Text(line, style="cyan") for line in explain_lines(board)]
    return Group(table, *why, *(Text(n, style="yellow") for n in notes), summary)


def explain_text(explain: dict[str, Any], top: int = 3) -> str:
    """One line of an answer's ``explain`` field: its target and the segments that drove it most."""
    segments = [s for s in explain.get("segments") or [] if isinstance(s, dict)]
    ranked = sorted(segments, key=lambda s: -(s.get("share") or 0.0))[:top]
    parts = [f"samples {s['start']}-{s['end']} {100 * (s.get('share') or 0.0):.0f} %" for s in ranked]
    if not segments:  # a snapshot model: its features
        feats = explain.get("features") or {}
        top_feats = sorted(feats.items(), key=lambda kv: -(kv[1].get("share") or 0.0))[:top]
        parts = [f"{name} {100 * (v.get('share') or 0.0):.0f} %" for name, v in top_feats]
    return f"{explain.get('target')}: " + ", ".join(parts)


def explain_lines(board: Board) -> list[str]:
    """Why, for each device whose pipeline asks for attributions (output.explain)."""
    return [
        f"why {pipeline}/{device} -> {row.label}: {explain_text(row.explain)}"
        for (pipeline, device), row in sorted(board.rows.items())
        if row.explain is not None
    ]


async def watch(url: str, board: Board, base: str) -> None:
    """Follow the daemon's answers and the simulator's truth (the daemon's own MQTT link, no will)."""
    from edge.config import MqttConfig
    from edge.mqtt import AckToken, MqttLink

    def on_message(topic: str, payload: bytes, _token: AckToken | None) -> None:
        with contextlib.suppress(ValueError):
            if topic.startswith(TRUTH_PREFIX):
                board.truth[topic[len(TRUTH_PREFIX) :]] = json.loads(payload)
                return
            parts = topic.split("/")
            if len(parts) == 3 and parts[1] not in ("bridge", "dead_letter", "status"):
                board.on_prediction(parts[1], parts[2], json.loads(payload))

    cfg = MqttConfig(
        url=url,
        client_id=f"edge-infer-demo-view-{time.time_ns()}",
        protocol="3.1.1",
        persistent_session=False,
    )
    link = MqttLink(
        cfg,
        subscriptions=lambda: [(f"{base}/+/+", 0), (f"{TRUTH_PREFIX}#", 0)],
        on_message=on_message,
        status_topic=None,
    )
    try:
        await link.run()
    finally:
        link.stop()


STOP_S = 0.8  # Ctrl-C to exit: the simulator, the view and the daemon stop within this, together


def _retrieve(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.debug("%s ended with %r", task.get_name(), task.exception())


def demo_config(config: Config, url: str, speed: float, protocol: str = "5") -> Config:
    """The example config as the demo runs it: its broker, and output intervals at simulated speed.

    Nothing else changes: the pipelines, models, windows and Home Assistant discovery are those of
    the file. Windows fill at simulated speed by themselves (the simulator's payloads carry simulated
    time or arrive that much faster); the output policy's wall-clock intervals (``heartbeat_s``,
    ``min_interval_s``) are divided by ``speed`` so a sped-up home also reports sped up.
    """
    pipelines = {}
    for name, pipeline in config.pipelines.items():
        out = pipeline.output
        update: dict[str, Any] = {"min_interval_s": out.min_interval_s / speed}
        if out.heartbeat_s is not None:
            update["heartbeat_s"] = max(out.heartbeat_s / speed, 0.5)
        pipelines[name] = pipeline.model_copy(update={"output": out.model_copy(update=update)})
    mqtt = config.mqtt.model_copy(update={"url": url, "protocol": protocol})
    # Ctrl-C must end the demo within a second: the daemon's flush at shutdown is bounded by it.
    stop = min(config.shutdown_timeout_s, STOP_S)
    return config.model_copy(update={"mqtt": mqtt, "pipelines": pipelines, "shutdown_timeout_s": stop})


def demo_speed(models: dict[str, LoadedModel], target_s: float = 25.0) -> float:
    """Fast enough that the longest window fills within ``target_s``, and at least 60×."""
    longest = 0.0
    for model in models.values():
        spec = model.spec
        if spec.layout == "window" and spec.sample_period_s:
            longest = max(longest, spec.sample_shape[0] * spec.sample_period_s)
    return max(60.0, math.ceil(longest / target_s / 10) * 10)


async def run_demo(
    args: argparse.Namespace,
    config: Config,
    models: dict[str, LoadedModel],
    launched: float | None = None,
) -> dict[str, Any]:
    from devices.simulate import SimConfig, Simulator

    port = args.mqtt_port or free_port()
    broker = EmbeddedBroker(port, args.broker, "0.0.0.0" if args.mqtt_port else "127.0.0.1")
    await broker.start()
    url = f"mqtt://127.0.0.1:{port}"
    speed = args.speed or demo_speed(models)
    config = demo_config(config, url, speed, "3.1.1" if broker.kind == "amqtt" else "5")
    daemon = Daemon(config, models)
    labels = {name: list(p.spec.labels) for name, p in daemon.pipelines.items()}
    cards = {
        name: card_accuracy(models[p.cfg.model]) if p.spec.task == "classification" else None
        for name, p in daemon.pipelines.items()
    }
    board = Board(labels)
    faults: tuple[str, ...] = tuple(getattr(args, "fault", None) or ())
    if not faults and not getattr(args, "no_faults", False):
        faults = DEMO_FAULTS
    sim = Simulator(
        SimConfig(
            speed=speed,
            devices=args.devices,
            seed=args.seed,
            faults=faults,
            fault_onset_h=getattr(args, "fault_onset_h", DEMO_FAULT_ONSET_H),
        )
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(
        f"edge-infer demo: {broker.kind} broker on {url} "
        f"(watch it: mosquitto_sub -p {port} -t 'edge-infer/#' -v), simulated time ×{speed:g}",
        file=sys.stderr,
    )
    daemon_task = asyncio.create_task(daemon.run(), name="daemon")
    await asyncio.wait_for(daemon.ready.wait(), 20)
    watch_task = asyncio.create_task(watch(url, board, config.mqtt.base_topic), name="watch")
    await asyncio.sleep(0.2)  # let the view subscribe before the first prediction can come
    board.started = time.monotonic()
    sim_task = asyncio.create_task(sim.run(url, None, goodbye_s=STOP_S / 2), name="simulate")
    for task in (sim_task, watch_task, daemon_task):
        task.add_done_callback(_retrieve)  # an error after Ctrl-C is never left unretrieved
    live = None
    if not args.no_ui and sys.stdout.isatty():
        from rich.live import Live

        live = Live(render(board, daemon, broker.kind, cards), refresh_per_second=4, screen=False)
        live.start()
    started = time.monotonic()
    last_line = started
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.25)
            if sim_task.done() and sim_task.exception() is not None:
                raise sim_task.exception()  # type: ignore[misc]
            if daemon_task.done():
                daemon_task.result()
                break
            now = time.monotonic()
            if live is not None:
                live.update(render(board, daemon, broker.kind, cards))
            elif now - last_line >= 5:
                last_line = now
                counts = ", ".join(f"{p}: {n}" for p, n in sorted(board.per_pipeline.items())) or "waiting"
                # with --json, stdout carries only the summary
                out = sys.stderr if args.json else sys.stdout
                print(f"[{now - started:5.0f}s] predictions {counts}", file=out, flush=True)
            if args.duration is not None and now - started >= args.duration:
                break
    finally:
        if live is not None:
            live.stop()
        # All at once, bounded by STOP_S: the simulator says goodbye (devices offline), the view
        # unsubscribes, the daemon flushes; the broker goes last, once its clients have left.
        sim.stop()
        sim_task.cancel()
        watch_task.cancel()
        daemon.request_stop()
        await asyncio.wait([sim_task, watch_task, daemon_task], timeout=STOP_S)
        for task in (sim_task, watch_task, daemon_task):
            task.cancel()
        await asyncio.wait([sim_task, watch_task, daemon_task], timeout=STOP_S / 4)
        await broker.stop()
    summary: dict[str, Any] = {
        "broker": broker.kind,
        "speed": speed,
        "seconds": round(time.monotonic() - started, 1),
        # from the command's start until the simulated home began publishing (broker, models, daemon)
        "startup_s": None if launched is None else round(board.started - launched, 1),
        "faults": list(faults),
        "fault_onset_h": getattr(args, "fault_onset_h", DEMO_FAULT_ONSET_H),
        "pipelines": {},
    }
    for name in sorted(daemon.pipelines):
        correct, judged = board.accuracy(name)
        devices = sorted({d for p, d in board.rows if p == name})
        summary["pipelines"][name] = {
            "card_accuracy": cards.get(name),
            "wrong_series": board.wrong_series(name),
            "note": accuracy_note(name, cards.get(name), board.wrong_series(name)),
            "predictions": board.per_pipeline.get(name, 0),
            "devices": len(devices),
            "accuracy_vs_truth": None if not judged else round(correct / judged, 3),
            "judged": judged,
            # seconds from the simulator's start to this pipeline's first prediction
            "first_prediction_s": (
                round(board.first[name] - board.started, 1) if name in board.first else None
            ),
            "answers": per_device(board, name, speed),
        }
    return summary


def per_device(board: Board, pipeline: str, speed: float) -> dict[str, dict[str, Any]]:
    """What each device of ``pipeline`` was answered: every label counted, the latest answer's
    ``ood_score`` / ``score`` / ``explain``, and when the first anomaly came (seconds from the
    simulator's start, and the simulated hours that is)."""
    out: dict[str, dict[str, Any]] = {}
    for (name, device), row in sorted(board.rows.items()):
        if name != pipeline:
            continue
        entry: dict[str, Any] = {"labels": dict(row.labels), "latest": row.label}
        if row.ood_score is not None:
            entry["ood_score"] = row.ood_score
        if row.score is not None:
            entry["score"] = row.score
        if row.explain is not None:
            entry["explain"] = row.explain
        if row.first_anomaly is not None:
            after = row.first_anomaly - board.started
            entry["first_anomaly_s"] = round(after, 1)
            entry["first_anomaly_sim_h"] = round(after * speed / 3600.0, 2)
        out[device] = entry
    return out


def cli_demo(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="edge-infer demo", description=__doc__.splitlines()[0] if __doc__ else ""
    )
    parser.add_argument(
        "-c", "--config", type=Path, default=DEFAULT_CONFIG, help="daemon config (examples/home.yaml)"
    )
    parser.add_argument("--duration", type=float, help="stop after this many seconds and print a summary")
    parser.add_argument(
        "--mqtt-port", type=int, help="expose the embedded broker on this port (all interfaces)"
    )
    parser.add_argument("--broker", choices=["auto", "mosquitto", "amqtt"], default="auto")
    parser.add_argument("--speed", type=float, help="simulated time factor (default: fills windows in ~25 s)")
    parser.add_argument("--devices", type=int, default=2, help="simulated devices per family")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--fault",
        action="append",
        default=[],
        choices=FAULTS,
        help=f"simulate this fault (repeatable; default: {', '.join(DEMO_FAULTS)})",
    )
    parser.add_argument("--no-faults", action="store_true", help="the simulated home without faults")
    parser.add_argument(
        "--fault-onset-h",
        type=float,
        default=DEMO_FAULT_ONSET_H,
        help=f"simulated hours before the faults begin (default {DEMO_FAULT_ONSET_H:g})",
    )
    parser.add_argument("--no-ui", action="store_true", help="plain progress lines instead of the live table")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    launched = time.monotonic()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config, "mqtt://127.0.0.1:1883")
        models = load_models(config)
    except (ConfigError, ModelLoadError) as exc:
        print(f"edge-infer demo: {exc}", file=sys.stderr)
        return 2
    try:
        summary = asyncio.run(run_demo(args, config, models, launched))
    except RuntimeError as exc:
        print(f"edge-infer demo: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(
            f"\nsummary after {summary['seconds']} s "
            f"({summary['broker']} broker, simulated time ×{summary['speed']:g}, "
            f"started in {summary['startup_s']} s):"
        )
        for name, info in summary["pipelines"].items():
            first = info["first_prediction_s"]
            first_text = "none yet" if first is None else f"first after {first} s"
            accuracy = (
                ""
                if info["accuracy_vs_truth"] is None
                else (
                    f", {info['accuracy_vs_truth']:.0%} agree with the simulator's truth "
                    f"({info['judged']} judged)"
                )
            )
            print(
                f"  {name}: {info['predictions']} predictions for {info['devices']} devices "
                f"({first_text}){accuracy}"
            )
            if info["note"]:
                print(f"    {info['note']}")
            for device, answer in info["answers"].items():
                if not ({"score", "explain"} & set(answer)) and "unknown" not in answer["labels"]:
                    continue  # the classifiers' known answers: the counts above say it
                seen = ", ".join(f"{label} x{n}" for label, n in sorted(answer["labels"].items()))
                line = f"    {device}: {seen}"
                if "first_anomaly_s" in answer:
                    line += (
                        f"; first anomaly after {answer['first_anomaly_s']} s "
                        f"({answer['first_anomaly_sim_h']} simulated h, "
                        f"fault from {summary['fault_onset_h']:g} h)"
                    )
                print(line)
                if "explain" in answer:
                    print(f"      why: {explain_text(answer['explain'])}")
    return 0
