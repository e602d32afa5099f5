"""Users' photographs read as they are shown: EXIF orientation applied (a phone stores a portrait
photograph as a landscape image plus a tag), 16-bit greyscale scaled to 8 bits instead of clipped
to white, and an image whose pixel count is far beyond what a model takes decoded reduced (JPEG's
draft mode) or refused by name before it is decoded. ImageNet-style classification keeps the
reference's plain reading (data/dataset.py), so that validation numbers stay the reference's."""
import os
from typing import Optional

import numpy as np
from PIL import Image, ImageOps

from .dataset import DataError

__all__ = ['ImageTooLarge', 'MAX_PIXELS', 'decode_problem', 'displayed_size', 'read_image', 'read_shown']

ORIENTATION = 0x0112  # the EXIF tag
SWAPS_SIDES = (5, 6, 7, 8)  # orientations that turn the stored image by 90 degrees
MAX_PIXELS = 100_000_000  # what is decoded at full size at most: a 100-megapixel photograph
SIXTEEN_BIT = ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I')


class ImageTooLarge(DataError):
    """An image whose pixel count is beyond what can be decoded for the model."""


def displayed_size(image: Image.Image):
    """(width, height) of an opened image as shown, i.e. after its EXIF orientation; reads only the
    header."""
    width, height = image.size
    orientation = image.getexif().get(ORIENTATION, 1)
    return (height, width) if orientation in SWAPS_SIDES else (width, height)


def _eight_bit(image, path):
    if image.mode in SIXTEEN_BIT:
        values = np.asarray(image, dtype=np.int64)
        top = 65535 if image.mode != 'I' or values.max(initial=0) <= 65535 else None
        if top is None or values.min(initial=0) < 0:
            raise DataError(f'{path}: a 32-bit image (values {values.min()}..{values.max()}); save it with 8 or 16 '
                            f'bits per channel')
        return Image.fromarray((values * 255 // top).astype(np.uint8), 'L')
    if image.mode == 'F':
        raise DataError(f'{path}: a floating-point image; save it with 8 or 16 bits per channel')
    return image


def read_image(path, longest=None) -> Image.Image:
    """The RGB image at `path` as it is shown. `longest`: the largest side the caller will resize
    it to; a JPEG much larger than that is decoded reduced (by 2, 4 or 8, staying at least twice
    `longest`). An image of more than MAX_PIXELS pixels that cannot be reduced so is refused with
    ImageTooLarge; an unreadable one is a DataError naming the file."""
    return read_shown(path, longest)[0]


def read_shown(path, longest=None):
    """(read_image(path, longest), the (width, height) of the whole image as shown): the size the
    image has for the user, of which a reduced decoding is a scaled copy."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            shown = displayed_size(image)
            if longest and image.format == 'JPEG' and max(width, height) > 4 * longest:
                image.draft('RGB', (2 * longest, 2 * longest))
            if image.size[0] * image.size[1] > MAX_PIXELS:
                raise ImageTooLarge(f'{path}: {width}x{height} pixels ({width * height / 1e6:.0f} MP) is more than '
                                    f'this reads ({MAX_PIXELS // 1_000_000} MP); make it smaller first')
            image.load()
            return _eight_bit(ImageOps.exif_transpose(image), path).convert('RGB'), shown
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f'{path}: not a readable image ({e})') from None


def decode_problem(path) -> Optional[str]:
    """Why the image file at `path` cannot be decoded (missing, a link to nothing, empty, not an
    image, truncated), or None when it decodes. A JPEG is decoded at an eighth of its size: the
    whole file is still read and checked, in a fraction of the time."""
    try:
        with Image.open(path) as image:
            if image.format == 'JPEG':
                image.draft(image.mode, (image.width // 8 + 1, image.height // 8 + 1))
            image.load()
    except FileNotFoundError:
        return 'a link to a missing file' if os.path.islink(path) else 'no such file'
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return None
