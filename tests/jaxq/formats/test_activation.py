"""Per-token symmetric activation quantization against a float64 numpy reference (QuaRot's
`ActQuantizer`): exact up to float32 rounding of x / scale (codes may differ only at .5 ties)."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxq.formats.activation import fake_quantize_per_token


def reference(x: np.ndarray, bits: int, clip: float) -> np.ndarray:
    scale = clip * np.abs(x).max(axis=-1, keepdims=True) / (2 ** (bits - 1) - 1)
    scale = np.where(scale > 0, scale, 1.0)
    return np.clip(np.round(x / scale), -2 ** (bits - 1), 2 ** (bits - 1) - 1) * scale


@pytest.mark.parametrize("bits, clip", [(4, 0.9), (8, 1.0), (3, 0.95)])
def test_matches_the_reference(bits, clip, rng):
    x = rng.standard_t(3, size=(5, 7, 64)).astype(np.float32)
    x[0, 0] = 0.0  # an all-zero token stays zero
    out = np.asarray(fake_quantize_per_token(jnp.asarray(x), bits, clip))
    expected = reference(x.astype(np.float64), bits, clip)
    step = (clip * np.abs(x).max(axis=-1, keepdims=True) / (2 ** (bits - 1) - 1))
    np.testing.assert_allclose(out, expected, atol=1e-6 * np.abs(x).max())
    assert np.all(out[0, 0] == 0)
    levels = np.unique(np.round(out[1, 2] / step[1, 2]))
    assert levels.min() >= -2 ** (bits - 1) and levels.max() <= 2 ** (bits - 1) - 1
    if clip < 1:  # clipping saturates the largest entries at the top code
        assert np.abs(out[1, 2]).max() == pytest.approx((2 ** (bits - 1) - 1) * step[1, 2, 0], rel=1e-6) or \
            np.abs(out[1, 2]).max() == pytest.approx(2 ** (bits - 1) * step[1, 2, 0], rel=1e-6)
