"""Flower's basic-auth credentials, checked before Flower starts.

Flower takes ``user:password`` pairs separated by commas and accepts an empty user name or
password; an empty or short password is no protection, so none starts with one.
"""

from __future__ import annotations

from textnlp_jobs.errors import ConfigurationError


def check_basic_auth(credentials: str | None, min_password_length: int) -> str:
    """Return ``credentials`` if every ``user:password`` pair has a user name and a password of
    at least ``min_password_length`` characters; otherwise raise ``ConfigurationError``."""
    if not credentials or not credentials.strip():
        raise ConfigurationError("Flower needs authentication: set TEXTNLP_FLOWER_BASIC_AUTH=user:password")
    for position, pair in enumerate(credentials.split(","), start=1):
        user, colon, password = pair.partition(":")
        where = f"TEXTNLP_FLOWER_BASIC_AUTH entry {position}"
        if not colon:
            raise ConfigurationError(f"{where} is not user:password")
        if not user.strip():
            raise ConfigurationError(f"{where} has an empty user name")
        if len(password) < min_password_length:
            raise ConfigurationError(f"{where} has a password of {len(password)} characters; at least "
                                     f"{min_password_length} are required (TEXTNLP_FLOWER_MIN_PASSWORD_LENGTH)")
    return credentials
