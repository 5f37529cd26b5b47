import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxq.formats import packing

BITS = st.sampled_from(packing.SUPPORTED_BITS)


def numpy_pack_plane(codes: np.ndarray, width: int) -> np.ndarray:
    """Reference, one column at a time: word j holds rows j*P .. j*P+P-1, row j*P+s at bits
    [s*width, (s+1)*width); rows zero-padded to a multiple of 32."""
    k, n = codes.shape
    per_word = 32 // width
    words = np.zeros((-(-k // 32) * 32 // per_word, n), np.uint64)
    for row in range(k):
        words[row // per_word] |= codes[row].astype(np.uint64) << np.uint64((row % per_word) * width)
    return words.astype(np.uint32)


@settings(max_examples=60, deadline=None)
@given(bits=BITS, k=st.integers(1, 300), rest=st.lists(st.integers(1, 4), max_size=2), seed=st.integers(0, 2**31))
def test_pack_unpack_round_trip(bits, k, rest, seed):
    codes = np.random.default_rng(seed).integers(0, 2 ** bits, size=(k, *rest)).astype(np.uint8)
    planes = packing.pack(codes, bits)
    assert [p.shape for p in planes] == list(packing.packed_shapes(k, tuple(rest), bits))
    assert all(p.dtype == np.uint32 for p in planes)
    np.testing.assert_array_equal(np.asarray(packing.unpack(planes, bits, k)), codes)


@settings(max_examples=30, deadline=None)
@given(bits=BITS, k=st.integers(1, 200), seed=st.integers(0, 2**31))
def test_bit_layout_matches_the_documented_order(bits, k, seed):
    """Planes are the low bits first (3-bit: three 1-bit planes), packed low-code-first."""
    codes = np.random.default_rng(seed).integers(0, 2 ** bits, size=(k, 3)).astype(np.uint8)
    shift = 0
    for plane, width in zip(packing.pack(codes, bits), packing.PLANE_WIDTHS[bits]):
        expected = numpy_pack_plane((codes >> shift) & ((1 << width) - 1), width)
        np.testing.assert_array_equal(np.asarray(plane), expected)
        shift += width


def test_storage_is_exactly_bits_per_code():
    for bits in packing.SUPPORTED_BITS:
        planes = packing.pack(np.zeros((256, 4), np.uint8), bits)
        assert sum(p.size * 4 for p in planes) * 8 == 4 * 256 * bits


def test_pack_and_unpack_are_jittable():
    codes = np.random.default_rng(0).integers(0, 8, size=(70, 5)).astype(np.uint8)
    planes = jax.jit(packing.pack, static_argnums=1)(codes, 3)
    out = jax.jit(packing.unpack, static_argnums=(1, 2))(planes, 3, 70)
    np.testing.assert_array_equal(np.asarray(out), codes)


def test_unsupported_bits_are_refused():
    with pytest.raises(ValueError, match="unsupported bits=5"):
        packing.pack(np.zeros((32, 2), np.uint8), 5)
    with pytest.raises(ValueError, match="3-bit codes have 3 planes, got 1"):
        packing.unpack(packing.pack(np.zeros((32, 2), np.uint8), 4), 3, 32)
