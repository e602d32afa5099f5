"""One interface over the three kinds of classification data: class folders, the tar shards of
tools/make_shards.py ('wds') and Hugging Face datasets ('hfds/NAME'). `open_split(kind, root,
split)` gives a split that knows its classes, maps them to a model's classes, says whether it
carries token-label maps, and builds its training and evaluation loaders; the scripts never
branch on the kind.
"""
import os

from torchvision.datasets.folder import find_classes

from .dataset import DataError, DatasetTokenLabel, eval_class_indices, find_split, hf_class_names, hf_dataset
from .loader import (create_eval_loader, create_shard_eval_loader, create_shard_train_loader, create_token_label_loader,
                     create_train_loader, eval_transform, train_transform, wrap_loader)
from .shards import find_shard_split, shard_class_map


def dataset_kind(name):
    """'folder', 'wds' or 'hfds' of a --dataset value ('' is 'folder')."""
    return name.split('/')[0] if name else 'folder'


class FolderSplit:
    """A split of class folders, `root/<split>/<class>/<image>` (or the folder itself)."""
    kind = 'folder'

    def __init__(self, root, split):
        self.dataset_root, self.path = root, find_split(root, split)
        self.where = self.path

    def class_names(self, num_classes=None):
        """The classes of the training split this split belongs to, in index order: the `train/`
        folder beside it, else its own."""
        train_root = os.path.join(self.dataset_root, 'train')
        if os.path.normpath(self.path) != os.path.normpath(self.dataset_root) and os.path.isdir(train_root):
            return find_classes(train_root)[0]
        return find_classes(self.path)[0]

    def class_map(self, class_names):
        return eval_class_indices(self.path, class_names)

    def token_label_maps(self, token_label_data):
        return bool(token_label_data)

    def train_loader(self, img_size, batch_size, augment, erase, loader, token_label_data='', num_classes=None,
                     color_jitter=0.4, aa_after_crop=False, seed=0, **_):
        if token_label_data:
            dataset = DatasetTokenLabel(self.path, token_label_data, num_classes=num_classes)
            return create_token_label_loader(dataset, img_size, batch_size, aa_after_crop=aa_after_crop, seed=seed,
                                             **augment, **erase, **loader)
        return create_train_loader(self.path, img_size, batch_size, color_jitter=color_jitter, seed=seed, **augment,
                                   **erase, **loader)

    def eval_loader(self, img_size, batch_size, crop_pct, interpolation, loader, class_map=None, num_classes=None):
        return create_eval_loader(self.path, img_size, batch_size, crop_pct=crop_pct, interpolation=interpolation,
                                  class_to_idx=class_map, **loader)


class ShardSplitSource:
    """A split of tar shards (data/shards.py): its index names the classes and the token-label maps."""
    kind = 'wds'

    def __init__(self, root, split):
        self.shards = find_shard_split(root, split)
        self.where = self.shards.where

    def class_names(self, num_classes=None):
        if self.shards.class_names is not None:
            return list(self.shards.class_names)
        if num_classes is None:
            raise DataError(f'{self.where}: the shards have no index.json naming their classes; give --num-classes')
        return [str(i) for i in range(num_classes)]

    def class_map(self, class_names):
        return shard_class_map(self.shards, class_names)

    def token_label_maps(self, token_label_data):
        if token_label_data:
            raise DataError('--token-label-data reads label files beside image folders; with --dataset wds the maps '
                            'come from the data (tools/make_shards.py --token-label-data)')
        return self.shards.label_size is not None

    def train_loader(self, img_size, batch_size, augment, erase, loader, token_labels=False, num_classes=None,
                     color_jitter=0.4, aa_after_crop=False, seed=0, shuffle_buffer=1000, num_samples=None, **_):
        loader = {k: v for k, v in loader.items() if k != 'distributed'}  # the stream splits itself by rank
        return create_shard_train_loader(
            self.shards, img_size, batch_size, token_labels=token_labels, num_classes=num_classes,
            color_jitter=color_jitter, aa_after_crop=aa_after_crop, seed=seed, shuffle_buffer=shuffle_buffer,
            num_samples=num_samples, **augment, **erase, **loader)

    def eval_loader(self, img_size, batch_size, crop_pct, interpolation, loader, class_map=None, num_classes=None):
        loader = {k: v for k, v in loader.items() if k != 'distributed'}
        return create_shard_eval_loader(self.shards, img_size, batch_size, crop_pct=crop_pct,
                                        interpolation=interpolation, num_classes=num_classes, class_map=class_map,
                                        **loader)


class HFSplit:
    """A split of a Hugging Face dataset through timm's reader (plain labels only)."""
    kind = 'hfds'

    def __init__(self, name, root, split, training=False):
        self.name = name
        self.dataset = hf_dataset(name, root, split, is_training=training)
        self.where = f'{name} {split}'

    def class_names(self, num_classes=None):
        return hf_class_names(self.dataset)

    def class_map(self, class_names):
        if hf_class_names(self.dataset) != list(class_names)[:len(self.dataset.reader.class_to_idx)]:
            raise DataError(f'--dataset {self.name}: the classes of {self.where} differ from the model\'s')
        return None

    def token_label_maps(self, token_label_data):
        if token_label_data:
            raise DataError(f'--token-label-data reads label files beside image folders; with --dataset {self.name} '
                            f'token-label maps are not supported')
        return False

    def train_loader(self, img_size, batch_size, augment, erase, loader, color_jitter=0.4, seed=0, **_):
        self.dataset.transform = train_transform(img_size, color_jitter=color_jitter, **augment)
        return wrap_loader(self.dataset, batch_size, is_training=True, seed=seed, **erase, **loader)

    def eval_loader(self, img_size, batch_size, crop_pct, interpolation, loader, class_map=None, num_classes=None):
        self.dataset.transform = eval_transform(img_size, crop_pct, interpolation)
        return wrap_loader(self.dataset, batch_size, is_training=False, **loader)


def open_split(name, root, split, training=False):
    """The split `split` of the --dataset `name` ('' or 'folder', 'wds', 'hfds/NAME') at `root`."""
    kind = dataset_kind(name)
    if kind == 'wds':
        return ShardSplitSource(root, split)
    if kind == 'hfds':
        return HFSplit(name, root, split, training=training)
    return FolderSplit(root, split)
