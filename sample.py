"""Sample and evaluate one method: `python sample.py --model NAME [--ckpt PATH] [--split test] [--out DIR]`.

It generates, renders (GIF + PNG), evaluates, prints a Markdown table and writes DIR/metrics.json as
{row name: {metric name: value}} with the same numbers. Row names: GT, alt-GT, baseline:<name>, model,
ablation:<name>. This file is a thin dispatcher: NAME.py does the work.

It also holds the whole-repository pipeline behind `python train.py --model all`: train every method on the
default synthetic world (reusing checkpoints that exist), evaluate each one with its own sample mode, and
write runs/results.md with one table per task, the hardware and the wall-clock time.
"""
import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

from train import MODELS, dispatch, load_method

# (run name, method file, extra training flags). Order matters: the VQ-VAEs first, the token models after.
PIPELINE = [
    ("vqvae_naive", "vqvae", ["--norm", "none,none"]),
    ("vqvae", "vqvae", []),
    ("discrete_diffusion", "discrete_diffusion", ["--vq", "{runs}/vqvae_naive/ckpt.pt"]),
    ("lm_listener", "lm_listener", ["--vq", "{runs}/vqvae/ckpt.pt", "--vq-naive", "{runs}/vqvae_naive/ckpt.pt"]),
    ("latent_diffusion", "latent_diffusion", []),
    ("diff_transformer", "diff_transformer", []),
]
# What results.md shows: (title, run names, metric columns, caption).
TABLES = [
    ("Listener tokens: VQ-VAE reconstruction (codec floor)", ["vqvae_naive", "vqvae"],
     ["mse/all", "fd/all", "pfd/all", "var_pred/all", "div_pred/all", "ppl", "active"],
     "Reconstruction of test windows through encode → decode, and a random walk over the codebook."),
    ("Listening heads (DiffListener, multimodal LM listener)", ["discrete_diffusion", "lm_listener"],
     ["mse/all", "fd/all", "pfd/all", "var_pred/all", "div_pred/all", "affect_l2"],
     "Raw motion units (56-d: 50 expression + 6 pose), per window, synthetic test split."),
    ("Diverse reactions, REACT protocol (Latent Behavior Diffusion)", ["latent_diffusion"],
     ["frcorr_sum", "frcorr_mean", "frdist_sum", "frdist_mean", "frdiv", "frvar", "frdvs", "frsyn"],
     "25-d attributes, 10 samples per speaker, appropriate set = GT + 10 re-simulated reactions; the PLMS "
     "order x steps cells (`ablation:plms<k>_s<S>`, Tab. 3) on 25 of the 100 test speakers, without FRDist."),
    ("Talking face from speech (DiffSpeaker)", ["diff_transformer"],
     ["lve", "fdd", "fdd_abs", "mve"],
     "Vertex units of the synthetic face, unseen test subjects averaged over the 8 training styles."),
]


def _fmt(v):
    if v is None or (isinstance(v, float) and v != v):
        return "–"
    if isinstance(v, (int, float)):
        return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


def results_markdown(results: dict, hardware: str, minutes: dict, preset: str) -> str:
    """runs/results.md from {run name: {row: {metric: value}}} and {run name: {"train": min, "evaluate": min}}:
    one table per task, rows prefixed by their run."""
    total = sum(sum(m.values()) for m in minutes.values())
    lines = [f"Preset `{preset}`. Hardware: {hardware}. Wall-clock minutes per run (train + evaluate): "
             + ", ".join(f"{k} {m.get('train', 0):.1f} + {m.get('evaluate', 0):.1f}" for k, m in minutes.items())
             + f"; total {total:.1f}.", ""]
    for title, runs, cols, caption in TABLES:
        present = [r for r in runs if r in results]
        if not present:
            continue
        lines += [f"### {title}", "", caption, "",
                  "| run | row | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
        for run in present:
            for row, vals in results[run].items():
                if not isinstance(vals, dict):
                    continue
                lines.append(f"| {run} | {row} | " + " | ".join(_fmt(vals.get(c)) for c in cols) + " |")
        lines.append("")
    return "\n".join(lines)


def gif_frames(path, n):
    """n evenly spaced frames of an animated GIF, as RGB PIL images."""
    from PIL import Image, ImageSequence
    frames = [f.convert("RGB") for f in ImageSequence.Iterator(Image.open(path))]
    return [frames[i] for i in np.linspace(0, len(frames) - 1, n).round().astype(int)]


def contact_sheet(gifs, path, n=4, time_across=False):
    """A still figure from GIFs that share a frame height: each GIF's n frames, down the rows (time_across=False:
    one row per time point, the GIFs side by side) or along one row per GIF (time_across=True)."""
    from PIL import Image
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
    import os
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu} ({platform.machine()}), {os.cpu_count()} cores{gpu}"


def run_all(argv):
    """`python train.py --model all [--preset P] [--data PATH] [--runs DIR] [--retrain]`."""
    p = argparse.ArgumentParser(prog="train.py --model all",
                                description="Train and evaluate every method, then write <runs>/results.md.")
    p.add_argument("--preset", default="default", choices=["smoke", "default", "full"])
    p.add_argument("--data", default="", help="data path handed to every method (default: the synthetic world)")
    p.add_argument("--runs", default="runs", help="folder of the runs and of results.md")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--retrain", action="store_true", help="train even where a checkpoint exists")
    p.add_argument("--only", default="", help="comma-separated run names to do (default: all); the others' "
                   "last metrics.json still go into results.md")
    a = p.parse_args(argv)
    only = set(filter(None, a.only.split(",")))
    if only - {run for run, _, _ in PIPELINE}:
        p.error(f"unknown run(s) {sorted(only - {run for run, _, _ in PIPELINE})}; runs: "
                + ", ".join(run for run, _, _ in PIPELINE))
    runs = Path(a.runs)
    runs.mkdir(parents=True, exist_ok=True)
    # minutes per run, kept across calls so that a partial re-run still reports the time of the others
    timings = runs / "timings.json"
    minutes = json.loads(timings.read_text()) if timings.exists() else {}
    results = {}
    t_all = time.time()
    for run, module, extra in PIPELINE:
        if only and run not in only:  # not redone: its last evaluation still goes into results.md
            if (runs / run / "metrics.json").exists():
                results[run] = json.loads((runs / run / "metrics.json").read_text())
            continue
        out = runs / run
        common = ["--preset", a.preset, "--seed", str(a.seed), "--out", str(out)]
        if a.data:
            common += ["--data", a.data]
        extra = [e.format(runs=runs) for e in extra]
        method = load_method(module)
        t0 = time.time()
        if a.retrain or not (out / "ckpt.pt").exists():
            print(f"\n=== train {run} ({module}.py) ===", flush=True)
            method.main(common + extra, mode="train")
            minutes.setdefault(run, {})["train"] = (time.time() - t0) / 60
        else:
            print(f"\n=== {run}: reusing {out / 'ckpt.pt'} ===", flush=True)
        print(f"\n=== evaluate {run} ===", flush=True)
        t0 = time.time()
        method.main(["--ckpt", str(out / "ckpt.pt"), "--out", str(out)] + (["--data", a.data] if a.data else []),
                    mode="sample")
        results[run] = json.loads((out / "metrics.json").read_text())
        minutes.setdefault(run, {})["evaluate"] = (time.time() - t0) / 60
        timings.write_text(json.dumps(minutes, indent=1))
    minutes = {run: minutes[run] for run, _, _ in PIPELINE if run in results and run in minutes}
    md = results_markdown(results, hardware(), minutes, a.preset)
    (runs / "results.md").write_text(md + "\n")
    print(md)
    for f in figures(runs):
        print(f"wrote {f}")
    print(f"\nwrote {runs / 'results.md'} ({(time.time() - t_all) / 60:.1f} min)")
    return results


if __name__ == "__main__":
    dispatch(sys.argv[1:], "sample")
