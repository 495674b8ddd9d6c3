"""Retraining from the daemon: the "Retrain now" button and ``learn.schedule``.

The daemon owns one :class:`Retrainer`. For every enabled pipeline with a ``learn:`` section it

* takes the Retrain command (``<base>/<pipeline>/retrain/press``, payload ``PRESS``), validated by
  :class:`edge.commands.CommandValidator` in :class:`edge.corrections.Corrections` and handed
  over here, and the pipeline's ``learn.schedule`` (:func:`next_run`, local time);
* runs ``python -m edge.cli learn -c <the daemon's config> <pipeline> --events -`` as a child
  process (``asyncio.create_subprocess_exec``, in a session of its own), niced (``--nice``) and
  with its own address space capped (``--max-memory-mb``, ``learn.max_memory_mb``); learn starts
  the training process, niced again and memory-watched (edge/learn/run.py). Never in the
  daemon's process, never blocking its loop: the child's output is read line by line, each line
  bounded (:data:`LINE_LIMIT`);
* runs one training at a time over all pipelines: a press while another pipeline trains queues
  this one (at most once: a second press is refused, ``already_queued``); a press for the
  pipeline that is training is refused (``busy``); refusals are counted, logged rate-limited and
  shown in the state;
* keeps a state per pipeline (idle / queued / collecting / training N% / evaluating / promoted /
  kept: reason / failed: reason, with the last run's finish time, duration and the gate's
  numbers), published retained as JSON to ``<base>/<pipeline>/retrain/state`` (at start too,
  restored from ``retrain.json`` in the state directory), in bridge/info (``retrain``) and in
  ``/metrics`` (:class:`RetrainCollector`);
* on shutdown (its task cancelled) sends SIGTERM to the learn process's group (learn kills its
  training process on SIGTERM), and SIGKILL after ``term_timeout_s``.

A promoted model is deployed by learn where the daemon's model watcher hot-reloads it; the
Retrainer itself never touches a model.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, tzinfo
from datetime import time as dtime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edge.corrections import corrections_dir
from edge.discovery_payloads import RetrainEntity
from edge.mqtt import Outgoing

if TYPE_CHECKING:
    from edge.config import Config, LearnSchedule
    from edge.logsetup import RateLimitedLogger
    from edge.pipeline import Pipeline

log = logging.getLogger("edge.retrain")

FILENAME = "retrain.json"
FORMAT = "edge-infer-retrain"
LINE_LIMIT = 16 * 1024  # a longer line of the learn process is dropped (counted), never buffered
MAX_FILE_BYTES = 1 << 20
MAX_STATE_CHARS = 255  # Home Assistant's limit on a state
MAX_REASON_CHARS = 1000
TAIL_LINES = 20  # of learn's human output, kept for a failure's reason
LEARN_NICE = 10
SCHEDULE_POLL_S = 60.0  # the scheduler looks at least this often (a clock jump, a reload)
REFUSALS = ("not_learnable", "busy", "already_queued", "not_leader", "no_config_file")
OUTCOMES = ("promoted", "kept", "failed")
PHASES = ("idle", "queued", "collecting", "training", "evaluating", *OUTCOMES)


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _bounded(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------- the schedule


def next_run(schedule: LearnSchedule, last_run: float | None, now: float, tz: tzinfo | None = None) -> float:
    """When a scheduled retrain is next due (a wall-clock timestamp), never before ``now``.

    ``every_days`` after the local date of ``last_run`` (the finish of the last retrain of that
    pipeline, by the button or the schedule), at ``at`` local time (``tz``; None: the system's
    zone). Never run: the next ``at`` from ``now``. Overdue (the daemon was down when it was
    due): the next ``at`` from ``now``, so a restart never retrains at once."""
    hour, minute = schedule.hour_minute
    at = dtime(hour, minute)

    def at_on(day: date) -> float:
        return datetime.combine(day, at, tzinfo=tz).timestamp()

    def next_at_from(ts: float) -> float:
        day = datetime.fromtimestamp(ts, tz).date()
        candidate = at_on(day)
        return candidate if candidate > ts else at_on(day + timedelta(days=1))

    if last_run is None:
        return next_at_from(now)
    due = at_on(datetime.fromtimestamp(last_run, tz).date() + timedelta(days=schedule.every_days))
    return due if due > now else next_at_from(now)


# ---------------------------------------------------------------------------- state


@dataclass
class RetrainState:
    """One pipeline's retraining, as published on ``<base>/<pipeline>/retrain/state``."""

    phase: str = "idle"
    reason: str | None = None
    progress: int | None = None
    trigger: str | None = None  # button / schedule
    started: float | None = None  # wall clock of the current (or last) run's start
    finished: float | None = None  # the last run's end: "last trained"
    duration_s: float | None = None
    gate: dict[str, Any] | None = None
    examples: int | None = None
    runs: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    refused: int = 0
    queued: bool = False
    next_run: float | None = None

    def text(self) -> str:
        """The Home Assistant sensor's state (at most 255 characters)."""
        if self.phase == "training" and self.progress is not None:
            return f"training {self.progress}%"
        if self.phase in ("kept", "failed") and self.reason:
            return _bounded(f"{self.phase}: {self.reason}", MAX_STATE_CHARS)
        return self.phase

    def payload(self, pipeline: str) -> dict[str, Any]:
        return {
            "pipeline": pipeline,
            "status": self.text(),
            "phase": self.phase,
            "progress": self.progress,
            "reason": self.reason,
            "trigger": self.trigger,
            "started": _iso(self.started),
            "last_trained": _iso(self.finished),
            "duration_s": None if self.duration_s is None else round(self.duration_s, 1),
            "gate": self.gate,
            "examples": self.examples,
            "queued": self.queued,
            "runs": dict(self.runs),
            "refused": self.refused,
            "next_run": _iso(self.next_run),
        }

    def persisted(self) -> dict[str, Any]:
        return {
            "phase": self.phase if self.phase in OUTCOMES else None,
            "reason": self.reason,
            "trigger": self.trigger,
            "started": self.started,
            "finished": self.finished,
            "duration_s": self.duration_s,
            "gate": self.gate,
            "examples": self.examples,
            "runs": dict(self.runs),
        }

    @classmethod
    def restored(cls, data: Any) -> RetrainState:
        state = cls()
        if not isinstance(data, dict):
            return state

        def number(key: str) -> float | None:
            value = data.get(key)
            return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None

        phase = data.get("phase")
        if phase in OUTCOMES:
            state.phase = phase
        reason = data.get("reason")
        state.reason = _bounded(reason, MAX_REASON_CHARS) if isinstance(reason, str) else None
        trigger = data.get("trigger")
        state.trigger = trigger if trigger in ("button", "schedule") else None
        state.started, state.finished, state.duration_s = (
            number("started"),
            number("finished"),
            number("duration_s"),
        )
        gate = data.get("gate")
        state.gate = gate if isinstance(gate, dict) and len(json.dumps(gate)) < 2000 else None
        examples = number("examples")
        state.examples = int(examples) if examples is not None else None
        runs = data.get("runs")
        if isinstance(runs, dict):
            for key in OUTCOMES:
                value = runs.get(key)
                if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                    state.runs[key] = value
        return state


def read_states(path: Path) -> dict[str, RetrainState]:
    """The persisted states (``retrain.json``); a missing, oversized or corrupt file is empty."""
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        log.warning("retrain: cannot read %s (%s): last-trained times start empty", path, exc)
        return {}
    try:
        if len(raw) > MAX_FILE_BYTES:
            raise ValueError(f"larger than {MAX_FILE_BYTES} bytes")
        document = json.loads(raw)
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise ValueError("not a retrain state file")
        pipelines = document.get("pipelines")
        if not isinstance(pipelines, dict):
            raise ValueError("no pipelines")
    except (ValueError, UnicodeDecodeError) as exc:
        log.warning("retrain: ignoring %s (%s): last-trained times start empty", path, exc)
        return {}
    return {str(name)[:200]: RetrainState.restored(data) for name, data in list(pipelines.items())[:1000]}


def _write(path: Path, document: dict[str, Any]) -> None:
    """Atomically (a temporary file, fsync, ``os.replace``), as the state file is written."""
    import tempfile

    data = json.dumps(document, separators=(",", ":"), allow_nan=False).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------- the retrainer


class Retrainer:
    """Runs ``edge-infer learn`` for the daemon, one at a time, and reports its state."""

    def __init__(
        self,
        config: Callable[[], Config],
        config_path: Path | None,
        publish: Callable[[Outgoing], None],
        ratelog: RateLimitedLogger,
        *,
        is_leader: Callable[[], bool] = lambda: True,
        clock: Callable[[], float] = time.time,
        term_timeout_s: float = 5.0,
    ) -> None:
        self._config = config
        self.config_path = config_path.resolve() if config_path is not None else None
        self._publish = publish
        self.ratelog = ratelog
        self._is_leader = is_leader
        self.clock = clock
        self.term_timeout_s = term_timeout_s
        self.base = config().mqtt.base_topic
        self.path = corrections_dir(config()) / FILENAME
        self.states: dict[str, RetrainState] = {}
        self.queue: deque[tuple[str, str]] = deque()
        self.running: str | None = None
        self.refused: dict[str, int] = dict.fromkeys(REFUSALS, 0)
        self.lines_dropped = 0
        self.write_errors = 0
        self.pid: int | None = None  # the learn process while one runs
        self._wake: asyncio.Event | None = None
        self._planned: dict[str, tuple[tuple[float | None, LearnSchedule], float]] = {}
        self._started = False

    # -- which pipelines -----------------------------------------------------
    def learnable(self) -> list[str]:
        return sorted(n for n, p in self._config().pipelines.items() if p.enabled and p.learn is not None)

    def _state(self, name: str) -> RetrainState:
        state = self.states.get(name)
        if state is None:
            state = self.states[name] = RetrainState()
        return state

    # -- commands ------------------------------------------------------------
    def on_command(self, pipeline: str) -> None:
        """A validated Retrain press (from Corrections, on the event loop). Never raises."""
        self.request(pipeline, "button")

    def request(self, pipeline: str, trigger: str) -> str | None:
        """Queue a retrain of ``pipeline``; the refusal's reason, or None when queued."""
        reason: str | None = None
        if pipeline not in self.learnable():
            reason, detail = "not_learnable", f"pipeline {pipeline!r} has no learn section"
        elif not self._is_leader():
            reason, detail = "not_leader", "in a cluster only the leader retrains"
        elif self.config_path is None:
            reason, detail = "no_config_file", "the daemon was started without a config file to hand learn"
        elif self.running == pipeline:
            reason, detail = "busy", f"{pipeline} is training now"
        elif any(name == pipeline for name, _ in self.queue):
            reason, detail = "already_queued", f"{pipeline} is queued already"
        if reason is not None:
            self.refused[reason] += 1
            if reason != "not_learnable":  # shown in that pipeline's state
                state = self._state(pipeline)
                state.refused += 1
                self._send(pipeline)
            self.ratelog.warning(
                "retrain", reason, "retrain of %s refused (%s): %s", pipeline[:60], reason, detail
            )
            return reason
        self.queue.append((pipeline, trigger))
        state = self._state(pipeline)
        state.queued = True
        if self.running is not None:
            state.phase, state.progress = "queued", None
        self._send(pipeline)
        log.info("retrain of %s queued (%s)", pipeline, trigger)
        if self._wake is not None:
            self._wake.set()
        return None

    # -- reporting -----------------------------------------------------------
    def topic(self, pipeline: str) -> str:
        return f"{self.base}/{pipeline}/retrain/state"

    def _send(self, pipeline: str) -> None:
        if not self._started or not self._is_leader():
            return
        body = json.dumps(self._state(pipeline).payload(pipeline), separators=(",", ":"), default=str)
        self._publish(Outgoing(self.topic(pipeline), body.encode(), 1, True))

    def info(self) -> dict[str, Any]:
        """The ``retrain`` part of bridge/info."""
        names = self.learnable()
        return {
            "running": self.running,
            "queue": [name for name, _ in self.queue],
            "refused": {k: v for k, v in self.refused.items() if v},
            "lines_dropped": self.lines_dropped,
            "pipelines": {n: self._state(n).payload(n) for n in names},
        }

    # -- the loop ------------------------------------------------------------
    async def run(self) -> None:
        """The retrain task (in the daemon's TaskGroup): restore, publish, then train what is
        queued or due, one at a time, until cancelled."""
        self._wake = asyncio.Event()
        restored = await asyncio.to_thread(read_states, self.path)
        for name, state in restored.items():
            self.states.setdefault(name, state)
        self._started = True
        known: set[str] = set()
        while True:
            names = self.learnable()
            for name in names:
                if name not in known:  # at start, and a pipeline a reload gave a learn section
                    self._schedule(name)
                    self._send(name)
            known = set(names)
            if self.queue:
                name, trigger = self.queue.popleft()
                self._state(name).queued = False
                if name in names:
                    await self._train(name, trigger)
                continue
            wait = SCHEDULE_POLL_S
            now = self.clock()
            for name in names:
                due = self._schedule(name)
                if due is not None and due <= now and self.request(name, "schedule") is not None:
                    self._schedule(name, skip=True)  # refused (e.g. not the leader): the next one
                elif due is not None:
                    wait = min(wait, due - now)
            if self.queue:
                continue
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.05, wait))

    def _schedule(self, name: str, *, skip: bool = False) -> float | None:
        """The pipeline's next scheduled run, planned once per last run (and schedule): a due
        time stays due until it runs. ``skip``: a due run that was refused moves to the next
        time of day."""
        learn = self._config().pipelines[name].learn
        state = self._state(name)
        if learn is None or learn.schedule is None:
            state.next_run = None
            self._planned.pop(name, None)
            return None
        key = (state.finished, learn.schedule)
        plan = self._planned.get(name)
        if plan is None or plan[0] != key or skip:
            last = None if skip else state.finished
            plan = self._planned[name] = (key, next_run(learn.schedule, last, self.clock()))
        state.next_run = plan[1]
        return state.next_run

    def command(self, name: str) -> list[str]:
        config = self._config()
        learn = config.pipelines[name].learn
        assert learn is not None
        assert self.config_path is not None
        return [
            sys.executable,
            "-m",
            "edge.cli",
            "learn",
            "-c",
            str(self.config_path),
            name,
            "--events",
            "-",
            "--nice",
            str(LEARN_NICE),
            "--max-memory-mb",
            str(learn.max_memory_mb),
        ]

    async def _train(self, name: str, trigger: str) -> None:
        state = self._state(name)
        self.running = name
        started = self.clock()
        state.phase, state.progress, state.reason, state.trigger = "collecting", None, None, trigger
        state.started, state.gate, state.examples = started, None, None
        self._send(name)
        for other, _ in self.queue:
            self._send(other)
        log.info("retrain of %s started (%s): %s", name, trigger, " ".join(self.command(name)[1:]))
        tail: deque[str] = deque(maxlen=TAIL_LINES)
        verdict: dict[str, Any] | None = None
        clock0 = time.monotonic()
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.command(name),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,  # its own process group: SIGTERM reaches learn and its training
                limit=LINE_LIMIT,
            )
        except OSError as exc:
            self._finish(name, "failed", f"cannot start learn: {exc}", time.monotonic() - clock0)
            await self._save()
            return
        self.pid = proc.pid

        def on_event(line: str) -> None:
            nonlocal verdict
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            if not isinstance(event, dict) or "event" not in event:
                if line.strip():
                    tail.append(line)
                    log.info("learn %s: %s", name, line[:500])
                return
            kind = event.get("event")
            if kind == "verdict":
                verdict = event
                return
            if kind in ("collecting", "table"):
                state.phase = "collecting"
                if isinstance(event.get("examples"), int):
                    state.examples = event["examples"]
            elif kind == "training":
                state.phase = "training"
                progress = event.get("progress")
                state.progress = int(progress) if isinstance(progress, int | float) else state.progress
            elif kind == "evaluating":
                state.phase, state.progress = "evaluating", None
            else:
                return
            self._send(name)

        def on_log(line: str) -> None:
            if line.strip():
                tail.append(line)
                log.info("learn %s: %s", name, line[:500])

        try:
            assert proc.stdout is not None
            assert proc.stderr is not None
            await asyncio.gather(self._lines(proc.stdout, on_event), self._lines(proc.stderr, on_log))
            code = await proc.wait()
        except asyncio.CancelledError:
            await self._stop(proc)
            self.running, self.pid = None, None
            log.info("retrain of %s stopped: the daemon is stopping", name)
            raise
        finally:
            self._kill_group(proc.pid)
        self.pid = None
        seconds = time.monotonic() - clock0
        if verdict is not None:
            outcome = verdict.get("outcome")
            outcome = outcome if outcome in OUTCOMES else "failed"
            reason = str(verdict.get("reason") or verdict.get("message") or "")
            gate = verdict.get("gate")
            state.gate = gate if isinstance(gate, dict) else None
            if isinstance(verdict.get("examples"), int):
                state.examples = verdict["examples"]
        else:
            outcome = "failed"
            last = tail[-1] if tail else "no output"
            reason = f"learn exited with status {code} without a verdict: {last}"
        self._finish(name, outcome, reason, seconds)
        await self._save()

    def _finish(self, name: str, outcome: str, reason: str, seconds: float) -> None:
        state = self._state(name)
        state.phase, state.progress = outcome, None
        state.reason = None if outcome == "promoted" and not reason else _bounded(reason, MAX_REASON_CHARS)
        state.finished, state.duration_s = self.clock(), seconds
        state.runs[outcome] += 1
        self.running = None
        self._schedule(name)
        self._send(name)
        level = logging.INFO if outcome != "failed" else logging.WARNING
        log.log(level, "retrain of %s %s in %.1f s: %s", name, outcome, seconds, state.reason or "")

    async def _save(self) -> None:
        """``retrain.json`` (the snapshot on the loop, the write off it); a failure is counted."""
        document = {
            "format": FORMAT,
            "version": 1,
            "pipelines": {n: s.persisted() for n, s in self.states.items()},
        }
        try:
            await asyncio.to_thread(_write, self.path, document)
        except (OSError, ValueError) as exc:
            self.write_errors += 1
            log.warning("retrain: cannot write %s: %s", self.path, exc)

    async def _lines(self, stream: asyncio.StreamReader, handle: Callable[[str], None]) -> None:
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # longer than LINE_LIMIT: dropped (the reader cleared its buffer)
                self.lines_dropped += 1
                continue
            if not raw:
                return
            try:
                handle(raw.decode("utf-8", "replace").rstrip("\r\n"))
            except Exception as exc:  # a line we cannot make sense of must not stop the daemon
                self.ratelog.warning("retrain", "bad_line", "retrain: learn output not understood: %s", exc)

    async def _stop(self, proc: asyncio.subprocess.Process) -> None:
        """SIGTERM to learn's process group, SIGKILL after ``term_timeout_s``."""
        if proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), self.term_timeout_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()

    @staticmethod
    def _kill_group(pgid: int) -> None:
        """Whatever is left of learn's process group once learn has exited (nothing, normally)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)

    def collector(self) -> RetrainCollector:
        return RetrainCollector(self)


class RetrainCollector(Collector):
    """``edge_infer_retrain_*`` at scrape time, from the plain counters."""

    def __init__(self, retrainer: Retrainer) -> None:
        self.retrainer = retrainer

    def collect(self) -> Iterator[Metric]:
        r = self.retrainer
        refused = CounterMetricFamily(
            "edge_infer_retrain_refused", "Retrain requests refused, by reason.", labels=["reason"]
        )
        for reason in REFUSALS:
            refused.add_metric([reason], r.refused[reason])
        yield refused
        runs = CounterMetricFamily(
            "edge_infer_retrain_runs",
            "Retrains finished, by pipeline and outcome.",
            labels=["pipeline", "outcome"],
        )
        running = GaugeMetricFamily(
            "edge_infer_retrain_running", "1 while this pipeline's learn process runs.", labels=["pipeline"]
        )
        progress = GaugeMetricFamily(
            "edge_infer_retrain_progress_percent",
            "Training progress of the running retrain.",
            labels=["pipeline"],
        )
        last = GaugeMetricFamily(
            "edge_infer_retrain_last_finished_timestamp_seconds",
            "When this pipeline's last retrain finished (Unix time).",
            labels=["pipeline"],
        )
        duration = GaugeMetricFamily(
            "edge_infer_retrain_last_duration_seconds", "How long the last retrain took.", labels=["pipeline"]
        )
        for name in r.learnable():
            state = r.states.get(name) or RetrainState()
            for outcome in OUTCOMES:
                runs.add_metric([name, outcome], state.runs[outcome])
            running.add_metric([name], 1.0 if r.running == name else 0.0)
            if r.running == name and state.progress is not None:
                progress.add_metric([name], float(state.progress))
            if state.finished is not None:
                last.add_metric([name], state.finished)
            if state.duration_s is not None:
                duration.add_metric([name], state.duration_s)
        yield from (runs, running, progress, last, duration)


# ---------------------------------------------------------------------------- Home Assistant


def retrain_entities(pipelines: Iterable[Pipeline], button: bool) -> list[RetrainEntity]:
    """The learnable pipelines' bridge entities (``button``: the command topics are subscribed)."""
    return [
        RetrainEntity(p.name, p.base, button)
        for p in sorted(pipelines, key=lambda p: p.name)
        if p.cfg.learn is not None and p.cfg.homeassistant.enabled
    ]
