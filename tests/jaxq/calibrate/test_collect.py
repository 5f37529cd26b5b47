"""Statistics collected over a block's calibration inputs, against float64 numpy."""

import jax.numpy as jnp
import numpy as np

import models
from jaxq.calibrate import collect, sequential
from jaxq.methods.protocol import AbsMean, Hessian, Inputs
from models.language_model import block_forward, embed
from tests.jaxq.calibrate.test_sequential import GQA, calibration


def test_statistics_match_float64_of_the_captured_inputs(rng):
    params = models.init_params(GQA, seed=0)
    cal = calibration(GQA, rng)
    mesh = sequential.make_mesh(1)
    h = embed(GQA, params, jnp.asarray(cal.tokens)).astype(jnp.float32)
    needs = (("mlp_out", "mlp/down_proj", (Hessian(), AbsMean(), Inputs(per_window=5))),)
    got = collect.collect(GQA, mesh, params["layers"][0], h, needs, cal.step_samples)["mlp_out"]
    _, captured = block_forward(GQA, params["layers"][0], h, capture_inputs=True)
    inputs = np.asarray(captured["mlp/down_proj"], np.float64)  # [8, 32, 96]
    x = inputs.reshape(-1, 96)
    want = 2.0 / x.shape[0] * x.T @ x  # H = 2/N sum x^T x
    bound = np.sqrt(np.outer(np.diag(want), np.diag(want)))
    assert np.all(np.abs(np.asarray(got[Hessian()]) - want) <= 1e-5 * bound)  # 45-bit sums, float32 inputs
    np.testing.assert_allclose(np.asarray(got[AbsMean()]), np.abs(x).mean(0), rtol=1e-5)
    positions = np.linspace(0, 31, 5).astype(int)
    assert list(positions) == [0, 7, 15, 23, 31]
    # the driver runs one sample at a time, block_forward here the batch: float32 rounding apart
    np.testing.assert_allclose(np.asarray(got[Inputs(per_window=5)]), inputs[:, positions], rtol=1e-5, atol=1e-6)
