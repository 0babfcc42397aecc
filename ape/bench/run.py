"""Running the grid: the model loads once; a run whose result is saved is skipped."""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm

from ape.bench.config import BenchConfig
from ape.bench.grid import Run, plan
from ape.bench.summary import Summary, summarize
from ape.result import Result
from ape.task import TaskError


def run_bench(config: BenchConfig, *, progress: bool = True) -> Summary:
    """Run every missing run of the grid (the model loads once), then write the summary.

    Ctrl-C raises KeyboardInterrupt; finished runs are saved, and the run that was cut off keeps
    what it scored in the storage, so running the bench again continues.
    """
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
                result = _run_one(config, run, lm, progress)
                result.save(run.path)
                if progress:
                    tqdm.write(f"{run.name}: {_describe(result)}")
                bar.update(1)
    return summarize(config, runs)


def _run_one(config: BenchConfig, run: Run, lm: Any, progress: bool) -> Result:
    """optimize() for one cell, in its own study so no run reuses another's scores."""
    from ape.api import optimize  # looked up at call time, so tests can replace it

    try:
        return optimize(
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


def _describe(result: Result) -> str:
    best = result.best
    val = "-" if best is None or best.val_score is None else f"{best.val_score:.4f}"
    test = "-" if best is None or best.test_score is None else f"{best.test_score:.4f}"
    seconds = result.timings.get("total_s", 0.0)
    return f"val {val}, test {test}, {result.budget_used} units, {seconds:.0f} s"
