#!/usr/bin/env python3
"""The top-k classes of a classifier on images that have no labels.

    python predict.py photos/ --checkpoint d1_224_84.2.pth.tar                    # ImageNet names
    python predict.py 'shots/**/*.jpg' cat.png --checkpoint output/train/RUN/ --topk 3 --results-file out.csv
    python predict.py img.jpg --model volo_d1.sail_in1k --pretrained

IMAGES are files, folders (searched recursively) or glob patterns. The model, image size, crop and
class count are resolved as validate.py resolves them (checkpoint files, run directories, release
files, MindSpore .ckpt and .safetensors files, timm and hf-hub: names). Class names: the training
run's classes for this repository's runs, ImageNet-1k's for 1000-class models, else indices. One row
per image: its path and the top-k names with their probabilities, printed, and written to
--results-file (.csv or .json). Unreadable files are listed and skipped (exit code 1).
"""
import argparse
import logging

import torch
from timm.data import ImageNetInfo
from tqdm import tqdm

from data import DataError, ImageFiles, eval_transform, find_images, wrap_loader
from engine import (DiskFullError, add_amp_options, add_device_options, check_results_file, resolve_amp,
                    select_device, write_results)
from utils import CheckpointError, read_checkpoint
from utils.cli import PartialFailure, UsageError, run_cli
from utils.config import positive_int
from utils.log import log_to_file, setup_logging
from validate import add_model_options, build_classifier

_logger = logging.getLogger('predict')
IMAGENET_CLASSES = 1000


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('images', nargs='+', metavar='IMAGES', help='image files, folders or glob patterns')
    p.add_argument('--checkpoint', default='', help='checkpoint file or training run directory')
    add_model_options(p)
    p.add_argument('--topk', type=positive_int, default=5)
    p.add_argument('-b', '--batch-size', type=positive_int, default=32)
    add_device_options(p, workers=2)
    add_amp_options(p)
    p.add_argument('--results-file', default='', help='write the rows here: .csv or .json')
    p.add_argument('--log-file', default='', help='also write the output here')
    args = p.parse_args(argv)
    if not args.checkpoint and not args.pretrained:
        p.error('give --checkpoint FILE_OR_RUN, or --model NAME --pretrained')
    return args


def class_names(contents, num_classes):
    """Names by index: the checkpoint's training classes, ImageNet-1k's for a 1000-class head,
    else None (indices are printed)."""
    if contents is not None and contents.class_names:
        return list(contents.class_names)
    if num_classes == IMAGENET_CLASSES:
        info = ImageNetInfo()
        return [info.index_to_description(i).split(',')[0] for i in range(IMAGENET_CLASSES)]
    return None


def predict(model, paths, data_config, args, device, autocast):
    """(top-k lists, their paths, unreadable paths): for each readable image its top-k (index,
    probability) pairs, in the order of `paths`."""
    size = data_config['input_size'][-1]
    transform = eval_transform(size, data_config['crop_pct'], data_config['interpolation'])
    dataset = ImageFiles(paths, transform, placeholder=torch.zeros(3, size, size, dtype=torch.uint8))
    loader = wrap_loader(dataset, args.batch_size, is_training=False, device=device, num_workers=args.workers,
                         persistent_workers=False, mean=data_config['mean'], std=data_config['std'])
    top = {}
    unreadable = []
    k = min(args.topk, model.num_classes)
    with torch.inference_mode():
        for images, indices in tqdm(loader, desc='predict', unit='batch', disable=None):
            with autocast():
                logits = model(images)
            probs, classes = logits.float().softmax(-1).topk(k, dim=-1)
            for index, p, c in zip(indices.tolist(), probs.tolist(), classes.tolist()):
                if index < 0:
                    unreadable.append(paths[-1 - index])
                else:
                    top[index] = list(zip(c, p))
    return [top[i] for i in sorted(top)], [paths[i] for i in sorted(top)], unreadable


def main(argv=None):
    setup_logging()
    args = parse_args(argv)
    if args.log_file:
        log_to_file(args.log_file)
    check_results_file(args.results_file, ('.csv', '.json'))
    paths = find_images(args.images)
    device = select_device(args.device)
    autocast = resolve_amp(args, device, training=False).autocast
    contents = read_checkpoint(args.checkpoint, use_ema=args.use_ema) if args.checkpoint else None
    model, data_config, settings = build_classifier(args, args.checkpoint, contents, device)
    names = class_names(contents, model.num_classes)
    del contents
    _logger.info('%s on %d images (%d px, crop %s)', args.checkpoint or settings['model'], len(paths),
                 data_config['input_size'][-1], data_config['crop_pct'])
    tops, kept, unreadable = predict(model, paths, data_config, args, device, autocast)
    rows = []
    for path, top in zip(kept, tops):
        row = {'path': path}
        for rank, (index, prob) in enumerate(top, start=1):
            row[f'class_{rank}'] = names[index] if names else index
            row[f'index_{rank}'] = index
            row[f'prob_{rank}'] = round(prob, 6)
        rows.append(row)
        print(f'{path}\t' + '\t'.join(f'{row[f"class_{r}"]} {row[f"prob_{r}"]:.4f}' for r in range(1, len(top) + 1)))
    if args.results_file and rows:
        write_results(args.results_file, rows)
    for path in unreadable:
        _logger.error('unreadable, skipped: %s', path)
    if unreadable:
        raise PartialFailure(f'{len(unreadable)} of {len(paths)} images could not be read')
    return rows


def cli(argv=None):
    run_cli(main, argv, (UsageError, DataError, CheckpointError, DiskFullError), _logger)


if __name__ == '__main__':
    cli()
