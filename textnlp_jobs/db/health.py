"""Is the ledger usable: does its database answer, and is its schema at the newest migration?

Commands and the producer API turn the database driver's errors into one-line ``TextNLPError``s
(``ledger.unreachable`` naming the host, never the password; ``ledger.not_migrated`` saying
what to run).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError, ProgrammingError

from textnlp_jobs.db.migrate import alembic_config
from textnlp_jobs.db.session import get_engine
from textnlp_jobs.errors import ErrorCode, LedgerNotMigratedError, ServiceUnavailableError
from textnlp_jobs.settings import Settings

UPGRADE_HINT = "run `textnlp-jobs db upgrade`"


def describe(url: str) -> str:
    """Where the ledger is, without credentials: ``host:port/database`` or the SQLite file."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return f"sqlite file {parsed.database}"
    port = f":{parsed.port}" if parsed.port else ""
    return f"{parsed.host or 'localhost'}{port}/{parsed.database or ''}"


@dataclass(frozen=True)
class SchemaStatus:
    current: str | None
    head: str

    @property
    def up_to_date(self) -> bool:
        return self.current == self.head


def schema_status(settings: Settings) -> SchemaStatus:
    """The ledger's migration revision and the newest one this code knows."""
    url = settings.database_url_value()
    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head() or ""
    try:
        with get_engine(settings).connect() as connection:
            current = MigrationContext.configure(connection).get_current_revision()
    except OperationalError as error:
        raise unavailable(settings, error) from None
    return SchemaStatus(current, head)


def require_current_schema(settings: Settings) -> None:
    """Raise ``LedgerNotMigratedError`` unless the schema is at the head revision."""
    status = schema_status(settings)
    if not status.up_to_date:
        where = describe(settings.database_url_value())
        at = f"at revision {status.current}" if status.current else "never migrated"
        raise LedgerNotMigratedError(f"the ledger at {where} is {at}, this version needs {status.head}: "
                                     f"{UPGRADE_HINT}")


def unavailable(settings: Settings, error: BaseException) -> ServiceUnavailableError:
    reason = str(getattr(error, "orig", error)).strip().splitlines()
    return ServiceUnavailableError(f"database unreachable at {describe(settings.database_url_value())} "
                                   f"({reason[0][:200] if reason else type(error).__name__})",
                                   code=ErrorCode.LEDGER_UNREACHABLE)


@contextmanager
def ledger_errors(settings: Settings) -> Iterator[None]:
    """Turn a database that does not answer, or a schema that is behind, into one-line errors."""
    try:
        yield
    except (OperationalError, ProgrammingError) as error:
        text = str(getattr(error, "orig", error)).lower()
        missing_table = "no such table" in text or ("relation" in text and "does not exist" in text) \
            or "undefinedtable" in type(getattr(error, "orig", error)).__name__.lower()
        if missing_table or "no such column" in text or ("column" in text and "does not exist" in text):
            require_current_schema(settings)
        if isinstance(error, OperationalError):
            raise unavailable(settings, error) from None
        raise
