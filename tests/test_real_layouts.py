"""The listener methods on the original layouts as their authors release them (tiny fixtures written here with the
writers of tests/worldtools.py and tests/test_data.py): LM-Listener segments without audio and of different lengths
(vqvae, discrete_diffusion, lm_listener) and Learning2Listen without val/ and without statistics (vqvae,
discrete_diffusion), each trained a few smoke steps and sampled."""
import json

import numpy as np
import pytest
import torch

import data
import discrete_diffusion as dd
import lm_listener as L
import vqvae
import worldtools
from test_data import _l2l_release

LENGTHS = {"train": [240, 184, 136], "val": [200], "test": [240, 150]}   # frames; the tiny world's segments are 240


@pytest.fixture(scope="module")
def lm_release(tiny_world, tmp_path_factory):
    """The tiny world as LM-Listener releases its data: segments_{split}.pth of different lengths, no wav/, no stats."""
    root = tmp_path_factory.mktemp("lm_release")
    for split, lengths in LENGTHS.items():
        items = data.load_listener(tiny_world, split)[:len(lengths)]
        cut = lambda it, n: {**it, **{k: it[k][:n] for k in ("listener", "speaker", "listener_attr", "speaker_attr")},
                             "alt_listener": None, "audio": None, "words": [w for w in it["words"] if w[1] * 30 < n]}
        worldtools.write_segments(root, split, [cut(it, n) for it, n in zip(items, lengths)])
    (root / "wav").rmdir()                                             # write_segments' audio folder, left empty
    assert not (root / "mean.npy").exists()
    return root


def smoke_vq(path, out, norm):
    vqvae.main(["--data", str(path), "--out", str(out), "--preset", "smoke", "--norm", norm, "--steps", "4",
                "--eval-every", "4"], "train")
    return out / "ckpt.pt"


def run_dd(path, vq, out, capsys):
    """discrete_diffusion trained 4 smoke steps on `path` and sampled: -> (train log, metrics rows)."""
    dd.main(["--preset", "smoke", "--data", str(path), "--vq", str(vq), "--out", str(out), "--steps", "4",
             "--eval-every", "4"], "train")
    said = capsys.readouterr().out
    rows = dd.main(["--preset", "smoke", "--out", str(out), "--time-runs", "1", "--long-seconds", "4"], "sample")
    assert np.isfinite(rows["model"]["fd/all"]) and (out / "metrics.json").exists()
    return said, rows


def test_lm_listener_release_trains_both_listener_methods(lm_release, tmp_path, capsys):
    items = data.load_listener(lm_release, "train")
    assert [len(it["listener"]) for it in items] == LENGTHS["train"] and all(it["audio"] is None for it in items)
    vq_id, vq_naive = (smoke_vq(lm_release, tmp_path / n, norm) for n, norm in (("vq", "IN,AdaIN"),
                                                                                  ("vq_naive", "none,none")))
    # discrete_diffusion: every segment gives its own crops; the audio encoder sees zeros, said in one line
    w = data.load_windows(lm_release, "train", vqvae.load_vqvae(vq_naive), 32, 16, 20)
    assert w["n"].tolist() == LENGTHS["train"] and w["no_audio"] == 3 and (w["feat"] == 0).all()
    assert len(data.all_windows(w)[0]) == sum((n - 32) // 16 + 1 for n in LENGTHS["train"])   # not cut to the shortest
    seg, crop = data.draw_windows(w, 500, torch.Generator().manual_seed(0))
    assert (w["starts"][crop] + 32 <= w["n"][seg]).all() and set(seg.tolist()) == {0, 1, 2}
    said, _ = run_dd(lm_release, vq_naive, tmp_path / "dd", capsys)
    assert [ln for ln in said.splitlines() if "audio branch off" in ln] == [
        f"[discrete_diffusion] audio branch off: 3 of 3 train segments have no audio in {lm_release} "
        "(their MFCC input is zeros)"]
    # lm_listener: the run drops the acoustic tokens (W+SA+emo -> W+emo), said in one line; clips of any length
    L.main(["--preset", "smoke", "--data", str(lm_release), "--vq", str(vq_id), "--vq-naive", str(vq_naive),
            "--out", str(tmp_path / "lm"), "--steps", "4", "--stage1-steps", "2", "--eval-every", "4"], "train")
    said = capsys.readouterr().out
    assert sum("have no audio" in ln for ln in said.splitlines()) == 1 and "W+SA+emo -> W+emo" in said
    assert torch.load(tmp_path / "lm" / "ckpt.pt", weights_only=True)["config"]["modalities"] == "W+emo"
    rows = L.main(["--preset", "smoke", "--out", str(tmp_path / "lm"), "--max-eval", "4", "--stream",
                   "--stream-seconds", "3"], "sample")
    assert np.isfinite(rows["model"]["fd/all"])
    assert json.loads((tmp_path / "lm" / "metrics.json").read_text())


def test_learning2listen_release_trains_discrete_diffusion(tmp_path, capsys):
    """train/ and test/ only, no mean/std: val is drawn from train, statistics come from train, audio is its rows."""
    path, _ = _l2l_release(tmp_path, "trevor", n_train=6, n_test=2)
    assert not (path / "val").exists() and not (path / "mean.npy").exists()
    vq = smoke_vq(path, tmp_path / "vq", "none,none")
    said, rows = run_dd(path, vq, tmp_path / "dd", capsys)
    assert "audio branch off" not in said and "model" in rows
