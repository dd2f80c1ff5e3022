"""The dispatchers: --help, an unknown model, a method file that is not there."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("entry", ["train.py", "sample.py"])
def test_help_lists_models(entry):
    r = run(entry, "--help")
    assert r.returncode == 0
    for name in ["vqvae", "discrete_diffusion", "latent_diffusion", "lm_listener", "diff_transformer"]:
        assert name in r.stdout


@pytest.mark.parametrize("entry", ["train.py", "sample.py"])
def test_unknown_model_is_a_clear_error(entry):
    r = run(entry, "--model", "gan")
    assert r.returncode != 0
    assert "unknown model 'gan'" in r.stderr and "vqvae" in r.stderr


def test_missing_model_file(monkeypatch, tmp_path):
    import train
    monkeypatch.setattr(train, "ROOT", tmp_path)  # an empty folder: no method file exists
    with pytest.raises(SystemExit) as e:
        train.load_method("vqvae")
    assert "not written yet" in str(e.value)


def test_no_model_prints_usage():
    r = run("train.py")
    assert r.returncode == 2 and "--model" in r.stdout
