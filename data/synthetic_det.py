"""A small generated COCO-format instance dataset for the detection demo and tests: coloured shapes
on textured backgrounds in COCO's layout (annotations/instances_{train,val}2017.json, train2017/,
val2017/), with what real COCO files hold: category ids with gaps, polygon masks, compressed and
uncompressed RLE masks, a crowd region, an image without annotations, images wider than high and
higher than wide."""
import json
import os

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from .synthetic import HUES, _draw_object

# (COCO-style id with gaps, name, shape drawn, colour family)
CATEGORIES = ((3, 'square', 'rectangle', HUES[0]), (7, 'disc', 'ellipse', HUES[2]), (12, 'diamond', 'diamond', HUES[1]))
SIZES = ((96, 128), (128, 96), (112, 112))  # (height, width), cycled


def uncompressed_rle(binary):
    """COCO's uncompressed RLE of a 0/1 mask: run lengths in column-major order, zeros first."""
    flat = np.asarray(binary, dtype=np.uint8).flatten(order='F')
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        counts = [0] + counts
    return {'size': list(binary.shape), 'counts': counts}


def compressed_rle(binary):
    rle = mask_utils.encode(np.asfortranarray(np.asarray(binary, dtype=np.uint8)))
    return {'size': list(rle['size']), 'counts': rle['counts'].decode('ascii')}


def _polygon(shape, box):
    """The outline of `shape` in `box` as one COCO polygon (x, y, x, y, ...)."""
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == 'rectangle':
        points = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    else:  # diamond
        points = [(cx, y0), (x1, cy), (cx, y1), (x0, cy)]
    return [float(v) for p in points for v in p]


def _sample(height, width, rng, image_id, first_ann_id, objects, crowd):
    base = rng.integers(70, 190, size=3)
    noise = rng.normal(0, 14, size=(height, width, 1)) + rng.normal(0, 6, size=(height, width, 3))
    stripes = 16 * np.sin(np.arange(width)[None, :, None] / rng.uniform(2, 6) + rng.uniform(0, 6))
    image = Image.fromarray(np.clip(base + noise + stripes, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    occupied = np.zeros((height, width), bool)
    anns = []
    for _ in range(objects):
        index = int(rng.integers(len(CATEGORIES)))
        category, _, shape, hue = CATEGORIES[index]
        size = int(rng.integers(min(height, width) // 4, min(height, width) // 2 + 1))
        for _ in range(20):  # objects do not overlap, so every mask is the whole shape
            x0, y0 = int(rng.integers(0, width - size)), int(rng.integers(0, height - size))
            if not occupied[y0:y0 + size, x0:x0 + size].any():
                break
        else:
            continue
        box = (x0, y0, x0 + size, y0 + size)
        colour = tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in hue)
        _draw_object(draw, shape, box, colour)
        mask_image = Image.new('L', (width, height), 0)
        _draw_object(ImageDraw.Draw(mask_image), shape, box, 1)
        binary = np.asarray(mask_image, dtype=np.uint8)
        occupied |= binary.astype(bool)
        ys, xs = np.nonzero(binary)
        bbox = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]
        if shape == 'ellipse':  # discs: compressed RLE, and uncompressed on every other image
            segmentation = compressed_rle(binary) if image_id % 2 else uncompressed_rle(binary)
        else:
            segmentation = [_polygon(shape, box)]
        anns.append({'id': first_ann_id + len(anns), 'image_id': image_id, 'category_id': category, 'iscrowd': 0,
                     'bbox': bbox, 'area': float(binary.sum()), 'segmentation': segmentation})
    if crowd:  # a cluster of small discs, annotated as one crowd region (uncompressed RLE, as COCO's)
        crowd_mask = Image.new('L', (width, height), 0)
        crowd_draw = ImageDraw.Draw(crowd_mask)
        free = np.argwhere(~occupied[:height - 24, :width - 24])
        if len(free):
            y, x = free[int(rng.integers(len(free)))]
            for dx, dy in ((0, 0), (12, 2), (4, 12), (14, 13)):
                disc = (int(x) + dx, int(y) + dy, int(x) + dx + 9, int(y) + dy + 9)
                _draw_object(draw, 'ellipse', disc, CATEGORIES[1][3])
                _draw_object(crowd_draw, 'ellipse', disc, 1)
            binary = np.asarray(crowd_mask, dtype=np.uint8)
            ys, xs = np.nonzero(binary)
            anns.append({'id': first_ann_id + len(anns), 'image_id': image_id, 'category_id': CATEGORIES[1][0],
                         'iscrowd': 1, 'area': float(binary.sum()), 'segmentation': uncompressed_rle(binary),
                         'bbox': [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
                                  float(ys.max() - ys.min() + 1)]})
    return np.asarray(image), anns


def make_coco_dataset(root, train=48, val=12, seed=0):
    """Write the dataset at root in COCO's layout (skipped when root/.complete exists); returns root.
    Each split has one image without annotations and one with a crowd region."""
    marker = os.path.join(root, '.complete')
    if os.path.exists(marker):
        return root
    rng = np.random.default_rng(seed)
    categories = [{'id': c, 'name': name, 'supercategory': 'shape'} for c, name, _, _ in CATEGORIES]
    image_id, ann_id = 1, 1
    for split, count in (('train', train), ('val', val)):
        folder = os.path.join(root, f'{split}2017')
        os.makedirs(folder, exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            height, width = SIZES[i % len(SIZES)]
            objects = 0 if i == count - 1 else int(rng.integers(1, 4))
            array, anns = _sample(height, width, rng, image_id, ann_id, objects, crowd=i == 1)
            name = f'{image_id:012d}.jpg'
            Image.fromarray(array).save(os.path.join(folder, name), quality=95)
            images.append({'id': image_id, 'file_name': name, 'width': width, 'height': height})
            annotations += anns
            image_id, ann_id = image_id + 1, ann_id + len(anns)
        os.makedirs(os.path.join(root, 'annotations'), exist_ok=True)
        with open(os.path.join(root, 'annotations', f'instances_{split}2017.json'), 'w') as f:
            json.dump({'images': images, 'annotations': annotations, 'categories': categories}, f)
    open(marker, 'w').close()
    return root
