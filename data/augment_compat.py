"""Keeps timm's RandAugment working on Pillow releases that reject posterize(bits=0).

At magnitude 10 (reached by 'rand-m9-mstd0.5-inc1' whenever the sampled magnitude tops out),
timm's PosterizeIncreasing keeps 0 bits. Pillow 12+ raises ValueError for that; earlier Pillow
returned a black image, which is what the reference recipe trained with. `fix_posterize` is applied
to each augmentation this repository builds (data/loader.py, data/transforms.py): the posterize
ops of that transform get the old behaviour. timm itself is left untouched.
"""
from PIL import Image
from timm.data import auto_augment


def posterize(img, bits_to_keep, **kwargs):
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def fix_posterize(transform):
    """Give every timm posterize op inside `transform` (a RandAugment, AutoAugment or a Compose
    holding one) the behaviour above; returns the transform."""
    stack = [transform]
    while stack:
        t = stack.pop()
        if isinstance(t, auto_augment.AugmentOp):
            if t.aug_fn is auto_augment.posterize:
                t.aug_fn = posterize
            continue
        for attr in ('transforms', 'ops', 'policy'):
            children = getattr(t, attr, None)
            if isinstance(children, (list, tuple)):
                stack.extend(children)
    return transform
