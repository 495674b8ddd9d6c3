"""HeldInputs: the inputs held back while intake is paused, packed into one buffer."""

from __future__ import annotations

import pytest

from edge.mqtt import AckToken, HeldInputs


def _items(n: int) -> list[tuple[str, bytes, AckToken | None]]:
    out: list[tuple[str, bytes, AckToken | None]] = []
    for i in range(n):
        topic = f"zigbee2mqtt/Küche {i % 7}/état" if i % 3 else f"t/{i}"
        payload = b"" if i % 11 == 0 else (b"\x00\xff" * (i % 50) + f'{{"n": {i}}}'.encode())
        token: AckToken | None = None if i % 4 == 0 else (i % 5, (i * 7919) % 65536, 1 + i % 2)
        out.append((topic, payload, token))
    return out


def test_round_trip_in_order_with_and_without_tokens() -> None:
    held = HeldInputs()
    assert not held and len(held) == 0
    items = _items(500)
    for item in items[:300]:
        held.append(item)
    got = [held.popleft() for _ in range(150)]
    for item in items[300:]:
        held.append(item)  # appending while part was taken keeps the order
    assert len(held) == 350
    while held:
        got.append(held.popleft())
    assert got == items
    with pytest.raises(IndexError):
        held.popleft()


def test_front_is_dropped_as_it_is_consumed_and_clear_frees_everything() -> None:
    held = HeldInputs()
    big = b"x" * 4000
    for i in range(2000):  # 8 MB
        held.append((f"t/{i}", big, (1, i, 1)))
    for i in range(1500):
        assert held.popleft() == (f"t/{i}", big, (1, i, 1))
    assert len(held._buf) < 2000 * 4100 // 2  # the consumed front was given back
    assert held.popleft() == ("t/1500", big, (1, 1500, 1))
    held.clear()
    assert len(held) == 0 and len(held._buf) == 0
    held.append(("a", b"b", None))
    assert held.popleft() == ("a", b"b", None)
    assert len(held._buf) == 0  # the last one out releases the buffer
