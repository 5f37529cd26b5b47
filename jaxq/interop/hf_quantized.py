"""Hugging Face quantized directories <-> jaxq `UniformQ`: GPTQ (v1 and v2 zeros),
compressed-tensors `pack-quantized` and AWQ (GEMM), both ways.

    jaxq export --checkpoint runs/gptq-w4 --hf out/ --format compressed-tensors   # vLLM serves out/
    models.load("out/")                                # back to UniformQ: codes, scales, zeros as stored

Layouts (torch weights are [out, in]; jaxq kernels [in, out]). `../shared/docs/INTEROP.md` holds
what the current loaders were measured to do; the formats' code is the authority:
- Packing (both formats): codes as one little-endian bit stream along the packed axis, code i in
  stream bits [i*b, (i+1)*b), 32 stream bits per int32 word, the axis zero-padded to whole words
  (compressed-tensors' `pack_to_int32`, which splits a 3-bit code across words; for b in 2, 4, 8
  this is GPTQ's word layout).
- GPTQ (AutoGPTQ / GPTQModel): `qweight` int32 [in*b/32, out] packed along the input axis,
  `qzeros` int32 [groups, out*b/32] packed along the output axis, `scales` fp16 [groups, out],
  `g_idx` int32 [in] (each input row's group). w = (q - z) * s, where `checkpoint_format` "gptq"
  (v1) stores z - 1 and "gptq_v2" stores z; a zero of 0 exports to v2 only (readers add 1 to v1's
  wrapped -1 differently). Symmetric: z = 2^(b-1). 2, 4 and 8 bits
  (AutoGPTQ's 3-bit word layout is not implemented here).
- compressed-tensors: `weight_packed` int32 [out, in*b/32] packed along the input axis,
  `weight_scale` [out, groups], `weight_shape` int64 (out, in); codes are the signed q - 2^(b-1)
  plus that same offset, i.e. jaxq's unsigned symmetric codes. Its loader needs groups that
  divide the input size (smollm2's 576 inputs take g64 or g32, not g128). Symmetric only: the asymmetric
  `weight_zero_point` (packed along the output axis) did not load in transformers 5 with
  compressed-tensors 0.20 (INTEROP.md), so it is refused rather than written unloadable.

- AWQ (AutoAWQ `version: "gemm"`): `qweight` int32 [in, out/8] and `qzeros` int32 [groups, out/8]
  packed along the OUTPUT axis, 8 nibbles per word, nibble i of word c holding output column
  8c + (0, 2, 4, 6, 1, 3, 5, 7)[i] (AutoAWQ's `AWQ_ORDER`); `scales` fp16 [groups, out];
  w = (q - z) * s. 4-bit, groups only (one group size for every linear), no act-order; a
  symmetric jaxq grid exports as zeros of 8.

act-order: a GPTQ `g_idx` is jaxq's `perm` (stored row j is input row perm[j], groups follow the
stored order), so act-order exports to GPTQ and comes back from it; its groups are contiguous in
stored order only, which compressed-tensors 0.20 no longer accepts (`actorder="group"`), so it
needs GPTQ's `--static-groups` (codes in input order, perm None) there. Importing a `g_idx` sorts
the rows by group (stable), so perm within a group is ascending: the same weights and, in input
order, the same codes; within-group order, which nothing reads, is not kept.

GPTQ's v1/v2 label is checked against the stored zeros where they are known: a symmetric
checkpoint whose zeros are the other version's is refused, naming the fix. An asymmetric one's
zeros are data, so there a wrong label cannot be detected from the file.

Scales and float tensors are written in fp16 (what GPTQ kernels and these loaders expect); a
round trip keeps codes and zeros exactly and scales to their fp16 value. Imported scales keep
their stored dtype (fp16, bf16 or fp32). The directory is written
beside OUT under a temporary name and renamed into place.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxq import tree
from jaxq.formats.uniform import UniformQ
from models.config import LlamaConfig, UnsupportedModelError
from models.language_model import LanguageModel
from models.load import HF_LAYER_NAMES

FORMATS = ("gptq", "compressed-tensors", "awq")
GPTQ_BITS = (2, 4, 8)
COMPRESSED_TENSORS_BITS = (2, 3, 4, 8)
GPTQ_CHECKPOINT_FORMATS = {"gptq": 1, "gptq_v2": 2}
FLOAT_DTYPE = np.float16
AWQ_ORDER = np.array([0, 2, 4, 6, 1, 3, 5, 7])  # output column (within 8) of each nibble of a word
CT_VERSION = "0.20.1"  # the compressed-tensors release whose loader the tests run


class HFExportError(ValueError):
    """A model or weight that a Hugging Face quantized format cannot hold, with what does export."""


class HFImportError(UnsupportedModelError):
    """A quantized Hugging Face directory jaxq cannot read, naming the field or tensor."""


# ------------------------------------------------------------------ packing

def _code_positions(bits: int) -> list[tuple[int, int, int, bool]]:
    """For each of the 32 codes of a run of `bits` words: (code, word, bit offset, spills into
    the next word)."""
    return [(i, i * bits // 32, i * bits % 32, i * bits % 32 + bits > 32) for i in range(32)]


def pack_int32(codes: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Unsigned codes (< 2^bits) -> int32 words along `axis` (the module docstring's bit stream):
    that axis of length n becomes ceil(n * bits / 32). Every 32 codes fill `bits` words, one
    vectorised shift per code position (memory: 8 bytes per code)."""
    codes = np.moveaxis(np.asarray(codes, np.uint64), axis, -1)
    n = codes.shape[-1]
    runs = -(-n // 32)
    codes = np.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, runs * 32 - n)]).reshape(*codes.shape[:-1], runs, 32)
    words = np.zeros((*codes.shape[:-1], bits), np.uint64)
    for i, word, offset, spills in _code_positions(bits):
        words[..., word] |= (codes[..., i] << np.uint64(offset)) & np.uint64(0xFFFFFFFF)
        if spills:
            words[..., word + 1] |= codes[..., i] >> np.uint64(32 - offset)
    words = words.reshape(*words.shape[:-2], runs * bits)[..., : -(-n * bits // 32)]
    return np.moveaxis(words.astype(np.uint32).view(np.int32), -1, axis)


def unpack_int32(words: np.ndarray, bits: int, length: int, axis: int) -> np.ndarray:
    """The inverse of `pack_int32`: int32 words -> uint8 codes, `length` along `axis`."""
    words = np.moveaxis(np.asarray(words).view(np.uint32).astype(np.uint64), axis, -1)
    if words.shape[-1] * 32 < length * bits:
        raise HFImportError(f"{words.shape[-1]} packed words hold fewer than {length} {bits}-bit codes")
    runs = -(-length // 32)
    words = np.pad(words[..., : runs * bits], [(0, 0)] * (words.ndim - 1) + [(0, max(0, runs * bits - words.shape[-1]))])
    words = words.reshape(*words.shape[:-1], runs, bits)
    codes = np.zeros((*words.shape[:-1], 32), np.uint64)
    for i, word, offset, spills in _code_positions(bits):
        code = words[..., word] >> np.uint64(offset)
        if spills:
            code |= words[..., word + 1] << np.uint64(32 - offset)
        codes[..., i] = code & np.uint64((1 << bits) - 1)
    codes = codes.reshape(*codes.shape[:-2], runs * 32)[..., :length]
    return np.moveaxis(codes.astype(np.uint8), -1, axis)


# ------------------------------------------------------------------ one weight

@dataclasses.dataclass(frozen=True)
class Scheme:
    """What a format's config records once for every quantized linear."""

    bits: int
    group_size: int          # input rows per group; -1: one group per output column (per-channel)
    symmetric: bool
    act_order: bool

    def rows_per_group(self, in_features: int) -> int:
        return in_features if self.group_size <= 0 else self.group_size


def scheme_of(q: UniformQ) -> Scheme:
    per_channel = q.num_groups == 1
    return Scheme(q.bits, -1 if per_channel else q.group_size, q.zero_point == "none", q.perm is not None)


def _finite_scales(scales: np.ndarray, name: str) -> np.ndarray:
    """The stored scales, in their stored dtype (fp16, bf16 or fp32: dequantization is then the
    loader's own), checked finite."""
    if not np.isfinite(np.asarray(scales, np.float32)).all():
        raise HFImportError(f"{name}: scales hold NaN or Inf; the checkpoint is damaged")
    return np.ascontiguousarray(scales)


def to_fp16(value: np.ndarray, name: str) -> np.ndarray:
    """value in fp16, refused where fp16 would turn it into Inf or a nonzero into 0."""
    value = np.asarray(value, np.float32)
    half = value.astype(FLOAT_DTYPE)
    if not np.isfinite(half).all() or np.any((half == 0) & (value != 0)):
        raise HFExportError(f"{name}: values outside fp16's range (max |x| {np.abs(value).max():.3g}, min nonzero "
                            f"{np.abs(value[value != 0]).min() if np.any(value != 0) else 0:.3g}); these formats "
                            "store 16-bit floats")
    return half


def _check_gptq_shape(q: UniformQ, name: str, fmt: str) -> None:
    """What vLLM's GPTQ / AWQ loaders require: groups dividing the inputs, whole packed words of
    outputs."""
    per_word = 32 // q.bits
    if q.num_groups > 1 and q.shape[0] % q.group_size:
        raise HFExportError(f"{name}: {fmt} loaders need groups that divide the input size ({q.shape[0]} inputs, "
                            f"groups of {q.group_size}); quantize with a group size that divides every linear's inputs")
    if q.shape[1] % per_word:
        raise HFExportError(f"{name}: {fmt} packs {per_word} {q.bits}-bit zeros per word; {q.shape[1]} outputs "
                            "do not divide")


def _integer_grid(q: UniformQ, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(scale fp16 [groups, out], integer zero uint8 [groups, out]) of q."""
    if q.zero_point == "float":
        raise HFExportError(f"{name}: a float offset (w = s*q + m, llama.cpp's Q4_1 grid) has no integer zero "
                            "point in GPTQ or compressed-tensors; export integer-zero or symmetric grids "
                            "(--zero-point int or --symmetric), or export this one with --gguf")
    shape = (q.num_groups, q.shape[1])
    scale = to_fp16(np.broadcast_to(np.asarray(q.scale, np.float32), shape), f"{name} scales")
    zero = (np.full(shape, 2 ** (q.bits - 1), np.uint8) if q.zero_point == "none"
            else np.broadcast_to(np.asarray(q.zero, np.uint8), shape))
    return scale, zero


def gptq_tensors(q: UniformQ, version: int, name: str = "weight") -> dict[str, np.ndarray]:
    """GPTQ's tensors of one weight (the module docstring's layout), zeros in `version` 1 or 2's
    convention."""
    if q.bits not in GPTQ_BITS:
        raise HFExportError(f"{name}: {q.bits}-bit weights do not export to GPTQ here (it takes "
                            f"{', '.join(map(str, GPTQ_BITS))} bits); compressed-tensors takes 3-bit symmetric")
    _check_gptq_shape(q, name, "GPTQ")
    scale, zero = _integer_grid(q, name)
    if version == 1 and np.any(zero == 0):
        raise HFExportError(f"{name}: a zero point of 0, which GPTQ v1 (zeros minus one) cannot hold: readers add 1 "
                            "to the stored -1 without wrapping (AutoGPTQ, vLLM) or carry into the next column "
                            "(GPTQModel); export with --gptq-version 2")
    stored = np.asarray(q.stored_codes())
    group_of_stored = np.arange(q.shape[0], dtype=np.int32) // min(q.group_size, q.shape[0])
    codes, g_idx = stored, group_of_stored
    if q.perm is not None:
        perm = np.asarray(q.perm)
        codes, g_idx = np.empty_like(stored), np.empty_like(group_of_stored)
        codes[perm], g_idx[perm] = stored, group_of_stored
    stored_zero = zero.astype(np.int32) - (version == 1)
    return {"qweight": pack_int32(codes, q.bits, axis=0), "qzeros": pack_int32(stored_zero, q.bits, axis=1),
            "scales": scale, "g_idx": g_idx}


def compressed_tensors_tensors(q: UniformQ, name: str = "weight") -> dict[str, np.ndarray]:
    """compressed-tensors `pack-quantized` tensors of one symmetric weight."""
    if q.bits not in COMPRESSED_TENSORS_BITS:
        raise HFExportError(f"{name}: {q.bits}-bit weights do not export to compressed-tensors here "
                            f"(it takes {', '.join(map(str, COMPRESSED_TENSORS_BITS))} bits)")
    if q.zero_point != "none":
        _integer_grid(q, name)  # a float offset: its own message
        raise HFExportError(f"{name}: asymmetric compressed-tensors checkpoints did not load in transformers 5 with "
                            f"compressed-tensors {CT_VERSION} (packed zero points refused); export symmetric "
                            "weights (--symmetric) or an asymmetric model with --format gptq")
    if q.perm is not None:
        raise HFExportError(f"{name}: act-order groups that follow the permutation need a g_idx, which "
                            f"compressed-tensors {CT_VERSION} no longer accepts; quantize with GPTQ's "
                            "--static-groups (groups in input order) or export with --format gptq")
    if q.num_groups > 1 and q.shape[0] % q.group_size:
        divisors = [g for g in (32, 64, 128, 256) if q.shape[0] % g == 0]
        raise HFExportError(f"{name}: compressed-tensors {CT_VERSION} refuses groups that do not divide the input size "
                            f"({q.shape[0]} inputs, groups of {q.group_size}); quantize with a group size dividing "
                            f"every linear's inputs ({', '.join(map(str, divisors)) or 'none of 32-256 here'} for this "
                            "one), per-channel, or export with --format gptq")
    scale, _ = _integer_grid(q, name)
    codes = np.asarray(q.stored_codes()).T  # [out, in]
    return {"weight_packed": pack_int32(codes, q.bits, axis=1), "weight_scale": np.ascontiguousarray(scale.T),
            "weight_shape": np.asarray(codes.shape, np.int64)}


def _awq_columns(codes: np.ndarray) -> np.ndarray:
    """Columns [.., out] reordered so a plain nibble packing puts them in AWQ's order."""
    out = codes.shape[-1]
    if out % 8:
        raise HFExportError(f"AWQ packs 8 output columns per word; {out} outputs do not divide")
    order = (np.arange(0, out, 8)[:, None] + AWQ_ORDER[None]).ravel()
    return codes[..., order]


def _awq_columns_back(interleaved: np.ndarray) -> np.ndarray:
    """The inverse of `_awq_columns`."""
    out = interleaved.shape[-1]
    order = (np.arange(0, out, 8)[:, None] + AWQ_ORDER[None]).ravel()
    codes = np.empty_like(interleaved)
    codes[..., order] = interleaved
    return codes


def awq_tensors(q: UniformQ, name: str = "weight") -> dict[str, np.ndarray]:
    """AutoAWQ GEMM tensors of one 4-bit grouped weight."""
    if q.bits != 4:
        raise HFExportError(f"{name}: {q.bits}-bit weights do not export to AWQ (4-bit only, as in vLLM); "
                            "export them with --format gptq")
    if q.perm is not None:
        raise HFExportError(f"{name}: AWQ has no act-order (no g_idx); quantize with --static-groups or export "
                            "with --format gptq")
    if q.num_groups == 1:
        raise HFExportError(f"{name}: AWQ configs take one group size for every linear, so per-channel grids do not "
                            "export; use groups (--group-size 128) or --format gptq")
    _check_gptq_shape(q, name, "AWQ")
    scale, zero = _integer_grid(q, name)
    codes = np.asarray(q.stored_codes())
    return {"qweight": pack_int32(_awq_columns(codes), 4, axis=1), "qzeros": pack_int32(_awq_columns(zero), 4, axis=1),
            "scales": scale}


def from_awq(tensors: dict[str, np.ndarray], scheme: Scheme, name: str, dtype: str) -> UniformQ:
    """A UniformQ (integer zero) from one linear's AutoAWQ GEMM tensors."""
    missing = [k for k in ("qweight", "qzeros", "scales") if k not in tensors]
    if missing:
        raise HFImportError(f"{name}: AWQ tensors {', '.join(missing)} missing")
    scales = np.asarray(tensors["scales"])
    groups, out_features = scales.shape
    in_features = tensors["qweight"].shape[0]
    codes = _awq_columns_back(unpack_int32(tensors["qweight"], 4, out_features, axis=1))
    zero = _awq_columns_back(unpack_int32(tensors["qzeros"], 4, out_features, axis=1))
    group_size = scheme.rows_per_group(in_features)
    if groups != -(-in_features // group_size):
        raise HFImportError(f"{name}.scales: {groups} groups, but {in_features} inputs in groups of {group_size} "
                            f"make {-(-in_features // group_size)}")
    return UniformQ.from_codes(codes, _finite_scales(scales, name), zero, bits=4, group_size=group_size,
                               dtype=dtype, zero_point="int")


def _perm_from_g_idx(g_idx: np.ndarray, group_size: int, name: str) -> np.ndarray | None:
    """jaxq's perm for a GPTQ g_idx (None when the groups are already contiguous in input order)."""
    in_features = g_idx.shape[0]
    contiguous = np.arange(in_features) // group_size
    if np.array_equal(g_idx, contiguous):
        return None
    perm = np.argsort(g_idx, kind="stable")
    if not np.array_equal(g_idx[perm], contiguous):
        raise HFImportError(f"{name}.g_idx: its groups do not have {group_size} rows each (the config's group size), "
                            "so no permutation makes them contiguous")
    return perm.astype(np.int32)


def from_gptq(tensors: dict[str, np.ndarray], scheme: Scheme, version: int, name: str, dtype: str) -> UniformQ:
    """A UniformQ from one linear's GPTQ tensors (`gptq_tensors`' layout)."""
    missing = [k for k in ("qweight", "qzeros", "scales") if k not in tensors]
    if missing:
        raise HFImportError(f"{name}: GPTQ tensors {', '.join(missing)} missing")
    scales = np.asarray(tensors["scales"])
    groups, out_features = scales.shape
    in_features = tensors["qweight"].shape[0] * 32 // scheme.bits
    g_idx = np.asarray(tensors.get("g_idx", np.arange(in_features) // max(1, -(-in_features // groups))), np.int64)
    in_features = g_idx.shape[0]
    group_size = scheme.rows_per_group(in_features)
    codes = unpack_int32(tensors["qweight"], scheme.bits, in_features, axis=0)
    stored_zero = unpack_int32(tensors["qzeros"], scheme.bits, out_features, axis=1).astype(np.int32)
    if version == 1 and not scheme.symmetric and np.any(stored_zero == 2 ** scheme.bits - 1):
        raise HFImportError(f"{name}.qzeros: a v1 checkpoint storing {2 ** scheme.bits - 1} (zero 0 wrapped, or a "
                            f"zero of {2 ** scheme.bits}): GPTQ readers disagree on it, so it is not guessed")
    zero = (stored_zero + (version == 1)).astype(np.uint8)
    if scheme.symmetric:
        middle = 2 ** (scheme.bits - 1)
        if not np.all(zero == middle):
            other = stored_zero + (version != 1)
            hint = (f"; they are {'v2' if version == 1 else 'v1'}'s: the directory's checkpoint_format is wrong, "
                    "correct it in config.json") if np.all(other == middle) else ""
            raise HFImportError(f"{name}.qzeros: a symmetric {scheme.bits}-bit GPTQ v{version} checkpoint stores "
                                f"zeros of {middle - (version == 1)}, these are not{hint}")
    perm = _perm_from_g_idx(g_idx, group_size, name)
    if perm is not None:
        codes = codes[perm]
    if groups != -(-in_features // group_size):
        raise HFImportError(f"{name}.scales: {groups} groups, but {in_features} inputs in groups of {group_size} "
                            f"make {-(-in_features // group_size)}")
    return UniformQ.from_codes(codes, _finite_scales(scales, name), None if scheme.symmetric else zero,
                               bits=scheme.bits, group_size=group_size, dtype=dtype,
                               zero_point="none" if scheme.symmetric else "int", perm=perm)


def from_compressed_tensors(tensors: dict[str, np.ndarray], scheme: Scheme, name: str, dtype: str) -> UniformQ:
    """A UniformQ from one linear's compressed-tensors `pack-quantized` tensors (symmetric)."""
    missing = [k for k in ("weight_packed", "weight_scale", "weight_shape") if k not in tensors]
    if missing:
        raise HFImportError(f"{name}: compressed-tensors tensors {', '.join(missing)} missing")
    if "weight_zero_point" in tensors or "weight_g_idx" in tensors:
        extra = "weight_zero_point" if "weight_zero_point" in tensors else "weight_g_idx"
        raise HFImportError(f"{name}.{extra}: asymmetric or group-act-order compressed-tensors weights are not read")
    out_features, in_features = (int(v) for v in np.asarray(tensors["weight_shape"]))
    codes = unpack_int32(tensors["weight_packed"], scheme.bits, in_features, axis=1).T  # [in, out]
    scale = _finite_scales(np.asarray(tensors["weight_scale"]).T, name)
    group_size = scheme.rows_per_group(in_features)
    return UniformQ.from_codes(codes, scale, None, bits=scheme.bits, group_size=group_size, dtype=dtype,
                               zero_point="none")


# ------------------------------------------------------------------ configs

def _gptq_config(scheme: Scheme, version: int, quantized: list[str]) -> dict[str, Any]:
    return {"quant_method": "gptq", "bits": scheme.bits, "group_size": scheme.group_size,
            "desc_act": scheme.act_order, "sym": scheme.symmetric, "static_groups": False, "true_sequential": True,
            "checkpoint_format": {v: k for k, v in GPTQ_CHECKPOINT_FORMATS.items()}[version],
            "modules_in_block_to_quantize": [quantized]}


def _compressed_tensors_config(scheme: Scheme, ignore: list[str]) -> dict[str, Any]:
    strategy = "channel" if scheme.group_size <= 0 else "group"
    weights = {"num_bits": scheme.bits, "type": "int", "symmetric": True, "strategy": strategy,
               "group_size": None if strategy == "channel" else scheme.group_size, "actorder": None,
               "dynamic": False, "observer": "minmax"}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                          "output_activations": None, "format": "pack-quantized"}},
            "ignore": ignore, "kv_cache_scheme": None, "sparsity_config": {}, "version": CT_VERSION}


def _awq_config(scheme: Scheme) -> dict[str, Any]:
    return {"quant_method": "awq", "bits": 4, "group_size": scheme.group_size, "zero_point": True,
            "version": "gemm"}


def scheme_from_config(quantization_config: dict[str, Any]) -> tuple[str, Scheme, int]:
    """(format, scheme, GPTQ version or 0) of a `quantization_config`; anything else fails naming
    the field."""
    q = quantization_config
    method = q.get("quant_method")
    if method == "gptq":
        fmt = q.get("checkpoint_format", "gptq")
        if fmt not in GPTQ_CHECKPOINT_FORMATS:
            raise HFImportError(f"quantization_config.checkpoint_format {fmt!r} is not GPTQ's "
                                f"({', '.join(GPTQ_CHECKPOINT_FORMATS)}); e.g. 'marlin' repacks are not read")
        bits = q.get("bits")
        if bits not in GPTQ_BITS:
            raise HFImportError(f"quantization_config.bits {bits!r}: GPTQ import takes {GPTQ_BITS}")
        return "gptq", Scheme(bits, int(q.get("group_size", -1)), bool(q.get("sym", True)),
                              bool(q.get("desc_act", False))), GPTQ_CHECKPOINT_FORMATS[fmt]
    if method == "compressed-tensors":
        if q.get("format") != "pack-quantized":
            raise HFImportError(f"quantization_config.format {q.get('format')!r}: only 'pack-quantized' integer "
                                "weights are read (not fp8, nvfp4, marlin-24 or dense float)")
        groups = list((q.get("config_groups") or {}).values())
        if len(groups) != 1:
            raise HFImportError(f"quantization_config.config_groups: {len(groups)} groups; one scheme for every "
                                "linear is read")
        weights = groups[0].get("weights") or {}
        for key in ("input_activations", "output_activations"):
            if groups[0].get(key):
                raise HFImportError(f"quantization_config.config_groups.*.{key}: quantized activations are not read")
        if q.get("kv_cache_scheme"):
            raise HFImportError("quantization_config.kv_cache_scheme: a quantized KV cache is not read")
        if weights.get("type") != "int" or weights.get("num_bits") not in COMPRESSED_TENSORS_BITS:
            raise HFImportError(f"quantization_config.config_groups.*.weights: type {weights.get('type')!r} with "
                                f"{weights.get('num_bits')!r} bits; int with {COMPRESSED_TENSORS_BITS} bits is read")
        if not weights.get("symmetric", True):
            raise HFImportError("quantization_config.config_groups.*.weights.symmetric false: asymmetric "
                                "compressed-tensors weights are not read")
        if weights.get("strategy") not in ("group", "channel"):
            raise HFImportError(f"quantization_config.config_groups.*.weights.strategy {weights.get('strategy')!r}: "
                                "group or channel is read")
        size = weights.get("group_size") if weights.get("strategy") == "group" else -1
        return "compressed-tensors", Scheme(weights["num_bits"], int(size), True, False), 0
    if method == "awq":
        if str(q.get("version", "gemm")).lower() != "gemm":
            raise HFImportError(f"quantization_config.version {q.get('version')!r}: AWQ's GEMM packing is read "
                                "(not gemv, marlin or exllama repacks)")
        if q.get("bits", q.get("w_bit")) != 4 or not q.get("zero_point", True):
            raise HFImportError("quantization_config.bits / zero_point: AWQ import reads 4-bit with zero points")
        return "awq", Scheme(4, int(q.get("group_size", q.get("q_group_size", 128))), False, False), 0
    raise HFImportError(f"quantization_config.quant_method {method!r}: jaxq reads gptq, compressed-tensors and awq")


# ------------------------------------------------------------------ names

def hf_module(path: str) -> str:
    """The HF module name of a jaxq parameter path ("layers/3/mlp/up_proj/kernel" ->
    "model.layers.3.mlp.up_proj"; "embed_tokens/embedding" -> "model.embed_tokens")."""
    parts = path.split("/")
    if parts[0] == "layers":
        inner = tuple(parts[2:])
        name = next(hf for hf, ours in HF_LAYER_NAMES.items() if ours == inner)
        return f"model.layers.{parts[1]}.{name}"
    return {"embed_tokens": "model.embed_tokens", "norm": "model.norm", "lm_head": "lm_head"}[parts[0]]


def _jaxq_path(module: str) -> tuple:
    """The params path of an HF module name (the inverse of `hf_module`)."""
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", module)
    if m and m.group(2) in HF_LAYER_NAMES:
        return ("layers", int(m.group(1))) + HF_LAYER_NAMES[m.group(2)]
    globals_ = {"model.embed_tokens": ("embed_tokens", "embedding"), "model.norm": ("norm", "scale"),
                "lm_head": ("lm_head", "kernel")}
    if module in globals_:
        return globals_[module]
    raise HFImportError(f"unexpected module {module!r} in a quantized LLaMA-family checkpoint")


# ------------------------------------------------------------------ directories

@dataclasses.dataclass(frozen=True)
class HFExportSummary:
    path: Path
    format: str
    quantized: int
    float_tensors: int
    bytes: int

    def describe(self) -> str:
        return (f"wrote {self.path}: {self.format}, {self.quantized} quantized linears, {self.float_tensors} "
                f"float tensors, {self.bytes} bytes of safetensors")


def check_destination(path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """The directory to write, checked before any work."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise HFExportError(f"{out} is a file; name a directory to write the Hugging Face checkpoint into")
    if not out.parent.is_dir():
        raise HFExportError(f"cannot write {out}: directory {out.parent} does not exist")
    if not os.access(out.parent, os.W_OK):
        raise HFExportError(f"cannot write {out}: directory {out.parent} is not writable")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise HFExportError(f"{out} exists and is not empty; choose another directory or pass --overwrite "
                            "(overwrite=True) to replace it")
    return out


def _tensors(lm: LanguageModel, fmt: str, gptq_version: int) -> tuple[dict[str, np.ndarray], dict[str, Any], int]:
    """(safetensors name -> array, quantization_config, quantized linears) of the model."""
    leaves = tree.flatten(lm.params)[0]
    quantized = [(path, leaf) for path, leaf in leaves if tree.is_format(leaf)]
    other = [path for path, leaf in quantized if not isinstance(leaf, UniformQ)]
    if other:
        raise HFExportError(f"{other[0]}: {type(dict(quantized)[other[0]]).__name__} weights have no GPTQ, AWQ or "
                            "compressed-tensors form (integer grids only: UniformQ from RTN, GPTQ, AWQ, ...); "
                            "what exports: uniform integer-zero or symmetric 2/4/8-bit (GPTQ), 4-bit grouped (AWQ), "
                            "symmetric 2/3/4/8-bit (compressed-tensors)")
    if not quantized:
        raise HFExportError("the model has no quantized weights; save a float model with transformers instead")
    outside = [path for path, _ in quantized if not path.startswith("layers/")]
    if outside:
        raise HFExportError(f"{outside[0]} is quantized; these exports quantize the block linears only and keep the "
                            "embeddings and the head in 16-bit: keep it float (--keep-float)")
    schemes = {scheme_of(q) for _, q in quantized}
    if len(schemes) > 1:
        listing = "; ".join(sorted(f"{s.bits}-bit {'per-channel' if s.group_size <= 0 else f'g{s.group_size}'} "
                                   f"{'sym' if s.symmetric else 'asym'}{' act-order' if s.act_order else ''}"
                                   for s in schemes))
        raise HFExportError(f"the quantized linears use different schemes ({listing}); a {fmt} config records one "
                            "(mixed precision does not export here)")
    scheme = schemes.pop()
    names = {path: hf_module(path) for path, _ in leaves}
    float_linears = [names[p] for p, leaf in leaves if p.startswith("layers/") and p.endswith("/kernel")
                     and not tree.is_format(leaf)]
    if fmt in ("gptq", "awq") and float_linears:
        raise HFExportError(f"{float_linears[0]} is kept float in a block; {fmt.upper()} loaders quantize the same "
                            "linears in every block: export with --format compressed-tensors (its ignore list)")
    out: dict[str, np.ndarray] = {}
    for path, leaf in leaves:
        name = names[path]
        if tree.is_format(leaf):
            parts = (gptq_tensors(leaf, gptq_version, name) if fmt == "gptq" else
                     awq_tensors(leaf, name) if fmt == "awq" else compressed_tensors_tensors(leaf, name))
            out.update({f"{name}.{key}": value for key, value in parts.items()})
        else:
            value = np.asarray(jax.device_get(leaf), np.float32)
            out[f"{name}.weight"] = to_fp16(value.T if path.endswith("/kernel") else value, name)
    if fmt == "gptq":
        config = _gptq_config(scheme, gptq_version, sorted({names[p].split(".", 3)[3] for p, _ in quantized}))
    elif fmt == "awq":
        config = _awq_config(scheme)
    else:
        config = _compressed_tensors_config(scheme, ["lm_head", *float_linears])
    return out, config, len(quantized)


def export_hf(lm: LanguageModel, path: str | os.PathLike, *, fmt: str = "compressed-tensors", gptq_version: int = 1,
              overwrite: bool = False) -> HFExportSummary:
    """Write `lm` (quantized params) as a Hugging Face directory in `fmt` ("compressed-tensors",
    "gptq" or "awq"): config.json with its quantization_config, model.safetensors, and the
    tokenizer's files."""
    from safetensors.numpy import save_file

    if fmt not in FORMATS:
        raise HFExportError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    if gptq_version not in (1, 2):
        raise HFExportError(f"GPTQ checkpoint version {gptq_version!r}: 1 (zeros minus one) or 2")
    out = check_destination(path, overwrite=overwrite)
    try:
        hf_config = lm.config.to_hf()
    except UnsupportedModelError as err:
        raise HFExportError(f"{err}; Hugging Face checkpoints take weight-only models") from None
    tensors, quantization_config, count = _tensors(lm, fmt, gptq_version)
    hf_config.update(torch_dtype="float16", dtype="float16", quantization_config=quantization_config)
    temp = out.with_name(f".{out.name}.{uuid.uuid4().hex}.tmp")
    temp.mkdir()
    try:
        # safetensors writes an array's memory as is: a transposed view must be made C-ordered first
        save_file({name: np.ascontiguousarray(value) for name, value in tensors.items()},
                  str(temp / "model.safetensors"), metadata={"format": "pt"})
        (temp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        if lm.tokenizer is not None:
            lm.tokenizer.save_pretrained(str(temp))
        _replace_directory(temp, out)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    floats = sum(1 for name in tensors if name.endswith(".weight"))
    return HFExportSummary(out, fmt, count, floats, (out / "model.safetensors").stat().st_size)


def _replace_directory(temp: Path, out: Path) -> None:
    """Move the finished directory `temp` to `out`; an existing `out` is removed only after."""
    if not out.exists():
        os.replace(temp, out)
        return
    old = out.with_name(f".{out.name}.{uuid.uuid4().hex}.old")
    os.replace(out, old)
    try:
        os.replace(temp, out)
    except BaseException:
        os.replace(old, out)  # the previous directory back where it was
        raise
    shutil.rmtree(old)


def _module_tensors(path: Path) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """(module name, {suffix: array}) of every module in the directory's safetensors files."""
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise HFImportError(f"{path} has config.json but no *.safetensors weights")
    modules: dict[str, dict[str, np.ndarray]] = {}
    for file in files:
        with safe_open(str(file), framework="flax") as f:  # numpy's reader has no bfloat16
            for name in f.keys():
                module, _, suffix = name.rpartition(".")
                modules.setdefault(module, {})[suffix] = np.asarray(f.get_tensor(name))
    yield from modules.items()


def load_quantized_params(path: str | os.PathLike, config: LlamaConfig, quantization_config: dict[str, Any]
                          ) -> dict[tuple, Any]:
    """{params path: array or UniformQ} of a quantized HF directory (`models.load` assembles it)."""
    fmt, scheme, version = scheme_from_config(quantization_config)
    dtype = config.param_dtype
    out: dict[tuple, Any] = {}
    for module, parts in _module_tensors(Path(path)):
        if module.endswith("rotary_emb"):
            continue
        key = _jaxq_path(module)
        bias = parts.pop("bias", None)  # AutoGPTQ writes zero biases into bias-free models
        if bias is not None and np.any(np.asarray(bias, np.float32) != 0):
            raise HFImportError(f"{module}.bias: a nonzero bias; LLaMA-family linears have none")
        if "weight" in parts and len(parts) == 1:
            value = np.asarray(parts["weight"], np.float32).astype(dtype)
            if key == ("lm_head", "kernel") and config.tie_word_embeddings:
                continue
            out[key] = value.T if key[-1] == "kernel" else value
        elif fmt == "gptq":
            out[key] = from_gptq(parts, scheme, version, module, dtype)
        elif fmt == "awq":
            out[key] = from_awq(parts, scheme, module, dtype)
        else:
            out[key] = from_compressed_tensors(parts, scheme, module, dtype)
    return out
