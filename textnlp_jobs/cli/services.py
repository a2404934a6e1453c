"""Long-running services (device and maintenance workers, beat, Flower) and the checks around them."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Annotated, Any

import typer

from textnlp_jobs.cli.base import app, console, ensure_ledger
from textnlp_jobs.settings import get_settings
from textnlp_jobs.supervisor import Child, supervise


def _visible_gpus() -> int:
    """Count GPUs in a child process, so this one never initialises CUDA."""
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                           capture_output=True, text=True, check=False)
    return int(probe.stdout.strip() or 0) if probe.returncode == 0 else 0


def device_worker_command(device: str, extra: list[str] | None = None) -> list[str]:
    return [sys.executable, "-m", "workers.device", "--device", device, *(extra or [])]


def _rescue_crashed(child: Child) -> None:
    """The supervisor saw a device worker die: mark it dead and requeue its running jobs now,
    before its replacement has even started."""
    import socket

    from textnlp_jobs.celery_app import create_app
    from textnlp_jobs.db import device_workers
    from textnlp_jobs.db.session import session_factory
    from textnlp_jobs.liveness import rescue_orphans
    from textnlp_jobs.publish import publish_and_mark

    if child.pid is None:
        return
    settings = get_settings()
    factory = session_factory(settings)
    with factory.begin() as session:
        device_workers.mark_dead(session, socket.gethostname(), child.pid)
    celery = create_app(settings)
    try:
        rescue_orphans(settings, factory, lambda routings: publish_and_mark(celery, settings, factory, routings))
    finally:
        celery.close()


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
        raise typer.Exit(supervise({d: device_worker_command(d, extra) for d in devices},
                                   backoff=settings.restart_backoff_seconds, on_crash=_rescue_crashed))
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
    from textnlp_jobs.flower_auth import check_basic_auth

    credentials = check_basic_auth(os.environ.get("TEXTNLP_FLOWER_BASIC_AUTH"),
                                   get_settings().flower_min_password_length)
    from textnlp_jobs.celery_app import app as celery

    os.environ["FLOWER_BASIC_AUTH"] = credentials  # read by Flower, never put on a command line
    celery.start(["flower", f"--port={port}", f"--address={address}"])


@app.command()
def check() -> None:
    """Check the ledger and the broker answer; exit 0 when healthy, 1 when not (for health checks)."""
    from sqlalchemy import text

    from textnlp_jobs.celery_app import create_app
    from textnlp_jobs.db.health import UPGRADE_HINT, schema_status
    from textnlp_jobs.db.session import get_engine

    settings = get_settings()
    healthy = True
    try:
        with get_engine(settings).connect() as connection:
            connection.execute(text("SELECT 1"))
        schema = schema_status(settings)
        if schema.up_to_date:
            console.print("ledger: ok")
        else:
            healthy = False
            at = f"at revision {schema.current}" if schema.current else "never migrated"
            console.print(f"ledger: FAILED (schema {at}, needs {schema.head}: {UPGRADE_HINT})", markup=False)
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
