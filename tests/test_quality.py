"""edge/quality.py: the quality record (learn's sidecar, the zoo's reports recomputed from the
committed test splits with ONNX Runtime), the book the daemon keeps, and the bridge's quality
entities; against a real Mosquitto a daemon that publishes the confusion matrix as a retained PNG
and again after its model file is replaced."""

from __future__ import annotations

import asyncio
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
from tests.broker import Mosquitto
from tests.harness import Collector, DaemonThread, make_config
from tests.test_daemon import base_config

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
    assert book.entities() == {"m": ("examples", "trained", "confusion")}
    model.write_bytes(b"two")  # replaced beside a record of the old file: refused, counted
    assert book.refresh({"m": (model, file_sha256(model))}) == ["m"]
    assert book.png("m") is None and book.errors == 1 and book.entities() == {}
    assert book.info("m") == {"examples_per_class": None, "trained_at": None, "metric": None}
    assert book.refresh({}) == []


def test_the_quality_entities_read_bridge_info_and_the_image_its_own_topic() -> None:
    cmps = quality_components("edge_infer_default", "edge_infer", "ei/bridge/info", "appliance")
    assert set(cmps) == {"model_appliance_examples", "model_appliance_trained", "model_appliance_confusion"}
    image = cmps["model_appliance_confusion"]
    assert image["platform"] == "image" and image["content_type"] == "image/png"
    assert image["image_topic"] == confusion_topic("ei/bridge/info", "appliance")
    assert image["image_topic"] == "ei/bridge/models/appliance/confusion"
    assert "state_topic" not in image and "image_encoding" not in image  # raw bytes
    assert cmps["model_appliance_trained"]["device_class"] == "timestamp"
    assert set(quality_components("u", "e", "t/bridge/info", "m", ("examples", "trained"))) == {
        "model_m_examples",
        "model_m_trained",
    }
    assert set(quality_components("u", "e", "t/bridge/info", "m", ("confusion",))) == {"model_m_confusion"}
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


# ------------------------------------------------------------------------------ Home Assistant configs


def test_the_bridge_config_carries_the_quality_entities_and_their_templates_render() -> None:
    from edge.discovery_payloads import BridgeInfo, bridge_config
    from tests.test_homeassistant import render

    bridge = BridgeInfo(version="1.2.3", instance_id="home")
    config = bridge_config(
        bridge,
        ["win", "snap"],
        quality={"win": ("examples", "trained", "confusion"), "snap": ("examples", "trained")},
    )
    cmps = config["cmps"]
    assert "model_win_confusion" in cmps and "model_snap_confusion" not in cmps
    assert {"model_win_examples", "model_win_trained", "model_snap_examples", "model_snap_trained"} <= set(
        cmps
    )
    assert bridge_config(bridge, ["win"]) == bridge_config(bridge, ["win"], quality={})  # none: as before
    record = a_record().info()
    info = {"models": {"win": record, "snap": {"examples_per_class": None, "trained_at": None}}}
    examples, trained = cmps["model_win_examples"], cmps["model_win_trained"]
    assert render(examples["value_template"], info) == "120"
    assert json.loads(render(examples["json_attributes_template"], info)) == {
        "off": 50,
        "fridge": 40,
        "kettle": 30,
    }
    assert render(trained["value_template"], info) == "2026-11-30T00:53:20Z"
    snap_examples = cmps["model_snap_examples"]
    assert render(snap_examples["value_template"], info) == "None"  # unknown in Home Assistant
    assert json.loads(render(snap_examples["json_attributes_template"], info)) == {}
    assert render(cmps["model_snap_trained"]["value_template"], info) == "None"
    # what Home Assistant's MQTT schemas ask of these platforms
    image = cmps["model_win_confusion"]
    assert image["image_topic"] == "edge-infer/bridge/models/win/confusion"
    assert image["content_type"] == "image/png" and "url_topic" not in image
    assert trained["device_class"] == "timestamp" and "state_class" not in trained
    assert "unit_of_measurement" not in trained
    assert all(c["entity_category"] == "diagnostic" for c in cmps.values())
    assert len({c["unique_id"] for c in cmps.values()}) == len(cmps)
    assert len({c["default_entity_id"] for c in cmps.values()}) == len(cmps)


# ------------------------------------------------------------------------------ a daemon on Mosquitto


@pytest.mark.broker
def test_the_daemon_publishes_the_confusion_png_retained_and_again_after_a_hot_reload(
    mosquitto: Mosquitto, topic_prefix: str, tmp_path: Path
) -> None:
    from edge.png import render_confusion
    from tests.onnx_models import window_classifier

    p = topic_prefix
    data = base_config(mosquitto.url, p, tmp_path)
    data["homeassistant"] = {"enabled": True, "discovery_prefix": f"{p}/ha", "instance_id": "q"}
    data["reload"] = {"interval_s": 0.3}
    model = tmp_path / "win.onnx"
    write_sidecar(sidecar_path(model), a_record(file_sha256(model)))
    topic = f"{p}/ei/bridge/models/win/confusion"
    out = Collector(mosquitto.url, f"{p}/ei/bridge/#", f"{p}/ha/#")
    with DaemonThread(make_config(data, tmp_path)) as runner:
        daemon = runner.daemon
        assert daemon is not None
        first = out.wait(lambda m: any(x.topic == topic for x in m))
        record = a_record()
        assert record.confusion is not None
        expected = render_confusion(record.confusion.labels, record.confusion.counts, "win holdout (n=12)")
        published = [m for m in first if m.topic == topic]
        assert [m.payload for m in published] == [expected]
        snap = [m for m in out.messages if m.topic == f"{p}/ei/bridge/models/snap/confusion"]
        assert [m.payload for m in snap] == [b""]  # no record: no image (an old one is cleared)
        info = runner.call(daemon.bridge_info)
        win = info["models"]["win"]
        assert win["examples_per_class"] == {"off": 50, "fridge": 40, "kettle": 30}
        assert win["trained_at"] == "2026-11-30T00:53:20Z"
        assert win["metric"] == {"name": "macro_f1", "value": 0.74, "n": 12}
        assert info["models"]["snap"]["examples_per_class"] is None and info["quality_errors"] == 0
        bridge_topic = f"{p}/ha/device/edge_infer_q/config"
        config = out.wait(lambda m: any(x.topic == bridge_topic and x.payload for x in m))
        cmps = json.loads([m for m in config if m.topic == bridge_topic][-1].payload)["cmps"]
        assert cmps["model_win_confusion"]["image_topic"] == topic
        snap_keys = {k for k in cmps if k.startswith("model_snap_")}
        assert snap_keys == {"model_snap_version", "model_snap_accuracy"}  # no record: no quality entities

        # learn deploys a new model with its record: the daemon reloads it and publishes its image
        candidate = tmp_path / "new.onnx"
        window_classifier(candidate, ["power"], 6, ["off", "fridge", "kettle", "kettle2"], seed=7)
        labels = ("off", "fridge", "kettle", "kettle2")
        new_record = write_sidecar(tmp_path / "new.quality.json", a_record(file_sha256(candidate), labels))
        deploy.install(candidate, model, sidecars={deploy.QUALITY_SUFFIX: new_record})
        second = out.wait(lambda m: len([x for x in m if x.topic == topic]) >= 2, timeout=20)
        images = [m for m in second if m.topic == topic]
        newer = read_sidecar(new_record)
        assert newer.confusion is not None
        assert images[1].payload == render_confusion(labels, newer.confusion.counts, "win holdout (n=12)")
        assert images[1].payload != images[0].payload
        assert runner.call(lambda: daemon.reloads) >= 1
        # a reload that changed nothing publishes no image again: the bridge/info it publishes
        # after the images would have is the sync point (one client's messages arrive in order)
        before = len(out.messages)
        assert asyncio.run_coroutine_threadsafe(daemon.reload("test"), runner.loop).result(20)
        reloads = runner.call(lambda: daemon.reloads)
        after = out.wait(
            lambda m: any(
                x.topic == f"{p}/ei/bridge/info" and x.json()["reloads"] == reloads for x in m[before:]
            )
        )
        assert not [m for m in after[before:] if m.topic == topic]
    retained = Collector(mosquitto.url, topic)  # what Home Assistant gets on subscribing
    got = retained.wait(lambda m: bool(m))
    assert got[0].retain and got[0].payload == images[1].payload
    retained.close()
    out.close()


def test_only_the_entities_a_record_has_something_for_are_announced(tmp_path: Path) -> None:
    book = QualityBook()
    open_set = MODELS / "appliance_open_set" / "appliance_open_set.fp32.onnx"
    activity = MODELS / "activity" / "activity.fp32.onnx"
    fridge = MODELS / "fridge_anomaly" / "fridge_anomaly.fp32.onnx"
    book.refresh({n: (p, file_sha256(p)) for n, p in (("open", open_set), ("act", activity), ("fr", fridge))})
    # the open-set report gives only an accuracy (the bridge's accuracy sensor already shows it);
    # the fridge's none; activity's report its holdout confusion, creation time and training size
    assert book.entities() == {"act": ("examples", "trained", "confusion")}
    assert book.info("act")["examples"] == 40 and book.info("act")["examples_per_class"] is None
