"""Rotated: the inner format between two rotations, its matmul, storage and kernels."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxq
import kernels_pallas
from jaxq import checkpoint, cli, sharding
from jaxq.checkpoint import CheckpointError
from jaxq.config import UniformConfig
from jaxq.formats import FORMATS, Rotated, rotation
from jaxq.methods import rtn
from kernels_pallas import packed
from tests.jaxq.test_checkpoint import leaves_equal as same_arrays


def rotated(rng, k=192, n=64, kinds=("hadamard", "hadamard"), scale=True, bits=2):
    inner = rtn.quantize_weight(jnp.asarray(rng.normal(size=(k, n)).astype(np.float32)),
                                UniformConfig(bits=bits, granularity="channel", zero_point="float"))
    sides = [None if kind is None else rotation.generate(kind, size, seed)
             for kind, size, seed in zip(kinds, (k, n), (11, 12))]
    input_scale = jnp.asarray(rng.uniform(0.5, 2.0, size=k).astype(np.float32)) if scale else None
    return Rotated(inner=inner, input_rotation=sides[0], output_rotation=sides[1], input_scale=input_scale,
                   shape=(k, n), dtype="float32")


def dense(r, size):
    """U [size, size] float64 (column j = U e_j); the identity for no rotation."""
    if r is None:
        return np.eye(size)
    return np.asarray(jax.jit(lambda r: r.apply(jnp.eye(size, dtype=jnp.float32)))(r)).T.astype(np.float64)


dequantize = jax.jit(lambda q: q.dequantize())
matmul = jax.jit(lambda q, x: q.matmul(x))


CASES = {"hadamard": dict(), "kronecker": dict(kinds=("kronecker", "kronecker")),
         "input-only": dict(kinds=("hadamard", None), scale=False), "scale-only": dict(kinds=(None, None)),
         "3-bit kronecker 112x48": dict(k=112, n=48, kinds=("kronecker", "hadamard"), bits=3)}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_dequantize_is_the_rotated_back_inner_weight_and_matmul_agrees(case, rng):
    q = rotated(rng, **case)
    k, n = q.shape
    u_in, u_out = dense(q.input_rotation, k), dense(q.output_rotation, n)
    s = np.ones(k) if q.input_scale is None else np.asarray(q.input_scale, np.float64)
    expected = s[:, None] * (u_in.T @ np.asarray(q.inner.dequantize(jnp.float32), np.float64) @ u_out)
    w = np.asarray(dequantize(q))
    np.testing.assert_allclose(w, expected, atol=1e-5)
    x = jnp.asarray(rng.normal(size=(2, 3, k)).astype(np.float32))
    y = np.asarray(matmul(q, x))
    np.testing.assert_allclose(y, np.asarray(x) @ w, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(jax.jit(kernels_pallas.matmul)(x, q)), y)  # CPU: the same XLA path
    # bfloat16 activations: the float32 result at bfloat16 precision (x, the rotated x and y rounded)
    x16 = x.astype(jnp.bfloat16)
    y16 = matmul(q, x16)
    assert y16.dtype == jnp.bfloat16
    y32 = np.asarray(x16.astype(jnp.float32)) @ w
    np.testing.assert_allclose(np.asarray(y16.astype(jnp.float32)), y32, atol=1.5e-2 * np.abs(y32).max())


def test_describe_without_rotations_or_scale_is_the_inner_format(rng):
    q = rotated(rng, kinds=(None, None), scale=False)
    assert q.describe() == "uniform w2 per-channel float-offset"


def test_mismatched_parts_are_refused(rng):
    q = rotated(rng)
    with pytest.raises(ValueError, match="input_rotation 64 \\(expected 192\\)"):
        Rotated(inner=q.inner, input_rotation=q.output_rotation, output_rotation=None, input_scale=None,
                shape=q.shape, dtype="float32")


def test_the_inner_matmul_runs_on_the_packed_kernel(rng, monkeypatch):
    calls = []
    real = packed.packed_matmul
    monkeypatch.setattr(kernels_pallas.uniform_matmul_module, "packed_matmul",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q = rotated(rng, k=256, n=128)
    x = jnp.asarray(rng.normal(size=(3, 256)).astype(np.float32))
    with kernels_pallas.use_kernels("interpret-gpu"):
        y = jax.jit(kernels_pallas.matmul)(x, q)
    assert calls == [1]
    np.testing.assert_allclose(np.asarray(y), np.asarray(matmul(q, x)), rtol=1e-4, atol=1e-4)


def test_size_counts_the_rotations_and_the_scale(rng):
    q = rotated(rng, kinds=("kronecker", "hadamard"))
    rotations = q.input_rotation.nbytes + q.output_rotation.nbytes
    assert rotations == (24 * 24 + 8 * 8) * 4 + 2 * 192 * 2 + 4 + 64 + 4  # factors, perms, seed | signs, seed
    assert q.nbytes == q.inner.nbytes + rotations + 192 * 4
    (row,) = jaxq.size_report({"w": q}).weights
    assert row.bytes == q.nbytes and row.encoding == ("rotated uniform w2 per-channel float-offset | "
                                                      "input kronecker 24x8, output hadamard 64, rescaled")


def test_checkpoint_round_trip_regenerates_the_rotations_bit_for_bit(rng, tmp_path, capsys):
    params = {"q": {"kernel": rotated(rng, kinds=("kronecker", "hadamard"))},
              "k": {"kernel": rotated(rng, kinds=("hadamard", None), scale=False)}}
    checkpoint.save(tmp_path / "ck", params)
    loaded = checkpoint.load(tmp_path / "ck").params
    assert same_arrays(params, loaded)
    for name in ("q", "k"):
        q = loaded[name]["kernel"]
        for r in (q.input_rotation, q.output_rotation):
            assert r is None or same_arrays(r, r.regenerate())
    x = jnp.asarray(rng.normal(size=(2, 192)).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(matmul(loaded["q"]["kernel"], x)),
                                  np.asarray(matmul(params["q"]["kernel"], x)))
    assert cli.main(["inspect", str(tmp_path / "ck")]) == 0
    out = capsys.readouterr().out
    assert "rotated uniform w2 per-channel float-offset | input kronecker 24x8, output hadamard 64" in out
    assert "quantized: 2 weights" in out


def test_an_inner_format_of_another_version_is_refused(rng, tmp_path):
    checkpoint.save(tmp_path / "ck", {"w": rotated(rng)})
    step = next(p for p in (tmp_path / "ck").iterdir() if p.name.isdigit())
    path = step / "metadata" / "metadata"
    record = json.loads(path.read_text())
    record["leaves"]["w"]["static"]["inner"]["version"] = 7
    path.write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="w \\(rotated's inner format\\) is format 'uniform' version 7"):
        checkpoint.load(tmp_path / "ck")
    assert FORMATS["rotated"] is Rotated


def test_sharded_along_the_inner_outputs(rng):
    q = rotated(rng)
    params = sharding.shard_params({"w": q}, sharding.make_mesh(model=1))
    assert same_arrays(params["w"], q)
    specs = q.partition_specs("model")
    P = jax.sharding.PartitionSpec
    assert specs.inner.codes[0] == P(None, "model")
    assert specs.input_rotation.signs == P() and specs.output_rotation.seed == P() and specs.input_scale == P()
