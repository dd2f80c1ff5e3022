"""metrics.py: every metric of the five papers, exact, and the evaluation baselines.

Pure functions on numpy arrays or torch tensors (numpy and torch only; no scipy, tslearn, sklearn).
The exact definitions are ../shared/spec/METRICS.md; section numbers below (§1.2, ...) refer to it.

Where each metric comes from
    §1 listener motion (L2, FD, P-FD, Var, Div, L2-Affect): the LM-Listener evaluation script (arXiv 2308.10897),
       the Learning2Listen test script, and the L2L-style re-implementation (part-wise P-FD, per-video pooling).
    §2 codec health (reconstruction, commitment, perplexity, active codes): the L2L and T2M-GPT-style quantisers.
    §3 REACT (FRCorr, FRDist, FRDiv, FRVar, FRDvs, FRSyn): the REACT 2023/2024 baseline metric package.
    §4 talking faces (LVE, FDD, MVE): the CodeTalker, FaceDiffuser and DiffSpeaker metric scripts.
    §5 baselines: random train window, NN on speaker motion / audio / text, random codes, random walk over
       codes, mime, mean frame.
    Reporting: format_table (Markdown), write_metrics_json / read_metrics_json, *_COLUMNS (METRICS.md §6).

Conventions (§0): inputs are np.ndarray or torch.Tensor, converted to float64 numpy (dtw_batch stays in
torch); outputs are Python floats or dict[str, float]; NaN/inf input raises ValueError naming the argument;
randomness only through a keyword `seed`. Letters: T frames, D dims, N speakers, K samples per speaker,
M reference pool, V vertices, L tokens, C code dim, Q queries.

Speed: `python metrics.py --bench` (random data; prints wall and process CPU time). Measured on the 2-core
development box while ~7 other jobs ran (load average ~14, so wall times are inflated ~3x; every metric
runs torch on one thread, so CPU time is what an idle machine gives):
    FD of two (10000, 56) sets                                  cpu 32 ms  (wall 99 ms)  target <= 50 ms
    FRDist 10 samples x 20 speakers x 750 frames, identity A    cpu 14.7 s (wall 43 s)   target <= 30 s
        (600 DTWs of 750 x 750, ~25 ms CPU each; cost grows with |A_k|; fr_dist(device="cuda") on a GPU)
    listener_metrics, 200 windows x 240 frames x 56 dims       cpu 3.3 s per row (exact Div is ~60% of it)
"""
import json
import math
import os
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

EXP = slice(0, 50)  # listener expression dims
POSE = slice(50, 56)  # head rotation (3) + jaw (3)
PARTS = {"all": slice(0, 56), "exp": EXP, "pose": POSE}
REACT_BLOCKS = ((0, 15, 1 / 15), (15, 17, 1.0), (17, 25, 1 / 8))  # (start, end, weight): AUs, VA, emotions

# Column order of the three table kinds of METRICS.md §6 (every method prints the same columns).
LISTENER_COLUMNS = ["mse/all", "mse/exp", "mse/pose", "fd/exp", "fd/pose", "pfd/exp", "pfd/pose",
                    "var_pred/all", "div_pred/all", "affect_l2"]
REACT_COLUMNS = ["frcorr_sum", "frcorr_mean", "frdist_sum", "frdist_mean", "frdiv", "frvar", "frdvs",
                 "frsyn", "frsyn_skipped"]
FACE_COLUMNS = ["lve", "lve_seq", "fdd", "fdd_abs", "mve"]


# ---------------------------------------------------------------------------------------------------------
# §0 conventions: conversion and checks
# ---------------------------------------------------------------------------------------------------------

def _np(x, name):
    """Any array-like -> numpy (dtype kept for floats, torch tensors detached to cpu); raise on NaN/inf."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = (x.double() if x.is_floating_point() else x).numpy()
    a = np.asarray(x)
    if a.dtype.kind in "fc" and not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or inf")
    return a


def _arr(x, name, ndim=None):
    """Any array-like -> float64 numpy, checked finite and (optionally) of the given rank."""
    a = np.ascontiguousarray(_np(x, name), dtype=np.float64)  # (torch rejects negative strides)
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array, got shape {a.shape}")
    return a


def _same_shape(a, b, na, nb):
    if a.shape != b.shape:
        raise ValueError(f"{na} and {nb} must have the same shape, got {a.shape} and {b.shape}")


# ---------------------------------------------------------------------------------------------------------
# §1 listener motion metrics (LM-Listener protocol)
# ---------------------------------------------------------------------------------------------------------

def mse(pred, gt):
    """§1.1 "L2": (1/(T*D)) sum (pred - gt)^2, a mean of squares without a root (LM-Listener)."""
    p, g = _arr(pred, "pred"), _arr(gt, "gt")
    _same_shape(p, g, "pred", "gt")
    return float(np.mean((p - g) ** 2))


def mean_l2_norm(pred, gt):
    """§1.1 L2L variant: (1/T) sum_t ||pred_t - gt_t||_2 (L2L applied it in standardised space)."""
    p, g = _arr(pred, "pred", 2), _arr(gt, "gt", 2)
    _same_shape(p, g, "pred", "gt")
    return float(np.linalg.norm(p - g, axis=1).mean())


def gaussian_stats(x):
    """Frame mean (D,) and unbiased covariance (D, D) of a frame set (T, D) (numpy cov(rowvar=False))."""
    x = _arr(x, "x", 2)
    if x.shape[0] < 2:
        raise ValueError(f"x: FD needs at least 2 frames, got {x.shape[0]}")
    mu = x.mean(0)
    xc = x - mu
    return mu, xc.T @ xc / (x.shape[0] - 1)


class _one_thread:
    """Run torch on one CPU thread inside metric code (restored after): the batched ops here are small, and
    several intra-op threads on a busy machine stall (measured 0.12 s vs 25 s for one listener_metrics call)."""

    def __enter__(self):
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)


def _frechet_batch(mu1, c1, mu2, c2):
    """Batched FD from stats: (B, D), (B, D, D) x2 -> (B,) float64, via the symmetric M = S1^1/2 S2 S1^1/2.

    tr (S1 S2)^1/2 = sum sqrt(eig(M)) for any M similar to S1 S2 and symmetric PSD. Where S1 = L L^T is
    positive definite we use the (cheaper) Cholesky factor, M = L^T S2 L; otherwise (constant channels,
    T <= D) the eigen square root R = U diag(sqrt(max(w, 0))) U^T, M = R S2 R of METRICS.md §1.2.
    """
    c1 = torch.as_tensor(c1, dtype=torch.float64)
    c2 = torch.as_tensor(c2, dtype=torch.float64)
    c1 = 0.5 * (c1 + c1.transpose(-1, -2))  # symmetrise against round-off
    c2 = 0.5 * (c2 + c2.transpose(-1, -2))
    Lc, info = torch.linalg.cholesky_ex(c1)  # (B, D, D); info > 0 where S1 is not positive definite
    M = Lc.transpose(-1, -2) @ c2 @ Lc
    bad = info > 0
    if bad.any():
        w, U = torch.linalg.eigh(c1[bad])  # (b, D), (b, D, D)
        R = (U * w.clamp_min(0).sqrt().unsqueeze(-2)) @ U.transpose(-1, -2)  # Sigma1^(1/2)
        M[bad] = R @ c2[bad] @ R
    M = 0.5 * (M + M.transpose(-1, -2))
    tr_sqrt = torch.linalg.eigvalsh(M).clamp_min(0).sqrt().sum(-1)  # tr (S1 S2)^(1/2)
    dmu = torch.as_tensor(mu1, dtype=torch.float64) - torch.as_tensor(mu2, dtype=torch.float64)
    fd = (dmu ** 2).sum(-1) + c1.diagonal(dim1=-2, dim2=-1).sum(-1) \
        + c2.diagonal(dim1=-2, dim2=-1).sum(-1) - 2 * tr_sqrt
    return fd.clamp_min(0).numpy()  # round-off can give about -1e-15


def frechet_from_stats(mu1, cov1, mu2, cov2):
    """§1.2 FD = ||mu1 - mu2||^2 + tr S1 + tr S2 - 2 tr (S1 S2)^(1/2), without scipy or complex numbers.

    Differs from original: the original takes scipy sqrtm of the non-symmetric product (with a 1e-6*I retry and
    imaginary-part dropping); we take eigenvalues of the similar symmetric matrix, no epsilon (agreement ~1e-12
    relative on full-rank covariances, ~1e-8 on a 24-frame window in 56-D).
    """
    mu1, mu2 = _arr(mu1, "mu1", 1), _arr(mu2, "mu2", 1)
    c1, c2 = _arr(cov1, "cov1", 2), _arr(cov2, "cov2", 2)
    with _one_thread():
        return float(_frechet_batch(mu1[None], c1[None], mu2[None], c2[None])[0])


def _stats_many(Xs):
    """Frame sets [(T_i, D_i)] -> lists of torch mean (D,) and unbiased cov (D, D), batched over equal shapes."""
    mus, covs = [None] * len(Xs), [None] * len(Xs)
    by_shape = {}
    for i, x in enumerate(Xs):
        if x.shape[0] < 2:
            raise ValueError(f"FD needs at least 2 frames per set, got {x.shape[0]}")
        by_shape.setdefault(x.shape, []).append(i)
    for (T, D), idx in by_shape.items():
        X = torch.from_numpy(Xs[idx[0]][None] if len(idx) == 1 else np.stack([Xs[i] for i in idx]))  # (B, T, D)
        X0 = X - X[:, :1]  # shift by the first frame: constant channels become exactly 0
        m0 = X0.mean(1)  # (B, D)
        mu, Xc = X[:, 0] + m0, X0 - m0[:, None]
        cov = Xc.transpose(1, 2) @ Xc / (T - 1)  # (B, D, D)
        for n, i in enumerate(idx):
            mus[i], covs[i] = mu[n], cov[n]
    return mus, covs


def frechet_many(As, Bs):
    """FD of each pair (A_i (T_i, D_i), B_i (T'_i, D_i)) -> (n,) float64, stats and eigensolves batched."""
    with _one_thread():
        (ma, ca), (mb, cb) = _stats_many(As), _stats_many(Bs)
        out = np.empty(len(As))
        by_dim = {}
        for i in range(len(As)):
            if ma[i].shape != mb[i].shape:
                raise ValueError(f"FD pair {i}: feature dims differ, {ma[i].shape[0]} vs {mb[i].shape[0]}")
            by_dim.setdefault(ma[i].shape[0], []).append(i)
        for idx in by_dim.values():
            st = lambda L: torch.stack([L[i] for i in idx])  # noqa: E731
            out[idx] = _frechet_batch(st(ma), st(ca), st(mb), st(cb))
    return out


def frechet_distance(a, b):
    """§1.2 FD between two frame sets a (T_a, D) and b (T_b, D) (T_a != T_b allowed, each >= 2). Direction ↓.

    Differs from original: see frechet_from_stats (eigenvalue route instead of scipy sqrtm; NaN raises).
    """
    a, b = _arr(a, "a", 2), _arr(b, "b", 2)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must have the same feature dim, got {a.shape[1]} and {b.shape[1]}")
    for x, n in ((a, "a"), (b, "b")):
        if x.shape[0] < 2:
            raise ValueError(f"{n}: FD needs at least 2 frames, got {x.shape[0]}")
    return float(frechet_many([a], [b])[0])


def paired_frechet_distance(speaker, pred, gt):
    """§1.3 P-FD = FD([s | gt], [s | pred]) on per-frame concatenations (same T for all three). Direction ↓."""
    s, p, g = _arr(speaker, "speaker", 2), _arr(pred, "pred", 2), _arr(gt, "gt", 2)
    _same_shape(p, g, "pred", "gt")
    if s.shape[0] != p.shape[0]:
        raise ValueError(f"speaker and pred must have the same T, got {s.shape[0]} and {p.shape[0]}")
    return frechet_distance(np.concatenate([s, g], 1), np.concatenate([s, p], 1))


def variation(x):
    """§1.4 Var: the mean over D of the population variance over time (ddof 0, LM-Listener). ≈GT is best."""
    x = _arr(x, "x", 2)
    return float((x - x[:1]).var(axis=0).mean())  # shifted by frame 0: a constant channel gives exactly 0


def diversity(x, *, lm_compat=False, seed=0):
    """§1.5 Div: the exact mean of ||x_i - x_j|| over all frame pairs i < j (deterministic). ≈GT is best.

    lm_compat=True: the original estimator, n = 30 (T > 30) else 10 pairs from two independent draws without
    replacement (default_rng(seed).choice twice); its expectation is (1 - 1/T) x the exact value.
    Differs from original: the default is exact; the original's RNG was unseeded.
    """
    x = _arr(x, "x", 2)
    T = x.shape[0]
    if T < 2:
        raise ValueError(f"x: diversity needs at least 2 frames, got {T}")
    if lm_compat:
        n = 30 if T > 30 else 10
        if T <= n:
            raise ValueError(f"x: lm_compat diversity needs T > {n}, got {T}")
        rng = np.random.default_rng(seed)
        i, j = rng.choice(T, n, replace=False), rng.choice(T, n, replace=False)
        return float(np.linalg.norm(x[i] - x[j], axis=1).mean())
    return float(_diversity_many([x])[0])


def _diversity_many(Xs, chunk=2048):
    """Exact mean pairwise distance of each frame set [(T_i, D)], batched over equal shapes (one thread).

    Distances come from the Gram matrix of the frames shifted by frame 0, d_ij^2 = n_i + n_j - 2 g_ij (clipped
    at 0): exact 0 for a constant window, no precision lost to offsets, and ~2.5x faster than pdist on
    CPU; agrees with direct differences to ~1e-12 relative on generic data. Rows are chunked above 2048.
    """
    out = np.empty(len(Xs))
    by_shape = {}
    for i, x in enumerate(Xs):
        by_shape.setdefault(x.shape, []).append(i)
    with _one_thread():
        for (T, D), idx in by_shape.items():
            for b0 in range(0, len(idx), max(1, 2 ** 24 // (T * min(T, chunk)))):  # <= 128 MB per block
                sub = idx[b0:b0 + max(1, 2 ** 24 // (T * min(T, chunk)))]
                X = torch.from_numpy(np.stack([Xs[i] for i in sub]))  # (B, T, D)
                X = X - X[:, :1]  # distances are shift-invariant; constant windows become exactly 0
                n = (X ** 2).sum(-1)  # (B, T)
                total = torch.zeros(len(sub), dtype=torch.float64)
                for r0 in range(0, T, chunk):
                    d = torch.baddbmm(n[:, r0:r0 + chunk, None] + n[:, None], X[:, r0:r0 + chunk],
                                      X.transpose(1, 2), alpha=-2).clamp_min_(0).sqrt_()  # (B, c, T)
                    if T <= chunk:  # symmetric: zero the diagonal, halve the sum
                        d.diagonal(dim1=1, dim2=2).zero_()
                        total += d.sum((1, 2)) / 2
                    else:  # upper triangle i < j of this row block
                        i = torch.arange(r0, r0 + d.shape[1])[:, None]
                        total += torch.where(torch.arange(T) > i, d, 0).sum((1, 2))
                out[sub] = (total / (T * (T - 1) / 2)).numpy()
    return out


def affect_l2(pred, gt, valence_fn, *, window=30):
    """§1.6 L2-Affect: mean over non-overlapping w-frame windows of (mean v_pred - mean v_gt)^2, w = min(window, T),
    the trailing T - n*w frames dropped (as the original's unfold). valence_fn maps (T, 56) -> (T,). ↓.

    Differs from original: EMOCA's emotion net is replaced by the caller's readout `valence_fn`.
    """
    p, g = _arr(pred, "pred", 2), _arr(gt, "gt", 2)
    _same_shape(p, g, "pred", "gt")
    T = p.shape[0]
    vp, vg = _arr(valence_fn(p), "valence_fn(pred)"), _arr(valence_fn(g), "valence_fn(gt)")
    if vp.shape != (T,) or vg.shape != (T,):
        raise ValueError(f"valence_fn must return shape ({T},), got {vp.shape} and {vg.shape}")
    w = min(int(window), T)
    n = T // w
    mp, mg = vp[:n * w].reshape(n, w).mean(1), vg[:n * w].reshape(n, w).mean(1)
    return float(np.mean((mp - mg) ** 2))


def listener_metrics(preds, gts, speakers, *, valence_fn=None, groups=None, lm_compat_diversity=False, seed=0):
    """§1.7 every listener metric per window, then the unweighted mean over windows, as one flat dict.

    preds, gts, speakers: equal-length lists of (T_i, 56) arrays. Keys "{m}/{part}" for
    m in mse, fd, pfd, var_pred, var_gt, div_pred, div_gt and part in all, exp, pose; "affect_l2" when
    valence_fn is given; "n_windows". groups (one int per window): windows sharing an id are concatenated in
    time first (the re-impl's per-video protocol). Window i uses diversity seed seed + i.
    FD / P-FD eigen-decompositions are batched in torch float64 across windows.
    """
    if not (len(preds) == len(gts) == len(speakers)) or len(preds) == 0:
        raise ValueError(f"preds, gts, speakers must be equal-length non-empty lists, got "
                         f"{len(preds)}, {len(gts)}, {len(speakers)}")
    P = [_arr(x, f"preds[{i}]", 2) for i, x in enumerate(preds)]
    G = [_arr(x, f"gts[{i}]", 2) for i, x in enumerate(gts)]
    S = [_arr(x, f"speakers[{i}]", 2) for i, x in enumerate(speakers)]
    for i, (p, g, s) in enumerate(zip(P, G, S)):
        _same_shape(p, g, f"preds[{i}]", f"gts[{i}]")
        if s.shape[0] != p.shape[0]:
            raise ValueError(f"speakers[{i}] has {s.shape[0]} frames, preds[{i}] has {p.shape[0]}")
    if groups is not None:
        if len(groups) != len(P):
            raise ValueError(f"groups has {len(groups)} ids for {len(P)} windows")
        order = list(dict.fromkeys(groups))  # group ids in order of first appearance
        members = {gid: [i for i, g in enumerate(groups) if g == gid] for gid in order}
        P, G, S = ([np.concatenate([X[i] for i in members[gid]]) for gid in order] for X in (P, G, S))
    n = len(P)
    out = {}
    for part, sl in PARTS.items():
        ps, gs = [p[:, sl] for p in P], [g[:, sl] for g in G]
        out[f"mse/{part}"] = float(np.mean([np.mean((p - g) ** 2) for p, g in zip(ps, gs)]))
        out[f"var_pred/{part}"] = float(np.mean([(p - p[:1]).var(0).mean() for p in ps]))
        out[f"var_gt/{part}"] = float(np.mean([(g - g[:1]).var(0).mean() for g in gs]))
        for key, X in ((f"div_pred/{part}", ps), (f"div_gt/{part}", gs)):
            if lm_compat_diversity:
                out[key] = float(np.mean([diversity(x, lm_compat=True, seed=seed + i) for i, x in enumerate(X)]))
            else:  # exact, deterministic: batched over windows
                if min(x.shape[0] for x in X) < 2:
                    raise ValueError("diversity needs at least 2 frames per window")
                out[key] = float(_diversity_many(X).mean())
    # FD and P-FD of every part are sub-blocks of the statistics of [s | y] and [s | y_hat]: one (Ds + D)-dim
    # mean/covariance per window and side, then one batched eigensolve per sub-block size
    Ds, D = S[0].shape[1], P[0].shape[1]
    with _one_thread():
        (mp, cp), (mg, cg) = (_stats_many([np.concatenate([s, x], 1) for s, x in zip(S, X)]) for X in (P, G))
        mp, cp, mg, cg = (torch.stack(v) for v in (mp, cp, mg, cg))  # (n, Ds+D), (n, Ds+D, Ds+D)
        for part, sl in PARTS.items():
            li = torch.arange(Ds + D)[Ds:][sl]  # listener dims of this part
            si = torch.arange(Ds)[sl] if Ds == D else torch.arange(Ds)  # the same part of the speaker
            for key, ix in ((f"fd/{part}", li), (f"pfd/{part}", torch.cat([si, li]))):
                sub = lambda c: c[:, ix][:, :, ix]  # noqa: E731
                out[key] = float(_frechet_batch(mp[:, ix], sub(cp), mg[:, ix], sub(cg)).mean())
    if valence_fn is not None:
        out["affect_l2"] = float(np.mean([affect_l2(p, g, valence_fn) for p, g in zip(P, G)]))
    out["n_windows"] = n
    keys = [f"{m}/{part}" for m in ("mse", "fd", "pfd", "var_pred", "var_gt", "div_pred", "div_gt")
            for part in PARTS]
    return {k: out[k] for k in keys + [k for k in ("affect_l2", "n_windows") if k in out]}


# ---------------------------------------------------------------------------------------------------------
# §2 identity and VQ metrics (codec health)
# ---------------------------------------------------------------------------------------------------------

def reconstruction_error(x, x_hat):
    """§2 the "VQ floor": MSE over all elements of held-out GT vs encode -> quantise -> decode. ↓."""
    a, b = _arr(x, "x"), _arr(x_hat, "x_hat")
    _same_shape(a, b, "x", "x_hat")
    return float(np.mean((a - b) ** 2))


def commitment_distance(z_e, z_q):
    """§2 mean over all elements of (z_e - z_q)^2, shapes (..., C), z_q the selected codes (unweighted). ↓.

    Differs from original: L2L logs 1.25x this (0.25 commitment + codebook term), LM-Listener 0.02x.
    """
    a, b = _arr(z_e, "z_e"), _arr(z_q, "z_q")
    _same_shape(a, b, "z_e", "z_q")
    return float(np.mean((a - b) ** 2))


def code_usage(indices, K):
    """§2 counts (K,) int64 of integer code indices of any shape; empty or out-of-range raises."""
    idx = _np(indices, "indices")
    if idx.size == 0:
        raise ValueError("indices is empty")
    if idx.dtype.kind == "f":
        if not np.all(idx == np.round(idx)):
            raise ValueError("indices must be integers")
        idx = idx.astype(np.int64)
    idx = idx.reshape(-1).astype(np.int64)
    if idx.min() < 0 or idx.max() >= K:
        raise ValueError(f"indices must lie in [0, {K}), got range [{idx.min()}, {idx.max()}]")
    return np.bincount(idx, minlength=K)


def codebook_perplexity(indices, K):
    """§2 PPL = exp(-sum p ln p) of the code histogram pooled over the whole token set, in [1, K]. ↑.

    Differs from original: LM-Listener logs per-batch PPL (biased low) and L2L's "Perplexity" is exp(loss).
    """
    c = code_usage(indices, K).astype(np.float64)
    p = c[c > 0] / c.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def active_code_fraction(indices, K, *, min_count=1):
    """§2 #{k : count_k >= min_count} / K; dead-code fraction = 1 - this. ↑."""
    return float((code_usage(indices, K) >= min_count).sum() / K)


# ---------------------------------------------------------------------------------------------------------
# §3 REACT metrics (multiple appropriate reactions)
# ---------------------------------------------------------------------------------------------------------

def binarize_au(x):
    """Round the 15 AU dims [0:15] of REACT attributes (..., 25) (optional preprocessing, off officially)."""
    x = _arr(x, "x").copy()
    x[..., 0:15] = np.round(x[..., 0:15])
    return x


def _ccc_batch(x, y, react_compat=False):
    """CCC of (..., T, D) pairs -> (...), the mean over D of per-dim CCC with population moments."""
    mx, my = x.mean(-2), y.mean(-2)
    xc, yc = x - mx[..., None, :], y - my[..., None, :]
    vx, vy = (xc ** 2).mean(-2), (yc ** 2).mean(-2)
    sxy = (xc * yc).mean(-2)
    den = vx + vy + (mx - my) ** 2
    if react_compat:  # rho from corrcoef (NaN -> 0), clipped; den + 1e-8
        with np.errstate(invalid="ignore", divide="ignore"):
            rho = sxy / np.sqrt(vx * vy)
        rho = np.clip(np.nan_to_num(rho, nan=0.0), -1, 1)
        c = 2 * rho * np.sqrt(vx) * np.sqrt(vy) / (den + 1e-8)
    else:  # identical constant channels (den = 0) score 1
        c = np.where(den > 0, 2 * sxy / np.where(den > 0, den, 1.0), 1.0)
    return c.mean(-1)


def ccc(x, y, *, react_compat=False):
    """§3.1 concordance correlation, mean over dims of 2 s_xy / (s_x^2 + s_y^2 + (mu_x - mu_y)^2). ↑ in [-1, 1].

    Input (T,) or (T, D). Differs from original: both constant and equal channels score 1 (the official code
    gives 0 and shrinks every channel by the +1e-8 in the denominator); react_compat=True reproduces it.
    """
    a, b = _arr(x, "x"), _arr(y, "y")
    _same_shape(a, b, "x", "y")
    if a.ndim == 1:
        a, b = a[:, None], b[:, None]
    return float(_ccc_batch(a, b, react_compat))


def _appropriate(A, N, M):
    A = _np(A, "appropriate").astype(bool)
    if A.shape != (N, M):
        raise ValueError(f"appropriate must have shape ({N}, {M}), got {A.shape}")
    if not A.any(1).all():
        raise ValueError(f"appropriate has an empty row: speakers {np.flatnonzero(~A.any(1)).tolist()}")
    return A


def _sum_mean(S):
    """S (N, K) best-match scores -> the official sum over samples of the speaker mean, and the mean."""
    return {"sum": float(S.mean(0).sum()), "mean": float(S.mean())}


def fr_corr(preds, listeners, appropriate, *, react_compat=False):
    """§3.2 FRCorr: S[k,i] = max_{j in A_k} ccc(listeners[j], preds[k,i]); {"sum": K * mean, "mean"}. ↑.

    Differs from original: the sensible CCC by default (react_compat=True: the official CCC).
    """
    P, L = _arr(preds, "preds", 4), _arr(listeners, "listeners", 3)
    N, K = P.shape[:2]
    A = _appropriate(appropriate, N, L.shape[0])
    S = np.empty((N, K))
    for k in range(N):
        Lk = L[A[k]]  # (m, T, D)
        S[k] = _ccc_batch(Lk[None], P[k][:, None], react_compat).max(1)  # (K, m) -> (K,)
    return _sum_mean(S)


def dtw(a, b):
    """§3.3 DTW as tslearn's default: sqrt of the min-cost path sum of squared Euclidean frame distances.

    a (T_a, d) or (T_a,), b (T_b, d). numpy, row by row: R[i] = P + cummin(m - P^-) (float64 only).
    """
    a, b = _arr(a, "a"), _arr(b, "b")
    a, b = (a[:, None] if a.ndim == 1 else a), (b[:, None] if b.ndim == 1 else b)
    R = np.cumsum(((b - a[0]) ** 2).sum(1))  # row 0
    for i in range(1, a.shape[0]):
        C = ((b - a[i]) ** 2).sum(1)  # (T_b,) by broadcasting, no ||a||^2 + ||b||^2 - 2ab expansion
        m = np.minimum(R, np.concatenate([[np.inf], R[:-1]]))  # min(R[i-1, j], R[i-1, j-1])
        P = np.cumsum(C)
        R = P + np.minimum.accumulate(m - np.concatenate([[0.0], P[:-1]]))
    return float(np.sqrt(R[-1]))


@torch.no_grad()
def dtw_batch(a, b, *, max_bytes=256 * 2 ** 20):
    """§3.3 DTW of B pairs by anti-diagonals in torch float64 on the input's device: a (B, T_a, d),
    b (B, T_b, d) -> (B,).

    The cost C (B, T_a, T_b) comes from torch.cdist without the matmul expansion and is re-laid out by
    viewed by anti-diagonal (as_strided, no copy); B is chunked so that B * T_a * T_b * 8 bytes stay under
    max_bytes. On CPU it runs on one thread.
    """
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    if not torch.isfinite(a).all():
        raise ValueError("a contains NaN or inf")
    if not torch.isfinite(b).all():
        raise ValueError("b contains NaN or inf")
    dev = a.device
    a, b = a.to(torch.float64), b.to(device=dev, dtype=torch.float64)
    Bn, Ta, Tb = a.shape[0], a.shape[1], b.shape[1]
    S = Ta + Tb - 1  # number of anti-diagonals of C
    chunk = max(1, int(max_bytes // (Ta * Tb * 8)))
    out = []
    ctx = _one_thread() if dev.type == "cpu" else torch.no_grad()
    with ctx:
        for c0 in range(0, Bn, chunk):
            C = torch.cdist(a[c0:c0 + chunk], b[c0:c0 + chunk], compute_mode="donot_use_mm_for_euclid_dist") ** 2
            B = C.shape[0]
            # zero-copy skewed view: C[:, i, s - i] sits at offset i * Tb + s - i = s + i * (Tb - 1); entries with
            # s - i outside [0, Tb) alias other cells but are never read (only rows lo-1..hi-1 of diagonal s)
            Cs = C.as_strided((B, S, Ta), (Ta * Tb, 1, Tb - 1))  # Cs[:, s, i] = C[:, i, s - i]
            # R on diagonal s is stored by padded row index i in [0, Ta] (R[i, j], j = s - i, 1-based cells)
            bufs = [torch.full((B, Ta + 1), float("inf"), dtype=torch.float64, device=dev) for _ in range(3)]
            bufs[0][:, 0] = 0.0  # diagonal 0: R[0, 0] = 0 (the cell before the start); diagonal 1: padding
            tmp = torch.empty(B, Ta, dtype=torch.float64, device=dev)
            for s in range(2, Ta + Tb + 1):
                prev2, prev1, cur = bufs[(s - 2) % 3], bufs[(s - 1) % 3], bufs[s % 3]
                lo, hi = max(1, s - Tb), min(Ta, s - 1)
                n = hi - lo + 1
                t = tmp[:, :n]
                torch.minimum(prev1[:, lo - 1:hi], prev1[:, lo:hi + 1], out=t)  # R[i-1, j], R[i, j-1]
                torch.minimum(t, prev2[:, lo - 1:hi], out=t)  # R[i-1, j-1]
                torch.add(t, Cs[:, s - 2, lo - 1:hi], out=cur[:, lo:hi + 1])  # + C[i-1, j-1]
                cur[:, lo - 1] = float("inf")  # out-of-range neighbours read by the next two steps
                if hi < Ta:
                    cur[:, hi + 1] = float("inf")
            out.append(bufs[(Ta + Tb) % 3][:, Ta].sqrt())
    return torch.cat(out)


def fr_dist(preds, listeners, appropriate, *, blocks=REACT_BLOCKS, react_compat=False, device="cpu"):
    """§3.3 FRDist: S[k,i] = min_{j in A_k} sum_blocks w * DTW(P[:, s:e], L_j[:, s:e]); {"sum", "mean"}. ↓.

    All (k, i, j) pairs are batched through dtw_batch (pass device="cuda" to run it on a GPU).
    react_compat=True rounds the inputs to float32 first, as the official code does.
    Differs from original: vectorised anti-diagonal DTW instead of tslearn in a process pool (same numbers).
    """
    P, L = _arr(preds, "preds", 4), _arr(listeners, "listeners", 3)
    if react_compat:
        P, L = P.astype(np.float32).astype(np.float64), L.astype(np.float32).astype(np.float64)
    N, K = P.shape[:2]
    A = _appropriate(appropriate, N, L.shape[0])
    kk, jj = np.nonzero(A)  # appropriate (speaker, reaction) pairs
    Pt, Lt = torch.from_numpy(P).to(device), torch.from_numpy(L).to(device)
    D = torch.zeros(len(kk), K, dtype=torch.float64, device=device)  # (pairs, K)
    for s, e, w in blocks:
        a = Pt[:, :, :, s:e][kk].reshape(len(kk) * K, P.shape[2], e - s)  # (pairs*K, T, d)
        b = Lt[:, :, s:e][jj][:, None].expand(-1, K, -1, -1).reshape(len(kk) * K, L.shape[1], e - s)
        D += w * dtw_batch(a, b).reshape(len(kk), K)
    D = D.cpu().numpy()
    S = np.full((N, K), np.inf)
    np.minimum.at(S, kk, D)  # min over appropriate j, per speaker
    return _sum_mean(S)


def fr_div(preds):
    """§3.4 FRDiv (official S-MSE): per speaker, the mean over ordered sample pairs i != i' of the squared
    distance per element, then the mean over speakers. ↑.

    Differs from original: K = 1 gives NaN (the original returns 0.0 for the whole metric).
    """
    P = _arr(preds, "preds", 4)
    N, K = P.shape[:2]
    if K < 2:
        return float("nan")
    X = P.reshape(N, K, -1)
    ss = ((X - X.mean(1, keepdims=True)) ** 2).sum((1, 2))  # sum_{i != i'} ||x_i - x_i'||^2 = 2K * this
    return float(np.mean(2 * K * ss / (K * (K - 1) * X.shape[2])))


def fr_var(preds):
    """§3.4 FRVar: variance over time with ddof 1, mean over N, K and D. ≈GT is best."""
    P = _arr(preds, "preds", 4)
    if P.shape[2] < 2:
        raise ValueError(f"preds: FRVar needs T >= 2, got {P.shape[2]}")
    return float((P - P[:, :, :1]).var(axis=2, ddof=1).mean())  # shift by frame 0: exact 0 when constant


def fr_dvs(preds):
    """§3.4 FRDvs: for each sample index, sum over ordered speaker pairs k != l of ||P[k,i] - P[l,i]||^2,
    divided by N(N-1) K T D. N = 1 gives NaN (as the original's 0/0). ↑."""
    P = _arr(preds, "preds", 4)
    N, K, T, D = P.shape
    if N < 2:
        return float("nan")
    ss = ((P - P.mean(0, keepdims=True)) ** 2).sum()  # sum_i sum_{k != l} ||.||^2 = 2N * this
    return float(2 * N * ss / (N * (N - 1) * K * T * D))


def _tlcc_lags(P, S, W, react_compat):
    """Batched TLCC: P, S (B, T, D) -> (B,) argmax lag in [-W, W] (NaN where no lag is valid)."""
    B, T, D = P.shape
    lags = np.arange(-W, W + 1)
    r = np.full((B, len(lags)), np.nan)
    for n, l in enumerate(lags):
        x, y = (P[:, l:], S[:, :T - l]) if l > 0 else (P[:, :T + l], S[:, -l:]) if l < 0 else (P, S)
        xc, yc = x - x.mean(1, keepdims=True), y - y.mean(1, keepdims=True)
        num, sx, sy = (xc * yc).sum(1), (xc ** 2).sum(1), (yc ** 2).sum(1)  # (B, D)
        const = (x.max(1) == x.min(1)) | (y.max(1) == y.min(1))  # exactly constant over the overlap
        with np.errstate(invalid="ignore", divide="ignore"):
            rd = np.where(const, np.nan, num / np.sqrt(sx * sy))
        if react_compat:
            r[:, n] = rd.mean(1)  # any constant channel -> NaN for the whole lag
        else:
            valid = ~const
            cnt = valid.sum(1)
            r[:, n] = np.where(cnt > 0, np.where(valid, rd, 0).sum(1) / np.maximum(cnt, 1), np.nan)
    if react_compat:  # float32 r, and argmax returns the first NaN like torch / numpy
        r32 = r.astype(np.float32)
        isn = np.isnan(r32)
        best = np.where(isn.any(1), isn.argmax(1), np.nan_to_num(r32, nan=-np.inf).argmax(1))
        return lags[best].astype(np.float64)
    ok = ~np.isnan(r).all(1)
    best = np.where(ok, np.nan_to_num(r, nan=-np.inf).argmax(1), 0)  # ties -> first (most negative) lag
    return np.where(ok, lags[best], np.nan)


def tlcc_offset(pred, speaker, *, max_lag=49, react_compat=False):
    """§3.5 |l*| in frames, l* = argmax over lags in [-max_lag, max_lag] of the mean-over-dims Pearson r of
    the overlapping parts of pred and speaker (l* > 0: the listener follows). NaN if no lag is valid.

    Differs from original: constant channels are dropped per lag and invalid lags skipped (the official
    code's NaN makes a constant channel score max_lag; react_compat=True reproduces that and the float32 r).
    """
    p, s = _arr(pred, "pred"), _arr(speaker, "speaker")
    _same_shape(p, s, "pred", "speaker")
    p, s = (p[:, None], s[:, None]) if p.ndim == 1 else (p, s)
    if p.shape[0] < max_lag + 3:
        raise ValueError(f"pred: TLCC needs T >= max_lag + 3 = {max_lag + 3}, got {p.shape[0]}")
    return float(abs(_tlcc_lags(p[None], s[None], max_lag, react_compat)[0]))


def _fr_syn(preds, speakers, fps, seconds, first_sample_only, react_compat):
    P, S = _arr(preds, "preds", 4), _arr(speakers, "speakers", 3)
    N, K, T, D = P.shape
    if S.shape != (N, T, D):
        raise ValueError(f"speakers must have shape {(N, T, D)}, got {S.shape}")
    W = int(seconds * fps) - 1
    if T < W + 3:
        raise ValueError(f"preds: FRSyn needs T >= {W + 3} frames, got {T}")
    if first_sample_only:
        P, K = P[:, :1], 1
    lag = _tlcc_lags(P.reshape(N * K, T, D), np.repeat(S, K, axis=0), W, react_compat)
    ok = ~np.isnan(lag)
    return (float(np.abs(lag[ok]).mean()) if ok.any() else float("nan")), int((~ok).sum())


def fr_syn(preds, speakers, *, fps=25, seconds=2, first_sample_only=False, react_compat=False):
    """§3.5 FRSyn: the mean over (k, i) of tlcc_offset(preds[k,i], speakers[k]) with W = int(seconds*fps) - 1.
    ↓ (frames; divide by fps for seconds). Pairs with no valid lag are skipped (NaN if all are).

    Differs from original: see tlcc_offset; the official parallel script scores only sample 0
    (first_sample_only=True reproduces it).
    """
    return _fr_syn(preds, speakers, fps, seconds, first_sample_only, react_compat)[0]


def react_metrics(preds, listeners, speakers, appropriate, *, fps=25, react_compat=False, device="cpu",
                  with_dist=True):
    """§3.6 all REACT metrics: preds (N, K, T, D), listeners (M, T, D), speakers (N, T, D), appropriate (N, M).

    react_compat=True: official CCC, TLCC, float32 DTW inputs and first_sample_only.
    with_dist=False skips FRDist (NaN), whose DTWs are nearly all of the cost, for ablation grids.
    """
    P = _arr(preds, "preds", 4)
    corr = fr_corr(P, listeners, appropriate, react_compat=react_compat)
    dist = (fr_dist(P, listeners, appropriate, react_compat=react_compat, device=device) if with_dist
            else {"sum": float("nan"), "mean": float("nan")})
    syn, skipped = _fr_syn(P, speakers, fps, 2, react_compat, react_compat)
    return {"frcorr_sum": corr["sum"], "frcorr_mean": corr["mean"], "frdist_sum": dist["sum"],
            "frdist_mean": dist["mean"], "frdiv": fr_div(P), "frvar": fr_var(P), "frdvs": fr_dvs(P),
            "frsyn": syn, "frsyn_skipped": skipped, "K": P.shape[1]}


# ---------------------------------------------------------------------------------------------------------
# §4 speech-driven face metrics (DiffSpeaker / CodeTalker protocol)
# ---------------------------------------------------------------------------------------------------------

def _mesh_pairs(preds, gts):
    """Lists of (T_i, V, 3) -> pairs truncated to min(T_pred, T_gt)."""
    if len(preds) != len(gts) or len(preds) == 0:
        raise ValueError(f"preds and gts must be equal-length non-empty lists, got {len(preds)}, {len(gts)}")
    out = []
    for i, (p, g) in enumerate(zip(preds, gts)):
        p, g = _arr(p, f"preds[{i}]", 3), _arr(g, f"gts[{i}]", 3)
        if p.shape[1:] != g.shape[1:]:
            raise ValueError(f"preds[{i}] and gts[{i}] differ in vertices: {p.shape} vs {g.shape}")
        T = min(p.shape[0], g.shape[0])
        out.append((p[:T], g[:T]))
    return out


def _region(idx, name):
    idx = _np(idx, name).astype(np.int64).reshape(-1)
    if idx.size == 0:
        raise ValueError(f"{name} is empty")
    return idx


def lip_vertex_error(preds, gts, lip_idx, *, per_sequence=False):
    """§4 LVE: per frame the max over lip vertices of the squared L2 error; the mean over all frames (pooled,
    CodeTalker/FaceDiffuser) or per_sequence=True (per sequence, then over sequences, DiffSpeaker). ↓."""
    lip = _region(lip_idx, "lip_idx")
    per = [((p[:, lip] - g[:, lip]) ** 2).sum(-1).max(-1) for p, g in _mesh_pairs(preds, gts)]  # (T_i,)
    return float(np.mean([e.mean() for e in per]) if per_sequence else np.concatenate(per).mean())


def fdd(preds, gts, templates, upper_idx, *, absolute=False):
    """§4 FDD (signed, best 0): per sequence dyn(gt - tmpl) - dyn(pred - tmpl), dyn(m) = mean over upper-face
    vertices of the population std over time of ||m_tv||^2; the mean over sequences (absolute=True: of |FDD_s|).
    > 0 means an under-animated upper face."""
    up = _region(upper_idx, "upper_idx")
    if len(templates) != len(preds):
        raise ValueError(f"templates has {len(templates)} meshes for {len(preds)} sequences")
    vals = []
    for i, (p, g) in enumerate(_mesh_pairs(preds, gts)):
        t = _arr(templates[i], f"templates[{i}]", 2)

        def dyn(m):
            return (((m[:, up] - t[up]) ** 2).sum(-1)).std(0).mean()
        vals.append(dyn(g) - dyn(p))
    vals = np.abs(vals) if absolute else np.asarray(vals)
    return float(vals.mean())


def mean_vertex_error(preds, gts):
    """§4 MVE: the mean over all frames (pooled) and vertices of ||pred - gt||_2 (not squared). ↓."""
    errs = [np.linalg.norm(p - g, axis=-1).reshape(-1) for p, g in _mesh_pairs(preds, gts)]
    return float(np.concatenate(errs).mean())


def face_metrics(preds, gts, templates, lip_idx, upper_idx):
    """§4 all talking-face metrics: lve (pooled), lve_seq (per sequence), fdd (signed), fdd_abs, mve."""
    return {"lve": lip_vertex_error(preds, gts, lip_idx),
            "lve_seq": lip_vertex_error(preds, gts, lip_idx, per_sequence=True),
            "fdd": fdd(preds, gts, templates, upper_idx), "fdd_abs": fdd(preds, gts, templates, upper_idx,
                                                                         absolute=True),
            "mve": mean_vertex_error(preds, gts)}


# ---------------------------------------------------------------------------------------------------------
# §5 baselines (output in the bank's units; retrieved windows cut to their first T frames)
# ---------------------------------------------------------------------------------------------------------

def _bank(bank_listener, T):
    bank = _np(bank_listener, "bank_listener")
    if bank.ndim != 3:
        raise ValueError(f"bank_listener: expected (M, T_b, D), got shape {bank.shape}")
    if T > bank.shape[1]:
        raise ValueError(f"bank windows have {bank.shape[1]} frames, fewer than the requested T = {T}")
    return bank


def _cosine_pick(q, keys, standardize):
    """q (Q, F), keys (M, F) -> (Q,) argmax cosine (ties -> lowest index, zero vectors -> cosine 0)."""
    if standardize:
        mu, sd = keys.mean(0), keys.std(0)
        sd = np.where(sd > 0, sd, 1.0)
        q, keys = (q - mu) / sd, (keys - mu) / sd
    qn, kn = np.linalg.norm(q, axis=1, keepdims=True), np.linalg.norm(keys, axis=1, keepdims=True)
    cos = (q / np.where(qn > 0, qn, 1.0)) @ (keys / np.where(kn > 0, kn, 1.0)).T  # (Q, M)
    return cos.argmax(1)


def baseline_random(bank_listener, n, T, *, seed=0):
    """Random train window: n windows drawn uniformly with replacement from the whole bank -> (n, T, D).

    Differs from original: the re-impl's live code samples only the first 5 windows (a bug)."""
    bank = _bank(bank_listener, T)
    return bank[np.random.default_rng(seed).integers(0, bank.shape[0], n), :T].copy()


def baseline_nn_motion(speaker, bank_speaker, bank_listener, *, standardize=True):
    """NN on speaker motion: key = time-mean of speaker motion; cosine vs bank keys -> (Q, T, D).

    Differs from original: standardize=True z-scores keys and query with the bank key statistics (False: raw)."""
    q = _arr(speaker, "speaker", 3)
    bank = _bank(bank_listener, q.shape[1])
    idx = _cosine_pick(q.mean(1), _arr(bank_speaker, "bank_speaker", 3).mean(1), standardize)
    return bank[idx, :q.shape[1]].copy()


def baseline_nn_audio(audio, bank_audio, bank_listener, *, standardize=True, T=None):
    """NN on audio: key = per-feature max over time of (T_a, F) audio rows -> (Q, T, D).

    T defaults to the query's audio rows times the bank's frames-per-row ratio (T_b / T_ab)."""
    q, ba = _arr(audio, "audio", 3), _arr(bank_audio, "bank_audio", 3)
    bl = _np(bank_listener, "bank_listener")
    T = int(round(q.shape[1] * bl.shape[1] / ba.shape[1])) if T is None else int(T)
    bank = _bank(bl, T)
    return bank[_cosine_pick(q.max(1), ba.max(1), standardize), :T].copy()


def window_text(words, t_start, t_end, *, history=3.0):
    """Space-join of the words (text, end_s) whose end e satisfies t_start - history <= e < t_end."""
    return " ".join(w for w, e in words if t_start - history <= e < t_end)


def _tokens(s):
    return re.findall(r"[a-z0-9']+", s.lower())


def baseline_nn_text(texts, bank_texts, bank_listener, *, T=None, seed=0):
    """NN on speech content: TF-IDF cosine (tf = count, idf = ln((1+M)/(1+df)) + 1, L2-normalised) -> (Q, T, D).
    An all-zero similarity row (empty / out-of-vocabulary query) picks a seeded random bank window.

    Differs from original: TF-IDF bag of words instead of sentence-BERT embeddings."""
    bl = _np(bank_listener, "bank_listener")
    T = bl.shape[1] if T is None else int(T)
    bank = _bank(bl, T)
    docs = [_tokens(t) for t in bank_texts]
    vocab = {w: i for i, w in enumerate(sorted({w for d in docs for w in d}))}
    M = len(docs)

    def tf(d):
        v = np.zeros(len(vocab))
        for w in d:
            if w in vocab:
                v[vocab[w]] += 1
        return v
    Bm = np.stack([tf(d) for d in docs]) if vocab else np.zeros((M, 0))  # (M, V)
    idf = np.log((1 + M) / (1 + (Bm > 0).sum(0))) + 1
    Qm = np.stack([tf(_tokens(t)) for t in texts]) if vocab else np.zeros((len(texts), 0))

    def unit(X):
        X = X * idf
        n = np.linalg.norm(X, axis=1, keepdims=True)
        return X / np.where(n > 0, n, 1.0)
    sim = unit(Qm) @ unit(Bm).T  # (Q, M)
    idx = sim.argmax(1)
    empty = ~(sim > 0).any(1)
    idx[empty] = np.random.default_rng(seed).integers(0, M, int(empty.sum()))
    return bank[idx, :T].copy()


def baseline_random_codes(n, L, K, *, seed=0):
    """LM-Listener's "Random VQ": uniform i.i.d. codes in [0, K) -> (n, L) int64."""
    return np.random.default_rng(seed).integers(0, K, (n, L)).astype(np.int64)


def baseline_random_walk_codes(train_codes, n, L, K, *, alpha=0.0, seed=0):
    """First-order Markov walk over codes fitted on training token sequences -> (n, L) int64.

    pi = unigram frequency; P(j|i) = (c_ij + alpha) / (sum_j c_ij + alpha K), rows without counts fall back to pi.
    z_0 ~ pi, z_{t+1} ~ P(.|z_t). No original exists (our baseline for codebook priors)."""
    seqs = [_np(s, "train_codes").astype(np.int64).reshape(-1) for s in train_codes]
    code_usage(np.concatenate(seqs), K)  # checks: non-empty, in [0, K)
    pi = np.bincount(np.concatenate(seqs), minlength=K).astype(np.float64)
    pi /= pi.sum()
    c = np.zeros((K, K))
    for s in seqs:
        np.add.at(c, (s[:-1], s[1:]), 1)
    tot = c.sum(1, keepdims=True) + alpha * K
    Pm = np.where(tot > 0, (c + alpha) / np.where(tot > 0, tot, 1.0), pi[None])  # (K, K) rows sum to 1
    cum = np.cumsum(Pm, 1)
    last = np.array([np.flatnonzero(r > 0).max() for r in Pm])  # guard against cum[-1] < 1 by round-off
    rng = np.random.default_rng(seed)
    z = np.empty((n, L), np.int64)
    cpi = np.cumsum(pi)
    z[:, 0] = np.minimum((cpi[None] <= rng.random(n)[:, None]).sum(1), np.flatnonzero(pi > 0).max())
    for t in range(1, L):
        prev = z[:, t - 1]
        z[:, t] = np.minimum((cum[prev] <= rng.random(n)[:, None]).sum(1), last[prev])
    return z


def baseline_mime(speaker):
    """Mime: the speaker's own motion used as the listener's (same layout needed) -> a float64 copy."""
    return _arr(speaker, "speaker").copy()


def baseline_mean_frame(bank_listener, T):
    """Mean frame: the per-dim mean over all bank frames, repeated T times -> (T, D)."""
    bank = _arr(bank_listener, "bank_listener")
    return np.repeat(bank.reshape(-1, bank.shape[-1]).mean(0)[None], T, axis=0)


# ---------------------------------------------------------------------------------------------------------
# Reporting: Markdown table and metrics.json
# ---------------------------------------------------------------------------------------------------------

def _fmt(v, digits):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, (int, np.integer)) or (isinstance(v, float) and v.is_integer() and abs(v) < 1e6):
        return str(int(v))
    return f"{float(v):.{digits}g}"


def format_table(rows, metrics=None, digits=4):
    """{row: {metric: value}} -> a Markdown table, one row per row name (insertion order); columns = the union
    of metric keys (first-seen order) or `metrics`; missing / NaN values show as "–"."""
    cols = list(metrics) if metrics is not None else list(dict.fromkeys(k for r in rows.values() for k in r))
    lines = ["| row | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(r.get(c), digits) for c in cols) + " |")
    return "\n".join(lines)


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(v) else None
    if isinstance(v, torch.Tensor):
        return _jsonable(v.item())
    return v


def write_metrics_json(rows, path):
    """Write {row: {metric: value}} as JSON (NaN/inf -> null), creating parents, atomically (temp + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(_jsonable(rows), f, indent=2)
    os.replace(tmp, path)
    return path


def read_metrics_json(path):
    """Read a metrics.json back: {row: {metric: value}} with null -> NaN."""
    rows = json.loads(Path(path).read_text())
    return {r: {k: (float("nan") if v is None else v) for k, v in m.items()} for r, m in rows.items()}


# ---------------------------------------------------------------------------------------------------------
# Benchmark: python metrics.py --bench
# ---------------------------------------------------------------------------------------------------------

def bench(n_speakers=20, K=10, T=750):
    """Time FD and FRDist on random data; prints wall and process CPU time (they differ on a busy machine)."""
    def timed(f, n=1):
        t, c = time.perf_counter(), time.process_time()
        for _ in range(n):
            r = f()
        return r, (time.perf_counter() - t) / n, (time.process_time() - c) / n
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((10000, 56)), rng.standard_normal((10000, 56)) + 0.1
    frechet_distance(a, b)  # warm-up
    _, w, c = timed(lambda: frechet_distance(a, b), 5)
    print(f"FD of two (10000, 56) sets: wall {w * 1e3:.1f} ms, cpu {c * 1e3:.1f} ms (target <= 50 ms)")
    P, L = rng.random((n_speakers, K, T, 25)), rng.random((n_speakers, T, 25))
    d, w, c = timed(lambda: fr_dist(P, L, np.eye(n_speakers, dtype=bool)))
    print(f"FRDist {K} samples x {n_speakers} speakers x {T} frames (identity appropriate set, "
          f"{n_speakers * K * 3} DTWs): wall {w:.1f} s, cpu {c:.1f} s (target <= 30 s); sum {d['sum']:.3f}")


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="metrics.py speed benchmark")
    ap.add_argument("--bench", action="store_true", help="time FD and FRDist on random data")
    ap.add_argument("--speakers", type=int, default=20, help="FRDist: number of speakers N")
    ap.add_argument("--frames", type=int, default=750, help="FRDist: frames T")
    args = ap.parse_args()
    if args.bench:
        bench(n_speakers=args.speakers, T=args.frames)
    else:
        ap.print_help()
