"""What the packed low-bit matmul kernels share: tiling plans, the activation layout, and the
TPU (Mosaic) and GPU (Triton) kernel bodies. A format plugs in how a tile of packed codes
becomes weights (a `Decoder`); `uniform_matmul` and `lut_matmul` are the two such formats.

Codes (jaxq.formats.packing) are planes of uint32 words [K_pad / P, N], P = 32 / plane width,
word j holding rows j*P .. j*P + P - 1. Shifting a tile of words by s * width gives "slab" s:
the codes of rows {j*P + s}. The wrapper lays the activations out once as x_slabs [M, P, K_t/P]
(x_slabs[:, s, j] = x[:, j*P + s], zero-padded to whole K tiles), so slab s is matched by a
contiguous slice and each slab costs one plain [tm, tk/P] @ [tk/P, tn] dot, accumulated in
float32. Per-group parameters arrive as [G, ..., N] rows ([1, ..., N] or [..., 1] where shared);
with P dividing the group size, the group of a slab row depends on its word row only, so one
expansion of the tile's group rows serves every slab.

Every shape gets a plan: K and N are covered by whole tiles, the last one reaching past the
array. Only that tile pays: the activations are zero-padded, codes past the array are finite
integers (TPU: whatever the partial block holds; GPU: masked loads, 0), and group parameters of
groups past G are set to 0 in the kernel, so the padded rows contribute 0 * finite = 0 and the
padded columns are sliced off.

GPU: the Triton backend. Mosaic GPU is where GPU Pallas is heading (Triton lowering is
deprecated since jax 0.11); this kernel is lowered for CUDA in the tests and checked
numerically in interpret mode.
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

GPU_TARGET_PROGRAMS = 264  # ~2 per SM on an H100: split K until the grid has this many programs
GPU_MAX_K_WASTE = 0.125    # largest tk whose padding past K_pad is at most this fraction of K_pad
FLOAT_MAGIC = 0x4B000000   # float32 bits of 2^23: (code | FLOAT_MAGIC) as float32 is 2^23 + code
FLOAT_MAGIC_VALUE = float(2 ** 23)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Tiles of one call. group_rows: rows of group parameters a K tile reads (R); split_k:
    grid programs along K (GPU), each running ceil(k_tiles / split_k) K steps or the rest."""

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


@dataclasses.dataclass(frozen=True)
class Tile:
    """What a decoder sees of one K tile (inside the kernel).

    words: per plane, the tile's words [tk/P, tn] (uint32). params: the group-parameter tiles
    [R or 1, tn or 1] (a [G, E, N] parameter gives E of them, entry by entry), zero for groups
    past G. expand: such a tile -> [tk/P, tn or 1], each word row its group's value. backend:
    'tpu' or 'gpu'. tables (GPU only): whole flat tables (refs) for decoders that gather, with
    the tile's first group and first column to index them."""

    words: list[jax.Array]
    params: tuple[jax.Array, ...]
    expand: Callable[[jax.Array], jax.Array]
    backend: str
    tables: tuple = ()
    first_group: jax.Array | int = 0
    first_column: jax.Array | int = 0


# (tile, shape) -> slab index -> float32 weights [tk/P, tn] of that slab
Decoder = Callable[[Tile, PackedShape], Callable[[int], jax.Array]]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _group_rows(shape: PackedShape, tk: int) -> int | None:
    """Group-parameter rows per K tile, or None if tiles and groups do not line up (a tile must
    start on a group boundary and hold whole groups, or lie inside one group)."""
    if shape.groups == 1:
        return 1
    g = shape.group_size
    if g % shape.per_word:
        return None
    if g % tk == 0:
        return 1
    if tk % g == 0:
        return tk // g
    if tk >= shape.padded_in:
        return shape.groups  # one K tile holds every group
    return None


def _column_tile(n: int, candidates: tuple[int, ...]) -> int:
    """The candidate leaving the fewest padded columns in the last tile (ties: the larger)."""
    return min(candidates, key=lambda t: (cdiv(n, t) * t - n, -t))


def plan_tpu(shape: PackedShape, rows: int) -> Plan | None:
    """Mosaic TPU tiles: the last two block dims multiples of (8, 128) or whole.

    tk / P is a multiple of 128 (the activation block's lane dim) or the whole padded K; the
    group-parameter block has R = 1 (squeezed), a multiple of 8 or all G rows."""
    p, kp, n = shape.per_word, shape.padded_in, shape.out_features
    if n % 128 == 0:
        tn = next(t for t in (512, 256, 128) if n % t == 0)
    else:
        tn = n if n <= 512 else _column_tile(n, (512, 256, 128))
    tks = [tk for tk in (4096, 2048, 1024, 512) if tk % (128 * p) == 0 and tk < kp] + [kp]
    for tk in tks:
        r = _group_rows(shape, tk)
        if r is None or not (r == 1 or r % 8 == 0 or r == shape.groups):
            continue
        return Plan(tm=min(256, cdiv(rows, 8) * 8), tn=tn, tk=tk, group_rows=r)
    return None


def plan_gpu(shape: PackedShape, rows: int) -> Plan | None:
    """Triton tiles: powers of two, dot dims >= 16; K split so the grid fills the GPU.

    tk / P is 16..128 word rows, padding past K_pad at most 1/8 of K_pad (else the least
    padded); of those the largest tk that still leaves >= GPU_TARGET_PROGRAMS (M tile, N tile,
    K tile) triples, else the smallest. split_k groups the K tiles so the grid has about
    GPU_TARGET_PROGRAMS programs; a weight with fewer triples gets one K step per program."""
    p, kp, n = shape.per_word, shape.padded_in, shape.out_features
    tn = _column_tile(n, (128, 64, 32, 16))
    tks = [p * w for w in (128, 64, 32, 16)]
    tks = [tk for tk in tks if (r := _group_rows(shape, tk)) is not None and r & (r - 1) == 0]
    if not tks:
        return None
    waste = lambda tk: (cdiv(kp, tk) * tk - kp) / kp
    tks = [tk for tk in tks if waste(tk) <= GPU_MAX_K_WASTE] or [min(tks, key=waste)]
    tm = next(t for t in (16, 32, 64, 128) if t >= min(rows, 128))
    tiles = cdiv(rows, tm) * cdiv(n, tn)
    tk = next((tk for tk in tks if tiles * cdiv(kp, tk) >= GPU_TARGET_PROGRAMS), tks[-1])
    k_tiles = cdiv(kp, tk)
    steps = max(1, (tiles * k_tiles) // GPU_TARGET_PROGRAMS)
    return Plan(tm=tm, tn=tn, tk=tk, group_rows=_group_rows(shape, tk), split_k=cdiv(k_tiles, steps))


def activation_slabs(x: jax.Array, shape: PackedShape, rows: int, tk: int) -> jax.Array:
    """x [M, K] -> [rows, P, K_t / P] zero-padded (K_t: whole K tiles), x_slabs[:, s, j] = x[:, j*P + s]."""
    m, k = x.shape
    x = jnp.pad(x, ((0, rows - m), (0, cdiv(shape.padded_in, tk) * tk - k)))
    return x.reshape(rows, -1, shape.per_word).transpose(0, 2, 1)


def slab_codes(words: list[jax.Array], s: int, width: int) -> jax.Array:
    """Whole codes of slab s from the planes' word tiles: int32 [rows, tn]."""
    mask = (1 << width) - 1
    code = None
    for plane, w in enumerate(words):
        part = ((w >> (s * width)) & mask) << (plane * width)
        code = part if code is None else code | part
    return code.astype(jnp.int32)


def code_bias(backend: str) -> float:
    """What `code_values` adds to every code on `backend`."""
    return FLOAT_MAGIC_VALUE if backend == "gpu" else 0.0


def code_values(codes: jax.Array, backend: str) -> jax.Array:
    """float32 codes + code_bias(backend), exactly.

    GPU: OR-ing the code into the mantissa of 2^23 builds 2^23 + code (one logic op that ptxas
    merges with the mask: no int->float conversion, a quarter-rate instruction on Hopper).
    TPU: a plain convert (one VPU op, as cheap as the OR)."""
    if backend == "gpu":
        return jax.lax.bitcast_convert_type(codes | FLOAT_MAGIC, jnp.float32)
    return codes.astype(jnp.float32)


def _tile_product(x_slab: Callable[[int], jax.Array], tile: Tile, decoder: Decoder, shape: PackedShape,
                  compute_dtype, interpret: bool) -> jax.Array:
    """sum over slabs of x_slab(s) @ (weights of slab s): float32 [tm, tn].

    Operands are rounded to the compute dtype and multiplied with float32 accumulation. In
    interpret mode they are then widened to float32 (XLA:CPU cannot run every bf16 x bf16 ->
    f32 dot there); products of bf16 values are exact in float32, so the result is the same.
    """
    operand = jnp.float32 if interpret else compute_dtype
    slab_weights = decoder(tile, shape)
    acc = None
    for s in range(shape.per_word):
        w = slab_weights(s).astype(compute_dtype).astype(operand)
        part = jnp.dot(x_slab(s).astype(compute_dtype).astype(operand), w, preferred_element_type=jnp.float32)
        acc = part if acc is None else acc + part
    return acc


def _expander(shape: PackedShape, word_rows: int) -> Callable[[jax.Array], jax.Array]:
    """[R, c] -> [word_rows, c]: each word row gets its group's row (R = 1: a broadcast)."""
    group_words = max(1, shape.group_size // shape.per_word)
    return lambda tile: groups.expand_rows(tile, group_words, word_rows)


def _valid_groups(tile: jax.Array, first_group, num_groups: int) -> jax.Array:
    """tile [R, ...] with rows of groups >= num_groups set to 0 (they hold padding)."""
    index = first_group + jax.lax.broadcasted_iota(jnp.int32, tile.shape, 0)
    return jnp.where(index < num_groups, tile, jnp.zeros_like(tile))


# ------------------------------------------------------------------------------ TPU (Mosaic)

def _tpu_kernel(x_ref, *refs, n_planes: int, shape: PackedShape, plan: Plan, decoder: Decoder, steps: int,
                squeezed: bool, per_group: tuple[bool, ...], interpret: bool):
    planes, params, (o_ref, acc_ref) = refs[:n_planes], refs[n_planes:-2], refs[-2:]
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    first_group = jax.lax.div(k * plan.tk, shape.group_size) if squeezed else k * plan.group_rows
    tiles = []
    for p, grouped in zip(params, per_group):  # blocks [R, (E,) c]; R squeezed away when 1 of G
        squeeze = squeezed and grouped
        entries = [p[..., e, :] for e in range(p.shape[-2])] if p.ndim == (2 if squeeze else 3) else [p[...]]
        for tile in entries:
            tile = tile[None] if squeeze else tile
            tiles.append(_valid_groups(tile, first_group, shape.groups) if grouped else tile)
    tile = Tile([p[...] for p in planes], tuple(tiles), _expander(shape, plan.tk // shape.per_word), "tpu")
    acc_ref[...] += _tile_product(lambda s: x_ref[:, s, :], tile, decoder, shape, x_ref.dtype, interpret)

    @pl.when(k == steps - 1)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def tpu_matmul(x_slabs: jax.Array, planes: tuple[jax.Array, ...], params: tuple[jax.Array, ...],
               shape: PackedShape, plan: Plan, decoder: Decoder, interpret: bool = False) -> jax.Array:
    """x_slabs [rows, P, K_t/P] -> float32 [rows, N]; grid (M, N, K) with K innermost.

    params: [G or 1, ..., N or 1] each; the last K and N blocks may be partial."""
    rows = x_slabs.shape[0]
    p, tm, tn, tk, r = shape.per_word, plan.tm, plan.tn, plan.tk, plan.group_rows
    steps = cdiv(shape.padded_in, tk)
    squeezed = shape.groups > 1 and r == 1  # one group row per K tile: a squeezed block dim
    # ... which Mosaic accepts only outside the last two dims: [G, N] rows become [G, 1, N]
    params = tuple(a[:, None, :] if squeezed and a.ndim == 2 and a.shape[0] > 1 else a for a in params)

    def param_spec(a):
        middle = tuple(a.shape[1:-1])
        cols = tn if a.shape[-1] > 1 else 1
        column = (lambda j: j) if a.shape[-1] > 1 else (lambda j: 0)
        if a.shape[0] == 1:
            return pl.BlockSpec((1,) + middle + (cols,), lambda i, j, k: (0,) * (a.ndim - 1) + (column(j),))
        if squeezed:
            group = lambda k: jax.lax.div(k * tk, shape.group_size)  # lax.div: Mosaic cannot lower jnp's //
            return pl.BlockSpec((None,) + middle + (cols,),
                                lambda i, j, k: (group(k),) + (0,) * len(middle) + (column(j),))
        return pl.BlockSpec((r,) + middle + (cols,), lambda i, j, k: (k,) + (0,) * len(middle) + (column(j),))

    kernel = functools.partial(_tpu_kernel, n_planes=len(planes), shape=shape, plan=plan, decoder=decoder,
                               steps=steps, squeezed=squeezed, per_group=tuple(a.shape[0] > 1 for a in params),
                               interpret=interpret)
    word_tile = (tk // p) * tn * 4
    vmem = (2 * (tm * tk * x_slabs.dtype.itemsize + len(planes) * word_tile)  # double-buffered inputs
            + 4 * tm * tn * 4 + 8 * word_tile)                                 # acc, out, slab temporaries
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((rows, shape.out_features), jnp.float32),
        grid=(rows // tm, cdiv(shape.out_features, tn), steps),
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

def _masked_tile(ref, rows: pl.Slice, cols: pl.Slice, row_limit: int, col_limit: int, entry: int | None = None
                 ) -> jax.Array:
    """ref[rows, (entry,) cols] -> [rows, cols], entries past (row_limit, col_limit) read as 0
    (never loaded)."""
    shape = (rows.size, cols.size)
    row = rows.start + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    col = cols.start + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    index = (rows, cols) if entry is None else (rows, entry, cols)
    return pltr.load(ref.at[index], mask=(row < row_limit) & (col < col_limit), other=0)


def _gpu_kernel(x_ref, *refs, n_planes: int, n_params: int, shape: PackedShape, plan: Plan, decoder: Decoder,
                steps_per_split: int, interpret: bool):
    planes, params = refs[:n_planes], refs[n_planes:n_planes + n_params]
    tables, o_ref = refs[n_planes + n_params:-1], refs[-1]
    i, j, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    tm, tn, tk, r = plan.tm, plan.tn, plan.tk, plan.group_rows
    tkw = tk // shape.per_word
    rows_m = pl.ds(i * tm, tm)
    first_step = split * steps_per_split
    steps = jnp.minimum(steps_per_split, cdiv(shape.padded_in, tk) - first_step)
    expand = _expander(shape, tkw)

    def param_tiles(a, k) -> list[jax.Array]:
        """[R or 1, c] tiles of a [G or 1, (E,) N or 1] parameter, one per entry E."""
        per_group, per_column = a.shape[0] > 1, a.shape[-1] > 1
        first = jax.lax.div(k * tk, shape.group_size) if per_group else 0
        rows, cols = pl.ds(first, r if per_group else 1), pl.ds(j * tn, tn) if per_column else pl.ds(0, 1)
        entries = range(a.shape[1]) if a.ndim == 3 else [None]
        return [_masked_tile(a, rows, cols, a.shape[0], a.shape[-1], e) for e in entries]

    def step(t, acc):
        k = first_step + t
        words = [_masked_tile(p, pl.ds(k * tkw, tkw), pl.ds(j * tn, tn), p.shape[0], p.shape[1]) for p in planes]
        tile = Tile(words, tuple(t for a in params for t in param_tiles(a, k)), expand, "gpu", tuple(tables),
                    jax.lax.div(k * tk, shape.group_size), j * tn)
        return acc + _tile_product(lambda s: x_ref[rows_m, s, pl.ds(k * tkw, tkw)], tile, decoder, shape,
                                   x_ref.dtype, interpret)

    o_ref[...] = jax.lax.fori_loop(0, steps, step, jnp.zeros((tm, tn), jnp.float32))


def gpu_matmul(x_slabs: jax.Array, planes: tuple[jax.Array, ...], params: tuple[jax.Array, ...],
               shape: PackedShape, plan: Plan, decoder: Decoder, interpret: bool = False,
               tables: tuple[jax.Array, ...] = ()) -> jax.Array:
    """x_slabs [rows, P, K_t/P] -> float32 [rows, N]; grid (M, N, split-K), partial sums added.

    params: [G or 1, ..., N or 1] each, loaded as tiles; tables: passed whole for gathers."""
    rows, n = x_slabs.shape[0], shape.out_features
    k_tiles = cdiv(shape.padded_in, plan.tk)
    kernel = functools.partial(_gpu_kernel, n_planes=len(planes), n_params=len(params), shape=shape, plan=plan,
                               decoder=decoder, steps_per_split=cdiv(k_tiles, plan.split_k), interpret=interpret)
    whole = pl.BlockSpec(memory_space=pl.ANY)  # K extents need not be powers of two: slice inside
    n_tiles = cdiv(n, plan.tn)
    partial = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((plan.split_k, rows, n_tiles * plan.tn), jnp.float32),
        grid=(rows // plan.tm, n_tiles, plan.split_k),
        in_specs=[whole] * (1 + len(planes) + len(params) + len(tables)),
        out_specs=pl.BlockSpec((None, plan.tm, plan.tn), lambda i, j, s: (s, i, j)),
        compiler_params=pltr.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
    )(x_slabs, *planes, *params, *tables)
    return partial[:, :, :n].sum(axis=0)


def plan_for(shape: PackedShape, rows: int, backend: str) -> Plan | None:
    return (plan_tpu if backend == "tpu" else plan_gpu)(shape, rows)


def packed_matmul(x: jax.Array, planes: tuple[jax.Array, ...], params: tuple[jax.Array, ...], shape: PackedShape,
                  decoder: Decoder, *, backend: str, plan: Plan | None = None, interpret: bool = False,
                  tables: tuple[jax.Array, ...] = ()) -> jax.Array | None:
    """x [M, K] (stored row order) -> float32 [M, N] on `backend` ('tpu' or 'gpu'), or None if
    no tiling of this shape suits the backend. tables: GPU gather tables (see `Tile`)."""
    m = x.shape[0]
    plan = plan or plan_for(shape, m, backend)
    if plan is None:
        return None
    rows = cdiv(m, plan.tm) * plan.tm
    x_slabs = activation_slabs(x, shape, rows, plan.tk)
    if backend == "tpu":
        y = tpu_matmul(x_slabs, planes, params, shape, plan, decoder, interpret)
    else:
        y = gpu_matmul(x_slabs, planes, params, shape, plan, decoder, interpret, tables)
    return y[:m]
