"""The command line as a user meets it, through train.py / sample.py: --help, and every mistake we know of ends in
one line `error: ...` on stderr and exit status 2, never a traceback. The dispatchers and one case of each kind
run as real processes; the same mistakes in every method run in this process (train.dispatch, what train.py's
and sample.py's __main__ call), which saves a Python start per case."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["vqvae", "discrete_diffusion", "latent_diffusion", "lm_listener", "diff_transformer"]


def run(*args, timeout=300):
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


class Result:
    def __init__(self, returncode, stderr):
        self.returncode, self.stderr = returncode, stderr


def dispatch(capsys, entry, *args):
    """`python ENTRY ARGS` in this process: the exit status and stderr (an exception other than SystemExit = a
    traceback, fails the test)."""
    import train
    capsys.readouterr()
    try:
        train.dispatch([str(a) for a in args], entry.removesuffix(".py"))
        code = 0
    except SystemExit as e:
        code = e.code
    return Result(code, capsys.readouterr().err)


def user_error(r, *words):
    """Exit status 2, stderr exactly one line `error: ...` naming `words`, no traceback."""
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2, f"exit {r.returncode}\n{r.stderr[-2000:]}"
    assert "Traceback" not in r.stderr and len(err) == 1 and err[0].startswith("error: "), r.stderr[-2000:]
    for w in words:
        assert w in err[0], (w, err[0])
    return err[0]


# ----------------------------------------------------------------------------------------------------------------------
# The dispatchers

@pytest.mark.parametrize("entry", ["train.py", "sample.py"])
def test_help_lists_models(entry):
    r = run(entry, "--help")
    assert r.returncode == 0
    for name in METHODS:
        assert name in r.stdout
    if entry == "train.py":
        assert "--table" in r.stdout and "lm_listener" in r.stdout


def test_pipeline_help_lists_its_tables():
    import train
    r = run("train.py", "--model", "all", "--help")
    assert r.returncode == 0 and all(t.name in r.stdout for t in train.TABLES) and "--retrain" in r.stdout


@pytest.mark.parametrize("entry", ["train.py", "sample.py"])
def test_unknown_model(entry):
    user_error(run(entry, "--model", "gan"), "unknown model 'gan'", "vqvae")


def test_no_model_and_bad_pipeline_flags():
    user_error(run("train.py"), "--model is required")
    user_error(run("sample.py", "--model", "all"), "train.py --model all")
    user_error(run("train.py", "--model", "all", "--table", "tab9"), "tab9")


def test_missing_model_file(monkeypatch, tmp_path):
    import train
    monkeypatch.setattr(train, "ROOT", tmp_path)  # an empty folder: no method file exists
    with pytest.raises(data.UserError, match="not written yet"):
        train.load_method("vqvae")


# ----------------------------------------------------------------------------------------------------------------------
# A user's mistakes, through every method

@pytest.mark.parametrize("method", METHODS)
def test_missing_data_folder(method, tmp_path, capsys):
    user_error(dispatch(capsys, "train.py", "--model", method, "--preset", "smoke", "--data", tmp_path / "nope",
                        "--out", tmp_path / "run"), str(tmp_path / "nope"))


@pytest.mark.parametrize("method", METHODS)
def test_missing_checkpoint(method, tmp_path, capsys):
    missing = tmp_path / "none" / "ckpt.pt"
    user_error(dispatch(capsys, "sample.py", "--model", method, "--ckpt", missing, "--out", tmp_path), str(missing))


@pytest.mark.parametrize("method", METHODS)
def test_negative_steps(method, tmp_path, capsys):
    user_error(dispatch(capsys, "train.py", "--model", method, "--preset", "smoke", "--steps", "-5",
                        "--out", tmp_path), "--steps")
    assert not (tmp_path / "ckpt.pt").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("method", METHODS)
def test_cuda_without_cuda(method, tmp_path, capsys):
    user_error(dispatch(capsys, "train.py", "--model", method, "--preset", "smoke", "--device", "cuda",
                        "--out", tmp_path), "cuda")


def test_unknown_preset_flag_and_checkpoint_as_processes(tmp_path):
    user_error(run("train.py", "--model", "vqvae", "--preset", "huge", "--out", tmp_path), "huge", "smoke")
    user_error(run("train.py", "--model", "vqvae", "--stepz", "3", "--out", tmp_path), "--stepz")
    user_error(run("sample.py", "--model", "vqvae", "--ckpt", tmp_path / "ckpt.pt"), str(tmp_path / "ckpt.pt"))


@pytest.mark.parametrize("method", METHODS)
def test_unknown_preset(method, tmp_path, capsys):
    user_error(dispatch(capsys, "train.py", "--model", method, "--preset", "huge", "--out", tmp_path), "huge")


def test_checkpoint_of_another_method(tiny_vq, tmp_path):
    user_error(run("sample.py", "--model", "lm_listener", "--ckpt", tiny_vq, "--out", tmp_path), "vqvae",
               "lm_listener")


def test_corrupt_wav(tiny_world, tmp_path, capsys):
    r = dispatch(capsys, "train.py", "--model", "diff_transformer", "--preset", "smoke", "--data", tiny_world,
                 "--out", tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    bad = tmp_path / "speech.wav"
    bad.write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt nonsense")
    user_error(run("sample.py", "--model", "diff_transformer", "--ckpt", tmp_path / "ckpt.pt", "--audio", bad,
                   "--out", tmp_path / "s"), str(bad))


def test_sample_py_is_a_thin_dispatcher_and_nothing_imports_in_a_circle():
    text = (ROOT / "sample.py").read_text()
    assert len(text.splitlines()) <= 60 and "from train import dispatch" in text
    assert "import sample" not in (ROOT / "train.py").read_text()
