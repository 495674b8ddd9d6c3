"""Learn's history sources against a real Home Assistant Core with ``recorder:`` and ``history:``.

The test feeds sensor states to Home Assistant through MQTT (its MQTT integration, discovery as
a user's devices would announce themselves), at a pace the recorder stores with real
timestamps, then reads them back through the WebSocket API (``HaWebSocketSource``) and from a
copy of the recorder's SQLite file (``RecorderDbSource``) and asserts the two are identical:
every state, its ``last_updated`` and attributes, and each entity's state from before the period.
Long-term statistics are imported through the WebSocket API and read back both ways, and learn's
table filled from them (``learn.source.statistics``) is the same both ways. It also
checks a refused token (the error names the URL, never the token) and ``--suggest`` on the
real registries. Skipped without ``EDGE_INFER_HA_VENV`` (see tests/test_ha_real.py).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from edge.learn.ha_ws import HaSourceError, HaWebSocketSource
from edge.learn.history import EntityHistory
from edge.learn.recorder_db import RecorderDbSource, copy_recorder_db
from edge.learn.suggest import InputWanted, suggest_for_pipeline, suggest_from_ha
from tests.broker import Mosquitto
from tests.test_ha_real import HomeAssistant, _hass_binary, _publish, _publisher

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.timeout(600)]

RECORDER_CONFIG = "recorder:\n  commit_interval: 1\n  purge_keep_days: 30\nhistory:\n"
MAINS = "sensor.mains_meter_power"
PLUG = "sensor.washer_plug_power"
ROOM = "sensor.living_room_temperature"


@dataclass
class RecordedHome:
    ha: HomeAssistant
    url: str
    t0: float  # before the first state
    split: float  # some states before, most after
    end: float  # after the last state
    mains_after: list[str]  # the values published after split, in order
    plug_after: list[str]
    room_before: str  # the room's last value, published before split only


def _discovery(prefix: str, component: str, object_id: str, config: dict[str, Any]) -> tuple[str, str]:
    return f"homeassistant/{component}/{prefix}/{object_id}/config", json.dumps(config)


def _ws_wait(source: HaWebSocketSource, probe: Any, what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}; last: {last}")


@pytest.fixture(scope="module")
def recorded_home(tmp_path_factory: pytest.TempPathFactory, mosquitto: Mosquitto) -> Iterator[RecordedHome]:
    ha = HomeAssistant(_hass_binary(), tmp_path_factory.mktemp("ha-history"), extra_config=RECORDER_CONFIG)
    prefix = f"h{int(time.time() * 1000) % 10**8}"
    client = None
    configs: list[str] = []
    try:
        ha.start()
        ha.onboard()
        ha.add_mqtt(mosquitto.port)
        client = _publisher(mosquitto)
        avail = f"{prefix}/mains/online"
        announce = [
            _discovery(
                prefix,
                "sensor",
                "mains_power",
                {
                    "name": "Power",
                    "unique_id": f"{prefix}_mains_power",
                    "state_topic": f"{prefix}/mains/status/em1:0",
                    "value_template": "{{ value_json.act_power }}",
                    "availability_topic": avail,
                    "payload_available": "true",
                    "payload_not_available": "false",
                    "device_class": "power",
                    "unit_of_measurement": "W",
                    "state_class": "measurement",
                    "device": {
                        "identifiers": [f"{prefix}_mains"],
                        "name": "Mains meter",
                        "manufacturer": "Shelly",
                        "model": "Pro EM-50",
                    },
                },
            ),
            _discovery(
                prefix,
                "sensor",
                "washer_power",
                {
                    "name": "Power",
                    "unique_id": f"{prefix}_washer_power",
                    "state_topic": f"{prefix}/washer",
                    "value_template": "{{ value_json.power }}",
                    "device_class": "power",
                    "unit_of_measurement": "W",
                    "state_class": "measurement",
                    "device": {
                        "identifiers": [f"{prefix}_washer"],
                        "name": "Washer plug",
                        "manufacturer": "BlitzWolf",
                        "model": "BW-SHP13",
                    },
                },
            ),
            _discovery(
                prefix,
                "sensor",
                "washer_voltage",
                {
                    "name": "Voltage",
                    "unique_id": f"{prefix}_washer_voltage",
                    "state_topic": f"{prefix}/washer",
                    "value_template": "{{ value_json.voltage }}",
                    "device_class": "voltage",
                    "unit_of_measurement": "V",
                    "device": {"identifiers": [f"{prefix}_washer"]},
                },
            ),
            _discovery(
                prefix,
                "sensor",
                "room_temperature",
                {
                    "name": "Temperature",
                    "unique_id": f"{prefix}_room_temperature",
                    "state_topic": f"{prefix}/room",
                    "device_class": "temperature",
                    "unit_of_measurement": "°C",
                    "state_class": "measurement",
                    "device": {"identifiers": [f"{prefix}_room"], "name": "Living room"},
                },
            ),
        ]
        _publish(client, avail, "true", retain=True)
        for topic, payload in announce:
            configs.append(topic)
            _publish(client, topic, payload, retain=True)
        ha._wait(
            lambda: {MAINS, PLUG, ROOM} <= set(ha.states()) or None, "the discovered sensors", timeout=60
        )
        t0 = time.time()
        time.sleep(0.3)

        def mains(value: float) -> str:
            _publish(client, f"{prefix}/mains/status/em1:0", json.dumps({"id": 0, "act_power": value}))
            return f"{value}"

        def plug(value: float, voltage: float) -> str:
            _publish(client, f"{prefix}/washer", json.dumps({"power": value, "voltage": voltage}))
            return f"{value}"

        # before the split: a few states of each
        for i in range(8):
            mains(100.0 + i * 3.5)
            plug(round(0.5 + i * 0.1, 2), 230.0 + i % 3)
            time.sleep(0.15)
        _publish(client, f"{prefix}/room", "21.5")
        time.sleep(0.15)
        room_before = "21.75"
        _publish(client, f"{prefix}/room", room_before)
        time.sleep(0.6)  # Home Assistant has them all before the split
        split = time.time()
        time.sleep(0.3)
        mains_after: list[str] = []
        plug_after: list[str] = []
        for i in range(30):
            mains_after.append(mains(250.0 + 40 * (i % 7) + i * 0.25))
            plug_after.append(plug(2000.0 + 13 * (i % 5) + i * 0.5, 229.0 + i % 4))
            if i == 12:  # the meter drops off for a moment: a gap, recorded as unavailable
                _publish(client, avail, "false", retain=True)
                time.sleep(0.3)
                mains_after.append("unavailable")
                _publish(client, avail, "true", retain=True)
            time.sleep(0.15)
        time.sleep(0.5)
        end = time.time()
        home = RecordedHome(
            ha, f"http://127.0.0.1:{ha.port}", t0, split, end, mains_after, plug_after, room_before
        )
        assert ha.token is not None
        with HaWebSocketSource(url=home.url, token=ha.token) as source:
            # the recorder commits every second: wait until the last state is in its database
            def committed() -> bool:
                got = source.states([MAINS, PLUG], t0, end)
                return (
                    bool(got[MAINS])
                    and got[MAINS][-1].state == mains_after[-1]
                    and bool(got[PLUG])
                    and (got[PLUG][-1].state == plug_after[-1])
                )

            _ws_wait(source, committed, "the recorder to commit the last states")
        yield home
    finally:
        if client is not None:
            for topic in configs:  # the broker is shared by the session
                _publish(client, topic, "", retain=True)
            client.loop_stop()
            client.disconnect()
        ha.stop()


def _values(changes: list[Any]) -> list[str]:
    return [c.state for c in changes]


def _in_order(sub: list[str], seq: list[str]) -> bool:
    it = iter(seq)
    return all(any(x == y for y in it) for x in sub)


def test_websocket_and_recorder_copy_give_identical_history(
    recorded_home: RecordedHome, tmp_path: Path
) -> None:
    home = recorded_home
    assert home.ha.token is not None
    ids = [MAINS, PLUG, ROOM]
    with HaWebSocketSource(url=home.url, token=home.ha.token) as source:
        over_ws = source.states(ids, home.split, home.end)
        # chunked into 1-second periods, one entity per request: the same history
        with HaWebSocketSource(
            url=home.url, token=home.ha.token, chunk_s=1.0, entities_per_request=1, lookback_s=0.05
        ) as small:
            chunked = small.states(ids, home.split, home.end)
            assert small.requests > 3 * (home.end - home.split)
    # a consistent copy while Home Assistant runs (SQLite's backup API includes the -wal)
    copy = copy_recorder_db(home.ha.config_dir / "home-assistant_v2.db", tmp_path / "copy.db")
    with RecorderDbSource(path=copy) as db:
        from_db = db.states(ids, home.split, home.end)
        assert db.schema_version is not None and db.schema_version >= 41

    assert over_ws == from_db
    assert chunked == from_db
    _check_history(home, from_db)


def _check_history(home: RecordedHome, history: EntityHistory) -> None:
    mains, plug, room = history[MAINS], history[PLUG], history[ROOM]
    # the state before the period, at its own time: the last one published before the split
    assert mains[0].ts < home.split and mains[0].state == "124.5"
    assert plug[0].ts < home.split and plug[0].state == "1.2"
    assert [c.state for c in room] == [home.room_before] and home.t0 < room[0].ts < home.split
    for changes in (mains, plug):
        assert all(home.split <= c.ts < home.end for c in changes[1:])
        assert [c.ts for c in changes] == sorted(c.ts for c in changes)
    assert _in_order(home.mains_after, _values(mains[1:])), (home.mains_after, _values(mains))
    assert _values(plug[1:]) == home.plug_after
    assert "unavailable" in _values(mains)
    assert mains[1].attributes["unit_of_measurement"] == "W"
    assert mains[1].attributes["device_class"] == "power"


def test_statistics_identical_over_websocket_and_from_the_copy(
    recorded_home: RecordedHome, tmp_path: Path
) -> None:
    home = recorded_home
    assert home.ha.token is not None
    hour0 = (int(home.t0) // 3600 - 30) * 3600  # 30 hours ago, on the hour
    rows = [
        {
            "start": datetime.fromtimestamp(hour0 + 3600 * i, UTC).isoformat(),
            "mean": 300.0 + i,
            "min": 10.0 + i,
            "max": 2500.5 - i,
        }
        for i in range(5)
    ]
    with HaWebSocketSource(url=home.url, token=home.ha.token) as source:
        source.command(
            {
                "type": "recorder/import_statistics",
                "metadata": {
                    "has_mean": True,
                    "has_sum": False,
                    "name": None,
                    "source": "recorder",
                    "statistic_id": MAINS,
                    "unit_of_measurement": "W",
                },
                "stats": rows,
            }
        )
        window = (hour0 + 3600.0, hour0 + 4 * 3600.0)  # rows 1, 2 and 3
        over_ws = _ws_wait(
            source,
            lambda: (s := source.statistics([MAINS], *window)) and len(s[MAINS]) == 3 and s,
            "the imported statistics",
        )
        chunky = HaWebSocketSource(url=home.url, token=home.ha.token, chunk_s=1.0)
        with chunky:
            assert chunky.statistics([MAINS], *window) == over_ws
    copy = copy_recorder_db(home.ha.config_dir / "home-assistant_v2.db", tmp_path / "copy.db")
    with RecorderDbSource(path=copy) as db:
        assert db.statistics([MAINS], *window) == over_ws
    got = over_ws[MAINS]
    assert [r.start for r in got] == [hour0 + 3600.0 * i for i in (1, 2, 3)]
    assert [(r.mean, r.min, r.max) for r in got] == [
        (301.0, 11.0, 2499.5),
        (302.0, 12.0, 2498.5),
        (303.0, 13.0, 2497.5),
    ]


def _import_hourly(source: HaWebSocketSource, entity: str, rows: list[tuple[float, float]]) -> None:
    source.command(
        {
            "type": "recorder/import_statistics",
            "metadata": {
                "has_mean": True,
                "has_sum": False,
                "name": None,
                "source": "recorder",
                "statistic_id": entity,
                "unit_of_measurement": "W",
            },
            "stats": [
                {
                    "start": datetime.fromtimestamp(start, UTC).isoformat(),
                    "mean": mean,
                    "min": mean - 1.0,
                    "max": mean + 1.0,
                }
                for start, mean in rows
            ],
        }
    )


def test_learn_fills_from_long_term_statistics_identically_over_websocket_and_from_the_copy(
    recorded_home: RecordedHome, tmp_path: Path
) -> None:
    """learn.source.statistics against a real recorder: hourly statistics imported for 19 of the
    20 hours before the sensors existed (as after a purge: states only from then on) feed learn's
    table, a window of 3 hourly samples taught by the plug's hourly mean; the table over the
    WebSocket API equals the one from a copy of the recorder, bit for bit, and holds the imported
    means. (The hour before the sensors is left without rows, so a row Home Assistant compiles
    itself for the hour they appeared in, should the test pass the hour, starts a window of its
    own that never fills.)"""
    from edge.config import parse_config
    from edge.learn.run import make_table

    home = recorded_home
    assert home.ha.token is not None
    hour = int(home.t0) // 3600 * 3600 - 20 * 3600  # 20 hours before the fixture began, on the hour
    missing = 9  # no mains row for hour 9: a gap
    mains = [(hour + 3600.0 * k, 400.0 + 25.5 * k) for k in range(19) if k != missing]
    plug = [(hour + 3600.0 * k, 1800.5 if k % 4 == 1 else 0.75) for k in range(19)]
    with HaWebSocketSource(url=home.url, token=home.ha.token) as source:
        _import_hourly(source, MAINS, mains)
        _import_hourly(source, PLUG, plug)
        _ws_wait(
            source,
            lambda: (
                len(source.statistics([MAINS], hour, hour + 19 * 3600.0)[MAINS]) == 18
                and len(source.statistics([PLUG], hour, hour + 19 * 3600.0)[PLUG]) == 19
            ),
            "the imported statistics",
        )
        config = parse_config(
            {
                "models": {"m": {"path": str(tmp_path / "m.onnx")}},  # none yet: the config's spec
                "pipelines": {
                    "heat": {
                        "model": "m",
                        "source": {"profile": "shelly"},
                        "inputs": {"power": "em1:0.act_power"},
                        "features": {
                            "type": "window",
                            "size": 3,
                            "resample_period_s": 3600,
                            "max_gap_s": 3600,
                        },
                        "learn": {
                            "source": {
                                "recorder_db": str(tmp_path / "unused.db"),  # the sources are given below
                                "statistics": {"use": "fill", "period": "hour"},
                            },
                            "days": (home.end - hour) / 86400,
                            "end": datetime.fromtimestamp(home.end, UTC).isoformat(),
                            "inputs": {"mains_meter": {"power": MAINS}},
                            "labels": {"teacher": {"entity": PLUG, "above": 5}},
                        },
                    }
                },
            }
        )
        over_ws, _ = make_table("heat", config, source=source)
    copy = copy_recorder_db(home.ha.config_dir / "home-assistant_v2.db", tmp_path / "copy.db")
    with RecorderDbSource(path=copy) as db:
        from_db, _ = make_table("heat", config, source=db)
    assert over_ws.ts.tolist() == from_db.ts.tolist()
    assert over_ws.x.tobytes() == from_db.x.tobytes()
    assert over_ws.labels == from_db.labels and over_ws.statistics == from_db.statistics
    # the windows from statistics: each ticks at an hour's end and ends with that hour's mean,
    # labelled by the plug's mean of the same hour; the missing hour restarts the window
    mean = dict(mains)
    before = [i for i in range(len(over_ws)) if over_ws.ts[i] <= hour + 19 * 3600.0]
    assert len(before) == 8 + 8  # ticks at hours 2..9, and after the gap at hours 12..19
    for i in before:
        k = round((over_ws.ts[i] - hour) / 3600) - 1  # the hour the window ends with
        assert float(over_ws.x[i, -1, 0]) == mean[hour + 3600.0 * k]
        assert over_ws.labels[i] == ("on" if k % 4 == 1 else "off")
    assert {over_ws.labels[i] for i in before} == {"on", "off"}
    assert over_ws.x[before[0], :, 0].tolist() == [400.0, 400.0, 425.5]
    summary = over_ws.statistics
    assert summary["examples"] == len(before)
    spans = summary["entities"][MAINS]["spans"]
    iso = [
        datetime.fromtimestamp(hour + 3600.0 * k, UTC).strftime("%Y-%m-%dT%H:%M:%SZ") for k in (0, 9, 10, 19)
    ]
    assert spans[:2] == [[iso[0], iso[1], 9], [iso[2], iso[3], 9]]
    assert summary["entities"][f"{PLUG} (label)"]["spans"][0][2] == 19


def test_a_refused_token_names_the_url_never_the_token(
    recorded_home: RecordedHome, caplog: pytest.LogCaptureFixture
) -> None:
    home = recorded_home
    caplog.set_level(logging.DEBUG)
    secret = "not-a-real-token-0123456789abcdef"
    with pytest.raises(HaSourceError) as err, HaWebSocketSource(url=home.url, token=secret) as bad:
        bad.states([MAINS], home.split, home.end)
    text = str(err.value)
    assert f"ws://127.0.0.1:{home.ha.port}/api/websocket" in text and "authentication refused" in text
    assert secret not in text
    # an unknown command: the error names it
    assert home.ha.token is not None
    with pytest.raises(HaSourceError, match="no/such_command failed: unknown_command"):
        with HaWebSocketSource(url=home.url, token=home.ha.token) as good:
            good.command({"type": "no/such_command"})
    assert home.ha.token not in caplog.text and secret not in caplog.text
    assert "connected to Home Assistant" in caplog.text


def test_suggest_maps_inputs_to_entities_from_the_registries(
    recorded_home: RecordedHome, tmp_path: Path
) -> None:
    home = recorded_home
    assert home.ha.token is not None
    with HaWebSocketSource(url=home.url, token=home.ha.token) as source:
        text, ranked = suggest_from_ha(source, {"power": InputWanted(unit="W")}, pipeline="appliance")
    config = yaml.safe_load(text)
    inputs = config["learn"]["inputs"]
    # both power meters, each with its own power entity; the room has none
    assert inputs == {"mains_meter": {"power": MAINS}, "washer_plug": {"power": PLUG}}
    assert "unit W" in text and "device_class power" in text
    assert all(s.device_name != "Living room" for s in ranked if s.complete)

    # the --suggest entry point: only learn.source is needed (no inputs or labels yet); the
    # model file does not exist, so the inputs come from the config (power: W by its name)
    token_file = tmp_path / "ha.token"
    token_file.write_text(home.ha.token)
    config = tmp_path / "edge-infer.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "models": {"m": {"path": str(tmp_path / "m.onnx")}},
                "pipelines": {
                    "nilm": {
                        "model": "m",
                        "source": {"profile": "shelly"},
                        "inputs": {"power": "em1:0.act_power"},
                        "features": {"type": "window", "size": 4},
                        "learn": {"source": {"ha": {"url": home.url, "token_file": str(token_file)}}},
                    }
                },
            }
        )
    )
    proposal = suggest_for_pipeline(config, "nilm")
    assert yaml.safe_load(proposal)["learn"]["inputs"] == inputs
    assert "for pipeline nilm: inputs power [W]" in proposal and home.ha.token not in proposal
