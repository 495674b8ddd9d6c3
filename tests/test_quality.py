"""edge/quality.py: the quality record (learn's sidecar, the zoo's reports recomputed from the
committed test splits with ONNX Runtime), the book the daemon keeps, and the bridge's quality
entities; against a real Mosquitto a daemon that publishes the confusion matrix as a retained PNG
and again after its model file is replaced."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edge.learn import deploy
from edge.learn.gate import onnx_predict
from edge.quality import (
    QualityBook,
    QualityError,
    QualityRecord,
    confusion_counts,
    confusion_topic,
    learn_record,
    load_record,
    parse_record,
    quality_components,
    read_sidecar,
    sidecar_path,
    write_sidecar,
    zoo_record,
)
from edge.runtime import file_sha256

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"


def a_record(sha: str | None = None, labels: tuple[str, ...] = ("off", "fridge", "kettle")) -> QualityRecord:
    truth = ["off"] * 5 + ["fridge"] * 4 + ["kettle"] * 3
    predicted = ["off"] * 4 + ["kettle"] + ["fridge"] * 4 + ["kettle", "kettle", "off"]
    return learn_record(
        metric="macro_f1",
        scores={"accuracy": 0.75, "macro_f1": 0.74, "n": 12, "per_class": {}},
        truth=truth,
        predicted=predicted,
        classes=list(labels),
        train_counts={"off": 50, "fridge": 40, "kettle": 30},
        span={"start": "2026-11-01T00:00:00Z", "end": "2026-11-05T00:00:00+00:00"},
        model_sha256=sha,
        trained_at=1_796_000_000.0,
    )


def test_learns_record_round_trips_through_its_sidecar(tmp_path: Path) -> None:
    record = a_record("ab" * 32)
    assert record.confusion is not None
    assert record.confusion.counts == ((4, 0, 1), (0, 4, 0), (1, 0, 2))  # rows true, columns predicted
    assert record.confusion.n == record.n == 12
    assert (record.metric, record.value, record.examples) == ("macro_f1", 0.74, 120)
    assert record.span == {"start": "2026-11-01T00:00:00Z", "end": "2026-11-05T00:00:00Z"}
    path = write_sidecar(tmp_path / "m.onnx.quality.json", record)
    assert read_sidecar(path) == record
    info = record.info()
    assert info["examples_per_class"] == {"off": 50, "fridge": 40, "kettle": 30}
    assert info["metric"] == {"name": "macro_f1", "value": 0.74, "n": 12}
    assert info["trained_at"] == "2026-11-30T00:53:20Z" and info["confusion"] is True


@pytest.mark.parametrize(
    ("patch", "key"),
    [
        ({"format": 9}, "format"),
        ({"metric": {"name": "vibes", "value": 1}}, "metric.name"),
        ({"metric": {"name": "accuracy", "value": "high"}}, "metric.value"),
        ({"examples_per_class": {"off": -1}}, "examples_per_class.off"),
        ({"confusion": {"labels": ["a", "b"], "counts": [[1, 2]]}}, "confusion.counts"),
        ({"confusion": {"labels": ["a"], "counts": [[1.5]]}}, "confusion.counts[0]"),
        ({"trained_at": "yesterday"}, "trained_at"),
        ({"trained_at": "2026-11-01T00:00:00"}, "trained_at"),
        ({"model_sha256": "nope"}, "model_sha256"),
    ],
)
def test_a_bad_record_is_refused_naming_the_file_and_key(patch: dict[str, object], key: str) -> None:
    data = {**a_record().to_json(), **patch}
    import re

    with pytest.raises(QualityError, match=re.escape(f"m.quality.json.{key}:")):
        parse_record(data, "m.quality.json")


def test_a_sidecar_that_describes_another_file_is_not_used(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"model")
    write_sidecar(sidecar_path(model), a_record("cd" * 32))
    with pytest.raises(QualityError, match="describes the model with sha256 cdcdcd"):
        load_record(model, file_sha256(model))
    write_sidecar(sidecar_path(model), a_record(file_sha256(model)))
    assert load_record(model, file_sha256(model)) is not None
    sidecar_path(model).write_text("{not json")
    with pytest.raises(QualityError, match="not JSON"):
        load_record(model, None)
    sidecar_path(model).unlink()
    assert load_record(model, None) is None  # nothing known: no record, not an error


@pytest.mark.parametrize("name", ["activity", "appliance", "occupancy"])
@pytest.mark.parametrize("variant", ["fp32", "int8"])
def test_the_zoo_record_is_what_onnx_runtime_gives_on_the_committed_test_split(
    name: str, variant: str
) -> None:
    model = MODELS / name / f"{name}.{variant}.onnx"
    record = zoo_record(model)
    assert record is not None and record.source == "zoo" and record.confusion is not None
    assert record.model_sha256 == file_sha256(model)  # the report describes this very file
    split = np.load(MODELS / name / "test_split.npz")
    truth = [str(split["labels"][i]) for i in split["y"]]
    predicted = onnx_predict(model, split["x"])
    recomputed = confusion_counts(truth, predicted, list(record.confusion.labels))
    assert recomputed == record.confusion
    assert record.n == len(truth)
    accuracy = sum(t == p for t, p in zip(truth, predicted, strict=True)) / len(truth)
    assert record.metric == "accuracy" and record.value == pytest.approx(accuracy)
    assert record.examples_per_class is None  # the zoo's reports give no per-class training counts
    assert record.trained_at is not None and record.trained_at.endswith("Z")


def test_zoo_models_without_holdout_figures_have_no_record_and_other_files_none() -> None:
    assert zoo_record(MODELS / "fridge_anomaly" / "fridge_anomaly.fp32.onnx") is None
    open_set = zoo_record(MODELS / "appliance_open_set" / "appliance_open_set.fp32.onnx")
    assert open_set is not None and open_set.confusion is None and open_set.value == 0.8125
    assert zoo_record(ROOT / "tests" / "nothing.onnx") is None


def test_the_book_renders_once_per_model_file_and_names_what_changed(tmp_path: Path) -> None:
    from edge.png import render_confusion

    model = tmp_path / "m.onnx"
    model.write_bytes(b"one")
    write_sidecar(sidecar_path(model), a_record(file_sha256(model)))
    book = QualityBook()
    assert book.refresh({"m": (model, file_sha256(model))}) == ["m"]
    png = book.png("m")
    record = book.record("m")
    assert record is not None and record.confusion is not None
    assert png == render_confusion(record.confusion.labels, record.confusion.counts, "m holdout (n=12)")
    assert book.refresh({"m": (model, file_sha256(model))}) == []  # the same file: nothing new
    assert book.images() == {"m": True}
    model.write_bytes(b"two")  # replaced beside a record of the old file: refused, counted
    assert book.refresh({"m": (model, file_sha256(model))}) == ["m"]
    assert book.png("m") is None and book.errors == 1
    assert book.info("m") == {"examples_per_class": None, "trained_at": None, "metric": None}
    assert book.refresh({}) == []


def test_the_quality_entities_read_bridge_info_and_the_image_its_own_topic() -> None:
    cmps = quality_components("edge_infer_default", "edge_infer", "ei/bridge/info", "appliance", image=True)
    assert set(cmps) == {"model_appliance_examples", "model_appliance_trained", "model_appliance_confusion"}
    image = cmps["model_appliance_confusion"]
    assert image["platform"] == "image" and image["content_type"] == "image/png"
    assert image["image_topic"] == confusion_topic("ei/bridge/info", "appliance")
    assert image["image_topic"] == "ei/bridge/models/appliance/confusion"
    assert "state_topic" not in image and "image_encoding" not in image  # raw bytes
    assert cmps["model_appliance_trained"]["device_class"] == "timestamp"
    assert set(quality_components("u", "e", "t/bridge/info", "m", image=False)) == {
        "model_m_examples",
        "model_m_trained",
    }
    assert confusion_topic("ei/instances/a/bridge/info", "my model") == (
        "ei/instances/a/bridge/models/my_model/confusion"
    )


def test_install_writes_learns_record_beside_the_model_and_rollback_swaps_it(tmp_path: Path) -> None:
    target = tmp_path / "models" / "m.onnx"
    for version in ("one", "two"):
        candidate = tmp_path / f"{version}.onnx"
        candidate.write_text(version)
        record = write_sidecar(tmp_path / f"{version}.quality.json", a_record(file_sha256(candidate)))
        deploy.install(candidate, target, sidecars={deploy.QUALITY_SUFFIX: record})
    assert load_record(target, file_sha256(target)) is not None  # the record of "two", beside it
    deploy.rollback(target)
    assert target.read_text() == "one"
    assert load_record(target, file_sha256(target)) is not None  # "one"'s own record came back
    kept = deploy.sidecar(deploy.previous_path(target), deploy.QUALITY_SUFFIX)
    assert json.loads(kept.read_text())["model_sha256"] == file_sha256(tmp_path / "two.onnx")
