"""A small generated image dataset with tlt-format token labels, for the demo and the tests.

Each class is a shape in its own colour family on a noisy background. The token labels come
from the objects' masks: per label-map cell, the true class gets a logit that grows with the
share of the cell the object covers, and four other classes get small random logits.
"""
import os

import numpy as np
import torch
from PIL import Image, ImageDraw

SHAPES = ('ellipse', 'rectangle', 'triangle', 'cross', 'diamond', 'ring', 'bar', 'plus')
HUES = ((220, 60, 60), (60, 180, 70), (60, 90, 220), (230, 200, 40), (200, 70, 200), (40, 200, 210),
        (240, 140, 40), (150, 150, 150))


def _draw_object(draw, shape, box, colour):
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    w, h = x1 - x0, y1 - y0
    if shape == 'ellipse':
        draw.ellipse(box, fill=colour)
    elif shape == 'rectangle':
        draw.rectangle(box, fill=colour)
    elif shape == 'triangle':
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=colour)
    elif shape == 'cross':
        draw.line([(x0, y0), (x1, y1)], fill=colour, width=max(2, int(w / 5)))
        draw.line([(x0, y1), (x1, y0)], fill=colour, width=max(2, int(w / 5)))
    elif shape == 'diamond':
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=colour)
    elif shape == 'ring':
        draw.ellipse(box, outline=colour, width=max(2, int(w / 6)))
    elif shape == 'bar':
        draw.rectangle((x0, cy - h / 6, x1, cy + h / 6), fill=colour)
    else:
        draw.rectangle((cx - w / 8, y0, cx + w / 8, y1), fill=colour)
        draw.rectangle((x0, cy - h / 8, x1, cy + h / 8), fill=colour)


def make_sample(class_index, img_size, label_size, num_classes, rng):
    """(PIL image, (2, 5, label_size, label_size) half label map) for one generated object."""
    noise = rng.integers(90, 166, size=(img_size, img_size, 3), dtype=np.uint8)
    image = Image.fromarray(noise)
    mask = Image.new('L', (img_size, img_size), 0)
    side = rng.uniform(0.35, 0.7) * img_size
    x0, y0 = rng.uniform(0, img_size - side, size=2)
    box = (x0, y0, x0 + side, y0 + side)
    colour = tuple(int(np.clip(c + rng.integers(-30, 31), 0, 255)) for c in HUES[class_index % len(HUES)])
    shape = SHAPES[class_index % len(SHAPES)]
    _draw_object(ImageDraw.Draw(image), shape, box, colour)
    _draw_object(ImageDraw.Draw(mask), shape, box, 255)

    cover = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.)
    cover = torch.nn.functional.adaptive_avg_pool2d(cover[None, None], label_size)[0, 0]
    logits = torch.zeros(5, label_size, label_size)
    classes = torch.zeros(5, label_size, label_size)
    logits[0] = 1.0 + 7.0 * cover
    classes[0] = class_index
    others = [c for c in range(num_classes) if c != class_index]
    for slot in range(1, 5):
        pick = torch.from_numpy(rng.choice(others, size=(label_size, label_size)))
        classes[slot] = pick.float()
        logits[slot] = torch.from_numpy(rng.uniform(-1.0, 0.8, size=(label_size, label_size))).float()
    return image, torch.stack([logits, classes]).half()


def make_shapes_dataset(root, num_classes=4, train_per_class=64, val_per_class=16, img_size=64, label_size=8,
                        seed=0):
    """Write root/train, root/val (class folders of PNGs) and root/labels (tlt label maps for train).
    Returns root. Existing complete datasets are left as they are."""
    if not 1 < num_classes <= len(SHAPES):
        raise ValueError(f'num_classes must be 2..{len(SHAPES)}, got {num_classes}')
    if label_size < 6:
        raise ValueError(f'label_size must be at least 6 (the tlt layout needs room for box and class), '
                         f'got {label_size}')
    done_marker = os.path.join(root, '.complete')
    if os.path.isfile(done_marker):
        return root
    rng = np.random.default_rng(seed)
    for split, per_class in (('train', train_per_class), ('val', val_per_class)):
        for c in range(num_classes):
            class_dir = f'class_{c}_{SHAPES[c]}'
            os.makedirs(os.path.join(root, split, class_dir), exist_ok=True)
            if split == 'train':
                os.makedirs(os.path.join(root, 'labels', class_dir), exist_ok=True)
            for i in range(per_class):
                image, label = make_sample(c, img_size, label_size, num_classes, rng)
                image.save(os.path.join(root, split, class_dir, f'{split}_{c}_{i:04d}.png'))
                if split == 'train':
                    torch.save(label, os.path.join(root, 'labels', class_dir, f'{split}_{c}_{i:04d}.pt'))
    with open(done_marker, 'w') as f:
        f.write('ok\n')
    return root


def object_scenes(count, size=64, token_stride=16, generator=None):
    """Scenes for dense prediction: dim noise with one square object, class 1 (red) or 2 (blue), of
    side size/4 to size/2 placed anywhere. Returns images (count, 3, size, size) in [0, 1], per-token
    targets (count, size / token_stride, size / token_stride): the object's class where it covers
    the token's centre, else 0 (background), and the image classes (count,)."""
    grid = size // token_stride
    images = torch.rand(count, 3, size, size, generator=generator) * 0.3
    tokens = torch.zeros(count, grid, grid, dtype=torch.long)
    classes = torch.randint(1, 3, (count,), generator=generator)
    centres = torch.arange(grid) * token_stride + token_stride // 2
    for i in range(count):
        side = int(torch.randint(size // 4, size // 2 + 1, (1,), generator=generator))
        y, x = (int(v) for v in torch.randint(0, size - side + 1, (2,), generator=generator))
        images[i, :, y:y + side, x:x + side] = 0.1
        images[i, 0 if classes[i] == 1 else 2, y:y + side, x:x + side] = 1.0
        rows = (centres >= y) & (centres < y + side)
        cols = (centres >= x) & (centres < x + side)
        tokens[i][rows[:, None] & cols[None, :]] = classes[i]
    return images, tokens, classes
