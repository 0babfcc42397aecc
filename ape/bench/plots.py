"""Plots: best validation score so far against budget spent, one PNG per task."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from ape.bench.config import BenchConfig
from ape.bench.grid import safe


def plot(config: BenchConfig, curves: dict[str, dict[str, Any]]) -> list[Path]:
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
        target = config.out / "plots" / f"{safe(task)}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(target, dpi=120)
        written.append(target)
    return written
