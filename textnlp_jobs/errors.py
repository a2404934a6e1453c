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


class ModelNotFoundError(TextNLPError):
    """No registered model or version has that name."""

    code = "models.not_found"


class ModelRegistrationError(ModelStoreError):
    """A directory cannot be registered: a file is missing, the architecture is unknown, or the
    tokenizer does not fit the model. Nothing was registered."""

    code = "models.invalid"


class ModelCorruptError(ModelStoreError):
    """The version's files no longer match their checksums; it is never served."""

    code = "models.corrupt"


class ModelInUseError(TextNLPError):
    """The version is promoted, pinned or loaded, so it cannot be removed."""

    code = "models.in_use"


class NoPreviousVersionError(TextNLPError):
    """A rollback found no earlier promotion to go back to."""

    code = "models.no_previous_version"
