"""OBR on one layer: WANDA's mask kept exactly, the restorations lowering the layer's loss, and
no zeroed rows where the reference's OBR-GPTQ zeroes them (K = 576, smollm2's hidden size)."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxq.config import GPTQConfig, OBRConfig, UniformConfig, WandaConfig
from jaxq.methods import obr, protocol, registry
from tests.jaxq.methods.test_sparsegpt import problem, proxy_loss


def run(config, w, h):
    return registry.method(config).quantize([w], {protocol.Hessian(): h}, "layer")[0]


@pytest.mark.parametrize("prune", [0.5, (2, 4)])
def test_obr_keeps_wandas_mask_and_restores_what_it_removed(prune, rng):
    x, h, w = problem(rng, k=576, n=32)
    grid = UniformConfig(bits=4, granularity="channel", symmetric=True)
    wanda = run(WandaConfig(uniform=grid, prune=prune), w, h)
    losses = {"wanda": proxy_loss(x, wanda.dequantize(jnp.float32), w)}
    for kind in ("rtn", "gptq"):
        restored = run(OBRConfig(gptq=GPTQConfig(uniform=grid), prune=prune, rounding=kind), w, h)
        np.testing.assert_array_equal(np.asarray(restored.keep_mask()), np.asarray(wanda.keep_mask()))
        dense = np.asarray(restored.dequantize(jnp.float32))
        alive = np.asarray(restored.keep_mask()).any(axis=1)  # WANDA prunes low-norm inputs everywhere
        assert np.all(np.abs(dense[alive]).sum(axis=1) > 0)  # no zeroed rows (the reference's trap at 576)
        losses[kind] = proxy_loss(x, dense, w)
    assert losses["gptq"] < losses["rtn"] < 0.7 * losses["wanda"], losses


def test_the_late_part_starts_at_a_group_boundary():
    assert obr.boundary(576, 0.5, 576) == 288          # per channel: alpha * K
    assert obr.boundary(576, 0.5, 128) == 256          # g128: the nearest group boundary
    assert obr.boundary(1536, 0.5, 128) == 768
    assert obr.boundary(256, 0.1, 128) == 128          # at least one group on each side
    assert obr.boundary(640, 0.5, 128) == obr.boundary(896, 0.5, 128) - 128 == 384  # halves round up


def test_obr_on_g128_grids_with_linears_sharing_an_input(rng):
    """smollm2's q/k/v shapes at g128: the GPTQ part starts at the group boundary 256 (alpha * K
    = 288 falls inside group 2), on the dense weights' group grids; each kernel keeps its mask."""
    x, h, w = problem(rng, k=576, n=48)
    grid = UniformConfig(bits=4, group_size=128)
    kernels = [w[:, :32], w[:, 32:]]
    stats = {protocol.Hessian(): h}
    restored = registry.method(OBRConfig(gptq=GPTQConfig(uniform=grid))).quantize(kernels, stats, "attn")
    wanda = registry.method(WandaConfig(uniform=grid)).quantize(kernels, stats, "attn")
    for r, p, kernel in zip(restored, wanda, kernels):
        np.testing.assert_array_equal(np.asarray(r.keep_mask()), np.asarray(p.keep_mask()))
        assert proxy_loss(x, r.dequantize(jnp.float32), kernel) < 0.7 * proxy_loss(x, p.dequantize(jnp.float32), kernel)
