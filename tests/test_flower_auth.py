"""Flower never starts with credentials that protect nothing."""

from __future__ import annotations

import pytest

from textnlp_jobs.errors import ConfigurationError
from textnlp_jobs.flower_auth import check_basic_auth


@pytest.mark.parametrize(("credentials", "words"), [
    (None, "needs authentication"), ("", "needs authentication"), (":", "empty user name"),
    ("admin:", "password of 0 characters"), (":long-enough-password", "empty user name"),
    ("admin:short", "at least 12"), ("admin", "not user:password"),
    ("ops:long-enough-password,guest:", "entry 2"),
])
def test_empty_users_and_short_passwords_are_refused(credentials: str | None, words: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        check_basic_auth(credentials, 12)
    assert words in str(caught.value)


def test_good_credentials_pass() -> None:
    assert check_basic_auth("ops:long-enough-pw,dev:another-long-one", 12) == "ops:long-enough-pw,dev:another-long-one"
