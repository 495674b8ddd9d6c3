"""Scale-out logic without a broker: stable hashing, ownership, membership, config, subscriptions."""

from __future__ import annotations

import asyncio
import collections
import random
from pathlib import Path
from typing import Any, ClassVar

import pytest

from edge.config import Config, ConfigError, load_config, parse_config
from edge.daemon import Daemon
from edge.decode import Availability, Decoded, Event
from edge.partition import (
    Membership,
    OwnedDecoder,
    Partitioner,
    instance_from_topic,
    rendezvous_owner,
    stable_hash,
)
from tests.harness import write_config
from tests.onnx_models import snapshot_classifier, window_classifier


def test_stable_hash_is_fixed_across_processes_and_versions() -> None:
    # BLAKE2b-64 of the UTF-8 text: a regression check that the function never changes,
    # since every instance of a cluster (and every release) must agree on it.
    assert stable_hash("kitchen") == 0xB0CABB4AE2643BE7
    assert stable_hash("a\0dev-1") == 0xBDC3BFE67885A841
    assert stable_hash("kitchen") != stable_hash("Kitchen")


def test_owner_does_not_depend_on_member_order() -> None:
    members = ["a", "b", "c", "d"]
    for i in range(200):
        owners = {rendezvous_owner(f"d{i}", random.sample(members, len(members))) for _ in range(5)}
        assert len(owners) == 1
    assert rendezvous_owner("x", []) is None
    assert rendezvous_owner("x", ["solo"]) == "solo"


def test_shares_are_balanced() -> None:
    counts = collections.Counter(rendezvous_owner(f"sensor-{i}", ["a", "b", "c"]) for i in range(3000))
    assert set(counts) == {"a", "b", "c"}
    for count in counts.values():
        assert 850 < count < 1150, counts


def moved_keys(keys: list[str], old: tuple[str, ...], new: tuple[str, ...]) -> list[str]:
    """The keys whose owner differs between the member sets ``old`` and ``new``."""
    return [k for k in keys if rendezvous_owner(k, old) != rendezvous_owner(k, new)]


def test_a_join_moves_only_devices_to_the_newcomer_and_a_leave_only_the_leavers() -> None:
    keys = [f"dev{i}" for i in range(3000)]
    moved = moved_keys(keys, ("a", "b"), ("a", "b", "c"))
    assert all(rendezvous_owner(k, ("a", "b", "c")) == "c" for k in moved)
    assert 800 < len(moved) < 1200  # about a third
    gone = moved_keys(keys, ("a", "b", "c"), ("a", "c"))
    assert all(rendezvous_owner(k, ("a", "b", "c")) == "b" for k in gone)


def test_partitioner_partitions_exactly() -> None:
    parts = [Partitioner(m, ("a", "b", "c")) for m in "abc"]
    for i in range(500):
        assert sum(p.owns(f"d{i}") for p in parts) == 1
    old = parts[0].set_members(("a", "b"))
    assert old == ("a", "b", "c")
    assert parts[0].members == ("a", "b")


def test_dynamic_membership_follows_status_messages() -> None:
    m = Membership("b")
    assert m.dynamic
    assert m.members() == ()
    change = m.observe("a", b"online")  # retained status of a running member
    assert change.new == ("a",)
    assert not change.joined
    assert m.leader() == "a"
    change = m.observe("b", b"online")  # this instance's own online came back: it joins
    assert change.joined
    assert change.new == ("a", "b")
    assert m.observe("c", b"online").new == ("a", "b", "c")
    change = m.observe("a", b"offline")  # a's last will
    assert change.new == ("b", "c")
    assert m.leader() == "b"
    assert m.observe("c", b"").new == ("b",)  # a cleared retained status counts as offline
    change = m.observe("b", b"offline")
    assert change.left
    assert change.new == ()
    assert not m.active


def test_static_membership_never_changes() -> None:
    m = Membership("a", ("c", "b", "a"))
    assert m.members() == ("a", "b", "c")
    assert m.active
    assert m.leader() == "a"  # a is live (it is this instance)
    m.observe("b", b"online")
    change = m.observe("a", b"offline")
    assert not change.members_changed
    assert not change.left
    assert m.leader() == "a"  # static members stay active until they stop
    m.observe("zz", b"online")  # not a member: never the leader
    assert m.members() == ("a", "b", "c")


def test_instance_from_topic() -> None:
    assert instance_from_topic("h/ei/instances/a/status", "h/ei/instances", "status") == "a"
    assert instance_from_topic("h/ei/instances/a/bridge/info", "h/ei/instances", "bridge/info") == "a"
    assert instance_from_topic("h/ei/instances/a/b/status", "h/ei/instances", "status") is None
    assert instance_from_topic("h/ei/instances//status", "h/ei/instances", "status") is None
    assert instance_from_topic("other/a/status", "h/ei/instances", "status") is None


class _Decoder:
    filters: ClassVar[list[str]] = ["in/+"]

    def decode(self, topic: str, payload: bytes) -> list[Event]:
        device = topic.rsplit("/", maxsplit=1)[-1]
        return [Decoded(device, {"x": 1.0}), Availability(device + "-2", True)]

    def device_info(self, device: str) -> str:
        return f"info {device}"


def test_owned_decoder_drops_and_counts_other_instances_devices() -> None:
    active = [False]
    owner = OwnedDecoder(_Decoder(), lambda d: d.startswith("mine"), lambda: active[0])
    assert owner.filters == ["in/+"]
    assert owner.device_info("x") == "info x"  # forwarded to the wrapped decoder
    assert owner.decode("in/mine", b"") == []  # not a member yet
    assert owner.inactive == 2
    active[0] = True
    events = owner.decode("in/mine", b"")
    assert [e.device for e in events] == ["mine", "mine-2"]
    assert owner.decode("in/theirs", b"") == []
    assert owner.skipped == 2


# ---------------------------------------------------------------------------- config


def _data(tmp_path: Path, **cluster: Any) -> dict[str, Any]:
    snapshot_classifier(tmp_path / "snap.onnx", ["t", "h"], ["a", "b"])
    window_classifier(tmp_path / "win.onnx", ["p"], 4, ["off", "on"])
    return {
        "mqtt": {"url": "mqtt://127.0.0.1:1", "base_topic": "home/ei"},
        "models": {"snap": {"path": "snap.onnx"}, "win": {"path": "win.onnx"}},
        "pipelines": {
            "room": {"model": "snap", "source": {"topics": ["z2m/{device}"]}},
            "plug": {"model": "win", "source": {"topics": ["tele/{device}"]}, "features": {"type": "window"}},
            "joined": {"model": "snap", "source": {"topics": ["j/{device}/+"]}, "scale_out": "partition"},
        },
        "cluster": cluster,
    }


def test_scale_out_modes(tmp_path: Path) -> None:
    config = parse_config(_data(tmp_path, enabled=True, instance="a"), "t", tmp_path)
    assert config.scale_out("room") == "shared"
    assert config.scale_out("plug") == "partition"
    assert config.scale_out("joined") == "partition"
    single = parse_config(_data(tmp_path), "t", tmp_path)
    assert single.scale_out("room") == "none"


def test_instance_override_and_client_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_config(_data(tmp_path, enabled=True), tmp_path / "c.yaml")
    monkeypatch.setenv("EDGE_INFER_INSTANCE", "from-env")
    assert load_config(path).cluster.instance == "from-env"
    config = load_config(path, instance="cli")
    assert config.cluster.resolved_instance() == "cli"
    assert config.instance_mqtt().resolved_client_id().endswith("-cli")
    data = _data(tmp_path, enabled=True, instance="b")
    data["mqtt"]["client_id"] = "ei-{instance}"
    assert parse_config(data, "t", tmp_path).instance_mqtt().client_id == "ei-b"
    # Outside a cluster nothing changes: the per-config default (docs/operations.md), no instance.
    single = parse_config(_data(tmp_path), "t", tmp_path)
    assert single.instance_mqtt().client_id == single.mqtt.client_id
    assert (single.mqtt.client_id or "").startswith("edge-infer-")
    assert not (single.mqtt.client_id or "").endswith("{instance}")


@pytest.mark.parametrize(
    ("cluster", "key"),
    [
        ({"enabled": True, "instance": "a/b"}, "cluster.instance"),
        ({"enabled": True, "instance": "a", "members": ["b", "c"]}, "cluster.members"),
        ({"enabled": True, "instance": "a", "members": ["a", "a"]}, "cluster.members"),
        ({"enabled": True, "instance": "default"}, "cluster.instance"),
        ({"enabled": True, "shared_group": "a/b"}, "cluster.shared_group"),
        ({"enabled": True, "size": 3}, "cluster.size"),
    ],
)
def test_bad_cluster_config_names_the_key(tmp_path: Path, cluster: dict[str, Any], key: str) -> None:
    data = _data(tmp_path, **cluster)
    data["homeassistant"] = {"instance_id": "default"}  # an instance may not take its name
    with pytest.raises(ConfigError) as info:
        parse_config(data, "t", tmp_path)
    assert info.value.key == key


def _daemon(config: Config) -> Daemon:
    async def make() -> Daemon:
        return Daemon(config)  # the MQTT client wants a running loop

    return asyncio.run(make())


def test_cluster_subscriptions_and_topics(tmp_path: Path) -> None:
    config = parse_config(_data(tmp_path, enabled=True, instance="a"), "t", tmp_path)
    daemon = _daemon(config)
    subs = dict(daemon.subscriptions())
    assert subs["$share/edge-infer/z2m/+"] == 1  # stateless: the broker splits the messages
    assert subs["tele/+"] == 1  # partition: every instance sees every message
    assert subs["j/+/+"] == 1
    assert subs["home/ei/instances/+/status"] == 1
    assert daemon.status_topic == "home/ei/instances/a/status"
    assert daemon.info_topic == "home/ei/instances/a/bridge/info"
    assert isinstance(daemon.pipelines["plug"].decoder, OwnedDecoder)
    assert not isinstance(daemon.pipelines["room"].decoder, OwnedDecoder)
    assert daemon.cluster is not None
    daemon.cluster.leaving = True
    assert not any(t.startswith("$share/") for t, _ in daemon.subscriptions())
    daemon.cluster.left = True
    assert "tele/+" not in dict(daemon.subscriptions())
    for model in daemon.models.values():
        model.close()


def test_single_instance_is_unchanged(tmp_path: Path) -> None:
    daemon = _daemon(parse_config(_data(tmp_path), "t", tmp_path))
    subs = dict(daemon.subscriptions())
    assert "z2m/+" in subs
    assert "tele/+" in subs
    assert not any("instances" in t for t in subs)
    assert daemon.status_topic == "home/ei/status"
    assert daemon.is_leader()
    assert "instance" not in daemon.bridge_info()
    for model in daemon.models.values():
        model.close()
