"""Publishing job messages. A message carries only the job id; the row holds everything else."""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Sequence

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from textnlp_jobs.constants import GENERATE_TASK, generation_queue
from textnlp_jobs.db import repository as repo
from textnlp_jobs.devices import Device
from textnlp_jobs.settings import Settings

log = logging.getLogger(__name__)

# Messages per Redis pipeline. Small enough that the first jobs of a large submit_many reach a
# worker while the rest are still being built (a message costs about 0.07 ms of Python here),
# large enough that a round trip carries many.
PUBLISH_BATCH = 64
# The first pipeline is smaller: a worker can claim those jobs (and an idle device start waiting
# for company) while the next pipeline is built (first messages out 21 -> 4 ms for 512 jobs,
# measured together with the template below; bench/submit.py).
FIRST_PUBLISH_BATCH = 8


def pipelines(count: int) -> list[range]:
    """The index ranges of ``count`` messages, one range per Redis pipeline."""
    bounds = [0, *range(min(FIRST_PUBLISH_BATCH, count), count, PUBLISH_BATCH), count]
    return [range(start, end) for start, end in itertools.pairwise(bounds) if end > start]


def queue_for(routing: repo.Routing, settings: Settings) -> str:
    if routing.device:
        return Device.parse(routing.device, settings.node_name).queue
    return generation_queue(routing.model)


def broker_priority(priority: int) -> int:
    """Our priority is 0..9 with 9 most urgent; kombu's Redis transport serves 0 first."""
    return 9 - max(0, min(9, priority))


def publish(celery: Celery, settings: Settings, routings: Sequence[repo.Routing]) -> None:
    """Send one ``textnlp.generate`` message per job, pipelined where the transport supports it.

    The messages are Celery's task protocol 2, as ``send_task`` writes them, but built here from
    one template per call: ``send_task`` spent about 0.3 ms of Python on each (routing, settings
    look-ups, signals, a retry wrapper that a pipelined publish never uses), so one producer
    published about 1,800 jobs/s, no faster than a GPU runs a small model's jobs
    (``bench/submit.py``). Each queue is declared with its first message only."""
    if not routings:
        return
    # Headers and properties that are the same for every job (origin, reply_to, ...), from Celery itself.
    # ignore_result as send_task leaves it: unset (the worker's setting decides).
    template = celery.amqp.as_task_v2("-", GENERATE_TASK, args=["-"], kwargs={}, reply_to=celery.thread_oid,
                                      ignore_result=None)
    _, _, embed = template.body  # no callbacks, errbacks, chain or chord
    # A declaration talks to the broker at once: retried as send_task retries it, which also
    # replaces a pooled connection that died with a broker restart before the pipeline is sent.
    retry = {"retry": True, **celery.conf.task_publish_retry_policy} if celery.conf.task_publish_retry else {}
    declared: set[str] = set()
    with celery.producer_or_acquire() as producer:
        for indices in pipelines(len(routings)):
            with producer.batch(PUBLISH_BATCH * 4):
                for routing in (routings[i] for i in indices):
                    job_id = str(routing.id)
                    queue = queue_for(routing, settings)
                    if queue not in declared:
                        producer.maybe_declare(celery.amqp.queues[queue], **retry)
                        declared.add(queue)
                    argsrepr = f"['{job_id}']"
                    producer.publish(
                        json.dumps([[job_id], {}, embed]),
                        content_type="application/json", content_encoding="utf-8",
                        # A direct queue is published to through the anonymous exchange, as Celery does.
                        exchange="", routing_key=queue,
                        priority=broker_priority(routing.priority), delivery_mode=2,
                        headers={**template.headers, "id": job_id, "root_id": job_id,
                                 "argsrepr": argsrepr, "kwargsrepr": "{}"},
                        **{**template.properties, "correlation_id": job_id},
                        argsrepr=argsrepr, kwargsrepr="{}",  # send_task puts these in the properties too
                    )


def publish_and_mark(celery: Celery, settings: Settings, factory: sessionmaker[Session],
                     routings: Sequence[repo.Routing]) -> None:
    """Publish again (the reconciler, a rescue), then stamp ``published_at`` so the reconciler
    knows when each was last sent: a first send by the producer needs no stamp, since the
    reconciler falls back on ``created_at``. If publishing fails the rows stay queued and the
    reconciler sends them after its grace."""
    publish(celery, settings, routings)
    with factory.begin() as session:
        repo.mark_published(session, [r.id for r in routings])
