"""How long a producer's ``submit_many`` takes, and how soon its first jobs can start.

    python bench/submit.py --jobs 512 --repeats 7

``submit_many`` is all or nothing: every job is validated and all rows are inserted in one
transaction before the first message is published, so on a fast device the first job of a large
call waits for all of that. On a scratch stack (PostgreSQL + Redis, the ``launch`` bench model
registered) it times, for N jobs, the median over the repeats of:

1. validation (token counts included), 2. the insert, 3. the first pipeline of messages
(``publish.pipelines``: ``FIRST_PUBLISH_BATCH`` messages): the sum is when a worker can first
see a job; and, separately, 4. one whole
``submit_many`` call. It prints each phase, the share of the whole call spent before the first
message, and jobs/s. To compare two versions of the code, run it from each checkout.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]

import throughput  # noqa: E402  (the bench's own scratch stack and prompts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=512, help="N: jobs per submit_many")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--model", default="launch", help="a bench model (built once into bench/.models)")
    args = parser.parse_args()

    from textnlp_jobs import __file__ as package_file
    from textnlp_jobs.db import repository as repo
    from textnlp_jobs.publish import pipelines, publish, publish_and_mark

    _, path = throughput.ensure_model(args.model)
    with ExitStack() as exits:
        stack = throughput.Stack(exits, name=args.model, model_path=path, device="cpu.0", embedded=False,
                                 torch_threads=None, worker_concurrency=None)
        client = stack.client
        prompts = throughput.make_prompts(args.jobs)
        client.submit_many([stack.spec(p, 32) for p in prompts[:4]])  # caches: models, tokenizer, connections
        phases: dict[str, list[float]] = {"validate": [], "insert": [], "first messages": [], "whole call": []}
        for _ in range(args.repeats):
            specs = [stack.spec(p, 32) for p in prompts]
            t0 = time.perf_counter()
            jobs = client._validate(specs)
            t1 = time.perf_counter()
            with client.sessions() as session:
                records = repo.insert_jobs_once(session, jobs)
            t2 = time.perf_counter()
            routings = [repo.Routing(r.id, r.model, r.device, r.priority) for r in records]
            first = len(pipelines(len(routings))[0])
            publish(client.celery, client.settings, routings[:first])
            t3 = time.perf_counter()
            publish_and_mark(client.celery, client.settings, client.sessions, routings[first:])
            specs = [stack.spec(p, 32) for p in prompts]
            t4 = time.perf_counter()
            client.submit_many(specs)
            t5 = time.perf_counter()
            for name, seconds in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t5 - t4), strict=True):
                phases[name].append(seconds)
    median = {name: statistics.median(values) for name, values in phases.items()}
    first = median["validate"] + median["insert"] + median["first messages"]
    print(f"code: {Path(package_file).parent.parent}")
    print(f"submit_many of {args.jobs} jobs ({args.model}), median of {args.repeats}:")
    for name, seconds in median.items():
        print(f"  {name:<16} {seconds * 1e3:8.1f} ms")
    print(f"  first job visible to a worker after {first * 1e3:.1f} ms "
          f"({first / median['whole call']:.2f} of the whole call); {args.jobs / median['whole call']:,.0f} jobs/s")


if __name__ == "__main__":
    main()
