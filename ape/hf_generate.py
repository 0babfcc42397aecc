"""Text generation with a Hugging Face causal LM: batched, seeded, cut at stop strings.

Separate from scoring: generation goes through the model's own `generate`, which manages its KV
cache itself, so nothing here depends on the cache API.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    n: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_new_tokens: int = 32,
    seed: int | None = None,
    stop: Sequence[str] | None = None,
    batch_size: int = 16,
) -> list[list[str]]:
    """`n` completions per prompt (greedy when temperature is 0), cut at the first `stop`.

    A seed makes the samples reproducible without touching the caller's random state.
    """
    device = next(model.parameters()).device
    out: list[list[str]] = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if seed is not None:
            torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            texts = _generate_chunk(
                model, tokenizer, chunk, n, temperature, top_p, max_new_tokens, stop
            )
            out.extend(texts[i : i + n] for i in range(0, len(texts), n))
    return out


def _generate_chunk(
    model,
    tokenizer,
    chunk: list[str],
    n: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    stop: Sequence[str] | None,
) -> list[str]:
    """`n` completions per prompt of `chunk`, flat, prompt by prompt."""
    device = next(model.parameters()).device
    sample = temperature > 0
    # Left padding: generation continues from the right edge. Passed per call so the shared
    # tokenizer's own setting is left alone.
    enc = tokenizer(
        chunk, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
    )
    enc = {k: v.to(device) for k, v in enc.items()}
    generated = model.generate(
        **enc,
        do_sample=sample,
        temperature=temperature if sample else None,
        top_p=top_p if sample else None,
        top_k=None,
        num_return_sequences=n,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        stop_strings=list(stop) if stop else None,
        tokenizer=tokenizer if stop else None,
    )
    texts = tokenizer.batch_decode(
        generated[:, enc["input_ids"].shape[1] :], skip_special_tokens=True
    )
    return [cut_at(t, stop) for t in texts]


def chat_prompt(tokenizer, message: str) -> str:
    """`message` as a user turn in the tokenizer's chat template, ready for the reply."""
    if not getattr(tokenizer, "chat_template", None):
        return message
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
    )


def cut_at(text: str, stop: Sequence[str] | None) -> str:
    """`text` up to its first occurrence of any of `stop`."""
    for s in stop or ():
        cut = text.find(s)
        if cut >= 0:
            text = text[:cut]
    return text
