"""edge-infer learn for an anomaly model: simulated healthy fridges' Home Assistant history (the
simulated home's own fridge, devices/faults.py), no labels -> table of the daemon's windows ->
training process -> threshold for the target false alarms a day on held-out normal days -> gate
on the newest normal days -> deployed; the deployed file finds the injected faults; the gate
refuses a model whose false alarms do not hold, and keeps the deployed one."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import yaml

from devices.faults import FRIDGE_FAULTS, FRIDGE_PERIOD_S, fridge_power
from edge.alarm import AlarmRule, episodes, gate
from edge.config import ConfigError
from edge.learn import run as learn_run
from edge.learn.anomaly import poisson_lower
from edge.learn.deploy import previous_path
from edge.learn.history import EntityHistory, StateChange
from edge.learn.sources import MemorySource
from edge.manifest import read_manifest
from edge.runtime import file_sha256
from tests.harness import make_config, run_cli

ROOT = Path(__file__).resolve().parent.parent
ZOO_FRIDGE = ROOT / "models" / "fridge_anomaly" / "fridge_anomaly.fp32.onnx"
END = datetime(2026, 11, 5, tzinfo=UTC).timestamp()
DAYS = 28
FRIDGES = ("kitchen", "garage")
WINDOW, HOP = 180, 10
DAY = 86400.0
# a stuck-on compressor inside the oldest block, marked as not normal by learn.exclude
EXCLUDED = (END - 24 * DAY, END - 23 * DAY)


def readings(
    n: int, seed: int, fault: str | None = None, onset_s: float = 0.0, watts: float = 0.0
) -> np.ndarray:
    series = fridge_power(n, np.random.default_rng(seed), fault=fault, onset_s=onset_s)
    return series + np.float32(watts) * (series > 10.0)  # watts: another compressor's level


def history(days: float = DAYS, shift_from: float | None = None) -> EntityHistory:
    """Each fridge's power as Home Assistant records it, one state a minute; inside EXCLUDED the
    kitchen fridge is stuck on; from ``shift_from`` (seconds before END) every fridge runs 60 W
    higher (a behaviour the oldest days never showed)."""
    n = int(days * DAY / FRIDGE_PERIOD_S)
    start = END - n * FRIDGE_PERIOD_S
    hist: EntityHistory = {}
    for k, device in enumerate(FRIDGES):
        series = readings(n, seed=100 + k)
        ts = start + np.arange(n) * FRIDGE_PERIOD_S
        if device == "kitchen":
            inside = (ts >= EXCLUDED[0]) & (ts < EXCLUDED[1])
            series[inside] = 90.0 + np.random.default_rng(7).normal(0, 1.0, int(inside.sum()))
        if shift_from is not None:
            series[ts >= END - shift_from] += 60.0 * (series[ts >= END - shift_from] > 10.0)
        hist[f"sensor.{device}_fridge_power"] = [
            StateChange(float(t), f"{v:.1f}") for t, v in zip(ts, series, strict=True)
        ]
    return hist


def config_data(tmp_path: Path, **learn: Any) -> dict[str, Any]:
    return {
        "models": {"fridge": {"path": str(tmp_path / "fridge.onnx")}},
        "pipelines": {
            "fridge": {
                "model": "fridge",
                "source": {"profile": "json", "topics": ["home/{device}/plug"], "timestamp_field": "ts"},
                "inputs": {"power": "power"},
                "features": {"type": "window", "size": WINDOW, "hop": HOP, "resample_period_s": 60},
                "learn": {
                    "source": {"recorder_db": str(tmp_path / "unused.db")},
                    "days": DAYS,
                    "end": "2026-11-05T00:00:00Z",
                    "inputs": {d: {"power": f"sensor.{d}_fridge_power"} for d in FRIDGES},
                    "exclude": [
                        {
                            "start": datetime.fromtimestamp(EXCLUDED[0], UTC).isoformat(),
                            "end": datetime.fromtimestamp(EXCLUDED[1], UTC).isoformat(),
                        }
                    ],
                    "test_fraction": 0.25,
                    "val_fraction": 0.35,
                    "anomaly": {"view": "sorted_steps", "false_alarms_per_day": 0.1},
                    **learn,
                },
            }
        },
    }


def write(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def scores(path: Path, series: np.ndarray) -> np.ndarray:
    ends = np.arange(WINDOW, len(series) + 1, HOP)
    x = np.stack([series[e - WINDOW : e] for e in ends])[:, :, None].astype(np.float32)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(["score"], {"input": x})[0][:, 0])


@pytest.fixture(scope="module")
def learned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, learn_run.LearnResult]:
    tmp_path = tmp_path_factory.mktemp("learn_anomaly")
    path = write(tmp_path, config_data(tmp_path))
    result = learn_run.learn(path, "fridge", source=MemorySource(history(), "simulated fridges"))
    return tmp_path, result


def test_learn_trains_on_normal_days_sets_the_threshold_gates_and_deploys(
    learned: tuple[Path, learn_run.LearnResult],
) -> None:
    tmp_path, result = learned
    assert result.status == learn_run.EXIT_PROMOTED, result.message
    report = result.report
    target = tmp_path / "fridge.onnx"
    manifest = read_manifest(target)
    assert manifest is not None and manifest.task == "anomaly"
    assert manifest.input.features == ["power"] and manifest.input.window == WINDOW
    assert manifest.input.sample_period_s == 60.0 and manifest.provenance["hop"] == HOP
    assert manifest.threshold == report["threshold"]["threshold"]
    assert manifest.provenance["alarm"] == {"persist": 2, "clear": 6}
    # both fridges, every window normal, the excluded day's readings never fed
    assert report["examples"] > 2 * (DAYS - 2) * 144
    # (the reading at the span's start is fed before it starts: 1439 a fridge)
    assert report["table_stats"]["readings in excluded spans"] == 2 * 1439
    assert report["split"]["windows"]["train"] > report["split"]["windows"]["test"] > 0
    new = report["holdout"]["candidate"]
    assert new["days"] == pytest.approx(report["split"]["windows"]["test"] / 144)
    # the gate's rule: the target is not below the Poisson lower bound of the alarms seen
    assert poisson_lower(new["false_alarms"], 0.9) <= 0.1 * new["days"]
    assert report["gate"]["promote"] is True and "none yet" in report["holdout"]["deployed_note"]
    # the test block's false alarms, recomputed here from the history with ONNX Runtime alone
    rule = AlarmRule.from_record(manifest.provenance["alarm"], "alarm")
    test_start = datetime.fromisoformat(report["split"]["bounds"]["test"][0]).timestamp()
    hist = history()
    count = 0
    for device in FRIDGES:
        changes = hist[f"sensor.{device}_fridge_power"]
        # the test block's windows end at or after test_start: their readings start a window earlier
        series = np.array([float(c.state) for c in changes if c.ts > test_start - WINDOW * 60], np.float32)
        ends = [c.ts for c in changes if c.ts >= test_start]
        s = scores(target, series)
        assert len(s) == pytest.approx(len(ends) / HOP, abs=2)
        count += episodes(gate(s, manifest.threshold, rule))
    assert count == new["false_alarms"]
    card = (tmp_path / "fridge.onnx.card.md").read_text()
    for needle in (
        "Learned from this home (edge-infer learn, anomaly: no labels)",
        "simulated fridges",
        "**Target**: 0.1 false alarms a day",
        f"| this model | {manifest.threshold:.4g} | {new['false_alarms']} "
        f"| {new['false_alarms_per_day']:.3f} |",
        "**Data span**: 2026-10-08T00:00:00Z to 2026-11-05T00:00:00Z (28.0 days)",
        "**Excluded spans**",
        "**Gate**",
    ):
        assert needle in card, needle
    saved = json.loads((tmp_path / "learn" / "fridge" / "learn_report.json").read_text())
    assert saved["deployed_to"] == str(target)


@pytest.mark.parametrize("fault", FRIDGE_FAULTS)
def test_the_learned_model_finds_each_injected_fault(
    learned: tuple[Path, learn_run.LearnResult], fault: str
) -> None:
    """A fresh 6-day trace of the kitchen fridge with the fault from day 2: the alarm (the rule in
    the learned file's manifest) goes on after the onset, and within 6 hours of it."""
    tmp_path, result = learned
    assert result.status == learn_run.EXIT_PROMOTED, result.message
    manifest = read_manifest(tmp_path / "fridge.onnx")
    assert manifest is not None and manifest.threshold is not None
    rule = AlarmRule.from_record(manifest.provenance["alarm"], "alarm")
    onset = 2 * DAY
    series = readings(int(6 * DAY / 60), seed=900, fault=fault, onset_s=onset)
    on = gate(scores(tmp_path / "fridge.onnx", series), manifest.threshold, rule)
    t = (np.arange(WINDOW, len(series) + 1, HOP) - 1.0) * 60.0
    after = np.flatnonzero(on & (t >= onset))
    assert len(after), f"{fault} not found"
    assert t[after[0]] - onset <= 6 * 3600, f"{fault} found {(t[after[0]] - onset) / 3600:.1f} h after onset"


def test_fresh_healthy_days_raise_few_alarms(learned: tuple[Path, learn_run.LearnResult]) -> None:
    """14 more healthy days of another fridge of the same kind: false alarms consistent with the
    target (its Poisson lower bound at 99 % not above 0.1 a day)."""
    tmp_path, _ = learned
    manifest = read_manifest(tmp_path / "fridge.onnx")
    assert manifest is not None and manifest.threshold is not None
    rule = AlarmRule.from_record(manifest.provenance["alarm"], "alarm")
    alarms = episodes(
        gate(scores(tmp_path / "fridge.onnx", readings(14 * 1440, seed=901)), manifest.threshold, rule)
    )
    assert poisson_lower(alarms, 0.99) <= 0.1 * 14


def test_the_gate_refuses_a_model_whose_false_alarms_do_not_hold_and_keeps_the_deployed(
    learned: tuple[Path, learn_run.LearnResult], tmp_path: Path
) -> None:
    """The fridges changed 5 days ago (their compressors draw 60 W more): the new model, trained
    and thresholded on the older days, raises alarms all over the newest (test) block, so the
    gate refuses it; the deployed file and its card stay as they were."""
    deployed_dir, _ = learned
    shutil.copyfile(deployed_dir / "fridge.onnx", tmp_path / "fridge.onnx")
    before = file_sha256(tmp_path / "fridge.onnx")
    path = write(tmp_path, config_data(tmp_path))
    result = learn_run.learn(
        path, "fridge", source=MemorySource(history(shift_from=5 * DAY), "changed fridges")
    )
    assert result.status == learn_run.EXIT_KEPT, result.message
    new = result.report["holdout"]["candidate"]
    # its alarm stays on over the changed days: few episodes, but on most of the time
    assert new["windows_flagged"] > 0.01
    assert "max_alarm_share=0.01" in result.message and "kept" in result.message
    assert result.report["holdout"]["deployed"]["false_alarms"] > 0  # judged on the same days
    assert file_sha256(tmp_path / "fridge.onnx") == before
    assert not previous_path(tmp_path / "fridge.onnx").exists()


def test_too_little_normal_data_is_refused_before_training(tmp_path: Path) -> None:
    path = write(tmp_path, config_data(tmp_path, days=2, exclude=[], min_examples_per_class=200))
    result = learn_run.learn(path, "fridge", source=MemorySource(history(2), "two days"))
    assert result.status == learn_run.EXIT_TOO_LITTLE, result.message
    assert (
        "not enough data to learn fridge: the " in result.message and "more days of history" in result.message
    )
    assert not (tmp_path / "learn" / "fridge" / "build").exists()


def test_labels_and_anomaly_do_not_go_together_and_an_anomaly_model_needs_it(tmp_path: Path) -> None:
    data = config_data(tmp_path)
    data["pipelines"]["fridge"]["learn"]["labels"] = {"entity": "sensor.kitchen_state"}
    with pytest.raises(ConfigError, match="without labels"):
        make_config(data, tmp_path)
    # an anomaly model's pipeline with labels but no anomaly section: told what to write
    shutil.copyfile(ZOO_FRIDGE, tmp_path / "fridge.onnx")
    del data["pipelines"]["fridge"]["learn"]["anomaly"]
    path = write(tmp_path, data)
    result = learn_run.learn(path, "fridge", source=MemorySource(history(1), "a day"))
    assert result.status == learn_run.EXIT_CONFIG
    assert "is an anomaly model" in result.message and "anomaly: {}" in result.message


def test_cli_learns_an_anomaly_model_from_a_record_file(tmp_path: Path) -> None:
    """The same through `edge-infer learn` from a recording (edge-infer record's rows): every row
    taken as normal whatever its label column says."""
    cfg = make_config(config_data(tmp_path), tmp_path)
    from edge.learn.table import build_table

    table = build_table("fridge", cfg, history(), END - DAYS * DAY, END)
    table.write_csv(tmp_path / "rows.csv")
    data = config_data(tmp_path, source={"record": "rows.csv"})
    del data["pipelines"]["fridge"]["learn"]["inputs"]
    done = run_cli("learn", "-c", str(write(tmp_path, data)), "fridge", "--json", timeout=300)
    assert done.returncode == learn_run.EXIT_PROMOTED, done.stdout + done.stderr
    report = json.loads(done.stdout[: done.stdout.rindex("}") + 1])
    assert report["source"].startswith("edge-infer record file") and report["task"] == "anomaly"
    # (a recorded row whose window reaches into the excluded span is left out: one a fridge)
    assert report["examples"] + report["table_stats"]["rows in excluded spans"] == len(table)
    manifest = read_manifest(tmp_path / "fridge.onnx")
    assert manifest is not None and manifest.task == "anomaly"


def test_the_gate_beside_a_deployed_model() -> None:
    """No more false alarms than a deployed model that holds the target on the same days; a
    deployed model that does not hold it (alarm on too long, or too many) is no bar."""
    from edge.config import LearnAnomaly
    from edge.learn.anomaly import judge

    settings = LearnAnomaly()

    def fa(count: int, flagged: float = 0.002, days: float = 14.0) -> dict[str, Any]:
        return {
            "false_alarms": count,
            "days": days,
            "false_alarms_per_day": count / days,
            "windows_flagged": flagged,
        }

    assert judge(fa(1), None, "none yet", settings)[0] is True
    assert judge(fa(1), fa(1), "", settings)[0] is True  # a tie: the newer data wins
    refused, reason = judge(fa(2), fa(0), "", settings)
    assert refused is False and "more than the deployed model's 0" in reason
    assert judge(fa(2), fa(0, flagged=0.5), "", settings)[0] is True  # the deployed alarm is on half the time
    assert judge(fa(2), fa(12), "", settings)[0] is True  # the deployed one is far above the target here
    assert judge(fa(6), None, "none yet", settings)[0] is False  # 6 in 14 days: above 0.1 a day
    assert poisson_lower(0, 0.9) == 0.0 and poisson_lower(6, 0.9) > 1.4


def test_the_verdict_event_the_daemon_reads_carries_the_false_alarm_gate(
    learned: tuple[Path, learn_run.LearnResult],
) -> None:
    """`learn --events`' last line (what Retrain now and learn.schedule read, edge/retrain.py)."""
    _, result = learned
    event = learn_run.verdict_event("fridge", result)
    new = result.report["holdout"]["candidate"]
    assert event["outcome"] == "promoted" and event["status"] == learn_run.EXIT_PROMOTED
    assert event["gate"]["metric"] == "false_alarms_per_day" and event["gate"]["promote"] is True
    assert event["gate"]["new"] == round(new["false_alarms_per_day"], 4)
    assert event["gate"]["deployed"] is None and event["examples"] == result.report["examples"]
    assert event["deployed_to"] == result.report["deployed_to"]
    json.dumps(event)  # one JSON line


def test_spans_the_daemon_flagged_are_left_out_of_the_normal_data(tmp_path: Path) -> None:
    """A day the daemon flagged the garage fridge's input as stuck (flagged_spans.json beside
    state.file, edge/watch.py) is not taken as normal, unless learn.keep_flagged keeps it."""
    from edge.learn.run import make_table

    data = config_data(tmp_path, exclude=[])
    data["state"] = {"file": str(tmp_path / "state" / "state.json")}
    (tmp_path / "state").mkdir()
    span = {"pipeline": "fridge", "device": "garage", "feature": "power", "diagnostic": "stuck"}
    span |= {"start": END - 10 * DAY, "end": END - 9 * DAY, "detail": "test"}
    (tmp_path / "state" / "flagged_spans.json").write_text(json.dumps({"dropped": 0, "spans": [span]}))
    config = make_config(data, tmp_path)
    source = MemorySource(history(), "simulated fridges")
    table, _ = make_table("fridge", config, END, source)
    kept, _ = make_table("fridge", config, END, source, keep_flagged=True)
    left_out = table.stats["rows in flagged spans"]
    assert left_out >= 144  # a day of windows (every 10 min), and those reaching into it
    assert len(kept) == len(table) + left_out
    assert set(table.labels) == {"normal"}
    ts = np.array([t for t, d in zip(table.ts, table.devices, strict=True) if d == "garage"])
    assert not ((ts >= END - 10 * DAY) & (ts < END - 9 * DAY)).any()
