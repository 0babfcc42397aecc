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
    outputs: list[list[str]] = []
    with tqdm(total=affordable, unit="prompt", **bar_options) as bar:
        for request in chunk_requests(lm, prompts[:affordable], settings):
            stored = cache.get(request)
            if stored is None:
                with timed("generate"):
                    (stored,) = _sample(lm, [request])
                cache.put(request, stored)
            budget.add_tokens(stored["tokens"])
            outputs += [list(out) for out in stored["texts"]]
            bar.update(len(request["prompts"]))
    if affordable < len(prompts):
        raise budget.exhausted()
    return outputs


def generate_ahead(
    cache: GenerationCache,
    lm: LanguageModel,
    budget: Budget,
    prompt_sets: Sequence[tuple[Sequence[str], bool]],
    settings: dict[str, Any],
    *,
    timed: Callable[[str], AbstractContextManager[None]],
    bar_options: dict[str, Any],
) -> None:
    """Store the chunks that `generate_stored` will sample for each (prompts, chat) of
    `prompt_sets` under `settings` (chat aside), sampled together: one decoding run instead of
    one per set, with the same texts. Nothing is charged here (each later call charges its own
    chunks), and nothing is run unless the budget can reserve every prompt of every set.

    Models that cannot decode groups together (served ones) are left to the later calls: they
    would gain nothing here, and those calls store each chunk as its requests come back, so a
    run killed mid-step keeps what the server already answered."""
    if getattr(lm, "generate_groups", None) is None:
        return
    total = sum(len(prompts) for prompts, _ in prompt_sets)
    if budget.affordable(total, settings["n"] * settings["max_new_tokens"]) < total:
        return
    requests = [
        request
        for prompts, chat in prompt_sets
        for request in chunk_requests(lm, prompts, {**settings, "chat": chat})
    ]
    missing = list({content_hash(r, 24): r for r in requests if cache.get(r) is None}.values())
    if not missing:
        return
    # One decoding run: the bar moves once, at its end.
    with tqdm(total=sum(len(r["prompts"]) for r in missing), unit="prompt", **bar_options) as bar:
        with timed("generate"):
            results = _sample(lm, missing)
        for request, result in zip(missing, results, strict=True):
            cache.put(request, result)
        bar.update(bar.total)


def chunk_requests(
    lm: LanguageModel, prompts: Sequence[str], settings: dict[str, Any]
) -> list[dict[str, Any]]:
    """The stored units `prompts` are sampled in: about CHUNK_SEQUENCES sequences each."""
    size = max(1, CHUNK_SEQUENCES // settings["n"])
    requests = []
    for start in range(0, len(prompts), size):
        request = {"model": lm.name, "prompts": list(prompts[start : start + size]), **settings}
        request["stop"] = list(request["stop"] or [])
        requests.append(request)
    return requests


def _sample(lm: LanguageModel, requests: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chunks from the model, each seeded by the run's seed and the chunk's text; in one
    decoding run where the model can (`generate_groups`) and the chunks differ in prompts,
    seed and chat only, else one call per chunk."""
    groups = [
        (
            r["prompts"],
            None if r["seed"] is None else int(content_hash([r["seed"], r["prompts"]], 8), 16),
            r["chat"],
        )
        for r in requests
    ]
    shared = {k: requests[0][k] for k in ("n", "temperature", "max_new_tokens", "stop")}
    together = getattr(lm, "generate_groups", None)
    if together is not None and all({k: r[k] for k in shared} == shared for r in requests):
        texts = together(groups, **shared)
    else:
        texts = [
            lm.generate(prompts, seed=seed, chat=chat, **{k: r[k] for k in shared})
            for (prompts, seed, chat), r in zip(groups, requests, strict=True)
        ]
    return [
        {
            "texts": out,
            "tokens": sum(_token_count(lm, samples, r["max_new_tokens"]) for samples in out),
        }
        for out, r in zip(texts, requests, strict=True)
    ]


def _token_count(lm: LanguageModel, texts: Sequence[str], max_new_tokens: int) -> int:
    """Tokens produced; without a tokenizer, the reserved maximum is charged (an upper bound)."""
    tokenizer = getattr(lm, "tokenizer", None)
    if tokenizer is None:
        return len(texts) * max_new_tokens
    counts = [len(tokenizer(t, add_special_tokens=False).input_ids) for t in texts]
    return sum(min(c, max_new_tokens) for c in counts)


class StoredGeneration:
    """The generation half of `Objective` (its base class): sampling through stored chunks.

    The class it is mixed into provides `lm`, `budget`, `store` (whose `generations` is a
    GenerationCache), `timed` and `progress`.
    """

    lm: LanguageModel
    budget: Budget
    store: Any
    progress: bool
    timed: Callable[[str], AbstractContextManager[None]]

    def generate(
        self,
        prompts: Sequence[str],
        *,
        n: int = 1,
        temperature: float = 0.0,
        max_new_tokens: int = 32,
        seed: int | None = None,
        chat: bool = False,
        stop: Sequence[str] | None = None,
        lm: LanguageModel | None = None,
        desc: str = "generating",
    ) -> list[list[str]]:
        """`n` completions per prompt, replayed from the study when stored.

        Prompts are sampled in fixed chunks of about 32 sequences (efficient CPU decoding). Each
        chunk draws from its own seed, derived from `seed` and the chunk's text, and is stored as
        one unit, so its samples are the same whether the run was interrupted or not. Each prompt
        reserves n * max_new_tokens units and is charged the tokens it produced. Prompts the
        remaining budget cannot reserve are not run: the outputs returned are for a prefix of
        `prompts`, and `BudgetExhausted` is raised after it.
        """
        settings = dict(n=n, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
        settings.update(chat=chat, stop=stop)
        cache, model, budget, options = self._through_store(lm, desc)
        return generate_stored(cache, model, budget, prompts, settings, **options)

    def generate_ahead(
        self,
        prompt_sets: Sequence[tuple[Sequence[str], bool]],
        *,
        n: int = 1,
        temperature: float = 0.0,
        max_new_tokens: int = 32,
        seed: int | None = None,
        stop: Sequence[str] | None = None,
        lm: LanguageModel | None = None,
        desc: str = "generating",
    ) -> None:
        """Sample now, in one decoding run, what the `generate` calls with these settings will
        ask for each (prompts, chat) of `prompt_sets`: those calls then replay it, with the texts
        they would have sampled, and charge it. A step that asks in several calls (one per
        template) so decodes once. Nothing is sampled unless the budget covers every prompt."""
        settings = dict(n=n, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
        settings.update(chat=False, stop=stop)
        cache, model, budget, options = self._through_store(lm, desc)
        generate_ahead(cache, model, budget, prompt_sets, settings, **options)

    def _through_store(self, lm: LanguageModel | None, desc: str) -> tuple:
        """What both generation paths take: the stored chunks, the model, the budget, and the
        timer and progress bar options."""
        options = {"timed": self.timed, "bar_options": {"desc": desc, "disable": not self.progress}}
        return self.store.generations, lm or self.lm, self.budget, options
