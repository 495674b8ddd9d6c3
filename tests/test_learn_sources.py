"""learn's history sources without Home Assistant: a small recorder database built from the real
schema (tests/data/ha_recorder_schema50.sql, Home Assistant 2025.4.4), the WebSocket source's
settings, tokens and errors, and --suggest's ranking. tests/test_ha_history.py checks both
sources against a real Home Assistant."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import yaml

from edge.config import ConfigError
from edge.learn import ha_ws
from edge.learn.ha_ws import HaSourceError, HaWebSocketSource, from_settings, resolve_token, websocket_url
from edge.learn.history import StateChange, StatisticRow
from edge.learn.recorder_db import RecorderDbError, RecorderDbSource, copy_recorder_db
from edge.learn.suggest import (
    InputWanted,
    rank,
    suggest_for_pipeline,
    suggest_yaml,
    wanted_from_manifest_input,
)
from tests.broker import free_port

SCHEMA = Path(__file__).parent / "data" / "ha_recorder_schema50.sql"
T0 = 1_764_000_000.0  # some UTC second


class Recorder:
    """Writes rows as Home Assistant's recorder does (shared attributes, metadata ids)."""

    def __init__(self, path: Path, wal: bool = False) -> None:
        self.path = path
        self.db = sqlite3.connect(path)
        if wal:
            self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA.read_text())
        self.db.execute("INSERT INTO schema_changes (schema_version, changed) VALUES (50, '2025-04-30')")
        self.meta: dict[str, int] = {}
        self.attrs: dict[str, int] = {}

    def state(
        self, entity_id: str, state: str | None, ts: float, attributes: dict[str, Any] | None = None
    ) -> None:
        if entity_id not in self.meta:
            cur = self.db.execute("INSERT INTO states_meta (entity_id) VALUES (?)", (entity_id,))
            self.meta[entity_id] = int(cur.lastrowid or 0)
        shared = json.dumps(attributes or {}, separators=(",", ":"))
        if shared not in self.attrs:
            cur = self.db.execute(
                "INSERT INTO state_attributes (hash, shared_attrs) VALUES (0, ?)", (shared,)
            )
            self.attrs[shared] = int(cur.lastrowid or 0)
        self.db.execute(
            "INSERT INTO states (state, last_updated_ts, metadata_id, attributes_id) VALUES (?, ?, ?, ?)",
            (state, ts, self.meta[entity_id], self.attrs[shared]),
        )

    def statistic(self, statistic_id: str, table: str, start: float, **values: float) -> None:
        row = self.db.execute(
            "SELECT id FROM statistics_meta WHERE statistic_id = ?", (statistic_id,)
        ).fetchone()
        if row is None:
            cur = self.db.execute(
                "INSERT INTO statistics_meta (statistic_id, source, unit_of_measurement, has_mean, has_sum, "
                "mean_type) VALUES (?, 'recorder', 'W', 1, 0, 1)",
                (statistic_id,),
            )
            row = (cur.lastrowid,)
        cols = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        self.db.execute(
            f"INSERT INTO {table} (metadata_id, start_ts, created_ts{', ' + cols if cols else ''}) "
            f"VALUES (?, ?, ?{', ' + marks if marks else ''})",
            (row[0], start, start + 1, *values.values()),
        )

    def commit(self) -> None:
        self.db.commit()

    def close(self) -> None:
        self.db.commit()
        self.db.close()


@pytest.fixture
def recorder(tmp_path: Path) -> Path:
    rec = Recorder(tmp_path / "home-assistant_v2.db")
    power = {"unit_of_measurement": "W", "device_class": "power", "friendly_name": "Mains power"}
    rec.state("sensor.mains_power", "98.5", T0 - 3600, power)  # long before
    rec.state("sensor.mains_power", "101.25", T0 - 120.5, power)  # the one before the period
    rec.state("sensor.mains_power", "140.0", T0, power)  # exactly at start: inside
    rec.state("sensor.mains_power", "unavailable", T0 + 10.000001, {"friendly_name": "Mains power"})
    rec.state("sensor.mains_power", "2150.5", T0 + 20.25, power)
    rec.state("sensor.mains_power", "2150.75", T0 + 20.25, power)  # a tie: recorder order kept
    rec.state("sensor.mains_power", "12.0", T0 + 60, power)  # exactly at end: outside
    rec.state("input_boolean.washing", "on", T0 - 86400 * 3, {"friendly_name": "Washing"})
    rec.state("sensor.removed", None, T0 + 5)  # a NULL state (legacy rows): an empty string, a gap
    rec.statistic("sensor.mains_power", "statistics", T0 - 3600, mean=90.0, min=1.0, max=200.0)
    rec.statistic("sensor.mains_power", "statistics", T0, mean=110.5, min=2.0, max=2200.0)
    rec.statistic("sensor.mains_power", "statistics", T0 + 3600, mean=120.0, min=3.0, max=2300.0)
    rec.statistic("sensor.mains_power", "statistics_short_term", T0, mean=100.0, min=2.0, max=150.0)
    rec.statistic("sensor.mains_power", "statistics_short_term", T0 + 300, mean=1800.0)
    rec.statistic("sensor.energy", "statistics", T0, state=12.5, sum=3.25)
    rec.close()
    return rec.path


def test_recorder_db_states_in_the_period_with_the_state_before_at_its_own_time(recorder: Path) -> None:
    with RecorderDbSource(path=recorder) as db:
        got = db.states(
            ["sensor.mains_power", "input_boolean.washing", "sensor.removed", "sensor.never"], T0, T0 + 60
        )
        assert db.schema_version == 50
    power = {"unit_of_measurement": "W", "device_class": "power", "friendly_name": "Mains power"}
    assert got["sensor.mains_power"] == [
        StateChange(T0 - 120.5, "101.25", power),
        StateChange(T0, "140.0", power),
        StateChange(T0 + 10.000001, "unavailable", {"friendly_name": "Mains power"}),
        StateChange(T0 + 20.25, "2150.5", power),
        StateChange(T0 + 20.25, "2150.75", power),
    ]
    mains = got["sensor.mains_power"]
    assert mains[1].attributes is mains[3].attributes  # one dict per attributes row, shared
    assert got["input_boolean.washing"] == [StateChange(T0 - 86400 * 3, "on", {"friendly_name": "Washing"})]
    assert got["sensor.removed"] == [StateChange(T0 + 5, "", {})]
    assert got["sensor.never"] == []
    assert list(got) == ["sensor.mains_power", "input_boolean.washing", "sensor.removed", "sensor.never"]


def test_recorder_db_statistics_hour_and_5minute(recorder: Path) -> None:
    with RecorderDbSource(path=recorder) as db:
        hour = db.statistics(["sensor.mains_power", "sensor.energy", "sensor.none"], T0, T0 + 3600)
        short = db.statistics(["sensor.mains_power"], T0, T0 + 3600, period="5minute")
        with pytest.raises(RecorderDbError, match="period 'day'"):
            db.statistics(["sensor.mains_power"], T0, T0 + 3600, period="day")
    assert hour == {
        "sensor.mains_power": [StatisticRow(T0, mean=110.5, min=2.0, max=2200.0)],
        "sensor.energy": [StatisticRow(T0, state=12.5, sum=3.25)],
        "sensor.none": [],
    }
    assert short["sensor.mains_power"] == [
        StatisticRow(T0, mean=100.0, min=2.0, max=150.0),
        StatisticRow(T0 + 300, mean=1800.0),
    ]


def test_recorder_db_is_opened_read_only(recorder: Path) -> None:
    before = hashlib.sha256(recorder.read_bytes()).hexdigest()
    with RecorderDbSource(path=recorder) as db:
        db.states(["sensor.mains_power"], T0, T0 + 60)
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            db._conn().execute("DELETE FROM states")
    assert hashlib.sha256(recorder.read_bytes()).hexdigest() == before
    assert not recorder.with_name(recorder.name + "-journal").exists()


def test_recorder_db_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(RecorderDbError, match="does not exist"):
        RecorderDbSource(path=tmp_path / "missing.db")
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(RecorderDbError, match=r"junk\.db.*cannot be read as SQLite"):
        RecorderDbSource(path=junk).states(["sensor.x"], 0, 1)
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE states (state TEXT)").connection.commit()
    with pytest.raises(RecorderDbError, match=r"other\.db.*lacks columns .*last_updated_ts.*2023\.4"):
        RecorderDbSource(path=other).states(["sensor.x"], 0, 1)


def test_a_running_recorders_wal_copy_with_backup_not_with_cp(tmp_path: Path) -> None:
    (tmp_path / "live").mkdir()
    live = Recorder(tmp_path / "live" / "home-assistant_v2.db", wal=True)
    live.state("sensor.t", "20.5", T0)
    live.commit()
    # the writer stays open (Home Assistant running): the rows are in the -wal file
    wal = live.path.with_name(live.path.name + "-wal")
    assert wal.stat().st_size > 0
    plain = tmp_path / "plain.db"
    shutil.copyfile(live.path, plain)
    with pytest.raises(RecorderDbError):  # the main file alone has not even the tables yet
        RecorderDbSource(path=plain).states(["sensor.t"], T0, T0 + 1)
    with pytest.raises(RecorderDbError, match=r"non-empty home-assistant_v2\.db-wal"):
        RecorderDbSource(path=live.path, immutable=True)
    copy = copy_recorder_db(live.path, tmp_path / "copy.db")
    with RecorderDbSource(path=copy, immutable=True) as db:
        assert db.states(["sensor.t"], T0, T0 + 1) == {"sensor.t": [StateChange(T0, "20.5", {})]}
    live.close()


# ----------------------------------------------------------------------------------- ha_ws


def test_websocket_url_forms() -> None:
    assert websocket_url("http://homeassistant.local:8123") == "ws://homeassistant.local:8123/api/websocket"
    assert websocket_url("https://ha.example.org/") == "wss://ha.example.org/api/websocket"
    assert websocket_url("ws://supervisor/core/websocket") == "ws://supervisor/core/websocket"
    with pytest.raises(HaSourceError, match="use http://host:8123"):
        websocket_url("ftp://ha")
    with pytest.raises(HaSourceError, match=r"\*\*\*") as err:
        websocket_url("mqtt://user:hunter2@ha")
    assert "hunter2" not in str(err.value)


def test_token_from_file_or_env_never_in_messages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiJ9.secret"
    token_file = tmp_path / "ha.token"
    token_file.write_text(f"{secret}\n")
    assert resolve_token(token_file) == secret
    monkeypatch.setenv("MY_HA_TOKEN", f"  {secret} ")
    assert resolve_token(token_env="MY_HA_TOKEN") == secret
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(HaSourceError, match=r"learn\.source\.ha\.token_file .*empty.* is empty"):
        resolve_token(tmp_path / "empty")
    with pytest.raises(HaSourceError, match=r"token_file .*nope"):
        resolve_token(tmp_path / "nope")
    monkeypatch.delenv("HA_TOKEN", raising=False)
    monkeypatch.delenv("SUPERVISOR_TOKEN", raising=False)
    with pytest.raises(HaSourceError, match=r"\$HA_TOKEN or \$SUPERVISOR_TOKEN"):
        resolve_token()
    source = HaWebSocketSource(url="http://127.0.0.1:8123", token=secret)
    assert secret not in repr(source) and secret not in str(vars(source).get("url"))


def test_supervisor_token_and_proxy_inside_the_addon(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUPERVISOR_TOKEN", "supervisor-secret")
    source = from_settings()
    assert source.url == "ws://supervisor/core/websocket"
    assert "supervisor-secret" not in repr(source)
    monkeypatch.delenv("SUPERVISOR_TOKEN")
    with pytest.raises(HaSourceError, match=r"learn\.source\.ha\.url is not set"):
        from_settings()


def test_connection_refused_names_the_masked_url(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    port = free_port()  # nothing listens there
    source = HaWebSocketSource(url=f"http://user:pw-secret@127.0.0.1:{port}", token="tok-secret", timeout_s=5)
    with pytest.raises(HaSourceError) as err:
        source.states(["sensor.x"], T0, T0 + 60)
    text = str(err.value)
    assert f"ws://user:***@127.0.0.1:{port}/api/websocket" in text and "cannot connect" in text
    assert "pw-secret" not in text and "tok-secret" not in text and "tok-secret" not in caplog.text


def test_compressed_state_entries() -> None:
    entry = {"s": "on", "a": {"friendly_name": "Washer"}, "lu": 1764000000.123456, "lc": 1.0}
    assert ha_ws._compressed(entry) == StateChange(1764000000.123456, "on", {"friendly_name": "Washer"})
    assert ha_ws._compressed({"s": None, "lu": 5}) == StateChange(5.0, "", {})
    # equal attributes share one dict (a history holds millions of states, a few attribute sets)
    first = ha_ws._compressed(entry)
    again = ha_ws._compressed({**entry, "a": {"friendly_name": "Washer"}}, first.attributes)
    assert again.attributes is first.attributes
    # a period boundary becomes the float Home Assistant parses from the ISO text
    iso, parsed = ha_ws._request_ts(T0 + 0.1234567)
    assert iso.endswith("+00:00") and parsed == pytest.approx(T0 + 0.123457, abs=1e-6)
    assert list(ha_ws._chunks(0, 10, 4)) == [(0, 4), (4, 8), (8, 10)]


# ----------------------------------------------------------------------------------- suggest


def _registries() -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    devices = [
        {
            "id": "d1",
            "name": "Shelly Pro EM",
            "name_by_user": "Mains meter",
            "manufacturer": "Shelly",
            "model": "Pro EM-50",
            "area_id": "utility",
        },
        {"id": "d2", "name": "Washer plug", "manufacturer": "BlitzWolf", "model": "BW-SHP13"},
        {"id": "d3", "name": "Old plug", "disabled_by": "user"},
        {"id": "d4", "name": "Solar inverter"},
        {"id": "d5", "name": "Washer plug"},  # same name: its key gets a suffix
    ]
    entities = [
        {"entity_id": "sensor.mains_power", "device_id": "d1"},
        {"entity_id": "sensor.mains_energy", "device_id": "d1"},
        {"entity_id": "sensor.washer_plug_power", "device_id": "d2"},
        {"entity_id": "sensor.washer_plug_voltage", "device_id": "d2", "entity_category": "diagnostic"},
        {"entity_id": "sensor.old_plug_power", "device_id": "d3"},
        {"entity_id": "sensor.inverter_output", "device_id": "d4"},
        {"entity_id": "sensor.hidden_power", "device_id": "d5", "hidden_by": "user"},
        {"entity_id": "sensor.second_washer_power", "device_id": "d5"},
    ]

    def st(eid: str, state: str, unit: str, dc: str | None, sc: str | None = "measurement") -> dict[str, Any]:
        attrs = {"unit_of_measurement": unit, "friendly_name": eid.split(".")[1].replace("_", " ").title()}
        if dc:
            attrs["device_class"] = dc
        if sc:
            attrs["state_class"] = sc
        return {"entity_id": eid, "state": state, "attributes": attrs}

    states = [
        st("sensor.mains_power", "412.5", "W", "power"),
        st("sensor.mains_energy", "1234.5", "kWh", "energy", "total_increasing"),
        st("sensor.washer_plug_power", "unavailable", "W", "power"),
        st("sensor.washer_plug_voltage", "231", "V", "voltage"),
        st("sensor.old_plug_power", "3", "W", "power"),
        st("sensor.inverter_output", "1.2", "kW", "power"),
        st("sensor.hidden_power", "1", "W", "power"),
        st("sensor.second_washer_power", "0", "W", None, None),
        st("sensor.yaml_template_power", "55", "W", "power"),  # no registry entry
    ]
    return entities, devices, states


def test_suggest_ranks_devices_with_reasons() -> None:
    entities, devices, states = _registries()
    wanted = {"power": InputWanted(unit="W")}
    ranked = rank(wanted, entities, devices, states)
    order = [(s.key, s.picks["power"].entity_id, s.score) for s in ranked]
    assert order == [
        ("mains_meter", "sensor.mains_power", 7.0),  # unit, class, name, measurement, numeric
        ("yaml_template_power", "sensor.yaml_template_power", 7.0),
        ("washer_plug", "sensor.washer_plug_power", 6.5),  # unavailable now
        ("washer_plug_2", "sensor.second_washer_power", 4.5),  # no device class, not hidden_power
        ("solar_inverter", "sensor.inverter_output", 4.0),  # kW: the same quantity, converted
    ]
    assert "unit kW (convert to W)" in ranked[-1].picks["power"].reasons
    text = suggest_yaml(wanted, ranked, pipeline="appliance")
    config = yaml.safe_load(text)
    assert config["learn"]["inputs"]["mains_meter"] == {"power": "sensor.mains_power"}
    assert "old_plug" not in text  # a disabled device
    assert "# 7: unit W; device_class power; name has 'power'; state_class measurement; now 412.5" in text


def test_suggest_two_inputs_partial_devices_as_comments() -> None:
    entities, devices, states = _registries()
    wanted = wanted_from_manifest_input(["power", "voltage"], {"power": "W", "voltage": "V"})
    ranked = rank(wanted, entities, devices, states)
    assert [s.key for s in ranked if s.complete] == ["washer_plug"]
    washer = ranked[0]
    assert washer.picks["voltage"].entity_id == "sensor.washer_plug_voltage"
    assert "diagnostic entity" in washer.picks["voltage"].reasons
    text = suggest_yaml(wanted, ranked)
    assert yaml.safe_load(text)["learn"]["inputs"] == {
        "washer_plug": {"power": "sensor.washer_plug_power", "voltage": "sensor.washer_plug_voltage"}
    }
    assert "#   mains_meter (Mains meter): power: sensor.mains_power; missing voltage" in text
    none = suggest_yaml(
        {"co2": InputWanted(unit="ppm")}, rank({"co2": InputWanted(unit="ppm")}, *_registries())
    )
    assert yaml.safe_load(none)["learn"]["inputs"] == {}


class Registries:
    """Registries and states held in memory, as Home Assistant lists them."""

    def __init__(self) -> None:
        self.entities, self.devices, self.states = _registries()

    def entity_registry(self) -> list[dict[str, Any]]:
        return self.entities

    def device_registry(self) -> list[dict[str, Any]]:
        return self.devices

    def current_states(self) -> list[dict[str, Any]]:
        return self.states


def test_suggest_for_a_pipeline_from_its_model_or_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.onnx_models import window_classifier

    def write(model: Path, learn: dict[str, Any] | None, name: str) -> Path:
        pipe: dict[str, Any] = {
            "model": "m",
            "source": {"profile": "zigbee2mqtt"},
            "inputs": {"power": "power", "voltage": "voltage"},
            "features": {"type": "window", "size": 4},
        }
        if learn is not None:
            pipe["learn"] = learn
        path = tmp_path / name
        path.write_text(yaml.safe_dump({"models": {"m": {"path": str(model)}}, "pipelines": {"p": pipe}}))
        return path

    # no model file yet: the config's inputs, units by their names
    config = write(tmp_path / "none.onnx", {"source": {"recorder_db": "/x.db"}}, "db.yaml")
    text = suggest_for_pipeline(config, "p", source=Registries())
    assert "inputs power [W], voltage [V]" in text
    assert yaml.safe_load(text)["learn"]["inputs"] == {
        "washer_plug": {"power": "sensor.washer_plug_power", "voltage": "sensor.washer_plug_voltage"}
    }
    # a model file: its manifest's features
    model = window_classifier(tmp_path / "m.onnx", ["power"], 4, ["off", "on"])
    no_learn = write(model, None, "no-learn.yaml")
    text = suggest_for_pipeline(no_learn, "p", source=Registries())
    assert "inputs power [W]" in text and "mains_meter" in text
    with pytest.raises(ConfigError, match=r"pipelines\.p\.learn\.source: --suggest reads"):
        suggest_for_pipeline(config, "p")
    with pytest.raises(ConfigError, match="no pipeline 'q'"):
        suggest_for_pipeline(config, "q")
    monkeypatch.delenv("SUPERVISOR_TOKEN", raising=False)
    with pytest.raises(HaSourceError, match=r"pipelines\.p\.learn\.source\.ha\.url is not set"):
        suggest_for_pipeline(no_learn, "p")  # without a learn section only the add-on knows where
