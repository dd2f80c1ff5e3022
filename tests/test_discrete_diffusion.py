"""discrete_diffusion.py: schedule, q(x_t|x0), the two-case posterior against brute-force Bayes, the exact jump,
truncation, the loss formula, fusion shapes, overfitting one batch, determinism, a train -> sample CLI run, user
errors, exact resume, bf16 autocast, CUDA (skipped without one) and torchrun (DDP on CPU)."""
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import discrete_diffusion as dd

ROOT = Path(__file__).resolve().parents[1]
SCHEDULES = {"code": dict(mask_end=0.99999, replace_mass=1e-6), "paper": dict(mask_end=0.9, replace_mass=0.1)}


def one_step_matrix(sched, t, s=None):
    """Explicit (K+1)x(K+1) transition x_s -> x_t (rows: from, cols: to), s = t-1 by default: one step keeps a
    code w.p. alpha + beta, moves to each other code w.p. beta, masks w.p. gamma; [MASK] is absorbing."""
    K = sched["K"]
    s = t - 1 if s is None else s
    a, b, g = (float(v) for v in dd.jump_params(sched, torch.tensor([t]), torch.tensor([s])))
    Q = torch.zeros(K + 1, K + 1, dtype=torch.float64)
    Q[:K, :K] = b
    Q[:K, :K] += a * torch.eye(K, dtype=torch.float64)
    Q[:K, K] = g
    Q[K, K] = 1.0                                                      # [MASK] is absorbing
    return Q


def cumulative_matrix(sched, t):
    """Closed form q(x_t | x0) as a matrix: abar_t I + bbar_t on codes, gbar_t on [MASK]."""
    K = sched["K"]
    Q = torch.zeros(K + 1, K + 1, dtype=torch.float64)
    Q[:K, :K] = sched["bbar"][t] + sched["abar"][t] * torch.eye(K, dtype=torch.float64)
    Q[:K, K], Q[K, K] = sched["gbar"][t], 1.0
    return Q


def brute_posterior(sched, p0, x_t, t, s):
    """sum_i p0_i Q_{t|s}[j -> x_t] Qbar_s[i -> j] / Qbar_t[i -> x_t] over states j (terms with 0 denominators, which
    have 0 numerators too, are dropped)."""
    Qts, Qs, Qt = one_step_matrix(sched, t, s), cumulative_matrix(sched, s), cumulative_matrix(sched, t)
    K = sched["K"]
    out = torch.zeros(K + 1, dtype=torch.float64)
    for i in range(K):
        if Qt[i, x_t] > 0:
            out += p0[i] * Qts[:, x_t] * Qs[i, :] / Qt[i, x_t]
    return out


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_schedule_and_matrix_product(name):
    K, T = 3, 6
    sc = dd.make_schedule(T, K, **SCHEDULES[name])
    assert torch.allclose(sc["abar"] + K * sc["bbar"] + sc["gbar"], torch.ones(T + 1, dtype=torch.float64), atol=1e-15)
    prod = torch.eye(K + 1, dtype=torch.float64)
    for t in range(1, T + 1):
        Q = one_step_matrix(sc, t)
        assert (Q >= 0).all() and torch.allclose(Q.sum(1), torch.ones(K + 1, dtype=torch.float64))
        prod = prod @ Q
        assert torch.allclose(prod, cumulative_matrix(sc, t), atol=1e-14)
        for s in range(t):                                             # jump parameters in [0, 1]
            a, b, g = dd.jump_params(sc, torch.tensor([t]), torch.tensor([s]))
            assert 0 <= a <= 1 and 0 <= K * b <= 1 and 0 <= g <= 1


def test_q_sample_frequencies():
    K, T, n = 3, 6, 20000
    sc = dd.make_schedule(T, K, **SCHEDULES["paper"])
    gen = torch.Generator().manual_seed(0)
    for t in (1, 3, 6):
        x0 = torch.full((1, n), 1)
        x_t = dd.q_sample(sc, x0, torch.tensor([t]), gen)
        freq = torch.bincount(x_t.view(-1), minlength=K + 1).double() / n
        assert torch.allclose(freq, cumulative_matrix(sc, t)[1], atol=0.01)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_posterior_matches_bayes(name):
    K, T = 3, 6
    sc = dd.make_schedule(T, K, **SCHEDULES[name])
    gen = torch.Generator().manual_seed(0)
    for t in range(1, T + 1):
        for s in sorted({t - 1, 0, max(0, t - 3)}):                  # one step and exact jumps
            for x_t in range(K + 1):
                p0 = torch.rand(K, generator=gen, dtype=torch.float64)
                p0 /= p0.sum()
                got = dd.posterior(p0.view(1, 1, K), torch.tensor([[x_t]]), t, s, sc)[0, 0]
                assert abs(got.sum() - 1) < 1e-12
                assert torch.allclose(got, brute_posterior(sc, p0, x_t, t, s), atol=1e-10, rtol=1e-8)
                for x0 in range(K):                                    # one-hot p0 -> true q(x_s | x_t, x0)
                    if cumulative_matrix(sc, t)[x0, x_t] == 0:
                        continue
                    oh = F.one_hot(torch.tensor(x0), K).double()
                    got = dd.posterior(oh.view(1, 1, K), torch.tensor([[x_t]]), t, s, sc)[0, 0]
                    true = (one_step_matrix(sc, t, s)[:, x_t] * cumulative_matrix(sc, s)[x0]
                            / cumulative_matrix(sc, t)[x0, x_t])
                    assert torch.allclose(got, true, atol=1e-10, rtol=1e-8)
                if x_t == K:                                           # stay masked w.p. gbar_s / gbar_t
                    assert abs(got[K] - sc["gbar"][s] / sc["gbar"][t]) < 1e-12


def test_absorbing_limits():
    K, T = 8, 100
    ab = dd.make_schedule(T, K, replace_mass=0.0)
    code = dd.make_schedule(T, K)
    gen = torch.Generator().manual_seed(1)
    p0 = torch.softmax(torch.randn(1, 1, K, generator=gen, dtype=torch.float64), -1)
    for t in (1, 2, 50, 100):
        m = dd.posterior(p0, torch.tensor([[K]]), t, t - 1, ab)[0, 0]
        assert abs(m[K] - ab["gbar"][t - 1] / ab["gbar"][t]) < 1e-12
        c = dd.posterior(p0, torch.tensor([[3]]), t, t - 1, ab)[0, 0]
        assert c[3] == 1.0 and c.sum() == 1.0                          # unmasked tokens are copied
        oh = F.one_hot(torch.tensor([[3]]), K).double()
        c = dd.posterior(oh, torch.tensor([[3]]), t, t - 1, code)[0, 0]
        # code schedule: copies to 1e-9, except near t = T where abar_t ~ 1e-5 is comparable to beta_bar
        assert abs(c[3] - 1) < (1e-9 if t <= 50 else 1e-5)
        # the general posterior tends to the absorbing one as the replace mass -> 0
        tiny = dd.make_schedule(T, K, replace_mass=1e-12)
        for x in (3, K):
            lim = dd.posterior(oh, torch.tensor([[x]]), t, t - 1, tiny)[0, 0]
            assert torch.allclose(lim, dd.posterior(oh, torch.tensor([[x]]), t, t - 1, ab)[0, 0], atol=1e-9)


def test_truncation_hand_checked():
    """VQ-Diffusion's rule on p = (0.05, 0.5, 0.15, 0.3), r = 0.86: sorted 0.5, 0.3, 0.15, 0.05 with cumulative mass
    0.5, 0.8, 0.95, 1.0; 0.15 crosses r and is kept, 0.05 dropped; the kept mass 0.95 renormalised to 1."""
    p = torch.tensor([[0.05, 0.5, 0.15, 0.3]], dtype=torch.float64)
    q = dd.truncate(p, 0.86)
    assert torch.allclose(q, torch.tensor([[0.0, 0.5, 0.15, 0.3]], dtype=torch.float64) / 0.95, atol=1e-15)
    assert torch.allclose(dd.truncate(p, 0.5), torch.tensor([[0.0, 1.0, 0.0, 0.0]], dtype=torch.float64))  # 0.5 = r
    assert torch.allclose(dd.truncate(p, 0.51), torch.tensor([[0, 0.5, 0, 0.3]], dtype=torch.float64) / 0.8)
    assert torch.equal(dd.truncate(p, 1.0), p)
    # the reverse step keeps its chance of unmasking: stay masked w.p. gbar_s / gbar_t, as without truncation
    for sc in (dd.make_schedule(100, 4), dd.make_schedule(100, 4, replace_mass=0.0)):
        post = dd.posterior(q[None], torch.tensor([[4]]), 50, 40, sc)[0, 0]
        assert abs(post.sum() - 1) < 1e-12 and abs(post[4] - sc["gbar"][40] / sc["gbar"][50]) < 1e-12
    assert post[0] == 0                                                # absorbing: a dropped code is never drawn


def test_truncation_random_rows():
    gen = torch.Generator().manual_seed(0)
    p = torch.softmax(3 * torch.randn(64, 20, generator=gen, dtype=torch.float64), -1)
    p[0] = 0
    p[0, 5] = 1.0                                                      # a one-hot row keeps only its top-1
    q = dd.truncate(p, 0.86)
    assert torch.allclose(q.sum(-1), torch.ones(64, dtype=torch.float64))  # renormalised
    sp, order = p.sort(-1, descending=True)
    kept = q.gather(-1, order) > 0
    assert kept[:, 0].all() and (kept[:, 1:].int() <= kept[:, :-1].int()).all()  # top-1 always; a sorted prefix
    mass = (p * (q > 0)).sum(-1)                                       # the kept share of the original mass
    last = sp.gather(-1, kept.sum(-1, keepdim=True) - 1)[:, 0]         # the last code kept
    assert (mass >= 0.86).all() and (mass - last < 0.86).all()        # it is the one that crosses r
    assert torch.allclose(q[q > 0], (p / mass[:, None])[q > 0])        # kept codes in proportion


def test_loss_by_hand():
    K, T, lam = 3, 6, 0.3
    sc = dd.make_schedule(T, K, **SCHEDULES["paper"])
    logits = torch.tensor([[[0.2, -1.0, 0.7], [1.5, 0.1, -0.3]]])     # (1, 2, K)
    x0 = torch.tensor([[2, 0]])
    p0 = torch.softmax(logits.double(), -1)[0]
    for t, x_t in ((4, torch.tensor([[K, 1]])), (1, torch.tensor([[K, 0]]))):
        terms = []
        for pos in range(2):
            xt, x = int(x_t[0, pos]), int(x0[0, pos])
            pm = brute_posterior(sc, p0[pos], xt, t, t - 1)
            qt = one_step_matrix(sc, t)[:, xt] * cumulative_matrix(sc, t - 1)[x] / cumulative_matrix(sc, t)[x, xt]
            if t == 1:
                vlb = -math.log(pm[x])
            else:
                kl = sum(float(q * (math.log(q) - math.log(m))) for q, m in zip(qt, pm) if q > 0)
                assert kl >= 0
                vlb = kl
            terms.append(vlb + lam * (2 - (t - 1) / T) * -math.log(p0[pos, x]))
        loss, _ = dd.diffusion_loss(logits, x0, x_t, torch.tensor([t]), sc, lam)
        assert abs(loss.item() - T * np.mean(terms)) < 1e-9


def tiny_cfg(**kw):
    base = dict(d_model=32, n_layers=2, n_heads=2, d_text=16, dropout=0.0, n_mfcc=8)
    return dd.Config(**{**base, **kw})


def cond(B, T, N=5, F_=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, 56, generator=g), torch.randn(B, 4 * T, F_, generator=g),
            torch.randint(3, 20, (B, N), generator=g), torch.rand(B, N, generator=g) * T,
            torch.randn(B, 100, generator=g))                          # listener beta


def test_differential_and_fusion_shapes():
    x = torch.randn(2, 7, 56)
    d = dd.facial_differential(x)
    assert (d[:, 0] == 0).all() and torch.allclose(d[:, 1:], x[:, 1:] - x[:, :-1])
    model = dd.DiffListener(tiny_cfg(), K=16, n_feat=8, n_words=20, L_max=8)
    for T, N in ((32, 3), (64, 9), (40, 1)):
        spk, feat, w, e, b = cond(3, T, N)
        w[0, 1:] = 0                                                   # padded word slots
        R = model.fusion(spk, dd.facial_differential(spk), feat, w, e)
        assert R.shape == (3, T // 4, 32) and torch.isfinite(R).all()   # fuse_stride 4 (default)
    m1 = dd.DiffListener(tiny_cfg(fuse_stride=1), K=16, n_feat=8, n_words=20, L_max=8)
    spk, feat, w, e, b = cond(2, 40, 4)
    assert m1.fusion(spk, dd.facial_differential(spk), feat, w, e).shape == (2, 40, 32)  # per frame (paper)
    n_full = sum(p.numel() for p in model.parameters())
    for kw in (dict(diff=False), dict(text=False)):
        m = dd.DiffListener(tiny_cfg(**kw), K=16, n_feat=8, n_words=20, L_max=8)
        spk, feat, w, e, b = cond(2, 32)
        logits = m(torch.full((2, 4), 16), torch.tensor([5, 100]), spk, feat, w, e, b)  # training call
        assert torch.equal(logits, m.denoise(torch.full((2, 4), 16), torch.tensor([5, 100]),
                                             m.condition(spk, feat, w, e, b)))  # = condition once, then denoise
        assert logits.shape == (2, 4, 16)                              # no [MASK] logit
        assert sum(p.numel() for p in m.parameters()) < n_full
    m = dd.DiffListener(tiny_cfg(text=False), K=16, n_feat=8, n_words=20, L_max=8)
    assert not any("text" in k or "cm2" in k for k, _ in m.named_parameters())


def test_identity_conditioning():
    """beta changes p(x0) only through the identity embedding; identity=False needs no beta and ignores it."""
    torch.manual_seed(0)
    m = dd.DiffListener(tiny_cfg(), K=16, n_feat=8, n_words=20, L_max=8).eval()
    torch.nn.init.normal_(m.blocks[0].n1.lin.weight, std=0.1)                # AdaLN is zero-initialised: wake it
    spk, feat, w, e, b = cond(2, 32)
    x_t, t = torch.full((2, 4), 16), torch.tensor([5, 100])
    kv0, id0 = m.condition(spk, feat, w, e, b)
    kv1, id1 = m.condition(spk, feat, w, e, b + 1.0)
    assert all(torch.equal(a[0], c[0]) for a, c in zip(kv0, kv1))    # R^S does not see beta
    assert not torch.allclose(m.denoise(x_t, t, (kv0, id0)), m.denoise(x_t, t, (kv1, id1)))
    with pytest.raises(AssertionError, match="beta"):
        m.condition(spk, feat, w, e)
    m0 = dd.DiffListener(tiny_cfg(identity=False), K=16, n_feat=8, n_words=20, L_max=8)
    assert m0.ident is None and m0.condition(spk, feat, w, e)[1] is None


def test_sampler_jump_and_long():
    torch.manual_seed(0)
    model = dd.DiffListener(tiny_cfg(), K=16, n_feat=8, n_words=20, L_max=8).eval()
    kv = model.condition(*cond(3, 32))
    outs = {}
    for S in (None, 100, 10, 1):
        gen = torch.Generator().manual_seed(3)
        outs[S] = model.sample(kv, 4, [0], 4, S, 0.86, gen, batch=3)
        assert outs[S].shape == (3, 4) and (outs[S] < 16).all()       # no [MASK] left, never a [MASK] x0
    assert torch.equal(outs[None], outs[100])                          # stride 1 = the full ancestral sampler
    # long: 3 overlapping windows of 4 tokens over 8 tokens, jointly denoised
    spk, feat, w, e, b = cond(3, 32)
    kv = model.condition(spk, feat, w, e, b)
    long = model.sample(kv, 8, data.stream_starts(8, 4, 2), 4, 10, 0.86, torch.Generator().manual_seed(0), batch=1)
    assert long.shape == (1, 8) and (long < 16).all()
    assert data.stream_starts(30, 8, 4) == [0, 4, 8, 12, 16, 20, 22] and data.stream_starts(5, 8, 4) == [0]


def overfit(steps, seed=0, K=16, B=4, L=6):
    torch.manual_seed(seed)
    model = dd.DiffListener(tiny_cfg(n_layers=1, n_heads=1), K=K, n_feat=8, n_words=20, L_max=L)
    g = torch.Generator().manual_seed(123)
    x0 = torch.randint(0, K, (B, L), generator=g)
    c = cond(B, L * 8, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen, losses = torch.Generator().manual_seed(seed), []
    for _ in range(steps):
        t = torch.randint(1, model.T + 1, (B,), generator=gen)
        x_t = dd.q_sample(model.sched, x0, t, gen)
        loss, _ = dd.diffusion_loss(model(x_t, t, *c), x0, x_t, t, model.sched, 5e-4)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, x0, c, losses


def test_overfit_one_batch():
    model, x0, c, losses = overfit(300)
    assert np.mean(losses[-30:]) < 0.5 * np.mean(losses[:30])
    model.eval()
    x = model.sample(model.condition(*c), 6, [0], 6, None, 0.86, torch.Generator().manual_seed(0), batch=4)
    assert (x == x0).float().mean() > 0.9


def test_determinism():
    m1, *_ = overfit(10, seed=5)
    m2, _, c, _ = overfit(10, seed=5)
    for (k, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k
    m1.eval(), m2.eval()
    s1 = m1.sample(m1.condition(*c), 6, [0], 6, 20, 0.86, torch.Generator().manual_seed(7), batch=4)
    s2 = m2.sample(m2.condition(*c), 6, [0], 6, 20, 0.86, torch.Generator().manual_seed(7), batch=4)
    s3 = m2.sample(m2.condition(*c), 6, [0], 6, 20, 0.86, torch.Generator().manual_seed(8), batch=4)
    assert torch.equal(s1, s2) and not torch.equal(s1, s3)


@pytest.fixture(scope="module")
def trevor(tmp_path_factory):
    """The tiny trevor twin (the default data: one listener, a rule ledger) and a smoke naive VQ-VAE trained on it."""
    import vqvae
    root = data.generate_twin("trevor", "tiny", root=tmp_path_factory.mktemp("twin") / "trevor")
    out = tmp_path_factory.mktemp("vq_trevor")
    vqvae.main(["--data", str(root), "--out", str(out), "--preset", "smoke", "--norm", "none,none"], mode="train")
    return root, out / "ckpt.pt"


def test_default_data_is_trevor():
    assert dd.Config().data == "trevor" and dd.parse_config(["--preset", "smoke"]).data == "trevor"
    assert "trevor" in data.TWINS


def test_cli_train_then_sample(trevor, tmp_path):
    """On the trevor twin: train, sample, every row, the rule table from the ledger and the key-channel picture."""
    (world, vq), out = trevor, tmp_path / "dd"
    common = ["--data", str(world), "--out", str(out), "--preset", "smoke", "--vq", str(vq)]
    r = subprocess.run([sys.executable, "train.py", "--model", "discrete_diffusion", *common, "--steps", "40"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ck = torch.load(out / "ckpt.pt", weights_only=False)
    loss = ck["metrics"]["loss"]
    assert len(loss) == 40 and np.isfinite(loss).all() and np.mean(loss[-10:]) < np.mean(loss[:10])
    r = subprocess.run([sys.executable, "sample.py", "--model", "discrete_diffusion", "--out", str(out),
                        "--preset", "smoke", "--long-seconds", "10"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((out / "metrics.json").read_text())
    for row in ("GT", "alt-GT", "baseline:random", "baseline:nn_motion", "baseline:random_walk", "model"):
        assert row in rows and np.isfinite(rows[row]["mse/all"])
    assert rows["GT"]["mse/all"] == 0
    pred = np.load(out / "samples" / "pred.npy")
    assert pred.shape[1:] == (32, 56) and np.isfinite(pred).all()
    assert np.load(out / "samples" / "long_listener.npy").shape == (296, 56)  # 10 s of 8-frame tokens
    assert (out / "samples" / "window0.gif").exists() and (out / "samples" / "window0.png").exists()
    assert "| model |" in r.stdout
    # the rule table: every row scored on the ledger's events; GT answers the pauses, stays quiet on sarcasm
    for row in ("GT", "alt-GT", "baseline:nn_motion", "baseline:vq_floor", "model"):
        assert set(dd.metrics.RULE_COLUMNS) <= set(rows[row]), row
    assert rows["GT"]["rule_n/pause"] > 0 and rows["GT"]["rule/pause"] > 0.5
    assert "Rules answered" in r.stdout and (out / "samples" / "key_channels.png").stat().st_size > 10_000


def test_vocabulary_comes_from_the_training_words(trevor, tmp_path):
    """Items whose words are not in the synthetic world's list: the vocabulary is their training split's words,
    stored in the checkpoint and used at sample time; the words get their ids, not <unk> (a word seen only in test
    is <unk>)."""
    import vqvae
    import worldtools
    world, _ = trevor
    rename = lambda w: "q" + w[::-1] + "z"                             # no such word in data.VOCAB
    root = tmp_path / "renamed"
    for split in ("train", "val", "test"):
        items = [{**it, "words": [(rename(w), e) for w, e in it["words"]], "audio": None}  # (wav names would clash)
                 for it in data.load_listener(world, split)]
        if split == "test":
            items[0]["words"][0] = ("neverseen", items[0]["words"][0][1])
        worldtools.write_segments(root, split, items)
    (root / "wav").rmdir()
    train_words = {w for it in data.load_listener(root, "train") for w, _ in it["words"]}
    assert train_words and not train_words & {w.lower() for w in data.VOCAB}
    vq = tmp_path / "vq"
    vqvae.main(["--data", str(root), "--out", str(vq), "--preset", "smoke", "--norm", "none,none", "--steps", "4",
                "--eval-every", "4"], "train")
    out = tmp_path / "dd"
    dd.main(["--preset", "smoke", "--data", str(root), "--vq", str(vq / "ckpt.pt"), "--out", str(out), "--steps", "2",
             "--eval-every", "2"], "train")
    ck = dd.load_checkpoint(out / "ckpt.pt")
    vocab = ck["meta"]["vocab"]
    assert set(vocab) == train_words and vocab == data.build_vocab(data.load_listener(root, "train"))
    model = dd.build(dd.Config(**ck["config"]), ck["meta"], "cpu")
    assert model.fusion.text.emb.num_embeddings == len(vocab) + 3
    te = data.load_windows(root, "test", vqvae.load_vqvae(vq / "ckpt.pt"), 32, 32, 20, vocab)
    ids = te["wid"][te["wid"] > data.START]                            # every word slot but pad / start
    assert (ids != data.UNK).float().mean() > 0.9                      # the words are known, not <unk>
    first = te["wid"][0, 0, 1].item()                                  # test item 0's first word: seen only in test
    assert te["words"][0][0][0] == "neverseen" and first == data.UNK
    assert data.window_words([("Hello,", 0.1)], 0, 32, 30, data.word_ids(["hello"])) == [(data.START, 0.0), (3, 3.0)]


def test_checkpoint_without_vocabulary_is_a_user_error():
    """An older checkpoint (no stored vocabulary in its meta) -> one line `error: ...`, not a KeyError."""
    with pytest.raises(data.UserError, match="vocabulary"):
        dd.build(tiny_cfg(), dict(K=16, r=8, n_feat=8, L=4, D_id=100), "cpu")


def test_long_stream_segments_of_different_lengths():
    """metrics.long_stream joins each segment with its own length: no padding inside, word times shifted by the
    lengths before them; equal lengths (no n) give the same stream as n = Ts."""
    S, Ts, lengths, fps = 3, 10, [10, 6, 8], 30
    frame = torch.arange(Ts, dtype=torch.float32)
    spk = torch.stack([100 * i + frame for i in range(S)])[..., None].repeat(1, 1, 2)      # (S, Ts, 2)
    for i, n in enumerate(lengths):
        spk[i, n:] = 0                                                  # padding past the segment
    segs = dict(spk=spk, lis=-spk, feat=spk.repeat_interleave(4, 1), beta=torch.randn(S, 4), fps=fps, n=lengths,
                words=[[("a", -0.1), ("b", 0.1)], [("c", -0.05), ("d", 0.15)], [("e", 0.2)]])
    st = dd.metrics.long_stream(segs, 1.0, 2)                           # 30 frames: segments 0, 1, 2, 0 -> cut at 30
    want = torch.cat([100 * i + frame[:lengths[i]] for i in (0, 1, 2, 0)])[:30]
    assert st["speaker"].shape == (1, 30, 2) and torch.equal(st["speaker"][0, :, 0], want)
    assert torch.equal(st["listener"][0, :, 0], -want) and st["audio"].shape == (1, 120, 2)
    assert torch.equal(st["audio"][0, ::4, 0], want)
    got = [(w, round(e, 6)) for w, e in st["words"][0]]
    assert got == [("a", -0.1), ("b", 0.1), ("d", round(0.15 + 10 / fps, 6)), ("e", round(0.2 + 16 / fps, 6)),
                   ("b", round(0.1 + 24 / fps, 6))]
    eq = dict(segs, n=None, spk=spk[:, :6], lis=-spk[:, :6], feat=segs["feat"][:, :24])
    a, b = dd.metrics.long_stream(eq, 0.5, 2), dd.metrics.long_stream(dict(eq, n=[6, 6, 6]), 0.5, 2)
    assert a["speaker"].shape == (1, 14, 2) and torch.equal(a["speaker"], b["speaker"]) and a["words"] == b["words"]


def test_rules_over_whole_segments():
    """metrics.stitch joins each segment's windows in order; listener_rules scores them against the ledger."""
    x = np.arange(5 * 4 * 1, dtype=np.float32).reshape(5, 4, 1)          # 5 windows of 4 frames
    seqs, order = dd.metrics.stitch(x, np.array([3, 3, 3, 7, 7]))
    assert order == [3, 7] and [s.shape[0] for s in seqs] == [12, 8] and np.array_equal(seqs[1][:, 0], np.arange(12, 20))
    fps, T = 30, 120
    quiet = np.zeros((2, T // 2, 56), np.float32)
    nod = quiet.copy()
    t = np.arange(T // 2) / fps
    nod[1, :, dd.data.PITCH] = 0.2 * np.sin(2 * np.pi * 2 * t) * (t > 0.2)  # a nod after the pause at 2.0 s
    events = [{"pause": [2.0]}, None]                                   # segment 0 (windows 0, 1); 1 has no ledger
    rules = dict(seg=np.array([0, 0]), events=events, fps=fps)
    got = dd.metrics.listener_rules({"quiet": [quiet], "nods": [nod]}, rules)
    assert got["quiet"]["rule/pause"] == 0 and got["nods"]["rule/pause"] == 1 and got["nods"]["rule_n/pause"] == 1
    assert np.isnan(got["nods"]["rule/loud"]) and got["nods"]["rule_n/loud"] == 0


# ----------------------------------------------------------------------------------------------------------------------
# Flags, user errors, exact resume, mixed precision, CUDA, torchrun

def smoke_args(world, vq, out, *more):
    return ["--data", str(world), "--vq", str(vq), "--preset", "smoke", "--out", str(out), *map(str, more)]


def test_ablations_are_flags():
    """The paper's ablations are runs with flags (train.py's pipeline trains them); no driver in the file."""
    cfg = dd.parse_config(["--no-text", "--no-diff", "--no-identity", "--sample-steps", "0", "--truncation", "1.0"])
    assert not cfg.text and not cfg.diff and not cfg.identity and cfg.sample_steps == 0 and cfg.truncation == 1.0
    assert dd.Config().text and dd.Config().diff and dd.Config().identity
    assert not hasattr(dd, "train_ablations") and "ablations" not in {f.name for f in dataclasses.fields(dd.Config)}
    assert dd.parse_config(["--preset", "smoke"]).out == "runs/discrete_diffusion-smoke"  # its own folder
    assert dd.parse_config(["--preset", "smoke", "--out", "x"]).out == "x"                # an explicit --out wins


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        dd.parse_config(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--no-text" in out and "--resume" in out and "--compile" in out


@pytest.mark.parametrize("argv, flag", [(["--steps", "-5"], "--steps"), (["--batch-size", "0"], "--batch-size"),
                                        (["--n-heads", "3"], "--n-heads"), (["--dtype", "float8"], "--dtype"),
                                        (["--truncation", "0"], "--truncation"), (["--split", "dev"], "--split"),
                                        (["--sample-steps", "101"], "--sample-steps"), (["--preset", "huge"], "huge")])
def test_bad_values_are_user_errors(argv, flag):
    with pytest.raises(data.UserError, match=flag):
        dd.parse_config(argv)


def test_batch_must_split_over_ranks(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(data.UserError, match="--batch-size 8"):
        dd.parse_config(["--preset", "smoke"])


def test_vq_of_another_preset_or_checkpoint(tiny_world, tiny_vq_naive, tmp_path):
    with pytest.raises(data.UserError, match="--vq .*preset smoke.*preset default"):
        dd.main(["--data", str(tiny_world), "--vq", str(tiny_vq_naive), "--out", str(tmp_path), "--steps", "1"])
    with pytest.raises(data.UserError, match="--clip-frames 36: expected a multiple of the VQ's r = 8"):
        dd.main(smoke_args(tiny_world, tiny_vq_naive, tmp_path, "--clip-frames", 36))
    with pytest.raises(data.UserError, match="vqvae, not of discrete_diffusion"):
        dd.main(["--ckpt", str(tiny_vq_naive), "--out", str(tmp_path)], mode="sample")


def test_resume_is_exact(tiny_world, tiny_vq_naive, tmp_path, monkeypatch):
    """20 steps straight == killed right after the checkpoint at step 10, then --resume to 20: every tensor equal."""
    dd.main(smoke_args(tiny_world, tiny_vq_naive, tmp_path / "straight", "--steps", 20, "--eval-every", 10))

    class Killed(Exception):
        pass

    real = dd.save_checkpoint

    def save_then_die(path, obj):
        real(path, obj)
        raise Killed

    monkeypatch.setattr(dd, "save_checkpoint", save_then_die)
    args = smoke_args(tiny_world, tiny_vq_naive, tmp_path / "cut", "--steps", 20, "--eval-every", 10)
    with pytest.raises(Killed):
        dd.main(args)
    monkeypatch.setattr(dd, "save_checkpoint", real)
    assert torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=True)["step"] == 10
    dd.main(args + ["--resume"])
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("straight", "cut"))
    assert b["step"] == 20 and a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["metrics"]["loss"] == b["metrics"]["loss"]


def test_bfloat16_autocast_on_cpu(tiny_world, tiny_vq_naive, tmp_path):
    dd.main(smoke_args(tiny_world, tiny_vq_naive, tmp_path, "--steps", 4, "--eval-every", 4, "--dtype", "bfloat16"))
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ck["step"] == 4 and np.isfinite(ck["metrics"]["loss"]).all()
    assert all(v.dtype != torch.bfloat16 for v in ck["model"].values())  # weights stay float32 under autocast


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bfloat16_train_and_sample(tiny_world, tiny_vq_naive, tmp_path):
    args = smoke_args(tiny_world, tiny_vq_naive, tmp_path, "--device", "cuda")
    dd.main(args + ["--steps", "6", "--eval-every", "3", "--dtype", "bfloat16"])
    rows = dd.main(args + ["--long-seconds", "4", "--time-runs", "1", "--time-batch", "2"], mode="sample")
    assert np.isfinite(rows["model"]["fd/all"]) and (tmp_path / "metrics.json").exists()


def test_torchrun_two_processes_match_one(tiny_world, tiny_vq_naive, tmp_path):
    """2 gloo processes (each half of the global batch of 8) end in sync and equal the single-process run. Dropout
    is off: each rank draws its own dropout masks, so with dropout the two runs differ by design."""
    args = ["--steps", 4, "--eval-every", 4, "--dropout", 0.0]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "discrete_diffusion.py", *smoke_args(tiny_world, tiny_vq_naive, tmp_path / "ddp", *args)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]  # check_in_sync passed on both ranks
    dd.main(smoke_args(tiny_world, tiny_vq_naive, tmp_path / "one", *args))
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True)["model"] for d in ("ddp", "one"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), (k, (a[k] - b[k]).abs().max())
