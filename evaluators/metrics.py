"""Execution-accuracy metrics with the Instruction Induction answer normalization.

Every metric normalizes both sides itself, so callers can pass raw model output. The
normalization follows the spec in ``shared/data/instruction_induction/README.md``.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

_DROP_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """Normalize an answer or prediction the Instruction Induction way.

    A final ``strip`` is added after the reference steps: punctuation removal can leave a
    trailing space (``"cat ."`` -> ``"cat "``) that should not make an exact match fail.
    """
    text = text.replace(" and ", " ")
    text = text.replace("Sentence 1:", "").replace("Sentence 2:", "")
    text = text.strip()
    # Only the first line and first sentence are scored: trailing explanations are ignored.
    text = text.split("\n", 1)[0]
    text = text.split(".", 1)[0]
    text = text.lower().replace("-", " ")
    return text.translate(_DROP_PUNCTUATION).strip()


def exact_match(prediction: str, answer: str) -> float:
    """1.0 when the normalized strings are equal."""
    return float(normalize(prediction) == normalize(answer))


def contains(prediction: str, answer: str) -> float:
    """1.0 when the normalized answer occurs as a whole word inside the normalized prediction.

    An empty normalized answer only matches an empty prediction (a bare ``\\b\\b`` pattern
    would match almost anything).
    """
    pred, gold = normalize(prediction), normalize(answer)
    if not gold:
        return float(not pred)
    return float(re.search(rf"\b{re.escape(gold)}\b", pred) is not None)


def f1(prediction: str, answer: str) -> float:
    """SQuAD-style bag-of-tokens F1 over whitespace tokens of the normalized strings.

    If either side has no tokens, the score is 1.0 when both are empty and 0.0 otherwise.
    """
    pred_tokens = normalize(prediction).split()
    gold_tokens = normalize(answer).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    overlap = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_set(prediction: str, answer: str) -> float:
    """1.0 when both normalized strings have the same set of whitespace tokens."""
    return float(set(normalize(prediction).split()) == set(normalize(answer).split()))


def accuracy(prediction: str, answer: str) -> float:
    """Label match after only strip + lowercase (classification labels keep punctuation)."""
    return float(prediction.strip().lower() == answer.strip().lower())


METRICS: dict[str, Callable[[str, str], float]] = {
    "em": exact_match,
    "contains": contains,
    "f1": f1,
    "es": exact_set,
    "accuracy": accuracy,
}


# The metrics that read a prediction through `normalize`, which keeps only its first sentence:
# text after the first "." never changes their score.
FIRST_SENTENCE = frozenset({"em", "contains", "f1", "es"})
# The metrics that score 0 unless the prediction's words are a reference's words: a prediction
# far longer than every reference cannot score.
WHOLE_ANSWER = frozenset({"em", "es"})


def score(prediction: str, answers: Sequence[str], metric: str) -> float:
    """Best score of ``prediction`` over the acceptable ``answers`` (0.0 if there are none)."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of: {', '.join(METRICS)}")
    fn = METRICS[metric]
    return max((fn(prediction, answer) for answer in answers), default=0.0)


def mean_score(predictions: Sequence[str], answers: Sequence[Sequence[str]], metric: str) -> float:
    """Average of ``score`` over rows; ``answers[i]`` holds the acceptable answers of row i."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answer lists")
    if not predictions:
        raise ValueError("no predictions to score")
    scores = [score(p, a, metric) for p, a in zip(predictions, answers, strict=True)]
    return sum(scores) / len(scores)
