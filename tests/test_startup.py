"""Start-up correctness: ``check`` refuses everything ``run`` would refuse, both exit 2 with the
key named and never a traceback; secrets are read with bounds and never printed; relative secret
paths resolve against the config's folder; hostile YAML (alias bombs, deep nesting, huge
integers, non-UTF-8) is refused in bounded time and memory with a bounded message."""

from __future__ import annotations

import copy
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from edge.config import ConfigError, load_config, mask_url, parse_config
from tests.broker import free_port
from tests.harness import ROOT, run_cli, write_config
from tests.onnx_models import snapshot_classifier

FEATURES = ["temperature", "humidity"]
SECRET = "s3cret-Pw-never-printed"


def base(tmp_path: Path, port: int | None = None) -> dict[str, Any]:
    """A valid config whose broker does not answer (nothing listens on the port)."""
    if not (tmp_path / "m.onnx").exists():
        snapshot_classifier(tmp_path / "m.onnx", FEATURES, ["a", "b"])
    return {
        "mqtt": {
            "url": f"mqtt://127.0.0.1:{port or free_port()}",
            "base_topic": "st/ei",
            "reconnect_min_s": 0.1,
            "reconnect_max_s": 0.2,
        },
        "models": {"m": {"path": "m.onnx"}},
        "pipelines": {"p": {"model": "m", "source": {"topics": ["st/z2m/{device}"]}}},
        "homeassistant": {"enabled": False},
    }


def run_until_started(
    config: Path, timeout: float = 30.0, env: dict[str, str] | None = None
) -> tuple[int, str]:
    """``edge-infer run`` until it exits, or until it is past start-up (it tries the broker, which
    does not answer); then SIGTERM. Returns (exit status, output); started runs exit 0."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge.cli", "run", "-c", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        for line in proc.stdout:
            lines.append(line)
            if "unavailable" in line:  # the link tried to connect: start-up is done
                proc.send_signal(signal.SIGTERM)
            if time.monotonic() > deadline:
                proc.kill()
        rc = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return rc, "".join(lines)


def check(config: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_cli("check", "-c", str(config), env=env)


def assert_refused(config: Path, key: str, env: dict[str, str] | None = None) -> None:
    """``check`` and ``run`` both exit 2 naming ``key``, without a traceback."""
    done = check(config, env)
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert key in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    rc, out = run_until_started(config, env=env)
    assert rc == 2, (rc, out)
    assert key in out and "Traceback" not in out, out


def test_the_base_config_is_accepted_by_check_and_run(tmp_path: Path) -> None:
    path = write_config(base(tmp_path), tmp_path / "ok.yaml")
    done = check(path)
    assert done.returncode == 0, done.stderr
    rc, out = run_until_started(path)
    assert rc == 0, out


def test_missing_password_file_and_unset_password_env(tmp_path: Path) -> None:
    data = base(tmp_path)
    data["mqtt"]["password_file"] = "no-such-secret"
    assert_refused(write_config(data, tmp_path / "pf.yaml"), "mqtt.password_file")
    data = base(tmp_path)
    data["mqtt"]["password_env"] = "EDGE_INFER_TEST_UNSET_PW"
    os.environ.pop("EDGE_INFER_TEST_UNSET_PW", None)
    assert_refused(write_config(data, tmp_path / "pe.yaml"), "mqtt.password_env")


def test_relative_secret_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    (folder / "pw").write_text(SECRET + "\n")
    data = base(folder)
    data["mqtt"]["password_file"] = "pw"
    data["mqtt"]["tls"] = {"ca_file": "ca.pem"}
    config = load_config(write_config(data, folder / "c.yaml"))
    assert config.mqtt.password_file == folder / "pw"
    assert config.mqtt.resolved_password() == SECRET
    assert config.mqtt.tls is not None and config.mqtt.tls.ca_file == folder / "ca.pem"
    # `check` from another working directory (systemd runs with cwd /) finds the same file.
    done = subprocess.run(
        [sys.executable, "-m", "edge.cli", "check", "-c", str(folder / "c.yaml")],
        capture_output=True,
        text=True,
        cwd="/",
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


def test_special_files_are_refused_for_secrets_state_and_models(tmp_path: Path) -> None:
    data = base(tmp_path)
    data["mqtt"]["password_file"] = "/dev/zero"
    assert_refused(write_config(data, tmp_path / "a.yaml"), "mqtt.password_file")
    data = base(tmp_path)
    data["state"] = {"file": "/dev/zero"}
    assert_refused(write_config(data, tmp_path / "b.yaml"), "state.file")
    data = base(tmp_path)
    data["models"]["m"]["path"] = "/proc/self/mem"
    assert_refused(write_config(data, tmp_path / "c.yaml"), "models.m.path")
    big = tmp_path / "big-secret"
    big.write_bytes(b"x" * (1 << 20))
    data = base(tmp_path)
    data["mqtt"]["password_file"] = str(big)
    with pytest.raises(ConfigError, match="larger than"):
        load_config(write_config(data, tmp_path / "d.yaml")).mqtt.resolved_password()


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("client_id", "c" * 70_000, "mqtt.client_id"),
        ("base_topic", "t" * 70_000, "mqtt.base_topic"),
        ("base_topic", "home\x01ei", "mqtt.base_topic"),
        ("base_topic", "home\u0085ei", "mqtt.base_topic"),
        ("client_id", "id\x00x", "mqtt.client_id"),
        ("session_expiry_s", 2**32, "mqtt.session_expiry_s"),
    ],
)
def test_protocol_limits_are_config_errors(tmp_path: Path, key: str, value: Any, named: str) -> None:
    data = base(tmp_path)
    data["mqtt"][key] = value
    assert_refused(write_config(data, tmp_path / "c.yaml"), named)


def test_the_longest_allowed_values_start(tmp_path: Path) -> None:
    data = base(tmp_path)
    data["mqtt"]["session_expiry_s"] = 2**32 - 1
    data["mqtt"]["client_id"] = "c" * 1000
    path = write_config(data, tmp_path / "c.yaml")
    assert check(path).returncode == 0
    rc, out = run_until_started(path)
    assert rc == 0, out


def test_a_metrics_port_in_use_is_refused_by_check_and_run(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        data = base(tmp_path)
        data["metrics"] = {"enabled": True, "port": taken.getsockname()[1]}
        assert_refused(write_config(data, tmp_path / "c.yaml"), "metrics.port")


def test_unknown_json_source_options_are_refused(tmp_path: Path) -> None:
    data = base(tmp_path)
    data["pipelines"]["p"]["source"]["options"] = {"device_path": "id"}
    path = write_config(data, tmp_path / "c.yaml")
    assert_refused(path, "pipelines.p.source.options.device_path")
    assert "device_field" in check(path).stderr  # lists what to use instead


def test_unknown_profile_options_name_the_key_and_list_known(tmp_path: Path) -> None:
    data = base(tmp_path)
    data["pipelines"]["p"]["source"] = {"profile": "zigbee2mqtt", "options": {"device_path": "x"}}
    data["pipelines"]["p"]["inputs"] = {"temperature": "temperature", "humidity": "humidity"}
    done = check(write_config(data, tmp_path / "c.yaml"))
    assert done.returncode == 2, done.stderr
    assert "pipelines.p.source" in done.stderr and "'device_path'" in done.stderr, done.stderr
    assert "known: base_topic" in done.stderr, done.stderr


# --------------------------------------------------------------------------- hostile YAML


def _text_refused(tmp_path: Path, text: str | bytes, expect: str) -> str:
    path = tmp_path / "hostile.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    done = check(path)
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert expect in done.stderr, done.stderr[-2000:]
    assert len(done.stderr) < 5000, len(done.stderr)
    rc, out = run_until_started(path)
    assert rc == 2 and "Traceback" not in out, out[-3000:]
    return done.stderr


def test_a_config_that_is_not_utf8(tmp_path: Path) -> None:
    _text_refused(tmp_path, b"mqtt:\n  base_topic: caf\xe9\n", "not UTF-8")


def test_deep_flow_nesting(tmp_path: Path) -> None:
    _text_refused(tmp_path, "models: " + "[" * 20_000 + "]" * 20_000 + "\n", "nested deeper")


def test_a_5000_digit_integer(tmp_path: Path) -> None:
    _text_refused(tmp_path, "mqtt:\n  keepalive: " + "9" * 5000 + "\n", "digits")


def _bomb(levels: int, width: int = 9) -> str:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * width) + "]")
    lines.append(f"models: *a{levels}")
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused_in_bounded_memory(tmp_path: Path) -> None:
    # Nine levels of nine: 387 million strings once expanded (1.5 GB and 16 s before the bound).
    _text_refused(tmp_path, _bomb(9), "aliases")


def test_a_six_level_alias_bomb_gives_a_short_message(tmp_path: Path) -> None:
    # Six levels of nine: 54 aliases, half a million values; validating it quoted 500 KB of input.
    message = _text_refused(tmp_path, _bomb(6), "aliases are expanded")
    assert len(message) < 5000


def test_error_messages_quote_a_bounded_part_of_the_input(tmp_path: Path) -> None:
    data = base(tmp_path)
    data["mqtt"]["keepalive"] = "k" * 100_000
    data["pipelines"]["p" * 50_000] = data["pipelines"].pop("p")
    data["pipelines"]["p" * 50_000]["modle"] = "m"
    _text_refused(tmp_path, yaml.safe_dump(data), "mqtt.keepalive")


def test_a_special_file_as_config_is_refused(tmp_path: Path) -> None:
    done = check(Path("/dev/zero"))
    assert done.returncode == 2 and "not a regular file" in done.stderr, done.stderr
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (2 << 20) + "\n")
    done = check(big)
    assert done.returncode == 2 and "larger than" in done.stderr, done.stderr


# --------------------------------------------------------------------------- secrets in output


def test_check_masks_the_password_of_every_url_it_prints(tmp_path: Path) -> None:
    data = base(tmp_path)
    path = write_config(data, tmp_path / "c.yaml")
    port = data["mqtt"]["url"].rsplit(":", 1)[1]
    url = f"mqtt://edge:{SECRET}@127.0.0.1:{port}"
    for args, env in (
        (("--mqtt-url", url), None),
        ((), {"EDGE_INFER_MQTT_URL": url}),
    ):
        done = run_cli("check", "-c", str(path), *args, env=env)
        assert done.returncode == 0, done.stderr
        assert SECRET not in done.stdout + done.stderr
        assert "edge:***@127.0.0.1" in done.stdout, done.stdout
    for bad in (f"mqtt://edge:{SECRET}@127.0.0.1:99999", f"http://edge:{SECRET}@127.0.0.1:1883"):
        done = run_cli("check", "-c", str(path), "--mqtt-url", bad)
        assert done.returncode == 2 and "mqtt.url" in done.stderr, done.stderr
        assert SECRET not in done.stdout + done.stderr, done.stderr


def test_simulate_masks_the_password(mosquitto: Any) -> None:
    url = mosquitto.url.replace("mqtt://", f"mqtt://edge:{SECRET}@")
    done = run_cli("simulate", "--mqtt-url", url, "--duration", "0.5", "--speed", "10", "--devices", "1")
    assert SECRET not in done.stdout + done.stderr, done.stderr
    assert "edge:***@" in done.stderr, done.stderr
    bad = run_cli("simulate", "--mqtt-url", f"http://edge:{SECRET}@h:1", "--duration", "0.1")
    assert bad.returncode != 0 and SECRET not in bad.stdout + bad.stderr, bad.stderr


def test_mask_url_forms() -> None:
    assert mask_url("mqtt://u:p@h:1") == "mqtt://u:***@h:1"
    assert mask_url("mqtt://h:1") == "mqtt://h:1"
    assert mask_url("mqtt://u@h:1") == "mqtt://u@h:1"
    assert "p4ss" not in mask_url("mqtt://u:p4ss@h:99999999")
    assert "p4ss" not in mask_url("mqtt://u:p4ss@[::1")


# --------------------------------------------------------------------------- identity


def test_default_client_and_instance_ids_differ_per_config_and_are_stable(tmp_path: Path) -> None:
    one = write_config(base(tmp_path), tmp_path / "one.yaml")
    two = write_config(base(tmp_path), tmp_path / "two.yaml")
    first, again, other = load_config(one), load_config(one), load_config(two)
    assert first.mqtt.client_id == again.mqtt.client_id
    assert first.homeassistant.instance_id == again.homeassistant.instance_id
    assert first.mqtt.client_id != other.mqtt.client_id
    assert first.homeassistant.instance_id != other.homeassistant.instance_id
    assert (first.mqtt.client_id or "").startswith(f"edge-infer-{socket.gethostname()[:20]}")
    data = base(tmp_path)
    data["mqtt"]["base_topic"] = "elsewhere"
    moved = load_config(write_config(data, one))
    assert moved.mqtt.client_id != first.mqtt.client_id  # base topic is part of the identity
    pinned = copy.deepcopy(data)
    pinned["mqtt"]["client_id"] = "mine"
    pinned["homeassistant"] = {"instance_id": "default", "enabled": False}
    kept = parse_config(pinned, "x.yaml")
    assert kept.mqtt.client_id == "mine" and kept.homeassistant.instance_id == "default"


def test_yaml_dump_of_hostile_strings_round_trips() -> None:
    # The fuzz tests write configs with yaml.safe_dump; control characters survive as escapes.
    text = yaml.safe_dump({"mqtt": {"base_topic": "a\x01b"}})
    assert yaml.safe_load(text)["mqtt"]["base_topic"] == "a\x01b"


# --------------------------------------------------------------------------- persistent sessions


def test_filters_a_config_no_longer_has_are_dropped_from_its_persistent_session(
    mosquitto: Any, topic_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same config file (so the same derived client id) restarted with another topic: the
    broker session still holds the old filter, and its messages reached the daemon as
    ``unrouted``. The link remembers what it subscribed and drops the rest at connect."""
    from tests.harness import DaemonThread, Publisher

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    p = topic_prefix
    data = base(tmp_path)
    data["mqtt"].update({"url": mosquitto.url, "base_topic": f"{p}/ei", "session_expiry_s": 300})
    data["pipelines"]["p"]["source"]["topics"] = [f"{p}/old/{{device}}"]
    path = write_config(data, tmp_path / "edge.yaml")
    first = load_config(path)
    with DaemonThread(first):
        pass
    data["pipelines"]["p"]["source"]["topics"] = [f"{p}/new/{{device}}"]
    second = load_config(write_config(data, path))
    assert second.mqtt.client_id == first.mqtt.client_id  # same config: same broker session
    pub = Publisher(mosquitto.url)
    try:
        with DaemonThread(second) as running:
            for i in range(5):
                pub.send(f"{p}/old/dev{i}", {"temperature": 20, "humidity": 40})
            pub.send(f"{p}/new/dev", {"temperature": 20, "humidity": 40})
            deadline = time.monotonic() + 10
            daemon = running.daemon
            assert daemon is not None
            while running.call(lambda: daemon.messages_in) < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)  # old-topic messages, were they routed to us, would have come first
            assert running.call(lambda: daemon.messages_in) >= 1
            assert running.call(lambda: daemon.unrouted) == 0
    finally:
        pub.close()
    records = list((tmp_path / "xdg" / "edge-infer").glob("subscriptions-*.json"))
    assert len(records) == 1, records
    assert f"{p}/new/+" in records[0].read_text() and f"{p}/old/+" not in records[0].read_text()


def test_restore_ignores_special_and_oversized_state_files(tmp_path: Path) -> None:
    """The state file can change after start-up checked it: restore reads it bounded too."""
    from edge import statefile
    from tests.test_statefile import _pipelines

    pipelines = _pipelines(tmp_path)
    report = statefile.restore(Path("/dev/zero"), pipelines)  # unbounded before: grew past 1.4 GB
    assert report.problem == "not a regular file"
    big = tmp_path / "state.json"
    big.write_bytes(b" " * 2048)
    report = statefile.restore(big, pipelines, max_bytes=1024)
    assert report.problem is not None and "larger than 1024" in report.problem


def test_cluster_members_share_the_entity_ids_but_not_the_client_id(tmp_path: Path) -> None:
    ids = set()
    clients = set()
    for folder, instance in (("a", "one"), ("b", "two")):
        (tmp_path / folder).mkdir()
        data = base(tmp_path / folder)
        data["cluster"] = {"enabled": True, "instance": instance}
        config = load_config(write_config(data, tmp_path / folder / "edge.yaml"))
        ids.add(config.homeassistant.instance_id)
        clients.add(config.instance_mqtt().resolved_client_id())
    assert len(ids) == 1, ids  # configs at different paths, one shared set of entities
    assert len(clients) == 2 and all(c.endswith(("-one", "-two")) for c in clients), clients
