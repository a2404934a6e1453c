"""The model store on disk (the registry of versions in the ledger is ``registry.py``).

A version is a directory ``<store>/<name>/<version>/`` loadable with ``from_pretrained``; its
version id is the first 12 hex digits of the sha256 of its manifest (file name -> sha256), so
the same files always register as the same version.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from textnlp_jobs.db.models import ModelVersion


@dataclass(frozen=True)
class ResolvedModel:
    """A version chosen to be served: ``name`` is the model jobs ask for (``small`` also for
    ``small@int8``), ``version_id`` its registry row (None for models not in a registry)."""

    name: str
    version: str
    path: Path
    quantization: str | None = None
    version_id: int | None = None
    chat_template: bool | None = None  # None: not recorded


def file_manifest(directory: Path) -> dict[str, str]:
    """sha256 of every file under ``directory``, by relative path."""
    manifest = {}
    for file in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        manifest[str(file.relative_to(directory))] = digest.hexdigest()
    return manifest


def manifest_digest(manifest: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def register_version(session: Session, name: str, path: Path, *, description: str | None = None,
                     quantization: str | None = None) -> ModelVersion:
    """Record the model directory at ``path`` as a version of ``name`` with what it is (architecture,
    dtype, parameters, positions, special tokens); idempotent. See ``registry.record_version``."""
    from textnlp_jobs.inference import registry
    from textnlp_jobs.inference.loading import inspect_directory

    return registry.record_version(session, name, path, info=inspect_directory(path), description=description,
                                   quantization=quantization)


def known_models(session: Session) -> list[str]:
    from textnlp_jobs.inference import registry

    return registry.known_models(session)


def resolve(session: Session, name: str, environment: str = "production") -> ResolvedModel:
    """The version of ``name`` to serve in ``environment``; see ``registry.resolve``."""
    from textnlp_jobs.inference import registry

    return registry.resolve(session, name, environment)


_POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "seq_length")


def max_positions(path: Path) -> int | None:
    """The longest sequence (prompt + new tokens) the model at ``path`` can attend to, from its
    ``config.json``; None when the directory or the field is not there."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for key in _POSITION_KEYS:
        value = config.get(key) if isinstance(config, dict) else None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def build_into_store(store: Path, name: str, build: Callable[[Path], object]) -> Path:
    """Build a model in a scratch directory inside the store, then move it to its version's place
    so a half-built model is never visible."""
    store.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".build-{name}-", dir=store))
    try:
        build(scratch)
        version = manifest_digest(file_manifest(scratch))[:12]
        final = store / name / version
        if final.exists():
            shutil.rmtree(scratch)
        else:
            final.parent.mkdir(parents=True, exist_ok=True)
            scratch.rename(final)
        return final
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


def copy_into_store(store: Path, name: str, source: Path) -> Path:
    """Copy the directory ``source`` into the store as a version of ``name``; returns its place."""
    return build_into_store(store, name, lambda target: shutil.copytree(source, target, dirs_exist_ok=True))


def owns(store: Path, path: Path) -> bool:
    """Whether ``path`` is a version directory inside the store (so the store may delete it)."""
    try:
        path.resolve().relative_to(store.resolve())
    except ValueError:
        return False
    return path.resolve() != store.resolve()


def to_trash(store: Path, path: Path) -> Path:
    """Move a version directory out of sight in one rename; ``empty_trash`` deletes it."""
    trash = Path(tempfile.mkdtemp(prefix=".trash-", dir=store)) / path.name
    path.rename(trash)
    return trash


def empty_trash(trash: Path) -> None:
    shutil.rmtree(trash.parent, ignore_errors=True)


def directory_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
