"""Property-based fuzzing of the config loader: whatever YAML a user writes, the loader either
returns a validated config or raises :class:`ConfigError` naming the key (or the YAML position);
nothing else escapes, and the message never echoes a secret."""

from __future__ import annotations

import ast
import copy
import math
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.config import Config, ConfigError, config_warnings, load_config, parse_config
from tests.test_core import VALID

SECRET = "hunter2-do-not-log"

BASE: dict[str, Any] = copy.deepcopy(VALID)
BASE["mqtt"].update({"username": "edge", "password": SECRET, "base_topic": "ei", "keepalive": 30})
BASE["pipelines"]["p"]["output"] = {"topic": "out/{device}", "qos": 1, "min_confidence": 0.5}
BASE["pipelines"]["p"]["homeassistant"] = {"name": "Room"}
BASE["limits"] = {"max_payload_bytes": 4096}

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(["{device}", "a/#", "+", "$share/g/x", "mqtt://h:1", "../../etc/passwd", "1e309", ""]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in the document a mutation can hit."""
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, child in node.items():
            out += _paths(child, (*prefix, key))
    elif isinstance(node, list):
        for i, child in enumerate(node):
            out += _paths(child, (*prefix, i))
    return out


ALL_PATHS = _paths(BASE)


@st.composite
def mutated(draw: st.DrawFn) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(1, 4))):
        paths = _paths(data)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent: Any = data
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(values)
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=12))] = draw(values)
    return data


def _check_error(exc: ConfigError, data: Any) -> None:
    text = str(exc)
    assert text.strip(), "an empty error message"
    assert SECRET not in text, f"the error echoes the password: {text}"
    if exc.key:
        assert isinstance(data, dict)
        head = _head(exc.key)
        assert head in data or head in Config.model_fields, f"{exc.key!r} names no key of {sorted(data)}"


def _head(key: str) -> str:
    """The first segment of a dotted key; quoted segments (``['a.b']``) are unquoted."""
    if key.startswith("["):
        return str(ast.literal_eval(key[1 : key.index("]", key.index(key[1], 2))]))
    return re.split(r"[.\[]", key, maxsplit=1)[0]


@settings(max_examples=1200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_configs_load_or_name_the_key(data: dict[str, Any]) -> None:
    try:
        config = parse_config(data, "fuzz.yaml")
    except ConfigError as exc:
        _check_error(exc, data)
        return
    # Accepted: the result is a coherent config that the rest of the daemon can rely on.
    assert config.pipelines, "a config without pipelines was accepted"
    for name, pipeline in config.pipelines.items():
        assert pipeline.model in config.models, f"pipelines.{name}.model points nowhere"
    assert 5 <= config.mqtt.keepalive <= 65535
    for model in config.models.values():
        assert model.max_batch >= 1
    for warning in config_warnings(config):
        assert SECRET not in warning


@settings(max_examples=300, deadline=None)
@given(values)
def test_any_yaml_document_is_a_config_or_a_config_error(data: Any) -> None:
    try:
        parse_config(data, "fuzz.yaml")
    except ConfigError as exc:
        message = str(exc)
        assert message.strip()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_arbitrary_file_text_is_a_config_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        load_config(path)
    except ConfigError as exc:
        message = str(exc)
        assert str(path) in message, message  # names the file
    else:
        raise AssertionError(f"random text accepted as a config: {text!r}")


def test_yaml_errors_name_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(BASE) + "pipelines: [\n")
    with pytest.raises(ConfigError, match=r"line \d+, column \d+"):
        load_config(path)


def test_odd_key_names_are_quoted_in_errors() -> None:
    data = copy.deepcopy(BASE)
    data["pipelines"]["a.b"] = data["pipelines"].pop("p")
    data["pipelines"]["a.b"]["modle"] = "m"
    with pytest.raises(ConfigError) as caught:
        parse_config(data, "odd.yaml")
    assert caught.value.key == "pipelines['a.b'].modle", caught.value.key


def test_non_finite_numbers_are_refused_by_key() -> None:
    for key, parent in (("min_confidence", ("pipelines", "p", "output")), ("keepalive", ("mqtt",))):
        data = copy.deepcopy(BASE)
        node: Any = data
        for part in parent:
            node = node[part]
        node[key] = math.nan
        with pytest.raises(ConfigError) as caught:
            parse_config(data, "nan.yaml")
        assert caught.value.key == ".".join((*parent, key)), caught.value.key
