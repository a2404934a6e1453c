"""Every ledger query the job system runs. Knows nothing of Celery.

Exactly-once results rest on two conditional UPDATEs: a claim moves a row ``queued -> running`` and
bumps ``attempts``; a result is written only ``WHERE status = 'running' AND attempts = <claimed
attempt>``. A second delivery of the same message, or a worker whose lease was taken away, finds
no row to update and writes nothing.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    Uuid,
    and_,
    any_,
    bindparam,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from textnlp_jobs.db.models import FINAL_STATUSES, AuditLog, Generation, JobStatus, Prompt, utcnow
from textnlp_jobs.errors import ErrorCode, IdempotencyConflictError

RESULT_WRITTEN = "generation.result_written"


@dataclass(frozen=True)
class NewJob:
    """A validated job, ready to insert."""

    prompt: str
    model: str
    max_new_tokens: int
    params: dict[str, Any]
    priority: int = 0
    max_attempts: int = 3
    idempotency_key: str | None = None
    deadline: datetime | None = None
    device: str | None = None
    prompt_tokens: int | None = None
    # False when the seed was drawn for the job, not given: an idempotent resubmission without a
    # seed then matches the stored job whatever seed was drawn for it.
    seed_explicit: bool = True
    id: uuid.UUID = field(default_factory=uuid.uuid4)


@dataclass(frozen=True)
class Job:
    """A job as the ledger holds it (what producers read)."""

    id: uuid.UUID
    status: JobStatus
    model: str
    model_version: str | None
    params: dict[str, Any]
    max_new_tokens: int
    priority: int
    device: str | None
    idempotency_key: str | None
    attempts: int
    max_attempts: int
    deadline: datetime | None
    text: str | None
    prompt_tokens: int | None
    tokens_generated: int | None
    mean_logprob: float | None
    batch_size: int | None
    queue_wait_seconds: float | None
    inference_seconds: float | None
    error_code: str | None
    error_message: str | None
    worker: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    # Why a succeeded job's text ends: "stop" when the model ended it (an end-of-sequence or
    # end-of-turn token, not counted in tokens_generated) or it wrote one of its stop strings,
    # "length" when max_new_tokens cut it (the text may stop mid-sentence). None unless succeeded.
    finish_reason: str | None = None

    @property
    def done(self) -> bool:
        """True once the job reached a final status (succeeded, failed, cancelled, expired, dead)."""
        return self.status.is_final


def finish_reason_of(status: JobStatus, recorded: str | None, tokens_generated: int | None,
                     max_new_tokens: int) -> str | None:
    """A succeeded job's finish reason: the one its worker recorded, else (a row written before
    workers recorded it) told from its token count, which cannot tell a stop string written by the
    very last allowed token from a cut."""
    if status != JobStatus.SUCCEEDED or tokens_generated is None:
        return None
    if recorded is not None:
        return recorded
    return "length" if tokens_generated >= max_new_tokens else "stop"


@dataclass(frozen=True)
class ClaimedJob:
    """What a worker needs to run a job it has claimed."""

    id: uuid.UUID
    attempt: int
    prompt: str
    model: str
    params: dict[str, Any]
    max_new_tokens: int
    deadline: datetime | None
    created_at: datetime


@dataclass(frozen=True)
class ClaimOutcome:
    """The claim either hands over the job or says why there is nothing to run."""

    job: ClaimedJob | None
    reason: str  # "claimed", "not_queued", "expired", "dead", "missing"


@dataclass(frozen=True)
class Routing:
    """Enough of a row to publish its message again."""

    id: uuid.UUID
    model: str
    device: str | None
    priority: int


def _record_columns() -> list[Any]:
    g = Generation
    return [
        g.id, g.status, g.model, g.model_version, g.params, g.max_new_tokens, g.priority, g.device,
        g.idempotency_key, g.attempts, g.max_attempts, g.deadline, g.result_text, g.prompt_tokens,
        g.tokens_generated, g.mean_logprob, g.batch_size, g.queue_wait_seconds, g.inference_seconds,
        g.error_code, g.error_message, g.worker, g.created_at, g.started_at, g.finished_at, g.finish_reason,
    ]


def _to_record(row: Any) -> Job:
    values = list(row)  # _record_columns() in Job's field order, finish_reason last
    values[1] = status = JobStatus(row.status)
    values[-1] = finish_reason_of(status, row.finish_reason, row.tokens_generated, row.max_new_tokens)
    return Job(*values)


# --- producers ------------------------------------------------------------------------------

def existing_by_idempotency_key(session: Session, keys: Iterable[str]) -> dict[str, Job]:
    keys = list(keys)
    if not keys:
        return {}
    rows = session.execute(select(*_record_columns()).where(Generation.idempotency_key.in_(keys))).all()
    return {record.idempotency_key: record for record in map(_to_record, rows) if record.idempotency_key}


def _fingerprint(prompt_sha256: str, model: str, max_new_tokens: int, params: dict[str, Any], priority: int,
                 device: str | None, deadline: datetime | None, max_attempts: int) -> dict[str, Any]:
    """What an idempotency key promises stays the same between two submissions."""
    return {"prompt": prompt_sha256, "model": model, "max_new_tokens": max_new_tokens,
            **{name: params.get(name) for name in ("temperature", "top_p", "top_k", "seed")},
            "priority": priority, "device": device, "deadline": deadline, "max_attempts": max_attempts}


def _job_fingerprint(job: NewJob) -> dict[str, Any]:
    return _fingerprint(hashlib.sha256(job.prompt.encode("utf-8")).hexdigest(), job.model, job.max_new_tokens,
                        job.params, job.priority, job.device, job.deadline, job.max_attempts)


def _stored_fingerprints(session: Session, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
    keys = list(keys)
    if not keys:
        return {}
    g = Generation
    rows = session.execute(
        select(g.idempotency_key, Prompt.sha256, g.model, g.max_new_tokens, g.params, g.priority, g.device,
               g.deadline, g.max_attempts)
        .join(Prompt, Prompt.id == g.prompt_id).where(g.idempotency_key.in_(keys))
    ).all()
    return {row[0]: _fingerprint(*row[1:]) for row in rows}


def _check_idempotency(job: NewJob, reference: dict[str, Any]) -> None:
    """Refuse a key reused with other parameters (a drawn seed is not a parameter the caller chose)."""
    mine = _job_fingerprint(job)
    differing = [name for name, value in mine.items()
                 if value != reference[name] and (name != "seed" or job.seed_explicit)]
    if differing:
        raise IdempotencyConflictError(job.idempotency_key or "", differing)


def insert_jobs(session: Session, jobs: Sequence[NewJob]) -> list[Job]:
    """Insert new jobs in one round of batched INSERTs; an idempotency key already known returns
    the job it names instead of creating another, provided the parameters are the same (else
    ``IdempotencyConflictError`` names what differs). Returns one record per input, in order."""
    existing = existing_by_idempotency_key(session, (j.idempotency_key for j in jobs if j.idempotency_key))
    references = _stored_fingerprints(session, existing)
    for job in jobs:
        if job.idempotency_key:
            reference = references.setdefault(job.idempotency_key, _job_fingerprint(job))
            _check_idempotency(job, reference)
    now = utcnow()
    fresh: list[NewJob] = []
    seen_keys: dict[str, NewJob] = {}
    for job in jobs:
        if job.idempotency_key and (job.idempotency_key in existing or job.idempotency_key in seen_keys):
            continue
        if job.idempotency_key:
            seen_keys[job.idempotency_key] = job
        fresh.append(job)
    if fresh and session.get_bind().dialect.name == "postgresql":
        _insert_fresh_postgres(session, fresh, now)
    elif fresh:  # SQLite (embedded): the ORM's batched INSERTs
        prompt_rows = []
        generation_rows = []
        for job in fresh:
            prompt_id = uuid.uuid4()
            encoded = job.prompt.encode("utf-8")
            prompt_rows.append({
                "id": prompt_id, "text": job.prompt, "sha256": hashlib.sha256(encoded).hexdigest(),
                "byte_length": len(encoded), "token_count": job.prompt_tokens, "created_at": now,
            })
            generation_rows.append({
                "id": job.id, "prompt_id": prompt_id, "model": job.model, "params": job.params,
                "max_new_tokens": job.max_new_tokens, "status": JobStatus.QUEUED.value,
                "priority": job.priority, "device": job.device, "idempotency_key": job.idempotency_key,
                "attempts": 0, "max_attempts": job.max_attempts, "deadline": job.deadline,
                "prompt_tokens": job.prompt_tokens, "archived": False, "created_at": now, "updated_at": now,
            })
        session.execute(insert(Prompt), prompt_rows)
        session.execute(insert(Generation), generation_rows)
    # The rows just written are known in full: no need to read them back.
    by_id = {job.id: _new_record(job, now) for job in fresh}
    out: list[Job] = []
    for job in jobs:
        if job.idempotency_key and job.idempotency_key in existing:
            out.append(existing[job.idempotency_key])
        elif job.idempotency_key and seen_keys[job.idempotency_key] is not job:
            out.append(by_id[seen_keys[job.idempotency_key].id])
        else:
            out.append(by_id[job.id])
    return out


# New jobs on PostgreSQL: both tables in ONE statement of fixed text, the rows travelling as one
# JSON document (json_to_recordset). Every job of a submit_many waits for this commit before the
# first message goes out; the ORM's executemany of the same rows cost 0.15 ms per job on the
# development machine, and arrays per column (unnest) still 0.09 ms, most of it psycopg quoting
# array elements in Python, where one json.dumps runs in C. Validation has already refused NUL
# characters, the one thing JSON text cannot carry into PostgreSQL. The writable CTE's INSERT and
# the outer one share a snapshot, but the foreign key is checked at the end of the statement, when
# the prompts are there.
_INSERT_JOBS = text(f"""
WITH v AS (
    SELECT * FROM json_to_recordset(CAST(:rows AS json))
        AS v(id uuid, prompt_id uuid, text text, sha256 varchar, byte_length integer, token_count integer,
             model varchar, params jsonb, max_new_tokens integer, priority smallint, device varchar,
             idempotency_key varchar, max_attempts integer, deadline timestamptz)
), p AS (
    INSERT INTO {Prompt.__tablename__} (id, text, sha256, byte_length, token_count, created_at)
    SELECT prompt_id, text, sha256, byte_length, token_count, :now FROM v
)
INSERT INTO {Generation.__tablename__} (id, prompt_id, model, params, max_new_tokens, status, priority, device,
                                        idempotency_key, attempts, max_attempts, deadline, prompt_tokens,
                                        archived, created_at, updated_at)
SELECT id, prompt_id, model, params, max_new_tokens, :queued, priority, device, idempotency_key, 0,
       max_attempts, deadline, token_count, false, :now, :now
  FROM v
""")


def _insert_fresh_postgres(session: Session, jobs: Sequence[NewJob], now: datetime) -> None:
    rows = []
    for job in jobs:
        raw = job.prompt.encode("utf-8")
        rows.append({
            "id": str(job.id), "prompt_id": str(uuid.uuid4()), "text": job.prompt,
            "sha256": hashlib.sha256(raw).hexdigest(), "byte_length": len(raw), "token_count": job.prompt_tokens,
            "model": job.model, "params": job.params, "max_new_tokens": job.max_new_tokens,
            "priority": job.priority, "device": job.device, "idempotency_key": job.idempotency_key,
            "max_attempts": job.max_attempts, "deadline": job.deadline.isoformat() if job.deadline else None,
        })
    # Characters as they are (UTF-8, as any text parameter travels), not as \u escapes, which
    # PostgreSQL refuses to turn into text above U+007F in a database not encoded in UTF-8.
    document = json.dumps(rows, ensure_ascii=False)
    session.execute(_INSERT_JOBS, {"rows": document, "queued": JobStatus.QUEUED.value, "now": now})


def _new_record(job: NewJob, created_at: datetime) -> Job:
    return Job(
        id=job.id, status=JobStatus.QUEUED, model=job.model, model_version=None, params=job.params,
        max_new_tokens=job.max_new_tokens, priority=job.priority, device=job.device,
        idempotency_key=job.idempotency_key, attempts=0, max_attempts=job.max_attempts, deadline=job.deadline,
        text=None, prompt_tokens=job.prompt_tokens, tokens_generated=None, mean_logprob=None, batch_size=None,
        queue_wait_seconds=None, inference_seconds=None, error_code=None, error_message=None, worker=None,
        created_at=created_at, started_at=None, finished_at=None,
    )


def insert_jobs_once(session: Session, jobs: Sequence[NewJob]) -> list[Job]:
    """``insert_jobs`` in its own transaction, retried once when a concurrent producer inserted
    the same idempotency key between our lookup and our INSERT."""
    try:
        with session.begin():
            return insert_jobs(session, jobs)
    except IntegrityError:
        with session.begin():
            return insert_jobs(session, jobs)


def mark_published(session: Session, ids: Sequence[uuid.UUID], at: datetime | None = None) -> None:
    if ids:
        session.execute(
            update(Generation).where(Generation.id.in_(ids)).values(published_at=at or utcnow()),
            execution_options={"synchronize_session": False},
        )


def get_jobs(session: Session, ids: Sequence[uuid.UUID]) -> list[Job]:
    if not ids:
        return []
    records: list[Job] = []
    for start in range(0, len(ids), 1000):  # keep IN lists bounded
        chunk = ids[start:start + 1000]
        rows = session.execute(select(*_record_columns()).where(_id_in(session, Generation.id, chunk))).all()
        records.extend(map(_to_record, rows))
    return records


def final_among(session: Session, ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
    """Which of ``ids`` are final: what a waiting client polls (the ids only, no rows)."""
    found: set[uuid.UUID] = set()
    for start in range(0, len(ids), 1000):
        chunk = ids[start:start + 1000]
        found.update(session.execute(select(Generation.id).where(
            _id_in(session, Generation.id, chunk), Generation.status.in_(FINAL_STATUSES))).scalars())
    return found


def get_job(session: Session, job_id: uuid.UUID) -> Job | None:
    row = session.execute(select(*_record_columns()).where(Generation.id == job_id)).first()
    return _to_record(row) if row else None


def list_jobs(
    session: Session, *, status: str | None = None, model: str | None = None, limit: int = 50
) -> list[Job]:
    query = select(*_record_columns()).order_by(Generation.created_at.desc()).limit(limit)
    if status:
        query = query.where(Generation.status == status)
    if model:
        query = query.where(Generation.model == model)
    return [_to_record(row) for row in session.execute(query).all()]


def count_by_status(session: Session, ids: Sequence[uuid.UUID] | None = None) -> dict[str, int]:
    query = select(Generation.status, func.count()).group_by(Generation.status)
    if ids is not None:
        query = query.where(Generation.id.in_(ids))
    return {status: count for status, count in session.execute(query).all()}


def cancel(session: Session, job_id: uuid.UUID, actor: str = "client") -> str | None:
    """Cancel a job that has not finished. Returns its status afterwards (None if unknown)."""
    now = utcnow()
    updated = session.execute(
        update(Generation)
        .where(Generation.id == job_id, Generation.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]))
        .values(status=JobStatus.CANCELLED.value, finished_at=now, updated_at=now,
                error_code=ErrorCode.JOB_CANCELLED, error_message="cancelled by request")
    )
    if updated.rowcount:  # type: ignore[attr-defined]
        _audit(session, actor, "generation.cancelled", job_id, {})
        return JobStatus.CANCELLED.value
    status = session.execute(select(Generation.status).where(Generation.id == job_id)).scalar()
    return status


# --- workers --------------------------------------------------------------------------------

def _id_in(session: Session, column: Any, ids: Sequence[uuid.UUID]) -> Any:
    """``column = ANY(:ids)`` on PostgreSQL (one array parameter, one cached plan); ``IN`` elsewhere."""
    if session.get_bind().dialect.name == "postgresql":
        return column == any_(bindparam("group_ids", list(ids), type_=ARRAY(Uuid())))
    return column.in_(list(ids))


# The group claim on PostgreSQL, as fixed text: one array parameter, nothing compiled per group
# (the ORM statement's compile cost more than the round trip; see _WRITE_GROUP).
_CLAIM_GROUP = text(f"""
UPDATE {Generation.__tablename__} AS g
   SET status = :running, attempts = g.attempts + 1, worker = :worker, lease_expires_at = :lease,
       started_at = :now, updated_at = :now
  FROM {Prompt.__tablename__} AS p
 WHERE g.id = ANY(CAST(:ids AS uuid[])) AND g.status = :queued AND g.attempts < g.max_attempts
   AND (g.deadline IS NULL OR g.deadline > :now) AND p.id = g.prompt_id
RETURNING g.id, g.attempts, p.text, g.model, g.params, g.max_new_tokens, g.deadline, g.created_at
""")


def claim_many(session: Session, job_ids: Sequence[uuid.UUID], worker: str,
               lease_seconds: float) -> dict[uuid.UUID, ClaimOutcome]:
    """Take a group of queued jobs for one attempt each in ONE statement: ``queued -> running``,
    ``attempts + 1``, a lease; the prompt comes back with the row (UPDATE ... FROM prompts
    RETURNING). Ids that could not be claimed get their reason (a second query, only for them)."""
    ids = sorted(set(job_ids))  # one lock order for every worker: no deadlock between two groups
    if not ids:
        return {}
    now = utcnow()
    g = Generation
    claimed_columns = (g.id, g.attempts, Prompt.text, g.model, g.params, g.max_new_tokens, g.deadline, g.created_at)
    lease = now + timedelta(seconds=lease_seconds)
    if session.get_bind().dialect.name == "postgresql":
        rows = session.execute(_CLAIM_GROUP.columns(*claimed_columns), {
            "ids": ids, "queued": JobStatus.QUEUED.value, "running": JobStatus.RUNNING.value, "worker": worker,
            "now": now, "lease": lease}).all()
    else:  # SQLite (embedded) has no UPDATE ... FROM RETURNING a joined table: read the prompts after
        taken = session.execute(
            update(g)
            .where(g.id.in_(ids), g.status == JobStatus.QUEUED.value, g.attempts < g.max_attempts,
                   or_(g.deadline.is_(None), g.deadline > now))
            .values(status=JobStatus.RUNNING.value, attempts=g.attempts + 1, worker=worker,
                    lease_expires_at=lease, started_at=now, updated_at=now)
            .returning(g.id), execution_options={"synchronize_session": False})
        taken_ids = list(taken.scalars().all())
        rows = session.execute(select(*claimed_columns).join(Prompt, Prompt.id == g.prompt_id)
                               .where(g.id.in_(taken_ids))).all() if taken_ids else []
    out = {row[0]: ClaimOutcome(ClaimedJob(*row), "claimed") for row in rows}
    missed = [job_id for job_id in ids if job_id not in out]
    if missed:
        states = {row.id: row for row in session.execute(
            select(g.id, g.status, g.attempts, g.max_attempts, g.deadline).where(_id_in(session, g.id, missed))
        ).all()}
        for job_id in missed:
            out[job_id] = _why_not_claimed(session, job_id, states.get(job_id), now)
    return out


def _why_not_claimed(session: Session, job_id: uuid.UUID, state: Any, now: datetime) -> ClaimOutcome:
    if state is None:
        return ClaimOutcome(None, "missing")
    if state.status != JobStatus.QUEUED.value:
        return ClaimOutcome(None, "not_queued")
    if state.deadline is not None and state.deadline <= now:
        _finish_unclaimed(session, job_id, JobStatus.EXPIRED, ErrorCode.JOB_EXPIRED,
                          "deadline passed before the job ran")
        return ClaimOutcome(None, "expired")
    _finish_unclaimed(session, job_id, JobStatus.DEAD, ErrorCode.JOB_MAX_ATTEMPTS,
                      f"gave up after {state.attempts} attempts")
    return ClaimOutcome(None, "dead")


def claim(session: Session, job_id: uuid.UUID, worker: str, lease_seconds: float) -> ClaimOutcome:
    """Take one queued job for one attempt (``claim_many`` of one)."""
    return claim_many(session, [job_id], worker, lease_seconds)[job_id]


def _finish_unclaimed(session: Session, job_id: uuid.UUID, status: JobStatus, code: str, message: str) -> None:
    now = utcnow()
    session.execute(
        update(Generation)
        .where(Generation.id == job_id, Generation.status == JobStatus.QUEUED.value)
        .values(status=status.value, error_code=code, error_message=message, finished_at=now, updated_at=now)
    )


@dataclass(frozen=True)
class Outcome:
    """What a finished attempt produced."""

    text: str
    tokens_generated: int
    mean_logprob: float | None
    model_version: str | None
    batch_size: int
    queue_wait_seconds: float
    inference_seconds: float
    prompt_tokens: int | None = None  # as the model read them; None keeps what the producer counted
    finish_reason: str | None = None  # "stop" or "length"; None: the engine did not say


def _owned_by(job_id: uuid.UUID, attempt: int) -> Any:
    return and_(Generation.id == job_id, Generation.status == JobStatus.RUNNING.value,
                Generation.attempts == attempt)


@dataclass(frozen=True)
class Finished:
    """One attempt's result, for a group write."""

    job_id: uuid.UUID
    attempt: int
    outcome: Outcome


def write_successes(session: Session, results: Sequence[Finished], worker: str) -> set[uuid.UUID]:
    """Write a group of results, each row only ``WHERE status = 'running' AND attempts = <its
    claimed attempt>``, with an audit row for each one written. On PostgreSQL that is ONE statement
    of fixed shape (``_WRITE_GROUP``). Returns the ids actually written."""
    results = sorted(results, key=lambda r: r.job_id)  # the claim's lock order
    if not results:
        return set()
    now = utcnow()
    if session.get_bind().dialect.name == "postgresql":
        return _write_group_postgres(session, results, worker, now)
    # SQLite (embedded): one conditional UPDATE per row, same transaction
    written = {r.job_id for r in results if session.execute(
        update(Generation).where(_owned_by(r.job_id, r.attempt)).values(**_success_values(r.outcome, now))
    ).rowcount}  # type: ignore[attr-defined]
    audits = [_audit_row(worker, RESULT_WRITTEN, r.job_id, {"attempt": r.attempt, "tokens": r.outcome.tokens_generated})
              for r in results if r.job_id in written]
    if audits:
        session.execute(insert(AuditLog), audits)
    return written


def _success_values(outcome: Outcome, now: datetime) -> dict[str, Any]:
    counted = {} if outcome.prompt_tokens is None else {"prompt_tokens": outcome.prompt_tokens}
    return {
        **counted, "status": JobStatus.SUCCEEDED.value, "result_text": outcome.text,
        "tokens_generated": outcome.tokens_generated, "finish_reason": outcome.finish_reason,
        "mean_logprob": outcome.mean_logprob,
        "model_version": outcome.model_version, "batch_size": outcome.batch_size,
        "queue_wait_seconds": outcome.queue_wait_seconds, "inference_seconds": outcome.inference_seconds,
        "error_code": None, "error_message": None, "lease_expires_at": None, "finished_at": now, "updated_at": now,
    }


# The group write on PostgreSQL: the results travel as one array per column (unnest), so the
# statement has the same text for any group size. psycopg prepares it once per connection and
# SQLAlchemy compiles nothing per group; a VALUES list built per group cost more Python than the
# generation it recorded (measured in bench/: a third of the worker's GIL time). The audit rows
# are inserted by the same statement, only for the rows the UPDATE wrote.
_WRITE_GROUP = text(f"""
WITH v AS (
    SELECT * FROM unnest(CAST(:ids AS uuid[]), CAST(:attempts AS integer[]), CAST(:texts AS text[]),
                         CAST(:tokens AS integer[]), CAST(:logprobs AS double precision[]),
                         CAST(:versions AS varchar[]), CAST(:batches AS integer[]),
                         CAST(:waits AS double precision[]), CAST(:inferences AS double precision[]),
                         CAST(:prompts AS integer[]), CAST(:reasons AS varchar[]))
        AS v(id, attempt, text, tokens, logprob, version, batch, wait, inference, prompt, reason)
), written AS (
    UPDATE {Generation.__tablename__} AS g
       SET status = :succeeded, result_text = v.text, tokens_generated = v.tokens, finish_reason = v.reason,
           mean_logprob = v.logprob,
           model_version = v.version, batch_size = v.batch, queue_wait_seconds = v.wait,
           inference_seconds = v.inference, prompt_tokens = COALESCE(v.prompt, g.prompt_tokens),
           error_code = NULL, error_message = NULL,
           lease_expires_at = NULL, finished_at = :now, updated_at = :now
      FROM v
     WHERE g.id = v.id AND g.status = :running AND g.attempts = v.attempt
    RETURNING g.id, v.attempt, v.tokens
), audited AS (
    INSERT INTO {AuditLog.__tablename__} (at, actor, action, entity_type, entity_id, details)
    SELECT :now, :actor, :action, 'generation', CAST(written.id AS text),
           jsonb_build_object('attempt', written.attempt, 'tokens', written.tokens)
      FROM written
)
SELECT id FROM written
""")


def _write_group_postgres(session: Session, results: Sequence[Finished], worker: str,
                          now: datetime) -> set[uuid.UUID]:
    outcomes = [r.outcome for r in results]
    rows = session.execute(_WRITE_GROUP, {
        "ids": [r.job_id for r in results], "attempts": [r.attempt for r in results],
        "texts": [o.text for o in outcomes], "tokens": [o.tokens_generated for o in outcomes],
        "logprobs": [o.mean_logprob for o in outcomes], "versions": [o.model_version for o in outcomes],
        "batches": [o.batch_size for o in outcomes], "waits": [o.queue_wait_seconds for o in outcomes],
        "inferences": [o.inference_seconds for o in outcomes], "prompts": [o.prompt_tokens for o in outcomes],
        "reasons": [o.finish_reason for o in outcomes],
        "succeeded": JobStatus.SUCCEEDED.value, "running": JobStatus.RUNNING.value, "now": now,
        "actor": worker[:255], "action": RESULT_WRITTEN,
    }).scalars().all()
    return set(rows)


def write_success(session: Session, job_id: uuid.UUID, attempt: int, outcome: Outcome, worker: str) -> bool:
    """Write the result of ``attempt`` unless another attempt owns the row. True when written."""
    return job_id in write_successes(session, [Finished(job_id, attempt, outcome)], worker)


def write_failure(
    session: Session, job_id: uuid.UUID, attempt: int, code: str, message: str, worker: str, *, retry: bool
) -> str | None:
    """Record a failed attempt: back to ``queued`` when it may be retried and attempts remain,
    else ``failed``. Returns the new status, or None when the row was not ours."""
    now = utcnow()
    g = Generation
    row = session.execute(select(g.attempts, g.max_attempts).where(_owned_by(job_id, attempt))).first()
    if row is None:
        return None
    again = retry and row.attempts < row.max_attempts
    status = JobStatus.QUEUED if again else JobStatus.FAILED
    values: dict[str, Any] = {
        "status": status.value, "error_code": code, "error_message": message[:2000],
        "lease_expires_at": None, "updated_at": now,
    }
    if again:
        values["published_at"] = None  # the reconciler republishes it after its grace period
    else:
        values["finished_at"] = now
    session.execute(update(g).where(_owned_by(job_id, attempt)).values(**values))
    _audit(session, worker, "generation.attempt_failed", job_id, {"attempt": attempt, "code": code})
    return status.value


def release(session: Session, job_id: uuid.UUID, attempt: int) -> Routing | None:
    """Give a claimed job back to the queue without counting the attempt (clean shutdown).
    Returns what its new message needs, or None when the row was not ours."""
    g = Generation
    row = session.execute(
        update(g).where(_owned_by(job_id, attempt))
        .values(status=JobStatus.QUEUED.value, attempts=g.attempts - 1, lease_expires_at=None, updated_at=utcnow())
        .returning(g.id, g.model, g.device, g.priority)
    ).first()
    return Routing(row.id, row.model, row.device, row.priority) if row else None


# The device loop's cancel and deadline check, every quarter second for every waiting and decoding
# job of a device (hundreds): the server returns only the jobs no longer worth generating (usually
# none), and the ids travel as one comma-joined text. The ORM query read every row back and
# converted each id both ways, about 17 µs of the engine process's GIL per job and check, taken from
# the decode loop beside it.
_NOT_WORTH_GENERATING = text(f"""
SELECT v.id
  FROM unnest(CAST(string_to_array(:ids, ',') AS uuid[]), CAST(string_to_array(:attempts, ',') AS integer[]))
       AS v(id, attempt)
  LEFT JOIN {Generation.__tablename__} AS g ON g.id = v.id
 WHERE g.id IS NULL OR g.status <> :running OR g.attempts <> v.attempt OR g.deadline <= :now
""").columns(Generation.id)


def cancelled_or_overdue(session: Session, claims: Sequence[tuple[uuid.UUID, int]]) -> set[uuid.UUID]:
    """Of these claimed attempts, the ones no longer worth generating (cancelled, re-leased,
    or past their deadline). One query for a whole batch."""
    if not claims:
        return set()
    now = utcnow()
    if session.get_bind().dialect.name == "postgresql":
        ids, numbers = zip(*claims, strict=True)
        return set(session.execute(_NOT_WORTH_GENERATING, {
            "ids": ",".join(map(str, ids)), "attempts": ",".join(map(str, numbers)),
            "running": JobStatus.RUNNING.value, "now": now}).scalars())
    attempts = dict(claims)  # SQLite (embedded): read them and decide here
    rows = session.execute(
        select(Generation.id, Generation.status, Generation.attempts, Generation.deadline)
        .where(_id_in(session, Generation.id, list(attempts)))
    ).all()
    live = {
        row.id for row in rows
        if row.status == JobStatus.RUNNING.value and row.attempts == attempts[row.id]
        and (row.deadline is None or row.deadline > now)
    }
    return set(attempts) - live


def _audit_row(actor: str, action: str, job_id: uuid.UUID, details: dict[str, Any]) -> dict[str, Any]:
    return {"at": utcnow(), "actor": actor[:255], "action": action, "entity_type": "generation",
            "entity_id": str(job_id), "details": details}


def _audit(session: Session, actor: str, action: str, job_id: uuid.UUID, details: dict[str, Any]) -> None:
    session.execute(insert(AuditLog).values(**_audit_row(actor, action, job_id, details)))


def expire_claimed(session: Session, job_id: uuid.UUID, attempt: int) -> bool:
    """A claimed job whose deadline passed while it waited for a batch: ``expired``, not run."""
    now = utcnow()
    return bool(session.execute(
        update(Generation).where(_owned_by(job_id, attempt), Generation.deadline <= now)
        .values(status=JobStatus.EXPIRED.value, error_code=ErrorCode.JOB_EXPIRED, lease_expires_at=None,
                error_message="deadline passed while waiting for a batch", finished_at=now, updated_at=now)
    ).rowcount)  # type: ignore[attr-defined]


# --- the reconciler ---------------------------------------------------------------------------

def _routing(rows: Iterable[Any]) -> list[Routing]:
    return [Routing(row.id, row.model, row.device, row.priority) for row in rows]


def expire_overdue(session: Session, limit: int) -> int:
    """Queued jobs past their deadline become ``expired``."""
    now = utcnow()
    g = Generation
    ids = session.execute(
        select(g.id).where(g.status == JobStatus.QUEUED.value, g.deadline <= now).limit(limit)
    ).scalars().all()
    if not ids:
        return 0
    return int(session.execute(
        update(g).where(g.id.in_(ids), g.status == JobStatus.QUEUED.value)
        .values(status=JobStatus.EXPIRED.value, error_code=ErrorCode.JOB_EXPIRED,
                error_message="deadline passed before the job ran", finished_at=now, updated_at=now),
        execution_options={"synchronize_session": False},
    ).rowcount)  # type: ignore[attr-defined]


def bury_exhausted(session: Session, limit: int) -> int:
    """Jobs that used up their attempts without a result (queued, or running past the lease)
    become ``dead``: poison jobs stop circulating."""
    now = utcnow()
    g = Generation
    ids = session.execute(
        select(g.id).where(
            g.attempts >= g.max_attempts,
            or_(g.status == JobStatus.QUEUED.value,
                and_(g.status == JobStatus.RUNNING.value, g.lease_expires_at <= now)),
        ).limit(limit)
    ).scalars().all()
    if not ids:
        return 0
    return int(session.execute(
        update(g).where(g.id.in_(ids), g.status.in_([JobStatus.QUEUED.value, JobStatus.RUNNING.value]))
        .values(status=JobStatus.DEAD.value, error_code=ErrorCode.JOB_MAX_ATTEMPTS, lease_expires_at=None,
                error_message="no result after the maximum number of attempts", finished_at=now, updated_at=now),
        execution_options={"synchronize_session": False},
    ).rowcount)  # type: ignore[attr-defined]


def rescue_expired_leases(session: Session, limit: int) -> list[Routing]:
    """Running jobs whose lease ran out (their worker died or hung) go back to ``queued``.
    The caller publishes them again: the old message may be gone with the worker."""
    now = utcnow()
    g = Generation
    rows = session.execute(
        select(g.id, g.model, g.device, g.priority).where(
            g.status == JobStatus.RUNNING.value, g.lease_expires_at <= now, g.attempts < g.max_attempts,
        ).limit(limit)
    ).all()
    if not rows:
        return []
    session.execute(
        update(g).where(g.id.in_([r.id for r in rows]), g.status == JobStatus.RUNNING.value,
                        g.lease_expires_at <= now)
        .values(status=JobStatus.QUEUED.value, lease_expires_at=None, worker=None, updated_at=now),
        execution_options={"synchronize_session": False},
    )
    return _routing(rows)


def unpublished_candidates(session: Session, grace_seconds: float, limit: int) -> list[Routing]:
    """Queued jobs whose last publish (or creation) is older than the grace period: their message
    should have been consumed by now, so the caller checks whether it still exists."""
    cutoff = utcnow() - timedelta(seconds=grace_seconds)
    g = Generation
    rows = session.execute(
        select(g.id, g.model, g.device, g.priority)
        .where(g.status == JobStatus.QUEUED.value, func.coalesce(g.published_at, g.created_at) <= cutoff)
        .order_by(g.priority.desc(), g.created_at)
        .limit(limit)
    ).all()
    return _routing(rows)
