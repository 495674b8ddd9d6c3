"""History from a copy of Home Assistant's recorder database (``home-assistant_v2.db``).

``RecorderDbSource(path=...)`` implements :class:`edge.learn.history.HistorySource` on the
recorder's SQLite schema of Home Assistant 2023.4 and later (``states`` with
``last_updated_ts`` and ``metadata_id`` → ``states_meta``, attributes in ``state_attributes``;
``statistics`` / ``statistics_short_term`` with ``start_ts`` → ``statistics_meta``). It gives the
same :data:`~edge.learn.history.EntityHistory` as :class:`edge.learn.ha_ws.HaWebSocketSource`
reading the same recorder: the states in ``[start, end)`` at their ``last_updated``, plus each
entity's last state before ``start`` at its own time.

The file is opened read-only (``file:...?mode=ro``), so a copy on another machine is never
changed. Copy it consistently: with Home Assistant stopped, or while it runs with SQLite's backup
(``sqlite3 home-assistant_v2.db ".backup copy.db"``, or :func:`copy_recorder_db`); a plain copy of
a running recorder's file misses what is still in its ``-wal`` file.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

from edge.learn.history import EntityHistory, SourceError, StateChange, StatisticRow

log = logging.getLogger(__name__)

STATISTIC_TABLES = {"5minute": "statistics_short_term", "hour": "statistics"}
_REQUIRED = {
    "states": {"state", "last_updated_ts", "metadata_id", "attributes_id"},
    "states_meta": {"metadata_id", "entity_id"},
    "state_attributes": {"attributes_id", "shared_attrs"},
}


class RecorderDbError(SourceError):
    """The file is not a recorder database this source can read; the message says why."""


def _uri(path: Path, immutable: bool) -> str:
    uri = f"file:{quote(str(path.resolve()))}?mode=ro"
    return uri + "&immutable=1" if immutable else uri


def copy_recorder_db(source: str | Path, destination: str | Path) -> Path:
    """A consistent copy of a (possibly running) recorder database, with SQLite's backup API:
    what is still in the ``-wal`` file is included. ``source`` is only read."""
    src_path = Path(source)
    if not src_path.is_file():
        raise RecorderDbError(f"recorder database {str(src_path)!r} does not exist")
    dst_path = Path(destination)
    src = sqlite3.connect(_uri(src_path, immutable=False), uri=True)
    try:
        dst = sqlite3.connect(dst_path)
        try:
            src.backup(dst)
        finally:
            dst.close()
    except sqlite3.Error as exc:
        raise RecorderDbError(f"copying {str(src_path)!r} to {str(dst_path)!r}: {exc}") from None
    finally:
        src.close()
    return dst_path


_NO_ATTRIBUTES: dict[str, Any] = {}


def _attributes(raw: Any, cache: dict[Any, dict[str, Any]]) -> dict[str, Any]:
    """The decoded attributes; states sharing an attributes row share one dict (read-only by
    contract: a recorder holds millions of states and a handful of attribute sets)."""
    if not raw:
        return _NO_ATTRIBUTES
    found = cache.get(raw)
    if found is None:
        text = raw if isinstance(raw, str) else bytes(raw).decode("utf-8", errors="replace")
        try:
            value = json.loads(text)
        except ValueError:
            value = {}
        found = cache[raw] = value if isinstance(value, dict) else {}
    return found


class RecorderDbSource:
    """:class:`~edge.learn.history.HistorySource` on a copy of the recorder's SQLite file.

    ``immutable=True`` tells SQLite the file never changes (no locks: works on read-only media)
    and is refused while a non-empty ``-wal`` file lies beside it, whose contents it would skip.
    """

    def __init__(self, *, path: str | Path, immutable: bool = False) -> None:
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise RecorderDbError(f"recorder database {str(self.path)!r} does not exist")
        wal = self.path.with_name(self.path.name + "-wal")
        if immutable and wal.exists() and wal.stat().st_size > 0:
            raise RecorderDbError(
                f"{str(self.path)!r} has a non-empty {wal.name}: copy it with "
                f'`sqlite3 {self.path.name} ".backup copy.db"` (or open it without immutable)'
            )
        self.immutable = immutable
        self._db: sqlite3.Connection | None = None
        self.schema_version: int | None = None

    def __repr__(self) -> str:
        return f"RecorderDbSource(path={str(self.path)!r})"

    def __enter__(self) -> RecorderDbSource:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            db.close()

    def _conn(self) -> sqlite3.Connection:
        if self._db is not None:
            return self._db
        where = repr(str(self.path))
        try:
            db = sqlite3.connect(_uri(self.path, self.immutable), uri=True)
            tables = {
                name: {row[1] for row in db.execute(f"PRAGMA table_info({name})")}
                for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            }
        except sqlite3.Error as exc:
            raise RecorderDbError(f"{where} cannot be read as SQLite: {exc}") from None
        if "schema_changes" in tables:
            row = db.execute("SELECT MAX(schema_version) FROM schema_changes").fetchone()
            self.schema_version = int(row[0]) if row and row[0] is not None else None
        for table, columns in _REQUIRED.items():
            missing = columns - tables.get(table, set())
            if missing:
                db.close()
                version = f"schema {self.schema_version}" if self.schema_version else "no recorder schema"
                what = f"table {table}" if table not in tables else f"columns {sorted(missing)} of {table}"
                raise RecorderDbError(
                    f"{where} ({version}) lacks {what}: not a Home Assistant recorder database "
                    "of 2023.4 or later (let Home Assistant migrate it first)"
                )
        self._legacy_attrs = "attributes" in tables["states"]
        self._stat_tables = {
            period: table
            for period, table in STATISTIC_TABLES.items()
            if {"start_ts", "metadata_id"} <= tables.get(table, set())
        }
        self._has_stat_meta = {"id", "statistic_id"} <= tables.get("statistics_meta", set())
        self._db = db
        return db

    def entity_ids(self) -> list[str]:
        """Every entity the recorder knows (``states_meta``)."""
        return [
            row[0] for row in self._conn().execute("SELECT entity_id FROM states_meta ORDER BY entity_id")
        ]

    def states(self, entity_ids: Sequence[str], start: float, end: float) -> EntityHistory:
        """Every recorded state of ``entity_ids`` with ``start <= ts < end``, plus each one's last
        state before ``start`` at its own ``last_updated``."""
        db = self._conn()
        ids = list(dict.fromkeys(entity_ids))
        history: EntityHistory = {entity_id: [] for entity_id in ids}
        if not ids or not end > start:
            return history
        legacy = "s.attributes" if self._legacy_attrs else "NULL"
        select = (
            f"SELECT s.state, s.last_updated_ts, s.attributes_id, {legacy} FROM states s "
            "WHERE s.metadata_id = ? AND s.last_updated_ts "
        )
        by_id: dict[int, dict[str, Any]] = {}  # attributes_id -> decoded (shared by its states)
        by_text: dict[Any, dict[str, Any]] = {}  # legacy per-state attributes text

        def attributes(attributes_id: int | None, legacy_text: Any) -> dict[str, Any]:
            if attributes_id is None:
                return _attributes(legacy_text, by_text)
            found = by_id.get(attributes_id)
            if found is None:
                row = db.execute(
                    "SELECT shared_attrs FROM state_attributes WHERE attributes_id = ?", (attributes_id,)
                ).fetchone()
                found = by_id[attributes_id] = _attributes(
                    row[0] if row is not None and row[0] is not None else legacy_text, by_text
                )
            return found

        for entity_id in ids:
            meta = db.execute(
                "SELECT metadata_id FROM states_meta WHERE entity_id = ? ORDER BY metadata_id", (entity_id,)
            ).fetchall()
            if not meta:
                continue
            metadata_id = meta[0][0]
            rows = db.execute(
                select + "< ? ORDER BY s.last_updated_ts DESC, s.state_id DESC LIMIT 1", (metadata_id, start)
            ).fetchall()
            rows += db.execute(
                select + ">= ? AND s.last_updated_ts < ? ORDER BY s.last_updated_ts, s.state_id",
                (metadata_id, start, end),
            ).fetchall()
            get = by_id.get
            history[entity_id] = [
                StateChange(
                    ts if type(ts) is float else float(ts),
                    state if type(state) is str else ("" if state is None else str(state)),
                    get(attributes_id) or attributes(attributes_id, legacy_text),
                )
                for state, ts, attributes_id, legacy_text in rows
                if ts is not None
            ]
        return history

    def statistics(
        self, statistic_ids: Sequence[str], start: float, end: float, period: str = "hour"
    ) -> dict[str, list[StatisticRow]]:
        """Long-term statistics rows with ``start <= row.start < end`` (``5minute`` reads
        ``statistics_short_term``, ``hour`` reads ``statistics``)."""
        if period not in STATISTIC_TABLES:
            raise RecorderDbError(f"statistics period {period!r}: use one of {', '.join(STATISTIC_TABLES)}")
        db = self._conn()
        ids = list(dict.fromkeys(statistic_ids))
        out: dict[str, list[StatisticRow]] = {sid: [] for sid in ids}
        table = self._stat_tables.get(period)
        if not ids or not end > start or table is None or not self._has_stat_meta:
            return out
        for sid in ids:
            rows = db.execute(
                f"SELECT t.start_ts, t.mean, t.min, t.max, t.state, t.sum FROM {table} t "
                "JOIN statistics_meta m ON t.metadata_id = m.id "
                "WHERE m.statistic_id = ? AND t.start_ts >= ? AND t.start_ts < ? ORDER BY t.start_ts",
                (sid, start, end),
            ).fetchall()
            out[sid] = [
                StatisticRow(
                    start=float(r[0]),
                    mean=None if r[1] is None else float(r[1]),
                    min=None if r[2] is None else float(r[2]),
                    max=None if r[3] is None else float(r[3]),
                    state=None if r[4] is None else float(r[4]),
                    sum=None if r[5] is None else float(r[5]),
                )
                for r in rows
            ]
        return out
