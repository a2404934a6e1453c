"""The ledger's tables as typed SQLAlchemy models. Migrations in ``migrations/`` create them."""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    Uuid,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Constraint names are fixed so that migrations can name what they drop.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

JSONType = JSON().with_variant(JSONB(), "postgresql")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timestamps are aware UTC in Python on every dialect (SQLite would hand back naive ones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the ledger; use aware UTC datetimes")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    DEAD = "dead"

    @property
    def is_final(self) -> bool:
        return self not in (JobStatus.QUEUED, JobStatus.RUNNING)


FINAL_STATUSES = tuple(s.value for s in JobStatus if s.is_final)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime(), dict[str, Any]: JSONType}


class Prompt(Base):
    __tablename__ = "prompts"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    text: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    byte_length: Mapped[int] = mapped_column(Integer)
    token_count: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Generation(Base):
    """One generation job: the row is the truth, the broker message only carries its id."""

    __tablename__ = "generations"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    prompt_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("prompts.id", ondelete="RESTRICT"), index=True)
    model: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str | None] = mapped_column(String(128))
    params: Mapped[dict[str, Any]] = mapped_column(JSONType)
    max_new_tokens: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED.value)
    priority: Mapped[int] = mapped_column(SmallInteger, default=0)
    device: Mapped[str | None] = mapped_column(String(255))
    idempotency_key: Mapped[str | None] = mapped_column(String(255), unique=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer)
    lease_expires_at: Mapped[datetime | None]
    deadline: Mapped[datetime | None]
    worker: Mapped[str | None] = mapped_column(String(255))
    result_text: Mapped[str | None] = mapped_column(Text)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    tokens_generated: Mapped[int | None] = mapped_column(Integer)
    # Why a succeeded job's text ends: "stop" (the model ended it, or it wrote a stop string) or
    # "length" (max_new_tokens cut it). NULL on rows written before the worker recorded it.
    finish_reason: Mapped[str | None] = mapped_column(String(16))
    mean_logprob: Mapped[float | None] = mapped_column(Float)
    batch_size: Mapped[int | None] = mapped_column(Integer)
    queue_wait_seconds: Mapped[float | None] = mapped_column(Float)
    inference_seconds: Mapped[float | None] = mapped_column(Float)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    archived: Mapped[bool] = mapped_column(Boolean, default=False)
    published_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    __table_args__ = (
        # The reconciler's and the listing's scans.
        Index("ix_generations_status_published_at", "status", "published_at"),
        Index("ix_generations_status_lease_expires_at", "status", "lease_expires_at"),
        Index("ix_generations_created_at", "created_at"),
    )


class Model(Base):
    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    description: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # models.quantize builds int8 variants only of models flagged eligible.
    quantize_eligible: Mapped[bool] = mapped_column(Boolean, default=False)


class ModelVersion(Base):
    __tablename__ = "model_versions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    version: Mapped[str] = mapped_column(String(128))
    path: Mapped[str] = mapped_column(Text)
    # {relative file name: sha256}; manifest_sha256 is the hash of that mapping.
    manifest: Mapped[dict[str, Any]] = mapped_column(JSONType)
    manifest_sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    quantization: Mapped[str | None] = mapped_column(String(32))
    # Environments this version is promoted to, e.g. {"production": "2026-11-26T10:00:00+00:00"}.
    environments: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    keep_always: Mapped[bool] = mapped_column(Boolean, default=False)
    last_used_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    description: Mapped[str | None] = mapped_column(Text)
    # False when the store owns the files (a copy); True when they are the user's (--in-place).
    in_place: Mapped[bool] = mapped_column(Boolean, default=False)
    architecture: Mapped[str | None] = mapped_column(String(128))
    dtype: Mapped[str | None] = mapped_column(String(32))
    parameter_count: Mapped[int | None] = mapped_column(BigInteger)
    max_positions: Mapped[int | None] = mapped_column(Integer)
    # {"eos_token": "...", "eos_token_id": 0, "stop_token_ids": [0], "pad_token": null, ...,
    #  "chat_template": true}
    special_tokens: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    # A quantized variant points at the version it was built from.
    source_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_versions.id", ondelete="SET NULL"), index=True)
    # Set by models.validate when a file changed or went missing; a corrupt version is never served.
    corrupt: Mapped[bool] = mapped_column(Boolean, default=False)
    corrupt_reason: Mapped[str | None] = mapped_column(Text)
    # The last models.validate figures: load seconds, tokens/s, greedy output hash, when.
    validation: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)

    __table_args__ = (UniqueConstraint("model_id", "version", name="uq_model_versions_model_id_version"),)


class ModelPromotion(Base):
    """One promotion or rollback of a model in one environment: the history a rollback walks back."""

    __tablename__ = "model_promotions"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    environment: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(16))  # "promote" or "rollback"
    version: Mapped[str] = mapped_column(String(128))
    previous_version: Mapped[str | None] = mapped_column(String(128))
    actor: Mapped[str] = mapped_column(String(255))
    at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (Index("ix_model_promotions_model_id_environment", "model_id", "environment", "id"),)


class ModelLoad(Base):
    """A model version loaded by a running worker, refreshed while it stays loaded (cleanup and
    remove leave loaded versions alone)."""

    __tablename__ = "model_loads"

    worker: Mapped[str] = mapped_column(String(255), primary_key=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"),
                                                  primary_key=True, index=True)
    seen_at: Mapped[datetime] = mapped_column(default=utcnow)


class AuditLog(Base):
    __tablename__ = "audit_logs"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(255))
    action: Mapped[str] = mapped_column(String(64), index=True)
    entity_type: Mapped[str] = mapped_column(String(64))
    entity_id: Mapped[str] = mapped_column(String(64), index=True)
    details: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)


class MaintenanceRun(Base):
    __tablename__ = "maintenance_runs"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    task: Mapped[str] = mapped_column(String(64), index=True)
    status: Mapped[str] = mapped_column(String(16))
    dry_run: Mapped[bool] = mapped_column(Boolean, default=False)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]
    result: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)


class DeviceWorker(Base):
    """A device and the worker process that serves it: the registry producers validate pinned
    jobs against, and the heartbeat by which a dead worker's running jobs are rescued."""

    __tablename__ = "device_workers"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)  # "node/cuda.0" (Device.name)
    node: Mapped[str] = mapped_column(String(128))
    device: Mapped[str] = mapped_column(String(32))  # "cuda.0"
    hostname: Mapped[str] = mapped_column(String(255))  # Celery hostname, "gen-cuda0@node"
    models: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)  # {"served": [...]}
    instance: Mapped[str] = mapped_column(String(64))  # one per process start
    host: Mapped[str] = mapped_column(String(255))  # the machine the process runs on
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[datetime | None]
    stopped_at: Mapped[datetime | None]
