"""Publishing job messages. A message carries only the job id; the row holds everything else."""

from __future__ import annotations

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
# worker while the rest are still being built (a message costs about 0.5 ms of Celery's Python),
# large enough that a round trip carries many.
PUBLISH_BATCH = 64


def queue_for(routing: repo.Routing, settings: Settings) -> str:
    if routing.device:
        return Device.parse(routing.device, settings.node_name).queue
    return generation_queue(routing.model)


def broker_priority(priority: int) -> int:
    """Our priority is 0..9 with 9 most urgent; kombu's Redis transport serves 0 first."""
    return 9 - max(0, min(9, priority))


def publish(celery: Celery, settings: Settings, routings: Sequence[repo.Routing]) -> None:
    """Send one message per job, pipelined in batches where the transport supports it.

    Celery's per-message extras that are the same for every job are done once: each queue is
    declared with its first message only (kombu would rebind it for every one), and the argument
    repr Flower shows is written directly instead of through ``saferepr``."""
    if not routings:
        return
    declared: set[str] = set()
    with celery.producer_or_acquire() as producer:
        for start in range(0, len(routings), PUBLISH_BATCH):
            with producer.batch(PUBLISH_BATCH * 4):
                for routing in routings[start:start + PUBLISH_BATCH]:
                    job_id = str(routing.id)
                    queue = queue_for(routing, settings)
                    first = queue not in declared
                    declared.add(queue)
                    celery.send_task(
                        GENERATE_TASK, args=[job_id], task_id=job_id, queue=queue,
                        priority=broker_priority(routing.priority), producer=producer,
                        argsrepr=f"['{job_id}']", kwargsrepr="{}",
                        **({} if first else {"declare": []}),
                    )


def publish_and_mark(celery: Celery, settings: Settings, factory: sessionmaker[Session],
                     routings: Sequence[repo.Routing]) -> None:
    """Publish, then stamp ``published_at`` so the reconciler knows when each was last sent.
    If publishing fails the rows stay queued and the reconciler sends them after its grace."""
    publish(celery, settings, routings)
    with factory.begin() as session:
        repo.mark_published(session, [r.id for r in routings])
