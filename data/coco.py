"""COCO-format instance data for the detectors: a dataset that yields what torchvision's detection
models take (their outputs go back to COCO's results format in utils/det_metrics.py).

Any COCO-format annotation file with its image folder (COCO's own is `annotations/instances_{split}
2017.json` + `{split}2017/`), read through pycocotools after every field is checked
(data/coco_annotations.py):
- category ids (COCO's 1..90 with gaps) map to contiguous labels 1..K (0 is the background); the
  dataset keeps the map both ways (`label_to_category`, `category_to_label`);
- masks: polygons (several parts merged), RLE compressed and uncompressed;
- `iscrowd` regions are never training positives (COCO's evaluation ignores detections on them);
- boxes narrower or lower than one pixel are dropped, counted in the log;
- images without annotations give empty targets;
- images are read as shown (EXIF orientation applied, 16-bit scaled to 8) and must have the size the
  file gives them.
What cannot be right (a field of the wrong type or value, an image file that is missing, an
annotation of an unknown image or category, a box outside its image, a mask of another size than
its image) is a DataError naming the file and the id, raised when the dataset is opened, before any
work; so is an image whose size (read from its header, as shown) disagrees with the file; an image
whose pixels cannot be decoded, when it is loaded.
"""
import contextlib
import io
import logging
import math
import os
from typing import List

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch.utils.data import DataLoader, Sampler, Subset
from torchvision import tv_tensors
from torchvision.datasets import CocoDetection, VisionDataset
from torchvision.transforms import v2

from .coco_annotations import read_coco_annotations
from .dataset import DataError
from .images import displayed_size, read_image

__all__ = ['CocoInstances', 'AspectRatioBatchSampler', 'coco_split', 'collate_detection', 'detection_eval_loader',
           'detection_train_transform',
           'detection_eval_transform', 'MULTI_SCALE_SIZES']

_logger = logging.getLogger(__name__)
MULTI_SCALE_SIZES = tuple(range(480, 801, 32))  # the multi-scale recipe's short sides (long side <= 1333)


def coco_split(root, split, images=None, annotations=None):
    """(image folder, annotation file) of `split` ('train' or 'val'): the ones given, else COCO's
    layout under `root` (annotations/instances_{split}2017.json and {split}2017/)."""
    if not (images and annotations) and not root:
        raise DataError(f'no {split} data: give a COCO root folder, or --{split}-ann and --{split}-images')
    annotations = annotations or os.path.join(root, 'annotations', f'instances_{split}2017.json')
    images = images or os.path.join(root, f'{split}2017')
    return images, annotations


def collate_detection(batch):
    """A list of images and a list of targets (detectors take images of different sizes), as plain
    tensors."""
    images, targets = zip(*batch)
    plain = [{k: v.as_subclass(torch.Tensor) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
             for t in targets]
    return [image.as_subclass(torch.Tensor) for image in images], plain


class AspectRatioBatchSampler(Sampler[List[int]]):
    """Training batches of images on the same side of square (width >= height or not, mmdet's
    grouping), so that a batch pads little. Each epoch (set_epoch) shuffles within the groups, fills a
    group's last batch from the same group, shuffles the batches and deals them to the processes;
    every process gets the same number of batches (a few repeated when they do not divide evenly)."""

    def __init__(self, aspect_ratios, batch_size, rank=0, world_size=1, seed=0):
        self.groups = [[i for i, r in enumerate(aspect_ratios) if (r >= 1) == wide] for wide in (True, False)]
        self.groups = [g for g in self.groups if g]
        if not self.groups:
            raise ValueError('no images to sample')
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.epoch = 0
        total = sum(math.ceil(len(g) / batch_size) for g in self.groups)
        self.num_batches = math.ceil(total / world_size)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.num_batches

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        batches = []
        for group in self.groups:
            order = [group[i] for i in torch.randperm(len(group), generator=generator).tolist()]
            order += [order[i % len(order)] for i in range(-len(order) % self.batch_size)]
            batches += [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        batches += batches[:self.num_batches * self.world_size - len(batches)]
        return iter(batches[self.rank::self.world_size])


def detection_train_transform():
    """Horizontal flip (boxes and masks with it); the detectors resize and normalise inside."""
    return v2.Compose([v2.ToImage(), v2.RandomHorizontalFlip(0.5), v2.ToDtype(torch.float32, scale=True)])


def detection_eval_transform():
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])


class CocoInstances(CocoDetection):
    """(image, target) pairs: a float image in [0, 1] and {'boxes' (XYXY), 'labels', 'masks' (when
    with_masks), 'image_id', 'iscrowd'}. Crowd regions are left out of the training targets
    (train=True) and kept, marked, otherwise.
    In training, images without a box to learn from are left out (mmdet's
    recipe), counted in the log."""

    def __init__(self, images, annotations, train=False, with_masks=True, transforms=None):
        if not os.path.isfile(annotations):
            raise DataError(f'{annotations}: no such annotation file')
        if not os.path.isdir(images):
            raise DataError(f'{images}: no such image folder')
        VisionDataset.__init__(self, images)
        self.coco = COCO()
        self.coco.dataset = read_coco_annotations(annotations, with_masks=with_masks)
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its indexing steps
            self.coco.createIndex()
        self.ids = sorted(self.coco.imgs)
        self.annotations_file = annotations
        self.train = train
        self.with_masks = with_masks
        self.transforms = transforms or (detection_train_transform() if train else detection_eval_transform())
        categories = sorted(self.coco.getCatIds())
        self.label_to_category = [0] + categories  # label 0: the background
        self.category_to_label = {c: i + 1 for i, c in enumerate(categories)}
        self.dropped_degenerate = sum(1 for a in self.coco.dataset['annotations'] if not _trainable_box(a))
        self._check_files()
        if self.dropped_degenerate:
            _logger.info('%s: %d boxes narrower or lower than 1 px dropped', annotations, self.dropped_degenerate)
        if train:
            positive = {a['image_id'] for a in self.coco.dataset['annotations']
                        if not a.get('iscrowd', 0) and _trainable_box(a)}
            kept = [i for i in self.ids if i in positive]
            if not kept:
                raise DataError(f'{annotations}: no image has an annotation to train on (every one is empty, a crowd '
                                f'region or under 1 px)')
            if len(kept) < len(self.ids):
                _logger.info('%s: %d of %d images without a box to train on left out of training', annotations,
                             len(self.ids) - len(kept), len(self.ids))
            self.ids = kept

    @property
    def class_names(self):
        """The category names in label order (label 1 first)."""
        return [self.coco.cats[c].get('name', str(c)) for c in self.label_to_category[1:]]

    def aspect_ratios(self):
        """Width / height of every image, from the annotation file (no image is opened)."""
        return [self.coco.imgs[i]['width'] / self.coco.imgs[i]['height'] for i in self.ids]

    def _check_files(self):
        """Every image file exists and has the size the annotation file gives it, as shown (EXIF
        orientation applied), read from its header only: a mismatch stops the run when it opens the
        dataset, not hours into an epoch."""
        for image_id in self.ids:
            info = self.coco.imgs[image_id]
            path = os.path.join(self.root, info['file_name'])
            if not os.path.isfile(path):
                raise DataError(f'{path}: image {image_id} of {self.annotations_file} is missing')
            try:
                with Image.open(path) as image:
                    shown = displayed_size(image)
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
                raise DataError(f'{path}: not a readable image ({e})') from None
            if shown != (info['width'], info['height']):
                raise DataError(self._size_mismatch(path, image_id, shown))

    def _size_mismatch(self, path, image_id, size):
        return (f'{path}: image {image_id} is {size[0]}x{size[1]} as shown, but {self.annotations_file} gives it '
                f'{self.coco.imgs[image_id]["width"]}x{self.coco.imgs[image_id]["height"]}')

    def _load_image(self, image_id):
        """The image as shown (EXIF orientation applied), which must have the size the annotation file
        gives it: boxes and masks are drawn on that."""
        info = self.coco.imgs[image_id]
        path = os.path.join(self.root, info['file_name'])
        image = read_image(path)
        if image.size != (info['width'], info['height']):  # the file changed since the dataset was opened
            raise DataError(self._size_mismatch(path, image_id, image.size))
        return image

    def _mask(self, ann, height, width):
        seg = ann['segmentation']
        if isinstance(seg, list):  # polygons, one or several parts
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
        elif isinstance(seg['counts'], list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(seg, height, width)
        else:
            rle = seg
        return mask_utils.decode(rle)

    def __getitem__(self, index):
        image_id = self.ids[index]
        image = self._load_image(image_id)
        width, height = image.size
        anns = [a for a in self._load_target(image_id) if _trainable_box(a)]
        if self.train:
            anns = [a for a in anns if not a.get('iscrowd', 0)]
        boxes = torch.tensor([a['bbox'] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        target = {
            'boxes': tv_tensors.BoundingBoxes(boxes, format='XYXY', canvas_size=(height, width)),
            'labels': torch.tensor([self.category_to_label[a['category_id']] for a in anns], dtype=torch.int64),
            'iscrowd': torch.tensor([a.get('iscrowd', 0) for a in anns], dtype=torch.int64),
            'image_id': image_id,
        }
        if self.with_masks:
            masks = np.stack([self._mask(a, height, width) for a in anns]) if anns else \
                np.zeros((0, height, width), dtype=np.uint8)
            target['masks'] = tv_tensors.Mask(torch.from_numpy(masks))
        return self.transforms(image, target)


def _trainable_box(annotation):
    return annotation['bbox'][2] >= 1 and annotation['bbox'][3] >= 1


def detection_eval_loader(dataset, batch_size=2, workers=2, rank=0, world_size=1):
    """This process's share of an evaluation dataset (images rank, rank + world_size, ...: each image
    in one process only), in batches of lists."""
    share = Subset(dataset, range(rank, len(dataset), world_size))
    return DataLoader(share, batch_size=batch_size, num_workers=workers, collate_fn=collate_detection,
                      persistent_workers=False)
