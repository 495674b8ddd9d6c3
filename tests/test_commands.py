"""Correction commands: validated like any input, flood rate-limited and counted."""

from __future__ import annotations

from typing import Literal

from edge.commands import (
    Command,
    CommandValidator,
    PipelineCommands,
    Refusal,
    button_discovery,
    command_filters,
    select_discovery,
)
from edge.decode import TopicPattern


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _validator(clock: Clock | None = None) -> CommandValidator:
    return CommandValidator(
        "edge",
        {
            "appliance": PipelineCommands(("kettle", "toaster"), {"plug1", "plug2"}),
            "leak": PipelineCommands(("ok", "leak"), {"sink"}, buttons=True),
        },
        clock=clock or Clock(),
    )


def test_accepted_commands() -> None:
    v = _validator()
    assert v.check("edge/appliance/plug1/correct/set", b"kettle") == Command(
        "correct", "appliance", "plug1", "kettle"
    )
    assert v.check("edge/appliance/plug2/correct/set", b"none of these").label == "none of these"  # type: ignore[union-attr]
    assert v.check("edge/leak/sink/false_alarm/press", b"PRESS") == Command(
        "false_alarm", "leak", "sink", None
    )
    assert v.check("edge/leak/sink/missed/press", b"PRESS") == Command("missed", "leak", "sink", None)
    assert v.check("edge/appliance/retrain/press", b"PRESS") == Command("retrain", "appliance", None, None)
    assert v.accepted == 5 and sum(v.refused.values()) == 0


def test_refusals_name_their_reason_and_are_counted() -> None:
    v = _validator()
    cases = {
        ("edge/appliance/plug1/correct/set", b"x" * 257): "too_large",
        ("other/appliance/plug1/correct/set", b"kettle"): "bad_topic",
        ("edge/appliance/plug1/correct/get", b"kettle"): "bad_topic",
        ("edge/appliance/plug1/x/correct/set", b"kettle"): "bad_topic",
        ("edge/nope/plug1/correct/set", b"kettle"): "unknown_pipeline",
        ("edge/appliance/plug9/correct/set", b"kettle"): "unknown_device",
        ("edge/appliance/plug1/false_alarm/press", b"PRESS"): "not_supported",
        ("edge/appliance/plug1/correct/set", b"\xff\xfe"): "not_utf8",
        ("edge/appliance/plug1/correct/set", b"fridge"): "unknown_label",
        ("edge/appliance/retrain/press", b"now"): "bad_payload",
    }
    for (topic, payload), reason in cases.items():
        result = v.check(topic, payload)
        assert isinstance(result, Refusal) and result.reason == reason, (topic, result)
        assert topic[:40] in result.detail, result.detail
    assert v.accepted == 0
    assert sum(v.refused.values()) == len(cases)
    assert v.refused["bad_topic"] == 3 and v.refused["unknown_label"] == 1


def test_flood_of_10000_a_second_is_refused_and_counted_per_pipeline() -> None:
    clock = Clock()
    v = _validator(clock)
    results = []
    for i in range(10_000):  # 10,000 commands in one simulated second
        clock.t = i / 10_000
        results.append(v.check("edge/appliance/plug1/correct/set", b"kettle"))
    accepted = sum(isinstance(r, Command) for r in results)
    # burst 20 plus 2/s over the second
    assert accepted == 21
    assert v.refused["rate_limited"] == 10_000 - 21
    # the other pipeline is not starved by the flood
    assert isinstance(v.check("edge/leak/sink/missed/press", b"PRESS"), Command)
    # and the flooded one recovers at its rate
    clock.t = 1.0 + 0.5
    assert isinstance(v.check("edge/appliance/plug1/correct/set", b"toaster"), Command)


def test_filters_match_every_command_topic() -> None:
    filters = [TopicPattern(f) for f in command_filters("edge")]
    for topic in (
        "edge/appliance/plug1/correct/set",
        "edge/leak/sink/false_alarm/press",
        "edge/leak/sink/missed/press",
        "edge/appliance/retrain/press",
    ):
        assert any(p.match(topic) is not None for p in filters), topic
    assert not any(p.match("edge/appliance/plug1/prediction") is not None for p in filters)


def test_discovery_configs_point_at_the_validated_topics() -> None:
    v = _validator()
    sel = select_discovery(
        base_topic="edge",
        pipeline="appliance",
        device="plug1",
        labels=("kettle", "toaster"),
        availability_topic="edge/status",
        unique_prefix="ei",
    )
    assert sel["platform"] == "select" and sel["options"] == ["kettle", "toaster", "none of these"]
    assert sel["entity_category"] == "config" and sel["availability"][0]["topic"] == "edge/status"
    for option in sel["options"]:
        assert isinstance(v.check(sel["command_topic"], option.encode()), Command)
    actions: tuple[tuple[Literal["false_alarm", "missed", "retrain"], str | None], ...] = (
        ("false_alarm", "sink"),
        ("missed", "sink"),
        ("retrain", None),
    )
    for action, device in actions:
        btn = button_discovery(
            base_topic="edge",
            pipeline="leak",
            action=action,
            device=device,
            availability_topic="edge/status",
            unique_prefix="ei",
        )
        assert btn["platform"] == "button" and btn["entity_category"] in {"config", "diagnostic"}
        assert isinstance(v.check(btn["command_topic"], btn["payload_press"].encode()), Command)
    ids = {sel["unique_id"]} | {
        button_discovery(
            base_topic="edge",
            pipeline="leak",
            action=a[0],
            device="sink",
            availability_topic="s",
            unique_prefix="ei",
        )["unique_id"]
        for a in actions[:2]
    }
    assert len(ids) == 3
