"""MQTT 3.1.1 and MQTT 5 packets as bytes and back, with no I/O (a sans-IO codec).

:func:`encode` turns a packet dataclass into the bytes of one MQTT control packet; :func:`decode`
turns the first byte and the body (the bytes after the remaining length) of one packet into its
dataclass. :class:`Framer` is fed byte chunks as they come from a socket, in any sizes, and
gives back complete packets: a remaining length of 1 to 4 bytes, a fifth continuation byte is a
:class:`MalformedPacket` error, and a PUBLISH larger than a configured limit is skipped as it
streams (never buffered whole) and reported as a :class:`SkippedPublish`, so its packet id can
still be acknowledged. MQTT 5 topic aliases the broker sets are resolved by the framer (one per
connection).

The protocol level is passed to every call: ``4`` for MQTT 3.1.1, ``5`` for MQTT 5. Everything
here works on plain values and is tested with bytes (tests/test_mqttcodec.py).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Literal, TypeAlias

V311 = 4
V5 = 5
ProtocolLevel: TypeAlias = Literal[4, 5]

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT, AUTH = 8, 9, 10, 11, 12, 13, 14, 15
PACKET_NAMES = {
    CONNECT: "CONNECT",
    CONNACK: "CONNACK",
    PUBLISH: "PUBLISH",
    PUBACK: "PUBACK",
    PUBREC: "PUBREC",
    PUBREL: "PUBREL",
    PUBCOMP: "PUBCOMP",
    SUBSCRIBE: "SUBSCRIBE",
    SUBACK: "SUBACK",
    UNSUBSCRIBE: "UNSUBSCRIBE",
    UNSUBACK: "UNSUBACK",
    PINGREQ: "PINGREQ",
    PINGRESP: "PINGRESP",
    DISCONNECT: "DISCONNECT",
    AUTH: "AUTH",
}
MAX_REMAINING_LENGTH = 268_435_455  # four bytes of 7 bits each
MAX_PACKET = MAX_REMAINING_LENGTH + 5  # with the first byte and a 4-byte remaining length

# MQTT 3.1.1 CONNACK return codes (MQTT 5 uses REASON_NAMES).
CONNACK_V311 = {
    0: "accepted",
    1: "unacceptable protocol version",
    2: "identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorized",
}
# MQTT 5 reason codes (the ones a client meets; section 2.4 of the specification).
REASON_NAMES = {
    0x00: "success",
    0x01: "granted QoS 1",
    0x02: "granted QoS 2",
    0x04: "disconnect with will message",
    0x10: "no matching subscribers",
    0x11: "no subscription existed",
    0x80: "unspecified error",
    0x81: "malformed packet",
    0x82: "protocol error",
    0x83: "implementation specific error",
    0x84: "unsupported protocol version",
    0x85: "client identifier not valid",
    0x86: "bad user name or password",
    0x87: "not authorized",
    0x88: "server unavailable",
    0x89: "server busy",
    0x8A: "banned",
    0x8B: "server shutting down",
    0x8C: "bad authentication method",
    0x8D: "keep alive timeout",
    0x8E: "session taken over",
    0x8F: "topic filter invalid",
    0x90: "topic name invalid",
    0x91: "packet identifier in use",
    0x92: "packet identifier not found",
    0x93: "receive maximum exceeded",
    0x94: "topic alias invalid",
    0x95: "packet too large",
    0x96: "message rate too high",
    0x97: "quota exceeded",
    0x98: "administrative action",
    0x99: "payload format invalid",
    0x9A: "retain not supported",
    0x9B: "QoS not supported",
    0x9C: "use another server",
    0x9D: "server moved",
    0x9E: "shared subscriptions not supported",
    0x9F: "connection rate exceeded",
    0xA0: "maximum connect time",
    0xA1: "subscription identifiers not supported",
    0xA2: "wildcard subscriptions not supported",
}


def reason_name(code: int) -> str:
    return REASON_NAMES.get(code, f"reason 0x{code:02x}")


class MalformedPacket(ValueError):
    """Bytes that are not a valid MQTT packet; the message names what is wrong."""


# --- MQTT 5 properties ---------------------------------------------------------------------------

_BYTE, _U16, _U32, _VARINT, _UTF8, _BINARY, _PAIR = range(7)
# identifier -> (Properties field, wire type); section 2.2.2.2 of the MQTT 5 specification
PROPERTY_IDS: dict[int, tuple[str, int]] = {
    0x01: ("payload_format_indicator", _BYTE),
    0x02: ("message_expiry_interval", _U32),
    0x03: ("content_type", _UTF8),
    0x08: ("response_topic", _UTF8),
    0x09: ("correlation_data", _BINARY),
    0x0B: ("subscription_identifier", _VARINT),  # may repeat (a PUBLISH matching several)
    0x11: ("session_expiry_interval", _U32),
    0x12: ("assigned_client_identifier", _UTF8),
    0x13: ("server_keep_alive", _U16),
    0x15: ("authentication_method", _UTF8),
    0x16: ("authentication_data", _BINARY),
    0x17: ("request_problem_information", _BYTE),
    0x18: ("will_delay_interval", _U32),
    0x19: ("request_response_information", _BYTE),
    0x1A: ("response_information", _UTF8),
    0x1C: ("server_reference", _UTF8),
    0x1F: ("reason_string", _UTF8),
    0x21: ("receive_maximum", _U16),
    0x22: ("topic_alias_maximum", _U16),
    0x23: ("topic_alias", _U16),
    0x24: ("maximum_qos", _BYTE),
    0x25: ("retain_available", _BYTE),
    0x26: ("user_property", _PAIR),  # may repeat, order kept
    0x27: ("maximum_packet_size", _U32),
    0x28: ("wildcard_subscription_available", _BYTE),
    0x29: ("subscription_identifier_available", _BYTE),
    0x2A: ("shared_subscription_available", _BYTE),
}
_PROPERTY_BY_NAME = {name: (ident, kind) for ident, (name, kind) in PROPERTY_IDS.items()}
_REPEATED = {"subscription_identifier", "user_property"}


@dataclass(frozen=True, slots=True)
class Properties:
    """MQTT 5 properties of a packet; ``None`` (or an empty tuple) is absent."""

    payload_format_indicator: int | None = None
    message_expiry_interval: int | None = None
    content_type: str | None = None
    response_topic: str | None = None
    correlation_data: bytes | None = None
    subscription_identifier: tuple[int, ...] = ()
    session_expiry_interval: int | None = None
    assigned_client_identifier: str | None = None
    server_keep_alive: int | None = None
    authentication_method: str | None = None
    authentication_data: bytes | None = None
    request_problem_information: int | None = None
    will_delay_interval: int | None = None
    request_response_information: int | None = None
    response_information: str | None = None
    server_reference: str | None = None
    reason_string: str | None = None
    receive_maximum: int | None = None
    topic_alias_maximum: int | None = None
    topic_alias: int | None = None
    maximum_qos: int | None = None
    retain_available: int | None = None
    user_property: tuple[tuple[str, str], ...] = ()
    maximum_packet_size: int | None = None
    wildcard_subscription_available: int | None = None
    subscription_identifier_available: int | None = None
    shared_subscription_available: int | None = None


NO_PROPERTIES = Properties()
_PROPERTY_FIELDS = tuple(f.name for f in fields(Properties))


# --- primitives ----------------------------------------------------------------------------------


def encode_varint(value: int) -> bytes:
    """A Variable Byte Integer (the remaining length, property lengths): 1 to 4 bytes."""
    if not 0 <= value <= MAX_REMAINING_LENGTH:
        raise ValueError(f"variable byte integer {value} is out of range 0..{MAX_REMAINING_LENGTH}")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode_varint(
    data: bytes | bytearray | memoryview, pos: int, what: str = "variable byte integer"
) -> tuple[int, int]:
    """(value, position after it); a fifth continuation byte or missing bytes are malformed."""
    value = 0
    shift = 0
    for _ in range(4):
        if pos >= len(data):
            raise MalformedPacket(f"{what} is cut short")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise MalformedPacket(f"{what} is longer than 4 bytes")


def _utf8(text: str, what: str) -> bytes:
    raw = text.encode()
    if len(raw) > 0xFFFF:
        raise ValueError(f"{what} is {len(raw)} bytes, MQTT allows 65535")
    return len(raw).to_bytes(2, "big") + raw


def _binary(data: bytes, what: str) -> bytes:
    if len(data) > 0xFFFF:
        raise ValueError(f"{what} is {len(data)} bytes, MQTT allows 65535")
    return len(data).to_bytes(2, "big") + data


class _Reader:
    """Reads a packet body front to back; running past its end is a named MalformedPacket."""

    __slots__ = ("data", "end", "packet", "pos")

    def __init__(self, data: bytes | bytearray | memoryview, packet: str, pos: int = 0) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data)
        self.packet = packet

    def _need(self, n: int, what: str) -> None:
        if self.pos + n > self.end:
            raise MalformedPacket(f"{self.packet}: {what} is cut short")

    def left(self) -> int:
        return self.end - self.pos

    def byte(self, what: str) -> int:
        self._need(1, what)
        value = self.data[self.pos]
        self.pos += 1
        return value

    def u16(self, what: str) -> int:
        self._need(2, what)
        data, pos = self.data, self.pos
        self.pos += 2
        return (data[pos] << 8) | data[pos + 1]

    def u32(self, what: str) -> int:
        self._need(4, what)
        value = int.from_bytes(self.data[self.pos : self.pos + 4], "big")
        self.pos += 4
        return value

    def varint(self, what: str) -> int:
        value, self.pos = decode_varint(self.data, self.pos, f"{self.packet}: {what}")
        return value

    def binary(self, what: str) -> bytes:
        n = self.u16(f"{what} length")
        self._need(n, what)
        value = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return value

    def utf8(self, what: str) -> str:
        raw = self.binary(what)
        try:
            return raw.decode()
        except UnicodeDecodeError as exc:
            raise MalformedPacket(f"{self.packet}: {what} is not valid UTF-8") from exc

    def rest(self) -> bytes:
        value = bytes(self.data[self.pos : self.end])
        self.pos = self.end
        return value

    def properties(self) -> Properties:
        length = self.varint("property length")
        self._need(length, "properties")
        end = self.pos + length
        values: dict[str, Any] = {}
        sub_ids: list[int] = []
        pairs: list[tuple[str, str]] = []
        while self.pos < end:
            ident = self.varint("property identifier")
            spec = PROPERTY_IDS.get(ident)
            if spec is None:
                raise MalformedPacket(f"{self.packet}: unknown property identifier 0x{ident:02x}")
            name, kind = spec
            value: Any
            if kind == _BYTE:
                value = self.byte(name)
            elif kind == _U16:
                value = self.u16(name)
            elif kind == _U32:
                value = self.u32(name)
            elif kind == _VARINT:
                value = self.varint(name)
            elif kind == _UTF8:
                value = self.utf8(name)
            elif kind == _BINARY:
                value = self.binary(name)
            else:
                value = (self.utf8(f"{name} key"), self.utf8(f"{name} value"))
            if self.pos > end:
                raise MalformedPacket(f"{self.packet}: property {name} runs past the property length")
            if name == "subscription_identifier":
                sub_ids.append(value)
            elif name == "user_property":
                pairs.append(value)
            elif name in values:
                raise MalformedPacket(f"{self.packet}: property {name} appears twice")
            else:
                values[name] = value
        if sub_ids:
            values["subscription_identifier"] = tuple(sub_ids)
        if pairs:
            values["user_property"] = tuple(pairs)
        return Properties(**values) if values else NO_PROPERTIES


def encode_properties(props: Properties | None) -> bytes:
    """The property length and the properties, in identifier order (b'\\x00' for none)."""
    if props is None or props == NO_PROPERTIES:
        return b"\x00"
    out = bytearray()
    for name in _PROPERTY_FIELDS:
        value = getattr(props, name)
        if value is None or (name in _REPEATED and not value):
            continue
        ident, kind = _PROPERTY_BY_NAME[name]
        for item in value if name in _REPEATED else (value,):
            out += encode_varint(ident)
            if kind == _BYTE:
                out.append(item)
            elif kind == _U16:
                out += struct.pack(">H", item)
            elif kind == _U32:
                out += struct.pack(">I", item)
            elif kind == _VARINT:
                out += encode_varint(item)
            elif kind == _UTF8:
                out += _utf8(item, name)
            elif kind == _BINARY:
                out += _binary(item, name)
            else:
                out += _utf8(item[0], name) + _utf8(item[1], name)
    return encode_varint(len(out)) + bytes(out)


# --- packets -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    properties: Properties = NO_PROPERTIES


@dataclass(frozen=True, slots=True)
class Connect:
    client_id: str
    keepalive: int = 60
    clean_start: bool = True  # MQTT 3.1.1: Clean Session
    username: str | None = None
    password: str | None = None
    will: Will | None = None
    properties: Properties = NO_PROPERTIES


@dataclass(frozen=True, slots=True)
class ConnAck:
    session_present: bool = False
    reason_code: int = 0  # MQTT 3.1.1: the return code
    properties: Properties = NO_PROPERTIES


@dataclass(frozen=True, slots=True)
class Publish:
    topic: str  # empty with a topic alias (MQTT 5) until the framer resolves it
    payload: bytes
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int | None = None  # QoS 1 and 2 only
    properties: Properties = NO_PROPERTIES


@dataclass(frozen=True, slots=True)
class PubAck:
    packet_id: int
    reason_code: int = 0
    properties: Properties = NO_PROPERTIES


@dataclass(frozen=True, slots=True)
class PubRec:
    packet_id: int
    reason_code: int = 0
    properties: Properties = NO_PROPERTIES


@dataclass(frozen=True, slots=True)
class PubRel:
    packet_id: int
    reason_code: int = 0
    properties: Properties = NO_PROPERTIES


@dataclass(frozen=True, slots=True)
class PubComp:
    packet_id: int
    reason_code: int = 0
    properties: Properties = NO_PROPERTIES


@dataclass(frozen=True, slots=True)
class Subscription:
    topic_filter: str
    qos: int = 0
    no_local: bool = False  # MQTT 5 subscription options from here on
    retain_as_published: bool = False
    retain_handling: int = 0


@dataclass(frozen=True, slots=True)
class Subscribe:
    packet_id: int
    subscriptions: tuple[Subscription, ...]
    properties: Properties = NO_PROPERTIES


@dataclass(frozen=True, slots=True)
class SubAck:
    packet_id: int
    reason_codes: tuple[int, ...]  # granted QoS 0-2, or >= 0x80 refused
    properties: Properties = NO_PROPERTIES


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    packet_id: int
    topic_filters: tuple[str, ...]
    properties: Properties = NO_PROPERTIES


@dataclass(frozen=True, slots=True)
class UnsubAck:
    packet_id: int
    reason_codes: tuple[int, ...] = ()  # MQTT 5 only
    properties: Properties = NO_PROPERTIES


@dataclass(frozen=True, slots=True)
class PingReq:
    pass


@dataclass(frozen=True, slots=True)
class PingResp:
    pass


@dataclass(frozen=True, slots=True)
class Disconnect:
    reason_code: int = 0  # MQTT 5 only
    properties: Properties = NO_PROPERTIES


@dataclass(frozen=True, slots=True)
class Auth:  # MQTT 5 only
    reason_code: int = 0
    properties: Properties = NO_PROPERTIES


@dataclass(frozen=True, slots=True)
class SkippedPublish:
    """A PUBLISH larger than the framer's limit, skipped as it streamed: what its head said."""

    topic: str
    qos: int
    packet_id: int | None
    size: int  # the whole packet, bytes
    retain: bool = False
    dup: bool = False


Packet: TypeAlias = (
    Connect
    | ConnAck
    | Publish
    | PubAck
    | PubRec
    | PubRel
    | PubComp
    | Subscribe
    | SubAck
    | Unsubscribe
    | UnsubAck
    | PingReq
    | PingResp
    | Disconnect
    | Auth
)
_ACKS: dict[type, int] = {PubAck: PUBACK, PubRec: PUBREC, PubRel: PUBREL, PubComp: PUBCOMP}
_ACK_TYPES: dict[int, type[PubAck | PubRec | PubRel | PubComp]] = {v: k for k, v in _ACKS.items()}


def _frame(first: int, body: bytes | bytearray) -> bytes:
    return bytes((first,)) + encode_varint(len(body)) + body


def _check_qos(qos: int, what: str) -> None:
    if qos not in (0, 1, 2):
        raise ValueError(f"{what}: QoS {qos} is not 0, 1 or 2")


def _check_packet_id(packet_id: int | None, what: str) -> int:
    if packet_id is None or not 0 < packet_id <= 0xFFFF:
        raise ValueError(f"{what}: packet id {packet_id} is not 1..65535")
    return packet_id


def publish_into(
    out: bytearray,
    topic: bytes,
    payload: bytes,
    version: int,
    *,
    qos: int = 0,
    retain: bool = False,
    packet_id: int = 0,
    dup: bool = False,
    properties: bytes = b"\x00",
) -> None:
    """Append one PUBLISH to ``out`` (the sender's hot path: no packet object, no copy of the
    whole). ``topic`` is UTF-8 already; ``properties`` the encoded MQTT 5 properties."""
    length = 2 + len(topic) + len(payload) + (2 if qos else 0) + (len(properties) if version == V5 else 0)
    if length > MAX_REMAINING_LENGTH:
        raise ValueError(f"PUBLISH of {length} bytes is larger than MQTT can frame")
    if len(topic) > 0xFFFF:
        raise ValueError(f"PUBLISH topic is {len(topic)} bytes, MQTT allows 65535")
    out.append(0x30 | (dup << 3) | (qos << 1) | retain)
    while length > 0x7F:
        out.append((length & 0x7F) | 0x80)
        length >>= 7
    out.append(length)
    out += len(topic).to_bytes(2, "big")
    out += topic
    if qos:
        out += packet_id.to_bytes(2, "big")
    if version == V5:
        out += properties
    out += payload


def encode(packet: Packet, version: int) -> bytes:
    """The bytes of one control packet at protocol level ``version`` (4: 3.1.1, 5: MQTT 5).

    Properties are ignored at 3.1.1 (it has none); a value MQTT cannot carry is a ValueError.
    """
    if version not in (V311, V5):
        raise ValueError(f"protocol level {version} is neither 4 (MQTT 3.1.1) nor 5")
    v5 = version == V5
    if isinstance(packet, Publish):
        _check_qos(packet.qos, "PUBLISH")
        if packet.qos:
            _check_packet_id(packet.packet_id, "PUBLISH")
        out = bytearray()
        publish_into(
            out,
            packet.topic.encode(),
            packet.payload,
            version,
            qos=packet.qos,
            retain=packet.retain,
            packet_id=packet.packet_id or 0,
            dup=packet.dup,
            properties=encode_properties(packet.properties) if v5 else b"",
        )
        return bytes(out)
    kind = _ACKS.get(type(packet))
    if kind is not None:
        assert isinstance(packet, PubAck | PubRec | PubRel | PubComp)
        name = PACKET_NAMES[kind]
        ack_body = _check_packet_id(packet.packet_id, name).to_bytes(2, "big")
        if v5 and (packet.reason_code or packet.properties != NO_PROPERTIES):
            ack_body += bytes((packet.reason_code,))
            if packet.properties != NO_PROPERTIES:
                ack_body += encode_properties(packet.properties)
        return _frame((kind << 4) | (2 if kind == PUBREL else 0), ack_body)
    if isinstance(packet, Connect):
        return _encode_connect(packet, version)
    if isinstance(packet, ConnAck):
        body: bytes | bytearray = bytes((int(packet.session_present), packet.reason_code))
        return _frame(0x20, body + (encode_properties(packet.properties) if v5 else b""))
    if isinstance(packet, Subscribe):
        if not packet.subscriptions:
            raise ValueError("SUBSCRIBE needs at least one topic filter")
        body = bytearray(_check_packet_id(packet.packet_id, "SUBSCRIBE").to_bytes(2, "big"))
        if v5:
            body += encode_properties(packet.properties)
        for sub in packet.subscriptions:
            _check_qos(sub.qos, f"SUBSCRIBE {sub.topic_filter!r}")
            options = sub.qos
            if v5:
                options |= (sub.no_local << 2) | (sub.retain_as_published << 3) | (sub.retain_handling << 4)
            body += _utf8(sub.topic_filter, "topic filter") + bytes((options,))
        return _frame(0x82, body)
    if isinstance(packet, SubAck):
        body = bytearray(_check_packet_id(packet.packet_id, "SUBACK").to_bytes(2, "big"))
        if v5:
            body += encode_properties(packet.properties)
        return _frame(0x90, body + bytes(packet.reason_codes))
    if isinstance(packet, Unsubscribe):
        if not packet.topic_filters:
            raise ValueError("UNSUBSCRIBE needs at least one topic filter")
        body = bytearray(_check_packet_id(packet.packet_id, "UNSUBSCRIBE").to_bytes(2, "big"))
        if v5:
            body += encode_properties(packet.properties)
        for topic_filter in packet.topic_filters:
            body += _utf8(topic_filter, "topic filter")
        return _frame(0xA2, body)
    if isinstance(packet, UnsubAck):
        body = bytearray(_check_packet_id(packet.packet_id, "UNSUBACK").to_bytes(2, "big"))
        if v5:
            body += encode_properties(packet.properties) + bytes(packet.reason_codes)
        return _frame(0xB0, body)
    if isinstance(packet, PingReq):
        return b"\xc0\x00"
    if isinstance(packet, PingResp):
        return b"\xd0\x00"
    if isinstance(packet, Disconnect):
        if not v5 or (packet.reason_code == 0 and packet.properties == NO_PROPERTIES):
            return b"\xe0\x00"
        return _frame(0xE0, bytes((packet.reason_code,)) + encode_properties(packet.properties))
    if isinstance(packet, Auth):
        if not v5:
            raise ValueError("AUTH exists in MQTT 5 only")
        return _frame(0xF0, bytes((packet.reason_code,)) + encode_properties(packet.properties))
    raise TypeError(f"not an MQTT packet: {packet!r}")


def _encode_connect(packet: Connect, version: int) -> bytes:
    v5 = version == V5
    will = packet.will
    flags = 0
    if packet.clean_start:
        flags |= 0x02
    if will is not None:
        _check_qos(will.qos, "CONNECT will")
        flags |= 0x04 | (will.qos << 3) | (will.retain << 5)
    if packet.password is not None:
        flags |= 0x40
    if packet.username is not None:
        flags |= 0x80
    if not 0 <= packet.keepalive <= 0xFFFF:
        raise ValueError(f"CONNECT keep alive {packet.keepalive} is not 0..65535")
    body = bytearray(b"\x00\x04MQTT")
    body += bytes((version, flags))
    body += packet.keepalive.to_bytes(2, "big")
    if v5:
        body += encode_properties(packet.properties)
    body += _utf8(packet.client_id, "client id")
    if will is not None:
        if v5:
            body += encode_properties(will.properties)
        body += _utf8(will.topic, "will topic") + _binary(will.payload, "will payload")
    if packet.username is not None:
        body += _utf8(packet.username, "user name")
    if packet.password is not None:
        body += _binary(packet.password.encode(), "password")
    return _frame(0x10, body)


# --- decoding ------------------------------------------------------------------------------------

_FLAGS = {PUBREL: 2, SUBSCRIBE: 2, UNSUBSCRIBE: 2}  # the fixed flags of every other type are 0


def decode(first: int, body: bytes | bytearray | memoryview, version: int) -> Packet:
    """One packet from its first byte and its body (the bytes after the remaining length).

    A PUBLISH keeps its topic alias in ``properties`` (the :class:`Framer` resolves it)."""
    kind = first >> 4
    name = PACKET_NAMES.get(kind)
    if name is None:
        raise MalformedPacket("packet type 0 is reserved")
    v5 = version == V5
    if kind == PUBLISH:
        return _decode_publish(first, body, v5)
    flags = first & 0x0F
    if flags != _FLAGS.get(kind, 0):
        raise MalformedPacket(f"{name}: fixed header flags 0x{flags:x} are reserved")
    r = _Reader(body, name)
    packet: Packet
    if kind in _ACK_TYPES:
        packet_id = r.u16("packet id")
        reason = 0
        props = NO_PROPERTIES
        if v5 and r.left():
            reason = r.byte("reason code")
            if r.left():
                props = r.properties()
        packet = _ACK_TYPES[kind](packet_id, reason, props)
    elif kind == CONNACK:
        ack_flags = r.byte("acknowledge flags")
        if ack_flags & 0xFE:
            raise MalformedPacket(f"CONNACK: acknowledge flags 0x{ack_flags:02x} are reserved")
        reason = r.byte("reason code")
        packet = ConnAck(bool(ack_flags & 1), reason, r.properties() if v5 and r.left() else NO_PROPERTIES)
    elif kind == SUBACK:
        packet_id = r.u16("packet id")
        props = r.properties() if v5 else NO_PROPERTIES
        packet = SubAck(packet_id, tuple(r.rest()), props)
    elif kind == UNSUBACK:
        packet_id = r.u16("packet id")
        if v5:
            props = r.properties()
            packet = UnsubAck(packet_id, tuple(r.rest()), props)
        else:
            packet = UnsubAck(packet_id)
    elif kind in (PINGREQ, PINGRESP):
        packet = PingReq() if kind == PINGREQ else PingResp()
    elif kind == DISCONNECT:
        reason = r.byte("reason code") if v5 and r.left() else 0
        packet = Disconnect(reason, r.properties() if v5 and r.left() else NO_PROPERTIES)
    elif kind == AUTH:
        if not v5:
            raise MalformedPacket("AUTH exists in MQTT 5 only")
        reason = r.byte("reason code") if r.left() else 0
        packet = Auth(reason, r.properties() if r.left() else NO_PROPERTIES)
    elif kind == SUBSCRIBE:
        packet_id = r.u16("packet id")
        props = r.properties() if v5 else NO_PROPERTIES
        subs = []
        while r.left():
            topic_filter = r.utf8("topic filter")
            options = r.byte("subscription options")
            if options & 0xC0 or (options & 3) == 3 or (not v5 and options & 0xFC):
                raise MalformedPacket(f"SUBSCRIBE: subscription options 0x{options:02x} are invalid")
            subs.append(
                Subscription(topic_filter, options & 3, bool(options & 4), bool(options & 8), options >> 4)
            )
        if not subs:
            raise MalformedPacket("SUBSCRIBE: no topic filter")
        packet = Subscribe(packet_id, tuple(subs), props)
    elif kind == UNSUBSCRIBE:
        packet_id = r.u16("packet id")
        props = r.properties() if v5 else NO_PROPERTIES
        filters = []
        while r.left():
            filters.append(r.utf8("topic filter"))
        if not filters:
            raise MalformedPacket("UNSUBSCRIBE: no topic filter")
        packet = Unsubscribe(packet_id, tuple(filters), props)
    else:
        packet = _decode_connect(r)
    if r.left():
        raise MalformedPacket(f"{name}: {r.left()} bytes left over after the packet")
    return packet


def _decode_publish(first: int, body: bytes | bytearray | memoryview, v5: bool) -> Publish:
    qos = (first >> 1) & 3
    if qos == 3:
        raise MalformedPacket("PUBLISH: QoS 3 is invalid")
    dup = bool(first & 8)
    if dup and not qos:
        raise MalformedPacket("PUBLISH: DUP set on a QoS 0 message")
    r = _Reader(body, "PUBLISH")
    topic = r.utf8("topic")
    packet_id = None
    if qos:
        packet_id = r.u16("packet id")
        if packet_id == 0:
            raise MalformedPacket("PUBLISH: packet id 0 is invalid")
    props = r.properties() if v5 else NO_PROPERTIES
    return Publish(topic, r.rest(), qos, bool(first & 1), dup, packet_id, props)


def _decode_connect(r: _Reader) -> Connect:
    if r.binary("protocol name") != b"MQTT":
        raise MalformedPacket("CONNECT: protocol name is not MQTT")
    level = r.byte("protocol level")
    if level not in (V311, V5):
        raise MalformedPacket(f"CONNECT: protocol level {level} is neither 4 nor 5")
    flags = r.byte("connect flags")
    if flags & 1:
        raise MalformedPacket("CONNECT: reserved connect flag is set")
    keepalive = r.u16("keep alive")
    v5 = level == V5
    props = r.properties() if v5 else NO_PROPERTIES
    client_id = r.utf8("client id")
    will = None
    if flags & 0x04:
        will_props = r.properties() if v5 else NO_PROPERTIES
        topic = r.utf8("will topic")
        payload = r.binary("will payload")
        will = Will(topic, payload, (flags >> 3) & 3, bool(flags & 0x20), will_props)
    username = r.utf8("user name") if flags & 0x80 else None
    password = r.binary("password").decode(errors="replace") if flags & 0x40 else None
    return Connect(client_id, keepalive, bool(flags & 0x02), username, password, will, props)


# --- framing -------------------------------------------------------------------------------------

Deliver: TypeAlias = Callable[[str, bytes, int, int], None]  # topic, payload, QoS, packet id (0: none)


class Framer:
    """Splits a byte stream into packets; one per connection (it holds the topic aliases).

    ``max_publish`` (bytes of a whole packet): a larger PUBLISH is skipped while it streams, its
    bytes dropped as they come, and reported as :class:`SkippedPublish` (``skipped`` counts
    them). Any other packet larger than ``max_packet`` is malformed. ``topic_alias_maximum``
    is what the client announced in its CONNECT: the broker may set aliases 1 to that.
    """

    def __init__(
        self,
        version: int,
        *,
        max_publish: int | None = None,
        max_packet: int = MAX_PACKET,
        topic_alias_maximum: int = 0,
    ) -> None:
        if version not in (V311, V5):
            raise ValueError(f"protocol level {version} is neither 4 (MQTT 3.1.1) nor 5")
        self.version = version
        self.v5 = version == V5
        self.max_publish = MAX_PACKET if max_publish is None else max_publish
        self.max_packet = max_packet
        self.topic_alias_maximum = topic_alias_maximum
        self.aliases: dict[int, str] = {}
        self.skipped = 0
        self.skipped_bytes = 0
        self._buf = bytearray()
        # A PUBLISH being skipped: bytes of it still to come, its first byte, its size, its head
        # (topic, packet id, properties; None once read) and how long that head is.
        self._skip_left = 0
        self._skip_first = 0
        self._skip_size = 0
        self._skip_head: bytearray | None = None

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete packet held (a skipped PUBLISH holds at most its head)."""
        return len(self._buf) + len(self._skip_head or b"")

    def feed(self, data: bytes | bytearray | memoryview) -> list[Packet | SkippedPublish]:
        """Every packet ``data`` completes, in order (PUBLISH topics with aliases resolved)."""
        out: list[Packet | SkippedPublish] = []
        self.feed_into(data, out, None)
        return out

    def feed_into(
        self,
        data: bytes | bytearray | memoryview,
        out: list[Packet | SkippedPublish],
        deliver: Deliver | None,
    ) -> None:
        """As :meth:`feed`, appending to ``out``; with ``deliver``, each PUBLISH goes to it as
        (topic, payload, QoS, packet id) instead, and only other packets land in ``out``: the
        link's hot path, with no packet object per message."""
        if self._skip_left:
            data = self._skip(data, out)
            if self._skip_left:
                return
        buf = self._buf
        buf += data
        size = len(buf)
        pos = 0
        v5 = self.v5
        aliases = self.aliases
        max_publish = self.max_publish
        try:
            while size - pos >= 2:
                first = buf[pos]
                byte = buf[pos + 1]
                if byte < 0x80:  # a remaining length of one byte: most packets
                    length = byte
                    start = pos + 2
                else:
                    length = byte & 0x7F
                    start = pos + 2
                    shift = 7
                    while True:
                        if start >= size:
                            return  # the rest of the length is still on its way
                        byte = buf[start]
                        start += 1
                        length |= (byte & 0x7F) << shift
                        if byte < 0x80:
                            break
                        shift += 7
                        if shift > 21:
                            raise MalformedPacket("remaining length is longer than 4 bytes")
                end = start + length
                kind = first >> 4
                if kind == PUBLISH:
                    if end - pos > max_publish:
                        self._skip_first = first
                        self._skip_size = end - pos
                        self._skip_left = length
                        self._skip_head = bytearray()
                        taken = min(end, size)
                        self._skip(buf[start:taken], out)  # a copy: buf must stay resizable
                        pos = taken
                        if self._skip_left:
                            return
                        continue
                    if end > size:
                        return
                    if deliver is not None:
                        qos = (first >> 1) & 3
                        if 0 < qos < 3 and length >= 4:
                            at = start + 2 + ((buf[start] << 8) | buf[start + 1])
                            if at + 2 <= end and (not v5 or (at + 2 < end and buf[at + 2] == 0)):
                                try:
                                    topic = buf[start + 2 : at].decode()
                                except UnicodeDecodeError:
                                    topic = ""
                                packet_id = (buf[at] << 8) | buf[at + 1]
                                if topic and packet_id:
                                    deliver(topic, bytes(buf[at + 2 + v5 : end]), qos, packet_id)
                                    pos = end
                                    continue
                        elif qos == 0 and length >= 2:
                            at = start + 2 + ((buf[start] << 8) | buf[start + 1])
                            if at <= end and (not v5 or (at < end and buf[at] == 0)) and not first & 8:
                                try:
                                    topic = buf[start + 2 : at].decode()
                                except UnicodeDecodeError:
                                    topic = ""
                                if topic:
                                    deliver(topic, bytes(buf[at + v5 : end]), 0, 0)
                                    pos = end
                                    continue
                    publish = self._resolve(_decode_publish(first, buf[start:end], v5), aliases)
                    if deliver is not None:
                        deliver(publish.topic, publish.payload, publish.qos, publish.packet_id or 0)
                    else:
                        out.append(publish)
                    pos = end
                    continue
                if end - pos > self.max_packet:
                    raise MalformedPacket(
                        f"{PACKET_NAMES.get(kind, 'packet')} of {end - pos} bytes is larger than "
                        f"the {self.max_packet} allowed"
                    )
                if end > size:
                    return
                out.append(decode(first, buf[start:end], self.version))
                pos = end
        finally:
            if pos:
                del buf[:pos]

    def _resolve(self, publish: Publish, aliases: dict[int, str]) -> Publish:
        alias = publish.properties.topic_alias
        if alias is None:
            if not publish.topic:
                raise MalformedPacket("PUBLISH: empty topic without a topic alias")
            return publish
        if not 0 < alias <= self.topic_alias_maximum:
            raise MalformedPacket(
                f"PUBLISH: topic alias {alias} is outside 1..{self.topic_alias_maximum}"
                " (the Topic Alias Maximum this client announced)"
            )
        if publish.topic:
            aliases[alias] = publish.topic
            return publish
        topic = aliases.get(alias)
        if topic is None:
            raise MalformedPacket(f"PUBLISH: topic alias {alias} was never set on this connection")
        return Publish(
            topic,
            publish.payload,
            publish.qos,
            publish.retain,
            publish.dup,
            publish.packet_id,
            publish.properties,
        )

    def _skip(self, data: bytes | bytearray | memoryview, out: list[Packet | SkippedPublish]) -> memoryview:
        """Consume bytes of the PUBLISH being skipped (reading its head on the way); the rest of
        ``data`` after it."""
        view = memoryview(data)
        take = min(len(view), self._skip_left)
        chunk, rest = view[:take], view[take:]
        self._skip_left -= take
        self.skipped_bytes += take
        head = self._skip_head
        if head is not None:
            used = 0
            while True:
                need = self._head_size(head)
                if need is None:
                    break
                if need > self._skip_size:
                    raise MalformedPacket("PUBLISH: topic, packet id or properties run past its length")
                add = min(need - len(head), take - used)
                head += chunk[used : used + add]
                used += add
                if len(head) < need:
                    break
        if not self._skip_left:
            self.skipped += 1
            head = self._skip_head or bytearray()
            self._skip_head = None
            if self._head_size(head) is not None:
                raise MalformedPacket("PUBLISH: topic, packet id or properties run past its length")
            publish = self._resolve(_decode_publish(self._skip_first, head, self.v5), self.aliases)
            first = self._skip_first
            out.append(
                SkippedPublish(
                    publish.topic,
                    publish.qos,
                    publish.packet_id,
                    self._skip_size,
                    bool(first & 1),
                    bool(first & 8),
                )
            )
        return rest

    def _head_size(self, head: bytearray) -> int | None:
        """Bytes the skipped PUBLISH's head needs, as far as ``head`` tells; None: it is whole."""
        if len(head) < 2:
            return 2
        size = 2 + ((head[0] << 8) | head[1]) + (2 if (self._skip_first >> 1) & 3 else 0)
        if self.v5:
            if len(head) <= size:
                return size + 1
            value = 0
            shift = 0
            at = size
            while True:
                if at >= len(head):
                    return at + 1
                byte = head[at]
                at += 1
                value |= (byte & 0x7F) << shift
                if byte < 0x80:
                    break
                shift += 7
                if shift > 21:
                    raise MalformedPacket("PUBLISH: property length is longer than 4 bytes")
            size = at + value
        return None if len(head) >= size else size
