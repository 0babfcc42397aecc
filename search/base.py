"""The searcher interface and lookup by name through the ``ape.searchers`` entry points.

A searcher is a frozen dataclass: its fields are its hyperparameters (each with a documented
default in ``metadata["help"]``), which double as the CLI's options. Its one method,
``search(objective)``, decides what to try next and scores it through the objective; the objective
does the budget, caching and recording. Third-party packages add searchers by declaring an entry
point in the same group.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, runtime_checkable

from ape.objective import Objective
from ape.registry import Registry

ENTRY_POINT_GROUP = "ape.searchers"
SEARCHERS = Registry(ENTRY_POINT_GROUP, "searcher")


@runtime_checkable
class Searcher(Protocol):
    name: str

    def search(self, objective: Objective) -> None:
        """Propose and score candidates until done or `BudgetExhausted` is raised."""
        ...


def option(default: Any, help: str, flag: str | None = None) -> Any:
    """A searcher hyperparameter with its CLI help text (and flag, if not --field-name).

    Its type annotation is one that `ape.options` supports: bool, int, float, str,
    Literal[...], X | None, tuple[str, ...] or list[str].
    """
    metadata = {"help": help, "flag": flag} if flag else {"help": help}
    return dataclasses.field(default=default, metadata=metadata)


def available_searchers() -> list[str]:
    """Names accepted by `get_searcher`, sorted."""
    return SEARCHERS.names()


def searcher_class(name: str) -> type:
    """The class registered as `name` (ValueError naming the choices if there is none)."""
    return SEARCHERS.load(name)


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
