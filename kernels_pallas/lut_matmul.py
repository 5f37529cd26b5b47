"""y = x @ W for lookup-table weights (CodebookQ), accumulated in float32 (see `packed`).

The lookup differs by backend (results/kernel_notes.md, v2, has the per-weight arithmetic):
- GPU: a gather. The 16-bit table (a few KiB per tile, L1-resident) is read at
  (row's table, code, column) computed from the code with one multiply-add: one load per weight
  on the load/store pipe, beside the arithmetic pipes.
- TPU: Mosaic has no general vector gather, so a select tree on the code's bits, read straight
  from the packed words (bit i of slab s: one shift and one compare): 2^b - 1 selects and 2b
  bit ops per weight, against 2^b compares and 2^b selects for a compare chain.
Then w = scale * (entry - zero) where the format has them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as pltr

from jaxq.formats.codebook import CodebookQ
from kernels_pallas.packed import PackedShape, Plan, Tile, packed_matmul, slab_codes

SIGN_BIT = 1 << 31


def _code_bit(words: list[jax.Array], s: int, bit: int, width: int) -> jax.Array:
    """bool [rows, tn]: bit `bit` of slab s's codes (planes hold `width` bits of each code)."""
    position = s * width + bit % width
    return (words[bit // width] << (31 - position)) >= jnp.uint32(SIGN_BIT)


def _select_tree(entries: list[jax.Array], bit: Callable[[int], jax.Array]) -> jax.Array:
    """entries[code] for every weight, by halving the candidates on one code bit at a time."""
    level, i = entries, 0
    while len(level) > 1:
        b = bit(i)
        level, i = [jnp.where(b, hi, lo) for lo, hi in zip(level[0::2], level[1::2])], i + 1
    return level[0]


def _gather_base(tile: Tile, shape: PackedShape, table_shape: tuple[int, int, int]) -> jax.Array:
    """int32 [tk/P, tn]: flat table offset of (row's table, code 0, column); the last table
    and column stand in for the padding past them (their weights meet zero activations)."""
    tables, entries, columns = table_shape
    rows, tn = tile.words[0].shape
    base = jnp.zeros((rows, tn), jnp.int32)
    if tables > 1:
        row = jax.lax.broadcasted_iota(jnp.int32, (rows, tn), 0)
        group = tile.first_group + jax.lax.div(row, max(1, shape.group_size // shape.per_word))
        base = jnp.minimum(group, tables - 1) * (entries * columns)
    if columns > 1:
        column = tile.first_column + jax.lax.broadcasted_iota(jnp.int32, (rows, tn), 1)
        base = base + jnp.minimum(column, columns - 1)
    return base


def _decoder(tile: Tile, shape: PackedShape, *, table_shape: tuple[int, int, int], has_scale: bool,
             has_zero: bool) -> Callable[[int], jax.Array]:
    """slab s -> float32 weights [tk/P, tn]. params: (table entries (TPU),) scale?, zero?"""
    entries, columns = table_shape[1:]
    params = list(tile.params)
    if tile.backend == "gpu":
        table, base = tile.tables[0], _gather_base(tile, shape, table_shape)
        lookup = lambda s: pltr.load(table.at[base + slab_codes(tile.words, s, shape.width) * columns])
    else:
        levels = [tile.expand(params.pop(0)).astype(jnp.float32) for _ in range(entries)]
        lookup = lambda s: _select_tree(levels, lambda i: _code_bit(tile.words, s, i, shape.width))
    scale = tile.expand(params.pop(0)).astype(jnp.float32) if has_scale else None
    zero = tile.expand(params.pop(0)).astype(jnp.float32) if has_zero else None

    def weights(s: int) -> jax.Array:
        w = lookup(s).astype(jnp.float32)
        w = w if zero is None else w - zero
        return w if scale is None else w * scale

    return weights


def packed_shape(w: CodebookQ) -> PackedShape:
    return PackedShape(w.shape[0], w.shape[1], w.bits, w.group_size, w.num_groups)


def lut_matmul(x: jax.Array, w: CodebookQ, *, backend: str, interpret: bool = False,
               plan: Plan | None = None) -> jax.Array | None:
    """x [..., in] -> [..., out] in x.dtype on 'tpu' or 'gpu'; None when no tiling suits the shape."""
    in_features, out_features = w.shape
    x2 = w.permute_input(x.reshape(-1, in_features))
    scale_zero = tuple(a for a in (w.scale, w.zero) if a is not None)
    if backend == "tpu":  # Mosaic: no 8-bit vector arithmetic on every generation
        scale_zero = tuple(a.astype(jnp.float32) if a.dtype == jnp.uint8 else a for a in scale_zero)
    params, tables = ((w.table,) + scale_zero, ()) if backend == "tpu" else (scale_zero, (w.table.reshape(-1),))
    decoder = functools.partial(_decoder, table_shape=tuple(w.table.shape), has_scale=w.scale is not None,
                                has_zero=w.zero is not None)
    y = packed_matmul(x2, w.codes, params, packed_shape(w), decoder, backend=backend, plan=plan,
                      interpret=interpret, tables=tables)
    return None if y is None else y.astype(x.dtype).reshape(*x.shape[:-1], out_features)
