"""Linear layers that put the weight on the left of the product for few rows, on a CPU.

`F.linear(x, W)` computes x @ W.T. With MKL on an AMD EPYC and the weights read from memory (a
whole model does not fit in cache), that layout runs up to 1.5x slower than W @ x.T for a few
rows (a decoding step feeds 1-32); from about 128 rows on, the two are equal or x @ W.T is
ahead. The result is the same product summed in another order (float rounding apart).
benchmarks/scoring/linear_layout.py measures it: there, a decoding run 1.3x faster, scoring
unchanged. MKL picks its kernels by CPU vendor, and on an Intel Xeon (AVX-512) x @ W.T is the
faster one at every row count (weight-left: decoding 0.94x, 2-64 rows 0.42-0.91x), so the
default follows the vendor.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ape.device import cpu_vendor

SMALL_ROWS = 64  # up to this many rows, a product runs weight-left


class WeightLeftLinear(nn.Linear):
    """An `nn.Linear` (the same parameters) that computes (W @ x.T).T where that is faster.

    Only without gradients: training keeps the plain product, whose backward is the tested one.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // max(x.shape[-1], 1)
        if rows > SMALL_ROWS or torch.is_grad_enabled() or x.device.type != "cpu":
            return super().forward(x)
        flat = x.reshape(rows, x.shape[-1])
        out = (self.weight @ flat.T).T.contiguous()
        if self.bias is not None:
            out += self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


# CPU vendors on which weight-left products were measured faster (see the module docstring).
FASTER_ON = frozenset({"AuthenticAMD"})


def wanted(device: torch.device) -> bool:
    """Whether models loaded onto `device` get weight-left layers: on a CPU, $APE_WEIGHT_LEFT=1
    or 0 turns them on or off; unset, on a CPU whose vendor is in FASTER_ON."""
    if device.type != "cpu":
        return False
    setting = os.environ.get("APE_WEIGHT_LEFT")
    if setting is None:
        return cpu_vendor() in FASTER_ON
    if setting not in ("0", "1"):
        raise ValueError(f"APE_WEIGHT_LEFT must be 1 (on) or 0 (off), got {setting!r}")
    return setting == "1"


def use_weight_left(model: nn.Module) -> int:
    """Swap each float32 `nn.Linear` of `model` for a `WeightLeftLinear` holding the same
    parameters (tied weights stay tied); returns how many were swapped."""
    swapped = 0
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or module.weight.dtype != torch.float32:
            continue
        faster = WeightLeftLinear(
            module.in_features, module.out_features, bias=module.bias is not None, device="meta"
        )
        faster.weight = module.weight
        faster.bias = module.bias
        model.set_submodule(name, faster)
        swapped += 1
    return swapped
