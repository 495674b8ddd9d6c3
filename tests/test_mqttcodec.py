"""edge/mqttcodec.py with bytes: golden packets worked out from the MQTT 3.1.1 and 5 specifications,
round trips of generated packets, a stream split at every byte, malformed lengths, MQTT 5
properties, topic aliases, an oversized PUBLISH skipped while it streams, and a real Mosquitto
spoken to with nothing but the codec and a socket, at both protocol levels."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge import mqttcodec as c
from edge.mqttcodec import (
    V5,
    V311,
    ConnAck,
    Connect,
    Disconnect,
    Framer,
    MalformedPacket,
    PingReq,
    PingResp,
    Properties,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    SkippedPublish,
    SubAck,
    Subscribe,
    Subscription,
    UnsubAck,
    Unsubscribe,
    Will,
    decode,
    encode,
)
from tests.broker import Mosquitto


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


def roundtrip(packet: Any, version: int) -> Any:
    data = encode(packet, version)
    packets = Framer(version, topic_alias_maximum=65535).feed(data)
    assert len(packets) == 1
    return packets[0]


# --- golden bytes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "wire"),
    [
        (0, "00"),
        (127, "7f"),
        (128, "80 01"),
        (16_383, "ff 7f"),
        (16_384, "80 80 01"),
        (2_097_151, "ff ff 7f"),
        (2_097_152, "80 80 80 01"),
        (268_435_455, "ff ff ff 7f"),
    ],
)
def test_remaining_length_of_one_to_four_bytes(value: int, wire: str) -> None:
    """The boundaries of the spec's Variable Byte Integer table (1 to 4 bytes)."""
    assert c.encode_varint(value) == h(wire)
    assert c.decode_varint(h(wire), 0) == (value, len(h(wire)))
    # and a PUBLISH of that remaining length is framed from a header with those bytes
    if value <= 16_384:
        payload = b"x" * (value - 3)
        if value >= 3:
            data = encode(Publish("t", payload), V311)
            assert data[1 : 1 + len(h(wire))] == h(wire)
            assert Framer(V311).feed(data) == [Publish("t", payload)]


def test_remaining_length_out_of_range_and_a_fifth_byte() -> None:
    with pytest.raises(ValueError, match="out of range"):
        c.encode_varint(268_435_456)
    with pytest.raises(MalformedPacket, match="longer than 4 bytes"):
        c.decode_varint(h("ff ff ff ff 01"), 0)
    with pytest.raises(MalformedPacket, match="cut short"):
        c.decode_varint(h("ff ff"), 0)
    framer = Framer(V5)
    with pytest.raises(MalformedPacket, match="remaining length is longer than 4 bytes"):
        framer.feed(h("30 ff ff ff ff 01"))
    # the same, a byte at a time: the error comes with the fifth length byte, not before
    framer = Framer(V311)
    for byte in h("30 80 80 80"):
        assert framer.feed(bytes((byte,))) == []
    with pytest.raises(MalformedPacket, match="longer than 4 bytes"):
        framer.feed(b"\x80")


def test_connect_311_golden() -> None:
    packet = Connect("c1", keepalive=60, clean_start=True)
    wire = h("10 0e 00 04 4d 51 54 54 04 02 00 3c 00 02 63 31")
    assert encode(packet, V311) == wire
    assert decode(wire[0], wire[2:], V311) == packet


def test_connect_5_golden_with_will_auth_and_properties() -> None:
    props = Properties(
        session_expiry_interval=3600, receive_maximum=1000, topic_alias_maximum=10, maximum_packet_size=70_000
    )
    packet = Connect(
        "c1",
        keepalive=60,
        clean_start=False,
        username="u",
        password="p",
        will=Will("s", b"offline", qos=1, retain=True),
        properties=props,
    )
    wire = h(
        "10 32"  # remaining length 50
        "00 04 4d 51 54 54 05"  # "MQTT", level 5
        "ec"  # user name, password, will retain, will QoS 1, will; no clean start
        "00 3c"  # keep alive 60
        "10"  # 16 bytes of properties, in identifier order:
        "11 00 00 0e 10"  # session expiry 3600
        "21 03 e8"  # receive maximum 1000
        "22 00 0a"  # topic alias maximum 10
        "27 00 01 11 70"  # maximum packet size 70000
        "00 02 63 31"  # client id
        "00"  # no will properties
        "00 01 73 00 07 6f 66 66 6c 69 6e 65"  # will topic "s", payload "offline"
        "00 01 75 00 01 70"  # user name, password
    )
    assert encode(packet, V5) == wire
    assert decode(wire[0], wire[2:], V5) == packet


def test_connack_golden() -> None:
    assert decode(0x20, h("01 00"), V311) == ConnAck(session_present=True)
    assert decode(0x20, h("00 05"), V311) == ConnAck(reason_code=5)
    assert c.CONNACK_V311[5] == "not authorized"
    wire = h("20 0e 00 00 0b 21 00 14 22 00 0a 27 00 00 10 00")
    props = Properties(receive_maximum=20, topic_alias_maximum=10, maximum_packet_size=4096)
    assert Framer(V5).feed(wire) == [ConnAck(False, 0, props)]
    assert encode(ConnAck(False, 0, props), V5) == wire
    assert c.reason_name(0x87) == "not authorized" and c.reason_name(0xFE) == "reason 0xfe"


def test_publish_golden() -> None:
    assert encode(Publish("a/b", b"hi", qos=1, packet_id=10), V311) == h("32 09 00 03 61 2f 62 00 0a 68 69")
    assert encode(Publish("a", b"x", retain=True), V5) == h("31 05 00 01 61 00 78")
    dup2 = Publish("a", b"", qos=2, dup=True, packet_id=0x1234)
    assert encode(dup2, V311) == h("3c 05 00 01 61 12 34")
    with_props = Publish("a", b"x", properties=Properties(user_property=(("k", "v"),), content_type="j"))
    wire = h("30 10 00 01 61 0b 03 00 01 6a 26 00 01 6b 00 01 76 78")
    assert encode(with_props, V5) == wire
    assert decode(wire[0], wire[2:], V5) == with_props


def test_acks_golden() -> None:
    assert encode(PubAck(10), V311) == h("40 02 00 0a")
    assert encode(PubAck(10), V5) == h("40 02 00 0a")  # reason 0 and no properties: short form
    assert encode(PubAck(10, 0x10), V5) == h("40 03 00 0a 10")
    assert encode(PubRec(10), V311) == h("50 02 00 0a")
    assert encode(PubRel(10), V311) == h("62 02 00 0a")
    assert encode(PubComp(10), V311) == h("70 02 00 0a")
    assert decode(0x40, h("00 0a 97 03 1f 00 00"), V5) == PubAck(10, 0x97, Properties(reason_string=""))
    assert decode(0x40, h("00 0a 97"), V5) == PubAck(10, 0x97)
    with pytest.raises(MalformedPacket, match="PUBREL: fixed header flags 0x0 are reserved"):
        decode(0x60, h("00 0a"), V311)


def test_subscribe_unsubscribe_golden() -> None:
    sub = Subscribe(1, (Subscription("a/#", 1),))
    assert encode(sub, V311) == h("82 08 00 01 00 03 61 2f 23 01")
    assert encode(sub, V5) == h("82 09 00 01 00 00 03 61 2f 23 01")
    options = Subscribe(1, (Subscription("a", 1, no_local=True, retain_handling=2),))
    assert encode(options, V5)[-1] == 0x25
    assert roundtrip(options, V5) == options
    assert encode(Unsubscribe(2, ("a",)), V311) == h("a2 05 00 02 00 01 61")
    assert decode(0x90, h("00 01 01 80"), V311) == SubAck(1, (1, 0x80))
    assert decode(0x90, h("00 01 00 01 80"), V5) == SubAck(1, (1, 0x80))
    assert decode(0xB0, h("00 02"), V311) == UnsubAck(2)
    assert decode(0xB0, h("00 02 00 00 11"), V5) == UnsubAck(2, (0, 0x11))


def test_ping_and_disconnect_golden() -> None:
    assert encode(PingReq(), V311) == h("c0 00")
    assert Framer(V311).feed(h("d0 00")) == [PingResp()]
    assert encode(Disconnect(), V5) == h("e0 00")
    assert encode(Disconnect(0x04), V311) == h("e0 00")  # no reason codes in 3.1.1
    # the broker's reason: a session taken over, with a reason string
    wire = h("e0 07 8e 05 1f 00 02 68 69")
    assert Framer(V5).feed(wire) == [Disconnect(0x8E, Properties(reason_string="hi"))]
    assert Framer(V5).feed(h("e0 00")) == [Disconnect()]


def test_malformed_packets_name_what_is_wrong() -> None:
    cases = [
        (0x32, h("00 01 61"), V311, "PUBLISH: packet id is cut short"),
        (0x32, h("00 01 61 00 00"), V311, "packet id 0"),
        (0x36, h("00 01 61 00 01"), V311, "QoS 3"),
        (0x38, h("00 01 61"), V311, "DUP set on a QoS 0"),
        (0x30, h("00 02 ff fe"), V311, "topic is not valid UTF-8"),
        (0x30, h("00 05 61"), V311, "topic is cut short"),
        (0x30, h("00 01 61 05 01"), V5, "properties is cut short"),
        (0x30, h("00 01 61 02 7f 00"), V5, "unknown property identifier 0x7f"),
        (0x30, h("00 01 61 04 23 00 01 23"), V5, "topic_alias is cut short"),
        (0x30, h("00 01 61 06 23 00 01 23 00 02"), V5, "property topic_alias appears twice"),
        (0x20, h("02 00"), V311, "acknowledge flags 0x02 are reserved"),
        (0x20, h("00"), V311, "CONNACK: reason code is cut short"),
        (0x90, h("00"), V311, "SUBACK: packet id is cut short"),
        (0xD0, h("00"), V311, "PINGRESP: 1 bytes left over"),
        (0x00, b"", V311, "packet type 0 is reserved"),
    ]
    for first, body, version, message in cases:
        with pytest.raises(MalformedPacket, match=message):
            decode(first, body, version)


def test_encoding_refuses_what_mqtt_cannot_carry() -> None:
    with pytest.raises(ValueError, match="packet id None"):
        encode(Publish("a", b"", qos=1), V311)
    with pytest.raises(ValueError, match="QoS 3"):
        encode(Publish("a", b"", qos=3, packet_id=1), V311)
    with pytest.raises(ValueError, match="65535"):
        encode(Publish("a" * 70_000, b""), V311)
    with pytest.raises(ValueError, match="at least one topic filter"):
        encode(Subscribe(1, ()), V5)
    with pytest.raises(ValueError, match="protocol level 3"):
        encode(PingReq(), 3)


# --- round trips -------------------------------------------------------------------------------

texts = st.text(st.characters(exclude_categories=("Cs",)), max_size=20)
small = st.integers(0, 255)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
ids = st.integers(1, 0xFFFF)
properties = st.builds(
    Properties,
    payload_format_indicator=st.none() | st.integers(0, 1),
    message_expiry_interval=st.none() | u32,
    content_type=st.none() | texts,
    response_topic=st.none() | texts,
    correlation_data=st.none() | st.binary(max_size=20),
    subscription_identifier=st.lists(st.integers(1, 268_435_455), max_size=3).map(tuple),
    session_expiry_interval=st.none() | u32,
    receive_maximum=st.none() | st.integers(1, 0xFFFF),
    topic_alias_maximum=st.none() | u16,
    maximum_qos=st.none() | st.integers(0, 1),
    user_property=st.lists(st.tuples(texts, texts), max_size=3).map(tuple),
    maximum_packet_size=st.none() | st.integers(1, 0xFFFFFFFF),
    reason_string=st.none() | texts,
)
topics = st.text(
    st.characters(exclude_categories=("Cs",), exclude_characters="+#\x00"), min_size=1, max_size=30
)


@st.composite
def publishes(draw: st.DrawFn, v5: bool) -> Publish:
    qos = draw(st.integers(0, 2))
    props = draw(properties) if v5 else Properties()
    return Publish(
        draw(topics),
        draw(st.binary(max_size=300)),
        qos,
        draw(st.booleans()),
        draw(st.booleans()) if qos else False,
        draw(ids) if qos else None,
        Properties(**{**_asdict(props), "topic_alias": None}),
    )


def _asdict(props: Properties) -> dict[str, Any]:
    return {f.name: getattr(props, f.name) for f in dataclasses.fields(props)}


def packets(v5: bool) -> st.SearchStrategy[Any]:
    props = properties if v5 else st.just(Properties())
    reason = small if v5 else st.just(0)
    acks = [
        st.builds(kind, ids, reason, props if v5 else st.just(Properties()))
        for kind in (PubAck, PubRec, PubRel, PubComp)
    ]
    subscription = st.builds(
        Subscription,
        topics,
        st.integers(0, 2),
        st.booleans() if v5 else st.just(False),
        st.booleans() if v5 else st.just(False),
        st.integers(0, 2) if v5 else st.just(0),
    )
    will = st.none() | st.builds(
        Will, topics, st.binary(max_size=30), st.integers(0, 2), st.booleans(), props
    )
    return st.one_of(
        publishes(v5),
        *acks,
        st.builds(Connect, texts, u16, st.booleans(), st.none() | texts, st.none() | texts, will, props),
        st.builds(ConnAck, st.booleans(), small, props),
        st.builds(Subscribe, ids, st.lists(subscription, min_size=1, max_size=4).map(tuple), props),
        st.builds(SubAck, ids, st.lists(small, max_size=4).map(tuple), props),
        st.builds(Unsubscribe, ids, st.lists(topics, min_size=1, max_size=4).map(tuple), props),
        st.builds(UnsubAck, ids, st.lists(small, max_size=4).map(tuple) if v5 else st.just(()), props),
        st.just(PingReq()),
        st.just(PingResp()),
        st.builds(Disconnect, reason, props) if v5 else st.just(Disconnect()),
    )


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_every_packet_round_trips_at_both_levels(data: st.DataObject) -> None:
    for version in (V311, V5):
        packet = data.draw(packets(version == V5))
        assert roundtrip(packet, version) == packet


@settings(max_examples=150, deadline=None)
@given(st.data(), st.sampled_from([V311, V5]))
def test_a_stream_cut_anywhere_gives_the_same_packets(data: st.DataObject, version: int) -> None:
    sent = data.draw(st.lists(packets(version == V5), min_size=1, max_size=8))
    stream = b"".join(encode(p, version) for p in sent)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    framer = Framer(version, topic_alias_maximum=65535)
    got: list[Any] = []
    start = 0
    for cut in [*cuts, len(stream)]:
        got += framer.feed(stream[start:cut])
        start = cut
    assert got == sent
    assert framer.buffered == 0


def _mixed_stream(version: int) -> tuple[list[Any], bytes]:
    sent: list[Any] = [
        ConnAck(True, 0, Properties(receive_maximum=20) if version == V5 else Properties()),
        Publish("a/b", b"", 0),
        Publish("a/b", b"x" * 200, 1, packet_id=7),  # a 2-byte remaining length
        Publish("c", b"y" * 20_000, 2, retain=True, packet_id=8),  # a 3-byte one
        PubAck(3),
        SubAck(4, (1,)),
        PingResp(),
        Publish("\u00e9t\u00e9", b"{}", 1, dup=True, packet_id=9),
    ]
    return sent, b"".join(encode(p, version) for p in sent)


@pytest.mark.parametrize("version", [V311, V5])
def test_a_stream_split_at_every_byte_boundary(version: int) -> None:
    sent, stream = _mixed_stream(version)
    framer = Framer(version)
    got: list[Any] = []
    for i in range(len(stream)):  # one byte at a time
        got += framer.feed(stream[i : i + 1])
    assert got == sent
    for cut in range(len(stream) + 1):  # and in two parts, cut at every position
        framer = Framer(version)
        assert framer.feed(stream[:cut]) + framer.feed(stream[cut:]) == sent


@pytest.mark.parametrize("version", [V311, V5])
def test_the_hot_path_delivers_the_same_messages_as_the_full_decoder(version: int) -> None:
    """feed_into with ``deliver`` (the link's path) gives each PUBLISH as plain values, the other
    packets as objects, in order, split at every byte too."""
    sent, stream = _mixed_stream(version)
    extra = Publish("p", b"z", 1, packet_id=5, properties=Properties(user_property=(("k", "v"),)))
    stream += encode(extra, version)
    sent.append(extra if version == V5 else Publish("p", b"z", 1, packet_id=5))
    want = [(p.topic, p.payload, p.qos, p.packet_id or 0) if isinstance(p, Publish) else p for p in sent]
    for step in (len(stream), 1, 7):
        framer = Framer(version)
        got: list[Any] = []
        for i in range(0, len(stream), step):
            framer.feed_into(stream[i : i + step], got, lambda *m, got=got: got.append(m))
        assert got == want, step


def test_topic_aliases_set_and_used_on_one_connection() -> None:
    framer = Framer(V5, topic_alias_maximum=10)
    set_alias = Publish("home/plug/power", b"1", properties=Properties(topic_alias=3))
    use_alias = Publish("", b"2", 1, packet_id=4, properties=Properties(topic_alias=3))
    got = framer.feed(encode(set_alias, V5) + encode(use_alias, V5))
    assert [(p.topic, p.payload) for p in got] == [("home/plug/power", b"1"), ("home/plug/power", b"2")]
    assert got[1].properties.topic_alias == 3
    # the hot path resolves them too
    delivered: list[Any] = []
    framer.feed_into(encode(use_alias, V5), [], lambda *m: delivered.append(m))
    assert delivered == [("home/plug/power", b"2", 1, 4)]
    # an alias may be set again to another topic
    framer.feed(encode(Publish("other", b"", properties=Properties(topic_alias=3)), V5))
    assert framer.feed(encode(use_alias, V5))[0].topic == "other"
    with pytest.raises(MalformedPacket, match="topic alias 5 was never set"):
        Framer(V5, topic_alias_maximum=10).feed(
            encode(Publish("", b"", properties=Properties(topic_alias=5)), V5)
        )
    with pytest.raises(MalformedPacket, match=r"topic alias 11 is outside 1\.\.10"):
        framer.feed(encode(Publish("t", b"", properties=Properties(topic_alias=11)), V5))
    with pytest.raises(MalformedPacket, match=r"outside 1\.\.0"):  # none announced: none allowed
        Framer(V5).feed(encode(Publish("t", b"", properties=Properties(topic_alias=1)), V5))
    with pytest.raises(MalformedPacket, match="empty topic without a topic alias"):
        Framer(V311).feed(h("30 03 00 00 78"))


@pytest.mark.parametrize("version", [V311, V5])
@pytest.mark.parametrize("chunk", [1, 10, 4096, 1 << 20])
def test_an_oversized_publish_is_skipped_while_it_streams(version: int, chunk: int) -> None:
    """A PUBLISH above max_publish is never held whole: the framer keeps at most its head
    (topic, packet id, properties), reports it with its packet id (to be acknowledged), and the
    packets after it arrive as usual."""
    props = Properties(topic_alias=2) if version == V5 else Properties()
    huge = Publish("big/topic", b"x" * 300_000, 1, packet_id=77, properties=props)
    before = Publish("small", b"1", 1, packet_id=5)
    after = [Publish("small", b"2"), PubAck(9)]
    stream = b"".join(encode(p, version) for p in [before, huge, *after])
    if version == V5:  # the alias the skipped PUBLISH set is still known afterwards
        later = Publish("", b"3", properties=Properties(topic_alias=2))
        stream += encode(later, version)
    framer = Framer(version, max_publish=1000, topic_alias_maximum=5)
    got: list[Any] = []
    most = 0
    for i in range(0, len(stream), chunk):
        got += framer.feed(stream[i : i + chunk])
        most = max(most, framer.buffered)
    size = len(encode(huge, version))
    assert got[:4] == [before, SkippedPublish("big/topic", 1, 77, size), *after]
    if version == V5:
        assert (got[4].topic, got[4].payload) == ("big/topic", b"3")
    assert framer.skipped == 1 and framer.skipped_bytes == size - 4  # the body after its header
    assert most <= 1000 + chunk  # never anything like the 300 KB
    assert framer.buffered == 0


def test_other_packets_above_max_packet_are_malformed() -> None:
    framer = Framer(V311, max_packet=100)
    with pytest.raises(MalformedPacket, match="SUBACK of 204 bytes is larger than the 100 allowed"):
        framer.feed(encode(SubAck(1, (0,) * 199), V311)[:10])


# --- against a real Mosquitto ------------------------------------------------------------------


class RawClient:
    """A minimal client: a socket, the codec, nothing else (no library client)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, version: int) -> None:
        self.reader, self.writer, self.version = reader, writer, version
        self.framer = Framer(version, topic_alias_maximum=10)
        self.pending: list[Any] = []

    @classmethod
    async def connect(cls, url: str, version: int, client_id: str, **kw: Any) -> tuple[RawClient, ConnAck]:
        port = int(url.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = cls(reader, writer, version)
        client.send(Connect(client_id, keepalive=30, **kw))
        ack = await client.next()
        assert isinstance(ack, ConnAck)
        return client, ack

    def send(self, packet: Any) -> None:
        self.writer.write(encode(packet, self.version))

    async def next(self) -> Any:
        while not self.pending:
            data = await asyncio.wait_for(self.reader.read(65536), 10)
            assert data, "the broker closed the connection"
            self.pending += self.framer.feed(data)
        return self.pending.pop(0)

    async def close(self) -> None:
        self.send(Disconnect())
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


@pytest.mark.broker
@pytest.mark.parametrize("version", [V311, V5])
def test_codec_speaks_to_mosquitto(mosquitto: Mosquitto, topic_prefix: str, version: int) -> None:
    p = topic_prefix

    async def main() -> None:
        props = Properties(receive_maximum=50, topic_alias_maximum=10) if version == V5 else Properties()
        sub, ack = await RawClient.connect(mosquitto.url, version, f"{p}-sub", properties=props)
        assert ack.reason_code == 0 and not ack.session_present
        if version == V5:
            assert ack.properties.receive_maximum == 20  # Mosquitto's max_inflight_messages
        sub.send(Subscribe(1, (Subscription(f"{p}/#", 1),)))
        assert await sub.next() == SubAck(1, (1,))
        pub, _ = await RawClient.connect(mosquitto.url, version, f"{p}-pub")
        pub.send(Publish(f"{p}/zero", b"q0"))
        pub.send(Publish(f"{p}/one", b"q1" * 1000, qos=1, packet_id=11))
        assert await pub.next() == PubAck(11)
        first, second = await sub.next(), await sub.next()
        assert (first.topic, first.payload, first.qos) == (f"{p}/zero", b"q0", 0)
        assert (second.topic, second.payload, second.qos) == (f"{p}/one", b"q1" * 1000, 1)
        sub.send(PubAck(second.packet_id))
        sub.send(PingReq())
        assert await sub.next() == PingResp()
        sub.send(Unsubscribe(2, (f"{p}/#",)))
        unsuback = await sub.next()
        assert isinstance(unsuback, UnsubAck) and unsuback.packet_id == 2
        await pub.close()
        await sub.close()

    asyncio.run(main())


@pytest.mark.broker
def test_mosquitto_honours_the_connects_maximum_packet_size(mosquitto: Mosquitto, topic_prefix: str) -> None:
    """MQTT 5: a subscriber announcing Maximum Packet Size 2000 never gets a 50 KB PUBLISH; the
    next small one arrives on the same connection."""
    p = topic_prefix

    async def main() -> None:
        props = Properties(maximum_packet_size=2000)
        sub, _ = await RawClient.connect(mosquitto.url, V5, f"{p}-sub", properties=props)
        sub.send(Subscribe(1, (Subscription(f"{p}/#", 0),)))
        assert await sub.next() == SubAck(1, (0,))
        pub, _ = await RawClient.connect(mosquitto.url, V5, f"{p}-pub")
        pub.send(Publish(f"{p}/huge", b"x" * 50_000))
        pub.send(Publish(f"{p}/small", b"ok"))
        got = await sub.next()
        assert (got.topic, got.payload) == (f"{p}/small", b"ok")
        await pub.close()
        await sub.close()

    asyncio.run(main())
