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

from data import DATASET_KINDS, TEST_SCALES, DataError, SegEvalTransform, build_seg_dataset, seg_dataset_kind, \
    seg_dataset_type
from data.images import read_image
from engine import (DiskFullError, add_amp_options, add_device_options, check_outputs, check_results_file,
                    check_writable_folder, resolve_amp, save_image, select_device, settings_from_training,
                    write_results)
from models import check_img_size
from models.segmentation import SEGMENTATION_BACKBONES, build_segmentor, size_divisor
from utils import CheckpointError, load_pretrained_weights, read_checkpoint
from utils.cli import UsageError, run_cli
from utils.config import positive_int
from utils.log import log_to_file, setup_logging
from utils.seg_inference import AUG_TEST_RATIOS, check_window, default_stride, evaluate_segmentation
from utils.seg_metrics import SegmentationMetric, format_table

_logger = logging.getLogger('validate_seg')


def add_inference_options(p):
    """How a segmentor runs on an image (validate_seg.py, predict.py)."""
    p.add_argument('--mode', default=None, choices=('whole', 'slide'), help='default: slide')
    p.add_argument('--crop-size', type=positive_int, nargs=2, default=None, metavar=('H', 'W'),
                   help="sliding-window crop (default: the checkpoint's training crop, else 512 512)")
    p.add_argument('--stride', type=positive_int, nargs=2, default=None, metavar=('H', 'W'),
                   help='sliding-window stride (default: 2/3 of the crop, rounded up)')
    p.add_argument('--test-scale', type=positive_int, nargs=2, default=None, metavar=('LONG', 'SHORT'),
                   help="resize before inference, keeping aspect (default: the dataset's standard scale)")
    p.add_argument('--aug-test', action='store_true', default=None,
                   help=f'multi-scale ({", ".join(map(str, AUG_TEST_RATIOS))}) and flip test-time augmentation')
    p.add_argument('--window-batch', type=positive_int, default=4, help='sliding windows run together')


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


def palette(num_classes):
    """A fixed, well-spread colour per class."""
    rng = np.random.default_rng(12345)
    colours = rng.integers(0, 256, size=(max(num_classes, 1), 3), dtype=np.uint8)
    colours[0] = (120, 120, 120)
    return colours


def make_overlay(image_path, pred, colours, alpha=0.5):
    """The original image blended with the prediction's class colours (predictions at the label's
    size, which is the image's)."""
    image = np.asarray(read_image(image_path), dtype=np.float32)
    colour = colours[np.minimum(pred, len(colours) - 1)].astype(np.float32)
    return Image.fromarray((image * (1 - alpha) + colour * alpha).astype(np.uint8))


def resolve_settings(args, contents):
    """(backbone, dataset kind, crop size) from the command line, else the checkpoint's training
    arguments; each one taken or overridden is said."""
    trained = dict(contents.train_args or {})
    if trained.get('dataset') is not None:
        trained['dataset'] = seg_dataset_kind(trained['dataset'])
    settings = settings_from_training(dict(model=args.model, dataset=args.dataset, crop_size=args.crop_size), trained,
                                      contents.path, defaults=dict(crop_size=[512, 512]))
    for name, value in settings.items():
        if value is None:
            raise UsageError(f'{contents.path} does not record the {name}: pass --{name.replace("_", "-")}')
    try:
        check_img_size(settings['crop_size'], '--crop-size' if args.crop_size else f'{contents.path}: crop_size')
    except ValueError as e:
        raise (UsageError if args.crop_size else CheckpointError)(str(e)) from None
    return settings


def resolve_window(args, settings):
    """(crop, stride) of the sliding window: the resolved crop, --stride or 2/3 of the crop; checked
    against the backbone's size divisor."""
    crop_size = tuple(settings['crop_size'])
    stride = tuple(args.stride) if args.stride else default_stride(crop_size)
    try:
        check_window(crop_size, stride, size_divisor(settings['model']))
    except ValueError as e:
        raise UsageError(f'--crop-size / --stride: {e}') from None
    return crop_size, stride


def build_from_checkpoint(contents, model_name, crop_size):
    """A segmentor shaped as the checkpoint: class count and head widths from its decode and
    auxiliary heads."""
    state = contents.state_dict
    key = 'decode_head.conv_seg.weight'
    if key not in state:
        raise UsageError(f'{contents.path} holds no {key}: not a segmentor checkpoint (a classification checkpoint '
                         f'initialises a backbone: train_seg.py --pretrained FILE)')
    num_classes, head_channels = state[key].shape[:2]
    aux = state.get('auxiliary_head.conv_seg.weight')
    model = build_segmentor(model_name, int(num_classes), img_size=tuple(crop_size), head_channels=int(head_channels),
                            aux_channels=int(aux.shape[1]) if aux is not None else 256,
                            auxiliary_head=aux is not None)
    load_pretrained_weights(model, contents.path, state_dict=state)
    return model


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
        colours = palette(model.num_classes)
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


def prediction_name(dataset, index):
    """The file an image's prediction and overlay are written to: its label's stem, .png."""
    return os.path.splitext(os.path.basename(dataset.pairs[index][1]))[0] + '.png'


def cli(argv=None):
    run_cli(main, argv, (UsageError, DataError, CheckpointError, DiskFullError), _logger)


if __name__ == '__main__':
    cli()
