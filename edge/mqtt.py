"""The one broker connection: TLS, auth, last will, reconnect with backoff, a bounded publish queue.

:class:`MqttLink` speaks MQTT 3.1.1 or 5 itself over an asyncio transport
(``loop.create_connection``, the public Protocol API), with the sans-IO codec of
edge/mqttcodec.py: no MQTT client library. It keeps QoS 1/2 answers in flight across reconnects
(resent when the session resumes), holds further answers in a bounded queue that fills while the
broker is away, acknowledges QoS 1/2 inputs only once everything queued before them (their
answers) is confirmed, and pauses reading the socket (``pause_reading``) when the daemon holds
the intake back. See docs/architecture.md, "The MQTT link".
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import random
import ssl
import struct
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from edge.config import MqttConfig
from edge.intake import Intake
from edge.mqttcodec import (
    CONNACK_V311,
    MAX_PACKET,
    NO_PROPERTIES,
    V5,
    V311,
    Auth,
    ConnAck,
    Connect,
    Disconnect,
    Framer,
    MalformedPacket,
    Packet,
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
    encode,
    publish_into,
    reason_name,
)

log = logging.getLogger("edge.mqtt")


AckToken = tuple[int, int, int]  # (connection generation, message id, QoS)
ANSWERS_IN_FLIGHT_MAX = 256  # QoS 1/2 answers awaiting PUBACK at once, whatever the broker allows
IN_FLIGHT_V311 = 20  # MQTT 3.1.1 has no Receive Maximum: Mosquitto's default max_inflight_messages
WRITE_CHUNK = 65536  # answers coalesced into one transport write, bytes
RECEIVE_MAXIMUM = 1000  # MQTT 5: inputs the broker may have unacknowledged (they wait for answers)
TOPIC_ALIAS_MAXIMUM = 64  # MQTT 5: topic aliases the broker may set for this client
CONNECT_TIMEOUT_S = 10.0  # TCP (and TLS) connect, then the CONNACK, each
REQUEST_TIMEOUT_S = 10.0  # a SUBACK or UNSUBACK awaited by update_subscriptions
GOODBYE_S = 3.0  # at shutdown: the queue drained, then the offline status acknowledged, at most


class MqttError(Exception):
    """The connection could not be made or ended; the link reconnects after a backoff."""


@dataclass(slots=True)
class Outgoing:
    """A message to publish; ``ack`` is an input to acknowledge once this is handed to the client.

    An item with an empty topic only carries an acknowledgement.
    """

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    ack: AckToken | None = None


def tls_context(cfg: MqttConfig) -> ssl.SSLContext | None:
    if not cfg.tls_enabled:
        return None
    tls = cfg.tls
    context = ssl.create_default_context(cafile=str(tls.ca_file) if tls and tls.ca_file else None)
    if tls and tls.cert_file and tls.key_file:
        context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    if tls and tls.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def backoff_delays(minimum: float, maximum: float, rng: random.Random | None = None) -> Callable[[], float]:
    """Exponential backoff with full jitter: each call returns the next delay."""
    rng = rng or random.Random()
    attempt = 0

    def next_delay() -> float:
        nonlocal attempt
        ceiling = min(maximum, minimum * (2**attempt))
        attempt = min(attempt + 1, 30)
        return float(ceiling / 2 + rng.uniform(0, ceiling / 2))

    return next_delay


class HeldInputs:
    """Inputs held back while the intake is paused, in order, packed into one buffer.

    A backlog after an outage can hold thousands of inputs here (the broker sends them whether or
    not they are acknowledged). As Python objects (a tuple, a topic, a payload, a token each:
    about 450 bytes) they would leave small-object arenas behind that the allocator keeps after
    the backlog; packed they cost their own bytes and the buffer is freed as a whole.
    """

    _HEAD = struct.Struct("<iHBII")  # generation (-1: no token), message id, QoS, topic and payload lengths

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0
        self.count = 0  # read on the hot path as an attribute (no __len__ call per message)

    def __len__(self) -> int:
        return self.count

    def __bool__(self) -> bool:
        return self.count > 0

    def append(self, item: tuple[str, bytes, AckToken | None]) -> None:
        topic, payload, token = item
        raw = topic.encode()
        gen, mid, qos = token if token is not None else (-1, 0, 0)
        self._buf += self._HEAD.pack(gen, mid, qos, len(raw), len(payload))
        self._buf += raw
        self._buf += payload
        self.count += 1

    def popleft(self) -> tuple[str, bytes, AckToken | None]:
        if not self.count:
            raise IndexError("no held inputs")
        buf, pos = self._buf, self._pos
        gen, mid, qos, topic_len, payload_len = self._HEAD.unpack_from(buf, pos)
        pos += self._HEAD.size
        topic = buf[pos : pos + topic_len].decode()
        pos += topic_len
        payload = bytes(buf[pos : pos + payload_len])
        pos += payload_len
        self.count -= 1
        if not self.count:
            self.clear()
        else:
            self._pos = pos
            if pos > 1 << 20 and pos > len(buf) // 2:  # drop the consumed front now and then
                del buf[:pos]
                self._pos = 0
        return topic, payload, (None if gen < 0 else (gen, mid, qos))

    def clear(self) -> None:
        self._buf = bytearray()
        self._pos = 0
        self.count = 0


PACKET_HEADROOM = 65_536 + 4_096  # a topic of the longest length MQTT allows, plus properties


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection's protocol: bytes in to the link, flow control, its end."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        on_data: Callable[[bytes], None],
        on_writable: Callable[[bool], None],
    ) -> None:
        self.on_data = on_data
        self.on_writable = on_writable
        self.active = True  # False once the link's session with it ended
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[None] = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are no asyncio.Transport subclass

    def data_received(self, data: bytes) -> None:
        if self.active:
            self.on_data(data)

    def eof_received(self) -> bool:
        self.fail(MqttError("the broker closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(MqttError(f"connection lost: {exc}" if exc else "connection lost"))

    def pause_writing(self) -> None:
        self.on_writable(False)

    def resume_writing(self) -> None:
        self.on_writable(True)

    def fail(self, exc: Exception) -> None:
        """End the connection with ``exc`` (what the session raises); the first cause wins."""
        if not self.lost.done():
            self.lost.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()


class MqttLink:
    """Connects, keeps connecting, subscribes and publishes. ``run`` returns when ``stop`` is called.

    Two ways to run it: ``await link.run()`` inside the caller's own task group (the daemon does,
    so a link that fails stops the daemon), or ``async with link:``, which runs it in a task of
    its own for the block and, on leaving, stops it (the offline status if it has a status topic,
    then a clean DISCONNECT, so the broker sends no last will) and waits for it, raising what the
    link raised."""

    def __init__(
        self,
        cfg: MqttConfig,
        *,
        subscriptions: Callable[[], Sequence[tuple[str, int]]],
        on_message: Callable[[str, bytes, AckToken | None], None],
        on_connected: Callable[[], Awaitable[None]] | None = None,
        status_topic: str | None,
        subscriptions_file: Path | None = None,
        max_payload_bytes: int | None = None,
        intake: Intake | None = None,
    ) -> None:
        self.cfg = cfg
        self.version = V5 if cfg.protocol == "5" else V311
        # What this client id had subscribed, kept across restarts: a persistent session keeps
        # filters a changed config no longer has, and they are dropped at the next connect.
        self._subscriptions_file = subscriptions_file if cfg.persistent_session else None
        # The CONNECT's Maximum Packet Size (MQTT 5), so the broker never sends a packet much
        # larger than limits.max_payload_bytes (the headroom covers the longest topic and
        # properties; payloads a little above the limit still arrive and are counted as
        # oversized). The framer skips a larger PUBLISH as it streams (MQTT 3.1.1 has no such
        # property): counted in ``oversized``, acknowledged, never buffered whole.
        self.max_packet_bytes = (
            None if max_payload_bytes is None else min(MAX_PACKET, max_payload_bytes + PACKET_HEADROOM)
        )
        # The back-pressure bounds and the pause/resume decision (edge/intake.py). on_room is
        # called (reason "answers") when answers were handed to the socket while paused and
        # the outgoing queue has drained: the daemon resumes then, not on a timer.
        self.intake = intake or Intake(max_queued_inputs=1000, publish_queue=cfg.publish_queue)
        self.on_room: Callable[[str], None] | None = None
        self._subscriptions = subscriptions
        self._consumer = on_message
        self._on_connected = on_connected
        self.status_topic = status_topic
        self.queue: collections.deque[Outgoing] = collections.deque()
        self.dropped = 0
        self.oversized = 0  # PUBLISH packets above max_packet_bytes skipped by the framer
        self.refused = 0  # answers the broker refused (an MQTT 5 PUBACK/PUBREC reason >= 0x80)
        self.reconnects = 0
        self.connected = asyncio.Event()
        self.ever_connected = asyncio.Event()
        self.last_error: str | None = None
        self._wakeup = asyncio.Event()  # the sender: something to send, or room to send it
        self._room = asyncio.Event()  # wait_outgoing_room: the outgoing queue went below its mark
        self._stopping = asyncio.Event()
        self._generation = 0
        self._subscribed: dict[str, int] = {}
        # Filters an earlier process subscribed with this client id: only to drop stale ones at
        # the first connect (every filter is still subscribed anew then, so retained messages
        # such as the discovery read-back come again).
        self._recorded: dict[str, int] = self._load_subscribed()
        # QoS 1/2 answers sent and not yet acknowledged, by packet id (kept across reconnects:
        # resent when the session resumes); those whose PUBREC came (QoS 2) wait for PUBCOMP.
        self._in_flight: dict[int, Outgoing] = {}
        self._released: set[int] = set()
        self._window = IN_FLIGHT_V311
        self._last_id = 0
        # The ledger of this connection: QoS 1/2 answers not yet acknowledged by the broker
        # (packet id -> order of hand-over; a QoS 0 answer is confirmed once handed to the
        # transport, which writes in order, before any later PUBACK). Acknowledgements of inputs
        # wait in ``_held`` (with the order of the last answer before them) until every answer
        # handed over before them is confirmed, so an input is never acknowledged while its
        # answer could still die with the process.
        self._handed = 0
        self._session_present = False
        self._unconfirmed: dict[int, int] = {}
        self._held: collections.deque[tuple[int, AckToken]] = collections.deque()
        # Inputs read while intake is paused, in order; the socket stays read (so PUBACKs of
        # answers and PINGRESPs are handled) until HOLD_MAX of them wait.
        self._held_in = HeldInputs()
        # The live connection and what belongs to it alone.
        self._connection: _Connection | None = None
        self._transport: asyncio.Transport | None = None
        self._framer: Framer | None = None
        self._deliver: Callable[[str, bytes, int, int], None] = self._deliver_nowhere
        self._packets: list[Packet | SkippedPublish] = []
        self._out = bytearray()  # bytes for the transport, written once per burst
        self._write_scheduled = False
        self._write_paused = False
        self._reading_stopped = False
        self._read_once = False
        self._connack: asyncio.Future[ConnAck] | None = None
        self._requests: dict[int, asyncio.Future[SubAck | UnsubAck] | None] = {}
        self._broker_max_packet = MAX_PACKET
        self._keepalive_s = float(cfg.keepalive)
        self._last_in = 0.0
        self._last_out = 0.0
        self._ping_sent: float | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> MqttLink:
        if self._task is not None:
            raise RuntimeError("this MqttLink is already running in an async with block")
        self._task = asyncio.create_task(self.run(), name=f"mqtt-link {self.cfg.resolved_client_id()}")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        self.stop()
        await task

    def _load_subscribed(self) -> dict[str, int]:
        path = self._subscriptions_file
        if path is None:
            return {}
        try:
            with path.open("rb") as handle:
                document = json.loads(handle.read(1 << 20))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("subscription record %s ignored: %s", path, exc)
            return {}
        if not isinstance(document, dict) or document.get("client_id") != self.cfg.resolved_client_id():
            return {}
        filters = document.get("filters")
        if not isinstance(filters, dict):
            return {}
        return {t: q for t, q in filters.items() if isinstance(t, str) and q in (0, 1, 2)}

    def _record_subscribed(self) -> None:
        """Write what is subscribed now (atomically) beside the state; a failure is logged."""
        path = self._subscriptions_file
        if path is None:
            return
        document = {"client_id": self.cfg.resolved_client_id(), "filters": self._subscribed}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(json.dumps(document))
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("could not record the subscriptions in %s: %s", path, exc)

    @property
    def intake_paused(self) -> bool:
        return self.intake.paused

    @property
    def intake_pauses(self) -> int:
        return self.intake.pauses

    @property
    def in_flight(self) -> int:
        """QoS 1/2 answers sent and not yet acknowledged by the broker."""
        return len(self._in_flight)

    @property
    def in_flight_max(self) -> int:
        """The broker's Receive Maximum (MQTT 5; at most ANSWERS_IN_FLIGHT_MAX), IN_FLIGHT_V311 in 3.1.1."""
        return self._window

    def outgoing_full(self) -> bool:
        """Answers are made faster than the broker takes them: the queue holds
        ANSWERS_QUEUED_HIGH (or half of mqtt.publish_queue, if smaller). While connected the
        daemon then stops making answers and pauses the intake until :meth:`outgoing_drained`,
        so a backlog after an outage waits in the broker rather than as answers in memory; while
        the broker is away the queue fills up to mqtt.publish_queue."""
        return self.intake.outgoing_full(len(self.queue))

    def outgoing_drained(self) -> bool:
        """The outgoing queue is down to a quarter of mqtt.publish_queue and half of
        ANSWERS_QUEUED_HIGH: intake may go on."""
        return self.intake.outgoing_drained(len(self.queue))

    async def wait_outgoing_room(self) -> None:
        """Return once the outgoing queue is below its high mark (:meth:`outgoing_full`) or the
        broker is away (answers then queue up to mqtt.publish_queue and its policy drops)."""
        while self.outgoing_full() and self.connected.is_set():
            self._room.clear()
            await self._room.wait()

    def answers_held_back(self) -> bool:
        """Answers wait in the queue because the in-flight window is full: only the broker's
        PUBACKs let them go, so the socket must be read even while intake is paused (the
        PUBACKs may queue behind inputs)."""
        return bool(self.queue) and self._transport is not None and len(self._in_flight) >= self._window

    def publish(self, item: Outgoing) -> None:
        """Queue a message; never blocks. When the queue is full, the policy drops one (counted)."""
        if len(self.queue) >= self.cfg.publish_queue:
            self.dropped += 1
            if self.cfg.publish_queue_policy == "drop_newest":
                self._ack_now(item.ack)
                return
            self._ack_now(self.queue.popleft().ack)
        self.queue.append(item)
        self._wakeup.set()

    def ack(self, token: AckToken | None) -> None:
        """Acknowledge an input once everything queued before it (its answer) is confirmed."""
        if token is not None:
            self.publish(Outgoing("", b"", ack=token))

    def _ack_after_answers(self, token: AckToken | None) -> None:
        if token is None:
            return
        if not self._unconfirmed:
            self._ack_now(token)
        else:
            self._held.append((self._handed, token))

    def _confirmed(self, packet_id: int) -> None:
        """A QoS 1/2 answer is acknowledged by the broker: release the acks that waited for it."""
        unconfirmed = self._unconfirmed
        if unconfirmed.pop(packet_id, None) is None:
            return
        held = self._held
        if not held:
            return
        oldest = next(iter(unconfirmed.values()), None)  # insertion order is hand-over order
        while held and (oldest is None or held[0][0] < oldest):
            self._ack_now(held.popleft()[1])

    def _ack_now(self, token: AckToken | None) -> None:
        if token is None or token[0] != self._generation or self._transport is None:
            return  # from an earlier connection: the broker sends it again, unacknowledged
        # PUBACK (QoS 1) or PUBREC (QoS 2), short form
        self._write(bytes((0x40 if token[2] == 1 else 0x50, 2, token[1] >> 8, token[1] & 0xFF)))

    # --- bytes out -------------------------------------------------------------------------------

    def _write(self, data: bytes | bytearray) -> None:
        """Queue bytes for the transport; written at the end of this burst (one write for many)."""
        self._out += data
        if not self._write_scheduled:
            self._write_scheduled = True
            asyncio.get_running_loop().call_soon(self._write_now)

    def _write_now(self) -> None:
        self._write_scheduled = False
        out = self._out
        if not out:
            return
        self._out = bytearray()
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(out)
            self._last_out = asyncio.get_running_loop().time()

    def _next_id(self) -> int:
        packet_id = self._last_id
        in_use = self._in_flight
        requests = self._requests
        while True:
            packet_id = packet_id % 0xFFFF + 1
            if packet_id not in in_use and packet_id not in requests:
                self._last_id = packet_id
                return packet_id

    def _refuse(self, item: Outgoing, why: str) -> None:
        self.dropped += 1
        log.warning("answer to %r dropped: %s", item.topic[:200], why)

    def _flush(self) -> None:
        """Hand the queue to the transport in order, as far as the in-flight window and the
        transport's write buffer allow. Answers and the PUBACKs of inputs go into one buffer,
        written every :data:`WRITE_CHUNK` bytes and at the end (one ``send`` for many)."""
        if self._transport is None:
            return
        queue = self.queue
        in_flight = self._in_flight
        version = self.version
        window = self._window
        limit = self._broker_max_packet
        v5 = version == V5
        out = self._out
        chunk = WRITE_CHUNK
        while queue and not self._write_paused:
            item = queue[0]
            if not item.topic:
                queue.popleft()
                self._ack_after_answers(item.ack)
                continue
            qos = item.qos
            if qos and len(in_flight) >= window:
                if self._reading_stopped:
                    self.read_through()  # the PUBACKs that make room may wait behind held inputs
                break
            queue.popleft()
            name = item.topic
            topic = name.encode()
            payload = item.payload
            size = len(out)
            if "+" in name or "#" in name or len(topic) > 0xFFFF:
                self._refuse(item, "not a valid topic name")
            elif not qos:  # publish_into inlined: most answers are QoS 0
                length = 2 + len(topic) + len(payload) + v5
                out.append(0x30 | item.retain)
                while length > 0x7F:
                    out.append((length & 0x7F) | 0x80)
                    length >>= 7
                out.append(length)
                out += len(topic).to_bytes(2, "big")
                out += topic
                if v5:
                    out.append(0)  # no properties
                out += payload
            else:
                packet_id = self._next_id()
                publish_into(out, topic, payload, version, qos=qos, retain=item.retain, packet_id=packet_id)
                if len(out) - size <= limit:
                    in_flight[packet_id] = item
                    self._handed += 1
                    self._unconfirmed[packet_id] = self._handed
            if len(out) - size > limit:
                del out[size:]
                self._refuse(item, f"larger than the broker's Maximum Packet Size ({limit} bytes)")
            if item.ack is not None:
                self._ack_after_answers(item.ack)
            if len(out) >= chunk:
                self._write_now()
                out = self._out
        self._write_now()
        if not self.outgoing_full():
            self._room.set()
        if self.intake.paused and self.on_room is not None and self.intake.outgoing_drained(len(queue)):
            self.on_room("answers")  # answers drained below the low mark: resume now if room

    def _send_in_flight(self, resumed: bool) -> None:
        """After a reconnect: the answers still unacknowledged go again, first (DUP when the
        session was resumed; as new when it was not, the broker having lost them)."""
        version = self.version
        out = self._out
        for packet_id, item in self._in_flight.items():
            if packet_id in self._released and resumed:
                out += encode(PubRel(packet_id), version)
                continue
            self._released.discard(packet_id)
            publish_into(
                out,
                item.topic.encode(),
                item.payload,
                version,
                qos=item.qos,
                retain=item.retain,
                packet_id=packet_id,
                dup=resumed,
            )
        self._write_now()

    async def _request(self, packet: Subscribe | Unsubscribe) -> SubAck | UnsubAck:
        future: asyncio.Future[SubAck | UnsubAck] = asyncio.get_running_loop().create_future()
        self._requests[packet.packet_id] = future
        self._write(encode(packet, self.version))
        try:
            return await asyncio.wait_for(future, REQUEST_TIMEOUT_S)
        finally:
            self._requests.pop(packet.packet_id, None)

    # --- bytes in --------------------------------------------------------------------------------

    @staticmethod
    def _deliver_nowhere(topic: str, payload: bytes, qos: int, packet_id: int) -> None:
        raise MqttError("PUBLISH with no connection")

    def _received(self, data: bytes) -> None:
        """The transport read ``data``: frame it, hand PUBLISHes to the intake gate, handle the rest."""
        framer = self._framer
        if framer is None:
            return
        self._last_in = asyncio.get_running_loop().time()
        packets = self._packets
        try:
            framer.feed_into(data, packets, self._deliver)
            for packet in packets:
                self._handle(packet)
        except (MalformedPacket, MqttError) as exc:
            if self._connection is not None:
                self._connection.fail(
                    exc if isinstance(exc, MqttError) else MqttError(f"from the broker: {exc}")
                )
            return
        finally:
            packets.clear()
        if self._out:
            self._write_now()
        if self._read_once and self._reading_stopped and not self.answers_held_back():
            self._read_once = False
            if self._transport is not None:
                self._transport.pause_reading()

    def _handle(self, packet: Packet | SkippedPublish) -> None:
        if isinstance(packet, PubAck | PubComp):
            self._answered(packet.packet_id, packet.reason_code)
        elif isinstance(packet, PubRec):
            if packet.reason_code >= 0x80:
                self._answered(packet.packet_id, packet.reason_code)
            elif packet.packet_id in self._in_flight:
                self._released.add(packet.packet_id)
                self._write(encode(PubRel(packet.packet_id), self.version))
            else:
                self._write(encode(PubRel(packet.packet_id, 0x92 if self.version == V5 else 0), self.version))
        elif isinstance(packet, PubRel):  # a QoS 2 input: PUBREC went with its ack, now complete it
            self._write(encode(PubComp(packet.packet_id), self.version))
        elif isinstance(packet, SkippedPublish):
            self.oversized += 1
            log.warning(
                "a %d-byte PUBLISH on %r skipped: above limits.max_payload_bytes plus headroom (%s bytes)",
                packet.size,
                packet.topic[:200],
                self.max_packet_bytes,
            )
            if packet.qos and packet.packet_id is not None:
                self.ack((self._generation, packet.packet_id, packet.qos))
        elif isinstance(packet, SubAck | UnsubAck):
            self._acknowledged_request(packet)
        elif isinstance(packet, PingResp):
            self._ping_sent = None
        elif isinstance(packet, ConnAck):
            if self._connack is None or self._connack.done():
                raise MqttError("a second CONNACK")
            self._connack.set_result(packet)
        elif isinstance(packet, Disconnect):
            why = packet.properties.reason_string
            raise MqttError(
                f"the broker disconnected: {reason_name(packet.reason_code)}" + (f" ({why})" if why else "")
            )
        elif isinstance(packet, Auth):
            raise MqttError("the broker asked for enhanced authentication (AUTH), which is not supported")
        else:
            raise MqttError(f"unexpected {type(packet).__name__} from the broker")

    def _answered(self, packet_id: int, reason: int) -> None:
        item = self._in_flight.pop(packet_id, None)
        self._released.discard(packet_id)
        if item is None:
            return
        if reason >= 0x80:
            self.refused += 1
            log.warning("the broker refused the answer to %r: %s", item.topic[:200], reason_name(reason))
        self._confirmed(packet_id)
        self._wakeup.set()

    def _acknowledged_request(self, packet: SubAck | UnsubAck) -> None:
        if isinstance(packet, SubAck):
            refused = [code for code in packet.reason_codes if code >= 0x80]
            if refused:
                log.warning(
                    "the broker refused %d subscription(s): %s", len(refused), reason_name(refused[0])
                )
        future = self._requests.pop(packet.packet_id, None)
        if future is not None and not future.done():
            future.set_result(packet)

    # --- intake --------------------------------------------------------------------------------

    def _gate(self, topic: str, payload: bytes, token: AckToken | None) -> None:
        if not self.intake.paused and not self._held_in:
            self._consumer(topic, payload, token)
            return
        self._held_in.append((topic, payload, token))
        if self.intake.hold_full(len(self._held_in)):
            self._stop_reading()

    def pause_intake(self) -> None:
        """Hold inputs back from the daemon until :meth:`resume_intake`. The socket is still
        read, so the broker's PUBACKs for answers and its PINGRESPs are handled (the answers
        drain, the connection stays alive); once HOLD_MAX inputs wait, reading stops too
        (``pause_reading``: what the transport read already is framed and held) and further
        inputs wait in the broker and in TCP buffers."""
        self.intake.pause()

    def resume_intake(self) -> None:
        """Hand the held inputs over in order (until the daemon pauses again), and read on."""
        if not self.intake_paused and not self._held_in and not self._reading_stopped:
            return
        self.intake.paused = False
        held = self._held_in
        while held and not self.intake.paused:
            self._consumer(*held.popleft())
        if self.intake.may_read_again(len(held)):
            self._start_reading()

    def read_through(self) -> None:
        """While reading is stopped: read on until the next chunk came in (and on while answers
        are held back for PUBACKs), for the PUBACKs and PINGRESP queued behind inputs."""
        if self._reading_stopped and self._transport is not None and not self._read_once:
            self._read_once = True
            self._transport.resume_reading()

    def _stop_reading(self) -> None:
        if self._transport is not None and not self._reading_stopped:
            self._transport.pause_reading()
            self._reading_stopped = True

    def _start_reading(self) -> None:
        if self._transport is None or not self._reading_stopped:
            return
        self._reading_stopped = False
        if not self._read_once:
            self._transport.resume_reading()
        self._read_once = False

    # --- the connection ------------------------------------------------------------------------

    def stop(self) -> None:
        self._stopping.set()
        self._wakeup.set()

    async def run(self) -> None:
        delay = backoff_delays(self.cfg.reconnect_min_s, self.cfg.reconnect_max_s)

        def connected() -> None:  # a CONNACK came: the backoff starts again from its minimum
            nonlocal delay
            delay = backoff_delays(self.cfg.reconnect_min_s, self.cfg.reconnect_max_s)

        while not self._stopping.is_set():
            try:
                await self._session(connected)
                return  # stopped
            except MqttError as exc:
                self.last_error = str(exc)
            finally:
                if self.connected.is_set() and not self._stopping.is_set():
                    self.reconnects += 1  # a lost connection (a stop is none)
                self.connected.clear()
                self._room.set()
            if self._stopping.is_set():
                return
            wait = delay()
            log.warning(
                "broker %s:%s unavailable (%s); retrying in %.1fs",
                self.cfg.host,
                self.cfg.port,
                self.last_error,
                wait,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), wait)

    def _writable(self, writable: bool) -> None:
        """The transport's flow control: its write buffer is above (False) or below its high mark."""
        self._write_paused = not writable
        if writable:
            self._wakeup.set()

    async def _open(self, connection: _Connection) -> asyncio.Transport:
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        opening = asyncio.ensure_future(
            loop.create_connection(lambda: connection, cfg.host, cfg.port, ssl=tls_context(cfg))
        )
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            done, _ = await asyncio.wait(
                {opening, stop}, timeout=CONNECT_TIMEOUT_S, return_when="FIRST_COMPLETED"
            )
            if opening not in done:
                opening.cancel()
                with contextlib.suppress(asyncio.CancelledError, OSError):
                    await opening
                raise MqttError(
                    "stopped while connecting"
                    if stop in done
                    else f"no connection within {CONNECT_TIMEOUT_S:.0f} s"
                )
            transport, _ = opening.result()
        except ssl.SSLError as exc:
            raise MqttError(f"TLS: {exc}") from exc
        except OSError as exc:
            raise MqttError(f"could not connect: {exc}") from exc
        finally:
            stop.cancel()
            if not opening.done():
                opening.cancel()  # this task was cancelled while connecting
        return transport

    def _connect_packet(self) -> Connect:
        cfg = self.cfg
        props = NO_PROPERTIES
        if self.version == V5:
            props = Properties(
                # Inputs stay unacknowledged until answered: allow enough of them in flight.
                receive_maximum=RECEIVE_MAXIMUM,
                maximum_packet_size=self.max_packet_bytes,
                session_expiry_interval=cfg.session_expiry_s if cfg.persistent_session else None,
                topic_alias_maximum=TOPIC_ALIAS_MAXIMUM,
            )
        will = None if self.status_topic is None else Will(self.status_topic, b"offline", 1, True)
        return Connect(
            cfg.resolved_client_id(),
            keepalive=cfg.keepalive,
            clean_start=not cfg.persistent_session,
            username=cfg.resolved_username(),
            password=cfg.resolved_password(),
            will=will,
            properties=props,
        )

    async def _session(self, connected: Callable[[], None]) -> None:
        loop = asyncio.get_running_loop()
        connection = _Connection(loop, self._received, self._writable)
        self._generation += 1
        generation = self._generation
        gate = self._gate
        consumer = self._consumer
        intake = self.intake
        held = self._held_in
        v5 = self.version == V5

        def deliver(topic: str, payload: bytes, qos: int, packet_id: int) -> None:
            # the intake gate (_gate) inlined for the common case: not paused, nothing held
            if intake.paused or held.count:
                gate(topic, payload, (generation, packet_id, qos) if qos else None)
            else:
                consumer(topic, payload, (generation, packet_id, qos) if qos else None)

        self._connection = connection
        self._framer = Framer(
            self.version,
            max_publish=self.max_packet_bytes,
            topic_alias_maximum=TOPIC_ALIAS_MAXIMUM if v5 else 0,
        )
        self._deliver = deliver
        self._connack = loop.create_future()
        self._out = bytearray()
        self._write_paused = False
        self._reading_stopped = False
        self._read_once = False
        self._ping_sent = None
        self._keepalive_s = float(self.cfg.keepalive)
        self._broker_max_packet = MAX_PACKET
        self.intake.reset()  # a new connection starts reading; the daemon pauses it again
        tasks: set[asyncio.Task[None]] = set()
        try:
            self._transport = await self._open(connection)
            self._last_in = self._last_out = loop.time()
            self._write(encode(self._connect_packet(), self.version))
            self._write_now()
            ack = await self._await_connack(connection)
            connected()  # the backoff starts again from its minimum
            self._session_present = ack.session_present
            props = ack.properties
            if v5:
                # Answers in flight at once: what the broker accepts (its Receive Maximum, 65,535
                # when it sends none; Mosquitto's max_inflight_messages, 20 by default), at most
                # ANSWERS_IN_FLIGHT_MAX (256 in flight keep up with 50,000 answers/s at a 5 ms
                # round trip). The rest waits in the queue.
                receive_maximum = props.receive_maximum or 65535
                self._window = max(1, min(receive_maximum, ANSWERS_IN_FLIGHT_MAX))
                if props.maximum_packet_size:
                    self._broker_max_packet = props.maximum_packet_size
                if props.server_keep_alive is not None:
                    self._keepalive_s = float(props.server_keep_alive)
            else:
                self._window = IN_FLIGHT_V311
            self._send_in_flight(ack.session_present)
            subs = list(self._subscriptions())
            # A persistent session keeps subscriptions a reload removed: drop them on the broker too.
            stale = [t for t in {**self._recorded, **self._subscribed} if t not in dict(subs)]
            if stale:
                self._requests[packet_id := self._next_id()] = None
                self._write(encode(Unsubscribe(packet_id, tuple(stale)), self.version))
            if subs and not (self._session_present and self._subscribed == dict(subs)):
                self._requests[packet_id := self._next_id()] = None
                wanted = tuple(Subscription(topic, qos) for topic, qos in subs)
                self._write(encode(Subscribe(packet_id, wanted), self.version))
            if self._subscribed != dict(subs) or self._recorded:
                self._recorded = {}
                self._subscribed = dict(subs)
                self._record_subscribed()
            if self.status_topic is not None:  # beyond the window: one message, the first
                packet_id = self._next_id()
                self._in_flight[packet_id] = Outgoing(self.status_topic, b"online", 1, True)
                self._write(
                    encode(Publish(self.status_topic, b"online", 1, True, False, packet_id), self.version)
                )
            self._write_now()
            log.info(
                "connected to %s:%s as %s; %d subscriptions%s",
                self.cfg.host,
                self.cfg.port,
                self.cfg.resolved_client_id(),
                len(subs),
                " (session resumed)" if self._session_present else "",
            )
            self.last_error = None
            self.connected.set()
            self.ever_connected.set()
            sender = asyncio.create_task(self._send(), name="mqtt-send")
            keepalive = asyncio.create_task(self._keepalive(connection), name="mqtt-keepalive")
            stopper = asyncio.create_task(self._wait_stop(), name="mqtt-stop")
            tasks = {sender, keepalive, stopper}
            if self._on_connected is not None:
                await self._on_connected()
            lost = connection.lost
            waiting: set[asyncio.Future[Any]] = {*tasks, lost}
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if stopper in done and not connection.lost.done():
                sender.cancel()
                await asyncio.gather(sender, return_exceptions=True)
                await self._goodbye(connection)
                return
            if connection.lost.done():
                connection.lost.result()  # raises why it ended
            for task in done:
                if task is not stopper and task is not lost and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            raise MqttError("the session ended")  # pragma: no cover (every path above raises)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self._transport is not None:
                self._transport.abort()
            if connection.lost.done() and not connection.lost.cancelled():
                connection.lost.exception()  # retrieved: the error is what the session raised
            else:
                connection.lost.cancel()
            connection.active = False
            self._connection = None
            self._transport = None
            self._framer = None
            self._deliver = self._deliver_nowhere
            self._out = bytearray()
            for future in self._requests.values():
                if future is not None and not future.done():
                    future.cancel()
            self._requests.clear()
            self._held_in.clear()  # unacknowledged: the broker sends them again
            # Acknowledgements for this connection are void now: the broker sends those inputs
            # again (the unacknowledged answers are resent at the next connect).
            self._held.clear()
            self._unconfirmed.clear()

    async def _wait_stop(self) -> None:
        await self._stopping.wait()

    async def _await_connack(self, connection: _Connection) -> ConnAck:
        assert self._connack is not None
        stop = asyncio.ensure_future(self._stopping.wait())
        waiting: set[asyncio.Future[Any]] = {self._connack, connection.lost, stop}
        try:
            done, _ = await asyncio.wait(
                waiting, timeout=CONNECT_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            stop.cancel()
        if self._connack not in done:
            if connection.lost.done():
                connection.lost.result()
            if stop in done:
                raise MqttError("stopped while waiting for the CONNACK")
            raise MqttError(f"no CONNACK within {CONNECT_TIMEOUT_S:.0f} s")
        ack = self._connack.result()
        if ack.reason_code:
            if self.version == V5:
                why = ack.properties.reason_string
                name = reason_name(ack.reason_code) + (f" ({why})" if why else "")
            else:
                name = CONNACK_V311.get(ack.reason_code, f"return code {ack.reason_code}")
            raise MqttError(f"connection refused: {name}")
        return ack

    async def _send(self) -> None:
        while True:
            self._wakeup.clear()
            if self.queue and not self._write_paused:
                self._flush()
            await self._wakeup.wait()

    async def _keepalive(self, connection: _Connection) -> None:
        """PINGREQ when the line was quiet; no bytes from the broker within the keepalive after
        a PINGREQ ends the connection (a half-open link). While reading is stopped the daemon
        reads through every keepalive / 3, so the broker's bytes still count."""
        loop = asyncio.get_running_loop()
        while True:
            keepalive = self._keepalive_s
            if keepalive <= 0:
                await asyncio.Event().wait()
            await asyncio.sleep(keepalive / 4)
            now = loop.time()
            if self._ping_sent is not None:
                if self._last_in > self._ping_sent:
                    self._ping_sent = None  # the broker is alive: it sent something since
                elif now - self._ping_sent >= keepalive:
                    connection.fail(
                        MqttError(f"no answer from the broker within the keepalive ({keepalive:.0f} s)")
                    )
                    return
            if self._ping_sent is None and (
                now - self._last_out >= keepalive * 0.75 or now - self._last_in >= keepalive
            ):
                self._write(b"\xc0\x00")  # PINGREQ
                self._write_now()
                self._ping_sent = now

    async def _goodbye(self, connection: _Connection) -> None:
        """At shutdown: send what is queued (within the window), wait for its PUBACKs and the
        acks they hold, publish the offline status, and disconnect cleanly (no will)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + GOODBYE_S
        while (self.queue or self._in_flight or self._held) and not connection.lost.done():
            self._wakeup.clear()
            self._flush()
            left = deadline - loop.time()
            if left <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), left)
        if self.status_topic is not None and not connection.lost.done():
            packet_id = self._next_id()
            self._in_flight[packet_id] = Outgoing(self.status_topic, b"offline", 1, True)
            self._write(
                encode(Publish(self.status_topic, b"offline", 1, True, False, packet_id), self.version)
            )
            self._write_now()
            while packet_id in self._in_flight and not connection.lost.done():
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), GOODBYE_S)
                except TimeoutError:
                    log.warning("could not publish offline status: no PUBACK within %.0f s", GOODBYE_S)
                    break
        self._in_flight.clear()  # a clean disconnect: nothing of this process waits to be resent
        self._released.clear()
        if self._transport is not None and not connection.lost.done():
            self._write(encode(Disconnect(), self.version))
            self._write_now()
            self._transport.close()  # writes what is buffered, then closes
            with contextlib.suppress(TimeoutError, MqttError):
                await asyncio.wait_for(asyncio.shield(connection.lost), 1.0)
            self._transport = None

    async def update_subscriptions(self) -> None:
        """Apply a changed subscription list on the live connection (the next connect does it anyway)."""
        if self._transport is None or not self.connected.is_set():
            return
        wanted = dict(self._subscriptions())
        removed = [t for t in self._subscribed if t not in wanted]
        added = [(t, q) for t, q in wanted.items() if self._subscribed.get(t) != q]
        try:
            if removed:
                await self._request(Unsubscribe(self._next_id(), tuple(removed)))
            if added:
                await self._request(Subscribe(self._next_id(), tuple(Subscription(t, q) for t, q in added)))
        except (MqttError, TimeoutError, asyncio.CancelledError) as exc:
            task = asyncio.current_task()
            if isinstance(exc, asyncio.CancelledError) and (task is None or task.cancelling()):
                raise  # this task is cancelled (not only the request, by a lost connection)
            log.warning(
                "could not update subscriptions now (%s); the next connection will", exc or "connection lost"
            )
            return
        self._subscribed = wanted
        self._record_subscribed()
