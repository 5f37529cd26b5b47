"""Quantization methods: how a format is computed from a weight (and, for some, statistics)."""

from jaxq.methods import rtn

# Data-free methods: name -> function (w [in, out], method config) -> format.
WEIGHT_QUANTIZERS = {"rtn": rtn.quantize_weight}
