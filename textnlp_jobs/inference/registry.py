"""The registry of model versions in the ledger: what is registered, promoted where, pinned, loaded,
used, corrupt. The files themselves live in the store (``store.py``).

A version is promoted per environment (``production``, ``staging``…); every promotion and rollback
appends a ``model_promotions`` row, so a rollback goes back to the version promoted before the
current one. Every change writes an ``audit_logs`` row (who, when, from, to). Workers serve the
version promoted in their environment (``TEXTNLP_ENVIRONMENT``), or the newest one when none is.
A model reference ``name@int8`` asks for the int8 variant built from that version.
"""

from __future__ import annotations

import getpass
import logging
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session, sessionmaker

from textnlp_jobs.db.models import AuditLog, Model, ModelLoad, ModelPromotion, ModelVersion, utcnow
from textnlp_jobs.errors import (
    ModelCorruptError,
    ModelInUseError,
    ModelNotFoundError,
    ModelRegistrationError,
    ModelStoreError,
    NoPreviousVersionError,
)
from textnlp_jobs.inference import store
from textnlp_jobs.inference.loading import ModelInfo
from textnlp_jobs.inference.store import ResolvedModel
from textnlp_jobs.settings import Settings

log = logging.getLogger(__name__)

INT8 = "int8-dynamic"
# What a model reference may say after '@' to ask for a quantized variant.
QUANTIZATION_ALIASES = {"int8": INT8, INT8: INT8}


def actor_name() -> str:
    """Who is changing the registry: the OS user and host of this process."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def parse_reference(reference: str) -> tuple[str, str | None]:
    """``small@int8`` -> ("small", "int8"); ``small`` -> ("small", None)."""
    name, _, selector = reference.partition("@")
    return name, selector or None


def _audit(session: Session, actor: str, action: str, name: str, version: str | None, **details: Any) -> None:
    entity = f"{name}@{version}" if version else name
    session.add(AuditLog(at=utcnow(), actor=actor, action=action, entity_type="model_version",
                         entity_id=entity[:64], details={"model": name, "version": version, **details}))


# --- lookups ---------------------------------------------------------------------------------
def known_models(session: Session) -> list[str]:
    return list(session.execute(select(Model.name).order_by(Model.name)).scalars())


def get_model(session: Session, name: str) -> Model:
    model = session.execute(select(Model).where(Model.name == name)).scalar_one_or_none()
    if model is None:
        known = ", ".join(known_models(session)) or "none"
        raise ModelNotFoundError(f"model {name!r} is not registered (known: {known})")
    return model


def versions_of(session: Session, model: Model) -> list[ModelVersion]:
    """Newest first."""
    return list(session.execute(
        select(ModelVersion).where(ModelVersion.model_id == model.id)
        .order_by(ModelVersion.created_at.desc(), ModelVersion.id.desc())
    ).scalars())


def get_version(session: Session, name: str, version: str) -> tuple[Model, ModelVersion]:
    """The version of ``name`` whose id is ``version`` or starts with it (a unique prefix)."""
    model = get_model(session, name)
    candidates = versions_of(session, model)
    exact = [v for v in candidates if v.version == version]
    matches = exact or [v for v in candidates if v.version.startswith(version)]
    if len(matches) != 1:
        listing = ", ".join(v.version for v in candidates) or "none"
        what = "is ambiguous" if matches else "does not exist"
        raise ModelNotFoundError(f"version {version!r} of model {name!r} {what} (versions: {listing})")
    return model, matches[0]


def promoted_version(versions: Iterable[ModelVersion], environment: str) -> ModelVersion | None:
    for version in versions:
        if environment in (version.environments or {}):
            return version
    return None


def resolve(session: Session, reference: str, environment: str = "production") -> ResolvedModel:
    """The version to serve for ``reference`` in ``environment``: the one promoted there, else the
    newest full-precision one; ``name@int8`` its int8 variant, ``name@<version>`` that version.
    A corrupt version is refused (``ModelCorruptError``), never served."""
    name, selector = parse_reference(reference)
    model = session.execute(select(Model).where(Model.name == name)).scalar_one_or_none()
    rows = versions_of(session, model) if model is not None else []
    if not rows:
        raise ModelStoreError(f"model {name!r} is not registered (run `textnlp-jobs models bootstrap` "
                              "or `textnlp-jobs models register`)")
    base = promoted_version(rows, environment) or next((v for v in rows if v.quantization is None), rows[0])
    chosen = base
    if selector in QUANTIZATION_ALIASES:
        method = QUANTIZATION_ALIASES[selector]
        variants = [v for v in rows if v.quantization == method and v.source_version_id == base.id]
        if not variants:
            raise ModelStoreError(f"model {name!r} version {base.version} has no {method} variant "
                                  "(models.quantize builds one for models marked eligible)")
        chosen = variants[0]
    elif selector is not None:
        chosen = get_version(session, name, selector)[1]
    if chosen.corrupt:
        raise ModelCorruptError(f"model {name!r} version {chosen.version} is corrupt and is not served: "
                                f"{chosen.corrupt_reason or 'files changed'}")
    chat = (chosen.special_tokens or {}).get("chat_template")
    return ResolvedModel(name, chosen.version, Path(chosen.path), chosen.quantization, chosen.id,
                         None if chat is None else bool(chat))


# --- registering -----------------------------------------------------------------------------
def record_version(session: Session, name: str, path: Path, *, info: ModelInfo | None = None,
                   description: str | None = None, quantization: str | None = None,
                   source_version_id: int | None = None, in_place: bool = False,
                   manifest: dict[str, str] | None = None, actor: str | None = None) -> ModelVersion:
    """Record the directory at ``path`` as a version of ``name``. The same files are the same
    version: registering them again returns the existing row."""
    if not path.is_dir():
        raise ModelStoreError(f"model directory {path} does not exist")
    manifest = manifest if manifest is not None else store.file_manifest(path)
    digest = store.manifest_digest(manifest)
    model = session.execute(select(Model).where(Model.name == name)).scalar_one_or_none()
    if model is None:
        model = Model(name=name, description=description, created_at=utcnow(), quantize_eligible=False)
        session.add(model)
        session.flush()
    version_id = digest[:12]
    version = session.execute(
        select(ModelVersion).where(ModelVersion.model_id == model.id, ModelVersion.version == version_id)
    ).scalar_one_or_none()
    if version is not None:
        return version
    version = ModelVersion(
        model_id=model.id, version=version_id, path=str(path), manifest=manifest, manifest_sha256=digest,
        size_bytes=sum((path / f).stat().st_size for f in manifest), environments={}, keep_always=False,
        created_at=utcnow(), description=description, in_place=in_place, source_version_id=source_version_id,
        quantization=quantization if info is None else info.quantization, corrupt=False, validation={},
        special_tokens={} if info is None else info.special_tokens,
    )
    if info is not None:
        version.architecture, version.dtype = info.architecture, info.dtype
        version.parameter_count, version.max_positions = info.parameter_count, info.max_positions
    session.add(version)
    session.flush()
    _audit(session, actor or actor_name(), "model.register", name, version_id, path=str(path),
           **{"from": None, "to": version_id})
    return version


@dataclass(frozen=True)
class Registered:
    name: str
    version: str
    path: Path
    created: bool
    static_only_reason: str | None = None  # why it cannot join continuous batches, if it cannot
    # What its generation_config.json sets that jobs do not follow (``loading.generation_defaults``).
    ignored_generation_defaults: dict[str, Any] = field(default_factory=dict)


def register_directory(settings: Settings, factory: sessionmaker[Session], path: Path, name: str, *,
                       description: str | None = None, in_place: bool = False,
                       source_version_id: int | None = None, actor: str | None = None) -> Registered:
    """Check that ``path`` loads, copy it into the store (or reference it where it is), record it.
    A directory that does not load raises ``ModelRegistrationError`` and registers nothing."""
    from textnlp_jobs.inference.loading import inspect_directory

    if not name or "@" in name or "/" in name or len(name) > 128:
        raise ModelRegistrationError(f"model name {name!r} must be 1-128 characters without '@' or '/'")
    path = path.expanduser().resolve()
    info = inspect_directory(path)
    manifest = store.file_manifest(path)
    store_dir = settings.model_store_dir()
    target, copied = path, False
    if not in_place and not store.owns(store_dir, path):
        target = store_dir / name / store.manifest_digest(manifest)[:12]
        copied = not target.exists()
        target = store.copy_into_store(store_dir, name, path)
        if store.file_manifest(target) != manifest:
            raise ModelRegistrationError(f"{path} changed while it was being copied; try again")
    try:
        with factory.begin() as session:
            model = session.execute(select(Model).where(Model.name == name)).scalar_one_or_none()
            existed = model is not None and session.execute(
                select(ModelVersion.id).where(ModelVersion.model_id == model.id,
                                              ModelVersion.version == store.manifest_digest(manifest)[:12])
            ).first() is not None
            version = record_version(session, name, target, info=info, description=description, manifest=manifest,
                                     in_place=not store.owns(store_dir, target), source_version_id=source_version_id,
                                     actor=actor)
            return Registered(name, version.version, Path(version.path), not existed, info.static_only_reason,
                              info.ignored_generation_defaults)
    except BaseException:
        if copied:
            store.empty_trash(store.to_trash(store_dir, target))
        raise


# --- promotions ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Switch:
    name: str
    environment: str
    previous: str | None
    current: str
    changed: bool


def _switch(session: Session, model: Model, target: ModelVersion, environment: str, action: str, actor: str,
            versions: Sequence[ModelVersion]) -> Switch:
    if target.corrupt:
        raise ModelCorruptError(f"model {model.name!r} version {target.version} is corrupt and cannot be {action}d")
    current = promoted_version(versions, environment)
    if current is not None and current.id == target.id:
        return Switch(model.name, environment, current.version, target.version, False)
    if current is not None:
        current.environments = {k: v for k, v in (current.environments or {}).items() if k != environment}
    target.environments = {**(target.environments or {}), environment: utcnow().isoformat()}
    previous = current.version if current is not None else None
    session.add(ModelPromotion(model_id=model.id, environment=environment, action=action, version=target.version,
                               previous_version=previous, actor=actor, at=utcnow()))
    _audit(session, actor, f"model.{action}", model.name, target.version, environment=environment,
           **{"from": previous, "to": target.version})
    session.flush()
    return Switch(model.name, environment, previous, target.version, True)


def promote(session: Session, name: str, version: str, environment: str, actor: str | None = None) -> Switch:
    """Serve ``version`` of ``name`` in ``environment`` from now on."""
    model, target = get_version(session, name, version)
    return _switch(session, model, target, environment, "promote", actor or actor_name(), versions_of(session, model))


def promotion_stack(session: Session, model: Model, environment: str) -> list[str]:
    """The versions promoted in ``environment``, oldest first, with rolled-back ones popped."""
    stack: list[str] = []
    rows = session.execute(select(ModelPromotion).where(
        ModelPromotion.model_id == model.id, ModelPromotion.environment == environment).order_by(ModelPromotion.id)
    ).scalars()
    for row in rows:
        if row.action == "rollback":
            if stack:
                stack.pop()
        elif not stack or stack[-1] != row.version:
            stack.append(row.version)
    return stack


def rollback(session: Session, name: str, environment: str, actor: str | None = None) -> Switch:
    """Serve again the version that was promoted in ``environment`` before the current one."""
    model = get_model(session, name)
    stack = promotion_stack(session, model, environment)
    if len(stack) < 2:
        raise NoPreviousVersionError(f"model {name!r} has no earlier promotion in {environment!r} to roll back to")
    versions = versions_of(session, model)
    target = next((v for v in versions if v.version == stack[-2]), None)
    if target is None:
        raise ModelNotFoundError(f"version {stack[-2]} of model {name!r}, promoted before, has been removed")
    return _switch(session, model, target, environment, "rollback", actor or actor_name(), versions)


def set_pinned(session: Session, name: str, version: str, pinned: bool, actor: str | None = None) -> bool:
    """Pin (``keep_always``) or unpin a version; returns whether anything changed."""
    _, target = get_version(session, name, version)
    if target.keep_always == pinned:
        return False
    target.keep_always = pinned
    _audit(session, actor or actor_name(), "model.pin" if pinned else "model.unpin", name, target.version,
           **{"from": not pinned, "to": pinned})
    return True


def set_quantize_eligible(session: Session, name: str, eligible: bool, actor: str | None = None) -> None:
    model = get_model(session, name)
    if model.quantize_eligible != eligible:
        _audit(session, actor or actor_name(), "model.quantize_eligible", name, None,
               **{"from": model.quantize_eligible, "to": eligible})
        model.quantize_eligible = eligible


# --- workers: what is loaded and used ----------------------------------------------------------
def record_loads(session: Session, worker: str, version_ids: Iterable[int]) -> None:
    """This worker has these versions loaded now (replaces what it said before)."""
    now = utcnow()
    session.execute(delete(ModelLoad).where(ModelLoad.worker == worker))
    for version_id in sorted(set(version_ids)):
        session.add(ModelLoad(worker=worker, model_version_id=version_id, seen_at=now))


def forget_loads(session: Session, worker: str) -> None:
    session.execute(delete(ModelLoad).where(ModelLoad.worker == worker))


def live_loads(session: Session, settings: Settings, now: datetime | None = None) -> dict[int, list[str]]:
    """Version id -> workers that reported it loaded within three heartbeats."""
    since = (now or utcnow()) - timedelta(seconds=3 * settings.model_heartbeat_seconds)
    loads: dict[int, list[str]] = {}
    for worker, version_id in session.execute(
            select(ModelLoad.worker, ModelLoad.model_version_id).where(ModelLoad.seen_at >= since)):
        loads.setdefault(version_id, []).append(worker)
    return loads


def touch_last_used(session: Session, version_ids: Iterable[int], at: datetime | None = None) -> None:
    ids = sorted(set(version_ids))
    if ids:
        session.execute(update(ModelVersion).where(ModelVersion.id.in_(ids)).values(last_used_at=at or utcnow()))


# --- removing --------------------------------------------------------------------------------
def why_kept(version: ModelVersion, loads: dict[int, list[str]]) -> str | None:
    """Why ``version`` may not be removed now, or None."""
    if version.environments:
        return f"promoted in {', '.join(sorted(version.environments))}"
    if version.keep_always:
        return "pinned (keep_always); unpin it first"
    if version.id in loads:
        return f"loaded on {', '.join(sorted(loads[version.id]))}"
    return None


def delete_version(settings: Settings, factory: sessionmaker[Session], version_id: int, *, actor: str,
                   action: str = "model.remove") -> int:
    """Delete a version's row and, when the store owns them, its files, together. Returns the bytes
    freed. Re-checks under a row lock that the version is still removable."""
    store_dir = settings.model_store_dir()
    trash: Path | None = None
    moved_from: Path | None = None
    try:
        with factory.begin() as session:
            version = session.execute(select(ModelVersion).where(ModelVersion.id == version_id)
                                      .with_for_update()).scalar_one_or_none()
            if version is None:
                return 0
            model = session.get(Model, version.model_id)
            name = model.name if model is not None else "?"
            reason = why_kept(version, live_loads(session, settings))
            if reason is not None:
                raise ModelInUseError(f"model {name!r} version {version.version} is {reason}")
            path = Path(version.path)
            owned = not version.in_place and store.owns(store_dir, path) and path.is_dir()
            freed = version.size_bytes if owned else 0
            if owned:
                moved_from, trash = path, store.to_trash(store_dir, path)
            _audit(session, actor, action, name, version.version, path=str(path), freed_bytes=freed,
                   **{"from": version.version, "to": None})
            session.delete(version)
            session.flush()
            if model is not None and not versions_of(session, model):
                session.delete(model)
        moved_from = None
        return freed
    finally:
        if trash is not None:
            if moved_from is not None:  # the transaction failed: put the files back
                trash.rename(moved_from)
            store.empty_trash(trash)


def remove(settings: Settings, factory: sessionmaker[Session], name: str, version: str,
           actor: str | None = None) -> int:
    """Remove one version by hand; refused while promoted, pinned or loaded."""
    with factory() as session:
        _, target = get_version(session, name, version)
    return delete_version(settings, factory, target.id, actor=actor or actor_name())


def describe(model: Model, version: ModelVersion, loads: dict[int, list[str]]) -> dict[str, Any]:
    """A version as JSON-able facts, for `models show` and reports."""
    return {
        "model": model.name, "version": version.version, "path": version.path, "size_bytes": version.size_bytes,
        "architecture": version.architecture, "dtype": version.dtype, "parameter_count": version.parameter_count,
        "max_positions": version.max_positions, "quantization": version.quantization,
        "source_version_id": version.source_version_id, "environments": sorted(version.environments or {}),
        "keep_always": version.keep_always, "corrupt": version.corrupt, "corrupt_reason": version.corrupt_reason,
        "in_place": version.in_place, "loaded_on": sorted(loads.get(version.id, [])),
        "last_used_at": version.last_used_at.isoformat() if version.last_used_at else None,
        "created_at": version.created_at.isoformat(), "special_tokens": version.special_tokens,
        "validation": version.validation, "manifest_sha256": version.manifest_sha256,
    }
