"""How a result reads in a terminal: the leaderboard, the best prompt, and its evidence."""

from __future__ import annotations

from collections.abc import Sequence

from ape.evidence import Comparison
from ape.result import Result


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def print_result(result: Result, top: int = 10) -> None:
    """The leaderboard, the best prompt beside the no-instruction reference, and the best
    prompt's test difference from each baseline with its 95% interval."""
    budget = f"{result.budget_used}" + (f" of {result.budget}" if result.budget else "")
    print(
        f"\n{result.task}: searcher {result.searcher}, {result.evaluator}, model {result.model}, "
        f"seed {result.seed}, budget used {budget}"
        + (" (interrupted)" if result.interrupted else "")
    )
    metric = any(e.test_metric is not None for e in result.leaderboard)
    rows = []
    for i, e in enumerate(result.leaderboard[:top], start=1):
        row = [str(i), fmt(e.val_score), str(e.val_examples), fmt(e.test_score)]
        row += [fmt(e.test_metric)] if metric else []
        row += ["-" if e.tokens is None else str(e.tokens), e.origin, _describe(e)]
        rows.append(row)
    header = ["#", "val", "n", "test"] + (["metric"] if metric else []) + ["tokens", "origin"]
    print()
    print_table([*header, "prompt"], rows)
    if len(result.leaderboard) > top:
        print(f"... {len(result.leaderboard) - top} more in the result file")
    if result.best is None:
        return
    _print_best(result)


def _test_rows(result: Result) -> str:
    """' on N test rows', and where they are a sample, of how many."""
    shown, total = result.test_examples, result.test_split_rows
    if not shown:
        return ""
    if total and total > shown:
        return f" on {shown} of {total} test rows (a seeded sample; --test-examples all: every row)"
    return f" on {shown} test rows"


def _print_best(result: Result) -> None:
    best, ref = result.best, result.reference
    print(f"\nbest prompt: {_describe(best)}")
    if best.label_words:
        print("label words: " + ", ".join(f"{k} → {v}" for k, v in best.label_words.items()))
    sample = _test_rows(result)
    print(
        f"test score: {fmt(best.test_score)}"
        + (f"   (no instruction: {fmt(ref.test_score)})" if ref is not None else "")
        + sample
    )
    print(
        f"val score:  {fmt(best.val_score)}"
        + (f"   (no instruction: {fmt(ref.val_score)})" if ref is not None else "")
    )
    if result.evidence:
        print("\ntest difference, best − baseline, with its paired bootstrap 95% interval:")
        for item in result.evidence:
            print("  " + Comparison(**item).line())
    if best.origin.startswith("baseline: "):
        print(
            f"\nthe best prompt is a baseline ({best.origin.removeprefix('baseline: ')}): "
            "nothing the search found beat it on validation"
        )


def _describe(entry) -> str:
    text = short(entry.instruction or "(no instruction)")
    text += f" + {len(entry.demos)} demos" if entry.demos else ""
    return text + describe_words(entry.label_words)


def describe_words(words: dict[str, str], limit: int = 60) -> str:
    """' [words: negative→awful, positive→superb]' for a prompt with label words of its own."""
    if not words:
        return ""
    return " [words: " + short(", ".join(f"{k}→{v}" for k, v in words.items()), limit) + "]"


def short(text: str, limit: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    line = "  ".join(f"{h:<{w}}" for h, w in zip(header, widths, strict=True))
    print(line.rstrip())
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(f"{c:<{w}}" for c, w in zip(row, widths, strict=True)).rstrip())
