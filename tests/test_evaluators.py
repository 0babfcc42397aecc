"""Tests for the evaluators: real scoring on a tiny model, fake models for exact expectations."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
from ape.evaluators.base import Evaluator, available_evaluators, get_evaluator
from ape.evaluators.choice import ChoiceEvaluator
from ape.evaluators.generation import GenerationEvaluator
from ape.evaluators.loglik import LoglikEvaluator, LoglikSumEvaluator
from ape.evaluators.metrics import FIRST_SENTENCE, score

from ape.prompt import Prompt
from ape.reference import reference_loglikelihood
from ape.task import Example

EXAMPLES = [
    Example("hot", "cold"),
    Example("up", "down", ("below",)),
    Example("happy", "sad"),
]
PROMPTS = [
    Prompt("Write the opposite of the word."),
    Prompt("Give an antonym.", demos=(Example("big", "small"),)),
]


class CountingLM:
    """Delegates to a real model and records every call, to prove one call per grid."""

    def __init__(self, lm) -> None:
        self.lm = lm
        self.name = lm.name
        self.calls: list[list[tuple[str, str]]] = []

    def loglikelihood(self, requests, *, return_counts=False):
        self.calls.append(list(requests))
        return self.lm.loglikelihood(requests, return_counts=return_counts)


class FakeGenerator:
    """Answers each prompt text from a table; records the generate() calls."""

    name = "fake"

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = answers
        self.calls: list[tuple[list[str], dict]] = []

    def generate(self, prompts: Sequence[str], **kwargs) -> list[list[str]]:
        self.calls.append((list(prompts), kwargs))
        return [[self.answers[p]] for p in prompts]


class FakeScorer:
    """Log-likelihoods looked up by continuation (default -10); records the requests."""

    name = "fake"

    def __init__(self, by_continuation: dict[tuple[str, str], float]) -> None:
        self.table = by_continuation
        self.calls: list[list[tuple[str, str]]] = []

    def loglikelihood(self, requests, *, return_counts=False):
        self.calls.append(list(requests))
        return np.array([self.table.get(r, -10.0) for r in requests])


# ------------------------------------------------------------------- log-likelihood


def test_loglik_matches_lm_and_reference(tiny_lm):
    lm = CountingLM(tiny_lm)
    mean = LoglikEvaluator().score(lm, PROMPTS, EXAMPLES)
    total = LoglikSumEvaluator().score(lm, PROMPTS, EXAMPLES)
    assert mean.shape == total.shape == (len(PROMPTS), len(EXAMPLES))
    assert len(lm.calls) == 2  # one call per evaluator for the whole grid

    requests = [r for p in PROMPTS for r in p.requests(EXAMPLES)]
    assert lm.calls[0] == requests
    sums, counts = tiny_lm.loglikelihood(requests, return_counts=True)
    np.testing.assert_allclose(total.ravel(), sums, rtol=0, atol=1e-9)
    np.testing.assert_allclose(mean.ravel(), sums / counts, rtol=0, atol=1e-9)

    reference = reference_loglikelihood(tiny_lm, requests)
    np.testing.assert_allclose(total.ravel(), reference, rtol=0, atol=1e-4)
    np.testing.assert_allclose(mean.ravel(), reference / counts, rtol=0, atol=1e-4)


def test_loglik_names_and_empty_grid(tiny_lm):
    assert LoglikEvaluator().name == "loglik"
    assert LoglikSumEvaluator().name == "loglik_sum"
    assert LoglikEvaluator(reduce="sum").name == "loglik_sum"
    assert LoglikEvaluator().score(tiny_lm, PROMPTS, []).shape == (2, 0)
    with pytest.raises(ValueError, match="reduce"):
        LoglikEvaluator(reduce="max")  # type: ignore[arg-type]


# ------------------------------------------------------------------- generation


def test_generation_scores_rendered_prompts():
    prompt = PROMPTS[1]
    # Leading spaces mimic the " " + output convention; the evaluator strips them.
    replies = {"hot": " cold", "up": " it goes below", "happy": " Sad."}
    lm = FakeGenerator({prompt.render(k): v for k, v in replies.items()})

    em = GenerationEvaluator().score(lm, [prompt], EXAMPLES)
    np.testing.assert_array_equal(em, [[1.0, 0.0, 1.0]])
    contains = GenerationEvaluator(metric="contains", max_new_tokens=5).score(
        lm, [prompt], EXAMPLES
    )
    np.testing.assert_array_equal(contains, [[1.0, 1.0, 1.0]])

    texts, kwargs = lm.calls[-1]
    assert texts == [prompt.render(ex.input) for ex in EXAMPLES]
    assert kwargs["stop"] == ["\n", "."] and kwargs["temperature"] == 0.0
    assert kwargs["max_new_tokens"] == 5
    GenerationEvaluator(metric="accuracy").score(lm, [prompt], EXAMPLES)
    assert lm.calls[-1][1]["stop"] == ["\n"]  # labels are compared whole, dots included


@pytest.mark.parametrize("metric", sorted(FIRST_SENTENCE))
def test_text_after_the_first_sentence_changes_no_score(metric):
    """Why generation may stop at the first ".": these metrics score the first sentence only."""
    answers = ["cold", "very cold", "ice and snow", "3"]
    for first in ("cold", "Very cold", " ice, snow and", "3", "", "the answer is cold"):
        for rest in (". It is cold", ".", ".5 and more. Sentence 1: cold", "..x"):
            assert score(first + rest, answers, metric) == score(first, answers, metric)


def test_generation_grid_is_one_call_in_prompt_major_order():
    lm = FakeGenerator({p.render(ex.input): ex.output for p in PROMPTS for ex in EXAMPLES})
    evaluator = GenerationEvaluator()
    scores = evaluator.score(lm, PROMPTS, EXAMPLES)
    assert scores.shape == (2, 3) and scores.min() == 1.0
    assert len(lm.calls) == 1
    assert evaluator.predictions(lm, PROMPTS, EXAMPLES)[1] == ["cold", "down", "sad"]
    with pytest.raises(ValueError, match="unknown metric"):
        GenerationEvaluator(metric="bleu")


# ------------------------------------------------------------------- choice


SENTIMENT = [Example("great film", "pos"), Example("awful film", "neg")]


def test_choice_argmax_with_multi_token_verbalizers():
    prompts = [Prompt("Classify."), Prompt("Sentiment?")]
    verbalizers = {"pos": "very good", "neg": "very bad"}
    good, bad = Prompt.continuation("very good"), Prompt.continuation("very bad")
    # Prompt 0 gets both examples right; prompt 1 says "very good" to everything.
    table = {
        (prompts[0].context("great film"), good): -1.0,
        (prompts[0].context("awful film"), bad): -1.0,
        (prompts[1].context("great film"), good): -1.0,
        (prompts[1].context("awful film"), good): -1.0,
    }
    lm = FakeScorer(table)
    evaluator = ChoiceEvaluator(verbalizers=verbalizers)
    assert evaluator.resolve_labels(SENTIMENT) == ["pos", "neg"]  # the mapping's order

    np.testing.assert_array_equal(evaluator.score(lm, prompts, SENTIMENT), [[1, 1], [1, 0]])
    assert len(lm.calls) == 1
    assert lm.calls[0][:2] == [
        (prompts[0].context("great film"), " very good"),
        (prompts[0].context("great film"), " very bad"),
    ]
    assert len(lm.calls[0]) == 2 * 2 * 2

    logprobs = evaluator.label_logprobs(lm, prompts, SENTIMENT)
    assert logprobs.shape == (2, 2, 2)
    assert logprobs[1, 1].tolist() == [-1.0, -10.0]


def test_choice_labels_default_to_sorted_outputs():
    evaluator = ChoiceEvaluator()
    assert evaluator.resolve_labels(SENTIMENT) == ["neg", "pos"]
    # " pos" wins for both inputs: right for the first, wrong for the second.
    lm = FakeScorer({(Prompt().context(ex.input), " pos"): -0.5 for ex in SENTIMENT})
    np.testing.assert_array_equal(evaluator.score(lm, [Prompt()], SENTIMENT), [[1.0, 0.0]])
    assert [c for _, c in lm.calls[0]] == [" neg", " pos", " neg", " pos"]
    # Sequence verbalizers align with the (sorted) labels.
    lm = FakeScorer({})
    ChoiceEvaluator(verbalizers=["bad", "good"]).score(lm, [Prompt()], SENTIMENT)
    assert [c for _, c in lm.calls[0]][:2] == [" bad", " good"]


def test_choice_rejects_unknown_labels():
    lm = FakeScorer({})
    with pytest.raises(ValueError, match="'neutral'"):
        ChoiceEvaluator(labels=["pos", "neg"]).score(
            lm, [Prompt()], [*SENTIMENT, Example("ok film", "neutral")]
        )
    assert not lm.calls  # checked before any model time is spent
    with pytest.raises(ValueError, match="aligned"):
        ChoiceEvaluator(verbalizers=["only one"]).score(lm, [Prompt()], SENTIMENT)


def test_choice_label_logprobs_on_real_model(tiny_lm):
    evaluator = ChoiceEvaluator(labels=["pos", "neg"], verbalizers={"pos": "quite positive"})
    logprobs = evaluator.label_logprobs(tiny_lm, PROMPTS, SENTIMENT)
    requests = [
        (p.context(ex.input), p.continuation(w))
        for p in PROMPTS
        for ex in SENTIMENT
        for w in ("quite positive", "neg")
    ]
    expected = reference_loglikelihood(tiny_lm, requests).reshape(2, 2, 2)
    np.testing.assert_allclose(logprobs, expected, rtol=0, atol=1e-4)
    scores = evaluator.score(tiny_lm, PROMPTS, SENTIMENT)
    gold = np.array([0, 1])
    np.testing.assert_array_equal(scores, (expected.argmax(-1) == gold).astype(float))


# ------------------------------------------------------------------- registry


def test_entry_points_resolve_all_four():
    assert available_evaluators() == ["choice", "generation", "loglik", "loglik_sum"]
    expected = {
        "loglik": LoglikEvaluator,
        "loglik_sum": LoglikSumEvaluator,
        "generation": GenerationEvaluator,
        "choice": ChoiceEvaluator,
    }
    for name, cls in expected.items():
        evaluator = get_evaluator(name)
        assert type(evaluator) is cls and evaluator.name == name
        assert isinstance(evaluator, Evaluator)


def test_get_evaluator_options_and_unknown_name():
    assert get_evaluator("generation", metric="contains").metric == "contains"
    assert get_evaluator("choice", labels=["a", "b"]).labels == ["a", "b"]
    with pytest.raises(ValueError) as err:
        get_evaluator("x")
    assert str(err.value) == (
        "unknown evaluator 'x'; choose one of: choice, generation, loglik, loglik_sum"
    )


# ------------------------------------------------------------------- capabilities


def test_each_evaluator_declares_what_it_offers():
    from ape.capabilities import LABEL_LOGPROBS, LOGLIK_SCORES, TRAINING_LOSS, offered

    assert offered(ChoiceEvaluator) == {LABEL_LOGPROBS, TRAINING_LOSS}
    assert offered(get_evaluator("loglik")) == {LOGLIK_SCORES, TRAINING_LOSS}
    assert offered(get_evaluator("loglik_sum")) == {LOGLIK_SCORES, TRAINING_LOSS}
    assert offered(GenerationEvaluator) == frozenset()
    assert offered(object()) == frozenset()  # a plugin that declares nothing offers nothing


def test_options_come_from_the_task_through_each_evaluator():
    from ape.evaluation import evaluator_options
    from ape.task import Task

    task = Task(
        "t",
        train=[Example("a", "x")],
        val=[Example("b", "y")],
        test=[Example("c", "x")],
        metric="contains",
        labels=["x", "y"],
        verbalizers={"x": "ex"},
    )
    assert evaluator_options("generation", task) == {"metric": "contains"}
    assert evaluator_options("choice", task) == {"labels": ["x", "y"], "verbalizers": {"x": "ex"}}
    assert evaluator_options("loglik", task) == {}
    # Given options win over the task's.
    assert evaluator_options("generation", task, metric="em") == {"metric": "em"}
    bare = Task("u", train=[Example("a", "x")], val=[Example("b", "y")], test=[Example("c", "x")])
    assert evaluator_options("choice", bare) == {"labels": bare.distinct_outputs()}
    with pytest.raises(ValueError, match="unknown evaluator 'x'"):
        evaluator_options("x", task)


def test_a_mismatch_is_reported_in_one_line_with_the_evaluators_that_fit():
    from ape.capabilities import check, mismatch

    class Needy:
        name = "needy"
        needs = frozenset({"label_logprobs"})

    class Easy:
        name = "easy"

    assert mismatch(Needy, get_evaluator("choice")) is None
    assert mismatch(Easy, get_evaluator("generation")) is None  # no needs: anything serves
    with pytest.raises(ValueError) as err:
        check(Needy, get_evaluator("loglik"))
    assert str(err.value) == (
        "searcher 'needy' needs an evaluator with label log-probs; 'loglik' offers a training "
        "loss and log-likelihood scores (use --evaluator choice)"
    )


def test_training_losses_match_the_scores_they_smooth(tiny_lm):
    """At the same vectors, the loglik losses (both reductions) are minus the mean per-token
    log-likelihood the scorer gives, and the choice loss is the cross-entropy of the label words'
    log-likelihoods."""
    import torch

    vectors = torch.zeros(2, tiny_lm.model.get_input_embeddings().weight.shape[1])
    loglik = get_evaluator("loglik").training_loss(tiny_lm, Prompt(""), EXAMPLES)
    total = get_evaluator("loglik_sum").training_loss(tiny_lm, Prompt(""), EXAMPLES)
    sums, counts = tiny_lm.loglikelihood(
        Prompt("").requests(EXAMPLES), return_counts=True, soft_prefix=vectors
    )
    expected = -float(np.mean(np.asarray(sums) / np.asarray(counts)))
    assert loglik(vectors, EXAMPLES).item() == pytest.approx(expected, abs=1e-4)
    assert total(vectors, EXAMPLES).item() == pytest.approx(expected, abs=1e-4)  # per token too
    choice = ChoiceEvaluator(verbalizers={"cold": "c", "down": "d", "sad": "s"})
    loss = choice.training_loss(tiny_lm, Prompt(""), EXAMPLES)
    logits = tiny_lm.loglikelihood(
        [(Prompt("").context(e.input), f" {w}") for e in EXAMPLES for w in "cds"],
        soft_prefix=vectors,
    ).reshape(3, 3)
    logits = torch.as_tensor(logits)
    gold = torch.tensor([0, 1, 2])
    expected = float(torch.nn.functional.cross_entropy(logits, gold))
    assert loss(vectors, EXAMPLES).item() == pytest.approx(expected, abs=1e-4)


def test_answers_under_em_get_room_for_twice_the_longest_reference(tiny_lm):
    longest = max(
        len(tiny_lm.tokenizer(" " + a, add_special_tokens=False)["input_ids"])
        for ex in EXAMPLES
        for a in ex.answers
    )
    assert GenerationEvaluator().answer_room(tiny_lm, EXAMPLES) == 2 * longest + 4 < 32
    assert GenerationEvaluator(metric="es", max_new_tokens=3).answer_room(tiny_lm, EXAMPLES) == 3
    for metric in ("f1", "contains", "accuracy"):  # a long answer can still score under these
        assert GenerationEvaluator(metric=metric).answer_room(tiny_lm, EXAMPLES) == 32
    lm = FakeGenerator({})  # no tokenizer: the configured limit
    assert GenerationEvaluator().answer_room(lm, EXAMPLES) == 32
