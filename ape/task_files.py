"""Reading examples from one JSONL, JSON, CSV or TSV file, every row validated."""

from __future__ import annotations

import csv
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ape.task_types import Example, TaskError, example_from_row, short, type_name

EXTENSIONS = (".jsonl", ".json", ".csv", ".tsv")

# How many duplicate pairs one warning spells out before it just counts the rest.
_MAX_DUPLICATES_SHOWN = 5


def json_error(exc: json.JSONDecodeError) -> str:
    """The problem part of a message about malformed JSON."""
    return f"malformed JSON: {exc.msg} (column {exc.colno})"


def read_text(path: Path) -> str:
    """The text of `path`, or a TaskError that says it is not UTF-8."""
    try:
        # utf-8-sig: files saved by spreadsheet tools often start with a byte-order mark.
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise TaskError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _where(path: Path, number: int) -> str:
    """The location prefix of an error: a line number, or an item number for a JSON list."""
    return f"{path}: item {number}" if path.suffix.lower() == ".json" else f"{path}:{number}"


def _rows_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TaskError(f"{path}:{number}: {json_error(exc)}") from None
        yield number, row


def _rows_json(path: Path) -> Iterator[tuple[int, Any]]:
    text = read_text(path)
    if not text.strip():
        return
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TaskError(f"{path}:{exc.lineno}: {json_error(exc)}") from None
    if not isinstance(items, list):
        raise TaskError(f"{path}: expected a JSON list of objects, got {type_name(items)}")
    yield from enumerate(items, start=1)


def _table_row(header: list[str], cells: list[str], where: str) -> dict[str, Any]:
    """One CSV/TSV row as a dict, its `answers` cell parsed as a JSON list."""
    if len(cells) != len(header):
        # Usually an unquoted delimiter inside a value.
        raise TaskError(
            f"{where}: row has {len(cells)} cells but the header has {len(header)} columns"
        )
    row: dict[str, Any] = dict(zip(header, cells, strict=True))
    if row.get("answers", "").strip():
        try:
            row["answers"] = json.loads(row["answers"])
        except json.JSONDecodeError as exc:
            raise TaskError(
                f"{where}: field 'answers' must be a JSON list of strings ({json_error(exc)})"
            ) from None
    else:
        row.pop("answers", None)
    return row


def _rows_csv(path: Path, delimiter: str) -> Iterator[tuple[int, Any]]:
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        try:
            header = next(reader, None)
            if header is None:
                return
            header = [name.strip() for name in header]
            for column in ("input", "output"):
                if column not in header:
                    raise TaskError(
                        f"{path}:{reader.line_num}: missing column {column!r} "
                        f"(columns: {', '.join(header)})"
                    )
            for cells in reader:
                if any(cell.strip() for cell in cells):
                    yield reader.line_num, _table_row(header, cells, f"{path}:{reader.line_num}")
        except UnicodeDecodeError as exc:
            raise TaskError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        except csv.Error as exc:
            raise TaskError(f"{path}:{reader.line_num}: malformed CSV: {exc}") from None


def _rows(path: Path) -> Iterator[tuple[int, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _rows_jsonl(path)
    if suffix == ".json":
        return _rows_json(path)
    if suffix in (".csv", ".tsv"):
        return _rows_csv(path, "," if suffix == ".csv" else "\t")
    raise TaskError(
        f"{path}: unknown file type {path.suffix or '(no extension)'!r} "
        f"(accepted: {', '.join(EXTENSIONS)})"
    )


def warn_duplicates(source: object, unit: str, located: list[tuple[int, Example]]) -> None:
    """One warning per source listing duplicate (input, output) rows; they are kept.

    `unit` names what the numbers count ("lines", "items", "rows").
    """
    first_seen: dict[tuple[str, str], int] = {}
    pairs: list[tuple[int, int, str]] = []
    for number, ex in located:
        key = (ex.input, ex.output)
        if key in first_seen:
            pairs.append((first_seen[key], number, ex.input))
        else:
            first_seen[key] = number
    if not pairs:
        return
    shown = [
        f"duplicate example at {unit} {a} and {b} (input {short(text)!r})"
        for a, b, text in pairs[:_MAX_DUPLICATES_SHOWN]
    ]
    more = len(pairs) - len(shown)
    tail = f"; and {more} more" if more else ""
    summary = f" ({len(pairs)} duplicate{'s' if len(pairs) > 1 else ''} in all, kept)"
    # stacklevel 3: past this function and the reader, to the code that asked for the examples.
    warnings.warn(f"{source}: {'; '.join(shown)}{tail}{summary}", stacklevel=3)


def read_examples(path: str | os.PathLike[str]) -> list[Example]:
    """Read examples from a .jsonl, .json, .csv or .tsv file, validating every row."""
    path = Path(path)
    if not path.exists():
        raise TaskError(f"{path}: no such file")
    if not path.is_file():
        raise TaskError(f"{path}: not a file")
    located = [(number, example_from_row(row, _where(path, number))) for number, row in _rows(path)]
    if not located:
        raise TaskError(f"{path}: no examples (the file is empty)")
    warn_duplicates(path, "items" if path.suffix.lower() == ".json" else "lines", located)
    return [ex for _, ex in located]
