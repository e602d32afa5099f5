#!/usr/bin/env python3
"""Predictions on images that have no labels: the top-k classes of a classifier, the label maps of
a segmentor, the detections of a detector.

    python predict.py photos/ --checkpoint d1_224_84.2.pth.tar                    # ImageNet names
    python predict.py 'shots/**/*.jpg' cat.png --checkpoint output/train/RUN/ --topk 3 --results-file out.csv
    python predict.py img.jpg --model volo_d1.sail_in1k --pretrained
    python predict.py streets/ --checkpoint output/train_seg/RUN/ --save-predictions maps/ --save-overlays over/
    python predict.py shelves/ --checkpoint output/train_det/RUN/ --save-results found.json --save-overlays over/

IMAGES are files, folders (searched recursively) or glob patterns. The task (classify, seg, det)
is what the checkpoint holds, or --task. A classifier is resolved as validate.py resolves it
(checkpoint files, run directories, release files, MindSpore .ckpt and .safetensors files, timm and
hf-hub: names), a segmentor as validate_seg.py, a detector as validate_det.py: backbone, sizes and
classes from the checkpoint. Class names: the training run's; ImageNet-1k's for 1000-class
classifiers; ADE20K's or Cityscapes' for their segmentors; else indices.

One row per image, printed and written to --results-file (.csv or .json): its path and the top-k
classes with their probabilities (classify), the k classes covering most pixels with their share
(seg), or the k best detections at or above --score-threshold (det). Segmentors write one index PNG
per image to --save-predictions, in the label format of the training dataset (ADE20K: class + 1),
at the image's size; detectors write every detection to --save-results as a COCO-format dataset
(images with their file names, categories, and annotations carrying a score), which pycocotools'
COCO() reads; both draw --save-overlays. Output files mirror the input paths below their common
folder. Unreadable files are listed and skipped (exit code 1).
"""
import argparse
import json
import logging
import os

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from data import (ADE20K_CLASSES, CITYSCAPES_CLASSES, DATASET_KINDS, REDUCE_ZERO_LABEL, TEST_SCALES, DataError,
                  SegEvalTransform, find_images, seg_dataset_type)
from data.coco import detection_eval_transform
from engine import (DiskFullError, add_amp_options, add_device_options, check_outputs, check_results_file,
                    check_writable_folder, resolve_amp, save_image, select_device, write_atomically, write_results)
from inference import detector, segmentor
from inference.classifier import add_model_options, build_classifier, class_names, class_rows, top_classes
from inference.images import image_loader, relative_names
from inference.overlays import class_palette, detection_palette, draw_detections, make_overlay
from inference.tasks import TASKS, checkpoint_task
from models.detection import inference_size, kept_detections
from models.segmentation import SEGMENTATION_BACKBONES
from utils import CheckpointError, read_checkpoint
from utils.cli import PartialFailure, UsageError, run_cli
from utils.config import positive_int
from utils.det_metrics import detections_to_coco
from utils.log import log_to_file, setup_logging
from utils.seg_inference import AUG_TEST_RATIOS, predict_scores

_logger = logging.getLogger('predict')
SEG_CLASS_NAMES = {'ade20k': ADE20K_CLASSES, 'cityscapes': CITYSCAPES_CLASSES}
BATCH_SIZES = {'classify': 32, 'det': 2}  # images per batch (a segmentor runs one image at a time)
# options that only one kind of model takes, and the tasks that take them (given = not None)
TASK_OPTIONS = {'save_predictions': ('seg',), 'save_results': ('det',), 'save_overlays': ('seg', 'det'),
                'dataset': ('seg',), 'mode': ('seg',), 'crop_size': ('seg',), 'stride': ('seg',), 'test_scale': ('seg',),
                'aug_test': ('seg',), 'test_size': ('det',), 'max_size': ('det',), 'score_threshold': ('det',),
                'img_size': ('classify',), 'crop_pct': ('classify',), 'num_classes': ('classify',),
                'pretrained': ('classify',), 'interpolation': ('classify',), 'mean': ('classify',),
                'std': ('classify',), 'channels_last': ('classify',), 'allow_non_finite': ('classify',)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('images', nargs='+', metavar='IMAGES', help='image files, folders or glob patterns')
    p.add_argument('--checkpoint', default='', help='checkpoint file or training run directory')
    p.add_argument('--task', choices=TASKS, default=None, help='default: what the checkpoint holds')
    add_model_options(p)
    p.add_argument('--topk', type=positive_int, default=5)
    p.add_argument('-b', '--batch-size', type=positive_int, default=None,
                   help='images per batch (default: ' + ', '.join(f'{t} {n}' for t, n in BATCH_SIZES.items()) + ')')
    add_device_options(p, workers=2)
    add_amp_options(p)
    p.add_argument('--results-file', default='', help='write the rows here: .csv or .json')
    p.add_argument('--log-file', default='', help='also write the output here')
    seg = p.add_argument_group('segmentors (as validate_seg.py)')
    seg.add_argument('--dataset', default=None, type=seg_dataset_type, choices=DATASET_KINDS,
                     help="the training dataset's kind, for its test scale and label format (default: the "
                          "checkpoint's)")
    segmentor.add_inference_options(seg)
    seg.add_argument('--save-predictions', default=None, metavar='DIR',
                     help="one index PNG per image, at the image's size, in the training dataset's label format")
    det = p.add_argument_group('detectors (as validate_det.py)')
    detector.add_size_options(det)
    det.add_argument('--score-threshold', type=float, default=None,
                     help='lowest score kept: rows, overlays and --save-results (default 0.5)')
    det.add_argument('--save-results', default=None, metavar='JSON',
                     help='the detections kept, COCO dataset format')
    p.add_argument('--save-overlays', default=None, metavar='DIR', help='seg and det: the predictions drawn')
    args = p.parse_args(argv)
    if not args.checkpoint and not args.pretrained:
        p.error('give --checkpoint FILE_OR_RUN, or --model NAME --pretrained')
    for flag in ('pretrained', 'interpolation', 'channels_last', 'allow_non_finite'):  # not given: None
        setattr(args, flag, getattr(args, flag) or None)
    return args


def resolve_task(args, contents):
    task = checkpoint_task(contents) if contents is not None else 'classify'
    if args.task and args.task != task:
        raise UsageError(f'--task {args.task}: {contents.path if contents else "--pretrained"} holds a '
                         f'{dict(classify="classifier", seg="segmentor", det="detector")[task]} (--task {task})')
    for option, tasks in TASK_OPTIONS.items():
        if getattr(args, option) is not None and task not in tasks:
            raise UsageError(f'--{option.replace("_", "-")} is for {" and ".join(tasks)} models; '
                             f'{contents.path if contents else "this model"} is for --task {task}')
    if task != 'classify' and args.model and args.model not in SEGMENTATION_BACKBONES:
        raise UsageError(f'--model {args.model}: a {task} backbone is one of {", ".join(SEGMENTATION_BACKBONES)}')
    return task


def classify(args, contents, paths, device, autocast):
    model, data_config, settings = build_classifier(args, args.checkpoint, contents, device)
    names = class_names(contents, model.num_classes)
    _logger.info('%s on %d images (%d px, crop %s)', args.checkpoint or settings['model'], len(paths),
                 data_config['input_size'][-1], data_config['crop_pct'])
    tops, kept, unreadable = top_classes(model, paths, data_config, args.topk, args.batch_size, args.workers, device,
                                         autocast)
    rows = class_rows(kept, tops, names)
    for row, top in zip(rows, tops):
        print(f'{row["path"]}\t' + '\t'.join(f'{row[f"class_{r}"]} {row[f"prob_{r}"]:.4f}' for r in range(1, len(top) + 1)))
    return rows, unreadable


def segment(args, contents, paths, device, autocast):
    """Label maps at each image's size: argmax of validate_seg.py's scores (same test scale, mode,
    crop, stride and test-time augmentation)."""
    settings = segmentor.resolve_settings(args, contents)
    crop_size, stride = segmentor.resolve_window(args, settings)
    model = segmentor.build_from_checkpoint(contents, settings['model'], crop_size).to(device).eval()
    kind = settings['dataset']
    names = contents.class_names or SEG_CLASS_NAMES.get(kind)
    if names is not None and len(names) != model.num_classes:
        raise CheckpointError(f'{contents.path} names {len(names)} classes, its decode head predicts '
                              f'{model.num_classes}')
    test_scale = tuple(args.test_scale) if args.test_scale else TEST_SCALES[kind]
    offset = 1 if REDUCE_ZERO_LABEL[kind] else 0
    ratios, flip = (AUG_TEST_RATIOS, True) if args.aug_test else ((1.0,), False)
    mode = args.mode or 'slide'
    transform = SegEvalTransform(test_scale)
    colours = class_palette(model.num_classes)
    _, files = relative_names(paths)
    _logger.info('%s + UPerHead (%d classes) on %d images: %s inference%s, test scale %s', settings['model'],
                 model.num_classes, len(paths), mode,
                 f' (crop {crop_size[0]}x{crop_size[1]}, stride {stride[0]}x{stride[1]})' if mode == 'slide' else '',
                 test_scale or 'as is')
    rows, unreadable = [], []
    dataset, loader = image_loader(paths, transform.image, 1, args.workers)
    with torch.inference_mode():
        for [(item, index)] in tqdm(loader, desc='predict', unit='image', disable=None):
            if item is None:
                unreadable.append(dataset.failure(-1 - index))
                continue
            image, (width, height) = item
            with autocast():
                scores = predict_scores(model, image[None].to(device), (height, width), model.num_classes, mode,
                                        crop_size, stride, ratios, flip, args.window_batch)
            pred = scores.argmax(1)[0].cpu().numpy().astype(np.uint8)
            if args.save_predictions:
                save_image(Image.fromarray(pred + offset), os.path.join(args.save_predictions, files[index]))
            if args.save_overlays:
                save_image(make_overlay(paths[index], pred, colours),
                           os.path.join(args.save_overlays, files[index]))
            share = np.bincount(pred.ravel(), minlength=model.num_classes) / pred.size
            row = {'path': paths[index]}
            for rank, c in enumerate(np.argsort(-share, kind='stable')[:min(args.topk, model.num_classes)], start=1):
                row[f'class_{rank}'] = names[c] if names else int(c)
                row[f'index_{rank}'] = int(c)
                row[f'area_{rank}'] = round(float(share[c]), 6)
            rows.append(row)
            print(f'{paths[index]}\t' + '\t'.join(f'{row[f"class_{r}"]} {row[f"area_{r}"]:.3f}'
                                                  for r in range(1, rank + 1)))
    return rows, unreadable


def detect(args, contents, paths, device, autocast):
    """The detections scoring at least --score-threshold at each image's original size (as shown), as
    validate_det.py makes them (same test size); Mask R-CNN's masks pasted for those only."""
    settings = detector.resolve_settings(args, contents)
    model, shape = detector.build_from_checkpoint(contents, settings['model'], settings['test_size'],
                                                      settings['max_size'])
    model.to(device).eval()
    count = shape['num_classes']
    names = contents.class_names or [f'class_{i}' for i in range(1, count + 1)]
    label_to_category = contents.label_to_category or list(range(count + 1))
    if len(names) != count or len(label_to_category) != count + 1:
        raise CheckpointError(f'{contents.path} records {len(names)} class names and {len(label_to_category) - 1} '
                              f'category ids, its detector has {count} classes')
    threshold = 0.5 if args.score_threshold is None else args.score_threshold
    colours = detection_palette(count)
    relative, files = relative_names(paths)
    _logger.info('%s on %s (%d classes) on %d images at short side %d (long <= %d)', shape['kind'],
                 settings['model'], count, len(paths), settings['test_size'], settings['max_size'])
    images, annotations, rows, unreadable = [], [], [], []
    dataset, loader = image_loader(paths, detection_eval_transform(), args.batch_size, args.workers,
                                   longest=settings['max_size'])
    with torch.inference_mode(), inference_size(model, settings['test_size'], settings['max_size']):
        for batch in tqdm(loader, desc='predict', unit='batch', disable=None):
            unreadable += [dataset.failure(-1 - index) for item, index in batch if item is None]
            batch = [(item, index) for item, index in batch if item is not None]
            if not batch:
                continue
            with autocast():
                outputs = kept_detections(model, [image.to(device) for (image, _), _ in batch],
                                          [(height, width) for (_, (width, height)), _ in batch], threshold)
            for ((_, (width, height)), index), output in zip(batch, outputs):
                output = {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in output.items()}
                image_id = index + 1
                images.append({'id': image_id, 'file_name': relative[index], 'path': paths[index], 'width': width,
                               'height': height})
                for found in detections_to_coco([output], [image_id], label_to_category):
                    w, h = found['bbox'][2:]
                    found.update(id=len(annotations) + 1, iscrowd=0, area=round(w * h, 3))
                    annotations.append(found)
                if args.save_overlays:
                    save_image(draw_detections(paths[index], output, names, threshold, colours),
                               os.path.join(args.save_overlays, files[index]))
                keep = range(min(args.topk, len(output['scores'])))
                row = {'path': paths[index], 'detections': len(output['scores'])}
                for rank, i in enumerate(keep, start=1):
                    label = int(output['labels'][i])
                    row[f'class_{rank}'] = names[label - 1]
                    row[f'category_{rank}'] = label_to_category[label]
                    row[f'score_{rank}'] = round(float(output['scores'][i]), 5)
                    row[f'box_{rank}'] = [round(v, 1) for v in output['boxes'][i].tolist()]
                rows.append(row)
                print(f'{paths[index]}\t{row["detections"]} at >= {threshold}\t' + '\t'.join(
                    f'{row[f"class_{r}"]} {row[f"score_{r}"]:.3f}' for r in range(1, len(keep) + 1)))
    if args.save_results:
        categories = [{'id': label_to_category[label], 'name': names[label - 1]} for label in range(1, count + 1)]
        dataset = {'images': sorted(images, key=lambda i: i['id']), 'categories': categories,
                   'annotations': annotations}
        write_atomically(args.save_results, json.dumps(dataset).encode())
        _logger.info('%d detections on %d images written to %s', len(annotations), len(images), args.save_results)
    order = {p: i for i, p in enumerate(paths)}
    return sorted(rows, key=lambda r: order[r['path']]), unreadable


def main(argv=None):
    setup_logging()
    args = parse_args(argv)
    if args.log_file:
        log_to_file(args.log_file)
    check_results_file(args.results_file, ('.csv', '.json'))
    check_results_file(args.save_results, option='--save-results')
    for option in ('save_predictions', 'save_overlays'):
        if getattr(args, option):
            check_writable_folder(getattr(args, option), f'--{option.replace("_", "-")}')
    paths = find_images(args.images)
    _, files = relative_names(paths)
    check_outputs(reads=[('the image', path) for path in paths] + [('--checkpoint', args.checkpoint)],
                  writes=[('--results-file', args.results_file, None), ('--save-results', args.save_results, None),
                          ('--save-predictions', args.save_predictions, files),
                          ('--save-overlays', args.save_overlays, files)])
    device = select_device(args.device)
    autocast = resolve_amp(args, device, training=False).autocast
    contents = read_checkpoint(args.checkpoint, use_ema=args.use_ema) if args.checkpoint else None
    task = resolve_task(args, contents)
    args.batch_size = args.batch_size or BATCH_SIZES.get(task, 1)
    rows, unreadable = dict(classify=classify, seg=segment, det=detect)[task](args, contents, paths, device,
                                                                              autocast)
    if args.results_file and rows:
        write_results(args.results_file, rows)
    for failure in unreadable:
        _logger.error('unreadable, skipped: %s', failure)
    if unreadable:
        raise PartialFailure(f'{len(unreadable)} of {len(paths)} images could not be read')
    return rows


def cli(argv=None):
    run_cli(main, argv, (UsageError, DataError, CheckpointError, DiskFullError), _logger)


if __name__ == '__main__':
    cli()
