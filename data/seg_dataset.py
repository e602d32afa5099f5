"""Segmentation datasets in the layouts they are distributed in.

- ade20k: ROOT/images/{training,validation}/*.jpg and ROOT/annotations/{training,validation}/*.png
  (ADEChallengeData2016); 150 classes; label 0 ("other") is ignored and the rest shifted down by one.
- cityscapes: ROOT/leftImg8bit/{train,val}/<city>/<name>_leftImg8bit.png and
  ROOT/gtFine/{train,val}/<city>/<name>_gtFine_labelTrainIds.png (written from the released
  _labelIds.png by `python -m tools.cityscapes_train_ids ROOT`); 19 classes.
- seg-folder (your own data): ROOT/classes.txt (one class name per line, in index order),
  ROOT/images/<split>/<name>.{jpg,jpeg,png} and ROOT/labels/<split>/<name>.png holding class indices
  (0 .. classes - 1, 255 = ignore).

Every problem is a DataError naming the file: a missing folder, an image without its label, a label
of another size than its image, label values outside the classes.
"""
import logging
import os
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from layers import IGNORE_INDEX
from .dataset import DataError
from .images import read_image

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')

ADE20K_CLASSES = (
    'wall', 'building', 'sky', 'floor', 'tree', 'ceiling', 'road', 'bed', 'windowpane', 'grass', 'cabinet',
    'sidewalk', 'person', 'earth', 'door', 'table', 'mountain', 'plant', 'curtain', 'chair', 'car', 'water',
    'painting', 'sofa', 'shelf', 'house', 'sea', 'mirror', 'rug', 'field', 'armchair', 'seat', 'fence', 'desk',
    'rock', 'wardrobe', 'lamp', 'bathtub', 'railing', 'cushion', 'base', 'box', 'column', 'signboard',
    'chest of drawers', 'counter', 'sand', 'sink', 'skyscraper', 'fireplace', 'refrigerator', 'grandstand',
    'path', 'stairs', 'runway', 'case', 'pool table', 'pillow', 'screen door', 'stairway', 'river', 'bridge',
    'bookcase', 'blind', 'coffee table', 'toilet', 'flower', 'book', 'hill', 'bench', 'countertop', 'stove',
    'palm', 'kitchen island', 'computer', 'swivel chair', 'boat', 'bar', 'arcade machine', 'hovel', 'bus',
    'towel', 'light', 'truck', 'tower', 'chandelier', 'awning', 'streetlight', 'booth', 'television receiver',
    'airplane', 'dirt track', 'apparel', 'pole', 'land', 'bannister', 'escalator', 'ottoman', 'bottle',
    'buffet', 'poster', 'stage', 'van', 'ship', 'fountain', 'conveyer belt', 'canopy', 'washer', 'plaything',
    'swimming pool', 'stool', 'barrel', 'basket', 'waterfall', 'tent', 'bag', 'minibike', 'cradle', 'oven',
    'ball', 'food', 'step', 'tank', 'trade name', 'microwave', 'pot', 'animal', 'bicycle', 'lake',
    'dishwasher', 'screen', 'blanket', 'sculpture', 'hood', 'sconce', 'vase', 'traffic light', 'tray',
    'ashcan', 'fan', 'pier', 'crt screen', 'plate', 'monitor', 'bulletin board', 'shower', 'radiator',
    'glass', 'clock', 'flag')

CITYSCAPES_CLASSES = ('road', 'sidewalk', 'building', 'wall', 'fence', 'pole', 'traffic light', 'traffic sign',
                      'vegetation', 'terrain', 'sky', 'person', 'rider', 'car', 'truck', 'bus', 'train',
                      'motorcycle', 'bicycle')

# the official Cityscapes labelIds -> trainIds mapping; every other id is ignored
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                        25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}

DATASET_KINDS = ('ade20k', 'cityscapes', 'seg-folder')
# names a kind had before: 'folder' was the images/ + labels/ layout, which classification's
# --dataset folder (class folders) also named
RENAMED_KINDS = {'folder': 'seg-folder'}
# the test-time resize of each dataset's standard pipeline (long side, short side); None: as is
TEST_SCALES = {'ade20k': (2048, 512), 'cityscapes': (2048, 1024), 'seg-folder': None}
# ADE20K's label files store class k as k + 1 and 0 as "other" (ignored)
REDUCE_ZERO_LABEL = {'ade20k': True, 'cityscapes': False, 'seg-folder': False}
SPLITS = {'ade20k': {'train': 'training', 'val': 'validation'}, 'cityscapes': {'train': 'train', 'val': 'val'},
          'seg-folder': {'train': 'train', 'val': 'val'}}


def seg_dataset_kind(name: str) -> str:
    """A dataset kind under its current name (an old name is accepted)."""
    return RENAMED_KINDS.get(name, name)


def seg_dataset_type(text: str) -> str:
    """--dataset of the segmentation scripts: one of DATASET_KINDS; the old name 'folder' still
    works and says what to use."""
    if text in RENAMED_KINDS:
        logging.getLogger(__name__).warning("--dataset %s is now --dataset %s: the old name still works, use the "
                                            "new one", text, RENAMED_KINDS[text])
    return seg_dataset_kind(text)


def _require_dir(path, what):
    if not os.path.isdir(path):
        raise DataError(f'{path}: folder not found ({what})')


def _images(folder):
    return sorted(os.path.join(folder, name) for name in os.listdir(folder)
                  if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith('.'))


def _pair_or_error(image, label):
    if not os.path.isfile(label):
        raise DataError(f'{image} has no label: expected {label}')
    return image, label


def _same_stem_pairs(images_dir, labels_dir, layout):
    """(image, label) pairs of images_dir/<stem>.<ext> and labels_dir/<stem>.png."""
    _require_dir(images_dir, f'{layout}: images')
    _require_dir(labels_dir, f'{layout}: labels')
    return [_pair_or_error(p, os.path.join(labels_dir, os.path.splitext(os.path.basename(p))[0] + '.png'))
            for p in _images(images_dir)]


def ade20k_pairs(root, split) -> List[Tuple[str, str]]:
    return _same_stem_pairs(os.path.join(root, 'images', split), os.path.join(root, 'annotations', split),
                            'ADE20K layout: images/{training,validation}/*.jpg, annotations/{training,validation}/*.png')


def cityscapes_pairs(root, split) -> List[Tuple[str, str]]:
    images_dir = os.path.join(root, 'leftImg8bit', split)
    labels_dir = os.path.join(root, 'gtFine', split)
    _require_dir(images_dir, 'Cityscapes layout: leftImg8bit/{train,val}/<city>/*_leftImg8bit.png')
    _require_dir(labels_dir, 'Cityscapes layout: gtFine/{train,val}/<city>/*_gtFine_labelTrainIds.png')
    pairs = []
    for city in sorted(os.listdir(images_dir)):
        if not os.path.isdir(os.path.join(images_dir, city)):
            continue
        for image in _images(os.path.join(images_dir, city)):
            name = os.path.basename(image)
            if not name.endswith('_leftImg8bit.png'):
                continue
            stem = name[:-len('_leftImg8bit.png')]
            label = os.path.join(labels_dir, city, f'{stem}_gtFine_labelTrainIds.png')
            if not os.path.isfile(label) and os.path.isfile(label.replace('_labelTrainIds', '_labelIds')):
                raise DataError(f'{label} not found, but the released {os.path.basename(label).replace("_labelTrainIds", "_labelIds")} '
                                f'is there: write the train ids once with python -m tools.cityscapes_train_ids {root}')
            pairs.append(_pair_or_error(image, label))
    return pairs


def read_class_names(path) -> List[str]:
    if not os.path.isfile(path):
        raise DataError(f'{path} not found: the folder format needs classes.txt, one class name per line')
    with open(path, encoding='utf-8') as f:
        names = [line.strip() for line in f if line.strip()]
    if not names:
        raise DataError(f'{path} lists no classes')
    if len(names) > IGNORE_INDEX:
        raise DataError(f'{path} lists {len(names)} classes; at most {IGNORE_INDEX} fit in index PNGs with 255 = ignore')
    return names


def folder_pairs(root, split) -> List[Tuple[str, str]]:
    return _same_stem_pairs(os.path.join(root, 'images', split), os.path.join(root, 'labels', split),
                            'folder layout: images/<split>/<name>.jpg|png, labels/<split>/<name>.png')


class SegmentationDataset(Dataset):
    """(image tensor, label tensor, index) from (image, label) file pairs; `transform(image, label)`
    gets a PIL RGB image and a uint8 label array with the dataset's classes (0..K-1, 255 ignore)."""

    def __init__(self, pairs: Sequence[Tuple[str, str]], class_names: Sequence[str], transform: Optional[Callable] = None,
                 reduce_zero_label=False, name=''):
        self.pairs, self.class_names = list(pairs), list(class_names)
        self.num_classes = len(self.class_names)
        self.transform, self.reduce_zero_label, self.name = transform, reduce_zero_label, name

    def __len__(self):
        return len(self.pairs)

    def read_label(self, index) -> np.ndarray:
        """The label of pair `index` in class indices (0..K-1, 255 ignore), checked."""
        path = self.pairs[index][1]
        try:
            with Image.open(path) as img:
                if img.mode not in ('L', 'P', 'I', 'I;16'):
                    raise DataError(f'{path}: a label must be a single-channel index PNG, this one is {img.mode}')
                label = np.array(img)
        except (OSError, SyntaxError) as e:
            raise DataError(f'{path}: not a readable label image ({e})') from None
        if self.reduce_zero_label:
            label = label.astype(np.int64)
            label = np.where(label == 0, IGNORE_INDEX, label - 1)
            label[label == IGNORE_INDEX - 1] = IGNORE_INDEX
        bad = (label >= self.num_classes) & (label != IGNORE_INDEX)
        if bad.any():
            values = np.unique(label[bad])
            shown = values + 1 if self.reduce_zero_label else values
            raise DataError(f'{path}: label values {shown[:8].tolist()} are outside the {self.num_classes} classes '
                            f'(0..{self.num_classes - 1}, 255 = ignore{"; stored +1, 0 = ignore" if self.reduce_zero_label else ""})')
        return label.astype(np.uint8)

    def read_image(self, index) -> Image.Image:
        """The image of pair `index` as shown (EXIF orientation applied, 16-bit scaled to 8 bits)."""
        return read_image(self.pairs[index][0])

    def __getitem__(self, index):
        image, label = self.read_image(index), self.read_label(index)
        if (label.shape[1], label.shape[0]) != image.size:
            raise DataError(f'{self.pairs[index][1]} is {label.shape[1]}x{label.shape[0]} but its image '
                            f'{self.pairs[index][0]} is {image.size[0]}x{image.size[1]}')
        if self.transform is not None:
            image, label = self.transform(image, label)
        return image, label, index


def build_seg_dataset(kind: str, root: str, split: str, transform=None) -> SegmentationDataset:
    """The `split` ('train' or 'val') of an ade20k / cityscapes / seg-folder dataset at root."""
    kind = seg_dataset_kind(kind)
    if kind not in DATASET_KINDS:
        raise DataError(f'unknown dataset kind {kind!r}; choose one of {", ".join(DATASET_KINDS)}')
    _require_dir(root, f'the {kind} dataset root')
    folder = SPLITS[kind].get(split, split)
    if kind == 'ade20k':
        pairs, names = ade20k_pairs(root, folder), ADE20K_CLASSES
    elif kind == 'cityscapes':
        pairs, names = cityscapes_pairs(root, folder), CITYSCAPES_CLASSES
    else:
        pairs, names = folder_pairs(root, folder), read_class_names(os.path.join(root, 'classes.txt'))
    if not pairs:
        raise DataError(f'{root}: no images in the {folder} split of the {kind} layout')
    return SegmentationDataset(pairs, names, transform, reduce_zero_label=REDUCE_ZERO_LABEL[kind], name=kind)
