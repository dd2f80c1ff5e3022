"""Writers that only the tests use: items -> the Learning2Listen, REACT and segments layouts, read back by data.py."""
import json
from pathlib import Path

import numpy as np
import torch

from data import ATTR_NAMES, EXP, POSE, SR, mfcc, write_wav

L2L_T, L2L_D = 64, 184                     # L2L windows: 64 frames of 184-d DECA codes (exp 50 | pose 6 | detail 128)


def write_l2l(path, split, items, rows_per_frame=4, n_mel=128):
    """Write items as L2L npy files: p0_list_faces (N,64,184) paired with p1_speak_{faces,audio,files}.
    Items are cut into 64-frame windows; audio rows are `audio_rows` or MFCC rows of `audio` (4 per frame)."""
    d = Path(path) / split
    d.mkdir(parents=True, exist_ok=True)
    L, S, A, F = [], [], [], []
    for it in items:
        for s in range(0, len(it["listener"]) - L2L_T + 1, L2L_T):
            pad = lambda m: np.pad(m[s:s + L2L_T], ((0, 0), (0, L2L_D - m.shape[1])))
            L.append(pad(it["listener"]))
            S.append(pad(it["speaker"]))
            if it.get("audio_rows") is not None:
                A.append(it["audio_rows"][rows_per_frame * s:rows_per_frame * (s + L2L_T)])
            else:
                sps = SR / it["fps"]
                A.append(mfcc(it["audio"][int(round(s * sps)):int(round((s + L2L_T) * sps))], rate=rows_per_frame *
                              it["fps"], n_mfcc=n_mel, n_rows=rows_per_frame * L2L_T))
            F.append([[it["name"].split(":")[0], "p1", str(it["start_frame"] + s + f)] for f in range(L2L_T)])
    np.save(d / "p0_list_faces_clean_deca.npy", np.stack(L).astype(np.float32))
    np.save(d / "p1_speak_faces_clean_deca.npy", np.stack(S).astype(np.float32))
    np.save(d / "p1_speak_audio_clean_deca.npy", np.stack(A).astype(np.float32))
    np.save(d / "p1_speak_files_clean_deca.npy", np.array(F))
    return d


REACT_PEOPLE = ("Expert_video", "Novice_video")                           # NoXI-style person folders


def write_react(path, split, items, site="synthetic", pairs_csv=True):
    """Write items in the REACT layout: <split>/{Emotion,3D_FV_files,Audio_files}/<site>/<session>/<person>/1.*
    (the speaker is Expert_video, the listener Novice_video; 3DMM as (T, 1, D) npy; 25 attributes as csv) and the
    challenge's <split>.csv of (index, speaker_path, listener_path) pairs."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    rows = [",speaker_path,listener_path"]
    for i, it in enumerate(items):
        session = it["name"].replace(":", "_").replace("/", "_")
        for person, m, attr, wav in ((REACT_PEOPLE[0], it["speaker"], it["speaker_attr"], it["audio"]),
                                     (REACT_PEOPLE[1], it["listener"], it["listener_attr"], None)):
            dirs = [root / split / k / site / session / person for k in ("Emotion", "3D_FV_files", "Audio_files")]
            for x in dirs:
                x.mkdir(parents=True, exist_ok=True)
            np.savetxt(dirs[0] / "1.csv", attr, delimiter=",", header=",".join(ATTR_NAMES), comments="", fmt="%.7g")
            np.save(dirs[1] / "1.npy", np.asarray(m, np.float32)[:, None])
            n = int(round(len(m) * SR / it["fps"]))
            write_wav(dirs[2] / "1.wav", np.zeros(n, np.float32) if wav is None else wav)
        rows.append(f"{i},{site}/{session}/{REACT_PEOPLE[0]}/1,{site}/{session}/{REACT_PEOPLE[1]}/1")
    if pairs_csv:
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    (root / "react_meta.json").write_text(json.dumps({"fps": int(items[0]["fps"]) if items else 25}))
    return root


def write_segments(path, split, items):
    """Write items as LM-Listener's segments_{split}.pth: frames and word ends in the video's time (the segment starts
    at the item's start_frame, `end` in seconds from the video start), and wav/<fname>.wav holding the video's audio
    from its start (silence before the segment), so data.load_listener gives the items back."""
    path = Path(path)
    (path / "wav").mkdir(parents=True, exist_ok=True)
    segs = []
    for i, it in enumerate(items):
        fname, a, fps = f"seg{i:05d}", int(it["start_frame"]), it["fps"]
        T = len(it["listener"])
        t = lambda x: torch.as_tensor(np.asarray(x, np.float32))
        seg = {"fname": fname, "split_start_frame": a, "split_end_frame": a + T, "fps": fps,
               "p0_exp": t(it["listener"][:, EXP]), "p0_pose": t(it["listener"][:, POSE]),
               "p1_exp": t(it["speaker"][:, EXP]), "p1_pose": t(it["speaker"][:, POSE]),
               "p0_shape": t(it["listener_beta"])[None], "p1_shape": t(it["speaker_beta"])[None],
               "p0_attr": t(it["listener_attr"]), "p1_attr": t(it["speaker_attr"]), "listener_id": it["listener_id"],
               "before_words": [{"text": w, "end": e + a / fps} for w, e in it["words"] if e < 0],
               "during_words": [{"text": w, "end": e + a / fps} for w, e in it["words"] if e >= 0]}
        if it.get("alt_listener") is not None:
            seg["alt_listener"] = t(it["alt_listener"])
        if it.get("audio") is not None:
            lead = int(round(a * SR / fps))
            write_wav(path / "wav" / f"{fname}.wav", np.r_[np.zeros(lead, np.float32), it["audio"]])
        segs.append(seg)
    torch.save(segs, path / f"segments_{split}.pth")
    return path
