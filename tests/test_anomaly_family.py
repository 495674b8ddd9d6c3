"""Anomaly models learned from normal behaviour (issue 22): an autoencoder over a device's own
windows, threshold for a target false-alarm rate on held-out normal data, injected faults found."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge.alarm import AlarmRule, AlarmRuleError, DeviceAlarms, episodes, gate
from edge.config import ModelConfig, RuntimeConfig
from edge.manifest import read_manifest
from edge.outputs import Prediction
from edge.runtime import LoadedModel
from exporters.anomaly import (
    DAY_S,
    alarm_episodes,
    allowed_alarms,
    choose_threshold,
    detection_delay_s,
    false_alarms_per_day,
    fit,
    flow_recipe,
    fridge_power,
    fridge_recipe,
    onnx_scores,
    poisson_upper,
    water_flow,
    windows,
)

pytestmark = pytest.mark.torch

ONSET = 2 * DAY_S
TARGET = 0.1  # false alarms per day (recipe parameter)


def test_threshold_for_a_target_rate_and_alarm_counting() -> None:
    recipe = fridge_recipe(false_alarms_per_day=1.0, hop=1, window=1)  # 1440 scores a day
    rng = np.random.default_rng(0)
    scores = rng.normal(size=1440 * 60)
    thr = choose_threshold(scores, recipe)
    # 60 days allow the most alarms whose 90 % Poisson upper bound is within 60: 50 of them
    allowed = allowed_alarms(60.0, recipe)
    assert poisson_upper(allowed, 0.9) <= 60.0 < poisson_upper(allowed + 1, 0.9)
    assert 45 <= allowed < 60 and str(allowed) in thr["method"]
    assert alarm_episodes(scores >= thr["threshold"]) == thr["held_out_alarms"] <= allowed
    # the lowest such threshold: it spends the allowance, and the next lower score exceeds it
    assert thr["held_out_alarms"] >= allowed - 1
    assert alarm_episodes(scores >= scores[scores < thr["threshold"]].max()) > allowed
    # persistence: windows over the threshold must come 3 in a row; the threshold drops for it
    # and the alarms counted are the gate's episodes, still within the allowance
    persist = fridge_recipe(false_alarms_per_day=1.0, hop=1, window=1, persist=3, clear=5)
    thr3 = choose_threshold(scores, persist)
    assert thr3["threshold"] < thr["threshold"]
    assert episodes(gate(scores, thr3["threshold"], persist.alarm)) == thr3["held_out_alarms"] <= allowed
    assert thr3["alarm"] == {"persist": 3, "clear": 5}
    # 2000 scores cannot show a share of 1/1440 well: the fitted exponential tail extrapolates
    tail_rng = np.random.default_rng(0)
    tail_rng.normal(size=1440 * 30)
    exp_scores = tail_rng.exponential(size=1440 * 30)
    short = choose_threshold(exp_scores[:2000], recipe)
    assert "tail" in short["method"]
    assert short["threshold"] >= exp_scores[:2000].max()
    # true tail of Exp(1): P(S > t) = exp(-t), t = ln(1440) = 7.27
    assert short["threshold"] == pytest.approx(np.log(1440), rel=0.15)
    assert alarm_episodes(np.array([0, 1, 1, 0, 1, 0, 0, 1], bool)) == 3
    assert windows(np.arange(10.0), 4, 3).shape == (3, 4, 1)


def test_the_alarm_rule_gates_episodes() -> None:
    rule = AlarmRule(persist=2, clear=3)
    over = np.array([1, 0, 1, 1, 0, 0, 1, 0, 0, 0, 1, 1, 1, 0], bool)
    alarm = gate(over.astype(float), 0.5, rule)
    # on at the 2nd of two in a row; a gap of 2 keeps it on; off at the 3rd under; on again
    assert alarm.astype(int).tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1]
    assert episodes(alarm) == 2
    assert gate(over.astype(float), 0.5, AlarmRule()).tolist() == over.tolist()  # the default: as before
    for bad, key in (({"persist": 0}, "persist"), ({"clear": "6"}, "clear"), ({"persist": True}, "persist")):
        with pytest.raises(AlarmRuleError, match=rf"provenance\.alarm\.{key}"):
            AlarmRule.from_record(bad, "provenance.alarm")
    with pytest.raises(AlarmRuleError, match="not an object"):
        AlarmRule.from_record([2, 6], "provenance.alarm")


def test_device_alarms_gate_each_device_apart() -> None:
    alarms = DeviceAlarms(max_devices=2)
    rule = AlarmRule(persist=2, clear=2)

    def answer(over: bool) -> Prediction:
        fields = {"label": "anomaly" if over else "normal", "score": 1.0, "threshold": 0.5, "anomaly": over}
        return Prediction(fields, over, 1.0)

    got = []
    for device, over in (("a", True), ("b", True), ("a", True), ("b", False), ("a", False), ("a", False)):
        p = answer(over)
        alarms.apply(device, rule, p)
        got.append((device, p.fields["anomaly"], p.fields["label"], p.fields["over_threshold"], p.key))
    assert got == [
        ("a", False, "normal", True, False),
        ("b", False, "normal", True, False),
        ("a", True, "anomaly", True, True),
        ("b", False, "normal", False, False),
        ("a", True, "anomaly", False, True),
        ("a", False, "normal", False, False),
    ]
    p = answer(True)
    alarms.apply("c", None, p)  # no rule (a model without provenance.alarm): as it came
    assert p.fields == answer(True).fields


@pytest.mark.parametrize("device", ["fridge", "water_flow"])
def test_detects_injected_faults_at_the_stated_false_alarm_rate(device: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    if device == "fridge":
        recipe = fridge_recipe(false_alarms_per_day=TARGET)
        normal = fridge_power(21, rng)
        faults = {
            "longer_runs": fridge_power(6, rng, fault="longer_runs", onset_s=ONSET),
            "stuck_on": fridge_power(6, rng, fault="stuck_on", onset_s=ONSET),
        }
        max_delay_h = {"longer_runs": 24.0, "stuck_on": 2.0}
    else:
        recipe = flow_recipe(false_alarms_per_day=TARGET)
        normal = water_flow(21, rng)
        faults = {"never_zero": water_flow(6, rng, leak_lpm=1.0, onset_s=ONSET)}
        max_delay_h = {"never_zero": 6.0}
    res = fit(normal, recipe, tmp_path / "a.onnx")
    thr = res.threshold["threshold"]
    manifest = read_manifest(res.path)
    assert manifest is not None and manifest.task == "anomaly"
    assert manifest.output.name == "score" and manifest.output.kind == "score"
    assert manifest.threshold == thr
    assert manifest.metrics["threshold"]["target_false_alarms_per_day"] == TARGET
    # held-out normal days the model never saw: at most the stated rate (with the Poisson slack
    # of 14 days: 0.1/day expects 1.4 alarms; 4 or more has probability < 5 %)
    test_days = 14
    scores = onnx_scores(
        res.path,
        (fridge_power if device == "fridge" else water_flow)(test_days, rng),
        recipe.window,
        recipe.hop,
    )
    fa = false_alarms_per_day(scores, thr, recipe)
    assert fa * test_days <= 3, f"{fa:.3f} false alarms/day"
    for name, series in faults.items():
        sc = onnx_scores(res.path, series, recipe.window, recipe.hop)
        before = sc[: int(ONSET / (recipe.sample_period_s * recipe.hop)) - recipe.window // recipe.hop]
        delay = detection_delay_s(sc, thr, ONSET, recipe, len(series))
        print(f"{device}/{name}: false alarms/day {fa:.3f}, delay {delay and delay / 3600:.2f} h")
        assert delay is not None, f"{name} not detected"
        assert delay / 3600 <= max_delay_h[name]
        assert not (before >= thr).any(), "alarm before the fault's onset"
    # the daemon's loader serves it: score out, threshold from the manifest
    loaded = LoadedModel("a", ModelConfig(path=res.path), RuntimeConfig())
    out = loaded.run_sync(windows(faults[next(iter(faults))], recipe.window, recipe.hop)[-3:])
    assert out.shape == (3, 1) and (out[:, 0] >= loaded.spec.threshold).all()
    loaded.close()


def test_the_daemon_loads_the_alarm_rule_and_refuses_a_bad_one(tmp_path: Path) -> None:
    import onnx

    from edge.runtime import ModelLoadError
    from exporters.onnxutil import set_manifest

    bundled = (
        Path(__file__).resolve().parent.parent / "models" / "fridge_anomaly" / "fridge_anomaly.fp32.onnx"
    )
    loaded = LoadedModel("fridge", ModelConfig(path=bundled), RuntimeConfig())
    manifest = read_manifest(bundled)
    assert manifest is not None
    assert loaded.spec.alarm == AlarmRule.from_record(manifest.provenance["alarm"], "x")
    loaded.close()
    model = onnx.load_model(str(bundled))
    set_manifest(
        model, manifest.model_copy(update={"provenance": {**manifest.provenance, "alarm": {"persist": 0}}})
    )
    bad = tmp_path / "bad.onnx"
    onnx.save_model(model, str(bad))
    with pytest.raises(ModelLoadError, match=r"provenance\.alarm\.persist 0"):
        LoadedModel("fridge", ModelConfig(path=bad), RuntimeConfig())
