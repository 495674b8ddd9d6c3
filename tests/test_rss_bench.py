"""``python -m bench.rss`` on a short run: one pipeline of examples/home.yaml, one family simulated.

No memory or timing threshold is asserted: the run must measure (idle below peak, every pipeline
answered), and the report must carry its structure and the import-cost profile with each major
import and each model session.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from bench import rss
from tests.harness import ROOT

pytestmark = pytest.mark.broker


def test_variant_and_overrides_parse() -> None:
    variant = rss.Variant.parse("arena:runtime.cpu_mem_arena=true,OPENBLAS_NUM_THREADS=4")
    assert variant.name == "arena"
    assert variant.config == {"runtime.cpu_mem_arena": True}
    assert variant.env == {"OPENBLAS_NUM_THREADS": "4"}
    assert rss.Variant.parse("plain") == rss.Variant("plain")
    assert rss.Variant.parse(f"old:tree={ROOT}").tree == ROOT
    data = rss.apply_overrides({"runtime": {"providers": "auto"}}, {"runtime.x": 1, "new.deep.key": "v"})
    assert data == {"runtime": {"providers": "auto", "x": 1}, "new": {"deep": {"key": "v"}}}


def test_summary_is_median_and_range() -> None:
    runs = [
        {"variant": "a", "idle_mb": i, "peak_mb": 10 + i, "hwm_at_ready_mb": 5, "all_answered_s": 1.0}
        | {"all_answered": True}
        for i in (3.0, 1.0, 2.0)
    ]
    summary = rss.summarise(runs)
    assert summary["a"]["idle_mb"] == {"median": 2.0, "min": 1.0, "max": 3.0}
    assert summary["a"]["peak_mb"] == {"median": 12.0, "min": 11.0, "max": 13.0}
    assert summary["a"]["every_pipeline_answered"] is True


def test_a_short_run_reports_idle_peak_and_the_import_profile(tmp_path: Path) -> None:
    home = yaml.safe_load((ROOT / "examples" / "home.yaml").read_text())
    home["models"] = {"occupancy": home["models"]["occupancy"]}
    home["pipelines"] = {"occupancy_esphome": home["pipelines"]["occupancy_esphome"]}
    config = tmp_path / "one.yaml"
    config.write_text(yaml.safe_dump(home, sort_keys=False))
    out = tmp_path / "results"
    argv = ["--runs", "1", "--config", str(config), "--no-faults", "--families", "esphome_climate"]
    code = rss.main([*argv, "--devices", "1", "--timeout", "60", "--out", str(out)])
    assert code == 0
    [written] = list(out.glob("*-rss.json"))
    result = json.loads(written.read_text())
    assert (out / written.name.replace(".json", ".md")).is_file()
    [run] = result["runs"]
    assert run["all_answered"] and run["answers"]["occupancy_esphome"] > 0
    assert 0 < run["idle_mb"] <= run["peak_mb"]
    assert run["mappings_at_end"] and all(row["rss_mb"] >= 0 for row in run["mappings_at_end"])
    row = result["summary"]["default"]
    assert row["runs"] == 1 and row["every_pipeline_answered"]
    assert row["peak_mb"]["median"] == run["peak_mb"]
    steps = [s["step"] for s in result["profile"]["steps"]]
    for name in ("python", "numpy", "onnxruntime", "pydantic", "yaml", "ssl", "prometheus_client"):
        assert name in steps
    assert "paho.mqtt.client" in steps
    assert "model occupancy (occupancy.fp32.onnx)" in steps
    rss_after = [s["rss_mb"] for s in result["profile"]["steps"]]
    assert rss_after[-1] > rss_after[0]  # loading the daemon costs memory
    text = (out / written.name.replace(".json", ".md")).read_text()
    assert "## Import cost" in text and "| onnxruntime |" in text


def test_the_cpu_arena_is_on_by_default_and_answers_are_the_same_without_it() -> None:
    import numpy as np

    from edge.config import load_config
    from edge.runtime import LoadedModel

    config = load_config(ROOT / "examples" / "home.yaml", "mqtt://127.0.0.1:1")
    assert config.runtime.cpu_mem_arena is True
    no_arena = config.runtime.model_copy(update={"cpu_mem_arena": False})
    for name in ("appliance", "activity"):
        off = LoadedModel(name, config.models[name], no_arena)
        on = LoadedModel(name, config.models[name], config.runtime)
        assert off.session.get_session_options().enable_cpu_mem_arena is False
        assert on.session.get_session_options().enable_cpu_mem_arena is True
        batch = np.random.default_rng(1).normal(size=(5, *off.spec.sample_shape)).astype(np.float32)
        assert np.array_equal(off.run_sync(batch), on.run_sync(batch))
        off.close()
        on.close()
