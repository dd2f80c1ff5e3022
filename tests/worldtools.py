"""Helpers that only the tests use: writers (items -> the Learning2Listen, REACT and segments layouts, read back by
data.py) and the checks of the synthetic twins (`python tests/worldtools.py [ROOT]`: identity R^2, modality probes)."""
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))           # also as `python tests/worldtools.py [ROOT]`
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


def identity_r2(path, ridge=1.0):
    """Realtalk twin: R^2 on the unseen test listeners of a ridge map beta (100) -> resting offset (56), the
    listener's median motion over its items, fitted on the train listeners (variance-weighted over channels)."""
    import data
    def per_id(items):
        ids = sorted({it["listener_id"] for it in items})
        B = np.stack([next(it["listener_beta"] for it in items if it["listener_id"] == i) for i in ids])
        Y = np.stack([np.median(np.concatenate([it["listener"] for it in items if it["listener_id"] == i]), 0)
                      for i in ids])
        return ids, B.astype(np.float64), Y.astype(np.float64)
    _, Bt, Yt = per_id(data.load_listener(path, "train"))
    train_ids = {it["listener_id"] for it in data.load_listener(path, "train")}
    ids, Bu, Yu = per_id([it for it in data.load_listener(path, "test") if it["listener_id"] not in train_ids])
    mb, my = Bt.mean(0), Yt.mean(0)
    W = np.linalg.solve((Bt - mb).T @ (Bt - mb) + ridge * np.eye(Bt.shape[1]), (Bt - mb).T @ (Yt - my))
    pred = (Bu - mb) @ W + my
    return 1 - ((Yu - pred) ** 2).sum() / ((Yu - Yu.mean(0)) ** 2).sum(), len(Bt), len(Bu)


# ----------------------------------------------------------------------------------------------------------------
# Modality probes: which speaker stream (face, audio, text) reveals which hidden rule of a twin

PROBE_RULES = ("pause", "amused", "sarcasm", "laugh", "smile_seen", "loud")


def _audio_tracks(wave, sr, hop=160, n=640):
    """(log energy, F0 Hz or 0 when unvoiced) at sr / hop frames per second, by frame autocorrelation."""
    w = np.pad(np.asarray(wave, np.float64), (0, n))
    idx = np.arange(0, len(wave), hop)[:, None] + np.arange(n)[None]
    fr = w[idx] * np.hanning(n)
    energy = np.log((fr ** 2).mean(1) + 1e-8)
    ac = np.fft.irfft(np.abs(np.fft.rfft(fr, 2 * n)) ** 2)[:, :n]
    lo, hi = sr // 420, sr // 70
    lag = lo + ac[:, lo:hi].argmax(1)
    voiced = ac[np.arange(len(ac)), lag] > 0.3 * ac[:, 0]
    return energy, np.where(voiced, sr / lag, 0.0)


def _probe_features(it, times):
    """{stream: (N, F)} speaker features around each time t (s): face = the speaker's motion in [t-0.6, t+0.5];
    audio = energy and pitch in [t-0.6, t+0.5]; text = the words that ended in [t-1, t] and the time since the last."""
    from data import HUMOUR_WORDS, PITCH, SAD_WORDS, SR
    fps, S = it["fps"], it["speaker"]
    energy, f0 = _audio_tracks(it["audio"], SR)
    out = {"face": [], "audio": [], "text": []}
    ends = np.array([e for _, e in it["words"]] + [-99.0])
    for t in times:
        a, b = int((t - 0.6) * fps), int((t + 0.5) * fps)
        win = S[a:b, list(range(10)) + [PITCH]]
        out["face"].append(np.r_[win.mean(0), win.max(0) - win.min(0)])
        a, b = int((t - 0.6) * 100), int((t + 0.5) * 100)
        e, f = energy[a:b], f0[a:b]
        v = f[f > 0]
        lv = np.log(v) if len(v) > 2 else np.zeros(3)
        out["audio"].append([e.max(), e.mean(), np.diff(e).max(), lv.mean(), lv.std(), (f > 0).mean(),
                             e[-50:].mean() - e[:-50].mean(), e[50:].max() - e[:60].mean()])
        recent = [w for w, x in it["words"] if t - 1.0 <= x <= t]
        last = [w for w, x in it["words"] if t - 0.3 <= x <= t]
        since = t - ends[ends <= t].max() if (ends <= t).any() else 2.0
        out["text"].append([sum(w in HUMOUR_WORDS for w in recent), sum(w in SAD_WORDS for w in recent), len(recent),
                            any(w in HUMOUR_WORDS for w in last), min(since, 2.0), since < 0.15])
    return {k: np.asarray(v, np.float64) for k, v in out.items()}


def _logistic(X, y, Xt, l2=1.0, iters=25):
    """L2 logistic regression by Newton steps on standardised features -> scores of Xt."""
    mu, sd = X.mean(0), X.std(0) + 1e-6
    Z, Zt = np.c_[(X - mu) / sd, np.ones(len(X))], np.c_[(Xt - mu) / sd, np.ones(len(Xt))]
    w = np.zeros(Z.shape[1])
    for _ in range(iters):
        p = 1 / (1 + np.exp(-Z @ w))
        H = Z.T @ (Z * (p * (1 - p))[:, None]) + l2 * np.eye(len(w))
        w -= np.linalg.solve(H, Z.T @ (p - y) + l2 * w)
    return Zt @ w


def average_precision(y, s):
    order = np.argsort(-s)
    y = np.asarray(y)[order]
    hits = np.cumsum(y)
    return float((hits / np.arange(1, len(y) + 1))[y == 1].mean()) if y.sum() else float("nan")


def _probe_table(path, split):
    """Grid times (every 0.25 s), their rule labels and stream features, over the items of a twin split."""
    import data
    items = data.load_listener(path, split)
    ledger = data.load_ledger(path, items)
    feats, labels = {"face": [], "audio": [], "text": []}, {r: [] for r in PROBE_RULES}
    resp = []
    for it, ev in zip(items, ledger):
        T = len(it["listener"]) / it["fps"]
        times = np.arange(1.0, T - 1.0, 0.25)
        f = _probe_features(it, times)
        for k in feats:
            feats[k].append(f[k])
        for r in PROBE_RULES:
            ev_t = np.array(ev.get(r, []) + [-99.0])
            labels[r].append((np.abs(ev_t[None] - times[:, None]) < 0.125).any(1))
        L, fps = it["listener"], it["fps"]                                  # next second: smile, brow, nod
        nxt = lambda t, c: L[int(t * fps):int((t + 1) * fps), c]
        resp.append([[nxt(t, data.SMILE).max() + nxt(t, data.OPEN_SMILE).max() - L[int(t * fps), data.SMILE]
                      - L[int(t * fps), data.OPEN_SMILE], nxt(t, data.BROW_RAISE).max() - L[int(t * fps),
                      data.BROW_RAISE], np.ptp(nxt(t, data.PITCH))] for t in times])
    feats = {k: np.concatenate(v) for k, v in feats.items()}
    feats["all"] = np.concatenate([feats["face"], feats["audio"], feats["text"]], 1)
    feats["words+face"] = np.concatenate([feats["face"], feats["text"]], 1)
    return feats, {r: np.concatenate(v).astype(float) for r, v in labels.items()}, np.concatenate(resp)


def modality_probes(path):
    """Probes trained on a listener twin's train split, scored on its test split. -> {"rule_ap": {rule: {stream:
    AP of detecting the rule's events from that stream}}, "amused_vs_sarcasm": {streams: AP}, "next_second_r2":
    {stream: R^2 of a ridge map to the listener's next-second smile / brow / nod response}}."""
    (F, Y, R), (Ft, Yt, Rt) = _probe_table(path, "train"), _probe_table(path, "test")
    out = {"rule_ap": {}, "amused_vs_sarcasm": {}, "next_second_r2": {}, "base_rate": {}}
    for r in PROBE_RULES:
        if Y[r].sum() >= 3 and Yt[r].sum() >= 1:
            out["base_rate"][r] = round(float(Yt[r].mean()), 3)
            out["rule_ap"][r] = {k: round(average_precision(Yt[r], _logistic(F[k], Y[r], Ft[k])), 3)
                                 for k in ("face", "audio", "text", "all")}
    hum, hum_t = (Y["amused"] + Y["sarcasm"]) > 0, (Yt["amused"] + Yt["sarcasm"]) > 0
    for k in ("words+face", "audio", "all"):
        out["amused_vs_sarcasm"][k if k != "all" else "words+face+audio"] = round(average_precision(
            Yt["amused"][hum_t], _logistic(F[k][hum], Y["amused"][hum], Ft[k][hum_t])), 3)
    out["amused_vs_sarcasm"]["base_rate"] = round(float(Yt["amused"][hum_t].mean()), 3)
    for k in ("face", "audio", "text", "all"):
        mu, sd = F[k].mean(0), F[k].std(0) + 1e-6
        Z, Zt = (F[k] - mu) / sd, (Ft[k] - mu) / sd
        W = np.linalg.solve(Z.T @ Z + 10 * np.eye(Z.shape[1]), Z.T @ (R - R.mean(0)))
        pred = Zt @ W + R.mean(0)
        out["next_second_r2"][k] = round(float(1 - ((Rt - pred) ** 2).sum() / ((Rt - R.mean(0)) ** 2).sum()), 3)
    return out


def check_twins(root=None, preset="default"):
    """The checks of the twins, printed: generation time and size, rule ledger (GT, alt-GT, a time-shifted random
    listener), identity R^2 (realtalk), trevor's single beta, react neighbours, modality probes."""
    import data
    import metrics
    paths = {n: data.generate_twin(n, preset, root=(Path(root) / n) if root else None) for n in data.TWINS}
    for n, p in paths.items():
        m = json.loads((p / "meta.json").read_text())
        print(f"{n}: {m.get('counts')} generated in {m['seconds']} s, {m['mb']} MB")
    for n in ("trevor", "realtalk", "react"):
        items = [it for s in ("train", "val", "test") for it in data.load_listener(paths[n], s)]
        led = data.load_ledger(paths[n], items)
        seqs = {"GT": [it["listener"] for it in items],
                "random (GT shifted by half)": [np.roll(it["listener"], len(it["listener"]) // 2, 0) for it in items]}
        has_alt = [i for i, it in enumerate(items) if it["alt_listener"] is not None and len(it["alt_listener"])]
        for name, s in list(seqs.items()) + [("alt-GT", [items[i]["alt_listener"][-1] for i in has_alt])]:
            ev = led if name != "alt-GT" else [led[i] for i in has_alt]
            r = metrics.rule_responses(s, ev, data.FPS)
            print(f"{n} rules {name}: " + ", ".join(f"{k} {r[k]:.2f} (n={r['n_' + k]})" for k in metrics.RULES))
    print("realtalk identity R^2 (ridge beta -> unseen listener's resting offset; train ids, unseen ids): %.3f, %d, %d"
          % identity_r2(paths["realtalk"]))
    betas = np.stack([it["listener_beta"] for s in ("train", "val", "test") for it in data.load_listener(
        paths["trevor"], s)])
    print(f"trevor: {len(betas)} items, one listener beta: {bool(np.allclose(betas, betas[0]))}")
    test = data.load_listener(paths["react"], "test")
    print(f"react test: {len(test)} speaker clips, appropriate neighbours besides the own pair: min "
          f"{min(len(it['alt_listener']) - 1 for it in test)}")
    for n in ("trevor", "realtalk"):
        print(f"{n} probes: {json.dumps(modality_probes(paths[n]))}")


if __name__ == "__main__":
    check_twins(sys.argv[1] if len(sys.argv) > 1 else None, sys.argv[2] if len(sys.argv) > 2 else "default")
