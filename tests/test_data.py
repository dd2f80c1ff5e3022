"""data.py: the world's rules carry signal, the readers read the real formats, audio and bad input behave."""
import json
import pickle

import numpy as np
import pytest
import torch

import data
import worldtools

# ------------------------------------------------------------------------------------------------------------
# The world: cached, deterministic, alternative reactions, every modality carries signal


def test_tiny_world_layout_and_cache(tiny_world):
    meta = json.loads((tiny_world / "meta.json").read_text())
    assert meta["preset"] == "tiny" and meta["version"] == data.VERSION
    for f in ("segments_train.pth", "segments_val.pth", "segments_test.pth", "mean.npy", "std.npy"):
        assert (tiny_world / "listener" / f).exists()
    assert not list(tiny_world.parent.glob(".*tmp*"))                        # atomic: no temporary folder left
    assert data.generate_world(tiny_world, preset="tiny") == tiny_world       # cached: returns at once
    assert data.resolve_data(str(tiny_world), "listener") == tiny_world / "listener"
    assert data.resolve_data(str(tiny_world), "talking") == tiny_world / "vocaset"
    with pytest.raises(data.UserError, match="no such dataset folder"):
        data.resolve_data(str(tiny_world / "nope"), "listener")


def test_items_have_the_contract_keys_and_shapes(tiny_world):
    items = data.load_listener(tiny_world, "test")
    it = items[0]
    T = data.SEGMENT_FRAMES
    assert it["listener"].shape == it["speaker"].shape == (T, 56) and it["listener"].dtype == np.float32
    assert it["listener_attr"].shape == (T, 25) and it["listener_beta"].shape == (100,)
    assert it["audio"].shape == (T * data.SR // data.FPS,)
    assert it["alt_listener"].shape == (data.K_ALT, T, 56) and it["alt_listener_attr"].shape == (data.K_ALT, T, 25)
    assert len({i["name"] for i in items}) == len(items)
    assert {i["listener_id"] for i in items} >= {6}                            # the unseen identity is in test
    assert 6 not in {i["listener_id"] for i in data.load_listener(tiny_world, "train")}
    later = [i for i in data.load_listener(tiny_world, "train") if i["start_frame"] >= 120]
    assert any(w[1] < 0 for i in later for w in i["words"])                   # history words, negative times
    assert all(-3.0 <= e < T / data.FPS and w in data.VOCAB for i in items for w, e in i["words"])
    mean, std = data.load_stats(tiny_world)
    assert mean.shape == std.shape == (56,) and (std >= 1e-3).all()


def test_world_is_deterministic_per_seed(tiny_world, tmp_path):
    again = data.generate_world(tmp_path / "w", preset="tiny", seed=0)
    a, b = data.load_listener(tiny_world, "val"), data.load_listener(again, "val")
    assert all(np.array_equal(x["listener"], y["listener"]) and np.array_equal(x["audio"], y["audio"])
               and x["words"] == y["words"] for x, y in zip(a, b))
    rng = lambda s: np.random.default_rng([s, 5])
    spk = data._cast(0)[0][0]
    e1, e2 = data._conversation(rng(1), spk, 12.0), data._conversation(rng(2), spk, 12.0)
    assert not np.allclose(e1["face"], e2["face"])


def test_alternative_reactions_differ_but_share_the_speaker(tiny_world):
    items = data.load_listener(tiny_world, "test")
    it = items[0]
    alt = it["alt_listener"]
    diffs = [np.abs(alt[i] - alt[j]).mean() for i in range(3) for j in range(i + 1, 4)]
    assert min(diffs) > 1e-3 and np.abs(alt[0] - it["listener"]).mean() > 1e-3
    # the same speaker events drive them: contagion makes alternatives agree more with their own GT than with
    # the GT of another segment
    own = np.abs(alt.mean(0)[:, data.SMILE] - it["listener"][:, data.SMILE]).mean()
    other = np.mean([np.abs(alt.mean(0)[:, data.SMILE] - o["listener"][:, data.SMILE]).mean() for o in items[1:]])
    assert own < other


@pytest.fixture(scope="module")
def sims():
    """In-memory conversations (speaker events + listener motion): 10 to fit probes on, 6 held out."""
    speakers, listeners = data._cast(0)
    out = {}
    for split, (n, seed) in {"train": (10, 1), "test": (6, 2)}.items():
        out[split] = []
        for c in range(n):
            rng = np.random.default_rng([seed, c])
            spk, lid = int(rng.integers(8)), int(rng.integers(6))
            ev = data._conversation(rng, speakers[spk], 48.0)
            L = data._listener(np.random.default_rng([seed, c, 9]), ev, data.listener_style(listeners[lid]))
            out[split].append((ev, L, lid))
    return out


def _lagged(x, lags):
    return np.stack([np.r_[np.zeros(l), x[:len(x) - l]] for l in lags], 1)    # (T, n_lags), past values only


def _features(kind, ev):
    T = ev["T"]
    if kind == "face":                                                         # speaker's valence readout
        return _lagged(data._face().valence(ev["face"]),
                       range(15, 90, 5))
    if kind == "audio":                                                        # speaker's log energy
        e = np.log(np.sqrt((ev["wave"][:T * 533].reshape(T, -1) ** 2).mean(1) + 1e-8))
        return np.c_[_lagged(e, range(0, 30, 2)), _lagged(np.maximum(e - np.median(e) - 1.0, 0), range(3, 12))]
    x = np.zeros(T)                                                            # text: humour words said
    for w, end in ev["words"]:
        if w in data.HUMOUR_WORDS and int(end * data.FPS) < T:
            x[int(end * data.FPS)] += 1
    return _lagged(x, range(6, 60, 3))


TARGETS = {"face": lambda L: L[:, data.SMILE] + L[:, data.OPEN_SMILE] - L[:, data.FROWN],
           "audio": lambda L: L[:, data.BROW_RAISE],
           "text": lambda L: L[:, data.SMILE] + L[:, data.OPEN_SMILE]}


@pytest.mark.parametrize("kind", ["face", "audio", "text"])
def test_every_modality_carries_signal(sims, kind):
    """Least squares on hand-made features of one speaker modality, fitted on train, beats chance on held-out
    conversations (chance = the same probe fed another conversation's speaker)."""
    X = np.concatenate([_features(kind, ev) for ev, _, _ in sims["train"]])
    y = np.concatenate([TARGETS[kind](L) for _, L, _ in sims["train"]])
    w = np.linalg.lstsq(np.c_[X, np.ones(len(X))], y, rcond=None)[0]
    r2 = lambda yt, Xt: 1 - ((yt - np.c_[Xt, np.ones(len(Xt))] @ w) ** 2).mean() / yt.var()
    te = sims["test"]
    yt = np.concatenate([TARGETS[kind](L) for _, L, _ in te])
    real = r2(yt, np.concatenate([_features(kind, ev) for ev, _, _ in te]))
    shuffled = r2(yt, np.concatenate([_features(kind, te[(i + 1) % len(te)][0]) for i in range(len(te))]))
    assert real > 0.05 and real > shuffled + 0.1, (real, shuffled)


def test_identity_carries_signal(sims):
    """Per-listener channel means from train predict held-out listener means better than the global mean."""
    by = {}
    for _, L, lid in sims["train"]:
        by.setdefault(lid, []).append(L)
    glob = np.concatenate([L for _, L, _ in sims["train"]]).mean(0)
    err_id, err_glob = [], []
    for _, L, lid in sims["test"]:
        if lid in by:
            err_id.append(np.abs(np.concatenate(by[lid]).mean(0) - L.mean(0)).mean())
            err_glob.append(np.abs(glob - L.mean(0)).mean())
    assert err_id and np.mean(err_id) < 0.8 * np.mean(err_glob)


def test_identity_changes_listener_mean_and_std(sims):
    ev = sims["train"][0][0]
    _, listeners = data._cast(0)
    m = [data._listener(np.random.default_rng(3), ev, data.listener_style(listeners[i])) for i in (0, 1, 6)]
    for a, b in ((m[0], m[1]), (m[0], m[2])):
        assert np.abs(a.mean(0) - b.mean(0)).max() > 0.05
        on = b.std(0) > 1e-6
        assert np.abs(a.std(0)[on] / b.std(0)[on] - 1).max() > 0.2


def test_sarcasm_gets_no_smile(sims):
    """Humour words said by a happy, lively speaker make the listener smile; said flat they do not."""
    rise = {"amused": [], "sarcastic": []}
    for ev, L, _ in sims["train"] + sims["test"]:
        s = L[:, data.SMILE] + L[:, data.OPEN_SMILE]
        for k in rise:
            for t in ev[k]:
                i = int(t * data.FPS)
                if 6 <= i < ev["T"] - 45:
                    rise[k].append(s[i + 9:i + 45].mean() - s[i - 6:i + 3].mean())
    assert len(rise["amused"]) > 10 and len(rise["sarcastic"]) > 10
    assert np.mean(rise["amused"]) > 0.15 and abs(np.mean(rise["sarcastic"])) < 0.05


# ------------------------------------------------------------------------------------------------------------
# The face model


def test_face_model_semantics():
    f = data.FaceModel()
    z = np.zeros((1, 56), np.float32)
    v0 = f.vertices(z)[0]
    open_ = z.copy()
    open_[0, data.JAW_PITCH] = 0.3
    lower = f.groups["lower_lip"]
    assert (f.vertices(open_)[0][lower, 1] < v0[lower, 1] - 0.01).all()       # the jaw opens the mouth
    nod = z.copy()
    nod[0, data.PITCH] = 0.2
    assert f.vertices(nod)[0][f.groups["nose"], 1].mean() < v0[f.groups["nose"], 1].mean()
    smile, frown = z.copy(), z.copy()
    smile[0, data.SMILE], frown[0, data.FROWN] = 1, 1
    assert f.valence(smile)[0] > 0.5 and f.valence(frown)[0] < -0.5
    probs = f.emotion_probs(np.c_[data.EMOTION_FACE, np.zeros((8, 6), np.float32)])
    assert (probs.argmax(1) == np.arange(8)).all()                             # the 8 emotion faces separate
    a = f.attributes(torch.zeros(2, 3, 56))
    assert torch.is_tensor(a) and a.shape == (2, 3, 25)
    assert f.template(np.ones(100)).shape == (f.n_vertices, 3) and f.edges.max() < f.n_vertices


def test_pictures(tmp_path, tiny_world):
    it = data.load_listener(tiny_world, "val")[0]
    from PIL import Image
    g = data.render_gif(tmp_path / "a.gif", [it["speaker"][:20], it["listener"][:20]],
                        [it["speaker_beta"], it["listener_beta"]], ["speaker", "listener"])
    im = Image.open(g)
    assert im.n_frames == 10 and im.size == (440, 238)
    p = data.plot_channels(tmp_path / "c.png", {"gt": it["listener"], "alt": it["alt_listener"][0]})
    assert p.stat().st_size > 1000


# ------------------------------------------------------------------------------------------------------------
# Readers of the real formats


def test_l2l_round_trip_real_shapes(tmp_path, tiny_world):
    items = data.load_listener(tiny_world, "val")
    d = worldtools.write_l2l(tmp_path / "trevor", "test", items)
    faces = np.load(d / "p0_list_faces_clean_deca.npy")
    assert faces.shape == (len(items) * 3, 64, 184)
    assert np.load(d / "p1_speak_audio_clean_deca.npy").shape == (len(items) * 3, 256, 128)
    back = data.load_listener(tmp_path / "trevor", "test")
    assert len(back) == len(faces)
    for k, b in enumerate(back):
        it, s = items[k // 3], 64 * (k % 3)
        assert np.array_equal(b["listener"], it["listener"][s:s + 64])
        assert np.array_equal(b["speaker"], it["speaker"][s:s + 64])
        assert b["audio_rows"].shape == (256, 128) and b["start_frame"] == it["start_frame"] + s
    bad = faces[:, :, :40]
    np.save(d / "p0_list_faces_clean_deca.npy", bad)
    with pytest.raises(data.UserError, match="p0_list_faces_clean_deca.npy.*expected"):
        data.load_listener(tmp_path / "trevor", "test")


def test_react_round_trip(tmp_path, tiny_world):
    items = data.load_listener(tiny_world, "val")
    worldtools.write_react(tmp_path / "react", "val", items)
    assert (tmp_path / "react/val/Emotion/synthetic").is_dir()
    back = [b for b in data.load_listener(tmp_path / "react", "val") if "/Novice_video/" in b["name"]]
    assert len(back) == len(items)
    for b, it in zip(back, items):
        assert np.array_equal(b["listener"], it["listener"]) and np.array_equal(b["speaker"], it["speaker"])
        assert np.allclose(b["listener_attr"], it["listener_attr"], atol=1e-6)
        assert np.array_equal(b["audio"], it["audio"]) and b["fps"] == it["fps"]


def test_segments_round_trip_and_nan_error(tmp_path, tiny_world):
    items = data.load_listener(tiny_world, "test")[:2]
    worldtools.write_segments(tmp_path / "seg", "test", items)
    back = data.load_listener(tmp_path / "seg", "test")
    for b, it in zip(back, items):
        for k in ("listener", "speaker", "listener_attr", "audio", "alt_listener", "listener_beta"):
            assert np.array_equal(b[k], it[k]), k
        assert b["words"] == it["words"] and b["listener_id"] == it["listener_id"]
    segs = torch.load(tmp_path / "seg" / "segments_test.pth")
    segs[1]["p0_exp"][5, 3] = float("nan")
    torch.save(segs, tmp_path / "seg" / "segments_test.pth")
    with pytest.raises(data.UserError, match=r"segments_test.pth \[segment 1\]: p0_exp holds NaN"):
        data.load_listener(tmp_path / "seg", "test")
    with pytest.raises(data.UserError, match="no such dataset folder"):
        data.load_listener(tmp_path / "missing", "test")
    with pytest.raises(data.UserError, match="found no val split"):
        data.load_listener(tmp_path / "seg", "val")


def test_vocaset_reader_real_60fps_and_synthetic(tmp_path, tiny_world):
    items = data.load_talking(tiny_world, "train")
    assert {i["style"] for i in items} == set(range(8))
    it = items[0]
    assert it["vertices"].shape[1:] == it["template"].shape and abs(len(it["audio"]) / data.SR * 30 - len(
        it["vertices"])) <= 1
    assert {i["subject"] for i in data.load_talking(tiny_world, "test")} == set(data.TEST_SUBJECTS)
    lip, upper = data.talking_regions(tiny_world)
    assert lip.max() < it["template"].shape[0] and len(set(lip) & set(upper)) == 0
    # a real-format VOCASET folder at 60 fps (5 vertices): the reader keeps every second frame
    d = tmp_path / "voca"
    (d / "wav").mkdir(parents=True)
    (d / "vertices_npy").mkdir()
    subj = data.VAL_SUBJECTS[0]
    v = np.random.default_rng(0).standard_normal((120, 15)).astype(np.float32)
    np.save(d / "vertices_npy" / f"{subj}_sentence21.npy", v)
    data.write_wav(d / "wav" / f"{subj}_sentence21.wav", np.zeros(2 * data.SR, np.float32))
    pickle.dump({subj: np.zeros((5, 3))}, open(d / "templates.pkl", "wb"))
    (b,) = data.load_talking(d, "val")
    assert b["vertices"].shape == (60, 5, 3) and np.array_equal(b["vertices"][1], v[2].reshape(5, 3))
    np.save(d / "vertices_npy" / f"{subj}_sentence21.npy", v[:, :14])
    with pytest.raises(data.UserError, match="sentence21.npy.*expected"):
        data.load_talking(d, "val")
    assert data.talking_references(d, f"{subj}_sentence21") is None         # real data: no hidden rules


def test_talking_references_bracket_the_gt(tiny_world):
    """alt-GT re-draws only the unpredictable parts; speech_only drops them. The clips are unposed (no head sway), so
    both nearly match the GT lips (far below the static template's error); alt differs from GT (blinks, drift);
    unposed() zeroes the head rotation only."""
    import metrics
    items = data.load_talking(tiny_world, "test")
    refs = [data.talking_references(tiny_world / "vocaset", it["name"]) for it in items]
    gts = [it["vertices"] for it in items]
    lip, _ = data.talking_regions(tiny_world)
    assert all(r["alt"].shape == g.shape == r["speech_only"].shape for r, g in zip(refs, gts))
    lve = {k: metrics.lip_vertex_error([r[k] for r in refs], gts, lip) for k in ("alt", "speech_only")}
    static = metrics.lip_vertex_error([np.repeat(it["template"][None], len(it["vertices"]), 0) for it in items], gts, lip)
    assert 0 < lve["speech_only"] < 0.05 * static and 0 < lve["alt"] < 0.05 * static
    # another subject's speaking style on the same speech: a perfect style-conditioned model
    assert refs[0]["train_styles"].shape == (len(data.TRAIN_SUBJECTS),) + gts[0].shape
    styled = np.mean([metrics.lip_vertex_error([r["train_styles"][s] for r in refs], gts, lip) for s in range(8)])
    assert 3 * lve["speech_only"] < styled < static
    # averaging those faces over the styles is never worse (Jensen): the protocol rewards a style-blind mean
    assert metrics.lip_vertex_error([r["train_styles"].mean(0) for r in refs], gts, lip) <= styled
    assert not np.allclose(refs[0]["alt"], gts[0])
    m = np.zeros((5, data.MOTION_DIM), np.float32)
    m[:, data.HEAD], m[:, data.JAW_PITCH] = 0.1, 0.2
    u = data.unposed(m)
    assert (u[:, data.HEAD] == 0).all() and (u[:, data.JAW_PITCH] == 0.2).all() and (m[:, data.HEAD] == 0.1).all()


# ------------------------------------------------------------------------------------------------------------
# Audio


def test_mfcc_sine_silence_rates_and_stereo():
    t = np.arange(data.SR) / data.SR
    sine = 0.5 * np.sin(2 * np.pi * 440 * t).astype(np.float32)
    a = data.mfcc(sine)
    assert a.shape == (120, 40) and a.dtype == np.float32
    assert np.abs(a[10:-10] - a[10:-10].mean(0)).max() < 2.0                 # a steady tone: steady rows
    t44 = np.arange(44100) / 44100
    b = data.mfcc(0.5 * np.sin(2 * np.pi * 440 * t44), sr=44100)             # any rate: resampled to 16 kHz
    assert b.shape == (120, 40) and np.abs(a[5:-5] - b[5:-5]).mean() < 0.1
    stereo = data.mfcc(np.stack([sine, sine], 1))
    assert np.allclose(stereo, a, atol=1e-4)
    silence = data.mfcc(np.zeros(data.SR, np.float32), rate=50)
    assert silence.shape == (50, 40) and np.isfinite(silence).all() and np.ptp(silence, 0).max() < 1e-3
    assert silence[:, 0].mean() < a[:, 0].mean() - 10                         # silence has far less energy
    assert data.mfcc(sine, n_rows=37).shape == (37, 40)
    with pytest.raises(ValueError, match="non-empty"):
        data.mfcc(np.zeros(0))
    with pytest.raises(ValueError, match="the item has no audio"):
        data.mfcc(None)


def test_resample_is_band_limited_without_wrap_around():
    """Windowed-sinc polyphase resampling: a sine survives 44.1 -> 16 kHz and 8 -> 16 kHz to the edges, a constant
    stays constant, a burst at the end does not leak into the start (a periodic FFT resampler wraps it around),
    a prime length gets the same treatment, and the sample-by-sample path for awkward ratios agrees."""
    sine = lambda sr, n, f=440.0: np.sin(2 * np.pi * f * np.arange(n) / sr + 0.3)
    y = data.resample(sine(44100, 44100).astype(np.float32), 44100, 16000)
    assert y.shape == (16000,) and y.dtype == np.float32
    assert np.abs(y - sine(16000, 16000)).max() < 1e-3                        # first and last samples included
    y = data.resample(sine(8000, 8000), 8000, 16000)
    assert np.abs(y - sine(16000, 16000))[:-1].max() < 2e-3                    # the last one lies past the input
    assert np.abs(data.resample(np.ones(5000), 44100, 16000) - 1).max() < 1e-3
    burst = np.r_[np.zeros(40000), sine(44100, 4100, 3000)].astype(np.float32)
    assert np.abs(data.resample(burst, 44100, 16000)[:14000]).max() < 1e-6
    prime = 44111                                                              # a prime number of samples
    y = data.resample(sine(44100, prime), 44100, 16000)
    assert len(y) == round(prime * 16000 / 44100) and np.abs(y - sine(16000, len(y))).max() < 1e-3
    y = data.resample(sine(44099, 20000), 44099, 16000)                        # gcd 1: the direct path
    assert np.abs(y - sine(16000, len(y))).max() < 1e-3
    x = torch.from_numpy(sine(44100, 3000).astype(np.float32))
    up, down, rho = 160, 441, 0.99 * 160 / 441
    width = int(np.ceil(6 / rho))
    direct = data._resample_direct(data._extend(x, width, width + down), up, down, rho, width, 1088)
    assert np.abs(direct - data.resample(x, 44100, 16000)).max() < 1e-5
    assert data.resample(np.ones(1), 8000, 16000).shape == (2,) and data.resample(np.zeros(0), 8000, 16000).shape == (0,)


def test_load_wav_bad_files(tmp_path):
    w = 0.1 * np.random.default_rng(0).standard_normal(8000).astype(np.float32)
    good = tmp_path / "good.wav"
    data.write_wav(good, w, sr=8000)
    x = data.load_wav(good)
    assert x.shape == (16000,)                                                 # 8 kHz -> 16 kHz
    with pytest.raises(data.UserError, match="missing.wav"):
        data.load_wav(tmp_path / "missing.wav")
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(data.UserError, match="empty.wav: empty"):
        data.load_wav(tmp_path / "empty.wav")
    (tmp_path / "trunc.wav").write_bytes(good.read_bytes()[:5000])
    with pytest.raises(data.UserError, match="trunc.wav: truncated"):
        data.load_wav(tmp_path / "trunc.wav")
    (tmp_path / "text.wav").write_text("this is not audio at all, just text" * 10)
    with pytest.raises(data.UserError, match="text.wav: not a readable audio file"):
        data.load_wav(tmp_path / "text.wav")


def test_listener_windows_normalise_with_train_stats(tiny_world):
    mean, std = data.load_stats(tiny_world)
    items = data.load_listener(tiny_world, "train")
    ds = data.ListenerWindows(items, window=64, stride=32, mean=mean, std=std)
    assert len(ds) == len(items) * 6
    b = ds[3]
    assert b["listener"].shape == (64, 56) and b["audio"].shape == (64 * data.SR // data.FPS,)
    raw = items[b["item"]]["listener"][b["start"]:b["start"] + 64]
    assert torch.allclose(ds.denormalise(b["listener"]), torch.from_numpy(raw), atol=1e-5)
    allw = torch.stack([ds[k]["listener"] for k in range(len(ds))])
    assert allw.mean().abs() < 0.5                                             # roughly z-normalised


# ------------------------------------------------------------------------------------------------------------
# A user's mistakes: one line that names the file, what was expected and what was found


def _l2l(tmp, world):
    return worldtools.write_l2l(tmp / "l2l", "train", data.load_listener(world, "val")[:1])


def _react(tmp, world):
    worldtools.write_react(tmp / "react", "val", data.load_listener(world, "val")[:1])
    return tmp / "react"


def _seg(tmp, world, mutate):
    worldtools.write_segments(tmp / "seg", "train", data.load_listener(world, "val")[:2])
    f = tmp / "seg" / "segments_train.pth"
    segs = torch.load(f)
    mutate(segs)
    torch.save(segs, f)
    return tmp / "seg"


def _voca(tmp, world):
    import shutil
    shutil.copytree(world / "vocaset", tmp / "voca")
    return tmp / "voca"


def _save_pickle(f, obj):
    with open(f, "wb") as fh:
        pickle.dump(obj, fh)


def _drop_subject(d):
    tpl = pickle.load(open(d / "templates.pkl", "rb"))
    del tpl[data.TEST_SUBJECTS[0]]
    _save_pickle(d / "templates.pkl", tpl)
    return d


MISTAKES = {   # name: (make the broken dataset and read it, the message expected)
    "missing data folder": (lambda t, w: data.resolve_data(str(t / "nope"), "talking"),
                            r"nope: no such dataset folder \(expected a world root"),
    "no known layout": (lambda t, w: data.load_listener(t, "train"), r"in none of the known layouts: expected"),
    "missing split": (lambda t, w: data.load_listener(_l2l(t, w).parent, "test"),
                      r"l2l: found no test split in this l2l dataset \(expected test/p0_list"),
    "missing L2L speaker file": (lambda t, w: ((_l2l(t, w) / "p1_speak_faces_clean_deca.npy").unlink(),
                                               data.load_listener(t / "l2l", "train")),
                                 r"p1_speak_faces_clean_deca.npy: missing file \(expected the speaker's file"),
    "L2L motion as integers": (lambda t, w: (np.save(_l2l(t, w) / "p0_list_faces_clean_deca.npy",
                                                     np.zeros((3, 64, 184), np.int64)),
                                             data.load_listener(t / "l2l", "train")),
                               r"p0_list_faces_clean_deca.npy: listener motion has dtype int64, expected floating"),
    "unreadable npy": (lambda t, w: ((_l2l(t, w) / "p1_speak_audio_clean_deca.npy").write_bytes(b"\x93NUMPY junk"),
                                     data.load_listener(t / "l2l", "train")),
                       r"p1_speak_audio_clean_deca.npy: not a readable .npy file"),
    "segment of the wrong width": (lambda t, w: data.load_listener(_seg(t, w, lambda s: s[1].update(
        p1_exp=s[1]["p1_exp"][:, :40])), "train"),
                                   r"segments_train.pth \[segment 1\]: p1_exp has shape \(240, 40\), expected \(240, 50\)"),
    "segment of the wrong length": (lambda t, w: data.load_listener(_seg(t, w, lambda s: s[0].update(
        p0_pose=s[0]["p0_pose"][:100])), "train"), r"\[segment 0\]: p0_pose has shape \(100, 6\), expected \(240, 6\)"),
    "segment motion as integers": (lambda t, w: data.load_listener(_seg(t, w, lambda s: s[0].update(
        p0_exp=s[0]["p0_exp"].long())), "train"), r"\[segment 0\]: p0_exp has dtype int64, expected floating point"),
    "segment without keys": (lambda t, w: data.load_listener(_seg(t, w, lambda s: s[1].pop("p1_pose")), "train"),
                             r"segments_train.pth: segment 1 lacks keys \['p1_pose'\]"),
    "segment words malformed": (lambda t, w: data.load_listener(_seg(t, w, lambda s: s[0].update(
        during_words=[{"word": "x"}])), "train"), r"\[segment 0\]: before_words / during_words: expected lists"),
    "unreadable pth": (lambda t, w: ((t / "segments_val.pth").write_bytes(b"not a torch file"),
                                     data.load_listener(t, "val")), r"segments_val.pth: not a readable torch file"),
    "missing segment wav": (lambda t, w: (_seg(t, w, lambda s: None), (t / "seg/wav/seg00001.wav").unlink(),
                                          data.load_listener(t / "seg", "train")),
                            r"seg00001.wav: no such audio file \(expected a .wav file\)"),
    "REACT 3DMM of the wrong width": (lambda t, w: (np.save(next((_react(t, w) / "val/3D_FV_files").rglob(
        "Novice_video/1.npy")), np.zeros((240, 1, 40), np.float32)), data.load_listener(t / "react", "val")),
        r"Novice_video/1.npy: 3DMM coefficients have shape \(240, 1, 40\), expected \(T, 1, D\) or \(T, D\) with D = (56 as the other clips|58 \(FaceVerse\))"),
    "REACT missing 3DMM file": (lambda t, w: (next((_react(t, w) / "val/3D_FV_files").rglob("Expert_video/1.npy"))
                                              .unlink(), data.load_listener(t / "react", "val")),
                                r"Expert_video/1.npy: missing file \(expected the 3DMM coefficients"),
    "REACT attributes of the wrong width": (lambda t, w: (next((_react(t, w) / "val/Emotion").rglob(
        "Novice_video/1.csv")).write_text("a,b\n1,2\n"), data.load_listener(t / "react", "val")),
        r"Novice_video/1.csv: attributes have shape \(1, 2\), expected \(T, 25\)"),
    "missing statistics": (lambda t, w: data.load_stats(worldtools.write_segments(t / "seg", "test", data.load_listener(
        w, "val")[:1])), r"seg/mean.npy: missing file \(expected the train statistics mean.npy and std.npy, or a train"),
    "missing templates": (lambda t, w: ((_voca(t, w) / "templates.pkl").unlink(), data.load_talking(t / "voca",
                                                                                                     "test")),
                          r"voca/templates.pkl: missing \(expected the VOCASET layout"),
    "subject without template": (lambda t, w: data.load_talking(_drop_subject(_voca(t, w)), "test"),
                                 rf"templates.pkl: no template for subject {data.TEST_SUBJECTS[0]} \(expected an entry"),
    "unreadable templates": (lambda t, w: ((_voca(t, w) / "templates.pkl").write_text("junk"),
                                           data.load_talking(t / "voca", "val")),
                             r"templates.pkl: not a readable pickle"),
    "vertices as integers": (lambda t, w: (np.save(sorted((_voca(t, w) / "vertices_npy").glob(
        f"{data.VAL_SUBJECTS[0]}_*.npy"))[0], np.zeros((40, 900), np.int32)), data.load_talking(t / "voca", "val")),
        r"_sentence21.npy: vertices has dtype int32, expected floating point"),
    "missing regions": (lambda t, w: ((_voca(t, w) / "regions.npz").unlink(), data.talking_regions(t / "voca")),
                        r"regions.npz: missing \(expected lip_idx and upper_idx"),
    "empty wav": (lambda t, w: (data.write_wav(t / "a.wav", np.zeros(0)), data.load_wav(t / "a.wav")),
                  r"a.wav: audio file holds no samples \(expected at least one\)"),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_user_mistakes_give_one_line_naming_the_file(mistake, tmp_path, tiny_world):
    make, message = MISTAKES[mistake]
    with pytest.raises(data.UserError, match=message) as e:
        make(tmp_path, tiny_world)
    assert "\n" not in str(e.value) and str(tmp_path) in str(e.value)


def test_our_own_bugs_keep_their_exception(tiny_world):
    with pytest.raises(ValueError, match="split must be"):
        data.load_listener(tiny_world, "dev")                                  # a caller's bug, not the user's
    with pytest.raises(KeyError):
        data.resolve_data(str(tiny_world), "speaking")


# ------------------------------------------------------------------------------------------------------------
# The original layouts as their authors release them: tiny fixtures written here with the names, dtypes, shapes and
# time origins that the original loaders read, read back by our readers


def test_lm_listener_release_layout(tmp_path, capsys):
    """LM-Listener: frames are the video's, word `end` is seconds from the video start, segments differ in length,
    shapes (T, 100) and p0_detail, no audio; stats from mean.npy, else p0_mean.npy, else the train split."""
    rng = np.random.default_rng(0)
    d = tmp_path / "trevor"
    d.mkdir()
    for split, starts in {"train": [(900, 1140), (1500, 1680), (4000, 4300)], "test": [(300, 540)]}.items():
        segs = []
        for a, b in starts:
            t = lambda *shape: torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
            segs.append({"fname": "trevor/ep12/clip3", "split_start_frame": a, "split_end_frame": b,
                         **{f"p{p}_{k}": t(b - a, n) for p in (0, 1) for k, n in (("exp", 50), ("pose", 6),
                                                                                  ("shape", 100))},
                         "p0_detail": t(b - a, 128),
                         "before_words": [{"text": "so", "start": a / 30 - 1.2, "end": a / 30 - 1.0}],
                         "during_words": [{"text": "well", "start": a / 30 + 0.5, "end": a / 30 + 0.75},
                                          {"text": "yes", "start": b / 30 - 0.4, "end": b / 30 - 0.1}]})
        torch.save(segs, d / f"segments_{split}.pth")
    items = data.load_listener(d, "train")
    assert [len(i["listener"]) for i in items] == [240, 180, 300]               # segments of different lengths
    assert [i["start_frame"] for i in items] == [900, 1500, 4000] and all(i["audio"] is None for i in items)
    assert [w for w, _ in items[1]["words"]] == ["so", "well", "yes"]
    assert np.allclose([e for _, e in items[1]["words"]], [-1.0, 0.75, 6.0 - 0.1])   # from the segment start
    segs = torch.load(d / "segments_train.pth")
    assert np.array_equal(items[2]["listener"], np.c_[segs[2]["p0_exp"], segs[2]["p0_pose"]])
    assert np.array_equal(items[2]["listener_beta"], segs[2]["p0_shape"][0].numpy())
    mean, std = data.load_stats(d)                                             # none shipped: the train split
    allf = np.concatenate([i["listener"] for i in items])
    assert np.allclose(mean, allf.mean(0), atol=1e-6) and np.allclose(std, allf.std(0), atol=1e-5)
    assert "ships no listener statistics: computed from its 3 train items" in capsys.readouterr().out
    np.save(d / "p0_mean.npy", np.ones(56, np.float32))
    np.save(d / "p0_std.npy", np.full(56, 2, np.float32))
    assert (data.load_stats(d)[1] == 2).all()
    np.save(d / "mean.npy", np.zeros(56, np.float32))
    np.save(d / "std.npy", np.full(56, 3, np.float32))
    assert (data.load_stats(d)[1] == 3).all()                                  # mean.npy first, as dataset_TM reads
    with pytest.raises(data.UserError, match="found no val split in this segments dataset"):
        data.load_listener(d, "val")


def _l2l_release(root, channel, n_train=10, n_test=3):
    """Learning2Listen's <channel>/{train,test}/p{0,1}_{list_faces,speak_faces,speak_audio,speak_files}_clean_deca.npy."""
    rng = np.random.default_rng(1)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        d = root / channel / split
        d.mkdir(parents=True)
        for p in (0, 1):
            for kind, shape in (("list_faces", (n, 64, 184)), ("speak_faces", (n, 64, 184)),
                                ("speak_audio", (n, 256, 128))):
                out[split, p, kind] = rng.standard_normal(shape).astype(np.float32)
                np.save(d / f"p{p}_{kind}_clean_deca.npy", out[split, p, kind])
            files = np.array([[[f"{channel}/vid{i}", f"p{p}", str(64 * i + f)] for f in range(64)] for i in range(n)])
            np.save(d / f"p{p}_speak_files_clean_deca.npy", files)
    return root / channel, out


def test_learning2listen_release_layout(tmp_path, capsys):
    """train/ and test/ only: val is Learning2Listen's 70/30 re-split of train (fixed seed, one printed line); one
    direction (p0 listens, p1 on Fallon's channel; both behind l2l_listener); statistics as its mean_std_swap."""
    d, raw = _l2l_release(tmp_path, "trevor")
    tr, va, te = (data.load_listener(d, s) for s in ("train", "val", "test"))
    assert (len(tr), len(va), len(te)) == (7, 3, 3)                            # int(0.7 N) / the rest / test
    said = capsys.readouterr().out
    assert said.count("has no val/") == 1 and f"seed {data.L2L_VAL_SEED}" in said
    rows = lambda items: {int(i["name"].split("vid")[1].split(":")[0]) for i in items}
    assert rows(tr) | rows(va) == set(range(10)) and not rows(tr) & rows(va)
    k = sorted(rows(va))[0]
    v = next(i for i in va if rows([i]) == {k})
    assert np.array_equal(v["listener"], raw["train", 0, "list_faces"][k, :, :56])    # p0 listens to p1
    assert np.array_equal(v["speaker"], raw["train", 1, "speak_faces"][k, :, :56])
    assert np.array_equal(v["audio_rows"], raw["train", 1, "speak_audio"][k]) and v["start_frame"] == 64 * k
    assert rows(data.load_listener(d, "train")) == rows(tr)                    # the same split every time
    assert len(data.load_listener(d, "test", l2l_listener="both")) == 6
    mean, std = data.load_stats(d)
    w = raw["train", 0, "list_faces"][sorted(rows(tr)), :, :56].astype(np.float64)
    assert np.allclose(mean, w.mean(1).mean(0), atol=1e-6)
    assert np.allclose(std, np.maximum(w.std(1).std(0) + 1e-10, 1e-3), atol=1e-6)
    f, raw_f = _l2l_release(tmp_path, "fallon")
    it = data.load_listener(f, "test")[0]
    assert np.array_equal(it["listener"], raw_f["test", 1, "list_faces"][0, :, :56])  # Fallon: p1 listens
    (f / "test" / "p0_speak_audio_clean_deca.npy").unlink()
    with pytest.raises(data.UserError, match=r"p0_speak_audio_clean_deca.npy: missing file \(expected the speaker"):
        data.load_listener(f, "test")


def _react_release(root, T=20, fps=25):
    """REACT 2023: NoXI sessions and UDIVA's deeper talk/<id>/FC1 folders, 3DMM (T, 1, 58), Emotion csv (header +
    T x 25), 44.1 kHz stereo wav, <split>.csv pairs, and the appropriateness files."""
    import soundfile as sf
    rng = np.random.default_rng(2)
    pairs = [("NoXI/010_2016-03-25_Paris/Expert_video/3", "NoXI/010_2016-03-25_Paris/Novice_video/3"),
             ("UDIVA/talk/005013/FC1/1", "UDIVA/talk/005013/FC2/1"),
             ("UDIVA/animal/005013/FC1/2", "UDIVA/animal/005013/FC2/2")]
    for clip in [c for p in pairs for c in p]:
        for kind in ("Emotion", "3D_FV_files", "Audio_files"):
            (root / "val" / kind / clip).parent.mkdir(parents=True, exist_ok=True)
        np.save(root / "val" / "3D_FV_files" / f"{clip}.npy", rng.standard_normal((T, 1, 58)).astype(np.float32))
        att = np.c_[rng.integers(0, 2, (T, 15)), rng.uniform(-1, 1, (T, 2)), rng.dirichlet(np.ones(8), T)]
        np.savetxt(root / "val" / "Emotion" / f"{clip}.csv", att, delimiter=",", header=",".join(data.ATTR_NAMES),
                   comments="")
        sf.write(root / "val" / "Audio_files" / f"{clip}.wav", 0.1 * rng.standard_normal((T * 44100 // fps, 2)),
                 44100)
    (root / "val.csv").write_text(",speaker_path,listener_path\n" + "".join(
        f"{i},{s},{l}\n" for i, (s, l) in enumerate(pairs)))
    return pairs


def test_react_release_layout(tmp_path):
    """Pairs from val.csv in the mirrored order, UDIVA one level deeper, 58-d 3DMM, 44.1 kHz audio; the appropriate
    reactions from neighbour_emotion_val.npy, or cut from Approprirate_facial_reaction.npy as matrix_split.py does."""
    pairs = _react_release(tmp_path)
    items = data.load_listener(tmp_path, "val")
    assert [i["name"] for i in items] == [l for _, l in pairs] + [s for s, _ in pairs]   # mirrored, 2N
    it = items[1]
    assert it["listener"].shape == (20, 58) and it["fps"] == 25 and it["audio"].shape == (20 * data.SR // 25,)
    assert np.array_equal(it["speaker"], np.load(tmp_path / "val/3D_FV_files/UDIVA/talk/005013/FC1/1.npy")[:, 0])
    assert it["alt_listener"] is None
    M = np.zeros((6, 6))
    M[0, [0, 4]] = M[1, [1]] = M[2, [2, 3]] = M[3, [3]] = M[4, [4, 0]] = M[5, [5, 1]] = 1
    np.save(tmp_path / "neighbour_emotion_val.npy", M)
    items = data.load_listener(tmp_path, "val")
    assert items[0]["alt_listener"].shape == (2, 20, 58) and items[1]["alt_listener"].shape == (1, 20, 58)
    assert np.array_equal(items[2]["alt_listener"][1], items[3]["listener"])
    assert np.array_equal(items[2]["alt_listener_attr"][1], items[3]["listener_attr"])
    # the official whole-dataset matrix (2M x 2M, second half the other role) and its clip index instead
    (tmp_path / "neighbour_emotion_val.npy").unlink()
    index = [("noxi", "001_2016-03-17_Paris", "1"), ("UDIVA", "005013_animal", "2"), ("NoXI", "010_2016-03-25_Paris", "3"),
             ("UDIVA", "005013_talk", "1")]
    (tmp_path / "data_indices.csv").write_text("site,session,clip\n" + "".join(",".join(r) + "\n" for r in index))
    at = [2, 3, 1]                                                             # our pairs' rows in the index
    full = np.zeros((8, 8))
    for a in range(6):
        for b in range(6):
            full[at[a % 3] + 4 * (a >= 3), at[b % 3] + 4 * (b >= 3)] = M[a, b]
    np.save(tmp_path / data.REACT_APPROPRIATE, full)
    again = data.load_listener(tmp_path, "val")
    assert all(np.array_equal(a["alt_listener"], b["alt_listener"]) for a, b in zip(items, again))
    np.save(tmp_path / data.REACT_APPROPRIATE, full[:6, :6])
    (tmp_path / "data_indices.csv").write_text("site,session,clip\n" + "".join(",".join(r) + "\n" for r in index[:3]))
    with pytest.raises(data.UserError, match=r"data_indices.csv: has no row for clip UDIVA/talk/005013/FC1/1"):
        data.load_listener(tmp_path, "val")
    (tmp_path / data.REACT_APPROPRIATE).unlink()
    np.save(tmp_path / "neighbour_emotion_val.npy", M[:4, :4])
    with pytest.raises(data.UserError, match=r"neighbour_emotion_val.npy: appropriateness matrix has shape \(4, 4\), "
                                             r"expected \(6, 6\)"):
        data.load_listener(tmp_path, "val")


def test_react_without_pair_csv_walks_sessions_at_any_depth(tmp_path):
    pairs = _react_release(tmp_path)
    (tmp_path / "val.csv").unlink()
    names = [i["name"] for i in data.load_listener(tmp_path, "val")]
    assert sorted(names) == sorted(c for p in pairs for c in p)                # each person the listener once


def test_vocaset_release_layout(tmp_path, capsys):
    """VOCASET as FaceFormer / DiffSpeaker read it: 60 fps (T, V*3) vertices halved to 30 fps, templates.pkl with
    latin1 encoding, FLAME_masks.pkl for the regions (lips; forehead + eye region), unpaired files skipped."""
    rng = np.random.default_rng(3)
    V = 12
    (tmp_path / "wav").mkdir()
    (tmp_path / "vertices_npy").mkdir()
    subj = data.TEST_SUBJECTS[0]
    for k in (21, 22, 23):
        if k != 23:
            np.save(tmp_path / "vertices_npy" / f"{subj}_sentence{k}.npy", rng.standard_normal((120, V * 3)).astype(
                np.float32))
        data.write_wav(tmp_path / "wav" / f"{subj}_sentence{k}.wav", np.zeros(2 * data.SR))
    with open(tmp_path / "templates.pkl", "wb") as f:
        pickle.dump({s: rng.standard_normal((V, 3)) for s in data.TEST_SUBJECTS}, f, protocol=2)
    with open(tmp_path / "FLAME_masks.pkl", "wb") as f:
        pickle.dump({"lips": np.array([1, 2, 3]), "forehead": np.array([8, 9]), "eye_region": np.array([6, 7, 8]),
                     "nose": np.array([4])}, f, protocol=2)
    items = data.load_talking(tmp_path, "test")
    assert [i["name"] for i in items] == [f"{subj}_sentence21", f"{subj}_sentence22"]
    assert items[0]["vertices"].shape == (60, V, 3)                             # 60 fps -> 30 fps
    assert "skipped 1 test file(s) without their wav / vertices partner" in capsys.readouterr().out
    lip, upper = data.talking_regions(tmp_path)
    assert lip.tolist() == [1, 2, 3] and upper.tolist() == [6, 7, 8, 9]
    with open(tmp_path / "FLAME_masks.pkl", "wb") as f:
        pickle.dump({"lips": np.array([1])}, f)
    with pytest.raises(data.UserError, match=r"FLAME_masks.pkl: lacks regions \['forehead', 'eye_region'\]"):
        data.talking_regions(tmp_path)
