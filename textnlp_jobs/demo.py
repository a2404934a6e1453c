"""``textnlp-jobs demo``: the whole system on one machine, from nothing, in one command."""

from __future__ import annotations

import subprocess
import sys
import time

from rich.console import Console
from rich.table import Table

from textnlp_jobs.display import progress_bar
from textnlp_jobs.settings import Settings

DEMO_PROMPTS = [
    "Return a new list",
    "This module provides",
    "The default value is",
    "Raise an exception if",
    "Create a new thread",
    "Read the file and",
    "The number of seconds",
    "If the timeout is",
]


def _wait_for_worker(settings: Settings, hostname: str, timeout: float) -> bool:
    from textnlp_jobs.celery_app import create_app

    celery = create_app(settings)
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        if celery.control.ping(destination=[hostname], timeout=1.0):
            return True
    return False


def run_demo(settings: Settings, *, jobs: int, max_new_tokens: int, timeout: float, console: Console) -> None:
    from textnlp_jobs.cli.base import ensure_ledger
    from textnlp_jobs.cli.models import bootstrap_model
    from textnlp_jobs.cli.services import stop_processes
    from textnlp_jobs.client import Client
    from textnlp_jobs.db.session import session_factory
    from textnlp_jobs.inference import store
    from workers.device import worker_hostname

    mode = "embedded (SQLite + folder broker)" if settings.embedded else "Redis + PostgreSQL"
    console.print(f"[bold]textnlp-jobs demo[/bold] — {mode}, home {settings.home}")
    ensure_ledger(settings)
    with session_factory(settings)() as session:
        have_demo = "demo" in store.known_models(session)
    if not have_demo:
        version, _ = bootstrap_model(settings, "demo")
        console.print(f"built the demo model (version {version})")
    started = [
        subprocess.Popen([sys.executable, "-m", "workers.device", "--device", "cpu.0", "--models", "demo",
                          "--loglevel", "WARNING"]),
        subprocess.Popen([sys.executable, "-m", "workers.maintenance", "--loglevel", "WARNING"]),
        subprocess.Popen([sys.executable, "-m", "celery", "-A", "textnlp_jobs.celery_app:app", "beat",
                          "--loglevel=WARNING", f"--schedule={settings.home / 'beat-schedule'}"]),
    ]
    try:
        console.print("started a device worker (cpu.0), the maintenance worker and beat")
        if not _wait_for_worker(settings, worker_hostname(settings, "cpu.0"), timeout=120):
            console.print("[yellow]the device worker did not answer a ping yet; submitting anyway[/yellow]")
        client = Client(settings)
        prompts = [DEMO_PROMPTS[i % len(DEMO_PROMPTS)] for i in range(jobs)]
        with progress_bar(console) as bar:
            task = bar.add_task("submitted", total=jobs)
            # Seeded sampling: a 1M-parameter model reads better sampled than greedy, and the
            # seed makes every run of the demo print the same text.
            specs = [{"prompt": p, "model": "demo", "max_new_tokens": max_new_tokens, "temperature": 0.9,
                      "top_p": 0.95, "seed": seed} for seed, p in enumerate(prompts)]
            submitted = client.submit_many(specs, progress=lambda n: bar.advance(task, n))
            task = bar.add_task("finished", total=jobs)
            done = client.wait([j.id for j in submitted], timeout, progress=lambda n: bar.advance(task, n))
        table = Table("prompt", "continuation", "tokens", "batch", "status")
        for prompt, job in zip(prompts, done, strict=True):
            table.add_row(prompt, (job.text or job.error_code or "").strip(), str(job.tokens_generated or ""),
                          str(job.batch_size or ""), job.status)
        console.print(table)
        ok = sum(j.status == "succeeded" for j in done)
        console.print(f"{ok}/{len(done)} succeeded")
    finally:
        stop_processes(started)
        console.print("stopped everything the demo started")
