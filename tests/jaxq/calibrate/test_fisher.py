"""The Fisher information of selected kernels: per-window squared gradients of the LM loss, summed."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from jaxq import tree
from jaxq.calibrate import fisher, memory, sequential
from models.language_model import forward
from tests.jaxq.calibrate.test_sequential import GQA

ROOT = Path(__file__).resolve().parents[3]
PATHS = ["layers/0/self_attn/q_proj/kernel", "layers/0/mlp/up_proj/kernel", "layers/1/mlp/down_proj/kernel"]


def reference_fisher(config, params, paths, tokens):
    """sum over windows of (d mean NLL / dW)^2 by jax.grad of the plain model forward (no
    rematerialisation, no block-by-block loss), one window at a time, summed in float64."""
    leaves, treedef = tree.flatten(params)

    def loss(kernels, window):
        p = tree.unflatten(treedef, [kernels.get(path, leaf) for path, leaf in leaves])
        logp = jax.nn.log_softmax(forward(config, p, window[None])[0][0, :-1], axis=-1)
        return -jnp.take_along_axis(logp, window[1:, None], axis=-1).mean()

    kernels = {p: dict(leaves)[p] for p in paths}
    grad = jax.jit(jax.grad(loss))
    total = {p: 0.0 for p in paths}
    for window in tokens:
        g = grad(kernels, jnp.asarray(window))
        total = {p: total[p] + np.asarray(g[p], np.float64) ** 2 for p in paths}
    return total


def test_matches_a_loop_of_single_window_gradients(rng):
    params = models.init_params(GQA, seed=0)
    tokens = rng.integers(0, GQA.vocab_size, size=(4, 24)).astype(np.int32)
    got = fisher.fisher_diagonal(GQA, params, PATHS, tokens, sequential.make_mesh(1))
    want = reference_fisher(GQA, params, PATHS, tokens)
    assert got.windows == 4 and got.non_finite() == []
    for p in PATHS:
        f = np.asarray(got.kernel(p))
        assert f.dtype == np.float32 and f.shape == want[p].shape
        np.testing.assert_allclose(f, want[p], rtol=1e-5, atol=1e-5 * want[p].max())


def test_matches_torch_per_sample_gradients(tiny_llama, rng):
    """The same model in PyTorch (HF's loss: mean next-token cross entropy), its weights' .grad
    squared per sample; torch's (out, in) layout is the transpose of the Flax kernel."""
    import torch

    torch_model, directory = tiny_llama
    lm = models.load(directory)
    tokens = rng.integers(0, lm.config.vocab_size, size=(3, 20))
    modules = {"layers/0/self_attn/q_proj/kernel": torch_model.model.layers[0].self_attn.q_proj,
               "layers/1/mlp/down_proj/kernel": torch_model.model.layers[1].mlp.down_proj}
    want = {p: 0.0 for p in modules}
    for window in tokens:
        torch_model.zero_grad()
        ids = torch.as_tensor(window[None])
        torch_model(input_ids=ids, labels=ids).loss.backward()
        want = {p: want[p] + m.weight.grad.double().numpy().T ** 2 for p, m in modules.items()}
    got = fisher.fisher_diagonal(lm.config, lm.params, list(modules), tokens, sequential.make_mesh(1))
    for p in modules:
        np.testing.assert_allclose(np.asarray(got.kernel(p)), want[p], rtol=1e-3, atol=1e-4 * want[p].max())


MULTIDEVICE = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_cpu_use_fusion_emitters=false --xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import numpy as np
    import jaxq, models
    from jaxq.calibrate import fisher, sequential
    from jaxq.methods import squeezellm
    from tests.jaxq.calibrate.test_sequential import GQA
    from tests.jaxq.calibrate.test_fisher import PATHS

    params = models.init_params(GQA, seed=0)
    tokens = np.random.default_rng(0).integers(0, GQA.vocab_size, size=(8, 16)).astype(np.int32)
    found = {d: fisher.fisher_diagonal(GQA, params, PATHS, tokens, sequential.make_mesh(d)) for d in (1, 8)}
    for p in PATHS:
        assert np.array_equal(np.asarray(found[1].kernel(p)), np.asarray(found[8].kernel(p))), p
    cfg = jaxq.SqueezeLLMConfig(bits=3, sparsity=0.02)
    w = params["layers"][1]["mlp"]["down_proj"]["kernel"]
    codes = {d: squeezellm.quantize_weight(w, found[d].kernel(PATHS[-1]), cfg) for d in (1, 8)}
    for a, b in zip(*(jax.tree_util.tree_leaves(codes[d]) for d in (1, 8))):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    print("identical")
""")


def test_one_and_eight_devices_give_identical_fisher_and_codes():
    """8 CPU devices faked with XLA_FLAGS (hence a subprocess), as tests/jaxq/calibrate/test_multidevice.py."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    done = subprocess.run([sys.executable, "-c", MULTIDEVICE], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("identical"), done.stderr[-4000:]


def test_windows_are_dealt_in_whole_rounds_and_paths_must_exist():
    params = models.init_params(GQA, seed=0)
    with pytest.raises(ValueError, match="no parameter at layers/7/mlp/up_proj/kernel"):
        fisher.fisher_diagonal(GQA, params, ["layers/7/mlp/up_proj/kernel"], np.zeros((2, 8), np.int32),
                               sequential.make_mesh(1))
    with pytest.raises(ValueError, match="windows \\[S, T\\]"):
        fisher.fisher_diagonal(GQA, params, PATHS, np.zeros(8, np.int32), sequential.make_mesh(1))


def test_the_memory_estimate_covers_the_arrays_of_a_fisher_pass(rng):
    """The estimate is at least what the pass holds per device: the model's copy, one window's
    gradient (param dtype) and its float32 square (measured: the gradient program's outputs), and
    this device's share of F (measured: its shards)."""
    params = models.init_params(GQA, seed=0)
    tokens = rng.integers(0, GQA.vocab_size, size=(2, 24)).astype(np.int32)
    leaves = dict(tree.flatten(params)[0])
    model_bytes = sum(leaf.nbytes for leaf in leaves.values())
    entries = sum(leaves[p].size for p in PATHS)
    got = fisher.fisher_diagonal(GQA, params, PATHS, tokens, sequential.make_mesh(1))
    f_bytes = sum(shard.data.nbytes for s in got.sums.values() for shard in s.addressable_shards)
    zeros = {p: jnp.zeros(leaves[p].size, jnp.float32) for p in PATHS}
    squares = fisher._added_squared_gradient(GQA, tuple(PATHS))(params, jnp.asarray(tokens[0]), zeros)
    square_bytes = sum(s.nbytes for s in squares.values())
    gradient_bytes = sum(leaves[p].nbytes for p in PATHS)
    estimate = memory.estimate(GQA, samples=2, length=24, local_batch=2, devices=1, fisher_entries=entries,
                               fisher_itemsize=leaves[PATHS[0]].dtype.itemsize, model_bytes=model_bytes)
    assert estimate.fisher >= model_bytes + gradient_bytes + square_bytes + f_bytes
    assert "Fisher information" in estimate.describe()
    assert memory.estimate(GQA, samples=2, length=24, local_batch=2, devices=1).fisher == 0
    sharded = memory.estimate(GQA, samples=2, length=24, local_batch=2, devices=8, fisher_entries=entries,
                              fisher_itemsize=4, model_bytes=model_bytes)
    assert estimate.fisher - sharded.fisher == 4 * entries * (1 - 1 / 8)  # F split over 8 devices, nothing else
