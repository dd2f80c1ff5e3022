"""metrics.py: hand-computed examples of every metric, fast paths equal to the plain definitions, invariants,
edge cases, compat flags, the writers and the benchmark."""
import json
import math
import sys

import numpy as np
import pytest
import torch

import metrics as M

R = dict(rtol=1e-9, atol=1e-12)  # tolerance for closed-form examples


def rng(seed=0):
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------------------------------------------
# listener metrics: hand-computed examples
# ---------------------------------------------------------------------------------------------------------

def test_mse_example():
    # diff = [[-1,0],[0,-2]]: squares 1+0+0+4 = 5 over 4 -> 1.25
    p, g = [[0, 0], [1, 1]], [[1, 0], [1, 3]]
    assert M.mse(p, g) == 1.25
    assert M.mse(torch.tensor(p, dtype=torch.float32), np.array(g)) == 1.25  # torch in, float out
    with pytest.raises(ValueError, match="same shape"):
        M.mse(np.zeros((2, 2)), np.zeros((3, 2)))


def test_fd_examples():
    # D = 1: (mu_a - mu_b)^2 + (sigma_a - sigma_b)^2 = 9 + 0
    assert np.isclose(M.frechet_distance([[0], [2]], [[3], [5]]), 9.0, **R)
    # tr sqrt(Ca Cb) = sqrt(14): 1 + 4 + 4 - 2 sqrt(14)
    fd = M.frechet_from_stats([0, 0], [[2, 1], [1, 2]], [1, 0], np.diag([1.0, 3.0]))
    assert np.isclose(fd, 9 - 2 * math.sqrt(14), **R) and np.isclose(fd, 1.516685, atol=1e-6)
    # diag(1,4) vs diag(4,1): 5 + 5 - 2 (2 + 2) = 2
    assert np.isclose(M.frechet_from_stats([0, 0], np.diag([1.0, 4]), [0, 0], np.diag([4.0, 1])), 2.0, **R)


def test_fd_invariants():
    a, b = rng(0).standard_normal((300, 7)), rng(1).standard_normal((200, 7)) * 2 + 1
    assert M.frechet_distance(a, a) <= 1e-12
    assert np.isclose(M.frechet_distance(a, b), M.frechet_distance(b, a), rtol=1e-10)
    # trace term = nuclear norm of S_a^1/2 S_b^1/2 (cross-check with numpy SVD)
    (m1, c1), (m2, c2) = M.gaussian_stats(a), M.gaussian_stats(b)

    def sqrtm(c):
        w, U = np.linalg.eigh(c)
        return (U * np.sqrt(np.clip(w, 0, None))) @ U.T
    nuc = np.linalg.svd(sqrtm(c1) @ sqrtm(c2), compute_uv=False).sum()
    ref = ((m1 - m2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * nuc
    assert np.isclose(M.frechet_distance(a, b), ref, rtol=1e-10)
    # 2x2 closed form: tr sqrt(AB) = sqrt(tr AB + 2 sqrt(det AB))
    A, B = np.array([[2.0, 0.5], [0.5, 1.0]]), np.array([[1.0, -0.3], [-0.3, 3.0]])
    tr = math.sqrt(np.trace(A @ B) + 2 * math.sqrt(np.linalg.det(A @ B)))
    assert np.isclose(M.frechet_from_stats([0, 0], A, [0, 0], B), np.trace(A) + np.trace(B) - 2 * tr, **R)
    # numpy cov convention (unbiased)
    assert np.allclose(M.gaussian_stats(b)[1], np.cov(b, rowvar=False), rtol=1e-12)


def test_fd_gaussians_with_known_moments():
    # sets whose sample mean/cov are exactly (mu, S): FD equals the closed form on those moments
    def exact(mu, S, T, seed):
        Z = rng(seed).standard_normal((T, len(mu)))
        Z -= Z.mean(0)
        Z = Z @ np.linalg.inv(np.linalg.cholesky(np.cov(Z, rowvar=False))).T  # sample cov = I
        return Z @ np.linalg.cholesky(S).T + mu
    Ca, Cb = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 1.0, 1.0])  # commuting: (sum (sqrt a - sqrt b)^2)
    x, y = exact(np.array([1.0, 0, 0]), Ca, 500, 0), exact(np.zeros(3), Cb, 400, 1)
    assert np.isclose(M.frechet_distance(x, y), 1 + (1 - 2) ** 2 + (2 - 1) ** 2 + (3 - 1) ** 2, rtol=1e-9)


def test_fd_edge_cases():
    with pytest.raises(ValueError, match="at least 2 frames"):
        M.frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))
    x = rng(0).standard_normal((24, 56))
    x[:, 3] = 1.5  # constant channel, and T <= D: singular covariance
    y = rng(1).standard_normal((30, 56))
    fd = M.frechet_distance(x, y)
    assert np.isfinite(fd) and fd > 0 and M.frechet_distance(x, x) < 1e-12
    z = np.zeros((10, 4))
    assert M.frechet_distance(z, z) == 0.0
    with pytest.raises(ValueError, match="b contains NaN"):
        M.frechet_distance(x, np.full((3, 56), np.nan))


def test_pfd_example_and_gt_zero():
    # s = y = [0,1,2], pred reversed: marginal FD 0, joint covariances [[1,1],[1,1]] vs [[1,-1],[-1,1]]
    s = np.array([[0.0], [1], [2]])
    assert M.frechet_distance(s[::-1], s) < 1e-12
    assert np.isclose(M.paired_frechet_distance(s, s[::-1], s), 4.0, **R)
    with pytest.raises(ValueError):
        M.paired_frechet_distance(np.zeros((4, 1)), s, s)


def test_variation_and_diversity_examples():
    assert M.variation([[0, 0], [2, 4]]) == 2.5  # population variances 1 and 4
    assert M.variation([[1.0, 2.0]]) == 0.0  # T = 1
    assert np.isclose(M.diversity([[0, 0], [3, 4], [6, 8]]), 20 / 3, **R)  # (5 + 10 + 5) / 3
    with pytest.raises(ValueError, match="at least 2"):
        M.diversity([[0.0, 1.0]])


def test_diversity_lm_compat():
    X = rng(0).standard_normal((240, 56))
    assert np.isclose(M.diversity(X), 10.507891, atol=1e-6)
    # two successive rng.choice(T, 30, replace=False) draws: the values for seeds 0 and 1
    assert np.isclose(M.diversity(X, lm_compat=True, seed=0), 10.376062, atol=1e-6)
    assert np.isclose(M.diversity(X, lm_compat=True, seed=1), 10.457512, atol=1e-6)
    assert M.diversity(X, lm_compat=True, seed=5) == M.diversity(X, lm_compat=True, seed=5)  # bitwise
    with pytest.raises(ValueError, match="T > 10"):
        M.diversity(X[:10], lm_compat=True)


def test_diversity_fast_path_matches_plain_and_pdist():
    X = rng(2).standard_normal((2100, 3))
    sub = X[:300]
    ref = np.mean([np.linalg.norm(sub[i] - sub[j]) for i in range(300) for j in range(i + 1, 300)])
    assert np.isclose(M.diversity(sub), ref, rtol=1e-12)
    d = torch.nn.functional.pdist(torch.from_numpy(X)).mean().item()
    assert np.isclose(M.diversity(X), d, rtol=1e-10)
    # the batched Gram route of listener_metrics, one set above the 2048-row chunk and windows of equal shape
    assert np.isclose(M._diversity_many([X])[0], M.diversity(X), rtol=1e-10)
    W = [rng(s).standard_normal((40, 56)) + 5 for s in range(4)] + [np.ones((40, 56))]
    assert np.allclose(M._diversity_many(W), [M.diversity(w) for w in W], rtol=1e-10, atol=0)
    assert M._diversity_many(W)[-1] == 0.0 and M.diversity(W[-1]) == 0.0  # a constant window: exactly 0


def test_affect_examples():
    v = np.zeros(65)
    v[:30], v[30:60], v[60:] = 1, 3, 100  # window means 1 and 3, the 5-frame tail ignored: (1 + 9) / 2
    f = lambda x: x[:, 0]  # noqa: E731
    assert np.isclose(M.affect_l2(v[:, None], np.zeros((65, 1)), f), 5.0, **R)
    assert np.isclose(M.affect_l2(np.arange(10.0)[:, None], np.zeros((10, 1)), f), 20.25, **R)  # 4.5^2
    with pytest.raises(ValueError, match="valence_fn"):
        M.affect_l2(np.zeros((5, 2)), np.zeros((5, 2)), lambda x: x)


def _windows(n=4, T=40, seed=0):
    r = rng(seed)
    return ([r.standard_normal((T, 56)) for _ in range(n)], [r.standard_normal((T, 56)) for _ in range(n)],
            [r.standard_normal((T, 56)) for _ in range(n)])


def test_listener_metrics_gt_row_and_keys():
    _, G, S = _windows()
    out = M.listener_metrics(G, G, S, valence_fn=lambda x: x[:, 0])
    for part in ("all", "exp", "pose"):
        assert out[f"mse/{part}"] == 0.0
        assert out[f"fd/{part}"] <= 1e-12 and out[f"pfd/{part}"] <= 1e-12
        assert out[f"var_pred/{part}"] == out[f"var_gt/{part}"]
        assert out[f"div_pred/{part}"] == out[f"div_gt/{part}"]
    assert out["affect_l2"] == 0.0 and out["n_windows"] == 4
    assert all(isinstance(v, (float, int)) for v in out.values())
    assert set(M.LISTENER_COLUMNS) <= set(out)


def _plain_listener(P, G, S, valence_fn):
    """listener_metrics written with the plain definitions, one window at a time."""
    out = {}
    for part, sl in M.PARTS.items():
        for key, f in (("mse", lambda p, g, s: M.mse(p, g)), ("fd", lambda p, g, s: M.frechet_distance(p, g)),
                       ("pfd", lambda p, g, s: M.paired_frechet_distance(s, p, g)),
                       ("var_pred", lambda p, g, s: M.variation(p)), ("var_gt", lambda p, g, s: M.variation(g)),
                       ("div_pred", lambda p, g, s: M.diversity(p)), ("div_gt", lambda p, g, s: M.diversity(g))):
            out[f"{key}/{part}"] = np.mean([f(p[:, sl], g[:, sl], s[:, sl]) for p, g, s in zip(P, G, S)])
    out["affect_l2"] = np.mean([M.affect_l2(p, g, valence_fn) for p, g in zip(P, G)])
    return out


def test_listener_metrics_fast_paths_match_plain_definitions():
    P, G, S = _windows(n=3, T=130)  # T > 2 x 56: full-rank covariances for FD and P-FD of every part
    P[1], G[1], S[1] = P[1][:120], G[1][:120], S[1][:120]  # windows may differ in length
    out, plain = M.listener_metrics(P, G, S, valence_fn=lambda x: x[:, 0]), _plain_listener(P, G, S, lambda x: x[:, 0])
    for k, v in plain.items():
        assert np.isclose(out[k], v, rtol=1e-10, atol=0), k
    # windows shorter than their dims, a constant channel: the square roots of eigenvalues that are 0 up to
    # round-off amplify it, so the fast path's Cholesky route and the plain eigen route agree to ~1e-8 only
    P, G, S = _windows(n=3, T=30)
    G[2][:, 3] = 0.7
    out, plain = M.listener_metrics(P, G, S, valence_fn=lambda x: x[:, 0]), _plain_listener(P, G, S, lambda x: x[:, 0])
    for k, v in plain.items():
        assert np.isclose(out[k], v, rtol=1e-6, atol=0), k


def test_listener_metrics_groups_and_compat():
    P, G, S = _windows(n=3, T=30)
    P[1], G[1], S[1] = P[1][:25], G[1][:25], S[1][:25]
    grouped = M.listener_metrics(P, G, S, groups=[7, 7, 3])  # per-video: windows 0 and 1 concatenated
    cat = lambda X: np.concatenate([X[0], X[1]])  # noqa: E731
    assert grouped["n_windows"] == 2  # (window 2 has 30 < 56 frames: FD agrees to ~1e-8, see above)
    assert np.isclose(grouped["fd/all"], (M.frechet_distance(cat(P), cat(G)) + M.frechet_distance(P[2], G[2])) / 2,
                      rtol=1e-6)
    a = M.listener_metrics(P, G, S, lm_compat_diversity=True, seed=3)
    assert a == M.listener_metrics(P, G, S, lm_compat_diversity=True, seed=3)  # bitwise repeatable
    with pytest.raises(ValueError, match=r"preds\[0\] contains NaN"):
        M.listener_metrics([np.full((30, 56), np.nan)], G[:1], S[:1])


# ---------------------------------------------------------------------------------------------------------
# REACT metrics
# ---------------------------------------------------------------------------------------------------------

def test_ccc_examples_and_invariants():
    x, y = [0, 1, 2, 3], [0, 2, 4, 6]
    assert np.isclose(M.ccc(x, y), 2 * 2.5 / (1.25 + 5 + 2.25), **R)  # 0.588235
    assert np.isclose(M.ccc(x, y, react_compat=True), 0.5882352934, atol=1e-10)
    assert M.ccc(np.ones(4), np.ones(4)) == 1.0 and M.ccc(np.ones(4), np.ones(4), react_compat=True) == 0.0
    assert M.ccc(np.ones(4), [0, 1, 0, 1]) == 0.0  # one constant channel
    z = rng(0).standard_normal((50, 5))
    z[:, 2] = 0.3
    assert np.isclose(M.ccc(z, z), 1.0, **R)
    a, b = rng(1).standard_normal((50, 5)), rng(2).standard_normal((50, 5))  # compat: only the 1e-8 shrink
    assert abs(M.ccc(a, b) - M.ccc(a, b, react_compat=True)) < 1e-7


def test_fr_corr_example():
    L0 = np.array([0, 1, 2, 3.0])
    L = np.stack([L0, L0[::-1]])[:, :, None]  # (M=2, T=4, D=1)
    P = np.stack([L0, 2 * L0])[None, :, :, None]  # (N=1, K=2, T=4, D=1)
    out = M.fr_corr(P, L, [[True, True]])
    assert np.isclose(out["sum"], 1 + 10 / 17, **R) and np.isclose(out["mean"], (1 + 10 / 17) / 2, **R)
    with pytest.raises(ValueError, match="empty row"):
        M.fr_corr(P, L, [[False, False]])


def test_fr_corr_fast_path_matches_plain_ccc():
    r = rng(4)
    P, L = r.random((3, 4, 20, 25)), r.random((5, 20, 25))
    L[1, :, 2] = 0.5  # a constant channel
    A = np.array([[1, 1, 0, 0, 1], [0, 1, 0, 0, 0], [1, 1, 1, 1, 1]], bool)
    for compat in (False, True):
        S = np.array([[max(M.ccc(L[j], P[k, i], react_compat=compat) for j in np.flatnonzero(A[k]))
                       for i in range(4)] for k in range(3)])
        assert np.isclose(M.fr_corr(P, L, A, react_compat=compat)["mean"], S.mean(), rtol=1e-12)


def _naive_dtw(a, b):
    Ta, Tb = len(a), len(b)
    Rm = np.full((Ta + 1, Tb + 1), np.inf)
    Rm[0, 0] = 0
    for i in range(1, Ta + 1):
        for j in range(1, Tb + 1):
            Rm[i, j] = ((a[i - 1] - b[j - 1]) ** 2).sum() + min(Rm[i - 1, j], Rm[i, j - 1], Rm[i - 1, j - 1])
    return math.sqrt(Rm[Ta, Tb])


def test_dtw_example_and_three_paths_agree():
    assert np.isclose(M.dtw([0, 1, 2], [0, 2]), 1.0, **R)  # R = [[0,4],[1,1],[5,1]]
    assert np.isclose(M.dtw(np.full((5, 3), 1.0), np.full((5, 3), 3.0)), math.sqrt(5) * math.sqrt(12), **R)
    r = rng(0)
    for Ta, Tb in [(7, 7), (9, 4), (1, 6), (5, 1), (1, 1)]:
        a, b = r.standard_normal((Ta, 3)) * 10 + 100, r.standard_normal((Tb, 3)) * 10 + 100
        ref = _naive_dtw(a, b)
        assert np.isclose(M.dtw(a, b), ref, rtol=1e-10)
        assert np.isclose(M.dtw(b, a), ref, rtol=1e-10)  # symmetric
        assert np.isclose(M.dtw_batch(a[None], b[None]).item(), ref, rtol=1e-10)
    A, B = r.standard_normal((5, 12, 2)), r.standard_normal((5, 8, 2))
    out = M.dtw_batch(torch.from_numpy(A), torch.from_numpy(B), max_bytes=2 * 8 * 2 * (12 + 8))  # chunks of 2
    assert np.allclose(out.numpy(), [_naive_dtw(a, b) for a, b in zip(A, B)], rtol=1e-10)


@pytest.mark.parametrize("d", [1, 2, 8, 15])
def test_dtw_batch_equals_plain_dtw(d):
    r = rng(d)
    for Ta, Tb, chunk in [(23, 23, 3), (31, 9, 2), (9, 31, 5), (1, 12, 1), (12, 1, 4)]:
        A, B = r.random((5, Ta, d)), r.random((5, Tb, d))
        A[1, :min(Ta, Tb)] = B[1, :min(Ta, Tb)]  # a near match: costs that are exactly 0
        if Ta == Tb:
            A[2] = B[2]  # identical: exactly 0
        out = M.dtw_batch(A, B, max_bytes=chunk * 8 * d * (Ta + Tb)).numpy()
        ref = [M.dtw(a, b) for a, b in zip(A, B)]  # the same additions; numpy may sum the d terms in another order
        assert np.allclose(out, ref, rtol=1e-13, atol=0) and (Ta != Tb or out[2] == ref[2] == 0.0)


def test_dtw_batch_agrees_with_the_cdist_cost():
    # the previous implementation took C = cdist(a, b)^2 (a square root, then its square): agreement to 1e-12
    r = rng(5)
    A, B = torch.from_numpy(r.random((3, 40, 15))), torch.from_numpy(r.random((3, 33, 15)))
    for a, b, got in zip(A, B, M.dtw_batch(A, B)):
        C = (torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist") ** 2).numpy()
        Rm = np.full((41, 34), np.inf)
        Rm[0, 0] = 0
        for i in range(1, 41):
            for j in range(1, 34):
                Rm[i, j] = C[i - 1, j - 1] + min(Rm[i - 1, j], Rm[i, j - 1], Rm[i - 1, j - 1])
        assert np.isclose(got.item(), math.sqrt(Rm[-1, -1]), rtol=1e-12, atol=0)


@pytest.mark.parametrize("d", [1, 2, 8, 15])
def test_dtw_one_to_many_equals_plain_dtw(d):
    # fr_dist's CPU path: costs from matrix products written in anti-diagonal order, exact redo where needed
    r = rng(10 + d)
    for Ta, Tb in [(23, 23), (31, 9), (9, 31), (1, 12), (12, 1)]:
        A, B = r.random((5, Ta, d)) * 3 + 100, r.random((4, Tb, d)) * 3 + 100  # an offset, as raw units have
        if Ta == Tb:
            B[1] = A[2]  # identical: exactly 0
            B[2] = A[3] + 1e-7 * r.standard_normal((Ta, d))  # nearly identical: recomputed from the differences
        bufs = {}
        for max_pairs in (1, 8, 64):  # several reactions per sweep, or one
            out = M._dtw_one_to_many(A, B, max_pairs=max_pairs, bufs=bufs)
            ref = np.array([[M.dtw(a, b) ** 2 for b in B] for a in A])
            assert np.allclose(out, ref, rtol=1e-12, atol=0)
            if Ta == Tb:
                assert out[2, 1] == 0.0 and np.isclose(out[3, 2], ref[3, 2], rtol=1e-12, atol=0)


def test_fr_dist_cpu_path_equals_the_batched_path():
    r = rng(11)
    P, L = r.random((3, 4, 40, 25)), r.random((5, 40, 25))
    L[2] = P[1, 0]  # speaker 1's first sample is a real reaction: its best match is exactly 0
    A = np.array([[1, 1, 0, 0, 1], [0, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    fast = M.fr_dist(P, L, A)
    kk, jj = np.nonzero(A)  # the generic path: every (k, i, j) triple through dtw_batch
    S = np.full((3, 4), np.inf)
    for k, j in zip(kk, jj):
        D = sum(w * M.dtw_batch(P[k, :, :, s:e], np.repeat(L[j][None, :, s:e], 4, 0)).numpy()
                for s, e, w in M.REACT_BLOCKS)
        S[k] = np.minimum(S[k], D)
    assert np.isclose(fast["mean"], S.mean(), rtol=1e-13) and S[1, 0] == 0.0


def test_dtw_torch_sweep_matches_numpy():
    # the loop that dtw_batch runs on a GPU, run here in torch on the CPU
    r = rng(9)
    A, Br = r.random((8, 30, 4)), r.random((8, 22, 4))
    ref = M._dtw_sweep(A, Br, np)
    assert np.allclose(M._dtw_sweep(torch.from_numpy(A), torch.from_numpy(Br), torch).numpy(), ref, rtol=1e-13)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dtw_batch_on_gpu():
    r = rng(7)
    A, B = r.random((6, 40, 8)), r.random((6, 30, 8))
    out = M.dtw_batch(torch.from_numpy(A).cuda(), torch.from_numpy(B).cuda())
    assert out.device.type == "cuda" and np.allclose(out.cpu().numpy(), M.dtw_batch(A, B).numpy(), rtol=1e-12)


def test_dtw_identical_and_shifted():
    x = np.sin(np.linspace(0, 6, 60))[:, None]
    assert M.dtw(x, x) == 0.0 and M.dtw_batch(x[None], x[None]).item() == 0.0
    y = np.roll(x, 3, axis=0)
    assert M.dtw(x, y) < np.linalg.norm(x - y)


def test_fr_dist_example_and_compat():
    # P = 0, L = 1 over 25 dims, T = 4: DTW = sqrt(4 d) per block; 2 (sqrt15/15 + sqrt2 + sqrt8/8)
    out = M.fr_dist(np.zeros((1, 1, 4, 25)), np.ones((1, 4, 25)), [[True]])
    ref = 2 * (math.sqrt(15) / 15 + math.sqrt(2) + math.sqrt(8) / 8)
    assert np.isclose(out["sum"], ref, **R) and np.isclose(out["mean"], ref, **R) and np.isclose(ref, 4.051932, atol=1e-6)
    r = rng(3)
    P, L = r.random((2, 3, 10, 25)), r.random((3, 10, 25))
    A = np.array([[1, 0, 1], [0, 1, 0]], bool)
    s = M.fr_dist(P, L, A)
    D = lambda p, l: sum(w * M.dtw(p[:, a:b], l[:, a:b]) for a, b, w in M.REACT_BLOCKS)  # noqa: E731
    S = np.array([[min(D(P[k, i], L[j]) for j in np.flatnonzero(A[k])) for i in range(3)] for k in range(2)])
    assert np.isclose(s["mean"], S.mean(), rtol=1e-14) and np.isclose(s["sum"], 3 * S.mean(), rtol=1e-14)
    c = M.fr_dist(P, L, A, react_compat=True)  # float32 inputs: differs only by rounding
    assert c["mean"] != s["mean"] and np.isclose(c["mean"], s["mean"], rtol=1e-6)


def test_fr_div_var_dvs_examples():
    assert np.isclose(M.fr_div(np.array([[[[0, 0]], [[1, 1.0]]]])), 1.0, **R)  # K=2, T=1, D=2
    assert math.isnan(M.fr_div(np.zeros((3, 1, 5, 2))))  # K = 1
    assert np.isclose(M.fr_var(np.array([0, 2.0]).reshape(1, 1, 2, 1)), 2.0, **R)  # ddof 1
    with pytest.raises(ValueError, match="T >= 2"):
        M.fr_var(np.zeros((1, 1, 1, 2)))
    assert np.isclose(M.fr_dvs(np.array([0, 2.0]).reshape(2, 1, 1, 1)), 4.0, **R)  # 8 / 2
    assert math.isnan(M.fr_dvs(np.zeros((1, 2, 3, 4))))
    P = rng(0).standard_normal((3, 4, 5, 2))  # brute force over pairs
    div = np.mean([np.mean([((P[k, i] - P[k, j]) ** 2).mean() for i in range(4) for j in range(4) if i != j])
                   for k in range(3)])
    dvs = sum(((P[k, i] - P[l, i]) ** 2).sum() for i in range(4) for k in range(3) for l in range(3) if k != l)
    assert np.isclose(M.fr_div(P), div, rtol=1e-12) and np.isclose(M.fr_dvs(P), dvs / (3 * 2 * 4 * 5 * 2), rtol=1e-12)


def test_tlcc_examples():
    s = np.array([0, 1, 0, 0, 3, 0, 0, 0, 2, 0, 1, 1, 0, 0, 0, 4, 0, 0, 1, 0.0])
    p = np.r_[0, 0, s[:-2]]  # the listener follows by 2 frames: r(2) = 1
    assert M.tlcc_offset(p, s, max_lag=3) == 2.0 and M.tlcc_offset(p, s, max_lag=3, react_compat=True) == 2.0
    Pc, Sc = np.stack([p, np.zeros(20)], 1), np.stack([s, s[::-1]], 1)  # a constant predicted channel
    assert M.tlcc_offset(Pc, Sc, max_lag=3) == 2.0
    assert M.tlcc_offset(Pc, Sc, max_lag=3, react_compat=True) == 3.0  # first NaN -> lag -max_lag
    assert math.isnan(M.tlcc_offset(np.zeros(20), s, max_lag=3))  # no valid lag
    with pytest.raises(ValueError, match="T >= max_lag"):
        M.tlcc_offset(p[:5], s[:5], max_lag=3)


def test_fr_syn_fast_path_matches_plain_tlcc():
    r = rng(8)
    N, K, T, D = 3, 4, 40, 5
    S = r.standard_normal((N, T, D))
    P = np.stack([[np.roll(S[k], 2 + i, 0) + 0.5 * r.standard_normal((T, D)) for i in range(K)] for k in range(N)])
    P[0, 1, :, 2] = 1.0  # a constant channel
    P[2, 3] = 0.0  # a constant reaction: no valid lag
    for compat in (False, True):
        lags = np.array([[M.tlcc_offset(P[k, i], S[k], max_lag=9, react_compat=compat) for i in range(K)]
                         for k in range(N)])
        ok = ~np.isnan(lags)
        assert M.fr_syn(P, S, fps=5, seconds=2, react_compat=compat) == lags[ok].mean()
        assert M.fr_syn(P, S, fps=5, seconds=2, first_sample_only=True, react_compat=compat) == np.nanmean(lags[:, 0])


def test_fr_syn_and_react_metrics():
    r = rng(1)
    N, K, T, D = 3, 4, 60, 25
    S = r.standard_normal((N, T, D))
    P = np.stack([np.stack([np.roll(S[k], 5, 0) + 0.1 * r.standard_normal((T, D)) for _ in range(K)])
                  for k in range(N)])
    assert M.fr_syn(P, S, fps=10, seconds=2) == 5.0  # lag window [-19, 19] contains the true lag 5
    assert M.fr_syn(P, S, fps=10, seconds=2, react_compat=True) == 5.0  # generic input: same answer
    L = np.concatenate([S, S + 0.5 * r.standard_normal((N, T, D))])  # pool of M = 6 reactions
    A = np.concatenate([np.eye(N, dtype=bool), np.eye(N, dtype=bool)], 1)
    gt = M.react_metrics(np.repeat(L[:N, None], K, 1), L, S, A, fps=10)  # GT x K
    assert np.isclose(gt["frcorr_sum"], K, **R) and np.isclose(gt["frcorr_mean"], 1.0, **R)
    assert gt["frdist_sum"] == 0.0 and gt["frdiv"] == 0.0 and gt["frsyn_skipped"] == 0 and gt["K"] == K
    out = M.react_metrics(P, L, S, A, fps=10)
    assert set(M.REACT_COLUMNS) <= set(out) and all(np.isfinite(v) for v in out.values())
    fast = M.react_metrics(P, L, S, A, fps=10, with_dist=False)  # the ablation-grid form: all but FRDist
    assert math.isnan(fast["frdist_sum"]) and math.isnan(fast["frdist_mean"])
    assert {k: v for k, v in fast.items() if "frdist" not in k} == {k: v for k, v in out.items() if "frdist" not in k}
    mf = np.zeros((N, K, T, D))  # a constant output: FRSyn skips it (sensible)
    assert math.isnan(M.react_metrics(mf, L, S, A, fps=10)["frsyn"])


# ---------------------------------------------------------------------------------------------------------
# mesh metrics
# ---------------------------------------------------------------------------------------------------------

def test_mesh_examples():
    gA, gB = np.zeros((1, 2, 3)), np.zeros((3, 2, 3))
    pA, pB = gA.copy(), gB.copy()
    pA[0, 0, 0], pA[0, 1, 0] = 2, 1  # lip errors 4 and 1 -> e = 4
    pB[:, 0, 0] = 1  # e = 1 on 3 frames
    assert np.isclose(M.lip_vertex_error([pA, pB], [gA, gB], [0, 1]), 1.75, **R)  # 7 / 4
    assert np.isclose(M.lip_vertex_error([pA, pB], [gA, gB], [0, 1], per_sequence=True), 2.5, **R)
    g = np.zeros((2, 1, 3))
    g[1, 0, 0] = 1  # ||m||^2 = 0, 1 -> std 0.5; prediction = template -> 0
    assert np.isclose(M.fdd([np.zeros((2, 1, 3))], [g], [np.zeros((1, 3))], [0]), 0.5, **R)
    assert np.isclose(M.fdd([g], [np.zeros((2, 1, 3))], [np.zeros((1, 3))], [0], absolute=True), 0.5, **R)
    p = np.zeros((1, 2, 3))
    p[0, 0] = [3, 4, 0]
    assert np.isclose(M.mean_vertex_error([p], [np.zeros((1, 2, 3))]), 2.5, **R)
    with pytest.raises(ValueError, match="lip_idx is empty"):
        M.lip_vertex_error([p], [p], [])


def test_face_metrics_gt_row_and_truncation():
    r = rng(0)
    G = [r.standard_normal((T, 30, 3)) for T in (12, 1, 7)]
    tm = [r.standard_normal((30, 3)) for _ in G]
    out = M.face_metrics(G, G, tm, np.arange(5), np.arange(10, 20))
    assert out == {"lve": 0.0, "lve_seq": 0.0, "fdd": 0.0, "fdd_abs": 0.0, "mve": 0.0}
    longer = [np.concatenate([g, g[:3]]) for g in G]  # pred longer than GT: truncated to the GT length
    assert M.mean_vertex_error(longer, G) == 0.0
    assert set(M.FACE_COLUMNS) == set(out)


# ---------------------------------------------------------------------------------------------------------
# baselines
# ---------------------------------------------------------------------------------------------------------

def test_baseline_nn_motion_and_audio_examples():
    bank_l = np.arange(2 * 3 * 2.0).reshape(2, 3, 2)
    keys = np.array([[[1, 0.0]], [[0, 1.0]]])  # time-means (1,0) and (0,1)
    q = np.array([[[0, 2.0], [0, 1.0]]])  # mean (0, 1.5): raw cos (0, 1), standardised (-0.949, 0.949)
    for std in (True, False):
        out = M.baseline_nn_motion(q, keys, bank_l, standardize=std)
        assert out.shape == (1, 2, 2) and np.array_equal(out[0], bank_l[1, :2])
    audio_keys = np.array([[[3, 5.0]], [[1, 1.0]]])  # max over time: (3,5), (1,1); query (2,4)
    out = M.baseline_nn_audio(np.array([[[2, 0.0], [0, 4.0]]]), audio_keys, bank_l, standardize=False, T=2)
    assert np.array_equal(out[0], bank_l[0, :2])  # 0.997054 > 0.948683
    with pytest.raises(ValueError, match="fewer than"):
        M.baseline_nn_motion(np.zeros((1, 5, 2)), keys, bank_l)


def test_baseline_text():
    assert M.window_text([("a", -2.0), ("b", 1.0), ("c", 5.0), ("d", -4.0)], 0.0, 5.0) == "a b"
    bank_l = np.arange(2 * 3 * 2.0).reshape(2, 3, 2)
    out = M.baseline_nn_text(["i agree"], ["Yes, yes I agree", "no way"], bank_l)  # sims 2/sqrt(12) and 0
    assert np.array_equal(out[0], bank_l[0])
    empty = [M.baseline_nn_text(["zzz"] * 8, ["a", "b"], bank_l, seed=s) for s in range(4)]
    assert np.array_equal(empty[0], M.baseline_nn_text(["zzz"] * 8, ["a", "b"], bank_l, seed=0))
    assert any(not np.array_equal(e[:, 0], bank_l[[0] * 8, 0]) for e in empty)  # seeded random, not always 0


def test_baseline_random_walk_and_mean_frame():
    bank = rng(0).standard_normal((50, 20, 4))
    a = M.baseline_random(bank, 6, 10, seed=1)
    assert a.shape == (6, 10, 4) and np.array_equal(a, M.baseline_random(bank, 6, 10, seed=1))
    w = M.baseline_random_walk_codes([[0, 1, 0, 1]], 20, 4, 3, seed=0)  # pi = (.5, .5, 0): alternating
    assert w.dtype == np.int64 and all(r in ([0, 1, 0, 1], [1, 0, 1, 0]) for r in w.tolist())
    assert {r[0] for r in w.tolist()} == {0, 1}
    w2 = M.baseline_random_walk_codes([[0, 1, 0, 1]], 20, 4, 3, alpha=1.0, seed=0)
    assert np.array_equal(w2, M.baseline_random_walk_codes([[0, 1, 0, 1]], 20, 4, 3, alpha=1.0, seed=0))
    mf = M.baseline_mean_frame(np.array([[[0, 0.0]], [[2, 4.0]]]), 2)  # (1, 2) repeated
    assert np.array_equal(mf, [[1, 2], [1, 2]]) and M.variation(mf) == 0.0
    assert np.isclose(M.frechet_distance(mf, [[0, 0], [2, 2]]), 5.0, **R)  # 1 + tr cov_gt (0 + 4)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        M.baseline_random_walk_codes([[0, 3]], 2, 4, 3)


# ---------------------------------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------------------------------

def test_format_table_and_json_roundtrip(tmp_path):
    rows = {"GT": {"mse/all": 0.0, "fd/all": 1.23456e-5}, "model": {"mse/all": float("nan"), "n_windows": 3}}
    t = M.format_table(rows)
    lines = t.splitlines()
    assert lines[0] == "| row | mse/all | fd/all | n_windows |" and len(lines) == 4
    assert lines[2] == "| GT | 0 | 1.235e-05 | – |" and lines[3] == "| model | – | – | 3 |"
    assert M.format_table(rows, metrics=["fd/all"]).splitlines()[0] == "| row | fd/all |"
    path = M.write_metrics_json(rows, tmp_path / "a" / "b" / "metrics.json")
    assert json.loads(path.read_text())["model"]["mse/all"] is None
    assert json.loads(path.read_text())["GT"] == rows["GT"]
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]  # no temp file left


def test_nan_inputs_name_the_argument():
    bad = np.array([[0.0, np.inf]])
    for fn, args, name in [(M.variation, (bad,), "x"), (M.ccc, (np.zeros((1, 2)), bad), "y"),
                           (M.dtw, (bad, np.zeros((1, 2))), "a"), (M.mse, (np.zeros((1, 2)), bad), "gt")]:
        with pytest.raises(ValueError, match=f"^{name} contains NaN"):
            fn(*args)
    with pytest.raises(ValueError, match="b contains NaN"):
        M.dtw_batch(torch.zeros(1, 2, 2), torch.full((1, 2, 2), float("nan")))


# ---------------------------------------------------------------------------------------------------------
# integration on the tiny synthetic world (the rows every method's table shows)
# ---------------------------------------------------------------------------------------------------------

def test_tiny_world_tables(tiny_world):
    import data
    test, train = data.load_listener(tiny_world / "listener", "test"), data.load_listener(tiny_world / "listener", "train")
    fm = data.FaceModel()
    G = [it["listener"] for it in test]
    S = [it["speaker"] for it in test]
    T = G[0].shape[0]
    bank_l, bank_s = np.stack([it["listener"] for it in train]), np.stack([it["speaker"] for it in train])
    preds = {"GT": G, "alt-GT": [it["alt_listener"][0] for it in test],
             "baseline:mime": S,  # the speaker's own motion
             "baseline:mean_frame": [M.baseline_mean_frame(bank_l, T)] * len(G),
             "baseline:random": list(M.baseline_random(bank_l, len(G), T, seed=0)),
             "baseline:nn_motion": list(M.baseline_nn_motion(np.stack(S), bank_s, bank_l))}
    rows = {name: M.listener_metrics(P, G, S, valence_fn=fm.valence) for name, P in preds.items()}
    gt, alt, mf = rows["GT"], rows["alt-GT"], rows["baseline:mean_frame"]
    assert gt["mse/all"] == 0.0 and gt["fd/all"] <= 1e-12 and gt["pfd/all"] <= 1e-12 and gt["affect_l2"] == 0.0
    assert alt["mse/all"] > 0 and alt["fd/all"] > 0 and mf["var_pred/all"] == 0.0 and mf["div_pred/all"] == 0.0
    table = M.format_table(rows, M.LISTENER_COLUMNS)
    assert len(table.splitlines()) == 2 + len(rows) and "–" not in table
    # REACT-style: attributes, pool = each segment's GT + its alternatives, A marks the own ones
    Ga = np.stack([it["listener_attr"] for it in test])  # (N, T, 25)
    Alt = np.stack([it["alt_listener_attr"] for it in test])  # (N, K, T, 25)
    N, K = Alt.shape[:2]
    pool = np.concatenate([Ga, Alt.reshape(N * K, T, -1)])
    A = np.zeros((N, N + N * K), bool)
    A[np.arange(N), np.arange(N)] = True
    for k in range(N):
        A[k, N + k * K: N + (k + 1) * K] = True
    Sa = np.stack([it["speaker_attr"] for it in test])
    r_gt = M.react_metrics(np.repeat(Ga[:, None], 3, 1), pool, Sa, A, fps=data.FPS)
    assert np.isclose(r_gt["frcorr_sum"], 3, **R) and r_gt["frdist_sum"] == 0.0
    A_loo = A.copy()
    A_loo[:, N:] = False  # alt-GT scored against the own GT only (leave its own alternatives out)
    r_alt = M.react_metrics(Alt, pool, Sa, A_loo, fps=data.FPS)
    assert r_alt["frdist_mean"] > 0 and r_alt["frdiv"] > 0 and -1 <= r_alt["frcorr_mean"] < 1
    # talking faces: GT row 0; a static template is not
    talk = data.load_talking(tiny_world / "vocaset", "test")
    lip, upper = data.talking_regions(tiny_world / "vocaset")
    Vg, tm = [t["vertices"] for t in talk], [t["template"] for t in talk]
    assert M.face_metrics(Vg, Vg, tm, lip, upper) == {k: 0.0 for k in M.FACE_COLUMNS}
    static = M.face_metrics([np.repeat(t[None], len(v), 0) for t, v in zip(tm, Vg)], Vg, tm, lip, upper)
    assert static["lve"] > 0 and static["fdd"] > 0 and static["mve"] > 0


# ---------------------------------------------------------------------------------------------------------
# benchmark
# ---------------------------------------------------------------------------------------------------------

def test_bench_runs_and_prints_both_sides(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tslearn.metrics", None)  # as if not installed (its JIT compile takes ~30 s)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        M.bench(n_speakers=2, K=2, n_appropriate=2, T=30, fd_frames=200)
        assert torch.get_num_threads() == 2  # the bench runs on one thread and restores the count
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "FD of two (200, 56) frame sets: ours" in out and "FRDist, 2 speakers x 2 samples x 2 appropriate" in out
    assert "reference: tslearn not installed" in out
    for line in out.splitlines():  # a reference that is installed (scipy) agrees with ours
        if "largest difference" in line:
            assert float(line.split("largest difference ")[1].split()[0]) < 1e-9, line
