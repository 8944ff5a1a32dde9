"""Every package folder of the product is listed in pyproject.toml, so the wheel holds it."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_folder_is_in_the_wheel():
    settings = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {installed: ROOT / folder for installed, folder in settings["package-dir"].items()}
    found = set()
    for installed, folder in folders.items():
        for init in folder.rglob("__init__.py"):
            relative = init.parent.relative_to(folder).parts
            found.add(".".join((installed, *relative)))
    assert found == set(settings["packages"]), "pyproject.toml's packages must list every package folder"
