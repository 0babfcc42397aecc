"""What each acceptance rule for soft-prompt checkpoints would have ended at, replayed exactly from
runs that recorded their evidence.

Usage:
    python benchmarks/classification/replay_acceptance.py DIR [DIR ...] [--seeds 13,21]
        [--out benchmarks/results/classification/soft-acceptance.md]

Acceptance happens after training (search/soft/training.py `Checkpoints.finish`): the checkpoint
with the lowest validation loss is held to the initial prompt, and the run ends at it if accepted,
else at the initial prompt. Training is the same whatever the rule, so a run that accepted its
checkpoint (`run_soft.py --option accept_p=1.0`: a higher dev mean suffices) tells what every
rule ends at: the checkpoint's test accuracy where that rule accepts, the start's where it
rejects. Each DIR holds `run_soft.py` per-run summaries; for a (dataset, seed, mode) found in
several, the first DIR given wins. A run whose rule-accepted checkpoint was never scored on test
(it was rejected in that run) is counted as unknown, never guessed.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ape.search.acceptance import ACCEPT_P, label_entropy, passes  # noqa: E402
from run import DATASETS, load, mean_std  # noqa: E402
from run_soft import MODES  # noqa: E402

# name: (sign-test level, whether a loss below the labels' entropy also counts); level 0: never
RULES = {
    "higher dev mean": (1.0, False),
    f"sign test (p < {ACCEPT_P})": (ACCEPT_P, False),
    "below chance": (0.0, True),
    "sign test or below chance (default)": (ACCEPT_P, True),
}


@functools.cache
def dev_entropy(dataset: str, seed: int) -> float:
    """The seed's dev labels' entropy (read once per set and seed, not once per rule)."""
    return label_entropy([ex.output for ex in load(dataset, seed, 0).val])


def evidence(run: dict) -> dict | None:
    """The picked checkpoint's evidence, or None when the start itself had the lowest loss."""
    accept = run.get("acceptance")
    if not accept:
        return None
    losses = {c["step"]: c["val_loss"] for c in run["checkpoints"]}
    chance = dev_entropy(run["dataset"], run["seed"])
    # Runs before `better` was recorded: an accepted checkpoint had a higher mean; else unknown.
    better = accept.get("better", True if accept["accepted"] else None)
    return {
        "better": better,
        "p_value": accept["p_value"],
        "below": losses[accept["step"]] < chance,
        # the test accuracy at the checkpoint, known only if the run accepted it
        "test": run["test"] if accept["accepted"] else None,
    }


def outcome(run: dict, level: float, use_chance: bool) -> float | None:
    found = evidence(run)
    if found is None:
        return run["start_test"]
    below = use_chance and found["below"]
    if not passes(found["better"] is not False, found["p_value"], level, below):
        return run["start_test"]
    return found["test"]  # None: the rule accepts what its own run rejected (never on test)


def collect(dirs: list[Path]) -> tuple[dict[tuple, dict], dict[str, dict]]:
    """The runs by (dataset, seed, mode), and the manual / no prompt scores by dataset."""
    runs: dict[tuple, dict] = {}
    fixed: dict[str, dict] = {}
    for folder in dirs:
        for path in sorted((folder / "runs").glob("*-seed*.summary.json")):
            run = json.loads(path.read_text())
            runs.setdefault((run["dataset"], run["seed"], run["mode"]), run)
        for path in sorted((folder / "runs").glob("*-fixed.json")):
            found = json.loads(path.read_text())
            fixed.setdefault(found["dataset"], found)
    return runs, fixed


def report(runs: dict[tuple, dict]) -> str:
    seeds = sorted({key[1] for key in runs})
    lines = [
        f"Runs: {len(runs)} (seeds {', '.join(map(str, seeds))}). Per rule: test accuracy mean "
        "over seeds, then over the sets; runs below their start; runs not replayable.\n",
        "| rule | mode | " + " | ".join(DATASETS) + " | mean of sets | below start | unknown |",
        "|---|---|" + "---:|" * (len(DATASETS) + 3),
    ]
    for rule, (level, use_chance) in RULES.items():
        for mode, name in MODES.items():
            cells, means, below, unknown = [], [], 0, 0
            for dataset in DATASETS:
                values = []
                for (d, _, m), run in runs.items():
                    if (d, m) != (dataset, mode):
                        continue
                    value = outcome(run, level, use_chance)
                    if value is None:
                        unknown += 1
                        continue
                    values.append(value)
                    below += value < run["start_test"]
                cells.append(f"{np.mean(values):.3f} ({len(values)})" if values else "–")
                means.extend([float(np.mean(values))] if values else [])
            mean = f"{np.mean(means):.3f}" if len(means) == len(DATASETS) else "–"
            lines.append(
                f"| {rule} | {name} | " + " | ".join(cells) + f" | {mean} | {below} | {unknown} |"
            )
    return "\n".join(lines) + "\n"


def default_table(runs: dict[tuple, dict], fixed: dict[str, dict]) -> str:
    """Under the default rule: test accuracy mean ± std over seeds per set and mode, beside the
    manual prompt and no prompt, and how many runs end below their start."""
    level, use_chance = RULES["sign test or below chance (default)"]
    head = " | ".join(f"{name} (mean ± std)" for name in MODES.values())
    lines = [
        f"| dataset | seeds | {head} | manual prompt | no prompt | runs below their start |",
        "|---|---:|" + "---:|" * (len(MODES) + 3),
    ]
    means: dict[str, list[float]] = {m: [] for m in [*MODES, "manual", "none"]}
    for dataset in DATASETS:
        mine = {key: run for key, run in runs.items() if key[0] == dataset}
        if not mine or dataset not in fixed:
            continue
        cells, below, seeds = [], 0, {key[1] for key in mine}
        for mode in MODES:
            pairs = [
                (outcome(r, level, use_chance), r["start_test"])
                for (_, _, m), r in mine.items()
                if m == mode
            ]
            known = [v for v, _ in pairs if v is not None]
            below += sum(v < start for v, start in pairs if v is not None)
            cells.append(mean_std(known))
            means[mode].append(float(np.mean(known)) if known else float("nan"))
        manual, none = fixed[dataset]["manual_test"], fixed[dataset]["none_test"]
        means["manual"].append(manual)
        means["none"].append(none)
        lines.append(
            f"| {dataset} | {len(seeds)} | "
            + " | ".join(cells)
            + f" | {manual:.3f} | {none:.3f} | {below} of {len(mine)} |"
        )
    cells = " | ".join(f"{np.mean(means[m]):.3f}" for m in [*MODES, "manual", "none"])
    seconds = " | ".join(
        f"{np.median([r['train_seconds'] for k, r in runs.items() if k[2] == m]):.0f}"
        for m in MODES
    )
    lines.append(f"| mean of the sets | | {cells} | |")
    lines.append(f"| training s per run (median) | | {seconds} | – | – | |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path)
    parser.add_argument("--seeds", help="only these seeds (default: every seed found)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    runs, fixed = collect(args.dirs)
    if args.seeds:
        keep = {int(seed) for seed in args.seeds.split(",")}
        runs = {key: run for key, run in runs.items() if key[1] in keep}
    text = f"{report(runs)}\nUnder the default rule:\n\n{default_table(runs, fixed)}"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
