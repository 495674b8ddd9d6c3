"""``python -m bench soak``: memory over 1,000,000 messages from 10,000 devices.

The daemon (snapshot pipeline, feed-forward model) answers an open-loop load at a fixed rate
below its saturation; its RSS is sampled every second. After the warm-up (the first
``--warmup`` fraction of the messages: every device seen, caches filled) the RSS must stay within
5 % of its value at the end of the warm-up. Writes ``bench/results/<date>-soak.json`` and a plot.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import models
from bench.loadgen import publish
from bench.runner import Bench, Settings, default_out_dir, machine
from bench.systems import PipelineSpec, edge_infer


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench soak", description=__doc__)
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=2_000.0, help="offered msg/s (below saturation)")
    parser.add_argument("--warmup", type=float, default=0.1, help="fraction of the messages")
    parser.add_argument("--chunk", type=int, default=50_000, help="messages per publisher round")
    parser.add_argument("--out", type=Path, default=None)
    opts = parser.parse_args(argv)
    result = soak(
        opts.messages,
        opts.devices,
        opts.rate,
        warmup=opts.warmup,
        chunk=opts.chunk,
        out_dir=opts.out or default_out_dir(),
    )
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))
    return 0 if result["flat"] else 1


def soak(
    messages: int, devices: int, rate: float, *, warmup: float, chunk: int, out_dir: Path
) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="edge-soak-"))
    bench = Bench(Settings(mode="soak"), workdir, lambda line: print(line, flush=True))
    spec = PipelineSpec("snap", bench.ff, tuple(models.FF_FEATURES), None, devices)
    system = edge_infer("edge-soak", "soak", bench.run_id, workdir, port=bench.port, pipelines=[spec])
    samples: list[tuple[float, int, float]] = []  # (seconds, messages sent so far, RSS MB)
    sent = 0
    received = 0
    stop = threading.Event()
    began = time.monotonic()

    def sample() -> None:
        while not stop.wait(1.0):
            samples.append((round(time.monotonic() - began, 1), sent, round(system.rss_mb(), 2)))

    try:
        bench.start(system)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        while sent < messages:
            n = min(chunk, messages - sent)
            publish(bench.port, system.streams, n, rate, processes=2, seed=sent)
            sent += n
            received += bench.sub.settle(n, idle_s=2.0, timeout_s=n / rate + 60)
            bench.sub.take()
            print(f"  {sent:,} sent, {received:,} answered, RSS {system.rss_mb():.1f} MB", flush=True)
        stop.set()
        sampler.join(5)
        peak = system.peak_rss_mb()
    finally:
        stop.set()
        system.stop()
        bench.close()
        shutil.rmtree(workdir, ignore_errors=True)
    after = [s for s in samples if s[1] >= warmup * messages]
    base = after[0][2] if after else None
    high = max(s[2] for s in after) if after else None
    low = min(s[2] for s in after) if after else None
    growth = (high - base) / base if base and high else None
    result: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": f"python -m bench soak --messages {messages} --devices {devices} --rate {rate:g}",
        "machine": machine(),
        "messages": messages,
        "devices": devices,
        "rate_msg_s": rate,
        "answered": received,
        "rss_after_warmup_mb": base,
        "rss_max_after_warmup_mb": high,
        "rss_min_after_warmup_mb": low,
        "growth_after_warmup": None if growth is None else round(growth, 4),
        "peak_rss_mb": round(peak, 1),
        "flat": growth is not None and growth <= 0.05 and (low is None or base is None or low >= 0.95 * base),
        "samples": samples,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / (result["date"][:19].replace(":", "") + "-soak")
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([s[1] for s in samples], [s[2] for s in samples])
        ax.axvline(warmup * messages, color="grey", ls="--", label="end of warm-up")
        if base:
            ax.axhspan(base * 0.95, base * 1.05, color="green", alpha=0.1, label="±5 % of post-warm-up RSS")
        ax.set_xlabel("messages sent")
        ax.set_ylabel("daemon RSS (MB)")
        ax.set_title(f"Memory soak: {messages:,} messages from {devices:,} devices")
        ax.legend()
        fig.tight_layout()
        fig.savefig(stem.with_name(stem.name + ".png"), dpi=110)
        plt.close(fig)
    except ImportError:
        pass
    return result
