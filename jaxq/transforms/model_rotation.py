"""QuaRot's offline model transforms: fold the RMSNorm scales into the linears, rotate the residual
stream, and fold the inverses of the online Hadamard transforms into the weights. Exact in float.

    config, params = rotate(lm.config, lm.params, "hadamard", seed=0)
    # forward(config, params, tokens) == forward(lm.config, lm.params, tokens) up to float rounding

With h(x) = x M^T the orthonormal Hadamard transform along the last axis (`hadamard_transform`,
M = H_n / sqrt(n)) and Q the residual rotation (x -> x Q), in Flax's (in, out) layout
(`REFERENCES.md` §5.1; `spcl/QuaRot` `rotation_utils.py`):
  1. fold: q/k/v W <- diag(input_layernorm) W, gate/up W <- diag(post_attention_layernorm) W,
     the head W <- diag(norm) W_head; every norm scale becomes 1. A tied head is untied first
     (W_head = E^T; smollm2 gets a 49152 x 576 head): after the fold it is no longer E^T. The
     reference's embedding mean subtraction is a LayerNorm relic and not done (it is not an
     identity for RMSNorm).
  2. residual: E <- E Q; q/k/v/gate/up and the head W <- Q^T W; o/down W <- W Q. An RMSNorm with
     unit scale commutes with Q (it preserves norms).
  3. online transforms the model then runs (`models.llama`, config.rotation set): down_proj's
     input h_I, W_down <- M_I W_down; v per head, offline: W_v <- W_v (I (x) M_d^T); o_proj's
     input h over all heads (n = heads * head_dim) after the per-head V rotation:
     W_o <- M_n (I (x) M_d) W_o Q; q and k per head after RoPE (no weight changes).
Q: "hadamard" = H_n diag(signs) / sqrt(n) (`jaxq.formats.rotation.RandomHadamard`, the seed draws
the signs); "random" = a Haar-random orthogonal (numpy's default_rng(seed) normals, QR), for
hidden sizes with no Hadamard matrix here. The online transforms are deterministic (no signs).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxq import tree
from jaxq.config import ConfigError
from jaxq.formats.rotation import RandomHadamard
from jaxq.transforms import hadamard
from jaxq.transforms.kronecker import haar_orthogonal
from models.config import LlamaConfig

Params = dict[str, Any]
HIGHEST = jax.lax.Precision.HIGHEST


def residual_rotation(kind: str, size: int, seed: int) -> Callable[[jax.Array], jax.Array]:
    """x [..., size] -> x Q for the residual rotation Q of `kind` (see the module docstring)."""
    if kind == "hadamard":
        try:
            u = RandomHadamard.generate(size, seed)
        except hadamard.UnsupportedSizeError as err:
            raise ConfigError(f"hidden size {size} has no Hadamard matrix here ({err}); use rotate='random'") from None
        return u.apply  # U x per vector = x U^T: Q = U^T
    if kind == "random":
        q = jnp.asarray(haar_orthogonal(np.random.default_rng(seed).standard_normal((size, size))))
        return lambda x: jnp.dot(x, q.astype(x.dtype), precision=HIGHEST)
    raise ConfigError(f"rotate={kind!r}; expected 'hadamard' or 'random'")


def _left(fn: Callable[[jax.Array], jax.Array], w: jax.Array) -> jax.Array:
    """For fn(x) = x A: A^T w [in, out] (the transform applied to the input side of a kernel)."""
    return fn(w.T).T


def check_online_sizes(config: LlamaConfig) -> None:
    """The online transforms need Hadamard matrices of head_dim, heads * head_dim and the MLP width."""
    sizes = {"head_dim": config.head_dim, "heads * head_dim": config.num_heads * config.head_dim,
             "intermediate_size": config.intermediate_size}
    for name, n in sizes.items():
        try:
            hadamard.base_order(n)
        except hadamard.UnsupportedSizeError as err:
            raise ConfigError(f"cannot rotate this model: {name} = {n} has no Hadamard transform ({err})") from None


def fold_norms(config: LlamaConfig, params: Params) -> tuple[LlamaConfig, Params]:
    """Step 1: every RMSNorm scale into the linears reading it, the head untied. Float32 math,
    results in each weight's dtype."""
    params = jax.tree_util.tree_map(lambda a: a, params)  # a fresh tree of the same arrays
    if config.tie_word_embeddings:
        params["lm_head"] = {"kernel": params["embed_tokens"]["embedding"].T}
    scale = lambda w, g: (w.astype(jnp.float32) * g.astype(jnp.float32)[:, None]).astype(w.dtype)
    for layer in params["layers"].values():
        for norm, module, names in (("input_layernorm", "self_attn", ("q_proj", "k_proj", "v_proj")),
                                    ("post_attention_layernorm", "mlp", ("gate_proj", "up_proj"))):
            gamma = layer[norm]["scale"]
            for name in names:
                layer[module][name]["kernel"] = scale(layer[module][name]["kernel"], gamma)
            layer[norm]["scale"] = jnp.ones_like(gamma)
    params["lm_head"]["kernel"] = scale(params["lm_head"]["kernel"], params["norm"]["scale"])
    params["norm"]["scale"] = jnp.ones_like(params["norm"]["scale"])
    return config.replace(tie_word_embeddings=False), params


def rotate(config: LlamaConfig, params: Params, kind: str = "hadamard", seed: int = 0) -> tuple[LlamaConfig, Params]:
    """Steps 1-3 of the module docstring on a float model: -> (config with `rotation=kind`, params)."""
    if config.rotation is not None:
        raise ConfigError(f"the model is already rotated ({config.rotation})")
    formats = [path for path, leaf in tree.flatten(params)[0] if tree.is_format(leaf)]
    if formats:
        raise ConfigError(f"rotate a float model, before quantizing it ({formats[0]} is quantized)")
    check_online_sizes(config)
    config, params = fold_norms(config, params)
    q = residual_rotation(kind, config.hidden_size, seed)
    c = config

    def in_out(w, fn_in, fn_out):
        w32 = w.astype(jnp.float32)
        if fn_in is not None:
            w32 = _left(fn_in, w32)
        if fn_out is not None:
            w32 = fn_out(w32)
        return w32.astype(w.dtype)

    def per_head(fn):  # x [..., heads * d] -> fn on each head's d values
        return lambda x: fn(x.reshape(*x.shape[:-1], -1, c.head_dim)).reshape(x.shape)

    def o_proj(w):  # M_n (I (x) M_d) W Q
        w32 = _left(per_head(hadamard.hadamard_transform), w.astype(jnp.float32))
        return q(_left(hadamard.hadamard_transform, w32)).astype(w.dtype)

    rules = {
        "self_attn/q_proj": lambda w: in_out(w, q, None),
        "self_attn/k_proj": lambda w: in_out(w, q, None),
        "self_attn/v_proj": lambda w: in_out(w, q, per_head(hadamard.hadamard_transform)),
        "self_attn/o_proj": o_proj,
        "mlp/gate_proj": lambda w: in_out(w, q, None),
        "mlp/up_proj": lambda w: in_out(w, q, None),
        "mlp/down_proj": lambda w: in_out(w, hadamard.hadamard_transform, q),
    }
    rotate_layer = jax.jit(lambda layer: {
        **layer, **{module: {name: {"kernel": rules[f"{module}/{name}"](layer[module][name]["kernel"])}
                             for name in layer[module]} for module in ("self_attn", "mlp")}})
    params["layers"] = {i: rotate_layer(layer) for i, layer in params["layers"].items()}
    embedding = params["embed_tokens"]["embedding"]
    params["embed_tokens"]["embedding"] = jax.jit(lambda e: q(e.astype(jnp.float32)).astype(e.dtype))(embedding)
    head = params["lm_head"]["kernel"]
    params["lm_head"]["kernel"] = jax.jit(lambda w: in_out(w, q, None))(head)
    return config.replace(rotation=kind), params
