"""data.py: the world's rules carry signal, the readers read the real formats, audio and bad input behave."""
import json
import pickle

import numpy as np
import pytest
import torch

import data

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
    with pytest.raises(FileNotFoundError, match="no such dataset folder"):
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
    d = data.write_l2l(tmp_path / "trevor", "test", items)
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
    with pytest.raises(ValueError, match="p0_list_faces_clean_deca.npy.*expected"):
        data.load_listener(tmp_path / "trevor", "test")


def test_react_round_trip(tmp_path, tiny_world):
    items = data.load_listener(tiny_world, "val")
    data.write_react(tmp_path / "react", "val", items)
    assert (tmp_path / "react/val/Emotion/synthetic").is_dir()
    back = [b for b in data.load_listener(tmp_path / "react", "val") if "/Novice_video/" in b["name"]]
    assert len(back) == len(items)
    for b, it in zip(back, items):
        assert np.array_equal(b["listener"], it["listener"]) and np.array_equal(b["speaker"], it["speaker"])
        assert np.allclose(b["listener_attr"], it["listener_attr"], atol=1e-6)
        assert np.array_equal(b["audio"], it["audio"]) and b["fps"] == it["fps"]


def test_segments_round_trip_and_nan_error(tmp_path, tiny_world):
    items = data.load_listener(tiny_world, "test")[:2]
    data.write_segments(tmp_path / "seg", "test", items)
    back = data.load_listener(tmp_path / "seg", "test")
    for b, it in zip(back, items):
        for k in ("listener", "speaker", "listener_attr", "audio", "alt_listener", "listener_beta"):
            assert np.array_equal(b[k], it[k]), k
        assert b["words"] == it["words"] and b["listener_id"] == it["listener_id"]
    segs = torch.load(tmp_path / "seg" / "segments_test.pth")
    segs[1]["p0_exp"][5, 3] = float("nan")
    torch.save(segs, tmp_path / "seg" / "segments_test.pth")
    with pytest.raises(ValueError, match=r"segments_test.pth \[segment 1\]: p0_exp holds NaN"):
        data.load_listener(tmp_path / "seg", "test")
    with pytest.raises(FileNotFoundError, match="no such dataset folder"):
        data.load_listener(tmp_path / "missing", "test")
    with pytest.raises(FileNotFoundError, match="found no val split"):
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
    with pytest.raises(ValueError, match="sentence21.npy.*expected"):
        data.load_talking(d, "val")
    assert data.talking_references(d, f"{subj}_sentence21") is None         # real data: no hidden rules


def test_talking_references_bracket_the_gt(tiny_world):
    """alt-GT re-draws only the unpredictable parts; speech_only drops them. The clips are unposed (no head sway), so
    both nearly match the GT lips (default world LVE 1e-5 / 2e-5 vs the static template's 0.0049); alt differs from
    GT (blinks, drift); unposed() zeroes the head rotation only."""
    import metrics
    items = data.load_talking(tiny_world, "test")
    refs = [data.talking_references(tiny_world / "vocaset", it["name"]) for it in items]
    gts = [it["vertices"] for it in items]
    lip, _ = data.talking_regions(tiny_world)
    assert all(r["alt"].shape == g.shape == r["speech_only"].shape for r, g in zip(refs, gts))
    lve = {k: metrics.lip_vertex_error([r[k] for r in refs], gts, lip) for k in ("alt", "speech_only")}
    static = metrics.lip_vertex_error([np.repeat(it["template"][None], len(it["vertices"]), 0) for it in items], gts, lip)
    assert 0 < lve["speech_only"] < 0.05 * static and 0 < lve["alt"] < 0.05 * static
    # another subject's speaking style on the same speech: a perfect style-conditioned model (default world 17 %)
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


def test_load_wav_bad_files(tmp_path):
    w = 0.1 * np.random.default_rng(0).standard_normal(8000).astype(np.float32)
    good = tmp_path / "good.wav"
    data.write_wav(good, w, sr=8000)
    x = data.load_wav(good)
    assert x.shape == (16000,)                                                 # 8 kHz -> 16 kHz
    with pytest.raises(FileNotFoundError, match="missing.wav"):
        data.load_wav(tmp_path / "missing.wav")
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.wav: empty"):
        data.load_wav(tmp_path / "empty.wav")
    (tmp_path / "trunc.wav").write_bytes(good.read_bytes()[:5000])
    with pytest.raises(ValueError, match="trunc.wav: truncated"):
        data.load_wav(tmp_path / "trunc.wav")
    (tmp_path / "text.wav").write_text("this is not audio at all, just text" * 10)
    with pytest.raises(ValueError, match="text.wav: not a readable audio file"):
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
