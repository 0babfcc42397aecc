"""PEFT round trips: each kind of soft prompt exported with `SoftPrompt.export_peft`, loaded with
`peft.PeftModel.from_pretrained`, scores as ape scores it (GQA included: the tiny model has 4
query heads and 2 KV heads, SmolLM2 9 and 3)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from ape.search.soft.init import initial_kv
from ape.search.soft.prompt import SoftPrompt
from test_soft_prompt import REQUESTS, TOL, soft_vectors

import ape
import ape.kv_cache as kv_cache

peft = pytest.importorskip("peft", reason="peft is not installed (pip install -e '.[dev]')")

KINDS = {
    "prompt": ("PROMPT_TUNING", {"mode": "continuous"}),
    "ptuning": ("P_TUNING", {"mode": "ptuning", "encoder": "lstm", "encoder_hidden": 64}),
    "prefix": ("PREFIX_TUNING", {"mode": "prefix"}),
}


def soft_prompt(lm, kind: str, n: int = 6) -> SoftPrompt:
    """Vectors near the embedding table (for a kv prefix: the model's keys and values for them,
    moved a little), as training leaves them."""
    table = lm.model.get_input_embeddings().weight.detach().float().cpu()
    vectors = table[[100, 2000, 3000, 4000, 5000, 6000][:n]] + soft_vectors(lm, n=n)
    if kind == "prefix":
        kv = initial_kv(lm, vectors)
        vectors = kv + 0.1 * kv.std() * torch.randn(kv.shape, generator=torch.Generator())
    return SoftPrompt(vectors, lm.name, dict(KINDS[kind][1]))


def peft_scores(wrapped, lm, requests, virtual: int) -> np.ndarray:
    """Log-prob sums from the PEFT model, one request at a time; `virtual` positions of its
    output belong to the virtual tokens (prompt tuning, P-tuning) or none (prefix tuning)."""
    out = []
    with torch.inference_mode():
        for context, continuation in lm.encode_pairs(requests):
            ids = torch.tensor([context + continuation], device=lm.device)
            logits = wrapped(input_ids=ids).logits[0, virtual:].float()
            logprobs = logits[len(context) - 1 : -1].log_softmax(-1)
            targets = torch.tensor(continuation, device=lm.device)
            out.append(float(logprobs[torch.arange(len(continuation)), targets].sum()))
    return np.array(out)


def round_trip(lm, soft: SoftPrompt, folder, requests) -> float:
    """max |ape - PEFT| over `requests` after an export and a `from_pretrained`."""
    soft.export_peft(folder, lm)
    wrapped = peft.PeftModel.from_pretrained(copy.deepcopy(lm.model), folder).eval()
    ours = lm.loglikelihood(requests, soft_prefix=soft.vectors)
    virtual = 0 if soft.kind == "kv" else soft.n
    return float(np.abs(ours - peft_scores(wrapped, lm, requests, virtual)).max())


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_kind_round_trips_through_peft(tiny_lm, tmp_path, kind):
    soft = soft_prompt(tiny_lm, kind)
    requests = [r for r in REQUESTS if r[0]]
    assert round_trip(tiny_lm, soft, tmp_path / kind, requests) <= TOL
    config = json.loads((tmp_path / kind / "adapter_config.json").read_text())
    assert config["peft_type"] == KINDS[kind][0] and config["num_virtual_tokens"] == soft.n
    if kind == "prefix":  # sized by the KV heads, not the query heads (GQA)
        _, heads, dim = kv_cache.kv_shape(tiny_lm.model)
        assert (config["num_attention_heads"], config["token_dim"]) == (heads, heads * dim)
    if kind == "ptuning":
        assert config["encoder_reparameterization_type"] == "LSTM"


def test_a_trained_prefix_round_trips(tiny_lm, tmp_path, single_thread):
    """A prefix as the searcher leaves it (saved, loaded back) exports and scores the same."""
    from test_soft_prompt import _sentiment_task

    result = ape.optimize(
        _sentiment_task(),
        model=tiny_lm,
        searcher="soft",
        evaluator="choice",
        progress=False,
        mode="prefix",
        encoder="mlp",
        steps=2,
        eval_every=1,
    )
    path = result.save(tmp_path / "run.json")
    soft = SoftPrompt.load(ape.Result.load(path).file("soft_prompt", path))
    requests = [(f"Input: {e.input}\nOutput:", " good") for e in _sentiment_task().test]
    assert round_trip(tiny_lm, soft, tmp_path / "adapter", requests) <= TOL


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(KINDS))
def test_embedded_model_round_trips_through_peft(tmp_path, kind):
    """SmolLM2-135M (30 layers, 9 query heads, 3 KV heads): every kind within 1e-4."""
    lm = ape.load_model()
    soft = soft_prompt(lm, kind, n=4)
    requests = [(f"Input: {w}\nOutput:", f" {y}") for w, y in [("hot", "cold"), ("up", "down")]]
    requests += [r for r in REQUESTS[:4]]
    assert round_trip(lm, soft, tmp_path / kind, requests) <= TOL
