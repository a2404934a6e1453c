"""models.cleanup, models.validate and models.quantize on a real ledger and real model files."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from textnlp_jobs.db.migrate import upgrade
from textnlp_jobs.db.models import AuditLog, ModelVersion, utcnow
from textnlp_jobs.db.session import dispose_engines, session_factory
from textnlp_jobs.errors import ModelCorruptError, ModelValidationFailed
from textnlp_jobs.inference import registry
from textnlp_jobs.local_stack import REPO_ROOT
from textnlp_jobs.maintenance import models as tasks
from textnlp_jobs.maintenance.registry import TaskContext, load_tasks
from textnlp_jobs.maintenance.runner import run_maintenance
from textnlp_jobs.settings import Settings

from .test_model_registry import variant

Ledger = tuple[Settings, sessionmaker[Session]]


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    settings = Settings(home=tmp_path / "home", model_store=tmp_path / "store", model_cleanup_days=30,
                        quantize_min_speedup=0.0)  # tiny is too small to gain speed; the gate's other rules hold
    upgrade(settings.database_url_value())
    yield settings, session_factory(settings)
    dispose_engines()


@pytest.fixture
def tiny_copy(tiny_model: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_model, tmp_path / "my-model"))


def job(ledger: Ledger, dry_run: bool = False) -> TaskContext:
    """What the maintenance runner hands a task (these tasks do not use Celery)."""
    return TaskContext(settings=ledger[0], session_factory=ledger[1], celery=None,  # type: ignore[arg-type]
                       dry_run=dry_run, log=logging.getLogger("test"))


def test_the_model_tasks_are_declared_on_their_schedules_and_queues() -> None:
    tasks_by_name = load_tasks()
    assert tasks_by_name["models.cleanup"].schedule == "0 3 * * *"
    assert tasks_by_name["models.validate"].schedule == "0 4 * * *"
    quantize = tasks_by_name["models.quantize"]
    assert quantize.schedule == "0 2 * * 0" and quantize.heavy


def test_cleanup_removes_exactly_the_unused_versions_that_nothing_keeps(ledger: Ledger, tiny_copy: Path) -> None:
    settings, factory = ledger
    kinds = ["used", "unused", "pinned", "promoted", "loaded"]
    done = {kind: registry.register_directory(settings, factory, variant(tiny_copy, kind), "mine") for kind in kinds}
    long_ago = utcnow() - timedelta(days=45)
    with factory.begin() as session:
        for kind in kinds:
            version = registry.get_version(session, "mine", done[kind].version)[1]
            version.created_at = long_ago
            version.last_used_at = utcnow() - timedelta(days=1) if kind == "used" else long_ago
        registry.set_pinned(session, "mine", done["pinned"].version, True)
        registry.promote(session, "mine", done["promoted"].version, "production")
        loaded_id = registry.get_version(session, "mine", done["loaded"].version)[1].id
        registry.record_loads(session, "othernode/cuda.0", [loaded_id])

    preview = run_maintenance("models.cleanup", settings=settings, dry_run=True)  # as beat and the CLI run it
    assert preview["status"] == "succeeded" and preview["dry_run"]
    assert [c["version"] for c in preview["would_remove"]] == [done["unused"].version]
    assert done["unused"].path.exists()

    report = tasks.cleanup(job(ledger))
    assert [r["version"] for r in report["removed"]] == [done["unused"].version]
    assert report["freed_bytes"] == sum(p.stat().st_size for p in (tiny_copy.parent / "my-model-unused").iterdir())
    assert not done["unused"].path.exists()
    assert all(done[kind].path.exists() for kind in kinds if kind != "unused")
    with factory() as session:
        left = set(session.execute(select(ModelVersion.version)).scalars())
        assert left == {done[kind].version for kind in kinds if kind != "unused"}
        assert session.execute(select(AuditLog).where(AuditLog.action == "model.cleanup")).scalar_one()


def flip_one_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01
    file.write_bytes(bytes(data))


def test_validation_catches_one_flipped_byte_and_the_version_is_then_refused(ledger: Ledger, tiny_copy: Path) -> None:
    settings, factory = ledger
    done = registry.register_directory(settings, factory, tiny_copy, "mine")
    with factory.begin() as session:
        registry.promote(session, "mine", done.version, "production")
    first = tasks.validate(job(ledger))
    (figures,) = first["generations"]
    assert first["corrupt"] == [] and figures["tokens"] >= 1 and figures["load_seconds"] > 0
    assert figures["tokens_per_second"] > 0 and len(figures["output_sha256"]) == 64
    assert tasks.validate(job(ledger))["output_changed"] == []  # same files, same greedy output

    flip_one_byte(done.path / "model.safetensors")
    with pytest.raises(ModelValidationFailed, match=r"changed: model\.safetensors"):
        tasks.validate(job(ledger))
    with factory() as session:
        version = session.execute(select(ModelVersion)).scalar_one()
        assert version.corrupt and "model.safetensors" in (version.corrupt_reason or "")
        with pytest.raises(ModelCorruptError, match="corrupt and is not served"):
            registry.resolve(session, "mine", "production")


def zero_scales(directory: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(directory / "quantized.safetensors"))
    save_file({k: v * 0 if k.endswith(".scales") else v for k, v in tensors.items()},
              str(directory / "quantized.safetensors"))


def test_quantize_registers_a_gated_int8_variant_that_loads_in_a_fresh_process(ledger: Ledger, tiny_copy: Path) -> None:
    settings, factory = ledger
    source = registry.register_directory(settings, factory, tiny_copy, "mine")
    assert tasks.quantize(job(ledger))["built"] == []  # not eligible yet
    with factory.begin() as session:
        registry.set_quantize_eligible(session, "mine", True)
    assert [p["version"] for p in tasks.quantize(job(ledger, dry_run=True))["would_build"]] == [source.version]

    report = tasks.quantize(job(ledger), batches=(1, 8), repeats=1)
    (built,) = report["built"]
    assert built["passed"] and built["size_ratio"] < 1 and abs(built["perplexity_delta"]) <= 0.05
    with factory() as session:
        resolved = registry.resolve(session, "mine@int8")
        row = session.get(ModelVersion, resolved.version_id)
        assert row is not None and row.quantization == "int8-dynamic" and row.dtype == "int8"
        assert row.source_version_id == registry.get_version(session, "mine", source.version)[1].id
    assert tasks.quantize(job(ledger))["skipped"][0]["reason"].endswith("already has a variant")

    program = ("import sys; from pathlib import Path; from textnlp_jobs.inference.engine import *; "
               "e = TransformersEngine('mine', 'v', Path(sys.argv[1])); "
               "r = e.generate([EngineRequest(e.tokenize('Return a new list'), 8, SamplingParams())]); "
               "print(r[0].tokens_generated)")
    fresh = subprocess.run([sys.executable, "-c", program, str(resolved.path)], cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=180)
    assert fresh.returncode == 0 and int(fresh.stdout.split()[-1]) >= 1, fresh.stderr[-2000:]


def test_a_variant_with_zeroed_scales_is_rejected_by_the_gate_with_its_figures(ledger: Ledger,
                                                                               tiny_copy: Path) -> None:
    settings, factory = ledger
    source = registry.register_directory(settings, factory, tiny_copy, "mine")
    with factory.begin() as session:
        registry.set_quantize_eligible(session, "mine", True)
    report = tasks.quantize(job(ledger), batches=(1,), repeats=1, damage=zero_scales)
    assert report["built"] == []
    (rejected,) = report["rejected"]
    assert not rejected["passed"] and any("perplexity" in reason for reason in rejected["reasons"])
    assert rejected["source"]["perplexity"] > 0 and rejected["variant"]["size_bytes"] > 0
    with factory() as session:
        assert [v.version for v in session.execute(select(ModelVersion)).scalars()] == [source.version]
        audit = session.execute(select(AuditLog).where(AuditLog.action == "model.quantize_rejected")).scalar_one()
        assert audit.details["reasons"] == rejected["reasons"]
    assert not any(p.name.startswith(".quantize-") for p in settings.model_store_dir().iterdir())

