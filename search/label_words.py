"""Label-word search (answer engineering) for the `choice` evaluator.

Which word a classification prompt asks for per label ("great" / "terrible") matters as much as
its instruction. The search, for one template prompt:

1. Candidates per class, from the task and the model itself:
   - the task's given word and the label's name;
   - synonyms of both, written by the LM (greedy, stored like every generation);
   - the whole-word tokens whose log-likelihood ratio for the class over the other classes, at
     the template's answer position on the training examples, is highest, among the class's most
     likely words (PETAL / AutomaticVerbalizer, Schick et al. 2020).
   A word two classes propose belongs to the one that proposed it first (by source), or to
   neither when both did in the same source.
2. Scores: the template with the k-th candidate of every class is one "column" prompt; one
   `evaluate_train` call scores all columns on the selection examples, with the evaluator's
   own scoring (calibrated if it calibrates). A word's score does not depend on the other words
   asked, so any assignment's predictions follow from the columns without another model call,
   and the scores are stored and replayed on resume like every trial.
3. Choice: a small beam over assignments (one word per class), started at the given words and
   swept class by class, ranked by accuracy on the selection examples, ties by the mean
   log-softmax of the gold word (a smoother fit); the given words win exact ties.
4. Acceptance: an assignment may replace the given words only if, on the validation examples,
   it is right on significantly more of them than the given words are where the two differ
   (search/acceptance.py, level `accept_p`); a best assignment that is not is dropped, and the
   given words stay. Chosen on the training examples (`select_on="train"`), the assignment meets
   validation examples it was not chosen on, and the test is an honest one.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from ape.search.acceptance import ACCEPT_P, paired_gain

from ape.capabilities import LABEL_LOGPROBS, offers
from ape.prompt import Prompt
from ape.task import Example

LabelWordsMode = Literal["given", "search"]
LABEL_WORDS_HELP = (
    "given: the task's label words; search: choose the words a classification prompt answers "
    "with (candidates from the model, chosen on the training and validation examples; needs "
    "--evaluator choice)"
)
# A proposed word: letters, optionally two or three words joined by spaces or hyphens.
_WORD = re.compile(r"^[A-Za-z][A-Za-z'-]*(?: [A-Za-z][A-Za-z'-]*){0,2}$")
SYNONYM_TOKENS = 16  # tokens generated per seed word
SYNONYM_PROMPT = (
    "Words with a similar meaning:\nhappy: glad, cheerful, joyful, pleased\n"
    "big: large, huge, enormous, vast\n{word}:"
)


@dataclass(frozen=True)
class WordSearch:
    """The search's settings; the defaults were chosen across the 5 classification sets."""

    llr_words: int = 4  # likelihood-ratio tokens per class
    likely_words: int = 300  # a class's most likely word tokens that the ratio ranks
    synonyms: int = 4  # LM synonyms kept per seed word (given word, label name)
    max_candidates: int = 10  # candidates per class
    select_on: Literal["train", "val", "train+val"] = "train+val"  # what the beam ranks on
    beam: int = 4
    sweeps: int = 2
    keep: int = 3  # assignments returned, best first
    accept_p: float = ACCEPT_P  # sign-test level for replacing the given words (see above)


@dataclass(frozen=True)
class Assignment:
    """One word per label, with how it did on the selection examples."""

    words: tuple[tuple[str, str], ...]
    accuracy: float
    fit: float  # mean log-softmax of the gold word over the assignment's words
    gain: dict[str, Any] | None = None  # paired_gain against the given words; None: they

    @property
    def accepted(self) -> bool:
        """The given words themselves, or words that passed the acceptance test against them."""
        return self.gain is None or self.gain["accepted"]

    @property
    def mapping(self) -> dict[str, str]:
        return dict(self.words)


def check_label_words(searcher: Any, evaluator: Any) -> None:
    """One line when label words are to be searched but the evaluator scores no label words."""
    if getattr(searcher, "label_words", "given") != "search" or offers(evaluator, LABEL_LOGPROBS):
        return
    name = getattr(evaluator, "name", type(evaluator).__name__)
    raise ValueError(
        f"--label-words search (label_words='search') needs an evaluator that scores label "
        f"words (--evaluator choice); {name!r} does not"
    )


def searched_words(
    objective, mode: str, template: Prompt | None = None, settings: WordSearch | None = None
) -> dict[str, str]:
    """The best searched assignment for `template` (default: no instruction), or {} (the
    evaluator's own words) when `mode` is "given" or no assignment passed acceptance."""
    if mode != "search":
        return {}
    best = search_label_words(objective, template or Prompt(), settings or WordSearch())[0]
    return {} if best.gain is None else best.mapping  # None: the given words


def search_label_words(
    objective, template: Prompt, settings: WordSearch = WordSearch()
) -> list[Assignment]:
    """The best `settings.keep` label-word assignments for `template` among the given words and
    those that pass acceptance against them, best first (so never empty)."""
    check_label_words(_Searching(), objective.evaluator)
    task = objective.task
    labels, given = objective.evaluator.label_words(task.train + task.val)
    given = [template.words.get(label, word) for label, word in zip(labels, given, strict=True)]
    pools = propose(objective, template, labels, given, settings)
    chosen_on, accepted_on = _selection(objective, settings.select_on), _selection(objective, "val")
    examples = list({ex.key(): ex for ex in chosen_on + accepted_on}.values())
    matrix = word_matrix(objective, template, labels, pools, examples)
    gold = np.array([labels.index(ex.output) for ex in examples])
    row = {ex.key(): i for i, ex in enumerate(examples)}
    sel = [row[ex.key()] for ex in chosen_on]
    acc = [row[ex.key()] for ex in accepted_on]
    ranked = choose(matrix[sel], gold[sel], [len(p) for p in pools], settings)
    out: list[Assignment] = []
    tried: list[dict[str, Any]] = []  # what the result reports: the best, kept or not
    for picked, accuracy, fit, gain in screened(matrix[acc], gold[acc], ranked, settings.accept_p):
        words = [pool[k] for pool, k in zip(pools, picked, strict=True)]
        found = Assignment(tuple(zip(labels, words, strict=True)), accuracy, fit, gain)
        if len(tried) < settings.keep:
            tried.append({"words": found.mapping, "accuracy": accuracy, "vs_given": gain})
        if found.accepted:
            out.append(found)
        if len(out) == settings.keep:
            break
    report = {
        "prompt": template.instruction,
        "selection_examples": len(sel),
        "acceptance_examples": len(acc),
        "best": tried,
    }
    objective.extras.setdefault("label_word_search", []).append(report)
    return out


def propose(
    objective, template: Prompt, labels: list[str], given: list[str], settings: WordSearch
) -> list[list[str]]:
    """Candidate words per class: the given word, the label's name, their LM synonyms, then
    the likelihood-ratio tokens (given words first, so each class's first is its given word)."""
    seeds = sorted({w for pair in zip(given, labels, strict=True) for w in pair})
    similar = synonyms(objective, seeds, settings.synonyms)
    sources = [
        [[word] for word in given],
        [[label] for label in labels],
        [similar[g] + similar[n] for g, n in zip(given, labels, strict=True)],
        llr_words(objective, template, objective.task.train, labels, settings),
    ]
    return merge_candidates(sources, settings.max_candidates)


def word_search_cost(task, pool: int, settings: WordSearch = WordSearch()) -> dict[str, int]:
    """What one search spends at most: pairs (the likelihood-ratio pass over the training
    examples, the candidate columns on the selection examples) and generated tokens."""
    train = len(task.train)
    examples = pool + (train if "train" in settings.select_on else 0)
    labels = len(task.labels or task.distinct_outputs())
    return {
        "pairs": (train if settings.llr_words else 0) + settings.max_candidates * examples,
        "tokens": (2 * labels * SYNONYM_TOKENS) if settings.synonyms else 0,
    }


class _Searching:
    label_words = "search"


def _selection(objective, select_on: str) -> list[Example]:
    """The examples of `select_on` ("train", "val" or "train+val"), each once (a task's val may
    repeat its train)."""
    train = objective.task.train if "train" in select_on else []
    examples = train + (list(objective.val_pool) if "val" in select_on else [])
    return list({ex.key(): ex for ex in examples}.values())


# ----------------------------------------------------------------------------- candidates
def merge_candidates(sources: Sequence[list[list[str]]], limit: int) -> list[list[str]]:
    """Per class, the words of each source in turn (earlier sources first), without repeats. A
    word belongs to the class that proposed it in the earliest source; proposed by two classes
    in that source, it is ambiguous and belongs to none."""
    owner: dict[str, int] = {}
    pools: list[list[str]] = [[] for _ in sources[0]]
    for source in sources:
        fresh: dict[str, set[int]] = {}
        for c, words in enumerate(source):
            for word in words:
                key = word.strip().lower()
                if key not in owner:
                    fresh.setdefault(key, set()).add(c)
        owner |= {key: min(cs) if len(cs) == 1 else -1 for key, cs in fresh.items()}
        for c, words in enumerate(source):
            for word in words:
                if owner[word.strip().lower()] == c and word not in pools[c]:
                    if len(pools[c]) < limit:
                        pools[c].append(word)
    # A class whose every word was ambiguous keeps its first one (two classes, one given word).
    return [pool or source[:1] for pool, source in zip(pools, sources[0], strict=True)]


def synonyms(objective, seeds: Sequence[str], count: int) -> dict[str, list[str]]:
    """Up to `count` words the LM lists as similar to each seed word (greedy, stored)."""
    found: dict[str, list[str]] = {seed: [] for seed in seeds}
    if not count or not seeds:
        return found
    prompts = [SYNONYM_PROMPT.format(word=seed) for seed in seeds]
    outputs = objective.generate(
        prompts, max_new_tokens=SYNONYM_TOKENS, stop=["\n"], seed=objective.seed, desc="label words"
    )
    for seed, (text, *_) in zip(seeds, outputs, strict=True):
        words = [w.strip().strip(".") for w in text.split(",")]
        kept = [w for w in words if _WORD.match(w) and w.lower() != seed.lower()]
        found[seed] = list(dict.fromkeys(kept))[:count]
    return found


def llr_words(
    objective, template: Prompt, train: Sequence[Example], labels: list[str], settings: WordSearch
) -> list[list[str]]:
    """Per class, the word tokens with the highest log-likelihood ratio for the class over the
    others at the answer position (empty lists for a model without a vocabulary to read)."""
    lm = objective.lm
    if not settings.llr_words or not hasattr(lm, "model") or not hasattr(lm, "tokenizer"):
        return [[] for _ in labels]
    ids, words = word_tokens(lm.tokenizer)
    objective.charge(len(train))  # one forward pass per training example
    with objective.timed("label words"):
        logp = answer_logprobs(lm, [template.context(ex.input) for ex in train], ids)
    gold = np.array([labels.index(ex.output) for ex in train])
    scores = np.full((len(labels), len(ids)), -np.inf)
    for c in range(len(labels)):
        inside, outside = logp[gold == c], logp[gold != c]
        if not len(inside) or not len(outside):
            continue
        likely = inside.mean(axis=0)
        ratio = likely - outside.mean(axis=0)
        top = np.argsort(-likely, kind="stable")[: settings.likely_words]
        scores[c, top] = ratio[top]
    best = scores.argmax(axis=0)  # a token counts for the class it favours most
    out = []
    for c in range(len(labels)):
        mine = np.flatnonzero((best == c) & np.isfinite(scores[c]))
        order = mine[np.argsort(-scores[c, mine], kind="stable")]
        out.append([words[i] for i in order[: settings.llr_words]])
    return out


_WORD_TOKENS: dict[tuple[str, int], tuple[np.ndarray, list[str]]] = {}


def word_tokens(tokenizer) -> tuple[np.ndarray, list[str]]:
    """The vocabulary's whole-word tokens: a space then 2+ letters (' great', ' World');
    decoded once per tokenizer (a second or two for a 50k vocabulary)."""
    vocab = len(tokenizer)
    name = (str(getattr(tokenizer, "name_or_path", "")), vocab)
    if name not in _WORD_TOKENS:
        _WORD_TOKENS[name] = _decode_words(tokenizer, vocab)
    return _WORD_TOKENS[name]


def _decode_words(tokenizer, vocab: int) -> tuple[np.ndarray, list[str]]:
    texts = tokenizer.batch_decode([[i] for i in range(vocab)])
    keep = [
        i
        for i, t in enumerate(texts)
        if t.startswith(" ") and len(t) > 2 and t[1:].isalpha() and t[1:].isascii()
    ]
    return np.array(keep, dtype=np.int64), [texts[i][1:] for i in keep]


def answer_logprobs(lm, contexts: Sequence[str], ids: np.ndarray, batch: int = 16) -> np.ndarray:
    """log p(token | context) at the position after each context, for the tokens `ids`.

    The decoder runs on right-padded batches and only each context's last hidden state goes
    through the output layer (the full-vocabulary projection is the costly part)."""
    import torch

    tokenizer, model, device = lm.tokenizer, lm.model, lm.device
    pad = tokenizer.pad_token_id or 0
    keep = torch.as_tensor(ids, device=device)
    rows = []
    for start in range(0, len(contexts), batch):
        encoded = [
            tokenizer(c.rstrip(), add_special_tokens=False).input_ids or [lm.prefix_token_id]
            for c in contexts[start : start + batch]
        ]
        width = max(len(e) for e in encoded)
        tokens = torch.tensor([e + [pad] * (width - len(e)) for e in encoded], device=device)
        mask = torch.arange(width)[None, :] < torch.tensor([len(e) for e in encoded])[:, None]
        with torch.inference_mode():
            hidden = model.get_decoder()(input_ids=tokens, attention_mask=mask.to(device).long())
            last = hidden.last_hidden_state[torch.arange(len(encoded)), mask.sum(1) - 1]
            logits = model.get_output_embeddings()(last).float()
        rows.append(torch.log_softmax(logits, dim=-1)[:, keep].cpu().numpy())
    return np.concatenate(rows)


# ----------------------------------------------------------------------------- choosing
def word_matrix(
    objective, template: Prompt, labels: list[str], pools: list[list[str]], examples
) -> np.ndarray:
    """(examples, classes, candidates) score of each class's k-th candidate word, in one
    stored, budgeted call (a class with fewer candidates repeats its last)."""
    width = max(len(p) for p in pools)
    columns = [
        template.with_label_words(
            {label: pool[min(k, len(pool) - 1)] for label, pool in zip(labels, pools, strict=True)}
        )
        for k in range(width)
    ]
    grid = objective.evaluate_train(columns, examples, origin="label words")
    return np.transpose(grid, (1, 2, 0))


def choose(
    matrix: np.ndarray, gold: np.ndarray, counts: list[int], settings: WordSearch
) -> list[tuple[tuple[int, ...], float, float]]:
    """Assignments (candidate index per class) by (accuracy, fit), best first; a beam swept
    class by class from the first candidates (the given words)."""
    classes = matrix.shape[1]
    seen: dict[tuple[int, ...], tuple[float, float]] = {}

    def rate(assignment: tuple[int, ...]) -> tuple[float, float]:
        if assignment not in seen:
            logits = _logits(matrix, assignment)
            shifted = logits - logits.max(axis=1, keepdims=True)
            logsoft = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
            accuracy = float(correct(matrix, gold, assignment).mean())
            seen[assignment] = (accuracy, float(logsoft[np.arange(len(gold)), gold].mean()))
        return seen[assignment]

    def order(items):  # best first; ties keep the order found (the given words first)
        return sorted(items, key=lambda a: tuple(-x for x in rate(a)))

    start = (0,) * classes
    beam = [start]
    rate(start)
    for _ in range(settings.sweeps):
        for c in range(classes):
            grown = {a[:c] + (k,) + a[c + 1 :] for a in beam for k in range(counts[c])}
            for a in sorted(grown):
                rate(a)
            beam = order(list(seen))[: settings.beam]
    return [(a, *seen[a]) for a in order(list(seen))]


def screened(
    matrix: np.ndarray, gold: np.ndarray, ranked: Sequence[tuple], alpha: float
) -> Iterator[tuple[tuple[int, ...], float, float, dict[str, Any] | None]]:
    """Each of `choose`'s assignments with its `paired_gain` against the given words (the
    first candidates) on the same examples; None for the given words themselves."""
    start = correct(matrix, gold, (0,) * matrix.shape[1])
    for picked, accuracy, fit in ranked:
        row = correct(matrix, gold, picked)
        yield picked, accuracy, fit, paired_gain(row, start, alpha) if any(picked) else None


def _logits(matrix: np.ndarray, assignment: Sequence[int]) -> np.ndarray:
    """(examples, classes) scores with each class's assigned candidate."""
    return matrix[:, np.arange(matrix.shape[1]), list(assignment)]


def correct(matrix: np.ndarray, gold: np.ndarray, assignment: Sequence[int]) -> np.ndarray:
    """1.0 where the assignment's most likely word is the gold class's (first on ties)."""
    return (_logits(matrix, assignment).argmax(axis=1) == gold).astype(np.float64)
