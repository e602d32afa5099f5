"""Segmentation transforms (mmseg's ADE20K / Cityscapes pipelines), applied to an image and its
label together. Images are PIL RGB or uint8 (H, W, 3) arrays; labels are uint8/int (H, W) arrays of
class indices with 255 = ignore. Labels are only ever resized with nearest neighbour.

Randomness comes from Python's `random` (seeded per DataLoader worker by torch).
"""
import random
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from layers import IGNORE_INDEX



def _pil(image):
    return image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))


def keep_ratio_size(height: int, width: int, scale: Tuple[int, int]) -> Tuple[int, int]:
    """(h, w) of an image rescaled to fit `scale` (long side, short side) keeping its aspect ratio,
    as mmcv's rescale: factor = min(long / max(h, w), short / min(h, w))."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def resize(image, label, size: Tuple[int, int]):
    """Image bilinear, label nearest, to (h, w)."""
    h, w = size
    image = _pil(image).resize((w, h), Image.BILINEAR)
    if label is not None:
        label = np.asarray(Image.fromarray(np.asarray(label, dtype=np.uint8)).resize((w, h), Image.NEAREST))
    return image, label


def random_rescale(image, label, scale, ratio_range=(0.5, 2.0), rng=random):
    """mmseg's RandomResize: `scale` times a ratio drawn from ratio_range, keeping aspect ratio."""
    ratio = rng.uniform(*ratio_range)
    w, h = _pil(image).size
    target = keep_ratio_size(h, w, (int(scale[0] * ratio), int(scale[1] * ratio)))
    return resize(image, label, target)


def _crop_box(height, width, crop_size, rng):
    ch, cw = crop_size
    y = rng.randint(0, max(height - ch, 0))
    x = rng.randint(0, max(width - cw, 0))
    return y, min(y + ch, height), x, min(x + cw, width)


def random_crop(image, label, crop_size, cat_max_ratio=0.75, ignore_index=IGNORE_INDEX, rng=random, max_tries=10):
    """A random crop_size crop (smaller when the image is); with cat_max_ratio < 1 the crop is drawn
    again (up to max_tries) until it holds at least two classes and none covers more than
    cat_max_ratio of its labelled pixels. Returns (image array, label, box)."""
    image = np.asarray(image)
    h, w = label.shape
    box = _crop_box(h, w, crop_size, rng)
    if cat_max_ratio < 1.0:
        for _ in range(max_tries):
            y1, y2, x1, x2 = box
            values, counts = np.unique(label[y1:y2, x1:x2], return_counts=True)
            counts = counts[values != ignore_index]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            box = _crop_box(h, w, crop_size, rng)
    y1, y2, x1, x2 = box
    return image[y1:y2, x1:x2], label[y1:y2, x1:x2], box


def hflip(image, label):
    return np.ascontiguousarray(np.asarray(image)[:, ::-1]), np.ascontiguousarray(label[:, ::-1])


def photometric_distortion(image, rng=random, brightness_delta=32, contrast_range=(0.5, 1.5),
                           saturation_range=(0.5, 1.5), hue_delta=18):
    """mmseg's PhotoMetricDistortion on a uint8 RGB array: brightness +-32, contrast 0.5-1.5 (before
    or after the colour changes, at random), saturation 0.5-1.5, hue +-18 (OpenCV's 0-180 hue
    scale), each with probability 0.5; values clipped to 0-255 after each step."""
    img = np.asarray(image).astype(np.float32)

    def contrast(x):
        if rng.randint(0, 1):
            x = np.clip(x * rng.uniform(*contrast_range), 0, 255)
        return x

    if rng.randint(0, 1):
        img = np.clip(img + rng.uniform(-brightness_delta, brightness_delta), 0, 255)
    contrast_first = rng.randint(0, 1) == 1
    if contrast_first:
        img = contrast(img)
    do_saturation, do_hue = rng.randint(0, 1), rng.randint(0, 1)
    saturation = rng.uniform(*saturation_range) if do_saturation else 1.0
    hue = rng.randint(-hue_delta, hue_delta) if do_hue else 0
    if do_saturation or do_hue:
        hsv = np.asarray(Image.fromarray(img.astype(np.uint8)).convert('HSV')).astype(np.float32)
        hsv[..., 1] = np.clip(hsv[..., 1] * saturation, 0, 255)
        hsv[..., 0] = np.mod(hsv[..., 0] + hue * 256.0 / 180.0, 256.0)  # PIL's hue runs over 0-255
        img = np.asarray(Image.fromarray(hsv.astype(np.uint8), mode='HSV').convert('RGB')).astype(np.float32)
    if not contrast_first:
        img = contrast(img)
    return img.astype(np.uint8)


def to_tensor(image, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD):
    """uint8 (H, W, 3) -> normalised float (3, H, W)."""
    x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div_(255)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def pad(image: torch.Tensor, label: Optional[torch.Tensor], size, ignore_index=IGNORE_INDEX):
    """Pad at the bottom and right to `size`: the (normalised) image with 0, the label with ignore."""
    h, w = image.shape[1:]
    ph, pw = max(size[0] - h, 0), max(size[1] - w, 0)
    if ph or pw:
        image = torch.nn.functional.pad(image, (0, pw, 0, ph), value=0.)
        if label is not None:
            label = torch.nn.functional.pad(label, (0, pw, 0, ph), value=ignore_index)
    return image, label


class SegTrainTransform:
    """Random resize (scale x [0.5, 2.0]), random crop with cat_max_ratio, horizontal flip,
    photometric distortion, normalisation, padding to the crop size."""

    def __init__(self, crop_size: Sequence[int], scale: Sequence[int], ratio_range=(0.5, 2.0), cat_max_ratio=0.75,
                 flip_prob=0.5, photometric=True, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                 ignore_index=IGNORE_INDEX):
        self.crop_size, self.scale, self.ratio_range = tuple(crop_size), tuple(scale), tuple(ratio_range)
        self.cat_max_ratio, self.flip_prob, self.photometric = cat_max_ratio, flip_prob, photometric
        self.mean, self.std, self.ignore_index = mean, std, ignore_index

    def __call__(self, image, label):
        image, label = random_rescale(image, label, self.scale, self.ratio_range)
        image, label, _ = random_crop(image, label, self.crop_size, self.cat_max_ratio, self.ignore_index)
        if random.random() < self.flip_prob:
            image, label = hflip(image, label)
        if self.photometric:
            image = photometric_distortion(image)
        x, y = pad(to_tensor(image, self.mean, self.std), torch.from_numpy(np.array(label, dtype=np.int64)),
                   self.crop_size, self.ignore_index)
        return x, y


class SegEvalTransform:
    """Resize to `scale` keeping aspect ratio (None: the original size), normalise. The label stays
    at the original size: predictions are resized back to it for scoring."""

    def __init__(self, scale: Optional[Sequence[int]] = None, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD):
        self.scale, self.mean, self.std = (tuple(scale) if scale else None), mean, std

    def __call__(self, image, label):
        return self.image(image), torch.from_numpy(np.array(label, dtype=np.int64))

    def image(self, image):
        """The normalised image alone (for images that have no label)."""
        image = _pil(image)
        if self.scale is not None:
            w, h = image.size
            image, _ = resize(image, None, keep_ratio_size(h, w, self.scale))
        return to_tensor(np.asarray(image.convert('RGB')), self.mean, self.std)
