#!/usr/bin/env python3
"""Train a UperNet segmentor on a VOLO or Visformer backbone, in iterations (mmseg's recipe).

    ./distributed_train.sh 8 --script train_seg.py /data/ADEChallengeData2016 \
        -c configs/seg/upernet_volo_d1_ade20k_512.yaml --pretrained d1_224_84.2.pth.tar
    python train_seg.py /data/cityscapes -c configs/seg/upernet_volo_d4_cityscapes_1024.yaml --pretrained d4.pth.tar
    python train_seg.py /data/mine --dataset folder --model volo_d1 --crop-size 512 512 --iters 20000

AdamW, poly decay (power 1.0) after a linear warmup, per-process batch 2, decode loss + 0.4 x
auxiliary loss, evaluation every --eval-interval iterations with the best-mIoU checkpoint kept as
model_best.pth.tar. Outputs go to <output>/train_seg/<time>-<model>-<dataset>-<crop>/.
"""
import argparse
import glob
import json
import logging
import math
import os
import random
import time
from collections import OrderedDict
from contextlib import nullcontext
from datetime import datetime

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import yaml
from timm.utils import dispatch_clip_grad, get_outdir
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from data import DATASET_KINDS, TEST_SCALES, DataError, SegEvalTransform, SegTrainTransform, build_seg_dataset
from loss import SegmentationLoss
from models.segmentation import SEGMENTATION_BACKBONES, build_segmentor, size_divisor
from utils import CheckpointError, load_pretrained_weights, resolve_checkpoint_path, resume_checkpoint, safe_load
from utils.checkpoint_saver import CheckpointSaver, DiskFullError
from utils.cli import NonFiniteLoss, UsageError, run_cli
from utils.config import ConfigError, non_negative_int, positive_int, read_config_defaults
from utils.log import log_to_file, setup_logging
from utils.runs import ResumeError, RunLock, find_resume_checkpoint, promote
from utils.runtime import DeviceError, init_distributed, native_amp
from utils.seg_inference import check_window, evaluate_segmentation
from utils.seg_metrics import SegmentationMetric, format_table
from utils.summary import write_summary

_logger = logging.getLogger('train_seg')

# arguments a resumed command may change: they extend or re-host the run
EXTENDS_RUN = frozenset({'resume', 'iters', 'output', 'workers', 'log_interval', 'device', 'local_rank', 'config',
                         'eval_interval', 'checkpoint_interval', 'checkpoint_hist'})
DEFAULT_SCALES = {'ade20k': (2048, 512), 'cityscapes': (2048, 1024)}


def get_parsers():
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument('-c', '--config', default='', metavar='FILE')
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('-c', '--config', default='', metavar='FILE',
                   help='YAML file of argument defaults (configs/seg/); the command line overrides it')
    p.add_argument('data_dir', metavar='DIR', help='dataset root in the layout of --dataset')
    p.add_argument('--dataset', default='ade20k', choices=DATASET_KINDS)
    p.add_argument('--model', default='volo_d1', choices=SEGMENTATION_BACKBONES, help='backbone')
    p.add_argument('--pretrained', default='', metavar='FILE',
                   help='classification checkpoint (release file or training run) that initialises the backbone')
    p.add_argument('--resume', default='', metavar='PATH',
                   help="checkpoint to continue, or 'auto': the newest complete one of a matching run under --output")
    p.add_argument('--crop-size', type=positive_int, nargs=2, default=(512, 512), metavar=('H', 'W'))
    p.add_argument('--scale', type=positive_int, nargs=2, default=None, metavar=('LONG', 'SHORT'),
                   help='random-resize base scale (x 0.5-2.0); default: ade20k 2048 512, cityscapes 2048 1024, '
                        'folder: 4x the crop')
    p.add_argument('--ratio-range', type=float, nargs=2, default=(0.5, 2.0))
    p.add_argument('--cat-max-ratio', type=float, default=0.75)
    p.add_argument('--head-channels', type=positive_int, default=512, help="UPerHead's width")
    p.add_argument('--aux-channels', type=positive_int, default=256, help="auxiliary FCNHead's width")
    p.add_argument('--aux-weight', type=float, default=0.4)
    p.add_argument('--drop-path', type=float, default=0.1, help='backbone stochastic depth')
    p.add_argument('-b', '--batch-size', type=positive_int, default=2, help='per-process batch size')
    p.add_argument('--iters', type=positive_int, default=160000)
    p.add_argument('--lr', type=float, default=6e-5)
    p.add_argument('--min-lr', type=float, default=0.)
    p.add_argument('--weight-decay', type=float, default=0.01)
    p.add_argument('--betas', type=float, nargs=2, default=(0.9, 0.999))
    p.add_argument('--power', type=float, default=1.0, help='poly decay power')
    p.add_argument('--warmup-iters', type=non_negative_int, default=1500)
    p.add_argument('--warmup-ratio', type=float, default=1e-6, help='warmup starts at lr x this')
    p.add_argument('--backbone-lr-mult', type=float, default=1.0, help="the backbone's lr is lr x this")
    p.add_argument('--clip-grad', type=float, default=None, help='gradient norm clipping')
    p.add_argument('--amp', action='store_true', help='mixed precision (torch.amp)')
    p.add_argument('--amp-dtype', default='float16', choices=('float16', 'bfloat16'))
    p.add_argument('--no-sync-bn', dest='sync_bn', action='store_false',
                   help='keep per-process BatchNorm statistics on several GPUs (default: SyncBatchNorm)')
    p.add_argument('--eval-interval', type=non_negative_int, default=16000, help='0: evaluate only at the end')
    p.add_argument('--checkpoint-interval', type=non_negative_int, default=None,
                   help='save last.pth.tar this often (default: --eval-interval)')
    p.add_argument('--checkpoint-hist', type=non_negative_int, default=1, help='best checkpoints kept besides last/best')
    p.add_argument('--eval-mode', default='slide', choices=('whole', 'slide'))
    p.add_argument('--eval-stride', type=positive_int, nargs=2, default=None, metavar=('H', 'W'),
                   help='sliding-window stride (default: 2/3 of the crop, as 341 for 512)')
    p.add_argument('--test-scale', type=positive_int, nargs=2, default=None, metavar=('LONG', 'SHORT'),
                   help="evaluation resize (default: the dataset's standard one; folder: none)")
    p.add_argument('--output', default='./output')
    p.add_argument('-j', '--workers', type=non_negative_int, default=4)
    p.add_argument('--log-interval', type=positive_int, default=50)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--device', default=None, help="'cuda' or 'cpu' (default: CUDA when present)")
    p.add_argument('--local_rank', '--local-rank', type=int, default=0, help=argparse.SUPPRESS)
    return config_parser, p


def parse_args(argv=None):
    config_parser, parser = get_parsers()
    args_config, remaining = config_parser.parse_known_args(argv)
    if args_config.config:
        try:
            parser.set_defaults(**read_config_defaults(parser, args_config.config))
        except ConfigError as e:
            parser.error(str(e))
    args = parser.parse_args(remaining)
    args.config = args_config.config
    for name in ('crop_size', 'scale', 'ratio_range', 'betas', 'eval_stride', 'test_scale'):
        if getattr(args, name) is not None:
            setattr(args, name, list(getattr(args, name)))
    if args.checkpoint_interval is None:
        args.checkpoint_interval = args.eval_interval
    if args.eval_stride is None:
        args.eval_stride = [max(1, math.ceil(c * 2 / 3)) for c in args.crop_size]
    if args.scale is None:
        args.scale = list(DEFAULT_SCALES.get(args.dataset, (4 * max(args.crop_size), 4 * min(args.crop_size))))
    if not 0 < args.ratio_range[0] <= args.ratio_range[1]:
        parser.error(f'--ratio-range {args.ratio_range}: needs 0 < low <= high')
    if args.warmup_iters >= args.iters:  # the recipe's 1500 in a short run: no warmup, as main.py does
        _logger.warning('--warmup-iters %d is not shorter than --iters %d: no warmup', args.warmup_iters, args.iters)
        args.warmup_iters = 0
    return args


def poly_lr(iteration, args):
    """mmseg's poly schedule with linear warmup: (lr - min) x (1 - it / iters) ** power + min, times
    1 - (1 - it / warmup) x (1 - warmup_ratio) during the warmup."""
    lr = (args.lr - args.min_lr) * (1 - iteration / args.iters) ** args.power + args.min_lr
    if iteration < args.warmup_iters:
        lr *= 1 - (1 - iteration / args.warmup_iters) * (1 - args.warmup_ratio)
    return lr


def param_groups(model, args):
    """AdamW groups: backbone (lr x --backbone-lr-mult) and the rest; no weight decay on biases,
    norms and the backbone's position embeddings / class token."""
    no_decay_names = {f'backbone.{n}' for n in getattr(model.backbone, 'no_weight_decay', lambda: ())()}
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        backbone = name.startswith('backbone.')
        decay = not (param.ndim <= 1 or name in no_decay_names)
        key = (backbone, decay)
        if key not in groups:
            groups[key] = {'params': [], 'weight_decay': args.weight_decay if decay else 0.,
                           'lr_mult': args.backbone_lr_mult if backbone else 1.0}
        groups[key]['params'].append(param)
    return list(groups.values())


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group['lr'] = lr * group['lr_mult']


def build_loaders(args, rank, world_size):
    train_tf = SegTrainTransform(args.crop_size, args.scale, args.ratio_range, args.cat_max_ratio)
    train_set = build_seg_dataset(args.dataset, args.data_dir, 'train', train_tf)
    if len(train_set) // world_size < args.batch_size:
        raise UsageError(f'-b {args.batch_size} is larger than the {len(train_set) // world_size} training images '
                         f'per process: no full batch')
    test_scale = args.test_scale or TEST_SCALES[args.dataset]
    try:
        val_set = build_seg_dataset(args.dataset, args.data_dir, 'val', SegEvalTransform(test_scale))
    except DataError as e:
        _logger.warning('no evaluation during training: %s', e)
        val_set = None
    if val_set is not None and val_set.num_classes != train_set.num_classes:
        raise DataError(f'the val split has {val_set.num_classes} classes, the train split {train_set.num_classes}')
    sampler = DistributedSampler(train_set, world_size, rank, shuffle=True, seed=args.seed) if world_size > 1 else None
    loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=sampler is None, sampler=sampler,
                        num_workers=args.workers, pin_memory=torch.cuda.is_available(), drop_last=True,
                        persistent_workers=args.workers > 0)
    return loader, val_set


def batches(loader):
    """Batches forever, a new shuffle every pass."""
    epoch = 0
    while True:
        if isinstance(loader.sampler, DistributedSampler):
            loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def evaluate(model, val_set, args, device, autocast, rank, world_size):
    metric = SegmentationMetric(val_set.num_classes, class_names=val_set.class_names)
    evaluate_segmentation(model, val_set, device, metric, mode=args.eval_mode, crop_size=args.crop_size,
                          stride=args.eval_stride, autocast=autocast, workers=min(args.workers, 2),
                          indices=range(rank, len(val_set), world_size), progress=rank == 0)
    metric.all_reduce()
    return metric.compute()


def main(argv=None):
    setup_logging()
    args = parse_args(argv)
    try:
        device, rank, world_size = init_distributed(args.device, args.local_rank)
    except DeviceError as e:
        raise UsageError(str(e)) from None
    distributed = world_size > 1
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)

    resumed = None
    if args.resume == 'auto':
        found = find_resume_checkpoint(args.output, vars(args), kind='train_seg', extends=EXTENDS_RUN)
        if found is None:
            args.resume = ''
            _logger.info('--resume auto: no run with a checkpoint under %s, starting fresh', args.output)
        else:
            args.resume, resumed = promote(found.path), found.checkpoint
            _logger.info('--resume auto: %s (iteration %d)', args.resume, resumed['epoch'])

    try:
        check_window(tuple(args.crop_size), tuple(args.eval_stride), size_divisor(args.model))
    except ValueError as e:
        raise UsageError(f'--crop-size / --eval-stride: {e}') from None
    if args.batch_size < 2 and not (distributed and args.sync_bn and device.type == 'cuda'):
        raise UsageError('-b 1: the 1x1 pyramid-pooling level of UPerHead has one value per channel, and BatchNorm '
                         'needs at least 2 samples per batch to train (SyncBatchNorm over several GPUs pools them); '
                         'use -b 2 or more')
    loader, val_set = build_loaders(args, rank, world_size)
    train_set = loader.dataset
    args.num_classes = train_set.num_classes
    model = build_segmentor(args.model, args.num_classes, img_size=tuple(args.crop_size),
                            head_channels=args.head_channels, aux_channels=args.aux_channels,
                            drop_path_rate=args.drop_path)
    if args.pretrained and not args.resume:
        load_pretrained_weights(model.backbone, args.pretrained)
        _logger.info('Backbone initialised from %s', args.pretrained)
    if rank == 0:
        _logger.info('Segmentor %s + UPerHead: %d parameters, %d classes (%s), crop %dx%d', args.model,
                     sum(p.numel() for p in model.parameters()), args.num_classes, args.dataset, *args.crop_size)
    model.to(device)
    if distributed and args.sync_bn:
        if device.type == 'cuda':
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            _logger.warning('SyncBatchNorm needs CUDA: on CPU every process keeps its own BatchNorm statistics')
    optimizer = torch.optim.AdamW(param_groups(model, args), lr=args.lr, betas=tuple(args.betas))
    autocast, loss_scaler = native_amp(device, args.amp_dtype) if args.amp else (nullcontext, None)

    start_iter = 0
    if args.resume:
        resume_path = resolve_checkpoint_path(args.resume)
        if resumed is None:
            resumed = safe_load(resume_path)
        resume_checkpoint(model, resume_path, optimizer=optimizer, loss_scaler=loss_scaler, checkpoint=resumed)
        start_iter = int(resumed['epoch'])
        _logger.info('Resumed %s: continuing at iteration %d', resume_path, start_iter)
        if start_iter >= args.iters:
            raise UsageError(f'nothing to train: the run is at iteration {start_iter} of --iters {args.iters}; '
                             f'raise --iters to continue it')
    train_model = model
    if distributed:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None)

    saver, run_dir, summary_path = None, '', ''
    if rank == 0:
        if args.resume and os.path.isfile(os.path.join(os.path.dirname(resume_path), 'args.yaml')):
            run_dir = os.path.dirname(resume_path)
        else:
            name = '-'.join([datetime.now().strftime('%Y%m%d-%H%M%S'), args.model, args.dataset,
                             'x'.join(map(str, args.crop_size))])
            run_dir = get_outdir(args.output, 'train_seg', name, inc=True)
        lock = RunLock(run_dir)  # noqa: F841  (held until the process ends)
        log_to_file(os.path.join(run_dir, 'train.log'))
        for stale in glob.glob(os.path.join(run_dir, '*.partial')):
            os.remove(stale)
        saver = CheckpointSaver(model, optimizer, args=argparse.Namespace(**vars(args)), checkpoint_dir=run_dir,
                                amp_scaler=loss_scaler, max_history=args.checkpoint_hist,
                                extra={'class_names': train_set.class_names, 'task': 'segmentation'})
        summary_path = os.path.join(run_dir, 'summary.csv')
        if args.resume and run_dir == os.path.dirname(resume_path):
            saver.restore(resumed)
            write_summary(summary_path, [r for r in saver.summary_rows if int(r['epoch']) <= start_iter])
        with open(os.path.join(run_dir, 'args.yaml'), 'w') as f:
            f.write(yaml.safe_dump(vars(args), default_flow_style=False))
        _logger.info('Output: %s; iterations %d to %d', run_dir, start_iter, args.iters)
    del resumed

    loss_fn = SegmentationLoss(aux_weight=args.aux_weight)
    data = batches(loader)
    train_model.train()
    running, window_start = [], time.perf_counter()
    progress = tqdm(total=args.iters, initial=start_iter, desc='train', disable=None if rank == 0 else True)
    try:
        for iteration in range(start_iter, args.iters):
            lr = poly_lr(iteration, args)
            set_lr(optimizer, lr)
            images, labels, _ = next(data)
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with autocast():
                loss, parts = loss_fn(train_model(images), labels)
            if not torch.isfinite(loss):
                raise NonFiniteLoss(f'loss is {loss.item()} at iteration {iteration}; the checkpoints so far are '
                                    f'kept (lower --lr, or leave --amp off)')
            optimizer.zero_grad(set_to_none=True)
            if loss_scaler is not None:
                loss_scaler(loss, optimizer, clip_grad=args.clip_grad, parameters=model.parameters())
            else:
                loss.backward()
                if args.clip_grad:
                    dispatch_clip_grad(model.parameters(), args.clip_grad)
                optimizer.step()
            running.append(float(loss.detach()))
            done = iteration + 1
            progress.update(1)
            if rank == 0 and (done % args.log_interval == 0 or done == args.iters):
                per_iter = (time.perf_counter() - window_start) / len(running)
                _logger.info('iter %d/%d  loss %.4f (decode %.4f%s)  lr %.3e  %.3f s/iter  eta %s', done, args.iters,
                             sum(running) / len(running), float(parts['decode']),
                             f', aux {float(parts["aux"]):.4f}' if 'aux' in parts else '', lr, per_iter,
                             time.strftime('%H:%M:%S', time.gmtime(per_iter * (args.iters - done))))
            evaluate_now = val_set is not None and (done == args.iters or (
                args.eval_interval and done % args.eval_interval == 0))
            save_now = done == args.iters or evaluate_now or (
                args.checkpoint_interval and done % args.checkpoint_interval == 0)
            if not save_now:
                continue
            results = evaluate(model, val_set, args, device, autocast, rank, world_size) if evaluate_now else None
            if rank == 0:
                row = OrderedDict(epoch=done, train_loss=round(sum(running) / max(len(running), 1), 6), lr=lr)
                if results is not None:
                    row.update(eval_mIoU=results['mIoU'], eval_mAcc=results['mAcc'], eval_aAcc=results['aAcc'])
                    _logger.info('Evaluation at iteration %d (%d images, %s):\n%s', done, len(val_set),
                                 args.eval_mode, format_table(results))
                best, best_iter = saver.save_checkpoint(done, metric=None if results is None else results['mIoU'],
                                                        summary_row=row)
                write_summary(summary_path, saver.summary_rows)
                if best is not None:
                    _logger.info('Best mIoU so far: %.2f (iteration %d)', best, best_iter)
            running, window_start = [], time.perf_counter()
            train_model.train()
    finally:
        progress.close()
    if rank == 0 and saver.best_metric is not None:
        _logger.info('*** Best mIoU: %.2f (iteration %d)', saver.best_metric, saver.best_epoch)
        with open(os.path.join(run_dir, 'best.json'), 'w') as f:
            json.dump({'mIoU': saver.best_metric, 'iteration': saver.best_epoch}, f)
    if distributed:
        dist.destroy_process_group()
    return run_dir


def cli(argv=None):
    run_cli(main, argv, (UsageError, DataError, CheckpointError, NonFiniteLoss, ResumeError, DiskFullError), _logger,
            'interrupted: the checkpoints written so far are kept; continue with --resume auto')


if __name__ == '__main__':
    cli()
