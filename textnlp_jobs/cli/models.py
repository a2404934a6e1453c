"""``textnlp-jobs models``: the model store and registry."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from textnlp_jobs.cli.base import console, ensure_ledger, models_app
from textnlp_jobs.display import progress_bar
from textnlp_jobs.errors import TextNLPError
from textnlp_jobs.settings import Settings, get_settings


def bootstrap_model(settings: Settings, name: str) -> tuple[str, Path]:
    """Build model ``name`` into the store and register it; returns (version, path)."""
    from textnlp_jobs.db.session import session_factory
    from textnlp_jobs.inference import store
    from textnlp_jobs.inference.bootstrap import RECIPES, build_model

    if name not in RECIPES:
        raise TextNLPError(f"no recipe for model {name!r} (known: {', '.join(RECIPES)})", code="models.unknown_recipe")
    with progress_bar(console) as bar:
        task = bar.add_task(f"building {name}", total=RECIPES[name].train_steps or 1)

        def build(target: Path) -> None:
            build_model(name, target, progress=lambda done, total: bar.update(task, completed=done))

        path = store.build_into_store(settings.model_store_dir(), name, build)
        bar.update(task, completed=RECIPES[name].train_steps or 1)
    with session_factory(settings).begin() as session:
        version = store.register_version(session, name, path, description=RECIPES[name].description)
        return version.version, path


@models_app.command("bootstrap")
def models_bootstrap(name: Annotated[str, typer.Argument(help="demo, small or tiny")] = "demo") -> None:
    """Build one of the project's own models locally (no download) and register it."""
    settings = get_settings()
    ensure_ledger(settings)
    version, path = bootstrap_model(settings, name)
    console.print(f"registered {name} version {version} at {path}")


@models_app.command("list")
def models_list() -> None:
    """Registered models and their versions."""
    from sqlalchemy import select

    from textnlp_jobs.db.models import Model, ModelVersion
    from textnlp_jobs.db.session import session_factory

    settings = get_settings()
    ensure_ledger(settings)
    table = Table("model", "version", "size", "created", "path")
    with session_factory(settings)() as session:
        rows = session.execute(select(Model.name, ModelVersion).join(ModelVersion, ModelVersion.model_id == Model.id)
                               .order_by(Model.name, ModelVersion.created_at)).all()
        for name, version in rows:
            table.add_row(name, version.version, f"{version.size_bytes / 1e6:.1f} MB",
                          version.created_at.isoformat(timespec="seconds"), version.path)
    console.print(table)

