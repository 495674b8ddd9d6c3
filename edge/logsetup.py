"""Logging that fits journald and a terminal: one line per event, structured fields, no spam.

* Under systemd (``JOURNAL_STREAM`` names our stderr) a line is ``<N>logger: message k=v``:
  ``<N>`` is the syslog priority journald strips and stores, and there is no timestamp
  because the journal has its own. Elsewhere a line starts with an ISO timestamp and the
  level name.
* Structured fields (``pipeline``, ``device``, ``model``, ``topic``, ``reason``) passed as
  ``extra=`` or bound with :func:`bind` are appended as ``key=value`` (quoted when needed),
  so ``journalctl -u edge-infer | grep device=kitchen_plug`` works.
* :class:`RateLimiter` / :class:`RateLimitedLogger` log the first occurrence of a
  ``(category, key)`` and then at most once per interval, with the number suppressed in
  between: a sensor that sends garbage every second costs one line a minute, not 60.

The module is ``logsetup`` so that it never shadows the standard library's ``logging``.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping, MutableMapping
from typing import IO, Any

__all__ = [
    "FIELDS",
    "EdgeFormatter",
    "RateLimitedLogger",
    "RateLimiter",
    "bind",
    "format_fields",
    "journald_stream",
    "setup_logging",
]

#: Record attributes appended as ``key=value``, in this order.
FIELDS = ("pipeline", "device", "model", "topic", "reason")

#: logging level -> syslog priority (sd-daemon(3) prefixes)
_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


def _priority(levelno: int) -> int:
    for level, prio in _PRIORITY.items():  # ordered from CRITICAL down
        if levelno >= level:
            return prio
    return 7


def _quote(value: object) -> str:
    text = str(value)
    if text and not any(c in text for c in ' "=\\\n\r\t') and text.isprintable():
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


def format_fields(fields: Mapping[str, object]) -> str:
    """``{"device": "kitchen plug", "model": "m"}`` -> ``device="kitchen plug" model=m``."""
    return " ".join(f"{k}={_quote(v)}" for k, v in fields.items() if v is not None)


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


def journald_stream(stream: IO[str] | None = None, env: Mapping[str, str] | None = None) -> bool:
    """True when ``stream`` (default stderr) is the journal stream systemd connected.

    ``JOURNAL_STREAM`` is ``<device>:<inode>`` of that stream; comparing it with our fd
    (as systemd documents) avoids journald formatting when the output was redirected.
    """
    source = os.environ if env is None else env
    value = source.get("JOURNAL_STREAM")
    if not value:
        return False
    stream = sys.stderr if stream is None else stream
    try:
        dev, ino = (int(x) for x in value.split(":", 1))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


class EdgeFormatter(logging.Formatter):
    """``<N>name: message k=v`` (journald) or ``2024-05-01T12:00:00.123+02:00 INFO name: message k=v``.

    Fields come from :data:`FIELDS` attributes on the record and from a ``fields`` mapping
    (what :func:`bind` and :class:`RateLimitedLogger` add). Newlines in the message are
    escaped so one event stays one line; a traceback follows on its own lines, each with
    the same priority prefix in journald mode so the journal keeps them at error level.
    """

    def __init__(self, journald: bool = False, fields: tuple[str, ...] = FIELDS) -> None:
        super().__init__()
        self.journald = journald
        self.fields = fields

    def record_fields(self, record: logging.LogRecord) -> dict[str, object]:
        """The standard fields first, in :data:`FIELDS` order, then any others."""
        extra = getattr(record, "fields", None)
        extra = extra if isinstance(extra, Mapping) else {}
        out: dict[str, object] = {}
        for name in self.fields:
            value = getattr(record, name, None)
            if value is None:
                value = extra.get(name)
            if value is not None:
                out[name] = value
        for k, v in extra.items():
            if v is not None and k not in out:
                out[str(k)] = v
        return out

    def format(self, record: logging.LogRecord) -> str:
        message = _one_line(record.getMessage())
        fields = self.record_fields(record)
        if fields:
            message = f"{message} {format_fields(fields)}"
        if self.journald:
            prefix = f"<{_priority(record.levelno)}>"
            line = f"{prefix}{record.name}: {message}"
        else:
            prefix = ""
            ts = _dt.datetime.fromtimestamp(record.created).astimezone().isoformat(timespec="milliseconds")
            line = f"{ts} {record.levelname} {record.name}: {message}"
        extra_lines: list[str] = []
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            extra_lines.extend(record.exc_text.splitlines())
        if record.stack_info:
            extra_lines.extend(self.formatStack(record.stack_info).splitlines())
        if extra_lines:
            line += "\n" + "\n".join(prefix + ln for ln in extra_lines)
        return line


class _EdgeHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler setup_logging installs (a later call replaces it, and only it)."""


def setup_logging(
    level: int | str = "INFO",
    *,
    journald: bool | None = None,
    stream: IO[str] | None = None,
    quiet: tuple[str, ...] = ("aiomqtt", "asyncio"),
) -> logging.Handler:
    """Configure the root logger once for the daemon and return its handler.

    ``journald=None`` detects it (:func:`journald_stream`). ``quiet`` loggers are held at
    WARNING unless ``level`` is DEBUG. Calling it again replaces the previous handler
    (a reload may change the level).
    """
    stream = sys.stderr if stream is None else stream
    if journald is None:
        journald = journald_stream(stream)
    numeric = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _EdgeHandler):
            root.removeHandler(handler)
    handler = _EdgeHandler(stream)
    handler.setFormatter(EdgeFormatter(journald=journald))
    root.addHandler(handler)
    root.setLevel(numeric)
    for name in quiet:
        logging.getLogger(name).setLevel(logging.NOTSET if numeric <= logging.DEBUG else logging.WARNING)
    logging.captureWarnings(True)
    return handler


class _FieldsAdapter(logging.LoggerAdapter[logging.Logger]):
    """Adds bound fields to every record (call-site ``extra`` fields win)."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        extra = dict(kwargs.get("extra") or {})
        bound = dict(self.extra or {})
        own = extra.pop("fields", None)
        for name in FIELDS:
            if name in extra:
                bound[name] = extra.pop(name)
        if isinstance(own, Mapping):
            bound.update(own)
        extra["fields"] = bound
        kwargs["extra"] = extra
        return msg, kwargs


def bind(logger: logging.Logger | str, **fields: object) -> logging.LoggerAdapter[logging.Logger]:
    """A logger that appends ``fields`` to each line::

    log = bind("edge.pipeline", pipeline="appliance", model="appliance-v3")
    log.warning("decode failed", extra={"device": "kitchen_plug"})
    """
    base = logging.getLogger(logger) if isinstance(logger, str) else logger
    return _FieldsAdapter(base, fields)


class RateLimiter:
    """Decides whether a ``(category, key)`` event is logged now.

    :meth:`hit` returns ``None`` to suppress, or the number of occurrences suppressed since
    the last logged one (0 for the first). At most ``max_keys`` keys are tracked (the
    oldest are forgotten first), so a flood of distinct device ids cannot grow memory.
    Thread-safe.
    """

    def __init__(
        self, interval: float = 60.0, *, max_keys: int = 4096, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval = interval
        self.max_keys = max_keys
        self._clock = clock
        self._state: dict[tuple[str, str], list[float]] = {}  # key -> [last_logged, suppressed]
        self._lock = threading.Lock()

    def hit(self, category: str, key: str = "") -> int | None:
        now = self._clock()
        k = (category, key)
        with self._lock:
            state = self._state.get(k)
            if state is None:
                if len(self._state) >= self.max_keys:
                    del self._state[next(iter(self._state))]
                self._state[k] = [now, 0]
                return 0
            if now - state[0] >= self.interval:
                suppressed = int(state[1])
                state[0], state[1] = now, 0
                # move to the end: recently active keys are the last to be evicted
                self._state[k] = self._state.pop(k)
                return suppressed
            state[1] += 1
            return None

    def pending(self) -> dict[tuple[str, str], int]:
        """Keys with suppressed occurrences not yet reported, and their counts."""
        with self._lock:
            return {k: int(v[1]) for k, v in self._state.items() if v[1]}

    def reset(self) -> dict[tuple[str, str], int]:
        """Forget everything; returns what was still pending."""
        with self._lock:
            out = {k: int(v[1]) for k, v in self._state.items() if v[1]}
            self._state.clear()
        return out


class RateLimitedLogger:
    """A logger whose calls name a ``(category, key)`` and are rate limited per pair::

        rl = RateLimitedLogger(log, interval=60)
        rl.warning("decode_error", device, "cannot decode payload on %s: %s", topic, err,
                   pipeline=p, device=device)

    The first occurrence is logged; later ones at most once per ``interval`` seconds,
    with ``suppressed=N`` appended when some were swallowed. Keyword arguments become
    fields of the line. :meth:`flush` reports counts still pending (call it at shutdown
    or from a periodic task).
    """

    def __init__(
        self, logger: logging.Logger | str, interval: float = 60.0, *, limiter: RateLimiter | None = None
    ) -> None:
        self.logger = logging.getLogger(logger) if isinstance(logger, str) else logger
        self.limiter = limiter if limiter is not None else RateLimiter(interval)

    def log(self, level: int, category: str, key: str, msg: str, *args: object, **fields: object) -> bool:
        """Log if allowed; returns whether a line was emitted."""
        return self._log(level, (category, key), msg, args, fields)

    def _log(
        self, level: int, what: tuple[str, str], msg: str, args: tuple[object, ...], fields: dict[str, object]
    ) -> bool:
        if not self.logger.isEnabledFor(level):
            return False
        suppressed = self.limiter.hit(*what)
        if suppressed is None:
            return False
        if suppressed:
            fields["suppressed"] = suppressed
            fields["interval_s"] = round(self.limiter.interval)
        self.logger.log(level, msg, *args, extra={"fields": fields}, stacklevel=3)
        return True

    def debug(self, category: str, key: str, msg: str, *args: object, **fields: object) -> bool:
        return self._log(logging.DEBUG, (category, key), msg, args, fields)

    def info(self, category: str, key: str, msg: str, *args: object, **fields: object) -> bool:
        return self._log(logging.INFO, (category, key), msg, args, fields)

    def warning(self, category: str, key: str, msg: str, *args: object, **fields: object) -> bool:
        return self._log(logging.WARNING, (category, key), msg, args, fields)

    def error(self, category: str, key: str, msg: str, *args: object, **fields: object) -> bool:
        return self._log(logging.ERROR, (category, key), msg, args, fields)

    def flush(self, level: int = logging.INFO) -> int:
        """Log one summary line per key with suppressed occurrences; returns how many."""
        pending = self.limiter.reset()
        for (category, key), count in pending.items():
            self.logger.log(
                level,
                "%d more %s event(s) were suppressed",
                count,
                category,
                extra={"fields": {"key": key or None, "suppressed": count}},
            )
        return len(pending)
