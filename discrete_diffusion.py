"""discrete_diffusion.py: DiffListener, non-autoregressive listener generation by VQ-Diffusion over VQ-VAE tokens.

A fusion network turns the speaker's face, its frame-to-frame differential, MFCC audio and the transcript into a
per-frame representation R^S; a mask-and-replace discrete diffusion (T = 100) over the listener's motion tokens
(K codes + [MASK]) starts from all-[MASK] and denoises the whole window at once, conditioned on R^S; the VQ-VAE
decoder turns the tokens back into 3DMM motion.

Papers: DiffListener, ICASSP 2025, arXiv 2502.06822 (the method); VQ-Diffusion, arXiv 2111.14822 (the process,
the x0-parameterised denoiser, truncation) and arXiv 2205.16007; D3PM arXiv 2107.03006. Equation labels (D1-D7)
are those of the spec (spec/methods/discrete_diffusion.md), not the papers'.
Substitutes: BERT -> a from-scratch word encoder (embedding + sinusoid of the word end frame + Transformer).
Depends on vqvae.py (stage 1; the only other method file imported): tokens, K, r and the decoder come from its
checkpoint (`--vq`, default runs/vqvae_naive/ckpt.pt, trained with `--norm none,none` if missing).

Long conversations: windows of the training length overlap by half; at every reverse step all windows are denoised
in one batch and each token's x0-distribution is the mean over the windows covering it (MultiDiffusion-style joint
sampling, arXiv 2302.08113), so the whole sequence is one diffusion and no window boundary is a seam; the token
sequence is then decoded at once. sample.py reports the frame-step at window boundaries against independent windows.

Deviations [ours]: the denoiser knows who listens: Linear(listener beta) is added to the timestep embedding that
drives every AdaLN. DiffListener trains one model per listener (L2L's Trevor / Conan / Stephen); our world has six
listeners whose resting face differs far more than any reaction (per-window FD of another listener's mean ~0.2-0.6),
so without it the model can only guess the face (test FD 0.886, no better than a random walk; with it 0.468: on the
test windows of the six training listeners 0.320 vs the codec's floor 0.285; unseen listener 0.774 vs 0.501).
The fusion network reads patches of `fuse_stride` frames (4 on CPU, 1 = per frame in `full`);
the learning rate decays by cosine after warm-up; importance sampling of t, EMA weights and guidance are omitted;
sampling defaults to 20 exact-jump steps (`--sample-steps 0` runs all T = 100; test FD 0.468 vs 0.473, seed std 0.004).
On a shared CPU run with OMP_NUM_THREADS=1: 2 threads under contention were ~10x slower in our measurements.

Shapes: B batch, T frames (30 fps), L tokens (= T / r), K codes ([MASK] = index K), D = 56 motion dims,
F audio features (4 rows per frame), N words, W windows, d model width.

    python discrete_diffusion.py --preset smoke              # seconds: tiny world, tiny model
    python train.py --model discrete_diffusion               # default: 3000 steps, 6.4 min on an idle 2-core CPU
                                                             # (needs runs/vqvae_naive/ckpt.pt); test FD 0.468
                                                             # vs random walk 0.896, alt-GT 0.229; 0.13 s per 8 s
    python sample.py --model discrete_diffusion              # metrics table, npy + GIF + PNG, timings
    python train.py --model discrete_diffusion --ablations   # + no_identity, no_diff, no_text, K256, K512
"""
import argparse
import copy
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import metrics

LOG_EPS = -70.0  # log-probabilities are clamped here (VQ-Diffusion), also the pinned [MASK] logit


# ----------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Config:
    data: str = ""                    # listener data path ("" = the synthetic world)
    out: str = "runs/discrete_diffusion"  # output folder (checkpoint, samples, metrics.json)
    preset: str = "default"           # smoke | default | full
    vq: str = ""                      # VQ-VAE checkpoint ("" = runs/vqvae_naive/ckpt.pt; smoke: <out>/vq/ckpt.pt)
    steps: int = 3000                 # optimisation steps
    batch_size: int = 32              # windows per step
    lr: float = 1e-3                  # peak learning rate (AdamW)
    warmup: int = 100                 # linear warm-up steps, then cosine decay to 10%
    weight_decay: float = 4.5e-2      # AdamW weight decay (VQ-Diffusion)
    clip_frames: int = 64             # training window in frames (multiple of the VQ's r)
    crop_stride: int = 8              # frames between training crops (tokens are cached per crop)
    d_model: int = 128                # width d of fusion and denoiser
    n_layers: int = 4                 # denoiser blocks
    n_heads: int = 4                  # attention heads
    n_fuse: int = 1                   # self-attention layers after cross-modal fusion
    fuse_stride: int = 4              # frames per fusion position (1 = per frame, the spec; 4 = CPU speed)
    text_layers: int = 1              # word-encoder Transformer layers
    d_text: int = 64                  # word-encoder width
    n_mfcc: int = 40                  # MFCC coefficients (4 rows per frame)
    dropout: float = 0.1              # dropout in attention and MLPs
    diffusion_steps: int = 100        # T of the diffusion
    mask_end: float = 0.99999         # gamma_bar_T (code default; paper: 0.9)
    replace_mass: float = 1e-6        # K * beta_bar_T (code default 1e-6 ~ absorbing; 0 = absorbing; paper 0.1)
    aux_weight: float = 5e-4          # lambda of the auxiliary x0 cross-entropy (D7)
    truncation: float = 0.86          # top-r truncation of p(x0) at sampling (1.0 = off)
    sample_steps: int = 20            # reverse steps at sampling (0 = all T; fewer = exact jump) [ours: 20 is
                                      # within the seed spread of 100 in the steps ablation, 9x faster]
    no_diff: bool = False             # ablation: drop the facial differential
    no_text: bool = False             # ablation: drop the text branch
    no_audio: bool = False            # ablation: drop the audio branch
    identity: bool = True             # [ours] condition on the listener's shape beta (6 listeners share a model)
    eval_every: int = 500             # steps between validation samples / checkpoints
    n_eval: int = 64                  # windows used for validation metrics while training
    n_samples: int = 3                # seeds per test window in sample mode (mean +- std)
    max_test: int = 0                 # cap on test windows in sample mode (0 = all)
    long_seconds: float = 60.0        # length of the long-conversation demo in sample mode
    time_runs: int = 3                # sample mode: timed repeats (median) of the 8-s listener timing
    time_batch: int = 32              # sample mode: batch size for the throughput timing
    ablations: bool = False           # train mode: also train the ablation models under <out>/ablations/
    device: str = "auto"              # auto | cpu | cuda | mps
    dtype: str = "float32"            # float32 | bfloat16 | float16 (autocast on GPU only)
    seed: int = 0                     # seed for everything
    resume: bool = False              # continue from <out>/ckpt.pt
    ckpt: str = ""                    # sample mode: checkpoint ("" = <out>/ckpt.pt)
    split: str = "test"               # sample mode: split to evaluate


PRESETS = {
    "smoke": dict(steps=60, batch_size=8, clip_frames=32, crop_stride=16, d_model=32, n_layers=1, n_heads=2,
                  d_text=16, n_mfcc=20, eval_every=30, n_eval=8, n_samples=1, max_test=8, long_seconds=8.0,
                  time_runs=1, time_batch=4,
                  warmup=10),
    "default": {},
    "full": dict(fuse_stride=1, steps=100_000, batch_size=64, lr=2e-4, warmup=1000, clip_frames=240, d_model=512, n_layers=12,
                 n_heads=8, n_fuse=1, text_layers=2, d_text=256, n_mfcc=128, eval_every=5000, n_eval=256),
}


def parse_config(argv):
    """Flags from the dataclass (kebab- and snake-case both accepted); preset values apply unless a flag is given."""
    p = argparse.ArgumentParser(prog="discrete_diffusion.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(Config):
        names = [f"--{f.name.replace('_', '-')}"] + ([f"--{f.name}"] if "_" in f.name else [])
        if f.type is bool or f.type == "bool":
            p.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=" ")
        else:
            p.add_argument(*names, dest=f.name, type=type(f.default), default=None, help=f"default {f.default}")
    args = p.parse_args(argv)
    preset = args.preset or Config.preset
    if preset not in PRESETS:
        p.error(f"unknown preset {preset!r}")
    cfg = Config(**{**PRESETS[preset], "preset": preset})
    for k, v in vars(args).items():
        if v is not None:
            setattr(cfg, k, v)
    return cfg


# ----------------------------------------------------------------------------------------------------------------
# The diffusion process: schedule (D1-D2), posterior (D3-D4), truncation, Gumbel-max
# ----------------------------------------------------------------------------------------------------------------
def make_schedule(T, K, mask_end=0.99999, replace_mass=1e-6, mask_start=9e-6):
    """Cumulative (abar, bbar, gbar) for t = 0..T in float64; t = 0 is the identity slot (1, 0, 0).
    gbar linear mask_start -> mask_end; K*bbar linear min(1e-6, m) -> m; abar = 1 - gbar - K*bbar."""
    u = torch.arange(T, dtype=torch.float64) / max(T - 1, 1)           # (T,) 0..1 for t = 1..T
    gbar = mask_start + (mask_end - mask_start) * u
    m0 = min(1e-6, replace_mass)
    kbbar = m0 + (replace_mass - m0) * u
    abar = (1.0 - gbar - kbbar).clamp_min(0.0)                         # paper: abar_T = 0 (round-off)
    zero, one = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    sched = dict(abar=torch.cat([one, abar]), bbar=torch.cat([zero, kbbar / K]), gbar=torch.cat([zero, gbar]),
                 K=K, T=T, absorbing=replace_mass == 0)
    t = torch.arange(1, T + 1)
    a, b, g = jump_params(sched, t, t - 1)
    assert (abar >= 0).all() and (a >= 0).all() and (a <= 1).all() and (g >= 0).all() and (g <= 1).all() \
        and (b >= 0).all() and (K * b <= 1).all(), "schedule parameters leave [0, 1]"
    return sched


def jump_params(sched, t, s):
    """Per-jump (alpha_{t|s}, beta_{t|s}, gamma_{t|s}) for s < t (s = t - 1: one step). beta is per code."""
    ab, gb, kbb = sched["abar"], sched["gbar"], sched["bbar"] * sched["K"]
    a = ab[t] / ab[s]                                                  # alpha_{t|s} = abar_t / abar_s
    g = (gb[t] - gb[s]) / (1.0 - gb[s])                                # 1 - gamma_{t|s} = (1-gbar_t)/(1-gbar_s)
    # K beta_{t|s} = 1 - alpha - gamma, rewritten without the cancellation against 1 (beta_bar ~ 1e-9)
    kb = (kbb[t] * ab[s] - ab[t] * kbb[s]) / ((ab[s] + kbb[s]) * ab[s])
    assert (kb > -1e-12).all(), "negative replace mass"
    return a, kb.clamp_min(0.0) / sched["K"], g


def q_probs(sched, x0, t):
    """(D2) q(x_t | x0): (B, L) codes, (B,) times -> (B, L, K+1) probabilities."""
    K = sched["K"]
    ab, bb, gb = (sched[k][t].view(-1, 1, 1) for k in ("abar", "bbar", "gbar"))
    codes = ab * F.one_hot(x0, K).double() + bb                        # (B, L, K)
    return torch.cat([codes, gb.expand(*x0.shape, 1)], -1)            # (B, L, K+1)


def gumbel_argmax(probs, gen=None):
    """Draw one state per position from (unnormalised) probabilities with Gumbel-max; zero mass is never drawn."""
    u = torch.rand(probs.shape, generator=gen, dtype=torch.float64, device=probs.device)
    gumbel = -torch.log(-torch.log(u.clamp(1e-30, 1 - 1e-16)))
    logp = torch.where(probs > 0, probs.clamp_min(1e-300).log(), torch.full_like(probs, -math.inf))
    return (logp + gumbel).argmax(-1)


def q_sample(sched, x0, t, gen=None):
    """x_t ~ q(x_t | x0) by Gumbel-max (D2)."""
    return gumbel_argmax(q_probs(sched, x0, t), gen)


def posterior(p0, x_t, t, s, sched):
    """(D3/D4) p(x_s | x_t) = sum_x0 q(x_s | x_t, x0) p0(x0), in float64 probability space.
    p0 (B, L, K) x0-distribution (one-hot gives the true posterior); x_t (B, L) in 0..K; t, s (B,) or int, s < t.
    Returns (B, L, K+1). It sums to p0's total mass (1 unless truncated)."""
    B, L, K = p0.shape
    if isinstance(t, int) and isinstance(s, int):                      # sampling: python scalars, cached
        key = ("coef", t, s)
        if key not in sched:
            sched[key] = [float(sched[k][i]) for i in (t, s) for k in ("abar", "bbar", "gbar")] + \
                [float(v) for v in jump_params(sched, torch.tensor([t]), torch.tensor([s]))]
        ab_t, bb_t, gb_t, ab_s, bb_s, gb_s, a_ts, b_ts, g_ts = sched[key]
    else:                                                              # training: one (t, s) per sample
        t, s = torch.as_tensor(t).cpu().expand(B), torch.as_tensor(s).cpu().expand(B)
        ab_t, bb_t, gb_t = (sched[k][t].view(B, 1, 1).to(p0.device) for k in ("abar", "bbar", "gbar"))
        ab_s, bb_s, gb_s = (sched[k][s].view(B, 1, 1).to(p0.device) for k in ("abar", "bbar", "gbar"))
        a_ts, b_ts, g_ts = (v.view(B, 1, 1).to(p0.device) for v in jump_params(sched, t, s))
    # (D3) masked x_t: stay masked w.p. gbar_s/gbar_t, else code j w.p. (gamma_ts/gbar_t)(abar_s p0_j + bbar_s)
    # (bbar_s is weighted by sum(p0), the D5 marginal, so a truncated p0 keeps its exact meaning)
    from_mask = torch.cat([g_ts / gb_t * (ab_s * p0 + bb_s * p0.sum(-1, keepdim=True)),
                           torch.ones_like(p0[..., :1]) * (gb_s / gb_t)], -1)  # (B, L, K+1)
    k = F.one_hot(x_t.clamp(max=K - 1), K).double()                    # (B, L, K) one-hot of an unmasked x_t
    if sched["absorbing"]:
        from_code = k                                                  # beta = 0: x_t = k means x0 = k, copy it
    else:
        w = p0 / (ab_t * k + bb_t)                                     # (D4.1) p0_i / q(x_t = k | x0 = i)
        u = ab_s * w + bb_s * w.sum(-1, keepdim=True)                  # (D4.2) sum_i w_i q(x_s = j | x0 = i)
        from_code = (a_ts * k + b_ts) * u                              # (D4.3) times q(x_t = k | x_s = j)
    from_code = torch.cat([from_code, torch.zeros_like(from_code[..., :1])], -1)  # [MASK] cannot precede a code
    return torch.where((x_t == K)[..., None], from_mask, from_code)


def truncate(p0, r):
    """Top-r truncation: keep the sorted prefix whose inclusive cumulative mass is < r (top-1 always kept); the rest
    get zero probability (log -70 in VQ-Diffusion) without renormalising, which slightly slows unmasking."""
    if r >= 1.0:
        return p0
    sp, order = p0.sort(-1, descending=True)
    keep_sorted = sp.cumsum(-1) < r
    keep_sorted[..., 0] = True
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return p0 * keep


def diffusion_loss(logits, x0, x_t, t, sched, aux_weight):
    """(D6/D7) L = T * mean_positions(L_t + lambda * w(t) * CE(x0, p0)), w(t) = 2 - (t-1)/T.
    L_t = KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) for t >= 2, the decoder NLL -log p(x0|x_1) for t = 1."""
    T, K = sched["T"], sched["K"]
    logp0 = F.log_softmax(logits.double(), -1)                         # (B, L, K) log p(x0 | x_t)
    p_model = posterior(logp0.exp(), x_t, t, t - 1, sched)             # (B, L, K+1) D5 in closed form
    q_true = posterior(F.one_hot(x0, K).double(), x_t, t, t - 1, sched)
    logp = p_model.clamp_min(1e-300).log().clamp_min(LOG_EPS)
    logq = q_true.clamp_min(1e-300).log().clamp_min(LOG_EPS)
    kl = (q_true * (logq - logp)).sum(-1)                              # (B, L)
    nll = -logp.gather(-1, x0[..., None])[..., 0]                      # (B, L)
    vlb = torch.where((t == 1)[:, None], nll, kl)
    ce = -logp0.gather(-1, x0[..., None])[..., 0]                      # (B, L) auxiliary x0 loss
    w = (2.0 - (t.double() - 1) / T)[:, None]                          # adaptive weight (VQ-Diffusion)
    loss = T * (vlb + aux_weight * w * ce).mean()
    return loss, dict(vlb=vlb.mean().item(), ce=ce.mean().item())


# ----------------------------------------------------------------------------------------------------------------
# Networks: attention blocks, audio and text encoders, fusion (3.1), denoiser (3.2)
# ----------------------------------------------------------------------------------------------------------------
def sinusoid(pos, dim):
    """Sinusoidal embedding of (possibly negative, fractional) positions: (...) -> (..., dim)."""
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, device=pos.device) / dim)  # (dim/2,)
    ang = pos.float()[..., None] * freq                                # (..., dim/2)
    return torch.cat([ang.sin(), ang.cos()], -1)


def facial_differential(x):
    """F^S_Delta: Delta_t = F_t - F_{t-1}, Delta_1 = 0. (B, T, D) -> (B, T, D)."""
    return torch.cat([torch.zeros_like(x[:, :1]), x[:, 1:] - x[:, :-1]], 1)


class Attention(nn.Module):
    """Multi-head attention with scaled_dot_product_attention; K/V can be precomputed once per condition."""

    def __init__(self, d, heads, dropout):
        super().__init__()
        self.h, self.drop = heads, dropout
        self.q, self.kv, self.o = nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(d, d)

    def split(self, x):                                                # (B, N, d) -> (B, h, N, d/h)
        B, N, D = x.shape
        return x.view(B, N, self.h, D // self.h).transpose(1, 2)

    def kv_of(self, ctx):                                              # (B, M, d) -> 2 x (B, h, M, d/h)
        return tuple(self.split(z) for z in self.kv(ctx).chunk(2, -1))

    def forward(self, x, ctx=None, keep=None, kv=None):
        B, N, D = x.shape
        q = self.split(self.q(x))                                      # (B, h, N, d/h)
        k, v = kv if kv is not None else self.kv_of(x if ctx is None else ctx)
        mask = None if keep is None else keep[:, None, None, :]         # (B, 1, 1, M) True = attend
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.drop if self.training else 0.0)
        return self.o(y.transpose(1, 2).reshape(B, N, D))             # (B, h, N, d/h) -> (B, N, d)


class Block(nn.Module):
    """Pre-LN (cross-)attention + MLP: h = x + Attn(LN x, LN ctx); h + MLP(LN h). ctx None = self-attention."""

    def __init__(self, d, heads, dropout):
        super().__init__()
        self.ln_x, self.ln_c, self.ln_m = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.Dropout(dropout))

    def forward(self, x, ctx=None, keep=None):
        x = x + self.attn(self.ln_x(x), None if ctx is None else self.ln_c(ctx), keep)
        return x + self.mlp(self.ln_m(x))


class AudioEncoder(nn.Module):
    """MFCC rows at 4 per frame -> one vector per frame. Conv k5 s2, k5 s2, k5 s1, k3 dilation 2 (width d/2, the
    last to d): receptive field 45 rows = 0.375 s at 120 Hz (>= 0.3 s)."""

    def __init__(self, n_feat, d):
        super().__init__()
        c = d // 2
        self.net = nn.Sequential(nn.Conv1d(n_feat, c, 5, 2, 2), nn.GELU(), nn.Conv1d(c, c, 5, 2, 2), nn.GELU(),
                                 nn.Conv1d(c, c, 5, 1, 2), nn.GELU(), nn.Conv1d(c, d, 3, 1, 2, dilation=2))

    def forward(self, a):                                              # (B, 4T, F) -> (B, T, d)
        return self.net(a.transpose(1, 2)).transpose(1, 2)


class TextEncoder(nn.Module):
    """From-scratch stand-in for BERT: word embedding + sinusoid(end frame) -> Transformer -> d, plus the frame
    sinusoid in d so cross-attention can align words with frames (time alignment by word end times)."""

    def __init__(self, n_words, d_text, d, layers, heads, dropout):
        super().__init__()
        self.emb = nn.Embedding(n_words, d_text, padding_idx=0)
        self.blocks = nn.ModuleList(Block(d_text, heads, dropout) for _ in range(layers))
        self.proj = nn.Linear(d_text, d)

    def forward(self, words, end):                                     # (B, N), (B, N) frames -> (B, N, d)
        keep = words > 0
        h = self.emb(words) + sinusoid(end, self.emb.embedding_dim)     # (B, N, d_text)
        for blk in self.blocks:
            h = blk(h, keep=keep)
        return self.proj(h) + sinusoid(end, self.proj.out_features), keep


class Fusion(nn.Module):
    """(3.1) R^S: e = Lin_F(F) + Lin_D(Delta) + PE -> CM1 (audio) -> CM2 (text, pad mask) -> n_fuse self-attention.
    With fuse_stride s > 1 [ours, CPU speed] Lin_F / Lin_D see patches of s frames (a linear map of the patch, so no
    frame is averaged away) and R^S has T/s positions; PEs stay in frame units, so words align the same way."""

    def __init__(self, cfg, n_feat, n_words, D=56):
        super().__init__()
        d, h, p, s = cfg.d_model, cfg.n_heads, cfg.dropout, cfg.fuse_stride
        self.s, self.d = s, d
        self.lin_f = nn.Conv1d(D, d, s, s)                            # = Linear(D, d) when s = 1
        self.lin_d = None if cfg.no_diff else nn.Conv1d(D, d, s, s)
        self.audio = None if cfg.no_audio else AudioEncoder(n_feat, d)
        self.cm1 = None if cfg.no_audio else Block(d, h, p)
        self.text = None if cfg.no_text else TextEncoder(n_words, cfg.d_text, d, cfg.text_layers,
                                                         max(1, cfg.d_text // 16), p)
        self.cm2 = None if cfg.no_text else Block(d, h, p)
        self.fuse = nn.ModuleList(Block(d, h, p) for _ in range(cfg.n_fuse))

    def forward(self, spk, diff, feat, words, end):
        B, T, _ = spk.shape
        assert T % self.s == 0, f"T = {T} must be a multiple of fuse_stride = {self.s}"
        pe = sinusoid(torch.arange(T // self.s, device=spk.device) * self.s + (self.s - 1) / 2, self.d)  # (T/s, d)
        e = self.lin_f(spk.transpose(1, 2)).transpose(1, 2) + pe      # (B, T, D) -> (B, T/s, d)
        if self.lin_d is not None:
            e = e + self.lin_d(diff.transpose(1, 2)).transpose(1, 2)   # the facial differential, additive
        if self.audio is not None:
            a = F.avg_pool1d(self.audio(feat).transpose(1, 2), self.s).transpose(1, 2)  # (B, T/s, d)
            e = self.cm1(e, a + pe)                                    # CM1: frames attend to audio frames
        if self.text is not None:
            tok, keep = self.text(words, end)                          # (B, N, d)
            e = self.cm2(e, tok, keep)                                 # CM2: frames attend to words
        for blk in self.fuse:
            e = blk(e)
        return e                                                       # (B, T/s, d) = R^S


class AdaLN(nn.Module):
    """AdaLN(h, t) = LN_noaffine(h) (1 + s_t) + b_t, (s_t, b_t) = Linear(SiLU(Emb_t)), zero-initialised."""

    def __init__(self, d):
        super().__init__()
        self.ln, self.lin = nn.LayerNorm(d, elementwise_affine=False), nn.Linear(d, 2 * d)
        nn.init.zeros_(self.lin.weight), nn.init.zeros_(self.lin.bias)

    def forward(self, h, temb):                                        # (B, L, d), (B, d)
        s, b = self.lin(F.silu(temb))[:, None].chunk(2, -1)            # (B, 1, d) each
        return self.ln(h) * (1 + s) + b


class DenoiserBlock(nn.Module):
    """AdaLN -> bidirectional self-attention -> AdaLN -> cross-attention to R^S -> LN -> MLP (x4, GELU)."""

    def __init__(self, d, heads, dropout):
        super().__init__()
        self.n1, self.n2, self.n3 = AdaLN(d), AdaLN(d), nn.LayerNorm(d)
        self.self_attn, self.cross = Attention(d, heads, dropout), Attention(d, heads, dropout)
        self.ln_c = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.Dropout(dropout))

    def forward(self, h, temb, kv):
        h = h + self.self_attn(self.n1(h, temb))
        h = h + self.cross(self.n2(h, temb), kv=kv)
        return h + self.mlp(self.n3(h))


class DiffListener(nn.Module):
    """Fusion + x0-parameterised denoiser p(x0 | x_t, t, R^S) (VQ-Diffusion Text2ImageTransformer, shrunk)."""

    def __init__(self, cfg, K, n_feat, n_words, L_max, D=56, D_id=100):
        super().__init__()
        d = cfg.d_model
        self.K, self.T = K, cfg.diffusion_steps
        self.fusion = Fusion(cfg, n_feat, n_words, D)
        self.tok = nn.Embedding(K + 1, d)                              # K codes + [MASK]
        self.pos = nn.Embedding(L_max, d)
        self.temb = nn.Embedding(self.T, d)                            # learned Emb_t, t = 1..T at index t-1
        self.blocks = nn.ModuleList(DenoiserBlock(d, cfg.n_heads, cfg.dropout) for _ in range(cfg.n_layers))
        self.head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, K))    # no [MASK] logit
        self.ident = nn.Linear(D_id, d) if cfg.identity else None      # [ours] beta -> added to Emb_t
        for name, stat in [("spk_mean", 0.0), ("spk_std", 1.0), ("diff_std", 1.0), ("feat_mean", 0.0),
                           ("feat_std", 1.0), ("beta_mean", 0.0), ("beta_std", 1.0)]:
            n = n_feat if "feat" in name else D_id if "beta" in name else D
            self.register_buffer(name, torch.full((n,), stat))
        self.apply(self._init)
        self.sched = make_schedule(self.T, K, cfg.mask_end, cfg.replace_mass)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)) and m.weight.abs().sum() > 0:  # keeps AdaLN's zero init
            nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def condition(self, spk_raw, feat_raw, words, end, beta=None):
        """Raw speaker motion (B, T, D), audio rows (B, 4T, F), words (B, N), end frames (B, N), listener beta
        (B, D_id) -> (per-block K/V of R^S, identity embedding (B, d) or None), computed once per sample."""
        spk = (spk_raw - self.spk_mean) / self.spk_std                 # (B, T, D) z-normalised face
        diff = facial_differential(spk) / self.diff_std                # (B, T, D) scaled by its train std
        feat = (feat_raw - self.feat_mean) / self.feat_std
        R = self.fusion(spk, diff, feat, words, end)                   # (B, T, d)
        ident = None
        if self.ident is not None:
            assert beta is not None, "this model is conditioned on the listener identity: pass beta"
            ident = self.ident((beta.to(R) - self.beta_mean) / self.beta_std)  # (B, d)
        return [blk.cross.kv_of(blk.ln_c(R)) for blk in self.blocks], ident

    def forward(self, x_t, t, cond):
        """x_t (B, L) in 0..K, t (B,) in 1..T, cond from condition() -> logits (B, L, K) of p(x0 | x_t)."""
        B, L = x_t.shape
        kv, ident = cond
        assert int(x_t.max()) <= self.K, "token index beyond [MASK]: VQ/denoiser K mismatch"
        h = self.tok(x_t) + self.pos(torch.arange(L, device=x_t.device))  # (B, L, d)
        temb = self.temb(t - 1) + (0 if ident is None else ident)     # (B, d): AdaLN sees time and who listens
        for blk, kv_b in zip(self.blocks, kv):
            h = blk(h, temb, kv_b)
        return self.head(h)                                            # (B, L, K)

    @torch.no_grad()
    def sample(self, kv, n_tokens, starts, L, steps=None, r=0.86, gen=None, batch=1):
        """Reverse process from all-[MASK]. kv: condition of batch*W windows (sample-major); window w of each sample
        covers tokens [starts[w], starts[w] + L). p(x0) of a token = mean over the windows covering it (one window
        = plain sampling). steps < T uses the exact jump over the grid t_i = round(i T / S). Returns (batch, n)."""
        S, K, W, dev = steps or self.T, self.K, len(starts), self.pos.weight.device
        assert 1 <= S <= self.T
        idx = (torch.tensor(starts, device=dev)[:, None] + torch.arange(L, device=dev)).view(-1)  # (W*L,)
        count = torch.zeros(n_tokens, dtype=torch.float64, device=dev).index_add_(
            0, idx, torch.ones(len(idx), dtype=torch.float64, device=dev))  # windows covering each token
        x = torch.full((batch, n_tokens), K, dtype=torch.long, device=dev)  # x_T = all [MASK]
        grid = [round(i * self.T / S) for i in range(S, -1, -1)]        # T = t_S > ... > t_0 = 0
        for t, s in zip(grid[:-1], grid[1:]):
            xw = x[:, idx].view(batch * W, L)                          # (B*W, L) the windows' tokens
            logits = self(xw, torch.full((batch * W,), t, device=dev), kv)
            pw = F.softmax(logits.double(), -1).view(batch, W * L, K)  # (B, W*L, K)
            p0 = torch.zeros(batch, n_tokens, K, dtype=torch.float64, device=dev).index_add_(1, idx, pw)
            p0 = truncate(p0 / count[None, :, None], r)                # (B, N, K) mean over windows, top-r
            x = gumbel_argmax(posterior(p0, x, t, s, self.sched), gen)  # x_s ~ (D3/D4), exact jump t -> s
        assert (x < K).all(), "a [MASK] survived the last step"
        return x


def window_starts(n_tokens, L, hop):
    """Token starts of overlapping windows covering n_tokens (the last one flush with the end)."""
    if n_tokens <= L:
        return [0]
    starts = list(range(0, n_tokens - L + 1, hop))
    return starts if starts[-1] == n_tokens - L else starts + [n_tokens - L]


# ----------------------------------------------------------------------------------------------------------------
# Data: windows of the listener data, cached VQ tokens, word ids time-aligned to the window
# ----------------------------------------------------------------------------------------------------------------
HISTORY_S = 3.0  # seconds of words before the window the text encoder sees (LM-Listener)


def word_ids():
    """Word -> id over data.VOCAB: 0 pad, 1 unknown, 2 a start token every window has (no empty key set)."""
    return {w.lower(): i + 3 for i, w in enumerate(data.VOCAB)}


def window_words(words, c0, T, fps, vocab):
    """Segment words [(text, end_s)] -> [(id, end frame relative to the window start c0)] for ends in [-3 s, T)."""
    sel = [(vocab.get(w.lower(), 1), e * fps - c0) for w, e in words if -HISTORY_S * fps <= e * fps - c0 < T]
    return [(2, 0.0)] + sel


def pad_words(lists):
    """Lists of (id, end) -> ids (n, N) int64 (pad 0), ends (n, N) float32."""
    N = max(len(w) for w in lists)
    ids, ends = torch.zeros(len(lists), N, dtype=torch.long), torch.zeros(len(lists), N)
    for i, w in enumerate(lists):
        ids[i, :len(w)] = torch.tensor([a for a, _ in w])
        ends[i, :len(w)] = torch.tensor([b for _, b in w], dtype=torch.float32)
    return ids, ends


def audio_rows(it, n_rows, n_mfcc):
    """Speaker audio rows (n_rows = 4 per frame, F): precomputed rows (L2L files) or data.mfcc of the waveform."""
    if it.get("audio_rows") is not None:
        return torch.as_tensor(np.asarray(it["audio_rows"][:n_rows]), dtype=torch.float32)
    return torch.as_tensor(data.mfcc(it["audio"], rate=4.0 * it["fps"], n_mfcc=n_mfcc, n_rows=n_rows))


@torch.no_grad()
def load_windows(path, split, vq, T, stride, n_mfcc, max_items=0):
    """Every item of a split, its crops of T frames at `stride`, and the VQ tokens of each crop (encoded once).
    Returns a dict of tensors: spk/lis (S, Ts, D) raw, feat (S, 4Ts, F), beta (S, 100), alt (S, Ts, D) or None,
    starts (C,), tok (S, C, L), wid/wend (S, C, N), texts [S][C] and words [S] for the baselines."""
    items = [it for it in data.load_listener(path, split) if len(it["listener"]) >= T]
    items = items[:max_items] if max_items else items
    assert items, f"no {split} item of at least {T} frames in {path}"
    Ts, fps, vocab = min(len(it["listener"]) for it in items), items[0]["fps"], word_ids()
    t = lambda k: torch.stack([torch.as_tensor(np.asarray(it[k][:Ts]), dtype=torch.float32) for it in items])
    d = dict(spk=t("speaker"), lis=t("listener"), fps=fps, T=T, words=[it["words"] for it in items],
             beta=torch.stack([torch.as_tensor(np.asarray(it["listener_beta"]), dtype=torch.float32) for it in items]),
             feat=torch.stack([audio_rows(it, 4 * Ts, n_mfcc) for it in items]),
             alt=None if any(it.get("alt_listener") is None for it in items) else
             torch.stack([torch.as_tensor(np.asarray(it["alt_listener"][0][:Ts]), dtype=torch.float32) for it in items]))
    starts = torch.arange(0, Ts - T + 1, stride)                      # (C,) crop starts in frames
    S, C = len(items), len(starts)
    fr = starts[:, None] + torch.arange(T)                             # (C, T)
    toks = []
    for i in range(0, S, max(1, 2048 // C)):                           # encode the crops in chunks
        x = d["lis"][i:i + max(1, 2048 // C)][:, fr]                   # (s, C, T, D)
        b = d["beta"][i:i + max(1, 2048 // C)][:, None].expand(-1, C, -1)
        idx = vq.encode(vq.normalize(x.flatten(0, 1)), b.flatten(0, 1))  # (s*C, L)
        toks.append(idx.view(x.shape[0], C, -1))
    d["tok"], d["starts"] = torch.cat(toks), starts                    # (S, C, L)
    wl = [window_words(w, int(c), T, fps, vocab) for w in d["words"] for c in starts]
    ids, ends = pad_words(wl)
    d["wid"], d["wend"] = ids.view(S, C, -1), ends.view(S, C, -1)      # (S, C, N)
    d["texts"] = [[metrics.window_text(w, int(c) / fps, (int(c) + T) / fps) for c in starts] for w in d["words"]]
    return d


def get_batch(d, seg, crop):
    """Windows (seg[i], crop[i]) of a load_windows dict -> batch dict of (B, T, D), (B, 4T, F), (B, N), (B, L)."""
    T = d["T"]
    c0 = d["starts"][crop]                                             # (B,)
    fr = c0[:, None] + torch.arange(T)                                 # (B, T)
    rows = 4 * c0[:, None] + torch.arange(4 * T)                       # (B, 4T)
    out = dict(spk=d["spk"][seg[:, None], fr], lis=d["lis"][seg[:, None], fr], feat=d["feat"][seg[:, None], rows],
               wid=d["wid"][seg, crop], wend=d["wend"][seg, crop], tok=d["tok"][seg, crop], beta=d["beta"][seg])
    out["alt"] = None if d["alt"] is None else d["alt"][seg[:, None], fr]
    return out


def all_windows(d):
    """Every (segment, crop) pair of a split, segment-major: two (n,) index tensors."""
    S, C = d["tok"].shape[:2]
    return torch.arange(S).repeat_interleave(C), torch.arange(C).repeat(S)


def set_stats(model, d):
    """Normalisation statistics of the conditioning (train split) into the model's buffers."""
    spk = d["spk"].flatten(0, 1)
    model.spk_mean.copy_(spk.mean(0)), model.spk_std.copy_(spk.std(0).clamp_min(1e-4))
    z = facial_differential((d["spk"] - model.spk_mean) / model.spk_std)
    model.diff_std.copy_(z[:, 1:].flatten(0, 1).std(0).clamp_min(1e-4))
    feat = d["feat"].flatten(0, 1)
    model.feat_mean.copy_(feat.mean(0)), model.feat_std.copy_(feat.std(0).clamp_min(1e-4))
    model.beta_mean.copy_(d["beta"].mean(0)), model.beta_std.copy_(d["beta"].std(0).clamp_min(1e-4))


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------
def setup(cfg):
    """Seed everything, pick the device (auto: cuda, mps, cpu) and the autocast context."""
    torch.manual_seed(cfg.seed), np.random.seed(cfg.seed)
    dev = cfg.device if cfg.device != "auto" else \
        "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    amp = dev == "cuda" and cfg.dtype != "float32"
    ctx = torch.autocast("cuda", dtype=getattr(torch, cfg.dtype)) if amp else torch.autocast("cpu", enabled=False)
    return torch.device(dev), ctx


def get_vq(cfg, data_path, device):
    """Load the VQ-VAE stage; train the naive (none,none) one with a clear message if it is missing."""
    import vqvae  # stage 1, the only method file this one imports
    if not cfg.vq:
        cfg.vq = str(Path(cfg.out) / "vq" / "ckpt.pt") if cfg.preset == "smoke" else "runs/vqvae_naive/ckpt.pt"
    if not Path(cfg.vq).exists():
        print(f"[discrete_diffusion] no VQ-VAE at {cfg.vq}: training the naive (none,none) one first with "
              f"`python vqvae.py --data {data_path} --out {Path(cfg.vq).parent} --preset {cfg.preset} "
              f"--norm none,none` (pass --vq PATH to use another)", flush=True)
        vqvae.main(["--data", str(data_path), "--out", str(Path(cfg.vq).parent), "--preset", cfg.preset,
                    "--norm", "none,none"], mode="train")
    vq = vqvae.load_vqvae(cfg.vq, device="cpu")
    for p in vq.parameters():
        p.requires_grad_(False)
    return vq


def build(cfg, meta, device):
    return DiffListener(cfg, meta["K"], meta["n_feat"], meta["n_words"], meta["L"], D_id=meta.get("D_id", 100)).to(device)


def lr_at(cfg, step):
    """Linear warm-up to cfg.lr, then cosine decay to 10% (ours; VQ-Diffusion uses a plateau schedule)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    u = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(u, 1.0))))


def save_ckpt(path, obj):
    """Atomic save: temporary file, then rename."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = str(path) + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


@torch.no_grad()
def generate(model, vq, d, seg, crop, steps, r, seed, bs=128):
    """Sample the listener of windows (seg, crop): -> tokens (n, L), raw motion (n, T, D) numpy."""
    was, dev = model.training, model.pos.weight.device
    model.eval()
    gen = torch.Generator(device=dev).manual_seed(seed)
    toks, xs = [], []
    for i in range(0, len(seg), bs):
        b = get_batch(d, seg[i:i + bs], crop[i:i + bs])
        kv = model.condition(b["spk"].to(dev), b["feat"].to(dev), b["wid"].to(dev), b["wend"].to(dev),
                             b["beta"].to(dev))
        L = b["tok"].shape[1]
        tok = model.sample(kv, L, [0], L, steps, r, gen, batch=len(b["spk"])).cpu()
        toks.append(tok)
        xs.append(vq.denormalize(vq.decode(tok, b["beta"])))
    model.train(was)
    return torch.cat(toks), torch.cat(xs).numpy()


def valence_fn():
    face = data.FaceModel()
    return lambda x: np.asarray(face.valence(np.asarray(x)), dtype=np.float64)


def score(preds, d, seg, crop, vfn):
    """metrics.listener_metrics of predicted windows against the GT windows they cover."""
    b = get_batch(d, seg, crop)
    return metrics.listener_metrics(list(preds), list(b["lis"].numpy()), list(b["spk"].numpy()), valence_fn=vfn)


def train(cfg):
    device, ctx = setup(cfg)
    t_start = time.time()
    cfg.data = str(data.resolve_data(cfg.data, "listener", cfg.preset))
    vq = get_vq(cfg, cfg.data, device)
    assert cfg.clip_frames % vq.r == 0, f"--clip-frames must be a multiple of the VQ's r = {vq.r}"
    print(f"[discrete_diffusion] device {device}; config:\n{json.dumps(dataclasses.asdict(cfg), indent=1)}")
    tr = load_windows(cfg.data, "train", vq, cfg.clip_frames, cfg.crop_stride, cfg.n_mfcc)
    va = load_windows(cfg.data, "val", vq, cfg.clip_frames, cfg.clip_frames, cfg.n_mfcc)
    meta = dict(K=vq.K, r=vq.r, n_feat=tr["feat"].shape[-1], n_words=len(data.VOCAB) + 3, L=cfg.clip_frames // vq.r,
                D_id=tr["beta"].shape[-1])
    assert int(tr["tok"].max()) < vq.K
    print(f"[discrete_diffusion] {tr['tok'].shape[0]} train segments x {tr['tok'].shape[1]} crops of "
          f"{cfg.clip_frames} frames -> {meta['L']} tokens (K = {vq.K}); prepared in {time.time() - t_start:.1f} s")
    model = build(cfg, meta, device)
    set_stats(model, tr)
    print(f"[discrete_diffusion] {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.96), weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(enabled=device.type == "cuda" and cfg.dtype == "float16")
    out, step, hist, prior = Path(cfg.out), 0, dict(loss=[], val=[]), 0.0
    out.mkdir(parents=True, exist_ok=True)
    if cfg.resume and (out / "ckpt.pt").exists():
        ck = torch.load(out / "ckpt.pt", map_location=device, weights_only=False)
        model.load_state_dict(ck["model"]), opt.load_state_dict(ck["optimizer"])
        step, hist = ck["step"], ck["metrics"]
        prior = hist.get("train_seconds", 0.0)
        print(f"[discrete_diffusion] resumed at step {step}")
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    gen = torch.Generator().manual_seed(cfg.seed + step)               # batches, t and q_sample noise
    vs, vc = [v[:cfg.n_eval] for v in all_windows(va)]
    vfn, sched = valence_fn(), model.sched
    S, C = tr["tok"].shape[:2]
    bar = tqdm(total=cfg.steps, initial=step, desc="discrete_diffusion", dynamic_ncols=True, mininterval=2)
    t_loop = time.time()
    while step < cfg.steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        seg, crop = torch.randint(S, (cfg.batch_size,), generator=gen), torch.randint(C, (cfg.batch_size,), generator=gen)
        b = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in get_batch(tr, seg, crop).items()}
        t = torch.randint(1, model.T + 1, (cfg.batch_size,), generator=gen)  # t ~ U{1..T}
        x_t = q_sample(sched, b["tok"].cpu(), t, gen).to(device)       # (D2)
        t = t.to(device)
        with ctx:
            kv = model.condition(b["spk"], b["feat"], b["wid"], b["wend"], b["beta"])
            logits = model(x_t, t, kv)                                 # (B, L, K)
        loss, parts = diffusion_loss(logits.float(), b["tok"], x_t, t, sched, cfg.aux_weight)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt), scaler.update()
        masked = x_t == model.K
        acc = (logits.argmax(-1) == b["tok"])[masked].float().mean().item() if masked.any() else float("nan")
        step += 1
        hist["loss"].append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", vlb=f"{parts['vlb']:.3f}", ce=f"{parts['ce']:.3f}",
                        acc=f"{acc:.2f}")
        if step % cfg.eval_every == 0 or step == cfg.steps:
            _, pred = generate(model, vq, va, vs, vc, min(cfg.sample_steps, model.T) or None, cfg.truncation,
                               cfg.seed)
            m = score(pred, va, vs, vc, vfn)
            hist["val"].append(dict(step=step, **{k: m[k] for k in ("mse/all", "fd/all", "pfd/all")}))
            tqdm.write(f"step {step}: loss {np.mean(hist['loss'][-cfg.eval_every:]):.4f} | val L2 {m['mse/all']:.4f} "
                       f"FD {m['fd/all']:.3f} P-FD {m['pfd/all']:.3f}")
            hist["train_seconds"] = prior + time.time() - t_loop
            save_ckpt(out / "ckpt.pt", dict(model=model.state_dict(), optimizer=opt.state_dict(), step=step,
                                             config=dataclasses.asdict(cfg), metrics=hist, meta=meta))
    bar.close()
    print(f"[discrete_diffusion] trained {step} steps in {time.time() - t_loop:.1f} s "
          f"(total with data/tokens {time.time() - t_start:.1f} s); checkpoint {out / 'ckpt.pt'}")
    if cfg.ablations:
        train_ablations(cfg, vq)
    return out / "ckpt.pt"


def train_ablations(cfg, vq):
    """Ablation models under <out>/ablations/<name>/: no_identity, no_diff, no_text and K in {128, 256, 512} (each K
    needs a naive VQ with that codebook, trained with vqvae.py --codebook-size K if missing; the main K is the model
    row)."""
    import vqvae
    runs = [("no_identity", dict(identity=False)), ("no_diff", dict(no_diff=True)), ("no_text", dict(no_text=True))]
    for K in (128, 256, 512):
        if K == vq.K:
            continue
        vq_path = Path(cfg.out) / "ablations" / f"vq_K{K}" / "ckpt.pt" if cfg.preset == "smoke" else \
            Path(f"runs/vqvae_naive_K{K}/ckpt.pt")
        if not vq_path.exists():
            print(f"[discrete_diffusion] training a naive VQ with K = {K} into {vq_path.parent}")
            vqvae.main(["--data", cfg.data, "--out", str(vq_path.parent), "--preset", cfg.preset, "--norm",
                        "none,none", "--codebook-size", str(K)], mode="train")
        runs.append((f"K{K}", dict(vq=str(vq_path))))
    for name, over in runs:
        sub = dataclasses.replace(cfg, out=str(Path(cfg.out) / "ablations" / name), ablations=False, resume=False,
                                  **over)
        print(f"[discrete_diffusion] ablation {name}")
        train(sub)


# ----------------------------------------------------------------------------------------------------------------
# Sampling, long conversations, evaluation
# ----------------------------------------------------------------------------------------------------------------
def load_model(path, device):
    ck = torch.load(path, map_location=device, weights_only=False)
    cfg = Config(**ck["config"])
    model = build(cfg, ck["meta"], device)
    model.load_state_dict(ck["model"])
    return model.eval(), cfg, ck


@torch.no_grad()
def sample_long(model, vq, spk, feat, words, beta, T_win, fps, steps=None, r=0.86, gen=None, hop=None):
    """Listener for speaker streams longer than the training window: windows of T_win frames every `hop` tokens
    (default half a window) are denoised jointly (Model.sample averages p(x0) over the windows covering a token),
    then the whole token sequence is decoded at once. spk (B, Tall, D) raw, feat (B, 4 Tall, F), words: B lists of
    (text, end_s). -> tokens (B, N), motion (B, N r, D) raw."""
    dev, (B, Tall, _) = model.pos.weight.device, spk.shape
    N, L, vocab = Tall // vq.r, T_win // vq.r, word_ids()
    starts = window_starts(N, L, hop or max(1, L // 2))
    c0 = [s * vq.r for s in starts]                                    # window starts in frames
    spk_w = torch.stack([spk[b, c:c + T_win] for b in range(B) for c in c0])            # (B*W, T_win, D)
    feat_w = torch.stack([feat[b, 4 * c:4 * (c + T_win)] for b in range(B) for c in c0])  # (B*W, 4 T_win, F)
    wid, wend = pad_words([window_words(words[b], c, T_win, fps, vocab) for b in range(B) for c in c0])
    kv = model.condition(spk_w.to(dev), feat_w.to(dev), wid.to(dev), wend.to(dev),
                         beta.repeat_interleave(len(c0), 0).to(dev))      # (B*W, D_id), sample-major like spk_w
    tok = model.sample(kv, N, starts, L, steps, r, gen, batch=B).cpu()
    return tok, vq.denormalize(vq.decode(tok, beta))


def concat_segments(d, n_seg, i0=0):
    """A long speaker stream from consecutive segments of a split: speaker (1, n Ts, D), audio rows, words shifted
    in time (history words of later segments dropped), GT listener and beta of the first segment."""
    Ts, fps = d["spk"].shape[1], d["fps"]
    sel = [(i0 + j) % d["spk"].shape[0] for j in range(n_seg)]
    words = [(w, e + j * Ts / fps) for j, i in enumerate(sel) for w, e in d["words"][i] if e >= 0 or j == 0]
    return (d["spk"][sel].flatten(0, 1)[None], d["feat"][sel].flatten(0, 1)[None], [words],
            d["beta"][sel[:1]], d["lis"][sel].flatten(0, 1)[None])


def seam_ratio(x, every):
    """Mean |x_{t+1} - x_t| across frames t+1 = k * every (window boundaries) / the same over all frames."""
    step = np.abs(np.diff(x, axis=0)).mean(-1)                        # (T-1,)
    b = np.arange(every, len(x), every) - 1
    return float(step[b].mean() / step.mean())


def timed(fn, n=3):
    """Median wall time of fn() over n runs (after one warm-up run)."""
    fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def sample(cfg):
    """Generate, render, evaluate (GT, alt-GT, baselines, model, ablations), time, write metrics.json."""
    device, _ = setup(cfg)
    out = Path(cfg.out)
    model, mcfg, ck = load_model(cfg.ckpt or out / "ckpt.pt", device)
    path = str(data.resolve_data(cfg.data, "listener", cfg.preset)) if cfg.data else mcfg.data
    vq = get_vq(mcfg, path, device)
    T, steps, r = mcfg.clip_frames, min(cfg.sample_steps, model.T) or None, cfg.truncation
    print(f"[discrete_diffusion] {cfg.ckpt or out / 'ckpt.pt'} (step {ck['step']}), data {path}, split {cfg.split}, "
          f"K = {vq.K}, window {T} frames, truncation r = {r}, steps {steps or model.T}")
    te = load_windows(path, cfg.split, vq, T, T, mcfg.n_mfcc)
    tr = load_windows(path, "train", vq, T, T, mcfg.n_mfcc)
    seg, crop = all_windows(te)
    if cfg.max_test:
        seg, crop = seg[:cfg.max_test], crop[:cfg.max_test]
    n, L, vfn = len(seg), T // vq.r, valence_fn()
    b = get_batch(te, seg, crop)
    gt, spk = b["lis"].numpy(), b["spk"].numpy()
    print(f"[discrete_diffusion] {n} {cfg.split} windows of {T} frames ({T / te['fps']:.2f} s), raw 3DMM units")
    rows = {"GT": score(gt, te, seg, crop, vfn)}
    if b["alt"] is not None:
        rows["alt-GT"] = score(b["alt"].numpy(), te, seg, crop, vfn)
    # Baselines (metrics.py) on a bank of non-overlapping training windows
    bs, bc = all_windows(tr)
    bank = get_batch(tr, bs, bc)
    bl, bsp, bfe = bank["lis"].numpy(), bank["spk"].numpy(), bank["feat"].numpy()
    btexts = [tr["texts"][i][j] for i, j in zip(bs.tolist(), bc.tolist())]
    texts = [te["texts"][i][j] for i, j in zip(seg.tolist(), crop.tolist())]
    walk = torch.as_tensor(metrics.baseline_random_walk_codes(bank["tok"].numpy(), n, L, vq.K, seed=cfg.seed))
    base = {"random": metrics.baseline_random(bl, n, T, seed=cfg.seed),
            "nn_motion": metrics.baseline_nn_motion(spk, bsp, bl),
            "nn_audio": metrics.baseline_nn_audio(b["feat"].numpy(), bfe, bl, T=T),
            "nn_text": metrics.baseline_nn_text(texts, btexts, bl, T=T, seed=cfg.seed),
            "random_walk": vq.denormalize(vq.decode(walk, b["beta"])).numpy(),
            "vq_floor": vq.denormalize(vq.decode(b["tok"], b["beta"])).numpy()}
    for k, v in base.items():
        rows[f"baseline:{k}"] = score(v, te, seg, crop, vfn)
    # The model: n_samples seeds, mean (and std printed)
    t0 = time.time()
    runs = [generate(model, vq, te, seg, crop, steps, r, cfg.seed + s) for s in range(cfg.n_samples)]
    per = [score(x, te, seg, crop, vfn) for _, x in runs]
    rows["model"] = {k: float(np.mean([p[k] for p in per])) for k in per[0]}
    std = {k: float(np.std([p[k] for p in per])) for k in ("mse/all", "fd/all", "pfd/all")}
    print(f"[discrete_diffusion] model: {cfg.n_samples} seeds in {time.time() - t0:.1f} s; std over seeds: "
          + ", ".join(f"{k} {v:.4f}" for k, v in std.items()))
    # Ablations: faster samplers on this model, and every model trained under <out>/ablations/
    for S in sorted({model.T, 25, 10} - {steps or model.T}, reverse=True):  # the full T-step chain and faster jumps
        rows[f"ablation:steps{S}"] = score(generate(model, vq, te, seg, crop, S, r, cfg.seed)[1], te, seg, crop, vfn)
    rows["ablation:no_truncation"] = score(generate(model, vq, te, seg, crop, steps, 1.0, cfg.seed)[1], te, seg,
                                           crop, vfn)
    for p in sorted(Path(cfg.ckpt or out / "ckpt.pt").parent.glob("ablations/*/ckpt.pt")):
        am, acfg, _ = load_model(p, device)
        avq = get_vq(acfg, path, device)
        ate = load_windows(path, cfg.split, avq, T, T, acfg.n_mfcc) if avq.K != vq.K else te
        rows[f"ablation:{p.parent.name}"] = score(generate(am, avq, ate, seg, crop, steps, r, cfg.seed)[1], te, seg,
                                                  crop, vfn)
    # FD target: close at least half the gap between the best baseline and alt-GT
    bfd = min(v["fd/all"] for k, v in rows.items() if k.startswith("baseline:") and k != "baseline:vq_floor")
    if "alt-GT" in rows:
        closed = (bfd - rows["model"]["fd/all"]) / max(bfd - rows["alt-GT"]["fd/all"], 1e-12)
        print(f"[discrete_diffusion] FD: best baseline {bfd:.3f}, model {rows['model']['fd/all']:.3f}, alt-GT "
              f"{rows['alt-GT']['fd/all']:.3f} -> {100 * closed:.0f}% of the gap closed (target >= 50%)")
    # Outputs: npy, GIF (speaker | DiffListener | GT), PNG of channels
    (out / "samples").mkdir(parents=True, exist_ok=True)
    np.save(out / "samples" / "pred.npy", runs[0][1]), np.save(out / "samples" / "tokens.npy", runs[0][0].numpy())
    np.save(out / "samples" / "gt.npy", gt), np.save(out / "samples" / "speaker.npy", spk)
    for i in range(min(2, n)):
        sb = te["beta"][seg[i]].numpy()
        data.render_gif(out / "samples" / f"window{i}.gif", [spk[i], runs[0][1][i], gt[i]], [sb, sb, sb],
                        ["speaker", "DiffListener", "listener GT"], fps=te["fps"])
        data.plot_channels(out / "samples" / f"window{i}.png", {"DiffListener": runs[0][1][i], "GT": gt[i]},
                           channels=[0, 1, 2, 50, 53], fps=te["fps"])
    # Long conversation: a ~long_seconds speaker stream from consecutive test segments, joint vs independent windows
    Ts = te["spk"].shape[1]
    ls, lf, lw, lb, lg = concat_segments(te, max(1, math.ceil(cfg.long_seconds * te["fps"] / Ts)))
    lg_len = int(min(ls.shape[1], cfg.long_seconds * te["fps"])) // vq.r * vq.r
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    _, xl = sample_long(model, vq, ls[:, :lg_len], lf[:, :4 * lg_len], lw, lb, T, te["fps"], steps, r, gen)
    _, xi = sample_long(model, vq, ls[:, :lg_len], lf[:, :4 * lg_len], lw, lb, T, te["fps"], steps, r, gen, hop=L)
    np.save(out / "samples" / "long_listener.npy", xl[0].numpy()), np.save(out / "samples" / "long_speaker.npy", ls[0])
    data.plot_channels(out / "samples" / "long.png", {"joint windows": xl[0].numpy(), "independent windows":
                       xi[0].numpy()}, channels=[0, 50, 53], fps=te["fps"])
    print(f"[discrete_diffusion] long: {lg_len / te['fps']:.1f} s listener; frame-step at window boundaries / mean: "
          f"joint {seam_ratio(xl[0].numpy(), T):.2f}, independent windows {seam_ratio(xi[0].numpy(), T):.2f}, "
          f"GT {seam_ratio(lg[0, :lg_len].numpy(), T):.2f}")
    # Timings: one 8-s listener (batch 1, default sampler) and batch throughput
    ls8, lf8, lw8, lb8, _ = concat_segments(te, max(1, math.ceil(8 * te["fps"] / Ts)))
    n8 = (8 * te["fps"]) // vq.r * vq.r
    one = lambda S, B=1: sample_long(model, vq, ls8[:, :n8].expand(B, -1, -1), lf8[:, :4 * n8].expand(B, -1, -1),
                                     lw8 * B, lb8.expand(B, -1), T, te["fps"], S, r, gen)
    nb = cfg.time_batch
    t1, tf = timed(lambda: one(steps), cfg.time_runs), timed(lambda: one(10), cfg.time_runs)
    tb = timed(lambda: one(steps, nb), n=1)
    print(f"[discrete_diffusion] timing on {device} ({torch.get_num_threads()} threads): one 8-s listener "
          f"{t1:.3f} s ({steps or model.T} steps; target <= 0.25 s), fast sampler 10 steps {tf:.3f} s, "
          f"batch {nb}: {tb:.2f} s = {nb / tb:.1f} 8-s listeners/s")
    rows["model"].update({"sec_per_8s_sample": t1, "sec_per_8s_sample_fast10": tf, f"samples_per_s_batch{nb}": nb / tb})
    metrics.write_metrics_json(rows, out / "metrics.json")
    print(metrics.format_table(rows, ["mse/all", "fd/all", "pfd/all", "var_pred/all", "div_pred/all", "affect_l2"]))
    return rows


def main(argv=None, mode="train"):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["sample"], ["train"]):
        mode, argv = argv[0], argv[1:]
    cfg = parse_config(argv)
    return train(cfg) if mode == "train" else sample(cfg)


if __name__ == "__main__":
    main()
