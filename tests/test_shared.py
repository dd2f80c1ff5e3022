"""The shared setup block: identical in every method file (CleanRL-style deliberate duplication, checked here),
and, through it, data.py's run-time plumbing on a toy Config: flag precedence, user errors, exact random state,
atomic checkpoints, torchrun helpers."""
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["vqvae", "discrete_diffusion", "latent_diffusion", "lm_listener", "diff_transformer"]
START, END = "# Shared setup.", "# End of the shared setup."


def block_of(text):
    """The shared block of a file: from the rule line above START to the line with END."""
    i, j = text.index(START), text.index(END)
    i = text.rindex("# ---", 0, i)
    return text[i:text.index("\n", j) + 1]


REFERENCE = block_of((ROOT / "tests" / "shared_block.py").read_text())


@pytest.mark.parametrize("method", METHODS)
def test_every_method_file_carries_the_same_block(method):
    text = (ROOT / f"{method}.py").read_text()
    assert text.count(START) == 1, f"{method}.py: the shared setup block is missing or doubled"
    got = block_of(text)
    if got != REFERENCE:
        import difflib
        diff = "".join(difflib.unified_diff(REFERENCE.splitlines(True), got.splitlines(True),
                                            "tests/shared_block.py", f"{method}.py", n=1))
        pytest.fail(f"{method}.py's shared block differs from tests/shared_block.py:\n{diff}")


def toy_module(tmp_path):
    """The block executed in a namespace with a toy Config, as a method file would hold it."""
    import data

    @dataclass
    class Config:
        preset: str = "default"    # smoke | default
        steps: int = 100           # optimiser steps
        lr: float = 1e-3           # learning rate
        flag: bool = True          # a switch

    def check_config(cfg, mode):
        if cfg.steps <= 0:
            raise data.UserError(f"--steps {cfg.steps}: expected a positive number of steps")

    ns = dict(__doc__="toy: a test module\n\nmore", os=os, random=random, np=np, torch=torch,
              data=data, METHOD="toy", Config=Config, PRESETS={"default": {}, "smoke": {"steps": 5}},
              check_config=check_config)
    ns["main"] = lambda argv, mode: ns["parse_config"](argv, mode)
    exec(REFERENCE, ns)
    return ns


def test_flag_precedence_and_help(tmp_path, capsys):
    ns = toy_module(tmp_path)
    assert ns["parse_config"]([]).steps == 100
    assert ns["parse_config"](["--preset", "smoke"]).steps == 5                  # preset over default
    assert ns["parse_config"](["--preset", "smoke", "--steps", "7"]).steps == 7  # flag over preset
    assert ns["parse_config"](["--no-flag"]).flag is False
    with pytest.raises(SystemExit):
        ns["parse_config"](["--help"])
    out = capsys.readouterr().out
    assert "optimiser steps (default 100)" in out and "--no-flag" in out


@pytest.mark.parametrize("argv, words", [(["--steps", "-5"], "positive"), (["--preset", "huge"], "expected one of"),
                                         (["--stepz", "3"], "unrecognized"), (["--lr", "abc"], "invalid float")])
def test_user_mistakes_are_one_line_and_exit_2(tmp_path, capsys, argv, words):
    ns = toy_module(tmp_path)
    with pytest.raises(SystemExit) as e:
        ns["cli"](argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and words in err and "\n" not in err


def test_no_cuda_is_a_user_error(monkeypatch):
    import data
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(data.UserError, match="no CUDA"):
        data.pick_device("cuda")
    with pytest.raises(data.UserError, match="expected auto"):
        data.pick_device("tpu")
    assert data.pick_device("auto").type in ("cpu", "mps")


def test_random_state_round_trip_is_exact(tmp_path):
    import data
    ns = toy_module(tmp_path)
    g, rng = torch.Generator().manual_seed(3), np.random.default_rng(4)
    data.seed_all(1)
    torch.rand(3), np.random.rand(2), random.random(), torch.rand(2, generator=g), rng.random(2)
    ns["save_checkpoint"](tmp_path / "ck.pt", {"rng": data.rng_state([g, rng])})
    want = (torch.rand(4), np.random.rand(3), random.random(), torch.rand(3, generator=g), rng.random(3))
    data.seed_all(99)
    g2, rng2 = torch.Generator().manual_seed(0), np.random.default_rng(0)
    data.set_rng_state(ns["load_checkpoint"](tmp_path / "ck.pt")["rng"], [g2, rng2])
    got = (torch.rand(4), np.random.rand(3), random.random(), torch.rand(3, generator=g2), rng2.random(3))
    assert torch.equal(want[0], got[0]) and np.array_equal(want[1], got[1]) and want[2] == got[2]
    assert torch.equal(want[3], got[3]) and np.array_equal(want[4], got[4])


def test_checkpoints_are_atomic_and_know_their_method(tmp_path, monkeypatch):
    import data
    ns = toy_module(tmp_path)
    path = tmp_path / "run" / "ckpt.pt"
    ns["save_checkpoint"](path, {"step": 1, "w": torch.ones(2)})
    assert ns["load_checkpoint"](path)["step"] == 1 and sorted(os.listdir(path.parent)) == ["ckpt.pt"]

    def killed(obj, f):  # the process dies while writing: the old checkpoint must survive whole
        Path(f).write_bytes(b"half")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        ns["save_checkpoint"](path, {"step": 2})
    monkeypatch.undo()
    assert ns["load_checkpoint"](path)["step"] == 1
    with pytest.raises(data.UserError, match="no checkpoint"):
        ns["load_checkpoint"](tmp_path / "nope.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(data.UserError, match="not a readable checkpoint"):
        ns["load_checkpoint"](tmp_path / "bad.pt")
    torch.save({"method": "vqvae", "step": 1}, tmp_path / "other.pt")
    with pytest.raises(data.UserError, match="checkpoint of vqvae, not of toy.py"):
        ns["load_checkpoint"](tmp_path / "other.pt")


def test_shard_without_torchrun_is_the_whole_batch():
    import data
    x = torch.arange(6)
    assert torch.equal(data.shard(x), x) and data.ddp_setup(torch.device("cpu")) == (0, 1) and data.is_main()
    data.check_in_sync(torch.nn.Linear(2, 2))  # a single process is always in sync


@pytest.mark.parametrize("method", METHODS)
def test_method_files_leave_the_plumbing_to_data(method):
    """The moved plumbing is called through data.py, never redefined in a method file (one copy to fix)."""
    text = (ROOT / f"{method}.py").read_text()
    for name in ("rng_state", "set_rng_state", "ddp_setup", "is_main", "check_in_sync", "shard", "pick_device",
                 "autocast", "grad_scaler", "seed_all"):
        assert f"\ndef {name}(" not in text, f"{method}.py defines {name}; use data.{name}"
