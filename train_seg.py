#!/usr/bin/env python3
"""Train a UperNet segmentor on a VOLO or Visformer backbone, in iterations (mmseg's recipe).

    ./distributed_train.sh 8 --script train_seg.py /data/ADEChallengeData2016 \
        -c configs/seg/upernet_volo_d1_ade20k_512.yaml --backbone-checkpoint d1_224_84.2.pth.tar
    python train_seg.py /data/cityscapes -c configs/seg/upernet_volo_d4_cityscapes_1024.yaml \
        --backbone-checkpoint d4.pth.tar
    python train_seg.py /data/mine --dataset seg-folder --model volo_d1 --crop-size 512 512 --iters 20000

AdamW, poly decay (power 1.0) after a linear warmup, per-process batch 2, decode loss + 0.4 x
auxiliary loss, evaluation every --eval-interval iterations with the best-mIoU checkpoint kept as
model_best.pth.tar. Outputs go to <output>/train_seg/<time>-<model>-<dataset>-<crop>/; the run's
scaffold (resume, checkpoints, summary, tracking, mixed precision, torchrun) is engine/'s.
"""
import argparse
import logging
import time
from collections import OrderedDict
from datetime import datetime

import torch
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from data import (DATASET_KINDS, TEST_SCALES, DataError, SegEvalTransform, SegTrainTransform, build_seg_dataset,
                  seg_dataset_kind, seg_dataset_type)
from engine import (RunDirectory, TrainingStep, UpdateSchedule, add_renamed, add_training_options, distributed_model,
                    enable_grad_checkpointing, extends_run, find_resume, parse_with_config, resume_training,
                    run_trainer, setup_runtime, sync_batchnorm)
from loss import SegmentationLoss
from models import check_img_size
from models.segmentation import SEGMENTATION_BACKBONES, build_segmentor, size_divisor
from utils import load_pretrained_weights
from utils.cli import UsageError
from utils.config import non_negative_int, positive_int
from utils.log import setup_logging
from utils.seg_inference import check_window, default_stride, evaluate_segmentation
from utils.seg_metrics import SegmentationMetric, format_table

_logger = logging.getLogger('train_seg')

DEFAULT_SCALES = {'ade20k': (2048, 512), 'cityscapes': (2048, 1024)}


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_options(p, output='./output', seed=0, log_interval=50, workers=4)
    p.add_argument('data_dir', metavar='DIR', help='dataset root in the layout of --dataset')
    p.add_argument('--dataset', default='ade20k', type=seg_dataset_type, choices=DATASET_KINDS)
    p.add_argument('--model', default='volo_d1', choices=SEGMENTATION_BACKBONES, help='backbone')
    backbone = p.add_argument('--backbone-checkpoint', default='', metavar='FILE',
                              help='classification checkpoint (release file or training run) that initialises the '
                                   'backbone')
    add_renamed(p, '--pretrained', backbone)
    p.add_argument('--crop-size', type=positive_int, nargs=2, default=(512, 512), metavar=('H', 'W'))
    img_scale = p.add_argument('--img-scale', type=positive_int, nargs=2, default=None, metavar=('LONG', 'SHORT'),
                               help='random-resize base scale (x --ratio-range); default: ade20k 2048 512, '
                                    'cityscapes 2048 1024, seg-folder: 4x the crop')
    add_renamed(p, '--scale', img_scale)
    p.add_argument('--ratio-range', type=float, nargs=2, default=(0.5, 2.0))
    p.add_argument('--cat-max-ratio', type=float, default=0.75)
    p.add_argument('--head-channels', type=positive_int, default=512, help="UPerHead's width")
    p.add_argument('--aux-channels', type=positive_int, default=256, help="auxiliary FCNHead's width")
    p.add_argument('--aux-weight', type=float, default=0.4)
    p.add_argument('--drop-path', type=float, default=0.1, help='backbone stochastic depth')
    p.add_argument('-b', '--batch-size', type=positive_int, default=2, help='per-process batch size')
    extends_run(p.add_argument('--iters', type=positive_int, default=160000))
    p.add_argument('--lr', type=float, default=6e-5)
    p.add_argument('--min-lr', type=float, default=0.)
    p.add_argument('--weight-decay', type=float, default=0.01)
    p.add_argument('--betas', type=float, nargs=2, default=(0.9, 0.999))
    p.add_argument('--power', type=float, default=1.0, help='poly decay power')
    p.add_argument('--warmup-iters', type=non_negative_int, default=1500)
    p.add_argument('--warmup-ratio', type=float, default=1e-6, help='warmup starts at lr x this')
    p.add_argument('--backbone-lr-mult', type=float, default=1.0, help="the backbone's lr is lr x this")
    p.add_argument('--clip-grad', type=float, default=None, help='gradient norm clipping')
    p.add_argument('--sync-bn', action=argparse.BooleanOptionalAction, default=True,
                   help='SyncBatchNorm across GPUs (default: on; --no-sync-bn keeps per-process statistics)')
    extends_run(p.add_argument('--eval-interval', type=non_negative_int, default=16000,
                               help='0: evaluate only at the end'))
    extends_run(p.add_argument('--checkpoint-interval', type=non_negative_int, default=None,
                               help='save last.pth.tar this often (default: --eval-interval)'))
    extends_run(p.add_argument('--checkpoint-hist', type=non_negative_int, default=1,
                               help='best checkpoints kept besides last/best'))
    p.add_argument('--eval-mode', default='slide', choices=('whole', 'slide'))
    p.add_argument('--eval-stride', type=positive_int, nargs=2, default=None, metavar=('H', 'W'),
                   help='sliding-window stride (default: 2/3 of the crop, as 341 for 512)')
    p.add_argument('--test-scale', type=positive_int, nargs=2, default=None, metavar=('LONG', 'SHORT'),
                   help="evaluation resize (default: the dataset's standard one; seg-folder: none)")
    return p


def parse_args(argv=None, parser=None):
    parser = parser or get_parser()
    args = parse_with_config(parser, argv)
    for name in ('crop_size', 'img_scale', 'ratio_range', 'betas', 'eval_stride', 'test_scale'):
        if getattr(args, name) is not None:
            setattr(args, name, list(getattr(args, name)))
    if args.checkpoint_interval is None:
        args.checkpoint_interval = args.eval_interval
    if args.eval_stride is None:
        args.eval_stride = list(default_stride(args.crop_size))
    if args.img_scale is None:
        args.img_scale = list(DEFAULT_SCALES.get(args.dataset, (4 * max(args.crop_size), 4 * min(args.crop_size))))
    if not 0 < args.ratio_range[0] <= args.ratio_range[1]:
        parser.error(f'--ratio-range {args.ratio_range}: needs 0 < low <= high')
    if args.warmup_iters >= args.iters:  # the recipe's 1500 in a short run: no warmup, as main.py does
        _logger.warning('--warmup-iters %d is not shorter than --iters %d: no warmup', args.warmup_iters, args.iters)
        args.warmup_iters = 0
    return args


def upgrade_run_args(saved):
    """The recorded arguments of a run started before the segmentation dataset kind 'folder' was
    named 'seg-folder' (renamed options are mapped by engine.find_resume)."""
    if 'dataset' in saved:
        saved = dict(saved, dataset=seg_dataset_kind(saved['dataset']))
    return saved


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


def build_loaders(args, rank, world_size):
    train_tf = SegTrainTransform(args.crop_size, args.img_scale, args.ratio_range, args.cat_max_ratio)
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


def evaluate(model, val_set, args, runtime):
    metric = SegmentationMetric(val_set.num_classes, class_names=val_set.class_names)
    evaluate_segmentation(model, val_set, runtime.device, metric, mode=args.eval_mode, crop_size=args.crop_size,
                          stride=args.eval_stride, autocast=runtime.amp.autocast, workers=min(args.workers, 2),
                          indices=range(runtime.rank, len(val_set), runtime.world_size), progress=runtime.is_main)
    metric.all_reduce()
    return metric.compute()


def main(argv=None):
    setup_logging()
    parser = get_parser()
    args = parse_args(argv, parser)
    runtime = setup_runtime(args)
    device = runtime.device
    resume = find_resume(args, parser, 'train_seg', upgrade=upgrade_run_args)
    try:
        check_img_size(args.crop_size, '--crop-size')
        check_window(tuple(args.crop_size), tuple(args.eval_stride), size_divisor(args.model))
    except ValueError as e:
        raise UsageError(f'--crop-size / --eval-stride: {e}') from None
    if args.batch_size < 2 and not (runtime.distributed and args.sync_bn and device.type == 'cuda'):
        raise UsageError('-b 1: the 1x1 pyramid-pooling level of UPerHead has one value per channel, and BatchNorm '
                         'needs at least 2 samples per batch to train (SyncBatchNorm over several GPUs pools them); '
                         'use -b 2 or more')
    loader, val_set = build_loaders(args, runtime.rank, runtime.world_size)
    train_set = loader.dataset
    args.num_classes = train_set.num_classes  # resolved: args.yaml records it
    model = build_segmentor(args.model, args.num_classes, img_size=tuple(args.crop_size),
                            head_channels=args.head_channels, aux_channels=args.aux_channels,
                            drop_path_rate=args.drop_path)
    if args.backbone_checkpoint and not resume:
        load_pretrained_weights(model.backbone, args.backbone_checkpoint)
        _logger.info('Backbone initialised from %s', args.backbone_checkpoint)
    if args.grad_checkpointing:
        enable_grad_checkpointing(model, args.model)
    if runtime.is_main:
        _logger.info('Segmentor %s + UPerHead: %d parameters, %d classes (%s), crop %dx%d', args.model,
                     sum(p.numel() for p in model.parameters()), args.num_classes, args.dataset, *args.crop_size)
    model.to(device)
    model = sync_batchnorm(model, runtime, args.sync_bn)
    optimizer = torch.optim.AdamW(param_groups(model, args), lr=args.lr, betas=tuple(args.betas))

    start_iter = resume_training(model, resume, optimizer, runtime, args.iters, 'iteration', '--iters') if resume else 0
    train_model = distributed_model(model, runtime)

    run = RunDirectory(args, runtime, 'train_seg', [datetime.now().strftime('%Y%m%d-%H%M%S'), args.model, args.dataset,
                                                     'x'.join(map(str, args.crop_size))],
                       model, optimizer, resume=resume, completed=start_iter, step_name='iteration',
                       max_history=args.checkpoint_hist,
                       extra={'class_names': train_set.class_names, 'task': 'segmentation'})
    if runtime.is_main:
        _logger.info('Output: %s; iterations %d to %d', run.path, start_iter, args.iters)
    del resume

    loss_fn = SegmentationLoss(aux_weight=args.aux_weight)
    schedule = UpdateSchedule(optimizer, lambda iteration: poly_lr(iteration, args), start=start_iter)
    step = TrainingStep(train_model, optimizer, runtime, schedule=schedule, clip_grad=args.clip_grad,
                        memory_hint='-b, --crop-size (or use --amp)', updates=start_iter)
    data = batches(loader)
    train_model.train()
    running, window_start = [], time.perf_counter()
    progress = tqdm(total=args.iters, initial=start_iter, desc='train', disable=None if runtime.is_main else True)
    try:
        for iteration in range(start_iter, args.iters):
            lr = schedule.lr
            images, labels, _ = next(data)
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            result = step(lambda: loss_fn(train_model(images), labels), f'iteration {iteration}')
            running.append(result.loss)
            done = iteration + 1
            run.log_step(done, dict(loss=running[-1], lr=lr))
            progress.update(1)
            if runtime.is_main and (done % args.log_interval == 0 or done == args.iters):
                per_iter = (time.perf_counter() - window_start) / len(running)
                parts = result.part_values()
                _logger.info('iter %d/%d  loss %.4f (decode %.4f%s)  lr %.3e  %.3f s/iter  eta %s', done, args.iters,
                             sum(running) / len(running), parts['decode'],
                             f', aux {parts["aux"]:.4f}' if 'aux' in parts else '', lr, per_iter,
                             time.strftime('%H:%M:%S', time.gmtime(per_iter * (args.iters - done))))
            evaluate_now = val_set is not None and (done == args.iters or (
                args.eval_interval and done % args.eval_interval == 0))
            save_now = done == args.iters or evaluate_now or (
                args.checkpoint_interval and done % args.checkpoint_interval == 0)
            if not save_now:
                continue
            row = OrderedDict(iteration=done, train_loss=round(sum(running) / max(len(running), 1), 6), lr=lr)
            results = run.evaluate(done, lambda: evaluate(model, val_set, args, runtime), row) if evaluate_now \
                else None
            if results is not None:
                row.update(eval_mIoU=results['mIoU'], eval_mAcc=results['mAcc'], eval_aAcc=results['aAcc'])
                if runtime.is_main:
                    _logger.info('Evaluation at iteration %d (%d images, %s):\n%s', done, len(val_set),
                                 args.eval_mode, format_table(results))
            best, best_iter = run.save(done, row, metric=None if results is None else results['mIoU'])
            if best is not None:
                _logger.info('Best mIoU so far: %.2f (iteration %d)', best, best_iter)
            running, window_start = [], time.perf_counter()
            train_model.train()
    finally:
        progress.close()
    return run.close('mIoU', best_key='mIoU')


def cli(argv=None):
    run_trainer(main, argv, _logger, errors=(DataError,))


if __name__ == '__main__':
    cli()
