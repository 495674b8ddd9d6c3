"""Quality in a real Home Assistant Core (skipped without EDGE_INFER_HA_VENV, like
tests/test_ha_real.py, whose fixtures it uses): a model deployed with its quality record
(edge/quality.py) gets, on the bridge device, the "confusion matrix" MQTT image, whose bytes Home
Assistant's image proxy serves exactly as the renderer made them, and the "training examples" and
"trained" sensors with states; after the model file is replaced (a hot reload) Home Assistant
serves the new model's matrix; its log has no MQTT warning."""

from __future__ import annotations

import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from edge.discovery_payloads import BridgeInfo
from edge.learn import deploy
from edge.png import render_confusion
from edge.quality import QualityRecord, learn_record, sidecar_path, write_sidecar
from edge.runtime import file_sha256
from tests.broker import Mosquitto
from tests.harness import DaemonThread, Publisher, make_config
from tests.onnx_models import snapshot_classifier
from tests.test_ha_real import (
    HomeAssistant,
    _clear_discovery,
    _mqtt_problems,
    _small_config,
    home_assistant,  # noqa: F401 (the fixture)
)

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.timeout(600)]
LABELS = ["empty", "occupied"]


def record_for(model: Path, wrong: int) -> QualityRecord:
    truth = ["empty"] * 30 + ["occupied"] * 20
    predicted = ["empty"] * (30 - wrong) + ["occupied"] * wrong + ["occupied"] * 20
    return learn_record(
        metric="accuracy",
        scores={"accuracy": (50 - wrong) / 50, "macro_f1": 0.9},
        truth=truth,
        predicted=predicted,
        classes=LABELS,
        train_counts={"empty": 300, "occupied": 200},
        span={"start": "2026-11-01T00:00:00Z", "end": "2026-11-05T00:00:00Z"},
        model_sha256=file_sha256(model),
        trained_at=1_796_000_000.0,
    )


def expected_png(record: QualityRecord) -> bytes:
    assert record.confusion is not None
    return render_confusion(record.confusion.labels, record.confusion.counts, "occ holdout (n=50)")


def proxied(ha: HomeAssistant, entity_id: str) -> tuple[bytes, str] | None:
    """The image Home Assistant serves for ``entity_id`` through its image proxy, with the
    entity's own access token (its ``access_token`` state attribute)."""
    state = ha.states().get(entity_id)
    if state is None or state["state"] in ("unknown", "unavailable"):
        return None
    token = state["attributes"].get("access_token")
    url = f"http://127.0.0.1:{ha.port}/api/image_proxy/{entity_id}?token={token}"
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read(), response.headers.get("Content-Type", "")


def test_home_assistant_shows_the_models_quality_and_serves_its_confusion_png(
    home_assistant: HomeAssistant,  # noqa: F811 (the imported fixture)
    mosquitto: Mosquitto,
    topic_prefix: str,
    tmp_path: Path,
) -> None:
    data = _small_config(mosquitto.url, topic_prefix, tmp_path)
    data["reload"] = {"interval_s": 0.5}
    model = tmp_path / "occ.onnx"
    first = record_for(model, wrong=3)
    write_sidecar(sidecar_path(model), first)
    bridge_id = BridgeInfo(version="0", instance_id=topic_prefix).identifier
    pub = Publisher(mosquitto.url)
    try:
        with DaemonThread(make_config(data, tmp_path)) as runner:
            daemon = runner.daemon
            assert daemon is not None
            pub.send(f"{topic_prefix}/z2m/hall_sensor", {"temperature": 21, "co2": 900})

            def entities() -> dict[str, str] | None:
                listed = home_assistant.ws({"type": "config/entity_registry/list"})[0]
                prefix = f"{bridge_id}_model_occ_"
                mine = {e["unique_id"][len(prefix) :]: e["entity_id"] for e in listed
                        if e["unique_id"].startswith(prefix)}  # fmt: skip
                return mine if {"confusion", "examples", "trained"} <= set(mine) else None

            ids = home_assistant._wait(entities, "the quality entities in the registry", timeout=90)
            image = ids["confusion"]
            assert image.startswith("image."), ids
            served = home_assistant._wait(
                lambda: proxied(home_assistant, image), "the confusion image served", timeout=60
            )
            assert served == (expected_png(first), "image/png"), (len(served[0]), served[1])
            runner.call(daemon.publish_bridge_info)  # the sensors' states, without waiting for the tick

            def sensors() -> tuple[dict[str, Any], dict[str, Any]] | None:
                states = home_assistant.states()
                examples, trained = states.get(ids["examples"]), states.get(ids["trained"])
                if examples is None or trained is None or examples["state"] in ("unknown", "unavailable"):
                    return None
                return examples, trained

            examples, trained = home_assistant._wait(sensors, "the quality sensors with states", timeout=60)
            assert examples["state"] == "500", examples
            assert examples["attributes"]["empty"] == 300 and examples["attributes"]["occupied"] == 200
            assert trained["attributes"]["device_class"] == "timestamp", trained
            assert datetime.fromisoformat(trained["state"]) == datetime.fromisoformat(
                "2026-11-30T00:53:20+00:00"
            )

            # a new model with its own record: the daemon reloads it, Home Assistant serves its matrix
            candidate = tmp_path / "new.onnx"
            snapshot_classifier(candidate, ["temperature", "co2"], LABELS, name="occ", seed=4)
            second = record_for(candidate, wrong=9)
            record_file = write_sidecar(tmp_path / "new.quality.json", second)
            deploy.install(candidate, model, sidecars={deploy.QUALITY_SUFFIX: record_file})
            home_assistant._wait(
                lambda: (
                    (got := proxied(home_assistant, image)) is not None and got[0] == expected_png(second)
                ),
                "the new confusion image served",
                timeout=60,
            )
        problems = _mqtt_problems(home_assistant) + [
            line
            for line in home_assistant.log().splitlines()
            if (" WARNING " in line or " ERROR " in line) and "components.image" in line
        ]
        assert not problems, "\n".join(problems)
    finally:
        pub.close()
        _clear_discovery(mosquitto.url, bridge_id)
