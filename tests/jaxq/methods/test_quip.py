"""QuIP: incoherence processing around LDLQ, against GPTQ and LDLQ without it; the command line."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxq
from jaxq import checkpoint, cli
from jaxq.config import ConfigError, GPTQConfig, QuIPConfig, UniformConfig
from jaxq.formats import Rotated, UniformQ, rotation
from jaxq.methods import gptq, ldlq, protocol, quip, registry, rtn
from jaxq.methods.gptq import SingularHessianError
from jaxq.transforms import UnsupportedSizeError
from tests.jaxq.test_checkpoint import leaves_equal

K, N = 192, 96  # 12 * 16 and 12 * 8: both transforms apply


@pytest.fixture(scope="module")
def layer():
    """A heavy-tailed W [K, N] and H [K, K] of inputs with a few outlier channels (x30), as in LLMs."""
    rng = np.random.default_rng(0)
    w = rng.standard_t(3, size=(K, N)).astype(np.float32) * 0.05
    x = rng.normal(size=(1024, K)) * np.where(np.arange(K) % 48 == 5, 30.0, 1.0)
    return jnp.asarray(w), jnp.asarray((2 * x.T @ x / len(x)).astype(np.float32))


def quadratic(dw, h):
    """tr(dW^T H dW), float64."""
    dw = np.asarray(dw, np.float64)
    return np.trace(dw.T @ np.asarray(h, np.float64) @ dw)


def proxy_loss(w_hat, w, h):
    """tr(dW^T H dW) / tr(W^T H W): the relative output error on the calibration inputs."""
    return quadratic(np.asarray(w_hat, np.float64) - np.asarray(w, np.float64), h) / quadratic(w, h)


def coherence(w):
    """mu(W) = max|W_ij| sqrt(K N) / |W|_F."""
    w = np.asarray(w, np.float64)
    return np.abs(w).max() * np.sqrt(w.size) / np.linalg.norm(w)


@pytest.mark.parametrize("kind", ["hadamard", "kronecker"])
def test_rotation_keeps_the_proxy_loss_and_spreads_the_outliers(kind, layer):
    """tr(dW^T H dW) = tr(dW~^T H~ dW~) for any dW; mu(W~) and mu(H~) at most half of W's and H's."""
    w, h = layer
    u_in, u_out = rotation.generate(kind, K, 1), rotation.generate(kind, N, 2)
    dw = jnp.asarray(np.random.default_rng(1).normal(size=(K, N)).astype(np.float32))
    w_rot, h_rot = jax.jit(quip.rotate)(w, h, u_in, u_out)
    dw_rot, _ = jax.jit(quip.rotate)(dw, h, u_in, u_out)
    np.testing.assert_allclose(quadratic(dw_rot, h_rot), quadratic(dw, h), rtol=1e-4)
    assert coherence(w_rot) < coherence(w) / 2
    assert coherence(h_rot) < coherence(h) / 2


def test_quip_beats_gptq_and_ldlq_without_incoherence_at_2_bits(layer):
    w, h = layer
    loss = lambda q: proxy_loss(q.dequantize(jnp.float32), w, h)
    gptq_loss = loss(gptq.quantize_weight(w, h, GPTQConfig(uniform=UniformConfig(bits=2, granularity="channel"))))
    plain_loss = loss(quip.quantize_weight(w, h, QuIPConfig(bits=2, transform="none", rescale=False)))
    for kind in ("hadamard", "kronecker"):
        q = quip.quantize_weight(w, h, QuIPConfig(bits=2, transform=kind), "layer")
        assert isinstance(q, Rotated) and isinstance(q.inner, UniformQ) and q.inner.scale.shape == (1, 1)
        assert loss(q) < 0.5 * min(gptq_loss, plain_loss), (kind, loss(q), gptq_loss, plain_loss)


def test_greedy_passes_never_raise_the_proxy_loss(layer):
    w, h = layer
    cfg = QuIPConfig(bits=2, transform="none", rescale=False, grid="channel")
    uniform = quip.grid_config(cfg)
    target, h_rot, scale, offset, _ = quip.prepare(w, h, None, None, cfg)
    decode = lambda codes: np.asarray(jaxq.methods.rtn.decode(codes, scale, offset, uniform))
    loss = lambda codes: proxy_loss(decode(codes).T, np.asarray(target).T, h_rot)
    nearest = jaxq.methods.rtn.encode(target, scale, offset, uniform)
    improved = ldlq.greedy_passes(target, nearest, h_rot, scale, offset, uniform, 2)
    assert loss(improved) < 0.9 * loss(nearest)
    codes = ldlq.ldlq_codes(target, h_rot, scale, offset, uniform)
    assert loss(ldlq.greedy_passes(target, codes, h_rot, scale, offset, uniform, 3)) <= loss(codes) * (1 + 1e-6)


def test_what_is_stored_without_rotations_and_per_channel_grids(layer):
    w, h = layer
    plain = quip.quantize_weight(w, h, QuIPConfig(bits=3, transform="none", rescale=False))
    assert isinstance(plain, UniformQ) and plain.describe() == "w3 per-tensor float-offset"
    rescaled = quip.quantize_weight(w, h, QuIPConfig(bits=3, transform="none", grid="channel"))
    assert isinstance(rescaled, Rotated) and rescaled.input_rotation is None and rescaled.input_scale.shape == (K,)
    assert rescaled.inner.scale.shape == (1, N)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(4, K)).astype(np.float32))
    w_hat = np.asarray(rescaled.dequantize())
    np.testing.assert_allclose(np.asarray(rescaled.matmul(x)), np.asarray(x) @ w_hat, rtol=1e-4, atol=1e-4)
    # against the float W: input_scale is 1/d, d from the rescale itself, ...
    d = np.asarray(quip.rescale(w, h)[2])
    np.testing.assert_allclose(np.asarray(rescaled.input_scale), 1 / d, rtol=1e-6)
    # ... the dequantized weight is W within the grid's error (0.42 here, the 2.4-RMS clip of the t(3)
    # tails included; 0.96 with the scale inverted) ...
    w64 = np.asarray(w, np.float64)
    assert np.linalg.norm(w_hat - w64) < 0.5 * np.linalg.norm(w64)
    # ... and LDLQ's proxy loss at most that of rounding to nearest on the same grid, mapped back by 1/d
    cfg = QuIPConfig(bits=3, transform="none", grid="channel")
    target, _, scale, offset, _ = quip.prepare(w, h, None, None, cfg)
    uniform = quip.grid_config(cfg)
    nearest = np.asarray(rtn.decode(rtn.encode(target, scale, offset, uniform), scale, offset, uniform)).T / d[:, None]
    assert proxy_loss(w_hat, w, h) <= proxy_loss(nearest, w, h) * (1 + 1e-3)


def test_without_a_transform_it_is_plain_ldlq_on_quips_grid(layer):
    """transform="none": no trace normalisation (the reference's comes with the projection), only
    the damping; the codes are LDLQ's on that H and on the 2.4-RMS grid of W."""
    w, h = layer
    cfg = QuIPConfig(bits=2, transform="none", rescale=False)
    target, h_used, scale, offset, input_scale = quip.prepare(w, h, None, None, cfg)
    damped = h + 0.01 * jnp.mean(jnp.diag(h)) * jnp.eye(K)
    np.testing.assert_allclose(np.asarray(h_used), np.asarray(damped), rtol=1e-6)
    assert input_scale is None
    s = 2.4 * float(jnp.sqrt(jnp.mean(w * w)))
    np.testing.assert_allclose(np.asarray(offset, np.float32), -s, rtol=1e-3)
    np.testing.assert_allclose(np.asarray(scale, np.float32), 2 * s / 3, rtol=1e-3)
    uniform = quip.grid_config(cfg)
    lo, hi = quip.grid_ends(scale, offset, cfg)
    codes = ldlq.ldlq_codes(jnp.clip(w.T, lo[:, None], hi[:, None]), damped, scale, offset, uniform)
    q = quip.quantize_weight(w, h, cfg)
    assert isinstance(q, UniformQ)
    np.testing.assert_array_equal(np.asarray(q.dequantize()), np.asarray(rtn.decode(codes, scale, offset, uniform).T))


def test_grid_is_rtns_float_offset_grid_and_the_clip_its_end_levels(layer):
    w, _ = layer
    cfg = QuIPConfig(bits=3, grid="channel")
    scale, offset = quip.grid(w, cfg)
    s = 2.4 * jnp.sqrt(jnp.mean(w * w, axis=0)) + 1e-16
    expected = rtn.grid_from_range(-s, s, quip.grid_config(cfg))
    assert leaves_equal((scale, offset), expected)
    lo, hi = quip.grid_ends(scale, offset, cfg)
    np.testing.assert_array_equal(np.asarray(lo), np.asarray(offset, np.float32))
    np.testing.assert_array_equal(np.asarray(hi), np.asarray(rtn.decode(jnp.full((N, 1), 7, jnp.uint8), scale, offset,
                                                                        quip.grid_config(cfg)))[:, 0])


@pytest.mark.parametrize("transform, rescale, hessian, message", [
    ("hadamard", True, jnp.zeros((K, K)), "the Hessian is all zero"),  # 0 / 0 in the rescale
    ("none", False, jnp.zeros((K, K)), "the Hessian is all zero"),
    ("hadamard", True, jnp.eye(K).at[3, 3].set(jnp.nan), "the Hessian has non-finite entries"),
    ("none", False, jnp.eye(K).at[3, 3].set(jnp.inf), "the Hessian has non-finite entries"),
    ("none", False, -jnp.eye(K), "the LDL factorisation of the Hessian fails even with damping 1 "),
])
def test_a_degenerate_hessian_is_an_error_naming_the_linear(layer, transform, rescale, hessian, message):
    w, _ = layer
    with pytest.raises(SingularHessianError, match=f"^layers/0/q_proj/0: {message}"):
        quip.quantize_weight(w, hessian, QuIPConfig(transform=transform, rescale=rescale), "layers/0/q_proj/0")


def test_a_failed_factorisation_escalates_the_damping(layer, caplog):
    w, _ = layer
    hessian = jnp.eye(K).at[-1, -1].set(-0.05)  # damping 0.01 leaves it indefinite, 0.1 does not
    q = quip.quantize_weight(w, hessian, QuIPConfig(transform="none", rescale=False), "layers/0/q_proj/0")
    assert "layers/0/q_proj/0: LDL factorisation failed with damping 0.01; retrying with 0.1" in caplog.text
    assert np.isfinite(np.asarray(q.dequantize())).all()


def test_each_linear_draws_its_own_rotations_from_the_seed(layer):
    w, h = layer

    def seeds(cfg, name):
        q = quip.quantize_weight(w, h, cfg, name)
        return [int(q.input_rotation.seed), int(q.output_rotation.seed)]

    first = seeds(QuIPConfig(), "layers/0/q_proj+k_proj/0")
    assert first == seeds(QuIPConfig(), "layers/0/q_proj+k_proj/0")
    others = (seeds(QuIPConfig(), "layers/0/q_proj+k_proj/1")
              + seeds(QuIPConfig(rotation_seed=1), "layers/0/q_proj+k_proj/0"))
    assert len(set(first + others)) == 6


def test_sizes_without_a_hadamard_transform_name_the_linear_and_the_kronecker_one(monkeypatch):
    with pytest.raises(UnsupportedSizeError, match="layers/0/o_proj/0 \\[18, 8\\]: size 18 .*transform='kronecker'"):
        quip.quantize_weight(jnp.ones((18, 8)), jnp.eye(18), QuIPConfig(), "layers/0/o_proj/0")
    # a group's sizes are all checked before any of its linears is quantized
    calls = []
    monkeypatch.setattr(quip, "quantize_weight", lambda *args: calls.append(args))
    method = registry.method(QuIPConfig())
    with pytest.raises(UnsupportedSizeError, match="layers/0/gate_proj\\+up_proj/1 \\[64, 18\\]: size 18"):
        method.quantize([jnp.ones((64, 64)), jnp.ones((64, 18))], {protocol.Hessian(): jnp.eye(64)},
                        "layers/0/gate_proj+up_proj")
    assert calls == []


@pytest.mark.parametrize("settings, message", [
    (dict(bits=5), "bits=5 is not supported"), (dict(transform="givens"), "transform='givens'"),
    (dict(grid="group"), "grid='group'"), (dict(greedy_passes=-1), "greedy_passes must be"),
    (dict(grid_rms=0.0), "grid_rms > 0"), (dict(rotation_seed=1.5), "rotation_seed must be"),
])
def test_bad_configs_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        QuIPConfig(**settings)


def test_registered_for_the_api_and_the_command_line():
    assert jaxq.method_config("quip", bits=3) == jaxq.QuIPConfig(bits=3)
    assert registry.method(QuIPConfig()).sequential
    args = cli.build_parser().parse_args(["quantize", "--model", "m", "--out", "o", "--method", "quip", "--transform",
                                          "kronecker", "--no-rescale", "--grid", "channel", "--greedy-passes", "2"])
    cfg = cli.quant_config_from_args(args).rules[-1].method
    assert cfg == QuIPConfig(transform="kronecker", rescale=False, grid="channel", greedy_passes=2)
    assert cfg.describe() == "quip w2 kronecker channel-grid greedy2"


def test_command_line_quantizes_a_tiny_model(tiny_llama_with_tokenizer, tmp_path, capsys):
    directory, text = tiny_llama_with_tokenizer
    out_dir = tmp_path / "quip"
    code = cli.main(["quantize", "--model", directory, "--method", "quip", "--bits", "3", "--keep-float", "mlp",
                     "--calib-data", str(text), "--calib-samples", "8", "--calib-len", "32", "--out", str(out_dir),
                     "--json", "--quiet"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["quantized_weights"] == 8  # q, k, v, o of both blocks
    assert cli.main(["inspect", str(out_dir)]) == 0
    shown = capsys.readouterr().out
    assert "rotated uniform w3 per-tensor float-offset | input hadamard 64, output hadamard 64, rescaled" in shown
    ck = checkpoint.load(out_dir)
    q = ck.params["layers"][1]["self_attn"]["k_proj"]["kernel"]
    assert isinstance(q, Rotated) and q.output_rotation.describe() == "hadamard 16"
    assert all(r is None or leaves_equal(r, r.regenerate()) for r in (q.input_rotation, q.output_rotation))
    lm = ck.language_model()
    tokens = jnp.asarray(lm.encode("thequickbrownfox"))[None]
    assert np.isfinite(np.asarray(lm.apply(lm.params, tokens))).all()
