"""Training transforms that keep a (2, 5, h, w) label map in step with its image.

Order (the reference's): flips, RandAugment (geometric ops mirrored on the map with nearest
sampling, zero fill = a uniform label after softmax), RandomResizedCrop of the image only (its
box travels with the sample), then tensor conversion; normalisation and random erasing happen on
the batch (data/loader.py).
"""
import math
import random

import numpy as np
import torch
from PIL import Image
from timm.data.auto_augment import rand_augment_transform
from timm.data.transforms import RandomResizedCropAndInterpolation, str_to_pil_interp
from torchvision.transforms import functional as TF

from .augment_compat import fix_posterize

GEOMETRIC_OPS = ('Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'TranslateXRel', 'TranslateYRel')


def op_matrix(name, arg, width, height):
    """The output->input affine (a, b, c, d, e, f) that timm's op hands to PIL, in image pixels."""
    if name == 'ShearX':
        return 1., arg, 0., 0., 1., 0.
    if name == 'ShearY':
        return 1., 0., 0., arg, 1., 0.
    if name == 'TranslateXRel':
        return 1., 0., arg * width, 0., 1., 0.
    if name == 'TranslateYRel':
        return 1., 0., 0., 0., 1., arg * height
    if name == 'TranslateX':
        return 1., 0., arg, 0., 1., 0.
    if name == 'TranslateY':
        return 1., 0., 0., 0., 1., arg
    if name == 'Rotate':  # PIL's Image.rotate: counter-clockwise about the centre
        angle = -math.radians(arg)
        a, b = round(math.cos(angle), 15), round(math.sin(angle), 15)
        d, e = -b, a
        cx, cy = width / 2., height / 2.
        return a, b, cx - a * cx - b * cy, d, e, cy - d * cx - e * cy
    raise ValueError(f'{name} is not a geometric op')


def warp_label_map(label_map, matrices, width, height, frame=None):
    """Move a (2, 5, h, w) label map over a width x height image as a chain of affines (in the order
    they were applied) moved the image: each map cell takes the value under its centre's source
    point, traced back through every step, or zeros when the point left the picture at any step
    (the image shows fill colour there).

    The matrices act on the full image's pixels, or, with frame = (top, left, crop_h, crop_w,
    out_h, out_w), on the pixels of that crop resized to out_h x out_w (RandAugment after the crop)."""
    _, _, h, w = label_map.shape
    top, left, crop_h, crop_w, out_h, out_w = frame or (0, 0, height, width, height, width)
    sx, sy = out_w / crop_w, out_h / crop_h
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing='ij')
    x = ((xs + 0.5) * width / w - left) * sx  # cell centres in the pixels the ops worked on
    y = ((ys + 0.5) * height / h - top) * sy
    valid = torch.ones_like(x, dtype=torch.bool)
    for a, b, c, d, e, f in reversed(matrices):  # output -> input, last op first
        x, y = a * x + b * y + c, d * x + e * y + f
        valid &= (x >= 0) & (x < out_w) & (y >= 0) & (y < out_h)
        # the image was resampled at every step: continue from the centre of the pixel it read
        x, y = x.floor() + 0.5, y.floor() + 0.5
    x, y = x / sx + left, y / sy + top
    col = (x * w / width).floor().long().clamp(0, w - 1)
    row = (y * h / height).floor().long().clamp(0, h - 1)
    out = torch.zeros_like(label_map)
    out[:, :, valid] = label_map[:, :, row[valid], col[valid]]
    return out


class LabelAwareRandAugment:
    """timm's RandAugment, drawing exactly as timm does, with its geometric ops replayed on the map."""

    def __init__(self, config_str, hparams, transforms=None):
        self.rand_augment = fix_posterize(rand_augment_transform(config_str, hparams, transforms=transforms))
        self._applied = []
        for op in self.rand_augment.ops:
            op.aug_fn = self._recorder(op.name, op.aug_fn)

    def _recorder(self, name, fn):
        def record(img, *args, **kwargs):
            self._applied.append((name, args))
            return fn(img, *args, **kwargs)
        return record

    def __call__(self, img, label_map, image_size=None, frame=None):
        """Augment img; move label_map (over an image of image_size, default img's) to match."""
        self._applied = []
        img = self.rand_augment(img)
        matrices = [op_matrix(name, args[0], *img.size) for name, args in self._applied if name in GEOMETRIC_OPS]
        if matrices:
            label_map = warp_label_map(label_map, matrices, *(image_size or img.size), frame=frame)
        return img, label_map


class TokenLabelTrainTransform:
    """(PIL image, (2,5,h,w) map) -> (uint8 (3,H,W) image, (2,5,h,w) map, crop box (top,left,h,w)).

    aa_after_crop=True runs RandAugment on the resized crop instead of the full image (timm's order:
    less work per image, a different augmentation strength than the reference's); the map follows
    either way."""

    def __init__(self, img_size=224, scale=(0.08, 1.0), ratio=(3. / 4., 4. / 3.), hflip=0.5, vflip=0.,
                 auto_augment=None, interpolation='random', mean=(0.485, 0.456, 0.406), aa_after_crop=False):
        self.aa_after_crop = aa_after_crop
        self.hflip = hflip
        self.vflip = vflip
        self.crop = RandomResizedCropAndInterpolation(img_size, scale=scale, ratio=ratio,
                                                      interpolation=interpolation)
        self.rand_augment = None
        if auto_augment:
            if not auto_augment.startswith('rand'):
                raise ValueError(f'token labeling supports RandAugment ("rand-...") only, got {auto_augment!r}')
            size = img_size if isinstance(img_size, int) else min(img_size)
            hparams = dict(translate_const=int(size * 0.45),
                           img_mean=tuple(min(255, round(255 * m)) for m in mean))
            if interpolation != 'random':
                hparams['interpolation'] = str_to_pil_interp(interpolation)
            self.rand_augment = LabelAwareRandAugment(auto_augment, hparams)

    def __call__(self, img, label_map):
        if random.random() < self.hflip:
            img, label_map = img.transpose(Image.FLIP_LEFT_RIGHT), label_map.flip(-1)
        if random.random() < self.vflip:
            img, label_map = img.transpose(Image.FLIP_TOP_BOTTOM), label_map.flip(-2)
        if self.rand_augment is not None and not self.aa_after_crop:
            img, label_map = self.rand_augment(img, label_map)
        width, height = img.size
        top, left, h, w = self.crop.get_params(img, self.crop.scale, self.crop.ratio)
        interpolation = self.crop.interpolation
        if isinstance(interpolation, (tuple, list)):
            interpolation = random.choice(interpolation)
        img = TF.resized_crop(img, top, left, h, w, self.crop.size, interpolation)
        if self.rand_augment is not None and self.aa_after_crop:
            frame = (top, left, h, w, *self.crop.size)
            img, label_map = self.rand_augment(img, label_map, image_size=(width, height), frame=frame)
        box = (top / height, left / width, h / height, w / width)
        return pil_to_uint8(img), label_map, box


def pil_to_uint8(img):
    """PIL image -> contiguous uint8 (3, H, W) tensor (normalised later, on the batch)."""
    array = np.asarray(img.convert('RGB'), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()
