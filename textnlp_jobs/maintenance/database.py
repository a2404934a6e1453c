"""Database maintenance: ``db.retention`` (archive, then delete by policy), ``db.vacuum`` and
``db.reindex``, each with a PostgreSQL path and an SQLite path.

Deletes run in bounded batches, each its own short transaction with a ``lock_timeout``, so
producers keep inserting during a large cleanup. A generation is deleted only when it is final
(never ``queued`` or ``running``) and marked ``archived``, which happens only after its archive file
was written and read back. Table and index names come from the fixed lists below, never from input.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, and_, delete, exists, func, select, text, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from textnlp_jobs.db.models import FINAL_STATUSES, AuditLog, Generation, MaintenanceRun, Prompt, utcnow
from textnlp_jobs.maintenance import archive
from textnlp_jobs.maintenance.registry import TaskContext, maintenance_task
from textnlp_jobs.metrics.maintenance import record_table_report

# The tables and indexes that take the job traffic. Fixed: no name here ever comes from input.
HOT_TABLES: tuple[str, ...] = ("generations", "prompts", "audit_logs", "maintenance_runs")
HOT_INDEXES: tuple[str, ...] = (
    "pk_generations", "uq_generations_idempotency_key", "ix_generations_created_at", "ix_generations_prompt_id",
    "ix_generations_status_lease_expires_at", "ix_generations_status_published_at",
    "pk_prompts", "ix_prompts_sha256",
    "pk_audit_logs", "ix_audit_logs_at", "ix_audit_logs_entity_id", "ix_audit_logs_action",
)
_LOCK_RETRIES = 3


@dataclass
class BatchStats:
    """Counts of one batched cleanup, for the run's result."""

    batches: int = 0
    largest_batch: int = 0
    lock_timeouts: int = 0
    rows: dict[str, int] = field(default_factory=dict)

    def add(self, table: str, count: int) -> None:
        self.rows[table] = self.rows.get(table, 0) + count


def _batch(factory: sessionmaker[Session], ctx: TaskContext, stats: BatchStats,
           work: Callable[[Session], int]) -> int:
    """Run ``work`` in its own transaction with a lock timeout; retried after a lock timeout."""
    timeout_ms = int(ctx.settings.retention_lock_timeout_ms)
    for attempt in range(_LOCK_RETRIES + 1):
        try:
            with factory.begin() as session:
                if session.get_bind().dialect.name == "postgresql":
                    session.execute(text(f"SET LOCAL lock_timeout = {timeout_ms}"))
                count = work(session)
        except OperationalError as error:
            if "lock" not in str(error).lower() or attempt == _LOCK_RETRIES:
                raise
            stats.lock_timeouts += 1
            ctx.log.warning("retention_lock_timeout attempt=%d", attempt + 1)
            time.sleep(0.2 * (attempt + 1))
            continue
        stats.batches += 1
        stats.largest_batch = max(stats.largest_batch, count)
        if ctx.settings.retention_batch_pause_seconds:
            time.sleep(ctx.settings.retention_batch_pause_seconds)
        return count
    return 0


def _chunks(ids: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(ids), size):
        yield ids[start:start + size]


# --- retention -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Cutoffs:
    generations: datetime
    orphan_prompts: datetime
    audit_logs: datetime
    maintenance_runs: datetime

    @classmethod
    def of(cls, ctx: TaskContext, now: datetime) -> Cutoffs:
        s = ctx.settings
        return cls(now - timedelta(days=s.retention_generations_days),
                   now - timedelta(days=s.retention_orphan_prompts_days),
                   now - timedelta(days=s.retention_audit_logs_days),
                   now - timedelta(days=s.retention_maintenance_runs_days))


def _expired_generations(cutoff: datetime) -> Any:
    g = Generation
    return and_(g.created_at < cutoff, g.status.in_(FINAL_STATUSES))


def _day_start(moment: datetime) -> datetime:
    return moment.replace(hour=0, minute=0, second=0, microsecond=0)


def _archive_rows(session: Session, start: datetime, end: datetime) -> Iterator[dict[str, Any]]:
    g = Generation
    columns = [getattr(g, name) for name in archive.GENERATION_COLUMNS]
    prompt = [getattr(Prompt, name).label(f"prompt__{name}") for name in archive.PROMPT_COLUMNS]
    query = (select(*columns, *prompt).join(Prompt, Prompt.id == g.prompt_id)
             .where(_expired_generations(end), g.created_at >= start, g.archived.is_(False))
             .order_by(g.created_at, g.id).execution_options(yield_per=5_000))
    for row in session.execute(query).mappings():
        record = {name: row[name] for name in archive.GENERATION_COLUMNS}
        record["prompt"] = {name: row[f"prompt__{name}"] for name in archive.PROMPT_COLUMNS}
        yield record


def archive_expired(ctx: TaskContext, cutoff: datetime, folder: Path, stats: BatchStats) -> list[dict[str, Any]]:
    """Export every expired, final, not yet archived generation to one file per day, verify each
    file by reading it back, then mark its rows ``archived`` in batches. Returns the manifests."""
    factory, written = ctx.session_factory, list[dict[str, Any]]()
    g = Generation
    next_after: datetime | None = None
    while True:
        with factory() as session:
            first = session.execute(
                select(func.min(g.created_at)).where(_expired_generations(cutoff), g.archived.is_(False),
                                                     *([g.created_at >= next_after] if next_after else []))
            ).scalar()
        if first is None:
            return written
        start = _day_start(first)
        end = min(start + timedelta(days=1), cutoff)
        ids: list[str] = []

        def rows(start: datetime = start, end: datetime = end, ids: list[str] = ids) -> Iterator[dict[str, Any]]:
            with factory() as session:
                for record in _archive_rows(session, start, end):
                    ids.append(str(record["id"]))
                    yield record

        written_file = archive.write(folder, "generations", date(start.year, start.month, start.day), rows())
        archive.verify(Path(written_file.path), set(ids))  # raises before anything is marked or deleted
        uuids = [uuid.UUID(i) for i in ids]
        for chunk in _chunks(uuids, ctx.settings.retention_batch):
            _batch(factory, ctx, stats, _mark_archived(chunk))
        stats.add("archived", len(ids))
        written.append(written_file.as_dict())
        ctx.log.info("archived table=generations day=%s rows=%d sha256=%s", written_file.day, written_file.rows,
                     written_file.sha256)
        next_after = end


def _mark_archived(ids: Sequence[uuid.UUID]) -> Callable[[Session], int]:
    def work(session: Session) -> int:
        result: Any = session.execute(
            update(Generation).where(Generation.id.in_(ids), Generation.status.in_(FINAL_STATUSES))
            .values(archived=True), execution_options={"synchronize_session": False})
        return int(result.rowcount)
    return work


def _delete_archived_generations(session: Session, cutoff: datetime, limit: int, stats: BatchStats,
                                 position: list[datetime]) -> int:
    """One batch, oldest first. ``position`` carries this batch's oldest ``created_at``: everything
    older is gone, so the next batch starts there instead of stepping over the index entries of all
    the rows deleted before (and a batch rolled back by a lock timeout is simply met again)."""
    g = Generation
    rows = session.execute(select(g.id, g.prompt_id, g.created_at)
                           .where(_expired_generations(cutoff), g.archived.is_(True),
                                  *([g.created_at >= position[0]] if position else []))
                           .order_by(g.created_at).limit(limit)).all()
    if not rows:
        return 0
    position[:] = [rows[0].created_at]
    ids = [r.id for r in rows]
    deleted = int(session.execute(
        delete(g).where(g.id.in_(ids), g.archived.is_(True), g.status.in_(FINAL_STATUSES)),
        execution_options={"synchronize_session": False}).rowcount)  # type: ignore[attr-defined]
    # Their prompts went into the archive with them; drop the ones nothing else refers to.
    prompts = int(session.execute(
        delete(Prompt).where(Prompt.id.in_({r.prompt_id for r in rows}),
                             ~exists().where(Generation.prompt_id == Prompt.id)),
        execution_options={"synchronize_session": False}).rowcount)  # type: ignore[attr-defined]
    stats.add("generations", deleted)
    stats.add("prompts", prompts)
    return deleted


def _delete_orphan_prompts(ctx: TaskContext, cutoff: datetime, stats: BatchStats) -> None:
    """Prompts older than the cutoff that no generation refers to, by pages of the primary key so
    every prompt is looked at once."""
    last: uuid.UUID | None = None
    limit = ctx.settings.retention_batch
    while True:
        with ctx.session_factory() as session:
            page = list(session.execute(
                select(Prompt.id).where(Prompt.created_at < cutoff, *([Prompt.id > last] if last else []))
                .order_by(Prompt.id).limit(limit)).scalars())
        if not page:
            return
        last = page[-1]

        def work(session: Session, page: list[uuid.UUID] = page) -> int:
            result: Any = session.execute(
                delete(Prompt).where(Prompt.id.in_(page), Prompt.created_at < cutoff,
                                     ~exists().where(Generation.prompt_id == Prompt.id)),
                execution_options={"synchronize_session": False})
            return _count(stats, "prompts", result.rowcount)
        _batch(ctx.session_factory, ctx, stats, work)


def _count(stats: BatchStats, table: str, rowcount: Any) -> int:
    stats.add(table, int(rowcount))
    return int(rowcount)


def _delete_older(ctx: TaskContext, table: str, column: Any, key: Any, cutoff: datetime, stats: BatchStats) -> None:
    while True:
        def work(session: Session) -> int:
            ids = list(session.execute(select(key).where(column < cutoff).order_by(key)
                                       .limit(ctx.settings.retention_batch)).scalars())
            if not ids:
                return 0
            return _count(stats, table, session.execute(delete(key.class_).where(key.in_(ids)),
                                                        execution_options={"synchronize_session": False})
                          .rowcount)  # type: ignore[attr-defined]
        if not _batch(ctx.session_factory, ctx, stats, work):
            return


def _would_delete(ctx: TaskContext, cut: Cutoffs) -> dict[str, Any]:
    g = Generation
    with ctx.session_factory() as session:
        def count(query: Any) -> int:
            return int(session.execute(query).scalar() or 0)
        orphan = ~exists().where(Generation.prompt_id == Prompt.id)
        return {
            "would_archive": count(select(func.count()).where(_expired_generations(cut.generations),
                                                              g.archived.is_(False))),
            "would_delete": {
                "generations": count(select(func.count()).where(_expired_generations(cut.generations))),
                "orphan_prompts_now": count(select(func.count()).select_from(Prompt)
                                            .where(Prompt.created_at < cut.orphan_prompts, orphan)),
                "audit_logs": count(select(func.count()).where(AuditLog.at < cut.audit_logs)),
                "maintenance_runs": count(select(func.count()).where(MaintenanceRun.started_at
                                                                     < cut.maintenance_runs)),
            },
        }


@maintenance_task("db.retention", schedule="0 2 * * *", time_limit_s=4 * 3600, heavy=True)
def retention(ctx: TaskContext) -> dict[str, Any]:
    """Archive, then delete by policy: generations (once archived), orphan prompts, audit logs, runs."""
    cut = Cutoffs.of(ctx, utcnow())
    folder = ctx.settings.archive_dir_value()
    policy = {"generations_days": ctx.settings.retention_generations_days,
              "orphan_prompts_days": ctx.settings.retention_orphan_prompts_days,
              "audit_logs_days": ctx.settings.retention_audit_logs_days,
              "maintenance_runs_days": ctx.settings.retention_maintenance_runs_days,
              "batch": ctx.settings.retention_batch, "archive_dir": str(folder)}
    if ctx.dry_run:
        return {"policy": policy, **_would_delete(ctx, cut)}
    started = time.monotonic()
    stats = BatchStats()
    archives = archive_expired(ctx, cut.generations, folder, stats)
    position: list[datetime] = []
    while _batch(ctx.session_factory, ctx, stats, lambda s: _delete_archived_generations(
            s, cut.generations, ctx.settings.retention_batch, stats, position)):
        pass
    _delete_orphan_prompts(ctx, cut.orphan_prompts, stats)
    _delete_older(ctx, "audit_logs", AuditLog.at, AuditLog.id, cut.audit_logs, stats)
    _delete_older(ctx, "maintenance_runs", MaintenanceRun.started_at, MaintenanceRun.id, cut.maintenance_runs, stats)
    seconds = time.monotonic() - started
    deleted = sum(v for k, v in stats.rows.items() if k != "archived")
    return {"policy": policy, "archives": archives, "deleted": {k: v for k, v in stats.rows.items() if k != "archived"},
            "archived": stats.rows.get("archived", 0), "batches": stats.batches, "largest_batch": stats.largest_batch,
            "lock_timeouts": stats.lock_timeouts, "seconds": round(seconds, 3),
            "rows_per_second": round(deleted / seconds, 1) if seconds > 0 else None}


# --- vacuum and reindex -------------------------------------------------------------------------

def _autocommit(ctx: TaskContext) -> Connection:
    engine = ctx.session_factory.kw["bind"]
    return engine.connect().execution_options(isolation_level="AUTOCOMMIT")  # type: ignore[no-any-return]


def _quoted(connection: Connection, name: str, allowed: Sequence[str]) -> str:
    if name not in allowed:
        raise ValueError(f"{name!r} is not in the fixed list")
    return connection.dialect.identifier_preparer.quote(name)


def _pg_table_report(connection: Connection) -> dict[str, dict[str, Any]]:
    has_pgstattuple = bool(connection.execute(
        text("SELECT 1 FROM pg_extension WHERE extname = 'pgstattuple'")).scalar())
    rows = connection.execute(text(
        "SELECT relname, n_live_tup, n_dead_tup, last_autovacuum, last_vacuum, last_autoanalyze, "
        "pg_total_relation_size(relid) AS total_bytes, pg_relation_size(relid) AS table_bytes "
        "FROM pg_stat_user_tables WHERE relname = ANY(:tables)"), {"tables": list(HOT_TABLES)}).mappings().all()
    report: dict[str, dict[str, Any]] = {}
    for row in rows:
        live, dead = int(row["n_live_tup"] or 0), int(row["n_dead_tup"] or 0)
        entry: dict[str, Any] = {
            "size_bytes": int(row["total_bytes"]), "table_bytes": int(row["table_bytes"]),
            "live_tuples": live, "dead_tuples": dead,
            # Without pgstattuple: the share of dead tuples, an estimate of reclaimable space.
            "bloat_ratio": round(dead / (live + dead), 4) if live + dead else 0.0,
            "bloat_method": "dead_tuple_ratio",
            "last_autovacuum": row["last_autovacuum"].isoformat() if row["last_autovacuum"] else None,
            "last_vacuum": row["last_vacuum"].isoformat() if row["last_vacuum"] else None,
        }
        if has_pgstattuple:
            stat = connection.execute(
                text("SELECT dead_tuple_percent, free_percent FROM pgstattuple(CAST(:t AS regclass))"),
                {"t": row["relname"]}).mappings().one()
            entry["bloat_ratio"] = round((float(stat["dead_tuple_percent"]) + float(stat["free_percent"])) / 100, 4)
            entry["bloat_method"] = "pgstattuple"
        report[row["relname"]] = entry
    return report


def _sqlite_report(connection: Connection) -> dict[str, Any]:
    page_size = int(connection.execute(text("PRAGMA page_size")).scalar() or 0)
    pages = int(connection.execute(text("PRAGMA page_count")).scalar() or 0)
    free = int(connection.execute(text("PRAGMA freelist_count")).scalar() or 0)
    return {"size_bytes": page_size * pages, "free_pages": free,
            "bloat_ratio": round(free / pages, 4) if pages else 0.0, "bloat_method": "freelist"}


@maintenance_task("db.vacuum", schedule="30 2 * * *", time_limit_s=2 * 3600, heavy=True)
def vacuum(ctx: TaskContext) -> dict[str, Any]:
    """VACUUM (ANALYZE) of the hot tables with a bloat report; never VACUUM FULL."""
    with _autocommit(ctx) as connection:
        if connection.dialect.name == "sqlite":
            before = _sqlite_report(connection)
            if ctx.dry_run:
                return {"database": before, "would_run": ["VACUUM", "ANALYZE", "PRAGMA optimize"]}
            for statement in ("VACUUM", "ANALYZE", "PRAGMA optimize"):
                connection.execute(text(statement))
            record_table_report("sqlite", before["size_bytes"], None, before["bloat_ratio"])
            return {"database": before, "after": _sqlite_report(connection),
                    "ran": ["VACUUM", "ANALYZE", "PRAGMA optimize"]}
        tables = _pg_table_report(connection)
        if ctx.dry_run:
            return {"tables": tables, "would_vacuum": list(HOT_TABLES)}
        seconds: dict[str, float] = {}
        for table in HOT_TABLES:
            started = time.monotonic()
            connection.execute(text(f"VACUUM (ANALYZE) {_quoted(connection, table, HOT_TABLES)}"))
            seconds[table] = round(time.monotonic() - started, 3)
        after = _pg_table_report(connection)
        for name, entry in tables.items():
            entry["dead_tuples_after"] = after.get(name, {}).get("dead_tuples")
            entry["vacuum_seconds"] = seconds.get(name)
            record_table_report(name, entry["size_bytes"], entry["dead_tuples"], entry["bloat_ratio"])
        return {"tables": tables}


@maintenance_task("db.reindex", schedule="0 3 * * 0", time_limit_s=3 * 3600, heavy=True)
def reindex(ctx: TaskContext) -> dict[str, Any]:
    """REINDEX INDEX CONCURRENTLY of the hot indexes (REINDEX on SQLite)."""
    with _autocommit(ctx) as connection:
        if connection.dialect.name == "sqlite":
            if ctx.dry_run:
                return {"would_run": ["REINDEX", "PRAGMA optimize"]}
            connection.execute(text("REINDEX"))
            connection.execute(text("PRAGMA optimize"))
            return {"ran": ["REINDEX", "PRAGMA optimize"]}
        present = [name for name in connection.execute(
            text("SELECT indexname FROM pg_indexes WHERE schemaname = current_schema() AND indexname = ANY(:names)"),
            {"names": list(HOT_INDEXES)}).scalars()]
        ordered = [name for name in HOT_INDEXES if name in present]
        if ctx.dry_run:
            return {"would_reindex": ordered}
        done: dict[str, dict[str, Any]] = {}
        for name in ordered:
            size = "SELECT pg_relation_size(CAST(:n AS regclass))"
            before = int(connection.execute(text(size), {"n": name}).scalar() or 0)
            started = time.monotonic()
            connection.execute(text(f"REINDEX INDEX CONCURRENTLY {_quoted(connection, name, HOT_INDEXES)}"))
            done[name] = {"bytes_before": before, "bytes_after": int(connection.execute(text(size), {"n": name})
                                                                      .scalar() or 0),
                          "seconds": round(time.monotonic() - started, 3)}
        return {"reindexed": done}
