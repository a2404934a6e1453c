"""Locks that keep two runs of one maintenance task from overlapping, across processes and hosts.

Redis (``SET NX`` with an expiry, released only by its owner) when the broker is Redis; an
exclusive ``flock`` on a file under ``TEXTNLP_HOME`` when the system runs embedded.
"""

from __future__ import annotations

import contextlib
import fcntl
import uuid
from collections.abc import Iterator

from textnlp_jobs.constants import REDIS_KEY_PREFIX
from textnlp_jobs.settings import Settings

# Delete the key only if it still holds our token, so an expired lock is never freed by its old owner.
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


@contextlib.contextmanager
def maintenance_lock(settings: Settings, name: str, ttl_seconds: int = 3600) -> Iterator[bool]:
    """Yields True when this run holds the lock, False when another run does."""
    url = settings.broker_url_value()
    if url.startswith(("redis://", "rediss://", "unix://")):
        import redis

        client = redis.Redis.from_url(url)
        key, token = f"{REDIS_KEY_PREFIX}lock:{name}", uuid.uuid4().hex
        try:
            held = bool(client.set(key, token, nx=True, ex=ttl_seconds))
            try:
                yield held
            finally:
                if held:
                    client.eval(_RELEASE, 1, key, token)
        finally:
            client.close()
        return
    folder = settings.home / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{name}.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
