"""metrics.py: every example value of METRICS.md, invariants, edge cases, compat flags, reporting helpers."""
import json
import math

import numpy as np
import pytest
import torch

import metrics as M

R = dict(rtol=1e-9, atol=1e-12)  # METRICS.md §0 tolerance for closed-form examples


def rng(seed=0):
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------------------------------------------
# §1 listener metrics: hand-computed examples
# ---------------------------------------------------------------------------------------------------------

def test_mse_and_mean_l2_norm_example():
    # diff = [[-1,0],[0,-2]]: squares 1+0+0+4 = 5 over 4 -> 1.25; norms 1 and 2 -> mean 1.5
    p, g = [[0, 0], [1, 1]], [[1, 0], [1, 3]]
    assert M.mse(p, g) == 1.25 and M.mean_l2_norm(p, g) == 1.5
    assert M.mse(torch.tensor(p, dtype=torch.float32), np.array(g)) == 1.25  # torch in, float out
    with pytest.raises(ValueError, match="same shape"):
        M.mse(np.zeros((2, 2)), np.zeros((3, 2)))


def test_fd_examples():
    # D = 1: (mu_a - mu_b)^2 + (sigma_a - sigma_b)^2 = 9 + 0
    assert np.isclose(M.frechet_distance([[0], [2]], [[3], [5]]), 9.0, **R)
    # tr sqrt(S1 S2) = sqrt(14): 1 + 4 + 4 - 2 sqrt(14)
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
    S1, S2 = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 1.0, 1.0])  # commuting: (sum (sqrt a - sqrt b)^2)
    x, y = exact(np.array([1.0, 0, 0]), S1, 500, 0), exact(np.zeros(3), S2, 400, 1)
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
    # two successive rng.choice(T, 30, replace=False) draws: METRICS.md's values for seeds 0 and 1
    assert np.isclose(M.diversity(X, lm_compat=True, seed=0), 10.376062, atol=1e-6)
    assert np.isclose(M.diversity(X, lm_compat=True, seed=1), 10.457512, atol=1e-6)
    assert M.diversity(X, lm_compat=True, seed=5) == M.diversity(X, lm_compat=True, seed=5)  # bitwise
    with pytest.raises(ValueError, match="T > 10"):
        M.diversity(X[:10], lm_compat=True)


def test_diversity_chunked_path_matches_pdist():
    X = rng(2).standard_normal((2100, 3))
    sub = X[:300]
    ref = np.mean([np.linalg.norm(sub[i] - sub[j]) for i in range(300) for j in range(i + 1, 300)])
    assert np.isclose(M.diversity(sub), ref, rtol=1e-12)
    d = torch.nn.functional.pdist(torch.from_numpy(X)).mean().item()
    assert np.isclose(M.diversity(X), d, rtol=1e-10)


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


def test_listener_metrics_matches_single_functions_and_groups():
    P, G, S = _windows(n=3, T=30)
    P[1], G[1], S[1] = P[1][:25], G[1][:25], S[1][:25]  # windows may differ in length
    out = M.listener_metrics(P, G, S)
    assert np.isclose(out["fd/exp"], np.mean([M.frechet_distance(p[:, M.EXP], g[:, M.EXP])
                                              for p, g in zip(P, G)]), rtol=1e-10)
    assert np.isclose(out["pfd/pose"], np.mean([M.paired_frechet_distance(s[:, M.POSE], p[:, M.POSE], g[:, M.POSE])
                                                for p, g, s in zip(P, G, S)]), rtol=1e-10)
    assert np.isclose(out["mse/all"], np.mean([M.mse(p, g) for p, g in zip(P, G)]), **R)
    grouped = M.listener_metrics(P, G, S, groups=[7, 7, 3])  # per-video: windows 0 and 1 concatenated
    cat = lambda X: np.concatenate([X[0], X[1]])  # noqa: E731
    assert grouped["n_windows"] == 2
    assert np.isclose(grouped["fd/all"], (M.frechet_distance(cat(P), cat(G)) + M.frechet_distance(P[2], G[2])) / 2,
                      rtol=1e-10)
    a = M.listener_metrics(P, G, S, lm_compat_diversity=True, seed=3)
    assert a == M.listener_metrics(P, G, S, lm_compat_diversity=True, seed=3)  # bitwise repeatable
    with pytest.raises(ValueError, match=r"preds\[0\] contains NaN"):
        M.listener_metrics([np.full((30, 56), np.nan)], G[:1], S[:1])


# ---------------------------------------------------------------------------------------------------------
# §2 VQ metrics
# ---------------------------------------------------------------------------------------------------------

def test_vq_examples():
    assert M.reconstruction_error([[0, 0], [1, 1]], [[1, 0], [1, 3]]) == 1.25
    assert M.commitment_distance([[1, 2]], [[0, 0]]) == 2.5  # (1 + 4) / 2
    assert np.isclose(M.codebook_perplexity([0, 0, 1, 1], 4), 2.0, **R)
    assert np.isclose(M.codebook_perplexity([0, 0, 0, 1], 4), math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))), **R)
    assert np.isclose(M.codebook_perplexity([0, 0, 0, 1], 4), 1.754765, atol=1e-6)
    assert np.isclose(M.codebook_perplexity(torch.tensor([[0, 1], [2, 3]]), 4), 4.0, **R)
    assert M.active_code_fraction([0, 0, 1, 1], 4) == 0.5
    assert M.active_code_fraction([0, 0, 1, 1], 4, min_count=3) == 0.0
    assert M.code_usage([3, 3, 0], 4).tolist() == [1, 0, 0, 2]
    with pytest.raises(ValueError, match="empty"):
        M.code_usage([], 4)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        M.code_usage([0, 4], 4)
    assert M.codebook_perplexity([2], 1 + 2) == 1.0  # a single token


# ---------------------------------------------------------------------------------------------------------
# §3 REACT metrics
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
    out = M.dtw_batch(torch.from_numpy(A), torch.from_numpy(B), max_bytes=2 * 12 * 8 * 8)  # chunks of 2
    assert np.allclose(out.numpy(), [_naive_dtw(a, b) for a, b in zip(A, B)], rtol=1e-10)


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
    assert np.isclose(s["mean"], S.mean(), rtol=1e-10) and np.isclose(s["sum"], 3 * S.mean(), rtol=1e-10)
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
    P2, S2 = np.stack([p, np.zeros(20)], 1), np.stack([s, s[::-1]], 1)  # a constant predicted channel
    assert M.tlcc_offset(P2, S2, max_lag=3) == 2.0
    assert M.tlcc_offset(P2, S2, max_lag=3, react_compat=True) == 3.0  # first NaN -> lag -max_lag
    assert math.isnan(M.tlcc_offset(np.zeros(20), s, max_lag=3))  # no valid lag
    with pytest.raises(ValueError, match="T >= max_lag"):
        M.tlcc_offset(p[:5], s[:5], max_lag=3)


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
# §4 mesh metrics
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
# §5 baselines
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


def test_baseline_random_codes_walk_mean_mime():
    bank = rng(0).standard_normal((50, 20, 4))
    a = M.baseline_random(bank, 6, 10, seed=1)
    assert a.shape == (6, 10, 4) and np.array_equal(a, M.baseline_random(bank, 6, 10, seed=1))
    c = M.baseline_random_codes(5, 7, 3, seed=0)
    assert c.shape == (5, 7) and c.dtype == np.int64 and c.min() >= 0 and c.max() < 3
    w = M.baseline_random_walk_codes([[0, 1, 0, 1]], 20, 4, 3, seed=0)  # pi = (.5, .5, 0): alternating
    assert w.dtype == np.int64 and all(r in ([0, 1, 0, 1], [1, 0, 1, 0]) for r in w.tolist())
    assert {r[0] for r in w.tolist()} == {0, 1}
    w2 = M.baseline_random_walk_codes([[0, 1, 0, 1]], 20, 4, 3, alpha=1.0, seed=0)
    assert np.array_equal(w2, M.baseline_random_walk_codes([[0, 1, 0, 1]], 20, 4, 3, alpha=1.0, seed=0))
    mf = M.baseline_mean_frame(np.array([[[0, 0.0]], [[2, 4.0]]]), 2)  # (1, 2) repeated
    assert np.array_equal(mf, [[1, 2], [1, 2]]) and M.variation(mf) == 0.0
    assert np.isclose(M.frechet_distance(mf, [[0, 0], [2, 2]]), 5.0, **R)  # 1 + tr cov_gt (0 + 4)
    s = rng(1).standard_normal((10, 56))
    assert M.mse(M.baseline_mime(s), s) == 0.0


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
    back = M.read_metrics_json(path)
    assert math.isnan(back["model"]["mse/all"]) and back["GT"] == rows["GT"]
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
             "baseline:mime": [M.baseline_mime(s) for s in S],
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
