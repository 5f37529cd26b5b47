"""Quantized weight formats: what is stored, as pytree nodes with dequantize() and matmul()."""

from jaxq.formats.base import FORMATS, QuantizedArray, register_format
from jaxq.formats.bcq import BCQ
from jaxq.formats.codebook import CodebookQ
from jaxq.formats.packing import SUPPORTED_BITS, pack, unpack
from jaxq.formats.pruned import Pruned
from jaxq.formats.rotated import Rotated
from jaxq.formats.sparse import DenseSparse
from jaxq.formats.uniform import UniformQ

__all__ = ["BCQ", "CodebookQ", "DenseSparse", "FORMATS", "Pruned", "QuantizedArray", "Rotated", "SUPPORTED_BITS",
           "UniformQ", "pack", "register_format", "unpack"]
