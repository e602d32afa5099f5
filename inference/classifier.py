"""A classifier ready to evaluate or predict, from a checkpoint in any form (a training checkpoint or
run directory, a release file, MindCV's .ckpt, .safetensors, a Hugging Face Hub folder) or from
--model / --pretrained: its settings resolved from the command line, else the checkpoint, else the
defaults, the file's claims checked against its tensors before anything is built."""
import argparse
import functools
import json
import logging
import os
from contextlib import nullcontext

import timm
import torch
from timm.data import ImageNetInfo, resolve_data_config
from tqdm import tqdm

import models  # noqa: F401  (registers this repo's models with timm)
from models import check_file_settings, check_img_size, numerics_kwargs
from data import ImageFiles, eval_transform, find_images, wrap_loader
from engine import settings_from_training
from utils import CheckpointError, checkpoint_num_classes, load_pretrained_weights, read_checkpoint
from utils.cli import UsageError
from utils.config import positive_int
from .images import read_for_prediction

_logger = logging.getLogger(__name__)
IMAGENET_CLASSES = 1000


def add_model_options(p):
    """How a classifier and its evaluation transform are chosen (validate.py, predict.py)."""
    p.add_argument('--model', '-m', default=None, help="default: the checkpoint's training model, else volo_d1")
    p.add_argument('--pretrained', action='store_true', help="the model's released weights (no --checkpoint)")
    p.add_argument('--img-size', type=positive_int, default=None,
                   help="evaluation resolution (default: the checkpoint's training size, else the model's)")
    p.add_argument('--crop-pct', type=float, default=None,
                   help="default: the checkpoint's training crop, else the model config's for this resolution")
    p.add_argument('--interpolation', default='', help='resize interpolation (default: the model\'s, bicubic)')
    p.add_argument('--mean', type=float, nargs='+', default=None)
    p.add_argument('--std', type=float, nargs='+', default=None)
    p.add_argument('--num-classes', type=positive_int, default=None, help='default: the checkpoint\'s head size')
    p.add_argument('--use-ema', action='store_true', help='evaluate the EMA weights of a training checkpoint')
    p.add_argument('--allow-non-finite', action='store_true', help='load weights holding NaN or Inf anyway')
    p.add_argument('--channels-last', action='store_true')


def file_settings(train_args, head_classes):
    """What a checkpoint states about its model: the training arguments, the class count its head
    has."""
    stated = dict(train_args or {})
    if stated.get('img_size') is None and stated.get('input_size'):
        stated['img_size'] = stated['input_size'][-1]
    if head_classes is not None:
        stated['num_classes'] = head_classes
    return stated


def resolve_settings(args, stated, head_classes, source):
    """model, img_size, num_classes and crop_pct: the command line's, else the checkpoint's
    (`stated`: file_settings), else the defaults. Says where each came from."""
    if head_classes is not None and args.num_classes is not None and args.num_classes != head_classes:
        raise CheckpointError(f'{source} has a {head_classes}-class head but --num-classes is {args.num_classes}')
    given = {name: getattr(args, name) for name in ('model', 'img_size', 'num_classes', 'crop_pct')}
    return settings_from_training(given, stated, source, defaults=dict(model='volo_d1'))


def check_hub_folder(folder):
    """A Hugging Face Hub folder given as --model local-dir:FOLDER: its config.json is read here
    first, so that a damaged one is named (timm's reader raises without the file's name)."""
    path = os.path.join(folder, 'config.json')
    try:
        with open(path) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise UsageError(f'--model local-dir:{folder}: {path} does not exist') from None
    except (OSError, ValueError, RecursionError) as e:
        reason = 'nested too deeply' if isinstance(e, RecursionError) else e
        raise CheckpointError(f'{path} is not a readable JSON model config: {reason}') from None
    if not isinstance(config, dict) or not isinstance(config.get('architecture'), str):
        raise CheckpointError(f'{path}: expected an object naming its "architecture"')


def model_classes(args, source, contents):
    """The classes the model was trained on, in index order: the checkpoint's record, else the
    data's (the training split beside a validation folder; a shard index; a Hugging Face dataset's
    own list), and where they came from."""
    if contents is not None and contents.class_names:
        return contents.class_names, 'the checkpoint'
    return source.class_names(args.num_classes), source.where


def build_classifier(args, checkpoint, contents, device):
    """The classifier that `checkpoint` (its `contents`, read once) or --model / --pretrained
    describes, built, loaded, on `device` in eval mode, with its evaluation data config and the
    resolved settings. The checkpoint's claims are checked against its tensors before any model is
    built."""
    train_args = contents.train_args if contents is not None else None
    head_classes = checkpoint_num_classes(contents.state_dict) if contents is not None else None
    stated = file_settings(train_args, head_classes)
    settings = resolve_settings(args, stated, head_classes, checkpoint or '--pretrained')
    if args.img_size is not None:
        try:
            check_img_size(args.img_size, '--img-size')
        except ValueError as e:
            raise UsageError(str(e)) from None
    kwargs = {k: settings[k] for k in ('num_classes', 'img_size') if settings[k] is not None}
    numerics = {}
    if contents is not None and contents.numerics:
        try:
            numerics = numerics_kwargs(settings['model'], contents.numerics)
        except ValueError as e:
            raise CheckpointError(f'{contents.path}: {e}') from None
        _logger.info('%s holds %s weights: the model is built with their numerics (%s)', contents.path,
                     contents.numerics, ', '.join(f'{k}={getattr(v, "keywords", v)}' for k, v in numerics.items()))
        kwargs.update(numerics)
    hub_model = args.model is not None and args.model.startswith(('local-dir:', 'hf-hub:'))
    if contents is not None and not hub_model:  # the file's claims against its own tensors, before any model
        try:
            check_file_settings(settings['model'], contents.state_dict, contents.path, **numerics,
                                **{k: stated[k] for k in ('img_size', 'num_classes') if stated.get(k) is not None})
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    if settings['model'].startswith('local-dir:'):
        check_hub_folder(settings['model'][len('local-dir:'):])
    try:
        model = timm.create_model(settings['model'], pretrained=args.pretrained and not checkpoint, **kwargs)
    except RuntimeError as e:
        raise CheckpointError(f'--model {settings["model"]}: {e}') from None
    except (ValueError, TypeError) as e:
        raise CheckpointError(f'cannot build --model {settings["model"]} with {kwargs}: {e}') from None
    if checkpoint:
        load_pretrained_weights(model, contents.path, strict=True, state_dict=contents.state_dict,
                                allow_non_finite=args.allow_non_finite)
    data_config = resolve_data_config(dict(vars(args), crop_pct=settings['crop_pct']), model=model)
    model = model.to(device).eval()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, data_config, settings


def class_names(contents, num_classes):
    """Names by index: the checkpoint's training classes, ImageNet-1k's for a 1000-class head,
    else None (indices are printed)."""
    if contents is not None and contents.class_names:
        return list(contents.class_names)
    if num_classes == IMAGENET_CLASSES:
        info = ImageNetInfo()
        return [info.index_to_description(i).split(',')[0] for i in range(IMAGENET_CLASSES)]
    return None


def top_classes(model, paths, data_config, topk=5, batch_size=32, workers=0, device='cpu', autocast=nullcontext):
    """(top-k lists, their paths, why the others could not be used): for each image of `paths` that
    can be read its `topk` (index, probability) pairs, in the order of `paths`, each image read as
    shown and through the model's evaluation transform (`data_config`)."""
    size = data_config['input_size'][-1]
    transform = eval_transform(size, data_config['crop_pct'], data_config['interpolation'])
    dataset = ImageFiles(paths, transform, placeholder=torch.zeros(3, size, size, dtype=torch.uint8),
                         read=functools.partial(read_image_for, longest=size))
    loader = wrap_loader(dataset, batch_size, is_training=False, device=device, num_workers=workers,
                         persistent_workers=False, mean=data_config['mean'], std=data_config['std'])
    top = {}
    unreadable = []
    k = min(topk, model.num_classes)
    with torch.inference_mode():
        for images, indices in tqdm(loader, desc='predict', unit='batch', disable=None):
            with autocast():
                logits = model(images)
            probs, classes = logits.float().softmax(-1).topk(k, dim=-1)
            for index, p, c in zip(indices.tolist(), probs.tolist(), classes.tolist()):
                if index < 0:
                    unreadable.append(dataset.failure(-1 - index))
                else:
                    top[index] = list(zip(c, p))
    return [top[i] for i in sorted(top)], [paths[i] for i in sorted(top)], unreadable


def read_image_for(path, longest):
    return read_for_prediction(path, longest)[0]


def classify_images(checkpoint, images, topk=5, device='cpu', **settings):
    """Rows {path, class_1, index_1, prob_1, ...} of the top-k classes of `images` (files, folders
    or glob patterns, as predict.py takes them) by the classifier in `checkpoint` (any form
    build_classifier takes), with the run's class names; `settings`: add_model_options' (img_size,
    crop_pct, use_ema, ...). Returns (rows, why the images left out could not be used)."""
    parser = argparse.ArgumentParser()
    add_model_options(parser)
    args = parser.parse_args([])
    for name, value in settings.items():
        if not hasattr(args, name):
            raise UsageError(f'{name}: not a setting of a classifier (one of {", ".join(sorted(vars(args)))})')
        setattr(args, name, value)
    contents = read_checkpoint(checkpoint, use_ema=args.use_ema)
    device = torch.device(device)
    model, data_config, _ = build_classifier(args, checkpoint, contents, device)
    names = class_names(contents, model.num_classes)
    paths = find_images(images if isinstance(images, (list, tuple)) else [images])
    tops, kept, unreadable = top_classes(model, paths, data_config, topk, device=device)
    return class_rows(kept, tops, names), unreadable


def class_rows(paths, tops, names):
    """A row per image: its path, then class_k (the name, or the index without `names`), index_k and
    prob_k for each of its top-k (index, probability) pairs."""
    rows = []
    for path, top in zip(paths, tops):
        row = {'path': path}
        for rank, (index, prob) in enumerate(top, start=1):
            row[f'class_{rank}'] = names[index] if names else index
            row[f'index_{rank}'] = index
            row[f'prob_{rank}'] = round(prob, 6)
        rows.append(row)
    return rows
