"""Tasks: labelled examples from files, task directories, bundled tasks or in-memory rows, split
into train/val/test.

The concepts live in their own modules and are re-exported here, the one place callers import
from: the types (ape/task_types.py), file readers (ape/task_files.py), task directories and
meta.json (ape/task_meta.py), in-memory rows (ape/task_data.py) and hold-out splits
(ape/task_split.py). Every data problem raises `TaskError` with a message that starts with where
the bad row is (``"{path}:{line}: {problem}"``, or ``"row {n}: {problem}"`` for in-memory rows).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ape.task_data import DEFAULT_NAME, Records, examples_from_records, is_records
from ape.task_files import EXTENSIONS, read_examples
from ape.task_meta import (
    BUNDLED_TASKS_DIR,
    bundled_task_path,
    directory_files,
    read_meta,
    resolve_path,
)
from ape.task_split import check_enough, check_fractions, hold_out, warn_leakage
from ape.task_types import METRICS, SPLITS, Example, Task, TaskError

__all__ = [
    "BUNDLED_TASKS_DIR",
    "EXTENSIONS",
    "METRICS",
    "SPLITS",
    "Example",
    "Records",
    "Task",
    "TaskError",
    "TaskSource",
    "bundled_task_path",
    "load_task",
    "read_examples",
]

# What `load_task` reads: a file, a task directory, a bundled task name, or in-memory rows (a list
# of {"input", "output"} dicts, a pandas DataFrame, a datasets.Dataset).
TaskSource = str | os.PathLike | Records


def _examples(source: TaskSource, name: str) -> list[Example]:
    """The examples of one split, from a file or from in-memory rows."""
    return examples_from_records(source, name) if is_records(source) else read_examples(source)


def _sources(
    path: TaskSource, val: TaskSource | None, test: TaskSource | None
) -> tuple[TaskSource, TaskSource | None, TaskSource | None, dict[str, Any], str]:
    """(train, val, test, meta fields, default name) of what `load_task` was given."""
    if is_records(path):
        return path, val, test, {}, DEFAULT_NAME
    source = resolve_path(path)
    if not source.is_dir():
        return source, val, test, {}, source.stem
    train_file, found_val, found_test = directory_files(source)
    meta = read_meta(source / "meta.json") if (source / "meta.json").is_file() else {}
    # Split files passed explicitly win over the directory's own.
    return (
        train_file,
        val if val is not None else found_val,
        test if test is not None else found_test,
        meta,
        source.name,
    )


def load_task(
    path: TaskSource,
    val: TaskSource | None = None,
    test: TaskSource | None = None,
    seed: int = 0,
    *,
    val_fraction: float = 0.5,
    test_fraction: float = 0.25,
    name: str | None = None,
) -> Task:
    """Load a task from a file, a task directory, a bundled task name or in-memory rows.

    In-memory rows are a list of {"input", "output"} dicts (optionally "answers"), a pandas
    DataFrame or a datasets.Dataset with those columns; their task is named `name` or "data".
    Splits that no source provides are held out of the training rows with a seeded shuffle: first
    `test_fraction` for test, then `val_fraction` of the rest for val.
    """
    check_fractions(val_fraction, test_fraction)
    train_source, val, test, meta, default_name = _sources(path, val, test)
    label = name or default_name
    where = train_source if isinstance(train_source, Path) else label
    train = _examples(train_source, label)
    held = {
        split: f
        for split, f, given in (("test", test_fraction, test), ("val", val_fraction, val))
        if given is None
    }
    check_enough(train, where, held)
    if test is None:
        train, test_examples = hold_out(train, test_fraction, seed)
    else:
        test_examples = _examples(test, f"{label} (test)")
    if val is None:
        train, val_examples = hold_out(train, val_fraction, seed)
    else:
        val_examples = _examples(val, f"{label} (val)")
    meta_name = meta.pop("name", None)
    task = Task(
        name or meta_name or default_name, train, val_examples, test_examples, seed=seed, **meta
    )
    warn_leakage(task)
    return task
