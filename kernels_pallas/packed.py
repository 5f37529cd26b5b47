"""What the packed low-bit matmul kernels share: tiling plans, the activation layout, and the
TPU (Mosaic) and GPU (Triton) kernel bodies. A format plugs in how a tile of integer codes
becomes weights (`Dequantize`); `uniform_matmul` and `lut_matmul` are the two such formats.

Codes (jaxq.formats.packing) are planes of uint32 words [K_pad / P, N], P = 32 / plane width,
word j holding rows j*P .. j*P + P - 1. Shifting a tile of words by s * width gives "slab" s:
the codes of rows {j*P + s}. The wrapper lays the activations out once as x_slabs [M, P, K/P]
(x_slabs[:, s, j] = x[:, j*P + s]), so slab s is matched by a contiguous slice and each slab
costs one plain [tm, tk/P] @ [tk/P, tn] dot, accumulated in float32. Per-group parameters
arrive as [G, ..., N] rows; with P dividing the group size, the group of a slab row depends on
its word row only, so one expansion of the tile's group rows serves every slab.

GPU: the Triton backend. Mosaic GPU is where GPU Pallas is heading (Triton lowering is
deprecated since jax 0.11), but the CPU jaxlib this project is developed on has no Mosaic GPU
bindings and no GPU was available, so a Mosaic GPU kernel could not even be lowered here; the
Triton kernel is lowered for CUDA in the tests and checked numerically in interpret mode.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltr

from jaxq.formats import groups, packing

# (codes int32 [rows, tn], group-parameter tiles [R, tn] each, expand [R, tn] -> [rows, tn])
#   -> float32 weights [rows, tn]. A [G, E, N] parameter (a table) arrives as E tiles, read by
# ref indexing: Triton cannot slice loaded values.
Dequantize = Callable[[jax.Array, tuple[jax.Array, ...], Callable[[jax.Array], jax.Array]], jax.Array]

GPU_TARGET_PROGRAMS = 264  # ~2 per SM on an H100: split K until the grid has this many programs


@dataclasses.dataclass(frozen=True)
class Plan:
    """Tiles of one call. group_rows: rows of group parameters a K tile reads (R)."""

    tm: int
    tn: int
    tk: int
    group_rows: int
    split_k: int = 1


@dataclasses.dataclass(frozen=True)
class PackedShape:
    """The static description of a packed weight the kernels need."""

    in_features: int     # K
    out_features: int    # N
    bits: int
    group_size: int      # rows per group (K for per-channel)
    groups: int          # G

    @property
    def width(self) -> int:
        return packing.plane_width(self.bits)

    @property
    def per_word(self) -> int:
        return packing.WORD_BITS // self.width

    @property
    def padded_in(self) -> int:
        return packing.padded_length(self.in_features)


def _group_rows(shape: PackedShape, tk: int) -> int | None:
    """Group-parameter rows per K tile, or None if tiles and groups do not line up."""
    if shape.groups == 1:
        return 1
    g = shape.group_size
    if g % shape.per_word:
        return None
    if g % tk == 0:
        return 1
    if tk % g == 0 and shape.in_features % g == 0:
        return tk // g
    return None


def _divisors(n: int, candidates: tuple[int, ...]) -> list[int]:
    return [c for c in candidates if n % c == 0]


def plan_tpu(shape: PackedShape, rows: int) -> Plan | None:
    """Mosaic TPU tiles: last two block dims multiples of (8, 128) or whole; None if impossible."""
    p, kp, n = shape.per_word, shape.padded_in, shape.out_features
    tns = _divisors(n, (512, 256, 128))
    if not tns:
        return None
    tks = [tk for tk in (4096, 2048, 1024, 512) if tk % (128 * p) == 0 and kp % tk == 0] + [kp]
    for tk in tks:
        r = _group_rows(shape, tk)
        if r is None or not (r == 1 or r % 8 == 0 or r == shape.groups):
            continue
        tm = min(256, -(-rows // 8) * 8)
        return Plan(tm=tm, tn=tns[0], tk=tk, group_rows=r)
    return None


def plan_gpu(shape: PackedShape, rows: int) -> Plan | None:
    """Triton tiles: powers of two, dot dims >= 16, K split so small-M calls fill the GPU."""
    p, kp, n = shape.per_word, shape.padded_in, shape.out_features
    tns = _divisors(n, (128, 64, 32))
    if not tns:
        return None
    tks = [tk for tk in (1024, 512, 256, 128, 64) if tk // p >= 16 and kp % tk == 0 and _group_rows(shape, tk)]
    if not tks:
        return None
    tm = next(t for t in (16, 32, 64, 128) if t >= min(rows, 128))
    tk, tn = tks[0], tns[0]
    tiles = -(-rows // tm) * (n // tn)
    steps = kp // tk
    split = max((s for s in range(1, steps + 1) if steps % s == 0 and tiles * s <= 2 * GPU_TARGET_PROGRAMS), default=1)
    split = split if tiles < GPU_TARGET_PROGRAMS else 1
    return Plan(tm=tm, tn=tn, tk=tk, group_rows=_group_rows(shape, tk), split_k=split)


def activation_slabs(x: jax.Array, shape: PackedShape, rows: int) -> jax.Array:
    """x [M, K] -> [rows, P, K_pad / P] zero-padded, x_slabs[:, s, j] = x[:, j*P + s]."""
    m, k = x.shape
    x = jnp.pad(x, ((0, rows - m), (0, shape.padded_in - k)))
    return x.reshape(rows, -1, shape.per_word).transpose(0, 2, 1)


def _slab_codes(words: list[jax.Array], s: int, width: int) -> jax.Array:
    """Whole codes of slab s from the planes' word tiles: int32 [rows, tn]."""
    mask = (1 << width) - 1
    code = None
    for plane, w in enumerate(words):
        part = ((w >> (s * width)) & mask) << (plane * width)
        code = part if code is None else code | part
    return code.astype(jnp.int32)


def _tile_product(x_slab: Callable[[int], jax.Array], words: list[jax.Array], params: tuple[jax.Array, ...],
                  dequantize: Dequantize, shape: PackedShape, compute_dtype, interpret: bool) -> jax.Array:
    """sum over slabs of x_slab(s) @ dequantize(codes of slab s): float32 [tm, tn].

    Operands are rounded to the compute dtype and multiplied with float32 accumulation. In
    interpret mode they are then widened to float32 (XLA:CPU cannot run every bf16 x bf16 ->
    f32 dot there); products of bf16 values are exact in float32, so the result is the same.
    """
    rows = words[0].shape[0]
    expand = lambda tile: groups.expand_rows(tile, rows // tile.shape[0], rows)  # [R, ..., tn] -> [rows, ..., tn]
    operand = jnp.float32 if interpret else compute_dtype
    acc = None
    for s in range(shape.per_word):
        w = dequantize(_slab_codes(words, s, shape.width), params, expand).astype(compute_dtype).astype(operand)
        part = jnp.dot(x_slab(s).astype(compute_dtype).astype(operand), w, preferred_element_type=jnp.float32)
        acc = part if acc is None else acc + part
    return acc


# ------------------------------------------------------------------------------ TPU (Mosaic)

def _tpu_kernel(x_ref, *refs, n_planes: int, shape: PackedShape, dequantize: Dequantize, steps: int,
                squeezed: bool, interpret: bool):
    planes, params, (o_ref, acc_ref) = refs[:n_planes], refs[n_planes:-2], refs[-2:]
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    tiles = []
    for p in params:  # blocks [R, tn] / [R, E, tn], or without the R dim when squeezed
        entries = [p[..., e, :] for e in range(p.shape[-2])] if p.ndim == (2 if squeezed else 3) else [p[...]]
        tiles += [t[None] if squeezed else t for t in entries]
    acc_ref[...] += _tile_product(lambda s: x_ref[:, s, :], [p[...] for p in planes], tuple(tiles), dequantize,
                                  shape, x_ref.dtype, interpret)

    @pl.when(k == steps - 1)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def tpu_matmul(x_slabs: jax.Array, planes: tuple[jax.Array, ...], params: tuple[jax.Array, ...],
               shape: PackedShape, plan: Plan, dequantize: Dequantize, interpret: bool = False) -> jax.Array:
    """x_slabs [rows, P, K_pad/P] -> float32 [rows, N]; grid (M, N, K) with K innermost."""
    rows = x_slabs.shape[0]
    p, tm, tn, tk, r = shape.per_word, plan.tm, plan.tn, plan.tk, plan.group_rows
    steps = shape.padded_in // tk
    g = shape.group_size

    squeezed = shape.groups > 1 and r == 1  # one group row per K tile: a squeezed block dim

    def param_spec(a):
        middle = a.shape[1:-1]
        if shape.groups == 1:
            return pl.BlockSpec((1,) + middle + (tn,), lambda i, j, k: (0,) * (a.ndim - 1) + (j,))
        if squeezed:
            return pl.BlockSpec((None,) + middle + (tn,), lambda i, j, k: ((k * tk) // g,) + (0,) * len(middle) + (j,))
        return pl.BlockSpec((r,) + middle + (tn,), lambda i, j, k: (k,) + (0,) * len(middle) + (j,))

    kernel = functools.partial(_tpu_kernel, n_planes=len(planes), shape=shape, dequantize=dequantize, steps=steps,
                               squeezed=squeezed, interpret=interpret)
    word_tile = (tk // p) * tn * 4
    vmem = (2 * (tm * tk * x_slabs.dtype.itemsize + len(planes) * word_tile)  # double-buffered inputs
            + 4 * tm * tn * 4 + 4 * word_tile)                                 # acc, out, slab temporaries
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((rows, shape.out_features), jnp.float32),
        grid=(rows // tm, shape.out_features // tn, steps),
        in_specs=[pl.BlockSpec((tm, p, tk // p), lambda i, j, k: (i, 0, k))]
        + [pl.BlockSpec((tk // p, tn), lambda i, j, k: (k, j)) for _ in planes]
        + [param_spec(a) for a in params],
        out_specs=pl.BlockSpec((tm, tn), lambda i, j, k: (i, j)),
        scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"),
                                             vmem_limit_bytes=max(32 * 2 ** 20, 2 * vmem)),
        interpret=interpret,
    )(x_slabs, *planes, *params)


# ------------------------------------------------------------------------------ GPU (Triton)

def _gpu_kernel(x_ref, *refs, n_planes: int, shape: PackedShape, plan: Plan, dequantize: Dequantize,
                steps_per_split: int, interpret: bool):
    planes, params, o_ref = refs[:n_planes], refs[n_planes:-1], refs[-1]
    i, j, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    tm, tn, tk, r = plan.tm, plan.tn, plan.tk, plan.group_rows
    tkw = tk // shape.per_word
    rows_m, cols = pl.ds(i * tm, tm), pl.ds(j * tn, tn)

    def step(t, acc):
        k = split * steps_per_split + t
        words = [p[pl.ds(k * tkw, tkw), cols] for p in planes]
        first = 0 if shape.groups == 1 else (k * tk) // shape.group_size
        tiles = tuple(t for a in params for t in (
            [a[pl.ds(first, r), e, cols] for e in range(a.shape[1])] if a.ndim == 3 else [a[pl.ds(first, r), cols]]))
        return acc + _tile_product(lambda s: x_ref[rows_m, s, pl.ds(k * tkw, tkw)], words, tiles, dequantize,
                                   shape, x_ref.dtype, interpret)

    o_ref[...] = jax.lax.fori_loop(0, steps_per_split, step, jnp.zeros((tm, tn), jnp.float32))


def gpu_matmul(x_slabs: jax.Array, planes: tuple[jax.Array, ...], params: tuple[jax.Array, ...],
               shape: PackedShape, plan: Plan, dequantize: Dequantize, interpret: bool = False) -> jax.Array:
    """x_slabs [rows, P, K_pad/P] -> float32 [rows, N]; grid (M, N, split-K), partial sums added."""
    rows = x_slabs.shape[0]
    steps = shape.padded_in // plan.tk
    kernel = functools.partial(_gpu_kernel, n_planes=len(planes), shape=shape, plan=plan, dequantize=dequantize,
                               steps_per_split=steps // plan.split_k, interpret=interpret)
    whole = pl.BlockSpec(memory_space=pl.ANY)  # K extents need not be powers of two: slice inside
    partial = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((plan.split_k, rows, shape.out_features), jnp.float32),
        grid=(rows // plan.tm, shape.out_features // plan.tn, plan.split_k),
        in_specs=[whole] * (1 + len(planes) + len(params)),
        out_specs=pl.BlockSpec((None, plan.tm, plan.tn), lambda i, j, s: (s, i, j)),
        compiler_params=pltr.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
    )(x_slabs, *planes, *params)
    return partial.sum(axis=0)


def packed_matmul(x: jax.Array, planes: tuple[jax.Array, ...], params: tuple[jax.Array, ...], shape: PackedShape,
                  dequantize: Dequantize, *, backend: str, plan: Plan | None = None,
                  interpret: bool = False) -> jax.Array | None:
    """x [M, K] (stored row order) -> float32 [M, N] on `backend` ('tpu' or 'gpu'), or None if
    no tiling of this shape suits the backend."""
    m = x.shape[0]
    planner, run = (plan_tpu, tpu_matmul) if backend == "tpu" else (plan_gpu, gpu_matmul)
    plan = plan or planner(shape, m)
    if plan is None:
        return None
    rows = -(-m // plan.tm) * plan.tm
    y = run(activation_slabs(x, shape, rows), planes, params, shape, plan, dequantize, interpret)
    return y[:m]
