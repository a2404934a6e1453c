"""``textnlp-jobs``: one command for producers, workers and operators.

Every option has an environment variable behind it (``TEXTNLP_*``, see settings.py). With no
settings at all everything runs embedded under ``~/.textnlp-jobs`` (SQLite + a folder broker).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from textnlp_jobs.display import job_table, progress_bar
from textnlp_jobs.errors import TextNLPError
from textnlp_jobs.settings import Settings, get_settings

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False)
db_app = typer.Typer(help="The ledger's schema (Alembic migrations).", no_args_is_help=True)
models_app = typer.Typer(help="The model store and registry.", no_args_is_help=True)
jobs_app = typer.Typer(help="Listings of jobs.", no_args_is_help=True)
maintenance_app = typer.Typer(help="Run maintenance tasks by hand.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(models_app, name="models")
app.add_typer(jobs_app, name="jobs")
app.add_typer(maintenance_app, name="maintenance")

console = Console()
log = logging.getLogger(__name__)


def ensure_ledger(settings: Settings) -> None:
    """The embedded ledger migrates itself on first use; PostgreSQL waits for `db upgrade`."""
    if settings.database_url is None:
        from textnlp_jobs.db.migrate import upgrade

        upgrade(settings.database_url_value())


# --- producers ----------------------------------------------------------------------------

@app.command()
def submit(
    prompt: Annotated[str, typer.Argument(help="The prompt; '-' reads it from standard input.")],
    model: Annotated[str, typer.Option(envvar="TEXTNLP_MODEL", help="Registered model name.")] = "demo",
    max_new_tokens: Annotated[int | None, typer.Option(help="New tokens to generate.")] = None,
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option()] = 1.0,
    seed: Annotated[int | None, typer.Option()] = None,
    priority: Annotated[int, typer.Option(help="0..9, 9 most urgent.")] = 0,
    idempotency_key: Annotated[str | None, typer.Option()] = None,
    device: Annotated[str | None, typer.Option(help="Pin to one device, e.g. cpu.0 or node/cuda.1.")] = None,
    count: Annotated[int, typer.Option(help="Submit the prompt this many times.")] = 1,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the result(s).")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait with --wait.")] = 300.0,
) -> None:
    """Queue a generation job (or --count of them) and print the id(s), or the results with --wait."""
    from textnlp_jobs.client import Client

    settings = get_settings()
    ensure_ledger(settings)
    text = sys.stdin.read() if prompt == "-" else prompt
    client = Client(settings)
    spec: dict[str, Any] = {"prompt": text, "model": model, "temperature": temperature, "top_p": top_p,
                            "seed": seed, "priority": priority, "device": device}
    if max_new_tokens is not None:
        spec["max_new_tokens"] = max_new_tokens
    specs = [dict(spec, idempotency_key=f"{idempotency_key}:{i}" if idempotency_key and count > 1
                  else idempotency_key) for i in range(count)]
    with progress_bar(console) as bar:
        task = bar.add_task("submitting", total=len(specs))
        jobs = client.submit_many(specs, progress=lambda n: bar.advance(task, n))
    if not wait:
        for job in jobs:
            console.print(str(job.id))
        return
    with progress_bar(console) as bar:
        task = bar.add_task("waiting", total=len(jobs))
        done = client.wait([j.id for j in jobs], timeout, progress=lambda n: bar.advance(task, n))
    if len(done) == 1 and done[0].status == "succeeded":
        console.print(done[0].text, markup=False, highlight=False)
    else:
        console.print(job_table(done))
    if any(j.status != "succeeded" for j in done):
        raise typer.Exit(1)


@app.command()
def status(job_id: str) -> None:
    """Show one job."""
    from textnlp_jobs.client import Client

    job = Client().get(job_id)
    console.print(job_table([job], text_width=200))


@app.command("wait")
def wait_command(job_ids: list[str], timeout: Annotated[float, typer.Option()] = 300.0) -> None:
    """Wait until the jobs finish; exit 1 unless all succeeded."""
    from textnlp_jobs.client import Client

    with progress_bar(console) as bar:
        task = bar.add_task("waiting", total=len(job_ids))
        jobs = Client().wait(job_ids, timeout, progress=lambda n: bar.advance(task, n))
    console.print(job_table(jobs))
    if any(j.status != "succeeded" for j in jobs):
        raise typer.Exit(1)


@app.command()
def cancel(job_id: str) -> None:
    """Cancel a job that has not finished."""
    from textnlp_jobs.client import Client

    job = Client().cancel(job_id)
    console.print(f"{job.id} {job.status}")


@jobs_app.command("list")
def jobs_list(
    status_filter: Annotated[str | None, typer.Option("--status")] = None,
    model: Annotated[str | None, typer.Option()] = None,
    limit: Annotated[int, typer.Option()] = 20,
) -> None:
    """The newest jobs, optionally by status or model."""
    from textnlp_jobs.client import Client

    console.print(job_table(Client().list(status=status_filter, model=model, limit=limit)))


# --- workers and services -------------------------------------------------------------------

def _visible_gpus() -> int:
    """Count GPUs in a child process, so this one never initialises CUDA."""
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                           capture_output=True, text=True, check=False)
    return int(probe.stdout.strip() or 0) if probe.returncode == 0 else 0


def device_worker_command(device: str, extra: list[str] | None = None) -> list[str]:
    return [sys.executable, "-m", "workers.device", "--device", device, *(extra or [])]


def _supervise(commands: list[list[str]]) -> int:
    """Run child processes until one exits or we are told to stop; stop the rest cleanly."""
    children = [subprocess.Popen(cmd) for cmd in commands]

    def forward(signum: int, _frame: Any) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while all(child.poll() is None for child in children):
        time.sleep(0.5)
    stop_processes(children)
    return max(child.returncode or 0 for child in children)


def stop_processes(children: list[subprocess.Popen[Any]], grace: float = 30.0) -> None:
    for child in children:
        if child.poll() is None:
            child.terminate()
    deadline = time.monotonic() + grace
    for child in children:
        try:
            child.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


@app.command()
def worker(
    device: Annotated[str | None, typer.Option(envvar="TEXTNLP_DEVICE", help="cuda.N / cuda:N or cpu.N")] = None,
    all_devices: Annotated[bool, typer.Option("--all-devices", help="One worker per visible GPU (or cpu.0).")] = False,
    maintenance: Annotated[bool, typer.Option("--maintenance", help="The maintenance worker instead.")] = False,
    models: Annotated[str | None, typer.Option(help="Comma-separated models; default: placement.")] = None,
    concurrency: Annotated[int | None, typer.Option(help="Task threads; default: 2 x max_batch.")] = None,
    loglevel: Annotated[str, typer.Option(envvar="TEXTNLP_LOGLEVEL")] = "INFO",
) -> None:
    """Start a device worker (one Celery worker per GPU), all of them, or the maintenance worker."""
    settings = get_settings()
    ensure_ledger(settings)
    extra = ["--loglevel", loglevel]
    if models:
        extra += ["--models", models]
    if concurrency:
        extra += ["--concurrency", str(concurrency)]
    if maintenance:
        from workers import maintenance as maintenance_worker

        maintenance_worker.run(loglevel=loglevel)
        return
    if all_devices:
        gpus = _visible_gpus()
        devices = [f"cuda.{i}" for i in range(gpus)] or ["cpu.0"]
        console.print(f"starting {len(devices)} device worker(s): {', '.join(devices)}")
        raise typer.Exit(_supervise([device_worker_command(d, extra) for d in devices]))
    from workers import device as device_worker

    device_worker.main(["--device", device or "cpu.0", *extra])


@app.command()
def beat(loglevel: Annotated[str, typer.Option(envvar="TEXTNLP_LOGLEVEL")] = "INFO") -> None:
    """Run Celery beat, which sends the maintenance schedule (run exactly one)."""
    from textnlp_jobs.celery_app import app as celery

    settings = get_settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    celery.start(["beat", f"--loglevel={loglevel}", f"--schedule={settings.home / 'beat-schedule'}"])


@app.command()
def flower(
    port: Annotated[int, typer.Option(envvar="TEXTNLP_FLOWER_PORT")] = 5555,
    address: Annotated[str, typer.Option(envvar="TEXTNLP_FLOWER_ADDRESS", help="0.0.0.0 in a container.")]
    = "127.0.0.1",
) -> None:
    """Run Flower; refuses to start without TEXTNLP_FLOWER_BASIC_AUTH=user:password."""
    credentials = os.environ.get("TEXTNLP_FLOWER_BASIC_AUTH")
    if not credentials or ":" not in credentials:
        console.print("[red]Flower needs authentication: set TEXTNLP_FLOWER_BASIC_AUTH=user:password[/red]")
        raise typer.Exit(2)
    from textnlp_jobs.celery_app import app as celery

    os.environ["FLOWER_BASIC_AUTH"] = credentials  # read by Flower, never put on a command line
    celery.start(["flower", f"--port={port}", f"--address={address}"])


# --- operators ----------------------------------------------------------------------------

@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument()] = "head") -> None:
    """Apply migrations up to REVISION (default: the newest)."""
    from textnlp_jobs.db.migrate import upgrade

    upgrade(get_settings().database_url_value(), revision)
    console.print(f"ledger at {revision}")


@db_app.command("downgrade")
def db_downgrade(revision: Annotated[str, typer.Argument()]) -> None:
    """Undo migrations down to REVISION ('base' drops every table)."""
    from textnlp_jobs.db.migrate import downgrade

    downgrade(get_settings().database_url_value(), revision)
    console.print(f"ledger at {revision}")


def bootstrap_model(settings: Settings, name: str) -> tuple[str, Path]:
    """Build model ``name`` into the store and register it; returns (version, path)."""
    from textnlp_jobs.db.session import session_factory
    from textnlp_jobs.inference import store
    from textnlp_jobs.inference.bootstrap import RECIPES, build_model

    if name not in RECIPES:
        raise TextNLPError(f"no recipe for model {name!r} (known: {', '.join(RECIPES)})", code="models.unknown_recipe")
    with progress_bar(console) as bar:
        task = bar.add_task(f"building {name}", total=RECIPES[name].train_steps or 1)

        def build(target: Path) -> None:
            build_model(name, target, progress=lambda done, total: bar.update(task, completed=done))

        path = store.build_into_store(settings.model_store_dir(), name, build)
        bar.update(task, completed=RECIPES[name].train_steps or 1)
    with session_factory(settings).begin() as session:
        version = store.register_version(session, name, path, description=RECIPES[name].description)
        return version.version, path


@models_app.command("bootstrap")
def models_bootstrap(name: Annotated[str, typer.Argument(help="demo, small or tiny")] = "demo") -> None:
    """Build one of the project's own models locally (no download) and register it."""
    settings = get_settings()
    ensure_ledger(settings)
    version, path = bootstrap_model(settings, name)
    console.print(f"registered {name} version {version} at {path}")


@models_app.command("list")
def models_list() -> None:
    """Registered models and their versions."""
    from sqlalchemy import select

    from textnlp_jobs.db.models import Model, ModelVersion
    from textnlp_jobs.db.session import session_factory

    settings = get_settings()
    ensure_ledger(settings)
    table = Table("model", "version", "size", "created", "path")
    with session_factory(settings)() as session:
        rows = session.execute(select(Model.name, ModelVersion).join(ModelVersion, ModelVersion.model_id == Model.id)
                               .order_by(Model.name, ModelVersion.created_at)).all()
        for name, version in rows:
            table.add_row(name, version.version, f"{version.size_bytes / 1e6:.1f} MB",
                          version.created_at.isoformat(timespec="seconds"), version.path)
    console.print(table)


@maintenance_app.command("run")
def maintenance_run(task: str, dry_run: Annotated[bool, typer.Option("--dry-run")] = False) -> None:
    """Run one maintenance task now (e.g. jobs.reconcile), with the same lock beat uses."""
    from textnlp_jobs.maintenance.runner import run_maintenance

    settings = get_settings()
    ensure_ledger(settings)
    console.print(run_maintenance(task, dry_run=dry_run, settings=settings))


@app.command()
def check() -> None:
    """Check the ledger and the broker answer; exit 0 when healthy, 1 when not (for health checks)."""
    from sqlalchemy import text

    from textnlp_jobs.celery_app import create_app
    from textnlp_jobs.db.session import get_engine

    settings = get_settings()
    healthy = True
    try:
        with get_engine(settings).connect() as connection:
            connection.execute(text("SELECT 1"))
        console.print("ledger: ok")
    except Exception as error:
        healthy = False
        console.print(f"ledger: FAILED ({type(error).__name__})")
    try:
        with create_app(settings).connection_for_write() as connection:
            connection.ensure_connection(max_retries=1)
        console.print("broker: ok")
    except Exception as error:
        healthy = False
        console.print(f"broker: FAILED ({type(error).__name__})")
    raise typer.Exit(0 if healthy else 1)


@app.command()
def demo(
    jobs: Annotated[int, typer.Option(help="How many jobs to run.")] = 8,
    max_new_tokens: Annotated[int, typer.Option()] = 24,
    timeout: Annotated[float, typer.Option()] = 300.0,
) -> None:
    """From nothing: bootstrap the demo model, start a device worker, a maintenance worker and
    beat, run a handful of jobs, print the results, and stop everything it started."""
    from textnlp_jobs.demo import run_demo

    run_demo(get_settings(), jobs=jobs, max_new_tokens=max_new_tokens, timeout=timeout, console=console)


def main() -> None:
    logging.basicConfig(level=os.environ.get("TEXTNLP_LOGLEVEL", "WARNING"),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        app()
    except TextNLPError as error:
        console.print(f"[red]error[/red] {error.code}: {error.message}", markup=True, highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
