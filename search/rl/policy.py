"""The RL prompt policy: a frozen causal LM plus a small trainable MLP that writes prompt tokens.

At each step the frozen LM's last hidden state h (after its final norm) goes through
h + MLP(h), then through the LM's own head to vocabulary logits. Only the MLP trains. Its output
layer starts at zero, so the untrained policy is the LM itself continuing `context` (default
"Instruction:"): early samples are plausible tokens rather than uniform noise over the vocabulary,
which matters with the few hundred samples a CPU run can afford.

Sampling is top-k, and log-probs and entropies are taken under that same truncated distribution,
so the policy gradient is the gradient of what was actually sampled. Tokens that would break the
prompt template (special tokens, line breaks) are never proposed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import ape.kv_cache as kv_cache
from ape.lm import HFLanguageModel

WEIGHTS = "mlp.safetensors"
CONFIG = "policy.json"


@dataclass
class Rollout:
    """Sampled prompt tokens and the frozen hidden states they were drawn from."""

    tokens: torch.Tensor  # [n, length] token ids
    states: torch.Tensor  # [n, length, d_model], no grad: the MLP input at each step
    allowed: torch.Tensor  # [n, length, vocab] the top-k set each token was drawn from


class PromptPolicy(torch.nn.Module):
    """Writes `length`-token prompts; `mlp` holds all trainable weights."""

    def __init__(
        self,
        lm: HFLanguageModel,
        *,
        hidden: int = 2048,
        context: str = "Instruction:",
        top_k: int = 256,
        seed: int = 0,
    ):
        super().__init__()
        if not hasattr(lm, "model") or not hasattr(lm, "tokenizer"):
            raise ValueError(f"the policy needs a Hugging Face model, not {type(lm).__name__}")
        self.lm = lm
        self.context = context
        self.top_k = top_k
        self.hidden = hidden
        d_model = lm.model.config.get_text_config().hidden_size
        generator = torch.Generator().manual_seed(seed)
        first, last = torch.nn.Linear(d_model, hidden), torch.nn.Linear(hidden, d_model)
        with torch.no_grad():
            torch.nn.init.normal_(first.weight, std=d_model**-0.5, generator=generator)
            first.bias.zero_()
            last.weight.zero_()  # the residual starts at zero: the policy starts as the LM
            last.bias.zero_()
        device, dtype = lm.device, torch.float32
        self.mlp = torch.nn.Sequential(first, torch.nn.ReLU(), last).to(device, dtype)
        self._banned = _banned_tokens(lm.tokenizer, self._vocab_size()).to(device)

    # ------------------------------------------------------------------ the distribution
    def _vocab_size(self) -> int:
        return self.lm.model.get_output_embeddings().weight.shape[0]

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits from frozen hidden states, through the MLP and the LM head."""
        hidden = states.float() + self.mlp(states.float())
        head = self.lm.model.get_output_embeddings()
        logits = torch.nn.functional.linear(hidden.to(head.weight.dtype), head.weight).float()
        return logits.masked_fill(self._banned, float("-inf"))

    def _top_k_mask(self, logits: torch.Tensor) -> torch.Tensor:
        k = min(self.top_k, logits.shape[-1])
        keep = torch.zeros_like(logits, dtype=torch.bool)
        keep.scatter_(-1, logits.topk(k, dim=-1).indices, True)
        return keep & torch.isfinite(logits)

    def log_probs(self, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-prob of each sampled token, entropy of each step), both [n, length], with grad."""
        logits = self.logits(rollout.states).masked_fill(~rollout.allowed, float("-inf"))
        logp = logits.log_softmax(-1)
        picked = logp.gather(-1, rollout.tokens[..., None]).squeeze(-1)
        probs = logp.exp()
        entropy = -(probs * logp.masked_fill(~rollout.allowed, 0.0)).sum(-1)
        return picked, entropy

    # ------------------------------------------------------------------ writing prompts
    @torch.no_grad()
    def sample(
        self, n: int, length: int, generator: torch.Generator | None, greedy: bool = False
    ) -> Rollout:
        """`n` prompts of `length` tokens (top-k sampling, or argmax with `greedy`)."""
        model = self.lm.model
        context = self.lm.tokenizer(self.context, add_special_tokens=False).input_ids
        ids = torch.tensor([context or [self.lm.prefix_token_id]] * n, device=self.lm.device)
        out, cache = kv_cache.run(model.base_model, input_ids=ids, use_cache=True)
        state = out.last_hidden_state[:, -1]
        tokens, states, allowed = [], [], []
        for _ in range(length):
            logits = self.logits(state)
            keep = self._top_k_mask(logits)
            if greedy:
                token = logits.argmax(-1)
            else:
                probs = logits.masked_fill(~keep, float("-inf")).softmax(-1)
                token = torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0]
                token = token.to(state.device)
            tokens.append(token)
            states.append(state)
            allowed.append(keep)
            out, cache = kv_cache.run(
                model.base_model, cache=cache, input_ids=token[:, None], use_cache=True
            )
            state = out.last_hidden_state[:, -1]
        return Rollout(torch.stack(tokens, 1), torch.stack(states, 1), torch.stack(allowed, 1))

    def texts(self, tokens: torch.Tensor) -> list[str]:
        """Prompt text per row of token ids (what the task model is shown)."""
        return [
            self.lm.tokenizer.decode(row, skip_special_tokens=True).strip()
            for row in tokens.tolist()
        ]

    # ------------------------------------------------------------------ saving
    def save(self, directory: Path) -> None:
        """The MLP's weights (safetensors) and what is needed to rebuild the policy."""
        directory = Path(directory)
        save_file(
            {k: v.detach().cpu() for k, v in self.mlp.state_dict().items()},
            str(directory / WEIGHTS),
        )
        config = {
            "policy_model": self.lm.name,
            "hidden": self.hidden,
            "context": self.context,
            "top_k": self.top_k,
        }
        (directory / CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def load_policy(directory: str | Path, lm: HFLanguageModel) -> PromptPolicy:
    """A policy saved by `PromptPolicy.save`, on top of `lm` (the model it was trained on)."""
    directory = Path(directory)
    config = json.loads((directory / CONFIG).read_text())
    if config["policy_model"] != lm.name:
        raise ValueError(
            f"{directory} holds a policy for {config['policy_model']!r}, not {lm.name!r}"
        )
    policy = PromptPolicy(
        lm, hidden=config["hidden"], context=config["context"], top_k=config["top_k"]
    )
    weights = load_file(str(directory / WEIGHTS), device=str(lm.device))
    policy.mlp.load_state_dict(weights)
    return policy


def _banned_tokens(tokenizer, vocab_size: int) -> torch.Tensor:
    """Tokens the policy never writes: special, with line breaks, or past the tokenizer."""
    banned = torch.ones(vocab_size, dtype=torch.bool)
    usable = min(vocab_size, len(tokenizer))
    texts = tokenizer.batch_decode([[i] for i in range(usable)])
    special = set(tokenizer.all_special_ids)
    for i, text in enumerate(texts):
        # Line breaks would break the template; U+FFFD marks a partial UTF-8 byte token.
        banned[i] = i in special or not text or any(c in text for c in "\n\r\t\x0b\x0c\ufffd")
    return banned
