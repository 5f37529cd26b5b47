"""jaxq: post-training quantization of LLaMA-family models to 2-4 bits, in JAX.

    qparams = jaxq.quantize(params, jaxq.UniformConfig(bits=4, group_size=128))        # RTN
    qparams = jaxq.quantize(params, jaxq.GPTQConfig(), jaxq.calibrate.from_text(lm))   # GPTQ
    jaxq.save("runs/w4", qparams, model_config=lm.config, tokenizer=lm.tokenizer)
    print(jaxq.size_report(qparams).table())

Submodules (attributes of `jaxq`, each imported on first use): calibrate, checkpoint, cli, config,
data, evaluate, formats, methods, ops, quantization, report, sharding.
"""

import importlib
import types

__version__ = "0.2.0"
_SUBMODULES = ("calibrate", "checkpoint", "cli", "config", "data", "evaluate", "formats", "methods", "ops",
               "quantization", "report", "sharding")

from jaxq import formats
from jaxq.checkpoint import load, save
from jaxq.config import AWQConfig, ConfigError, GPTQConfig, QuantConfig, Rule, UniformConfig, method_config
from jaxq.quantization import quantize
from jaxq.report import size_report

__all__ = ["AWQConfig", "ConfigError", "GPTQConfig", "QuantConfig", "Rule", "UniformConfig", "formats", "load",
           "method_config", "quantize", "save", "size_report"]


def __getattr__(name: str) -> types.ModuleType:
    """`jaxq.evaluate`, `jaxq.calibrate`, ...: import a submodule when first used (PEP 562), so
    `import jaxq` stays light."""
    if name in _SUBMODULES:
        return importlib.import_module(f"jaxq.{name}")
    raise AttributeError(f"module 'jaxq' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SUBMODULES))
