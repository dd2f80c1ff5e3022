"""Sample and evaluate one method: `python sample.py --model NAME [--ckpt PATH] [--split test] [--out DIR]`.

It generates, renders (GIF + PNG), evaluates, prints a Markdown table and writes DIR/metrics.json as
{row name: {metric name: value}} with the same numbers. Row names: GT, alt-GT, baseline:<name>, model,
ablation:<name>. This file is a thin dispatcher: NAME.py does the work (`python NAME.py sample ...` is the same).
"""
import sys

from train import MODELS, dispatch, load_method  # noqa: F401  (one dispatcher for both entry points)


def run_all(argv):
    """`python train.py --model all`: train and evaluate every method (written with issue 9)."""
    sys.exit("error: --model all is not available yet")


if __name__ == "__main__":
    dispatch(sys.argv[1:], "sample")
