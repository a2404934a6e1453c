"""Every error the system raises on purpose. Each has a stable ``code`` stored on the job row."""

from __future__ import annotations


class TextNLPError(Exception):
    """Root of every textnlp-jobs error."""

    code = "textnlp.error"
    retryable = False

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.code


class InputError(TextNLPError):
    """A job's input breaks a rule; nothing was written."""

    code = "input.invalid"

    def __init__(self, field: str, message: str, *, code: str) -> None:
        super().__init__(f"{field}: {message}", code=code)
        self.field = field


class UnknownModelError(InputError):
    """The job names a model the registry does not know."""

    def __init__(self, model: str, known: list[str]) -> None:
        listing = ", ".join(sorted(known)) or "none registered"
        super().__init__("model", f"unknown model {model!r} (known: {listing})", code="input.unknown_model")


class JobNotFoundError(TextNLPError):
    """No job has that id."""

    code = "jobs.not_found"


class ConfigurationError(TextNLPError):
    """Settings that cannot work together; the process refuses to start."""

    code = "config.invalid"


class ModelStoreError(TextNLPError):
    """A model directory is missing or unreadable."""

    code = "models.unavailable"


class InferenceError(TextNLPError):
    """Generation failed for a job."""

    code = "inference.failed"


class OutOfMemoryError(InferenceError):
    """The device ran out of memory even for a batch of one."""

    code = "inference.oom"


class TokenizationError(InferenceError):
    """The prompt could not be tokenized."""

    code = "inference.tokenization"


class JobDroppedError(InferenceError):
    """The job was cancelled or passed its deadline while waiting for a batch."""

    code = "inference.dropped"


class WorkerShuttingDownError(InferenceError):
    """The device loop stopped before the job ran; it will be delivered again."""

    code = "inference.shutdown"
    retryable = True


class DeviceInUseError(ConfigurationError):
    """Another live worker already serves this device; a second one refuses to start."""

    code = "config.device_in_use"


class UnknownDeviceError(InputError):
    """The job is pinned to a device no worker has ever served."""

    def __init__(self, device: str, known: list[str]) -> None:
        listing = ", ".join(sorted(known)) or "none registered yet: start a device worker first"
        super().__init__("device", f"unknown device {device!r} (known: {listing})", code="input.unknown_device")


class IdempotencyConflictError(InputError):
    """An idempotency key already names a job with different parameters."""

    def __init__(self, key: str, differing: list[str]) -> None:
        super().__init__("idempotency_key", f"{key!r} was used for a job with a different {', '.join(differing)}",
                         code="input.idempotency_conflict")
        self.differing = differing


class LedgerError(TextNLPError):
    """The ledger cannot be used."""

    code = "db.error"


class LedgerUnavailableError(LedgerError):
    """The ledger's database does not answer."""

    code = "db.unavailable"


class LedgerNotMigratedError(LedgerError):
    """The ledger's schema is not at the newest migration."""

    code = "db.not_migrated"


class BrokerUnavailableError(TextNLPError):
    """The broker does not answer."""

    code = "broker.unavailable"


class JobFailedError(TextNLPError):
    """Raised by the generation task after a job ended failed or dead, so Celery and Flower show
    the task as failed; the row is already written and the message is acked, never retried."""

    code = "job.failed"
