"""Calibration statistics, summed exactly so every device count gives bit-identical results.

A float32 `psum` adds partial sums in an order that depends on how many devices there are, so
Hessians computed on 1 and on 8 devices differ in their last bits, and GPTQ codes with them.
Here every per-sample contribution is turned into integers before any addition:

  value / 2^e  (e a power-of-two bound of that entry, the same on all devices: `lax.pmax`)
  -> three int32 limbs of 15 bits (a 45-bit fixed-point fraction; truncation is exact in
     float32, only the last limb rounds)
  -> summed over the samples of a device (scan) and over devices (`lax.psum`): integer
     addition is associative, so the result does not depend on the order
  -> back to float32 and times 2^e.

Integers have no NaN, so a non-finite input on any device turns the whole result into NaN
explicitly (otherwise NaN -> int32 would yield finite garbage).

For a Gram matrix each entry gets its own bound from the diagonal (|G_ij| <= sqrt(G_ii G_jj)),
so entries of very different magnitude (LLM activations have outliers ~1e4) all keep 45 bits.
Every per-sample quantity (Gram, sums over tokens) is a dot computed per sample (`lax.map` /
`scan`): never a batched reduction, and never a reduction XLA could fuse differently depending
on how many samples a device holds, so it is bit-identical whatever the sharding. (XLA:CPU's
fusion emitters compile fused row reductions differently for different batch sizes, which
changes the block forward's last bits; CPU runs that compare device counts disable them with
XLA_FLAGS=--xla_cpu_use_fusion_emitters=false, as scripts/calibrate_multidevice.py does.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LIMB_BITS = 15
MAX_SAMPLES_PER_STEP = 2 ** 9  # keeps the first limb's integer sum exact in float32 (< 2^24)
_EXPONENT_RANGE = 60


def bound_exponent(bound: jax.Array) -> jax.Array:
    """Smallest integer e (clamped to +-60) with 2^(e-1) >= bound: one spare bit of headroom."""
    e = jnp.ceil(jnp.log2(jnp.maximum(bound, 2.0 ** -_EXPONENT_RANGE))) + 1
    return jnp.clip(e, -_EXPONENT_RANGE, _EXPONENT_RANGE).astype(jnp.int32)


def to_limbs(v: jax.Array) -> jax.Array:
    """float32 v with |v| <= 1 -> int32 [3, ...]: v = (a + (b + c 2^-15) 2^-15) 2^-15."""
    t = v * 2.0 ** LIMB_BITS
    a = jnp.trunc(t)
    r = (t - a) * 2.0 ** LIMB_BITS
    b = jnp.trunc(r)
    c = jnp.round((r - b) * 2.0 ** LIMB_BITS)
    return jnp.stack([a, b, c]).astype(jnp.int32)


def from_limbs(limbs: jax.Array) -> jax.Array:
    """int32 [3, ...] (possibly summed) -> float32, the same way on every device."""
    a, b, c = (limb.astype(jnp.float32) for limb in limbs)
    return ((c * 2.0 ** -LIMB_BITS + b) * 2.0 ** -LIMB_BITS + a) * 2.0 ** -LIMB_BITS


def _nan_unless_finite(result: jax.Array, xs: jax.Array, axis_name: str) -> jax.Array:
    bad = jax.lax.psum(jnp.sum(~jnp.isfinite(xs)), axis_name)
    return jnp.where(bad == 0, result, jnp.nan)


def _token_sum(x: jax.Array) -> jax.Array:
    """sum over tokens of one sample, [T, K] -> [K], as a dot (see the module docstring)."""
    return jnp.dot(jnp.ones((x.shape[0],), jnp.float32), x, precision=jax.lax.Precision.HIGHEST)


def exact_gram(xs: jax.Array, axis_name: str) -> jax.Array:
    """sum over samples (and devices on `axis_name`) of x^T x: xs [b, T, K] -> float32 [K, K]."""
    xs = xs.astype(jnp.float32)
    diag = jax.lax.map(lambda x: _token_sum(x * x), xs).max(axis=0)
    half = bound_exponent(jnp.sqrt(jax.lax.pmax(diag, axis_name)))  # 2^(e_i + e_j) bounds |G_ij|
    inv = jnp.ldexp(jnp.float32(1.0), -half)  # from pmax'd exponents: identical on every device

    def contribution(x):
        gram = jnp.einsum("tk,tj->kj", x, x, preferred_element_type=jnp.float32)
        return to_limbs(gram * inv[:, None] * inv[None, :])

    # the carry starts from the first sample, so it is per-device (varying) like the updates
    limbs, _ = jax.lax.scan(lambda acc, x: (acc + contribution(x), None), contribution(xs[0]), xs[1:])
    scale = jnp.ldexp(jnp.float32(1.0), half)
    gram = from_limbs(jax.lax.psum(limbs, axis_name)) * scale[:, None] * scale[None, :]
    return _nan_unless_finite(gram, xs, axis_name)


def exact_abs_sum(xs: jax.Array, axis_name: str) -> jax.Array:
    """sum over samples, tokens (and devices) of |x| per channel: xs [b, T, K] -> float32 [K]."""
    per_sample = jax.lax.map(lambda x: _token_sum(jnp.abs(x)), xs.astype(jnp.float32))  # [b, K]
    exponent = bound_exponent(jax.lax.pmax(per_sample.max(axis=0), axis_name))
    limbs = to_limbs(per_sample * jnp.ldexp(jnp.float32(1.0), -exponent)).sum(axis=1)  # over samples: [3, K]
    total = from_limbs(jax.lax.psum(limbs, axis_name)) * jnp.ldexp(jnp.float32(1.0), exponent)
    return _nan_unless_finite(total, xs, axis_name)
