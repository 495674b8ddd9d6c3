"""learn.source.statistics: Home Assistant's long-term statistics where states are not available.

A recorder database built from the real schema (tests/data/ha_recorder_schema50.sql, as
tests/test_learn_sources.py builds one) holds hourly statistics for twelve hours and states only
after them, as after a purge. The statistics rows go through the daemon's feature code like states;
the windows and labels built from them are checked value by value. tests/test_ha_history.py shows
the same table from a real Home Assistant's WebSocket API and from a copy of its recorder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge.config import Config, ConfigError, parse_config
from edge.learn.history import StateChange, StatisticRow
from edge.learn.recorder_db import RecorderDbSource
from edge.learn.run import learn_card, make_table, statistics_card
from edge.learn.sources import MemorySource
from edge.learn.table import Table
from tests.test_learn_sources import Recorder

H = 3600.0
T0 = 1_764_000_000.0 // H * H  # on the hour
END = T0 + 24 * H  # learn.end: the period is [T0, END)
F = T0 + 12.5 * H  # the oldest kept state (the recorder purged everything before)
MAINS, PLUG = "sensor.mains_power", "sensor.washer_plug_power"
MISSING = 5  # no mains row for hour 5 (Home Assistant had no valid state in it)


def mains_mean(k: int) -> float:
    return 100.0 + 10.0 * k + 0.25


def plug_mean(k: int) -> float:
    return 50.5 if k % 3 == 0 else 1.5


def hourly_rows() -> dict[str, list[StatisticRow]]:
    mains = [
        StatisticRow(T0 + k * H, mean=mains_mean(k), min=1.0 + k, max=2000.0 + k)
        for k in range(-2, 12)
        if k != MISSING
    ]
    plug = [StatisticRow(T0 + k * H, mean=plug_mean(k), min=0.5, max=60.0) for k in range(-2, 12)]
    return {MAINS: mains, PLUG: plug}


def state_points() -> dict[str, list[tuple[float, str]]]:
    """States every 10 minutes from F to END (the plug on in every other hour)."""
    steps = range(int((END - F) // 600))
    return {
        MAINS: [(F + 600 * i, f"{300 + i % 7 * 11.5}") for i in steps],
        PLUG: [(F + 600 * i, "2000.0" if (i // 6) % 2 else "0.5") for i in steps],
    }


@pytest.fixture
def recorder(tmp_path: Path) -> Path:
    rec = Recorder(tmp_path / "home-assistant_v2.db")
    for entity, points in state_points().items():
        for ts, state in points:
            rec.state(entity, state, ts, {"unit_of_measurement": "W"})
    for entity, rows in hourly_rows().items():
        for r in rows:
            values = {k: v for k, v in (("mean", r.mean), ("min", r.min), ("max", r.max)) if v is not None}
            rec.statistic(entity, "statistics", r.start, **values)
    # 5-minute rows exist only for the last hour before the states (purged with them otherwise)
    for i in range(12):
        rec.statistic(MAINS, "statistics_short_term", T0 + 11 * H + 300 * i, mean=500.0 + i)
    rec.close()
    return rec.path


def memory() -> MemorySource:
    history = {
        e: [StateChange(ts, s, {"unit_of_measurement": "W"}) for ts, s in p]
        for e, p in state_points().items()
    }
    return MemorySource(history, statistics={"hour": hourly_rows()})


def pipeline(
    db: Path | str = "/nonexistent.db",
    statistics: Any = None,
    features: dict[str, Any] | None = None,
    labels: dict[str, Any] | None = None,
    source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    src: dict[str, Any] = dict(source or {"recorder_db": str(db)})
    if statistics is not None:
        src["statistics"] = statistics
    return {
        "models": {"m": {"path": "/nonexistent/m.onnx"}},
        "pipelines": {
            "heat": {
                "model": "m",
                "source": {"profile": "json", "topics": ["home/{device}/power"]},
                "inputs": {"power": "power"},
                "features": features
                or {"type": "window", "size": 3, "resample_period_s": 3600, "max_gap_s": 3600},
                "learn": {
                    "source": src,
                    "days": 1,
                    "end": "2025-11-25T00:00:00Z",  # replaced below by END
                    "inputs": {"mains": {"power": MAINS}},
                    "labels": labels or {"teacher": {"entity": PLUG, "above": 5}},
                },
            }
        },
    }


def load(data: dict[str, Any]) -> Config:
    from datetime import UTC, datetime

    data["pipelines"]["heat"]["learn"]["end"] = datetime.fromtimestamp(END, UTC).isoformat()
    return parse_config(data)


def _iso(ts: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def table_of(config: Config, source: Any = None) -> Table:
    table, _ = make_table("heat", config, source=source)
    return table


# --------------------------------------------------------------------------------- the config


@pytest.mark.parametrize(
    ("features", "statistics", "key", "text"),
    [
        (
            {"type": "window", "size": 3, "resample_period_s": 60, "max_gap_s": 3600},
            {"period": "hour"},
            "pipelines.heat.learn.source.statistics.period",
            "coarser than features.resample_period_s=60",
        ),
        (
            {"type": "window", "size": 3, "resample_period_s": 3600, "max_gap_s": 600},
            {},
            "pipelines.heat.learn.source.statistics.period",
            "further apart than features.max_gap_s=600",
        ),
        (
            {"type": "window", "size": 3},
            {"use": "only"},
            "pipelines.heat.learn.source.statistics",
            "set features.resample_period_s",
        ),
        (
            {"type": "snapshot"},
            {"period": "hour"},
            "pipelines.heat.learn.source.statistics.period",
            "coarser than features.max_age_s=300",
        ),
    ],
)
def test_statistics_coarser_than_the_model_are_refused_naming_the_key(
    features: dict[str, Any], statistics: dict[str, Any], key: str, text: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load(pipeline(statistics=statistics, features=features))
    assert err.value.key == key, err.value
    assert text in str(err.value)


def test_statistics_settings_defaults_and_other_refusals() -> None:
    # 5-minute rows suit a snapshot served readings up to 300 s old; off (YAML false) always passes
    cfg = load(pipeline(statistics={"period": "5minute"}, features={"type": "snapshot"}))
    stats = cfg.pipelines["heat"].learn.source.statistics  # type: ignore[union-attr]
    assert stats is not None and (stats.use, stats.period, stats.value, stats.period_s) == (
        "fill",
        "5minute",
        "mean",
        300.0,
    )
    off = load(pipeline(statistics={"use": False}, features={"type": "window", "size": 3}))
    assert off.pipelines["heat"].learn.source.statistics.use == "off"  # type: ignore[union-attr]
    with pytest.raises(ConfigError) as err:
        load(pipeline(statistics={"use": "sometimes"}))
    assert err.value.key == "pipelines.heat.learn.source.statistics.use"
    with pytest.raises(ConfigError) as err:
        load(pipeline(statistics={"period": "day"}))
    assert err.value.key == "pipelines.heat.learn.source.statistics.period"
    data = pipeline(statistics={}, source={"record": "/x.csv"})
    del data["pipelines"]["heat"]["learn"]["labels"]
    with pytest.raises(ConfigError, match="a record file holds model inputs") as err:
        load(data)
    assert err.value.key == "pipelines.heat.learn.source.statistics"
    with pytest.raises(ConfigError, match="corrections are model inputs") as err:
        load(pipeline(statistics={}, labels={"corrections": True}))
    assert err.value.key == "pipelines.heat.learn.source.statistics"


# --------------------------------------------------------------------------------- the table


def expected_statistics_windows() -> tuple[list[float], list[list[float]], list[str]]:
    """The windows before F, worked out by hand from the daemon's sample and hold: the tick at
    T0 + kH holds row k-1 (row 0 at the first tick too), so the window ticking at T0 + kH ends
    with row k-1 and is labelled by the plug's row k-1. The missing mains row 5 is a gap: the
    window ending with row 4 still ticks at its end (5 h), then restarts at row 6; after row 11
    (its window ticks at 12 h) a gap until the states begin."""
    ts: list[float] = []
    x: list[list[float]] = []
    labels: list[str] = []
    for first, last in ((0, MISSING - 1), (MISSING + 1, 11)):
        held = [first, *range(first, last + 1)]  # the samples at ticks first..last+1 (row k-1 at k)
        for j in range(2, len(held)):
            k = first + j
            ts.append(T0 + k * H)
            x.append([mains_mean(i) for i in held[j - 2 : j + 1]])
            labels.append("on" if plug_mean(k - 1) > 5 else "off")
    return ts, x, labels


def test_fill_feeds_the_span_before_the_oldest_state_from_hourly_means(recorder: Path) -> None:
    table = table_of(load(pipeline(recorder, statistics={"use": "fill", "period": "hour"})))
    before = table.ts < F
    ts, x, labels = expected_statistics_windows()
    assert table.ts[before].tolist() == ts
    assert table.x[before][:, :, 0].tolist() == x
    assert [lab for lab, b in zip(table.labels, before, strict=True) if b] == labels
    assert set(labels) == {"on", "off"}
    assert int((~before).sum()) > 0  # the states still give their windows after F
    summary = table.statistics
    assert summary["use"] == "fill" and summary["period"] == "hour" and summary["value"] == "mean"
    assert summary["of_examples"] == len(table)
    mains = summary["entities"][MAINS]
    assert mains["rows"] == 11 and mains["gaps"] == 2
    assert [s[2] for s in mains["spans"]] == [5, 6]  # rows 0-4 and 6-11 (rows before T0 left out)
    iso = [[_iso(T0), _iso(T0 + MISSING * H), 5], [_iso(T0 + (MISSING + 1) * H), _iso(T0 + 12 * H), 6]]
    assert mains["spans"] == iso
    plug = summary["entities"][f"{PLUG} (label)"]
    assert plug["rows"] == 12 and plug["spans"] == [[_iso(T0), _iso(T0 + 12 * H), 12]]
    # the windows before F hold statistics; the states' windows after the gap at 12 h do not
    assert summary["examples"] == len(ts) < len(table)


def test_off_trains_on_states_only(recorder: Path) -> None:
    absent = table_of(load(pipeline(recorder)))
    off = table_of(load(pipeline(recorder, statistics={"use": "off"})))
    assert len(absent) > 0 and not (absent.ts < F).any()
    assert absent.ts.tolist() == off.ts.tolist() and np.array_equal(absent.x, off.x)
    assert absent.statistics == {} and off.statistics == {}
    filled = table_of(load(pipeline(recorder, statistics={})))
    assert len(filled) > len(absent)


def test_only_reads_statistics_for_every_numeric_entity(recorder: Path) -> None:
    table = table_of(load(pipeline(recorder, statistics={"use": "only"})))
    ts, x, labels = expected_statistics_windows()
    # the same windows as fill before F, and none after: the states are not read
    assert table.ts.tolist() == ts
    assert table.x[:, :, 0].tolist() == x and table.labels == labels
    assert table.statistics["examples"] == len(table)


def test_value_min_or_max_and_5minute_rows(recorder: Path) -> None:
    table = table_of(load(pipeline(recorder, statistics={"use": "only", "value": "max"})))
    assert table.x[0, :, 0].tolist() == [2000.0, 2000.0, 2001.0]
    assert table.labels[0] == "on"  # the plug's max, 60 W, is above 5 every hour
    five = table_of(
        load(
            pipeline(
                recorder,
                statistics={"period": "5minute"},
                features={"type": "window", "size": 3, "resample_period_s": 300, "max_gap_s": 600},
            )
        )
    )
    early = five.ts < F
    # 12 rows of 5 minutes in the last hour before the states; the plug has none: unlabelled there
    assert five.statistics["entities"][MAINS]["rows"] == 12
    assert not early.any() and five.stats["unlabelled windows"] > 0


def test_the_recorder_copy_and_a_source_in_memory_give_the_identical_table(recorder: Path) -> None:
    cfg = load(pipeline(recorder, statistics={}))
    from_db = table_of(cfg)
    with RecorderDbSource(path=recorder) as db:
        assert table_of(cfg, db).x.tobytes() == from_db.x.tobytes()
    from_memory = table_of(cfg, memory())
    assert from_memory.ts.tolist() == from_db.ts.tolist()
    assert from_memory.x.tobytes() == from_db.x.tobytes()
    assert from_memory.labels == from_db.labels and from_memory.devices == from_db.devices
    assert from_memory.statistics == from_db.statistics
    assert from_memory.stats == from_db.stats


def test_the_card_says_which_spans_came_from_statistics(recorder: Path) -> None:
    table = table_of(load(pipeline(recorder, statistics={})))
    lines = statistics_card(table.statistics)
    assert lines[0].startswith("- **Long-term statistics** (`learn.source.statistics`: use fill, hour rows")
    assert f"{table.statistics['examples']} of {len(table)} examples" in lines[0]
    assert any(line.strip().startswith(f"- `{MAINS}`:") and "(5 rows)" in line for line in lines)
    assert any(f"`{PLUG} (label)`" in line for line in lines)
    assert statistics_card(None) == [] and statistics_card({}) == []
    report = {
        "pipeline": "heat",
        "source": "x",
        "span": {"start": "a", "end": "b", "days": 1.0},
        "statistics": table.statistics,
        "split": {"purge_s": 1, "bounds": {}, "counts": {"train": {}}},
        "classes": [],
        "holdout": {"n": 0},
        "gate": {"metric": "macro_f1", "margin": 0.02, "reason": "r"},
    }
    assert "Long-term statistics" in learn_card(report)


def test_a_snapshot_takes_each_row_at_once_and_its_label_from_the_same_row() -> None:
    """A snapshot holds a reading at once (no tick): its vector at a row's start is that row, and
    the teacher's row of the same start labels it; a missing row is a gap (no vector there)."""
    five = 300.0
    rows = {
        MAINS: [StatisticRow(T0 + five * k, mean=10.0 + k) for k in range(12) if k != 4],
        PLUG: [StatisticRow(T0 + five * k, mean=9.0 if k % 2 else 1.0) for k in range(12)],
    }
    source = MemorySource({}, statistics={"5minute": rows})
    cfg = load(
        pipeline(
            statistics={"use": "only", "period": "5minute"}, features={"type": "snapshot", "max_age_s": 300}
        )
    )
    table = table_of(cfg, source)
    ks = [k for k in range(12) if k != 4]
    assert ((table.ts - T0) / five).tolist() == ks
    assert table.x[:, 0].tolist() == [10.0 + k for k in ks]
    assert table.labels == ["on" if k % 2 else "off" for k in ks]
    assert table.statistics["examples"] == len(ks)
    # the gap after the last row's period: the teacher's row 11 ends at 12 periods, the entity is
    # unavailable from there (never a value held on)
    assert table.statistics["entities"][MAINS]["gaps"] == 2


def test_learn_end_to_end_reports_and_cards_the_statistics_spans(tmp_path: Path) -> None:
    """`learn` with a recorder copy whose states cover the last day and whose hourly statistics the
    five before: trained (a few epochs), the card and learn_report.json say what statistics fed."""
    pytest.importorskip("torch")
    import io
    import json
    import math
    from datetime import UTC, datetime

    import yaml

    from edge.learn.run import EXIT_KEPT, EXIT_PROMOTED, learn

    end = T0 + 6 * 86400
    first_state = end - 86400
    rec = Recorder(tmp_path / "home-assistant_v2.db")

    def on(k: int) -> bool:
        return k % 24 in (7, 8, 9, 18, 19, 20, 21)

    for k in range(int((first_state - T0) // H)):
        rec.statistic(MAINS, "statistics", T0 + k * H, mean=(950.0 if on(k) else 140.0) + 15 * math.sin(k))
        rec.statistic(PLUG, "statistics", T0 + k * H, mean=1500.0 if on(k) else 0.4)
    for i in range(86400 // 600):
        ts = first_state + 600 * i
        k = int((ts - T0) // H)
        rec.state(MAINS, f"{(950.0 if on(k) else 140.0) + 15 * math.sin(i)}", ts)
        rec.state(PLUG, "1500.0" if on(k) else "0.4", ts)
    rec.close()
    data = pipeline(rec.path, statistics={"use": "fill"})
    data["models"]["m"]["path"] = str(tmp_path / "m.onnx")
    data["pipelines"]["heat"]["learn"].update(
        days=6,
        end=datetime.fromtimestamp(end, UTC).isoformat(),
        min_examples_per_class=5,
        train={"epochs": 5},
        work_dir=str(tmp_path / "work"),
    )
    config = tmp_path / "edge-infer.yaml"
    config.write_text(yaml.safe_dump(data))
    result = learn(config, "heat", deploy_model=False, out=io.StringIO())
    assert result.status in (EXIT_PROMOTED, EXIT_KEPT), result.message
    report = json.loads((tmp_path / "work" / "learn_report.json").read_text())
    stats = report["statistics"]
    assert stats["use"] == "fill" and stats["period"] == "hour"
    assert 0 < stats["examples"] < report["examples"] == stats["of_examples"]
    assert stats["entities"][MAINS]["spans"] == [[_iso(T0), _iso(first_state), 120]]
    card = (tmp_path / "work" / "build" / "card.md").read_text()
    assert f"`{MAINS}`: {_iso(T0)} to {_iso(first_state)} (120 rows)" in card
    assert f"{stats['examples']} of {report['examples']} examples hold a value or a label" in card


def test_the_docs_statistics_example_is_valid_and_its_refusal_is_the_codes() -> None:
    import re

    import yaml

    doc = (Path(__file__).resolve().parent.parent / "docs" / "learning-sources.md").read_text()
    block = re.search(r"<!-- statistics example -->\n```yaml\n(.*?)\n```", doc, re.S)
    assert block is not None
    data = yaml.safe_load(block.group(1))
    cfg = parse_config(data)  # the model file does not exist yet: learn creates it
    stats = cfg.pipelines["heatpump"].learn.source.statistics  # type: ignore[union-attr]
    assert stats is not None and (stats.use, stats.period, stats.value) == ("fill", "hour", "mean")
    # the refusal the docs quote, for the 10-second washer window
    data["pipelines"]["washer"] = data["pipelines"].pop("heatpump")
    data["pipelines"]["washer"]["features"] = {"type": "window", "size": 30, "resample_period_s": 10}
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    quoted = re.search(r"`(pipelines\.washer\.learn\.source\.statistics\.period: .*?)`", doc, re.S)
    assert quoted is not None
    assert f"{err.value.key}: {err.value.message}" == " ".join(quoted.group(1).split())


def test_an_entity_that_is_input_and_teacher_gets_each_its_own_timing() -> None:
    """The mains meter teaching itself (above 150 W): its input rows stand at their start, its
    teacher rows at their end, so each window is labelled by its own newest hour."""
    rows = {MAINS: [StatisticRow(T0 + k * H, mean=100.0 + 20.0 * (k % 5)) for k in range(10)]}
    cfg = load(pipeline(statistics={"use": "only"}, labels={"teacher": {"entity": MAINS, "above": 150}}))
    table = table_of(cfg, MemorySource({}, statistics={"hour": rows}))
    assert len(table) == 9  # ticks at hours 2..10 (the last at the end of row 9)
    newest = table.x[:, -1, 0].tolist()
    assert table.labels == ["on" if v > 150 else "off" for v in newest]
    assert set(table.labels) == {"on", "off"}
