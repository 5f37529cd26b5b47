"""Seeded rotations: orthogonal, regenerated bit for bit from their seed, small to store."""

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxq.checkpoint import CheckpointError
from jaxq.formats import rotation
from jaxq.transforms import UnsupportedSizeError, kronecker
from tests.jaxq.test_checkpoint import leaves_equal as same_arrays


@jax.jit
def dense_and_round_trip(r, x):
    """(U [n, n] of a rotation, column j = U e_j; U^T U x)."""
    return r.apply(jnp.eye(r.size, dtype=jnp.float32)).T, r.apply_transpose(r.apply(x))


def dense(r):
    return np.asarray(dense_and_round_trip(r, jnp.zeros((1, r.size)))[0])


@pytest.mark.parametrize("kind", ["hadamard", "kronecker"])
@pytest.mark.parametrize("n", [64, 192, 576, 1536])
def test_orthogonal_in_float32_and_transpose_inverts(kind, n):
    r = rotation.generate(kind, n, seed=3)
    x = np.random.default_rng(n).normal(size=(2, n)).astype(np.float32)
    u, back = map(np.asarray, dense_and_round_trip(r, jnp.asarray(x)))
    np.testing.assert_allclose(u.T @ u, np.eye(n), atol=1e-5)
    np.testing.assert_allclose(back, x, atol=1e-5)
    if kind == "hadamard":  # int8 signs and the uint32 seed
        assert r.nbytes == n + 4
    else:  # float32 factors, int16 permutations, the seed
        a, b = kronecker.balanced_factors(n)
        assert r.nbytes == 4 * (a * a + b * b) + 2 * 2 * n + 4


@pytest.mark.parametrize("kind", ["hadamard", "kronecker"])
def test_the_seed_regenerates_the_rotation_bit_for_bit(kind):
    r = rotation.generate(kind, 576, seed=2 ** 32 - 1)
    assert r.seed.dtype == jnp.uint32 and r.seed.shape == () and int(r.seed) == 2 ** 32 - 1
    assert same_arrays(r, r.regenerate())
    other = rotation.generate(kind, 576, seed=5)
    assert not np.array_equal(dense(r), dense(other))
    # seeds are arrays, not trace metadata: rotations of every seed share one jit trace
    assert jax.tree_util.tree_structure(r) == jax.tree_util.tree_structure(other)


def test_hadamard_rotation_is_the_signed_hadamard_matrix():
    from jaxq.transforms import hadamard

    r = rotation.generate("hadamard", 48, seed=0)
    signs = np.asarray(r.signs).astype(np.float64)
    assert set(signs) == {-1.0, 1.0} and r.describe() == "hadamard 12x4"
    np.testing.assert_allclose(dense(r), hadamard.hadamard_matrix(48) * signs[None, :] / np.sqrt(48), atol=1e-6)


@pytest.mark.parametrize("kind, size, seed, error, message", [
    ("givens", 64, 0, ValueError, "unknown rotation kind 'givens'"),
    ("hadamard", 64, -1, ValueError, "uint32"),
    ("hadamard", 64, 2 ** 32, ValueError, "uint32"),
    ("hadamard", 18, 0, UnsupportedSizeError, "size 18 is not m \\* 2\\^k.*transform='kronecker'"),
])
def test_bad_requests_are_refused(kind, size, seed, error, message):
    with pytest.raises(error, match=message):
        rotation.generate(kind, size, seed)


def digest(*arrays) -> str:
    """sha256 over each array's dtype, shape and bytes."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(np.asarray(a))
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


BUMP = ("the rotation stream of Rotated format version 1 changed: stored seeds would regenerate other rotations; "
        "a deliberate change needs a Rotated format_version bump (and these golden values recomputed)")


def test_the_format_v1_stream_is_pinned():
    """Golden values of the generator (computed once, jax 0.10.2): signs, permutations and the normals
    behind the Kronecker factors, bit for bit, whatever the process's threefry flag."""
    signs = rotation.generate("hadamard", 576, seed=7).signs
    kron = rotation.generate("kronecker", 192, seed=7)
    normals = rotation.host_generated(rotation._kronecker_draws, 7, a=24, b=8)[:2]
    assert digest(signs) == "efff1cc3078d2800634dfa63f7ed61921d4d986d15af1274350db9ffff4db6f2", BUMP
    assert digest(kron.perm_in, kron.perm_out) == (
        "721303a9ec37d886c0a2235f0b946955bf3ff6675f47b8450acb8ca3c51c1c7e"), BUMP
    assert digest(*normals) == "8ff5b778c61c855e08372a60fa7342509ade8adbc236622ca39b614ac6f543e1", BUMP
    with jax.threefry_partitionable(False):  # the other stream, were the process to choose it
        assert same_arrays(rotation.generate("hadamard", 576, seed=7).signs, signs), BUMP


def test_the_kronecker_factors_are_pinned_special_orthogonal():
    """The factors: numpy LAPACK's QR of the pinned normals (a LAPACK build can change their last bits;
    then `regenerate` is no longer bit for bit: a format v1 break for regenerated rotations)."""
    kron = rotation.generate("kronecker", 192, seed=7)
    assert digest(kron.left, kron.right) == "b771bdbfdf641f0e7104d9686429f83b55fc3eac70b4856055f9266271ad850e", (
        f"{BUMP}; or numpy's LAPACK QR rounds differently here")
    for factor in (kron.left, kron.right):
        assert np.linalg.det(np.asarray(factor, np.float64)) == pytest.approx(1.0, abs=1e-5)


def test_an_unknown_kind_in_a_record_is_a_checkpoint_error():
    r = rotation.generate("hadamard", 64, seed=0)
    with pytest.raises(CheckpointError, match="unknown rotation kind 'givens'"):
        rotation.from_record(r.arrays(), {"kind": "givens", **r.static_fields()})
    assert same_arrays(rotation.from_record(r.arrays(), {"kind": r.kind, **r.static_fields()}), r)
