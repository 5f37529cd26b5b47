"""Seeded random orthogonal transforms U of R^n, as a quantized weight stores them (`rotated`).

    u = generate("hadamard", 576, seed=7)   # RandomHadamard: U = H_576 diag(signs) / sqrt(576)
    y = u.apply(x)                          # U x for each vector x[..., :]  (= x @ U^T)
    z = u.apply_transpose(y)                # U^T y                          (= y @ U); z == x

What is stored is the seed (a uint32 array, so that rotations of different seeds share one jit
trace) and the small state the seed generates: the +-1 signs [n] (int8), or the two Kronecker
factors and two permutations; never an n x n matrix. The stored state is what is applied; the
seed regenerates it bit for bit (`regenerate`), the generator being part of `Rotated` format
version 1 (pinned by the golden hashes in tests/jaxq/formats/test_rotation.py; a change to any
of the following needs a format version bump):
  - draws: `jax.random` with explicit threefry2x32 keys (`seed_key`), under
    `jax.threefry_partitionable(True)` (the default since JAX 0.5, pinned so a changed default
    or a user's flag cannot change the stream), jitted on the host CPU backend;
  - signs `jax.random.rademacher` int8; permutations `jax.random.permutation`; normals
    `jax.random.normal` float32 (key split 4 ways: left, right, input, output);
  - Kronecker factors: the QR decomposition of the float64 normals by numpy's LAPACK
    (`kronecker.haar_orthogonal`), rounded to float32. LAPACK builds may differ in the last bits
    of Q, rarely enough to change the float32 rounding: a checkpoint never depends on it (the
    stored factors are applied), only `regenerate`'s bit-for-bit equality does.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxq.formats.base import Stored, register_stored, static_field
from jaxq.transforms import hadamard, kronecker


def seed_key(seed: int) -> jax.Array:
    """The generator key of a rotation seed (an explicit implementation: not the configurable default)."""
    return jax.random.key(seed, impl="threefry2x32")


def host_device() -> jax.Device | None:
    """The CPU device rotations are generated on; None where JAX_PLATFORMS leaves the CPU backend
    out (e.g. "cuda"): then the default device generates them. The integer draws (signs,
    permutations) are threefry's integer arithmetic, equal on every backend; the normals behind the
    Kronecker factors may then differ in the last bits (the stored factors still apply exactly;
    only `regenerate`'s bit-for-bit equality with a CPU-made rotation is at stake)."""
    try:
        return jax.devices("cpu")[0]
    except RuntimeError:
        return None


def host_generated(fn, seed: int, **sizes: int) -> Any:
    """jit(fn)(seed_key(seed), **sizes) (sizes static) on the host CPU with the partitionable
    threefry stream, its arrays as numpy."""
    host = host_device()
    with jax.threefry_partitionable(True), jax.default_device(host):
        key = seed_key(seed) if host is None else jax.device_put(seed_key(seed), host)
        arrays = jax.jit(fn, static_argnames=tuple(sizes))(key, **sizes)
        return jax.tree_util.tree_map(np.asarray, arrays)


def _signs(key: jax.Array, size: int) -> jax.Array:
    """int8 [size] of +-1."""
    return jax.random.rademacher(key, (size,), dtype=jnp.int8)


def index_dtype(size: int) -> jnp.dtype:
    """The narrowest of int16 / int32 holding indices 0..size-1."""
    return jnp.dtype(jnp.int16 if size <= 2 ** 15 else jnp.int32)


def _kronecker_draws(key: jax.Array, a: int, b: int) -> tuple[jax.Array, ...]:
    """Standard normal [a, a] and [b, b], permutations [a * b] (input side, output side)."""
    k_left, k_right, k_in, k_out = jax.random.split(key, 4)
    permutation = lambda key: jax.random.permutation(key, a * b).astype(index_dtype(a * b))
    return (jax.random.normal(k_left, (a, a), jnp.float32), jax.random.normal(k_right, (b, b), jnp.float32),
            permutation(k_in), permutation(k_out))


class Rotation(Stored, abc.ABC):
    """U orthogonal [size, size] of one `kind`, regenerable from `seed` (uint32 [])."""

    kind: ClassVar[str]
    seed: jax.Array
    size: int

    @classmethod
    @abc.abstractmethod
    def generate(cls, size: int, seed: int) -> Rotation:
        """The rotation of R^size that `seed` draws (eager, on the host)."""

    @abc.abstractmethod
    def apply(self, x: jax.Array) -> jax.Array:
        """U x along the last axis: [..., size] -> [..., size] in x.dtype."""

    @abc.abstractmethod
    def apply_transpose(self, x: jax.Array) -> jax.Array:
        """U^T x along the last axis: [..., size] -> [..., size] in x.dtype."""

    @abc.abstractmethod
    def describe(self) -> str:
        """e.g. 'hadamard 36x16', 'kronecker 24x24'."""

    def regenerate(self) -> Rotation:
        """The rotation the stored seed draws (eager): equal to self, array for array."""
        return self.generate(self.size, int(self.seed))


ROTATIONS: dict[str, type[Rotation]] = {}


def register_rotation(cls: type) -> type:
    cls = register_stored(cls)
    ROTATIONS[cls.kind] = cls
    return cls


def generate(kind: str, size: int, seed: int) -> Rotation:
    """The rotation of `kind` ("hadamard" or "kronecker") of R^size drawn by `seed` (< 2^32)."""
    if kind not in ROTATIONS:
        raise ValueError(f"unknown rotation kind {kind!r}; expected one of {', '.join(sorted(ROTATIONS))}")
    if not 0 <= seed < 2 ** 32:
        raise ValueError(f"rotation seeds are uint32, got {seed}")
    return ROTATIONS[kind].generate(size, seed)


def from_record(arrays: dict[str, Any], static: dict[str, Any]) -> Rotation:
    """Inverse of ({**arrays()}, {"kind": kind, **static_fields()}); CheckpointError for a kind
    this jaxq does not know."""
    if static.get("kind") not in ROTATIONS:
        from jaxq.checkpoint import CheckpointError  # jaxq.checkpoint imports the formats

        raise CheckpointError(f"unknown rotation kind {static.get('kind')!r} in a rotated weight; this jaxq knows "
                              f"{', '.join(sorted(ROTATIONS))}")
    return ROTATIONS[static["kind"]].from_arrays(arrays, {k: v for k, v in static.items() if k != "kind"})


@register_rotation
class RandomHadamard(Rotation):
    """U = H_n diag(signs) / sqrt(n) (QuIP#'s randomized Hadamard transform); n = m * 2^k with a
    base order m `hadamard.base_order` builds."""

    kind = "hadamard"
    signs: jax.Array          # int8 [n], +-1
    seed: jax.Array           # uint32 []
    size: int = static_field()

    @classmethod
    def generate(cls, size: int, seed: int) -> RandomHadamard:
        hadamard.base_order(size)  # UnsupportedSizeError now, not at the first matmul
        signs = host_generated(_signs, seed, size=size)
        return cls(signs=jnp.asarray(signs), seed=jnp.uint32(seed), size=size)

    def apply(self, x: jax.Array) -> jax.Array:
        return hadamard.randomized_hadamard(x, self.signs)

    def apply_transpose(self, x: jax.Array) -> jax.Array:
        return hadamard.randomized_hadamard(x, self.signs, transpose=True)

    def describe(self) -> str:
        m = hadamard.base_order(self.size)
        return f"hadamard {m}x{self.size // m}" if m > 1 else f"hadamard {self.size}"


@register_rotation
class RandomKronecker(Rotation):
    """U = P_out (left (x) right) P_in, left and right Haar-random special orthogonal, det +1
    (QuIP's scipy `special_ortho_group`)."""

    kind = "kronecker"
    left: jax.Array           # float32 [a, a]
    right: jax.Array          # float32 [b, b], a * b = n
    perm_in: jax.Array        # int16 [n] (int32 above 2^15)
    perm_out: jax.Array       # int16 [n] (int32 above 2^15)
    seed: jax.Array           # uint32 []
    size: int = static_field()

    @classmethod
    def generate(cls, size: int, seed: int) -> RandomKronecker:
        a, b = kronecker.balanced_factors(size)
        g_left, g_right, perm_in, perm_out = host_generated(_kronecker_draws, seed, a=a, b=b)
        return cls(left=jnp.asarray(kronecker.haar_orthogonal(g_left)),
                   right=jnp.asarray(kronecker.haar_orthogonal(g_right)), perm_in=jnp.asarray(perm_in),
                   perm_out=jnp.asarray(perm_out), seed=jnp.uint32(seed), size=size)

    def apply(self, x: jax.Array) -> jax.Array:
        return kronecker.kronecker_transform(x, self.left, self.right, self.perm_in, self.perm_out)

    def apply_transpose(self, x: jax.Array) -> jax.Array:
        return kronecker.kronecker_transform(x, self.left, self.right, self.perm_in, self.perm_out, transpose=True)

    def describe(self) -> str:
        return f"kronecker {self.left.shape[0]}x{self.right.shape[0]}"
