"""COCO-format instance data for the detectors: a dataset that yields what torchvision's detection
models take (their outputs go back to COCO's results format in utils/det_metrics.py).

Any COCO-format annotation file with its image folder (COCO's own is `annotations/instances_{split}
2017.json` + `{split}2017/`) is read through torchvision's CocoDetection (pycocotools underneath):
- category ids (COCO's 1..90 with gaps) map to contiguous labels 1..K (0 is the background); the
  dataset keeps the map both ways (`label_to_category`, `category_to_label`);
- masks: polygons (several parts merged), RLE compressed and uncompressed;
- `iscrowd` regions are never training positives (COCO's evaluation ignores detections on them);
- boxes narrower or lower than one pixel are dropped, counted in the log;
- images without annotations give empty targets.
What cannot be right (an image file that is missing, an annotation of an unknown image or category,
a box outside its image, a mask of another size than its image) is a DataError naming the file and
the id, raised when the dataset is opened, before any work.
"""
import logging
import os
import numpy as np
import torch
from pycocotools import mask as mask_utils
from torchvision import tv_tensors
from torchvision.datasets import CocoDetection
from torchvision.transforms import v2

from .dataset import DataError

__all__ = ['CocoInstances', 'detection_train_transform', 'detection_eval_transform']

_logger = logging.getLogger(__name__)
BOX_SLACK = 1.0  # pixels a box may pass its image's edge (COCO's float boxes round outwards)


def detection_train_transform():
    """Horizontal flip (boxes and masks with it); the detectors resize and normalise inside."""
    return v2.Compose([v2.ToImage(), v2.RandomHorizontalFlip(0.5), v2.ToDtype(torch.float32, scale=True)])


def detection_eval_transform():
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])


class CocoInstances(CocoDetection):
    """(image, target) pairs: a float image in [0, 1] and {'boxes' (XYXY), 'labels', 'masks' (when
    with_masks), 'image_id', 'iscrowd'}. Crowd regions are left out of the training targets
    (train=True) and kept, marked, otherwise."""

    def __init__(self, images, annotations, train=False, with_masks=True, transforms=None):
        if not os.path.isfile(annotations):
            raise DataError(f'{annotations}: no such annotation file')
        if not os.path.isdir(images):
            raise DataError(f'{images}: no such image folder')
        try:
            super().__init__(images, annotations)
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f'{annotations}: not a COCO-format annotation file ({type(e).__name__}: {e})') from None
        self.annotations_file = annotations
        self.train = train
        self.with_masks = with_masks
        self.transforms = transforms or (detection_train_transform() if train else detection_eval_transform())
        categories = sorted(self.coco.getCatIds())
        self.label_to_category = [0] + categories  # label 0: the background
        self.category_to_label = {c: i + 1 for i, c in enumerate(categories)}
        self.dropped_degenerate = 0
        self._check()
        if self.dropped_degenerate:
            _logger.info('%s: %d boxes narrower or lower than 1 px dropped', annotations, self.dropped_degenerate)

    def _check(self):
        images = self.coco.imgs
        for ann in self.coco.dataset.get('annotations', []):
            where = f'{self.annotations_file}: annotation {ann.get("id")}'
            if ann.get('image_id') not in images:
                raise DataError(f'{where} refers to image {ann.get("image_id")}, which the file does not list')
            if ann.get('category_id') not in self.category_to_label:
                raise DataError(f'{where} refers to category {ann.get("category_id")}, which the file does not list')
            info = images[ann['image_id']]
            x, y, w, h = ann['bbox']
            if x < -BOX_SLACK or y < -BOX_SLACK or x + w > info['width'] + BOX_SLACK or \
                    y + h > info['height'] + BOX_SLACK:
                raise DataError(f'{where}: box {ann["bbox"]} is outside its image {info["file_name"]} '
                                f'({info["width"]}x{info["height"]})')
            seg = ann.get('segmentation')
            if isinstance(seg, dict) and list(seg.get('size', [])) != [info['height'], info['width']]:
                raise DataError(f'{where}: mask of size {seg.get("size")} for image {info["file_name"]} of '
                                f'{info["height"]}x{info["width"]}')
            if w < 1 or h < 1:
                self.dropped_degenerate += 1
        for image_id in self.ids:
            path = os.path.join(self.root, images[image_id]['file_name'])
            if not os.path.isfile(path):
                raise DataError(f'{path}: image {image_id} of {self.annotations_file} is missing')

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
        anns = [a for a in self._load_target(image_id) if a['bbox'][2] >= 1 and a['bbox'][3] >= 1]
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
