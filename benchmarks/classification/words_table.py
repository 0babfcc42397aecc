"""Each classification method with the task's given label words and with label-word search, in
one table: test accuracy mean ± std over seeds per set, the mean of the sets, and each method's
median seconds per run.

Usage:
    python benchmarks/classification/words_table.py [--given-soft DIR ...] [--searched-soft DIR ...]
        [--manual DIR] [--none DIR] [--out benchmarks/results/classification/words.md]

Soft rows (prompt tuning, prefix tuning, P-tuning) are `run_soft.py` runs replayed under the
default acceptance rule (replay_acceptance.py), with the given words from `--given-soft` and with
`--option label_words='"search"'` from `--searched-soft` (default: soft-words and soft-words-b
to -f, the folders of processes run side by side, each with its own study storage). Manual-prompt
and no-prompt rows are `run_label_words.py` runs (`--prompt manual` / `--prompt none`): the given
words and the default word search (train+dev, all sources, acceptance test), uncalibrated as
`choice` scores by default.
Seconds: training (word search included) for soft rows, the word search for fixed prompts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from replay_acceptance import RULES, collect, outcome  # noqa: E402
from run import DATASETS, mean_std  # noqa: E402
from run_label_words import DEFAULT_VARIANT, test_of  # noqa: E402
from run_soft import MODES  # noqa: E402

RESULTS = Path("benchmarks/results/classification")
DEFAULT_RULE = RULES["sign test or below chance (default)"]

# (dataset, seed) -> test accuracy, and the seconds per run, for one table row
Row = tuple[dict[tuple[str, int], float], list[float]]


def soft_rows(folders: list[Path], seeds: set[int] | None) -> dict[str, Row]:
    runs, _ = collect(folders)
    rows: dict[str, Row] = {mode: ({}, []) for mode in MODES}
    for (dataset, seed, mode), run in runs.items():
        if seeds and seed not in seeds:
            continue
        value = outcome(run, *DEFAULT_RULE)
        if value is not None:  # a rule-accepted checkpoint never scored on test: unknown
            rows[mode][0][(dataset, seed)] = value
            rows[mode][1].append(run["train_seconds"])
    return rows


def fixed_rows(folder: Path, seeds: set[int] | None) -> dict[str, Row]:
    given: Row = ({}, [])
    searched: Row = ({}, [])
    for path in sorted((folder / "runs").glob("*-seed*.json")):
        run = json.loads(path.read_text())
        if seeds and run["seed"] not in seeds:
            continue
        if "test" not in run["chosen"]["uncalibrated"].get("given", {}):
            continue  # searched, not yet scored on test (run_label_words.py scores at the end)
        key = (run["dataset"], run["seed"])
        given[0][key] = test_of(run, "uncalibrated", "given")
        searched[0][key] = test_of(run, "uncalibrated", DEFAULT_VARIANT)
        searched[1].append(run["search_s"])
    return {"given": given, "searched": searched}


def cell(values: list[float]) -> str:
    return f"{mean_std(values)} ({len(values)})" if values else "–"


def table(rows: dict[tuple[str, str], Row]) -> str:
    lines = [
        "| method | label words | "
        + " | ".join(DATASETS)
        + " | mean of sets | s per run (median) |",
        "|---|---|" + "---:|" * (len(DATASETS) + 2),
    ]
    for (method, words), (scores, seconds) in rows.items():
        per_set = [[v for (d, _), v in scores.items() if d == dataset] for dataset in DATASETS]
        complete = all(per_set)
        mean = f"{np.mean([np.mean(v) for v in per_set]):.3f}" if complete else "–"
        median = f"{np.median(seconds):.0f}" if seconds else "–"
        lines.append(
            f"| {method} | {words} | "
            + " | ".join(cell(v) for v in per_set)
            + f" | {mean} | {median} |"
        )
    return "\n".join(lines) + "\n"


def gains(rows: dict[tuple[str, str], Row]) -> str:
    """Per method: on how many sets searched words beat the given ones (mean over shared seeds)."""
    lines = []
    methods = dict.fromkeys(method for method, _ in rows)
    for method in methods:
        given, searched = rows.get((method, "given")), rows.get((method, "searched"))
        if not given or not searched:
            continue
        wins, compared = 0, 0
        for dataset in DATASETS:
            both = [k for k in searched[0] if k[0] == dataset and k in given[0]]
            if not both:
                continue
            compared += 1
            wins += np.mean([searched[0][k] for k in both]) > np.mean([given[0][k] for k in both])
        lines.append(f"- {method}: searched > given on {wins} of {compared} sets (same seeds)")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--given-soft",
        nargs="+",
        type=Path,
        default=[
            RESULTS / n for n in ("soft-any", "soft-prefix-lr0.02", "soft-accept-any", "soft")
        ],
    )
    parser.add_argument(
        "--searched-soft",
        nargs="+",
        type=Path,
        default=[RESULTS / f"soft-words{tail}" for tail in ("", "-b", "-c", "-d", "-e", "-f")],
    )
    parser.add_argument("--manual", type=Path, default=RESULTS / "label_words")
    parser.add_argument("--none", type=Path, default=RESULTS / "label_words-none")
    parser.add_argument("--seeds", help="only these seeds (default: every seed found)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    seeds = {int(s) for s in args.seeds.split(",")} if args.seeds else None
    given, searched = soft_rows(args.given_soft, seeds), soft_rows(args.searched_soft, seeds)
    rows: dict[tuple[str, str], Row] = {}
    for mode, name in MODES.items():
        rows[(name, "given")] = given[mode]
        rows[(name, "searched")] = searched[mode]
    for name, folder in (("manual prompt", args.manual), ("no prompt", args.none)):
        for words, row in fixed_rows(folder, seeds).items():
            rows[(name, words)] = row
    text = (
        "Test accuracy on 300 test rows, mean ± std over seeds (runs in parentheses); soft rows "
        "under the default acceptance rule.\n\n" + table(rows) + "\n" + gains(rows)
    )
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
