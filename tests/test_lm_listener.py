"""lm_listener.py: sequence builder (Eq. 1/2), tokenisers, causality, KV cache, overfit, determinism, CLI, user errors,
exact resume, mixed precision, torchrun (DDP)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import lm_listener as L

ROOT = Path(__file__).resolve().parents[1]
MODS = ["W", "SA", "emo"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@torch.no_grad()
def decode_full(model, chunks, V):
    """Greedy decoding that recomputes the whole prefix at every step (quadratic): the reference for the KV cache."""
    seq, out = [], []
    for ch in chunks:
        seq += ch
        out.append(int(model.lr_head(model(torch.tensor([seq]))[0, -1]).argmax()))
        seq += [V.lr0 + out[-1], V.b["</lr>"]]
    return out


def split_chunks(ids, kind):
    """Cut a stage-2 sequence at its LR tokens: chunk i = everything after </lr>_{i-1} up to and including <lr>_i."""
    pos = [p for p, k in enumerate(kind) if k == 2]
    return [ids[s:p] for s, p in zip([0] + [p + 2 for p in pos[:-1]], pos)]


def tiny_cfg(**kw):
    return L.Config(**{**dict(n_layer=2, d_model=32, n_head=2, ctx=128, dropout=0.0), **kw})


def random_clip(V, G=4, seed=0):
    """A clip with G groups: random words (some history), 3-4 SA tokens per group, random emo and LR."""
    g = np.random.default_rng(seed)
    ends = sorted(g.uniform(-20, G * L.R, size=3 * G))
    words = [(int(g.integers(3, V.V_W)), float(e)) for e in ends]
    sa_end = torch.arange(1, 4 * G + 1) * (L.R * G / (4 * G + 0.5))
    return dict(words=words, sa=torch.as_tensor(g.integers(0, V.v_sa, len(sa_end))), isc=torch.as_tensor(g.integers(0, V.v_sa, len(sa_end))),
                sa_end=sa_end, emo=torch.as_tensor(g.integers(0, 8, G)), lr=torch.as_tensor(g.integers(0, V.v_lr, G)))


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other processes on a loaded machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def V():
    return L.Vocab(["a", "b", "c", "d", "e"], v_sa=6, v_lr=10)


def test_sequence_builder_hand_example(V):
    # r = 8, 2 groups; words end at frames -3 (history), 5 (group 1), 9 (group 2); SA tokens end at 4, 8, 8.5, 16
    a, b, c = V.w2i["a"], V.w2i["b"], V.w2i["c"]
    clip = dict(words=[(a, -3.0), (b, 5.0), (c, 9.0)], sa=torch.tensor([0, 1, 2, 3]), isc=torch.tensor([5, 5, 5, 5]),
                sa_end=torch.tensor([4.0, 8.0, 8.5, 16.0]), emo=torch.tensor([2, 7]), lr=torch.tensor([4, 9]))
    B, sa, e, lr = V.b, V.sa0, V.emo0, V.lr0
    ids, kind = L.build_sequence(clip, 0, 2, V, MODS, n_hist=8)
    expect = [V.w2i["<bos>"], a,
              b, B["<sa>"], sa + 0, sa + 1, B["</sa>"], B["<emo>"], e + 2, B["</emo>"], B["<lr>"], lr + 4, B["</lr>"],
              c, B["<sa>"], sa + 2, sa + 3, B["</sa>"], B["<emo>"], e + 7, B["</emo>"], B["<lr>"], lr + 9, B["</lr>"]]
    assert ids == expect
    assert [p for p, k in enumerate(kind) if k == 1] == [2, 4, 5, 8, 13, 15, 16, 19]   # W, SA, emo content after W^h
    assert [p for p, k in enumerate(kind) if k == 2] == [11, 22]                       # exactly G LR positions
    ids1, kind1 = L.build_sequence(clip, 0, 2, V, MODS, n_hist=8, with_lr=False)       # Eq. 2: S' drops LR blocks
    assert ids1 == [t for p, t in enumerate(expect) if p not in (10, 11, 12, 21, 22, 23)]
    assert 2 not in kind1 and sum(k == 1 for k in kind1) == 8
    # a window starting at frame 8: word c (end 9) is group 1, word b (end 5) and a are history
    ids2, _ = L.build_sequence(clip, 8, 1, V, ["W"], n_hist=1)
    assert ids2 == [V.w2i["<bos>"], b, c, B["<lr>"], lr + 9, B["</lr>"]]
    assert split_chunks(ids, kind) == [expect[:11], expect[13:22]]


def test_vocab_blocks_and_w_only(V):
    Vi = L.Vocab(["a", "b"], v_sa=6, v_lr=10, isc=True)
    for voc, isc in ((V, 0), (Vi, 6)):
        blocks = [(0, voc.V_W), (voc.sa0, voc.sa0 + 6), (voc.isc0, voc.isc0 + isc), (voc.emo0, voc.emo0 + 8),
                  (voc.lr0, voc.lr0 + 10), (min(voc.b.values()), max(voc.b.values()) + 1)]
        assert all(b0[1] == b1[0] for b0, b1 in zip(blocks, blocks[1:]))              # contiguous, disjoint
        assert voc.size == voc.V_W + 6 + isc + 8 + 10 + 8 == blocks[-1][1]
    ids, _ = L.build_sequence(random_clip(V), 0, 4, V, ["W"], n_hist=8)
    assert not any(V.sa0 <= t < V.lr0 for t in ids)                                     # no SA / iSC / emo ids


def test_emotion_tokens_average_then_argmax():
    # group 1: class 0 wins 2 of 4 frames by a hair, class 1 is strong on the others -> mean argmax = 1
    p = torch.tensor([[.5, .4, .1], [.5, .4, .1], [0., 1., 0.], [.1, .1, .8],
                      [0., 0., 1.], [0., 0., 1.], [1., 0., 0.], [0., 0., 1.]])
    assert data.emo_tokens(p, r=4).tolist() == [1, 2]
    votes = p.reshape(2, 4, 3).argmax(-1)
    assert torch.mode(votes[0]).values.item() == 0                                      # majority vote would say 0


def test_residual_kmeans_and_sa_per_group(V):
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0., 0.], [10., 0.], [0., 10.], [10., 10.]])
    lab = torch.arange(400) % 4
    x = centres[lab] + 0.1 * torch.randn(400, 2, generator=g)
    c1 = data.kmeans(x, 4, seed=0)
    a = torch.cdist(x, c1).argmin(1)
    assert all(len(set(a[lab == k].tolist())) == 1 for k in range(4)) and len(set(a.tolist())) == 4
    res = x - c1[a]
    c2 = data.kmeans(res, 2, seed=1)
    km = dict(mean=torch.zeros(2), std=torch.ones(2), c1=c1, c2=c2)
    sa, isc = data.sa_tokens(x, km)
    assert torch.equal(isc, a) and torch.equal(sa, torch.cdist(res, c2).argmin(1))    # stage 2 on the residual
    clip = random_clip(V, G=4)
    ids, kind = L.build_sequence(clip, 0, 4, V, ["SA"], n_hist=0)
    per_group = [len(ch) - 3 for ch in split_chunks(ids, kind)]                     # minus <sa>, </sa>, <lr>
    per_group[0] -= 1                                                                  # <bos>
    expect = [sum(L.group_of(float(e)) == i for e in clip["sa_end"]) for i in range(1, 5)]
    assert per_group == expect and sum(expect) == len(clip["sa_end"])


def test_causal_mask_and_future_speaker_tokens(V):
    torch.manual_seed(0)
    model = L.GPT(V.size, V.v_lr, tiny_cfg()).eval()
    x = torch.randint(0, V.size, (2, 40))
    y = x.clone()
    y[:, 21:] = torch.randint(0, V.size, (2, 19))
    with torch.no_grad():
        assert (model(x)[:, :21] - model(y)[:, :21]).abs().max() < 1e-6
    # changing a speaker token of group 3 never changes the LR prediction of groups 1-2
    clip = random_clip(V, G=4)
    ids, kind = L.build_sequence(clip, 0, 4, V, MODS, n_hist=8)
    clip2 = dict(clip, emo=clip["emo"].clone(), sa=clip["sa"].clone())
    clip2["emo"][2] = (clip["emo"][2] + 1) % 8
    clip2["sa"][-1] = (clip["sa"][-1] + 1) % V.v_sa
    ids2, _ = L.build_sequence(clip2, 0, 4, V, MODS, n_hist=8)
    lr_in = [p - 1 for p, k in enumerate(kind) if k == 2]                               # <lr> positions
    with torch.no_grad():
        a, b = model.lr_head(model(torch.tensor([ids]))), model.lr_head(model(torch.tensor([ids2])))
    assert ids != ids2 and (a[0, lr_in[:2]] - b[0, lr_in[:2]]).abs().max() < 1e-6
    assert (a[0, lr_in[2]] - b[0, lr_in[2]]).abs().max() > 1e-6


def test_kv_cache_equals_uncached_and_greedy_consistency(V):
    torch.manual_seed(1)
    model = L.GPT(V.size, V.v_lr, tiny_cfg()).eval()
    for s in range(3):
        clip = random_clip(V, G=4, seed=s)
        ids, kind = L.build_sequence(clip, 0, 4, V, MODS, n_hist=8)
        chunks = split_chunks(ids, kind)
        toks = L.decode(model, V, *L.speaker_groups(clip, 0, 4, V, MODS), 8, max_groups=4)
        assert toks == decode_full(model, chunks, V) == L.decode(model, V, *L.speaker_groups(clip, 0, 4, V, MODS), 8, 4)
        ids_d, kind_d = L.build_sequence(dict(clip, lr=torch.tensor(toks)), 0, 4, V, MODS, n_hist=8)
        with torch.no_grad():
            h = model(torch.tensor([ids_d]))[0]
        lr_in = [p - 1 for p, k in enumerate(kind_d) if k == 2]
        assert model.lr_head(h[lr_in]).argmax(-1).tolist() == toks


def test_sliding_context_decodes_past_ctx(V):
    """30 groups (> ctx 128 tokens) decode; each LR_i equals a from-scratch forward pass over the context the rule
    says: [<bos>, the last n_hist words before the kept groups, the kept groups (at most 3 before it: a restart every
    4 keeps the last 2), group i's block, <lr>]."""
    torch.manual_seed(2)
    model = L.GPT(V.size, V.v_lr, tiny_cfg()).eval()
    clip = random_clip(V, G=30, seed=3)
    assert len(L.build_sequence(clip, 0, 30, V, MODS, n_hist=8)[0]) > 128
    hist, groups = L.speaker_groups(clip, 0, 30, V, MODS)
    toks = L.decode(model, V, hist, groups, 3, max_groups=4)
    start, ref = 0, []                                       # first group in context
    for i, (_, blk) in enumerate(groups):
        if i - start >= 4:
            start = i - 2
        words = hist + [w for ws, _ in groups[:start] for w in ws]
        seq = [V.w2i["<bos>"]] + words[-3:]
        for j in range(start, i):
            seq += groups[j][1] + [V.b["<lr>"], V.lr0 + ref[j], V.b["</lr>"]]
        with torch.no_grad():
            ref.append(int(model.lr_head(model(torch.tensor([seq + blk + [V.b["<lr>"]]]))[0, -1]).argmax()))
    assert toks == ref and len(toks) == 30


def test_speaker_lag_one_is_strictly_causal(V):
    """--speaker-lag 1: LR_i follows speaker group i-1's block (Eq. 4), so group i's speaker tokens cannot change LR_i;
    with lag 0 (Eq. 1) they can."""
    torch.manual_seed(0)
    model = L.GPT(V.size, V.v_lr, tiny_cfg()).eval()
    clip = random_clip(V, G=4)
    hist0, g0 = L.speaker_groups(clip, 8, 3, V, MODS)
    hist1, g1 = L.speaker_groups(clip, 8, 3, V, MODS, lag=1)
    assert [b for _, b in g1[1:]] == [b for _, b in g0[:2]] and len(hist1) <= len(hist0)
    assert g1[0][1][-2] == V.emo0 + int(clip["emo"][0])                                 # group 1's emo before LR_2
    assert L.speaker_groups(clip, 0, 2, V, MODS, lag=1)[1][0][1][-3:] != [V.b["<emo>"]] * 3  # no emo before frame 0
    changed = dict(clip, emo=clip["emo"].clone())
    changed["emo"][2] = (clip["emo"][2] + 1) % 8                                        # speaker group 3
    out = {}
    for lag in (0, 1):
        for c in (clip, changed):
            ids, kind = L.build_sequence(c, 0, 4, V, MODS, n_hist=8, lag=lag)
            lr_in = [p - 1 for p, k in enumerate(kind) if k == 2]
            with torch.no_grad():
                out.setdefault(lag, []).append(model.lr_head(model(torch.tensor([ids]))[0, lr_in[2]]))
    assert (out[1][0] - out[1][1]).abs().max() < 1e-6 and (out[0][0] - out[0][1]).abs().max() > 1e-6


def test_training_windows_are_uniform_over_all_windows():
    """Clips of 3 and 30 groups, windows of 2 groups: 2 and 29 windows, so clip 0 is drawn 2/31 of the time (not 1/2)
    and every start of a clip equally often."""
    tr = [dict(T=3 * L.R), dict(T=30 * L.R)]
    w = data.window_starts(tr, 2, np.random.default_rng(0), 31000, L.R)
    c = np.array([a for a, _ in w])
    assert abs((c == 0).mean() - 2 / 31) < 0.005
    starts = np.array([f0 for a, f0 in w if a == 1]) // L.R
    assert starts.min() == 0 and starts.max() == 28 and np.bincount(starts).std() / np.bincount(starts).mean() < 0.05
    assert all(f0 + 2 * L.R <= tr[a]["T"] for a, f0 in w)


def test_nucleus_pick_keeps_the_top_p_head():
    """p = (0.5, 0.3, 0.15, 0.05): top-p 0.7 samples only from {0, 1} (the smallest set reaching 0.7), in about a
    5 : 3 ratio; top-p 0 is greedy."""
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    gen = torch.Generator().manual_seed(0)
    draws = [L.pick(logits, 0.7, gen) for _ in range(2000)]
    assert set(draws) == {0, 1} and abs(draws.count(0) / 2000 - 0.625) < 0.04
    assert set(L.pick(logits, 0.99, gen) for _ in range(500)) == {0, 1, 2, 3}
    assert L.pick(logits, 0.0) == 0 and L.pick(logits, 0.4, gen) == 0


def _train_steps(V, clips, steps, seed, stage=2, lr=3e-3):
    torch.manual_seed(seed)
    model = L.GPT(V.size, V.v_lr, tiny_cfg(dropout=0.1 if steps <= 10 else 0.0))
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    seqs = [L.build_sequence(c, 0, 4, V, MODS, n_hist=8, with_lr=stage == 2) for c in clips]
    for _ in range(steps):
        loss, _ = L.batch_loss(model, seqs, stage, V)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), seqs, loss.item()


def test_stage2_loss_only_on_lr_positions(V):
    torch.manual_seed(0)
    model = L.GPT(V.size, V.v_lr, tiny_cfg()).eval()
    clip = random_clip(V, G=4)
    seq = L.build_sequence(clip, 0, 4, V, MODS, n_hist=8)
    ids, kind = seq
    with torch.no_grad():
        loss, _ = L.batch_loss(model, [seq], 2, V)
        h = model(torch.tensor([ids[:-1]]))[0]
        pos = [p - 1 for p, k in enumerate(kind) if k == 2]
        ref = torch.nn.functional.cross_entropy(model.lr_head(h[pos]), torch.tensor(ids)[[p + 1 for p in pos]] - V.lr0)
        # padding another, shorter sequence next to it does not change the per-token mean
        short = L.build_sequence(clip, 0, 2, V, MODS, n_hist=8)
        loss2, _ = L.batch_loss(model, [seq, short], 2, V)
        ref2 = L.batch_loss(model, [short], 2, V)[0]
    assert len(pos) == 4 and abs(loss - ref) < 1e-5
    assert abs(loss2 - (4 * ref + 2 * ref2) / 6) < 1e-5


def test_overfit_one_batch(V):
    clips = [random_clip(V, G=4, seed=s) for s in range(4)]
    model, seqs, loss = _train_steps(V, clips, 150, seed=0)
    assert loss < 0.1
    for c, (ids, kind) in zip(clips, seqs):
        assert L.decode(model, V, *L.speaker_groups(c, 0, 4, V, MODS), 8, 4) == c["lr"].tolist()


def test_determinism(V):
    clips = [random_clip(V, G=4, seed=s) for s in range(3)]
    m1, seqs, _ = _train_steps(V, clips, 10, seed=3)
    m2, _, _ = _train_steps(V, clips, 10, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    sp = L.speaker_groups(clips[0], 0, 4, V, MODS)
    assert L.decode(m1, V, *sp, 8, 4) == L.decode(m2, V, *sp, 8, 4)


def _have_deps():
    try:
        import data, metrics, vqvae  # noqa: F401
        return hasattr(data, "generate_world") and hasattr(metrics, "listener_metrics") and hasattr(vqvae, "load_vqvae")
    except Exception:
        return False


needs_deps = pytest.mark.skipif(not _have_deps(), reason="data.py / metrics.py / vqvae.py not implemented yet")


@needs_deps
def test_end_to_end_decode_identity(tiny_vq):
    import vqvae
    vq = vqvae.load_vqvae(str(tiny_vq))
    toks = torch.randint(0, vq.K, (2, 8))
    b = torch.zeros(2, 100)
    y0 = data.decode_motion(vq, toks, list(b))
    y1 = data.decode_motion(vq, toks, list(b + torch.randn(2, 100)))
    assert y0[0].shape == (64, 56) and len(y0) == 2
    assert max(np.abs(a - c).max() for a, c in zip(y0, y1)) > 1e-4                     # identity VQ: beta matters


def smoke(world, vq, out, *more):
    """Flags of a smoke training run on the tiny world with a given VQ-VAE."""
    return ["--preset", "smoke", "--data", str(world), "--vq", str(vq), "--out", str(out), *more]


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


@needs_deps
def test_cli_train_then_sample_stream(tmp_path):
    """The default data (the tiny trevor twin, with its rule ledger); a smoke run trains its own VQ-VAEs."""
    out = tmp_path / "lm"
    r = subprocess.run([sys.executable, "train.py", "--model", "lm_listener", "--preset", "smoke", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=240, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert ck["method"] == "lm_listener" and ck["step"] == 90
    losses = [v for k, v in sorted(ck["metrics"]["loss"].items())]
    s2 = [l for st, l in losses if st == 2]
    assert np.isfinite([l for _, l in losses]).all() and np.mean(s2[-10:]) < np.mean(s2[:10])
    r = subprocess.run([sys.executable, "sample.py", "--model", "lm_listener", "--preset", "smoke", "--out", str(out),
                        "--stream"], cwd=ROOT, capture_output=True, text=True, timeout=240, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((out / "metrics.json").read_text())
    assert list(rows) == ["GT", "alt-GT", "baseline:random", "baseline:nn_motion", "baseline:nn_speech",
                          "baseline:random_walk_naive", "baseline:random_walk_identity", "model", "model:nucleus_0.9",
                          "baseline:vq_floor"]
    assert all(np.isfinite(r["mse/all"]) and r["n_windows"] == 6 for r in rows.values())     # 2 items x 3 windows
    assert rows["GT"]["mse/all"] == 0 and rows["model"]["stream_ms_at_60s"] > 0
    assert rows["model"]["stream_equals_offline"] == 1 and "equal to offline decoding" in r.stdout
    assert rows["GT"]["rule:pause"] == 1 and "rule:pause" in rows["model"]                # the rule ledger
    pred = np.load(out / "samples" / "pred.npy")
    assert pred.shape[1:] == (64, 56) and (out / "samples" / "sample.gif").exists()


@needs_deps
def test_seen_unseen_and_identity_swap_rows():
    """evaluate_lm_listener: subsets -> mse/<name> over those windows only; swapped -> swap_mse = the mean over every
    (window, other identity) pair of the L2 against the swapped GT."""
    import metrics
    g = np.random.default_rng(0)
    win = lambda: [g.standard_normal((16, 56)).astype(np.float32) for _ in range(4)]
    test = dict(listener=win(), speaker=win(), alt=None, text=["a b"] * 4, subsets={"seen": [0, 1], "unseen": [2, 3]},
                swap=[g.standard_normal((2, 16, 56)).astype(np.float32) for _ in range(4)])
    bank = dict(listener=win() + win(), speaker=win() + win(), text=["a"] * 8)
    pred = win()
    sw = [x + 0.5 for x in test["swap"]]
    rows = metrics.evaluate_lm_listener(test, bank, {"model": pred}, swapped={"model": sw})
    m = rows["model"]
    assert abs(m["mse/unseen"] - np.mean([((pred[i] - test["listener"][i]) ** 2).mean() for i in (2, 3)])) < 1e-6
    assert abs(m["swap_mse"] - 0.25) < 1e-6 and rows["GT"]["mse/seen"] == 0 and "swap_mse" not in rows["GT"]


@needs_deps
def test_ablation_flags_make_the_table_rows(tiny_world, tiny_vq_naive, tmp_path):
    """A Tab. 3 / Tab. 4 row is a run with flags: words only, decoded by the naive VQ-VAE."""
    L.main(smoke(tiny_world, tiny_vq_naive, tmp_path, "--modalities", "W", "--steps", "4", "--eval-every", "4",
                 "--vq-naive", str(tiny_vq_naive)), "train")
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ck["config"]["modalities"] == "W" and ck["config"]["vq"] == str(tiny_vq_naive)
    V = L.Vocab(ck["words"], ck["config"]["v_sa"], ck["v_lr"])
    assert tuple(weights(tmp_path / "ckpt.pt")["wte.weight"].shape) == (V.size, 32)
    rows = L.main(["--preset", "smoke", "--out", str(tmp_path), "--max-eval", "4", "--nucleus", "0"], "sample")
    assert list(rows) == ["GT", "alt-GT", "baseline:random", "baseline:nn_motion", "baseline:nn_speech",
                          "baseline:random_walk_naive", "model", "baseline:vq_floor"]   # no identity codec here


@pytest.mark.parametrize("argv, words", [
    (["--steps", "-5"], "--steps -5: expected a positive number"),
    (["--clip-frames", "60"], "multiple of the VQ-VAE's r = 8"),
    (["--modalities", "W+SA+iSC"], "expected one of W, W+SA"),
    (["--dtype", "float8"], "expected float32|bfloat16|float16"),
    (["--data", "/no/such/folder"], "no such folder"),
    (["--preset", "huge"], "expected one of smoke, default, full"),
])
def test_user_mistakes_are_one_line(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        L.cli(argv, "train")
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and words in err and "\n" not in err


def test_sample_without_or_with_a_foreign_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        L.cli(["sample", "--out", str(tmp_path)])
    assert e.value.code == 2 and "no checkpoint at" in capsys.readouterr().err
    torch.save({"method": "vqvae", "model": {}}, tmp_path / "vq.pt")
    with pytest.raises(SystemExit) as e:
        L.cli(["sample", "--out", str(tmp_path), "--ckpt", str(tmp_path / "vq.pt")])
    assert e.value.code == 2 and "checkpoint of vqvae, not of lm_listener.py" in capsys.readouterr().err


@needs_deps
def test_a_vq_of_another_preset_is_not_reused(tiny_world, tiny_vq, tmp_path, capsys):
    import data
    with pytest.raises(data.UserError, match="was trained with --preset smoke, this run is --preset default"):
        L.main(["--data", str(tiny_world), "--vq", str(tiny_vq), "--out", str(tmp_path / "a"), "--steps", "2"], "train")
    cfg = L.parse_config(["--preset", "smoke", "--data", str(tiny_world), "--out", str(tmp_path / "b")], "train")
    assert cfg.vq == str(tmp_path / "b" / "vq" / "ckpt.pt") and cfg.out == str(tmp_path / "b")
    assert L.parse_config(["--preset", "smoke"], "train").out == "runs/lm_listener-smoke"
    assert L.parse_config([], "train").data == "trevor"                                   # the LM-Listener twin
    assert data.vq_mismatch(tiny_vq, tmp_path, "smoke").startswith("was trained on")
    assert data.vq_mismatch(tmp_path / "none.pt", tiny_world, "smoke") == "is missing"


@needs_deps
def test_resume_after_a_kill_is_bit_identical(tiny_world, tiny_vq, tmp_path, monkeypatch):
    """40 steps straight vs. killed right after the checkpoint of step 20 and resumed: the same weights, bit for
    bit. Dropout on, so the restored torch random state matters too; the stage switch (step 10) is before the kill."""
    flags = ["--steps", "40", "--stage1-steps", "10", "--eval-every", "20", "--dropout", "0.1"]
    L.main(smoke(tiny_world, tiny_vq, tmp_path / "straight", *flags), "train")
    real = L.save_checkpoint

    class Killed(Exception):
        pass

    def save_then_die(path, obj):
        real(path, obj)
        if Path(path).name == "ckpt.pt":
            raise Killed
    monkeypatch.setattr(L, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        L.main(smoke(tiny_world, tiny_vq, tmp_path / "killed", *flags), "train")
    monkeypatch.undo()
    assert torch.load(tmp_path / "killed" / "ckpt.pt", weights_only=True)["step"] == 20
    L.main(smoke(tiny_world, tiny_vq, tmp_path / "killed", *flags, "--resume"), "train")
    a, b = weights(tmp_path / "straight" / "ckpt.pt"), weights(tmp_path / "killed" / "ckpt.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = (torch.load(p / "ckpt.pt", weights_only=True) for p in (tmp_path / "straight", tmp_path / "killed"))
    assert sa["metrics"]["loss"] == sb["metrics"]["loss"]


@needs_deps
def test_bfloat16_autocast_trains_on_cpu(tiny_world, tiny_vq, tmp_path):
    L.main(smoke(tiny_world, tiny_vq, tmp_path, "--dtype", "bfloat16", "--steps", "6", "--eval-every", "6",
                 "--device", "cpu"), "train")
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ck["step"] == 6 and np.isfinite([l for _, l in ck["metrics"]["loss"].values()]).all()
    assert all(v.dtype == torch.float32 for v in ck["model"].values())      # autocast leaves the weights float32


@needs_deps
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bfloat16_trains_and_samples(tiny_world, tiny_vq, tiny_vq_naive, tmp_path):
    L.main(smoke(tiny_world, tiny_vq, tmp_path, "--vq-naive", str(tiny_vq_naive), "--device", "cuda",
                 "--dtype", "bfloat16", "--steps", "20", "--eval-every", "20"), "train")
    rows = L.main(["--preset", "smoke", "--out", str(tmp_path), "--device", "cuda", "--max-eval", "4"], "sample")
    assert np.isfinite(rows["model"]["fd/all"]) and rows["model"]["n_windows"] == 4


@needs_deps
def test_torchrun_two_processes_match_one(tiny_world, tiny_vq, tmp_path):
    """2 gloo processes, each on its half of the same global batch, end where one process on the whole batch ends
    (check_in_sync inside the run asserts that both ranks hold identical weights)."""
    flags = ["--steps", "8", "--stage1-steps", "4", "--eval-every", "8", "--device", "cpu"]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "lm_listener.py", *smoke(tiny_world, tiny_vq, tmp_path / "ddp", *flags)],
                       cwd=ROOT, capture_output=True, text=True, timeout=180, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    L.main(smoke(tiny_world, tiny_vq, tmp_path / "one", *flags), "train")
    a, b = weights(tmp_path / "ddp" / "ckpt.pt"), weights(tmp_path / "one" / "ckpt.pt")
    # not bit-equal: each rank sums its own shard, and gloo adds the two halves, in other orders than one process
    assert all(torch.allclose(a[k], b[k], atol=1e-5, rtol=0) for k in a)
