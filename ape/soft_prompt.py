"""A soft prompt: n trained vectors in a model's input-embedding space, placed before the text.

A `Prompt` carries one in its `soft` field; its instruction is then only the soft prompt's label
(``<soft prompt: 8 vectors 1a2b3c4d>``, the digest of the vectors), which names it on the
leaderboard and in the trial store and is never rendered. Scoring goes through
`SoftPrefixedModel`, which hands the vectors to `HFLanguageModel.loglikelihood(soft_prefix=...)`,
so they take the exact, prefix-reusing path of text prompts.

Saved as ``soft_prompt.safetensors`` + ``soft_prompt.json``; `export_peft` writes PEFT's
prompt-tuning adapter (``adapter_config.json`` + ``adapter_model.safetensors``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ape.prompt import Prompt, is_soft_label
from ape.task import Example

WEIGHTS = "soft_prompt.safetensors"
CONFIG = "soft_prompt.json"


@dataclass
class SoftPrompt:
    """`vectors` ([n, d_model], float32) for model `model`, with what is known about them."""

    vectors: torch.Tensor
    model: str = ""
    info: dict[str, Any] = field(default_factory=dict)  # JSON-able: init, step, scores, text

    def __post_init__(self) -> None:
        # A copy: the caller's tensor may be a parameter that training keeps updating in place.
        self.vectors = self.vectors.detach().to("cpu", torch.float32, copy=True).contiguous()
        if self.vectors.ndim != 2 or not self.vectors.shape[0]:
            raise ValueError(f"a soft prompt is [n > 0, d_model], got {tuple(self.vectors.shape)}")

    @property
    def n(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def digest(self) -> str:
        """8 hex digits of the vectors' bytes: equal digests, equal vectors (for all practical
        purposes), so a stored trial is replayed only for the very same soft prompt."""
        return hashlib.sha1(self.vectors.numpy().tobytes()).hexdigest()[:8]

    @property
    def label(self) -> str:
        return f"<soft prompt: {self.n} vectors {self.digest}>"

    def prompt(self, demos: Sequence[Example] = ()) -> Prompt:
        """The prompt that scores these vectors before the (no-instruction) template."""
        return Prompt(self.label, tuple(demos), soft=self)

    # ------------------------------------------------------------------ readable projection
    def nearest_tokens(self, lm) -> list[int]:
        """Each vector's nearest vocabulary token by cosine similarity (special tokens excluded)."""
        return nearest_tokens(self.vectors, lm)

    # ------------------------------------------------------------------ files
    def save(self, directory: str | os.PathLike) -> None:
        """Write the vectors (safetensors) and a JSON config into `directory`."""
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"vectors": self.vectors}, str(folder / WEIGHTS))
        config = {
            "format": "ape-soft-prompt/1",
            "model": self.model,
            "num_vectors": self.n,
            "dim": int(self.vectors.shape[1]),
            "label": self.label,
            "info": self.info,
        }
        (folder / CONFIG).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, directory: str | os.PathLike) -> SoftPrompt:
        folder = Path(directory)
        if not (folder / WEIGHTS).is_file():
            raise ValueError(f"{folder}: no {WEIGHTS} here; not a saved soft prompt")
        config = json.loads((folder / CONFIG).read_text()) if (folder / CONFIG).is_file() else {}
        vectors = load_file(str(folder / WEIGHTS))["vectors"]
        return cls(vectors, config.get("model", ""), config.get("info", {}))

    def export_peft(self, directory: str | os.PathLike, lm, base_model: str = "") -> Path:
        """PEFT's prompt-tuning adapter for `lm`'s model: `PeftModel.from_pretrained` loads it.

        PEFT prepends the vectors to the input embeddings, as ape scores them.
        """
        check_model(self, lm)
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        config = lm.model.config.get_text_config()
        adapter = {
            "peft_type": "PROMPT_TUNING",
            "task_type": "CAUSAL_LM",
            "num_virtual_tokens": self.n,
            "token_dim": int(self.vectors.shape[1]),
            "num_transformer_submodules": 1,
            "num_attention_heads": int(config.num_attention_heads),
            "num_layers": int(config.num_hidden_layers),
            "prompt_tuning_init": "RANDOM",  # how PEFT would initialise; the weights replace it
            "base_model_name_or_path": base_model or getattr(lm.model, "name_or_path", ""),
            "inference_mode": True,
        }
        (folder / "adapter_config.json").write_text(json.dumps(adapter, indent=2) + "\n")
        save_file({"prompt_embeddings": self.vectors}, str(folder / "adapter_model.safetensors"))
        return folder


def nearest_tokens(vectors: torch.Tensor, lm) -> list[int]:
    """Per row of `vectors`, the id of the most cosine-similar input embedding."""
    table = lm.model.get_input_embeddings().weight.detach().float()
    sims = torch.nn.functional.normalize(vectors.detach().float().to(table.device), dim=-1) @ (
        torch.nn.functional.normalize(table, dim=-1).T
    )
    special = [i for i in lm.tokenizer.all_special_ids if i < sims.shape[1]]
    sims[:, special] = -2.0  # a copyable text prompt holds no control tokens
    return sims.argmax(-1).tolist()


def check_model(soft: SoftPrompt, lm) -> None:
    """Refuse vectors trained for another model (the width must match; the name should)."""
    width = lm.model.get_input_embeddings().weight.shape[1]
    if soft.vectors.shape[1] != width:
        raise ValueError(
            f"the soft prompt has {soft.vectors.shape[1]}-dim vectors (model {soft.model!r}); "
            f"model {lm.name!r} takes {width}"
        )


class SoftPrefixedModel:
    """A view of `lm` whose every request starts with `soft`'s vectors."""

    def __init__(self, lm, soft: SoftPrompt):
        check_model(soft, lm)
        self.lm = lm
        self.soft = soft
        self.name = lm.name
        self.tokenizer = getattr(lm, "tokenizer", None)

    def loglikelihood(self, requests, *, return_counts: bool = False):
        return self.lm.loglikelihood(
            requests, return_counts=return_counts, soft_prefix=self.soft.vectors
        )

    def generate(self, prompts, **kwargs):
        raise ValueError(
            "generation after a soft prompt is not supported; score it with the loglik or "
            "choice evaluator"
        )


def model_for(lm, prompt: Prompt):
    """The model that scores `prompt`: `lm` itself, or a view with its soft prompt in front."""
    if prompt.soft is not None:
        return SoftPrefixedModel(lm, prompt.soft)
    if is_soft_label(prompt.instruction):
        raise ValueError(
            f"prompt {prompt.instruction!r} names a soft prompt whose vectors are not loaded; "
            "load them with ape.soft_prompt.SoftPrompt.load(result.file('soft_prompt', path))"
        )
    return lm


def score_prompts(evaluator, lm, prompts: Sequence[Prompt], examples) -> np.ndarray:
    """`evaluator.score(lm, prompts, examples)`, each soft prompt scored after its vectors.

    Text prompts go to the model in one call as before; each soft prompt in its own call.
    """
    for prompt in prompts:
        model_for(lm, prompt)  # a soft label without its vectors fails before any scoring
    groups: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(prompt.instruction if prompt.soft is not None else "", []).append(i)
    if set(groups) <= {""}:
        return evaluator.score(lm, prompts, examples)
    grid = np.zeros((len(prompts), len(examples)))
    for members in groups.values():
        chosen = [prompts[i] for i in members]
        grid[members] = evaluator.score(model_for(lm, chosen[0]), chosen, examples)
    return grid
