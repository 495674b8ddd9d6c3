"""The train -> export -> quantize -> verify toolchain, on small generated data (a few seconds each)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

pytest.importorskip("torch", reason="needs the train extra: pip install 'edge-infer[train]'")
pytest.importorskip("onnx", reason="needs the train extra: pip install 'edge-infer[train]'")

import onnx
import onnxruntime as ort

from edge.cli import main
from edge.manifest import read_manifest
from exporters.cli import BuildResult, build
from exporters.data import DataSet, load_dataset
from exporters.onnxutil import get_manifest
from exporters.recipe import Recipe, recipe_from_dict

pytestmark = pytest.mark.torch

FAMILIES: dict[str, dict[str, Any]] = {
    "mlp": {
        "data": {"source": "builtin:synthetic-snapshot", "params": {"n": 300}},
        "model": {"family": "mlp", "hidden": [16, 16]},
        "train": {"epochs": 6, "lr": 0.01},
    },
    "cnn1d": {
        "data": {"source": "builtin:synthetic-window", "params": {"n": 240}},
        "model": {"family": "cnn1d", "hidden": [8, 8], "normalisation": "per_window"},
        "train": {"epochs": 6, "lr": 0.01},
    },
    "cnn1d_rocket": {  # the network and a MiniRocket-style branch side by side (exporters/rocket.py)
        "data": {"source": "builtin:synthetic-window", "params": {"n": 240}},
        "model": {"family": "cnn1d", "hidden": [8, 8], "normalisation": "per_window", "rocket_features": 400},
        "train": {"epochs": 6, "lr": 0.01},
    },
    "lstm": {
        "data": {"source": "builtin:synthetic-window", "params": {"n": 240}},
        "model": {"family": "lstm", "hidden": [12]},
        "train": {"epochs": 6, "lr": 0.01},
    },
    "cnn2d": {
        "data": {"source": "builtin:synthetic-grid", "params": {"n": 240}},
        "model": {"family": "cnn2d", "hidden": [4, 8]},
        "train": {"epochs": 6, "lr": 0.01},
    },
}


def make_recipe(family: str, **extra: Any) -> Recipe:
    raw = {"name": f"t_{family}", "description": f"test {family}", **FAMILIES[family], **extra}
    return recipe_from_dict(raw)


@pytest.fixture(scope="module", params=list(FAMILIES))
def built(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Recipe, BuildResult]:
    recipe = make_recipe(request.param)
    out = tmp_path_factory.mktemp(request.param)
    return recipe, build(recipe, out, progress=False, quick=True)


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_files_are_self_contained_and_checked(built: tuple[Recipe, BuildResult]) -> None:
    _recipe, res = built
    assert res.int8 is not None and res.int8.exists()
    for path in (res.fp32, res.int8):
        assert not path.with_name(path.name + ".data").exists()
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    for name in ("card.md", "report.json", "training_curves.png", "confusion_matrix.png"):
        assert (res.fp32.parent / name).stat().st_size > 0, name


def test_batch_1_and_7_and_dynamic_time(built: tuple[Recipe, BuildResult]) -> None:
    recipe, res = built
    assert res.int8 is not None
    manifest = read_manifest(res.fp32)
    assert manifest is not None
    shape = manifest.input.sample_shape()
    rng = np.random.default_rng(0)
    for path in (res.fp32, res.int8):
        sess = _session(path)
        for batch in (1, 7):
            x = (rng.normal(size=(batch, *shape)) * 50 + 100).astype(np.float32)
            probs = sess.run(None, {"input": x})[0]
            assert probs.shape == (batch, len(manifest.labels))
            np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)  # softmax is in the graph
        if recipe.model.family in ("cnn1d", "lstm"):  # the time axis is dynamic too
            x = rng.normal(size=(3, shape[0] // 2, shape[1])).astype(np.float32)
            assert sess.run(None, {"input": x})[0].shape == (3, len(manifest.labels))


def test_parity_within_tolerances(built: tuple[Recipe, BuildResult]) -> None:
    _, res = built
    parity = res.report["parity"]
    assert parity["pytorch_vs_fp32"]["max_abs_diff"] <= 1e-4
    assert parity["pytorch_vs_fp32"]["argmax_agreement"] == 1.0
    assert parity["fp32_vs_int8"]["max_abs_diff"] <= 0.15
    assert parity["fp32_vs_int8"]["argmax_agreement"] >= 0.9
    # int8 kernels of this CPU agree with a float simulation of the same quantized graph
    assert parity["int8_kernels_vs_reference"]["max_abs_diff"] <= 1e-2
    metrics = res.report["metrics"]
    assert metrics["fp32"]["accuracy"] == pytest.approx(metrics["pytorch"]["accuracy"])
    assert metrics["int8"]["accuracy"] >= metrics["fp32"]["accuracy"] - 0.1


def test_manifest_round_trips_and_daemon_reads_it(built: tuple[Recipe, BuildResult]) -> None:
    recipe, res = built
    assert res.int8 is not None
    ds: DataSet = load_dataset(recipe)
    for path in (res.fp32, res.int8):
        manifest = read_manifest(path)  # the daemon's reader (ONNX Runtime only)
        assert manifest is not None
        assert manifest == get_manifest(onnx.load(str(path)))
        assert type(manifest).from_json(manifest.to_json()) == manifest
        assert manifest.name == recipe.name and manifest.task == "classification"
        assert manifest.labels == ds.labels
        assert manifest.input.layout == ds.layout
        assert manifest.input.features == ds.features
        assert manifest.output.kind == "probabilities"
        assert manifest.normalisation.kind == "in_graph"
        assert manifest.weights_sha256 and len(manifest.weights_sha256) == 64
        assert manifest.provenance["recipe"]["name"] == recipe.name
        assert manifest.metrics["pytorch_test"]["accuracy"] >= 0.0
        # training_stats: per feature, from the training split in raw units (none for grids)
        if ds.layout == "grid":
            assert manifest.training_stats is None
        else:
            assert manifest.training_stats is not None
            assert [s.name for s in manifest.training_stats] == ds.features
            for i, stats in enumerate(manifest.training_stats):
                column = ds.x_train[..., i]
                assert stats.count == column.size
                assert stats.min == pytest.approx(float(column.min()))
                assert stats.max == pytest.approx(float(column.max()))
                assert stats.mean == pytest.approx(float(column.mean()), rel=1e-5, abs=1e-6)
    quant = read_manifest(res.int8)
    assert quant is not None and quant.quantization is not None
    assert quant.quantization["reduce_range"] is True
    # every family: static QDQ, the batch-independent scheme (issue 17)
    assert quant.quantization["mode"] == "static" and quant.quantization["batch_independent"] is True
    fp32_manifest = read_manifest(res.fp32)
    assert fp32_manifest is not None and fp32_manifest.quantization is None


def test_raw_units_in_probabilities_out(built: tuple[Recipe, BuildResult]) -> None:
    """The graph normalises: raw test readings (watts, °C, ppm) give the reported accuracy."""
    recipe, res = built
    ds = load_dataset(recipe)
    x = ds.model_input(ds.x_test)
    assert np.abs(x).max() > 10  # really raw units, not z-scores
    probs = _session(res.fp32).run(None, {"input": x})[0]
    assert float((probs.argmax(1) == ds.y_test).mean()) == pytest.approx(
        res.report["metrics"]["fp32"]["accuracy"]
    )


def test_report_has_latency_importance_and_card(built: tuple[Recipe, BuildResult]) -> None:
    recipe, res = built
    report = json.loads((res.fp32.parent / "report.json").read_text())
    for key in ("fp32", "int8"):
        for batch in ("batch_1", "batch_32"):
            assert report["latency_single_thread"][key][batch]["median_ms"] > 0
    importance = report["importance"]
    kinds = {"mlp": "feature", "cnn1d": "channel", "lstm": "channel", "cnn2d": "row"}
    assert kinds[recipe.model.family] in importance
    assert report["recommended"] in ("fp32", "int8")
    card = (res.fp32.parent / "card.md").read_text()
    for heading in ("## Input and output", "## Results on the test split", "## Parity", "## Why it predicts"):
        assert heading in card


def _fp32_via_cli(tmp_path: Path) -> Path:
    recipe = make_recipe("mlp").model_dump(mode="json")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path), "--out", str(tmp_path / "m"), "--export", "--no-progress"]) == 0
    fp32 = tmp_path / "m" / "t_mlp.fp32.onnx"
    assert fp32.exists()
    return fp32


def test_quantize_refuses_over_budget(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fp32 = _fp32_via_cli(tmp_path)
    int8 = fp32.with_name("t_mlp.int8.onnx")
    # a negative budget demands that int8 beat fp32, which it cannot do here: refusal
    assert main(["quantize", str(fp32), "--budget", "-5", "--no-verify"]) == 1
    assert "over the budget" in capsys.readouterr().err
    assert not int8.exists()
    assert main(["quantize", str(fp32), "--budget", "-5", "--force", "--no-verify"]) == 0
    assert int8.exists()
    assert main(["quantize", str(fp32)]) == 0  # default budget: 1 point
    assert main(["verify", str(fp32), "--quick"]) == 0
    report = json.loads(fp32.with_name("report.json").read_text())
    assert set(report["files"]) == {"fp32", "int8"}


def test_train_from_recorded_table_with_cli_options(tmp_path: Path) -> None:
    """A CSV as 'record' writes it: a timestamp, a device, readings, a label column."""
    rng = np.random.default_rng(3)
    rows = []
    for device in ("plug_a", "plug_b", "plug_c"):
        for seg in range(12):
            label = ["kettle", "fridge"][seg % 2]
            level = 2000.0 if label == "kettle" else 90.0
            for t in range(24):
                rows.append(f"{seg * 24 + t},{device},{level + rng.normal(0, level / 10):.2f},{label}")
    csv = tmp_path / "rec.csv"
    csv.write_text("timestamp,device,power,label\n" + "\n".join(rows) + "\n")
    out = tmp_path / "out"
    code = main([
        "train", "--name", "plug", "--data", str(csv), "--layout", "window", "--features", "power",
        "--units", "power=W", "--window", "8", "--stride", "8", "--group", "device", "--family", "cnn1d",
        "--hidden", "8,8", "--epochs", "4", "--sample-period", "10", "--out", str(out), "--export",
        "--no-progress",
    ])  # fmt: skip
    assert code == 0
    manifest = read_manifest(out / "plug.fp32.onnx")
    assert manifest is not None
    assert manifest.labels == ["fridge", "kettle"]
    assert manifest.input.window == 8 and manifest.input.sample_period_s == 10.0
    assert manifest.input.units == {"power": "W"}


def test_train_from_record_output(tmp_path: Path) -> None:
    """The format 'edge-infer record' writes: one row per window, <channel>@<i> columns, oldest first."""
    rng = np.random.default_rng(5)
    header = ["ts", "device", "pipeline", "label"] + [
        f"{c}@{i}" for i in range(6) for c in ("power", "current")
    ]
    lines = [",".join(header)]
    for row in range(90):
        label = ["", "tv", "heater"][row % 3]  # unlabelled rows are skipped
        level = 120.0 if label == "tv" else 1500.0
        values = [f"{v:.2f}" for _ in range(6) for v in (level + rng.normal(0, 10), level / 230)]
        lines.append(",".join([str(1700000000 + row), "plug_1", "appliance", label, *values]))
    csv = tmp_path / "record.csv"
    csv.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    code = main([
        "train", "--name", "rec", "--data", str(csv), "--layout", "window", "--features", "power,current",
        "--family", "gru", "--hidden", "8", "--epochs", "3", "--out", str(out), "--export", "--no-progress",
    ])  # fmt: skip
    assert code == 0
    manifest = read_manifest(out / "rec.fp32.onnx")
    assert manifest is not None
    assert manifest.input.window == 6 and manifest.input.features == ["power", "current"]
    assert manifest.labels == ["heater", "tv"]
    assert sum(manifest.dataset["sizes"].values()) == 60


def test_regression_reports_mae(tmp_path: Path) -> None:
    recipe = recipe_from_dict({
        "name": "t_reg", "task": "regression", "output_unit": "W",
        "data": {"source": "builtin:synthetic-regression", "params": {"n": 300}},
        "model": {"family": "mlp", "hidden": [16]}, "train": {"epochs": 8, "lr": 0.01},
    })  # fmt: skip
    res = build(recipe, tmp_path, progress=False, quick=True)
    manifest = read_manifest(res.fp32)
    assert manifest is not None and manifest.output.kind == "value" and manifest.output.unit == "W"
    assert res.report["metrics"]["fp32"]["mae"] == pytest.approx(
        res.report["metrics"]["pytorch"]["mae"], rel=1e-4
    )
    value = _session(res.fp32).run(None, {"input": np.array([[230.0, 4.0, 0.9]] * 7, dtype=np.float32)})[0]
    assert value.shape == (7,)


def test_missing_torch_gives_install_hint(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import sys

    from exporters.cli import cli_train

    monkeypatch.setitem(sys.modules, "torch", None)
    assert cli_train(["recipe.yaml"]) == 3
    assert "pip install" in capsys.readouterr().err


def test_bad_recipe_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("name: x\ndata: {source: 'builtin:synthetic-snapshot'}\nmodel: {family: transformer}\n")
    assert main(["train", str(path)]) == 2
    assert "model.family" in capsys.readouterr().err


# ---------------------------------------------------------------- batch independence (issue 17)


def test_int8_answers_do_not_depend_on_batch_mates(built: tuple[Recipe, BuildResult]) -> None:
    """Static QDQ (every family, LSTM weights included): a row alone == the row inside batches of 7 and 64."""
    from exporters.verify import TOL_BATCH, batch_independence

    recipe, res = built
    assert res.int8 is not None
    report = json.loads((res.fp32.parent / "report.json").read_text())
    assert report["files"]["int8"]["quantization"]["mode"] == "static"
    for key in ("fp32", "int8"):
        assert report["batch_independence"][key]["independent"], report["batch_independence"][key]
        assert report["batch_independence"][key]["batches"] == [7, 64]
    ds = load_dataset(recipe)
    x = ds.model_input(ds.x_test)
    again = batch_independence(res.int8, x, rows=24, seed=1)
    assert again["max_abs_diff"] <= TOL_BATCH and again["argmax_changes"] == 0
    # recurrent layers: int8 weights behind DequantizeLinear, recurrence in float
    if recipe.model.family == "lstm":
        model = onnx.load(str(res.int8))
        lstm = next(n for n in model.graph.node if n.op_type == "LSTM")
        producers = {o: n.op_type for n in model.graph.node for o in n.output}
        assert producers[lstm.input[1]] == producers[lstm.input[2]] == "DequantizeLinear"
        inits = {i.name: i for i in model.graph.initializer}
        assert all(
            inits[n.input[0]].data_type == onnx.TensorProto.INT8
            for n in model.graph.node
            if n.op_type == "DequantizeLinear" and n.output[0] in lstm.input[1:3]
        )


def test_the_check_catches_dynamic_int8(tmp_path: Path) -> None:
    """The check is not vacuous: dynamic quantization (per-batch activation scales) fails it.

    (An LSTM: on the generated snapshot task the MLP's probabilities saturate at 1.0, which hides
    the scale changes; the zoo's occupancy MLP shows them, see tests/test_zoo.py.)
    """
    from exporters.quantize import calibration_inputs, quantize_model
    from exporters.verify import batch_independence

    recipe = make_recipe("lstm")
    res = build(recipe, tmp_path, progress=False, quick=True, quantize=False)
    ds = load_dataset(recipe)
    dyn = tmp_path / "dynamic.int8.onnx"
    settings = quantize_model(res.fp32, dyn, recipe.quantize, calibration_inputs(ds, 64), "dynamic")
    assert settings["batch_independent"] is False
    result = batch_independence(dyn, ds.model_input(ds.x_test))
    assert not result["independent"] and result["max_abs_diff"] > 1e-4, result


# ---------------------------------------------------------------- calibration (issue 22)


def _linear_softmax_model(weight: np.ndarray, path: Path) -> Path:
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input", "w"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
        ],
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", weight.shape[0]])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", weight.shape[1]])],
        [numpy_helper.from_array(weight.astype(np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save_model(model, str(path))
    return path


@pytest.mark.parametrize("scale", [4.0, 0.35])  # over-confident, under-confident
def test_temperature_fixes_a_known_miscalibration(scale: float, tmp_path: Path) -> None:
    """Three Gaussian classes with exact posterior softmax(x @ W); the model returns softmax(scale * x @ W).

    The fitted temperature recovers ``scale``, the folded graph's ECE on held-out data drops
    to that of the exact posterior, and no prediction changes.
    """
    from exporters.calibrate import calibrate_file, ece, nll

    rng = np.random.default_rng(0)
    means = np.array([[0.0, 0.0], [1.5, 0.0], [0.0, 1.5]])

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 3, n)
        x = means[y] + rng.normal(size=(n, 2))
        # equal priors and unit covariance: logit_k = x.mu_k - |mu_k|^2 / 2 (bias as a constant input)
        return np.hstack([x, np.ones((n, 1))]).astype(np.float32), y

    w = np.vstack([means.T, -0.5 * (means**2).sum(axis=1)])
    raw = _linear_softmax_model(scale * w, tmp_path / "raw.onnx")
    (x_val, y_val), (x_test, y_test) = sample(4000), sample(4000)
    sess = _session(raw)
    p_val = sess.run(None, {"input": x_val})[0]
    p_test = sess.run(None, {"input": x_test})[0]
    record = calibrate_file(raw, tmp_path / "cal.onnx", p_val, y_val, "generated validation split")
    assert record["temperature"] == pytest.approx(scale, rel=0.12)
    q_test = _session(tmp_path / "cal.onnx").run(None, {"input": x_test})[0]
    exact = _session(_linear_softmax_model(w, tmp_path / "exact.onnx")).run(None, {"input": x_test})[0]
    assert ece(p_test, y_test) > 0.05  # the miscalibration is real
    assert ece(q_test, y_test) < 0.5 * ece(p_test, y_test)
    assert ece(q_test, y_test) < ece(exact, y_test) + 0.015
    assert nll(q_test, y_test) < nll(p_test, y_test)
    np.testing.assert_array_equal(q_test.argmax(1), p_test.argmax(1))
    # re-calibrating replaces the temperature instead of stacking a second one
    again = calibrate_file(tmp_path / "cal.onnx", tmp_path / "cal2.onnx", p_val, y_val, "same")
    nodes = [n.name for n in onnx.load(str(tmp_path / "cal2.onnx")).graph.node]
    assert nodes.count("calibration_temperature") == 1
    assert again["temperature"] == pytest.approx(record["temperature"])


def test_export_calibrates_on_the_validation_split(built: tuple[Recipe, BuildResult]) -> None:
    """train --quantize folds a temperature into both files; the card reports ECE/NLL before and after."""
    _recipe, res = built
    report = json.loads((res.fp32.parent / "report.json").read_text())
    cal = report["calibration"]
    assert "validation split" in cal["fitted_on"]
    for key, path in (("fp32", res.fp32), ("int8", res.int8)):
        assert path is not None
        c = cal["files"][key]
        assert c["held_out_after"]["nll"] <= c["held_out_before"]["nll"] + 1e-9
        assert c["graph_vs_formula_max_abs_diff"] < 1e-4
        assert c["test_after"]["accuracy"] == report["metrics"][key]["accuracy"]
        assert "calibration_temperature" in {n.name for n in onnx.load(str(path)).graph.node}
        manifest = read_manifest(path)
        assert manifest is not None
        assert manifest.provenance["calibration"]["temperature"] == pytest.approx(c["temperature"])
        assert report["metrics"][key]["ece"] == pytest.approx(c["test_after"]["ece"], abs=1e-6)
    card = (res.fp32.parent / "card.md").read_text()
    assert "## Calibration" in card and "![reliability diagram](reliability.png)" in card
    assert (res.fp32.parent / "reliability.png").stat().st_size > 0


def test_train_cli_takes_dropout_val_fraction_and_normalisation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The flags docs/exporting.md names exist and reach the recipe."""
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(make_recipe("cnn1d").model_dump(mode="json")))
    argv = ["train", str(path), "--dropout", "0.3", "--val-fraction", "0.25"]
    assert main([*argv, "--normalisation", "zscore", "--print-recipe"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["dropout"] == 0.3
    assert printed["model"]["normalisation"] == "zscore"
    assert printed["data"]["val_fraction"] == 0.25
    with pytest.raises(SystemExit) as bad:
        main([*argv, "--normalisation", "minmax", "--print-recipe"])
    assert bad.value.code == 2


def test_crossfit_gives_out_of_fold_outputs_and_keys_its_cache(tmp_path: Path) -> None:
    """Without a validation split the temperature is fitted on out-of-fold outputs of K fold models."""
    from exporters.crossfit import crossfit_outputs, stratified_folds

    recipe = make_recipe("mlp", data={**FAMILIES["mlp"]["data"], "val_fraction": 0.0})
    ds = load_dataset(recipe)
    assert len(ds.x_val) == 0
    folds = stratified_folds(ds.y_train, 3, seed=0)
    joined = np.sort(np.concatenate(folds))
    np.testing.assert_array_equal(joined, np.arange(len(ds.y_train)))  # disjoint and complete
    for fold in folds:  # every class in every fold
        assert set(ds.y_train[fold]) == set(ds.y_train)
    cache = tmp_path / "crossfit.npz"
    first = crossfit_outputs(recipe, ds, 3, cache=cache)
    assert first["fp32"].shape == first["int8"].shape == (len(ds.y_train), len(ds.labels))
    np.testing.assert_allclose(first["fp32"].sum(axis=1), 1.0, atol=1e-4)
    assert (first["fp32"].argmax(1) == ds.y_train).mean() > 0.5  # real predictions, not zeros
    again = crossfit_outputs(recipe, ds, 3, cache=cache)  # same recipe: from the cache
    np.testing.assert_array_equal(again["fp32"], first["fp32"])
    assert again["seconds"] == first["seconds"]
    changed = make_recipe(
        "mlp", data={**FAMILIES["mlp"]["data"], "val_fraction": 0.0}, train={"epochs": 2, "lr": 0.01}
    )
    refit = crossfit_outputs(changed, ds, 3, cache=cache)  # another recipe: the fold models are refitted
    assert not np.array_equal(refit["fp32"], first["fp32"])


def _amplitude_task(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Two classes of the same noisy sine, one at 0.01 and one at 10 (a bulb and a heater)."""
    y = rng.integers(0, 2, n)
    t = np.linspace(0.0, 4 * np.pi, 64)
    phase = rng.uniform(0, 2 * np.pi, (n, 1))
    shape = np.sin(t[None, :] + phase) + 0.1 * rng.normal(size=(n, 64))
    x = shape * np.where(y == 1, 10.0, 0.01)[:, None]
    return x[:, :, None].astype(np.float32), y


@pytest.mark.parametrize(
    ("family", "normalisation", "learns"),
    [("cnn1d", "per_window", False), ("cnn1d", "per_window_level", True), ("lstm", "per_window_level", True)],
)
def test_per_window_level_keeps_the_amplitude_that_per_window_drops(
    family: str, normalisation: str, learns: bool, tmp_path: Path
) -> None:
    from exporters.export import export
    from exporters.train import train

    rng = np.random.default_rng(0)
    (xtr, ytr), (xva, yva), (xte, yte) = (_amplitude_task(rng, n) for n in (200, 40, 200))
    ds = DataSet(
        "amplitude", "classification", "window", ["current"], xtr, ytr, xva, yva, xte, yte,
        labels=["bulb", "heater"], units={"current": "A"}, window=64, sample_period_s=1.0,
    )  # fmt: skip
    recipe = recipe_from_dict(
        {
            "name": "t_level",
            "description": "amplitude task",
            "labels": ["bulb", "heater"],
            "data": {"source": "builtin:synthetic-window"},  # replaced by ds below
            "model": {"family": family, "hidden": [8, 8], "normalisation": normalisation},
            "train": {"epochs": 8, "lr": 0.01, "noise": 0.0},
        }
    )
    result = train(recipe, tmp_path, progress=False, dataset=ds)
    path = tmp_path / "m.onnx"
    export(result.checkpoint, path)
    sess = _session(path)
    probs = sess.run(None, {sess.get_inputs()[0].name: xte})[0]
    accuracy = float((probs.argmax(1) == yte).mean())
    if learns:
        assert accuracy >= 0.95
        manifest = read_manifest(path)
        assert manifest is not None and manifest.normalisation.per_window
        assert manifest.provenance["graph_normalisation"]["kind"] == "per_window_level"
    else:  # the shape alone cannot tell the classes apart
        assert accuracy <= 0.7


def test_the_recorded_command_leaves_out_the_note() -> None:
    from exporters.ood import _without_note

    argv = ["plaid", "--note", "two sentences", "--seed", "1", "--note=more", "--save", "d"]
    assert _without_note(argv) == ["plaid", "--seed", "1", "--save", "d"]


def test_rocket_kernels_and_dilations_follow_minirocket() -> None:
    from exporters.rocket import dilation_plan, kernel_weights

    w = kernel_weights()
    assert w.shape == (84, 9) and np.allclose(w.sum(axis=1), 0.0)
    assert sorted(set(w.ravel().tolist())) == [-1.0, 2.0]
    assert len({tuple(row) for row in w.tolist()}) == 84
    plan = dilation_plan(1460, 4000)
    dilations = [d for d, _ in plan]
    assert dilations[0] == 1 and dilations == sorted(set(dilations))
    assert 8 * dilations[-1] <= 1459  # the widest kernel still fits the window
    assert sum(share for _, share in plan) == 4000 // 84
    with pytest.raises(ValueError, match="at least 9 samples"):
        dilation_plan(8, 100)


def test_the_rocket_branch_is_in_the_graph_and_leaves_the_network_alone(tmp_path: Path) -> None:
    """The exported answer is the mean of the network's and the branch's probabilities, and the
    network beside the branch trains to the same weights as without it (so a resample's figure
    for network + branch may reuse that network's outputs)."""
    import torch

    from exporters.export import export
    from exporters.train import load_checkpoint, train

    ds = load_dataset(make_recipe("cnn1d"))
    plain = train(make_recipe("cnn1d"), tmp_path / "plain", progress=False, dataset=ds)
    both = train(make_recipe("cnn1d_rocket"), tmp_path / "both", progress=False, dataset=ds)
    net_plain = load_checkpoint(plain.checkpoint).served.model
    ckpt = load_checkpoint(both.checkpoint)
    model = ckpt.served.model
    nets = zip(net_plain.body.state_dict().items(), model.body.net.state_dict().values(), strict=True)
    for (name, a), b in nets:
        assert torch.equal(a, b), name
    path = tmp_path / "both.onnx"
    export(ckpt, path)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"Greater", "Conv"} <= ops
    x = ds.model_input(ds.x_test)
    sess = _session(path)
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        z = model.norm(torch.from_numpy(x))
        want = 0.5 * torch.softmax(model.body.net(z), -1) + 0.5 * torch.softmax(model.body.rocket(z), -1)
    assert np.allclose(got, want.numpy(), atol=1e-5)
    with torch.no_grad():
        alone = model.body.rocket(z).numpy()
    # the branch by itself learns the task: well above chance on the test split
    assert float((alone.argmax(1) == ds.y_test).mean()) > 1.5 / len(ds.labels)


def test_rocket_features_need_a_classifier_over_windows() -> None:
    from exporters.recipe import RecipeError

    with pytest.raises(RecipeError, match="rocket_features needs a classifier over windows"):
        make_recipe("cnn1d", model={"family": "mlp", "rocket_features": 100})
