"""Train one method: `python train.py --model NAME [flags]` runs NAME.py's training with the remaining flags.

    python train.py --model vqvae --preset smoke        # seconds on a CPU
    python train.py --model vqvae --help                # that method's own flags
    python train.py --model all                         # every method in order, then runs/results.md

This file is a thin dispatcher: each method file is a self-contained script (`python vqvae.py` does the same).
"""
import argparse
import importlib
import sys
from pathlib import Path

# Training order matters: discrete_diffusion and lm_listener tokenise with a trained vqvae.
MODELS = ["vqvae", "discrete_diffusion", "latent_diffusion", "lm_listener", "diff_transformer"]
ROOT = Path(__file__).resolve().parent


def load_method(name: str):
    """Import NAME.py from this folder, with a clear error for unknown or not-yet-written methods."""
    if name not in MODELS:
        sys.exit(f"error: unknown model {name!r}; available models: {', '.join(MODELS)}")
    if not (ROOT / f"{name}.py").exists():
        sys.exit(f"error: {name}.py is not written yet; available models: "
                 + ", ".join(m for m in MODELS if (ROOT / f"{m}.py").exists()))
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module(name)


def dispatch(argv, mode: str):
    """Parse only --model; everything else goes to the method file's own parser."""
    parser = argparse.ArgumentParser(
        prog=f"{mode}.py", add_help=False,
        description=f"{mode.capitalize()} a method. Models: {', '.join(MODELS)}"
        + (", all" if mode == "train" else "") + ". Flags after --model go to that method "
        f"(python {mode}.py --model NAME --help lists them).")
    parser.add_argument("--model", help="which method file to run")
    parser.add_argument("-h", "--help", action="store_true")
    args, rest = parser.parse_known_args(argv)
    if args.model is None:
        parser.print_help()
        sys.exit(0 if args.help else 2)
    if args.help:
        rest = ["--help"] + rest
    if mode == "train" and args.model == "all":
        import sample  # the pipeline that trains, evaluates and writes runs/results.md lives with evaluation
        return sample.run_all(rest)
    return load_method(args.model).main(rest, mode=mode)


if __name__ == "__main__":
    dispatch(sys.argv[1:], "train")
