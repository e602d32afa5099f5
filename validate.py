#!/usr/bin/env python3
"""Top-1 / top-5 / loss of a model on an ImageNet-style validation folder, at any resolution.

    python validate.py /path/to/imagenet --model volo_d1 --checkpoint d1_224_84.2.pth.tar --img-size 224 -b 128
    python validate.py /path/to/imagenet --model volo_d5 --checkpoint d5_512_87.07.pth.tar --img-size 512 -b 32
    python validate.py /path/to/imagenet --checkpoint output/train/RUN/ --results-file runs.csv

DATA is the dataset root (its val/ or validation/ folder is used) or the split folder itself; with
--dataset wds, the shard root of tools/make_shards.py (or a brace pattern of shards); with
--dataset hfds/NAME, a Hugging Face dataset's cache folder (--split validation). A
checkpoint trained at another resolution is evaluated with its position embedding interpolated.
A training checkpoint (or run directory) supplies its own model, image size, class count and crop
unless the command line gives them. With a directory of checkpoints, each is evaluated and a CSV
sorted by top-1 is written; a run directory also gets validate.log.
"""
import argparse
import glob
import logging
import os
from functools import partial

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from data import DataError, open_split
from engine import (DiskFullError, add_amp_options, add_device_options, check_outputs, check_results_file,
                    resolve_amp, select_device, write_results)
from inference.classifier import add_model_options, build_classifier, model_classes
from utils import CheckpointError, checkpoint_num_classes, read_checkpoint
from utils.cli import PartialFailure, UsageError, run_cli
from utils.config import dataset_type, positive_int
from utils.evaluation import evaluate
from utils.log import log_to_file, setup_logging

_logger = logging.getLogger('validate')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('data', metavar='DIR', help='dataset root (with val/ or validation/) or the split folder')
    p.add_argument('--split', default='val', help='split folder inside DIR (validation/ also accepted)')
    p.add_argument('--dataset', '-d', metavar='NAME', default='', type=dataset_type,
                   help="'' or 'folder': class folders; 'wds': tar shards of tools/make_shards.py; 'hfds/NAME': a "
                        "Hugging Face dataset")
    p.add_argument('--checkpoint', default='', help='checkpoint file, or a directory: evaluate each checkpoint in it')
    add_model_options(p)
    p.add_argument('-b', '--batch-size', type=positive_int, default=128)
    add_device_options(p, workers=4)
    add_amp_options(p)
    p.add_argument('--no-test-pool', action='store_true',
                   help='accepted for the original command lines; no test-time pooling is ever applied')
    p.add_argument('--results-file', default='', help='write results here: .csv or .json')
    p.add_argument('--log-file', default='',
                   help="append the log here (default: validate.log in the checkpoint's run directory)")
    p.add_argument('--pin-mem', action='store_true')
    return p.parse_args(argv)


def checkpoints_in(path):
    files = sorted(glob.glob(os.path.join(path, '*.pth.tar')) + glob.glob(os.path.join(path, '*.pth')))
    files = [f for f in files if not os.path.basename(f).startswith(('tmp', 'recovery'))]
    if not files:
        raise CheckpointError(f'no checkpoints (*.pth.tar, *.pth) in directory {path}')
    return files


def validate_one(args, checkpoint, source, device, autocast):
    contents = read_checkpoint(checkpoint, use_ema=args.use_ema) if checkpoint else None
    head_classes = checkpoint_num_classes(contents.state_dict) if contents is not None else None
    class_names, classes_from = model_classes(args, source, contents)
    class_map = source.class_map(class_names)  # before any compute
    if head_classes is not None and len(class_names) > head_classes:
        raise CheckpointError(f'{checkpoint or args.model} has a {head_classes}-class head, but {classes_from} '
                              f'lists {len(class_names)} classes')
    model, data_config, settings = build_classifier(args, checkpoint, contents, device)
    del contents
    loader = dict(mean=data_config['mean'], std=data_config['std'], num_workers=args.workers, pin_memory=args.pin_mem,
                  device=device)
    loader = source.eval_loader(data_config['input_size'][-1], args.batch_size, data_config['crop_pct'],
                                data_config['interpolation'], loader, class_map=class_map, num_classes=len(class_names))
    progress = partial(tqdm, desc=os.path.basename(checkpoint) or settings['model'], unit='batch',
                       disable=None)  # no bar when the output is not a terminal
    with logging_redirect_tqdm():
        metrics = evaluate(model, loader, autocast, args.channels_last, log_interval=0, progress=progress)
    return dict(model=settings['model'], checkpoint=checkpoint, top1=round(metrics['top1'], 4),
                top5=round(metrics['top5'], 4), loss=round(metrics['loss'], 6), num_images=metrics['num_images'],
                img_size=data_config['input_size'][-1],
                crop_pct=data_config['crop_pct'], param_count=sum(p.numel() for p in model.parameters()),
                images_per_s=round(metrics['images_per_s'], 2))


def run_directory(checkpoint):
    """The training run directory a checkpoint (file or directory) belongs to, or None."""
    folder = checkpoint if os.path.isdir(checkpoint) else os.path.dirname(checkpoint) or '.'
    return folder if os.path.isfile(os.path.join(folder, 'args.yaml')) else None


def save_rows(path, rows):
    """A CSV of the rows, or JSON: one checkpoint's row as an object, several as a list."""
    write_results(path, rows[0] if len(rows) == 1 and path.endswith('.json') else rows)


def main(argv=None):
    setup_logging()
    args = parse_args(argv)
    run_dir = run_directory(args.checkpoint) if args.checkpoint else None
    log_file = args.log_file or (run_dir and os.path.join(run_dir, 'validate.log'))
    if log_file:
        log_to_file(log_file)
    check_results_file(args.results_file, ('.csv', '.json'))
    checkpoints = checkpoints_in(args.checkpoint) if args.checkpoint and os.path.isdir(args.checkpoint) else \
        [args.checkpoint]
    check_outputs(reads=[('the checkpoint', path) for path in checkpoints],
                  writes=[('--results-file', args.results_file, None)])
    device = select_device(args.device)
    autocast = resolve_amp(args, device, training=False).autocast
    source = open_split(args.dataset, args.data, args.split)
    failed = []
    if args.checkpoint and os.path.isdir(args.checkpoint):
        rows = []
        for ckpt in checkpoints:
            try:
                rows.append(validate_one(args, ckpt, source, device, autocast))
            except CheckpointError as e:  # the others are still evaluated
                _logger.error('%s', e)
                failed.append((ckpt, str(e)))
        if not rows:
            raise CheckpointError(f'no checkpoint in {args.checkpoint} could be evaluated')
        rows.sort(key=lambda r: r['top1'], reverse=True)
        save_rows(args.results_file or os.path.join(args.checkpoint, 'validation_results.csv'), rows)
    else:
        rows = [validate_one(args, args.checkpoint, source, device, autocast)]
        if args.results_file:
            save_rows(args.results_file, rows)
    for r in rows:
        _logger.info(f"{r['checkpoint'] or r['model']}: top1 {r['top1']:.3f}  top5 {r['top5']:.3f}  loss {r['loss']:.4f}  "
                     f"on {r['num_images']} images ({r['img_size']} px, crop {r['crop_pct']}, {r['param_count']:,} "
                     f"params, {r['images_per_s']:.1f} img/s)")
    for ckpt, reason in failed:
        _logger.error('not evaluated: %s (%s)', ckpt, reason)
    if failed:
        raise PartialFailure(f'{len(failed)} of {len(failed) + len(rows)} checkpoints could not be evaluated')
    return rows


def cli(argv=None):
    run_cli(main, argv, (UsageError, DataError, CheckpointError, DiskFullError), _logger)


if __name__ == '__main__':
    cli()
