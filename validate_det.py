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
import os
import time

import torch

from data import DataError
from data.coco import CocoInstances, coco_split, detection_eval_loader
from engine import (DiskFullError, add_amp_options, add_device_options, check_outputs, check_results_file,
                    check_writable_folder, setup_runtime, write_atomically, write_results)
from inference.detector import add_size_options, build_from_checkpoint, overlay_name, overlay_writer, resolve_settings
from models.detection import inference_size
from models.segmentation import SEGMENTATION_BACKBONES
from utils import CheckpointError, read_checkpoint
from utils.cli import UsageError, run_cli
from utils.config import positive_int
from utils.det_metrics import coco_stats, evaluate_detection
from utils.log import log_to_file, setup_logging

_logger = logging.getLogger('validate_det')
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
