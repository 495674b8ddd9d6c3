"""Smoke test of the benchmark machinery: a tiny run end to end, the JSON has its keys.

No timing assertions: numbers on a shared test machine mean nothing; the bench reports them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.runner import Settings, run_suite
from edge.benchcli import cli_bench


@pytest.mark.broker
def test_tiny_bench_run_writes_results(tmp_path: Path) -> None:
    result = run_suite(Settings.tiny(), tmp_path, log=lambda _line: None)
    files = sorted(p.name for p in tmp_path.iterdir())
    json_files = [f for f in files if f.endswith(".json")]
    assert len(json_files) == 1
    assert any(f.endswith(".md") for f in files)
    data = json.loads((tmp_path / json_files[0]).read_text())
    assert data == json.loads(json.dumps(result))
    for key in ("schema", "date", "mode", "command", "machine", "systems", "scaling", "headline", "goals"):
        assert key in data
    assert {"paho-echo", "c-pipe", "edge-snapshot"} <= set(data["systems"])
    for system in data["systems"].values():
        assert {"label", "kind", "ready_s", "peak_rss_mb", "loads"} <= set(system)
        assert {"100", "saturation"} <= set(system["loads"])
        sat = system["loads"]["saturation"]
        assert {"throughput_msg_s", "latency_ms", "cpu_s_per_1000", "rss_mb"} <= set(sat)
        # busy cores beside msg/s: the process's CPU per wall second, and the machine's
        # (a tiny burst may take less CPU than the 10 ms a process's clock ticks in: >= 0)
        assert sat["busy_cores"] is not None and sat["busy_cores"] >= 0
        assert sat["machine_busy_cores"] is not None and sat["machine_busy_cores"] > 0
        # where the cores went (a tiny burst may take the broker less than a clock tick: >= 0)
        split = sat["cores_by_process"]
        assert set(split) == {"system", "broker", "publishers", "subscriber"}
        assert min(split.values()) >= 0 and sat["broker_us_per_msg"] >= 0
        # the publishers are forked, connect and send for every burst: never less than a tick
        assert split["publishers"] > 0, split
        assert set(sat["latency_ms"]) >= {"p50", "p95", "p99", "n"}
        assert sat["received"] > 0  # the answers were seen and matched to their inputs
        assert sat["latency_ms"]["n"] > 0
    assert [row["devices"] for row in data["scaling"]["devices"]] == [1, 10]
    assert [row["pipelines"] for row in data["scaling"]["pipelines"]] == [1]
    # over all rows the broker relayed thousands of messages: its CPU shows
    assert sum(s["loads"]["saturation"]["broker_us_per_msg"] for s in data["systems"].values()) > 0
    assert data["headline"]["ceiling_msg_s"] is not None
    assert data["headline"]["c_pipe_msg_s"] is not None  # the C clients relayed every input
    assert data["systems"]["c-pipe"]["loads"]["saturation"]["lost"] == 0
    assert data["headline"]["daemon_loaded_torch"] is False
    assert "saturation >= 0.8 x ceiling" in data["goals"]
    assert data["machine"]["usable_cpus"] >= 1


def test_cli_bench_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli_bench(["--help"])
    assert exc.value.code == 0
    assert "--quick" in capsys.readouterr().out


def test_ab_variant_parsing(tmp_path: Path) -> None:
    import argparse

    from bench.ab import Variant
    from bench.systems import ROOT

    v = Variant.parse("new=.,EDGE_INFER_LOOP=asyncio,mqtt.protocol=3.1.1")
    assert (v.name, v.tree, v.env, v.mqtt) == (
        "new",
        ROOT,
        {"EDGE_INFER_LOOP": "asyncio"},
        {"protocol": "3.1.1"},
    )
    assert v.zoo is None
    assert Variant.parse(f"dyn=.,zoo={tmp_path}").zoo == tmp_path.resolve()  # another tree's models
    missing = tmp_path / "missing"
    for bad in ("new", "=.", f"old={tmp_path}", f"dyn=.,zoo={missing}"):
        # no tree, no name, a folder without edge/, a zoo folder that is not there
        with pytest.raises(argparse.ArgumentTypeError):
            Variant.parse(bad)


def test_profile_groups_sums_own_time_by_part(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import cProfile
    import json

    from bench.profile_groups import group_of, groups, main
    from edge.decode import to_float

    assert group_of("/x/edge/decode.py", "decode") == "edge/decode.py"
    assert group_of("/usr/lib/python3.11/asyncio/runners.py", "run") == "event loop (waits, socket calls)"
    assert group_of("~", "<method 'get' of 'dict' objects>") == "built-ins"
    profiler = cProfile.Profile()
    profiler.enable()
    for i in range(2000):
        to_float(json.loads(f'{{"v": {i}}}')["v"], "v")
    profiler.disable()
    path = tmp_path / "p.prof"
    profiler.dump_stats(str(path))
    total, rows = groups(path)
    parts = dict(rows)
    assert parts["edge/decode.py"] > 0 and parts["json"] > 0
    assert abs(sum(parts.values()) - total) < 1e-9
    assert main([str(path), "--messages", "2000"]) == 0
    out = capsys.readouterr().out
    assert "| edge/decode.py |" in out and "µs per message" in out


def test_micro_answers_runs(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.micro import main

    assert main(["answers", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    assert "answers old:" in out and "answers new:" in out


def test_micro_drift_runs(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.micro import main

    assert main(["drift", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    assert "drift old:" in out and "drift new:" in out


def test_loop_cpu_runs(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.loop_cpu import main

    assert main(["--messages", "200", "--reps", "1"]) == 0
    assert "loop CPU per message: median" in capsys.readouterr().out


@pytest.mark.broker
def test_ab_runs_qos1_inputs_into_several_pipelines_on_one_topic() -> None:
    """``python -m bench.ab --qos 1 --pipeline shared-2``: QoS 1 inputs, two pipelines on one input
    topic; every measured answer came back, with the busy-cores columns beside msg/s."""
    from bench.ab import Variant, run_ab
    from bench.systems import ROOT

    result = run_ab(
        [Variant("new", ROOT)], reps=1, burst=300, devices=3, pipeline="shared-2", qos=1, log=lambda _l: None
    )
    assert result["qos"] == 1 and result["pipeline"] == "shared-2"
    (row,) = result["results"].values()
    assert row["lost"] == 0 and row["msg_s_median"] > 0
    assert row["busy_cores_median"] is not None and row["busy_cores_median"] > 0
    assert row["machine_busy_cores_median"] is not None


def test_explain_cost_measures_each_case_in_a_process_of_its_own() -> None:
    """bench/explain_cost.py (the `explain_cost` section of `python -m bench`): each zoo model
    plain and with output.explain, the open-set file plain; the explained answer runs its
    occluded rows (channels + segments) beside the plain one, and the report shows every case."""
    from bench.explain_cost import markdown, measure_all

    cost = measure_all(repeats=5)
    cases = {(c["model"], c["explain"]): c for c in cost["cases"]}
    assert set(cases) == {
        ("appliance", False),
        ("appliance", True),
        ("occupancy", False),
        ("occupancy", True),
        ("appliance_open_set", False),
    }
    assert cases[("appliance", True)]["rows_per_answer"] == 1 + 1 + 8  # 1 channel, 8 segments
    assert cases[("occupancy", True)]["rows_per_answer"] == 1 + 4 + 8
    for c in cases.values():
        assert c["median_ms"] > 0 and c["peak_rss_mb"] >= c["rss_loaded_mb"] > c["rss_before_mb"] > 0
    text = "\n".join(markdown(cost))
    assert text.count("\n| appliance |") == 2 and "open set (OOD output)" in text
