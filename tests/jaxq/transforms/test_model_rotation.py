"""QuaRot's offline transforms are exact in float: the rotated model computes the original's logits.

Tolerance 1e-4 of the largest |logit| (issue 17), float32 both sides: a rotation changes the
summation order of every matmul (~1e-7 relative per product, measured ~4e-7 on the tiny models).
"""

import jax.numpy as jnp
import numpy as np
import pytest

import jaxq
import models
from jaxq.transforms import model_rotation

TOL = 1e-4


def tiny(tie: bool, rng) -> tuple[models.LlamaConfig, dict]:
    config = models.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                                num_kv_heads=2, head_dim=8, tie_word_embeddings=tie)
    params = models.init_params(config, seed=3)
    for norm in [params["norm"]] + [layer[n] for layer in params["layers"].values()
                                    for n in ("input_layernorm", "post_attention_layernorm")]:
        norm["scale"] = jnp.asarray(rng.uniform(0.5, 2.0, 32), jnp.float32)  # folding must matter
    return config, params


def relative_error(config, params, rotated_config, rotated, tokens) -> float:
    reference = np.asarray(models.LanguageModel(config, params).apply(params, tokens))
    out = np.asarray(models.LanguageModel(rotated_config, rotated).apply(rotated, tokens))
    return float(np.abs(out - reference).max() / np.abs(reference).max())


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("kind", ["hadamard", "random"])
def test_rotated_model_computes_the_same_logits(tie, kind, rng):
    config, params = tiny(tie, rng)
    rotated_config, rotated = model_rotation.rotate(config, params, kind, seed=1)
    assert rotated_config.rotation == kind and not rotated_config.tie_word_embeddings
    assert rotated["lm_head"]["kernel"].shape == (32, 97)
    assert all(np.all(np.asarray(layer["input_layernorm"]["scale"]) == 1) for layer in rotated["layers"].values())
    assert not np.allclose(rotated["embed_tokens"]["embedding"], params["embed_tokens"]["embedding"])
    assert relative_error(config, params, rotated_config, rotated, rng.integers(0, 97, (2, 16))) <= TOL


def test_smollm2_rotated_logits(smollm, rng):
    """The real model: tied embeddings untied, 576 = 36 x 16 Hadamard, 9 heads (o_proj's online
    transform spans all 576 inputs), down_proj's 1536 = 12 x 128."""
    rotated_config, rotated = model_rotation.rotate(smollm.config, smollm.params, "hadamard", seed=0)
    tokens = rng.integers(0, smollm.config.vocab_size, (1, 64))
    assert relative_error(smollm.config, smollm.params, rotated_config, rotated, tokens) <= TOL


def test_rotation_refuses_what_it_cannot_do(rng):
    config, params = tiny(False, rng)
    rotated_config, rotated = model_rotation.rotate(config, params)
    with pytest.raises(jaxq.ConfigError, match="already rotated"):
        model_rotation.rotate(rotated_config, rotated)
    quantized = jaxq.quantize(params, jaxq.UniformConfig(bits=4, group_size=16))
    with pytest.raises(jaxq.ConfigError, match="before quantizing"):
        model_rotation.rotate(config, quantized)
    with pytest.raises(jaxq.ConfigError, match="intermediate_size = 172"):  # 4 * 43: no Paley order
        model_rotation.rotate(config.replace(intermediate_size=172), params)
