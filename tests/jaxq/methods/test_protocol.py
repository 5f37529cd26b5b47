"""New methods plug into the driver, `jaxq.quantize` and the CLI by registering alone: the toy
methods here exist only in this file."""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxq
import models
from jaxq import cli
from jaxq.calibrate import collect, sequential
from jaxq.config import GPTQConfig, QuantConfig, Rule, UniformConfig, setting
from jaxq.methods import protocol, registry, rtn
from models.language_model import block_forward, embed
from tests.jaxq.calibrate.test_sequential import GQA, calibration


@dataclasses.dataclass(frozen=True)
class DiagonalRTNConfig:
    """RTN choosing, per weight, min-max or MSE ranges by the error weighted with diag(H)."""

    method: ClassVar[str] = "diagonal-rtn"
    bits: int = setting(3, "bits per weight")
    group_size: int = setting(32, "input rows per scale")

    def candidates(self) -> tuple[UniformConfig, UniformConfig]:
        base = UniformConfig(bits=self.bits, group_size=self.group_size)
        return base, dataclasses.replace(base, calibration="mse")


def weighted_error(w, q, diag):
    return float(np.sum(np.asarray(diag, np.float64)[:, None] * (np.asarray(w, np.float64) - np.asarray(q)) ** 2))


class DiagonalRTN(protocol.Method):
    seen: ClassVar[list] = []  # (name, Hessian) of every call, for the test

    def statistics(self, group):
        return (protocol.Hessian(),)

    def quantize(self, kernels, stats, name):
        hessian = stats[protocol.Hessian()]
        DiagonalRTN.seen.append((name, np.asarray(hessian)))
        diag = jnp.diag(hessian)
        out = []
        for w in kernels:
            options = [rtn.quantize_weight(w, cfg) for cfg in self.config.candidates()]
            errors = [weighted_error(w, q.dequantize(jnp.float32), diag) for q in options]
            out.append(options[int(np.argmin(errors))])
        return out


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTERED", dict(registry._REGISTERED))  # forgotten after the test
    registry.register(DiagonalRTNConfig, DiagonalRTN)
    DiagonalRTN.seen.clear()


def test_a_method_registered_here_runs_through_quantize_with_calibration(registered, rng):
    params = models.init_params(GQA, seed=0)
    cal = calibration(GQA, rng)
    cfg = DiagonalRTNConfig()
    with pytest.raises(jaxq.ConfigError, match="'diagonal-rtn' needs calibration data"):
        jaxq.quantize(params, cfg)
    quantized = jaxq.quantize(params, cfg, cal)
    names = [name for name, _ in DiagonalRTN.seen]
    assert names == [f"layers/{i}/{g}" for i in (0, 1) for g in ("q_proj+k_proj+v_proj", "o_proj", "gate_proj+up_proj",
                                                                  "down_proj")]
    # the first group's Hessian is of block 0's float inputs (the later groups' are of the block with
    # the groups before already quantized: `sequential` by default): compare with float64 numpy
    h = embed(GQA, params, jnp.asarray(cal.tokens)).astype(jnp.float32)
    x = np.asarray(block_forward(GQA, params["layers"][0], h, capture_inputs=True)[1]["self_attn/q_proj"], np.float64)
    x = x.reshape(-1, x.shape[-1])
    np.testing.assert_allclose(DiagonalRTN.seen[0][1], 2 / x.shape[0] * x.T @ x, rtol=1e-4, atol=1e-7)
    # every weight is the better candidate under its own Hessian's diagonal
    leaves = dict(jaxq.tree.flatten(quantized)[0])
    for (name, hessian) in DiagonalRTN.seen[:4]:
        linear = {"q_proj+k_proj+v_proj": "self_attn/v_proj", "o_proj": "self_attn/o_proj",
                  "gate_proj+up_proj": "mlp/up_proj", "down_proj": "mlp/down_proj"}[name.split("/")[-1]]
        w = params["layers"][0][linear.split("/")[0]][linear.split("/")[1]]["kernel"]
        got = weighted_error(w, leaves[f"layers/0/{linear}/kernel"].dequantize(jnp.float32), np.diag(hessian))
        best = min(weighted_error(w, rtn.fake_quantize(w, c), np.diag(hessian)) for c in cfg.candidates())
        assert got == pytest.approx(best, rel=1e-9)


def test_the_cli_offers_a_registered_method_and_its_options(registered, tiny_llama_with_tokenizer, tmp_path, capsys):
    directory, text = tiny_llama_with_tokenizer
    args = cli.build_parser().parse_args(["quantize", "--model", directory, "--method", "diagonal-rtn", "--bits", "4",
                                          "--out", str(tmp_path / "q")])
    assert cli.quant_config_from_args(args).rules[-1].method == DiagonalRTNConfig(bits=4)
    code = cli.main(["quantize", "--model", directory, "--method", "diagonal-rtn", "--group-size", "16",
                     "--calib-data", str(text), "--calib-samples", "4", "--calib-len", "16", "--calib-step", "4",
                     "--out", str(tmp_path / "q"), "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert jaxq.load(tmp_path / "q").quant_config.rules[-1].method == DiagonalRTNConfig(group_size=16)
    code = cli.main(["quantize", "--model", directory, "--method", "diagonal-rtn", "--act-order", "--out",
                     str(tmp_path / "r")])
    assert code == 2 and "--act-order does not apply to --method diagonal-rtn" in capsys.readouterr().err


@dataclasses.dataclass(frozen=True)
class RecorderConfig:
    method: ClassVar[str] = "recorder"
    sequential: bool = False
    propagate_float: bool = True


class Recorder(protocol.Method):
    """Every hook, recording the order of calls and what it was given."""

    trains = True
    calls: ClassVar[list] = []

    def transform_statistics(self, group):
        return (protocol.AbsMean(),)

    def transform(self, block, params, linears, stats):
        Recorder.calls.append(("transform", block.name, tuple(sorted(linears)), tuple(sorted(stats))))
        return params

    def statistics(self, group):
        return protocol.Hessian(), protocol.Inputs(per_window=4)

    @property
    def sequential(self):
        return self.config.sequential

    def quantize(self, kernels, stats, name):
        Recorder.calls.append(("quantize", name, stats[protocol.Inputs(per_window=4)].shape))
        return [rtn.quantize_weight(w, UniformConfig(bits=4, group_size=32)) for w in kernels]

    def train(self, block, params, float_params, linears, inputs):
        Recorder.calls.append(("train", block.name, linears, inputs.targets.shape))
        Recorder.targets.append((np.asarray(inputs.float), np.asarray(inputs.targets), np.asarray(inputs.quantized)))
        return params

    @property
    def propagate(self):
        return "float" if self.config.propagate_float else "quantized"


Recorder.targets = []


@pytest.fixture
def recorder(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTERED", dict(registry._REGISTERED))
    registry.register(RecorderConfig, Recorder)
    Recorder.calls.clear(), Recorder.targets.clear()


@pytest.mark.parametrize("stats_sequential", [False, True])
def test_hooks_run_in_the_documented_order_and_shared_statistics_once(stats_sequential, recorder, monkeypatch, rng):
    collected = []
    real_collect = collect.collect
    monkeypatch.setattr(sequential, "collect", lambda *a: (collected.append(a[4]), real_collect(*a))[1])
    params = models.init_params(GQA, seed=0)
    recorder, gptq3 = RecorderConfig(sequential=stats_sequential), GPTQConfig(uniform=UniformConfig(bits=3, group_size=32))
    cfg = QuantConfig(rules=(Rule(r"^layers/0/self_attn/v_proj/kernel$", gptq3),
                             Rule(r"^layers/0/.*_proj/kernel$", recorder), Rule(r"^layers/1/", None)))
    cal = calibration(GQA, rng)
    jaxq.quantize(params, cfg, cal)
    attn = ("transform", "layers/0", ("attn_in", "attn_out", "mlp_in", "mlp_out"), ("attn_in", "attn_out", "mlp_in",
                                                                                  "mlp_out"))
    assert Recorder.calls == [attn, *[("quantize", f"layers/0/{g}", (8, 4, k)) for g, k in
                                      (("q_proj+k_proj", 64), ("o_proj", 64), ("gate_proj+up_proj", 64),
                                       ("down_proj", 96))],
                              ("train", "layers/0", tuple(l for g in models.llama.BLOCK_LINEAR_GROUPS for l in g.linears
                                                          if l != "self_attn/v_proj"), (8, 32, 64))]
    # transform statistics first; then q/k's and v's methods share one Hessian of attn_in
    assert collected[0] == tuple((g.name, g.linears[0], (protocol.AbsMean(),)) for g in models.llama.BLOCK_LINEAR_GROUPS)
    quantize_needs = [need for needs in collected[1:] for need in needs]
    assert [n[0] for n in quantize_needs] == ["attn_in", "attn_out", "mlp_in", "mlp_out"]
    assert quantize_needs[0][2] == (protocol.Hessian(), protocol.Inputs(per_window=4))
    # GPTQ is sequential, so the block is only when the recorder is too; else one collection for all
    assert len(collected) == (5 if stats_sequential else 2)
    float_inputs, targets, quantized_inputs = Recorder.targets[0]
    h0 = np.asarray(embed(GQA, params, jnp.asarray(cal.tokens)).astype(jnp.float32))
    np.testing.assert_array_equal(float_inputs, h0)
    np.testing.assert_array_equal(quantized_inputs, h0)  # block 0: both paths start at the embeddings
    float_outputs = jax.jit(jax.vmap(lambda s: block_forward(GQA, params["layers"][0], s[None])[0][0]))(h0)
    np.testing.assert_allclose(targets, np.asarray(float_outputs), rtol=1e-5, atol=1e-6)


def test_trained_phases_get_the_calibration_and_the_float_paths(recorder, rng):
    params = models.init_params(GQA, seed=0)
    cal = calibration(GQA, rng)
    quantized = jaxq.quantize(params, RecorderConfig(propagate_float=False), cal)
    h0 = embed(GQA, params, jnp.asarray(cal.tokens)).astype(jnp.float32)
    per_sample = jax.jit(lambda block, x: jax.lax.map(lambda s: block_forward(GQA, block, s[None])[0][0], x))
    float_inputs, targets, quantized_inputs = Recorder.targets[1]  # block 1
    np.testing.assert_array_equal(float_inputs, np.asarray(per_sample(params["layers"][0], h0)))
    np.testing.assert_array_equal(quantized_inputs, np.asarray(per_sample(quantized["layers"][0], h0)))
    assert np.abs(float_inputs - quantized_inputs).max() > 1e-3
    np.testing.assert_array_equal(targets, np.asarray(per_sample(params["layers"][1], jnp.asarray(float_inputs))))


def test_an_interrupted_trained_run_resumes_with_its_float_path(recorder, rng, tmp_path, monkeypatch):
    params = models.init_params(GQA, seed=0)
    cfg = RecorderConfig(propagate_float=False)
    jaxq.quantize(params, cfg, calibration(GQA, np.random.default_rng(1)))
    uninterrupted = Recorder.targets[1]
    Recorder.targets.clear()
    real = sequential.calibrate_block

    def failing(cal, mesh, block, h, methods, name, *float_path):
        if name == "layers/1":
            raise KeyboardInterrupt
        return real(cal, mesh, block, h, methods, name, *float_path)

    cal = calibration(GQA, np.random.default_rng(1), resume_dir=str(tmp_path))
    monkeypatch.setattr(sequential, "calibrate_block", failing)
    with pytest.raises(KeyboardInterrupt):
        jaxq.quantize(params, cfg, cal)
    monkeypatch.setattr(sequential, "calibrate_block", real)
    Recorder.targets.clear()
    jaxq.quantize(params, cfg, cal)
    assert len(Recorder.targets) == 1  # block 1 only: block 0 came from the progress directory
    for resumed, expected in zip(Recorder.targets[0], uninterrupted):
        np.testing.assert_array_equal(resumed, expected)
