"""QuIP's Kronecker transform against the dense P_out (L (x) R) P_in."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxq.transforms import kronecker


def test_balanced_factors_deal_the_primes_alternately():
    assert kronecker.balanced_factors(576) == (24, 24)
    assert kronecker.balanced_factors(1536) == (32, 48)
    assert kronecker.balanced_factors(192) == (24, 8)
    assert kronecker.balanced_factors(7) == (7, 1)
    assert kronecker.balanced_factors(1) == (1, 1)


def test_haar_orthogonal_is_special_orthogonal_in_float32(rng):
    q = kronecker.haar_orthogonal(rng.normal(size=(48, 48)))
    assert q.dtype == np.float32
    np.testing.assert_allclose(q.T.astype(np.float64) @ q, np.eye(48), atol=1e-6)
    # SO(p), as the reference's special_ortho_group: det +1 for every draw (half would be -1 on O(p))
    dets = [np.linalg.det(kronecker.haar_orthogonal(rng.normal(size=(p, p))).astype(np.float64))
            for p in (1, 2, 3, 8) for _ in range(8)]
    np.testing.assert_allclose(dets, 1.0, atol=1e-5)


def test_inverse_permutation(rng):
    perm = rng.permutation(50).astype(np.int16)
    inverse = np.asarray(kronecker.inverse_permutation(jnp.asarray(perm)))
    assert inverse.dtype == np.int16
    np.testing.assert_array_equal(inverse[perm], np.arange(50))


@pytest.mark.parametrize("n", [192, 112, 7])
def test_transform_equals_the_dense_matrix_both_ways(n, rng):
    a, b = kronecker.balanced_factors(n)
    left, right = kronecker.haar_orthogonal(rng.normal(size=(a, a))), kronecker.haar_orthogonal(rng.normal(size=(b, b)))
    perm_in, perm_out = rng.permutation(n).astype(np.int32), rng.permutation(n).astype(np.int32)
    eye = np.eye(n)
    dense = eye[perm_out] @ np.kron(left.astype(np.float64), right) @ eye[perm_in]  # (P v)_i = v[perm_i]
    x = rng.normal(size=(2, 3, n)).astype(np.float32)
    args = [jnp.asarray(a) for a in (left, right, perm_in, perm_out)]
    np.testing.assert_allclose(np.asarray(kronecker.kronecker_transform(jnp.asarray(x), *args)), x @ dense.T,
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(kronecker.kronecker_transform(jnp.asarray(x), *args, transpose=True)),
                               x @ dense, atol=1e-5)
