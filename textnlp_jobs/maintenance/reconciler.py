"""``jobs.reconcile``: make the broker agree with the ledger again.

Four moves, each bounded per run: expire queued rows past their deadline; bury rows that used up
their attempts; return running rows whose lease ran out to the queue and publish them again;
publish queued rows whose message is gone. A duplicate message is harmless (the claim is
conditional); a lost one would strand a job, so when in doubt the reconciler publishes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from textnlp_jobs.constants import RECONCILE_TASK
from textnlp_jobs.db import device_workers
from textnlp_jobs.db import repository as repo
from textnlp_jobs.maintenance.live_messages import live_job_ids
from textnlp_jobs.maintenance.registry import TaskContext, maintenance_task
from textnlp_jobs.metrics import registry as metrics
from textnlp_jobs.publish import publish_and_mark
from textnlp_jobs.settings import Settings

log = logging.getLogger(__name__)

LiveIds = Callable[[], set[str] | None]
Publish = Callable[[Sequence[repo.Routing]], None]


@dataclass
class ReconcileReport:
    expired: int = 0
    buried: int = 0
    rescued: int = 0
    republished: int = 0
    no_consumer: int = 0
    dry_run: bool = False

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def reconcile(settings: Settings, factory: sessionmaker[Session], publish: Publish, live_ids: LiveIds,
              *, dry_run: bool = False) -> ReconcileReport:
    """One reconciliation pass. With ``dry_run`` it counts what it would do and changes nothing."""
    report = ReconcileReport(dry_run=dry_run)
    limit = settings.reconcile_batch
    with factory() as session:
        transaction = session.begin()
        report.expired = repo.expire_overdue(session, limit)
        report.buried = repo.bury_exhausted(session, limit)
        rescued = repo.rescue_expired_leases(session, limit)
        # Jobs of workers whose heartbeat stopped: no need to wait for their lease.
        rescued += device_workers.rescue_orphans(session, settings.heartbeat_ttl_seconds, limit)
        unconsumed = device_workers.flag_unconsumed(session, settings.no_consumer_seconds, limit)
        report.no_consumer = sum(unconsumed.values())
        for queue, count in unconsumed.items():
            log.warning("jobs_without_consumer queue=%s count=%d quiet_s=%.0f", queue, count,
                        settings.no_consumer_seconds)
        if dry_run:
            transaction.rollback()
        else:
            transaction.commit()
    report.rescued = len(rescued)

    with factory() as session:
        candidates = repo.unpublished_candidates(session, settings.reconcile_grace_seconds, limit)
    rescued_ids = {r.id for r in rescued}
    lost: list[repo.Routing] = []
    if candidates:
        live = live_ids()
        lost = [c for c in candidates if c.id not in rescued_ids and (live is None or str(c.id) not in live)]
    report.republished = len(lost)
    if not dry_run:
        to_send = list(rescued) + lost
        for start in range(0, len(to_send), 1000):
            publish(to_send[start:start + 1000])
        for action in ("expired", "buried", "rescued", "republished", "no_consumer"):
            metrics.RECONCILED.labels(action).inc(getattr(report, action))
    log.info("reconciled expired=%d buried=%d rescued=%d republished=%d dry_run=%s",
             report.expired, report.buried, report.rescued, report.republished, dry_run)
    return report


@maintenance_task(RECONCILE_TASK, schedule="*/5 * * * *", time_limit_s=240)
def reconcile_task(ctx: TaskContext) -> dict[str, Any]:
    """Re-publish lost jobs, rescue stuck ones, expire overdue ones, bury poison ones."""
    settings, factory = ctx.settings, ctx.session_factory
    report = reconcile(
        settings, factory,
        publish=lambda routings: publish_and_mark(ctx.celery, settings, factory, routings),
        live_ids=lambda: live_job_ids(settings, fresh_seconds=settings.lease_seconds),
        dry_run=ctx.dry_run,
    )
    return report.as_dict()
