"""Exact (order-independent) statistics against float64 numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from jaxq.calibrate import stats

MESH = Mesh(np.array(jax.devices()[:1]), ("data",))


def sharded(fn):
    return jax.jit(jax.shard_map(lambda xs: fn(xs, "data"), mesh=MESH, in_specs=P("data"), out_specs=P()))


def outlier_activations(rng, samples=6, tokens=40, channels=24):
    """Activations with channels spanning 1e-3 .. 1e4, like LLM residual streams."""
    scale = np.logspace(-3, 4, channels)
    return (rng.normal(size=(samples, tokens, channels)) * scale).astype(np.float32)


def test_limbs_round_trip_to_45_bits(rng):
    v = rng.uniform(-1, 1, size=1000).astype(np.float32)
    back = np.asarray(stats.from_limbs(stats.to_limbs(jnp.asarray(v))))
    np.testing.assert_array_equal(back, v)  # float32 has 24 bits: the limbs hold it exactly


def test_gram_matches_float64_entrywise_despite_dynamic_range(rng):
    xs = outlier_activations(rng)
    got = np.asarray(sharded(stats.exact_gram)(jnp.asarray(xs)), np.float64)
    x64 = xs.astype(np.float64).reshape(-1, xs.shape[-1])
    want = x64.T @ x64
    bound = np.sqrt(np.outer(np.diag(want), np.diag(want)))
    assert np.all(np.abs(got - want) <= 1e-6 * bound)  # float32-level, relative to each entry's scale


def test_abs_sum_matches_float64(rng):
    xs = outlier_activations(rng)
    got = np.asarray(sharded(stats.exact_abs_sum)(jnp.asarray(xs)), np.float64)
    want = np.abs(xs.astype(np.float64)).sum(axis=(0, 1))
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("fn", [stats.exact_gram, stats.exact_abs_sum])
def test_sums_do_not_depend_on_sample_order(fn, rng):
    """Bitwise: integer limbs make the reduction associative."""
    xs = outlier_activations(rng, samples=8)
    a = np.asarray(sharded(fn)(jnp.asarray(xs)))
    b = np.asarray(sharded(fn)(jnp.asarray(xs[rng.permutation(8)])))
    np.testing.assert_array_equal(a, b)


def test_float32_psum_style_accumulation_is_order_dependent(rng):
    """Why the limbs exist: a plain float32 sum of the same per-sample Grams depends on order."""
    xs = outlier_activations(rng, samples=8)
    grams = np.einsum("stk,stj->skj", xs, xs).astype(np.float32)
    forward = np.zeros_like(grams[0])
    for g in grams:
        forward += g
    backward = np.zeros_like(grams[0])
    for g in grams[::-1]:
        backward += g
    assert not np.array_equal(forward, backward)


@pytest.mark.parametrize("fn", [stats.exact_gram, stats.exact_abs_sum])
def test_non_finite_inputs_give_nan_not_garbage(fn, rng):
    xs = outlier_activations(rng)
    xs[2, 5, 3] = np.nan
    assert np.isnan(np.asarray(sharded(fn)(jnp.asarray(xs)))).all()
