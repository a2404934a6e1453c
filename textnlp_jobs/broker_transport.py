"""kombu's Redis transport, with malformed messages dead-lettered before they can stop a worker.

kombu decodes each item it pops from a queue list as a JSON envelope and builds a message from
it; an item that is not JSON, or JSON of the wrong shape, raises inside the worker's event loop,
which Celery treats as unrecoverable (``redis-cli LPUSH textnlp.gen.demo 'not json'`` stopped a
worker). This channel checks every popped item first and hands a bad one to ``dead_letter``.
Celery uses it through the ``broker_transport`` setting whenever the broker is Redis.
"""

from __future__ import annotations

import base64
import binascii
import json
from queue import Empty
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str

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


class Channel(kombu_redis.Channel):
    """A Redis channel that never delivers an item it cannot turn into a message."""

    _shared_client: Any = None
    _bulk_pop = True

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
        for item in items or ():
            payload = self._checked(item, queue)
            if payload is not None:
                self.connection._deliver(payload, queue)

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
