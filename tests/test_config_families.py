"""Device families as typed members of the source union: each family's options, the errors that
name the key, the discriminator's error for an unknown profile (edge/config.py)."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import pytest

from edge.config import (
    FAMILY_OPTIONS,
    FAMILY_SOURCES,
    ConfigError,
    EsphomeOptions,
    EsphomeSource,
    JsonSource,
    ShellyOptions,
    ShellySource,
    StatestreamOptions,
    StatestreamSource,
    TasmotaOptions,
    TasmotaSource,
    Zigbee2MqttOptions,
    Zigbee2MqttSource,
    parse_config,
)
from edge.families import build_decoder, list_profiles, profile_info
from edge.manifest import Task
from edge.pipeline import pipeline_decoder
from edge.runtime import ModelSpec


def config(source: dict[str, Any], **model: Any) -> dict[str, Any]:
    return {
        "models": {"m": {"path": "m.onnx", "task": "regression", **model}},
        "pipelines": {"p": {"model": "m", "source": source}},
    }


def source_of(source: dict[str, Any]) -> Any:
    return parse_config(config(source)).pipelines["p"].source


def refused(source: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as err:
        parse_config(config(source))
    return err.value


# --------------------------------------------------------------------------- typed members


def test_every_profile_is_a_member_with_its_own_options_model() -> None:
    assert set(FAMILY_SOURCES) == set(list_profiles()) == set(FAMILY_OPTIONS)
    for profile, model in FAMILY_SOURCES.items():
        assert typing.get_args(model.model_fields["profile"].annotation) == (profile,)
        info = profile_info(profile)
        # the docs and `check` show the options of the typed model, devices included
        assert set(info["options"]) == set(FAMILY_OPTIONS[profile].model_fields)


@pytest.mark.parametrize(
    ("source", "cls", "options"),
    [
        ({"profile": "zigbee2mqtt"}, Zigbee2MqttSource, Zigbee2MqttOptions(base_topic="zigbee2mqtt")),
        (
            {"profile": "zigbee2mqtt", "options": {"base_topic": "z2m", "devices": ["a", "b"]}},
            Zigbee2MqttSource,
            Zigbee2MqttOptions(base_topic="z2m", devices=["a", "b"]),
        ),
        ({"profile": "tasmota"}, TasmotaSource, TasmotaOptions(tele_prefix="tele")),
        ({"profile": "tasmota", "options": {"tele_prefix": "home/tele"}}, TasmotaSource, None),
        ({"profile": "esphome"}, EsphomeSource, EsphomeOptions(prefix=None)),
        ({"profile": "esphome", "options": {"prefix": "node-1"}}, EsphomeSource, None),
        ({"profile": "shelly"}, ShellySource, ShellyOptions(prefix=None, component="switch:0")),
        (
            {"profile": "shelly", "options": {"prefix": "shellyplus1pm-a1", "component": "em1:0"}},
            ShellySource,
            None,
        ),
        ({"profile": "statestream"}, StatestreamSource, StatestreamOptions(base_topic="homeassistant")),
        (
            {"profile": "statestream", "options": {"domains": ["sensor"], "base_topic": "ss"}},
            StatestreamSource,
            StatestreamOptions(base_topic="ss", domains=["sensor"]),
        ),
    ],
)
def test_family_options_are_typed(source: dict[str, Any], cls: type, options: Any) -> None:
    got = source_of(source)
    assert type(got) is cls
    assert got.profile == source["profile"]
    assert type(got.options) is FAMILY_OPTIONS[source["profile"]]
    if options is not None:
        assert got.options == options
    for key, value in source.get("options", {}).items():
        assert getattr(got.options, key) == value


def test_a_missing_profile_is_json_with_its_source_keys() -> None:
    got = source_of({"topics": ["w/{device}/imu"], "timestamp_field": "ts", "format": "json", "qos": 0})
    assert type(got) is JsonSource
    assert (got.profile, got.topics, got.timestamp_field, got.qos) == ("json", ["w/{device}/imu"], "ts", 0)


def test_a_number_as_a_prefix_is_its_text() -> None:
    assert source_of({"profile": "tasmota", "options": {"tele_prefix": 7}}).options.tele_prefix == "7"


def test_the_typed_options_reach_the_decoder() -> None:
    cfg = parse_config(
        config({"profile": "zigbee2mqtt", "options": {"base_topic": "z2m", "devices": ["kitchen"]}})
    )
    decoder = pipeline_decoder("p", cfg.pipelines["p"], {"t": "temperature"})
    assert decoder.filters == ["z2m/kitchen/availability", "z2m/kitchen"]
    cfg = parse_config(config({"topics": ["w/{device}/imu"], "timestamp_field": "ts"}))
    decoder = pipeline_decoder("p", cfg.pipelines["p"], {"x": "accel.x"})
    assert decoder.filters == ["w/+/imu"]
    # the same decoder as the API's, given the typed options themselves
    options = Zigbee2MqttOptions(base_topic="z2m")
    assert build_decoder("zigbee2mqtt", readings={"t": "temperature"}, options=options).filters == [
        "z2m/+/availability",
        "z2m/+",
    ]


# --------------------------------------------------------------------------- errors name the key


@pytest.mark.parametrize(
    ("source", "key", "words"),
    [
        (
            {"profile": "tasmota", "options": {"tele_prefix": "a/+"}},
            "pipelines.p.source.options.tele_prefix",
            ["option 'tele_prefix' of profile 'tasmota'", "without wildcards"],
        ),
        (
            {"profile": "zigbee2mqtt", "options": {"base_topic": "z//x"}},
            "pipelines.p.source.options.base_topic",
            ["empty topic level"],
        ),
        (
            {"profile": "zigbee2mqtt", "options": {"base_topic": ["x"]}},
            "pipelines.p.source.options.base_topic",
            ["must be a string"],
        ),
        (
            {"profile": "shelly", "options": {"component": "switch 0"}},
            "pipelines.p.source.options.component",
            ["not like 'switch:0'"],
        ),
        (
            {"profile": "zigbee2mqtt", "options": {"devices": "kitchen"}},
            "pipelines.p.source.options.devices",
            ["non-empty list"],
        ),
        (
            {"profile": "esphome", "options": {"devices": ["a/b"]}},
            "pipelines.p.source.options.devices",
            ["topic segment"],
        ),
        (
            {"profile": "statestream", "options": {"domains": "sensor"}},
            "pipelines.p.source.options.domains",
            ["list of domains"],
        ),
        (
            {"profile": "zigbee2mqtt", "options": {"base_topc": "z2m"}},
            "pipelines.p.source.options.base_topc",
            ["unknown option 'base_topc' for device profile 'zigbee2mqtt'", "known: base_topic, devices"],
        ),
        (
            {"profile": "zigbee2mqtt", "options": "z2m"},
            "pipelines.p.source.options",
            ["dictionary"],
        ),
    ],
)
def test_a_wrong_option_names_its_key(source: dict[str, Any], key: str, words: list[str]) -> None:
    error = refused(source)
    assert error.key == key, str(error)
    for word in words:
        assert word in error.message, str(error)


@pytest.mark.parametrize(
    ("profile", "key", "owners"),
    [
        ("tasmota", "base_topic", "statestream, zigbee2mqtt"),
        ("zigbee2mqtt", "tele_prefix", "tasmota"),
        ("tasmota", "prefix", "esphome, shelly"),
        ("esphome", "component", "shelly"),
        ("shelly", "domains", "statestream"),
        ("zigbee2mqtt", "device_field", "json"),
    ],
)
def test_a_key_of_another_family_is_an_error_naming_it(profile: str, key: str, owners: str) -> None:
    error = refused({"profile": profile, "options": {key: "x"}})
    assert error.key == f"pipelines.p.source.options.{key}"
    assert f"unknown option {key!r} for device profile {profile!r}" in error.message
    assert f"({key!r} is an option of {owners})" in error.message, error.message


@pytest.mark.parametrize("key", ["topics", "device_field", "timestamp_field", "format", "availability_topic"])
@pytest.mark.parametrize("profile", ["zigbee2mqtt", "tasmota", "esphome", "shelly", "statestream"])
def test_json_source_keys_on_a_family_are_errors_naming_them(profile: str, key: str) -> None:
    value: Any = ["a/{device}"] if key == "topics" else "json" if key == "format" else "x"
    error = refused({"profile": profile, key: value})
    assert error.key == f"pipelines.p.source.{key}"
    assert "setting of the json profile" in error.message and profile in error.message


def test_options_on_the_json_source_are_refused_with_its_keys() -> None:
    error = refused({"topics": ["a/{device}"], "options": {"base_topic": "x"}})
    assert error.key == "pipelines.p.source.options.base_topic"
    assert "device_field" in error.message


@pytest.mark.parametrize("profile", ["zigbee3mqtt", "Tasmota", "", 5])
def test_an_unknown_profile_is_the_discriminators_error(profile: Any) -> None:
    error = refused({"profile": profile, "options": {"base_topic": "x"}})
    assert error.key == "pipelines.p.source.profile"
    assert f"unknown device profile {str(profile)!r}" in error.message
    assert "known: esphome, json, shelly, statestream, tasmota, zigbee2mqtt" in error.message


def test_check_names_the_option_of_a_family(tmp_path: Path) -> None:
    """The same error through load_config, as `edge-infer check` prints it."""
    from edge.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text(
        "models: {m: {path: m.onnx, task: regression}}\n"
        "pipelines:\n  p:\n    model: m\n    source: {profile: shelly, options: {tele_prefix: tele}}\n"
    )
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: pipelines.p.source.options.tele_prefix: unknown option")


@pytest.mark.parametrize(
    ("profile", "options", "message"),
    [
        (
            "tasmota",
            {"base_topic": "x"},
            "unknown option 'base_topic' for device profile 'tasmota' ('base_topic' is an option of "
            "statestream, zigbee2mqtt); known: tele_prefix, devices",
        ),
        (
            "zigbee2mqtt",
            {"base_topic": "a/#"},
            "option 'base_topic' of profile 'zigbee2mqtt': 'a/#' must be a non-empty topic prefix "
            "without wildcards or braces",
        ),
        (
            "json",
            {"topics": "a/{device}", "format": "xml"},
            "option 'format' of profile 'json' must be json or plain",
        ),
    ],
)
def test_the_api_raises_the_same_messages(profile: str, options: dict[str, Any], message: str) -> None:
    """devices.build_decoder / edge.families.build_decoder: a ValueError with the message alone."""
    with pytest.raises(ValueError, match=r"^(unknown )?option ") as err:
        build_decoder(profile, readings={"x": "power"}, options=options)
    assert str(err.value).startswith(message), str(err.value)


# --------------------------------------------------------------------------- the model's task


def test_the_task_is_a_literal_and_an_unknown_one_names_the_key() -> None:
    assert typing.get_args(Task) == ("classification", "regression", "anomaly")
    assert ModelSpec.__annotations__["task"] in ("Task", Task)
    with pytest.raises(ConfigError) as err:
        parse_config(config({"topics": ["a/{device}"]}, task="regresion"))
    assert err.value.key == "models.m.task"
    assert "'classification', 'regression' or 'anomaly'" in err.value.message
    assert "'regresion'" in err.value.message
