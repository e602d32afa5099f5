"""Users' images for a model: read as shown (data/images.py), in proportion to what the model takes,
the ones that cannot be used listed with why; the names of the files written for them."""
import functools
import os

import torch

from data import DataError, ImageFiles
from data.images import read_shown
from utils.cli import UsageError

MAX_ASPECT = 50  # an image's long side over its short side, at most


def relative_names(paths):
    """Each image's path below the images' common folder, and the .png name its outputs take
    there; two images that would write the same name are a UsageError."""
    root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
    relative, outputs, owner = [], [], {}
    for path in paths:
        name = os.path.relpath(os.path.abspath(path), root)
        output = os.path.splitext(name)[0] + '.png'
        if output in owner:
            raise UsageError(f'{owner[output]} and {path} would both write {output}: predict them separately')
        owner[output] = path
        relative.append(name)
        outputs.append(output)
    return relative, outputs


def read_for_prediction(path, longest=None):
    """(the image as shown, possibly decoded reduced for a model that resizes to `longest` at most,
    and the whole image's shown (width, height)); an image too narrow for any model is a DataError."""
    image, shown = read_shown(path, longest)
    if max(shown) > MAX_ASPECT * min(shown):
        raise DataError(f'{path}: {shown[0]}x{shown[1]} is too narrow to predict on (sides over {MAX_ASPECT}:1)')
    return image, shown


def image_loader(paths, transform, batch_size, workers, longest=None):
    """(the images' ImageFiles, batches (lists) of ((transform(image), its shown (width, height)),
    index)); a file that cannot be read or transformed comes as (None, -1 - index)."""
    dataset = ImageFiles(paths, functools.partial(_transform_image, transform), placeholder=None,
                         read=functools.partial(read_for_prediction, longest=longest))
    return dataset, torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=list)


def _transform_image(transform, item):
    image, shown = item
    return transform(image), shown
