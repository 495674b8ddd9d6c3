"""Why this prediction (issue 22): occlusion attributions, their config, publishing and HA attributes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge.config import ExplainConfig, ModelConfig, RuntimeConfig, parse_config
from edge.discovery_payloads import BridgeInfo, OutputEntity, SourceDevice, output_components
from edge.explain import ExplainError, explain_batch, plan
from edge.manifest import MANIFEST_KEY, InputSpec, Manifest, OutputSpec
from edge.runtime import LoadedModel
from tests.broker import Mosquitto
from tests.harness import Collector, DaemonThread, Publisher, fast_mqtt, make_config
from tests.onnx_models import regressor

LABELS = ["off", "on"]


def _save(graph: onnx.GraphProto, path: Path, manifest: Manifest) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    entry = model.metadata_props.add()
    entry.key, entry.value = MANIFEST_KEY, manifest.to_json()
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def channel0_snapshot(path: Path) -> Path:
    """x[B,3] -> softmax(x @ W): only feature 0 has weight."""
    w = np.array([[-2.0, 2.0], [0.0, 0.0], [0.0, 0.0]], dtype=np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["l"]),
            helper.make_node("Softmax", ["l"], ["probs"], axis=-1),
        ],
        "c0",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 2])],
        [numpy_helper.from_array(w, "W")],
    )
    manifest = Manifest(
        name="c0",
        task="classification",
        input=InputSpec(name="x", layout="snapshot", features=["a", "b", "c"]),
        output=OutputSpec(name="probs", kind="probabilities"),
        labels=LABELS,
    )
    return _save(graph, path, manifest)


def last_segment_window(path: Path, window: int = 16, tail: int = 4) -> Path:
    """x[B,T,2] -> softmax(mean(x[:, T-tail:, 0]) * W): only channel 0 over the last ``tail`` samples."""
    graph = helper.make_graph(
        [
            helper.make_node("Slice", ["x", "starts", "ends", "axes"], ["s"]),
            helper.make_node("ReduceMean", ["s", "raxes"], ["m"], keepdims=0),
            helper.make_node("MatMul", ["m", "W"], ["l"]),
            helper.make_node("Softmax", ["l"], ["probs"], axis=-1),
        ],
        "tail",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", window, 2])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 2])],
        [
            numpy_helper.from_array(np.array([window - tail, 0], dtype=np.int64), "starts"),
            numpy_helper.from_array(np.array([window, 1], dtype=np.int64), "ends"),
            numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "axes"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "raxes"),
            numpy_helper.from_array(np.array([[-2.0, 2.0]], dtype=np.float32).reshape(1, 2), "W"),
        ],
    )
    manifest = Manifest(
        name="tail",
        task="classification",
        input=InputSpec(name="x", layout="window", features=["power", "noise"], window=window),
        output=OutputSpec(name="probs", kind="probabilities"),
        labels=LABELS,
    )
    return _save(graph, path, manifest)


def _load(path: Path, tmp_path: Path) -> LoadedModel:
    return LoadedModel("m", ModelConfig(path=path), RuntimeConfig())


def test_snapshot_occlusion_puts_the_attribution_on_the_only_used_feature(tmp_path: Path) -> None:
    model = _load(channel0_snapshot(tmp_path / "c0.onnx"), tmp_path)
    p = plan(model.spec, ExplainConfig(), "pipelines.x.output.explain")
    assert p.rows == 3 and p.baseline == "zero"
    x = np.array([1.5, 7.0, -3.0], dtype=np.float32)
    base = model.run_sync(x[None])[0]
    (result,) = explain_batch(model.run_sync, [(p, x, base)], 8)
    assert result["target"] == "on" and result["method"] == "occlusion"
    feats = result["features"]
    assert feats["a"]["share"] == 1.0 and feats["b"]["share"] == 0.0 and feats["c"]["share"] == 0.0
    # the probability of "on" falls from softmax(-3, 3) to 0.5 without feature a
    assert feats["a"]["delta"] == pytest.approx(float(base[1]) - 0.5, abs=1e-5)
    assert explain_batch(model.run_sync, [(p, x, base)], 8) == [result]  # deterministic
    model.close()


def test_window_occlusion_finds_channel_0_and_the_last_segment(tmp_path: Path) -> None:
    model = _load(last_segment_window(tmp_path / "tail.onnx"), tmp_path)
    p = plan(model.spec, ExplainConfig(segments=4), "k")
    assert p.rows == 2 + 4 and p.baseline == "window_mean"
    x = np.zeros((16, 2), dtype=np.float32)
    x[12:, 0] = 3.0  # channel 0 rises in the last quarter
    x[:, 1] = np.linspace(-5, 5, 16)  # channel 1: ignored by the model
    base = model.run_sync(x[None])[0]
    jobs = [(p, x, base), (p, x, base)]  # two answers in one call, chunked at 4 rows
    first, second = explain_batch(model.run_sync, jobs, 4)
    assert first == second
    assert first["channels"]["power"]["share"] == 1.0 and first["channels"]["noise"]["share"] == 0.0
    shares = [s["share"] for s in first["segments"]]
    assert shares == [0.0, 0.0, 0.0, 1.0]
    assert [(s["start"], s["end"]) for s in first["segments"]] == [(0, 4), (4, 8), (8, 12), (12, 16)]
    assert first["segments"][3]["delta"] == pytest.approx(float(base[1]) - 1 / (1 + np.exp(-3.0)), abs=1e-5)
    model.close()


def test_regression_deltas_are_the_value_changes(tmp_path: Path) -> None:
    """y = 1*a + 2*b + 3*c: occluding a feature by 0 changes the value by its weight times it."""
    model = _load(regressor(tmp_path / "reg.onnx", ["a", "b", "c"]), tmp_path)
    p = plan(model.spec, ExplainConfig(), "k")
    x = np.array([2.0, -1.0, 0.5], dtype=np.float32)
    (result,) = explain_batch(model.run_sync, [(p, x, model.run_sync(x[None])[0])], 1)
    assert result["target"] == "value"
    assert [result["features"][f]["delta"] for f in "abc"] == [2.0, -2.0, 1.5]
    assert [result["features"][f]["share"] for f in "abc"] == [0.3636, 0.3636, 0.2727]
    model.close()


def test_explain_config_is_bounded_and_names_the_key(tmp_path: Path) -> None:
    model = _load(last_segment_window(tmp_path / "tail.onnx"), tmp_path)
    with pytest.raises(ExplainError, match=r"pipelines\.p\.output\.explain\.max_rows: .*needs 18"):
        plan(model.spec, ExplainConfig(segments=32, max_rows=17), "pipelines.p.output.explain")
    with pytest.raises(ExplainError, match=r"explain\.baseline: .*no normalisation mean"):
        plan(model.spec, ExplainConfig(baseline="manifest_mean"), "pipelines.p.output.explain")
    model.close()
    base = {"models": {}, "pipelines": {"p": {"model": "m", "source": {"topics": ["a/+"]}}}}
    for bad, key in (({"segments": 33}, "segments"), ({"method": "shap"}, "method"), ({"x": 1}, "x")):
        data = {**base, "pipelines": {"p": {**base["pipelines"]["p"], "output": {"explain": bad}}}}
        with pytest.raises(ValueError, match=rf"pipelines\.p\.output\.explain\.{key}"):
            parse_config(data, "test", tmp_path)


def test_discovery_shows_the_attribution_as_an_attribute() -> None:
    bridge = BridgeInfo(version="0", base_topic="ei")
    device = SourceDevice(id="kitchen")
    entity = OutputEntity(
        pipeline="room", task="classification", state_topic="ei/room/k", labels=tuple(LABELS)
    )
    (plain, *_) = output_components(bridge, device, entity)
    assert "explain" not in plain.config["json_attributes_template"]
    (explained, *_) = output_components(bridge, device, OutputEntity(**{**entity.__dict__, "explain": True}))
    assert "'explain': value_json.get('explain')" in explained.config["json_attributes_template"]
    reg = OutputEntity(pipeline="p", task="regression", state_topic="ei/p/k", unit="W", explain=True)
    (main, *_) = output_components(bridge, device, reg)
    assert main.config["json_attributes_topic"] == "ei/p/k"
    assert "explain" in main.config["json_attributes_template"]


@pytest.mark.broker
def test_daemon_publishes_explain_only_where_configured(
    mosquitto: Mosquitto, topic_prefix: str, tmp_path: Path
) -> None:
    path = channel0_snapshot(tmp_path / "c0.onnx")
    p = topic_prefix
    pipes: dict[str, Any] = {
        name: {
            "model": "m",
            "source": {"topics": [f"{p}/z2m/{{device}}"]},
            "features": {"type": "snapshot", "max_age_s": 60},
            "output": {"publish": "always", **extra},
        }
        for name, extra in (("why", {"explain": {"method": "occlusion"}}), ("plain", {}))
    }
    data = {
        "mqtt": fast_mqtt(mosquitto.url, p),
        "models": {"m": {"path": str(path)}},
        "pipelines": pipes,
        "homeassistant": {"discovery_prefix": f"{p}/ha", "status_topic": f"{p}/ha/status", "instance_id": p},
    }
    out = Collector(mosquitto.url, f"{p}/ei/#", f"{p}/ha/device/+/config")
    pub = Publisher(mosquitto.url)
    with DaemonThread(make_config(data, tmp_path)):
        pub.send(f"{p}/z2m/k", {"a": 1.5, "b": 7.0, "c": -3.0})
        out.wait_count(f"{p}/ei/why/k", 1)
        out.wait_count(f"{p}/ei/plain/k", 1)
        out.wait(lambda ms: any(m.topic.startswith(f"{p}/ha/device/") and m.payload for m in ms))
    pub.close()
    out.close()
    why = out.on(f"{p}/ei/why/k")[0].json()
    plain = out.on(f"{p}/ei/plain/k")[0].json()
    assert "explain" not in plain
    assert why["explain"]["target"] == "on" and why["explain"]["features"]["a"]["share"] == 1.0
    assert why["label"] == plain["label"] == "on"
    configs = [m.json() for m in out.messages if m.topic.startswith(f"{p}/ha/device/") and m.payload]
    templates = {
        key: c["json_attributes_template"]
        for cfg in configs
        for key, c in cfg["cmps"].items()
        if "json_attributes_template" in c and not key.endswith(("_confidence", "_ood"))
    }
    assert any("why" in k and "explain" in t for k, t in templates.items()), templates
    assert any("plain" in k and "explain" not in t for k, t in templates.items()), templates
