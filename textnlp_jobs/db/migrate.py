"""Apply the Alembic migrations in ``textnlp_jobs/migrations/`` to the configured ledger."""

from __future__ import annotations

from alembic import command
from alembic.config import Config

from textnlp_jobs.settings import get_settings

# A package resource, so it resolves inside an installed wheel as well as in a checkout.
SCRIPT_LOCATION = "textnlp_jobs:migrations"


def alembic_config(url: str | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", SCRIPT_LOCATION)
    # '%' is ConfigParser's interpolation character; URLs may contain it (escaped passwords).
    config.set_main_option("sqlalchemy.url", (url or get_settings().database_url_value()).replace("%", "%%"))
    return config


def upgrade(url: str | None = None, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str | None = None, revision: str = "base") -> None:
    command.downgrade(alembic_config(url), revision)
