"""The maintenance registry: one declaration gives the Celery task, its route, the beat entry, the
CLI entry and the lock; the schedule can be changed by name from the settings."""

from __future__ import annotations

from pathlib import Path

import pytest
from celery.beat import PersistentScheduler
from celery.schedules import crontab

from textnlp_jobs.celery_app import celery_config, create_app
from textnlp_jobs.constants import MAINTENANCE_HEAVY_QUEUE, MAINTENANCE_QUEUE
from textnlp_jobs.errors import ConfigurationError, UsageError
from textnlp_jobs.maintenance import registry, schedule
from textnlp_jobs.maintenance.database import HOT_INDEXES, HOT_TABLES, _quoted
from textnlp_jobs.settings import Settings

DESIGN_TASKS = {"jobs.reconcile", "db.retention", "db.vacuum", "db.reindex", "cache.expire", "cache.memory",
                "queues.dead_letter"}
HEAVY = {"db.retention", "db.vacuum", "db.reindex"}


def settings(tmp_path: Path, **values: object) -> Settings:
    return Settings(home=tmp_path, **values)  # type: ignore[arg-type]


def test_every_task_of_this_issue_is_declared_once_with_a_description() -> None:
    tasks = registry.load_tasks()
    assert DESIGN_TASKS <= set(tasks)
    for task in tasks.values():
        assert task.description and len(task.schedule.split()) == 5


def test_heavy_tasks_route_to_the_heavy_queue_and_the_rest_to_the_light_one(tmp_path: Path) -> None:
    config = celery_config(settings(tmp_path))
    for name in DESIGN_TASKS:
        expected = MAINTENANCE_HEAVY_QUEUE if name in HEAVY else MAINTENANCE_QUEUE
        assert config["task_routes"][name] == {"queue": expected}
        assert config["beat_schedule"][name]["options"]["queue"] == expected


def test_every_lock_outlives_its_task_time_limit() -> None:
    for task in registry.load_tasks().values():
        assert task.lock_ttl > task.time_limit_s


def test_the_beat_schedule_follows_the_declarations_in_utc(tmp_path: Path) -> None:
    config = celery_config(settings(tmp_path))
    entries = config["beat_schedule"]
    assert config["timezone"] == "UTC"
    assert set(entries) == set(registry.load_tasks())
    reconcile = entries["jobs.reconcile"]["schedule"]
    assert isinstance(reconcile, crontab) and reconcile.minute == set(range(0, 60, 5))
    retention = entries["db.retention"]["schedule"]
    assert (retention.hour, retention.minute) == ({2}, {0})
    assert entries["jobs.reconcile"]["options"]["expires"] == 300
    assert entries["db.retention"]["options"]["expires"] == 86_400


def test_beat_sends_only_the_declared_tasks_and_no_result_cleanup_without_a_result_backend(tmp_path: Path) -> None:
    for values, cleanup in (({}, False), ({"result_backend": f"db+sqlite:///{tmp_path / 'results.db'}"}, True)):
        app = create_app(settings(tmp_path, **values))
        try:
            # The embedded beat's scheduler: it adds Celery's default entries to the configured ones.
            scheduler = PersistentScheduler(app, schedule_filename=str(tmp_path / f"beat-{cleanup}"))
            try:
                assert set(scheduler.schedule) - set(registry.load_tasks()) == (
                    {"celery.backend_cleanup"} if cleanup else set())
            finally:
                scheduler.close()
        finally:
            app.close()


def test_a_time_changed_by_name_in_the_settings_replaces_the_declared_one(tmp_path: Path) -> None:
    entries = celery_config(settings(tmp_path, schedule={"db.vacuum": "45 4 * * *", "jobs.reconcile": 2,
                                                         "cache.memory": "off"}))["beat_schedule"]
    assert (entries["db.vacuum"]["schedule"].hour, entries["db.vacuum"]["schedule"].minute) == ({4}, {45})
    assert entries["jobs.reconcile"]["schedule"] == 2.0 and entries["jobs.reconcile"]["options"]["expires"] == 2.0
    assert "cache.memory" not in entries


@pytest.mark.parametrize("bad", [{"db.nope": "0 2 * * *"}, {"db.vacuum": "0 2 * *"}, {"db.vacuum": "99 2 * * *"},
                                 {"db.vacuum": -5}])
def test_a_wrong_schedule_setting_is_a_configuration_error(tmp_path: Path, bad: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        schedule.schedules(settings(tmp_path, schedule=bad))


def test_an_unknown_task_is_refused_by_name() -> None:
    with pytest.raises(UsageError, match=r"db\.retention"):
        registry.get_task("db.retentoin")


def test_a_declaration_is_refused_when_its_lock_would_expire_before_its_time_limit() -> None:
    with pytest.raises(ValueError, match="lock_ttl_s"):
        registry.maintenance_task("x.y", schedule="* * * * *", time_limit_s=60, lock_ttl_s=60)
    with pytest.raises(ValueError, match="crontab"):
        registry.maintenance_task("x.y", schedule="hourly", time_limit_s=60)


def test_beat_uses_redbeat_on_redis_and_a_state_file_under_home_when_embedded(tmp_path: Path) -> None:
    assert schedule.beat_arguments(settings(tmp_path, broker_url="redis://127.0.0.1:6379/3")) == [
        "--scheduler=redbeat.RedBeatScheduler"]
    assert schedule.beat_arguments(settings(tmp_path)) == [f"--schedule={tmp_path / 'beat-schedule'}"]
    config = celery_config(settings(tmp_path, broker_url="redis://127.0.0.1:6379/3"))
    assert config["redbeat_key_prefix"].startswith("textnlp:") and config["redbeat_lock_timeout"] > 10


def test_every_declared_task_is_a_celery_task_of_the_same_name() -> None:
    from textnlp_jobs.celery_app import app
    from textnlp_jobs.tasks import maintenance

    assert set(maintenance.TASKS) == set(registry.load_tasks())
    assert set(registry.load_tasks()) <= set(app.tasks)


def test_identifiers_in_maintenance_sql_come_only_from_the_fixed_lists() -> None:
    from sqlalchemy.dialects import postgresql

    class FakeConnection:
        dialect = postgresql.dialect()

    assert _quoted(FakeConnection(), "generations", HOT_TABLES) == "generations"  # type: ignore[arg-type]
    assert _quoted(FakeConnection(), "ix_generations_created_at", HOT_INDEXES) == "ix_generations_created_at"  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        _quoted(FakeConnection(), "generations; DROP TABLE prompts", HOT_TABLES)  # type: ignore[arg-type]


def test_the_next_run_of_a_crontab_is_in_the_future_and_an_interval_follows_the_last_run() -> None:
    from datetime import UTC, datetime, timedelta

    now = datetime(2026, 11, 27, 1, 30, tzinfo=UTC)
    nxt = schedule.next_run(schedule.parse("0 2 * * *"), now)
    assert nxt is not None and nxt.hour == 2 and nxt.minute == 0 and nxt > now
    assert schedule.next_run(5.0, now, now - timedelta(seconds=1)) == now + timedelta(seconds=4)
    assert schedule.describe(schedule.parse("*/5 * * * *")) == "*/5 * * * *"
