"""Static activation ranges: calibrated per-tensor scales, against the captured inputs they come from."""

import numpy as np
import pytest

import jaxq
import models
from jaxq import calibrate
from models.language_model import block_forward, embed

CONFIG = models.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                            num_kv_heads=2, head_dim=8)


@pytest.mark.parametrize("calibration", ["minmax", "percentile", "kl"])
def test_static_scales_come_from_the_calibration_inputs(calibration, rng, tmp_path):
    params = models.init_params(CONFIG, seed=3)
    lm = models.LanguageModel(CONFIG, params)
    tokens = rng.integers(0, 97, (4, 16)).astype(np.int32)
    calib = calibrate.Calibration(config=CONFIG, tokens=tokens, progress=False)
    activations = jaxq.ActivationConfig(bits=8, calibration=calibration, percentile=99.0)
    deployed = jaxq.quantize_model(lm, jaxq.QuantConfig.for_method(None, activations=activations), calib)
    block0 = deployed.params["layers"][0]
    _, inputs = block_forward(CONFIG, params["layers"][0], embed(CONFIG, params, tokens), capture_inputs=True)
    x = np.abs(np.asarray(inputs["self_attn/q_proj"]))
    expected = {"minmax": x.max(), "percentile": np.percentile(x, 99.0), "kl": None}[calibration]
    scale = float(block0["self_attn"]["q_proj"]["input_scale"])
    assert scale == float(block0["self_attn"]["k_proj"]["input_scale"])  # one input, one range
    if expected is not None:  # float32 percentile interpolation vs float64: 1e-5
        assert scale * 127 == pytest.approx(expected, rel=1e-5)
    else:
        assert 0 < scale * 127 <= x.max() * (1 + 1e-6)
    # the model runs on its static grids: 8-bit activations stay close to the float model
    out = np.asarray(deployed.apply(deployed.params, tokens))
    reference = np.asarray(lm.apply(params, tokens))
    assert 0 < np.abs(out - reference).max() < 0.1 * np.abs(reference).max()  # measured <= 8% (99th percentile)
    jaxq.save(tmp_path / "c", deployed.params, model_config=deployed.config)
    loaded = jaxq.load(tmp_path / "c").language_model()
    np.testing.assert_array_equal(np.asarray(loaded.apply(loaded.params, tokens)), out)


def test_static_ranges_need_calibration_data():
    lm = models.LanguageModel(CONFIG, models.init_params(CONFIG, seed=3))
    cfg = jaxq.QuantConfig.for_method(None, activations=jaxq.ActivationConfig(calibration="kl"))
    with pytest.raises(jaxq.ConfigError, match="need calibration data"):
        jaxq.quantize_model(lm, cfg)
