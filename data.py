"""data.py: the dataset readers, audio features and pictures every method shares, and a synthetic world to test them.

The real datasets (Learning2Listen, LM-Listener segments, REACT, VOCASET) need licences and days of compute, so
the second half of this file builds a small deterministic world of two-person conversations with known hidden
rules and writes it to disk in the real layouts; the first half reads real data and the world alike.

Listener item (load_listener; every layout gives the same keys)
    name str unique "<video>:<start>-<end>" | fps int | start_frame int (in the source video)
    listener, speaker      (T, D) float32 raw motion: D = 56 = exp 50 | head rot 3 | jaw 3 (58 for REACT 3DMM)
    listener_beta, speaker_beta (100,) float32 identity shape (zeros when the dataset has none)
    listener_id            int: -1 unknown; in the world 0..5 train listeners, 6 the unseen test listener
    listener_attr, speaker_attr (T, 25) float32: 15 binary AUs | valence, arousal | 8 emotion probabilities
    audio (S,) float32 speaker waveform at SR for these frames, or None | audio_rows (4T, F) L2L MFCC rows, or None
    words                  [(text, end_seconds)] relative to the segment start; negative = the 3 s of history
    alt_listener (K, T, D), alt_listener_attr (K, T, 25) float32: alternative appropriate reactions, or None
Talking item (load_talking): name, subject, style (0..7 train subjects, else -1), audio (S,) at SR,
    vertices (T, V, 3) at FPS, template (V, 3), fps.

Public API
    constants   FPS SR EXP_DIM POSE_DIM MOTION_DIM BETA_DIM ATTR_DIM EMOTIONS EXP POSE HEAD JAW SEGMENT_FRAMES K_ALT
                DATA_ROOT, semantic channels JAW_OPEN .. BLINK, PITCH, JAW_PITCH; {TRAIN,VAL,TEST}_SUBJECTS
    errors      UserError (a user's mistake: one line, exit status 2), ArgParser
    plumbing    what every method file does the same way: parse_config(Config, presets, check, argv, mode, prog,
                doc), check_fields, cli(main), save_config; pick_device, autocast, grad_scaler, seed_all;
                rng_state / set_rng_state (exact resume), save_checkpoint / load_checkpoint (atomic, the method
                recorded), resume_checkpoint; ddp_setup, is_main, shard, check_in_sync, mean_over_ranks, ddp_teardown
                (torchrun)
    readers     resolve_data(path, kind, preset) -> Path; load_listener(path, split, l2l_listener=None) -> [item]
                (layouts: segments = LM-Listener, l2l = Learning2Listen, react = REACT 2023/2024);
                load_stats(path, who="listener") -> (mean, std); ListenerWindows(items, window, stride, mean, std);
                load_listener_split(path, split) (none -> UserError); whole_windows(items, window) -> tensors;
                random_crops(gen, B, L, *xs); react_attributes(y) (valid REACT attributes);
                load_talking(path, split) -> [item] (VOCASET); talking_regions(path) -> (lip_idx, upper_idx);
                talking_items / talking_train_val / talking_batch (VOCASET items with features, stats, crops)
    windows     load_windows(path, split, vq, T, stride, n_mfcc, vocab) -> every crop, its VQ tokens and word ids
                (discrete_diffusion.py); get_batch, all_windows, draw_windows; build_vocab, word_ids, window_words
    audio       load_wav(path, sr=SR) -> (S,) mono; resample(wave, sr_in, sr_out); mfcc(wave, sr, rate, n_mfcc, n_rows);
                mfcc_deltas(wave, rate, n_mfcc) (+ deltas, CMVN)
    face model  FaceModel(seed): template(beta), vertices(motion, beta), valence/arousal/aus/emotion_probs/attributes
    pictures    render_gif(path, motions, betas, titles), render_vertices_gif(path, vertices, titles),
                plot_channels(path, series, channels)
    the world   generate_world(root, preset="default"|"tiny", seed, force) -> root with listener/ and vocaset/;
                VOCAB (the world's words), talking_references(path, name), unposed(motion), write_wav(path, wave)
    the twins   generate_twin(name, preset, root, seed, force) -> the world re-cast as a paper's dataset, TWINS =
                trevor (one listener), realtalk (many identities, identity-swapped GT), react (REACT 2024 layout and
                appropriate neighbours), vocaset; resolve_data accepts their names; load_ledger(path, items) -> the
                events each item's hidden rules answer (rules_ledger.json beside the data); load_swaps(path, split)
                -> realtalk's identity-swapped ground truth per item
`python data.py [--preset tiny] [--root DIR] [--twin NAME]` makes (or reuses) the world (or a twin) under data/.
"""
import argparse
import collections
import csv
import dataclasses
import functools
import inspect
import itertools
import json
import math
import os
import re
import pickle
import random
import shutil
import string
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.distributed as dist
from tqdm import tqdm

# ----------------------------------------------------------------------------------------------------------------
# Errors of the user's making


class UserError(Exception):
    """A user's mistake (a missing or malformed file, a bad flag, another method's checkpoint, no such device).
    Every command-line entry point prints it as one line `error: <message>` and exits with status 2; any other
    exception is a bug of ours and keeps its traceback."""


class ArgParser(argparse.ArgumentParser):
    """argparse that raises UserError instead of printing usage and exiting, so bad flags read like every other
    user error (`error: ...`, exit status 2)."""

    def error(self, message):
        raise UserError(f"{message} (try --help)")


# ----------------------------------------------------------------------------------------------------------------
# Run-time plumbing every method file uses the same way: flags from its Config, user errors, the exact random
# state, atomic checkpoints, torchrun (DDP). A method file keeps only a short shared block (device, dtype, seed and
# thin wrappers that name the method); tests/test_shared.py checks both.


def parse_config(Config, presets, check_config, argv, mode, prog, doc):
    """Flags generated from a method's Config (help = the field's comment); explicit flag > --preset > default."""
    notes = dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.*)$", inspect.getsource(Config), re.M))
    p = ArgParser(prog=prog, description=(doc or "").split("\n\n")[0])
    for f in dataclasses.fields(Config):
        kind = dict(action=argparse.BooleanOptionalAction) if isinstance(f.default, bool) else {"type": type(f.default)}
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=argparse.SUPPRESS,
                       help=f"{notes.get(f.name, '')} (default {f.default!r})".replace("%", "%%"), **kind)
    given = vars(p.parse_args(argv))  # only the flags on the command line
    preset = given.get("preset", Config.preset)
    if preset not in presets:
        raise UserError(f"--preset {preset!r}: expected one of {', '.join(presets)}")
    cfg = Config(**{**presets[preset], **given})
    check_config(cfg, mode)
    return cfg


def check_fields(cfg, positive=(), non_negative=(), choices=None, rules=()):
    """A check_config in one call: the Config fields that must be > 0, then >= 0, then one of their choices, then the
    (ok, message) rules; the first that fails -> a one-line UserError naming the flag and what was expected."""
    flag = lambda k: f"--{k.replace('_', '-')} {getattr(cfg, k)!r}"
    checks = [(getattr(cfg, k) > 0, f"{flag(k)}: expected a positive number") for k in positive]
    checks += [(getattr(cfg, k) >= 0, f"{flag(k)}: expected 0 or more") for k in non_negative]
    checks += [(getattr(cfg, k) in v, f"{flag(k)}: expected one of {', '.join(map(str, v))}")
               for k, v in (choices or {}).items()]
    for ok, message in [*checks, *rules]:
        if not ok:
            raise UserError(message)


def cli(main, argv=None, mode="train"):
    """`python <method>.py [train|sample] [flags]` -> main(argv, mode); a UserError -> one line `error: ...`, exit 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["train"], ["sample"]):
        mode, argv = argv[0], argv[1:]
    try:
        return main(argv, mode)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def pick_device(name):
    """auto -> cuda, mps, cpu; under torchrun each rank takes cuda:LOCAL_RANK. An unavailable device -> UserError."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    ok = {"cpu": True, "mps": torch.backends.mps.is_available(), "cuda": torch.cuda.is_available()}
    if not ok.get(name.split(":")[0], False):
        raise UserError(f"--device {name}: not available here (torch {torch.__version__} sees no CUDA GPU)"
                        if name.startswith("cuda") else f"--device {name!r}: expected auto, cpu, cuda[:N] or mps")
    return torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if name == "cuda" and "LOCAL_RANK" in os.environ else name)


def autocast(device, dtype):  # mixed precision (--dtype bfloat16 / float16); float32 is a no-op
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype), enabled=dtype != "float32")


def grad_scaler(device, dtype):  # loss scaling, needed for float16 only
    return torch.amp.GradScaler(device.type, enabled=dtype == "float16")


def seed_all(seed):  # python, numpy and torch's global generators
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)


def rng_state(gens=()):
    """Every random stream (python, numpy, torch CPU/CUDA, the run's own torch / numpy generators such as the data
    order) as tensors and numbers, so that checkpoints load with weights_only and a resume draws the same numbers."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    return dict(python=random.getstate(), numpy=(kind, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, gauss),
                torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                gens=[g.get_state() if isinstance(g, torch.Generator) else g.bit_generator.state for g in gens])


def set_rng_state(state, gens=()):
    random.setstate(state["python"])
    kind, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for g, s in zip(gens, state["gens"]):
        g.set_state(s) if isinstance(g, torch.Generator) else setattr(g.bit_generator, "state", s)


def save_config(cfg, out):
    """At start-up (STYLE rule 8): rank 0 prints the resolved config and saves it as <out>/config.json."""
    if is_main():
        print(json.dumps(dataclasses.asdict(cfg)))
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))


def save_checkpoint(path, method, obj):
    """Atomic (a temporary file, then rename: a run killed at any moment leaves the last checkpoint whole); records
    the method and the synthetic world's version (train.py retrains when either differs); rank 0 writes."""
    if is_main():
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save({"method": method, "data_version": VERSION, **obj}, tmp)
        os.replace(tmp, path)


def load_checkpoint(path, method, device="cpu"):
    """save_checkpoint's dict (weights_only=True); a missing or unreadable file, another method's -> UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path} (train first: python {method}.py --out {path.parent})")
    try:
        ck = torch.load(path, map_location=device, weights_only=True)
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise UserError(f"{path} is not a readable checkpoint ({str(e).splitlines()[0][:120]})")
    if not isinstance(ck, dict) or ck.get("method") != method:
        who = ck.get("method", "an older version or another program") if isinstance(ck, dict) else "another program"
        raise UserError(f"{path} is a checkpoint of {who}, not of {method}.py")
    return ck


def resume_checkpoint(path, method, model, gens=()):
    """--resume: load_checkpoint's dict with its weights loaded into model (other sizes -> UserError) and every random
    stream restored (set_rng_state), so the run goes on as if never stopped; None (said) where there is none yet."""
    path = Path(path)
    if not path.exists():
        if is_main():
            print(f"--resume: no checkpoint at {path} yet, starting at step 0")
        return None
    ck = load_checkpoint(path, method)                                    # on the CPU: random states stay there
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as e:
        raise UserError(f"{path} holds a model of other sizes ({str(e).splitlines()[1].strip()[:120]})")
    set_rng_state(ck["rng"], gens)
    if is_main():
        print(f"resumed from {path} at step {ck['step']}")
    return ck


def ddp_setup(device):
    """Under `torchrun --nproc_per_node N`: join the process group (NCCL on GPUs, gloo on CPU). -> (rank, world)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def ddp_teardown():  # at the end of a torchrun run: leave the process group (nothing to do in a single process)
    if dist.is_initialized():
        dist.barrier()  # no rank closes its connections while another still finishes a collective (gloo aborts)
        dist.destroy_process_group()


def is_main():  # rank 0 (or a single process): the one that logs, evaluates and writes files
    return not dist.is_initialized() or dist.get_rank() == 0


def say(message):  # rank 0 prints; tqdm.write keeps a progress bar readable
    if is_main():
        tqdm.write(message)


def check_in_sync(module):
    """Under torchrun every rank must end with rank 0's weights and buffers (state updated outside autograd, such as
    an EMA codebook, must be all-reduced by the method); raises if not."""
    if dist.is_initialized():
        flat = torch.cat([v.detach().double().reshape(-1) for v in module.state_dict().values()])
        ref = flat.clone()
        dist.broadcast(ref, 0)
        if not torch.equal(flat, ref):
            raise RuntimeError(f"rank {dist.get_rank()}: weights differ from rank 0's ({(flat - ref).abs().max():.3g})")


def shard(x):
    """This rank's rows of a global batch that every rank drew alike (same generator): DDP's gradient average over
    ranks then equals the single-process gradient of the whole batch."""
    return x[dist.get_rank()::dist.get_world_size()] if dist.is_initialized() else x


def mean_over_ranks(loss):
    """The mean of a (scalar) loss over ranks, for the log: the loss of the whole global batch (DDP already
    averages the gradient). -> float"""
    v = loss.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(v)
        v /= dist.get_world_size()
    return v.item()


# ----------------------------------------------------------------------------------------------------------------
# Constants and the item schema

FPS, SR = 30, 16000
EXP_DIM, POSE_DIM, MOTION_DIM, BETA_DIM, ATTR_DIM = 50, 6, 56, 100, 25
EMOTIONS = ("neutral", "happy", "sad", "surprise", "fear", "disgust", "anger", "contempt")
EXP, POSE, HEAD, JAW = slice(0, 50), slice(50, 56), slice(50, 53), slice(53, 56)
SEGMENT_FRAMES, K_ALT = 240, 10
DATA_ROOT = Path(__file__).resolve().parent / "data"
VERSION = 5                                  # bump when the world changes: cached worlds are then regenerated
(JAW_OPEN, LIP_SPREAD, LIP_ROUND, LIP_PRESS, SMILE, OPEN_SMILE, FROWN, BROW_RAISE, BROW_FURROW,
 BLINK) = range(10)                          # semantic expression channels
PITCH, JAW_PITCH = 50, 53                    # head pitch (+ = nod down) and jaw pitch (+ = open) in a motion frame
AU_NAMES = ("AU1", "AU2", "AU4", "AU6", "AU7", "AU9", "AU10", "AU12", "AU14", "AU15", "AU17", "AU23", "AU24",
            "AU25", "AU26")
ATTR_NAMES = AU_NAMES + ("valence", "arousal") + tuple(e.capitalize() for e in EMOTIONS)
# FaceFormer's VOCASET split (real subject names, so the reader works unchanged on the real data)
TRAIN_SUBJECTS = ["FaceTalk_170728_03272_TA", "FaceTalk_170904_00128_TA", "FaceTalk_170725_00137_TA",
                  "FaceTalk_170915_00223_TA", "FaceTalk_170811_03274_TA", "FaceTalk_170913_03279_TA",
                  "FaceTalk_170904_03276_TA", "FaceTalk_170912_03278_TA"]
VAL_SUBJECTS = ["FaceTalk_170811_03275_TA", "FaceTalk_170908_03277_TA"]
TEST_SUBJECTS = ["FaceTalk_170809_00138_TA", "FaceTalk_170731_00024_TA"]
SENTENCES = {"train": range(1, 41), "val": range(21, 41), "test": range(21, 41)}


def _np(x):
    return x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


def _err(path, what):
    """A user's data mistake as one line: which file, then what was expected and what was found."""
    return UserError(f"{path}: {what}")


def _first_line(e):
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _load_npy(f, what):
    """np.load of a data file; a missing or unreadable file is the user's error."""
    if not Path(f).is_file():
        raise _err(f, f"missing file (expected {what})")
    try:
        return np.load(f)
    except Exception as e:  # noqa: BLE001 - numpy raises several types for a corrupt file
        raise _err(f, f"not a readable .npy file ({_first_line(e)}); expected {what}") from None


def _check_float(a, path, what):
    if a.dtype.kind != "f":
        raise _err(path, f"{what} has dtype {a.dtype}, expected floating point")
    return a


def _item(name, fps, start, listener, speaker, lbeta=None, sbeta=None, lid=-1, lattr=None, sattr=None,
          audio=None, audio_rows=None, words=(), alt=None):
    """The one listener item every reader returns (keys in the module docstring). Missing attributes are the
    FaceModel readouts of the motion (zeros for motion that is not 56-d FaceModel/FLAME-like); words sorted by end."""
    face = _face()
    attr = lambda m, a: (np.asarray(_np(a), np.float32) if a is not None else
                         face.attributes(m[..., :MOTION_DIM]) if m.shape[-1] >= MOTION_DIM
                         else np.zeros(m.shape[:-1] + (ATTR_DIM,), np.float32))
    beta = lambda b: np.zeros(BETA_DIM, np.float32) if b is None else np.asarray(_np(b), np.float32).reshape(
        -1, BETA_DIM)[0]
    alt = None if alt is None else np.asarray(_np(alt), np.float32)
    return {"name": name, "fps": int(fps), "start_frame": int(start), "listener": listener, "speaker": speaker,
            "listener_beta": beta(lbeta), "speaker_beta": beta(sbeta), "listener_id": int(lid),
            "listener_attr": attr(listener, lattr), "speaker_attr": attr(speaker, sattr), "audio": audio,
            "audio_rows": audio_rows, "words": sorted(words, key=lambda w: w[1]), "alt_listener": alt,
            "alt_listener_attr": None if alt is None else attr(alt, None)}


# ----------------------------------------------------------------------------------------------------------------
# Readers: every layout -> the same items

def _check_motion(arr, path, what, T=None, D=None):
    """(T, D) float32 motion, or a user error naming the file: wrong shape or dtype, NaN or inf."""
    a = np.asarray(_check_float(np.asarray(_np(arr)), path, what), dtype=np.float32)
    if a.ndim != 2 or (T is not None and a.shape[0] != T) or (D is not None and a.shape[1] != D):
        raise _err(path, f"{what} has shape {a.shape}, expected ({T or 'T'}, {D or 'D'})")
    if not np.isfinite(a).all():
        raise _err(path, f"{what} holds NaN or inf values (expected finite motion)")
    return a


def _load_pth(f):
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - real LM-Listener files may hold numpy arrays: trusted local file
        try:
            return torch.load(f, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - a corrupt or foreign file
            raise _err(f, f"not a readable torch file ({_first_line(e)}); expected a list of segment dicts") from None


def _read_segments(path, split):
    f = path / f"segments_{split}.pth"
    segs = _load_pth(f)
    if not isinstance(segs, list):
        raise _err(f, f"expected a list of segment dicts, got {type(segs).__name__}")
    wavs, items = {}, []
    need = ("fname", "split_start_frame", "split_end_frame", "p0_exp", "p0_pose", "p1_exp", "p1_pose")
    for i, s in enumerate(segs):
        if not isinstance(s, dict):
            raise _err(f, f"segment {i} is a {type(s).__name__}, expected a dict")
        miss = [k for k in need if k not in s]
        if miss:
            raise _err(f, f"segment {i} lacks keys {miss} (expected LM-Listener segment dicts with {list(need)})")
        a, b = int(s["split_start_frame"]), int(s["split_end_frame"])
        T, fps = b - a, int(s.get("fps", FPS))
        where = f"{f} [segment {i}]"
        L, S = (np.concatenate([_check_motion(s[f"p{p}_exp"], where, f"p{p}_exp", T, EXP_DIM),
                                _check_motion(s[f"p{p}_pose"], where, f"p{p}_pose", T, POSE_DIM)], 1) for p in (0, 1))
        audio, wf = None, path / "wav" / f"{s['fname']}.wav"
        if (path / "wav").is_dir():
            if s["fname"] not in wavs:
                wavs[s["fname"]] = load_wav(wf)
            w = wavs[s["fname"]]
            s0, s1 = int(round(a * SR / fps)), int(round(b * SR / fps))
            if s1 > len(w):
                raise _err(wf, f"audio is {len(w) / SR:.2f} s long, segment {i} needs {s1 / SR:.2f} s")
            audio = w[s0:s1]
        try:                                          # `end`: seconds from the video start -> from the segment start
            words = [(w["text"], round(float(w["end"]) - a / fps, 4)) for w in list(s.get("before_words", []))
                     + list(s.get("during_words", []))]
        except (KeyError, TypeError, ValueError) as e:
            raise _err(where, f"before_words / during_words: expected lists of {{text, end}} dicts ({_first_line(e)})"
                       ) from None
        alt = s.get("alt_listener")
        if alt is not None and (tuple(alt.shape[1:]) != (T, L.shape[1]) or not torch.isfinite(
                torch.as_tensor(alt).float()).all()):
            raise _err(where, f"alt_listener has shape {tuple(alt.shape)}, expected (K, {T}, {L.shape[1]}), finite")
        items.append(_item(f"{s['fname']}:{a}-{b}", fps, a, L, S, s.get("p0_shape"), s.get("p1_shape"),
                           s.get("listener_id", -1), s.get("p0_attr"), s.get("p1_attr"), audio, None, words, alt))
    return items


L2L_VAL_SEED, L2L_TRAIN_FRACTION = 0, 0.7     # Learning2Listen's own re-split of train/ (70/30, unseeded there)


def _say_once(message, _said=set()):
    if message not in _said:
        _said.add(message)
        print(f"data.py: {message}", flush=True)


def _l2l_direction(path, listener):
    """Learning2Listen's out_num: the listener is p1 for Fallon's channel and p0 for every other channel."""
    if listener is None:
        return (1,) if path.name.lower() == "fallon" else (0,)
    if listener not in (0, 1, "both"):
        raise ValueError(f"l2l_listener must be 0, 1, 'both' or None; got {listener!r}")
    return (0, 1) if listener == "both" else (listener,)


def _read_l2l(path, split, listener=None):
    """Learning2Listen windows: listener p{o}_list_faces with the speaker's p{1-o}_speak_{faces,audio,files}, for
    the direction(s) o of _l2l_direction. Released with train/ and test/ only: without val/, train and val are the
    70/30 re-split of train/ that the original's load_data draws, here with the fixed seed L2L_VAL_SEED."""
    resplit = split != "test" and not (path / "val").is_dir() and (path / "train").is_dir()
    d = path / ("train" if resplit else split)
    if resplit:
        _say_once(f"{path} has no val/: train and val are a {L2L_TRAIN_FRACTION:.0%} / {1 - L2L_TRAIN_FRACTION:.0%} "
                  f"split of the train/ windows drawn with seed {L2L_VAL_SEED}, as Learning2Listen re-splits train/")
    items = []
    for o in _l2l_direction(path, listener):                              # listener p{o}, speaker p{1-o}
        lf = d / f"p{o}_list_faces_clean_deca.npy"
        sp = lambda kind: d / f"p{1 - o}_speak_{kind}_clean_deca.npy"
        need = f"the speaker's file paired with {lf.name}, as in Learning2Listen"
        L, S, A = (_load_npy(f, need if f != lf else "(N, 64, 184) listener windows") for f in
                   (lf, sp("faces"), sp("audio")))
        names = _load_npy(sp("files"), "(N, 64, 3) names") if sp("files").exists() else None
        for f, a, what in ((lf, L, "listener motion"), (sp("faces"), S, "speaker motion"), (sp("audio"), A, "audio")):
            _check_float(a, f, what)
        for f, a in ((lf, L), (sp("faces"), S)):
            if a.ndim != 3 or a.shape[2] < MOTION_DIM or a.shape[:2] != L.shape[:2]:
                raise _err(f, f"shape {a.shape}, expected (N, T, >= 56) with (N, T) = {L.shape[:2]} (e.g. (N, 64, 184))")
            if not np.isfinite(a[..., :MOTION_DIM]).all():
                raise _err(f, "holds NaN or inf in the first 56 channels (expected finite motion)")
        if A.ndim != 3 or len(A) != len(L):
            raise _err(sp("audio"), f"shape {A.shape}, expected (N, 4T, F) with N = {len(L)} (e.g. (N, 256, 128))")
        keep = range(len(L))
        if resplit:
            perm = np.random.default_rng(L2L_VAL_SEED).permutation(len(L))
            cut = int(len(L) * L2L_TRAIN_FRACTION)
            keep = sorted(perm[:cut] if split == "train" else perm[cut:])
        for i in keep:
            T = L.shape[1]
            fname, start = f"l2l_p{o}_{i:05d}", 0
            if names is not None and names.ndim == 3:
                fname = str(names[i, 0, 0])
                start = int(names[i, 0, 2]) if str(names[i, 0, 2]).lstrip("-").isdigit() else 0
            items.append(_item(f"{fname}:{start}-{start + T}", FPS, start, np.ascontiguousarray(L[i, :, :MOTION_DIM],
                               np.float32), np.ascontiguousarray(S[i, :, :MOTION_DIM], np.float32),
                               audio_rows=A[i].astype(np.float32)))
    seen = {}
    for it in items:                                                      # names stay unique
        seen[it["name"]] = seen.get(it["name"], -1) + 1
        if seen[it["name"]]:
            it["name"] += f"#{seen[it['name']]}"
    return items


REACT_WIDTHS = (58, MOTION_DIM)       # REACT's FaceVerse 3DMM: exp 52 | rot 3 | trans 3; or FaceModel motion
REACT_APPROPRIATE = "Approprirate_facial_reaction.npy"                    # the official name, misspelt as released


def _react_pairs(path, split):
    """[(speaker clip, listener clip)] as paths under <split>/<modality>/, and whether <split>.csv gave them. The
    csv (index, speaker_path, listener_path; one header row) in the challenge's mirrored order: every pair, then
    every pair with the roles swapped. Without it, each person of a two-person session folder is the listener once
    (any depth: NoXI <site>/<session>/<person>/<clip>, REACT 2023's UDIVA/talk/<id>/FC1/<clip>)."""
    f = path / f"{split}.csv"
    if f.exists():
        rows = [r for r in csv.reader(f.read_text().splitlines()[1:]) if r]
        if not rows or any(len(r) < 3 for r in rows):
            raise _err(f, f"expected a header row, then rows index, speaker_path, listener_path; found "
                          f"{len(rows)} rows, the shortest with {min(map(len, rows), default=0)} columns")
        pairs = [(r[1].strip(), r[2].strip()) for r in rows]
        return pairs + [(b, a) for a, b in pairs], True
    emo, pairs = path / split / "Emotion", []
    for sess in sorted({c.parent.parent for c in emo.rglob("*.csv")}):
        people = sorted(p.name for p in sess.iterdir() if p.is_dir())
        if len(people) != 2:
            raise _err(sess, f"holds {len(people)} person folders {people}, expected the 2 people of a session")
        for li, person in enumerate(people):
            for c in sorted((sess / person).glob("*.csv")):
                rel = (sess / people[1 - li] / c.stem).relative_to(emo).as_posix()
                pairs.append((rel, (sess / person / c.stem).relative_to(emo).as_posix()))
    return pairs, False


def _react_neighbours(path, split, pairs):
    """The split's appropriateness matrix (2N, 2N) in the mirrored order, or None: neighbour_emotion_<split>.npy, or
    cut from Approprirate_facial_reaction.npy with data_indices.csv as the baseline's tool/matrix_split.py does."""
    f = path / f"neighbour_emotion_{split}.npy"
    if f.exists():
        return _load_npy(f, f"the ({len(pairs)}, {len(pairs)}) appropriateness matrix of {split}.csv's pairs")
    if not (path / REACT_APPROPRIATE).exists():
        return None
    idx_f = path / "data_indices.csv"
    if not idx_f.exists():
        raise _err(idx_f, f"missing file (expected the clip index that orders the rows of {REACT_APPROPRIATE})")
    index = {}
    for i, r in enumerate(csv.reader(idx_f.read_text().splitlines()[1:])):
        if len(r) >= 3:
            index.setdefault((r[0].upper(), r[1], r[2]), i)
    rows = []
    for sp, _ in pairs[:len(pairs) // 2]:                                 # the csv's own rows, by speaker clip
        p = sp.split("/")
        key = (p[0].upper(), p[2] + "_" + p[1], p[4]) if len(p) > 4 else (p[0].upper(), p[1], p[3]) if len(
            p) > 3 else None
        if key not in index:
            raise _err(idx_f, f"has no row for clip {sp} of {split}.csv (expected site, session, clip {key})")
        rows.append(index[key])
    full = _load_npy(path / REACT_APPROPRIATE, "the (2M, 2M) appropriateness matrix over all clips")
    h, r = len(full) // 2, np.array(rows)
    return np.block([[full[np.ix_(r, r)], full[np.ix_(r, r + h)]], [full[np.ix_(r + h, r)], full[np.ix_(r + h, r + h)]]])


def _read_react(path, split):
    """REACT pairs (_react_pairs): the listener's 3DMM and 25 attributes, the speaker's 3DMM, attributes and audio.
    With the appropriateness matrix (_react_neighbours), alt_listener / alt_listener_attr of item k are the real
    reactions of the items j that row k marks, as FRCorr / FRDist read them (their number varies by item)."""
    fps = json.loads((path / "react_meta.json").read_text())["fps"] if (path / "react_meta.json").exists() else 25
    pairs, from_csv = _react_pairs(path, split)
    if not pairs:
        raise _err(path / split / "Emotion", "no <site>/<session>/<person>/<clip>.csv files (expected the REACT layout)")
    width, clips = None, {}

    def clip(rel):                                                        # (motion (T, D), attributes (T, 25))
        nonlocal width
        if rel not in clips:
            f = path / split / "3D_FV_files" / f"{rel}.npy"
            a = _load_npy(f, "the 3DMM coefficients of this clip, (T, 1, 58) or (T, 58)")
            if a.ndim not in (2, 3) or a.shape[-1] not in REACT_WIDTHS or a.shape[-1] != (width or a.shape[-1]):
                raise _err(f, f"3DMM coefficients have shape {a.shape}, expected (T, 1, D) or (T, D) with D = "
                              + (f"{width} as the other clips" if width else "58 (FaceVerse) or 56 (motion channels)"))
            width = a.shape[-1]
            mot = _check_motion(a.reshape(len(a), -1), f, "3DMM coefficients")
            f = path / split / "Emotion" / f"{rel}.csv"
            try:
                att = np.loadtxt(f, delimiter=",", skiprows=1, ndmin=2).astype(np.float32)
            except (OSError, ValueError) as e:
                raise _err(f, f"unreadable attribute csv ({_first_line(e)}); expected a header row and "
                              f"{ATTR_DIM} columns") from None
            if att.shape[1] != ATTR_DIM or not np.isfinite(att).all():
                raise _err(f, f"attributes have shape {att.shape}, expected (T, {ATTR_DIM}), finite")
            clips[rel] = mot, att
        return clips[rel]
    items = []
    for sp, li in pairs:
        (ml, al), (ms, as_) = clip(li), clip(sp)
        T = min(len(ml), len(ms), len(al), len(as_))
        w = path / split / "Audio_files" / f"{sp}.wav"
        audio = load_wav(w) if w.exists() else None
        if audio is not None:
            audio = np.pad(audio, (0, max(0, int(round(T * SR / fps)) - len(audio))))[:int(round(T * SR / fps))]
        items.append(_item(li, fps, 0, ml[:T], ms[:T], lattr=al[:T], sattr=as_[:T], audio=audio))
    M = _react_neighbours(path, split, pairs) if from_csv else None
    if M is None and not from_csv and (path / f"neighbour_emotion_{split}.npy").exists():
        raise _err(path / f"{split}.csv", f"missing file (expected the pairs that order the rows of "
                                          f"neighbour_emotion_{split}.npy)")
    if M is not None:
        if M.shape != (len(items), len(items)):
            raise _err(path / f"neighbour_emotion_{split}.npy", f"appropriateness matrix has shape {M.shape}, "
                       f"expected ({len(items)}, {len(items)}): the mirrored pairs of {split}.csv")
        for k, it in enumerate(items):
            T, js = len(it["listener"]), np.flatnonzero(M[k] == 1)
            short = [items[j]["name"] for j in js if len(items[j]["listener"]) < T]
            if short:
                raise _err(path / split / "3D_FV_files" / f"{short[0]}.npy", f"an appropriate reaction for "
                           f"{it['name']} is shorter than its {T} frames")
            it["alt_listener"] = np.stack([items[j]["listener"][:T] for j in js]) if len(js) else np.zeros(
                (0,) + it["listener"].shape, np.float32)
            it["alt_listener_attr"] = np.stack([items[j]["listener_attr"][:T] for j in js]) if len(js) else np.zeros(
                (0, T, ATTR_DIM), np.float32)
            it["alt_self"] = int(np.flatnonzero(js == k)[0]) if k in js else -1    # which alternative is its own GT
    return items


def _layout(path, split):
    """(folder, layout of `split` or None): a world root reads its listener/ folder."""
    if (path / "listener").is_dir() and (path / "vocaset").is_dir():
        path = path / "listener"
    l2l = lambda s: any((path / s / f"p{p}_list_faces_clean_deca.npy").exists() for p in (0, 1))
    return path, ("segments" if (path / f"segments_{split}.pth").exists() else
                  "l2l" if l2l(split) or (split == "val" and l2l("train") and not (path / "val").exists()) else
                  "react" if (path / split / "Emotion").is_dir() else None)


def load_listener(path, split, fmt=None, l2l_listener=None):
    """Listener items of `split` ("train" | "val" | "test") from a folder in one of three layouts (detected; or fmt):
    segments  segments_{split}.pth: a list of dicts fname, split_start_frame, split_end_frame, p0_exp (T, 50),
              p0_pose (T, 6), p0_shape (1 or T, 100), p1_* (p0 = listener, p1 = speaker; frames are the video's,
              segments may differ in length), before_words / during_words [{text, end}] with `end` in seconds from
              the video start, as LM-Listener's loaders read it (items hold it from the segment start, to 0.1 ms),
              and optional p0_attr / p1_attr (T, 25), listener_id, alt_listener (K, T, 56); wav/<fname>.wav (the
              speaker's audio of the whole video) if present: LM-Listener releases none, then audio is None.
    l2l       <split>/p{0,1}_list_faces_clean_deca.npy (N, 64, 184; first 56 used) paired with the other person's
              p{1,0}_speak_{faces,audio,files}_clean_deca.npy (audio rows (N, 256, 128), files (N, 64, 3)).
              As the original: one direction, the listener p1 in a folder named fallon and p0 elsewhere
              (l2l_listener 0, 1 or "both" to choose); without val/, train/ is split 70/30 (seed L2L_VAL_SEED).
    react     <split>/{Emotion,3D_FV_files,Audio_files}/<clip path>.{csv,npy,wav}, pairs from <split>.csv
              (mirrored: every pair both ways) or, without it, each person of a session folder the listener once;
              the appropriate reactions from neighbour_emotion_<split>.npy or Approprirate_facial_reaction.npy.
              25 fps unless react_meta.json. 3DMM stays as released (the baselines subtract FaceVerse's mean face).
    A world root (listener/ and vocaset/) reads its listener/ folder."""
    path = Path(path)
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test; got {split!r}")
    if not path.is_dir():
        raise _err(path, f"no such dataset folder (expected a folder with segments_{split}.pth, "
                         f"{split}/p0_list_faces_clean_deca.npy or {split}/Emotion/)")
    path, found_fmt = _layout(path, split)
    fmt = fmt or found_fmt
    if fmt is None:
        found = sorted({_layout(path, s)[1] for s in ("train", "val", "test")} - {None})
        if found:
            raise _err(path, f"found no {split} split in this {found[0]} dataset (expected "
                             + {"segments": f"segments_{split}.pth", "l2l": f"{split}/p0_list_faces_clean_deca.npy",
                                "react": f"{split}/Emotion/"}[found[0]] + ")")
        raise _err(path, f"in none of the known layouts: expected segments_{split}.pth (LM-Listener segments), "
                         f"{split}/p0_list_faces_clean_deca.npy (Learning2Listen) or {split}/Emotion/ (REACT)")
    if fmt == "l2l":
        return _read_l2l(path, split, l2l_listener)
    return {"segments": _read_segments, "react": _read_react}[fmt](path, split)


STATS_FILES = {"listener": [("mean.npy", "std.npy"), ("p0_mean.npy", "p0_std.npy")],   # as LM-Listener ships them
               "speaker": [("speaker_mean.npy", "speaker_std.npy")]}


def load_stats(path, who="listener", l2l_listener=None):
    """(mean (D,), std (D,)) float32 train statistics of the listener's (or who="speaker") motion: the files stored
    with the data (STATS_FILES), else computed from the train split as the original does when it ships none:
    Learning2Listen's std is the std over windows of each window's std over time (its mean_std_swap), the other
    layouts' the std over all train frames. std is floored at 1e-3."""
    path = Path(path)
    if (path / "listener").is_dir():
        path = path / "listener"
    for names in STATS_FILES[who]:
        if all((path / n).exists() for n in names):
            out = []
            for n in names:
                a = _check_float(_load_npy(path / n, "train statistics, (D,) float"), path / n, "train statistics")
                a = a.astype(np.float32).reshape(-1)
                if not np.isfinite(a).all():
                    raise _err(path / n, "holds NaN or inf (expected finite train statistics)")
                out.append(a)
            return out[0], np.maximum(out[1], 1e-3)
    _, fmt = _layout(path, "train")
    if fmt is None:
        raise _err(path / STATS_FILES[who][0][0], f"missing file (expected the train statistics "
                                                   f"{' and '.join(STATS_FILES[who][0])}, or a train split to compute "
                                                   f"them from)")
    x = [it[who] for it in load_listener(path, "train", l2l_listener=l2l_listener)]
    _say_once(f"{path} ships no {who} statistics: computed from its {len(x)} train items")
    if fmt == "l2l":                                                          # mean_std_swap of load_utils.py
        w = np.stack(x).astype(np.float64)                                    # (N, T, D)
        mean, std = w.mean(1).mean(0), w.std(1).std(0) + 1e-10
    else:
        allf = np.concatenate(x).astype(np.float64)
        mean, std = allf.mean(0), allf.std(0)
    return mean.astype(np.float32), np.maximum(std, 1e-3).astype(np.float32)


def resolve_data(path, kind, preset="default"):
    """Where the data of `kind` ("listener" | "talking") lives: "" / None -> the synthetic world of `preset`
    (generated if needed; "smoke" and "tiny" -> the tiny world) and its listener/ or vocaset/ folder; a twin's name
    (TWINS: trevor, realtalk, react for listeners, vocaset for talking) -> that twin under DATA_ROOT (generated if
    needed; <name>-tiny for "smoke" / "tiny"); a world root (with listener/ and vocaset/) -> the folder of that kind;
    any other folder -> itself."""
    sub = {"listener": "listener", "talking": "vocaset"}[kind]
    if path in TWINS:                                                     # a twin's name, not a relative folder
        if (path == "vocaset") != (kind == "talking"):
            raise UserError(f"--data {path}: the {path} twin is a {'talking' if path == 'vocaset' else 'listener'} "
                            f"dataset, expected a {kind} one ({', '.join(TWINS)})")
        return generate_twin(path, preset)
    if not path:
        return generate_world(preset="tiny" if preset in ("smoke", "tiny") else "default") / sub
    p = Path(path)
    if not p.exists():
        raise _err(p, f"no such dataset folder (expected a world root, or a {kind} dataset)")
    if (p / "listener").is_dir() and (p / "vocaset").is_dir():
        return p / sub
    return p


def resolve_data_first(path, kind, preset="default"):
    """resolve_data under torchrun: rank 0 first (it may generate the world), then the other ranks. -> Path"""
    if not is_main():
        dist.barrier()
    path = Path(resolve_data(path, kind, preset))
    if is_main() and dist.is_initialized():
        dist.barrier()
    return path


class ListenerWindows(torch.utils.data.Dataset):
    """Windows of `window` frames (every `stride` frames) cut from listener items, z-normalised with the
    train statistics (mean, std). Each sample: listener/speaker (window, D) float32 tensors, listener_beta,
    listener_id, audio (window * SR / fps samples, or empty), and the item index and start frame."""

    def __init__(self, items, window=64, stride=None, mean=None, std=None):
        self.items, self.window = items, window
        D = items[0]["listener"].shape[1]
        self.mean = np.zeros(D, np.float32) if mean is None else np.asarray(mean, np.float32)
        self.std = np.ones(D, np.float32) if std is None else np.asarray(std, np.float32)
        self.index = [(i, s) for i, it in enumerate(items)
                      for s in range(0, len(it["listener"]) - window + 1, stride or window)]

    def __len__(self):
        return len(self.index)

    def __getitem__(self, k):
        i, s = self.index[k]
        it, e = self.items[i], s + self.window
        z = lambda m: torch.from_numpy((m[s:e] - self.mean) / self.std)      # (window, D)
        sps = SR / it["fps"]
        audio = it["audio"][int(round(s * sps)):int(round(e * sps))] if it["audio"] is not None else np.zeros(0)
        return {"listener": z(it["listener"]), "speaker": z(it["speaker"]),
                "listener_beta": torch.from_numpy(it["listener_beta"]), "listener_id": it["listener_id"],
                "audio": torch.from_numpy(np.ascontiguousarray(audio, np.float32)), "item": i, "start": s}

    def denormalise(self, x):
        """(..., D) normalised -> raw motion."""
        return x * torch.as_tensor(self.std, device=x.device) + torch.as_tensor(self.mean, device=x.device)


def load_listener_split(path, split):
    """load_listener(path, split), where a split without items is the user's mistake (a one-line UserError)."""
    items = load_listener(path, split)
    if not items:
        raise UserError(f"{path}: no {split} segments (expected a listener dataset with a {split} split)")
    return items


def whole_windows(items, window, min_windows=1, keys=("listener_attr", "speaker_attr", "listener")):
    """Each key of the items as one float32 tensor (M, L, D) of a common length L: the whole `window`-frame windows
    of the shortest item (by listener_attr), at least min_windows; a shorter item repeats its last frame."""
    L = max(min_windows, min(len(it["listener_attr"]) for it in items) // window) * window
    cut = lambda a: np.concatenate([a, np.repeat(a[-1:], max(0, L - len(a)), 0)])[:L]  # (L, D)
    return [torch.from_numpy(np.stack([cut(np.asarray(it[k], np.float32)) for it in items])) for k in keys]


def random_crops(gen, B, L, *xs):
    """B random rows of L consecutive frames (or window latents) at offsets uniform over the clip, the same rows and
    offsets for every x (M, T, ·) -> each x's crop (B, L, ·). All draws from the torch generator gen."""
    idx = torch.randint(len(xs[0]), (B,), generator=gen)
    off = torch.randint(xs[0].shape[1] - L + 1, (B,), generator=gen)
    ar = (off[:, None] + torch.arange(L)).to(xs[0].device)                    # (B, L) frame indices
    return [x[idx.to(x.device)[:, None], ar] for x in xs]


def react_attributes(y):
    """A model's (..., 25) output, de-normalised -> valid REACT attributes: AU occurrences binary (>= 0.5), valence
    and arousal in [-1, 1], emotion probabilities non-negative and summing to 1 (the REACT features are binary AUs,
    and the sensible CCC scores a never-firing AU predicted as exactly 0 with 1, as 0.01 with 0). Other widths are
    returned as they are."""
    if y.shape[-1] != ATTR_DIM:
        return y
    au, va, em = y[..., :15], y[..., 15:17], y[..., 17:].clamp_min(0)
    em = em / em.sum(-1, keepdim=True).clamp_min(1e-6)
    return torch.cat([(au >= 0.5).to(y.dtype), va.clamp(-1, 1), em], -1)


def load_talking(path, split, fps=None):
    """Talking items of `split` from the VOCASET layout: wav/<subject>_sentenceXX.wav, vertices_npy/<subject>_
    sentenceXX.npy (T, V*3), templates.pkl {subject: (V, 3)}; FaceFormer's subject split (TRAIN/VAL/TEST_SUBJECTS),
    sentences 1-40 train, 21-40 val/test. Real VOCASET (60 fps) is detected and kept [::2] to FPS. A sentence with
    only one of its two files is skipped, as FaceFormer's loader does, and the number skipped is printed."""
    path = Path(path)
    if (path / "vocaset").is_dir():
        path = path / "vocaset"
    if not path.is_dir():
        raise _err(path, "no such dataset folder (expected the VOCASET layout: wav/, vertices_npy/, templates.pkl)")
    for need in ("wav", "vertices_npy", "templates.pkl"):
        if not (path / need).exists():
            raise _err(path / need, "missing (expected the VOCASET layout: wav/, vertices_npy/, templates.pkl)")
    try:
        with open(path / "templates.pkl", "rb") as f:
            templates = pickle.load(f, encoding="latin1")
    except Exception as e:  # noqa: BLE001 - unpickling a corrupt file raises many types
        raise _err(path / "templates.pkl", f"not a readable pickle ({_first_line(e)}); expected a dict "
                                           f"subject -> (V, 3) template") from None
    if not isinstance(templates, dict):
        raise _err(path / "templates.pkl", f"holds a {type(templates).__name__}, expected a dict subject -> (V, 3)")
    subjects = {"train": TRAIN_SUBJECTS, "val": VAL_SUBJECTS, "test": TEST_SUBJECTS}[split]
    src_fps = fps or (json.loads((path / "meta.json").read_text())["fps"] if (path / "meta.json").exists() else None)
    items, unpaired = [], []
    for subj in subjects:
        for k in SENTENCES[split]:
            vf, wf = path / "vertices_npy" / f"{subj}_sentence{k:02d}.npy", path / "wav" / f"{subj}_sentence{k:02d}.wav"
            if not (vf.exists() and wf.exists()):                         # VOCASET has holes; so may we
                unpaired += [f.name for f in (vf, wf) if f.exists()]
                continue
            if subj not in templates:
                raise _err(path / "templates.pkl", f"no template for subject {subj} (expected an entry for every "
                                                   f"subject; found {len(templates)}: {', '.join(sorted(templates))[:120]})")
            tpl = np.asarray(templates[subj])
            if tpl.size == 0 or tpl.size % 3 or tpl.dtype.kind not in "fi":
                raise _err(path / "templates.pkl", f"template of {subj} has shape {tpl.shape} and dtype {tpl.dtype}, "
                                                   f"expected (V, 3) float")
            tpl = tpl.astype(np.float32).reshape(-1, 3)
            v = _check_float(_load_npy(vf, "(T, V*3) float vertices"), vf, "vertices").astype(np.float32)
            if v.ndim != 2 or v.shape[1] != tpl.size:
                raise _err(vf, f"vertices have shape {v.shape}, expected (T, {tpl.size}) = (T, V*3) for the template")
            if not np.isfinite(v).all():
                raise _err(vf, "vertices hold NaN or inf (expected finite vertices)")
            audio = load_wav(wf)
            f_src = src_fps or (60 if len(v) / (len(audio) / SR) > 45 else 30)
            step = max(1, int(round(f_src / FPS)))
            v = v[::step].reshape(-1, tpl.shape[0], 3)
            items.append({"name": f"{subj}_sentence{k:02d}", "subject": subj,
                          "style": TRAIN_SUBJECTS.index(subj) if subj in TRAIN_SUBJECTS else -1,
                          "audio": audio, "vertices": v, "template": tpl, "fps": FPS})
    if unpaired:
        print(f"data.py: {path}: skipped {len(unpaired)} {split} file(s) without their wav / vertices partner "
              f"(e.g. {unpaired[0]})", flush=True)
    if not items:
        raise _err(path, f"no {split} sentences found (expected wav/ and vertices_npy/<subject>_sentenceXX for "
                         f"{', '.join(subjects)})")
    return items


def talking_regions(path):
    """(lip_idx, upper_idx) int64 vertex indices of the talking-face data: regions.npz (lip_idx, upper_idx) as the
    world writes it, else FLAME's FLAME_masks.pkl as DiffSpeaker reads it (lips; forehead + eye_region)."""
    path = Path(path)
    if (path / "vocaset").is_dir():
        path = path / "vocaset"
    f = path / "regions.npz"
    if not f.exists() and (path / "FLAME_masks.pkl").exists():
        return _flame_regions(path / "FLAME_masks.pkl")
    if not f.exists():
        raise _err(f, "missing (expected lip_idx and upper_idx vertex indices, or FLAME's FLAME_masks.pkl)")
    r = _load_npy(f, "an .npz with lip_idx and upper_idx")
    miss = [k for k in ("lip_idx", "upper_idx") if k not in r.files]
    if miss:
        raise _err(f, f"lacks {miss} (expected lip_idx and upper_idx vertex indices; found {r.files})")
    return r["lip_idx"].astype(np.int64), r["upper_idx"].astype(np.int64)


def _flame_regions(f):
    try:
        with open(f, "rb") as fh:
            masks = pickle.load(fh, encoding="latin1")                    # FLAME's masks are a Python 2 pickle
    except Exception as e:  # noqa: BLE001 - unpickling a corrupt file raises many types
        raise _err(f, f"not a readable pickle ({_first_line(e)}); expected FLAME's dict region -> vertex indices") from None
    miss = [k for k in ("lips", "forehead", "eye_region") if not isinstance(masks, dict) or k not in masks]
    if miss:
        found = sorted(masks)[:12] if isinstance(masks, dict) else type(masks).__name__
        raise _err(f, f"lacks regions {miss} (expected FLAME's masks with lips, forehead, eye_region; found {found})")
    idx = lambda k: np.asarray(masks[k]).astype(np.int64).reshape(-1)
    return np.unique(idx("lips")), np.unique(np.concatenate([idx("forehead"), idx("eye_region")]))


def talking_items(path, split, features):
    """load_talking's items with a method's audio features "feats" = features(audio) (N, F) and the flat
    displacements from the template "disp" (T, V*3) float32 added (diff_transformer.py)."""
    items = load_talking(path, split)  # the readers raise UserError for a user's missing or bad files
    for it in items:
        it["feats"] = features(it["audio"])
        it["disp"] = (it["vertices"] - it["template"][None]).reshape(len(it["vertices"]), -1).astype(np.float32)
    return items


def talking_train_val(where, preset, features, norm=True):
    """Train and val talking_items of resolve_data(where, "talking", preset), and what a talking-face checkpoint
    keeps of the data: sigma (the global scalar of the motion: the displacements' RMS, 1.0 without norm), the data
    path, D, the number of styles, a template per style and the lip / upper-face vertex indices."""
    path = str(resolve_data_first(where, "talking", preset))  # rank 0 makes the synthetic world first
    train_items, val_items = talking_items(path, "train", features), talking_items(path, "val", features)
    lip, upper = talking_regions(path)
    n_style = max(it["style"] for it in train_items) + 1
    templates = np.stack([next(it["template"] for it in train_items if it["style"] == s) for s in range(n_style)])
    rms = float(np.sqrt(np.mean(np.concatenate([it["disp"] for it in train_items]) ** 2)))
    stats = {"sigma": rms if norm else 1.0, "data_path": path,
             "D": train_items[0]["disp"].shape[1], "n_style": n_style, "templates": torch.from_numpy(templates),
             "lip_idx": torch.from_numpy(lip), "upper_idx": torch.from_numpy(upper)}
    return train_items, val_items, stats


def talking_batch(items, rng, sigma, batch_size, min_frames, max_frames, rate):
    """batch_size random crops of talking_items, of one length L in [min_frames, max_frames] (shorter clips stay
    whole, so batches mix lengths), with the feature rows (`rate` per second) under each crop -> x0 (B, T, D)
    divided by sigma and zero-padded, feats [(N_i, F)], lens [T_i], styles (B,), pad (B, T) True = padding."""
    L = int(rng.integers(min_frames, max_frames + 1))
    xs, feats, lens, styles = [], [], [], []
    for k in rng.integers(0, len(items), batch_size):
        it = items[k]
        T = len(it["disp"])
        n = min(L, T)
        f0 = int(rng.integers(0, T - n + 1))
        r0 = round(f0 * rate / it["fps"])
        r1 = max(r0 + 1, min(len(it["feats"]), round((f0 + n) * rate / it["fps"])))
        xs.append(torch.from_numpy(it["disp"][f0:f0 + n] / sigma))  # normalised: one global scalar
        feats.append(it["feats"][r0:r1]), lens.append(n), styles.append(it["style"])
    x0 = torch.nn.utils.rnn.pad_sequence(xs, batch_first=True)  # (B, T, D)
    pad = torch.arange(x0.shape[1])[None] >= torch.tensor(lens)[:, None]  # (B, T) True = padding
    return x0, feats, lens, torch.tensor(styles), pad


# ----------------------------------------------------------------------------------------------------------------
# Token windows of listener data (discrete_diffusion.py): every crop of a split, the VQ tokens of each crop (encoded
# once), word ids time-aligned to the window
# ----------------------------------------------------------------------------------------------------------------
HISTORY_S = 3.0  # seconds of words before the window the text encoder sees (LM-Listener)
PAD, UNK, START = 0, 1, 2  # word ids below the vocabulary's: padding, a word not in it, the start of every window


def norm_word(w):
    """The vocabulary's spelling of a transcript word: lower case, punctuation at either end stripped."""
    return w.lower().strip(string.punctuation + " ")


def build_vocab(items):
    """The training split's words (norm_word), most frequent first (ties alphabetical): the text encoder's vocabulary,
    stored in the checkpoint and used again at sample time; any other word is UNK."""
    count = collections.Counter(norm_word(w) for it in items for w, _ in it["words"])
    count.pop("", None)
    return sorted(count, key=lambda w: (-count[w], w))


def word_ids(vocab):
    return {w: i + 3 for i, w in enumerate(vocab)}


def window_words(words, c0, T, fps, ids):
    """Segment words [(text, end_s)] -> [(id, end frame relative to the window start c0)] for ends in [-3 s, T);
    ids: word_ids of the vocabulary."""
    sel = [(ids.get(norm_word(w), UNK), e * fps - c0) for w, e in words if -HISTORY_S * fps <= e * fps - c0 < T]
    return [(START, 0.0)] + sel


def pad_words(lists):
    """Lists of (id, end) -> ids (n, N) int64 (pad 0), ends (n, N) float32."""
    pad = lambda rows: torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
    return (pad([torch.tensor([i for i, _ in w]) for w in lists]),
            pad([torch.tensor([e for _, e in w], dtype=torch.float32) for w in lists]))


def audio_rows(it, n_rows, n_mfcc):
    """Speaker audio rows (n_rows = 4 per frame, F): precomputed rows (L2L files), mfcc of the waveform, or zeros
    when the item has no audio (the LM-Listener release): the audio encoder then sees a constant."""
    if it.get("audio") is None and it.get("audio_rows") is None:
        return torch.zeros(n_rows, n_mfcc)
    if it.get("audio_rows") is not None:
        return torch.as_tensor(np.asarray(it["audio_rows"][:n_rows]), dtype=torch.float32)
    return torch.as_tensor(mfcc(it["audio"], rate=4.0 * it["fps"], n_mfcc=n_mfcc, n_rows=n_rows))


@torch.no_grad()
def load_windows(path, split, vq, T, stride, n_mfcc, vocab=None):
    """Every item of a split, its crops of T frames at `stride`, and the VQ tokens of each crop (encoded once by vq,
    a vqvae.py model). Returns a dict of tensors: spk/lis (S, Ts, D) raw, feat (S, 4Ts, F), beta (S, 100), alt
    (S, Ts, D) or None, starts (C,), tok (S, C, L), wid/wend (S, C, N), the items' words [S] (lists of (text,
    end_s)), n (S,) frames, no_audio (items without audio), vocab (the word list of wid: `vocab`, or built from these
    items when None, as for the train split) and events (load_ledger: per item the rule events of a synthetic twin,
    else None). Segments of different lengths are zero-padded to the longest Ts; each gives its own crops (those
    inside it: all_windows), as the original loaders window every segment."""
    items = [it for it in load_listener(path, split) if len(it["listener"]) >= T]
    if not items:
        raise UserError(f"{path}: no {split} item of at least {T} frames (--clip-frames {T})")
    n = torch.tensor([len(it["listener"]) for it in items])
    Ts, fps = int(n.max()), items[0]["fps"]
    f32 = lambda x: torch.as_tensor(np.asarray(x), dtype=torch.float32)
    pad = lambda x, m=Ts: torch.nn.functional.pad(f32(x), (0, 0, 0, m - len(x)))  # rows (n, D) -> (m, D), zeros after n
    stack = lambda k: torch.stack([pad(it[k][:Ts]) for it in items])
    has_alt = all(it.get("alt_listener") is not None for it in items)
    d = dict(spk=stack("speaker"), lis=stack("listener"), fps=fps, T=T, words=[it["words"] for it in items],
             beta=torch.stack([f32(it["listener_beta"]) for it in items]),
             feat=torch.stack([pad(audio_rows(it, 4 * len(it["listener"]), n_mfcc), 4 * Ts) for it in items]), n=n,
             no_audio=sum(it.get("audio") is None and it.get("audio_rows") is None for it in items),
             vocab=build_vocab(items) if vocab is None else list(vocab), events=load_ledger(path, items),
             alt=torch.stack([pad(it["alt_listener"][0][:Ts]) for it in items]) if has_alt else None)
    starts = torch.arange(0, Ts - T + 1, stride)                      # (C,) crop starts in frames
    S, C = len(items), len(starts)
    fr, chunk = starts[:, None] + torch.arange(T), max(1, 2048 // C)   # (C, T) frames of each crop
    toks = []
    for i in range(0, S, chunk):                                       # encode the crops in chunks
        x = d["lis"][i:i + chunk][:, fr]                               # (s, C, T, D)
        b = d["beta"][i:i + chunk][:, None].expand(-1, C, -1)          # (s, C, D_id)
        toks.append(vq.encode(vq.normalize(x.flatten(0, 1)), b.flatten(0, 1)).view(x.shape[0], C, -1))  # (s, C, L)
    ids, ends = pad_words([window_words(w, int(c), T, fps, word_ids(d["vocab"])) for w in d["words"] for c in starts])
    d.update(tok=torch.cat(toks), starts=starts, wid=ids.view(S, C, -1), wend=ends.view(S, C, -1))  # (S, C, ...)
    return d


def get_batch(d, seg, crop):
    """Windows (seg[i], crop[i]) of a load_windows dict -> batch dict of (B, T, D), (B, 4T, F), (B, N), (B, L)."""
    T = d["T"]
    c0 = d["starts"][crop]                                             # (B,)
    fr = c0[:, None] + torch.arange(T)                                 # (B, T)
    rows = 4 * c0[:, None] + torch.arange(4 * T)                       # (B, 4T)
    return dict(spk=d["spk"][seg[:, None], fr], lis=d["lis"][seg[:, None], fr], feat=d["feat"][seg[:, None], rows],
                wid=d["wid"][seg, crop], wend=d["wend"][seg, crop], tok=d["tok"][seg, crop], beta=d["beta"][seg],
                alt=None if d["alt"] is None else d["alt"][seg[:, None], fr])


def all_windows(d):
    """Every (segment, crop) pair of a split with the crop inside the segment, segment-major: two (n,) index tensors."""
    S, C = d["tok"].shape[:2]
    seg, crop = torch.arange(S).repeat_interleave(C), torch.arange(C).repeat(S)
    keep = d["starts"][crop] + d["T"] <= d["n"][seg]
    return seg[keep], crop[keep]


def draw_windows(d, B, gen):
    """B training windows: a segment, then one of its crops (segments of different lengths: uniform over windows)."""
    (S, C), (seg, crop) = d["tok"].shape[:2], all_windows(d)
    if len(seg) == S * C:
        return torch.randint(S, (B,), generator=gen), torch.randint(C, (B,), generator=gen)
    i = torch.randint(len(seg), (B,), generator=gen)
    return seg[i], crop[i]


def stream_starts(n_tokens, L, hop):
    """Token starts of windows of L tokens every `hop` tokens covering a stream of n_tokens (the last one flush with
    its end): where discrete_diffusion.py's long-conversation sampler puts its jointly denoised windows."""
    if n_tokens <= L:
        return [0]
    starts = list(range(0, n_tokens - L + 1, hop))
    return starts if starts[-1] == n_tokens - L else starts + [n_tokens - L]


def stream_windows(spk, feat, words, c0, T, fps, ids):
    """Windows of T frames starting at frames c0 of B speaker streams, sample-major: spk (B, Tall, D), feat
    (B, 4 Tall, F), words B lists of (text, end_s), ids: word_ids. -> spk (B*W, T, D), feat (B*W, 4T, F), word ids
    and ends (B*W, N) (pad_words)."""
    B = len(spk)
    spk_w = torch.stack([spk[b, c:c + T] for b in range(B) for c in c0])                # (B*W, T, D)
    feat_w = torch.stack([feat[b, 4 * c:4 * (c + T)] for b in range(B) for c in c0])    # (B*W, 4T, F)
    return (spk_w, feat_w, *pad_words([window_words(words[b], c, T, fps, ids) for b in range(B) for c in c0]))


def window_stats(d, differential):
    """Normalisation statistics of a load_windows dict (the train split) over the frames inside their segments:
    mean and std (at least 1e-4) of the speaker motion (spk_), of the differential(z-normalised motion) (diff_std),
    of the audio rows (feat_) and of the listener beta (beta_). -> {name: (D,) tensor}"""
    inside = torch.arange(d["spk"].shape[1]) < d["n"][:, None]        # (S, Ts) frames inside their segment
    std = lambda x: x.std(0).clamp_min(1e-4)
    spk, feat = d["spk"][inside], d["feat"][inside.repeat_interleave(4, 1)]
    st = dict(spk_mean=spk.mean(0), spk_std=std(spk))
    z = differential((d["spk"] - st["spk_mean"]) / st["spk_std"])      # (S, Ts, D)
    return dict(st, diff_std=std(z[:, 1:][inside[:, 1:]]), feat_mean=feat.mean(0), feat_std=std(feat),
                beta_mean=d["beta"].mean(0), beta_std=std(d["beta"]))


# ----------------------------------------------------------------------------------------------------------------
# Token streams of listener data (lm_listener.py): whole items as VQ tokens and back, whether a VQ-VAE checkpoint
# fits the data of a run; the speaker's tokens, stand-ins for pretrained tokenisers: a 2-stage residual k-means over
# causal MFCC + delta (iSC, SA) for SpeechTokenizer's RVQ, the emotion readout per group of r frames for EMOCA
# ----------------------------------------------------------------------------------------------------------------
SA_HOP = 320  # hop of the speech-token MFCC at 50 Hz (samples)


def vq_mismatch(path, data_path, preset, norm=None, r=8):
    """Why the VQ-VAE checkpoint at `path` does not fit this run (missing, other preset, data, norms or r), or None."""
    if not Path(path).is_file():
        return "is missing"
    try:
        c = torch.load(path, map_location="cpu", weights_only=True)["config"]
    except Exception as e:
        raise UserError(f"--vq {path} is not a readable VQ-VAE checkpoint ({str(e).splitlines()[0][:100]})")
    why = [(c.get("preset") != preset, f"was trained with --preset {c.get('preset')}, this run is --preset {preset}"),
           (Path(c.get("data", "")).resolve() != Path(data_path).resolve(),
            f"was trained on {c.get('data')}, this run reads {data_path}"),
           (norm and c.get("norm") != norm, f"has norms {c.get('norm')}, expected {norm}"),
           (c.get("r", r) != r, f"makes one token per {c.get('r')} frames, this method expects r = {r}")]
    return next((what for broken, what in why if broken), None)


@torch.no_grad()
def vq_tokens(vq, items, r=8):
    """Listener motion -> VQ tokens [(T_i // r,)] with the encoder of vq (a vqvae.py model, with its stored
    statistics); consecutive items of one length are encoded together, up to 64."""
    out = []
    for i in range(0, len(items), 64):
        for _, grp in itertools.groupby(items[i:i + 64], key=lambda it: len(it["listener"]) // r):
            grp = list(grp)
            x = torch.stack([torch.as_tensor(it["listener"][: len(it["listener"]) // r * r]) for it in grp])
            b = torch.stack([torch.as_tensor(it["listener_beta"]) for it in grp])
            out += list(vq.encode(vq.normalize(x.float()), b.float()).cpu())
    return out


@torch.no_grad()
def decode_motion(vq, toks, betas):
    """VQ tokens (n, G) -> de-normalised motion [(T, 56)], each decoded with its listener's beta."""
    out = []
    for i in range(0, len(toks), 64):
        b = torch.stack([torch.as_tensor(x) for x in betas[i:i + 64]]).float()
        out += list(vq.denormalize(vq.decode(toks[i:i + 64], b)).cpu().float().numpy())   # (B, T, 56)
    return out


def sa_features(audio, n_rows=None):
    """Speaker waveform (S,) -> (n, 80) pooled MFCC+delta at 12.5 Hz and (n,) support end in 30-fps frames.
    Causal delta (c_t - c_{t-1}); rows pooled x4; pooled frame j ends at sample (4j+4)*SA_HOP + 80 (25 ms window)."""
    n_rows = (len(audio) // SA_HOP) if n_rows is None else n_rows
    n_rows -= n_rows % 4
    if n_rows <= 0:
        return torch.zeros(0, 80), torch.zeros(0)
    m = torch.as_tensor(mfcc(np.asarray(audio, np.float32), rate=SR // SA_HOP, n_mfcc=40, n_rows=n_rows))  # (rows, 40)
    d = torch.cat([torch.zeros_like(m[:1]), m[1:] - m[:-1]])                              # causal delta
    f = torch.cat([m, d], 1).reshape(n_rows // 4, 4, 80).mean(1)                          # (n, 80)
    end = ((torch.arange(len(f)) * 4 + 4) * SA_HOP + 80) * FPS / SR                       # frames
    return f.float(), end.float()


def clip_features(items, cache=None, method="lm_listener", r=8):
    """sa_features of every item's speech over its frames cut to a multiple of r (none without audio), cached in
    the file `cache` (a checkpoint of `method`, keyed by the item names; None: not cached)."""
    key = None if cache is None else [it["name"] for it in items]
    if cache is not None and Path(cache).exists():
        c = torch.load(cache, weights_only=True)
        if c["key"] == key:
            return c["feats"]
    feats = [(torch.zeros(0, 80), torch.zeros(0)) if it["audio"] is None else
             sa_features(it["audio"], n_rows=len(it["listener"]) // r * r * SR // FPS // SA_HOP) for it in items]
    if cache is not None:
        save_checkpoint(cache, method, dict(key=key, feats=feats))
    return feats


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


def fit_sa_kmeans(feats, v_sa, seed, max_frames=20000):
    """Both stages on (at most max_frames of) the train features, standardised with train statistics."""
    fs = torch.cat([f for f, _ in feats])                                                 # (M, 80)
    fs = fs[torch.randperm(len(fs), generator=torch.Generator().manual_seed(seed))[:max_frames]]
    mean, std = fs.mean(0), fs.std(0) + 1e-5
    z = (fs - mean) / std
    c1 = kmeans(z, v_sa, seed=seed)
    c2 = kmeans(z - c1[torch.cdist(z, c1).argmin(1)], v_sa, seed=seed + 1)
    return dict(mean=mean, std=std, c1=c1, c2=c2)


def sa_tokens(f, km):
    """Residual k-means: layer 1 = iSC (content), layer 2 on the residual = SA (acoustics). f (n, 80) -> 2 x (n,)."""
    z = (f - km["mean"]) / km["std"]
    isc = torch.cdist(z, km["c1"]).argmin(1)
    sa = torch.cdist(z - km["c1"][isc], km["c2"]).argmin(1)
    return sa, isc


def sa_tokens_since(wav, km, done):
    """Streaming: sa_tokens of the speech so far wav (S,) from pooled frame done - 1 on (aligned to the pooled grid;
    one frame early, so that frame done's causal delta sees its predecessor) -> sa, isc (n,), their support ends (n,)
    in frames and the pooled index of the first."""
    a0 = max(0, (4 * done - 4) * SA_HOP)                                               # aligned audio start
    f, end = sa_features(wav[a0:], n_rows=(len(wav) - a0) // SA_HOP)
    sa, isc = sa_tokens(f, km)
    return sa, isc, end + a0 * FPS / SR, a0 // (4 * SA_HOP)


def emo_tokens(probs, r=8):
    """MMLM's procedure: average the per-frame emotion probabilities over each group of r frames, then argmax.
    probs (T, E) -> (T // r,)."""
    T, E = probs.shape
    return torch.as_tensor(probs[: T - T % r]).reshape(T // r, r, E).mean(1).argmax(-1)


def sa_kmeans(cache, key, feats, v_sa, seed, method="lm_listener", placeholder=False):
    """fit_sa_kmeans of the train features, cached in the file `cache` (a checkpoint of `method`) and refitted when
    its key (data, v_sa, seed) differs; placeholder: centroids for data without audio (no SA tokens at all)."""
    km = torch.load(cache, weights_only=True) if Path(cache).exists() else {}
    if placeholder:  # unused: every clip has 0 SA frames
        km = dict(mean=torch.zeros(80), std=torch.ones(80), c1=torch.zeros(1, 80), c2=torch.zeros(1, 80), key=key)
    if km.get("key") != key:
        km = {**fit_sa_kmeans(feats, v_sa, seed), "key": key}
        save_checkpoint(cache, method, km)
        print(f"[{method}] acoustic k-means fitted ({v_sa}+{v_sa} centroids)")
    return {k: km[k] for k in ("mean", "std", "c1", "c2", "key")}


def token_clips(items, w2i, km, vq, feats=None, r=8):
    """Per item, its streams as tokens: words [(id in w2i, 1 if unknown; end frame)], SA / iSC tokens (sa_tokens)
    with their support ends sa_end (n,), emo (T // r,), LR (T // r,; None without a vq), the item and T (its frames
    cut to a multiple of r). feats: clip_features of the items (None: computed here)."""
    clips, feats = [], feats or clip_features(items, r=r)
    for it, lr, (f, end) in zip(items, vq_tokens(vq, items, r) if vq else [None] * len(items), feats):
        T = len(it["listener"]) // r * r
        sa, isc = sa_tokens(f, km)
        clips.append(dict(words=[(w2i.get(t.lower(), 1), e * FPS) for t, e in it["words"]], sa=sa, isc=isc,
                          sa_end=end, emo=emo_tokens(it["speaker_attr"][:T, 17:25], r), lr=lr, item=it, T=T))
    return clips


def window_starts(clips, G, rng, n, r=8):
    """n training windows (clip index, start frame) of G groups of r frames, uniform over all windows at any group
    offset of any of token_clips' clips (a long clip is drawn as often as it has windows)."""
    count = np.array([c["T"] // r - G + 1 for c in clips])
    k = rng.integers(count.sum(), size=n)
    c = np.searchsorted(np.cumsum(count), k, side="right")
    return [(int(ci), r * int(ki - (np.cumsum(count)[ci] - count[ci]))) for ci, ki in zip(c, k)]


# ----------------------------------------------------------------------------------------------------------------
# Audio: reading wavs, resampling, MFCC

def _check_wav_header(path):
    """RIFF/WAVE files: the data chunk must be as long as the header says (libsndfile reads truncated files quietly)."""
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return
        while True:
            ch = f.read(8)
            if len(ch) < 8:
                raise _err(path, "truncated WAV file: no 'data' chunk (expected a complete RIFF/WAVE file)")
            size = int.from_bytes(ch[4:], "little")
            if ch[:4] == b"data":
                have = os.path.getsize(path) - f.tell()
                if size != 0xFFFFFFFF and have < size:
                    raise _err(path, f"truncated WAV file: header says {size} data bytes, file holds {have}")
                return
            f.seek(size + (size & 1), 1)


RESAMPLE_ZEROS, RESAMPLE_ROLLOFF = 6, 0.99   # windowed-sinc resampler: zero crossings per side, cutoff / Nyquist


def _sinc_kernel(d, rho):
    """The resampling filter at distances d (input samples) from an output sample: a sinc cut off at rho times the
    input's Nyquist, under a Hann window RESAMPLE_ZEROS zero crossings wide (torchaudio's sinc_interp_hann)."""
    x = (d * rho).clamp(-RESAMPLE_ZEROS, RESAMPLE_ZEROS)
    window = torch.cos(x * (np.pi / RESAMPLE_ZEROS / 2)) ** 2
    return rho * torch.special.sinc(x) * window


@functools.lru_cache(maxsize=8)
def _polyphase_kernel(up, down, rho, width):
    """(up, 1, 2 width + down) float32: row i filters the input block for output phase i (output time i down / up)."""
    offsets = torch.arange(-width, width + down, dtype=torch.float64)             # input offset from the block start
    phases = torch.arange(up, dtype=torch.float64)[:, None] * down / up           # output times in the block
    return _sinc_kernel(offsets[None] - phases, rho).float()[:, None]


def resample(wave, sr_in, sr_out=SR):
    """Band-limited resampling by a windowed-sinc polyphase filter, as torchaudio and soxr do: the rates' ratio is
    reduced to up / down, each block of `down` input samples gives `up` outputs, each a dot product with one of `up`
    fixed filters. Beyond its ends the signal is continued point-symmetrically about its end samples (values and
    slopes continue, a constant stays constant, nothing wraps around from the other end), and the time depends on
    the length only, not on its factors. (S,) -> (round(S * sr_out / sr_in),) float32. A ratio whose filters would
    not fit in memory (e.g. 44099 -> 16000 Hz) is evaluated sample by sample with the same filter."""
    w = torch.as_tensor(_np(wave), dtype=torch.float32)
    if sr_in == sr_out:
        return w.numpy()
    g = math.gcd(int(sr_in), int(sr_out))
    up, down = int(sr_out) // g, int(sr_in) // g
    rho = RESAMPLE_ROLLOFF * min(1.0, up / down)                                  # cutoff, in input Nyquists
    width = int(math.ceil(RESAMPLE_ZEROS / rho))                                  # filter half-width, input samples
    n_out = int(round(len(w) * up / down))
    if len(w) == 0:
        return np.zeros(0, np.float32)
    x = _extend(w, width, width + down)                                           # (S + 2 width + down,)
    if up * (2 * width + down) > 2 ** 22:
        return _resample_direct(x, up, down, rho, width, n_out)
    y = torch.nn.functional.conv1d(x[None, None], _polyphase_kernel(up, down, rho, width), stride=down)
    return y[0].T.reshape(-1)[:n_out].numpy()                                    # (1, up, S // down + 1) -> (n_out,)


def _extend(w, left, right):
    """(S,) -> (left + S + right,): continued point-symmetrically about the first and the last sample."""
    i = torch.arange(1, max(left, right) + 1).clamp(max=len(w) - 1)
    return torch.cat([2 * w[0] - w[i[:left].flip(0)], w, 2 * w[-1] - w[len(w) - 1 - i[:right]]])


def _resample_direct(x, up, down, rho, width, n_out, chunk=2 ** 14):
    """resample() for any ratio: output n at input time n down / up from the 2 width + 1 nearest samples of x, the
    signal extended by `width` samples in front."""
    out, taps = [], torch.arange(-width, width + 1)
    for n0 in range(0, n_out, chunk):
        n = torch.arange(n0, min(n0 + chunk, n_out), dtype=torch.float64)
        centre = torch.div(n * down, up, rounding_mode="floor").long()          # (n,) nearest input at or before
        k = centre[:, None] + taps                                                # (n, 2 width + 1) input indices
        h = _sinc_kernel(k - (n * down / up)[:, None], rho).float()
        out.append((x[(k + width).clamp(0, len(x) - 1)] * h).sum(1))
    return torch.cat(out).numpy()


def load_wav(path, sr=SR):
    """Read an audio file -> (S,) float32 mono at `sr`. Clear errors for missing, empty, truncated, non-audio."""
    path = Path(path)
    if not path.is_file():
        raise _err(path, "no such audio file (expected a .wav file)")
    if path.stat().st_size == 0:
        raise _err(path, "empty file (expected audio samples)")
    _check_wav_header(path)
    try:
        w, file_sr = sf.read(str(path), dtype="float32", always_2d=True)   # (S, C)
    except Exception as e:  # noqa: BLE001 - libsndfile raises several types
        raise _err(path, f"not a readable audio file ({_first_line(e)}); expected a .wav file") from None
    if len(w) == 0:
        raise _err(path, "audio file holds no samples (expected at least one)")
    return resample(w.mean(1), file_sr, sr)


def _mel_fb(n_fft, n_mels, sr):
    hz = lambda m: 700 * (10 ** (m / 2595) - 1)
    pts = hz(np.linspace(0, 2595 * np.log10(1 + (sr / 2) / 700), n_mels + 2))
    f = np.linspace(0, sr / 2, n_fft // 2 + 1)
    lo, c, hi = pts[:-2, None], pts[1:-1, None], pts[2:, None]
    fb = np.maximum(0, np.minimum((f - lo) / (c - lo), (hi - f) / (hi - c)))  # (n_mels, F) triangles
    return torch.tensor(fb, dtype=torch.float32)


def mfcc(wave, sr=SR, rate=120.0, n_mfcc=40, n_rows=None, n_mels=None):
    """MFCC rows at `rate` per second: (n_rows, n_mfcc) float32. Stereo (2, S) or (S, 2) is mixed down.
    16 kHz -> torch.stft (25 ms Hann window, hop = SR/rate) -> mel power -> log -> DCT-II -> rows resampled
    linearly to exactly n_rows (default round(duration * rate))."""
    if wave is None:
        raise ValueError("mfcc: got no waveform (None): the item has no audio (LM-Listener, for one, releases none); "
                         "check item['audio'] and run without the audio input")
    w = _np(wave).astype(np.float32)
    if w.ndim == 2:
        w = w.mean(0) if w.shape[0] <= 2 < w.shape[1] else w.mean(1)
    if w.ndim != 1 or w.size == 0:
        raise ValueError(f"mfcc: expected a non-empty waveform (S,) or stereo (S, 2); got shape {w.shape}")
    if not np.isfinite(w).all():
        raise ValueError("mfcc: waveform holds NaN or inf")
    dur = len(w) / sr
    w = torch.from_numpy(resample(w, sr, SR))
    n_mels = n_mels or max(64, n_mfcc)
    hop, n_fft = max(1, int(round(SR / rate))), 512
    if len(w) < n_fft:
        w = torch.nn.functional.pad(w, (0, n_fft - len(w)))
    spec = torch.stft(w, n_fft, hop_length=hop, win_length=400, window=torch.hann_window(400),
                      center=True, return_complex=True).abs() ** 2               # (F, N)
    logmel = torch.log(_mel_fb(n_fft, n_mels, SR) @ spec + 1e-6)                # (n_mels, N)
    k = torch.arange(n_mels, dtype=torch.float32)
    dct = torch.cos(np.pi / n_mels * (k[None] + 0.5) * torch.arange(n_mfcc, dtype=torch.float32)[:, None])
    c = (dct @ logmel).T * np.sqrt(2.0 / n_mels)                                # (N, n_mfcc) DCT-II
    n_rows = int(n_rows if n_rows is not None else max(1, round(dur * rate)))
    pos = torch.arange(n_rows, dtype=torch.float32) / rate * SR / hop           # row j's time in frames
    i0 = pos.floor().long().clamp(0, len(c) - 1)
    i1 = (i0 + 1).clamp(max=len(c) - 1)
    fr = (pos - i0.float()).clamp(0, 1)[:, None]
    return ((1 - fr) * c[i0] + fr * c[i1]).numpy().astype(np.float32)


def deltas(x):
    """Regression deltas over +-2 rows (HTK formula), edges replicated: (N, F) tensor -> (N, F)."""
    p = torch.nn.functional.pad(x.T[None], (2, 2), mode="replicate")[0].T  # (N + 4, F)
    return (p[3:-1] - p[1:-3] + 2 * (p[4:] - p[:-4])) / 10.0


def mfcc_deltas(wave, rate, n_mfcc):
    """MFCC at `rate` rows per second + delta + delta-delta, per-utterance CMVN: (S,) -> (N, 3 n_mfcc) tensor
    (diff_transformer.py's stand-in for wav2vec2 features)."""
    n_rows = max(1, round(len(wave) / SR * rate))
    m = torch.as_tensor(mfcc(np.asarray(wave, np.float32), rate=rate, n_mfcc=n_mfcc, n_rows=n_rows))
    f = torch.cat([m, deltas(m), deltas(deltas(m))], 1)  # (N, 3F)
    return (f - f.mean(0)) / (f.std(0, unbiased=False) + 1e-5)


# ----------------------------------------------------------------------------------------------------------------
# The face model: a tiny 3DMM and its readouts (REACT's 25 attributes), used by the readers and pictures

# emotion -> face: the semantic exp channels of each of the 8 EMOTIONS (the readouts' prototypes)
EMOTION_FACE = np.zeros((8, EXP_DIM), np.float32)
for _e, _d in enumerate([{}, {SMILE: 1.0, OPEN_SMILE: 0.3, BROW_RAISE: 0.15},
                         {FROWN: 0.9, BROW_FURROW: 0.3, LIP_PRESS: 0.2}, {BROW_RAISE: 1.0, LIP_ROUND: 0.3},
                         {BROW_RAISE: 0.6, BROW_FURROW: 0.6, LIP_SPREAD: 0.6},
                         {10: 1.0, FROWN: 0.3, BROW_FURROW: 0.4}, {BROW_FURROW: 1.0, LIP_PRESS: 0.7},
                         {11: 1.0, SMILE: 0.25}]):
    for _k, _v in _d.items():
        EMOTION_FACE[_e, _k] = _v


def _like(y, x):
    """Return numpy result y as the type of input x (torch in -> torch out)."""
    return torch.as_tensor(y, device=x.device) if torch.is_tensor(x) else y


def _rodrigues(r):
    """Axis-angle (..., 3) -> rotation matrices (..., 3, 3)."""
    th = np.linalg.norm(r, axis=-1, keepdims=True)[..., None]               # (..., 1, 1)
    k = r / np.maximum(th[..., 0], 1e-8)
    K = np.zeros(r.shape[:-1] + (3, 3), r.dtype)
    K[..., 0, 1], K[..., 0, 2], K[..., 1, 2] = -k[..., 2], k[..., 1], -k[..., 0]
    K = K - np.swapaxes(K, -1, -2)
    return np.eye(3, dtype=r.dtype) + np.sin(th) * K + (1 - np.cos(th)) * K @ K


class FaceModel:
    """A linear 3DMM-like face of ~300 vertices (an ellipsoid with lip/eye/brow curves): template(beta) + exp @
    blendshapes, then jaw rotation, then head rotation. A motion frame is [exp 50 | head rot 3 | jaw 3]; exp 0..9 are
    the semantic channels (JAW_OPEN .. BLINK), 10..49 small smooth random fields; beta (100) is the shape.
    Readouts (fixed maps of a frame, stand-ins for an emotion recogniser): valence, arousal, 15 binary AUs, 8 emotion
    probabilities, and attributes() = REACT's 25 (numpy in -> numpy out; torch in -> torch out, no gradient)."""

    def __init__(self, seed=0):
        rng = np.random.default_rng(1000 + seed)
        el, az = np.meshgrid(np.linspace(1.15, -1.2, 14), np.linspace(-1.3, 1.3, 18), indexing="ij")
        grid = np.stack([0.8 * np.sin(az) * np.cos(el), 1.05 * np.sin(el), 0.75 * np.cos(az) * np.cos(el)], -1)
        nr, nc = el.shape
        surf = lambda x, y: 0.75 * np.sqrt(np.clip(1 - (x / 0.8) ** 2 - (y / 1.05) ** 2, 0, 1)) + 0.03
        parts, edges, n = {"grid": grid.reshape(-1, 3)}, [], nr * nc
        ids = np.arange(n).reshape(nr, nc)
        edges += [(a, b) for a, b in zip(ids[:, :-1].ravel(), ids[:, 1:].ravel())]
        edges += [(a, b) for a, b in zip(ids[:-1].ravel(), ids[1:].ravel())]
        lx = np.linspace(-0.27, 0.27, 11)
        self.mouth_y = my = -0.5
        curves = {"upper_lip": (lx, my + 0.03 * (1 - (lx / .27) ** 2), False),
                  "lower_lip": (lx, my - 0.035 * (1 - (lx / .27) ** 2), False)}
        a = np.linspace(0, 2 * np.pi, 11)[:-1]
        for side, cx in (("l", -0.3), ("r", 0.3)):
            curves["eye_" + side] = (cx + 0.12 * np.cos(a), 0.18 + 0.05 * np.sin(a), True)
            bx = np.linspace(cx - 0.14, cx + 0.14, 5)
            curves["brow_" + side] = (bx, 0.36 + 0.03 * (1 - ((bx - cx) / .14) ** 2), False)
        curves["nose"] = (np.zeros(4), np.linspace(0.12, -0.22, 4), False)
        self.groups = {}
        self.polylines = [(r, False) for r in ids] + [(c, False) for c in ids.T]   # for drawing: (indices, feature)
        for name, (x, y, closed) in curves.items():
            z = surf(x, y) + (np.array([0.03, 0.08, 0.14, 0.1]) if name == "nose" else 0)
            parts[name] = np.stack([x, y, z], -1)
            idx = np.arange(n, n + len(x))
            edges += list(zip(idx[:-1], idx[1:])) + ([(idx[-1], idx[0])] if closed else [])
            self.groups[name], n = idx, n + len(x)
            self.polylines.append((np.r_[idx, idx[:1]] if closed else idx, True))
        self.mean = np.concatenate(list(parts.values())).astype(np.float32)    # (V, 3)
        self.n_vertices, self.edges = n, np.array(edges, np.int64)
        P = self.mean
        x, y, z = P[:, 0], P[:, 1], P[:, 2]
        gi = np.arange(nr * nc)
        lips = np.concatenate([self.groups["upper_lip"], self.groups["lower_lip"]])
        near_mouth = gi[(np.abs(x[gi]) < 0.4) & (np.abs(y[gi] - my) < 0.18)]
        self.lip_idx = np.unique(np.concatenate([lips, near_mouth])).astype(np.int64)
        self.upper_face_idx = np.unique(np.concatenate(
            [gi[y[gi] > 0.05]] + [self.groups[k] for k in ("eye_l", "eye_r", "brow_l", "brow_r")])).astype(np.int64)
        # jaw weights: lower face follows the jaw rotation; the lower lip fully
        self.jaw_w = np.clip((my - 0.03 - y) / 0.3, 0, 1) * np.clip(1.2 - np.abs(x) / 0.6, 0, 1)
        self.jaw_w[self.groups["lower_lip"]] = 1.0
        self.jaw_w[self.groups["upper_lip"]] = 0.0
        self.jaw_pivot, self.neck_pivot = np.array([0, -0.3, -0.35]), np.array([0, -1.1, -0.25])
        # expression blendshapes (50, V, 3)
        B = np.zeros((EXP_DIM, n, 3), np.float32)
        ul, ll = self.groups["upper_lip"], self.groups["lower_lip"]
        corner = lambda i: (x[i] / 0.27) ** 2                                 # 0 centre, 1 corners
        mid = lambda i: 1 - corner(i)
        B[JAW_OPEN, :, 1] = -0.1 * self.jaw_w
        B[LIP_SPREAD, lips, 0] = 0.06 * x[lips] / 0.27
        B[LIP_ROUND, lips, 0], B[LIP_ROUND, lips, 2] = -0.07 * x[lips] / 0.27, 0.05
        B[LIP_ROUND, ul, 1], B[LIP_ROUND, ll, 1] = 0.015 * mid(ul), -0.015 * mid(ll)
        B[LIP_PRESS, ul, 1], B[LIP_PRESS, ll, 1] = -0.025 * mid(ul), 0.03 * mid(ll)
        cheek = gi[(np.abs(x[gi]) > 0.25) & (np.abs(x[gi]) < 0.55) & (y[gi] > -0.45) & (y[gi] < -0.1)]
        for k, s in ((SMILE, 1.0), (OPEN_SMILE, 1.0), (FROWN, -0.9)):
            B[k, lips, 1] += s * 0.08 * corner(lips)
            B[k, lips, 0] += abs(s) * 0.03 * x[lips] / 0.27
        B[SMILE, cheek, 1] = B[OPEN_SMILE, cheek, 1] = 0.03
        B[OPEN_SMILE, ll, 1] -= 0.08 * mid(ll)
        B[OPEN_SMILE, :, 1] -= 0.04 * self.jaw_w
        brows = np.concatenate([self.groups["brow_l"], self.groups["brow_r"]])
        eyes = np.concatenate([self.groups["eye_l"], self.groups["eye_r"]])
        upper_lid = eyes[y[eyes] > 0.18]
        B[FROWN, brows, 1] = -0.02
        B[BROW_RAISE, brows, 1], B[BROW_RAISE, upper_lid, 1] = 0.08, 0.02
        B[BROW_RAISE, gi[y[gi] > 0.35], 1] = 0.03
        inner = 1 - np.abs(np.abs(x[brows]) - 0.16) / 0.3
        B[BROW_FURROW, brows, 1], B[BROW_FURROW, brows, 0] = -0.05 * inner, -0.03 * np.sign(x[brows]) * inner
        B[BLINK, upper_lid, 1] = -2 * (y[upper_lid] - 0.18)
        for k in range(10, EXP_DIM):                                           # smooth random fields
            for _ in range(2):
                c, d = rng.uniform([-0.5, -0.7], [0.5, 0.6]), rng.standard_normal(3)
                B[k] += (0.03 * np.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2) / 0.06))[:, None] * (d / np.linalg.norm(d))
        self.exp_basis = B
        # identity basis (100, V, 3): a few meaningful components, then small random fields
        S = np.zeros((BETA_DIM, n, 3), np.float32)
        S[0, :, 0], S[1, :, 1], S[3, :, 2] = 0.06 * x, 0.06 * y, 0.06 * z
        S[2, :, 0] = 0.08 * x * np.clip(-y, 0, 1)                                 # jaw width
        S[4, np.concatenate([eyes, brows]), 0] = 0.03 * np.sign(x[np.concatenate([eyes, brows])])
        S[5, lips, 0] = 0.04 * x[lips] / 0.27                                      # mouth width
        for k in range(6, BETA_DIM):
            c, d = rng.uniform([-0.6, -0.8], [0.6, 0.8]), rng.standard_normal(3)
            S[k] = (0.015 / (1 + k / 20) * np.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2) / 0.1))[:, None] * d
        self.shape_basis = S
        # readouts: linear maps of a motion frame (56) -> scores
        W = np.zeros((MOTION_DIM, 15), np.float32)
        for j, terms in enumerate([{BROW_RAISE: 1, FROWN: .3}, {BROW_RAISE: 1}, {BROW_FURROW: 1},
                                   {SMILE: 1, OPEN_SMILE: 1}, {BROW_FURROW: 1, 10: .5}, {10: 1},
                                   {10: .5, OPEN_SMILE: .5}, {SMILE: 1, OPEN_SMILE: 1}, {11: 1}, {FROWN: 1},
                                   {LIP_PRESS: 1, FROWN: .5}, {LIP_PRESS: 1}, {LIP_PRESS: 1},
                                   {JAW_OPEN: 1, OPEN_SMILE: 1, JAW_PITCH: 2}, {JAW_OPEN: 1, JAW_PITCH: 2}]):
            for k, v in terms.items():
                W[k, j] = v
        self.au_w = W
        self.au_thr = np.array([.3, .35, .3, .4, .4, .4, .3, .25, .4, .3, .4, .3, .5, .25, .5], np.float32)
        self.emo_dims = [LIP_SPREAD, LIP_PRESS, SMILE, OPEN_SMILE, FROWN, BROW_RAISE, BROW_FURROW, 10, 11]

    def template(self, beta):
        """beta (100,) -> neutral vertices (V, 3)."""
        b = _np(beta).astype(np.float32).reshape(-1)[:BETA_DIM]
        return self.mean + np.tensordot(b, self.shape_basis[:len(b)], 1)

    def vertices(self, motion, beta=None):
        """motion (T, 56) (or (56,)), beta (100,) -> (T, V, 3) float32: blendshapes, jaw rotation, head rotation."""
        m = _np(motion).astype(np.float32)
        one = m.ndim == 1
        m = m.reshape(-1, m.shape[-1])
        tpl = self.template(np.zeros(BETA_DIM) if beta is None else beta)
        v = tpl + np.einsum("te,evc->tvc", m[:, EXP], self.exp_basis)            # (T, V, 3)
        Rj = _rodrigues(m[:, JAW].astype(np.float64))                           # (T, 3, 3)
        vj = np.einsum("tij,tvj->tvi", Rj, v - self.jaw_pivot) + self.jaw_pivot
        v = v + self.jaw_w[None, :, None] * (vj - v)
        Rh = _rodrigues(m[:, HEAD].astype(np.float64))
        v = (np.einsum("tij,tvj->tvi", Rh, v - self.neck_pivot) + self.neck_pivot).astype(np.float32)
        return _like(v[0] if one else v, motion)

    # readouts (stand-ins for EMOCA's emotion recogniser and REACT's 25 attributes)
    def valence(self, motion):
        m = _np(motion)
        e = m[..., SMILE] + 0.8 * m[..., OPEN_SMILE] - m[..., FROWN] - 0.3 * m[..., BROW_FURROW]
        return _like(np.tanh(1.5 * e).astype(np.float32), motion)

    def arousal(self, motion):
        m = _np(motion)
        a = (0.8 * m[..., BROW_RAISE] + 0.8 * m[..., OPEN_SMILE] + 0.5 * m[..., JAW_OPEN] + 0.5 * m[..., BROW_FURROW]
             + 0.3 * m[..., SMILE] - 0.2)
        return _like(np.tanh(a).astype(np.float32), motion)

    def aus(self, motion):
        return _like((np.einsum("...d,da->...a", _np(motion), self.au_w) > self.au_thr).astype(np.float32), motion)

    def emotion_probs(self, motion):
        s = _np(motion)[..., self.emo_dims]                                   # (..., 9)
        p = EMOTION_FACE[:, self.emo_dims]                                    # (8, 9): prototypes
        logits = (s @ p.T - 0.5 * (p ** 2).sum(-1)) / 0.1                     # Gaussian classifier, equal priors
        logits -= logits.max(-1, keepdims=True)
        e = np.exp(logits)
        return _like((e / e.sum(-1, keepdims=True)).astype(np.float32), motion)

    def attributes(self, motion):
        """(..., 56) -> (..., 25) = [15 AUs | valence, arousal | 8 emotion probs] (REACT order)."""
        m = _np(motion).astype(np.float32)
        out = np.concatenate([self.aus(m), self.valence(m)[..., None], self.arousal(m)[..., None],
                              self.emotion_probs(m)], -1)
        return _like(out, motion)


_FACE = {}


def _face(seed=0):
    if seed not in _FACE:
        _FACE[seed] = FaceModel(seed)
    return _FACE[seed]


# ----------------------------------------------------------------------------------------------------------------
# Pictures: animated GIFs of faces (PIL) and channel plots (matplotlib)

CHANNEL_NAMES = {JAW_OPEN: "jaw-open", LIP_SPREAD: "lip-spread", LIP_ROUND: "lip-round", LIP_PRESS: "lip-press",
                 SMILE: "smile", OPEN_SMILE: "open smile", FROWN: "frown", BROW_RAISE: "brow raise",
                 BROW_FURROW: "brow furrow", BLINK: "blink", PITCH: "head pitch", 51: "head yaw", 52: "head roll",
                 JAW_PITCH: "jaw pitch"}


def render_vertices_gif(path, vertices, titles=None, fps=FPS, size=220, max_fps=15):
    """Side-by-side animated GIF of vertex sequences [(T, V, 3)] (front view). FaceModel meshes are drawn as a
    wireframe with darker lips/eyes/brows; other meshes (e.g. real VOCASET) as points."""
    from PIL import Image, ImageDraw
    vs = [np.asarray(_np(v), np.float32).reshape(len(v), -1, 3) for v in vertices]
    titles = list(titles or [""] * len(vs))
    face, step = _face(), max(1, int(round(fps / max_fps)))
    T = min(len(v) for v in vs)
    frames = []
    boxes = []
    for v in vs:                                          # one fixed camera per panel: the sequence's bounding box
        lo, hi = v[..., :2].reshape(-1, 2).min(0), v[..., :2].reshape(-1, 2).max(0)
        boxes.append(((lo + hi) / 2, 0.8 * size / max(float((hi - lo).max()), 1e-6)))
    for t in range(0, T, step):
        im = Image.new("P", (size * len(vs), size + 18), 0)              # palette: white, dark, light, points
        im.putpalette([255, 255, 255, 40, 40, 40, 175, 185, 200, 60, 60, 60] + [0] * 756)
        d = ImageDraw.Draw(im)
        for p, (v, (c, sc)) in enumerate(zip(vs, boxes)):
            xy = (v[t, :, :2] - c) * sc * np.array([1, -1]) + np.array([p * size + size / 2, 18 + size / 2])
            if v.shape[1] == face.n_vertices:
                for idx, f in face.polylines:
                    d.line(xy[idx].ravel().tolist(), fill=1 if f else 2, width=2 if f else 1)
            else:
                for x, y in xy[:: max(1, len(xy) // 2000)]:
                    d.point((x, y), fill=3)
            d.text((p * size + 6, 3), f"{titles[p]}  {t / fps:4.1f}s", fill=1)
        frames.append(im)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=int(round(1000 * step / fps)), loop=0)
    return path


def render_gif(path, motions, betas=None, titles=None, fps=FPS):
    """Animated GIF of FaceModel faces driven by 56-d motions [(T, 56)] with identities betas [(100,)]."""
    face = _face()
    betas = betas if betas is not None else [None] * len(motions)
    return render_vertices_gif(path, [face.vertices(_np(m)[:, :MOTION_DIM], b) for m, b in zip(motions, betas)],
                               titles, fps)


def plot_channels(path, series, channels=None, fps=FPS):
    """PNG of a few motion channels over time, one panel per channel, one line per series {name: (T, D)}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    arrs = {k: np.asarray(_np(v), np.float32).reshape(len(v), -1) for k, v in series.items()}
    D = min(a.shape[1] for a in arrs.values())
    if channels is None:
        channels = ([JAW_OPEN, SMILE, OPEN_SMILE, FROWN, BROW_RAISE, BLINK, PITCH, JAW_PITCH] if D >= MOTION_DIM
                    else list(range(min(D, 6))))
    fig, axes = plt.subplots(len(channels), 1, figsize=(9, 1.4 * len(channels) + 0.6), sharex=True, squeeze=False)
    for ax, ch in zip(axes[:, 0], channels):
        for k, a in arrs.items():
            ax.plot(np.arange(len(a)) / fps, a[:, ch], lw=1, label=k)
        ax.set_ylabel(CHANNEL_NAMES.get(ch, f"ch {ch}") if D >= MOTION_DIM else f"ch {ch}", fontsize=8)
    axes[0, 0].legend(fontsize=7, loc="upper right", ncol=len(arrs))
    axes[-1, 0].set_xlabel("seconds")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# ================================================================================================================
# The synthetic world: nothing below is needed to use real data
# ================================================================================================================

# Two-person conversations with known hidden rules, written in the real layouts (segments for the listener data,
# VOCASET for talking faces) so the readers above read them like real data.
#   Speaker   8 voices. Speech = words of fixed syllable spellings (consonant + vowel), synthesised by a wavetable
#             source-filter (F0 harmonics through 3 formants, noise bursts for consonants); word end times are
#             exact. Prosody follows emotion episodes (happy: high lively F0, sad: low slow, angry: loud); stressed
#             syllables are louder, a few are suddenly very loud. The speaker's face moves its jaw/lips with the
#             syllables, shows the episode's emotion, nods on stress, blinks.
#   Listener  hidden social rules that read only the speaker's past:
#             1 back-channel nod after a pause >= 250 ms (identity probability, onset 150-400 ms, 2 Hz damped);
#             2 amusement: a humour word said by a happy, lively speaker -> smile (or open-mouth laugh with a head
#               bob) 0.3-0.6 s later; the same words said flat (sarcasm) get nothing;
#             3 contagion: listener smile/frown follows the speaker's valence 1-2 s later;
#             4 surprise: a very loud syllable -> brow raise ~200 ms later;
#             5 idle life: blinks, head sway, drift on exp 10..49;
#             6 identity style from beta: resting offset, gain, nod/smile preference, closed/open smile, lag;
#             7 synchrony: every response is timed to a speaker event.
#             Re-simulating with other seeds gives K_ALT alternative appropriate reactions (val/test).
#   Cast      8 speakers, 6 train listeners (ids 0..5), one unseen listener (id 6) only in the test split.
#   Talking   12 VOCASET subjects (8 train with style ids 0..7, 2 val, 2 test), each with a speaking style (jaw gain,
#             lip rounding, co-articulation smoothness, brow raises on stress, blinks); unposed like VOCASET's
#             training meshes (no global head rotation; the jaw still rotates).

NEUTRAL_WORDS = ("the and so we went to market then table window later maybe people today morning city train "
                 "coffee really think said about water paper number little over under yesterday week again "
                 "house car music back work story friend phone door").split()
HUMOUR_WORDS = "haha funny joke great love amazing hilarious wonderful awesome fantastic".split()
SAD_WORDS = "sorry lost alone sad tired cried missed funeral".split()
VOCAB = NEUTRAL_WORDS + HUMOUR_WORDS + SAD_WORDS
_CONS, _VOWELS = list("ptkbdgmnlrsfh") + [""], "aeiou"
_sp = np.random.default_rng(7)               # fixed spellings: each word is a list of (consonant, vowel) syllables
SPELLING = {w: [(_CONS[_sp.integers(len(_CONS))], _VOWELS[_sp.integers(5)])
                for _ in range(1 + (len(w) > 4) + (len(w) > 7))] for w in VOCAB}
SPELLING["haha"] = [("h", "a"), ("h", "a")]

# emotion -> valence felt by the listener, prosody (F0 x, F0 variability, rate x, loud x)
EMOTION_VALENCE = np.array([0, 1.0, -0.9, 0.2, -0.4, -0.5, -0.6, -0.2], np.float32)
PROSODY = np.array([[1.0, .07, 1.0, 1.0], [1.18, .16, .9, 1.15], [.85, .03, 1.3, .65], [1.2, .12, .95, 1.2],
                    [1.1, .08, .9, .9], [.95, .05, 1.05, .95], [1.05, .1, .9, 1.6], [.97, .04, 1.1, .9]], np.float32)


def _smooth(x, sigma):
    """Gaussian smoothing along axis 0 (edge padded, by FFT). x (T, ...) -> (T, ...); sigma in frames."""
    if sigma <= 0.3:
        return np.asarray(x, np.float32)
    r = int(3 * sigma) + 1
    xp = np.pad(np.asarray(x, np.float32), [(r, r)] + [(0, 0)] * (np.ndim(x) - 1), mode="edge")
    H = np.exp(-2 * (np.pi * np.fft.rfftfreq(len(xp)) * sigma) ** 2)  # Fourier transform of the Gaussian
    y = np.fft.irfft(np.fft.rfft(xp, axis=0) * H.reshape((-1,) + (1,) * (xp.ndim - 1)), n=len(xp), axis=0)
    return y[r:r + len(x)].astype(np.float32)


def _smooth_noise(rng, shape, sigma):
    """Smooth Gaussian noise of unit std per channel, correlation time ~sigma frames."""
    n = _smooth(rng.standard_normal(shape), sigma)
    return n / max(float(n.std()), 1e-6)


def _add(dst, t0, dur, fn):
    """dst[(T,) or (T, C)] += fn(tau) for frames at times t0 <= t < t0 + dur (tau = t - t0, seconds)."""
    i0, i1 = max(int(np.ceil(t0 * FPS)), 0), min(int(np.ceil((t0 + dur) * FPS)), len(dst))
    if i1 > i0:
        v = fn(np.arange(i0, i1) / FPS - t0)
        dst[i0:i1] += v if dst.ndim == 1 or np.ndim(v) == 2 else v[:, None]


def _env(attack, hold, release):
    """Attack-hold-release envelope (smooth), as a function of tau."""
    def f(tau):
        up = np.clip(tau / attack, 0, 1)
        down = np.clip(1 - (tau - attack - hold) / release, 0, 1)
        return (np.sin(0.5 * np.pi * np.minimum(up, down)) ** 2).astype(np.float32)
    return f, attack + hold + release


# ----------------------------------------------------------------------------------------------------------------
# Speech: a wavetable source-filter synthesiser, and the face that says it

_FORMANTS = {"a": (730, 1090, 2440), "e": (530, 1840, 2480), "i": (270, 2290, 3010), "o": (570, 840, 2410),
             "u": (300, 870, 2240), "m": (250, 1200, 2300), "l": (360, 1300, 2700)}
_CLASSES = list(_FORMANTS)
_F0_BINS = np.geomspace(70, 420, 32)
_TABLE = None
OPENNESS = {"a": 1.0, "o": 0.7, "e": 0.5, "u": 0.3, "i": 0.25}


def _wavetable(P=256):
    """One pitch period per (voice class, F0 bin): harmonics weighted by 3 formant resonances. (7, 32, P)."""
    global _TABLE
    if _TABLE is None:
        th = np.arange(P) / P
        T = np.zeros((len(_CLASSES), len(_F0_BINS), P), np.float32)
        for c, F in enumerate(_FORMANTS.values()):
            for b, f0 in enumerate(_F0_BINS):
                h = np.arange(1, int(4000 / f0) + 1)
                amp = sum(g / (1 + ((h * f0 - Fk) / bw) ** 2) for Fk, bw, g in zip(F, (90, 110, 160), (1, .6, .3)))
                w = (amp / np.sqrt(h)) @ np.cos(2 * np.pi * h[:, None] * th[None])
                T[c, b] = w / np.sqrt((w ** 2).mean())
        _TABLE = T
    return _TABLE


def _speak(rng, next_word, voice, emotion_at, t_start=0.3, duration=10.0, loud_p=0.03):
    """Lay out phrases of words (next_word(t) -> word) and return syllables
    [(t0, t_vowel, t1, cons, vowel, stressed, loud, word_i, emotion, flat)], word ends [(text, end_s)] and
    pause starts [s] (pauses >= 0.25 s). emotion_at(t) -> (emotion, flat)."""
    sylls, ends, pauses, t, wi = [], [], [], t_start, 0
    while t < duration - 1.0:
        for _ in range(rng.integers(2, 8)):
            if t > duration - 1.0:
                break
            e, flat = emotion_at(t)
            word = next_word(t)
            f0m, f0v, ratem, loudm = PROSODY[e] if not flat else (1.0, 0.02, 1.05, 0.85)
            for si, (c, v) in enumerate(SPELLING[word]):
                d = 0.17 * voice["rate"] * ratem * rng.uniform(0.85, 1.15)
                stressed = si == 0 and rng.random() < 0.35
                loud = rng.random() < (loud_p * (3 if e in (3, 6) and not flat else 1))
                cd = 0.0 if c == "" else (0.05 if c in "ptkbdg" else 0.07)
                sylls.append((t, t + cd, t + d, c, v, stressed, loud, wi, e, flat))
                t += d
            ends.append((word, round(float(t), 4)))
            wi += 1
            t += rng.uniform(0.02, 0.1)
        pause = rng.uniform(0.15, 1.2)
        if pause >= 0.25:
            pauses.append(t)
        t += pause
    return sylls, ends, pauses


def _synth(rng, sylls, voice, n_samples):
    """Syllables -> waveform (n_samples,) float32 at SR. Vectorised wavetable lookup; consonants as noise."""
    tab = _wavetable()
    C, NB, P = tab.shape
    kt, kf, ka = [0.0], [voice["f0"]], [0.0]                              # knots: time, F0, voiced amplitude
    cls = np.zeros(n_samples, np.int64)
    noise = np.zeros(n_samples, np.float32)
    for (t0, tv, t1, c, v, stressed, loud, wi, e, flat) in sylls:
        f0m, f0v, ratem, loudm = PROSODY[e] if not flat else (1.0, 0.02, 1.05, 0.85)
        f0 = voice["f0"] * f0m * np.exp(f0v * rng.standard_normal()) * (1.12 if stressed else 1.0)
        A = voice["loud"] * loudm * (1.5 if stressed else 1.0) * (3.0 if loud else 1.0)
        voiced_c = c in "mnlr"
        ta = tv if not voiced_c else t0
        kt += [t0, ta + 0.015, t1 - 0.03, t1]
        kf += [f0, f0, f0 * (0.97 if f0v < 0.05 else 0.92), f0 * 0.95]
        ka += [0.0, A, A * 0.8, 0.0]
        s0, sv, s1 = (min(int(x * SR), n_samples) for x in (t0, tv, t1))
        cls[sv:s1] = _CLASSES.index(v)
        if voiced_c:
            cls[s0:sv] = _CLASSES.index("m" if c in "mn" else "l")
        elif c and sv > s0:
            nz = rng.standard_normal(sv - s0).astype(np.float32)
            if c == "s":
                nz = np.diff(nz, prepend=0) * 0.6
            amp = {"p": .5, "t": .5, "k": .5, "b": .25, "d": .25, "g": .25, "s": .35, "f": .2, "h": .25}[c]
            burst = 0.015 if c in "ptkbdg" else sv - s0
            noise[s0:sv] = nz * amp * A * np.exp(-np.arange(sv - s0) / SR / burst * (1 if c in "ptkbdg" else 0.2))
    ts = np.arange(n_samples) / SR
    order = np.argsort(kt, kind="stable")
    kt, kf, ka = np.array(kt)[order], np.array(kf)[order], np.array(ka)[order]
    f0 = np.interp(ts, kt, kf).astype(np.float32)
    amp = np.interp(ts, kt, ka).astype(np.float32)
    phase = (np.cumsum(f0 / np.float64(SR)) % 1.0 * P).astype(np.int64) % P
    fb = np.log(f0[::64] / _F0_BINS[0]) / np.log(_F0_BINS[1] / _F0_BINS[0])   # F0 bin, at a 250 Hz control rate
    fb = np.repeat(np.clip(np.round(fb), 0, NB - 1).astype(np.int64), 64)[:n_samples]
    wave = tab.reshape(-1)[(cls * NB + fb) * P + phase] * amp * 0.1 + noise * 0.1
    return wave.astype(np.float32)


def _speaker_face(rng, sylls, T, style, emo_frames=None, flat_frames=None, noise=True):
    """The speaker's own face (T, 56): lips/jaw follow syllables, emotion on the face, stress nods, blinks, idle
    (noise=False: without the blinks and idle sway/drift, the parts no speech input can predict)."""
    jaw, spread, rnd, press, stress = (np.zeros(T, np.float32) for _ in range(5))
    for (t0, tv, t1, c, v, stressed, loud, wi, e, flat) in sylls:
        i0, iv, i1 = (min(int(round(x * FPS)), T) for x in (t0, tv, t1))
        A = (1.3 if stressed else 1.0) * (1.6 if loud else 1.0)
        jaw[iv:i1] = OPENNESS[v] * A
        spread[iv:i1] = {"i": 0.8, "e": 0.5}.get(v, 0.0)
        rnd[iv:i1] = {"u": 0.9, "o": 0.6}.get(v, 0.0)
        if c in "mbp":
            press[i0:max(iv, i0 + 1)] = 1.0
        if stressed or loud:
            stress[min(i0, T - 1)] += 1.0 + loud
    co = style.get("coart", 1.5)
    m = np.zeros((T, MOTION_DIM), np.float32)
    jaw = _smooth(jaw, co)
    m[:, JAW_OPEN] = 0.6 * style.get("jaw", 1.0) * jaw
    m[:, JAW_PITCH] = 0.12 * style.get("jaw", 1.0) * jaw
    m[:, LIP_SPREAD] = 0.5 * _smooth(spread, co)
    m[:, LIP_ROUND] = 0.7 * style.get("round", 1.0) * _smooth(rnd, co)
    m[:, LIP_PRESS] = 0.9 * _smooth(press, max(co - 0.5, 0.5))
    if emo_frames is not None:                                             # the episode's emotion on the face
        face = EMOTION_FACE[emo_frames] * (~flat_frames)[:, None]
        m[:, EXP] += _smooth(face * style.get("intensity", 1.0), 8)
    k = np.exp(-0.5 * ((np.arange(-12, 13)) / 3.0) ** 2)                  # stress -> head nod + brow
    m[:, PITCH] += 0.05 * np.convolve(stress, k, "same")
    m[:, BROW_RAISE] += style.get("brow", 0.3) * np.convolve(stress, k, "same")
    if not noise:
        return m
    for t in np.cumsum(rng.uniform(2, 6, size=int(T / FPS / 2) + 2)):
        _add(m[:, BLINK], t, 0.25, lambda tau: np.sin(np.pi * tau / 0.25) ** 2)
    m[:, HEAD] += 0.03 * _smooth_noise(rng, (T, 3), 30)
    m[:, 10:EXP_DIM] += 0.04 * _smooth_noise(rng, (T, 40), 40)
    return m


# ----------------------------------------------------------------------------------------------------------------
# The hidden rules: speaker events -> listener motion

def _fixed_maps():
    r = np.random.default_rng(12345)                                      # fixed across worlds: style = f(beta)
    return r.standard_normal((6, 8)) / np.sqrt(8), r.standard_normal((MOTION_DIM, 8)) / np.sqrt(8)


def listener_style(beta):
    """Identity style from beta[:8] through fixed maps (so AdaIN(beta) can generalise to unseen identities)."""
    M, O = _fixed_maps()
    z = np.tanh(M @ np.asarray(beta, np.float64)[:8])
    off = O @ np.asarray(beta, np.float64)[:8]
    scale = np.r_[np.full(10, 0.08), np.full(40, 0.12), np.full(3, 0.04), np.zeros(3)]
    scale[BLINK] = 0.0
    return {"gain": 1 + 0.4 * z[0], "p_nod": 0.55 + 0.35 * z[1], "p_smile": 0.75 + 0.22 * z[2],
            "open_smile": bool(z[3] > 0), "lag": 1.5 + 0.5 * z[4], "idle": 1 + 0.3 * z[5],
            "offset": (off * scale).astype(np.float32)}


def _cast(seed):
    rng = np.random.default_rng([seed, 1])
    speakers = [{"beta": (0.8 * rng.standard_normal(BETA_DIM)).astype(np.float32),
                 "f0": float(rng.uniform(95, 130) if i % 2 else rng.uniform(175, 230)),
                 "rate": float(rng.uniform(0.85, 1.15)), "loud": float(rng.uniform(0.8, 1.2))} for i in range(8)]
    listeners = [(0.8 * rng.standard_normal(BETA_DIM)).astype(np.float32) for _ in range(7)]
    return speakers, listeners


def _conversation(rng, speaker, duration):
    """Speaker side of one conversation: wave, face (T, 56), words, and the events the listener reacts to."""
    T = int(round(duration * FPS))
    episodes, t = [], 0.0                                                 # (start, emotion, flat)
    while t < duration:
        e = int(rng.choice(8, p=[.26, .26, .1, .08, .06, .06, .1, .08]))
        episodes.append((t, e, e in (0, 7) and rng.random() < 0.5))      # flat: neutral/contempt said flatly
        t += rng.uniform(6, 14)
    starts = np.array([ep[0] for ep in episodes])
    emotion_at = lambda s: episodes[int(np.searchsorted(starts, s, "right") - 1)][1:]
    wrng = np.random.default_rng(rng.integers(2 ** 32))

    def next_word(t):                                                      # vocabulary follows the episode
        e, flat = emotion_at(t)
        p_h = 0.3 if e == 1 else (0.2 if e in (0, 7) and flat else 0.05)
        p_s = 0.35 if e == 2 else 0.03
        u = wrng.random()
        pool = HUMOUR_WORDS if u < p_h else SAD_WORDS if u < p_h + p_s else NEUTRAL_WORDS
        return pool[wrng.integers(len(pool))]
    sylls, ends, pauses = _speak(rng, next_word, speaker, emotion_at, duration=duration)
    fr = (np.arange(T) / FPS)
    ep_idx = np.searchsorted(starts, fr, "right") - 1
    emo = np.array([episodes[i][1] for i in ep_idx])
    flat = np.array([episodes[i][2] for i in ep_idx])
    face = _speaker_face(rng, sylls, T, {"intensity": rng.uniform(0.8, 1.2)}, emo, flat)
    wave = _synth(rng, sylls, speaker, int(round(duration * SR)))
    amused = [end for w, end in ends if w in HUMOUR_WORDS and emotion_at(end - 0.05) == (1, False)]
    loud = [s[0] for s in sylls if s[6]]
    valence = np.where(flat, 0.0, EMOTION_VALENCE[emo]).astype(np.float32)
    return {"T": T, "wave": wave, "face": face, "words": ends, "pauses": pauses, "amused": amused,
            "loud": loud, "valence": valence, "emotion": emo, "flat": flat,
            "sarcastic": [end for w, end in ends if w in HUMOUR_WORDS and end not in amused]}


def _listener(rng, ev, style):
    """The hidden social rules (numbered as at the top of this section): speaker events -> listener motion (T, 56)."""
    T, g = ev["T"], style["gain"]
    m = np.zeros((T, MOTION_DIM), np.float32)
    for p in ev["pauses"]:                                                # 1 back-channel nods
        if rng.random() < style["p_nod"]:
            a, n = g * rng.uniform(0.08, 0.15), rng.uniform(1.0, 1.6)
            _add(m[:, PITCH], p + rng.uniform(0.15, 0.4), n,
                 lambda tau: a * np.sin(2 * np.pi * 2.0 * tau) * np.exp(-tau / 0.35))
    for w in ev["amused"]:                                                # 2 amusement (only when amused)
        if rng.random() < style["p_smile"]:
            f, dur = _env(0.25, rng.uniform(0.8, 2.0), 0.6)
            a, t0 = g * rng.uniform(0.7, 1.1), w + rng.uniform(0.3, 0.6)
            if style["open_smile"]:
                _add(m[:, OPEN_SMILE], t0, dur, lambda tau: a * f(tau))
                _add(m[:, JAW_PITCH], t0, dur, lambda tau: 0.06 * a * f(tau))
                _add(m[:, PITCH], t0, dur, lambda tau: 0.03 * a * f(tau) * np.sin(2 * np.pi * 4 * tau))
            else:
                _add(m[:, SMILE], t0, dur, lambda tau: a * f(tau))
    lag = int(round((style["lag"] + rng.uniform(-0.2, 0.2)) * FPS))       # 3 contagion (causal: lag >= 1 s)
    v = np.r_[np.zeros(lag, np.float32), ev["valence"][:T - lag]]
    v = _smooth(v, 9) * g * rng.uniform(0.8, 1.2)
    m[:, SMILE] += 0.45 * np.maximum(v, 0)
    m[:, FROWN] += 0.45 * np.maximum(-v, 0)
    m[:, BROW_FURROW] += 0.15 * np.maximum(-v, 0)
    for s in ev["loud"]:                                                  # 4 surprise
        f, dur = _env(0.1, 0.2, 0.4)
        a = g * rng.uniform(0.6, 1.0)
        _add(m[:, BROW_RAISE], s + rng.uniform(0.15, 0.25), dur, lambda tau: a * f(tau))
        _add(m[:, PITCH], s + 0.2, dur, lambda tau: -0.03 * a * f(tau))
    for t in np.cumsum(rng.uniform(2, 6, size=int(T / FPS / 2) + 2)):     # 5 idle life
        _add(m[:, BLINK], t, 0.2, lambda tau: np.sin(np.pi * tau / 0.2) ** 2)
    idle = style["idle"]
    m[:, HEAD] += 0.025 * idle * _smooth_noise(rng, (T, 3), 30)
    m[:, 10:EXP_DIM] += 0.05 * idle * _smooth_noise(rng, (T, 40), 45)
    m[:, :9] += 0.03 * idle * _smooth_noise(rng, (T, 9), 9)
    for k in (SMILE, OPEN_SMILE, BROW_RAISE):                             # overlapping responses saturate
        m[:, k] = 1.3 * np.tanh(m[:, k] / 1.3)
    return m + style["offset"]                                           # 6 identity offset


# ----------------------------------------------------------------------------------------------------------------
# Writers and generate_world

PRESETS = {  # conversations per split, conversation seconds, train stride s; talking: sentences, seconds
    "default": {"n": {"train": 60, "val": 8, "test": 24}, "dur": 48.0, "stride": 2.0, "sent": None,
                "sent_dur": (1.5, 2.6)},
    "tiny": {"n": {"train": 3, "val": 1, "test": 2}, "dur": 16.0, "stride": 2.0, "sent": 2,
             "sent_dur": (1.2, 1.8)},
}


def _write_listener(out, cfg, seed):
    face, (speakers, listeners) = _face(), _cast(seed)
    (out / "wav").mkdir(parents=True)
    counts, stats_frames, sp_frames = {}, [], []
    for si, split in enumerate(("train", "val", "test")):
        segs = []
        for c in range(cfg["n"][split]):
            rng = np.random.default_rng([seed, 2, si, c])
            spk = int(rng.integers(8))
            lid = 6 if split == "test" and c % 3 == 1 else int(rng.integers(6))  # unseen listener: test only
            style = listener_style(listeners[lid])
            ev = _conversation(rng, speakers[spk], cfg["dur"])
            sim_seed = rng.integers(2 ** 32)
            L = _listener(np.random.default_rng(sim_seed), ev, style)
            fname = f"{split}_{c:03d}_s{spk}_l{lid}"
            write_wav(out / "wav" / f"{fname}.wav", ev["wave"])
            lexp, lpose, sexp, spose = (torch.from_numpy(np.ascontiguousarray(x)) for x in
                                        (L[:, EXP], L[:, POSE], ev["face"][:, EXP], ev["face"][:, POSE]))
            la, sa = torch.from_numpy(face.attributes(L)), torch.from_numpy(face.attributes(ev["face"]))
            lb, sb = torch.from_numpy(listeners[lid])[None], torch.from_numpy(speakers[spk]["beta"])[None]
            alt = None
            if split != "train":
                alt = torch.from_numpy(np.stack([_listener(np.random.default_rng([sim_seed, k + 1]), ev, style)
                                                 for k in range(K_ALT)])).half()    # (K, Tc, 56)
            if split == "train":
                stats_frames.append(L)
                sp_frames.append(ev["face"])
            stride = int(cfg["stride"] * FPS) if split == "train" else SEGMENT_FRAMES
            for s in range(0, ev["T"] - SEGMENT_FRAMES + 1, stride):
                e = s + SEGMENT_FRAMES
                t0, t1 = s / FPS, e / FPS
                seg = {"fname": fname, "split_start_frame": s, "split_end_frame": e,
                       "p0_exp": lexp[s:e], "p0_pose": lpose[s:e], "p0_shape": lb, "p0_attr": la[s:e],
                       "p1_exp": sexp[s:e], "p1_pose": spose[s:e], "p1_shape": sb, "p1_attr": sa[s:e],
                       "listener_id": lid, "speaker_id": spk,
                       "before_words": [{"text": w, "end": x} for w, x in ev["words"] if t0 - 3.0 <= x < t0],
                       "during_words": [{"text": w, "end": x} for w, x in ev["words"] if t0 <= x < t1]}
                if alt is not None:
                    seg["alt_listener"] = alt[:, s:e]
                segs.append(seg)
        torch.save(segs, out / f"segments_{split}.pth")
        counts[split] = len(segs)
    L = np.concatenate(stats_frames)
    S = np.concatenate(sp_frames)
    np.save(out / "mean.npy", L.mean(0).astype(np.float32))
    np.save(out / "std.npy", np.maximum(L.std(0), 1e-3).astype(np.float32))
    np.save(out / "speaker_mean.npy", S.mean(0).astype(np.float32))
    np.save(out / "speaker_std.npy", np.maximum(S.std(0), 1e-3).astype(np.float32))
    return counts


def talking_styles(seed=0):
    """Per-subject speaking styles (train subjects are style ids 0..7)."""
    rng = np.random.default_rng([seed, 3])
    subjects = TRAIN_SUBJECTS + VAL_SUBJECTS + TEST_SUBJECTS
    return {s: {"jaw": float(rng.uniform(0.6, 1.4)), "round": float(rng.uniform(0.5, 1.5)),
                "coart": float(rng.uniform(0.8, 3.0)), "brow": float(rng.uniform(0.0, 0.8)),
                "beta": (0.8 * rng.standard_normal(BETA_DIM)).astype(np.float32),
                "voice": {"f0": float(rng.uniform(95, 230)), "rate": float(rng.uniform(0.85, 1.15)),
                          "loud": float(rng.uniform(0.8, 1.2))}} for s in subjects}


def _talking_sentence(subj, st, k, cfg, seed):
    """The syllables of sentence k of a subject: (rng positioned for _synth then _speaker_face, sylls, seconds)."""
    rng = np.random.default_rng([seed, 4, TRAIN_SUBJECTS.index(subj) if subj in TRAIN_SUBJECTS else 99, k,
                                 len(subj), sum(map(ord, subj))])
    dur = rng.uniform(*cfg["sent_dur"])
    sylls, _, _ = _speak(rng, lambda t: NEUTRAL_WORDS[rng.integers(len(NEUTRAL_WORDS))], st["voice"],
                         lambda t: (0, False), t_start=0.25, duration=dur + 0.7, loud_p=0.0)
    return rng, sylls, dur


def talking_references(path, name):
    """Synthetic world only: reference faces for the talking clip `name` ("<subject>_sentence<k>") from the hidden
    rules. -> {"alt": (T, V, 3) the same speech and style with another seed for the unpredictable parts (blinks,
    expression drift): what a perfect sampler scores; "speech_only": the speech-driven part alone (no blinks or
    drift) with the subject's true style: near the best an L2 predictor can do; "train_styles": (8, T, V, 3) the
    speech-driven part under each training style (ids 0..7) on this subject's template: a perfect style-conditioned
    model under the protocol that averages over the training styles}. None on real data."""
    path = Path(path)
    root = path.parent if (path / "wav").is_dir() else path
    meta_f = root / "meta.json"
    if not meta_f.exists():
        return None
    meta = json.loads(meta_f.read_text())
    if "seed" not in meta or meta.get("version") != VERSION:
        return None
    subj, k = re.fullmatch(r"(.+)_sentence(\d+)", name).groups()
    cfg, styles = PRESETS[meta["preset"]], talking_styles(meta["seed"])
    st = styles[subj]
    rng, sylls, dur = _talking_sentence(subj, st, int(k), cfg, meta["seed"])
    face, T = _face(), int(round(dur * FPS))
    alt = unposed(_speaker_face(np.random.default_rng([meta["seed"], 5, int(k), sum(map(ord, subj))]), sylls, T, st))
    quiet = [unposed(_speaker_face(None, sylls, T, s, noise=False)) for s in [st] + [styles[x] for x in TRAIN_SUBJECTS]]
    return {"alt": face.vertices(alt, st["beta"]), "speech_only": face.vertices(quiet[0], st["beta"]),
            "train_styles": np.stack([face.vertices(q, st["beta"]) for q in quiet[1:]])}


def unposed(m):
    """Remove the global head rotation (T, 56) -> (T, 56), as VOCASET's released training meshes are unposed; the
    jaw rotation stays. Kept, a random head sway would be most of a speech-only predictor's lip error."""
    m = m.copy()
    m[:, HEAD] = 0.0
    return m


def _write_vocaset(out, cfg, seed):
    face, styles = _face(), talking_styles(seed)
    (out / "wav").mkdir(parents=True)
    (out / "vertices_npy").mkdir()
    n = 0
    for subj, st in styles.items():
        split = "train" if subj in TRAIN_SUBJECTS else "val" if subj in VAL_SUBJECTS else "test"
        sents = list(SENTENCES[split])[:cfg["sent"]] if cfg["sent"] else SENTENCES[split]
        for k in sents:
            rng, sylls, dur = _talking_sentence(subj, st, k, cfg, seed)
            T = int(round(dur * FPS))
            wave = _synth(rng, sylls, st["voice"], int(round(dur * SR)))
            m = unposed(_speaker_face(rng, sylls, T, st))
            v = face.vertices(m, st["beta"]).reshape(T, -1)
            write_wav(out / "wav" / f"{subj}_sentence{k:02d}.wav", wave)
            np.save(out / "vertices_npy" / f"{subj}_sentence{k:02d}.npy", v.astype(np.float32))
            n += 1
    with open(out / "templates.pkl", "wb") as f:
        pickle.dump({s: face.template(st["beta"]) for s, st in styles.items()}, f)
    np.savez(out / "regions.npz", lip_idx=face.lip_idx, upper_idx=face.upper_face_idx)
    json.dump({"fps": FPS}, open(out / "meta.json", "w"))
    return n


def write_wav(path, wave, sr=SR):
    """Write a mono 16-bit PCM RIFF/WAVE file (a plain writer: much faster than a soundfile round trip)."""
    pcm = np.clip(np.round(np.asarray(wave, np.float64) * 32768), -32768, 32767).astype("<i2").tobytes()
    head = (b"RIFF" + (36 + len(pcm)).to_bytes(4, "little") + b"WAVEfmt " + (16).to_bytes(4, "little")
            + (1).to_bytes(2, "little") + (1).to_bytes(2, "little") + sr.to_bytes(4, "little")
            + (2 * sr).to_bytes(4, "little") + (2).to_bytes(2, "little") + (16).to_bytes(2, "little")
            + b"data" + len(pcm).to_bytes(4, "little"))
    with open(path, "wb") as f:
        f.write(head + pcm)


def _du(path):
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def generate_world(root=None, preset="default", seed=0, force=False):
    """Make (or reuse) the synthetic world under root (default DATA_ROOT/"world", or DATA_ROOT/"tiny" for preset
    "tiny" / "smoke"): root/listener/ in the segments layout (segments_{train,val,test}.pth, mean.npy, std.npy,
    speaker_mean.npy, speaker_std.npy, wav/) and root/vocaset/ in the VOCASET layout (+ regions.npz). Written to a
    temporary folder and renamed (atomic); reused while its meta.json matches preset, seed and VERSION."""
    preset = "tiny" if preset in ("tiny", "smoke") else "default"
    root = Path(root) if root else DATA_ROOT / ("tiny" if preset == "tiny" else "world")
    want = {"preset": preset, "seed": seed, "version": VERSION}
    meta_f = root / "meta.json"
    if meta_f.exists() and not force:
        meta = json.loads(meta_f.read_text())
        if all(meta.get(k) == v for k, v in want.items()):
            return root
    t0 = time.time()
    cfg = PRESETS[preset]
    print(f"data.py: generating the {preset} synthetic world (seed {seed}) in {root} ...", flush=True)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        counts = _write_listener(tmp / "listener", cfg, seed)
        n_sent = _write_vocaset(tmp / "vocaset", cfg, seed)
        info = dict(want, segments=counts, sentences=n_sent, seconds=round(time.time() - t0, 2),
                    mb=round(_du(tmp) / 2 ** 20, 1))
        (tmp / "meta.json").write_text(json.dumps(info, indent=1))
        if root.exists():                                                 # stale/other world, or a racing writer
            if (root / "meta.json").exists() and not force and all(
                    json.loads((root / "meta.json").read_text()).get(k) == v for k, v in want.items()):
                shutil.rmtree(tmp, ignore_errors=True)
                return root
            old = root.parent / f".{root.name}.old-{uuid.uuid4().hex[:6]}"
            os.rename(root, old)
            shutil.rmtree(old, ignore_errors=True)
        os.rename(tmp, root)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if meta_f.exists():                                               # another process won the race
            return root
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"data.py: made {counts['train']}/{counts['val']}/{counts['test']} train/val/test listener segments "
          f"and {n_sent} talking-face sentences, {info['mb']} MB, in {time.time() - t0:.1f} s -> {root}", flush=True)
    return root


# ----------------------------------------------------------------------------------------------------------------
# The twins: the world re-cast as each paper's dataset, with each cue in one stream and a ledger of the rules' events
#   trevor    LM-Listener segments: ONE listener identity, many guests, guests disjoint across train / val / test.
#   realtalk  segments: many listener identities (train ids 0.., unseen ids only in test, held-out conversations of
#             seen listeners in test too); test segments carry swap_listener (S, T, 56): the same events and timing
#             answered by S other identities (swap_beta (S, 100), swap_ids) -- an identity-swapped ground truth.
#   react     REACT 2024 layout: sessions of two people taking turns (each the speaker once, the listener once);
#             sessions of a script group share their event script (other voices, jittered timings) and are each
#             other's appropriate neighbours (Approprirate_facial_reaction.npy, neighbour_emotion_<split>.npy).
#   vocaset   the world's VOCASET folder.
# Cues: half the speakers keep a neutral face (the voice carries the mood); sarcasm (humour words said flat) comes
# with a smiling face; laughs are heard and not seen; loud syllables leave no mark on the face; silent smiles of
# the speaker in pauses are seen and not heard. rules_ledger.json beside the data lists, per conversation, the
# events the hidden rules answer (seconds from the video start): pause, amused, laugh, smile_seen, loud,
# valence [t, change], and the non-event sarcasm. Readers ignore it; load_ledger(path, items) cuts it per item.

TWINS = ("trevor", "realtalk", "react", "vocaset")
TWIN_VERSION = 1
TWIN_SIZES = {  # seconds per conversation; trevor guests per split, conversations per guest (realtalk: per train or
    # unseen identity); realtalk identities (train, unseen) and conversations (val, held-out); react script groups
    "default": {"dur": 24.0, "guests": {"train": 24, "val": 4, "test": 8}, "per_guest": 2,
                "realtalk": {"train": 48, "val": 4, "unseen": 12, "heldout": 8}, "react_dur": 30.0,
                "react_groups": {"train": 4, "val": 1, "test": 1}},
    "tiny": {"dur": 12.0, "guests": {"train": 2, "val": 1, "test": 2}, "per_guest": 1,
             "realtalk": {"train": 3, "val": 1, "unseen": 1, "heldout": 1}, "react_dur": 10.0,
             "react_groups": {"train": 1, "val": 1, "test": 1}},
}
REACT_GROUP, N_SWAP = 3, 4                    # sessions per react script group; identities in a swapped GT
LEDGER, LEDGER_HORIZON = "rules_ledger.json", (1.7, 3.6)   # answer windows: every rule, and contagion
LEDGER_BEFORE = 5.0                           # load_ledger keeps the events of this many seconds before an item


def _twin_beta(rng):
    """An identity's shape: like FLAME's PCA coefficients, the first components vary most (the 8 that set the style
    fully, the others at a tenth), so that a linear map fitted on ~48 identities finds the style's directions."""
    return (0.8 * rng.standard_normal(BETA_DIM) * np.where(np.arange(BETA_DIM) < 8, 1.0, 0.1)).astype(np.float32)


def _voice(rng):
    return {"beta": _twin_beta(rng), "f0": float(
        rng.uniform(95, 130) if rng.random() < 0.5 else rng.uniform(175, 230)), "rate": float(rng.uniform(0.85, 1.15)),
            "loud": float(rng.uniform(0.8, 1.2)), "face_neutral": bool(rng.random() < 0.5)}


def twin_style(beta):
    """listener_style(beta) with its preferences as gains: every event is answered, by how much is the identity's."""
    st = listener_style(beta)
    return dict(st, nod=0.7 + 0.55 * st["p_nod"], smile=0.7 + 0.4 * st["p_smile"])


def _twin_conversation(rng, speaker, duration, script, keep=None):
    """Speaker side of one twin conversation (as _conversation), each cue in one stream. script: seed of the content
    (episodes, words); rng: timing, voice, face. keep(t) -> bool: the speaker's turns (react), None = always."""
    T, srng = int(round(duration * FPS)), np.random.default_rng(script)
    keep = keep or (lambda t: True)
    episodes, t = [], 0.0
    while t < duration:
        e = int(srng.choice(8, p=[.26, .26, .1, .08, .06, .06, .1, .08]))
        episodes.append((t, e, e in (0, 7) and srng.random() < 0.5))
        t += srng.uniform(5, 10)
    starts = np.array([ep[0] for ep in episodes])
    emotion_at = lambda s: episodes[int(np.searchsorted(starts, s, "right") - 1)][1:]
    wrng = np.random.default_rng(srng.integers(2 ** 32))

    def next_word(t):                            # humour words only lively (happy) or flat (sarcasm)
        e, flat = emotion_at(t)
        p_h, p_s = (0.3 if e == 1 else 0.25 if flat else 0.0), (0.35 if e == 2 else 0.03)
        u = wrng.random()
        pool = HUMOUR_WORDS if u < p_h else SAD_WORDS if u < p_h + p_s else NEUTRAL_WORDS
        return pool[wrng.integers(len(pool))]
    sylls, ends, pauses = _speak(rng, next_word, speaker, emotion_at, duration=duration, loud_p=0.02)
    starts_s = np.array([s[0] for s in sylls] + [duration])
    laugh, seen = [], []
    for p in pauses:                             # heard laughs in happy pauses, seen silent smiles in others
        gap, (e, flat), u = starts_s[np.searchsorted(starts_s, p)] - p, emotion_at(p), rng.random()
        if e == 1 and not flat and gap >= 0.7 and u < 0.9:
            laugh.append(round(p + 0.08, 4))
            sylls += [(p + 0.08 + 0.14 * k, p + 0.1 + 0.14 * k, p + 0.2 + 0.14 * k, "h", "a", True, False, -1, 1,
                       False) for k in range(3)]
        elif not flat and gap >= 0.6 and u > 0.75:
            seen.append(round(p + 0.05, 4))
    sylls = sorted((s for s in sylls if keep(s[0]) and keep(s[2])), key=lambda s: s[0])
    fr = np.arange(T) / FPS
    on = np.array([keep(x) for x in fr])
    ep_idx = np.searchsorted(starts, fr, "right") - 1
    emo, flat = np.array([episodes[i][1] for i in ep_idx]), np.array([episodes[i][2] for i in ep_idx])
    face_emo = np.where(flat, 1, emo)                                     # sarcasm: a smiling face, a flat voice
    hide = (~on) | bool(speaker["face_neutral"])                         # face-neutral speakers: the voice carries it
    face_sylls = [s[:6] + (False,) + s[7:] for s in sylls if s[7] >= 0]   # laughs unseen, loud syllables unmarked
    face = _speaker_face(rng, face_sylls, T, {"intensity": rng.uniform(0.8, 1.2)}, face_emo, hide)
    for t in (x for x in seen if keep(x)):
        f, dur = _env(0.2, 0.5, 0.3)
        _add(face[:, SMILE], t, dur, lambda tau: 0.8 * f(tau))
    wave = _synth(rng, sylls, speaker, int(round(duration * SR)))
    words = [(w, end) for w, end in ends if keep(end)]
    valence = np.where(flat | ~on, 0.0, EMOTION_VALENCE[emo]).astype(np.float32)
    dv = np.diff(valence, prepend=valence[0])
    shifts = [[round(i / FPS, 4), round(float(dv[i]), 3)] for i in np.flatnonzero(np.abs(dv) >= 0.5)]
    humour = [end for w, end in words if w in HUMOUR_WORDS]
    amused = [end for end in humour if emotion_at(end - 0.05) == (1, False)]
    return {"T": T, "wave": wave, "face": face, "words": words, "pauses": [p for p in pauses if keep(p)],
            "amused": amused, "sarcastic": [end for end in humour if emotion_at(end - 0.05)[1]],
            "laugh": [x for x in laugh if keep(x)], "smile_seen": [x for x in seen if keep(x)],
            "loud": [s[0] for s in sylls if s[6]], "valence": valence, "shifts": shifts, "on": on}


def _twin_listener(rng, ev, style):
    """The hidden rules of the twins (as _listener; every event answered, the same random draws whatever the style,
    so that another style re-renders the same responses with the same timing)."""
    T, g = ev["T"], style["gain"]
    m = np.zeros((T, MOTION_DIM), np.float32)
    for p in ev["pauses"]:                                                # 1 back-channel nods
        a, n, d = g * style["nod"] * rng.uniform(0.08, 0.15), rng.uniform(1.0, 1.6), rng.uniform(0.15, 0.4)
        _add(m[:, PITCH], p + d, n, lambda tau: a * np.sin(2 * np.pi * 2.0 * tau) * np.exp(-tau / 0.35))
    for w in sorted(ev["amused"] + ev["laugh"] + ev["smile_seen"]):      # 2 amusement: lively words, laughs, smiles
        f, dur = _env(0.25, rng.uniform(0.8, 2.0), 0.6)
        a, t0 = g * style["smile"] * rng.uniform(0.7, 1.1), w + rng.uniform(0.3, 0.6)
        if style["open_smile"]:
            _add(m[:, OPEN_SMILE], t0, dur, lambda tau: a * f(tau))
            _add(m[:, JAW_PITCH], t0, dur, lambda tau: 0.06 * a * f(tau))
        else:
            _add(m[:, SMILE], t0, dur, lambda tau: a * f(tau))
    lag = int(round((style["lag"] + rng.uniform(-0.2, 0.2)) * FPS))       # 3 contagion
    v = np.r_[np.zeros(lag, np.float32), ev["valence"][:T - lag]]
    v = _smooth(v, 9) * g * rng.uniform(0.8, 1.2)
    m[:, SMILE] += 0.3 * np.maximum(v, 0)                                # (weaker than _listener: smiles stay seen)
    m[:, FROWN] += 0.45 * np.maximum(-v, 0)
    m[:, BROW_FURROW] += 0.15 * np.maximum(-v, 0)
    for s in ev["loud"]:                                                  # 4 surprise, heard only
        f, dur = _env(0.1, 0.2, 0.4)
        a, d = g * rng.uniform(0.6, 1.0), rng.uniform(0.15, 0.25)
        _add(m[:, BROW_RAISE], s + d, dur, lambda tau: a * f(tau))
        _add(m[:, PITCH], s + 0.2, dur, lambda tau: -0.03 * a * f(tau))
    for t in np.cumsum(rng.uniform(2, 6, size=int(T / FPS / 2) + 2)):     # 5 idle life
        _add(m[:, BLINK], t, 0.2, lambda tau: np.sin(np.pi * tau / 0.2) ** 2)
    idle = style["idle"]
    m[:, HEAD] += 0.025 * idle * _smooth_noise(rng, (T, 3), 30)
    m[:, 10:EXP_DIM] += 0.05 * idle * _smooth_noise(rng, (T, 40), 45)
    m[:, :9] += 0.03 * idle * _smooth_noise(rng, (T, 9), 9)
    for k in (SMILE, OPEN_SMILE, BROW_RAISE):
        m[:, k] = 1.8 * np.tanh(m[:, k] / 1.8)
    return m + style["offset"]                                           # 6 identity offset


def _ledger_entry(ev, listening=None):
    """The ledger of one conversation; with listening (T,) (react: 1 while the person listens), only the events whose
    answer window (up to LEDGER_HORIZON s) the person spends listening."""
    ok = lambda t, h: listening is None or listening[int(t * FPS):int((t + h) * FPS) + 1].min(initial=1) > 0.9
    r = lambda xs, h=LEDGER_HORIZON[0]: [round(float(x), 4) for x in xs if ok(x, h)]
    return {"pause": r(ev["pauses"]), "amused": r(ev["amused"]), "laugh": r(ev["laugh"]),
            "smile_seen": r(ev["smile_seen"]), "loud": r(ev["loud"]), "valence": [x for x in ev["shifts"]
                                                                           if ok(x[0], LEDGER_HORIZON[1])],
            "sarcasm": r(ev["sarcastic"])}


def _twin_segments(out, split, convs, stride):
    """convs [{fname, ev, L, lbeta, sbeta, lid, spk, alt, swap}] -> segments_<split>.pth (segment dicts as
    _write_listener writes them, plus swap_listener / swap_beta / swap_ids where swap is given)."""
    face, segs = _face(), []
    for c in convs:
        ev, L = c["ev"], c["L"]
        write_wav(out / "wav" / f"{c['fname']}.wav", ev["wave"])
        lexp, lpose, sexp, spose = (torch.from_numpy(np.ascontiguousarray(x)) for x in
                                    (L[:, EXP], L[:, POSE], ev["face"][:, EXP], ev["face"][:, POSE]))
        la, sa = torch.from_numpy(face.attributes(L)), torch.from_numpy(face.attributes(ev["face"]))
        lb, sb = torch.from_numpy(c["lbeta"])[None], torch.from_numpy(c["sbeta"])[None]
        for s in range(0, ev["T"] - SEGMENT_FRAMES + 1, stride):
            e, t0 = s + SEGMENT_FRAMES, s / FPS
            seg = {"fname": c["fname"], "split_start_frame": s, "split_end_frame": e,
                   "p0_exp": lexp[s:e], "p0_pose": lpose[s:e], "p0_shape": lb, "p0_attr": la[s:e],
                   "p1_exp": sexp[s:e], "p1_pose": spose[s:e], "p1_shape": sb, "p1_attr": sa[s:e],
                   "listener_id": c["lid"], "speaker_id": c["spk"],
                   "before_words": [{"text": w, "end": x} for w, x in ev["words"] if t0 - 3.0 <= x < t0],
                   "during_words": [{"text": w, "end": x} for w, x in ev["words"] if t0 <= x < e / FPS]}
            if c.get("alt") is not None:
                seg["alt_listener"] = c["alt"][:, s:e]
            if c.get("swap") is not None:
                motion, betas, ids = c["swap"]
                seg["swap_listener"], seg["swap_beta"], seg["swap_ids"] = motion[:, s:e], betas, ids
            segs.append(seg)
    torch.save(segs, out / f"segments_{split}.pth")
    return len(segs)


def _write_twin_segments(out, name, size, seed):
    """trevor or realtalk: the segments layout with statistics, wav/ and the rule ledger."""
    (out / "wav").mkdir(parents=True)
    rng0 = np.random.default_rng([seed, 10, TWINS.index(name)])
    counts, ledger, train_L, train_S = {}, {}, [], []
    if name == "trevor":                                                  # one host, guests disjoint per split
        host = _twin_beta(rng0)
        plan = {sp: [(0, g) for g in range(n) for _ in range(size["per_guest"])] for sp, n in size["guests"].items()}
        betas = [host]
    else:                                                                 # realtalk: seen and unseen identities
        r = size["realtalk"]
        betas = [_twin_beta(rng0) for _ in range(r["train"] + r["unseen"])]
        k = size["per_guest"]                                             # conversations per identity
        plan = {"train": [(i, k * i + j) for i in range(r["train"]) for j in range(k)],
                "val": [(i % r["train"], 1000 + i) for i in range(r["val"])],
                "test": [(r["train"] + i, 2000 + k * i + j) for i in range(r["unseen"]) for j in range(k)]
                + [(i * 5 % r["train"], 3000 + i) for i in range(r["heldout"])]}
    gid = 0
    for si, split in enumerate(("train", "val", "test")):
        convs = []
        for c, (lid, guest) in enumerate(plan[split]):
            rng = np.random.default_rng([seed, 11, TWINS.index(name), si, c])
            spk_id = guest + {"train": 0, "val": 100, "test": 200}[split] if name == "trevor" else guest
            speaker = _voice(np.random.default_rng([seed, 12, TWINS.index(name), spk_id]))
            ev = _twin_conversation(rng, speaker, size["dur"], [seed, 13, TWINS.index(name), si, c])
            sim_seed = int(rng.integers(2 ** 32))
            L = _twin_listener(np.random.default_rng(sim_seed), ev, twin_style(betas[lid]))
            fname = f"{split}_{c:03d}_s{spk_id}_l{lid}"
            conv = {"fname": fname, "ev": ev, "L": L, "lbeta": betas[lid], "sbeta": speaker["beta"], "lid": lid,
                    "spk": spk_id}
            if split != "train":
                conv["alt"] = torch.from_numpy(np.stack([_twin_listener(np.random.default_rng([sim_seed, k + 1]), ev,
                                                         twin_style(betas[lid])) for k in range(K_ALT)])).half()
            if name == "realtalk" and split == "test":
                others = [j for j in np.random.default_rng([seed, 14, c]).permutation(len(betas)) if j != lid][:N_SWAP]
                conv["swap"] = (torch.from_numpy(np.stack([_twin_listener(np.random.default_rng(sim_seed), ev,
                                twin_style(betas[j])) for j in others])).half(),
                                torch.from_numpy(np.stack([betas[j] for j in others])), torch.tensor(others))
            if split == "train":
                train_L.append(L)
                train_S.append(ev["face"])
            ledger[fname] = _ledger_entry(ev)
            convs.append(conv)
            gid += 1
        counts[split] = _twin_segments(out, split, convs, int(2.0 * FPS) if split == "train" else SEGMENT_FRAMES)
    for pre, X in (("", np.concatenate(train_L)), ("speaker_", np.concatenate(train_S))):
        np.save(out / f"{pre}mean.npy", X.mean(0).astype(np.float32))
        np.save(out / f"{pre}std.npy", np.maximum(X.std(0), 1e-3).astype(np.float32))
    (out / LEDGER).write_text(json.dumps(ledger))
    return counts


def _write_twin_react(out, size, seed):
    """REACT 2024 layout: <split>/{Emotion,3D_FV_files,Audio_files}/synthetic/<session>/<person>/1.{csv,npy,wav}
    (motion as (T, 1, 56)), <split>.csv, data_indices.csv, Approprirate_facial_reaction.npy, neighbour_emotion_<split>
    .npy, react_meta.json and the rule ledger (keyed by the listener's clip path, as the items are named)."""
    face, people = _face(), ("Expert_video", "Novice_video")
    dur = size["react_dur"]
    out.mkdir(parents=True)
    ledger, index, groups, counts, sess_no = {}, [], [], {}, 0
    for si, split in enumerate(("train", "val", "test")):
        rows = [",speaker_path,listener_path"]
        for g in range(size["react_groups"][split]):
            script = [seed, 20, si, g]
            trng = np.random.default_rng(script + [0])
            turns = np.cumsum(trng.uniform(4, 7, size=int(dur / 4) + 2))   # turn ends; person 0 speaks first
            for k in range(REACT_GROUP):
                sess = f"{sess_no:03d}_session"
                rng = np.random.default_rng([seed, 21, sess_no])
                ends = turns + rng.uniform(-0.4, 0.4, len(turns))          # jittered timings
                speaks = lambda p: (lambda t: (np.searchsorted(ends, t) % 2 == p) and
                                    abs(ends[np.argmin(abs(ends - t))] - t) > 0.3)
                voices = [_voice(np.random.default_rng([seed, 22, sess_no, p])) for p in (0, 1)]
                evs = [_twin_conversation(rng, voices[p], dur, script + [1 + p], speaks(p)) for p in (0, 1)]
                tracks = []
                for p in (0, 1):                                          # own turns: speaking; else listening
                    L = _twin_listener(np.random.default_rng([seed, 23, sess_no, p]), evs[1 - p],
                                       twin_style(voices[p]["beta"]))
                    w = _smooth(evs[p]["on"].astype(np.float32), 6)[:, None]
                    tracks.append(w * (evs[p]["face"] + twin_style(voices[p]["beta"])["offset"]) + (1 - w) * L)
                for p in (0, 1):
                    rel = f"synthetic/{sess}/{people[p]}/1"
                    for kind, f in (("Emotion", f"{rel}.csv"), ("3D_FV_files", f"{rel}.npy"), ("Audio_files",
                                                                                               f"{rel}.wav")):
                        (out / split / kind / f).parent.mkdir(parents=True, exist_ok=True)
                    np.savetxt(out / split / "Emotion" / f"{rel}.csv", face.attributes(tracks[p]), delimiter=",",
                               header=",".join(ATTR_NAMES), comments="", fmt="%.5g")
                    np.save(out / split / "3D_FV_files" / f"{rel}.npy", tracks[p][:, None].astype(np.float32))
                    write_wav(out / split / "Audio_files" / f"{rel}.wav", evs[p]["wave"])
                    ledger[rel] = _ledger_entry(evs[1 - p], 1 - w[:, 0])   # what this person, listening, answers
                rows.append(f"{len(rows) - 1},synthetic/{sess}/{people[0]}/1,synthetic/{sess}/{people[1]}/1")
                index.append(("synthetic", sess, "1"))
                groups.append((split, si * 100 + g))
                sess_no += 1
        (out / f"{split}.csv").write_text("\n".join(rows) + "\n")
    M = len(index)
    grp = np.array([g for _, g in groups])
    same = (grp[:, None] == grp[None]).astype(np.float32)                 # same script, same role: neighbours
    full = np.block([[same, np.zeros_like(same)], [np.zeros_like(same), same]])
    np.save(out / REACT_APPROPRIATE, full)
    (out / "data_indices.csv").write_text("site,session,clip\n" + "".join(",".join(r) + "\n" for r in index))
    for split in ("train", "val", "test"):
        r = np.array([i for i, (sp, _) in enumerate(groups) if sp == split])
        cut = lambda a, b: full[np.ix_(a, b)]                             # as the baseline's tool/matrix_split.py
        np.save(out / f"neighbour_emotion_{split}.npy", np.block([[cut(r, r), cut(r, r + M)],
                                                                  [cut(r + M, r), cut(r + M, r + M)]]))
        counts[split] = 2 * len(r)
    (out / "react_meta.json").write_text(json.dumps({"fps": FPS}))
    (out / LEDGER).write_text(json.dumps(ledger))
    return counts


def generate_twin(name, preset="default", root=None, seed=0, force=False):
    """Make (or reuse) the twin `name` (TWINS) under root (default DATA_ROOT/<name>, DATA_ROOT/<name>-tiny for the
    "tiny" / "smoke" preset); written to a temporary folder and renamed, reused while its meta.json matches."""
    if name not in TWINS:
        raise UserError(f"no twin named {name!r} (expected one of {', '.join(TWINS)})")
    preset = "tiny" if preset in ("tiny", "smoke") else "default"
    root = Path(root) if root else DATA_ROOT / (name + ("-tiny" if preset == "tiny" else ""))
    want = {"twin": name, "preset": preset, "seed": seed, "version": TWIN_VERSION}
    if (root / "meta.json").exists() and not force and all(
            json.loads((root / "meta.json").read_text()).get(k) == v for k, v in want.items()):
        return root
    t0, size = time.time(), TWIN_SIZES[preset]
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        if name == "vocaset":
            counts = {"sentences": _write_vocaset(tmp, PRESETS[preset], seed)}
        elif name == "react":
            counts = _write_twin_react(tmp, size, seed)
        else:
            counts = _write_twin_segments(tmp, name, size, seed)
        info = dict(want, counts=counts, seconds=round(time.time() - t0, 2), mb=round(_du(tmp) / 2 ** 20, 1))
        if name == "vocaset":                                             # its own meta.json holds fps: keep both
            info.update(json.loads((tmp / "meta.json").read_text()))
        (tmp / "meta.json").write_text(json.dumps(info, indent=1))
        if root.exists():
            old = root.parent / f".{root.name}.old-{uuid.uuid4().hex[:6]}"
            os.rename(root, old)
            shutil.rmtree(old, ignore_errors=True)
        os.rename(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if (root / "meta.json").exists() and not force:
            return root
        raise
    print(f"data.py: made the {preset} twin {name} ({counts}), {info['mb']} MB, in {time.time() - t0:.1f} s -> "
          f"{root}", flush=True)
    return root


def load_swaps(path, split="test"):
    """Realtalk twin only: the identity-swapped ground truth of each item of `split` -> {item name: (ids (S,) int,
    betas (S, 100), listener motion (S, T, 56)) float32}: the item's events answered with the same timing by S other
    identities. {} when the data has none."""
    path, _ = _layout(Path(path), split)
    f = path / f"segments_{split}.pth"
    out = {}
    for s in (_load_pth(f) if f.exists() else []):
        if isinstance(s, dict) and "swap_listener" in s:
            out[f"{s['fname']}:{int(s['split_start_frame'])}-{int(s['split_end_frame'])}"] = (
                np.asarray(_np(s["swap_ids"]), np.int64), np.asarray(_np(s["swap_beta"]), np.float32),
                np.asarray(_np(s["swap_listener"].float()), np.float32))
    return out


def load_ledger(path, items):
    """Synthetic twins only: per item, the events its listener's hidden rules answer, in seconds from the item's
    start ({rule: [t]}; valence [[t, change]]; from LEDGER_BEFORE s before the start, negative, so that a scorer sees
    what came just before), from rules_ledger.json beside the data; None when there is none."""
    path = Path(path)
    f = path / LEDGER if (path / LEDGER).exists() else path / "listener" / LEDGER
    if not f.exists():
        return None
    ledger, out = json.loads(f.read_text()), []
    for it in items:
        key, _, span = it["name"].partition(":")
        a, b = (int(x) for x in span.split("-")) if span else (0, len(it["listener"]))
        t0, t1 = a / it["fps"], b / it["fps"]
        ev = ledger.get(key)
        out.append(None if ev is None else {
            k: [[e[0] - t0, e[1]] if isinstance(e, list) else e - t0 for e in v
                if t0 - LEDGER_BEFORE <= (e[0] if isinstance(e, list) else e) < t1] for k, v in ev.items()})
    return out


if __name__ == "__main__":
    ap = ArgParser(description="Generate (or reuse) the synthetic world.")
    ap.add_argument("--preset", default="default", choices=["default", "tiny"])
    ap.add_argument("--root", default=None, help="where to write it (default data/world or data/tiny)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="regenerate even when a matching world exists")
    ap.add_argument("--twin", default=None, choices=TWINS, help="make this twin instead (data/<name>[-tiny])")
    try:
        a = ap.parse_args()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    r = generate_twin(a.twin, a.preset, a.root, a.seed, a.force) if a.twin else generate_world(a.root, a.preset,
                                                                                              a.seed, a.force)
    print(json.loads((r / "meta.json").read_text()))
