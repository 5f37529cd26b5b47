"""The tokenizer of a GGUF file, rebuilt from its metadata without torch.

transformers' `AutoTokenizer.from_pretrained(dir, gguf_file=...)` reads the metadata with a reader
that imports torch. Only the *reading* needs torch: the conversion from llama.cpp's metadata to a
`tokenizers` fast tokenizer (`convert_gguf_tokenizer`) is plain Python. So the metadata is read
here with the `gguf` package, arranged exactly as transformers' `get_gguf_tokenizer` arranges it
(same key mapping, same defaults), and handed to transformers' converter. The result is the same
tokenizer class AutoTokenizer returns, with the same special tokens and flags.

Supported `tokenizer.ggml.model` values: `gpt2` (byte-level BPE: SmolLM2, LLaMA-3) and `llama`
(SentencePiece BPE with byte fallback: LLaMA-2, Mistral).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf

from models.config import UnsupportedModelError

SUPPORTED_TOKENIZER_MODELS = ("gpt2", "llama")
# Special-token names of the tokenizer and the metadata key (under tokenizer.ggml.) of their ids.
SPECIAL_TOKEN_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
                     "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}


def _converter():
    """(GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer) from transformers, both torch-free."""
    try:  # transformers >= 5.2x keeps GGUF support in a package of its own
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer)
    except ImportError:  # earlier releases: one module
        from transformers.integrations.ggml import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer
    return GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer


def _metadata(reader: gguf.GGUFReader, key: str) -> Any:
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def gguf_tokenizer_fields(reader: gguf.GGUFReader, source: str | Path) -> tuple[str, dict, dict]:
    """(architecture, tokenizer_dict, tokenizer_config) as transformers' `get_gguf_tokenizer`.

    tokenizer_dict: vocabulary (`tokens`), `merges`, `scores`, `token_type`, special-token ids,
    `tokenizer_type` (the GGUF tokenizer model) and `pre_tokenizer_type`;
    tokenizer_config: `add_bos_token`/`add_eos_token`, `chat_template`, special tokens as strings.
    """
    mapping, _ = _converter()
    tokenizer_type = _metadata(reader, "tokenizer.ggml.model")
    if tokenizer_type is None:
        raise UnsupportedModelError(
            f"{source}: the GGUF file carries no tokenizer (no tokenizer.ggml.model); "
            "load it with tokenizer=False and tokenize elsewhere")
    if tokenizer_type not in SUPPORTED_TOKENIZER_MODELS:
        raise UnsupportedModelError(
            f"{source}: GGUF tokenizer model {tokenizer_type!r} is not supported; jaxq builds "
            f"{' and '.join(map(repr, SUPPORTED_TOKENIZER_MODELS))} tokenizers (LLaMA-family files)")
    grouped = {group: {name: value for key, name in renames.items()
                       if (value := _metadata(reader, f"tokenizer.{key}")) is not None}
               for group, renames in mapping.items()}
    tokenizer, config = grouped["tokenizer"], grouped["tokenizer_config"]
    if tokenizer_type == "llama":  # llama.cpp adds BOS to a SentencePiece vocabulary unless told not to
        config.setdefault("add_bos_token", True)
    for name, key in SPECIAL_TOKEN_IDS.items():
        token_id = _metadata(reader, f"tokenizer.ggml.{key}")
        if token_id is not None and not 0 <= token_id < len(tokenizer["tokens"]):
            raise UnsupportedModelError(f"{source}: tokenizer.ggml.{key} = {token_id} is outside the vocabulary "
                                        f"of {len(tokenizer['tokens'])} tokens")
        config[name] = tokenizer["tokens"][token_id] if token_id is not None else None
    return str(_metadata(reader, "general.architecture")), tokenizer, config


def gguf_tokenizer(reader: gguf.GGUFReader, source: str | Path):
    """A transformers fast tokenizer (`PreTrainedTokenizerFast`) for the GGUF file behind `reader`."""
    from transformers import PreTrainedTokenizerFast

    _, convert = _converter()
    architecture, tokenizer_dict, config = gguf_tokenizer_fields(reader, source)
    backend, extra = convert(architecture, tokenizer_dict)
    return PreTrainedTokenizerFast(tokenizer_object=backend, name_or_path=str(source), **config, **extra)
