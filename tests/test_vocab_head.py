"""The chunked vocabulary head gives what one log-softmax over every position gives."""

from __future__ import annotations

import pytest
import torch

import ape.vocab_head as vocab_head


@pytest.mark.parametrize("head_rows", [1, 3, 4, 128])
def test_read_logprobs_match_one_log_softmax(tiny_lm, monkeypatch, head_rows):
    monkeypatch.setattr(vocab_head, "HEAD_ROWS", head_rows)
    model = tiny_lm.model
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, model.config.hidden_size, generator=generator)
    # Reads out of order, several on one position, one position read by none.
    which = torch.tensor([9, 0, 4, 4, 7, 1, 9, 2, 3, 5, 6, 0])
    vocab = model.config.vocab_size
    targets = torch.randint(0, vocab, (len(which),), generator=generator)
    with torch.inference_mode():
        logprob, pick = vocab_head.read_logprobs(model, hidden, which, targets, pick=True)
        full = vocab_head.logits_of(model, hidden).log_softmax(-1)
    torch.testing.assert_close(logprob, full[which, targets], rtol=0, atol=1e-6)
    assert torch.equal(pick, full.argmax(-1)[which])
    _, no_pick = vocab_head.read_logprobs(model, hidden, which, targets, pick=False)
    assert no_pick is None


def test_chunks_carry_gradients(tiny_lm):
    model = tiny_lm.model
    hidden = torch.randn(5, model.config.hidden_size, requires_grad=True)
    which = torch.tensor([4, 0, 2])
    logprob, _ = vocab_head.read_logprobs(model, hidden, which, torch.tensor([1, 2, 3]), False)
    logprob.sum().backward()
    assert hidden.grad is not None
    assert hidden.grad[[0, 2, 4]].abs().sum() > 0 and hidden.grad[[1, 3]].abs().sum() == 0
