"""The label store: corrections made by the user, kept with the input the model saw.

A local SQLite database in the state directory (``labels.sqlite3``), in WAL
mode with ``synchronous=FULL``, so that a commit that returned survives a
process kill and a power cut; each correction is its own transaction. One row per correction:
the model input as float32 bytes plus its shape, the device, pipeline, time,
the predicted label, the correction and the model version.

Bounded: ``max_rows`` and ``max_bytes`` (input bytes); when either would be
exceeded the oldest rows are deleted and counted in :attr:`LabelStore.dropped`
(persisted, so the count survives restarts).

Exported in ``edge-infer record``'s format (:func:`edge.record.columns_for`):
``ts, device, pipeline, label`` and one column per feature value, so ``learn``
and ``train`` read corrections as one more labelled source.

Threading: every method does blocking file I/O. The daemon must never call
them on its event loop: use :meth:`LabelStore.add_async` (which runs
:meth:`add` in ``asyncio.to_thread``) or call the methods from a worker thread.
One connection is shared under a lock, so calls from several threads are safe.
"""

from __future__ import annotations

import asyncio
import csv
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    import sqlite3

FILENAME = "labels.sqlite3"
NONE_OF_THESE = "none of these"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS corrections (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    device TEXT NOT NULL,
    pipeline TEXT NOT NULL,
    predicted TEXT NOT NULL,
    label TEXT NOT NULL,
    model_version TEXT NOT NULL,
    shape TEXT NOT NULL,
    input BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class Correction:
    """One stored correction; ``input`` has the shape the model saw for one sample."""

    ts: float
    device: str
    pipeline: str
    predicted: str
    label: str
    model_version: str
    input: npt.NDArray[np.float32]
    id: int = 0


class LabelStoreError(RuntimeError):
    """A correction that cannot be stored (named by what is wrong)."""


class LabelStore:
    """Bounded, crash-safe store of corrections (blocking; see the module docstring)."""

    def __init__(self, path: Path, *, max_rows: int = 100_000, max_bytes: int = 256 * 1024 * 1024) -> None:
        if max_rows < 1 or max_bytes < 1:
            raise ValueError("label store bounds must be at least 1")
        if path.is_dir():
            path = path / FILENAME
        self.path = path
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        import sqlite3  # here: a daemon without corrections never maps libsqlite3 (~1 MB RSS)

        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._rows, self._bytes = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(input)), 0) FROM corrections"
        ).fetchone()

    # -- writing -----------------------------------------------------------
    def add(
        self,
        *,
        device: str,
        pipeline: str,
        predicted: str,
        label: str,
        model_version: str,
        input: npt.ArrayLike,
        ts: float | None = None,
    ) -> int:
        """Store one correction in its own transaction; returns its id. Blocking."""
        array = np.ascontiguousarray(input, dtype=np.float32)
        if array.size == 0:
            raise LabelStoreError("correction input is empty")
        if not np.isfinite(array).all():
            raise LabelStoreError("correction input has NaN or infinite values")
        blob = array.tobytes()
        if len(blob) > self.max_bytes:
            raise LabelStoreError(f"correction input of {len(blob)} bytes exceeds max_bytes={self.max_bytes}")
        shape = ",".join(str(d) for d in array.shape)
        when = time.time() if ts is None else ts
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                dropped = self._make_room(cur, len(blob))
                cur.execute(
                    "INSERT INTO corrections"
                    " (ts, device, pipeline, predicted, label, model_version, shape, input)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (when, device, pipeline, predicted, label, model_version, shape, blob),
                )
                row_id = cur.lastrowid
                if dropped:
                    cur.execute(
                        "INSERT INTO meta (key, value) VALUES ('dropped', ?)"
                        " ON CONFLICT(key) DO UPDATE SET value = value + excluded.value",
                        (dropped,),
                    )
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                self._rows, self._bytes = self._db.execute(
                    "SELECT COUNT(*), COALESCE(SUM(LENGTH(input)), 0) FROM corrections"
                ).fetchone()
                raise
            self._rows += 1
            self._bytes += len(blob)
        assert row_id is not None
        return row_id

    async def add_async(self, **kwargs: object) -> int:
        """:meth:`add` in a worker thread, for callers on the event loop."""
        return await asyncio.to_thread(lambda: self.add(**kwargs))  # type: ignore[arg-type]

    def _make_room(self, cur: sqlite3.Cursor, incoming: int) -> int:
        dropped = 0
        while self._rows > 0 and (self._rows + 1 > self.max_rows or self._bytes + incoming > self.max_bytes):
            row = cur.execute("SELECT id, LENGTH(input) FROM corrections ORDER BY id LIMIT 1").fetchone()
            cur.execute("DELETE FROM corrections WHERE id = ?", (row[0],))
            self._rows -= 1
            self._bytes -= row[1]
            dropped += 1
        return dropped

    # -- reading -----------------------------------------------------------
    @property
    def rows(self) -> int:
        return int(self._rows)

    @property
    def bytes(self) -> int:
        return int(self._bytes)

    @property
    def dropped(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = 'dropped'").fetchone()
        return int(row[0]) if row else 0

    def corrections(self, pipeline: str | None = None) -> Iterator[Correction]:
        """All corrections, oldest first (optionally of one pipeline). Blocking."""
        query = (
            "SELECT id, ts, device, pipeline, predicted, label, model_version, shape, input FROM corrections"
        )
        params: tuple[str, ...] = ()
        if pipeline is not None:
            query += " WHERE pipeline = ?"
            params = (pipeline,)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY id", params).fetchall()
        for rid, ts, dev, pipe, pred, label, version, shape, blob in rows:
            dims = tuple(int(d) for d in shape.split(","))
            array = np.frombuffer(blob, dtype=np.float32).reshape(dims)
            yield Correction(ts, dev, pipe, pred, label, version, array, rid)

    def export_csv(self, out: Path, pipeline: str, columns: list[str]) -> int:
        """Write one pipeline's corrections in ``edge-infer record``'s CSV format. Blocking.

        ``columns`` are the feature columns, :func:`edge.record.columns_for` of the
        pipeline's spec. Rows whose input does not have that many values (a model
        whose input changed) are skipped; rows labelled ``none of these`` are
        skipped too (they say what it is not, not what it is). Returns rows written.
        """
        written = 0
        with out.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["ts", "device", "pipeline", "label", *columns])
            for c in self.corrections(pipeline):
                values = c.input.reshape(-1)
                if values.size != len(columns) or c.label == NONE_OF_THESE:
                    continue
                ts = datetime.fromtimestamp(c.ts, UTC).isoformat(timespec="milliseconds")
                writer.writerow(
                    [ts, c.device, c.pipeline, c.label, *(float(f"{x:.7g}") for x in values.tolist())]
                )
                written += 1
        return written

    def integrity_ok(self) -> bool:
        with self._lock:
            return bool(self._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok")

    def close(self) -> None:
        with self._lock:
            self._db.close()
