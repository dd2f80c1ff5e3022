"""vqvae.py: a listener-motion VQ-VAE that turns r = 8 frames of facial motion into one token, naive or identity-free.

A 1-D conv encoder maps normalised 56-d listener motion (expression 50 | head rotation 3 | jaw 3) to one latent per
r frames; an EMA codebook with dead-code reset quantises it (Eq. 5 of MMLM: idx = argmin_j |z - c_j|^2); a conv
decoder maps tokens back to motion. The identity-disentangled variant of MMLM puts InstanceNorm in the encoder (the
per-sequence channel statistics, mostly identity, are erased) and AdaIN(beta) in the decoder (the listener's shape
beta puts them back), so one code means one identity-free "atomic listener motion". `--norm` picks a Tab. 5 row. IN's
statistics depend on the length, so every clip is coded in windows of the training crops' length (`windowed`).
Ours: motion minus the train mean is divided by ONE std for all channels (`--scale global`), not per channel as
Learning2Listen / LM-Listener do (`--scale channel`): per-channel scaling lifts the many quiet expression channels to
the smile's size and the codec spends its tokens on them (trevor test, naive K = 128: decoded true tokens FD 0.469
per channel against 0.174 global; smile correlation 0.09 per channel).

Papers: MMLM, "LLM-driven Multimodal and Multi-Identity Listening Head Generation", CVPR 2025 (Sec. 3.2, Eq. 5, Tab. 5;
no arXiv); VQ-VAE arXiv 1711.00937; LM-Listener arXiv 2308.10897 and T2M-GPT arXiv 2301.06052 (backbone, quantiser);
Learning2Listen arXiv 2204.08451; InstanceNorm arXiv 1607.08022; AdaIN arXiv 1703.06868. Nothing pretrained is needed;
the twins' listener identity vector stands in for the FLAME shape beta. Used by discrete_diffusion.py and
lm_listener.py through load_vqvae / load_stage and the model's encode / decode / normalize / denormalize.

Shapes: B batch, T frames, L = T/r tokens, D = 56 motion dims, D_id identity dims, C code dim, W width, K codes, N = B*L

    python vqvae.py --preset smoke                   # seconds on a CPU: tiny trevor twin -> runs/vqvae-smoke/ckpt.pt
    python train.py --model vqvae                    # default: the trevor twin -> runs/vqvae/ckpt.pt
    python train.py --model vqvae --data realtalk --out runs/vqvae_realtalk   # many listeners (Tab. 5, right half)
    python sample.py --model vqvae                   # reconstruct test clips + a random walk, print the tables
    python train.py --model vqvae --norm none,none --out runs/vqvae_naive    # the naive codec (a Tab. 5 row)
    python train.py --model vqvae --resume           # continue <out>/ckpt.pt exactly where it stopped
    torchrun --standalone --nproc_per_node 2 vqvae.py --device cuda --dtype bfloat16 --preset full  # DDP
"""
import dataclasses
import json
import math
import os
import re
import sys
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

METHOD = "vqvae"

# ----------------------------------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass
class Config:
    data: str = "trevor"           # listener data: a twin (trevor, realtalk), a folder, "" = the synthetic world
    out: str = "runs/vqvae"        # output folder: ckpt.pt, config.json, pictures, metrics.json
    preset: str = "default"        # smoke (seconds, tiny world) | default (CPU) | full (paper sizes, GPU)
    norm: str = "IN,AdaIN"         # ENC,DEC norms, a row of Tab. 5: none,none | LN,LN | LN,AdaLN | IN,IN | IN,AdaIN
    scale: str = "global"          # motion / std before coding: global (one std, ours) | channel (per channel, paper)
    codebook_size: int = 128       # K, number of codes (paper 256)
    code_dim: int = 64             # C, code vector size (paper 512)
    width: int = 64                # W, conv channels (paper 512)
    r: int = 8                     # frames per token, a power of two (paper 8)
    dilations: str = "3,1"         # one residual unit per dilation; the decoder reverses the order (paper 9,3,1)
    beta_hidden: int = 256         # hidden size of the shared MLP(beta) feeding the AdaIN / AdaLN heads
    ema_decay: float = 0.99        # mu of the EMA codebook (paper 0.99)
    commit_weight: float = 0.02    # weight of L_commit (paper 0.02)
    vel_weight: float = 0.5        # weight of L_veloc (paper 0.5)
    pose_weight: float = 1.0       # weight of the head-rotation term of L_rec (paper 1)
    window: int = 64               # training crop length in frames, a multiple of r (LM-Listener 32)
    batch: int = 32                # clips per step, over all ranks (paper 256)
    steps: int = 2000              # optimiser steps (paper 300k)
    lr: float = 1e-3               # peak learning rate, AdamW betas 0.9/0.99, no weight decay (paper 2e-4)
    warmup: int = 100              # linear warm-up steps (paper 1000)
    grad_clip: float = 1.0         # gradient-norm clip
    eval_every: int = 500          # steps between validation + checkpoint
    max_eval: int = 256            # clips used per split for evaluation (0 = all)
    seed: int = 0                  # seeds python, numpy and torch, and the data order
    device: str = "auto"           # auto -> cuda, mps, cpu
    dtype: str = "float32"         # float32 | bfloat16 | float16 (autocast; the quantiser stays float32)
    compile: bool = False          # torch.compile the encoder and decoder for training (opt-in, for GPUs)
    resume: bool = False           # continue from <out>/ckpt.pt: weights, optimiser, step, random streams
    ckpt: str = ""                 # sample mode: checkpoint (default <out>/ckpt.pt)
    split: str = "test"            # sample mode: split to evaluate
    motion_dim: int = 56           # D, read from the data at train time
    beta_dim: int = 100            # D_id, read from the data at train time


PRESETS = {
    "smoke": dict(out="runs/vqvae-smoke", codebook_size=32, code_dim=32, width=32, dilations="1", beta_hidden=32,
                  batch=8, steps=60, warmup=10, eval_every=60, max_eval=16),
    "default": {},
    "full": dict(codebook_size=256, code_dim=512, width=512, dilations="9,3,1", batch=256, steps=300_000, lr=2e-4,
                 warmup=1000, eval_every=5000, max_eval=0),
}
NORMS = ["none,none", "LN,LN", "LN,AdaLN", "IN,IN", "IN,AdaIN"]
DTYPES = ["float32", "bfloat16", "float16"]
EXP, ROT, JAW = slice(0, 50), slice(50, 53), slice(53, 56)
ARCH = ["norm", "codebook_size", "code_dim", "width", "r", "dilations", "beta_hidden"]  # a resumed run must match
POSITIVE = ["codebook_size", "code_dim", "width", "r", "beta_hidden", "window", "batch", "steps", "warmup",
            "eval_every", "lr", "grad_clip"]


def check_config(cfg, mode):
    """A value that cannot work is the user's mistake: one line naming the flag and what was expected."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rules = [(getattr(cfg, k) > 0, f"--{k.replace('_', '-')} {getattr(cfg, k)}: expected a positive number")
             for k in POSITIVE]
    rules += [  # (condition, message), in order: the first that fails is reported
        (cfg.r & (cfg.r - 1) == 0, f"--r {cfg.r}: expected a power of two (one stride-2 conv per halving)"),
        (cfg.r > 0 and cfg.window % cfg.r == 0, f"--window {cfg.window}: expected a multiple of --r {cfg.r}"),
        (cfg.norm in NORMS, f"--norm {cfg.norm}: expected one of {' | '.join(NORMS)}"),
        (cfg.scale in ("global", "channel"), f"--scale {cfg.scale}: expected global or channel"),
        (cfg.dtype in DTYPES, f"--dtype {cfg.dtype}: expected float32, bfloat16 or float16"),
        (cfg.split in ("train", "val", "test"), f"--split {cfg.split}: expected train, val or test"),
        (re.fullmatch(r"[1-9]\d*(,[1-9]\d*)*", cfg.dilations),
         f"--dilations {cfg.dilations!r}: expected positive integers, e.g. 9,3,1"),
        (0 < cfg.ema_decay < 1, f"--ema-decay {cfg.ema_decay}: expected a number in (0, 1)"),
        (cfg.max_eval >= 0, f"--max-eval {cfg.max_eval}: expected 0 (all) or a positive number of clips"),
        (cfg.batch % world == 0, f"--batch {cfg.batch}: expected a multiple of the {world} torchrun processes")]
    for ok, what in rules:
        if not ok:
            raise data.UserError(what)


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
# The model: norms and conv stacks, the quantiser (Eq. 5 of MMLM, EMA codebook, dead-code reset), the VQ-VAE


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
        w, b = (self.weight, self.bias) if self.kind in ("IN", "LN") else (None, None)
        if self.kind.endswith("IN"):  # statistics over time, per channel (fused kernel)
            h = F.instance_norm(h, weight=w, bias=b, eps=self.eps)  # (B, W, T)
        else:  # statistics over channels, per frame
            h = F.layer_norm(rearrange(h, "b w t -> b t w"), h.shape[1:2], w, b, self.eps)  # (B, T, W)
            h = rearrange(h, "b t w -> b w t")
        if self.kind.startswith("Ada"):
            g, b = self.head(s)[:, :, None].chunk(2, dim=1)  # (B, H) -> 2 x (B, W, 1)
            h = h * (1 + g) + b
        return h


def conv(cin, cout, k, stride=1, dilation=1):
    """Conv1d with replicate padding: a per-channel constant stays constant, so IN is exactly offset-invariant."""
    pad = dilation * (k - 1) // 2 if stride == 1 else 1
    return nn.Conv1d(cin, cout, k, stride, pad, dilation, padding_mode="replicate")


class ResStack(nn.Module):
    """One unit per dilation d: h + Conv1x1(ReLU(N(Conv3_d(ReLU(N(h)))))), T2M-GPT style."""

    def __init__(self, W, dilations, norm, H):
        super().__init__()
        self.units = nn.ModuleList(nn.ModuleDict(dict(n1=Norm(norm, W, H), c1=conv(W, W, 3, dilation=d),
                                                      n2=Norm(norm, W, H), c2=conv(W, W, 1))) for d in dilations)

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


def all_ranks(z):
    """Under torchrun, the latents (B/world, L, C) of every rank in the order of the global batch that data.shard()
    split: global row i * world + rank. The EMA update then sees the single-process batch on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return z
    parts = [torch.empty_like(z) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, z.contiguous())
    return rearrange(torch.stack(parts), "w b l c -> (b w) l c")  # (B, L, C)


class Quantizer(nn.Module):
    """Nearest-code lookup; EMA update with Laplace smoothing and dead-code reset (T2M-GPT's QuantizeEMAReset).

    The codebook learns by EMA only, so MMLM's L_embed = |sg(z_e) - z_q|^2 has no gradient path and is left out."""

    def __init__(self, K, C, mu=0.99, eps=1e-5):
        super().__init__()
        self.K, self.mu, self.eps = K, mu, eps
        self.codebook = nn.Parameter(torch.randn(K, C) * 0.1, requires_grad=False)  # (K, C)
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
        N, dev = flat.shape[0], flat.device
        pick = torch.randint(N, (self.K,), device=dev) if N < self.K else torch.randperm(N, device=dev)[:self.K]
        self.codebook.data.copy_(flat[pick])
        self.ema_sum.copy_(flat[pick])
        self.ema_count.fill_(1.0)
        self.initted.fill_(True)

    @torch.no_grad()
    def update(self, flat, idx):
        """EMA: n <- mu n + (1-mu) counts, m <- mu m + (1-mu) sums, c = m / laplace(n); then dead-code reset:
        codes with EMA count < 1 become random latents of the batch."""
        onehot = F.one_hot(idx, self.K).to(flat.dtype)  # (N, K)
        self.ema_count.mul_(self.mu).add_(onehot.sum(0), alpha=1 - self.mu)
        self.ema_sum.mul_(self.mu).add_(onehot.t() @ flat, alpha=1 - self.mu)  # (K, C)
        n = self.ema_count.sum()
        smoothed = (self.ema_count + self.eps) / (n + self.K * self.eps) * n  # Laplace smoothing of counts
        self.codebook.data.copy_(self.ema_sum / smoothed[:, None])
        dead = self.ema_count < 1.0  # (K,)
        self.last_resets = int(dead.sum())
        if self.last_resets:
            rand = flat[torch.randint(flat.shape[0], (self.last_resets,), device=flat.device)]  # (n_dead, C)
            self.codebook.data[dead] = rand
            self.ema_sum[dead] = rand
            self.ema_count[dead] = 1.0

    def forward(self, z_e):
        """z_e (B, L, C) -> z_q_st (B, L, C), idx (B, L), z_q (B, L, C) (selected codes, before straight-through)."""
        B, L, C = z_e.shape
        flat = z_e.reshape(-1, C).to(self.codebook.dtype)  # (N, C): distances and EMA in the codebook's float32
        if self.training:  # the global batch's latents, so that every rank updates the codebook alike
            every = all_ranks(flat.detach().view(B, L, C)).reshape(-1, C)  # (N_global, C)
            if not bool(self.initted):
                self.init_from(every)
        idx = self.assign(flat.detach())  # (N,)
        if self.training:
            self.update(every, idx if every.shape[0] == flat.shape[0] else self.assign(every))
        z_q = self.codebook[idx].view(B, L, C).detach()
        z_e = z_e.to(z_q.dtype)  # straight-through (arXiv 1711.00937): value z_q, gradient of z_e; eval: the codes
        z_st = z_e + (z_q - z_e).detach() if self.training else z_q
        return z_st, idx.view(B, L), z_q


def rec_loss(x_hat, x, pose_weight=1.0):
    """L_rec (MMLM Sec. 3.2; form of LM-Listener's code) = SmoothL1 on expression + alpha_pose SmoothL1 on head
    rotation + SmoothL1 on jaw (each a mean)."""
    f = lambda part: F.smooth_l1_loss(x_hat[..., part], x[..., part])
    return f(EXP) + pose_weight * f(ROT) + f(JAW)


def velocity_loss(x_hat, x):
    """L_veloc = SmoothL1(dx_hat, dx), dx_t = x_t - x_{t-1} over time (dim -2)."""
    return F.smooth_l1_loss(x_hat[..., 1:, :] - x_hat[..., :-1, :], x[..., 1:, :] - x[..., :-1, :])


def windowed(f, x, size, *extra):
    """f over `size`-step windows of x (B, n, ...) along time (dim 1), all in one batch: non-overlapping from step 0,
    the last one flush with the end (only its new part kept); n <= size or size 0: f(x). IN and AdaIN statistics
    depend on the length, so a clip is encoded and decoded in the training crops' length, whatever its own; extra:
    per-row inputs (beta), repeated per window. -> f's output (B, n * f's steps per input step, ...)"""
    n = x.shape[1]
    if size <= 0 or n <= size:
        return f(x, *extra)
    starts = list(range(0, n - size + 1, size))
    tail = n - starts[-1] - size  # steps after the last whole window
    starts += [n - size] if tail else []
    ys = f(torch.cat([x[:, s:s + size] for s in starts]), *(e.repeat(len(starts), 1) for e in extra))
    ys = list(ys.chunk(len(starts)))  # per window (B, m, ...)
    if tail:
        ys[-1] = ys[-1][:, ys[-1].shape[1] * (size - tail) // size:]
    return torch.cat(ys, 1)


class VQVAE(nn.Module):
    """Encoder (N_enc) -> Quantizer -> Decoder (N_dec, beta); motion and beta z-norm statistics live in buffers."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg, self.K, self.r = cfg, cfg.codebook_size, cfg.r
        self.encoder, self.decoder = (f(cfg, n) for f, n in zip((Encoder, Decoder), cfg.norm.split(",")))
        self.quantizer = Quantizer(cfg.codebook_size, cfg.code_dim, cfg.ema_decay)
        self.chunk = cfg.window  # frames per encode / decode window (0 = the whole sequence at once)
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

    def encode_latent(self, x):
        """x_norm (B, T, D) -> z_e (B, L, C), in training-length windows (see windowed)."""
        assert x.shape[1] % self.r == 0, f"T = {x.shape[1]} must be a multiple of r = {self.r} (crop, don't pad)"
        enc = lambda x: rearrange(self.encoder(rearrange(x, "b t d -> b d t")), "b c l -> b l c")
        return windowed(enc, x, self.chunk)

    def encode(self, x, beta=None):
        """x_norm (B, T, D), beta_raw (B, D_id) (unused: the encoder is beta-free) -> idx (B, T/r) int64."""
        z_e = self.encode_latent(x)  # (B, L, C)
        return self.quantizer.assign(z_e.flatten(0, 1)).view(z_e.shape[:2])

    def decode_latent(self, z_q, beta):
        """z_q (B, L, C), beta_raw (B, D_id) -> x_norm (B, T, D); beta is z-normalised with the train statistics."""
        beta_n = (beta.to(self.beta_mean) - self.beta_mean) / self.beta_std  # (B, D_id)
        dec = lambda z, b: rearrange(self.decoder(rearrange(z, "b l c -> b c l"), b), "b d t -> b t d")
        return windowed(dec, z_q.to(self.quantizer.codebook.dtype), self.chunk // self.r, beta_n)

    def decode(self, idx, beta):
        """idx (B, L) int64, beta_raw (B, D_id) -> x_norm (B, L*r, D)."""
        return self.decode_latent(self.codebook[idx], beta)

    def forward(self, x, beta):
        """x_norm (B, T, D), beta_raw (B, D_id) -> dict of x_hat, idx, z_e, z_q and the losses."""
        z_e = self.encode_latent(x)  # (B, L, C)
        z_st, idx, z_q = self.quantizer(z_e)
        x_hat = self.decode_latent(z_st, beta).to(x.dtype)  # (B, T, D)
        out = dict(x_hat=x_hat, idx=idx, z_e=z_e, z_q=z_q, rec=rec_loss(x_hat, x, self.cfg.pose_weight),
                   vel=velocity_loss(x_hat, x), commit=F.mse_loss(z_e.to(z_q.dtype), z_q.detach()))  # |z_e - sg(z_q)|^2
        out["loss"] = out["rec"] + self.cfg.vel_weight * out["vel"] + self.cfg.commit_weight * out["commit"]
        return out


def load_vqvae(path, device="cpu"):
    """Rebuild a VQVAE from its checkpoint alone (config + weights + stats), in eval mode."""
    ck = load_checkpoint(path, device)
    names = {f.name for f in dataclasses.fields(Config)}
    model = VQVAE(Config(**{k: v for k, v in ck["config"].items() if k in names})).to(device)
    model.load_state_dict(ck["model"])
    return model.eval()


def load_stage(path, data_path, preset, flags, who, training=True):
    """The frozen VQ-VAE (on the CPU) of a method built on it (`who`: its name). Training: a missing checkpoint is
    trained first with `python vqvae.py --data data_path flags` (flags name --out and --preset), one trained with
    another preset or on other data is a user error naming --vq. Sampling: the checkpoint as it is."""
    if training and not Path(path).exists():
        if dist.is_initialized():  # every rank would train it
            raise data.UserError(f"--vq {path}: no such file; under torchrun train the VQ-VAE first "
                                 f"(python vqvae.py {' '.join(flags)})")
        flags = ["--data", str(data_path), *flags]
        print(f"[{who}] no VQ-VAE at {path}: training it first with `python vqvae.py {' '.join(flags)}` (pass --vq "
              "PATH to use another)", flush=True)
        main(flags, mode="train")
    have = load_checkpoint(path)["config"]
    where = lambda c: Path(data.resolve_data(c["data"], "listener", c["preset"])).resolve()
    if training and (have["preset"] != preset or where(have) != Path(data_path).resolve()):
        raise data.UserError(f"--vq {path} was trained with preset {have['preset']} on {where(have)}, this run is "
                             f"preset {preset} on {data_path}: pass --vq with a VQ-VAE of this preset and data")
    return load_vqvae(path, device="cpu").requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------------------
# Training


def to_clips(items, model):
    """Data items -> [(x_norm (T, D), beta_raw (D_id,), item)], T cut to a multiple of r (shorter clips dropped)."""
    out = []
    for it in items:
        x = torch.as_tensor(it["listener"], dtype=torch.float32)
        T = x.shape[0] - x.shape[0] % model.r
        if T >= model.r:
            out.append((model.normalize(x[:T]), torch.as_tensor(it["listener_beta"], dtype=torch.float32), it))
    return out


def random_crops(clips, batch, window, gen):
    """Random `window`-frame crops, clip and offset uniform (offsets over the whole clip). -> (B, W, D), (B, D_id)"""
    picks = [clips[i] for i in torch.randint(len(clips), (batch,), generator=gen).tolist()]
    offs = [int(torch.randint(x.shape[0] - window + 1, (1,), generator=gen)) for x, _, _ in picks]
    return torch.stack([x[o:o + window] for (x, _, _), o in zip(picks, offs)]), torch.stack([b for _, b, _ in picks])


def build(cfg: Config, device):
    """The data, and the model with the train split's motion and beta statistics in its buffers."""
    cfg.data = str(data.resolve_data(cfg.data, "listener", preset="tiny" if cfg.preset == "smoke" else "default"))
    items = data.load_listener(cfg.data, "train")
    cfg.motion_dim = int(items[0]["listener"].shape[1])
    cfg.beta_dim = int(np.asarray(items[0]["listener_beta"]).shape[0])
    model = VQVAE(cfg)
    mean, std = data.load_stats(cfg.data)
    std = torch.as_tensor(std[:cfg.motion_dim]).clamp_min(1e-6)
    if cfg.scale == "global":  # one scale, the RMS of the channels' stds: a quiet channel stays quiet (README)
        std = std.pow(2).mean().sqrt().expand_as(std)
    model.mean.copy_(torch.as_tensor(mean[:cfg.motion_dim]))
    model.std.copy_(std)
    betas = torch.stack([torch.as_tensor(it["listener_beta"], dtype=torch.float32) for it in items])
    model.beta_mean.copy_(betas.mean(0))
    model.beta_std.copy_(torch.where(betas.std(0) > 1e-6, betas.std(0), torch.ones(())))
    train_clips = [c for c in to_clips(items, model) if c[0].shape[0] >= cfg.window]
    if not train_clips:
        raise data.UserError(f"{cfg.data}: no training clip of at least --window {cfg.window} frames")
    return model.to(device), train_clips, to_clips(data.load_listener(cfg.data, "val"), model)[: cfg.max_eval or None]


def resume(path, cfg, model, opt, scaler, gen, device):
    """Everything a run needs to continue as if never stopped. -> (step, metrics)"""
    ck = load_checkpoint(path, device)
    diff = [f"{k} {ck['config'][k]!r} (now {getattr(cfg, k)!r})" for k in ARCH if ck["config"][k] != getattr(cfg, k)]
    if diff:
        raise data.UserError(f"--resume: {path} was trained with another model: " + ", ".join(diff))
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    scaler.load_state_dict(ck["scaler"])
    data.set_rng_state(ck["rng"], [gen])
    if data.is_main():
        print(f"resumed from {path} at step {ck['step']}")
    return ck["step"], ck["metrics"]


def train(cfg: Config):
    device = data.pick_device(cfg.device)
    own_group = not dist.is_initialized()  # a caller's process group (a method training its VQ first) stays up
    _, world = data.ddp_setup(device)
    data.seed_all(cfg.seed)
    model, train_clips, val_clips = build(cfg, device)
    out, conf = Path(cfg.out), dataclasses.asdict(cfg)
    if data.is_main():
        print(f"device {device} x {world} | config {json.dumps(conf)}")
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(conf, indent=2))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    scaler = data.grad_scaler(device, cfg.dtype)
    gen = torch.Generator().manual_seed(cfg.seed)  # data order: every rank draws the same global batch
    step, met = 0, {}
    if cfg.resume and (out / "ckpt.pt").exists():
        step, met = resume(out / "ckpt.pt", cfg, model, opt, scaler, gen, device)
    first_rec = met.get("train_rec_first")
    if cfg.compile:  # the conv stacks only (the quantiser branches on data); state_dict keys stay unchanged
        model.encoder.compile()
        model.decoder.compile()
    net = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False) if world > 1 else model

    bar = tqdm(range(step, cfg.steps), initial=step, total=cfg.steps, desc=METHOD, dynamic_ncols=True,
               disable=not data.is_main())
    for step in bar:
        for g in opt.param_groups:  # linear warm-up, then constant; the paper's x0.05 at 200k steps (full only)
            g["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup) * (0.05 if step >= 200_000 else 1.0)
        x, beta = random_crops(train_clips, cfg.batch, cfg.window, gen)  # (B, window, D), (B, D_id)
        model.train()
        with data.autocast(device, cfg.dtype):
            o = net(data.shard(x).to(device), data.shard(beta).to(device))  # this rank's rows of the global batch
        opt.zero_grad(set_to_none=True)
        scaler.scale(o["loss"]).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        scaler.step(opt)
        scaler.update()
        first_rec = first_rec if first_rec is not None else float(o["rec"].detach())
        _, ppl, active = metrics.usage_stats(o["idx"], cfg.codebook_size)
        bar.set_postfix(rec=f"{o['rec'].item():.3f}", vel=f"{o['vel'].item():.3f}", commit=f"{o['commit'].item():.3f}",
                        ppl=f"{ppl:.1f}", act=f"{active:.0%}", resets=model.quantizer.last_resets)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            if data.is_main():
                met = metrics.codec_report(step + 1, model, o, first_rec, val_clips, train_clips, device,
                                           out / "recon.png")  # the Tab. 5 numbers on val, one picture
            save_checkpoint(out / "ckpt.pt", dict(model=model.state_dict(), optimizer=opt.state_dict(),
                                                  scaler=scaler.state_dict(), step=step + 1, config=conf,
                                                  metrics=met, rng=data.rng_state([gen])))
    data.check_in_sync(model)  # raises unless every rank holds rank 0's weights and codebook
    if data.is_main():
        print(f"wrote {out / 'ckpt.pt'}")
    if own_group:
        data.ddp_teardown()
    return model, met


# ----------------------------------------------------------------------------------------------------------------------
# Sampling: reconstruction, random walk over the codebook, Tab. 5


@torch.no_grad()
def sample(cfg: Config):
    device = data.pick_device(cfg.device)
    data.seed_all(cfg.seed)
    out = Path(cfg.out)
    model = load_vqvae(cfg.ckpt or out / "ckpt.pt", device)
    path = data.resolve_data(cfg.data, "listener", model.cfg.preset) if cfg.data else model.cfg.data
    clips = to_clips(data.load_listener(path, cfg.split), model)[: cfg.max_eval or None]
    train_clips = to_clips(data.load_listener(path, "train"), model)
    return metrics.evaluate_codec(model, clips, train_clips, device, seed=cfg.seed, out=out)[0]  # + files in out


def main(argv=None, mode="train"):
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse_config(argv, mode)
    if mode == "sample" and not any(a.split("=")[0] == "--data" for a in argv):
        cfg.data = ""  # sample the checkpoint's own data unless --data names another
    return sample(cfg) if mode == "sample" else train(cfg)


if __name__ == "__main__":
    cli()
