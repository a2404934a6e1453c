"""Turning what went wrong into one line: ``error <code>: <message>``.

Expected failures (bad input, a bad setting, a service down, an unmigrated ledger, a bad command
line) become a ``TextNLPError`` with a code from ``errors.ErrorCode``. Anything else is a bug: one
line naming it, and the full traceback in a file (or on stderr with ``--debug``).
"""

from __future__ import annotations

import os
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

from typer.exceptions import TyperException

from textnlp_jobs.errors import (
    ConfigurationError,
    ErrorCode,
    LedgerNotMigratedError,
    ServiceUnavailableError,
    TextNLPError,
    UsageError,
)


def _chain(error: BaseException) -> Iterator[BaseException]:
    """The error and what caused it (Celery wraps kombu, which wraps redis, which wraps OSError)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _settings_error(error: BaseException) -> ConfigurationError:
    """A pydantic ValidationError of the settings, in the environment variables' own names."""
    problems = []
    for item in error.errors()[:3]:  # type: ignore[attr-defined]
        field = next((str(part) for part in item.get("loc", ()) if isinstance(part, str)), "")
        name = f"TEXTNLP_{field.upper()}" if field else "settings"
        problems.append(f"{name}: {item.get('msg', 'invalid')}")
    return ConfigurationError("; ".join(problems) or "invalid settings")


def _ledger_place() -> str:
    """Where the ledger is, without user or password."""
    try:
        from sqlalchemy.engine import make_url

        from textnlp_jobs.settings import get_settings

        url = make_url(get_settings().database_url_value())
    except Exception:
        return "the configured database"
    if url.get_backend_name() == "sqlite":
        return f"SQLite {url.database}"
    port = f":{url.port}" if url.port else ""
    return f"host {url.host or 'localhost'}{port} (database {url.database or '?'})"


def _broker_place() -> str:
    """Where the broker is, without password."""
    try:
        from kombu.utils.url import maybe_sanitize_url

        from textnlp_jobs.settings import get_settings

        return str(maybe_sanitize_url(get_settings().broker_url_value()))
    except Exception:
        return "the configured broker"


def _reason(text: str) -> str:
    lowered = text.lower()
    for needle, reason in (("refused", "connection refused"), ("timed out", "timed out"), ("timeout", "timed out"),
                           ("password authentication failed", "authentication failed"),
                           ("does not exist", "database does not exist"),
                           ("name or service not known", "unknown host"),
                           ("could not translate host name", "unknown host"),
                           ("unable to open", "cannot open the file"),
                           ("no route to host", "no route to host")):
        if needle in lowered:
            return reason
    return "no answer"


def expected(error: BaseException) -> TextNLPError | None:
    """The one-line error ``error`` stands for, or None when it is a bug."""
    import pydantic

    for cause in _chain(error):
        if isinstance(cause, TextNLPError):
            return cause
        if isinstance(cause, TyperException):  # typer's own (vendored click) usage errors
            return UsageError(" ".join(cause.format_message().split()))
        if isinstance(cause, pydantic.ValidationError) and cause.title in ("Settings", "BatchingPolicy"):
            return _settings_error(cause)
    return _service_error(error)


def _service_error(error: BaseException) -> TextNLPError | None:
    try:
        from sqlalchemy import exc as sa
    except ImportError:  # pragma: no cover
        return None
    for cause in _chain(error):
        if isinstance(cause, sa.OperationalError | sa.ProgrammingError):
            text = str(cause.orig) if cause.orig is not None else str(cause)
            if "no such table" in text or ("relation" in text and "does not exist" in text) or "UndefinedTable" in repr(
                    cause.orig):
                return LedgerNotMigratedError(f"the ledger at {_ledger_place()} has no tables yet or an old schema; "
                                              "run `textnlp-jobs db upgrade`")
            if isinstance(cause, sa.OperationalError):
                return ServiceUnavailableError(f"database unreachable at {_ledger_place()} ({_reason(text)})",
                                               code=ErrorCode.LEDGER_UNREACHABLE)
        if isinstance(cause, sa.InterfaceError | sa.DisconnectionError):
            return ServiceUnavailableError(f"database unreachable at {_ledger_place()} ({_reason(str(cause))})",
                                           code=ErrorCode.LEDGER_UNREACHABLE)
    broker_errors: tuple[type[BaseException], ...] = ()
    try:
        import kombu.exceptions
        import redis.exceptions

        broker_errors = (kombu.exceptions.OperationalError, redis.exceptions.ConnectionError,
                         redis.exceptions.TimeoutError)
    except ImportError:  # pragma: no cover
        pass
    for cause in _chain(error):
        if broker_errors and isinstance(cause, broker_errors):
            return ServiceUnavailableError(f"broker unreachable at {_broker_place()} ({_reason(str(cause))})",
                                           code=ErrorCode.BROKER_UNREACHABLE)
    return None


def save_traceback(error: BaseException) -> Path | None:
    """Write ``error``'s traceback to a file the user can attach to a bug report."""
    text = "".join(traceback.format_exception(error))
    folders: list[Path] = []
    try:
        from textnlp_jobs.settings import get_settings

        folders.append(get_settings().home / "errors")
    except Exception:  # the settings themselves may be what failed
        pass
    folders.append(Path(tempfile.gettempdir()))
    name = f"textnlp-jobs-error-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.txt"
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / name
            path.write_text(text)
            return path
        except OSError:
            continue
    return None
