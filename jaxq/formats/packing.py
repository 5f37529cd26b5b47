"""Pack b-bit codes along the leading (input) axis into uint32 words, and back.

A b-bit code is split into bit planes of equal power-of-two width (2 -> 2; 3 -> 1 + 1 + 1;
4 -> 4; 8 -> 8), so every plane packs P = 32/w codes per word with no waste (3-bit weights cost
exactly 3 bits) and all planes of a code share one word structure: kernels rebuild whole codes
slab by slab, which a lookup table (non-linear in the code) needs. Codes [K, N] become, per plane, words [K_pad * w / 32, N]: word j of column n holds
rows j*P .. j*P + P - 1 of that column, row j*P + s in bits [s*w, (s+1)*w) (GPTQ's qweight
layout). Shifting a tile of words right by s*w yields the codes of rows {j*P + s}: kernels
unpack with int32 shifts only and pair slab s with activation columns s, P + s, 2P + s, ...
The leading axis is zero-padded to a multiple of 32 codes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

WORD_BITS = 32
PLANE_WIDTHS: dict[int, tuple[int, ...]] = {2: (2,), 3: (1, 1, 1), 4: (4,), 8: (8,)}
SUPPORTED_BITS = tuple(sorted(PLANE_WIDTHS))


def check_bits(bits: int) -> None:
    if bits not in PLANE_WIDTHS:
        raise ValueError(f"unsupported bits={bits}; jaxq packs {', '.join(map(str, SUPPORTED_BITS))}-bit codes")


def padded_length(k: int) -> int:
    """Codes per column after padding to whole words of every plane (a multiple of 32)."""
    return -(-k // WORD_BITS) * WORD_BITS


def plane_shifts(bits: int) -> tuple[int, ...]:
    """Bit offset of each plane within a code: 3 -> (0, 1, 2)."""
    widths = PLANE_WIDTHS[bits]
    return tuple(sum(widths[:i]) for i in range(len(widths)))


def packed_shapes(k: int, rest: tuple[int, ...], bits: int) -> tuple[tuple[int, ...], ...]:
    """Shapes of the uint32 planes holding codes of shape (k,) + rest."""
    check_bits(bits)
    return tuple((padded_length(k) * w // WORD_BITS,) + rest for w in PLANE_WIDTHS[bits])


def pack(codes: jax.Array, bits: int) -> tuple[jax.Array, ...]:
    """uint8 codes [K, ...] in [0, 2^bits) -> planes, uint32 [padded(K) * w / 32, ...] each."""
    check_bits(bits)
    k, *rest = codes.shape
    codes = jnp.pad(codes.astype(jnp.uint32), [(0, padded_length(k) - k)] + [(0, 0)] * len(rest))
    planes = []
    for width, shift in zip(PLANE_WIDTHS[bits], plane_shifts(bits)):
        per_word = WORD_BITS // width
        part = ((codes >> shift) & ((1 << width) - 1)).reshape(-1, per_word, *rest)
        offsets = (jnp.arange(per_word, dtype=jnp.uint32) * width).reshape(per_word, *[1] * len(rest))
        planes.append((part << offsets).sum(axis=1, dtype=jnp.uint32))
    return tuple(planes)


def plane_width(bits: int) -> int:
    """Width of each of the (equal) planes of a b-bit code."""
    return PLANE_WIDTHS[bits][0]


def unpack_plane(words: jax.Array, width: int) -> jax.Array:
    """One plane's words [W, ...] -> its codes [W * 32/width, ...] (uint32)."""
    per_word = WORD_BITS // width
    offsets = (jnp.arange(per_word, dtype=jnp.uint32) * width).reshape(1, per_word, *[1] * (words.ndim - 1))
    codes = (words[:, None] >> offsets) & ((1 << width) - 1)
    return codes.reshape(-1, *words.shape[1:])


def unpack(planes: tuple[jax.Array, ...], bits: int, k: int) -> jax.Array:
    """Inverse of `pack`: planes -> uint8 codes [k, ...]."""
    check_bits(bits)
    widths = PLANE_WIDTHS[bits]
    if len(planes) != len(widths):
        raise ValueError(f"{bits}-bit codes have {len(widths)} planes, got {len(planes)}")
    codes = sum(unpack_plane(p, w) << s for p, w, s in zip(planes, widths, plane_shifts(bits)))
    return codes[:k].astype(jnp.uint8)
