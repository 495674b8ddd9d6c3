"""Build step that puts the bundled zoo and the example configs into the wheel.

Everything else is in pyproject.toml. In a source checkout (and an editable install) edge/zoo.py
reads the repository's ``models/`` and ``examples/`` in place; a wheel carries copies of the files a
config or ``edge-infer demo`` uses under ``edge/_bundled/``, so ``path: zoo:NAME`` and
``edge-infer demo`` work from any directory.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
# Per zoo model: both variants, the card and the report (the source of `models list`).
MODEL_FILES = ("*.onnx", "card.md", "report.json", "recipe.yaml")


class BuildPyWithZoo(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads models/ and examples/ in place
        target = Path(self.build_lib) / "edge" / "_bundled"
        shutil.rmtree(target, ignore_errors=True)
        models = ROOT / "models"
        for model in sorted(p for p in models.iterdir() if (p / "report.json").is_file()):
            for pattern in MODEL_FILES:
                for src in sorted(model.glob(pattern)):
                    dst = target / "models" / model.name / src.name
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, dst)
        for src in sorted((ROOT / "examples").glob("*.yaml")):
            dst = target / "examples" / src.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)


setup(cmdclass={"build_py": BuildPyWithZoo})
