"""In-memory task data: a list of {"input", "output"} dicts, a pandas DataFrame or a
`datasets.Dataset`, checked row by row with the same messages as files ("row 3: ...").

Neither pandas nor datasets is imported: a table is recognised by its methods, so both stay
optional.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

from ape.task_files import warn_duplicates
from ape.task_types import Example, TaskError, example_from_row

# The name of a task built from in-memory data when none is given.
DEFAULT_NAME = "data"


@runtime_checkable
class DataFrameLike(Protocol):
    """A pandas DataFrame, as far as reading rows goes."""

    columns: Any

    def to_dict(self, orient: str) -> Any: ...


@runtime_checkable
class DatasetLike(Protocol):
    """A Hugging Face `datasets.Dataset`, as far as reading rows goes."""

    column_names: list[str]

    def to_list(self) -> list[dict[str, Any]]: ...


Records = Iterable[Mapping[str, Any]] | DataFrameLike | DatasetLike


def is_records(data: object) -> bool:
    """Whether `data` is in-memory rows rather than a path or a bundled task name.

    A mapping counts, so that a dict (or a datasets.DatasetDict) gets a message, not a path error.
    """
    if isinstance(data, (str, bytes, os.PathLike)):
        return False
    return isinstance(data, (DataFrameLike, DatasetLike, Iterable))


def _check_columns(columns: list[str]) -> None:
    for column in ("input", "output"):
        if column not in columns:
            raise TaskError(f"missing column {column!r} (columns: {', '.join(map(str, columns))})")


def _is_blank(value: Any) -> bool:
    # A table has every column in every row: a missing value is None (datasets) or NaN (pandas).
    return value is None or (isinstance(value, float) and value != value)


def _table_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if not _is_blank(v)} for row in rows]


def _plain(row: Any) -> Any:
    """A row as the dict that `example_from_row` checks: answers as a list, if a sequence."""
    if not isinstance(row, Mapping):
        return row
    row = dict(row)
    answers = row.get("answers")
    if hasattr(answers, "tolist"):  # a numpy array, from a DataFrame column of lists
        answers = answers.tolist()
    if isinstance(answers, tuple):
        answers = list(answers)
    if answers is not None:
        row["answers"] = answers
    return row


def _rows(data: Records) -> list[Any]:
    if isinstance(data, Mapping):
        raise TaskError(
            "expected rows of {'input', 'output'}, got a mapping "
            "(for a datasets.DatasetDict pick a split, e.g. data['train'])"
        )
    if isinstance(data, DatasetLike):
        _check_columns(list(data.column_names))
        return _table_rows(data.to_list())
    if isinstance(data, DataFrameLike):
        _check_columns(list(data.columns))
        return _table_rows(data.to_dict(orient="records"))
    return list(data)


def examples_from_records(data: Records, source: str = DEFAULT_NAME) -> list[Example]:
    """Examples from in-memory rows, every row validated; rows are numbered from 1.

    `source` names the data in warnings (duplicates) and in the empty-data error.
    """
    located = [
        (number, example_from_row(_plain(row), f"row {number}", "a dict"))
        for number, row in enumerate(_rows(data), start=1)
    ]
    if not located:
        raise TaskError(f"{source}: no examples (the data is empty)")
    warn_duplicates(source, "rows", located)
    return [ex for _, ex in located]
