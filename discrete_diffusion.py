"""discrete_diffusion.py: DiffListener, a listener's whole reaction window at once by discrete diffusion over VQ tokens.

A fusion network turns the speaker's face, its frame-to-frame differential, MFCC audio and transcript into R^S;
mask-and-replace discrete diffusion (T = 100) over the listener's VQ tokens (K codes + [MASK]) denoises the window from
all-[MASK] given R^S; the VQ-VAE decoder (vqvae.py, the only method file imported) makes 3DMM motion. Long talks:
half-overlapping windows denoised jointly, a token's p(x0) averaged over its windows (MultiDiffusion, arXiv 2302.08113).

Papers: DiffListener (ICASSP 2025) arXiv 2502.06822; VQ-Diffusion arXiv 2111.14822 (process, x0-parameterised denoiser,
top-r truncation) and 2205.16007; D3PM arXiv 2107.03006. Data: `trevor`, L2L-trevor's twin (one listener, many guests).
Codec: the paper's naive VQ-VAE, K = 256, per-channel std (vqvae.py `--norm none,none --scale channel`; on vqvae.py's
one-std default it scores worse, README). The paper's configuration is train.py's `discrete_diffusion_paper` run (Config
comments give paper values); our defaults differ: 20 exact-jump sampling steps (5x faster), the released VQ-Diffusion
schedule (mask-only in effect), fusion over 4-frame patches (CPU speed), Linear(listener beta) added to the timestep
embedding (the paper: a model per listener), cosine lr decay; no importance sampling of t, no weight EMA. Substitute:
BERT -> a word encoder trained from scratch on the training split's words (kept in the checkpoint).

Shapes: B batch, T frames (30 fps), L tokens (= T / r), K codes ([MASK] = index K), D = 56 motion dims, F audio
features (4 rows per frame), N words, W windows, d model width.

    python discrete_diffusion.py --preset smoke      # seconds: trevor-tiny, a tiny model (runs/..-smoke)
    python discrete_diffusion.py                     # default, trevor (trains <out>/vq/ckpt.pt first if missing)
    python discrete_diffusion.py sample              # metrics table, npy + GIF + PNG, long conversation, timing
    torchrun --standalone --nproc_per_node 2 discrete_diffusion.py --preset smoke   # data-parallel (DDP)
"""
import dataclasses
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from tqdm import tqdm

import data
import metrics
import vqvae  # stage 1 (the codec), the only method file this one imports

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
    fuse_stride: int = 4                  # frames per fusion position (1 = per frame: the paper, the full preset)
    text_layers: int = 1                  # word-encoder Transformer layers (full: 2)
    d_text: int = 64                      # word-encoder width (full: 256)
    n_mfcc: int = 40                      # MFCC coefficients, 4 rows per frame (full: 128)
    dropout: float = 0.1                  # dropout in attention and MLPs
    diffusion_steps: int = 100            # T of the diffusion (paper: 100)
    mask_end: float = 0.99999             # gamma_bar_T, the final mask probability (VQ-Diffusion code; its paper: 0.9)
    replace_mass: float = 1e-6            # K * beta_bar_T (VQ-Diffusion code: 1e-6; its paper: 0.1; 0 = absorbing)
    aux_weight: float = 5e-4              # lambda of the auxiliary x0 cross-entropy (VQ-Diffusion: 5e-4)
    truncation: float = 0.86              # top-r truncation of p(x0) when sampling (VQ-Diffusion: 0.86; 1.0 = off)
    sample_steps: int = 20                # reverse steps when sampling (0 = all T, ancestral, the paper; < T: jumps)
    diff: bool = True                     # use the facial differential (--no-diff: DiffListener's ablation)
    text: bool = True                     # use the transcript (--no-text: DiffListener's ablation)
    identity: bool = True                 # [ours] condition on the listener's shape beta (--no-identity: the paper)
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


def check_config(cfg, mode):
    """A user's impossible values -> data.UserError naming the flag (the VQ's r is checked once the VQ is loaded)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want = lambda k, what: f"--{k.replace('_', '-')} {getattr(cfg, k)}: expected {what}"
    rules = [(cfg.d_model % max(cfg.n_heads, 1) == 0, want("n_heads", f"a divisor of --d-model {cfg.d_model}")),
             (cfg.d_text % max(1, cfg.d_text // 16) == 0, want("d_text", "a multiple of its heads, d_text // 16")),
             (cfg.clip_frames % max(cfg.fuse_stride, 1) == 0, want("clip_frames", "a multiple of --fuse-stride")),
             (0 <= cfg.sample_steps <= cfg.diffusion_steps, want("sample_steps", f"0 (all) .. {cfg.diffusion_steps}")),
             (0 <= cfg.dropout < 1, want("dropout", "a probability in [0, 1)")),
             (0 < cfg.truncation <= 1, want("truncation", "a mass in (0, 1]")),
             (0 < cfg.mask_end <= 1 - cfg.replace_mass, want("mask_end", "a probability <= 1 - --replace-mass")),
             (mode != "train" or cfg.batch_size % world == 0, want("batch_size", f"a multiple of {world} processes"))]
    data.check_fields(cfg, positive=["steps", "batch_size", "lr", "clip_frames", "crop_stride", "d_model", "n_layers",
                                     "n_heads", "fuse_stride", "d_text", "n_mfcc", "diffusion_steps", "eval_every",
                                     "n_eval", "n_samples", "long_seconds", "time_runs", "time_batch"],
                      non_negative=["warmup", "n_fuse", "text_layers", "max_test", "weight_decay", "aux_weight",
                                    "replace_mass"], rules=rules,
                      choices=dict(dtype=("float32", "bfloat16", "float16"), split=("train", "val", "test")))


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
    sched = dict(abar=F.pad(abar, (1, 0), value=1.0), bbar=F.pad(kbbar / K, (1, 0)), gbar=F.pad(gbar, (1, 0)),
                 K=K, T=T, absorbing=replace_mass == 0)                # (T+1,) each, slot 0 = t = 0
    a, b, g = jump_params(sched, torch.arange(1, T + 1), torch.arange(T))  # every one-step jump t-1 -> t
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
    p0 (B, L, K) x0-distribution (one-hot: the true posterior); x_t (B, L) in 0..K; t, s (B,) or int, s < t.
    -> (B, L, K+1), summing to p0's total mass (1 unless truncated)."""
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
    """VQ-Diffusion's top-r truncation of p(x0): the most probable codes while the mass before each is < r (top-1
    always kept), renormalised. (VQ-Diffusion sets the dropped log-probs to -70 and Gumbel-max samples the unnormalised
    posterior, which scales every state, [MASK] included, by the kept mass: the draw of the renormalised p(x0), the
    same chance of unmasking as untruncated, only the codes change.) p0 (..., K) -> (..., K)."""
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
    """MFCC rows (4 per frame) -> a vector per frame: conv k5 s2, k5 s2, k5 s1, k3 dil. 2; receptive field 0.375 s."""

    def __init__(self, n_feat, d):
        super().__init__()
        c = d // 2
        self.net = nn.Sequential(nn.Conv1d(n_feat, c, 5, 2, 2), nn.GELU(), nn.Conv1d(c, c, 5, 2, 2), nn.GELU(),
                                 nn.Conv1d(c, c, 5, 1, 2), nn.GELU(), nn.Conv1d(c, d, 3, 1, 2, dilation=2))

    def forward(self, a):                                              # (B, 4T, F) -> (B, T, d)
        return self.net(a.transpose(1, 2)).transpose(1, 2)


class TextEncoder(nn.Module):
    """BERT's stand-in, from scratch: word embedding + sinusoid(end frame) -> Transformer -> d, + sinusoid(end)."""

    def __init__(self, n_words, d_text, d, layers, dropout):
        super().__init__()
        self.emb = nn.Embedding(n_words, d_text, padding_idx=0)
        self.blocks = nn.ModuleList(Block(d_text, max(1, d_text // 16), dropout) for _ in range(layers))  # 16 / head
        self.proj = nn.Linear(d_text, d)

    def forward(self, words, end):                                     # (B, N), (B, N) frames -> (B, N, d)
        keep = words > 0
        h = self.emb(words) + sinusoid(end, self.emb.embedding_dim)     # (B, N, d_text)
        for blk in self.blocks:
            h = blk(h, keep=keep)
        return self.proj(h) + sinusoid(end, self.proj.out_features), keep


class Fusion(nn.Module):
    """R^S: e = Lin_F(F) + Lin_D(Delta) + PE -> CM1 (attend to audio) -> CM2 (attend to words) -> n_fuse self-attention
    layers. [ours] fuse_stride s > 1: Lin_F / Lin_D map patches of s frames, R^S has T/s positions (PEs in frames)."""

    def __init__(self, cfg, n_feat, n_words, D=56):
        super().__init__()
        d, h, p, s = cfg.d_model, cfg.n_heads, cfg.dropout, cfg.fuse_stride
        self.s, self.d = s, d
        self.lin_f = nn.Conv1d(D, d, s, s)                            # = Linear(D, d) when s = 1
        self.lin_d = nn.Conv1d(D, d, s, s) if cfg.diff else None
        self.audio, self.cm1 = AudioEncoder(n_feat, d), Block(d, h, p, cross=True)
        self.text = TextEncoder(n_words, cfg.d_text, d, cfg.text_layers, p) if cfg.text else None
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
        d, self.K, self.T = cfg.d_model, K, cfg.diffusion_steps
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
        assert self.ident is None or beta is not None, "this model is conditioned on the listener identity: pass beta"
        ident = None if self.ident is None else self.ident((beta.to(R) - self.beta_mean) / self.beta_std)  # (B, d)
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
        """Reverse process from all-[MASK]. kv: batch*W windows (sample-major), window w on tokens [starts[w], +L); a
        token's p(x0) = mean over its windows. steps < T: exact jumps on t_i = round(i T / S). -> (batch, n_tokens)."""
        S, K, W, dev = steps or self.T, self.K, len(starts), self.pos.weight.device
        assert 1 <= S <= self.T
        idx = (torch.tensor(starts, device=dev)[:, None] + torch.arange(L, device=dev)).view(-1)  # (W*L,)
        count = torch.bincount(idx, minlength=n_tokens).double()      # (N,) windows covering each token
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


# ----------------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------------
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


def train(cfg):
    device = data.pick_device(cfg.device)
    _, world = data.ddp_setup(device)
    data.seed_all(cfg.seed)
    cfg.data = str(data.resolve_data(cfg.data, "listener", cfg.preset))
    cfg.vq = cfg.vq or str(Path(cfg.out) / "vq" / "ckpt.pt")
    flags = ["--out", str(Path(cfg.vq).parent), "--preset", cfg.preset, "--norm", "none,none", "--scale", "channel"]
    flags += [] if cfg.preset == "smoke" else ["--codebook-size", "256"]  # the paper's naive codec, trained if missing
    vq = vqvae.load_stage(cfg.vq, cfg.data, cfg.preset, flags, METHOD)  # frozen; of this preset and data, else --vq
    if cfg.clip_frames % vq.r:
        raise data.UserError(f"--clip-frames {cfg.clip_frames}: expected a multiple of the VQ's r = {vq.r} ({cfg.vq})")
    tr = data.load_windows(cfg.data, "train", vq, cfg.clip_frames, cfg.crop_stride, cfg.n_mfcc)  # builds the vocab
    va = data.load_windows(cfg.data, "val", vq, cfg.clip_frames, cfg.clip_frames, cfg.n_mfcc, tr["vocab"])
    meta = dict(K=vq.K, r=vq.r, n_feat=tr["feat"].shape[-1], vocab=tr["vocab"], L=cfg.clip_frames // vq.r,
                D_id=tr["beta"].shape[-1])
    model = build(cfg, meta, device)
    for k, v in data.window_stats(tr, facial_differential).items():  # the train split's conditioning statistics
        getattr(model, k).copy_(v)
    out, step, hist = Path(cfg.out), 0, dict(loss=[], val=[])
    if tr["no_audio"]:
        data.say(f"[discrete_diffusion] audio branch off: {tr['no_audio']} of {len(tr['n'])} train segments have no "
                 f"audio in {cfg.data} (their MFCC input is zeros)")
    data.say(f"[discrete_diffusion] {len(data.all_windows(tr)[0])} train windows of {meta['L']} tokens, K = {vq.K}, "
             f"{len(tr['vocab'])} words; {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters; "
             f"device {device} x {world}")
    data.save_config(cfg, out)                                         # prints the config, writes config.json
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.96), weight_decay=cfg.weight_decay)
    scaler = data.grad_scaler(device, cfg.dtype)
    gen = torch.Generator().manual_seed(cfg.seed)                     # batches, t and q_sample noise (all ranks)
    ck = cfg.resume and data.resume_checkpoint(out / "ckpt.pt", METHOD, model, [gen])  # weights, random streams
    if ck:
        opt.load_state_dict(ck["optimizer"]), scaler.load_state_dict(ck["scaler"])
        step, hist = ck["step"], ck["metrics"]
    val = [v[:cfg.n_eval] for v in data.all_windows(va)]              # validation windows (seg, crop)
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    net = torch.compile(net) if cfg.compile else net
    sched, t0 = model.sched, time.time()
    bar = tqdm(total=cfg.steps, initial=step, desc=METHOD, dynamic_ncols=True, mininterval=2,
               disable=not data.is_main())
    while step < cfg.steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        b = data.get_batch(tr, *data.draw_windows(tr, cfg.batch_size, gen))  # the global batch, alike on every rank
        t = torch.randint(1, model.T + 1, (cfg.batch_size,), generator=gen)  # t ~ U{1..T}
        x_t = q_sample(sched, b["tok"], t, gen)                        # x_t ~ q(x_t | x0)
        x0, *cond = (b[k] for k in ("tok", "spk", "feat", "wid", "wend", "beta"))  # the target, then the condition
        x_t, t, x0, *cond = (data.shard(v).to(device) for v in (x_t, t, x0, *cond))  # this rank's rows
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
            _, pred = metrics.sample_windows(model, vq, va, *val, cfg.sample_steps or None, cfg.truncation, cfg.seed)
            hist["val"].append(metrics.validate_diff_listener(pred, va, *val, step, hist["loss"][-cfg.eval_every:],
                                                              log=tqdm.write))
            save_checkpoint(out / "ckpt.pt", dict(model=model.state_dict(), optimizer=opt.state_dict(), step=step,
                                                  scaler=scaler.state_dict(), rng=data.rng_state([gen]),
                                                  config=dataclasses.asdict(cfg), metrics=hist, meta=meta))
    bar.close()
    data.check_in_sync(model)
    data.say(f"[discrete_diffusion] trained to step {step} in {time.time() - t0:.1f} s; checkpoint {out / 'ckpt.pt'}")
    data.ddp_teardown()
    return out / "ckpt.pt"


# ----------------------------------------------------------------------------------------------------------------------
# Sampling and evaluation (the evaluation protocol itself is metrics.evaluate_diff_listener)
# ----------------------------------------------------------------------------------------------------------------------
def sample(cfg, other_data=False):
    """The checkpoint's listeners, scored, timed and rendered by metrics.evaluate_diff_listener (its data or --data)."""
    device = data.pick_device(cfg.device)
    data.seed_all(cfg.seed)
    out, path = Path(cfg.out), Path(cfg.ckpt or Path(cfg.out) / "ckpt.pt")
    ck = load_checkpoint(path, device)
    mcfg = Config(**ck["config"])
    model = build(mcfg, ck["meta"], device)
    model.load_state_dict(ck["model"])
    model.eval()
    data_path = str(data.resolve_data(cfg.data, "listener", cfg.preset)) if other_data else mcfg.data
    vq = vqvae.load_stage(mcfg.vq, data_path, mcfg.preset, [], METHOD, training=False)  # the model's own codec
    T, steps, r = mcfg.clip_frames, min(cfg.sample_steps, model.T) or None, cfg.truncation
    print(f"[discrete_diffusion] {path} (step {ck['step']}), data {data_path}, split {cfg.split}, K = {vq.K}, "
          f"window {T} frames, truncation r = {r}, steps {steps or model.T}")
    te, tr = (data.load_windows(data_path, split, vq, T, T, mcfg.n_mfcc, ck["meta"]["vocab"])  # the train split's words
              for split in (cfg.split, "train"))
    seg, crop = [v[:cfg.max_test or None] for v in data.all_windows(te)]
    return metrics.evaluate_diff_listener(model, vq, te, tr, seg, crop, out, steps=steps, r=r, n_samples=cfg.n_samples,
                                          long_seconds=cfg.long_seconds, time_runs=cfg.time_runs,
                                          time_batch=cfg.time_batch, device=device, seed=cfg.seed)


def main(argv=None, mode="train"):
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse_config(argv, mode)
    return train(cfg) if mode == "train" else sample(cfg, any(a.split("=")[0] == "--data" for a in argv))


if __name__ == "__main__":
    cli()
