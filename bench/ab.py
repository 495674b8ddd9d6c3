"""``python -m bench.ab``: an A/B of daemon variants against one Mosquitto, interleaved.

Each variant is the daemon started from a tree of its own (a folder holding an ``edge/``
package, e.g. a ``git archive`` of an older commit, or ``.`` for this checkout) and/or with
extra environment variables. Every repetition runs a saturation burst through each variant in
turn, the order rotating from one repetition to the next, so the background noise of a shared
machine falls on all of them alike; the verdict is the median of the per-repetition ratios to the
first variant (paired, same minute), next to the medians of msg/s and CPU s per 1,000 messages.

    python -m bench.ab base=/tmp/variants/head new=. --reps 7
    python -m bench.ab asyncio=.,EDGE_INFER_LOOP=asyncio uvloop=.,EDGE_INFER_LOOP=uvloop
    python -m bench.ab v5=. v311=.,mqtt.protocol=3.1.1
    python -m bench.ab old=/tmp/variants/head new=. --qos 1 --pipeline shared-4

``--pipeline shared-N``: N snapshot pipelines (a model copy each) on one input topic, every
input answered N times; the first pipeline's answers are the ones measured. ``--qos 1``: QoS 1
inputs and subscriptions (the PUBACK path and the at-least-once ledger). Each row also has the
daemon's busy cores (its CPU seconds per wall second at saturation) and the whole machine's.

Writes ``bench/results/ab-<date>-<names>.json`` (``--out`` for another folder).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from bench import models
from bench.runner import Bench, Settings, default_out_dir, machine
from bench.systems import ROOT, PipelineSpec, System, edge_infer, zoo_models


@dataclass
class Variant:
    name: str
    tree: Path
    env: dict[str, str] = field(default_factory=dict)
    mqtt: dict[str, str] = field(default_factory=dict)  # overrides of the config's mqtt section
    zoo: Path | None = None  # the zoo-<name> pipelines' models from this folder (default: ./models)

    @classmethod
    def parse(cls, text: str) -> Variant:
        """``NAME=TREE[,KEY=VALUE...]``: environment variables, ``mqtt.KEY=VALUE`` for the config,
        or ``zoo=DIR`` for the zoo models of another tree (``DIR/<name>/<name>.int8.onnx``)."""
        name, _, rest = text.partition("=")
        if not name or not rest:
            raise argparse.ArgumentTypeError(f"variant {text!r}: expected NAME=TREE[,KEY=VALUE...]")
        tree_text, *pairs = rest.split(",")
        tree = (ROOT if tree_text == "." else Path(tree_text)).resolve()
        if not (tree / "edge" / "__init__.py").is_file():
            raise argparse.ArgumentTypeError(f"variant {name}: {tree} holds no edge/ package")
        env: dict[str, str] = {}
        mqtt: dict[str, str] = {}
        zoo: Path | None = None
        for pair in pairs:
            key, _, value = pair.partition("=")
            if key.startswith("mqtt."):
                mqtt[key.removeprefix("mqtt.")] = value
            elif key == "zoo":
                zoo = Path(value).resolve()
                if not zoo.is_dir():
                    raise argparse.ArgumentTypeError(f"variant {name}: zoo={value} is not a folder")
            else:
                env[key] = value
        return cls(name, tree, env, mqtt, zoo)


def _system(
    variant: Variant,
    bench: Bench,
    workdir: Path,
    *,
    pipeline: str,
    devices: int,
    profile: Path | None,
    qos: int = 0,
) -> System:
    specs: list[PipelineSpec]
    zoo_root = variant.zoo or ROOT / "models"
    if pipeline.startswith("shared-"):
        count = int(pipeline.removeprefix("shared-"))
        specs = []
        for i in range(count):
            model = shutil.copyfile(bench.ff, workdir / f"ff-{variant.name}-{i}.onnx")
            topic = None if i == 0 else "p0"
            specs.append(
                PipelineSpec(f"p{i}", Path(model), tuple(models.FF_FEATURES), None, devices, qos, topic)
            )
    elif pipeline == "zoo-all":  # memory: every zoo model in a pipeline of its own
        found = zoo_models(zoo_root)
        specs = [PipelineSpec(n, p, f, w, max(1, devices // 3)) for n, (p, f, w) in found.items()]
    elif pipeline == "snapshot":
        spec = PipelineSpec("snap", bench.ff, tuple(models.FF_FEATURES), None, devices)
    elif pipeline == "window":
        spec = PipelineSpec("win", bench.win, tuple(models.WINDOW_CHANNELS), models.WINDOW_SIZE, devices)
    else:
        zoo = zoo_models(zoo_root)
        name = pipeline.removeprefix("zoo-")
        if name not in zoo:
            raise SystemExit(f"bench.ab: no zoo model {name!r} (have {', '.join(zoo) or 'none'})")
        path, features, window = zoo[name]
        spec = PipelineSpec(name, path, features, window, devices)
    if pipeline != "zoo-all" and not pipeline.startswith("shared-"):
        spec.qos = qos
        specs = [spec]
    system = edge_infer(
        f"ab-{variant.name}", variant.name, bench.run_id, workdir, port=bench.port, pipelines=specs
    )
    # The variant's edge/ first: run from its tree (python -m puts the working folder first).
    system.env = {"PYTHONPATH": f"{variant.tree}:{ROOT}", **variant.env}
    system.cwd = variant.tree
    if variant.mqtt:
        config_path = Path(system.argv[system.argv.index("-c") + 1])
        config = yaml.safe_load(config_path.read_text())
        config["mqtt"].update(variant.mqtt)
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    if profile is not None:  # cProfile of the event-loop thread, written when the daemon stops
        profile.mkdir(parents=True, exist_ok=True)
        out = profile / f"{variant.name}.prof"
        system.argv = [system.argv[0], "-m", "cProfile", "-o", str(out), *system.argv[1:]]
    return system


def run_ab(
    variants: list[Variant],
    *,
    reps: int,
    burst: int,
    devices: int,
    pipeline: str,
    offered: tuple[int, ...] = (),
    profile: Path | None = None,
    qos: int = 0,
    log: Any = print,
) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="edge-ab-"))
    bench = Bench(Settings(mode="ab", devices=devices, qos=qos), workdir, log)
    systems = [
        _system(v, bench, workdir, pipeline=pipeline, devices=devices, profile=profile, qos=qos)
        for v in variants
    ]
    runs: dict[str, list[dict[str, Any]]] = {s.name: [] for s in systems}
    loads: dict[str, dict[str, Any]] = {s.name: {} for s in systems}
    result: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "pipeline": pipeline,
        "devices": devices,
        "burst": burst,
        "reps": reps,
        "qos": qos,
        "variants": {v.name: {"tree": str(v.tree), "env": v.env, "mqtt": v.mqtt} for v in variants},
    }
    try:
        for system in systems:
            bench.start(system)
            bench.warm_up(system)
        for rate in offered:
            for system in systems:
                r = bench.phase(system, max(1, int(rate * 10)), float(rate))
                r.pop("_latencies")
                r.pop("cdf_ms")
                loads[system.name][str(rate)] = r
                lat = r["latency_ms"]
                log(f"  {system.label} @ {rate}/s: p50 {lat['p50']} p99 {lat['p99']} ms")
        for rep in range(reps):
            order = systems[rep % len(systems) :] + systems[: rep % len(systems)]
            for system in order:
                r = bench.phase(system, burst, None)
                r.pop("_latencies")
                r.pop("cdf_ms")
                runs[system.name].append(r)
            log(
                f"  rep {rep + 1}/{reps}: "
                + ", ".join(f"{s.label} {runs[s.name][-1]['throughput_msg_s']}" for s in systems)
            )
        for system in systems:
            loads[system.name]["peak_rss_mb"] = round(system.peak_rss_mb(), 1)
    finally:
        for system in systems:
            system.stop()
        bench.close()
        shutil.rmtree(workdir, ignore_errors=True)
    first = systems[0].name
    table: dict[str, Any] = {}
    for system in systems:
        reps_ = runs[system.name]
        rates = [r["throughput_msg_s"] or 0.0 for r in reps_]
        cpu = [r["cpu_s_per_1000"] for r in reps_]
        paired = [
            (r["throughput_msg_s"] or 0.0) / b["throughput_msg_s"]
            for r, b in zip(reps_, runs[first], strict=True)
            if b["throughput_msg_s"]
        ]
        busy = [r["busy_cores"] for r in reps_ if r["busy_cores"] is not None]
        host = [r["machine_busy_cores"] for r in reps_ if r["machine_busy_cores"] is not None]
        paired_cpu = [
            r["cpu_s_per_1000"] / b["cpu_s_per_1000"] for r, b in zip(reps_, runs[first], strict=True)
        ]
        table[system.label] = {
            "msg_s_median": round(statistics.median(rates), 1),
            "msg_s_reps": rates,
            "cpu_s_per_1000_median": round(statistics.median(cpu), 4),
            "ratio_median": round(statistics.median(paired), 3),
            "cpu_ratio_median": round(statistics.median(paired_cpu), 3),
            "busy_cores_median": round(statistics.median(busy), 3) if busy else None,
            "machine_busy_cores_median": round(statistics.median(host), 3) if host else None,
            "lost": sum(r["lost"] for r in reps_),
            "loads": loads[system.name],
        }
    result["results"] = table
    return result


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="+", type=Variant.parse, help="NAME=TREE[,KEY=VALUE...]")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--burst", type=int, default=10_000)
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument(
        "--pipeline", default="snapshot", help="snapshot, window, shared-N, zoo-<name> or zoo-all"
    )
    parser.add_argument("--qos", type=int, choices=(0, 1), default=0, help="QoS of the inputs")
    parser.add_argument("--offered", type=int, nargs="*", default=[], help="paced loads (msg/s), 10 s each")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--profile", type=Path, default=None, help="cProfile each variant into DIR/NAME.prof")
    opts = parser.parse_args(argv)
    result = run_ab(
        opts.variants,
        reps=opts.reps,
        burst=opts.burst,
        devices=opts.devices,
        pipeline=opts.pipeline,
        offered=tuple(opts.offered),
        profile=opts.profile,
        qos=opts.qos,
    )
    print(f"load average {os.getloadavg()}")
    print(
        f"\n{'variant':<16} {'msg/s (median)':>15} {'× first':>8} {'CPU s/1000':>11} {'CPU ×':>6}"
        f" {'peak RSS MB':>12} {'busy cores':>11} {'machine':>8}  lost"
    )
    for name, row in result["results"].items():
        print(
            f"{name:<16} {row['msg_s_median']:>15,.0f} {row['ratio_median']:>8.3f} "
            f"{row['cpu_s_per_1000_median']:>11.4f} {row['cpu_ratio_median']:>6.3f}"
            f" {row['loads']['peak_rss_mb']:>12.1f} {_num(row['busy_cores_median']):>11}"
            f" {_num(row['machine_busy_cores_median']):>8}  {row['lost']}"
        )
    out = opts.out or default_out_dir()
    out.mkdir(parents=True, exist_ok=True)
    names = "-".join(v.name for v in opts.variants)
    path = out / f"ab-{result['date'][:19].replace(':', '')}-{names}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"written {path}")
    if opts.profile is not None:
        import pstats

        for variant in opts.variants:
            prof = opts.profile / f"{variant.name}.prof"
            if prof.is_file():
                print(f"\n--- {variant.name}: top functions by own time")
                pstats.Stats(str(prof)).sort_stats("tottime").print_stats(25)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
