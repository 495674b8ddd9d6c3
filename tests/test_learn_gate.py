"""edge-infer learn: the gate, atomic deployment and ``edge-infer models rollback``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge.learn import deploy
from edge.learn.gate import NotComparable, decide, majority_baseline, onnx_predict, scores

ROOT = Path(__file__).resolve().parent.parent
OCCUPANCY = ROOT / "models" / "occupancy" / "occupancy.fp32.onnx"


def test_scores_macro_f1_over_all_classes() -> None:
    s = scores(["a", "a", "b", "b"], ["a", "b", "b", "b"], ["a", "b"])
    assert s["accuracy"] == 0.75
    assert s["per_class"]["a"]["recall"] == 0.5 and s["per_class"]["b"]["precision"] == pytest.approx(2 / 3)
    assert s["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)
    top, pred = majority_baseline(["x", "y", "y"], 4)
    assert top == "y" and pred == ["y"] * 4


def test_gate_promotes_only_when_both_are_beaten_by_the_margin() -> None:
    ok = decide("macro_f1", 0.02, new=0.90, baseline=0.45, deployed=0.85)
    assert ok.promote and "promoted" in ok.reason
    no_deployed = decide("macro_f1", 0.02, new=0.90, baseline=0.45, deployed=None, deployed_note="none yet")
    assert no_deployed.promote and "none yet" in no_deployed.reason
    near = decide("macro_f1", 0.02, new=0.86, baseline=0.45, deployed=0.85)
    assert not near.promote and "deployed model's 0.8500" in near.reason and "kept" in near.reason
    trivial = decide("accuracy", 0.02, new=0.74, baseline=0.74, deployed=None)
    assert not trivial.promote and "trivial baseline" in trivial.reason
    zero_margin_tie = decide("accuracy", 0.0, new=0.8, baseline=0.5, deployed=0.8)
    assert not zero_margin_tie.promote  # a tie is no improvement


def test_onnx_predict_names_and_refuses_other_shapes() -> None:
    x = np.zeros((3, 11, 4), dtype=np.float32)
    x[:, :, 3] = 2000.0  # high CO2
    names = onnx_predict(OCCUPANCY, x)
    assert len(names) == 3 and set(names) <= {"empty", "occupied"}
    with pytest.raises(NotComparable, match=r"shape \[11, 4\]"):
        onnx_predict(OCCUPANCY, np.zeros((2, 5, 1), dtype=np.float32))


def test_install_is_atomic_keeps_the_previous_and_rollback_swaps(tmp_path: Path) -> None:
    target = tmp_path / "models" / "m.onnx"
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    v1.write_bytes(b"one")
    v2.write_bytes(b"two")
    card = tmp_path / "card.md"
    card.write_text("card two")
    assert deploy.install(v1, target) is None
    inode = target.stat().st_ino
    prev = deploy.install(v2, target, card)
    assert prev == deploy.previous_path(target) and prev.read_bytes() == b"one"
    assert target.read_bytes() == b"two" and target.stat().st_ino != inode  # replaced, not rewritten
    assert (tmp_path / "models" / "m.onnx.card.md").read_text() == "card two"
    assert not [p for p in target.parent.iterdir() if ".tmp-" in p.name]
    deploy.rollback(target)
    assert target.read_bytes() == b"one" and prev.read_bytes() == b"two"
    deploy.rollback(target)  # a second rollback undoes the first
    assert target.read_bytes() == b"two"


def test_rollback_without_previous_and_bundled_models_are_refused(tmp_path: Path) -> None:
    with pytest.raises(deploy.DeployError, match="no previous version"):
        deploy.rollback(tmp_path / "m.onnx")
    assert deploy.is_bundled(ROOT / "edge" / "zoo.py")
    src = tmp_path / "x.onnx"
    src.write_bytes(b"x")
    bundled = Path(deploy.__file__).resolve().parent / "nope.onnx"
    with pytest.raises(deploy.DeployError, match="bundled"):
        deploy.install(src, bundled)
    assert not bundled.exists()


def test_models_rollback_cli(tmp_path: Path) -> None:
    model = tmp_path / "occ.onnx"
    model.write_bytes(b"new")
    deploy.previous_path(model).write_bytes(b"old")
    config = tmp_path / "c.yaml"
    config.write_text(
        "models: {occ: {path: occ.onnx}}\n"
        "pipelines: {rooms: {model: occ, source: {topics: ['a/{device}']}}}\n"
    )
    run = [sys.executable, "-m", "edge.cli", "models", "rollback", "-c", str(config)]
    done = subprocess.run([*run, "rooms"], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert model.read_bytes() == b"old" and "rolled back" in done.stdout
    bad = subprocess.run([*run, "nope"], capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 2 and "no pipeline 'nope'" in bad.stderr


def test_sidecars_go_with_their_model_on_install_and_rollback(tmp_path: Path) -> None:
    target = tmp_path / "models" / "m.onnx"
    files = {}
    for name, text in (("v1", "one"), ("v2", "two"), ("q1", "quality one"), ("q2", "quality two")):
        files[name] = tmp_path / name
        files[name].write_text(text)
    quality = deploy.sidecar(target, deploy.QUALITY_SUFFIX)
    kept = deploy.sidecar(deploy.previous_path(target), deploy.QUALITY_SUFFIX)
    assert quality.name == "m.onnx.quality.json" and kept.name == "m.onnx.previous.quality.json"
    deploy.install(files["v1"], target, sidecars={deploy.QUALITY_SUFFIX: files["q1"]})
    assert quality.read_text() == "quality one" and not kept.exists()
    deploy.install(files["v2"], target, sidecars={deploy.QUALITY_SUFFIX: files["q2"]})
    assert (target.read_text(), quality.read_text()) == ("two", "quality two")
    assert kept.read_text() == "quality one"  # beside the previous model, as its card is
    deploy.rollback(target)
    assert (target.read_text(), quality.read_text(), kept.read_text()) == (
        "one",
        "quality one",
        "quality two",
    )
    deploy.rollback(target)
    assert (target.read_text(), quality.read_text(), kept.read_text()) == (
        "two",
        "quality two",
        "quality one",
    )
    # a model deployed without a record: the old record goes with the old model, none is left
    deploy.install(files["v1"], target)
    assert not quality.exists() and kept.read_text() == "quality two"
    deploy.rollback(target)  # the rolled-back model has its record again; the other had none
    assert quality.read_text() == "quality two" and not kept.exists()
    assert not [p for p in target.parent.iterdir() if ".tmp-" in p.name or ".rollback-" in p.name]
    with pytest.raises(deploy.DeployError, match="unknown sidecar"):
        deploy.install(files["v1"], target, sidecars={".notes.txt": files["q1"]})
