"""Plugins by name through an entry-point group (``ape.searchers``, ``ape.evaluators``).

Entry points come from installed package metadata, so a new plugin in this repository needs a
reinstall (``pip install -e .``) before its name resolves. They are read on every call: a plugin
installed while a process runs, or one a test adds, is seen at once.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any


class Registry:
    """The plugins of one entry-point group; `kind` names them in errors ("searcher")."""

    def __init__(self, group: str, kind: str) -> None:
        self.group = group
        self.kind = kind

    def _points(self) -> dict[str, metadata.EntryPoint]:
        return {ep.name: ep for ep in metadata.entry_points(group=self.group)}

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._points())

    def load(self, name: str) -> Any:
        """The object registered as `name`; a ValueError listing the choices if there is none."""
        points = self._points()
        if name not in points:
            raise ValueError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(sorted(points))}"
            )
        return points[name].load()
