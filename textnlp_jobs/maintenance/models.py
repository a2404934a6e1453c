"""Model maintenance: ``models.cleanup`` (daily 03:00), ``models.validate`` (daily 04:00),
``models.quantize`` (Sundays 02:00, heavy queue). Each honours ``ctx.dry_run``; none uses Celery."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select

from textnlp_jobs.db.models import AuditLog, Model, ModelVersion, utcnow
from textnlp_jobs.errors import ModelInUseError, ModelValidationFailed, TextNLPError
from textnlp_jobs.inference import registry, store
from textnlp_jobs.maintenance.registry import TaskContext, maintenance_task

ACTOR = "maintenance"
VALIDATION_PROMPT = "Return the number of items that are waiting in the queue."
VALIDATION_NEW_TOKENS = 16


# --- models.cleanup ----------------------------------------------------------------------------
@maintenance_task("models.cleanup", schedule="0 3 * * *", time_limit_s=3600)
def cleanup(job: TaskContext) -> dict[str, Any]:
    """Remove model versions unused for longer than TEXTNLP_MODEL_CLEANUP_DAYS that are neither
    pinned, nor promoted anywhere, nor loaded on a live worker; files and rows go together."""
    settings, factory = job.settings, job.session_factory
    cutoff = utcnow() - timedelta(days=settings.model_cleanup_days)
    candidates: list[dict[str, Any]] = []
    kept = 0
    with factory() as session:
        loads = registry.live_loads(session, settings)
        rows = session.execute(select(Model.name, ModelVersion).join(Model, Model.id == ModelVersion.model_id)
                               .order_by(Model.name, ModelVersion.id)).all()
        for name, version in rows:
            if registry.why_kept(version, loads) is not None:
                kept += 1
                continue
            if (version.last_used_at or version.created_at) >= cutoff:
                kept += 1
                continue
            candidates.append({"id": version.id, "model": name, "version": version.version,
                               "size_bytes": version.size_bytes if not version.in_place else 0,
                               "last_used_at": (version.last_used_at or version.created_at).isoformat()})
    if job.dry_run:
        return {"would_remove": candidates, "would_free_bytes": sum(c["size_bytes"] for c in candidates),
                "kept": kept}
    removed, freed = [], 0
    for candidate in candidates:
        try:
            freed += registry.delete_version(settings, factory, candidate["id"], actor=ACTOR, action="model.cleanup")
        except ModelInUseError as error:  # promoted, pinned or loaded since the scan
            job.log.info("model_cleanup_skipped model=%s version=%s reason=%s", candidate["model"],
                         candidate["version"], error.message)
            kept += 1
            continue
        removed.append({k: candidate[k] for k in ("model", "version", "size_bytes")})
        job.log.info("model_removed model=%s version=%s bytes=%d", candidate["model"], candidate["version"],
                     candidate["size_bytes"])
    return {"removed": removed, "freed_bytes": freed, "kept": kept}


# --- models.validate ---------------------------------------------------------------------------
def _differences(stored: dict[str, str], path: Path) -> list[str]:
    if not path.is_dir():
        return [f"missing directory {path}"]
    actual = store.file_manifest(path)
    changed = sorted(f for f in stored if f in actual and actual[f] != stored[f])
    missing = sorted(f for f in stored if f not in actual)
    return [f"changed: {f}" for f in changed] + [f"missing: {f}" for f in missing]


def _generation_check(name: str, version: ModelVersion) -> dict[str, Any]:
    """Load the version on this CPU and run a short fixed greedy generation."""
    from textnlp_jobs.inference.engine import EngineRequest, SamplingParams, TransformersEngine

    started = time.perf_counter()
    engine = TransformersEngine(name, version.version, Path(version.path), "cpu")
    load_seconds = time.perf_counter() - started
    request = EngineRequest(engine.tokenize(VALIDATION_PROMPT), VALIDATION_NEW_TOKENS, SamplingParams())
    started = time.perf_counter()
    (result,) = engine.generate([request])
    seconds = time.perf_counter() - started
    return {"load_seconds": round(load_seconds, 3), "tokens": result.tokens_generated,
            "tokens_per_second": round(result.tokens_generated / seconds, 2) if seconds > 0 else None,
            "output_sha256": hashlib.sha256(",".join(map(str, result.token_ids)).encode()).hexdigest()}


@maintenance_task("models.validate", schedule="0 4 * * *", time_limit_s=2 * 3600)
def validate(job: TaskContext) -> dict[str, Any]:
    """Recompute every stored version's checksums (a changed or missing file marks it corrupt and
    fails the run), then load each promoted version on the CPU, run a short fixed generation and
    record load time, tokens/s and the output's hash."""
    factory = job.session_factory
    corrupt, checked, generations = [], 0, []
    with factory() as session:
        rows = session.execute(select(Model.name, ModelVersion).join(Model, Model.id == ModelVersion.model_id)
                               .order_by(Model.name, ModelVersion.id)).all()
    for name, version in rows:
        checked += 1
        problems = _differences(version.manifest, Path(version.path))
        if problems:
            corrupt.append({"model": name, "version": version.version, "problems": problems})
            if not job.dry_run and not version.corrupt:
                with factory.begin() as session:
                    row = session.get(ModelVersion, version.id)
                    if row is not None:
                        row.corrupt, row.corrupt_reason = True, "; ".join(problems)[:2000]
                        session.add(AuditLog(at=utcnow(), actor=ACTOR, action="model.corrupt",
                                             entity_type="model_version", entity_id=f"{name}@{version.version}"[:64],
                                             details={"model": name, "version": version.version,
                                                      "problems": problems, "from": False, "to": True}))
            job.log.warning("model_corrupt model=%s version=%s problems=%s", name, version.version, problems)
            continue
        if not version.environments:
            continue
        if job.dry_run:
            generations.append({"model": name, "version": version.version, "would_run": True})
            continue
        figures = _generation_check(name, version)
        previous = (version.validation or {}).get("output_sha256")
        figures["output_changed"] = previous is not None and previous != figures["output_sha256"]
        figures["at"] = utcnow().isoformat()
        with factory.begin() as session:
            row = session.get(ModelVersion, version.id)
            if row is not None:
                row.validation = figures
        if figures["output_changed"]:
            job.log.warning("model_output_changed model=%s version=%s", name, version.version)
        generations.append({"model": name, "version": version.version, **figures})
    report = {"checked": checked, "corrupt": corrupt, "generations": generations,
              "output_changed": [g["version"] for g in generations if g.get("output_changed")]}
    if corrupt and not job.dry_run:
        listing = ", ".join(f"{c['model']}@{c['version']} ({c['problems'][0]})" for c in corrupt)
        raise ModelValidationFailed(f"{len(corrupt)} corrupt model version(s): {listing}")
    return report


# --- models.quantize ---------------------------------------------------------------------------
@maintenance_task("models.quantize", schedule="0 2 * * 0", time_limit_s=4 * 3600, heavy=True)
def quantize(job: TaskContext, *, batches: tuple[int, ...] | None = None, repeats: int | None = None,
             damage: Any = None) -> dict[str, Any]:
    """Build an int8 variant of the serving version of every eligible model that has none, on the
    CPU; register it only if it passes the gate against its source (perplexity, speed, size),
    else record it as rejected with its figures. Never touches a model this node is serving.
    ``damage`` (tests) is called on the variant directory before the gate."""
    from textnlp_jobs.inference import evaluation
    from textnlp_jobs.inference import quantize as q
    from textnlp_jobs.inference.loading import load_model

    settings, factory = job.settings, job.session_factory
    built, rejected, skipped = [], [], []
    with factory() as session:
        loads = registry.live_loads(session, settings)
        plans = []
        for model in session.execute(select(Model).where(Model.quantize_eligible.is_(True))
                                     .order_by(Model.name)).scalars():
            try:
                base = registry.resolve(session, model.name, settings.environment)
            except TextNLPError as error:
                skipped.append({"model": model.name, "reason": error.message})
                continue
            versions = registry.versions_of(session, model)
            if base.quantization is not None:
                skipped.append({"model": model.name, "reason": f"serving version {base.version} is quantized"})
            elif any(v.source_version_id == base.version_id and v.quantization == q.METHOD for v in versions):
                skipped.append({"model": model.name, "reason": f"version {base.version} already has a variant"})
            elif any(w.startswith(f"{settings.node_name}/") for w in loads.get(base.version_id or -1, [])):
                skipped.append({"model": model.name, "reason": f"version {base.version} is served on this node"})
            else:
                plans.append(base)
    if job.dry_run:
        return {"would_build": [{"model": b.name, "version": b.version} for b in plans], "skipped": skipped}
    store_dir = settings.model_store_dir()
    for base in plans:
        store_dir.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".quantize-{base.name}-", dir=store_dir))
        try:
            model, record = q.quantize_model(load_model(base.path))
            record["source_version"] = base.version
            variant = q.save_quantized(model, record, base.path, scratch / "variant")
            del model
            if damage is not None:
                damage(variant)
            report = evaluation.evaluate(
                base.path, variant, max_perplexity_increase=settings.quantize_max_perplexity_increase,
                min_speedup=settings.quantize_min_speedup, batches=batches or evaluation.GATE_BATCHES,
                repeats=repeats or evaluation.GATE_REPEATS).as_dict()
            if not report["passed"]:
                with factory.begin() as session:
                    session.add(AuditLog(at=utcnow(), actor=ACTOR, action="model.quantize_rejected",
                                         entity_type="model_version", entity_id=f"{base.name}@{base.version}"[:64],
                                         details={"model": base.name, "version": base.version, **report}))
                rejected.append({"model": base.name, "source_version": base.version, **report})
                job.log.warning("model_quantize_rejected model=%s version=%s reasons=%s", base.name, base.version,
                                report["reasons"])
                continue
            final = store_dir / base.name / store.manifest_digest(store.file_manifest(variant))[:12]
            if not final.exists():
                final.parent.mkdir(parents=True, exist_ok=True)
                variant.rename(final)
            done = registry.register_directory(settings, factory, final, base.name,
                                               description=f"int8 dynamic variant of {base.version}",
                                               source_version_id=base.version_id, actor=ACTOR)
            built.append({"model": base.name, "source_version": base.version, "version": done.version, **report})
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return {"built": built, "rejected": rejected, "skipped": skipped}
