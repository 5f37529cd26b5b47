"""Groups of input rows: splitting an axis into zero-padded groups, and expanding one value per
group back to one per row. Every format, method and kernel goes through these two, so "the last
group may be shorter" means the same thing everywhere: group g covers rows [g*size, (g+1)*size),
the last group ends at the last row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def num_groups(rows: int, group_size: int) -> int:
    """ceil(rows / group_size)."""
    return -(-rows // group_size)


def split_groups(a: jax.Array, group_size: int, axis: int = 0) -> jax.Array:
    """a [..., K, ...] (K along `axis`) -> [..., G, group_size, ...], zero-padded to G*group_size."""
    axis = axis % a.ndim
    k = a.shape[axis]
    groups = num_groups(k, group_size)
    pad = [(0, 0)] * a.ndim
    pad[axis] = (0, groups * group_size - k)
    return jnp.pad(a, pad).reshape(a.shape[:axis] + (groups, group_size) + a.shape[axis + 1:])


def group_mask(rows: int, group_size: int) -> jax.Array:
    """bool [G, group_size]: True where the padded group position is a real row."""
    groups = num_groups(rows, group_size)
    return (jnp.arange(groups * group_size) < rows).reshape(groups, group_size)


def expand_rows(per_group: jax.Array, group_size: int, rows: int) -> jax.Array:
    """[G, ...] -> [rows, ...]: group g's value on each of its rows (one group: a broadcast).

    Only broadcasts, repeats and a slice: usable inside Pallas kernels (Mosaic, Triton)."""
    if per_group.shape[0] == 1:
        return jnp.broadcast_to(per_group, (rows,) + per_group.shape[1:])
    repeated = jnp.repeat(per_group, group_size, axis=0)
    return repeated if repeated.shape[0] == rows else repeated[:rows]
