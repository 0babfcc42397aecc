"""What training updates, and the vectors it makes: one small module per mode.

Each module's `forward()` returns the tensor the scorer takes as `soft_prefix`: [n, d_model]
input embeddings (prompt tuning, PEZ, P-tuning) or [layers, 2, kv_heads, n, head_dim] keys and
values (prefix tuning). Every one starts at `start`, so step 0 scores exactly as the initial
prompt: a reparameterization adds a term whose last layer starts at zero.

- `Direct`: the vectors themselves (prompt tuning).
- `ScaledKV`: a key/value prefix, start + per-layer spread x a trained offset, so one learning
  rate moves keys (spread ~2 in SmolLM2) and values (~0.05 to 1.2) alike.
- `PrefixMLP`: Li & Liang's reparameterization: a trained [n, d_model] matrix through a two-layer
  MLP (tanh) to every layer's keys and values, added to the start (only the result is kept).
- `PromptEncoder`: P-tuning (Liu et al. 2021): trained pseudo-token embeddings through an MLP,
  or a bidirectional LSTM and an MLP head, added to the start.
"""

from __future__ import annotations

import torch
from torch import nn


class Direct(nn.Module):
    """The vectors are the parameters."""

    def __init__(self, start: torch.Tensor):
        super().__init__()
        self.vectors = nn.Parameter(start.clone())

    def forward(self) -> torch.Tensor:
        return self.vectors


def kv_spread(start: torch.Tensor) -> torch.Tensor:
    """Per layer, the spread of the start's keys and of its values: [layers, 2, 1, 1, 1]."""
    spread = start.flatten(2).std(dim=-1, correction=0)
    return spread.clamp_min(1e-3)[..., None, None, None]


class ScaledKV(nn.Module):
    """A key/value prefix trained as an offset in units of each layer's key or value spread."""

    def __init__(self, start: torch.Tensor):
        super().__init__()
        self.register_buffer("start", start.clone())
        self.register_buffer("spread", kv_spread(start))
        self.offset = nn.Parameter(torch.zeros_like(start))

    def forward(self) -> torch.Tensor:
        return self.start + self.spread * self.offset


class PrefixMLP(nn.Module):
    """start + spread x MLP(P): P is [n, d_model], the MLP's last layer starts at zero."""

    def __init__(self, start: torch.Tensor, seeds: torch.Tensor, hidden: int):
        super().__init__()
        layers, _, heads, n, dim = start.shape
        self.register_buffer("start", start.clone())
        self.register_buffer("spread", kv_spread(start))
        self.seeds = nn.Parameter(seeds.clone())  # [n, d_model]: the init text's embeddings
        width, out = seeds.shape[1], layers * 2 * heads * dim
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.Tanh(), nn.Linear(hidden, out))
        _zero(self.mlp[-1])

    def forward(self) -> torch.Tensor:
        layers, _, heads, n, dim = self.start.shape
        out = self.mlp(self.seeds).view(n, layers, 2, heads, dim).permute(1, 2, 3, 0, 4)
        return self.start + self.spread * out


class PromptEncoder(nn.Module):
    """start + head(encoder(E)): E are trained pseudo-token embeddings starting at `start`."""

    def __init__(self, start: torch.Tensor, kind: str, hidden: int):
        super().__init__()
        if kind not in ("mlp", "lstm"):
            raise ValueError(f"a prompt encoder is 'mlp' or 'lstm', not {kind!r}")
        width = start.shape[1]
        self.register_buffer("start", start.clone())
        self.inputs = nn.Parameter(start.clone())
        self.lstm = None
        if kind == "lstm":
            self.lstm = nn.LSTM(width, hidden, bidirectional=True, batch_first=True)
        first = 2 * hidden if self.lstm is not None else width
        # PEFT's heads: MLP d -> h -> h -> d (ReLU); after the LSTM, 2h -> 2h -> d.
        sizes = [first, hidden, hidden] if self.lstm is None else [first, first]
        blocks: list[nn.Module] = []
        for a, b in zip(sizes, sizes[1:], strict=False):
            blocks += [nn.Linear(a, b), nn.ReLU()]
        self.head = nn.Sequential(*blocks, nn.Linear(sizes[-1], width))
        _zero(self.head[-1])

    def forward(self) -> torch.Tensor:
        x = self.inputs
        if self.lstm is not None:
            x = self.lstm(x[None])[0][0]
        return self.start + self.head(x)


def _zero(layer: nn.Linear) -> None:
    """A last layer at zero: the sum starts at `start`, and its gradient is not zero."""
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
