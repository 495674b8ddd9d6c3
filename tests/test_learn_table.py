"""edge-infer learn: history -> training table (issue 20).

Resampling with gaps and ``unavailable``, label entities and teacher rules, excluded spans,
and feature parity: the vectors learn trains on are bit for bit those the daemon infers on.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from devices.history import room_history
from devices.roomsim import RoomConfig
from edge.config import Config, ConfigError, parse_config
from edge.learn.history import EntityHistory, StateChange
from edge.learn.sources import MemorySource, RecordTable
from edge.learn.table import build_table, pipeline_for
from edge.record import columns_for

T0 = datetime(2026, 11, 1, tzinfo=UTC).timestamp()


def config(learn: dict[str, Any], **pipeline: Any) -> Config:
    pipe = {
        "model": "m",
        "source": {"profile": "json", "topics": ["home/{device}/power"], "timestamp_field": "ts"},
        "inputs": {"power": "power"},
        "features": {"type": "window", "size": 3, "resample_period_s": 10, "max_gap_s": 100},
        "learn": learn,
    }
    pipe.update(pipeline)
    return parse_config({"models": {"m": {"path": "/nonexistent/m.onnx"}}, "pipelines": {"p": pipe}})


def series(entity: str, *points: tuple[float, str]) -> EntityHistory:
    return {entity: [StateChange(T0 + t, s) for t, s in points]}


LABEL_ALWAYS = {"entity": "input_select.mode"}
MODE = series("input_select.mode", (-1, "run"))


def learn_cfg(**extra: Any) -> dict[str, Any]:
    return {
        "source": {"recorder_db": "/x.db"},
        "inputs": {"plug": {"power": "sensor.power"}},
        "labels": LABEL_ALWAYS,
        **extra,
    }


def test_resampling_is_sample_and_hold_on_the_period_grid() -> None:
    cfg = config(learn_cfg())
    hist = series("sensor.power", (0, "1"), (10, "2"), (20, "3"), (35, "4"), (40, "5")) | MODE
    table = build_table("p", cfg, hist, T0 - 5, T0 + 100)
    # ticks at 0, 10, 20, 30, 40 take the value held before each message (the daemon's rule)
    assert table.x[:, :, 0].tolist() == [[1, 1, 2], [1, 2, 3], [2, 3, 4]]
    assert (table.ts - T0).tolist() == [20, 35, 40]
    assert table.labels == ["run"] * 3


def test_unavailable_is_a_gap_never_a_value() -> None:
    cfg = config(learn_cfg())
    hist = (
        series(
            "sensor.power",
            *[(t, str(t)) for t in range(0, 60, 10)],
            (60, "unavailable"),
            (80, "unknown"),
            *[(t, str(t)) for t in range(100, 200, 10)],
        )
        | MODE
    )
    table = build_table("p", cfg, hist, T0 - 5, T0 + 300)
    assert len(table) > 0
    assert np.isfinite(table.x).all()
    for ts, window in zip(table.ts, table.x[:, :, 0], strict=True):
        if ts - T0 >= 60:  # after the gap: only readings from after it, never one from before
            assert window.min() >= 100, window
    assert table.stats["gap states"] == 2
    # no window is ready at 100 or 110: the window restarted with the gap
    assert not any(60 <= ts - T0 < 120 for ts in table.ts)


def test_max_gap_restarts_the_window_as_the_daemon_does() -> None:
    cfg = config(learn_cfg())
    hist = series(
        "sensor.power", *[(t, "1") for t in (0, 10, 20, 30)], *[(t, "9") for t in (300, 310, 320, 330)]
    )
    table = build_table("p", cfg, hist | MODE, T0 - 5, T0 + 400)
    late = table.x[table.ts - T0 >= 300]
    assert len(late) and (late == 9).all()  # nothing from before the 270 s silence


def test_label_entity_with_map_and_unmapped_states() -> None:
    learn = learn_cfg(labels={"entity": "input_select.washer", "map": {"Washing": "on", "Idle": "off"}})
    cfg = config(learn)
    hist = series("sensor.power", *[(t, str(t)) for t in range(0, 300, 10)]) | series(
        "input_select.washer", (0, "Idle"), (100, "Washing"), (200, "Cleaning"), (250, "unavailable")
    )
    table = build_table("p", cfg, hist, T0 - 5, T0 + 400)
    for ts, label in zip(table.ts - T0, table.labels, strict=True):
        assert label == ("off" if ts < 100 else "on")
        assert ts < 200
    assert table.stats["unlabelled windows"] > 0


def test_teacher_threshold_labels_on_and_off() -> None:
    teacher = {"entity": "sensor.plug", "above": 5, "on": "running", "off": "idle"}
    cfg = config(learn_cfg(labels={"teacher": teacher}))
    plug = series("sensor.plug", (0, "0.5"), (100, "1500"), (200, "2.0"), (250, "unavailable"))
    hist = series("sensor.power", *[(t, str(t)) for t in range(0, 300, 10)]) | plug
    table = build_table("p", cfg, hist, T0 - 5, T0 + 400)
    got = dict(zip((table.ts - T0).tolist(), table.labels, strict=True))
    assert got[90.0] == "idle" and got[150.0] == "running" and got[240.0] == "idle"
    assert all(t < 250 for t in got)  # an unavailable teacher labels nothing


def test_teacher_any_on_within_and_device_placeholder() -> None:
    teacher = {"any_on": ["binary_sensor.{device}_motion", "binary_sensor.hall"], "within_s": 60}
    learn = learn_cfg(labels={"teacher": {**teacher, "on": "occupied", "off": "empty"}})
    learn["inputs"] = {"den": {"power": "sensor.power"}}
    cfg = config(learn)
    hist = (
        series("sensor.power", *[(t, str(t)) for t in range(0, 400, 10)])
        | series("binary_sensor.den_motion", (0, "off"), (100, "on"), (110, "off"))
        | series("binary_sensor.hall", (0, "off"), (300, "on"), (305, "off"))
    )
    table = build_table("p", cfg, hist, T0 - 5, T0 + 500)
    got = dict(zip((table.ts - T0).tolist(), table.labels, strict=True))
    assert got[90.0] == "empty"
    assert got[110.0] == got[170.0] == "occupied"  # on at 100-110, and 60 s after
    assert got[180.0] == "empty"
    assert got[310.0] == got[360.0] == "occupied" and got[370.0] == "empty"


def test_yaml_on_off_keys_and_errors_name_the_key() -> None:
    from edge.config import parse_yaml

    doc = parse_yaml(
        """
models: {m: {path: /x.onnx}}
pipelines:
  p:
    model: m
    source: {topics: ["a/{device}"]}
    learn:
      source: {recorder_db: /x.db}
      inputs: {d: {power: sensor.p}}
      labels: {teacher: {entity: sensor.plug, above: 5, on: running, off: idle}}
""",
        "t",
    )
    learn = parse_config(doc).pipelines["p"].learn
    assert learn is not None and learn.labels is not None and learn.labels.teacher is not None
    assert (learn.labels.teacher.on, learn.labels.teacher.off) == ("running", "idle")
    bad = json.loads(json.dumps(doc))
    bad["pipelines"]["p"]["learn"]["labels"] = {"entity": "a", "corrections": True}
    with pytest.raises(ConfigError, match=r"pipelines\.p\.learn\.labels: give exactly one"):
        parse_config(bad)
    bad["pipelines"]["p"]["learn"]["labels"] = {"entity": "a"}
    bad["pipelines"]["p"]["learn"]["source"] = {"ha": {"url": "http://ha:8123"}}
    with pytest.raises(ConfigError, match=r"pipelines\.p\.learn\.source\.ha\.token_file"):
        parse_config(bad)
    bad["pipelines"]["p"]["learn"]["source"] = {"record": "r.csv"}
    bad["pipelines"]["p"]["learn"]["dayz"] = 3
    with pytest.raises(ConfigError, match=r"pipelines\.p\.learn\.dayz: unknown key"):
        parse_config(bad)


def test_inputs_must_map_every_model_feature() -> None:
    cfg = config(learn_cfg(inputs={"plug": {"voltage": "sensor.v"}}))
    with pytest.raises(ConfigError, match=r"pipelines\.p\.learn\.inputs\.plug: .*map \['power'\]"):
        build_table("p", cfg, {}, T0, T0 + 10)


def test_excluded_spans_are_gaps_no_window_reaches_into_them() -> None:
    span = {"start": "2026-11-01T00:02:00Z", "end": "2026-11-01T00:04:00Z"}
    cfg = config(learn_cfg(exclude=[span]))
    hist = series("sensor.power", *[(t, str(t)) for t in range(0, 600, 5)]) | MODE
    table = build_table("p", cfg, hist, T0 - 5, T0 + 700)
    s0, s1 = 120.0, 240.0  # readings carry their own time as value: none from inside the span
    values = table.x[:, :, 0]
    assert not ((values >= s0) & (values < s1)).any()
    assert not any(s0 < ts < s1 for ts in table.ts - T0)
    assert (values < s0).any() and (values >= s1).any()
    assert table.stats["readings in excluded spans"] > 0


# ---------------------------------------------------------------------------- parity

CLIMATE = ("temperature", "humidity", "illuminance", "co2")


def rooms_config(learn: dict[str, Any] | None = None, **features: Any) -> Config:
    pipe: dict[str, Any] = {
        "model": "occ",
        "source": {
            "profile": "json",
            "topics": [f"home/{{device}}/{c}" for c in CLIMATE],
            "timestamp_field": "ts",
        },
        "inputs": {c: c for c in CLIMATE},
        "features": {"type": "window", "size": 11, "resample_period_s": 60, "max_gap_s": 600, **features},
    }
    if learn is not None:
        pipe["learn"] = learn
    return parse_config({"models": {"occ": {"path": "/nonexistent/occ.onnx"}}, "pipelines": {"rooms": pipe}})


def test_feature_parity_with_the_daemon_bit_for_bit() -> None:
    """One recorded stream through the daemon's Pipeline.handle (MQTT payloads) and through
    learn's table builder: the same vectors, bit for bit, at the same times."""
    rooms = [("office", RoomConfig(name="office")), ("den", RoomConfig(name="den", schedule="family"))]
    start = datetime.now(UTC).timestamp() - 86400  # the daemon refuses times ahead of its clock only
    hist, _ = room_history(rooms, start=start, days=0.25, period_s=60, seed=3)
    # irregular reporting: drop a third of the changes so channels arrive apart, and a long silence
    rng = np.random.default_rng(0)
    for entity, changes in hist.items():
        keep = [c for c in changes if rng.random() > 0.33 and not (start + 7200 < c.ts < start + 8400)]
        hist[entity] = changes[:1] + keep
    hist |= {"input_select.mode": [StateChange(start - 10, "x")]}
    learn = {
        "source": {"recorder_db": "/x.db"},
        "inputs": {r: {c: f"sensor.{r}_{c}" for c in CLIMATE} for r, _ in rooms},
        "labels": {"entity": "input_select.mode"},
    }
    cfg = rooms_config(learn, hop=2)
    table = build_table("rooms", cfg, hist, start - 60, start + 86400)

    daemon = pipeline_for("rooms", cfg)  # a second, independent pipeline: the daemon's
    messages = []
    for room, _ in rooms:
        for c in CLIMATE:
            for ch in hist[f"sensor.{room}_{c}"]:
                payload = json.dumps({c: float(ch.state), "ts": ch.ts}).encode()
                messages.append((ch.ts, f"home/{room}/{c}", payload))
    messages.sort(key=lambda m: m[0])  # stable: ties stay in the order learn sorts them
    served = []
    for _, topic, payload in messages:
        for item in daemon.handle(topic, payload, 0.0, lambda *_: None):
            served.append((item.ts, item.device, item.vector))
    assert len(served) == len(table) > 100
    for (ts, device, vector), t2, d2, v2 in zip(served, table.ts, table.devices, table.x, strict=True):
        assert (ts, device) == (float(t2), d2)
        assert vector.dtype == v2.dtype == np.float32
        assert vector.tobytes() == v2.tobytes()


def test_written_table_is_record_format_that_round_trips(tmp_path: Path) -> None:
    cfg = config(learn_cfg())
    hist = series("sensor.power", *[(t, str(t * 1.5)) for t in range(0, 200, 10)]) | MODE
    table = build_table("p", cfg, hist, T0 - 5, T0 + 400)
    out = tmp_path / "t.csv"
    table.write_csv(out, ["train"] * len(table))
    header = out.read_text().splitlines()[0].split(",")
    assert header == ["ts", "device", "pipeline", "label", *columns_for(table.spec), "split"]
    rows = RecordTable(out).read("p", columns_for(table.spec))
    back = np.array([r.values for r in rows], dtype=np.float32).reshape(table.x.shape)
    assert back.tobytes() == table.x.tobytes()  # exact: written with repr()
    assert [r.ts for r in rows] == pytest.approx((table.ts).tolist(), abs=1e-3)


def test_memory_source_gives_the_state_before_start() -> None:
    hist = series("sensor.a", (-100, "1"), (-50, "2"), (10, "3"), (500, "4"))
    got = MemorySource(hist).states(["sensor.a", "sensor.none"], T0, T0 + 100)
    assert [(c.ts - T0, c.state) for c in got["sensor.a"]] == [(-50, "2"), (10, "3")]
    assert got["sensor.none"] == []


def test_snapshot_pipeline_drops_stale_joins_as_the_daemon_does() -> None:
    learn = learn_cfg(inputs={"plug": {"power": "sensor.power", "voltage": "sensor.voltage"}})
    cfg = config(
        learn, inputs={"power": "power", "voltage": "voltage"}, features={"type": "snapshot", "max_age_s": 60}
    )
    hist = (
        series("sensor.power", (0, "10"), (30, "20"), (200, "30"), (210, "40"))
        | series("sensor.voltage", (5, "230"), (205, "231"))
        | MODE
    )
    table = build_table("p", cfg, hist, T0 - 5, T0 + 400)
    assert table.spec.layout == "snapshot"
    assert table.x.tolist() == [[10, 230], [20, 230], [30, 231], [40, 231]]
    assert table.stats["dropped: stale"] == 1  # power at 200 with voltage from 5: older than 60 s


def test_corrections_are_a_label_source(tmp_path: Path) -> None:
    from edge.labelstore import LabelStore
    from edge.learn.run import make_table

    data = {
        "models": {"m": {"path": "/nonexistent/m.onnx"}},
        "state": {"file": str(tmp_path / "state.json")},
        "pipelines": {
            "p": {
                "model": "m",
                "source": {"profile": "json", "topics": ["home/{device}/power"]},
                "inputs": {"power": "power"},
                "features": {"type": "window", "size": 3, "resample_period_s": 10},
                "learn": learn_cfg(labels={"corrections": True}, days=30, end="2026-11-10T00:00:00Z"),
            }
        },
    }
    cfg = parse_config(data)
    store = LabelStore(tmp_path)
    for i, label in enumerate(["kettle", "none of these", "toaster"]):
        window = [[float(i)], [float(i + 1)], [float(i + 2)]]
        store.add(
            device="plug",
            pipeline="p",
            predicted="x",
            label=label,
            model_version="1",
            input=window,
            ts=T0 + i,
        )
    store.add(
        device="plug", pipeline="other", predicted="x", label="kettle", model_version="1", input=[[0.0]] * 3
    )
    store.close()
    table, described = make_table("p", cfg)
    assert described.startswith("corrections store")
    assert table.labels == ["kettle", "toaster"]
    assert table.x[:, :, 0].tolist() == [[0, 1, 2], [2, 3, 4]]


def test_record_rows_reaching_into_an_excluded_span_are_left_out() -> None:
    from edge.learn.table import table_from_rows

    spec = pipeline_for("p", config(learn_cfg())).spec  # 3 samples of 10 s: a row reaches back 30 s
    assert spec.sample_period_s == 10.0
    rows = [(T0 + t, "plug", "on", [1.0, 2.0, 3.0]) for t in range(0, 600, 10)]
    table = table_from_rows("p", spec, rows, start=T0, end=T0 + 600, exclude=[(T0 + 200, T0 + 300)])
    kept = (table.ts - T0).tolist()
    assert all(t < 200 or t - 30 >= 300 for t in kept)
    assert 190 in kept and 330 in kept and 320 not in kept
    assert table.stats["rows in excluded spans"] == 13  # 200, 210, ..., 320


def test_record_source_takes_no_labels_and_corrections_need_a_store(tmp_path: Path) -> None:
    from edge.learn.run import make_table

    with pytest.raises(ConfigError, match=r"pipelines\.p\.learn\.labels: a record source's rows carry"):
        config({"source": {"record": "r.csv"}, "labels": LABEL_ALWAYS})
    data = {
        "models": {"m": {"path": "/nonexistent/m.onnx"}},
        "state": {"file": str(tmp_path / "state.json")},
        "pipelines": {
            "p": {
                "model": "m",
                "source": {"profile": "json", "topics": ["home/{device}/power"]},
                "inputs": {"power": "power"},
                "features": {"type": "window", "size": 3, "resample_period_s": 10},
                "learn": learn_cfg(labels={"corrections": True}),
            }
        },
    }
    with pytest.raises(ConfigError, match=r"pipelines\.p\.learn\.labels\.corrections: no label store"):
        make_table("p", parse_config(data))
    assert not (tmp_path / "labels.sqlite3").exists()
