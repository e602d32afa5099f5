#!/usr/bin/env python3
"""The detection demo: generate a small COCO-format dataset (first run only; shapes of 3 categories
with ids 3, 7, 12, polygon and RLE masks, a crowd region, an empty image), train Mask R-CNN on
VOLO-D1 from scratch on the CPU (configs/det/demo.yaml, a few minutes), evaluate the best checkpoint
with validate_det.py and draw its detections.

    python demo_det.py                  # data in ./demo_det_data, run in ./output/train_det/
    python demo_det.py --epochs 4       # shorter
    python demo_det.py --data /tmp/small --train-images 10 --epochs 1 -j 0 --fpn-channels 16 --train-sizes 64

Prints box and mask AP next to those of the same detector untrained (0.0 on the demo's data), and
exits with 1, saying so in one line, when the box or the mask AP is below 25: the model did not learn.
Options other than these go to train_det.py and override the recipe (configs/det/demo.yaml);
--train-images applies when the data folder is first written.
"""
import argparse
import json
import logging
import os
import sys

import torch
import yaml

from data import DataError
from data.synthetic_det import make_coco_dataset
from engine import demo_parser, newest_run, run_trainer, write_atomically
from engine.files import write_staged
from models.detection import build_detector, position_grid_size
from utils.cli import run_command
from utils.config import positive_int

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs', 'det', 'demo.yaml')
MIN_AP = 25.0  # box and mask AP (percent); the same detector untrained gives 0.0 on the demo's data


def not_learned(trained, untrained):
    """The one line saying the detector did not learn, or None when its box and mask AP (COCO's
    results, 0..1) both reach MIN_AP percent."""
    low = [f'{name} AP {100 * trained[kind]["AP"]:.1f} (untrained {100 * untrained[kind]["AP"]:.1f})'
           for kind, name in (('bbox', 'box'), ('segm', 'mask')) if 100 * trained[kind]['AP'] < MIN_AP]
    if not low:
        return None
    return f'demo_det.py: the detector did not learn: {" and ".join(low)}, below the {MIN_AP:.0f} this demo requires'


def untrained_checkpoint(path, args):
    """The demo's detector as train_det.py builds it, before any training, as a checkpoint file."""
    torch.manual_seed(args.seed)
    model = build_detector(args.model, args.num_classes, kind=args.detector, min_size=args.test_size,
                           max_size=args.max_size, fpn_channels=args.fpn_channels,
                           img_size=position_grid_size(args.model, args.test_size, args.max_size))
    os.replace(write_staged(path, lambda f: torch.save({'state_dict': model.state_dict()}, f)), path)
    return path


def main(argv=None):
    """Runs the demo; returns the exit code: 0, or 1 (after one line on stderr) when it did not learn."""
    p = demo_parser(__doc__, data='demo_det_data')
    p.add_argument('--epochs', type=positive_int, default=None,
                   help='override the recipe (configs/det/demo.yaml: 5)')
    p.add_argument('--train-images', type=positive_int, default=80,
                   help='training images, at least 10 (a fifth as many validation images); default 80')
    args, trainer_options = p.parse_known_args(argv)
    if args.train_images < 10:
        p.error(f'--train-images {args.train_images}: at least 10 (2 validation images; the last has no objects)')
    make_coco_dataset(args.data, train=args.train_images, val=args.train_images // 5, seed=0)
    train_args = [args.data, '-c', CONFIG, '--output', args.output, '-j', str(args.workers), *trainer_options]
    if args.epochs is not None:
        train_args += ['--epochs', str(args.epochs), '--lr-steps', '--eval-interval', str(args.epochs)]
    code = run_command('train_det.py', train_args)
    if code:
        return code
    run_dir = newest_run(args.output, 'train_det')
    overlays = os.path.join(run_dir, 'overlays')
    code = run_command('validate_det.py', [args.data, '--checkpoint', run_dir, '-j', args.workers, '--results-file',
                                           os.path.join(run_dir, 'validation.json'), '--save-results',
                                           os.path.join(run_dir, 'detections.json'), '--save-overlays', overlays])
    with open(os.path.join(run_dir, 'args.yaml')) as f:
        recipe = argparse.Namespace(**yaml.safe_load(f))  # the settings the run resolved
    untrained_path = untrained_checkpoint(os.path.join(run_dir, 'untrained.pth.tar'), recipe)
    code = code or run_command('validate_det.py', [
        args.data, '--checkpoint', untrained_path, '--model', recipe.model, '--test-size', recipe.test_size,
        '--max-size', recipe.max_size, '-j', args.workers, '--results-file', os.path.join(run_dir, 'untrained.json')])
    if code:
        return code
    with open(os.path.join(run_dir, 'validation.json')) as f, open(os.path.join(run_dir, 'untrained.json')) as g:
        trained, untrained = json.load(f), json.load(g)
    lines = [f'  {name:4s} AP {100 * trained[kind]["AP"]:5.1f} (AP50 {100 * trained[kind]["AP50"]:5.1f}); untrained '
             f'{100 * untrained[kind]["AP"]:4.1f} (AP50 {100 * untrained[kind]["AP50"]:4.1f})'
             for kind, name in (('bbox', 'box'), ('segm', 'mask'))]
    summary = f'\nDemo done: {run_dir}\n' + '\n'.join(lines) + f'\n  overlays: {overlays}/'
    write_atomically(os.path.join(run_dir, 'demo.txt'), summary.encode())
    print(summary)
    failure = not_learned(trained, untrained)
    if failure:
        print(failure, file=sys.stderr)
        return 1
    return 0


def cli(argv=None):
    """The command line: main's exit code; bad input is one line and exit code 2 (engine.run_trainer)."""
    return run_trainer(main, argv, logging.getLogger('demo_det'), errors=(DataError,))


if __name__ == '__main__':
    sys.exit(cli())
