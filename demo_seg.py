#!/usr/bin/env python3
"""The segmentation demo: generate a small dataset in the seg-folder format (first run only), train
VOLO-D1 + UperNet on it from scratch on the CPU (configs/seg/demo.yaml, a few minutes), evaluate
the best checkpoint and write colour overlays of its predictions.

    python demo_seg.py                  # data in ./demo_seg_data, run in ./output/train_seg/
    python demo_seg.py --iters 100      # shorter
    python demo_seg.py --data /tmp/small --train-images 8 --iters 2 -j 0 --crop-size 32 32 --head-channels 32

Prints the mIoU next to that of always predicting the most frequent class (17.0 on the demo's data),
and exits with 1, saying so in one line, when the mIoU is below 40 or not above that: the model did
not learn.
Options other than these go to train_seg.py and override the recipe (configs/seg/demo.yaml);
--train-images applies when the data folder is first written.
"""
import json
import logging
import os
import sys

import numpy as np
import torch

from data import DataError, build_seg_dataset
from data.synthetic_seg import make_seg_dataset
from engine import demo_parser, newest_run, run_trainer
from utils.cli import run_command
from utils.config import positive_int
from utils.seg_metrics import SegmentationMetric

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs', 'seg', 'demo.yaml')
CLASSES = 5
MIN_MIOU = 40.0  # always predicting the most frequent class (background) gives 17.0 on the demo's data


def not_learned(miou, baseline):
    """The one line saying the model did not learn, or None when its mIoU reaches MIN_MIOU and beats
    `baseline`, the mIoU of always predicting the most frequent class (on few images it can exceed 40)."""
    if miou >= MIN_MIOU and miou > baseline:
        return None
    return (f'demo_seg.py: the model did not learn: mIoU {miou:.1f} on {CLASSES} classes, below the {MIN_MIOU:.0f} '
            f'this demo requires or not above the {baseline:.1f} of always predicting the most frequent class')


def majority_class_miou(root, split='val'):
    """mIoU (percent) of predicting the training split's most frequent class everywhere."""
    train = build_seg_dataset('seg-folder', root, 'train')
    counts = np.zeros(train.num_classes, dtype=np.int64)
    for i in range(len(train)):
        label = train.read_label(i)
        counts += np.bincount(label[label != 255], minlength=train.num_classes)[:train.num_classes]
    majority = int(counts.argmax())
    val = build_seg_dataset('seg-folder', root, split)
    metric = SegmentationMetric(val.num_classes)
    for i in range(len(val)):
        label = torch.from_numpy(val.read_label(i).astype(np.int64))
        metric.update(torch.full_like(label, majority), label)
    return metric.compute()['mIoU'], val.class_names[majority]


def main(argv=None):
    """Runs the demo; returns the exit code: 0, or 1 (after one line on stderr) when it did not learn."""
    p = demo_parser(__doc__, data='demo_seg_data')
    p.add_argument('--iters', type=positive_int, default=None,
                   help='override the recipe (configs/seg/demo.yaml: 300)')
    p.add_argument('--train-images', type=positive_int, default=200,
                   help='training images (a fifth as many validation images); default 200')
    args, trainer_options = p.parse_known_args(argv)
    make_seg_dataset(args.data, 'seg-folder', num_classes=CLASSES, train=args.train_images,
                     val=max(1, args.train_images // 5), size=(64, 64), seed=0)
    train_args = [args.data, '-c', CONFIG, '--output', args.output, '-j', str(args.workers), *trainer_options]
    if args.iters is not None:
        train_args += ['--iters', str(args.iters), '--eval-interval', str(args.iters)]
    code = run_command('train_seg.py', train_args)
    if code:
        return code
    run_dir = newest_run(args.output, 'train_seg')
    overlays = os.path.join(run_dir, 'overlays')
    code = run_command('validate_seg.py', [args.data, '--checkpoint', run_dir, '--mode', 'whole', '-j', args.workers,
                                           '--results-file', os.path.join(run_dir, 'validation.json'),
                                           '--save-predictions', os.path.join(run_dir, 'predictions'),
                                           '--save-overlays', overlays])
    if code:
        return code
    with open(os.path.join(run_dir, 'validation.json')) as f:
        results = json.load(f)
    baseline, majority = majority_class_miou(args.data)
    print(f'\nDemo done: {run_dir}\n  mIoU {results["mIoU"]:.1f} (mAcc {results["mAcc"]:.1f}, aAcc {results["aAcc"]:.1f}) '
          f'on {CLASSES} classes (required {MIN_MIOU:.0f}); always predicting the most frequent class ({majority}) '
          f'gives mIoU {baseline:.1f}\n  overlays: {overlays}/')
    failure = not_learned(results['mIoU'], baseline)
    if failure:
        print(failure, file=sys.stderr)
        return 1
    return 0


def cli(argv=None):
    """The command line: main's exit code; bad input is one line and exit code 2 (engine.run_trainer)."""
    return run_trainer(main, argv, logging.getLogger('demo_seg'), errors=(DataError,))


if __name__ == '__main__':
    sys.exit(cli())
