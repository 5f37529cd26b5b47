"""QuIP (Chee et al. 2023): incoherence processing, then LDLQ, stored as a `Rotated` weight.

Per linear, Flax layout W [K, N] (y = x W), H [K, K] over its inputs (jaxq's 2/T convention;
every step below is invariant to H's scale), following Cornell-RelaxML/QuIP `method.py`
`QuantMethod.preproc` and `vector_balance.py` `quantize_weight_vecbal` (qfn 'b', the
`--incoh_processing` settings, REFERENCES.md section 4):

  0. H must be finite and not all zero (`SingularHessianError` naming the linear otherwise: the
     rescale would divide 0 by 0, and a zero H means no calibration input reached the linear).
  1. rescale (optional): H <- H / max|H|; d = max((max(diag H, 1e-8) / max(|W_k|^2, 1e-8))^(1/4), 1e-8)
     with |W_k| the norm of input row k; W <- diag(d) W, H <- D^-1 H D^-1.
  2. H <- H K / (tr H + 1e-8) + 1e-2 I (the reference's `preproc_proj`: only with a rotation).
  3. W~ = U_in W U_out^T, H~ = U_in H U_in^T (symmetrised) with U_in [K, K] on the input side
     (the Flax rows; QuIP's V), U_out [N, N] on the output side (QuIP's U): seeded rotations
     (`rotation`).
  4. H~ <- H~ + damp * mean(diag H~) I (GPTQ's damping, the reference's `--pre_gptqH`); where the
     LDL factorisation fails (NaN), damp x10 up to MAX_DAMP (logged), then SingularHessianError.
  5. grid: s = grid_rms * RMS(W~) + 1e-16 per matrix (or per output column), levels
     (2j / (2^b - 1) - 1) s, j = 0..2^b - 1: a float-offset UniformQ over [-s, s]
     (`rtn.grid_from_range`: scale 2s / (2^b - 1), offset -s, in scale_dtype; the rounding and
     the clip use the stored values).
  6. W~ clipped to the grid's end points (so the clipping is not fed back, as the reference clamps
     first), LDLQ (`ldlq.ldlq_codes`, equal to GPTQ), then `greedy_passes` (`ldlq.greedy_passes`).

The result is `Rotated(UniformQ(W~ codes), U_in, U_out, 1/d)`: inference rotates x and y around the
packed matmul (the reference un-rotates and stores fake-quantized float weights instead).
transform="none" skips steps 2 and 3, as the reference without `preproc_proj`; with rescale off
that is plain LDLQ (= GPTQ on the damped H) on QuIP's grid, the ablation, stored as the plain
UniformQ.

Deviations from the reference: its `--incoh_processing` sets `proj_extra = 1` but reads
`pre_proj_extra` (default 0, the blocked butterfly); this uses the documented Kronecker form
(`jaxq.transforms.kronecker`, factors Haar on SO(p) as the reference's) or QuIP#'s randomized
Hadamard transform. Order: jaxq's LDLQ (and its greedy passes) round input 0 first, up to K - 1;
the reference's `round_ldl` works on the PyTorch transpose with the lower LDL factor and rounds
input K - 1 first: the mirror image (the same algorithm on the reversed inputs, so equal in
distribution under the random rotations, not code for code). Ties round half to even (the
reference: half up). The reference computes each block's Hessians before quantizing any
(`true_sequential=False` here); the default collects them stage by stage, as jaxq's GPTQ.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from typing import Any

import jax
import jax.numpy as jnp

from jaxq.config import QuIPConfig, UniformConfig
from jaxq.formats import rotation
from jaxq.formats.base import QuantizedArray
from jaxq.formats.rotated import Rotated
from jaxq.formats.rotation import Rotation
from jaxq.formats.uniform import UniformQ
from jaxq.methods import ldlq, protocol, registry, rtn
from jaxq.methods.gptq import SingularHessianError
from jaxq.transforms import hadamard
from jaxq.transforms.hadamard import UnsupportedSizeError

log = logging.getLogger("jaxq")

MAX_DAMP = 1.0  # largest damping tried (x10 per failed factorisation), GPTQConfig.max_damp's default


def rescale(w: jax.Array, hessian: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """QuIP's diagonal rescale: (W [K, N], H [K, K]) -> (diag(d) W, D^-1 H' D^-1, d [K]), H' = H / max|H|."""
    hessian = hessian / jnp.abs(hessian).max()
    row_norms = jnp.sum(w * w, axis=1)
    d = jnp.maximum((jnp.maximum(jnp.diag(hessian), 1e-8) / jnp.maximum(row_norms, 1e-8)) ** 0.25, 1e-8)
    return w * d[:, None], hessian / d[:, None] / d[None, :], d


def normalize_hessian(hessian: jax.Array) -> jax.Array:
    """H [K, K] -> H K / (tr H + 1e-8) + 1e-2 I (QuIP's, before a rotation; not without one)."""
    k = hessian.shape[0]
    return hessian * (k / (jnp.trace(hessian) + 1e-8)) + 1e-2 * jnp.eye(k, dtype=hessian.dtype)


def rotate(w: jax.Array, hessian: jax.Array, input_rotation: Rotation | None,
           output_rotation: Rotation | None) -> tuple[jax.Array, jax.Array]:
    """(W [K, N], H [K, K]) -> (U_in W U_out^T, U_in H U_in^T); a missing rotation is the identity."""
    if input_rotation is not None:
        w = input_rotation.apply(w.T).T                          # U_in W
        hessian = input_rotation.apply(input_rotation.apply(hessian).T)
        hessian = (hessian + hessian.T) / 2                      # exactly symmetric again
    if output_rotation is not None:
        w = output_rotation.apply(w)                             # (.) U_out^T
    return w, hessian


def grid_config(cfg: QuIPConfig) -> UniformConfig:
    """The UniformQ grid QuIP's levels are: float offset, per tensor or per output column."""
    return UniformConfig(bits=cfg.bits, granularity="tensor" if cfg.grid == "matrix" else "channel",
                         zero_point="float", scale_dtype=cfg.scale_dtype)


def grid(w: jax.Array, cfg: QuIPConfig) -> tuple[jax.Array, jax.Array]:
    """W~ [K, N] -> (scale, offset) [N] in scale_dtype: levels (2j / (2^b - 1) - 1) s, s = grid_rms * RMS."""
    axis = None if cfg.grid == "matrix" else 0
    s = cfg.grid_rms * jnp.sqrt(jnp.mean(w * w, axis=axis)) + 1e-16
    s = jnp.broadcast_to(s, (w.shape[1],)).astype(jnp.float32)
    return rtn.grid_from_range(-s, s, grid_config(cfg))


def grid_ends(scale: jax.Array, offset: jax.Array, cfg: QuIPConfig) -> tuple[jax.Array, jax.Array]:
    """The stored grids' lowest and highest levels (the decodes of codes 0 and 2^b - 1), float32 [N]."""
    ends = jnp.broadcast_to(jnp.array([0, 2 ** cfg.bits - 1], jnp.uint8), (scale.shape[0], 2))
    levels = rtn.decode(ends, scale, offset, grid_config(cfg))
    return levels[:, 0], levels[:, 1]


@functools.partial(jax.jit, static_argnames=("cfg",))
def prepare(w: jax.Array, hessian: jax.Array, input_rotation: Rotation | None, output_rotation: Rotation | None,
            cfg: QuIPConfig, damp: float | jax.Array | None = None
            ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array | None]:
    """Steps 1-5 and the clip of step 6: -> (target W~^T [N, K] clipped to the grid, damped H~ [K, K],
    scale [N], offset [N], input_scale 1/d [K] or None). damp: cfg.damp unless given (escalation)."""
    w = w.astype(hessian.dtype)
    d = None
    if cfg.rescale:
        w, hessian, d = rescale(w, hessian)
    if cfg.transform != "none":
        w, hessian = rotate(w, normalize_hessian(hessian), input_rotation, output_rotation)
    damp = cfg.damp if damp is None else damp
    hessian = hessian + damp * jnp.mean(jnp.diag(hessian)) * jnp.eye(hessian.shape[0], dtype=hessian.dtype)
    scale, offset = grid(w, cfg)
    lo, hi = grid_ends(scale, offset, cfg)
    target = jnp.clip(w.T, lo.astype(w.dtype)[:, None], hi.astype(w.dtype)[:, None])
    return target, hessian, scale, offset, None if d is None else (1.0 / d).astype(jnp.float32)


@jax.jit
def _finite(target: jax.Array, hessian: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(target all finite, H's LDL factors all finite with a positive diagonal)."""
    upper, diagonal = ldlq.ldl_upper(hessian)
    return jnp.isfinite(target).all(), jnp.isfinite(upper).all() & (diagonal > 0).all()


def check_hessian(hessian: jax.Array, name: str) -> None:
    """SingularHessianError naming the linear for a non-finite or all-zero H (step 0)."""
    if not bool(jnp.isfinite(hessian).all()):  # (XLA's CPU max may drop NaNs: test them apart)
        raise SingularHessianError(f"{name or 'layer'}: the Hessian has non-finite entries; check the "
                                   "calibration inputs")
    if float(jnp.abs(hessian).max()) == 0:
        raise SingularHessianError(f"{name or 'layer'}: the Hessian is all zero (no calibration input reached "
                                   "this linear); QuIP's rescale and LDLQ need a nonzero H")


def check_sizes(shape: tuple[int, int], cfg: QuIPConfig, name: str) -> None:
    """UnsupportedSizeError naming the linear when the Hadamard transform has no size (in, out)."""
    if cfg.transform != "hadamard":
        return
    try:
        for size in shape:
            hadamard.base_order(size)
    except UnsupportedSizeError as err:
        raise UnsupportedSizeError(f"{name or 'weight'} [{shape[0]}, {shape[1]}]: {err}") from None


def linear_seed(seed: int, name: str, side: str) -> int:
    """A uint32 seed for one side ("input" / "output") of the linear called `name`, from the config's."""
    digest = hashlib.blake2b(f"{seed}/{name}/{side}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def quantize_weight(w: jax.Array, hessian: jax.Array, cfg: QuIPConfig, name: str = "") -> QuantizedArray:
    """QuIP of one weight [in, out] given H [in, in] -> Rotated (a plain UniformQ when nothing is
    rotated or rescaled); `name` (the linear's path) picks its rotations' seeds and names it in
    errors (UnsupportedSizeError, SingularHessianError)."""
    in_features, out_features = w.shape
    check_sizes(w.shape, cfg, name)
    check_hessian(hessian, name)
    rotations = [None, None]
    if cfg.transform != "none":
        rotations = [rotation.generate(cfg.transform, size, linear_seed(cfg.rotation_seed, name, side))
                     for size, side in ((in_features, "input"), (out_features, "output"))]
    damp = cfg.damp
    while True:
        target, h, scale, offset, input_scale = prepare(w, hessian, *rotations, cfg, damp)
        finite_target, factor_ok = map(bool, _finite(target, h))
        if not finite_target:
            raise ValueError(f"{name or 'layer'}: the rescaled, rotated weight has non-finite entries; check "
                             "the weight")
        if factor_ok:
            break
        if damp * 10 > MAX_DAMP * (1 + 1e-9):
            raise SingularHessianError(
                f"{name or 'layer'}: the LDL factorisation of the Hessian fails even with damping {damp:g} x "
                f"mean(diag H) (up to {MAX_DAMP:g}); check the calibration inputs")
        log.warning("%s: LDL factorisation failed with damping %g; retrying with %g", name or "layer", damp, damp * 10)
        damp *= 10
    uniform = grid_config(cfg)
    codes = ldlq.ldlq_codes(target, h, scale, offset, uniform)
    if cfg.greedy_passes:
        codes = ldlq.greedy_passes(target, codes, h, scale, offset, uniform, cfg.greedy_passes)
    columns = slice(0, 1) if cfg.grid == "matrix" else slice(None)
    inner = UniformQ.from_codes(codes.T, scale[None, columns], offset[None, columns], bits=cfg.bits,
                                group_size=in_features, dtype=w.dtype, zero_point="float")
    if cfg.transform == "none" and input_scale is None:
        return inner
    return Rotated(inner=inner, input_rotation=rotations[0], output_rotation=rotations[1], input_scale=input_scale,
                   shape=(in_features, out_features), dtype=jnp.dtype(w.dtype).name)


class QuIP(protocol.Method):
    """QuIP in the block driver: each linear of a group quantized from the group's Hessian, with
    its own rotations (seeded by `rotation_seed` and the linear's path)."""

    def statistics(self, group: Any) -> tuple[protocol.Statistic, ...]:
        return (protocol.Hessian(),)

    @property
    def sequential(self) -> bool:
        return self.config.true_sequential

    def quantize(self, kernels: list[jax.Array], stats: protocol.GroupStatistics, name: str) -> list[QuantizedArray]:
        hessian = stats[protocol.Hessian()]
        for i, w in enumerate(kernels):  # every size of the group before any work
            check_sizes(w.shape, self.config, f"{name}/{i}")
        return [quantize_weight(w, hessian, self.config, f"{name}/{i}") for i, w in enumerate(kernels)]


registry.register(QuIPConfig, QuIP)
