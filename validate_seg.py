#!/usr/bin/env python3
"""mIoU / mAcc / aAcc and the per-class table of a segmentor on a dataset's validation split.

    python validate_seg.py /data/ADEChallengeData2016 --dataset ade20k --checkpoint output/train_seg/RUN/ \
        --mode slide --crop-size 512 512 --stride 341 341
    python validate_seg.py /data/cityscapes --dataset cityscapes --model volo_d4 --checkpoint seg.pth.tar \
        --mode slide --crop-size 1024 1024 --stride 768 768 --aug-test --results-file cs.json
    python validate_seg.py /data/mine --dataset seg-folder --checkpoint RUN/ --save-predictions preds/ --save-overlays ov/

A training checkpoint (or run directory, whose model_best.pth.tar is used) supplies the backbone,
the dataset kind, the crop size and the class count; the command line overrides the first three
(said in the output). Metrics are mmseg's: accumulated over the split, ignore pixels excluded,
classes absent from both labels and predictions skipped; in percent.
"""
import argparse
import logging
import os
import time

import numpy as np
from PIL import Image

from data import DATASET_KINDS, TEST_SCALES, DataError, SegEvalTransform, build_seg_dataset, seg_dataset_type
from engine import (DiskFullError, add_amp_options, add_device_options, check_outputs, check_results_file,
                    check_writable_folder, resolve_amp, save_image, select_device, write_results)
from inference.overlays import class_palette, make_overlay
from inference.segmentor import (add_inference_options, build_from_checkpoint, prediction_name, resolve_settings,
                                 resolve_window)
from models.segmentation import SEGMENTATION_BACKBONES
from utils import CheckpointError, read_checkpoint
from utils.cli import UsageError, run_cli
from utils.log import log_to_file, setup_logging
from utils.seg_inference import AUG_TEST_RATIOS, evaluate_segmentation
from utils.seg_metrics import SegmentationMetric, format_table

_logger = logging.getLogger('validate_seg')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('data', metavar='DIR', help='dataset root in the layout of --dataset')
    p.add_argument('--dataset', default=None, type=seg_dataset_type, choices=DATASET_KINDS,
                   help="default: the checkpoint's")
    p.add_argument('--split', default='val')
    p.add_argument('--model', default=None, choices=SEGMENTATION_BACKBONES, help="default: the checkpoint's backbone")
    p.add_argument('--checkpoint', required=True, help='segmentor checkpoint file or train_seg.py run directory')
    add_inference_options(p)
    p.add_argument('--results-file', default='', help='write the metrics as JSON here')
    p.add_argument('--save-predictions', default='', metavar='DIR',
                   help="one index PNG per image, at the label's size, in the dataset's own label space")
    p.add_argument('--save-overlays', default='', metavar='DIR', help='colour overlays of the predictions')
    p.add_argument('--use-ema', action='store_true')
    add_amp_options(p)
    add_device_options(p, workers=2)
    p.add_argument('--log-file', default='', help='also write the output here')
    return p.parse_args(argv)


def main(argv=None):
    setup_logging()
    args = parse_args(argv)
    if args.log_file:
        log_to_file(args.log_file)
    check_results_file(args.results_file)
    for option, folder in (('--save-predictions', args.save_predictions), ('--save-overlays', args.save_overlays)):
        if folder:
            check_writable_folder(folder, option)
    device = select_device(args.device)
    contents = read_checkpoint(args.checkpoint, use_ema=args.use_ema)
    settings = resolve_settings(args, contents)
    crop_size, stride = resolve_window(args, settings)
    model = build_from_checkpoint(contents, settings['model'], crop_size)
    test_scale = tuple(args.test_scale) if args.test_scale else TEST_SCALES[settings['dataset']]
    dataset = build_seg_dataset(settings['dataset'], args.data, args.split, SegEvalTransform(test_scale))
    if dataset.num_classes != model.num_classes:
        raise UsageError(f'{contents.path} predicts {model.num_classes} classes, but the {settings["dataset"]} '
                         f'dataset at {args.data} has {dataset.num_classes}')
    class_names = contents.class_names or dataset.class_names
    names = [prediction_name(dataset, index) for index in range(len(dataset))]
    check_outputs(reads=[('--checkpoint', contents.path)] + [(what, path) for pair in dataset.pairs
                                                             for what, path in zip(('the image', 'the label'), pair)],
                  writes=[('--results-file', args.results_file, None),
                          ('--save-predictions', args.save_predictions, names),
                          ('--save-overlays', args.save_overlays, names)])
    model.to(device).eval()
    autocast = resolve_amp(args, device, training=False).autocast
    args.mode = args.mode or 'slide'

    on_prediction = None
    if args.save_predictions or args.save_overlays:
        colours = class_palette(model.num_classes)
        offset = 1 if dataset.reduce_zero_label else 0

        def save_outputs(index, pred):
            image_path, name = dataset.pairs[index][0], prediction_name(dataset, index)
            pred = pred.numpy()
            if args.save_predictions:
                save_image(Image.fromarray((pred + offset).astype(np.uint8)), os.path.join(args.save_predictions, name))
            if args.save_overlays:
                save_image(make_overlay(image_path, pred, colours), os.path.join(args.save_overlays, name))
        on_prediction = save_outputs

    ratios, flip = (AUG_TEST_RATIOS, True) if args.aug_test else ((1.0,), False)
    _logger.info('Evaluating %s + UPerHead (%d classes) on %d images of %s: %s inference%s%s, test scale %s',
                 settings['model'], model.num_classes, len(dataset), args.data, args.mode,
                 f' (crop {crop_size[0]}x{crop_size[1]}, stride {stride[0]}x{stride[1]})' if args.mode == 'slide' else '',
                 ', multi-scale + flip' if args.aug_test else '', test_scale or 'as is')
    metric = SegmentationMetric(model.num_classes, class_names=class_names)
    start = time.perf_counter()
    evaluate_segmentation(model, dataset, device, metric, mode=args.mode, crop_size=crop_size, stride=stride,
                          ratios=ratios, flip=flip, autocast=autocast, workers=args.workers,
                          on_prediction=on_prediction, window_batch=args.window_batch)
    results = metric.compute()
    elapsed = time.perf_counter() - start
    _logger.info('%s\n%d images in %.1f s', format_table(results), len(dataset), elapsed)
    results.update(checkpoint=contents.path, model=settings['model'], dataset=settings['dataset'], mode=args.mode,
                   crop_size=list(crop_size), stride=list(stride), aug_test=bool(args.aug_test), images=len(dataset),
                   num_images=len(dataset))
    if args.results_file:
        write_results(args.results_file, results)
    return results


def cli(argv=None):
    run_cli(main, argv, (UsageError, DataError, CheckpointError, DiskFullError), _logger)


if __name__ == '__main__':
    cli()
