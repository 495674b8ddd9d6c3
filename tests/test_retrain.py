"""Retraining from the daemon (edge/retrain.py): the schedule's arithmetic with an injected clock;
and against a real Mosquitto a daemon whose Retrain command runs ``edge-infer learn`` in a child
process (collecting, training, evaluating, promoted), hot-reloads the model it deployed while
every input is answered, queues or refuses presses during a training, refuses bad commands
(counted), reports learn's reason when it keeps the model, and stops learn when it stops."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import yaml

from edge.config import ConfigError, LearnSchedule, load_config
from edge.learn.table import build_table
from edge.logsetup import RateLimitedLogger
from edge.manifest import read_manifest
from edge.mqtt import Outgoing
from edge.retrain import Retrainer, RetrainState, next_run, read_states
from edge.runtime import file_sha256
from tests.broker import Mosquitto
from tests.harness import Collector, DaemonThread, Publisher, fast_mqtt, make_config
from tests.onnx_models import window_classifier
from tests.test_learn_e2e import END, config_data, history

CHANNELS = ["temperature", "humidity", "illuminance", "co2"]
WINDOW = 11
BERLIN = ZoneInfo("Europe/Berlin")


def _ts(text: str, tz: Any = BERLIN) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=tz).timestamp()


# ---------------------------------------------------------------------------- the schedule


def test_next_run_is_every_days_after_the_last_run_at_the_local_time() -> None:
    weekly = LearnSchedule(every_days=7, at="03:30")
    last = _ts("2026-11-02T03:41:00")  # a Monday's retrain finished at 03:41 local
    assert next_run(weekly, last, _ts("2026-11-03T12:00:00"), BERLIN) == _ts("2026-11-09T03:30:00")
    daily = LearnSchedule(every_days=1, at="3:05")
    assert daily.at == "03:05"
    assert next_run(daily, last, _ts("2026-11-02T05:00:00"), BERLIN) == _ts("2026-11-03T03:05:00")


def test_never_run_waits_for_the_next_time_of_day_not_now() -> None:
    sched = LearnSchedule(every_days=7, at="03:30")
    assert next_run(sched, None, _ts("2026-11-03T02:00:00"), BERLIN) == _ts("2026-11-03T03:30:00")
    assert next_run(sched, None, _ts("2026-11-03T03:30:00"), BERLIN) == _ts("2026-11-04T03:30:00")
    assert next_run(sched, None, _ts("2026-11-03T23:00:00"), BERLIN) == _ts("2026-11-04T03:30:00")


def test_overdue_after_a_restart_runs_at_the_next_time_of_day_not_at_once() -> None:
    sched = LearnSchedule(every_days=7, at="03:30")
    last = _ts("2026-10-01T03:40:00")  # due on Oct 8; the daemon was off for weeks
    now = _ts("2026-11-03T09:00:00")
    assert next_run(sched, last, now, BERLIN) == _ts("2026-11-04T03:30:00")
    assert next_run(sched, last, now, BERLIN) > now


def test_the_time_of_day_is_local_across_a_daylight_saving_change() -> None:
    sched = LearnSchedule(every_days=7, at="03:30")
    last = _ts("2026-10-20T03:31:00")  # CEST (UTC+2); a week later it is CET (UTC+1)
    due = next_run(sched, last, last + 60, BERLIN)
    assert datetime.fromtimestamp(due, BERLIN).strftime("%Y-%m-%d %H:%M") == "2026-10-27 03:30"
    assert datetime.fromtimestamp(due, UTC).strftime("%H:%M") == "02:30"  # not 01:30: the zone moved
    assert due - last == 7 * 86400 + 3600 - 60


@pytest.mark.parametrize(
    ("schedule", "key", "text"),
    [
        ({"at": "25:00"}, "pipelines.rooms.learn.schedule.at", "HH:MM"),
        ({"at": "0330"}, "pipelines.rooms.learn.schedule.at", "HH:MM"),
        ({"every_days": 0}, "pipelines.rooms.learn.schedule.every_days", "greater than or equal to 1"),
        ({"every": 7}, "pipelines.rooms.learn.schedule.every", "unknown key"),
    ],
)
def test_a_bad_schedule_is_a_config_error_naming_the_key(
    tmp_path: Path, schedule: dict[str, Any], key: str, text: str
) -> None:
    data = config_data(tmp_path, {"schedule": schedule})
    with pytest.raises(ConfigError) as caught:
        make_config(data, tmp_path)
    assert caught.value.key == key, caught.value
    assert text in str(caught.value)


def test_the_persisted_state_survives_a_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "retrain.json"
    path.write_text("{not json")
    assert read_states(path) == {}
    path.write_text(
        json.dumps({"format": "edge-infer-retrain", "pipelines": {"a": {"finished": 5, "runs": {}}}})
    )
    states = read_states(path)
    assert states["a"].finished == 5.0 and states["a"].phase == "idle"
    state = RetrainState(phase="kept", reason="x" * 1000)
    assert len(state.text()) <= 255 and state.text().startswith("kept: xxx")


# ---------------------------------------------------------------------------- against Mosquitto


def _setup(tmp_path: Path, p: str, url: str, **rooms_learn: Any) -> tuple[Path, dict[str, Any]]:
    """A poor deployed window model, a record file of three simulated days, and three pipelines:
    ``rooms`` (learnable, a tiny training), ``small`` (learnable, asks for more data than there
    is) and ``plain`` (no learn section)."""
    window_classifier(tmp_path / "occupancy.onnx", CHANNELS, WINDOW, ["empty", "occupied"], seed=3)
    learn = {
        "source": {"record": "rows.csv"},
        "train": {"epochs": 4, "quantize": False},
        **rooms_learn,
    }
    data = config_data(tmp_path, learn, fast_mqtt(url, p))
    rooms = data["pipelines"]["rooms"]
    del rooms["learn"]["labels"]
    rooms["source"]["topics"] = [f"{p}/home/{{device}}/climate"]
    rooms["output"] = {"qos": 1}
    teacher = make_config(config_data(tmp_path, {}), tmp_path)  # what `edge-infer record` would write
    table = build_table("rooms", teacher, history(3.0), END - 3 * 86400, END)
    table.write_csv(tmp_path / "rows.csv")
    small = json.loads(json.dumps(rooms))
    small["source"]["topics"] = [f"{p}/small/{{device}}/climate"]
    small["learn"]["min_examples_per_class"] = 100_000
    plain = {k: v for k, v in small.items() if k != "learn"}
    plain["source"] = {"profile": "json", "topics": [f"{p}/plain/{{device}}"], "timestamp_field": "ts"}
    data["pipelines"].update({"small": small, "plain": plain})
    data["state"] = {"file": str(tmp_path / "state" / "state.json")}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path, data


def _states(out: Collector, topic: str) -> list[dict[str, Any]]:
    return [m.json() for m in out.on(topic) if m.payload]


def _wait_phase(out: Collector, topic: str, phases: tuple[str, ...], timeout: float = 300) -> dict[str, Any]:
    out.wait(lambda _m: any(s["phase"] in phases for s in _states(out, topic)), timeout=timeout)
    return next(s for s in _states(out, topic) if s["phase"] in phases)


class Feeder(threading.Thread):
    """Publishes one office climate reading after another (QoS 1), a simulated minute apart."""

    def __init__(self, pub: Publisher, topic: str) -> None:
        super().__init__(daemon=True)
        self.pub, self.topic = pub, topic
        self.sent = 0
        self.stop = threading.Event()
        self.base = time.time() - 60 * 20_000

    def run(self) -> None:
        while not self.stop.is_set() and self.sent < 20_000:
            payload = {"ts": self.base + 60 * self.sent, "temperature": 21.5 + (self.sent % 7) * 0.1}
            payload |= {"humidity": 45, "illuminance": 300, "co2": 600 + (self.sent % 13) * 20}
            self.pub.send(self.topic, payload)
            self.sent += 1
            time.sleep(0.02)


@pytest.mark.broker
@pytest.mark.timeout(600)
def test_retrain_press_trains_promotes_and_the_daemon_reloads_while_answering_everything(
    mosquitto: Mosquitto, topic_prefix: str, tmp_path: Path
) -> None:
    p = topic_prefix
    path, data = _setup(tmp_path, p, mosquitto.url)
    before = file_sha256(tmp_path / "occupancy.onnx")
    out = Collector(mosquitto.url, f"{p}/ei/#")
    pub = Publisher(mosquitto.url)
    rooms_topic, small_topic = f"{p}/ei/rooms/retrain/state", f"{p}/ei/small/retrain/state"
    with DaemonThread(make_config(data, tmp_path), config_path=path) as runner:
        daemon = runner.daemon
        assert daemon is not None
        idle = _wait_phase(out, rooms_topic, ("idle",), timeout=20)  # published at start
        assert idle["last_trained"] is None and idle["runs"] == {"promoted": 0, "kept": 0, "failed": 0}
        feeder = Feeder(Publisher(mosquitto.url), f"{p}/home/office/climate")
        feeder.start()
        pub.send(f"{p}/ei/rooms/retrain/press", "PRESS")
        _wait_phase(out, rooms_topic, ("collecting",), timeout=30)
        # while rooms trains: rooms again is refused (busy), small is queued once, then refused
        pub.send(f"{p}/ei/rooms/retrain/press", "PRESS")
        pub.send(f"{p}/ei/small/retrain/press", "PRESS")
        pub.send(f"{p}/ei/small/retrain/press", "PRESS")
        queued = _wait_phase(out, small_topic, ("queued",), timeout=30)
        assert queued["queued"] is True
        done = _wait_phase(out, rooms_topic, ("promoted", "kept", "failed"), timeout=400)
        assert done["phase"] == "promoted", done
        phases = [s["phase"] for s in _states(out, rooms_topic)]
        seen = [ph for i, ph in enumerate(phases) if i == 0 or phases[i - 1] != ph]
        assert seen[-4:] == ["collecting", "training", "evaluating", "promoted"], seen
        progress = [s["progress"] for s in _states(out, rooms_topic) if s["phase"] == "training"]
        assert progress[-1] == 100 and 0 in progress, progress
        gate = done["gate"]
        assert gate["metric"] == "macro_f1" and gate["new"] > gate["baseline"] + 0.02, gate
        assert done["last_trained"] is not None and done["duration_s"] > 0 and done["trigger"] == "button"
        assert done["refused"] == 1  # the press while it trained

        # the deployed file was replaced and the running daemon hot-reloaded it
        manifest = read_manifest(tmp_path / "occupancy.onnx")
        assert manifest is not None and "+learn." in manifest.version
        assert file_sha256(tmp_path / "occupancy.onnx") != before

        def reloaded(msgs: list[Any]) -> bool:
            infos = [m.json() for m in msgs if m.topic == f"{p}/ei/bridge/info"]
            return any(i["models"]["occupancy"]["version"] == manifest.version for i in infos)

        out.wait(reloaded, timeout=30)

        # small ran next and kept the deployed model with learn's reason
        small = _wait_phase(out, small_topic, ("kept", "failed"), timeout=120)
        assert small["phase"] == "kept", small
        assert small["status"].startswith("kept: not enough data to learn small: "), small
        assert small["refused"] == 1 and small["gate"] is None
        answers = f"{p}/ei/rooms/office"
        out.wait(
            lambda msgs: any(
                m.topic == answers and m.json()["model_version"] == manifest.version for m in msgs
            ),
            timeout=30,
        )  # answered by the learned model
        feeder.stop.set()
        feeder.join(10)
        sent = feeder.sent
        # the answers topic exactly: wait_count's prefix would also count <answers>/availability
        # and <answers>/inputs and could return before the last answer (1 short, seen under load)
        out.wait(lambda msgs: sum(1 for m in msgs if m.topic == answers) >= sent - (WINDOW - 1), timeout=30)
        info = runner.call(daemon.bridge_info)
        assert info["pipelines"]["rooms"]["received"] == sent
        assert sum(info["pipelines"]["rooms"].get("dropped", {}).values()) == 0, info["pipelines"]["rooms"]
        got = [m for m in out.messages if m.topic == answers]
        assert len(got) == sent - (WINDOW - 1)  # every input answered (the first window filling)
        assert {m.json()["model_version"] for m in got} >= {"2.0.0", manifest.version}
        retrain = info["retrain"]
        assert retrain["refused"] == {"busy": 1, "already_queued": 1}, retrain
        assert retrain["running"] is None and retrain["queue"] == []
        metrics = runner.call(daemon.render_metrics)
        assert 'edge_infer_retrain_runs_total{outcome="promoted",pipeline="rooms"} 1.0' in metrics
        assert 'edge_infer_retrain_refused_total{reason="busy"} 1.0' in metrics
        finished = runner.call(lambda: daemon.retrainer.states["rooms"].finished)
        feeder.pub.close()
    # a restart restores "last trained" from the state directory
    with DaemonThread(make_config(data, tmp_path), config_path=path) as runner:
        daemon = runner.daemon
        assert daemon is not None
        deadline = time.monotonic() + 10
        while runner.call(lambda: daemon.retrainer.states.get("rooms")) is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        restored = runner.call(lambda: daemon.retrainer.states["rooms"])
        assert restored.finished == finished and restored.phase == "promoted"
        assert restored.runs["promoted"] == 1
    pub.close()
    out.close()


@pytest.mark.broker
def test_bad_retrain_commands_are_refused_and_counted(
    mosquitto: Mosquitto, topic_prefix: str, tmp_path: Path
) -> None:
    p = topic_prefix
    path, data = _setup(tmp_path, p, mosquitto.url)
    pub = Publisher(mosquitto.url)
    with DaemonThread(make_config(data, tmp_path), config_path=path) as runner:
        daemon = runner.daemon
        assert daemon is not None
        pub.send(f"{p}/ei/rooms/retrain/press", "NOPE")
        pub.send(f"{p}/ei/ghost/retrain/press", "PRESS")
        pub.send(f"{p}/ei/plain/retrain/press", "PRESS")
        pub.send(f"{p}/ei/rooms/retrain/press", "x" * 1000)

        def counts() -> tuple[dict[str, int], dict[str, int]]:
            info = runner.call(daemon.bridge_info)
            return info["corrections"]["refused"], info["retrain"]["refused"]

        deadline = time.monotonic() + 15
        while counts() != ({"bad_payload": 1, "unknown_pipeline": 1, "too_large": 1}, {"not_learnable": 1}):
            assert time.monotonic() < deadline, counts()
            time.sleep(0.05)
        assert runner.call(lambda: daemon.retrainer.running) is None
        assert runner.call(lambda: daemon.retrainer.states["rooms"].phase) == "idle"
        assert "plain" not in runner.call(lambda: daemon.retrainer.info()["pipelines"])
    pub.close()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    if int(handle.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return found


@pytest.mark.broker
@pytest.mark.timeout(300)
def test_stopping_the_daemon_during_a_training_stops_learn_and_its_training_process(
    mosquitto: Mosquitto, topic_prefix: str, tmp_path: Path
) -> None:
    p = topic_prefix
    path, data = _setup(tmp_path, p, mosquitto.url, train={"epochs": 400, "quantize": False})
    out = Collector(mosquitto.url, f"{p}/ei/rooms/retrain/state")
    pub = Publisher(mosquitto.url)
    runner = DaemonThread(make_config(data, tmp_path), config_path=path).start()
    daemon = runner.daemon
    assert daemon is not None
    pub.send(f"{p}/ei/rooms/retrain/press", "PRESS")
    _wait_phase(out, f"{p}/ei/rooms/retrain/state", ("training",), timeout=120)
    learn_pid = runner.call(lambda: daemon.retrainer.pid)
    assert learn_pid is not None and _alive(learn_pid)
    deadline = time.monotonic() + 60
    while not (training := _children(learn_pid)):  # the training process (python -m exporters train)
        assert time.monotonic() < deadline, "no training process"
        time.sleep(0.1)
    with open(f"/proc/{training[0]}/cmdline", "rb") as handle:
        assert b"exporters" in handle.read()
    runner.stop(timeout=30)
    assert not _alive(learn_pid)
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in training):  # reaped by learn, or by init once learn is gone
        assert time.monotonic() < deadline, "the training process outlived the daemon"
        time.sleep(0.1)
    assert not (tmp_path / "state" / "retrain.json").exists()  # an interrupted run is not a run
    pub.close()
    out.close()


@pytest.mark.timeout(300)
def test_a_scheduled_retrain_runs_at_its_time_and_a_restart_does_not_run_it_again(tmp_path: Path) -> None:
    """The Retrainer alone (its publish is a list): the clock is set 1.5 s before the schedule's
    time of day; the ``small`` pipeline's learn runs then (and keeps the model: too little data);
    a new Retrainer reading the state file plans the next run a day later, not now."""
    path, data = _setup(tmp_path, "t", "mqtt://127.0.0.1:1")  # never connected to
    now = time.time()
    local = datetime.fromtimestamp(now).replace(second=0, microsecond=0)
    at = local.timestamp() + 60  # the next minute, local time
    data["pipelines"]["small"]["learn"]["schedule"] = {
        "every_days": 1,
        "at": datetime.fromtimestamp(at).strftime("%H:%M"),
    }
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    config = load_config(path)
    offset = (at - 1.5) - now
    sent: list[Outgoing] = []

    def clock() -> float:
        return time.time() + offset

    ratelog = RateLimitedLogger(logging.getLogger("test.retrain"), 60)

    async def scheduled() -> Retrainer:
        retrainer = Retrainer(lambda: config, path, sent.append, ratelog, clock=clock)
        task = asyncio.create_task(retrainer.run())
        while retrainer.states.get("small") is None or not sum(retrainer.states["small"].runs.values()):  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return retrainer

    retrainer = asyncio.run(asyncio.wait_for(scheduled(), 240))
    small = retrainer.states["small"]
    assert small.trigger == "schedule" and small.phase == "kept", small
    assert small.reason is not None and small.reason.startswith("not enough data to learn small")
    assert retrainer.states["rooms"].runs == {"promoted": 0, "kept": 0, "failed": 0}  # no schedule
    bodies = [json.loads(o.payload) for o in sent if o.topic == "t/ei/small/retrain/state"]
    assert bodies[-1]["trigger"] == "schedule" and bodies[-1]["next_run"] is not None
    assert all(o.retain for o in sent)

    async def restarted() -> Retrainer:
        again = Retrainer(lambda: config, path, sent.append, ratelog, clock=clock)
        task = asyncio.create_task(again.run())
        await asyncio.sleep(1.0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return again

    again = asyncio.run(restarted())
    assert again.states["small"].finished == small.finished
    assert again.states["small"].runs["kept"] == 1  # it did not run again
    assert again.running is None and not again.queue
    next_due = again.states["small"].next_run
    assert next_due is not None and next_due > clock() + 3600


def test_the_bridge_announces_the_button_and_both_sensors_of_a_learnable_pipeline() -> None:
    from edge.discovery_payloads import BridgeInfo, RetrainEntity, bridge_config

    bridge = BridgeInfo(version="1", base_topic="ei", instance_id="home")
    cmps = bridge_config(bridge, ["m"], retrain=[RetrainEntity("washer", "ei")])["cmps"]
    button, state, last = cmps["retrain_washer"], cmps["retrain_washer_state"], cmps["retrain_washer_last"]
    assert button["platform"] == "button" and button["command_topic"] == "ei/washer/retrain/press"
    assert button["payload_press"] == "PRESS" and button["name"] == "Retrain now washer"
    assert state["state_topic"] == state["json_attributes_topic"] == "ei/washer/retrain/state"
    assert state["name"] == "Washer training" and state["value_template"] == "{{ value_json.status }}"
    assert last["device_class"] == "timestamp" and last["name"] == "Washer last trained"
    assert len({c["unique_id"] for c in cmps.values()}) == len(cmps)
    without = bridge_config(bridge, ["m"], retrain=[RetrainEntity("washer", "ei", button=False)])["cmps"]
    assert "retrain_washer" not in without and "retrain_washer_state" in without
    assert not any(k.startswith("retrain_") for k in bridge_config(bridge, ["m"])["cmps"])
