"""Text generation with a Hugging Face causal LM: batched, seeded, cut at stop strings.

`generate_groups` tokenizes and hands the tokens to ape/shared_generation.py, whose decoding loop
runs each prompt once for all its samples and each shared prefix once for all its prompts.
`reference_generate` is the model's own `generate` with `num_return_sequences`, which runs the
prompt once per sample: kept as the reference the tests and benchmarks compare against.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Sequence

import torch

from ape.decoding import Sampling, Stop, first_stop
from ape.greedy_paths import settled
from ape.shared_generation import generate_tokens

# A sentence end (as ape.search.proposal reads it): . ! or ?, any closing quotes, then whitespace.
# As a stop, the text is cut before the quotes and whitespace, keeping the punctuation.
SENTENCE_END = re.compile(r"(?<=[.!?])[\"'`”’]*\s")


def generate_groups(
    model,
    tokenizer,
    groups: Sequence[tuple[Sequence[str], int | None]],
    *,
    n: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_new_tokens: int = 32,
    stop: Sequence[Stop] | None = None,
    batch_size: int = 32,
    known: Callable[[Sequence[int]], Sequence[int]] | None = None,
) -> list[list[list[str]]]:
    """`n` completions per prompt of each (prompts, seed) group (greedy when temperature is 0),
    cut at the first `stop`, from one decoding run: a pass decodes rows of every group.

    A stop is a string, or a compiled pattern (e.g. SENTENCE_END) cut at its match's start. A
    group's seed makes its samples reproducible, whatever `batch_size` (rows decoded together)
    and whatever the other groups, without touching the caller's random state; a group without
    one draws its own. When greedy, `known(prompt tokens)` may give the first tokens greedy
    decoding generates after a prompt (ape/greedy_paths.py): decoding starts after them.
    """
    groups = [
        (list(prompts), secrets.randbits(63) if seed is None else int(seed))
        for prompts, seed in groups
    ]
    prompts = [p for group, _ in groups for p in group]
    if not prompts:
        return [[] for _ in groups]
    sampling = Sampling(
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        eos=eos_ids(model, tokenizer),
        stop=tuple(stop or ()),
    )
    draws_from = [(seed, i) for group, seed in groups for i in range(len(group))]
    tokens = tokenize(tokenizer, prompts)
    generated = generate_after_known(
        model, tokenizer, tokens, sampling, known, n=n, batch_rows=batch_size, draws_from=draws_from
    )
    texts = [
        [cut_at(text, stop) for text in tokenizer.batch_decode(samples, skip_special_tokens=True)]
        for samples in generated
    ]
    out, start = [], 0
    for group, _ in groups:
        out.append(texts[start : start + len(group)])
        start += len(group)
    return out


def generate_after_known(
    model,
    tokenizer,
    tokens: list[list[int]],
    sampling: Sampling,
    known: Callable[[Sequence[int]], Sequence[int]] | None,
    *,
    n: int,
    batch_rows: int,
    draws_from: list[tuple[int, int]],
) -> list[list[list[int]]]:
    """`generate_tokens`, where each prompt's known greedy path (if any; greedy sampling only) is
    taken as generated: a prompt whose path already ends the sample decodes nothing, the others
    decode on after it. The token cap counts the path's tokens too."""
    if known is None or not sampling.greedy:
        return generate_tokens(
            model, tokenizer, tokens, sampling, n=n, batch_rows=batch_rows, draws_from=draws_from
        )

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    heads, todo = [], []
    for i, prompt in enumerate(tokens):
        head, done = settled(
            known(prompt),
            decode,
            max_new_tokens=sampling.max_new_tokens,
            eos=sampling.eos,
            stop=sampling.stop,
        )
        heads.append(head)
        if not done:
            todo.append(i)
    out = [[list(head) for _ in range(n)] for head in heads]
    if not todo:
        return out
    rest = generate_tokens(
        model,
        tokenizer,
        [tokens[i] + heads[i] for i in todo],
        sampling,
        n=n,
        batch_rows=batch_rows,
        draws_from=[draws_from[i] for i in todo],
    )
    for i, samples in zip(todo, rest, strict=True):
        out[i] = [(heads[i] + sample)[: sampling.max_new_tokens] for sample in samples]
    return out


def tokenize(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Each prompt's token ids as the model sees them; an empty prompt is BOS (or EOS) alone."""
    ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return [list(one) or [start] for one in ids]


def eos_ids(model, tokenizer) -> frozenset[int]:
    """The tokens that end a sample: the model's generation config's EOS and the tokenizer's."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is None:
        configured = []
    elif isinstance(configured, int):
        configured = [configured]
    extra = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    return frozenset([*configured, *extra])


def reference_generate(
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
    """`generate` through the model's own `generate` (`num_return_sequences`, left padding).

    The reference for tests and benchmarks; its samples are seeded but differ from `generate`'s.
    """
    device = next(model.parameters()).device
    out: list[list[str]] = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if seed is not None:
            torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            ids = reference_tokens(
                model, tokenizer, chunk, n, temperature, top_p, max_new_tokens, stop
            )
            texts = [cut_at(t, stop) for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
            out.extend(texts[i : i + n] for i in range(0, len(texts), n))
    return out


@torch.inference_mode()
def reference_tokens(
    model,
    tokenizer,
    chunk: list[str],
    n: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    stop: Sequence[str] | None = None,
    **generate_kwargs,
) -> torch.Tensor:
    """The new tokens of `model.generate` for `chunk`: [prompts * n, new], prompt by prompt.

    `generate_kwargs` go to `model.generate` as they are (e.g. min_new_tokens).
    """
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
        **generate_kwargs,
    )
    return generated[:, enc["input_ids"].shape[1] :]


def chat_prompt(tokenizer, message: str) -> str:
    """`message` as a user turn in the tokenizer's chat template, ready for the reply."""
    if not getattr(tokenizer, "chat_template", None):
        return message
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
    )


def cut_at(text: str, stop: Sequence[Stop] | None) -> str:
    """`text` up to its first occurrence of any of `stop` (strings or compiled patterns)."""
    cut = first_stop(text, stop or ())
    return text if cut < 0 else text[:cut]
