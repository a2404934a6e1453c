"""Messages no consumer can use go to ``textnlp.dead_letter``, with the reason, and are acked.

Anyone who can write to Redis can push anything into a queue: text that is not JSON, JSON that
is not a message envelope, an envelope for a task that does not exist, or arguments the task
cannot take. None of that may stop a worker or be silently dropped. ``dead_letter`` is the one
function every consumer calls for such a message (the Celery consumer hooks below, the broker
transport in ``broker_transport``, the generation task for bad arguments): it publishes a JSON
record (reason, source queue, time, the message as received) to the dead-letter queue and logs
one line saying why. Nobody consumes that queue; operators inspect and requeue from it.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from celery.worker.consumer import Consumer
from kombu.connection import Connection
from kombu.entity import Exchange, Queue

from textnlp_jobs.constants import DEAD_LETTER_QUEUE

log = logging.getLogger(__name__)

DEAD_LETTER = Queue(DEAD_LETTER_QUEUE, Exchange(DEAD_LETTER_QUEUE, type="direct"), routing_key=DEAD_LETTER_QUEUE)
_MAX_RAW_CHARS = 64 * 1024


def _jsonable(body: Any) -> Any:
    if isinstance(body, bytes | bytearray | memoryview):
        raw = bytes(body)
        try:
            return raw.decode("utf-8")[:_MAX_RAW_CHARS]
        except UnicodeDecodeError:
            return {"base64": base64.b64encode(raw[:_MAX_RAW_CHARS]).decode("ascii")}
    if isinstance(body, str):
        return body[:_MAX_RAW_CHARS]
    if body is None or isinstance(body, bool | int | float | dict | list):
        return body
    return repr(body)[:_MAX_RAW_CHARS]


def dead_letter_record(message_body: Any, reason: str, *, source_queue: str | None = None,
                       detail: str = "") -> dict[str, Any]:
    """What the dead-letter queue holds for one message."""
    return {
        "reason": reason,
        "detail": detail[:1000],
        "source_queue": source_queue,
        "dead_lettered_at": datetime.now(UTC).isoformat(),
        "message": _jsonable(message_body),
    }


def dead_letter(message_body: Any, reason: str, *, connection: Connection, source_queue: str | None = None,
                detail: str = "") -> None:
    """Publish ``message_body`` (raw bytes, text or a decoded envelope) to the dead-letter queue
    with ``reason`` (a short code such as ``not_json``, ``unknown_task``, ``bad_arguments``)."""
    record = dead_letter_record(message_body, reason, source_queue=source_queue, detail=detail)
    with connection.Producer() as producer:
        producer.publish(record, exchange=DEAD_LETTER.exchange, routing_key=DEAD_LETTER_QUEUE,
                         declare=[DEAD_LETTER], serializer="json", retry=True,
                         retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5})
    # The reason and queue only: the body may hold anything, including prompt text.
    log.error("message_dead_lettered reason=%s source_queue=%s detail=%s", reason, source_queue, detail[:200])


def received_envelope(message: Any) -> Any:
    """The message as it arrived, for the record (kombu keeps the transport's raw payload)."""
    raw = getattr(message, "_raw", None)
    if raw is not None:
        return raw
    return {"headers": getattr(message, "headers", None), "body": _jsonable(getattr(message, "body", None)),
            "properties": getattr(message, "properties", None)}


def dead_letter_message(app: Any, message: Any, reason: str, detail: str = "") -> None:
    """Dead-letter a delivered kombu ``message`` and ack it. If the broker fails too, the message
    stays unacked and comes back."""
    delivery = getattr(message, "delivery_info", None) or {}
    queue = delivery.get("routing_key") if isinstance(delivery, dict) else None
    try:
        with app.connection_for_write() as connection:
            dead_letter(received_envelope(message), reason, connection=connection, source_queue=queue, detail=detail)
    except Exception:
        log.exception("dead_letter_failed reason=%s source_queue=%s", reason, queue)
        return
    try:
        message.ack()
    except Exception:  # the connection went meanwhile: the message comes back and is checked again
        log.warning("dead_lettered_message_not_acked reason=%s source_queue=%s", reason, queue)


class DeadLetteringConsumer(Consumer):  # type: ignore[misc]
    """Celery's consumer with every "cannot use this message" path sending the message to the
    dead-letter queue and acking it, instead of rejecting (dropping) it or crashing the worker."""

    def _dead_letter(self, message: Any, reason: str, exc: BaseException | None = None) -> None:
        dead_letter_message(self.app, message, reason, f"{type(exc).__name__}: {exc}" if exc is not None else "")

    def on_decode_error(self, message: Any, exc: BaseException) -> None:
        self._dead_letter(message, "undecodable_body", exc)

    def on_unknown_message(self, body: Any, message: Any) -> None:
        self._dead_letter(message, "not_a_task_message")

    def on_unknown_task(self, body: Any, message: Any, exc: BaseException) -> None:
        self._dead_letter(message, "unknown_task", exc)

    def on_invalid_task(self, body: Any, message: Any, exc: BaseException) -> None:
        self._dead_letter(message, "invalid_task", exc)

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Callable[[Any], Any]:
        handler: Callable[[Any], Any] = super().create_task_handler(*args, **kwargs)

        def on_task_received(message: Any) -> Any:
            # Celery handles the failures it expects; anything else a malformed message raises
            # here (a missing header, a wrong type) would otherwise stop the whole worker.
            try:
                return handler(message)
            except Exception as exc:
                return self._dead_letter(message, "malformed_task_message", exc)

        return on_task_received
