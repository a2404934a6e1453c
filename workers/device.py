"""One Celery worker per device (the code is ``textnlp_jobs.worker_main``).

    python -m workers.device --device cuda.0
"""

from __future__ import annotations

from textnlp_jobs.worker_main import check_timeouts, pin_device, worker_hostname
from textnlp_jobs.worker_main import device_main as main
from textnlp_jobs.worker_main import run_device_worker as run

__all__ = ["check_timeouts", "main", "pin_device", "run", "worker_hostname"]

if __name__ == "__main__":
    main()
