"""``textnlp-jobs demo``: the whole system on one machine, from nothing, in one command.

Messages go to ``messages`` (stderr in the CLI), the results table to ``out`` (stdout). The
processes it starts write to log files under the home, so the terminal shows only what a
newcomer needs: what the model is, what is starting, the results.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from textnlp_jobs import launcher
from textnlp_jobs.db.models import JobStatus
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

ABOUT_THE_MODEL = (
    "The demo model is a 1M-parameter GPT-2 (2 layers, 128 wide) that this machine trained for a minute on "
    "Python's own docstrings: its continuations are docstring-flavoured word salad, by design. For real text, "
    "bring a model of your own: register its directory (`textnlp-jobs models register PATH --name NAME`), start a "
    "worker that serves it (`TEXTNLP_PLACEMENT='{\"*\": [\"NAME\"]}' textnlp-jobs worker --device cpu.0`) "
    "and submit with `--model NAME` (README: Models you bring)."
)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _ensure_demo_model(settings: Settings, messages: Console) -> None:
    from textnlp_jobs.db.session import session_factory
    from textnlp_jobs.inference import store
    from textnlp_jobs.inference.bootstrap import RECIPES, bootstrap_model, cached_build

    with session_factory(settings)() as session:
        if "demo" in store.known_models(session):
            return
    recipe = RECIPES["demo"]
    cached = cached_build(settings.model_cache_dir(), "demo")
    if cached is None or not cached.is_dir():
        messages.print(f"building the demo model: {recipe.build_note}", markup=False, highlight=False)
    bar = progress_bar(messages)
    bar.disable = not messages.is_terminal
    started = time.monotonic()
    with bar:
        task = bar.add_task("training the demo model (steps)", total=recipe.train_steps)
        built = bootstrap_model(settings, "demo", progress=lambda done, _total: bar.update(task, completed=done))
    how = f"copied from the build cache ({cached})" if built.from_cache else (
        f"built in {time.monotonic() - started:.0f}s and cached for other homes")
    messages.print(f"demo model {how}: version {built.version}", markup=False, highlight=False)


def run_demo(settings: Settings, *, jobs: int, max_new_tokens: int, timeout: float, out: Console,
             messages: Console) -> None:
    from textnlp_jobs.client import Client
    from textnlp_jobs.worker_main import worker_hostname

    mode = "embedded (SQLite + folder broker)" if settings.embedded else "Redis + PostgreSQL"
    messages.print(f"[bold]textnlp-jobs demo[/bold] — {mode}, home {settings.home}", highlight=False)
    messages.print(ABOUT_THE_MODEL, markup=False, highlight=False)
    launcher.ensure_ledger(settings)
    _ensure_demo_model(settings, messages)
    logs = settings.home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    worker_log = logs / "demo-device-worker.log"
    started = [
        launcher.start_process(launcher.device_worker_command("cpu.0", models=["demo"], loglevel="WARNING"),
                               log_path=worker_log),
        launcher.start_process(launcher.maintenance_worker_command(loglevel="WARNING"),
                               log_path=logs / "demo-maintenance-worker.log"),
        launcher.start_process(launcher.beat_command(settings, loglevel="WARNING"), log_path=logs / "demo-beat.log"),
    ]
    try:
        messages.print(f"started a device worker (cpu.0), the maintenance worker and beat; their logs: {logs}",
                       markup=False, highlight=False)
        if not launcher.wait_for_worker(settings, worker_hostname(settings, "cpu.0"), timeout=120,
                                        alive=lambda: started[0].poll() is None):
            messages.print("the device worker did not answer yet; its log ends with:\n" + _tail(worker_log),
                           markup=False, highlight=False)
        client = Client(settings)
        prompts = [DEMO_PROMPTS[i % len(DEMO_PROMPTS)] for i in range(jobs)]
        bar = progress_bar(messages)
        bar.disable = not messages.is_terminal
        with bar:
            task = bar.add_task("submitted", total=jobs)
            # Seeded sampling: a 1M-parameter model reads better sampled than greedy, and the
            # seed makes every run of the demo print the same text.
            specs = [{"prompt": p, "model": "demo", "max_new_tokens": max_new_tokens, "temperature": 0.9,
                      "top_p": 0.95, "seed": seed} for seed, p in enumerate(prompts)]
            submitted = client.submit_many(specs, progress=lambda n: bar.advance(task, n))
            task = bar.add_task("finished", total=jobs)
            done = client.wait([j.id for j in submitted], timeout, progress=lambda n: bar.advance(task, n))
        table = Table("prompt", "tokens", "batch", "status")
        table.add_column("continuation", max_width=72)
        for prompt, job in zip(prompts, done, strict=True):
            table.add_row(prompt, str(job.tokens_generated or ""), str(job.batch_size or ""), job.status,
                          (job.text or job.error_code or "").strip())
        out.print(table)
        ok = sum(j.status == JobStatus.SUCCEEDED for j in done)
        messages.print(f"{ok}/{len(done)} jobs succeeded, in batches of up to "
                       f"{max((j.batch_size or 0) for j in done)} on one device", markup=False, highlight=False)
    finally:
        launcher.stop_processes(started)
        messages.print("stopped everything the demo started", markup=False, highlight=False)
