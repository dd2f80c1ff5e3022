"""`python train.py --model all`: the plan (which runs, in which order), checkpoint reuse (only what matches),
results.md (each table from its runs' metrics.json), on fake method modules (fast); then the real pipeline on the
smoke preset, end to end."""
import argparse
import dataclasses
import json
import os
import types
from pathlib import Path

import pytest
import torch

import data
import train


# ----------------------------------------------------------------------------------------------------------------------
# The plan

def test_runs_and_tables_are_consistent():
    names = [r.name for r in train.RUNS]
    assert len(set(names)) == len(names) and len({t.name for t in train.TABLES}) == len(train.TABLES)
    for i, run in enumerate(train.RUNS):
        assert run.model in train.MODELS, run
        assert not (run.of and run.train), f"{run.name}: a sample-only run has no training flags"
        for dep in train.needs(run):  # every run it needs comes before it
            assert dep in names[:i], f"{run.name} needs {dep}, which comes after it"
    in_tables = {n for t in train.TABLES for n in [t.main] + [e[1] for e in t.rows]}
    assert in_tables <= set(names)
    needed = {d for r in train.RUNS for d in train.needs(r)}
    assert set(names) <= in_tables | needed, "a run that no table shows and no run needs"


def test_plan_follows_tables_dependencies_and_smoke():
    every = [r.name for r in train.plan(rows="all")]
    assert every == [r.name for r in train.RUNS]
    main = [r.name for r in train.plan()]                     # default: each table's main run and what it needs
    assert set(main) == {t.main for t in train.TABLES} | {d for n in main for d in train.needs(train.run_named(n))}
    assert "lm_listener_paper" not in main and "discrete_diffusion_paper" not in main and "vqvae_naive" in main
    paper = {r.name for r in train.plan(rows="paper")}
    assert set(main) < paper < set(every) and {"lm_listener_paper", "vqvae_naive_paper"} <= paper
    assert "lm_listener_lag1" not in paper
    lm = [r.name for r in train.plan(["lm_listener"], rows="all")]
    assert lm[:2] == ["vqvae_naive", "vqvae"] and "lm_listener_w" in lm and "discrete_diffusion" not in lm
    dl = [r.name for r in train.plan(["diff_listener"], rows="all")]
    assert {"vqvae_naive_paper", "vqvae_naive_k128", "discrete_diffusion_k512"} <= set(dl) and "vqvae" not in dl
    smoke = [r.name for r in train.plan(preset="smoke", rows="all")]
    assert {r.name for r in train.RUNS if r.smoke} <= set(smoke) < set(every)
    assert "latent_diffusion_val" in smoke and "latent_diffusion" in smoke  # a sample-only run brings its source
    assert [r.name for r in train.plan(only=["vqvae", "latent_diffusion"])] == ["vqvae", "latent_diffusion"]


def test_flags_of_a_run_name_the_runs_folder():
    run = train.run_named("lm_listener_naive_w")
    assert train.needs(run) == ["vqvae_naive"]
    assert train.needs(train.run_named("latent_diffusion_plms4_s100")) == ["latent_diffusion_noguide"]


# ----------------------------------------------------------------------------------------------------------------------
# Fake method modules: the shared block's parse_config / main contract, no training

def fake_method(name, log):
    """A module with METHOD, Config, parse_config(argv, mode) and main(argv, mode): training writes a checkpoint that
    records its config, sampling writes metrics.json (its model row: the config's lr); every call is logged."""
    @dataclasses.dataclass
    class Config:
        data: str = ""
        out: str = f"runs/{name}"
        preset: str = "default"
        seed: int = 0
        lr: float = 1e-3
        vq: str = ""
        device: str = "auto"
        resume: bool = False
        ckpt: str = ""

    def parse_config(argv, mode="train"):
        p = argparse.ArgumentParser()
        for f in dataclasses.fields(Config):
            kind = dict(action="store_true") if f.type is bool or f.type == "bool" else dict(type=type(f.default))
            p.add_argument("--" + f.name, default=f.default, **kind)
        cfg = Config(**vars(p.parse_args(argv)))
        if cfg.preset == "smoke" and "--lr" not in argv:
            cfg.lr = 0.5
        return cfg

    def main(argv, mode="train"):
        cfg = parse_config(argv, mode)
        log.append((name, mode, list(argv)))
        if mode == "train":
            Path(cfg.out).mkdir(parents=True, exist_ok=True)
            torch.save({"method": name, "config": dataclasses.asdict(cfg), "data_version": data.VERSION,
                        "step": 1}, Path(cfg.out) / "ckpt.pt")
        else:
            ck = torch.load(cfg.ckpt, weights_only=True)
            rows = {"GT": {"m": 0.0}, "model": {"m": ck["config"]["lr"]}, "model:nucleus": {"m": 2.0}}
            Path(cfg.out).mkdir(parents=True, exist_ok=True)
            (Path(cfg.out) / "metrics.json").write_text(json.dumps(rows))

    m = types.ModuleType(name)
    m.__dict__.update(METHOD=name, Config=Config, parse_config=parse_config, main=main)
    return m


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """train.py's pipeline over three fake runs (a codec, a model that needs it, a sample-only run) and one table."""
    log = []
    mods = {n: fake_method(n, log) for n in ("codec", "gen")}
    monkeypatch.setattr(train, "load_method", lambda n: mods[n])
    monkeypatch.setattr(train, "RUNS", [train.Run("codec", "codec"),
                                        train.Run("gen", "gen", "--vq {runs}/codec/ckpt.pt"),
                                        train.Run("gen_fast", "gen", sample="--lr 9", of="gen"),
                                        train.Run("gen_lr", "gen", "--vq {runs}/codec/ckpt.pt --lr 0.25", smoke=False)])
    monkeypatch.setattr(train, "TABLES", [train.Table("t", "T", "cap", ["m"], "gen",
                                                      [("ablation:lr", "gen_lr"), ("codec", "codec", "model")])])
    monkeypatch.setattr(train, "hardware", lambda: "cpu")
    monkeypatch.chdir(tmp_path)
    return log, mods


def trained(log):
    """The run folders trained, in order."""
    return [a[a.index("--out") + 1] for n, mode, a in log if mode == "train"]


def test_pipeline_reuses_only_matching_checkpoints(fake, capsys):
    log, mods = fake
    train.run_all([])                                            # default --rows main: the table's main run + needs
    assert trained(log) == ["runs/codec", "runs/gen"] and "2 runs planned\n" in capsys.readouterr().out
    log.clear()
    train.run_all(["--rows", "all"])                             # every row: the ablation too, the others reused
    assert trained(log) == ["runs/gen_lr"] and "4 runs planned; their last measured times sum to" in \
        capsys.readouterr().out
    assert ("gen", "sample", ["--preset", "default", "--ckpt", "runs/gen/ckpt.pt", "--out", "runs/gen_fast",
                              "--lr", "9"]) in log
    md = Path("runs/results.md").read_text()
    assert "| gen | model | 0.001 |" in md and "| gen | model:nucleus | 2 |" in md      # the main run: every row
    assert "| gen_lr | ablation:lr | 0.25 |" in md and "| gen_lr | ablation:lr:nucleus | 2 |" in md
    assert "| codec | codec | 0.001 |" in md and "| gen_fast |" not in md                  # one named row; not in table
    capsys.readouterr()

    log.clear()
    train.run_all(["--rows", "all"])                             # everything matches: nothing trains, all re-evaluate
    assert trained(log) == [] and len(log) == 4 and capsys.readouterr().out.count(": reusing ") == 3

    log.clear()
    train.run_all(["--preset", "smoke", "--rows", "all"])        # smoke: its own folder, default runs untouched
    assert trained(log) == ["runs-smoke/codec", "runs-smoke/gen"]
    assert Path("runs-smoke/results.md").exists() and not Path("runs-smoke/gen_lr").exists()

    # a default checkpoint overwritten by a smoke training (e.g. `python train.py --model codec --preset smoke`)
    mods["codec"].main(["--out", "runs/codec", "--preset", "smoke"], "train")
    os.utime("runs/codec/ckpt.pt", (1, 1))                       # older than gen's: only the config differs
    log.clear()
    train.run_all(["--table", "t", "--rows", "all"])
    out = capsys.readouterr().out
    assert "runs/codec: retraining (preset smoke != default)" in out
    assert "runs/gen: retraining (runs/codec/ckpt.pt is newer)" in out
    assert trained(log) == ["runs/codec", "runs/gen", "runs/gen_lr"]

    log.clear()
    train.run_all(["--only", "gen", "--retrain"])               # --only: that run alone; --retrain forces
    assert trained(log) == ["runs/gen"] and "runs/gen: retraining (--retrain)" in capsys.readouterr().out
    assert "| gen_lr | ablation:lr | 0.25 |" in Path("runs/results.md").read_text()  # the others from metrics.json


def test_pipeline_resumes_an_interrupted_training(fake, capsys):
    log, _ = fake
    train.run_all([])
    Path("runs/gen/.training").touch()                           # as a run killed during gen's training leaves it
    log.clear()
    train.run_all([])
    assert "runs/gen: resuming (interrupted)" in capsys.readouterr().out
    assert [a[-1] for n, mode, a in log if mode == "train"] == ["--resume"] and not Path("runs/gen/.training").exists()


def test_two_pipelines_on_one_runs_folder_keep_each_others_minutes(fake, monkeypatch):
    """timings.json is re-read before each write: a run that another pipeline finished meanwhile keeps its minutes."""
    train.run_all(["--only", "codec"])
    do_run = train.do_run

    def beside(run, runs, *a):                       # another pipeline finishes `other` while this one trains gen
        do_run(run, runs, *a)
        t = json.loads((runs / "timings.json").read_text())
        (runs / "timings.json").write_text(json.dumps({**t, "other": {"train": 7.0}}))
    monkeypatch.setattr(train, "do_run", beside)
    train.run_all(["--only", "gen"])
    t = json.loads(Path("runs/timings.json").read_text())
    assert set(t) == {"codec", "gen", "other"} and t["other"] == {"train": 7.0} and "train" in t["codec"]


def test_why_retrain_compares_the_recorded_config(fake, tmp_path, monkeypatch):
    _, mods = fake
    m, ck = mods["gen"], tmp_path / "g" / "ckpt.pt"
    argv = ["--out", str(ck.parent), "--preset", "default"]
    assert train.why_retrain(m, ck, argv) == "no checkpoint"
    m.main(argv, "train")
    assert train.why_retrain(m, ck, argv) is None
    assert train.why_retrain(m, ck, argv + ["--device", "cpu", "--out", "elsewhere"]) is None  # IGNORED keys
    assert train.why_retrain(m, ck, argv + ["--lr", "0.1"]) == "lr 0.001 != 0.1"
    assert train.why_retrain(m, ck, argv + ["--preset", "smoke"]) == "preset default != smoke"  # preset named first
    for sub in ("listener", "vocaset"):
        (tmp_path / "world" / sub).mkdir(parents=True)
    monkeypatch.setattr(data, "DATA_ROOT", tmp_path)                 # "" is the synthetic world under DATA_ROOT,
    assert train.why_retrain(m, ck, argv + ["--data", str(tmp_path / "world" / "listener")]) is None  # as its root
    assert train.why_retrain(m, ck, argv + ["--data", str(tmp_path)]).startswith("data ")
    # a twin's name is its folder under DATA_ROOT (not ./trevor): a checkpoint that recorded either form is reused
    assert train.world_of("trevor", "default") == train.world_of(str(tmp_path / "trevor"), "default")
    assert train.world_of("trevor", "smoke") == str((tmp_path / "trevor-tiny").resolve())
    m.main(argv + ["--data", "trevor"], "train")
    assert train.why_retrain(m, ck, argv + ["--data", str(tmp_path / "trevor")]) is None
    assert train.why_retrain(m, ck, argv + ["--data", "realtalk"]).startswith("data ")
    m.main(argv, "train")
    dep = tmp_path / "dep.pt"
    dep.write_bytes(b"x")
    os.utime(dep, (ck.stat().st_mtime + 10,) * 2)
    assert train.why_retrain(m, ck, argv, [dep]) == f"{dep} is newer"

    def rewrite(**change):
        obj = torch.load(ck, weights_only=True)
        obj.update(change)
        torch.save(obj, ck)
    rewrite(data_version=data.VERSION - 1)
    assert train.why_retrain(m, ck, argv) == f"data version {data.VERSION - 1} != {data.VERSION}"
    rewrite(data_version=data.VERSION, config={**torch.load(ck)["config"], "old_flag": 1})
    assert train.why_retrain(m, ck, argv) == "old_flag is no longer a setting"
    config = torch.load(ck)["config"]
    config.pop("old_flag"), config.pop("lr")                      # as if --lr were added after the checkpoint:
    rewrite(config=config)                                        # its default need not be what the old code did
    assert train.why_retrain(m, ck, argv) == "the checkpoint has no lr"
    rewrite(method="codec")
    assert train.why_retrain(m, ck, argv) == "checkpoint of codec"
    ck.write_bytes(b"not a checkpoint")
    assert train.why_retrain(m, ck, argv).startswith("unreadable checkpoint")


def test_results_markdown_formats_rows_and_skips_tables_without_their_main_run():
    res = {"vqvae": {"GT": {"mse/all": 0.0, "fd/all": 1e-20}, "model": {"mse/all": 0.012345, "fd/all": float("nan")}},
           "vqvae_naive": {"model": {"mse/all": 0.5}, "baseline:random_walk": {"mse/all": 0.25}}}
    md = train.results_markdown(res, "x86_64 CPU, 2 cores", {"vqvae": {"train": 1.25, "evaluate": 0.5}}, "smoke")
    assert "| vqvae | GT | – | – | – | – | 0 | 1.00e-20 |" in md   # exact zero stays 0; tiny values: scientific
    assert "| vqvae | model | – | – | – | – | 0.01235 | – |" in md  # 4 significant digits; NaN: a dash
    assert "| vqvae_naive | ablation:none,none | – | – | – | – | 0.5 |" in md
    assert "| vqvae_naive | baseline:random_walk_naive | – | – | – | – | 0.25 |" in md
    assert "vqvae 1.2 + 0.5; total 1.8." in md
    assert "DiffListener" not in md                             # a table without its main run is left out


# ----------------------------------------------------------------------------------------------------------------------
# The real thing, smoke preset

def test_train_all_smoke_end_to_end(tiny_world, tmp_path, capsys):
    runs = tmp_path / "runs"
    results = train.run_all(["--preset", "smoke", "--data", str(tiny_world), "--runs", str(runs), "--rows", "all"])
    printed = capsys.readouterr().out
    md = (runs / "results.md").read_text()
    assert md.strip() in printed                          # the file is what the command printed
    assert set(results) == {r.name for r in train.plan(preset="smoke", rows="all")}
    for run, rows in results.items():
        assert json.loads((runs / run / "metrics.json").read_text()) == rows
    for t in train.TABLES:                                # every row of every table as its run's metrics.json says
        for run, label, vals in train.table_rows(t, results):
            assert f"| {run} | {label} | " + " | ".join(train._fmt(vals.get(c)) for c in t.columns) + " |" in md
    assert results["lm_listener"]["GT"]["mse/all"] == 0.0 and results["diff_transformer"]["GT"]["lve"] == 0.0
    for f in ("listeners.png", "reactions.png", "talking_face.png"):
        assert (runs / "figures" / f).stat().st_size > 1000
    # a second call reuses the checkpoints and re-evaluates to the same numbers
    again = train.run_all(["--preset", "smoke", "--data", str(tiny_world), "--runs", str(runs), "--only", "vqvae"])
    assert f"{runs / 'vqvae'}: reusing" in capsys.readouterr().out
    assert again == results                               # --only: the other runs come from their metrics.json


def test_only_and_table_reject_unknown_names(tmp_path, capsys):
    with pytest.raises(data.UserError, match=r"unknown run\(s\) \['gan'\]"):
        train.run_all(["--only", "vqvae,gan", "--runs", str(tmp_path)])
    with pytest.raises(data.UserError, match="invalid choice"):
        train.run_all(["--table", "tab9", "--runs", str(tmp_path)])


def test_readme_results_section_has_the_pipeline_layout():
    """The README's results are runs/results.md pasted in: each table has the header results_markdown writes, and
    every row names a pipeline run (so a hand-edited or stale-format table shows up here)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Results on the synthetic twins", 1)[1].split("\n## ", 1)[0]
    section = section.split("The papers' own numbers", 1)[0]         # the reference table is not generated
    assert "Preset `default`. Hardware: " in section
    for t in train.TABLES:
        assert f"### {t.title}" in section, t.title
        assert "| run | row | " + " | ".join(t.columns) + " |" in section, t.title
        assert f"| {t.main} | model |" in section, t.main
        for entry in t.rows:
            assert f"| {entry[1]} | {entry[0]} |" in section, entry
    rows = [ln for ln in section.splitlines() if ln.startswith("| ") and not ln.startswith("| run |")]
    assert rows and all(ln.split(" | ")[0][2:] in {r.name for r in train.RUNS} for ln in rows)
