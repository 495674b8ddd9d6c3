"""``python -m bench.loop_cpu``: CPU per message of the daemon's event-loop side, in process.

A daemon built on a running loop but never connected; messages go straight into
``Daemon.on_message`` and every 64 queued inputs are answered through the batcher's sink with a
fixed output (inference is not timed, nor the broker). Process CPU time per message, median over
repetitions. To compare two trees, run it from each (``PYTHONPATH=<tree>``), interleaved.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from edge.batcher import Batcher
from edge.daemon import Daemon
from tests.harness import make_config
from tests.test_daemon import base_config


async def measure(messages: int, reps: int, devices: int = 50) -> list[float]:
    tmp = Path(tempfile.mkdtemp(prefix="loop-cpu-"))
    data = base_config("mqtt://127.0.0.1:1", "b", tmp)
    daemon = Daemon(make_config(data, tmp))
    model = daemon.models["snap"]
    batcher = Batcher(model, functools.partial(daemon._sink, model))  # as the daemon wires it, not run
    daemon.batchers["snap"] = batcher
    rng = np.random.default_rng(1)
    payloads = [
        json.dumps({"temperature": 20 + float(rng.normal()), "humidity": 50.0, "co2": 600.0}).encode()
        for _ in range(256)
    ]
    topics = [f"b/z2m/dev{i}" for i in range(devices)]
    outputs = np.zeros((64, len(model.spec.labels)), dtype=np.float32)
    results = []
    try:
        for _ in range(reps):
            daemon.link.queue.clear()
            began = time.process_time()
            for i in range(messages):
                daemon.on_message(topics[i % devices], payloads[i % 256], None)
                if len(batcher.queue) >= 64:
                    batcher.sink([batcher.queue.popleft() for _ in range(64)], outputs, 0.001, None)
            results.append((time.process_time() - began) / messages * 1e6)
    finally:
        for m in daemon.models.values():
            m.close()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loop_cpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--reps", type=int, default=5)
    opts = parser.parse_args(argv)
    results = asyncio.run(measure(opts.messages, opts.reps))
    print(
        f"loop CPU per message: median {statistics.median(results):.2f} us, min {min(results):.2f} us "
        f"({opts.reps} x {opts.messages} messages: {', '.join(f'{r:.2f}' for r in results)})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
