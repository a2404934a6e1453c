"""Fixtures: a scratch PostgreSQL database and Redis database number per test run, the real
demo model built once, and real worker subprocesses.

A missing PostgreSQL or Redis skips the integration tests on a laptop but fails them under CI
(CI=true), where the services must be there.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
from sqlalchemy import text

from textnlp_jobs import local_stack
from textnlp_jobs.db.migrate import upgrade
from textnlp_jobs.db.session import dispose_engines, get_engine, session_factory
from textnlp_jobs.inference import store
from textnlp_jobs.inference.bootstrap import build_model

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
TEST_NODE = "testnode"


def _unavailable(error: Exception) -> None:
    if IN_CI:
        pytest.fail(f"a service the tests need is down under CI: {error}")
    pytest.skip(f"service unavailable: {error}")


@pytest.fixture(scope="session")
def model_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real demo model (and the tiny one), built once per test run, as the CLI builds them.
    TEXTNLP_TEST_MODEL_STORE names a store built earlier the same way, to skip the build."""
    prebuilt = os.environ.get("TEXTNLP_TEST_MODEL_STORE")
    if prebuilt and (Path(prebuilt) / "demo").is_dir():
        return Path(prebuilt)
    root = tmp_path_factory.mktemp("model-store")
    for name in ("demo", "tiny"):
        store.build_into_store(root, name, lambda target, name=name: _build_cached(name, target))
    return root


def _build_cached(name: str, target: Path) -> None:
    """Build a bootstrap model, or copy the identical one an earlier test run on this machine built.

    Builds are seeded, so the recipe code's hash is a safe key; training the demo model costs
    minutes on a busy 2-core machine and every test run needs the same bytes.
    """
    from textnlp_jobs.inference import bootstrap

    key = hashlib.sha256(Path(bootstrap.__file__).read_bytes() + name.encode()).hexdigest()[:16]
    cached = Path(tempfile.gettempdir()) / "textnlp-test-models" / f"{name}-{key}"
    if not cached.is_dir():
        cached.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{cached.name}-", dir=cached.parent))
        build_model(name, scratch)
        try:
            scratch.rename(cached)  # atomic: a half-built copy is never seen by a parallel run
        except OSError:
            shutil.rmtree(scratch, ignore_errors=True)  # another run won the race
    shutil.copytree(cached, target, dirs_exist_ok=True)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny GPT-2 alone, outside any store: a model a user brings."""
    target = tmp_path_factory.mktemp("tiny") / "tiny"
    _build_cached("tiny", target)
    return target


def register_models(settings_store: Path, database_url: str) -> None:
    from textnlp_jobs.settings import Settings

    settings = Settings(database_url=database_url)
    with session_factory(settings).begin() as session:
        for model_dir in sorted(settings_store.iterdir()):
            if model_dir.name.startswith("."):
                continue
            for version_dir in model_dir.iterdir():
                store.register_version(session, model_dir.name, version_dir)


def _service(scratch: Callable[[], AbstractContextManager[str]]) -> Iterator[str]:
    try:
        with scratch() as url:
            yield url
    except local_stack.ServiceUnavailable as error:
        _unavailable(error)


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    yield from _service(local_stack.scratch_postgres)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    yield from _service(local_stack.scratch_redis)


@pytest.fixture(scope="session")
def migrated_pg(pg_url: str, model_store: Path) -> str:
    upgrade(pg_url)
    register_models(model_store, pg_url)
    return pg_url


def base_env(home: Path, model_store: Path) -> dict[str, str]:
    """Settings every test stack shares: short leases so fault tests finish quickly."""
    return {
        "TEXTNLP_HOME": str(home),
        "TEXTNLP_MODEL_STORE": str(model_store),
        "TEXTNLP_MODEL_CACHE": "off",  # tests never read or fill the user's build cache
        "TEXTNLP_NODE_NAME": TEST_NODE,
        "TEXTNLP_LEASE_SECONDS": "10",
        "TEXTNLP_MAX_JOB_SECONDS": "8",
        "TEXTNLP_VISIBILITY_TIMEOUT": "12",
        "TEXTNLP_RECONCILE_GRACE_SECONDS": "2",
        "TEXTNLP_DEFAULT_MAX_ATTEMPTS": "6",
        "TEXTNLP_PLACEMENT": json.dumps({"*": ["demo"]}),
        "TEXTNLP_BATCHING": json.dumps({"*": {"max_batch": 8, "max_wait_ms": 20}}),
    }


@pytest.fixture
def stack(migrated_pg: str, redis_url: str, model_store: Path, tmp_path: Path) -> Iterator[local_stack.LocalStack]:
    """PostgreSQL + Redis, clean at the start of every test; workers are stopped at its end."""
    engine = get_engine(local_stack.LocalStack({"TEXTNLP_DATABASE_URL": migrated_pg}, tmp_path).settings())
    with engine.begin() as connection:
        connection.execute(text("TRUNCATE generations, prompts, audit_logs, maintenance_runs, device_workers"))
    import redis

    client = redis.Redis.from_url(redis_url)
    client.flushdb()  # our own database number only
    client.close()
    local_stack.keep_ownership(redis_url)
    env = base_env(tmp_path / "home", model_store)
    env.update({"TEXTNLP_DATABASE_URL": migrated_pg, "TEXTNLP_BROKER_URL": redis_url})
    running = local_stack.LocalStack(env, tmp_path)
    yield running
    running.stop_all()


@pytest.fixture
def embedded_stack(model_store: Path, tmp_path: Path) -> Iterator[local_stack.LocalStack]:
    """The embedded default: SQLite ledger and the folder broker under a fresh home."""
    home = tmp_path / "home"
    env = base_env(home, model_store)
    running = local_stack.LocalStack(env, tmp_path)
    settings = running.settings()
    upgrade(settings.database_url_value())
    register_models(model_store, settings.database_url_value())
    yield running
    running.stop_all()
    dispose_engines()
    shutil.rmtree(home, ignore_errors=True)


def new_id() -> uuid.UUID:
    return uuid.uuid4()
