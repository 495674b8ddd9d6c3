"""One TaskGroup owns the daemon's tasks: a failure in any of them stops the daemon with its error."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.broker import Mosquitto
from tests.harness import write_config
from tests.onnx_models import snapshot_classifier

pytestmark = pytest.mark.broker

# The real CLI in its own process, with one periodic task made to fail on its third run.
RUNNER = """
import sys
import edge.daemon as d
calls = []
def tick(self):
    calls.append(1)
    if len(calls) == 3:
        raise RuntimeError("injected fault in the bridge tick")
d.Daemon._bridge_tick = tick
sys.exit(d.cli_run(["-c", sys.argv[1]]))
"""


def _config(mosquitto: Mosquitto, topic_prefix: str, tmp_path: Path) -> Path:
    """A one-pipeline daemon whose bridge tick runs every 0.2 s."""
    snapshot_classifier(tmp_path / "model.onnx", ["t"], ["a", "b"], name="m")
    return write_config(
        {
            "mqtt": {
                "url": mosquitto.url,
                "base_topic": f"{topic_prefix}/ei",
                "client_id": f"ei-{topic_prefix}",
            },
            "models": {"m": {"path": "model.onnx"}},
            "pipelines": {"room": {"model": "m", "source": {"topics": [f"{topic_prefix}/in/{{device}}"]}}},
            "homeassistant": {"enabled": False},
            "bridge_info_interval_s": 0.2,
        },
        tmp_path / "config.yaml",
    )


def test_a_failing_periodic_task_stops_the_daemon_non_zero_with_its_error(
    mosquitto: Mosquitto, topic_prefix: str, tmp_path: Path
) -> None:
    config = _config(mosquitto, topic_prefix, tmp_path)
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, str(config)], capture_output=True, text=True, timeout=60
    )
    elapsed = time.monotonic() - started
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert (
        "task bridge failed, stopping the daemon: RuntimeError: injected fault in the bridge tick"
        in proc.stderr
    )
    assert "Traceback" in proc.stderr  # the log carries where it failed
    assert "edge-infer: stopped by an error: RuntimeError: injected fault" in proc.stderr
    assert elapsed < 50  # it stopped by itself, long before the timeout


def test_the_same_daemon_without_the_fault_runs_until_stopped(
    mosquitto: Mosquitto, topic_prefix: str, tmp_path: Path
) -> None:
    """The control: with a bridge tick that works, the daemon is still running after 3 ticks."""
    config = _config(mosquitto, topic_prefix, tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge.cli", "run", "-c", str(config)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(4)
        assert proc.poll() is None
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "failed, stopping the daemon" not in err
