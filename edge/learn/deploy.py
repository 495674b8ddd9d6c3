"""Putting a model where the daemon loads it, atomically, and taking it back.

The daemon watches its model files (``reload.watch_models``: mtime, size and
inode) and reloads a file that changed, so a model written with
``os.replace`` is picked up by a running daemon without a restart, and never
half-written. The model it replaces is kept beside it as ``NAME.previous``;
``edge-infer models rollback -c CONFIG PIPELINE`` swaps the two back. The files that describe a
model (its sidecars: ``NAME.card.md``, ``NAME.quality.json``) go with it both ways.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import edge

PREVIOUS_SUFFIX = ".previous"
CARD_SUFFIX = ".card.md"
QUALITY_SUFFIX = ".quality.json"  # edge/quality.py's record
SIDECARS = (CARD_SUFFIX, QUALITY_SUFFIX)  # files beside a model that describe it


class DeployError(RuntimeError):
    """A model that cannot be put in place (named by what is wrong)."""


def previous_path(target: Path) -> Path:
    return target.with_name(target.name + PREVIOUS_SUFFIX)


def is_bundled(path: Path) -> bool:
    """A file shipped inside the edge-infer package (``zoo:`` models): never overwritten."""
    package = Path(edge.__file__).resolve().parent
    return package in path.resolve().parents


def _copy_atomic(src: Path, dest: Path) -> None:
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    try:
        shutil.copyfile(src, tmp)
        with tmp.open("rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    _fsync_dir(dest.parent)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def sidecar(model: Path, suffix: str) -> Path:
    """A file that describes ``model`` and lives beside it: ``NAME.onnx`` + ``suffix``."""
    return model.with_name(model.name + suffix)


def install(
    model: Path, target: Path, card: Path | None = None, sidecars: Mapping[str, Path] | None = None
) -> Path | None:
    """Put ``model`` at ``target`` atomically; the file it replaces becomes ``target.previous``
    (returned, or None when there was none). ``card`` is copied to ``target.card.md`` and each
    of ``sidecars`` (suffix -> file, e.g. ``{".quality.json": record}``) to ``target`` + suffix.
    The sidecars the replaced model had (SIDECARS, and any named here) move with it to
    ``target.previous`` + suffix; one the new model is not given is not left beside it."""
    if is_bundled(target):
        raise DeployError(
            f"{target} is a bundled model (zoo:): point models.NAME.path at a file of your own "
            "(copy the bundled one there first to keep comparing against it)"
        )
    given = dict(sidecars or {})
    if card is not None and card.is_file():
        given[CARD_SUFFIX] = card
    for suffix in given:
        if suffix not in SIDECARS:
            raise DeployError(f"unknown sidecar {suffix!r} (known: {', '.join(SIDECARS)})")
    target.parent.mkdir(parents=True, exist_ok=True)
    previous: Path | None = None
    if target.is_file():
        previous = previous_path(target)
        _copy_atomic(target, previous)
        for suffix in SIDECARS:
            old, kept = sidecar(target, suffix), sidecar(previous, suffix)
            if old.is_file():
                _copy_atomic(old, kept)
            else:
                with contextlib.suppress(FileNotFoundError):
                    kept.unlink()  # the previous model had none: no stale one beside it
    for suffix in SIDECARS:
        dest = sidecar(target, suffix)
        if suffix in given:
            _copy_atomic(given[suffix], dest)
        elif suffix != CARD_SUFFIX or previous is not None:
            # it described the model being replaced (a card without a model is left alone)
            with contextlib.suppress(FileNotFoundError):
                dest.unlink()
    _copy_atomic(model, target)  # last: the daemon reloads on this replace, its sidecars in place
    return previous


def rollback(target: Path) -> Path:
    """Swap ``target`` with ``target.previous``, each with its sidecars (a second rollback undoes
    the first)."""
    previous = previous_path(target)
    if not previous.is_file():
        raise DeployError(f"no previous version of {target} to roll back to ({previous} does not exist)")
    if is_bundled(target):
        raise DeployError(f"{target} is a bundled model and is never replaced")
    hold = target.with_name(f".{target.name}.rollback-{os.getpid()}")
    holds = [hold] + [sidecar(hold, suffix) for suffix in SIDECARS]
    try:
        if target.is_file():
            shutil.copyfile(target, hold)
        for suffix in SIDECARS:
            current, kept = sidecar(target, suffix), sidecar(previous, suffix)
            if current.is_file():
                shutil.copyfile(current, sidecar(hold, suffix))
            if kept.is_file():
                _copy_atomic(kept, current)
            else:
                with contextlib.suppress(FileNotFoundError):
                    current.unlink()
        _copy_atomic(previous, target)  # the daemon reloads on this replace
        if hold.is_file():
            os.replace(hold, previous)
        for suffix in SIDECARS:
            held, kept = sidecar(hold, suffix), sidecar(previous, suffix)
            if held.is_file():
                os.replace(held, kept)
            else:
                with contextlib.suppress(FileNotFoundError):
                    kept.unlink()
    finally:
        for tmp in holds:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    return previous
