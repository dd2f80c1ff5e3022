"""latent_diffusion.py: Latent Behavior Diffusion (LBD) for diverse listener reactions, REACT setting.

Two stages. (1) A context-aware autoencoder: a Transformer E_r compresses each w-frame window of 25-d REACT
attributes (15 AUs | valence, arousal | 8 emotion probabilities) into a latent z of v dims; a Transformer
decoder D_r turns the latents of a whole segment back into frames, and a vector-quantised branch D_f turns
them into 3DMM coefficients (our 56-d motion; 58-d on REACT). (2) A conditional latent diffusion model: an
MLP with the noisy input concatenated into every layer (Diff-AE's MLPSkipNet) denoises the *whole segment's*
latents at once, conditioned on the speaker's semantic code E_r(speaker); PLMS (orders 1-4, 1 = DDIM)
samples it, and each initial noise gives a different reaction (10 per speaker).

Papers: LBD, arXiv 2505.07901 (ICPR 2024); Diff-AE / MLPSkipNet arXiv 2111.15640; PLMS (PNDM) arXiv
2202.09778; DDIM arXiv 2010.02502; LDM arXiv 2112.10752; BeLFusion arXiv 2211.14304; REACT arXiv 2401.05166.
Nothing pretrained is needed: the features are the dataset's (the synthetic world's attribute readouts).

Deviations [ours], each said again where it happens:
  * Whole-sequence generation (issue 6): the denoiser works on the n = L/w window latents of a segment jointly
    (flattened, n*v dims) and D_r decodes all n latents together, so there are no independently sampled
    windows and no seams. Longer sequences: latent outpainting. Chunks of n windows overlap by o windows; the
    overlap latents of chunk j are already known and are imposed during sampling (replacement inpainting,
    noised to the current level), then the chunks are decoded and cross-faded over the overlap frames.
  * E_r is trained on listener windows only (as the paper) and reused, frozen, on the speaker's windows.
  * The MLPSkipNet predicts x0, not ε (`--param eps` is the paper's); the samplers use the ε it implies. With ε the
    implied x0 at t ~ T was 12x worse than the latent variance (measured) and the samples were noise: test FRCorr
    4.09, FRDist 114, FRDiv 0.132 (13x alt-GT). With x0: FRCorr 5.80, FRDist 39.5, FRDiv 0.0096 (alt-GT 0.0106).
  * The denoiser also sees the listener's shape beta (Linear, added to the speaker code): the synthetic world's
    appropriate reactions are the same listener's. Alone (with ε) it changed little (FRCorr 4.07 -> 4.09);
    x0 without it was not measured. On REACT beta is zero and this is a constant.
Shapes: B batch, K samples per speaker, T frames, L = n*w frames of a chunk, n windows, w frames per window,
  v latent dims per window, D attribute dims (25), F 3DMM dims (56 synthetic, 58 REACT).

    python latent_diffusion.py --preset smoke            # ~30 s on a CPU, tiny world
    python train.py --model latent_diffusion             # default: synthetic world, 3.5 min on 2 CPU cores
                                                         # (evaluation with the PLMS grid: ~9 min)
    python sample.py --model latent_diffusion            # 10 samples per test speaker, REACT table + PLMS grid
"""
import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import metrics


# ----------------------------------------------------------------------------------------------------------
# Config


@dataclass
class Config:
    data: str = ""                 # data folder ("" = synthetic world, generated on first use)
    out: str = "runs/latent_diffusion"  # run folder (checkpoint, config, samples, metrics)
    preset: str = "default"        # smoke | default | full
    steps: int = 0                 # if > 0: diffusion steps; AE steps = steps, D_f steps = steps // 5
    ae_steps: int = 600            # stage 1a: E_r + D_r optimiser steps
    df_steps: int = 150            # stage 1b: codebook + D_f steps (E_r frozen)
    diff_steps: int = 2000         # stage 2: MLPSkipNet steps (E_r, D_r frozen)
    window: int = 30               # w, frames per latent window (30 = 1 s at 30 fps; paper 50 at 25 fps)
    seq_windows: int = 0           # n, windows generated jointly (0 = training segment length / w)
    d_model: int = 64              # Transformer width of E_r, D_r, D_f
    layers: int = 2                # Transformer layers (paper: 2)
    heads: int = 4                 # attention heads (paper: 4)
    latent: int = 32               # v, latent dims per window
    n_z: int = 4                   # sub-vectors per window latent (D_r tokens, D_f VQ codes)
    codebook: int = 256            # K_f, D_f codebook size
    beta_vq: float = 0.25          # commitment weight, Eq. 4
    mlp_layers: int = 10           # MLPSkipNet depth (paper 10)
    mlp_hidden: int = 512          # MLPSkipNet width (paper 1024)
    dropout: float = 0.1           # MLPSkipNet dropout
    skip: str = "concat"           # concat (MLPSkipNet) | none (plain MLP ablation)
    cond: str = "speaker"          # speaker | none (unconditional sanity ablation)
    identity: bool = True          # [ours] also condition on the listener's shape beta (zeros on REACT: no-op)
    param: str = "x0"              # [ours] what the MLPSkipNet predicts: x0 (default) | eps (the paper's)
    t_train: int = 1000            # diffusion steps T
    beta_start: float = 8.5e-4     # scaled-linear schedule start (LDM)
    beta_end: float = 1.2e-2       # scaled-linear schedule end
    plms_order: int = 4            # PLMS order k (1 = DDIM)
    sample_steps: int = 50         # sampling steps S
    n_samples: int = 10            # reactions per speaker (REACT protocol: 10)
    overlap: int = 0               # windows shared by consecutive chunks of a long sequence (0 = n // 2)
    grid_orders: str = "1,2,3,4"   # PLMS orders of the Table-3 ablation ("" = no grid)
    grid_steps: str = "10,25,50,100"  # sampling steps of the Table-3 ablation
    grid_speakers: int = 25        # speakers of each Table-3 cell (evenly spaced over those scored; 0 = all)
    batch: int = 32                # batch size (segments)
    lr: float = 1e-3               # AdamW learning rate (all stages), cosine-decayed
    eval_every: int = 500          # stage 2: sample val speakers and print FRCorr / FRDiv every N steps
    eval_speakers: int = 100       # speakers scored in sample mode (evenly spaced over the split; 0 = all)
    device: str = "auto"           # auto | cpu | cuda | mps
    dtype: str = "float32"         # float32 | bfloat16 | float16 (autocast on GPU)
    seed: int = 0                  # seeds everything
    threads: int = 0               # CPU threads for torch (0 = torch's default)
    resume: bool = False           # continue from <out>/ckpt.pt
    ckpt: str = ""                 # sample mode: checkpoint (default <out>/ckpt.pt)
    split: str = "test"            # sample mode: split to evaluate


PRESETS = {
    "smoke": dict(ae_steps=40, df_steps=20, diff_steps=60, d_model=32, latent=16, n_z=2, mlp_layers=4,
                  mlp_hidden=128, batch=8, eval_every=60, eval_speakers=2, grid_orders="1,4",
                  grid_steps="10", n_samples=3, sample_steps=20),
    "default": dict(),
    "full": dict(window=50, d_model=256, latent=256, n_z=8, mlp_layers=10, mlp_hidden=1024, ae_steps=20000,
                 df_steps=4000, diff_steps=20000, lr=1e-4, batch=64),
}


def parse_args(argv, mode):
    """Config fields -> kebab-case flags; the preset fills every flag that was not given."""
    p = argparse.ArgumentParser(prog=f"latent_diffusion.py ({mode})", description=__doc__.split("\n")[0])
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool or isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=f"(default: {f.default})")
        else:
            p.add_argument(flag, type=type(f.default), default=argparse.SUPPRESS, help=f"(default: {f.default!r})")
    given = vars(p.parse_args(argv))
    preset = given.get("preset", "default")
    if preset not in PRESETS:
        p.error(f"--preset must be one of {list(PRESETS)}")
    cfg = Config(**{**PRESETS[preset], **given})
    if cfg.steps > 0:
        cfg.ae_steps, cfg.df_steps, cfg.diff_steps = cfg.steps, max(1, cfg.steps // 5), cfg.steps
    return cfg


# ----------------------------------------------------------------------------------------------------------
# Building blocks


def sinusoid(pos, dim):
    """(...,) positions or times -> (..., dim) embedding, cos half then sin half (Diff-AE timestep_embedding)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=pos.device) / half)
    args = pos.float()[..., None] * freqs                                       # (..., dim/2)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)                # (..., dim)


def split_windows(x, w):
    """(B, n*w, D) -> (B, n, w, D): the identity-preserving window split (join_windows undoes it)."""
    B, L, D = x.shape
    return x.reshape(B, L // w, w, D)


def join_windows(x):
    """(B, n, w, D) -> (B, n*w, D)."""
    B, n, w, D = x.shape
    return x.reshape(B, n * w, D)


class WindowEncoder(nn.Module):
    """E_r: Linear + sinusoidal PE -> pre-LN Transformer encoder -> mean-pool -> Linear, one latent per window."""

    def __init__(self, d_in, cfg):
        super().__init__()
        self.w, self.v = cfg.window, cfg.latent
        self.inp = nn.Linear(d_in, cfg.d_model)
        self.register_buffer("pe", sinusoid(torch.arange(cfg.window), cfg.d_model), persistent=False)
        layer = nn.TransformerEncoderLayer(cfg.d_model, cfg.heads, 2 * cfg.d_model, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.tf = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.latent)

    def forward(self, x):                                                       # (B, n*w, D)
        B, L, D = x.shape
        n = L // self.w
        h = self.inp(split_windows(x, self.w).reshape(B * n, self.w, D)) + self.pe  # (B*n, w, d_m)
        h = self.tf(h).mean(dim=1)                                              # (B*n, d_m): pool over time
        return self.out(self.norm(h)).view(B, n, self.v)                        # (B, n, v)


class CrossBlock(nn.Module):
    """Pre-LN cross-attention block: frame queries read the latent tokens, then a per-frame MLP."""

    def __init__(self, d, heads):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, q, mem):                                                  # (B, L, d), (B, M, d)
        q = q + self.attn(self.ln1(q), mem, mem, need_weights=False)[0]
        return q + self.mlp(self.ln2(q))


class SequenceDecoder(nn.Module):
    """D_r / D_f [ours; Trans-VAE-like]: the n*n_z latent tokens of a chunk (each with the sinusoid of its window's
    centre frame) pass a Transformer encoder, then all L = n*w frame queries cross-attend to them. A query is the
    sinusoid of its *absolute* frame index (no per-window reset), so every frame sees every window and the decoded
    curve has no seam at window borders. No frame-to-frame self-attention: cost O(L * n * n_z), not O(L^2)."""

    def __init__(self, d_out, cfg):
        super().__init__()
        self.w, self.n_z, d = cfg.window, cfg.n_z, cfg.d_model
        self.tok = nn.Linear(cfg.latent // cfg.n_z, d)
        self.sub = nn.Parameter(0.02 * torch.randn(cfg.n_z, d))                  # which sub-vector a token is
        layer = nn.TransformerEncoderLayer(d, cfg.heads, 4 * d, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.mix = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.qproj = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))
        self.blocks = nn.ModuleList(CrossBlock(d, cfg.heads) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, d_out)

    def pe(self, pos, d):                                                       # frame positions -> (.., d)
        return sinusoid(pos * (100.0 / self.w), d)                              # ~w frames per 100 "steps"

    def forward(self, z):                                                       # (B, n, v)
        B, n, v = z.shape
        d = self.sub.shape[1]
        centre = (torch.arange(n, device=z.device) + 0.5) * self.w             # (n,) window centres in frames
        mem = self.tok(z.view(B, n, self.n_z, v // self.n_z)) + self.sub + self.pe(centre, d)[:, None]
        mem = self.mix(mem.reshape(B, n * self.n_z, d))                         # (B, n*n_z, d)
        q = self.qproj(self.pe(torch.arange(n * self.w, device=z.device).float(), d))  # (L, d)
        q = q[None].expand(B, -1, -1)                                           # (B, L, d)
        for blk in self.blocks:
            q = blk(q, mem)
        return self.out(self.norm(q))                                           # (B, L, d_out)


class Codebook(nn.Module):
    """The D_f branch's grad-trained codebook over the n_z sub-vectors of z (Eq. 4, VQ-VAE arXiv 1711.00937)."""

    def __init__(self, K, dim, beta):
        super().__init__()
        self.codes = nn.Parameter(torch.randn(K, dim))
        self.beta = beta

    def forward(self, z_e):                                                     # (..., dim)
        flat = z_e.reshape(-1, z_e.shape[-1])                                   # (M, dim)
        idx = torch.cdist(flat, self.codes).argmin(dim=1)                       # (M,)
        z_q = self.codes[idx].view_as(z_e)                                      # (..., dim)
        loss = F.mse_loss(z_q, z_e.detach()) + self.beta * F.mse_loss(z_e, z_q.detach())  # Eq. 4, last terms
        return z_e + (z_q - z_e).detach(), idx.view(z_e.shape[:-1]), loss       # straight-through


class MLPSkipNet(nn.Module):
    """ε_θ(x_t, t, c): Diff-AE's MLPSkipNet (arXiv 2111.15640, diffae/model/latentnet.py). The noisy input is
    *concatenated* to every layer ℓ ≥ 1 (not added); conditioning is scale-only, h ⊙ (1 + s)."""

    def __init__(self, dim, hidden, n_layers, skip="concat", dropout=0.1, t_dim=64):
        super().__init__()
        self.skip, self.t_dim = skip, t_dim
        self.time = nn.Sequential(nn.Linear(t_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.cond = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        extra = dim if skip == "concat" else 0
        ins = [dim] + [hidden + extra] * (n_layers - 2)
        self.lin = nn.ModuleList(nn.Linear(i, hidden) for i in ins)
        self.emb = nn.ModuleList(nn.Linear(2 * dim, hidden) for _ in ins)      # e -> per-layer scale s
        self.norm = nn.ModuleList(nn.LayerNorm(hidden) for _ in ins)
        self.last = nn.Linear(hidden + extra, dim)                              # no norm, no condition
        self.drop = nn.Dropout(dropout)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.last.weight)                                        # [ours] ε̂ = 0 at init: loss starts at 1

    def forward(self, x, t, c):                                                 # (B, dim), (B,), (B, dim)
        e = F.silu(torch.cat([self.time(sinusoid(t, self.t_dim)), self.cond(c)], dim=-1))  # (B, 2*dim)
        h = x
        for l, (lin, emb, norm) in enumerate(zip(self.lin, self.emb, self.norm)):
            inp = x if l == 0 else (torch.cat([h, x], -1) if self.skip == "concat" else h)  # (B, H + dim)
            h = self.drop(F.silu(norm(lin(inp) * (1 + emb(e)))))                # (B, H)
        return self.last(torch.cat([h, x], -1) if self.skip == "concat" else h)  # (B, dim)


# ----------------------------------------------------------------------------------------------------------
# Diffusion: schedule, forward process, DDIM transfer, PLMS (Eq. 8)


def alphas_cumprod(T=1000, beta_start=8.5e-4, beta_end=1.2e-2):
    """Scaled-linear schedule (LDM): (T + 1,) float64 with ᾱ_0 := 1 and ᾱ_t for t = 1..T."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float64) ** 2
    return torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)])


def q_sample(x0, eps, a_t):
    """Forward process: x_t = √ᾱ_t x0 + √(1 − ᾱ_t) ε (a_t broadcastable)."""
    return a_t.sqrt() * x0 + (1 - a_t).sqrt() * eps


def predict_x0(x, eps, a_t):
    """x̂0 = (x − √(1 − ᾱ_t) ε) / √ᾱ_t."""
    return (x - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5


def transfer(x, eps, a_t, a_s):
    """φ(x, ε, t → s): the DDIM η = 0 step (arXiv 2010.02502 Eq. 12)."""
    return a_s ** 0.5 * predict_x0(x, eps, a_t) + (1 - a_s) ** 0.5 * eps


def timestep_grid(T, S):
    """τ_i = (i − 1)·c + 1 with c = T // S, i = 1..S (ascending; sampling visits it in reverse)."""
    c = T // S
    return [(i - 1) * c + 1 for i in range(1, S + 1)]


AB_COEFFS = {1: [1.0], 2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}


def plms_sample(eps_fn, x, abar, S, order, known=None):
    """PLMS (PNDM arXiv 2202.09778, CompVis form; LBD Eq. 8) from x = x_T at the grid's top time to x̂0.
    eps_fn(x, t:int) -> ε. Order 1 is DDIM η = 0; order ≥ 2 warm-starts with one pseudo improved Euler step
    (S + 1 network calls). The last step goes to ᾱ_0 = 1 (no residual noise, ControlNet PR #587).
    known = (mask, x0_known, noise): replacement inpainting, the masked entries are set to q(x0_known, t)."""
    ts = timestep_grid(len(abar) - 1, S)[::-1]                                  # descending τ_S .. τ_1
    hist = []                                                                   # past ε, newest first
    for n, t in enumerate(ts):
        s = ts[n + 1] if n + 1 < len(ts) else 0
        a_t, a_s = float(abar[t]), float(abar[s])
        if known is not None:
            mask, x0k, nk = known
            x = torch.where(mask, a_t ** 0.5 * x0k + (1 - a_t) ** 0.5 * nk, x)
        e_t = eps_fn(x, t)
        if n == 0 and order > 1:                                                # warm start: improved Euler
            e2 = eps_fn(transfer(x, e_t, a_t, a_s), s)
            e_prime = (e_t + e2) / 2
        else:                                                                   # Adams-Bashforth, m = min(k, n)
            m = min(order, len(hist) + 1)
            e_prime = sum(c * e for c, e in zip(AB_COEFFS[m], [e_t] + hist))
        x = transfer(x, e_prime, a_t, a_s)
        hist = ([e_t] + hist)[:3]
    if known is not None:
        x = torch.where(known[0], known[1], x)
    return x


# ----------------------------------------------------------------------------------------------------------
# The method: autoencoder + latent normaliser + denoiser in one module


class LBD(nn.Module):
    def __init__(self, cfg, d_attr, d_mot, n_win, d_id=100):
        super().__init__()
        self.cfg, self.n = cfg, n_win
        self.enc = WindowEncoder(d_attr, cfg)                                   # E_r
        self.dec = SequenceDecoder(d_attr, cfg)                                 # D_r
        self.vq = Codebook(cfg.codebook, cfg.latent // cfg.n_z, cfg.beta_vq)
        self.dec_f = SequenceDecoder(d_mot, cfg)                                # D_f
        self.den = MLPSkipNet(n_win * cfg.latent, cfg.mlp_hidden, cfg.mlp_layers, cfg.skip, cfg.dropout)
        self.ident = nn.Linear(d_id, n_win * cfg.latent) if cfg.identity else None  # [ours] beta -> added to c
        for name, dim in [("attr", d_attr), ("mot", d_mot), ("z", cfg.latent), ("beta", d_id)]:  # normalisers
            self.register_buffer(f"{name}_mean", torch.zeros(dim))
            self.register_buffer(f"{name}_std", torch.ones(dim))
        self.register_buffer("abar", alphas_cumprod(cfg.t_train, cfg.beta_start, cfg.beta_end))

    def znorm(self, z):                                                         # latent normaliser (diffae)
        return (z - self.z_mean) / self.z_std

    def zdenorm(self, z):
        return z * self.z_std + self.z_mean

    def decode_f(self, z):
        """z (B, n, v) -> 3DMM (B, L, F), normalised: quantise the n_z sub-vectors, then D_f."""
        B, n, v = z.shape
        zq, _, _ = self.vq(z.view(B, n, self.cfg.n_z, v // self.cfg.n_z))
        return self.dec_f(zq.view(B, n, v))

    def net(self, x, t, c, beta=None):
        """The MLPSkipNet's raw output (x̂0 or ε̂, cfg.param), c zeroed for the unconditional ablation; [ours] +
        Linear(beta_norm) for who is listening (the synthetic world's appropriate set is the same listener's)."""
        c = torch.zeros_like(c) if self.cfg.cond == "none" else c
        if self.ident is not None:
            assert beta is not None, "this model is conditioned on the listener identity: pass beta"
            c = c + self.ident((beta.to(c) - self.beta_mean) / self.beta_std)  # (B, n*v)
        return self.den(x, t, c)

    def eps(self, x, t, c, beta=None):
        """ε_θ(z̃_t, t, c) for the samplers. [ours] With param = x0 the net predicts x̂0 and ε is the one it implies,
        ε = (z̃_t − √ᾱ_t x̂0) / √(1 − ᾱ_t): an ε-net's implied x̂0 at t ≈ T is (z̃_T − √(1 − ᾱ) ε̂) / √ᾱ with
        1/√ᾱ_T ≈ 15, and the one we trained had x̂0 errors 12x the latent variance there (measured), so every
        sample started from noise-like latents."""
        out = self.net(x, t, c, beta)
        if self.cfg.param == "eps":
            return out
        a = self.abar[t.long()].to(x)[:, None]                                  # (B, 1)
        return (x - a.sqrt() * out) / (1 - a).sqrt()

    @torch.no_grad()
    def generate(self, speaker, K, order=4, S=50, generator=None, beta=None):
        """speaker (B, T, D) normalised attrs, beta (B, D_id) raw -> latents (B, K, N, v) normalised-free and
        reactions (B, K, T, D) normalised, N = ceil(T / w). T > n*w: overlapping chunks with latent outpainting."""
        B, T, D = speaker.shape
        w, n, v = self.cfg.window, self.n, self.cfg.latent
        N = max(n, -(-T // w))                                                  # windows to generate
        pad = speaker[:, -1:].expand(B, N * w - T, D)                           # repeat the last frame
        c = self.znorm(self.enc(torch.cat([speaker, pad], 1)))                  # (B, N, v)
        c = c.repeat_interleave(K, 0)                                           # (B*K, N, v)
        beta = None if beta is None else beta.repeat_interleave(K, 0)          # (B*K, D_id)
        starts = chunk_starts(N, n, self.cfg.overlap or n // 2)
        z = torch.zeros(B * K, N, v, device=speaker.device)
        done = torch.zeros(N, dtype=torch.bool, device=speaker.device)
        for a in starts:
            x = torch.randn(B * K, n * v, generator=generator, device="cpu").to(speaker.device)  # z̃_T
            cc = c[:, a:a + n].reshape(B * K, n * v)                            # (B*K, n*v)
            known = None
            if done[a:a + n].any():                                             # outpaint: impose overlap
                mask = done[a:a + n].repeat_interleave(v)[None]                 # (1, n*v)
                noise = torch.randn(B * K, n * v, generator=generator, device="cpu").to(speaker.device)
                known = (mask, z[:, a:a + n].reshape(B * K, n * v), noise)
            tt = lambda x, t: self.eps(x, torch.full((x.shape[0],), float(t), device=x.device), cc, beta)
            z[:, a:a + n] = plms_sample(tt, x, self.abar, S, order, known).view(B * K, n, v)
            done[a:a + n] = True
        z = self.zdenorm(z)                                                     # (B*K, N, v)
        y = decode_chunks(self.dec, z, n, starts, w)[:, :T]                     # (B*K, T, D)
        return z.view(B, K, N, v), y.view(B, K, T, -1)


def to_attributes(y):
    """De-normalised D_r output -> valid REACT attributes (25-d layout only): AU occurrences are binary (>= 0.5),
    valence/arousal in [-1, 1], emotion probabilities non-negative and summing to 1 [ours: the REACT features are
    binary AUs, and the sensible CCC scores a never-firing AU predicted as exactly 0 with 1, as 0.01 with 0]."""
    if y.shape[-1] != data.ATTR_DIM:
        return y
    au, va, em = y[..., :15], y[..., 15:17], y[..., 17:].clamp_min(0)
    em = em / em.sum(-1, keepdim=True).clamp_min(1e-6)
    return torch.cat([(au >= 0.5).to(y.dtype), va.clamp(-1, 1), em], -1)


def chunk_starts(N, n, overlap):
    """Window offsets of chunks of n windows covering N windows with the given overlap (last one flush)."""
    if N <= n:
        return [0]
    stride = max(1, n - overlap)
    starts = list(range(0, N - n + 1, stride))
    return starts + ([N - n] if starts[-1] != N - n else [])


def decode_chunks(decoder, z, n, starts, w):
    """Decode each chunk of n latents and cross-fade the overlapping frames linearly. z (B, N, v) -> (B, N*w, D)."""
    B, N, _ = z.shape
    out, weight = 0, torch.zeros(N * w, 1, device=z.device)
    for a in starts:
        ramp = torch.ones(n * w, 1, device=z.device)
        if len(starts) > 1:                                                     # fade in / out at chunk edges
            edge = torch.linspace(0.05, 1, (n * w) // 2, device=z.device)[:, None]
            ramp[:edge.shape[0]] = torch.minimum(ramp[:edge.shape[0]], edge) if a > 0 else 1
            ramp[-edge.shape[0]:] = torch.minimum(ramp[-edge.shape[0]:], edge.flip(0)) if a + n < N else 1
        y = decoder(z[:, a:a + n])                                              # (B, n*w, D)
        full = torch.zeros(B, N * w, y.shape[-1], device=z.device)
        full[:, a * w:(a + n) * w] = y * ramp
        out, weight[a * w:(a + n) * w] = out + full, weight[a * w:(a + n) * w] + ramp
    return out / weight


# ----------------------------------------------------------------------------------------------------------
# Data helpers


def pick_device(name):
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def load_items(path, split):
    items = data.load_listener(path, split)
    if not items:
        sys.exit(f"error: no {split} items in {path}")
    return items


def stack(items, key, T):
    """Items' (T_i, D) arrays cropped (or edge-padded) to T frames -> (M, T, D) float32 tensor."""
    out = []
    for it in items:
        a = np.asarray(it[key], np.float32)[:T]
        out.append(np.concatenate([a, np.repeat(a[-1:], T - len(a), 0)]) if len(a) < T else a)
    return torch.from_numpy(np.stack(out))


def autocast(device, dtype):
    if device.type == "cpu" or dtype == "float32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=getattr(torch, dtype))


def save_ckpt(path, obj):
    tmp = Path(str(path) + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)                                                       # atomic


def seed_all(cfg):
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)


# ----------------------------------------------------------------------------------------------------------
# Training: stage 1a (E_r, D_r), stage 1b (codebook, D_f), stage 2 (MLPSkipNet)


def train(cfg):
    seed_all(cfg)
    device = pick_device(cfg.device)
    path = Path(data.resolve_data(cfg.data, "listener", cfg.preset))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    items = load_items(path, "train")
    T_seg = min(len(it["listener_attr"]) for it in items)
    w = cfg.window
    n = cfg.seq_windows or max(1, T_seg // w)
    L = n * w
    Nw = max(n, T_seg // w)                                                     # windows kept per train segment
    ya, ca = stack(items, "listener_attr", Nw * w), stack(items, "speaker_attr", Nw * w)  # (M, Nw*w, D)
    ym = stack(items, "listener", Nw * w)                                       # (M, Nw*w, F)
    betas = betas_of(items)                                                     # (M, D_id)
    D, Fd, fps = ya.shape[-1], ym.shape[-1], int(items[0]["fps"])
    print(f"device {device} | data {path} | {len(items)} train segments, T={T_seg}, fps={fps}, D={D}, F={Fd}")
    print(f"chunk: n={n} windows x w={w} frames = {L} frames; latent {n}x{cfg.latent}={n * cfg.latent} dims")
    print(json.dumps(asdict(cfg)))
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1))

    model = LBD(cfg, D, Fd, n, betas.shape[-1]).to(device)
    model.beta_mean.copy_(betas.mean(0)), model.beta_std.copy_(betas.std(0).clamp_min(1e-4))
    betas = betas.to(device)
    both = torch.cat([ya, ca]).flatten(0, 1)
    model.attr_mean.copy_(both.mean(0)), model.attr_std.copy_(both.std(0).clamp_min(0.05))
    model.mot_mean.copy_(ym.flatten(0, 1).mean(0)), model.mot_std.copy_(ym.flatten(0, 1).std(0).clamp_min(1e-3))
    ya = ((ya.to(device) - model.attr_mean) / model.attr_std)
    ca = ((ca.to(device) - model.attr_mean) / model.attr_std)
    ym = ((ym.to(device) - model.mot_mean) / model.mot_std)
    print(f"parameters: E_r+D_r {sum(p.numel() for m in (model.enc, model.dec) for p in m.parameters()):,} | "
          f"D_f {sum(p.numel() for m in (model.vq, model.dec_f) for p in m.parameters()):,} | "
          f"MLPSkipNet {sum(p.numel() for p in model.den.parameters()):,}")

    stages = [("ae", cfg.ae_steps), ("df", cfg.df_steps), ("diff", cfg.diff_steps)]
    total = sum(s for _, s in stages)
    step, hist, log = 0, {}, {"ae": [], "df": [], "diff": []}
    ckpt_path = out / "ckpt.pt"
    ck = None
    if cfg.resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(ck["model"])
        step, log = ck["step"], ck["metrics"].get("log", log)
        print(f"resumed from {ckpt_path} at step {step}")
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed + step)

    def crop(*xs):                                                              # uniform offsets over the clip
        idx = torch.randint(len(xs[0]), (cfg.batch,), generator=gen)
        off = torch.randint(xs[0].shape[1] - L + 1, (cfg.batch,), generator=gen)
        ar = (off[:, None] + torch.arange(L)).to(device)
        return [x[idx.to(device)[:, None], ar] for x in xs]                     # each (B, L, ·)

    pbar = tqdm(total=total, initial=step, desc="LBD", dynamic_ncols=True, mininterval=2)
    t0 = time.time()
    start = 0
    for name, n_steps in stages:
        lo, hi = start, start + n_steps
        start = hi
        if step >= hi:
            continue
        params = {"ae": [*model.enc.parameters(), *model.dec.parameters()],
                  "df": [*model.vq.parameters(), *model.dec_f.parameters()],
                  "diff": list(model.den.parameters())}[name]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
        if ck is not None and ck.get("stage") == name:
            opt.load_state_dict(ck["optimizer"])
        model.train()
        if name == "df" and step == lo:                                         # codebook init from data
            with torch.no_grad():
                z = model.enc(crop(ya)[0]).reshape(-1, cfg.latent // cfg.n_z)
                model.vq.codes.copy_(z[torch.randint(len(z), (cfg.codebook,), generator=gen).to(device)])
        if name == "diff":                                                      # freeze E_r, precompute latents
            with torch.no_grad():
                zl = torch.cat([model.enc(b) for b in ya.split(256)])           # (M, Nw, v)
                zc = torch.cat([model.enc(b) for b in ca.split(256)])
                if step == lo:
                    model.z_mean.copy_(zl.flatten(0, 1).mean(0)), model.z_std.copy_(zl.flatten(0, 1).std(0) + 1e-4)
                zl, zc = model.znorm(zl), model.znorm(zc)
            tqdm.write(f"latents: |mu| {zl.mean().abs():.3f}, std {zl.std():.3f} (normalised); "
                       f"raw std {model.z_std.mean():.3f}")
        while step < hi:
            lr = cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - lo) / n_steps))  # cosine decay per stage
            for g in opt.param_groups:
                g["lr"] = lr
            with autocast(device, cfg.dtype):
                if name == "ae":                                                # L1: ‖D_r(E_r(Y)) − Y‖²
                    y, = crop(ya)
                    loss = F.mse_loss(model.dec(model.enc(y)), y)
                elif name == "df":                                              # Eq. 4 with E_r frozen
                    y, m = crop(ya, ym)
                    with torch.no_grad():
                        z = model.enc(y)                                        # (B, n, v)
                    B_ = z.shape[0]
                    zq, _, vq_loss = model.vq(z.view(B_, n, cfg.n_z, -1))
                    loss = F.mse_loss(model.dec_f(zq.view(B_, n, -1)), m) + vq_loss
                else:                                                           # Eq. 7 (x0 form: ‖z0 − x̂0‖²)
                    idx = torch.randint(len(zl), (cfg.batch,), generator=gen).to(device)
                    off = torch.randint(zl.shape[1] - n + 1, (cfg.batch,), generator=gen).to(device)
                    ar = off[:, None] + torch.arange(n, device=device)
                    z0 = zl[idx[:, None], ar].flatten(1)                        # (B, n*v)
                    c = zc[idx[:, None], ar].flatten(1)
                    t = torch.randint(1, cfg.t_train + 1, (cfg.batch,), generator=gen).to(device)
                    eps = torch.randn(z0.shape, generator=gen).to(device)
                    a_t = model.abar[t].float()[:, None]
                    out = model.net(q_sample(z0, eps, a_t), t.float(), c, betas[idx])
                    loss = F.mse_loss(out, z0 if cfg.param == "x0" else eps)   # [ours] x0 target by default
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            log[name].append(loss.item())
            pbar.update(1)
            pbar.set_postfix(stage=name, loss=f"{loss.item():.4f}", refresh=False)
            last = step == hi
            if name == "diff" and (step - lo) % cfg.eval_every == 0 or last:
                if name == "diff":
                    hist.update(quick_eval(model, cfg, path, device))
                    tqdm.write(f"step {step}: val FRCorr(mean) {hist['frcorr_mean']:.3f} FRDiv {hist['frdiv']:.4f}")
                tqdm.write(f"step {step} [{name}] loss {np.mean(log[name][-50:]):.4f} "
                           f"(first 50: {np.mean(log[name][:50]):.4f}) {time.time() - t0:.0f}s")
                save_ckpt(ckpt_path, {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                                      "stage": name, "config": asdict(cfg),
                                      "dims": dict(d_attr=D, d_mot=Fd, n_win=n, d_id=betas.shape[-1]),
                                      "data_path": str(path),
                                      "metrics": {**hist, "log": log, "train_seconds": time.time() - t0}})
    pbar.close()
    print(f"training done in {time.time() - t0:.1f}s, checkpoint {ckpt_path}")
    return model


@torch.no_grad()
def quick_eval(model, cfg, path, device, n_speakers=8):
    """Val check during stage 2: FRCorr (own GT + alternatives) and FRDiv of PLMS samples, no DTW."""
    model.eval()
    items = load_items(path, "val")[:n_speakers]
    T = min(len(it["speaker_attr"]) for it in items)
    spk = (stack(items, "speaker_attr", T).to(device) - model.attr_mean) / model.attr_std
    _, y = model.generate(spk, cfg.n_samples, cfg.plms_order, cfg.sample_steps,
                          torch.Generator().manual_seed(cfg.seed), betas_of(items).to(device))
    preds = to_attributes(y * model.attr_std + model.attr_mean).cpu().numpy()
    pool, A, _ = appropriate_pool(items, T)
    model.train()
    return {"frcorr_mean": metrics.fr_corr(preds, pool, A)["mean"], "frdiv": metrics.fr_div(preds)}


# ----------------------------------------------------------------------------------------------------------
# Sampling and evaluation


def betas_of(items):
    """Listener shape beta of each item -> (N, D_id) float32 (zeros where the data has none)."""
    return torch.stack([torch.as_tensor(np.asarray(it["listener_beta"]), dtype=torch.float32) for it in items])


def appropriate_pool(items, T):
    """Pool = each segment's GT reaction then its K alternatives; A marks a speaker's own block (DATA.md §3).
    Returns pool (M, T, D), A (N, M) bool and first (N,): the pool index of each speaker's own GT."""
    pool, owner = [], []
    for k, it in enumerate(items):
        alts = it.get("alt_listener_attr")
        block = [np.asarray(it["listener_attr"])[:T]] + ([a[:T] for a in np.asarray(alts)] if alts is not None else [])
        pool += block
        owner += [k] * len(block)
    A = np.asarray(owner)[None, :] == np.arange(len(items))[:, None]           # (N, M)
    return np.stack(pool).astype(np.float64), A, A.argmax(1)


def alt_gt_metrics(items, T, spk, fps):
    """alt-GT with leave-one-out (METRICS.md §6b): sample i = alternative i, scored against the pool without it."""
    alts = np.stack([np.asarray(it["alt_listener_attr"])[:, :T] for it in items]).astype(np.float64)  # (N, K, T, D)
    pool, A, first = appropriate_pool(items, T)
    row = metrics.react_metrics(alts, pool, spk, A, fps=fps)                    # FRDiv/FRVar/FRDvs/FRSyn
    corr, dist = [], []
    for i in range(alts.shape[1]):
        Ai = A.copy()
        Ai[np.arange(len(items)), first + 1 + i] = False                        # leave alternative i out
        corr.append(metrics.fr_corr(alts[:, i:i + 1], pool, Ai)["mean"])
        dist.append(metrics.fr_dist(alts[:, i:i + 1], pool, Ai)["mean"])
    K = alts.shape[1]
    row.update(frcorr_mean=float(np.mean(corr)), frcorr_sum=float(np.mean(corr) * K),
               frdist_mean=float(np.mean(dist)), frdist_sum=float(np.mean(dist) * K))
    return row


REACT_COLS = ["frcorr_sum", "frcorr_mean", "frdist_sum", "frdist_mean", "frdiv", "frvar", "frdvs", "frsyn", "K"]
MOTION_COLS = ["mse/all", "mse/exp", "mse/pose", "fd/all", "fd/exp", "fd/pose", "pfd/all", "var_pred/all",
               "div_pred/all"]


def evaluate(cfg):
    ckpt_path = Path(cfg.ckpt or Path(cfg.out) / "ckpt.pt")
    if not ckpt_path.exists():
        sys.exit(f"error: no checkpoint at {ckpt_path}; train first (python train.py --model latent_diffusion)")
    seed_all(cfg)
    ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    tcfg = Config(**{**ck["config"], "plms_order": cfg.plms_order, "sample_steps": cfg.sample_steps})
    device = pick_device(cfg.device)
    model = LBD(tcfg, **ck["dims"]).to(device).eval()
    model.load_state_dict(ck["model"])
    path = Path(data.resolve_data(cfg.data, "listener", cfg.preset)) if cfg.data else Path(ck["data_path"])
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    items = load_items(path, cfg.split)
    if cfg.eval_speakers and len(items) > cfg.eval_speakers:                   # evenly spaced subset
        items = [items[i] for i in np.linspace(0, len(items) - 1, cfg.eval_speakers).round().astype(int)]
    T, fps, K = min(len(it["speaker_attr"]) for it in items), int(items[0]["fps"]), cfg.n_samples
    print(f"device {device} | {len(items)} {cfg.split} speakers from {path}, T={T}, fps={fps}, K={K}")
    spk = stack(items, "speaker_attr", T).numpy().astype(np.float64)           # (N, T, D)
    gt = stack(items, "listener_attr", T).numpy().astype(np.float64)
    spk_n = (torch.from_numpy(spk).float().to(device) - model.attr_mean) / model.attr_std
    beta_all = betas_of(items).to(device)                                       # (N, D_id)

    def run(order, S, seed=cfg.seed, idx=None):                                 # -> (N, K, T, D) attrs, latents
        zs, ys = [], []
        g = torch.Generator().manual_seed(seed)
        bs = beta_all if idx is None else beta_all[idx]
        for b, bb in zip((spk_n if idx is None else spk_n[idx]).split(16), bs.split(16)):
            z, y = model.generate(b, K, order, S, g, bb)
            zs.append(z), ys.append(to_attributes(y * model.attr_std + model.attr_mean))
        return torch.cat(zs), torch.cat(ys).cpu().double().numpy()

    pool, A, _ = appropriate_pool(items, T)
    rows = {}
    react = lambda p: metrics.react_metrics(p, pool, spk, A, fps=fps)
    rows["GT"] = react(np.repeat(gt[:, None], K, 1))
    if items[0].get("alt_listener_attr") is not None:
        rows["alt-GT"] = alt_gt_metrics(items, T, spk, fps)
    train_items = load_items(path, "train")
    Tb = min(T, min(len(it["listener_attr"]) for it in train_items))
    bank_l, bank_s = stack(train_items, "listener_attr", Tb).numpy(), stack(train_items, "speaker_attr", Tb).numpy()
    bank_sm = stack(train_items, "speaker", Tb).numpy()
    N = len(items)
    rows["baseline:random"] = react(metrics.baseline_random(bank_l, N * K, T, seed=cfg.seed).reshape(N, K, T, -1))
    rows["baseline:mime"] = react(np.repeat(spk[:, None], K, 1))
    mean_fr = metrics.baseline_mean_frame(np.concatenate([bank_l, bank_s]), T)
    rows["baseline:mean_frame"] = react(np.repeat(np.asarray(mean_fr)[None, None], N, 0).repeat(K, 1))
    nn_m = metrics.baseline_nn_motion(stack(items, "speaker", T).numpy(), bank_sm, bank_l)
    rows["baseline:nn_motion"] = react(np.repeat(np.asarray(nn_m)[:, None], K, 1))

    run(cfg.plms_order, cfg.sample_steps)                                       # warm-up, then time one speaker
    times = []                                                                  # best of 3 (shared machines)
    for r in range(3):
        t0 = time.perf_counter()
        model.generate(spk_n[:1], K, cfg.plms_order, cfg.sample_steps, torch.Generator().manual_seed(r), beta_all[:1])
        times.append(time.perf_counter() - t0)
    sec = min(times)
    z, preds = run(cfg.plms_order, cfg.sample_steps)
    rows["model"] = {**react(preds), "sec_per_speaker": sec}
    print(f"sampling {K} reactions of {T / fps:.1f} s for one speaker (PLMS-{cfg.plms_order}, "
          f"{cfg.sample_steps} steps, {device}): {sec:.3f} s")

    # The 3DMM branch: quantise the sampled latents, D_f, de-normalise; L2/FD of sample 0 against the GT motion.
    with torch.no_grad():
        mot = torch.cat([model.decode_f(zb.flatten(0, 1)) for zb in z.split(8)])   # (N*K, L', F)
        mot = (mot * model.mot_std + model.mot_mean).view(N, K, -1, mot.shape[-1])[:, :, :T].cpu().numpy()
    gt_m, spk_m = stack(items, "listener", T).numpy(), stack(items, "speaker", T).numpy()
    rows["model"].update(metrics.listener_metrics(list(mot[:, 0]), list(gt_m), list(spk_m)))
    rows["GT"].update(metrics.listener_metrics(list(gt_m), list(gt_m), list(spk_m)))
    if items[0].get("alt_listener") is not None:
        alt_m = [np.asarray(it["alt_listener"])[0, :T] for it in items]
        rows["alt-GT"].update(metrics.listener_metrics(alt_m, list(gt_m), list(spk_m)))

    orders = [int(o) for o in cfg.grid_orders.split(",") if o]
    gi = np.arange(N) if not cfg.grid_speakers or cfg.grid_speakers >= N else \
        np.linspace(0, N - 1, cfg.grid_speakers).round().astype(int)           # Table-3 cells: a speaker subset
    for o in orders:                                                            # Table 3: same denoiser, FRCorr/
        for S in [int(s) for s in cfg.grid_steps.split(",") if s]:             # FRDiv/FRSyn as Tab. 3 (no FRDist:
            p = run(o, S, idx=torch.as_tensor(gi))[1]                           # its DTWs take ~1 min a row)
            rows[f"ablation:plms{o}_s{S}"] = {**metrics.react_metrics(p, pool, spk[gi], A[gi], fps=fps,
                                                                      with_dist=False), "speakers": len(gi)}
            tqdm.write(f"plms{o}_s{S}: FRCorr {rows[f'ablation:plms{o}_s{S}']['frcorr_sum']:.3f}")

    np.save(out / f"{cfg.split}_reactions.npy", preds.astype(np.float32))      # (N, K, T, D)
    np.save(out / f"{cfg.split}_3dmm.npy", mot.astype(np.float32))             # (N, K, T, F)
    metrics.write_metrics_json(rows, out / "metrics.json")
    print(f"REACT metrics, {cfg.split} split, {N} speakers, K={K}, T={T} at {fps} fps; appropriate set = GT + "
          f"alternatives; model PLMS-{cfg.plms_order} S={cfg.sample_steps}; FRCorr/FRDist sum over K (mean)")
    print(metrics.format_table(rows, REACT_COLS))
    print(f"\n3DMM branch (D_f on sample 0, raw {mot.shape[-1]}-d motion units, per {T}-frame window):")
    print(metrics.format_table({k: r for k, r in rows.items() if "mse/all" in r}, MOTION_COLS))
    it = items[0]
    data.plot_channels(out / "channels.png", {"speaker": spk[0], "GT": gt[0], **{f"sample {k}": preds[0, k]
                                                                            for k in range(min(3, K))}},
                       channels=[15, 16, 17, 18], fps=fps)
    if mot.shape[-1] == data.MOTION_DIM:                                        # the tiny face renders 56-d only
        data.render_gif(out / "reactions.gif", [spk_m[0]] + [mot[0, k] for k in range(min(3, K))],
                        [it["speaker_beta"]] + [it["listener_beta"]] * min(3, K),
                        ["speaker"] + [f"reaction {k}" for k in range(min(3, K))], fps=fps)
    print(f"wrote {out}/metrics.json, {cfg.split}_reactions.npy, {cfg.split}_3dmm.npy, channels.png, reactions.gif")
    return rows


def main(argv=None, mode="train"):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["sample"], ["train"]):
        mode, argv = argv[0], argv[1:]
    cfg = parse_args(argv, mode)
    return train(cfg) if mode == "train" else evaluate(cfg)


if __name__ == "__main__":
    main()
