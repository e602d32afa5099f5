#!/usr/bin/env python3
"""The demo: generate a small shapes dataset with token labels (first run only), train volo_d1
at 64 px on it for a few epochs on the CPU with token labeling, then validate the best checkpoint.

    python demo.py                   # data in ./demo_data, run in ./output/train/
    python demo.py --data /tmp/shapes --output /tmp/runs --epochs 3
"""
import argparse
import os
import sys

import main as train_script
import validate as validate_script
from data.synthetic import make_shapes_dataset

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs', 'demo.yaml')


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data', default='demo_data')
    p.add_argument('--output', default='output')
    p.add_argument('--epochs', type=int, default=None, help='override the recipe (configs/demo.yaml)')
    args = p.parse_args(argv)
    make_shapes_dataset(args.data, num_classes=4, train_per_class=64, val_per_class=16, img_size=64, label_size=8)
    train_args = [args.data, '-c', CONFIG, '--token-label-data', os.path.join(args.data, 'labels'),
                  '--output', args.output]
    if args.epochs is not None:
        train_args += ['--epochs', str(args.epochs)]
    run_dir = train_script.main(train_args)
    # the checkpoint supplies its model, image size, class count and crop
    rows = validate_script.main([args.data, '--checkpoint', os.path.join(run_dir, 'model_best.pth.tar'),
                                 '-b', '64', '-j', '2', '--results-file', os.path.join(run_dir, 'validation.json')])
    print(f'\nDemo done: {run_dir}\n  best checkpoint top-1 {rows[0]["top1"]:.1f}% on 4 classes '
          f'(chance 25%); curves: python -m tools.plot_summary {run_dir}')
    return rows[0]


if __name__ == '__main__':
    sys.exit(0 if main() else 1)
