"""Generation that shares its prompt: a hand-written decoding loop over a prefix-shared KV cache.

`generate_tokens` returns, per prompt and sample, the generated token ids. How it saves work:

1. Each distinct prompt runs once, however many samples it has; its KV is repeated over its
   samples. Greedy decoding is deterministic, so a greedy prompt decodes one row, copied n times.
2. Prompts are sorted by their tokens; runs sharing a long prefix (one instruction and demos
   across many inputs) form groups by ape/packing.py's rule, and a group's prefix runs once.
3. A batch holds the prompts of one or more groups. Its KV is laid out per row as
   [group prefix, left-aligned and zero-padded | prompt suffix, left-padded | generated tokens];
   an explicit attention mask hides the padding, and position ids count from each row's start.
   A group's prefix gets a pass of its own only where it saves more than a pass costs.
4. The batch then decodes (ape/decoding.py): done rows leave it, waiting prompts join it once
   it is half empty, and with `Sampling.lookup` a pass may settle several tokens of a row that
   copies its prompt.
5. Sampling is inverse-CDF (ape/next_token.py): token t of sample j of prompt i is picked with a
   uniform drawn from the seed (seed, i, j). So the texts depend on the seed, the prompt and its
   index, not on the batching or on n (up to float rounding of the logits, which differs
   between devices and dtypes), and the global RNG is never touched.

Every KV-cache call goes through ape/kv_cache.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

import ape.kv_cache as kv_cache
import ape.packing as packing
from ape.decoding import Decoding, Sampling, additive_mask, decode
from ape.kv_cache import LayerStates
from ape.next_token import uniforms
from ape.vocab_head import logits_of

# Sharing a prefix costs a pass of its own; below this many tokens saved, prompts run whole.
MIN_SAVED_TOKENS = 64


@dataclass
class Job:
    """One distinct prompt: its tokens, its shared-prefix group, and its output rows."""

    tokens: tuple[int, ...]
    owners: list[int]  # the prompt indices with these tokens
    group: int = -1
    prefix_len: int = 0
    rows: list[tuple[int, int]] = field(default_factory=list)  # (prompt index, sample) per row


def plan(prompts: Sequence[Sequence[int]], n: int, greedy: bool) -> list[Job]:
    """Prompts -> jobs (distinct token sequences, grouped by shared prefix), in decoding order:
    by group, and in a group shortest first (a batch pads its suffixes to its longest).
    `TopUps` then takes them into the decoding batch in that order."""
    by_tokens: dict[tuple[int, ...], Job] = {}
    for i, tokens in enumerate(prompts):
        key = tuple(tokens)
        by_tokens.setdefault(key, Job(key, []))
        by_tokens[key].owners.append(i)
    jobs = sorted(by_tokens.values(), key=lambda job: job.tokens)
    # The last prompt token always runs as a suffix: its logits pick the first new token.
    rows = [packing.Row(job.tokens, first_scored=len(job.tokens) - 1) for job in jobs]
    at = {row.tokens: job for row, job in zip(rows, jobs, strict=True)}
    for g, group in enumerate(packing.group_rows(rows)):
        for row in group.rows:
            at[row.tokens].group, at[row.tokens].prefix_len = g, group.prefix_len
    for job in jobs:
        # Greedy rows of one prompt would be identical: one row serves every owner and sample.
        owners = job.owners[:1] if greedy else job.owners
        job.rows = [(i, j) for i in owners for j in range(1 if greedy else n)]
    return sorted(jobs, key=lambda job: (job.group, len(job.tokens), job.tokens))


def prefix_states(model, prefixes: Sequence[Sequence[int]]) -> list[LayerStates]:
    """Per prefix, per layer, its (keys, values) from position 0: [1, heads, n, dim]; one pass.

    Right padding needs no mask: under the causal mask a prefix's tokens never see the pads
    after them.
    """
    device = next(model.parameters()).device
    width = max(len(p) for p in prefixes)
    ids = torch.zeros((len(prefixes), width), dtype=torch.long)
    for b, tokens in enumerate(prefixes):
        ids[b, : len(tokens)] = torch.tensor(list(tokens))
    positions = torch.arange(width, device=device).expand(len(prefixes), -1)
    _, cache = kv_cache.run(
        model.base_model, input_ids=ids.to(device), position_ids=positions, use_cache=True
    )
    layers = kv_cache.layer_states(cache)
    return [
        [(k[b : b + 1, :, : len(p)], v[b : b + 1, :, : len(p)]) for k, v in layers]
        for b, p in enumerate(prefixes)
    ]


def share_prefixes(model, jobs: list[Job], states: dict[int, LayerStates]) -> None:
    """Compute the batch's missing group prefixes in one pass, if that saves enough.

    A pass costs about as much as MIN_SAVED_TOKENS positions of a batched pass (on a CPU, the
    weights are read once per pass), so when the prompts would recompute fewer prefix tokens
    than that, the batch's new groups run whole, as suffixes, instead (their prefix_len set to 0).
    """
    todo = {job.group: job.tokens[: job.prefix_len] for job in jobs if job.prefix_len}
    todo = {g: prefix for g, prefix in todo.items() if g not in states}
    if not todo:
        return
    saved = sum(len(todo[job.group]) for job in jobs if job.group in todo) - sum(
        len(p) for p in todo.values()
    )
    if saved < MIN_SAVED_TOKENS:
        for job in jobs:
            if job.group in todo:
                job.prefix_len = 0
        return
    states.update(zip(todo, prefix_states(model, list(todo.values())), strict=True))


def prefill(
    model, jobs: list[Job], states: dict[int, LayerStates], pad_id: int, room: int
) -> Decoding:
    """Run each job's prompt suffix once, after its group's prefix state; one row per job, then
    one per sample, with cache room for `room` new tokens."""
    device = next(model.parameters()).device
    width_p = max(job.prefix_len for job in jobs)
    suffixes = [job.tokens[job.prefix_len :] for job in jobs]
    width_s = max(len(s) for s in suffixes)
    ids = torch.full((len(jobs), width_s), pad_id, dtype=torch.long)
    positions = torch.zeros((len(jobs), width_s), dtype=torch.long)
    valid = torch.zeros((len(jobs), width_p + width_s), dtype=torch.bool)
    for p, (job, suffix) in enumerate(zip(jobs, suffixes, strict=True)):
        start = width_s - len(suffix)  # left padding: every prompt ends at the last slot
        ids[p, start:] = torch.tensor(suffix)
        positions[p, start:] = torch.arange(job.prefix_len, len(job.tokens))
        valid[p, : job.prefix_len] = True
        valid[p, width_p + start :] = True
    causal = torch.ones(width_s, width_s, dtype=torch.bool).tril()
    # Pads also see themselves, which keeps their softmax finite; nothing reads them.
    own = (valid[:, None, width_p:] & causal) | torch.eye(width_s, dtype=torch.bool)
    allowed = torch.cat([valid[:, None, :width_p].expand(-1, width_s, -1), own], dim=-1)
    cache = None
    if width_p:
        prefixes = [states[job.group] if job.prefix_len else None for job in jobs]
        cache = kv_cache.padded_cache(model.config, prefixes, width_p, room=width_s + room)
    out, cache = kv_cache.run(
        model.base_model,
        cache=cache,
        input_ids=ids.to(device),
        position_ids=positions.to(device),
        attention_mask=additive_mask(allowed.to(device), model.dtype),
        use_cache=True,
    )
    one_row = Decoding(
        cache,
        valid.to(device),
        torch.tensor([len(job.tokens) for job in jobs], device=device),
        logits_of(model, out.last_hidden_state[:, -1]),
        torch.arange(len(jobs), device=device),
    )
    # Each prompt's KV, repeated over its rows (its samples); rows are numbered afresh.
    per_row = torch.tensor([p for p, job in enumerate(jobs) for _ in job.rows], device=device)
    if len(per_row) == len(jobs) and kv_cache.reserved_room(cache):  # one row per job: as it is
        return one_row
    state = one_row.select(model, per_row, room)
    state.rows = torch.arange(len(per_row), device=device)
    return state


def generate_tokens(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    sampling: Sampling,
    *,
    n: int = 1,
    batch_rows: int = 32,
    draws_from: Sequence[tuple[int, int]] | None = None,
) -> list[list[list[int]]]:
    """Per prompt, `n` samples of new token ids (EOS left out; a stop's token kept).

    Token lists go in as they are (no special tokens added); each must be non-empty. Sample j
    of prompt i draws its uniforms from the seed (seed, index, j), where (seed, index) is
    `draws_from[i]`, by default (sampling.seed, i): calls with different seeds can run as one.
    """
    keys = draws_from or [(sampling.seed, i) for i in range(len(prompts))]
    device = next(model.parameters()).device
    result: list[list[list[int]]] = [[[] for _ in range(n)] for _ in prompts]
    if sampling.max_new_tokens <= 0 or n <= 0:
        return result
    jobs = plan(prompts, n, sampling.greedy)
    rows = [row for job in jobs for row in job.rows]
    u = None
    if not sampling.greedy:
        u = torch.from_numpy(uniforms([(*keys[i], j) for i, j in rows], sampling.max_new_tokens))
        u = u.to(device)
    # Drafts leave unused slots behind in the cache: room for them too.
    room = sampling.max_new_tokens * (2 if sampling.lookup else 1)
    top_up = TopUps(model, tokenizer.pad_token_id, jobs, batch_rows, room)
    with torch.inference_mode():
        row_prompts = [job.tokens for job in jobs for _ in job.rows]
        new_tokens = decode(model, tokenizer, None, sampling, u, row_prompts, top_up)
    for (i, j), tokens in zip(rows, new_tokens, strict=True):
        result[i][j] = tokens
    if sampling.greedy:  # one row served every owner and sample
        for job in jobs:
            first = result[job.owners[0]][0]
            for i in job.owners:
                result[i] = [list(first) for _ in range(n)]
    return result


class TopUps:
    """Brings waiting jobs into the decoding batch (a `decoding.TopUp`): a full batch at the
    start, and more whenever rows leaving have left it at most half full.

    Short answers finish at different lengths; without topping up, a batch ran on with ever
    fewer rows (a pass of 4 rows costs a third of one of 32 on a CPU) until its longest row was
    done. Jobs come in plan order, so a group's shared prefix is computed once and dropped
    once no waiting job needs it.
    """

    def __init__(self, model, pad_id: int, jobs: list[Job], batch_rows: int, room: int):
        self.model, self.pad_id, self.batch_rows, self.room = model, pad_id, batch_rows, room
        self.waiting = list(reversed(jobs))  # popped from the end
        self.next_row = 0
        self.states: dict[int, LayerStates] = {}

    def __call__(self, state: Decoding | None) -> Decoding | None:
        live = 0 if state is None else len(state.rows)
        if not self.waiting or live > self.batch_rows // 2:
            return state
        jobs = [self.waiting.pop()]
        size = live + len(jobs[0].rows)
        while self.waiting and size + len(self.waiting[-1].rows) <= self.batch_rows:
            size += len(self.waiting[-1].rows)
            jobs.append(self.waiting.pop())
        share_prefixes(self.model, jobs, self.states)
        new = prefill(self.model, jobs, self.states, self.pad_id, self.room)
        new.rows += self.next_row
        self.next_row += sum(len(job.rows) for job in jobs)
        # Jobs go in group order: only the last group taken can have jobs still waiting.
        self.states = {g: st for g, st in self.states.items() if g == jobs[-1].group}
        return new if state is None else state.merge(self.model, new, self.room)
