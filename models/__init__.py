"""Flax NNX LLaMA-family models and their loaders.

    lm = models.load("smollm2-135m")        # zoo name, HF directory, .gguf file or Hub id
    logits = lm.apply(lm.params, tokens)    # int32 [B, T] -> float32 [B, T, vocab]
"""

from models.config import LlamaConfig, RopeScaling, UnsupportedModelError
from models.language_model import LanguageModel, abstract_params, forward, init_params
from models.kv_cache import KVCache
from models.load import load, load_gguf, load_hf_dir
from models.zoo import ZOO, ModelNotFoundError

__all__ = [
    "KVCache", "LanguageModel", "LlamaConfig", "ModelNotFoundError", "RopeScaling",
    "UnsupportedModelError", "ZOO", "abstract_params", "forward", "init_params", "load",
    "load_gguf", "load_hf_dir",
]
