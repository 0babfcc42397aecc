"""The `ape` command line: parses strings, calls the Python API, prints tables.

Exit codes: 0 success, 2 bad input (one-line error), 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ape.display import print_result, print_table
from ape.evaluator_flags import add_evaluator_flags, evaluator_values
from ape.flags import SearcherFlags, help_focus
from ape.models import DEFAULT_MODEL, ModelError
from ape.prompt_sources import evaluated_prompts
from ape.task import TaskError
from ape.task_types import DEFAULT_TEST_EXAMPLES

DEFAULT_RUNS = "ape-runs"
DEFAULT_STORAGE = f"sqlite:///{DEFAULT_RUNS}/ape.db"

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
        help=f"model: {DEFAULT_MODEL} (embedded), a .gguf file, a local HF directory, a hub id, "
        "or openai:MODEL@BASE_URL for a model behind an OpenAI-compatible server",
    )
    parser.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    parser.add_argument("--dtype", help="float32, bfloat16 or float16 (default: bf16 on CUDA)")
    parser.add_argument(
        "--evaluator",
        default="loglik",
        help="loglik (mean log-prob per token, default), loglik_sum, generation, choice",
    )
    add_evaluator_flags(parser)


def build_parser(searcher: str | None = None) -> argparse.ArgumentParser:
    """The `ape` parser; with `searcher`, `optimize --help` shows that searcher's options only."""
    parser = argparse.ArgumentParser(
        prog="ape", description="Find the prompt that makes your model do your task best."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_evaluate(commands)
    _add_optimize(commands, searcher)
    _add_bench(commands)
    _add_worker(commands)
    show = commands.add_parser(
        "show", help="print a saved result", description="Print a result JSON saved by optimize."
    )
    show.add_argument("result", help="a result JSON written by 'ape optimize --out'")
    show.add_argument("--top", type=int, default=10, help="leaderboard rows to print (default: 10)")
    show.set_defaults(run=_run_show)
    return parser


def _add_evaluate(commands) -> None:
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
        "--soft-prompt",
        action="append",
        metavar="DIR",
        help="a saved soft prompt to score as well (repeatable): the folder 'ape optimize "
        "--searcher soft' writes beside its result (RESULT.files/soft_prompt)",
    )
    evaluate.add_argument(
        "--label-word",
        action="append",
        metavar="LABEL=WORD",
        help="the word --evaluator choice scores for LABEL with every instruction (repeatable; "
        "default: the task's label words)",
    )
    evaluate.add_argument(
        "--result",
        action="append",
        metavar="JSON",
        help="score the best prompt of a result 'ape optimize' saved, with its demos and label "
        "words (repeatable)",
    )
    evaluate.add_argument(
        "--split", default="test", choices=["train", "val", "test"], help="default: test"
    )
    evaluate.set_defaults(run=_run_evaluate)


def _add_worker(commands) -> None:
    worker = commands.add_parser(
        "worker",
        help="score the jobs a running optimize queues in a shared study",
        description="Join a study and score the (prompt, examples) jobs that 'ape optimize "
        "--workers N' queues in it, until that run finishes. Start it on any machine that "
        "reaches the database; a killed worker's jobs are retried by the others.",
    )
    worker.add_argument("--storage", required=True, help="the run's database URL")
    worker.add_argument("--study", required=True, help="the run's study name")
    worker.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    worker.add_argument("--batch", type=int, default=16, help="jobs taken at once (default: 16)")
    worker.add_argument(
        "--idle-timeout",
        type=float,
        help="exit after this many seconds without jobs (default: wait until the run finishes)",
    )
    worker.add_argument("--quiet", action="store_true", help="no progress bar")
    worker.set_defaults(run=_run_worker)


def _add_optimize(commands, searcher: str | None) -> None:
    from ape.search.base import available_searchers

    optimize = commands.add_parser(
        "optimize",
        help="find the best instruction for a task",
        description="Search for the instruction that scores best on held-out validation data, "
        "then score the best few on the test split. Every scored candidate is stored in an "
        "Optuna study, so rerunning an interrupted command resumes where it stopped.",
    )
    _add_task_arguments(optimize)
    names = ", ".join(available_searchers())
    optimize.add_argument("--searcher", default="whole", help=f"{names} (default: whole)")
    _add_run_arguments(optimize)
    flags = SearcherFlags.registered()
    flags.add_to(optimize, focus=searcher)
    optimize.set_defaults(run=_run_optimize, searcher_flags=flags)


def _add_run_arguments(optimize: argparse.ArgumentParser) -> None:
    optimize.add_argument(
        "--budget",
        type=int,
        help="hard cap on scored (prompt, example) pairs plus generated tokens (default: none; "
        "the searcher's own schedule)",
    )
    optimize.add_argument(
        "--out", help="result JSON (default: ape-runs/TASK-SEARCHER-seedSEED.json)"
    )
    optimize.add_argument(
        "--storage",
        help=f"Optuna storage URL for the trial history, a journal file (*.log), or 'memory' "
        f"(default: {DEFAULT_STORAGE})",
    )
    optimize.add_argument("--study", help="study name (default: TASK-<hash of model+evaluator>)")
    for flag, default, text in (
        ("--val-examples", 100, "validation examples the finalists are judged on (default: 100)"),
        ("--test-top", 3, "best candidates scored on the test split (default: 3)"),
    ):
        optimize.add_argument(flag, type=int, default=default, help=text)
    optimize.add_argument(
        "--test-examples",
        type=rows_or_all,
        default=DEFAULT_TEST_EXAMPLES,
        metavar="N|all",
        help="score the finalists on a seeded sample of this many rows of a larger test split, "
        f"or 'all' (default: {DEFAULT_TEST_EXAMPLES})",
    )
    optimize.add_argument("--top", type=int, default=10, help="leaderboard rows to print")
    optimize.add_argument(
        "--workers",
        type=int,
        default=0,
        help="score through N local worker processes sharing --storage (a database URL); "
        "workers on other machines join with 'ape worker' (default: 0, score in this process)",
    )
    optimize.add_argument("--quiet", action="store_true", help="no progress bars")
    optimize.add_argument(
        "--length-penalty",
        type=float,
        default=0.0,
        help="rank by validation score minus this times the prompt's tokens (default: 0, off; "
        "ties always go to the shorter prompt)",
    )
    optimize.add_argument(
        "--metric-evidence",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also compare the best prompt with the baselines under the task's metric by greedy "
        "generation on test (default: on, when the selection score is a log-likelihood)",
    )
    optimize.add_argument(
        "--dry-run",
        action="store_true",
        help="print what the searcher's schedule will spend and how long it should take on this "
        "machine, then exit without scoring",
    )


def rows_or_all(text: str) -> int | None:
    """--test-examples: a number of rows, or 'all' (None: every row)."""
    if text.strip().lower() == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number of rows or 'all', not {text!r}") from None


def _searcher_arguments(args: argparse.Namespace) -> dict:
    """The searcher options given on the command line, by field name."""
    return args.searcher_flags.values(args, args.searcher)


def _run_evaluate(args: argparse.Namespace) -> int:
    from ape.evaluation import evaluate, make_evaluator
    from ape.models import load_model
    from ape.search.soft.prompt import SoftPrompt
    from ape.task import load_task

    task = load_task(args.data, val=args.val, test=args.test, seed=args.seed)
    settings = evaluator_values(args, args.evaluator)
    scorer = make_evaluator(args.evaluator, task, **settings)  # fail before the model load
    prompts, names = evaluated_prompts(args, task, scorer)
    softs = [SoftPrompt.load(folder) for folder in args.soft_prompt or []]
    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    prompts += [soft.prompt() for soft in softs]
    names += [f"{s.label} ({d})" for s, d in zip(softs, args.soft_prompt or [], strict=True)]
    scores = evaluate(task, prompts, model=lm, evaluator=scorer, split=args.split)
    examples = len(task.split(args.split))
    print(f"\n{task.name}: {args.evaluator} on {args.split} ({examples} examples), {lm.name}\n")
    print_table(
        ["score", "instruction"],
        [(f"{s:.4f}", text) for s, text in sorted(zip(scores, names, strict=True), reverse=True)],
    )
    return 0


def _run_optimize(args: argparse.Namespace) -> int:
    from ape.api import Interrupted, check_label_words, optimize
    from ape.budget import check_counts
    from ape.capabilities import check
    from ape.evaluation import make_evaluator
    from ape.models import load_model
    from ape.search.base import get_searcher
    from ape.task import load_task

    options = _searcher_arguments(args)
    settings = evaluator_values(args, args.evaluator)
    counts = ("budget", "val_examples", "test_top", "test_examples")
    check_counts("--", **{name: getattr(args, name) for name in counts})
    task = load_task(args.data, val=args.val, test=args.test, seed=args.seed)
    scorer = make_evaluator(args.evaluator, task, **settings)  # bad names fail before the load
    searcher = get_searcher(args.searcher, **options)
    check(searcher, scorer)  # so does a searcher it cannot serve
    check_label_words(searcher, scorer)  # and a label-word search without label words
    out = args.out or f"{DEFAULT_RUNS}/{task.name}-{args.searcher}-seed{args.seed}.json"
    storage = args.storage or DEFAULT_STORAGE
    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    if args.dry_run:
        from ape.dry_run import print_plan

        print_plan(get_searcher(args.searcher, **options), task, lm, args)
        return 0
    try:
        result = optimize(
            task,
            model=lm,
            searcher=args.searcher,
            evaluator=args.evaluator,
            budget=args.budget,
            seed=args.seed,
            storage=None if storage == "memory" else storage,
            study=args.study,
            val_examples=args.val_examples,
            test_top=args.test_top,
            test_examples=args.test_examples,
            progress=not args.quiet,
            workers=args.workers,
            length_penalty=args.length_penalty,
            metric_evidence=args.metric_evidence,
            **options,
            **settings,
        )
    except Interrupted as stop:
        path = stop.result.save(out)
        print(f"ape: interrupted; partial result saved to {path}", file=sys.stderr)
        if storage != "memory":
            print("ape: run the same command again to resume", file=sys.stderr)
        return 130
    path = result.save(out)
    print_result(result, top=args.top)
    print(f"\nsaved {path}")
    if "soft_prompt" in result.files:
        folder = result.file("soft_prompt", path)
        print(f"soft prompt vectors: {folder} (score: ape evaluate DATA --soft-prompt {folder})")
    return 0


def _run_worker(args: argparse.Namespace) -> int:
    from ape.worker import run_worker

    if args.batch <= 0:
        raise ValueError(f"--batch must be positive, got {args.batch}")
    done = run_worker(
        args.storage,
        args.study,
        batch=args.batch,
        idle_timeout=args.idle_timeout,
        device=args.device,
        progress=not args.quiet,
    )
    if not args.quiet:
        print(f"worker done: {done} jobs scored", file=sys.stderr)
    return 0


def _add_bench(commands) -> None:
    from ape.bench.config import CONFIG_HELP

    bench = commands.add_parser(
        "bench",
        help="compare searchers on tasks and seeds at an equal budget",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=CONFIG_HELP,
    )
    bench.add_argument(
        "config", metavar="CONFIG", help="the bench config file (JSON, or TOML ending in .toml)"
    )
    bench.add_argument("--quiet", action="store_true", help="no progress bars or per-run lines")
    bench.set_defaults(run=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    from ape.bench import load_config, run_bench

    config = load_config(args.config)
    try:
        summary = run_bench(config, progress=not args.quiet)
    except KeyboardInterrupt:
        print(
            f"ape: interrupted; finished runs are saved in {config.out / 'runs'}; run the same "
            "command again to continue",
            file=sys.stderr,
        )
        return 130
    print()
    print(summary.markdown, end="")
    print()
    for path in summary.files:
        print(f"saved {path}")
    return 0


def _run_show(args: argparse.Namespace) -> int:
    from ape.result import Result

    print_result(Result.load(args.result), top=args.top)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from ape.search.base import available_searchers

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(help_focus(argv, available_searchers()))
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
