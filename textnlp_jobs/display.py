"""How the CLI shows things: progress bars for long work, tables and summaries of jobs, and the
JSON form of everything it prints."""

from __future__ import annotations

import dataclasses
import enum
import uuid
from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from textnlp_jobs.db.models import JobStatus
from textnlp_jobs.db.repository import Job

ID_WIDTH = 36  # a UUID, never cut


def progress_bar(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console)


def to_jsonable(value: Any) -> Any:
    """``value`` with dataclasses, ids, times, paths and enums turned into JSON types."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID | Path):
        return str(value)
    return value


def _seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}s"


def job_table(jobs: Sequence[Job], *, text_width: int = 60) -> Table:
    """One row per job: its error code when it did not succeed, the start of its text when it
    did. Ids and codes are never cut or wrapped; only the text column shrinks to fit."""
    table = Table()
    table.add_column("id", no_wrap=True, min_width=ID_WIDTH)
    table.add_column("status", no_wrap=True, min_width=9)
    table.add_column("model", no_wrap=True, min_width=5)
    table.add_column("tokens", justify="right", no_wrap=True, min_width=6)
    table.add_column("tries", justify="right", no_wrap=True, min_width=5)
    table.add_column("error", no_wrap=True, min_width=max((len(j.error_code or "") for j in jobs), default=5))
    # The only wrapable column, so the one rich shrinks; its cells are one line cut with an ellipsis.
    table.add_column("text", overflow="ellipsis", min_width=4)
    for job in jobs:
        text = (job.text or "").replace("\n", " ")[:text_width] if job.status == JobStatus.SUCCEEDED else ""
        table.add_row(str(job.id), job.status, job.model, str(job.tokens_generated or ""), str(job.attempts),
                      job.error_code or "", Text(text, overflow="ellipsis", no_wrap=True))
    return table


def job_detail(job: Job) -> Table:
    """Everything the ledger knows about one job, one field per line."""
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column("field", style="bold", no_wrap=True)
    table.add_column("value", overflow="fold")
    version = f"{job.model} @ {job.model_version}" if job.model_version else job.model
    rows: list[tuple[str, str]] = [
        ("id", str(job.id)),
        ("status", job.status),
        ("model", version),
        ("attempts", f"{job.attempts} of {job.max_attempts}"),
        ("worker", job.worker or ""),
        ("priority", str(job.priority)),
        ("device", job.device or "any"),
        ("created", job.created_at.isoformat(timespec="seconds")),
        ("started", job.started_at.isoformat(timespec="seconds") if job.started_at else ""),
        ("finished", job.finished_at.isoformat(timespec="seconds") if job.finished_at else ""),
        ("deadline", job.deadline.isoformat(timespec="seconds") if job.deadline else ""),
        ("queue wait", _seconds(job.queue_wait_seconds)),
        ("inference", _seconds(job.inference_seconds)),
        ("tokens", f"{job.prompt_tokens or '?'} in, {job.tokens_generated or 0} out"
         + (f" (batch of {job.batch_size})" if job.batch_size else "")),
    ]
    if job.finish_reason is not None:
        rows.append(("ended", {"stop": "stop: the model ended it or it wrote a stop string",
                               "length": "length: max_new_tokens reached"}[job.finish_reason]))
    if job.error_code:
        rows.append(("error", f"{job.error_code}: {job.error_message or ''}"))
    if job.text is not None:
        rows.append(("text", job.text))
    for name, value in rows:
        table.add_row(name, Text(value))
    return table


def wait_summary(jobs: Sequence[Job], *, slowest: int = 5, failures: int = 10) -> Group:
    """Counts by status, the slowest jobs, and the first failures: what matters when waiting on many."""
    counts = Counter(str(job.status) for job in jobs)
    lines = [Text(f"{len(jobs)} jobs: " + ", ".join(f"{n} {status}" for status, n in counts.most_common()))]
    timed = sorted((j for j in jobs if j.finished_at), key=lambda j: j.finished_at - j.created_at,  # type: ignore[operator]
                   reverse=True)[:slowest]
    parts: list[Any] = [*lines]
    if timed:
        table = Table(title="slowest", title_justify="left")
        table.add_column("id", no_wrap=True, min_width=ID_WIDTH)
        table.add_column("status", no_wrap=True)
        table.add_column("seconds", justify="right", no_wrap=True)
        for job in timed:
            assert job.finished_at is not None
            table.add_row(str(job.id), job.status, f"{(job.finished_at - job.created_at).total_seconds():.2f}")
        parts.append(table)
    failed = [j for j in jobs if j.status != JobStatus.SUCCEEDED][:failures]
    if failed:
        parts.append(job_table(failed))
    return Group(*parts)
