"""Open set in the daemon: a classifier exported with an OOD score answers ``unknown`` for inputs
unlike its training data (edge/runtime.py reads the score and the manifest's threshold,
edge/outputs.py publishes, edge/discovery_payloads.py adds the enum state); one without behaves as before.

The model is a real export: a small nearest-centroid classifier made with onnx.helper (names as
the exporter writes them), given its ``ood_score`` output and threshold by ``exporters.ood``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge.config import ModelConfig, OutputConfig, RuntimeConfig
from edge.discovery_payloads import BridgeInfo, OutputEntity, SourceDevice, output_components
from edge.manifest import MANIFEST_KEY, InputSpec, Manifest, OutputSpec
from edge.outputs import UNKNOWN_LABEL, PostProcessor
from edge.runtime import LoadedModel, ModelLoadError
from exporters.ood import OOD_OUTPUT, add_ood_to_file
from tests.broker import Mosquitto
from tests.harness import Collector, DaemonThread, Publisher, fast_mqtt, make_config

FEATURES = ["temperature", "humidity", "co2"]
LABELS = ["empty", "one", "many"]
# class centres in raw units and the spread of each feature
CENTRES = np.array([[19.0, 40.0, 450.0], [21.0, 50.0, 800.0], [23.0, 60.0, 1400.0]], np.float32)
SPREAD = np.array([0.5, 2.0, 40.0], np.float32)
KNOWN = CENTRES[1]  # squarely "one"
UNLIKE = np.array([35.0, 5.0, 3000.0], np.float32)  # like nothing the model saw


def _samples(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % len(LABELS)
    x = CENTRES[y] + rng.normal(size=(n, len(FEATURES))).astype(np.float32) * SPREAD
    return x.astype(np.float32), y


def _classifier(path: Path) -> Path:
    """input[B,3] -> softmax(z @ W + b), z = input / SPREAD: nearest centroid in z-units."""
    c = CENTRES / SPREAD
    w = c.T.astype(np.float32)
    b = (-0.5 * (c**2).sum(axis=1)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Div", ["input", "spread"], ["z"]),
            helper.make_node("MatMul", ["z", "W"], ["zw"]),
            helper.make_node("Add", ["zw", "b"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
        ],
        "room",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", len(FEATURES)])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", len(LABELS)])],
        [
            numpy_helper.from_array(SPREAD, "spread"),
            numpy_helper.from_array(w, "W"),
            numpy_helper.from_array(b, "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    manifest = Manifest(
        name="room",
        version="1.0.0",
        task="classification",
        input=InputSpec(name="input", layout="snapshot", features=FEATURES),
        output=OutputSpec(name="probabilities", kind="probabilities"),
        labels=LABELS,
    )
    entry = model.metadata_props.add()
    entry.key = MANIFEST_KEY
    entry.value = manifest.to_json()
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, Any]]:
    """(plain classifier, the same with the OOD output, its manifest record)."""
    out = tmp_path_factory.mktemp("open_set")
    plain = _classifier(out / "room.onnx")
    x_train, y_train = _samples(300, 0)
    x_val, _ = _samples(60, 1)
    record = add_ood_to_file(
        plain,
        out / "room.ood.onnx",
        x_val,
        "60 held-out rows",
        score="feature_distance",
        train=(x_train, y_train),
    )
    return plain, out / "room.ood.onnx", record


def _load(path: Path) -> LoadedModel:
    return LoadedModel("room", ModelConfig(path=path), RuntimeConfig())


def test_runtime_reads_the_ood_output_and_threshold(models: tuple[Path, Path, dict[str, Any]]) -> None:
    plain, ood, record = models
    with_ood = _load(ood)
    assert with_ood.spec.ood_output == OOD_OUTPUT
    assert with_ood.spec.ood_threshold == pytest.approx(record["threshold"])
    raw = with_ood.run_sync(np.stack([KNOWN, UNLIKE]))
    assert raw.shape == (2, len(LABELS) + 1)  # probabilities, then the score
    assert raw[0, -1] <= record["threshold"] < raw[1, -1]
    without = _load(plain)
    assert without.spec.ood_output is None and without.spec.ood_threshold is None
    assert without.run_sync(np.stack([KNOWN, UNLIKE])).shape == (2, len(LABELS))
    # the probabilities are the plain model's
    np.testing.assert_array_equal(raw[:, :-1], without.run_sync(np.stack([KNOWN, UNLIKE])))
    with_ood.close()
    without.close()


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"output": "nope", "threshold": 1.0}, "provenance.ood.output 'nope' is not among"),
        ({"output": OOD_OUTPUT, "threshold": "high"}, "provenance.ood.threshold 'high' is not a finite"),
        ({"output": OOD_OUTPUT, "threshold": float("nan")}, "is not a finite number"),
    ],
)
def test_a_bad_ood_record_is_a_clear_load_error(
    models: tuple[Path, Path, dict[str, Any]], tmp_path: Path, record: dict[str, Any], message: str
) -> None:
    _, ood, _ = models
    model = onnx.load(str(ood))
    entry = next(e for e in model.metadata_props if e.key == MANIFEST_KEY)
    manifest = json.loads(entry.value)
    manifest["provenance"]["ood"] = record
    entry.value = json.dumps(manifest)
    onnx.save(model, str(tmp_path / "bad.onnx"))
    with pytest.raises(ModelLoadError, match=message):
        _load(tmp_path / "bad.onnx")


def test_unknown_answer_json_is_exact(models: tuple[Path, Path, dict[str, Any]]) -> None:
    """The prepared-pieces answer of an open-set row is byte for byte json.dumps of its fields."""
    _, ood, record = models
    loaded = _load(ood)
    post = PostProcessor(loaded.spec, OutputConfig(top_k=2))
    raw = loaded.run_sync(np.stack([KNOWN, UNLIKE]))
    known, unlike = post(raw)
    assert known.fields["label"] == "one" and known.key == "one"
    assert unlike.fields["label"] == UNKNOWN_LABEL and unlike.key == UNKNOWN_LABEL
    assert unlike.fields["ood_score"] == pytest.approx(float(raw[1, -1]), abs=1e-4)
    assert unlike.fields["ood_score"] > record["threshold"] >= known.fields["ood_score"]
    for prediction in (known, unlike):
        assert prediction.head is not None  # the fast path, not the json.dumps fallback
        body = {
            **prediction.fields,
            "model": "room",
            "model_version": "1.0.0",
            "latency_ms": 1.5,
            "ts": "2023-11-14T22:13:20.000Z",
        }
        assert post.answer(prediction, 1.5, 1_700_000_000.0) == json.dumps(body).encode()
    loaded.close()


def test_discovery_adds_unknown_state_and_score_attribute() -> None:
    bridge = BridgeInfo(version="0", base_topic="ei")
    device = SourceDevice(id="kitchen")
    entity = OutputEntity(
        pipeline="room", task="classification", state_topic="ei/room/kitchen", labels=tuple(LABELS)
    )
    (plain, *_) = output_components(bridge, device, entity)
    assert plain.config["options"] == LABELS
    assert "ood_score" not in plain.config["json_attributes_template"]  # label, model, version only
    (open_set, *_) = output_components(bridge, device, OutputEntity(**{**entity.__dict__, "open_set": True}))
    assert open_set.config["options"] == [*LABELS, UNKNOWN_LABEL]
    assert open_set.config["json_attributes_topic"] == "ei/room/kitchen"
    assert "ood_score" in open_set.config["json_attributes_template"]


@pytest.mark.broker
def test_daemon_publishes_unknown_for_unlike_input(
    mosquitto: Mosquitto, topic_prefix: str, models: tuple[Path, Path, dict[str, Any]], tmp_path: Path
) -> None:
    """Real broker: known-like -> a class, unlike -> ``unknown`` with its score; the same weights
    without the OOD output answer as before; Home Assistant gets ``unknown`` as an enum option."""
    plain, ood, record = models
    p = topic_prefix
    data = {
        "mqtt": fast_mqtt(mosquitto.url, p),
        "models": {"open": {"path": str(ood)}, "closed": {"path": str(plain)}},
        "pipelines": {
            name: {
                "model": name,
                "source": {"topics": [f"{p}/z2m/{{device}}"]},
                "features": {"type": "snapshot", "max_age_s": 60},
                "output": {"publish": "always"},
            }
            for name in ("open", "closed")
        },
        "homeassistant": {
            "discovery_prefix": f"{p}/ha",
            "status_topic": f"{p}/ha/status",
            "instance_id": p,
        },
    }
    out = Collector(mosquitto.url, f"{p}/ei/#", f"{p}/ha/device/+/config")
    pub = Publisher(mosquitto.url)
    with DaemonThread(make_config(data, tmp_path)):
        pub.send(f"{p}/z2m/known", dict(zip(FEATURES, KNOWN.tolist(), strict=True)))
        pub.send(f"{p}/z2m/unlike", dict(zip(FEATURES, UNLIKE.tolist(), strict=True)))
        for pipeline in ("open", "closed"):
            for device in ("known", "unlike"):
                out.wait_count(f"{p}/ei/{pipeline}/{device}", 1)

        def announced(_: list[Any]) -> bool:
            return any(
                m.topic.startswith(f"{p}/ha/device/") and m.payload and "unlike" in m.payload.decode()
                for m in out.messages
            )

        out.wait(announced)
    answers = {
        (pipeline, device): out.on(f"{p}/ei/{pipeline}/{device}")[0].json()
        for pipeline in ("open", "closed")
        for device in ("known", "unlike")
    }
    assert answers["open", "known"]["label"] == "one"
    assert answers["open", "known"]["ood_score"] <= record["threshold"]
    assert answers["open", "unlike"]["label"] == UNKNOWN_LABEL
    assert answers["open", "unlike"]["ood_score"] > record["threshold"]
    # the closed-set file: a confident class for the unlike input too, no OOD fields (as before)
    assert answers["closed", "known"]["label"] == "one"
    assert answers["closed", "unlike"]["label"] in LABELS
    assert "ood_score" not in answers["closed", "unlike"]
    assert answers["open", "unlike"]["confidence"] == answers["closed", "unlike"]["confidence"]
    configs = [m.json() for m in out.messages if m.topic.startswith(f"{p}/ha/device/") and m.payload]
    unlike = next(c for c in configs if c["dev"].get("name") == "unlike")
    by_pipeline = {
        c["state_topic"].split("/")[-2]: c for c in unlike["cmps"].values() if c.get("device_class") == "enum"
    }
    readable = [label.capitalize() for label in LABELS]  # the state names HA shows (issue 16)
    assert by_pipeline["open"]["options"] == [*readable, UNKNOWN_LABEL]
    assert by_pipeline["closed"]["options"] == readable
    out.close()
    pub.close()
