"""The model registry: registering directories users bring, promotions per environment with
rollback, pins, removal rules, and the audit trail every change leaves."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from textnlp_jobs.db.migrate import upgrade
from textnlp_jobs.db.models import AuditLog, Model, ModelVersion
from textnlp_jobs.db.session import dispose_engines, session_factory
from textnlp_jobs.errors import (
    ModelCorruptError,
    ModelInUseError,
    ModelRegistrationError,
    NoPreviousVersionError,
)
from textnlp_jobs.inference import registry
from textnlp_jobs.local_stack import REPO_ROOT
from textnlp_jobs.settings import Settings


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[tuple[Settings, sessionmaker[Session]]]:
    settings = Settings(home=tmp_path / "home", model_store=tmp_path / "store")
    upgrade(settings.database_url_value())
    yield settings, session_factory(settings)
    dispose_engines()


@pytest.fixture
def tiny_copy(tiny_model: Path, tmp_path: Path) -> Path:
    """A user's own model directory: a copy of the tiny GPT-2."""
    return Path(shutil.copytree(tiny_model, tmp_path / "my-model"))


def variant(directory: Path, tag: str) -> Path:
    """Same weights, one more file: another version of the model."""
    copy = Path(shutil.copytree(directory, directory.parent / f"{directory.name}-{tag}"))
    (copy / "README.md").write_text(f"variant {tag}\n")
    return copy


def test_registering_copies_the_directory_into_the_store_and_records_what_it_is(
        ledger: tuple[Settings, sessionmaker[Session]], tiny_copy: Path) -> None:
    settings, factory = ledger
    done = registry.register_directory(settings, factory, tiny_copy, "mine", description="my tiny model")
    assert done.created and done.path.parent == settings.model_store_dir() / "mine"
    assert sorted(p.name for p in done.path.iterdir()) == sorted(p.name for p in tiny_copy.iterdir())
    with factory() as session:
        version = session.execute(select(ModelVersion)).scalar_one()
        assert version.version == done.version and not version.in_place
        assert version.architecture == "GPT2LMHeadModel" and version.dtype == "float32"
        assert version.parameter_count and version.parameter_count > 10_000
        assert version.max_positions == 256
        assert version.special_tokens["eos_token"] == "<|endoftext|>" and version.special_tokens["eos_token_id"] == 0
        assert set(version.manifest) >= {"config.json", "model.safetensors", "tokenizer.json"}
        assert version.size_bytes == sum(p.stat().st_size for p in tiny_copy.iterdir())
        audit = session.execute(select(AuditLog)).scalar_one()
        assert audit.action == "model.register" and audit.details["to"] == done.version and audit.actor
    again = registry.register_directory(settings, factory, tiny_copy, "mine")
    assert not again.created and again.version == done.version


def test_in_place_registration_references_the_directory_where_it_is(
        ledger: tuple[Settings, sessionmaker[Session]], tiny_copy: Path) -> None:
    settings, factory = ledger
    done = registry.register_directory(settings, factory, tiny_copy, "mine", in_place=True)
    assert done.path == tiny_copy.resolve()
    assert not (settings.model_store_dir() / "mine").exists()
    with factory() as session:
        assert session.execute(select(ModelVersion.in_place)).scalar_one() is True


def break_weights(directory: Path) -> None:
    (directory / "model.safetensors").unlink()


def break_architecture(directory: Path) -> None:
    config = json.loads((directory / "config.json").read_text())
    config["model_type"], config["architectures"] = "frobnicator", ["FrobnicatorForCausalLM"]
    (directory / "config.json").write_text(json.dumps(config))


def break_tokenizer(directory: Path) -> None:
    """A tokenizer with 600 more tokens than the model has embedding rows for."""
    from textnlp_jobs.inference.loading import load_tokenizer

    tokenizer = load_tokenizer(directory)
    tokenizer.add_tokens([f"extra-token-{i}" for i in range(600)])
    tokenizer.save_pretrained(directory)


@pytest.mark.parametrize(("damage", "message"), [
    ("weights", "missing weights: model.safetensors"),
    ("architecture", "unsupported architecture: model_type 'frobnicator'"),
    ("tokenizer", "mismatched tokenizer: it has 1112 tokens but the model's embedding has 512 rows"),
])
def test_a_broken_directory_gets_a_clear_error_and_registers_nothing(
        ledger: tuple[Settings, sessionmaker[Session]], tiny_copy: Path, damage: str, message: str) -> None:
    settings, factory = ledger
    if damage == "weights":
        break_weights(tiny_copy)
    elif damage == "architecture":
        break_architecture(tiny_copy)
    else:
        break_tokenizer(tiny_copy)
    with pytest.raises(ModelRegistrationError, match=message) as raised:
        registry.register_directory(settings, factory, tiny_copy, "broken")
    assert raised.value.code == "models.invalid"
    with factory() as session:
        assert session.execute(select(Model)).first() is None
        assert session.execute(select(AuditLog)).first() is None
    assert not (settings.model_store_dir() / "broken").exists()


def test_promote_then_rollback_goes_back_to_the_previously_promoted_version(
        ledger: tuple[Settings, sessionmaker[Session]], tiny_copy: Path) -> None:
    settings, factory = ledger
    first = registry.register_directory(settings, factory, tiny_copy, "mine").version
    second = registry.register_directory(settings, factory, variant(tiny_copy, "b"), "mine").version
    third = registry.register_directory(settings, factory, variant(tiny_copy, "c"), "mine").version
    with factory.begin() as session:
        assert registry.resolve(session, "mine").version == third  # nothing promoted: the newest
        registry.promote(session, "mine", first, "production", actor="alice")
        registry.promote(session, "mine", second[:6], "production", actor="alice")  # a unique prefix will do
        registry.promote(session, "mine", third, "staging", actor="bob")
        assert registry.resolve(session, "mine", "production").version == second
    with factory.begin() as session:
        switch = registry.rollback(session, "mine", "production", actor="carol")
    assert (switch.previous, switch.current) == (second, first)
    with factory.begin() as session:
        assert registry.resolve(session, "mine", "production").version == first
        assert registry.resolve(session, "mine", "staging").version == third
        with pytest.raises(NoPreviousVersionError):
            registry.rollback(session, "mine", "production")
        rows = session.execute(select(AuditLog).where(AuditLog.action.in_(["model.promote", "model.rollback"]))
                               .order_by(AuditLog.id)).scalars().all()
    assert [(r.actor, r.action, r.details["from"], r.details["to"], r.details["environment"]) for r in rows] == [
        ("alice", "model.promote", None, first, "production"),
        ("alice", "model.promote", first, second, "production"),
        ("bob", "model.promote", None, third, "staging"),
        ("carol", "model.rollback", second, first, "production"),
    ]


def test_remove_is_refused_while_promoted_pinned_or_loaded_and_then_deletes_files_and_row(
        ledger: tuple[Settings, sessionmaker[Session]], tiny_copy: Path) -> None:
    settings, factory = ledger
    old = registry.register_directory(settings, factory, tiny_copy, "mine")
    new = registry.register_directory(settings, factory, variant(tiny_copy, "b"), "mine")
    with factory.begin() as session:
        registry.promote(session, "mine", old.version, "production")
    with pytest.raises(ModelInUseError, match="promoted in production"):
        registry.remove(settings, factory, "mine", old.version)
    with factory.begin() as session:
        registry.promote(session, "mine", new.version, "production")
        registry.set_pinned(session, "mine", old.version, True)
    with pytest.raises(ModelInUseError, match="pinned"):
        registry.remove(settings, factory, "mine", old.version)
    with factory.begin() as session:
        registry.set_pinned(session, "mine", old.version, False)
        old_id = registry.get_version(session, "mine", old.version)[1].id
        registry.record_loads(session, "host/cpu.0", [old_id])
    with pytest.raises(ModelInUseError, match=r"loaded on host/cpu\.0"):
        registry.remove(settings, factory, "mine", old.version)
    with factory.begin() as session:
        registry.forget_loads(session, "host/cpu.0")
    freed = registry.remove(settings, factory, "mine", old.version)
    assert freed > 0 and not old.path.exists() and new.path.exists()
    with factory() as session:
        assert [v.version for v in session.execute(select(ModelVersion)).scalars()] == [new.version]
        assert session.execute(select(AuditLog.action).where(AuditLog.action == "model.remove")).scalar_one()


def test_a_corrupt_version_is_never_resolved_for_serving(
        ledger: tuple[Settings, sessionmaker[Session]], tiny_copy: Path) -> None:
    settings, factory = ledger
    done = registry.register_directory(settings, factory, tiny_copy, "mine")
    with factory.begin() as session:
        version = registry.get_version(session, "mine", done.version)[1]
        version.corrupt, version.corrupt_reason = True, "changed: model.safetensors"
    with factory() as session, pytest.raises(ModelCorruptError, match=r"changed: model\.safetensors"):
        registry.resolve(session, "mine")


def cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEXTNLP_")}
    env.update({"TEXTNLP_HOME": str(home), "PYTHONPATH": str(REPO_ROOT)})
    return subprocess.run([sys.executable, "-m", "textnlp_jobs.cli", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=180)


@pytest.mark.slow
def test_the_models_commands_register_list_promote_show_and_refuse_a_broken_directory(
        tiny_copy: Path, tmp_path: Path) -> None:
    home = tmp_path / "cli-home"
    registered = cli(home, "models", "register", str(tiny_copy), "--name", "mine", "--description", "tiny")
    assert registered.returncode == 0, registered.stderr
    version = registered.stdout.strip()
    assert len(version) == 12 and "registered mine version" in registered.stderr
    promoted = cli(home, "models", "promote", "mine", version, "--env", "production")
    assert promoted.returncode == 0 and f"(none) -> {version}" in promoted.stderr
    listing = json.loads(cli(home, "models", "list", "--json").stdout)
    assert [(r["model"], r["version"], r["environments"]) for r in listing] == [("mine", version, ["production"])]
    shown = json.loads(cli(home, "models", "show", "mine", "--json").stdout)
    assert shown["versions"][0]["architecture"] == "GPT2LMHeadModel"
    assert [p["action"] for p in shown["promotions"]] == ["promote"]
    refused = cli(home, "models", "remove", "mine", version)
    assert refused.returncode == 2 and "error models.in_use" in refused.stderr
    break_weights(tiny_copy)
    broken = cli(home, "models", "register", str(tiny_copy), "--name", "broken")
    assert broken.returncode == 2 and "error models.invalid: missing weights: model.safetensors" in broken.stderr


class FakeEngine:
    def __init__(self, version: str) -> None:
        self.model_version = version
        self.warmed = False

    def warm_up(self) -> None:
        self.warmed = True


def test_the_watcher_switches_to_a_promotion_records_loads_and_use_and_gives_up_on_a_version_that_fails(
        ledger: tuple[Settings, sessionmaker[Session]], tiny_copy: Path) -> None:
    from textnlp_jobs.db.models import ModelLoad
    from textnlp_jobs.inference.versions import ModelWatcher

    settings, factory = ledger
    old = registry.register_directory(settings, factory, tiny_copy, "mine").version
    new = registry.register_directory(settings, factory, variant(tiny_copy, "b"), "mine").version
    with factory.begin() as session:
        registry.promote(session, "mine", old, "production")
        old_id = registry.get_version(session, "mine", old)[1].id
        new_id = registry.get_version(session, "mine", new)[1].id
    loads: list[str] = []

    def load(resolved: object) -> FakeEngine:
        version = resolved.version  # type: ignore[attr-defined]
        loads.append(version)
        if version == "broken":
            raise RuntimeError("does not load")
        return FakeEngine(version)

    engines: dict[str, object] = {"mine": FakeEngine(old)}
    watcher = ModelWatcher(settings, factory, engines, {"mine": "mine"}, worker="host/cpu.0", load=load,
                           run_on_loop=lambda call: call())
    watcher.loaded("mine", old_id)
    watcher.heartbeat()
    assert watcher.check() == []  # nothing changed
    watcher.used("mine")
    with factory.begin() as session:
        registry.promote(session, "mine", new, "production")
    assert watcher.check() == ["mine"]
    assert engines["mine"].model_version == new and engines["mine"].warmed  # type: ignore[attr-defined]
    watcher.heartbeat()
    with factory() as session:
        assert set(session.execute(select(ModelLoad.model_version_id)).scalars()) == {new_id}
        assert registry.get_version(session, "mine", old)[1].last_used_at is not None
        assert registry.get_version(session, "mine", new)[1].last_used_at is None
    with factory.begin() as session:
        registry.rollback(session, "mine", "production")
    watcher.load = lambda resolved: load(type("R", (), {"version": "broken"})())
    assert watcher.check() == [] and watcher.check() == []
    assert loads.count("broken") == 1  # a version that failed to load is not retried every poll
    assert engines["mine"].model_version == new  # type: ignore[attr-defined]
    watcher.stop()
    with factory() as session:
        assert session.execute(select(ModelLoad)).first() is None


def test_a_continuous_worker_refuses_a_promotion_it_cannot_decode_row_by_row_and_keeps_serving(
        ledger: tuple[Settings, sessionmaker[Session]], tiny_copy: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    from textnlp_jobs.devices import Device
    from textnlp_jobs.inference import engine_side
    from textnlp_jobs.inference.engine import StubEngine

    settings, factory = ledger
    old = registry.register_directory(settings, factory, tiny_copy, "mine").version
    new = registry.register_directory(settings, factory, variant(tiny_copy, "mamba"), "mine").version
    with factory.begin() as session:
        registry.promote(session, "mine", old, "production")
    side = engine_side.LocalEngineSide(settings, factory, {"mine": StubEngine("mine")}, name="host/cpu.0")
    assert side.mode == "continuous"

    class StateSpaceEngine(StubEngine):  # what a Mamba version loads as
        static_only_reason = "cache_layers_LinearAttentionLayer"

    loads: list[str] = []

    def load_engine(resolved: object, device: object, dtype: str) -> StubEngine:
        loads.append(resolved.version)  # type: ignore[attr-defined]
        return StateSpaceEngine("mine")

    monkeypatch.setattr(engine_side, "load_engine", load_engine)
    side.watch(Device.parse("cpu.0", "host"), ["mine"], {"mine": None})
    assert side.watcher is not None
    with factory.begin() as session:
        registry.promote(session, "mine", new, "production")
    with caplog.at_level("ERROR"):
        assert side.watcher.check() == [] and side.watcher.check() == []
    assert loads == [new]  # refused once, not reloaded every poll
    assert type(side.engines["mine"]) is StubEngine  # the loaded version keeps serving
    refusal = [r.getMessage() for r in caplog.records if "model_switch_refused" in r.getMessage()]
    assert refusal and "restart the worker" in refusal[0] and "LinearAttentionLayer" in refusal[0]
