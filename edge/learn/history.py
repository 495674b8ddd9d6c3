"""The one shape every history source yields, and the protocol a source implements.

A source (Home Assistant's WebSocket API, a copy of the recorder's SQLite
file, the daemon's own recordings) returns, per entity, its state changes in
time order. States are kept as HA stores them: strings, with ``unavailable``
and ``unknown`` passed through (the feature code turns them into gaps, never
values). Times are Unix seconds (UTC), the state's ``last_updated``, so two
sources reading the same recorder give identical histories.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


class SourceError(RuntimeError):
    """Reading history failed (Home Assistant unreachable, token refused, a database that is not a
    recorder's); the message names the place (URL with credentials masked, file, command)."""


#: HA states that are never values: they open a gap.
GAP_STATES = frozenset({"unavailable", "unknown", "", "None"})


@dataclass(frozen=True, slots=True)
class StateChange:
    """One recorded state of one entity."""

    ts: float
    state: str
    attributes: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StatisticRow:
    """One long-term statistics row (hourly or 5-minute) of one statistic id."""

    start: float
    mean: float | None = None
    min: float | None = None
    max: float | None = None
    state: float | None = None
    sum: float | None = None


#: entity_id -> state changes sorted by ts (ties kept in recorder order).
EntityHistory = dict[str, list[StateChange]]


class HistorySource(Protocol):
    """Where history comes from. Implementations must not log credentials."""

    def states(self, entity_ids: Sequence[str], start: float, end: float) -> EntityHistory:
        """State changes of ``entity_ids`` in ``[start, end)``, plus each entity's
        last state before ``start`` (stamped at its own time) so the value at
        ``start`` is known."""
        ...

    def statistics(
        self, statistic_ids: Sequence[str], start: float, end: float, period: str = "hour"
    ) -> dict[str, list[StatisticRow]]:
        """Long-term statistics rows (``period`` is ``5minute`` or ``hour``)."""
        ...
