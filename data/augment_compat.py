"""Keeps timm's RandAugment working on Pillow releases that reject posterize(bits=0).

At magnitude 10 (reached by 'rand-m9-mstd0.5-inc1' whenever the sampled magnitude tops out),
timm's PosterizeIncreasing keeps 0 bits. Pillow 12+ raises ValueError for that; earlier Pillow
returned a black image, which is what the reference recipe trained with. The posterize ops are
replaced in timm's op table by one that does the same, before any RandAugment is built.
"""
from PIL import Image
from timm.data import auto_augment

_timm_posterize = auto_augment.posterize


def posterize(img, bits_to_keep, **kwargs):
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return _timm_posterize(img, bits_to_keep, **kwargs)


for _name in ('Posterize', 'PosterizeIncreasing', 'PosterizeOriginal'):
    if auto_augment.NAME_TO_OP.get(_name) is _timm_posterize:
        auto_augment.NAME_TO_OP[_name] = posterize
