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
      "test_examples": 500,                     # as in optimize() (default 1000; "all": every row)
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

Modules: config (read and check the file), grid (the runs, checked before any runs), run (run the
missing ones), summary (tables and curves), plots.
"""

from ape.bench.config import (
    KEYS,
    SEARCHER_KEYS,
    BenchConfig,
    ConfigError,
    SearcherSpec,
    load_config,
)
from ape.bench.grid import Run, plan
from ape.bench.run import run_bench
from ape.bench.summary import Summary, step, summarize

__all__ = [
    "KEYS",
    "SEARCHER_KEYS",
    "BenchConfig",
    "ConfigError",
    "Run",
    "SearcherSpec",
    "Summary",
    "load_config",
    "plan",
    "run_bench",
    "step",
    "summarize",
]
