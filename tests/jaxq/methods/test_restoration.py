"""OBR restorations (float32, masked K x K form) against float64 numpy gather forms, the
stationarity conditions, a direct least-squares solve and the proxy loss."""

import math
import numpy as np
import pytest

from jaxq.methods import masks, restoration

K, N = 64, 24
T = 4 * K  # tokens: H = 2/T X^T X has condition number ~10 for iid rows, larger with the mixing below


def make_problem(seed=0, damp=0.01):
    rng = np.random.default_rng(seed)
    mixing = np.eye(K) + 0.3 * rng.standard_normal((K, K)) / np.sqrt(K)  # correlated inputs
    x = rng.standard_normal((T, K)) @ mixing * rng.uniform(0.3, 3.0, K)  # uneven channel scales
    h = 2.0 / T * x.T @ x
    h = h + damp * np.mean(np.diag(h)) * np.eye(K)
    w = rng.standard_normal((K, N))
    norms = (x ** 2).sum(0)
    keep = np.asarray(masks.unstructured_keep(masks.wanda_scores(w.astype(np.float32), norms), 0.5))
    return x, h, w, keep


def gather_pruning(h, w, keep):
    out = np.zeros_like(w)
    for c in range(w.shape[1]):
        i, z = np.flatnonzero(keep[:, c]), np.flatnonzero(~keep[:, c])
        out[i, c] = w[i, c] + np.linalg.solve(h[np.ix_(i, i)], h[np.ix_(i, z)] @ w[z, c])
    return out


def gather_error(h, e, evict, retain):
    out = np.zeros_like(e)
    for c in range(e.shape[1]):
        r, ev = np.flatnonzero(retain[:, c]), np.flatnonzero(evict[:, c])
        if len(r):
            out[r, c] = np.linalg.solve(h[np.ix_(r, r)], h[np.ix_(r, ev)] @ e[ev, c])
    return out


def proxy(h, d):
    return np.einsum("kn,kl,ln->n", d, h, d)


def relative(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def run_pruning(h, w, keep, **kw):
    return np.asarray(restoration.pruning_compensation(h.astype(np.float32), w.astype(np.float32), keep, **kw),
                      np.float64)


def test_pruning_zero_gradient_and_gather_form():
    _, h, w, keep = make_problem()
    out = run_pruning(h, w, keep)
    assert (out[~keep] == 0).all()
    for c in range(N):
        i, z = np.flatnonzero(keep[:, c]), np.flatnonzero(~keep[:, c])
        delta = out[i, c] - w[i, c]
        target = h[np.ix_(i, z)] @ w[z, c]
        assert relative(h[np.ix_(i, i)] @ delta, target) < 1e-4  # H_II d_I - H_IZ w_Z = 0
    ref = gather_pruning(h, w, keep)
    for c in range(N):
        assert relative(out[:, c], ref[:, c]) < 1e-4


def test_pruning_n_m_mask_and_chunks():
    _, h, w, _ = make_problem(seed=1)
    keep = np.asarray(masks.n_m_keep(np.abs(w).astype(np.float32), 2, 4))
    ref = gather_pruning(h, w, keep)
    outs = [run_pruning(h, w, keep, chunk=c) for c in (None, 1, 5, 64)]  # 5 does not divide N = 24
    for out in outs:
        assert relative(out, ref) < 1e-4
        np.testing.assert_allclose(out, outs[0], rtol=1e-5, atol=1e-5)


def test_pruning_trivial_masks():
    _, h, w, _ = make_problem(seed=2)
    keep = np.ones((K, N), bool)
    keep[:, 3] = False  # a fully pruned column
    out = run_pruning(h, w, keep)
    np.testing.assert_allclose(np.delete(out, 3, 1), np.delete(w, 3, 1), rtol=1e-6, atol=1e-6)
    assert (out[:, 3] == 0).all()


def test_pruning_equals_least_squares():
    """min over v supported on I of ||X (v - w)||^2: normal equations X_I^T X_I v_I = X_I^T X w, i.e.
    v_I = w_I + H_II^-1 H_IZ w_Z with the UNDAMPED H (2/T cancels). Tolerance 1e-3: the float32
    Cholesky works on H = X^T X, whose condition number is kappa(X)^2, while float64 lstsq works
    on X itself; the float32 error is ~ kappa(H) * 6e-8, a few 1e-5 here, with margin."""
    x, h, w, keep = make_problem(seed=3, damp=0.0)
    out = run_pruning(h, w, keep)
    for c in range(N):
        i = np.flatnonzero(keep[:, c])
        v, *_ = np.linalg.lstsq(x[:, i], x @ w[:, c], rcond=None)
        assert relative(out[i, c], v) < 1e-3


def test_pruning_lowers_proxy_loss():
    _, h, w, keep = make_problem(seed=4)
    out = run_pruning(h, w, keep)
    compensated = proxy(h, out - w)
    plain = proxy(h, w * keep - w)
    assert (compensated <= plain * (1 + 1e-6)).all()
    assert compensated.sum() < 0.9 * plain.sum()


def rtn_error(w, bits=4):
    """e = w - Q(w) with a symmetric per-column grid (any fixed error works for the tests)."""
    scale = np.abs(w).max(0) / (2 ** (bits - 1) - 1)
    return w - np.round(w / scale) * scale


def test_error_compensation_gather_and_loss():
    _, h, w, keep = make_problem(seed=5)
    wp = gather_pruning(h, w, keep)
    early, late = (np.asarray(a) for a in restoration.split_early(keep, K // 2))
    e = rtn_error(wp) * keep
    delta = np.asarray(restoration.error_compensation(h.astype(np.float32), e.astype(np.float32), early, late),
                       np.float64)
    assert (delta[~late] == 0).all()
    ref = gather_error(h, e, early, late)
    for c in range(N):
        assert relative(delta[:, c], ref[:, c]) < 1e-4
        r, ev = np.flatnonzero(late[:, c]), np.flatnonzero(early[:, c])
        # stationarity on R of 1/2 D^T H D with D_E = -e_E: H_RR d_R - H_RE e_E = 0
        assert relative(h[np.ix_(r, r)] @ delta[r, c], h[np.ix_(r, ev)] @ e[ev, c]) < 1e-4
    # quantizing E changes w' by -e_E; compensating R lowers the proxy loss of that change
    change_plain = -e * early
    change_comp = change_plain + delta
    assert (proxy(h, change_comp) <= proxy(h, change_plain) * (1 + 1e-6)).all()
    assert proxy(h, change_comp).sum() < 0.95 * proxy(h, change_plain).sum()  # ~0.91 here (weak correlations)
    # entries of e outside E are ignored
    noisy = e + 5.0 * ~early
    delta2 = np.asarray(restoration.error_compensation(h.astype(np.float32), noisy.astype(np.float32),
                                                       early, late, chunk=7), np.float64)
    np.testing.assert_allclose(delta2, delta, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("alpha", [0.5, 0.3, 0.0, 0.25, 1.0])
def test_split_early_partitions_kept_set(alpha):
    _, _, _, keep = make_problem(seed=6)
    early, late = (np.asarray(a) for a in restoration.split_early(keep, math.ceil(alpha * K)))
    assert early.dtype == bool and late.dtype == bool
    np.testing.assert_array_equal(early | late, keep)
    assert not (early & late).any()
    rows = np.arange(K)[:, None]
    assert (rows[early.any(1)] < alpha * K).all() and (np.broadcast_to(rows, keep.shape)[late] >= alpha * K).all()
    for c in range(N):  # the reference: searchsorted(I, alpha*K) kept indices go to E2
        i = np.flatnonzero(keep[:, c])
        cut = np.searchsorted(i, alpha * K)
        np.testing.assert_array_equal(np.flatnonzero(early[:, c]), i[:cut])
        np.testing.assert_array_equal(np.flatnonzero(late[:, c]), i[cut:])


def test_gathered_solves_equal_the_masked_form():
    """Every WANDA column keeps K/2 entries: the |I| x |I| gathered systems give the same
    restorations as the K x K masked ones (float32, 1e-4: two Cholesky factorisations of
    the same SPD block, different summation order)."""
    _, h, w, keep = make_problem(seed=7)
    kept = int(keep.sum(0)[0])
    assert (keep.sum(0) == kept).all()
    h32, w32 = h.astype(np.float32), w.astype(np.float32)
    masked = np.asarray(restoration.pruning_compensation(h32, w32, keep))
    gathered = np.asarray(restoration.pruning_compensation(h32, w32, keep, kept=kept))
    assert relative(gathered, masked) < 1e-4
    early, late = (np.asarray(a) for a in restoration.split_early(keep, K // 2))
    e = (rtn_error(masked) * keep).astype(np.float32)
    assert relative(np.asarray(restoration.error_compensation(h32, e, early, late, kept=kept)),
                    np.asarray(restoration.error_compensation(h32, e, early, late))) < 1e-4
