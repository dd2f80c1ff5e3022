"""discrete_diffusion.py: DiffListener, a listener's whole reaction window at once by discrete diffusion over VQ tokens.

A fusion network turns the speaker's face, its frame-to-frame differential, MFCC audio and the transcript into a
per-frame representation R^S. A mask-and-replace discrete diffusion (T = 100 steps) over the listener's motion tokens
(K codes + [MASK]) starts from all-[MASK] and denoises the whole window at once, conditioned on R^S; the VQ-VAE
decoder (vqvae.py, the only method file imported: tokens, K, r and the decoder come from its checkpoint) turns the
tokens back into 3DMM motion. Longer conversations: half-overlapping windows are denoised jointly, each token's p(x0)
averaged over the windows that cover it (MultiDiffusion, arXiv 2302.08113), so a window boundary is no seam.

Papers: DiffListener (ICASSP 2025) arXiv 2502.06822; VQ-Diffusion arXiv 2111.14822 (process, x0-parameterised
denoiser, truncation) and 2205.16007; D3PM arXiv 2107.03006. Data: `trevor` by default, the twin of L2L-trevor, the
LM-Listener segments DiffListener trained on (one listener, many guests); the text vocabulary is the training split's
words, stored in the checkpoint. Truncation as VQ-Diffusion's sampler: top-r codes up to and including the one that
crosses r = 0.86, renormalised.
The codec: the naive VQ-VAE with K = 256 codes and per-channel std, as the paper (vqvae.py `--norm none,none
--scale channel`); vqvae.py's own default, one std for all channels, reconstructs far better (val floor FD 0.17 vs
0.39) but this model on it scored worse (test FD 0.550 vs 0.484 at K = 128): its lively samples miss the timing.
The paper's configuration (train.py's `discrete_diffusion_paper` run): T = 100 steps sampled one by
one (`--sample-steps 0`), mask-and-replace as the VQ-Diffusion paper describes it (`--replace-mass 0.1 --mask-end
0.9`: 10 % uniform replacement by t = T, 90 % masked), no listener identity (`--no-identity`: one listener), the
fusion per frame (`--fuse-stride 1`). Our defaults differ in: 20 exact-jump sampling steps (5x faster, the 0.25 s
budget of an 8-s listener); the released VQ-Diffusion schedule (mask-only in effect: replace mass 1e-6); the
fusion reads patches of `fuse_stride` = 4 frames (CPU speed); the denoiser is told who listens (Linear(listener
beta) added to the timestep embedding; a constant on trevor, needed on multi-listener data where the paper trains
one model per listener). Also ours: cosine lr decay; no importance sampling of t, no weight EMA. Substitute: BERT
-> a word encoder trained from scratch (no pretrained weights ship with the repo).

Shapes: B batch, T frames (30 fps), L tokens (= T / r), K codes ([MASK] = index K), D = 56 motion dims, F audio
features (4 rows per frame), N words, W windows, d model width.

    python discrete_diffusion.py --preset smoke            # seconds: trevor-tiny, a tiny model (runs/..-smoke)
    python discrete_diffusion.py                           # default, trevor (trains <out>/vq/ckpt.pt first if missing)
    python discrete_diffusion.py sample                    # metrics table, npy + GIF + PNG, long conversation, timing
                                                           # (ablations are runs with flags, e.g. --no-text)
    torchrun --standalone --nproc_per_node 2 discrete_diffusion.py --preset smoke   # data-parallel (DDP)
"""
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from tqdm import tqdm

import data
import metrics

METHOD = "discrete_diffusion"
LOG_EPS = -70.0  # log-probabilities are clamped here (VQ-Diffusion), also the pinned [MASK] logit


# ----------------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Config:
    data: str = "trevor"                  # listener data folder or twin (trevor: L2L-trevor's twin; "": the world)
    out: str = "runs/discrete_diffusion"  # output folder: ckpt.pt, config.json, samples/, metrics.json
    preset: str = "default"               # smoke | default | full
    vq: str = ""                          # VQ-VAE checkpoint ("" = <out>/vq/ckpt.pt, trained there first if missing)
    steps: int = 3000                     # optimiser steps
    batch_size: int = 32                  # windows per step, all torchrun processes together (full: 64)
    lr: float = 1e-3                      # peak learning rate of AdamW (VQ-Diffusion: 2e-4)
    warmup: int = 100                     # steps of linear warm-up, then cosine decay to lr / 10 (VQ-Diffusion: 1000)
    weight_decay: float = 4.5e-2          # AdamW weight decay (VQ-Diffusion: 4.5e-2)
    clip_frames: int = 64                 # training window in frames, a multiple of the VQ's r (full: 240 = 8 s)
    crop_stride: int = 8                  # frames between training crops (tokens are cached per crop)
    d_model: int = 128                    # width d of fusion and denoiser (full: 512)
    n_layers: int = 4                     # denoiser blocks (full: 12)
    n_heads: int = 4                      # attention heads (full: 8)
    n_fuse: int = 1                       # self-attention layers after the cross-modal fusion
    fuse_stride: int = 4                  # frames per fusion position (1 = per frame, the full preset)
    text_layers: int = 1                  # word-encoder Transformer layers (full: 2)
    d_text: int = 64                      # word-encoder width (full: 256)
    n_mfcc: int = 40                      # MFCC coefficients, 4 rows per frame (full: 128)
    dropout: float = 0.1                  # dropout in attention and MLPs
    diffusion_steps: int = 100            # T of the diffusion (paper: 100)
    mask_end: float = 0.99999             # gamma_bar_T, the final mask probability (VQ-Diffusion code; its paper: 0.9)
    replace_mass: float = 1e-6            # K * beta_bar_T (VQ-Diffusion code: 1e-6; its paper: 0.1; 0 = absorbing)
    aux_weight: float = 5e-4              # lambda of the auxiliary x0 cross-entropy (VQ-Diffusion: 5e-4)
    truncation: float = 0.86              # top-r truncation of p(x0) when sampling (VQ-Diffusion: 0.86; 1.0 = off)
    sample_steps: int = 20                # reverse steps when sampling (0 = all T, ancestral; < T: exact jumps)
    diff: bool = True                     # use the facial differential (--no-diff: DiffListener's ablation)
    text: bool = True                     # use the transcript (--no-text: DiffListener's ablation)
    identity: bool = True                 # [ours] condition on the listener's shape beta (--no-identity: ablation)
    eval_every: int = 500                 # steps between validation samples and checkpoints
    n_eval: int = 64                      # validation windows scored while training
    n_samples: int = 3                    # sample mode: seeds per test window (row = mean, std printed)
    max_test: int = 0                     # sample mode: cap on test windows (0 = all)
    long_seconds: float = 60.0            # sample mode: length of the long-conversation demo in seconds
    time_runs: int = 3                    # sample mode: timed repeats (median) of one 8-s listener
    time_batch: int = 32                  # sample mode: batch size of the throughput timing
    device: str = "auto"                  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "float32"                # float32 | bfloat16 | float16 (autocast; float16 adds a grad scaler)
    compile: bool = False                 # torch.compile the training model (checkpoints stay uncompiled)
    seed: int = 0                         # seed of every random stream
    resume: bool = False                  # continue from <out>/ckpt.pt (weights, optimiser, random streams, step)
    ckpt: str = ""                        # sample mode: checkpoint ("" = <out>/ckpt.pt)
    split: str = "test"                   # sample mode: split to evaluate (train | val | test)


PRESETS = {
    "smoke": dict(out="runs/discrete_diffusion-smoke", steps=60, batch_size=8, clip_frames=32, crop_stride=16,
                  d_model=32, n_layers=1, n_heads=2, d_text=16, n_mfcc=20, eval_every=30, n_eval=8, n_samples=1,
                  max_test=8, long_seconds=8.0, time_runs=1, time_batch=4, warmup=10),
    "default": {},
    "full": dict(fuse_stride=1, steps=100_000, batch_size=64, lr=2e-4, warmup=1000, clip_frames=240, d_model=512,
                 n_layers=12, n_heads=8, n_fuse=1, text_layers=2, d_text=256, n_mfcc=128, eval_every=5000, n_eval=256),
}
POSITIVE = ["steps", "batch_size", "lr", "clip_frames", "crop_stride", "d_model", "n_layers", "n_heads", "fuse_stride",
            "d_text", "n_mfcc", "diffusion_steps", "eval_every", "n_eval", "n_samples", "long_seconds", "time_runs",
            "time_batch"]
NON_NEGATIVE = ["warmup", "n_fuse", "text_layers", "max_test", "weight_decay", "aux_weight", "replace_mass"]


def check_config(cfg, mode):
    """A user's impossible values -> data.UserError naming the flag (the VQ's r is checked once the VQ is loaded)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rules = [*((k, getattr(cfg, k) > 0, "a positive number") for k in POSITIVE),
             *((k, getattr(cfg, k) >= 0, "a number >= 0") for k in NON_NEGATIVE),
             ("dtype", cfg.dtype in ("float32", "bfloat16", "float16"), "one of float32, bfloat16, float16"),
             ("split", cfg.split in ("train", "val", "test"), "one of train, val, test"),
             ("n_heads", cfg.d_model % max(cfg.n_heads, 1) == 0, f"a divisor of --d-model {cfg.d_model}"),
             ("d_text", cfg.d_text % max(1, cfg.d_text // 16) == 0, "a multiple of its head count, d_text // 16"),
             ("clip_frames", cfg.clip_frames % max(cfg.fuse_stride, 1) == 0, "a multiple of --fuse-stride"),
             ("sample_steps", 0 <= cfg.sample_steps <= cfg.diffusion_steps, f"0 (all) .. {cfg.diffusion_steps}"),
             ("dropout", 0 <= cfg.dropout < 1, "a probability in [0, 1)"),
             ("truncation", 0 < cfg.truncation <= 1, "a mass in (0, 1]"),
             ("mask_end", 0 < cfg.mask_end <= 1 - cfg.replace_mass, "a probability <= 1 - --replace-mass"),
             ("batch_size", mode != "train" or cfg.batch_size % world == 0, f"a multiple of the {world} processes")]
    for name, ok, want in rules:
        if not ok:
            raise data.UserError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: expected {want}")


# ----------------------------------------------------------------------------------------------------------------------
# Shared setup. This block is the same in every method file (tests/test_shared.py fails when a copy differs): it names
# this method for data.py's run-time plumbing (flags from Config, user errors, checkpoints). The rest of that plumbing
# is called as data.X where it is used: pick_device, autocast, grad_scaler, seed_all, rng_state / set_rng_state (exact
# resume), ddp_setup / is_main / shard / check_in_sync (torchrun). It expects METHOD, Config, PRESETS,
# check_config(cfg, mode) and main(argv, mode) around it.


def parse_config(argv, mode="train"):
    """Flags generated from Config (help = the field's comment); explicit flag > --preset > Config default."""
    return data.parse_config(Config, PRESETS, check_config, argv, mode, f"{METHOD}.py", __doc__)


def cli(argv=None, mode="train"):
    """`python <method>.py [sample] [flags]`: a user's mistake (data.UserError) -> one line `error: ...`, exit 2."""
    return data.cli(main, argv, mode)


def save_checkpoint(path, obj):  # atomic; records this method and the world's version (data.save_checkpoint)
    data.save_checkpoint(path, METHOD, obj)


def load_checkpoint(path, device="cpu"):  # -> the saved dict; missing, unreadable or another method's -> UserError
    return data.load_checkpoint(path, METHOD, device)


# End of the shared setup.
# ----------------------------------------------------------------------------------------------------------------------

# ----------------------------------------------------------------------------------------------------------------------
# The diffusion process (VQ-Diffusion's mask-and-replace, arXiv 2111.14822). States 0..K-1 are codes, K is [MASK].
#   one step  q(x_t | x_{t-1} = j): stay j w.p. alpha_t + beta_t, each other code beta_t, [MASK] gamma_t; [MASK] stays
#   marginal  q(x_t | x0 = k) = abar_t [x_t = k] + bbar_t on codes, gbar_t on [MASK]   (bars: cumulative)
#   reverse   p(x_s | x_t) = sum_x0 q(x_s | x_t, x0) p(x0 | x_t), the denoiser predicting p(x0 | x_t)
# ----------------------------------------------------------------------------------------------------------------------
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
    assert all(((v >= 0) & (v <= 1)).all() for v in (abar, a, K * b, g)), "schedule parameters leave [0, 1]"
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


def gumbel_argmax(probs, gen=None):
    """Draw one state per position from (unnormalised) probabilities with Gumbel-max; zero mass is never drawn."""
    u = torch.rand(probs.shape, generator=gen, dtype=torch.float64, device=probs.device)
    gumbel = -torch.log(-torch.log(u.clamp(1e-30, 1 - 1e-16)))
    logp = torch.where(probs > 0, probs.clamp_min(1e-300).log(), torch.full_like(probs, -math.inf))
    return (logp + gumbel).argmax(-1)


def q_sample(sched, x0, t, gen=None):
    """x_t ~ q(x_t | x0), the marginal above: (B, L) codes, (B,) times -> (B, L) states."""
    ab, bb, gb = (sched[k][t].view(-1, 1, 1) for k in ("abar", "bbar", "gbar"))
    codes = ab * F.one_hot(x0, sched["K"]).double() + bb               # (B, L, K)
    return gumbel_argmax(torch.cat([codes, gb.expand(*x0.shape, 1)], -1), gen)  # (B, L, K+1) -> (B, L)


def posterior(p0, x_t, t, s, sched):
    """The reverse step p(x_s | x_t) = sum_x0 q(x_s | x_t, x0) p0(x0) in closed form, float64 probability space.
    p0 (B, L, K) x0-distribution (one-hot gives the true posterior); x_t (B, L) in 0..K; t, s (B,) or int, s < t.
    Returns (B, L, K+1). It sums to p0's total mass (1 unless truncated)."""
    B, L, K = p0.shape
    t, s = torch.as_tensor(t).cpu().expand(B), torch.as_tensor(s).cpu().expand(B)
    coef = lambda v: v.view(B, 1, 1).to(p0.device)                     # (B,) -> (B, 1, 1)
    ab_t, bb_t, gb_t, ab_s, bb_s, gb_s = (coef(sched[k][i]) for i in (t, s) for k in ("abar", "bbar", "gbar"))
    a_ts, b_ts, g_ts = (coef(v) for v in jump_params(sched, t, s))
    # masked x_t: stay masked w.p. gbar_s/gbar_t, else code j w.p. (gamma_ts/gbar_t)(abar_s p0_j + bbar_s)
    # (bbar_s is weighted by sum(p0), the mass of the reverse sum, so a truncated p0 keeps its exact meaning)
    from_mask = torch.cat([g_ts / gb_t * (ab_s * p0 + bb_s * p0.sum(-1, keepdim=True)),
                           torch.ones_like(p0[..., :1]) * (gb_s / gb_t)], -1)  # (B, L, K+1)
    k = F.one_hot(x_t.clamp(max=K - 1), K).double()                    # (B, L, K) one-hot of an unmasked x_t
    if sched["absorbing"]:
        from_code = k                                                  # beta = 0: x_t = k means x0 = k, copy it
    else:
        # unmasked x_t = k: Bayes, p(j) = q(x_t = k | x_s = j) sum_i q(x_s = j | x0 = i) p0_i / q(x_t = k | x0 = i)
        w = p0 / (ab_t * k + bb_t)                                     # p0_i / q(x_t = k | x0 = i)
        u = ab_s * w + bb_s * w.sum(-1, keepdim=True)                  # sum_i w_i q(x_s = j | x0 = i)
        from_code = (a_ts * k + b_ts) * u                              # times q(x_t = k | x_s = j)
    from_code = torch.cat([from_code, torch.zeros_like(from_code[..., :1])], -1)  # [MASK] cannot precede a code
    return torch.where((x_t == K)[..., None], from_mask, from_code)


def truncate(p0, r):
    """VQ-Diffusion's top-r truncation of p(x0): the codes in order of probability up to and including the one whose
    cumulative mass reaches r (a code is kept when the mass before it is < r, so top-1 always is), renormalised to
    mass 1. VQ-Diffusion sets the dropped log-probs to -70 and samples the unnormalised posterior by Gumbel-max;
    its posterior scales every state, [MASK] included, by the kept mass, so the draw is that of the renormalised
    p(x0): the same chance of unmasking as untruncated, only the codes change. p0 (..., K) -> (..., K)."""
    if r >= 1.0:
        return p0
    sp, order = p0.sort(-1, descending=True)
    keep_sorted = sp.cumsum(-1) - sp < r                               # mass before the code < r
    kept = p0 * torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return kept / kept.sum(-1, keepdim=True)


def diffusion_loss(logits, x0, x_t, t, sched, aux_weight):
    """VQ-Diffusion's loss L = T * mean_positions(L_t + lambda * w(t) * CE(x0, p0)), w(t) = 2 - (t-1)/T, t ~ U{1..T}.
    L_t = KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) for t >= 2, the decoder NLL -log p(x0|x_1) for t = 1."""
    T, K = sched["T"], sched["K"]
    logp0 = F.log_softmax(logits.double(), -1)                         # (B, L, K) log p(x0 | x_t)
    p_model = posterior(logp0.exp(), x_t, t, t - 1, sched)             # (B, L, K+1) the reverse step
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


# ----------------------------------------------------------------------------------------------------------------------
# Networks: attention blocks, audio and text encoders, the fusion network, the denoiser
# ----------------------------------------------------------------------------------------------------------------------
def sinusoid(pos, dim):
    """Sinusoidal embedding of (possibly negative, fractional) positions: (...) -> (..., dim)."""
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, device=pos.device) / dim)  # (dim/2,)
    ang = pos.float()[..., None] * freq                                # (..., dim/2)
    return torch.cat([ang.sin(), ang.cos()], -1)


def facial_differential(x):
    """DiffListener's facial differential F^S_Delta: Delta_t = F_t - F_{t-1}, Delta_1 = 0. (B, T, D) -> (B, T, D)."""
    return torch.cat([torch.zeros_like(x[:, :1]), x[:, 1:] - x[:, :-1]], 1)


class Attention(nn.Module):
    """Multi-head attention with scaled_dot_product_attention; K/V can be precomputed once per condition."""

    def __init__(self, d, heads, dropout):
        super().__init__()
        self.h, self.drop = heads, dropout
        self.q, self.kv, self.o = nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(d, d)

    def kv_of(self, ctx):                                              # (B, M, d) -> 2 x (B, h, M, d/h)
        return tuple(rearrange(z, "b m (h e) -> b h m e", h=self.h) for z in self.kv(ctx).chunk(2, -1))

    def forward(self, x, ctx=None, keep=None, kv=None):
        q = rearrange(self.q(x), "b n (h e) -> b h n e", h=self.h)     # (B, h, N, d/h)
        k, v = kv if kv is not None else self.kv_of(x if ctx is None else ctx)
        mask = None if keep is None else keep[:, None, None, :]         # (B, 1, 1, M) True = attend
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.drop if self.training else 0.0)
        return self.o(rearrange(y, "b h n e -> b n (h e)"))            # (B, h, N, d/h) -> (B, N, d)


class Block(nn.Module):
    """Pre-LN attention + MLP: h = x + Attn(LN x, LN ctx); h + MLP(LN h). cross=False: self-attention (no ctx)."""

    def __init__(self, d, heads, dropout, cross=False):
        super().__init__()
        self.ln_x, self.ln_c, self.ln_m = nn.LayerNorm(d), nn.LayerNorm(d) if cross else None, nn.LayerNorm(d)
        self.attn = Attention(d, heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.Dropout(dropout))

    def forward(self, x, ctx=None, keep=None):
        x = x + self.attn(self.ln_x(x), None if ctx is None else self.ln_c(ctx), keep)
        return x + self.mlp(self.ln_m(x))


class AudioEncoder(nn.Module):
    """MFCC rows at 4 per frame -> one vector per frame. Conv k5 s2, k5 s2, k5 s1, k3 dilation 2 (width d/2, the
    last to d): receptive field 45 rows = 0.375 s at 120 Hz."""

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
    """R^S: e = Lin_F(F) + Lin_D(Delta) + PE -> CM1 (attend to audio) -> CM2 (attend to words) -> n_fuse
    self-attention layers. With fuse_stride s > 1 [ours, CPU speed] Lin_F / Lin_D see patches of s frames (a linear
    map of the patch, so no frame is averaged away) and R^S has T/s positions; PEs stay in frame units."""

    def __init__(self, cfg, n_feat, n_words, D=56):
        super().__init__()
        d, h, p, s = cfg.d_model, cfg.n_heads, cfg.dropout, cfg.fuse_stride
        self.s, self.d = s, d
        self.lin_f = nn.Conv1d(D, d, s, s)                            # = Linear(D, d) when s = 1
        self.lin_d = nn.Conv1d(D, d, s, s) if cfg.diff else None
        self.audio, self.cm1 = AudioEncoder(n_feat, d), Block(d, h, p, cross=True)
        self.text = TextEncoder(n_words, cfg.d_text, d, cfg.text_layers, max(1, cfg.d_text // 16), p) if cfg.text \
            else None
        self.cm2 = Block(d, h, p, cross=True) if cfg.text else None
        self.fuse = nn.ModuleList(Block(d, h, p) for _ in range(cfg.n_fuse))

    def forward(self, spk, diff, feat, words, end):
        B, T, _ = spk.shape
        assert T % self.s == 0, f"T = {T} must be a multiple of fuse_stride = {self.s}"
        pe = sinusoid(torch.arange(T // self.s, device=spk.device) * self.s + (self.s - 1) / 2, self.d)  # (T/s, d)
        e = self.lin_f(spk.transpose(1, 2)).transpose(1, 2) + pe      # (B, T, D) -> (B, T/s, d)
        if self.lin_d is not None:
            e = e + self.lin_d(diff.transpose(1, 2)).transpose(1, 2)   # the facial differential, additive
        a = F.avg_pool1d(self.audio(feat).transpose(1, 2), self.s).transpose(1, 2)  # (B, T/s, d)
        e = self.cm1(e, a + pe)                                        # CM1: frames attend to audio frames
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
    """Fusion + x0-parameterised denoiser p(x0 | x_t, t, R^S) (VQ-Diffusion's Text2ImageTransformer, shrunk)."""

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
        for name, n in [("spk_mean", D), ("spk_std", D), ("diff_std", D), ("feat_mean", n_feat), ("feat_std", n_feat),
                        ("beta_mean", D_id), ("beta_std", D_id)]:     # conditioning statistics (train split, set_stats)
            self.register_buffer(name, torch.full((n,), float(name.endswith("_std"))))
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
        R = self.fusion(spk, diff, feat, words, end)                   # (B, T/s, d)
        ident = None
        if self.ident is not None:
            assert beta is not None, "this model is conditioned on the listener identity: pass beta"
            ident = self.ident((beta.to(R) - self.beta_mean) / self.beta_std)  # (B, d)
        return [blk.cross.kv_of(blk.ln_c(R)) for blk in self.blocks], ident

    def denoise(self, x_t, t, cond):
        """x_t (B, L) in 0..K, t (B,) in 1..T, cond from condition() -> logits (B, L, K) of p(x0 | x_t)."""
        B, L = x_t.shape
        kv, ident = cond
        h = self.tok(x_t) + self.pos(torch.arange(L, device=x_t.device))  # (B, L, d)
        temb = self.temb(t - 1) + (0 if ident is None else ident)     # (B, d): AdaLN sees time and who listens
        for blk, kv_b in zip(self.blocks, kv):
            h = blk(h, temb, kv_b)
        return self.head(h)                                            # (B, L, K)

    def forward(self, x_t, t, spk, feat, words, end, beta=None):
        """Training: condition and denoise in one call (what DistributedDataParallel wraps)."""
        return self.denoise(x_t, t, self.condition(spk, feat, words, end, beta))

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
            logits = self.denoise(xw, torch.full((batch * W,), t, device=dev), kv)
            pw = F.softmax(logits.double(), -1).view(batch, W * L, K)  # (B, W*L, K)
            p0 = torch.zeros(batch, n_tokens, K, dtype=torch.float64, device=dev).index_add_(1, idx, pw)
            p0 = truncate(p0 / count[None, :, None], r)                # (B, N, K) mean over windows, top-r
            x = gumbel_argmax(posterior(p0, x, t, s, self.sched), gen)  # x_s ~ p(x_s | x_t), exact jump t -> s
        assert (x < K).all(), "a [MASK] survived the last step"
        return x


def window_starts(n_tokens, L, hop):
    """Token starts of overlapping windows covering n_tokens (the last one flush with the end)."""
    if n_tokens <= L:
        return [0]
    starts = list(range(0, n_tokens - L + 1, hop))
    return starts if starts[-1] == n_tokens - L else starts + [n_tokens - L]


@torch.no_grad()
def sample_long(model, vq, spk, feat, words, beta, T_win, fps, steps=None, r=0.86, gen=None, hop=None):
    """Listener for speaker streams longer than the training window: windows of T_win frames every `hop` tokens
    (default half a window) are denoised jointly (DiffListener.sample averages p(x0) over the windows covering a
    token), then the whole token sequence is decoded at once. spk (B, Tall, D) raw, feat (B, 4 Tall, F), words: B
    lists of (text, end_s). -> tokens (B, N), motion (B, N r, D) raw."""
    dev, (B, Tall, _) = model.pos.weight.device, spk.shape
    N, L = Tall // vq.r, T_win // vq.r
    starts = window_starts(N, L, hop or max(1, L // 2))
    c0 = [s * vq.r for s in starts]                                    # window starts in frames
    wins = data.stream_windows(spk, feat, words, c0, T_win, fps, model.word_ids)  # (B*W, T_win, D), ... sample-major
    kv = model.condition(*(v.to(dev) for v in wins), beta.repeat_interleave(len(c0), 0).to(dev))
    tok = model.sample(kv, N, starts, L, steps, r, gen, batch=B).cpu()
    return tok, vq.denormalize(vq.decode(tok, beta))


# ----------------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------------
INPUTS = ("tok", "spk", "feat", "wid", "wend", "beta")  # batch keys the training step needs (x0, then the condition)


def get_vq(cfg, data_path, training=True):
    """The VQ-VAE stage (frozen, on the CPU). Training: a missing one is trained first (the naive none,none codec,
    with this run's preset and data), one trained on other data or with another preset is a user error naming --vq.
    Sampling: the VQ the model was trained with."""
    import vqvae  # stage 1, the only method file this one imports
    if not cfg.vq:
        cfg.vq = str(Path(cfg.out) / "vq" / "ckpt.pt")
    flags = ["--data", str(data_path), "--out", str(Path(cfg.vq).parent), "--preset", cfg.preset, "--norm", "none,none",
             "--scale", "channel"] + ([] if cfg.preset == "smoke" else ["--codebook-size", "256"])  # the paper's codec
    if not Path(cfg.vq).exists() and training:
        if dist.is_initialized():  # every rank would train it, and vqvae.py ends the process group
            raise data.UserError(f"--vq {cfg.vq}: no such file; under torchrun train the VQ-VAE first "
                                 f"(python vqvae.py {' '.join(flags[2:])})")
        print(f"[discrete_diffusion] no VQ-VAE at {cfg.vq}: training the naive (none,none) one first with "
              f"`python vqvae.py {' '.join(flags)}` (pass --vq PATH to use another)", flush=True)
        vqvae.main(flags, mode="train")
    have = vqvae.load_checkpoint(cfg.vq)["config"]
    where = lambda c: Path(data.resolve_data(c["data"], "listener", c["preset"])).resolve()
    if training and (have["preset"] != cfg.preset or where(have) != Path(data_path).resolve()):
        raise data.UserError(f"--vq {cfg.vq} was trained with preset {have['preset']} on {where(have)}, this run is "
                             f"preset {cfg.preset} on {data_path}: pass --vq with a VQ-VAE of this preset and data")
    vq = vqvae.load_vqvae(cfg.vq, device="cpu")
    vq.requires_grad_(False)
    return vq


def build(cfg, meta, device):
    """The model of a checkpoint's meta; its word ids (the training split's vocabulary) travel with it."""
    if "vocab" not in meta:
        raise data.UserError("this checkpoint predates the stored text vocabulary: retrain it")
    model = DiffListener(cfg, meta["K"], meta["n_feat"], len(meta["vocab"]) + 3, meta["L"], D_id=meta["D_id"])
    model.word_ids = data.word_ids(meta["vocab"])
    return model.to(device)


def lr_at(cfg, step):
    """Linear warm-up to cfg.lr, then cosine decay to 10% (ours; VQ-Diffusion uses a plateau schedule)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    u = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(u, 1.0))))


@torch.no_grad()
def generate(model, vq, d, seg, crop, steps, r, seed, bs=128):
    """Sample the listener of windows (seg, crop): -> tokens (n, L), raw motion (n, T, D) numpy."""
    was, dev = model.training, model.pos.weight.device
    model.eval()
    gen = torch.Generator(device=dev).manual_seed(seed)
    toks, xs = [], []
    for i in range(0, len(seg), bs):
        b = data.get_batch(d, seg[i:i + bs], crop[i:i + bs])
        kv = model.condition(*(b[k].to(dev) for k in INPUTS[1:]))
        L = b["tok"].shape[1]
        tok = model.sample(kv, L, [0], L, steps, r, gen, batch=len(b["spk"])).cpu()
        toks.append(tok)
        xs.append(vq.denormalize(vq.decode(tok, b["beta"])))
    model.train(was)
    return torch.cat(toks), torch.cat(xs).numpy()


def validate(model, vq, va, cfg, step, hist):
    """Validation L2 / FD / P-FD of sampled windows (rank 0), logged into hist."""
    vs, vc = [v[:cfg.n_eval] for v in data.all_windows(va)]
    _, pred = generate(model, vq, va, vs, vc, min(cfg.sample_steps, model.T) or None, cfg.truncation, cfg.seed)
    b = data.get_batch(va, vs, vc)
    m = metrics.listener_metrics(list(pred), list(b["lis"].numpy()), list(b["spk"].numpy()),
                                 valence_fn=data.FaceModel().valence)
    hist["val"].append(dict(step=step, **{k: m[k] for k in ("mse/all", "fd/all", "pfd/all")}))
    tqdm.write(f"step {step}: loss {np.mean(hist['loss'][-cfg.eval_every:]):.4f} | val L2 {m['mse/all']:.4f} "
               f"FD {m['fd/all']:.3f} P-FD {m['pfd/all']:.3f}")


def prepare(cfg, device):
    """Data, VQ tokens and a fresh model with the train split's conditioning statistics."""
    t0 = time.time()
    cfg.data = str(data.resolve_data(cfg.data, "listener", cfg.preset))
    vq = get_vq(cfg, cfg.data)
    if cfg.clip_frames % vq.r:
        raise data.UserError(f"--clip-frames {cfg.clip_frames}: expected a multiple of the VQ's r = {vq.r} ({cfg.vq})")
    tr = data.load_windows(cfg.data, "train", vq, cfg.clip_frames, cfg.crop_stride, cfg.n_mfcc)  # builds the vocab
    va = data.load_windows(cfg.data, "val", vq, cfg.clip_frames, cfg.clip_frames, cfg.n_mfcc, tr["vocab"])
    meta = dict(K=vq.K, r=vq.r, n_feat=tr["feat"].shape[-1], vocab=tr["vocab"], L=cfg.clip_frames // vq.r,
                D_id=tr["beta"].shape[-1])
    assert int(tr["tok"].max()) < vq.K
    model = build(cfg, meta, device)
    for k, v in data.window_stats(tr, facial_differential).items():  # the train split's conditioning statistics
        getattr(model, k).copy_(v)
    if data.is_main():
        if tr["no_audio"]:
            print(f"[discrete_diffusion] audio branch off: {tr['no_audio']} of {len(tr['n'])} train segments have no "
                  f"audio in {cfg.data} (their MFCC input is zeros)")
        print(f"[discrete_diffusion] {tr['tok'].shape[0]} train segments x {tr['tok'].shape[1]} crops of "
              f"{cfg.clip_frames} frames -> {meta['L']} tokens (K = {vq.K}); {len(tr['vocab'])} train words; "
              f"prepared in {time.time() - t0:.1f} s; "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    return vq, tr, va, meta, model


def train(cfg):
    device = data.pick_device(cfg.device)
    rank, world = data.ddp_setup(device)
    data.seed_all(cfg.seed)
    vq, tr, va, meta, model = prepare(cfg, device)
    out, step, hist = Path(cfg.out), 0, dict(loss=[], val=[])
    if data.is_main():
        print(f"[discrete_diffusion] device {device} x {world}; config {json.dumps(dataclasses.asdict(cfg))}")
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.96), weight_decay=cfg.weight_decay)
    scaler = data.grad_scaler(device, cfg.dtype)
    gen = torch.Generator().manual_seed(cfg.seed)                     # batches, t and q_sample noise (all ranks)
    if cfg.resume and (out / "ckpt.pt").exists():
        ck = load_checkpoint(out / "ckpt.pt", "cpu")                   # random states must stay on the CPU
        model.load_state_dict(ck["model"]), opt.load_state_dict(ck["optimizer"]), scaler.load_state_dict(ck["scaler"])
        step, hist = ck["step"], ck["metrics"]
        data.set_rng_state(ck["rng"], [gen])
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    net = torch.compile(net) if cfg.compile else net
    sched, t0 = model.sched, time.time()
    bar = tqdm(total=cfg.steps, initial=step, desc="discrete_diffusion", dynamic_ncols=True, mininterval=2,
               disable=not data.is_main())
    while step < cfg.steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        b = data.get_batch(tr, *data.draw_windows(tr, cfg.batch_size, gen))  # the global batch, alike on every rank
        t = torch.randint(1, model.T + 1, (cfg.batch_size,), generator=gen)  # t ~ U{1..T}
        x_t = q_sample(sched, b["tok"], t, gen)                        # x_t ~ q(x_t | x0)
        x_t, t, x0, *cond = (data.shard(v).to(device) for v in (x_t, t, *(b[k] for k in INPUTS)))  # this rank's rows
        with data.autocast(device, cfg.dtype):
            logits = net(x_t, t, *cond)                                # (B, L, K)
        loss, parts = diffusion_loss(logits.float(), x0, x_t, t, sched, cfg.aux_weight)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt), scaler.update()
        step += 1
        hist["loss"].append(data.mean_over_ranks(loss))
        bar.update(1)
        bar.set_postfix(loss=f"{hist['loss'][-1]:.3f}", vlb=f"{parts['vlb']:.3f}", ce=f"{parts['ce']:.3f}")
        if (step % cfg.eval_every == 0 or step == cfg.steps) and data.is_main():
            validate(model, vq, va, cfg, step, hist)
            save_checkpoint(out / "ckpt.pt", dict(model=model.state_dict(), optimizer=opt.state_dict(), step=step,
                                                  scaler=scaler.state_dict(), rng=data.rng_state([gen]),
                                                  config=dataclasses.asdict(cfg), metrics=hist, meta=meta))
    bar.close()
    data.check_in_sync(model)
    if data.is_main():
        print(f"[discrete_diffusion] trained to step {step} in {time.time() - t0:.1f} s; checkpoint {out / 'ckpt.pt'}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return out / "ckpt.pt"


# ----------------------------------------------------------------------------------------------------------------------
# Sampling and evaluation (the evaluation protocol itself is metrics.evaluate_diff_listener)
# ----------------------------------------------------------------------------------------------------------------------
def sample(cfg, other_data=False):
    """Load the checkpoint, sample every test window (n_samples seeds) and a long conversation, evaluate against
    GT, alt-GT and the baselines (and the rule table, on a twin), time the sampler, render, write metrics.json.
    The data are the checkpoint's unless other_data (--data given)."""
    device = data.pick_device(cfg.device)
    data.seed_all(cfg.seed)
    out, path = Path(cfg.out), Path(cfg.ckpt or Path(cfg.out) / "ckpt.pt")
    ck = load_checkpoint(path, device)
    mcfg = Config(**ck["config"])
    model = build(mcfg, ck["meta"], device)
    model.load_state_dict(ck["model"])
    model.eval()
    data_path = str(data.resolve_data(cfg.data, "listener", cfg.preset)) if other_data else mcfg.data
    vq = get_vq(mcfg, data_path, training=False)
    T, steps, r = mcfg.clip_frames, min(cfg.sample_steps, model.T) or None, cfg.truncation
    print(f"[discrete_diffusion] {path} (step {ck['step']}), data {data_path}, split {cfg.split}, K = {vq.K}, "
          f"window {T} frames, truncation r = {r}, steps {steps or model.T}")
    te, tr = (data.load_windows(data_path, split, vq, T, T, mcfg.n_mfcc, ck["meta"]["vocab"])  # the train split's words
              for split in (cfg.split, "train"))
    seg, crop = [v[:cfg.max_test or None] for v in data.all_windows(te)]
    runs = [generate(model, vq, te, seg, crop, steps, r, cfg.seed + s) for s in range(cfg.n_samples)]
    gen = torch.Generator(device=device).manual_seed(cfg.seed)

    def listen(st, hop=None, S=steps, B=1):  # a stream's listener, windows every hop tokens (None: half a window)
        return sample_long(model, vq, st["speaker"].expand(B, -1, -1), st["audio"].expand(B, -1, -1), st["words"] * B,
                           st["beta"].expand(B, -1), T, te["fps"], S, r, gen, hop)[1][0].numpy()
    return metrics.evaluate_diff_listener(te, tr, seg, crop, runs, listen, vq, out, steps=steps or model.T,
                                          long_seconds=cfg.long_seconds, time_runs=cfg.time_runs,
                                          time_batch=cfg.time_batch, device=device, seed=cfg.seed)


def main(argv=None, mode="train"):
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse_config(argv, mode)
    return train(cfg) if mode == "train" else sample(cfg, any(a.split("=")[0] == "--data" for a in argv))


if __name__ == "__main__":
    cli()
