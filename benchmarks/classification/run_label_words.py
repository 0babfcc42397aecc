"""Label-word search and contextual calibration on the 16-shot classification sets, prompt fixed.

Usage:
    nice -n 10 python benchmarks/classification/run_label_words.py [--datasets sst-2,mr]
        [--seeds 13,21,42,87,100] [--test-rows 300] [--verify] [--prompt manual|none]
        [--out benchmarks/results/classification/label_words]

The prompt is held fixed: run.py's manual instruction for the set (`--prompt none`: no
instruction, results in label_words-none by default), no demos. Per dataset and
seed, the label words are searched (search/label_words.py) on the seed's train and dev splits,
once with uncalibrated and once with calibrated `choice` scoring, and every choice is scored on
the same fixed test subsample as run.py.

One search scores every candidate word once (`word_matrix`, the product's code, in a study per
dataset: studies.db). The calibrated search subtracts each candidate's content-free bias from
those scores, which is what `choice --calibrate` computes (evaluators/calibration.py); with
on the first seed of each dataset (every seed with --verify), the calibrated product search
is run too and must choose the same words. Variants of
the search (what it selects on, which candidate sources it may use) choose from the same scores,
so they cost no model time; on the first seed of each dataset, the default must be what
`search_label_words` returns.
The given words do not depend on the seed (fixed prompt, fixed test rows).

Phase 1 searches, seeds outermost, and writes runs/DATASET-seedSEED.json as each finishes;
phase 2 scores every word any run chose on test, one call per dataset (cached in
cache/DATASET-test.json), and fills in the accuracies. An interrupted run continues.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ape.evaluators.calibration import CONTENT_FREE, calibrated  # noqa: E402
from ape.search.label_words import (  # noqa: E402
    WordSearch,
    _selection,
    choose,
    propose,
    screened,
    search_label_words,
    word_matrix,
)
from run import DATASETS, MANUAL, REPO, load, mean_std  # noqa: E402  (the soft-prompt benchmark's data)

import ape  # noqa: E402
from ape.device import describe_machine, machine_line  # noqa: E402
from ape.evaluation import make_evaluator  # noqa: E402
from ape.objective import Objective  # noqa: E402
from ape.study import TrialStore  # noqa: E402
from ape.task import Example  # noqa: E402

OUT = REPO / "benchmarks" / "results" / "classification" / "label_words"
SEEDS = (13, 21, 42, 87, 100)
DEFAULT = WordSearch()
# The candidates every variant chooses from: all sources, whatever the default leaves out.
POOL = dataclasses.replace(DEFAULT, llr_words=max(DEFAULT.llr_words, 4), synonyms=4)
SOURCES = ("task", "synonym", "ratio")  # given word and label name; LM synonyms; LLR tokens
# Variants: (the examples they select on, the candidate sources they may use).
VARIANTS = {
    "train+dev, all": ("train+val", SOURCES),
    "dev, all": ("val", SOURCES),
    "train, all": ("train", SOURCES),
    "train+dev, no ratio tokens": ("train+val", ("task", "synonym")),
    "train+dev, no synonyms": ("train+val", ("task", "ratio")),
    "train+dev, task words only": ("train+val", ("task",)),
    "dev, no ratio tokens": ("val", ("task", "synonym")),
}


def variant_of(settings: WordSearch) -> str:
    """The variant that `settings` (the product's search) is."""
    used = (
        ("task",)
        + (("synonym",) if settings.synonyms else ())
        + (("ratio",) if settings.llr_words else ())
    )
    matches = [n for n, (on, src) in VARIANTS.items() if (on, src) == (settings.select_on, used)]
    return matches[0]


GUARDED = " + acceptance test"  # the best that passes search/acceptance.py against the given
DEFAULT_VARIANT = variant_of(DEFAULT) + GUARDED  # what the product's search returns first
SCORINGS = {"uncalibrated": False, "calibrated": True}
PROMPTS = {"manual": "run.py's manual instruction", "none": "no instruction"}
# Each fixed prompt has its own folder: its studies and test cache hold scores under that prompt.
OUTS = {"manual": OUT, "none": OUT.with_name("label_words-none")}


def objective_for(task: ape.Task, lm, calibrate: bool, out: Path) -> Objective:
    """An objective as `optimize` builds one, in a study per dataset and scoring; seed 0 for
    all data seeds, so the synonyms (generated from the label words alone) are replayed."""
    evaluator = make_evaluator("choice", task, calibrate=calibrate)
    study = f"{task.name}-{'calibrated' if calibrate else 'raw'}"
    fingerprint = {"model": lm.name, "evaluator": repr(evaluator), "task": task.name}
    store = TrialStore(f"sqlite:///{out / 'studies.db'}", study, fingerprint)
    return Objective(task, lm, evaluator, store, progress=False)


def candidates(objective: Objective, template: ape.Prompt):
    """The labels, the candidate pools and each candidate's source."""
    task = objective.task
    labels, given = objective.evaluator.label_words(task.train + task.val)
    pools = propose(objective, template, labels, given, POOL)
    plain = dataclasses.replace(POOL, llr_words=0)
    task_only = propose(objective, template, labels, given, dataclasses.replace(plain, synonyms=0))
    with_synonyms = propose(objective, template, labels, given, plain)
    sources = [
        ["task" if w in a else "synonym" if w in b else "ratio" for w in pool]
        for pool, a, b in zip(pools, task_only, with_synonyms, strict=True)
    ]
    return labels, pools, sources


def search_variants(objective: Objective, template: ape.Prompt, lm, check: bool) -> dict[str, Any]:
    """The words each variant chooses under each scoring, from one matrix of scored candidates
    (the calibrated one minus each word's content-free bias)."""
    labels, pools, sources = candidates(objective, template)
    examples = _selection(objective, "train+val")
    raw = word_matrix(objective, template, labels, pools, examples)  # stored, replayed
    width = raw.shape[2]
    columns = [
        template.with_label_words(
            {lb: p[min(k, len(p) - 1)] for lb, p in zip(labels, pools, strict=True)}
        )
        for k in range(width)
    ]
    free = [Example(text, labels[0]) for text in CONTENT_FREE]
    bias = objective.evaluator.label_logprobs(lm, columns, free).mean(axis=1)  # (width, labels)
    matrices = {"uncalibrated": raw, "calibrated": raw - bias.T[None]}
    rows_of = {
        "train+val": examples,
        "val": _selection(objective, "val"),
        "train": _selection(objective, "train"),
    }
    keys = [ex.key() for ex in examples]
    chosen: dict[str, Any] = {scoring: {} for scoring in SCORINGS}

    def restricted(matrix: np.ndarray, rows: list[Example], keep: list[list[int]]):
        """The rows' scores of the kept candidates (a class with fewer repeats its last)."""
        index = [keys.index(ex.key()) for ex in rows]
        gold = np.array([labels.index(ex.output) for ex in rows])
        sub = np.stack(
            [
                matrix[index][:, c, [*kept, *[kept[-1]] * (width - len(kept))]]
                for c, kept in enumerate(keep)
            ],
            axis=1,
        )
        return sub, gold

    for name, (select_on, allowed) in VARIANTS.items():
        keep = [[k for k, src in enumerate(tags) if src in allowed] for tags in sources]
        for scoring, matrix in matrices.items():
            sub, gold = restricted(matrix, rows_of[select_on], keep)
            ranked = choose(sub, gold, [len(k) for k in keep], DEFAULT)
            dev, dev_gold = restricted(matrix, rows_of["val"], keep)  # the product's test rows
            picks = {name: ranked[0][0]}  # the best on the selection examples
            picks[f"{name}{GUARDED}"] = next(  # the best that passes on dev, as the product
                p
                for p, _, _, gain in screened(dev, dev_gold, ranked, DEFAULT.accept_p)
                if gain is None or gain["accepted"]
            )
            for variant, best in picks.items():
                words = {
                    lb: pools[c][keep[c][k]]
                    for c, (lb, k) in enumerate(zip(labels, best, strict=True))
                }
                chosen[scoring][variant] = {"words": words}
    if check:  # the product's search (its scores replayed) chooses the default's words
        product = search_label_words(objective, template, DEFAULT)[0].mapping
        assert product == chosen["uncalibrated"][DEFAULT_VARIANT]["words"], product
    return {"pools": dict(zip(labels, pools, strict=True)), "sources": sources, "chosen": chosen}


class TestWords:
    """Raw test and content-free log-probs per (label, word), cached in a JSON file, so every
    assignment's accuracy, calibrated or not, follows without another model call."""

    def __init__(self, task: ape.Task, lm, template: ape.Prompt, path: Path):
        self.task, self.lm, self.template, self.path = task, lm, template, path
        self.cache: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
        self.seconds = 0.0

    def need(self, assignments: list[dict[str, str]]) -> None:
        """Score the (label, word) pairs of `assignments` not in the cache yet, in one call."""
        labels = self.task.labels
        todo: dict[str, list[str]] = {label: [] for label in labels}
        for words in assignments:
            for label in labels:
                word = words[label]
                if f"{label}\t{word}" not in self.cache and word not in todo[label]:
                    todo[label].append(word)
        width = max(len(words) for words in todo.values())
        if not width:
            return
        started = time.perf_counter()
        raw = make_evaluator("choice", self.task)  # uncalibrated: both scorings derive from it
        given = dict(zip(labels, raw.label_words(self.task.test)[1], strict=True))
        columns = [
            self.template.with_label_words(
                {
                    lb: todo[lb][min(k, len(todo[lb]) - 1)] if todo[lb] else given[lb]
                    for lb in labels
                }
            )
            for k in range(width)
        ]
        free = [Example(text, labels[0]) for text in CONTENT_FREE]
        grid = raw.label_logprobs(self.lm, columns, self.task.test + free)
        n = len(self.task.test)
        for k, column in enumerate(columns):
            for c, word in enumerate(raw.prompt_words(column, labels)):
                self.cache[f"{labels[c]}\t{word}"] = {
                    "test": grid[k, :n, c].tolist(),
                    "free": grid[k, n:, c].tolist(),
                }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.cache))
        self.seconds += time.perf_counter() - started

    def accuracy(self, words: dict[str, str], calibrate: bool) -> float:
        """Test accuracy of `words` after the template, as the `choice` evaluator scores it."""
        labels = self.task.labels
        rows = [self.cache[f"{label}\t{words[label]}"] for label in labels]
        test = np.array([r["test"] for r in rows]).T[None]  # (1, examples, labels)
        if calibrate:
            test = calibrated(test, np.array([r["free"] for r in rows]).T[None])
        gold = np.array([labels.index(ex.output) for ex in self.task.test])
        return float((test[0].argmax(axis=1) == gold).mean())


def template_for(dataset: str, args) -> ape.Prompt:
    """The fixed prompt the words are searched under: the manual instruction, or none at all."""
    return ape.Prompt(MANUAL[dataset] if args.prompt == "manual" else "")


def search_one(dataset: str, seed: int, lm, args, out: Path) -> dict[str, Any]:
    """Phase 1 for one dataset and seed: the words every variant chooses, under both scorings."""
    path = out / "runs" / f"{dataset}-seed{seed}.json"
    if path.exists():
        return json.loads(path.read_text())
    task = dataclasses.replace(load(dataset, seed, args.test_rows), name=dataset)
    template = template_for(dataset, args)
    labels, words = make_evaluator("choice", task).label_words(task.train)
    started = time.perf_counter()
    objective = objective_for(task, lm, False, out)
    record = {"dataset": dataset, "seed": seed, "given": dict(zip(labels, words, strict=True))}
    record |= search_variants(objective, template, lm, check=seed == args.seeds[0])
    record["search_s"] = round(time.perf_counter() - started, 1)
    record["budget_used"] = objective.budget.used
    record["search_seconds"] = {k: round(v, 1) for k, v in objective.seconds.items()}
    if args.verify or seed == args.seeds[0]:  # the calibrated product search agrees
        calibrated_run = objective_for(task, lm, True, out)
        found = search_label_words(calibrated_run, template, DEFAULT)[0].mapping
        assert found == record["chosen"]["calibrated"][DEFAULT_VARIANT]["words"], found
        record["verified_calibrated"] = True
    path.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    return record


def test_dataset(dataset: str, records: list[dict[str, Any]], lm, args, out: Path) -> None:
    """Phase 2 for one dataset: every chosen word scored on test in one call, then each run's
    test accuracies, written into its file."""
    task = dataclasses.replace(load(dataset, SEEDS[0], args.test_rows), name=dataset)
    cache = out / "cache" / f"{dataset}-test.json"
    tests = TestWords(task, lm, template_for(dataset, args), cache)
    wanted = [r["given"] for r in records] + [
        v["words"] for r in records for scoring in SCORINGS for v in r["chosen"][scoring].values()
    ]
    tests.need(wanted)
    for record in records:
        record["test_rows"] = len(task.test)
        for scoring, calibrate in SCORINGS.items():
            record["chosen"][scoring]["given"] = {"words": record["given"]}
            for entry in record["chosen"][scoring].values():
                entry["test"] = tests.accuracy(entry["words"], calibrate)
        record["test_scoring_s"] = round(tests.seconds, 1)
        path = out / "runs" / f"{dataset}-seed{record['seed']}.json"
        path.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")


def test_of(run: dict[str, Any], scoring: str, variant: str) -> float:
    return run["chosen"][scoring][variant]["test"]


def tables(rows: list[dict[str, Any]], datasets: list[str]) -> str:
    """The main table, the variants table and the per-run words."""
    lines = [
        "| dataset | seeds | given words | searched words | searched − given | given, "
        "calibrated | searched, calibrated | searched − given (calibrated) | calibrated − "
        "uncalibrated (given words) | search s / seed |\n|---|---:|---:|---:|---:|---:|---:|---:"
        "|---:|---:|\n"
    ]
    wins = {s: 0 for s in SCORINGS}
    names = [*VARIANTS, *(f"{v}{GUARDED}" for v in VARIANTS), "given"]
    variant_lines = [
        f"| dataset | scoring | {' | '.join(names)} |\n",
        "|---|---|" + "---:|" * len(names) + "\n",
    ]
    for dataset in datasets:
        runs = [r for r in rows if r["dataset"] == dataset and "test_rows" in r]
        if not runs:
            continue
        cells = []
        for scoring in SCORINGS:
            given = [test_of(r, scoring, "given") for r in runs]
            found = [test_of(r, scoring, DEFAULT_VARIANT) for r in runs]
            delta = statistics.mean(found) - statistics.mean(given)
            wins[scoring] += delta > 0
            cells += [mean_std(given), mean_std(found), f"{delta:+.3f}"]
            variant_lines.append(
                f"| {dataset} | {scoring} | "
                + " | ".join(mean_std([test_of(r, scoring, v) for r in runs]) for v in names)
                + " |\n"
            )
        calibration = statistics.mean(
            test_of(r, "calibrated", "given") - test_of(r, "uncalibrated", "given") for r in runs
        )
        seconds = statistics.mean(r["search_s"] for r in runs)
        lines.append(
            f"| {dataset} | {len(runs)} | {' | '.join(cells)} | {calibration:+.3f} | "
            f"{seconds:.0f} |\n"
        )
    summary = ", ".join(
        f"{scoring}: searched > given on {wins[scoring]} of {len(datasets)} sets"
        for scoring in SCORINGS
    )
    per_run = ["| dataset | seed | scoring | given test | searched test | searched words |\n"]
    per_run.append("|---|---:|---|---:|---:|---|\n")
    for r in rows:
        if "test_rows" not in r:
            continue
        for scoring in SCORINGS:
            default = r["chosen"][scoring][DEFAULT_VARIANT]
            words = ", ".join(f"{k}: {v}" for k, v in default["words"].items())
            per_run.append(
                f"| {r['dataset']} | {r['seed']} | {scoring} | "
                f"{test_of(r, scoring, 'given'):.3f} | {default['test']:.3f} | {words} |\n"
            )
    return (
        "".join(lines)
        + f"\n{summary} (mean over seeds; searched: the default search, {DEFAULT_VARIANT})."
        "\n\nSearch variants (test accuracy, mean ± std over "
        "seeds; all chosen from the same scored candidates):\n\n"
        + "".join(variant_lines)
        + "\nPer run (default search):\n\n"
        + "".join(per_run)
    )


def write(out: Path, rows: list[dict[str, Any]], args, started: float) -> None:
    env = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": "smollm2-135m (SmolLM2-135M-Instruct, float32)",
        "device": machine_line(describe_machine("cpu")),
        "load_average_1min": os.getloadavg()[0],
        "wall_s": round(time.perf_counter() - started, 1),
    }
    settings = {"datasets": args.datasets, "seeds": args.seeds, "test_rows": args.test_rows}
    settings["prompt"] = args.prompt
    settings["search"] = dataclasses.asdict(DEFAULT)
    settings["variants"] = {name: [on, list(src)] for name, (on, src) in VARIANTS.items()}
    (out / "summary.json").write_text(
        json.dumps({"env": env, "settings": settings, "runs": rows}, indent=2, ensure_ascii=False)
        + "\n"
    )
    (out / "summary.md").write_text(
        f"Label words searched for a fixed prompt ({PROMPTS[args.prompt]}, no demos) vs the "
        f"task's given words; test accuracy on a fixed {args.test_rows}-row subsample of each "
        f"test set, mean ± std over the seeds' train/dev splits (the given words do not depend "
        f"on the seed). Calibrated: contextual calibration (Zhao et al. 2021) as "
        f"`choice --calibrate` does it.\n{env['model']} on {env['device']}; {env['date']}; "
        f"load average {env['load_average_1min']:.1f} (a shared machine: times are upper "
        f"bounds); this invocation {env['wall_s']:.0f} s.\n\n" + tables(rows, args.datasets)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument("--test-rows", type=int, default=300)
    parser.add_argument("--out", type=Path, help="default: label_words, or label_words-none")
    parser.add_argument(
        "--prompt",
        choices=tuple(PROMPTS),
        default="manual",
        help="the fixed prompt: run.py's manual instruction, or no instruction",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="run the calibrated product search on every seed (default: the first)",
    )
    args = parser.parse_args()
    args.datasets = args.datasets.split(",")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    out: Path = args.out or OUTS[args.prompt]
    (out / "runs").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    lm = ape.load_model()
    rows = []
    # Seeds outermost: cut off at any point, every dataset has about as many seeds as the others.
    for seed in args.seeds:
        for dataset in args.datasets:
            rows.append(search_one(dataset, seed, lm, args, out))
            print(json.dumps({k: rows[-1][k] for k in ("dataset", "seed", "search_s")}), flush=True)
    for dataset in args.datasets:
        test_dataset(dataset, [r for r in rows if r["dataset"] == dataset], lm, args, out)
        write(out, rows, args, started)
        print(f"tested {dataset}", flush=True)


if __name__ == "__main__":
    main()
