"""vqvae.py: shapes, round trip, straight-through, EMA + dead-code reset by hand, IN invariance, AdaIN statistics,
losses by hand, perplexity, overfitting one batch, determinism, checkpoint reload, and a CLI train -> sample run."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vqvae

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny convs: one intra-op thread is faster, and far faster on a shared, loaded CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def small_cfg(**kw):
    base = dict(codebook_size=32, code_dim=32, width=32, depth=1, dilations="1", beta_hidden=32)
    return vqvae.Config(**{**base, **kw})


def smooth_batch(B=4, T=64, D=56, seed=0):
    """Smooth random motion (sums of slow sines) and random betas."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(T, dtype=torch.float32)[None, :, None]
    f = torch.rand(B, 1, D, generator=g) * 0.2 + 0.02
    ph = torch.rand(B, 1, D, generator=g) * 6.28
    return torch.sin(f * t + ph), torch.randn(B, 100, generator=g)


def test_shapes_and_bad_length():
    m = vqvae.VQVAE(small_cfg())
    x, b = smooth_batch(2)
    o = m(x, b)
    assert o["x_hat"].shape == (2, 64, 56) and o["idx"].shape == (2, 8) and o["idx"].dtype == torch.int64
    assert o["z_e"].shape == (2, 8, 32) and o["z_q"].shape == (2, 8, 32)
    with pytest.raises(AssertionError, match="multiple of r"):
        m.encode(torch.randn(2, 60, 56))


def test_round_trip_and_quantise_consistency():
    torch.manual_seed(0)
    m = vqvae.VQVAE(small_cfg())
    x, b = smooth_batch(3)
    m.train()
    m(x, b)  # initialise the codebook from data
    m.eval()
    o = m(x, b)
    idx = m.encode(x, b)
    assert torch.equal(idx, o["idx"])
    assert torch.equal(o["z_q"], m.codebook[idx])  # indices <-> vectors
    assert torch.equal(m.decode(idx, b), o["x_hat"])
    # Eq. 5 by brute force: every chosen code is a nearest one
    d = ((o["z_e"][:, :, None, :] - m.codebook[None, None]) ** 2).sum(-1)  # (B, L, K)
    assert torch.allclose(d.gather(-1, idx[..., None])[..., 0], d.min(-1).values, atol=1e-5)


def test_straight_through_gradient():
    m = vqvae.VQVAE(small_cfg())
    x, b = smooth_batch(2)
    o = m(x, b)
    o["rec"].backward()
    for name, p in m.encoder.named_parameters():
        if name.endswith("weight"):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert m.quantizer.codebook.grad is None  # EMA mode: the codebook learns without gradients


def test_ema_update_and_dead_code_reset_by_hand():
    mu, eps = 0.9, 1e-5
    q = vqvae.Quantizer(K=2, C=1, mu=mu, ema=True, reset=True, eps=eps)
    q.codebook.data = torch.tensor([[0.0], [10.0]])
    q.ema_sum.copy_(q.codebook.data)
    q.ema_count.fill_(1.0)
    q.initted.fill_(True)
    q.train()
    z = torch.tensor([[[1.0], [2.0]]])  # (B=1, L=2, C=1): both nearer code 0
    _, idx, _ = q(z)
    assert idx.tolist() == [[0, 0]]
    n0, n1 = mu * 1 + (1 - mu) * 2, mu * 1  # EMA counts: 1.1 and 0.9
    s0 = mu * 0.0 + (1 - mu) * 3.0  # EMA sum of code 0
    n = n0 + n1
    expect0 = s0 / ((n0 + eps) / (n + 2 * eps) * n)
    assert math.isclose(float(q.codebook[0]), expect0, rel_tol=1e-6)
    assert float(q.codebook[1]) in (1.0, 2.0)  # count 0.9 < 1: reset to a batch vector
    assert q.last_resets == 1 and float(q.ema_count[1]) == 1.0


def test_instance_norm_encoder_is_offset_and_scale_invariant():
    torch.manual_seed(0)
    x, _ = smooth_batch(2)
    a, off = 1.7, torch.randn(1, 1, 56) * 2  # scalar gain, per-channel constant offset
    for norm, invariant in [("IN,AdaIN", True), ("none,none", False)]:
        m = vqvae.VQVAE(small_cfg(norm=norm)).double().eval()
        z = m.encode_latent(x.double()).detach()
        m.quantizer.codebook.data = z.mean() + z.std() * torch.randn(32, 32, dtype=torch.float64)  # no ties
        z1, z2 = m.encode_latent(x.double()), m.encode_latent(a * x.double() + off)
        i1, i2 = m.encode(x.double()), m.encode(a * x.double() + off)
        if invariant:  # exact up to IN's eps = 1e-5 ...
            assert (z1 - z2).abs().max() < 1e-3 * z1.abs().max() and torch.equal(i1, i2)
            for mod in m.encoder.modules():  # ... and exact to round-off without it
                if isinstance(mod, vqvae.Norm):
                    mod.eps = 1e-30
            assert (m.encode_latent(x.double()) - m.encode_latent(a * x.double() + off)).abs().max() < 1e-8
        else:
            assert not torch.equal(i1, i2)


def test_adain_sets_channel_statistics_and_beta_changes_output():
    torch.manual_seed(0)
    n = vqvae.Norm("AdaIN", 8, 16)
    torch.nn.init.normal_(n.head.weight)
    torch.nn.init.normal_(n.head.bias)
    h, s = torch.randn(3, 8, 50) * 4 + 2, torch.randn(3, 16)
    y = n(h, s)
    g, b = n.head(s).chunk(2, -1)
    assert torch.allclose(y.mean(-1), b, atol=1e-4)
    assert torch.allclose(y.std(-1, unbiased=False), (1 + g).abs(), atol=1e-4)
    m = vqvae.VQVAE(small_cfg(norm="IN,AdaIN")).eval()
    for mod in m.decoder.modules():
        if isinstance(mod, vqvae.Norm) and mod.kind == "AdaIN":
            torch.nn.init.normal_(mod.head.weight, std=0.1)
    idx = torch.randint(0, 32, (1, 8))
    assert not torch.allclose(m.decode(idx, torch.randn(1, 100)), m.decode(idx, torch.randn(1, 100)))
    naive = vqvae.VQVAE(small_cfg(norm="none,none")).eval()  # the naive model ignores beta
    assert torch.equal(naive.decode(idx, torch.randn(1, 100)), naive.decode(idx, torch.randn(1, 100)))


def test_velocity_and_reconstruction_losses_by_hand():
    x = torch.randint(-8, 8, (2, 16, 56)).double()  # integers: the offset cancels exactly
    assert float(vqvae.velocity_loss(x + 3.0, x)) == 0.0
    xh, x3 = torch.zeros(1, 3, 1), torch.tensor([[[0.0], [0.5], [2.5]]])
    # dx = (0.5, 2.0): SmoothL1 = 0.5 * 0.5^2 = 0.125 and 2 - 0.5 = 1.5; mean 0.8125
    assert math.isclose(float(vqvae.velocity_loss(xh, x3)), 0.8125, rel_tol=1e-6)
    xr = torch.zeros(1, 1, 56)
    xr[..., 0], xr[..., 50], xr[..., 53] = 0.5, 3.0, 1.0  # one element per part
    # exp: 0.125/50, rot: 2.5/3 (x alpha_pose 2), jaw: 0.5/3
    expect = 0.125 / 50 + 2 * 2.5 / 3 + 0.5 / 3
    assert math.isclose(float(vqvae.rec_loss(torch.zeros_like(xr), xr, pose_weight=2.0)), expect, rel_tol=1e-6)


def test_perplexity():
    K = 16
    H, ppl, act = vqvae.usage_stats(torch.arange(K).repeat(3), K)
    assert math.isclose(ppl, K, rel_tol=1e-9) and math.isclose(H, math.log(K)) and act == 1.0
    H, ppl, act = vqvae.usage_stats(torch.full((10,), 3), K)
    assert ppl == 1.0 and H == 0.0 and act == 1 / K


def fit(steps, seed=0, B=4, stop_below=None):
    torch.manual_seed(seed)
    m = vqvae.VQVAE(small_cfg())
    x, b = smooth_batch(B, seed=1)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, betas=(0.9, 0.99), weight_decay=0.0)
    recs = []
    for _ in range(steps):
        o = m(x, b)
        opt.zero_grad()
        o["loss"].backward()
        opt.step()
        recs.append(o["rec"].item())
        if stop_below is not None and recs[-1] < stop_below * recs[0]:
            break
    return m, recs


def test_overfit_one_batch():
    _, recs = fit(300, stop_below=0.2)  # about 30 steps
    assert recs[-1] < 0.2 * recs[0], (recs[0], recs[-1])


def test_determinism():
    m1, _ = fit(20, seed=3)
    m2, _ = fit(20, seed=3)
    for (k, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k


def test_checkpoint_reload_gives_identical_tokens(tiny_vq, tiny_world):
    import data
    m = vqvae.load_vqvae(tiny_vq)
    assert not m.training and m.cfg.norm == "IN,AdaIN" and m.K == 32 and m.r == 8
    assert Path(m.cfg.data).resolve() == (Path(tiny_world) / "listener").resolve()
    items = data.load_listener(m.cfg.data, "test")
    x = m.normalize(torch.as_tensor(items[0]["listener"][None, :64]))
    beta = torch.as_tensor(items[0]["listener_beta"][None])
    assert torch.allclose(m.denormalize(x), torch.as_tensor(items[0]["listener"][None, :64]), atol=1e-4)
    idx = m.encode(x, beta)
    assert idx.shape == (1, 8) and torch.equal(idx, vqvae.load_vqvae(tiny_vq).encode(x, beta))
    assert m.decode(idx, beta).shape == (1, 64, 56)
    assert torch.equal(vqvae.load_vqvae(tiny_vq).codebook, m.codebook)  # reload twice: identical


def test_naive_fixture_and_tokenize(tiny_vq_naive, tmp_path):
    m = vqvae.load_vqvae(tiny_vq_naive)
    assert m.cfg.norm == "none,none" and m.decoder.cond is None
    res = vqvae.main(["--tokenize", "--ckpt", str(tiny_vq_naive), "--out", str(tmp_path)])
    assert (tmp_path / "tokens.pt").exists()
    import data
    items = data.load_listener(m.cfg.data, "val")
    assert len(res["val"]["idx"]) == len(items)
    for it, idx in zip(items, res["val"]["idx"]):
        assert idx.shape == (len(it["listener"]) // 8,)


def test_cli_train_then_sample(tiny_world, tmp_path):
    out = tmp_path / "vq"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = lambda *a: subprocess.run([sys.executable, *a], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    r = run("train.py", "--model", "vqvae", "--preset", "smoke", "--data", str(tiny_world), "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    met = ck["metrics"]
    assert math.isfinite(met["train_rec"]) and met["train_rec"] < met["train_rec_first"]
    assert (out / "config.json").exists() and (out / "recon.png").exists()
    r = run("sample.py", "--model", "vqvae", "--out", str(out), "--max-eval", "8")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads((out / "metrics.json").read_text())
    assert {"GT", "model", "baseline:random_walk"} <= set(rows)
    assert rows["GT"]["mse/all"] == 0.0 and rows["model"]["mse/all"] > 0 and 0 < rows["model"]["active"] <= 1
    for f in ["recon_test.png", "recon_test.gif", "recon.npy", "random_walk.npy"]:
        assert (out / f).exists(), f


@pytest.mark.parametrize("norm", vqvae.NORMS)
def test_every_table5_config_trains_a_step(norm):
    m = vqvae.VQVAE(small_cfg(norm=norm))
    x, b = smooth_batch(2)
    o = m(x, b)
    o["loss"].backward()
    assert o["x_hat"].shape == x.shape and torch.isfinite(o["loss"])
    assert (m.decoder.cond is not None) == norm.endswith("Ada" + norm.split(",")[0])
