"""Mixed precision: the exact knapsack against brute force, the predicted loss against numpy, and
the allocation through `jaxq.quantize` and `jaxq quantize --bits-budget`."""

import dataclasses
import itertools
import json

import jax.numpy as jnp
import numpy as np
import pytest

import jaxq
import models
from jaxq import calibrate, checkpoint, cli, mixed_precision, tree
from jaxq.calibrate import fisher, sequential
from jaxq.config import ConfigError
from jaxq.mixed_precision import LayerCosts, allocate, layer_costs, with_bits


def random_layers(rng, count, choices=(2, 3, 4, 8)):
    """Layers of random sizes whose bytes grow and predicted losses fall with the bits, as real ones."""
    layers = []
    for i in range(count):
        size = int(rng.choice([1024, 3072, 8192]))
        overhead = 2 * size // int(rng.choice([64, 128, 256]))  # a scale per group, at most 0.25 bits each
        loss = np.sort(rng.exponential(1.0, len(choices)))[::-1] * rng.exponential(10.0)
        layers.append(LayerCosts(f"layer{i}", size, choices, tuple(size * b // 8 + overhead for b in choices),
                                 tuple(float(v) for v in loss)))
    return layers


def brute_force(layers, budget_bits):
    """Every assignment tried: (minimal loss, its bytes) within the budget."""
    capacity = budget_bits * sum(layer.size for layer in layers) / 8
    best = (np.inf, None)
    for picks in itertools.product(*(range(len(layer.bits)) for layer in layers)):
        cost = sum(layer.bytes[k] for layer, k in zip(layers, picks))
        loss = sum(layer.loss[k] for layer, k in zip(layers, picks))
        if cost <= capacity and loss < best[0]:
            best = (loss, cost)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_the_allocation_is_the_brute_force_optimum(seed):
    rng = np.random.default_rng(seed)
    layers = random_layers(rng, 6)
    for budget in (2.4, 2.9, 3.25, 4.0, 5.5, 8.5):
        allocation = allocate(layers, budget)
        loss, cost = brute_force(layers, budget)
        assert allocation.predicted_loss == pytest.approx(loss, rel=1e-12)
        chosen = [layer.bits.index(allocation.bits[layer.path]) for layer in layers]
        assert allocation.bytes == sum(layer.bytes[k] for layer, k in zip(layers, chosen))
        assert allocation.predicted_loss == pytest.approx(sum(layer.loss[k] for layer, k in zip(layers, chosen)))
        assert allocation.bits_per_weight <= budget + 1e-12


def test_a_larger_budget_never_predicts_more_loss_and_an_impossible_one_is_refused():
    layers = random_layers(np.random.default_rng(7), 40)
    losses = [allocate(layers, budget).predicted_loss for budget in np.linspace(2.5, 8.5, 13)]
    assert all(a >= b for a, b in zip(losses, losses[1:]))
    assert set(allocate(layers, 100.0).bits.values()) == {8}
    with pytest.raises(ConfigError, match="below the smallest possible average"):
        allocate(layers, 2.0)


def test_with_bits_reaches_each_methods_grid():
    assert with_bits(jaxq.GPTQConfig(act_order=True), 2) == jaxq.GPTQConfig(act_order=True,
                                                                             uniform=jaxq.UniformConfig(bits=2))
    assert with_bits(jaxq.SparseGPTConfig(), 8).gptq.uniform.bits == 8
    assert with_bits(jaxq.BCQConfig(bits=3), 2).bits == 2
    assert mixed_precision.proxy_method(jaxq.AWQConfig()) == jaxq.UniformConfig()
    with pytest.raises(ConfigError, match="no nested grid"):
        mixed_precision.proxy_method(jaxq.SqueezeLLMConfig())
    with pytest.raises(ConfigError, match="bits"):
        with_bits(jaxq.GPTQConfig(), 5)


def test_layer_costs_are_the_stored_bytes_and_the_fisher_weighted_rounding_error(rng):
    w = rng.normal(size=(96, 40)).astype(np.float32)
    f = rng.exponential(size=(96, 40)).astype(np.float32)
    method = jaxq.GPTQConfig(uniform=jaxq.UniformConfig(group_size=32))
    (costs,) = layer_costs({"w": jnp.asarray(w)}, {"w": jnp.asarray(f)}, method, (2, 3, 4))
    for b, nbytes, loss in zip(costs.bits, costs.bytes, costs.loss):
        q = jaxq.quantize({"kernel": jnp.asarray(w)}, jaxq.QuantConfig.for_method(jaxq.UniformConfig(bits=b, group_size=32),
                                                                                   pattern="kernel"))["kernel"]
        delta = np.asarray(q.dequantize(jnp.float32), np.float64) - w
        assert nbytes == q.nbytes
        assert loss == pytest.approx(0.5 * np.sum(f * delta ** 2), rel=1e-5)  # float32 sum vs float64
    assert costs.loss[0] > costs.loss[1] > costs.loss[2]


def test_the_allocation_quantizes_each_layer_at_its_bits(tiny_llama_with_tokenizer):
    """Through the Fisher pass and `jaxq.quantize` with GPTQ (the driver with per-layer methods):
    each kernel stored at its allocated bits, the stored average within the budget, and the
    predicted loss the sum of the chosen layers' from the same Fisher information."""
    directory, text = tiny_llama_with_tokenizer
    lm = models.load(directory)
    cal = calibrate.from_text(lm, str(text), samples=4, length=32, step_samples=4, progress=False)
    method = jaxq.GPTQConfig(uniform=jaxq.UniformConfig(bits=3, group_size=32))
    cfg, allocation = mixed_precision.mixed_precision_config(lm, method, cal, 3.0, choices=(2, 4))
    assert len(allocation.bits) == 14 and set(allocation.bits.values()) == {2, 4}
    kernels = mixed_precision.selected_kernels(lm.params)
    f = fisher.fisher_diagonal(lm.config, lm.params, list(kernels), cal.tokens, sequential.make_mesh(1))
    costs = layer_costs(kernels, {p: f.kernel(p) for p in kernels}, method, (2, 4))
    assert allocation == allocate(costs, 3.0)
    quantized = dict(tree.flatten(jaxq.quantize(lm.params, cfg, cal))[0])
    assert all(quantized[p].bits == b for p, b in allocation.bits.items())
    assert sum(quantized[p].nbytes for p in allocation.bits) == allocation.bytes
    assert allocation.bits_per_weight <= 3.0


def with_kernel(params, path, kernel):
    """A copy of the nested dict `params` with the leaf at "layers/0/.../kernel" replaced (layer
    indices are int keys)."""
    *parents, leaf = path.split("/")
    out = dict(params)
    node = out
    for key in parents:
        key = int(key) if key.isdigit() else key
        node[key] = dict(node[key])
        node = node[key]
    node[leaf] = kernel
    return out


def test_the_measured_sensitivity_is_the_kl_of_quantizing_one_layer_alone(tiny_llama_with_tokenizer):
    """Each layer's "kl" loss against float64 numpy's KL between the float model's next-token
    distribution and the one with that layer alone rounded (tolerance: float32 logits and
    log-softmax, ~1e-6 absolute on KLs of 1e-4..1e-1); the allocation is the knapsack's over them."""
    directory, text = tiny_llama_with_tokenizer
    lm = models.load(directory)
    cal = calibrate.from_text(lm, str(text), samples=4, length=32, step_samples=4, progress=False)
    grid = jaxq.UniformConfig(bits=3, group_size=32)
    kernels = mixed_precision.selected_kernels(lm.params)
    tokens = cal.tokens[:2]
    costs = mixed_precision.measured_layer_costs(lm.config, lm.params, kernels, jaxq.GPTQConfig(uniform=grid),
                                                 tokens, (2, 8))

    def log_probs(params):
        logits = np.asarray(models.language_model.forward(lm.config, params, jnp.asarray(tokens))[0], np.float64)
        return logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)

    reference = log_probs(lm.params)
    for cost in costs[:4]:
        for b, loss in zip(cost.bits, cost.loss):
            q = jaxq.quantize({"kernel": kernels[cost.path]}, jaxq.QuantConfig.for_method(
                dataclasses.replace(grid, bits=b), pattern="kernel"))["kernel"]
            logp = log_probs(with_kernel(lm.params, cost.path, q.dequantize(jnp.float32)))
            expected = np.mean(np.sum(np.exp(reference) * (reference - logp), -1))
            assert loss == pytest.approx(expected, rel=1e-3, abs=1e-6)
        assert cost.loss[0] > cost.loss[1] >= 0
    cfg, allocation = mixed_precision.mixed_precision_config(lm, jaxq.GPTQConfig(uniform=grid), cal, 4.0,
                                                             choices=(2, 8), sensitivity="kl", kl_windows=2)
    assert allocation == allocate(costs, 4.0)
    with pytest.raises(ConfigError, match="unknown sensitivity 'hessian'"):
        mixed_precision.mixed_precision_config(lm, grid, cal, 4.0, sensitivity="hessian")


def test_the_cli_allocates_with_a_budget_and_records_it(tiny_llama_with_tokenizer, tmp_path, capsys):
    directory, text = tiny_llama_with_tokenizer
    out = tmp_path / "mixed"
    common = ["--model", directory, "--calib-data", str(text), "--calib-samples", "4", "--calib-len", "32",
              "--calib-step", "4", "--group-size", "32", "--quiet"]
    assert cli.main(["quantize", *common, "--bits-budget", "3.5", "--bit-choices", "2,4,8", "--keep-float",
                     "layers/0/mlp/down_proj", "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    bits = summary["mixed_precision"]["bits"]
    assert len(bits) == 13 and set(bits.values()) <= {2, 4, 8} and "layers/0/mlp/down_proj/kernel" not in bits
    assert summary["mixed_precision"]["bits_per_weight"] <= 3.5
    restored = dict(tree.flatten(checkpoint.load(out).params)[0])
    assert all(restored[p].bits == b for p, b in bits.items())
    assert not tree.is_format(restored["layers/0/mlp/down_proj/kernel"])
    assert summary["mixed_precision"]["sensitivity"] == "fisher"
    assert cli.main(["quantize", *common, "--bits-budget", "3.5", "--bit-choices", "2,8", "--sensitivity", "kl",
                     "--kl-windows", "1", "--out", str(tmp_path / "kl"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["mixed_precision"]["sensitivity"] == "kl" and summary["mixed_precision"]["bits_per_weight"] <= 3.5
    assert cli.main(["quantize", *common, "--bit-choices", "2,4", "--out", str(tmp_path / "no")]) == 2
    assert "--bit-choices does not apply without --bits-budget" in capsys.readouterr().err
    assert cli.main(["quantize", *common, "--bits-budget", "3.5", "--kl-windows", "1", "--out", str(tmp_path / "no")]) == 2
    assert "--kl-windows does not apply without --sensitivity kl" in capsys.readouterr().err
    assert cli.main(["quantize", *common, "--bits-budget", "1.5", "--out", str(tmp_path / "no")]) == 2
    assert "below the smallest possible average" in capsys.readouterr().err
