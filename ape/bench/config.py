"""The bench config: read a JSON/TOML file and check every key, naming the file and key."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ape.models import DEFAULT_MODEL
from ape.options import SCALARS, options_of
from ape.task_types import DEFAULT_TEST_EXAMPLES

KEYS = (
    "tasks",
    "searchers",
    "seeds",
    "budget",
    "model",
    "evaluator",
    "out",
    "storage",
    "val_examples",
    "test_top",
    "test_examples",
    "device",
    "dtype",
)
SEARCHER_KEYS = ("name", "label", "options")
COUNTS = ("budget", "val_examples", "test_top", "test_examples")  # positive integers
STRINGS = ("model", "evaluator", "out", "storage", "device", "dtype")  # non-empty strings
_is_int = SCALARS[int].accept  # the options schema's own check: True is not an integer

CONFIG_HELP = """\
Run every searcher on every task with every seed at the same budget, loading
the model once, then write a summary table (mean ± std across seeds, per-task
wins) and plots of the best validation score against budget spent.

CONFIG is a JSON file (or TOML, *.toml) with the keys:
  tasks         task paths or bundled task names (required); relative paths are
                taken from the config's folder when they exist there, else from
                the working directory
  searchers     names, or {"name": ..., "options": {...}, "label": ...}
                (required; a searcher listed twice needs distinct labels)
  budget        units per run: scored pairs + generated tokens (required, > 0)
  seeds         list of seeds (default: [0])
  model         default: smollm2-135m;  evaluator: default loglik
  out           output folder (default: <config name>-results beside the config)
  storage       Optuna storage URL (default: sqlite:///OUT/studies.db)
  val_examples, test_top, test_examples (a number or "all"), device, dtype: as for
                'ape optimize'

Writes OUT/runs/TASK-SEARCHER-seedSEED.json (one result per run), OUT/summary.md,
OUT/summary.json and OUT/plots/TASK.png (plots need matplotlib: the 'plot'
extra). A run whose result exists is skipped, so after Ctrl-C (exit 130) the
same command continues; a run cut off midway resumes from the storage."""


class ConfigError(ValueError):
    """A bench config that cannot run; the message names the file and the key."""


@dataclass(frozen=True)
class SearcherSpec:
    """A searcher of the grid: its registered name, options, and the label its runs go by."""

    label: str
    name: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class BenchConfig:
    path: Path
    tasks: list[str]  # sources for load_task: resolved paths or bundled names
    searchers: list[SearcherSpec]
    budget: int
    out: Path
    storage: str
    seeds: list[int] = field(default_factory=lambda: [0])
    model: str = DEFAULT_MODEL
    evaluator: str = "loglik"
    val_examples: int = 100
    test_top: int = 3
    test_examples: int | None = DEFAULT_TEST_EXAMPLES  # None: every test row
    device: str | None = None
    dtype: str | None = None


def load_config(path: str | Path) -> BenchConfig:
    """Read and check a bench config; every problem is a ConfigError naming the file and key."""
    path = Path(path)
    raw = _read(path)

    def fail(key: str, message: str) -> ConfigError:
        return ConfigError(f"{path}: {key!r} {message}")

    unknown = [k for k in raw if k not in KEYS]
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r} (valid keys: {', '.join(KEYS)})")
    for key in ("tasks", "searchers", "budget"):
        if key not in raw:
            raise ConfigError(f"{path}: missing key {key!r}")
    base = path.resolve().parent
    settings = _settings(raw, fail)
    if "model" in settings:
        settings["model"] = _relative_to(settings["model"], base)
    out = base / Path(settings.pop("out", f"{path.stem}-results")).expanduser()
    storage = settings.pop("storage", f"sqlite:///{out / 'studies.db'}")
    return BenchConfig(
        path=path,
        tasks=[_relative_to(t, base) for t in _tasks(raw["tasks"], fail)],
        searchers=_searchers(raw["searchers"], fail),
        seeds=_seeds(raw.get("seeds", [0]), fail),
        out=out,
        storage=storage,
        **settings,
    )


def _read(path: Path) -> dict[str, Any]:
    """The config file's object of settings (JSON, or TOML for *.toml)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the config ({err})") from None
    if path.suffix == ".toml":
        try:
            import tomllib  # Python 3.11+
        except ImportError:
            raise ConfigError(f"{path}: TOML configs need Python 3.11 or later; use JSON") from None
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: not valid TOML ({err})") from None
    else:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected an object of settings, got {type(raw).__name__}")
    return raw


def _settings(raw: dict[str, Any], fail) -> dict[str, Any]:
    """The counts and strings among the keys, checked."""
    settings: dict[str, Any] = {}
    for key in COUNTS:
        if key in raw:
            value = raw[key]
            if key == "test_examples" and value == "all":
                settings[key] = None
                continue
            if not _is_int(value) or value < 1:
                also = ' or "all"' if key == "test_examples" else ""
                raise fail(key, f"must be a positive integer{also}, got {value!r}")
            settings[key] = value
    for key in STRINGS:
        if key in raw:
            if not isinstance(raw[key], str) or not raw[key].strip():
                raise fail(key, f"must be a non-empty string, got {raw[key]!r}")
            settings[key] = raw[key]
    return settings


def _tasks(tasks: Any, fail) -> list[str]:
    if not isinstance(tasks, list) or not tasks:
        raise fail("tasks", "must be a non-empty list of task paths or bundled task names")
    for i, task in enumerate(tasks):
        if not isinstance(task, str) or not task.strip():
            raise fail(f"tasks[{i}]", f"must be a task path or bundled task name, got {task!r}")
    return tasks


def _seeds(seeds: Any, fail) -> list[int]:
    if not isinstance(seeds, list) or not seeds or not all(_is_int(s) for s in seeds):
        raise fail("seeds", f"must be a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) < len(seeds):
        raise fail("seeds", f"lists a seed twice: {seeds!r}")
    return list(seeds)


def _searchers(entries: Any, fail) -> list[SearcherSpec]:
    if not isinstance(entries, list) or not entries:
        raise fail("searchers", "must be a non-empty list of searcher names or objects")
    specs: list[SearcherSpec] = []
    for i, entry in enumerate(entries):
        spec = _searcher(f"searchers[{i}]", entry, fail)
        if spec.label in {s.label for s in specs}:
            raise fail(
                f"searchers[{i}]",
                f"repeats label {spec.label!r}; give one of them a distinct 'label'",
            )
        specs.append(spec)
    return specs


def _searcher(key: str, entry: Any, fail) -> SearcherSpec:
    """One entry of 'searchers': a name, or {"name", "label", "options"}."""
    from ape.search.base import get_searcher, searcher_class

    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, dict):
        raise fail(key, f"must be a searcher name or an object, got {entry!r}")
    unknown = [k for k in entry if k not in SEARCHER_KEYS]
    if unknown:
        raise fail(key, f"has unknown key {unknown[0]!r} (valid: {', '.join(SEARCHER_KEYS)})")
    name, label = entry.get("name"), entry.get("label", entry.get("name"))
    options = entry.get("options", {})
    if not isinstance(name, str) or not name:
        raise fail(key, f"needs a 'name' (a searcher name), got {name!r}")
    if not isinstance(label, str) or not re.fullmatch(r"[\w.+-]+", label):
        raise fail(f"{key}.label", f"must be letters, digits, '_', '.', '+' or '-': {label!r}")
    if not isinstance(options, dict):
        raise fail(f"{key}.options", f"must be an object, got {options!r}")
    try:
        schema = {o.name: o for o in options_of(searcher_class(name))}
        # the CLI's schema checks each value; unknown names are left to get_searcher's message
        options = {k: schema[k].from_config(v) if k in schema else v for k, v in options.items()}
        get_searcher(name, **options)  # unknown options and bad values fail here
    except (ValueError, TypeError) as err:
        raise fail(key, f"({name}): {err}") from None
    return SearcherSpec(label, name, options)


def _relative_to(entry: str, base: Path) -> str:
    """`entry` under `base` when it exists there; else as given (cwd-relative, or a name)."""
    path = Path(entry).expanduser()
    if not path.is_absolute() and (base / path).exists():
        return str((base / path).resolve())
    return str(path) if path.is_absolute() else entry
