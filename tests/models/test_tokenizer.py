"""GGUF tokenizers rebuilt without torch give the same ids as transformers' GGUF tokenizer."""

import gguf
import pytest
from transformers import AutoTokenizer

from jaxq import data
from models.config import UnsupportedModelError
from models.tokenizer import gguf_tokenizer

SAMPLES = ["the quick brown fox", " the  quick\n\nbrown", "théq ü 😀 <s> x", "", "hello</s>the"]


def reference_tokenizer(path):
    """transformers' own GGUF tokenizer (its metadata reader needs torch: test extra only)."""
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def write_sentencepiece_gguf(path, *, model="llama", eos=2):
    """A tokenizer-only llama GGUF shaped like LLaMA-2's: SentencePiece pieces with scores (no
    merges, as llama.cpp writes them), <unk>/<s>/</s>, and 256 byte-fallback tokens."""
    pieces = ["\u2581", "t", "h", "e", "q", "u", "i", "c", "k", "b", "r", "o", "w", "n", "f", "x",
              "\u2581t", "he", "\u2581the", "\u2581q", "ui", "ck", "\u2581qui", "\u2581quick", "ro", "ow",
              "\u2581b", "\u2581bro", "\u2581brown", "\u2581f", "ox", "\u2581fox"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = ([gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
             + [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * len(pieces))
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types([int(t) for t in types])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(eos)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def rebuilt(path):
    return gguf_tokenizer(gguf.GGUFReader(str(path)), path)


def test_smollm2_ids_equal_transformers_on_the_whole_wikitext2_texts(smollm):
    from models import zoo

    path = zoo.resolve("smollm2-135m")
    ours, theirs = smollm.tokenizer, reference_tokenizer(path)
    text = data.load_text(data.EVAL_SOURCE)
    ids = ours(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 200_000
    assert ids == theirs(text, add_special_tokens=False)["input_ids"]
    assert ours(text)["input_ids"] == theirs(text)["input_ids"]  # with special tokens
    calibration_text = data.load_text(data.CALIBRATION_SOURCE)
    assert ours(calibration_text, add_special_tokens=False)["input_ids"] == \
        theirs(calibration_text, add_special_tokens=False)["input_ids"]
    for sample in SAMPLES + ["<|im_start|>user\nhi<|im_end|>"]:
        assert ours(sample)["input_ids"] == theirs(sample)["input_ids"]  # with special tokens
    assert ours.decode(ids, clean_up_tokenization_spaces=False) == text
    assert (ours.bos_token, ours.eos_token, ours.unk_token, ours.pad_token) == (
        theirs.bos_token, theirs.eos_token, theirs.unk_token, theirs.pad_token)
    assert ours.add_bos_token == theirs.add_bos_token and ours.chat_template == theirs.chat_template


def test_sentencepiece_gguf_equals_transformers(tmp_path):
    path = write_sentencepiece_gguf(tmp_path / "spm.gguf")
    ours, theirs = rebuilt(path), reference_tokenizer(path)
    assert ours.add_bos_token and ours.bos_token == "<s>" and ours.unk_token == "<unk>"
    for sample in SAMPLES:
        for special in (False, True):
            assert ours(sample, add_special_tokens=special)["input_ids"] == \
                theirs(sample, add_special_tokens=special)["input_ids"], (sample, special)
    ids = ours("the quick ü fox", add_special_tokens=True)["input_ids"]
    # <s>, ▁the, ▁quick, ▁, then ü by byte fallback (UTF-8 C3 BC: byte b is token 3 + b)
    assert ids[:6] == [1, 259 + 18, 259 + 23, 259, 3 + 0xC3, 3 + 0xBC]
    assert ours.decode(ids, skip_special_tokens=True) == "the quick ü fox"


def test_unsupported_tokenizer_model_is_named(tmp_path):
    path = write_sentencepiece_gguf(tmp_path / "bert.gguf", model="bert")
    with pytest.raises(UnsupportedModelError, match="tokenizer model 'bert' is not supported"):
        rebuilt(path)


def test_special_token_outside_the_vocabulary_is_named(tmp_path):
    path = write_sentencepiece_gguf(tmp_path / "bad-eos.gguf", eos=10_000)
    with pytest.raises(UnsupportedModelError, match="eos_token_id = 10000 is outside the vocabulary of 291"):
        rebuilt(path)


def test_file_without_tokenizer_says_so(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "bare.gguf"), "llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError, match="carries no tokenizer.*tokenizer=False"):
        rebuilt(tmp_path / "bare.gguf")
