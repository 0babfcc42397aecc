"""The prompts `ape evaluate` scores: given instructions (with --label-word words) and the best
prompts of saved results (with their demos and label words)."""

from __future__ import annotations

import argparse

from ape.capabilities import LABEL_LOGPROBS, offers
from ape.display import describe_words
from ape.prompt import Prompt
from ape.result import Result


def evaluated_prompts(args: argparse.Namespace, task, scorer) -> tuple[list, list[str]]:
    """The prompts `ape evaluate` scores (instructions with --label-word, saved results' best)
    and how the table names them."""
    words = label_words_of(args.label_word or [])
    if words and not offers(scorer, LABEL_LOGPROBS):
        raise ValueError(f"--label-word needs --evaluator choice, not {args.evaluator}")
    instructions = args.instruction
    if instructions is None:
        instructions = [] if args.result else [*task.human_instructions, ""]
    prompts = [Prompt.from_text(text, label_words=words) for text in instructions]
    names = [(text or "(no instruction)") + describe_words(words) for text in instructions]
    for path in args.result or []:
        best = Result.load(path).best
        if best is None:
            raise ValueError(f"{path}: the result has no best prompt")
        prompts.append(best.prompt)
        names.append(f"best of {path}" + describe_words(best.label_words))
    return prompts, names


def label_words_of(pairs: list[str]) -> dict[str, str]:
    """LABEL=WORD strings as a mapping (one clear error for a malformed one)."""
    words = {}
    for pair in pairs:
        label, sep, word = pair.partition("=")
        if not sep or not label or not word.strip():
            raise ValueError(f"--label-word takes LABEL=WORD, got {pair!r}")
        words[label] = word.strip()
    return words
