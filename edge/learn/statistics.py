"""Long-term statistics where states are not available (``learn.source.statistics``).

Home Assistant purges states after ``purge_keep_days`` (10 by default) but keeps its hourly
long-term statistics (mean, min, max per hour) for good. With ``use: fill`` each mapped entity's
span before its oldest kept state (all of the period when it has no state) is fed from its
statistics rows; with ``use: only`` every numeric entity (the inputs and a teacher's threshold
entity) is fed from statistics alone. The rows become state changes of the entity and go through
:func:`edge.learn.table.build_table` like any state: the daemon's own feature code, one path.

Timing, so a window and its label come from the same rows:

* an **input** row is the entity's state at the row's start ``S`` (its ``value``: the mean, or the
  min or max). The serving code's sample and hold gives a resampled window ticking at ``t`` the
  value held *before* ``t``, so the window that ticks at ``S + period`` ends with row ``S``;
* a **teacher** row (a label from a numeric entity's threshold) is applied at its period's end
  ``S + period``, so that window is labelled by the same row ``S`` (a snapshot holds a reading at
  once: its teacher rows apply at their start, like its inputs).

A missing row (Home Assistant had no valid state in that period) is a gap, never a value: the
entity is ``unavailable`` from where the row would have started; so is the time between the last
row's end and the oldest state. Label entities that are not numeric (a helper, motion sensors)
have no statistics and keep their states.

Which pipelines may use them is checked with the config (:func:`edge.config.statistics_problem`):
a row stands for its whole period, so the model's inputs must be at least as coarse.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from edge.config import LearnConfig, LearnStatistics
from edge.learn.history import EntityHistory, HistorySource, StateChange, StatisticRow

GAP = "unavailable"
_EPS = 1e-6


@dataclass
class Filled:
    """What statistics fed, per entity: contiguous spans ``(from, to, rows)`` and counts."""

    entity: str
    role: str  # "input" or "label"
    spans: list[tuple[float, float, int]]
    rows: int
    gaps: int
    no_value: int  # rows without the configured value (e.g. sum-only statistics): gaps


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def numeric_label_entities(learn: LearnConfig, device: str) -> list[str]:
    """The label entities statistics may feed: a teacher's threshold entity (``{device}`` substituted)."""
    teacher = learn.labels.teacher if learn.labels is not None else None
    if teacher is None or teacher.entity is None:
        return []
    return [teacher.entity.replace("{device}", device)]


def statistics_entities(learn: LearnConfig) -> tuple[list[str], list[str]]:
    """(input entities, label entities) statistics may feed, each once, in config order."""
    inputs: list[str] = []
    labels: list[str] = []
    for device, mapping in learn.inputs.items():
        inputs += list(mapping.values())
        labels += numeric_label_entities(learn, device)
    return list(dict.fromkeys(inputs)), list(dict.fromkeys(labels))


def rows_as_states(
    rows: Sequence[StatisticRow],
    cfg: LearnStatistics,
    *,
    start: float,
    until: float,
    shift: float,
    closing: bool = False,
) -> tuple[list[StateChange], Filled]:
    """The rows whose period reaches into ``[start, until)`` as state changes stamped at
    ``row.start + shift``, with a gap where a row is missing and after the last row (when its period
    ends before ``until``). With ``closing`` (a resampled window's input), the row before each gap
    is stated once more at its period's end, so the window that ends with it ticks there before
    the gap restarts it (its value is the one held anyway)."""
    period = cfg.period_s
    marker: dict[str, Any] = {"statistics": cfg.period, "value": cfg.value}
    out: list[StateChange] = []
    spans: list[tuple[float, float, int]] = []
    gaps = no_value = 0
    expected: float | None = None
    span_from = 0.0
    span_rows = 0
    picked = [r for r in rows if r.start + period > start and r.start + shift < until]
    for row in picked:
        if expected is not None and row.start > expected + _EPS:  # a missing row: a gap
            if closing:
                out.append(StateChange(expected + shift, out[-1].state, marker))
            out.append(StateChange(expected + shift, GAP, marker))
            gaps += 1
            spans.append((span_from, expected, span_rows))
            expected = None
        if expected is None:
            span_from, span_rows = row.start, 0
        value = getattr(row, cfg.value)
        if value is None:
            no_value += 1
        out.append(StateChange(row.start + shift, GAP if value is None else repr(float(value)), marker))
        span_rows += 1
        expected = row.start + period
    if expected is not None:
        spans.append((span_from, min(expected, until), span_rows))
        if expected + shift < until:
            if closing:
                out.append(StateChange(expected + shift, out[-1].state, marker))
            out.append(StateChange(expected + shift, GAP, marker))
            gaps += 1
    return out, Filled("", "", [(max(a, start), b, n) for a, b, n in spans], len(picked), gaps, no_value)


def fill_from_statistics(
    source: HistorySource,
    history: EntityHistory,
    learn: LearnConfig,
    start: float,
    end: float,
    *,
    windowed: bool,
) -> tuple[EntityHistory, EntityHistory, list[Filled]]:
    """(the inputs' history, the labels' history, what was filled): ``history`` with the statistics
    rows of ``learn.source.statistics`` merged in (see the module's docstring); states are kept
    where they exist (``fill``) or replaced for the numeric entities (``only``). The two histories
    differ only in the entities statistics fed (an input's rows at their start; a teacher's at their
    end for a resampled window (``windowed``), at their start for a snapshot, whose vector holds a
    reading at once), so an entity that is both is right in each."""
    cfg = learn.source.statistics
    if cfg is None or not cfg.active:
        return history, history, []
    inputs, labels = statistics_entities(learn)
    period = cfg.period_s

    def until_of(entity: str) -> float:
        if cfg.use == "only":
            return end
        changes = history.get(entity) or []
        return min(changes[0].ts, end) if changes else end

    wanted = [e for e in dict.fromkeys(inputs + labels) if until_of(e) > start]
    if not wanted:
        return history, history, []
    rows = source.statistics(wanted, start - period, end, cfg.period)
    for_inputs: EntityHistory = dict(history)
    for_labels: EntityHistory = dict(history)
    filled: list[Filled] = []
    for role, entities, shift, target in (
        ("input", inputs, 0.0, for_inputs),
        ("label", labels, period if windowed else 0.0, for_labels),
    ):
        for entity in entities:
            if entity not in wanted:
                continue
            states, info = rows_as_states(
                rows.get(entity, []),
                cfg,
                start=start,
                until=until_of(entity),
                shift=shift,
                closing=windowed and role == "input",
            )
            info.entity, info.role = entity, role
            filled.append(info)
            kept = [] if cfg.use == "only" else list(history.get(entity) or [])
            target[entity] = states + kept
    return for_inputs, for_labels, filled


def summary(
    filled: Sequence[Filled],
    cfg: LearnStatistics,
    *,
    examples: int,
    from_statistics: int,
) -> dict[str, Any]:
    """The learn report's ``statistics`` entry (the card prints it)."""
    return {
        "use": cfg.use,
        "period": cfg.period,
        "value": cfg.value,
        "examples": from_statistics,
        "of_examples": examples,
        "entities": {
            f.entity if f.role == "input" else f"{f.entity} (label)": {
                "rows": f.rows,
                "gaps": f.gaps,
                "rows_without_value": f.no_value,
                "spans": [[_iso(a), _iso(b), n] for a, b, n in f.spans],
            }
            for f in filled
        },
    }


def examples_from_statistics(
    ts: Sequence[float],
    devices: Sequence[str],
    learn: LearnConfig,
    filled: Sequence[Filled],
    reach: float,
    *,
    windowed: bool,
) -> int:
    """How many examples hold a value from statistics (their oldest sample, ``reach`` seconds
    before them, is older than an input span's end) or are labelled from statistics."""
    period = learn.source.statistics.period_s if learn.source.statistics is not None else 0.0
    period = period if windowed else 0.0
    spans_of: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for f in filled:
        spans_of[(f.entity, f.role)] = [(a, b) for a, b, _ in f.spans]
    count = 0
    for t, device in zip(ts, devices, strict=True):
        mapping = learn.inputs.get(device, {})
        hit = any(
            t - reach < b and t >= a for e in mapping.values() for a, b in spans_of.get((e, "input"), [])
        )
        # a label row S applies from S + shift until the next row
        hit = hit or any(
            a + period <= t < b + period
            for e in numeric_label_entities(learn, device)
            for a, b in spans_of.get((e, "label"), [])
        )
        count += hit
    return count
