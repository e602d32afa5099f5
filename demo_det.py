#!/usr/bin/env python3
"""The detection demo: generate a small COCO-format dataset (first run only; shapes of 3 categories
with ids 3, 7, 12, polygon and RLE masks, a crowd region, an empty image), train Mask R-CNN on
VOLO-D1 from scratch on the CPU (configs/det/demo.yaml, a few minutes), evaluate the best checkpoint
with validate_det.py and draw its detections.

    python demo_det.py                  # data in ./demo_det_data, run in ./output/train_det/
    python demo_det.py --epochs 4       # shorter

Prints box and mask AP next to those of the same detector untrained.
"""
import argparse
import os
import sys

import torch

import train_det
import validate_det
from data.synthetic_det import make_coco_dataset
from engine import write_atomically
from models.detection import build_detector, position_grid_size

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs', 'det', 'demo.yaml')


def untrained_checkpoint(path, args):
    """The demo's detector as train_det.py builds it, before any training, as a checkpoint file."""
    torch.manual_seed(args.seed)
    model = build_detector(args.model, args.num_classes, kind=args.detector, min_size=args.test_size,
                           max_size=args.max_size, fpn_channels=args.fpn_channels,
                           img_size=position_grid_size(args.model, args.test_size, args.max_size))
    torch.save({'state_dict': model.state_dict()}, path + '.partial')
    os.replace(path + '.partial', path)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data', default='demo_det_data')
    p.add_argument('--output', default='output')
    p.add_argument('--epochs', type=int, default=None, help='override the recipe (configs/det/demo.yaml)')
    args = p.parse_args(argv)
    make_coco_dataset(args.data, train=80, val=16, seed=0)
    train_args = [args.data, '-c', CONFIG, '--output', args.output]
    if args.epochs is not None:
        train_args += ['--epochs', str(args.epochs), '--lr-steps', '--eval-interval', str(args.epochs)]
    run_dir = train_det.main(train_args)
    overlays = os.path.join(run_dir, 'overlays')
    trained = validate_det.main([args.data, '--checkpoint', run_dir, '--results-file',
                                 os.path.join(run_dir, 'validation.json'), '--save-results',
                                 os.path.join(run_dir, 'detections.json'), '--save-overlays', overlays])
    recipe = train_det.parse_args(train_args)
    recipe.num_classes = 3
    untrained = validate_det.main([args.data, '--checkpoint', untrained_checkpoint(
        os.path.join(run_dir, 'untrained.pth.tar'), recipe), '--model', recipe.model, '--test-size',
        str(recipe.test_size), '--max-size', str(recipe.max_size)])
    lines = [f'  {name:4s} AP {100 * trained[kind]["AP"]:5.1f} (AP50 {100 * trained[kind]["AP50"]:5.1f}); untrained '
             f'{100 * untrained[kind]["AP"]:4.1f} (AP50 {100 * untrained[kind]["AP50"]:4.1f})'
             for kind, name in (('bbox', 'box'), ('segm', 'mask'))]
    summary = f'\nDemo done: {run_dir}\n' + '\n'.join(lines) + f'\n  overlays: {overlays}/'
    write_atomically(os.path.join(run_dir, 'demo.txt'), summary.encode())
    print(summary)
    return trained, untrained


if __name__ == '__main__':
    trained, untrained = main()
    sys.exit(0 if trained['bbox']['AP'] > untrained['bbox']['AP'] and trained['segm']['AP'] > untrained['segm']['AP']
             else 1)
