"""vqvae.py: a listener-motion VQ-VAE that turns 8 frames of facial motion into one token, naive or identity-disentangled.

A 1-D conv encoder maps z-normalised 56-d listener motion (expression 50 | head rotation 3 | jaw 3) to one latent per
r = 8 frames; an EMA codebook with dead-code reset quantises it (Eq. 5: idx = argmin_j |z - c_j|^2); a conv decoder
maps tokens back to motion. The identity-disentangled variant of MMLM puts InstanceNorm in the encoder (per-sequence
channel statistics, mostly identity, are erased) and AdaIN(beta) in the decoder (the listener's shape beta puts them
back), so one code means one identity-free "atomic listener motion". `--norm` picks any Tab. 5 row.

Papers: MMLM, "LLM-driven Multimodal and Multi-Identity Listening Head Generation", CVPR 2025 (Sec. 3.2, Eq. 5, Tab. 5;
no arXiv); VQ-VAE arXiv 1711.00937; LM-Listener arXiv 2308.10897 and T2M-GPT arXiv 2301.06052 (backbone, quantiser);
Learning2Listen arXiv 2204.08451; InstanceNorm arXiv 1607.08022; AdaIN arXiv 1703.06868. No pretrained parts.
Used by discrete_diffusion.py and lm_listener.py through load_vqvae / encode / decode / normalize / denormalize.

Shapes: B batch, T frames, L = T / r tokens, D = 56 motion dims, D_id = 100 identity dims, C = d_c code dim, W width,
K codebook size, N flattened tokens.

    python vqvae.py --preset smoke                   # seconds: tiny world, writes runs/vqvae/ckpt.pt
    python train.py --model vqvae                    # default: 2000 steps on the synthetic world (2.5-3.7 min on an
                                                     # idle 2-core CPU; test FD of reconstructions 0.41, naive 0.36)
    python train.py --model vqvae --norm none,none --out runs/vqvae_naive    # the naive codebook
    python sample.py --model vqvae                   # reconstruct test clips + random walk, print the table
    python vqvae.py --table5                         # train the 5 norm configs, print the Tab. 5-style table
                                                     # (2000 steps each: 13.5 min on an idle 2-core CPU)
    python vqvae.py --tokenize                       # write <out>/tokens.pt (idx per clip of every split)

Finding on the synthetic world (see --table5): IN in the encoder erases each window's per-channel amplitude, which
here carries whether a nod/smile happens, so every normalised config reconstructs worse than (none, none) (test Rec
0.365 vs LN,LN 0.392 ... IN,IN 0.812) and IN regresses towards the identity mean; the commitment distance is lowest
with (IN, AdaIN) (0.170 vs 2.630), as in the paper, and its random walk is closer to real motion (FD 0.454 vs 0.878).
"""
import argparse
import dataclasses
import functools
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data

# ----------------------------------------------------------------------------------------------------------------------
# Config


@dataclass
class Config:
    data: str = ""                 # listener data (segments/l2l folder or world root); "" = the synthetic world
    out: str = "runs/vqvae"        # output folder: ckpt.pt, config.json, pictures, metrics.json
    preset: str = "default"        # smoke (seconds, tiny world) | default (CPU) | full (paper sizes, GPU)
    norm: str = "IN,AdaIN"         # ENC,DEC norms: none,none | LN,LN | LN,AdaLN | IN,IN | IN,AdaIN (Tab. 5)
    codebook_size: int = 128       # K, number of codes (paper 256)
    code_dim: int = 64             # d_c, code vector size (paper 512)
    width: int = 64                # W, conv channels (paper 512)
    r: int = 8                     # frames per token; a power of two (n_down = log2 r)
    depth: int = 2                 # residual units per ResStack
    dilations: str = "3,1"         # dilation of each residual unit (encoder order; the decoder reverses it)
    beta_hidden: int = 256         # hidden size of the shared MLP(beta) feeding AdaIN / AdaLN heads
    quantizer: str = "ema"         # ema (EMA codebook, paper) | grad (codebook learned by L_embed)
    reset: bool = True             # dead-code reset: codes with EMA count < 1 are replaced by batch latents
    ema_decay: float = 0.99        # mu of the EMA codebook
    commit_weight: float = 0.02    # beta_commit on L_commit
    vel_weight: float = 0.5        # lambda_vel on L_veloc
    pose_weight: float = 1.0       # alpha_pose on the head-rotation term of L_rec
    window: int = 64               # training crop length in frames (multiple of r)
    batch: int = 32                # clips per step
    steps: int = 2000              # optimiser steps
    lr: float = 1e-3               # peak learning rate (AdamW, betas 0.9/0.99, wd 0)
    warmup: int = 100              # linear warm-up steps
    grad_clip: float = 1.0         # gradient-norm clip
    eval_every: int = 500          # steps between validation + checkpoint
    max_eval: int = 256            # clips used per split for evaluation (0 = all)
    seed: int = 0                  # seeds python, numpy and torch
    device: str = "auto"           # auto -> cuda, mps, cpu
    dtype: str = "float32"         # float32 | bfloat16 | float16 (autocast; quantiser stays float32)
    resume: bool = False           # continue from <out>/ckpt.pt
    ckpt: str = ""                 # sample mode: checkpoint (default <out>/ckpt.pt)
    split: str = "test"            # sample mode: split to evaluate
    table5: bool = False           # train the five norm configs into <out>/table5/<tag>/ and print the table
    tokenize: bool = False         # encode every clip of every split into <out>/tokens.pt
    motion_dim: int = 56           # D, read from the data at train time
    beta_dim: int = 100            # D_id, read from the data at train time


PRESETS = {
    "smoke": dict(codebook_size=32, code_dim=32, width=32, depth=1, dilations="1", beta_hidden=32, batch=8,
                  steps=60, warmup=10, eval_every=60, max_eval=16),
    "default": {},
    "full": dict(codebook_size=256, code_dim=512, width=512, depth=3, dilations="9,3,1", batch=256, steps=300_000,
                 lr=2e-4, warmup=1000, eval_every=5000, max_eval=0),
}
NORMS = ["none,none", "LN,LN", "LN,AdaLN", "IN,IN", "IN,AdaIN"]
EXP, ROT, JAW = slice(0, 50), slice(50, 53), slice(53, 56)


def parse_config(argv) -> Config:
    """Flags from the dataclass; precedence: explicit flag > preset > Config default."""
    p = argparse.ArgumentParser(prog="vqvae.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool or isinstance(f.default, bool):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=f"(default {f.default})")
        else:
            p.add_argument(flag, dest=f.name, type=type(f.default), default=argparse.SUPPRESS,
                           help=f"(default {f.default!r})")
    given = vars(p.parse_args(argv))
    preset = given.get("preset", "default")
    if preset not in PRESETS:
        p.error(f"--preset must be one of {list(PRESETS)}")
    cfg = Config(**{**PRESETS[preset], **given})
    if cfg.norm not in NORMS:
        p.error(f"--norm must be one of {NORMS}")
    return cfg


# ----------------------------------------------------------------------------------------------------------------------
# Building blocks: norms, conv stacks


class Norm(nn.Module):
    """One of none | IN | LN | AdaIN | AdaLN on h (B, W, T); Ada* take s = MLP(beta) (B, H).

    AdaIN(h, beta) = (h - mu_T(h)) / sigma_T(h) * (1 + g(beta)) + b(beta)  (arXiv 1703.06868), heads zero-initialised
    so it starts as a plain IN. AdaLN is the same construction on LayerNorm (over channels) statistics."""

    def __init__(self, kind: str, width: int, hidden: int, eps: float = 1e-5):
        super().__init__()
        self.kind, self.eps = kind, eps
        if kind in ("IN", "LN"):
            self.weight, self.bias = nn.Parameter(torch.ones(width)), nn.Parameter(torch.zeros(width))
        if kind in ("AdaIN", "AdaLN"):
            self.head = nn.Linear(hidden, 2 * width)  # -> (g, b)
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, h, s=None):
        if self.kind == "none":
            return h
        affine = (self.weight, self.bias) if self.kind in ("IN", "LN") else (None, None)
        if self.kind.endswith("IN"):  # statistics over time, per channel (fused kernel)
            h = F.instance_norm(h, weight=affine[0], bias=affine[1], eps=self.eps)  # (B, W, T)
        else:  # statistics over channels, per frame
            h = F.layer_norm(h.transpose(1, 2), h.shape[1:2], affine[0], affine[1], self.eps).transpose(1, 2)
        if self.kind.startswith("Ada"):
            g, b = self.head(s).chunk(2, dim=-1)  # (B, H) -> 2 x (B, W)
            h = h * (1 + g[:, :, None]) + b[:, :, None]
        return h


def conv(cin, cout, k, stride=1, dilation=1):
    """Conv1d with replicate padding: a per-channel constant stays constant, so IN is exactly offset-invariant."""
    pad = dilation * (k - 1) // 2 if stride == 1 else 1
    return nn.Conv1d(cin, cout, k, stride, pad, dilation, padding_mode="replicate")


class ResStack(nn.Module):
    """depth units of h + Conv1x1(ReLU(N(Conv3_dil(ReLU(N(h)))))), T2M-GPT style."""

    def __init__(self, width, dilations, norm, hidden):
        super().__init__()
        self.units = nn.ModuleList()
        for d in dilations:
            self.units.append(nn.ModuleDict(dict(n1=Norm(norm, width, hidden), c1=conv(width, width, 3, dilation=d),
                                                 n2=Norm(norm, width, hidden), c2=conv(width, width, 1))))

    def forward(self, h, s=None):
        for u in self.units:
            h = h + u["c2"](F.relu(u["n2"](u["c1"](F.relu(u["n1"](h, s))), s)))  # (B, W, T)
        return h


class Encoder(nn.Module):
    """(B, D, T) -> (B, C, T/r): conv -> N -> ReLU, log2(r) x [strided conv -> N -> ResStack], conv (no norm)."""

    def __init__(self, cfg: Config, norm: str):
        super().__init__()
        W, dil = cfg.width, [int(d) for d in cfg.dilations.split(",")]
        self.inp, self.n_in = conv(cfg.motion_dim, W, 3), Norm(norm, W, 0)
        self.down = nn.ModuleList(nn.ModuleList([conv(W, W, 4, stride=2), Norm(norm, W, 0),
                                                 ResStack(W, dil, norm, 0)]) for _ in range(int(math.log2(cfg.r))))
        self.out = conv(W, cfg.code_dim, 3)

    def forward(self, x):
        h = F.relu(self.n_in(self.inp(x)))  # (B, D, T) -> (B, W, T)
        for c, n, res in self.down:
            h = res(n(c(h)))  # (B, W, T) -> (B, W, T/2)
        return self.out(h)  # (B, C, T/r)


class Decoder(nn.Module):
    """(B, C, L) -> (B, D, L*r): conv -> N -> ReLU, log2(r) x [ResStack -> upsample x2 -> conv -> N], conv ReLU conv.

    Nearest upsample + conv instead of ConvTranspose (which needed a torch patch for replicate padding in L2L)."""

    def __init__(self, cfg: Config, norm: str):
        super().__init__()
        W, dil = cfg.width, [int(d) for d in cfg.dilations.split(",")][::-1]
        H = cfg.beta_hidden if norm.startswith("Ada") else 0
        self.cond = nn.Sequential(nn.Linear(cfg.beta_dim, H), nn.SiLU()) if H else None  # shared MLP(beta)
        self.inp, self.n_in = conv(cfg.code_dim, W, 3), Norm(norm, W, H)
        self.up = nn.ModuleList(nn.ModuleList([ResStack(W, dil, norm, H), conv(W, W, 3), Norm(norm, W, H)])
                                for _ in range(int(math.log2(cfg.r))))
        self.out1, self.out2 = conv(W, W, 3), conv(W, cfg.motion_dim, 3)

    def forward(self, z, beta_n):
        s = self.cond(beta_n) if self.cond is not None else None  # (B, D_id) -> (B, H)
        h = F.relu(self.n_in(self.inp(z), s))  # (B, C, L) -> (B, W, L)
        for res, c, n in self.up:
            h = n(c(F.interpolate(res(h, s), scale_factor=2, mode="nearest")), s)  # (B, W, L) -> (B, W, 2L)
        return self.out2(F.relu(self.out1(h)))  # (B, D, T)


# ----------------------------------------------------------------------------------------------------------------------
# The quantiser (Eq. 5) with EMA codebook and dead-code reset


def straight_through(z_e, z_q):
    """Forward value z_q, gradient of z_e (arXiv 1711.00937): z_e + sg(z_q - z_e)."""
    return z_e + (z_q - z_e).detach()


def usage_stats(idx, K):
    """Pooled code usage: (entropy H in nats, perplexity exp(H), active fraction) of an int tensor of indices."""
    counts = torch.bincount(idx.reshape(-1), minlength=K).double()
    p = counts / counts.sum()
    H = float(-(p[p > 0] * p[p > 0].log()).sum())
    return H, math.exp(H), float((counts > 0).double().mean())


class Quantizer(nn.Module):
    """Nearest-code lookup; EMA update with Laplace smoothing and dead-code reset (T2M-GPT's QuantizeEMAReset)."""

    def __init__(self, K, C, mu=0.99, ema=True, reset=True, eps=1e-5):
        super().__init__()
        self.K, self.mu, self.ema, self.reset, self.eps = K, mu, ema, reset, eps
        self.codebook = nn.Parameter(torch.randn(K, C) * 0.1, requires_grad=not ema)  # (K, C)
        self.register_buffer("ema_count", torch.ones(K))  # (K,)  EMA of code counts
        self.register_buffer("ema_sum", self.codebook.detach().clone())  # (K, C) EMA of assigned-latent sums
        self.register_buffer("initted", torch.tensor(False))
        self.last_resets = 0

    def assign(self, flat):
        """Eq. 5: idx = argmin_j |z - c_j|^2, in float32.  flat (N, C) -> (N,)"""
        cb = self.codebook
        flat = flat.to(cb.dtype)  # the codebook stays float32 under autocast
        d = (flat ** 2).sum(1, keepdim=True) - 2 * flat @ cb.t() + (cb ** 2).sum(1)[None]  # (N, K)
        return d.argmin(1)

    @torch.no_grad()
    def init_from(self, flat):
        """Codebook <- K latents of the first batch, with replacement if the batch has fewer than K."""
        N = flat.shape[0]
        pick = torch.randint(N, (self.K,), device=flat.device) if N < self.K else torch.randperm(N, device=flat.device)[:self.K]
        self.codebook.data.copy_(flat[pick])
        self.ema_sum.copy_(flat[pick])
        self.ema_count.fill_(1.0)
        self.initted.fill_(True)

    @torch.no_grad()
    def update(self, flat, idx):
        """EMA: n <- mu n + (1-mu) counts, m <- mu m + (1-mu) sums, c = m / laplace(n); then dead-code reset."""
        onehot = F.one_hot(idx, self.K).to(flat.dtype)  # (N, K)
        self.ema_count.mul_(self.mu).add_(onehot.sum(0), alpha=1 - self.mu)
        self.ema_sum.mul_(self.mu).add_(onehot.t() @ flat, alpha=1 - self.mu)  # (K, C)
        n = self.ema_count.sum()
        smoothed = (self.ema_count + self.eps) / (n + self.K * self.eps) * n  # Laplace smoothing of counts
        if self.ema:
            self.codebook.data.copy_(self.ema_sum / smoothed[:, None])
        self.last_resets = 0
        if self.reset:
            dead = self.ema_count < 1.0  # (K,)
            n_dead = int(dead.sum())
            if n_dead:
                rand = flat[torch.randint(flat.shape[0], (n_dead,), device=flat.device)]  # (n_dead, C)
                self.codebook.data[dead] = rand
                self.ema_sum[dead] = rand
                self.ema_count[dead] = 1.0
            self.last_resets = n_dead

    def forward(self, z_e):
        """z_e (B, L, C) -> z_q_st (B, L, C), idx (B, L), z_q (B, L, C) (selected codes, before straight-through)."""
        B, L, C = z_e.shape
        flat = z_e.reshape(-1, C).to(self.codebook.dtype)  # (N, C): distances and EMA in the codebook's float32
        if self.training and not bool(self.initted):
            self.init_from(flat.detach())
        idx = self.assign(flat.detach())  # (N,)
        if self.training:
            self.update(flat.detach(), idx)
        z_q = self.codebook[idx].view(B, L, C)
        if self.ema:
            z_q = z_q.detach()
        z_st = straight_through(z_e.to(z_q.dtype), z_q) if self.training else z_q  # eval: decode exactly the codes
        return z_st, idx.view(B, L), z_q


# ----------------------------------------------------------------------------------------------------------------------
# The VQ-VAE and its losses


def rec_loss(x_hat, x, pose_weight=1.0):
    """(V1) L_rec = SmoothL1 on expression + alpha_pose SmoothL1 on head rotation + SmoothL1 on jaw (each a mean)."""
    f = F.smooth_l1_loss
    return f(x_hat[..., EXP], x[..., EXP]) + pose_weight * f(x_hat[..., ROT], x[..., ROT]) + f(x_hat[..., JAW], x[..., JAW])


def velocity_loss(x_hat, x):
    """(V2) L_veloc = SmoothL1(dx_hat, dx), dx_t = x_t - x_{t-1} over time (dim -2)."""
    return F.smooth_l1_loss(x_hat[..., 1:, :] - x_hat[..., :-1, :], x[..., 1:, :] - x[..., :-1, :])


class VQVAE(nn.Module):
    """Encoder (N_enc) -> Quantizer -> Decoder (N_dec, beta); motion and beta z-norm statistics live in buffers."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.enc_norm, self.dec_norm = cfg.norm.split(",")
        self.K, self.r = cfg.codebook_size, cfg.r
        assert 2 ** int(math.log2(cfg.r)) == cfg.r, "r must be a power of two"
        self.encoder, self.decoder = Encoder(cfg, self.enc_norm), Decoder(cfg, self.dec_norm)
        self.quantizer = Quantizer(cfg.codebook_size, cfg.code_dim, cfg.ema_decay, cfg.quantizer == "ema", cfg.reset)
        for name, dim, val in [("mean", cfg.motion_dim, 0.0), ("std", cfg.motion_dim, 1.0),
                               ("beta_mean", cfg.beta_dim, 0.0), ("beta_std", cfg.beta_dim, 1.0)]:
            self.register_buffer(name, torch.full((dim,), val))

    @property
    def codebook(self):
        return self.quantizer.codebook.detach()  # (K, C)

    def normalize(self, x_raw):
        return (x_raw - self.mean.to(x_raw)) / self.std.to(x_raw)

    def denormalize(self, x_norm):
        return x_norm * self.std.to(x_norm) + self.mean.to(x_norm)

    def beta_norm(self, beta_raw):
        return (beta_raw.to(self.beta_mean) - self.beta_mean) / self.beta_std  # (B, D_id)

    def encode_latent(self, x):
        B, T, D = x.shape
        assert T % self.r == 0, f"T = {T} must be a multiple of r = {self.r} (crop, don't pad)"
        return self.encoder(x.transpose(1, 2)).transpose(1, 2)  # (B, T, D) -> (B, L, C)

    def encode(self, x, beta=None):
        """x_norm (B, T, D), beta_raw (B, D_id) (unused: the encoder is beta-free) -> idx (B, T/r) int64."""
        z_e = self.encode_latent(x)  # (B, L, C)
        B, L, C = z_e.shape
        return self.quantizer.assign(z_e.reshape(-1, C)).view(B, L)

    def decode_latent(self, z_q, beta):
        return self.decoder(z_q.transpose(1, 2).to(self.quantizer.codebook.dtype), self.beta_norm(beta)).transpose(1, 2)

    def decode(self, idx, beta):
        """idx (B, L) int64, beta_raw (B, D_id) -> x_norm (B, L*r, D)."""
        return self.decode_latent(self.codebook[idx], beta)  # (B, L, C) -> (B, T, D)

    def forward(self, x, beta):
        """x_norm (B, T, D), beta_raw (B, D_id) -> dict of x_hat, idx, z_e, z_q and the losses (V1-V4)."""
        z_e = self.encode_latent(x)  # (B, L, C)
        z_st, idx, z_q = self.quantizer(z_e)
        x_hat = self.decode_latent(z_st, beta).to(x.dtype)  # (B, T, D)
        out = dict(x_hat=x_hat, idx=idx, z_e=z_e, z_q=z_q)
        out["rec"] = rec_loss(x_hat, x, self.cfg.pose_weight)
        out["vel"] = velocity_loss(x_hat, x)
        out["commit"] = F.mse_loss(z_e.to(z_q.dtype), z_q.detach())  # (V3)
        out["embed"] = F.mse_loss(z_e.to(z_q.dtype).detach(), z_q)  # (V4): no gradient path under EMA, logged only
        out["loss"] = out["rec"] + self.cfg.vel_weight * out["vel"] + self.cfg.commit_weight * out["commit"]
        if self.cfg.quantizer == "grad":
            out["loss"] = out["loss"] + out["embed"]
        return out


def load_vqvae(path, device="cpu"):
    """Rebuild a VQVAE from its checkpoint alone (config + weights + stats), in eval mode."""
    ckpt = torch.load(path, map_location=device, weights_only=True)
    model = VQVAE(Config(**ckpt["config"])).to(device)
    model.load_state_dict(ckpt["model"])
    model.quantizer.initted.fill_(True)
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------------
# Data helpers


@functools.lru_cache(maxsize=8)
def load_items(path, split):
    """data.load_listener, read once per process (train() and evaluation share the items; never mutated)."""
    return data.load_listener(path, split)


def load_split(path, split, model):
    """-> list of (x_norm (T, D), beta_raw (D_id,), item) with T cropped to a multiple of r."""
    out = []
    for it in load_items(str(path), split):
        x = torch.as_tensor(it["listener"], dtype=torch.float32)
        T = x.shape[0] - x.shape[0] % model.r
        if T >= model.r:
            out.append((model.normalize(x[:T]), torch.as_tensor(it["listener_beta"], dtype=torch.float32), it))
    return out


def random_crops(clips, batch, window, gen):
    """Random `window`-frame crops, clip and offset uniform (offsets over the whole clip). -> (B, W, D), (B, D_id)"""
    ci = torch.randint(len(clips), (batch,), generator=gen)
    xs, bs = [], []
    for i in ci.tolist():
        x, b, _ = clips[i]
        o = int(torch.randint(x.shape[0] - window + 1, (1,), generator=gen))
        xs.append(x[o:o + window])
        bs.append(b)
    return torch.stack(xs), torch.stack(bs)


def batches_by_length(clips, size=64):
    """Yield lists of clips of equal length (full clips, offset 0), in order."""
    by_len = {}
    for c in clips:
        by_len.setdefault(c[0].shape[0], []).append(c)
    for group in by_len.values():
        for i in range(0, len(group), size):
            yield group[i:i + size]


@torch.no_grad()
def evaluate(model, clips, device):
    """Tab. 5 numbers on full clips: Rec (L_rec), Commit, PPL exp(H) and H (pooled), active %; plus the recons."""
    model.eval()
    rec = commit = n = 0.0
    all_idx, recons = [], []
    for group in batches_by_length(clips):
        x = torch.stack([c[0] for c in group]).to(device)  # (B, T, D)
        beta = torch.stack([c[1] for c in group]).to(device)  # (B, D_id)
        out = model(x, beta)
        rec += float(out["rec"]) * len(group)
        commit += float(out["commit"]) * len(group)
        n += len(group)
        all_idx.append(out["idx"].reshape(-1).cpu())
        recons += list(out["x_hat"].cpu())
    H, ppl, active = usage_stats(torch.cat(all_idx), model.K)
    return dict(rec=rec / n, commit=commit / n, ppl=ppl, entropy=H, active=active), recons


# ----------------------------------------------------------------------------------------------------------------------
# Training


def setup(cfg: Config):
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if cfg.device == "auto":
        dev = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    else:
        dev = cfg.device
    return torch.device(dev)


def save_ckpt(path, model, opt, step, cfg, metrics):
    """Atomic: write a temporary file, then rename."""
    tmp = Path(str(path) + ".tmp")
    torch.save(dict(model=model.state_dict(), optimizer=opt.state_dict(), step=step, config=asdict(cfg),
                    metrics={k: float(v) for k, v in metrics.items()}), tmp)
    os.replace(tmp, path)


def plot_recon(model, clip, path, device):
    x, beta, _ = clip
    with torch.no_grad():
        x_hat = model(x[None].to(device), beta[None].to(device))["x_hat"][0].cpu()
    try:
        data.plot_channels(path, {"real": model.denormalize(x.to(device)).cpu().numpy(),
                                  "reconstruction": model.denormalize(x_hat.to(device)).cpu().numpy()},
                           channels=[0, 1, 2, 50, 51, 53])
    except Exception as e:  # a picture must never kill a training run
        tqdm.write(f"(plot skipped: {e})")


def train(cfg: Config):
    device = setup(cfg)
    path = data.resolve_data(cfg.data, "listener", preset="tiny" if cfg.preset == "smoke" else "default")
    cfg.data = str(path)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    train_items = load_items(str(path), "train")
    cfg.motion_dim = int(train_items[0]["listener"].shape[1])
    cfg.beta_dim = int(np.asarray(train_items[0]["listener_beta"]).shape[0])
    print(f"device {device} | config {json.dumps(asdict(cfg))}")
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))

    model = VQVAE(cfg).to(device)
    mean, std = data.load_stats(path)
    model.mean.copy_(torch.as_tensor(mean[:cfg.motion_dim]))
    model.std.copy_(torch.as_tensor(std[:cfg.motion_dim]).clamp_min(1e-6))
    betas = torch.stack([torch.as_tensor(it["listener_beta"], dtype=torch.float32) for it in train_items])
    model.beta_mean.copy_(betas.mean(0))
    model.beta_std.copy_(torch.where(betas.std(0) > 1e-6, betas.std(0), torch.ones(())))
    model.cpu()
    train_clips = [c for c in load_split(path, "train", model) if c[0].shape[0] >= cfg.window]
    val_clips = load_split(path, "val", model)[: cfg.max_eval or None]
    assert train_clips, f"no training clip of >= {cfg.window} frames in {path}"
    model.to(device)

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    step, metrics = 0, {}
    if cfg.resume and (out / "ckpt.pt").exists():
        ck = torch.load(out / "ckpt.pt", map_location=device, weights_only=True)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        step, metrics = ck["step"], ck["metrics"]
        print(f"resumed from step {step}")
    gen = torch.Generator().manual_seed(cfg.seed + step)
    amp = dict(device_type=device.type, dtype=getattr(torch, cfg.dtype), enabled=cfg.dtype != "float32")
    scaler = torch.amp.GradScaler(enabled=cfg.dtype == "float16" and device.type == "cuda")

    bar = tqdm(range(step, cfg.steps), initial=step, total=cfg.steps, desc="vqvae", dynamic_ncols=True)
    first_rec = None
    for step in bar:
        for g in opt.param_groups:  # linear warm-up, then constant (the paper's x0.05 decay at 200k is full-only)
            g["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup) * (0.05 if step >= 200_000 else 1.0)
        x, beta = random_crops(train_clips, cfg.batch, cfg.window, gen)
        model.train()
        with torch.autocast(**amp):
            o = model(x.to(device), beta.to(device))
        opt.zero_grad(set_to_none=True)
        scaler.scale(o["loss"]).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        scaler.step(opt)
        scaler.update()
        H, ppl, active = usage_stats(o["idx"], cfg.codebook_size)
        first_rec = first_rec if first_rec is not None else float(o["rec"].detach())
        bar.set_postfix(rec=f"{o['rec'].item():.3f}", vel=f"{o['vel'].item():.3f}", commit=f"{o['commit'].item():.3f}",
                        ppl=f"{ppl:.1f}", act=f"{active:.0%}", resets=model.quantizer.last_resets)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            val, _ = evaluate(model, val_clips, device) if val_clips else ({}, None)
            metrics = {**{f"val_{k}": v for k, v in val.items()}, "train_rec": float(o["rec"].detach()),
                       "train_rec_first": first_rec}
            tqdm.write(f"step {step + 1}: " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            plot_recon(model, (val_clips or train_clips)[0], out / "recon.png", device)
            save_ckpt(out / "ckpt.pt", model, opt, step + 1, cfg, metrics)
    print(f"wrote {out / 'ckpt.pt'}")
    return model, metrics


# ----------------------------------------------------------------------------------------------------------------------
# Sampling: reconstruction, random walk over the codebook, Tab. 5


@torch.no_grad()
def tokens_of(model, clips, device):
    """Full clips at offset 0 -> list of idx (L,) int64."""
    toks = []
    for group in batches_by_length(clips):
        x = torch.stack([c[0] for c in group]).to(device)
        toks += list(model.encode(x).cpu())
    return toks


@torch.no_grad()
def evaluate_ckpt(ckpt, split="test", data_path=None, device="cpu", max_eval=256, seed=0, out=None):
    """rows {model, baseline:random_walk, GT, alt-GT} in raw units + the Tab. 5 numbers of one checkpoint."""
    import metrics
    model = load_vqvae(ckpt, device)
    path = data_path or model.cfg.data
    clips = load_split(path, split, model)[: max_eval or None]
    tab, recons = evaluate(model, clips, device)
    train_ids = {it["listener_id"] for it in load_items(str(path), "train")}
    unseen = [c for c in clips if c[2]["listener_id"] not in train_ids]
    if unseen:
        tab["rec_unseen"] = evaluate(model, unseen, device)[0]["rec"]
    gts = [model.denormalize(c[0]).numpy() for c in clips]
    spk = [np.asarray(c[2]["speaker"])[: g.shape[0]] for c, g in zip(clips, gts)]
    preds = [model.denormalize(r).numpy() for r in recons]
    # random walk over the codebook: bigram fitted on full-clip train tokens, decoded with each clip's own beta
    train_toks = [t.numpy() for t in tokens_of(model, load_split(path, "train", model), device)]
    walk = []
    for i, c in enumerate(clips):
        codes = metrics.baseline_random_walk_codes(train_toks, 1, c[0].shape[0] // model.r, model.K, seed=seed + i)
        x_w = model.decode(torch.as_tensor(codes, device=device), c[1][None].to(device))[0]  # (T, D)
        walk.append(model.denormalize(x_w).cpu().numpy())
    rows = {"GT": metrics.listener_metrics(gts, gts, spk), "model": metrics.listener_metrics(preds, gts, spk),
            "baseline:random_walk": metrics.listener_metrics(walk, gts, spk)}
    alt = [(np.asarray(c[2]["alt_listener"][0])[: g.shape[0]], g, s) for c, g, s in zip(clips, gts, spk)
           if c[2].get("alt_listener") is not None]
    if alt:
        rows["alt-GT"] = metrics.listener_metrics(*map(list, zip(*alt)))
    rows["model"].update(tab)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        np.save(out / "recon.npy", np.stack(preds[:8]) if len({p.shape for p in preds[:8]}) == 1 else preds[0])
        np.save(out / "random_walk.npy", walk[0])
        b = clips[0][1].numpy()
        data.plot_channels(out / "recon_test.png", {"real": gts[0], "reconstruction": preds[0],
                                                    "random walk": walk[0]}, channels=[0, 1, 2, 50, 51, 53])
        data.render_gif(out / "recon_test.gif", [gts[0], preds[0], walk[0]], [b, b, b],
                        ["real", "reconstruction", "random walk"])
    return rows


def sample(cfg: Config):
    import metrics
    device = setup(cfg)
    out = Path(cfg.out)
    ckpt = cfg.ckpt or str(out / "ckpt.pt")
    rows = evaluate_ckpt(ckpt, cfg.split, cfg.data or None, device, cfg.max_eval, cfg.seed, out)
    print(metrics.format_table(rows))
    metrics.write_metrics_json(rows, out / "metrics.json")
    print(f"wrote {out / 'metrics.json'}, {out / 'recon_test.png'}, {out / 'recon_test.gif'}")
    return rows


def table5(cfg: Config):
    """Train (or reuse) the five norm configs under <out>/table5/<tag>/ and print the Tab. 5-style table."""
    device = setup(cfg)
    results, rows = {}, {}
    for norm in NORMS:
        sub = Path(cfg.out) / "table5" / norm.replace(",", "-")
        if not (sub / "ckpt.pt").exists():
            t0 = time.time()
            train(dataclasses.replace(cfg, norm=norm, out=str(sub), table5=False))
            print(f"{norm}: trained in {time.time() - t0:.0f} s")
        rows[norm] = evaluate_ckpt(sub / "ckpt.pt", cfg.split, cfg.data or None, device, cfg.max_eval, cfg.seed)
        results[norm] = rows[norm]["model"]
    head = "| norm (enc,dec) | Rec. | Commit. | PPL exp(H) | H (nats) | active % | Rec. unseen id | L2 recon | FD recon |"
    n = int(next(iter(results.values()))["n_windows"])
    lines = [f"Tab. 5 ({cfg.split} split, {n} full clips, {cfg.steps} steps; Rec = L_rec SmoothL1 in z-units, "
             "Commit = mean |z_e - z_q|^2, L2/FD of reconstructions in raw units)", head, "|---" * 9 + "|"]
    for norm, m in results.items():
        lines.append(f"| {norm} | {m['rec']:.4f} | {m['commit']:.4f} | {m['ppl']:.2f} | {m['entropy']:.3f} | "
                     f"{100 * m['active']:.1f} | {m.get('rec_unseen', float('nan')):.4f} | {m['mse/all']:.5f} | "
                     f"{m['fd/all']:.4f} |")
    lines += ["", "| random walk | L2 | FD | Variation | Diversity | P-FD |", "|---" * 6 + "|"]
    for name, key in [("GT", ("IN,AdaIN", "GT")), ("alt-GT", ("IN,AdaIN", "alt-GT")),
                      ("Naive RW (none,none)", ("none,none", "baseline:random_walk")),
                      ("Ours RW (IN,AdaIN)", ("IN,AdaIN", "baseline:random_walk"))]:
        m = rows[key[0]].get(key[1])
        if m:
            lines.append(f"| {name} | {m['mse/all']:.5f} | {m['fd/all']:.4f} | {m['var_pred/all']:.5f} | "
                         f"{m['div_pred/all']:.4f} | {m['pfd/all']:.4f} |")
    text = "\n".join(lines)
    print(text)
    (Path(cfg.out) / "table5").mkdir(parents=True, exist_ok=True)
    (Path(cfg.out) / "table5" / "table5.md").write_text(text + "\n")
    return results, rows


@torch.no_grad()
def tokenize(cfg: Config):
    """--tokenize: idx of every full clip of every split -> <out>/tokens.pt {split: {idx, beta, names}, config}."""
    device = setup(cfg)
    model = load_vqvae(cfg.ckpt or Path(cfg.out) / "ckpt.pt", device)
    path = cfg.data or model.cfg.data
    res = {"config": asdict(model.cfg)}
    for split in ["train", "val", "test"]:
        clips = load_split(path, split, model)
        res[split] = dict(idx=tokens_of(model, clips, device), beta=[c[1] for c in clips],
                          names=[c[2]["name"] for c in clips])
    torch.save(res, Path(cfg.out) / "tokens.pt")
    print(f"wrote {Path(cfg.out) / 'tokens.pt'}: " + ", ".join(f"{s} {len(res[s]['idx'])}" for s in ["train", "val", "test"]))
    return res


def main(argv=None, mode="train"):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sample"]:
        argv, mode = argv[1:], "sample"
    cfg = parse_config(argv)
    if mode == "sample":
        return sample(cfg)
    if cfg.table5:
        return table5(cfg)
    if cfg.tokenize:
        return tokenize(cfg)
    return train(cfg)


if __name__ == "__main__":
    main()
