"""``python -m bench [--quick] [--out DIR]`` and ``python -m bench soak [...]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "soak":
        from bench.soak import main as soak_main

        return int(soak_main(args[1:]))
    if args and args[0] == "run":
        args = args[1:]
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="edge-infer beside its baselines against a local Mosquitto "
        "(also: 'python -m bench soak' for the memory soak).",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a smaller run that finishes in under 2 minutes")
    mode.add_argument("--tiny", action="store_true", help="the machinery end to end (the smoke test)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    parser.add_argument("--no-plots", action="store_true")
    opts = parser.parse_args(args)

    from bench.runner import Settings, default_out_dir, run_suite
    from tests.broker import MOSQUITTO_HINT, find_mosquitto

    if find_mosquitto() is None:
        print(f"bench: {MOSQUITTO_HINT}", file=sys.stderr)
        return 2
    settings = Settings.tiny() if opts.tiny else Settings.quick() if opts.quick else Settings()
    if opts.no_plots:
        settings.plots = False
    out = opts.out or default_out_dir()
    result = run_suite(settings, out, log=lambda line: print(line, flush=True))
    from bench.report import markdown

    print()
    print(markdown(result))
    print(f"results in {out}")
    return 0
