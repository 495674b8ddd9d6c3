"""Putting a model where the daemon loads it, atomically, and taking it back.

The daemon watches its model files (``reload.watch_models``: mtime, size and
inode) and reloads a file that changed, so a model written with
``os.replace`` is picked up by a running daemon without a restart, and never
half-written. The model it replaces is kept beside it as ``NAME.previous``;
``edge-infer models rollback -c CONFIG PIPELINE`` swaps the two back.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import edge

PREVIOUS_SUFFIX = ".previous"


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


def install(model: Path, target: Path, card: Path | None = None) -> Path | None:
    """Put ``model`` at ``target`` atomically; the file it replaces becomes ``target.previous``
    (returned, or None when there was none). ``card`` is copied to ``target.card.md``."""
    if is_bundled(target):
        raise DeployError(
            f"{target} is a bundled model (zoo:): point models.NAME.path at a file of your own "
            "(copy the bundled one there first to keep comparing against it)"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    previous: Path | None = None
    if target.is_file():
        previous = previous_path(target)
        _copy_atomic(target, previous)
        old_card = target.with_name(target.name + ".card.md")
        if old_card.is_file():
            _copy_atomic(old_card, previous.with_name(previous.name + ".card.md"))
    if card is not None and card.is_file():
        _copy_atomic(card, target.with_name(target.name + ".card.md"))
    _copy_atomic(model, target)  # last: the daemon reloads on this replace
    return previous


def rollback(target: Path) -> Path:
    """Swap ``target`` with ``target.previous`` (a second rollback undoes the first)."""
    previous = previous_path(target)
    if not previous.is_file():
        raise DeployError(f"no previous version of {target} to roll back to ({previous} does not exist)")
    if is_bundled(target):
        raise DeployError(f"{target} is a bundled model and is never replaced")
    hold = target.with_name(f".{target.name}.rollback-{os.getpid()}")
    card, prev_card = (
        target.with_name(target.name + ".card.md"),
        previous.with_name(previous.name + ".card.md"),
    )
    hold_card = hold.with_name(hold.name + ".card.md")
    try:
        if target.is_file():
            shutil.copyfile(target, hold)
        if card.is_file():
            shutil.copyfile(card, hold_card)
        if prev_card.is_file():
            _copy_atomic(prev_card, card)
        _copy_atomic(previous, target)  # the daemon reloads on this replace
        if hold.is_file():
            os.replace(hold, previous)
        if hold_card.is_file():
            os.replace(hold_card, prev_card)
    finally:
        for tmp in (hold, hold_card):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    return previous
