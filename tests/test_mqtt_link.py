"""MqttLink (edge/mqttcodec.py over an asyncio transport) and its coalescing sender, against a
real Mosquitto, in MQTT 5 and 3.1.1 (paho is only the independent client on the other side):
every message arrives whole, in order, with the right acknowledgement token, whatever the packet
mix (QoS 0/1/2, MQTT 5 properties, payloads larger than one socket read, empty payloads); what
the link publishes arrives in order with its QoS and retain flags; at most the broker's in-flight
window is unacknowledged; a PUBLISH far beyond limits.max_payload_bytes is never buffered."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge import mqtt as edge_mqtt
from edge.config import MqttConfig
from edge.mqtt import AckToken, MqttLink, Outgoing
from tests.broker import Mosquitto

pytestmark = pytest.mark.broker


def _v5_publisher(url: str) -> mqtt.Client:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect(parts.hostname or "127.0.0.1", parts.port or 1883, keepalive=30)
    client.loop_start()
    return client


class _Collector:
    """Every message on ``pattern`` with its QoS and retain flag."""

    def __init__(self, url: str, pattern: str) -> None:
        self.messages: list[tuple[str, bytes, int, bool]] = []
        self.client = _v5_publisher(url)
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.on_message = lambda _c, _u, m: self.messages.append(
            (m.topic, bytes(m.payload), m.qos, bool(m.retain))
        )
        self.client.subscribe(pattern, 1)
        assert subscribed.wait(10)

    def wait(self, count: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while len(self.messages) < count and time.monotonic() < deadline:
            time.sleep(0.02)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


async def _run_link(make: Any, body: Any) -> Any:
    link = make()
    task = asyncio.create_task(link.run())
    try:
        await asyncio.wait_for(link.connected.wait(), 10)
        return await body(link)
    finally:
        link.stop()
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(task, 10)


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_reader_delivers_every_packet_mix_whole_and_in_order(
    mosquitto: Mosquitto, topic_prefix: str, protocol: str
) -> None:
    p = topic_prefix
    cfg = MqttConfig(url=mosquitto.url, client_id=f"link-{p}", protocol=protocol, persistent_session=False)
    got: list[tuple[str, bytes, AckToken | None]] = []
    big = bytes(range(256)) * 1200  # 300 KiB: several socket reads for one packet
    sent: list[tuple[str, bytes, int]] = []
    for i in range(400):
        qos = (0, 1, 2)[i % 3] if i % 7 else 1
        payload = big if i in (5, 200) else (b"" if i == 9 else f'{{"i": {i}}}'.encode())
        sent.append((f"{p}/in/d{i % 5}", payload, qos))
    done = threading.Event()
    links: list[MqttLink] = []

    def on_message(topic: str, payload: bytes, token: AckToken | None) -> None:
        got.append((topic, payload, token))
        links[0].ack(token)
        if len(got) == len(sent):
            done.set()

    def make() -> MqttLink:
        links.append(
            MqttLink(
                cfg, subscriptions=lambda: [(f"{p}/in/#", 2)], on_message=on_message, status_topic=f"{p}/s"
            )
        )
        return links[0]

    async def body(_link: MqttLink) -> None:
        pub = _v5_publisher(mosquitto.url)
        try:
            for i, (topic, payload, qos) in enumerate(sent):
                props = None
                if i % 11 == 0:  # MQTT 5 properties: the framer's full decoder takes these
                    props = Properties(PacketTypes.PUBLISH)
                    props.UserProperty = ("k", str(i))
                pub.publish(topic, payload, qos=qos, properties=props)
            await asyncio.to_thread(done.wait, 30)
        finally:
            pub.loop_stop()
            pub.disconnect()

    asyncio.run(_run_link(make, body))
    assert len(got) == len(sent)
    # One publisher: the broker keeps its order per topic and QoS (QoS 2 waits for its PUBREL).
    for device in range(5):
        for qos in (0, 1, 2):
            want = [pl for t, pl, q in sent if t.endswith(f"/d{device}") and q == qos]
            have = [pl for t, pl, tok in got if t.endswith(f"/d{device}") and (tok[2] if tok else 0) == qos]
            assert have == want, (device, qos)
    for _, _, token in got:
        assert token is None or (token[0] >= 1 and 0 < token[1] < 65536)


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_sender_coalesces_qos0_and_keeps_order_and_flags(
    mosquitto: Mosquitto, topic_prefix: str, protocol: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(edge_mqtt, "WRITE_CHUNK", 4096)  # many chunks
    p = topic_prefix
    cfg = MqttConfig(url=mosquitto.url, client_id=f"link-{p}", protocol=protocol, persistent_session=False)
    out = _Collector(mosquitto.url, f"{p}/out/#")
    count = 3000
    links: list[MqttLink] = []

    def make() -> MqttLink:
        links.append(
            MqttLink(cfg, subscriptions=lambda: [], on_message=lambda *_: None, status_topic=f"{p}/s")
        )
        return links[0]

    async def body(link: MqttLink) -> None:
        for i in range(count):
            qos = 1 if i % 50 == 0 else 0
            payload = b"x" * 200 if i % 97 == 0 else f"{i}".encode()
            link.publish(Outgoing(f"{p}/out/{i % 3}", payload, qos, retain=(i == count - 1)))
            if i % 500 == 0:
                await asyncio.sleep(0)
        await asyncio.to_thread(out.wait, count)

    try:
        asyncio.run(_run_link(make, body))
    finally:
        out.close()
    messages = out.messages
    assert len(messages) == count
    # Per topic and QoS in order (QoS 1 beyond the in-flight window waits in the queue, so the two
    # QoS levels interleave differently), and the last one retained.
    for lane in range(3):
        for qos in (0, 1):
            have = [pl for t, pl, q, _ in messages if t == f"{p}/out/{lane}" and q == qos]
            want = [
                b"x" * 200 if i % 97 == 0 else f"{i}".encode()
                for i in range(count)
                if i % 3 == lane and (i % 50 == 0) == (qos == 1)
            ]
            assert have == want, (lane, qos)
    late = _Collector(mosquitto.url, f"{p}/out/#")  # a new subscriber gets the retained one
    late.wait(1, timeout=5)
    late.close()
    assert [(t, pl, r) for t, pl, _, r in late.messages] == [(f"{p}/out/{(count - 1) % 3}", b"2999", True)]
    assert links[0].dropped == 0


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_only_the_in_flight_window_is_sent_the_rest_waits_in_the_link(
    mosquitto: Mosquitto, topic_prefix: str, protocol: str
) -> None:
    """3,000 QoS 1 answers handed over at once: at most the broker's in-flight window is sent and
    unacknowledged at any time, the rest waits in the link's queue (while it waits, the link says
    answers are held back, so the daemon reads on for PUBACKs), and every answer arrives, in
    order, none dropped."""
    p = topic_prefix
    cfg = MqttConfig(url=mosquitto.url, client_id=f"win-{p}", protocol=protocol, persistent_session=False)
    out = _Collector(mosquitto.url, f"{p}/out/#")
    count = 3000
    seen: dict[str, int] = {"in_flight_max": 0, "queue_max": 0, "window": 0, "held_back": 0}

    def make() -> MqttLink:
        return MqttLink(cfg, subscriptions=lambda: [], on_message=lambda *_: None, status_topic=f"{p}/s")

    async def body(link: MqttLink) -> None:
        seen["window"] = link.in_flight_max
        for i in range(count):
            link.publish(Outgoing(f"{p}/out/x", f"{i}".encode(), 1, retain=False))
        while len(out.messages) < count:
            seen["in_flight_max"] = max(seen["in_flight_max"], link.in_flight)
            seen["queue_max"] = max(seen["queue_max"], len(link.queue))
            # what tells the daemon to read on for PUBACKs while its intake is paused
            seen["held_back"] += link.answers_held_back()
            await asyncio.sleep(0)  # sampled at every turn of the loop
            assert len(out.messages) < count or not link.queue
        assert link.dropped == 0
        assert not link.answers_held_back()  # all confirmed: nothing waits for a PUBACK

    try:
        asyncio.run(asyncio.wait_for(_run_link(make, body), 60))
    finally:
        out.close()
    # Mosquitto's default max_inflight_messages is 20: its Receive Maximum (MQTT 5), and the
    # link's window for 3.1.1 (which has no Receive Maximum).
    assert seen["window"] == 20 == edge_mqtt.IN_FLIGHT_V311, seen
    assert 0 < seen["in_flight_max"] <= seen["window"], seen
    assert seen["queue_max"] >= count - seen["window"] - 100, seen  # the rest did wait in the link
    assert seen["held_back"] > 0, seen
    assert [pl for _, pl, _, _ in out.messages] == [f"{i}".encode() for i in range(count)]


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_publish_far_beyond_max_payload_bytes_is_never_buffered(
    mosquitto: Mosquitto, topic_prefix: str, protocol: str
) -> None:
    """limits.max_payload_bytes 4096: in MQTT 5 the CONNECT's Maximum Packet Size (4096 plus
    PACKET_HEADROOM) makes Mosquitto drop a 2 MB PUBLISH for the link rather than send it; in
    3.1.1 (no such property) the link's framer skips it as it streams, counts it and
    acknowledges it. Either way the messages around it arrive, on the same connection."""
    p = topic_prefix
    cfg = MqttConfig(url=mosquitto.url, client_id=f"big-{p}", protocol=protocol, persistent_session=False)
    got: list[tuple[str, bytes]] = []
    done = threading.Event()
    links: list[MqttLink] = []

    def on_message(topic: str, payload: bytes, token: AckToken | None) -> None:
        got.append((topic, payload))
        links[0].ack(token)
        if payload == b"after":
            done.set()

    def make() -> MqttLink:
        links.append(
            MqttLink(
                cfg,
                subscriptions=lambda: [(f"{p}/in/#", 1)],
                on_message=on_message,
                status_topic=f"{p}/s",
                max_payload_bytes=4096,
            )
        )
        return links[0]

    async def body(link: MqttLink) -> None:
        assert link.max_packet_bytes == 4096 + edge_mqtt.PACKET_HEADROOM
        pub = _v5_publisher(mosquitto.url)
        try:
            pub.publish(f"{p}/in/a", b"before", qos=1)
            pub.publish(f"{p}/in/huge", b"x" * 2_000_000, qos=1)
            pub.publish(f"{p}/in/b", b"y" * 5000, qos=1)  # above the limit, within the headroom
            pub.publish(f"{p}/in/c", b"after", qos=1)
            await asyncio.to_thread(done.wait, 30)
        finally:
            pub.loop_stop()
            pub.disconnect()

    asyncio.run(_run_link(make, body))
    link = links[0]
    assert got == [(f"{p}/in/a", b"before"), (f"{p}/in/b", b"y" * 5000), (f"{p}/in/c", b"after")]
    assert link.oversized == (0 if protocol == "5" else 1)  # MQTT 5: the broker never sent it
    assert link.reconnects == 0 and link.last_error is None


def test_stop_while_waiting_for_the_connack_ends_the_link() -> None:
    """A listener that accepts TCP but never answers MQTT: stop() ends run() without waiting out
    the CONNACK timeout, and says why."""
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    cfg = MqttConfig(url=f"mqtt://127.0.0.1:{port}", client_id="mute", persistent_session=False)
    accepted: list[socket.socket] = []

    async def main() -> MqttLink:
        link = MqttLink(cfg, subscriptions=lambda: [], on_message=lambda *_: None, status_topic="s")
        task = asyncio.create_task(link.run())
        accepted.append((await asyncio.to_thread(server.accept))[0])  # the CONNECT is on its way
        link.stop()
        await asyncio.wait_for(task, edge_mqtt.CONNECT_TIMEOUT_S - 1)
        return link

    try:
        link = asyncio.run(main())
    finally:
        for conn in accepted:
            conn.close()
        server.close()
    assert link.last_error == "stopped while waiting for the CONNACK"
    assert not link.ever_connected.is_set() and link.reconnects == 0


def test_async_with_runs_the_link_for_the_block_and_leaves_cleanly(
    mosquitto: Mosquitto, topic_prefix: str
) -> None:
    """``async with link:`` connects, subscribes and publishes for the block; leaving it publishes
    the offline status, disconnects (so no last will follows) and ends the link's task; a second
    ``async with`` on a running link is refused."""
    p = topic_prefix
    collector = _Collector(mosquitto.url, f"{p}/#")
    got: list[tuple[str, bytes]] = []
    arrived = asyncio.Event()

    def on_message(topic: str, payload: bytes, token: object) -> None:
        got.append((topic, payload))
        arrived.set()

    cfg = MqttConfig(url=mosquitto.url, client_id=f"with-{p}", persistent_session=False)
    link = MqttLink(
        cfg,
        subscriptions=lambda: [(f"{p}/in", 1)],
        on_message=on_message,
        status_topic=f"{p}/status",
    )

    async def main() -> None:
        async with link as entered:
            assert entered is link
            await asyncio.wait_for(link.connected.wait(), 10)
            with pytest.raises(RuntimeError, match="already running"):
                await link.__aenter__()
            link.publish(Outgoing(f"{p}/out", b"answer", qos=1))
            await asyncio.to_thread(collector.client.publish, f"{p}/in", b"input", 1)
            await asyncio.wait_for(arrived.wait(), 10)
        assert not link.connected.is_set()

    try:
        asyncio.run(main())
        collector.wait(3)
        time.sleep(0.5)  # a last will would follow the disconnect at once
    finally:
        collector.close()
    assert got == [(f"{p}/in", b"input")]
    assert (f"{p}/out", b"answer") in [(t, m) for t, m, _, _ in collector.messages]
    statuses = [m for t, m, _, _ in collector.messages if t == f"{p}/status"]
    assert statuses[-1:] == [b"offline"], collector.messages
    assert statuses.count(b"offline") == 1, statuses


def test_async_with_raises_what_the_link_raised() -> None:
    """A link whose task failed inside the block: leaving the block raises that error (it is not
    swallowed), and the link can be entered again afterwards."""

    class FailingLink(MqttLink):
        async def run(self) -> None:
            raise ValueError("the link's own failure")

    link = FailingLink(
        MqttConfig(url="mqtt://127.0.0.1:1", client_id="with-failing"),
        subscriptions=list,
        on_message=lambda topic, payload, token: None,
        status_topic=None,
    )

    async def main() -> None:
        with pytest.raises(ValueError, match="the link's own failure"):
            async with link:
                await asyncio.sleep(0.01)
        with pytest.raises(ValueError, match="the link's own failure"):
            async with link:  # entered again: a new task, the same failure
                pass

    asyncio.run(main())
