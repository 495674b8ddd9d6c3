"""The daemon's latency at 100 msg/s while ``edge-infer learn`` trains beside it.

    python -m bench.learn_beside [--seconds 30]

One daemon (the benchmark's snapshot pipeline, 50 devices, a real Mosquitto) answers 100 msg/s
in three phases: idle, while ``python -m bench.learn_bench --days 14 --nilm-days 0`` runs (its
table, then its niced training process), and idle again. Printed: p50/p99/max per phase and the
p99 difference (goal: within 2 ms of idle). On a shared machine the noise of the other tenants
is in every phase; run it a few times.

    python -m bench.learn_beside --retrain [--days 14] [--epochs 40]

``--retrain``: the daemon under test also serves a learnable occupancy pipeline (``rooms``, a
``record:`` source of ``--days`` simulated days of two rooms, the bundled model deployed as a copy)
and the middle phase presses its Retrain button over MQTT (``<base>/rooms/retrain/press``)
instead of running learn_bench beside: the daemon itself runs ``edge-infer learn`` in its child
process (edge/retrain.py), and the phase reports the retrain's state when it ended and its final
state (promoted / kept / failed) after it finished.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from bench import models
from bench.runner import Bench, Settings
from bench.systems import ROOT, PipelineSpec, System, edge_infer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each phase")
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--retrain", action="store_true", help="press the daemon's Retrain button instead")
    parser.add_argument("--days", type=float, default=14.0, help="--retrain: simulated days to learn from")
    parser.add_argument("--epochs", type=int, default=40, help="--retrain: training epochs")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="edge-learn-beside-"))
    bench = Bench(Settings(mode="ab", devices=50), workdir, print)
    spec = PipelineSpec("snap", bench.ff, tuple(models.FF_FEATURES), None, 50)
    system = edge_infer(
        "learn-beside", "edge-infer", bench.run_id, workdir, port=bench.port, pipelines=[spec]
    )
    count = int(args.seconds * args.rate)
    phases: dict[str, Any] = {}
    learner: subprocess.Popen[bytes] | None = None
    watcher: RetrainWatch | None = None
    try:
        if args.retrain:
            base = add_learnable(system, workdir, days=args.days, epochs=args.epochs)
            watcher = RetrainWatch(bench.port, f"{base}/rooms/retrain")
        bench.start(system)
        bench.warm_up(system)
        phases["idle_before"] = bench.phase(system, count, args.rate)
        if watcher is not None:
            watcher.press()
            watcher.wait(lambda s: s.get("phase") not in (None, "idle"), 60)  # learn has started
            phases["learn_running"] = bench.phase(system, count, args.rate)
            phases["retrain_state_at_phase_end"] = watcher.last.get("status")
            phases["learn_still_running"] = watcher.last.get("phase") in (
                "collecting",
                "training",
                "evaluating",
            )
            final = watcher.wait(lambda s: s.get("phase") in ("promoted", "kept", "failed"), 1800)
            phases["retrain_final"] = {k: final.get(k) for k in ("status", "duration_s", "gate")}
            phases["idle_after"] = bench.phase(system, count, args.rate)
            return _report(phases, args.out)
        learner = subprocess.Popen(
            [sys.executable, "-m", "bench.learn_bench", "--days", "14", "--nilm-days", "0"],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(3.0)  # into the table building
        phases["learn_running"] = bench.phase(system, count, args.rate)
        phases["learn_still_running"] = learner.poll() is None
        learner.wait(timeout=900)
        phases["idle_after"] = bench.phase(system, count, args.rate)
    finally:
        if learner is not None and learner.poll() is None:
            learner.kill()
        if watcher is not None:
            watcher.close()
        system.stop()
        bench.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return _report(phases, args.out)


def _report(phases: dict[str, Any], path: Path | None) -> int:
    out: dict[str, Any] = {}
    for name, r in phases.items():
        if isinstance(r, dict) and "latency_ms" in r:
            out[name] = {k: r["latency_ms"][k] for k in ("p50", "p99", "max")} | {"lost": r["lost"]}
        else:
            out[name] = r
    idle = min(out["idle_before"]["p99"], out["idle_after"]["p99"])
    out["p99_learn_minus_idle_ms"] = round(out["learn_running"]["p99"] - idle, 3)
    text = json.dumps(out, indent=2)
    print(text)
    if path:
        path.write_text(text + "\n")
    return 0


def add_learnable(system: System, workdir: Path, *, days: float, epochs: int) -> str:
    """Give the daemon's config a learnable ``rooms`` pipeline (before it starts): a copy of the
    bundled occupancy model and a ``record:`` file of ``days`` simulated days of two rooms (what
    ``edge-infer record`` would have written). Returns the daemon's base topic."""
    from devices.history import room_history
    from devices.roomsim import RoomConfig
    from edge.config import parse_config
    from edge.learn.table import build_table

    path = Path(system.argv[system.argv.index("-c") + 1])
    config = yaml.safe_load(path.read_text())
    model = workdir / "occupancy.onnx"
    shutil.copyfile(ROOT / "models" / "occupancy" / "occupancy.fp32.onnx", model)
    rooms = [
        ("office", RoomConfig(name="office", schedule="home_office")),
        ("living", RoomConfig(name="living", schedule="family", floor_area_m2=25.0, max_occupants=4)),
    ]
    end = float(int(time.time() // 86400) * 86400)
    climate = ("temperature", "humidity", "illuminance", "co2")
    base = config["mqtt"]["base_topic"]
    pipeline: dict[str, Any] = {
        "model": "occupancy",
        "source": {
            "profile": "json",
            "topics": [f"{base}-rooms/{{device}}/climate"],
            "timestamp_field": "ts",
        },
        "features": {"type": "window", "resample_period_s": 60, "max_gap_s": 600},
        "learn": {
            "source": {"recorder_db": str(workdir / "unused.db")},
            "days": days,
            "end": datetime.fromtimestamp(end, UTC).isoformat().replace("+00:00", "Z"),
            "inputs": {r: {c: f"sensor.{r}_{c}" for c in climate} for r, _ in rooms},
            "labels": {
                "teacher": {
                    "any_on": ["binary_sensor.{device}_motion"],
                    "within_s": 900,
                    "on": "occupied",
                    "off": "empty",
                }
            },
        },
    }
    teacher = {"models": {"occupancy": {"path": str(model)}}, "pipelines": {"rooms": pipeline}}
    history, _ = room_history(rooms, start=end - days * 86400, days=days, outages=1, seed=5)
    table = build_table("rooms", parse_config(teacher, "bench", workdir), history, end - days * 86400, end)
    table.write_csv(workdir / "rows.csv")
    learn = pipeline["learn"]
    learn["source"] = {"record": str(workdir / "rows.csv")}
    for key in ("inputs", "labels"):
        del learn[key]
    learn["train"] = {"epochs": epochs}
    config["models"]["occupancy"] = {"path": str(model)}
    config["pipelines"]["rooms"] = pipeline
    config["reload"] = {"watch_models": True, "interval_s": 1.0}  # the promoted model is hot-reloaded
    config["state"] = {"file": str(workdir / "state" / "state.json")}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(base)


class RetrainWatch:
    """Presses ``<base>/rooms/retrain/press`` and follows ``.../retrain/state`` (paho, its own
    connection)."""

    def __init__(self, port: int, prefix: str) -> None:
        import paho.mqtt.client as mqtt

        self.prefix = prefix
        self.last: dict[str, Any] = {}
        self._cond = threading.Condition()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe(f"{prefix}/state", qos=1)

    def _on_message(self, _c: Any, _u: Any, message: Any) -> None:
        try:
            state = json.loads(message.payload)
        except ValueError:
            return
        with self._cond:
            self.last = state if isinstance(state, dict) else {}
            self._cond.notify_all()

    def press(self) -> None:
        self.client.publish(f"{self.prefix}/press", "PRESS", qos=1).wait_for_publish(10)

    def wait(self, predicate: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self.last):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"retrain state {self.last.get('status')!r} after {timeout:g} s")
                self._cond.wait(left)
            return dict(self.last)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


if __name__ == "__main__":
    raise SystemExit(main())
