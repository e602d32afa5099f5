#!/usr/bin/env python3
"""The demo: generate a small shapes dataset with token labels (first run only), train volo_d1
at 64 px on it for a few epochs on the CPU with token labeling, then validate the best checkpoint.
It exits with 1, saying so in one line, when the top-1 is below 70% (chance: 25%): the model did
not learn.

    python demo.py                   # data in ./demo_data, run in ./output/train/
    python demo.py --data /tmp/shapes --output /tmp/runs --epochs 3
    python demo.py --data /tmp/small --per-class 16 --epochs 2 -j 0 --img-size 32 --token-label-size 2

Options other than these go to main.py and override the recipe (configs/demo.yaml); --per-class
applies when the data folder is first written.
"""
import json
import logging
import os
import sys

from data import DataError
from data.synthetic import make_shapes_dataset
from engine import demo_parser, newest_run, run_trainer
from utils.cli import run_command
from utils.config import positive_int

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs', 'demo.yaml')
CLASSES = 4
MIN_TOP1 = 70.0  # percent; chance is 100 / CLASSES = 25%


def not_learned(top1):
    """The one line saying the model did not learn, or None when its top-1 reaches MIN_TOP1."""
    if top1 >= MIN_TOP1:
        return None
    return (f'demo.py: the model did not learn: top-1 {top1:.1f}% on {CLASSES} classes, below the {MIN_TOP1:.0f}% '
            f'this demo requires (chance {100 / CLASSES:.0f}%)')


def main(argv=None):
    """Runs the demo; returns the exit code: 0, or 1 (after one line on stderr) when it did not learn."""
    p = demo_parser(__doc__, data='demo_data')
    p.add_argument('--epochs', type=positive_int, default=None, help='override the recipe (configs/demo.yaml: 10)')
    p.add_argument('--per-class', type=positive_int, default=64,
                   help='training images per class (a quarter as many validation images); default 64')
    args, trainer_options = p.parse_known_args(argv)
    make_shapes_dataset(args.data, num_classes=CLASSES, train_per_class=args.per_class,
                        val_per_class=max(1, args.per_class // 4), img_size=64, label_size=8)
    train_args = [args.data, '-c', CONFIG, '--token-label-data', os.path.join(args.data, 'labels'),
                  '--output', args.output, '-j', str(args.workers), *trainer_options]
    if args.epochs is not None:
        train_args += ['--epochs', str(args.epochs)]
    code = run_command('main.py', train_args)
    if code:
        return code
    run_dir = newest_run(args.output, 'train')
    # the checkpoint supplies its model, image size, class count and crop
    results = os.path.join(run_dir, 'validation.json')
    code = run_command('validate.py', [args.data, '--checkpoint', os.path.join(run_dir, 'model_best.pth.tar'),
                                       '-b', '64', '-j', str(args.workers), '--results-file', results])
    if code:
        return code
    with open(results) as f:
        top1 = json.load(f)['top1']
    print(f'\nDemo done: {run_dir}\n  best checkpoint top-1 {top1:.1f}% on {CLASSES} classes '
          f'(chance {100 / CLASSES:.0f}%, required {MIN_TOP1:.0f}%); curves: python -m tools.plot_summary {run_dir}')
    failure = not_learned(top1)
    if failure:
        print(failure, file=sys.stderr)
        return 1
    return 0


def cli(argv=None):
    """The command line: main's exit code; bad input is one line and exit code 2 (engine.run_trainer)."""
    return run_trainer(main, argv, logging.getLogger('demo'), errors=(DataError,))


if __name__ == '__main__':
    sys.exit(cli())
