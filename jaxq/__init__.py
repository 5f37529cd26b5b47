"""jaxq: post-training quantization of LLaMA-family models to 2-4 bits, in JAX."""

__version__ = "0.1.0"
