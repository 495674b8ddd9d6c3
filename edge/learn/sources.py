"""Open the history source a pipeline's ``learn.source`` names.

``ha`` and ``recorder_db`` yield entity histories (:class:`~edge.learn.history.HistorySource`);
their modules are imported only when used. ``record`` is the daemon's own
recordings (``edge-infer record``): rows that are already model inputs, built by
the daemon's feature code when they were recorded, so they are read as they are
(:class:`RecordTable`), not resampled again.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from edge.config import ConfigError, LearnSource, read_limited
from edge.learn.history import EntityHistory, HistorySource, StatisticRow

MAX_TOKEN_BYTES = 16 * 1024


@dataclass(frozen=True)
class RecordRow:
    ts: float
    device: str
    label: str
    values: list[float]


class RecordTable:
    """The rows of an ``edge-infer record`` file (CSV, or Parquet with pandas)."""

    def __init__(self, path: Path, key: str = "learn.source.record") -> None:
        self.path = path
        self.key = key

    def describe(self) -> str:
        return f"edge-infer record file {self.path}"

    def read(self, pipeline: str, columns: list[str]) -> list[RecordRow]:
        """Rows of ``pipeline`` (rows of other pipelines are skipped) with ``columns`` as values."""
        header, rows = self._raw()
        missing = [c for c in ("ts", "device", "label", *columns) if c not in header]
        if missing:
            raise ConfigError(
                self.key, f"{self.path} lacks the columns {missing[:6]} the pipeline's model takes"
            )
        index = {name: i for i, name in enumerate(header)}
        at = [index[c] for c in columns]
        out: list[RecordRow] = []
        for row in rows:
            if "pipeline" in index and row[index["pipeline"]] not in ("", pipeline):
                continue
            try:
                values = [float(row[i]) for i in at]
            except (ValueError, IndexError):
                continue
            if not all(math.isfinite(v) for v in values):
                continue
            ts = _parse_ts(str(row[index["ts"]]))
            if ts is None:
                continue
            out.append(RecordRow(ts, str(row[index["device"]]), str(row[index["label"]]), values))
        out.sort(key=lambda r: r.ts)
        return out

    def _raw(self) -> tuple[list[str], list[list[Any]]]:
        if not self.path.is_file():
            raise ConfigError(self.key, f"{self.path} does not exist")
        if self.path.suffix.lower() in (".parquet", ".pq"):
            try:
                import pandas as pd
            except ImportError:
                raise ConfigError(
                    self.key, "reading Parquet needs pandas and pyarrow (pip install 'edge-infer[train]')"
                ) from None
            df = pd.read_parquet(self.path)
            return [str(c) for c in df.columns], df.astype(object).values.tolist()
        with self.path.open(newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            header = next(reader, [])
            return header, list(reader)


class MemorySource:
    """A history held in memory (tests, simulations, a history read once and reused)."""

    def __init__(
        self,
        history: EntityHistory,
        name: str = "history in memory",
        statistics: dict[str, dict[str, list[StatisticRow]]] | None = None,
    ) -> None:
        self.history = history
        self.name = name
        self.rows = statistics or {}  # period ("hour", "5minute") -> statistic id -> rows by start

    def describe(self) -> str:
        return self.name

    def states(self, entity_ids: Sequence[str], start: float, end: float) -> EntityHistory:
        out: EntityHistory = {}
        for entity in entity_ids:
            changes = self.history.get(entity, [])
            before = [c for c in changes if c.ts < start][-1:]
            out[entity] = before + [c for c in changes if start <= c.ts < end]
        return out

    def statistics(
        self, statistic_ids: Sequence[str], start: float, end: float, period: str = "hour"
    ) -> dict[str, list[StatisticRow]]:
        rows = self.rows.get(period, {})
        return {s: [r for r in rows.get(s, []) if start <= r.start < end] for s in statistic_ids}


def _parse_ts(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when.timestamp() if when.tzinfo is not None else None


def read_token(source: LearnSource, key: str = "learn.source.ha") -> str:
    """The long-lived token from its file or environment variable (never logged or shown)."""
    ha = source.ha
    assert ha is not None
    if ha.token_file is not None:
        raw = read_limited(ha.token_file, f"{key}.token_file", MAX_TOKEN_BYTES, "the token file")
        token = raw.decode("utf-8", "replace").strip().splitlines()[0:1]
        if not token or not token[0].strip():
            raise ConfigError(f"{key}.token_file", f"{ha.token_file}: the first line is empty")
        return token[0].strip()
    assert ha.token_env is not None
    value = os.environ.get(ha.token_env, "").strip()
    if not value:
        raise ConfigError(f"{key}.token_env", f"environment variable {ha.token_env} is not set")
    return value


def describe_source(source: LearnSource) -> str:
    """What the model card says the data came from (never the token)."""
    if source.ha is not None:
        where = source.ha.url or "the Supervisor's proxy (add-on)"
        return f"Home Assistant at {where} (WebSocket API)"
    if source.recorder_db is not None:
        return f"Home Assistant recorder database {source.recorder_db}"
    return f"edge-infer record file {source.record}"


def open_source(source: LearnSource, key: str = "learn.source") -> HistorySource | RecordTable:
    """The history source ``source`` names; ``key`` is its config key, for errors."""
    if source.record is not None:
        return RecordTable(source.record, f"{key}.record")
    if source.recorder_db is not None:
        from edge.learn.recorder_db import RecorderDbSource  # type: ignore[import-not-found,unused-ignore]

        db: HistorySource = RecorderDbSource(path=source.recorder_db)
        return db
    assert source.ha is not None
    from edge.learn.ha_ws import (  # type: ignore[import-not-found,unused-ignore]
        HaWebSocketSource,
        from_settings,
    )

    if source.ha.url is None:  # inside the add-on: the Supervisor's proxy and token
        supervised: HistorySource = from_settings(where=f"{key}.ha")
        return supervised
    ws: HistorySource = HaWebSocketSource(url=source.ha.url, token=read_token(source, f"{key}.ha"))
    return ws


def close_source(source: object) -> None:
    """Close a source that holds a connection (the WebSocket, the SQLite file)."""
    close = getattr(source, "close", None)
    if callable(close):
        close()
