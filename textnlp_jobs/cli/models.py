"""``textnlp-jobs models``: the model store and registry."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from sqlalchemy import select

from textnlp_jobs.cli.base import JsonOption, console, emit, emit_json, ensure_ledger, models_app, progress, say
from textnlp_jobs.settings import Settings, get_settings


@models_app.command("bootstrap")
def models_bootstrap(name: Annotated[str, typer.Argument(help="demo, small or tiny")] = "demo") -> None:
    """Build one of the project's own models locally (no download) and register it."""
    from textnlp_jobs.inference.bootstrap import RECIPES, bootstrap_model

    settings = get_settings()
    ensure_ledger(settings)
    recipe = RECIPES.get(name)  # an unknown name is refused by bootstrap_model
    if recipe is not None:
        say(f"building {name}: {recipe.build_note}")
    with progress() as bar:
        task = bar.add_task(f"training {name} (steps)", total=recipe.train_steps or 1 if recipe else 1)
        built = bootstrap_model(settings, name, progress=lambda done, _total: bar.update(task, completed=done))
    say(f"registered {name} version {built.version} at {built.path}" + (" (from the build cache)"
                                                                         if built.from_cache else ""))


def _registry_session() -> tuple[Settings, Any]:
    from textnlp_jobs.db.session import session_factory

    settings = get_settings()
    ensure_ledger(settings)
    return settings, session_factory(settings)


@models_app.command("register")
def models_register(
    path: Annotated[Path, typer.Argument(help="a directory AutoModelForCausalLM.from_pretrained loads")],
    name: Annotated[str, typer.Option("--name", help="the model name jobs will ask for")],
    description: Annotated[str | None, typer.Option("--description")] = None,
    in_place: Annotated[bool, typer.Option("--in-place", help="reference the directory where it is "
                                                              "instead of copying it into the store")] = False,
) -> None:
    """Register a local Hugging Face causal LM (safetensors, or an int8 variant this project wrote)."""
    from textnlp_jobs.inference import registry

    settings, factory = _registry_session()
    done = registry.register_directory(settings, factory, path, name, description=description, in_place=in_place)
    state = "registered" if done.created else "already registered:"
    say(f"{state} {done.name} version {done.version} at {done.path}")
    if done.static_only_reason is not None:
        say(f"note: {done.name} runs in static batches ({done.static_only_reason}): it cannot join continuous "
            f"ones, so a device serving it batches all its models statically")
    if done.ignored_generation_defaults:
        settings_text = ", ".join(f"{key}={value}" for key, value in done.ignored_generation_defaults.items())
        say(f"note: {done.name}'s generation_config.json sets {settings_text}; jobs decode with their own "
            f"temperature, top_p and top_k (greedy unless a job sets them), not with these")
    console.print(done.version, markup=False, highlight=False)  # stdout: the version id, for scripts


@models_app.command("list")
def models_list(as_json: JsonOption = False) -> None:
    """Registered models and their versions: promotions, pins, corrupt flags, last use."""
    from textnlp_jobs.db.models import Model
    from textnlp_jobs.inference import registry

    settings, factory = _registry_session()
    records = []
    with factory() as session:
        loads = registry.live_loads(session, settings)
        for model in session.execute(select(Model).order_by(Model.name)).scalars():
            for version in reversed(registry.versions_of(session, model)):
                records.append(registry.describe(model, version, loads))
    if as_json:
        emit_json(records)
        return
    table = Table("model", "version", "environments", "quant.", "pinned", "state", "size", "last used", "created")
    for r in records:
        state = "corrupt" if r["corrupt"] else ("loaded" if r["loaded_on"] else "")
        table.add_row(r["model"], r["version"], ",".join(r["environments"]), r["quantization"] or "",
                      "yes" if r["keep_always"] else "", state, f"{r['size_bytes'] / 1e6:.1f} MB",
                      (r["last_used_at"] or "")[:19], r["created_at"][:19])
    emit(records, as_json=False, render=table)


@models_app.command("show")
def models_show(name: str, as_json: JsonOption = False) -> None:
    """One model: every version with its metadata, and its promotion history per environment."""
    from textnlp_jobs.db.models import ModelPromotion
    from textnlp_jobs.inference import registry

    settings, factory = _registry_session()
    with factory() as session:
        model = registry.get_model(session, name)
        loads = registry.live_loads(session, settings)
        versions = [registry.describe(model, v, loads) for v in registry.versions_of(session, model)]
        history = [{"environment": p.environment, "action": p.action, "version": p.version,
                    "previous_version": p.previous_version, "actor": p.actor, "at": p.at.isoformat()}
                   for p in session.execute(select(ModelPromotion).where(ModelPromotion.model_id == model.id)
                                            .order_by(ModelPromotion.id)).scalars()]
        data = {"model": model.name, "description": model.description,
                "quantize_eligible": model.quantize_eligible, "versions": versions, "promotions": history}
    if as_json:
        emit_json(data)
        return
    console.print(f"{model.name}: {model.description or ''} (quantize eligible: "
                  f"{'yes' if data['quantize_eligible'] else 'no'})", markup=False, highlight=False)
    for v in versions:
        console.print(f"\n{v['version']}  {v['architecture'] or '?'}  {v['dtype'] or '?'}  "
                      f"{v['parameter_count'] or '?'} parameters  max positions {v['max_positions'] or '?'}  "
                      f"{v['size_bytes'] / 1e6:.1f} MB", markup=False, highlight=False)
        for key in ("path", "quantization", "environments", "keep_always", "corrupt", "corrupt_reason", "loaded_on",
                    "last_used_at", "special_tokens", "validation"):
            if v[key] not in (None, [], {}, False):
                console.print(f"  {key}: {v[key]}", markup=False, highlight=False)
    if history:
        table = Table("at", "environment", "action", "from", "to", "by")
        for h in history:
            table.add_row(h["at"][:19], h["environment"], h["action"], h["previous_version"] or "", h["version"],
                          h["actor"])
        console.print(table)


EnvOption = Annotated[str | None, typer.Option("--env", help="environment (default TEXTNLP_ENVIRONMENT)")]


@models_app.command("promote")
def models_promote(name: str, version: str, env: EnvOption = None) -> None:
    """Serve VERSION of NAME in an environment; running workers switch to it without a restart."""
    from textnlp_jobs.inference import registry

    settings, factory = _registry_session()
    with factory.begin() as session:
        switch = registry.promote(session, name, version, env or settings.environment)
    _print_switch(switch)


@models_app.command("rollback")
def models_rollback(name: str, env: EnvOption = None) -> None:
    """Serve again the version promoted before the current one in an environment."""
    from textnlp_jobs.inference import registry

    settings, factory = _registry_session()
    with factory.begin() as session:
        switch = registry.rollback(session, name, env or settings.environment)
    _print_switch(switch)


def _print_switch(switch: Any) -> None:
    if switch.changed:
        say(f"{switch.name} in {switch.environment}: {switch.previous or '(none)'} -> {switch.current}")
    else:
        say(f"{switch.name} in {switch.environment}: already {switch.current}")


@models_app.command("pin")
def models_pin(name: str, version: str) -> None:
    """Keep VERSION always: models.cleanup never removes it."""
    _set_pin(name, version, True)


@models_app.command("unpin")
def models_unpin(name: str, version: str) -> None:
    """Let models.cleanup remove VERSION again once it is unused."""
    _set_pin(name, version, False)


def _set_pin(name: str, version: str, pinned: bool) -> None:
    from textnlp_jobs.inference import registry

    _, factory = _registry_session()
    with factory.begin() as session:
        registry.set_pinned(session, name, version, pinned)
    say(f"{name} {version}: {'pinned' if pinned else 'unpinned'}")


@models_app.command("eligible")
def models_eligible(name: str, off: Annotated[bool, typer.Option("--off")] = False) -> None:
    """Mark NAME eligible (or not, with --off) for the weekly int8 quantization."""
    from textnlp_jobs.inference import registry

    _, factory = _registry_session()
    with factory.begin() as session:
        registry.set_quantize_eligible(session, name, not off)
    say(f"{name}: quantize eligible {'no' if off else 'yes'}")


@models_app.command("remove")
def models_remove(name: str, version: str) -> None:
    """Remove VERSION (its row and, when the store owns them, its files); refused while it is
    promoted, pinned or loaded on a worker."""
    from textnlp_jobs.inference import registry

    settings, factory = _registry_session()
    freed = registry.remove(settings, factory, name, version)
    say(f"removed {name} {version}, freed {freed / 1e6:.1f} MB")
