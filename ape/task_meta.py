"""Where a task's files are: bundled task names, task directories and their meta.json."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ape.task_files import json_error, read_text
from ape.task_types import METRICS, TaskError, type_name

BUNDLED_TASKS_DIR: Path = Path(__file__).parent / "data"


def bundled_names() -> list[str]:
    """The names of the tasks shipped with the package."""
    if not BUNDLED_TASKS_DIR.is_dir():
        return []
    return sorted(p.name for p in BUNDLED_TASKS_DIR.iterdir() if (p / "train.jsonl").is_file())


def bundled_task_path(name: str) -> Path:
    """The directory of a task shipped with the package, e.g. "antonyms"."""
    names = bundled_names()
    if name not in names:
        raise TaskError(f"unknown bundled task {name!r} (available: {', '.join(names) or 'none'})")
    return BUNDLED_TASKS_DIR / name


def resolve_path(path: str | os.PathLike[str]) -> Path:
    """A task file or directory: an existing path, else the name of a bundled task."""
    candidate = Path(path)
    if candidate.exists():
        return candidate
    if str(path) in bundled_names():
        return bundled_task_path(str(path))
    names = ", ".join(bundled_names()) or "none"
    raise TaskError(f"{path}: no such file or directory (bundled tasks: {names})")


def directory_files(source: Path) -> tuple[Path, Path | None, Path | None]:
    """(train, val, test) files of a task directory; val or test is None where it has none."""
    train_file = source / "train.jsonl"
    if not train_file.is_file():
        raise TaskError(
            f"{source}: no train.jsonl (a task directory holds train.jsonl and optionally "
            f"val.jsonl or dev.jsonl, test.jsonl, meta.json)"
        )
    val = next((f for f in (source / "val.jsonl", source / "dev.jsonl") if f.is_file()), None)
    test = source / "test.jsonl"
    return train_file, val, test if test.is_file() else None


def _string_list(value: Any, where: str, key: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TaskError(f"{where}: field {key!r} must be a list of strings")
    return list(value)


def _metric(value: Any, path: Path) -> str:
    # A metric may carry a description after its name: "accuracy (exact match of ...)".
    metric = value.split(" (", 1)[0] if isinstance(value, str) else None
    if metric not in METRICS:
        raise TaskError(
            f"{path}: field 'metric' must be one of {', '.join(METRICS)}, got {value!r}"
        )
    return metric


def _verbalizers(meta: dict[str, Any], labels: list[str], path: Path) -> dict[str, str] | None:
    # RLPrompt's files call them rlprompt_verbalizers: one word per label, in label order.
    for key in ("verbalizers", "rlprompt_verbalizers"):
        if key in meta:
            words = _string_list(meta[key], str(path), key)
            if len(words) != len(labels):
                raise TaskError(
                    f"{path}: field {key!r} must have one word per entry of 'label_names'"
                )
            return dict(zip(labels, words, strict=True))
    return None


def read_meta(path: Path) -> dict[str, Any]:
    """The fields of meta.json that a Task uses (Task's own field names), validated."""
    try:
        meta = json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise TaskError(f"{path}:{exc.lineno}: {json_error(exc)}") from None
    if not isinstance(meta, dict):
        raise TaskError(f"{path}: expected a JSON object, got {type_name(meta)}")
    fields: dict[str, Any] = {}
    if "metric" in meta:
        fields["metric"] = _metric(meta["metric"], path)
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
    verbalizers = _verbalizers(meta, fields.get("labels", []), path)
    if verbalizers is not None:
        fields["verbalizers"] = verbalizers
    return fields
