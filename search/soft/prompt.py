"""A soft prompt: trained vectors placed before the text, for one model.

Two kinds (see `ape.prompt.PrefixKind`): n vectors in the model's input-embedding space, [n,
d_model] (prompt tuning, PEZ, P-tuning), or per layer n keys and values, [layers, 2, kv_heads,
n, head_dim] (prefix tuning). It scores as a `Prompt` with a `VectorPrefix`
(`SoftPrompt.prompt()`); the prefix's label (``<soft prompt: 8 vectors 1a2b3c4d>``, or ``<soft
prompt: 8 key/value vectors per layer 1a2b3c4d>``) names it on the leaderboard and in the trial
store. Beside the vectors it keeps the model they were trained for and what is known about them.

Saved as ``soft_prompt.safetensors`` + ``soft_prompt.json``; `export_peft` writes the PEFT adapter
of its kind: PROMPT_TUNING, P_TUNING (P-tuning's encoder output, as PEFT keeps it for inference)
or PREFIX_TUNING (``adapter_config.json`` + ``adapter_model.safetensors``).
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

from ape.kv_cache import kv_shape
from ape.prefix import check_fits
from ape.prompt import Prompt, VectorPrefix, digest
from ape.task import Example

WEIGHTS = "soft_prompt.safetensors"
CONFIG = "soft_prompt.json"


@dataclass
class SoftPrompt:
    """`vectors` (float32; [n, d_model] embeddings or [layers, 2, kv_heads, n, head_dim] keys and
    values) for model `model`, with what is known about them."""

    vectors: torch.Tensor
    model: str = ""
    info: dict[str, Any] = field(default_factory=dict)  # JSON-able: init, step, scores, text
    prefix: VectorPrefix = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.prefix = VectorPrefix.of(self.vectors, self.model)  # a copy, checked
        self.vectors = self.prefix.vectors

    @property
    def kind(self) -> str:
        """'embeddings' or 'kv' (see `ape.prompt.PrefixKind`)."""
        return self.prefix.kind

    @property
    def n(self) -> int:
        """Virtual tokens."""
        return self.prefix.n

    @property
    def digest(self) -> str:
        """8 hex digits of the vectors' bytes (the end of the label)."""
        return digest(self.vectors)

    @property
    def label(self) -> str:
        return self.prefix.label

    def prompt(self, demos: Sequence[Example] = ()) -> Prompt:
        """The prompt that scores these vectors before the (no-instruction) template, with the
        label words they were trained for (`info["label_words"]`, if searched)."""
        return Prompt.prefixed(self.prefix, demos).with_label_words(self.info.get("label_words"))

    # ------------------------------------------------------------------ readable projection
    def nearest_tokens(self, lm) -> list[int]:
        """Each vector's nearest vocabulary token by cosine similarity (special tokens excluded)."""
        if self.kind != "embeddings":
            raise ValueError("a key/value prefix has no tokens to project to")
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
            "kind": self.kind,
            "num_vectors": self.n,
            "shape": list(self.vectors.shape),
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
        """The PEFT adapter for `lm`'s model: `PeftModel.from_pretrained(model, directory)`
        loads it and scores as ape does (tests/test_peft_export.py).

        Embeddings go out as PROMPT_TUNING, or P_TUNING when a prompt encoder made them (PEFT
        then uses the saved encoder output, as ape does); a key/value prefix as PREFIX_TUNING,
        flattened the way PEFT reads it back (per virtual token: layer, keys/values, KV head).
        """
        self.check_model(lm)
        config = lm.model.config.get_text_config()
        adapter: dict[str, Any] = {
            "task_type": "CAUSAL_LM",
            "num_virtual_tokens": self.n,
            "num_transformer_submodules": 1,
            "num_layers": int(config.num_hidden_layers),
            "base_model_name_or_path": base_model or getattr(lm.model, "name_or_path", ""),
            "inference_mode": True,
        }
        if self.kind == "kv":
            _, heads, dim = kv_shape(lm.model)
            # PEFT sizes a GQA prefix by the KV heads: token_dim = kv_heads x head_dim.
            adapter.update(peft_type="PREFIX_TUNING", token_dim=heads * dim)
            adapter.update(num_attention_heads=heads, prefix_projection=False)
            adapter.update(encoder_hidden_size=heads * dim)
            weights = self.vectors.permute(3, 0, 1, 2, 4).reshape(self.n, -1)
        else:
            adapter.update(token_dim=int(self.vectors.shape[1]))
            adapter.update(num_attention_heads=int(config.num_attention_heads))
            if self.info.get("mode") == "ptuning":
                encoder = self.info.get("encoder", "mlp").upper()
                adapter.update(peft_type="P_TUNING", encoder_reparameterization_type=encoder)
                adapter.update(encoder_hidden_size=int(self.info.get("encoder_hidden", 128)))
            else:
                # How PEFT would initialise; the saved weights replace it.
                adapter.update(peft_type="PROMPT_TUNING", prompt_tuning_init="RANDOM")
            weights = self.vectors
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "adapter_config.json").write_text(json.dumps(adapter, indent=2) + "\n")
        weights = weights.contiguous()
        save_file({"prompt_embeddings": weights}, str(folder / "adapter_model.safetensors"))
        return folder

    def check_model(self, lm) -> None:
        """Refuse vectors trained for another model (shapes must match; see `check_fits`)."""
        check_fits(self.prefix, lm)


def nearest_tokens(vectors: torch.Tensor, lm) -> list[int]:
    """Per row of `vectors`, the id of the most cosine-similar input embedding."""
    table = lm.model.get_input_embeddings().weight.detach().float()
    sims = torch.nn.functional.normalize(vectors.detach().float().to(table.device), dim=-1) @ (
        torch.nn.functional.normalize(table, dim=-1).T
    )
    special = [i for i in lm.tokenizer.all_special_ids if i < sims.shape[1]]
    sims[:, special] = -2.0  # a copyable text prompt holds no control tokens
    return sims.argmax(-1).tolist()
