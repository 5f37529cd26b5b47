"""Quantization methods: how formats are computed from weights and, for data-aware methods, from
calibration statistics. Each method is one module implementing `protocol.Method`, registered
with its config class (`registry`); importing this package registers the built-in ones."""

from jaxq.methods import (awq, bcq, flexround, gptq, obr, protocol, pruning, quip, reconstruction, registry, rtn,
                          sparsegpt, squeezellm, uniquanf)

__all__ = ["awq", "bcq", "flexround", "gptq", "obr", "protocol", "pruning", "quip", "reconstruction", "registry", "rtn",
           "sparsegpt", "squeezellm", "uniquanf"]
