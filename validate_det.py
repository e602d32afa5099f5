#!/usr/bin/env python3
"""COCO box (and mask) AP of a detector on a COCO-format validation split, through pycocotools.

    python validate_det.py /data/coco --checkpoint output/train_det/RUN/ --results-file metrics.json
    python validate_det.py --ann mine/val.json --images mine/images --checkpoint det.pth.tar \
        --save-results detections.json --save-overlays overlays/
    torchrun --nproc_per_node 8 validate_det.py /data/coco --checkpoint RUN/ --amp

A training checkpoint (or run directory, whose model_best.pth.tar is used) supplies the backbone,
the detector kind, the class count and the evaluation size; the command line overrides the backbone
and the sizes (said in the output). The 12 COCOeval statistics are printed as pycocotools prints
them and written to --results-file under `bbox` and `segm` (fractions, as pycocotools gives them).
--save-results writes COCO's results format (the dataset's image and category ids, xywh boxes, RLE
masks) that pycocotools' loadRes reads; --save-overlays draws every detection above
--overlay-threshold on its image. Under torchrun each image is run by one process and the results
are gathered on the first.
"""
import argparse
import json
import logging
import math
import os
import time

import numpy as np
import torch
from PIL import Image
from torchvision.utils import draw_bounding_boxes

from data import DataError
from data.coco import CocoInstances, coco_split, detection_eval_loader
from data.images import read_image
from engine import (DiskFullError, add_amp_options, add_device_options, check_outputs, check_results_file,
                    check_writable_folder, save_image, settings_from_training, setup_runtime, write_atomically,
                    write_results)
from models import check_img_size
from models.detection import build_detector, detector_settings, inference_size, position_grid_size
from models.segmentation import SEGMENTATION_BACKBONES
from utils import CheckpointError, load_pretrained_weights, read_checkpoint
from utils.cli import UsageError, run_cli
from utils.config import positive_int
from utils.det_metrics import binary_mask, coco_stats, evaluate_detection
from utils.log import log_to_file, setup_logging

_logger = logging.getLogger('validate_det')
OVERLAY_MIN_SIDE = 384  # pixels: smaller images are drawn enlarged


def add_size_options(p):
    """The size a detector runs at (validate_det.py, predict.py)."""
    p.add_argument('--test-size', type=positive_int, default=None, metavar='SHORT',
                   help="short side at inference (default: the checkpoint's, else 800)")
    p.add_argument('--max-size', type=positive_int, default=None, help="longest side (default: the checkpoint's, "
                                                                      "else 1333)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('data', metavar='DIR', nargs='?', default='',
                   help="COCO's layout: annotations/instances_<split>2017.json and <split>2017/")
    p.add_argument('--split', default='val')
    p.add_argument('--ann', default='', metavar='JSON', help='COCO-format annotations (default: from DIR)')
    p.add_argument('--images', default='', metavar='DIR', help='their image folder (default: from DIR)')
    p.add_argument('--checkpoint', required=True, help='detector checkpoint file or train_det.py run directory')
    p.add_argument('--model', default=None, choices=SEGMENTATION_BACKBONES, help="default: the checkpoint's backbone")
    add_size_options(p)
    p.add_argument('-b', '--batch-size', type=positive_int, default=2, help='images per process and batch')
    p.add_argument('--results-file', default='', help='write the metrics as JSON here')
    p.add_argument('--save-results', default='', metavar='JSON', help="the detections in COCO's results format")
    p.add_argument('--save-overlays', default='', metavar='DIR', help='images with their detections drawn')
    p.add_argument('--overlay-threshold', type=float, default=0.5, help='lowest score drawn on the overlays')
    p.add_argument('--use-ema', action='store_true')
    add_amp_options(p)
    add_device_options(p, workers=2)
    p.add_argument('--log-file', default='', help='also write the output here')
    args = p.parse_args(argv)
    if not (args.ann and args.images) and not args.data:
        p.error('give a COCO root DIR, or --ann and --images')
    return args


def palette(num_classes):
    """A fixed, well-spread colour per label (label 0, the background, is never drawn)."""
    rng = np.random.default_rng(12345)
    return [tuple(int(c) for c in rng.integers(40, 256, size=3)) for _ in range(num_classes + 1)]


def draw_detections(image_path, output, class_names, threshold, colours, min_side=OVERLAY_MIN_SIDE):
    """The image with the detections scoring at least `threshold`: masks (Mask R-CNN) blended in,
    boxes, and 'name score' labels. Images with a side under `min_side` are enlarged (by a whole
    factor, nearest) so that the labels stay readable."""
    image = read_image(image_path)
    factor = max(1, math.ceil(min_side / min(image.size)))
    if factor > 1:
        image = image.resize((image.width * factor, image.height * factor), Image.NEAREST)
    image = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
    keep = output['scores'] >= threshold
    labels = output['labels'][keep].tolist()
    colour = [colours[label] for label in labels]
    if 'masks' in output and keep.any():
        image = blend_masks(image, output['masks'], keep.nonzero()[:, 0].tolist(), colour, factor)
    if keep.any():
        text = [f'{class_names[label - 1]} {score:.2f}' for label, score in zip(labels, output['scores'][keep].tolist())]
        image = draw_bounding_boxes(image, output['boxes'][keep] * factor, labels=text, colors=colour, width=2)
    return Image.fromarray(image.permute(1, 2, 0).numpy())


def blend_masks(image, masks, indices, colours, factor=1, alpha=0.45):
    """`image` (3, H, W uint8) with the masks `indices` of `masks` (binary_mask reads them, one at a
    time, enlarged by `factor`) painted in `colours` and blended at `alpha`: what
    draw_segmentation_masks draws, without stacking every mask at the image's size; where masks
    overlap the later one shows (torchvision blacks overlaps out)."""
    painted, covered = image.clone(), torch.zeros(image.shape[1:], dtype=torch.bool)
    for i, colour in zip(indices, colours):
        mask = binary_mask(masks, i).repeat_interleave(factor, 0).repeat_interleave(factor, 1)
        painted[:, mask] = torch.tensor(colour, dtype=torch.uint8)[:, None]
        covered |= mask
    blended = image.clone()
    blended[:, covered] = (image[:, covered] * (1 - alpha) + painted[:, covered] * alpha).to(torch.uint8)
    return blended


def overlay_writer(dataset, folder, threshold):
    """on_outputs(image_ids, outputs) that draws each image's detections into folder/<stem>.png."""
    colours = palette(len(dataset.class_names))

    def write(image_ids, outputs):
        for image_id, output in zip(image_ids, outputs):
            info = dataset.coco.imgs[image_id]
            drawn = draw_detections(os.path.join(dataset.root, info['file_name']),
                                    {k: v.detach().cpu() for k, v in output.items()}, dataset.class_names, threshold,
                                    colours)
            save_image(drawn, os.path.join(folder, overlay_name(dataset, image_id)))
    return write


def overlay_name(dataset, image_id):
    """The file an image's overlay is written to: its file name's stem, .png."""
    return os.path.splitext(os.path.basename(dataset.coco.imgs[image_id]['file_name']))[0] + '.png'


def resolve_settings(args, contents):
    """(backbone, test size, max size) from the command line, else the checkpoint's training
    arguments, else the recipe's 800 / 1333."""
    trained = dict(contents.train_args or {})
    settings = settings_from_training(dict(model=args.model, test_size=args.test_size, max_size=args.max_size),
                                      trained, contents.path, defaults=dict(test_size=800, max_size=1333))
    if settings['model'] is None:
        raise UsageError(f'{contents.path} does not record its backbone: pass --model')
    for name in ('test_size', 'max_size'):
        try:
            check_img_size(settings[name], f'--{name.replace("_", "-")}')
        except ValueError as e:
            raise UsageError(str(e)) from None
    return settings


def build_from_checkpoint(contents, model_name, test_size, max_size):
    try:
        shape = detector_settings(contents.state_dict, contents.path)
    except ValueError as e:
        raise UsageError(str(e)) from None
    model = build_detector(model_name, shape['num_classes'], kind=shape['kind'], min_size=test_size, max_size=max_size,
                           fpn_channels=shape['fpn_channels'],
                           img_size=position_grid_size(model_name, test_size, max_size))
    load_pretrained_weights(model, contents.path, state_dict=contents.state_dict)
    return model, shape


def main(argv=None):
    setup_logging()
    args = parse_args(argv)
    if args.log_file:
        log_to_file(args.log_file)
    check_results_file(args.results_file)
    check_results_file(args.save_results, option='--save-results')
    if args.save_overlays:
        check_writable_folder(args.save_overlays, '--save-overlays')
    runtime = setup_runtime(args, training=False)
    contents = read_checkpoint(args.checkpoint, use_ema=args.use_ema)
    settings = resolve_settings(args, contents)
    model, shape = build_from_checkpoint(contents, settings['model'], settings['test_size'], settings['max_size'])
    images, annotations = coco_split(args.data, args.split, args.images, args.ann)
    dataset = CocoInstances(images, annotations, with_masks=False)
    if len(dataset.class_names) != shape['num_classes']:
        raise UsageError(f'{contents.path} detects {shape["num_classes"]} classes, but {annotations} lists '
                         f'{len(dataset.class_names)} categories')
    if contents.class_names and list(contents.class_names) != dataset.class_names:
        raise UsageError(f'{contents.path} was trained on the categories {contents.class_names}, {annotations} lists '
                         f'{dataset.class_names} (in id order)')
    check_outputs(reads=[('--checkpoint', contents.path), ('the annotation file', annotations)] +
                  [('the image', os.path.join(dataset.root, info['file_name'])) for info in dataset.coco.imgs.values()],
                  writes=[('--results-file', args.results_file, None), ('--save-results', args.save_results, None),
                          ('--save-overlays', args.save_overlays, [overlay_name(dataset, i) for i in dataset.ids])])
    model.to(runtime.device).eval()

    on_outputs = overlay_writer(dataset, args.save_overlays, args.overlay_threshold) if args.save_overlays else None
    kinds = ('bbox', 'segm') if shape['kind'] == 'mask_rcnn' else ('bbox',)
    if runtime.is_main:
        _logger.info('Evaluating %s on %s (%d classes) on %d images of %s at short side %d (long <= %d)%s',
                     shape['kind'], settings['model'], shape['num_classes'], len(dataset), annotations,
                     settings['test_size'], settings['max_size'],
                     f', {runtime.world_size} processes' if runtime.distributed else '')
    loader = detection_eval_loader(dataset, args.batch_size, args.workers, runtime.rank, runtime.world_size)
    start = time.perf_counter()
    with inference_size(model, settings['test_size'], settings['max_size']):
        results, image_ids = evaluate_detection(model, loader, dataset.label_to_category, runtime.device,
                                                runtime.amp.autocast, on_outputs=on_outputs)
    elapsed = time.perf_counter() - start
    if not runtime.is_main:
        torch.distributed.destroy_process_group()
        return None
    if len(image_ids) != len(dataset):
        raise RuntimeError(f'evaluated {len(image_ids)} of the {len(dataset)} images')
    stats, printed = coco_stats(dataset.coco, results, kinds, image_ids=image_ids)
    _logger.info('%s\n%d images, %d detections in %.1f s', printed, len(dataset), len(results), elapsed)
    if args.save_results:
        write_atomically(args.save_results, json.dumps(results).encode())
        _logger.info('detections written to %s', args.save_results)
    metrics = dict(stats, checkpoint=contents.path, model=settings['model'], detector=shape['kind'],
                   test_size=settings['test_size'], max_size=settings['max_size'], images=len(dataset),
                   annotations=annotations, detections=len(results))
    if args.results_file:
        write_results(args.results_file, metrics)
    if runtime.distributed:
        torch.distributed.destroy_process_group()
    return metrics


def cli(argv=None):
    run_cli(main, argv, (UsageError, DataError, CheckpointError, DiskFullError), _logger)


if __name__ == '__main__':
    cli()
