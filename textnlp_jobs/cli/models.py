"""``textnlp-jobs models``: the model store and registry."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from textnlp_jobs.cli.base import JsonOption, emit, ensure_ledger, models_app, progress, say
from textnlp_jobs.settings import get_settings


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


@models_app.command("list")
def models_list(as_json: JsonOption = False) -> None:
    """Registered models and their versions."""
    from sqlalchemy import select

    from textnlp_jobs.db.models import Model, ModelVersion
    from textnlp_jobs.db.session import session_factory

    settings = get_settings()
    ensure_ledger(settings)
    table = Table("model", "version", "size", "created", "path")
    records = []
    with session_factory(settings)() as session:
        rows = session.execute(select(Model.name, ModelVersion).join(ModelVersion, ModelVersion.model_id == Model.id)
                               .order_by(Model.name, ModelVersion.created_at)).all()
        for name, version in rows:
            records.append({"model": name, "version": version.version, "size_bytes": version.size_bytes,
                            "created_at": version.created_at, "path": version.path,
                            "quantization": version.quantization, "environments": version.environments})
            table.add_row(name, version.version, f"{version.size_bytes / 1e6:.1f} MB",
                          version.created_at.isoformat(timespec="seconds"), version.path)
    emit(records, as_json=as_json, render=table)
