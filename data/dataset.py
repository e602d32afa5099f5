"""Image-folder datasets: plain, and with tlt-format token-label maps."""
import logging
import os

import torch
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from .token_label import pack_sample_target

_logger = logging.getLogger(__name__)
MAX_CORRUPT_SKIPS = 50


class DataError(RuntimeError):
    """A dataset folder, image or label file that is missing or malformed."""


def find_split(root, split=None):
    """The split folder: `root/<split>` (or `validation` for `val`) when present, else root itself."""
    if not os.path.isdir(root):
        raise DataError(f'data folder {root} does not exist')
    if split:
        names = [split] + (['validation'] if split == 'val' else []) + (['val'] if split == 'validation' else [])
        for name in names:
            if os.path.isdir(os.path.join(root, name)):
                return os.path.join(root, name)
    try:
        classes, _ = find_classes(root)
    except FileNotFoundError:
        classes = []
    if split and (not classes or set(classes) & {'train', 'val', 'validation', split}):
        raise DataError(f'{root} has no "{split}" folder (found: {", ".join(classes) or "nothing"})')
    if not classes:
        raise DataError(f'{root} holds no class folders (expected {root}/<class>/<image>)')
    return root


def label_path(label_root, image_path, image_root):
    """`<label_root>/<class_dir>/<image name up to its first dot>.pt`."""
    rel = os.path.relpath(image_path, image_root)
    class_dir, name = os.path.split(rel)
    return os.path.join(label_root, class_dir, name.split('.')[0] + '.pt')


def load_label_map(path):
    """A (2, 5, H, W) tlt label map, read in safe mode; any other content is an error naming the file."""
    try:
        label = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # noqa: BLE001 - every failure becomes one message naming the file
        raise DataError(f'cannot read token-label file {path}: {e}') from None
    if not isinstance(label, torch.Tensor) or label.ndim != 4 or tuple(label.shape[:2]) != (2, 5):
        shape = tuple(label.shape) if isinstance(label, torch.Tensor) else type(label).__name__
        raise DataError(f'token-label file {path} holds {shape}, expected a (2, 5, H, W) tensor')
    return label


class ImageFolderDataset(torch.utils.data.Dataset):
    """`root/<class>/<image>`; unreadable images are logged with their path and skipped."""

    def __init__(self, root, transform=None, class_to_idx=None):
        self.root = root
        if class_to_idx is None:
            _, class_to_idx = find_classes(root)
        self.class_to_idx = class_to_idx
        try:
            self.samples = make_dataset(root, class_to_idx, extensions=IMG_EXTENSIONS)
        except FileNotFoundError as e:
            raise DataError(f'{root}: {e}') from None
        if not self.samples:
            raise DataError(f'no images found under {root}')
        self.transform = transform
        self.targets = [t for _, t in self.samples]

    def __len__(self):
        return len(self.samples)

    def load_image(self, index):
        path, _ = self.samples[index]
        with open(path, 'rb') as f:
            return Image.open(f).convert('RGB')

    def _readable(self, index):
        """The first index from `index` on whose image decodes, and that image."""
        for attempt in range(MAX_CORRUPT_SKIPS):
            i = (index + attempt) % len(self)
            try:
                return i, self.load_image(i)
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                _logger.warning('skipping unreadable image %s: %s', self.samples[i][0], e)
        raise DataError(f'{MAX_CORRUPT_SKIPS} unreadable images in a row from {self.samples[index][0]}')

    def __getitem__(self, index):
        index, img = self._readable(index)
        if self.transform is not None:
            img = self.transform(img)
        return img, self.samples[index][1]


class DatasetTokenLabel(ImageFolderDataset):
    """Images with their token-label maps; yields (image, (3, 5, H, W) per-sample layout).

    Every image's label file is checked for existence up front: all missing ones are reported at
    once, before any training step."""

    def __init__(self, root, label_root, transform=None, class_to_idx=None):
        super().__init__(root, transform=None, class_to_idx=class_to_idx)
        self.label_root = label_root
        self.transform = transform
        if not os.path.isdir(label_root):
            raise DataError(f'token-label folder {label_root} does not exist')
        self.label_paths = [label_path(label_root, p, root) for p, _ in self.samples]
        missing = [p for p in self.label_paths if not os.path.isfile(p)]
        if missing:
            shown = '\n  '.join(missing[:5])
            raise DataError(f'{len(missing)} of {len(self.samples)} images under {root} have no token-label '
                            f'file in {label_root}; first missing:\n  {shown}')

    def __getitem__(self, index):
        index, img = self._readable(index)
        label_map = load_label_map(self.label_paths[index])
        class_index = self.samples[index][1]
        if self.transform is None:
            box = (0., 0., 1., 1.)
        else:
            img, label_map, box = self.transform(img, label_map)
        return img, pack_sample_target(label_map, box, class_index)


def create_token_label_dataset(dataset_type, root, label_root, transform=None):
    """tlt's factory: `dataset_type` '' or 'folder' (ImageNet-style folders) is supported."""
    if dataset_type not in ('', 'folder', 'imagenet'):
        raise DataError(f'dataset type {dataset_type!r} is not supported for token labeling; use an image folder')
    return DatasetTokenLabel(root, label_root, transform=transform)
