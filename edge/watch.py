"""Inputs watched in the daemon: a :class:`~edge.drift.DriftMonitor` per pipeline and device.

What a reading is: for a snapshot model, the vector of one inference (one value per feature);
for a window model, each new row of the window, per channel: at every inference the newest
``min(hop, window)`` rows (``features.hop``), so each resampled sample is seen once. After a
gap the window restarts and only its newest ``hop`` rows are read.

Only models whose manifest carries ``training_stats`` for exactly their input features are
watched (:func:`watched_stats`). Monitors are bounded by ``max_devices`` of the pipeline (least
recently seen first out, counted as ``evicted``). A diagnostic raised or cleared is

* logged (rate limited per pipeline and device),
* counted (``bridge/info`` pipeline ``inputs`` and ``edge_infer_input_diagnostics_total`` /
  ``edge_infer_input_diagnostics_active`` on ``/metrics``),
* published, retained, to ``<output topic>/inputs`` as ``{"problem": "ON"|"OFF",
  "diagnostics": [...]}`` (the Home Assistant ``problem`` binary sensor "Inputs unlike
  training", :func:`edge.discovery_payloads.output_components`),
* and kept as a flagged span (pipeline, device, feature, diagnostic, start, end) in
  ``flagged_spans.json`` beside ``state.file``, which ``edge-infer learn`` leaves out of the
  next training unless ``learn.keep_flagged`` (or ``--keep-flagged``) is set.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edge.drift import Diagnostic, DriftMonitor, FeatureStats, Kind
from edge.logsetup import RateLimitedLogger
from edge.mqtt import Outgoing
from edge.runtime import ModelSpec

log = logging.getLogger("edge.watch")

SPANS_FILE = "flagged_spans.json"
MAX_SPANS = 2000  # the oldest closed spans go first; dropped ones are counted in the file
KINDS: tuple[Kind, ...] = ("drift", "out_of_range", "stuck")
SUFFIX = "/inputs"


def watched_stats(spec: ModelSpec) -> list[FeatureStats] | None:
    """The manifest's training statistics when they describe exactly this input; else None."""
    manifest = spec.manifest
    if manifest is None or manifest.training_stats is None or spec.layout not in ("snapshot", "window"):
        return None
    stats = manifest.training_stats
    if tuple(s.name for s in stats) != spec.features:
        return None  # the config renamed or reordered the features: the figures do not apply
    return list(stats)


def spans_path(state_file: Path | None) -> Path | None:
    return None if state_file is None else state_file.parent / SPANS_FILE


@dataclass
class Span:
    pipeline: str
    device: str
    feature: str
    diagnostic: str
    start: float
    end: float | None = None  # None while the diagnostic is raised
    detail: str = ""


class FlaggedSpans:
    """Flagged spans, bounded (``max_spans``), kept in a small JSON file written atomically."""

    def __init__(self, path: Path | None, max_spans: int = MAX_SPANS) -> None:
        self.path = path
        self.max_spans = max_spans
        self.spans: list[Span] = []
        self.dropped = 0
        self.dirty = False
        self.open: dict[tuple[str, str, str, str], Span] = {}
        if path is not None and path.is_file():
            try:
                self.spans, self.dropped = read_spans(path)
            except (OSError, ValueError) as exc:
                log.warning("flagged spans %s unreadable, starting empty: %s", path, exc)
        now = time.time()
        for span in self.spans:  # raised when the daemon stopped: closed at its restart
            if span.end is None:
                span.end = now
                self.dirty = True

    def raise_(self, pipeline: str, device: str, d: Diagnostic, ts: float) -> None:
        key = (pipeline, device, d.feature, d.kind)
        if key in self.open:
            return
        span = Span(pipeline, device, d.feature, d.kind, ts, None, d.detail)
        self.open[key] = span
        self.spans.append(span)
        self.dirty = True
        while len(self.spans) > self.max_spans:
            old = next((s for s in self.spans if s.end is not None), self.spans[0])
            self.spans.remove(old)
            self.open = {k: v for k, v in self.open.items() if v is not old}
            self.dropped += 1

    def clear(self, pipeline: str, device: str, d: Diagnostic, ts: float) -> None:
        span = self.open.pop((pipeline, device, d.feature, d.kind), None)
        if span is not None:
            span.end = max(ts, span.start)
            self.dirty = True

    def dump(self) -> str:
        return json.dumps({"dropped": self.dropped, "spans": [asdict(s) for s in self.spans]})

    def write(self, text: str) -> None:
        """Blocking: call through ``asyncio.to_thread``."""
        assert self.path is not None
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.path)


def read_spans(path: Path) -> tuple[list[Span], int]:
    """The spans in ``path`` and the count of those dropped to keep it bounded."""
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("spans"), list):
        raise ValueError("not a flagged-spans file (want {'spans': [...]})")
    spans = [Span(**s) for s in data["spans"]]
    for s in spans:
        if not isinstance(s.start, int | float) or not (s.end is None or isinstance(s.end, int | float)):
            raise ValueError(f"span start/end must be numbers: {s}")
    return spans, int(data.get("dropped", 0))


class PipelineWatch:
    """The monitors of one pipeline, one per device, bounded."""

    def __init__(self, name: str, spec: ModelSpec, stats: list[FeatureStats], rows: int, max_devices: int):
        self.name = name
        self.spec = spec
        self.stats = stats
        self.rows = rows
        self.max_devices = max_devices
        self.monitors: OrderedDict[str, DriftMonitor] = OrderedDict()
        self.raised: Counter[str] = Counter()
        self.cleared: Counter[str] = Counter()
        self.evicted = 0
        self.samples = 0
        self.seconds = 0.0  # time spent observing (for the cost per sample)

    def monitor(self, device: str) -> tuple[DriftMonitor, bool]:
        m = self.monitors.get(device)
        if m is not None:
            self.monitors.move_to_end(device)
            return m, False
        if len(self.monitors) >= self.max_devices:
            self.monitors.popitem(last=False)
            self.evicted += 1
        m = self.monitors[device] = DriftMonitor(self.stats)
        return m, True

    def active(self) -> Counter[str]:
        counts: Counter[str] = Counter()
        for m in self.monitors.values():
            for kinds in m.active.values():
                counts.update(kinds)
        return counts

    def info(self) -> dict[str, Any]:
        return {
            "devices": len(self.monitors),
            "samples": self.samples,
            "us_per_sample": round(self.seconds / self.samples * 1e6, 2) if self.samples else None,
            "raised": dict(self.raised),
            "cleared": dict(self.cleared),
            "active": dict(self.active()),
            "evicted": self.evicted,
        }


def state_payload(monitor: DriftMonitor, ts: float) -> bytes:
    diagnostics: list[dict[str, Any]] = []
    for fm in monitor.features:
        for kind in sorted(fm.active):
            entry: dict[str, Any] = {"feature": fm.stats.name, "diagnostic": kind}
            if kind == "drift":
                entry["psi"] = round(fm.psi, 3)
            diagnostics.append(entry)
    body = {"problem": "ON" if diagnostics else "OFF", "diagnostics": diagnostics, "ts": round(ts, 3)}
    return json.dumps(body).encode()


class InputWatch:
    """Every watched pipeline of the daemon; fed on the event loop, O(features) per reading."""

    def __init__(
        self,
        publish: Callable[[Outgoing], None],
        ratelog: RateLimitedLogger,
        state_file: Path | None,
    ) -> None:
        self.publish = publish
        self.ratelog = ratelog
        self.spans = FlaggedSpans(spans_path(state_file))
        self.pipelines: dict[str, PipelineWatch | None] = {}
        self.write_errors = 0

    def _for(self, pipeline: Any) -> PipelineWatch | None:
        """The watch of a daemon Pipeline, rebuilt when its model's figures change (reload)."""
        name: str = pipeline.name
        spec: ModelSpec = pipeline.spec
        current = self.pipelines.get(name)
        if name in self.pipelines and (current is None or current.spec is spec):
            return current
        stats = watched_stats(spec)
        if stats is None:
            self.pipelines[name] = None
            return None
        if current is not None and current.stats == stats:
            current.spec = spec
            return current
        window = spec.sample_shape[0] if spec.layout == "window" else 1
        hop = getattr(pipeline.cfg.features, "hop", 1)
        watch = PipelineWatch(name, spec, stats, min(hop, window), pipeline.cfg.max_devices)
        self.pipelines[name] = watch
        return watch

    def observe(self, pipeline: Any, items: Iterable[Any]) -> None:
        """The work items a message produced (``device``, ``vector``, ``ts``); never raises
        for a value (NaN/inf readings are skipped by the monitor)."""
        watch = self._for(pipeline)
        if watch is None:
            return
        for item in items:
            started = time.perf_counter()
            monitor, new = watch.monitor(item.device)
            vector = item.vector
            changes: list[Diagnostic] = []
            if watch.spec.layout == "window":
                for row in vector[-watch.rows :]:
                    changes += monitor.observe(row.tolist())
                watch.samples += watch.rows
            else:
                changes = monitor.observe(vector.tolist())
                watch.samples += 1
            watch.seconds += time.perf_counter() - started
            if new or changes:
                self._changed(pipeline, watch, item, monitor, changes)

    def _changed(
        self,
        pipeline: Any,
        watch: PipelineWatch,
        item: Any,
        monitor: DriftMonitor,
        changes: Sequence[Diagnostic],
    ) -> None:
        device: str = item.device
        ts: float = item.ts
        for d in changes:
            if d.raised:
                watch.raised[d.kind] += 1
                self.spans.raise_(watch.name, device, d, ts)
                self.ratelog.warning(
                    watch.name,
                    f"inputs:{device}",
                    "inputs unlike training: pipeline %s device %r feature %s: %s (%s)",
                    watch.name,
                    device[:40],
                    d.feature,
                    d.kind,
                    d.detail,
                    pipeline=watch.name,
                    device=device[:40],
                    feature=d.feature,
                    diagnostic=d.kind,
                )
            else:
                watch.cleared[d.kind] += 1
                self.spans.clear(watch.name, device, d, ts)
                self.ratelog.info(
                    watch.name,
                    f"inputs-cleared:{device}",
                    "inputs like training again: pipeline %s device %r feature %s: %s cleared",
                    watch.name,
                    device[:40],
                    d.feature,
                    d.kind,
                    pipeline=watch.name,
                    device=device[:40],
                )
        topic = pipeline.output_topic(device) + SUFFIX
        self.publish(Outgoing(topic, state_payload(monitor, ts), 1, True))

    def info(self, name: str) -> dict[str, Any] | None:
        watch = self.pipelines.get(name)
        return watch.info() if watch is not None else None

    async def save(self) -> None:
        """Write the flagged spans beside the state file when they changed (off the loop)."""
        if self.spans.path is None or not self.spans.dirty:
            return
        self.spans.dirty = False
        try:
            await asyncio.to_thread(self.spans.write, self.spans.dump())
        except OSError as exc:
            self.spans.dirty = True
            self.write_errors += 1
            log.warning("could not write the flagged spans %s: %s", self.spans.path, exc)

    def collector(self) -> Collector:
        return _WatchCollector(self)


class _WatchCollector(Collector):
    def __init__(self, watch: InputWatch) -> None:
        self.watch = watch

    def collect(self) -> Iterator[Metric]:
        raised = CounterMetricFamily(
            "edge_infer_input_diagnostics",
            "Input diagnostics raised (inputs unlike training), by pipeline and diagnostic.",
            labels=["pipeline", "diagnostic"],
        )
        active = GaugeMetricFamily(
            "edge_infer_input_diagnostics_active",
            "Devices' features with an input diagnostic raised now, by pipeline and diagnostic.",
            labels=["pipeline", "diagnostic"],
        )
        for name, watch in sorted(self.watch.pipelines.items()):
            if watch is None:
                continue
            now = watch.active()
            for kind in KINDS:
                raised.add_metric([name, kind], watch.raised[kind])
                active.add_metric([name, kind], now[kind])
        yield raised
        yield active


def in_spans(device: str, ts: float, reach: float, spans: Sequence[Span]) -> bool:
    """Whether a row (its window reaches ``reach`` seconds back from ``ts``) touches a span."""
    for s in spans:
        end = math.inf if s.end is None else s.end
        if s.device == device and s.start - 1e-9 <= ts and ts - reach < end:
            return True
    return False
