"""lm_listener.py: a multimodal, multi-identity language-model listener.

A decoder-only GPT reads the speaker's time-aligned tokens (words W, speech-acoustic tokens SA, emotion tokens emo)
interleaved with the listener's VQ-VAE motion tokens LR, one per r = 8 frames, and predicts each LR token from
everything before it: stage 1 pre-trains on speaker-only sequences (Eq. 2-3), stage 2 fine-tunes with the loss on the
LR tokens only (Eq. 4). The identity VQ-VAE decodes them with the listener's shape beta: one model, many faces.
Causality (--speaker-lag): 0 = Eq. 1 (W_i, SA_i, emo_i before LR_i), so LR_i, which animates frames (i-1)r+1..ir,
sees the speech up to frame ir, up to r-1 = 7 frames = 233 ms ahead (streaming, it is emitted when frame ir has
arrived); 1 = Eq. 4's order (emo_{1:i-1}) for every modality: no look-ahead, LR_i is emitted when its frames begin.
Any length: the context slides (Decoder), keeping the history words as W^h.

Papers: MMLM, "LLM-driven Multimodal and Multi-Identity Listening Head Generation" (CVPR 2025, DOI
10.1109/CVPR52734.2025.00996, no arXiv version); LM-Listener, "Can Language Models Learn to Listen?" (arXiv 2308.10897).
Substitutes for pretrained parts too large for a CPU or needing data we do not have: a from-scratch GPT for GPT-2;
word ids from data.py's timings for Whisper + BPE; data.py's 2-stage residual k-means over causal MFCC + delta (layer
1 = iSC, layer 2 on the residual = SA; each SA token in the group where its audio support *ends*) for SpeechTokenizer's
RVQ; the speaker's emotion readout (attr[:, 17:25]) for EMOCA. Depends on vqvae.py (load_vqvae) for the LR tokens and
their decoder; the evaluation protocol is metrics.evaluate_lm_listener_split.

Shapes: B batch, T frames (30 fps), G = T/r groups, N sequence length, D model width, K codebook size (V_LR).

    python lm_listener.py --preset smoke               # seconds: the tiny trevor twin, tiny GPT, its own VQ-VAEs
    python train.py --model lm_listener                # default: trevor twin, 4 x 128 GPT, 1000 + 1200 steps
    python sample.py --model lm_listener [--stream]    # Table 1 rows, PNG/GIF; --stream: latency, same as offline?
    python lm_listener.py --data realtalk ...          # Tab. 2: seen / unseen listeners, identity swap (Fig. 5)
    python lm_listener.py --modalities W --out runs/lm_listener_W    # one Tab. 3 row: ablations are runs with flags
    torchrun --nproc_per_node 2 lm_listener.py ...     # data-parallel training (DDP), one shard of each batch per rank
"""
import collections
import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import metrics

METHOD = "lm_listener"

# ----------------------------------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass
class Config:
    data: str = "trevor"              # listener data: twin (trevor, realtalk), data folder or world root ("" = world)
    out: str = "runs/lm_listener"     # run folder: ckpt.pt, config.json, metrics.json, samples/
    preset: str = "default"           # smoke | default | full
    vq: str = "runs/vqvae/ckpt.pt"    # VQ-VAE of the LR tokens: IN,AdaIN (MMLM) or none,none (Tab. 4); "" = <out>/vq
    vq_naive: str = "runs/vqvae_naive/ckpt.pt"  # none,none VQ-VAE of the naive random walk; "" = <out>/vq_naive
    modalities: str = "W+SA+emo"      # speaker modalities (Tab. 3): W, W+SA, W+emo, W+SA+emo, W+iSC, W+iSC+emo
    clip_frames: int = 64             # frames T of a training / evaluation window, a multiple of r (paper 240)
    n_hist: int = 8                   # N': history words W^h kept before the window (paper 32)
    speaker_lag: int = 0              # 0: LR_i after group i's speaker tokens (Eq. 1); 1: after group i-1's (Eq. 4)
    v_sa: int = 64                    # V_SA: centroids of each acoustic k-means stage (SpeechTokenizer 1024)
    max_words: int = 512              # word vocabulary cap, most frequent train words first (paper: GPT-2 BPE)
    n_layer: int = 4                  # transformer blocks (GPT-2-medium 24)
    d_model: int = 128                # width D (GPT-2-medium 1024)
    n_head: int = 4                   # attention heads (GPT-2-medium 16)
    ctx: int = 256                    # context length in tokens (GPT-2 1024)
    dropout: float = 0.1              # dropout in attention, MLP and embeddings (GPT-2 0.1)
    steps: int = 2200                 # optimiser steps of both stages together
    stage1_steps: int = 1000          # of which Eq. 3 speaker pre-training, at most steps // 2 (0 = no stage 1)
    batch_size: int = 32              # windows per optimiser step (paper 32)
    lr: float = 1e-3                  # peak AdamW learning rate (paper 3e-4)
    warmup: int = 50                  # linear warm-up steps in each stage, then cosine to 0.1 * lr (paper 500)
    weight_decay: float = 0.1         # AdamW weight decay on matrices (paper 0.1)
    grad_clip: float = 1.0            # gradient-norm clip
    eval_every: int = 500             # steps between checkpoints (and, in stage 2, validation decodes)
    n_eval_decode: int = 64           # val windows decoded greedily at each validation
    nucleus: float = 0.9              # sample mode: also score nucleus sampling at this top-p (LM-Listener's; 0 = off)
    max_eval: int = 0                 # sample mode: cap on evaluated windows (0 = all)
    eval_frames: int = 240            # sample mode: frames per evaluated window (paper: 8-s clips; 0 = --clip-frames)
    stream: bool = False              # sample mode: also decode frame by frame as the speech arrives, timing each token
    stream_seconds: int = 60          # sample --stream: seconds of the streamed speaker (latency at this mark)
    cache: str = ""                   # folder of cached acoustic features and k-means ("" = out; runs may share one)
    ckpt: str = ""                    # sample mode: checkpoint (default <out>/ckpt.pt)
    split: str = "test"               # sample mode: split to evaluate
    device: str = "auto"              # auto | cpu | cuda | cuda:N | mps
    dtype: str = "float32"            # float32 | bfloat16 | float16 (autocast; float16 adds a gradient scaler)
    compile: bool = False             # torch.compile the model for training (checkpoints hold the plain module)
    seed: int = 0                     # seeds python, numpy and torch; the batch of step s depends on (seed, s) only
    resume: bool = False              # continue from <out>/ckpt.pt


PRESETS = {
    "smoke": dict(out="runs/lm_listener-smoke", n_layer=2, d_model=32, n_head=2, steps=90, stage1_steps=30,
                  batch_size=8, warmup=5, eval_every=45, v_sa=16, n_eval_decode=4, max_eval=12, eval_frames=0,
                  dropout=0.0, vq="", vq_naive=""),               # a smoke run trains its own tiny VQ-VAEs
    "default": {},
    "full": dict(n_layer=12, d_model=768, n_head=12, ctx=1024, clip_frames=240, n_hist=32, v_sa=1024, max_words=4096,
                 steps=70000, stage1_steps=20000, lr=3e-4, warmup=500, eval_every=2000),
}
R, E_EMO = 8, 8                       # frames per LR token, emotion classes
BOUND = ["<sa>", "</sa>", "<isc>", "</isc>", "<emo>", "</emo>", "<lr>", "</lr>"]
MODALITIES = ["W", "W+SA", "W+emo", "W+SA+emo", "W+iSC", "W+iSC+emo"]


def check_config(cfg, mode):
    """A user's mistake in the flags -> data.UserError. Fills the VQ-VAE paths that a smoke run keeps under --out."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rules = [  # (ok, what the user is told), all computed before one is raised
        (cfg.clip_frames % R == 0, f"--clip-frames {cfg.clip_frames}: expected a multiple of the VQ-VAE's r = {R}"),
        (cfg.eval_frames % R == 0, f"--eval-frames {cfg.eval_frames}: expected a multiple of the VQ-VAE's r = {R}"),
        (cfg.n_head <= 0 or cfg.d_model % cfg.n_head == 0,
         f"--d-model {cfg.d_model}: expected a multiple of --n-head {cfg.n_head}"),
        (cfg.speaker_lag in (0, 1), f"--speaker-lag {cfg.speaker_lag}: expected 0 (Eq. 1) or 1 (Eq. 4)"),
        (cfg.dtype in ("float32", "bfloat16", "float16"), f"--dtype {cfg.dtype}: expected float32|bfloat16|float16"),
        (0 <= cfg.nucleus <= 1, f"--nucleus {cfg.nucleus}: expected a top-p in (0, 1], or 0 for none"),
        (0 <= cfg.dropout < 1, f"--dropout {cfg.dropout}: expected a probability in [0, 1)"),
        (cfg.data in data.TWINS or not cfg.data or Path(cfg.data).exists(),
         f"--data {cfg.data}: no such folder (world root or listener data)"),
        (mode != "train" or cfg.batch_size % world == 0,
         f"--batch-size {cfg.batch_size}: not a multiple of {world} ranks")]
    data.check_fields(cfg, positive=["steps", "batch_size", "clip_frames", "n_layer", "d_model", "n_head", "ctx",
                                     "v_sa", "max_words", "eval_every", "n_eval_decode", "lr", "stream_seconds"],
                      non_negative=["stage1_steps", "n_hist", "warmup", "max_eval", "eval_frames", "weight_decay",
                                    "grad_clip"], choices=dict(modalities=MODALITIES), rules=rules)
    cfg.vq = cfg.vq or str(Path(cfg.out) / "vq" / "ckpt.pt")
    cfg.vq_naive = cfg.vq_naive or str(Path(cfg.out) / "vq_naive" / "ckpt.pt")


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
# The vocabulary and the interleaved sequence (Eq. 1 of MMLM), its speaker-only version (Eq. 2). The speaker's
# tokens (residual k-means SA / iSC, emotion per group) come from data.py's stand-ins for the pretrained tokenisers.


class Vocab:
    """Contiguous id blocks: words [0, V_W) (<pad>=0, <unk>=1, <bos>=2), SA, iSC (if used), emo, LR, boundaries."""

    def __init__(self, words, v_sa, v_lr, isc=False):
        self.words = ["<pad>", "<unk>", "<bos>"] + [w for w in words if w not in ("<pad>", "<unk>", "<bos>")]
        self.w2i = {w: i for i, w in enumerate(self.words)}
        self.V_W, self.v_sa, self.v_lr = len(self.words), v_sa, v_lr
        self.sa0, self.isc0 = self.V_W, self.V_W + v_sa
        self.emo0 = self.isc0 + (v_sa if isc else 0)
        self.lr0 = self.emo0 + E_EMO
        self.b = {name: self.lr0 + v_lr + k for k, name in enumerate(BOUND)}
        self.size = self.lr0 + v_lr + len(BOUND)


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


def speaker_groups(clip, f0, G, V, mods, lag=0):
    """The speaker side of a window of G groups from frame f0 of `clip` (words [(id, end_frame)], sa/isc/sa_end (n,),
    emo (G_clip,)): the history words (ending before the first block's span) and, for i = 1..G, (words, speaker
    block) placed before LR_i: speaker group i's (lag 0, Eq. 1) or group i - lag's (lag 1, Eq. 4's emo_{1:i-1})."""
    s0, g0 = f0 - lag * R, f0 // R - lag
    hist, words, sa, isc = [], *([[] for _ in range(G + 1)] for _ in range(3))       # index 1..G = group
    for w, end in clip["words"]:
        g = group_of(end, s0)
        if g <= 0:
            hist.append(w)
        elif g <= G:
            words[g].append(w)
    for s, c, end in zip(clip["sa"].tolist(), clip["isc"].tolist(), clip["sa_end"].tolist()):
        g = group_of(end, s0)
        if 1 <= g <= G:
            sa[g].append(s)
            isc[g].append(c)
    return hist, [(words[i], speaker_block(words[i], sa[i], isc[i], int(clip["emo"][g0 + i - 1]) if g0 + i > 0
                                           else None, V, mods)) for i in range(1, G + 1)]


def build_sequence(clip, f0, G, V, mods, n_hist, with_lr=True, ctx=None, lag=0):
    """Eq. 1: [<bos>, W^h, for i = 1..G: W_i, <sa> SA_i </sa>, <emo> emo_i </emo>, <lr> LR_i </lr>] for the window
    of G groups starting at frame f0 of `clip` (speaker_groups; lr (G_clip,)); with_lr=False gives Eq. 2's S'.
    Returns ids (N,) and kind (N,): 0 input only, 1 speaker content (stage-1 target, after W^h), 2 LR content
    (stage-2 target)."""
    hist, groups = speaker_groups(clip, f0, G, V, mods, lag)
    hist = hist[-n_hist:] if n_hist > 0 else []
    if ctx is not None:  # only W^h is ever truncated (from the left) to fit the context
        hist = hist[max(0, len(hist) - max(0, ctx - 1 - sum(len(b) + 3 for _, b in groups))):]
    ids, kind, bset = [V.w2i["<bos>"]] + hist, [0] * (1 + len(hist)), set(V.b.values())
    for i, (_, blk) in enumerate(groups):
        ids += blk
        kind += [0 if t in bset else 1 for t in blk]
        if with_lr:
            ids += [V.b["<lr>"], V.lr0 + int(clip["lr"][f0 // R + i]), V.b["</lr>"]]
            kind += [0, 2, 0]
    assert ctx is None or len(ids) <= ctx, f"sequence of {len(ids)} tokens exceeds ctx {ctx}"
    return ids, kind


# ----------------------------------------------------------------------------------------------------------------------
# GPT with a KV cache (nanoGPT-style, pre-LN), decoding, the two losses


class Block(nn.Module):
    def __init__(self, d, h, p):
        super().__init__()
        self.h, self.p = h, p
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.Dropout(p))
        self.drop = nn.Dropout(p)

    def forward(self, x, cache=None):
        q, k, v = rearrange(self.qkv(self.ln1(x)), "b n (three h dh) -> three b h n dh", three=3, h=self.h)
        if cache is not None:  # append this chunk's keys/values; queries attend to the past + causally within
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)              # (B, H, P+N, Dh)
            cache["k"], cache["v"] = k, v
        N, P = x.shape[1], k.shape[2] - x.shape[1]
        mask = None if P == 0 else torch.ones(N, P + N, dtype=torch.bool, device=x.device).tril(P)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=P == 0,
                                           dropout_p=self.p if self.training else 0.0)           # (B, H, N, Dh)
        x = x + self.drop(self.proj(rearrange(y, "b h n dh -> b n (h dh)")))                     # (B, N, D)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Token + learned position embeddings -> pre-LN blocks -> LN. LM head tied to the embedding (stage 1);
    a separate LR head Linear(D -> V_LR), MMLM's additional affine projection (stage 2, inference)."""

    def __init__(self, vocab_size, v_lr, cfg):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab_size, cfg.d_model), nn.Embedding(cfg.ctx, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.n_head, cfg.dropout) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lr_head = nn.Linear(cfg.d_model, v_lr)
        self.apply(lambda m: nn.init.normal_(m.weight, std=0.02) if isinstance(m, (nn.Linear, nn.Embedding)) else None)

    def forward(self, idx, cache=None, stage=0, at=None):
        """idx (B, N) -> hidden (B, N, D); with a cache (one dict per block) positions continue from it. With
        stage 1 or 2 and at (B, N) bool: the logits at those positions from the stage's head instead, so that the
        whole training graph runs inside forward (as DistributedDataParallel wants)."""
        P = cache[0]["k"].shape[2] if cache and "k" in cache[0] else 0
        x = self.drop(self.wte(idx) + self.wpe(torch.arange(P, P + idx.shape[1], device=idx.device)))  # (B, N, D)
        for i, blk in enumerate(self.blocks):
            x = blk(x, None if cache is None else cache[i])
        h = self.ln_f(x)
        if stage == 0:
            return h
        return h[at] @ self.wte.weight.T if stage == 1 else self.lr_head(h[at])         # (n_targets, V or V_LR)


def pick(logits, top_p=0.0, gen=None):
    """Greedy (top_p = 0) or nucleus sampling over the LR head's logits (V_LR,)."""
    if top_p <= 0:
        return int(logits.argmax())
    p, order = torch.softmax(logits.float(), -1).sort(descending=True)
    keep = p.cumsum(0) - p < top_p
    return int(order[keep][torch.multinomial(p[keep] / p[keep].sum(), 1, generator=gen)])


class Decoder:
    """LR decoding with a KV cache over a sliding context, so that any length decodes in linear time at the
    positions the model was trained on: the context is [<bos>, W^h, the groups so far]; when it holds max_groups
    groups (or would pass ctx), it restarts from the last half of them (their speaker blocks and LR tokens) with the
    words before them as W^h (the last n_hist: the paper's history words). step(words, block) -> LR token."""

    def __init__(self, model, V, hist, n_hist, max_groups, top_p=0.0, gen=None):
        self.m, self.V, self.hist, self.n_hist, self.max_g, self.top_p, self.gen = (
            model, V, list(hist), n_hist, max_groups, top_p, gen)
        self.ctx, self.done = model.wpe.num_embeddings, []                  # done: (words, block, LR) in context
        self.restart()

    def restart(self):
        self.cache = [{} for _ in self.m.blocks]                            # one KV dict per block
        self.pend = [self.V.w2i["<bos>"]] + (self.hist[-self.n_hist:] if self.n_hist > 0 else [])
        for _, blk, t in self.done:
            self.pend += blk + [self.V.b["<lr>"], self.V.lr0 + t, self.V.b["</lr>"]]

    @torch.no_grad()
    def step(self, words, block):
        used = self.cache[0]["k"].shape[2] if "k" in self.cache[0] else 0
        while self.done and (len(self.done) >= self.max_g or used + len(self.pend) + len(block) + 1 > self.ctx):
            keep = max(0, min(len(self.done) - 1, self.max_g // 2))        # slide: drop the older groups
            self.hist += [w for d in self.done[: len(self.done) - keep] for w in d[0]]
            self.done = self.done[len(self.done) - keep:]
            self.restart()
            used = 0
        x = torch.tensor([self.pend + block + [self.V.b["<lr>"]]], device=self.m.wte.weight.device)
        tok = pick(self.m.lr_head(self.m(x, self.cache)[0, -1]), self.top_p, self.gen)
        self.done.append((list(words), list(block), tok))
        self.pend = [self.V.lr0 + tok, self.V.b["</lr>"]]
        return tok


def decode(model, V, hist, groups, n_hist, max_groups, top_p=0.0, gen=None):
    """LR tokens (ids in [0, V_LR)) of speaker_groups' (hist, groups), decoded with a sliding Decoder."""
    dec = Decoder(model, V, hist, n_hist, max_groups, top_p, gen)
    return [dec.step(w, b) for w, b in groups]


def batch_loss(model, seqs, stage, V, n_targets=None):
    """Right-padded batch of (ids, kind). Stage 1 (Eq. 3): LM head over the full vocabulary on speaker content
    targets; stage 2 (Eq. 4): LR head on LR targets only. Mean over the target positions, or their sum divided by
    n_targets (a torchrun shard: the DDP average of the ranks' gradients is then the whole batch's). -> (loss, acc)"""
    N, dev = max(len(s) for s, _ in seqs), next(model.parameters()).device
    ids = torch.tensor([s + [0] * (N - len(s)) for s, _ in seqs], device=dev)          # (B, N)
    kind = torch.tensor([k + [0] * (N - len(k)) for _, k in seqs], device=dev)         # (B, N); pads are 0
    tgt, m = ids[:, 1:], kind[:, 1:] == stage                                           # position p predicts p+1
    logits = model(ids[:, :-1], stage=stage, at=m)                                      # (n_targets, V or V_LR)
    y = tgt[m] - (V.lr0 if stage == 2 else 0)
    loss = F.cross_entropy(logits.float(), y, reduction="mean" if n_targets is None else "sum") / (n_targets or 1)
    return loss, (logits.argmax(-1) == y).float().mean()


# ----------------------------------------------------------------------------------------------------------------------
# The VQ-VAE stage, offline prediction


def get_vq(path, cfg, data_path, naive=False):
    """Load the VQ-VAE at `path`, reused only when it was trained on this run's data and preset. A smoke run
    (re)trains a missing or mismatched one under its own --out, in one line; any other run stops with the reason."""
    import vqvae  # the stage this method depends on
    norm = "none,none" if naive else "IN,AdaIN"
    why = data.vq_mismatch(path, data_path, cfg.preset, norm if naive else None, R)
    if why:
        own = Path(cfg.out) / ("vq_naive" if naive else "vq") / "ckpt.pt"
        if cfg.preset != "smoke" or dist.is_initialized():
            raise data.UserError(f"VQ-VAE {path} {why}; train it first: python vqvae.py --preset {cfg.preset} "
                                 f"--norm {norm} --data '{cfg.data}' --out {Path(path).parent}")
        print(f"[lm_listener] VQ-VAE checkpoint {path} {why}: training it now ({norm}, preset smoke) into {own}")
        vqvae.main(["--data", cfg.data, "--out", str(own.parent), "--preset", cfg.preset, "--norm", norm], "train")
        path = own
    return vqvae.load_vqvae(path, device="cpu")


@torch.no_grad()
def predict(model, V, clips, wins, vq, cfg, top_p=0.0, T=None):
    """Greedy (or nucleus) LR tokens for each window of T frames (default --clip-frames; longer ones slide) ->
    de-normalised motion list [(T, 56)] and tokens (n, G)."""
    gen, toks, mods = torch.Generator().manual_seed(cfg.seed), [], cfg.modalities.split("+")
    for c, f0 in wins:
        hist, groups = speaker_groups(clips[c], f0, (T or cfg.clip_frames) // R, V, mods, cfg.speaker_lag)
        toks.append(decode(model, V, hist, groups, cfg.n_hist, cfg.clip_frames // R, top_p, gen))
    toks = torch.tensor(toks)
    return data.decode_motion(vq, toks, [clips[c]["item"]["listener_beta"] for c, _ in wins]), toks


# ----------------------------------------------------------------------------------------------------------------------
# Training: stage 1 (Eq. 3) then stage 2 (Eq. 4)


def lr_at(step, steps, cfg):
    """Linear warm-up, then cosine to 0.1 * lr, within one stage."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def sequences(clips, wins, V, cfg, with_lr=True):
    """build_sequence of each window (clip index, start frame) of --clip-frames; with_lr=False: Eq. 2's speaker-only."""
    return [build_sequence(clips[c], f0, cfg.clip_frames // R, V, cfg.modalities.split("+"), cfg.n_hist, with_lr,
                           cfg.ctx, cfg.speaker_lag) for c, f0 in wins]


@torch.no_grad()
def validate(model, V, va, wins, vq, cfg, step):
    """Teacher-forced val CE and LR accuracy, then greedy decoding of `wins` scored by the listener metrics."""
    model.eval()
    vce, vacc = batch_loss(model, sequences(va, wins, V, cfg), 2, V)
    preds = predict(model, V, va, wins, vq, cfg)[0]
    model.train()
    return metrics.validate_lm_listener(preds, [c["item"] for c in va], wins, cfg.clip_frames, vce, vacc, step,
                                        tqdm.write)


def start_run(cfg, dev, world):
    """Print and save the config; load the VQ-VAE, the vocabulary (most frequent train words first), the acoustic
    k-means (fitted once per data, v_sa and seed, then cached) and the train / val token streams. Rank 0 goes first:
    it may generate the world and write the caches that the other ranks then read."""
    if not data.is_main():
        dist.barrier()
    out, path = Path(cfg.out), data.resolve_data(cfg.data, "listener", cfg.preset)
    if data.is_main():
        out.mkdir(parents=True, exist_ok=True)
        print(f"[lm_listener] device {dev}; data {path}\n" + json.dumps(dataclasses.asdict(cfg), indent=1))
        (out / "config.json").write_text(json.dumps({**dataclasses.asdict(cfg), "data": str(path)}, indent=1))
    items = {split: data.load_listener(path, split) for split in ("train", "val")}
    vq, cache = get_vq(cfg.vq, cfg, path), Path(cfg.cache or cfg.out)
    no_audio = sum(it["audio"] is None for it in items["train"])
    if no_audio:  # the LM-Listener release has no audio: no SA / iSC tokens
        mods = "+".join(m for m in cfg.modalities.split("+") if m not in ("SA", "iSC"))
        print(f"[lm_listener] {no_audio} train clips of {path} have no audio: acoustic tokens off, modalities "
              f"{cfg.modalities} -> {mods}")
        cfg.modalities = mods
    counts = collections.Counter(text.lower() for it in items["train"] for text, _ in it["words"])
    words = sorted(counts, key=lambda w: (-counts[w], w))[:cfg.max_words - 3]
    V = Vocab(words, cfg.v_sa, vq.K, isc="iSC" in cfg.modalities)
    feats = {split: data.clip_features(x, cache / f"sa_feats_{split}.pt", METHOD, R) for split, x in items.items()}
    km = data.sa_kmeans(cache / "sa_kmeans.pt", [str(path), cfg.v_sa, cfg.seed], feats["train"], cfg.v_sa, cfg.seed,
                        METHOD, placeholder=no_audio > 0)
    tr, va = (data.token_clips(x, V.w2i, km, vq, feats[split], R) for split, x in items.items())
    if any(c["T"] < cfg.clip_frames for c in tr):  # training windows lie inside a clip
        print(f"[lm_listener] {sum(c['T'] < cfg.clip_frames for c in tr)} train clips shorter than --clip-frames "
              f"{cfg.clip_frames} skipped")
        tr = [c for c in tr if c["T"] >= cfg.clip_frames]
    if data.is_main() and world > 1:
        dist.barrier()
    return out, path, (vq, V, km, tr, va)


def train(cfg):
    data.seed_all(cfg.seed)
    dev = data.pick_device(cfg.device)
    world = data.ddp_setup(dev)[1]
    out, path, (vq, V, km, tr, va) = start_run(cfg, dev, world)
    n1 = min(cfg.stage1_steps, cfg.steps // 2)
    torch.manual_seed(cfg.seed)     # the initial weights must not depend on a VQ-VAE trained in this process or not
    n2, model = cfg.steps - n1, GPT(V.size, V.v_lr, cfg).to(dev)
    decay = [p for p in model.parameters() if p.dim() >= 2]       # AdamW decays matrices only (nanoGPT's split)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0}],
                            lr=cfg.lr, betas=(0.9, 0.95))
    scaler, start, hist = data.grad_scaler(dev, cfg.dtype), 0, {}
    if cfg.resume:  # everything the next step depends on: weights, AdamW moments, loss scale, random streams
        ck = load_checkpoint(out / "ckpt.pt", dev)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        scaler.load_state_dict(ck["scaler"])
        data.set_rng_state(ck["rng"])
        start, hist = ck["step"], ck["metrics"]
    net = torch.compile(model) if cfg.compile else model
    net = DDP(net, find_unused_parameters=True) if world > 1 else net   # stage 1 leaves the LR head unused
    if data.is_main():
        print(f"[lm_listener] GPT {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, vocab {V.size} "
              f"(words {V.V_W}, SA {V.v_sa}, LR {V.v_lr}); {len(tr)} train clips; from step {start} of {n1 + n2}")
    va_win = metrics.tiling([c["item"] for c in va], cfg.clip_frames, R)[: cfg.n_eval_decode]
    bar = tqdm(range(start, n1 + n2), desc="lm_listener", dynamic_ncols=True, mininterval=2, disable=not data.is_main())
    for step in bar:
        stage = 1 if step < n1 else 2
        for g in opt.param_groups:
            g["lr"] = lr_at(step - (0 if stage == 1 else n1), n1 if stage == 1 else n2, cfg)
        wins = data.window_starts(tr, cfg.clip_frames // R, np.random.default_rng([cfg.seed, step]), cfg.batch_size, R)
        seqs = sequences(tr, wins, V, cfg, stage == 2)  # a function of (seed, step): the same on every rank and resume
        n = sum(k == stage for _, kd in seqs for k in kd[1:]) / world if world > 1 else None
        with data.autocast(dev, cfg.dtype):
            loss, acc = batch_loss(net, data.shard(seqs), stage, V, n)      # this rank's rows of it
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(opt)
        scaler.update()
        hist.setdefault("loss", {})[step + 1] = [stage, loss.item()]
        bar.set_postfix(stage=stage, loss=f"{loss.item():.3f}", acc=f"{acc.item():.2f}")
        if (step + 1) % cfg.eval_every == 0 or step + 1 == n1 + n2:   # after the step: the checkpoint holds it
            if data.is_main() and stage == 2:
                hist[step + 1] = validate(model, V, va, va_win, vq, cfg, step + 1)
            save_checkpoint(out / "ckpt.pt", dict(
                model=model.state_dict(), optimizer=opt.state_dict(), scaler=scaler.state_dict(), step=step + 1,
                metrics=hist, config={**dataclasses.asdict(cfg), "data": str(path)}, words=V.words[3:], km=km,
                v_lr=V.v_lr, rng=data.rng_state()))
    data.check_in_sync(model)                                               # every rank ends with rank 0's weights
    if data.is_main():
        print(f"[lm_listener] trained {n1 + n2 - start} steps -> {out}/ckpt.pt")
    data.ddp_teardown()
    return out / "ckpt.pt"


# ----------------------------------------------------------------------------------------------------------------------
# Sampling: load, decode (offline and streaming), evaluate, render


def load_model(ckpt_path, device="cpu"):
    """Rebuild the GPT, vocabulary, k-means and training config from a checkpoint alone."""
    ck = load_checkpoint(ckpt_path)
    cfg = Config(**{k: v for k, v in ck["config"].items() if k in {f.name for f in dataclasses.fields(Config)}})
    V = Vocab(ck["words"], cfg.v_sa, ck["v_lr"], isc="iSC" in cfg.modalities)
    model = GPT(V.size, V.v_lr, cfg)
    model.load_state_dict(ck["model"])
    return model.to(device).eval(), V, ck["km"], cfg


@torch.no_grad()
def stream(model, V, km, clip, cfg):
    """Consume a speaker stream as it arrives (audio, emotion readout, finished words) and yield LR_i as soon as its
    speaker block is in: at group i's last frame (lag 0), or at group i-1's, when LR_i's own frames begin (lag 1).
    The context slides as offline (Decoder); metrics.stream_latency times each token from that frame to LR_i."""
    it, mods, lag = clip["item"], cfg.modalities.split("+"), cfg.speaker_lag
    audio = np.zeros(0, np.float32) if it["audio"] is None else it["audio"]
    words = sorted(clip["words"], key=lambda w: w[1])
    dec = Decoder(model, V, [w for w, e in words if group_of(e) <= -lag], cfg.n_hist, cfg.clip_frames // R)
    blocks, done_sa = {}, 0                                      # blocks: group -> its SA and iSC tokens so far
    for i in range(1 - lag, clip["T"] // R - lag + 1):           # speaker group i, placed before LR_{i + lag}
        wav = audio[: round(max(i, 0) * R * data.SR / data.FPS)]                              # the speech so far
        sa, isc, end, j0 = data.sa_tokens_since(wav, km, done_sa)   # the tokeniser on it, from pooled frame j0
        for k in range(len(sa)):                                 # SA tokens whose support has ended
            if j0 + k >= done_sa and group_of(float(end[k])) <= i:
                g = blocks.setdefault(max(1, group_of(float(end[k]))), ([], []))
                g[0].append(int(sa[k]))
                g[1].append(int(isc[k]))
                done_sa = j0 + k + 1
        emo = int(it["speaker_attr"][(i - 1) * R: i * R, 17:25].mean(0).argmax()) if i > 0 else None
        wi = [w for w, e in words if group_of(e) == i]
        yield dec.step(wi, speaker_block(wi, *blocks.pop(i, ([], [])), emo, V, mods))


def sample(cfg):
    """Decode the split with the checkpoint's model (greedy, plus nucleus at --nucleus), then score every row of the
    listener table, render and write <out>/metrics.json (metrics.evaluate_lm_listener_split). The model's settings
    come from its checkpoint; the evaluation flags (split, max_eval, nucleus, stream, seed, data) from this command."""
    ckpt, out = Path(cfg.ckpt or Path(cfg.out) / "ckpt.pt"), Path(cfg.out)
    model, V, km, tcfg = load_model(ckpt, data.pick_device(cfg.device))
    tcfg.seed = cfg.seed
    path = data.resolve_data(cfg.data, "listener", tcfg.preset) if cfg.data else tcfg.data
    data.seed_all(cfg.seed)
    print(f"[lm_listener] sampling {ckpt} on {path} ({cfg.split}), modalities {tcfg.modalities}, vq {tcfg.vq}")
    tr_items, te_items = data.load_listener(path, "train"), data.load_listener(path, cfg.split)
    T, mods = cfg.eval_frames or tcfg.clip_frames, tcfg.modalities.split("+")
    vq, G = get_vq(tcfg.vq, tcfg, path), T // R
    feats = data.clip_features(te_items, Path(tcfg.cache or ckpt.parent) / f"sa_feats_{cfg.split}.pt", METHOD, R)
    te = data.token_clips(te_items, V.w2i, km, vq, feats, R)
    wins = metrics.tiling(te_items, T, R)[: cfg.max_eval or None]
    preds, toks = predict(model, V, te, wins, vq, tcfg, T=T)
    rows = {"model": preds}
    if cfg.nucleus > 0:  # greedy decoding collapses the variation: nucleus sampling is scored beside it
        rows[f"model:nucleus_{cfg.nucleus:g}"] = predict(model, V, te, wins, vq, tcfg, cfg.nucleus, T)[0]
    lr_gt = torch.stack([te[c]["lr"][f0 // R: f0 // R + G] for c, f0 in wins])   # the true tokens: the codec's floor
    walks = {"naive": get_vq(tcfg.vq_naive, tcfg, path, naive=True)}            # the random walks' codecs
    if vq.cfg.norm != "none,none":                                 # a Tab. 4 run decodes with the naive one
        walks["identity"] = vq
    extra = None
    if cfg.stream:  # streaming must give the offline tokens; its latency at the 60-s mark
        clip = data.token_clips([metrics.long_item(te_items, cfg.stream_seconds)], V.w2i, km, None, r=R)[0]
        offline = decode(model, V, *speaker_groups(clip, 0, clip["T"] // R, V, mods, tcfg.speaker_lag), tcfg.n_hist,
                         tcfg.clip_frames // R)
        extra = {"model": metrics.stream_latency(stream(model, V, km, clip, tcfg), offline, cfg.stream_seconds,
                                                 tcfg.clip_frames // R, R)}
    rows = metrics.evaluate_lm_listener_split(out, path, cfg.split, tr_items, te_items, wins, T, rows, {
        "model": toks, "baseline:vq_floor": lr_gt}, vq, walks, extra=extra, seed=cfg.seed, r=R)
    print(f"[lm_listener] wrote {out / 'metrics.json'} and {out / 'samples'}")
    return rows


def main(argv=None, mode="train"):
    cfg = parse_config(list(argv or []), mode)
    if mode == "sample" and not any(a.split("=")[0] == "--data" for a in argv or []):
        cfg.data = ""                 # sample: the checkpoint's data unless --data is given
    return train(cfg) if mode == "train" else sample(cfg)


if __name__ == "__main__":
    cli()
