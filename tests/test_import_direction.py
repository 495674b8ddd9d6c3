"""edge/ is the package the daemon runs from: it imports neither the simulator and device
fixtures (devices/), nor training (exporters/, torch), nor the benchmarks (bench/). The other
packages import edge, never the reverse (docs/architecture.md, "Package boundaries")."""

from __future__ import annotations

import ast
from pathlib import Path

EDGE = Path(__file__).resolve().parent.parent / "edge"
BANNED = ("devices", "exporters", "bench", "torch")
# The documented exceptions (docs/architecture.md, "Package boundaries"), none of them on the
# daemon's path: edge/demo.py drives the simulated home (devices.faults, devices.simulate);
# edge/cli.py names `devices.simulate` and `exporters.cli` in its subcommand table and imports
# them by name only when that subcommand runs; edge/benchcli.py imports `bench.cli` by name from
# a source checkout (`edge-infer bench`); edge/learn/anomaly.py runs `exporters.learn_anomaly` as a
# child process.
EXCEPTIONS = {
    "demo.py": {"devices.faults", "devices.simulate"},
    "cli.py": {"devices.simulate", "exporters.cli"},
    "benchcli.py": {"bench.cli"},
    # a child process (`python -m exporters.learn_anomaly`), never imported: training runs apart
    "learn/anomaly.py": {"exporters.learn_anomaly"},
}


def _banned(module: str) -> bool:
    return module.split(".", maxsplit=1)[0] in BANNED


def _imports(tree: ast.AST) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id)
            in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return found


def _named_modules(tree: ast.AST) -> set[str]:
    """String constants that look like a banned module's dotted name (a table of lazy imports)."""
    return {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and "." in node.value
        and " " not in node.value
        and _banned(node.value)
        and all(part.isidentifier() for part in node.value.split("."))
    }


def test_edge_imports_none_of_devices_exporters_bench_or_torch() -> None:
    files = sorted(EDGE.rglob("*.py"))
    assert len(files) > 30  # the walk found the package
    problems = []
    for path in files:
        rel = path.relative_to(EDGE).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        allowed = EXCEPTIONS.get(rel, set())
        for line, module in _imports(tree):
            if _banned(module) and module not in allowed:
                problems.append(f"edge/{rel}:{line} imports {module}")
        for name in _named_modules(tree) - allowed:
            problems.append(f"edge/{rel} names the module {name} (imported by name?)")
    assert not problems, "\n".join(problems)


def test_the_exceptions_are_still_needed_and_documented() -> None:
    """An exception that is no longer used is removed from the list; each is in architecture.md."""
    doc = (EDGE.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    for rel, modules in EXCEPTIONS.items():
        tree = ast.parse((EDGE / rel).read_text(encoding="utf-8"))
        used = {m for _, m in _imports(tree)} | _named_modules(tree)
        assert modules <= used, f"edge/{rel} no longer uses {sorted(modules - used)}"
        assert f"edge/{rel}" in doc or f"edge.{rel[:-3]}" in doc, f"architecture.md omits edge/{rel}"
        for module in modules:
            assert module in doc, f"architecture.md omits {module} (used by edge/{rel})"


def test_the_family_profiles_live_in_edge() -> None:
    """The daemon's decoders and their YAML profiles ship with edge (the wheel's package data)."""
    from edge.families import PROFILE_DIR, list_profiles

    assert PROFILE_DIR.parent == EDGE
    assert {p.stem for p in PROFILE_DIR.glob("*.yaml")} == set(list_profiles())
    pyproject = (EDGE.parent / "pyproject.toml").read_text(encoding="utf-8")
    assert "family_profiles/*.yaml" in pyproject
    assert "edge/family_profiles" in (EDGE.parent / "MANIFEST.in").read_text(encoding="utf-8")
