"""LlamaConfig <-> Hugging Face config.json: `to_hf` is what `from_hf` reads back, and what no HF
config can express is refused."""

import dataclasses

import pytest

from jaxq.config import ActivationConfig
from models.config import LlamaConfig, RopeScaling, UnsupportedModelError

BASE = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=112, num_layers=2, num_heads=8, num_kv_heads=2,
                   head_dim=8, rms_norm_eps=1e-5, rope_theta=5e5, max_position_embeddings=1024)


@pytest.mark.parametrize("changes", [
    {},
    {"tie_word_embeddings": True},
    {"rope_scaling": RopeScaling(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=8192)},
    {"rope_scaling": RopeScaling(type="linear", factor=2.0)},
    {"architecture": "mistral", "sliding_window": 256},
    {"sliding_window": 128},
])
def test_to_hf_reads_back_to_the_same_config(changes):
    config = dataclasses.replace(BASE, **changes)
    hf = config.to_hf()
    back = LlamaConfig.from_hf(hf)
    if config.rope_scaling is not None and config.rope_scaling.type == "linear":  # from_hf fills the defaults
        back = dataclasses.replace(back, rope_scaling=dataclasses.replace(
            back.rope_scaling, original_max_position_embeddings=config.rope_scaling.original_max_position_embeddings))
    assert back == config
    assert hf["rope_theta"] == config.rope_theta  # the top-level key older readers take
    assert (config.rope_scaling is None) == ("rope_scaling" not in hf)
    assert hf["architectures"] == [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}[config.architecture]]


@pytest.mark.parametrize("changes,named", [({"rotation": "hadamard"}, "rotation"),
                                           ({"activations": ActivationConfig(bits=4)}, "activations"),
                                           ({"rope_freq_factors": (1.0,) * 4}, "rope_freq_factors")])
def test_what_only_runs_in_jaxq_has_no_hf_config(changes, named):
    with pytest.raises(UnsupportedModelError, match=named):
        dataclasses.replace(BASE, **changes).to_hf()
