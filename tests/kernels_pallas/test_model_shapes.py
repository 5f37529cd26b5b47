"""Every linear of the models jaxq targets gets a GPU and a TPU kernel plan at every bit width
and grain, every distinct plan lowers on this CPU-only machine (Triton for CUDA, Mosaic for TPU),
and the padded tiles compute the right product (interpret mode, shapes as odd as the models').

Lowering is de-duplicated by (K, N, bits, group): the models share most shapes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels_pallas
import models
from jaxq.config import UniformConfig
from jaxq.formats import CodebookQ, UniformQ
from jaxq.methods import rtn
from kernels_pallas import lut_matmul, packed, reference, uniform_matmul
from kernels_pallas.uniform_matmul import packed_shape

CONFIGS = {
    "smollm2-135m": models.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                                       num_heads=9, num_kv_heads=3, head_dim=64, tie_word_embeddings=True),
    "llama-2-7b": models.LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                                     num_heads=32, num_kv_heads=32, head_dim=128),
    "llama-3-8b": models.LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                                     num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0),
    "mistral-7b": models.LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32,
                                     num_heads=32, num_kv_heads=8, head_dim=128, sliding_window=4096,
                                     architecture="mistral"),
}
BITS = (2, 3, 4, 8)
GRAINS = (64, 128, "channel")
TARGETS = {"tpu": ("tpu", "tpu_custom_call"), "gpu": ("cuda", "triton")}


def linear_shapes(config: models.LlamaConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of the 7 linears of a decoder block."""
    h, i, d = config.hidden_size, config.intermediate_size, config.head_dim
    return {"q_proj": (h, config.num_heads * d), "k_proj": (h, config.num_kv_heads * d),
            "v_proj": (h, config.num_kv_heads * d), "o_proj": (config.num_heads * d, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def group_size(grain, k: int) -> int:
    return k if grain == "channel" else grain


def plan_shapes() -> list[tuple[int, int, int, int]]:
    """Distinct (K, N, bits, group size) over every model, linear, bit width and grain."""
    shapes = {(k, n, bits, group_size(grain, k)) for config in CONFIGS.values()
              for k, n in linear_shapes(config).values() for bits in BITS for grain in GRAINS}
    return sorted(shapes)


def abstract_uniform(k: int, n: int, bits: int, group: int) -> UniformQ:
    """A UniformQ of ShapeDtypeStructs (nothing allocated): enough to plan and lower."""
    groups = -(-k // group)
    return jax.eval_shape(lambda: UniformQ.from_codes(
        jnp.zeros((k, n), jnp.uint8), jnp.ones((groups, n), jnp.float16), jnp.zeros((groups, n), jnp.uint8),
        bits=bits, group_size=group, dtype="bfloat16", zero_point="int"))


def lowered_text(fn, w, backend: str, rows: int) -> str:
    platform, _ = TARGETS[backend]
    x = jax.ShapeDtypeStruct((rows, w.shape[0]), jnp.bfloat16)
    return jax.jit(functools.partial(fn, backend=backend)).trace(x, w).lower(lowering_platforms=(platform,)).as_text()


def test_the_configs_have_the_published_shapes():
    assert linear_shapes(CONFIGS["smollm2-135m"]) == {
        "q_proj": (576, 576), "k_proj": (576, 192), "v_proj": (576, 192), "o_proj": (576, 576),
        "gate_proj": (576, 1536), "up_proj": (576, 1536), "down_proj": (1536, 576)}
    assert linear_shapes(CONFIGS["llama-3-8b"])["k_proj"] == (4096, 1024)
    assert linear_shapes(CONFIGS["llama-2-7b"])["down_proj"] == (11008, 4096)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_every_linear_has_a_plan(backend):
    missing = [(name, k, n, bits, grain, rows) for name, config in CONFIGS.items()
               for k, n in linear_shapes(config).values() for bits in BITS for grain in GRAINS
               for rows in (1, 16, kernels_pallas.KERNEL_MAX_ROWS[backend])
               if packed.plan_for(packed_shape(abstract_uniform(k, n, bits, group_size(grain, k))), rows,
                                  backend) is None]
    assert missing == []


def test_decode_plans_fill_the_gpu_where_the_weight_is_large_enough():
    """At M = 1 a 7B down_proj (K = 11008) at 3 and 4 bits gets >= 264 programs of few K steps."""
    for bits in (3, 4):
        shape = packed_shape(abstract_uniform(11008, 4096, bits, 128))
        plan = packed.plan_gpu(shape, 1)
        k_tiles = packed.cdiv(shape.padded_in, plan.tk)
        assert packed.cdiv(4096, plan.tn) * plan.split_k >= packed.GPU_TARGET_PROGRAMS
        assert packed.cdiv(k_tiles, plan.split_k) <= 2


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_every_plan_lowers(backend):
    """Both kernels lower at the decode tiling for every distinct plan shape; the prefill tiling
    (KERNEL_MAX_ROWS rows) for smollm2's."""
    _, marker = TARGETS[backend]
    smollm2 = set(linear_shapes(CONFIGS["smollm2-135m"]).values())
    for k, n, bits, group in plan_shapes():
        w = abstract_uniform(k, n, bits, group)
        lut = jax.eval_shape(CodebookQ.from_uniform, w)
        for rows in (1, kernels_pallas.KERNEL_MAX_ROWS[backend]) if (k, n) in smollm2 else (1,):
            assert marker in lowered_text(uniform_matmul, w, backend, rows), (k, n, bits, group, rows)
            assert marker in lowered_text(lut_matmul, lut, backend, rows), (k, n, bits, group, rows)


# Padded shapes, interpret mode: the models' K (576, 1536, 11008 -> cut to odd 1100 / 577 to stay
# fast) against N cut to small odd widths; every bit width and grain.
PADDED = [(576, 40, 4, 128), (577, 33, 3, 64), (1536, 24, 2, "channel"), (1100, 17, 8, 128),
          (576, 72, 3, "channel"), (1100, 9, 4, 64)]


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("case", PADDED, ids=lambda c: "-".join(map(str, c)))
def test_padded_shapes_match_the_reference(backend, case, fresh_rng):
    k, n, bits, grain = case
    cfg = UniformConfig(bits=bits, group_size=grain if grain != "channel" else 128,
                        granularity="channel" if grain == "channel" else "group")
    w = rtn.quantize_weight(jnp.asarray(fresh_rng.normal(size=(k, n)).astype(np.float32)), cfg)
    lut = CodebookQ.from_uniform(w)
    rows = 5  # one M tile on either backend, with padded rows
    x = fresh_rng.normal(size=(rows, k)).astype(np.float32)
    want = np.asarray(reference.uniform_matmul(x, w.codes, w.scale, w.zero, bits=w.bits, group_size=w.group_size,
                                               zero_point=w.zero_point))
    for fn, fmt in ((uniform_matmul, w), (lut_matmul, lut)):
        y = fn(jnp.asarray(x), fmt, backend=backend, interpret=True)
        assert y is not None and y.shape == (rows, n)
        assert np.abs(np.asarray(y) - want).max() <= 1e-5 * np.abs(want).max(), fn.__name__
