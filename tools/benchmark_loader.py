#!/usr/bin/env python3
"""Images/s of the training loaders: token labels against timm's plain loader, and image folders
against tar shards (tools/make_shards.py), with the files each opens in an epoch.

    python -m tools.benchmark_loader --workers 2 --img-size 224 --images 512

Both read the same generated JPEG folder (ImageNet-like 375x500 images, 18x18 label maps over
1000 classes) with the same workers, RandAugment, random erasing and batch size, and normalise on
the same device. The token-label loader runs RandAugment on the full image before the crop (the
reference's order) or, with 'aa after crop', on the crop as timm does. 'targets' adds
create_token_label_target (14x14 token labels) to each batch.

Folders vs shards: one whole epoch each (after a warm-up epoch, so both read from the page cache),
plain and token-label targets, the same transforms, workers and batch size; file opens are
counted in the loader's processes (an audit hook the forked workers inherit).
"""
import argparse
import multiprocessing
import os
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from timm.data import create_dataset, create_loader

from data import (DatasetTokenLabel, create_shard_train_loader, create_token_label_loader, create_token_label_target,
                  create_train_loader, find_shard_split, fix_posterize, set_epoch)
from tools.make_shards import make_shards


def make_folder(root, images, classes=10, num_label_classes=1000, map_size=18, seed=0):
    rng = np.random.default_rng(seed)
    for i in range(images):
        cls = f'c{i % classes:02d}'
        os.makedirs(os.path.join(root, 'train', cls), exist_ok=True)
        os.makedirs(os.path.join(root, 'labels', cls), exist_ok=True)
        pixels = rng.integers(0, 255, size=(375, 500, 3), dtype=np.uint8)
        pixels = (pixels // 32 * 32).astype(np.uint8)  # some structure so JPEG is not all noise
        Image.fromarray(pixels).save(os.path.join(root, 'train', cls, f'img_{i:05d}.JPEG'), quality=90)
        scores = torch.from_numpy(np.sort(rng.normal(size=(5, map_size, map_size)), axis=0)[::-1].copy())
        indices = torch.from_numpy(rng.integers(0, num_label_classes, size=(5, map_size, map_size)))
        torch.save(torch.stack([scores.float(), indices.float()]).half(),
                   os.path.join(root, 'labels', cls, f'img_{i:05d}.pt'))
    return root


def rate(loader, batches, warmup, batch_size, on_batch=None):
    it = iter(loader)
    for _ in range(warmup):
        batch = next(it)
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(it)
        if on_batch is not None:
            on_batch(*batch)
    return batches * batch_size / (time.perf_counter() - start)


class OpenCounter:
    """Files under `root` opened by this process and the worker processes it forks from now on."""

    def __init__(self, root):
        self.root = os.path.abspath(root)
        self.count = multiprocessing.Value('l', 0)
        sys.addaudithook(self._hook)  # audit hooks cannot be removed: they stay for the process

    def _hook(self, event, args):
        if event == 'open' and isinstance(args[0], str) and os.path.abspath(args[0]).startswith(self.root):
            with self.count.get_lock():
                self.count.value += 1


def epoch_rate(loader, counter, batch_size):
    """(images/s, files opened) over one whole epoch, after a warm-up epoch."""
    for epoch in range(2):
        set_epoch(loader, epoch)
        counter.count.value = 0
        start = time.perf_counter()
        batches = sum(1 for _ in loader)
        elapsed = time.perf_counter() - start
    return batches * batch_size / elapsed, counter.count.value


def folders_vs_shards(args, root, device):
    shard_root = os.path.join(root, 'shards')
    make_shards(root, shard_root, os.path.join(root, 'labels'), shard_size=args.shard_size)  # keeps complete ones
    split = find_shard_split(shard_root, 'train')
    counter = OpenCounter(root)
    common = dict(auto_augment=args.aa, interpolation='random', re_prob=args.reprob, num_workers=args.workers,
                  device=device, persistent_workers=True)
    train = os.path.join(root, 'train')
    loaders = {
        'folder, plain': create_train_loader(train, args.img_size, args.batch_size, **common),
        'shards, plain': create_shard_train_loader(split, args.img_size, args.batch_size, **common),
        'folder, token labels': create_token_label_loader(
            DatasetTokenLabel(train, os.path.join(root, 'labels')), args.img_size, args.batch_size, **common),
        'shards, token labels': create_shard_train_loader(split, args.img_size, args.batch_size, token_labels=True,
                                                          num_classes=1000, **common),
    }
    print(f'# one epoch of {len(loaders["folder, plain"]) * args.batch_size} images, {len(split.urls)} shards of '
          f'{args.shard_size}; {args.workers} workers, batch {args.batch_size}')
    results = {}
    for name, loader in loaders.items():
        results[name] = epoch_rate(loader, counter, args.batch_size)
        print(f'{name:24s} {results[name][0]:8.1f} img/s  {results[name][1]:6d} file opens an epoch')
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument('--root', default=None, help='reuse/generate the folder here (default: a temp dir)')
    p.add_argument('--images', type=int, default=512)
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('-b', '--batch-size', type=int, default=32)
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--batches', type=int, default=10)
    p.add_argument('--aa', default='rand-m9-mstd0.5-inc1')
    p.add_argument('--reprob', type=float, default=0.25)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--shard-size', type=int, default=128, help='samples per shard (folders vs shards)')
    args = p.parse_args(argv)
    root = args.root or tempfile.mkdtemp(prefix='loader_bench_')
    if not os.path.isdir(os.path.join(root, 'train')):
        make_folder(root, args.images)
    device = torch.device(args.device)
    common = dict(re_prob=args.reprob, re_mode='pixel', num_workers=args.workers, persistent_workers=True)
    plain_ds = create_dataset('', os.path.join(root, 'train'), is_training=True)
    plain = create_loader(plain_ds, (3, args.img_size, args.img_size), args.batch_size, is_training=True,
                          use_prefetcher=True, auto_augment=args.aa, interpolation='random', device=device,
                          **common)
    fix_posterize(plain_ds.transform)  # Pillow 12 rejects timm's 0-bit posterize (data/augment_compat.py)
    token_ds = DatasetTokenLabel(os.path.join(root, 'train'), os.path.join(root, 'labels'))
    token = create_token_label_loader(token_ds, args.img_size, args.batch_size, auto_augment=args.aa,
                                      interpolation='random', device=device, **common)
    token_ds_crop_first = DatasetTokenLabel(os.path.join(root, 'train'), os.path.join(root, 'labels'))
    token_crop_first = create_token_label_loader(token_ds_crop_first, args.img_size, args.batch_size,
                                                 auto_augment=args.aa, interpolation='random', device=device,
                                                 aa_after_crop=True, **common)

    def targets(images, layouts):
        create_token_label_target(layouts, num_classes=1000, smoothing=0.1, label_size=args.img_size // 16)

    results = {}
    for round_ in range(2):  # alternate, keep the better of two rounds each
        for name, loader, hook in (('timm plain', plain, None), ('token label', token, None),
                                   ('token label, aa after crop', token_crop_first, None),
                                   ('token label + targets', token, targets)):
            r = rate(loader, args.batches, 2, args.batch_size, hook)
            results[name] = max(results.get(name, 0), r)
    base = results['timm plain']
    count = len(plain_ds)
    print(f'# {count} images 375x500 -> {args.img_size}, batch {args.batch_size}, {args.workers} workers, '
          f'{args.aa}, reprob {args.reprob}, device {device}')
    for name, r in results.items():
        print(f'{name:24s} {r:8.1f} img/s  ({(base / r - 1) * 100:+.1f}% time vs timm)')
    folders_vs_shards(args, root, device)


if __name__ == '__main__':
    main()
