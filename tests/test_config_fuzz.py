"""Property-based fuzzing of the config loader: whatever YAML a user writes, the loader either
returns a validated config or raises :class:`ConfigError` naming the key (or the YAML position);
nothing else escapes, and the message never echoes a secret."""

from __future__ import annotations

import ast
import copy
import math
import os
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


# --------------------------------------------------------------------------- hostile YAML text

_hostile_scalars = st.one_of(
    st.integers(min_value=-(10**60), max_value=10**60).map(str),
    st.text(
        st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=["Cs"]), max_size=12
    ).map(lambda t: yaml.safe_dump(t, default_style='"').strip().removesuffix("...").strip()),
    st.sampled_from(["9" * 5000, "1e400", "-0x" + "f" * 60, "*nope", "&a x", "!!python/object:os.system"]),
)


@st.composite
def hostile_yaml(draw: st.DrawFn) -> str:
    """Deep flow nesting, alias chains, huge integers and control characters around a config."""
    kind = draw(st.sampled_from(["deep", "aliases", "scalar", "mixed"]))
    if kind == "deep":
        depth = draw(st.integers(10, 30_000))
        opener = draw(st.sampled_from(["[", "{a: "]))
        closer = "]" if opener == "[" else "}"
        return "models: " + opener * depth + "1" + closer * depth + "\n"
    if kind == "aliases":
        levels = draw(st.integers(1, 12))
        width = draw(st.integers(1, 12))
        lines = ["a0: &a0 [x, y]"]
        for i in range(1, levels + 1):
            lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
        lines.append(f"{draw(st.sampled_from(['models', 'pipelines', 'mqtt']))}: *a{levels}")
        return "\n".join(lines) + "\n"
    value = draw(_hostile_scalars)
    key = draw(st.sampled_from(["keepalive", "base_topic", "client_id", "session_expiry_s", "url"]))
    text = yaml.safe_dump(BASE)
    return (
        text + f"extra_{kind}: 1\n"
        if kind == "mixed"
        else text.replace("mqtt:\n", f"mqtt:\n  {key}: {value}\n", 1)
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(hostile_yaml())
def test_hostile_yaml_is_a_bounded_config_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    message = ""
    try:
        load_config(path)
    except ConfigError as exc:
        message = str(exc)
    assert len(message) < 5000, len(message)
    assert SECRET not in message


# --------------------------------------------------------------------------- check and run agree

STARTUP_MUTATIONS: list[tuple[tuple[str, ...], Any]] = [
    (("mqtt", "client_id"), st.text(max_size=8) | st.just("c" * 70_000) | st.just("a\x85b")),
    (("mqtt", "base_topic"), st.text(max_size=8) | st.just("t" * 70_000) | st.just("a\x01b")),
    (("mqtt", "session_expiry_s"), st.sampled_from([0, 2**32 - 1, 2**32, -1, 10**50])),
    (("mqtt", "password_file"), st.sampled_from(["/dev/zero", "missing.pw", "pw.txt", "/proc/self/mem"])),
    (("mqtt", "password_env"), st.sampled_from(["EDGE_INFER_FUZZ_UNSET", "EDGE_INFER_FUZZ_SET"])),
    (("state", "file"), st.sampled_from(["/dev/zero", "state.json", "/dev/null"])),
    (("metrics",), st.sampled_from([{"enabled": True, "port": 0}, {"enabled": True, "port": "TAKEN"}])),
    (("models", "m", "path"), st.sampled_from(["m.onnx", "/proc/self/mem", "/dev/zero", "missing.onnx"])),
    (("mqtt", "keepalive"), st.sampled_from([5, 4, 65535, 65536])),
]


@st.composite
def startup_configs(draw: st.DrawFn) -> list[tuple[tuple[str, ...], Any]]:
    chosen = draw(
        st.lists(st.sampled_from(range(len(STARTUP_MUTATIONS))), min_size=1, max_size=3, unique=True)
    )
    return [(STARTUP_MUTATIONS[i][0], draw(STARTUP_MUTATIONS[i][1])) for i in chosen]


@pytest.fixture(scope="module")
def startup_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.test_startup import base

    folder = tmp_path_factory.mktemp("agree")
    base(folder)
    (folder / "pw.txt").write_text("pw\n")
    return folder


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(startup_configs())
def test_check_and_run_agree_on_generated_configs(
    startup_dir: Path, mutations: list[tuple[tuple[str, ...], Any]]
) -> None:
    """Both accept (run gets past start-up and tries the broker), or both exit 2 with the same
    key, never a traceback."""
    import socket
    import subprocess

    from tests.harness import start_cli, write_config
    from tests.test_startup import base, run_until_started

    data = base(startup_dir)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        for path, value in mutations:
            taken_port = {"enabled": True, "port": taken.getsockname()[1]}
            node: Any = data
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = taken_port if value == {"enabled": True, "port": "TAKEN"} else value
        if "password_env" in data["mqtt"] and "password_file" in data["mqtt"]:
            del data["mqtt"]["password_env"]
        config = write_config(data, startup_dir / "c.yaml")
        env = {"EDGE_INFER_FUZZ_SET": "pw"}
        os.environ.pop("EDGE_INFER_FUZZ_UNSET", None)
        # check and run are independent processes on the same files (check only stats the state
        # file and binds no port that run could hold): run them side by side, not one after the other
        checking = start_cli("check", "-c", str(config), env=env)
        try:
            rc, out = run_until_started(config, env=env)
            stdout, stderr = checking.communicate(timeout=60)
        finally:
            if checking.poll() is None:
                checking.kill()
                checking.wait()
        checked = subprocess.CompletedProcess(checking.args, checking.returncode, stdout, stderr)
    assert "Traceback" not in checked.stderr + out, checked.stderr + out
    assert checked.returncode in (0, 2), checked.stderr
    assert (checked.returncode, rc) in ((0, 0), (2, 2)), (mutations, checked.stderr, out)
    if rc == 2:
        first = checked.stderr.strip().splitlines()[-1]
        assert first.split(": ")[2] in out, (first, out)
