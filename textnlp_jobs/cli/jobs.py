"""Producer commands: submit, status, wait, cancel and job listings."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from textnlp_jobs.cli.base import app, console, ensure_ledger, jobs_app
from textnlp_jobs.display import job_table, progress_bar
from textnlp_jobs.settings import get_settings

# `submit` exit status when the jobs were created but the broker was unreachable (see README).
EXIT_QUEUED_UNPUBLISHED = 3


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
    unpublished: list[Exception] = []
    with progress_bar(console) as bar:
        task = bar.add_task("submitting", total=len(specs))
        jobs = client.submit_many(specs, progress=lambda n: bar.advance(task, n),
                                  on_unpublished=lambda _count, error: unpublished.append(error))
    if unpublished:
        # The jobs exist (the ledger is the truth): print their ids, warn on stderr, and exit
        # with a code of its own so scripts know not to submit again.
        for job in jobs:
            print(job.id)
        print(f"warning broker.unavailable: the broker could not be reached; {len(jobs)} job(s) are queued in "
              "the ledger and the reconciler will send them", file=sys.stderr)
        raise typer.Exit(EXIT_QUEUED_UNPUBLISHED)
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

