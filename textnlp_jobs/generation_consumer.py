"""How a device worker takes its generation messages: a consumer step, not a task thread per job.

Celery's own path gives every message a Request, a pool thread and a trace, and the thread then
blocks on the ledger and the engine. At a continuous batch of 128 that is 256 threads and about
4 ms of worker CPU per job, more than the device needs to generate it. This Celery consumer
bootstep consumes the device's queues (its models' queues and its pinned queue) with a plain
kombu consumer on the worker's connection and hands each job id to ``DeviceRuntime.deliver``,
which claims what arrived together in one statement and writes what finished together in one.

What stays as before:
- ``acks_late``: a message is acked only when its job's outcome is in the ledger (``done``); a
  killed worker's unacked messages come back (the Redis visibility timeout, kombu's restore);
- at most ``prefetch`` messages are unacked at once (the in-flight jobs of this worker);
- a message that is not a ``textnlp.generate`` call with one job id is dead-lettered and acked;
- Flower sees each job as a task: ``task-received``, then ``task-succeeded`` or, for a job that
  ended failed or dead, ``task-failed`` (sent when the worker's events are on);
- a warm shutdown stops taking messages, waits for the jobs in flight and acks them.
Celery itself still consumes a queue of its own (``control_queue``) and answers remote control.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

from celery import bootsteps
from celery.worker.control import inspect_command
from kombu.entity import Exchange, Queue
from kombu.messaging import Consumer

from textnlp_jobs.constants import GENERATE_TASK
from textnlp_jobs.dead_letter import dead_letter_message

log = logging.getLogger(__name__)

# Outcomes after which Flower must show the task as failed.
FAILED_OUTCOMES = frozenset({"failed", "dead"})


def control_queue(device_queue: str) -> str:
    """The queue Celery's own task consumer watches in a device worker (nothing is sent to it;
    the generation queues are the step's)."""
    return f"{device_queue}.celery"


def job_id_from_args(args: Any, kwargs: Any) -> uuid.UUID | None:
    """The job id of a ``textnlp.generate`` call: exactly one positional job id, no keywords."""
    if kwargs or not isinstance(args, list | tuple) or len(args) != 1 or not isinstance(args[0], str):
        return None
    try:
        return uuid.UUID(args[0])
    except ValueError:
        return None


def job_id_of(headers: Any, body: Any) -> tuple[uuid.UUID | None, str]:
    """The job id a ``textnlp.generate`` message carries, or None and why it is not one."""
    if not isinstance(headers, dict) or headers.get("task") != GENERATE_TASK:
        return None, "unknown_task"
    if not isinstance(headers.get("id"), str):
        return None, "malformed_task_message"
    if not (isinstance(body, list | tuple) and len(body) >= 2 and isinstance(body[0], list | tuple)):
        return None, "malformed_task_message"
    job_id = job_id_from_args(body[0], body[1])
    return (job_id, "") if job_id is not None else (None, "bad_arguments")


def install(app: Any, runtime: Any, queues: list[str], *, prefetch: int, drain_seconds: float) -> None:
    """Add a ``GenerationStep`` for ``runtime`` and ``queues`` to ``app``'s worker consumer, and
    make this worker's ``active_queues`` answer name them (health checks, the reconciler and
    the dead-letter sweep ask it which queues have a consumer)."""
    step = type("GenerationStep", (GenerationStep,), {
        "runtime": runtime, "queues": tuple(queues), "prefetch": prefetch, "drain_seconds": drain_seconds})
    app.steps["consumer"].add(step)

    @inspect_command()  # replaces Celery's own in this process: same answer plus the step's queues
    def active_queues(state: Any) -> list[dict[str, Any]]:
        """List the task queues a worker is currently consuming from."""
        task_consumer = state.consumer.task_consumer
        celery_queues = list(task_consumer.queues) if task_consumer else []
        return [dict(queue.as_dict(recurse=True)) for queue in [*celery_queues, *step_queues(queues)]]


def step_queues(names: Sequence[str]) -> list[Queue]:
    """The step's queues, declared as Celery declares a queue it creates on demand."""
    return [Queue(name, Exchange(name), routing_key=name) for name in names]


class GenerationStep(bootsteps.ConsumerStep):  # type: ignore[misc]
    """Consumes ``queues`` into ``runtime`` (a ``DeviceRuntime``); see the module docstring."""

    requires = ("celery.worker.consumer.tasks:Tasks",)
    runtime: Any = None
    queues: tuple[str, ...] = ()
    prefetch = 64
    drain_seconds = 60.0

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.consumer: Any = None  # Celery's consumer (connection, event dispatcher, event loop)
        self.channel: Any = None  # the channel the step's consumer is on (its QoS holds the unacked)
        self._wake_fds: tuple[int, int] | None = None

    def start(self, c: Any) -> None:
        self.consumer = c
        super().start(c)
        if self.runtime is not None:
            self.runtime.outcomes_together = self.acks_together
        hub = getattr(c, "hub", None)
        if hub is not None and self._wake_fds is None:
            # With every prefetch slot taken the transport stops asking Redis for this channel, and
            # the event loop sleeps in a blocking pop on Celery's own queue for up to a second. An
            # ack from another thread frees a slot but cannot end that sleep; a byte on this pipe
            # does, so the next pop goes out at once (without it, 0.5 of the throughput was lost).
            read_end, write_end = os.pipe()
            os.set_blocking(read_end, False)
            os.set_blocking(write_end, False)
            hub.add_reader(read_end, self._woken, read_end)
            self._wake_fds = (read_end, write_end)

    def _woken(self, read_end: int) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(read_end, 4096)

    def _wake(self) -> None:
        if self._wake_fds is not None:
            with contextlib.suppress(BlockingIOError, OSError):
                os.write(self._wake_fds[1], b"w")

    @contextlib.contextmanager
    def acks_together(self) -> Iterator[None]:
        """The acks of outcomes told inside the block go to the broker in one round trip as it
        closes (broker_transport.QoS), and the event loop is woken once for the freed slots."""
        gather = getattr(getattr(self.channel, "qos", None), "acks_together", None)
        if gather is None or self._gathering():  # none, or nested: the outer block wakes
            yield
            return
        try:
            with gather():
                yield
        finally:
            self._wake()

    def _gathering(self) -> bool:
        """Whether this thread is inside ``acks_together`` (its acks, and the wake-up, wait for
        the block's end)."""
        gathering = getattr(getattr(self.channel, "qos", None), "gathering", None)
        return bool(gathering is not None and gathering())

    def get_consumers(self, channel: Any) -> list[Consumer]:
        self.channel = channel
        consumer = Consumer(channel, queues=step_queues(self.queues), callbacks=[self.on_message], accept=["json"],
                            on_decode_error=self.on_decode_error, no_ack=False)
        consumer.qos(prefetch_count=self.prefetch)
        return [consumer]

    def shutdown(self, c: Any) -> None:
        """A warm shutdown: stop taking messages, let the jobs in flight finish and be acked, then
        close. (A broker reconnect only stops and restarts the step; jobs in flight carry on.)"""
        self._close(c, True)  # cancel the consumers: nothing new arrives
        left = self.runtime.drain(self.drain_seconds) if self.runtime is not None else 0
        if left:
            log.warning("shutdown_with_jobs_in_flight count=%d", left)
        super().shutdown(c)
        if self._wake_fds is not None:
            hub = getattr(c, "hub", None)
            if hub is not None:
                hub.remove_reader(self._wake_fds[0])
            for fd in self._wake_fds:
                os.close(fd)
            self._wake_fds = None

    # --- per message: as little as possible on the consumer's thread -------------------------
    def on_message(self, body: Any, message: Any) -> None:
        job_id, reason = job_id_of(message.headers, body)
        if job_id is None:
            self._dead_letter(message, reason)
            return
        task_id = message.headers["id"]
        received = time.monotonic()
        self._event("task-received", uuid=task_id, name=GENERATE_TASK, args=repr([str(job_id)]), kwargs="{}",
                    retries=0, eta=None, hostname=self.consumer.hostname if self.consumer else None)

        def done(outcome: str, *, requeue: bool = False) -> None:
            if not requeue:
                if outcome in FAILED_OUTCOMES:
                    self._event("task-failed", uuid=task_id, traceback="",
                                exception=f"JobFailedError('job {job_id} ended {outcome}')")
                else:
                    self._event("task-succeeded", uuid=task_id, result=repr(outcome),
                                runtime=time.monotonic() - received)
            try:
                message.requeue() if requeue else message.ack()
            except Exception:  # the broker connection is gone: the message comes back on its own
                log.warning("message_not_acked job=%s requeue=%s", job_id, requeue)
            if not self._gathering():  # inside a block, its end wakes the loop once
                self._wake()

        self.runtime.deliver(job_id, done)

    def on_decode_error(self, message: Any, exc: BaseException) -> None:
        self._dead_letter(message, "undecodable_body", f"{type(exc).__name__}: {exc}")

    def _dead_letter(self, message: Any, reason: str, detail: str = "") -> None:
        dead_letter_message(self.consumer.app, message, reason, detail)

    def _event(self, kind: str, **fields: Any) -> None:
        dispatcher = getattr(self.consumer, "event_dispatcher", None)
        if dispatcher is not None and dispatcher.enabled:
            try:
                dispatcher.send(kind, **fields)
            except Exception:  # an event is worth less than the job
                log.warning("task_event_not_sent kind=%s", kind)
