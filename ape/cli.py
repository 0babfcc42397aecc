"""The `ape` command line: parses strings, calls the Python API, prints tables.

Exit codes: 0 success, 2 bad input (one-line error), 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ape.models import DEFAULT_MODEL, ModelError
from ape.task import TaskError

_DATA_HELP = (
    "task data: a JSONL/JSON/CSV/TSV file with 'input' and 'output' fields, a directory with "
    "train.jsonl (and optionally val.jsonl/dev.jsonl, test.jsonl, meta.json), or a bundled task "
    "name (antonyms)"
)


def _add_task_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", help=_DATA_HELP)
    parser.add_argument("--val", help="validation split file (default: held out from DATA)")
    parser.add_argument("--test", help="test split file (default: held out from DATA by seed)")
    parser.add_argument("--seed", type=int, default=0, help="seed for splits (default: 0)")
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"model: {DEFAULT_MODEL} (embedded), a .gguf file, a local HF directory or a hub id",
    )
    parser.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    parser.add_argument("--dtype", help="float32, bfloat16 or float16 (default: bf16 on CUDA)")
    parser.add_argument(
        "--evaluator",
        default="loglik",
        help="loglik (mean log-prob per token, default), loglik_sum, generation, choice",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ape", description="Find the prompt that makes your model do your task best."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    evaluate = commands.add_parser(
        "evaluate",
        help="score given instructions on a task split",
        description="Score given instructions on a task split and print their mean scores.",
    )
    _add_task_arguments(evaluate)
    evaluate.add_argument(
        "--instruction",
        action="append",
        metavar="TEXT",
        help="an instruction to score (repeatable; '' is no instruction). Default: the task's "
        "human instructions from meta.json, and no instruction",
    )
    evaluate.add_argument(
        "--split", default="test", choices=["train", "val", "test"], help="default: test"
    )
    evaluate.set_defaults(run=_run_evaluate)
    return parser


def _run_evaluate(args: argparse.Namespace) -> int:
    from ape.evaluation import evaluate, make_evaluator
    from ape.models import load_model
    from ape.task import load_task

    task = load_task(args.data, val=args.val, test=args.test, seed=args.seed)
    instructions = args.instruction
    if instructions is None:
        instructions = [*task.human_instructions, ""]
    make_evaluator(args.evaluator, task)  # fail on a bad name before the slow model load
    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    scores = evaluate(task, instructions, model=lm, evaluator=args.evaluator, split=args.split)
    examples = len(task.split(args.split))
    print(f"\n{task.name}: {args.evaluator} on {args.split} ({examples} examples), {lm.name}\n")
    _print_table(
        ["score", "instruction"],
        [
            (f"{s:.4f}", text or "(no instruction)")
            for s, text in sorted(zip(scores, instructions, strict=True), reverse=True)
        ],
    )
    return 0


def _print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    line = "  ".join(f"{h:<{w}}" for h, w in zip(header, widths, strict=True))
    print(line.rstrip())
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(f"{c:<{w}}" for c, w in zip(row, widths, strict=True)).rstrip())


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (TaskError, ModelError, ValueError) as err:
        print(f"ape: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ape: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
