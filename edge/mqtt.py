"""The one broker connection: TLS, auth, last will, reconnect with backoff, a bounded publish queue.

:class:`MqttLink` owns an :class:`aiomqtt.Client` that is reused across
reconnects (so QoS 1/2 messages in flight survive a reconnect) and a bounded
queue of outgoing messages that fills while the broker is away.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import random
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge.config import MqttConfig
from edge.intake import Intake

log = logging.getLogger("edge.mqtt")


AckToken = tuple[int, int, int]  # (connection generation, message id, QoS)
ANSWERS_IN_FLIGHT_MAX = 256  # QoS 1/2 answers awaiting PUBACK at once, whatever the broker allows
ANSWER_WINDOW_SLACK = 256  # answers paho queues beyond those in flight (the rest wait in MqttLink.queue)
READ_CHUNK = 65536  # bytes read per socket wake-up at most (a few hundred small messages)
WRITE_CHUNK = 65536  # QoS 0 answers coalesced into one socket write, bytes
OUT_PACKETS_MAX = 256  # paho's unwritten packets before the sender waits for the socket to drain
_PUBLISH = 0x30


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
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        return self._count > 0

    def append(self, item: tuple[str, bytes, AckToken | None]) -> None:
        topic, payload, token = item
        raw = topic.encode()
        gen, mid, qos = token if token is not None else (-1, 0, 0)
        self._buf += self._HEAD.pack(gen, mid, qos, len(raw), len(payload))
        self._buf += raw
        self._buf += payload
        self._count += 1

    def popleft(self) -> tuple[str, bytes, AckToken | None]:
        if not self._count:
            raise IndexError("no held inputs")
        buf, pos = self._buf, self._pos
        gen, mid, qos, topic_len, payload_len = self._HEAD.unpack_from(buf, pos)
        pos += self._HEAD.size
        topic = buf[pos : pos + topic_len].decode()
        pos += topic_len
        payload = bytes(buf[pos : pos + payload_len])
        pos += payload_len
        self._count -= 1
        if not self._count:
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
        self._count = 0


MAX_PACKET = 268_435_455  # the largest packet MQTT can frame (a 4-byte remaining length)
PACKET_HEADROOM = 65_536 + 4_096  # a topic of the longest length MQTT allows, plus properties


class MqttLink:
    """Connects, keeps connecting, subscribes and publishes. ``run`` returns when ``stop`` is called."""

    def __init__(
        self,
        cfg: MqttConfig,
        *,
        subscriptions: Callable[[], Sequence[tuple[str, int]]],
        on_message: Callable[[str, bytes, AckToken | None], None],
        on_connected: Callable[[], Awaitable[None]] | None = None,
        status_topic: str,
        subscriptions_file: Path | None = None,
        max_payload_bytes: int | None = None,
        intake: Intake | None = None,
    ) -> None:
        self.cfg = cfg
        # What this client id had subscribed, kept across restarts: a persistent session keeps
        # filters a changed config no longer has, and they are dropped at the next connect.
        self._subscriptions_file = subscriptions_file if cfg.persistent_session else None
        # MQTT 5: the CONNECT's Maximum Packet Size, so the broker never sends a packet much larger
        # than limits.max_payload_bytes (the headroom covers the longest topic and properties;
        # payloads a little above the limit still arrive and are counted as oversized).
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
        self._on_message = self._gate  # every input passes the intake gate (pause_intake)
        self._on_connected = on_connected
        self.status_topic = status_topic
        self.queue: collections.deque[Outgoing] = collections.deque()
        self.dropped = 0
        self.reconnects = 0
        self.connected = asyncio.Event()
        self.ever_connected = asyncio.Event()
        self.last_error: str | None = None
        self._wakeup = asyncio.Event()
        self._stopping = asyncio.Event()
        self._live: aiomqtt.Client | None = None
        self._generation = 0
        self._subscribed: dict[str, int] = {}
        # Filters an earlier process subscribed with this client id: only to drop stale ones at
        # the first connect (every filter is still subscribed anew then, so retained messages
        # such as the discovery read-back come again).
        self._recorded: dict[str, int] = self._load_subscribed()
        # Answers handed to paho on this connection and not yet confirmed (PUBACK for QoS 1/2,
        # written to the socket for QoS 0): paho message id -> order of hand-over. Acknowledgements
        # of inputs wait in ``_held`` (with the order of the last answer before them) until every
        # answer handed over before them is confirmed, so an input is never acknowledged while its
        # answer could still die with the process (paho holds QoS 1 publishes beyond its in-flight
        # window in memory, while a PUBACK for an input is written at once).
        self._handed = 0
        self._session_present = False
        self._unconfirmed: dict[int, int] = {}
        self._held: collections.deque[tuple[int, AckToken]] = collections.deque()
        # The socket reader of the live connection, so intake can pause (back-pressure).
        self._reader: tuple[int, Callable[[], None]] | None = None
        # Inputs read while intake is paused, in order; the socket stays read (so PUBACKs of
        # answers and PINGRESPs are handled) until HOLD_MAX of them wait.
        self._held_in = HeldInputs()
        self._reading_stopped = False
        self._client = self._make_client()

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

    def _make_client(self) -> aiomqtt.Client:
        cfg = self.cfg
        v5 = cfg.protocol == "5"
        properties = None
        kwargs: dict[str, object] = {}
        if v5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            # Inputs stay unacknowledged until answered: allow enough of them in flight.
            properties.ReceiveMaximum = 1000
            if self.max_packet_bytes is not None:
                properties.MaximumPacketSize = self.max_packet_bytes
            if cfg.persistent_session:
                properties.SessionExpiryInterval = cfg.session_expiry_s
                kwargs["clean_start"] = False
            else:
                kwargs["clean_start"] = True
        else:
            kwargs["clean_session"] = not cfg.persistent_session
        client = aiomqtt.Client(
            cfg.host,
            cfg.port,
            username=cfg.resolved_username(),
            password=cfg.resolved_password(),
            identifier=cfg.resolved_client_id(),
            protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
            will=aiomqtt.Will(self.status_topic, b"offline", qos=1, retain=True),
            keepalive=cfg.keepalive,
            tls_context=tls_context(cfg),
            tls_insecure=bool(cfg.tls and cfg.tls.insecure) if cfg.tls_enabled else None,
            properties=properties,
            max_queued_outgoing_messages=cfg.publish_queue,
            timeout=10,
            logger=logging.getLogger("edge.mqtt.client"),
            **kwargs,  # type: ignore[arg-type]
        )
        # Acknowledge QoS 1/2 inputs only once they are answered (see MqttLink.ack): a daemon
        # killed mid-batch gets them again from the broker. paho 2 reads this flag per message.
        client._client._manual_ack = True
        aiomqtt_on_connect = client._client.on_connect

        def on_connect(c: paho.Client, u: Any, flags: Any, rc: ReasonCode, props: Any = None) -> None:
            self._session_present = bool(getattr(flags, "session_present", False))
            if v5:
                # Answers in flight at once: what the broker accepts (its Receive Maximum, 65,535
                # when it sends none; Mosquitto's max_inflight_messages, 20 by default), at most
                # ANSWERS_IN_FLIGHT_MAX (256 in flight keep up with 50,000 answers/s at a 5 ms
                # round trip, and each costs memory). paho keeps 20 unless told, and cannot be
                # told while connected.
                receive_maximum = getattr(props, "ReceiveMaximum", 65535)
                c._max_inflight_messages = max(1, min(int(receive_maximum), ANSWERS_IN_FLIGHT_MAX))
            # Answers paho holds: those in flight and ANSWER_WINDOW_SLACK more, ready to go as
            # PUBACKs come back. Further answers wait in the link's queue (an Outgoing each) and
            # not as paho messages (a message, its info with a Condition and lock, and in MQTT 5
            # a Properties each: about 2 KB): after an outage the backlog's answers would park
            # thousands of those, and the memory they took stays with the process.
            c._max_queued_messages = c._max_inflight_messages + ANSWER_WINDOW_SLACK
            aiomqtt_on_connect(c, u, flags, rc, props)  # type: ignore[misc,arg-type,call-arg]

        client._client.on_connect = on_connect
        return client

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

    def answers_held_back(self) -> bool:
        """Answers wait in the queue because paho holds all it may (ANSWER_WINDOW_SLACK): only
        the broker's PUBACKs let them go, so the socket must be read even while intake is
        paused (the PUBACKs may queue behind inputs)."""
        live = self._live
        if not self.queue or live is None:
            return False
        raw = live._client
        return 0 < raw._max_queued_messages <= len(raw._out_messages)

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

    def _confirmed(self, mid: int) -> None:
        """paho's on_publish: a QoS 0 answer is written, or a QoS 1/2 answer acknowledged."""
        unconfirmed = self._unconfirmed
        if unconfirmed.pop(mid, None) is None:
            return
        held = self._held
        if not held:
            return
        oldest = next(iter(unconfirmed.values()), None)  # insertion order is hand-over order
        while held and (oldest is None or held[0][0] < oldest):
            self._ack_now(held.popleft()[1])

    def _ack_now(self, token: AckToken | None) -> None:
        if token is None or token[0] != self._generation or self._live is None:
            return  # from an earlier connection: the broker sends it again, unacknowledged
        self._live._client.ack(token[1], token[2])

    def _gate(self, topic: str, payload: bytes, token: AckToken | None) -> None:
        if not self.intake_paused and not self._held_in:
            self._consumer(topic, payload, token)
            return
        self._held_in.append((topic, payload, token))
        if self.intake.hold_full(len(self._held_in)):
            self._stop_reading()

    def pause_intake(self) -> None:
        """Hold inputs back from the daemon until :meth:`resume_intake`. The socket is still
        read, so the broker's PUBACKs for answers and its PINGRESPs are handled (the answers
        drain, the connection stays alive); once HOLD_MAX inputs wait, reading stops too and
        further inputs wait in the broker and in TCP buffers."""
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
        """While reading is stopped: one read, for the PUBACKs and PINGRESP queued behind inputs."""
        if self._reading_stopped and self._reader is not None:
            self._reader[1]()

    def _stop_reading(self) -> None:
        if self._reader is not None and not self._reading_stopped:
            asyncio.get_running_loop().remove_reader(self._reader[0])
            self._reading_stopped = True

    def _start_reading(self) -> None:
        if self._reader is None or not self._reading_stopped:
            return
        self._reading_stopped = False
        fd, read = self._reader
        loop = asyncio.get_running_loop()
        loop.add_reader(fd, read)
        loop.call_soon(self._read_if_reading, read)  # bytes may already wait in a TLS buffer

    def _read_if_reading(self, read: Callable[[], None]) -> None:
        if not self._reading_stopped and self._reader is not None and self._reader[1] is read:
            read()

    def stop(self) -> None:
        self._stopping.set()
        self._wakeup.set()

    async def run(self) -> None:
        delay = backoff_delays(self.cfg.reconnect_min_s, self.cfg.reconnect_max_s)
        while not self._stopping.is_set():
            try:
                async with self._client as client:
                    delay = backoff_delays(self.cfg.reconnect_min_s, self.cfg.reconnect_max_s)
                    await self._session(client)
                    if self._stopping.is_set():
                        await self._goodbye(client)
                        return
            except aiomqtt.MqttError as exc:
                self.last_error = str(exc)
            except ssl.SSLError as exc:
                self.last_error = f"TLS: {exc}"
            finally:
                if self.connected.is_set():
                    self.reconnects += 1
                self.connected.clear()
                self._live = None
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

    async def _session(self, client: aiomqtt.Client) -> None:
        # A resumed session may be flooded with queued inputs right after the CONNACK (Mosquitto
        # 2.0 sends past the Receive Maximum), so nothing here waits for a broker round trip
        # before the session's own reader has taken over: an awaited SUBACK or PUBACK would sit
        # behind thousands of PUBLISH packets read one per loop turn and time out, every time.
        self._live = client
        self._generation += 1
        raw = client._client
        aiomqtt_on_publish = raw.on_publish

        def on_publish(c: paho.Client, u: Any, mid: int, rc: ReasonCode, props: Properties) -> None:
            aiomqtt_on_publish(c, u, mid, rc, props)  # type: ignore[call-arg,misc]
            self._confirmed(mid)

        raw.on_publish = on_publish
        # Subscriptions are sent without waiting for their SUBACK (below): aiomqtt, which has no
        # future for them, must not complain about the ids.
        aiomqtt_on_subscribe, aiomqtt_on_unsubscribe = raw.on_subscribe, raw.on_unsubscribe

        def on_subscribe(c: paho.Client, u: Any, mid: int, *rest: Any) -> None:
            if mid in client._pending_subscribes:
                aiomqtt_on_subscribe(c, u, mid, *rest)  # type: ignore[misc]

        def on_unsubscribe(c: paho.Client, u: Any, mid: int, *rest: Any) -> None:
            if mid in client._pending_unsubscribes:
                aiomqtt_on_unsubscribe(c, u, mid, *rest)  # type: ignore[misc]

        raw.on_subscribe = on_subscribe
        raw.on_unsubscribe = on_unsubscribe
        # On the loop thread now: register the socket for writing directly. aiomqtt's callback
        # goes through call_soon_threadsafe (it may be called from its connect thread), which
        # lands after the flush that asked for it has already written everything.
        aiomqtt_register_write = raw.on_socket_register_write
        loop = asyncio.get_running_loop()
        disconnected = client._disconnected

        def writable() -> None:
            try:
                raw.loop_write()
            except Exception as exc:  # as aiomqtt's writer: a broken connection ends the session
                if not disconnected.done():
                    disconnected.set_exception(exc)

        def register_write(_c: Any, _u: Any, sock: Any) -> None:
            try:
                loop.add_writer(sock.fileno(), writable)
            except (OSError, ValueError, RuntimeError) as exc:
                # The socket closed under paho (a reset while it queued a packet; uvloop raises on
                # a closed poll handle): the session ends through the reader, never the process.
                if not disconnected.done():
                    disconnected.set_exception(aiomqtt.MqttError(f"socket closed: {exc}"))

        raw.on_socket_register_write = register_write
        receiver = asyncio.create_task(self._receive(client), name="mqtt-receive")
        sender = asyncio.create_task(self._send(client), name="mqtt-send")
        stopper = asyncio.create_task(self._stopping.wait(), name="mqtt-stop")
        tasks = {receiver, sender, stopper}
        try:
            await asyncio.sleep(0)  # the receiver takes over the socket
            subs = list(self._subscriptions())
            # A persistent session keeps subscriptions a reload removed: drop them on the broker too.
            stale = [t for t in {**self._recorded, **self._subscribed} if t not in dict(subs)]
            if stale:
                self._check(raw.unsubscribe(stale)[0], "unsubscribe")
            if subs and not (self._session_present and self._subscribed == dict(subs)):
                self._check(raw.subscribe([(topic, qos) for topic, qos in subs])[0], "subscribe")
            if self._subscribed != dict(subs) or self._recorded:
                self._recorded = {}
                self._subscribed = dict(subs)
                self._record_subscribed()
            cap, raw._max_queued_messages = raw._max_queued_messages, 0  # answers of a resumed
            try:  # session that paho still holds must not refuse the status
                self._check(raw.publish(self.status_topic, b"online", 1, True).rc, "publish status")
            finally:
                raw._max_queued_messages = cap
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
            if self._on_connected is not None:
                await self._on_connected()
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            receiver.cancel()
            if stopper in done:
                sender.cancel()
                await asyncio.gather(sender, return_exceptions=True)
                await self._drain(client)
            for task in done:
                if task is not stopper and not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raw.on_publish = aiomqtt_on_publish
            raw.on_subscribe, raw.on_unsubscribe = aiomqtt_on_subscribe, aiomqtt_on_unsubscribe
            self._reader = None
            self._held_in.clear()  # unacknowledged: the broker sends them again
            raw.on_socket_register_write = aiomqtt_register_write
            # Acknowledgements for this connection are void now: the broker sends those inputs
            # again (paho resends the unconfirmed answers itself when the session is resumed).
            self._held.clear()
            self._unconfirmed.clear()

    @staticmethod
    def _check(rc: int, what: str) -> None:
        if rc != paho.MQTT_ERR_SUCCESS:
            raise aiomqtt.MqttCodeError(rc, f"could not {what}")

    async def update_subscriptions(self) -> None:
        """Apply a changed subscription list on the live connection (the next connect does it anyway)."""
        client = self._live
        if client is None or not self.connected.is_set():
            return
        wanted = dict(self._subscriptions())
        removed = [t for t in self._subscribed if t not in wanted]
        added = [(t, q) for t, q in wanted.items() if self._subscribed.get(t) != q]
        try:
            if removed:
                await client.unsubscribe(removed)
            if added:
                await client.subscribe(added)
        except aiomqtt.MqttError as exc:
            log.warning("could not update subscriptions now (%s); the next connection will", exc)
            return
        self._subscribed = wanted
        self._record_subscribed()

    async def _receive(self, client: aiomqtt.Client) -> None:
        """Hand each incoming message to ``on_message`` straight from paho's read callback.

        aiomqtt's ``async for client.messages`` costs a queue entry, a task and an ``asyncio.wait``
        per message; taking over paho's ``on_message`` for the session removes all three (see
        docs/performance.md). Ends with :class:`aiomqtt.MqttError` when the connection drops, as
        the iterator did.
        """
        on_message = self._on_message
        generation = self._generation
        raw = client._client

        def deliver(message: paho.MQTTMessage) -> None:
            payload = message.payload  # paho gives bytes
            qos = message.qos
            on_message(message.topic, bytes(payload or b""), (generation, message.mid, qos) if qos else None)

        previous = raw.on_message
        raw.on_message = lambda _client, _userdata, message: deliver(message)
        disconnected = client._disconnected
        self._read_in_bursts(client)
        try:
            queued = client._queue  # what aiomqtt queued before the hand-over, in order
            while not queued.empty():
                early = queued.get_nowait()
                payload = early.payload
                if not isinstance(payload, bytes | bytearray):
                    payload = b"" if payload is None else str(payload).encode()
                token = (generation, early.mid, early.qos) if early.qos else None
                on_message(early.topic.value, bytes(payload), token)
            await asyncio.wait([disconnected])
        finally:
            raw.on_message = previous
        cause = None if disconnected.cancelled() else disconnected.exception()
        raise aiomqtt.MqttError("Disconnected during message iteration") from cause

    def _read_in_bursts(self, client: aiomqtt.Client) -> None:
        """Replace aiomqtt's socket reader by one that frames MQTT packets itself.

        paho reads a packet with three or four ``recv`` calls (command byte, each byte of the
        remaining length, the rest), and builds an ``MQTTMessage`` with a threading lock, and in
        MQTT 5 a ``Properties`` object, per PUBLISH; aiomqtt reads one packet per event-loop turn.
        This reader takes what the socket holds (up to :data:`READ_CHUNK` bytes) in one ``recv``
        and splits it into packets. A QoS 0/1 PUBLISH without properties (what sensors send) goes
        straight to ``on_message`` with the same acknowledgement token as before (the input is
        still acknowledged only once answered, see :meth:`ack`); every other packet (PUBACK,
        SUBACK, PINGRESP, QoS 2, a PUBLISH with MQTT 5 properties, ...) is handed to paho's own
        packet handler unchanged. See docs/performance.md.
        """
        raw = client._client
        sock = raw.socket()
        if sock is None:
            return
        # Answers go out coalesced (see _flush), so Nagle's algorithm has nothing left to merge;
        # it would only hold a lone answer back until the broker's delayed ACK (up to 40 ms).
        setsockopt = getattr(sock, "setsockopt", None)
        if setsockopt is not None:
            with contextlib.suppress(OSError):
                setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        loop = asyncio.get_running_loop()
        on_message = self._on_message
        generation = self._generation
        v5 = raw._protocol == paho.MQTTv5
        buffer = bytearray()
        disconnected = client._disconnected

        def paho_handles(command: int, body: bytearray) -> int:
            raw._in_packet = {
                "command": command,
                "have_remaining": 1,
                "remaining_count": [],
                "remaining_mult": 1,
                "remaining_length": len(body),
                "packet": body,
                "to_process": 0,
                "pos": 0,
            }
            try:
                rc = int(raw._packet_handle())
            except MalformedPacket:
                rc = int(paho.MQTT_ERR_PROTOCOL)
            raw._in_packet = {
                "command": 0,
                "have_remaining": 0,
                "remaining_count": [],
                "remaining_mult": 1,
                "remaining_length": 0,
                "packet": bytearray(b""),
                "to_process": 0,
                "pos": 0,
            }
            return rc

        def split() -> int:
            """Handle every complete packet in ``buffer``; 0 or paho's error code."""
            data = buffer
            size = len(data)
            pos = 0
            rc = 0
            while size - pos >= 2:
                command = data[pos]
                length = 0
                shift = 0
                i = pos + 1
                complete = False
                while i < size:
                    byte = data[i]
                    length |= (byte & 127) << shift
                    i += 1
                    if byte < 128:
                        complete = True
                        break
                    shift += 7
                    if shift > 21:
                        return int(paho.MQTT_ERR_PROTOCOL)  # more than 4 length bytes
                end = i + length
                if not complete or end > size:
                    break  # the rest of this packet is still on its way
                qos = (command >> 1) & 3
                if command & 0xF0 == _PUBLISH and qos < 2 and length >= 2:
                    topic_end = i + 2 + ((data[i] << 8) | data[i + 1])
                    at = topic_end + 2 if qos else topic_end
                    # the fast path: a topic (no MQTT 5 topic alias) and no MQTT 5 properties
                    if topic_end > i + 2 and at <= end and (not v5 or (at < end and data[at] == 0)):
                        try:
                            topic = data[i + 2 : topic_end].decode()
                        except UnicodeDecodeError:
                            topic = ""  # paho reports it
                        if topic:
                            token = (
                                (generation, (data[topic_end] << 8) | data[topic_end + 1], qos)
                                if qos
                                else None
                            )
                            on_message(topic, bytes(data[at + v5 : end]), token)
                            pos = end
                            continue
                rc = paho_handles(command, data[i:end])
                pos = end
                if rc:
                    break
            if pos:
                del data[:pos]
            return rc

        def read() -> None:
            try:
                sock_now = raw._sock
                if sock_now is None:
                    return
                if raw._in_packet["command"]:
                    # aiomqtt's reader left a packet half read at the hand-over: let paho finish it
                    rc = raw._packet_read()
                    if rc == paho.MQTT_ERR_AGAIN:
                        return
                    if rc != paho.MQTT_ERR_SUCCESS:
                        raw._loop_rc_handle(rc)
                        return
                try:
                    data = sock_now.recv(READ_CHUNK)
                except (BlockingIOError, ssl.SSLWantReadError):
                    return
                except ssl.SSLWantWriteError:
                    raw._call_socket_register_write()
                    return
                except OSError as exc:
                    log.debug("socket read failed: %s", exc)
                    raw._loop_rc_handle(paho.MQTT_ERR_CONN_LOST)
                    return
                if not data:
                    raw._loop_rc_handle(paho.MQTT_ERR_CONN_LOST)
                    return
                raw._last_bytes_received = paho.time_func()  # keepalive: the broker is alive
                buffer.extend(data)
                error = split()
                if error:
                    raw._loop_rc_handle(MQTTErrorCode(error))
                    return
                pending = getattr(sock_now, "pending", None)
                if pending is not None and pending() > 0:
                    loop.call_soon(read)  # TLS bytes already decrypted: epoll will not say so
            except Exception as exc:  # as aiomqtt's reader: a broken connection ends the session
                if not disconnected.done():
                    disconnected.set_exception(exc)

        loop.remove_reader(sock.fileno())
        self._reader = (sock.fileno(), read)
        self.intake.reset()  # a new connection starts reading; the daemon pauses it again
        self._reading_stopped = False
        loop.add_reader(sock.fileno(), read)

    async def _send(self, client: aiomqtt.Client) -> None:
        raw = client._client  # the paho client: publishing without awaiting each ack batches writes
        while True:
            if self.queue:
                if raw._sock is None:
                    raise aiomqtt.MqttCodeError(paho.MQTT_ERR_NO_CONN, "not connected")
                if len(raw._out_packet) > OUT_PACKETS_MAX or not self._flush(raw):
                    raw.loop_write()
                    # paho holds all it may: only PUBACKs free it, and they may wait behind
                    # held inputs while the socket is not read (intake paused at HOLD_MAX)
                    self.read_through()
                    await asyncio.sleep(0.005)  # paho's queue is full: let the socket drain
                    continue
            self._wakeup.clear()
            await self._wakeup.wait()

    def _flush(self, raw: paho.Client) -> bool:
        """Hand the queue to paho and write what the socket takes; False when paho's queue is full.

        QoS 0 answers are coalesced into one PUBLISH buffer of up to :data:`WRITE_CHUNK` bytes
        (one ``send`` and one confirmation for all of them, instead of a ``send``, an
        ``MQTTMessageInfo`` with its locks and, in MQTT 5, a ``Properties`` object each). The
        buffer counts as one unconfirmed answer from the moment it is opened, so an input
        acknowledged after one of its answers still waits until that buffer is written.
        """
        queue = self.queue
        v5 = raw._protocol == paho.MQTTv5
        chunk: bytearray | None = None
        chunk_mid = 0
        full = False
        try:
            while queue:
                item = queue[0]
                if not item.topic:
                    queue.popleft()
                    self._ack_after_answers(item.ack)
                    continue
                topic = item.topic.encode()
                payload = item.payload
                if item.qos == 0 and topic and b"+" not in topic and b"#" not in topic and len(topic) < 65536:
                    if chunk is None:
                        chunk_mid = raw._mid_generate()
                        self._handed += 1
                        self._unconfirmed[chunk_mid] = self._handed
                        chunk = bytearray()
                    queue.popleft()
                    length = 2 + len(topic) + len(payload) + v5
                    chunk.append(_PUBLISH | item.retain)
                    while length > 127:
                        chunk.append((length & 127) | 128)
                        length >>= 7
                    chunk.append(length)
                    chunk += len(topic).to_bytes(2, "big")
                    chunk += topic
                    if v5:
                        chunk.append(0)  # no properties
                    chunk += payload
                    self._ack_after_answers(item.ack)
                    if len(chunk) >= WRITE_CHUNK:
                        self._queue_chunk(raw, chunk, chunk_mid)
                        chunk = None
                    continue
                if chunk is not None:
                    self._queue_chunk(raw, chunk, chunk_mid)
                    chunk = None
                info = raw.publish(item.topic, payload, item.qos, item.retain)
                if info.rc == paho.MQTT_ERR_SUCCESS:
                    queue.popleft()
                    self._handed += 1
                    if not info.is_published():
                        self._unconfirmed[info.mid] = self._handed
                    self._ack_after_answers(item.ack)
                    continue
                if info.rc == paho.MQTT_ERR_QUEUE_SIZE:
                    full = True
                    break
                raise aiomqtt.MqttCodeError(info.rc, f"could not publish to {item.topic!r}")
        finally:
            if chunk is not None:
                self._queue_chunk(raw, chunk, chunk_mid)
        raw.loop_write()  # what the socket takes now; paho registers a writer for the rest
        if self.intake.paused and self.on_room is not None and self.intake.outgoing_drained(len(queue)):
            self.on_room("answers")  # answers drained below the low mark: resume now if room
        return not full

    @staticmethod
    def _queue_chunk(raw: paho.Client, chunk: bytearray, mid: int) -> None:
        # One entry of paho's write queue: written in order with its own packets (PUBACKs of
        # inputs, QoS 1 answers), and confirmed by one on_publish(mid) once fully written.
        raw._out_packet.append(
            {
                "command": _PUBLISH,
                "mid": mid,
                "qos": 0,
                "pos": 0,
                "to_process": len(chunk),
                "packet": chunk,
                "info": paho.MQTTMessageInfo(mid),
            }
        )

    async def _drain(self, client: aiomqtt.Client) -> None:
        """At shutdown: hand the queue to paho, then wait until paho has written it all."""
        raw = client._client
        raw._max_queued_messages = 0  # everything to paho now: nothing may be refused at the end
        while self.queue:
            item = self.queue.popleft()
            if item.topic:
                info = raw.publish(item.topic, item.payload, item.qos, item.retain)
                self._handed += 1
                if info.rc == paho.MQTT_ERR_SUCCESS and not info.is_published():
                    self._unconfirmed[info.mid] = self._handed
            self._ack_after_answers(item.ack)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 3.0
        while loop.time() < deadline and (raw._out_messages or raw._out_packet or self._held):  # noqa: ASYNC110
            await asyncio.sleep(0.01)  # paho exposes no event for 'everything written'

    async def _goodbye(self, client: aiomqtt.Client) -> None:
        try:
            await client.publish(self.status_topic, b"offline", qos=1, retain=True, timeout=3)
        except aiomqtt.MqttError as exc:
            log.warning("could not publish offline status: %s", exc)
