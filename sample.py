"""Sample and evaluate one method: `python sample.py --model NAME [--ckpt PATH] [--split test] [--out DIR]`.

It generates, renders (GIF + PNG), evaluates, prints a Markdown table and writes DIR/metrics.json as
{row name: {metric name: value}} with the same numbers. Row names: GT, alt-GT, baseline:<name>, oracle:<name>,
model, ablation:<name>. This file is a thin dispatcher: NAME.py does the work (`python NAME.py sample` is the
same), and `python train.py --model all` evaluates every run of the pipeline this way.

    python sample.py --model vqvae                       # the checkpoint in runs/vqvae/
    python sample.py --model vqvae --ckpt runs-smoke/vqvae/ckpt.pt --out /tmp/vq
    python sample.py --model vqvae --help                # that method's flags
"""
import sys

from train import dispatch

if __name__ == "__main__":
    dispatch(sys.argv[1:], "sample", __doc__)
