"""A model built once on a machine is copied, not trained again, into another home."""

from __future__ import annotations

from pathlib import Path

import pytest

from textnlp_jobs.db.migrate import upgrade
from textnlp_jobs.db.session import dispose_engines
from textnlp_jobs.inference.bootstrap import bootstrap_model
from textnlp_jobs.settings import Settings

pytestmark = [pytest.mark.slow]


def test_a_second_home_gets_the_built_model_from_the_cache(tmp_path: Path) -> None:
    built = []
    for home in ("first", "second"):
        settings = Settings(home=tmp_path / home, model_cache=str(tmp_path / "cache"))
        upgrade(settings.database_url_value())
        built.append(bootstrap_model(settings, "tiny"))
    dispose_engines()
    first, second = built
    assert not first.from_cache and second.from_cache
    assert first.version == second.version  # the same files register as the same version
    assert second.path.is_relative_to(tmp_path / "second")


def test_the_cache_can_be_switched_off(tmp_path: Path) -> None:
    assert Settings(home=tmp_path, model_cache="off").model_cache_dir() is None
    assert Settings(home=tmp_path, model_cache=str(tmp_path / "c")).model_cache_dir() == tmp_path / "c"
