#!/usr/bin/env python3
"""Train VOLO (or any registered model) on an ImageNet-style folder, with token labeling.

    ./distributed_train.sh 8 /path/to/imagenet --model volo_d1 --img-size 224 -b 128 --lr 1.6e-3 \
        --drop-path 0.1 --apex-amp --token-label --token-label-size 14 --token-label-data /path/to/labels
    python main.py /path/to/imagenet -c configs/volo_d1_224.yaml

The data folder holds train/ and val/ (or validation/) class folders; with --dataset wds, the tar
shards of tools/make_shards.py (token labels included); with --dataset hfds/NAME, a Hugging Face
dataset. Runs on CUDA when present, else on the CPU; under torchrun every process trains on its
share of the data. Outputs go to <output>/train/<time>-<model>-<img>/; --log-wandb and
--log-tensorboard DIR track the run.
"""
import argparse
import logging
import time
from collections import OrderedDict
from datetime import datetime

import timm
import torch
import torch.distributed as dist
import torch.nn as nn
from timm.data import Mixup, resolve_data_config
from timm.layers import DropBlock2d
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV2, distribute_bn

import models  # noqa: F401  (registers this repo's models with timm)
from models import VOLO, DenseTrainingForward, check_img_size
from data import DataError, TokenLabelMixup, create_token_label_target, open_split, set_epoch
from engine import (RunDirectory, TrainingStep, add_training_options, complete_summary, current_lr, distributed_model,
                    enable_grad_checkpointing, extends_run, find_resume, parse_with_config, resolved_later, run_trainer,
                    setup_runtime, sync_batchnorm)
from loss import (SoftTargetCrossEntropy, TokenLabelCrossEntropy, TokenLabelGTCrossEntropy,
                  TokenLabelSoftTargetCrossEntropy)
from utils import load_pretrained_weights, resume_checkpoint
from utils.cli import UsageError
from utils.config import dataset_type, non_negative_int, positive_int
from utils.evaluation import evaluate
from utils.log import setup_logging

_logger = logging.getLogger('train')


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_options(p, output='./output', seed=42, log_interval=50, workers=8)
    # dataset / model
    p.add_argument('data_dir', metavar='DIR', help='dataset root with train/ and val/ class folders (or shards)')
    p.add_argument('--dataset', '-d', metavar='NAME', default='', type=dataset_type,
                   help="'' or 'folder': class folders under DIR/<split>; 'wds': tar shards of tools/make_shards.py "
                        "under DIR/<split> (a split may be a brace pattern); 'hfds/NAME': a Hugging Face dataset "
                        "(plain labels; DIR is its cache folder)")
    p.add_argument('--train-split', default='train')
    p.add_argument('--val-split', default='validation', help='validation split (val/ is used if validation/ is absent)')
    p.add_argument('--train-num-samples', type=positive_int, default=None, metavar='N',
                   help='wds: training samples per epoch, for shards without an index.json')
    p.add_argument('--shuffle-buffer', type=positive_int, default=1000, metavar='N',
                   help='wds: each loader worker shuffles its samples within a buffer of N')
    p.add_argument('--model', default='volo_d1', type=str)
    p.add_argument('--pretrained', action='store_true', default=False, help="start from the model's released weights")
    p.add_argument('--initial-checkpoint', default='', type=str, metavar='PATH')
    extends_run(p.add_argument('--no-resume-opt', action='store_true', default=False))
    resolved_later(p.add_argument('--num-classes', type=positive_int, default=None, metavar='N',
                                  help='default: the number of class folders in the training split'))
    resolved_later(p.add_argument('--img-size', type=positive_int, default=None, metavar='N'))
    p.add_argument('--input-size', default=None, nargs=3, type=positive_int, metavar='N N N')
    p.add_argument('--crop-pct', default=None, type=float, help='validation center-crop fraction')
    p.add_argument('--mean', type=float, nargs='+', default=None)
    p.add_argument('--std', type=float, nargs='+', default=None)
    p.add_argument('--interpolation', default='', type=str, help='validation resize interpolation')
    p.add_argument('-b', '--batch-size', type=positive_int, default=128, help='per-process batch size')
    extends_run(p.add_argument('-vb', '--validation-batch-size-multiplier', type=positive_int, default=1))
    # optimizer
    p.add_argument('--opt', default='adamw', type=str)
    p.add_argument('--opt-eps', default=None, type=float)
    p.add_argument('--opt-betas', default=None, type=float, nargs='+')
    p.add_argument('--momentum', type=float, default=0.9)
    p.add_argument('--weight-decay', type=float, default=0.05)
    p.add_argument('--clip-grad', type=float, default=None)
    p.add_argument('--clip-mode', type=str, default='norm', help='norm, value or agc')
    # schedule
    p.add_argument('--sched', default='cosine', type=str)
    p.add_argument('--lr', type=float, default=1.6e-3)
    p.add_argument('--lr-noise', type=float, nargs='+', default=None)
    p.add_argument('--lr-noise-pct', type=float, default=0.67)
    p.add_argument('--lr-noise-std', type=float, default=1.0)
    p.add_argument('--lr-cycle-mul', type=float, default=1.0)
    p.add_argument('--lr-cycle-limit', type=int, default=1)
    p.add_argument('--warmup-lr', type=float, default=1e-6)
    p.add_argument('--min-lr', type=float, default=1e-5)
    extends_run(p.add_argument('--epochs', type=positive_int, default=300))
    extends_run(p.add_argument('--start-epoch', default=None, type=non_negative_int))
    p.add_argument('--decay-epochs', type=float, default=30)
    p.add_argument('--warmup-epochs', type=non_negative_int, default=20)
    p.add_argument('--cooldown-epochs', type=non_negative_int, default=10)
    p.add_argument('--patience-epochs', type=int, default=10)
    p.add_argument('--decay-rate', '--dr', type=float, default=0.1)
    # augmentation / regularisation
    p.add_argument('--no-aug', action='store_true', default=False)
    p.add_argument('--scale', type=float, nargs='+', default=[0.08, 1.0], help='random-resized-crop area range')
    p.add_argument('--ratio', type=float, nargs='+', default=[3. / 4., 4. / 3.])
    p.add_argument('--hflip', type=float, default=0.5)
    p.add_argument('--vflip', type=float, default=0.)
    p.add_argument('--color-jitter', type=float, default=0.4)
    p.add_argument('--aa', type=str, default='rand-m9-mstd0.5-inc1', help="RandAugment string; '' disables")
    p.add_argument('--reprob', type=float, default=0.25)
    p.add_argument('--remode', type=str, default='pixel')
    p.add_argument('--recount', type=int, default=1)
    p.add_argument('--mixup', type=float, default=0.0)
    p.add_argument('--cutmix', type=float, default=0.0)
    p.add_argument('--cutmix-minmax', type=float, nargs='+', default=None)
    p.add_argument('--mixup-prob', type=float, default=1.0)
    p.add_argument('--mixup-switch-prob', type=float, default=0.5)
    p.add_argument('--mixup-mode', type=str, default='batch')
    p.add_argument('--mixup-off-epoch', default=0, type=int)
    p.add_argument('--smoothing', type=float, default=0.1)
    p.add_argument('--train-interpolation', type=str, default='random')
    p.add_argument('--drop', type=float, default=0.0)
    p.add_argument('--drop-path', type=float, default=None)
    # batch norm
    p.add_argument('--bn-momentum', type=float, default=None, help="every BatchNorm's momentum (default: the model's)")
    p.add_argument('--bn-eps', type=float, default=None, help="every BatchNorm's eps (default: the model's)")
    p.add_argument('--sync-bn', action=argparse.BooleanOptionalAction, default=False,
                   help='SyncBatchNorm across processes (default: off)')
    p.add_argument('--dist-bn', type=str, default='', help="'broadcast', 'reduce' or ''")
    # EMA
    p.add_argument('--model-ema', action='store_true', default=False)
    p.add_argument('--model-ema-force-cpu', action='store_true', default=False)
    p.add_argument('--model-ema-decay', type=float, default=0.99992)
    # misc
    extends_run(p.add_argument('--recovery-interval', type=non_negative_int, default=0))
    extends_run(p.add_argument('--checkpoint-hist', type=non_negative_int, default=10,
                               help='how many of the best checkpoint-<epoch> files to keep (0: none; last and best '
                                    'always)'))
    p.add_argument('--channels-last', action='store_true', default=False)
    extends_run(p.add_argument('--pin-mem', action='store_true', default=False))
    p.add_argument('--eval-metric', default='top1', choices=['top1', 'top5', 'loss'])
    # token labeling
    p.add_argument('--token-label', action='store_true', default=False, help='dense token-level training loss')
    p.add_argument('--token-label-data', type=str, default='', metavar='DIR', help='token-label maps (tlt format)')
    p.add_argument('--token-label-size', type=positive_int, default=1, metavar='N', help='token grid of the labels')
    p.add_argument('--dense-weight', type=float, default=0.5)
    p.add_argument('--cls-weight', type=float, default=1.0)
    p.add_argument('--ground-truth', action='store_true', default=False, help='blend ground truth into cls target')
    p.add_argument('--aa-after-crop', action='store_true', default=False,
                   help='token labels: RandAugment on the crop (faster) instead of the full image (the reference)')
    # finetune
    p.add_argument('--finetune', default='', type=str, metavar='PATH', help='checkpoint file or run directory')
    add_reference_options(p)
    return p


def add_reference_options(p):
    """The reference main.py's options (timm 0.4's train.py) that have no place above, with its types
    and defaults, so that its command lines, YAML files and args.yaml keep loading. What each does
    here: check_reference_options and build_model."""
    g = p.add_argument_group("the reference main.py's options (old command lines and configs load; a value "
                             "without a feature here is refused, saying what to use)")
    g.add_argument('--gp', default=None, type=str, metavar='POOL',
                   help="global pooling: only the model's own (VOLO: token), which validate.py and predict.py rebuild")
    g.add_argument('--drop-block', type=float, default=None, metavar='PCT',
                   help='DropBlock rate, for models that have DropBlock (timm ResNets)')
    g.add_argument('--drop-connect', type=float, default=None, metavar='PCT',
                   help='old name of --drop-path (used when --drop-path is not given, as timm 0.4 did)')
    extends_run(g.add_argument('--no-prefetcher', action='store_true', default=False,
                               help='changes nothing: batches are always normalised on the device'))
    extends_run(g.add_argument('--use-multi-epochs-loader', action='store_true', default=False,
                               help='changes nothing: the training workers always persist across epochs'))
    extends_run(g.add_argument('--tta', type=non_negative_int, default=0, metavar='N',
                               help='0 or 1 (no test-time augmentation in the evaluation)'))
    g.add_argument('--torchscript', action='store_true', default=False, help='refused: main.py trains the eager model')
    g.add_argument('--save-images', action='store_true', default=False, help='refused')
    g.add_argument('--bn-tf', action='store_true', default=False, help='refused: use --bn-eps 1e-3 --bn-momentum 0.01')
    g.add_argument('--aug-splits', type=int, default=0, metavar='N', help='refused: 0 only (no AugMix splits)')
    g.add_argument('--jsd', action='store_true', default=False, help='refused (needs --aug-splits)')
    g.add_argument('--split-bn', action='store_true', default=False, help='refused (needs --aug-splits)')
    g.add_argument('--resplit', action='store_true', default=False, help='refused (needs --aug-splits)')


def parse_args(argv=None, parser=None):
    """Arguments from the command line over the YAML defaults of -c FILE (engine/options.py)."""
    parser = parser or get_parser()
    args = parse_with_config(parser, argv)
    if args.input_size is not None and args.img_size is not None and args.input_size[-1] != args.img_size:
        parser.error(f'--input-size {" ".join(map(str, args.input_size))} disagrees with --img-size {args.img_size}')
    if args.input_size is not None and args.input_size[-1] != args.input_size[-2]:
        parser.error(f'--input-size {" ".join(map(str, args.input_size))}: only square inputs are supported')
    check_reference_options(args)
    return args


def check_reference_options(args):
    """The reference's options (add_reference_options) that need no model: a value without a feature
    here is one line saying what to use instead (their defaults pass: old configs set them); those
    that change nothing here say so; --drop-connect becomes the --drop-path it stood for."""
    splits = [flag for flag, given in ((f'--aug-splits {args.aug_splits}', args.aug_splits), ('--jsd', args.jsd),
                                       ('--split-bn', args.split_bn), ('--resplit', args.resplit)) if given]
    if splits:
        them = 'them' if len(splits) > 1 else 'it'
        raise UsageError(f'{" ".join(splits)}: main.py has no AugMix batch splits (nor the JSD loss, BatchNorm per '
                         f'split or clean-split erasing that go with them): drop {them}; for AugMix augmentation '
                         f'itself use --aa augmix-m5-w4-d2')
    if args.bn_tf:
        raise UsageError('--bn-tf: timm no longer has it; for TensorFlow\'s BatchNorm defaults use --bn-eps 1e-3 '
                         '--bn-momentum 0.01 (the reference applied --bn-tf to EfficientNet and MobileNetV3 only)')
    if args.torchscript:
        raise UsageError('--torchscript: main.py trains the eager model (torch.jit.script is deprecated); script or '
                         'export the trained checkpoint instead: torch.jit.script(model) or python -m '
                         'tools.export_onnx (docs/timm.md)')
    if args.save_images:
        raise UsageError('--save-images: main.py does not write its training batches as images; drop it')
    if args.tta > 1:
        raise UsageError(f'--tta {args.tta}: main.py\'s evaluation has no test-time augmentation (the reference '
                         f'averaged the outputs of {args.tta} different images: its loader made no copies); drop --tta')
    if args.no_prefetcher:
        _logger.info('--no-prefetcher changes nothing here: the loaders always hand uint8 batches to the device, '
                     'which normalises them')
    if args.use_multi_epochs_loader:
        _logger.info('--use-multi-epochs-loader changes nothing here: the training loader\'s worker processes '
                     'always persist across epochs')
    if args.drop_connect is not None:
        if args.drop_path is None:
            _logger.warning('--drop-connect is the old name of --drop-path: drop path rate %s; use --drop-path',
                            args.drop_connect)
            args.drop_path = args.drop_connect
        else:
            _logger.warning('--drop-connect %s is ignored: --drop-path %s is given (as in the reference)',
                            args.drop_connect, args.drop_path)


def has_dense_head(model):
    """Whether the model trains with token labeling's dense output (this repository's VOLO with its
    dense head and class token: forward_train)."""
    return isinstance(model, VOLO) and model.aux_head is not None and model.return_dense and \
        model.global_pool == 'token'


def token_grid(model):
    pos_embed = getattr(model, 'pos_embed', None)
    return None if pos_embed is None or pos_embed.ndim != 4 else tuple(pos_embed.shape[1:3])


def build_model(args):
    kwargs = dict(pretrained=args.pretrained, num_classes=args.num_classes, drop_rate=args.drop,
                  drop_path_rate=args.drop_path, drop_block_rate=args.drop_block)  # timm drops the None ones
    if args.img_size is not None or args.input_size is not None:
        kwargs['img_size'] = args.img_size or args.input_size[-1]
        try:
            check_img_size(kwargs['img_size'], '--img-size')
        except ValueError as e:
            raise UsageError(str(e)) from None
    try:
        try:
            model = timm.create_model(args.model, **kwargs)
        except TypeError as e:
            if 'img_size' not in str(e):
                raise
            kwargs.pop('img_size')  # a model without a fixed input size (most CNNs)
            model = timm.create_model(args.model, **kwargs)
    except RuntimeError as e:
        if 'Unknown model' in str(e):
            raise UsageError(f'--model {args.model}: {e}') from None
        raise
    except (ValueError, TypeError) as e:
        if 'drop_block_rate' in str(e):
            raise UsageError(no_drop_block(args)) from None
        raise UsageError(f'--model {args.model} with {kwargs}: {e}') from None
    check_reference_model_options(args, model)
    set_batchnorm(model, momentum=args.bn_momentum, eps=args.bn_eps)
    if args.grad_checkpointing:
        enable_grad_checkpointing(model, args.model)
    if args.initial_checkpoint:
        load_pretrained_weights(model, args.initial_checkpoint, strict=True)
    if args.finetune:  # a new class count starts fresh heads
        load_pretrained_weights(model, args.finetune, use_ema=args.model_ema, strict=True,
                                num_classes=model.num_classes)
    return model


def no_drop_block(args):
    return (f'--drop-block {args.drop_block}: {args.model} has no DropBlock layers (timm\'s ResNets have them); '
            f'regularise it with --drop-path or --drop')


def check_reference_model_options(args, model):
    """The reference's --gp and --drop-block, against the model built: --drop-block must have made
    DropBlock layers; --gp may only name the model's own pooling, the one validate.py and predict.py
    rebuild from its checkpoints."""
    if args.drop_block and not any(isinstance(m, DropBlock2d) for m in model.modules()):
        raise UsageError(no_drop_block(args))
    if args.gp is not None:
        own = getattr(model, 'global_pool', None)
        own = getattr(own, 'pool_type', own)  # timm's CNNs: a SelectAdaptivePool2d
        if not isinstance(own, str):
            raise UsageError(f'--gp {args.gp}: {args.model} has no global pooling to choose; drop --gp')
        if args.gp != own:
            raise UsageError(f'--gp {args.gp}: main.py trains {args.model} with its own pooling, {own!r}, the one '
                             f'validate.py and predict.py rebuild from its checkpoints; drop --gp')


def set_batchnorm(model, momentum=None, eps=None):
    """--bn-momentum / --bn-eps: set on every BatchNorm layer of the model."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if momentum is not None:
                m.momentum = momentum
            if eps is not None:
                m.eps = eps


def check_token_labels(args, model, token_label_maps):
    """Token-label settings that cannot work are errors now, not after the first batch."""
    if not args.token_label:
        if args.token_label_data:
            raise UsageError('--token-label-data needs --token-label')
        return
    if not has_dense_head(model):
        raise UsageError(f'--token-label needs a model with a dense (token) head such as VOLO; '
                         f'{args.model} has none. Drop --token-label to train it with plain or mixup targets')
    if token_label_maps and args.aa and not args.aa.startswith('rand'):
        raise UsageError(f'--aa {args.aa}: token-label maps follow RandAugment ("rand-...") only')
    grid = token_grid(model)
    if token_label_maps and args.token_label_size != 1 and grid is not None:
        if grid[0] != grid[1] or args.token_label_size != grid[0]:
            raise UsageError(
                f'--token-label-size {args.token_label_size} does not match {args.model} at {args.img_size} px: '
                f'its token grid is {grid[0]}x{grid[1]}; use --token-label-size {grid[0]}')


def build_train_loss(args, model, token_label_maps):
    if token_label_maps and args.token_label_size == 1:
        return TokenLabelSoftTargetCrossEntropy()
    if has_dense_head(model):
        # token labels, or plain / mixup targets copied to every token
        loss_cls = TokenLabelGTCrossEntropy if args.ground_truth else TokenLabelCrossEntropy
        return loss_cls(dense_weight=args.dense_weight, cls_weight=args.cls_weight,
                        mixup_active=args.mixup > 0 or args.cutmix > 0, classes=args.num_classes)
    return SoftTargetCrossEntropy()


def build_mixup(args, runtime, token_label_maps):
    if not (args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None):
        return None
    mixup_args = dict(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                      switch_prob=args.mixup_switch_prob, mode=args.mixup_mode, label_smoothing=args.smoothing,
                      num_classes=args.num_classes)
    if token_label_maps:
        if args.cutmix_minmax is not None:
            raise UsageError('--cutmix-minmax is not supported with token labels')
        return TokenLabelMixup(label_size=args.token_label_size, seed=args.seed + runtime.rank, **mixup_args)
    return Mixup(cutmix_minmax=args.cutmix_minmax, **mixup_args)


def resolve_classes(args):
    """Open the splits and check the data now; the class count defaults to the training split's,
    and the validation split is read with the training split's class list (checked against it).
    Returns the (train, eval) splits (data/sources.py), the class names and the evaluation split's
    class indices."""
    train = open_split(args.dataset, args.data_dir, args.train_split, training=True)
    evaluation = open_split(args.dataset, args.data_dir, args.val_split)
    class_names = train.class_names(args.num_classes)
    eval_classes = evaluation.class_map(class_names)
    if args.num_classes is None:
        args.num_classes = len(class_names)  # resolved: args.yaml records it
        _logger.info('%d classes in %s', len(class_names), train.where)
    elif args.num_classes < len(class_names):
        raise UsageError(f'--num-classes {args.num_classes}, but {train.where} has {len(class_names)} classes')
    return train, evaluation, class_names, eval_classes


def build_loaders(args, runtime, data_config, train_data, eval_data, eval_classes, token_label_maps):
    interpolation = args.train_interpolation or data_config['interpolation']
    loader = dict(num_workers=args.workers, pin_memory=args.pin_mem, device=runtime.device, mean=data_config['mean'],
                  std=data_config['std'], distributed=runtime.distributed)
    img_size = data_config['input_size'][-1]
    augment = dict(scale=tuple(args.scale), ratio=tuple(args.ratio), hflip=args.hflip, vflip=args.vflip,
                   auto_augment=args.aa or None, interpolation=interpolation)
    erase = dict(re_prob=args.reprob, re_mode=args.remode, re_count=args.recount)
    if args.no_aug:
        augment.update(scale=(1., 1.), ratio=(1., 1.), hflip=0., vflip=0., auto_augment=None)
        erase.update(re_prob=0.)
    train = train_data.train_loader(
        img_size, args.batch_size, augment, erase, loader, token_labels=token_label_maps,
        token_label_data=args.token_label_data if token_label_maps else '', num_classes=args.num_classes,
        color_jitter=args.color_jitter, aa_after_crop=args.aa_after_crop, seed=args.seed,
        shuffle_buffer=args.shuffle_buffer, num_samples=args.train_num_samples)
    eval_loader = eval_data.eval_loader(img_size, args.validation_batch_size_multiplier * args.batch_size,
                                        data_config['crop_pct'], data_config['interpolation'], loader,
                                        class_map=eval_classes, num_classes=args.num_classes)
    return train, eval_loader


def train_one_epoch(epoch, model, loader, step, loss_fn, args, runtime, token_label_maps, mixup_fn, run,
                    start_batch=0, carried=(0., 0)):
    """One epoch from batch `start_batch` on (a run resumed mid-epoch; `carried`: the loss sum and
    sample count of the batches before it, over all ranks). `step`: the engine's TrainingStep."""
    if args.mixup_off_epoch and epoch >= args.mixup_off_epoch and mixup_fn is not None:
        mixup_fn = None
    model.train()
    loss_sum, seen = (carried[0], carried[1]) if runtime.is_main else (0., 0)
    steps = len(loader)
    end = time.perf_counter()
    for batch_idx, (images, target) in enumerate(loader if start_batch < steps else (), start=start_batch):
        data_time = time.perf_counter() - end
        if mixup_fn is not None:
            images, target = mixup_fn(images, target)
        elif token_label_maps:
            target = create_token_label_target(target, num_classes=args.num_classes, smoothing=args.smoothing,
                                               label_size=args.token_label_size)
        else:
            target = create_token_label_target(target, num_classes=args.num_classes, smoothing=args.smoothing)
        if args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)

        result = step(lambda: loss_fn(model(images), target), f'epoch {epoch}, step {batch_idx}')
        loss_sum += result.loss * images.shape[0]
        seen += images.shape[0]
        batch_time = time.perf_counter() - end
        last = batch_idx == steps - 1
        images_per_s = images.shape[0] * runtime.world_size / batch_time
        if runtime.is_main and (last or batch_idx % args.log_interval == 0):
            _logger.info('Train: %d [%4d/%d (%3.0f%%)]  Loss: %.4f (%.4f)  %.1f img/s  LR: %.3e  Data: %.3fs',
                         epoch, batch_idx, steps, 100. * batch_idx / max(steps - 1, 1), result.loss,
                         loss_sum / seen, images_per_s, result.lr, data_time)
        run.log_step(step.updates, dict(loss=result.loss, lr=result.lr, images_per_s=images_per_s,
                                        data_time=data_time))
        if args.recovery_interval and (last or (batch_idx + 1) % args.recovery_interval == 0):
            save_recovery(run, runtime, epoch, batch_idx, steps, loss_sum, seen)
        end = time.perf_counter()
    return OrderedDict(loss=all_ranks_mean(runtime, loss_sum, seen))


def all_ranks_sum(runtime, *values):
    """`values` summed over every process (one all-reduce), as Python numbers."""
    totals = torch.tensor(values, dtype=torch.float64, device=runtime.device)
    if runtime.distributed:
        dist.all_reduce(totals)
    return totals.tolist()


def all_ranks_mean(runtime, loss_sum, seen):
    loss_sum, seen = all_ranks_sum(runtime, loss_sum, float(seen))
    return loss_sum / seen


def save_recovery(run, runtime, epoch, batch_idx, steps, loss_sum, seen):
    """A mid-epoch checkpoint holding every rank's part of the epoch so far, for a resumed run's
    epoch loss."""
    loss_sum, seen = all_ranks_sum(runtime, loss_sum, float(seen))
    if run.saver is not None:
        run.saver.save_recovery(epoch, batch_idx=batch_idx, mid_epoch=dict(
            batch=batch_idx + 1, steps=steps, loss_sum=loss_sum, seen=int(seen)))


def main(argv=None):
    setup_logging()
    parser = get_parser()
    args = parse_args(argv, parser)
    runtime = setup_runtime(args)
    resume = find_resume(args, parser, 'train')
    train_data, eval_data, class_names, eval_classes = resolve_classes(args)
    token_label_maps = args.token_label and train_data.token_label_maps(args.token_label_data)
    if args.token_label and train_data.kind == 'wds' and not token_label_maps:
        _logger.warning('%s holds no token-label maps (make the shards with --token-label-data): --token-label '
                        'trains the dense head with the image label', train_data.where)
    model = build_model(args)
    if args.img_size is None:
        args.img_size = model.pretrained_cfg['input_size'][-1] if hasattr(model, 'pretrained_cfg') else 224
    check_token_labels(args, model, token_label_maps)
    data_config = resolve_data_config(vars(args), model=model, verbose=runtime.is_main)
    loader_train, loader_eval = build_loaders(args, runtime, data_config, train_data, eval_data, eval_classes,
                                              token_label_maps)
    if len(loader_train) == 0:
        dataset = loader_train.loader.dataset
        per_process = dataset.total // dataset.world_size if hasattr(dataset, 'total') else \
            len(dataset) // runtime.world_size
        raise UsageError(f'-b {args.batch_size} is larger than the {per_process} training images per process: '
                         f'no full batch, no training step (batches are full-sized in training); use -b {per_process} '
                         f'or less')
    if runtime.is_main:
        _logger.info('Model %s: %d parameters, input %s', args.model,
                     sum(p.numel() for p in model.parameters()), data_config['input_size'])

    model.to(runtime.device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    model = sync_batchnorm(model, runtime, args.sync_bn)
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                    momentum=args.momentum, **({'eps': args.opt_eps} if args.opt_eps else {}),
                                    **({'betas': tuple(args.opt_betas)} if args.opt_betas else {}))
    if runtime.amp.kind == 'apex':
        from apex import amp as apex_amp
        model, optimizer = apex_amp.initialize(model, optimizer, opt_level='O1')

    resume_epoch = mid_epoch = None
    model_ema = None
    if args.model_ema:
        model_ema = ModelEmaV2(model, decay=args.model_ema_decay, device='cpu' if args.model_ema_force_cpu else None)
    if resume:
        resume_epoch = resume_checkpoint(model, resume.path, optimizer=None if args.no_resume_opt else optimizer,
                                         loss_scaler=None if args.no_resume_opt else runtime.amp.loss_scaler,
                                         model_ema=model_ema, checkpoint=resume.checkpoint)
        mid_epoch = resume.checkpoint.get('mid_epoch')
        if mid_epoch and args.start_epoch is None:
            if mid_epoch['steps'] != len(loader_train):
                raise UsageError(f'{resume.path} stopped at batch {mid_epoch["batch"]} of {mid_epoch["steps"]} of '
                                 f'epoch {resume_epoch}, but this command has {len(loader_train)} batches an epoch: '
                                 f'resume with the data, batch size and process count of that run')
            _logger.info('Resumed %s: continuing at epoch %d, batch %d of %d', resume.path, resume_epoch,
                         mid_epoch['batch'], mid_epoch['steps'])
        else:
            mid_epoch = None
            _logger.info('Resumed %s: continuing at epoch %d', resume.path, resume_epoch)
    train_loss_fn = build_train_loss(args, model, token_label_maps)
    if has_dense_head(model):
        model = DenseTrainingForward(model)
    model = distributed_model(model, runtime)

    warmup_epochs, cooldown_epochs = args.warmup_epochs, args.cooldown_epochs  # the defaults suit 300 epochs
    if warmup_epochs >= args.epochs:
        _logger.warning('--warmup-epochs %d is not shorter than --epochs %d: no warmup', warmup_epochs, args.epochs)
        warmup_epochs = 0
    if cooldown_epochs >= args.epochs:
        _logger.warning('--cooldown-epochs %d is not shorter than --epochs %d: no cooldown', cooldown_epochs,
                        args.epochs)
        cooldown_epochs = 0
    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
        cooldown_epochs=cooldown_epochs, patience_epochs=args.patience_epochs, decay_rate=args.decay_rate,
        min_lr=args.min_lr, warmup_lr=args.warmup_lr, warmup_epochs=warmup_epochs, noise=args.lr_noise,
        noise_pct=args.lr_noise_pct, noise_std=args.lr_noise_std, noise_seed=args.seed, cycle_mul=args.lr_cycle_mul,
        cycle_limit=args.lr_cycle_limit, plateau_mode='min' if args.eval_metric == 'loss' else 'max')
    start_epoch = args.start_epoch if args.start_epoch is not None else (resume_epoch or 0)
    if start_epoch >= num_epochs:
        complete_summary(resume, runtime)
        raise UsageError(f'nothing to train: the run starts at epoch {start_epoch} and the schedule has {num_epochs} '
                         f'epochs (--epochs {args.epochs} + --cooldown-epochs {cooldown_epochs}); '
                         f'raise --epochs to continue it')
    if start_epoch > 0:
        lr_scheduler.step(start_epoch)
    start_batch = mid_epoch['batch'] if mid_epoch else 0
    step = TrainingStep(model, optimizer, runtime, schedule=lr_scheduler, clip_grad=args.clip_grad,
                        clip_mode=args.clip_mode, model_ema=model_ema, memory_hint='-b, --img-size (or use --amp)',
                        updates=start_epoch * len(loader_train) + start_batch)

    mixup_fn = build_mixup(args, runtime, token_label_maps)

    run = RunDirectory(args, runtime, 'train', [datetime.now().strftime('%Y%m%d-%H%M%S'), args.model,
                                                 data_config['input_size'][-1]],
                       model, optimizer, resume=resume, completed=start_epoch - 1, model_ema=model_ema,
                       decreasing=args.eval_metric == 'loss', max_history=args.checkpoint_hist,
                       extra={'class_names': class_names})
    if runtime.is_main:
        _logger.info('Output: %s; scheduled epochs: %d', run.path, num_epochs)
    del resume

    for epoch in range(start_epoch, num_epochs):
        epoch_start = time.perf_counter()
        start_batch = start_batch if epoch == start_epoch else 0
        set_epoch(loader_train, epoch, start_batch)
        if runtime.distributed and loader_train.sampler is not None:
            indices = loader_train.sampler.epoch_indices()
            _logger.info('Rank %d: epoch %d, %d training samples, first %s', runtime.rank, epoch, len(indices),
                         indices[:6])
        lr = current_lr(optimizer)
        carried = (mid_epoch['loss_sum'], mid_epoch['seen']) if start_batch else (0., 0)
        train_metrics = train_one_epoch(epoch, model, loader_train, step, train_loss_fn, args, runtime,
                                        token_label_maps, mixup_fn, run, start_batch, carried)
        if runtime.distributed and args.dist_bn in ('broadcast', 'reduce'):
            distribute_bn(model, runtime.world_size, args.dist_bn == 'reduce')
        row = OrderedDict(epoch=epoch, **{f'train_{k}': v for k, v in train_metrics.items()})

        def evaluate_epoch():
            metrics = evaluate(model, loader_eval, runtime.amp.autocast, args.channels_last, args.log_interval)
            if model_ema is not None and not args.model_ema_force_cpu:
                if runtime.distributed and args.dist_bn in ('broadcast', 'reduce'):
                    distribute_bn(model_ema, runtime.world_size, args.dist_bn == 'reduce')
                metrics = evaluate(model_ema.module, loader_eval, runtime.amp.autocast, args.channels_last,
                                   args.log_interval, log_suffix=' (EMA)')
            metrics.pop('images_per_s')
            metrics.pop('num_images')  # said in the log line; summary.csv keeps its columns
            return metrics

        eval_metrics = run.evaluate(epoch, evaluate_epoch, dict(row, lr=lr, epoch_time=round(
            time.perf_counter() - epoch_start, 3)))
        lr_scheduler.step(epoch + 1, eval_metrics[args.eval_metric])
        row.update({f'eval_{k}': v for k, v in eval_metrics.items()})
        row.update(lr=lr, epoch_time=round(time.perf_counter() - epoch_start, 3))
        run.save(epoch, row, metric=eval_metrics[args.eval_metric])
    return run.close(args.eval_metric)


def cli(argv=None):
    run_trainer(main, argv, _logger, errors=(DataError,))


if __name__ == '__main__':
    cli()
