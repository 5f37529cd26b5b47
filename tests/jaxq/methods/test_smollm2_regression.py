"""Perplexity bounds on the real model: a change that makes RTN, GPTQ or AWQ worse on
smollm2-135m fails here, not only in the README's table.

Sized for CI on 2 CPU cores: 3-bit g128 (where the methods differ most), WikiText-2 test text
(the quick protocol's windows of 512, the first 16 of them) and 8 calibration windows of 512
(the first 8 of the protocol's draws). The bounds are the perplexities measured with these
settings (values in MEASURED, `jaxq` at the commit that added this file, jax 0.10.2 CPU) plus a
margin: 1% for RTN, which is deterministic up to float summation order; 6% for GPTQ and AWQ,
whose 3-bit results move by a few percent under last-bit changes of the calibration numerics
(see the README). Dropping act-order, or AWQ's scales, costs more than that margin.
"""

import pytest

import jaxq
from jaxq import calibrate, data, evaluate

W3 = jaxq.UniformConfig(bits=3, group_size=128)
EVAL = dict(ctx=512, windows=16)
MEASURED = {"rtn": 183.877, "gptq": 139.520, "awq": 94.600}  # 50 s, 140 s, 321 s (quantize + evaluate)
MARGIN = {"rtn": 1.01, "gptq": 1.06, "awq": 1.06}
METHODS = {"rtn": W3, "gptq": jaxq.GPTQConfig(uniform=W3, act_order=True), "awq": jaxq.AWQConfig(uniform=W3)}


@pytest.fixture(scope="module")
def calibration(smollm):
    return calibrate.from_text(smollm, data.CALIBRATION_SOURCE, samples=8, length=512, progress=False)


@pytest.fixture(scope="module")
def rtn_ppl(smollm):
    return evaluate.perplexity(smollm, jaxq.quantize(smollm.params, W3), **EVAL, progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_three_bit_perplexity_stays_within_its_bound(smollm, calibration, rtn_ppl, method):
    cfg = METHODS[method]
    ppl = rtn_ppl if method == "rtn" else evaluate.perplexity(
        smollm, jaxq.quantize(smollm.params, cfg, calibration), **EVAL, progress=False)
    print(f"{method}: {ppl:.4f}")
    assert ppl <= MEASURED[method] * MARGIN[method], f"{method} 3-bit perplexity {ppl:.3f} regressed"
    if method != "rtn":
        assert ppl < 0.85 * rtn_ppl  # data-aware methods must still beat RTN clearly at 3 bits (measured: 0.76, 0.51)
