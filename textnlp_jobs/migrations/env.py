"""Alembic environment: the URL comes from ``textnlp_jobs.db.migrate`` (or the settings)."""

from __future__ import annotations

from alembic import context

from textnlp_jobs.db.models import Base
from textnlp_jobs.db.session import build_engine
from textnlp_jobs.settings import get_settings

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    return config.get_main_option("sqlalchemy.url") or get_settings().database_url_value()


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True,
                      render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = build_engine(_url())
    with engine.connect() as connection:
        # render_as_batch lets ALTERs work on SQLite, which cannot alter most things in place.
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
