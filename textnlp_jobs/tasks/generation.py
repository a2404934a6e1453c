"""``textnlp.generate``: the message carries a job id; the device runtime does the rest."""

from __future__ import annotations

import logging
from typing import Any

from celery import Task

from textnlp_jobs.celery_app import app
from textnlp_jobs.constants import GENERATE_TASK
from textnlp_jobs.dead_letter import dead_letter
from textnlp_jobs.errors import JobFailedError
from textnlp_jobs.generation_consumer import FAILED_OUTCOMES, job_id_from_args
from textnlp_jobs.inference.device import DeviceRuntime

log = logging.getLogger(__name__)

_runtime: DeviceRuntime | None = None


def install_runtime(runtime: DeviceRuntime | None) -> None:
    """The device worker sets its runtime here before it starts consuming."""
    global _runtime
    _runtime = runtime


# typing=False: arguments are checked here, so a message with the wrong ones is dead-lettered
# instead of failing inside Celery before our code runs. JobFailedError is expected (`throws`):
# logged in one line, no traceback.
@app.task(bind=True, name=GENERATE_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True,
          typing=False, throws=(JobFailedError,))
def generate(self: Task, *args: Any, **kwargs: Any) -> str:
    """Run one generation job by id. A message without exactly one job id goes to the dead-letter
    queue. A job that ends ``failed`` or ``dead`` raises ``JobFailedError`` after its row is
    written, so the task shows as failed; the message is acked all the same."""
    job_id = job_id_from_args(args, kwargs)
    if job_id is None:
        delivery = self.request.delivery_info or {}
        body = {"task": GENERATE_TASK, "id": self.request.id, "args": list(args), "kwargs": kwargs}
        with app.connection_for_write() as connection:
            dead_letter(body, "bad_arguments", connection=connection, source_queue=delivery.get("routing_key"),
                        detail=f"expected one job id, got {len(args)} argument(s) and {len(kwargs)} keyword(s)")
        return "dead_lettered"
    if _runtime is None:
        # Only device workers consume generation queues; anything else is a deployment error.
        raise RuntimeError("textnlp.generate ran in a process without a device runtime")
    outcome = _runtime.run_job(job_id)
    if outcome in FAILED_OUTCOMES:
        raise JobFailedError(f"job {job_id} ended {outcome}")
    return outcome
