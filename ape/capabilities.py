"""What an evaluator offers, what a searcher needs, and the one check between them.

An evaluator class declares `offers`, a frozenset of the capabilities below, and may declare a
classmethod `options_from_task(task)`: the options it takes from a task (a metric, the labels).
A searcher class declares `needs`: the capabilities of which its evaluator must offer at least
one (empty or absent: any evaluator will do). `check` compares the two before the model loads
and says in one line what is missing and which registered evaluators would do.

Each capability is a promise of methods (or of what `score` means):

- ``label_logprobs``: `resolve_labels(examples)`, `label_words(examples)` and
  `label_logprobs(lm, prompts, examples)`, shape (prompts, examples, labels);
- ``loglik_scores``: `score` is the log-likelihood of the reference output, a dense reward;
- ``training_loss``: `training_loss(lm, template, examples)` returns loss(vectors, batch), a
  scalar tensor whose gradient reaches vectors placed before `template`'s text.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from ape.task import Example, Task

if TYPE_CHECKING:
    import torch

LABEL_LOGPROBS = "label_logprobs"
LOGLIK_SCORES = "loglik_scores"
TRAINING_LOSS = "training_loss"

# How a capability is named in an error message.
DESCRIPTIONS = {
    LABEL_LOGPROBS: "label log-probs",
    LOGLIK_SCORES: "log-likelihood scores",
    TRAINING_LOSS: "a training loss",
}

# What a `training_loss` capability returns: loss(vectors, batch) -> scalar tensor.
Loss = Callable[["torch.Tensor", Sequence[Example]], "torch.Tensor"]


def offered(evaluator: Any) -> frozenset[str]:
    """The capabilities an evaluator (class or instance) declares; none if it declares none."""
    return frozenset(getattr(evaluator, "offers", ()))


def offers(evaluator: Any, capability: str) -> bool:
    """Whether `evaluator` declares `capability`."""
    return capability in offered(evaluator)


def needed(searcher: Any) -> frozenset[str]:
    """The capabilities a searcher (class or instance) accepts; empty: any evaluator."""
    return frozenset(getattr(searcher, "needs", ()))


def task_options(evaluator_class: type, task: Task) -> dict[str, Any]:
    """The options `evaluator_class` takes from `task` (none if it declares no such method)."""
    take = getattr(evaluator_class, "options_from_task", None)
    return dict(take(task)) if take is not None else {}


def _listed(words: Iterable[str], last: str) -> str:
    words = list(words)
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} {last} {words[-1]}"


def mismatch(searcher: Any, evaluator: Any, fitting: Sequence[str] = ()) -> str | None:
    """One line saying why `evaluator` cannot serve `searcher`, or None when it can.

    `fitting` names the evaluators that would do, for the hint at the end.
    """
    needs = needed(searcher)
    has = offered(evaluator)
    if not needs or needs & has:
        return None
    wanted = _listed(sorted(DESCRIPTIONS.get(c, c) for c in needs), "or")
    given = _listed(sorted(DESCRIPTIONS.get(c, c) for c in has), "and") if has else "none"
    line = (
        f"searcher {getattr(searcher, 'name', searcher)!r} needs an evaluator with {wanted}; "
        f"{getattr(evaluator, 'name', evaluator)!r} offers {given}"
    )
    return line + (f" (use --evaluator {_listed(fitting, 'or')})" if fitting else "")


def check(searcher: Any, evaluator: Any) -> None:
    """Raise a one-line ValueError when `evaluator` does not offer what `searcher` needs."""
    if mismatch(searcher, evaluator) is None:
        return
    from ape.evaluators.base import EVALUATORS  # the hint: which registered evaluators fit

    fitting = [name for name in EVALUATORS.names() if needed(searcher) & offered_by(name)]
    raise ValueError(mismatch(searcher, evaluator, fitting))


def offered_by(name: str) -> frozenset[str]:
    """The capabilities of the evaluator registered as `name` (none if it cannot be loaded)."""
    from ape.evaluators.base import EVALUATORS

    try:
        return offered(EVALUATORS.load(name))
    except Exception:  # a broken third-party plugin must not hide the real error
        return frozenset()
