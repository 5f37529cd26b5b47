"""Quantization-aware training (LLM-QAT): a quantized checkpoint's weights trained through their
fake-quantized values by distillation from the float model, then stored again on the same grid.

Per `UniformQ` linear, the trained leaves (in stored row order, act-order's permutation kept):
  weight     float32 [in, out], the latent weight, initialised to the checkpoint's dequantized one
             (so training starts at exactly its codes: RTN's, GPTQ's, any method's on a uniform grid)
  log_scale  float32 [groups, out] (or [1, 1]), s = s0 * exp(log_scale): the grid's scale, trained
             relative to the checkpoint's s0 (one learning rate for every magnitude of scale)
  offset     float32 [groups, out], the float offset of a float-zero grid (integer zeros stay fixed)
Forward (straight-through rounding, LSQ's gradients for the scale): s and the offset rounded to
their stored dtype, q = clip(round((w - offset) / s), 0, 2^b - 1), w_hat = s * q + offset; the
gradient of round is 1 (and of the dtype rounding). `encode` stores exactly the last forward's
codes, scales and offsets, so the trained checkpoint's outputs are the trained model's.

Loss: KL(p_float || p_quantized) of the next-token distributions, mean over tokens (LLM-QAT's
logit distillation; temperature 1), the float model's logits computed in the same step. Data:
calibration windows, or text the float model generates itself (`generated_windows`, LLM-QAT's
data-free option). Optimiser (optax): global-norm clipping, then AdamW on the weights and Adam on
log-scales and offsets, each with linear warm-up and cosine decay to zero. Batches follow a seeded
permutation per epoch, a function of the step alone, so a resumed run (Orbax state every
`save_every` steps: trained leaves, optimiser state, losses so far) repeats the uninterrupted
run's steps exactly.

Differences from LLM-QAT: only the quantized linears are trained (embeddings, norms and the head
stay), the grid's scales are trained too (LLM-QAT recomputes min-max scales of the weights every
step), and any uniform grid is kept (LLM-QAT: symmetric per-channel MinMax).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxq import checkpoint, tree
from jaxq.calibrate.resume import weights_digest
from jaxq.config import QATConfig
from jaxq.formats import groups
from jaxq.formats.uniform import UniformQ
from models.language_model import LanguageModel


class QATError(ValueError):
    """QAT that cannot run: a format it cannot train, a state from another run, bad settings."""


# ----------------------------------------------------------------- fake quantization

def _round_ste(x: jax.Array) -> jax.Array:
    """round(x) forward, identity gradient."""
    return x + jax.lax.stop_gradient(jnp.round(x) - x)


def _as_stored(x: jax.Array, dtype: Any) -> jax.Array:
    """x rounded to `dtype` and back to float32 forward, identity gradient."""
    return x + jax.lax.stop_gradient(x.astype(dtype).astype(jnp.float32) - x)


def initial_leaves(grid: UniformQ) -> dict[str, jax.Array]:
    """The trained leaves of one linear at the checkpoint's values (module docstring)."""
    leaves = {"weight": grid.stored_weight(jnp.float32), "log_scale": jnp.zeros(grid.scale.shape, jnp.float32)}
    if grid.zero_point == "float":
        leaves["offset"] = grid.zero.astype(jnp.float32)
    return leaves


def _grid(grid: UniformQ, leaves: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(scale, offset) float32 [groups, out] as stored (rounded to their dtypes), w = s * q + offset:
    `grid.affine()` of the trained scale and float offset."""
    scale = _as_stored(grid.scale.astype(jnp.float32) * jnp.exp(leaves["log_scale"]), grid.scale.dtype)
    zero = _as_stored(leaves["offset"], grid.zero.dtype) if grid.zero_point == "float" else grid.zero
    return dataclasses.replace(grid, scale=scale, zero=zero).affine()


def _codes(grid: UniformQ, leaves: dict[str, jax.Array], rows: Callable) -> jax.Array:
    """float32 [in, out] codes in [0, 2^b - 1], stored row order: x = (w - offset) / s clipped to
    the grid (gradient 1 inside, ends included, 0 outside: LSQ's), then rounded straight-through."""
    scale, offset = _grid(grid, leaves)
    x = (leaves["weight"] - rows(offset)) / rows(scale)
    top = float(2 ** grid.bits - 1)
    return _round_ste(jnp.where(x < 0, 0.0, jnp.where(x > top, top, x)))


def fake_quantized(grid: UniformQ, leaves: dict[str, jax.Array]) -> jax.Array:
    """The weight the trained leaves represent: float32 [in, out] in original row order."""
    rows = lambda per_group: groups.expand_rows(per_group, grid.group_size, grid.shape[0])
    scale, offset = _grid(grid, leaves)
    w = _codes(grid, leaves, rows) * rows(scale) + rows(offset)
    return w if grid.perm is None else w[jnp.argsort(grid.perm)]


def encode(grid: UniformQ, leaves: dict[str, jax.Array]) -> UniformQ:
    """The trained leaves stored on `grid`'s format: codes, scales and offsets of `fake_quantized`."""
    rows = lambda per_group: groups.expand_rows(per_group, grid.group_size, grid.shape[0])
    scale = (grid.scale.astype(jnp.float32) * jnp.exp(leaves["log_scale"])).astype(grid.scale.dtype)
    zero = leaves["offset"].astype(grid.zero.dtype) if grid.zero_point == "float" else grid.zero
    codes = _codes(grid, leaves, rows).astype(jnp.uint8)
    return UniformQ.from_codes(codes, scale, zero, bits=grid.bits, group_size=grid.group_size, dtype=grid.dtype,
                               zero_point=grid.zero_point, perm=grid.perm)


def trainable_grids(params: Any) -> dict[str, UniformQ]:
    """{path: UniformQ} of every quantized leaf; another format is a QATError naming the layer."""
    grids = {}
    for path, leaf in tree.flatten(params)[0]:
        if not tree.is_format(leaf):
            continue
        if not isinstance(leaf, UniformQ):
            raise QATError(f"{path}: QAT trains uniform grids (rtn, gptq, awq, ... checkpoints), not "
                           f"{leaf.format_name} ({leaf.describe()})")
        grids[path] = leaf
    if not grids:
        raise QATError("the checkpoint holds no quantized weight to train")
    return grids


def student_params(params: Any, grids: dict[str, UniformQ], trained: dict[str, dict[str, jax.Array]]) -> Any:
    """`params` with every quantized leaf replaced by its fake-quantized float weight."""
    leaves, treedef = tree.flatten(params)
    return tree.unflatten(treedef, [fake_quantized(grids[p], trained[p]) if p in grids else leaf
                                    for p, leaf in leaves])


def quantized_params(params: Any, grids: dict[str, UniformQ], trained: dict[str, dict[str, jax.Array]]) -> Any:
    """`params` with every quantized leaf re-encoded from its trained leaves."""
    leaves, treedef = tree.flatten(params)
    return tree.unflatten(treedef, [encode(grids[p], trained[p]) if p in grids else leaf for p, leaf in leaves])


# ----------------------------------------------------------------- loss and optimiser

def distillation_loss(teacher_logits: jax.Array, student_logits: jax.Array) -> jax.Array:
    """KL(softmax(teacher) || softmax(student)) per token, averaged; logits [B, T, V]."""
    teacher = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1)
    student = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
    return jnp.mean(jnp.sum(jnp.exp(teacher) * (teacher - student), axis=-1))


def optimizer(cfg: QATConfig) -> optax.GradientTransformation:
    """Clipping, then AdamW (weights) and Adam (log-scales, offsets), warm-up + cosine each."""
    schedule = lambda peak: optax.warmup_cosine_decay_schedule(0.0, peak, cfg.warmup_steps, cfg.steps)
    label = lambda trained: {p: {name: "weight" if name == "weight" else "grid" for name in leaves}
                             for p, leaves in trained.items()}
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), optax.multi_transform(
        {"weight": optax.adamw(schedule(cfg.weight_lr), weight_decay=cfg.weight_decay),
         "grid": optax.adam(schedule(cfg.scale_lr))}, label))


def batch_indices(cfg: QATConfig, step: int, windows: int) -> np.ndarray:
    """The windows of step `step`: consecutive slices of a seeded permutation per epoch."""
    per_epoch = max(windows // cfg.batch_size, 1)
    epoch, position = divmod(step, per_epoch)
    order = np.random.default_rng([cfg.seed, epoch]).permutation(windows)
    return np.resize(order[position * cfg.batch_size:], cfg.batch_size)


def make_step(student: LanguageModel, teacher: LanguageModel, grids: dict[str, UniformQ],
              opt: optax.GradientTransformation) -> tuple[Callable, Callable]:
    """Jitted (step, loss): step (trained, opt_state, tokens [B, T]) -> (trained, opt_state,
    loss), loss (trained, tokens) -> the distillation loss."""
    def loss_fn(trained, tokens):
        teacher_logits = jax.lax.stop_gradient(teacher.apply(teacher.params, tokens))
        return distillation_loss(teacher_logits, student.apply(student_params(student.params, grids, trained), tokens))

    @jax.jit
    def step(trained, opt_state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(trained, tokens)
        updates, opt_state = opt.update(grads, opt_state, trained)
        return optax.apply_updates(trained, updates), opt_state, loss
    return step, jax.jit(loss_fn)


# ----------------------------------------------------------------- state and the loop

def run_fingerprint(cfg: QATConfig, params: Any, tokens: np.ndarray) -> str:
    """sha256 over the settings, the starting checkpoint's weights and the training windows."""
    tokens = np.ascontiguousarray(tokens, np.int32)
    parts = [dataclasses.asdict(cfg), weights_digest(params), list(tokens.shape),
             hashlib.sha256(tokens.tobytes()).hexdigest(), checkpoint.CHECKPOINT_VERSION]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _indexed(tree_of_arrays: Any) -> dict[str, jax.Array]:
    """The leaves of a pytree as {"leaf0": leaf, "leaf1": ...} (what a checkpoint stores for it)."""
    return {f"leaf{i}": leaf for i, leaf in enumerate(jax.tree_util.tree_leaves(tree_of_arrays))}


def _unindexed(like: Any, stored: dict[str, Any]) -> Any:
    """`_indexed`'s inverse into the structure and dtypes of `like`."""
    leaves, treedef = jax.tree_util.tree_flatten(like)
    return treedef.unflatten([jnp.asarray(stored[f"leaf{i}"], leaf.dtype) for i, leaf in enumerate(leaves)])


def _save_state(directory: Path, step: int, trained: Any, opt_state: Any, losses: list[float], fingerprint: str):
    checkpoint.write_tree(directory, {"trained": _indexed(trained), "opt_state": _indexed(opt_state)},
                          {"qat_step": step, "losses": losses, "fingerprint": fingerprint}, step=step, max_to_keep=2)


def _restore_state(directory: Path, fingerprint: str, trained: Any, opt_state: Any) -> tuple | None:
    """(step, trained, opt_state, losses) of the newest saved state, None when there is none; a
    state of another run is a QATError."""
    try:
        metadata = checkpoint.read_metadata(directory)
    except checkpoint.NoCheckpointError:
        return None
    if metadata.get("fingerprint") != fingerprint:
        raise QATError(f"{directory} holds the state of another QAT run (other settings, checkpoint or data); "
                       "use a new --resume directory or the same settings")
    state = checkpoint.read_tree(directory, metadata)
    return (metadata["qat_step"], _unindexed(trained, state["trained"]), _unindexed(opt_state, state["opt_state"]),
            list(metadata["losses"]))


@dataclasses.dataclass(frozen=True)
class QATResult:
    model: LanguageModel            # the trained model, quantized (a plain jaxq model)
    losses: tuple[float, ...]       # the distillation loss of every step (resumed steps included)
    initial_loss: float             # before training, on the first step's batch


def train(student: LanguageModel, teacher: LanguageModel, tokens: np.ndarray, cfg: QATConfig = QATConfig(), *,
          resume_dir: str | Path | None = None, progress: bool = True,
          on_step: Callable[[int, float], None] | None = None) -> QATResult:
    """QAT of the quantized model `student` (UniformQ linears) against the float `teacher` on
    windows tokens int32 [S, T]; `resume_dir` saves the state every `cfg.save_every` steps and
    continues from the newest one; `on_step(step, loss)` after each step."""
    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 2:
        raise QATError(f"QAT needs windows [samples, length >= 2], got shape {tokens.shape}")
    if teacher.config.vocab_size != student.config.vocab_size:
        raise QATError(f"the float model's vocabulary ({teacher.config.vocab_size}) is not the quantized "
                       f"model's ({student.config.vocab_size}): distillation needs the same tokens")
    grids = trainable_grids(student.params)
    trained = {p: initial_leaves(g) for p, g in grids.items()}
    opt = optimizer(cfg)
    opt_state = opt.init(trained)
    step_fn, loss_fn = make_step(student, teacher, grids, opt)
    initial = float(loss_fn(trained, jnp.asarray(tokens[batch_indices(cfg, 0, tokens.shape[0])])))
    start, losses = 0, []
    fingerprint = run_fingerprint(cfg, student.params, tokens)
    directory = None if resume_dir is None else Path(resume_dir).absolute()
    if directory is not None:
        restored = _restore_state(directory, fingerprint, trained, opt_state)
        if restored is not None:
            start, trained, opt_state, losses = restored
    bar = tqdm(range(start, cfg.steps), desc="qat", unit="step", initial=start, total=cfg.steps, disable=not progress)
    for step in bar:
        trained, opt_state, loss = step_fn(trained, opt_state, jnp.asarray(tokens[batch_indices(cfg, step, len(tokens))]))
        losses.append(float(loss))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if directory is not None and ((step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps):
            _save_state(directory, step + 1, trained, opt_state, losses, fingerprint)
        if on_step is not None:
            on_step(step, losses[-1])
    bar.close()
    model = student.replace(params=quantized_params(student.params, grids, trained))
    return QATResult(model, tuple(losses), initial)


# ----------------------------------------------------------------- data-free windows

def generated_windows(lm: LanguageModel, samples: int, length: int, *, seed: int = 0, greedy_prefix: int = 4,
                      batch_size: int = 8) -> np.ndarray:
    """Text the float model writes itself (LLM-QAT's data-free option): int32 [samples, length],
    each window a uniformly random first token, `greedy_prefix` greedy tokens, then tokens
    sampled from the model's distribution (temperature 1), decoded with the KV cache."""
    if samples < 1 or length < 2:
        raise QATError(f"generated windows need samples >= 1 and length >= 2, got {samples} x {length}")
    key = jax.random.key(seed)
    out = []
    for lo in range(0, samples, batch_size):
        n = min(batch_size, samples - lo)
        key, first_key = jax.random.split(key)
        token = jax.random.randint(first_key, (n, 1), 0, lm.config.vocab_size, jnp.int32)
        cache = lm.new_cache(n, length)
        window = [token]
        for position in range(1, length):
            logits, cache = lm.apply_with_cache(lm.params, token, cache)
            key, sample_key = jax.random.split(key)
            last = logits[:, -1].astype(jnp.float32)
            token = (jnp.argmax(last, axis=-1) if position <= greedy_prefix
                     else jax.random.categorical(sample_key, last, axis=-1)).astype(jnp.int32)[:, None]
            window.append(token)
        out.append(np.asarray(jnp.concatenate(window, axis=1)))
    return np.concatenate(out, axis=0)
