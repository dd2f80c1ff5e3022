"""diff_transformer.py: bias and mask values, condition tokens, DDIM against an oracle, losses, causality of the
AR baseline, overfitting one batch, determinism, any-rate audio, the train -> sample command line, user errors,
exact resume, mixed precision, CUDA (skipped without a GPU) and DDP under torchrun against one process."""
import json
import math
import os
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
    cfg = replace(SMALL, **kw)
    m = (dt.FaceFormerAR if cfg.arch == "ar" else dt.DiffSpeaker)(cfg, D, n_style).eval()
    if randomise_head:  # the head is zero at init; make the output depend on the input for these tests
        torch.nn.init.normal_(m.head.weight, std=0.5)
    return m


# --- 1-2: the bias and the masks ---------------------------------------------------------------------------------

def test_self_bias_values_and_tiling():
    m = 0.3
    b = dt.periodic_alibi(5, 2, torch.tensor([m]), n_cond=2)  # (1, 5, 7)
    expected = torch.tensor([[0, 0, 0, -1, -1], [0, 0, 0, 0, -1], [-1, 0, 0, 0, 0],
                             [-1, -1, 0, 0, 0], [-2, -1, -1, 0, 0]], dtype=torch.float32)
    assert torch.equal(b[0, :, :2], torch.zeros(5, 2))  # condition columns: zero bias
    assert torch.allclose(b[0, :, 2:] / m, expected)
    assert torch.allclose(dt.alibi_slopes(4), torch.tensor([1 / 4, 1 / 16, 1 / 64, 1 / 256]))
    bias = dt.periodic_alibi(6, 3, dt.alibi_slopes(4))  # (4, 6, 8)
    out = dt.tile_heads(bias, 3)  # (12, 6, 8)
    for b_ in range(3):
        for h in range(4):
            assert torch.equal(out[b_ * 4 + h], bias[h])
    big = dt.periodic_alibi(1800, 30, dt.alibi_slopes(4))  # 60 s at 30 fps: no length cap
    assert big.shape == (4, 1800, 1802) and big[0, 1799, 2] == -0.25 * (1799 // 30)


def diagonal_mask(T, C=2):
    """DiffSpeaker's cross-attention mask, True = blocked: query i sees the C condition columns and audio row i:
    (T, C + T). DecoderLayer.diag_cross computes attention under it directly; this is the reference."""
    blocked = torch.ones(T, C + T, dtype=torch.bool)
    blocked[:, :C] = False
    blocked[torch.arange(T), C + torch.arange(T)] = False
    return blocked


def test_cross_attention_is_diagonal():
    """Frame i sees audio row i only: with one layer, moving memory row 7 moves output row 7 alone (--cross-mask
    full: every row)."""
    for cross, rows in (("diag", [7]), ("full", list(range(12)))):
        m = small_model(cross_mask=cross)
        x, mem = torch.randn(1, 12, 12), torch.randn(1, 12, 32)
        mem2 = mem.clone()
        mem2[0, 7] += 1.0
        y, y2 = (m(x, torch.tensor([5]), mm, torch.tensor([1]), m.masks(12)) for mm in (mem, mem2))
        assert ((y - y2).abs().amax(-1)[0] > 0).nonzero().flatten().tolist() == rows, cross


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
    args = (x, mem, torch.tensor([0, 2])) if kw else (x, torch.tensor([3, 800]), mem, torch.tensor([0, 2]))
    self_mask, cross = m.masks(T, pad)
    assert cross is None  # the diagonal: DecoderLayer.diag_cross
    H, C = m.cfg.n_heads, m.n_cond
    cross = torch.zeros(T, C + T).masked_fill(diagonal_mask(T, C), float("-inf")).expand(H, T, C + T)
    fast, slow = m(*args, (self_mask, None)), m(*args, (self_mask, dt.tile_heads(cross, B)))  # slow: MHA + mask
    assert torch.allclose(fast[0], slow[0], atol=1e-5)
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
    x0 = torch.randn(2, 7, 5, dtype=torch.float64)
    xT = torch.randn_like(x0)
    grid = []
    oracle = lambda x, tau: grid.append(tau) or x0
    assert torch.allclose(dt.ddim_sample(oracle, xT, abar, 50), x0, atol=1e-5)
    assert grid[0] == 981 and grid[-1] == 1 and len(grid) == 50 and set(np.diff(grid)) == {-20}
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
    y3 = dt.generate(m, f, [24], torch.tensor([1]), seed=6, ddim_steps=10)
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)


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
    disp = np.random.default_rng(0).standard_normal((9, 30)).astype(np.float32) * 1e-3  # (T, V*3), V = 10
    template = np.random.default_rng(1).standard_normal((10, 3)).astype(np.float32)
    sigma = float(np.sqrt(np.mean(disp ** 2)))
    x = disp / sigma  # what make_batch feeds the network
    v = dt.to_vertices(x, sigma, template)  # (T, V, 3)
    assert abs(np.mean(x ** 2) - 1) < 1e-5 and np.allclose(v - template, disp.reshape(9, 10, 3), atol=1e-6)


# --- 9: the autoregressive baseline is causal ---------------------------------------------------------------------

def test_ar_baseline_is_causal():
    m = small_model(arch="ar")
    T, t = 16, 9
    x = torch.randn(1, T, 12)
    f = torch.randn(27, NF)
    mem = m.encode([f], [T])
    y = m(m.shift(x), mem, torch.tensor([0]), m.masks(T))
    x2, mem2 = x.clone(), mem.clone()
    x2[:, t:] += 3.0  # inputs after frame t (frame t itself enters the output only from t + 1 on)
    mem2[:, t + 1:] -= 2.0
    y2 = m(m.shift(x2), mem2, torch.tensor([0]), m.masks(T))
    assert torch.allclose(y[:, :t + 1], y2[:, :t + 1], atol=1e-6) and not torch.allclose(y, y2)
    gen = dt.generate(m, [f], [T], torch.tensor([0]))  # frame-by-frame decoding == teacher forcing on its output
    assert torch.allclose(gen, m(m.shift(gen), mem, torch.tensor([0]), m.masks(T)), atol=1e-5)


# --- 10: overfitting one batch, determinism -----------------------------------------------------------------------

def overfit(steps, seed=0):
    torch.manual_seed(seed)
    m = dt.DiffSpeaker(SMALL, 12, 3)
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



# --- the paper row's flags and the paper's protocol ------------------------------------------------------------------

def load_data(cfg):
    """What train() reads: train / val items with the method's audio features, and the checkpoint's data stats."""
    return dt.data.talking_train_val(cfg.data, cfg.preset, lambda w: dt.audio_features(w, cfg.n_mfcc), cfg.norm)


def make_batch(items, cfg, rng, sigma):
    """One training batch as train() draws it."""
    return dt.data.talking_batch(items, rng, sigma, cfg.batch_size, cfg.min_frames, cfg.max_frames, dt.AUDIO_RATE)


def test_paper_row_flags(tiny_world):
    """Default data: the vocaset twin. --no-norm trains on raw displacements (sigma 1), --no-final-ln drops the
    LayerNorm before the zero head (the output is still 0 at init), --no-zero-snr keeps abar_T > 0."""
    assert dt.parse_config([]).data == "vocaset"
    cfg = dt.parse_config(["--preset", "smoke", "--data", str(tiny_world), "--no-norm", "--no-final-ln"])
    items, _, stats = load_data(cfg)
    assert stats["sigma"] == 1.0 and load_data(replace(cfg, norm=True))[2]["sigma"] < 0.1
    x0, *_ = make_batch(items, cfg, np.random.default_rng(0), stats["sigma"])
    assert x0.abs().max() < 1.0  # raw metres-like displacements, not unit variance
    m = small_model(randomise_head=False, final_ln=False)
    assert isinstance(m.ln, nn.Identity) and isinstance(small_model(arch="ar", final_ln=False).ln, nn.Identity)
    mem = m.encode([torch.randn(30, NF)], [17])
    assert torch.equal(m(torch.randn(1, 17, 12), torch.tensor([3]), mem, torch.tensor([1]), m.masks(17)),
                       torch.zeros(1, 17, 12))
    assert dt.scaled_linear_abar()[-1] > 1e-5 and dt.scaled_linear_abar(zero_snr=True)[-1] == 0


def test_repetitions_interval_and_both_lves():
    """reps > 1: lve and lve_seq are means over the repetitions (styles averaged inside each) with 1.96 std / sqrt(n);
    pooled and per-sequence LVE differ when sequences differ in length."""
    rng = np.random.default_rng(0)
    gts = [rng.standard_normal((T, 4, 3)) for T in (5, 9)]
    shift = {seed: 0.1 * (k + 1) for k, seed in enumerate(dt.metrics.TALKING_SEEDS)}
    predict = lambda style, seed: [g + shift[seed] * (1 + style) * (i + 1) for i, g in enumerate(gts)]
    res = dt.metrics.style_averaged(predict, gts, [g[0] for g in gts], 2, [0, 1], [2, 3], reps=3)
    for k, per_seq in (("lve", False), ("lve_seq", True)):
        per = [np.mean([dt.metrics.lip_vertex_error(predict(s, seed), gts, [0, 1], per_sequence=per_seq)
                        for s in range(2)]) for seed in dt.metrics.TALKING_SEEDS[:3]]
        assert math.isclose(res[k], np.mean(per), rel_tol=1e-12)
        assert math.isclose(res[f"{k}_ci95"], 1.96 * np.std(per, ddof=1) / math.sqrt(3), rel_tol=1e-12)
    assert res["lve"] > res["lve_seq"]  # the longer clip has the larger error: pooling weights it more


def test_mouth_pair_finds_the_opening_lips():
    t = np.arange(40)[:, None]
    gt = np.zeros((40, 5, 3))
    gt[..., 1] = np.arange(5)  # a column of vertices, 1 apart
    gt[:, 3, 1] -= 0.5 * (1 + np.sin(t[:, 0] / 3))  # vertex 3 drops and rises: it opens against the others
    gt[:, 1, 1] += 0.2 * np.sin(t[:, 0] / 3)  # vertex 1 moves the other way
    assert sorted(dt.metrics.mouth_pair(gt, [0, 1, 3, 4])) == [1, 3]


# --- the command line: train -> sample, any-rate audio, user errors -----------------------------------------------

def train_run(world, out, *flags):
    """Smoke-preset training in process (one thread: the module fixture)."""
    return dt.main(["--preset", "smoke", "--data", str(world), "--out", str(out), *flags], mode="train")


@pytest.fixture(scope="module")
def smoke_run(tiny_world, tmp_path_factory):
    """The model (30 steps, checkpoints at 15 and 30) and the AR baseline as its own run (--arch ar)."""
    out = tmp_path_factory.mktemp("dt")
    r = subprocess.run([sys.executable, "train.py", "--model", "diff_transformer", "--preset", "smoke",
                        "--data", str(tiny_world), "--out", str(out), "--steps", "30", "--eval-every", "15",
                        "--threads", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    train_run(tiny_world, out / "ar", "--arch", "ar", "--steps", "10")
    return out


def test_cli_train_then_sample(smoke_run):
    out = smoke_run
    for run in (out, out / "ar"):
        assert (run / "ckpt.pt").exists() and (run / "config.json").exists()
    ck = torch.load(out / "ckpt.pt", weights_only=True)  # plain tensors and containers only
    assert ck["method"] == "diff_transformer" and ck["step"] == 30
    losses = ck["metrics"]["loss"]
    assert np.isfinite(losses).all() and np.mean(losses[-5:]) < np.mean(losses[:5])
    model, _ = dt.load_model(out / "ckpt.pt")  # rebuilt from the checkpoint alone, with its stats
    assert ck["sigma"] > 0 and model.head.out_features == ck["D"] and isinstance(model, dt.DiffSpeaker)
    assert isinstance(dt.load_model(out / "ar" / "ckpt.pt")[0], dt.FaceFormerAR)
    # keep_best: the weights of the lowest val LVE travel in the checkpoint and are what load_model returns
    val = ck["metrics"]["val"]
    assert [v["step"] for v in val] == [15, 30] and ck["best"]["lve"] == min(v["lve"] for v in val)
    assert ck["best"]["step"] == min(val, key=lambda v: v["lve"])["step"]
    w = next(iter(ck["best"]["model"]))
    assert torch.equal(model.state_dict()[w], ck["best"]["model"][w])
    ck["best"]["model"] = {k: v + 1 for k, v in ck["best"]["model"].items()}
    torch.save(ck, out / "edited.pt")
    assert torch.equal(dt.load_model(out / "edited.pt")[0].state_dict()[w], ck["best"]["model"][w])
    assert torch.equal(dt.load_model(out / "edited.pt", best=False)[0].state_dict()[w], ck["model"][w])  # sample
    del ck["best"]  # trained with --no-keep-best: the last weights                                  # --no-keep-best
    torch.save(ck, out / "last.pt")
    assert torch.equal(dt.load_model(out / "last.pt")[0].state_dict()[w], ck["model"][w])
    r = subprocess.run([sys.executable, "sample.py", "--model", "diff_transformer", "--ckpt", str(out / "ckpt.pt"),
                        "--out", str(out), "--ar-ckpt", str(out / "ar" / "ckpt.pt"), "--ddim-steps", "5", "--reps", "2",
                        "--threads", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((out / "metrics.json").read_text())
    for row in ["GT", "baseline:static_template", "baseline:autoregressive", "model"]:
        assert row in rows and np.isfinite(rows[row]["lve"]), row
    assert rows["GT"]["lve"] == 0 and rows["model"]["ms_per_10s"] > 0
    assert rows["baseline:autoregressive"]["ms_per_10s"] > 0
    # the hidden-rule references of the synthetic world
    lve = {row: rows[row]["lve"] for row in rows if "lve" in rows[row]}
    assert 0 < lve["oracle:speech_only"] < lve["oracle:speech_only_train_styles"] < lve["baseline:static_template"]
    # Jensen: the style-averaged face is never worse than the faces under each style, averaged (LVE and MVE)
    for k in ("lve", "mve"):
        assert rows["oracle:speech_only_style_mean"][k] <= rows["oracle:speech_only_train_styles"][k]
    assert rows["alt-GT"]["lve"] > 0
    assert list(out.glob("*.gif")) and list(out.glob("*.npy")) and (out / "lip_distance.png").exists()
    assert "10 s of speech" in r.stdout and rows["model"]["lve_ci95"] > 0 and "lve_seq_ci95" in rows["model"]


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
    assert v.shape[0] == int(seconds * 30) and np.isfinite(v).all()
    assert (tmp_path / f"speech_{rate}_style2.gif").exists()


def user_error(capsys, argv, mode="train"):
    """Run the command line; it must exit with status 2 and print one line `error: ...` -> that line."""
    with pytest.raises(SystemExit) as e:
        dt.cli(argv, mode)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and "\n" not in err, err
    return err


def test_user_mistakes_are_one_line(smoke_run, tmp_path, capsys, monkeypatch):
    assert "no checkpoint at" in user_error(capsys, ["--out", str(tmp_path)], "sample")
    assert "--steps -5" in user_error(capsys, ["--steps", "-5"])
    assert "--arch 'gan'" in user_error(capsys, ["--arch", "gan"])
    assert "--preset" in user_error(capsys, ["--preset", "huge"])
    assert "no-such-dir" in user_error(capsys, ["--preset", "smoke", "--data", str(tmp_path / "no-such-dir"),
                                                "--out", str(tmp_path)])
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert "multiple of the 3 torchrun" in user_error(capsys, ["--batch-size", "16"])
    monkeypatch.delenv("WORLD_SIZE")
    torch.save({"method": "vqvae", "model": {}}, tmp_path / "other.pt")
    assert "checkpoint of vqvae" in user_error(capsys, ["--ckpt", str(tmp_path / "other.pt")], "sample")
    (tmp_path / "bad.wav").write_bytes(b"RIFF0000WAVEnot really audio")
    ckpt = ["--ckpt", str(smoke_run / "ckpt.pt"), "--out", str(tmp_path)]
    assert "bad.wav" in user_error(capsys, ckpt + ["--audio", str(tmp_path / "bad.wav")], "sample")
    assert "missing.wav" in user_error(capsys, ckpt + ["--audio", str(tmp_path / "missing.wav")], "sample")
    import soundfile as sf
    sf.write(tmp_path / "ok.wav", np.zeros(1600), 16000)
    assert "--style 99" in user_error(capsys, ckpt + ["--audio", str(tmp_path / "ok.wav"), "--style", "99"], "sample")


# --- exact resume, mixed precision, CUDA, DDP -------------------------------------------------------------------------

def test_resume_after_a_kill_is_exact(tiny_world, tmp_path, monkeypatch):
    """N steps straight vs killed right after the first checkpoint (step N/2) and resumed: the same weights, bit
    for bit (optimiser, best-val weights, data order and every random stream travel in the checkpoint)."""
    steps = ["--steps", "6", "--eval-every", "3"]
    train_run(tiny_world, tmp_path / "straight", *steps)
    real_save = dt.save_checkpoint

    def save_then_die(path, obj):
        real_save(path, obj)
        raise KeyboardInterrupt("killed right after the first checkpoint")
    monkeypatch.setattr(dt, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_run(tiny_world, tmp_path / "killed", *steps)
    monkeypatch.setattr(dt, "save_checkpoint", real_save)
    assert torch.load(tmp_path / "killed" / "ckpt.pt", weights_only=True)["step"] == 3
    train_run(tiny_world, tmp_path / "killed", *steps, "--resume")
    a, b = (torch.load(tmp_path / run / "ckpt.pt", weights_only=True) for run in ("straight", "killed"))
    assert b["step"] == 6 and a["metrics"] == b["metrics"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
        assert torch.equal(a["best"]["model"][k], b["best"]["model"][k]), k


def test_bfloat16_autocast_trains_on_cpu(tiny_world, tmp_path):
    train_run(tiny_world, tmp_path, "--dtype", "bfloat16", "--steps", "3", "--eval-every", "3")
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert np.isfinite(ck["metrics"]["loss"]).all() and ck["config"]["dtype"] == "bfloat16"


def test_compile_flag_saves_the_plain_module(tiny_world, tmp_path, monkeypatch):
    """--compile trains through torch.compile (here its "eager" backend: tracing without a C++ build, which takes
    minutes on a small CPU) and the checkpoint holds the uncompiled module's keys."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m: real_compile(m, backend="eager"))
    train_run(tiny_world, tmp_path, "--compile", "--steps", "1", "--eval-every", "1", "--n-val", "2")
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert set(ck["model"]) == set(dt.load_model(tmp_path / "ckpt.pt")[0].state_dict())
    assert not any("_orig_mod" in k for k in ck["model"]) and np.isfinite(ck["metrics"]["loss"]).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bfloat16_trains_and_samples(tiny_world, tmp_path):
    train_run(tiny_world, tmp_path, "--device", "cuda", "--dtype", "bfloat16", "--steps", "5", "--eval-every", "5")
    rows = dt.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path), "--device", "cuda",
                    "--ddim-steps", "5"], mode="sample")
    assert np.isfinite(rows["model"]["lve"]) and (tmp_path / "metrics.json").exists()


class FakeRanks:
    """torch.distributed as seen by one of `world` ranks, enough for train_loss and shard (no process group)."""
    def __init__(self, rank, world):
        self.rank, self.world = rank, world
    is_initialized = lambda self: True
    get_rank = lambda self: self.rank
    get_world_size = lambda self: self.world


def test_sharded_loss_gradients_average_to_the_whole_batch(tiny_world, monkeypatch):
    """What DDP computes: the mean over 2 ranks of the gradients of each rank's train_loss on its shard of a
    global batch equals the gradient of one process on the whole batch (mixed lengths: the loss is normalised by
    the global batch's frame counts; time masks, t and noise are drawn for the whole batch on every rank)."""
    cfg = dt.parse_config(["--preset", "smoke", "--data", str(tiny_world), "--dropout", "0"], "train")
    items, _, stats = load_data(cfg)
    torch.manual_seed(0)
    m = dt.DiffSpeaker(cfg, stats["D"], stats["n_style"]).train()
    torch.nn.init.normal_(m.head.weight, std=0.05)  # the zero head would stop every other gradient
    batch = next(b for s in range(50) if len(set((b := make_batch(items, cfg, np.random.default_rng(s),
                                                                     stats["sigma"]))[2])) > 1)  # mixed lengths
    abar = dt.scaled_linear_abar(zero_snr=True)

    def grads(dist_view):
        monkeypatch.setattr(dt, "dist", dist_view)
        monkeypatch.setattr(dt.data, "dist", dist_view)  # data.shard takes this rank's rows
        torch.manual_seed(7)  # the same random stream on every rank
        m.zero_grad()
        sum(dt.train_loss(m, m, batch, cfg, abar, torch.device("cpu"))).backward()
        return {k: p.grad.clone() for k, p in m.named_parameters()}
    one = grads(dt.dist)
    ranks = [grads(FakeRanks(r, 2)) for r in range(2)]
    for k, g in one.items():
        assert torch.allclose((ranks[0][k] + ranks[1][k]) / 2, g, atol=1e-8, rtol=1e-5), k


def test_torchrun_two_processes_match_one(tiny_world, tmp_path):
    """2 ranks (gloo) on the shards of each global batch of 4 end with identical weights (check_in_sync, else the
    exit status is not 0) that match one process on the whole batches. Dropout off: its masks are drawn per rank.
    Tolerance: the losses agree to float rounding; the weights after 2 steps to 0.1 lr, not 1e-5, because Adam
    divides by sqrt(v) + 1e-8: a gradient entry near 1e-8 moves by about lr g / (|g| + 1e-8), so rounding-size
    differences of the summed gradient (1e-9, see the test above) move such entries by up to 0.1 lr."""
    flags = ["--preset", "smoke", "--data", str(tiny_world), "--steps", "2", "--eval-every", "2", "--dropout", "0",
             "--n-val", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "diff_transformer.py", *flags, "--out", str(tmp_path / "ddp")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    dt.main([*flags, "--out", str(tmp_path / "one")], mode="train")
    a, b = (torch.load(tmp_path / run / "ckpt.pt", weights_only=True) for run in ("ddp", "one"))
    assert np.allclose(a["metrics"]["loss"], b["metrics"]["loss"], rtol=1e-5, atol=0)
    lr = a["config"]["lr"]
    for k in a["model"]:
        gap = (a["model"][k] - b["model"][k]).abs().max()
        assert torch.allclose(a["model"][k], b["model"][k], atol=0.1 * lr, rtol=0), (k, gap)
