"""Weight-left linear layers (ape/cpu_linear.py) compute what nn.Linear computes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ape import cpu_linear
from ape.cpu_linear import SMALL_ROWS, WeightLeftLinear, use_weight_left
from ape.lm import HFLanguageModel
from ape.models import load_model

# One row, a few, exactly SMALL_ROWS (weight-left), beyond it (plain), a 3-D batch.
SHAPES = [(1, 24), (3, 5, 24), (SMALL_ROWS, 24), (2, SMALL_ROWS, 24), (7, 1, 24)]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_weight_left_matches_nn_linear(shape, bias):
    torch.manual_seed(0)
    plain = nn.Linear(24, 40, bias=bias)
    left = WeightLeftLinear(24, 40, bias=bias)
    left.load_state_dict(plain.state_dict())
    x = torch.randn(shape)
    with torch.inference_mode():
        want, got = plain(x), left(x)
    assert got.shape == want.shape and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_with_gradients_it_is_the_plain_product():
    torch.manual_seed(0)
    plain = nn.Linear(8, 6)
    left = WeightLeftLinear(8, 6)
    left.load_state_dict(plain.state_dict())
    x = torch.randn(4, 8, requires_grad=True)
    (plain(x) ** 2).sum().backward()
    grad = x.grad.clone()
    x.grad = None
    (left(x) ** 2).sum().backward()
    torch.testing.assert_close(x.grad, grad, rtol=0, atol=0)
    torch.testing.assert_close(left.weight.grad, plain.weight.grad, rtol=0, atol=0)


def test_swapping_keeps_the_parameters_and_the_scores(tiny_lm):
    model = copy.deepcopy(tiny_lm.model)
    before = {name: p.data_ptr() for name, p in model.named_parameters()}
    linears = sum(type(m) is nn.Linear for m in model.modules())
    assert use_weight_left(model) == linears > 0
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == before
    swapped = HFLanguageModel(model, tiny_lm.tokenizer, name="tiny", prefix_cache_bytes=0)
    requests = [("Input: cold\nOutput:", " hot"), ("Say a word.", " yes please")] * 3
    torch.testing.assert_close(
        torch.tensor(swapped.loglikelihood(requests)),
        torch.tensor(tiny_lm.loglikelihood(requests)),
        rtol=1e-5,
        atol=1e-5,
    )


def test_tied_weights_stay_tied(tiny_lm):
    model = copy.deepcopy(tiny_lm.model)
    model.lm_head.weight = model.model.embed_tokens.weight
    use_weight_left(model)
    assert isinstance(model.lm_head, WeightLeftLinear)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_load_model_swaps_when_turned_on_and_not_when_off(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("APE_WEIGHT_LEFT", "1")
    lm = load_model(str(tiny_model_dir), device="cpu")
    assert isinstance(lm.model.lm_head, WeightLeftLinear)
    monkeypatch.setenv("APE_WEIGHT_LEFT", "0")
    lm = load_model(str(tiny_model_dir), device="cpu")
    assert type(lm.model.lm_head) is nn.Linear


@pytest.mark.parametrize(("vendor", "expected"), [("AuthenticAMD", True), ("GenuineIntel", False)])
def test_default_follows_the_cpu_vendor(vendor, expected, monkeypatch):
    monkeypatch.delenv("APE_WEIGHT_LEFT", raising=False)
    monkeypatch.setattr(cpu_linear, "cpu_vendor", lambda: vendor)
    assert cpu_linear.wanted(torch.device("cpu")) is expected
    assert not cpu_linear.wanted(torch.device("cuda"))


def test_a_weight_left_setting_other_than_1_or_0_is_an_error(monkeypatch):
    monkeypatch.setenv("APE_WEIGHT_LEFT", "yes")
    with pytest.raises(ValueError, match="APE_WEIGHT_LEFT must be 1 .* got 'yes'"):
        cpu_linear.wanted(torch.device("cpu"))
