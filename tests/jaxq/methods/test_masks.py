"""Pruning masks: exact counts per column / per N:M group, stable ties, the pruned set against
numpy's stable argsort, WANDA score invariance to the diag(H) scaling, and parse errors."""

import numpy as np
import pytest

from jaxq.methods import masks


def reference_unstructured(scores, sparsity):
    """numpy transcription of WANDA's per-column stable sort (prune.py:197-199), Flax layout."""
    k, n = scores.shape
    keep = np.ones((k, n), bool)
    prune = int(k * sparsity)
    order = np.argsort(scores, axis=0, kind="stable")
    for c in range(n):
        keep[order[:prune, c], c] = False
    return keep


def reference_n_m(scores, n, m):
    k, cols = scores.shape
    keep = np.ones((k, cols), bool)
    for g in range(0, k, m):
        order = np.argsort(scores[g:g + m], axis=0, kind="stable")
        for c in range(cols):
            keep[g + order[:n, c], c] = False
    return keep


@pytest.mark.parametrize("k,sparsity", [(8, 0.5), (576, 0.5), (1536, 0.5), (100, 0.29), (576, 0.7),
                                        (37, 0.3), (64, 0.0), (10, 0.95)])
def test_unstructured_exact_count_and_lowest(k, sparsity):
    rng = np.random.default_rng(k)
    scores = rng.standard_normal((k, 7)).astype(np.float32)
    keep = np.asarray(masks.unstructured_keep(scores, sparsity))
    assert keep.dtype == bool and keep.shape == (k, 7)
    expected_kept = k - int(k * sparsity)
    assert (keep.sum(0) == expected_kept).all()
    np.testing.assert_array_equal(keep, reference_unstructured(scores, sparsity))
    for c in range(7):  # every pruned score <= every kept score
        if 0 < expected_kept < k:
            assert scores[~keep[:, c], c].max() <= scores[keep[:, c], c].min()


def test_unstructured_576_half_keeps_288():
    w = np.random.default_rng(0).standard_normal((576, 192)).astype(np.float32)
    keep = np.asarray(masks.unstructured_keep(masks.magnitude_scores(w), 0.5))
    assert (keep.sum(0) == 288).all()


def test_unstructured_ties_prune_lower_index_first():
    scores = np.array([[1.0, 2.0], [1.0, 2.0], [1.0, 0.0], [1.0, 2.0], [5.0, 2.0], [1.0, 2.0]], np.float32)
    keep = np.asarray(masks.unstructured_keep(scores, 0.5))
    # column 0: five tied 1.0 -> rows 0, 1, 2 pruned; column 1: 0.0 first, then rows 0, 1
    np.testing.assert_array_equal(keep[:, 0], [False, False, False, True, True, True])
    np.testing.assert_array_equal(keep[:, 1], [False, False, False, True, True, True])
    all_tied = np.zeros((10, 3), np.float32)
    np.testing.assert_array_equal(np.asarray(masks.unstructured_keep(all_tied, 0.5)),
                                  reference_unstructured(all_tied, 0.5))
    assert not np.asarray(masks.unstructured_keep(all_tied, 0.5))[:5].any()


def test_unstructured_ties_on_quantized_scores():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 4, (64, 16)).astype(np.float32)  # many ties
    np.testing.assert_array_equal(np.asarray(masks.unstructured_keep(scores, 0.5)),
                                  reference_unstructured(scores, 0.5))


@pytest.mark.parametrize("n,m,k", [(2, 4, 576), (4, 8, 1536), (1, 4, 16), (3, 4, 8)])
def test_n_m_valid_per_group(n, m, k):
    rng = np.random.default_rng(n * 100 + m)
    scores = rng.standard_normal((k, 5)).astype(np.float32)
    keep = np.asarray(masks.n_m_keep(scores, n, m))
    groups = keep.reshape(k // m, m, 5)
    assert (groups.sum(1) == m - n).all()
    np.testing.assert_array_equal(keep, reference_n_m(scores, n, m))
    s = scores.reshape(k // m, m, 5)
    pruned_max = np.where(~groups, s, -np.inf).max(1)
    kept_min = np.where(groups, s, np.inf).min(1)
    assert (pruned_max <= kept_min).all()


def test_n_m_ties():
    scores = np.zeros((8, 2), np.float32)
    scores[5, 1] = -1.0
    keep = np.asarray(masks.n_m_keep(scores, 2, 4))
    np.testing.assert_array_equal(keep[:, 0], [False, False, True, True] * 2)
    np.testing.assert_array_equal(keep[:, 1], [False, False, True, True, False, False, True, True])
    np.testing.assert_array_equal(keep, reference_n_m(scores, 2, 4))
    int_scores = np.random.default_rng(1).integers(0, 3, (64, 8)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(masks.n_m_keep(int_scores, 2, 4)), reference_n_m(int_scores, 2, 4))


def test_n_m_errors():
    with pytest.raises(ValueError, match="K = 10.*m = 4"):
        masks.n_m_keep(np.zeros((10, 3), np.float32), 2, 4)
    for n, m in [(4, 2), (4, 4), (0, 4)]:
        with pytest.raises(ValueError):
            masks.n_m_keep(np.zeros((8, 3), np.float32), n, m)


def test_unstructured_errors():
    for s in (1.0, 1.2, -0.1):
        with pytest.raises(ValueError):
            masks.unstructured_keep(np.zeros((8, 3), np.float32), s)


def test_scores():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((300, 32)).astype(np.float32) * rng.uniform(0.1, 5, 32).astype(np.float32)
    w = rng.standard_normal((32, 12)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(masks.magnitude_scores(w)), np.abs(w))
    norms = (x.astype(np.float64) ** 2).sum(0)
    s = np.asarray(masks.wanda_scores(w, norms))
    np.testing.assert_allclose(s, np.abs(w) * np.sqrt(norms)[:, None], rtol=1e-6)
    diag_h = 2.0 / x.shape[0] * norms  # diag of H = 2/T X^T X: same ranking, same mask
    s_h = np.asarray(masks.wanda_scores(w, diag_h))
    np.testing.assert_allclose(s_h, s * np.sqrt(2.0 / x.shape[0]), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(masks.unstructured_keep(s, 0.5)),
                                  np.asarray(masks.unstructured_keep(s_h, 0.5)))
    np.testing.assert_array_equal(np.asarray(masks.n_m_keep(s, 2, 4)), np.asarray(masks.n_m_keep(s_h, 2, 4)))
