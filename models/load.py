"""Load a LLaMA-family model from a zoo name, a Hugging Face directory, a Hub id or a GGUF file."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import jax.numpy as jnp
import numpy as np

from models import zoo
from models.config import LlamaConfig, RopeScaling, UnsupportedModelError
from models.language_model import LanguageModel, Params, abstract_params
from models.tokenizer import gguf_tokenizer
from models.zoo import ModelNotFoundError

HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")
HF_LAYER_NAMES = {
    "input_layernorm": ("input_layernorm", "scale"),
    "post_attention_layernorm": ("post_attention_layernorm", "scale"),
    **{f"self_attn.{p}": ("self_attn", p, "kernel") for p in ("q_proj", "k_proj", "v_proj", "o_proj")},
    **{f"mlp.{p}": ("mlp", p, "kernel") for p in ("gate_proj", "up_proj", "down_proj")},
}
GGUF_LAYER = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
GGUF_LAYER_NAMES = {
    "attn_norm": ("input_layernorm", "scale"),
    "ffn_norm": ("post_attention_layernorm", "scale"),
    "attn_q": ("self_attn", "q_proj", "kernel"),
    "attn_k": ("self_attn", "k_proj", "kernel"),
    "attn_v": ("self_attn", "v_proj", "kernel"),
    "attn_output": ("self_attn", "o_proj", "kernel"),
    "ffn_gate": ("mlp", "gate_proj", "kernel"),
    "ffn_up": ("mlp", "up_proj", "kernel"),
    "ffn_down": ("mlp", "down_proj", "kernel"),
}
GGUF_GLOBAL_NAMES = {
    "token_embd.weight": ("embed_tokens", "embedding"),
    "output_norm.weight": ("norm", "scale"),
    "output.weight": ("lm_head", "kernel"),
}


def load(name_or_path: str | os.PathLike, *, dtype: str = "float32", param_dtype: str = "float32",
         tokenizer: bool = True) -> LanguageModel:
    """Load a model by zoo name (`smollm2-135m`), local HF directory, `.gguf` file or Hub id.

    dtype: compute dtype; param_dtype: dtype float weights are stored in.
    """
    name = str(name_or_path)
    options = dict(dtype=dtype, param_dtype=param_dtype, tokenizer=tokenizer)
    if name in zoo.ZOO:
        return load_gguf(zoo.resolve(name), **options)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return load_gguf(path, **options)
    if path.is_dir():
        if (path / "config.json").is_file():
            return load_hf_dir(path, **options)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return load_gguf(ggufs[0], **options)
        raise ModelNotFoundError(
            f"directory {path} holds neither config.json (+ *.safetensors) nor exactly one .gguf file")
    if path.exists():
        raise ModelNotFoundError(f"{path} is not a model: expected a .gguf file or a directory")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not name.startswith((".", "/")):
        return load_hf_dir(_download_from_hub(name), **options)
    raise ModelNotFoundError(
        f"no model {name!r}: not a zoo name ({', '.join(zoo.ZOO)}), not an existing path, "
        "not a Hub id of the form org/name")


def _download_from_hub(repo_id: str) -> Path:
    """Fetch config, safetensors and tokenizer files of a Hub repo; a clear error when offline."""
    import huggingface_hub
    try:
        return Path(huggingface_hub.snapshot_download(
            repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))
    except Exception as err:  # network, auth and offline errors all mean the same thing here
        raise ModelNotFoundError(
            f"could not fetch {repo_id!r} from the Hugging Face Hub ({type(err).__name__}: {err}). "
            "Without a network, pass a local directory holding config.json and *.safetensors "
            "(e.g. one written by save_pretrained) or a .gguf file instead.") from None


def _assemble(config: LlamaConfig, tensors: Iterator[tuple[tuple, np.ndarray | Any]], source: str) -> Params:
    """Place (path, array) pairs into the model's params tree, checking names and shapes."""
    expected = abstract_params(config)
    params: Params = {}
    for path, value in tensors:
        node = expected
        for key in path:
            if not isinstance(node, dict) or key not in node:
                raise UnsupportedModelError(f"{source}: unexpected tensor for {'/'.join(map(str, path))}")
            node = node[key]
        if tuple(value.shape) != tuple(node.shape):
            raise UnsupportedModelError(
                f"{source}: tensor {'/'.join(map(str, path))} has shape {tuple(value.shape)}, "
                f"config says {tuple(node.shape)}")
        quantized = hasattr(value, "dequantize")  # a jaxq format read from a quantized checkpoint: placed as is
        if not quantized and jnp.issubdtype(value.dtype, jnp.floating) and not np.isfinite(np.asarray(value)).all():
            raise UnsupportedModelError(
                f"{source}: tensor {'/'.join(map(str, path))} holds NaN or Inf; the checkpoint is damaged")
        target = params
        for key in path[:-1]:
            target = target.setdefault(key, {})
        target[path[-1]] = value if quantized else jnp.asarray(value, config.param_dtype)
    missing = [p for p in _leaf_paths(expected) if _get(params, p) is None]
    if missing:
        shown = ", ".join("/".join(map(str, p)) for p in missing[:5])
        raise UnsupportedModelError(f"{source}: {len(missing)} tensors missing, e.g. {shown}")
    return params


def _leaf_paths(tree: dict, prefix: tuple = ()) -> list[tuple]:
    out = []
    for k, v in tree.items():
        out += _leaf_paths(v, prefix + (k,)) if isinstance(v, dict) else [prefix + (k,)]
    return out


def _get(tree: dict, path: tuple):
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


# ---------------------------------------------------------------- Hugging Face directories

def load_hf_dir(path: str | os.PathLike, *, dtype: str = "float32", param_dtype: str = "float32",
                tokenizer: bool = True) -> LanguageModel:
    """A `save_pretrained` directory: config.json + model.safetensors (or a sharded index)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{path}/config.json not found")
    try:
        hf_config = json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UnsupportedModelError(f"{path / 'config.json'} is not valid JSON: {err}") from None
    try:
        config = LlamaConfig.from_hf(hf_config, dtype=dtype, param_dtype=param_dtype)
    except UnsupportedModelError as err:
        raise UnsupportedModelError(f"{path / 'config.json'}: {err}") from None
    if "quantization_config" in hf_config:  # GPTQ / compressed-tensors: read into jaxq's formats, not dequantized
        from jaxq.interop import hf_quantized

        tensors = hf_quantized.load_quantized_params(path, config, hf_config["quantization_config"]).items()
    else:
        tensors = _hf_tensors(path, config)
    params = _assemble(config, iter(tensors), str(path))
    tok = _hf_tokenizer(path) if tokenizer else None
    return LanguageModel(config=config, params=params, tokenizer=tok, source=str(path))


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / f for f in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"{path} has config.json but no *.safetensors weights")
    return files


def _hf_tensors(path: Path, config: LlamaConfig) -> Iterator[tuple[tuple, Any]]:
    from safetensors import safe_open
    from safetensors import SafetensorError
    for file in _safetensors_files(path):
        try:
            with safe_open(str(file), framework="flax") as f:
                for name in f.keys():
                    key = _hf_param_path(name, config)
                    if key is None:
                        continue
                    tensor = f.get_tensor(name)
                    yield key, tensor.T if key[-1] == "kernel" else tensor
        except (SafetensorError, OSError) as err:
            raise UnsupportedModelError(
                f"{file} is not a readable safetensors file ({err}); it may be truncated or "
                "still downloading: fetch or save it again") from None


def _hf_param_path(name: str, config: LlamaConfig) -> tuple | None:
    """Our params path for a Hugging Face tensor name (None: a tensor we derive, not load)."""
    if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and config.tie_word_embeddings):
        return None
    if name == "model.embed_tokens.weight":
        return ("embed_tokens", "embedding")
    if name == "model.norm.weight":
        return ("norm", "scale")
    if name == "lm_head.weight":
        return ("lm_head", "kernel")
    m = HF_LAYER.fullmatch(name)
    if m and m.group(2) in HF_LAYER_NAMES:
        return ("layers", int(m.group(1))) + HF_LAYER_NAMES[m.group(2)]
    raise UnsupportedModelError(f"unexpected tensor {name!r} in a LLaMA-family checkpoint")


def _hf_tokenizer(path: Path):
    from transformers import AutoTokenizer
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None
    return AutoTokenizer.from_pretrained(str(path))


# ---------------------------------------------------------------- GGUF files

def load_gguf(path: str | os.PathLike, *, dtype: str = "float32", param_dtype: str = "float32",
              tokenizer: bool = True) -> LanguageModel:
    """A llama.cpp GGUF file: tensors dequantized to float, q/k rows un-permuted back to HF's
    RoPE layout, tokenizer rebuilt from the file's metadata (`models.tokenizer`, no torch)."""
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"GGUF file {path} not found")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as err:
        raise UnsupportedModelError(f"{path} is not a readable GGUF file: {err}") from None
    config = _gguf_config(reader, path, dtype=dtype, param_dtype=param_dtype)
    params = _assemble(config, _gguf_tensors(reader, config, path), str(path))
    tok = gguf_tokenizer(reader, path) if tokenizer else None
    return LanguageModel(config=config, params=params, tokenizer=tok, source=str(path))


def _field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _gguf_config(reader: gguf.GGUFReader, path: Path, **dtypes: str) -> LlamaConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise UnsupportedModelError(
            f"{path}: GGUF architecture {arch!r} is not supported; jaxq loads 'llama' GGUFs "
            "(LLaMA-2/3, Mistral, SmolLM2)")
    names = {t.name for t in reader.tensors}

    def key(suffix: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{suffix}", default)

    heads = key("attention.head_count")
    hidden = key("embedding_length")
    vocab = key("vocab_size") or len(_field(reader, "tokenizer.ggml.tokens", []))
    scaling = None
    if key("rope.scaling.type") in ("linear",):
        scaling = RopeScaling(type="linear", factor=float(key("rope.scaling.factor")))
    freq_factors = None
    if "rope_freqs.weight" in names:
        tensor = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
        freq_factors = tuple(float(v) for v in np.asarray(tensor.data, np.float32).ravel())
    return LlamaConfig(
        vocab_size=int(vocab),
        hidden_size=int(hidden),
        intermediate_size=int(key("feed_forward_length")),
        num_layers=int(key("block_count")),
        num_heads=int(heads),
        num_kv_heads=int(key("attention.head_count_kv", heads)),
        head_dim=int(key("attention.key_length", hidden // heads)),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        rope_freq_factors=freq_factors,
        max_position_embeddings=int(key("context_length", 4096)),
        tie_word_embeddings="output.weight" not in names,
        sliding_window=key("attention.sliding_window"),
        architecture="llama",
        **dtypes,
    )


def _gguf_tensors(reader: gguf.GGUFReader, config: LlamaConfig, path: Path) -> Iterator[tuple[tuple, np.ndarray]]:
    for tensor in reader.tensors:
        if tensor.name == "rope_freqs.weight":
            continue
        key = GGUF_GLOBAL_NAMES.get(tensor.name)
        m = GGUF_LAYER.fullmatch(tensor.name)
        if key is None and m and m.group(2) in GGUF_LAYER_NAMES:
            key = ("layers", int(m.group(1))) + GGUF_LAYER_NAMES[m.group(2)]
        if key is None:
            raise UnsupportedModelError(f"{path}: unexpected tensor {tensor.name!r} in a llama GGUF")
        try:
            weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:
            raise UnsupportedModelError(
                f"{path}: tensor {tensor.name!r} is stored as GGUF type {tensor.tensor_type.name}, "
                "which cannot be dequantized (gguf-py has no dequantizer for it); re-export the "
                "model with another quantization type (F16, Q8_0, Q4_K, ...)") from None
        if key[-1] == "kernel":
            name = key[-2]
            if name == "q_proj":
                weight = unpermute_rope_rows(weight, config.num_heads)
            elif name == "k_proj":
                weight = unpermute_rope_rows(weight, config.num_kv_heads)
            weight = weight.T  # GGUF/HF (out, in) -> Flax (in, out)
        yield key, weight


def unpermute_rope_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs -> HF's half split).

    weight: (heads*head_dim, in) as stored in GGUF; returns the same shape in HF row order.
    """
    out, rest = weight.shape[0], weight.shape[1:]
    return weight.reshape(heads, out // heads // 2, 2, *rest).swapaxes(1, 2).reshape(weight.shape)
