"""The one matmul every model linear goes through: float weights or quantized formats."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxq.formats.base import QuantizedArray


def qdot(x: jax.Array, w) -> jax.Array:
    """y = x @ w for a float weight (in, out) or a quantized format of that shape.

    x: [..., in] in the compute dtype; returns [..., out] in x.dtype.
    """
    if isinstance(w, QuantizedArray):
        return w.matmul(x)
    return jnp.dot(x, jnp.asarray(w).astype(x.dtype))
