"""Loaders: uint8 batches from worker processes, normalised (and randomly erased) on the device.

timm's PrefetchLoader moves each batch to the device on a side stream when that is a GPU and
normalises it there; on a CPU it does the same work in the main process.
"""
from functools import partial

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data.loader import PrefetchLoader, _worker_init

from .augment_compat import fix_posterize
from .dataset import ImageFolderDataset, collate_readable
from .transforms import TokenLabelTrainTransform


def _device(device):
    if device is None:
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    return torch.device(device)


def wrap_loader(dataset, batch_size, is_training, device=None, num_workers=1, distributed=False,
                pin_memory=False, persistent_workers=True, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                re_prob=0., re_mode='pixel', re_count=1, collate_fn=None, seed=0):
    """DataLoader (DistributedSampler when distributed) + device-side normalisation."""
    sampler = None
    if distributed:
        sampler = torch.utils.data.DistributedSampler(dataset, shuffle=is_training, seed=seed,
                                                      drop_last=is_training)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=sampler is None and is_training, sampler=sampler,
        num_workers=num_workers, pin_memory=pin_memory, drop_last=is_training, collate_fn=collate_fn,
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
    img_size = input_size[-2:] if isinstance(input_size, (tuple, list)) else input_size
    dataset.transform = TokenLabelTrainTransform(
        img_size=tuple(img_size) if isinstance(img_size, (tuple, list)) else img_size, scale=scale, ratio=ratio,
        hflip=hflip, vflip=vflip, auto_augment=auto_augment, interpolation=interpolation, mean=mean,
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
    dataset = ImageFolderDataset(root, transform=create_transform(
        img_size, is_training=False, interpolation=interpolation, crop_pct=crop_pct, use_prefetcher=True),
        class_to_idx=class_to_idx, skip_unreadable=True)
    return wrap_loader(dataset, batch_size, is_training=False, device=device, num_workers=num_workers,
                       distributed=distributed, pin_memory=pin_memory, persistent_workers=False, mean=mean, std=std,
                       collate_fn=collate_readable)


def create_train_loader(root, img_size, batch_size, scale=(0.08, 1.0), ratio=(3. / 4., 4. / 3.), hflip=0.5, vflip=0.,
                        color_jitter=0.4, auto_augment=None, interpolation='random', re_prob=0., re_mode='pixel',
                        re_count=1, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, num_workers=1,
                        distributed=False, pin_memory=False, persistent_workers=True, device=None, seed=0):
    """Plain-label training loader (timm's training transform) over an image folder."""
    dataset = ImageFolderDataset(root, transform=fix_posterize(create_transform(
        img_size, is_training=True, scale=scale, ratio=ratio, hflip=hflip, vflip=vflip, color_jitter=color_jitter,
        auto_augment=auto_augment or None, interpolation=interpolation, use_prefetcher=True)))
    return wrap_loader(dataset, batch_size, is_training=True, device=device, num_workers=num_workers,
                       distributed=distributed, pin_memory=pin_memory, persistent_workers=persistent_workers,
                       mean=mean, std=std, re_prob=re_prob, re_mode=re_mode, re_count=re_count, seed=seed)
