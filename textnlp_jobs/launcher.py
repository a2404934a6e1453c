"""Starting, waiting for and stopping the system's processes: one place for all of it.

The CLI (``worker --all-devices``, ``demo``), the test stack and the benchmarks build worker
command lines here, start them here, wait for them to answer a ping here, and stop them here.
Every command line runs a module of this package (``python -m textnlp_jobs.worker_main ...``,
``python -m celery -A textnlp_jobs.celery_app:app beat``), so an installed wheel can start them.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

from textnlp_jobs.settings import Settings

log = logging.getLogger(__name__)

Process = subprocess.Popen[bytes]


def ensure_ledger(settings: Settings) -> None:
    """The embedded ledger migrates itself on first use; PostgreSQL waits for ``db upgrade``
    (a schema behind the code raises ``LedgerNotMigratedError``: one line, not a traceback)."""
    if settings.database_url is None:
        from textnlp_jobs.db.migrate import upgrade

        upgrade(settings.database_url_value())
    else:
        from textnlp_jobs.db.health import require_current_schema

        require_current_schema(settings)


# --- command lines ------------------------------------------------------------------------------

def device_worker_command(device: str, *, models: Sequence[str] | None = None, loglevel: str = "INFO",
                          concurrency: int | None = None, extra: Sequence[str] = ()) -> list[str]:
    """The command line of ``device``'s worker."""
    command = [sys.executable, "-m", "textnlp_jobs.worker_main", "device", "--device", device, "--loglevel", loglevel]
    if models:
        command += ["--models", ",".join(models)]
    if concurrency:
        command += ["--concurrency", str(concurrency)]
    return [*command, *extra]


def maintenance_worker_command(*, loglevel: str = "INFO", concurrency: int | None = None) -> list[str]:
    """The command line of the maintenance worker."""
    command = [sys.executable, "-m", "textnlp_jobs.worker_main", "maintenance", "--loglevel", loglevel]
    if concurrency:
        command += ["--concurrency", str(concurrency)]
    return command


def beat_command(settings: Settings, *, loglevel: str = "INFO") -> list[str]:
    """The command line of Celery beat: RedBeat on Redis, a schedule file in the home when embedded."""
    from textnlp_jobs.maintenance.schedule import beat_arguments
    from textnlp_jobs.worker_main import quiet_flags

    return [sys.executable, "-m", "celery", "-A", "textnlp_jobs.celery_app:app", *quiet_flags(loglevel), "beat",
            f"--loglevel={loglevel}", *beat_arguments(settings)]


def visible_gpus() -> int:
    """Count GPUs in a child process, so this one never initialises CUDA."""
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                           capture_output=True, text=True, check=False)
    return int(probe.stdout.strip() or 0) if probe.returncode == 0 else 0


def all_device_names() -> list[str]:
    """One device per visible GPU, or ``cpu.0`` when there is none."""
    return [f"cuda.{i}" for i in range(visible_gpus())] or ["cpu.0"]


# --- processes ----------------------------------------------------------------------------------

def start_process(command: Sequence[str], *, env: Mapping[str, str] | None = None, log_path: Path | None = None,
                  quiet: bool = False, new_session: bool = False, cwd: Path | None = None) -> Process:
    """Start ``command``. Its output goes to ``log_path`` (appended), nowhere when ``quiet``, else
    to this process's own streams. ``new_session`` puts it in its own process group, so
    ``stop_processes`` reaches the children it starts too."""
    output: IO[bytes] | int | None = None
    if log_path is not None:
        output = log_path.open("ab")
    elif quiet:
        output = subprocess.DEVNULL
    try:
        return subprocess.Popen(list(command), env=dict(env) if env is not None else None, stdout=output,
                                stderr=subprocess.STDOUT if output is not None else None,
                                start_new_session=new_session, cwd=cwd)
    finally:
        if log_path is not None and output is not None and not isinstance(output, int):
            output.close()  # the child holds its own copy


def _signal(process: Process, signum: int) -> None:
    if process.poll() is not None:
        return
    try:
        if os.getpgid(process.pid) == process.pid:  # it leads its own group: reach its children too
            os.killpg(process.pid, signum)
        else:
            process.send_signal(signum)
    except ProcessLookupError:
        pass


def kill_process(process: Process) -> None:
    """SIGKILL: no clean shutdown, no acks, no releases."""
    _signal(process, signal.SIGKILL)
    if process.pid:
        process.wait()


def stop_processes(processes: Sequence[Process], grace: float = 30.0) -> None:
    """SIGTERM every process (a Celery worker finishes its running jobs), then SIGKILL what is
    still running after ``grace`` seconds."""
    for process in processes:
        _signal(process, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for process in processes:
        try:
            process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("process_killed pid=%d reason=grace_expired grace=%.0fs", process.pid, grace)
            kill_process(process)


def supervise(commands: Mapping[str, Sequence[str]], *, backoff: tuple[float, float] = (1.0, 60.0)) -> int:
    """Run ``commands`` (name -> command line), restarting any that crashes, until a signal stops
    them; returns a truthful exit status (see ``textnlp_jobs.supervisor``)."""
    from textnlp_jobs.supervisor import supervise as run_supervised

    return run_supervised(commands, backoff=backoff)


def wait_for_worker(settings: Settings, hostname: str, timeout: float, *,
                    alive: Callable[[], bool] | None = None, ping_timeout: float = 0.5) -> bool:
    """Until the worker ``hostname`` answers a ping (a device worker answers only once its models
    are loaded and warm). False after ``timeout`` or as soon as ``alive()`` says it died."""
    from textnlp_jobs.celery_app import create_app

    celery = create_app(settings)
    give_up = time.monotonic() + timeout
    try:
        while time.monotonic() < give_up:
            if celery.control.ping(destination=[hostname], timeout=ping_timeout):
                return True
            if alive is not None and not alive():
                return False
        return False
    finally:
        celery.close()
