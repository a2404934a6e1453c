"""`db upgrade` and `db downgrade` work on both ledgers the system runs on."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect

from textnlp_jobs.db.migrate import downgrade, upgrade
from textnlp_jobs.local_stack import ServiceUnavailable, scratch_postgres

from .conftest import IN_CI

TABLES = {"prompts", "generations", "models", "model_versions", "audit_logs", "maintenance_runs",
          "device_workers", "model_promotions", "model_loads"}


def tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def round_trip(url: str) -> None:
    upgrade(url)
    assert tables(url) == TABLES
    downgrade(url, "base")
    assert tables(url) == set()
    upgrade(url)
    assert tables(url) == TABLES


def test_upgrade_and_downgrade_on_sqlite(tmp_path: Path) -> None:
    round_trip(f"sqlite:///{tmp_path / 'ledger.sqlite3'}")


@pytest.mark.integration
def test_upgrade_and_downgrade_on_postgresql() -> None:
    try:
        with scratch_postgres() as url:
            round_trip(url)
    except ServiceUnavailable as error:
        if IN_CI:
            raise
        pytest.skip(str(error))
