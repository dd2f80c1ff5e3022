"""metrics.py: the metrics of the five papers' tables, the baselines they are compared with, and the writers.

Not here: FID and FRRea (REACT's realism score). Both score rendered face images, so they need a photo-real face
renderer, and this repository has none. Every other metric column of the papers' tables is here.

How the file reads:
    1. each metric's plain definition: a few lines of numpy, with the formula in the docstring;
    2. the batched fast paths that the tables run (tests/test_metrics.py checks each against its plain definition);
    3. the table functions that the method files call: listener_metrics, react_metrics, face_metrics;
    4. the baselines; 5. the Markdown table and metrics.json writers;
    6. the evaluation protocol of each method, the one function its sample() calls: evaluate_codec (vqvae.py),
       evaluate_diff_listener (discrete_diffusion.py; it samples with sample_windows and listen_long),
       evaluate_lm_listener_split (lm_listener.py), sample_react
       (latent_diffusion.py; it calls evaluate_react), evaluate_talking (diff_transformer.py): they build the
       GT / alt-GT / baseline / oracle / model rows and the printed table; and rule_responses, which social rule a
       listener answers;
    7. `python metrics.py --bench`, which times FD and FRDist against the reference code (numpy/scipy, tslearn)
       when it is installed.

Whose evaluation code we follow (a docstring that departs from it ends with a "Differs from original:" note):
    listener motion (L2, FD, P-FD, Var, Div, L2-Affect): LM-Listener (arXiv 2308.10897), Learning2Listen
        (arXiv 2204.08451); FD is the Frechet distance of FID (arXiv 1706.08500) on motion frames.
    REACT (FRCorr, FRDist, FRDiv, FRVar, FRDvs, FRSyn): the REACT 2023 and 2024 challenges (arXiv 2306.06583,
        arXiv 2401.05166), whose baseline package defines them.
    talking faces (LVE, FDD, MVE): MeshTalk / FaceFormer (arXiv 2104.08223, 2112.05329) for LVE, CodeTalker
        (arXiv 2301.02379) for FDD, and DiffSpeaker (arXiv 2402.05712), which reports LVE per sequence.

Conventions: inputs are np.ndarray or torch.Tensor, converted to float64 numpy; outputs are Python floats or
dict[str, float]; NaN/inf input raises ValueError naming the argument; randomness only through a keyword `seed`.
Letters: T frames, D dims, N speakers, K samples per speaker, M reference pool, V vertices, L tokens, Q queries.
"""
import json
import math
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import data

EXP = slice(0, 50)  # listener expression dims
POSE = slice(50, 56)  # head rotation (3) + jaw (3)
PARTS = {"all": slice(0, 56), "exp": EXP, "pose": POSE}
REACT_BLOCKS = ((0, 15, 1 / 15), (15, 17, 1.0), (17, 25, 1 / 8))  # (start, end, weight): AUs, VA, emotions

# Column order of the three kinds of table (every method prints the same columns).
LISTENER_COLUMNS = ["mse/all", "mse/exp", "mse/pose", "fd/exp", "fd/pose", "pfd/exp", "pfd/pose",
                    "var_pred/all", "div_pred/all", "affect_l2"]
REACT_COLUMNS = ["frcorr_sum", "frcorr_mean", "frdist_sum", "frdist_mean", "frdiv", "frvar", "frdvs",
                 "frsyn", "frsyn_skipped"]
FACE_COLUMNS = ["lve", "lve_seq", "fdd", "fdd_abs", "mve"]


# ---------------------------------------------------------------------------------------------------------
# Input conversion and checks
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
# 1. Plain definitions: listener motion (one window: pred, gt, speaker of T frames; LM-Listener's protocol)
# ---------------------------------------------------------------------------------------------------------

def mse(pred, gt):
    """The "L2" column: (1/(T*D)) sum_{t,d} (pred - gt)^2, a mean of squares without a root (LM-Listener). ↓."""
    p, g = _arr(pred, "pred"), _arr(gt, "gt")
    _same_shape(p, g, "pred", "gt")
    return float(np.mean((p - g) ** 2))


def gaussian_stats(x):
    """Frame mean mu (D,) and unbiased covariance S (D, D) = xc^T xc / (T - 1) of a frame set x (T, D)
    (numpy's cov(rowvar=False))."""
    x = _arr(x, "x", 2)
    if x.shape[0] < 2:
        raise ValueError(f"x: FD needs at least 2 frames, got {x.shape[0]}")
    return _gaussian_stats(x)


def _gaussian_stats(x):
    mu = x.mean(0)
    xc = x - mu
    return mu, xc.T @ xc / (x.shape[0] - 1)


def frechet_from_stats(mu1, cov1, mu2, cov2):
    """FD = ||mu1 - mu2||^2 + tr C1 + tr C2 - 2 tr (C1 C2)^(1/2), the Frechet distance of two Gaussians
    (mu1, C1 = cov1) and (mu2, C2 = cov2), as FID uses it (arXiv 1706.08500).

    C1 C2 is not symmetric, but it is similar to M = C1^(1/2) C2 C1^(1/2), which is symmetric PSD, so
    tr (C1 C2)^(1/2) = sum_i sqrt(eig_i(M)); C1^(1/2) = U diag(sqrt(max(w, 0))) U^T from C1's eigenpairs (w, U).
    Differs from original: the original takes scipy's sqrtm of the non-symmetric product (with a 1e-6 I retry
    and dropping imaginary parts); the symmetric route needs neither (agreement ~1e-12 relative on full-rank
    covariances, ~1e-8 on a 24-frame window in 56-D).
    """
    mu1, mu2 = _arr(mu1, "mu1", 1), _arr(mu2, "mu2", 1)
    c1, c2 = _arr(cov1, "cov1", 2), _arr(cov2, "cov2", 2)
    c1, c2 = (c1 + c1.T) / 2, (c2 + c2.T) / 2  # symmetrise against round-off
    w, U = np.linalg.eigh(c1)
    R = (U * np.sqrt(np.clip(w, 0, None))) @ U.T  # C1^(1/2)
    M = R @ c2 @ R
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((M + M.T) / 2), 0, None)).sum()  # tr (C1 C2)^(1/2)
    fd = ((mu1 - mu2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * tr_sqrt
    return float(max(fd, 0.0))  # round-off can give about -1e-15


def frechet_distance(a, b):
    """FD between the frame sets a (T_a, D) and b (T_b, D), each fitted with a Gaussian (gaussian_stats) and
    compared with frechet_from_stats. T_a != T_b is allowed; each needs >= 2 frames. ↓."""
    a, b = _arr(a, "a", 2), _arr(b, "b", 2)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must have the same feature dim, got {a.shape[1]} and {b.shape[1]}")
    for x, n in ((a, "a"), (b, "b")):
        if x.shape[0] < 2:
            raise ValueError(f"{n}: FD needs at least 2 frames, got {x.shape[0]}")
    return frechet_from_stats(*_gaussian_stats(a), *_gaussian_stats(b))  # (a and b are checked above)


def paired_frechet_distance(speaker, pred, gt):
    """P-FD = FD([s | gt], [s | pred]) on the per-frame concatenation of speaker and listener (same T): it
    measures speaker-listener synchrony, where the marginal FD can be 0 (LM-Listener). ↓."""
    s, p, g = _arr(speaker, "speaker", 2), _arr(pred, "pred", 2), _arr(gt, "gt", 2)
    _same_shape(p, g, "pred", "gt")
    if s.shape[0] != p.shape[0]:
        raise ValueError(f"speaker and pred must have the same T, got {s.shape[0]} and {p.shape[0]}")
    return frechet_distance(np.concatenate([s, g], 1), np.concatenate([s, p], 1))


def variation(x):
    """Var: (1/D) sum_d (1/T) sum_t (x_td - mean_t x_td)^2, the population variance over time (ddof 0,
    LM-Listener), averaged over dims. Closer to GT is better."""
    x = _arr(x, "x", 2)
    return float((x - x[:1]).var(axis=0).mean())  # shifted by frame 0: a constant channel gives exactly 0


def diversity(x, *, lm_compat=False, seed=0):
    """Div: the mean of ||x_i - x_j||_2 over all T(T-1)/2 frame pairs i < j (exact, deterministic). Closer to GT
    is better.

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
    total = sum(np.linalg.norm(x[i + 1:] - x[i], axis=1).sum() for i in range(T - 1))  # pairs (i, j > i)
    return float(total / (T * (T - 1) / 2))


def affect_l2(pred, gt, valence_fn, *, window=30):
    """L2-Affect: (1/n) sum_w (mean_{t in w} v_pred - mean_{t in w} v_gt)^2 over the n = T // w non-overlapping
    windows of w = min(window, T) frames, the trailing T - n*w frames dropped (as the original's unfold);
    valence_fn maps (T, 56) -> (T,) valence. ↓.

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


# ---------------------------------------------------------------------------------------------------------
# 1. Plain definitions: REACT (one reaction pred against one listener / speaker sequence, or the (N, K, T, D)
#    set of K generated reactions per speaker for the diversity scores)
# ---------------------------------------------------------------------------------------------------------

def ccc(x, y, *, react_compat=False):
    """Concordance correlation (Lin 1989), the mean over dims of 2 s_xy / (s_x^2 + s_y^2 + (mu_x - mu_y)^2)
    with population moments over time. Input (T,) or (T, D). ↑ in [-1, 1].

    Differs from original: a channel that is constant and equal in x and y scores 1 (the official code gives 0
    and shrinks every channel by a +1e-8 in the denominator); react_compat=True reproduces the official one.
    """
    a, b = _arr(x, "x"), _arr(y, "y")
    _same_shape(a, b, "x", "y")
    if a.ndim == 1:
        a, b = a[:, None], b[:, None]
    mx, my = a.mean(0), b.mean(0)
    vx, vy, sxy = a.var(0), b.var(0), ((a - mx) * (b - my)).mean(0)  # (D,) population moments
    den = vx + vy + (mx - my) ** 2
    if react_compat:  # the official: Pearson's rho (NaN -> 0, clipped) times both stds, + 1e-8 below
        with np.errstate(invalid="ignore", divide="ignore"):
            rho = np.clip(np.nan_to_num(sxy / np.sqrt(vx * vy), nan=0.0), -1, 1)
        return float(np.mean(2 * rho * np.sqrt(vx) * np.sqrt(vy) / (den + 1e-8)))
    return float(np.mean(np.where(den > 0, 2 * sxy / np.where(den > 0, den, 1.0), 1.0)))  # den = 0: equal constants


def dtw(a, b):
    """Dynamic time warping as tslearn's default (Sakoe & Chiba 1978): with C[i, j] = ||a_i - b_j||^2,
    R[0, 0] = 0, R[i, 0] = R[0, j] = inf and R[i, j] = C[i, j] + min(R[i-1, j], R[i, j-1], R[i-1, j-1]),
    DTW = sqrt(R[T_a, T_b]). a (T_a, d) or (T_a,), b (T_b, d).

    A cell at a time, to read; dtw_batch runs the same recursion batched over anti-diagonals, and fr_dist on the
    CPU with the costs from matrix products (_dtw_one_to_many); the same numbers to ~1e-16 relative.
    """
    a, b = _arr(a, "a"), _arr(b, "b")
    a, b = (a[:, None] if a.ndim == 1 else a), (b[:, None] if b.ndim == 1 else b)
    C = sum((a[:, None, k] - b[None, :, k]) ** 2 for k in range(a.shape[1]))  # (T_a, T_b), dims added in order
    R = np.full((len(a) + 1, len(b) + 1), np.inf)
    R[0, 0] = 0.0
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            R[i, j] = C[i - 1, j - 1] + min(R[i - 1, j], R[i, j - 1], R[i - 1, j - 1])
    return float(np.sqrt(R[-1, -1]))


def fr_div(preds):
    """FRDiv (the official S-MSE): per speaker, the mean over ordered sample pairs i != i' of the squared distance
    per element, (1/(K(K-1) T D)) sum_{i != i'} ||P_i - P_i'||^2, then the mean over speakers. ↑.

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
    """FRVar: the variance over time with ddof 1, averaged over N, K and D. Closer to GT is better."""
    P = _arr(preds, "preds", 4)
    if P.shape[2] < 2:
        raise ValueError(f"preds: FRVar needs T >= 2, got {P.shape[2]}")
    return float((P - P[:, :, :1]).var(axis=2, ddof=1).mean())  # shift by frame 0: exact 0 when constant


def fr_dvs(preds):
    """FRDvs: for each sample index i, the sum over ordered speaker pairs k != l of ||P[k,i] - P[l,i]||^2,
    divided by N(N-1) K T D. N = 1 gives NaN (as the original's 0/0). ↑."""
    P = _arr(preds, "preds", 4)
    N, K, T, D = P.shape
    if N < 2:
        return float("nan")
    ss = ((P - P.mean(0, keepdims=True)) ** 2).sum()  # sum_i sum_{k != l} ||.||^2 = 2N * this
    return float(2 * N * ss / (N * (N - 1) * K * T * D))


def tlcc_offset(pred, speaker, *, max_lag=49, react_compat=False):
    """Time-lagged cross-correlation offset |l*| in frames, l* = argmax over l in [-max_lag, max_lag] of the
    mean over dims of Pearson's r between pred[t + l] and speaker[t] on their overlap (l* > 0: the listener
    follows). Channels constant on the overlap are left out of the mean; NaN if no lag keeps any channel.

    Differs from original: the official code lets a constant channel's NaN through, which makes it score
    max_lag, and rounds r to float32; react_compat=True reproduces both.
    """
    p, s = _arr(pred, "pred"), _arr(speaker, "speaker")
    _same_shape(p, s, "pred", "speaker")
    p, s = (p[:, None], s[:, None]) if p.ndim == 1 else (p, s)
    T = p.shape[0]
    if T < max_lag + 3:
        raise ValueError(f"pred: TLCC needs T >= max_lag + 3 = {max_lag + 3}, got {T}")
    lags = np.arange(-max_lag, max_lag + 1)
    r = np.full(len(lags), np.nan)
    for n, l in enumerate(lags):
        x, y = (p[l:], s[:T - l]) if l > 0 else (p[:T + l], s[-l:]) if l < 0 else (p, s)
        xc, yc = x - x.mean(0), y - y.mean(0)
        const = (x.max(0) == x.min(0)) | (y.max(0) == y.min(0))  # (D,) exactly constant on the overlap
        with np.errstate(invalid="ignore", divide="ignore"):
            rd = (xc * yc).sum(0) / np.sqrt((xc ** 2).sum(0) * (yc ** 2).sum(0))
        if react_compat:
            r[n] = np.where(const, np.nan, rd).mean()  # one constant channel makes the lag NaN
        elif not const.all():
            r[n] = rd[~const].mean()
    if react_compat:  # float32 r, and argmax returns the first NaN as torch / numpy do
        r = r.astype(np.float32)
        return float(abs(lags[np.flatnonzero(np.isnan(r))[0] if np.isnan(r).any() else r.argmax()]))
    return float(abs(lags[np.nanargmax(r)])) if not np.isnan(r).all() else float("nan")


# ---------------------------------------------------------------------------------------------------------
# 1. Plain definitions: talking faces (lists of (T_i, V, 3) meshes; each pair cut to min(T_pred, T_gt))
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
    """LVE: per frame, the max over lip vertices of the squared L2 error; then the mean over all frames (pooled,
    MeshTalk / FaceFormer / CodeTalker) or, per_sequence=True, per sequence and then over sequences
    (DiffSpeaker). ↓."""
    lip = _region(lip_idx, "lip_idx")
    per = [((p[:, lip] - g[:, lip]) ** 2).sum(-1).max(-1) for p, g in _mesh_pairs(preds, gts)]  # (T_i,)
    return float(np.mean([e.mean() for e in per]) if per_sequence else np.concatenate(per).mean())


def fdd(preds, gts, templates, upper_idx, *, absolute=False):
    """FDD (CodeTalker; signed, best 0): per sequence dyn(gt - tmpl) - dyn(pred - tmpl), where dyn(m) is the mean
    over upper-face vertices of the population std over time of ||m_tv||^2; the mean over sequences
    (absolute=True: of |FDD_s|). > 0 means an under-animated upper face."""
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
    """MVE: the mean over all frames (pooled) and vertices of ||pred - gt||_2 (not squared). ↓."""
    errs = [np.linalg.norm(p - g, axis=-1).reshape(-1) for p, g in _mesh_pairs(preds, gts)]
    return float(np.concatenate(errs).mean())


# ---------------------------------------------------------------------------------------------------------
# 2. Batched fast paths (the same numbers as the plain definitions, many windows / pairs at once)
# ---------------------------------------------------------------------------------------------------------

class _one_thread:
    """Run torch on one CPU thread inside metric code (restored after): the batched ops here are small, and
    several intra-op threads on a busy machine stall."""

    def __enter__(self):
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)


def _frechet_batch(mu1, c1, mu2, c2):
    """frechet_from_stats of B pairs: (B, D), (B, D, D) x2 -> (B,) float64, eigensolves batched in torch.

    Where C1 = L L^T is positive definite, M = L^T C2 L (similar to C1 C2, like C1^(1/2) C2 C1^(1/2)) needs only
    a Cholesky factor; otherwise (constant channels, T <= D) the eigen square root of the plain definition.
    """
    c1 = torch.as_tensor(c1, dtype=torch.float64)
    c2 = torch.as_tensor(c2, dtype=torch.float64)
    c1 = 0.5 * (c1 + c1.transpose(-1, -2))  # symmetrise against round-off
    c2 = 0.5 * (c2 + c2.transpose(-1, -2))
    Lc, info = torch.linalg.cholesky_ex(c1)  # (B, D, D); info > 0 where C1 is not positive definite
    M = Lc.transpose(-1, -2) @ c2 @ Lc
    bad = info > 0
    if bad.any():
        w, U = torch.linalg.eigh(c1[bad])  # (b, D), (b, D, D)
        R = (U * w.clamp_min(0).sqrt().unsqueeze(-2)) @ U.transpose(-1, -2)  # C1^(1/2)
        M[bad] = R @ c2[bad] @ R
    M = 0.5 * (M + M.transpose(-1, -2))
    tr_sqrt = torch.linalg.eigvalsh(M).clamp_min(0).sqrt().sum(-1)  # tr (C1 C2)^(1/2)
    dmu = torch.as_tensor(mu1, dtype=torch.float64) - torch.as_tensor(mu2, dtype=torch.float64)
    fd = (dmu ** 2).sum(-1) + c1.diagonal(dim1=-2, dim2=-1).sum(-1) \
        + c2.diagonal(dim1=-2, dim2=-1).sum(-1) - 2 * tr_sqrt
    return fd.clamp_min(0).numpy()  # round-off can give about -1e-15


def _stats_many(Xs):
    """gaussian_stats of frame sets [(T_i, D_i)] -> lists of torch mean (D,) and cov (D, D), batched over equal
    shapes; each set is shifted by its first frame first, so constant channels get exactly 0 variance."""
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


def _diversity_many(Xs, chunk=2048):
    """diversity of each frame set [(T_i, D)] -> (n,), batched over equal shapes (one thread).

    Distances come from the Gram matrix of the frames shifted by frame 0, d_ij^2 = n_i + n_j - 2 g_ij (clipped
    at 0): exact 0 for a constant window, no precision lost to offsets, and faster than explicit differences
    (agreement ~1e-12 relative on generic data). Rows are chunked above 2048 frames.
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


def _ccc_batch(x, y, react_compat=False):
    """ccc of (..., T, D) pairs -> (...), the mean over D of per-dim CCC with population moments."""
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


def _dtw_sweep(A, Br, xp):
    """Squared DTW of B pairs, anti-diagonal by anti-diagonal: A (d, T_a, B) and Br (d, T_b, B), b reversed in
    time, as numpy (xp = np) or torch (xp = torch) arrays -> R[T_a, T_b] (B,).

    Cell (i, j) (1-based) needs R on the two anti-diagonals before its own, s = i + j, so one vector step does a
    whole diagonal of every pair. There a's frames i - 1 and b's frames s - i - 1 (at Br[:, T_b - s + i]) are
    two contiguous slices: the cost is summed over d right there, without a T_a x T_b cost matrix, and with the
    pairs innermost every op runs over (cells, pairs) in cache.
    """
    d, Ta, B = A.shape
    Tb = Br.shape[1]

    def new(*shape):
        return np.empty(shape) if xp is np else torch.empty(shape, dtype=torch.float64, device=A.device)
    R = [new(Ta + 1, B), new(Ta + 1, B), new(Ta + 1, B)]  # R on diagonals s-2, s-1, s by padded row i in [0, T_a]
    for r in R:
        r[:] = np.inf
    R[0][0] = 0.0  # diagonal 0: R[0, 0] = 0, the cell before the first frames
    diff, cost, best = new(d, Ta, B), new(Ta, B), new(Ta, B)
    for s in range(2, Ta + Tb + 1):
        r2, r1, r0 = R[(s - 2) % 3], R[(s - 1) % 3], R[s % 3]
        lo, hi = max(1, s - Tb), min(Ta, s - 1)  # rows i of the cells (i, s - i) inside the grid
        n, u = hi - lo + 1, Tb - s + lo
        dd, c, m = diff[:, :n], cost[:n], best[:n]
        xp.subtract(A[:, lo - 1:hi], Br[:, u:u + n], out=dd)  # a_{i-1} - b_{j-1}, (d, n, B)
        if xp is np:
            np.einsum("knb,knb->nb", dd, dd, out=c)  # C[i-1, j-1], (n, B): squares summed over d in one pass
        else:
            torch.sum(dd * dd, 0, out=c)
        xp.minimum(r1[lo - 1:hi], r1[lo:hi + 1], out=m)  # R[i-1, j], R[i, j-1]
        xp.minimum(m, r2[lo - 1:hi], out=m)  # R[i-1, j-1]
        xp.add(m, c, out=r0[lo:hi + 1])
        r0[lo - 1] = np.inf  # the grid's border, read by the next two diagonals
        if hi < Ta:
            r0[hi + 1] = np.inf
    return R[(Ta + Tb) % 3][Ta]


@torch.no_grad()
def dtw_batch(a, b, *, max_bytes=2 ** 21):
    """dtw of B pairs: a (B, T_a, d), b (B, T_b, d) -> (B,) float64 torch tensor on a's device.

    On CPU it runs _dtw_sweep in numpy on one thread and gives dtw's numbers (and tslearn's: the same additions,
    up to the order in which numpy sums the d terms of a cost, ~1e-16 relative); on another device the same loop
    runs in torch. Pairs go in chunks whose frames take about max_bytes (to stay in the CPU's cache); on a GPU
    all pairs go at once.
    """
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    if not torch.isfinite(a).all():
        raise ValueError("a contains NaN or inf")
    if not torch.isfinite(b).all():
        raise ValueError("b contains NaN or inf")
    dev = a.device
    a, b = a.to(torch.float64), b.to(device=dev, dtype=torch.float64)
    Bn, Ta, d = a.shape
    Tb = b.shape[1]
    xp = np if dev.type == "cpu" else torch
    chunk = max(1, max_bytes // (8 * d * (Ta + Tb))) if xp is np else max(1, Bn)
    out = []
    for c0 in range(0, Bn, chunk):
        A = a[c0:c0 + chunk].permute(2, 1, 0).contiguous()  # (d, T_a, B): pairs innermost
        Br = b[c0:c0 + chunk].flip(1).permute(2, 1, 0).contiguous()  # (d, T_b, B), reversed in time
        if xp is np:
            out.append(torch.from_numpy(np.sqrt(_dtw_sweep(A.numpy(), Br.numpy(), np))))
        else:
            out.append(_dtw_sweep(A, Br, torch).sqrt())
    return torch.cat(out)


def _dtw_one_to_many(A, Bs, *, tau=1e-3, max_pairs=32, bufs=None):
    """Squared dtw of every a in A (G, T_a, d) against every b in Bs (m, T_b, d), numpy float64 -> (G, m).
    fr_dist's CPU path: each generated reaction against all its appropriate real ones.

    The idea (why it beats tslearn's compiled loop from Python): the d-dim costs, which dominate the work, come
    from matrix products, C[i, j] = |a_i|^2 + |b_j|^2 - 2 a_i . b_j (BLAS), not from d passes of differences; and
    the products are written straight into a buffer ordered by anti-diagonal, D[i + j, i, pair], so that the
    recursion (as in _dtw_sweep) reads each diagonal of every pair as one contiguous block. For fixed j and a,
    the cells (i, j) over i and over the m b's form a plain (T_a, m) matrix inside D (row stride (T_a + 1) m),
    so one matmul call with a strided `out` fills D.
    Exactness: the product form has an absolute error per cell below 2 (d + 2) eps (|a|^2_max + |b|^2_max)
    (frames shifted by A's mean first), so a path of T_a + T_b cells is off by at most (T_a + T_b) times that. A
    pair whose result is below tau times that scale (nearly identical sequences) is recomputed from the
    differences by _dtw_sweep, as dtw does (identical ones give exactly 0); the others agree with dtw to
    ~1e-16 relative (at worst 2 (d + 2) eps / tau, ~4e-12).
    """
    G, Ta, d = A.shape
    m, Tb = Bs.shape[:2]
    mu = A.reshape(-1, d).mean(0)  # the costs are shift-invariant; shifting keeps |a|^2, |b|^2 small
    B0 = Bs - mu
    nb = np.einsum("mtk,mtk->mt", B0, B0)
    Bj = np.concatenate([B0, np.ones((m, Tb, 1)), nb[..., None]], -1).transpose(1, 2, 0).copy()  # (T_b, d+2, m)
    bufs = {} if bufs is None else bufs
    out = np.empty((G, m))
    gc = max(1, max_pairs // m)  # reactions a per sweep: about max_pairs pairs side by side
    for g0 in range(0, G, gc):
        Ag = A[g0:g0 + gc]
        g = len(Ag)
        A0 = Ag - mu
        na = np.einsum("gtk,gtk->gt", A0, A0)
        Aa = np.concatenate([-2 * A0, na[..., None], np.ones((g, Ta, 1))], -1)  # (g, T_a, d+2): rows [-2a, |a|^2, 1]
        key = (Ta, Tb, g, m)
        if key not in bufs:  # cells outside the grid are never written: inf (allocated once, reused)
            bufs.clear()  # (one buffer at a time: ~9 MB per pair of 750-frame sequences)
            bufs[key] = np.full((Ta + Tb - 1, Ta, g, m), np.inf)
        D = bufs[key]
        s0, s1, s2, s3 = D.strides
        V = np.lib.stride_tricks.as_strided(D, (Tb, g, Ta, m), (s0, s2, s0 + s1, s3))  # V[j, a, i, b] = D[i+j, i, a, b]
        np.matmul(Aa[None], Bj[:, None], out=V)  # C[i, j] = -2 a_i.b_j + |a_i|^2 + |b_j|^2, per (j, a): (T_a, m)
        r = _dtw_sweep_costs(D.reshape(Ta + Tb - 1, Ta, g * m))
        redo = np.flatnonzero(r < tau * (Ta + Tb) * (na.max() + nb.max()))  # nearly identical: exact differences
        if len(redo):
            a, b = Ag[redo // m], Bs[redo % m]
            r[redo] = _dtw_sweep(a.transpose(2, 1, 0).copy(), b[:, ::-1].transpose(2, 1, 0).copy(), np)
        out[g0:g0 + g] = r.reshape(g, m)
    return out


def _dtw_sweep_costs(D):
    """_dtw_sweep's anti-diagonal recursion on precomputed costs D[s, i, p] of P pairs (cell (i, s - i), 0-based;
    D (T_a + T_b - 1, T_a, P)) -> R[T_a, T_b] (P,)."""
    S, Ta, P = D.shape
    Tb = S - Ta + 1
    R = [np.full((Ta + 1, P), np.inf) for _ in range(3)]  # R on diagonals s-2, s-1, s by padded row i in [0, T_a]
    R[0][0] = 0.0
    best = np.empty((Ta, P))
    for s in range(2, Ta + Tb + 1):  # 1-based cells (i, s - i)
        r2, r1, r0 = R[(s - 2) % 3], R[(s - 1) % 3], R[s % 3]
        lo, hi = max(1, s - Tb), min(Ta, s - 1)
        m = best[:hi - lo + 1]
        np.minimum(r1[lo - 1:hi], r1[lo:hi + 1], out=m)  # R[i-1, j], R[i, j-1]
        np.minimum(m, r2[lo - 1:hi], out=m)  # R[i-1, j-1]
        np.add(m, D[s - 2, lo - 1:hi], out=r0[lo:hi + 1])  # + C[i-1, s-i-1] of every pair, one contiguous block
        r0[lo - 1] = np.inf  # the grid's border, read by the next two diagonals
        if hi < Ta:
            r0[hi + 1] = np.inf
    return R[(Ta + Tb) % 3][Ta]


def _tlcc_lags(P, S, W, react_compat):
    """tlcc_offset's signed lag l* of B pairs: P, S (B, T, D) -> (B,) in [-W, W] (NaN where no lag is valid)."""
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


# ---------------------------------------------------------------------------------------------------------
# 3. Tables: every metric of a row at once (what the method files call)
# ---------------------------------------------------------------------------------------------------------

def listener_metrics(preds, gts, speakers, *, valence_fn=None, groups=None, lm_compat_diversity=False, seed=0):
    """Every listener metric per window, then the unweighted mean over windows, as one flat dict.

    preds, gts, speakers: equal-length lists of (T_i, 56) arrays. Keys "{m}/{part}" for
    m in mse, fd, pfd, var_pred, var_gt, div_pred, div_gt and part in all, exp, pose; "affect_l2" when
    valence_fn is given; "n_windows". groups (one int per window): windows sharing an id are concatenated in
    time first (a per-video protocol). Window i uses diversity seed seed + i.
    FD and P-FD run through _stats_many / _frechet_batch, Div through _diversity_many.
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
    """FRCorr: S[k, i] = max over j in A_k of ccc(listeners[j], preds[k, i]); {"sum": K * mean S, "mean"}. ↑.

    preds (N, K, T, D), listeners (M, T, D), appropriate (N, M) bool: A_k = the reactions appropriate to
    speaker k. Differs from original: the sensible CCC by default (react_compat=True: the official CCC).
    """
    P, L = _arr(preds, "preds", 4), _arr(listeners, "listeners", 3)
    N, K = P.shape[:2]
    A = _appropriate(appropriate, N, L.shape[0])
    S = np.empty((N, K))
    for k in range(N):
        Lk = L[A[k]]  # (m, T, D)
        S[k] = _ccc_batch(Lk[None], P[k][:, None], react_compat).max(1)  # (K, m) -> (K,)
    return _sum_mean(S)


def fr_dist(preds, listeners, appropriate, *, blocks=REACT_BLOCKS, react_compat=False, device="cpu"):
    """FRDist: S[k, i] = min over j in A_k of sum_blocks w * dtw(P[k, i][:, s:e], L_j[:, s:e]);
    {"sum": K * mean S, "mean"}. ↓.

    On the CPU, per speaker and block, all K samples against the appropriate reactions in _dtw_one_to_many
    (costs from matrix products, exact where frames nearly coincide); on another device (device="cuda") all
    (k, i, j) triples go through dtw_batch, 512 at a time.
    react_compat=True rounds the inputs to float32 first, as the official code does.
    Differs from original: batched anti-diagonal DTW instead of tslearn in a process pool (same numbers, ~1e-16
    relative).
    """
    P, L = _arr(preds, "preds", 4), _arr(listeners, "listeners", 3)
    if react_compat:
        P, L = P.astype(np.float32).astype(np.float64), L.astype(np.float32).astype(np.float64)
    N, K = P.shape[:2]
    A = _appropriate(appropriate, N, L.shape[0])
    if torch.device(device).type == "cpu":
        S, bufs = np.empty((N, K)), {}  # bufs: the diagonal-ordered cost buffers, allocated once
        for k in range(N):
            Lk, Dk = L[A[k]], np.zeros((K, int(A[k].sum())))  # Dk[i, j]: sum over blocks, added in block order
            for s, e, w in blocks:
                Dk += w * np.sqrt(_dtw_one_to_many(P[k][:, :, s:e], Lk[:, :, s:e], bufs=bufs))
            S[k] = Dk.min(1)  # min over the appropriate reactions
        return _sum_mean(S)
    kk, jj = np.nonzero(A)  # appropriate (speaker, reaction) pairs
    k3, i3, j3 = np.repeat(kk, K), np.tile(np.arange(K), len(kk)), np.repeat(jj, K)  # (k, i, j) triples
    D = np.zeros(len(k3))
    for s, e, w in blocks:
        for c in range(0, len(k3), 512):
            q = slice(c, c + 512)
            a, b = torch.from_numpy(P[k3[q], i3[q], :, s:e]), torch.from_numpy(L[j3[q], :, s:e])  # (<=512, T, e-s)
            D[q] += w * dtw_batch(a.to(device), b.to(device)).cpu().numpy()
    S = np.full((N, K), np.inf)
    np.minimum.at(S, (k3, i3), D)  # min over appropriate j, per speaker and sample
    return _sum_mean(S)


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
    """FRSyn: the mean over (k, i) of tlcc_offset(preds[k, i], speakers[k], max_lag=W), W = int(seconds*fps) - 1.
    ↓ (frames; divide by fps for seconds). Pairs with no valid lag are skipped (NaN if all are).

    Differs from original: see tlcc_offset; the official parallel script scores only sample 0
    (first_sample_only=True reproduces it).
    """
    return _fr_syn(preds, speakers, fps, seconds, first_sample_only, react_compat)[0]


def react_metrics(preds, listeners, speakers, appropriate, *, fps=25, react_compat=False, device="cpu",
                  with_dist=True):
    """All REACT metrics: preds (N, K, T, D), listeners (M, T, D), speakers (N, T, D), appropriate (N, M).

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


def face_metrics(preds, gts, templates, lip_idx, upper_idx):
    """All talking-face metrics: lve (pooled), lve_seq (per sequence), fdd (signed), fdd_abs, mve."""
    return {"lve": lip_vertex_error(preds, gts, lip_idx),
            "lve_seq": lip_vertex_error(preds, gts, lip_idx, per_sequence=True),
            "fdd": fdd(preds, gts, templates, upper_idx), "fdd_abs": fdd(preds, gts, templates, upper_idx,
                                                                         absolute=True),
            "mve": mean_vertex_error(preds, gts)}


# ---------------------------------------------------------------------------------------------------------
# 4. Baselines (output in the bank's units; retrieved windows cut to their first T frames)
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

    Differs from original: a public re-implementation of the L2L baselines samples only the first 5 windows
    (a bug)."""
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


def baseline_random_walk_codes(train_codes, n, L, K, *, alpha=0.0, seed=0):
    """First-order Markov walk over codes fitted on training token sequences -> (n, L) int64.

    pi = unigram frequency; P(j|i) = (c_ij + alpha) / (sum_j c_ij + alpha K), rows without counts fall back to pi.
    z_0 ~ pi, z_{t+1} ~ P(.|z_t). No original exists (our baseline for codebook priors)."""
    seqs = [_np(s, "train_codes").astype(np.int64).reshape(-1) for s in train_codes]
    codes = np.concatenate(seqs)
    if codes.size == 0 or codes.min() < 0 or codes.max() >= K:
        raise ValueError(f"train_codes must be non-empty codes in [0, {K})")
    pi = np.bincount(codes, minlength=K).astype(np.float64)
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


def baseline_mean_frame(bank_listener, T):
    """Mean frame: the per-dim mean over all bank frames, repeated T times -> (T, D)."""
    bank = _arr(bank_listener, "bank_listener")
    return np.repeat(bank.reshape(-1, bank.shape[-1]).mean(0)[None], T, axis=0)


# ---------------------------------------------------------------------------------------------------------
# 5. Reporting: Markdown table and metrics.json
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

# ---------------------------------------------------------------------------------------------------------
# 6a. Evaluation protocol: codec (vqvae.py): reconstruction, random walks over the codebook, MMLM Tab. 5
# ---------------------------------------------------------------------------------------------------------

# the Tab. 5 layout of MMLM (CVPR 2025): Rec., Commit., PPL; plus entropy, active codes and the codec floor (FD of the
# test windows' own tokens decoded)
TABLE5 = ["rec", "commit", "ppl", "entropy", "active", "fd/all"]


def usage_stats(idx, K):
    """Pooled code usage: (entropy H in nats, perplexity exp(H), active fraction) of an int tensor of indices."""
    counts = torch.bincount(idx.reshape(-1), minlength=K).double()
    p = counts / counts.sum()
    H = float(-(p[p > 0] * p[p > 0].log()).sum())
    return H, math.exp(H), float((counts > 0).double().mean())


def by_length(clips, size=64):
    """Batches of indices of clips of equal length (full clips at offset 0, no padding), at most `size` each."""
    groups = {}
    for i, c in enumerate(clips):
        groups.setdefault(c[0].shape[0], []).append(i)
    return [g[j:j + size] for g in groups.values() for j in range(0, len(g), size)]


@torch.no_grad()
def codec_stats(model, clips, device):
    """MMLM's Tab. 5 numbers on full clips: Rec (L_rec) and Commit averaged over clips, PPL = exp(H) and H of the
    pooled code usage, active fraction. -> (stats, reconstructions [x_hat (T, D)] in z-units, in clip order)"""
    model.eval()
    rec = commit = 0.0
    idx, recons = [], [None] * len(clips)
    for group in by_length(clips):
        x = torch.stack([clips[i][0] for i in group]).to(device)  # (B, T, D)
        beta = torch.stack([clips[i][1] for i in group]).to(device)  # (B, D_id)
        out = model(x, beta)
        rec += float(out["rec"]) * len(group)
        commit += float(out["commit"]) * len(group)
        idx.append(out["idx"].reshape(-1).cpu())
        for i, x_hat in zip(group, out["x_hat"].cpu()):
            recons[i] = x_hat
    H, ppl, active = usage_stats(torch.cat(idx), model.K)
    return dict(rec=rec / len(clips), commit=commit / len(clips), ppl=ppl, entropy=H, active=active), recons


@torch.no_grad()
def codec_tokens(model, clips, device):
    """Full clips at offset 0 -> [idx (L,) int64], in clip order."""
    tokens = [None] * len(clips)
    for group in by_length(clips):
        idx = model.encode(torch.stack([clips[i][0] for i in group]).to(device)).cpu()  # (B, T, D) -> (B, L)
        for i, t in zip(group, idx):
            tokens[i] = t
    return tokens


def random_walk_motion(train_codes, lengths, K, decode, seed=0):
    """MMLM's "Random Walk" rows (Tab. 1/2; the paper does not define the walk): for clip i, L_i tokens of a
    first-order Markov walk fitted on the training token sequences (baseline_random_walk_codes, seed + i),
    decoded with clip i's identity. decode(i, codes (1, L_i)) -> (T_i, 56). -> [(T_i, 56)]"""
    return [decode(i, baseline_random_walk_codes(train_codes, 1, L, K, seed=seed + i))
            for i, L in enumerate(lengths)]


def windows_of(motions, T):
    """Non-overlapping T-frame windows from frame 0 of each (T_i, D) motion (metrics.tiling's windows, the LM's)."""
    return [m[f0:f0 + T] for m in motions for f0 in range(0, m.shape[0] - T + 1, T)]


@torch.no_grad()
def codec_report(step, model, o, first_rec, val_clips, train_clips, device, picture):
    """The codec's validation during training (rank 0): the Tab. 5 numbers on the val clips (codec_stats), the train
    L_rec of this step's batch (o["rec"]) and of the first step (first_rec), printed, and a picture of one
    reconstruction at `picture`. -> metrics"""
    from tqdm import tqdm
    clips = val_clips or train_clips[:1]  # codec_stats sets eval mode: no codebook update
    val, x_hats = codec_stats(model, clips, device)
    met = {**({f"val_{k}": v for k, v in val.items()} if val_clips else {}), "train_rec": float(o["rec"]),
           "train_rec_first": first_rec}
    tqdm.write(f"step {step}: " + " | ".join(f"{k} {v:.4f}" for k, v in met.items()))
    try:
        data.plot_channels(picture, {"real": model.denormalize(clips[0][0]).numpy(),
                                     "reconstruction": model.denormalize(x_hats[0]).numpy()},
                           channels=[0, 1, 2, 50, 51, 53])
    except Exception as e:  # a picture must never kill a training run
        tqdm.write(f"(plot skipped: {e})")
    return met


@torch.no_grad()
def evaluate_codec(model, clips, train_clips, device, *, seed=0, out=None):
    """Every row of the codec's table, printed (all metrics, then the Tab. 5 layout).

    clips: the evaluated clips (x_norm, beta, item); train_clips: the training clips (their tokens fit the random
    walk; their listeners are the seen ones). Rec / Commit / PPL (codec_stats) are over whole clips; listener_metrics
    over the clips' non-overlapping T-frame windows, T = the training window (= the LM's 8-token window): the model
    row's windows are the decoded tokens of each test window, so its FD is the codec floor as the LM uses it.
    Rows: GT, model, model:seen / model:unseen (when some test listeners are not in train), model:whole_clip (every
    clip encoded and decoded in one pass, not in training-length windows), baseline:random_walk, alt-GT.
    out: a folder for metrics.json, recon.npy (up to 8 reconstructions), random_walk.npy and recon_test.png / .gif
    (the first clip: real, reconstruction, random walk). -> (rows, gts, recons, walks), motions [(T_i, 56)] raw units"""
    T, raw = model.cfg.window, lambda x: model.denormalize(x).cpu().numpy()  # z-units -> raw motion (T, 56)
    gts = [raw(c[0]) for c in clips]
    spk = [np.asarray(c[2]["speaker"], np.float32)[: g.shape[0]] for c, g in zip(clips, gts)]
    score = lambda motions, keep=None: listener_metrics(  # keep: which clips (default all)
        *(windows_of([m for i, m in enumerate(X) if keep is None or keep[i]], T) for X in (motions, gts, spk)))
    codec, recons = codec_stats(model, clips, device)
    recons = [raw(x) for x in recons]
    rows = {"GT": score(gts), "model": {**score(recons), **codec}}
    seen = {c[2]["listener_id"] for c in train_clips}
    known = [c[2]["listener_id"] in seen for c in clips]
    if not all(known):
        for name, keep in (("seen", known), ("unseen", [not k for k in known])):
            if any(keep):
                part = [c for c, k in zip(clips, keep) if k]
                rows[f"model:{name}"] = {**score(recons, keep), **codec_stats(model, part, device)[0]}
    chunk, model.chunk = model.chunk, 0
    try:
        whole, recons_whole = codec_stats(model, clips, device)
    finally:
        model.chunk = chunk
    rows["model:whole_clip"] = {**score([raw(x) for x in recons_whole]), **whole}
    train_codes = [t.numpy() for t in codec_tokens(model, train_clips, device)]

    def decode(i, codes):  # codes (1, L) -> (T, 56) raw motion with clip i's identity
        return raw(model.decode(torch.as_tensor(codes, device=device), clips[i][1][None].to(device))[0])
    walk = random_walk_motion(train_codes, [g.shape[0] // model.r for g in gts], model.K, decode, seed)
    rows["baseline:random_walk"] = score(walk)
    if all(c[2].get("alt_listener") is not None for c in clips):
        rows["alt-GT"] = score([np.asarray(c[2]["alt_listener"][0], np.float32)[: g.shape[0]]
                                for c, g in zip(clips, gts)])
    print(format_table(rows))
    print(f"\nTab. 5 layout (Rec = L_rec in z-units, Commit = mean |z_e - z_q|^2, PPL = exp of the code entropy; "
          f"fd/all of the model rows = the codec floor on {T}-frame windows):")
    print(format_table({k: v for k, v in rows.items() if k.startswith("model")}, TABLE5))
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        np.save(out / "recon.npy", np.stack(recons[:8]) if len({p.shape for p in recons[:8]}) == 1 else recons[0])
        np.save(out / "random_walk.npy", walk[0])
        shown = {"real": gts[0], "reconstruction": recons[0], "random walk": walk[0]}
        data.plot_channels(out / "recon_test.png", shown, channels=[0, 1, 2, 50, 51, 53])
        data.render_gif(out / "recon_test.gif", list(shown.values()), [clips[0][1].numpy()] * 3, list(shown))
        write_metrics_json(rows, out / "metrics.json")
        print(f"wrote {out / 'metrics.json'}, {out / 'recon_test.png'}, {out / 'recon_test.gif'}")
    return rows, gts, recons, walk


# ---------------------------------------------------------------------------------------------------------
# 6b. Evaluation protocol: listening heads, DiffListener (discrete_diffusion.py)
# ---------------------------------------------------------------------------------------------------------

# the columns of the listening-head tables: L2, FD, P-FD, variation, diversity, L2 of the affect (valence)
LISTENER_TABLE = ["mse/all", "fd/all", "pfd/all", "var_pred/all", "div_pred/all", "affect_l2"]


def listener_baselines(test, bank, codec=None, seed=0):
    """Baselines that see no model: a random training listener, the listener of the nearest speaker motion / audio /
    words in a bank of training windows, and, given a codec, a first-order random walk over its training tokens and
    its floor (the GT tokens decoded). test, bank: dicts of listener (n, T, D), speaker (n, T, D), audio (n, 4T, F),
    text [n] and codes (n, L); codec: dict(K, decode(codes (n, L)) -> (n, T, D)). -> {name: predictions (n, T, D)}"""
    bl, n, T = bank["listener"], len(test["listener"]), test["listener"].shape[1]
    base = {"random": baseline_random(bl, n, T, seed=seed),
            "nn_motion": baseline_nn_motion(test["speaker"], bank["speaker"], bl),
            "nn_audio": baseline_nn_audio(test["audio"], bank["audio"], bl, T=T),
            "nn_text": baseline_nn_text(test["text"], bank["text"], bl, T=T, seed=seed)}
    if codec is not None:
        L = test["codes"].shape[1]
        walk = baseline_random_walk_codes(np.asarray(bank["codes"]), n, L, codec["K"], seed=seed)
        base.update(random_walk=codec["decode"](walk), vq_floor=codec["decode"](test["codes"]))
    return base


def long_stream(segs, seconds, r):
    """A speaker stream of about `seconds` from consecutive segments of a split, cut to n frames, a multiple of r.
    segs: spk / lis (S, Ts, D), feat (S, 4 Ts, F), beta (S, D_id), words [S] lists of (text, end_s), fps, and n (S,)
    the frames of each segment when they differ (zero-padded to Ts past n; default all Ts): each segment joins the
    stream with its own length. -> dict of speaker (1, n, D), audio (1, 4n, F), words [[(text, end_s)]] shifted in
    time (history words of later segments dropped), beta (1, D_id) and listener (1, n, D) (the GT) of the first
    segment's listener."""
    (S, Ts), fps = segs["spk"].shape[:2], segs["fps"]
    length = [int(v) for v in segs["n"]] if segs.get("n") is not None else [Ts] * S
    sel, total = [], 0
    while not sel or total < seconds * fps:                           # segments 0, 1, ... (cycling) until long enough
        sel.append(len(sel) % S)
        total += length[sel[-1]]
    start = np.cumsum([0] + [length[i] for i in sel]) / fps           # seconds at which each chosen segment begins
    words = [(w, e + float(start[j])) for j, i in enumerate(sel) for w, e in segs["words"][i] if e >= 0 or j == 0]
    n = int(min(total, seconds * fps)) // r * r
    join = lambda x, k=1: torch.cat([x[i, :k * length[i]] for i in sel])[None, :k * n]  # (1, k n, ...)
    return dict(speaker=join(segs["spk"]), audio=join(segs["feat"], 4), words=[words], beta=segs["beta"][sel[:1]],
                listener=join(segs["lis"]))


def long_conversation(segs, seconds, r, listen, every):
    """The long-conversation protocol: listen(stream, hop) -> listener (n, D) of a long_stream, with windows every
    hop tokens; jointly denoised half-overlapping windows (hop None) against independent windows (hop = a whole
    window of `every` frames). -> the `long` entry of evaluate_listener."""
    st = long_stream(segs, seconds, r)
    joint, independent = listen(st), listen(st, every // r)
    return dict(joint=joint, independent=independent, gt=st["listener"][0].numpy(), speaker=st["speaker"][0].numpy(),
                every=every, fps=segs["fps"])


def seam_ratio(x, every):
    """Mean |x_{t+1} - x_t| across frames t+1 = k * every (window boundaries) / the same over all frames."""
    step = np.abs(np.diff(x, axis=0)).mean(-1)                        # (T-1,)
    b = np.arange(every, len(x), every) - 1
    return float(step[b].mean() / step.mean())


def best_of_times(fn, n=3):
    """Median wall time of fn() over n runs (after one warm-up run)."""
    fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def time_sampler(segs, r, listen, steps, runs, batch, device):
    """listen(stream, hop, S, B) samples B listeners of a long_stream with S steps; best_of_times on an 8-s stream of
    segs. -> row entries: seconds per listener (S = steps and S = 10) and listeners per second at batch B."""
    s8 = long_stream(segs, 8, r)
    one = lambda S, B=1: listen(s8, None, S, B)
    t1, tf = best_of_times(lambda: one(steps), runs), best_of_times(lambda: one(10), runs)
    tb = best_of_times(lambda: one(steps, batch), n=1)
    print(f"timing on {device} ({torch.get_num_threads()} threads): one 8-s listener {t1:.3f} s ({steps} steps), "
          f"fast sampler 10 steps {tf:.3f} s, batch {batch}: {tb:.2f} s = {batch / tb:.1f} 8-s listeners/s")
    return {"sec_per_8s_sample": t1, "sec_per_8s_sample_fast10": tf, f"samples_per_s_batch{batch}": batch / tb}


def best_baseline(rows):
    """The baseline row of lowest FD, the codec floor (baseline:vq_floor, not a listener) aside."""
    return min((k for k in rows if k.startswith("baseline:") and k != "baseline:vq_floor"),
               key=lambda k: rows[k]["fd/all"])


def gap_report(rows, model="model"):
    """How much of the FD gap between the best baseline (the codec floor aside) and alt-GT the model closes."""
    bfd = rows[best_baseline(rows)]["fd/all"]
    if "alt-GT" in rows and bfd <= rows["alt-GT"]["fd/all"]:
        print(f"FD: best baseline {bfd:.3f} <= alt-GT {rows['alt-GT']['fd/all']:.3f}: no gap to close")
    elif "alt-GT" in rows:
        closed = (bfd - rows[model]["fd/all"]) / (bfd - rows["alt-GT"]["fd/all"])
        print(f"FD: best baseline {bfd:.3f}, {model} {rows[model]['fd/all']:.3f}, alt-GT {rows['alt-GT']['fd/all']:.3f}"
              f" -> {100 * closed:.0f}% of the gap closed")


# the rule table's columns: the share of each rule's events a listener answers (sarcasm: answered, wrongly)
RULE_COLUMNS = [f"rule/{r}" for r in ("pause", "amused", "laugh", "smile_seen", "loud", "valence", "sarcasm")]


def stitch(x, seg):
    """Windows x (n, T, D) whose segments seg (n,) come in order, each segment's windows its consecutive crops
    from frame 0 (crop stride T) -> ([(k T, D)] one sequence per segment, the segments in order of appearance)."""
    seg = np.asarray(seg)
    order = list(dict.fromkeys(seg.tolist()))
    return [np.concatenate(np.asarray(x)[seg == s]) for s in order], order


def listener_rules(preds, rules):
    """Which social rule each row's listener answers (rule_responses) over whole segments: each segment's windows
    joined (stitch) and scored against its ledger events. preds: {row: [(n, T, D) per seed]}; rules: dict(seg (n,)
    segment of each window, events [S] per segment (data.load_ledger), fps). -> {row: {"rule/<r>": share answered
    (mean over seeds; sarcasm: share wrongly answered), "rule_n/<r>": events scored}}"""
    out = {}
    for row, runs in preds.items():
        per = []
        for x in runs:
            seqs, order = stitch(x, rules["seg"])
            per.append(rule_responses(seqs, [rules["events"][s] for s in order], rules["fps"]))
        out[row] = {(f"rule_n/{k[2:]}" if k.startswith("n_") else f"rule/{k}"): float(np.mean([p[k] for p in per]))
                    for k in per[0]}
    return out


def plot_key_channels(path, series, events, fps, title=""):
    """PNG of the key channels of one sequence, head pitch (nods), smile and brow raise, one line per series
    {name: (T, D)}, with the speaker's rule events (data.load_ledger's {rule: [t] or [[t, change]]}) as dashed
    vertical lines, one colour per rule."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    T = min(len(v) for v in series.values())
    colour = dict(zip(RULES, ["tab:olive", "tab:pink", "tab:purple", "tab:brown", "tab:red", "tab:cyan", "black"]))
    seen = {}
    fig, axes = plt.subplots(3, 1, figsize=(9, 5.6), sharex=True)
    for ax, (ch, label) in zip(axes, [(data.PITCH, "head pitch (nods)"), (data.SMILE, "smile"),
                                      (data.BROW_RAISE, "brow raise")]):
        for name, x in series.items():
            ax.plot(np.arange(T) / fps, np.asarray(x, np.float32)[:T, ch], lw=1.2, label=name)
        for rule, ts in (events or {}).items():
            for e in ts:
                t = e[0] if isinstance(e, (list, tuple)) else e
                if 0 <= t < T / fps:
                    ax.axvline(t, color=colour.get(rule, "grey"), ls="--", lw=1.0)
                    seen[rule] = colour.get(rule, "grey")
        ax.set_ylabel(label, fontsize=8)
    axes[0].legend(fontsize=7, loc="upper left", ncol=len(series))
    if seen:
        axes[1].legend([Line2D([], [], color=c, ls="--") for c in seen.values()], [f"speaker: {r}" for r in seen],
                       fontsize=7, loc="upper left", ncol=len(seen))
    axes[0].set_title(title, fontsize=9)
    axes[-1].set_xlabel("seconds")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def evaluate_listener(test, bank, preds, *, codec=None, long=None, timing=None, valence_fn=None, seed=0, rules=None,
                      picture=None):
    """Every row of a listening-head table, printed and returned ({row: {metric: value}}, listener_metrics).

    test / bank: the evaluated windows and a bank of training windows (see listener_baselines; test may hold alt,
    an alternative listener (n, T, D) -> row alt-GT); preds: {row: [predictions (n, T, D) per seed]}, a row's
    metrics are the mean over seeds; codec: adds baseline:random_walk and baseline:vq_floor; long: dict(joint,
    independent, gt (T', D), every (frames)) -> seam ratios printed; timing: entries added to the "model" row;
    rules: dict(seg, events, fps) (listener_rules; events None or all None: no rule table) -> rule/<r> and
    rule_n/<r> in every row, printed as a rule table; picture: a PNG path -> plot_key_channels of the segment with
    the most events, GT, the model (first seed) and the best baseline.
    Rows: GT, alt-GT, baseline:random, :nn_motion, :nn_audio, :nn_text, :random_walk, :vq_floor, then preds."""
    vfn = valence_fn or data.FaceModel().valence
    score = lambda p: listener_metrics(list(p), list(test["listener"]), list(test["speaker"]), valence_fn=vfn)
    rows = {"GT": score(test["listener"])}
    seqs = {"GT": [test["listener"]]}
    if test.get("alt") is not None:
        rows["alt-GT"], seqs["alt-GT"] = score(test["alt"]), [test["alt"]]
    for k, v in listener_baselines(test, bank, codec, seed).items():
        rows[f"baseline:{k}"], seqs[f"baseline:{k}"] = score(v), [v]
    for name, runs in preds.items():
        per = [score(x) for x in runs]
        rows[name] = {k: float(np.mean([p[k] for p in per])) for k in per[0]}
        seqs[name] = runs
        print(f"{name}: {len(runs)} seeds; std over seeds: " + ", ".join(
            f"{k} {np.std([p[k] for p in per]):.4f}" for k in ("mse/all", "fd/all", "pfd/all")))
    gap_report(rows)
    if long is not None:
        print(f"long: {len(long['joint']) / long.get('fps', data.FPS):.1f} s listener; frame-step at window "
              f"boundaries / mean: joint {seam_ratio(long['joint'], long['every']):.2f}, independent windows "
              f"{seam_ratio(long['independent'], long['every']):.2f}, GT {seam_ratio(long['gt'], long['every']):.2f}")
    rows["model"].update(timing or {})
    print(format_table(rows, LISTENER_TABLE))
    if rules is not None and any(e is not None for e in rules["events"]):
        for row, vals in listener_rules(seqs, rules).items():
            rows[row].update(vals)
        n = {c: rows["GT"][c.replace("rule/", "rule_n/")] for c in RULE_COLUMNS}
        print("\nRules answered (share of each rule's events in whole test segments; sarcasm: share wrongly "
              "answered; events: " + ", ".join(f"{c[5:]} {v:.0f}" for c, v in n.items()) + ")")
        print(format_table(rows, RULE_COLUMNS, digits=2))
        if picture is not None:
            x, order = stitch(test["listener"], rules["seg"])
            at = lambda e: e[0] if isinstance(e, (list, tuple)) else e
            inside = lambda j: sum(0 <= at(e) < len(x[j]) / rules["fps"]  # events within segment j's joined windows
                                   for ts in (rules["events"][order[j]] or {}).values() for e in ts)
            j = max(range(len(order)), key=lambda j: (inside(j), len(x[j])))
            best = best_baseline(rows)
            series = {"GT": x[j], "model": stitch(preds["model"][0], rules["seg"])[0][j],
                      best: stitch(seqs[best][0], rules["seg"])[0][j]}
            plot_key_channels(picture, series, rules["events"][order[j]], rules["fps"],
                              f"test segment {order[j]}: GT, model and the best baseline; the speaker's events dashed")
    return rows


def render_listener(folder, test, pred, long, name, **arrays):
    """npy files (pred, gt, speaker, the long conversation and any extra arrays), GIFs (speaker | name | GT) and
    channel plots of the first two windows and of the long conversation. test: evaluate_listener's, with beta."""
    folder.mkdir(parents=True, exist_ok=True)
    gt, spk, fps = test["listener"], test["speaker"], long["fps"]
    for k, v in dict(pred=pred, gt=gt, speaker=spk, long_listener=long["joint"], long_speaker=long["speaker"],
                     **arrays).items():
        np.save(folder / f"{k}.npy", v)
    for i in range(min(2, len(pred))):
        beta = np.asarray(test["beta"][i])
        data.render_gif(folder / f"window{i}.gif", [spk[i], pred[i], gt[i]], [beta] * 3,
                        ["speaker", name, "listener GT"], fps=fps)
        data.plot_channels(folder / f"window{i}.png", {name: pred[i], "GT": gt[i]}, channels=[0, 1, 2, 50, 53], fps=fps)
    both = {"joint windows": long["joint"], "independent windows": long["independent"]}
    data.plot_channels(folder / "long.png", both, channels=[0, 50, 53], fps=fps)


def token_windows(d, seg, crop):
    """What the evaluation needs of windows (seg, crop) of a data.load_windows dict: GT listener, speaker, audio,
    text, alt-GT, VQ tokens (codes) and the listener's beta."""
    b, T, fps = data.get_batch(d, seg, crop), d["T"], d["fps"]
    text = [window_text(d["words"][i], c / fps, (c + T) / fps)
            for i, c in zip(seg.tolist(), d["starts"][crop].tolist())]
    return dict(listener=b["lis"].numpy(), speaker=b["spk"].numpy(), audio=b["feat"].numpy(), beta=b["beta"],
                text=text, codes=b["tok"], alt=None if b["alt"] is None else b["alt"].numpy())


@torch.no_grad()
def sample_windows(model, vq, d, seg, crop, steps, r, seed, bs=128):
    """DiffListener (discrete_diffusion.py) samples the listener of the windows (seg, crop) of d (data.load_windows),
    bs at a time, one generator seeded with seed; VQ-decoded. -> tokens (n, L), raw motion (n, T, D) numpy."""
    was, dev = model.training, model.pos.weight.device
    model.eval()
    gen = torch.Generator(device=dev).manual_seed(seed)
    toks, xs = [], []
    for i in range(0, len(seg), bs):
        b = data.get_batch(d, seg[i:i + bs], crop[i:i + bs])
        kv = model.condition(*(b[k].to(dev) for k in ("spk", "feat", "wid", "wend", "beta")))
        L = b["tok"].shape[1]
        tok = model.sample(kv, L, [0], L, steps, r, gen, batch=len(b["spk"])).cpu()  # (n_b, L) one window each
        toks.append(tok)
        xs.append(vq.denormalize(vq.decode(tok, b["beta"])))
    model.train(was)
    return torch.cat(toks), torch.cat(xs).numpy()


@torch.no_grad()
def listen_long(model, vq, st, T_win, fps, steps=None, r=0.86, gen=None, hop=None, B=1):
    """DiffListener's B listeners of a speaker stream longer than its window (long_stream: speaker (1, Tall, D) raw,
    audio (1, 4 Tall, F), words, beta): windows of T_win frames every `hop` tokens (default half a window) denoised
    jointly (DiffListener.sample, MultiDiffusion), the whole token sequence decoded at once. -> (B, N r, D) numpy."""
    dev, N, L = model.pos.weight.device, st["speaker"].shape[1] // vq.r, T_win // vq.r
    starts = data.stream_starts(N, L, hop or max(1, L // 2))         # token starts of the windows
    c0 = [s * vq.r for s in starts]                                    # ... in frames
    spk, feat, beta = st["speaker"].expand(B, -1, -1), st["audio"].expand(B, -1, -1), st["beta"].expand(B, -1)
    wins = data.stream_windows(spk, feat, st["words"] * B, c0, T_win, fps, model.word_ids)  # (B*W, T_win, D), ...
    kv = model.condition(*(v.to(dev) for v in wins), beta.repeat_interleave(len(c0), 0).to(dev))
    tok = model.sample(kv, N, starts, L, steps, r, gen, batch=B).cpu()  # (B, N)
    return vq.denormalize(vq.decode(tok, beta)).numpy()


def evaluate_diff_listener(model, vq, te, tr, seg, crop, out, *, steps, r, n_samples, long_seconds, time_runs,
                           time_batch, device, seed=0):
    """DiffListener's protocol (discrete_diffusion.py sample): the model's listeners (sample_windows, seeds seed ..
    seed + n_samples - 1; `steps` reverse steps, None = all T; truncation r) of the windows (seg, crop) of te
    (data.load_windows) against GT, alt-GT and the baselines on a bank of every window of tr (and the rule table, on
    a twin); the long conversation (listen_long) and the sampler's timing (time_sampler); npy + GIF + PNG under
    out/samples, out/metrics.json. vq: the model's codec (K, r, decode, denormalize), also that of the baselines
    random_walk and vq_floor. -> evaluate_listener's rows."""
    runs = [sample_windows(model, vq, te, seg, crop, steps, r, seed + s) for s in range(n_samples)]
    gen = torch.Generator(device=device).manual_seed(seed)
    listen = lambda st, hop=None, S=steps, B=1: listen_long(model, vq, st, te["T"], te["fps"], S, r, gen, hop, B)[0]
    test, bank = token_windows(te, seg, crop), token_windows(tr, *data.all_windows(tr))
    long = long_conversation(te, long_seconds, vq.r, listen, every=te["T"])  # segments of their own lengths
    timing = time_sampler(te, vq.r, listen, steps or model.T, time_runs, time_batch, device)
    decode = lambda codes: vq.denormalize(vq.decode(torch.as_tensor(codes), test["beta"])).numpy()
    rules = dict(seg=seg.numpy(), events=te["events"], fps=te["fps"]) if te["events"] else None  # twins' ledger
    rows = evaluate_listener(test, bank, {"model": [x for _, x in runs]}, codec=dict(K=vq.K, decode=decode),
                             long=long, timing=timing, seed=seed, rules=rules,
                             picture=Path(out) / "samples" / "key_channels.png")
    render_listener(Path(out) / "samples", test, runs[0][1], long, "DiffListener", tokens=runs[0][0].numpy())
    write_metrics_json(rows, Path(out) / "metrics.json")
    return rows


def validate_diff_listener(pred, va, seg, crop, step, losses, log=print):
    """discrete_diffusion.py's validation during training: the sampled motion pred (n, T, D) of the windows (seg,
    crop) of va (data.load_windows) scored by listener_metrics; one line to log (tqdm.write under a progress bar) with
    the mean of the recent training losses, -> the history's entry."""
    b = data.get_batch(va, seg, crop)
    m = listener_metrics(list(pred), list(b["lis"].numpy()), list(b["spk"].numpy()),
                         valence_fn=data.FaceModel().valence)
    log(f"step {step}: loss {np.mean(losses):.4f} | val L2 {m['mse/all']:.4f} FD {m['fd/all']:.3f} "
        f"P-FD {m['pfd/all']:.3f}")
    return dict(step=step, **{k: m[k] for k in ("mse/all", "fd/all", "pfd/all")})


# ---------------------------------------------------------------------------------------------------------
# 6c. Evaluation protocol: listening heads, the multimodal LM listener (lm_listener.py; MMLM Tab. 1-4)
# ---------------------------------------------------------------------------------------------------------

# the Table 1 layout of MMLM (CVPR 2025): L2, FD, Variation, Diversity, P-FD, L2-Affect
TABLE1 = ["mse/all", "fd/all", "var_pred/all", "div_pred/all", "pfd/all", "affect_l2"]


def tiling(items, T, r=8):
    """Non-overlapping T-frame windows [(item index, start frame)] of data items, each item cut to a multiple of r."""
    return [(i, f0) for i, it in enumerate(items) for f0 in range(0, len(it["listener"]) // r * r - T + 1, T)]


def listener_windows(items, wins, T):
    """The data side of windows [(item index, start frame)]: listener and speaker motion [(T, 56)], the speaker's
    words around each window as text (for the speech-content baseline) and the first alternative listener (alt-GT),
    None when the data has none."""
    crop = lambda key: [np.asarray(items[i][key][f0:f0 + T], np.float32) for i, f0 in wins]
    alt = [np.asarray(items[i]["alt_listener"][0][f0:f0 + T], np.float32) for i, f0 in wins
           if items[i].get("alt_listener") is not None]
    return dict(listener=crop("listener"), speaker=crop("speaker"), alt=alt if len(alt) == len(wins) else None,
                text=[window_text(items[i]["words"], f0 / data.FPS, (f0 + T) / data.FPS) for i, f0 in wins])


def long_item(items, seconds):
    """One speaker stream of `seconds` from consecutive items of a split (repeated if short; the history words of
    all but the first dropped), as an item: audio, speaker_attr, words, listener."""
    sel = [items[j % len(items)] for j in range(math.ceil(seconds * data.FPS / len(items[0]["listener"])))]
    offs = np.cumsum([0] + [len(it["listener"]) / data.FPS for it in sel])
    cat = lambda k: None if sel[0][k] is None else np.concatenate([it[k] for it in sel])
    return dict(audio=cat("audio"), speaker_attr=cat("speaker_attr"), listener=cat("listener"), words=[
        (w, e + o) for j, (it, o) in enumerate(zip(sel, offs)) for w, e in it["words"] if e > 0 or j == 0])


def stream_latency(stream, offline, seconds, window, r=8):
    """Time a streaming decoder over a long_item of `seconds`: stream yields each token as soon as its speech has
    arrived; its latency is the time from the previous token (the arrival of the frames that complete this one) to
    this token. -> row entries (printed): latency median / p95 over the stream and median over its last 5 s (the
    60-s mark), and whether the streamed tokens equal `offline` (offline decoding); window: the sliding context."""
    got, ms, t = [], [], time.perf_counter()
    for tok in stream:
        got.append(tok)
        ms.append((time.perf_counter() - t) * 1e3)
        t = time.perf_counter()
    same, last = got == offline, ms[-int(5 * data.FPS / r):]
    print(f"streaming {len(ms) * r / data.FPS:.0f} s ({len(ms)} tokens, sliding context of <= {window} groups): "
          f"latency per token median {np.median(ms):.2f} ms, p95 {np.percentile(ms, 95):.2f} ms, over the last 5 s "
          f"{np.median(last):.2f} ms; {'equal' if same else 'NOT equal'} to offline decoding")
    return {"stream_ms_median": float(np.median(ms)), "stream_ms_p95": float(np.percentile(ms, 95)),
            f"stream_ms_at_{seconds}s": float(np.median(last)), "stream_equals_offline": float(same)}


def retrieval_baselines(test, bank, seed=0):
    """LM-Listener's baselines (arXiv 2308.10897, Tab. 1) from a bank of training windows (listener_windows of the
    train split): a random training listener, the listener of the nearest speaker motion, and of the nearest
    speech content (TF-IDF in place of Sentence-BERT). -> {row name: predictions}."""
    bank_l, bank_s = np.stack(bank["listener"]), np.stack(bank["speaker"])
    n, T = len(test["listener"]), bank_l.shape[1]
    return {"baseline:random": list(baseline_random(bank_l, n, T, seed=seed)),
            "baseline:nn_motion": list(baseline_nn_motion(np.stack(test["speaker"]), bank_s, bank_l)),
            "baseline:nn_speech": list(baseline_nn_text(test["text"], bank["text"], bank_l, seed=seed))}


def random_walk_codes(codes, n, G, K, decode, seed=0):
    """A first-order Markov walk over a codec's training token windows codes (M, G), decoded to motion: the
    codebook prior with no speaker input. decode(tokens (n, G)) -> [(T, 56)]."""
    return decode(baseline_random_walk_codes(np.asarray(codes), n, G, K, seed=seed))


def render_lm_listener(folder, test, preds, betas, tokens):
    """folder/: pred.npy (the first 16 predictions), tokens.npy and sample.gif (GT and prediction of the first two
    windows, each with its listener's beta)."""
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "pred.npy", np.stack(preds[:16]))
    np.save(folder / "tokens.npy", tokens)
    k, gts = min(2, len(preds)), test["listener"]
    data.render_gif(folder / "sample.gif", [x for i in range(k) for x in (gts[i], preds[i])],
                    [b for i in range(k) for b in (betas[i], betas[i])], ["GT", "model"] * k)


KEY_CHANNELS = {"head pitch (nods)": data.PITCH, "smile": data.SMILE, "brow raise": data.BROW_RAISE}
EVENT_COLOURS = {"pause": "black", "amused": "magenta", "laugh": "magenta", "loud": "cyan", "sarcasm": "red",
                 "valence": "olive"}


def _panels(path, columns, events=None, fps=data.FPS):
    """PNG: one row per key channel, one column per {title: {line name: (T, 56)}}, ledger events as dashed lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(len(KEY_CHANNELS), len(columns), figsize=(max(9, 5 * len(columns)), 5.5), squeeze=False,
                           sharex=True)
    for j, (title, lines) in enumerate(columns.items()):
        ax[0, j].set_title(title, fontsize=9)
        for i, (name, ch) in enumerate(KEY_CHANNELS.items()):
            for k, m in lines.items():
                ax[i, j].plot(np.arange(len(m)) / fps, np.asarray(m)[:, ch], lw=1, label=k)
            for rule, ts in (events or {}).items():
                for t in ts:
                    t = t[0] if isinstance(t, (list, tuple)) else t
                    if 0 <= t <= len(m) / fps:
                        ax[i, j].axvline(t, ls="--", lw=0.8, c=EVENT_COLOURS.get(rule, "k"))
            ax[i, 0].set_ylabel(name, fontsize=8)
        ax[0, j].legend(fontsize=7, loc="upper right")
    ax[-1, 0].set_xlabel("seconds", fontsize=8)
    if events:
        fig.suptitle("dashed: the speaker's ledger events (" + ", ".join(f"{r} {c}" for r, c in EVENT_COLOURS.items())
                     + ")", fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def render_swap(path, columns):
    """Fig. 5 of MMLM as a picture: {codec: {listener: (T, 56)}}, one token sequence decoded as several listeners."""
    _panels(path, columns)


def evaluate_lm_listener(test, bank, preds, *, walks=None, extra=None, seed=0, valence_fn=None, swapped=None,
                         picture=None):
    """Every row of a listening-head table, printed (all metrics, then the Table 1 layout) and returned.

    test: listener_windows of the evaluated windows (GT listener, speaker, text, alt), optionally with subsets
    {name: [window index]} -> "mse/<name>", "fd/<name>", "pfd/<name>" per row (seen / unseen listeners); swap
    [(S, T, 56)] the identity-swapped GT per window, with swapped {row: [(S, T, 56)]} the row's tokens decoded with
    those identities' beta -> "swap_mse", "swap_fd" (Fig. 5 of MMLM as a number); events (per item, data.load_ledger)
    and item_of (per window; an item's windows are consecutive from its frame 0) -> "rule:<rule>", the share of
    ledger events answered (rule_responses) on each item's windows joined in time. bank: listener_windows of
    training windows (retrieval baselines); preds: {row name: [(T, 56)]}, the method's rows (e.g. "model",
    "model:nucleus_0.9", "baseline:vq_floor"); walks: {codec name: (codes (M, G), K, decode)} -> rows
    baseline:random_walk_<name>; extra: {row name: {metric: value}} merged into those rows (e.g. streaming
    latency); picture: a PNG path -> the key channels of the first item for GT, model and the best baseline by FD.
    Rows: GT, alt-GT (when the data has alternatives), baseline:random, baseline:nn_motion, baseline:nn_speech,
    baseline:random_walk_<name>..., then preds in order. Metrics: listener_metrics per row."""
    gts, spk = test["listener"], test["speaker"]
    vfn = valence_fn or data.FaceModel().valence
    score = lambda p, ix=None: listener_metrics([p[i] for i in ix], [gts[i] for i in ix], [spk[i] for i in ix],
                                                valence_fn=vfn, seed=seed) if ix else listener_metrics(
        p, gts, spk, valence_fn=vfn, seed=seed)
    allp = {"GT": gts, **({"alt-GT": test["alt"]} if test["alt"] is not None else {})}
    allp.update(retrieval_baselines(test, bank, seed))
    for name, (codes, K, decode) in (walks or {}).items():
        allp[f"baseline:random_walk_{name}"] = random_walk_codes(codes, len(gts), np.shape(codes)[1], K, decode, seed)
    allp.update(preds)
    rows = {name: score(p) for name, p in allp.items()}
    for name, ix in (test.get("subsets") or {}).items():
        for row, p in allp.items():
            rows[row].update({f"{k[:-4]}/{name}": v for k, v in score(p, ix).items() if k in ("mse/all", "fd/all",
                                                                                            "pfd/all")})
    for name, sw in (swapped or {}).items():  # every (window, other identity) pair is one scored window
        flat = lambda xs: [y for x in xs for y in x]
        m = listener_metrics(flat(sw), flat(test["swap"]), [s for s, x in zip(spk, sw) for _ in x], seed=seed)
        rows[name].update({"swap_mse": m["mse/all"], "swap_fd": m["fd/all"]})
    if test.get("events") is not None:
        items = list(dict.fromkeys(test["item_of"]))
        for row, p in allp.items():
            joined = [np.concatenate([p[w] for w, c in enumerate(test["item_of"]) if c == i]) for i in items]
            got = rule_responses(joined, [test["events"][i] for i in items], data.FPS)
            rows[row].update({f"rule:{k}": v for k, v in got.items() if not k.startswith("n_")})
            rows[row].update({f"rule_n:{k[2:]}": v for k, v in got.items() if k.startswith("n_")} if row == "GT"
                             else {})
    for name, more in (extra or {}).items():
        rows[name].update(more)
    if picture is not None:
        best = min((k for k in rows if k.startswith("baseline:") and k != "baseline:vq_floor"),
                   key=lambda k: rows[k]["fd/all"])
        first = [w for w, c in enumerate(test.get("item_of") or [0]) if c == (test.get("item_of") or [0])[0]]
        lines = {k: np.concatenate([allp[k][w] for w in first]) for k in ("GT", "model", best) if k in allp}
        ev = test["events"][test["item_of"][0]] if test.get("events") is not None else None
        _panels(picture, {"one test item (its first windows joined)": lines}, ev)
    print(format_table(rows))
    print("\nTable 1 layout (L2 = mse/all, FD, Variation, Diversity, P-FD, L2-Affect; raw units, per window):")
    print(format_table(rows, TABLE1 + [k for k in ("swap_mse", "swap_fd", "fd/seen", "fd/unseen") if k in rows["GT"]
                                       or k in rows.get("model", {})]))
    return rows


def evaluate_lm_listener_split(out, path, split, tr_items, te_items, wins, T, preds, tokens, vq, walk_codecs, *,
                               extra=None, seed=0, r=8):
    """lm_listener.py's sample() protocol: every row of the listener table on the windows wins [(test item, start
    frame)] of T frames of a split, rendered under out/samples, written to out/metrics.json and returned.

    preds {row: [(T, 56)]}: the model's rows; tokens {"model": (n, T // r), "baseline:vq_floor": (n, T // r)}: the
    model's LR tokens and the windows' true ones, decoded by vq (this run's VQ-VAE; the true tokens decoded are the
    codec's floor row); walk_codecs {name: VQ-VAE} -> baseline:random_walk_<name>, a walk over that codec's training
    token windows. Adds the seen / unseen subsets (Tab. 2) when some test listeners are not in train, the identity
    swap (Fig. 5, data.load_swaps: swap_mse / swap_fd and samples/swap.png) when the data has one, the rule ledger
    (data.load_ledger); extra: as evaluate_lm_listener's."""
    G, betas, walks, out = T // r, [te_items[c]["listener_beta"] for c, _ in wins], {}, Path(out)
    decode = data.decode_motion                      # (vq, tokens (n, G), betas) -> [(T, 56)]
    for name, codec in walk_codecs.items():   # the random-walk baselines: (M', G) training token windows of each codec
        codes = torch.cat([c[: len(c) // G * G] for c in data.vq_tokens(codec, tr_items, r)]).reshape(-1, G)
        walks[name] = (codes.numpy(), codec.K, lambda z, codec=codec: decode(codec, torch.as_tensor(z), betas))
    test = listener_windows(te_items, wins, T)
    preds = {**preds, "baseline:vq_floor": decode(vq, tokens["baseline:vq_floor"], betas)}
    seen, lid = {it["listener_id"] for it in tr_items}, [te_items[c]["listener_id"] for c, _ in wins]
    if any(i not in seen for i in lid):  # Tab. 2 split into listeners seen in training and unseen ones
        test["subsets"] = {k: [j for j, i in enumerate(lid) if (i in seen) == (k == "seen")]
                           for k in ("seen", "unseen")}
    swaps, swapped = data.load_swaps(path, split), {}
    if swaps:  # Fig. 5 as a number: the same tokens decoded with other listeners' beta, against their answers
        sw = [swaps[te_items[c]["name"]] for c, _ in wins]
        test["swap"] = [m[:, f0:f0 + T] for (_, _, m), (_, f0) in zip(sw, wins)]
        n, b = torch.tensor([len(s[0]) for s in sw]), [x for s in sw for x in s[1]]
        for name, z in tokens.items():
            flat = decode(vq, torch.repeat_interleave(z, n, 0), b)
            swapped[name] = [np.stack(flat[k - m:k]) for k, m in zip(n.cumsum(0).tolist(), n.tolist())]
        ids = {f"beta {i}": x for i, x in zip(sw[0][0][:3], sw[0][1])}          # Fig. 5: one sequence, 3 listeners
        pics = {f"{name} VQ ({codec.cfg.norm})": {k: decode(codec, z[:1], [x])[0] for k, x in ids.items()}
                for name, codec, z in [("this run's", vq, tokens["model"])] + [
                    ("naive", c, data.vq_tokens(c, [te_items[wins[0][0]]], r)[0][None, wins[0][1] // r:][:, :G])
                    for k, c in walk_codecs.items() if k == "naive" and vq.cfg.norm != "none,none"]}
        render_swap(out / "samples" / "swap.png", pics)
    test["events"] = data.load_ledger(path, te_items)          # the rule ledger of the synthetic twins, else None
    test["item_of"] = [c for c, _ in wins]
    bank = listener_windows(tr_items, tiling(tr_items, T, r), T)
    rows = evaluate_lm_listener(test, bank, preds, walks=walks, extra=extra, seed=seed, swapped=swapped,
                                picture=out / "samples" / "channels.png")
    render_lm_listener(out / "samples", test, preds["model"], betas, tokens["model"].numpy())
    write_metrics_json(rows, out / "metrics.json")
    return rows


def validate_lm_listener(preds, items, wins, T, ce, acc, step, log=print):
    """lm_listener.py's validation during training: teacher-forced CE and LR accuracy, and the greedy predictions
    [(T, 56)] of the windows wins [(item index, start frame)] scored by listener_metrics; one line to log (tqdm.write
    under a progress bar), -> the history's entry."""
    test = listener_windows(items, wins, T)
    m = listener_metrics(preds, test["listener"], test["speaker"], valence_fn=data.FaceModel().valence)
    log(f"step {step}: val CE {ce:.3f} | LR acc {acc:.3f} | greedy L2 {m['mse/all']:.4f} FD {m['fd/all']:.3f} "
        f"P-FD {m['pfd/all']:.3f} ({len(wins)} val windows)")
    return dict(val_ce=float(ce), val_acc=float(acc), **{k: m[k] for k in ("mse/all", "fd/all", "pfd/all")})


# ---------------------------------------------------------------------------------------------------------
# 6d. Evaluation protocol: REACT, Latent Behavior Diffusion (latent_diffusion.py)
# ---------------------------------------------------------------------------------------------------------

REACT_COLS = ["frcorr_sum", "frcorr_mean", "frcorr_official", "frdist_sum", "frdist_mean", "frdiv", "frvar", "frdvs",
              "frsyn", "K"]
MOTION_COLS = ["mse/all", "mse/exp", "mse/pose", "fd/all", "fd/exp", "fd/pose", "pfd/all", "var_pred/all",
               "div_pred/all"]


def frames(items, key, T):
    """Items' (T_i, D) arrays cropped (or padded with their last frame) to T frames -> (N, T, D) float32."""
    out = []
    for it in items:
        a = np.asarray(it[key], np.float32)[:T]
        out.append(np.concatenate([a, np.repeat(a[-1:], T - len(a), 0)]) if len(a) < T else a)
    return np.stack(out)


def evenly_spaced(items, n):
    """At most n items, evenly spaced over the list (n = 0: all), so that a short evaluation still spans the split."""
    if not n or len(items) <= n:
        return items
    return [items[i] for i in np.linspace(0, len(items) - 1, n).round().astype(int)]


def _others(it, T, key="alt_listener_attr"):
    """An item's appropriate reactions other than its own GT: the synthetic world's re-simulated alternatives, or
    on REACT data the real reactions of its neighbour clips (alt_listener_attr without the row's own clip)."""
    alts = it.get(key)
    alts = [] if alts is None else [a[:T] for a in np.asarray(alts)]
    return [a for j, a in enumerate(alts) if j != it.get("alt_self", -1)]


def appropriate_label(items):
    """What the appropriate set of each speaker is, for the printout and the table caption."""
    n = [len(_others(it, 1)) for it in items]
    if "alt_self" in items[0]:
        return f"own GT + the real reactions of {min(n)}-{max(n)} neighbour clips (appropriateness matrix)"
    if max(n) == 0:
        return "own GT only (the data has no appropriateness matrix or alternatives: FRCorr/FRDist are plain CCC/DTW)"
    return f"own GT + {min(n)}-{max(n)} re-simulated alternatives"


def appropriate_pool(items, T):
    """The appropriate sets as one pool: each segment's GT reaction, then its other appropriate reactions (_others;
    REACT: the neighbour clips' real reactions, as the official FRCorr / FRDist read them; the own GT counts, as
    the matrix's unit diagonal says). Returns pool (M, T, D) float64, A (N, M) bool (A[i, j]: pool entry j is
    appropriate for speaker i) and first (N,): the pool index of each speaker's own GT."""
    pool, owner = [], []
    for k, it in enumerate(items):
        block = [np.asarray(it["listener_attr"])[:T]] + _others(it, T)
        pool += block
        owner += [k] * len(block)
    A = np.asarray(owner)[None, :] == np.arange(len(items))[:, None]           # (N, M)
    return np.stack(pool).astype(np.float64), A, A.argmax(1)


def alt_gt_react(items, T, spk, fps):
    """The alt-GT row: sample i of a speaker = its appropriate reaction i other than its GT (_others; the first K
    that every speaker has). FRCorr and FRDist score alternative i against the appropriate set *without* it
    (leave-one-out: otherwise it would find itself); the set-level metrics (FRDiv, FRVar, FRDvs, FRSyn) use all K
    alternatives at once."""
    K = min(len(_others(it, T)) for it in items)
    alts = np.stack([np.stack(_others(it, T)[:K]) for it in items]).astype(np.float64)  # (N, K, T, D)
    pool, A, first = appropriate_pool(items, T)
    row = react_metrics(alts, pool, spk, A, fps=fps)
    corr, dist, official = [], [], []
    for i in range(K):
        Ai = A.copy()
        Ai[np.arange(len(items)), first + 1 + i] = False                        # leave alternative i out
        corr.append(fr_corr(alts[:, i:i + 1], pool, Ai)["mean"])
        official.append(fr_corr(alts[:, i:i + 1], pool, Ai, react_compat=True)["mean"])
        dist.append(fr_dist(alts[:, i:i + 1], pool, Ai)["mean"])
    row.update(frcorr_mean=float(np.mean(corr)), frcorr_sum=float(np.mean(corr) * K),
               frcorr_official=float(np.mean(official) * K), frdist_mean=float(np.mean(dist)),
               frdist_sum=float(np.mean(dist) * K))
    return row


def react_baselines(items, train_items, T, K, score, seed=0):
    """The four REACT baselines, each repeated to K samples and scored with `score` ((N, K, T, D) -> row):
    a random train reaction, mime (the speaker's own attributes), the mean frame of all train attributes, and the
    train reaction whose speaker motion is nearest (cosine of time-means) to the test speaker's."""
    N = len(items)
    Tb = min(T, min(len(it["listener_attr"]) for it in train_items))
    bank_l, bank_s = frames(train_items, "listener_attr", Tb), frames(train_items, "speaker_attr", Tb)
    rows = {"baseline:random": score(baseline_random(bank_l, N * K, T, seed=seed).reshape(N, K, T, -1))}
    spk = frames(items, "speaker_attr", T).astype(np.float64)
    rows["baseline:mime"] = score(np.repeat(spk[:, None], K, 1))
    mean_fr = baseline_mean_frame(np.concatenate([bank_l, bank_s]), T)
    rows["baseline:mean_frame"] = score(np.repeat(np.asarray(mean_fr)[None, None], N, 0).repeat(K, 1))
    nn_m = baseline_nn_motion(frames(items, "speaker", T), frames(train_items, "speaker", Tb), bank_l)
    rows["baseline:nn_motion"] = score(np.repeat(np.asarray(nn_m)[:, None], K, 1))
    return rows


@torch.no_grad()
def react_samples(react, items, T, K, seed, batch=16):
    """K reactions to the speaker of each item (its first T frames), 16 speakers at a time, all noise from one
    generator: react(speaker (B, T, D) float32 tensor, K, generator) -> (latents (B, K, ...), attributes (B, K, T, D)).
    Returns the latents (N, K, ...) and the attributes (N, K, T, D) as float64 numpy."""
    g, spk = torch.Generator().manual_seed(seed), torch.from_numpy(frames(items, "speaker_attr", T))
    zs, ys = zip(*[react(b, K, g) for b in spk.split(batch)])
    return torch.cat(zs), torch.cat(ys).cpu().double().numpy()


@torch.no_grad()
def react_motion(motion, z, T, batch=8):
    """A 3DMM branch motion(latents (B, N_w, v)) -> (B, N_w*w, F) over latents (N, K, N_w, v), 8 speakers at a time
    -> (N, K, T, F) float32 numpy."""
    N, K = z.shape[:2]
    mot = torch.cat([motion(zb.flatten(0, 1)) for zb in z.split(batch)])       # (N*K, N_w*w, F)
    return mot.view(N, K, -1, mot.shape[-1])[:, :, :T].cpu().numpy()


def quick_react(items, model, K, seed=0, log=print, prefix=""):
    """The cheap check during training, logged: FRCorr (mean over samples) and FRDiv of K samples of model.react
    (react_samples, in eval mode, then back to train mode) per item, of the items' shortest T, no FRDist."""
    model.eval()
    preds = react_samples(model.react, items, min(len(it["speaker_attr"]) for it in items), K, seed)[1]
    model.train()
    pool, A, _ = appropriate_pool(items, preds.shape[2])
    row = {"frcorr_mean": fr_corr(preds, pool, A)["mean"], "frdiv": fr_div(preds)}
    log(f"{prefix}val FRCorr(mean) {row['frcorr_mean']:.3f} FRDiv {row['frdiv']:.4f}")
    return row


def best_time(fn, repeats=3):
    """Seconds of one call of fn(r): the best of `repeats` calls after one warm-up (on a shared machine the
    minimum is the least disturbed)."""
    fn(0)
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        fn(r)
        times.append(time.perf_counter() - t0)
    return min(times)


def evaluate_react(items, train_items, preds, motion=None, *, sec_per_speaker=None, seed=0, model_only=False):
    """The REACT table of a method that samples K reactions per speaker.

    items: the scored segments (speaker_attr, listener_attr and, where the data has them, alt_listener_attr,
    speaker / listener motion, alt_listener); train_items: the baselines' bank; preds (N, K, T, 25) the model's
    attributes; motion (N, K, T, F) its 3DMM branch (sample 0 is scored with the listener-motion metrics).
    model_only: only the model row (FRDist included), as for the cells of an ablation grid. FRCorr uses the CCC
    where equal constant channels score 1; frcorr_official (sum over K) the official CCC, where a constant channel
    scores 0 (a binary AU that never fires, predicted never firing, scores 0 there). Returns ({row: {metric: value}}, the two Markdown tables as text)."""
    N, K, T, _ = preds.shape
    fps = int(items[0]["fps"])
    spk = frames(items, "speaker_attr", T).astype(np.float64)                  # (N, T, D)
    pool, A, _ = appropriate_pool(items, T)
    score = lambda p: {**react_metrics(p, pool, spk, A, fps=fps),                # FRCorr with the sensible CCC,
                       "frcorr_official": fr_corr(p, pool, A, react_compat=True)["sum"]}  # and the official one
    has_alt = min(len(_others(it, T)) for it in items) > 0
    rows = {}
    if not model_only:
        rows["GT"] = score(np.repeat(frames(items, "listener_attr", T).astype(np.float64)[:, None], K, 1))
        if has_alt:
            rows["alt-GT"] = alt_gt_react(items, T, spk, fps)
        rows.update(react_baselines(items, train_items, T, K, score, seed))
    rows["model"] = {**score(preds), **({} if sec_per_speaker is None else {"sec_per_speaker": sec_per_speaker})}
    if motion is not None:
        gt_m, spk_m = list(frames(items, "listener", T)), list(frames(items, "speaker", T))
        rows["model"].update(listener_metrics(list(motion[:, 0]), gt_m, spk_m))
        if not model_only:
            rows["GT"].update(listener_metrics(gt_m, gt_m, spk_m))
            if has_alt and items[0].get("alt_listener") is not None:
                alt_m = [_others(it, T, "alt_listener")[0] for it in items]
                rows["alt-GT"].update(listener_metrics(alt_m, gt_m, spk_m))
    text = format_table(rows, REACT_COLS)
    if motion is not None:
        text += (f"\n\n3DMM branch (sample 0, raw {motion.shape[-1]}-d motion units, per {T}-frame window):\n"
                 + format_table({k: r for k, r in rows.items() if "mse/all" in r}, MOTION_COLS))
    return rows, text


def sample_react(out, path, split, n_speakers, react, motion, K, *, sampler, where="", seed=0, model_only=False):
    """The REACT run of a sampler around evaluate_react on n_speakers of the split of the listener data at path
    (evenly_spaced; the train split is the baselines' bank): time it (10 reactions of 8 s for one speaker, LBD's speed
    target), sample K reactions per scored speaker, score them, write metrics.json, <split>_reactions.npy,
    <split>_3dmm.npy and the pictures (render_react), print the tables. react: the sampler of react_samples;
    motion: the 3DMM branch of react_motion; sampler names it in the printout. Returns the rows."""
    items = evenly_spaced(data.load_listener_split(path, split), n_speakers)
    train_items = None if model_only else data.load_listener_split(path, "train")
    T, fps = min(len(it["speaker_attr"]) for it in items), int(items[0]["fps"])
    print(f"{where}{path}: {len(items)} {split} speakers, T={T}, fps={fps}, K={K}")
    T8 = min(T, 8 * fps)                                                        # the speed target: 10 reactions of 8 s
    sec = best_time(lambda r: react_samples(react, items[:1], T8, 10, r))
    print(f"sampling 10 reactions of {T8 / fps:.1f} s for one speaker ({sampler}, {torch.get_num_threads()} "
          f"threads): {sec:.3f} s")
    z, preds = react_samples(react, items, T, K, seed)                          # latents, (N, K, T, D)
    mot = react_motion(motion, z, T)                                            # (N, K, T, F)
    rows, table = evaluate_react(items, train_items, preds, mot, sec_per_speaker=sec, seed=seed, model_only=model_only)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / f"{split}_reactions.npy", preds.astype(np.float32))
    np.save(out / f"{split}_3dmm.npy", mot.astype(np.float32))
    write_metrics_json(rows, out / "metrics.json")
    print(f"REACT metrics, {split} split, {len(items)} speakers, K={K}, T={T} at {fps} fps; appropriate set = "
          f"{appropriate_label(items)}; model {sampler}; FRCorr/FRDist sum over K (mean); AUs binarised at 0.5; "
          f"FRCorr: CCC of equal constants = 1, frcorr_official: = 0\n" + table)
    render_react(out, items, preds, mot, fps)
    print(f"wrote {out}/metrics.json, {split}_reactions.npy, {split}_3dmm.npy, reactions.png, reactions.gif")
    return rows


def render_react(out, items, preds, motion, fps):
    """reactions.png: for the first speaker, its arousal, then the listener's valence and smile (AU12) over time:
    GT, the appropriate set (the band from its min to its max; AU12: the fraction of the set firing) and the K
    samples (AU12: the fraction of samples firing). reactions.gif: the speaker and three samples of the 3DMM branch
    on the tiny face (56-d motion only)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out, (_, K, T, _), it = Path(out), preds.shape, items[0]
    pool, A, _ = appropriate_pool(items[:1], T)                                # (M, T, D): speaker 0's set
    spk, gt, sec = frames(items[:1], "speaker_attr", T)[0], pool[0], np.arange(T) / fps
    fig, axes = plt.subplots(3, 1, figsize=(10, 6.5), sharex=True)
    axes[0].plot(sec, spk[:, 16], color="tab:red", lw=1.2)
    axes[0].set_ylabel("speaker\narousal")
    for ax, ch, name in [(axes[1], 15, "listener\nvalence"), (axes[2], 7, "listener smile\n(AU12)")]:
        if ch == 7:                                                             # binary AU: fraction firing
            ax.plot(sec, preds[0, :, :, ch].mean(0), color="tab:blue", lw=1.2, label=f"{K} samples: fraction firing")
            ax.plot(sec, pool[:, :, ch].mean(0), color="grey", lw=1.2, ls="--", label="appropriate set: fraction")
        else:
            ax.fill_between(sec, pool[:, :, ch].min(0), pool[:, :, ch].max(0), color="grey", alpha=0.3,
                            label=f"appropriate set ({len(pool)}): min-max")
            for k in range(K):
                ax.plot(sec, preds[0, k, :, ch], color="tab:blue", lw=0.6, alpha=0.6,
                        label=f"{K} samples" if k == 0 else None)
        ax.plot(sec, gt[:, ch], color="black", lw=1.4, label="GT")
        ax.set_ylabel(name)
        ax.legend(fontsize=7, loc="upper right", ncol=3)
    axes[-1].set_xlabel("seconds")
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "reactions.png", dpi=90)
    plt.close(fig)
    if motion.shape[-1] == data.MOTION_DIM:
        k3 = min(3, K)
        data.render_gif(out / "reactions.gif", [frames(items[:1], "speaker", T)[0]] + [motion[0, k] for k in range(k3)],
                        [it["speaker_beta"]] + [it["listener_beta"]] * k3,
                        ["speaker"] + [f"reaction {k}" for k in range(k3)], fps=fps)


# ---------------------------------------------------------------------------------------------------------
# 6e. Evaluation protocol: talking faces, DiffSpeaker (diff_transformer.py)
# ---------------------------------------------------------------------------------------------------------

TALKING_SEEDS = [1234] + [10 * i for i in range(9)]  # DiffSpeaker's repetitions: seeds 1234, 0, 10, ..., 80


def tiled_speech(items, seconds):
    """The clips' audio concatenated and tiled to `seconds`: (wave (S,), the number of frames at data.FPS)."""
    audio = np.concatenate([it["audio"] for it in items])
    n = int(seconds * data.SR)
    return np.tile(audio, 1 + n // len(audio))[:n], int(seconds * data.FPS)


def median_ms(fn, warmup=2, reps=5):
    """Median wall-clock milliseconds of fn() over `reps` calls after `warmup` untimed ones (GPU work included)."""
    ts = []
    for _ in range(warmup + reps):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        ts.append(1000 * (time.perf_counter() - t0))
    return statistics.median(ts[warmup:])


def talking_val(preds, items, sigma, lip_idx, upper_idx):
    """Training-time val scores of predictions [(T_i, V, 3)] of talking items: MSE in the normalised units (divided
    by sigma^2), LVE and FDD -> {"val_mse", "lve", "fdd"}."""
    gts = [it["vertices"] for it in items]
    mse = float(np.mean([np.mean((p - g) ** 2) for p, g in zip(preds, gts)]) / sigma ** 2)
    return {"val_mse": mse, "lve": float(lip_vertex_error(preds, gts, lip_idx)),
            "fdd": float(fdd(preds, gts, [it["template"] for it in items], upper_idx))}


def style_averaged(predict, gts, templates, n_style, lip_idx, upper_idx, reps=1):
    """face_metrics of predict(style, seed) -> [(T, V, 3)], averaged over every training style and repetition;
    with reps > 1 also <m>_ci95 = 1.96 std / sqrt(reps) of the per-repetition lve and lve_seq (styles averaged
    inside each repetition), DiffSpeaker's mean +- 95 % interval."""
    rows = [face_metrics(predict(s, seed), gts, templates, lip_idx, upper_idx)
            for seed in TALKING_SEEDS[:reps] for s in range(n_style)]
    res = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    for k in ("lve", "lve_seq") if reps > 1 else ():
        per = np.array([r[k] for r in rows]).reshape(reps, n_style).mean(1)  # (reps,)
        res[f"{k}_ci95"] = float(1.96 * per.std(ddof=1) / np.sqrt(reps))
    return res


def reference_rows(references, gts, templates, n_style, lip_idx, upper_idx):
    """Rows from the synthetic world's hidden rules (data.talking_references, one dict per clip): alt-GT (another
    draw of the unpredictable parts), oracle:speech_only (the speech-driven face with the subject's true style), and
    the same face under every training style, scored one style at a time and averaged (a perfect style-conditioned
    model under this protocol) or averaged over the styles first (by Jensen never worse on LVE and MVE: the
    protocol rewards hedging between styles, and this row, not the one before, bounds a style-blind predictor)."""
    face = lambda preds: face_metrics(preds, gts, templates, lip_idx, upper_idx)
    per = [face([r["train_styles"][s] for r in references]) for s in range(n_style)]
    return {"alt-GT": face([r["alt"] for r in references]),
            "oracle:speech_only": face([r["speech_only"] for r in references]),
            "oracle:speech_only_train_styles": {k: float(np.mean([p[k] for p in per])) for k in per[0]},
            "oracle:speech_only_style_mean": face([r["train_styles"].mean(0) for r in references])}


def evaluate_talking(items, predict, n_style, lip_idx, upper_idx, *, references=None, baseline=None, timers=None,
                     reps=1, out=None, curves=None):
    """The talking-face table: unseen test subjects, each animated under every training style, metrics averaged
    (LVE, FDD, MVE as in face_metrics). items: test clips {"vertices" (T, V, 3), "template" (V, 3)};
    predict(style, seed) -> [(T, V, 3)] one prediction per clip; baseline: the same callable for the autoregressive
    baseline, or None; references: per clip data.talking_references(...) (None on real data); timers:
    {row: (fn, warmup, reps)} -> column ms_per_10s (fn animates 10 s of speech). Prints the table -> rows.
    out: a folder for metrics.json and render_samples of items[0], curves {label: fn() -> (T, V, 3)}."""
    gts, templates = [it["vertices"] for it in items], [it["template"] for it in items]
    rows = {"GT": face_metrics(gts, gts, templates, lip_idx, upper_idx)}
    if references and all(r is not None for r in references):
        rows.update(reference_rows(references, gts, templates, n_style, lip_idx, upper_idx))
    static = [np.repeat(tm[None], len(g), 0) for g, tm in zip(gts, templates)]  # the template, never moving
    rows["baseline:static_template"] = face_metrics(static, gts, templates, lip_idx, upper_idx)
    for row, fn, r in (("baseline:autoregressive", baseline, 1), ("model", predict, reps)):  # AR: deterministic
        if fn is not None:
            t0 = time.time()
            rows[row] = style_averaged(fn, gts, templates, n_style, lip_idx, upper_idx, r)
            print(f"{row}: {len(items)} clips x {n_style} styles x {r} reps in {time.time() - t0:.1f} s")
    for row, (fn, warmup, n) in (timers or {}).items():
        rows.setdefault(row, {})["ms_per_10s"] = median_ms(fn, warmup, n)
    print(format_table(rows))
    ms = {row: rows[row]["ms_per_10s"] for row in timers or {}}
    if len(ms) == 2:
        print(f"10 s of speech, batch 1, {torch.get_num_threads()} CPU threads: " +
              ", ".join(f"{row} {v:.0f} ms" for row, v in ms.items()) +
              f"; ratio {ms['baseline:autoregressive'] / ms['model']:.1f}x")
    if out is not None:
        write_metrics_json(rows, Path(out) / "metrics.json")
        render_samples(Path(out), items[0], {label: fn() for label, fn in curves.items()}, lip_idx)
        print(f"wrote {Path(out) / 'metrics.json'} and samples in {out}")
    return rows


def save_animation(stem, vertices, label):
    """sample --audio: one animated sequence (T, V, 3) at data.FPS -> <stem>.npy and <stem>.gif."""
    np.save(f"{stem}.npy", vertices)
    data.render_vertices_gif(f"{stem}.gif", [vertices], [label], fps=data.FPS)
    print(f"wrote {stem}.npy {vertices.shape} ({len(vertices) / data.FPS:.2f} s at {data.FPS} fps) and {stem}.gif")


def mouth_pair(gt, lip_idx):
    """The two lip vertices whose distance moves most over a GT sequence (T, V, 3): the mouth opening of any mesh,
    no landmark list needed -> (i, j) vertex indices."""
    lip = _region(lip_idx, "lip_idx")
    d = np.linalg.norm(gt[:, lip, None] - gt[:, None, lip], axis=-1).std(0)  # (L, L) std over time
    a, b = np.unravel_index(d.argmax(), d.shape)
    return int(lip[a]), int(lip[b])


def speech_envelope(wave, T, fps=data.FPS):
    """RMS of the waveform per motion frame: (S,) -> (T,)."""
    n = int(round(data.SR / fps))
    w = np.pad(np.asarray(wave, np.float64), (0, max(0, T * n - len(wave))))[:T * n]
    return np.sqrt((w.reshape(T, n) ** 2).mean(1))


def render_samples(out, item, curves, lip_idx, size=360):
    """One unseen-subject sentence: <name>.gif (the first curve beside GT, size px per face), <name>.npy of it, and
    lip_distance.png: the mouth opening (mouth_pair's lip distance) over time of GT, every curve and the static
    template, under the speech envelope. item: {"name", "vertices" (T, V, 3), "template" (V, 3), "audio"};
    curves: {label: (T, V, 3)}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    name, gt = re.sub(r"[^\w.-]", "_", item["name"]), np.asarray(item["vertices"])
    label, first = next(iter(curves.items()))
    np.save(out / f"{name}.npy", first)
    data.render_vertices_gif(out / f"{name}.gif", [first, gt], [label, "GT"], size=size)
    i, j = mouth_pair(gt, lip_idx)
    T, dist = len(gt), lambda v: np.linalg.norm(v[:, i] - v[:, j], axis=-1)
    t = np.arange(T) / data.FPS
    fig, ax = plt.subplots(figsize=(10, 3.4))
    env = speech_envelope(item["audio"], T)
    ax2 = ax.twinx()
    ax2.fill_between(t, 0, env, color="0.85", lw=0)
    ax2.set_ylim(0, 3 * env.max() + 1e-12), ax2.set_yticks([]), ax.set_zorder(1), ax.patch.set_visible(False)
    ax.plot(t, dist(gt), "k", lw=2, label="GT")
    for (k, v), c in zip(curves.items(), ("tab:red", "tab:blue", "tab:green", "tab:purple")):
        ax.plot(t, dist(np.asarray(v)[:T]), c, lw=1.3, label=k)
    ax.plot(t, np.full(T, dist(np.asarray(item["template"])[None])[0]), "0.5", ls="--", lw=1, label="static template")
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, lo + 1.25 * (hi - lo))  # room for the legend above the curves
    ax.set_xlabel("seconds"), ax.set_ylabel(f"lip distance (vertices {i}, {j})")
    ax.set_title(f"{item['name']}: mouth opening (grey: speech envelope)", fontsize=10)
    ax.legend(fontsize=8, ncol=len(curves) + 2, loc="upper right")
    fig.tight_layout()
    fig.savefig(out / "lip_distance.png", dpi=100)
    plt.close(fig)
    return out / "lip_distance.png"


# ---------------------------------------------------------------------------------------------------------
# 6f. Rule responses: which hidden social rule a listener sequence answers (the synthetic twins' ledger)
# ---------------------------------------------------------------------------------------------------------

# rule: (response, window start s, window end s, threshold)
RULES = {"pause": ("nod", 0.15, 1.1, 0.03), "amused": ("smile", 0.3, 1.6, 0.2), "laugh": ("smile", 0.3, 1.6, 0.2),
         "smile_seen": ("smile", 0.3, 1.6, 0.2), "loud": ("brow", 0.15, 0.7, 0.2),
         "valence": ("mood", 1.8, 3.5, 0.08), "sarcasm": ("smile", 0.3, 1.6, 0.2)}

SMILED, ISOLATION = ("amused", "laugh", "smile_seen"), 2.5


def _hp(x, k):
    """x minus its moving average over 2k+1 frames (edge padded): the fast part of a channel."""
    xp = np.pad(x, k, mode="edge")
    return x - np.convolve(xp, np.ones(2 * k + 1) / (2 * k + 1), "valid")


def _response(m, kind, t, w0, w1, fps, sign=1.0):
    """The size of the response of kind `kind` in motion m (T, D) to an event at t seconds, window [t+w0, t+w1]."""
    i, a, b = int(round(t * fps)), int(round((t + w0) * fps)), int(round((t + w1) * fps))
    if kind == "nod":
        x = _hp(m[:, data.PITCH], max(int(0.15 * fps), 1))[a:b]
        return float(x.max() - x.min())
    if kind == "mood":
        x = m[:, data.SMILE] - m[:, data.FROWN]
        return sign * float(x[a:b].mean() - x[max(i - int(0.5 * fps), 0):i + 1].mean())
    x = m[:, data.SMILE] + m[:, data.OPEN_SMILE] if kind == "smile" else m[:, data.BROW_RAISE]
    return float(x[a:b].max() - x[max(i - int(0.3 * fps), 0):i + int(0.1 * fps) + 1].min())


def rule_responses(listener_seqs, events, fps):
    """listener_seqs: [(T, D)] raw listener motion (FaceModel channels); events: [{rule: [t] (valence: [[t, change]])}]
    per sequence (data.load_ledger; None entries skipped); fps: frames per second. -> {rule: share of its events
    answered (NaN when none), "n_<rule>": number of events scored, "sarcasm": share of sarcasm wrongly answered}.
    An event counts when its whole window lies inside its sequence; a smile rule's event (and sarcasm) only when no
    other smile-answered event came in the ISOLATION seconds before it (the answer would be the earlier one's)."""
    hits = {r: [] for r in RULES}
    for m, ev in zip(listener_seqs, events):
        if ev is None:
            continue
        m = np.asarray(m, np.float32)
        T = len(m) / fps
        for rule, (kind, w0, w1, thr) in RULES.items():
            for e in ev.get(rule, []):
                t, sign = (e[0], np.sign(e[1])) if isinstance(e, (list, tuple)) else (e, 1.0)
                if kind == "smile" and any(t - ISOLATION <= x < t + (w1 if rule == "sarcasm" else 0) and x != t
                                           for r in SMILED for x in ev.get(r, [])):
                    continue
                if t >= 0.5 and t + w1 <= T:
                    hits[rule].append(_response(m, kind, t, w0, w1, fps, sign) > thr)
    out = {}
    for rule, h in hits.items():
        out[rule] = float(np.mean(h)) if h else float("nan")
        out[f"n_{rule}"] = len(h)
    return out


# ---------------------------------------------------------------------------------------------------------
# 7. Benchmark: python metrics.py --bench (ours against the reference code, one thread each, same process)
# ---------------------------------------------------------------------------------------------------------

def _fd_reference(a, b):
    """FD as the reference code computes it: numpy covariances, scipy's sqrtm of the product, its real part."""
    from scipy import linalg
    m1, m2, s1, s2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _fr_dist_reference(P, L, A, blocks=REACT_BLOCKS):
    """FRDist as the REACT baseline computes it, run serially: tslearn's dtw for every (k, i, j) and block."""
    from tslearn.metrics import dtw as ts_dtw
    S = np.array([[min(sum(w * ts_dtw(P[k, i][:, s:e], L[j][:, s:e]) for s, e, w in blocks)
                       for j in np.flatnonzero(A[k])) for i in range(P.shape[1])] for k in range(P.shape[0])])
    return _sum_mean(S)


def _side_by_side(what, ours, reference, missing, n=1):
    """Run ours() and reference() n times each, alternating (so that load from other processes hits both); print
    the best CPU seconds per run of each, the ratio and the largest difference."""
    def timed(f):
        t = time.process_time()
        r = f()
        return r, time.process_time() - t
    t1 = t2 = math.inf
    for _ in range(n):
        r1, t = timed(ours)
        t1 = min(t1, t)
        try:
            r2, t = timed(reference)
        except ImportError:
            print(f"{what}: ours {t1:.4g} s; reference: {missing} not installed")
            return
        t2 = min(t2, t)
    diff = max(abs(r1[k] - r2[k]) for k in r1) if isinstance(r1, dict) else abs(r1 - r2)
    print(f"{what}: ours {t1:.4g} s, reference {t2:.4g} s, ratio ours / reference {t1 / t2:.2f}, "
          f"largest difference {diff:.2g}" + (f" (best of {n})" if n > 1 else ""))


def bench(n_speakers=20, K=10, n_appropriate=11, T=750, fd_frames=10000):
    """Time FD and FRDist on random data against the reference code (numpy/scipy; tslearn as the REACT baseline
    uses it), one thread each, in this process. Times are process CPU seconds, steadier than wall time on a
    shared machine."""
    threads, limits = torch.get_num_threads(), None
    try:
        torch.set_num_threads(1)
        try:
            from threadpoolctl import threadpool_limits
            limits = threadpool_limits(1)  # numpy's BLAS on one thread too
        except ImportError:
            print("threadpoolctl not installed: run with OMP_NUM_THREADS=1 to keep numpy's BLAS on one thread")
        _bench(n_speakers, K, n_appropriate, T, fd_frames)
    finally:  # leave the process as it was, whatever happened
        if limits is not None:
            limits.restore_original_limits()
        torch.set_num_threads(threads)


def _bench(n_speakers, K, n_appropriate, T, fd_frames):
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((fd_frames, 56)), rng.standard_normal((fd_frames, 56)) + 0.1
    _side_by_side(f"FD of two ({fd_frames}, 56) frame sets", lambda: frechet_distance(a, b),
                  lambda: _fd_reference(a, b), "scipy", n=20)
    N, m = n_speakers, n_appropriate
    P, L = rng.random((N, K, T, 25)), rng.random((N * m, T, 25))
    A = np.kron(np.eye(N, dtype=bool), np.ones((1, m), dtype=bool))  # speaker k: reactions k*m .. k*m + m - 1
    try:
        from tslearn.metrics import dtw as ts_dtw
        ts_dtw(P[0, 0, :3], L[0, :3])  # compile tslearn's numba code before timing
    except ImportError:
        pass
    _side_by_side(f"FRDist, {N} speakers x {K} samples x {m} appropriate reactions, T = {T} "
                  f"({N * K * m * len(REACT_BLOCKS)} DTWs)", lambda: fr_dist(P, L, A),
                  lambda: _fr_dist_reference(P, L, A), "tslearn")


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="metrics.py: time FD and FRDist against the reference code")
    ap.add_argument("--bench", action="store_true", help="run the benchmark")
    ap.add_argument("--speakers", type=int, default=20, help="FRDist: speakers N")
    ap.add_argument("--samples", type=int, default=10, help="FRDist: generated reactions K per speaker")
    ap.add_argument("--appropriate", type=int, default=11, help="FRDist: appropriate reactions per speaker")
    ap.add_argument("--frames", type=int, default=750, help="FRDist: frames T")
    args = ap.parse_args()
    if args.bench:
        bench(n_speakers=args.speakers, K=args.samples, n_appropriate=args.appropriate, T=args.frames)
    else:
        ap.print_help()
