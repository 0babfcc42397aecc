"""The evaluator conformance suite: every registered evaluator, through the same tests.

Each is built as a run builds it (`make_evaluator`: the options it takes from the task filled
in) and scored on the tiny model. What it declares in `offers` is held to the methods that
capability promises (ape/capabilities.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ape.evaluators.base import available_evaluators

from ape.capabilities import DESCRIPTIONS, LABEL_LOGPROBS, TRAINING_LOSS, offered
from ape.evaluation import make_evaluator
from ape.prompt import Prompt
from ape.task import Example, load_task

pytestmark = pytest.mark.usefixtures("single_thread")

EVALUATORS = available_evaluators()
PROMPTS = [
    Prompt(""),
    Prompt("Reverse the word."),
    Prompt(
        "Spell the word backwards.", demos=(Example("stone", "enots"), Example("cloud", "duolc"))
    ),
]


@pytest.fixture(scope="module")
def task(task_file):
    return load_task(task_file)


@pytest.fixture(scope="module")
def examples(task) -> list[Example]:
    return task.val[:4]


@pytest.mark.parametrize("name", EVALUATORS)
def test_score_has_one_row_per_prompt_and_one_column_per_example(name, task, examples, tiny_lm):
    evaluator = make_evaluator(name, task)
    assert evaluator.name == name
    grid = evaluator.score(tiny_lm, PROMPTS, examples)
    assert isinstance(grid, np.ndarray) and grid.shape == (len(PROMPTS), len(examples))
    assert np.issubdtype(grid.dtype, np.floating) and np.isfinite(grid).all()


@pytest.mark.parametrize("name", EVALUATORS)
def test_empty_input_gives_an_empty_grid(name, task, examples, tiny_lm):
    evaluator = make_evaluator(name, task)
    assert evaluator.score(tiny_lm, [], examples).shape == (0, len(examples))
    assert evaluator.score(tiny_lm, PROMPTS, []).shape == (len(PROMPTS), 0)
    assert evaluator.score(tiny_lm, [], []).shape == (0, 0)


@pytest.mark.parametrize("name", EVALUATORS)
def test_batched_equals_one_by_one(name, task, examples, tiny_lm):
    evaluator = make_evaluator(name, task)
    together = evaluator.score(tiny_lm, PROMPTS, examples)
    alone = [[evaluator.score(tiny_lm, [p], [e])[0, 0] for e in examples] for p in PROMPTS]
    np.testing.assert_allclose(together, np.array(alone), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", EVALUATORS)
def test_declared_capabilities_keep_their_promise(name, task, examples, tiny_lm):
    evaluator = make_evaluator(name, task)
    declared = offered(evaluator)
    assert declared <= DESCRIPTIONS.keys(), f"unknown: {sorted(declared - DESCRIPTIONS.keys())}"
    if LABEL_LOGPROBS in declared:
        labels, words = evaluator.label_words(examples)
        assert labels == evaluator.resolve_labels(examples) and len(words) == len(labels)
        grid = np.asarray(evaluator.label_logprobs(tiny_lm, PROMPTS, examples))
        assert grid.shape == (len(PROMPTS), len(examples), len(labels))
        assert np.isfinite(grid).all() and (grid <= 0).all()
    if TRAINING_LOSS in declared:
        loss_fn = evaluator.training_loss(tiny_lm, Prompt(""), examples)
        width = tiny_lm.model.get_input_embeddings().weight.shape[1]
        vectors = torch.zeros(3, width, requires_grad=True)
        loss = loss_fn(vectors, examples[:2])
        assert loss.dim() == 0 and torch.isfinite(loss)
        loss.backward()
        assert vectors.grad is not None and vectors.grad.abs().sum() > 0
