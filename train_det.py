#!/usr/bin/env python3
"""Train a Mask R-CNN (or Faster R-CNN, RetinaNet) detector on a VOLO or Visformer backbone, in
epochs (mmdet's recipe for transformer backbones).

    ./distributed_train.sh 8 --script train_det.py /data/coco -c configs/det/mask_rcnn_volo_d1_1x.yaml \
        --backbone-checkpoint d1_224_84.2.pth.tar
    python train_det.py /data/coco -c configs/det/mask_rcnn_volo_d1_3x.yaml --backbone-checkpoint d1.pth.tar
    python train_det.py --train-ann mine/train.json --train-images mine/images --val-ann mine/val.json \
        --val-images mine/images --model visformer_small --schedule 1x

AdamW (lr 1e-4, weight decay 0.05, none on norms and position embeddings), steps x0.1 at epochs 8
and 11 (1x) or 27 and 33 (3x) after a 500-iteration linear warmup, per-process batch 2 grouped by
aspect ratio, horizontal flip and single-scale (short side 800) or multi-scale (480-800) training,
COCO evaluation every --eval-interval epochs with the best box-AP checkpoint kept as
model_best.pth.tar. Outputs go to <output>/train_det/<time>-<detector>-<model>/; the run's scaffold
(resume, checkpoints, summary, tracking, mixed precision, torchrun) is engine/'s.
"""
import argparse
import logging
import os
import time
from collections import OrderedDict
from datetime import datetime

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from data import DataError
from data.coco import (MULTI_SCALE_SIZES, AspectRatioBatchSampler, CocoInstances, coco_split, collate_detection,
                       detection_eval_loader)
from engine import (RunDirectory, TrainingStep, UpdateSchedule, add_renamed, add_training_options, distributed_model,
                    enable_grad_checkpointing, extends_run, find_resume, parse_with_config, resolved_later,
                    resume_training, run_trainer, setup_runtime)
from models import check_img_size
from models.detection import DETECTORS, FPN_CHANNELS, build_detector, inference_size, position_grid_size
from models.segmentation import SEGMENTATION_BACKBONES
from utils import load_pretrained_weights
from utils.cli import UsageError
from utils.config import non_negative_int, positive_int
from utils.det_metrics import coco_stats, evaluate_detection
from utils.log import setup_logging

_logger = logging.getLogger('train_det')

SCHEDULES = {'1x': (12, [8, 11]), '3x': (36, [27, 33])}  # epochs, lr steps (epochs after which lr x gamma)
NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_options(p, output='./output', seed=0, log_interval=50, workers=4)
    p.add_argument('data_dir', metavar='DIR', nargs='?', default='',
                   help="COCO's layout: annotations/instances_{train,val}2017.json, train2017/, val2017/")
    for split in ('train', 'val'):
        p.add_argument(f'--{split}-ann', default='', metavar='JSON',
                       help=f'COCO-format annotations of the {split} split (default: from DIR)')
        p.add_argument(f'--{split}-images', default='', metavar='DIR', help='its image folder (default: from DIR)')
    p.add_argument('--detector', default='mask_rcnn', choices=DETECTORS)
    p.add_argument('--model', default='volo_d1', choices=SEGMENTATION_BACKBONES, help='backbone')
    backbone = p.add_argument('--backbone-checkpoint', default='', metavar='FILE',
                              help='classification checkpoint (release file or training run) that initialises the '
                                   'backbone')
    add_renamed(p, '--pretrained', backbone)
    p.add_argument('--fpn-channels', type=positive_int, default=FPN_CHANNELS,
                   help='FPN and head width (the recipe: 256; only a CPU demo narrows it)')
    p.add_argument('--rois-per-image', type=positive_int, default=512,
                   help='proposals sampled per image to train the RoI heads (the recipe: 512)')
    p.add_argument('--train-sizes', type=positive_int, nargs='+', default=[800], metavar='SHORT',
                   help='training short side; several: one drawn per image (multi-scale)')
    p.add_argument('--multi-scale', action=argparse.BooleanOptionalAction, default=False,
                   help=f'the multi-scale recipe: --train-sizes {" ".join(map(str, MULTI_SCALE_SIZES))} '
                        f'(--no-multi-scale: --train-sizes as given, over a config that sets it)')
    p.add_argument('--test-size', type=positive_int, default=800, metavar='SHORT', help='evaluation short side')
    p.add_argument('--max-size', type=positive_int, default=1333, help='longest side, training and evaluation')
    p.add_argument('--drop-path', type=float, default=0.1, help='backbone stochastic depth')
    p.add_argument('-b', '--batch-size', type=positive_int, default=2, help='per-process batch size')
    p.add_argument('--schedule', default='1x', choices=sorted(SCHEDULES),
                   help='1x: 12 epochs, lr steps at 8 and 11; 3x: 36 epochs, steps at 27 and 33')
    extends_run(resolved_later(p.add_argument('--epochs', type=positive_int, default=None,
                                              help="default: the schedule's")))
    resolved_later(p.add_argument('--lr-steps', type=positive_int, nargs='*', default=None, metavar='EPOCH',
                                  help="epochs after which the lr is multiplied by --lr-gamma (default: the "
                                       "schedule's)"))
    p.add_argument('--lr-gamma', type=float, default=0.1)
    p.add_argument('--lr', type=float, default=1e-4)
    p.add_argument('--weight-decay', type=float, default=0.05)
    p.add_argument('--betas', type=float, nargs=2, default=(0.9, 0.999))
    p.add_argument('--warmup-iters', type=non_negative_int, default=500)
    p.add_argument('--warmup-ratio', type=float, default=0.001, help='warmup starts at lr x this')
    p.add_argument('--clip-grad', type=float, default=None, help='gradient norm clipping (the recipe: none)')
    extends_run(p.add_argument('--eval-interval', type=non_negative_int, default=1,
                               help='evaluate every N epochs (0: only at the end)'))
    extends_run(p.add_argument('--eval-batch-size', type=positive_int, default=2, help='per-process'))
    extends_run(p.add_argument('--checkpoint-hist', type=non_negative_int, default=1,
                               help='best checkpoints kept besides last/best'))
    return p


def parse_args(argv=None, parser=None):
    parser = parser or get_parser()
    args = parse_with_config(parser, argv)
    epochs, steps = SCHEDULES[args.schedule]
    if args.epochs is None:
        args.epochs = epochs
    if args.lr_steps is None:
        args.lr_steps = [s for s in steps if s < args.epochs] if args.epochs != epochs else list(steps)
    if args.multi_scale:
        args.train_sizes = list(MULTI_SCALE_SIZES)
    args.train_sizes, args.betas = list(args.train_sizes), list(args.betas)
    if not (args.train_ann and args.train_images) and not args.data_dir:
        parser.error('give a COCO root DIR, or --train-ann and --train-images (and --val-ann, --val-images)')
    if any(s >= args.epochs for s in args.lr_steps) or args.lr_steps != sorted(args.lr_steps):
        parser.error(f'--lr-steps {args.lr_steps}: increasing epochs below --epochs {args.epochs}')
    return args


def param_groups(model, args):
    """AdamW groups: no weight decay on the parameters of normalisation layers and on the backbone's
    position embeddings and class token (mmdet's recipe for transformer backbones); biases decay."""
    no_decay = {f'backbone.body.{n}' for n in getattr(model.backbone.body, 'no_weight_decay', lambda: ())()}
    no_decay |= {f'{module_name}.{n}' if module_name else n for module_name, module in model.named_modules()
                 if isinstance(module, NORMS) for n, _ in module.named_parameters(recurse=False)}
    decay, rest = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (rest if name in no_decay or name.split('.')[-1] in ('pos_embed', 'cls_token') else decay).append(param)
    return [{'params': decay, 'weight_decay': args.weight_decay}, {'params': rest, 'weight_decay': 0.}]


def step_lr(iteration, epoch, args):
    """mmdet's step schedule: lr x gamma at each of --lr-steps, times a linear warmup over the first
    --warmup-iters iterations from lr x --warmup-ratio."""
    lr = args.lr * args.lr_gamma ** sum(epoch >= s for s in args.lr_steps)
    if iteration < args.warmup_iters:
        lr *= 1 - (1 - iteration / args.warmup_iters) * (1 - args.warmup_ratio)
    return lr


def build_data(args, runtime):
    images, annotations = coco_split(args.data_dir, 'train', args.train_images, args.train_ann)
    train_set = CocoInstances(images, annotations, train=True, with_masks=args.detector == 'mask_rcnn')
    sampler = AspectRatioBatchSampler(train_set.aspect_ratios(), args.batch_size, runtime.rank, runtime.world_size,
                                      seed=args.seed)
    loader = DataLoader(train_set, batch_sampler=sampler, num_workers=args.workers, collate_fn=collate_detection,
                        pin_memory=torch.cuda.is_available(), persistent_workers=args.workers > 0)
    val_set = None
    try:
        images, annotations = coco_split(args.data_dir, 'val', args.val_images, args.val_ann)
    except DataError as e:
        _logger.warning('no evaluation during training: %s', e)
    else:
        if os.path.isfile(annotations) and os.path.isdir(images):  # a val split that is there must be right
            val_set = CocoInstances(images, annotations, with_masks=False)
        else:
            _logger.warning('no evaluation during training: no val split (%s, %s)', annotations, images)
    if val_set is not None and val_set.label_to_category != train_set.label_to_category:
        raise DataError(f'the val annotations {val_set.annotations_file} list categories '
                        f'{val_set.label_to_category[1:]}, the train annotations {train_set.label_to_category[1:]}')
    return loader, val_set


def evaluate(model, val_set, args, runtime):
    """Box (and mask) statistics over the val split, each image run by one process; on the first
    process, None on the others."""
    kinds = ('bbox', 'segm') if args.detector == 'mask_rcnn' else ('bbox',)
    loader = detection_eval_loader(val_set, args.eval_batch_size, min(args.workers, 2), runtime.rank,
                                   runtime.world_size)
    with inference_size(model, args.test_size, args.max_size):
        results, image_ids = evaluate_detection(model, loader, val_set.label_to_category, runtime.device,
                                                runtime.amp.autocast)
    if not runtime.is_main:
        return None
    if len(image_ids) != len(val_set):
        raise RuntimeError(f'evaluated {len(image_ids)} of the {len(val_set)} val images')
    return coco_stats(val_set.coco, results, kinds, image_ids=image_ids)


def detection_loss(losses):
    """(the sum of a torchvision detector's losses, the losses by name)."""
    return sum(losses.values()), losses


def to_device(targets, device):
    return [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]


def main(argv=None):
    setup_logging()
    parser = get_parser()
    args = parse_args(argv, parser)
    runtime = setup_runtime(args)
    device = runtime.device
    resume = find_resume(args, parser, 'train_det')
    try:
        for size in args.train_sizes + [args.test_size, args.max_size]:
            check_img_size(size, '--train-sizes / --test-size / --max-size')
    except ValueError as e:
        raise UsageError(str(e)) from None
    loader, val_set = build_data(args, runtime)
    train_set = loader.dataset
    args.num_classes = len(train_set.class_names)  # resolved: args.yaml records it
    model = build_detector(args.model, args.num_classes, kind=args.detector, min_size=tuple(args.train_sizes),
                           max_size=args.max_size, fpn_channels=args.fpn_channels, rois_per_image=args.rois_per_image,
                           img_size=position_grid_size(args.model, args.test_size, args.max_size),
                           drop_path_rate=args.drop_path)
    if args.backbone_checkpoint and not resume:
        load_pretrained_weights(model.backbone.body, args.backbone_checkpoint)
        _logger.info('Backbone initialised from %s', args.backbone_checkpoint)
    if args.grad_checkpointing:
        enable_grad_checkpointing(model, args.model)
    if runtime.is_main:
        _logger.info('%s on %s: %d parameters, %d classes, %d training images, train sizes %s (long side <= %d)',
                     args.detector, args.model, sum(p.numel() for p in model.parameters()), args.num_classes,
                     len(train_set), args.train_sizes, args.max_size)
    model.to(device)
    optimizer = torch.optim.AdamW(param_groups(model, args), lr=args.lr, betas=tuple(args.betas))

    start_epoch = resume_training(model, resume, optimizer, runtime, args.epochs, 'epoch', '--epochs') if resume else 0
    train_model = distributed_model(model, runtime)

    run = RunDirectory(args, runtime, 'train_det', [datetime.now().strftime('%Y%m%d-%H%M%S'), args.detector,
                                                     args.model],
                       model, optimizer, resume=resume, completed=start_epoch - 1, max_history=args.checkpoint_hist,
                       extra={'class_names': train_set.class_names, 'label_to_category': train_set.label_to_category,
                              'task': 'detection'})
    if runtime.is_main:
        _logger.info('Output: %s; epochs %d to %d, %d iterations an epoch', run.path, start_epoch, args.epochs,
                     len(loader))
    del resume

    steps_per_epoch = len(loader)
    schedule = UpdateSchedule(optimizer, lambda iteration: step_lr(iteration, iteration // steps_per_epoch, args),
                              start=start_epoch * steps_per_epoch)
    step = TrainingStep(train_model, optimizer, runtime, schedule=schedule, clip_grad=args.clip_grad,
                        memory_hint='-b, --train-sizes / --max-size (or use --amp)',
                        updates=start_epoch * steps_per_epoch)
    for epoch in range(start_epoch, args.epochs):
        loader.batch_sampler.set_epoch(epoch)
        train_model.train()
        running, start = [], time.perf_counter()
        progress = tqdm(loader, desc=f'epoch {epoch}', disable=None if runtime.is_main else True)
        for index, (images, targets) in enumerate(progress):
            lr = schedule.lr
            images, targets = [image.to(device, non_blocking=True) for image in images], to_device(targets, device)
            result = step(lambda: detection_loss(train_model(images, targets)), f'epoch {epoch}, step {index}')
            running.append(result.loss)
            run.log_step(step.updates, dict(loss=result.loss, lr=lr))
            if runtime.is_main and ((index + 1) % args.log_interval == 0 or index + 1 == steps_per_epoch):
                per_iter = (time.perf_counter() - start) / len(running)
                parts = '  '.join(f'{k[5:] if k.startswith("loss_") else k} {v:.4f}'
                                  for k, v in result.part_values().items())
                _logger.info('epoch %d [%d/%d]  loss %.4f (%s)  lr %.3e  %.3f s/iter', epoch, index + 1,
                             steps_per_epoch, sum(running) / len(running), parts, lr, per_iter)
        progress.close()
        done = epoch + 1
        row = OrderedDict(epoch=epoch, train_loss=round(sum(running) / max(len(running), 1), 6), lr=lr)
        evaluate_now = val_set is not None and (done == args.epochs or (
            args.eval_interval and done % args.eval_interval == 0))
        results = run.evaluate(epoch, lambda: evaluate(model, val_set, args, runtime), row) if evaluate_now else None
        box_ap = None
        if results is not None:
            stats, printed = results
            box_ap = round(100 * stats['bbox']['AP'], 3)
            row.update({f'eval_{kind}_{name}': round(100 * value, 3) for kind, named in stats.items()
                        for name, value in named.items() if name in ('AP', 'AP50', 'AP75')})
            _logger.info('Evaluation after epoch %d (%d images):\n%s', epoch, len(val_set), printed)
        best, best_epoch = run.save(epoch, row, metric=box_ap)
        if best is not None:
            _logger.info('Best box AP so far: %.2f (epoch %d)', best, best_epoch)
    return run.close('box AP', best_key='bbox_AP')


def cli(argv=None):
    run_trainer(main, argv, _logger, errors=(DataError,))


if __name__ == '__main__':
    cli()
