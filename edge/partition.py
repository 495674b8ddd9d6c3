"""Scale-out: which instance answers which device. Pure logic, no I/O.

Several edge-infer instances share one broker (see ``docs/scale-out.md``):

* **shared** pipelines (stateless snapshot models) subscribe through MQTT 5 shared subscriptions
  and the broker hands each message to one member of the group;
* **partition** pipelines (windows, joins) need every message of a device on one instance: all
  instances subscribe to everything and each keeps only the devices it *owns*.

Ownership is rendezvous (highest random weight) hashing over the current member set with a
stable hash (BLAKE2b of ``member NUL device``; never Python's salted :func:`hash`): every
instance computes the same owner from the same member set, and when a member joins or leaves
only the devices whose owner changes move (about 1/N of them).

The member set is either static (``cluster.members``) or dynamic: the retained
``<base>/instances/<id>/status`` topics (``online`` / ``offline``, ``offline`` also the last
will) name the live members. Every instance subscribes to the same topics on the same broker,
so it sees membership changes in the same order relative to the data messages: a message the
broker routed before a member's ``online`` is owned under the old set by everybody, one routed
after it under the new set. :class:`Membership` turns status messages into member-set changes
and knows when this instance itself has joined (its own ``online`` came back) or left (its own
``offline`` came back), which are the points where it starts and stops owning devices.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from edge.decode import Decoder, Event

INSTANCE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
ONLINE = b"online"
OFFLINE = b"offline"


def stable_hash(text: str) -> int:
    """A 64-bit hash that is the same in every process, on every machine and Python version."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def rendezvous_owner(key: str, members: Iterable[str]) -> str | None:
    """The member with the highest ``stable_hash(member NUL key)``; ``None`` without members.

    Ties (practically impossible with 64 bits) go to the smaller member id, so the result never
    depends on the order of ``members``.
    """
    best: str | None = None
    best_score = -1
    for member in members:
        score = stable_hash(f"{member}\0{key}")
        if score > best_score or (score == best_score and best is not None and member < best):
            best, best_score = member, score
    return best


def instance_from_topic(topic: str, prefix: str, suffix: str) -> str | None:
    """``a`` from ``<prefix>/a/<suffix>``; ``None`` when the topic has another shape."""
    head = prefix + "/"
    tail = "/" + suffix
    if not (topic.startswith(head) and topic.endswith(tail)):
        return None
    middle = topic[len(head) : len(topic) - len(tail)]
    return middle if middle and "/" not in middle else None


@dataclass
class Partitioner:
    """Answers ``owns(device)`` for one instance under the current member set (cached per device)."""

    instance: str
    members: tuple[str, ...] = ()
    _cache: dict[str, bool] = field(default_factory=dict, repr=False)

    def set_members(self, members: Iterable[str]) -> tuple[str, ...]:
        """Switch to a new member set; returns the old one."""
        old = self.members
        self.members = tuple(sorted(set(members)))
        if self.members != old:
            self._cache.clear()
        return old

    def owner(self, device: str) -> str | None:
        return rendezvous_owner(device, self.members)

    def owns(self, device: str) -> bool:
        owned = self._cache.get(device)
        if owned is None:
            owned = self.owner(device) == self.instance
            if len(self._cache) > 100_000:
                self._cache.clear()
            self._cache[device] = owned
        return owned


@dataclass
class MembershipChange:
    """What one status message changed."""

    old: tuple[str, ...]
    new: tuple[str, ...]
    joined: bool = False  # this instance's own ``online`` came back: it now owns its share
    left: bool = False  # this instance's own ``offline`` came back: it owns nothing any more

    @property
    def members_changed(self) -> bool:
        return self.old != self.new


@dataclass
class Membership:
    """The member set, from a static list or from the instances' retained status topics.

    ``online`` holds every instance whose status was last seen ``online`` (used for the leader
    and, in dynamic mode, for the member set). In dynamic mode this instance counts as a member
    only between its own ``online`` and ``offline`` echoes (``active``); in static mode it always
    does, and the member set never changes.
    """

    instance: str
    static: tuple[str, ...] | None = None
    online: set[str] = field(default_factory=set)
    active: bool = False

    def __post_init__(self) -> None:
        if self.static is not None:
            self.static = tuple(sorted(set(self.static)))
            self.active = True

    @property
    def dynamic(self) -> bool:
        return self.static is None

    def members(self) -> tuple[str, ...]:
        """The set devices are partitioned over."""
        if self.static is not None:
            return self.static
        live = set(self.online)
        live.discard(self.instance)
        if self.active:
            live.add(self.instance)
        return tuple(sorted(live))

    def leader(self) -> str | None:
        """The smallest id among the live instances (static mode: live and listed)."""
        live = set(self.online)
        live.discard(self.instance)
        if self.active:
            live.add(self.instance)
        if self.static is not None:
            live &= set(self.static)
        return min(live) if live else None

    def observe(self, instance: str, payload: bytes) -> MembershipChange:
        """A message on ``<base>/instances/<instance>/status``."""
        old = self.members()
        state = payload.strip()
        joined = left = False
        if state == ONLINE:
            self.online.add(instance)
            if instance == self.instance and not self.active:
                self.active = joined = True
        elif state == OFFLINE or not state:
            self.online.discard(instance)
            if instance == self.instance and self.active and self.dynamic:
                self.active = False
                left = True
        return MembershipChange(old, self.members(), joined, left)


class OwnedDecoder:
    """Wraps a pipeline's decoder: events of devices this instance does not own are dropped.

    ``skipped`` counts readings of other instances' devices (normal in partition mode, not an
    error); ``inactive`` counts those that came while this instance was not a member (before its
    own ``online`` came back, or after its own ``offline`` did).
    Attributes the wrapper does not have (``device_info`` and the like) come from the decoder.
    """

    def __init__(self, inner: Decoder, owns: Callable[[str], bool], active: Callable[[], bool]) -> None:
        self.inner = inner
        self._owns = owns
        self._active = active
        self.skipped = 0
        self.inactive = 0

    @property
    def filters(self) -> list[str]:
        return self.inner.filters

    def decode(self, topic: str, payload: bytes) -> list[Event]:
        events = self.inner.decode(topic, payload)
        if not events:
            return events
        if not self._active():
            self.inactive += len(events)
            return []
        owns = self._owns
        kept = [e for e in events if owns(e.device)]
        self.skipped += len(events) - len(kept)
        return kept

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
