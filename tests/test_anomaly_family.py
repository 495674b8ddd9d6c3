"""Anomaly models learned from normal behaviour (issue 22): an autoencoder over a device's own
windows, threshold for a target false-alarm rate on held-out normal data, injected faults found."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge.config import ModelConfig, RuntimeConfig
from edge.manifest import read_manifest
from edge.runtime import LoadedModel
from exporters.anomaly import (
    DAY_S,
    alarm_episodes,
    choose_threshold,
    detection_delay_s,
    false_alarms_per_day,
    fit,
    flow_recipe,
    fridge_power,
    fridge_recipe,
    onnx_scores,
    water_flow,
    windows,
)

pytestmark = pytest.mark.torch

ONSET = 2 * DAY_S
TARGET = 0.1  # false alarms per day (recipe parameter)


def test_threshold_for_a_target_rate_and_alarm_counting() -> None:
    recipe = fridge_recipe(false_alarms_per_day=1.0, hop=1, window=1)  # 1440 scores a day
    rng = np.random.default_rng(0)
    scores = rng.normal(size=1440 * 30)
    thr = choose_threshold(scores, recipe)
    assert "quantile" in thr["method"]
    assert (scores >= thr["threshold"]).sum() == pytest.approx(30, abs=2)
    # 2000 scores cannot show a share of 1/1440 well: the fitted exponential tail extrapolates
    exp_scores = rng.exponential(size=1440 * 30)
    short = choose_threshold(exp_scores[:2000], recipe)
    assert "tail" in short["method"]
    assert short["threshold"] >= exp_scores[:2000].max()
    # true tail of Exp(1): P(S > t) = exp(-t), t = ln(1440) = 7.27
    assert short["threshold"] == pytest.approx(np.log(1440), rel=0.15)
    assert alarm_episodes(np.array([0, 1, 1, 0, 1, 0, 0, 1], bool)) == 3
    assert windows(np.arange(10.0), 4, 3).shape == (3, 4, 1)


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
