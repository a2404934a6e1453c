"""All configuration, read once from ``TEXTNLP_*`` environment variables.

With no variables set at all the system runs *embedded*: an SQLite ledger and kombu's
``filesystem://`` broker under ``TEXTNLP_HOME`` (default ``~/.textnlp-jobs``), so a new user's
first command needs no server. Production points ``TEXTNLP_DATABASE_URL`` at PostgreSQL and
``TEXTNLP_BROKER_URL`` at Redis.
"""

from __future__ import annotations

import os
import socket
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# The dtypes a model's float weights may be loaded in (``TEXTNLP_DTYPE``).
ModelDtype = Literal["auto", "float32", "bfloat16", "float16"]
_CHECKPOINT_DTYPE: dict[str, ModelDtype] = {"*": "auto"}


class BatchingPolicy(BaseModel):
    """How one model's jobs are gathered into batches on a device."""

    model_config = ConfigDict(extra="forbid")

    max_batch: int = Field(16, ge=1, le=512)
    max_wait_ms: float = Field(20.0, ge=0, le=10_000)
    # continuous: jobs join and leave the running batch between decode steps; static: a batch
    # runs until its longest row ends. None: the device's default (DEFAULT_BATCHING_MODE).
    mode: Literal["continuous", "static"] | None = None

    def mode_on(self, device: str) -> str:
        """The mode this policy runs on ``device`` (a torch device such as ``cpu`` or ``cuda:0``)."""
        return self.mode or DEFAULT_BATCHING_MODE["cuda" if device.startswith("cuda") else "cpu"]


# Measured with bench/throughput.py (README, "Batching modes"): continuous wins on a GPU; on
# this project's 2-core CPU machine the numbers are in bench/results/.
DEFAULT_BATCHING_MODE: dict[str, str] = {"cuda": "continuous", "cpu": "continuous"}

# A device worker's claims and result writes are spaced under load (``group_spacing_ms``) where its
# CPU time is taken from the model's: a CPU device's torch threads share the worker's cores, so
# each statement saved is decode time won back (bench/results: about a fifth of the worker's CPU
# on a mixed workload). A GPU's worker has cores of its own beside the one its decode loop needs,
# so there spacing would only delay claims and writes (up to the spacing each, at a run's start
# and its end); unspaced, a worker that falls behind still gathers bigger groups by itself, since
# each group is what arrived while the last one ran.
DEFAULT_GROUP_SPACING_MS: dict[str, float] = {"cuda": 0.0, "cpu": 25.0}


class Settings(BaseSettings):
    """Every knob of the system; each field is ``TEXTNLP_<FIELD>`` in the environment."""

    # Fields named model_* (model_store, model_cache, ...) are ours: pydantic before 2.10 warns
    # about each on every import unless its "model_" namespace is released.
    model_config = SettingsConfigDict(env_prefix="TEXTNLP_", extra="ignore", protected_namespaces=())

    home: Path = Field(default_factory=lambda: Path.home() / ".textnlp-jobs")
    database_url: SecretStr | None = None
    broker_url: SecretStr | None = None
    # Celery's own result backend is off by default: the ledger holds every result.
    result_backend: SecretStr | None = None
    model_store: Path | None = None
    # Where built demo/tiny models are kept across homes (keyed by recipe); "off" disables it.
    # Default: $XDG_CACHE_HOME/textnlp-jobs/models (~/.cache/textnlp-jobs/models).
    model_cache: str | None = None
    node_name: str = Field(default_factory=socket.gethostname)

    # Which models each device serves, e.g. {"cuda.0": ["demo"], "*": ["demo"]}; "*" is the default.
    placement: dict[str, list[str]] = Field(default_factory=lambda: {"*": ["demo"]})
    # Per-model batching, e.g. {"small": {"max_batch": 32, "max_wait_ms": 50}}; "*" is the default.
    batching: dict[str, BatchingPolicy] = Field(default_factory=lambda: {"*": BatchingPolicy()})

    # Per-model weight dtype on the device, e.g. {"small": "bfloat16"}; "*" is the default. "auto"
    # keeps the dtype the checkpoint's config.json records. Which is faster depends on the model
    # and the device: measure (bench/throughput.py --dtype). An int8 variant keeps its own.
    dtype: dict[str, ModelDtype] = Field(default_factory=lambda: _CHECKPOINT_DTYPE.copy())

    # Jobs in flight per device worker (its prefetch); None means two per batch slot (2 x the largest max_batch).
    worker_concurrency: int | None = Field(None, ge=1, le=1024)
    # A device worker runs its models and batching loop in a child process (inference/engine_process.py),
    # so Celery, ledger and broker work never holds the GIL its decode loop needs. False: one process.
    engine_process: bool = True
    # Under load a device worker starts a claim, or a result write, at most once per this many
    # milliseconds, so jobs that trickle in or finish one by one share statements (groups.py).
    # After a quiet spell an item, and the group after it, go at once; 0 groups only what
    # waited while the last group ran. None: the device's default (DEFAULT_GROUP_SPACING_MS).
    group_spacing_ms: float | None = Field(None, ge=0, le=1_000)

    task_events: bool = False

    # Input limits: bad input is refused before anything is written.
    max_prompt_bytes: int = Field(16_384, ge=1)
    max_prompt_tokens: int = Field(1_024, ge=1)
    max_new_tokens_limit: int = Field(512, ge=1)
    default_max_new_tokens: int = Field(32, ge=1)
    max_temperature: float = Field(2.0, gt=0)
    max_priority: int = Field(9, ge=0, le=9)
    default_max_attempts: int = Field(3, ge=1, le=20)

    # Job lifetime. A claimed job owns its row for lease_seconds; the longest a job may take on a
    # device is max_job_seconds, and the broker must not redeliver before that.
    lease_seconds: float = Field(600.0, gt=0)
    max_job_seconds: float = Field(300.0, gt=0)
    visibility_timeout: float = Field(3_600.0, gt=0)
    reconcile_grace_seconds: float = Field(60.0, ge=0)
    reconcile_batch: int = Field(5_000, ge=1)

    # The embedded filesystem broker polls its folder; lower means lower latency, more CPU.
    filesystem_polling_interval: float = Field(0.05, gt=0)
    reconcile_interval_seconds: float = Field(300.0, gt=0)

    # Models: the environment whose promoted versions this process serves, how often a worker
    # looks for a new promotion, and how often it records what it has loaded and used.
    environment: str = Field("production", min_length=1, max_length=64)
    model_poll_seconds: float = Field(5.0, gt=0)
    model_heartbeat_seconds: float = Field(60.0, gt=0)
    # models.cleanup removes versions unused for this long (unless pinned, promoted or loaded).
    model_cleanup_days: float = Field(30.0, ge=0)
    # models.quantize registers an int8 variant only when, against its source on the held-out text,
    # perplexity rises by at most this fraction and CPU tokens/s at batch 1 and 8 reach this ratio.
    quantize_max_perplexity_increase: float = Field(0.05, ge=0)
    quantize_min_speedup: float = Field(1.5, ge=0)
    # Worker liveness: a device worker refreshes its heartbeat every interval; once it is older
    # than the TTL the worker counts as dead and its running jobs are rescued by a live peer, the
    # worker that replaces it, or the reconciler, without waiting for their lease.
    heartbeat_interval_seconds: float = Field(2.0, gt=0)
    heartbeat_ttl_seconds: float = Field(15.0, gt=0)
    # The reconciler flags queued jobs (error_code queue.no_consumer) whose queue no live worker
    # has consumed for this long: a pinned device that is gone, a model no device serves.
    no_consumer_seconds: float = Field(300.0, gt=0)
    # `worker --all-devices` restarts a crashed device worker after a delay that doubles from
    # the first to the last value with each crash in a row (reset after a worker ran a while).
    restart_backoff_seconds: tuple[float, float] = (1.0, 60.0)
    # Flower refuses basic-auth passwords shorter than this.
    flower_min_password_length: int = Field(8, ge=1)

    # --- maintenance (issue 6) ----------------------------------------------------------------
    # Overrides of the beat schedule by task name: a 5-field crontab in UTC ("30 2 * * *"), a
    # number of seconds (an interval, for tests and demos) or "off", e.g. {"db.vacuum": "30 2 * * *"}.
    schedule: dict[str, str | float] = Field(default_factory=dict)
    # Retention policy (days); generations are deleted only once archived.
    retention_generations_days: float = Field(90, gt=0)
    retention_orphan_prompts_days: float = Field(30, gt=0)
    retention_audit_logs_days: float = Field(365, gt=0)
    retention_maintenance_runs_days: float = Field(180, gt=0)
    # Rows per delete batch (each its own transaction) and how long a batch waits for a row lock.
    retention_batch: int = Field(5_000, ge=1, le=100_000)
    retention_lock_timeout_ms: int = Field(2_000, ge=1)
    # Pause between batches, to lower the load a large cleanup puts on a busy ledger.
    retention_batch_pause_seconds: float = Field(0.0, ge=0)
    # Where db.retention writes its gzip JSON-lines archives; default <home>/archive.
    archive_dir: Path | None = None
    # cache.expire: keys with no TTL idle longer than this are removed.
    cache_idle_seconds: float = Field(7 * 86_400, gt=0)
    # cache.memory: at most this many keys are sized to find the largest ones.
    cache_memory_sample: int = Field(100_000, ge=0)
    # queues.dead_letter: messages of a queue no one consumes, older than this, are dead-lettered.
    dead_letter_after_seconds: float = Field(86_400, gt=0)

    # Observability. With no pushgateway URL nothing is pushed; a metrics port serves /metrics for pull.
    pushgateway_url: str | None = None
    push_interval_seconds: float = Field(15.0, gt=0)
    push_timeout_seconds: float = Field(3.0, gt=0)
    # metrics.expire_groups deletes worker groups whose last push is older than this (a SIGKILLed worker).
    pushgateway_group_ttl_seconds: float = Field(900.0, gt=0)
    metrics_port: int | None = Field(None, ge=1, le=65535)
    # health.check: how long workers get to answer a ping, and when a figure turns degraded / down.
    health_ping_timeout_seconds: float = Field(2.0, gt=0)
    health_queue_age_degraded_seconds: float = Field(300.0, gt=0)
    health_queue_age_down_seconds: float = Field(1800.0, gt=0)
    health_disk_free_degraded_ratio: float = Field(0.15, ge=0, le=1)
    health_disk_free_down_ratio: float = Field(0.05, ge=0, le=1)

    @field_validator("placement")
    @classmethod
    def _placement_has_models(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for device, models in value.items():
            if not models:
                raise ValueError(f"placement for {device!r} names no model")
        return value

    # --- derived values -------------------------------------------------------------------
    @property
    def embedded(self) -> bool:
        return self.broker_url is None

    def database_url_value(self) -> str:
        if self.database_url is not None:
            return self.database_url.get_secret_value()
        return f"sqlite:///{self.home / 'ledger.sqlite3'}"

    def broker_url_value(self) -> str:
        if self.broker_url is not None:
            return self.broker_url.get_secret_value()
        # kombu warns "No hostname was supplied" for a bare filesystem:// (the host is unused).
        return "filesystem://localhost/"

    def broker_folder(self) -> Path:
        return self.home / "broker"

    def archive_dir_value(self) -> Path:
        return self.archive_dir if self.archive_dir is not None else self.home / "archive"

    def model_store_dir(self) -> Path:
        return self.model_store if self.model_store is not None else self.home / "models"

    def model_cache_dir(self) -> Path | None:
        if self.model_cache is not None:
            return None if self.model_cache.strip().lower() in ("", "off", "none", "false", "0") else Path(
                self.model_cache).expanduser()
        xdg = os.environ.get("XDG_CACHE_HOME")
        return (Path(xdg) if xdg else Path.home() / ".cache") / "textnlp-jobs" / "models"

    def models_for_device(self, device: str) -> list[str]:
        return list(self.placement.get(device) or self.placement.get("*") or [])

    def batching_for(self, model: str) -> BatchingPolicy:
        return self.batching.get(model) or self.batching.get("*") or BatchingPolicy()

    def dtype_for(self, model: str) -> str:
        return self.dtype.get(model) or self.dtype.get("*") or "auto"

    def group_spacing_on(self, device_kind: str) -> float:
        """Seconds between a device worker's claims or writes under load, on a ``cpu`` or ``cuda``
        device: the setting where given, else that kind's default."""
        spacing = self.group_spacing_ms
        return (DEFAULT_GROUP_SPACING_MS[device_kind] if spacing is None else spacing) / 1000.0

    def broker_transport_options(self) -> dict[str, Any]:
        if self.embedded:
            folder = str(self.broker_folder())
            return {
                "data_folder_in": folder,
                "data_folder_out": folder,
                # kombu's default is the relative path "control", i.e. the process's working
                # directory: processes started from different directories would not see each
                # other's fanout bindings (remote control / ping would go unanswered).
                "control_folder": str(self.home / "broker-control"),
                "polling_interval": self.filesystem_polling_interval,
            }
        return {
            "visibility_timeout": self.visibility_timeout,
            # Ten priority lists per queue; kombu polls the lowest number first.
            "priority_steps": list(range(10)),
            "queue_order_strategy": "priority",
        }


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment on first use."""
    return Settings()


def reset_settings_cache() -> None:
    """Forget the cached settings (tests and the CLI change the environment)."""
    get_settings.cache_clear()
