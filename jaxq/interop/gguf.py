"""Export a jaxq model to a llama.cpp GGUF file: the mirror of the GGUF reader in `models/load.py`.

    jaxq export --checkpoint runs/w4 --gguf smollm2-q4_1.gguf
    jaxq.interop.gguf.export_gguf(lm, "out.gguf")    # an in-memory models.LanguageModel

What exports, weight by weight (`UniformQ` with groups of 32 along the input axis, no act-order):
    4-bit, float offset (w = scale*q + zero)     -> Q4_1  (fp16 d = scale, fp16 m = zero)
    4-bit, symmetric    (w = scale*(q - 8))      -> Q4_0  (fp16 d = scale)
    8-bit, symmetric    (w = scale*(q - 128))    -> Q8_0  (fp16 d = scale, int8 q - 128)
    float (embedding, norms, linears kept float) -> F32, exactly (F16 would round them)
The file's weights are then exactly jaxq's `dequantize()`: GGUF holds fp16 scales and zeros, and
a scale or zero that is not an fp16 value is refused rather than rounded (jaxq stores them in
fp16 by default). An 8-bit code 0 becomes the int8 -128, outside llama.cpp's own quantizer's
[-127, 127] but inside what its Q8_0 dequantization and dot products compute.

Tensors are named as the reader maps them (`blk.N.attn_q.weight`, ...), in GGUF's (out, in) row
layout with q/k rows permuted to llama.cpp's interleaved RoPE layout (`permute_rope_rows`, the
inverse of `models.load.unpermute_rope_rows`); a tied head writes no `output.weight`. The
tokenizer metadata (`tokenizer.*`) is copied verbatim from the model's source GGUF when its
vocabulary is the model's; otherwise it is rebuilt from the tokenizer (byte-level BPE only) and
needs llama.cpp's pre-tokenizer name (`tokenizer_pre`), which no tokenizer.json records.
GGUF keeps the RoPE base and the RMS-norm epsilon as float32 (1e-5 reads back as 9.99999975e-06, the
value float32 computations use anyway). The file is written to a temporary file beside OUT and
renamed into place.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import uuid
from pathlib import Path
from typing import Any

import gguf
import jax
import numpy as np

from jaxq.formats.base import QuantizedArray
from jaxq.formats.uniform import UniformQ
from models.config import LlamaConfig
from models.language_model import LanguageModel
from models.load import GGUF_GLOBAL_NAMES, GGUF_LAYER_NAMES

QType = gguf.GGMLQuantizationType
BLOCK = 32  # weights per Q4_0 / Q4_1 / Q8_0 block
# (bits, zero point) of a g32 UniformQ -> its GGUF type
QUANT_TYPES = {(4, "float"): QType.Q4_1, (4, "none"): QType.Q4_0, (8, "none"): QType.Q8_0}
FILE_TYPES = {QType.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1, QType.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
              QType.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0}
EXPORTABLE = ("uniform w4 g32 float-offset (-> Q4_1), uniform w4 g32 sym (-> Q4_0), uniform w8 g32 sym (-> Q8_0) "
              "without act-order, and float weights (-> F32)")
# a UniformQ's codes, uint8 [in, out]: one compilation per weight shape instead of one per operation
_stored_codes = jax.jit(lambda q: q.stored_codes())
# metadata value: (key, value, GGUF type, element type of an array)
Field = tuple[str, Any, gguf.GGUFValueType, gguf.GGUFValueType | None]


class ExportError(ValueError):
    """A model, weight or destination that cannot be exported to GGUF, with the reason."""


@dataclasses.dataclass(frozen=True)
class ExportSummary:
    """What `export_gguf` wrote."""

    path: Path
    tensors: int
    bytes: int                # size of the written file
    types: dict[str, int]     # GGUF tensor type name -> count

    def describe(self) -> str:
        types = ", ".join(f"{count} {name}" for name, count in sorted(self.types.items()))
        return f"wrote {self.path}: {self.tensors} tensors ({types}), {self.bytes} bytes"


# ------------------------------------------------------------------ entry points

def export_checkpoint(directory: str | os.PathLike, path: str | os.PathLike, *, overwrite: bool = False,
                      tokenizer_pre: str | None = None) -> ExportSummary:
    """Export the newest checkpoint `jaxq quantize` wrote in `directory` to the GGUF file `path`."""
    from jaxq import checkpoint

    check_destination(path, overwrite=overwrite)
    return export_gguf(checkpoint.load(directory).language_model(), path, overwrite=overwrite,
                       tokenizer_pre=tokenizer_pre)


def export_gguf(lm: LanguageModel, path: str | os.PathLike, *, overwrite: bool = False,
                tokenizer_pre: str | None = None) -> ExportSummary:
    """Write `lm` (float or `UniformQ` params, see the module docstring) as a llama GGUF file.

    tokenizer_pre: llama.cpp's pre-tokenizer name (`tokenizer.ggml.pre`, e.g. "llama-bpe" for
    LLaMA-3), needed only when the tokenizer metadata cannot be copied from a source GGUF.
    Everything is checked before the file is created; an existing `path` needs `overwrite`.
    """
    out = check_destination(path, overwrite=overwrite)
    check_config(lm.config)
    metadata = model_metadata(lm.config, lm.source) + tokenizer_metadata(lm, tokenizer_pre)
    tensors = [(name, *encode_tensor(lm.config, param_path, _leaf(lm.params, param_path)))
               for name, param_path in tensor_plan(lm.config)]
    if lm.config.rope_freq_factors is not None:  # LLaMA-3.1's scaling, as GGUF files carry it
        tensors.append(("rope_freqs.weight", np.asarray(lm.config.rope_freq_factors, np.float32), QType.F32))
    quantized = collections.Counter(qtype for _, _, qtype in tensors if qtype in FILE_TYPES)
    file_type = FILE_TYPES[quantized.most_common(1)[0][0]] if quantized else gguf.LlamaFileType.ALL_F32
    metadata.append(("general.file_type", int(file_type), gguf.GGUFValueType.UINT32, None))
    _write_atomically(out, metadata, tensors)
    return ExportSummary(path=out, tensors=len(tensors), bytes=out.stat().st_size,
                         types=dict(collections.Counter(qtype.name for _, _, qtype in tensors)))


def check_destination(path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """The GGUF file to write, checked before any work: a `.gguf` name in an existing writable
    directory, not a directory itself, and not an existing file unless `overwrite`."""
    out = Path(path).expanduser()
    if out.suffix != ".gguf":
        raise ExportError(f"{out}: a GGUF file name must end in .gguf (models.load and llama.cpp look for it)")
    if out.is_dir():
        raise ExportError(f"{out} is a directory; name the .gguf file to write")
    if not out.parent.is_dir():
        raise ExportError(f"cannot write {out}: directory {out.parent} does not exist")
    if not os.access(out.parent, os.W_OK):
        raise ExportError(f"cannot write {out}: directory {out.parent} is not writable")
    if out.exists() and not overwrite:
        raise ExportError(f"{out} exists; choose another file or pass --overwrite (overwrite=True) to replace it")
    return out


def check_config(config: LlamaConfig) -> None:
    """Refuse what a llama GGUF cannot express: a rotated model, quantized activations or KV
    cache (they change how the model runs), and RoPE scalings other than none and linear."""
    changed = [f"{name}={getattr(config, name)!r}" for name in ("rotation", "activations", "kv_cache")
               if getattr(config, name) is not None]
    if changed:
        raise ExportError(f"the model config records {', '.join(changed)}: llama.cpp would run the weights without "
                          "the online rotations or activation / KV-cache quantization they need. GGUF export "
                          f"takes weight-only models; what exports: {EXPORTABLE}")
    if config.rope_scaling is not None and config.rope_scaling.type != "linear":
        raise ExportError(f"RoPE scaling {config.rope_scaling.type!r} is not exported yet (GGUF export writes none, "
                          "linear, and frequency factors read from a GGUF file)")


# ------------------------------------------------------------------ tensors

def tensor_plan(config: LlamaConfig) -> list[tuple[str, tuple]]:
    """[(GGUF tensor name, params path)] in the order written, named as `models.load` reads them;
    no `output.weight` for a tied head (llama.cpp then reuses `token_embd.weight`)."""
    globals_by_path = {path: name for name, path in GGUF_GLOBAL_NAMES.items()}
    plan = [("token_embd.weight", ("embed_tokens", "embedding"))]
    for layer in range(config.num_layers):
        plan += [(f"blk.{layer}.{name}.weight", ("layers", layer) + path) for name, path in GGUF_LAYER_NAMES.items()]
    plan.append((globals_by_path[("norm", "scale")], ("norm", "scale")))
    if not config.tie_word_embeddings:
        plan.append((globals_by_path[("lm_head", "kernel")], ("lm_head", "kernel")))
    return plan


def _leaf(params: dict, path: tuple) -> Any:
    node = params
    for key in path:
        if not isinstance(node, dict) or key not in node:
            raise ExportError(f"the params hold no {'/'.join(map(str, path))}, which the model config needs")
        node = node[key]
    return node


def encode_tensor(config: LlamaConfig, path: tuple, leaf: Any) -> tuple[np.ndarray, QType]:
    """(data, GGUF type) of one params leaf: F32 in GGUF's layout, or uint8 [out, blocks * block
    bytes] for a quantized kernel; kernels become (out, in) rows, q/k rows llama.cpp's RoPE order."""
    where = "/".join(map(str, path))
    heads = {"q_proj": config.num_heads, "k_proj": config.num_kv_heads}.get(path[-2])
    if isinstance(leaf, QuantizedArray):
        if path[-1] != "kernel":
            raise ExportError(f"{where} is quantized ({leaf.format_name}: {leaf.describe()}); GGUF export "
                              f"quantizes linear kernels only. What exports: {EXPORTABLE}")
        rows, qtype = uniform_blocks(leaf, where)
    else:
        rows, qtype = np.asarray(leaf, np.float32), QType.F32
        if path[-1] == "kernel":
            rows = rows.T  # Flax (in, out) -> GGUF (out, in)
    if heads is not None:
        rows = permute_rope_rows(rows, heads)
    return np.ascontiguousarray(rows), qtype


def permute_rope_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """HF's half-split q/k rows -> llama.cpp's interleaved RoPE pairs (`convert_hf_to_gguf`'s
    permute), the inverse of `models.load.unpermute_rope_rows`. weight: (heads*head_dim, ...)."""
    out, rest = weight.shape[0], weight.shape[1:]
    return weight.reshape(heads, 2, out // heads // 2, *rest).swapaxes(1, 2).reshape(weight.shape)


def uniform_blocks(q: QuantizedArray, where: str) -> tuple[np.ndarray, QType]:
    """A UniformQ kernel (in, out) -> (uint8 [out, in/32 * block bytes] in llama.cpp's block
    layout, its GGUF type); anything else GGUF cannot hold exactly is an ExportError."""
    qtype = gguf_type(q, where)
    in_features, out_features = q.shape
    groups = in_features // BLOCK
    codes = np.asarray(_stored_codes(q)).T  # [out, in]
    scale = fp16_exact(q.scale, (groups, out_features), f"{where} scale").T  # [out, groups]
    if qtype == QType.Q8_0:
        return q8_0_blocks(codes, scale), qtype
    zero = fp16_exact(q.zero, (groups, out_features), f"{where} zero").T if qtype == QType.Q4_1 else None
    return q4_blocks(codes, scale, zero), qtype


def gguf_type(q: QuantizedArray, where: str) -> QType:
    """The GGUF type holding quantized weight `q` exactly, or an ExportError naming why none does."""
    kind = f"{q.format_name}: {q.describe()}"
    if not isinstance(q, UniformQ):
        raise ExportError(f"{where} is {kind}, which GGUF cannot hold; what exports: {EXPORTABLE}")
    if q.perm is not None:
        raise ExportError(f"{where} is {kind}: GGUF has no input permutation (act-order); quantize without "
                          f"--act-order. What exports: {EXPORTABLE}")
    qtype = QUANT_TYPES.get((q.bits, q.zero_point))
    if qtype is None or q.group_size != BLOCK or q.shape[0] % BLOCK:
        raise ExportError(f"{where} is {kind} ({q.shape[0]} inputs); llama.cpp's Q4_0/Q4_1/Q8_0 blocks are 32 "
                          f"consecutive inputs with an fp16 scale (and float offset). What exports: {EXPORTABLE}")
    return qtype


def fp16_exact(values: Any, shape: tuple[int, int], where: str) -> np.ndarray:
    """values broadcast to `shape` as float16, refused unless every value is an fp16 value."""
    exact = np.broadcast_to(np.asarray(values, np.float32), shape)
    half = exact.astype(np.float16)
    bad = int(np.count_nonzero(half.astype(np.float32) != exact))
    if bad:
        raise ExportError(f"{where}: {bad} of {exact.size} values ({np.asarray(values).dtype}) are not float16 values, "
                          "and GGUF stores them in fp16, so the file would not hold these weights; quantize with "
                          "scale_dtype='float16' (the default)")
    return half


def q4_blocks(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray | None) -> np.ndarray:
    """Q4_0 (zero None) or Q4_1 blocks: codes uint8 [out, in] in [0, 16), scale / zero float16
    [out, in/32] -> uint8 [out, in/32 * (18 or 20)]. A block is d (fp16), m (Q4_1 only, fp16),
    then 16 bytes whose byte j holds code j in its low nibble and code j + 16 in its high one."""
    out, in_features = codes.shape
    pairs = codes.reshape(out, in_features // BLOCK, 2, BLOCK // 2)
    nibbles = pairs[:, :, 0] | (pairs[:, :, 1] << 4)
    parts = [_fp16_bytes(scale)] + ([] if zero is None else [_fp16_bytes(zero)]) + [nibbles]
    return np.concatenate(parts, axis=-1).reshape(out, -1)


def q8_0_blocks(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Q8_0 blocks: codes uint8 [out, in] (w = scale*(q - 128)), scale float16 [out, in/32] ->
    uint8 [out, in/32 * 34]: d (fp16) then the 32 int8 values q - 128."""
    out, in_features = codes.shape
    signed = (codes.astype(np.int16) - 128).astype(np.int8).view(np.uint8)
    return np.concatenate([_fp16_bytes(scale), signed.reshape(out, in_features // BLOCK, BLOCK)],
                          axis=-1).reshape(out, -1)


def _fp16_bytes(values: np.ndarray) -> np.ndarray:
    """float16 [out, groups] -> its little-endian bytes, uint8 [out, groups, 2]."""
    return np.ascontiguousarray(values, "<f2").view(np.uint8).reshape(*values.shape, 2)


# ------------------------------------------------------------------ metadata

def model_metadata(config: LlamaConfig, source: str) -> list[Field]:
    """The `general.*` and `llama.*` keys: what `models.load` and llama.cpp read back."""
    u32, f32, string = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.STRING
    arch = "llama"  # llama.cpp runs Mistral as llama too
    fields: list[Field] = [
        ("general.name", Path(source).stem if source else "jaxq export", string, None),
        ("general.quantization_version", gguf.GGML_QUANT_VERSION, u32, None),
        (f"{arch}.context_length", config.max_position_embeddings, u32, None),
        (f"{arch}.embedding_length", config.hidden_size, u32, None),
        (f"{arch}.block_count", config.num_layers, u32, None),
        (f"{arch}.feed_forward_length", config.intermediate_size, u32, None),
        (f"{arch}.attention.head_count", config.num_heads, u32, None),
        (f"{arch}.attention.head_count_kv", config.num_kv_heads, u32, None),
        (f"{arch}.attention.key_length", config.head_dim, u32, None),
        (f"{arch}.attention.value_length", config.head_dim, u32, None),
        (f"{arch}.rope.dimension_count", config.head_dim, u32, None),
        (f"{arch}.rope.freq_base", config.rope_theta, f32, None),
        (f"{arch}.attention.layer_norm_rms_epsilon", config.rms_norm_eps, f32, None),
        (f"{arch}.vocab_size", config.vocab_size, u32, None),
    ]
    if config.rope_scaling is not None:  # linear (check_config refuses the others)
        fields += [(f"{arch}.rope.scaling.type", "linear", string, None),
                   (f"{arch}.rope.scaling.factor", config.rope_scaling.factor, f32, None)]
    if config.sliding_window is not None:  # read back by models.load; llama.cpp's llama ignores it
        fields.append((f"{arch}.attention.sliding_window", config.sliding_window, u32, None))
    return fields


def tokenizer_metadata(lm: LanguageModel, tokenizer_pre: str | None = None) -> list[Field]:
    """The `tokenizer.*` keys: copied from the model's source GGUF when that file's vocabulary is
    the tokenizer's, else rebuilt from the tokenizer (`tokenizer_fields`)."""
    if lm.tokenizer is None:
        raise ExportError("the model has no tokenizer, and a GGUF file without one cannot run in llama.cpp; "
                          "load or save the model with its tokenizer")
    tokens = vocabulary(lm.tokenizer)
    if len(tokens) != lm.config.vocab_size:
        raise ExportError(f"the tokenizer has {len(tokens)} tokens and the model {lm.config.vocab_size} embeddings; "
                          "GGUF needs one token per embedding row")
    source = source_gguf(lm.source)
    reason = f"the model's source {lm.source!r} is no GGUF file here" if lm.source else "the model records no source"
    if source is not None:
        reader = gguf.GGUFReader(str(source))
        listed = reader.fields.get("tokenizer.ggml.tokens")
        if listed is not None and listed.contents() == tokens:
            return [(key, field.contents(), field.types[0], field.types[1] if len(field.types) > 1 else None)
                    for key, field in reader.fields.items() if key.startswith("tokenizer.")]
        reason = f"the source GGUF {source} holds another vocabulary than the model's tokenizer"
    if tokenizer_pre is None:
        raise ExportError(f"GGUF's tokenizer.ggml.pre (llama.cpp's pre-tokenizer name) is missing: a tokenizer.json "
                          f"does not record it and {reason}, so it cannot be copied. Pass tokenizer_pre= "
                          "(`jaxq export --tokenizer-pre`; e.g. 'llama-bpe' for LLaMA-3, 'smollm' for SmolLM2; "
                          "llama.cpp's convert_hf_to_gguf.py lists them) or export from a checkpoint quantized "
                          "from a GGUF file")
    return tokenizer_fields(lm.tokenizer, tokenizer_pre)


def source_gguf(source: str) -> Path | None:
    """The GGUF file a model was loaded from, as `models.load` resolves `source` (zoo name, .gguf
    file, directory holding one), or None."""
    from models import zoo

    if source in zoo.ZOO:
        try:
            return zoo.resolve(source)
        except zoo.ModelNotFoundError:
            return None
    path = Path(source).expanduser() if source else None
    if path is None or not path.exists():
        return None
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        return ggufs[0] if len(ggufs) == 1 and not (path / "config.json").is_file() else None
    return path if path.suffix == ".gguf" else None


def vocabulary(tokenizer: Any) -> list[str]:
    """A transformers fast tokenizer's tokens in id order (added tokens included)."""
    vocab = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.get)
    if [vocab[t] for t in tokens] != list(range(len(tokens))):
        raise ExportError("the tokenizer's token ids are not 0..n-1 without gaps; GGUF lists tokens by position")
    return tokens


def tokenizer_fields(tokenizer: Any, pre: str) -> list[Field]:
    """`tokenizer.ggml.*` of a byte-level BPE tokenizer (GPT-2 style: SmolLM2, LLaMA-3), as
    llama.cpp's convert_hf_to_gguf writes them: tokens, token types (special added tokens CONTROL,
    other added tokens USER_DEFINED, the rest NORMAL), merges, special-token ids, add_bos/eos."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    model = state["model"]
    byte_level = "ByteLevel" in json.dumps([state.get("pre_tokenizer"), state.get("decoder")])
    if model["type"] != "BPE" or model.get("byte_fallback") or not byte_level:
        kind = f"{model['type']}" + (" with byte fallback (SentencePiece style)" if model.get("byte_fallback") else "")
        raise ExportError(f"the tokenizer is {kind}; GGUF export rebuilds byte-level BPE tokenizers only, and copies "
                          "others from the source GGUF file, which this model does not have")
    tokens = vocabulary(tokenizer)
    added = {t["id"]: t["special"] for t in state.get("added_tokens", [])}
    types = [int(gguf.TokenType.NORMAL if i not in added else
                 gguf.TokenType.CONTROL if added[i] else gguf.TokenType.USER_DEFINED) for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    array, string = gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING
    fields: list[Field] = [("tokenizer.ggml.model", "gpt2", string, None), ("tokenizer.ggml.pre", pre, string, None),
                           ("tokenizer.ggml.tokens", tokens, array, string),
                           ("tokenizer.ggml.token_type", types, array, gguf.GGUFValueType.INT32),
                           ("tokenizer.ggml.merges", merges, array, string)]
    ids = {name: getattr(tokenizer, f"{name}_token_id") for name in ("bos", "eos", "unk", "pad")}
    keys = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id", "pad": "padding_token_id"}
    fields += [(f"tokenizer.ggml.{keys[name]}", i, gguf.GGUFValueType.UINT32, None)
               for name, i in ids.items() if i is not None]
    plain = tokenizer.backend_tokenizer.encode("a", add_special_tokens=False).ids
    special = tokenizer.backend_tokenizer.encode("a", add_special_tokens=True).ids
    add_bos = ids["bos"] is not None and special[0] == ids["bos"] and plain[0] != ids["bos"]
    add_eos = ids["eos"] is not None and special[-1] == ids["eos"] and plain[-1] != ids["eos"]
    fields += [("tokenizer.ggml.add_bos_token", add_bos, gguf.GGUFValueType.BOOL, None),
               ("tokenizer.ggml.add_eos_token", add_eos, gguf.GGUFValueType.BOOL, None)]
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        fields.append(("tokenizer.chat_template", template, string, None))
    return fields


# ------------------------------------------------------------------ writing

def _write_atomically(out: Path, metadata: list[Field], tensors: list[tuple[str, np.ndarray, QType]]) -> None:
    """Write the GGUF file to a temporary file beside `out`, then rename it over `out`."""
    temp = out.with_name(f".{out.name}.{uuid.uuid4().hex}.tmp")  # same directory: os.replace is atomic
    writer = gguf.GGUFWriter(temp, "llama")
    try:
        for key, value, vtype, sub_type in metadata:
            writer.add_key_value(key, value, vtype, sub_type)
        for name, data, qtype in tensors:
            writer.add_tensor(name, data, raw_dtype=None if qtype == QType.F32 else qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(temp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(temp, out)
    except BaseException:
        writer.close()
        temp.unlink(missing_ok=True)
        raise
