"""The kernels lower for TPU (Mosaic custom call) and for CUDA (Triton) on this CPU-only
machine, so a TPU or GPU user does not meet a lowering error first. Mosaic's and Triton's own
final compiles run only on the devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxq.config import UniformConfig
from jaxq.formats import CodebookQ
from jaxq.methods import rtn
from kernels_pallas import lut_matmul, uniform_matmul

CONFIGS = [UniformConfig(bits=4, group_size=128), UniformConfig(bits=3, group_size=128, zero_point="float"),
           UniformConfig(bits=2, group_size=64, symmetric=True), UniformConfig(bits=8, group_size=1024),
           UniformConfig(bits=4, granularity="channel")]
TARGETS = {"tpu": ("tpu", "tpu_custom_call"), "gpu": ("cuda", "triton")}


def lowered_text(fn, w, backend, rows):
    platform, _ = TARGETS[backend]
    x = jnp.zeros((rows, w.shape[0]), jnp.bfloat16)
    return jax.jit(functools.partial(fn, backend=backend)).trace(x, w).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.describe().replace(" ", "-"))
@pytest.mark.parametrize("kernel", ["uniform", "lut"])
def test_lowers(backend, cfg, kernel):
    w = rtn.quantize_weight(jnp.asarray(np.random.default_rng(0).normal(size=(4096, 1024)).astype(np.float32)), cfg)
    fn, w = (uniform_matmul, w) if kernel == "uniform" else (lut_matmul, CodebookQ.from_uniform(w))
    for rows in (1, 256):  # decode and prefill tilings
        assert TARGETS[backend][1] in lowered_text(fn, w, backend, rows)
