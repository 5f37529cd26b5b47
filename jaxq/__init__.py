"""jaxq: post-training quantization of LLaMA-family models to 2-4 bits, in JAX.

    qparams = jaxq.quantize(params, jaxq.UniformConfig(bits=4, group_size=128))
    print(jaxq.size_report(qparams).table())
"""

__version__ = "0.1.0"

from jaxq import formats
from jaxq.config import ConfigError, QuantConfig, Rule, UniformConfig, method_config
from jaxq.quantization import quantize
from jaxq.report import size_report

__all__ = ["ConfigError", "QuantConfig", "Rule", "UniformConfig", "formats", "method_config",
           "quantize", "size_report"]
