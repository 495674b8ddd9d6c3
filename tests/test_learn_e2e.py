"""edge-infer learn end to end: simulated rooms' history -> table -> training process -> gate ->
deployed where a running daemon (real Mosquitto) hot-reloads it -> rollback; and the CLI's refusals."""

from __future__ import annotations

import json
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from devices.history import room_history
from devices.roomsim import RoomConfig
from edge.learn import run as learn_run
from edge.learn.deploy import previous_path
from edge.learn.history import EntityHistory, SourceError
from edge.learn.sources import MemorySource
from edge.learn.table import build_table
from edge.manifest import read_manifest
from edge.runtime import file_sha256
from tests.broker import Mosquitto
from tests.harness import Collector, DaemonThread, Publisher, fast_mqtt, make_config, run_cli

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "models" / "occupancy" / "occupancy.fp32.onnx"
CLIMATE = ("temperature", "humidity", "illuminance", "co2")
END = datetime(2026, 11, 5, tzinfo=UTC).timestamp()
ROOMS = [
    ("office", RoomConfig(name="office", schedule="home_office")),
    ("living", RoomConfig(name="living", schedule="family", floor_area_m2=25.0, max_occupants=4)),
]


def history(days: float = 5.0) -> EntityHistory:
    hist, _ = room_history(ROOMS, start=END - days * 86400, days=days, outages=1, seed=5)
    return hist


def config_data(tmp_path: Path, learn: dict[str, Any], mqtt: dict[str, Any] | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {
        "models": {"occupancy": {"path": str(tmp_path / "occupancy.onnx")}},
        "pipelines": {
            "rooms": {
                "model": "occupancy",
                "source": {"profile": "json", "topics": ["home/{device}/climate"], "timestamp_field": "ts"},
                "features": {"type": "window", "resample_period_s": 60, "max_gap_s": 600},
                "learn": {
                    "source": {"recorder_db": str(tmp_path / "unused.db")},
                    "days": 5,
                    "end": "2026-11-05T00:00:00Z",
                    "inputs": {r: {c: f"sensor.{r}_{c}" for c in CLIMATE} for r, _ in ROOMS},
                    "labels": {
                        "teacher": {
                            "any_on": ["binary_sensor.{device}_motion"],
                            "within_s": 900,
                            "on": "occupied",
                            "off": "empty",
                        }
                    },
                    "train": {"epochs": 10},
                    **learn,
                },
            }
        },
        "reload": {"interval_s": 0.5},
    }
    if mqtt is not None:
        data["mqtt"] = mqtt
    return data


def test_learn_promotes_a_model_the_running_daemon_reloads_then_rollback(
    mosquitto: Mosquitto, topic_prefix: str, tmp_path: Path
) -> None:
    p = topic_prefix
    shutil.copyfile(BUNDLED, tmp_path / "occupancy.onnx")  # the deployed model: the bundled one
    data = config_data(tmp_path, {}, fast_mqtt(mosquitto.url, p))
    data["pipelines"]["rooms"]["source"]["topics"] = [f"{p}/home/{{device}}/climate"]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    out = Collector(mosquitto.url, f"{p}/ei/rooms/+")
    pub = Publisher(mosquitto.url)
    with DaemonThread(make_config(data, tmp_path)) as runner:
        result = learn_run.learn(path, "rooms", source=MemorySource(history(), "simulated rooms"))
        assert result.status == learn_run.EXIT_PROMOTED, result.message
        report = result.report
        holdout = report["holdout"]
        assert holdout["candidate"]["macro_f1"] > holdout["baseline"]["macro_f1"] + 0.02
        assert holdout["candidate"]["macro_f1"] > holdout["deployed"]["macro_f1"] + 0.02
        assert report["training"]["peak_rss_mb"] < 1500
        manifest = read_manifest(tmp_path / "occupancy.onnx")
        assert manifest is not None and "+learn." in manifest.version
        assert file_sha256(previous_path(tmp_path / "occupancy.onnx")) == file_sha256(BUNDLED)
        card = (tmp_path / "occupancy.onnx.card.md").read_text()
        for needle in (
            "Learned from this home",
            "simulated rooms",
            "trivial baseline",
            "| deployed |",
            "purge",
        ):
            assert needle in card, needle
        # the quality record beside it (edge/quality.py): what the holdout said, what it learned from
        quality = json.loads((tmp_path / "occupancy.onnx.quality.json").read_text())
        assert quality["model_sha256"] == file_sha256(tmp_path / "occupancy.onnx")
        train = report["split"]["counts"]["train"]
        assert quality["examples_per_class"] == {c: train.get(c, 0) for c in report["classes"]}
        assert quality["metric"]["value"] == holdout["candidate"][report["gate"]["metric"]]
        confusion = quality["confusion"]
        assert confusion["labels"] == report["classes"]
        assert sum(map(sum, confusion["counts"])) == holdout["n"] == quality["metric"]["n"]
        correct = sum(confusion["counts"][i][i] for i in range(len(confusion["labels"])))
        assert correct / holdout["n"] == pytest.approx(holdout["candidate"]["accuracy"])
        assert quality["span"] == {"start": report["span"]["start"], "end": report["span"]["end"]}
        table = (tmp_path / "learn" / "rooms" / "table.csv").read_text().splitlines()
        assert table[0].startswith("ts,device,pipeline,label,temperature@0,humidity@0")

        # the running daemon hot-reloads the promoted file and answers with it
        deadline = time.monotonic() + 20
        while runner.call(lambda: runner.daemon.pipelines["rooms"].spec.version) != manifest.version:
            assert time.monotonic() < deadline, "the daemon did not reload the learned model"
            time.sleep(0.2)
        now = time.time()
        for i in range(14):
            payload = {
                "ts": now - 900 + 60 * i,
                "temperature": 21.5,
                "humidity": 45,
                "illuminance": 300,
                "co2": 900,
            }
            pub.send(f"{p}/home/office/climate", payload)
        got = out.wait(lambda m: any(x.json()["model_version"] == manifest.version for x in m), timeout=20)
        assert got
        info = runner.call(runner.daemon.bridge_info)["models"]["occupancy"]
        assert info["examples_per_class"] == quality["examples_per_class"]
        assert info["trained_at"] == quality["trained_at"]

        done = run_cli("models", "rollback", "-c", str(path), "rooms")
        assert done.returncode == 0, done.stderr
        assert file_sha256(tmp_path / "occupancy.onnx") == file_sha256(BUNDLED)
        # the record went with the learned model; the bundled copy brought none back
        assert not (tmp_path / "occupancy.onnx.quality.json").exists()
        kept = json.loads((tmp_path / "occupancy.onnx.previous.quality.json").read_text())
        assert kept == quality
        deadline = time.monotonic() + 20
        while runner.call(lambda: runner.daemon.pipelines["rooms"].spec.version) != "1.0.0":
            assert time.monotonic() < deadline, "the daemon did not reload the rolled-back model"
            time.sleep(0.2)
    pub.close()
    out.close()


def test_cli_from_a_record_file_gate_keeps_the_deployed_model(tmp_path: Path) -> None:
    shutil.copyfile(BUNDLED, tmp_path / "occupancy.onnx")
    cfg = make_config(config_data(tmp_path, {}), tmp_path)
    hist = history(3.0)
    table = build_table("rooms", cfg, hist, END - 3 * 86400, END)
    record = tmp_path / "rows.csv"
    table.write_csv(record)  # what `edge-infer record` writes
    data = config_data(
        tmp_path, {"source": {"record": "rows.csv"}, "gate": {"margin": 0.9}, "train": {"epochs": 3}}
    )
    del data["pipelines"]["rooms"]["learn"]["labels"]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    before = file_sha256(tmp_path / "occupancy.onnx")
    done = run_cli("learn", "-c", str(path), "rooms", "--json", timeout=300)
    assert done.returncode == learn_run.EXIT_KEPT, done.stdout + done.stderr
    assert "does not beat the trivial baseline" in done.stderr and "kept" in done.stderr
    assert "epoch" in done.stderr  # the training process's progress is shown
    report = json.loads(done.stdout[: done.stdout.rindex("}") + 1])
    assert report["source"].startswith("edge-infer record file")
    assert report["gate"]["promote"] is False
    assert file_sha256(tmp_path / "occupancy.onnx") == before
    assert not previous_path(tmp_path / "occupancy.onnx").exists()


def test_cli_refuses_too_little_data_plainly(tmp_path: Path) -> None:
    shutil.copyfile(BUNDLED, tmp_path / "occupancy.onnx")
    cfg = make_config(config_data(tmp_path, {}), tmp_path)
    build_table("rooms", cfg, history(1.0), END - 3 * 86400, END).write_csv(tmp_path / "rows.csv")
    data = config_data(tmp_path, {"source": {"record": "rows.csv"}, "min_examples_per_class": 100_000})
    del data["pipelines"]["rooms"]["learn"]["labels"]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    done = run_cli("learn", "-c", str(path), "rooms", timeout=120)
    assert done.returncode == learn_run.EXIT_TOO_LITTLE, done.stderr
    assert "not enough data to learn rooms: class `empty` has " in done.stderr
    assert "at the current rate about " in done.stderr and "more days are needed" in done.stderr
    assert not (tmp_path / "learn").exists()  # refused before anything was trained


def test_missing_train_extra_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a)
    )
    shutil.copyfile(BUNDLED, tmp_path / "occupancy.onnx")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config_data(tmp_path, {}), sort_keys=False))
    result = learn_run.learn(path, "rooms", source=MemorySource(history(2.0)))
    assert result.status == learn_run.EXIT_NO_TORCH
    assert "pip install torch==2.13.0" in result.message


def _ha_config(tmp_path: Path, ha: dict[str, Any]) -> Path:
    shutil.copyfile(BUNDLED, tmp_path / "occupancy.onnx")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config_data(tmp_path, {"source": {"ha": ha}}), sort_keys=False))
    return path


def test_an_unreachable_home_assistant_is_a_plain_error_naming_the_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """learn and learn --suggest against a Home Assistant that is not there: exit 2 with the URL
    (password masked) and never the token; no traceback, nothing trained."""
    from tests.broker import free_port

    monkeypatch.setenv("EI_TEST_HA_TOKEN", "secret-token-value")
    url = f"http://user:hunter2@127.0.0.1:{free_port()}"
    path = _ha_config(tmp_path, {"url": url, "token_env": "EI_TEST_HA_TOKEN"})
    for extra in ((), ("--suggest",)):
        done = run_cli("learn", "-c", str(path), "rooms", *extra, timeout=120)
        assert done.returncode == learn_run.EXIT_CONFIG, (extra, done.stdout, done.stderr)
        assert "127.0.0.1" in done.stderr and "***" in done.stderr, done.stderr
        assert "hunter2" not in done.stderr + done.stdout
        assert "secret-token-value" not in done.stderr + done.stdout
        assert "Traceback" not in done.stderr
    assert not (tmp_path / "learn").exists()


def test_ha_without_a_url_is_the_supervisor_only_inside_the_addon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SUPERVISOR_TOKEN", raising=False)
    path = _ha_config(tmp_path, {})
    done = run_cli("learn", "-c", str(path), "rooms", timeout=120)
    assert done.returncode == learn_run.EXIT_CONFIG, done.stderr
    assert "pipelines.rooms.learn.source.ha.url is not set" in done.stderr
    assert "only inside the add-on" in done.stderr
    token_without_url = _ha_config(tmp_path, {"token_env": "HA_TOKEN"})
    done = run_cli("check", "-c", str(token_without_url))
    assert done.returncode == 2 and "learn.source.ha.url" in done.stderr, done.stderr
    url_without_token = _ha_config(tmp_path, {"url": "http://ha:8123"})
    done = run_cli("check", "-c", str(url_without_token))
    assert done.returncode == 2 and "learn.source.ha.token_file" in done.stderr, done.stderr


def test_a_source_learn_opened_is_closed_whether_or_not_reading_it_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """make_table closes the source it opened (the WebSocket, the SQLite file) after reading,
    and also when reading raises; a source handed in by the caller is left open."""
    shutil.copyfile(BUNDLED, tmp_path / "occupancy.onnx")
    cfg = make_config(config_data(tmp_path, {}), tmp_path)
    closed: list[str] = []

    class Recording(MemorySource):
        def __init__(self, history: EntityHistory, fail: bool) -> None:
            super().__init__(history)
            self.fail = fail

        def states(self, entity_ids: Any, start: float, end: float) -> EntityHistory:
            if self.fail:
                raise SourceError("Home Assistant ws://ha/api/websocket: connection lost")
            return super().states(entity_ids, start, end)

        def close(self) -> None:
            closed.append("fail" if self.fail else "ok")

    for fail in (False, True):
        monkeypatch.setattr(learn_run, "open_source", lambda *_a, fail=fail: Recording(history(5.0), fail))
        if fail:
            with pytest.raises(SourceError):
                learn_run.make_table("rooms", cfg)
        else:
            table, _ = learn_run.make_table("rooms", cfg)
            assert len(table) > 0
    assert closed == ["ok", "fail"]
    given = Recording(history(5.0), False)
    learn_run.make_table("rooms", cfg, source=given)
    assert closed == ["ok", "fail"], "a source the caller handed in is the caller's to close"
