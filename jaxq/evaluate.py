"""Perplexity (PROTOCOL.md) and greedy generation."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxq import data, distributed
from jaxq.sharding import DATA_AXIS, shard_params
from jaxq.tree import path_str
from models.config import LlamaConfig
from models.language_model import LanguageModel, Params, forward
from models.kv_cache import KVCache

QUICK = dict(ctx=512, windows=64)
FULL = dict(ctx=2048, windows=None)


@dataclasses.dataclass(frozen=True)
class PerplexityReport:
    ppl: float
    mean_nll: float
    predicted_tokens: int   # (ctx - 1) per window
    windows: int
    ctx: int
    seconds: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def next_token_nll(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Summed next-token NLL of each window from its logits [B, T, V] and tokens int32 [B, T]:
    float32 [B] (T-1 predictions each)."""
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return -picked.sum(axis=-1)


@functools.partial(jax.jit, static_argnames=("config",))
def window_nll(config: LlamaConfig, params: Params, tokens: jax.Array) -> jax.Array:
    """Summed next-token NLL of each window: int32 [B, T] -> float32 [B] (T-1 predictions each)."""
    logits, _ = forward(config, params, tokens)
    return next_token_nll(logits, tokens)


class EvaluationError(ValueError):
    """Evaluation options that cannot work, or a result that is not a number."""


def check_options(ctx: int, windows: int | None, batch_size: int) -> None:
    """Refuse window settings that cannot give a perplexity, before any text is read."""
    if ctx < 2:
        raise EvaluationError(f"ctx={ctx}: a window needs at least 2 tokens (one prediction)")
    if windows is not None and windows < 1:
        raise EvaluationError(f"windows={windows}: evaluate at least one window (or all: --full)")
    if batch_size < 1:
        raise EvaluationError(f"batch_size={batch_size}: must be at least 1")


def first_nonfinite_leaf(params: Params) -> str | None:
    """Path of the first float array (inside formats too) holding NaN or Inf, else None."""
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if jnp.issubdtype(leaf.dtype, jnp.floating) and not bool(jnp.isfinite(leaf).all()):
            return path_str(keypath)
    return None


def _nonfinite_nll_error(params: Params, window: int, dtype: str) -> EvaluationError:
    leaf = first_nonfinite_leaf(params)
    cause = (f"the weights hold NaN/Inf at {leaf}" if leaf is not None else
             f"the weights are finite, so the forward pass overflowed in {dtype}"
             + ("; try --dtype float32" if dtype != "float32" else ""))
    return EvaluationError(f"the negative log-likelihood of window {window} is not finite: {cause}")


def perplexity_report(lm: LanguageModel, params: Params, text_or_source: data.Source = data.EVAL_SOURCE, *,
                      ctx: int = 512, windows: int | None = 64, batch_size: int = 8,
                      data_dir: str | os.PathLike | None = None, progress: bool = True,
                      mesh: Mesh | None = None) -> PerplexityReport:
    """exp(mean NLL over every predicted position of the first `windows` windows of `ctx`).

    text_or_source: a named source (`wikitext2`), a path to a text file, or `data.Text(...)`.
    mesh: a (data, model) mesh (`jaxq.sharding.make_mesh`): windows are split over "data",
    params along their output axis over "model"; batch_size must be a multiple of "data". Over
    several processes every process runs this with the same arguments, feeds its own devices'
    windows and gets the same report.
    """
    check_options(ctx, windows, batch_size)
    ids = np.asarray(lm.encode(data.load_text(text_or_source, data_dir)), np.int32)
    tokens = data.eval_windows(ids, ctx, windows)
    place = lambda batch: jnp.asarray(batch)
    if mesh is not None:
        if batch_size % mesh.shape[DATA_AXIS]:
            raise EvaluationError(f"batch_size={batch_size} must be a multiple of the {mesh.shape[DATA_AXIS]} data shards")
        params = shard_params(params, mesh)
        batch_sharding = NamedSharding(mesh, P(DATA_AXIS))
        place = lambda batch: distributed.put(batch, batch_sharding)  # each process places its own rows
    start = time.perf_counter()
    total = 0.0
    batch_size = batch_size if mesh is not None else min(batch_size, len(tokens))
    bar = tqdm(total=len(tokens), desc=f"perplexity ctx={ctx}", unit="win",
               disable=not (progress and distributed.is_primary()))
    for lo in range(0, len(tokens), batch_size):
        batch = tokens[lo: lo + batch_size]
        real = len(batch)
        if real < batch_size:  # pad to one compiled shape; padded windows are dropped below
            batch = np.concatenate([batch, np.zeros((batch_size - real, ctx), np.int32)])
        nll = distributed.host_array(window_nll(lm.config, params, place(batch))).astype(np.float64)[:real]
        if not np.isfinite(nll).all():
            bar.close()
            raise _nonfinite_nll_error(params, lo + int(np.argmin(np.isfinite(nll))), lm.config.dtype)
        total += float(nll.sum())
        bar.update(real)
        bar.set_postfix(ppl=f"{math.exp(total / ((lo + real) * (ctx - 1))):.3f}")
    bar.close()
    count = len(tokens) * (ctx - 1)
    mean = total / count
    return PerplexityReport(ppl=math.exp(mean), mean_nll=mean, predicted_tokens=count,
                            windows=len(tokens), ctx=ctx, seconds=time.perf_counter() - start)


def perplexity(lm: LanguageModel, params: Params, text_or_source: data.Source = data.EVAL_SOURCE, *,
               ctx: int = 512, windows: int | None = 64, **options) -> float:
    """Perplexity as a float; see `perplexity_report` for the options."""
    return perplexity_report(lm, params, text_or_source, ctx=ctx, windows=windows, **options).ppl


@functools.partial(jax.jit, static_argnames=("config", "steps"))
def greedy_tokens(config: LlamaConfig, params: Params, prompt: jax.Array, steps: int) -> jax.Array:
    """Greedy continuation with a KV cache: int32 [B, T] -> int32 [B, steps]."""
    cache = KVCache.empty(config, prompt.shape[0], prompt.shape[1] + steps)
    logits, cache = forward(config, params, prompt, None, cache)
    first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)

    def step(carry, _):
        token, cache = carry
        logits, cache = forward(config, params, token[:, None], None, cache)
        nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        return (nxt, cache), token

    _, out = jax.lax.scan(step, (first, cache), None, length=steps)
    return out.T


def generate(lm: LanguageModel, params: Params, prompt: str, max_new_tokens: int = 32) -> str:
    """Greedy completion of `prompt` (smoke test of a quantized model)."""
    ids = jnp.asarray([lm.encode(prompt)], jnp.int32)
    out = np.asarray(greedy_tokens(lm.config, params, ids, max_new_tokens))[0].tolist()
    eos = getattr(lm.tokenizer, "eos_token_id", None)
    if eos in out:
        out = out[: out.index(eos)]
    return lm.tokenizer.decode(out)
