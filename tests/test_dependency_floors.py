"""The lower bounds in pyproject.toml are the releases `.ci/floors` tests: each bound has a pin in
.ci/floors.txt at that release or a later one of the same series, and nothing is pinned that the
project does not ask for."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent


def pinned() -> dict[str, Version]:
    pins = {}
    for line in (REPO / ".ci" / "floors.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, release = line.partition("==")
            pins[canonicalize_name(name)] = Version(release.strip())
    return pins


def lower_bounds() -> dict[str, Version]:
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    bounds = {}
    for text in dependencies:
        requirement = Requirement(text)
        for spec in requirement.specifier:
            if spec.operator == ">=":
                bounds[canonicalize_name(requirement.name)] = Version(spec.version)
    return bounds


def test_every_lower_bound_is_the_release_the_floors_check_installs() -> None:
    pins, bounds = pinned(), lower_bounds()
    assert bounds, "pyproject.toml declares no lower bounds"
    for name, bound in bounds.items():
        assert name in pins, f"{name}>={bound} is never tested at its floor: pin it in .ci/floors.txt"
        pin = pins[name]
        assert pin >= bound, f"{name}: .ci/floors.txt pins {pin}, below the declared {bound}"
        assert pin.release[:2] == bound.release[:2], (
            f"{name}: .ci/floors.txt tests {pin} while pyproject.toml admits {bound}: raise the bound")


def test_the_floors_pin_only_what_the_project_depends_on() -> None:
    pins = pinned()
    # psycopg-binary comes with psycopg[binary], at psycopg's own release.
    extra = set(pins) - set(lower_bounds()) - {"psycopg-binary"}
    assert not extra, f".ci/floors.txt pins packages pyproject.toml does not name: {sorted(extra)}"
    assert pins["psycopg-binary"] == pins["psycopg"]
