#!/usr/bin/env python3
"""Speed and peak memory of a detector (Mask R-CNN by default): a training step (forward with
targets, the summed losses, backward, AdamW) and inference, at COCO's 1333x800.

    python -m tools.benchmark_det --model volo_d1 --threads 2                          # CPU
    python -m tools.benchmark_det --model volo_d1 --device cuda --precision bf16       # GPU

Images are H x W (default 800 x 1333, the recipe's single scale), each with --objects boxes and masks.
Medians over --iters runs after --warmup; peak memory as tools/benchmark.py measures it (CUDA
allocator peak, or live tensor bytes from torch.profiler on the CPU), above the weights and
optimizer state.
"""
import argparse
import sys

import torch

from models.detection import DETECTORS, build_detector
from tools.benchmark import add_measure_options, measure, measurement_setup, report


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='volo_d1', help='backbone')
    p.add_argument('--detector', default='mask_rcnn', choices=DETECTORS)
    p.add_argument('--num-classes', type=int, default=80)
    p.add_argument('--image-size', type=int, nargs=2, default=(800, 1333), metavar=('H', 'W'))
    p.add_argument('-b', '--batch-size', type=int, default=2, help='training batch')
    p.add_argument('--infer-batch-size', type=int, default=2)
    p.add_argument('--objects', type=int, default=8, help='ground-truth objects per training image')
    p.add_argument('--mode', choices=['train', 'infer', 'both'], default='both')
    add_measure_options(p, warmup=1, iters=3)
    return p.parse_args(argv)


def targets(batch, objects, height, width, device, generator):
    """`objects` random boxes per image, each with the mask of its box."""
    out = []
    for _ in range(batch):
        xy = torch.rand(objects, 2, generator=generator) * torch.tensor([width * 0.7, height * 0.7])
        wh = (0.05 + 0.25 * torch.rand(objects, 2, generator=generator)) * torch.tensor([width, height])
        boxes = torch.cat([xy, xy + wh], 1).round()
        masks = torch.zeros(objects, height, width, dtype=torch.uint8)
        for m, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist()):
            m[y0:y1, x0:x1] = 1
        out.append({'boxes': boxes.to(device), 'labels': torch.randint(1, 81, (objects,), generator=generator).to(device),
                    'masks': masks.to(device)})
    return out


def main(argv=None):
    args = parse_args(argv)
    device, autocast = measurement_setup(args)
    height, width = args.image_size
    model = build_detector(args.model, args.num_classes, kind=args.detector, min_size=min(height, width),
                           max_size=max(height, width)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    generator = torch.Generator().manual_seed(0)
    train_images = [torch.rand(3, height, width, generator=generator).to(device) for _ in range(args.batch_size)]
    train_targets = targets(args.batch_size, args.objects, height, width, device, generator)
    infer_images = [torch.rand(3, height, width, generator=generator).to(device) for _ in range(args.infer_batch_size)]

    def train_step():
        model.train()
        with autocast():
            loss = sum(model(train_images, train_targets).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def infer_step():
        model.eval()
        with torch.inference_mode(), autocast():
            model(infer_images)

    steps = {}
    if args.mode in ('train', 'both'):
        steps['train'] = train_step
    if args.mode in ('infer', 'both'):
        steps['infer'] = infer_step
    results = {'model': args.model, 'detector': args.detector, 'device': str(device), 'precision': args.precision,
               'threads': torch.get_num_threads(), 'image_size': [height, width],
               'params': sum(p.numel() for p in model.parameters())}
    results.update(measure(steps, {'train': args.batch_size, 'infer': args.infer_batch_size}, args, device,
                           names={'train': 'train_step', 'infer': 'infer_batch'}))
    report(results, args.json)
    return results


if __name__ == '__main__':
    main()
    sys.exit(0)
