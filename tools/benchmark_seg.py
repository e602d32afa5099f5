#!/usr/bin/env python3
"""Speed and peak memory of a UperNet segmentor: a training step (forward, decode + auxiliary loss,
backward, AdamW) on crops, and sliding-window inference of one large image.

    python -m tools.benchmark_seg --model volo_d1 --threads 2 --outlook-impl torch          # CPU
    python -m tools.benchmark_seg --model volo_d1 --device cuda --precision bf16 -b 8       # GPU

Medians over --iters runs after --warmup; peak memory as tools/benchmark.py measures it (CUDA
allocator peak, or live tensor bytes from torch.profiler on the CPU), above the weights and
optimizer state.
"""
import argparse
import sys

import torch

from loss import SegmentationLoss
from models.segmentation import build_segmentor
from tools.benchmark import add_measure_options, measure, measurement_setup, report
from utils.seg_inference import slide_inference


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='volo_d1', help='backbone')
    p.add_argument('--num-classes', type=int, default=150)
    p.add_argument('--crop-size', type=int, nargs=2, default=(512, 512))
    p.add_argument('-b', '--batch-size', type=int, default=2, help='training batch')
    p.add_argument('--image-size', type=int, nargs=2, default=(512, 2048), metavar=('H', 'W'),
                   help='the image of the sliding-window inference')
    p.add_argument('--stride', type=int, nargs=2, default=(341, 341))
    p.add_argument('--window-batch', type=int, default=4)
    p.add_argument('--mode', choices=['train', 'slide', 'both'], default='both')
    p.add_argument('--outlook-impl', choices=['auto', 'triton', 'torch'], default='auto')
    add_measure_options(p, warmup=1, iters=3)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device, autocast = measurement_setup(args)
    model = build_segmentor(args.model, args.num_classes, img_size=tuple(args.crop_size),
                            outlook_impl=args.outlook_impl).to(device)
    loss_fn = SegmentationLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-5, weight_decay=0.01)
    images = torch.randn(args.batch_size, 3, *args.crop_size, device=device)
    labels = torch.randint(0, args.num_classes, (args.batch_size, *args.crop_size), device=device)
    big = torch.randn(1, 3, *args.image_size, device=device)

    def train_step():
        model.train()
        with autocast():
            loss, _ = loss_fn(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def slide_step():
        model.eval()
        with torch.inference_mode(), autocast():
            slide_inference(model, big, args.num_classes, tuple(args.crop_size), tuple(args.stride), args.window_batch)

    steps = {}
    if args.mode in ('train', 'both'):
        steps['train'] = train_step
    if args.mode in ('slide', 'both'):
        steps['slide'] = slide_step
    results = {'model': args.model, 'device': str(device), 'precision': args.precision,
               'threads': torch.get_num_threads(), 'outlook_impl': args.outlook_impl,
               'params': sum(p.numel() for p in model.parameters())}
    results.update(measure(steps, {'train': args.batch_size, 'slide': 1}, args, device, names={'train': 'train_step'}))
    report(results, args.json)
    return results


if __name__ == '__main__':
    main()
    sys.exit(0)
