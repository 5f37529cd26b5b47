import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxq
import kernels_pallas
import models
from jaxq.config import UniformConfig
from jaxq.formats import CodebookQ
from jaxq.methods import rtn
from kernels_pallas import packed


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts packed-kernel invocations that actually ran a kernel (not declined)."""
    calls = []
    real = packed.packed_matmul

    def spy(*args, **kwargs):
        y = real(*args, **kwargs)
        calls.append(y is not None)
        return y

    for module in (kernels_pallas.uniform_matmul_module, kernels_pallas.lut_matmul_module):
        monkeypatch.setattr(module, "packed_matmul", spy)
    return calls


def weight(rng, k=1024, n=256):
    return rtn.quantize_weight(jnp.asarray(rng.normal(size=(k, n)).astype(np.float32)), UniformConfig(bits=4))


def test_cpu_auto_mode_uses_the_xla_path(kernel_calls, rng):
    w = weight(rng)
    x = jnp.asarray(rng.normal(size=(3, 1024)).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(kernels_pallas.matmul(x, w)), np.asarray(w.matmul(x)))
    assert kernel_calls == []


@pytest.mark.parametrize("mode", ["interpret-tpu", "interpret-gpu"])
def test_interpret_modes_run_the_kernel_for_both_formats(mode, kernel_calls, rng):
    w = weight(rng)
    x = jnp.asarray(rng.normal(size=(3, 1024)).astype(np.float32))
    with kernels_pallas.use_kernels(mode):
        for fmt in (w, CodebookQ.from_uniform(w)):
            np.testing.assert_allclose(np.asarray(kernels_pallas.matmul(x, fmt)), np.asarray(w.matmul(x)),
                                       rtol=1e-4, atol=1e-4)
    assert kernel_calls == [True, True]


def test_unsuitable_group_sizes_fall_back_to_xla(kernel_calls, rng):
    w = rtn.quantize_weight(jnp.asarray(rng.normal(size=(576, 200)).astype(np.float32)),
                            UniformConfig(bits=4, group_size=100))  # groups split 4-bit words
    x = jnp.asarray(rng.normal(size=(2, 576)).astype(np.float32))
    with kernels_pallas.use_kernels("interpret-gpu"):
        np.testing.assert_array_equal(np.asarray(kernels_pallas.matmul(x, w)), np.asarray(w.matmul(x)))
    assert kernel_calls == [False]


@pytest.mark.parametrize("mode", ["interpret-tpu", "interpret-gpu"])
def test_rows_above_the_kernel_limit_take_the_xla_path(mode, kernel_calls, rng):
    w = weight(rng, k=256, n=128)
    limit = kernels_pallas.KERNEL_MAX_ROWS[mode.split("-")[1]]
    x = jnp.asarray(rng.normal(size=(2, limit // 2 + 1, 256)).astype(np.float32))  # [..., in]: rows counted
    with kernels_pallas.use_kernels(mode):
        np.testing.assert_array_equal(np.asarray(kernels_pallas.matmul(x, w)), np.asarray(w.matmul(x)))
    assert kernel_calls == []


def test_environment_variable_forces_xla_and_is_validated(monkeypatch, kernel_calls, rng):
    monkeypatch.setenv(kernels_pallas.MODE_ENV, "xla")
    assert kernels_pallas.kernel_mode() == "xla"
    w = weight(rng)
    kernels_pallas.matmul(jnp.ones((1, 1024)), w)
    assert kernel_calls == []
    monkeypatch.setenv(kernels_pallas.MODE_ENV, "fast")
    with pytest.raises(ValueError, match="JAXQ_KERNELS='fast'"):
        kernels_pallas.kernel_mode()


@pytest.mark.parametrize("mode", ["interpret-gpu", "interpret-tpu"])
def test_quantized_model_end_to_end_through_the_kernels(mode, kernel_calls, rng):
    """Logits through the kernels equal the XLA path's within bfloat16 tolerance."""
    config = models.LlamaConfig(vocab_size=101, hidden_size=128, intermediate_size=256, num_layers=2,
                                num_heads=4, num_kv_heads=2, head_dim=32, dtype="bfloat16")
    params = jaxq.quantize(models.init_params(config, seed=0), UniformConfig(bits=4, group_size=128))
    tokens = jnp.asarray(rng.integers(0, 101, size=(2, 8)), jnp.int32)
    forward = lambda: np.asarray(jax.jit(models.forward.__wrapped__, static_argnames="config")(config, params, tokens)[0])
    with kernels_pallas.use_kernels("xla"):
        xla = forward()
    with kernels_pallas.use_kernels(mode):
        kernel = forward()
    ran = sum(kernel_calls)
    assert ran == 14, kernel_calls  # all 7 linears of both blocks (k/v: 64 outputs, a whole-N TPU tile)
    assert np.abs(kernel - xla).max() <= 3e-2 * np.abs(xla).max()
    assert (kernel.argmax(-1) == xla.argmax(-1)).mean() > 0.9
