"""GGUF export: smollm2's Q4_1 weights back bit for bit, Q4_0 / Q8_0 / float on a tiny random
LLaMA read back by models.load and by transformers, the tokenizer metadata, refusals, the CLI."""

from __future__ import annotations

import dataclasses

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxq
import models
from jaxq import checkpoint, cli, data, evaluate
from jaxq.interop import gguf as gguf_export
from jaxq.formats import CodebookQ, QuantizedArray, UniformQ
from jaxq.interop.gguf import ExportError
from models.load import unpermute_rope_rows
from tests.models.test_load import llama_cpp_permute

Q4_1 = jaxq.UniformConfig(bits=4, group_size=32, zero_point="float")
# GQA, head_dim 32, every input a multiple of 128 (so g128 is a real grouping, not per channel)
TINY = models.LlamaConfig(vocab_size=260, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=32, rms_norm_eps=1e-5, max_position_embeddings=256)
# (bits, zero point) per kernel: block 0 Q4_0, block 1 Q8_0 but its down_proj float, the untied head Q4_1
LINEARS = ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj", "mlp/gate_proj",
           "mlp/up_proj", "mlp/down_proj")
TINY_FORMATS = {**{("layers", 0, *name.split("/"), "kernel"): (4, "none") for name in LINEARS},
                **{("layers", 1, *name.split("/"), "kernel"): (8, "none") for name in LINEARS[:-1]},
                ("lm_head", "kernel"): (4, "float")}
TEXT = "the quick brown fox jumps over the lazy dog; then the dog sleeps."


def byte_level_tokenizer():
    """A GPT-2 style byte-level BPE tokenizer of 260 tokens: a special token, 256 bytes, 3 merges."""
    from tokenizers import Tokenizer, decoders, models as tokenizer_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    merges = [("t", "h"), ("th", "e"), ("Ġ", "the")]
    tokens = ["<|endoftext|>"] + sorted(pre_tokenizers.ByteLevel.alphabet()) + ["".join(m) for m in merges]
    tok = Tokenizer(tokenizer_models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def random_uniform(rng, shape: tuple[int, int], bits: int, zero_point: str, group_size: int = 32) -> UniformQ:
    """Random codes (every value occurs) on random fp16 scales (and zeros) per group of inputs:
    weights of about +-0.3, as `jaxq.quantize` would store them."""
    groups = shape[0] // group_size
    codes = jnp.asarray(rng.integers(0, 2 ** bits, size=shape), jnp.uint8)
    scale = jnp.asarray(rng.uniform(0.6, 1.0, (groups, shape[1])) * 0.3 / 2 ** (bits - 1), jnp.float16)
    zero = {"none": None, "float": jnp.asarray(rng.uniform(-0.35, -0.25, (groups, shape[1])), jnp.float16),
            "int": jnp.asarray(rng.integers(0, 2 ** bits, (groups, shape[1])), jnp.uint8)}[zero_point]
    return UniformQ.from_codes(codes, scale, zero, bits=bits, group_size=group_size, dtype=jnp.float32,
                               zero_point=zero_point)


def _replace(params: dict, path: tuple, leaf) -> dict:
    """params with the leaf at `path` replaced (nested dicts copied along the path)."""
    if not path:
        return leaf
    return {**params, path[0]: _replace(params[path[0]], path[1:], leaf)}


def _get(params: dict, path: tuple):
    for key in path:
        params = params[key]
    return params


@pytest.fixture(scope="module")
def tiny():
    """(float model, its params with TINY_FORMATS' kernels quantized): random weights large enough
    for O(1-10) logits, random norm scales (so a swapped norm shows)."""
    rng = np.random.default_rng(0)
    abstract = models.abstract_params(TINY)
    params = jax.tree_util.tree_map_with_path(
        lambda path, leaf: jnp.asarray((1 + 0.2 * rng.normal(size=leaf.shape)) if path[-1].key == "scale"
                                       else 0.15 * rng.normal(size=leaf.shape), jnp.float32), abstract)
    quantized = params
    for path, (bits, zero_point) in TINY_FORMATS.items():
        quantized = _replace(quantized, path, random_uniform(rng, _get(params, path).shape, bits, zero_point))
    return models.LanguageModel(TINY, params, byte_level_tokenizer(), source=""), quantized


@pytest.fixture(scope="module")
def tiny_export(tiny, tmp_path_factory):
    """The quantized tiny model exported (tokenizer rebuilt from its tokenizer.json), and the summary."""
    lm, quantized = tiny
    out = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    return out, gguf_export.export_gguf(lm.replace(params=quantized), out, tokenizer_pre="gpt2")


def flat(params) -> dict:
    return dict(jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, QuantizedArray))[0])


def test_tiny_q4_0_q8_0_read_back_exactly(tiny, tiny_export):
    """models.load of the export gives exactly jaxq's dequantize() of every weight (float ones
    unchanged; every code value occurs, the 8-bit code 0 = int8 -128 included); the file holds
    TINY_FORMATS' types and llama.cpp's q/k row order."""
    lm, quantized = tiny
    out, summary = tiny_export
    loaded = models.load(out)
    assert loaded.config == TINY.replace(rms_norm_eps=float(np.float32(TINY.rms_norm_eps)))  # GGUF keeps float32
    dequantize = jax.jit(lambda leaf: leaf.dequantize(jnp.float32))  # one compilation per shape, not per op
    expected = {k: dequantize(leaf) if isinstance(leaf, QuantizedArray) else leaf
                for k, leaf in flat(quantized).items()}
    got = flat(loaded.params)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(value), err_msg=jax.tree_util.keystr(key))

    reader = gguf.GGUFReader(str(out))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert {types[f"blk.0.{n}.weight"] for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
                                                 "ffn_down")} == {"Q4_0"}
    assert {types[f"blk.1.{n}.weight"] for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate",
                                                 "ffn_up")} == {"Q8_0"}
    assert types["blk.1.ffn_down.weight"] == types["blk.0.attn_norm.weight"] == types["token_embd.weight"] == "F32"
    assert types["output.weight"] == "Q4_1"
    assert summary.types == {"Q4_0": 7, "Q8_0": 6, "Q4_1": 1, "F32": 2 + 2 * 2 + 1}
    assert summary.tensors == len(reader.tensors) and summary.bytes == out.stat().st_size
    # q/k rows in llama.cpp's layout (its convert_hf_to_gguf permute, written independently in test_load)
    for layer, qtype in ((0, gguf.GGMLQuantizationType.Q4_0), (1, gguf.GGMLQuantizationType.Q8_0)):
        for name, gguf_name, heads in (("q_proj", "attn_q", TINY.num_heads), ("k_proj", "attn_k", TINY.num_kv_heads)):
            tensor = next(t for t in reader.tensors if t.name == f"blk.{layer}.{gguf_name}.weight")
            assert tensor.tensor_type == qtype
            want = llama_cpp_permute(np.asarray(quantized["layers"][layer]["self_attn"][name]["kernel"].dequantize()).T,
                                     heads)
            np.testing.assert_array_equal(gguf.quants.dequantize(tensor.data, tensor.tensor_type), want)
    # the tokenizer rebuilt from the GGUF metadata tokenizes as the original
    assert loaded.encode(TEXT) == lm.encode(TEXT)
    assert loaded.tokenizer.bos_token == lm.tokenizer.bos_token == "<|endoftext|>"


def test_tiny_export_matches_transformers(tiny, tiny_export, rng):
    """transformers' own GGUF loader (its dequantizers, its q/k un-permutation, its model) on the
    export gives jaxq's logits on the quantized params to 1e-4 (float32)."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    lm, quantized = tiny
    out, _ = tiny_export
    model = AutoModelForCausalLM.from_pretrained(str(out.parent), gguf_file=out.name, dtype=torch.float32).eval()
    tokens = rng.integers(0, TINY.vocab_size, size=(2, 48))
    with torch.no_grad():
        expected = model(torch.tensor(tokens)).logits.numpy()
    ours = np.asarray(lm.apply(quantized, tokens))
    assert np.abs(expected).max() > 1.0  # logits large enough for the tolerance to mean something
    assert np.abs(ours - expected).max() <= 1e-4
    assert not model.config.tie_word_embeddings


def test_tiny_tokenizer_fields(tiny_export):
    """The rebuilt tokenizer metadata: gpt2 model, the given pre-tokenizer, tokens by id with the
    special token CONTROL, merges as 'a b', BOS/EOS ids, no BOS added."""
    out, _ = tiny_export
    fields = gguf.GGUFReader(str(out)).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    assert fields["tokenizer.ggml.model"].contents() == "gpt2" and fields["tokenizer.ggml.pre"].contents() == "gpt2"
    assert len(tokens) == TINY.vocab_size and tokens[0] == "<|endoftext|>" and tokens[-1] == "Ġthe"
    assert fields["tokenizer.ggml.token_type"].contents() == [3] + [1] * (TINY.vocab_size - 1)
    assert fields["tokenizer.ggml.merges"].contents() == ["t h", "th e", "Ġ the"]
    assert fields["tokenizer.ggml.bos_token_id"].contents() == fields["tokenizer.ggml.eos_token_id"].contents() == 0
    assert fields["tokenizer.ggml.add_bos_token"].contents() is False


def test_cli_exports_a_checkpoint_and_keeps_out(tiny, tiny_export, tmp_path, capsys):
    """`jaxq export --checkpoint DIR --gguf OUT`: the tokenizer metadata copied verbatim from the
    checkpoint's source GGUF; an existing OUT is kept (exit 2, one line) unless --overwrite."""
    lm, quantized = tiny
    source, _ = tiny_export
    jaxq.save(tmp_path / "ckpt", quantized, model_config=TINY, tokenizer=lm.tokenizer, source=str(source))
    out = tmp_path / "out.gguf"
    argv = ["export", "--checkpoint", str(tmp_path / "ckpt"), "--gguf", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}: 21 tensors (" in printed and "7 Q4_0" in printed and f"{out.stat().st_size} bytes" in printed
    written, original = gguf.GGUFReader(str(out)), gguf.GGUFReader(str(source))
    tokenizer_keys = [k for k in original.fields if k.startswith("tokenizer.")]
    assert [k for k in written.fields if k.startswith("tokenizer.")] == tokenizer_keys
    for key in tokenizer_keys:
        assert written.fields[key].contents() == original.fields[key].contents(), key
    for a, b in zip(written.tensors, original.tensors):
        assert a.name == b.name and np.array_equal(np.asarray(a.data), np.asarray(b.data))

    before = out.read_bytes()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists" in err and "--overwrite" in err
    assert out.read_bytes() == before
    assert cli.main(argv + ["--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "out.gguf"]  # no temporary file left


Q_PROJ = ("layers", 0, "self_attn", "q_proj", "kernel")
UP_PROJ = ("layers", 1, "mlp", "up_proj", "kernel")
DOWN_PROJ = ("layers", 0, "mlp", "down_proj", "kernel")


@pytest.mark.parametrize("case, layer, message", [
    ("int-zero g128", "layers/0/mlp/down_proj/kernel", "w4 g128 int-zero"),
    ("act-order", "layers/0/self_attn/q_proj/kernel", "act-order"),
    ("codebook", "layers/1/mlp/up_proj/kernel", "codebook"),
    ("float32 scales", "layers/0/self_attn/q_proj/kernel", "not float16 values"),
])
def test_unexportable_weights_name_the_layer(tiny, tmp_path, case, layer, message):
    lm, quantized = tiny
    q = quantized["layers"][0]["self_attn"]["q_proj"]["kernel"]
    if case == "int-zero g128":
        g128 = random_uniform(np.random.default_rng(1), (TINY.intermediate_size, TINY.hidden_size), 4, "int", 128)
        params = _replace(quantized, DOWN_PROJ, g128)  # 256 inputs: 2 groups
    elif case == "act-order":
        params = _replace(quantized, Q_PROJ, dataclasses.replace(q, perm=jnp.arange(TINY.hidden_size)[::-1]))
    elif case == "codebook":
        params = _replace(quantized, UP_PROJ, CodebookQ.from_uniform(_get(quantized, UP_PROJ)))
    else:
        params = _replace(quantized, Q_PROJ, dataclasses.replace(q, scale=q.scale.astype(jnp.float32) * (1 + 2 ** -20)))
    out = tmp_path / "x.gguf"
    with pytest.raises(ExportError) as err:
        gguf_export.export_gguf(lm.replace(params=params), out, tokenizer_pre="gpt2")
    text = str(err.value)
    assert layer in text and message in text
    if case != "float32 scales":
        assert "Q4_1" in text and "Q4_0" in text and "Q8_0" in text  # lists what does export
    assert not out.exists() and not list(tmp_path.iterdir())


def test_unexportable_models_and_destinations(tiny, tmp_path):
    lm, quantized = tiny
    q = lm.replace(params=quantized)
    for config, message in ((TINY.replace(rotation="hadamard"), "rotation='hadamard'"),
                            (TINY.replace(kv_cache=jaxq.KVCacheConfig(bits=4)), "kv_cache="),
                            (TINY.replace(rope_scaling=models.RopeScaling("llama3", 8.0)), "llama3")):
        with pytest.raises(ExportError, match=message):
            gguf_export.export_gguf(q.replace(config=config), tmp_path / "x.gguf", tokenizer_pre="gpt2")
    with pytest.raises(ExportError, match="tokenizer.ggml.pre"):  # no source GGUF to copy it from
        gguf_export.export_gguf(q, tmp_path / "x.gguf")
    with pytest.raises(ExportError, match="no tokenizer"):
        gguf_export.export_gguf(q.replace(tokenizer=None), tmp_path / "x.gguf", tokenizer_pre="gpt2")
    with pytest.raises(ExportError, match="end in .gguf"):
        gguf_export.export_gguf(q, tmp_path / "x.bin", tokenizer_pre="gpt2")
    with pytest.raises(ExportError, match="does not exist"):
        gguf_export.export_gguf(q, tmp_path / "missing" / "x.gguf", tokenizer_pre="gpt2")
    assert not list(tmp_path.iterdir())


def test_float_model_with_rope_factors_linear_scaling_and_sliding_window(tiny, tmp_path):
    """A float model exports as F32 tensors (plus rope_freqs.weight) and reads back exactly,
    RoPE frequency factors, linear scaling and sliding window included."""
    lm, _ = tiny
    factors = tuple(float(f) for f in np.linspace(1, 4, TINY.head_dim // 2, dtype=np.float32))
    config = TINY.replace(rope_freq_factors=factors, rope_scaling=models.RopeScaling("linear", 2.0), sliding_window=64)
    summary = gguf_export.export_gguf(lm.replace(config=config), tmp_path / "float.gguf", tokenizer_pre="gpt2")
    assert summary.types == {"F32": 22}  # 21 weights + the frequency factors
    loaded = models.load(tmp_path / "float.gguf", tokenizer=False)
    assert loaded.config == config.replace(rms_norm_eps=float(np.float32(TINY.rms_norm_eps)))
    for key, value in flat(lm.params).items():
        np.testing.assert_array_equal(np.asarray(flat(loaded.params)[key]), np.asarray(value))
    assert gguf.GGUFReader(str(tmp_path / "float.gguf")).fields["general.file_type"].contents() == 0  # ALL_F32


def test_permute_rope_rows_inverts_the_reader(rng):
    w = rng.normal(size=(6 * 16, 40)).astype(np.float32)
    permuted = gguf_export.permute_rope_rows(w, 6)
    np.testing.assert_array_equal(permuted, llama_cpp_permute(w, 6))
    np.testing.assert_array_equal(unpermute_rope_rows(permuted, 6), w)


# ------------------------------------------------------------------ the real smollm2-135m

@pytest.fixture(scope="module")
def smollm_export(smollm, tmp_path_factory):
    """smollm2 quantized by RTN w4 g32 float-offset min-max, exported: (path, summary)."""
    out = tmp_path_factory.mktemp("smollm") / "smollm2-q4_1.gguf"
    quantized = jaxq.quantize(smollm.params, Q4_1)
    return out, gguf_export.export_gguf(smollm.replace(params=quantized), out)


@pytest.fixture(scope="module")
def source_reader(smollm):
    return gguf.GGUFReader(smollm.source)


@pytest.mark.slow
def test_smollm_q4_1_bytes_and_metadata_are_the_source(smollm_export, source_reader):
    """Every Q4_1 tensor's bytes are the source file's (fp16 d and m included), the Q8_0 embedding
    is F32 (its exact dequantization), and the llama.* and tokenizer.* metadata are the source's."""
    out, summary = smollm_export
    exported = gguf.GGUFReader(str(out))
    ours = {t.name: t for t in exported.tensors}
    assert ours.keys() == {t.name for t in source_reader.tensors} and "output.weight" not in ours  # tied
    q4_1 = [t for t in source_reader.tensors if t.tensor_type == gguf.GGMLQuantizationType.Q4_1]
    assert len(q4_1) == 210
    for tensor in q4_1:
        mine = ours[tensor.name]
        assert mine.tensor_type == tensor.tensor_type and list(mine.shape) == list(tensor.shape), tensor.name
        assert np.array_equal(np.asarray(mine.data), np.asarray(tensor.data)), tensor.name
    embedding = next(t for t in source_reader.tensors if t.name == "token_embd.weight")
    assert ours["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    np.testing.assert_array_equal(ours["token_embd.weight"].data,
                                  gguf.quants.dequantize(embedding.data, embedding.tensor_type))
    assert summary.types == {"Q4_1": 210, "F32": 62}
    keys = [k for k in source_reader.fields if k.startswith(("llama.", "tokenizer."))]
    for key in keys:
        assert exported.fields[key].contents() == source_reader.fields[key].contents(), key
        assert exported.fields[key].types == source_reader.fields[key].types, key
    assert exported.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_1


@pytest.mark.slow
def test_smollm_export_loads_as_the_source(smollm, smollm_export):
    """models.load of the export: the source's config and float params exactly, its tokenizer,
    and so the same perplexity (4 windows of 64 tokens)."""
    out, _ = smollm_export
    loaded = models.load(out)
    assert loaded.config == smollm.config
    want, got = flat(smollm.params), flat(loaded.params)
    assert got.keys() == want.keys()
    for key in want:
        assert np.array_equal(np.asarray(got[key]), np.asarray(want[key])), jax.tree_util.keystr(key)
    text = data.Text(data.load_text(data.EVAL_SOURCE)[:20000])
    assert loaded.encode(text.content) == smollm.encode(text.content)
    report = lambda lm: evaluate.perplexity_report(lm, lm.params, text, ctx=64, windows=4, progress=False)
    ours, source = report(loaded), report(smollm)
    assert ours.windows == 4 and ours.ppl == source.ppl


@pytest.mark.slow
def test_smollm_tokenizer_rebuilt_from_a_checkpoint_is_the_source(smollm, source_reader):
    """Without the source GGUF, the tokenizer a checkpoint keeps (its tokenizer.json) gives back
    the source's tokens, token types, merges, special ids and add_bos, given llama.cpp's pre name."""
    kept = checkpoint._rebuild_tokenizer(checkpoint._tokenizer_record(smollm.tokenizer))
    fields = {key: value for key, value, _, _ in gguf_export.tokenizer_fields(kept, "smollm")}
    source = {k: f.contents() for k, f in source_reader.fields.items() if k.startswith("tokenizer.ggml.")}
    for key in ("model", "pre", "tokens", "token_type", "merges", "bos_token_id", "eos_token_id", "unknown_token_id",
                "padding_token_id", "add_bos_token"):
        assert fields[f"tokenizer.ggml.{key}"] == source[f"tokenizer.ggml.{key}"], key


def test_cli_names_the_pre_tokenizer_when_no_source_gguf_has_it(tiny, tmp_path, capsys):
    """A checkpoint whose source is no GGUF file: `jaxq export` says --tokenizer-pre is needed
    (exit 2, nothing written), and with it writes the rebuilt tokenizer under that name."""
    lm, quantized = tiny
    jaxq.save(tmp_path / "ckpt", quantized, model_config=TINY, tokenizer=lm.tokenizer, source="")
    out = tmp_path / "out.gguf"
    argv = ["export", "--checkpoint", str(tmp_path / "ckpt"), "--gguf", str(out)]
    assert cli.main(argv) == 2
    assert "--tokenizer-pre" in capsys.readouterr().err and not out.exists()
    assert cli.main(argv + ["--tokenizer-pre", "smollm"]) == 0
    assert gguf.GGUFReader(str(out)).fields["tokenizer.ggml.pre"].contents() == "smollm"
