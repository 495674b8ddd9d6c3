"""The bundled model zoo and example configs, from a source checkout or an installed wheel.

A config names a bundled model as ``path: zoo:NAME`` (the variant its card recommends, from
``report.json``'s ``recommended``) or ``zoo:NAME.VARIANT`` (``fp32`` or ``int8``). In a checkout the
files are the repository's ``models/`` and ``examples/``; a wheel carries copies of them under
``edge/_bundled/`` (written by ``setup.py``'s build step), so both resolve the same names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PREFIX = "zoo:"
VARIANTS = ("fp32", "int8")
_PACKAGE = Path(__file__).resolve().parent
_BUNDLED = _PACKAGE / "_bundled"
_CHECKOUT = _PACKAGE.parent


class ZooError(ValueError):
    """An unknown bundled model or variant; the message lists what exists."""


def _root(kind: str) -> Path:
    """``models`` or ``examples``: the wheel's copy when it exists, else the checkout's folder."""
    bundled = _BUNDLED / kind
    return bundled if bundled.is_dir() else _CHECKOUT / kind


def models_dir() -> Path:
    return _root("models")


def examples_dir() -> Path:
    return _root("examples")


def example(name: str) -> Path:
    """An example config by file name (``home.yaml``)."""
    return examples_dir() / name


def names() -> list[str]:
    root = models_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "report.json").is_file())


def report(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((models_dir() / name / "report.json").read_text())
    return data


@dataclass(frozen=True)
class ZooModel:
    name: str
    variant: str
    path: Path


def is_zoo_ref(text: str) -> bool:
    return text.startswith(PREFIX)


def resolve(ref: str) -> ZooModel:
    """``zoo:NAME`` or ``zoo:NAME.VARIANT`` -> the bundled file. :class:`ZooError` names what exists."""
    spec = ref[len(PREFIX) :] if is_zoo_ref(ref) else ref
    name, _, variant = spec.partition(".")
    known = names()
    if name not in known:
        listed = ", ".join(f"zoo:{n}" for n in known) or "none (the zoo is not installed)"
        raise ZooError(f"no bundled model {name!r}; bundled: {listed}")
    if not variant:
        variant = str(report(name).get("recommended") or "fp32")
    if variant not in VARIANTS:
        raise ZooError(
            f"unknown variant {variant!r} of zoo:{name}; use "
            + " or ".join(f"zoo:{name}.{v}" for v in VARIANTS)
        )
    path = models_dir() / name / f"{name}.{variant}.onnx"
    if not path.is_file():
        raise ZooError(f"zoo:{name}.{variant}: the file {path.name} is missing from {path.parent}")
    return ZooModel(name, variant, path)


def summary(name: str) -> dict[str, Any]:
    """What ``edge-infer models list`` shows of one bundled model (from its report, no ONNX load)."""
    rep = report(name)
    inp = rep.get("input") or {}
    metrics = rep.get("metrics") or {}
    recommended = str(rep.get("recommended") or "fp32")
    accuracy: dict[str, Any] = {}
    for variant in VARIANTS:
        entry = metrics.get(variant) if isinstance(metrics, dict) else None
        if isinstance(entry, dict) and "accuracy" in entry:
            accuracy[variant] = entry["accuracy"]
    dataset = rep.get("dataset") or {}
    return {
        "name": name,
        "ref": f"zoo:{name}",
        "recommended": recommended,
        "variants": [v for v in VARIANTS if (models_dir() / name / f"{name}.{v}.onnx").is_file()],
        "task": rep.get("task"),
        "layout": inp.get("layout"),
        "features": inp.get("features"),
        "window": inp.get("window"),
        "sample_period_s": inp.get("sample_period_s"),
        "labels": rep.get("labels"),
        "accuracy": accuracy,
        "split": dataset.get("split") if isinstance(dataset, dict) else None,
        "dataset": dataset.get("name") if isinstance(dataset, dict) else None,
        "card": str(models_dir() / name / "card.md"),
    }
