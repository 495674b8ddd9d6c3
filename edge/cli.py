"""The ``edge-infer`` command line: a thin dispatcher.

Each subcommand lives in the module that owns it and receives its own argv, so
heavy dependencies (torch for training, rich and amqtt for the demo) are only
imported by the subcommands that need them.
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import os
import sys
from collections.abc import Callable, Sequence

from edge import __version__

# subcommand -> (module, function, one-line help, extra that provides its dependencies)
SUBCOMMANDS: dict[str, tuple[str, str, str, str | None]] = {
    "run": ("edge.daemon", "cli_run", "run the daemon", None),
    "check": ("edge.daemon", "cli_check", "validate a config, load its models, print the plan", None),
    "models": ("edge.modelinfo", "cli_models", "inspect model files (models show FILE)", None),
    "record": ("edge.record", "cli_record", "record a pipeline's features to CSV/Parquet", None),
    "learn": ("edge.learn.run", "cli_learn", "train a pipeline's model on the home's own history", None),
    "simulate": ("devices.simulate", "cli_simulate", "publish a simulated home to a broker", None),
    "demo": ("edge.demo", "cli_demo", "embedded broker + simulated home + daemon, live view", "demo"),
    "train": ("exporters.cli", "cli_train", "train a model from a recipe", "train"),
    "export": ("exporters.cli", "cli_export", "export a trained model to ONNX with its manifest", "train"),
    "quantize": ("exporters.cli", "cli_quantize", "quantize an ONNX model to int8 and verify it", "train"),
    "verify": ("exporters.cli", "cli_verify", "check parity, accuracy and speed of exported models", "train"),
    "bench": ("edge.benchcli", "cli_bench", "run the benchmark suite against a local Mosquitto", None),
}

INSTALL_HINT = {
    "train": (
        "install the training extra: pip install torch==2.13.0 (CPU build, first) "
        "then pip install 'edge-infer[train]'"
    ),
    "demo": "install the demo extra: pip install 'edge-infer[demo]'",
}


def event_loop(choice: str | None = None) -> str:
    """Use uvloop for the daemon's event loop when it is installed (the ``fast`` extra).

    ``EDGE_INFER_LOOP`` chooses: ``auto`` (default: uvloop if importable, else asyncio),
    ``uvloop`` (warn and fall back when missing) or ``asyncio``. Returns the loop in use.
    uvloop runs the daemon's event loop in C: about 10-20 % more messages per CPU second
    (docs/performance.md).
    """
    choice = (choice or os.environ.get("EDGE_INFER_LOOP") or "auto").lower()
    if choice == "asyncio" or sys.platform == "win32":
        return "asyncio"
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            print(
                "edge-infer: EDGE_INFER_LOOP=uvloop but uvloop is not installed; using asyncio",
                file=sys.stderr,
            )
        return "asyncio"
    # A policy, so the daemon's own asyncio.run() builds a uvloop loop (Python 3.11-3.15).
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def tune_gc() -> None:
    """For the daemon: what is loaded by now (modules, code, settings) lives as long as the
    process, so keep it out of the collector's scans (``gc.freeze``), and collect the young
    generation every 10,000 net allocations instead of 700: a message makes a few dozen short-lived
    objects that reference counting frees anyway. About 7 % less CPU per message
    (docs/performance.md)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)
    from edge import memory

    memory.tune()  # large buffers get their own mappings, returned when freed (edge/memory.py)


def _usage() -> str:
    width = max(len(name) for name in SUBCOMMANDS)
    lines = [
        f"usage: edge-infer [--version] COMMAND [ARGS...]   (edge-infer {__version__})",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {spec[2]}" for name, spec in SUBCOMMANDS.items()]
    lines += ["", "Run 'edge-infer COMMAND --help' for a command's options."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if args else 2
    if args[0] in ("-V", "--version"):
        print(f"edge-infer {__version__}")
        return 0
    name, rest = args[0], args[1:]
    spec = SUBCOMMANDS.get(name)
    if spec is None:
        print(f"edge-infer: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name, _, extra = spec
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        missing = exc.name or str(exc)
        hint = INSTALL_HINT.get(extra or "", "reinstall edge-infer")
        print(f"edge-infer {name}: missing dependency {missing!r}; {hint}", file=sys.stderr)
        return 3
    func: Callable[[list[str]], int] = getattr(module, func_name)
    if name == "run":
        event_loop()
        tune_gc()
    return func(rest)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
