"""The wheel lists its packages by hand (pyproject.toml): every package of the source
tree must be on that list, or an installed relay fails to import it."""

from __future__ import annotations

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_of_the_tree_is_in_the_wheel() -> None:
    """Each folder of streamrelay/ with an __init__.py (and the static files' folder)
    appears in [tool.setuptools] packages."""
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "streamrelay").rglob("__init__.py")
    }
    assert found, "no package found: wrong root"
    assert found <= listed, sorted(found - listed)
