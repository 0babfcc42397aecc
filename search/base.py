"""The searcher interface and lookup by name through the ``ape.searchers`` entry points.

A searcher is a frozen dataclass: its fields are its hyperparameters (each with a documented
default in ``metadata["help"]``), which double as the CLI's options. Its one method,
``search(objective)``, decides what to try next and scores it through the objective; the objective
does the budget, caching and recording. Third-party packages add searchers by declaring an entry
point in the same group.
"""

from __future__ import annotations

import dataclasses
import typing
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Protocol, runtime_checkable

from ape.objective import Objective

ENTRY_POINT_GROUP = "ape.searchers"


@runtime_checkable
class Searcher(Protocol):
    name: str

    def search(self, objective: Objective) -> None:
        """Propose and score candidates until done or `BudgetExhausted` is raised."""
        ...


def option(default: Any, help: str, flag: str | None = None) -> Any:
    """A searcher hyperparameter with its CLI help text (and flag, if not --field-name)."""
    metadata = {"help": help, "flag": flag} if flag else {"help": help}
    return dataclasses.field(default=default, metadata=metadata)


def _entry_points() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available_searchers() -> list[str]:
    """Names accepted by `get_searcher`, sorted."""
    return sorted(_entry_points())


def searcher_class(name: str) -> type:
    points = _entry_points()
    if name not in points:
        raise ValueError(f"unknown searcher {name!r}; choose one of: {', '.join(sorted(points))}")
    return points[name].load()


def get_searcher(name: str, **options: Any) -> Searcher:
    """The searcher registered as `name`, constructed with `options` (checked by name)."""
    cls = searcher_class(name)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        takes = ", ".join(sorted(known)) or "no options"
        raise ValueError(
            f"searcher {name!r} has no option {', '.join(unknown)} (it takes: {takes})"
        )
    return cls(**options)


def searcher_options(name: str) -> list[dataclasses.Field]:
    """The hyperparameter fields of searcher `name`."""
    return list(dataclasses.fields(searcher_class(name)))


def field_type(cls: type, field: dataclasses.Field) -> Any:
    """The field's annotation as a type (annotations are strings under __future__ annotations)."""
    return typing.get_type_hints(cls)[field.name]


def positive(**values: float) -> None:
    """Raise a clear ValueError for any value that is not positive."""
    for name, value in values.items():
        if value is None or value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")


def non_negative(**values: float) -> None:
    """Raise a clear ValueError for any value below zero."""
    for name, value in values.items():
        if value is None or value < 0:
            raise ValueError(f"{name} must be 0 or more, got {value}")
