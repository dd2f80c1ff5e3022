"""latent_diffusion.py: Latent Behavior Diffusion (LBD), several different listener reactions to one speaker.

(1) A context-aware autoencoder: a Transformer E_r encodes each w-frame window of the 25 REACT attributes (15 AUs |
valence, arousal | 8 emotion probabilities) into a v-dim latent; D_r decodes a chunk's latents into frames, a
vector-quantised branch D_f into 3DMM coefficients. (2) Latent diffusion: Diff-AE's MLPSkipNet denoises the listener's
latents given the speaker's E_r code, PLMS samples them, each initial noise gives another reaction (REACT asks for 10).
Papers: LBD arXiv 2505.07901; Diff-AE arXiv 2111.15640; PLMS arXiv 2202.09778; DDIM arXiv 2010.02502; LDM arXiv
2112.10752; REACT 2024 arXiv 2401.05166. Nothing pretrained is needed. Data: the REACT 2024 layout (data.py's react
twin; a real folder reads the same), scored against the real reactions of the neighbour clips the appropriateness
matrix marks. Ours, marked [ours] where it happens: n window latents denoised jointly, whole clips by outpainting,
classifier-free guidance (arXiv 2207.12598: a null speaker code in 10 % of training segments, g = 0.5 chosen on val).
Shapes: B batch, K samples per speaker, T frames, n windows per chunk, w frames per window, L = n*w frames, v latent
dims per window, D attribute dims (25), F 3DMM dims (56 synthetic, 58 REACT).

    python latent_diffusion.py --preset smoke         # seconds on a CPU: react-tiny -> runs/latent_diffusion-smoke
    python latent_diffusion.py sample --preset smoke  # its REACT table, samples and pictures
    python train.py --model latent_diffusion          # default preset (the react twin) -> runs/latent_diffusion
    python sample.py --model latent_diffusion         # 10 reactions per test speaker: the REACT table, pictures
    python sample.py --model latent_diffusion --plms-order 1 --sample-steps 10 --model-only \
        --guidance 1 --ckpt runs/latent_diffusion_noguide/ckpt.pt --out runs/latent_diffusion_plms1_s10  # LBD Tab. 3
    torchrun --standalone --nproc_per_node 2 latent_diffusion.py --preset smoke    # DDP (gloo on CPU, NCCL on GPU)
"""
import dataclasses
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from tqdm import tqdm

import data
import metrics

METHOD = "latent_diffusion"


# ----------------------------------------------------------------------------------------------------------------------
# Config

@dataclasses.dataclass
class Config:
    data: str = "react"            # data: a twin's name (react: the REACT 2024 layout twin), or a data folder
    out: str = "runs/latent_diffusion"  # run folder: checkpoint, config.json, samples, metrics.json, pictures
    preset: str = "default"        # smoke | default | full (the paper's sizes)
    steps: int = 0                 # if > 0: AE and diffusion steps = steps, D_f steps = steps // 5
    ae_steps: int = 600            # stage 1a: E_r + D_r optimiser steps (paper: 1000 epochs)
    df_steps: int = 300            # stage 1b: codebook + D_f steps, E_r frozen (paper: 200 epochs)
    diff_steps: int = 2000         # stage 2: MLPSkipNet steps, E_r and D_r frozen (paper: 200 epochs)
    window: int = 30               # w, frames per latent window (1 s at 30 fps; paper: 50 frames at 25 fps)
    seq_windows: int = 4           # n, windows denoised jointly [ours] (0 = training segment length // w)
    overlap: int = 0               # windows shared by consecutive chunks of a longer sequence (0 = n // 2)
    d_model: int = 64              # Transformer width of E_r, D_r, D_f (paper: not stated)
    layers: int = 2                # Transformer layers of E_r, D_r, D_f (paper: 2)
    heads: int = 4                 # attention heads (paper: 4)
    latent: int = 32               # v, latent dims per window (paper: 256)
    n_z: int = 4                   # sub-vectors per window latent: D_r / D_f tokens and VQ codes [ours]
    codebook: int = 256            # K_f, D_f codebook size [ours]
    mlp_layers: int = 10           # MLPSkipNet depth (paper: 10)
    mlp_hidden: int = 512          # MLPSkipNet width (paper: 1024)
    dropout: float = 0.1           # MLPSkipNet dropout
    param: str = "x0"              # what the MLPSkipNet predicts: x0 [ours] | eps (the paper's Eq. 7)
    cond: str = "speaker"          # the denoiser's condition: speaker (E_r of the speaker's window) | none
    cond_drop: float = 0.1         # [ours] P(speaker code -> zeros) per training segment, for guidance (paper: 0)
    guidance: float = 0.5          # [ours] also a sample flag: ε(∅) + g·(ε(c) − ε(∅)) (paper: 1, the conditional net)
    t_train: int = 1000            # diffusion steps T (LDM: 1000)
    beta_start: float = 8.5e-4     # scaled-linear noise schedule, first beta (LDM)
    beta_end: float = 1.2e-2       # scaled-linear noise schedule, last beta (LDM)
    plms_order: int = 4            # PLMS order k, 1 = DDIM (paper: 4); also a sample-mode flag
    sample_steps: int = 50         # sampling steps S (paper: 50); also a sample-mode flag
    n_samples: int = 10            # reactions per speaker (REACT protocol: 10)
    batch: int = 32                # segments per optimiser step (global batch under torchrun)
    lr: float = 1e-3               # AdamW learning rate of every stage, cosine-decayed per stage
    eval_every: int = 500          # checkpoint every N steps of a stage (and at its end); stage 2 also scores val
    eval_speakers: int = 100       # sample mode: speakers scored (evenly spaced over the split; 0 = all)
    model_only: bool = False       # sample mode: only the model row, no FRDist (the Tab. 3 cells)
    split: str = "test"            # sample mode: split to evaluate (train | val | test)
    ckpt: str = ""                 # sample mode: checkpoint (default <out>/ckpt.pt)
    resume: bool = False           # continue from <out>/ckpt.pt: weights, optimiser, step, random state
    device: str = "auto"           # auto | cpu | cuda | cuda:N | mps
    dtype: str = "float32"         # float32 | bfloat16 | float16 (autocast; float16 with a grad scaler)
    compile: bool = False          # torch.compile the training forward (checkpoints come from the plain module)
    seed: int = 0                  # seeds everything
    threads: int = 0               # CPU threads for torch (0 = torch's default)


PRESETS = {
    "smoke": dict(out="runs/latent_diffusion-smoke", ae_steps=40, df_steps=20, diff_steps=60, d_model=32, latent=16,
                  n_z=2, mlp_layers=4, mlp_hidden=128, batch=8, eval_every=60, eval_speakers=2, n_samples=3,
                  sample_steps=20),
    "default": dict(),
    "full": dict(window=50, d_model=256, latent=256, n_z=8, mlp_layers=10, mlp_hidden=1024, ae_steps=20000,
                 df_steps=4000, diff_steps=20000, lr=1e-4, batch=64),
}


def check_config(cfg, mode):
    """Values a user can get wrong -> one-line data.UserError (sizes that depend on the data are checked later)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    data.check_fields(cfg, positive=["ae_steps", "df_steps", "diff_steps", "window", "d_model", "layers", "heads",
                                     "latent", "n_z", "codebook", "mlp_hidden", "t_train", "sample_steps",
                                     "n_samples", "batch", "eval_every", "lr"],
                      non_negative=["steps", "seq_windows", "overlap", "eval_speakers", "threads", "dropout",
                                    "cond_drop", "guidance"],
                      choices=dict(param=("x0", "eps"), cond=("speaker", "none"), dtype=("float32", "bfloat16",
                                   "float16"), plms_order=(1, 2, 3, 4), split=("train", "val", "test")), rules=[
        (cfg.d_model % max(cfg.heads, 1) == 0, f"--d-model {cfg.d_model}: expected a multiple of --heads {cfg.heads}"),
        (cfg.latent % max(cfg.n_z, 1) == 0, f"--latent {cfg.latent}: expected a multiple of --n-z {cfg.n_z}"),
        (cfg.mlp_layers >= 2, f"--mlp-layers {cfg.mlp_layers}: expected 2 or more"),
        (cfg.sample_steps <= cfg.t_train, f"--sample-steps {cfg.sample_steps}: expected at most --t-train"),
        (0 < cfg.beta_start < cfg.beta_end < 1, "--beta-start, --beta-end: expected 0 < start < end < 1"),
        (cfg.dropout < 1 and cfg.cond_drop < 1, "--dropout, --cond-drop: expected below 1"),
        (cfg.guidance == 1 or (cfg.cond_drop > 0 and cfg.cond == "speaker"), f"--guidance {cfg.guidance:g}: no "
         "unconditional branch unless trained with --cond-drop > 0 and --cond speaker"
         + (f" ({cfg.out} was not)" if mode == "sample" else "") + "; use --guidance 1"),
        (mode != "train" or cfg.batch % world == 0,
         f"--batch {cfg.batch}: expected a multiple of the {world} processes that torchrun started (each a share)")])


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
# Building blocks

def sinusoid(pos, dim):
    """(...,) positions or times -> (..., dim) embedding, cos half then sin half (Diff-AE's timestep_embedding)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=pos.device) / half)
    args = pos.float()[..., None] * freqs                                       # (..., dim/2)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)                # (..., dim)


class WindowEncoder(nn.Module):
    """E_r: Linear + sinusoid PE -> pre-LN Transformer -> mean over time -> Linear: one latent per window, alone."""

    def __init__(self, d_in, cfg):
        super().__init__()
        self.w = cfg.window
        self.inp = nn.Linear(d_in, cfg.d_model)
        self.register_buffer("pe", sinusoid(torch.arange(cfg.window), cfg.d_model), persistent=False)
        layer = nn.TransformerEncoderLayer(cfg.d_model, cfg.heads, 2 * cfg.d_model, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.tf = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.latent)

    def forward(self, x):                                                       # (B, n*w, D)
        h = self.inp(rearrange(x, "b (n w) d -> (b n) w d", w=self.w)) + self.pe  # (B*n, w, d_m)
        h = self.tf(h).mean(dim=1)                                              # (B*n, d_m): pool over time
        return rearrange(self.out(self.norm(h)), "(b n) v -> b n v", b=x.shape[0])  # (B, n, v)


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
    """D_r / D_f [ours; like Trans-VAE's decoder]: a Transformer encoder mixes the n*n_z latent tokens of a chunk (each
    with the sinusoid of its window's centre frame), then L = n*w frame queries, the sinusoids of their *absolute*
    frame index, cross-attend to them: no seam at window borders, and cost O(L*n*n_z), not O(L^2)."""

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
        tokens = rearrange(z, "b n (s c) -> b n s c", s=self.n_z)               # (B, n, n_z, v/n_z)
        mem = self.tok(tokens) + self.sub + self.pe(centre, d)[:, None]         # (B, n, n_z, d)
        mem = self.mix(rearrange(mem, "b n s d -> b (n s) d"))                  # (B, n*n_z, d)
        q = self.qproj(self.pe(torch.arange(n * self.w, device=z.device).float(), d))  # (L, d)
        q = q[None].expand(B, -1, -1)                                           # (B, L, d)
        for blk in self.blocks:
            q = blk(q, mem)
        return self.out(self.norm(q))                                           # (B, L, d_out)


class Codebook(nn.Module):
    """D_f's codebook over z's n_z sub-vectors, trained by gradient (Eq. 4 of arXiv 2505.07901; VQ-VAE 1711.00937)."""

    def __init__(self, K, dim):
        super().__init__()
        self.codes = nn.Parameter(torch.randn(K, dim))

    def forward(self, z_e):                                                     # (..., dim)
        flat = z_e.reshape(-1, z_e.shape[-1])                                   # (M, dim)
        idx = torch.cdist(flat, self.codes).argmin(dim=1)                       # (M,)
        z_q = self.codes[idx].view_as(z_e)                                      # (..., dim)
        # Eq. 4's codebook term ‖sg[z_e] − e‖². Its commitment term β‖z_e − sg[e]‖² is left out: E_r is frozen in
        # stage 1b, so that term has no gradient to any parameter (it would only add a constant to the logged loss).
        loss = F.mse_loss(z_q, z_e.detach())
        return z_e + (z_q - z_e).detach(), idx.view(z_e.shape[:-1]), loss       # straight-through


class MLPSkipNet(nn.Module):
    """The denoiser: Diff-AE's MLPSkipNet (arXiv 2111.15640, diffae/model/latentnet.py). The noisy input is
    *concatenated* to every layer after the first (not added); conditioning is scale-only, h ⊙ (1 + s)."""

    def __init__(self, dim, hidden, n_layers, dropout=0.1, t_dim=64):
        super().__init__()
        self.t_dim = t_dim
        self.time = nn.Sequential(nn.Linear(t_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.cond = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        ins = [dim] + [hidden + dim] * (n_layers - 2)
        self.lin = nn.ModuleList(nn.Linear(i, hidden) for i in ins)
        self.emb = nn.ModuleList(nn.Linear(2 * dim, hidden) for _ in ins)      # e -> per-layer scale s
        self.norm = nn.ModuleList(nn.LayerNorm(hidden) for _ in ins)
        self.last = nn.Linear(hidden + dim, dim)                                # no norm, no condition
        self.drop = nn.Dropout(dropout)
        for m in (m for m in self.modules() if isinstance(m, nn.Linear)):
            nn.init.kaiming_normal_(m.weight), nn.init.zeros_(m.bias)
        nn.init.zeros_(self.last.weight)                                        # [ours] output 0 at init

    def forward(self, x, t, c):                                                 # (B, dim), (B,), (B, dim)
        e = F.silu(torch.cat([self.time(sinusoid(t, self.t_dim)), self.cond(c)], dim=-1))  # (B, 2*dim)
        h = x
        for l, (lin, emb, norm) in enumerate(zip(self.lin, self.emb, self.norm)):
            inp = x if l == 0 else torch.cat([h, x], -1)                        # (B, H + dim)
            h = self.drop(F.silu(norm(lin(inp) * (1 + emb(e)))))                # (B, H)
        return self.last(torch.cat([h, x], -1))                                 # (B, dim)


# ----------------------------------------------------------------------------------------------------------------------
# Diffusion: schedule, forward process, the DDIM step, PLMS (Eq. 8 of arXiv 2505.07901)

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
    """φ(x, ε, t → s): the DDIM η = 0 step (Eq. 12 of arXiv 2010.02502)."""
    return a_s ** 0.5 * predict_x0(x, eps, a_t) + (1 - a_s) ** 0.5 * eps


def timestep_grid(T, S):
    """τ_i = (i − 1)·c + 1 with c = T // S, i = 1..S (ascending; sampling visits it in reverse)."""
    return [(i - 1) * (T // S) + 1 for i in range(1, S + 1)]


AB_COEFFS = {1: [1.0], 2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}


def plms_sample(eps_fn, x, abar, S, order, known=None):
    """PLMS (arXiv 2202.09778 in the CompVis form; Eq. 8 of arXiv 2505.07901) from x = x_T at the grid's top time to
    x̂0. eps_fn(x, t:int) -> ε. Order 1 is DDIM η = 0; order ≥ 2 warm-starts with one pseudo improved Euler step
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
            e_prime = (e_t + eps_fn(transfer(x, e_t, a_t, a_s), s)) / 2
        else:                                                                   # Adams-Bashforth, m = min(k, n)
            m = min(order, len(hist) + 1)
            e_prime = sum(c * e for c, e in zip(AB_COEFFS[m], [e_t] + hist))
        x = transfer(x, e_prime, a_t, a_s)
        hist = ([e_t] + hist)[:3]
    if known is not None:
        x = torch.where(known[0], known[1], x)
    return x


# ----------------------------------------------------------------------------------------------------------------------
# The model: autoencoder, latent normaliser and denoiser in one module

class LBD(nn.Module):
    """E_r, D_r, D_f (codebook + decoder), the MLPSkipNet over a chunk's n*v latents and the normalisers (buffers)."""

    def __init__(self, cfg, d_attr, d_mot, n_win):
        super().__init__()
        self.cfg, self.n = cfg, n_win
        self.enc = WindowEncoder(d_attr, cfg)                                   # E_r
        self.dec = SequenceDecoder(d_attr, cfg)                                 # D_r
        self.vq = Codebook(cfg.codebook, cfg.latent // cfg.n_z)
        self.dec_f = SequenceDecoder(d_mot, cfg)                                # D_f
        self.den = MLPSkipNet(n_win * cfg.latent, cfg.mlp_hidden, cfg.mlp_layers, cfg.dropout)
        for name, dim in [("attr", d_attr), ("mot", d_mot), ("z", cfg.latent)]:
            self.register_buffer(f"{name}_mean", torch.zeros(dim))              # normalisers: (x - mean) / std
            self.register_buffer(f"{name}_std", torch.ones(dim))
        self.register_buffer("abar", alphas_cumprod(cfg.t_train, cfg.beta_start, cfg.beta_end))

    def znorm(self, z):                                                         # latent normaliser (Diff-AE)
        return (z - self.z_mean) / self.z_std

    def zdenorm(self, z):
        return z * self.z_std + self.z_mean

    def decode_f(self, z):
        """z (B, n, v) -> normalised 3DMM (B, L, F) and the VQ loss: quantise the n_z sub-vectors, then D_f."""
        zq, _, vq_loss = self.vq(rearrange(z, "b n (s c) -> b n s c", s=self.cfg.n_z))  # (B, n, n_z, v/n_z)
        return self.dec_f(rearrange(zq, "b n s c -> b n (s c)")), vq_loss

    def forward(self, stage, *batch):
        """The training loss of one stage (a forward, so that DistributedDataParallel can wrap the model)."""
        if stage == "ae":                                                       # ‖D_r(E_r(Y)) − Y‖²
            y, = batch
            return F.mse_loss(self.dec(self.enc(y)), y)
        if stage == "df":                                          # Eq. 4 of arXiv 2505.07901, E_r frozen
            y, m = batch
            m_hat, vq_loss = self.decode_f(self.enc(y).detach())               # (B, n, v) -> (B, L, F)
            return F.mse_loss(m_hat, m) + vq_loss
        z0, c, t, eps = batch           # Eq. 7 of arXiv 2505.07901: ‖ε − ε̂‖² (param eps), or ‖z0 − x̂0‖² (x0, ours)
        out = self.net(q_sample(z0, eps, self.abar[t].float()[:, None]), t.float(), c)
        return F.mse_loss(out, z0 if self.cfg.param == "x0" else eps)

    def net(self, x, t, c):
        """The MLPSkipNet's x̂0 or ε̂ (cfg.param); --cond none: zeros for the speaker's code. No listener identity."""
        return self.den(x, t, c if self.cfg.cond == "speaker" else torch.zeros_like(c))

    def eps(self, x, t, c):
        """ε_θ(z̃_t, t, c) for the samplers. [ours] param = x0: the ε that the net's x̂0 implies, (z̃_t − √ᾱ_t x̂0) /
        √(1 − ᾱ_t); an ε-net's own x̂0 = (z̃_T − √(1 − ᾱ) ε̂) / √ᾱ multiplies its errors by 1/√ᾱ_T ≈ 15 at the start."""
        if self.cfg.guidance == 1:
            out = self.net(x, t, c)
        else:  # [ours] classifier-free guidance, ε(∅) + g·(ε(c) − ε(∅)): both in one batched call
            out, null = self.net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([c, torch.zeros_like(c)])).chunk(2)
            out = torch.lerp(null, out, self.cfg.guidance)
        if self.cfg.param == "eps":
            return out
        a = self.abar[t.long()].to(x)[:, None]                                  # (B, 1)
        return (x - a.sqrt() * out) / (1 - a).sqrt()

    @torch.no_grad()
    def generate(self, speaker, K, order, S, generator):
        """Normalised speaker (B, T, D) -> de-normalised latents (B, K, N, v), N = ceil(T / w), and normalised reactions
        (B, K, T, D). T > n*w [ours]: overlapping chunks by latent outpainting (a chunk's known overlap latents imposed
        while sampling, replacement inpainting), decoded and cross-faded over the overlap frames."""
        B, T, D = speaker.shape
        w, n, v = self.cfg.window, self.n, self.cfg.latent
        N = max(n, -(-T // w))                                                  # windows to generate
        pad = speaker[:, -1:].expand(B, N * w - T, D)                           # repeat the last frame
        c = self.znorm(self.enc(torch.cat([speaker, pad], 1)))                  # (B, N, v)
        c = c.repeat_interleave(K, 0)                                           # (B*K, N, v)
        starts = chunk_starts(N, n, self.cfg.overlap or n // 2)
        z = torch.zeros(B * K, N, v, device=speaker.device)
        done = torch.zeros(N, dtype=torch.bool, device=speaker.device)
        for a in starts:
            x = torch.randn(B * K, n * v, generator=generator, device="cpu").to(speaker.device)  # z̃_T
            cc = rearrange(c[:, a:a + n], "bk n v -> bk (n v)")                # (B*K, n*v)
            known = None
            if done[a:a + n].any():                                             # outpaint: impose the overlap
                mask = done[a:a + n].repeat_interleave(v)[None]                 # (1, n*v)
                noise = torch.randn(B * K, n * v, generator=generator, device="cpu").to(speaker.device)
                known = (mask, rearrange(z[:, a:a + n], "bk n v -> bk (n v)"), noise)
            tt = lambda x, t: self.eps(x, torch.full((x.shape[0],), float(t), device=x.device), cc)
            z[:, a:a + n] = rearrange(plms_sample(tt, x, self.abar, S, order, known), "bk (n v) -> bk n v", v=v)
            done[a:a + n] = True
        z = self.zdenorm(z)                                                     # (B*K, N, v)
        y = decode_chunks(self.dec, z, n, starts, w)[:, :T]                     # (B*K, T, D)
        return z.view(B, K, N, v), y.view(B, K, T, -1)

    @torch.no_grad()
    def react(self, speaker, K, generator):
        """Raw speaker attributes (B, T, D) -> latents (B, K, N, v) and K valid REACT reactions (B, K, T, D) [ours:
        data.react_attributes, e.g. binary AUs], sampled with the PLMS order and steps of cfg."""
        speaker = (speaker.to(self.abar.device) - self.attr_mean) / self.attr_std
        z, y = self.generate(speaker, K, self.cfg.plms_order, self.cfg.sample_steps, generator)
        return z, data.react_attributes(y * self.attr_std + self.attr_mean)


def chunk_starts(N, n, overlap):
    """Window offsets of chunks of n windows covering N windows with the given overlap (the last one flush)."""
    starts = list(range(0, max(N - n, 0) + 1, max(1, n - overlap)))
    return starts + ([N - n] if starts[-1] < N - n else [])


def decode_chunks(decoder, z, n, starts, w):
    """Decode each chunk of n latents and cross-fade the overlapping frames linearly. z (B, N, v) -> (B, N*w, D)."""
    N = z.shape[1]
    out, weight = 0, torch.zeros(N * w, 1, device=z.device)
    for a in starts:
        ramp = torch.ones(n * w, 1, device=z.device)
        edge = torch.linspace(0.05, 1, (n * w) // 2, device=z.device)[:, None]  # fade in / out at inner chunk edges
        ramp[:edge.shape[0]] = torch.minimum(ramp[:edge.shape[0]], edge) if a > 0 else 1
        ramp[-edge.shape[0]:] = torch.minimum(ramp[-edge.shape[0]:], edge.flip(0)) if a + n < N else 1
        y = decoder(z[:, a:a + n]) * ramp                                       # (B, n*w, D)
        out = out + F.pad(y, (0, 0, a * w, (N - a - n) * w))                    # (B, N*w, D)
        weight[a * w:(a + n) * w] += ramp
    return out / weight


# ----------------------------------------------------------------------------------------------------------------------
# Training: stage 1a (E_r, D_r), stage 1b (codebook, D_f), stage 2 (MLPSkipNet), one AdamW each

def start_stage(name, first, model, x, gen, cfg, n):
    """A stage's parameters (the only ones left trainable) and its global batches. At the stage's first step the
    codebook starts from encoded data (D_f), or the latent statistics are fitted (MLPSkipNet)."""
    L, B = n * cfg.window, cfg.batch
    model.requires_grad_(False)
    parts = dict(ae=[model.enc, model.dec], df=[model.vq, model.dec_f], diff=[model.den])[name]
    params = [p for part in parts for p in part.requires_grad_(True).parameters()]
    if name == "ae":
        return params, lambda: data.random_crops(gen, B, L, x["ya"])
    if name == "df":
        if first:
            with torch.no_grad():
                y, = data.random_crops(gen, B, L, x["ya"])                      # (B, L, D)
                z = model.enc(y).reshape(-1, cfg.latent // cfg.n_z)             # (B*n*n_z, v/n_z)
                model.vq.codes.copy_(z[torch.randint(len(z), (cfg.codebook,), generator=gen).to(z.device)])
        return params, lambda: data.random_crops(gen, B, L, x["ya"], x["ym"])
    with torch.no_grad():                                                       # E_r is frozen: encode once
        zl = torch.cat([model.enc(b) for b in x["ya"].split(256)])              # (M, Nw, v)
        zc = torch.cat([model.enc(b) for b in x["ca"].split(256)])              # [ours] listeners' E_r on the speaker
        if first:
            model.z_mean.copy_(zl.flatten(0, 1).mean(0)), model.z_std.copy_(zl.flatten(0, 1).std(0) + 1e-4)
        zl, zc = model.znorm(zl), model.znorm(zc)

    def batch():  # n consecutive window latents of listener (z0) and speaker (c), t ~ U{1..T}, ε ~ N(0, I)
        z0, c = data.random_crops(gen, B, n, zl, zc)                            # (B, n, v) each
        t = torch.randint(1, cfg.t_train + 1, (B,), generator=gen).to(zl.device)
        eps = torch.randn(B, n * zl.shape[-1], generator=gen).to(zl.device)    # (B, n*v)
        if cfg.cond_drop > 0:                                                   # [ours] the null condition: zeros
            c = c * (torch.rand(B, 1, 1, generator=gen) >= cfg.cond_drop).to(c)
        return z0.flatten(1), c.flatten(1), t, eps
    return params, batch


def train(cfg):
    """The three stages on one step counter. Every eval_every steps of a stage and at its end: (stage 2) val scores,
    then a checkpoint with all --resume needs. torchrun: each rank draws the global batch and trains on its shard."""
    device = data.pick_device(cfg.device)
    _, world = data.ddp_setup(device)
    data.seed_all(cfg.seed)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    # The train segments as whole windows, and the model with its normalisers (buffers) fitted to them
    path = data.resolve_data_first(cfg.data, "listener", cfg.preset)           # rank 0 makes the world first
    items = data.load_listener_split(path, "train")
    ya, ca, ym = data.whole_windows(items, cfg.window, cfg.seq_windows or 1)    # (M, L, D), (M, L, D), (M, L, F)
    n = cfg.seq_windows or ya.shape[1] // cfg.window
    if cfg.overlap >= n:
        raise data.UserError(f"--overlap {cfg.overlap}: expected fewer than the {n} windows of a chunk")
    dims = dict(d_attr=ya.shape[-1], d_mot=ym.shape[-1], n_win=n)
    model = LBD(cfg, **dims).to(device)
    both = torch.cat([ya, ca]).flatten(0, 1)                                    # E_r reads both people
    model.attr_mean.copy_(both.mean(0)), model.attr_std.copy_(both.std(0).clamp_min(0.05))
    # [ours] D_f learns motion about each clip's resting face (its mean) in raw units over one scale, so that its loss
    # weighs the channels that move most (as FD / MSE do); per-channel std 1 with resting faces left D_f static.
    ym = ym - ym.mean(1, keepdim=True) + ym.flatten(0, 1).mean(0)                # (M, L, F): one resting face
    model.mot_mean.copy_(ym.flatten(0, 1).mean(0)), model.mot_std.fill_(float((ym - model.mot_mean).std()))
    data.say(f"device {device} | data {path} | {len(items)} train segments of {ya.shape[1]} frames, "
             f"D={dims['d_attr']}, F={dims['d_mot']} | chunks of n={n} windows x w={cfg.window} frames | "
             f"{sum(p.numel() for p in model.parameters()):,} parameters")
    data.save_config(cfg, cfg.out)
    a_mean, a_std = model.attr_mean, model.attr_std                             # x: normalised, on the device
    x = dict(ya=(ya.to(device) - a_mean) / a_std, ca=(ca.to(device) - a_mean) / a_std,
             ym=(ym.to(device) - model.mot_mean) / model.mot_std)
    # A fresh or resumed run (weights, step, logs, every random stream), then the stages on one step counter
    gen = torch.Generator().manual_seed(cfg.seed)                               # rows, offsets, t, ε, codebook init
    ckpt = Path(cfg.out) / "ckpt.pt"
    fresh = dict(step=0, stage=None, metrics=dict(log={"ae": [], "df": [], "diff": []}, train_seconds=0.0))
    ck = (cfg.resume and data.resume_checkpoint(ckpt, METHOD, model, [gen])) or fresh
    step, hist = ck["step"], dict(ck["metrics"])                                # hist: the last val scores
    log, t0 = hist.pop("log"), time.time() - hist.pop("train_seconds")
    k = [cfg.steps, max(1, cfg.steps // 5), cfg.steps] if cfg.steps else [cfg.ae_steps, cfg.df_steps, cfg.diff_steps]
    ends = np.cumsum(k).tolist()                                                # the stages' ends on one step counter
    pbar = tqdm(total=ends[-1], initial=step, desc="LBD", dynamic_ncols=True, mininterval=2, disable=not data.is_main())
    for name, lo, hi in zip(["ae", "df", "diff"], [0] + ends[:-1], ends):      # each from the last one's end
        if step >= hi:
            continue
        model.train()
        params, batch = start_stage(name, step == lo, model, x, gen, cfg, n)
        opt, scaler = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0), data.grad_scaler(device, cfg.dtype)
        if ck["stage"] == name:                                                 # resumed inside this stage
            opt.load_state_dict(ck["optimizer"]), scaler.load_state_dict(ck["scaler"])
        ids = [device] if device.type == "cuda" else None
        fwd = model if world == 1 else nn.parallel.DistributedDataParallel(model, device_ids=ids)  # syncs the stage
        fwd = torch.compile(fwd) if cfg.compile else fwd
        while step < hi:
            for g in opt.param_groups:                                          # cosine decay within the stage
                g["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - lo) / (hi - lo)))
            with data.autocast(device, cfg.dtype):
                loss = fwd(name, *[data.shard(b) for b in batch()])
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt), torch.nn.utils.clip_grad_norm_(params, 1.0)
            scaler.step(opt), scaler.update()
            step += 1
            log[name].append(loss.item())                                       # rank 0's shard under torchrun
            pbar.update(1), pbar.set_postfix(stage=name, loss=f"{loss.item():.4f}", refresh=False)
            if (step - lo) % cfg.eval_every and step < hi:
                continue
            if name == "diff" and data.is_main():                               # val check, 8 speakers, no FRDist
                hist.update(metrics.quick_react(data.load_listener_split(path, "val")[:8], model, cfg.n_samples,
                                                cfg.seed, data.say, f"step {step}: "))
            data.say(f"step {step} [{name}] loss {np.mean(log[name][-50:]):.4f} (first 50: "
                     f"{np.mean(log[name][:50]):.4f}) {time.time() - t0:.0f}s")
            save_checkpoint(ckpt, {
                "model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                "step": step, "stage": name, "config": dataclasses.asdict(cfg), "dims": dims,
                "data_path": str(path), "rng": data.rng_state([gen]),
                "metrics": {**hist, "log": log, "train_seconds": time.time() - t0}})
    pbar.close(), data.say(f"training done in {time.time() - t0:.1f}s, checkpoint {ckpt}")
    data.check_in_sync(model), data.ddp_teardown()
    return model


# ----------------------------------------------------------------------------------------------------------------------
# Sampling and evaluation

@torch.no_grad()
def sample(cfg):
    """A checkpoint's K reactions per speaker (LBD.react), timed, scored, written and drawn by metrics.sample_react."""
    device = data.pick_device(cfg.device)
    data.seed_all(cfg.seed)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    ck = load_checkpoint(cfg.ckpt or Path(cfg.out) / "ckpt.pt")
    tcfg = Config(**{**ck["config"], **{k: getattr(cfg, k) for k in ("plms_order", "sample_steps", "guidance")}})
    check_config(tcfg, "sample")                                                # the checkpoint's net and --guidance
    model = LBD(tcfg, **ck["dims"]).to(device).eval()
    model.load_state_dict(ck["model"])
    path = Path(data.resolve_data(cfg.data, "listener", cfg.preset)) if cfg.data else Path(ck["data_path"])
    motion = lambda z: model.decode_f(z)[0] * model.mot_std + model.mot_mean   # 3DMM branch: (B, n, v) -> (B, L, F)
    return metrics.sample_react(cfg.out, path, cfg.split, cfg.eval_speakers, model.react, motion, cfg.n_samples,
                                sampler=f"PLMS-{cfg.plms_order} S={cfg.sample_steps} g={cfg.guidance:g} on {device}",
                                where=f"device {device} | ", seed=cfg.seed, model_only=cfg.model_only)


def main(argv=None, mode="train"):
    cfg = parse_config(sys.argv[1:] if argv is None else argv, mode)
    return train(cfg) if mode == "train" else sample(cfg)


if __name__ == "__main__":
    cli()
