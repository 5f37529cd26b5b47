"""GPTQ against a float64 numpy transcription of the reference `fasterquant`, and LDLQ == GPTQ.

The reference below follows GPTQ's gptq.py line by line, with jaxq's min-max grid (scale
stored as fp16, rounded through float32 as XLA does; integer zero clamped to the code range).
Under jax x64 both run in float64, so codes must agree except at exact rounding ties.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxq.config import GPTQConfig, UniformConfig
from jaxq.methods import gptq, ldlq, rtn


def find_params(v, bits):
    qmax = 2 ** bits - 1
    lo, hi = v.min(1), v.max(1)
    scale = np.maximum((hi - lo) / qmax, 1e-8).astype(np.float32).astype(np.float16).astype(np.float64)
    return scale, np.clip(np.round(-lo / scale), 0, qmax)


def reference_gptq(W, H, bits, groupsize, blocksize=128, percdamp=.01, actorder=False, static_groups=False):
    """W [out, in], H [in, in] -> codes [out, in] (input order)."""
    W = W.astype(np.float64).copy()
    H = H.astype(np.float64).copy()
    N, K = W.shape
    params = find_params(W, bits) if groupsize == -1 else None
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if static_groups:
        groups = [find_params(W[:, i:i + groupsize], bits) for i in range(0, K, groupsize)]
    if actorder:
        perm = np.argsort(-np.diag(H), kind="stable")
        W, H, invperm = W[:, perm], H[perm][:, perm], np.argsort(perm)
    codes = np.zeros((N, K))
    H = H + percdamp * np.mean(np.diag(H)) * np.eye(K)
    Hinv = np.linalg.cholesky(np.linalg.inv(H)).T
    for i1 in range(0, K, blocksize):
        i2 = min(i1 + blocksize, K)
        W1, Hinv1 = W[:, i1:i2].copy(), Hinv[i1:i2, i1:i2]
        Err1 = np.zeros_like(W1)
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            if groupsize != -1:
                if not static_groups:
                    if (i1 + i) % groupsize == 0:
                        params = find_params(W[:, i1 + i:i1 + i + groupsize], bits)
                else:
                    params = groups[(perm[i1 + i] if actorder else i1 + i) // groupsize]
            scale, zero = params
            q = np.clip(np.round(w / scale) + zero, 0, 2 ** bits - 1)
            codes[:, i1 + i] = q
            err = (w - scale * (q - zero)) / d
            W1[:, i:] -= np.outer(err, Hinv1[i, i:])
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return codes[:, invperm] if actorder else codes


def problem(rng, k, n, rank=32):
    """A correlated, full-rank Hessian with a few dominant inputs (so act_order matters)."""
    u = rng.normal(size=(k, rank))
    d = rng.uniform(0.1, 3, k)
    d[: k // 100 + 1] *= 50
    return rng.normal(size=(n, k)), u @ u.T + np.diag(d)


def codes_in_input_order(q):
    """[out, in] codes in original input order, like the reference's."""
    codes = np.asarray(q.stored_codes()).astype(np.float64).T
    if q.perm is None:
        return codes
    out = np.empty_like(codes)
    out[:, np.asarray(q.perm)] = codes
    return out


def gptq_config(bits, groupsize, blocksize=128, actorder=False, static_groups=False):
    grain = dict(granularity="channel") if groupsize == -1 else dict(group_size=groupsize)
    return GPTQConfig(uniform=UniformConfig(bits=bits, **grain), block_size=blocksize,
                      act_order=actorder, static_groups=static_groups)


VARIANTS = [dict(groupsize=128), dict(groupsize=-1), dict(groupsize=32), dict(groupsize=256),
            dict(groupsize=128, actorder=True), dict(groupsize=128, actorder=True, static_groups=True),
            dict(groupsize=-1, actorder=True), dict(groupsize=64, blocksize=32)]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{k}{v[k]}" for k in v))
def test_matches_reference_in_float64(variant, rng):
    W, H = problem(rng, 576, 64)  # 576 = 4.5 groups of 128: a short last group, padding
    with jax.enable_x64(True):
        q = gptq.quantize_weight(jnp.asarray(W.T), jnp.asarray(H), gptq_config(3, **variant))
        got = codes_in_input_order(q)
    assert (q.perm is not None) == (variant.get("actorder", False) and variant["groupsize"] != -1
                                    and not variant.get("static_groups", False))
    assert int((got != reference_gptq(W, H, 3, **variant)).sum()) == 0


@pytest.mark.slow
def test_4096_square_layer_matches_reference(rng):
    """Issue 4's acceptance case: one 4096x4096 layer, H given, float64 on both sides."""
    W, H = problem(rng, 4096, 4096, rank=64)
    with jax.enable_x64(True):
        got = np.asarray(gptq.quantize_weight(jnp.asarray(W.T), jnp.asarray(H), gptq_config(4, 128)).stored_codes()).T
    assert int((got != reference_gptq(W, H, 4, 128)).sum()) == 0


def test_float32_path_stays_close_to_the_float64_reference(rng):
    W, H = problem(rng, 512, 128)
    q = gptq.quantize_weight(jnp.asarray(W.T, jnp.float32), jnp.asarray(H, jnp.float32), gptq_config(4, 128))
    mismatch = np.asarray(q.stored_codes()).T != reference_gptq(W, H, 4, 128)
    assert mismatch.mean() < 0.01  # float32 error feedback drifts by ~1e-6: a few codes flip


def test_gptq_beats_rtn_on_the_layer_output(rng):
    """The point of GPTQ: lower ||X W - X Q(W)||^2 than round-to-nearest on the same grid type."""
    x = rng.normal(size=(2048, 256)) @ rng.normal(size=(256, 256)) * 0.3
    w = rng.normal(size=(256, 96)).astype(np.float32)
    h = jnp.asarray(2 * x.T @ x / len(x), jnp.float32)
    cfg = gptq_config(3, 64)
    err = lambda wq: float(np.sum((x @ (np.asarray(wq, np.float64) - w)) ** 2))
    assert err(gptq.quantize_weight(jnp.asarray(w), h, cfg).dequantize()) < 0.7 * err(
        rtn.fake_quantize(jnp.asarray(w), cfg.uniform))


def test_ldlq_feedback_equals_gptq(rng):
    """QuIP's LDL-feedback form and GPTQ's Cholesky form give the same codes on the same H."""
    W, H = problem(rng, 384, 64)
    cfg = gptq_config(3, -1)
    with jax.enable_x64(True):
        q = gptq.quantize_weight(jnp.asarray(W.T), jnp.asarray(H), cfg)
        damped = H + 0.01 * np.mean(np.diag(H)) * np.eye(384)
        grid = rtn.quantize_weight(jnp.asarray(W.T), cfg.uniform)
        codes = ldlq.ldlq_codes(jnp.asarray(W), jnp.asarray(damped), grid.scale[0], grid.zero[0], cfg.uniform)
        np.testing.assert_array_equal(np.asarray(codes), np.asarray(q.stored_codes()).T)
        u, d = ldlq.ldl_upper(jnp.asarray(damped))
        m = np.asarray(u) + np.eye(384)
        np.testing.assert_allclose(m @ np.diag(np.asarray(d)) @ m.T, damped, rtol=1e-10, atol=1e-8)
        assert np.allclose(np.tril(np.asarray(u)), 0)


def test_dead_inputs_are_zeroed(rng):
    W, H = problem(rng, 256, 32)
    H[7, :] = H[:, 7] = 0  # an input that never fires
    q = gptq.quantize_weight(jnp.asarray(W.T, jnp.float32), jnp.asarray(H, jnp.float32), gptq_config(4, 128))
    np.testing.assert_allclose(np.asarray(q.dequantize())[7], 0.0, atol=float(np.asarray(q.scale).max()) / 2 + 1e-6)


def test_damping_escalates_then_names_the_layer(rng, caplog):
    W, H = problem(rng, 128, 16)
    lowest = np.linalg.eigvalsh(H)[0]
    shifted = H - (lowest + 0.05 * np.mean(np.diag(H))) * np.eye(128)  # needs damping > 0.05*mean
    with caplog.at_level(logging.WARNING, logger="jaxq"):
        gptq.quantize_weight(jnp.asarray(W.T, jnp.float32), jnp.asarray(shifted, jnp.float32), gptq_config(4, 64),
                             name="layers/3/mlp/up_proj/kernel")
    assert "layers/3/mlp/up_proj/kernel: Cholesky failed with damping 0.01; retrying with 0.1" in caplog.text
    with pytest.raises(gptq.SingularHessianError, match="layers/3/mlp/up_proj/kernel: Hessian is not positive definite"):
        gptq.quantize_weight(jnp.asarray(W.T, jnp.float32), -jnp.asarray(H, jnp.float32), gptq_config(4, 64),
                             name="layers/3/mlp/up_proj/kernel")
