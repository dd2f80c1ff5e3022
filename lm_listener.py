"""lm_listener.py: the multimodal, multi-identity language-model listener.

A decoder-only GPT reads the speaker's time-aligned tokens (words W, speech-acoustic tokens SA, emotion tokens
emo) interleaved with the listener's VQ-VAE motion tokens LR, one per r = 8 frames (Eq. 1), and predicts each LR
token from everything before it, so the listener never sees speaker input from its own future. Stage 1 pre-trains
on speaker-only sequences (Eq. 2-3); stage 2 fine-tunes with the loss on the LR tokens only (Eq. 4). LR tokens
are decoded by the identity-disentangled VQ-VAE with the listener's shape beta, so one model serves many faces.

Papers: "LLM-driven Multimodal and Multi-Identity Listening Head Generation" (CVPR 2025, DOI
10.1109/CVPR52734.2025.00996); LM-Listener "Can Language Models Learn to Listen?" (arXiv 2308.10897).
Substitutes: a from-scratch GPT for GPT-2; word ids from data.py timings for Whisper + BPE; a 2-stage residual
k-means over MFCC+delta (layer 1 = iSC, layer 2 on the residual = SA) for SpeechTokenizer's RVQ; the speaker's
emotion readout (attr[:, 17:25]) for EMOCA. For exact causality the MFCC use train-set CMVN (not per utterance),
causal deltas, and each SA token is placed in the group where its audio support *ends* (not its centre).
Depends on vqvae.py (load_vqvae) for the LR tokens and their decoder.

Shapes: B batch, T frames (30 fps), G = T/r groups, N sequence length, D model width, K codebook size (V_LR).

    python lm_listener.py --preset smoke            # seconds: tiny world, tiny GPT
    python train.py --model lm_listener             # default: 4x128 GPT, 1000 + 1200 steps (11.7 min on 2 idle
                                                    # cores; test FD 0.467 greedy, 0.444 nucleus p = 0.9, vs
                                                    # identity random walk 0.462, alt-GT 0.229)
    python sample.py --model lm_listener [--stream] # Table 1 rows (+ nucleus, + ablations), GIF/PNG, latency
    python train.py --model lm_listener --ablations # also trains the Tab. 3/4 ablations (30 min) into
                                                    # runs/lm_listener/ablations; sample mode scores them
"""
import argparse
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

# -----------------------------------------------------------------------------------------------------------------
# Config


@dataclass
class Config:
    data: str = ""                    # listener data path ("" = the synthetic world)
    out: str = "runs/lm_listener"     # run folder (ckpt.pt, config.json, metrics.json, samples/)
    preset: str = "default"           # smoke | default | full
    vq: str = "runs/vqvae/ckpt.pt"    # VQ-VAE checkpoint giving LR tokens (identity IN,AdaIN by default)
    vq_naive: str = "runs/vqvae_naive/ckpt.pt"  # naive (none,none) VQ-VAE: Tab. 4 ablations, naive random walk
    modalities: str = "W+SA+emo"      # speaker modalities: W, W+SA, W+emo, W+SA+emo, W+iSC, W+iSC+emo (Tab. 3)
    speaker_lag: int = 0              # shift speaker blocks this many groups later (1 = strictly causal variant)
    clip_frames: int = 64             # frames T of one training / evaluation window (G = T / r)
    n_hist: int = 8                   # N': history words W^h kept before the window
    v_sa: int = 64                    # k-means size of each acoustic stage (V_SA)
    max_words: int = 512              # cap of the word vocabulary (most frequent train words)
    n_layer: int = 4                  # transformer blocks
    d_model: int = 128                # width D
    n_head: int = 4                   # attention heads
    ctx: int = 256                    # context length (tokens)
    dropout: float = 0.1              # dropout in attention/MLP/embeddings
    steps: int = 0                    # if > 0: stage1_steps = stage2_steps = steps // 2
    stage1_steps: int = 1000          # Eq. 3 speaker pre-training steps (0 = no stage 1)
    stage2_steps: int = 1200          # Eq. 4 listener fine-tuning steps (val FD of 1500 + 1500 was best at 1000)
    batch_size: int = 32              # windows per step
    lr: float = 1e-3                  # peak AdamW learning rate
    warmup: int = 50                  # linear warm-up steps per stage, then cosine to 0.1 * lr
    weight_decay: float = 0.1         # AdamW weight decay on matrices
    grad_clip: float = 1.0            # gradient norm clip
    eval_every: int = 500             # steps between val evaluations / checkpoints
    n_eval_decode: int = 64           # val windows decoded greedily at each evaluation
    top_p: float = 0.0                # > 0: nucleus sampling of LR tokens instead of greedy
    nucleus: float = 0.9              # sample mode: also score nucleus decoding at this top-p (rows *:nucleus_P; 0 = off)
    max_eval: int = 0                 # cap on test windows in sample mode (0 = all)
    ablations: bool = False           # train mode: also train the Tab. 3/4 ablation models
    stream: bool = False              # sample mode: streaming decode, frame by frame, with latency per token
    n_stream: int = 8                 # windows used for the streaming measurement
    cache: str = ""                   # folder of cached acoustic features and k-means (default: out)
    ckpt: str = ""                    # sample mode: checkpoint (default <out>/ckpt.pt)
    split: str = "test"               # sample mode: split to evaluate
    device: str = "auto"              # auto | cpu | cuda | mps
    dtype: str = "float32"            # float32 | bfloat16 | float16 (autocast on GPU only)
    seed: int = 0                     # seeds everything
    resume: bool = False              # continue from <out>/ckpt.pt


PRESETS = {
    "smoke": dict(n_layer=2, d_model=32, n_head=2, stage1_steps=30, stage2_steps=60, batch_size=8, warmup=5,
                  eval_every=45, v_sa=16, n_eval_decode=4, max_eval=12, n_stream=2, dropout=0.0),
    "default": {},
    "full": dict(n_layer=12, d_model=768, n_head=12, ctx=1024, clip_frames=240, n_hist=32, v_sa=1024,
                 max_words=4096, stage1_steps=20000, stage2_steps=50000, lr=3e-4, warmup=500, eval_every=2000),
}
ABLATIONS = {  # name: (modalities, which VQ) -- Tab. 3 rows with the identity VQ, Tab. 4 rows with the naive VQ
    "W": ("W", "identity"), "W+SA": ("W+SA", "identity"), "W+emo": ("W+emo", "identity"),
    "naive_W": ("W", "naive"), "naive_W+SA+emo": ("W+SA+emo", "naive")}
R, E_EMO, HOP = 8, 8, 320             # frames per LR token, emotion classes, MFCC hop at 50 Hz (samples)
BOUND = ["<sa>", "</sa>", "<isc>", "</isc>", "<emo>", "</emo>", "<lr>", "</lr>"]


def parse_config(argv, mode):
    p = argparse.ArgumentParser(prog=f"lm_listener.py ({mode})", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        names = [flag] + ([f"--{f.name}"] if "_" in f.name else [])
        if f.type in ("bool", bool):
            p.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=f"(default {f.default})")
        else:
            p.add_argument(*names, dest=f.name, type=type(f.default), default=None, help=f"(default {f.default!r})")
    given = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    cfg = Config(**{**PRESETS[given.get("preset", "default")], **given})
    if cfg.preset == "smoke":  # a smoke run never reads or writes the default runs/ VQ-VAEs
        cfg.vq = given.get("vq", str(Path(cfg.out) / "vq" / "ckpt.pt"))
        cfg.vq_naive = given.get("vq_naive", str(Path(cfg.out) / "vq_naive" / "ckpt.pt"))
    if cfg.steps > 0 and "stage1_steps" not in given and "stage2_steps" not in given:
        cfg.stage1_steps = cfg.stage2_steps = cfg.steps // 2
    return cfg, given


# -----------------------------------------------------------------------------------------------------------------
# Tokenisers: vocabulary blocks, words, residual k-means acoustics, emotion


class Vocab:
    """Contiguous id blocks: words [0, V_W) (<pad>=0, <unk>, <bos>), SA, iSC (if used), emo, LR, boundaries."""

    def __init__(self, words, v_sa, v_lr, isc=False):
        self.words = ["<pad>", "<unk>", "<bos>"] + [w for w in words if w not in ("<pad>", "<unk>", "<bos>")]
        self.w2i = {w: i for i, w in enumerate(self.words)}
        self.V_W, self.v_sa, self.v_lr = len(self.words), v_sa, v_lr
        self.sa0 = self.V_W
        self.isc0 = self.sa0 + v_sa
        self.emo0 = self.isc0 + (v_sa if isc else 0)
        self.lr0 = self.emo0 + E_EMO
        self.b = {name: self.lr0 + v_lr + k for k, name in enumerate(BOUND)}
        self.size = self.lr0 + v_lr + len(BOUND)

    def word(self, text):
        return self.w2i.get(text.lower(), 1)


def build_words(items, max_words):
    counts = {}
    for it in items:
        for text, _ in it["words"]:
            counts[text.lower()] = counts.get(text.lower(), 0) + 1
    return sorted(sorted(counts), key=lambda w: -counts[w])[:max_words - 3]


def kmeans(x, k, iters=20, seed=0):
    """k-means++ initialisation then Lloyd iterations; x (M, F) -> centroids (k, F)."""
    g = torch.Generator().manual_seed(seed)
    c = [x[int(torch.randint(len(x), (1,), generator=g))]]
    d2 = ((x - c[0]) ** 2).sum(1)                                                    # (M,) distance to nearest centre
    for _ in range(1, k):
        c.append(x[int(torch.multinomial(d2 + 1e-12, 1, generator=g))])
        d2 = torch.minimum(d2, ((x - c[-1]) ** 2).sum(1))
    c = torch.stack(c)                                                               # (k, F)
    for _ in range(iters):
        a = torch.cdist(x, c).argmin(1)                                              # (M,)
        cnt = torch.bincount(a, minlength=k).float()[:, None]
        s = torch.zeros_like(c).index_add_(0, a, x)
        c = torch.where(cnt > 0, s / cnt.clamp(min=1), c)
    return c


def sa_features(audio, n_rows=None):
    """Speaker waveform (S,) -> (n, 80) pooled MFCC+delta at 12.5 Hz and (n,) support end in 30-fps frames.
    Causal delta (c_t - c_{t-1}); rows pooled x4; pooled frame j ends at sample (4j+4)*HOP + 80 (25 ms window)."""
    n_rows = (len(audio) // HOP) if n_rows is None else n_rows
    n_rows -= n_rows % 4
    if n_rows <= 0:
        return torch.zeros(0, 80), torch.zeros(0)
    m = torch.as_tensor(data.mfcc(np.asarray(audio, np.float32), rate=50, n_mfcc=40, n_rows=n_rows))  # (n_rows, 40)
    d = torch.cat([torch.zeros_like(m[:1]), m[1:] - m[:-1]])                              # causal delta
    f = torch.cat([m, d], 1).reshape(n_rows // 4, 4, 80).mean(1)                          # (n, 80)
    end = ((torch.arange(len(f)) * 4 + 4) * HOP + 80) * data.FPS / data.SR                # frames
    return f.float(), end.float()


def sa_tokens(f, km):
    """Residual k-means: layer 1 = iSC (content), layer 2 on the residual = SA (acoustics). f (n, 80) -> 2 x (n,)."""
    z = (f - km["mean"]) / km["std"]
    isc = torch.cdist(z, km["c1"]).argmin(1)
    sa = torch.cdist(z - km["c1"][isc], km["c2"]).argmin(1)
    return sa, isc


def fit_sa_kmeans(feats, v_sa, seed, max_frames=20000):
    fs = torch.cat([f for f, _ in feats])                                                 # (M, 80)
    fs = fs[torch.randperm(len(fs), generator=torch.Generator().manual_seed(seed))[:max_frames]]
    mean, std = fs.mean(0), fs.std(0) + 1e-5
    z = (fs - mean) / std
    c1 = kmeans(z, v_sa, seed=seed)
    c2 = kmeans(z - c1[torch.cdist(z, c1).argmin(1)], v_sa, seed=seed + 1)
    return dict(mean=mean, std=std, c1=c1, c2=c2)


def emo_tokens(probs, r=R):
    """Paper procedure: average the per-frame emotion probabilities over each group of r frames, then argmax.
    probs (T, E) -> (T // r,)."""
    T, E = probs.shape
    return torch.as_tensor(probs[: T - T % r]).reshape(T // r, r, E).mean(1).argmax(-1)


# -----------------------------------------------------------------------------------------------------------------
# The interleaved sequence (Eq. 1) and its speaker-only version (Eq. 2)


def group_of(end_frame, f0=0, r=R):
    """Group i >= 1 holds ends in ((i-1)r, ir] frames after the window start f0; <= 0 means history."""
    return math.ceil((end_frame - f0) / r - 1e-6)


def speaker_block(words, sa, isc, emo, V, mods):
    """Group i's speaker tokens: W_i (no markers), <sa> SA_i </sa>, <isc> iSC_i </isc>, <emo> emo_i </emo>."""
    ids = [int(w) for w in words] if "W" in mods else []
    if "SA" in mods:
        ids += [V.b["<sa>"]] + [V.sa0 + int(s) for s in sa] + [V.b["</sa>"]]
    if "iSC" in mods:
        ids += [V.b["<isc>"]] + [V.isc0 + int(s) for s in isc] + [V.b["</isc>"]]
    if "emo" in mods and emo is not None:
        ids += [V.b["<emo>"], V.emo0 + int(emo), V.b["</emo>"]]
    return ids


def build_sequence(clip, f0, G, V, mods, n_hist, lag=0, with_lr=True, ctx=None):
    """Eq. 1: [<bos>, W^h, for i = 1..G: W_i, <sa> SA_i </sa>, <emo> emo_i </emo>, <lr> LR_i </lr>] for the window
    of G groups starting at frame f0 of `clip` (words [(id, end_frame)], sa/isc/sa_end (n,), emo/lr (G_clip,)).
    with_lr=False gives Eq. 2's S'. Returns ids (N,) and kind (N,): 0 input only, 1 speaker content (stage-1
    target, after W^h), 2 LR content (stage-2 target)."""
    g0 = f0 // R
    words = [[] for _ in range(G + 1)]
    hist = []
    for w, end in clip["words"]:
        g = group_of(end, f0)
        if g <= 0:
            hist.append(w)
        elif g <= G:
            words[g].append(w)
    sa, isc = [[] for _ in range(G + 1)], [[] for _ in range(G + 1)]
    for s, c, end in zip(clip["sa"].tolist(), clip["isc"].tolist(), clip["sa_end"].tolist()):
        g = group_of(end, f0)
        if 1 <= g <= G:
            sa[g].append(s)
            isc[g].append(c)
    hist = hist[-n_hist:] if n_hist > 0 else []
    if ctx is not None:  # only W^h is ever truncated (from the left) to fit the context
        body = sum(len(speaker_block(words[i], sa[i], isc[i], 0, V, mods)) + 3 for i in range(1, G + 1))
        hist = hist[max(0, len(hist) - max(0, ctx - 1 - body)):]
    ids, kind = [V.w2i["<bos>"]] + hist, [0] * (1 + len(hist))
    bset = set(V.b.values())
    for i in range(1, G + 1):
        j = i - lag  # the speaker group visible at LR_i (lag > 0: strictly causal variant)
        if j >= 1:
            blk = speaker_block(words[j], sa[j], isc[j], int(clip["emo"][g0 + j - 1]), V, mods)
            ids += blk
            kind += [0 if t in bset else 1 for t in blk]
        if with_lr:
            ids += [V.b["<lr>"], V.lr0 + int(clip["lr"][g0 + i - 1]), V.b["</lr>"]]
            kind += [0, 2, 0]
    assert ctx is None or len(ids) <= ctx, f"sequence of {len(ids)} tokens exceeds ctx {ctx}"
    return ids, kind


def split_chunks(ids, kind):
    """Cut a stage-2 sequence at its LR tokens: chunk i = everything after </lr>_{i-1} up to and including <lr>_i."""
    pos = [p for p, k in enumerate(kind) if k == 2]
    starts = [0] + [p + 2 for p in pos[:-1]]
    return [ids[s:p] for s, p in zip(starts, pos)]


# -----------------------------------------------------------------------------------------------------------------
# GPT with a KV cache (nanoGPT-style, pre-LN)


class Block(nn.Module):
    def __init__(self, d, h, p):
        super().__init__()
        self.h, self.p = h, p
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.Dropout(p))
        self.drop = nn.Dropout(p)

    def forward(self, x, cache=None):
        B, N, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(B, N, 3, self.h, D // self.h).permute(2, 0, 3, 1, 4)  # 3x (B,H,N,Dh)
        if cache is not None:  # append this chunk's keys/values; queries attend to the past + causally within
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
            cache["k"], cache["v"] = k, v
        P = k.shape[2] - N
        mask = None if P == 0 else torch.ones(N, P + N, dtype=torch.bool, device=x.device).tril(P)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=P == 0,
                                           dropout_p=self.p if self.training else 0.0)           # (B, H, N, Dh)
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(B, N, D)))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Token + learned position embeddings -> pre-LN blocks -> LN. LM head tied to the embedding (stage 1);
    a separate LR head Linear(D -> V_LR), the paper's additional affine projection (stage 2, inference)."""

    def __init__(self, vocab_size, v_lr, cfg):
        super().__init__()
        self.ctx = cfg.ctx
        self.wte, self.wpe = nn.Embedding(vocab_size, cfg.d_model), nn.Embedding(cfg.ctx, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.n_head, cfg.dropout) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lr_head = nn.Linear(cfg.d_model, v_lr)
        self.apply(lambda m: nn.init.normal_(m.weight, std=0.02) if isinstance(m, (nn.Linear, nn.Embedding)) else None)

    def forward(self, idx, cache=None):
        """idx (B, N) -> hidden (B, N, D). With a cache (list of dicts, one per block) positions continue from it."""
        P = cache[0]["k"].shape[2] if cache and "k" in cache[0] else 0
        pos = torch.arange(P, P + idx.shape[1], device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))                                    # (B, N, D)
        for i, blk in enumerate(self.blocks):
            x = blk(x, None if cache is None else cache[i])
        return self.ln_f(x)

    def lm_logits(self, h):
        return h @ self.wte.weight.T                                                    # (..., V)

    def new_cache(self):
        return [{} for _ in self.blocks]


def pick(logits, top_p=0.0, gen=None):
    """Greedy (default) or nucleus sampling over the LR head's logits (V_LR,)."""
    if top_p <= 0:
        return int(logits.argmax())
    p, order = torch.softmax(logits.float(), -1).sort(descending=True)
    keep = p.cumsum(0) - p < top_p
    return int(order[keep][torch.multinomial(p[keep] / p[keep].sum(), 1, generator=gen)])


@torch.no_grad()
def decode_cached(model, chunks, V, top_p=0.0, gen=None):
    """Greedy decoding with a KV cache: each token is processed once, so decoding is linear in length.
    chunks from split_chunks; returns the G LR tokens (ids in [0, V_LR))."""
    cache, out, pend = model.new_cache(), [], []
    dev = model.wte.weight.device
    for ch in chunks:
        h = model(torch.tensor([pend + ch], device=dev), cache)[0, -1]                  # (D,)
        out.append(pick(model.lr_head(h), top_p, gen))
        pend = [V.lr0 + out[-1], V.b["</lr>"]]
    return out


def batch_loss(model, seqs, stage, V):
    """Right-padded batch of (ids, kind). Stage 1 (Eq. 3): LM head over the full vocabulary on speaker content
    targets; stage 2 (Eq. 4): LR head on LR targets only. Mean over target positions. Returns (loss, acc)."""
    N = max(len(s) for s, _ in seqs)
    dev = model.wte.weight.device
    ids = torch.tensor([s + [0] * (N - len(s)) for s, _ in seqs], device=dev)          # (B, N)
    kind = torch.tensor([k + [0] * (N - len(k)) for _, k in seqs], device=dev)         # (B, N); pads are 0
    h = model(ids[:, :-1])                                                              # (B, N-1, D)
    tgt, m = ids[:, 1:], kind[:, 1:] == stage                                           # position p predicts p+1
    if stage == 1:
        logits, y = model.lm_logits(h[m]), tgt[m]
    else:
        logits, y = model.lr_head(h[m]), tgt[m] - V.lr0                                 # (n_targets, V_LR)
    return F.cross_entropy(logits.float(), y), (logits.argmax(-1) == y).float().mean()


# -----------------------------------------------------------------------------------------------------------------
# Data: token streams of whole clips, windows


def get_vq(path, cfg, naive=False):
    """Load a VQ-VAE checkpoint; train it (same preset and data) with a clear message when it is missing."""
    import vqvae  # the stage this method depends on
    if not Path(path).exists():
        norm = "none,none" if naive else "IN,AdaIN"
        print(f"[lm_listener] VQ-VAE checkpoint {path} is missing: training it now ({norm}, preset {cfg.preset})")
        vqvae.main(["--data", cfg.data, "--out", str(Path(path).parent), "--preset", cfg.preset, "--norm", norm],
                   mode="train")
    return vqvae.load_vqvae(path, device="cpu")


@torch.no_grad()
def vq_tokens(vq, items):
    """Listener motion -> LR tokens (n, T // r) with the VQ encoder (and its stored statistics)."""
    out = []
    for i in range(0, len(items), 64):
        x = torch.stack([torch.as_tensor(it["listener"][: len(it["listener"]) // R * R]) for it in items[i:i + 64]])
        b = torch.stack([torch.as_tensor(it["listener_beta"]) for it in items[i:i + 64]])
        out.append(vq.encode(vq.normalize(x.float()), b.float()).cpu())
    return torch.cat(out)


def clip_features(items, cache):
    """SA features of every clip (the slow part), cached in `cache` keyed by clip names."""
    key = [it["name"] for it in items]
    if cache and Path(cache).exists():
        c = torch.load(cache)
        if c["key"] == key:
            return c["feats"]
    feats = [sa_features(it["audio"], n_rows=len(it["listener"]) // R * R * data.SR // data.FPS // HOP) for it in items]
    if cache:
        save_atomic(dict(key=key, feats=feats), cache)
    return feats


def prepare(items, V, km, lr_tokens, feats):
    """Per clip: word ids with end frames, SA/iSC tokens with support ends, emo (G,), LR (G,) and raw arrays."""
    clips = []
    for it, lr, (f, end) in zip(items, lr_tokens, feats):
        T = len(it["listener"]) // R * R
        sa, isc = sa_tokens(f, km)
        clips.append(dict(words=[(V.word(t), e * data.FPS) for t, e in it["words"]], sa=sa, isc=isc, sa_end=end,
                          emo=emo_tokens(it["speaker_attr"][:T, 17:25]), lr=lr, item=it, T=T))
    return clips


def windows(clips, T):
    """Non-overlapping evaluation windows (clip index, start frame) of T frames."""
    return [(c, f0) for c, cl in enumerate(clips) for f0 in range(0, cl["T"] - T + 1, T)]


def setup_tokens(cfg, path, train_items, vq, km=None, words=None):
    mods = cfg.modalities.split("+")
    words = build_words(train_items, cfg.max_words) if words is None else words
    V = Vocab(words, cfg.v_sa, vq.K, isc="iSC" in mods)
    kpath = Path(cfg.cache or cfg.out) / "sa_kmeans.pt"
    if km is None and kpath.exists():
        km = torch.load(kpath)
        km = km if km.get("key") == [str(path), cfg.v_sa, cfg.seed] else None
    if km is None:
        t0 = time.time()
        feats = clip_features(train_items, Path(cfg.cache or cfg.out) / "sa_feats_train.pt")
        km = {**fit_sa_kmeans(feats, cfg.v_sa, cfg.seed), "key": [str(path), cfg.v_sa, cfg.seed]}
        torch.save(km, kpath)
        print(f"[lm_listener] acoustic k-means fitted ({cfg.v_sa}+{cfg.v_sa} centroids) in {time.time() - t0:.1f}s")
    return V, km, mods


# -----------------------------------------------------------------------------------------------------------------
# Training (stage 1 then stage 2)


def pick_device(name):
    if name != "auto":
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu")


def lr_at(step, steps, cfg):
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def save_atomic(obj, path):
    tmp = str(path) + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(cfg, given=None):
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    dev = pick_device(cfg.device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    path = data.resolve_data(cfg.data, "listener", cfg.preset)
    print(f"[lm_listener] device {dev}; data {path}\n" + json.dumps(dataclasses.asdict(cfg), indent=1))
    (out / "config.json").write_text(json.dumps({**dataclasses.asdict(cfg), "data": str(path)}, indent=1))
    tr_items, va_items = data.load_listener(path, "train"), data.load_listener(path, "val")
    vq = get_vq(cfg.vq, cfg)
    V, km, mods = setup_tokens(cfg, path, tr_items, vq)
    cache = Path(cfg.cache or cfg.out)
    tr = prepare(tr_items, V, km, vq_tokens(vq, tr_items), clip_features(tr_items, cache / "sa_feats_train.pt"))
    va = prepare(va_items, V, km, vq_tokens(vq, va_items), clip_features(va_items, cache / "sa_feats_val.pt"))
    G = cfg.clip_frames // R
    model = GPT(V.size, V.v_lr, cfg).to(dev)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    nodecay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": nodecay, "weight_decay": 0}],
                            lr=cfg.lr, betas=(0.9, 0.95))
    start, S1, S2, hist = 0, cfg.stage1_steps, cfg.stage2_steps, {}
    if cfg.resume and (out / "ckpt.pt").exists():
        ck = torch.load(out / "ckpt.pt", weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        start, hist = ck["step"], ck.get("metrics", {})
        print(f"[lm_listener] resumed at step {start}")
    print(f"[lm_listener] GPT {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, vocab {V.size} "
          f"(words {V.V_W}, SA {V.v_sa}, LR {V.v_lr}); {len(tr)} train clips, modalities {cfg.modalities}")
    amp = dict(device_type=dev.type, dtype=getattr(torch, cfg.dtype), enabled=dev.type == "cuda" and cfg.dtype != "float32")
    scaler = torch.amp.GradScaler(enabled=amp["enabled"] and cfg.dtype == "float16")
    va_win = windows(va, cfg.clip_frames)[: cfg.n_eval_decode]

    def ckpt(step):
        save_atomic(dict(model=model.state_dict(), optimizer=opt.state_dict(), step=step, metrics=hist,
                         config={**dataclasses.asdict(cfg), "data": str(path)}, words=V.words[3:], km=km, v_lr=V.v_lr), out / "ckpt.pt")

    bar = tqdm(range(start, S1 + S2), desc="lm_listener", dynamic_ncols=True, mininterval=2)
    t0 = time.time()
    for step in bar:
        stage = 1 if step < S1 else 2
        for g in opt.param_groups:
            g["lr"] = lr_at(step - (0 if stage == 1 else S1), S1 if stage == 1 else S2, cfg)
        last = step == S1 + S2 - 1
        if stage == 2 and ((step - S1 + 1) % cfg.eval_every == 0 or last):
            model.eval()
            with torch.no_grad():
                vb = [build_sequence(va[c], f0, G, V, mods, cfg.n_hist, cfg.speaker_lag, ctx=cfg.ctx) for c, f0 in va_win]
                vce, vacc = batch_loss(model, vb, 2, V)
                m = evaluate_model(model, V, va, va_win, vq, cfg, mods)
            model.train()
            hist[step + 1] = dict(val_ce=float(vce), val_acc=float(vacc), **{k: m[k] for k in ("mse/all", "fd/all", "pfd/all")})
            tqdm.write(f"step {step + 1}: val CE {vce:.3f} | LR acc {vacc:.3f} | greedy L2 {m['mse/all']:.4f} "
                       f"FD {m['fd/all']:.3f} P-FD {m['pfd/all']:.3f} ({len(va_win)} val windows)")
            ckpt(step + 1)
        rng = np.random.default_rng([cfg.seed, step])  # batch depends only on (seed, step): --resume is exact
        seqs = []
        for c in rng.integers(len(tr), size=cfg.batch_size):
            f0 = R * int(rng.integers(tr[c]["T"] // R - G + 1))
            seqs.append(build_sequence(tr[c], f0, G, V, mods, cfg.n_hist, cfg.speaker_lag, with_lr=stage == 2, ctx=cfg.ctx))
        with torch.autocast(**amp):
            loss, acc = batch_loss(model, seqs, stage, V)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(opt)
        scaler.update()
        hist.setdefault("loss", {})[step + 1] = [stage, loss.item()]
        bar.set_postfix(stage=stage, loss=f"{loss.item():.3f}", acc=f"{acc.item():.2f}")
    if S1 + S2 > start and S2 == 0:
        ckpt(S1 + S2)
    print(f"[lm_listener] trained {S1 + S2 - start} steps in {(time.time() - t0) / 60:.1f} min -> {out / 'ckpt.pt'}")
    if cfg.ablations:
        for name, (mods_a, which) in ABLATIONS.items():
            keep = {k: v for k, v in (given or {}).items() if k not in ("ablations", "out", "vq", "modalities", "resume")}
            argv = [(f"--{k}" if v else f"--no-{k}") if isinstance(v, bool) else f"--{k}={v}" for k, v in keep.items()]
            vq_a = cfg.vq if which == "identity" else cfg.vq_naive
            if which == "naive":
                get_vq(vq_a, cfg, naive=True)
            print(f"\n[lm_listener] ablation {name}: modalities {mods_a}, {which} VQ {vq_a}")
            main(argv + ["--out", str(out / "ablations" / name), "--vq", vq_a, "--modalities", mods_a, "--cache", str(cache)],
                 mode="train")
    return out / "ckpt.pt"


# -----------------------------------------------------------------------------------------------------------------
# Sampling, evaluation, streaming


def load_model(ckpt_path, device="cpu"):
    ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    fields = {f.name for f in dataclasses.fields(Config)}
    cfg = Config(**{k: v for k, v in ck["config"].items() if k in fields})
    V = Vocab(ck["words"], cfg.v_sa, ck["v_lr"], isc="iSC" in cfg.modalities)
    model = GPT(V.size, V.v_lr, cfg)
    model.load_state_dict(ck["model"])
    return model.to(device).eval(), V, ck["km"], cfg


@torch.no_grad()
def predict(model, V, clips, wins, vq, cfg, mods, top_p=0.0):
    """Greedy (or nucleus) LR tokens for each window -> de-normalised motion list [(T, 56)] and tokens (n, G)."""
    G, gen = cfg.clip_frames // R, torch.Generator().manual_seed(cfg.seed)
    toks = []
    for c, f0 in wins:
        ids, kind = build_sequence(clips[c], f0, G, V, mods, cfg.n_hist, cfg.speaker_lag, ctx=cfg.ctx)
        toks.append(decode_cached(model, split_chunks(ids, kind), V, top_p, gen))
    return decode_motion(vq, torch.tensor(toks), [clips[c]["item"]["listener_beta"] for c, _ in wins]), torch.tensor(toks)


@torch.no_grad()
def decode_motion(vq, toks, betas):
    out = []
    for i in range(0, len(toks), 64):
        b = torch.stack([torch.as_tensor(x) for x in betas[i:i + 64]]).float()
        out += list(vq.denormalize(vq.decode(toks[i:i + 64], b)).cpu().float().numpy())   # (B, T, 56)
    return out


def evaluate_model(model, V, clips, wins, vq, cfg, mods):
    import metrics
    preds, _ = predict(model, V, clips, wins, vq, cfg, mods, cfg.top_p)
    gts, spk = crop(clips, wins, "listener", cfg.clip_frames), crop(clips, wins, "speaker", cfg.clip_frames)
    return metrics.listener_metrics(preds, gts, spk, valence_fn=data.FaceModel().valence)


def crop(clips, wins, key, T):
    return [np.asarray(clips[c]["item"][key][f0:f0 + T], np.float32) for c, f0 in wins]


def stream(model, V, km, clip, cfg, mods):
    """Consume one window's speaker input frame by frame (audio, emotion readout, finished words) and emit LR_i as
    soon as group i's last frame has arrived. Returns tokens and per-token latency (ms) from that frame to LR_i."""
    it, G, T = clip["item"], cfg.clip_frames // R, cfg.clip_frames
    spf = data.SR / data.FPS
    words = sorted(clip["words"], key=lambda w: w[1])
    hist = [w for w, e in words if e <= 0][-cfg.n_hist:]
    cache, pend, toks, lat, audio, attr, done_sa = model.new_cache(), [V.w2i["<bos>"]] + hist, [], [], [], [], 0
    blocks = {}
    for t in range(T):
        audio.append(it["audio"][round(t * spf): round((t + 1) * spf)])   # one frame of speech arrives
        attr.append(it["speaker_attr"][t, 17:25])
        if (t + 1) % R:
            continue
        t_ready, i = time.perf_counter(), (t + 1) // R
        wav = np.concatenate(audio)
        a0 = max(0, (4 * done_sa - 4) * HOP)                                  # aligned audio start, 1 pooled frame of slack
        f, end = sa_features(wav[a0:], n_rows=(len(wav) - a0) // HOP)
        end = end + a0 * data.FPS / data.SR
        j0 = a0 // (4 * HOP)
        sa, isc = sa_tokens(f, km)
        for k in range(len(f)):
            if j0 + k >= done_sa and group_of(float(end[k])) <= i:
                g = max(1, group_of(float(end[k])))
                blocks.setdefault(g, ([], []))
                blocks[g][0].append(int(sa[k]))
                blocks[g][1].append(int(isc[k]))
                done_sa = j0 + k + 1
        j = i - cfg.speaker_lag
        ch = []
        if j >= 1:
            w_j = [w for w, e in words if group_of(e) == j]
            emo = int(np.mean(np.stack(attr[(j - 1) * R: j * R]), 0).argmax())
            ch = speaker_block(w_j, *blocks.get(j, ([], [])), emo, V, mods)
        h = model(torch.tensor([pend + ch + [V.b["<lr>"]]]), cache)[0, -1]
        toks.append(pick(model.lr_head(h), cfg.top_p))
        pend = [V.lr0 + toks[-1], V.b["</lr>"]]
        lat.append((time.perf_counter() - t_ready) * 1e3)
    return toks, lat


def sample(cfg, given):
    import metrics
    ckpt = Path(cfg.ckpt or Path(cfg.out) / "ckpt.pt")
    if not ckpt.exists():
        sys.exit(f"error: no checkpoint at {ckpt}; train first (python train.py --model lm_listener) or pass --ckpt")
    model, V, km, tcfg = load_model(ckpt)
    tcfg.top_p, tcfg.max_eval = given.get("top_p", tcfg.top_p), given.get("max_eval", tcfg.max_eval)
    tcfg.n_stream, tcfg.seed = cfg.n_stream, cfg.seed
    out = Path(cfg.out if "out" in given else ckpt.parent)
    path = data.resolve_data(cfg.data, "listener", tcfg.preset) if cfg.data else tcfg.data
    mods = tcfg.modalities.split("+")
    torch.manual_seed(cfg.seed)
    print(f"[lm_listener] sampling {ckpt} on {path} ({cfg.split}), modalities {tcfg.modalities}, vq {tcfg.vq}")
    tr_items, te_items = data.load_listener(path, "train"), data.load_listener(path, cfg.split)
    vq = get_vq(tcfg.vq, tcfg)
    feats = clip_features(te_items, Path(tcfg.cache or ckpt.parent) / f"sa_feats_{cfg.split}.pt")
    te = prepare(te_items, V, km, vq_tokens(vq, te_items), feats)
    T, G = tcfg.clip_frames, tcfg.clip_frames // R
    wins = windows(te, T)
    wins = wins[: tcfg.max_eval] if tcfg.max_eval > 0 else wins
    t0 = time.time()
    preds, toks = predict(model, V, te, wins, vq, tcfg, mods, tcfg.top_p)
    print(f"[lm_listener] decoded {len(wins)} windows x {G} tokens in {time.time() - t0:.1f}s")
    gts, spk = crop(te, wins, "listener", T), crop(te, wins, "speaker", T)
    vfn = data.FaceModel().valence
    score = lambda p: metrics.listener_metrics(p, gts, spk, valence_fn=vfn, seed=cfg.seed)
    rows = {"GT": score(gts)}
    if te[0]["item"].get("alt_listener") is not None:
        rows["alt-GT"] = score([np.asarray(te[c]["item"]["alt_listener"][0][f0:f0 + T], np.float32) for c, f0 in wins])
    # baselines: a bank of non-overlapping training windows
    tr_clips = [dict(item=it, T=len(it["listener"]) // R * R) for it in tr_items]
    bw = windows(tr_clips, T)
    bank_l, bank_s = np.stack(crop(tr_clips, bw, "listener", T)), np.stack(crop(tr_clips, bw, "speaker", T))
    text = lambda cl, f0: metrics.window_text(cl["item"]["words"], f0 / data.FPS, (f0 + T) / data.FPS)
    rows["baseline:random"] = score(list(metrics.baseline_random(bank_l, len(wins), T, seed=cfg.seed)))
    rows["baseline:nn_motion"] = score(list(metrics.baseline_nn_motion(np.stack(spk), bank_s, bank_l)))
    rows["baseline:nn_speech"] = score(list(metrics.baseline_nn_text([text(te[c], f0) for c, f0 in wins],
                                                                     [text(tr_clips[c], f0) for c, f0 in bw], bank_l, seed=cfg.seed)))
    betas = [te[c]["item"]["listener_beta"] for c, _ in wins]
    for name, vpath, naive in (("naive", given.get("vq_naive", tcfg.vq_naive), True),
                               ("identity", tcfg.vq, False)):
        vq_b = get_vq(vpath, tcfg, naive=naive) if name == "naive" else vq
        codes = vq_tokens(vq_b, tr_items)[:, : (tr_clips[0]["T"] // R) // G * G].reshape(-1, G)   # (M', G)
        walk = metrics.baseline_random_walk_codes(codes.numpy(), len(wins), G, vq_b.K, seed=cfg.seed)
        rows[f"baseline:random_walk_{name}"] = score(decode_motion(vq_b, torch.as_tensor(walk), betas))
    rows["model"] = score(preds)
    extra = [cfg.nucleus] if cfg.nucleus > 0 and tcfg.top_p <= 0 else []  # greedy collapses variation: sample too
    for p in extra:
        rows[f"model:nucleus_{p:g}"] = score(predict(model, V, te, wins, vq, tcfg, mods, p)[0])
    for ab in sorted((ckpt.parent / "ablations").glob("*/ckpt.pt")):
        m_a, V_a, km_a, c_a = load_model(ab)
        c_a.seed, vq_a = cfg.seed, get_vq(c_a.vq, c_a)
        te_a = prepare(te_items, V_a, km_a, vq_tokens(vq_a, te_items), feats)
        for p in [tcfg.top_p] + extra:  # each ablation decoded like the model rows
            rows[f"ablation:{ab.parent.name}" + (f":nucleus_{p:g}" if p in extra else "")] = score(
                predict(m_a, V_a, te_a, wins, vq_a, c_a, c_a.modalities.split("+"), p)[0])
    (out / "samples").mkdir(parents=True, exist_ok=True)
    np.save(out / "samples" / "pred.npy", np.stack(preds[:16]))
    np.save(out / "samples" / "tokens.npy", toks.numpy())
    k = min(2, len(wins))
    b = [te[c]["item"]["listener_beta"] for c, _ in wins[:k]]
    try:
        data.render_gif(out / "samples" / "sample.gif", [x for i in range(k) for x in (gts[i], preds[i])],
                        [x for i in range(k) for x in (b[i], b[i])], ["GT", "model"] * k)
        data.plot_channels(out / "samples" / "channels.png", {"GT": gts[0], "model": preds[0], "speaker": spk[0]})
    except AttributeError as e:  # data.py's renderer not available
        print(f"(render skipped: {e})")
    if cfg.stream:
        lat, same = [], 0
        for c, f0 in [(c, 0) for c in range(min(tcfg.n_stream, len(te)))]:
            stoks, l = stream(model, V, km, te[c], tcfg, mods)
            ids, kind = build_sequence(te[c], 0, G, V, mods, tcfg.n_hist, tcfg.speaker_lag, ctx=tcfg.ctx)
            same += int(stoks == decode_cached(model, split_chunks(ids, kind), V))
            lat += l
        rows["model"]["stream_ms_median"] = float(np.median(lat))
        rows["model"]["stream_ms_p95"] = float(np.percentile(lat, 95))
        print(f"[lm_listener] streaming: {len(lat)} tokens, latency per 8-frame token median {np.median(lat):.2f} ms, "
              f"p95 {np.percentile(lat, 95):.2f} ms; {same}/{min(tcfg.n_stream, len(te))} windows equal to offline decoding")
    metrics.write_metrics_json(rows, out / "metrics.json")
    print(metrics.format_table(rows))
    print("\nTable 1 layout (L2 = mse/all, FD, Variation, Diversity, P-FD, L2-Affect; raw units, per window):")
    print(metrics.format_table(rows, ["mse/all", "fd/all", "var_pred/all", "div_pred/all", "pfd/all", "affect_l2"]))
    print(f"[lm_listener] wrote {out / 'metrics.json'} and {out / 'samples'}")
    return rows


def main(argv=None, mode="train"):
    argv = list(argv or [])
    if argv[:1] in (["sample"], ["train"]):
        mode, argv = argv[0], argv[1:]
    cfg, given = parse_config(argv, mode)
    return train(cfg, given) if mode == "train" else sample(cfg, given)


if __name__ == "__main__":
    main(sys.argv[1:])
