"""History from a running Home Assistant over its WebSocket API.

``HaWebSocketSource(url=..., token=...)`` implements :class:`edge.learn.history.HistorySource`:

* ``states``: ``history/history_during_period`` with ``significant_changes_only: false`` and
  ``minimal_response: false`` (every recorded state, with its attributes), in chunks of
  ``chunk_s`` seconds and ``entities_per_request`` entities, so no answer grows without bound.
  Home Assistant stamps the state it returns for the start of a period with the period's start;
  the source looks back (a window growing eightfold per step) for that state's own
  ``last_updated``, so the result equals :class:`edge.learn.recorder_db.RecorderDbSource`'s on the
  same recorder.
* ``statistics``: ``recorder/statistics_during_period`` (``5minute`` or ``hour``), chunked too.

Authentication is a long-lived access token (Profile → Security in Home Assistant), read from a
file or an environment variable by :func:`resolve_token`; inside the add-on the Supervisor's
``SUPERVISOR_TOKEN`` and its proxy ``ws://supervisor/core/websocket`` (:func:`from_settings`).
The token is sent once, in the ``auth`` message, and never appears in a log line or an error:
errors name the URL (password masked) and the command that failed. The WebSocket library's own
frame logging is kept off, since it would show the ``auth`` frame.

Needs the ``websockets`` package (``pip install 'edge-infer[learn]'``); it is imported only when
a connection is opened, so the daemon does not depend on it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from edge.config import mask_url
from edge.learn.history import EntityHistory, SourceError, StateChange, StatisticRow

log = logging.getLogger(__name__)
# websockets logs every frame at DEBUG, the auth frame included: its logger stays above DEBUG.
_wire_log = logging.getLogger("edge.learn.ha_ws.wire")
_wire_log.setLevel(logging.WARNING)

SUPERVISOR_URL = "ws://supervisor/core/websocket"
SUPERVISOR_TOKEN_ENV = "SUPERVISOR_TOKEN"
DEFAULT_TOKEN_ENV = "HA_TOKEN"
MAX_TOKEN_BYTES = 16 * 1024
STATISTIC_PERIODS = {"5minute": 300.0, "hour": 3600.0}
_US = 1e-6


class HaSourceError(SourceError):
    """Reading from Home Assistant failed; the message names the URL and the command."""


def websocket_url(url: str) -> str:
    """``http(s)://host:8123`` → ``ws(s)://host:8123/api/websocket``; ws URLs with a path stay."""
    parts = urlsplit(url.strip())
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme.lower())
    if scheme is None or not parts.netloc:
        raise HaSourceError(
            f"Home Assistant URL {mask_url(url)!r}: use http://host:8123, https://..., ws://... or wss://..."
        )
    path = parts.path
    if path in ("", "/"):
        path = "/api/websocket"
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


def resolve_token(
    token_file: str | Path | None = None, token_env: str | None = None, *, where: str = "learn.source.ha"
) -> str:
    """The long-lived token from ``token_file`` (first line) or the environment variable
    ``token_env``; inside the add-on ``SUPERVISOR_TOKEN`` when neither is given. Raises
    :class:`HaSourceError` naming the file or variable (never the token)."""
    if token_file is not None:
        path = Path(token_file).expanduser()
        try:
            with path.open("rb") as handle:
                raw = handle.read(MAX_TOKEN_BYTES + 1)
        except OSError as exc:
            raise HaSourceError(f"{where}.token_file {str(path)!r}: {exc.strerror or exc}") from None
        if len(raw) > MAX_TOKEN_BYTES:
            raise HaSourceError(f"{where}.token_file {str(path)!r} is larger than {MAX_TOKEN_BYTES} bytes")
        lines = raw.decode("utf-8", errors="replace").strip().splitlines()
        token = lines[0].strip() if lines else ""
        if not token:
            raise HaSourceError(f"{where}.token_file {str(path)!r} is empty")
        return token
    names = [token_env] if token_env else [DEFAULT_TOKEN_ENV, SUPERVISOR_TOKEN_ENV]
    for name in names:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    shown = " or ".join(f"${n}" for n in names)
    raise HaSourceError(
        f"{where}: no Home Assistant token: set {where}.token_file, or put a long-lived access token "
        f"(Home Assistant: Profile → Security) in {shown}"
    )


def from_settings(
    url: str | None = None,
    token_file: str | Path | None = None,
    token_env: str | None = None,
    *,
    where: str = "learn.source.ha",
    **options: Any,
) -> HaWebSocketSource:
    """A source from config-style settings. Without a URL, inside the add-on (``SUPERVISOR_TOKEN``
    set): the Supervisor's proxy and token (the add-on needs ``homeassistant_api: true``)."""
    if url is None:
        if token_file is None and token_env is None and os.environ.get(SUPERVISOR_TOKEN_ENV):
            return HaWebSocketSource(
                url=SUPERVISOR_URL, token=os.environ[SUPERVISOR_TOKEN_ENV].strip(), **options
            )
        raise HaSourceError(
            f"{where}.url is not set (e.g. http://homeassistant.local:8123); only inside the add-on, "
            f"with ${SUPERVISOR_TOKEN_ENV} set, may it be left out"
        )
    return HaWebSocketSource(url=url, token=resolve_token(token_file, token_env, where=where), **options)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


def _request_ts(ts: float) -> tuple[str, float]:
    """A period boundary as Home Assistant will parse it, and the float it turns into there."""
    moment = datetime.fromtimestamp(round(ts, 6), UTC)
    return moment.isoformat(), moment.timestamp()


def _chunks(start: float, end: float, size: float) -> Iterator[tuple[float, float]]:
    at = start
    while at < end:
        nxt = min(end, at + size)
        yield at, nxt
        at = nxt


def _batches(items: Sequence[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(items), size):
        yield list(items[i : i + size])


_NO_ATTRIBUTES: dict[str, Any] = {}


def _compressed(entry: Mapping[str, Any], last: Mapping[str, Any] | None = None) -> StateChange:
    """One entry of Home Assistant's compressed state format (``s``, ``a``, ``lu``). Attributes
    equal to ``last`` (the entity's previous ones) share its dict: a sensor's rarely change, and
    a history holds millions of states (read-only by contract)."""
    state = entry.get("s")
    attributes: Any = entry.get("a")
    if not isinstance(attributes, dict) or not attributes:
        attributes = _NO_ATTRIBUTES
    elif last is not None and attributes == last:
        attributes = last
    return StateChange(
        ts=float(entry["lu"]),
        state="" if state is None else str(state),
        attributes=attributes,
    )


def _num(value: Any) -> float | None:
    return None if value is None else float(value)


class HaWebSocketSource:
    """:class:`~edge.learn.history.HistorySource` over Home Assistant's WebSocket API.

    One connection, opened on first use and kept until :meth:`close` (or the ``with`` block
    ends). Synchronous: ``edge-infer learn`` is a command, not the daemon.
    """

    def __init__(
        self,
        *,
        url: str,
        token: str,
        timeout_s: float = 60.0,
        chunk_s: float = 12 * 3600.0,
        entities_per_request: int = 20,
        max_message_bytes: int = 256 * 1024 * 1024,
        lookback_s: float = 600.0,
    ) -> None:
        if not token or not token.strip():
            raise HaSourceError(f"Home Assistant {mask_url(url)}: the access token is empty")
        if not timeout_s > 0 or not chunk_s > 0 or entities_per_request < 1 or not lookback_s > 0:
            raise HaSourceError("timeout_s, chunk_s, lookback_s and entities_per_request must be positive")
        self.url = websocket_url(url)
        self.shown_url = mask_url(self.url)
        self._token = token.strip()
        self.timeout_s = float(timeout_s)
        self.chunk_s = float(chunk_s)
        self.entities_per_request = int(entities_per_request)
        self.max_message_bytes = int(max_message_bytes)
        self.lookback_s = float(lookback_s)
        self.ha_version: str | None = None
        self.requests = 0  # commands sent (for progress and tests)
        self._ws: Any = None
        self._next_id = 1

    def __repr__(self) -> str:  # never the token
        return f"HaWebSocketSource(url={self.shown_url!r})"

    # ---------------------------------------------------------------- connection

    def __enter__(self) -> HaWebSocketSource:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        ws, self._ws = self._ws, None
        if ws is not None:
            try:
                ws.close()
            except Exception as exc:  # closing a broken connection: nothing left to do
                log.debug("closing %s: %s", self.shown_url, exc)

    def _fail(self, what: str, detail: str) -> HaSourceError:
        return HaSourceError(f"Home Assistant {self.shown_url}: {what}: {detail}".replace(self._token, "***"))

    def connect(self) -> None:
        """Open the connection and authenticate (done on first use; call it to check early)."""
        if self._ws is not None:
            return
        try:
            from websockets.exceptions import InvalidHandshake, WebSocketException
            from websockets.sync.client import connect
        except ImportError:
            raise HaSourceError(
                "reading Home Assistant's history needs the websockets package: "
                "pip install 'edge-infer[learn]'"
            ) from None
        try:
            ws = connect(
                self.url,
                open_timeout=self.timeout_s,
                close_timeout=5,
                max_size=self.max_message_bytes,
                proxy=None,
                logger=_wire_log,
                user_agent_header="edge-infer-learn",
            )
        except (OSError, TimeoutError, InvalidHandshake, WebSocketException) as exc:
            raise self._fail("cannot connect", f"{type(exc).__name__}: {exc}") from None
        try:
            hello = self._recv(ws, "the auth_required greeting")
            if hello.get("type") == "auth_ok":  # auth switched off (not on a real Home Assistant)
                self.ha_version = hello.get("ha_version")
            else:
                if hello.get("type") != "auth_required":
                    raise self._fail("unexpected greeting", str(hello.get("type")))
                self._send(ws, {"type": "auth", "access_token": self._token}, "auth")
                answer = self._recv(ws, "the auth answer")
                if answer.get("type") != "auth_ok":
                    message = answer.get("message") or answer.get("type")
                    raise self._fail(
                        "authentication refused",
                        f"{message} (check the long-lived access token: Profile → Security)",
                    )
                self.ha_version = answer.get("ha_version")
        except BaseException:
            ws.close()
            raise
        self._ws = ws
        log.info("connected to Home Assistant %s at %s", self.ha_version, self.shown_url)

    def _send(self, ws: Any, message: Mapping[str, Any], what: str) -> None:
        from websockets.exceptions import WebSocketException

        try:
            ws.send(json.dumps(message))
        except (OSError, WebSocketException) as exc:
            raise self._fail(f"{what}: sending failed", f"{type(exc).__name__}: {exc}") from None

    def _recv(self, ws: Any, what: str) -> dict[str, Any]:
        from websockets.exceptions import ConnectionClosed, PayloadTooBig, WebSocketException

        try:
            raw = ws.recv(timeout=self.timeout_s)
        except TimeoutError:
            raise self._fail(what, f"no answer within {self.timeout_s:g} s") from None
        except PayloadTooBig:
            raise self._fail(
                what,
                f"answer larger than {self.max_message_bytes} bytes: use a smaller chunk_s "
                "or entities_per_request",
            ) from None
        except ConnectionClosed as exc:
            raise self._fail(what, f"connection closed ({exc})") from None
        except (OSError, WebSocketException) as exc:
            raise self._fail(what, f"{type(exc).__name__}: {exc}") from None
        try:
            message = json.loads(raw)
        except (TypeError, ValueError):
            raise self._fail(what, "the answer is not JSON") from None
        if not isinstance(message, dict):
            raise self._fail(what, "the answer is not a JSON object")
        return message

    def command(self, message: Mapping[str, Any]) -> Any:
        """Send one command and return its ``result`` (raises :class:`HaSourceError` on an error)."""
        self.connect()
        ws = self._ws
        what = str(message.get("type"))
        msg_id = self._next_id
        self._next_id += 1
        self.requests += 1
        self._send(ws, {**message, "id": msg_id}, what)
        while True:
            answer = self._recv(ws, what)
            if answer.get("id") != msg_id or answer.get("type") != "result":
                continue  # events of other subscriptions, pongs
            if not answer.get("success"):
                error = answer.get("error") or {}
                code = error.get("code", "error") if isinstance(error, dict) else "error"
                text = error.get("message", "") if isinstance(error, dict) else str(error)
                raise self._fail(f"{what} failed", f"{code}: {text}")
            return answer.get("result")

    # ---------------------------------------------------------------- history

    def _history(
        self, entity_ids: list[str], start_ts: float, end_ts: float, include_start: bool
    ) -> tuple[float, dict[str, list[StateChange]]]:
        start_iso, start_float = _request_ts(start_ts)
        end_iso, _ = _request_ts(end_ts)
        result = self.command(
            {
                "type": "history/history_during_period",
                "start_time": start_iso,
                "end_time": end_iso,
                "entity_ids": entity_ids,
                "include_start_time_state": include_start,
                "significant_changes_only": False,
                "minimal_response": False,
                "no_attributes": False,
            }
        )
        if not isinstance(result, dict):
            raise self._fail("history/history_during_period", "the result is not a mapping")
        out: dict[str, list[StateChange]] = {}
        for entity_id, entries in result.items():
            if not isinstance(entries, list):
                continue
            changes: list[StateChange] = []
            last: Mapping[str, Any] | None = None
            for entry in entries:
                if isinstance(entry, Mapping):
                    change = _compressed(entry, last)
                    last = change.attributes
                    changes.append(change)
            out[str(entity_id)] = changes
        return start_float, out

    def states(self, entity_ids: Sequence[str], start: float, end: float) -> EntityHistory:
        """Every recorded state of ``entity_ids`` with ``start <= ts < end``, plus each one's last
        state before ``start`` at its own ``last_updated``."""
        ids = list(dict.fromkeys(entity_ids))
        history: EntityHistory = {entity_id: [] for entity_id in ids}
        if not ids or not end > start:
            return history
        # Home Assistant's period excludes its start (last_updated > start): ask from 1 µs before.
        opening: dict[str, StateChange] = {}
        for batch in _batches(ids, self.entities_per_request):
            first = True
            for lo, hi in _chunks(start, end, self.chunk_s):
                req_start, got = self._history(batch, lo - _US, hi, include_start=first)
                for entity_id, changes in got.items():
                    if entity_id not in history:
                        continue
                    for change in changes:
                        if first and change.ts <= req_start:
                            opening[entity_id] = change  # the start state, stamped req_start
                        elif lo <= change.ts < hi:
                            history[entity_id].append(change)
                first = False
        if opening:
            found = self._find_before(sorted(opening), start)
            for entity_id, stamped in opening.items():
                before = found.get(entity_id)
                if before is not None:
                    history[entity_id].insert(0, before)
                else:  # purged meanwhile: keep Home Assistant's (stamped at the period start)
                    log.warning(
                        "%s: the state before %s of %s was not found again; stamped at the start",
                        self.shown_url,
                        _iso(start),
                        entity_id,
                    )
                    history[entity_id].insert(0, stamped)
        for changes in history.values():
            changes.sort(key=lambda c: c.ts)  # stable: ties keep the recorder's order
        return history

    def _find_before(self, entity_ids: list[str], before: float) -> dict[str, StateChange]:
        """Each entity's last state with ``ts < before``, looking back in growing windows."""
        found: dict[str, StateChange] = {}
        pending = list(entity_ids)
        span = self.lookback_s
        hi = before
        while pending:
            lo = max(0.0, before - span)
            for batch in _batches(pending, self.entities_per_request):
                req_start, got = self._history(batch, lo, hi, include_start=False)
                for entity_id in batch:
                    real = [c for c in got.get(entity_id, []) if req_start < c.ts < before]
                    if real:
                        found[entity_id] = real[-1]
            pending = [e for e in pending if e not in found]
            if lo <= 0.0:
                break
            hi = lo + _US  # the next window ends where this one began (its start is exclusive)
            span *= 8
        return found

    # ---------------------------------------------------------------- statistics

    def statistics(
        self, statistic_ids: Sequence[str], start: float, end: float, period: str = "hour"
    ) -> dict[str, list[StatisticRow]]:
        """Long-term statistics rows with ``start <= row.start < end``."""
        if period not in STATISTIC_PERIODS:
            raise HaSourceError(f"statistics period {period!r}: use one of {', '.join(STATISTIC_PERIODS)}")
        ids = list(dict.fromkeys(statistic_ids))
        out: dict[str, list[StatisticRow]] = {sid: [] for sid in ids}
        if not ids or not end > start:
            return out
        # rows per answer: as many as states per answer at one state every 10 s
        chunk = max(STATISTIC_PERIODS[period] * 1000, self.chunk_s)
        for batch in _batches(ids, self.entities_per_request):
            for lo, hi in _chunks(start, end, chunk):
                result = self.command(
                    {
                        "type": "recorder/statistics_during_period",
                        "start_time": _request_ts(lo)[0],
                        "end_time": _request_ts(hi)[0],
                        "statistic_ids": batch,
                        "period": period,
                        "types": ["mean", "min", "max", "state", "sum"],
                    }
                )
                if not isinstance(result, dict):
                    raise self._fail("recorder/statistics_during_period", "the result is not a mapping")
                for sid, rows in result.items():
                    if sid not in out or not isinstance(rows, list):
                        continue
                    for row in rows:
                        begin = float(row["start"]) / 1000.0
                        if lo <= begin < hi:
                            out[sid].append(
                                StatisticRow(
                                    start=begin,
                                    mean=_num(row.get("mean")),
                                    min=_num(row.get("min")),
                                    max=_num(row.get("max")),
                                    state=_num(row.get("state")),
                                    sum=_num(row.get("sum")),
                                )
                            )
        for rows in out.values():
            rows.sort(key=lambda r: r.start)
        return out

    # ---------------------------------------------------------------- registries (for --suggest)

    def entity_registry(self) -> list[dict[str, Any]]:
        result = self.command({"type": "config/entity_registry/list"})
        return [dict(e) for e in result or [] if isinstance(e, Mapping)]

    def device_registry(self) -> list[dict[str, Any]]:
        result = self.command({"type": "config/device_registry/list"})
        return [dict(d) for d in result or [] if isinstance(d, Mapping)]

    def current_states(self) -> list[dict[str, Any]]:
        result = self.command({"type": "get_states"})
        return [dict(s) for s in result or [] if isinstance(s, Mapping)]
