"""``textnlp.generate``: the message carries a job id; the device runtime does the rest."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from textnlp_jobs.celery_app import app
from textnlp_jobs.constants import GENERATE_TASK
from textnlp_jobs.inference.device import DeviceRuntime

log = logging.getLogger(__name__)

_runtime: DeviceRuntime | None = None


def install_runtime(runtime: DeviceRuntime | None) -> None:
    """The device worker sets its runtime here before it starts consuming."""
    global _runtime
    _runtime = runtime


@app.task(name=GENERATE_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def generate(job_id: Any) -> str:
    """Run one generation job by id. A malformed id is logged and dropped (never retried)."""
    try:
        parsed = uuid.UUID(str(job_id))
    except ValueError:
        log.error("message_rejected reason=bad_job_id")
        return "rejected"
    if _runtime is None:
        # Only device workers consume generation queues; anything else is a deployment error.
        raise RuntimeError("textnlp.generate ran in a process without a device runtime")
    return _runtime.run_job(parsed)
