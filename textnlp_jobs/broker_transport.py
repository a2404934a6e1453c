"""kombu's Redis transport, with malformed messages dead-lettered before they can stop a worker,
and a device worker's messages recorded and acked many to a round trip.

kombu decodes each item it pops from a queue list as a JSON envelope and builds a message from
it; an item that is not JSON, or JSON of the wrong shape, raises inside the worker's event loop,
which Celery treats as unrecoverable (``redis-cli LPUSH textnlp.gen.demo 'not json'`` stopped a
worker). This channel checks every popped item first and hands a bad one to ``dead_letter``.

kombu keeps every delivered, unacked message in a Redis hash and a sorted index (so a dead
worker's messages are restored after the visibility timeout), with one transaction per message
when it arrives and another when it is acked. At a device worker's rates that was half of its
process's time, so here the messages of one bulk pop are recorded in one transaction before any
is handed on, and acks made inside ``QoS.acks_together`` go out in one when it closes. What is
written is what kombu writes; its restore and visibility-timeout logic read it unchanged.
Celery uses this transport through the ``broker_transport`` setting whenever the broker is Redis.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from queue import Empty
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps

from textnlp_jobs.dead_letter import dead_letter

TRANSPORT = "textnlp_jobs.broker_transport:Transport"
# The most messages one extra pop takes (never more than the consumer's free prefetch slots).
BULK_POP_MAX = 128


def envelope_problem(payload: Any) -> str | None:
    """Why ``payload`` (a decoded item) is not a message envelope kombu can deliver, or None."""
    if not isinstance(payload, dict):
        return "envelope_not_an_object"
    properties = payload.get("properties")
    if not isinstance(properties, dict):
        return "envelope_without_properties"
    if not isinstance(properties.get("delivery_tag"), str | int) or isinstance(properties.get("delivery_tag"), bool):
        return "envelope_without_delivery_tag"
    info = properties.get("delivery_info")
    if not isinstance(info, dict) or "exchange" not in info or "routing_key" not in info:
        return "envelope_without_delivery_info"
    headers = payload.get("headers")
    if headers is not None and not isinstance(headers, dict):
        return "headers_not_an_object"
    body = payload.get("body")
    if body is not None and not isinstance(body, str):
        return "body_not_text"
    if body and properties.get("body_encoding") == "base64":
        try:
            base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            return "body_not_base64"
    return None


class QoS(kombu_redis.QoS):
    """kombu's Redis ack emulation, with many messages recorded, or acked, in one transaction."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._gathering = threading.local()  # this thread's acks held by ``acks_together``

    def append_many(self, messages: Sequence[Any]) -> None:
        """``append`` for many messages: the unacked index and hash entries kombu writes for each,
        in one transaction, then the in-memory record."""
        if not messages:
            return
        now = time.time()
        with self.pipe_or_acquire() as pipe:
            pipe.zadd(self.unacked_index_key, {m.delivery_tag: now for m in messages})
            pipe.hset(self.unacked_key, mapping={
                m.delivery_tag: dumps([m._raw, m.delivery_info["exchange"], m.delivery_info["routing_key"]])
                for m in messages})
            pipe.execute()
        for message in messages:
            virtual.QoS.append(self, message, message.delivery_tag)

    @contextlib.contextmanager
    def acks_together(self) -> Iterator[None]:
        """Acks this thread makes inside the block reach Redis in one transaction as it closes (a
        message is acked only after its outcome is written, so a later ack is still a safe one)."""
        if self.gathering():  # nested: the outer block sends them
            yield
            return
        self._gathering.tags = []
        try:
            yield
        finally:
            tags, self._gathering.tags = self._gathering.tags, None
            self._ack_now(tags)

    def gathering(self) -> bool:
        """Whether acks this thread makes now wait for its ``acks_together`` block to close."""
        return getattr(self._gathering, "tags", None) is not None

    def ack(self, delivery_tag: Any) -> None:
        tags = getattr(self._gathering, "tags", None)
        if tags is None:
            self._ack_now([delivery_tag])
        else:
            tags.append(delivery_tag)

    def _ack_now(self, tags: list[Any]) -> None:
        if not tags:
            return
        with self.pipe_or_acquire() as pipe:
            pipe.zrem(self.unacked_index_key, *tags).hdel(self.unacked_key, *tags).execute()
        for tag in tags:
            virtual.QoS.ack(self, tag)


class Channel(kombu_redis.Channel):
    """A Redis channel that never delivers an item it cannot turn into a message."""

    QoS = QoS
    _shared_client: Any = None
    _bulk_pop = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._acking: dict[str, Callable[[Any], Any]] = {}  # queue -> callback of a consumer that acks
        super().__init__(*args, **kwargs)

    def basic_consume(self, queue: str, no_ack: bool, callback: Callable[[Any], Any], consumer_tag: str,
                      **kwargs: Any) -> Any:
        """As kombu's, and remember the callback of a consumer that acks, so a bulk pop can record
        its messages together (``_pop_more``) and hand each to it."""
        result = super().basic_consume(queue, no_ack, callback, consumer_tag, **kwargs)
        if not no_ack:
            self._acking[queue] = callback
        return result

    def basic_cancel(self, consumer_tag: str) -> Any:
        queue = self._tag_to_queue.get(consumer_tag)
        if queue is not None:
            self._acking.pop(queue, None)
        return super().basic_cancel(consumer_tag)

    def _create_client(self, asynchronous: bool = False) -> Any:
        """One client for the channel's synchronous work, not a new one per call: kombu builds a
        ``redis.Redis`` for every ack and every unacked-index update, and each one fills a dict of
        a few hundred response callbacks (a tenth of a device worker's GIL time at 150 jobs/s).
        A client is thread-safe (each command takes a connection from the pool); it is rebuilt
        when the channel gets a new pool after a reconnect."""
        if asynchronous:
            return super()._create_client(asynchronous=True)
        pool = self.pool
        client = self._shared_client
        if client is None or client.connection_pool is not pool:
            client = self._shared_client = super()._create_client()
        return client

    def _checked(self, raw: Any, queue: str) -> Any | None:
        """The decoded envelope, or None after dead-lettering an item that is not one."""
        text = bytes_to_str(raw)
        try:
            payload = json.loads(text)
        except ValueError as error:
            reason, detail = "not_json", str(error)
        else:
            problem = envelope_problem(payload)
            if problem is None:
                return payload
            reason, detail = problem, ""
        with self.connection.client.clone() as connection:
            dead_letter(text, reason, connection=connection, source_queue=queue, detail=detail)
        return None

    def _brpop_read(self, **options: Any) -> bool:
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                # Disconnect so the next poll reconnects (as kombu's own channel does).
                self.client.connection.disconnect()
                raise
            if not dest__item:
                raise Empty()
            key, item = dest__item
            key = bytes_to_str(key)
            dest = key.rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            payload = self._checked(item, dest)
            if payload is not None:
                self.connection._deliver(payload, dest)
            self._pop_more(key, dest)
            return True
        finally:
            self._in_poll = None  # type: ignore[assignment]
            flush = getattr(self, "_flush_brpop_reauth", None)
            if flush is not None:
                flush()

    def _pop_more(self, key: str, queue: str) -> None:
        """After a blocking pop delivered one message, take up to the free prefetch slots more
        from the same list in one ``RPOP key count``: a device worker whose queue holds hundreds
        of jobs receives them in a few round trips, not one event-loop turn each. Only on a
        channel with a prefetch limit (a consumer that asked for a bounded number in flight)."""
        if not self.qos.prefetch_count or not self._bulk_pop:
            return
        room = min(BULK_POP_MAX, self.qos.can_consume_max_estimate() or 0)
        if room <= 0:
            return
        if self.global_keyprefix and key.startswith(self.global_keyprefix):
            key = key[len(self.global_keyprefix):]  # the client adds it again
        try:
            with self.conn_or_acquire() as client:
                items = client.rpop(key, room)
        except self.ResponseError:  # a Redis before 6.2 has no count argument: one per pop, as kombu
            self._bulk_pop = False
            return
        payloads = [payload for payload in (self._checked(item, queue) for item in items or ()) if payload is not None]
        consumer = self._acking.get(queue)
        if consumer is None or not isinstance(self.qos, QoS):  # kombu's own QoS without ack emulation
            for payload in payloads:  # kombu's own path: one transaction per message
                self.connection._deliver(payload, queue)
            return
        # Every message is recorded as unacked before any is handed on (and so before any can be
        # acked), as kombu does for one.
        messages = [self.Message(payload, channel=self) for payload in payloads]
        self.qos.append_many(messages)
        for message in messages:
            consumer(message)

    def _get(self, queue: str, timeout: Any = None) -> Any:
        with self.conn_or_acquire() as client:
            for priority in self.priority_steps:
                item = client.rpop(self._q_for_pri(queue, priority))
                if item:
                    payload = self._checked(item, queue)
                    if payload is not None:
                        return payload
            raise Empty()


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with the checking channel."""

    Channel = Channel
