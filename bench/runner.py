"""The comparison run: every system against one Mosquitto, measured side by side, baselines included."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from bench import models
from bench.loadgen import Subscriber, cdf_points, match, percentiles_ms, publish
from bench.systems import (
    ROOT,
    PipelineSpec,
    System,
    baseline,
    copy_model,
    edge_infer,
    torch_available,
    zoo_models,
)

SCHEMA = 1


@dataclass
class Settings:
    """How much to measure. ``quick`` finishes in under two minutes; ``full`` takes longer."""

    mode: str = "full"
    devices: int = 100
    offered: tuple[int, ...] = (100, 1000)
    offered_s: float = 10.0
    burst: int = 20_000
    reps: int = 3
    publishers: int = 2
    baselines: tuple[str, ...] = ("echo", "cpipe", "naive", "torch")
    window_row: bool = True
    zoo: bool = True
    zoo_devices: int = 10
    zoo_offered: bool = True
    zoo_burst: int = 10_000
    memory_3_models: bool = True
    scale_devices: tuple[int, ...] = (1, 100, 10_000)
    scale_pipelines: tuple[int, ...] = (1, 2, 4, 8)
    scale_burst: int = 20_000
    plots: bool = True
    explain_repeats: int = 200  # bench/explain_cost.py's answers a case (0: that section left out)
    broker_nodelay: bool = True  # Mosquitto set_tcp_nodelay: see docs/performance.md
    qos: int = 0  # QoS of the inputs (and of the daemon's subscription): 1 adds the PUBACK path

    @classmethod
    def quick(cls) -> Settings:
        return cls(
            mode="quick",
            offered_s=1.5,
            burst=5_000,
            reps=2,
            zoo_devices=2,
            zoo_offered=False,
            zoo_burst=3_000,
            scale_pipelines=(1, 4),
            scale_burst=5_000,
            explain_repeats=50,
        )

    @classmethod
    def tiny(cls) -> Settings:
        """For the smoke test: the machinery end to end, no numbers worth reading."""
        return cls(
            mode="tiny",
            devices=3,
            offered=(100,),
            offered_s=0.3,
            burst=200,
            reps=1,
            baselines=("echo", "cpipe"),
            window_row=False,
            zoo=False,
            memory_3_models=False,
            scale_devices=(1, 10),
            scale_pipelines=(1,),
            scale_burst=100,
            plots=False,
            explain_repeats=0,
        )


Log = Callable[[str], None]


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import psutil

    cpu_model = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    versions: dict[str, str | None] = {}
    for module in ("paho.mqtt", "aiomqtt", "onnxruntime", "numpy", "torch", "orjson", "uvloop"):
        try:
            mod = __import__(module, fromlist=["__version__"]) if module != "torch" else None
            versions[module] = getattr(mod, "__version__", "?") if mod is not None else None
        except ImportError:
            versions[module] = None
    if torch_available():
        from importlib.metadata import version

        versions["torch"] = version("torch")
    mosquitto = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        from tests.broker import find_mosquitto

        binary = find_mosquitto()
        if binary:
            out = subprocess.run(
                [binary, "-h"], capture_output=True, text=True, timeout=5, check=False
            ).stdout
            mosquitto = out.splitlines()[0] if out else None
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu_model,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": sys.version.split()[0],
        "versions": versions,
        "mosquitto": mosquitto,
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


class Bench:
    """Owns the broker, the subscriber and the systems; runs the phases."""

    def __init__(self, settings: Settings, workdir: Path, log: Log) -> None:
        from tests.broker import Mosquitto

        self.s = settings
        self.workdir = workdir
        self.log = log
        self.run_id = uuid.uuid4().hex[:8]
        extra = "set_tcp_nodelay true" if settings.broker_nodelay else ""
        self.broker = Mosquitto(workdir / "mosquitto", extra_config=extra).start()
        self.port = self.broker.port
        self.sub = Subscriber(self.port, ["bench/+/out/#"])
        self.ff = models.feed_forward(workdir / "ff.onnx")
        self.win = models.windowed(workdir / "window.onnx")

    def close(self) -> None:
        self.sub.close()
        self.broker.stop()

    def _others_cpu_s(self) -> dict[str, float]:
        """CPU seconds so far of the broker, the publishers (children of this process that have
        exited and been joined: ``os.times``' children fields) and the subscriber process."""
        import psutil

        def cpu(pid: int | None) -> float:
            if pid is None:
                return 0.0
            try:
                t = psutil.Process(pid).cpu_times()
            except psutil.Error:
                return 0.0
            return float(t.user + t.system)

        mine = os.times()
        return {
            "broker": cpu(self.broker.process.pid if self.broker.process else None),
            "publishers": mine.children_user + mine.children_system,
            "subscriber": cpu(self.sub.pid),
        }

    # ------------------------------------------------------------------ phases

    def start(self, system: System) -> None:
        system.start(self.port)
        self.log(f"  {system.name}: ready in {system.ready_s:.2f}s")

    def warm_up(self, system: System) -> None:
        """Fill every device's state (windows) and touch every code path once; answers discarded."""
        per = system.warmup_per_stream
        count = per * len(system.streams)
        publish(self.port, system.streams, count, None, processes=self.s.publishers, seed=99, qos=self.s.qos)
        self.sub.settle(count, idle_s=0.7 + len(system.streams) / 5000, timeout_s=120)
        self.sub.take()

    def phase(self, system: System, count: int, rate: float | None) -> dict[str, Any]:
        import psutil

        self.sub.take()
        others = self._others_cpu_s()
        cpu0 = system.cpu_s()
        host0, wall0 = psutil.cpu_times(), time.perf_counter()
        processes = 1 if rate is not None else self.s.publishers
        idx, sent = publish(self.port, system.streams, count, rate, processes=processes, qos=self.s.qos)
        self.sub.settle(count, idle_s=1.0 + len(system.streams) / 5000, timeout_s=max(30.0, count / 500))
        cpu1 = system.cpu_s()
        host1, wall1 = psutil.cpu_times(), time.perf_counter()
        others = {k: v - others[k] for k, v in self._others_cpu_s().items()}
        records = self.sub.take()
        m = match(records, system.streams, idx, sent)
        span = float(m.arrivals.max() - sent.min()) if m.answers else 0.0
        send_span = float(sent.max() - sent.min()) if sent.size > 1 else 0.0
        # Busy cores: the daemon's CPU seconds per wall second over the span from the first send
        # to the last answer (below 1 at saturation: it idles while input waits), and the whole
        # machine's (publishers, broker, subscriber and everyone else on it) over the phase as
        # sampled (publishers' start and the settle wait included: a lower bound at saturation).
        # Where the cores went over that span: the system's, the broker's, the publishers' and the
        # subscriber's CPU seconds per wall second (each does its work inside the span, so this is
        # their busy cores there; the sum near the usable CPUs says the machine is the bound).
        host_busy = _busy_s(host1) - _busy_s(host0)
        cores = {"system": (cpu1 - cpu0), **others}
        return {
            "offered_msg_s": rate,
            "sent": int(sent.size),
            "received": m.answers,
            "lost": int(sent.size) - m.answers,
            "send_rate_msg_s": round(sent.size / send_span, 1) if send_span > 0 else None,
            "throughput_msg_s": round(m.answers / span, 1) if span > 0 else None,
            "latency_ms": percentiles_ms(m.latencies_s),
            "cdf_ms": cdf_points(m.latencies_s),
            "cpu_s_per_1000": round((cpu1 - cpu0) / max(1, sent.size) * 1000, 4),
            "busy_cores": round((cpu1 - cpu0) / span, 3) if span > 0 else None,
            "machine_busy_cores": round(host_busy / (wall1 - wall0), 3),
            "cores_by_process": {k: round(v / span, 3) for k, v in cores.items()} if span > 0 else None,
            "broker_us_per_msg": round(others["broker"] / max(1, sent.size) * 1e6, 2),
            "rss_mb": round(system.rss_mb(), 1),
            "unmatched": m.unmatched,
            "_latencies": m.latencies_s,
        }

    def saturation(self, reps: list[dict[str, Any]]) -> dict[str, Any]:
        """Median of interleaved repetitions; latency percentiles over all of them."""
        lat = np.concatenate([r.pop("_latencies") for r in reps]) if reps else np.array([])
        rates = [r["throughput_msg_s"] or 0.0 for r in reps]
        cpu = [r["cpu_s_per_1000"] for r in reps]
        busy = [r["busy_cores"] for r in reps if r["busy_cores"] is not None]
        host = [r["machine_busy_cores"] for r in reps if r["machine_busy_cores"] is not None]
        split = [r["cores_by_process"] for r in reps if r.get("cores_by_process")]
        broker_us = [r["broker_us_per_msg"] for r in reps if r.get("broker_us_per_msg") is not None]
        return {
            "throughput_msg_s": round(statistics.median(rates), 1) if rates else None,
            "throughput_reps": rates,
            "sent": sum(r["sent"] for r in reps),
            "received": sum(r["received"] for r in reps),
            "lost": sum(r["lost"] for r in reps),
            "latency_ms": percentiles_ms(lat),
            "cdf_ms": cdf_points(lat),
            "cpu_s_per_1000": round(statistics.median(cpu), 4) if cpu else None,
            "busy_cores": round(statistics.median(busy), 3) if busy else None,
            "machine_busy_cores": round(statistics.median(host), 3) if host else None,
            "cores_by_process": (
                {k: round(statistics.median(c[k] for c in split), 3) for k in split[0]} if split else None
            ),
            "broker_us_per_msg": round(statistics.median(broker_us), 2) if broker_us else None,
            "rss_mb": reps[-1]["rss_mb"] if reps else None,
        }

    # ------------------------------------------------------------------ groups

    def measure_group(
        self, systems: list[System], offered: tuple[int, ...], burst: int, reps: int
    ) -> dict[str, dict[str, Any]]:
        """Start all, then run each load on each system in turn (interleaved, so background
        noise on a shared machine falls on every system alike)."""
        results: dict[str, dict[str, Any]] = {}
        try:
            for system in systems:
                self.start(system)
                self.warm_up(system)
                results[system.name] = {
                    "label": system.label,
                    "kind": system.kind,
                    "ready_s": round(system.ready_s or 0.0, 3),
                    "devices": len(system.streams),
                    "loads": {},
                    **system.notes,
                }
            for rate in offered:
                for system in systems:
                    count = max(1, int(rate * self.s.offered_s))
                    r = self.phase(system, count, float(rate))
                    r.pop("_latencies")
                    results[system.name]["loads"][str(rate)] = r
                    self.log(
                        f"  {system.name} @ {rate}/s: p50 {r['latency_ms']['p50']} ms, "
                        f"p99 {r['latency_ms']['p99']} ms, {r['received']}/{r['sent']}"
                    )
            runs: dict[str, list[dict[str, Any]]] = {s.name: [] for s in systems}
            for _ in range(reps):
                for system in systems:
                    runs[system.name].append(self.phase(system, burst, None))
            for system in systems:
                sat = self.saturation(runs[system.name])
                results[system.name]["loads"]["saturation"] = sat
                results[system.name]["peak_rss_mb"] = round(system.peak_rss_mb(), 1)
                results[system.name]["loaded_torch"] = system.loaded_torch()
                self.log(
                    f"  {system.name} saturation: {sat['throughput_msg_s']} msg/s "
                    f"(reps {sat['throughput_reps']}), peak RSS {results[system.name]['peak_rss_mb']} MB"
                )
        finally:
            for system in systems:
                system.stop()
        return results


def _busy_s(times: Any) -> float:
    """CPU seconds the whole machine was busy, from psutil.cpu_times(): user (guest time is
    already in it), nice, system, irq and softirq; not idle, iowait, or steal (time the
    hypervisor gave to other machines)."""
    busy = ("user", "nice", "system", "irq", "softirq")
    return float(sum(getattr(times, name, 0.0) for name in busy))


def _write_model_copies(src: Path, workdir: Path, count: int) -> list[Path]:
    return [copy_model(src, workdir / f"ff-copy{i}.onnx") for i in range(count)]


def run_suite(settings: Settings, out_dir: Path, log: Log = print) -> dict[str, Any]:
    """Run everything ``settings`` asks for; write JSON, markdown and plots to ``out_dir``."""
    from bench import report

    started = time.time()
    workdir = Path(tempfile.mkdtemp(prefix="edge-bench-"))
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "mode": settings.mode,
        "command": "python -m bench" + ("" if settings.mode == "full" else f" --{settings.mode}"),
        "settings": asdict(settings),
        "machine": machine(),
        "systems": {},
        "scaling": {"devices": [], "pipelines": []},
        "memory_3_models": None,
        "explain_cost": None,
        "notes": [],
    }
    bench = Bench(settings, workdir, log)
    try:
        # 1. the main comparison, interleaved
        group: list[System] = []
        for kind in settings.baselines:
            if kind == "torch" and not torch_available():
                result["notes"].append("paho-torch skipped: torch is not installed (pip install torch)")
                continue
            if kind == "cpipe" and not (shutil.which("mosquitto_sub") and shutil.which("mosquitto_pub")):
                result["notes"].append("c-pipe skipped: mosquitto_sub/mosquitto_pub not found")
                continue
            group.append(
                baseline(kind, bench.run_id, workdir, bench.port, devices=settings.devices, ff_model=bench.ff)
            )
        ff = PipelineSpec("snap", bench.ff, tuple(models.FF_FEATURES), None, settings.devices)
        group.append(
            edge_infer(
                "edge-snapshot",
                "edge-infer, snapshot, feed-forward",
                bench.run_id,
                workdir,
                port=bench.port,
                pipelines=[ff],
            )
        )
        if settings.window_row:
            win = PipelineSpec(
                "win", bench.win, tuple(models.WINDOW_CHANNELS), models.WINDOW_SIZE, settings.devices
            )
            group.append(
                edge_infer(
                    "edge-window",
                    "edge-infer, window 16x3, MLP",
                    bench.run_id,
                    workdir,
                    port=bench.port,
                    pipelines=[win],
                )
            )
        log(f"main comparison: {', '.join(s.name for s in group)}")
        result["systems"].update(bench.measure_group(group, settings.offered, settings.burst, settings.reps))

        # 2. the zoo, each model in a window pipeline of its own
        zoo = zoo_models() if settings.zoo else {}
        if settings.zoo and not zoo:
            result["notes"].append("no zoo models found under models/<name>/<name>.int8.onnx")
        for name, (path, features, window) in zoo.items():
            devices = settings.zoo_devices
            spec = PipelineSpec(name, path, features, window, devices)
            system = edge_infer(
                f"zoo-{name}",
                f"edge-infer, zoo {name} (int8, {'window ' + str(window) if window else 'snapshot'})",
                bench.run_id,
                workdir,
                port=bench.port,
                pipelines=[spec],
            )
            log(f"zoo model {name}")
            offered = settings.offered if settings.zoo_offered else ()
            result["systems"].update(bench.measure_group([system], offered, settings.zoo_burst, 1))

        # 3. memory and start time with all the zoo models loaded
        if settings.memory_3_models and len(zoo) >= 1:
            specs = [PipelineSpec(n, p, f, w, 1) for n, (p, f, w) in zoo.items()]
            system = edge_infer(
                "edge-zoo-all",
                f"edge-infer, {len(specs)} zoo models",
                bench.run_id,
                workdir,
                port=bench.port,
                pipelines=specs,
            )
            log(f"memory with {len(specs)} zoo models")
            r = bench.measure_group([system], (), 1000, 1)[system.name]
            result["memory_3_models"] = {
                "models": list(zoo),
                "ready_s": r["ready_s"],
                "peak_rss_mb": r["peak_rss_mb"],
                "rss_mb": r["loads"]["saturation"]["rss_mb"],
                "loaded_torch": r["loaded_torch"],
            }

        # 4. scaling with the number of devices and of pipelines (edge-infer, snapshot)
        for devices in settings.scale_devices:
            spec = PipelineSpec("snap", bench.ff, tuple(models.FF_FEATURES), None, devices)
            system = edge_infer(
                f"edge-devices-{devices}",
                f"{devices} devices",
                bench.run_id,
                workdir,
                port=bench.port,
                pipelines=[spec],
            )
            log(f"scaling: {devices} devices")
            burst = max(settings.scale_burst, 2 * devices)
            r = bench.measure_group([system], (), burst, 1)[system.name]
            sat = r["loads"]["saturation"]
            result["scaling"]["devices"].append(
                {
                    "devices": devices,
                    "throughput_msg_s": sat["throughput_msg_s"],
                    "latency_ms": sat["latency_ms"],
                    "cpu_s_per_1000": sat["cpu_s_per_1000"],
                    "rss_mb": sat["rss_mb"],
                    "peak_rss_mb": r["peak_rss_mb"],
                }
            )
        for count in settings.scale_pipelines:
            copies = _write_model_copies(bench.ff, workdir, count)
            per = max(1, settings.devices // count)
            specs = [
                PipelineSpec(f"p{i}", copies[i], tuple(models.FF_FEATURES), None, per) for i in range(count)
            ]
            system = edge_infer(
                f"edge-pipelines-{count}",
                f"{count} pipelines",
                bench.run_id,
                workdir,
                port=bench.port,
                pipelines=specs,
            )
            log(f"scaling: {count} pipelines (a model each)")
            r = bench.measure_group([system], (), settings.scale_burst, 1)[system.name]
            sat = r["loads"]["saturation"]
            result["scaling"]["pipelines"].append(
                {
                    "pipelines": count,
                    "throughput_msg_s": sat["throughput_msg_s"],
                    "latency_ms": sat["latency_ms"],
                    "cpu_s_per_1000": sat["cpu_s_per_1000"],
                    "rss_mb": sat["rss_mb"],
                    "peak_rss_mb": r["peak_rss_mb"],
                    "ready_s": r["ready_s"],
                }
            )
        # 5. what output.explain (and the open-set file) cost per answer: batch 1, a process a case
        if settings.explain_repeats:
            from bench.explain_cost import measure_all

            log("explain cost (batch 1, with and without output.explain)")
            result["explain_cost"] = measure_all(settings.explain_repeats)
    finally:
        bench.close()
        shutil.rmtree(workdir, ignore_errors=True)
    result["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["duration_s"] = round(time.time() - started, 1)
    result["headline"], result["goals"] = report.headline(result)
    report.write(result, out_dir, plots=settings.plots)
    return result


def default_out_dir() -> Path:
    return ROOT / "bench" / "results"
