"""The maintenance worker: consumes ``textnlp.maintenance``, where beat sends every scheduled task.

    python -m workers.maintenance
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from textnlp_jobs.constants import MAINTENANCE_QUEUE
from textnlp_jobs.settings import get_settings


def run(*, loglevel: str = "INFO", concurrency: int = 2) -> None:
    from textnlp_jobs.celery_app import app
    from textnlp_jobs.metrics.push import MAINTENANCE_WORKER_JOB, start_worker_metrics

    settings = get_settings()
    start_worker_metrics(settings, MAINTENANCE_WORKER_JOB, "maintenance")
    app.worker_main([
        "worker", "--pool=threads", f"--concurrency={concurrency}", f"--queues={MAINTENANCE_QUEUE}",
        f"--hostname=maintenance@{settings.node_name}", f"--loglevel={loglevel}",
        "--without-gossip", "--without-mingle",
    ])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--loglevel", default=os.environ.get("TEXTNLP_LOGLEVEL", "INFO"))
    parser.add_argument("--concurrency", type=int, default=2)
    args = parser.parse_args(argv)
    run(loglevel=args.loglevel, concurrency=args.concurrency)


if __name__ == "__main__":
    main()
