"""``python -m bench.profile_groups FILE.prof [--messages N]``: a cProfile by part of the daemon.

``python -m bench.ab NAME=TREE --profile DIR`` writes a cProfile of each variant's event-loop
thread (ONNX Runtime's worker threads are not in it). This sums the functions' own time by where
they live: each ``edge/`` module, the event loop (``asyncio.run``'s own time: with uvloop the
loop's C code, its waits and socket calls, counts there), ``json``, the other Python modules and
the built-ins. With ``--messages`` it also gives the own time per message (cProfile's overhead
included: compare shares, not microseconds, with the bench's CPU per message).
"""

from __future__ import annotations

import argparse
import collections
import pstats
from pathlib import Path


def group_of(filename: str, function: str) -> str:
    """The part of the program a profiled function belongs to."""
    if "/edge/" in filename:
        return "edge/" + filename.rsplit("/edge/", 1)[1]
    if filename == "~":  # C functions: builtins and methods of C types
        if "json" in function or "scanner" in function:
            return "json"
        return "built-ins"
    if filename.endswith("asyncio/runners.py") and function == "run":
        return "event loop (waits, socket calls)"
    if "/asyncio/" in filename or "uvloop" in filename:
        return "asyncio"
    if "/json/" in filename:
        return "json"
    return "other Python"


def groups(path: Path) -> tuple[float, list[tuple[str, float]]]:
    """Total own time and the own time of each group, largest first."""
    stats = pstats.Stats(str(path))
    by_group: dict[str, float] = collections.defaultdict(float)
    total = 0.0
    for (filename, _line, function), row in stats.stats.items():  # type: ignore[attr-defined]
        own = float(row[2])
        by_group[group_of(filename, function)] += own
        total += own
    return total, sorted(by_group.items(), key=lambda item: -item[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.profile_groups", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("profile", type=Path)
    parser.add_argument("--messages", type=int, default=None, help="messages the profiled run answered")
    parser.add_argument("--top", type=int, default=16)
    opts = parser.parse_args(argv)
    total, rows = groups(opts.profile)
    per = " | µs per message (profiled)" if opts.messages else ""
    print(f"| part | own time s | share{per} |")
    print("|---|---:|---:|" + ("---:|" if opts.messages else ""))
    for name, own in rows[: opts.top]:
        extra = f" | {own / opts.messages * 1e6:.1f}" if opts.messages else ""
        print(f"| {name} | {own:.3f} | {100 * own / total:.1f} %{extra} |")
    extra = f" | {total / opts.messages * 1e6:.1f}" if opts.messages else ""
    print(f"| all | {total:.3f} | 100 %{extra} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
