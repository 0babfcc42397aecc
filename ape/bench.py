"""`ape bench CONFIG`: searchers x tasks x seeds at one equal budget, and the evidence.

A config file, JSON (or TOML when it ends in ``.toml``), names the grid::

    {
      "tasks": ["antonyms", "../data/sum"],     # task paths or bundled task names (required)
      "searchers": ["none",                     # names, or objects with options (required)
                    {"name": "ape", "options": {"num_subsamples": 2}},
                    {"name": "ape", "label": "ape-r0", "options": {"resample_rounds": 0}}],
      "seeds": [0, 1],                          # default [0]
      "budget": 1500,                           # units per run: scored pairs + generated tokens
      "model": "smollm2-135m",                  # default; a name, .gguf file, directory or hub id
      "evaluator": "loglik",                    # default
      "out": "results",                         # default: <config stem>-results beside the config
      "storage": "sqlite:///...",               # default: sqlite:///OUT/studies.db
      "val_examples": 100, "test_top": 3,       # as in optimize() (defaults shown)
      "test_examples": 500,                     # as in optimize() (default: every test row)
      "device": "cpu", "dtype": "float32"       # default: as load_model chooses
    }

A relative task or model path is taken from the config file's folder when it exists there, else
from the working directory (then a bundled task name); a relative `out` is always beside the
config. A searcher listed twice needs a distinct `label`, which names its runs.

The model loads once. Each run is ``optimize(task, model, searcher, evaluator, budget, seed)`` in
its own study ``<task>-<label>-seed<seed>``, so no run reuses another's scores (fair wall times),
and it writes ``OUT/runs/<task>-<label>-seed<seed>.json``. A run whose file exists is skipped, so
an interrupted bench continues; a run cut off midway resumes from its study in the storage.

Then ``OUT/summary.md`` and ``OUT/summary.json`` (mean ± std across seeds of each searcher's best
prompt's test and validation score, budget used, wall time, per-task wins) and
``OUT/plots/<task>.png`` (best validation score so far against budget spent, one line per
searcher; needs matplotlib, the ``plot`` extra).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ape.device import machine_line
from ape.models import DEFAULT_MODEL
from ape.result import Result, finite
from ape.task import TaskError

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
    test_examples: int | None = None
    device: str | None = None
    dtype: str | None = None


@dataclass(frozen=True)
class Run:
    """One cell of the grid."""

    task: str  # the task's name
    source: str
    searcher: SearcherSpec
    seed: int
    path: Path  # its result JSON

    @property
    def name(self) -> str:
        return f"{_safe(self.task)}-{self.searcher.label}-seed{self.seed}"


@dataclass
class Summary:
    markdown: str
    data: dict[str, Any]
    files: list[Path]


# ----------------------------------------------------------------------------------- the config
def load_config(path: str | Path) -> BenchConfig:
    """Read and check a bench config; every problem is a ConfigError naming the file and key."""
    path = Path(path)
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
    unknown = [k for k in raw if k not in KEYS]
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r} (valid keys: {', '.join(KEYS)})")
    for key in ("tasks", "searchers", "budget"):
        if key not in raw:
            raise ConfigError(f"{path}: missing key {key!r}")

    def fail(key: str, message: str) -> ConfigError:
        return ConfigError(f"{path}: {key!r} {message}")

    base = path.resolve().parent
    tasks = raw["tasks"]
    if not isinstance(tasks, list) or not tasks:
        raise fail("tasks", "must be a non-empty list of task paths or bundled task names")
    for i, task in enumerate(tasks):
        if not isinstance(task, str) or not task.strip():
            raise fail(f"tasks[{i}]", f"must be a task path or bundled task name, got {task!r}")
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(_is_int(s) for s in seeds):
        raise fail("seeds", f"must be a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) < len(seeds):
        raise fail("seeds", f"lists a seed twice: {seeds!r}")
    settings: dict[str, Any] = {}
    for key, minimum in (("budget", 1), ("val_examples", 1), ("test_top", 1), ("test_examples", 1)):
        if key in raw:
            value = raw[key]
            if not _is_int(value) or value < minimum:
                raise fail(key, f"must be a positive integer, got {value!r}")
            settings[key] = value
    for key in ("model", "evaluator", "out", "storage", "device", "dtype"):
        if key in raw:
            if not isinstance(raw[key], str) or not raw[key].strip():
                raise fail(key, f"must be a non-empty string, got {raw[key]!r}")
            settings[key] = raw[key]
    if "model" in settings:
        settings["model"] = _relative_to(settings["model"], base)
    out = base / Path(settings.pop("out", f"{path.stem}-results")).expanduser()
    storage = settings.pop("storage", f"sqlite:///{out / 'studies.db'}")
    return BenchConfig(
        path=path,
        tasks=[_relative_to(t, base) for t in tasks],
        searchers=_searchers(raw["searchers"], fail),
        seeds=list(seeds),
        out=out,
        storage=storage,
        **settings,
    )


def _searchers(entries: Any, fail) -> list[SearcherSpec]:
    from ape.search.base import field_type, get_searcher, searcher_class

    if not isinstance(entries, list) or not entries:
        raise fail("searchers", "must be a non-empty list of searcher names or objects")
    specs: list[SearcherSpec] = []
    for i, entry in enumerate(entries):
        key = f"searchers[{i}]"
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
            cls = searcher_class(name)
            fields = {f.name: f for f in dataclasses.fields(cls)}
            options = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
            for option, value in options.items():
                if option in fields and not _fits(field_type(cls, fields[option]), value):
                    raise ValueError(f"option {option!r} has the wrong type: {value!r}")
            get_searcher(name, **options)  # unknown options and bad values fail here
        except (ValueError, TypeError) as err:
            raise fail(key, f"({name}): {err}") from None
        if label in {s.label for s in specs}:
            raise fail(key, f"repeats label {label!r}; give one of them a distinct 'label'")
        specs.append(SearcherSpec(label, name, options))
    return specs


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fits(kind: Any, value: Any) -> bool:
    """Whether a JSON/TOML value suits a searcher field typed `kind` (other types: not checked)."""
    if kind is int:
        return _is_int(value)
    if kind is float:
        return _is_int(value) or isinstance(value, float)
    if kind is str:
        return isinstance(value, str)
    if kind == tuple[str, ...]:
        return isinstance(value, tuple) and all(isinstance(v, str) for v in value)
    return True


def _relative_to(entry: str, base: Path) -> str:
    """`entry` under `base` when it exists there; else as given (cwd-relative, or a name)."""
    path = Path(entry).expanduser()
    if not path.is_absolute() and (base / path).exists():
        return str((base / path).resolve())
    return str(path) if path.is_absolute() else entry


# ----------------------------------------------------------------------------------- the grid
def plan(config: BenchConfig) -> list[Run]:
    """The grid's runs, task by task; tasks, the evaluator and finished runs are checked first."""
    from ape.evaluation import make_evaluator
    from ape.task import load_task

    names: dict[str, int] = {}
    for i, source in enumerate(config.tasks):
        try:
            task = load_task(source, seed=config.seeds[0])
        except TaskError as err:
            raise ConfigError(f"{config.path}: 'tasks[{i}]': {err}") from None
        if task.name in names:
            raise ConfigError(
                f"{config.path}: 'tasks[{names[task.name]}]' and 'tasks[{i}]' are both named "
                f"{task.name!r}"
            )
        names[task.name] = i
        try:
            make_evaluator(config.evaluator, task)
        except ValueError as err:
            raise ConfigError(f"{config.path}: 'evaluator': {err}") from None
    runs = [
        Run(
            task,
            config.tasks[i],
            spec,
            seed,
            config.out / "runs" / f"{_safe(task)}-{spec.label}-seed{seed}.json",  # = Run.name
        )
        for task, i in names.items()
        for spec in config.searchers
        for seed in config.seeds
    ]
    for run in runs:
        if run.path.is_file():
            _check_finished(config, run)
    return runs


def _check_finished(config: BenchConfig, run: Run) -> None:
    """A saved result must come from the same settings, or the summary would mix two benches."""
    result = Result.load(run.path)
    wanted = {
        "task": run.task,
        "searcher": run.searcher.name,
        "seed": run.seed,
        "budget": config.budget,
        "model": config.model,
        "evaluator": config.evaluator,
        "options": _plain(run.searcher.options),
    }
    differ = [k for k, v in wanted.items() if _plain(getattr(result, k)) != v]
    if differ:
        found = ", ".join(f"{k}={_plain(getattr(result, k))!r}" for k in differ)
        asked = ", ".join(f"{k}={wanted[k]!r}" for k in differ)
        raise ConfigError(
            f"{run.path} was run with {found}, but {config.path} asks for {asked}; delete it "
            "(or choose another 'out') to run it again"
        )


def run_bench(config: BenchConfig, *, progress: bool = True) -> Summary:
    """Run every missing run of the grid (the model loads once), then write the summary.

    Ctrl-C raises KeyboardInterrupt; finished runs are saved, and the run that was cut off keeps
    what it scored in the storage, so running the bench again continues.
    """
    from ape.api import optimize
    from ape.models import load_model

    runs = plan(config)
    pending = [r for r in runs if not r.path.is_file()]
    if pending:
        lm = load_model(config.model, device=config.device, dtype=config.dtype)
        bar = tqdm(
            total=len(runs),
            initial=len(runs) - len(pending),
            desc="bench",
            unit="run",
            disable=not progress,
            dynamic_ncols=True,
        )
        with bar:
            for run in pending:
                bar.set_postfix_str(run.name)
                try:
                    result = optimize(
                        run.source,
                        model=lm,
                        searcher=run.searcher.name,
                        evaluator=config.evaluator,
                        budget=config.budget,
                        seed=run.seed,
                        storage=config.storage,
                        study=run.name,
                        val_examples=config.val_examples,
                        test_top=config.test_top,
                        test_examples=config.test_examples,
                        progress=progress,
                        **run.searcher.options,
                    )
                except (TaskError, ValueError) as err:
                    raise ValueError(f"run {run.name}: {err}") from err
                result.save(run.path)
                if progress:
                    tqdm.write(f"{run.name}: {_describe(result)}")
                bar.update(1)
    return summarize(config, runs)


def _describe(result: Result) -> str:
    best = result.best
    val = "-" if best is None or best.val_score is None else f"{best.val_score:.4f}"
    test = "-" if best is None or best.test_score is None else f"{best.test_score:.4f}"
    seconds = result.timings.get("total_s", 0.0)
    return f"val {val}, test {test}, {result.budget_used} units, {seconds:.0f} s"


# ----------------------------------------------------------------------------------- the summary
def summarize(config: BenchConfig, runs: list[Run] | None = None) -> Summary:
    """Write OUT/summary.md, OUT/summary.json and OUT/plots/*.png from the saved results."""
    runs = plan(config) if runs is None else runs
    results = {run.name: Result.load(run.path) for run in runs if run.path.is_file()}
    tasks = list(dict.fromkeys(r.task for r in runs))
    labels = [s.label for s in config.searchers]

    rows = []
    for task in tasks:
        for label in labels:
            done = [
                (r, results[r.name])
                for r in runs
                if r.name in results and r.task == task and r.searcher.label == label
            ]
            if done:
                rows.append(_row(task, label, done))
    wins: dict[str, list[str]] = {}
    for task in tasks:
        scored = [r for r in rows if r["task"] == task and r["test_mean"] is not None]
        top = max((r["test_mean"] for r in scored), default=None)
        wins[task] = [r["searcher"] for r in scored if r["test_mean"] == top]
    win_counts = {label: sum(label in w for w in wins.values()) for label in labels}
    curves = {
        task: _curves([(r, results[r.name]) for r in runs if r.name in results and r.task == task])
        for task in tasks
    }

    files = []
    plots = _plot(config, curves)
    files += plots
    data = {
        "config": str(config.path),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": config.model,
        "evaluator": config.evaluator,
        "budget": config.budget,
        "seeds": config.seeds,
        "searchers": [dataclasses.asdict(s) for s in config.searchers],
        "tasks": tasks,
        "rows": rows,
        "wins": wins,
        "win_counts": win_counts,
        "curves": curves,
        "missing": [r.name for r in runs if r.name not in results],
    }
    machines = []  # distinct, in run order
    for result in results.values():
        if result.machine and result.machine not in machines:
            machines.append(result.machine)
    data["machines"] = machines
    markdown = _markdown(config, rows, wins, win_counts, plots, data["missing"], machines)
    config.out.mkdir(parents=True, exist_ok=True)
    md, js = config.out / "summary.md", config.out / "summary.json"
    md.write_text(markdown, encoding="utf-8")
    js.write_text(json.dumps(finite(data), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return Summary(markdown, data, [md, js, *files])


def _row(task: str, label: str, done: list[tuple[Run, Result]]) -> dict[str, Any]:
    def stats(values: list[float | None]) -> tuple[float | None, float | None]:
        values = [v for v in values if v is not None and math.isfinite(v)]
        if not values:
            return None, None
        std = float(np.std(values, ddof=1)) if len(values) > 1 else None
        return float(np.mean(values)), std

    tests = [res.best.test_score if res.best else None for _, res in done]
    vals = [res.best.val_score if res.best else None for _, res in done]
    test_mean, test_std = stats(tests)
    val_mean, val_std = stats(vals)
    return {
        "task": task,
        "searcher": label,
        "test_mean": test_mean,
        "test_std": test_std,
        "val_mean": val_mean,
        "val_std": val_std,
        "budget_used_mean": float(np.mean([res.budget_used for _, res in done])),
        "wall_s_median": float(np.median([res.timings.get("total_s", 0.0) for _, res in done])),
        "runs": [
            {
                "seed": run.seed,
                "file": str(run.path),
                "test": test,
                "val": val,
                "budget_used": res.budget_used,
                "wall_s": res.timings.get("total_s"),
                "instruction": res.best.instruction if res.best else None,
                "demos": len(res.best.demos) if res.best else 0,
            }
            for (run, res), test, val in zip(done, tests, vals, strict=True)
        ],
    }


def _curves(done: list[tuple[Run, Result]]) -> dict[str, Any]:
    """Per searcher, best validation score so far on one budget grid: mean, min and max over seeds.

    The grid is every budget at which some run's best changed, plus where each run stopped; each
    run's curve is a step function (its value holds until the next point, and after the run
    stopped), undefined (NaN) before its first scored candidate. Mean, min and max are taken
    where every seed is defined.
    """
    done = [(run, res) for run, res in done if res.history]
    grid = sorted({b for _, res in done for b, _ in res.history} | {r.budget_used for _, r in done})
    xs = np.array(grid, dtype=float)
    curves: dict[str, Any] = {"budget": grid, "searchers": {}}
    by_label: dict[str, list[np.ndarray]] = {}
    for run, res in done:
        by_label.setdefault(run.searcher.label, []).append(step(res.history, xs))
    for label, ys in by_label.items():
        stack = np.stack(ys)
        curves["searchers"][label] = {
            "mean": stack.mean(axis=0).tolist(),
            "min": stack.min(axis=0).tolist(),
            "max": stack.max(axis=0).tolist(),
            "seeds": len(ys),
        }
    return curves


def step(history: list[list[float]], xs: np.ndarray) -> np.ndarray:
    """The step function through `history` ([budget, value] points) at budgets `xs`."""
    budgets = np.array([b for b, _ in history], dtype=float)
    values = np.array([v for _, v in history], dtype=float)
    index = np.searchsorted(budgets, xs, side="right") - 1
    return np.where(index >= 0, values[np.clip(index, 0, None)], np.nan)


def _plot(config: BenchConfig, curves: dict[str, dict[str, Any]]) -> list[Path]:
    """One PNG per task; skipped with a one-line warning when matplotlib is missing."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print(
            "ape: warning: matplotlib is not installed, so no plots were drawn "
            "(pip install 'ape-optimizer[plot]')",
            file=sys.stderr,
        )
        return []
    written = []
    for task, curve in curves.items():
        if not curve["searchers"]:
            continue
        figure = Figure(figsize=(7, 4.5), layout="constrained")
        axes = figure.add_subplot()
        xs = curve["budget"]
        for label, line in curve["searchers"].items():
            (drawn,) = axes.plot(xs, line["mean"], drawstyle="steps-post", label=label)
            if line["seeds"] > 1:
                axes.fill_between(
                    xs, line["min"], line["max"], step="post", alpha=0.15, color=drawn.get_color()
                )
        seeds = len(config.seeds)
        model = Path(config.model).name if Path(config.model).exists() else config.model
        axes.set_title(f"{task}: best validation score so far ({model})")
        axes.set_xlabel("budget spent (scored pairs + generated tokens)")
        axes.set_ylabel(
            f"{config.evaluator}, mean of {seeds} seed{'s' if seeds > 1 else ''}"
            + (" (band: min-max)" if seeds > 1 else "")
        )
        axes.grid(alpha=0.3)
        axes.legend()
        target = config.out / "plots" / f"{_safe(task)}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(target, dpi=120)
        written.append(target)
    return written


def _markdown(config, rows, wins, win_counts, plots, missing, machines) -> str:
    def fmt(mean: float | None, std: float | None, digits: int = 4) -> str:
        if mean is None:
            return "-"
        return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")

    seeds = ", ".join(str(s) for s in config.seeds)
    lines = [
        f"# Benchmark: {config.path.name}",
        "",
        f"Model {config.model}, evaluator {config.evaluator}, budget {config.budget} units per "
        f"run (scored pairs + generated tokens), seeds {seeds}. Scores are means across seeds "
        "± sample standard deviation; *test* is each run's best prompt (chosen on validation) "
        "scored once on the test split. **Bold**: the best mean test score of the task.",
        "",
        *(f"Timed on: {machine_line(m)}." for m in machines),
        "",
        "| task | searcher | test | val | budget used | wall s (median) | runs |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        test = fmt(row["test_mean"], row["test_std"])
        if row["searcher"] in wins.get(row["task"], []):
            test = f"**{test}**"
        lines.append(
            f"| {row['task']} | {row['searcher']} | {test} | "
            f"{fmt(row['val_mean'], row['val_std'])} | {row['budget_used_mean']:.0f} | "
            f"{row['wall_s_median']:.1f} | {len(row['runs'])} |"
        )
    lines += ["", "## Wins per searcher", "", "| searcher | wins | tasks |", "|---|---:|---|"]
    for label, count in sorted(win_counts.items(), key=lambda kv: -kv[1]):
        won = ", ".join(t for t, w in wins.items() if label in w)
        lines.append(f"| {label} | {count} | {won} |")
    if missing:
        lines += ["", f"Missing runs ({len(missing)}): {', '.join(missing)}"]
    if plots:
        lines += ["", "## Best validation score against budget spent", ""]
        lines += [f"![{p.stem}](plots/{p.name})" for p in plots]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------- helpers
def _safe(name: str) -> str:
    """A name usable in a file name."""
    return re.sub(r"[^\w.+-]", "_", name)


def _plain(value: Any) -> Any:
    """Tuples as lists, as JSON stores them (to compare a saved result with the config)."""
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
