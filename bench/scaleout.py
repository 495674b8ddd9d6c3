"""Scale-out benchmark: 1, 2 and 3 edge-infer instances against one Mosquitto, CPU per instance.

``python -m bench.scaleout`` (``--quick`` for a short run) writes
``bench/results/<date>-scaleout.json`` and ``.md``. For each mode and instance count it starts the
instances as users run them (``edge-infer run -c CONFIG --instance iN``), pauses them, queues a
backlog of QoS 1 inputs for them at the broker, resumes them together and times how fast they
answer it (the independent subscriber of bench/loadgen.py counts the answers), reading the CPU
time of every instance, of the broker and of the whole machine over that drain. A Python load
generator on the same two cores would otherwise be the bottleneck, not the daemons.

Modes:

* ``shared``: a snapshot pipeline through a shared subscription; the broker splits the inputs.
* ``partition``: a window pipeline partitioned by device hash; every instance receives every
  input and keeps its own devices' (the broker sends each input N times).

From the CPU seconds per answered message the report works out what this machine's cores allow
and what a machine with more cores would give (docs/scale-out.md explains the model).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import yaml

from bench.loadgen import Stream, Subscriber
from bench.models import FF_FEATURES, WINDOW_CHANNELS, WINDOW_SIZE, feed_forward, windowed
from bench.runner import machine
from bench.systems import ROOT, System

RESULTS = ROOT / "bench" / "results"


def _config(
    mode: str, port: int, model: Path, devices: int, run_id: str
) -> tuple[dict[str, Any], list[Stream]]:
    prefix = f"so-{run_id}/{mode}"
    window = mode == "partition"
    fields = tuple(WINDOW_CHANNELS) if window else tuple(FF_FEATURES)
    config = {
        "mqtt": {
            "url": f"mqtt://127.0.0.1:{port}",
            "base_topic": f"{prefix}/ei",
            "client_id": f"so-{run_id}-{mode}-{{instance}}",
            "keepalive": 300,  # paused instances must not look dead to the broker
        },
        "models": {"m": {"path": str(model)}},
        "pipelines": {
            "p": {
                "model": "m",
                "source": {"topics": [f"{prefix}/in/{{device}}"], "timestamp_field": "t", "qos": 1},
                "features": {"type": "window", "hop": 1} if window else {"type": "snapshot"},
                "output": {"topic": f"{prefix}/out/{{device}}"},
                "max_devices": max(1000, devices),
                "scale_out": mode,
            }
        },
        "homeassistant": {"enabled": False},
        "reload": {"watch_models": False},
        "cluster": {"enabled": True},
    }
    streams = [Stream(f"{prefix}/in/d{i}", f"{prefix}/out/d{i}", fields) for i in range(devices)]
    return config, streams


def _cpu_total() -> float:
    t = psutil.cpu_times()
    return float(t.user + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0))


def _backlog(port: int, streams: list[Stream], count: int) -> float:
    """Publish ``count`` QoS 1 inputs round-robin over ``streams``; returns the seconds it took."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port, keepalive=60)
    client.loop_start()
    began = time.perf_counter()
    infos = []
    n = len(streams)
    for k in range(count):
        stream = streams[k % n]
        values = ", ".join(f'"{f}": {((k * 7 + i) % 13) / 13:.4f}' for i, f in enumerate(stream.fields))
        infos.append(client.publish(stream.in_topic, '{"t": ' + repr(time.time()) + ", " + values + "}", 1))
    for info in infos:
        info.wait_for_publish(60)
    seconds = time.perf_counter() - began
    client.loop_stop()
    client.disconnect()
    return seconds


def measure(
    mode: str,
    instances: int,
    *,
    port: int,
    broker_pid: int,
    workdir: Path,
    count: int,
    devices: int,
    run_id: str,
) -> dict[str, Any]:
    """Instances up and idle, then paused (SIGSTOP) while ``count`` inputs queue at the broker for
    them, then resumed together (SIGCONT): the time to answer the backlog and the CPU it took
    measure the instances and the broker alone, without the load generator on the same cores."""
    model = (windowed if mode == "partition" else feed_forward)(workdir / f"{mode}.onnx")
    config, streams = _config(mode, port, model, devices, f"{run_id}-{instances}")
    path = workdir / f"{mode}-{instances}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    base = config["mqtt"]["base_topic"]
    systems = [
        System(
            name=f"{mode}-{instances}-i{k}",
            label=f"i{k}",
            kind="edge-infer",
            argv=[
                sys.executable, "-m", "edge.cli", "run", "-c", str(path),
                "--instance", f"i{k}", "--log-level", "WARNING",
            ],
            status_topic=f"{base}/instances/i{k}/status",
            streams=streams,
            workdir=workdir,
        )
        for k in range(instances)
    ]  # fmt: skip
    subscriber = Subscriber(port, [streams[0].out_topic.rsplit("/", 1)[0] + "/+"])
    broker = psutil.Process(broker_pid)
    counter = psutil.Process(subscriber._proc.pid)  # the answer-counting process (bench/loadgen.py)
    try:
        for system in systems:
            system.start(port)
        time.sleep(1.0)  # every instance has seen the others join
        warm = len(streams) * (WINDOW_SIZE if mode == "partition" else 1)
        _backlog(port, streams, warm)  # fills every window; every model warm
        subscriber.settle(len(streams), idle_s=1.5, timeout_s=60)
        subscriber.take()
        for system in systems:
            assert system.ps is not None
            system.ps.suspend()
        publish_s = _backlog(port, streams, count)
        cpu0 = [s.cpu_s() for s in systems]
        broker0 = broker.cpu_times()
        counter0 = counter.cpu_times()
        total0 = _cpu_total()
        began = time.time()
        for system in systems:
            assert system.ps is not None
            system.ps.resume()
        subscriber.settle(count, idle_s=2.0, timeout_s=300)
        records = subscriber.take()
        cpu = [s.cpu_s() - c for s, c in zip(systems, cpu0, strict=True)]
        broker1 = broker.cpu_times()
        counter1 = counter.cpu_times()
        total = _cpu_total() - total0
        wall = time.time() - began
    finally:
        for system in systems:
            with contextlib.suppress(psutil.Error):
                if system.ps is not None:
                    system.ps.resume()
            system.stop()
        subscriber.close()
    answered = len(records)
    last = max((r[0] for r in records), default=time.time())
    elapsed = max(last - began, 1e-9)
    broker_cpu = (broker1.user + broker1.system) - (broker0.user + broker0.system)
    counter_cpu = (counter1.user + counter1.system) - (counter0.user + counter0.system)
    # What other processes on the machine used meanwhile (the machine is shared), per second.
    others_util = max(total - sum(cpu) - broker_cpu - counter_cpu, 0.0) / max(wall, 1e-9)
    by_instance: dict[str, int] = {}
    for _t, _topic, payload in records:
        with contextlib.suppress(ValueError, KeyError):
            name = json.loads(payload)["instance"]
            by_instance[name] = by_instance.get(name, 0) + 1
    per_msg = {
        "instances_us": round(sum(cpu) / max(answered, 1) * 1e6, 1),
        "broker_us": round(broker_cpu / max(answered, 1) * 1e6, 1),
        "subscriber_us": round(counter_cpu / max(answered, 1) * 1e6, 1),
    }
    return {
        "mode": mode,
        "instances": instances,
        "sent": int(count),
        "answered": answered,
        "answered_by": by_instance,
        "seconds": round(elapsed, 3),
        "backlog_publish_seconds": round(publish_s, 3),
        "throughput_msg_s": round(answered / elapsed, 1),
        "cpu_s": {s.label: round(c, 3) for s, c in zip(systems, cpu, strict=True)},
        "cpu_util": {s.label: round(c / elapsed, 3) for s, c in zip(systems, cpu, strict=True)},
        "broker_cpu_s": round(broker_cpu, 3),
        "broker_util": round(broker_cpu / elapsed, 3),
        "subscriber_util": round(counter_cpu / elapsed, 3),
        "others_util": round(others_util, 3),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "cpu_per_message": per_msg,
    }


def project(runs: list[dict[str, Any]], cores: int) -> dict[str, Any]:
    """What the cores allow, from the CPU cost per answered message of the one-instance run.

    * daemon: ``d`` CPU-seconds per message (all instances together; with partition each instance
      also decodes every other instance's inputs, measured in the N-instance runs);
    * broker: ``b`` per message; Mosquitto runs on one thread, so it alone never passes ``1/b``;
    * the rest: ``r`` per message, the answer-counting subscriber and the kernel.
    """
    out: dict[str, Any] = {}
    for mode in sorted({r["mode"] for r in runs}):
        mine = sorted((r for r in runs if r["mode"] == mode), key=lambda r: r["instances"])
        one = mine[0]
        d = one["cpu_per_message"]["instances_us"] / 1e6
        b = one["cpu_per_message"]["broker_us"] / 1e6
        r = one["cpu_per_message"]["subscriber_us"] / 1e6
        m = d + b + r
        ceiling_here = cores / m if m > 0 else None
        broker_ceiling = 1 / b if b > 0 else None
        best = max(mine, key=lambda x: x["throughput_msg_s"])
        per_n = {}
        for run in mine:
            n = run["instances"]
            d_n = run["cpu_per_message"]["instances_us"] / 1e6  # grows with n in partition mode
            b_n = run["cpu_per_message"]["broker_us"] / 1e6
            per_n[n] = {
                "measured_msg_s": run["throughput_msg_s"],
                "ratio_to_1": round(run["throughput_msg_s"] / one["throughput_msg_s"], 2),
                # Each instance is one Python process: it uses at most one core.
                "daemon_bound_msg_s": round(n / d_n) if d_n > 0 else None,
                "broker_bound_msg_s": round(1 / b_n) if b_n > 0 else None,
            }
        out[mode] = {
            "daemon_us_per_msg": round(d * 1e6, 1),
            "broker_us_per_msg": round(b * 1e6, 1),
            "rest_us_per_msg": round(r * 1e6, 1),
            "this_machine_ceiling_msg_s": round(ceiling_here) if ceiling_here else None,
            "broker_ceiling_msg_s": round(broker_ceiling) if broker_ceiling else None,
            "best_measured_msg_s": best["throughput_msg_s"],
            "best_ratio_to_1": round(best["throughput_msg_s"] / one["throughput_msg_s"], 2),
            "by_instances": per_n,
        }
    return out


def report_md(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"# Scale-out benchmark {result['date']}",
        "",
        f"{m['cpu']}, {m['usable_cpus']} usable CPUs, {m['memory_gb']} GB; {m.get('mosquitto')}; "
        f"Python {m['python']}. Command: `{result['command']}`.",
        "",
        f"A backlog of {result['settings']['count']} QoS 1 inputs over {result['settings']['devices']} "
        "devices queued at the broker while the instances are paused (SIGSTOP), then answered as fast "
        "as they go after SIGCONT; answers counted by an independent subscriber process. CPU from "
        "/proc (user+system) over the drain. The Python load generator runs before, not during, "
        "the measurement.",
        "",
        "| mode | instances | answered/sent | msg/s | ratio to 1 | CPU per instance (cores) | "
        "broker (cores) | subscriber (cores) | other processes (cores) | daemon µs/msg | broker µs/msg |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in result["runs"]:
        one = next(r for r in result["runs"] if r["mode"] == run["mode"] and r["instances"] == 1)
        util = ", ".join(f"{v:.2f}" for v in run["cpu_util"].values())
        lines.append(
            f"| {run['mode']} | {run['instances']} | {run['answered']}/{run['sent']} | "
            f"{run['throughput_msg_s']:.0f} | {run['throughput_msg_s'] / one['throughput_msg_s']:.2f} | "
            f"{util} | {run['broker_util']:.2f} | {run['subscriber_util']:.2f} | {run['others_util']:.2f} | "
            f"{run['cpu_per_message']['instances_us']} | {run['cpu_per_message']['broker_us']} |"
        )
    lines += ["", "## What the cores allow", ""]
    for mode, p in result["projection"].items():
        lines.append(
            f"* **{mode}**: per answered message the daemon costs {p['daemon_us_per_msg']} µs of CPU, "
            f"Mosquitto {p['broker_us_per_msg']} µs, the counting subscriber {p['rest_us_per_msg']} µs. "
            f"On {result['machine']['usable_cpus']} cores everything together allows about "
            f"{p['this_machine_ceiling_msg_s']} msg/s; measured best {p['best_measured_msg_s']:.0f} msg/s "
            f"({p['best_ratio_to_1']}x one instance). "
            f"Mosquitto is single-threaded: it alone caps at about {p['broker_ceiling_msg_s']} msg/s."
        )
        for n, row in p["by_instances"].items():
            lines.append(
                f"  * {n} instance(s): measured {row['measured_msg_s']:.0f} msg/s ({row['ratio_to_1']}x); "
                f"with a core each the daemons would allow {row['daemon_bound_msg_s']} msg/s, "
                f"the broker {row['broker_bound_msg_s']} msg/s"
            )
    lines += ["", result["conclusion"], ""]
    return "\n".join(lines)


def conclusion(result: dict[str, Any]) -> str:
    cores = result["machine"]["usable_cpus"]
    parts = []
    for mode, p in result["projection"].items():
        rows = p["by_instances"]
        n_max = max(rows)
        more = min(v for v in (rows[n_max]["daemon_bound_msg_s"], rows[n_max]["broker_bound_msg_s"]) if v)
        parts.append(
            f"{mode}: {p['best_ratio_to_1']}x with the best of 1-{n_max} instances on {cores} cores "
            "(shared with the broker, the counting subscriber and whatever else ran); "
            f"with a free core per instance {n_max} instances would reach about {more} msg/s before "
            f"{'the broker' if more == rows[n_max]['broker_bound_msg_s'] else 'the daemons'} saturate"
        )
    return "Summary: " + "; ".join(parts) + "."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scaleout", description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20000, help="inputs per run")
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--max-instances", type=int, default=3)
    parser.add_argument("--modes", default="shared,partition")
    parser.add_argument("--quick", action="store_true", help="5000 inputs per run")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    count = 5000 if args.quick else args.count
    from tests.broker import Mosquitto

    date = datetime.now(UTC).strftime("%Y-%m-%dT%H%M%S")
    run_id = date[-6:]
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"edge-scaleout-{date}"
    workdir.mkdir(parents=True, exist_ok=True)
    broker = Mosquitto(
        workdir / "mosquitto", extra_config="set_tcp_nodelay true\nmax_queued_messages 1000000"
    ).start()
    runs = []
    try:
        assert broker.process is not None
        for mode in args.modes.split(","):
            for n in range(1, args.max_instances + 1):
                print(f"{mode}: {n} instance(s) ...", flush=True)
                run = measure(
                    mode,
                    n,
                    port=broker.port,
                    broker_pid=broker.process.pid,
                    workdir=workdir,
                    count=count,
                    devices=args.devices,
                    run_id=run_id,
                )
                print(
                    f"  {run['throughput_msg_s']:.0f} msg/s, {run['answered']}/{run['sent']} answered, "
                    f"CPU {run['cpu_util']}, broker {run['broker_util']}, others {run['others_util']}",
                    flush=True,
                )
                runs.append(run)
    finally:
        with contextlib.suppress(Exception):
            broker.stop()
    info = machine()
    result: dict[str, Any] = {
        "date": date,
        "command": "python -m bench.scaleout" + (" " + " ".join(argv or sys.argv[1:])).rstrip(),
        "settings": {"count": count, "devices": args.devices, "modes": args.modes},
        "machine": info,
        "runs": runs,
        "projection": project(runs, info["usable_cpus"]),
    }
    result["conclusion"] = conclusion(result)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{date}-scaleout"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(report_md(result))
    print(report_md(result))
    print(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
