"""The daemon's fast paths give the same results as the plain ones: the event-loop choice,
the decoder's per-topic match cache, the float fast path of to_float, the list-based join."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from edge import decode
from edge.batcher import INPUT_BUDGET, batch_cap
from edge.cli import event_loop
from edge.config import ModelConfig
from edge.decode import DecodeError, RuleDecoder, json_rules, to_float
from edge.features import SnapshotJoin
from edge.outputs import PostProcessor, iso_ms, softmax


@pytest.fixture
def restore_policy() -> object:
    policy = asyncio.get_event_loop_policy()
    yield policy
    asyncio.set_event_loop_policy(policy)


def test_event_loop_choice(monkeypatch: pytest.MonkeyPatch, restore_policy: object) -> None:
    assert event_loop("asyncio") == "asyncio"
    monkeypatch.setenv("EDGE_INFER_LOOP", "asyncio")
    assert event_loop() == "asyncio"
    has_uvloop = importlib.util.find_spec("uvloop") is not None
    assert event_loop("auto") == ("uvloop" if has_uvloop else "asyncio")
    if has_uvloop:
        loop = asyncio.new_event_loop()
        try:
            assert type(loop).__module__.startswith("uvloop")
        finally:
            loop.close()


def test_event_loop_falls_back_without_uvloop(
    monkeypatch: pytest.MonkeyPatch, restore_policy: object, capsys: pytest.CaptureFixture[str]
) -> None:
    import builtins

    real_import = builtins.__import__

    def no_uvloop(name: str, *args: object, **kwargs: object) -> object:
        if name == "uvloop":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", no_uvloop)
    assert event_loop("uvloop") == "asyncio"
    assert "not installed" in capsys.readouterr().err


def test_to_float_fast_path_keeps_the_checks() -> None:
    assert to_float(2.5, "x") == 2.5
    assert to_float(3, "x") == 3.0
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(DecodeError, match="not_finite"):
            to_float(bad, "x")


def test_decoder_match_cache_is_bounded_and_transparent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decode, "MATCH_CACHE", 3)
    decoder = RuleDecoder(json_rules(["home/{device}/state"], {"t": "temp"}))
    for i in range(10):
        events = decoder.decode(f"home/d{i}/state", b'{"temp": 1.5}')
        assert [(e.device, e.values) for e in events] == [(f"d{i}", {"t": 1.5})]  # type: ignore[union-attr]
        assert decoder.decode("other/topic", b"{}") == []
        assert len(decoder._matched) <= 3


def test_snapshot_join_state_round_trip() -> None:
    join = SnapshotJoin(["a", "b"], max_age_s=5)
    join.update({"a": 1.0}, 10.0)
    state = join.to_state()
    other = SnapshotJoin(["a", "b"], max_age_s=5)
    other.load_state(state)
    assert other.missing() == ["b"]
    vector = other.update({"b": 2.0}, 11.0)
    assert vector is not None and vector.dtype.name == "float32" and vector.tolist() == [1.0, 2.0]
    other.reset()
    assert other.missing() == ["a", "b"] and other.nbytes() == 32


def test_batch_cap_by_input_size_unless_configured(tmp_path: Path) -> None:
    def model(shape: tuple[int, ...], **cfg: Any) -> Any:
        config = ModelConfig(path=tmp_path / "m.onnx", **cfg)
        return SimpleNamespace(config=config, spec=SimpleNamespace(sample_shape=shape))

    assert batch_cap(model((8,))) == 64  # small inputs: the default max_batch
    assert batch_cap(model((16, 3))) == 64
    assert batch_cap(model((1460, 1))) == INPUT_BUDGET // 1460  # the appliance CNN: 5
    assert batch_cap(model((100, 6))) == INPUT_BUDGET // 600
    assert batch_cap(model((100_000,))) == 1
    assert batch_cap(model((1460, 1), max_batch=64)) == 64  # configured: taken as is
    assert batch_cap(model((8,), max_batch=16)) == 16


def _old_iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def test_iso_ms_is_datetime_to_the_character() -> None:
    rng = np.random.default_rng(7)
    values = [0.0, 0.0005, 0.9995, 0.9999996, 1.0000004, 1764486000.0, 1764486000.9994999]
    values += rng.uniform(0, 4e9, 20_000).tolist()
    values += (1764486000 + rng.integers(0, 10**6, 5_000) / 1e6).tolist()  # microsecond grid
    values += (1764486000 + (rng.integers(0, 2000, 5_000) + 0.5) / 1e6).tolist()  # half-way cases
    for ts in values:
        assert iso_ms(ts) == _old_iso(ts), ts


@pytest.mark.parametrize("top_k", [0, 1, 2, 3, 5])
@pytest.mark.parametrize("instance", [None, "pi-2"])
def test_answers_are_byte_identical_to_json_dumps(top_k: int, instance: str | None) -> None:
    spec = SimpleNamespace(
        name="ff", version="1.2.0", task="classification", output_kind="logits", labels=("idle", "hé", 'x"y')
    )
    output = SimpleNamespace(top_k=top_k, min_confidence=0.5)
    post = PostProcessor(spec, output)  # type: ignore[arg-type]
    rng = np.random.default_rng(3)
    raw = (rng.normal(size=(500, 3)) * rng.choice([0.1, 1, 30], size=(500, 1))).astype(np.float32)
    raw[7] = [np.nan, 0, 0]
    raw[8] = [1, 1, 1]  # ties
    predictions = post(raw)
    for n, prediction in enumerate(predictions):
        row = softmax(raw[n : n + 1])[0]
        best = int(np.argsort(-row)[0])
        confidence = float(row[best])
        fields: dict[str, Any] = {
            "label": spec.labels[best] if confidence >= 0.5 else None,
            "confidence": round(confidence, 4),
        }
        if top_k:
            fields["top_k"] = [
                {"label": spec.labels[int(i)], "p": round(float(row[int(i)]), 4)}
                for i in np.argsort(-row)[:top_k]
            ]
        if math.isnan(confidence):  # not finite: null, answers are strict JSON
            assert prediction.fields["confidence"] is None and prediction.fields["label"] is None
        else:
            assert prediction.fields == fields
        latency = float(rng.uniform(0, 50)) if n != 9 else math.nan
        ts = float(1764486000 + rng.uniform(0, 1e5))
        shown = round(latency, 3) if math.isfinite(latency) else None
        body = {**prediction.fields, "model": "ff", "model_version": "1.2.0", "latency_ms": shown}
        body["ts"] = _old_iso(ts)
        if instance is not None:
            body["instance"] = instance
        encoded = post.answer(prediction, latency, ts, instance)
        assert encoded == json.dumps(body, allow_nan=False).encode()
        json.loads(encoded, parse_constant=_no_constant)  # strict JSON: no NaN/Infinity


def _no_constant(name: str) -> None:
    raise AssertionError(f"{name} in an answer")


def test_ten_thousandths_equal_round() -> None:
    from edge.outputs import _ten_thousandths

    rng = np.random.default_rng(11)
    values = np.concatenate(
        [
            rng.uniform(0, 1, 200_000),
            np.arange(1, 32, 2) / 32,  # exact ties at the 5th decimal: 0.03125, ...
            [0.0, 1.0, 0.00005, 0.99995, 1e-9, 0.5],
        ]
    ).astype(np.float32)
    rows = _ten_thousandths(values.reshape(-1, 1))
    assert rows is not None
    for value, row in zip(values.tolist(), rows, strict=True):
        assert row is not None and row[0] / 10000 == round(value, 4), value
    odd = np.array([[0.5, 1.5], [-0.1, 0.2], [np.nan, 0.1], [np.inf, 0.0]], dtype=np.float32)
    assert _ten_thousandths(odd) == [None, None, None, None]
    assert _ten_thousandths(odd.astype(np.float64)) is None


def test_probability_outputs_out_of_range_fall_back_to_json_dumps() -> None:
    spec = SimpleNamespace(
        name="m", version="1", task="classification", output_kind="probabilities", labels=("a", "b")
    )
    post = PostProcessor(spec, SimpleNamespace(top_k=2, min_confidence=0.0))  # type: ignore[arg-type]
    raw = np.array([[0.25, 0.75], [1.5, -0.5], [np.inf, 0.0]], dtype=np.float32)
    for prediction, row in zip(post(raw), raw.tolist(), strict=True):
        order = sorted(range(2), key=lambda i: -row[i])

        def shown(value: float) -> float | None:  # infinite as null: answers are strict JSON
            return round(value, 4) if math.isfinite(value) else None

        fields = {
            "label": spec.labels[order[0]],
            "confidence": shown(row[order[0]]),
            "top_k": [{"label": spec.labels[i], "p": shown(row[i])} for i in order],
        }
        assert prediction.fields == fields
        body = {**fields, "model": "m", "model_version": "1", "latency_ms": 1.5, "ts": _old_iso(1e9)}
        assert post.answer(prediction, 1.5, 1e9) == json.dumps(body, allow_nan=False).encode()
