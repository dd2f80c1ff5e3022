"""diff_transformer.py: bias and mask values, condition tokens, DDIM against an oracle, losses, causality of the
AR baseline, overfitting one batch, determinism, any-rate audio and the train -> sample command line."""
import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import diff_transformer as dt

ROOT = Path(__file__).resolve().parents[1]
SMALL = replace(dt.Config(), d_model=32, d_ffn=64, audio_width=16, dropout=0.0)
NF = 3 * SMALL.n_mfcc  # audio feature width: MFCC + deltas + delta-deltas


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is as fast, and far faster on a busy shared machine; restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def small_model(D=12, n_style=3, randomise_head=True, **kw):
    torch.manual_seed(0)
    m = dt.TalkingTransformer(replace(SMALL, **kw), D, n_style).eval()
    if randomise_head:  # the head is zero at init; make the output depend on the input for these tests
        torch.nn.init.normal_(m.head.weight, std=0.5)
    return m


# --- 1-2: the bias and the masks ---------------------------------------------------------------------------------

def test_self_bias_values_and_tiling():
    m = 0.3
    b = dt.periodic_alibi(5, 2, 1, n_cond=2, slopes=torch.tensor([m]))  # (1, 5, 7)
    expected = torch.tensor([[0, 0, 0, -1, -1], [0, 0, 0, 0, -1], [-1, 0, 0, 0, 0],
                             [-1, -1, 0, 0, 0], [-2, -1, -1, 0, 0]], dtype=torch.float32)
    assert torch.equal(b[0, :, :2], torch.zeros(5, 2))  # condition columns: zero bias
    assert torch.allclose(b[0, :, 2:] / m, expected)
    assert torch.allclose(dt.alibi_slopes(4), torch.tensor([1 / 4, 1 / 16, 1 / 64, 1 / 256]))
    bias = dt.periodic_alibi(6, 3, 4)  # (4, 6, 8)
    out = dt.tile_heads(bias, 3, 4)  # (12, 6, 8)
    for b_ in range(3):
        for h in range(4):
            assert torch.equal(out[b_ * 4 + h], bias[h])
    big = dt.periodic_alibi(1800, 30, 4)  # 60 s at 30 fps: no length cap
    assert big.shape == (4, 1800, 1802) and big[0, 1799, 2] == -0.25 * (1799 // 30)


def test_cross_mask_is_diagonal_plus_condition_columns():
    allowed = ~dt.diagonal_mask(4, 2)  # (4, 6)
    expected = torch.zeros(4, 6, dtype=torch.bool)
    expected[:, :2] = True
    for i in range(4):
        expected[i, i + 2] = True
    assert torch.equal(allowed, expected)


# --- 3-5: the network ----------------------------------------------------------------------------------------------

def test_condition_tokens_and_padding():
    m = small_model()
    B, T, D = 2, 20, 12
    x, mem = torch.randn(B, T, D), m.encode([torch.randn(34, NF)] * B, [T] * B)
    t, s = torch.tensor([10, 500]), torch.tensor([0, 1])
    y = m(x, t, mem, s, m.masks(T, B=B))
    assert y.shape == (B, T, D)  # tokens are keys/values, never queries
    assert not torch.allclose(y, m(x, t, mem, torch.tensor([2, 1]), m.masks(T, B=B)))  # style matters
    assert not torch.allclose(y, m(x, torch.tensor([900, 500]), mem, s, m.masks(T, B=B)))  # step matters
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[1, 5:] = True  # a fully padded tail
    for kw in [{}, {"cross_mask": "full", "self_bias": "none"}, {"cond": "add"}]:
        mk = small_model(**kw)
        assert torch.isfinite(mk(x, t, mem, s, mk.masks(T, pad))).all()


@pytest.mark.parametrize("kw", [{}, {"arch": "ar"}])
def test_fast_diagonal_cross_attention_equals_masked_attention(kw):
    m = small_model(**kw)
    B, T = 2, 19
    x, mem = torch.randn(B, T, 12), m.encode([torch.randn(32, NF), torch.randn(20, NF)], [T, 12])
    pad = torch.arange(T)[None] >= torch.tensor([T, 12])[:, None]
    args = (x, None if kw else torch.tensor([3, 800]), mem, torch.tensor([0, 2]))
    fast = m(*args, m.masks(T, pad))
    m.fast_diag = False
    slow = m(*args, m.masks(T, pad))
    assert m.masks(T, pad)[1] is not None and torch.allclose(fast[0], slow[0], atol=1e-5)
    assert torch.allclose(fast[1, :12], slow[1, :12], atol=1e-5)


def test_zero_init_head():
    m = small_model(randomise_head=False)
    mem = m.encode([torch.randn(30, NF)], [17])
    assert torch.equal(m(torch.randn(1, 17, 12), torch.tensor([3]), mem, torch.tensor([1]), m.masks(17)),
                       torch.zeros(1, 17, 12))


def test_audio_receptive_field_and_length():
    torch.manual_seed(0)
    enc = dt.AudioEncoder(SMALL).eval()
    f = torch.randn(1, 100, NF)
    g = f.clone()
    g[0, 50] += 5.0
    changed = ((enc(f) - enc(g)).abs().amax(-1)[0] > 0).nonzero().flatten()  # rows outside the field: exactly 0
    span = int(changed.max() - changed.min() + 1)
    assert span >= 15 and span == 33, span  # >= 0.3 s at 50 Hz; 3 + 2 * (1 + 2 + 4 + 8) = 33 rows expected
    m = small_model()
    for T in (37, 64, 150):
        assert m.encode([torch.randn(round(T * 5 / 3), NF)], [T]).shape == (1, T, 32)
    f1, f2 = torch.randn(62, NF), torch.randn(30, NF)
    mixed = m.encode([f1, f2], [37, 18])  # each interpolated to its own T, then padded
    assert mixed.shape == (2, 37, 32)
    assert torch.allclose(mixed[1, :18], m.encode([f2], [18])[0], atol=1e-5)


def test_audio_features_shape():
    if not hasattr(dt.data, "mfcc"):
        pytest.skip("data.mfcc not written yet")
    wave = np.random.default_rng(0).standard_normal(16000).astype(np.float32)
    f = dt.audio_features(wave)
    assert f.shape == (50, NF) and torch.allclose(f.mean(0), torch.zeros(NF), atol=1e-4)


# --- 6: schedule and DDIM ------------------------------------------------------------------------------------------

def test_schedule_and_ddim_against_an_oracle():
    abar = dt.scaled_linear_abar()
    betas = 1 - abar / torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]])
    assert math.isclose(betas[0], 8.5e-4, rel_tol=1e-9) and math.isclose(betas[-1], 1.2e-2, rel_tol=1e-9)
    z = dt.scaled_linear_abar(zero_snr=True)  # our default: same abar_0, abar_T = 0 (arXiv 2305.08891)
    assert math.isclose(z[0], abar[0], rel_tol=1e-12) and z[-1] == 0 and torch.all(z[1:] < z[:-1])
    grid = dt.ddim_timesteps(50)
    assert grid[0] == 981 and grid[-1] == 1 and len(grid) == 50 and torch.all(grid[:-1] - grid[1:] == 20)
    x0 = torch.randn(2, 7, 5, dtype=torch.float64)
    xT = torch.randn_like(x0)
    oracle = lambda x, tau: x0
    assert torch.allclose(dt.ddim_sample(oracle, xT, abar, 50), x0, atol=1e-5)
    legacy = dt.ddim_sample(oracle, xT, abar, 50, legacy=True)
    factor = math.sqrt(abar[0]) + math.sqrt(1 - abar[0])  # diffusers-0.11 semantics
    assert abs(factor - 1.0287) < 1e-4 and torch.allclose(legacy, factor * x0, atol=1e-9)
    # one step, closed form: with the true x0 the step keeps the same eps, x' = sqrt(a') x0 + sqrt(1 - a') eps
    eps = torch.randn_like(x0)
    a, ap = abar[981].item(), abar[961].item()
    x_t = math.sqrt(a) * x0 + math.sqrt(1 - a) * eps
    assert torch.allclose(dt.ddim_step(x_t, x0, a, ap), math.sqrt(ap) * x0 + math.sqrt(1 - ap) * eps, atol=1e-10)
    # eta = 0: deterministic given x_T (a real network, twice)
    m = small_model()
    f = [torch.randn(40, NF)]
    y1 = dt.generate(m, f, [24], torch.tensor([1]), seed=5, ddim_steps=10)
    y2 = dt.generate(m, f, [24], torch.tensor([1]), seed=5, ddim_steps=10)
    assert torch.equal(y1, y2) and not torch.equal(y1, dt.generate(m, f, [24], torch.tensor([1]), seed=6, ddim_steps=10))


# --- 7-8: losses and normalisation ---------------------------------------------------------------------------------

def test_losses_hand_computed_and_padding():
    pred = torch.tensor([[[0.0], [1.0], [3.0]]])  # (1, 3, 1)
    gt = torch.zeros(1, 3, 1)
    vert, vel = dt.masked_losses(pred, gt, torch.ones(1, 3, dtype=torch.bool))
    assert math.isclose(vert.item(), 10 / 3, rel_tol=1e-6)  # (0 + 1 + 9) / 3
    assert math.isclose(vel.item(), 2.5, rel_tol=1e-6)  # velocities 1 and 2: (1 + 4) / 2
    padded = torch.cat([pred, torch.full((1, 4, 1), 7.0)], 1)  # 4 padded frames of garbage
    valid = torch.tensor([[True] * 3 + [False] * 4])
    v2, l2 = dt.masked_losses(padded, torch.zeros(1, 7, 1), valid)
    assert math.isclose(v2.item(), vert.item(), rel_tol=1e-6) and math.isclose(l2.item(), vel.item(), rel_tol=1e-6)


def test_normalisation_round_trip():
    disp = np.random.default_rng(0).standard_normal((9, 30)).astype(np.float32) * 1e-3
    sigma = float(np.sqrt(np.mean(disp ** 2)))
    x = dt.normalise(disp, sigma)
    assert abs(np.mean(x ** 2) - 1) < 1e-5 and np.allclose(dt.denormalise(x, sigma), disp, atol=1e-9)


# --- 9: the autoregressive baseline is causal ---------------------------------------------------------------------

def test_ar_baseline_is_causal():
    m = small_model(arch="ar")
    T, t = 16, 9
    x = torch.randn(1, T, 12)
    f = torch.randn(27, NF)
    mem = m.encode([f], [T])
    y = m(m.shift(x), None, mem, torch.tensor([0]), m.masks(T))
    x2, mem2 = x.clone(), mem.clone()
    x2[:, t:] += 3.0  # inputs after frame t (frame t itself enters the output only from t + 1 on)
    mem2[:, t + 1:] -= 2.0
    y2 = m(m.shift(x2), None, mem2, torch.tensor([0]), m.masks(T))
    assert torch.allclose(y[:, :t + 1], y2[:, :t + 1], atol=1e-6) and not torch.allclose(y, y2)
    gen = dt.generate(m, [f], [T], torch.tensor([0]))  # frame-by-frame decoding == teacher forcing on its output
    assert torch.allclose(gen, m(m.shift(gen), None, mem, torch.tensor([0]), m.masks(T)), atol=1e-5)


# --- 10: overfitting one batch, determinism -----------------------------------------------------------------------

def overfit(steps, seed=0):
    torch.manual_seed(seed)
    m = dt.TalkingTransformer(SMALL, 12, 3)
    B, T = 4, 32
    tt = torch.arange(T)[None, :, None] / 30
    x0 = torch.sin(2 * math.pi * (tt * torch.arange(1, 13) / 4 + torch.arange(B)[:, None, None]))  # (4, 32, 12)
    feats = [torch.randn(54, NF) for _ in range(B)]
    t = torch.tensor([50, 200, 400, 700])
    noise = torch.randn_like(x0)
    x_t = dt.q_sample(x0, t, noise, dt.scaled_linear_abar())
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        mem = m.encode(feats, [T] * B)
        vert, vel = dt.masked_losses(m(x_t, t, mem, torch.arange(B) % 3, m.masks(T, B=B)), x0,
                                     torch.ones(B, T, dtype=torch.bool))
        opt.zero_grad()
        (vert + vel).backward()
        opt.step()
        losses.append((vert + vel).item())
    return losses


def test_overfit_one_batch():
    losses = overfit(300)
    assert losses[-1] < 0.2 * losses[0], (losses[0], losses[-1])


def test_determinism():
    assert overfit(3, seed=1) == overfit(3, seed=1)


def test_ema_update_hand_values():
    """d = min(decay, (1 + step) / (10 + step)): step 0 -> d = 0.1, so ema = 0.1 * 2 + 0.9 * 4 = 3.8; late steps use
    the decay itself: 0.9 * 3.8 + 0.1 * 0 = 3.42. The live model is untouched."""
    model, ema = nn.Linear(1, 1), nn.Linear(1, 1)
    for m, v in ((model, 4.0), (ema, 2.0)):
        nn.init.constant_(m.weight, v), nn.init.constant_(m.bias, v)
    dt.ema_update(ema, model, 0, 0.9)
    assert torch.allclose(ema.weight, torch.tensor([[3.8]])) and torch.allclose(ema.bias, torch.tensor([3.8]))
    nn.init.zeros_(model.weight)
    dt.ema_update(ema, model, 10_000, 0.9)
    assert torch.allclose(ema.weight, torch.tensor([[3.42]])) and model.weight.item() == 0


# --- the command line: any-rate audio, train -> sample --------------------------------------------------------------

@pytest.fixture(scope="module")
def smoke_run(tiny_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("dt")
    r = subprocess.run([sys.executable, "train.py", "--model", "diff_transformer", "--preset", "smoke",
                        "--data", str(tiny_world), "--out", str(out), "--steps", "30", "--eval-every", "15", "--threads", "1", "--ema", "0.99"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_cli_train_then_sample(smoke_run):
    out = smoke_run
    for run in (out, out / "ar", out / "plain"):
        assert (run / "ckpt.pt").exists() and (run / "config.json").exists()
    ck = torch.load(out / "ckpt.pt", weights_only=False)
    losses = ck["metrics"]["loss"]
    assert np.isfinite(losses).all() and np.mean(losses[-5:]) < np.mean(losses[:5])
    model, _ = dt.load_checkpoint(out / "ckpt.pt")  # rebuilt from the checkpoint alone, with its stats
    assert ck["sigma"] > 0 and model.head.out_features == ck["D"]
    # keep_best: the weights of the lowest val LVE travel in the checkpoint and are what load_checkpoint returns
    val = ck["metrics"]["val"]
    assert [v["step"] for v in val] == [15, 30] and ck["best"]["lve"] == min(v["lve"] for v in val)
    assert ck["best"]["step"] == min(val, key=lambda v: v["lve"])["step"]
    w = next(iter(ck["best"]["model"]))
    assert torch.equal(model.state_dict()[w], ck["best"]["model"][w])
    ck["best"]["model"] = {k: v + 1 for k, v in ck["best"]["model"].items()}
    torch.save(ck, out / "edited.pt")
    assert torch.equal(dt.load_checkpoint(out / "edited.pt")[0].state_dict()[w], ck["best"]["model"][w])
    # last=True: the final weight average (ema), which is not the raw final weights
    assert torch.equal(dt.load_checkpoint(out / "edited.pt", last=True)[0].state_dict()[w], ck["ema"][w])
    assert not torch.equal(ck["ema"][w], ck["model"][w])
    r = subprocess.run([sys.executable, "sample.py", "--model", "diff_transformer", "--ckpt", str(out / "ckpt.pt"),
                        "--ddim-steps", "5", "--threads", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((out / "metrics.json").read_text())
    for row in ["GT", "baseline:static_template", "baseline:autoregressive", "ablation:plain_attention", "model"]:
        assert row in rows and np.isfinite(rows[row]["lve"]), row
    assert rows["GT"]["lve"] == 0 and rows["model"]["ms_per_10s"] > 0
    # the hidden-rule references of the synthetic world, and the mean-of-samples row
    assert 0 < rows["oracle:speech_only"]["lve"] < rows["oracle:speech_only_train_styles"]["lve"] < rows["baseline:static_template"]["lve"]
    # Jensen: the style-averaged face is never worse than the faces under each style, averaged (LVE and MVE)
    for k in ("lve", "mve"):
        assert rows["oracle:speech_only_style_mean"][k] <= rows["oracle:speech_only_train_styles"][k]
    assert rows["alt-GT"]["lve"] > 0 and any(r.startswith("model:mean_of_") for r in rows)
    assert list(out.glob("*.gif")) and list(out.glob("*.npy")) and list(out.glob("*.png"))


@pytest.mark.parametrize("rate,channels,seconds", [(16000, 1, 1.3), (44100, 2, 0.9), (8000, 1, 2.05)])
def test_any_wav_gives_audio_length_frames(smoke_run, tmp_path, rate, channels, seconds):
    import soundfile as sf
    n = int(rate * seconds)
    wave = 0.1 * np.sin(2 * np.pi * 220 * np.arange(n) / rate)
    path = tmp_path / f"speech_{rate}.wav"
    sf.write(path, np.stack([wave] * channels, 1) if channels == 2 else wave, rate)
    dt.main(["--ckpt", str(smoke_run / "ckpt.pt"), "--out", str(tmp_path), "--audio", str(path), "--style", "2",
             "--ddim-steps", "3"], mode="sample")
    v = np.load(tmp_path / f"speech_{rate}_style2.npy")
    assert v.shape[0] == int(seconds * 30) and np.isfinite(v).all() and (tmp_path / f"speech_{rate}_style2.gif").exists()


def test_sample_without_a_checkpoint_says_so(tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint at .*ckpt.pt; train first"):
        dt.main(["--out", str(tmp_path)], mode="sample")
