"""The one matmul every model linear goes through: float weights or quantized formats."""

from __future__ import annotations

import jax
import jax.numpy as jnp

import kernels_pallas
from jaxq.formats.base import QuantizedArray


def qdot(x: jax.Array, w) -> jax.Array:
    """y = x @ w for a float weight (in, out) or a quantized format of that shape.

    x: [..., in] in the compute dtype; returns [..., out] in x.dtype. Formats go through
    `kernels_pallas.matmul`: a Pallas kernel on TPU/GPU where one suits, else the XLA path.
    """
    if isinstance(w, QuantizedArray):
        return kernels_pallas.matmul(x, w)
    return jnp.dot(x, jnp.asarray(w).astype(x.dtype))
