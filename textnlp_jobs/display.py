"""How the CLI shows things: progress bars for long work, tables for jobs."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from textnlp_jobs.db.repository import Job


def progress_bar(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console)


def job_table(jobs: Sequence[Job], *, text_width: int = 60) -> Table:
    """One row per job: the text when it succeeded, the error code when not."""
    table = Table("id", "status", "model", "tokens", "attempts", "text / error")
    for job in jobs:
        detail = job.text if job.status == "succeeded" else (job.error_code or "")
        detail = (detail or "").replace("\n", " ")
        table.add_row(str(job.id), job.status, job.model, str(job.tokens_generated or ""), str(job.attempts),
                      detail[:text_width])
    return table
