"""Train one method, or every paper table's runs: `python train.py --model NAME [flags]`.

    python train.py --model vqvae --preset smoke        # one method, seconds on a CPU
    python train.py --model vqvae --help                # that method's own flags
    python train.py --model all                         # each table's main run (ours + baselines), results.md
    python train.py --model all --rows all              # every row of every table (the README's tables)
    python train.py --model all --table lm_listener     # only the runs (and what they need) of one table
    python train.py --model all --help                  # the pipeline's flags and its tables

`--model NAME` hands the remaining flags to NAME.py (`python NAME.py` does the same). `--model all` is the
pipeline: RUNS below says which trainings (one method file, some flags) and which samplings of a trained
checkpoint exist, TABLES which runs make the rows of each paper table. Each run lives in <runs>/<name>/
(checkpoint, metrics.json, pictures); results.md assembles the tables from those metrics.json files.
A checkpoint is reused only when the configuration it recorded is the one this run would train now.
"""
import dataclasses
import importlib
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageSequence

import data

MODELS = ["vqvae", "discrete_diffusion", "latent_diffusion", "lm_listener", "diff_transformer"]
ROOT = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------------------------------------------------
# The runs and the tables (plain data: edit flags and names here)

class Run(NamedTuple):
    name: str          # its folder under the runs folder, and the `run` column of results.md
    model: str         # the method file
    train: str = ""    # training flags; {runs} is the runs folder (a `{runs}/NAME/ckpt.pt` makes NAME a dependency)
    sample: str = ""   # extra sampling flags
    of: str = ""       # a sample-only run: no training, it samples the checkpoint of this run with its own flags
    smoke: bool = True  # also in `--preset smoke` pipelines (the main runs and one of each other kind: fast tests)


NAIVE, IDENT = "--vq {runs}/vqvae_naive/ckpt.pt", "--vq {runs}/vqvae/ckpt.pt"
DD_MODEL = "--data trevor --vq {runs}/vqvae_naive_paper/ckpt.pt"  # the paper's codec: K = 256, per-channel std
DD_PAPER = ("--data trevor --vq {runs}/vqvae_naive_paper/ckpt.pt --no-identity --replace-mass 0.1 --mask-end 0.9 "
            "--fuse-stride 1 --sample-steps 0")  # DiffListener as the paper configures it (discrete_diffusion.py)
LM = " --vq-naive {runs}/vqvae_naive/ckpt.pt --cache {runs}/lm_listener --modalities "  # ablations share its features
# Order matters: a run comes after the runs it needs.
RUNS = [
    Run("vqvae_naive", "vqvae", "--norm none,none"),                       # naive codec, one std (LM naive rows)
    Run("vqvae", "vqvae", "--norm IN,AdaIN"),                              # the identity codec of the LM listener
    Run("vqvae_channel", "vqvae", "--norm IN,AdaIN --scale channel", smoke=False),  # Tab. 5's recipe: per-channel std
    Run("vqvae_ln_ln", "vqvae", "--norm LN,LN", smoke=False),
    Run("vqvae_ln_adaln", "vqvae", "--norm LN,AdaLN", smoke=False),
    Run("vqvae_in_in", "vqvae", "--norm IN,IN", smoke=False),
    *[Run("vqvae_realtalk" + name, "vqvae", f"--data realtalk --norm {norm}", "--data realtalk", smoke=smoke)
      for name, norm, smoke in [("", "IN,AdaIN", True), ("_naive", "none,none", True), ("_ln_ln", "LN,LN", False),
                                ("_ln_adaln", "LN,AdaLN", False), ("_in_in", "IN,IN", False)]],  # Tab. 5, RealTalk
    # DiffListener's codec on trevor (its default data): the paper's K = 256 with per-channel std; K = 128 and 512
    Run("vqvae_naive_paper", "vqvae", "--data trevor --norm none,none --codebook-size 256 --scale channel"),
    *[Run(f"vqvae_naive_k{k}", "vqvae", f"--data trevor --norm none,none --scale channel --codebook-size {k}",
          smoke=False) for k in (128, 512)],
    Run("discrete_diffusion", "discrete_diffusion", DD_MODEL),             # `model`: our defaults
    Run("discrete_diffusion_one_std", "discrete_diffusion", "--data trevor --vq {runs}/vqvae_naive/ckpt.pt",
        smoke=False),                                                      # on vqvae.py's default codec (K = 128)
    Run("discrete_diffusion_paper", "discrete_diffusion", DD_PAPER, sample="--sample-steps 0"),  # `paper`
    *[Run(f"discrete_diffusion_{name}", "discrete_diffusion", DD_MODEL + flags, smoke=False)
      for name, flags in [("no_diff", " --no-diff"), ("no_text", " --no-text"),
                          ("no_text_no_diff", " --no-text --no-diff")]],  # the paper's 22 %: no_text vs no_text_no_diff
    *[Run(f"discrete_diffusion_k{k}", "discrete_diffusion",
          DD_MODEL.replace("vqvae_naive_paper/", f"vqvae_naive_k{k}/"), smoke=False) for k in (128, 512)],
    *[Run(f"discrete_diffusion_{name}", "discrete_diffusion", sample=f"{flags} --n-samples 1", of="discrete_diffusion",
          smoke=False) for name, flags in [("steps100", "--sample-steps 0"), ("steps10", "--sample-steps 10"),
                                           ("no_truncation", "--truncation 1.0")]],
    *[Run(f"{run}_val", "discrete_diffusion", sample=f"--split val {flags}".strip(), of=run, smoke=False)
      for run, flags in [("discrete_diffusion", ""), ("discrete_diffusion_paper", "--sample-steps 0")]],  # the choice
    Run("lm_listener", "lm_listener", IDENT + " --vq-naive {runs}/vqvae_naive/ckpt.pt", "--stream"),
    Run("lm_listener_paper", "lm_listener", IDENT + LM + "W+SA+emo --clip-frames 240 --n-hist 32 --ctx 512 --lr 3e-4 "
        "--warmup 500", smoke=False),                                      # the paper's recipe on our small GPT
    Run("lm_listener_lag1", "lm_listener", IDENT + LM + "W+SA+emo --speaker-lag 1", smoke=False),  # Eq. 4's order
    Run("lm_listener_w", "lm_listener", IDENT + LM + "W", smoke=False),       # Tab. 4 "ID only"
    *[Run("lm_listener_naive_" + m.lower().replace("+", "_"), "lm_listener", NAIVE + LM + m, smoke=False)
      for m in ("W", "W+SA", "W+emo", "W+SA+emo", "W+iSC", "W+iSC+emo")],  # Tab. 3 on the naive codec (+ Tab. 4)
    *[Run(f"lm_listener{v}_realtalk", "lm_listener", f"--data realtalk --vq {{runs}}/vqvae_realtalk{c}/ckpt.pt "
          f"--vq-naive {{runs}}/vqvae_realtalk_naive/ckpt.pt --cache {{runs}}/lm_listener_realtalk --modalities {m}",
          smoke=not v) for v, c, m in [("", "", "W+SA+emo"), ("_naive", "_naive", "W+SA+emo"),
                                      ("_naive_w", "_naive", "W")]],        # Tab. 2 and Fig. 5 on RealTalk
    Run("latent_diffusion", "latent_diffusion"),                           # x0-prediction, guidance 0.5 (ours)
    # LBD without classifier-free guidance: the paper (ε-prediction, Eq. 7), ours, and no speaker (the sanity check)
    *[Run(f"latent_diffusion_{name}", "latent_diffusion", f"{flags} --cond-drop 0 --guidance 1".strip(), "--guidance 1",
          smoke=False) for name, flags in [("paper", "--param eps"), ("noguide", ""), ("uncond", "--cond none")]],
    *[Run(f"latent_diffusion{name}_val", "latent_diffusion", sample="--split val" + flags, of=of, smoke=not name)
      for name, of, flags in [("", "latent_diffusion", ""), ("_g1", "latent_diffusion", " --guidance 1"),
                              ("_g025", "latent_diffusion", " --guidance 0.25"),
                              ("_noguide", "latent_diffusion_noguide", " --guidance 1")]],  # choosing g on val
    *[Run(f"latent_diffusion_plms{k}_s{s}", "latent_diffusion", of="latent_diffusion_noguide", smoke=False,
          sample=f"--plms-order {k} --sample-steps {s} --model-only --guidance 1")
      for k in (1, 2, 3, 4) for s in (10, 25, 50, 100)],                  # PLMS order x steps, one checkpoint
    Run("diff_transformer_ar", "diff_transformer", "--arch ar"),           # the FaceFormer-style baseline
    Run("diff_transformer", "diff_transformer", sample="--ar-ckpt {runs}/diff_transformer_ar/ckpt.pt"),  # 10 reps
    Run("diff_transformer_last", "diff_transformer", sample="--no-keep-best --reps 1", of="diff_transformer",
        smoke=False),
    Run("diff_transformer_paper", "diff_transformer", "--no-zero-snr --no-norm --no-final-ln --no-keep-best",
        smoke=False),
    Run("diff_transformer_nobias", "diff_transformer", "--self-bias none", "--reps 1", smoke=False),
    Run("diff_transformer_nodiag", "diff_transformer", "--cross-mask full", "--reps 1", smoke=False),
    Run("diff_transformer_plain", "diff_transformer", "--self-bias none --cross-mask full", "--reps 1"),
]
# Listener metrics of the three listening-head tables.
LISTEN = ["mse/all", "fd/all", "pfd/all", "var_pred/all", "div_pred/all", "affect_l2"]


class Table(NamedTuple):
    name: str          # `--table NAME`
    title: str
    caption: str
    columns: list      # metric names, as in metrics.json
    main: str          # the run whose every row (GT, alt-GT, baselines, oracles, model, ...) the table shows
    rows: list         # (label, run): that run's `model` rows under label (model:X -> label:X);
    #                    (label, run, row): that one row under label


TABLES = [
    *[Table(f"vq_norms{sfx}", f"Listener tokens: VQ-VAE normalisation (MMLM Tab. 5, {twin})",
            f"{twin} test clips (240 frames) through encode → decode, coded in 64-frame windows like the training "
            "crops; Rec / Commit / PPL over clips, the other columns over 64-frame windows (fd/all of a model row = "
            "the codec floor: the FD of the windows' own tokens decoded, as the LM decodes them); `model` is "
            "(IN, AdaIN) with one std for all channels, `paper` the same with per-channel std (--scale channel); "
            "Rec of the two is in their own units; ablations the other normalisations (encoder, decoder); "
            "`:whole_clip` codes each clip in one pass"
            + ("; `:seen` / `:unseen` listeners of the training split or not." if sfx else "."),
            ["rec", "commit", "ppl", "active", "mse/all", "fd/all", "pfd/all", "var_pred/all", "div_pred/all"],
            f"vqvae{sfx}", [*([("paper", "vqvae_channel")] if not sfx else []),
                            ("ablation:none,none", f"vqvae{sfx}_naive"), ("ablation:LN,LN", f"vqvae{sfx}_ln_ln"),
                            ("ablation:LN,AdaLN", f"vqvae{sfx}_ln_adaln"), ("ablation:IN,IN", f"vqvae{sfx}_in_in"),
                            ("baseline:random_walk_naive", f"vqvae{sfx}_naive", "baseline:random_walk")])
      for sfx, twin in [("", "trevor"), ("_realtalk", "realtalk")]],
    Table("diff_listener", "Listening heads: DiffListener on trevor",
          "Raw motion units (56-d: 50 expression + 6 pose), per window, test split of the trevor twin (one listener). "
          "Both rows use the paper's codec (naive VQ-VAE, K = 256, per-channel std). `paper`: T = 100 steps sampled "
          "one by one, mask-and-replace (10 % replace), no listener identity, per-frame fusion; `model`: our defaults "
          "(20 exact-jump steps, the released schedule, patches of 4 frames, Linear(beta)). Ablations retrained from "
          "`model`: without the facial differential, without text, both (the paper's ≈ 22 % FD is no_text vs "
          "no_text_no_diff), K = 128 / 512, and `one_std_K128` on vqvae.py's default codec (one std, K = 128); "
          "`steps<S>` / `no_truncation`: the `model` checkpoint sampled with S steps (100 = every step) or without "
          "truncation, one seed; `val:*`: the val split, on which the default was chosen. rule/*: share of the "
          "speaker's ledger events answered in whole test segments "
          "(sarcasm: answered wrongly).",
          LISTEN + ["rule/pause", "rule/amused", "rule/laugh", "rule/smile_seen", "rule/loud", "rule/valence",
                    "rule/sarcasm"], "discrete_diffusion",
          [("paper", "discrete_diffusion_paper"),
           *[(f"ablation:{n}", f"discrete_diffusion_{n}") for n in ("no_diff", "no_text", "no_text_no_diff")],
           ("ablation:K128", "discrete_diffusion_k128"), ("ablation:K512", "discrete_diffusion_k512"),
           ("ablation:one_std_K128", "discrete_diffusion_one_std"),
           *[(f"ablation:{n}", f"discrete_diffusion_{n}") for n in ("steps100", "steps10", "no_truncation")],
           ("val:model", "discrete_diffusion_val"), ("val:paper", "discrete_diffusion_paper_val")]),
    Table("lm_listener", "Listening heads: multimodal LM listener (MMLM Tab. 1, 3, 4; trevor)",
          "Raw motion units, 8-s test windows of the trevor twin (a 64-frame-trained model slides its context); "
          "`paper`: 240-frame training windows, N' = 32, lr 3e-4, warm-up 500 (our 4 x 128 GPT); `model`: ours; "
          "`speaker_lag_1`: LR_i after speaker group i-1 (Eq. 4, no look-ahead); `naive_*`: Tab. 3 modalities on the "
          "naive codec (naive_W = LM-Listener = Tab. 4 Naive, naive_W+SA+emo = MM only; W = ID only; model = Full); "
          "rule:* = share of the ledger's events answered (sarcasm: wrongly answered); baseline:vq_floor = the true "
          "tokens decoded; stream_ms_at_60s = ms per token over the last 5 s of a 60-s stream (2 CPU threads).",
          LISTEN + ["rule:pause", "rule:amused", "rule:loud", "rule:valence", "rule:sarcasm", "stream_ms_at_60s"],
          "lm_listener",
          [("paper", "lm_listener_paper"), ("ablation:speaker_lag_1", "lm_listener_lag1"),
           ("ablation:W", "lm_listener_w"),
           *[(f"ablation:naive_{m}", "lm_listener_naive_" + m.lower().replace("+", "_"))
             for m in ("W", "W+SA", "W+emo", "W+SA+emo", "W+iSC", "W+iSC+emo")]]),
    Table("lm_listener_realtalk", "Listening heads: multimodal LM listener on RealTalk (MMLM Tab. 2, Fig. 5)",
          "RealTalk twin, 8-s test windows; `/seen`, `/unseen`: listeners in the training split or only in test; "
          "swap_*: the row's tokens decoded with other listeners' beta against those listeners' answers to the same "
          "events (Fig. 5 as a number; a naive codec ignores beta); naive_W = LM-Listener's recipe.",
          ["mse/all", "fd/all", "pfd/all", "mse/seen", "fd/seen", "mse/unseen", "fd/unseen", "swap_mse", "swap_fd",
           "var_pred/all", "div_pred/all", "affect_l2"], "lm_listener_realtalk",
          [("ablation:naive", "lm_listener_naive_realtalk"), ("ablation:naive_W", "lm_listener_naive_w_realtalk")]),
    Table("react", "Diverse reactions, REACT protocol (Latent Behavior Diffusion)",
          "REACT twin, test split, 25-d attributes (AUs binarised at 0.5), 10 samples per speaker; appropriate set = "
          "the own GT + the real reactions of the neighbour clips of the appropriateness matrix (alt-GT: those "
          "neighbours, leave-one-out). FRCorr/FRDist: sum over the 10 samples (mean). frcorr: CCC where equal constant "
          "channels score 1; frcorr_official: the official CCC, where a constant channel scores 0. fd/all, "
          "var_pred/all: the 3DMM branch (sample 0). `paper`: ε-prediction (Eq. 7), no guidance; `model`: "
          "x0-prediction and classifier-free guidance g = 0.5 (null speaker code in 10 % of training segments); "
          "`ablation:no_guidance`: the model trained and sampled without it; `ablation:uncond`: no speaker condition; "
          "`ablation:plms<k>_s<S>`: no_guidance's checkpoint sampled with PLMS order k and S steps (LBD Tab. 3); "
          "`val:*`: the val split, on which g was chosen (`guidance_<g>`: the model's checkpoint sampled with g).",
          ["frcorr_sum", "frcorr_mean", "frcorr_official", "frdist_sum", "frdist_mean", "frdiv", "frvar", "frdvs",
           "frsyn", "fd/all", "var_pred/all"],
          "latent_diffusion", [("paper", "latent_diffusion_paper"),
                               ("ablation:no_guidance", "latent_diffusion_noguide"),
                               ("ablation:uncond", "latent_diffusion_uncond"),
                               *[(f"ablation:plms{k}_s{s}", f"latent_diffusion_plms{k}_s{s}")
                                 for k in (1, 2, 3, 4) for s in (10, 25, 50, 100)],
                               ("val:model", "latent_diffusion_val"), ("val:guidance_1", "latent_diffusion_g1_val"),
                               ("val:guidance_0.25", "latent_diffusion_g025_val"),
                               ("val:no_guidance", "latent_diffusion_noguide_val")]),
    Table("talking_face", "Talking face from speech (DiffSpeaker)",
          "VOCASET twin, vertex units; unseen test subjects, each animated under the 8 training styles, averaged "
          "(DiffSpeaker's protocol). lve: pooled over all frames (CodeTalker); lve_seq: per sequence, then the mean "
          "(DiffSpeaker). model, paper: 10 repetitions (seeds 1234, 0, 10, ..., 80), mean and *_ci95 = "
          "1.96·std/√10; other rows one (the AR baseline is deterministic). paper: the paper's schedule, raw "
          "displacements, no LayerNorm before the head, last step; model: zero terminal SNR, motion / σ, that "
          "LayerNorm, best-val weights; last_step: the model's last weights; nobias: no periodic self-attention "
          "bias; nodiag: full cross-attention; plain_attention: both. ms_per_10s: 10 s of speech, batch 1, CPU.",
          ["lve", "lve_ci95", "lve_seq", "lve_seq_ci95", "fdd", "fdd_abs", "mve", "ms_per_10s"], "diff_transformer",
          [("paper", "diff_transformer_paper"), ("ablation:last_step", "diff_transformer_last"),
           ("ablation:nobias", "diff_transformer_nobias"), ("ablation:nodiag", "diff_transformer_nodiag"),
           ("ablation:plain_attention", "diff_transformer_plain")]),
]
# Config keys that do not change the trained weights: a checkpoint that differs only in these is reused.
IGNORED = {"out", "resume", "ckpt", "split", "device", "compile", "threads", "cache", "eval_speakers", "model_only",
           "guidance"}  # guidance: LBD's sampling only


# ----------------------------------------------------------------------------------------------------------------------
# Dispatch to one method file

def load_method(name: str):
    """Import NAME.py from this folder; an unknown or not-yet-written method is a user error."""
    if name not in MODELS:
        raise data.UserError(f"unknown model {name!r}; models: {', '.join(MODELS)}, all (train.py)")
    if not (ROOT / f"{name}.py").exists():
        raise data.UserError(f"{name}.py is not written yet; available models: "
                             + ", ".join(m for m in MODELS if (ROOT / f"{m}.py").exists()))
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module(name)


def dispatch(argv, mode: str, doc: str = __doc__):
    """`train.py` / `sample.py`: --model picks the method file, every other flag goes to it. A user's mistake (an
    unknown model, bad flags) prints one line `error: ...` and exits with status 2."""
    argv = list(argv)
    try:
        if "--model" not in argv and not any(a.startswith("--model=") for a in argv):
            if "-h" in argv or "--help" in argv:
                print(usage(mode, doc))
                return None
            raise data.UserError(f"--model is required: one of {', '.join(MODELS)}"
                                 + (", all" if mode == "train" else "") + f" (python {mode}.py --help)")
        p = data.ArgParser(prog=f"{mode}.py", add_help=False, allow_abbrev=False)
        p.add_argument("--model")
        args, rest = p.parse_known_args(argv)
        if args.model == "all":
            if mode != "train":
                raise data.UserError("--model all trains and evaluates everything: python train.py --model all")
            return run_all(rest)
        module = load_method(args.model)
    except data.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if hasattr(module, "cli"):  # the shared setup block: user errors -> one line, exit 2
        return module.cli(rest, mode)
    try:  # a method file without the shared block yet
        return module.main(rest, mode)
    except data.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def usage(mode, doc):
    lines = [f"usage: python {mode}.py --model NAME [flags of NAME.py]" + (" | --model all [pipeline flags]"
                                                                            if mode == "train" else ""), "",
             doc.split("\n\n")[0], "",
             "models: " + ", ".join(MODELS) + (", all (every paper table's runs; --model all --help)"
                                               if mode == "train" else ""),
             f"python {mode}.py --model NAME --help lists that method's flags."]
    if mode == "train":
        lines.append("tables (--model all --table NAME): " + ", ".join(t.name for t in TABLES))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# The pipeline: which runs, in which order

def run_named(name):
    return next(r for r in RUNS if r.name == name)


def needs(run):
    """The runs this run cannot do without: those whose checkpoint its flags name, and the run it samples."""
    names = {r.name for r in RUNS}
    found = [w.split("/")[1] for w in shlex.split(run.train + " " + run.sample)
             if w.startswith("{runs}/") and w.endswith("/ckpt.pt")]
    return [n for n in dict.fromkeys(found + ([run.of] if run.of else [])) if n in names]


def plan(tables=(), only=(), preset="default", rows="main"):
    """The runs to do, in RUNS order: --only's runs as named, else the runs of the tables (all tables when none are
    named) at the --rows level (main: each table's main run, i.e. ours, the baselines and alt-GT; paper: and the
    `paper` rows; all: every row, and every run) and everything they need; `--preset smoke` keeps only the runs
    marked smoke (and what they need)."""
    if only:
        return [r for r in RUNS if r.name in only]
    chosen = [t for t in TABLES if t.name in tables] if tables else TABLES
    level = ROWS.index(rows)
    want = {r.name for r in RUNS} if not tables and rows == "all" else \
        {n for t in chosen for n in [t.main] + [e[1] for e in t.rows if ROWS.index(row_level(e[0])) <= level]}
    if preset == "smoke":
        want = {n for n in want if run_named(n).smoke}
    todo = list(want)
    while todo:  # close over dependencies
        for dep in needs(run_named(todo.pop())):
            if dep not in want:
                want.add(dep)
                todo.append(dep)
    return [r for r in RUNS if r.name in want]


ROWS = ["main", "paper", "all"]  # --rows levels, each adding to the one before


def row_level(label):
    """A table row's --rows level from its label: `paper` rows at paper, ablations / val / named rows at all."""
    return "paper" if label == "paper" else "all"


# ----------------------------------------------------------------------------------------------------------------------
# Reuse a checkpoint only when it was trained the way this run would train now

def world_of(value, preset):
    """The dataset a config's `data` means, as one comparable path: "" is the synthetic world of the preset, a twin's
    name (data.TWINS) its folder, and a world's listener/ or vocaset/ folder stands for the world itself."""
    root, tiny = getattr(data, "DATA_ROOT", ROOT / "data"), preset in ("smoke", "tiny")
    if value in data.TWINS:  # a twin's name, where data.generate_twin writes it (not a folder ./NAME)
        return str((root / (value + ("-tiny" if tiny else ""))).resolve())
    p = Path(value) if value else root / ("tiny" if tiny else "world")
    p = p.resolve()
    if p.name in ("listener", "vocaset") and (p.parent / "listener").is_dir() and (p.parent / "vocaset").is_dir():
        p = p.parent
    return str(p)


def wanted_config(module, argv):
    """The config (a dict) the method's own parser gives for these training flags."""
    return dataclasses.asdict(module.parse_config(list(argv), "train"))


def why_retrain(module, ckpt, argv, deps=()):
    """None when the checkpoint at `ckpt` holds what `argv` would train now; otherwise the reason, in a few words:
    no checkpoint, another method's, a config key that differs (IGNORED keys aside), another data version, or a
    checkpoint it depends on (deps: paths) that is newer than it."""
    ckpt = Path(ckpt)
    if not ckpt.is_file():
        return "no checkpoint"
    try:
        ck = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 -- an old or foreign file is retrained, whatever the reason
        return f"unreadable checkpoint: {str(e).splitlines()[0][:80]}"
    name = getattr(module, "METHOD", module.__name__)
    if not isinstance(ck, dict) or ck.get("method", name) != name:
        return f"checkpoint of {ck.get('method') if isinstance(ck, dict) else 'another program'}"
    have = ck.get("config")
    if not isinstance(have, dict):
        return "the checkpoint records no config"
    if "data_version" in ck and ck["data_version"] != data.VERSION:
        return f"data version {ck['data_version']} != {data.VERSION}"
    want = wanted_config(module, argv)
    for key in sorted(set(want) | set(have), key=lambda k: (k != "preset", k != "data", list(want).index(k)
                                                            if k in want else len(want))):
        if key in IGNORED:
            continue
        if key not in have:  # a setting added since: retrained (its default need not be what the old code did)
            return f"the checkpoint has no {key}"
        if key not in want:
            return f"{key} is no longer a setting"
        a, b = have[key], want[key]
        if key == "data":
            a, b = world_of(a, have.get("preset", "default")), world_of(b, want.get("preset", "default"))
        if a != b:
            return f"{key} {a} != {b}"
    for dep in deps:
        if Path(dep).is_file() and Path(dep).stat().st_mtime > ckpt.stat().st_mtime:
            return f"{dep} is newer"
    return None


# ----------------------------------------------------------------------------------------------------------------------
# results.md and the README's figures

def _fmt(v):
    if v is None or (isinstance(v, float) and v != v):
        return "–"
    if isinstance(v, (int, float)):
        return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


def table_rows(table, results):
    """[(run, label, {metric: value})] of one table: every row of its main run, then each other run's rows."""
    rows = {}  # label -> (run, values); a later row of the same label adds to an earlier one
    for label, vals in results.get(table.main, {}).items():
        if isinstance(vals, dict):
            rows[label] = (table.main, dict(vals))
    for entry in table.rows:
        label, run = entry[:2]
        got = results.get(run, {})
        pick = {label: got.get(entry[2])} if len(entry) == 3 else \
            {label + row[len("model"):]: v for row, v in got.items() if row == "model" or row.startswith("model:")}
        for lab, vals in pick.items():
            if isinstance(vals, dict):
                rows[lab] = (run, {**rows.get(lab, (run, {}))[1], **vals})
    return [(run, label, vals) for label, (run, vals) in rows.items()]


def results_markdown(results: dict, hardware: str, minutes: dict, preset: str) -> str:
    """results.md from {run: {row: {metric: value}}} (the runs' metrics.json) and {run: {"train": min, "evaluate":
    min}}: one table per TABLES entry whose main run has results, rows labelled as the entry says."""
    total = sum(sum(m.values()) for m in minutes.values())
    lines = [f"Preset `{preset}`. Hardware: {hardware}. Wall-clock minutes per run (train + evaluate): "
             + ", ".join(f"{k} {m.get('train', 0):.1f} + {m.get('evaluate', 0):.1f}" for k, m in minutes.items())
             + f"; total {total:.1f}.", ""]
    for t in TABLES:
        if t.main not in results:
            continue
        lines += [f"### {t.title}", "", t.caption, "",
                  "| run | row | " + " | ".join(t.columns) + " |", "|---|---|" + "---|" * len(t.columns)]
        for run, label, vals in table_rows(t, results):
            lines.append(f"| {run} | {label} | " + " | ".join(_fmt(vals.get(c)) for c in t.columns) + " |")
        lines.append("")
    return "\n".join(lines)


def gif_frames(path, n):
    """n evenly spaced frames of an animated GIF, as RGB PIL images."""
    frames = [f.convert("RGB") for f in ImageSequence.Iterator(Image.open(path))]
    return [frames[i] for i in np.linspace(0, len(frames) - 1, n).round().astype(int)]


def contact_sheet(gifs, path, n=4, time_across=False):
    """A still figure from GIFs that share a frame height: each GIF's n frames, down the rows (time_across=False:
    one row per time point, the GIFs side by side) or along one row per GIF (time_across=True)."""
    cols = [gif_frames(g, n) for g in gifs]                          # [gif][time] -> image
    grid = [list(r) for r in zip(*cols)] if not time_across else cols  # [row][col]
    W = max(sum(im.width for im in row) for row in grid)
    H = sum(max(im.height for im in row) for row in grid)
    sheet, y = Image.new("RGB", (W, H), "white"), 0
    for row in grid:
        x = 0
        for im in row:
            sheet.paste(im, (x, y))
            x += im.width
        y += max(im.height for im in row)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def figures(runs: Path):
    """The README's figures from the GIFs the evaluations wrote: listeners (DiffListener window: speaker |
    DiffListener | GT; LM listener: GT | model), 3 LBD reactions, and a DiffSpeaker talking-face strip; and copies
    of the evaluations' plots (key channels over a window, identity swap, LBD curves, lip distance)."""
    made = []
    listen = [g for g in (runs / "discrete_diffusion/samples/window0.gif", runs / "lm_listener/samples/sample.gif")
              if g.exists()]
    if listen:
        made.append(contact_sheet(listen, runs / "figures" / "listeners.png", n=4))
    if (runs / "latent_diffusion/reactions.gif").exists():
        made.append(contact_sheet([runs / "latent_diffusion/reactions.gif"], runs / "figures" / "reactions.png", n=4))
    face = sorted((runs / "diff_transformer").glob("*.gif"))
    if face:
        made.append(contact_sheet(face[:1], runs / "figures" / "talking_face.png", n=6, time_across=True))
    plots = {"discrete_diffusion/samples/key_channels.png": "diff_listener_channels.png",  # the evaluations' plots
             "lm_listener/samples/channels.png": "lm_listener_channels.png",
             "lm_listener_realtalk/samples/swap.png": "lm_listener_swap.png",
             "latent_diffusion/reactions.png": "react_curves.png",
             "diff_transformer/lip_distance.png": "lip_distance.png"}
    (runs / "figures").mkdir(parents=True, exist_ok=True)
    for src, name in plots.items():
        if (runs / src).exists():
            (runs / "figures" / name).write_bytes((runs / src).read_bytes())
            made.append(runs / "figures" / name)
    return made


def hardware() -> str:
    """'<CPU model> (x86_64), N cores' (plus the GPU when torch sees one), for results.md."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu} ({platform.machine()}), {os.cpu_count()} cores{gpu}"


# ----------------------------------------------------------------------------------------------------------------------
# `--model all`

def pipeline_parser():
    tables = "; ".join(f"{t.name} ({t.title}: {len({t.main} | {e[1] for e in t.rows})} runs)" for t in TABLES)
    p = data.ArgParser(prog="train.py --model all", description="Train and evaluate the runs of every paper table "
                       f"(or of --table's) at the --rows level, then write <runs>/results.md and <runs>/figures/. "
                       f"Tables: {tables}.")
    p.add_argument("--preset", default="default", choices=["smoke", "default", "full"],
                   help="every run's preset (default: default)")
    p.add_argument("--data", default="", help="data path handed to every method (default: the synthetic world)")
    p.add_argument("--runs", default="", help="folder of the runs and of results.md (default: runs, or runs-PRESET "
                   "for another preset, so that a smoke pipeline never touches the default runs)")
    p.add_argument("--seed", type=int, default=0, help="every run's training seed (default 0)")
    p.add_argument("--table", action="append", default=[], choices=[t.name for t in TABLES],
                   help="only this table's runs and what they need (repeatable; default: every table)")
    p.add_argument("--rows", default="main", choices=ROWS,
                   help="main (default): each table's main run (ours, baselines, alt-GT; 48 min on 2 CPU cores); "
                   "paper: and the paper-configuration rows (~2 h); all: every ablation too, as the README's "
                   "tables (~7 h)")
    p.add_argument("--only", default="", help="comma-separated run names to do, nothing else (the other runs' last "
                   "metrics.json still go into results.md)")
    p.add_argument("--retrain", action="store_true", help="train even where a matching checkpoint exists")
    return p


def do_run(run, runs, a, done, minutes):
    """Train (or reuse, or resume) one run and evaluate it; `done` collects the runs trained in this call."""
    out, module = runs / run.name, load_method(run.model)
    flags = lambda s: [w.replace("{runs}", str(runs)) for w in shlex.split(s)]
    given = ["--data", a.data] if a.data else []
    t0 = time.time()
    if not run.of:
        argv = ["--preset", a.preset, "--seed", str(a.seed), "--out", str(out)] + given + flags(run.train)
        marker = out / ".training"  # there while the pipeline trains this run: found later = interrupted
        deps = [runs / d / "ckpt.pt" for d in needs(run)]
        why = "--retrain" if a.retrain else why_retrain(module, out / "ckpt.pt", argv, deps) \
            or next((f"{runs / d} was retrained" for d in needs(run) if d in done), None)
        resume = why is None and marker.exists()  # the same training, killed: continue it
        if why is None and not resume:
            print(f"\n=== {out}: reusing {out / 'ckpt.pt'} ===", flush=True)
        else:
            verb = "resuming" if resume else "retraining" if (out / "ckpt.pt").exists() else "training"
            print(f"\n=== {out}: {verb} ({why or 'interrupted'}) ===", flush=True)
            out.mkdir(parents=True, exist_ok=True)
            marker.touch()
            module.main(argv + (["--resume"] if resume else []), "train")
            marker.unlink()
            done.add(run.name)
            minutes.setdefault(run.name, {})["train"] = (time.time() - t0) / 60
    print(f"\n=== evaluate {out} ===", flush=True)
    t0 = time.time()
    ckpt = runs / (run.of or run.name) / "ckpt.pt"
    module.main(["--preset", a.preset, "--ckpt", str(ckpt), "--out", str(out)] + given + flags(run.sample), "sample")
    minutes.setdefault(run.name, {})["evaluate"] = (time.time() - t0) / 60


def run_all(argv):
    """`python train.py --model all [--table NAME] [--preset P] [--data PATH] [--runs DIR] [--retrain]`: train (or
    reuse) and evaluate each planned run in order, then write results.md and the figures. -> {run: metrics}."""
    a = pipeline_parser().parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise data.UserError("--model all runs in one process; under torchrun train one method at a time "
                             "(torchrun --nproc_per_node N train.py --model NAME ...)")
    only = list(filter(None, a.only.split(",")))
    unknown = sorted(set(only) - {r.name for r in RUNS})
    if unknown:
        raise data.UserError(f"--only: unknown run(s) {unknown}; runs: " + ", ".join(r.name for r in RUNS))
    runs = Path(a.runs or ("runs" if a.preset == "default" else f"runs-{a.preset}"))
    runs.mkdir(parents=True, exist_ok=True)
    timings = runs / "timings.json"  # minutes per run, kept so that a partial re-run reports the others' times
    minutes = json.loads(timings.read_text()) if timings.exists() else {}
    todo, done, t_all = plan(a.table, only, a.preset, a.rows), set(), time.time()
    known = [sum(minutes[r.name].values()) for r in todo if r.name in minutes]
    print(f"{len(todo)} runs planned" + (f"; their last measured times sum to {sum(known):.0f} min ({len(known)} of "
                                         f"them measured, {runs / 'timings.json'})" if known else ""), flush=True)
    for run in todo:
        try:
            do_run(run, runs, a, done, minutes)
        except data.UserError as e:  # say which run met it
            raise data.UserError(f"{runs / run.name}: {e}") from e
        if run.name in minutes:  # re-read first: another pipeline on the same runs folder may have written since
            minutes = {**(json.loads(timings.read_text()) if timings.exists() else {}), run.name: minutes[run.name]}
            tmp = timings.with_name(f"timings.json.{os.getpid()}")
            tmp.write_text(json.dumps(minutes, indent=1)), tmp.replace(timings)    # atomic: no reader sees half
    results = {r.name: json.loads((runs / r.name / "metrics.json").read_text())
               for r in RUNS if (runs / r.name / "metrics.json").exists()}
    minutes = {r.name: minutes[r.name] for r in RUNS if r.name in results and r.name in minutes}
    md = results_markdown(results, hardware(), minutes, a.preset)
    (runs / "results.md").write_text(md + "\n")
    print(md)
    for f in figures(runs):
        print(f"wrote {f}")
    print(f"\nwrote {runs / 'results.md'} ({len(todo)} runs in {(time.time() - t_all) / 60:.1f} min)")
    return results


if __name__ == "__main__":
    dispatch(sys.argv[1:], "train")
