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
     "25-d attributes, 10 samples per speaker, appropriate set = GT + 10 re-simulated reactions."),
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
    """runs/results.md from {run name: {row: {metric: value}}}: one table per task, rows prefixed by run."""
    lines = [f"# Results on the synthetic world (preset `{preset}`)", "",
             f"Hardware: {hardware}. Wall-clock minutes per run (train + evaluate): "
             + ", ".join(f"{k} {v:.1f}" for k, v in minutes.items())
             + f"; total {sum(minutes.values()):.1f}.", ""]
    for title, runs, cols, caption in TABLES:
        present = [r for r in runs if r in results]
        if not present:
            continue
        lines += [f"## {title}", "", caption, "",
                  "| run | row | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
        for run in present:
            for row, vals in results[run].items():
                if not isinstance(vals, dict):
                    continue
                lines.append(f"| {run} | {row} | " + " | ".join(_fmt(vals.get(c)) for c in cols) + " |")
        lines.append("")
    return "\n".join(lines)


def run_all(argv):
    """`python train.py --model all [--preset P] [--data PATH] [--runs DIR] [--retrain]`."""
    p = argparse.ArgumentParser(prog="train.py --model all",
                                description="Train and evaluate every method, then write <runs>/results.md.")
    p.add_argument("--preset", default="default", choices=["smoke", "default", "full"])
    p.add_argument("--data", default="", help="data path handed to every method (default: the synthetic world)")
    p.add_argument("--runs", default="runs", help="folder of the runs and of results.md")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--retrain", action="store_true", help="train even where a checkpoint exists")
    p.add_argument("--only", default="", help="comma-separated run names to do (default: all)")
    a = p.parse_args(argv)
    runs = Path(a.runs)
    only = set(filter(None, a.only.split(",")))
    results, minutes = {}, {}
    t_all = time.time()
    for run, module, extra in PIPELINE:
        if only and run not in only:
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
        else:
            print(f"\n=== {run}: reusing {out / 'ckpt.pt'} ===", flush=True)
        print(f"\n=== evaluate {run} ===", flush=True)
        method.main(["--ckpt", str(out / "ckpt.pt"), "--out", str(out)] + (["--data", a.data] if a.data else []),
                    mode="sample")
        results[run] = json.loads((out / "metrics.json").read_text())
        minutes[run] = (time.time() - t0) / 60
    hardware = f"{platform.machine()} {platform.processor() or ''} CPU, {__import__('os').cpu_count()} cores".strip()
    md = results_markdown(results, hardware.replace("  ", " "), minutes, a.preset)
    runs.mkdir(parents=True, exist_ok=True)
    (runs / "results.md").write_text(md + "\n")
    print(md)
    print(f"\nwrote {runs / 'results.md'} ({(time.time() - t_all) / 60:.1f} min)")
    return results


if __name__ == "__main__":
    dispatch(sys.argv[1:], "sample")
