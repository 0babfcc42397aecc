"""The scoring benchmark's workloads: (context, continuation) requests built from the Instruction
Induction data, deterministically.

Tasks are taken in sorted order; a task with fewer train rows than a workload needs is skipped.
Each prompt is paired with its task's first `n_examples` train rows.
- human: the first 2 human instructions of each task (meta.json): short contexts.
- ape-length: instructions of 10-20 words, the length APE's proposals have: the first 2 of that
  length on each task's leaderboard of the committed `ape` benchmark runs
  (benchmarks/results/instruction_induction/runs/TASK-ape-seed0.json).
- few-shot: the first 2 human instructions of each task, each with 5 demonstrations (train rows
  after the scored ones, a different 5 for each): what the whole-prompt search scores most.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ape
from ape.lm import Request
from ape.task import Example, read_examples

REPO = Path(__file__).resolve().parents[2]
APE_RUNS = REPO / "benchmarks" / "results" / "instruction_induction" / "runs"
PER_TASK = 2  # prompts per task
DEMOS = 5
WORKLOADS = ("human", "ape-length", "few-shot")


@dataclass
class Workload:
    requests: list[Request]
    prompts: list[dict[str, Any]]  # task, instruction (and demos) of each block of requests


def _tasks(data: Path, rows_needed: int) -> Iterator[tuple[str, list[Example], dict]]:
    for task_dir in sorted(p for p in data.iterdir() if (p / "train.jsonl").is_file()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # duplicate rows are kept; the warning is just noise
            train = read_examples(task_dir / "train.jsonl")
        if len(train) >= rows_needed:
            meta = json.loads((task_dir / "meta.json").read_text(encoding="utf-8"))
            yield task_dir.name, train, meta


def _human(task: str, meta: dict) -> list[str]:
    return meta["human_instructions"][:PER_TASK]


def _ape_length(task: str, meta: dict) -> list[str]:
    path = APE_RUNS / f"{task}-ape-seed0.json"
    if not path.is_file():
        return []
    board = json.loads(path.read_text(encoding="utf-8"))["leaderboard"]
    texts = [e["instruction"] for e in board if 10 <= len(e["instruction"].split()) <= 20]
    return texts[:PER_TASK]


def build_workload(data: Path, name: str, n_prompts: int, n_examples: int) -> Workload:
    """`n_prompts` prompts of workload `name`, each with `n_examples` examples."""
    pick: Callable[[str, dict], list[str]] = _ape_length if name == "ape-length" else _human
    demos_per_task = DEMOS * PER_TASK if name == "few-shot" else 0
    requests: list[Request] = []
    prompts: list[dict[str, Any]] = []
    for task, train, meta in _tasks(data, n_examples + demos_per_task):
        examples = train[:n_examples]
        for i, instruction in enumerate(pick(task, meta)):
            if len(prompts) == n_prompts:
                return Workload(requests, prompts)
            demos: tuple[Example, ...] = ()
            if demos_per_task:
                start = n_examples + DEMOS * i
                demos = tuple(train[start : start + DEMOS])
            requests.extend(ape.Prompt(instruction, demos=demos).requests(examples))
            prompts.append({"task": task, "instruction": instruction, "demos": len(demos)})
    if len(prompts) < n_prompts:
        raise SystemExit(f"{data}: only {len(prompts)} {name} prompts found, need {n_prompts}")
    return Workload(requests, prompts)
