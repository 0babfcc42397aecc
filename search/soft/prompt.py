"""A soft prompt: n trained vectors in a model's input-embedding space, placed before the text.

It scores as a `Prompt` with a `VectorPrefix` (`SoftPrompt.prompt()`); the prefix's label
(``<soft prompt: 8 vectors 1a2b3c4d>``) names it on the leaderboard and in the trial store.
Beside the vectors it keeps the model they were trained for and what is known about them.

Saved as ``soft_prompt.safetensors`` + ``soft_prompt.json``; `export_peft` writes PEFT's
prompt-tuning adapter (``adapter_config.json`` + ``adapter_model.safetensors``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ape.prefix import check_width
from ape.prompt import Prompt, VectorPrefix, digest
from ape.task import Example

WEIGHTS = "soft_prompt.safetensors"
CONFIG = "soft_prompt.json"


@dataclass
class SoftPrompt:
    """`vectors` ([n, d_model], float32) for model `model`, with what is known about them."""

    vectors: torch.Tensor
    model: str = ""
    info: dict[str, Any] = field(default_factory=dict)  # JSON-able: init, step, scores, text
    prefix: VectorPrefix = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.prefix = VectorPrefix.of(self.vectors, self.model)  # a copy, checked
        self.vectors = self.prefix.vectors

    @property
    def n(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def digest(self) -> str:
        """8 hex digits of the vectors' bytes (the end of the label)."""
        return digest(self.vectors)

    @property
    def label(self) -> str:
        return self.prefix.label

    def prompt(self, demos: Sequence[Example] = ()) -> Prompt:
        """The prompt that scores these vectors before the (no-instruction) template."""
        return Prompt.prefixed(self.prefix, demos)

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
        self.check_model(lm)
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

    def check_model(self, lm) -> None:
        """Refuse vectors trained for another model (the width must match; the name should)."""
        check_width(self.prefix, lm)


def nearest_tokens(vectors: torch.Tensor, lm) -> list[int]:
    """Per row of `vectors`, the id of the most cosine-similar input embedding."""
    table = lm.model.get_input_embeddings().weight.detach().float()
    sims = torch.nn.functional.normalize(vectors.detach().float().to(table.device), dim=-1) @ (
        torch.nn.functional.normalize(table, dim=-1).T
    )
    special = [i for i in lm.tokenizer.all_special_ids if i < sims.shape[1]]
    sims[:, special] = -2.0  # a copyable text prompt holds no control tokens
    return sims.argmax(-1).tolist()
