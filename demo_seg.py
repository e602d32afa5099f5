#!/usr/bin/env python3
"""The segmentation demo: generate a small dataset in the seg-folder format (first run only), train
VOLO-D1 + UperNet on it from scratch on the CPU (configs/seg/demo.yaml, a few minutes), evaluate
the best checkpoint and write colour overlays of its predictions.

    python demo_seg.py                  # data in ./demo_seg_data, run in ./output/train_seg/
    python demo_seg.py --iters 100      # shorter

Prints the mIoU next to that of always predicting the most frequent class.
"""
import argparse
import os
import sys

import numpy as np
import torch

import train_seg
import validate_seg
from data import build_seg_dataset
from data.synthetic_seg import make_seg_dataset
from utils.seg_metrics import SegmentationMetric

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs', 'seg', 'demo.yaml')


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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data', default='demo_seg_data')
    p.add_argument('--output', default='output')
    p.add_argument('--iters', type=int, default=None, help='override the recipe (configs/seg/demo.yaml)')
    args = p.parse_args(argv)
    make_seg_dataset(args.data, 'seg-folder', num_classes=5, train=200, val=40, size=(64, 64), seed=0)
    train_args = [args.data, '-c', CONFIG, '--output', args.output]
    if args.iters is not None:
        train_args += ['--iters', str(args.iters), '--eval-interval', str(args.iters)]
    run_dir = train_seg.main(train_args)
    overlays = os.path.join(run_dir, 'overlays')
    results = validate_seg.main([args.data, '--checkpoint', run_dir, '--mode', 'whole', '-j', '2',
                                 '--results-file', os.path.join(run_dir, 'validation.json'),
                                 '--save-predictions', os.path.join(run_dir, 'predictions'),
                                 '--save-overlays', overlays])
    baseline, majority = majority_class_miou(args.data)
    print(f'\nDemo done: {run_dir}\n  mIoU {results["mIoU"]:.1f} (mAcc {results["mAcc"]:.1f}, aAcc {results["aAcc"]:.1f}) '
          f'on 5 classes; always predicting the most frequent class ({majority}) gives mIoU {baseline:.1f}\n'
          f'  overlays: {overlays}/')
    return results['mIoU'], baseline


if __name__ == '__main__':
    miou, baseline = main()
    sys.exit(0 if miou > baseline else 1)
