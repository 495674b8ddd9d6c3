"""``edge-infer learn`` measured: time and peak memory on 14 days x 10 entities of history, and the
learned occupancy model against the bundled one on the same held-out simulated rooms; and the
NILM path: a fridge recognised in a mains meter's power (replayed ACS-F1 traces), taught by its plug.

    python -m bench.learn_bench [--days 14] [--out bench/results/learn-<time>.json]

The home: two rooms (a home office and a living room) of devices/roomsim.py, five entities each
(four climate sensors and a PIR motion sensor), recorded as Home Assistant's recorder stores them
(a state per change, two outages). ``learn`` runs in this process (parent) with its training
child process, the motion sensors as the teacher, the bundled occupancy model as the deployed one.
Then both models are scored against the simulator's ground truth (not the teacher): on the
home's own rooms in the learn holdout block (the newest quarter, never trained on), and on four
rooms of the other schedules' kinds that learn never saw.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from devices.history import room_history
from devices.roomsim import RoomConfig
from edge.config import parse_config
from edge.learn import run as learn_run
from edge.learn.gate import onnx_predict, scores
from edge.learn.sources import MemorySource
from edge.learn.table import build_table

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "models" / "occupancy" / "occupancy.fp32.onnx"
CLIMATE = ("temperature", "humidity", "illuminance", "co2")
CLASSES = ["empty", "occupied"]


def pipeline(model: Path, learn: dict[str, Any]) -> dict[str, Any]:
    return {
        "models": {"occupancy": {"path": str(model)}},
        "pipelines": {
            "rooms": {
                "model": "occupancy",
                "source": {"profile": "json", "topics": ["home/{device}/climate"], "timestamp_field": "ts"},
                "features": {"type": "window", "resample_period_s": 60, "max_gap_s": 600},
                "learn": learn,
            }
        },
    }


def learn_section(rooms: list[str], days: float, end: str, labels: dict[str, Any]) -> dict[str, Any]:
    return {
        "source": {"recorder_db": "unused.db"},
        "days": days,
        "end": end,
        "inputs": {r: {c: f"sensor.{r}_{c}" for c in CLIMATE} for r in rooms},
        "labels": labels,
    }


TEACHER = {
    "teacher": {
        "any_on": ["binary_sensor.{device}_motion"],
        "within_s": 900,
        "on": "occupied",
        "off": "empty",
    }
}
TRUTH = {"entity": "input_boolean.{device}_occupied_truth", "map": {"on": "occupied", "off": "empty"}}


def truth_scores(model: Path, data: dict[str, Any], hist: Any, start: float, end: float) -> dict[str, Any]:
    cfg = parse_config(data)
    table = build_table("rooms", cfg, hist, start, end)
    return scores(table.labels, onnx_predict(model, table.x), CLASSES) | {"n": len(table)}


def nilm(days: float, end: float, iso: str) -> dict[str, Any]:
    """The fridge from the mains meter, taught by its plug: holdout accuracy and false-on rate."""
    from devices.history import mains_history

    hist, names = mains_history(start=end - days * 86400, days=days, seed=3)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = {
            "models": {"fridge": {"path": str(tmp / "fridge.onnx")}},  # none yet: learn creates it
            "pipelines": {
                "fridge": {
                    "model": "fridge",
                    "source": {"profile": "tasmota", "options": {"tele_prefix": "tele"}},
                    "inputs": {"power": "power"},
                    "features": {
                        "type": "window",
                        "size": 30,
                        "hop": 3,
                        "resample_period_s": 10,
                        "max_gap_s": 120,
                    },
                    "learn": {
                        "source": {"recorder_db": "unused.db"},
                        "days": days,
                        "end": iso,
                        "inputs": {"mains": {"power": names["mains"]}},
                        "labels": {
                            "teacher": {"entity": names["plug"], "above": 20, "on": "on", "off": "off"}
                        },
                        "train": {"epochs": 20},
                    },
                }
            },
        }
        path = tmp / "config.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        t0 = time.monotonic()
        result = learn_run.learn(
            path, "fridge", source=MemorySource(hist, "simulated mains meter + fridge plug")
        )
        wall = time.monotonic() - t0
    holdout = result.report.get("holdout", {})
    cand = holdout.get("candidate") or {}
    on = cand.get("per_class", {}).get("on", {})
    off = cand.get("per_class", {}).get("off", {})
    # false-on rate: share of the truly-off windows the model calls on = 1 - recall(off)
    return {
        "status": result.status,
        "message": result.message,
        "wall_s": wall,
        "examples": result.report.get("examples"),
        "counts": result.report.get("split", {}).get("counts"),
        "holdout_accuracy": cand.get("accuracy"),
        "holdout_macro_f1": cand.get("macro_f1"),
        "recall_on": on.get("recall"),
        "precision_on": on.get("precision"),
        "false_on_rate": 1.0 - off["recall"] if off else None,
        "baseline": {k: (holdout.get("baseline") or {}).get(k) for k in ("accuracy", "macro_f1")},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--days", type=float, default=14.0)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--nilm-days", type=float, default=7.0, help="0: skip the mains-meter part")
    args = parser.parse_args()
    end_dt = datetime(2026, 11, 20, tzinfo=UTC)
    end, iso = end_dt.timestamp(), end_dt.isoformat().replace("+00:00", "Z")
    start = end - args.days * 86400
    rooms = [
        ("office", RoomConfig(name="office", schedule="home_office", day_of_year=300)),
        (
            "living",
            RoomConfig(
                name="living", schedule="family", floor_area_m2=25.0, max_occupants=4, day_of_year=300
            ),
        ),
    ]
    hist, _ = room_history(rooms, start=start, days=args.days, outages=2, seed=11)
    entities = sum(1 for e in hist if not e.startswith("input_boolean."))
    changes = sum(len(v) for e, v in hist.items() if not e.startswith("input_boolean."))
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model = tmp / "occupancy.onnx"
        shutil.copyfile(BUNDLED, model)
        path = tmp / "config.yaml"
        data = pipeline(model, learn_section([r for r, _ in rooms], args.days, iso, TEACHER))
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        t0 = time.monotonic()
        result = learn_run.learn(path, "rooms", source=MemorySource(hist, "simulated home"))
        wall = time.monotonic() - t0
        parent_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        child_mb = result.report.get("training", {}).get("peak_rss_mb", float("nan"))
        learned = Path(result.report["candidate"]) if result.report.get("candidate") else model
        # the holdout block's time range, scored against the ground truth
        test_from = datetime.fromisoformat(result.report["split"]["bounds"]["test"][0].replace("Z", "+00:00"))
        own = {
            name: truth_scores(
                m,
                pipeline(model, learn_section([r for r, _ in rooms], args.days, iso, TRUTH)),
                hist,
                test_from.timestamp(),
                end,
            )
            for name, m in (("learned", learned), ("bundled", BUNDLED))
        }
        rng = np.random.default_rng(7)
        unseen_rooms = [
            (f"unseen{i}", RoomConfig.random(rng, kind))
            for i, kind in enumerate(("home_office", "family", "bedroom", "meeting_room"))
        ]
        unseen_hist, _ = room_history(unseen_rooms, start=end - 7 * 86400, days=7, seed=23)
        unseen_data = pipeline(model, learn_section([r for r, _ in unseen_rooms], 7, iso, TRUTH))
        unseen = {
            name: truth_scores(m, unseen_data, unseen_hist, end - 7 * 86400, end)
            for name, m in (("learned", learned), ("bundled", BUNDLED))
        }
    out = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "history": {
            "days": args.days,
            "entities": entities,
            "state_changes": changes,
            "rooms": [r for r, _ in rooms],
        },
        "learn": {
            "status": result.status,
            "message": result.message,
            "wall_s": wall,
            "table_s": result.report.get("training", {}).get("table_seconds"),
            "training_process_s": result.report.get("training", {}).get("seconds"),
            "peak_rss_mb_parent": parent_mb,
            "peak_rss_mb_training_process": child_mb,
            "examples": result.report.get("examples"),
            "counts": result.report.get("split", {}).get("counts"),
            "holdout_vs_teacher": {
                k: {m: v[m] for m in ("accuracy", "macro_f1")} if v else None
                for k, v in result.report.get("holdout", {}).items()
                if k in ("candidate", "baseline", "deployed")
            },
        },
        "vs_truth_own_rooms_holdout": {
            k: {m: v[m] for m in ("n", "accuracy", "macro_f1")} for k, v in own.items()
        },
        "vs_truth_unseen_rooms": {
            k: {m: v[m] for m in ("n", "accuracy", "macro_f1")} for k, v in unseen.items()
        },
    }
    if args.nilm_days > 0:
        out["nilm_fridge_from_mains"] = nilm(args.nilm_days, end, iso)
    text = json.dumps(out, indent=2, default=str)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
