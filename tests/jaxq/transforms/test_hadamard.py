"""Hadamard matrices built by the Paley constructions, and the fast transform against them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxq.transforms import hadamard

BASE_ORDERS = [m for m in range(4, hadamard.MAX_BASE_ORDER + 1, 4) if hadamard.paley_kind(m)]
# the orders the transform uses: base_order(m * 2^k) == m (24 = 12 * 2, say, is built but never used)
USED_ORDERS = [1, *(m for m in BASE_ORDERS if hadamard.base_order(m) == m)]


def test_the_supported_base_orders_include_the_ones_models_need():
    assert {12, 20, 28, 36, 52, 60, 108, 124, 140, 344} <= set(BASE_ORDERS)
    sizes = {576: 36, 192: 12, 1536: 12, 49152: 12, 64: 1, 4096: 1, 11008: 344, 13824: 108, 5120: 20, 28672: 28}
    assert {n: hadamard.base_order(n) for n in sizes} == sizes


@pytest.mark.parametrize("m", [1, *BASE_ORDERS])
def test_base_matrices_are_hadamard(m):
    h = hadamard.base_matrix(m).astype(np.int64)
    assert set(np.unique(h)) <= {-1, 1}
    np.testing.assert_array_equal(h @ h.T, m * np.eye(m, dtype=np.int64))


def test_paley_over_prime_power_fields():
    """GF(27) (Paley I, order 28) and GF(25) (Paley II, order 52): chi is multiplicative's sign."""
    for q in (27, 25, 343):
        chi, _ = hadamard.quadratic_character(q)
        assert chi[0] == 0 and (chi[1:] == 1).sum() == (q - 1) // 2
        jac = hadamard.jacobsthal(q).astype(np.int64)
        sign = -1 if q % 4 == 3 else 1  # skew for q = 3 mod 4, symmetric for q = 1 mod 4
        np.testing.assert_array_equal(jac.T, sign * jac)
        np.testing.assert_array_equal(jac @ jac.T, q * np.eye(q) - np.ones((q, q)))


def both_ways(x):
    return hadamard.hadamard_transform(x), hadamard.hadamard_transform(x, transpose=True)


def test_orders_with_a_smaller_base_are_not_used():
    assert USED_ORDERS[:8] == [1, 12, 20, 28, 36, 44, 52, 60]
    assert {hadamard.base_order(m) for m in (4, 8, 24, 48)} == {1, 12}


@pytest.mark.parametrize("m", USED_ORDERS)
def test_fast_transform_equals_the_dense_matrix(m, rng):
    """Every base order the transform uses, alone (n = m: no Walsh-Hadamard stage) and with a
    Walsh-Hadamard stage (n = 2m; 8 for m = 1)."""
    for n in ((m, 2 * m) if m > 1 else (1, 8)):
        assert hadamard.base_order(n) == m
        dense = hadamard.hadamard_matrix(n).astype(np.float64) / np.sqrt(n)
        x = rng.normal(size=(3, n)).astype(np.float32)
        y, y_transposed = jax.jit(both_ways)(jnp.asarray(x))
        np.testing.assert_allclose(np.asarray(y), x @ dense.T, atol=2e-5)
        np.testing.assert_allclose(np.asarray(y_transposed), x @ dense, atol=2e-5)


@pytest.mark.parametrize("n", [64, 192, 576, 1536])
def test_normalised_transform_is_orthogonal_at_model_sizes(n):
    u = np.asarray(jax.jit(hadamard.hadamard_transform)(jnp.eye(n, dtype=jnp.float32))).T  # column j = U e_j
    np.testing.assert_allclose(u.T @ u, np.eye(n), atol=1e-5)


def test_randomized_transform_keeps_leading_axes_and_dtype_and_inverts(rng):
    signs = jnp.asarray(rng.choice([-1, 1], size=576).astype(np.int8))
    x = jnp.asarray(rng.normal(size=(2, 5, 576)).astype(np.float32))
    y = hadamard.randomized_hadamard(x, signs)
    assert y.shape == x.shape
    np.testing.assert_allclose(np.asarray(hadamard.randomized_hadamard(y, signs, transpose=True)), np.asarray(x),
                               atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(y), axis=-1), np.linalg.norm(np.asarray(x), axis=-1),
                               rtol=1e-5)
    assert hadamard.randomized_hadamard(x.astype(jnp.bfloat16), signs).dtype == jnp.bfloat16


@pytest.mark.parametrize("n", [9, 18, 92, 156])
def test_unsupported_sizes_are_refused_naming_the_kronecker_transform(n):
    with pytest.raises(hadamard.UnsupportedSizeError, match=f"size {n} .*transform='kronecker'"):
        hadamard.hadamard_transform(jnp.ones((1, n)))


def test_walsh_hadamard_needs_a_power_of_two():
    with pytest.raises(hadamard.UnsupportedSizeError, match="power of two, got 12"):
        hadamard.fwht(jnp.ones((12,)))
