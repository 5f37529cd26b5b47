"""KV-cache group quantization against a float64 numpy reference, and lossless byte packing."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxq.formats import kv


def reference(x: np.ndarray, bits: int, clip: float) -> np.ndarray:
    """QuaRot's asymmetric quantizer with the range including 0, scale rounded to float16."""
    levels = 2 ** bits - 1
    low = np.minimum(x.min(-1), 0) * clip
    high = np.maximum(x.max(-1), 0) * clip
    scale = ((high - low) / levels).astype(np.float16).astype(np.float64)
    scale = np.where(scale > 0, scale, 1.0)
    zero = np.clip(np.round(-low / scale), 0, levels)
    codes = np.clip(np.round(x / scale[..., None]) + zero[..., None], 0, levels)
    return (codes - zero[..., None]) * scale[..., None]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_fake_quantize_matches_the_reference(bits, rng):
    x = (rng.standard_normal((3, 5, 2, 64)) * rng.uniform(0.1, 10, (3, 5, 2, 1)) + 0.3).astype(np.float32)
    x[0, 0, 0] = 0.0
    out = np.asarray(kv.fake_quantize(jnp.asarray(x), bits, 0.95))
    expected = reference(x.astype(np.float64), bits, 0.95)
    # codes can differ only where x / scale lies within float32 rounding of a .5 tie
    mismatched = ~np.isclose(out, expected, atol=1e-5 * np.abs(x).max())
    assert mismatched.mean() < 1e-3
    assert np.all(out[0, 0, 0] == 0)
    error = np.abs(out - x).max(axis=-1)
    step = 0.95 * (np.maximum(x.max(-1), 0) - np.minimum(x.min(-1), 0)) / (2 ** bits - 1)
    assert np.all(error <= 0.05 * np.abs(x).max(-1) + step + 1e-6)  # the clipped 5%, plus a step


@pytest.mark.parametrize("bits, axis", [(2, -1), (4, -1), (2, 1), (8, 0)])
def test_packing_is_lossless(bits, axis, rng):
    codes = rng.integers(0, 2 ** bits, size=(8, 16, 4)).astype(np.uint8)
    packed = kv.pack_codes(jnp.asarray(codes), bits, axis)
    assert packed.dtype == jnp.uint8 and packed.shape[axis] == codes.shape[axis] * bits // 8
    np.testing.assert_array_equal(np.asarray(kv.unpack_codes(packed, bits, axis)), codes)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="unsupported KV-cache bits=3"):
        kv.quantize_groups(jnp.zeros((2, 8)), 3, 1.0)
    with pytest.raises(ValueError, match="not a multiple of 2"):
        kv.pack_codes(jnp.zeros((3,), jnp.uint8), 4, axis=0)
