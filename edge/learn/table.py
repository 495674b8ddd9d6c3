"""History -> training table, with the daemon's own feature code.

The pipeline is built as the daemon builds it (:class:`edge.pipeline.Pipeline`)
and its :class:`~edge.features.FeatureStore` is fed the entities' state changes
in time order, one reading per change, as the daemon is fed them by MQTT: the
same resampling (sample and hold), ``max_gap_s`` restarts, hop and snapshot
freshness. So the vectors learn trains on are the ones the daemon will infer on.

Gaps, never values: a state ``unavailable``/``unknown`` (or one that is not a
number) restarts the device's window, and it is fed again, with all its known
readings, once every reading has a value. An excluded span (``learn.exclude``)
restarts every device's window at its start, and a device is fed again once
each of its readings has a value reported after the span's end, so no window
holds a value from inside it.

Each vector is labelled at its own time (the window's newest sample): from a
label entity, a teacher rule or, for corrections, the stored label. Vectors
without a label are counted and left out.

The table is written in ``edge-infer record``'s row format
(:func:`edge.record.columns_for`), which ``edge-infer train`` reads.
"""

from __future__ import annotations

import bisect
import csv
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edge.config import Config, ConfigError, LearnConfig, LearnLabels, TeacherRule
from edge.decode import DecodeError
from edge.learn.history import GAP_STATES, EntityHistory, StateChange
from edge.pipeline import Pipeline
from edge.record import columns_for, recording_spec
from edge.runtime import ModelSpec

#: the label of every window of an anomaly table (learn.anomaly: the data marked normal, no labels)
NORMAL = "normal"
BINARY = {"on": 1.0, "off": 0.0, "true": 1.0, "false": 0.0, "open": 1.0, "closed": 0.0}


@dataclass
class Table:
    """Labelled model inputs, in time order."""

    pipeline: str
    spec: ModelSpec
    ts: npt.NDArray[np.float64]
    devices: list[str]
    labels: list[str]
    x: npt.NDArray[np.float32]  # [N, *sample_shape]
    start: float
    end: float
    stats: Counter[str] = field(default_factory=Counter)
    #: what long-term statistics fed (edge/learn/statistics.py summary); empty: states only
    statistics: dict[str, Any] = field(default_factory=dict)

    @property
    def columns(self) -> list[str]:
        return columns_for(self.spec)

    def __len__(self) -> int:
        return len(self.labels)

    def class_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(self.labels).items()))

    def write_csv(self, path: Path, split: Sequence[str] | None = None) -> None:
        """``edge-infer record``'s CSV (ts, device, pipeline, label, features) plus, with
        ``split``, a ``split`` column (train/val/test) that ``edge-infer train`` follows."""
        path.parent.mkdir(parents=True, exist_ok=True)
        flat = self.x.reshape(len(self.x), -1)
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(
                ["ts", "device", "pipeline", "label", *self.columns, *(["split"] if split else [])]
            )
            for i in range(len(self.labels)):
                ts = datetime.fromtimestamp(float(self.ts[i]), UTC).isoformat(timespec="milliseconds")
                row = [ts, self.devices[i], self.pipeline, self.labels[i]]
                row += [repr(float(v)) for v in flat[i].tolist()]
                if split:
                    row.append(split[i])
                writer.writerow(row)


def _number(state: str) -> float | None:
    if state in GAP_STATES:
        return None
    binary = BINARY.get(state.lower())
    if binary is not None:
        return binary
    try:
        value = float(state)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


class StepSeries:
    """An entity's state as a step function of time (the last change at or before t)."""

    def __init__(self, changes: Sequence[StateChange]) -> None:
        self.times = [c.ts for c in changes]
        self.states = [c.state for c in changes]

    def at(self, ts: float) -> str | None:
        i = bisect.bisect_right(self.times, ts) - 1
        return self.states[i] if i >= 0 else None


class _AnyOn:
    """On when any of the entities is on at t or was on within the last ``within_s``."""

    def __init__(self, series: list[StepSeries], within_s: float) -> None:
        self.series = series
        self.within_s = within_s
        # per entity: sorted (start, end) of its "on" intervals
        self.intervals: list[tuple[list[float], list[float]]] = []
        for s in series:
            starts: list[float] = []
            ends: list[float] = []
            for i, state in enumerate(s.states):
                if state == "on":
                    starts.append(s.times[i])
                    ends.append(s.times[i + 1] if i + 1 < len(s.times) else math.inf)
            self.intervals.append((starts, ends))

    def at(self, ts: float) -> bool | None:
        known = False
        for s, (starts, ends) in zip(self.series, self.intervals, strict=True):
            state = s.at(ts)
            if state is not None and state not in GAP_STATES:
                known = True
            # the last "on" interval that began at or before ts
            i = bisect.bisect_right(starts, ts) - 1
            if i >= 0 and ends[i] >= ts - self.within_s:
                return True
        return False if known else None


Labeller = Callable[[float], str | None]


def label_entities(labels: LearnLabels, device: str) -> list[str]:
    """The entities a device's labels are read from (``{device}`` substituted)."""
    if labels.entity is not None:
        return [labels.entity.replace("{device}", device)]
    teacher = labels.teacher
    if teacher is None:
        return []
    if teacher.entity is not None:
        return [teacher.entity.replace("{device}", device)]
    return [e.replace("{device}", device) for e in teacher.any_on or []]


def make_labeller(labels: LearnLabels, device: str, history: EntityHistory) -> Labeller:
    """The class of ``device`` at time t, or None (unlabelled)."""
    entities = label_entities(labels, device)
    series = [StepSeries(history.get(e, [])) for e in entities]
    if labels.entity is not None:
        mapping = labels.map
        one = series[0]

        def by_entity(ts: float) -> str | None:
            state = one.at(ts)
            if state is None or state in GAP_STATES:
                return None
            return mapping.get(state) if mapping is not None else state

        return by_entity
    teacher = labels.teacher
    assert teacher is not None
    return _teacher(teacher, series)


def _teacher(rule: TeacherRule, series: list[StepSeries]) -> Labeller:
    if rule.any_on is not None:
        any_on = _AnyOn(series, rule.within_s)

        def by_motion(ts: float) -> str | None:
            on = any_on.at(ts)
            return None if on is None else (rule.on if on else rule.off)

        return by_motion
    one = series[0]

    def by_threshold(ts: float) -> str | None:
        state = one.at(ts)
        value = _number(state) if state is not None else None
        if value is None:
            return None
        hit = value > rule.above if rule.above is not None else value < (rule.below or 0.0)
        return rule.on if hit else rule.off

    return by_threshold


def pipeline_for(name: str, config: Config) -> Pipeline:
    """The pipeline exactly as the daemon builds it (its model file when it exists, else the config)."""
    cfg = config.pipelines[name]
    return Pipeline(name, cfg, recording_spec(name, cfg, config), config)


def check_inputs(name: str, learn: LearnConfig, spec: ModelSpec) -> None:
    for device, mapping in learn.inputs.items():
        key = f"pipelines.{name}.learn.inputs.{device}"
        missing = [f for f in spec.features if f not in mapping]
        extra = [f for f in mapping if f not in spec.features]
        if missing or extra:
            raise ConfigError(
                key,
                f"the model takes {list(spec.features)}"
                + (f"; map {missing}" if missing else "")
                + (f"; {extra} are not model features" if extra else ""),
            )


# event kinds, in the order they apply at one timestamp
_EXCL_END, _VALUE, _EXCL_START = 0, 1, 2


def build_table(
    name: str,
    config: Config,
    history: EntityHistory,
    start: float,
    end: float,
    *,
    pipeline: Pipeline | None = None,
    label_history: EntityHistory | None = None,
) -> Table:
    """The labelled table of pipeline ``name`` from ``history`` in ``[start, end)``; labels are read
    from ``label_history`` when given (long-term statistics stamp a teacher's rows apart from an
    input's, edge/learn/statistics.py), else from ``history``."""
    learn = config.pipelines[name].learn
    if learn is None:
        raise ConfigError(f"pipelines.{name}.learn", "this pipeline has no learn section")
    if learn.labels is None and learn.anomaly is None:
        raise ConfigError(f"pipelines.{name}.learn.labels", "say where labels come from")
    pipe = pipeline or pipeline_for(name, config)
    spec = pipe.spec
    check_inputs(name, learn, spec)
    store = pipe.store
    stats: Counter[str] = Counter()
    labels_from = history if label_history is None else label_history
    rule = learn.labels
    labellers: dict[str, Labeller] = {
        device: (lambda _ts: NORMAL) if rule is None else make_labeller(rule, device, labels_from)
        for device in learn.inputs
    }
    # (ts, kind, seq, device, feature, value|None)
    events: list[tuple[float, int, int, str, str, float | None]] = []
    seq = 0
    for device, mapping in learn.inputs.items():
        for feature, entity in mapping.items():
            changes = history.get(entity, [])
            if not changes:
                stats[f"no history: {entity}"] += 1
            for change in changes:
                if change.ts >= end:
                    break
                value = _number(change.state)
                if value is None:
                    stats["gap states"] += 1
                events.append((change.ts, _VALUE, seq, device, feature, value))
                seq += 1
    spans = sorted((s.start.timestamp(), s.end.timestamp()) for s in learn.exclude)
    for s0, s1 in spans:
        events.append((s0, _EXCL_START, 0, "", "", None))
        events.append((s1, _EXCL_END, 0, "", "", None))
    events.sort(key=lambda e: (e[0], e[1], e[2]))

    known: dict[str, dict[str, float | None]] = {d: dict.fromkeys(m) for d, m in learn.inputs.items()}
    needs_full = dict.fromkeys(learn.inputs, False)
    excluded = 0
    ts_out: list[float] = []
    dev_out: list[str] = []
    lab_out: list[str] = []
    x_out: list[npt.NDArray[np.float32]] = []

    def emit(device: str, vector: npt.NDArray[np.float32] | None, ts: float) -> None:
        if vector is None or ts < start:
            return
        label = labellers[device](ts)
        if label is None:
            stats["unlabelled windows"] += 1
            return
        ts_out.append(ts)
        dev_out.append(device)
        lab_out.append(label)
        x_out.append(vector)

    def update(device: str, values: dict[str, float], ts: float) -> npt.NDArray[np.float32] | None:
        try:
            return store.update(device, values, ts)
        except DecodeError as exc:  # what the daemon would drop and count (stale, unknown device)
            stats[f"dropped: {exc.reason}"] += 1
            return None

    def feed_full(device: str, ts: float) -> None:
        values = known[device]
        if all(v is not None for v in values.values()):
            needs_full[device] = False
            full = {k: v for k, v in values.items() if v is not None}
            emit(device, update(device, full, ts), ts)

    for ts, kind, _, device, feature, value in events:
        if kind == _EXCL_START:
            excluded += 1
            for d in learn.inputs:
                store.reset(d)
                needs_full[d] = True
                known[d] = dict.fromkeys(known[d])  # no reading from inside the span is held over it
            continue
        if kind == _EXCL_END:
            excluded -= 1
            continue
        if excluded:
            stats["readings in excluded spans"] += 1
            continue
        known[device][feature] = value
        if value is None:
            store.reset(device)
            needs_full[device] = True
            continue
        if needs_full[device]:
            feed_full(device, ts)
            continue
        emit(device, update(device, {feature: value}, ts), ts)
    shape = spec.sample_shape
    x = np.stack(x_out).astype(np.float32) if x_out else np.zeros((0, *shape), dtype=np.float32)
    return Table(name, spec, np.array(ts_out, dtype=np.float64), dev_out, lab_out, x, start, end, stats)


def table_from_rows(
    name: str,
    spec: ModelSpec,
    rows: Sequence[tuple[float, str, str, Sequence[float]]],
    *,
    start: float,
    end: float,
    exclude: Sequence[tuple[float, float]] = (),
) -> Table:
    """A table from rows that are model inputs already (a record file, the corrections store).

    A row whose window reaches into an excluded span is left out (a window spans
    ``size * sample_period_s`` before its time when the model states its period)."""
    stats: Counter[str] = Counter()
    reach = 0.0
    if spec.layout == "window" and spec.sample_period_s:
        reach = spec.sample_shape[0] * spec.sample_period_s
    width = int(np.prod(spec.sample_shape))
    kept: list[tuple[float, str, str, Sequence[float]]] = []
    for ts, device, label, values in rows:
        if not start <= ts < end:
            continue
        if not label:
            stats["unlabelled windows"] += 1
            continue
        if len(values) != width:
            stats["rows of another input shape"] += 1
            continue
        if any(s0 - 1e-9 <= ts and ts - reach < s1 for s0, s1 in exclude):
            stats["rows in excluded spans"] += 1
            continue
        kept.append((ts, device, label, values))
    kept.sort(key=lambda r: r[0])
    x = (
        np.array([r[3] for r in kept], dtype=np.float32).reshape(len(kept), *spec.sample_shape)
        if kept
        else np.zeros((0, *spec.sample_shape), dtype=np.float32)
    )
    return Table(
        name,
        spec,
        np.array([r[0] for r in kept], dtype=np.float64),
        [r[1] for r in kept],
        [r[2] for r in kept],
        x,
        start,
        end,
        stats,
    )
