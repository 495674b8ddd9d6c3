"""``edge-infer bench``: run the benchmark suite (``bench/``) from a source checkout.

The suite is not part of the installed package: it needs the repository's ``bench/`` and
``tests/broker.py`` (a real Mosquitto) and the dev extra (paho-mqtt, matplotlib, psutil).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

HINT = (
    "edge-infer bench: the benchmark suite lives in bench/ of a source checkout "
    "(git clone the edge-infer repository, then 'make bench' or 'python -m bench' there)"
)


def _checkout() -> Path | None:
    """The source checkout this edge package runs from, if it has bench/ and tests/broker.py."""
    root = Path(__file__).resolve().parent.parent
    if (root / "bench" / "__main__.py").is_file() and (root / "tests" / "broker.py").is_file():
        return root
    return None


def cli_bench(argv: list[str]) -> int:
    """Run ``python -m bench ARGV`` in-process; 2 when bench/ is not available."""
    root = _checkout()
    if root is None:
        print(HINT, file=sys.stderr)
        return 2
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        cli = importlib.import_module("bench.cli")
    except ImportError as exc:
        print(
            f"edge-infer bench: missing dependency {exc.name or exc!s}; "
            "install the dev extra: pip install -e '.[dev]' (plus matplotlib and psutil)",
            file=sys.stderr,
        )
        return 3
    result: int = cli.main(list(argv))
    return result
