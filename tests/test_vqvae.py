"""vqvae.py: shapes, round trip, straight-through, EMA + dead-code reset by hand, IN invariance, AdaIN statistics,
losses by hand, perplexity, overfitting one batch, determinism, checkpoint reload, a CLI train -> sample run, user
errors, exact resume, bfloat16 autocast, CUDA (skipped without), and torchrun DDP against one process."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import metrics
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
    base = dict(codebook_size=32, code_dim=32, width=32, dilations="1", beta_hidden=32)
    return vqvae.Config(**{**base, **kw})


def smooth_batch(B=4, T=64, D=56, seed=0):
    """Smooth random motion (sums of slow sines) and random betas."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(T, dtype=torch.float32)[None, :, None]
    f = torch.rand(B, 1, D, generator=g) * 0.2 + 0.02
    ph = torch.rand(B, 1, D, generator=g) * 6.28
    return torch.sin(f * t + ph), torch.randn(B, 100, generator=g)


def test_scale_global_is_one_std_and_channel_is_per_channel(tiny_world):
    """--scale global divides by the RMS of the train split's channel stds (one number), --scale channel by each."""
    mean, std = data.load_stats(tiny_world)
    for scale in ("global", "channel"):
        cfg = vqvae.parse_config(["--preset", "smoke", "--data", str(tiny_world), "--scale", scale])
        model = vqvae.build(cfg, "cpu")[0]
        want = np.full_like(std, np.sqrt(np.mean(np.maximum(std, 1e-6) ** 2))) if scale == "global" else std
        assert np.allclose(model.std.numpy(), want[:cfg.motion_dim], rtol=1e-5)
        assert np.allclose(model.mean.numpy(), mean[:cfg.motion_dim])
    assert vqvae.parse_config([]).scale == "global"


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
    q = vqvae.Quantizer(K=2, C=1, mu=mu, eps=eps)
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
    H, ppl, act = metrics.usage_stats(torch.arange(K).repeat(3), K)
    assert math.isclose(ppl, K, rel_tol=1e-9) and math.isclose(H, math.log(K)) and act == 1.0
    H, ppl, act = metrics.usage_stats(torch.full((10,), 3), K)
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


def test_naive_fixture_and_full_clip_tokens(tiny_vq_naive):
    import data
    m = vqvae.load_vqvae(tiny_vq_naive)
    assert m.cfg.norm == "none,none" and m.decoder.cond is None
    clips = vqvae.to_clips(data.load_listener(m.cfg.data, "val"), m)
    toks = metrics.codec_tokens(m, clips, "cpu")
    assert len(toks) == len(clips) > 0
    for (x, _, _), idx in zip(clips, toks):  # one token per r frames of the whole clip, in [0, K)
        assert idx.shape == (x.shape[0] // 8,) and 0 <= int(idx.min()) and int(idx.max()) < m.K


def test_long_clips_are_coded_in_training_length_windows():
    """A 240-frame clip is encoded and decoded as the 64-frame training crops are: windows from frame 0, the last one
    flush with the end (its new tokens kept), so the LM's 8-token windows decode exactly the clip's reconstruction.
    In one pass (chunk 0) IN's statistics over 240 frames give other latents."""
    torch.manual_seed(0)
    m = vqvae.VQVAE(small_cfg(norm="IN,AdaIN")).eval()
    for mod in m.decoder.modules():
        if isinstance(mod, vqvae.Norm) and mod.kind == "AdaIN":
            torch.nn.init.normal_(mod.head.weight, std=0.1)
    x, b = smooth_batch(2, T=240)
    x = x + torch.linspace(0, 3, 240)[None, :, None]  # a drift: every 64-frame window has its own statistics
    z = m.encode_latent(x)
    parts = [m.encode_latent(x[:, s:s + 64]) for s in (0, 64, 128)] + [m.encode_latent(x[:, 176:])[:, 2:]]
    assert z.shape == (2, 30, 32) and torch.allclose(z, torch.cat(parts, 1), atol=1e-5)
    idx = m.encode(x)
    x_hat = m.decode(idx, b)
    assert x_hat.shape == (2, 240, 56) and torch.equal(m(x, b)["x_hat"], x_hat)
    for s in (0, 64, 128):  # the codec floor as the LM decodes it
        assert torch.allclose(x_hat[:, s:s + 64], m.decode(idx[:, s // 8:s // 8 + 8], b), atol=1e-5)
    assert torch.allclose(x_hat[:, 192:], m.decode(idx[:, 22:], b)[:, 16:], atol=1e-5)
    m.chunk = 0
    assert (m.encode_latent(x) - z).abs().max() > 0.1 and (m.decode(idx, b) - x_hat).abs().max() > 0.01


def test_codec_table_splits_seen_and_unseen_listeners(capsys):
    """Rows per listener group when the test split holds listeners absent from train (realtalk), the whole-clip row
    beside the windowed one; listener metrics on the 64-frame windows (the codec floor as the LM scores it)."""
    torch.manual_seed(0)
    m = vqvae.VQVAE(small_cfg()).eval()
    clip = lambda i, lid: (smooth_batch(1, 128, seed=i)[0][0], torch.randn(100),
                           {"listener_id": lid, "speaker": smooth_batch(1, 128, seed=50 + i)[0][0].numpy()})
    rows = metrics.evaluate_codec(m, [clip(0, 0), clip(1, 7), clip(2, 7)], [clip(3, 0), clip(4, 1)], "cpu")[0]
    assert {"GT", "model", "model:seen", "model:unseen", "model:whole_clip", "baseline:random_walk"} == set(rows)
    assert rows["model"]["n_windows"] == 6 and rows["model:seen"]["n_windows"] == 2
    assert rows["model:unseen"]["n_windows"] == 4 and rows["model:seen"]["rec"] != rows["model:unseen"]["rec"]
    assert rows["model:whole_clip"]["rec"] != rows["model"]["rec"] and "fd/all" in capsys.readouterr().out


def test_codec_stats_keep_clip_order_across_lengths():
    """Clips of mixed lengths are batched by length; reconstructions and tokens still come back in clip order."""
    torch.manual_seed(0)
    m = vqvae.VQVAE(small_cfg()).eval()
    clips = [(smooth_batch(1, T, seed=i)[0][0], torch.randn(100), {}) for i, T in enumerate([64, 32, 64, 16])]
    stats, recons = metrics.codec_stats(m, clips, "cpu")
    toks = metrics.codec_tokens(m, clips, "cpu")
    for (x, b, _), x_hat, idx in zip(clips, recons, toks):
        o = m(x[None], b[None])
        assert torch.allclose(x_hat, o["x_hat"][0], atol=1e-5) and torch.equal(idx, o["idx"][0])
    assert 0 < stats["active"] <= 1 and stats["rec"] > 0


def test_cli_train_then_sample(tiny_world, tmp_path):
    out = tmp_path / "vq"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = lambda *a: subprocess.run([sys.executable, *a], cwd=ROOT, capture_output=True, text=True, timeout=300,
                                    env=env)
    r = run("train.py", "--model", "vqvae", "--preset", "smoke", "--data", str(tiny_world), "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    met = ck["metrics"]
    assert ck["method"] == "vqvae" and ck["step"] == 60 and {"optimizer", "rng", "config"} <= set(ck)
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


def test_smoke_runs_have_their_own_folder():
    assert vqvae.parse_config(["--preset", "smoke"]).out == "runs/vqvae-smoke"
    assert vqvae.parse_config(["--preset", "smoke", "--out", "elsewhere"]).out == "elsewhere"
    assert vqvae.parse_config([]).out == "runs/vqvae" and vqvae.parse_config([]).data == "trevor"


@pytest.mark.parametrize("argv, words", [(["--steps", "-5"], "--steps -5: expected a positive"),
                                         (["--window", "60"], "--window 60: expected a multiple of --r 8"),
                                         (["--r", "6", "--window", "48"], "--r 6: expected a power of two"),
                                         (["--norm", "IN,LN"], "--norm IN,LN: expected one of"),
                                         (["--dtype", "half"], "--dtype half: expected float32"),
                                         (["--batch", "7"], "--batch 7: expected a multiple of the 2 torchrun")])
def test_bad_values_are_one_line_user_errors(argv, words, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as e:
        vqvae.cli(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and words in err and "\n" not in err, err


def test_missing_data_folder_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        vqvae.cli(["--data", str(tmp_path / "nope"), "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and "nope" in err and "\n" not in err, err


def test_missing_or_foreign_checkpoint_is_a_user_error(tmp_path):
    import data
    with pytest.raises(data.UserError, match="no checkpoint at"):
        vqvae.load_vqvae(tmp_path / "nope.pt")
    torch.save({"method": "lm_listener", "model": {}}, tmp_path / "other.pt")
    with pytest.raises(data.UserError, match="checkpoint of lm_listener, not of vqvae.py"):
        vqvae.load_vqvae(tmp_path / "other.pt")
    with pytest.raises(data.UserError, match="no checkpoint at"):
        vqvae.main(["--out", str(tmp_path / "none")], mode="sample")


def smoke(world, out, *more):
    return ["--preset", "smoke", "--data", str(world), "--out", str(out), "--device", "cpu", *more]


def test_resume_after_a_kill_is_bit_identical(tiny_world, tmp_path, monkeypatch):
    """N steps straight vs killed right after the checkpoint at N/2, then --resume to N: the same weights."""
    flags = ["--steps", "16", "--eval-every", "8"]
    straight, _ = vqvae.train(vqvae.parse_config(smoke(tiny_world, tmp_path / "a", *flags)))

    class Killed(Exception):
        pass
    real = vqvae.save_checkpoint

    def save_then_die(path, obj):
        real(path, obj)
        raise Killed
    monkeypatch.setattr(vqvae, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        vqvae.train(vqvae.parse_config(smoke(tiny_world, tmp_path / "b", *flags)))
    monkeypatch.undo()
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["step"] == 8
    resumed, met = vqvae.train(vqvae.parse_config(smoke(tiny_world, tmp_path / "b", *flags, "--resume")))
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    first = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)["metrics"]["train_rec_first"]
    assert met["train_rec_first"] == first  # the logged first loss survives the resume


def test_resume_with_another_architecture_is_a_user_error(tiny_vq, tmp_path):
    import data, shutil
    shutil.copy(tiny_vq, tmp_path / "ckpt.pt")
    with pytest.raises(data.UserError, match="trained with another model: norm 'IN,AdaIN'"):
        vqvae.train(vqvae.parse_config(smoke(Path(vqvae.load_vqvae(tiny_vq).cfg.data).parent, tmp_path,
                                             "--norm", "IN,IN", "--resume")))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])  # autocast; float16 also runs the grad scaler
def test_mixed_precision_trains_on_cpu(tiny_world, tmp_path, dtype):
    model, met = vqvae.train(vqvae.parse_config(smoke(tiny_world, tmp_path, "--steps", "4", "--dtype", dtype)))
    assert math.isfinite(met["train_rec"]) and model.quantizer.codebook.dtype == torch.float32
    assert vqvae.load_vqvae(tmp_path / "ckpt.pt").cfg.dtype == dtype


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bfloat16_train_then_sample(tiny_world, tmp_path):
    _, met = vqvae.train(vqvae.parse_config(smoke(tiny_world, tmp_path, "--steps", "6", "--device", "cuda",
                                                  "--dtype", "bfloat16", "--compile")))
    assert math.isfinite(met["train_rec"])
    rows = vqvae.sample(vqvae.parse_config(smoke(tiny_world, tmp_path, "--device", "cuda"), "sample"))
    assert math.isfinite(rows["model"]["mse/all"]) and rows["model"]["n_windows"] > 0


def test_torchrun_two_processes_match_one(tiny_world, tmp_path):
    """DDP on CPU (gloo): both ranks end in sync (check_in_sync, else exit 1) and equal to one process with the same
    global batch to float tolerance: half batches per rank change the rounding of convs and means (~1e-7). The naive
    codec is used because with IN the bias just before each instance norm has an exact gradient of zero; Adam turns
    the rounding noise of that gradient into lr-sized steps, so those biases (which change no output) differ by ~lr."""
    flags = ["--steps", "6", "--eval-every", "6", "--max-eval", "2", "--norm", "none,none"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "vqvae.py", *smoke(tiny_world, tmp_path / "ddp", *flags)], cwd=ROOT, capture_output=True,
                       text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    one, _ = vqvae.train(vqvae.parse_config(smoke(tiny_world, tmp_path / "one", *flags)))
    ddp = torch.load(tmp_path / "ddp" / "ckpt.pt", weights_only=True)["model"]
    for k, v in one.state_dict().items():
        assert torch.allclose(v.float(), ddp[k].float(), atol=1e-5), (k, (v.float() - ddp[k].float()).abs().max())
