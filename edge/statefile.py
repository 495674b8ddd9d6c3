"""The optional state file: per-device windows and joins that survive a daemon restart.

Written atomically (a temporary file in the same directory, fsync, ``os.replace``, fsync of the
directory), so a crash mid-write leaves the previous file intact. The document is JSON (never
pickle: nothing in it is executed) with a format name and version; each pipeline's part carries
a signature of the input it builds (model input names, layout and shape, feature settings), and
is restored only when the running pipeline builds exactly that input. Anything else – another
version, a corrupt file, a changed window size – is ignored with one warning that says why, and
the daemon starts with empty windows as it would without the file.

Restored windows keep their last sample time, so a daemon that was down longer than a window's
``max_gap_s`` restarts that window on the first new reading instead of joining samples across
the outage.

Beside the windows the file keeps, under ``last_seen``, the wall time each (pipeline, device)
last answered (:meth:`edge.discovery.Discovery.last_seen`), so ``homeassistant.forget_after_days``
counts across restarts. It does not depend on a pipeline's input (no signature); a file without it
(an older edge-infer) restores as if no device had a time, and an older edge-infer reading a newer
file ignores it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import stat
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge.pipeline import Pipeline

log = logging.getLogger("edge.state")

FORMAT = "edge-infer-state"
VERSION = 1


def signature(pipeline: Pipeline) -> dict[str, Any]:
    """What a pipeline's saved states depend on; a restored state must match it exactly."""
    spec = pipeline.spec
    return {
        "features": list(pipeline.readings),
        "layout": spec.layout,
        "sample_shape": [int(n) for n in spec.sample_shape],
        "settings": pipeline.cfg.features.model_dump(mode="json"),
    }


def _encode(value: Any) -> Any:
    """JSON has no NaN/Infinity: keep them as strings, exactly as Python spells them."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return float(value)
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    return value


@dataclass
class RestoreReport:
    """What :func:`restore` did, for the log and for tests."""

    devices: int = 0
    pipelines: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # pipeline -> why its part was ignored
    problem: str | None = None  # why the whole file was ignored
    # pipeline -> device -> wall time it last answered (running pipelines only, valid times only)
    last_seen: dict[str, dict[str, float]] = field(default_factory=dict)
    last_seen_dropped: int = 0  # last_seen entries not restored (pipeline gone, not a time)


LastSeen = Mapping[str, Mapping[str, float]]


def snapshot(pipelines: Mapping[str, Pipeline], last_seen: LastSeen | None = None) -> dict[str, Any]:
    """The document :func:`save` writes (devices whose state is empty are left out); ``last_seen``
    (pipeline -> device -> wall time) only for pipelines in ``pipelines``."""
    parts: dict[str, Any] = {}
    for name, pipeline in pipelines.items():
        devices = {device: _encode(state.to_state()) for device, state in pipeline.store.states.items()}
        parts[name] = {"signature": signature(pipeline), "devices": devices}
    seen = {
        name: {device: float(t) for device, t in devices.items()}
        for name, devices in (last_seen or {}).items()
        if name in pipelines and devices
    }
    return {
        "format": FORMAT,
        "version": VERSION,
        "written_at": time.time(),
        "pipelines": parts,
        "last_seen": seen,
    }


def save(path: Path, pipelines: Mapping[str, Pipeline], last_seen: LastSeen | None = None) -> int:
    """Write the state of every device atomically; returns the number of devices written."""
    return write(path, snapshot(pipelines, last_seen))


def _is_time(value: Any) -> bool:
    return (
        isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    )


def _restore_last_seen(
    document: dict[str, Any], pipelines: Mapping[str, Pipeline], report: RestoreReport
) -> None:
    """``document["last_seen"]`` into ``report.last_seen``: entries of pipelines that are not
    running, and anything that is not a device name with a positive finite time, are dropped
    (counted); at most ``max_devices`` per pipeline, the most recent kept. Absent: nothing."""
    part = document.get("last_seen")
    if part is None:
        return
    if not isinstance(part, dict):
        report.skipped["last_seen"] = "not a mapping"
        return
    for name, devices in part.items():
        pipeline = pipelines.get(name)
        if pipeline is None or not isinstance(devices, dict):
            report.last_seen_dropped += len(devices) if isinstance(devices, dict) else 1
            continue
        valid = {d: float(t) for d, t in devices.items() if isinstance(d, str) and d and _is_time(t)}
        report.last_seen_dropped += len(devices) - len(valid)
        bound = pipeline.cfg.max_devices
        if len(valid) > bound:
            report.last_seen_dropped += len(valid) - bound
            valid = dict(sorted(valid.items(), key=lambda item: item[1], reverse=True)[:bound])
        if valid:
            report.last_seen[name] = valid


def write(path: Path, document: dict[str, Any]) -> int:
    """Write a :func:`snapshot` atomically (the slow half of :func:`save`: run it off the loop)."""
    data = json.dumps(document, separators=(",", ":"), allow_nan=False).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return sum(len(part["devices"]) for part in document["pipelines"].values())


MAX_STATE_BYTES = 256 << 20  # a larger state file is ignored unread (see restore's max_bytes)


def _read_bounded(path: Path, max_bytes: int) -> bytes:
    """The file's bytes: a regular file of at most ``max_bytes``, else ValueError (a device such
    as ``/dev/zero`` would grow without end)."""
    with path.open("rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise ValueError("not a regular file")
        raw = handle.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise ValueError(f"larger than {max_bytes} bytes")
    return raw


def restore(path: Path, pipelines: Mapping[str, Pipeline], max_bytes: int = MAX_STATE_BYTES) -> RestoreReport:
    """Load what fits the running pipelines; warn once about what does not. Never raises for
    a bad file: the daemon then starts empty, as without one. Special files and files larger
    than ``max_bytes`` are ignored unread."""
    report = RestoreReport()
    try:
        raw = _read_bounded(path, max_bytes)
    except FileNotFoundError:
        return report
    except OSError as exc:
        report.problem = f"cannot read it: {exc.strerror}"
        log.warning("state file %s ignored: %s", path, report.problem)
        return report
    except ValueError as exc:
        report.problem = str(exc)
        log.warning("state file %s ignored: %s", path, report.problem)
        return report
    try:
        document = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        report.problem = f"not valid JSON ({exc}); it will be overwritten"
        log.warning("state file %s ignored: %s", path, report.problem)
        return report
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        report.problem = "not an edge-infer state file"
    elif document.get("version") != VERSION:
        report.problem = f"version {document.get('version')!r}, this edge-infer reads version {VERSION}"
    elif not isinstance(document.get("pipelines"), dict):
        report.problem = "no 'pipelines' mapping"
    if report.problem:
        log.warning("state file %s ignored: %s", path, report.problem)
        return report
    for name, part in document["pipelines"].items():
        pipeline = pipelines.get(name)
        if pipeline is None:
            report.skipped[name] = "no such pipeline any more"
            continue
        if not isinstance(part, dict) or part.get("signature") != signature(pipeline):
            report.skipped[name] = "its input changed (model inputs, window size or feature settings)"
            continue
        devices = part.get("devices")
        if not isinstance(devices, dict):
            report.skipped[name] = "no 'devices' mapping"
            continue
        restored = 0
        for device, state in devices.items():
            try:
                target = pipeline.store.get(device)  # honours devices lists and max_devices
                target.load_state(_decode(state))
            except Exception as exc:  # one bad entry never costs the others
                pipeline.store.states.pop(device, None)
                report.skipped[f"{name}/{device}"] = f"{type(exc).__name__}: {exc}"
                continue
            restored += 1
        report.devices += restored
        report.pipelines.append(name)
    _restore_last_seen(document, pipelines, report)
    for name, why in list(report.skipped.items())[:5]:
        log.warning("state file %s: %s not restored: %s", path, name, why)
    if len(report.skipped) > 5:
        log.warning("state file %s: %d more not restored", path, len(report.skipped) - 5)
    if report.pipelines:
        log.info(
            "restored %d device state(s) of %s from %s", report.devices, ", ".join(report.pipelines), path
        )
    if report.last_seen or report.last_seen_dropped:
        log.info(
            "restored the last-seen time of %d device(s) from %s (%d entries dropped: pipeline gone or "
            "not a time)",
            sum(len(d) for d in report.last_seen.values()),
            path,
            report.last_seen_dropped,
        )
    return report
