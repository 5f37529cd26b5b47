"""jaxq: post-training quantization of LLaMA-family models to 2-4 bits, in JAX.

    qparams = jaxq.quantize(params, jaxq.UniformConfig(bits=4, group_size=128))        # RTN
    qparams = jaxq.quantize(params, jaxq.GPTQConfig(), jaxq.calibrate.from_text(lm))   # GPTQ
    jaxq.save("runs/w4", qparams, model_config=lm.config, tokenizer=lm.tokenizer)
    print(jaxq.size_report(qparams).table())

Submodules: calibrate, checkpoint, data, evaluate, formats, methods, sharding.
"""

__version__ = "0.1.0"

from jaxq import formats
from jaxq.checkpoint import load, save
from jaxq.config import AWQConfig, ConfigError, GPTQConfig, QuantConfig, Rule, UniformConfig, method_config
from jaxq.quantization import quantize
from jaxq.report import size_report

__all__ = ["AWQConfig", "ConfigError", "GPTQConfig", "QuantConfig", "Rule", "UniformConfig", "formats", "load",
           "method_config", "quantize", "save", "size_report"]
