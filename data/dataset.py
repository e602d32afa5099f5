"""Image-folder datasets: plain, and with tlt-format token-label maps."""
import glob
import io
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


def label_path_collisions(label_paths, image_paths):
    """{label file: [images]} for label files that more than one image would share (tlt names a
    label after the image name up to its first dot: img.png and img.jpg, or a.v1.png and a.v2.png)."""
    owners = {}
    for label, image in zip(label_paths, image_paths):
        owners.setdefault(label, []).append(image)
    return {label: images for label, images in owners.items() if len(images) > 1}


def describe_collisions(collisions):
    shown = '\n  '.join(f'{label} <- {", ".join(images)}' for label, images in list(collisions.items())[:5])
    return (f'{len(collisions)} token-label file(s) would be shared by several images (names are cut at the first '
            f'dot); rename the images:\n  {shown}')


def load_label_map(path, num_classes=None, size=None, data=None):
    """A (2, 5, H, W) tlt label map, read in safe mode and checked: a floating tensor, finite scores,
    whole class indices in [0, num_classes), H x W equal to `size` when given. Anything else is an
    error naming the file. `data`: the file's bytes when they come from elsewhere (a shard); `path`
    then only names them in messages."""
    try:
        label = torch.load(io.BytesIO(data) if data is not None else path, map_location='cpu', weights_only=True)
    except Exception as e:  # noqa: BLE001 - every failure becomes one message naming the file
        raise DataError(f'cannot read token-label file {path}: {e}') from None
    if not isinstance(label, torch.Tensor) or label.ndim != 4 or tuple(label.shape[:2]) != (2, 5):
        shape = tuple(label.shape) if isinstance(label, torch.Tensor) else type(label).__name__
        raise DataError(f'token-label file {path} holds {shape}, expected a (2, 5, H, W) tensor')
    if not label.is_floating_point():
        raise DataError(f'token-label file {path} holds a {label.dtype} tensor, expected half or float '
                        f'(scores and class indices as numbers)')
    if size is not None and tuple(label.shape[2:]) != tuple(size):
        raise DataError(f'token-label file {path} is {label.shape[2]}x{label.shape[3]}, the other label maps are '
                        f'{size[0]}x{size[1]}')
    if not torch.isfinite(label).all():
        raise DataError(f'token-label file {path} holds NaN or Inf values')
    indices = label[1].float()
    if not torch.equal(indices, indices.round()) or indices.min() < 0 or \
            (num_classes is not None and indices.max() >= num_classes):
        bound = f'0..{num_classes - 1}' if num_classes is not None else '>= 0'
        raise DataError(f'token-label file {path}: class indices must be whole numbers in {bound}, found values from '
                        f'{indices.min().item():g} to {indices.max().item():g}')
    return label


def eval_class_indices(root, class_names):
    """{class folder: index} for an evaluation folder read with the training class list: every
    folder of `root` must be one of `class_names` (an error before any compute otherwise); classes
    without a folder are only reported. Indices are those of the training list."""
    found = find_classes(root)[0] if os.path.isdir(root) else []
    unknown = sorted(set(found) - set(class_names))
    if unknown:
        raise DataError(f'{root} has {len(unknown)} class folder(s) that the training classes do not have: '
                        f'{", ".join(unknown[:10])}{" ..." if len(unknown) > 10 else ""}')
    absent = [c for c in class_names if c not in found]
    if absent:
        _logger.warning('%s has no folder for %d of the %d training classes (%s%s); their indices stay those of '
                        'training', root, len(absent), len(class_names), ', '.join(absent[:5]),
                        ' ...' if len(absent) > 5 else '')
    return {c: i for i, c in enumerate(class_names) if c in found}


class ImageFolderDataset(torch.utils.data.Dataset):
    """`root/<class>/<image>`; unreadable images are logged with their path and skipped."""

    def __init__(self, root, transform=None, class_to_idx=None, skip_unreadable=False):
        self.root = root
        self.skip_unreadable = skip_unreadable  # evaluation: an unreadable image yields None, not its neighbour
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
        if self.skip_unreadable:
            try:
                img = self.load_image(index)
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                _logger.warning('skipping unreadable image %s: %s', self.samples[index][0], e)
                return None
        else:
            index, img = self._readable(index)
        if self.transform is not None:
            img = self.transform(img)
        return img, self.samples[index][1]


def collate_readable(batch):
    """default_collate over the samples that could be read (evaluation counts only those)."""
    readable = [sample for sample in batch if sample is not None]
    if not readable:
        raise DataError(f'all {len(batch)} images of an evaluation batch are unreadable (see the warnings above)')
    return torch.utils.data.default_collate(readable)


class DatasetTokenLabel(ImageFolderDataset):
    """Images with their token-label maps; yields (image, (3, 5, H, W) per-sample layout).

    Every image's label file is checked for existence up front: all missing ones are reported at
    once, before any training step."""

    def __init__(self, root, label_root, transform=None, class_to_idx=None, num_classes=None):
        super().__init__(root, transform=None, class_to_idx=class_to_idx)
        self.label_root = label_root
        self.transform = transform
        self.num_classes = num_classes
        if not os.path.isdir(label_root):
            raise DataError(f'token-label folder {label_root} does not exist')
        self.label_paths = [label_path(label_root, p, root) for p, _ in self.samples]
        collisions = label_path_collisions(self.label_paths, [p for p, _ in self.samples])
        if collisions:
            raise DataError(f'{root}: ' + describe_collisions(collisions))
        missing = [p for p in self.label_paths if not os.path.isfile(p)]
        if missing:
            shown = '\n  '.join(missing[:5])
            raise DataError(f'{len(missing)} of {len(self.samples)} images under {root} have no token-label '
                            f'file in {label_root}; first missing:\n  {shown}')
        # the first map fixes the size every other one must have (checked when each is read)
        self.label_size = tuple(load_label_map(self.label_paths[0], num_classes).shape[2:])

    def __getitem__(self, index):
        index, img = self._readable(index)
        label_map = load_label_map(self.label_paths[index], self.num_classes, self.label_size)
        class_index = self.samples[index][1]
        if self.transform is None:
            box = (0., 0., 1., 1.)
        else:
            img, label_map, box = self.transform(img, label_map)
        return img, pack_sample_target(label_map, box, class_index)


def hf_dataset(name, root, split, is_training=False):
    """timm's reader of a Hugging Face dataset (`name`: 'hfds/<dataset>'; `root`: the datasets cache
    folder); the transform is set by the caller."""
    from timm.data import create_dataset
    try:
        return create_dataset(name, root=root, split=split, is_training=is_training)
    except ImportError as e:
        raise DataError(f'--dataset {name} needs the Hugging Face datasets package (pip install datasets); importing '
                        f'it failed: {e}') from None
    except Exception as e:  # noqa: BLE001 - the datasets library raises many kinds; one message names the split
        raise DataError(f'--dataset {name}: cannot load split {split!r}: {e}') from None


def hf_class_names(dataset):
    return [c for c, _ in sorted(dataset.reader.class_to_idx.items(), key=lambda item: item[1])]


def create_token_label_dataset(dataset_type, root, label_root, transform=None):
    """tlt's factory: `dataset_type` '' or 'folder' (ImageNet-style folders) is supported."""
    if dataset_type not in ('', 'folder', 'imagenet'):
        raise DataError(f'dataset type {dataset_type!r} is not supported for token labeling; use an image folder')
    return DatasetTokenLabel(root, label_root, transform=transform)


def find_images(inputs):
    """The image files that `inputs` name, in order and once each: files as given, folders searched
    recursively (sorted), glob patterns (sorted; ** recurses). A name that is none of these, or
    matches no image, is a DataError naming it."""
    found = []
    for item in inputs:
        if os.path.isfile(item):
            matches = [item]
        elif os.path.isdir(item):
            matches = sorted(os.path.join(root, name) for root, _, names in os.walk(item) for name in names
                             if name.lower().endswith(IMG_EXTENSIONS))
        elif glob.has_magic(item):
            matches = sorted(p for p in glob.glob(item, recursive=True)
                             if os.path.isfile(p) and p.lower().endswith(IMG_EXTENSIONS))
        else:
            raise DataError(f'{item}: no such file or folder')
        if not matches:
            raise DataError(f'{item}: no images ({", ".join(IMG_EXTENSIONS)})')
        found += matches
    seen = set()
    return [p for p in found if not (os.path.abspath(p) in seen or seen.add(os.path.abspath(p)))]


class ImageFiles(torch.utils.data.Dataset):
    """(transform(read(path)), index) for a list of image files. A file that cannot be read or
    transformed (data/images.py's read_image refuses what it cannot read as shown) gives
    `placeholder` (an image of the transform's output shape) and -1 - index, so that a batch of only
    such files still collates and the caller knows which ones they were; `failure(index)` says why."""

    def __init__(self, paths, transform, placeholder, read):
        self.paths, self.transform, self.placeholder, self.read = list(paths), transform, placeholder, read

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        try:
            return self.transform(self.read(self.paths[index])), index
        except (DataError, OSError, ValueError, RuntimeError):
            return self.placeholder, -1 - index

    def failure(self, index) -> str:
        """Why the file `index` gives the placeholder (read again, in this process)."""
        try:
            self.transform(self.read(self.paths[index]))
        except (DataError, OSError, ValueError, RuntimeError) as e:
            text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            return text if text.startswith(self.paths[index]) else f'{self.paths[index]}: {text}'
        return f'{self.paths[index]}: read on a second try'
