"""Inputs watched through the running daemon (edge/watch.py) on the real Mosquitto fixture: a
sensor that sticks or changes unit turns its device's "Inputs unlike training" problem sensor
ON within a stated number of samples, a clean device's stays OFF; the clean simulated home gives
no false alarm over a simulated week; learn leaves flagged spans out unless asked to keep them."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from edge.drift import DriftMonitor, training_stats
from edge.learn.run import drop_flagged
from edge.learn.table import table_from_rows
from edge.manifest import MANIFEST_KEY, Manifest
from edge.watch import SPANS_FILE, InputWatch, read_spans
from tests.broker import Mosquitto
from tests.harness import Collector, DaemonThread, Publisher, fast_mqtt, make_config
from tests.onnx_models import snapshot_classifier

FEATURES = ["power", "voltage"]
LABELS = ["off", "on"]
WEEK = 7 * 24 * 60  # one sample a minute


def _home(rng: np.random.Generator, n: int) -> np.ndarray:
    """A plug's power (exactly 0 W 40% of the time, else ~N(800, 150)) and mains voltage."""
    on = rng.random(n) > 0.4
    power = np.where(on, np.abs(rng.normal(800, 150, n)), 0.0)
    return np.stack([power, rng.normal(230, 2, n)], axis=1)


def _watched_model(path: Path) -> Path:
    """The test classifier, its manifest carrying training_stats of 20,000 clean readings."""
    snapshot_classifier(path, FEATURES, LABELS, name="plugs")
    model = onnx.load(str(path))
    entry = next(p for p in model.metadata_props if p.key == MANIFEST_KEY)
    manifest = Manifest.from_json(entry.value)
    stats = training_stats(FEATURES, _home(np.random.default_rng(7), 20_000))
    entry.value = manifest.model_copy(update={"training_stats": stats}).to_json()
    onnx.save(model, str(path))
    return path


def _components(messages: list[Any], p: str) -> list[dict[str, Any]]:
    """The components of the latest discovery config of each device."""
    latest = {m.topic: m.json() for m in messages if m.topic.startswith(f"{p}/ha/device/") and m.payload}
    return [c for config in latest.values() for c in config.get("cmps", {}).values()]


@pytest.mark.broker
def test_stuck_and_unit_change_raise_the_ha_problem_sensor(
    mosquitto: Mosquitto, topic_prefix: str, tmp_path: Path
) -> None:
    p = topic_prefix
    _watched_model(tmp_path / "plugs.onnx")
    data: dict[str, Any] = {
        "mqtt": fast_mqtt(mosquitto.url, p),
        "models": {"plugs": {"path": "plugs.onnx"}},
        "pipelines": {
            "plug": {
                "model": "plugs",
                "source": {"topics": [f"{p}/z2m/{{device}}"], "timestamp_field": "t"},
                "features": {"type": "snapshot", "max_age_s": 600},
            }
        },
        "homeassistant": {
            "discovery_prefix": f"{p}/ha",
            "status_topic": f"{p}/ha/status",
            "instance_id": p,
        },
        "state": {"file": "state.json"},
    }
    cfg = make_config(data, tmp_path)
    out = Collector(mosquitto.url, f"{p}/ei/#", f"{p}/ha/#")
    pub = Publisher(mosquitto.url)
    rng = np.random.default_rng(11)
    devices = {name: _home(rng, 120) for name in ("clean", "stuck", "kw")}
    devices["stuck"][40:, 1] = 231.4  # the voltage freezes at sample 40
    devices["kw"][40:, 1] *= 1.8  # a unit change: the voltage jumps out of the training range
    t0 = time.time() - 3600
    with DaemonThread(cfg) as thread:
        for i in range(120):
            for name, rows in devices.items():
                power, volts = rows[i].tolist()
                pub.send(f"{p}/z2m/{name}", {"t": t0 + 30 * i, "power": power, "voltage": volts})
        out.wait_count(f"{p}/ei/plug/clean", 120, timeout=60)
        out.wait(lambda ms: sum(m.topic.startswith(f"{p}/ei/plug/") for m in ms) >= 360, timeout=60)

        def announced(ms: list[Any]) -> bool:
            topics = {c.get("state_topic") for c in _components(ms, p)}
            return topics >= {f"{p}/ei/plug/{n}/inputs" for n in devices}

        out.wait(announced, timeout=30)
        daemon = thread.daemon
        assert daemon is not None
        info = thread.call(daemon.bridge_info)["pipelines"]["plug"]["inputs"]
        metrics = thread.call(daemon.render_metrics)
    states = {
        name: [m.json() for m in out.on(f"{p}/ei/plug/{name}/inputs")] for name in ("clean", "stuck", "kw")
    }
    # the clean plug: OFF when its monitor starts, and nothing after
    assert [s["problem"] for s in states["clean"]] == ["OFF"]
    # stuck at sample 40: "stuck" after 30 equal readings (training's longest run of one voltage is 1)
    first_on = next(s for s in states["stuck"] if s["problem"] == "ON")
    assert {"feature": "voltage", "diagnostic": "stuck"} in first_on["diagnostics"]
    assert first_on["ts"] == pytest.approx(t0 + 30 * (40 + 30 - 1), abs=1e-3)  # sample 69: 30 samples
    # the unit change: out_of_range after 3 readings outside the widened training range
    first_on = next(s for s in states["kw"] if s["problem"] == "ON")
    assert {"feature": "voltage", "diagnostic": "out_of_range"} in first_on["diagnostics"]
    assert first_on["ts"] == pytest.approx(t0 + 30 * (40 + 3 - 1), abs=1e-3)  # sample 42: 3 samples
    assert info["raised"].get("stuck", 0) >= 1 and info["raised"].get("out_of_range", 0) >= 1
    assert info["devices"] == 3 and info["samples"] == 360 and info["us_per_sample"] > 0
    assert 'edge_infer_input_diagnostics_total{diagnostic="stuck",pipeline="plug"}' in metrics
    assert 'edge_infer_input_diagnostics_active{diagnostic="out_of_range",pipeline="plug"}' in metrics
    # Home Assistant: a diagnostic problem binary sensor on the prediction's device, per device
    inputs = [c for c in _components(out.messages, p) if c.get("state_topic", "").endswith("/inputs")]
    assert {c["state_topic"] for c in inputs} == {f"{p}/ei/plug/{n}/inputs" for n in devices}
    for c in inputs:
        assert c["platform"] == "binary_sensor" and c["device_class"] == "problem"
        assert c["entity_category"] == "diagnostic" and c["json_attributes_topic"] == c["state_topic"]
    # the flagged spans were kept beside the state file at the clean stop
    spans, dropped = read_spans(tmp_path / SPANS_FILE)
    flagged = {(s.device, s.feature, s.diagnostic) for s in spans}
    assert ("stuck", "voltage", "stuck") in flagged and ("kw", "voltage", "out_of_range") in flagged
    assert not any(s.device == "clean" for s in spans) and dropped == 0
    out.close()
    pub.close()


class _Item:
    def __init__(self, device: str, vector: np.ndarray, ts: float) -> None:
        self.device, self.vector, self.ts = device, vector, ts


class _Pipeline:
    """What InputWatch reads of a daemon Pipeline."""

    def __init__(self, spec: Any) -> None:
        self.name = "plug"
        self.spec = spec
        self.cfg = type("Cfg", (), {"max_devices": 4, "features": object()})()

    def output_topic(self, device: str) -> str:
        return f"ei/plug/{device}"


def _spec(tmp_path: Path) -> Any:
    from edge.runtime import ModelSpec

    path = _watched_model(tmp_path / "plugs.onnx")
    model = onnx.load(str(path))
    manifest = Manifest.from_json(next(p.value for p in model.metadata_props if p.key == MANIFEST_KEY))
    return ModelSpec(
        "plugs", path, "classification", "snapshot", "x", "probs", "probabilities", (2,),
        tuple(FEATURES), tuple(LABELS), None, None, "1.0.0", "0" * 64, None, manifest,
    )  # fmt: skip


def test_clean_simulated_week_gives_no_false_alarm(tmp_path: Path) -> None:
    """Five clean plugs, a week each at one sample a minute, through the daemon's InputWatch."""
    published: list[Any] = []
    from edge.logsetup import RateLimitedLogger

    watch = InputWatch(published.append, RateLimitedLogger("test"), tmp_path / "state.json")
    pipeline = _Pipeline(_spec(tmp_path))
    homes = {f"plug{i}": _home(np.random.default_rng(200 + i), WEEK) for i in range(4)}
    for i in range(WEEK):
        for device, rows in homes.items():
            watch.observe(pipeline, [_Item(device, rows[i].astype(np.float32), 60.0 * i)])
    info = watch.info("plug")
    assert info is not None
    false_alarms = sum(info["raised"].values())
    assert false_alarms == 0, info
    assert info["samples"] == 4 * WEEK
    assert [json.loads(m.payload)["problem"] for m in published] == ["OFF"] * 4  # one start each
    assert watch.spans.spans == []


def test_monitors_are_bounded_by_max_devices(tmp_path: Path) -> None:
    from edge.logsetup import RateLimitedLogger

    watch = InputWatch(lambda _m: None, RateLimitedLogger("test"), None)
    pipeline = _Pipeline(_spec(tmp_path))  # max_devices 4
    for i in range(10):
        watch.observe(pipeline, [_Item(f"d{i}", np.array([0.0, 230.0], np.float32), float(i))])
    info = watch.info("plug")
    assert info is not None and info["devices"] == 4 and info["evicted"] == 6


def test_learn_leaves_flagged_spans_out_unless_kept(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    state = tmp_path / "state.json"
    (tmp_path / SPANS_FILE).write_text(
        json.dumps(
            {
                "dropped": 0,
                "spans": [
                    {
                        "pipeline": "plug",
                        "device": "a",
                        "feature": "voltage",
                        "diagnostic": "stuck",
                        "start": 100.0,
                        "end": 200.0,
                        "detail": "",
                    },
                    {
                        "pipeline": "other",
                        "device": "a",
                        "feature": "voltage",
                        "diagnostic": "stuck",
                        "start": 0.0,
                        "end": 1000.0,
                        "detail": "",
                    },
                ],
            }
        )
    )
    rows = [(float(t), dev, "on", [1.0, 230.0]) for t in range(0, 400, 10) for dev in ("a", "b")]
    config = type("C", (), {"state": type("S", (), {"file": state})()})()

    def table() -> Any:
        return table_from_rows("plug", spec, rows, start=0, end=1000)

    left = drop_flagged(table(), config, keep=False)  # type: ignore[arg-type]
    # device a's rows at 100 ... 190 (10 rows) are inside its span; b's and the other pipeline's stay
    assert len(left) == len(rows) - 10 and left.stats["rows in flagged spans"] == 10
    assert not any(d == "a" and 100 <= t < 200 for d, t in zip(left.devices, left.ts, strict=True))
    kept = drop_flagged(table(), config, keep=True)  # type: ignore[arg-type]
    assert len(kept) == len(rows) and kept.stats["rows in flagged spans (kept: keep_flagged)"] == 10


def test_zoo_occupancy_clean_simulated_week_and_faults() -> None:
    """The bundled occupancy model's training_stats against rooms it never saw (devices/roomsim,
    another seed): a clean week of each of 6 rooms at one sample a minute raises nothing; a
    temperature that freezes is flagged stuck after 30 samples, one that turns °F out_of_range
    after 3. (Its training pools 24 rooms, so drift is not judged: see docs/drift.md.)"""
    from devices import roomsim
    from edge.manifest import read_manifest

    manifest = read_manifest(Path(__file__).parent.parent / "models/occupancy/occupancy.int8.onnx")
    assert manifest is not None and manifest.training_stats is not None
    stats = manifest.training_stats
    assert not any(s.judge_drift for s in stats)
    names = [s.name for s in stats]
    rooms = roomsim.simulate_rooms(6, hours=24 * 7, period_s=60.0, seed=99)
    false_alarms = 0
    for _cfg, room in rooms:
        monitor = DriftMonitor(stats)
        x = np.stack([room[n] for n in names], axis=1)
        false_alarms += sum(d.raised for row in x for d in monitor.observe(row.tolist()))
    assert false_alarms == 0
    t = names.index("temperature")
    for fault, kind, within in (("stuck", "stuck", 30), ("fahrenheit", "out_of_range", 3)):
        x = np.stack([rooms[0][1][n] for n in names], axis=1)[:3000]
        if fault == "stuck":
            x[2000:, t] = x[2000, t]
        else:
            x[2000:, t] = x[2000:, t] * 1.8 + 32
        monitor = DriftMonitor(stats)
        raised = [(i, d) for i, row in enumerate(x) for d in monitor.observe(row.tolist()) if d.raised]
        assert raised and raised[0][1].kind == kind and raised[0][1].feature == "temperature"
        assert 2000 <= raised[0][0] <= 2000 + within - 1  # a quantised reading may have held already


def test_learn_cli_reports_rows_in_flagged_spans_left_out_or_kept(tmp_path: Path) -> None:
    """edge-infer learn on a record file, with flagged spans beside state.file: the rows whose
    window reaches into a span are left out and counted in its output; --keep-flagged keeps them.
    (min_examples_per_class is out of reach, so it stops before training.)"""
    import shutil

    import yaml

    from edge.learn import run as learn_run
    from edge.learn.table import build_table
    from edge.watch import in_spans
    from tests.harness import run_cli
    from tests.test_learn_e2e import BUNDLED, END, config_data, history

    shutil.copyfile(BUNDLED, tmp_path / "occupancy.onnx")
    cfg = make_config(config_data(tmp_path, {}), tmp_path)
    table = build_table("rooms", cfg, history(1.0), END - 3 * 86400, END)
    table.write_csv(tmp_path / "rows.csv")
    device = table.devices[0]
    mine = [float(t) for d, t in zip(table.devices, table.ts, strict=True) if d == device]
    span = {"pipeline": "rooms", "device": device, "feature": "temperature", "diagnostic": "stuck",
            "start": mine[10], "end": mine[40], "detail": ""}  # fmt: skip
    (tmp_path / SPANS_FILE).write_text(json.dumps({"dropped": 0, "spans": [span]}))
    spans, _ = read_spans(tmp_path / SPANS_FILE)
    reach = table.spec.sample_shape[0] * (table.spec.sample_period_s or 0.0)
    expected = sum(in_spans(d, float(t), reach, spans) for d, t in zip(table.devices, table.ts, strict=True))
    assert expected >= 30
    data = config_data(tmp_path, {"source": {"record": "rows.csv"}, "min_examples_per_class": 100_000})
    del data["pipelines"]["rooms"]["learn"]["labels"]
    data["state"] = {"file": "state.json"}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    done = run_cli("learn", "-c", str(path), "rooms", timeout=120)
    assert done.returncode == learn_run.EXIT_TOO_LITTLE, done.stderr
    assert f"inputs unlike training: {expected} row(s) in flagged spans left out" in done.stderr
    kept = run_cli("learn", "-c", str(path), "rooms", "--keep-flagged", timeout=120)
    assert f"inputs unlike training: {expected} row(s) in flagged spans kept" in kept.stderr


def test_a_window_model_reads_each_new_row_once(tmp_path: Path) -> None:
    """Window layout, features.hop 2: each inference reads its 2 newest rows (each sample once)."""
    from edge.logsetup import RateLimitedLogger
    from edge.runtime import ModelSpec

    stats = training_stats(["power"], np.abs(np.random.default_rng(3).normal(500, 100, (50, 6, 1))))
    manifest = Manifest.from_json(
        json.dumps(
            {
                "name": "win", "task": "classification", "labels": ["a", "b"],
                "input": {"name": "x", "layout": "window", "features": ["power"], "window": 6},
                "output": {"name": "probs", "kind": "probabilities"},
                "training_stats": [s.model_dump(mode="json") for s in stats],
            }
        )
    )  # fmt: skip
    spec = ModelSpec(
        "win", tmp_path / "w.onnx", "classification", "window", "x", "probs", "probabilities", (6, 1),
        ("power",), ("a", "b"), None, None, "1.0.0", "0" * 64, None, manifest,
    )  # fmt: skip
    pipeline = _Pipeline(spec)
    pipeline.cfg.features = type("F", (), {"hop": 2})()
    watch = InputWatch(lambda _m: None, RateLimitedLogger("test"), None)
    series = np.full(60, 2000.0, np.float32)  # far above training's range from the start
    for end in range(6, 61, 2):
        watch.observe(pipeline, [_Item("plug", series[end - 6 : end, None], float(end))])
    info = watch.info("plug")
    assert info is not None and info["samples"] == 2 * 28
    assert info["raised"] == {"out_of_range": 1, "stuck": 1}  # 3 rows out of range; 30 equal rows
