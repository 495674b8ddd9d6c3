"""The state file: windows survive a restart when the input is the same, and anything
incompatible or broken is ignored with a warning instead of stopping the daemon."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge import statefile
from edge.config import parse_config
from edge.daemon import build_pipelines, load_models
from edge.pipeline import Pipeline
from tests.onnx_models import snapshot_classifier, window_classifier


def _pipelines(tmp_path: Path, size: int = 4, hop: int = 1) -> dict[str, Pipeline]:
    window_classifier(tmp_path / "w.onnx", ["power"], size, ["off", "on"], name="w")
    snapshot_classifier(tmp_path / "s.onnx", ["temperature", "humidity"], ["a", "b"], name="s")
    data: dict[str, Any] = {
        "mqtt": {"url": "mqtt://127.0.0.1:1"},
        "models": {"w": {"path": "w.onnx"}, "s": {"path": "s.onnx"}},
        "pipelines": {
            "plug": {
                "model": "w",
                "source": {"topics": ["plugs/{device}"]},
                "features": {"type": "window", "size": size, "hop": hop, "max_gap_s": 60},
            },
            "room": {"model": "s", "source": {"topics": ["rooms/{device}"]}},
        },
    }
    config = parse_config(data, "t.yaml", tmp_path)
    return build_pipelines(config, load_models(config))


def _feed(pipelines: dict[str, Pipeline], device: str, values: list[float], t0: float = 1000.0) -> list[Any]:
    out = []
    for i, v in enumerate(values):
        out.append(pipelines["plug"].store.update(device, {"power": v}, t0 + i))
    return out


def test_windows_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "state" / "edge-infer.json"
    before = _pipelines(tmp_path)
    _feed(before, "kettle", [1.0, 2.0, 3.0])  # one short of a full window
    _feed(before, "tv", [5.0, 6.0, 7.0, 8.0, 9.0])
    before["room"].store.update("attic", {"temperature": 21.5}, 1000.0)  # half a join
    assert statefile.save(path, before) == 3
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]

    after = _pipelines(tmp_path)
    report = statefile.restore(path, after)
    assert (report.devices, report.problem, report.skipped) == (3, None, {})
    # The restored window completes with the very next reading, exactly as the old one would.
    expected = before["plug"].store.update("kettle", {"power": 4.0}, 1003.0)
    got = after["plug"].store.update("kettle", {"power": 4.0}, 1003.0)
    assert expected is not None and got is not None
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(
        after["plug"].store.update("tv", {"power": 10.0}, 1005.0),
        before["plug"].store.update("tv", {"power": 10.0}, 1005.0),
    )
    joined = after["room"].store.update("attic", {"humidity": 40.0}, 1001.0)
    assert joined is not None and list(joined) == [21.5, 40.0]


def test_a_long_outage_restarts_the_window(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    before = _pipelines(tmp_path)
    _feed(before, "kettle", [1.0, 2.0, 3.0])
    statefile.save(path, before)
    after = _pipelines(tmp_path)
    statefile.restore(path, after)
    # 10 minutes later (max_gap_s is 60): the old samples must not join the new ones.
    assert _feed(after, "kettle", [4.0], t0=1600.0) == [None]


@pytest.mark.parametrize(
    ("mangle", "problem"),
    [
        (lambda d: b"{not json", "not valid JSON"),
        (lambda d: b"\xff\xfe", "not valid JSON"),
        (lambda d: json.dumps({**d, "version": 99}).encode(), "version 99"),
        (lambda d: json.dumps({**d, "format": "other"}).encode(), "not an edge-infer state file"),
        (lambda d: json.dumps([1, 2]).encode(), "not an edge-infer state file"),
        (lambda d: json.dumps({**d, "pipelines": 3}).encode(), "no 'pipelines' mapping"),
    ],
)
def test_broken_or_foreign_files_are_ignored_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, mangle: Any, problem: str
) -> None:
    path = tmp_path / "s.json"
    before = _pipelines(tmp_path)
    _feed(before, "kettle", [1.0, 2.0])
    statefile.save(path, before)
    path.write_bytes(mangle(json.loads(path.read_text())))
    after = _pipelines(tmp_path)
    with caplog.at_level(logging.WARNING, logger="edge.state"):
        report = statefile.restore(path, after)
    assert report.problem is not None and problem in report.problem, report.problem
    assert report.devices == 0 and not after["plug"].store.states
    assert any(problem in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)


def test_changed_input_skips_only_that_pipeline(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    before = _pipelines(tmp_path, size=4)
    _feed(before, "kettle", [1.0, 2.0])
    before["room"].store.update("attic", {"temperature": 20.0}, 1.0)
    statefile.save(path, before)
    after = _pipelines(tmp_path, size=5)  # the model now takes windows of 5
    report = statefile.restore(path, after)
    assert report.pipelines == ["room"] and report.devices == 1
    assert "plug" in report.skipped and "input changed" in report.skipped["plug"]
    assert not after["plug"].store.states


def test_one_bad_device_entry_costs_only_itself(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    before = _pipelines(tmp_path)
    _feed(before, "good", [1.0, 2.0])
    _feed(before, "bad", [1.0, 2.0])
    statefile.save(path, before)
    document = json.loads(path.read_text())
    document["pipelines"]["plug"]["devices"]["bad"] = {"samples": "oops"}
    path.write_text(json.dumps(document))
    after = _pipelines(tmp_path)
    report = statefile.restore(path, after)
    assert report.devices == 1 and list(after["plug"].store.states) == ["good"]
    assert "plug/bad" in report.skipped


def test_missing_file_is_a_quiet_first_start(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="edge.state"):
        report = statefile.restore(tmp_path / "absent.json", _pipelines(tmp_path))
    assert (report.devices, report.problem) == (0, None)
    assert not caplog.records
