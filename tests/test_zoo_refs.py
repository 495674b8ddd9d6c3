"""``path: zoo:<name>[.<variant>]``: bundled models addressed by name in a config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edge.config import ConfigError, load_config, parse_config
from tests.harness import ROOT

MODELS = ROOT / "models"
NAMES = sorted(p.parent.name for p in MODELS.glob("*/report.json"))


def _config(path: str) -> dict[str, object]:
    return {
        "models": {"m": {"path": path}},
        "pipelines": {
            "p": {
                "model": "m",
                "source": {"topics": ["t/{device}"]},
                "features": {"type": "window"},
            }
        },
    }


@pytest.mark.parametrize("name", NAMES)
def test_plain_name_is_the_recommended_variant(name: str) -> None:
    report = json.loads((MODELS / name / "report.json").read_text())
    expected = MODELS / name / report["files"][report["recommended"]]["path"]
    config = parse_config(_config(f"zoo:{name}"))
    assert config.models["m"].path.resolve() == expected.resolve()


@pytest.mark.parametrize("variant", ["fp32", "int8"])
def test_explicit_variant(variant: str) -> None:
    config = parse_config(_config(f"zoo:appliance.{variant}"))
    assert config.models["m"].path.resolve() == (MODELS / "appliance" / f"appliance.{variant}.onnx").resolve()


def test_zoo_ref_does_not_depend_on_the_config_folder(tmp_path: Path) -> None:
    """A config anywhere (here a temporary folder) gets the bundled file, not <folder>/zoo:..."""
    path = tmp_path / "edge.yaml"
    path.write_text(json.dumps(_config("zoo:appliance.int8")))
    config = load_config(path)
    assert config.models["m"].path.resolve() == (MODELS / "appliance" / "appliance.int8.onnx").resolve()


def test_unknown_model_names_the_key_and_lists_the_zoo() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(_config("zoo:toaster"))
    assert info.value.key == "models.m.path"
    for name in NAMES:
        assert f"zoo:{name}" in info.value.message
    assert "toaster" in info.value.message


def test_unknown_variant_names_the_key_and_lists_the_variants() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(_config("zoo:appliance.fp16"))
    assert info.value.key == "models.m.path"
    assert "zoo:appliance.fp32" in info.value.message
    assert "zoo:appliance.int8" in info.value.message
    assert "fp16" in info.value.message


def test_check_reports_a_bad_zoo_ref(tmp_path: Path) -> None:
    path = tmp_path / "edge.yaml"
    path.write_text(json.dumps(_config("zoo:nope")))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "edge.cli", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "models.m.path" in result.stderr
    assert "zoo:appliance" in result.stderr
