"""Every error the system raises on purpose, and every error code it stores or prints.

Each code is a member of ``ErrorCode``: stored on the job row (``error_code``), used as a metric
label, and printed by the CLI as ``error <code>: <message>``. A code that is not here does not
exist; scripts may rely on the ones that are.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    """The stable codes of every expected error."""

    ERROR = "textnlp.error"
    UNEXPECTED = "textnlp.unexpected"

    # Input: refused before anything is written.
    INPUT_INVALID = "input.invalid"
    INPUT_UNKNOWN_MODEL = "input.unknown_model"
    INPUT_UNKNOWN_PARAMETER = "input.unknown_parameter"
    INPUT_PROMPT_INVALID = "input.prompt_invalid"
    INPUT_PROMPT_INVALID_UTF8 = "input.prompt_invalid_utf8"
    INPUT_PROMPT_EMPTY = "input.prompt_empty"
    INPUT_PROMPT_TOO_LONG = "input.prompt_too_long"
    INPUT_PROMPT_TOO_MANY_TOKENS = "input.prompt_too_many_tokens"
    INPUT_IDEMPOTENCY_KEY_INVALID = "input.idempotency_key_invalid"
    INPUT_DEADLINE_INVALID = "input.deadline_invalid"
    INPUT_DEADLINE_PAST = "input.deadline_past"
    INPUT_DEVICE_INVALID = "input.device_invalid"
    INPUT_JOB_ID_INVALID = "input.job_id_invalid"
    INPUT_MODEL_NOT_ON_DEVICE = "input.model_not_on_device"
    INPUT_MAX_NEW_TOKENS_INVALID = "input.max_new_tokens_invalid"
    INPUT_MAX_NEW_TOKENS_OUT_OF_RANGE = "input.max_new_tokens_out_of_range"
    INPUT_TEMPERATURE_INVALID = "input.temperature_invalid"
    INPUT_TEMPERATURE_OUT_OF_RANGE = "input.temperature_out_of_range"
    INPUT_TOP_P_INVALID = "input.top_p_invalid"
    INPUT_TOP_P_OUT_OF_RANGE = "input.top_p_out_of_range"
    INPUT_TOP_K_INVALID = "input.top_k_invalid"
    INPUT_TOP_K_OUT_OF_RANGE = "input.top_k_out_of_range"
    INPUT_SEED_INVALID = "input.seed_invalid"
    INPUT_SEED_OUT_OF_RANGE = "input.seed_out_of_range"
    INPUT_PRIORITY_INVALID = "input.priority_invalid"
    INPUT_PRIORITY_OUT_OF_RANGE = "input.priority_out_of_range"
    INPUT_MAX_ATTEMPTS_INVALID = "input.max_attempts_invalid"
    INPUT_MAX_ATTEMPTS_OUT_OF_RANGE = "input.max_attempts_out_of_range"
    INPUT_MESSAGES_INVALID = "input.messages_invalid"
    INPUT_NO_CHAT_TEMPLATE = "input.no_chat_template"
    INPUT_STOP_INVALID = "input.stop_invalid"
    INPUT_JOB_INVALID = "input.job_invalid"
    INPUT_UNKNOWN_DEVICE = "input.unknown_device"
    INPUT_TOO_LONG_FOR_MODEL = "input.too_long_for_model"
    INPUT_IDEMPOTENCY_CONFLICT = "input.idempotency_conflict"

    # Jobs: what happened to a job, and what a producer asked of one.
    JOBS_NOT_FOUND = "jobs.not_found"
    JOBS_WAIT_TIMEOUT = "jobs.wait_timeout"
    JOBS_ALREADY_FINISHED = "jobs.already_finished"
    JOB_CANCELLED = "job.cancelled"
    JOB_EXPIRED = "job.expired"
    JOB_MAX_ATTEMPTS = "job.max_attempts"
    JOB_FAILED = "job.failed"
    JOBS_NOT_REQUEUEABLE = "jobs.not_requeueable"
    # A job whose queue no worker consumed (moved to textnlp.dead_letter by queues.dead_letter).
    QUEUE_NO_CONSUMER = "queue.no_consumer"

    # Maintenance.
    MAINTENANCE_UNKNOWN_TASK = "maintenance.unknown_task"
    ARCHIVE_INVALID = "archive.invalid"

    # Configuration and the command line.
    CONFIG_INVALID = "config.invalid"
    CONFIG_DEVICE_INVALID = "config.device_invalid"
    CONFIG_DEVICE_UNAVAILABLE = "config.device_unavailable"
    CONFIG_DEVICE_IN_USE = "config.device_in_use"
    CLI_USAGE = "cli.usage"

    # Services the system needs.
    LEDGER_UNREACHABLE = "ledger.unreachable"
    LEDGER_NOT_MIGRATED = "ledger.not_migrated"
    BROKER_UNREACHABLE = "broker.unreachable"

    # Models.
    MODELS_UNAVAILABLE = "models.unavailable"
    MODELS_UNKNOWN_RECIPE = "models.unknown_recipe"
    MODELS_NOT_FOUND = "models.not_found"
    MODELS_INVALID = "models.invalid"
    MODELS_CORRUPT = "models.corrupt"
    MODELS_IN_USE = "models.in_use"
    MODELS_NO_PREVIOUS_VERSION = "models.no_previous_version"
    MODELS_VALIDATION_FAILED = "models.validation_failed"

    # Inference on a device.
    INFERENCE_FAILED = "inference.failed"
    INFERENCE_OOM = "inference.oom"
    INFERENCE_TOKENIZATION = "inference.tokenization"
    INFERENCE_DROPPED = "inference.dropped"
    INFERENCE_SHUTDOWN = "inference.shutdown"
    INFERENCE_TIMEOUT = "inference.timeout"


class TextNLPError(Exception):
    """Root of every textnlp-jobs error."""

    code: str = ErrorCode.ERROR
    retryable = False
    exit_status = 2  # what the CLI exits with after printing the error

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.code


class InputError(TextNLPError):
    """A job's input breaks a rule; nothing was written."""

    code = ErrorCode.INPUT_INVALID

    def __init__(self, field: str, message: str, *, code: str) -> None:
        super().__init__(f"{field}: {message}", code=code)
        self.field = field


class UnknownModelError(InputError):
    """The job names a model the registry does not know."""

    def __init__(self, model: str, known: list[str]) -> None:
        listing = ", ".join(sorted(known)) or "none registered"
        super().__init__("model", f"unknown model {model!r} (known: {listing})", code=ErrorCode.INPUT_UNKNOWN_MODEL)


class JobNotFoundError(TextNLPError):
    """No job has that id."""

    code = ErrorCode.JOBS_NOT_FOUND


class JobWaitTimeout(TextNLPError):
    """``wait`` ran out of time before every job finished."""

    code = ErrorCode.JOBS_WAIT_TIMEOUT


class JobAlreadyFinishedError(TextNLPError):
    """A job asked to change (cancel) had already reached a final status."""

    code = ErrorCode.JOBS_ALREADY_FINISHED
    exit_status = 3  # not a failure of the command line: the job was simply done already


class ConfigurationError(TextNLPError):
    """Settings that cannot work together; the process refuses to start."""

    code = ErrorCode.CONFIG_INVALID


class UsageError(TextNLPError):
    """The command line asks for something that cannot be done (bad option value, missing argument)."""

    code = ErrorCode.CLI_USAGE


class ServiceUnavailableError(TextNLPError):
    """A service the system needs (the ledger, the broker) does not answer."""

    code = ErrorCode.LEDGER_UNREACHABLE


class LedgerNotMigratedError(TextNLPError):
    """The ledger's schema is missing or older than this code; run ``textnlp-jobs db upgrade``."""

    code = ErrorCode.LEDGER_NOT_MIGRATED


class ArchiveError(TextNLPError):
    """A retention archive is missing, unreadable, or does not match its manifest."""

    code = ErrorCode.ARCHIVE_INVALID


class ModelStoreError(TextNLPError):
    """A model directory is missing or unreadable."""

    code = ErrorCode.MODELS_UNAVAILABLE


class InferenceError(TextNLPError):
    """Generation failed for a job."""

    code = ErrorCode.INFERENCE_FAILED


class OutOfMemoryError(InferenceError):
    """The device ran out of memory even for a batch of one."""

    code = ErrorCode.INFERENCE_OOM


class TokenizationError(InferenceError):
    """The prompt could not be tokenized."""

    code = ErrorCode.INFERENCE_TOKENIZATION


class JobDroppedError(InferenceError):
    """The job was cancelled or passed its deadline while waiting for a batch."""

    code = ErrorCode.INFERENCE_DROPPED


class WorkerShuttingDownError(InferenceError):
    """The device loop stopped before the job ran; it will be delivered again."""

    code = ErrorCode.INFERENCE_SHUTDOWN
    retryable = True


class ModelNotFoundError(TextNLPError):
    """No registered model or version has that name."""

    code = ErrorCode.MODELS_NOT_FOUND


class ModelRegistrationError(ModelStoreError):
    """A directory cannot be registered: a file is missing, the architecture is unknown, or the
    tokenizer does not fit the model. Nothing was registered."""

    code = ErrorCode.MODELS_INVALID


class ModelCorruptError(ModelStoreError):
    """The version's files no longer match their checksums; it is never served."""

    code = ErrorCode.MODELS_CORRUPT


class ModelInUseError(TextNLPError):
    """The version is promoted, pinned or loaded, so it cannot be removed."""

    code = ErrorCode.MODELS_IN_USE


class NoPreviousVersionError(TextNLPError):
    """A rollback found no earlier promotion to go back to."""

    code = ErrorCode.MODELS_NO_PREVIOUS_VERSION


class ModelValidationFailed(TextNLPError):
    """models.validate found versions whose files changed or went missing (now marked corrupt)."""

    code = ErrorCode.MODELS_VALIDATION_FAILED
class DeviceInUseError(ConfigurationError):
    """Another live worker already serves this device; a second one refuses to start."""

    code = ErrorCode.CONFIG_DEVICE_IN_USE


class UnknownDeviceError(InputError):
    """The job is pinned to a device no worker has ever served."""

    def __init__(self, device: str, known: list[str]) -> None:
        listing = ", ".join(sorted(known)) or "none registered yet: start a device worker first"
        super().__init__("device", f"unknown device {device!r} (known: {listing})",
                         code=ErrorCode.INPUT_UNKNOWN_DEVICE)


class IdempotencyConflictError(InputError):
    """An idempotency key already names a job with different parameters."""

    def __init__(self, key: str, differing: list[str]) -> None:
        super().__init__("idempotency_key", f"{key!r} was used for a job with a different {', '.join(differing)}",
                         code=ErrorCode.INPUT_IDEMPOTENCY_CONFLICT)
        self.differing = differing


class JobFailedError(TextNLPError):
    """Raised by the generation task after a job ended failed or dead, so Celery and Flower show
    the task as failed; the row is already written and the message is acked, never retried."""

    code = ErrorCode.JOB_FAILED
