"""Generated text: sampled in seeded chunks, each stored as one unit and replayed on resume.

The text is kept out of the run's study (where it would crowd optuna-dashboard's study page and
grow with the run), in a study of its own in the same storage: one trial per chunk, whose user
attributes hold the texts and the tokens they cost. The run's study names it in its
`ape_generations` attribute. Studies recorded before this kept generations as
``generation:<hash>`` study attributes; those are still read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import optuna
from tqdm.auto import tqdm

from ape.budget import Budget
from ape.lm import LanguageModel
from ape.storage import content_hash

GENERATIONS_ATTR = "ape_generations"  # the run's study -> the name of its generations' study
_LEGACY_PREFIX = "generation:"
CHUNK_SEQUENCES = 32  # sequences sampled per chunk (efficient CPU decoding)


class GenerationCache:
    """Stored generation results, keyed by a hash of the request that made them."""

    def __init__(self, study: optuna.Study, storage: optuna.storages.BaseStorage):
        self.study = study
        self.storage = storage
        self._results: dict[str, dict[str, Any]] = {
            key.removeprefix(_LEGACY_PREFIX): value
            for key, value in study.user_attrs.items()
            if key.startswith(_LEGACY_PREFIX)
        }
        self._side: optuna.Study | None = None
        name = study.user_attrs.get(GENERATIONS_ATTR)
        if name is not None:
            self._side = optuna.load_study(study_name=name, storage=storage)
            for trial in self._side.get_trials(deepcopy=False):
                attrs = trial.user_attrs
                if "request" in attrs:
                    self._results[attrs["request"]] = {
                        "texts": attrs["texts"],
                        "tokens": attrs["tokens"],
                    }
        self.loaded = len(self._results)

    def get(self, request: dict[str, Any]) -> dict[str, Any] | None:
        """The stored {"texts", "tokens"} for `request`, or None."""
        return self._results.get(content_hash(request, 24))

    def put(self, request: dict[str, Any], result: dict[str, Any]) -> None:
        """Store one chunk's result: one committed trial of the generations' study."""
        key = content_hash(request, 24)
        if self._side is None:  # created at the first generation, so runs without none
            name = f"{self.study.study_name}.generations"
            self._side = optuna.create_study(
                storage=self.storage, study_name=name, load_if_exists=True
            )
            self.study.set_user_attr(GENERATIONS_ATTR, name)
        attrs = {"request": key, "model": request.get("model"), **result}
        self._side.add_trial(
            optuna.trial.create_trial(value=float(result["tokens"]), user_attrs=attrs)
        )
        self._results[key] = result


def generate_stored(
    cache: GenerationCache,
    lm: LanguageModel,
    budget: Budget,
    prompts: Sequence[str],
    settings: dict[str, Any],
    *,
    timed: Callable[[str], AbstractContextManager[None]],
    bar_options: dict[str, Any],
) -> list[list[str]]:
    """`n` completions per prompt (see `Objective.generate`), replayed from `cache` when stored.

    `settings` are n, temperature, max_new_tokens, seed, chat and stop. Prompts go in fixed
    chunks of about CHUNK_SEQUENCES sequences; each chunk draws from its own seed, derived from
    `seed` and the chunk's text, and is stored as one unit, so its samples are the same whether
    the run was interrupted or not. Each prompt reserves n * max_new_tokens units and is charged
    the tokens it produced. Prompts the remaining budget cannot reserve are not run: the outputs
    are for a prefix of `prompts`, and `BudgetExhausted` is raised after it.
    """
    n, max_new_tokens = settings["n"], settings["max_new_tokens"]
    affordable = budget.affordable(len(prompts), n * max_new_tokens)
    size = max(1, CHUNK_SEQUENCES // n)
    outputs: list[list[str]] = []
    with tqdm(total=affordable, unit="prompt", **bar_options) as bar:
        for start in range(0, affordable, size):
            chunk = list(prompts[start : min(start + size, affordable)])
            request = {"model": lm.name, "prompts": chunk, **settings}
            request["stop"] = list(request["stop"] or [])
            stored = cache.get(request)
            if stored is None:
                with timed("generate"):
                    stored = _sample(lm, chunk, settings)
                cache.put(request, stored)
            budget.add_tokens(stored["tokens"])
            outputs += [list(out) for out in stored["texts"]]
            bar.update(len(chunk))
    if affordable < len(prompts):
        raise budget.exhausted()
    return outputs


def _sample(lm: LanguageModel, chunk: list[str], settings: dict[str, Any]) -> dict[str, Any]:
    """One chunk from the model, seeded by the run's seed and the chunk's text."""
    seed = settings["seed"]
    texts = lm.generate(
        chunk,
        n=settings["n"],
        temperature=settings["temperature"],
        max_new_tokens=settings["max_new_tokens"],
        seed=None if seed is None else int(content_hash([seed, chunk], 8), 16),
        chat=settings["chat"],
        stop=settings["stop"],
    )
    limit = settings["max_new_tokens"]
    return {"texts": texts, "tokens": sum(_token_count(lm, out, limit) for out in texts)}


def _token_count(lm: LanguageModel, texts: Sequence[str], max_new_tokens: int) -> int:
    """Tokens produced; without a tokenizer, the reserved maximum is charged (an upper bound)."""
    tokenizer = getattr(lm, "tokenizer", None)
    if tokenizer is None:
        return len(texts) * max_new_tokens
    counts = [len(tokenizer(t, add_special_tokens=False).input_ids) for t in texts]
    return sum(min(c, max_new_tokens) for c in counts)
