"""``python -m bench.rss``: the daemon's memory with a home's config serving every pipeline.

Each run starts a Mosquitto of its own, the daemon as users run it (``python -m edge.cli run -c
CONFIG --mqtt-url URL``) and, once the daemon says ``online``, the simulated home
(``edge-infer simulate``, fast-forwarded, with the faults the demo shows so that the open-set,
fridge and water pipelines have devices too). The daemon's RSS (psutil) is sampled idle (ready,
before the first input) and every 0.1 s until every pipeline of the config has answered, then a
little longer; the peak is the kernel's high-water mark (``VmHWM``), so a spike between samples
counts. Runs are repeated and reported as median and range.

Beside the runs:

- an **import-cost profile**: a fresh interpreter imports what the daemon imports, one major
  dependency at a time (numpy, onnxruntime, pydantic, yaml, ssl, prometheus_client, the MQTT
  client, ...), then the rest of edge/, then loads the config and each model session as the
  daemon does, and reports its RSS after each step: what bounds the total;
- the daemon's **mappings at its peak** (``/proc/PID/smaps``, RSS per file: the shared
  libraries, the heap, anonymous memory) at the end of each run.

Variants (``NAME:KEY=VALUE,...``; a dotted key overrides the config, an upper-case one is an
environment variable) run interleaved, e.g.::

    python -m bench.rss --runs 3
    python -m bench.rss --runs 3 default arena:runtime.cpu_mem_arena=true blas4:OPENBLAS_NUM_THREADS=4

Writes ``bench/results/<date>-rss.json`` and ``.md`` (``--out`` for another folder).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from bench.runner import default_out_dir, machine

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "examples" / "home.yaml"
# the demo's faults: they add the devices the open-set, fridge and water pipelines serve
DEFAULT_FAULTS = ("unseen_appliance", "fridge_creep", "water_leak")
SAMPLE_S = 0.1
DAEMON = (sys.executable, "-m", "edge.cli", "run")


@dataclass
class Variant:
    name: str
    config: dict[str, Any] = field(default_factory=dict)  # dotted key -> value
    env: dict[str, str] = field(default_factory=dict)
    tree: Path = ROOT  # the daemon's edge/ (``tree=PATH``: e.g. a ``git archive`` of another commit)

    @classmethod
    def parse(cls, text: str) -> Variant:
        """``NAME[:KEY=VALUE,...]``: ``runtime.x=1`` sets the config (a YAML value), ``ENV=1`` the
        environment, ``tree=PATH`` runs the daemon from another tree."""
        name, _, rest = text.partition(":")
        if not name:
            raise argparse.ArgumentTypeError(f"variant {text!r}: expected NAME[:KEY=VALUE,...]")
        variant = cls(name)
        for pair in filter(None, rest.split(",")):
            key, sep, value = pair.partition("=")
            if not sep or not key:
                raise argparse.ArgumentTypeError(f"variant {text!r}: {pair!r} is not KEY=VALUE")
            if key == "tree":
                variant.tree = Path(value).resolve()
            elif "." in key:
                variant.config[key] = yaml.safe_load(value)
            else:
                variant.env[key] = value
        return variant


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``data`` with each dotted key set (missing sections created)."""
    for key, value in overrides.items():
        node = data
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return data


def read_kb(path: str, field_name: str) -> int | None:
    """A ``kB`` line of a ``/proc/.../status`` file (``VmRSS``, ``VmHWM``)."""
    try:
        with open(path) as handle:
            for line in handle:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def smaps_by_file(pid: int, top: int = 14) -> list[dict[str, Any]]:
    """RSS per mapped file (anonymous memory, ``[heap]`` and ``[stack]`` by those names), largest first."""
    totals: dict[str, int] = {}
    current = "[anon]"
    try:
        with open(f"/proc/{pid}/smaps") as handle:
            for line in handle:
                head = line.split(None, 5)
                if not head:
                    continue
                if "-" in head[0] and not head[0].endswith(":"):  # a mapping's header line
                    current = head[5].strip() if len(head) > 5 else "[anon]"
                    if current.startswith("/"):
                        current = Path(current).name
                elif head[0] == "Rss:":
                    totals[current] = totals.get(current, 0) + int(head[1])
    except OSError:
        return []
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])
    rows = [{"mapping": name, "rss_mb": round(kb / 1024, 1)} for name, kb in ranked[:top]]
    rest = sum(kb for _, kb in ranked[top:])
    if rest:
        rows.append({"mapping": f"({len(ranked) - top} more)", "rss_mb": round(rest / 1024, 1)})
    return rows


# ---------------------------------------------------------------------- import-cost profile


def import_profile(config_path: Path, env: dict[str, str]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "bench.rss_profile", str(config_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        timeout=300,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"import profile failed:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


# ---------------------------------------------------------------------- one run


class Answers:
    """Counts the daemon's answers per pipeline (``<base>/<pipeline>/<device>``) and sees ``online``."""

    def __init__(self, port: int, base: str, pipelines: list[str]) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.base = base
        self.pipelines = set(pipelines)
        self.counts: dict[str, int] = dict.fromkeys(pipelines, 0)
        self.first: dict[str, float] = {}
        self.online = threading.Event()
        self.lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=60)
        self.client.subscribe(f"{base}/#", 0)
        self.client.loop_start()

    def _on_message(self, _c: Any, _u: Any, message: Any) -> None:
        topic: str = message.topic
        if topic == f"{self.base}/status":
            if message.payload == b"online":
                self.online.set()
            return
        parts = topic.split("/")
        if message.retain or len(parts) < 3 or parts[1] not in self.pipelines:
            return
        with self.lock:
            self.counts[parts[1]] += 1
            self.first.setdefault(parts[1], time.monotonic())

    def all_answered(self) -> bool:
        with self.lock:
            return all(self.counts.values())

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _tail(path: Path, lines: int = 30) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def one_run(
    variant: Variant,
    config_path: Path,
    workdir: Path,
    *,
    index: int,
    speed: float,
    devices: int,
    faults: tuple[str, ...],
    families: str | None,
    timeout: float,
    settle: float,
    hold: float,
) -> dict[str, Any]:
    import psutil

    from tests.broker import Mosquitto

    data = yaml.safe_load(config_path.read_text())
    base = str((data.get("mqtt") or {}).get("base_topic", "edge-infer"))
    pipelines = [n for n, p in (data.get("pipelines") or {}).items() if (p or {}).get("enabled", True)]
    if variant.config:
        config_path = workdir / f"{variant.name}.yaml"
        config_path.write_text(yaml.safe_dump(apply_overrides(data, dict(variant.config)), sort_keys=False))
    here = workdir / f"run{index}-{variant.name}"
    broker = Mosquitto(here / "mosquitto", extra_config="set_tcp_nodelay true").start()
    answers = Answers(broker.port, base, pipelines)
    env = {**os.environ, "PYTHONPATH": str(ROOT), **variant.env}
    # python -m puts the working folder first: the daemon runs from the variant's tree
    daemon_env = {**env, "PYTHONPATH": f"{variant.tree}:{ROOT}"}
    daemon_log = here / "daemon.log"
    sim_log = here / "simulate.log"
    sim: subprocess.Popen[bytes] | None = None
    began = time.monotonic()
    with daemon_log.open("wb") as log:
        daemon = subprocess.Popen(
            [*DAEMON, "-c", str(config_path), "--mqtt-url", broker.url, "--log-level", "WARNING"],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=variant.tree,
            env=daemon_env,
        )
    samples: list[tuple[float, float]] = []  # (seconds since the simulator started, RSS MB)
    try:
        while not answers.online.wait(0.05):
            if daemon.poll() is not None or time.monotonic() - began > 60:
                raise RuntimeError(f"the daemon did not come online:\n{_tail(daemon_log)}")
        ready_s = time.monotonic() - began
        ps = psutil.Process(daemon.pid)
        time.sleep(settle)
        idle = [ps.memory_info().rss / 2**20]
        for _ in range(4):
            time.sleep(0.2)
            idle.append(ps.memory_info().rss / 2**20)
        hwm_ready = (read_kb(f"/proc/{daemon.pid}/status", "VmHWM") or 0) / 1024
        argv = [sys.executable, "-m", "edge.cli", "simulate", "--mqtt-url", broker.url]
        argv += ["--speed", f"{speed:g}", "--devices", str(devices), "--fault-onset-h", "3"]
        for fault in faults:
            argv += ["--fault", fault]
        if families:
            argv += ["--families", families]
        with sim_log.open("wb") as log:
            sim = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        sim_began = time.monotonic()
        answered_s: float | None = None
        while True:
            now = time.monotonic()
            samples.append((now - sim_began, ps.memory_info().rss / 2**20))
            if answered_s is None and answers.all_answered():
                answered_s = now - sim_began
            if answered_s is not None and now - sim_began >= answered_s + hold:
                break
            if now - sim_began > timeout or daemon.poll() is not None:
                break
            if sim.poll() is not None and answered_s is None:
                raise RuntimeError(f"the simulator ended early:\n{_tail(sim_log)}")
            time.sleep(SAMPLE_S)
        peak = (read_kb(f"/proc/{daemon.pid}/status", "VmHWM") or 0) / 1024
        mappings = smaps_by_file(daemon.pid)
        with answers.lock:
            counts = dict(answers.counts)
            first = {p: round(t - sim_began, 1) for p, t in answers.first.items()}
    finally:
        if sim is not None:
            _stop(sim, signal.SIGINT)
        _stop(daemon)
        answers.close()
        broker.stop()
    return {
        "variant": variant.name,
        "run": index,
        "ready_s": round(ready_s, 2),
        "idle_mb": round(statistics.median(idle), 1),
        "hwm_at_ready_mb": round(hwm_ready, 1),
        "peak_mb": round(peak, 1),
        "peak_sampled_mb": round(max(rss for _, rss in samples), 1) if samples else None,
        "all_answered": answered_s is not None,
        "all_answered_s": None if answered_s is None else round(answered_s, 1),
        "answers": counts,
        "first_answer_s": first,
        "unanswered": sorted(p for p, n in counts.items() if not n),
        "mappings_at_end": mappings,
        "samples": [(round(t, 2), round(r, 1)) for t, r in samples[:: max(1, len(samples) // 200)]],
    }


# ---------------------------------------------------------------------- summary and report


def spread(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"median": None, "min": None, "max": None}
    return {"median": round(statistics.median(values), 1), "min": min(values), "max": max(values)}


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per variant: median and range of idle RSS, peak RSS and the time until every pipeline answered."""
    table: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r["variant"] for r in runs):
        mine = [r for r in runs if r["variant"] == name]
        times = [r["all_answered_s"] for r in mine if r["all_answered_s"] is not None]
        table[name] = {
            "runs": len(mine),
            "idle_mb": spread([r["idle_mb"] for r in mine]),
            "peak_mb": spread([r["peak_mb"] for r in mine]),
            "hwm_at_ready_mb": spread([r["hwm_at_ready_mb"] for r in mine]),
            "all_answered_s": spread(times),
            "every_pipeline_answered": all(r["all_answered"] for r in mine),
        }
    return table


def _range(s: dict[str, Any]) -> str:
    if s["median"] is None:
        return "-"
    return f"{s['median']:.1f} ({s['min']:.1f}–{s['max']:.1f})"


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"# RSS with {result['config']} ({result['date']})",
        "",
        f"`{result['command']}`; {m['cpu']}, {m['usable_cpus']} usable CPUs, load average "
        f"{m['loadavg_start'][0]} → {m.get('loadavg_end', ['?'])[0]}; simulator speed "
        f"×{result['speed']:g}, {result['devices']} devices per family, "
        f"faults {', '.join(result['faults']) or 'none'}.",
        "",
        "| variant | runs | idle MB | peak MB (VmHWM) | peak by ready MB | every pipeline answered after s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in result["summary"].items():
        answered = _range(row["all_answered_s"]) + ("" if row["every_pipeline_answered"] else " (not all)")
        lines.append(
            f"| {name} | {row['runs']} | {_range(row['idle_mb'])} | {_range(row['peak_mb'])} | "
            f"{_range(row['hwm_at_ready_mb'])} | {answered} |"
        )
    lines += ["", "Median (range). Variants: " + (json.dumps(result["variants"]) or "-"), ""]
    lines += ["## Import cost (a fresh interpreter, one step after another)", ""]
    lines += ["| step | RSS MB after | + MB | new top-level packages |", "|---|---:|---:|---|"]
    for s in result["profile"]["steps"]:
        pkgs = ", ".join(s["new_packages"][:12]) + (" …" if len(s["new_packages"]) > 12 else "")
        lines.append(f"| {s['step']} | {s['rss_mb']:.1f} | {s['delta_mb']:+.1f} | {pkgs} |")
    first = next(iter(result["summary"]))
    last = [r for r in result["runs"] if r["variant"] == first][-1]
    lines += ["", f"## Mappings at the end of run {last['run']} ({last['variant']}), RSS per file", ""]
    lines += ["| mapping | RSS MB |", "|---|---:|"]
    lines += [f"| {row['mapping']} | {row['rss_mb']:.1f} |" for row in last["mappings_at_end"]]
    return "\n".join(lines) + "\n"


def write(result: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H%M%S")
    stem = out_dir / f"{stamp}-rss"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    return stem


def run_rss(
    variants: list[Variant],
    *,
    config: Path,
    runs: int,
    speed: float,
    devices: int,
    faults: tuple[str, ...],
    families: str | None,
    timeout: float,
    settle: float = 2.0,
    hold: float = 2.0,
    command: str = "python -m bench.rss",
    log: Any = print,
) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="edge-rss-"))
    result: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command,
        "machine": machine(),
        "config": str(config.relative_to(ROOT)) if config.is_relative_to(ROOT) else str(config),
        "speed": speed,
        "devices": devices,
        "faults": list(faults),
        "variants": {v.name: {"config": v.config, "env": v.env, "tree": str(v.tree)} for v in variants},
    }
    try:
        result["profile"] = import_profile(config, variants[0].env)
        log(f"import profile: {result['profile']['steps'][-1]['rss_mb']} MB after the last step")
        all_runs: list[dict[str, Any]] = []
        for i in range(runs):
            order = variants[i % len(variants) :] + variants[: i % len(variants)]
            for variant in order:
                r = one_run(
                    variant,
                    config,
                    workdir,
                    index=i + 1,
                    speed=speed,
                    devices=devices,
                    faults=faults,
                    families=families,
                    timeout=timeout,
                    settle=settle,
                    hold=hold,
                )
                all_runs.append(r)
                log(
                    f"  run {i + 1}/{runs} {variant.name}: idle {r['idle_mb']} MB, peak {r['peak_mb']} MB, "
                    f"every pipeline answered after {r['all_answered_s']} s"
                    + (f" (not: {', '.join(r['unanswered'])})" if r["unanswered"] else "")
                )
        result["runs"] = all_runs
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["summary"] = summarise(result["runs"])
    return result


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m bench.rss", description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="*", type=Variant.parse, help="NAME[:KEY=VALUE,...]")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--speed", type=float, default=600.0, help="simulated seconds per wall second")
    parser.add_argument("--devices", type=int, default=2, help="simulated devices per family")
    parser.add_argument(
        "--fault",
        action="append",
        default=None,
        help=f"simulated fault (default: {', '.join(DEFAULT_FAULTS)})",
    )
    parser.add_argument("--no-faults", action="store_true")
    parser.add_argument("--families", default=None, help="simulated families (default: all)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds for every pipeline to answer")
    parser.add_argument("--out", type=Path, default=None)
    opts = parser.parse_args(args)
    faults = () if opts.no_faults else tuple(opts.fault or DEFAULT_FAULTS)
    result = run_rss(
        opts.variants or [Variant("default")],
        config=opts.config.resolve(),
        runs=opts.runs,
        speed=opts.speed,
        devices=opts.devices,
        faults=faults,
        families=opts.families,
        timeout=opts.timeout,
        command="python -m bench.rss " + " ".join(args),
    )
    stem = write(result, opts.out or default_out_dir())
    print(markdown(result))
    print(f"written: {stem}.json, {stem}.md")
    return 0 if all(row["every_pipeline_answered"] for row in result["summary"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
