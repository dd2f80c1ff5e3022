"""diff_transformer.py: DiffSpeaker, speech-driven 3D facial animation with a diffusion Transformer.

A diffusion model denoises a whole vertex-displacement sequence in parallel, conditioned on speech and a speaking-style
id, through biased conditional attention: [style, step] tokens prepended to the keys/values (never the queries), a
two-sided periodic ALiBi self-attention bias, diagonal cross-attention (frame i sees audio frame i). It predicts x0,
trains on vertex + velocity MSE and samples with DDIM (50 steps, eta = 0); the baseline FaceFormerAR (--arch ar)
decodes frame by frame as FaceFormer does.

Papers: DiffSpeaker arXiv 2402.05712; FaceFormer arXiv 2112.05329; ALiBi arXiv 2108.12409; DDPM arXiv 2006.11239;
DDIM arXiv 2010.02502; zero terminal SNR arXiv 2305.08891; CodeTalker arXiv 2301.02379 (the LVE and FDD metrics).
Substitute: wav2vec2/HuBERT (pretrained, not available here) -> 20 MFCC + deltas + CMVN on wav2vec2's 50 Hz grid
through a dilated conv encoder (33 rows = 0.66 s of context). 20, not 40: each training style comes with one voice
and the upper cepstra resolve its pitch, which lets the net tie a style to a voice instead of to the lips.
Deviations (each a flag; --no-zero-snr --no-norm --no-final-ln --no-keep-best is the paper's configuration): motion
divided by one global scalar sigma (the released code trains on raw metres, where the noise swamps the signal); a
zero terminal SNR schedule (with normalised motion x_999 keeps enough of x0 for the net to ignore the audio, and
DDIM from pure noise drifts); a LayerNorm before the zero-initialised head; sampling from the lowest-val-LVE weights.
Shape letters: B batch, T motion frames (30 fps), N audio rows (50 Hz), F audio features, D = V*3 motion dims,
V vertices, H heads, C condition tokens (2; 0 for --cond add and --arch ar), S = C + T keys, d model width.

    python diff_transformer.py --preset smoke                 # seconds on a CPU -> runs/diff_transformer-smoke
    python train.py --model diff_transformer                  # default preset: minutes on a CPU
    python train.py --model diff_transformer --arch ar --out runs/diff_transformer_ar       # the AR baseline
    python train.py --model all --table talking_face          # paper, model, AR, nobias, nodiag, plain rows
    python sample.py --model diff_transformer --ar-ckpt runs/diff_transformer_ar/ckpt.pt    # table, speed, GIFs
    python sample.py --model diff_transformer --audio speech.wav --style 3                  # animate any wav
    torchrun --standalone --nproc_per_node 2 diff_transformer.py --preset smoke            # DDP (gloo on CPU)
"""
import dataclasses
import json
import math
import os
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

METHOD = "diff_transformer"

# ---------------------------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass
class Config:
    data: str = "vocaset"  # a twin (vocaset: the VOCASET-layout twin) or a folder; sample: the checkpoint's if unset
    out: str = "runs/diff_transformer"  # run folder: ckpt.pt, config.json; sample writes metrics.json, GIFs there
    preset: str = "default"  # smoke (tiny world, seconds) | default (CPU minutes) | full (paper sizes, GPU)
    seed: int = 0  # seeds python, numpy and torch
    device: str = "auto"  # auto -> cuda, mps, cpu
    dtype: str = "float32"  # float32 | bfloat16 | float16 (autocast; float16 with loss scaling)
    compile: bool = False  # torch.compile the network for training (the checkpoint holds the plain module)
    resume: bool = False  # continue exactly from <out>/ckpt.pt (weights, optimiser, step, random state)
    arch: str = "diffusion"  # diffusion (DiffSpeaker) | ar (FaceFormer-style autoregressive baseline)
    self_bias: str = "alibi"  # self-attention bias: alibi (two-sided periodic, paper) | none (ablation)
    cross_mask: str = "diag"  # cross-attention: diag (frame i sees audio row i, paper) | full (ablation)
    cond: str = "kv"  # kv: [style, step] tokens in keys/values (paper) | add: added to the input (ablation)
    d_model: int = 128  # decoder width d (paper 512 on VOCASET)
    d_ffn: int = 256  # feed-forward width (paper 1024)
    n_heads: int = 4  # attention heads H (paper 4)
    n_layers: int = 1  # decoder layers (paper 1)
    audio_width: int = 64  # audio encoder width a (the paper's wav2vec2 is 768 wide)
    dropout: float = 0.1  # dropout probability everywhere (paper 0.1)
    period: int = 30  # PPE and ALiBi period p in frames, = fps (paper 30 on VOCASET, 25 on BIWI)
    zero_snr: bool = True  # rescale the schedule to abar_T = 0 (ours; the paper's schedule: --no-zero-snr)
    norm: bool = True  # divide the motion by one global scalar sigma (ours; the paper's raw displacements: --no-norm)
    final_ln: bool = True  # LayerNorm before the zero-initialised head (ours; the released code has none)
    n_mfcc: int = 20  # MFCC coefficients, x3 with deltas (our stand-in for wav2vec2 features)
    steps: int = 3000  # optimiser steps (paper: 9000 epochs of VOCASET)
    batch_size: int = 16  # clips per global batch, split over the ranks under torchrun (paper 32)
    lr: float = 1e-3  # AdamW learning rate, constant (paper 1e-4, constant)
    min_frames: int = 64  # shortest training crop in frames (paper: whole sequences)
    max_frames: int = 150  # longest training crop in frames
    time_mask_p: float = 0.05  # probability that a time mask starts at an audio row (wav2vec2 fine-tuning: 0.05)
    time_mask_span: int = 10  # audio rows per time mask (wav2vec2 fine-tuning: 10)
    grad_clip: float = 1.0  # gradient-norm clip
    eval_every: int = 500  # steps between val evaluations and checkpoints
    keep_best: bool = True  # sample from the weights of the lowest val LVE (ours; the paper: the last step)
    n_val: int = 40  # val clips scored every eval_every steps (styles cycled)
    ddim_steps: int = 50  # DDIM sampling steps (paper 50)
    reps: int = 10  # sample: repetitions, seeds 1234, 0, 10, ..., 80 (paper 10; the AR baseline is deterministic: 1)
    ckpt: str = ""  # sample: checkpoint to evaluate (default <out>/ckpt.pt)
    ar_ckpt: str = ""  # sample: checkpoint of an --arch ar run, scored as the row baseline:autoregressive
    split: str = "test"  # sample: split to evaluate
    audio: str = ""  # sample: animate this wav instead of the split (any rate, mono or stereo)
    style: int = 0  # sample --audio: training-style id
    threads: int = 0  # torch CPU threads (0 = torch's default)


PRESETS = {
    "smoke": dict(out="runs/diff_transformer-smoke", d_model=32, d_ffn=64, audio_width=16, steps=40, batch_size=4,
                  min_frames=24, max_frames=48, eval_every=40, ddim_steps=10, lr=2e-3, reps=1),
    "default": {},
    "full": dict(d_model=512, d_ffn=1024, audio_width=256, batch_size=32, lr=1e-4, steps=200_000, min_frames=600,
                 max_frames=600, eval_every=5000),
}
T_TRAIN = 1000  # diffusion steps
AUDIO_RATE = 50  # audio feature rows per second (wav2vec2's grid)


def check_config(cfg, mode):
    """The values a user can get wrong: the first rule broken -> a one-line data.UserError."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    data.check_fields(cfg, positive=["steps", "batch_size", "lr", "d_model", "d_ffn", "n_heads", "n_layers",
                                     "audio_width", "period", "n_mfcc", "min_frames", "time_mask_span", "grad_clip",
                                     "eval_every", "n_val", "ddim_steps", "reps"], non_negative=["style", "threads"],
                      choices=dict(arch=("diffusion", "ar"), self_bias=("alibi", "none"), cross_mask=("diag", "full"),
                                   cond=("kv", "add"), dtype=("float32", "bfloat16", "float16")), rules=[
        (cfg.d_model % max(cfg.n_heads, 1) == 0, f"--d-model {cfg.d_model}: expected a multiple of --n-heads"),
        (cfg.audio_width < 8 or cfg.audio_width % 8 == 0, f"--audio-width {cfg.audio_width}: expected a multiple of 8"),
        (cfg.min_frames <= cfg.max_frames, f"--min-frames {cfg.min_frames}: expected at most --max-frames"),
        (0 <= cfg.dropout < 1 and 0 <= cfg.time_mask_p <= 1, "--dropout and --time-mask-p: expected probabilities"),
        (cfg.ddim_steps <= T_TRAIN, f"--ddim-steps {cfg.ddim_steps}: expected at most {T_TRAIN}"),
        (cfg.reps <= 10, f"--reps {cfg.reps}: expected at most 10 (the paper's seeds)"),
        (mode != "train" or cfg.batch_size % world == 0,
         f"--batch-size {cfg.batch_size}: expected a multiple of the {world} torchrun processes")])


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


# ---------------------------------------------------------------------------------------------------------------
# Audio features and encoder (the wav2vec2 stand-in)

def audio_features(wave, n_mfcc=20):
    """MFCC at 50 Hz + delta + delta-delta, per-utterance CMVN: (S,) -> (N, 3 * n_mfcc)."""
    return data.mfcc_deltas(wave, AUDIO_RATE, n_mfcc)


def time_mask(f, p, span):
    """Training only, wav2vec2 fine-tuning's SpecAugment: each row starts a mask of `span` zeroed rows w.p. p."""
    starts = (torch.rand(f.shape[0]) < p).float()  # (N,)
    hit = F.max_pool1d(F.pad(starts[None, None], (span - 1, 0)), span, 1)[0, 0]  # (N,) 1 inside a mask
    return f * (1 - hit)[:, None]  # (N, F)


class AudioEncoder(nn.Module):
    """Conv1d(k3) + 4 residual [dilated conv (1/2/4/8) -> per-row GroupNorm (ours: field stays 33 rows) -> GELU]."""

    def __init__(self, cfg):
        super().__init__()
        a = cfg.audio_width
        self.inp = nn.Conv1d(3 * cfg.n_mfcc, a, 3, padding=1)
        self.convs = nn.ModuleList(nn.Conv1d(a, a, 3, padding=r, dilation=r) for r in (1, 2, 4, 8))
        self.norms = nn.ModuleList(nn.GroupNorm(min(8, a), a) for _ in range(4))

    def forward(self, f, rows=None):  # (B, N, F), rows (B, N) 1 = real row -> (B, N, a)
        keep = (torch.ones(f.shape[:2]) if rows is None else rows.float())[:, None].to(f.device)  # (B, 1, N)
        h = self.inp(f.transpose(1, 2)) * keep  # (B, a, N); zeroed padding: a padded batch = per-sequence runs
        for conv, norm in zip(self.convs, self.norms):
            y = conv(h).transpose(1, 2)  # (B, N, a)
            h = (h + F.gelu(norm(y.reshape(-1, y.shape[-1])).view_as(y)).transpose(1, 2)) * keep  # residual
        return h.transpose(1, 2)  # (B, N, a)


# ---------------------------------------------------------------------------------------------------------------
# Biased conditional attention: bias, embeddings, the decoder layer

def alibi_slopes(H):
    """m_h = 2^(-8h/H), h = 1..H: for H = 4 that is 1/4, 1/16, 1/64, 1/256 (ALiBi, arXiv 2108.12409)."""
    return torch.tensor([2.0 ** (-8.0 * h / H) for h in range(1, H + 1)])


def periodic_alibi(T, period, slopes, n_cond=2, causal=False):
    """DiffSpeaker's self-attention bias, condition columns first with zero bias: (H, T, C + T). Key j <= query i:
    -m_h floor((i - j) / p); key j > i: -m_h floor((j - i - 1) / p) (two-sided periodic ALiBi)."""
    i, j = torch.arange(T)[:, None], torch.arange(T)[None]  # (T, 1), (1, T)
    gap = torch.where(j <= i, (i - j) // period, (j - i - 1) // period)  # (T, T) periods between frames
    bias = -slopes[:, None, None] * gap  # (H, T, T)
    if causal:  # FaceFormer: nothing above the diagonal
        bias = bias.masked_fill(j > i, float("-inf"))
    return F.pad(bias, (n_cond, 0))  # (H, T, C + T)


def tile_heads(bias, B, key_pad=None):
    """(H, T, S) bias + key padding (B, S), True = blocked -> (B*H, T, S) in nn.MultiheadAttention's b*H + h order."""
    out = bias.expand(B, *bias.shape)  # (B, H, T, S)
    if key_pad is not None:
        out = out.masked_fill(key_pad[:, None, None, :], float("-inf"))
    return rearrange(out, "b h t s -> (b h) t s")


def timestep_embedding(t, dim=768):
    """Sinusoidal step embedding, cos first, freq shift 0 (diffusers Timesteps(768, True, 0)): (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)  # (half,)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([args.cos(), args.sin()], -1)


def ppe_table(period, d):
    """FaceFormer periodic positional encoding: a sinusoid table of length p, tiled over time: (p, d)."""
    pos = torch.arange(period)[:, None].float()
    div = torch.exp(torch.arange(0, d, 2).float() * (-math.log(10000.0) / d))
    pe = torch.zeros(period, d)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * div), torch.cos(pos * div)
    return pe


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer: self-attention over [cond, motion], cross-attention over [cond, audio], FFN."""

    def __init__(self, d, ffn, H, p):
        super().__init__()
        self.ln1, self.sa = nn.LayerNorm(d), nn.MultiheadAttention(d, H, dropout=p, batch_first=True)
        self.ln2, self.ca = nn.LayerNorm(d), nn.MultiheadAttention(d, H, dropout=p, batch_first=True)
        self.ln3 = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, ffn), nn.GELU(), nn.Dropout(p), nn.Linear(ffn, d))
        self.drop = nn.Dropout(p)

    def forward(self, x, cond, mem, self_mask, cross_mask):  # x, mem (B, T, d); cond (B, C, d)
        h = self.ln1(x)
        kv = torch.cat([cond, h], 1)  # (B, C + T, d): condition tokens are keys/values, never queries
        x = x + self.drop(self.sa(h, kv, kv, attn_mask=self_mask, need_weights=False)[0])
        if cross_mask is None:  # the paper's diagonal mask, computed directly in O(T) instead of O(T^2)
            x = x + self.drop(self.diag_cross(self.ln2(x), cond, mem))
        else:
            kv = torch.cat([cond, mem], 1)  # (B, C + T, d)
            x = x + self.drop(self.ca(self.ln2(x), kv, kv, attn_mask=cross_mask, need_weights=False)[0])
        return x + self.drop(self.ff(self.ln3(x)))

    def diag_cross(self, h, cond, mem):
        """self.ca under DiffSpeaker's diagonal (T, C + T) mask: query i scores [cond, audio i] only: (B, T, d)."""
        C, H, d = cond.shape[1], self.ca.num_heads, h.shape[-1]
        W, b = self.ca.in_proj_weight, self.ca.in_proj_bias
        q = rearrange(F.linear(h, W[:d], b[:d]), "b t (h e) -> b t h e", h=H)  # (B, T, H, dh)
        kv = F.linear(torch.cat([cond, mem], 1), W[d:], b[d:])  # (B, C + T, 2d)
        k, v = rearrange(kv, "b s (two h e) -> two b s h e", two=2, h=H)  # each (B, C + T, H, dh)
        s = torch.cat([torch.einsum("bthe,bche->bthc", q, k[:, :C]), (q * k[:, C:]).sum(-1, keepdim=True)], -1)
        a = F.dropout((s / q.shape[-1] ** 0.5).softmax(-1), self.ca.dropout, self.training)  # (B, T, H, C + 1)
        a = a.to(v.dtype)  # float32 softmax under autocast, back to the values' dtype
        o = torch.einsum("bthc,bche->bthe", a[..., :C], v[:, :C]) + a[..., C:] * v[:, C:]  # (B, T, H, dh)
        return self.ca.out_proj(rearrange(o, "b t h e -> b t (h e)"))


# ---------------------------------------------------------------------------------------------------------------
# The models: DiffSpeaker's denoiser, and the FaceFormer-style autoregressive baseline

class DiffSpeaker(nn.Module):
    """Denoiser x_t -> x0_hat with biased conditional attention. https://arxiv.org/abs/2402.05712"""

    def __init__(self, cfg, D, n_style):  # FaceFormerAR's too: its modules differ only in the style and step parts
        nn.Module.__init__(self)
        self.cfg, d, N, ar = cfg, cfg.d_model, cfg.n_layers, isinstance(self, FaceFormerAR)
        self.n_cond, self.causal = (0, True) if ar else (2 if cfg.cond == "kv" else 0, False)
        self.audio = AudioEncoder(cfg)
        self.audio_proj = nn.Linear(cfg.audio_width, d)
        self.inp = nn.Linear(D, d)
        self.register_buffer("ppe", ppe_table(cfg.period, d), persistent=False)
        self.style = nn.Embedding(n_style, d if ar else d * N)  # AR: added to the input; else one token per layer
        if ar:
            self.start = nn.Parameter(torch.zeros(1, 1, D))  # the input of frame 0
        else:
            self.step = nn.Sequential(nn.Linear(768, d * N), nn.SiLU(), nn.Linear(d * N, d * N))
        self.layers = nn.ModuleList(DecoderLayer(d, cfg.d_ffn, cfg.n_heads, cfg.dropout) for _ in range(N))
        self.drop, self.ln = nn.Dropout(cfg.dropout), nn.LayerNorm(d) if cfg.final_ln else nn.Identity()
        self.head = nn.Linear(d, D)
        nn.init.zeros_(self.head.weight), nn.init.zeros_(self.head.bias)  # x0_hat = 0 (the template) at init

    def encode(self, feats, lengths):
        """Audio features per sequence [(N_i, F)] -> memory (B, max T, d); each is interpolated to exactly
        T_i frames *before* padding (the released code interpolates padded tensors and misaligns)."""
        n = torch.tensor([len(f) for f in feats])  # (B,) audio rows per sequence
        f = nn.utils.rnn.pad_sequence(list(feats), batch_first=True).to(self.inp.weight.device)  # (B, N, F)
        h = self.audio(f, torch.arange(f.shape[1])[None] < n[:, None]).transpose(1, 2)  # (B, a, N)
        out = [F.interpolate(h[b:b + 1, :, :n[b]], size=T, mode="linear", align_corners=True)[0].T  # (T, a)
               for b, T in enumerate(lengths)]
        return self.audio_proj(nn.utils.rnn.pad_sequence(out, batch_first=True))  # (B, T, d), no positions

    def masks(self, T, pad=None, B=1):
        """Self-attention bias and cross-attention mask for the actual T (no length cap), (B*H, T, C + T) each; the
        paper's diagonal cross mask is None (DecoderLayer.diag_cross), full sees every real row. pad: True = padding."""
        cfg, C, H = self.cfg, self.n_cond, self.cfg.n_heads
        B, dev = B if pad is None else pad.shape[0], self.inp.weight.device
        slopes = alibi_slopes(H) if cfg.self_bias == "alibi" else torch.zeros(H)
        kp = None if (pad is None or self.causal) else torch.cat([torch.zeros(B, C, dtype=torch.bool), pad.cpu()], 1)
        self_mask = tile_heads(periodic_alibi(T, cfg.period, slopes, C, self.causal), B, kp).to(dev)
        return self_mask, (None if cfg.cross_mask == "diag" else tile_heads(torch.zeros(H, T, C + T), B, kp).to(dev))

    def forward(self, x, t, mem, style, masks):
        """x_t (B, T, D), step t (B,), memory (B, T, d), style (B,) -> x0_hat (B, T, D). FaceFormerAR: x = the
        previous frames, t = None (no step token)."""
        T, d = x.shape[1], self.cfg.d_model
        tokens = [self.style(style)] if t is None else [self.style(style), self.step(timestep_embedding(t))]
        c = torch.stack(tokens, 1)  # (B, 2, d N): [style, step]; FaceFormerAR: (B, 1, d): [style]
        h = self.inp(x) + self.ppe[torch.arange(T, device=x.device) % self.cfg.period]  # (B, T, d)
        if self.n_cond == 0:  # --cond add and AR: style (+ step) added to the input tokens
            h = h + c[..., :d].sum(1, keepdim=True)
        h = self.drop(h)
        for n, layer in enumerate(self.layers):
            cond = c[:, :, n * d:(n + 1) * d] if self.n_cond else h[:, :0]  # (B, C, d): this layer's pair
            h = layer(h, cond, mem, *masks)
        return self.head(self.ln(h))


class FaceFormerAR(nn.Module):
    """The autoregressive baseline: DiffSpeaker's audio encoder and layer, causal periodic ALiBi, the style added
    to the input, the previous frames as input; decoded frame by frame. https://arxiv.org/abs/2112.05329"""
    __init__, encode, masks = DiffSpeaker.__init__, DiffSpeaker.encode, DiffSpeaker.masks  # C = 0, causal

    def forward(self, x_prev, mem, style, masks):
        """Previous frames (B, T, D) (see shift), memory (B, T, d), style (B,) -> frames (B, T, D)."""
        return DiffSpeaker.forward(self, x_prev, None, mem, style, masks)

    def shift(self, x0):
        """Teacher forcing input: the frames shifted right behind the start vector: (B, T, D) -> (B, T, D)."""
        return torch.cat([self.start.expand(x0.shape[0], 1, -1), x0[:, :-1]], 1)

    @torch.no_grad()
    def generate(self, mem, style):
        """Frame-by-frame decoding on the growing prefix (FaceFormer): O(T^2) network work: (B, T, D)."""
        B, T, _ = mem.shape
        sm, cm = self.masks(T)
        y = self.start.expand(B, 1, -1)  # (B, 1, D)
        for t in range(1, T + 1):
            mk = (sm[:, :t, :t].repeat(B, 1, 1), None if cm is None else cm[:, :t, :t].repeat(B, 1, 1))  # (B*H, t, t)
            y = torch.cat([y, self(y, mem[:, :t], style, mk)[:, -1:]], 1)  # (B, t + 1, D)
        return y[:, 1:]


# ---------------------------------------------------------------------------------------------------------------
# Diffusion and DDIM, the losses, normalisation

def scaled_linear_abar(n=T_TRAIN, b0=8.5e-4, b1=1.2e-2, zero_snr=False):
    """Scaled-linear betas (linear in sqrt(beta)) -> abar_t = prod(1 - beta): (n,) float64.
    zero_snr: shift and scale sqrt(abar) so that abar_T = 0 (Algorithm 1 of arXiv 2305.08891)."""
    betas = torch.linspace(b0 ** 0.5, b1 ** 0.5, n, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)
    if zero_snr:
        s = abar.sqrt()
        abar = ((s - s[-1]) * s[0] / (s[0] - s[-1])) ** 2
    return abar


def q_sample(x0, t, noise, abar):
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (Eq. 4 of arXiv 2006.11239), one t per sequence."""
    a = abar.to(x0.device)[t].float()[:, None, None]  # (B, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def ddim_step(x_t, x0_hat, a_t, a_prev):
    """One eta = 0 DDIM step (Eq. 12 of arXiv 2010.02502) from the predicted x0."""
    eps = (x_t - a_t ** 0.5 * x0_hat) / (1 - a_t) ** 0.5
    return a_prev ** 0.5 * x0_hat + (1 - a_prev) ** 0.5 * eps


def ddim_sample(net, x, abar, S=50):
    """net(x_t, tau) -> x0_hat; start from x = x_T. tau = [0, c, ..., (S-1)c] + 1 with c = T_TRAIN // S
    (steps_offset 1), high to low: S = 50 -> 981, ..., 1. The last step uses abar = 1: it returns x0_hat."""
    c = T_TRAIN // S
    for tau in (torch.arange(S) * c + 1).flip(0).tolist():
        a_prev = abar[tau - c].item() if tau - c >= 0 else 1.0
        x = ddim_step(x, net(x, tau), abar[tau].item(), a_prev)
    return x


def masked_losses(x0_hat, x0, valid, counts=None):
    """Vertex and velocity MSE over real frames (padding adds exactly 0): (B, T, D), (B, T, D), (B, T) bool ->
    (L_vert, L_vel). counts: the (frames, frame pairs) to divide by for one rank's share of a global batch."""
    m = valid.float()[..., None]  # (B, T, 1)
    D = x0.shape[-1]
    mv = m[:, 1:] * m[:, :-1]  # (B, T-1, 1)
    n_vert, n_vel = counts if counts is not None else (m.sum(), mv.sum().clamp(min=1))
    vert = (m * (x0_hat - x0) ** 2).sum() / (n_vert * D)
    dv = (x0_hat[:, 1:] - x0_hat[:, :-1]) - (x0[:, 1:] - x0[:, :-1])  # (B, T-1, D)
    return vert, (mv * dv ** 2).sum() / (n_vel * D)


def to_vertices(x, sigma, template):
    """Normalised (T, D) -> vertices (T, V, 3): undo the division by sigma, add the template back."""
    return (x * sigma).reshape(len(x), *template.shape) + template


@torch.no_grad()
def generate(model, feats, lens, style, seed=1234, ddim_steps=50):
    """Normalised motion for a batch of audio: DDIM, all frames in parallel, or AR decoding: (B, T, D)."""
    model.eval()
    mem = model.encode(feats, lens)  # (B, T, d), computed once for all DDIM steps
    style = style.to(mem.device)
    if isinstance(model, FaceFormerAR):
        return model.generate(mem, style)
    B, T, _ = mem.shape
    masks = model.masks(T, torch.arange(T)[None] >= torch.tensor(lens)[:, None])  # padding (B, T)
    x = torch.randn(B, T, model.head.out_features, generator=torch.Generator().manual_seed(seed))  # x_T
    net = lambda x_t, tau: model(x_t, torch.full((B,), tau, device=mem.device), mem, style, masks)
    return ddim_sample(net, x.to(mem.device), scaled_linear_abar(zero_snr=model.cfg.zero_snr), ddim_steps)


def predictor(model, items, sigma, ddim_steps):
    """predict(style, seed) -> vertices [(T_i, V, 3)] of every clip; style: one for every clip, or one per clip (n,)."""
    feats, lens = [it["feats"] for it in items], [len(it["disp"]) for it in items]

    def predict(style, seed):
        x = generate(model, feats, lens, torch.as_tensor(style).expand(len(items)), seed, ddim_steps).cpu()
        return [to_vertices(x[k, :n].numpy(), sigma, it["template"]) for k, (n, it) in enumerate(zip(lens, items))]
    return predict


# ---------------------------------------------------------------------------------------------------------------
# Training

def train_loss(net, model, batch, cfg, abar, device):
    """Vertex + velocity loss (weights 1 and 1) of this rank's rows of a global batch that every rank drew alike.
    The random numbers (time masks, t, noise) are drawn for the whole batch, so ranks match one process."""
    x0, feats, lens, style, pad = batch
    if cfg.time_mask_p > 0:
        feats = [time_mask(f, cfg.time_mask_p, cfg.time_mask_span) for f in feats]
    x0, style, pad = x0.to(device), style.to(device), pad.to(device)
    t = torch.randint(0, T_TRAIN, (x0.shape[0],), device=device) if cfg.arch == "diffusion" else None
    noise = torch.randn_like(x0) if cfg.arch == "diffusion" else None
    counts = None
    if dist.is_initialized():  # normalise by the global batch's frame counts; DDP averages over the ranks
        m = (~pad).float()
        counts = (m.sum() / dist.get_world_size(), (m[:, 1:] * m[:, :-1]).sum().clamp(min=1) / dist.get_world_size())
        T = max(data.shard(lens))  # this rank's longest clip
        x0, feats, lens = data.shard(x0)[:, :T], data.shard(feats), data.shard(lens)
        style, pad = data.shard(style), data.shard(pad)[:, :T]
        t, noise = (data.shard(t), data.shard(noise)[:, :T]) if t is not None else (None, None)
    with data.autocast(device, cfg.dtype):
        mem = model.encode(feats, lens)  # (B, T, d)
        masks = model.masks(x0.shape[1], pad)
        if cfg.arch == "ar":  # teacher forcing
            x0_hat = net(model.shift(x0), mem, style, masks)
        else:
            x0_hat = net(q_sample(x0, t, noise, abar), t, mem, style, masks)  # x0 prediction, one t per sequence
        return masked_losses(x0_hat.float(), x0, ~pad, counts)


def train(cfg):
    device, out = data.pick_device(cfg.device), Path(cfg.out)
    _, world = data.ddp_setup(device)
    data.seed_all(cfg.seed)
    features = lambda wave: audio_features(wave, cfg.n_mfcc)
    train_items, val_items, stats = data.talking_train_val(cfg.data, cfg.preset, features, cfg.norm)
    model = (FaceFormerAR if cfg.arch == "ar" else DiffSpeaker)(cfg, stats["D"], stats["n_style"]).to(device)
    opt, scaler = torch.optim.AdamW(model.parameters(), lr=cfg.lr), data.grad_scaler(device, cfg.dtype)
    rng = np.random.default_rng(cfg.seed)  # the data order: crop lengths, clips, offsets
    step, hist, best = 0, {}, None  # best: {"step", "lve", "model"} of the lowest val LVE
    if cfg.resume and (out / "ckpt.pt").exists():  # weights, optimiser, loss scale, every random stream: exact
        ck = load_checkpoint(out / "ckpt.pt", device)
        model.load_state_dict(ck["model"]), opt.load_state_dict(ck["optimizer"])
        if ck["scaler"]:  # float16 only
            scaler.load_state_dict(ck["scaler"])
        data.set_rng_state(ck["rng"], [rng])
        step, hist, best = ck["step"], ck["metrics"], ck.get("best")
    if data.is_main():
        print(f"{METHOD} ({cfg.arch}) on {device} x {world}{f', resumed at step {step}' if step else ''}; config:")
        print(json.dumps(dataclasses.asdict(cfg), indent=1))
        print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, D = {stats['D']}, "
              f"sigma = {stats['sigma']:.4g}, {len(train_items)} train clips")
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    net = torch.compile(model) if cfg.compile else model  # the checkpoint holds `model`, never the wrappers
    if world > 1:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    abar = scaled_linear_abar(zero_snr=cfg.zero_snr)
    bar = tqdm(total=cfg.steps, initial=step, desc=f"train {cfg.arch}", dynamic_ncols=True, mininterval=2,
               disable=not data.is_main())
    while step < cfg.steps:
        for g in opt.param_groups:
            g["lr"] = cfg.lr  # constant, as in the released code
        model.train()
        batch = data.talking_batch(train_items, rng, stats["sigma"], cfg.batch_size, cfg.min_frames, cfg.max_frames,
                                   AUDIO_RATE)  # random crops of one length, normalised by the global scalar sigma
        vert, vel = train_loss(net, model, batch, cfg, abar, device)
        opt.zero_grad(set_to_none=True)
        scaler.scale(vert + vel).backward()
        scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(opt), scaler.update()
        step += 1
        logged = [data.mean_over_ranks(x.float()) for x in (vert + vel, vert, vel)]  # the global batch's loss
        hist.setdefault("loss", []).append(round(logged[0], 5))
        bar.update(1)
        bar.set_postfix(loss=f"{logged[0]:.4f}", vert=f"{logged[1]:.4f}", vel=f"{logged[2]:.4f}")
        if (step % cfg.eval_every == 0 or step == cfg.steps) and data.is_main():
            vi = val_items[:cfg.n_val]  # val MSE (normalised), LVE, FDD; styles cycled over the unseen subjects
            preds = predictor(model, vi, stats["sigma"], cfg.ddim_steps)(torch.arange(len(vi)) % stats["n_style"], 1234)
            v = metrics.talking_val(preds, vi, stats["sigma"], stats["lip_idx"].numpy(), stats["upper_idx"].numpy())
            hist.setdefault("val", []).append({"step": step, **v})
            if best is None or v["lve"] < best["lve"]:  # keep a copy of the best-val weights
                best = {"step": step, "lve": v["lve"], "model": {k: x.detach().cpu().clone()
                                                                 for k, x in model.state_dict().items()}}
            tqdm.write(f"step {step}: loss {np.mean(hist['loss'][-50:]):.4f} | " +
                       " | ".join(f"{k} {x:.4g}" for k, x in v.items()) + f" | best step {best['step']}")
            save_checkpoint(out / "ckpt.pt", {
                "model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                "step": step, "config": dataclasses.asdict(cfg), "metrics": hist, "rng": data.rng_state([rng]), **stats,
                **({"best": best} if cfg.keep_best else {})})
    bar.close()
    data.check_in_sync(model)
    data.ddp_teardown()
    return out / "ckpt.pt"


# ---------------------------------------------------------------------------------------------------------------
# Sampling

def load_model(path, device="cpu", best=True):
    """(model, ck) rebuilt from the checkpoint alone; the best-val weights if training kept them and `best`."""
    ck = load_checkpoint(path, "cpu")
    cfg = Config(**{k: v for k, v in ck["config"].items() if k in Config.__dataclass_fields__})
    model = (FaceFormerAR if cfg.arch == "ar" else DiffSpeaker)(cfg, ck["D"], ck["n_style"])
    model.load_state_dict(ck["best"]["model"] if "best" in ck and best else ck["model"])
    return model.to(device).eval(), ck


@torch.no_grad()
def sample(cfg):
    device, out = data.pick_device(cfg.device), Path(cfg.out)
    model, ck = load_model(cfg.ckpt or out / "ckpt.pt", device, cfg.keep_best)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.audio:  # animate one wav: T = floor(duration * fps) frames under --style -> <stem>_style<k>.npy, .gif
        wave = data.load_wav(cfg.audio)  # a missing, empty or unreadable file: data.UserError
        if cfg.style >= ck["n_style"]:
            raise data.UserError(f"--style {cfg.style}: expected a training style in 0..{ck['n_style'] - 1}")
        T = int(len(wave) / data.SR * data.FPS)
        x = generate(model, [audio_features(wave, model.cfg.n_mfcc)], [T], torch.tensor([cfg.style]), 1234,
                     cfg.ddim_steps)[0].cpu().numpy()
        v = to_vertices(x, ck["sigma"], ck["templates"][cfg.style].numpy())  # (T, V, 3)
        metrics.save_animation(out / f"{Path(cfg.audio).stem}_style{cfg.style}", v, f"style {cfg.style}")
        return {}
    path = str(data.resolve_data(cfg.data, "talking", cfg.preset)) if cfg.data else ck["data_path"]
    items = data.talking_items(path, cfg.split, lambda wave: audio_features(wave, model.cfg.n_mfcc))
    n_style, sigma = ck["n_style"], ck["sigma"]
    print(f"{model.cfg.arch}: weights of step {(ck.get('best', ck) if cfg.keep_best else ck)['step']} of {ck['step']}")
    ar, ar_ck = load_model(cfg.ar_ckpt, device) if cfg.ar_ckpt else (None, None)
    wave, T10 = metrics.tiled_speech(items, 10.0)  # speed for 10 s of speech, batch 1: parallel DDIM vs AR decoding
    f10 = audio_features(wave, model.cfg.n_mfcc)
    timer = lambda m, S=50: lambda: generate(m, [f10], [T10], torch.zeros(1, dtype=torch.long), ddim_steps=S)
    timers = {"model": (timer(model, cfg.ddim_steps), 2, 5)}
    if isinstance(model, DiffSpeaker):  # the AR row is timed untrained if no --ar-ckpt: the same time
        ar_timed = ar or FaceFormerAR(dataclasses.replace(model.cfg, arch="ar"), ck["D"], n_style).to(device).eval()
        timers["baseline:autoregressive"] = (timer(ar_timed), 1, 3)
    first = lambda m, s: lambda: predictor(m, items[:1], s, cfg.ddim_steps)(0, 1234)[0]  # sentence 0, style 0
    return metrics.evaluate_talking(
        items, predictor(model, items, sigma, cfg.ddim_steps), n_style, ck["lip_idx"].numpy(),
        ck["upper_idx"].numpy(), references=[data.talking_references(path, it["name"]) for it in items],
        baseline=predictor(ar, items, ar_ck["sigma"], cfg.ddim_steps) if ar else None, timers=timers,
        reps=cfg.reps if isinstance(model, DiffSpeaker) else 1, out=out,
        curves={"DiffSpeaker": first(model, sigma), **({"AR baseline": first(ar, ar_ck["sigma"])} if ar else {})})


# ---------------------------------------------------------------------------------------------------------------
# Command line

def main(argv=None, mode="train"):
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_config(argv, mode)
    if mode == "sample" and not any(a.split("=")[0] == "--data" for a in argv):
        cfg.data = ""  # sample without --data: the checkpoint's data
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return train(cfg) if mode == "train" else sample(cfg)


if __name__ == "__main__":
    cli()
