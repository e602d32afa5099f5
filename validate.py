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
import csv
import glob
import json
import logging
import os
import sys
from contextlib import nullcontext
from functools import partial

import timm
import torch
from timm.data import resolve_data_config
from torchvision.datasets.folder import find_classes
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import models  # noqa: F401  (registers this repo's models with timm)
from models import numerics_kwargs
from data import (DataError, ShardSplit, create_eval_loader, create_shard_eval_loader, eval_class_indices,
                  eval_transform, find_shard_split, find_split, hf_class_names, hf_dataset, shard_class_map,
                  wrap_loader)
from utils import CheckpointError, checkpoint_num_classes, load_pretrained_weights, read_checkpoint
from utils.config import dataset_type, non_negative_int, positive_int
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
    p.add_argument('--model', '-m', default=None, help="default: the checkpoint's training model, else volo_d1")
    p.add_argument('--checkpoint', default='', help='checkpoint file, or a directory: evaluate each checkpoint in it')
    p.add_argument('--pretrained', action='store_true', help="the model's released weights (no --checkpoint)")
    p.add_argument('--img-size', type=positive_int, default=None,
                   help="evaluation resolution (default: the checkpoint's training size, else the model's)")
    p.add_argument('--crop-pct', type=float, default=None,
                   help="default: the checkpoint's training crop, else the model config's for this resolution")
    p.add_argument('--interpolation', default='', help='resize interpolation (default: the model\'s, bicubic)')
    p.add_argument('--mean', type=float, nargs='+', default=None)
    p.add_argument('--std', type=float, nargs='+', default=None)
    p.add_argument('-b', '--batch-size', type=positive_int, default=128)
    p.add_argument('-j', '--workers', type=non_negative_int, default=4)
    p.add_argument('--num-classes', type=positive_int, default=None, help='default: the checkpoint\'s head size')
    p.add_argument('--use-ema', action='store_true', help='evaluate the EMA weights of a training checkpoint')
    p.add_argument('--allow-non-finite', action='store_true', help='load weights holding NaN or Inf anyway')
    p.add_argument('--amp', action='store_true', help='mixed precision (torch.amp)')
    p.add_argument('--apex-amp', action='store_true', help='accepted for the original command lines: native AMP')
    p.add_argument('--native-amp', action='store_true', help='same as --amp')
    p.add_argument('--amp-dtype', default='float16', choices=['float16', 'bfloat16'])
    p.add_argument('--channels-last', action='store_true')
    p.add_argument('--no-test-pool', action='store_true',
                   help='accepted for the original command lines; no test-time pooling is ever applied')
    p.add_argument('--results-file', default='', help='write results here: .csv or .json')
    p.add_argument('--log-file', default='',
                   help="append the log here (default: validate.log in the checkpoint's run directory)")
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--pin-mem', action='store_true')
    return p.parse_args(argv)


def checkpoints_in(path):
    files = sorted(glob.glob(os.path.join(path, '*.pth.tar')) + glob.glob(os.path.join(path, '*.pth')))
    files = [f for f in files if not os.path.basename(f).startswith(('tmp', 'recovery'))]
    if not files:
        raise CheckpointError(f'no checkpoints (*.pth.tar, *.pth) in directory {path}')
    return files


def autocast_for(args):
    if not (args.amp or args.native_amp or args.apex_amp):
        return nullcontext
    device_type = torch.device(args.device).type
    if args.apex_amp:
        _logger.info('--apex-amp: evaluating with native torch.amp')
    dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' or device_type == 'cpu' else torch.float16
    return partial(torch.autocast, device_type=device_type, dtype=dtype)


# Settings a training checkpoint knows: (validate.py argument, training argument)
FROM_TRAINING = (('model', 'model'), ('img_size', 'img_size'), ('num_classes', 'num_classes'), ('crop_pct', 'crop_pct'))


def resolve_settings(args, train_args, head_classes, source):
    """model, img_size, num_classes and crop_pct: the command line's, else the checkpoint's
    training arguments (and head size), else the defaults. Says where each came from."""
    train_args = dict(train_args or {})
    if train_args.get('img_size') is None and train_args.get('input_size'):
        train_args['img_size'] = train_args['input_size'][-1]
    if head_classes is not None:
        train_args['num_classes'] = head_classes
    settings, taken, overridden = {}, [], []
    for ours, theirs in FROM_TRAINING:
        given, trained = getattr(args, ours), train_args.get(theirs)
        settings[ours] = given if given is not None else trained
        if given is None and trained is not None:
            taken.append(f'{ours}={trained}')
        elif given is not None and trained is not None and given != trained and ours != 'num_classes':
            overridden.append(f'--{ours.replace("_", "-")} {given} (trained with {trained})')
    if settings['num_classes'] is not None and args.num_classes is not None and head_classes is not None \
            and args.num_classes != head_classes:
        raise CheckpointError(f'{source} has a {head_classes}-class head but --num-classes is {args.num_classes}')
    settings['model'] = settings['model'] or 'volo_d1'
    if taken:
        _logger.info('%s: %s from the checkpoint (give --model/--img-size/--num-classes/--crop-pct to override)',
                     source, ', '.join(taken))
    if overridden:
        _logger.info('%s: the command line overrides the checkpoint: %s', source, '; '.join(overridden))
    return settings


def find_eval_data(args):
    """The split to evaluate: a folder, a ShardSplit or a timm dataset (hfds)."""
    if args.dataset == 'wds':
        return find_shard_split(args.data, args.split)
    if args.dataset.startswith('hfds/'):
        return hf_dataset(args.dataset, args.data, args.split)
    return find_split(args.data, args.split)


def class_list(args, root, contents):
    """The classes the model was trained on, in index order: the checkpoint's record, else the
    training split beside the validation folder, else the validation folder's own (shards and
    Hugging Face datasets: their own list)."""
    if contents is not None and contents.class_names:
        return contents.class_names, 'the checkpoint'
    if isinstance(root, ShardSplit):
        if root.class_names is None:
            if args.num_classes is None:
                raise DataError(f'{root.where}: the shards have no index.json naming their classes; give --num-classes')
            return [str(i) for i in range(args.num_classes)], '--num-classes'
        return root.class_names, root.where
    if not isinstance(root, str):
        return hf_class_names(root), args.dataset
    train_root = os.path.join(args.data, 'train')
    if os.path.normpath(root) != os.path.normpath(args.data) and os.path.isdir(train_root):
        return find_classes(train_root)[0], train_root
    return find_classes(root)[0], root


def validate_one(args, checkpoint, root):
    train_args, head_classes, contents = None, None, None
    if checkpoint:
        contents = read_checkpoint(checkpoint, use_ema=args.use_ema)
        train_args, head_classes = contents.train_args, checkpoint_num_classes(contents.state_dict)
    class_names, classes_from = class_list(args, root, contents)
    if isinstance(root, ShardSplit):
        class_to_idx = shard_class_map(root, class_names)  # before any compute
    elif isinstance(root, str):
        class_to_idx = eval_class_indices(root, class_names)
    elif hf_class_names(root) != list(class_names)[:len(root.reader.class_to_idx)]:
        raise DataError(f'--dataset {args.dataset}: its classes differ from those {classes_from} lists')
    if head_classes is not None and len(class_names) > head_classes:
        raise CheckpointError(f'{checkpoint or args.model} has a {head_classes}-class head, but {classes_from} '
                              f'lists {len(class_names)} classes')
    settings = resolve_settings(args, train_args, head_classes, checkpoint or '--pretrained')
    kwargs = {k: settings[k] for k in ('num_classes', 'img_size') if settings[k] is not None}
    if contents is not None and contents.numerics:
        try:
            kwargs.update(numerics_kwargs(settings['model'], contents.numerics))
        except ValueError as e:
            raise CheckpointError(f'{contents.path}: {e}') from None
        _logger.info('%s holds %s weights: the model is built with their numerics (%s)', contents.path,
                     contents.numerics, ', '.join(f'{k}={getattr(v, "keywords", v)}' for k, v in
                                                  numerics_kwargs(settings['model'], contents.numerics).items()))
    try:
        model = timm.create_model(settings['model'], pretrained=args.pretrained and not checkpoint, **kwargs)
    except RuntimeError as e:
        raise CheckpointError(f'--model {settings["model"]}: {e}') from None
    except (ValueError, TypeError) as e:
        raise CheckpointError(f'cannot build --model {settings["model"]} with {kwargs}: {e}') from None
    if checkpoint:
        load_pretrained_weights(model, contents.path, strict=True, state_dict=contents.state_dict,
                                allow_non_finite=args.allow_non_finite)
        del contents
    data_config = resolve_data_config(dict(vars(args), crop_pct=settings['crop_pct']), model=model)
    model = model.to(args.device).eval()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    common = dict(crop_pct=data_config['crop_pct'], interpolation=data_config['interpolation'], mean=data_config['mean'],
                  std=data_config['std'], num_workers=args.workers, pin_memory=args.pin_mem, device=args.device)
    img_size = data_config['input_size'][-1]
    if isinstance(root, ShardSplit):
        loader = create_shard_eval_loader(root, img_size, args.batch_size, num_classes=len(class_names),
                                          class_map=class_to_idx, **common)
    elif isinstance(root, str):
        loader = create_eval_loader(root, img_size, args.batch_size, class_to_idx=class_to_idx, **common)
    else:
        root.transform = eval_transform(img_size, common.pop('crop_pct'), common.pop('interpolation'))
        loader = wrap_loader(root, args.batch_size, is_training=False, **common)
    progress = partial(tqdm, desc=os.path.basename(checkpoint) or settings['model'], unit='batch',
                       disable=None)  # no bar when the output is not a terminal
    with logging_redirect_tqdm():
        metrics = evaluate(model, loader, autocast_for(args), args.channels_last, log_interval=0, progress=progress)
    return dict(model=settings['model'], checkpoint=checkpoint, top1=round(metrics['top1'], 4),
                top5=round(metrics['top5'], 4), loss=round(metrics['loss'], 6), img_size=data_config['input_size'][-1],
                crop_pct=data_config['crop_pct'], param_count=sum(p.numel() for p in model.parameters()),
                images_per_s=round(metrics['images_per_s'], 2))


def run_directory(checkpoint):
    """The training run directory a checkpoint (file or directory) belongs to, or None."""
    folder = checkpoint if os.path.isdir(checkpoint) else os.path.dirname(checkpoint) or '.'
    return folder if os.path.isfile(os.path.join(folder, 'args.yaml')) else None


def write_results(rows, path):
    if path.endswith('.json'):
        with open(path, 'w') as f:
            json.dump(rows[0] if len(rows) == 1 else rows, f, indent=2)
    else:
        with open(path, 'w', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    _logger.info('results written to %s', path)


def main(argv=None):
    setup_logging()
    args = parse_args(argv)
    run_dir = run_directory(args.checkpoint) if args.checkpoint else None
    log_file = args.log_file or (run_dir and os.path.join(run_dir, 'validate.log'))
    if log_file:
        log_to_file(log_file)
    if args.results_file and not args.results_file.endswith(('.csv', '.json')):
        raise CheckpointError(f'--results-file {args.results_file}: use a .csv or .json name')
    if args.results_file and not os.path.isdir(os.path.dirname(os.path.abspath(args.results_file))):
        raise CheckpointError(f'--results-file {args.results_file}: folder '
                              f'{os.path.dirname(os.path.abspath(args.results_file))} does not exist')
    root = find_eval_data(args)
    failed = []
    if args.checkpoint and os.path.isdir(args.checkpoint):
        rows = []
        for ckpt in checkpoints_in(args.checkpoint):
            try:
                rows.append(validate_one(args, ckpt, root))
            except CheckpointError as e:  # the others are still evaluated
                _logger.error('%s', e)
                failed.append((ckpt, str(e)))
        if not rows:
            raise CheckpointError(f'no checkpoint in {args.checkpoint} could be evaluated')
        rows.sort(key=lambda r: r['top1'], reverse=True)
        write_results(rows, args.results_file or os.path.join(args.checkpoint, 'validation_results.csv'))
    else:
        rows = [validate_one(args, args.checkpoint, root)]
        if args.results_file:
            write_results(rows, args.results_file)
    for r in rows:
        _logger.info(f"{r['checkpoint'] or r['model']}: top1 {r['top1']:.3f}  top5 {r['top5']:.3f}  loss {r['loss']:.4f}  "
              f"({r['img_size']} px, crop {r['crop_pct']}, {r['param_count']:,} params, {r['images_per_s']:.1f} img/s)")
    for ckpt, reason in failed:
        _logger.error('not evaluated: %s (%s)', ckpt, reason)
    if failed:
        raise PartialFailure(f'{len(failed)} of {len(failed) + len(rows)} checkpoints could not be evaluated')
    return rows


class PartialFailure(RuntimeError):
    """Some checkpoints of a directory were evaluated, others could not be."""


def cli(argv=None):
    try:
        return main(argv)
    except (DataError, CheckpointError) as e:
        _logger.error('%s', e)
        sys.exit(2)
    except PartialFailure as e:
        _logger.error('%s', e)
        sys.exit(1)
    except KeyboardInterrupt:
        _logger.error('interrupted')
        sys.exit(130)


if __name__ == '__main__':
    cli()
