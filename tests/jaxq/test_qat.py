"""QAT: the fake-quantized forward at initialisation is the checkpoint, straight-through gradients
are exact, the stored result is the last forward, and a crashed run resumes to the same result."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxq
import models
from jaxq import checkpoint, cli, qat, tree
from jaxq.config import QATConfig
from jaxq.formats.uniform import UniformQ
from jaxq.qat import QATError

GRIDS = {"int-zero g32": jaxq.UniformConfig(bits=3, group_size=32),
         "float-offset per-channel": jaxq.UniformConfig(bits=4, granularity="channel", zero_point="float"),
         "symmetric per-tensor": jaxq.UniformConfig(bits=2, granularity="tensor", symmetric=True)}


def quantized_leaf(rng, grid, shape=(80, 24)):
    w = jnp.asarray(rng.normal(size=shape).astype(np.float32))
    return jaxq.quantize({"kernel": w}, jaxq.QuantConfig.for_method(grid, pattern="kernel"))["kernel"]


def permuted(q: UniformQ, rng) -> UniformQ:
    """q with an act-order permutation (stored row i holding original row perm[i])."""
    import dataclasses
    return dataclasses.replace(q, perm=jnp.asarray(rng.permutation(q.shape[0]).astype(np.int32)))


@pytest.mark.parametrize("name", GRIDS)
def test_training_starts_at_the_checkpoint_and_stores_what_it_computes(rng, name):
    q = quantized_leaf(rng, GRIDS[name])
    for grid in (q, permuted(q, rng)):
        leaves = qat.initial_leaves(grid)
        np.testing.assert_array_equal(np.asarray(qat.fake_quantized(grid, leaves)), np.asarray(grid.dequantize(jnp.float32)))
        again = qat.encode(grid, leaves)
        np.testing.assert_array_equal(np.asarray(again.stored_codes()), np.asarray(grid.stored_codes()))
        np.testing.assert_array_equal(np.asarray(again.scale), np.asarray(grid.scale))
        moved = {k: v + 0.01 * jnp.asarray(rng.normal(size=v.shape).astype(np.float32)) for k, v in leaves.items()}
        np.testing.assert_array_equal(np.asarray(qat.encode(grid, moved).dequantize(jnp.float32)),
                                      np.asarray(qat.fake_quantized(grid, moved)))


def test_straight_through_gradients(rng):
    """d w_hat / d w = 1 where w / s + z is inside the grid (its ends included) and 0 where it is
    clipped; the log-scale gets LSQ's gradient, derived by hand below."""
    grid = quantized_leaf(rng, GRIDS["int-zero g32"])
    leaves = qat.initial_leaves(grid)
    leaves["weight"] = leaves["weight"] * 1.3  # push some entries past the grid's ends
    grads = jax.grad(lambda w: jnp.sum(qat.fake_quantized(grid, {**leaves, "weight": w})))(leaves["weight"])
    scale, offset = grid.affine()
    rows = lambda a: np.repeat(np.asarray(a), 32, axis=0)[: grid.shape[0]]
    codes = (np.asarray(leaves["weight"]) - rows(offset)) / rows(scale)
    inside = (codes >= 0) & (codes <= 7)
    assert 0 < inside.mean() < 1
    np.testing.assert_array_equal(np.asarray(grads), inside.astype(np.float32))
    g = jax.grad(lambda u: jnp.sum(qat.fake_quantized(grid, {**leaves, "log_scale": u})))(leaves["log_scale"])
    # w_hat = w + s * (round(x) - x) inside the grid (x = w / s + z), s * (q - z) where clipped; s = s0 * exp(u)
    q = np.clip(np.round(codes), 0, 7)
    d_scale = np.where(inside, np.round(codes) - codes, q - rows(np.asarray(grid.zero, np.float32)))
    expected = np.add.reduceat(rows(scale) * d_scale, np.arange(0, grid.shape[0], 32), axis=0)
    np.testing.assert_allclose(np.asarray(g), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(float model, RTN 3-bit g32 model, training windows) of a tiny random LLaMA."""
    import torch
    import transformers

    from tests.conftest import save_tiny, tiny_llama_config

    torch.manual_seed(0)
    directory = save_tiny(transformers.LlamaForCausalLM(tiny_llama_config()).eval(), tmp_path_factory.mktemp("qat"))
    lm = models.load(directory, tokenizer=False)
    student = lm.replace(params=jaxq.quantize(lm.params, jaxq.UniformConfig(bits=3, group_size=32)))
    return lm, student, np.random.default_rng(0).integers(0, lm.config.vocab_size, size=(8, 32)).astype(np.int32)


FAST = QATConfig(steps=6, batch_size=4, warmup_steps=1, weight_lr=1e-2, scale_lr=3e-2, save_every=2)  # tiny model: large rates


def test_training_lowers_the_loss_and_the_result_is_a_plain_quantized_model(tiny):
    lm, student, tokens = tiny
    tokens = tokens[:4]  # one batch, every step: its loss must fall
    result = qat.train(student, lm, tokens, FAST, progress=False)
    assert len(result.losses) == 6 and result.losses[-1] < 0.9 * result.initial_loss
    assert result.losses[0] == pytest.approx(result.initial_loss, rel=1e-6)  # step 0 reads step 0's batch
    trained = dict(tree.flatten(result.model.params)[0])
    before = dict(tree.flatten(student.params)[0])
    assert all(isinstance(trained[p], UniformQ) and trained[p].bits == 3 for p in qat.trainable_grids(student.params))
    changed = [p for p in qat.trainable_grids(student.params)
               if not np.array_equal(np.asarray(trained[p].stored_codes()), np.asarray(before[p].stored_codes()))]
    assert changed
    final = qat.distillation_loss(lm.apply(lm.params, tokens[:4]), result.model.apply(result.model.params, tokens[:4]))
    assert float(final) < result.initial_loss


def test_a_crashed_run_resumes_to_the_same_losses_and_weights(tiny, tmp_path):
    lm, student, tokens = tiny
    whole = qat.train(student, lm, tokens, FAST, progress=False)

    def crash(step, loss):
        if step == 2:  # after step 2's update; the newest saved state is after step 1 (save_every 2)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        qat.train(student, lm, tokens, FAST, resume_dir=tmp_path / "state", progress=False, on_step=crash)
    assert checkpoint.read_metadata(tmp_path / "state")["qat_step"] == 2
    resumed = qat.train(student, lm, tokens, FAST, resume_dir=tmp_path / "state", progress=False)
    assert resumed.losses == whole.losses
    for a, b in zip(jax.tree_util.tree_leaves(resumed.model.params), jax.tree_util.tree_leaves(whole.model.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(QATError, match="another QAT run"):
        qat.train(student, lm, tokens, QATConfig(steps=6, warmup_steps=1, seed=1), resume_dir=tmp_path / "state", progress=False)


def test_what_qat_cannot_train_is_named(tiny):
    lm, student, tokens = tiny
    bcq = lm.replace(params=jaxq.quantize(lm.params, jaxq.BCQConfig(bits=2)))
    with pytest.raises(QATError, match=r"layers/0/.*not bcq"):
        qat.train(bcq, lm, tokens, FAST, progress=False)
    with pytest.raises(QATError, match="no quantized weight"):
        qat.train(lm, lm, tokens, FAST, progress=False)
    with pytest.raises(jaxq.ConfigError, match="warmup_steps"):
        QATConfig(steps=5, warmup_steps=5)


def test_generated_windows_follow_the_float_model(tiny):
    lm, _, _ = tiny
    windows = qat.generated_windows(lm, 3, 12, seed=1, greedy_prefix=3, batch_size=2)
    assert windows.shape == (3, 12) and windows.dtype == np.int32
    np.testing.assert_array_equal(windows, qat.generated_windows(lm, 3, 12, seed=1, greedy_prefix=3, batch_size=2))
    logits = np.asarray(lm.apply(lm.params, windows))
    np.testing.assert_array_equal(windows[:, 1:4], logits[:, :3].argmax(-1))  # the greedy prefix
    assert not np.array_equal(windows[:, 4:], logits[:, 3:-1].argmax(-1))  # then sampled


def test_the_cli_trains_a_checkpoint_and_writes_its_losses(tiny_llama_with_tokenizer, tmp_path, capsys):
    directory, text = tiny_llama_with_tokenizer
    rtn = tmp_path / "rtn"
    assert cli.main(["quantize", "--model", directory, "--bits", "3", "--group-size", "32", "--out", str(rtn),
                     "--quiet"]) == 0
    capsys.readouterr()
    out = tmp_path / "qat"
    args = ["qat", "--checkpoint", str(rtn), "--out", str(out), "--steps", "4", "--batch-size", "2",
            "--warmup-steps", "1", "--calib-data", str(text), "--calib-samples", "4", "--calib-len", "32", "--quiet"]
    assert cli.main(args + ["--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert len(summary["losses"]) == 4 and summary["steps"] == 4
    trained = checkpoint.load(out)
    assert trained.metadata["source"] == directory and trained.quant_config is not None
    assert summary["checkpoint"] == str(rtn)
    assert json.loads((out / "qat.json").read_text())["losses"] == summary["losses"]
    from PIL import Image

    with Image.open(out / "loss_curve.png") as curve:
        assert curve.size == (1000, 450) and np.asarray(curve.convert("L")).std() > 0
    assert cli.main(["eval", "--checkpoint", str(out), "--data", str(text), "--ctx", "16", "--windows", "2",
                     "--quiet"]) == 0
