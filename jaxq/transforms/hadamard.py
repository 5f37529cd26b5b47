"""Hadamard matrices of order n = m * 2^k and the fast, orthonormal transform along the last axis.

    y = hadamard_transform(x)                  # y[..., :] = H_n x[..., :] / sqrt(n), O(n (log n + m))
    y = randomized_hadamard(x, signs)          # H_n diag(signs) x / sqrt(n): QuIP#'s RHT

H_n = H_m (x) S_{2^k}: S the Sylvester matrix (natural order, symmetric), H_m a base matrix
built here, never stored or typed in:
  m = 1;
  m = q + 1 for a prime power q = 3 (mod 4)      (Paley I: 12, 20, 24, 28, 32, 44, 48, 60, ...);
  m = 2(q + 1) for a prime power q = 1 (mod 4)   (Paley II: 12, 20, 28, 36, 52, 60, 76, ...).
A size n is supported when n = m * 2^k with such an m <= MAX_BASE_ORDER; the smallest m is used
(the transform costs n (k + m) multiply-adds per vector). Covered, e.g.: every power of two;
smollm2 576 = 36 * 16, 192 = 12 * 16, 1536 = 12 * 128, 49152 = 12 * 4096; LLaMA 11008 =
344 * 32 (343 = 7^3), 13824 = 108 * 128, 5120 = 20 * 256, 28672 = 28 * 1024. Not covered: sizes
whose odd part needs a non-Paley order, e.g. 172 = 4 * 43, 92, 116, 156 (QuIP# types these in as
tables; `base_order` names the Kronecker transform as the way out), and head-sized 9, 18.

Base matrices are int8 numpy constants, exact; Paley I matrices are not symmetric, so
`transpose=True` applies H_n^T. Products with H_m run at HIGHEST precision (no TF32).
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

MAX_BASE_ORDER = 512


class UnsupportedSizeError(ValueError):
    """A size that is not m * 2^k for any base order m this module can build."""


# ------------------------------------------------------------------------ finite fields

def prime_power(q: int) -> tuple[int, int] | None:
    """(p, e) with p prime and p^e = q, or None."""
    if q < 2:
        return None
    p = next(d for d in range(2, q + 1) if q % d == 0)
    e, rest = 0, q
    while rest % p == 0:
        rest //= p
        e += 1
    return (p, e) if rest == 1 else None


def _poly_mod(a: np.ndarray, f: np.ndarray, p: int) -> np.ndarray:
    """a mod f over GF(p); coefficients low degree first, f monic of degree len(f) - 1."""
    a = a.copy() % p
    e = len(f) - 1
    for top in range(len(a) - 1, e - 1, -1):
        a[top - e: top + 1] = (a[top - e: top + 1] - a[top] * f) % p
    return a[:e]


def _monic(p: int, degree: int):
    """Every monic polynomial of `degree` over GF(p), low degree first, in a fixed order."""
    for low in itertools.product(range(p), repeat=degree):
        yield np.array((*low, 1), np.int64)


def irreducible(p: int, e: int) -> np.ndarray:
    """The first (in `_monic` order) monic irreducible polynomial of degree e over GF(p)."""
    for f in _monic(p, e):
        if f[0] == 0 and e > 1:
            continue
        if all(_poly_mod(f, g, p).any() for d in range(1, e // 2 + 1) for g in _monic(p, d)):
            return f
    raise AssertionError(f"no irreducible polynomial of degree {e} over GF({p})")


def quadratic_character(q: int) -> tuple[np.ndarray, np.ndarray]:
    """GF(q), q = p^e, as integers 0..q-1 (base-p digits = polynomial coefficients, 0 the zero):
    (chi int8 [q]: 0 at 0, +1 on nonzero squares, -1 elsewhere; digits int64 [q, e])."""
    p, e = prime_power(q)
    digits = (np.arange(q)[:, None] // p ** np.arange(e)[None, :]) % p
    f = irreducible(p, e)
    squares = {int(_poly_mod(np.convolve(d, d), f, p) @ p ** np.arange(e)) for d in digits[1:]}
    chi = np.array([0] + [1 if a in squares else -1 for a in range(1, q)], np.int8)
    return chi, digits


def jacobsthal(q: int) -> np.ndarray:
    """Q [q, q] int8, Q[a, b] = chi(a - b): symmetric for q = 1 (mod 4), skew for q = 3 (mod 4)."""
    chi, digits = quadratic_character(q)
    p, e = prime_power(q)
    difference = (digits[:, None, :] - digits[None, :, :]) % p
    return chi[difference @ p ** np.arange(e)]


# ------------------------------------------------------------------------ base matrices

def paley_kind(m: int) -> tuple[str, int] | None:
    """("I", q) or ("II", q) when order m has a Paley construction, else None."""
    q = m - 1
    if prime_power(q) and q % 4 == 3:
        return "I", q
    if m % 2 == 0 and prime_power(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return "II", m // 2 - 1
    return None


@functools.cache
def base_matrix(m: int) -> np.ndarray:
    """The base Hadamard matrix H_m, int8 [m, m] with H_m H_m^T = m I (read-only)."""
    if m == 1:
        h = np.ones((1, 1), np.int8)
    else:
        kind = paley_kind(m)
        if kind is None:
            raise UnsupportedSizeError(f"no Paley construction of a Hadamard matrix of order {m}")
        name, q = kind
        core = np.zeros((q + 1, q + 1), np.int64)
        core[0, 1:] = 1
        core[1:, 0] = -1 if name == "I" else 1
        core[1:, 1:] = jacobsthal(q)
        if name == "I":  # I + S, S skew (the conference matrix of q = 3 mod 4)
            h = np.eye(m, dtype=np.int64) + core
        else:  # C (x) [[1, 1], [1, -1]] + I (x) [[1, -1], [-1, -1]], C symmetric
            h = np.kron(core, [[1, 1], [1, -1]]) + np.kron(np.eye(q + 1, dtype=np.int64), [[1, -1], [-1, -1]])
        h = h.astype(np.int8)
    h.flags.writeable = False
    return h


def base_order(n: int) -> int:
    """The smallest base order m with n = m * 2^k; UnsupportedSizeError when there is none."""
    candidates = [n >> k for k in range(n.bit_length()) if n % (1 << k) == 0]
    for m in sorted(candidates):
        if m == 1 or (m <= MAX_BASE_ORDER and paley_kind(m)):  # Paley orders are 0 mod 4
            return m
    raise UnsupportedSizeError(
        f"size {n} is not m * 2^k for a Hadamard base order m this transform builds (1 or a Paley order "
        f"<= {MAX_BASE_ORDER}: q + 1 for a prime power q = 3 mod 4, 2(q + 1) for q = 1 mod 4); use the "
        "Kronecker transform (transform='kronecker') for this size")


def hadamard_matrix(n: int) -> np.ndarray:
    """The dense H_n = H_m (x) S_{2^k}, int8 [n, n] (unnormalised): the reference the fast transform
    is tested against; never needed to apply it."""
    m = base_order(n)
    sylvester = np.ones((1, 1), np.int8)
    while sylvester.shape[0] < n // m:
        sylvester = np.block([[sylvester, sylvester], [sylvester, -sylvester]])
    return np.kron(base_matrix(m), sylvester)


# ------------------------------------------------------------------------ fast transforms

def fwht(x: jax.Array) -> jax.Array:
    """Unnormalised Walsh-Hadamard transform S_n x along the last axis (n a power of two),
    log2(n) butterfly stages: x [..., n] -> [..., n]."""
    n = x.shape[-1]
    if n & (n - 1):
        raise UnsupportedSizeError(f"the Walsh-Hadamard transform needs a power of two, got {n}")
    lead = x.shape[:-1]
    half = 1
    while half < n:
        pairs = x.reshape(*lead, n // (2 * half), 2, half)
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        x = jnp.stack([a + b, a - b], axis=-2).reshape(*lead, n)
        half *= 2
    return x


def hadamard_transform(x: jax.Array, transpose: bool = False) -> jax.Array:
    """H_n x / sqrt(n) (or H_n^T x / sqrt(n)) for each vector along the last axis: [..., n] -> [..., n]."""
    n = x.shape[-1]
    m = base_order(n)
    y = fwht(x.reshape(*x.shape[:-1], m, n // m))
    if m > 1:
        h = jnp.asarray(base_matrix(m).T if transpose else base_matrix(m), x.dtype)
        y = jnp.einsum("ij,...jk->...ik", h, y, precision=jax.lax.Precision.HIGHEST)
    return (y * (1.0 / math.sqrt(n))).reshape(x.shape)


def randomized_hadamard(x: jax.Array, signs: jax.Array, transpose: bool = False) -> jax.Array:
    """U x with U = H_n diag(signs) / sqrt(n) (transpose: U^T x = signs * H_n^T x / sqrt(n)) along
    the last axis; signs [n] of +-1. x [..., n] -> [..., n] in x.dtype."""
    signs = signs.astype(x.dtype)
    if transpose:
        return hadamard_transform(x, transpose=True) * signs
    return hadamard_transform(x * signs)
