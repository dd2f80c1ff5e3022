"""Train one method, or every paper table's runs: `python train.py --model NAME [flags]`.

    python train.py --model vqvae --preset smoke        # one method, seconds on a CPU
    python train.py --model vqvae --help                # that method's own flags
    python train.py --model all                         # every run of every table, then runs/results.md
    python train.py --model all --table lm_listener     # only the runs (and what they need) of one table
    python train.py --model all --help                  # the pipeline's flags and its tables

`--model NAME` hands the remaining flags to NAME.py (`python NAME.py` does the same). `--model all` is the
pipeline: RUNS below says which trainings (one method file, some flags) and which samplings of a trained
checkpoint exist, TABLES which runs make the rows of each paper table. Each run lives in <runs>/<name>/
(checkpoint, metrics.json, pictures); results.md assembles the tables from those metrics.json files.
A checkpoint is reused only when the configuration it recorded is the one this run would train now.
"""
import dataclasses
import importlib
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageSequence

import data

MODELS = ["vqvae", "discrete_diffusion", "latent_diffusion", "lm_listener", "diff_transformer"]
ROOT = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------------------------------------------------
# The runs and the tables (plain data: edit flags and names here)

class Run(NamedTuple):
    name: str          # its folder under the runs folder, and the `run` column of results.md
    model: str         # the method file
    train: str = ""    # training flags; {runs} is the runs folder (a `{runs}/NAME/ckpt.pt` makes NAME a dependency)
    sample: str = ""   # extra sampling flags
    of: str = ""       # a sample-only run: no training, it samples the checkpoint of this run with its own flags
    smoke: bool = True  # also in `--preset smoke` pipelines (the main runs and one of each other kind: fast tests)


NAIVE, IDENT = "--vq {runs}/vqvae_naive/ckpt.pt", "--vq {runs}/vqvae/ckpt.pt"
LM = " --vq-naive {runs}/vqvae_naive/ckpt.pt --cache {runs}/lm_listener --modalities "  # ablations share its features
# Order matters: a run comes after the runs it needs.
RUNS = [
    Run("vqvae_naive", "vqvae", "--norm none,none"),                       # the codec of DiffListener
    Run("vqvae", "vqvae", "--norm IN,AdaIN"),                              # the identity codec of the LM listener
    Run("vqvae_ln_ln", "vqvae", "--norm LN,LN", smoke=False),
    Run("vqvae_ln_adaln", "vqvae", "--norm LN,AdaLN", smoke=False),
    Run("vqvae_in_in", "vqvae", "--norm IN,IN", smoke=False),
    Run("vqvae_naive_k256", "vqvae", "--norm none,none --codebook-size 256", smoke=False),
    Run("vqvae_naive_k512", "vqvae", "--norm none,none --codebook-size 512", smoke=False),
    Run("discrete_diffusion", "discrete_diffusion", NAIVE),
    Run("discrete_diffusion_no_identity", "discrete_diffusion", NAIVE + " --no-identity", smoke=False),
    Run("discrete_diffusion_no_diff", "discrete_diffusion", NAIVE + " --no-diff", smoke=False),
    Run("discrete_diffusion_no_text", "discrete_diffusion", NAIVE + " --no-text", smoke=False),
    Run("discrete_diffusion_k256", "discrete_diffusion", "--vq {runs}/vqvae_naive_k256/ckpt.pt", smoke=False),
    Run("discrete_diffusion_k512", "discrete_diffusion", "--vq {runs}/vqvae_naive_k512/ckpt.pt", smoke=False),
    *[Run(f"discrete_diffusion_{name}", "discrete_diffusion", sample=f"{flags} --n-samples 1", of="discrete_diffusion",
          smoke=False) for name, flags in [("steps100", "--sample-steps 0"), ("steps25", "--sample-steps 25"),
                                           ("steps10", "--sample-steps 10"), ("no_truncation", "--truncation 1.0")]],
    Run("lm_listener", "lm_listener", IDENT + " --vq-naive {runs}/vqvae_naive/ckpt.pt"),
    Run("lm_listener_w", "lm_listener", IDENT + LM + "W", smoke=False),       # Tab. 3: speaker modalities
    Run("lm_listener_w_sa", "lm_listener", IDENT + LM + "W+SA", smoke=False),
    Run("lm_listener_w_emo", "lm_listener", IDENT + LM + "W+emo", smoke=False),
    Run("lm_listener_naive_w", "lm_listener", NAIVE + LM + "W", smoke=False),  # Tab. 4: the naive codec
    Run("lm_listener_naive_w_sa_emo", "lm_listener", NAIVE + LM + "W+SA+emo", smoke=False),
    Run("latent_diffusion", "latent_diffusion"),
    *[Run(f"latent_diffusion_plms{k}_s{s}", "latent_diffusion", of="latent_diffusion", smoke=(k, s) == (1, 10),
          sample=f"--plms-order {k} --sample-steps {s} --model-only")
      for k in (1, 2, 3, 4) for s in (10, 25, 50, 100)],                  # PLMS order x steps, one checkpoint
    Run("diff_transformer", "diff_transformer"),
    Run("diff_transformer_ar", "diff_transformer", "--arch ar"),           # the FaceFormer-style baseline
    Run("diff_transformer_plain", "diff_transformer", "--self-bias none --cross-mask full"),
]
# Listener metrics of the three listening-head tables.
LISTEN = ["mse/all", "fd/all", "pfd/all", "var_pred/all", "div_pred/all", "affect_l2"]


class Table(NamedTuple):
    name: str          # `--table NAME`
    title: str
    caption: str
    columns: list      # metric names, as in metrics.json
    main: str          # the run whose every row (GT, alt-GT, baselines, oracles, model, ...) the table shows
    rows: list         # (label, run): that run's `model` rows under label (model:X -> label:X);
    #                    (label, run, row): that one row under label


TABLES = [
    Table("vq_norms", "Listener tokens: VQ-VAE normalisation (MMLM Tab. 5)",
          "Reconstruction of test windows through encode → decode, and random walks over the codebooks; the "
          "`model` row is (IN, AdaIN), the others the other normalisations (encoder, decoder).",
          ["rec", "commit", "ppl", "active", "mse/all", "fd/all", "pfd/all", "var_pred/all", "div_pred/all"], "vqvae",
          [("ablation:none,none", "vqvae_naive"), ("ablation:LN,LN", "vqvae_ln_ln"),
           ("ablation:LN,AdaLN", "vqvae_ln_adaln"), ("ablation:IN,IN", "vqvae_in_in"),
           ("baseline:random_walk_naive", "vqvae_naive", "baseline:random_walk")]),
    Table("diff_listener", "Listening heads: DiffListener",
          "Raw motion units (56-d: 50 expression + 6 pose), per window, synthetic test split; ablations retrained "
          "without the listener's identity, the facial differential or the text, and with K = 256 / 512 codes; "
          "`ablation:steps<S>` / `no_truncation`: the main checkpoint sampled with S steps (100 = every step of the "
          "chain) or without truncation, one sampling seed.",
          LISTEN, "discrete_diffusion",
          [("ablation:no_identity", "discrete_diffusion_no_identity"),
           ("ablation:no_diff", "discrete_diffusion_no_diff"), ("ablation:no_text", "discrete_diffusion_no_text"),
           ("ablation:K256", "discrete_diffusion_k256"), ("ablation:K512", "discrete_diffusion_k512"),
           *[(f"ablation:{n}", f"discrete_diffusion_{n}")
             for n in ("steps100", "steps25", "steps10", "no_truncation")]]),
    Table("lm_listener", "Listening heads: multimodal LM listener (MMLM Tab. 1, 3, 4)",
          "Raw motion units, per window, synthetic test split; ablations: speaker modalities (Tab. 3) and the naive "
          "codec (Tab. 4), each decoded greedily and with nucleus sampling.",
          LISTEN, "lm_listener",
          [("ablation:W", "lm_listener_w"), ("ablation:W+SA", "lm_listener_w_sa"),
           ("ablation:W+emo", "lm_listener_w_emo"), ("ablation:naive_W", "lm_listener_naive_w"),
           ("ablation:naive_W+SA+emo", "lm_listener_naive_w_sa_emo")]),
    Table("react", "Diverse reactions, REACT protocol (Latent Behavior Diffusion)",
          "25-d attributes, 10 samples per speaker, appropriate set = GT + 10 re-simulated reactions; "
          "`ablation:plms<k>_s<S>`: the same checkpoint sampled with PLMS order k and S steps (LBD Tab. 3).",
          ["frcorr_sum", "frcorr_mean", "frdist_sum", "frdist_mean", "frdiv", "frvar", "frdvs", "frsyn"],
          "latent_diffusion", [(f"ablation:plms{k}_s{s}", f"latent_diffusion_plms{k}_s{s}")
                               for k in (1, 2, 3, 4) for s in (10, 25, 50, 100)]),
    Table("talking_face", "Talking face from speech (DiffSpeaker)",
          "Vertex units of the synthetic face, unseen test subjects averaged over the 8 training styles.",
          ["lve", "fdd", "fdd_abs", "mve"], "diff_transformer",
          [("baseline:autoregressive", "diff_transformer_ar"), ("ablation:plain_attention", "diff_transformer_plain")]),
]
# Config keys that do not change the trained weights: a checkpoint that differs only in these is reused.
IGNORED = {"out", "resume", "ckpt", "split", "device", "compile", "threads", "cache", "eval_speakers", "model_only"}


# ----------------------------------------------------------------------------------------------------------------------
# Dispatch to one method file

def load_method(name: str):
    """Import NAME.py from this folder; an unknown or not-yet-written method is a user error."""
    if name not in MODELS:
        raise data.UserError(f"unknown model {name!r}; models: {', '.join(MODELS)}, all (train.py)")
    if not (ROOT / f"{name}.py").exists():
        raise data.UserError(f"{name}.py is not written yet; available models: "
                             + ", ".join(m for m in MODELS if (ROOT / f"{m}.py").exists()))
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module(name)


def dispatch(argv, mode: str, doc: str = __doc__):
    """`train.py` / `sample.py`: --model picks the method file, every other flag goes to it. A user's mistake (an
    unknown model, bad flags) prints one line `error: ...` and exits with status 2."""
    argv = list(argv)
    try:
        if "--model" not in argv and not any(a.startswith("--model=") for a in argv):
            if "-h" in argv or "--help" in argv:
                print(usage(mode, doc))
                return None
            raise data.UserError(f"--model is required: one of {', '.join(MODELS)}"
                                 + (", all" if mode == "train" else "") + f" (python {mode}.py --help)")
        p = data.ArgParser(prog=f"{mode}.py", add_help=False, allow_abbrev=False)
        p.add_argument("--model")
        args, rest = p.parse_known_args(argv)
        if args.model == "all":
            if mode != "train":
                raise data.UserError("--model all trains and evaluates everything: python train.py --model all")
            return run_all(rest)
        module = load_method(args.model)
    except data.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if hasattr(module, "cli"):  # the shared setup block: user errors -> one line, exit 2
        return module.cli(rest, mode)
    try:  # a method file without the shared block yet
        return module.main(rest, mode)
    except data.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def usage(mode, doc):
    lines = [f"usage: python {mode}.py --model NAME [flags of NAME.py]" + (" | --model all [pipeline flags]"
                                                                            if mode == "train" else ""), "",
             doc.split("\n\n")[0], "",
             "models: " + ", ".join(MODELS) + (", all (every paper table's runs; --model all --help)"
                                               if mode == "train" else ""),
             f"python {mode}.py --model NAME --help lists that method's flags."]
    if mode == "train":
        lines.append("tables (--model all --table NAME): " + ", ".join(t.name for t in TABLES))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# The pipeline: which runs, in which order

def run_named(name):
    return next(r for r in RUNS if r.name == name)


def needs(run):
    """The runs this run cannot do without: those whose checkpoint its flags name, and the run it samples."""
    names = {r.name for r in RUNS}
    found = [w.split("/")[1] for w in shlex.split(run.train + " " + run.sample)
             if w.startswith("{runs}/") and w.endswith("/ckpt.pt")]
    return [n for n in dict.fromkeys(found + ([run.of] if run.of else [])) if n in names]


def plan(tables=(), only=(), preset="default"):
    """The runs to do, in RUNS order: --only's runs as named, else every run of the tables (all tables when none
    are named) and everything they need; `--preset smoke` keeps only the runs marked smoke (and what they need)."""
    if only:
        return [r for r in RUNS if r.name in only]
    chosen = [t for t in TABLES if t.name in tables] if tables else TABLES
    want = {r.name for r in RUNS} if not tables else {n for t in chosen for n in [t.main] + [e[1] for e in t.rows]}
    if preset == "smoke":
        want = {n for n in want if run_named(n).smoke}
    todo = list(want)
    while todo:  # close over dependencies
        for dep in needs(run_named(todo.pop())):
            if dep not in want:
                want.add(dep)
                todo.append(dep)
    return [r for r in RUNS if r.name in want]


# ----------------------------------------------------------------------------------------------------------------------
# Reuse a checkpoint only when it was trained the way this run would train now

def world_of(value, preset):
    """The dataset a config's `data` means, as one comparable path: "" is the synthetic world of the preset, and a
    world's listener/ or vocaset/ folder stands for the world itself."""
    root = getattr(data, "DATA_ROOT", ROOT / "data")
    p = Path(value) if value else root / ("tiny" if preset in ("smoke", "tiny") else "world")
    p = p.resolve()
    if p.name in ("listener", "vocaset") and (p.parent / "listener").is_dir() and (p.parent / "vocaset").is_dir():
        p = p.parent
    return str(p)


def wanted_config(module, argv):
    """The config (a dict) the method's own parser gives for these training flags."""
    return dataclasses.asdict(module.parse_config(list(argv), "train"))


def why_retrain(module, ckpt, argv, deps=()):
    """None when the checkpoint at `ckpt` holds what `argv` would train now; otherwise the reason, in a few words:
    no checkpoint, another method's, a config key that differs (IGNORED keys aside), another data version, or a
    checkpoint it depends on (deps: paths) that is newer than it."""
    ckpt = Path(ckpt)
    if not ckpt.is_file():
        return "no checkpoint"
    try:
        ck = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 -- an old or foreign file is retrained, whatever the reason
        return f"unreadable checkpoint: {str(e).splitlines()[0][:80]}"
    name = getattr(module, "METHOD", module.__name__)
    if not isinstance(ck, dict) or ck.get("method", name) != name:
        return f"checkpoint of {ck.get('method') if isinstance(ck, dict) else 'another program'}"
    have = ck.get("config")
    if not isinstance(have, dict):
        return "the checkpoint records no config"
    if "data_version" in ck and ck["data_version"] != data.VERSION:
        return f"data version {ck['data_version']} != {data.VERSION}"
    want = wanted_config(module, argv)
    for key in sorted(set(want) | set(have), key=lambda k: (k != "preset", k != "data", list(want).index(k)
                                                            if k in want else len(want))):
        if key in IGNORED:
            continue
        if key not in have:
            return f"the checkpoint has no {key}"
        if key not in want:
            return f"{key} is no longer a setting"
        a, b = have[key], want[key]
        if key == "data":
            a, b = world_of(a, have.get("preset", "default")), world_of(b, want.get("preset", "default"))
        if a != b:
            return f"{key} {a} != {b}"
    for dep in deps:
        if Path(dep).is_file() and Path(dep).stat().st_mtime > ckpt.stat().st_mtime:
            return f"{dep} is newer"
    return None


# ----------------------------------------------------------------------------------------------------------------------
# results.md and the README's figures

def _fmt(v):
    if v is None or (isinstance(v, float) and v != v):
        return "–"
    if isinstance(v, (int, float)):
        return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


def table_rows(table, results):
    """[(run, label, {metric: value})] of one table: every row of its main run, then each other run's rows."""
    rows = {}  # label -> (run, values); a later row of the same label adds to an earlier one
    for label, vals in results.get(table.main, {}).items():
        if isinstance(vals, dict):
            rows[label] = (table.main, dict(vals))
    for entry in table.rows:
        label, run = entry[:2]
        got = results.get(run, {})
        pick = {label: got.get(entry[2])} if len(entry) == 3 else \
            {label + row[len("model"):]: v for row, v in got.items() if row == "model" or row.startswith("model:")}
        for lab, vals in pick.items():
            if isinstance(vals, dict):
                rows[lab] = (run, {**rows.get(lab, (run, {}))[1], **vals})
    return [(run, label, vals) for label, (run, vals) in rows.items()]


def results_markdown(results: dict, hardware: str, minutes: dict, preset: str) -> str:
    """results.md from {run: {row: {metric: value}}} (the runs' metrics.json) and {run: {"train": min, "evaluate":
    min}}: one table per TABLES entry whose main run has results, rows labelled as the entry says."""
    total = sum(sum(m.values()) for m in minutes.values())
    lines = [f"Preset `{preset}`. Hardware: {hardware}. Wall-clock minutes per run (train + evaluate): "
             + ", ".join(f"{k} {m.get('train', 0):.1f} + {m.get('evaluate', 0):.1f}" for k, m in minutes.items())
             + f"; total {total:.1f}.", ""]
    for t in TABLES:
        if t.main not in results:
            continue
        lines += [f"### {t.title}", "", t.caption, "",
                  "| run | row | " + " | ".join(t.columns) + " |", "|---|---|" + "---|" * len(t.columns)]
        for run, label, vals in table_rows(t, results):
            lines.append(f"| {run} | {label} | " + " | ".join(_fmt(vals.get(c)) for c in t.columns) + " |")
        lines.append("")
    return "\n".join(lines)


def gif_frames(path, n):
    """n evenly spaced frames of an animated GIF, as RGB PIL images."""
    frames = [f.convert("RGB") for f in ImageSequence.Iterator(Image.open(path))]
    return [frames[i] for i in np.linspace(0, len(frames) - 1, n).round().astype(int)]


def contact_sheet(gifs, path, n=4, time_across=False):
    """A still figure from GIFs that share a frame height: each GIF's n frames, down the rows (time_across=False:
    one row per time point, the GIFs side by side) or along one row per GIF (time_across=True)."""
    cols = [gif_frames(g, n) for g in gifs]                          # [gif][time] -> image
    grid = [list(r) for r in zip(*cols)] if not time_across else cols  # [row][col]
    W = max(sum(im.width for im in row) for row in grid)
    H = sum(max(im.height for im in row) for row in grid)
    sheet, y = Image.new("RGB", (W, H), "white"), 0
    for row in grid:
        x = 0
        for im in row:
            sheet.paste(im, (x, y))
            x += im.width
        y += max(im.height for im in row)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def figures(runs: Path):
    """The README's figures from the GIFs the evaluations wrote: listeners (DiffListener window: speaker |
    DiffListener | GT; LM listener: GT | model), 3 LBD reactions, and a DiffSpeaker talking-face strip."""
    made = []
    listen = [g for g in (runs / "discrete_diffusion/samples/window0.gif", runs / "lm_listener/samples/sample.gif")
              if g.exists()]
    if listen:
        made.append(contact_sheet(listen, runs / "figures" / "listeners.png", n=4))
    if (runs / "latent_diffusion/reactions.gif").exists():
        made.append(contact_sheet([runs / "latent_diffusion/reactions.gif"], runs / "figures" / "reactions.png", n=4))
    face = sorted((runs / "diff_transformer").glob("*.gif"))
    if face:
        made.append(contact_sheet(face[:1], runs / "figures" / "talking_face.png", n=6, time_across=True))
    return made


def hardware() -> str:
    """'<CPU model> (x86_64), N cores' (plus the GPU when torch sees one), for results.md."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu} ({platform.machine()}), {os.cpu_count()} cores{gpu}"


# ----------------------------------------------------------------------------------------------------------------------
# `--model all`

def pipeline_parser():
    tables = "; ".join(f"{t.name} ({t.title}: {len({t.main} | {e[1] for e in t.rows})} runs)" for t in TABLES)
    p = data.ArgParser(prog="train.py --model all", description="Train and evaluate the runs of every paper table "
                       f"(or of --table's), then write <runs>/results.md and <runs>/figures/. Tables: {tables}.")
    p.add_argument("--preset", default="default", choices=["smoke", "default", "full"],
                   help="every run's preset (default: default)")
    p.add_argument("--data", default="", help="data path handed to every method (default: the synthetic world)")
    p.add_argument("--runs", default="", help="folder of the runs and of results.md (default: runs, or runs-PRESET "
                   "for another preset, so that a smoke pipeline never touches the default runs)")
    p.add_argument("--seed", type=int, default=0, help="every run's training seed (default 0)")
    p.add_argument("--table", action="append", default=[], choices=[t.name for t in TABLES],
                   help="only this table's runs and what they need (repeatable; default: every table)")
    p.add_argument("--only", default="", help="comma-separated run names to do, nothing else (the other runs' last "
                   "metrics.json still go into results.md)")
    p.add_argument("--retrain", action="store_true", help="train even where a matching checkpoint exists")
    return p


def do_run(run, runs, a, done, minutes):
    """Train (or reuse, or resume) one run and evaluate it; `done` collects the runs trained in this call."""
    out, module = runs / run.name, load_method(run.model)
    flags = lambda s: [w.replace("{runs}", str(runs)) for w in shlex.split(s)]
    given = ["--data", a.data] if a.data else []
    t0 = time.time()
    if not run.of:
        argv = ["--preset", a.preset, "--seed", str(a.seed), "--out", str(out)] + given + flags(run.train)
        marker = out / ".training"  # there while the pipeline trains this run: found later = interrupted
        deps = [runs / d / "ckpt.pt" for d in needs(run)]
        why = "--retrain" if a.retrain else why_retrain(module, out / "ckpt.pt", argv, deps) \
            or next((f"{runs / d} was retrained" for d in needs(run) if d in done), None)
        resume = why is None and marker.exists()  # the same training, killed: continue it
        if why is None and not resume:
            print(f"\n=== {out}: reusing {out / 'ckpt.pt'} ===", flush=True)
        else:
            verb = "resuming" if resume else "retraining" if (out / "ckpt.pt").exists() else "training"
            print(f"\n=== {out}: {verb} ({why or 'interrupted'}) ===", flush=True)
            out.mkdir(parents=True, exist_ok=True)
            marker.touch()
            module.main(argv + (["--resume"] if resume else []), "train")
            marker.unlink()
            done.add(run.name)
            minutes.setdefault(run.name, {})["train"] = (time.time() - t0) / 60
    print(f"\n=== evaluate {out} ===", flush=True)
    t0 = time.time()
    ckpt = runs / (run.of or run.name) / "ckpt.pt"
    module.main(["--preset", a.preset, "--ckpt", str(ckpt), "--out", str(out)] + given + flags(run.sample), "sample")
    minutes.setdefault(run.name, {})["evaluate"] = (time.time() - t0) / 60


def run_all(argv):
    """`python train.py --model all [--table NAME] [--preset P] [--data PATH] [--runs DIR] [--retrain]`: train (or
    reuse) and evaluate each planned run in order, then write results.md and the figures. -> {run: metrics}."""
    a = pipeline_parser().parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise data.UserError("--model all runs in one process; under torchrun train one method at a time "
                             "(torchrun --nproc_per_node N train.py --model NAME ...)")
    only = list(filter(None, a.only.split(",")))
    unknown = sorted(set(only) - {r.name for r in RUNS})
    if unknown:
        raise data.UserError(f"--only: unknown run(s) {unknown}; runs: " + ", ".join(r.name for r in RUNS))
    runs = Path(a.runs or ("runs" if a.preset == "default" else f"runs-{a.preset}"))
    runs.mkdir(parents=True, exist_ok=True)
    timings = runs / "timings.json"  # minutes per run, kept so that a partial re-run reports the others' times
    minutes = json.loads(timings.read_text()) if timings.exists() else {}
    todo, done, t_all = plan(a.table, only, a.preset), set(), time.time()
    for run in todo:
        try:
            do_run(run, runs, a, done, minutes)
        except data.UserError as e:  # say which run met it
            raise data.UserError(f"{runs / run.name}: {e}") from e
        timings.write_text(json.dumps(minutes, indent=1))
    results = {r.name: json.loads((runs / r.name / "metrics.json").read_text())
               for r in RUNS if (runs / r.name / "metrics.json").exists()}
    minutes = {r.name: minutes[r.name] for r in RUNS if r.name in results and r.name in minutes}
    md = results_markdown(results, hardware(), minutes, a.preset)
    (runs / "results.md").write_text(md + "\n")
    print(md)
    for f in figures(runs):
        print(f"wrote {f}")
    print(f"\nwrote {runs / 'results.md'} ({len(todo)} runs in {(time.time() - t_all) / 60:.1f} min)")
    return results


if __name__ == "__main__":
    dispatch(sys.argv[1:], "train")
