"""This instance's part in a cluster (``cluster.enabled``, docs/scale-out.md).

:class:`Cluster` holds the membership (edge/partition.py's :class:`Membership` and
:class:`Partitioner`), the members' bridge info and the leader's duties: it reads the members'
``<base>/instances/<id>/status`` and ``.../bridge/info``, moves devices when the member set
changes (through ``forget``), publishes the cluster's ``<base>/status`` and ``<base>/bridge/info``
while it leads, and runs the clean leave at a stop. It publishes through ``publish`` and asks the
link only through the callables it is given; the daemon (edge/daemon.py) wires it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from edge import __version__
from edge.config import Config
from edge.partition import Membership, MembershipChange, OwnedDecoder, Partitioner, instance_from_topic
from edge.pipeline import Pipeline
from edge.safejson import loads_bounded

log = logging.getLogger("edge.daemon")

Publish = Callable[[str, bytes, int, bool], None]  # topic, payload, qos, retain


def own_topics(config: Config) -> tuple[str, str]:
    """This instance's status and bridge info topics: ``<base>/instances/<id>/...`` in a
    cluster, else ``<base>/status`` and ``<base>/bridge/info``."""
    base = config.mqtt.base_topic
    if config.cluster.enabled:
        base = f"{base}/instances/{config.cluster.resolved_instance()}"
    return f"{base}/status", f"{base}/bridge/info"


class Cluster:
    """Membership, partitioning, the leader's topics and the clean leave of one instance."""

    def __init__(
        self,
        config: Config,
        *,
        publish: Publish,
        connected: Callable[[], bool],
        update_subscriptions: Callable[[], Awaitable[None]],
        forget: Callable[[Iterable[Pipeline], Callable[[str], bool]], int],
        pipelines: Callable[[], Iterable[Pipeline]],
    ) -> None:
        """``forget(pipelines, owns)``: drop the devices ``owns`` refuses (edge/engine.py);
        ``pipelines()``: the running ones."""
        cluster = config.cluster
        self.config = config
        self.base = config.mqtt.base_topic
        self.instance = cluster.resolved_instance()
        static = tuple(cluster.members) if cluster.members is not None else None
        self.membership = Membership(self.instance, static)
        self.partitioner = Partitioner(self.instance, self.membership.members())
        self.prefix = f"{self.base}/instances"
        self.status_topic, self.info_topic = own_topics(config)
        self.publish = publish
        self.connected = connected
        self.update_subscriptions = update_subscriptions
        self.forget = forget
        self.pipelines = pipelines
        self.on_leader: Callable[[], None] = lambda: None  # became leader or members changed
        self.leaving = False  # stopping: shared subscriptions are dropped
        self.left = False  # stopping, own offline seen: partition subscriptions are dropped too
        self._left_seen = asyncio.Event()
        self.member_info: dict[str, dict[str, Any]] = {}
        self.own_info: dict[str, Any] = {}  # this instance's last bridge info
        self.started = time.time()
        self._was_leader = False

    def bind(self, pipelines: dict[str, Pipeline]) -> None:
        """Partition pipelines keep only the devices this instance owns (see edge.partition)."""
        membership, partitioner = self.membership, self.partitioner
        for name, pipeline in pipelines.items():
            if self.config.scale_out(name) == "partition" and not isinstance(pipeline.decoder, OwnedDecoder):
                pipeline.decoder = OwnedDecoder(pipeline.decoder, partitioner.owns, lambda: membership.active)

    def is_leader(self) -> bool:
        """The live instance with the smallest id."""
        return self.membership.leader() == self.instance

    def subscriptions(self) -> list[tuple[str, int]]:
        return [(f"{self.prefix}/+/status", 1), (f"{self.prefix}/+/bridge/info", 1)]

    def handles(self, topic: str) -> bool:
        return topic.startswith(self.prefix)

    def on_message(self, topic: str, payload: bytes) -> None:
        """A member's status or bridge info."""
        instance = instance_from_topic(topic, self.prefix, "status")
        if instance is not None:
            if instance == self.instance and self.leaving and payload.strip() != b"online":
                self._left_seen.set()
            self._changed(self.membership.observe(instance, payload))
            return
        instance = instance_from_topic(topic, self.prefix, "bridge/info")
        if instance is not None:
            try:
                info = loads_bounded(payload) if payload else None
            except ValueError:  # BoundedJsonError too: too large, too deep, too many digits
                info = None
            if isinstance(info, dict):
                self.member_info[instance] = info
            else:
                self.member_info.pop(instance, None)

    def reconnected(self) -> None:
        """The link is connected again: with a discovered member set, the broker published this
        instance's will (or its offline) while it was away and the others took its devices; it
        rejoins at its own 'online', which is on its way."""
        if self.membership.dynamic and self.membership.active:
            self._changed(self.membership.observe(self.instance, b"offline"))

    def _changed(self, change: MembershipChange) -> None:
        if change.joined:
            log.info("cluster: instance %s joined; owning its share from now on", self.instance)
        if change.left:
            log.info("cluster: instance %s left; owning no devices from now on", self.instance)
        if change.members_changed:
            self.partitioner.set_members(change.new)
            partitioned = [p for p in self.pipelines() if isinstance(p.decoder, OwnedDecoder)]
            moved = self.forget(partitioned, self.partitioner.owns)
            log.info(
                "cluster: members %s -> %s; %d devices moved away (their windows restart at the new owner)",
                ",".join(change.old) or "-",
                ",".join(change.new) or "-",
                moved,
            )
        leader = self.is_leader()
        if leader and (change.members_changed or not self._was_leader) and self.connected():
            self.publish_info()
            self.on_leader()
        self._was_leader = leader

    def info(self) -> dict[str, Any]:
        """``<base>/bridge/info`` of the whole cluster, published by the leader: the members'
        own bridge/info figures added up (version and uptime are the leader's)."""
        members = sorted(self.membership.online | {self.instance})
        infos = {m: self.member_info.get(m, {}) for m in members}
        infos[self.instance] = self.own_info
        latencies = [i["latency_ms"] for i in infos.values() if isinstance(i.get("latency_ms"), int | float)]

        def total(key: str) -> float:
            return sum(float(i.get(key) or 0) for i in infos.values())

        return {
            "version": __version__,
            "uptime_s": round(time.time() - self.started, 1),
            "messages_per_s": round(total("messages_per_s"), 3),
            "drops": int(total("drops")),
            "latency_ms": round(max(latencies), 3) if latencies else None,
            "leader": self.instance,
            "members": members,
            "partition_members": list(self.membership.members()),
        }

    def fields(self) -> dict[str, Any]:
        """This instance's cluster fields in its own bridge info."""
        return {
            "instance": self.instance,
            "cluster": {
                "members": list(self.membership.members()),
                "online": sorted(self.membership.online),
                "leader": self.membership.leader(),
                "active": self.membership.active,
                "static": self.membership.static is not None,
            },
        }

    def own_info_published(self, info: dict[str, Any]) -> None:
        """This instance published its bridge info: the leader publishes the cluster's too."""
        self.own_info = info
        if self.is_leader() and self.connected():
            self.publish_info()

    def publish_info(self) -> None:
        """The leader keeps ``<base>/status`` (availability of the shared entities) and
        ``<base>/bridge/info`` (the cluster's figures)."""
        self.publish(f"{self.base}/status", b"online", 1, True)
        self.publish(f"{self.base}/bridge/info", json.dumps(self.info()).encode(), 1, True)

    async def leave(self) -> None:
        """A clean stop, before intake closes; nothing is lost or answered twice.

        1. Unsubscribe the shared subscriptions: the broker gives new messages to the others.
        2. Publish this instance's ``offline`` and keep answering until it comes back: every
           message the broker routed to this instance before it has then arrived, and every other
           member moves this instance's devices to itself at that same message.
        3. With a discovered member set, unsubscribe the partition filters too (a static member
           keeps them, so its persistent session queues its devices' messages until it is back).
        """
        if not self.connected():
            return
        self.leaving = True
        was_leader = self.is_leader()
        await self.update_subscriptions()
        self.publish(self.status_topic, b"offline", 1, True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._left_seen.wait(), self.config.shutdown_timeout_s / 2)
        if self.membership.dynamic:
            self.left = True
            await self.update_subscriptions()
        if was_leader and not (self.membership.online - {self.instance}):
            self.publish(f"{self.base}/status", b"offline", 1, True)
