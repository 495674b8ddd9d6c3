"""Unit tests of the pure logic: config errors, topic patterns, decoding, features, post-processing."""

from __future__ import annotations

import copy
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge.config import Config, ConfigError, OutputConfig, config_warnings, load_config, parse_config
from edge.decode import DecodeError, RuleDecoder, TopicPattern, compile_path, json_rules, sanitise_segment
from edge.features import FeatureStore, SlidingWindow, SnapshotJoin
from edge.outputs import Prediction, PublishPolicy
from edge.runtime import resolve_providers
from tests.harness import run_cli, write_config
from tests.onnx_models import snapshot_classifier, window_classifier

VALID: dict[str, Any] = {
    "mqtt": {"url": "mqtt://127.0.0.1:1883"},
    "models": {"m": {"path": "m.onnx"}, "w": {"path": "w.onnx"}},
    "pipelines": {
        "p": {"model": "m", "source": {"topics": ["z2m/{device}"]}},
        "win": {
            "model": "w",
            "source": {"topics": ["tele/{device}/SENSOR"]},
            "inputs": {"power": "ENERGY.Power"},
            "features": {"type": "window", "size": 4},
        },
    },
}


def with_change(path: str, value: Any) -> dict[str, Any]:
    data = copy.deepcopy(VALID)
    node = data
    keys = path.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    if value is _DELETE:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return data


_DELETE = object()

BROKEN = [
    ("mqtt.url", "http://x", "mqtt.url"),
    ("mqtt.url", "mqtt://:1883", "mqtt.url"),
    ("mqtt.kepalive", 5, "mqtt.kepalive"),
    ("mqtt.keepalive", 1, "mqtt.keepalive"),
    ("mqtt.protocol", "4", "mqtt.protocol"),
    ("mqtt.base_topic", "a/#", "mqtt.base_topic"),
    ("mqtt.password_env", "X", None),  # fine alone...
    ("models.m.path", _DELETE, "models.m.path"),
    ("models.m.max_batch", 0, "models.m.max_batch"),
    ("models.m.sha256", "abc", "models.m.sha256"),
    ("pipelines.p.model", "nope", "pipelines.p.model"),
    ("pipelines.p.source.topics", ["a/b+/c"], "pipelines.p.source.topics"),
    ("pipelines.p.source.qos", 3, "pipelines.p.source.qos"),
    ("pipelines.p.features", {"type": "window", "hop": 0}, "pipelines.p.features.hop"),
    ("pipelines.p.features", {"type": "sliding"}, "pipelines.p.features"),
    ("pipelines.p.output.topic", "out/#", "pipelines.p.output.topic"),
    ("pipelines.p.output.topic", "out/{devise}", "pipelines.p.output.topic"),
    ("pipelines.p.output.min_confidence", 2, "pipelines.p.output.min_confidence"),
    ("pipelines.p.sources", {}, "pipelines.p.sources"),
    ("pipelines", {}, "pipelines"),
]


@pytest.mark.parametrize(("path", "value", "key"), BROKEN)
def test_config_errors_name_the_key(path: str, value: Any, key: str | None) -> None:
    data = with_change(path, value)
    if key is None:
        parse_config(data)
        return
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert info.value.key == key, str(info.value)
    assert str(info.value).startswith(f"config: {key}:")


def test_password_sources_are_exclusive_and_secret(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="give only one of password, password_env"):
        parse_config(with_change("mqtt", {"password": "a", "password_env": "B"}))
    config = parse_config(with_change("mqtt", {"password": "hunter2", "username": "u"}))
    assert "hunter2" not in repr(config) and "hunter2" not in str(config.model_dump())
    assert config.mqtt.resolved_password() == "hunter2"
    os.environ["EI_TEST_PW"] = "from-env"
    assert (
        parse_config(with_change("mqtt", {"password_env": "EI_TEST_PW"})).mqtt.resolved_password()
        == "from-env"
    )
    with pytest.raises(ConfigError, match=r"mqtt\.password_env"):
        parse_config(with_change("mqtt", {"password_env": "EI_TEST_UNSET_PW"})).mqtt.resolved_password()


def test_config_warnings(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("x\n")
    pw.chmod(0o644)
    cfg = parse_config(
        with_change("mqtt", {"url": "mqtt://broker.lan:1883", "username": "u", "password_file": str(pw)})
    )
    warnings = config_warnings(cfg)
    assert any(w.startswith("mqtt.url: credentials will cross the network") for w in warnings)
    assert any(w.startswith("mqtt.password_file:") and "chmod 600" in w for w in warnings)
    pw.chmod(0o600)
    local = parse_config(with_change("mqtt", {"url": "mqtt://127.0.0.1", "password_file": str(pw)}))
    assert config_warnings(local) == []


def test_url_override_and_yaml_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_config(VALID, tmp_path / "c.yaml")
    monkeypatch.setenv("EDGE_INFER_MQTT_URL", "mqtts://env.example:8884")
    assert load_config(path).mqtt.port == 8884
    assert load_config(path, "mqtt://arg:1999").mqtt.host == "arg"
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: {m: {path: x}\npipelines: [")
    with pytest.raises(ConfigError, match=r"not valid YAML at line"):
        load_config(bad)
    assert (load_config(path).models["m"].path) == tmp_path / "m.onnx"


def test_check_cli_names_keys_for_model_mismatches(tmp_path: Path) -> None:
    snapshot_classifier(tmp_path / "m.onnx", ["temperature", "humidity"], ["a", "b"])
    window_classifier(tmp_path / "w.onnx", ["power"], 4, ["x", "y"])
    ok = run_cli("check", "-c", str(write_config(VALID, tmp_path / "ok.yaml")))
    assert ok.returncode == 0, ok.stderr
    cases = {
        "size": (
            with_change("pipelines.win.features", {"type": "window", "size": 8}),
            "pipelines.win.features.size is 8 but model 'w' takes windows of 4 samples",
        ),
        "inputs": (with_change("pipelines.p.inputs", {"temp": "t"}), "pipelines.p.inputs names ['temp']"),
        "type": (
            with_change("pipelines.p.features", {"type": "window"}),
            "pipelines.p.features.type is window but model 'm' takes a snapshot of shape [batch, 2]",
        ),
        "missing": (with_change("models.m.path", "nope.onnx"), "models.m.path"),
        "typo": (with_change("pipelines.p.outptu", {}), "pipelines.p.outptu: unknown key"),
    }
    for name, (data, expected) in cases.items():
        result = run_cli("check", "-c", str(write_config(data, tmp_path / f"{name}.yaml")))
        assert result.returncode == 2, (name, result.stdout)
        assert expected in result.stderr, (name, result.stderr)
    corrupt = tmp_path / "m.onnx"
    corrupt.write_bytes(b"not a model")
    result = run_cli("check", "-c", str(tmp_path / "ok.yaml"))
    assert result.returncode == 2 and "model 'm': ONNX Runtime cannot load" in result.stderr


def test_a_model_without_manifest_needs_its_task_named(tmp_path: Path) -> None:
    """No manifest and no models.<name>.task: refused naming the key (was: served as a regression,
    publishing a classifier's first probability as a value)."""
    snapshot_classifier(tmp_path / "m.onnx", ["temperature", "humidity"], ["a", "b"], with_manifest=False)
    window_classifier(tmp_path / "w.onnx", ["power"], 4, ["x", "y"])
    data = with_change("models.m", {"path": "m.onnx", "features": ["temperature", "humidity"]})
    result = run_cli("check", "-c", str(write_config(data, tmp_path / "bare.yaml")))
    assert result.returncode == 2, result.stdout
    assert "has no edge-infer manifest: say what it predicts in models.m.task" in result.stderr
    data["models"]["m"].update(task="classification", labels=["a", "b"])
    named = run_cli("check", "-c", str(write_config(data, tmp_path / "named.yaml")))
    assert named.returncode == 0, named.stderr
    assert "classification" in named.stdout


def test_topic_patterns() -> None:
    pattern = TopicPattern("tele/{device}/SENSOR")
    assert pattern.filter == "tele/+/SENSOR"
    assert pattern.match("tele/plug 1/SENSOR") == {"device": "plug 1"}
    assert pattern.match("tele/a/b/SENSOR") is None
    assert pattern.match("tele/a/STATE") is None
    multi = TopicPattern("z2m/{device}/#")
    assert multi.filter == "z2m/+/#" and multi.match("z2m/x/a/b") == {"device": "x"}
    for bad in ["a/#/b", "a/b+", "a/{x", ""]:
        with pytest.raises(ValueError, match=r"topic pattern|segment|must"):
            TopicPattern(bad)


def test_field_paths_and_sanitising() -> None:
    data = {"ENERGY": {"Power": 5}, "list": [{"v": 1}, {"v": 2}], "a.b": 3}
    assert compile_path("ENERGY.Power")(data) == 5
    assert compile_path("list[1].v")(data) == 2
    assert compile_path('["a.b"]')(data) == 3
    with pytest.raises(KeyError):
        compile_path("ENERGY.Voltage")(data)
    # Safe ids are their own segment; others are sanitised plus '~' and a hash of the original.
    assert sanitise_segment("kitchen_plug") == "kitchen_plug"
    assert re.fullmatch(r"a_b~[0-9a-f]{8}", sanitise_segment("a/b"))
    assert re.fullmatch(r"_~[0-9a-f]{8}", sanitise_segment("+"))
    assert re.fullmatch(r"_SYS~[0-9a-f]{8}", sanitise_segment("$SYS"))
    assert re.fullmatch(r"_?~[0-9a-f]{8}", sanitise_segment(""))
    assert re.fullmatch(r"x_y_?~[0-9a-f]{8}", sanitise_segment("x\x00y\n"))
    # Distinct ids never share a segment, also an id crafted to look like a mapped one.
    ids = ["kitchen_plug", "kitchen/plug", "kitchen+plug", "kitchen#plug", " kitchen_plug"]
    ids.append(sanitise_segment("kitchen/plug"))
    segments = [sanitise_segment(i) for i in ids]
    assert len(set(segments)) == len(ids), segments
    assert all(len(sanitise_segment(i * 300)) <= 128 for i in ids)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{", "malformed_json"),
        (b"\xff\xfe", "malformed_json"),
        (b'{"ENERGY": {}}', "missing_field"),
        (b'{"ENERGY": {"Power": "x"}}', "non_numeric"),
        (b'{"ENERGY": {"Power": [1]}}', "non_numeric"),
        (b'{"ENERGY": {"Power": NaN}}', "not_finite"),
        (b'{"ENERGY": {"Power": "inf"}}', "not_finite"),
        (b'{"ENERGY": {"Power": 1}, "Time": "yesterday"}', "bad_timestamp"),
        (b"[1, 2]", "missing_field"),
    ],
)
def test_decode_rejections(payload: bytes, reason: str) -> None:
    decoder = RuleDecoder(
        json_rules(["tele/{device}/SENSOR"], {"power": "ENERGY.Power"}, timestamp_path="Time")
    )
    with pytest.raises(DecodeError) as info:
        decoder.decode("tele/p/SENSOR", payload)
    assert info.value.reason == reason
    assert "tele/p/SENSOR" in info.value.detail


def test_decode_plain_availability_and_device_field() -> None:
    plain = RuleDecoder(
        json_rules(
            ["esphome/{device}/sensor/{reading}/state"],
            {"t": "t", "h": "h"},
            payload_format="plain",
            availability_topic="esphome/{device}/status",
        )
    )
    [event] = plain.decode("esphome/node1/sensor/t/state", b"21.5")
    assert event.device == "node1" and event.values == {"t": 21.5}  # type: ignore[union-attr]
    [avail] = plain.decode("esphome/node1/status", b"offline")
    assert avail.device == "node1" and avail.online is False  # type: ignore[union-attr]
    by_field = RuleDecoder(json_rules(["home/sensors"], {"t": "temp"}, device_path="id"))
    [event] = by_field.decode("home/sensors", b'{"id": "kitchen", "temp": "20.5", "ts": 1}')
    assert event.device == "kitchen" and event.values == {"t": 20.5}  # type: ignore[union-attr]
    with pytest.raises(DecodeError, match="bad_device_id"):
        by_field.decode("home/sensors", b'{"id": {"x": 1}, "temp": 1}')


def test_snapshot_join_waits_for_all_readings_and_expires() -> None:
    join = SnapshotJoin(["t", "h"], max_age_s=10)
    assert join.update({"t": 20.0}, 100.0) is None
    assert join.missing() == ["h"]
    vector = join.update({"h": 50.0}, 101.0)
    assert vector is not None and vector.tolist() == [20.0, 50.0]
    with pytest.raises(DecodeError, match="stale"):
        join.update({"h": 51.0}, 120.0)
    with pytest.raises(DecodeError, match="out_of_order"):
        join.update({"t": 1.0}, 50.0)
    assert join.update({"t": 21.0}, 121.0) is not None


def test_sliding_window_hop_join_and_order() -> None:
    window = SlidingWindow(["a", "b"], size=3, hop=2)
    outputs = []
    for i in range(7):
        assert window.update({"a": float(i)}, float(i)) is None  # b not yet: sample incomplete
        out = window.update({"b": float(-i)}, float(i) + 0.5)
        outputs.append(None if out is None else out[:, 0].tolist())
    assert outputs == [None, None, [0.0, 1.0, 2.0], None, [2.0, 3.0, 4.0], None, [4.0, 5.0, 6.0]]


def test_sliding_window_resamples_and_restarts_after_gap() -> None:
    window = SlidingWindow(["p"], size=4, period_s=10.0, max_gap_s=60.0)
    results = []
    for ts, value in [(0, 1.0), (4, 2.0), (10, 3.0), (25, 4.0), (31, 5.0)]:
        out = window.update({"p": value}, float(ts))
        results.append(None if out is None else out[:, 0].tolist())
    # Ticks at 0, 10, 20, 30 hold the value last seen before each tick.
    assert results[-1] == [1.0, 2.0, 3.0, 4.0]
    assert window.update({"p": 9.0}, 200.0) is None  # a gap of 169 s > 60: the window restarts
    assert window.count == 1


def test_feature_store_limits_and_isolation() -> None:
    store = FeatureStore(lambda: SlidingWindow(["p"], size=2), max_devices=2)
    store.update("a", {"p": 1.0}, 0.0)
    store.update("b", {"p": 100.0}, 0.0)
    out = store.update("a", {"p": 2.0}, 1.0)
    assert out is not None and out[:, 0].tolist() == [1.0, 2.0]
    with pytest.raises(DecodeError, match="unknown_device"):
        store.update("c", {"p": 1.0}, 0.0)
    allow = FeatureStore(lambda: SnapshotJoin(["p"], 5), max_devices=5, allowed=["x"])
    with pytest.raises(DecodeError, match="not in the pipeline's devices list"):
        allow.update("y", {"p": 1.0}, 0.0)


def _pred(key: Any, numeric: float | None = None) -> Prediction:
    return Prediction({"label": key}, key, numeric)


def test_publish_policy_on_change_debounce_interval_heartbeat() -> None:
    policy = PublishPolicy(OutputConfig(publish="on_change", debounce=2, heartbeat_s=100))
    seq = ["a", "a", "b", "a", "b", "b", "b"]
    sent = [policy.should_publish("d", _pred(k), float(i)) for i, k in enumerate(seq)]
    assert sent == [True, False, False, False, False, True, False]
    assert policy.should_publish("d", _pred("b"), 200.0)  # heartbeat
    rate = PublishPolicy(OutputConfig(min_interval_s=5))
    assert [rate.should_publish("d", _pred(i), float(i)) for i in range(11)] == [
        i % 5 == 0 for i in range(11)
    ]
    delta = PublishPolicy(OutputConfig(publish="on_change", change_delta=1.0))
    values = [10.0, 10.5, 11.2, 11.0]
    assert [delta.should_publish("d", _pred(v, v), float(i)) for i, v in enumerate(values)] == [
        True,
        False,
        True,
        False,
    ]


def test_provider_fallback() -> None:
    chosen, notes = resolve_providers("auto", ["CPUExecutionProvider"])
    assert chosen == ["CPUExecutionProvider"] and len(notes) == 2
    chosen, notes = resolve_providers(["cuda", "cpu"], ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert chosen == ["CUDAExecutionProvider", "CPUExecutionProvider"] and notes == []
    chosen, notes = resolve_providers(["tensorrt"], ["CPUExecutionProvider"])
    assert chosen == ["CPUExecutionProvider"] and "falling back" in notes[0]


def test_parse_config_accepts_valid() -> None:
    config = parse_config(VALID)
    assert isinstance(config, Config)
    assert config.mqtt.port == 1883 and not math.isnan(config.pipelines["p"].features.max_age_s)  # type: ignore[union-attr]
    assert np.isclose(config.models["m"].max_delay_ms, 2.0)


def test_configuration_reference_is_in_sync_with_the_models() -> None:
    from edge.configdoc import main

    assert main([]) == 0, "run: python -m edge.configdoc --write"


def test_models_show_prints_manifest_and_refuses_broken_files(tmp_path: Path) -> None:
    path = window_classifier(tmp_path / "w.onnx", ["power"], 4, ["x", "y"])
    result = run_cli("models", "show", str(path), "--json")
    assert result.returncode == 0, result.stderr
    info = __import__("json").loads(result.stdout)
    assert info["manifest"]["input"]["window"] == 4 and info["inputs"][0]["shape"] == ["batch", 4, 1]
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x00garbage")
    result = run_cli("models", "show", str(broken))
    assert result.returncode == 2 and "cannot load" in result.stderr
