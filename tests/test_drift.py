"""Inputs watched: stuck sensors and unit changes are flagged within a stated number of samples;
a clean stationary week at 1/min raises nothing."""

from __future__ import annotations

import numpy as np

from edge.drift import Diagnostic, DriftMonitor, FeatureStats

WEEK = 7 * 24 * 60  # samples at one a minute


def _home(rng: np.random.Generator, n: int) -> np.ndarray:
    """A plug's power (off: exactly 0 W 40% of the time, else ~N(800, 150)) and mains voltage."""
    on = rng.random(n) > 0.4
    power = np.where(on, np.abs(rng.normal(800, 150, n)), 0.0)
    voltage = rng.normal(230, 2, n)
    return np.stack([power, voltage], axis=1)


def _stats(rng: np.random.Generator) -> list[FeatureStats]:
    train = _home(rng, 20_000)
    return [
        FeatureStats.from_samples("power", train[:, 0]),
        FeatureStats.from_samples("voltage", train[:, 1]),
    ]


def _raised(monitor: DriftMonitor, rows: np.ndarray) -> list[tuple[int, Diagnostic]]:
    return [(i, d) for i, row in enumerate(rows) for d in monitor.observe(row.tolist()) if d.raised]


def test_stats_from_samples() -> None:
    s = FeatureStats.from_samples("x", [0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert s.min == 0 and s.max == 9 and s.longest_run == 3 and s.count == 12
    assert len(s.quantiles) == 9 and abs(sum(s.bin_fractions) - 1) < 1e-9
    assert len(s.bin_fractions) == len(s.edges) + 1
    assert FeatureStats.model_validate_json(s.model_dump_json()) == s


def test_clean_week_raises_nothing() -> None:
    rng = np.random.default_rng(1)
    stats = _stats(rng)
    for seed in range(3):  # three simulated weeks, fresh streams
        monitor = DriftMonitor(stats)
        events = _raised(monitor, _home(np.random.default_rng(100 + seed), WEEK))
        assert events == [], events[:3]
        assert max(m.psi for m in monitor.features) < 0.25
        for m in monitor.features:  # the running PSI is the full sum over the window
            assert abs(m.psi - sum(m.term(b) for b in range(len(m.counts)))) < 1e-9


def _detect(change: str) -> dict[str, int]:
    rng = np.random.default_rng(2)
    monitor = DriftMonitor(_stats(rng))
    warm = _home(rng, 600)
    assert _raised(monitor, warm) == []
    after = _home(rng, 2000)
    if change == "stuck":
        after[:, 1] = 231.4  # the voltage reading freezes
    elif change == "kW":
        after[:, 0] /= 1000  # the plug now reports kW
    elif change == "F":
        after[:, 1] = after[:, 1] * 9 / 5 + 32  # voltage channel rescaled (a unit change)
    first: dict[str, int] = {}
    for i, d in _raised(monitor, after):
        first.setdefault(f"{d.feature}:{d.kind}", i + 1)
    return first


def test_stuck_sensor_flagged_within_30_samples() -> None:
    first = _detect("stuck")
    assert first["voltage:stuck"] == 30
    assert "power:stuck" not in first  # 0 W runs are normal for this plug
    assert first["voltage:drift"] <= 60, first  # measured 51 (seed 2)


def test_unit_change_to_kw_flagged_as_drift() -> None:
    first = _detect("kW")
    # kW readings (0-1.2) stay inside the training range [0, ~1400] but all land in the bin
    # above 0 W: PSI passes 0.25 after 95 samples of the 240 window (seed 2)
    assert first["power:drift"] <= 120, first
    assert set(first) == {"power:drift"}, first


def test_scale_shift_flagged_out_of_range_at_once() -> None:
    first = _detect("F")
    assert first["voltage:out_of_range"] == 3
    assert first["voltage:drift"] <= 60, first  # measured 48 (seed 2)


def test_drift_clears_when_the_input_comes_back() -> None:
    rng = np.random.default_rng(3)
    monitor = DriftMonitor(_stats(rng))
    shifted = _home(rng, 400)
    shifted[:, 0] /= 1000
    monitor_events = [d for row in np.concatenate([_home(rng, 300), shifted, _home(rng, 600)])
                      for d in monitor.observe(row.tolist())]  # fmt: skip
    kinds = [(d.feature, d.kind, d.raised) for d in monitor_events]
    assert ("power", "drift", True) in kinds and ("power", "drift", False) in kinds
    assert monitor.active == {}


def test_manifest_training_stats_validated_naming_the_key() -> None:
    import json

    import pytest

    from edge.drift import training_stats
    from edge.manifest import Manifest, ManifestError
    from tests.onnx_models import _snapshot_manifest

    base = json.loads(_snapshot_manifest("m", ["a", "b"], ["x", "y"]).to_json())
    good = [s.model_dump(mode="json") for s in training_stats(["a", "b"], np.arange(20.0).reshape(10, 2))]
    loaded = Manifest.from_json(json.dumps({**base, "training_stats": good}))
    assert loaded.training_stats is not None and [s.name for s in loaded.training_stats] == ["a", "b"]
    with pytest.raises(ManifestError, match=r"training_stats\.0\.count"):
        Manifest.from_json(json.dumps({**base, "training_stats": [{"name": "a"}, good[1]]}))
    with pytest.raises(ManifestError, match="training_stats names"):
        Manifest.from_json(json.dumps({**base, "training_stats": good[::-1]}))
    broken = {**good[0], "quantiles": good[0]["quantiles"][::-1]}
    with pytest.raises(ManifestError, match=r"training_stats\.0.*ascending"):
        Manifest.from_json(json.dumps({**base, "training_stats": [broken, good[1]]}))


def test_window_stats_count_runs_within_each_window() -> None:
    from edge.drift import training_stats

    x = np.zeros((3, 4, 1))
    x[:, :2, 0] = 5.0  # each window: 5, 5, 0, 0 -> runs of 2, never 4 across windows
    (stats,) = training_stats(["p"], x)
    assert stats.longest_run == 2 and stats.count == 12
    x = np.tile(np.arange(40.0) % 2, (3, 1))[:, :, None]  # 0, 1, 0, 1 ...: runs of 1
    x[1, :, 0] = 0.0  # one window of a single value: the run may have been longer than the window
    (stats,) = training_stats(["p"], x)
    assert stats.longest_run == 120  # every training reading: stuck is judged only past that
    monitor = DriftMonitor([stats])
    assert all(d.kind != "stuck" for _ in range(100) for d in monitor.observe([0.0]))


def test_pooled_stats_do_not_judge_drift() -> None:
    from edge.drift import training_stats

    rng = np.random.default_rng(5)
    (stats,) = training_stats(["t"], rng.normal(20, 3, (500, 1)), pooled=True)
    assert stats.judge_drift is False
    monitor = DriftMonitor([stats])
    shifted = [d for v in rng.normal(26, 0.3, 1000) for d in monitor.observe([float(v)])]
    assert all(d.kind != "drift" for d in shifted)
