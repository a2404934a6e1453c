"""The maintenance worker: a light worker on ``textnlp.maintenance`` and a heavy one on
``textnlp.maintenance.heavy``, each its own process (see ``textnlp_jobs.maintenance.worker``).

    python -m workers.maintenance                 # both, supervised
    python -m workers.maintenance --only heavy    # one of them
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from textnlp_jobs.maintenance.worker import run_both, run_one


def run(*, loglevel: str = "INFO", only: str | None = None, concurrency: int | None = None) -> None:
    if only in ("light", "heavy"):
        run_one("light" if only == "light" else "heavy", loglevel=loglevel, concurrency=concurrency)
        return
    sys.exit(run_both(loglevel=loglevel))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--loglevel", default=os.environ.get("TEXTNLP_LOGLEVEL", "INFO"))
    parser.add_argument("--only", choices=["light", "heavy"], default=None)
    parser.add_argument("--concurrency", type=int, default=None)
    args = parser.parse_args(argv)
    run(loglevel=args.loglevel, only=args.only, concurrency=args.concurrency)


if __name__ == "__main__":
    main()
