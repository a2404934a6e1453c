"""Long-running services (device and maintenance workers, beat, Flower) and the checks around them."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from textnlp_jobs import launcher
from textnlp_jobs.cli.base import app, console, ensure_ledger, err_console, say
from textnlp_jobs.devices import Device
from textnlp_jobs.errors import ConfigurationError, ErrorCode, InputError
from textnlp_jobs.settings import get_settings
from textnlp_jobs.supervisor import Child, supervise


def _checked_device(device: str) -> str:
    try:
        return Device.parse(device, get_settings().node_name).name
    except InputError as error:
        raise ConfigurationError(error.message, code=ErrorCode.CONFIG_DEVICE_INVALID) from None


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


@app.command()
def worker(
    device: Annotated[str | None, typer.Option(envvar="TEXTNLP_DEVICE", help="cuda.N / cuda:N or cpu.N")] = None,
    all_devices: Annotated[bool, typer.Option("--all-devices", help="One worker per visible GPU (or cpu.0).")] = False,
    maintenance: Annotated[bool, typer.Option("--maintenance", help="The maintenance worker instead.")] = False,
    models: Annotated[str | None, typer.Option(help="Comma-separated models; default: placement.")] = None,
    concurrency: Annotated[int | None, typer.Option(min=1, help="Jobs in flight; default: 2 x max_batch.")] = None,
    loglevel: Annotated[str, typer.Option(envvar="TEXTNLP_LOGLEVEL")] = "INFO",
) -> None:
    """Start a device worker (one Celery worker per GPU), all of them, or the maintenance worker.
    Runs until stopped (SIGTERM finishes running jobs first)."""
    from textnlp_jobs import worker_main

    settings = get_settings()
    ensure_ledger(settings)
    model_list = models.split(",") if models else None
    if maintenance:
        worker_main.run_maintenance_worker(loglevel=loglevel)
        return
    if all_devices:
        devices = launcher.all_device_names()
        say(f"starting {len(devices)} device worker(s): {', '.join(devices)}")
        raise typer.Exit(supervise(
            {d: launcher.device_worker_command(d, models=model_list, loglevel=loglevel, concurrency=concurrency)
             for d in devices},
            backoff=settings.restart_backoff_seconds, on_crash=_rescue_crashed))
    status = worker_main.run_device_worker(_checked_device(device or "cpu.0"), model_list, concurrency=concurrency,
                                           loglevel=loglevel)
    raise typer.Exit(status)


@app.command()
def beat(loglevel: Annotated[str, typer.Option(envvar="TEXTNLP_LOGLEVEL")] = "INFO") -> None:
    """Run Celery beat, which sends the maintenance schedule. Runs until stopped. On Redis it uses
    RedBeat: a second beat waits on the lock and sends nothing. Embedded, its state file is under
    TEXTNLP_HOME."""
    from textnlp_jobs.celery_app import app as celery
    from textnlp_jobs.maintenance.schedule import beat_arguments
    from textnlp_jobs.worker_main import quiet_flags

    settings = get_settings()
    celery.start([*quiet_flags(loglevel), "beat", f"--loglevel={loglevel}", *beat_arguments(settings)])


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
    from textnlp_jobs.cli.failures import expected
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
        known = expected(error)
        console.print(f"ledger: FAILED ({known.message if known else type(error).__name__})", markup=False)
    try:
        with create_app(settings).connection_for_write() as connection:
            connection.ensure_connection(max_retries=1)
        console.print("broker: ok")
    except Exception as error:
        healthy = False
        known = expected(error)
        console.print(f"broker: FAILED ({known.message if known else type(error).__name__})", markup=False)
    raise typer.Exit(0 if healthy else 1)


@app.command()
def demo(
    jobs: Annotated[int, typer.Option(min=1, max=1000, help="How many jobs to run.")] = 8,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 24,
    timeout: Annotated[float, typer.Option(min=1)] = 300.0,
) -> None:
    """From nothing: bootstrap the demo model, start a device worker, a maintenance worker and
    beat, run a handful of jobs, print the results, and stop everything it started."""
    from textnlp_jobs.demo import run_demo

    run_demo(get_settings(), jobs=jobs, max_new_tokens=max_new_tokens, timeout=timeout, out=console,
             messages=err_console)
