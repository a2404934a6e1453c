"""Producer commands: submit, status, wait, cancel and job listings.

Ids and results go to stdout (one id per line, or one JSON document with ``--json``), progress
and messages to stderr, so ``ID=$(textnlp-jobs submit "...")`` captures just the id.
"""

from __future__ import annotations

import re
import sys
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import typer

from textnlp_jobs.cli.base import JsonOption, app, console, emit, emit_json, ensure_ledger, jobs_app, progress, say
from textnlp_jobs.db.models import JobStatus
from textnlp_jobs.db.repository import Job
from textnlp_jobs.display import job_detail, job_table, wait_summary
from textnlp_jobs.errors import JobAlreadyFinishedError, UsageError
from textnlp_jobs.settings import get_settings

# `submit` exit status when the jobs were created but the broker was unreachable (see README).
EXIT_QUEUED_UNPUBLISHED = 3

# Up to this many jobs `wait` prints a table; past it, a summary.
WAIT_TABLE_LIMIT = 20


def parse_deadline(value: str | None, *, now: datetime | None = None) -> datetime | None:
    """``--deadline``: seconds from now (``90``, ``2.5``) or an ISO 8601 timestamp; a timestamp
    without a zone is taken as UTC."""
    if value is None:
        return None
    now = now or datetime.now(UTC)
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        if not seconds > 0 or seconds == float("inf"):
            raise UsageError(f"--deadline: {value} seconds is not a positive, finite number")
        return now + timedelta(seconds=seconds)
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise UsageError(f"--deadline: {value!r} is neither seconds from now nor an ISO 8601 timestamp") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _client() -> Any:
    from textnlp_jobs.client import Client

    return Client()


def _exit_unless_all_succeeded(jobs: list[Job]) -> None:
    if any(j.status != JobStatus.SUCCEEDED for j in jobs):
        raise typer.Exit(1)


def _show_finished(jobs: list[Job], *, as_json: bool) -> None:
    if as_json:
        emit_json(jobs)
    elif len(jobs) == 1 and jobs[0].status == JobStatus.SUCCEEDED:
        console.print(jobs[0].text, markup=False, highlight=False)
    elif len(jobs) <= WAIT_TABLE_LIMIT:
        console.print(job_table(jobs))
    else:
        console.print(wait_summary(jobs))


def _warn_unless_served(client: Any, model: str, device: str | None, count: int) -> None:
    """A model registered but placed on no running worker is the first hour's silent wait: say so
    (the jobs are safe; they run once a worker serving the model starts)."""
    if client.serving(model, device):
        return
    where = f"device {device} serving model {model!r}" if device else f"device worker serving model {model!r}"
    print(f"warning queue.no_consumer: no live {where}; the {count} job(s) stay queued until one starts "
          f"(a worker serves the models TEXTNLP_PLACEMENT names for its device; README: Models you bring)",
          file=sys.stderr)


@app.command()
def submit(
    prompt: Annotated[str, typer.Argument(help="The prompt; '-' reads it from standard input.")],
    model: Annotated[str, typer.Option(envvar="TEXTNLP_MODEL", help="Registered model name.")] = "demo",
    max_new_tokens: Annotated[int | None, typer.Option(help="New tokens to generate.")] = None,
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling: keep the smallest set of tokens with this "
                                              "much probability.")] = 1.0,
    top_k: Annotated[int, typer.Option(help="Sample among the k likeliest tokens; 0 is no limit.")] = 0,
    seed: Annotated[int | None, typer.Option(help="Seed of the sampling (the same seed draws the same text).")]
    = None,
    priority: Annotated[int, typer.Option(help="0..9, 9 most urgent.")] = 0,
    deadline: Annotated[str | None, typer.Option(
        help="Drop the job if it has not run by then: seconds from now (90) or an ISO 8601 timestamp.")] = None,
    idempotency_key: Annotated[str | None, typer.Option(help="Submitting the same key again returns the same job.")]
    = None,
    device: Annotated[str | None, typer.Option(help="Pin to one device, e.g. cpu.0 or node/cuda.1.")] = None,
    count: Annotated[int, typer.Option(min=1, max=1_000_000, help="Submit the prompt this many times.")] = 1,
    chat: Annotated[bool, typer.Option("--chat", help="Send the prompt as a user message through the model's "
                                                      "chat template, the form an instruct model expects.")] = False,
    system: Annotated[str | None, typer.Option(help="A system message before the prompt (implies --chat).")] = None,
    stop: Annotated[list[str] | None, typer.Option(
        "--stop", help="End the text before this string when the model writes it (repeat for up to 4); "
                       "`\\n` and `\\t` in it are a newline and a tab, `\\\\` a backslash.")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the result(s).")] = False,
    timeout: Annotated[float, typer.Option(min=0, help="Seconds to wait with --wait.")] = 300.0,
    as_json: JsonOption = False,
) -> None:
    """Queue a generation job (or --count of them) and print the id(s), or the results with --wait."""
    settings = get_settings()
    ensure_ledger(settings)
    text = sys.stdin.read() if prompt == "-" else prompt
    from textnlp_jobs.client import Client

    client = Client(settings)
    spec: dict[str, Any] = {"model": model, "temperature": temperature, "top_p": top_p,
                            "top_k": top_k, "seed": seed, "priority": priority, "device": device,
                            "deadline": parse_deadline(deadline)}
    if stop:
        spec["stop"] = [unescape(text) for text in stop]
    if chat or system is not None:
        system_turn = [] if system is None else [{"role": "system", "content": system}]
        spec["messages"] = [*system_turn, {"role": "user", "content": text}]
    else:
        spec["prompt"] = text
    if max_new_tokens is not None:
        spec["max_new_tokens"] = max_new_tokens
    specs = [dict(spec, idempotency_key=f"{idempotency_key}:{i}" if idempotency_key and count > 1
                  else idempotency_key) for i in range(count)]
    unpublished: list[Exception] = []
    with progress() as bar:
        task = bar.add_task("submitting", total=len(specs))
        jobs = client.submit_many(specs, progress=lambda n: bar.advance(task, n),
                                  on_unpublished=lambda _count, error: unpublished.append(error))
    if unpublished:
        # The jobs exist (the ledger is the truth): print their ids, warn on stderr, and exit
        # with a code of its own so scripts know not to submit again.
        if as_json:
            emit_json(jobs)
        else:
            sys.stdout.write("".join(f"{job.id}\n" for job in jobs))
        print(f"warning broker.unreachable: the broker could not be reached; {len(jobs)} job(s) are queued in "
              "the ledger and the reconciler will send them", file=sys.stderr)
        raise typer.Exit(EXIT_QUEUED_UNPUBLISHED)
    _warn_unless_served(client, model, device, len(jobs))
    if not wait:
        if as_json:
            emit_json(jobs)
        else:
            sys.stdout.write("".join(f"{job.id}\n" for job in jobs))
        return
    with progress() as bar:
        task = bar.add_task("waiting", total=len(jobs))
        done = client.wait([j.id for j in jobs], timeout, progress=lambda n: bar.advance(task, n))
    _show_finished(done, as_json=as_json)
    _exit_unless_all_succeeded(done)


_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def unescape(text: str) -> str:
    """``--stop '\\n'`` as a newline: a shell passes the two characters, and a stop at a line's end
    is the common case. Only ``\\n``, ``\\t`` and ``\\\\`` are read; any other backslash stays."""
    return re.sub(r"\\([nt\\])", lambda escape: _ESCAPES[escape[1]], text)


@app.command()
def status(job_id: Annotated[str, typer.Argument(help="The job's id.")], as_json: JsonOption = False) -> None:
    """Show one job: status, model version, worker, attempts, times, error and text."""
    job = _client().get(job_id)
    emit(job, as_json=as_json, render=job_detail(job))


@app.command("wait")
def wait_command(
    job_ids: Annotated[list[str], typer.Argument(help="One or more job ids.")],
    timeout: Annotated[float, typer.Option(min=0, help="Give up after this many seconds (exit 2).")] = 300.0,
    as_json: JsonOption = False,
) -> None:
    """Wait until the jobs finish; exit 1 unless all succeeded. Many jobs get a summary, not a table."""
    with progress() as bar:
        task = bar.add_task("waiting", total=len(job_ids))
        jobs = _client().wait(job_ids, timeout, progress=lambda n: bar.advance(task, n))
    if not as_json and len(jobs) == 1:
        console.print(job_table(jobs))
    else:
        _show_finished(jobs, as_json=as_json)
    _exit_unless_all_succeeded(jobs)


@app.command()
def cancel(job_id: Annotated[str, typer.Argument(help="The job's id.")], as_json: JsonOption = False) -> None:
    """Cancel a job that has not finished. A job that had already finished is left as it was:
    the command says so and exits 3."""
    client = _client()
    before = client.get(job_id)
    job = client.cancel(job_id)
    if before.done or job.status != JobStatus.CANCELLED:
        raise JobAlreadyFinishedError(f"job {job.id} had already finished ({job.status}); nothing to cancel")
    if as_json:
        emit_json(job)
    else:
        console.print(f"{job.id} {job.status}", markup=False, highlight=False)


@jobs_app.command("list")
def jobs_list(
    status_filter: Annotated[JobStatus | None, typer.Option("--status", case_sensitive=False,
                                                            help="Only jobs with this status.")] = None,
    model: Annotated[str | None, typer.Option(help="Only jobs of this model.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="How many of the newest jobs.")] = 20,
    as_json: JsonOption = False,
) -> None:
    """The newest jobs, optionally by status or model."""
    jobs = _client().list(status=status_filter.value if status_filter else None, model=model, limit=limit)
    if not jobs and not as_json:
        say("no jobs match")
    emit(jobs, as_json=as_json, render=job_table(jobs))


@jobs_app.command("requeue")
def jobs_requeue(
    status_filter: Annotated[str, typer.Option("--status", help="dead (default), failed or expired.")] = "dead",
    model: Annotated[str | None, typer.Option(help="Only jobs of this model.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Count them, change nothing.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Send jobs back to their queues with a new attempt budget, once the cause is fixed (e.g. dead
    jobs of a queue no worker consumed: error queue.no_consumer)."""
    from textnlp_jobs.celery_app import create_app
    from textnlp_jobs.db.session import session_factory
    from textnlp_jobs.maintenance.queues import requeue

    settings = get_settings()
    ensure_ledger(settings)
    emit(requeue(settings, session_factory(settings), create_app(settings), status=status_filter, model=model,
                 dry_run=dry_run), as_json=as_json)
