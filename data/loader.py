"""Loaders: uint8 batches from worker processes, normalised (and randomly erased) on the device.

timm's PrefetchLoader moves each batch to the device on a side stream when that is a GPU and
normalises it there; on a CPU it does the same work in the main process.
"""
import itertools
from functools import partial

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data.loader import PrefetchLoader, _worker_init

from .augment_compat import fix_posterize
from .dataset import DataError, ImageFolderDataset, collate_readable
from .shards import PlainDecoder, ShardStream, TokenLabelDecoder
from .transforms import TokenLabelTrainTransform


def _device(device):
    if device is None:
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    return torch.device(device)


class EpochSampler(torch.utils.data.DistributedSampler):
    """The training order: a permutation seeded by (seed, epoch), this rank's share of it (one
    rank without a process group), starting `start_batch` batches in when a run resumes mid-epoch.
    len() stays the whole epoch's share. Iterated again without set_epoch, it moves on to the next
    epoch (a new order every pass, as a shuffling loader gives)."""

    def __init__(self, dataset, batch_size, distributed=False, seed=0):
        kwargs = {} if distributed else dict(num_replicas=1, rank=0)
        super().__init__(dataset, shuffle=True, seed=seed, drop_last=True, **kwargs)
        self.batch_size = batch_size
        self.start_batch = 0
        self._iterated = False

    def set_epoch(self, epoch, start_batch=0):
        super().set_epoch(epoch)
        self.start_batch = start_batch
        self._iterated = False

    def epoch_indices(self):
        """This epoch's indices (from start_batch on), without counting as a pass."""
        return list(itertools.islice(super().__iter__(), self.start_batch * self.batch_size, None))

    def __iter__(self):
        if self._iterated:
            self.set_epoch(self.epoch + 1)
        self._iterated = True
        return iter(self.epoch_indices())


def set_epoch(loader, epoch, start_batch=0):
    """Point a training loader (folder or shards) at `epoch`, skipping its first `start_batch` batches."""
    inner = getattr(loader, 'loader', loader)
    target = inner.dataset if isinstance(inner.dataset, ShardStream) else inner.sampler
    target.set_epoch(epoch, start_batch)


def wrap_loader(dataset, batch_size, is_training, device=None, num_workers=1, distributed=False,
                pin_memory=False, persistent_workers=True, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                re_prob=0., re_mode='pixel', re_count=1, collate_fn=None, seed=0):
    """DataLoader + device-side normalisation. Training: an EpochSampler (call set_epoch each
    epoch); evaluation: a DistributedSampler when distributed; shard streams: their own order."""
    sampler = None
    if isinstance(dataset, ShardStream):
        pass
    elif is_training:
        sampler = EpochSampler(dataset, batch_size, distributed=distributed, seed=seed)
    elif distributed:
        sampler = torch.utils.data.DistributedSampler(dataset, shuffle=False, drop_last=False)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
        drop_last=is_training and sampler is not None, collate_fn=collate_fn,
        persistent_workers=persistent_workers and num_workers > 0,
        worker_init_fn=partial(_worker_init, worker_seeding='all') if num_workers > 0 else None)
    return PrefetchLoader(loader, mean=mean, std=std, device=_device(device),
                          re_prob=re_prob if is_training else 0., re_mode=re_mode, re_count=re_count)


def create_token_label_loader(dataset, input_size, batch_size, is_training=True, re_prob=0., re_mode='pixel',
                              re_count=1, scale=(0.08, 1.0), ratio=(3. / 4., 4. / 3.), hflip=0.5, vflip=0.,
                              auto_augment=None, interpolation='random', mean=IMAGENET_DEFAULT_MEAN,
                              std=IMAGENET_DEFAULT_STD, num_workers=1, distributed=False, pin_memory=False,
                              persistent_workers=True, device=None, seed=0, aa_after_crop=False):
    """Training loader over a DatasetTokenLabel: yields (normalised images, (B, 3, 5, H, W) layouts)
    on `device`; turn the layouts into targets with create_token_label_target."""
    dataset.transform = token_label_transform(input_size, scale=scale, ratio=ratio, hflip=hflip, vflip=vflip,
                                              auto_augment=auto_augment, interpolation=interpolation, mean=mean,
                                              aa_after_crop=aa_after_crop)
    return wrap_loader(dataset, batch_size, is_training, device=device, num_workers=num_workers,
                       distributed=distributed, pin_memory=pin_memory, persistent_workers=persistent_workers,
                       mean=mean, std=std, re_prob=re_prob, re_mode=re_mode, re_count=re_count, seed=seed)


def create_eval_loader(root, img_size, batch_size, crop_pct, interpolation='bicubic', mean=IMAGENET_DEFAULT_MEAN,
                       std=IMAGENET_DEFAULT_STD, num_workers=1, distributed=False, pin_memory=False, device=None,
                       class_to_idx=None):
    """Resize the short side to floor(img_size / crop_pct), centre-crop img_size (zero-padded when
    crop_pct > 1), normalise on the device. class_to_idx: the training classes' indices (see
    eval_class_indices); default the folder's own. Unreadable images are skipped and not counted."""
    dataset = ImageFolderDataset(root, transform=eval_transform(img_size, crop_pct, interpolation),
                                 class_to_idx=class_to_idx, skip_unreadable=True)
    return wrap_loader(dataset, batch_size, is_training=False, device=device, num_workers=num_workers,
                       distributed=distributed, pin_memory=pin_memory, persistent_workers=False, mean=mean, std=std,
                       collate_fn=collate_readable)


def create_train_loader(root, img_size, batch_size, scale=(0.08, 1.0), ratio=(3. / 4., 4. / 3.), hflip=0.5, vflip=0.,
                        color_jitter=0.4, auto_augment=None, interpolation='random', re_prob=0., re_mode='pixel',
                        re_count=1, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, num_workers=1,
                        distributed=False, pin_memory=False, persistent_workers=True, device=None, seed=0):
    """Plain-label training loader (timm's training transform) over an image folder."""
    dataset = ImageFolderDataset(root, transform=train_transform(
        img_size, scale=scale, ratio=ratio, hflip=hflip, vflip=vflip, color_jitter=color_jitter,
        auto_augment=auto_augment, interpolation=interpolation))
    return wrap_loader(dataset, batch_size, is_training=True, device=device, num_workers=num_workers,
                       distributed=distributed, pin_memory=pin_memory, persistent_workers=persistent_workers,
                       mean=mean, std=std, re_prob=re_prob, re_mode=re_mode, re_count=re_count, seed=seed)


def token_label_transform(img_size, scale=(0.08, 1.0), ratio=(3. / 4., 4. / 3.), hflip=0.5, vflip=0., auto_augment=None,
                          interpolation='random', mean=IMAGENET_DEFAULT_MEAN, aa_after_crop=False):
    img_size = tuple(img_size[-2:]) if isinstance(img_size, (tuple, list)) else img_size
    return TokenLabelTrainTransform(img_size=img_size, scale=scale, ratio=ratio, hflip=hflip, vflip=vflip, auto_augment=auto_augment,
                                    interpolation=interpolation, mean=mean, aa_after_crop=aa_after_crop)


def train_transform(img_size, scale=(0.08, 1.0), ratio=(3. / 4., 4. / 3.), hflip=0.5, vflip=0., color_jitter=0.4,
                    auto_augment=None, interpolation='random'):
    """timm's training transform (uint8 output; normalised on the batch)."""
    return fix_posterize(create_transform(
        img_size, is_training=True, scale=scale, ratio=ratio, hflip=hflip, vflip=vflip, color_jitter=color_jitter,
        auto_augment=auto_augment or None, interpolation=interpolation, use_prefetcher=True))


def eval_transform(img_size, crop_pct, interpolation='bicubic'):
    return create_transform(img_size, is_training=False, interpolation=interpolation, crop_pct=crop_pct,
                            use_prefetcher=True)


def create_shard_train_loader(split, img_size, batch_size, token_labels=False, num_classes=None, scale=(0.08, 1.0),
                              ratio=(3. / 4., 4. / 3.), hflip=0.5, vflip=0., color_jitter=0.4, auto_augment=None,
                              interpolation='random', re_prob=0., re_mode='pixel', re_count=1, aa_after_crop=False,
                              mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, num_workers=1, pin_memory=False,
                              persistent_workers=True, device=None, seed=0, shuffle_buffer=1000, num_samples=None):
    """Training loader over shards (data/shards.py): the same transforms and targets as the folder
    loaders (token-label layouts when `token_labels`); call set_epoch(loader, epoch) each epoch."""
    if token_labels:
        if split.label_size is None and split.counts is not None:
            raise DataError(f'{split.where}: the shards hold no token-label maps; make them with '
                            f'tools/make_shards.py --token-label-data')
        transform = token_label_transform(img_size, scale=scale, ratio=ratio, hflip=hflip, vflip=vflip,
                                          auto_augment=auto_augment, interpolation=interpolation, mean=mean,
                                          aa_after_crop=aa_after_crop)
        decode = TokenLabelDecoder(transform, num_classes=num_classes, label_size=split.label_size)
    else:
        decode = PlainDecoder(train_transform(img_size, scale=scale, ratio=ratio, hflip=hflip, vflip=vflip,
                                              color_jitter=color_jitter, auto_augment=auto_augment,
                                              interpolation=interpolation), num_classes=num_classes)
    dataset = ShardStream(split, decode, batch_size, training=True, seed=seed, shuffle_buffer=shuffle_buffer,
                          num_samples=num_samples)
    return wrap_loader(dataset, batch_size, is_training=True, device=device, num_workers=num_workers,
                       pin_memory=pin_memory, persistent_workers=persistent_workers, mean=mean, std=std,
                       re_prob=re_prob, re_mode=re_mode, re_count=re_count)


def create_shard_eval_loader(split, img_size, batch_size, crop_pct, interpolation='bicubic', mean=IMAGENET_DEFAULT_MEAN,
                             std=IMAGENET_DEFAULT_STD, num_workers=1, pin_memory=False, device=None, num_classes=None,
                             class_map=None):
    """Evaluation loader over shards: every sample once across ranks and workers, the folder
    loader's transform; unreadable images are skipped and not counted. `class_map`: stored class
    index -> the model's index (None entries: classes the model does not have)."""
    decode = PlainDecoder(eval_transform(img_size, crop_pct, interpolation), num_classes=num_classes,
                          class_map=class_map)
    dataset = ShardStream(split, decode, batch_size, training=False)
    return wrap_loader(dataset, batch_size, is_training=False, device=device, num_workers=num_workers,
                       pin_memory=pin_memory, persistent_workers=False, mean=mean, std=std,
                       collate_fn=collate_readable)
