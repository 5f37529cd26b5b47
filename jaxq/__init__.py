"""jaxq: post-training quantization of LLaMA-family models to 2-4 bits, in JAX.

    qparams = jaxq.quantize(params, jaxq.UniformConfig(bits=4, group_size=128))        # RTN
    qparams = jaxq.quantize(params, jaxq.GPTQConfig(), jaxq.calibrate.from_text(lm))   # GPTQ
    jaxq.save("runs/w4", qparams, model_config=lm.config, tokenizer=lm.tokenizer)
    print(jaxq.size_report(qparams).table())

`import jaxq` loads the configs, formats and methods (which registers them); everything that
runs a model (quantize, save/load, calibrate, evaluate, ...) is imported on first use (PEP 562).
Layers, each importing only those below it: formats, config, methods < models (and ops,
kernels_pallas) < calibrate, quantization, checkpoint, evaluate < mixed_precision, qat, interop,
run_report < cli.
"""

import importlib
from typing import Any

__version__ = "0.2.0"
_SUBMODULES = ("calibrate", "checkpoint", "cli", "config", "data", "evaluate", "formats", "interop", "methods",
               "mixed_precision", "ops", "qat", "quantization", "report", "run_report", "sharding")
_FUNCTIONS = {"quantize": "quantization", "quantize_model": "quantization", "save": "checkpoint", "load": "checkpoint",
              "size_report": "report"}

from jaxq import formats, methods
from jaxq.config import (ActivationConfig, AWQConfig, BCQConfig, ConfigError, FlexRoundConfig, GPTQConfig,
                         KVCacheConfig, MagnitudeConfig, OBRConfig, QuantConfig, QuIPConfig, ReconstructionConfig, Rule,
                         SparseGPTConfig, SqueezeLLMConfig, UniformConfig, UniQuanFConfig, WandaConfig)
from jaxq.methods.registry import method_config

__all__ = ["ActivationConfig", "AWQConfig", "BCQConfig", "ConfigError", "FlexRoundConfig", "GPTQConfig",
           "KVCacheConfig", "MagnitudeConfig", "OBRConfig", "QuantConfig", "QuIPConfig", "ReconstructionConfig",
           "Rule", "SparseGPTConfig", "SqueezeLLMConfig", "UniQuanFConfig", "UniformConfig", "WandaConfig",
           "formats", "load", "method_config", "methods", "quantize", "quantize_model", "save", "size_report"]


def __getattr__(name: str) -> Any:
    """`jaxq.quantize`, `jaxq.evaluate`, ...: import the module when first used (PEP 562)."""
    if name in _FUNCTIONS:
        return getattr(importlib.import_module(f"jaxq.{_FUNCTIONS[name]}"), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"jaxq.{name}")
    raise AttributeError(f"module 'jaxq' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SUBMODULES) | set(_FUNCTIONS))
