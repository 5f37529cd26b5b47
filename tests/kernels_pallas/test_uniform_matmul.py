"""uniform_matmul in Pallas interpret mode, TPU and GPU bodies, against the plain-jnp reference.

Tolerance: float32 activations, so the kernel differs from the reference only by float32
summation order: |dy| <= 1e-5 * max|y|. With bfloat16 activations each dequantized weight is
rounded to bf16 (relative 2^-9): 2e-2 * max|y| covers sums of a few thousand such terms.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxq.config import UniformConfig
from jaxq.formats import UniformQ
from jaxq.methods import rtn
from kernels_pallas import reference, uniform_matmul

# (bits, granularity / group, zero point, K, N): every bit width, zero mode and grain; K and N
# neither powers of two nor tile multiples, so the last K and N tiles are padded (K = 576, 1100,
# 1537; N = 200, 96, 160, 72)
CASES = {
    "tpu": [(4, 128, "int", 2048, 384), (3, 128, "float", 4096, 200), (2, 64, "none", 2048, 256),
            (8, 32, "int", 1100, 384), (4, 1024, "float", 8192, 128), (4, "channel", "int", 1537, 200),
            (4, 64, "int", 576, 576)],
    "gpu": [(4, 128, "int", 2048, 384), (3, 128, "float", 1100, 96), (2, 64, "none", 2048, 160),
            (8, 32, "int", 1100, 72), (4, 1024, "float", 4096, 64), (4, "channel", "int", 1537, 96),
            (4, 32, "int", 576, 200)],
}
ROWS = (1, 3, 17)


def quantized(rng, bits, grain, zero_point, k, n, act_order=False):
    cfg = UniformConfig(bits=bits, group_size=grain if grain != "channel" else 128,
                        granularity="channel" if grain == "channel" else "group",
                        symmetric=zero_point == "none", zero_point="int" if zero_point == "none" else zero_point)
    w = rtn.quantize_weight(jnp.asarray(rng.normal(size=(k, n)).astype(np.float32)), cfg)
    if act_order:  # a stored row order, as GPTQ's act_order produces
        w = UniformQ(w.codes, w.scale, w.zero, jnp.asarray(rng.permutation(k).astype(np.int32)), w.bits,
                     w.group_size, w.shape, w.dtype, w.zero_point)
    return w


def expected(x, w):
    return np.asarray(reference.uniform_matmul(x, w.codes, w.scale, w.zero, bits=w.bits, group_size=w.group_size,
                                               zero_point=w.zero_point, perm=w.perm))


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@pytest.mark.parametrize("case", range(7))
def test_matches_reference(backend, case, fresh_rng):
    bits, grain, zero_point, k, n = CASES[backend][case]
    w = quantized(fresh_rng, bits, grain, zero_point, k, n)
    for rows in ROWS:
        x = fresh_rng.normal(size=(rows, k)).astype(np.float32)
        y = uniform_matmul(jnp.asarray(x), w, backend=backend, interpret=True)
        assert y is not None, f"{backend} kernel refused {CASES[backend][case]}"
        want = expected(x, w)
        assert np.abs(np.asarray(y) - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_act_order_bfloat16_and_leading_dims(backend, fresh_rng):
    w = quantized(fresh_rng, 4, 128, "int", 2048, 256, act_order=True)
    x = fresh_rng.normal(size=(2, 3, 2048)).astype(np.float32)
    y = uniform_matmul(jnp.asarray(x, jnp.bfloat16), w, backend=backend, interpret=True)
    assert y.shape == (2, 3, 256) and y.dtype == jnp.bfloat16
    want = expected(x.reshape(6, 2048), w).reshape(2, 3, 256)
    assert np.abs(np.asarray(y, np.float32) - want).max() <= 2e-2 * np.abs(want).max()


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_prefill_sized_rows(backend, fresh_rng):
    w = quantized(fresh_rng, 4, 128, "int", 1024, 256)
    x = fresh_rng.normal(size=(300, 1024)).astype(np.float32)  # several M tiles, padded
    y = uniform_matmul(jnp.asarray(x), w, backend=backend, interpret=True)
    want = expected(x, w)
    assert np.abs(np.asarray(y) - want).max() <= 1e-5 * np.abs(want).max()


def test_group_sizes_the_tiling_cannot_serve_are_declined(fresh_rng):
    """A 4-bit word holds 8 rows: groups of 100 rows split words, so neither tiling serves them."""
    w = quantized(fresh_rng, 4, 100, "int", 576, 200)
    x = jnp.asarray(fresh_rng.normal(size=(2, 576)).astype(np.float32))
    assert uniform_matmul(x, w, backend="tpu", interpret=True) is None
    assert uniform_matmul(x, w, backend="gpu", interpret=True) is None
