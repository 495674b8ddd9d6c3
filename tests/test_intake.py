"""Back-pressure (edge/intake.py): the bounds on plain values, and a daemon whose intake resumes
on the batch that made room, not on a timer."""

from __future__ import annotations

import json
import threading
import urllib.parse
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from edge.intake import ANSWERS_QUEUED_HIGH, HOLD_MAX, Intake
from tests.broker import Mosquitto
from tests.harness import Collector, DaemonThread, fast_mqtt, make_config
from tests.onnx_models import slow_classifier


def test_bounds_follow_the_settings() -> None:
    intake = Intake(max_queued_inputs=1000, publish_queue=10_000)
    assert intake.inputs_low == 500
    assert intake.answers_high == ANSWERS_QUEUED_HIGH
    assert intake.answers_low == ANSWERS_QUEUED_HIGH // 2
    assert not intake.inputs_full(999) and intake.inputs_full(1000)
    assert not intake.outgoing_full(ANSWERS_QUEUED_HIGH - 1) and intake.outgoing_full(ANSWERS_QUEUED_HIGH)
    assert intake.hold_full(HOLD_MAX) and not intake.hold_full(HOLD_MAX - 1)
    assert intake.may_read_again(HOLD_MAX // 2 - 1) and not intake.may_read_again(HOLD_MAX // 2)
    small = Intake(max_queued_inputs=10, publish_queue=100)  # a small publish queue bounds answers
    assert (small.answers_high, small.answers_low) == (50, 25)


def test_pause_and_resume_with_hysteresis() -> None:
    intake = Intake(max_queued_inputs=100, publish_queue=10_000)
    assert not intake.may_resume([0], 0, "batch")  # not paused: nothing to resume
    assert intake.pause() and not intake.pause()  # a second pause is the same pause
    assert intake.pauses == 1
    assert not intake.may_resume([51], 0, "batch")  # one queue above half
    assert not intake.may_resume([10, 51], 0, "batch")  # every queue counts
    assert not intake.may_resume([50], intake.answers_low + 1, "answers")  # answers not drained
    assert intake.may_resume([50, 3], intake.answers_low, "batch")
    assert not intake.paused
    assert intake.resumes == {"batch": 1}
    intake.pause()
    assert intake.may_resume([], 0, "answers")
    assert intake.resumes == {"batch": 1, "answers": 1} and intake.pauses == 2
    intake.pause()
    intake.reset()  # a new connection reads from the start
    assert not intake.paused and not intake.may_resume([], 0, "watchdog")


def _flood(url: str, prefix: str, n: int) -> None:
    parts = urllib.parse.urlsplit(url)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    client.max_inflight_messages_set(0)
    client.connect(parts.hostname or "127.0.0.1", parts.port or 1883)
    client.loop_start()
    infos = [
        client.publish(f"{prefix}/in/n{i}", json.dumps({"temperature": i % 40, "humidity": 50}), qos=1)
        for i in range(n)
    ]
    for info in infos:
        info.wait_for_publish(60)
    client.loop_stop()
    client.disconnect()


def test_intake_resumes_on_the_batch_that_made_room(
    mosquitto: Mosquitto, topic_prefix: str, tmp_path: Path
) -> None:
    """A flood of QoS 1 inputs for a model slower than the flood, with a small
    limits.max_queued_inputs. Every pause follows from a full queue, every resume comes from
    the progress that made room (a batch taken off the queue, or answers handed to the socket),
    in the same callback, never from a timer: with keepalive 60 s the only timer left while
    paused (keepalive / 3) never fires within the test, and no resume is counted under it. And
    no batch that left room while paused goes by without a resume."""
    p = topic_prefix
    limit = 40
    slow_classifier(
        tmp_path / "m.onnx", ["temperature", "humidity"], ["a", "b"], name="m", width=256, depth=4
    )
    data: dict[str, Any] = {
        "mqtt": fast_mqtt(mosquitto.url, p, keepalive=60),
        "models": {"m": {"path": "m.onnx", "max_batch": 8}},
        "pipelines": {
            "room": {
                "model": "m",
                "source": {"topics": [f"{p}/in/{{device}}"], "qos": 1},
                "output": {"qos": 1},
                "max_devices": 1_000_000,
            }
        },
        "homeassistant": {"enabled": False},
        "limits": {"max_queued_inputs": limit},
    }
    n = 1500
    out = Collector(mosquitto.url, f"{p}/ei/room/+")
    events: list[tuple[str, bool, int, int]] = []  # (what, paused, longest model queue, answers queued)
    with DaemonThread(make_config(data, tmp_path)) as t:
        d = t.daemon
        assert d is not None
        intake = d.intake

        def snapshot(what: str) -> None:
            longest = max((len(b.queue) for b in d.batchers.values()), default=0)
            events.append((what, intake.paused, longest, len(d.link.queue)))

        def instrument() -> None:
            for batcher in d.batchers.values():
                taken = batcher.taken
                assert taken is not None

                def on_taken(taken: Any = taken) -> None:
                    snapshot("batch")
                    taken()

                batcher.taken = on_taken
            on_room, pause, resume = d.link.on_room, d.link.pause_intake, d.link.resume_intake
            assert on_room is not None

            def on_answers(reason: str) -> None:
                snapshot("answers")
                on_room(reason)

            def on_pause() -> None:
                snapshot("pause")
                pause()

            def on_resume() -> None:
                snapshot("resume")
                resume()

            d.link.on_room = on_answers
            d.link.pause_intake = on_pause  # type: ignore[method-assign]
            d.link.resume_intake = on_resume  # type: ignore[method-assign]

        t.call(instrument)
        flood = threading.Thread(target=_flood, args=(mosquitto.url, p, n))
        flood.start()
        out.wait(lambda msgs: len({m.topic for m in msgs}) >= n, timeout=240)
        flood.join()
        counts = t.call(lambda: (intake.pauses, dict(intake.resumes), intake.paused))
    out.close()
    pauses, resumes, still_paused = counts
    assert pauses >= 3, f"the flood should pause the intake repeatedly, paused {pauses} times"
    assert resumes.get("watchdog", 0) == 0, resumes
    assert sum(resumes.values()) == pauses - still_paused, (pauses, resumes)
    resumed_at = [i for i, e in enumerate(events) if e[0] == "resume"]
    assert len(resumed_at) == sum(resumes.values())
    for i in resumed_at:  # each resume happened inside the callback of the progress that made room
        what, paused, longest, answers = events[i - 1]
        assert what in ("batch", "answers"), events[i - 3 : i + 1]
        assert paused and longest <= limit // 2 and intake.outgoing_drained(answers), events[i - 1]
    for i, (what, paused, longest, answers) in enumerate(events):
        if what == "pause":  # pauses follow from the queue
            assert longest >= limit or intake.outgoing_full(answers), events[i]
        if (
            what in ("batch", "answers")
            and paused
            and longest <= limit // 2
            and intake.outgoing_drained(answers)
        ):
            assert events[i + 1][0] == "resume", events[i : i + 2]  # room made: resumed at once
    batches = sum(1 for e in events if e[0] == "batch")
    assert batches >= n // 8, batches  # the queue, not a period, paced the pauses
