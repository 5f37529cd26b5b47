"""QuIP's Kronecker incoherence transform: U = P_out (L (x) R) P_in along the last axis.

L [a, a] and R [b, b] are Haar-random special orthogonal factors (det +1, the reference's scipy
`special_ortho_group`) with a * b = n (`balanced_factors`: QuIP's `butterfly_factors`, the prime
factors of n in ascending order dealt alternately to a and b, so both are near sqrt(n)); P_in,
P_out random permutations, (P v)_i = v[perm_i] (Cornell-RelaxML/QuIP method.py
`gen_rand_ortho_butterfly_noblock` + `mul_ortho_butterfly`, the documented `--incoh_processing`
default). Cost per vector: n (a + b) multiply-adds and two gathers; stored: a^2 + b^2 floats and
two permutations, never the n x n matrix. A prime n has b = 1 and a dense factor of order n.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def prime_factors(n: int) -> list[int]:
    """The prime factors of n >= 1, ascending, with multiplicity."""
    out, d = [], 2
    while d * d <= n:
        while n % d == 0:
            out.append(d)
            n //= d
        d += 1
    return out + ([n] if n > 1 else [])


def balanced_factors(n: int) -> tuple[int, int]:
    """(a, b) with a * b = n: products of the ascending prime factors at even and odd positions."""
    primes = prime_factors(n)
    return int(np.prod(primes[0::2], dtype=np.int64)), int(np.prod(primes[1::2], dtype=np.int64))


def haar_orthogonal(gaussian: np.ndarray) -> np.ndarray:
    """A Haar-random special orthogonal matrix (det +1, as the reference's scipy
    `special_ortho_group`) from a standard normal one [p, p]: Q of its QR decomposition in float64
    (numpy's LAPACK: a different LAPACK build may change the last bits) with columns signed so
    that R has a positive diagonal (Haar on O(p)), then the first column negated where det Q < 0
    (Haar on SO(p)); float32 [p, p]."""
    q, r = np.linalg.qr(gaussian.astype(np.float64))
    q = q * np.where(np.diag(r) < 0, -1.0, 1.0)[None, :]
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q.astype(np.float32)


def inverse_permutation(perm: jax.Array) -> jax.Array:
    """inv with inv[perm[i]] = i: one scatter of n indices, so that P^T v = v[inv] is a gather."""
    return jnp.zeros_like(perm).at[perm].set(jnp.arange(perm.shape[0], dtype=perm.dtype))


def kronecker_transform(x: jax.Array, left: jax.Array, right: jax.Array, perm_in: jax.Array, perm_out: jax.Array,
                        transpose: bool = False) -> jax.Array:
    """U x (transpose: U^T x) for each vector along the last axis, U = P_out (left (x) right) P_in.

    x [..., n]; left [a, a], right [b, b] with a * b = n; perm_in, perm_out int [n]. -> [..., n]."""
    a, b = left.shape[0], right.shape[0]
    lead = x.shape[:-1]
    left, right = left.astype(x.dtype), right.astype(x.dtype)
    highest = jax.lax.Precision.HIGHEST
    if transpose:
        v = jnp.take(x, inverse_permutation(perm_out), axis=-1)  # P_out^T x
        v = jnp.einsum("ji,...jk,kl->...il", left, v.reshape(*lead, a, b), right, precision=highest)
        return jnp.take(v.reshape(*lead, a * b), inverse_permutation(perm_in), axis=-1)  # P_in^T (.)
    v = jnp.take(x, perm_in, axis=-1).reshape(*lead, a, b)
    v = jnp.einsum("ij,...jk,lk->...il", left, v, right, precision=highest)  # left V right^T
    return jnp.take(v.reshape(*lead, a * b), perm_out, axis=-1)
