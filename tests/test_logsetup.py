"""Log lines for journald and terminals, structured fields, and rate limiting."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest

from edge.logsetup import (
    EdgeFormatter,
    RateLimitedLogger,
    RateLimiter,
    bind,
    format_fields,
    journald_stream,
    setup_logging,
)


@pytest.fixture
def captured() -> Iterator[tuple[io.StringIO, logging.Logger]]:
    """A private logger writing through EdgeFormatter(journald=True) into a buffer."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(EdgeFormatter(journald=True))
    logger = logging.getLogger(f"edge.test.{id(buf)}")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield buf, logger
    logger.removeHandler(handler)


def _record(level: int = logging.INFO, msg: str = "hello", **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("edge.x", level, __file__, 1, msg, (), None)
    for k, v in extra.items():
        setattr(rec, k, v)
    return rec


def test_journald_lines_have_priority_and_no_timestamp() -> None:
    f = EdgeFormatter(journald=True)
    assert f.format(_record(logging.INFO)) == "<6>edge.x: hello"
    assert f.format(_record(logging.DEBUG)) == "<7>edge.x: hello"
    assert f.format(_record(logging.WARNING)) == "<4>edge.x: hello"
    assert f.format(_record(logging.ERROR)) == "<3>edge.x: hello"
    assert f.format(_record(logging.CRITICAL)) == "<2>edge.x: hello"


def test_terminal_lines_are_timestamped() -> None:
    line = EdgeFormatter(journald=False).format(_record(logging.WARNING))
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d"
    assert re.fullmatch(stamp + r" WARNING edge\.x: hello", line), line


def test_fields_are_appended_in_order_and_quoted() -> None:
    f = EdgeFormatter(journald=True)
    rec = _record(
        msg="prediction published",
        device="kitchen plug",
        pipeline="appliance",
        model="app-v3",
        fields={"latency_ms": 0.8, "label": 'say "hi"'},
    )
    assert f.format(rec) == (
        '<6>edge.x: prediction published pipeline=appliance device="kitchen plug" model=app-v3 '
        'latency_ms=0.8 label="say \\"hi\\""'
    )
    assert format_fields({"a": "x=y", "b": None, "c": ""}) == 'a="x=y" c=""'


def test_one_event_is_one_line_and_tracebacks_keep_the_priority(
    captured: tuple[io.StringIO, logging.Logger],
) -> None:
    buf, logger = captured
    logger.info("line one\nline two", extra={"device": "d1"})
    try:
        raise ValueError("bad model")
    except ValueError:
        logger.exception("reload refused", extra={"model": "m"})
    lines = buf.getvalue().splitlines()
    assert lines[0] == f"<6>{logger.name}: line one\\nline two device=d1"
    assert lines[1] == f"<3>{logger.name}: reload refused model=m"
    assert all(ln.startswith("<3>") for ln in lines[2:])
    assert lines[-1] == "<3>ValueError: bad model"


def test_bind_adds_fields_and_call_site_extra_wins(captured: tuple[io.StringIO, logging.Logger]) -> None:
    buf, logger = captured
    log = bind(logger, pipeline="appliance", model="m1")
    log.warning("decode failed", extra={"device": "kitchen_plug"})
    log.info("override", extra={"model": "m2", "fields": {"attempt": 2}})
    lines = buf.getvalue().splitlines()
    assert lines[0] == f"<4>{logger.name}: decode failed pipeline=appliance device=kitchen_plug model=m1"
    assert lines[1] == f"<6>{logger.name}: override pipeline=appliance model=m2 attempt=2"


def test_rate_limiter_first_then_once_per_interval_with_counts() -> None:
    now = [0.0]
    rl = RateLimiter(60, clock=lambda: now[0])
    assert rl.hit("decode_error", "plug") == 0
    for _ in range(5):
        now[0] += 1
        assert rl.hit("decode_error", "plug") is None
    assert rl.hit("decode_error", "other") == 0, "keys are independent"
    assert rl.hit("stale", "plug") == 0, "categories are independent"
    assert rl.pending() == {("decode_error", "plug"): 5}
    now[0] = 60.0
    assert rl.hit("decode_error", "plug") == 5
    now[0] = 61.0
    assert rl.hit("decode_error", "plug") is None
    now[0] = 200.0
    assert rl.hit("decode_error", "plug") == 1


def test_rate_limiter_memory_is_bounded() -> None:
    rl = RateLimiter(60, max_keys=3, clock=lambda: 0.0)
    for i in range(10):
        assert rl.hit("c", str(i)) == 0
    assert len(rl._state) == 3
    assert rl.hit("c", "9") is None, "the newest keys are kept"


def test_rate_limited_logger(captured: tuple[io.StringIO, logging.Logger]) -> None:
    buf, logger = captured
    now = [0.0]
    rl = RateLimitedLogger(logger, limiter=RateLimiter(30, clock=lambda: now[0]))
    for _ in range(100):
        rl.warning("decode_error", "plug", "cannot decode %s", "payload", pipeline="p", device="plug")
    now[0] = 31
    assert rl.warning("decode_error", "plug", "cannot decode %s", "payload", pipeline="p", device="plug")
    rl.warning("decode_error", "plug", "cannot decode %s", "payload", device="plug")
    rl.warning("decode_error", "plug", "cannot decode %s", "payload", device="plug")
    assert rl.flush() == 1
    lines = buf.getvalue().splitlines()
    assert lines == [
        f"<4>{logger.name}: cannot decode payload pipeline=p device=plug",
        f"<4>{logger.name}: cannot decode payload pipeline=p device=plug suppressed=99 interval_s=30",
        f"<6>{logger.name}: 2 more decode_error event(s) were suppressed key=plug suppressed=2",
    ]


def test_rate_limited_logger_records_the_callers_location(
    captured: tuple[io.StringIO, logging.Logger],
) -> None:
    _, logger = captured
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    h = Keep()
    logger.addHandler(h)
    try:
        rl = RateLimitedLogger(logger)
        rl.error("c", "k", "x")
        rl.log(logging.ERROR, "c", "k2", "y")
    finally:
        logger.removeHandler(h)
    assert [r.funcName for r in records] == ["test_rate_limited_logger_records_the_callers_location"] * 2


def test_journal_stream_detection_compares_device_and_inode() -> None:
    with tempfile.TemporaryFile("w+") as f:
        st = os.fstat(f.fileno())
        assert journald_stream(f, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        assert not journald_stream(f, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
        assert not journald_stream(f, {"JOURNAL_STREAM": "garbage"})
        assert not journald_stream(f, {})


def test_setup_logging_under_a_journal_stream(tmp_path: os.PathLike[str]) -> None:
    """A child process whose stderr is the 'journal stream' logs journald style."""
    out = os.path.join(tmp_path, "stderr")
    code = (
        "import logging; from edge.logsetup import setup_logging; setup_logging('info');"
        "logging.getLogger('edge.daemon').info('ready', extra={'pipeline': 'p'});"
        "logging.getLogger('edge.daemon').debug('hidden');"
        "logging.getLogger('aiomqtt').info('quiet')"
    )
    with open(out, "w") as f:
        st = os.fstat(f.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        subprocess.run([sys.executable, "-c", code], stderr=f, env=env, check=True, timeout=60)
    with open(out) as f:
        assert f.read() == "<6>edge.daemon: ready pipeline=p\n"


def test_setup_logging_replaces_its_handler() -> None:
    root = logging.getLogger()
    before = list(root.handlers)
    level = root.level
    try:
        buf = io.StringIO()
        h1 = setup_logging("debug", journald=False, stream=buf)
        h2 = setup_logging("warning", journald=True, stream=buf)
        assert h1 not in root.handlers
        assert h2 in root.handlers
        assert root.level == logging.WARNING
        with pytest.raises(ValueError, match="unknown log level"):
            setup_logging("loud")
    finally:
        for h in list(root.handlers):
            if h not in before:
                root.removeHandler(h)
        root.setLevel(level)
        logging.captureWarnings(False)
