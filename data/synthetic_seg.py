"""Small generated segmentation datasets for the demo and the tests: shapes of several classes on
textured backgrounds, with pixel-exact label maps, written in the folder, ADE20K or Cityscapes layout."""
import os

import numpy as np
from PIL import Image, ImageDraw

from .seg_dataset import seg_dataset_kind
from .synthetic import HUES, SHAPES, _draw_object

CLASS_NAMES = ('background',) + SHAPES


def make_seg_sample(height, width, num_classes, rng, objects=(1, 3)):
    """(RGB uint8 image, uint8 label) with class 0 the textured background and 1..K-1 shapes, each
    shape in its own colour family."""
    base = rng.integers(60, 200, size=3)
    noise = rng.normal(0, 18, size=(height, width, 1)) + rng.normal(0, 8, size=(height, width, 3))
    stripes = 20 * np.sin(np.arange(width)[None, :, None] / rng.uniform(2, 6) + rng.uniform(0, 6))
    image = Image.fromarray(np.clip(base + noise + stripes, 0, 255).astype(np.uint8))
    label = Image.new('L', (width, height), 0)
    draw, draw_label = ImageDraw.Draw(image), ImageDraw.Draw(label)
    for _ in range(int(rng.integers(objects[0], objects[1] + 1))):
        cls = int(rng.integers(1, num_classes))
        size = int(rng.integers(min(height, width) // 4, min(height, width) // 2))
        x0, y0 = int(rng.integers(0, width - size)), int(rng.integers(0, height - size))
        box = (x0, y0, x0 + size, y0 + size)
        colour = tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in HUES[(cls - 1) % len(HUES)])
        _draw_object(draw, SHAPES[(cls - 1) % len(SHAPES)], box, colour)
        _draw_object(draw_label, SHAPES[(cls - 1) % len(SHAPES)], box, cls)
    return np.asarray(image), np.asarray(label)


def _write(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def make_seg_dataset(root, layout='seg-folder', num_classes=5, train=32, val=8, size=(64, 64), seed=0):
    """Write a dataset at root (skipped when root/.complete exists); returns root. layout: 'seg-folder'
    (classes.txt, images/, labels/), 'ade20k' (labels stored +1, 0 = other) or 'cityscapes'
    (labelTrainIds and the released labelIds beside them). size: (h, w), or a list of sizes cycled
    through so that images differ in size."""
    layout = seg_dataset_kind(layout)
    marker = os.path.join(root, '.complete')
    if os.path.exists(marker):
        return root
    rng = np.random.default_rng(seed)
    sizes = [tuple(size)] if isinstance(size[0], int) else [tuple(s) for s in size]
    from .seg_dataset import CITYSCAPES_TRAIN_IDS
    train_to_label_id = {v: k for k, v in CITYSCAPES_TRAIN_IDS.items()}
    for split, count in (('train', train), ('val', val)):
        for i in range(count):
            h, w = sizes[i % len(sizes)]
            image, label = make_seg_sample(h, w, num_classes, rng)
            name = f'{split}_{i:04d}'
            if layout == 'seg-folder':
                _write(os.path.join(root, 'images', split, f'{name}.png'), image)
                _write(os.path.join(root, 'labels', split, f'{name}.png'), label)
            elif layout == 'ade20k':
                folder = {'train': 'training', 'val': 'validation'}[split]
                _write(os.path.join(root, 'images', folder, f'ADE_{name}.jpg'), image)
                _write(os.path.join(root, 'annotations', folder, f'ADE_{name}.png'), (label + 1).astype(np.uint8))
            elif layout == 'cityscapes':
                city = 'aachen' if i % 2 else 'bremen'
                stem = f'{city}_{i:06d}_000019'
                _write(os.path.join(root, 'leftImg8bit', split, city, f'{stem}_leftImg8bit.png'), image)
                _write(os.path.join(root, 'gtFine', split, city, f'{stem}_gtFine_labelTrainIds.png'), label)
                label_ids = np.vectorize(train_to_label_id.get)(label).astype(np.uint8)
                _write(os.path.join(root, 'gtFine', split, city, f'{stem}_gtFine_labelIds.png'), label_ids)
            else:
                raise ValueError(f'unknown layout {layout!r}')
    if layout == 'seg-folder':
        with open(os.path.join(root, 'classes.txt'), 'w') as f:
            f.write('\n'.join(CLASS_NAMES[:num_classes]) + '\n')
    open(marker, 'w').close()
    return root
