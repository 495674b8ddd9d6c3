"""The last-seen times of ``homeassistant.forget_after_days`` survive a restart through the state
file: a device that last answered long before the restart is removed soon after it, one that
answered recently is kept; old state files without the field, bad entries, removed pipelines."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from edge import statefile
from edge.config import Config, parse_config
from edge.daemon import build_pipelines, load_models
from edge.discovery import Discovery
from edge.mqtt import Outgoing
from edge.pipeline import Pipeline
from tests.broker import Mosquitto
from tests.harness import Collector, DaemonThread, Publisher, make_config
from tests.onnx_models import snapshot_classifier

DAY = 86400.0
T0 = 1_700_000_000.0  # a wall time


def _data(tmp_path: Path, **homeassistant: Any) -> dict[str, Any]:
    snapshot_classifier(tmp_path / "s.onnx", ["temperature", "co2"], ["empty", "occupied"], name="s")
    return {
        "mqtt": {"url": "mqtt://127.0.0.1:1"},
        "models": {"s": {"path": "s.onnx"}},
        "pipelines": {
            "room": {"model": "s", "source": {"topics": ["rooms/{device}"]}, "max_devices": 3},
            "hall": {"model": "s", "source": {"topics": ["halls/{device}"]}},
        },
        "homeassistant": {"forget_after_days": 7, **homeassistant},
    }


class Rig:
    """A Discovery over real pipelines with its own clock and a list of what it published."""

    def __init__(self, tmp_path: Path, now: float, data: dict[str, Any] | None = None) -> None:
        self.config: Config = parse_config(data or _data(tmp_path), "t.yaml", tmp_path)
        self.pipelines: dict[str, Pipeline] = build_pipelines(self.config, load_models(self.config))
        self.now = now
        self.sent: list[Outgoing] = []
        self.discovery = Discovery(
            self.config, self.sent.append, lambda: list(self.pipelines.values()), clock=lambda: self.now
        )

    def answer(self, pipeline: str, device: str) -> None:
        """A published prediction, as the daemon records it (a new payload object each time)."""
        self.pipelines[pipeline].last_published[device] = json.dumps({"t": self.now}).encode()

    def save(self, path: Path) -> None:
        statefile.save(path, self.pipelines, self.discovery.last_seen())

    def restore(self, path: Path) -> statefile.RestoreReport:
        report = statefile.restore(path, self.pipelines)
        for name, pipeline in self.pipelines.items():  # as the daemon does
            self.discovery.remember(name, pipeline.store.states)
        self.discovery.restore_seen(report.last_seen)
        return report

    def cleared(self, pipeline: str, device: str) -> bool:
        topic = self.pipelines[pipeline].output_topic(device)
        return any(m.topic == topic and m.payload == b"" and m.retain for m in self.sent)

    def announced(self, device: str) -> bool:
        return any(m.payload and f'"name":"{device}"' in m.payload.decode() for m in self.sent)


def test_the_forget_clock_runs_across_a_restart(tmp_path: Path) -> None:
    """Answered at T0, restarted on day 6.5: on day 7.5 the device is removed (it would be kept
    until day 13.5 if the restart restarted its clock); the one that answered on day 6 stays."""
    path = tmp_path / "state.json"
    before = Rig(tmp_path, T0)
    before.answer("room", "attic")
    before.discovery.replan()
    before.now = T0 + 6 * DAY
    before.answer("room", "kitchen")
    before.save(path)
    assert json.loads(path.read_text())["last_seen"] == {"room": {"attic": T0, "kitchen": T0 + 6 * DAY}}

    after = Rig(tmp_path, T0 + 6.5 * DAY)
    report = after.restore(path)
    assert report.last_seen == {"room": {"attic": T0, "kitchen": T0 + 6 * DAY}}
    after.discovery.replan()
    assert after.discovery.forgotten == 0
    assert after.announced("attic") and after.announced("kitchen")  # restored: announced at once
    after.now = T0 + 7.5 * DAY
    after.discovery.replan()
    assert after.discovery.forgotten == 1 and after.cleared("room", "attic")
    assert not after.cleared("room", "kitchen")
    assert after.discovery.last_seen() == {"room": {"kitchen": T0 + 6 * DAY}}  # attic's entry gone


def test_a_device_unseen_for_longer_than_forget_after_is_removed_at_the_first_plan(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    before = Rig(tmp_path, T0)
    before.answer("room", "attic")
    before.answer("hall", "porch")
    before.save(path)
    after = Rig(tmp_path, T0 + 8 * DAY)  # down for 8 days
    after.restore(path)
    after.discovery.replan()
    assert after.discovery.forgotten == 2
    assert after.cleared("room", "attic") and after.cleared("hall", "porch")
    assert after.discovery.last_seen() == {}


def test_a_state_file_without_last_seen_counts_from_the_restart(tmp_path: Path) -> None:
    """A file an older edge-infer wrote (no ``last_seen``): windows restore as before, and a device
    known from them counts from the restart, as it did."""
    path = tmp_path / "state.json"
    before = Rig(tmp_path, T0)
    before.pipelines["room"].store.update("attic", {"temperature": 21.0}, T0)  # half a join
    before.answer("room", "attic")
    before.save(path)
    document = json.loads(path.read_text())
    del document["last_seen"]
    path.write_text(json.dumps(document))

    after = Rig(tmp_path, T0 + 30 * DAY)
    report = after.restore(path)
    assert (report.problem, report.devices, report.last_seen, report.skipped) == (None, 1, {}, {})
    after.discovery.replan()
    assert after.discovery.forgotten == 0 and after.announced("attic")
    after.now += 6.9 * DAY
    after.discovery.replan()
    assert after.discovery.forgotten == 0
    after.now += 0.2 * DAY
    after.discovery.replan()
    assert after.discovery.forgotten == 1 and after.cleared("room", "attic")


def test_bad_last_seen_entries_are_dropped_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "state.json"
    Rig(tmp_path, T0).save(path)
    document = json.loads(path.read_text())
    document["last_seen"] = {
        "room": {"ok": T0, "text": "yesterday", "flag": True, "negative": -5, "none": None, "": T0},
        "gone": {"x": T0, "y": T0},  # a pipeline no longer configured
        "hall": ["not", "a", "mapping"],
    }
    path.write_text(json.dumps(document))
    after = Rig(tmp_path, T0)
    report = after.restore(path)
    assert report.problem is None
    assert report.last_seen == {"room": {"ok": T0}}
    assert report.last_seen_dropped == 5 + 2 + 1
    document["last_seen"] = "nope"
    path.write_text(json.dumps(document))
    with caplog.at_level("WARNING", logger="edge.state"):
        report = Rig(tmp_path, T0).restore(path)
    assert report.last_seen == {} and "last_seen" in report.skipped
    assert any("last_seen" in r.getMessage() for r in caplog.records)


def test_last_seen_is_bounded_per_pipeline_and_future_times_count_as_now(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    Rig(tmp_path, T0).save(path)
    document = json.loads(path.read_text())
    document["last_seen"] = {"room": {f"d{i}": T0 - i for i in range(5)}, "hall": {"late": T0 + 9 * DAY}}
    path.write_text(json.dumps(document))
    after = Rig(tmp_path, T0)
    report = after.restore(path)
    assert report.last_seen["room"] == {"d0": T0, "d1": T0 - 1, "d2": T0 - 2}  # max_devices 3: newest
    assert report.last_seen_dropped == 2
    assert after.discovery.last_seen()["hall"] == {"late": T0}  # the clock was set back


def test_a_removed_pipeline_leaves_no_last_seen_entries(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    rig = Rig(tmp_path, T0)
    rig.answer("room", "attic")
    rig.answer("hall", "porch")
    rig.discovery.replan()
    assert set(rig.discovery.last_seen()) == {"room", "hall"}
    del rig.pipelines["hall"]  # a reload without it
    rig.discovery.replan()
    assert rig.discovery.last_seen() == {"room": {"attic": T0}}
    rig.save(path)
    assert json.loads(path.read_text())["last_seen"] == {"room": {"attic": T0}}
    # and a snapshot never writes a pipeline it does not run
    document = statefile.snapshot(rig.pipelines, {"room": {"attic": T0}, "hall": {"porch": T0}})
    assert document["last_seen"] == {"room": {"attic": T0}}


def test_an_answer_after_the_restart_restarts_the_clock(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    before = Rig(tmp_path, T0)
    before.answer("room", "attic")
    before.save(path)
    after = Rig(tmp_path, T0 + 6 * DAY)
    after.restore(path)
    after.discovery.replan()
    after.answer("room", "attic")
    after.discovery.replan()
    after.now = T0 + 12 * DAY
    after.discovery.replan()
    assert after.discovery.forgotten == 0
    assert after.discovery.last_seen() == {"room": {"attic": T0 + 6 * DAY}}


# ------------------------------------------------------------------------- real Mosquitto


def _broker_config(url: str, prefix: str, tmp_path: Path) -> dict[str, Any]:
    snapshot_classifier(tmp_path / "occ.onnx", ["temperature", "co2"], ["empty", "occupied"], name="occ")
    return {
        "mqtt": {"url": url, "base_topic": f"{prefix}/ei", "client_id": f"ei-{prefix}"},
        "models": {"occ": {"path": "occ.onnx"}},
        "pipelines": {"occupancy": {"model": "occ", "source": {"topics": [f"{prefix}/z2m/{{device}}"]}}},
        "homeassistant": {
            "discovery_prefix": f"{prefix}/ha",
            "status_topic": f"{prefix}/ha/status",
            "instance_id": prefix,
            "forget_after_days": 1,
        },
        "state": {"file": str(tmp_path / "state.json")},
    }


def _device_topics(collector: Collector, prefix: str) -> dict[str, str]:
    """Device name -> its discovery config topic, from what the broker delivered."""
    out: dict[str, str] = {}
    for message in collector.messages:
        if message.topic.startswith(f"{prefix}/ha/device/") and message.payload:
            name = message.json()["dev"].get("name")
            if name in ("kitchen", "office"):
                out[name] = message.topic
    return out


@pytest.mark.broker
def test_a_device_last_seen_long_before_a_restart_is_removed_soon_after_it(
    mosquitto: Mosquitto, topic_prefix: str, tmp_path: Path
) -> None:
    """Two devices answer, the daemon stops (the state file keeps when each last answered). The
    office's time is set to 3 days ago in the file (forget_after_days is 1); after a restart the
    broker records an empty retained config on the office's topic and its retained state cleared,
    while the kitchen, which answered a moment ago, keeps its config and its last-seen entry."""
    p = topic_prefix
    data = _broker_config(mosquitto.url, p, tmp_path)
    state = tmp_path / "state.json"
    pub = Publisher(mosquitto.url)
    watch = Collector(mosquitto.url, f"{p}/ha/device/+/config", f"{p}/ei/occupancy/office")
    try:
        with DaemonThread(make_config(data, tmp_path)):
            for device in ("kitchen", "office"):
                pub.send(f"{p}/z2m/{device}", {"temperature": 21, "co2": 800})
            watch.wait(lambda m: len(_device_topics(watch, p)) == 2)
        topics = _device_topics(watch, p)
        document = json.loads(state.read_text())
        seen = document["last_seen"]["occupancy"]
        assert set(seen) == {"kitchen", "office"}, seen
        assert all(abs(t - time.time()) < 600 for t in seen.values()), seen  # wall times of this run
        seen["office"] = time.time() - 3 * DAY
        state.write_text(json.dumps(document))

        mark = len(watch.messages)
        with DaemonThread(make_config(data, tmp_path)) as runner:
            watch.wait(
                lambda m: any(x.topic == topics["office"] and not x.payload for x in m[mark:]), timeout=15
            )
            assert runner.daemon is not None and runner.daemon.discovery.forgotten == 1
            second = watch.messages[mark:]
            assert not [m for m in second if m.topic == topics["kitchen"] and not m.payload], (
                "the device seen recently was removed"
            )
            assert [m for m in second if m.topic == f"{p}/ei/occupancy/office" and not m.payload], (
                "the forgotten device's retained state was left on the broker"
            )
        kept = json.loads(state.read_text())["last_seen"]["occupancy"]
        assert set(kept) == {"kitchen"}, kept  # the forgotten device's entry is gone with it
        assert kept["kitchen"] == pytest.approx(seen["kitchen"])  # not answered since: unchanged
    finally:
        pub.close()
        watch.close()
