"""Tasks: labelled examples read from JSONL/JSON/CSV/TSV files, split into train/val/test.

Every data problem raises `TaskError` with a message of the form ``"{path}:{line}: {problem}"``
so a user can jump straight to the bad row.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import random
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sklearn.model_selection import train_test_split

METRICS = ("em", "contains", "f1", "es", "accuracy")
EXTENSIONS = (".jsonl", ".json", ".csv", ".tsv")
SPLITS = ("train", "val", "test")
BUNDLED_TASKS_DIR: Path = Path(__file__).parent / "data"

# How many duplicate pairs one warning spells out before it just counts the rest.
_MAX_DUPLICATES_SHOWN = 5


class TaskError(ValueError):
    """A problem with task data; the message names the file, line and field."""


@dataclass(frozen=True)
class Example:
    """One input with its reference output and every acceptable output."""

    input: str
    output: str
    answers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        answers = tuple(self.answers)
        # Scoring takes the best match over `answers`, so the reference output must be one of them.
        if self.output not in answers:
            answers = (self.output, *answers)
        object.__setattr__(self, "answers", answers)

    def key(self) -> str:
        """A short content hash: a stored score stays valid exactly as long as this matches."""
        text = json.dumps([self.input, self.output, list(self.answers)], ensure_ascii=False)
        return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


@dataclass
class Task:
    """A named task with its three splits and how to score it."""

    name: str
    train: list[Example]
    val: list[Example]
    test: list[Example]
    metric: str = "em"
    human_instructions: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    # label -> the word scored for it by the `choice` evaluator (default: the label itself)
    verbalizers: dict[str, str] = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise TaskError(
                f"task {self.name!r}: unknown metric {self.metric!r} "
                f"(choose one of: {', '.join(METRICS)})"
            )

    def __repr__(self) -> str:
        # The default repr would print every example.
        return (
            f"Task(name={self.name!r}, train={len(self.train)}, val={len(self.val)}, "
            f"test={len(self.test)}, metric={self.metric!r}, seed={self.seed})"
        )

    def split(self, name: str) -> list[Example]:
        """The examples of split `name` ("train", "val" or "test")."""
        if name not in SPLITS:
            raise TaskError(f"unknown split {name!r} (valid: {', '.join(SPLITS)})")
        return getattr(self, name)

    def sample_test(self, rows: int, seed: int = 0) -> Task:
        """This task with `rows` test examples drawn without replacement (seeded), in file order.

        For test sets too large to score every finalist on (AG News has 7,600 rows). The label set
        is fixed from the full task first, so a sample that misses a label keeps it as a choice.
        """
        if rows <= 0:
            raise ValueError(f"test_examples must be positive, got {rows}")
        if rows >= len(self.test):
            return self
        picked = sorted(random.Random(seed).sample(range(len(self.test)), rows))
        return replace(
            self,
            test=[self.test[i] for i in picked],
            labels=self.labels or self.distinct_outputs(),
        )

    def distinct_outputs(self) -> list[str]:
        """Sorted distinct outputs over all splits (the label set of a classification task)."""
        return sorted({ex.output for ex in (*self.train, *self.val, *self.test)})


# ---------------------------------------------------------------------------------------------
# Reading one file


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _example_from_row(row: Any, where: str) -> Example:
    """Validate one parsed row; `where` is the "path:line" prefix for error messages."""
    if not isinstance(row, dict):
        raise TaskError(f"{where}: expected a JSON object, got {_type_name(row)}")
    values: dict[str, str] = {}
    for key in ("input", "output"):
        if key not in row:
            raise TaskError(f"{where}: missing field {key!r}")
        value = row[key]
        if not isinstance(value, str):
            raise TaskError(f"{where}: field {key!r} must be a string, got {_type_name(value)}")
        if not value.strip():
            raise TaskError(f"{where}: field {key!r} is empty")
        values[key] = value
    answers = row.get("answers")
    if answers is None:
        answers = []
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise TaskError(f"{where}: field 'answers' must be a list of strings")
    return Example(values["input"], values["output"], tuple(answers))


def _json_error(exc: json.JSONDecodeError) -> str:
    return f"malformed JSON: {exc.msg} (column {exc.colno})"


def _read_text(path: Path) -> str:
    try:
        # utf-8-sig: files saved by spreadsheet tools often start with a byte-order mark.
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise TaskError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _where(path: Path, number: int) -> str:
    """The location prefix of an error: a line number, or an item number for a JSON list."""
    return f"{path}: item {number}" if path.suffix.lower() == ".json" else f"{path}:{number}"


def _rows_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TaskError(f"{path}:{number}: {_json_error(exc)}") from None
        yield number, row


def _rows_json(path: Path) -> Iterator[tuple[int, Any]]:
    text = _read_text(path)
    if not text.strip():
        return
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TaskError(f"{path}:{exc.lineno}: {_json_error(exc)}") from None
    if not isinstance(items, list):
        raise TaskError(f"{path}: expected a JSON list of objects, got {_type_name(items)}")
    yield from enumerate(items, start=1)


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
                where = f"{path}:{reader.line_num}"
                if not any(cell.strip() for cell in cells):
                    continue
                if len(cells) != len(header):
                    # Usually an unquoted delimiter inside a value.
                    raise TaskError(
                        f"{where}: row has {len(cells)} cells but the header has "
                        f"{len(header)} columns"
                    )
                row: dict[str, Any] = dict(zip(header, cells, strict=True))
                if row.get("answers", "").strip():
                    try:
                        row["answers"] = json.loads(row["answers"])
                    except json.JSONDecodeError as exc:
                        raise TaskError(
                            f"{where}: field 'answers' must be a JSON list of strings "
                            f"({_json_error(exc)})"
                        ) from None
                else:
                    row.pop("answers", None)
                yield reader.line_num, row
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


def _warn_duplicates(path: Path, located: list[tuple[int, Example]]) -> None:
    """One warning per file listing duplicate (input, output) rows; they are kept."""
    unit = "items" if path.suffix.lower() == ".json" else "lines"
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
        f"duplicate example at {unit} {a} and {b} (input {_short(text)!r})"
        for a, b, text in pairs[:_MAX_DUPLICATES_SHOWN]
    ]
    more = len(pairs) - len(shown)
    tail = f"; and {more} more" if more else ""
    summary = f" ({len(pairs)} duplicate{'s' if len(pairs) > 1 else ''} in all, kept)"
    warnings.warn(f"{path}: {'; '.join(shown)}{tail}{summary}", stacklevel=3)


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_examples(path: str | os.PathLike[str]) -> list[Example]:
    """Read examples from a .jsonl, .json, .csv or .tsv file, validating every row."""
    path = Path(path)
    if not path.exists():
        raise TaskError(f"{path}: no such file")
    if not path.is_file():
        raise TaskError(f"{path}: not a file")
    located = [
        (number, _example_from_row(row, _where(path, number))) for number, row in _rows(path)
    ]
    if not located:
        raise TaskError(f"{path}: no examples (the file is empty)")
    _warn_duplicates(path, located)
    return [ex for _, ex in located]


# ---------------------------------------------------------------------------------------------
# Loading a task


def _bundled_names() -> list[str]:
    if not BUNDLED_TASKS_DIR.is_dir():
        return []
    return sorted(p.name for p in BUNDLED_TASKS_DIR.iterdir() if (p / "train.jsonl").is_file())


def bundled_task_path(name: str) -> Path:
    """The directory of a task shipped with the package, e.g. "antonyms"."""
    names = _bundled_names()
    if name not in names:
        raise TaskError(f"unknown bundled task {name!r} (available: {', '.join(names) or 'none'})")
    return BUNDLED_TASKS_DIR / name


def _string_list(value: Any, where: str, key: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TaskError(f"{where}: field {key!r} must be a list of strings")
    return list(value)


def _read_meta(path: Path) -> dict[str, Any]:
    """The fields of meta.json that a Task uses, validated."""
    try:
        meta = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise TaskError(f"{path}:{exc.lineno}: {_json_error(exc)}") from None
    if not isinstance(meta, dict):
        raise TaskError(f"{path}: expected a JSON object, got {_type_name(meta)}")
    fields: dict[str, Any] = {}
    if "metric" in meta:
        # A metric may carry a description after its name: "accuracy (exact match of ...)".
        metric = meta["metric"].split(" (", 1)[0] if isinstance(meta["metric"], str) else None
        if metric not in METRICS:
            raise TaskError(
                f"{path}: field 'metric' must be one of {', '.join(METRICS)}, "
                f"got {meta['metric']!r}"
            )
        fields["metric"] = metric
    if "task" in meta:
        if not isinstance(meta["task"], str) or not meta["task"].strip():
            raise TaskError(f"{path}: field 'task' must be a non-empty string")
        fields["name"] = meta["task"]
    if "human_instructions" in meta:
        fields["human_instructions"] = _string_list(
            meta["human_instructions"], str(path), "human_instructions"
        )
    if "label_names" in meta:
        fields["labels"] = _string_list(meta["label_names"], str(path), "label_names")
    # RLPrompt's files call them rlprompt_verbalizers: one word per label, in label order.
    for key in ("verbalizers", "rlprompt_verbalizers"):
        if key in meta:
            words = _string_list(meta[key], str(path), key)
            if len(words) != len(fields.get("labels", [])):
                raise TaskError(
                    f"{path}: field {key!r} must have one word per entry of 'label_names'"
                )
            fields["verbalizers"] = dict(zip(fields["labels"], words, strict=True))
            break
    return fields


def _split_sizes(n: int, fraction: float) -> tuple[int, int]:
    """(kept, held out) when `fraction` of `n` rows is held out, rounding the held-out part up."""
    held = math.ceil(fraction * n)
    return n - held, held


def _rows_needed(fractions: list[float]) -> int:
    """Fewest rows that leave every split non-empty after holding out `fractions` in turn."""
    n = 1
    while True:
        remaining, ok = n, True
        for fraction in fractions:
            remaining, held = _split_sizes(remaining, fraction)
            ok = ok and held >= 1
        if ok and remaining >= 1:
            return n
        n += 1


def _hold_out(
    examples: list[Example], fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    _, held = _split_sizes(len(examples), fraction)
    kept, out = train_test_split(examples, test_size=held, random_state=seed)
    return list(kept), list(out)


def _resolve(path: str | os.PathLike[str]) -> Path:
    """A task file or directory: an existing path, else the name of a bundled task."""
    candidate = Path(path)
    if candidate.exists():
        return candidate
    if str(path) in _bundled_names():
        return bundled_task_path(str(path))
    names = ", ".join(_bundled_names()) or "none"
    raise TaskError(f"{path}: no such file or directory (bundled tasks: {names})")


def load_task(
    path: str | os.PathLike[str],
    val: str | os.PathLike[str] | None = None,
    test: str | os.PathLike[str] | None = None,
    seed: int = 0,
    *,
    val_fraction: float = 0.5,
    test_fraction: float = 0.25,
    name: str | None = None,
) -> Task:
    """Load a task from a file, a task directory or a bundled task name.

    Splits that no file provides are held out of the training rows with a seeded shuffle: first
    `test_fraction` for test, then `val_fraction` of the rest for val.
    """
    for label, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 < fraction < 1:
            raise ValueError(f"{label} must be between 0 and 1 (exclusive), got {fraction}")
    source = _resolve(path)
    meta: dict[str, Any] = {}
    if source.is_dir():
        train_file = source / "train.jsonl"
        if not train_file.is_file():
            raise TaskError(
                f"{source}: no train.jsonl (a task directory holds train.jsonl and optionally "
                f"val.jsonl or dev.jsonl, test.jsonl, meta.json)"
            )
        if val is None:
            val = next(
                (f for f in (source / "val.jsonl", source / "dev.jsonl") if f.is_file()), None
            )
        if test is None and (source / "test.jsonl").is_file():
            test = source / "test.jsonl"
        if (source / "meta.json").is_file():
            meta = _read_meta(source / "meta.json")
        default_name = source.name
    else:
        train_file = source
        default_name = source.stem

    train = read_examples(train_file)
    fractions = [f for f, given in ((test_fraction, test), (val_fraction, val)) if given is None]
    needed = _rows_needed(fractions)
    if len(train) < needed:
        held = " and ".join(s for s, given in (("test", test), ("val", val)) if given is None)
        raise TaskError(
            f"{train_file}: found {len(train)} example{'s' if len(train) != 1 else ''}, need at "
            f"least {needed} to keep a train split" + (f" and hold out {held}" if held else "")
        )
    if test is None:
        train, test_examples = _hold_out(train, test_fraction, seed)
    else:
        test_examples = read_examples(test)
    if val is None:
        train, val_examples = _hold_out(train, val_fraction, seed)
    else:
        val_examples = read_examples(val)

    meta_name = meta.pop("name", None)
    task_name = name or meta_name or default_name
    task = Task(task_name, train, val_examples, test_examples, seed=seed, **meta)
    _warn_leakage(task)
    return task


def _warn_leakage(task: Task) -> None:
    train_inputs = {ex.input for ex in task.train}
    leaked = [ex.input for ex in task.test if ex.input in train_inputs]
    if leaked:
        warnings.warn(
            f"task {task.name!r}: {len(leaked)} test example{'s' if len(leaked) > 1 else ''} "
            f"share an input with train (e.g. {_short(leaked[0])!r}); "
            "test scores may be optimistic",
            stacklevel=3,
        )
