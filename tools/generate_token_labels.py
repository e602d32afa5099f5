#!/usr/bin/env python3
"""Write tlt-format token-label maps for an image folder by running a classifier densely.

    python -m tools.generate_token_labels /data/mydataset/train --output /data/mydataset/labels \
        --model resnet50 --checkpoint annotator.pth.tar --num-classes 100 --img-size 448 -b 32

The classifier is applied to every position of the model's last feature map (CNNs: their head on
each position; token models: the classifier on each patch token; VOLO: its dense aux_head). For
each image, the top-5 logits and their class indices are saved as a half (2, 5, h, w) tensor at
`<output>/<class_dir>/<image name up to its first dot>.pt`. Images are resized to img_size x
img_size (the map then covers the whole image, as the training pipeline assumes); files that
already exist are skipped, so an interrupted run resumes.
"""
import argparse
import glob
import logging
import math
import os
import sys
import time

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.transforms import str_to_interp_mode
from torchvision import transforms
from tqdm import tqdm

import models  # noqa: F401
from data.dataset import (DataError, ImageFolderDataset, describe_collisions, find_split, label_path,
                          label_path_collisions)
from engine import DiskFullError
from engine.files import PARTIAL, write_staged
from utils import CheckpointError, load_pretrained_weights
from utils.log import setup_logging

_logger = logging.getLogger('generate_token_labels')
MAX_FP16_INDEX = 2048  # largest integer a half tensor holds exactly


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('data', help='image folder (<data>/<class>/<image>), or a root with a train/ split')
    p.add_argument('--split', default='train', help='split folder inside data, when present')
    p.add_argument('--output', required=True, help='label root to write')
    p.add_argument('--model', required=True, help='timm or this repo model name')
    p.add_argument('--checkpoint', default='', help='weights for the model (else --pretrained or random)')
    p.add_argument('--pretrained', action='store_true', help="the model's released weights")
    p.add_argument('--num-classes', type=int, default=None)
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--crop-pct', type=float, default=1.0,
                   help='< 1 labels only the central crop; keep 1.0 for training labels')
    p.add_argument('--interpolation', default='bicubic')
    p.add_argument('--topk', type=int, default=5)
    p.add_argument('-b', '--batch-size', type=int, default=32)
    p.add_argument('-j', '--workers', type=int, default=2)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--amp', action='store_true', help='bfloat16 autocast')
    return p.parse_args(argv)


def dense_logits(model, x):
    """(B, K, h, w) class logits at every position of the last feature map."""
    feats = model.forward_features(x)
    aux_head = getattr(model, 'aux_head', None)
    if aux_head is not None and feats.ndim == 3:  # VOLO: class token + patch tokens
        tokens = feats[:, 1:] if getattr(model, 'post_network', None) is not None else feats
        h, w = x.shape[-2] // 16, x.shape[-1] // 16
        return aux_head(tokens).reshape(x.shape[0], h, w, -1).permute(0, 3, 1, 2)
    if feats.ndim == 4:  # CNN: its own head (pool, norm, fc) on each 1x1 position
        B, C, h, w = feats.shape
        logits = model.forward_head(feats.permute(0, 2, 3, 1).reshape(B * h * w, C, 1, 1))
        return logits.reshape(B, h, w, -1).permute(0, 3, 1, 2)
    if feats.ndim == 3:  # token model: the classifier on each patch token
        tokens = feats[:, getattr(model, 'num_prefix_tokens', 0):]
        side = math.isqrt(tokens.shape[1])
        if side * side != tokens.shape[1]:
            raise ValueError(f'{tokens.shape[1]} patch tokens do not form a square grid')
        logits = model.get_classifier()(tokens)
        return logits.reshape(x.shape[0], side, side, -1).permute(0, 3, 1, 2)
    raise ValueError(f'cannot make dense predictions from features of shape {tuple(feats.shape)}')


def remove_stale_temporaries(output):
    """Label files a killed run left under their temporary names (`<name>.pt.partial`; runs of
    older versions: `<name>.pt.tmp<pid>`)."""
    stale = glob.glob(os.path.join(output, '*', '*.pt' + PARTIAL)) + glob.glob(os.path.join(output, '*', '*.pt.tmp*'))
    for path in stale:
        os.remove(path)
    if stale:
        _logger.info('removed %d unfinished label file(s) of an earlier run', len(stale))


def save_atomic(tensor, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.replace(write_staged(path, lambda f: torch.save(tensor, f),
                            kept='the label files written before are kept (run again to continue)'), path)


class _Pending(torch.utils.data.Dataset):
    """The images still without a label file: (image tensor, sample index)."""

    def __init__(self, folder, indices, transform):
        self.folder, self.indices, self.transform = folder, indices, transform

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        index = self.indices[i]
        return self.transform(self.folder.load_image(index)), index


def build_model(args):
    kwargs = {}
    if args.num_classes is not None:
        kwargs['num_classes'] = args.num_classes
    if args.model.startswith('volo'):
        kwargs['img_size'] = args.img_size
    model = timm.create_model(args.model, pretrained=args.pretrained, **kwargs)
    if args.checkpoint:
        load_pretrained_weights(model, args.checkpoint)
    num_classes = model.num_classes
    if num_classes > MAX_FP16_INDEX:
        raise ValueError(f'the tlt format stores class indices as fp16, exact only up to {MAX_FP16_INDEX}; '
                         f'this model has {num_classes} classes')
    if args.topk > num_classes:
        raise ValueError(f'--topk {args.topk} exceeds the model\'s {num_classes} classes')
    return model.eval().to(args.device)


def main(argv=None):
    args = parse_args(argv)
    setup_logging()
    root = find_split(args.data, args.split)
    folder = ImageFolderDataset(root)
    paths = [label_path(args.output, p, root) for p, _ in folder.samples]
    collisions = label_path_collisions(paths, [p for p, _ in folder.samples])
    if collisions:
        raise DataError(describe_collisions(collisions))
    remove_stale_temporaries(args.output)
    pending = [i for i, p in enumerate(paths) if not os.path.isfile(p)]
    _logger.info('%d images, %d already labelled, %d to do', len(paths), len(paths) - len(pending), len(pending))
    if not pending:
        return 0
    model = build_model(args)
    resize = int(round(args.img_size / args.crop_pct))
    transform = transforms.Compose([
        transforms.Resize((resize, resize), interpolation=str_to_interp_mode(args.interpolation)),
        transforms.CenterCrop(args.img_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])
    loader = torch.utils.data.DataLoader(_Pending(folder, pending, transform), batch_size=args.batch_size,
                                         num_workers=args.workers)
    device_type = torch.device(args.device).type
    start, done = time.perf_counter(), 0
    with torch.no_grad(), torch.autocast(device_type, dtype=torch.bfloat16, enabled=args.amp):
        for images, indices in tqdm(loader, desc='token labels', unit='batch'):
            logits = dense_logits(model, images.to(args.device)).float()
            values, classes = logits.topk(args.topk, dim=1)
            labels = torch.stack([values, classes.float()], dim=1).half().cpu()
            for label, index in zip(labels, indices.tolist()):
                save_atomic(label.clone(), paths[index])
            done += len(indices)
    elapsed = time.perf_counter() - start
    _logger.info('wrote %d label files in %.1f s (%.1f images/s)', done, elapsed, done / elapsed)
    return 0


def cli(argv=None):
    try:
        return main(argv)
    except (DataError, CheckpointError, ValueError, DiskFullError) as e:
        _logger.error('%s', e)
        return 2


if __name__ == '__main__':
    sys.exit(cli())
