"""The model store on disk and the registry of versions in the ledger.

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

from sqlalchemy import select
from sqlalchemy.orm import Session

from textnlp_jobs.db.models import Model, ModelVersion, utcnow
from textnlp_jobs.errors import ModelStoreError


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    version: str
    path: Path


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
    """Record the model directory at ``path`` as a version of ``name`` (idempotent)."""
    if not path.is_dir():
        raise ModelStoreError(f"model directory {path} does not exist")
    manifest = file_manifest(path)
    digest = manifest_digest(manifest)
    model = session.execute(select(Model).where(Model.name == name)).scalar_one_or_none()
    if model is None:
        model = Model(name=name, description=description, created_at=utcnow())
        session.add(model)
        session.flush()
    version_id = digest[:12]
    version = session.execute(
        select(ModelVersion).where(ModelVersion.model_id == model.id, ModelVersion.version == version_id)
    ).scalar_one_or_none()
    if version is None:
        version = ModelVersion(
            model_id=model.id, version=version_id, path=str(path), manifest=manifest, manifest_sha256=digest,
            size_bytes=sum((path / f).stat().st_size for f in manifest), quantization=quantization,
            environments={}, keep_always=False, created_at=utcnow(),
        )
        session.add(version)
        session.flush()
    return version


def known_models(session: Session) -> list[str]:
    return list(session.execute(select(Model.name).order_by(Model.name)).scalars())


def resolve(session: Session, name: str, environment: str = "production") -> ResolvedModel:
    """The version of ``name`` to serve: the newest promoted to ``environment``, else the newest."""
    rows = session.execute(
        select(ModelVersion).join(Model, Model.id == ModelVersion.model_id)
        .where(Model.name == name).order_by(ModelVersion.created_at.desc(), ModelVersion.id.desc())
    ).scalars().all()
    if not rows:
        raise ModelStoreError(f"model {name!r} is not registered (run `textnlp-jobs models bootstrap`)")
    promoted = [v for v in rows if environment in (v.environments or {})]
    chosen = promoted[0] if promoted else rows[0]
    return ResolvedModel(name, chosen.version, Path(chosen.path))


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
