#!/usr/bin/env python3
"""Plot a training run's summary.csv: losses and top-1/top-5 accuracy per epoch, as a PNG.

    python -m tools.plot_summary output/train/RUN            # writes output/train/RUN/summary.png
    python -m tools.plot_summary output/train/RUN/summary.csv --out curves.png
"""
import argparse
import csv
import os
import sys

from matplotlib.figure import Figure  # drawn off-screen: importing this module changes no matplotlib backend

from engine.files import save_figure


def read_summary(path):
    with open(path) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise SystemExit(f'{path} has no rows')
    return {key: [float(r[key]) for r in rows if r.get(key) not in (None, '')] for key in rows[0]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('summary', help='summary.csv, or the run directory holding it')
    p.add_argument('--out', default='', help='PNG to write (default: summary.png beside the CSV)')
    args = p.parse_args(argv)
    path = os.path.join(args.summary, 'summary.csv') if os.path.isdir(args.summary) else args.summary
    if not os.path.isfile(path):
        raise SystemExit(f'no summary.csv at {path}')
    cols = read_summary(path)
    unit = 'epoch' if 'epoch' in cols else 'iteration'  # segmentation runs count iterations
    epochs = cols[unit]
    fig = Figure(figsize=(10, 4))
    ax_loss, ax_acc = fig.subplots(1, 2)
    for key, label in (('train_loss', 'train loss'), ('eval_loss', 'eval loss')):
        if cols.get(key):
            ax_loss.plot(epochs[:len(cols[key])], cols[key], marker='o', label=label)
    for key, label in (('eval_top1', 'top-1'), ('eval_top5', 'top-5')):
        if cols.get(key):
            ax_acc.plot(epochs[:len(cols[key])], cols[key], marker='o', label=label)
    ax_loss.set(xlabel=unit, ylabel='loss', title='loss')
    ax_acc.set(xlabel=unit, ylabel='accuracy (%)', title='accuracy')
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(os.path.basename(os.path.dirname(os.path.abspath(path))))
    fig.tight_layout()
    out = args.out or os.path.join(os.path.dirname(path), 'summary.png')
    save_figure(fig, out, dpi=100)
    print(out)
    return out


if __name__ == '__main__':
    sys.exit(0 if main() else 1)
