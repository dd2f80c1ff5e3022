"""Shared fixtures: the tiny synthetic world (made once per test session in a temporary folder)."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """Root of the tiny world: <root>/listener (segments format) and <root>/vocaset."""
    import data
    return Path(data.generate_world(tmp_path_factory.mktemp("world"), preset="tiny", seed=0))


@pytest.fixture(scope="session")
def tiny_vq(tiny_world, tmp_path_factory):
    """A smoke-preset identity VQ-VAE (IN, AdaIN) trained on the tiny world: path of its ckpt.pt."""
    import vqvae
    out = tmp_path_factory.mktemp("vq_id")
    vqvae.main(["--data", str(tiny_world), "--out", str(out), "--preset", "smoke"], mode="train")
    return out / "ckpt.pt"


@pytest.fixture(scope="session")
def tiny_vq_naive(tiny_world, tmp_path_factory):
    """A smoke-preset naive VQ-VAE (none, none) trained on the tiny world: path of its ckpt.pt."""
    import vqvae
    out = tmp_path_factory.mktemp("vq_naive")
    vqvae.main(["--data", str(tiny_world), "--out", str(out), "--preset", "smoke", "--norm", "none,none"],
               mode="train")
    return out / "ckpt.pt"


@pytest.fixture(autouse=True)
def no_leaked_torch_state():
    """A test must leave autograd and the thread count as it found them: a `torch.set_grad_enabled(False)`
    left behind by one sample() once broke every later training test. Fail the test that leaks, not those after."""
    import torch
    threads = torch.get_num_threads()
    yield
    leaked_grad, leaked_threads = not torch.is_grad_enabled(), torch.get_num_threads() != threads
    torch.set_grad_enabled(True)
    torch.set_num_threads(threads)
    assert not leaked_grad, "this test left autograd disabled (use `with torch.no_grad()` or @torch.no_grad())"
    assert not leaked_threads, "this test changed torch's thread count and did not restore it"
