"""The engine (edge/engine.py) with plain values: no broker, no event loop, no batcher task.

Messages go in as ``(topic, payload, ack, received, wall)``; what it publishes, acknowledges and
hands to batching is recorded in one list in order, and batches are inferred here with the
model's own session (``run_sync``) and handed back through :meth:`Engine.finish`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge.config import Config
from edge.daemon import build_pipelines, load_models
from edge.engine import Engine
from edge.pipeline import WorkItem
from edge.runtime import LoadedModel
from tests.harness import make_config
from tests.test_daemon import base_config

P = "t"  # topic prefix
ROOM = f"{P}/z2m/kitchen"


@dataclass
class World:
    """An engine and everything it sent out, in order."""

    engine: Engine
    models: dict[str, LoadedModel]
    events: list[tuple[Any, ...]] = field(default_factory=list)
    queued: list[WorkItem] = field(default_factory=list)
    accept: bool = True  # what submit answers (False: the model's queue is full)

    def send(self, topic: str, body: Any, ack: tuple[int, int, int] | None = None) -> int:
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.engine.on_message(topic, payload, ack, time.perf_counter(), time.time())

    def infer(self, model: str = "snap") -> None:
        """Everything queued for ``model`` inferred as one batch and answered."""
        batch = [i for i in self.queued if i.pipeline.cfg.model == model]
        self.queued = [i for i in self.queued if i.pipeline.cfg.model != model]
        loaded = self.models[model]
        outputs = loaded.run_sync(np.stack([i.vector for i in batch]))
        self.engine.finish(
            model, loaded.spec, batch, outputs, seconds=0.001, done=time.perf_counter(), wall=time.time()
        )

    def published(self, topic: str | None = None) -> list[tuple[str, bytes, int, bool]]:
        return [e[1:] for e in self.events if e[0] == "publish" and (topic is None or e[1] == topic)]

    def acks(self) -> list[tuple[int, int, int]]:
        return [e[1] for e in self.events if e[0] == "ack"]


def make_world(tmp_path: Path, config: Config) -> World:
    models = load_models(config)
    pipelines = build_pipelines(config, models)
    world: World

    def submit(item: WorkItem) -> bool:
        world.events.append(("submit", item.pipeline.name, item.device))
        if world.accept:
            world.queued.append(item)
        return world.accept

    def ack(token: tuple[int, int, int] | None) -> None:
        if token is not None:  # QoS 0: the link's ack(None) does nothing
            world.events.append(("ack", token))

    engine = Engine(
        config,
        pipelines,
        publish=lambda *message: world.events.append(("publish", *message)),
        ack=ack,
        submit=submit,
    )
    world = World(engine, models)
    return world


def config_for(tmp_path: Path, **changes: Any) -> Config:
    data = base_config("mqtt://127.0.0.1:1", P, tmp_path)
    for key, value in changes.items():
        data[key] = value
    return make_config(data, tmp_path)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = make_world(tmp_path, config_for(tmp_path, dead_letter={"enabled": True}))
    yield w
    for model in w.models.values():
        model.close()


READING = {"temperature": 21.0, "humidity": 45.0, "co2": 600.0}


def test_a_topic_feeds_only_the_pipelines_whose_source_it_matches(world: World) -> None:
    engine = world.engine
    assert [p.name for p in engine.route(ROOM)] == ["room"]
    assert [p.name for p in engine.route(f"{P}/tele/p1/SENSOR")] == ["plug"]
    assert engine.route(f"{P}/elsewhere/kitchen") == []
    # the daemon's own and Home Assistant's topics are never sensor data, whatever a wildcard says
    assert engine.route(f"{engine.base}/status") == []
    assert engine.route("homeassistant/status") == []
    assert world.send(ROOM, READING) == 1
    assert world.events == [("submit", "room", "kitchen")]
    world.send(f"{P}/elsewhere/kitchen", READING, ack=(1, 7, 1))
    assert engine.unrouted == 1 and world.acks() == [(1, 7, 1)]  # acknowledged at once
    assert engine.messages_in == 2


def test_a_topic_no_pipeline_reads_goes_to_control_and_is_not_counted_unrouted(tmp_path: Path) -> None:
    w = make_world(tmp_path, config_for(tmp_path))
    seen: list[tuple[str, bytes]] = []
    w.engine.control = lambda topic, payload: seen.append((topic, payload)) is None
    w.send(f"{P}/instances/b/status", b"online", ack=(1, 1, 1))
    assert seen == [(f"{P}/instances/b/status", b"online")]
    assert w.engine.unrouted == 0 and w.acks() == [(1, 1, 1)]


def test_a_malformed_payload_is_counted_with_its_reason_acknowledged_and_dead_lettered(world: World) -> None:
    room = world.engine.pipelines["room"]
    assert world.send(ROOM, b"{not json", ack=(1, 2, 1)) == 0
    assert room.stats.dropped == {"malformed_json": 1}
    assert world.acks() == [(1, 2, 1)]
    assert world.queued == []
    [(topic, payload, qos, retain)] = world.published()
    body = json.loads(payload)
    assert topic == f"{world.engine.base}/dead_letter/room" and (qos, retain) == (0, False)
    assert body["reason"] == "malformed_json" and body["topic"] == ROOM and body["payload"] == "{not json"
    # oversized: counted per pipeline the topic feeds, never decoded
    world.send(ROOM, b"{" + b" " * world.engine.config.limits.max_payload_bytes + b"}", ack=(1, 3, 1))
    assert room.stats.dropped["oversized"] == 1 and world.acks()[-1] == (1, 3, 1)


def test_a_device_flood_is_bounded_by_max_devices_and_counted(tmp_path: Path) -> None:
    data = base_config("mqtt://127.0.0.1:1", P, tmp_path)
    data["pipelines"]["room"]["max_devices"] = 5
    w = make_world(tmp_path, make_config(data, tmp_path))
    try:
        for i in range(200):
            w.send(f"{P}/z2m/dev{i}", READING, ack=(1, i + 1, 1))
        room = w.engine.pipelines["room"]
        assert len(room.store.states) == 5
        assert room.stats.dropped == {"unknown_device": 195}
        assert len(w.queued) == 5
        assert len(w.acks()) == 195  # the dropped ones at once; the 5 wait for their answers
        w.infer()
        assert sorted(w.acks()) == [(1, i + 1, 1) for i in range(200)]
        assert room.stats.published == 5
    finally:
        for model in w.models.values():
            model.close()


def test_an_input_is_acknowledged_only_after_its_answer_is_published(world: World) -> None:
    world.send(ROOM, READING, ack=(1, 9, 1))
    assert world.acks() == []  # queued for the model: not acknowledged yet
    world.infer()
    # the device's first answer marks its output online (retained), then the answer, then the ack
    assert [e[:2] for e in world.events] == [
        ("submit", "room"),
        ("publish", f"{P}/ei/room/kitchen/availability"),
        ("publish", f"{P}/ei/room/kitchen"),
        ("ack", (1, 9, 1)),
    ]
    assert world.events[1][2:] == (b"online", 1, True)
    body = json.loads(world.published(f"{P}/ei/room/kitchen")[0][1])
    assert body["label"] in {"empty", "one", "many"} and body["model"] == "snap"


def test_one_message_for_two_pipelines_is_acknowledged_after_both_answers(tmp_path: Path) -> None:
    data = base_config("mqtt://127.0.0.1:1", P, tmp_path)
    data["pipelines"]["room2"] = {**data["pipelines"]["room"]}
    w = make_world(tmp_path, make_config(data, tmp_path))
    try:
        assert w.send(ROOM, READING, ack=(2, 1, 1)) == 2
        first, second = w.queued
        w.queued = [first]
        w.infer()
        assert w.acks() == [] and len(w.published(f"{P}/ei/room/kitchen")) == 1
        w.queued = [second]
        w.infer()
        assert w.acks() == [(2, 1, 1)] and len(w.published(f"{P}/ei/room2/kitchen")) == 1
    finally:
        for model in w.models.values():
            model.close()


def test_a_full_queue_and_a_failed_inference_are_counted_and_acknowledged(world: World) -> None:
    room = world.engine.pipelines["room"]
    world.accept = False
    world.send(ROOM, READING, ack=(1, 1, 1))
    assert room.stats.dropped["queue_full"] == 1 and world.acks() == [(1, 1, 1)]
    world.accept = True
    world.send(f"{P}/z2m/hall", READING, ack=(1, 2, 1))
    batch, world.queued = world.queued, []
    spec = world.models["snap"].spec
    world.engine.finish("snap", spec, batch, None, RuntimeError("boom"), seconds=0.0, done=0.0, wall=0.0)
    assert room.stats.dropped["inference_failed"] == 1 and world.acks()[-1] == (1, 2, 1)
    assert world.engine.failed_batches == 1 and room.stats.published == 0


def test_on_change_publishes_a_device_s_answer_only_when_it_changes_and_still_acknowledges(
    tmp_path: Path,
) -> None:
    data = base_config("mqtt://127.0.0.1:1", P, tmp_path)
    data["pipelines"]["room"]["output"] = {"publish": "on_change", "top_k": 0}
    w = make_world(tmp_path, make_config(data, tmp_path))
    try:
        for i in range(3):
            w.send(ROOM, READING, ack=(1, i + 1, 1))
            w.infer()
        answers = w.published(f"{P}/ei/room/kitchen")
        assert len(answers) == 1  # the same label three times: published once
        assert set(json.loads(answers[0][1])) >= {"label", "confidence", "model_version", "latency_ms", "ts"}
        assert "top_k" not in json.loads(answers[0][1])  # output.top_k: 0
        assert w.acks() == [(1, 1, 1), (1, 2, 1), (1, 3, 1)]  # withheld answers still acknowledge
        room = w.engine.pipelines["room"]
        assert (room.stats.predicted, room.stats.published) == (3, 1)
    finally:
        for model in w.models.values():
            model.close()


def test_a_reload_swaps_the_pipelines_and_queued_inputs_are_still_answered(tmp_path: Path) -> None:
    w = make_world(tmp_path, config_for(tmp_path))
    try:
        w.send(ROOM, READING, ack=(1, 1, 1))  # queued under the old pipelines
        data = base_config("mqtt://127.0.0.1:1", P, tmp_path)
        data["pipelines"]["room"]["source"] = {"topics": [f"{P}/rooms/{{device}}"]}
        del data["pipelines"]["plug"]
        config = make_config(data, tmp_path)
        old = w.engine.pipelines
        new = build_pipelines(config, w.models, reuse=old)
        assert new["room"] is not old["room"]  # its source changed: a new pipeline
        w.engine.swap(config, new)
        assert list(w.engine.pipelines) == ["room"]
        assert w.engine.route(ROOM) == [] and w.engine.route(f"{P}/rooms/kitchen") == [new["room"]]
        assert w.engine.route(f"{P}/tele/p1/SENSOR") == []  # plug removed
        w.infer()  # the item of the old pipeline: answered on its own topic, acknowledged
        assert len(w.published(f"{P}/ei/room/kitchen")) == 1 and w.acks() == [(1, 1, 1)]
        w.send(f"{P}/rooms/hall", READING)
        assert w.queued[0].pipeline is new["room"]
    finally:
        for model in w.models.values():
            model.close()


def test_inputs_arriving_while_stopping_are_left_unacknowledged(world: World) -> None:
    world.engine.intake_open = False
    assert world.send(ROOM, READING, ack=(1, 1, 1)) == 0
    assert world.events == []  # redelivered by the broker to the next run
    assert world.engine.messages_in == 1


def test_a_guarded_pipeline_withholds_answers_but_acknowledges(world: World) -> None:
    room = world.engine.pipelines["room"]
    world.engine.guarded["room"] = room.spec.sha256
    world.send(ROOM, READING, ack=(1, 1, 1))
    world.infer()
    assert world.published(f"{P}/ei/room/kitchen") == [] and world.acks() == [(1, 1, 1)]
    assert world.engine.guard_counts["room"]["withheld"] == 1
    assert world.engine.available(room, True) == b"offline"


def test_the_engine_loads_no_mqtt_client_nor_the_link() -> None:
    code = "import sys, edge.engine; print([m for m in ('edge.mqtt', 'aiomqtt', 'paho') if m in sys.modules])"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert done.stdout.strip() == "[]"
