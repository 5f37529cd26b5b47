"""Pack b-bit codes along the last (input) axis into uint32 words, and back.

A b-bit code is split into bit planes of power-of-two widths (2 -> 2; 3 -> 2 + 1; 4 -> 4;
8 -> 8), so every plane packs 32/w codes per word with no waste: 3-bit weights cost exactly 3
bits. Within a word, code s sits at bits [s*w, (s+1)*w) (code 0 in the low bits), which is also
the order `lax.bitcast_convert_type(words, uint{w})` produces: the XLA path reads planes as
native sub-byte integers (2-, 4- and 8-bit planes; the 1-bit plane, which has no StableHLO
type, uses shifts) and the Pallas kernels unpack them with int32 shifts.
The last axis is zero-padded to a multiple of 32 codes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

WORD_BITS = 32
PLANE_WIDTHS: dict[int, tuple[int, ...]] = {2: (2,), 3: (2, 1), 4: (4,), 8: (8,)}
SUPPORTED_BITS = tuple(sorted(PLANE_WIDTHS))
_NARROW = {2: jnp.uint2, 4: jnp.uint4, 8: jnp.uint8}  # plane widths XLA bitcasts natively


def check_bits(bits: int) -> None:
    if bits not in PLANE_WIDTHS:
        raise ValueError(f"unsupported bits={bits}; jaxq packs {', '.join(map(str, SUPPORTED_BITS))}-bit codes")


def padded_length(k: int) -> int:
    """Codes per row after padding to whole words of every plane (a multiple of 32)."""
    return -(-k // WORD_BITS) * WORD_BITS


def packed_shapes(lead: tuple[int, ...], k: int, bits: int) -> tuple[tuple[int, ...], ...]:
    """Shapes of the uint32 planes holding codes of shape lead + (k,)."""
    check_bits(bits)
    return tuple(lead + (padded_length(k) * w // WORD_BITS,) for w in PLANE_WIDTHS[bits])


def pack(codes: jax.Array, bits: int) -> tuple[jax.Array, ...]:
    """uint8 codes [..., K] in [0, 2^bits) -> planes, uint32 [..., padded(K) * w / 32] each."""
    check_bits(bits)
    *lead, k = codes.shape
    pad = padded_length(k) - k
    codes = jnp.pad(codes.astype(jnp.uint8), [(0, 0)] * len(lead) + [(0, pad)])
    planes, shift = [], 0
    for w in PLANE_WIDTHS[bits]:
        part = ((codes >> shift) & ((1 << w) - 1)).reshape(*lead, -1, WORD_BITS // w)
        planes.append(_to_words(part, w))
        shift += w
    return tuple(planes)


def unpack(planes: tuple[jax.Array, ...], bits: int, k: int) -> jax.Array:
    """Inverse of `pack`: planes -> uint8 codes [..., k]."""
    check_bits(bits)
    widths = PLANE_WIDTHS[bits]
    if len(planes) != len(widths):
        raise ValueError(f"{bits}-bit codes have {len(widths)} planes, got {len(planes)}")
    codes, shift = None, 0
    for plane, w in zip(planes, widths):
        part = _from_words(plane, w).reshape(*plane.shape[:-1], -1).astype(jnp.uint8) << shift
        codes = part if codes is None else codes | part
        shift += w
    return codes[..., :k]


def _to_words(part: jax.Array, width: int) -> jax.Array:
    """uint8 [..., words, 32/width] codes of one plane -> uint32 [..., words]."""
    if width in _NARROW:
        return jax.lax.bitcast_convert_type(part.astype(_NARROW[width]), jnp.uint32)
    shifts = jnp.arange(WORD_BITS // width, dtype=jnp.uint32) * width
    return (part.astype(jnp.uint32) << shifts).sum(axis=-1, dtype=jnp.uint32)


def _from_words(words: jax.Array, width: int) -> jax.Array:
    """uint32 [..., words] -> codes of one plane [..., words, 32/width] (narrow ints or uint32)."""
    if width in _NARROW:
        return jax.lax.bitcast_convert_type(words, _NARROW[width])
    shifts = jnp.arange(WORD_BITS // width, dtype=jnp.uint32) * width
    return (words[..., None] >> shifts) & ((1 << width) - 1)
