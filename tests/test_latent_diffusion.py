"""latent_diffusion.py: shapes, MLPSkipNet structure, the forward process, PLMS = DDIM at order 1, PLMS accuracy
on a Gaussian with a closed-form score, warm start, normaliser, overfitting, determinism, long sequences, CLI,
user errors, exact resume, mixed precision, CUDA (skipped without one) and torchrun with two CPU processes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import latent_diffusion as ld

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny nets run fastest on one thread (and 2 threads thrash on a loaded 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def small_cfg(**kw):
    base = dict(ld.PRESETS["smoke"])
    base.update(window=8, dropout=0.0)
    base.update(kw)
    return ld.Config(**base)


def tiny_model(n_win=3, D=25, Fd=56, **kw):
    torch.manual_seed(0)
    return ld.LBD(small_cfg(**kw), D, Fd, n_win).eval()


# ---------------------------------------------------------------------------------------------------- shapes


def test_shapes_and_windows_encoded_independently():
    m = tiny_model()
    cfg = m.cfg
    x = torch.randn(2, 3 * cfg.window, 25)                                     # (B, n*w, D)
    z = m.enc(x)
    assert z.shape == (2, 3, cfg.latent)
    assert m.dec(z).shape == (2, 3 * cfg.window, 25)
    assert m.decode_f(z)[0].shape == (2, 3 * cfg.window, 56) and m.decode_f(z)[1].ndim == 0  # 3DMM, VQ loss
    dim = 3 * cfg.latent
    assert m.den(torch.randn(4, dim), torch.rand(4) * 1000, torch.randn(4, dim)).shape == (4, dim)
    one = x[1:2, cfg.window:2 * cfg.window]                                    # window 1 of item 1, on its own
    assert torch.allclose(m.enc(one)[0, 0], z[1, 1], atol=1e-5)                # windows are encoded independently


def test_mlpskipnet_concatenates_input_and_scale_only_condition():
    dim, H, L = 12, 32, 6
    net = ld.MLPSkipNet(dim, H, L, dropout=0.0)
    assert net.lin[0].in_features == dim
    assert all(lin.in_features == H + dim for lin in net.lin[1:])
    assert net.last.in_features == H + dim and len(net.norm) == L - 1         # last layer: no norm
    for emb in net.emb:                                                        # s = 0 -> h ⊙ (1 + 0)
        torch.nn.init.zeros_(emb.weight), torch.nn.init.zeros_(emb.bias)
    x, t = torch.randn(5, dim), torch.full((5,), 300.0)
    assert torch.allclose(net(x, t, torch.randn(5, dim)), net(x, t, torch.randn(5, dim)))


# ---------------------------------------------------------------------------------------------------- diffusion


def test_forward_process_round_trip_and_schedule():
    abar = ld.alphas_cumprod(1000)
    assert abar[0] == 1 and torch.all(abar[1:] < abar[:-1])                    # monotone
    assert abs(abar[1] - (1 - 8.5e-4)) < 1e-12 and 0.003 < abar[-1] < 0.006   # LDM endpoints (ᾱ_T ≈ 0.0047)
    x0, eps = torch.randn(100, dtype=torch.float64), torch.randn(100, dtype=torch.float64)
    for t in [1, 500, 1000]:
        xt = ld.q_sample(x0, eps, abar[t])
        assert torch.allclose(ld.predict_x0(xt, eps, abar[t]), x0, atol=1e-6)


def ddim_reference(eps_fn, x, abar, S):
    """An independent DDIM η = 0 loop (arXiv 2010.02502 Eq. 12) on the grid τ_i = (i-1)·(T/S)+1, ending at ᾱ = 1."""
    T = len(abar) - 1
    taus = [1 + i * (T // S) for i in range(S)]
    for j in range(S - 1, -1, -1):
        t, a_t = taus[j], abar[taus[j]].item()
        a_prev = abar[taus[j - 1]].item() if j > 0 else 1.0
        e = eps_fn(x, t)
        x0 = (x - np.sqrt(1 - a_t) * e) / np.sqrt(a_t)
        x = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * e
    return x


def test_plms_order1_equals_ddim_step_by_step():
    abar = ld.alphas_cumprod(1000)
    W = torch.randn(6, 6, dtype=torch.float64) / 3
    eps_fn = lambda x, t: torch.tanh(x @ W) * (1 + t / 1000)                   # a dummy "network"
    x = torch.randn(4, 6, dtype=torch.float64)
    for S in [1, 10, 50]:
        assert torch.allclose(ld.plms_sample(eps_fn, x, abar, S, 1), ddim_reference(eps_fn, x, abar, S),
                              atol=1e-10, rtol=0)
    seen_a, seen_b = [], []                                                   # step by step: same x_t visited
    ld.plms_sample(lambda x, t: seen_a.append((t, x)) or eps_fn(x, t), x, abar, 25, 1)
    ddim_reference(lambda x, t: seen_b.append((t, x)) or eps_fn(x, t), x, abar, 25)
    assert [t for t, _ in seen_a] == [t for t, _ in seen_b] and len(seen_a) == 25
    assert all(torch.allclose(a, b, atol=1e-10, rtol=0) for (_, a), (_, b) in zip(seen_a, seen_b))


def gaussian_case(s=0.5, mu=1.5, n=4000):
    """Data N(mu, s²): ε*(x, t) = √(1−ᾱ)(x − √ᾱ μ)/(ᾱ s² + 1 − ᾱ); the exact ODE maps x_T to
    μ + (x_T − √ᾱ_T μ)·s/√(ᾱ_T s² + 1 − ᾱ_T)."""
    abar = ld.alphas_cumprod(1000)
    eps_fn = lambda x, t: (1 - abar[t]).sqrt() * (x - abar[t].sqrt() * mu) / (abar[t] * s * s + 1 - abar[t])
    x = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def exact(S):
        a = abar[ld.timestep_grid(1000, S)[-1]]
        return mu + (x - a.sqrt() * mu) * s / (a * s * s + 1 - a).sqrt()
    return abar, eps_fn, x, exact


def test_plms_accuracy_improves_with_order_and_beats_ddim_with_fewer_steps():
    abar, eps_fn, x, exact = gaussian_case()
    errs = [(ld.plms_sample(eps_fn, x, abar, 10, k) - exact(10)).abs().mean().item() for k in [1, 2, 3, 4]]
    assert errs[0] > errs[1] > errs[2] > errs[3], errs
    plms10 = ld.plms_sample(eps_fn, x, abar, 10, 4)
    ddim25 = ld.plms_sample(eps_fn, x, abar, 25, 1)
    # the right mean (that of the exact ODE solution from the same x_T) with fewer steps than DDIM
    assert abs(plms10.mean() - exact(10).mean()) < abs(ddim25.mean() - exact(25).mean())
    assert (plms10 - exact(10)).abs().mean() < (ddim25 - exact(25)).abs().mean()
    assert abs(plms10.mean() - exact(10).mean()) < 0.01 and abs(plms10.std() - exact(10).std()) < 0.03


def test_warm_start_network_calls_and_ab_coefficients():
    abar = ld.alphas_cumprod(1000)
    for k in [1, 2, 3, 4]:
        calls = []
        ld.plms_sample(lambda x, t: calls.append(t) or 0 * x, torch.zeros(3), abar, 10, k)
        assert len(calls) == (10 if k == 1 else 11)
        assert abs(sum(ld.AB_COEFFS[k]) - 1) < 1e-12


# ---------------------------------------------------------------------------------------------------- model


def test_latent_normaliser_round_trip():
    m = tiny_model()
    z = torch.randn(500, 3, m.cfg.latent) * 3 + 2
    m.z_mean.copy_(z.flatten(0, 1).mean(0)), m.z_std.copy_(z.flatten(0, 1).std(0))
    zn = m.znorm(z)
    assert torch.allclose(m.zdenorm(zn), z, atol=1e-5)
    assert zn.flatten(0, 1).mean(0).abs().max() < 1e-4 and (zn.flatten(0, 1).std(0) - 1).abs().max() < 1e-4


def test_autoencoder_overfits_one_batch():
    torch.manual_seed(0)
    m = tiny_model().train()
    x = torch.randn(4, 3 * m.cfg.window, 25).cumsum(1) / 4                    # smooth-ish signals
    opt = torch.optim.AdamW([*m.enc.parameters(), *m.dec.parameters()], lr=3e-3)
    losses = []
    for _ in range(300):
        loss = F.mse_loss(m.dec(m.enc(x)), x)
        opt.zero_grad(), loss.backward(), opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], (losses[0], losses[-1])


def test_denoiser_overfits_one_pair():
    torch.manual_seed(0)
    m = tiny_model(n_win=2)
    dim = 2 * m.cfg.latent
    z0, c = torch.randn(1, dim), torch.randn(1, dim)
    opt = torch.optim.AdamW(m.den.parameters(), lr=2e-3)
    for _ in range(400):
        t = torch.randint(1, 1001, (64,))
        eps = torch.randn(64, dim)
        loss = F.mse_loss(m.den(ld.q_sample(z0, eps, m.abar[t].float()[:, None]), t.float(), c.expand(64, -1)), eps)
        opt.zero_grad(), loss.backward(), opt.step()
    m.eval()
    fn = lambda x, t: m.den(x, torch.full((x.shape[0],), float(t)), c.expand(x.shape[0], -1))
    with torch.no_grad():
        out = ld.plms_sample(fn, torch.randn(8, dim), m.abar, 50, 4)
    assert (out - z0).abs().mean() < 0.1


def test_generate_determinism_and_diversity():
    m = tiny_model()
    torch.nn.init.normal_(m.den.last.weight, std=0.1)  # x0-head is zero at init (x0 = mean, no diversity): wake it
    spk = torch.randn(2, 3 * m.cfg.window - 5, 25)                             # T not a multiple of w
    z1, y1 = m.generate(spk, 10, 4, 10, torch.Generator().manual_seed(3))
    z2, y2 = m.generate(spk, 10, 4, 10, torch.Generator().manual_seed(3))
    _, y3 = m.generate(spk, 10, 4, 10, torch.Generator().manual_seed(4))
    assert y1.shape == (2, 10, spk.shape[1], 25) and z1.shape == (2, 10, 3, m.cfg.latent)
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)
    d = (y1[:, :, None] - y1[:, None]).pow(2).mean((-1, -2))                   # (B, K, K) pairwise
    assert (d + torch.eye(10) > 1e-6).all()                                    # all 10 samples differ


def test_no_listener_identity_and_cond_none_is_unconditional():
    """Nothing in the model reads who listens (no β input or buffer); the speaker's code moves ε_θ, and with
    --cond none it does not."""
    for cond in ("speaker", "none"):
        m = tiny_model(cond=cond)
        assert not any("beta" in k or "ident" in k for k in m.state_dict())
        torch.nn.init.normal_(m.den.last.weight, std=0.1)                      # x0-head is 0 at init: wake it
        x, t = torch.randn(2, m.n * m.cfg.latent), torch.tensor([10.0, 500.0])
        c1, c2 = torch.randn(2, m.n * m.cfg.latent), torch.randn(2, m.n * m.cfg.latent)
        assert torch.allclose(m.eps(x, t, c1), m.eps(x, t, c2)) == (cond == "none")


def test_classifier_free_guidance_and_condition_dropout():
    """--guidance g: ε(∅) + g·(ε(c) − ε(∅)) with ∅ the zero code (g = 1: the conditional net, g = 0: --cond none);
    --cond-drop p: about p of the training segments see the zero code, and p = 0 draws nothing more."""
    m = tiny_model(param="eps", guidance=1.0)                                  # g = 1: the conditional net
    torch.nn.init.normal_(m.den.last.weight, std=0.1)
    x, c, t = torch.randn(2, m.n * m.cfg.latent), torch.randn(2, m.n * m.cfg.latent), torch.tensor([10.0, 500.0])
    e_c, e_0 = m.eps(x, t, c), m.eps(x, t, torch.zeros_like(c))
    for g in (0.0, 0.5, 2.0):
        m.cfg.guidance = g
        assert torch.allclose(m.eps(x, t, c), e_0 + g * (e_c - e_0), atol=1e-5)
    y = torch.randn(40, 3 * m.cfg.window, 25)
    batches = {}
    for p in (0.0, 0.5):
        mp = tiny_model(cond_drop=p)
        gen = torch.Generator().manual_seed(0)
        _, batch = ld.start_stage("diff", True, mp, dict(ya=y, ca=y.flip(0)), gen, mp.cfg, mp.n)
        batches[p] = (batch(), torch.rand(1, generator=gen))                # the batch, then the stream's next draw
    (z0, c, t, eps), (z0_, c_, t_, eps_) = batches[0.5][0], batches[0.0][0]
    dropped = (c == 0).all(1)
    assert 0 < dropped.sum() < len(c) and not (c_ == 0).all(1).any()
    assert torch.equal(z0, z0_) and torch.equal(t, t_) and torch.equal(eps, eps_)  # the same segments, t and ε
    assert torch.equal(c_[~dropped], c[~dropped])                              # only some conditions zeroed
    assert not torch.equal(batches[0.0][1], batches[0.5][1])                   # p > 0 drew from the stream, p = 0 not


def test_codebook_loss_has_no_commitment_term():
    """Stage 1b's VQ loss reaches the codebook only: E_r is frozen, so a commitment term could not train anything."""
    torch.manual_seed(0)
    vq = ld.Codebook(16, 4)
    z = torch.randn(10, 4, requires_grad=True)
    _, _, loss = vq(z)
    loss.backward()
    assert z.grad is None or z.grad.abs().max() == 0
    assert torch.allclose(loss, F.mse_loss(vq.codes[vq(z)[1]], z.detach()))


def test_x0_parameterisation_implies_eps():
    """param = x0: the samplers' eps is the one whose x0-estimate is the net's output; param = eps: the net itself."""
    for param in ("x0", "eps"):
        m = tiny_model(param=param, guidance=1.0)
        torch.nn.init.normal_(m.den.last.weight, std=0.1)
        x, c = torch.randn(3, m.n * m.cfg.latent), torch.randn(3, m.n * m.cfg.latent)
        t = torch.tensor([1.0, 300.0, 1000.0])
        out, e = m.net(x, t, c), m.eps(x, t, c)
        if param == "eps":
            assert torch.equal(out, e)
        else:
            a = m.abar[t.long()].float()[:, None]
            assert torch.allclose(ld.predict_x0(x, e, a), out, atol=1e-4)


def test_long_sequence_outpainting_keeps_overlap():
    m = tiny_model()
    w = m.cfg.window
    assert ld.chunk_starts(7, 3, 1) == [0, 2, 4]
    assert ld.chunk_starts(6, 3, 1) == [0, 2, 3]
    spk = torch.randn(1, 7 * w, 25)                                            # 7 windows > n = 3
    z, y = m.generate(spk, 2, 4, 10, torch.Generator().manual_seed(0))
    assert z.shape == (1, 2, 7, m.cfg.latent) and y.shape == (1, 2, 7 * w, 25) and torch.isfinite(y).all()
    # a chunk decoded alone agrees with the cross-faded sequence away from the fades
    z0 = z[0, :1]
    alone = m.dec(z0[:, :3])
    assert torch.allclose(alone[:, :w], y[0, :1, :w], atol=1e-5)


def test_react_appropriate_set_is_the_neighbours_real_reactions():
    """REACT way: speaker k's set = the real reactions of the clips its matrix row marks (its own GT among them,
    counted once); without a matrix the set is the own GT and the label says so."""
    import data
    import metrics
    path = data.generate_twin("react", "tiny")
    items, M, T = data.load_listener(path, "test"), np.load(path / "neighbour_emotion_test.npy"), 60
    pool, A, first = metrics.appropriate_pool(items, T)
    for k, it in enumerate(items):
        want = [items[j]["listener_attr"][:T] for j in np.flatnonzero(M[k] == 1)]
        got = pool[A[k]]
        assert len(got) == len(want) == 3 and all(any(np.array_equal(g, w) for g in got) for w in want)
        assert np.array_equal(pool[first[k]], it["listener_attr"][:T])
    assert "real reactions of 2-2 neighbour clips" in metrics.appropriate_label(items)
    bare = [{k: v for k, v in it.items() if not k.startswith("alt")} for it in items]
    assert metrics.appropriate_pool(bare, T)[1].sum() == len(bare)
    assert metrics.appropriate_label(bare).startswith("own GT only")


# ---------------------------------------------------------------------------------------------------- CLI


def test_cli_train_then_sample(tmp_path):
    """The default data: the REACT twin (react-tiny under the smoke preset); its appropriate sets are the real
    reactions of the neighbour clips that the appropriateness matrix marks."""
    assert ld.Config().data == "react"
    out = tmp_path / "run"
    common = ["--out", str(out), "--preset", "smoke", "--threads", "1"]
    r = subprocess.run([sys.executable, "train.py", "--model", "latent_diffusion", *common], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert ck["method"] == "latent_diffusion" and ck["config"]["preset"] == "smoke"
    assert ck["step"] == sum(ck["config"][k] for k in ["ae_steps", "df_steps", "diff_steps"])
    for stage in ["ae", "df", "diff"]:
        log = ck["metrics"]["log"][stage]
        h = len(log) // 2
        assert np.all(np.isfinite(log)) and np.mean(log[h:]) < np.mean(log[:h]), stage
    r = subprocess.run([sys.executable, "sample.py", "--model", "latent_diffusion", *common], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((out / "metrics.json").read_text())
    assert list(rows) == ["GT", "alt-GT", "baseline:random", "baseline:mime", "baseline:mean_frame",
                          "baseline:nn_motion", "model"]
    assert all(np.isfinite(r["frcorr_sum"]) and np.isfinite(r["frdist_sum"]) for r in rows.values())
    assert rows["model"]["frdiv"] > 0 and "mse/all" in rows["model"] and "sec_per_speaker" in rows["model"]
    preds = np.load(out / "test_reactions.npy")
    assert preds.shape[:2] == (2, 3) and preds.shape[-1] == 25
    assert (out / "reactions.png").exists() and (out / "reactions.gif").exists()
    assert "real reactions of 2-2 neighbour clips" in r.stdout and "10 reactions of 8.0 s" in r.stdout
    assert rows["GT"]["frcorr_mean"] == 1 and 0 < rows["model"]["frcorr_official"] < rows["model"]["frcorr_sum"]
    # one cell of LBD Tab. 3: the same checkpoint, other PLMS flags, its own folder, the model row only
    cell = tmp_path / "plms1_s10"
    ld.main(["--ckpt", str(out / "ckpt.pt"), "--out", str(cell), "--preset", "smoke",
             "--plms-order", "1", "--sample-steps", "10", "--model-only"], "sample")
    rows1 = json.loads((cell / "metrics.json").read_text())
    assert list(rows1) == ["model"] and rows1["model"]["frdist_sum"] > 0 and rows1["model"]["frcorr_sum"] > 0
    assert rows1["model"]["frcorr_sum"] != rows["model"]["frcorr_sum"]         # other sampler, other samples


@pytest.mark.parametrize("argv, words", [
    (["--steps", "-5"], "expected 0 or more"), (["--ae-steps", "0"], "positive"), (["--plms-order", "5"], "one of"),
    (["--param", "v"], "one of"), (["--cond", "audio"], "one of"), (["--d-model", "30"], "multiple of --heads"), (["--preset", "huge"], "one of"),
    (["sample", "--ckpt", "/nonexistent/ckpt.pt"], "no checkpoint"), (["--device", "tpu"], "expected auto"),
    (["--cond-drop", "0"], "--guidance 0.5: no unconditional branch"), (["--cond", "none"], "use --guidance 1")])
def test_user_mistakes_are_one_line(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        ld.cli(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and words in err and "\n" not in err, err


def test_guidance_needs_a_checkpoint_trained_with_condition_dropout(tmp_path, capsys):
    """The default --guidance 0.5 on a net trained without null codes (the paper's) is a user's mistake, caught before
    the weights are read; with --guidance 1 the same checkpoint samples (the model row only, as the pipeline does)."""
    run, cell = tmp_path / "run", tmp_path / "cell"
    ld.main([*SHORT, "--cond-drop", "0", "--guidance", "1", "--out", str(run)], "train")
    with pytest.raises(SystemExit) as e:
        ld.cli(["sample", "--ckpt", str(run / "ckpt.pt"), "--out", str(cell)])
    assert e.value.code == 2 and "--guidance 0.5: no unconditional branch" in capsys.readouterr().err
    assert not (cell / "metrics.json").exists()
    ld.main(["--ckpt", str(run / "ckpt.pt"), "--out", str(cell), "--preset", "smoke", "--guidance", "1",
             "--model-only"], "sample")
    rows = json.loads((cell / "metrics.json").read_text())
    assert list(rows) == ["model"] and np.isfinite(rows["model"]["frdist_sum"])


def test_checkpoint_of_another_method_and_batch_per_process(tmp_path, monkeypatch, capsys):
    torch.save({"method": "vqvae", "model": {}}, tmp_path / "ckpt.pt")
    with pytest.raises(SystemExit):
        ld.cli(["sample", "--ckpt", str(tmp_path / "ckpt.pt")])
    assert "checkpoint of vqvae, not of latent_diffusion.py" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit):
        ld.cli(["--preset", "smoke"])                                           # batch 8 over 3 processes
    assert "multiple of the 3 processes" in capsys.readouterr().err


def test_smoke_preset_writes_its_own_folder():
    assert ld.parse_config(["--preset", "smoke"]).out == "runs/latent_diffusion-smoke"
    assert ld.parse_config(["--preset", "smoke", "--out", "x"]).out == "x"


# ---------------------------------------------------------------------------------------------------- runtime

SHORT = ["--preset", "smoke", "--ae-steps", "6", "--df-steps", "4", "--diff-steps", "6", "--eval-every", "3"]


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def straight(tiny_world, tmp_path_factory):
    """16 steps in one go, on one thread as every test here; saves after steps 3, 6 | 9, 10 | 13, 16."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("straight")
    ld.main([*SHORT, "--data", str(tiny_world), "--out", str(out)], "train")
    torch.set_num_threads(n)
    return torch.load(out / "ckpt.pt", weights_only=True)


@pytest.mark.parametrize("kill_after", [1, 2, 5])                              # inside stage 1a, at its end, in 2
def test_resume_after_a_kill_is_bit_identical(straight, kill_after, tiny_world, tmp_path, monkeypatch):
    """Killed right after the k-th checkpoint, then --resume: the same weights as the uninterrupted run."""
    real, saves = ld.save_checkpoint, []

    def save_then_die(path, obj):
        real(path, obj)
        saves.append(obj["step"])
        if len(saves) == kill_after:
            raise Killed
    argv = [*SHORT, "--data", str(tiny_world), "--out", str(tmp_path)]
    monkeypatch.setattr(ld, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        ld.main(argv, "train")
    monkeypatch.setattr(ld, "save_checkpoint", real)
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == saves[-1] < straight["step"]
    ld.main([*argv, "--resume"], "train")
    got = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert got["step"] == straight["step"] and got["metrics"]["log"] == straight["metrics"]["log"]
    for k, v in straight["model"].items():
        assert torch.equal(got["model"][k], v), k


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_precision_trains_on_cpu(dtype, tiny_world, tmp_path):
    """Autocast (and the grad scaler for float16) on the CPU: the loss stays finite and the samples load."""
    ld.main(["--preset", "smoke", "--steps", "5", "--dtype", dtype, "--data", str(tiny_world), "--out",
             str(tmp_path)], "train")
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ck["step"] == 11 and all(np.isfinite(ck["metrics"]["log"][s]).all() for s in ["ae", "df", "diff"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bfloat16_train_and_sample(tiny_world, tmp_path):
    common = ["--preset", "smoke", "--device", "cuda", "--data", str(tiny_world), "--out", str(tmp_path)]
    ld.main([*common, "--steps", "20", "--dtype", "bfloat16"], "train")
    rows = ld.main(common, "sample")
    assert np.isfinite(rows["model"]["frcorr_sum"]) and rows["model"]["frdiv"] > 0


def test_torchrun_two_processes_match_one(tiny_world, tmp_path):
    """torchrun, 2 CPU processes (gloo), each on half of every global batch: exit 0 (check_in_sync: both ranks
    ended with the same weights) and the weights of one process with the same global batch, to float rounding.
    Dropout 0: each process draws dropout masks for its own rows, so with dropout the two runs are different
    (equally valid) random draws. Tolerance 1e-4 (lr / 10), not 1e-5: gradients that are zero in exact arithmetic
    (attention key biases, which the softmax ignores) are rounding noise whose sign depends on the summation order,
    and Adam's m / √v turns such noise into steps of up to lr; every other weight agrees to ~1e-5."""
    flags = ["--preset", "smoke", "--steps", "4", "--dropout", "0", "--data", str(tiny_world)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "latent_diffusion.py", *flags, "--out", str(tmp_path / "ddp")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ld.main([*flags, "--out", str(tmp_path / "one")], "train")
    ddp = torch.load(tmp_path / "ddp" / "ckpt.pt", weights_only=True)
    one = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=True)
    assert ddp["step"] == one["step"] == 9
    for k, v in one["model"].items():
        assert torch.allclose(ddp["model"][k], v, atol=1e-4, rtol=0), (k, (ddp["model"][k] - v).abs().max())
