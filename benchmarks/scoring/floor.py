"""The GEMM floor of a scoring workload: the time its unavoidable matrix multiplies take at the
rate this machine multiplies the model's own layer shapes, in the model's dtype.

Unavoidable: every token left after prefix sharing (ape/packing.py's grouping: a group's prefix
once, then each row's own tokens) goes through every linear layer of the blocks (2 FLOPs per
weight), and every scored position through the vocabulary head. Attention, norms and the rest
are left out, so the floor is a lower bound. The rate is measured in the same run: the model's
own linear layers on `rows` random rows, median of `repeats`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

import ape.packing as packing
from ape.lm import HFLanguageModel, Request


def shared_tokens(lm: HFLanguageModel, requests: Sequence[Request]) -> tuple[int, int]:
    """(tokens the model must run after prefix sharing, positions read off the head)."""
    rows = packing.make_rows(lm.encode_pairs(requests), max_length=10**9)
    tokens = sum(
        g.prefix_len + sum(len(r.tokens) - g.prefix_len for r in g.rows)
        for g in packing.group_rows(rows)
    )
    return tokens, sum(len(r.reads) for r in rows)


def _block_linears(model: torch.nn.Module) -> list[torch.nn.Linear]:
    head = model.get_output_embeddings()
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]


def linear_pass(layers: list[torch.nn.Linear], rows: int) -> Callable[[], None]:
    """Run each of `layers` once on its own `rows` random rows (weights read from memory, as in
    a forward pass)."""
    dtype = layers[0].weight.dtype
    inputs = {m.in_features: torch.randn(rows, m.in_features, dtype=dtype) for m in layers}

    def run() -> None:
        for layer in layers:
            layer(inputs[layer.in_features])

    return run


def gemm_rate(model: torch.nn.Module, rows: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of the model's block linear layers on `rows` rows (its dtype, this machine)."""
    layers = _block_linears(model)
    run = linear_pass(layers, rows)
    flops = sum(2 * rows * m.in_features * m.out_features for m in layers)
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):  # the first is a warm-up
            began = time.perf_counter()
            run()
            times.append(time.perf_counter() - began)
    return flops / statistics.median(times[1:])


def floor(lm: HFLanguageModel, requests: Sequence[Request], rate: float) -> dict[str, Any]:
    """The workload's GEMM floor in seconds, with what it is made of."""
    tokens, reads = shared_tokens(lm, requests)
    block = sum(m.in_features * m.out_features for m in _block_linears(lm.model))
    head = lm.model.get_output_embeddings()
    flops = 2 * tokens * block + 2 * reads * head.in_features * head.out_features
    return {
        "tokens_after_sharing": tokens,
        "scored_positions": reads,
        "block_linear_params": block,
        "gemm_tflop": round(flops / 1e12, 3),
        "gemm_dtype": str(head.weight.dtype).removeprefix("torch."),
        "gemm_rate_gflops": round(rate / 1e9, 1),
        "floor_s": round(flops / rate, 2),
    }
