"""The maintenance worker (the code is ``textnlp_jobs.worker_main``).

    python -m workers.maintenance
"""

from __future__ import annotations

from textnlp_jobs.worker_main import maintenance_main as main
from textnlp_jobs.worker_main import run_maintenance_worker as run

__all__ = ["main", "run"]

if __name__ == "__main__":
    main()
