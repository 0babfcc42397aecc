"""The wheel installs everything under `ape.`: no generic top-level `search` or `evaluators`."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_nests_search_and_evaluators_under_ape_and_ships_the_bundled_task(
    tmp_path: Path,
) -> None:
    pytest.importorskip("setuptools")
    pytest.importorskip("wheel")
    # Build from a copy, so setuptools' build/ and egg-info stay out of the working tree.
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("ape", "search", "evaluators"):
        shutil.copytree(ROOT / name, source / name, ignore=ignore)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
        + ["-w", str(tmp_path / "dist"), str(source)],
        check=True,
        timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert "search" not in top and "evaluators" not in top, sorted(top)
    assert {n for n in top if not n.endswith(".dist-info")} == {"ape"}
    for path in (
        "ape/search/base.py",
        "ape/evaluators/base.py",
        "ape/task.py",
        "ape/data/antonyms/train.jsonl",
        "ape/data/antonyms/meta.json",
    ):
        assert path in names
    # pyproject lists the packages one by one: a new one (a method folder, a split module's
    # package) that is not listed would work in an editable install and be missing from the wheel.
    for folder, prefix in (
        ("ape", "ape"),
        ("search", "ape/search"),
        ("evaluators", "ape/evaluators"),
    ):
        for init in sorted((ROOT / folder).rglob("__init__.py")):
            inside = init.relative_to(ROOT / folder).as_posix()
            assert f"{prefix}/{inside}" in names, f"{folder}/{inside} is not in the wheel"
