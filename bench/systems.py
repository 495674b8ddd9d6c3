"""Systems under test: each a process the harness starts, waits for, measures and stops."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml

from bench.loadgen import Stream
from bench.models import FF_FEATURES, WINDOW_CHANNELS

ROOT = Path(__file__).resolve().parent.parent


def torch_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


@dataclass
class System:
    """One process answering ``streams``; ready when ``status_topic`` says ``online``."""

    name: str
    label: str
    kind: str  # ceiling | naive | torch | edge-infer
    argv: list[str]
    status_topic: str
    streams: list[Stream]
    warmup_per_stream: int = 1
    workdir: Path | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)  # extra environment (A/B experiments)
    cwd: Path = ROOT  # where it runs: an A/B variant runs from its own tree (bench/ab.py)
    proc: subprocess.Popen[bytes] | None = None
    ps: psutil.Process | None = None
    ready_s: float | None = None
    log_path: Path | None = None

    def start(self, port: int, timeout: float = 60.0) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        online = threading.Event()
        watcher = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        watcher.on_message = lambda _c, _u, m: online.set() if m.payload == b"online" else None
        watcher.connect("127.0.0.1", port, keepalive=60)
        watcher.subscribe(self.status_topic, 1)
        watcher.loop_start()
        assert self.workdir is not None
        self.log_path = self.workdir / f"{self.name}.log"
        log = self.log_path.open("wb")
        began = time.perf_counter()
        self.proc = subprocess.Popen(
            self.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.cwd,
            env={**os.environ, "PYTHONPATH": str(ROOT), **self.env},
        )
        log.close()
        try:
            deadline = time.monotonic() + timeout
            while not online.wait(0.02):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} did not become ready:\n{self.log_tail()}")
            self.ready_s = time.perf_counter() - began
        finally:
            watcher.loop_stop()
            watcher.disconnect()
        self.ps = psutil.Process(self.proc.pid)

    def log_tail(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def cpu_s(self) -> float:
        """CPU seconds of the process and its live children (the C clients of ``cpipe``)."""
        assert self.ps is not None
        t = self.ps.cpu_times()
        total = float(t.user + t.system)
        for child in self.ps.children(recursive=True):
            try:
                c = child.cpu_times()
            except psutil.Error:
                continue
            total += float(c.user + c.system)
        return total

    def rss_mb(self) -> float:
        assert self.ps is not None
        return float(self.ps.memory_info().rss) / 2**20

    def peak_rss_mb(self) -> float:
        """VmHWM: the highest resident set size of the process so far."""
        assert self.proc is not None
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return self.rss_mb()

    def loaded_torch(self) -> bool:
        assert self.proc is not None
        try:
            maps = Path(f"/proc/{self.proc.pid}/maps").read_text()
        except OSError:
            return False
        return "libtorch" in maps

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


# ---------------------------------------------------------------------- constructors


def _streams(
    prefix: str, devices: int, out_pipeline: str, fields: tuple[str, ...], sub: str = ""
) -> list[Stream]:
    base = f"{prefix}/{sub}" if sub else prefix
    return [Stream(f"{base}/in/d{i}", f"{prefix}/out/{out_pipeline}/d{i}", fields) for i in range(devices)]


def baseline(kind: str, run_id: str, workdir: Path, port: int, *, devices: int, ff_model: Path) -> System:
    name = {"echo": "paho-echo", "naive": "aiomqtt-naive", "torch": "paho-torch", "cpipe": "c-pipe"}[kind]
    label = {
        "cpipe": "mosquitto_sub | mosquitto_pub (physical reference)",
        "echo": "paho-mqtt echo (ceiling)",
        "naive": "aiomqtt + ORT, awaited publish (naive)",
        "torch": "paho-mqtt + PyTorch eager",
    }[kind]
    prefix = f"bench/{name}"
    status = f"bench-{run_id}/{name}/status"
    argv = [
        sys.executable,
        "-m",
        "bench.suts",
        kind,
        "--port",
        str(port),
        "--prefix",
        prefix,
        "--status",
        status,
        "--client-id",
        f"{name}-{run_id}",
        "--model",
        str(ff_model),
        "--weights",
        str(ff_model.with_suffix(".npz")),
    ]
    streams = _streams(prefix, devices, "x", tuple(FF_FEATURES))
    if kind == "cpipe":  # one answer topic for all: the echoed t matches each answer
        streams = [Stream(s.in_topic, f"{prefix}/out/x/all", s.fields) for s in streams]
    return System(name, label, kind, argv, status, streams, 1, workdir)


@dataclass
class PipelineSpec:
    """One pipeline of an edge-infer configuration under test."""

    name: str
    model: Path
    features: tuple[str, ...]
    window: int | None = None  # None: snapshot
    devices: int = 100
    qos: int = 0  # of the pipeline's subscription (the inputs' QoS is the publisher's)
    topic: str | None = None  # input stream of another pipeline: several pipelines on one topic


def edge_infer(
    name: str, label: str, run_id: str, workdir: Path, *, port: int, pipelines: list[PipelineSpec]
) -> System:
    """Pipelines whose ``topic`` names another pipeline read that pipeline's input topic (each
    input answered once per pipeline); their answers are not matched (the streams are the first
    pipeline's), they add work to every input."""
    """The daemon as users run it: ``python -m edge.cli run -c CONFIG``."""
    prefix = f"bench/{name}"
    base = f"bench-{run_id}/{name}"
    models: dict[str, Any] = {}
    config_pipelines: dict[str, Any] = {}
    streams: list[Stream] = []
    warmup = 1
    for p in pipelines:
        model_name = p.name
        models[model_name] = {"path": str(p.model)}
        features: dict[str, Any] = (
            {"type": "window", "hop": 1} if p.window is not None else {"type": "snapshot"}
        )
        config_pipelines[p.name] = {
            "model": model_name,
            "source": {
                "profile": "json",
                "topics": [f"{prefix}/{p.topic or p.name}/in/{{device}}"],
                "timestamp_field": "t",
                "qos": p.qos,
            },
            "features": features,
            # a shared-topic pipeline answers outside bench/+/out/#: not counted, not matched
            "output": {"topic": f"{prefix}/{'shared' if p.topic else 'out'}/{{pipeline}}/{{device}}"},
            "max_devices": max(1000, p.devices),
        }
        if p.topic is None:
            streams += _streams(prefix, p.devices, p.name, p.features, sub=p.name)
        warmup = max(warmup, p.window or 1)
    config = {
        "mqtt": {
            "url": f"mqtt://127.0.0.1:{port}",
            "base_topic": base,
            "client_id": f"{name}-{run_id}",
            "persistent_session": False,
        },
        "models": models,
        "pipelines": config_pipelines,
        "homeassistant": {"enabled": False},
        "reload": {"watch_models": False},
    }
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    argv = [sys.executable, "-m", "edge.cli", "run", "-c", str(path), "--log-level", "WARNING"]
    return System(name, label, "edge-infer", argv, f"{base}/status", streams, warmup, workdir)


def zoo_models(root: Path = ROOT / "models") -> dict[str, tuple[Path, tuple[str, ...], int | None]]:
    """Zoo models present now: name -> (int8 ONNX path, channels, window), read from the manifest."""
    import onnxruntime as ort

    from edge.manifest import manifest_from_metadata

    found: dict[str, tuple[Path, tuple[str, ...], int | None]] = {}
    if not root.is_dir():
        return found
    for directory in sorted(root.iterdir()):
        path = directory / f"{directory.name}.int8.onnx"
        if not path.is_file():
            continue
        try:
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            manifest = manifest_from_metadata(session.get_modelmeta().custom_metadata_map, str(path))
        except Exception:
            continue
        if manifest is None or manifest.input.layout not in ("window", "snapshot"):
            continue  # grid models need a feed of their own
        window = manifest.input.window if manifest.input.layout == "window" else None
        found[directory.name] = (path, tuple(manifest.input.features), window)
    return found


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)
    return dst


WINDOW_FIELDS = tuple(WINDOW_CHANNELS)
