"""SqueezeLLM (Kim et al., ICML 2024, arXiv 2306.07629), as the authors' code does it
(REFERENCES.md section 1): sensitivity-weighted non-uniform quantization, dense-and-sparse.

Per kernel W [K, N] (Flax (in, out)) with its Fisher information F [K, N] (`protocol.Fisher`):
  1. sparse part (sparsity > 0): the `sensitive_fraction` of the entries with the largest F,
     then, among the rest, the largest |w| up to `sparsity` in all (the outliers);
  2. per output column n, 1-D k-means with 2^b centroids minimising sum_k F_kn (w_kn - c(w_kn))^2
     over the column's dense entries (unweighted: weight 1; sparse entries: weight 0);
  3. a CodebookQ with one table per column (the 2^b centroids, fp16) and each weight's nearest
     entry as its b-bit index; with a sparse part, a DenseSparse whose S = w - table[index] at the
     sparse positions (the zero-mapping correction: the dense part still decodes an entry there).

k-means, per column (jitted, vmapped over the columns), from two starts: weighted k-means++ (the
reference's sklearn KMeans init: the first centre drawn by weight, each next one the best of
2 + floor(ln k) candidates drawn by weight x squared distance; uniforms from numpy's
default_rng(0)) and the column's min-max uniform grid (per-channel RTN's levels). From each,
Lloyd iterations (assign each weight to its nearest centroid, move each centroid to the weighted
mean of its weights; a centroid nobody is assigned to is relocated, as sklearn's, to the weight
of largest weighted error: `update`), at most `max_iterations`, stopping
once an iteration changes no assignment; the start whose result has the lower weighted error
wins. Lloyd never increases the error, so the result is never worse than the uniform grid (before
the table is rounded to fp16).

Deviations from the reference, all deliberate:
  - seeding: one generator's draws for all the columns of a kernel, so not sklearn's centres
    (it seeds each column's KMeans with random_state 0), and the grid start beside k-means++
    (sklearn's n_init="auto" runs k-means++ once); sklearn's tolerance stop (centre shift below
    1e-4 x the data variance) is replaced by the exact one above;
  - outliers: the authors tune one interquartile-range multiplier r per model until the
    model-wide fraction hits the target (`generate_outlier_config.py`); here every matrix gives
    the target fraction, its largest |w| (the set an IQR threshold selects at the r giving that
    count), which needs no model-wide pass;
  - sensitive entries: exactly round(fraction x size) by `top_k` (the reference's strict `>` than
    the k-th largest keeps k - 1);
  - sparse entries take no part in the k-means (the reference clusters them as zeros of weight
    0) and keep their nearest centroid as dense index, so S = w - table[index] is the smaller
    residual (the reference maps them to the centroid nearest 0);
  - an empty cluster's centroid is relocated to the weight of largest weighted error (sklearn's:
    largest unweighted distance, which could pick a weight-0 entry);
  - a column whose dense entries all have F = 0 is clustered unweighted (as the reference's
    all-zero sample weights become uniform ones).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxq.config import SqueezeLLMConfig
from jaxq.formats.codebook import CodebookQ
from jaxq.formats.sparse import DenseSparse
from jaxq.methods import protocol, registry
from jaxq.methods.rtn import minmax_range

SEED = 0  # sklearn's random_state in the reference


# ------------------------------------------------------------------------ one column

COMPARE_ALL_ENTRIES = 16  # up to this many centroids, assign by comparing with every midpoint


def nearest(w: jax.Array, centroids: jax.Array) -> jax.Array:
    """Index of the centroid nearest each of w [K] among sorted centroids [k]: int32 [K] (a tie
    at a midpoint goes to the lower centroid). Few centroids: compare with all midpoints (cheaper
    to compile and run than a binary search); more (8 bits): binary search. (Not BCQ's
    `nearest_codes`: that one compares distances to the two neighbours, which rounds differently
    from a midpoint at a near-tie, over levels in code order.)"""
    midpoints = (centroids[:-1] + centroids[1:]) / 2
    method = "compare_all" if centroids.shape[0] <= COMPARE_ALL_ENTRIES else "scan"
    return jnp.searchsorted(midpoints, w, side="left", method=method).astype(jnp.int32)


def weighted_error(w: jax.Array, weight: jax.Array, centroids: jax.Array, assignment: jax.Array) -> jax.Array:
    """sum_i weight_i (w_i - centroids[assignment_i])^2: float32 []."""
    return jnp.sum(weight * (w - centroids[assignment]) ** 2)


def update(w: jax.Array, weight: jax.Array, assignment: jax.Array, centroids: jax.Array) -> jax.Array:
    """Each centroid moved to the weighted mean of the weights assigned to it, sorted: [k].

    A centroid nobody (of positive weight) is assigned to is relocated, as sklearn's Lloyd does
    (`_relocate_empty_clusters`): the r-th such centroid (in index order) takes the weight with
    the r-th largest weighted error w.r.t. its current centroid (ties: lower index), which leaves
    its cluster for the empty one before the means are taken. sklearn ranks by unweighted distance;
    here the error is weighted, so a weight-0 entry (a sparse one) is never taken. A centroid
    stays where it is when its candidate's error is 0 (fewer distinct weighted values than
    centroids)."""
    k = centroids.shape[0]
    totals = jax.ops.segment_sum(weight, assignment, num_segments=k)
    empty = totals <= 0
    error = weight * (w - centroids[assignment]) ** 2
    far = jax.lax.top_k(error, min(k, w.shape[0]))[1]                            # largest first
    point = far[jnp.clip(jnp.cumsum(empty) - 1, 0, far.shape[0] - 1)]            # [k]: each centroid's candidate
    moves = empty & (error[point] > 0)
    assignment = assignment.at[jnp.where(moves, point, w.shape[0])].set(jnp.arange(k, dtype=assignment.dtype),
                                                                        mode="drop")
    sums = jax.ops.segment_sum(weight * w, assignment, num_segments=k)
    totals = jax.ops.segment_sum(weight, assignment, num_segments=k)
    return jnp.sort(jnp.where(totals > 0, sums / jnp.where(totals > 0, totals, 1.0), centroids))


def lloyd(w: jax.Array, weight: jax.Array, start: jax.Array, max_iterations: int) -> jax.Array:
    """Weighted Lloyd iterations on w [K] (weight [K] >= 0) from centroids start [k]: at most
    `max_iterations` updates, stopping when one leaves every assignment unchanged -> sorted [k]."""
    def step(state):
        i, centroids, assignment, _ = state
        centroids = update(w, weight, assignment, centroids)
        moved = nearest(w, centroids)
        return i + 1, centroids, moved, jnp.any(moved != assignment)

    start = jnp.sort(start)
    state = (0, start, nearest(w, start), True)
    return jax.lax.while_loop(lambda s: (s[0] < max_iterations) & s[3], step, state)[1]


def draw(uniforms: jax.Array, mass: jax.Array) -> jax.Array:
    """Indices into mass [K] (>= 0, not all 0) drawn with probability proportional to it, one per
    uniform in [0, 1) [count], by inverting its cumulative sum (sklearn's sampling): int32 [count]."""
    cumulative = jnp.cumsum(mass)
    targets = (1.0 - uniforms) * cumulative[-1]  # in (0, total]: never an index of zero mass
    index = jnp.searchsorted(cumulative, targets, side="left", method="compare_all")  # few targets
    return jnp.minimum(index, mass.shape[0] - 1).astype(jnp.int32)


def seeding_trials(k: int) -> int:
    """Candidates k-means++ draws for each centre after the first (sklearn's 2 + floor(ln k))."""
    return 2 + int(math.log(k))


def seeding_uniforms(columns: int, k: int) -> np.ndarray:
    """The uniforms of every column's k-means++ draws: numpy's default_rng(SEED), float32
    [columns, k, trials] (drawn on the host: jax.random's threefry would add seconds of
    compilation to every kernel shape)."""
    return np.random.default_rng(SEED).random((columns, k, seeding_trials(k)), np.float32)


def kmeans_plus_plus(w: jax.Array, weight: jax.Array, uniforms: jax.Array) -> jax.Array:
    """Weighted greedy k-means++ seeding of w [K] (sklearn's `_kmeans_plusplus`): k centres drawn
    among the weights with positive weight, by uniforms [k, trials] in [0, 1) (row 0, first
    entry: the first centre; row j: centre j's candidates) -> sorted [k]."""
    k = uniforms.shape[0]
    first = draw(uniforms[0, :1], weight)[0]
    distance = (w - w[first]) ** 2

    def pick(j, state):
        centres, distance = state
        potential = weight * distance  # all zero once every distinct weight is a centre: draw by weight
        candidates = draw(uniforms[j], jnp.where(potential.sum() > 0, potential, weight))
        distances = jnp.minimum(distance[None], (w[None] - w[candidates][:, None]) ** 2)  # [trials, K]
        best = jnp.argmin(jnp.sum(distances * weight, axis=1))
        return centres.at[j].set(w[candidates[best]]), distances[best]

    centres = jnp.full((k,), w[first])
    return jnp.sort(jax.lax.fori_loop(1, k, pick, (centres, distance))[0])


def uniform_grid(w: jax.Array, weight: jax.Array, k: int) -> jax.Array:
    """k evenly spaced levels from the min to the max of the weights with positive weight: [k]."""
    low, high = minmax_range(w, weight > 0)
    return low + (high - low) * jnp.arange(k, dtype=jnp.float32) / (k - 1)


def cluster_weights(fisher: jax.Array, dense: jax.Array, weighted: bool) -> jax.Array:
    """A column's k-means weights [K]: its Fisher information (or 1) on the dense entries, scaled
    to a maximum of 1; uniform on the dense entries when they are all 0, on every entry when
    the column has no dense entry."""
    weight = jnp.where(dense, fisher if weighted else 1.0, 0.0)
    weight = jnp.where(weight.sum() > 0, weight, dense.astype(jnp.float32))
    weight = jnp.where(weight.sum() > 0, weight, 1.0)
    return weight / weight.max()


def column_codebook(w: jax.Array, weight: jax.Array, uniforms: jax.Array, max_iterations: int) -> jax.Array:
    """The better (lower weighted error) of Lloyd from k-means++ (by uniforms [k, trials]) and
    from the min-max grid for one column w [K] with k-means weights [K] -> sorted centroids [k]."""
    k = uniforms.shape[0]
    starts = jnp.stack([kmeans_plus_plus(w, weight, uniforms), uniform_grid(w, weight, k)])
    results = jax.vmap(lambda start: lloyd(w, weight, start, max_iterations))(starts)
    errors = jax.vmap(lambda c: weighted_error(w, weight, c, nearest(w, c)))(results)
    return results[jnp.argmin(errors)]


# ------------------------------------------------------------------------ one kernel

def sparse_positions(w: jax.Array, fisher: jax.Array, sensitive: int, outliers: int) -> jax.Array:
    """Flat (row-major) indices int32 [sensitive + outliers] into w [K, N]: the `sensitive`
    entries of largest Fisher information, then the `outliers` of largest |w| among the rest."""
    largest = lambda values, count: jax.lax.top_k(values, count)[1] if count else jnp.zeros((0,), jnp.int32)
    chosen = largest(fisher.reshape(-1), sensitive)
    magnitude = jnp.abs(w).reshape(-1).at[chosen].set(-1.0)
    return jnp.concatenate([chosen, largest(magnitude, outliers)]).astype(jnp.int32)


def sparse_counts(size: int, cfg: SqueezeLLMConfig) -> tuple[int, int]:
    """(sensitive, outlier) entries of a matrix of `size` weights."""
    total = round(cfg.sparsity * size)
    sensitive = min(round(cfg.sensitive_fraction * size), total)
    return sensitive, total - sensitive


def quantize_weight(w: jax.Array, fisher: jax.Array, cfg: SqueezeLLMConfig) -> CodebookQ | DenseSparse:
    """Float kernel [K, N] and its Fisher information [K, N] (unused, any values, when
    `cfg.needs_fisher` is False) -> CodebookQ with one fp16 table per column, or DenseSparse
    with the sparse part beside it."""
    return _quantize_weight(w, fisher, seeding_uniforms(w.shape[1], 2 ** cfg.bits), cfg)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _quantize_weight(w: jax.Array, fisher: jax.Array, uniforms: jax.Array,
                     cfg: SqueezeLLMConfig) -> CodebookQ | DenseSparse:
    """`quantize_weight` with the k-means++ uniforms [N, 2^b, trials]."""
    k_rows, n_columns = w.shape
    w32, fisher = w.astype(jnp.float32), fisher.astype(jnp.float32)
    sensitive, outliers = sparse_counts(w.size, cfg)
    positions = sparse_positions(w32, fisher, sensitive, outliers)
    dense = jnp.ones(w.size, bool).at[positions].set(False).reshape(w.shape)
    weights = jax.vmap(lambda f, d: cluster_weights(f, d, cfg.weighted))(fisher.T, dense.T)  # [N, K]
    weights = jax.lax.optimization_barrier(weights)  # constant if unweighted: XLA would run the k-means compiling
    centroids = jax.vmap(lambda x, m, u: column_codebook(x, m, u, cfg.max_iterations))(w32.T, weights, uniforms)
    table = centroids.astype(jnp.float16)                                         # [N, 2^b]
    indices = jax.vmap(nearest)(w32.T, table.astype(jnp.float32)).T               # [K, N]
    codebook = CodebookQ.from_indices(indices.astype(jnp.uint8), table.T[None], bits=cfg.bits, group_size=k_rows,
                                      dtype=w.dtype)
    if not positions.size:
        return codebook
    rows, columns = positions // n_columns, positions % n_columns
    decoded = table.astype(jnp.float32)[columns, indices[rows, columns]]
    return DenseSparse.from_entries(codebook, rows, columns, w32[rows, columns] - decoded)


class SqueezeLLM(protocol.Method):
    """`SqueezeLLMConfig` as a method: Fisher information from the driver, k-means per kernel."""

    def statistics(self, group) -> tuple[protocol.Statistic, ...]:
        return (protocol.Fisher(),) if self.config.needs_fisher else ()

    def quantize(self, kernels, stats, name):
        fishers = stats[protocol.Fisher()] if self.config.needs_fisher else [jnp.zeros(w.shape) for w in kernels]
        for w, fisher in zip(kernels, fishers):
            if fisher.shape != w.shape:
                raise ValueError(f"{name}: Fisher information of shape {fisher.shape} for a kernel of shape {w.shape}")
        return [quantize_weight(w, fisher, self.config) for w, fisher in zip(kernels, fishers)]


registry.register(SqueezeLLMConfig, SqueezeLLM)
