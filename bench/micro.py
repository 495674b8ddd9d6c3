"""``python -m bench.micro``: in-process A/B of one hot-path step, old code against new, interleaved.

CPU time per message of a step measured on its own, for changes whose end-to-end gain drowns in
the noise of a shared machine. Each repetition times both variants back to back (order
alternating); the verdict is the median over repetitions.

* ``answers``: post-processing and the answer's JSON for batches of 64, classification with the
  default ``top_k: 3`` (``json.dumps`` of a dict per answer, as edge/daemon.py did, against
  :meth:`edge.outputs.PostProcessor.answer`); ``--top-k 0`` for label and confidence only.
* ``drift``: the inputs watch's :class:`edge.drift.DriftMonitor` for the zoo occupancy model's 4
  features over 20,000 readings, per reading: each diagnostic's text formatted on every reading,
  as edge/drift.py did, against the text built only when a diagnostic flips.
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import numpy as np

from edge.drift import Diagnostic, DriftMonitor, FeatureMonitor, training_stats
from edge.outputs import PostProcessor, softmax


def _old_iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _old_classify(post: PostProcessor, raw: np.ndarray, top_k: int) -> list[dict[str, Any]]:
    """edge/outputs.py before the change."""
    probs = softmax(raw)
    top = np.argsort(-probs, axis=1)[:, : max(1, top_k)]
    results = []
    for row, order in zip(probs, top, strict=True):
        best = int(order[0])
        confidence = float(row[best])
        label = post.labels[best] if confidence >= 0.0 else None
        fields: dict[str, Any] = {"label": label, "confidence": round(confidence, 4)}
        if top_k:
            fields["top_k"] = [
                {"label": post.labels[int(i)], "p": round(float(row[int(i)]), 4)} for i in order
            ]
        results.append(fields)
    return results


def answers(batch: int = 64, batches: int = 200, top_k: int = 3) -> dict[str, Callable[[], float]]:
    spec = SimpleNamespace(
        name="ff", version="1.0.0", task="classification", output_kind="logits", labels=("a", "b", "c", "d")
    )
    post = PostProcessor(spec, SimpleNamespace(top_k=top_k, min_confidence=0.0))  # type: ignore[arg-type]
    rng = np.random.default_rng(1)
    raws = [rng.normal(size=(batch, 4)).astype(np.float32) for _ in range(batches)]
    now = time.time()

    def old() -> float:
        began = time.process_time()
        for raw in raws:
            for fields in _old_classify(post, raw, top_k):
                body = {**fields, "model": "ff", "model_version": "1.0.0", "latency_ms": round(1.2345678, 3)}
                body["ts"] = _old_iso(now)
                json.dumps(body).encode()
        return (time.process_time() - began) / (batch * batches)

    def new() -> float:
        began = time.process_time()
        for raw in raws:
            for prediction in post(raw):
                post.answer(prediction, 1.2345678, now, None)
        return (time.process_time() - began) / (batch * batches)

    return {"old": old, "new": new}


class _OldFeatureMonitor(FeatureMonitor):
    """FeatureMonitor with ``observe`` as edge/drift.py had it before 8f05f3c (verbatim): every
    diagnostic's text formatted on every reading."""

    def observe(self, value: float, out: list[Diagnostic]) -> None:
        """Take one reading; appends to ``out`` any diagnostic raised or cleared."""
        if not math.isfinite(value):
            return
        b = bisect.bisect_right(self.edges, value)
        slot = self.seen % self.window
        old = self.ring[slot]
        if self.seen >= self.window:
            self.counts[old] -= 1
        self.ring[slot] = b
        self.counts[b] += 1
        self.seen += 1
        if self.seen >= self.window and self.stats.judge_drift:
            self._update_psi((b,) if b == old else (b, old))
            if self.psi > self.psi_alarm:
                self._flip("drift", True, f"PSI {self.psi:.2f} over the last {self.window} samples", out)
            elif self.psi < self.psi_clear:
                self._flip("drift", False, f"PSI {self.psi:.2f}", out)
        if value < self.low or value > self.high:
            self.outside += 1
        else:
            self.outside = 0
        self._flip(
            "out_of_range",
            self.outside >= self.range_after,
            f"{value:g} outside training range [{self.stats.min:g}, {self.stats.max:g}]",
            out,
        )
        self.run = self.run + 1 if value == self.last else 1
        self.last = value
        self._flip(
            "stuck",
            self.run >= self.stuck_after,
            f"{value:g} for {self.run} samples (training's longest run {self.stats.longest_run})",
            out,
        )


def drift(readings: int = 20_000) -> dict[str, Callable[[], float]]:
    rng = np.random.default_rng(0)
    centre, spread = np.array([21.0, 45.0, 300.0, 600.0]), np.array([2.0, 5.0, 100.0, 200.0])
    rows = (rng.normal(size=(readings, 4)) * spread + centre).tolist()
    features = ("temperature", "humidity", "illuminance", "co2")
    stats = training_stats(features, rng.normal(size=(5000, 4)) * spread + centre, pooled=True)

    def old() -> float:
        monitor = DriftMonitor(stats)
        monitor.features = [_OldFeatureMonitor(s) for s in stats]
        began = time.process_time()
        for row in rows:
            monitor.observe(row)
        return (time.process_time() - began) / readings

    def new() -> float:
        monitor = DriftMonitor(stats)
        began = time.process_time()
        for row in rows:
            monitor.observe(row)
        return (time.process_time() - began) / readings

    return {"old": old, "new": new}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.micro", description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=["answers", "drift"])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--top-k", type=int, default=3)
    opts = parser.parse_args(argv)
    variants = answers(top_k=opts.top_k) if opts.step == "answers" else drift()
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for rep in range(opts.reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            times[name].append(variants[name]())
    base = statistics.median(times[names[0]])
    for name in names:
        median = statistics.median(times[name])
        print(f"{opts.step} {name}: {median * 1e6:.2f} µs CPU per message (x{median / base:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
