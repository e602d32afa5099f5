"""Datasets, transforms and loaders, token labeling included (tlt's public names)."""
from .augment_compat import fix_posterize
from .dataset import (DataError, DatasetTokenLabel, ImageFiles, ImageFolderDataset, create_token_label_dataset,
                      eval_class_indices, find_images, find_split, hf_class_names, hf_dataset, label_path,
                      load_label_map)
from .loader import (create_eval_loader, create_shard_eval_loader, create_shard_train_loader, create_token_label_loader,
                     create_train_loader, eval_transform, set_epoch, train_transform, wrap_loader)
from .shards import ShardSplit, ShardStream, find_shard_split, iter_shard, shard_class_map
from .sources import dataset_kind, open_split
from .token_label import TokenLabelMixup, create_token_label_target, pack_sample_target
from .transforms import LabelAwareRandAugment, TokenLabelTrainTransform
from .seg_dataset import (ADE20K_CLASSES, CITYSCAPES_CLASSES, CITYSCAPES_TRAIN_IDS, DATASET_KINDS,
                          REDUCE_ZERO_LABEL, TEST_SCALES, SegmentationDataset, build_seg_dataset, seg_dataset_kind,
                          seg_dataset_type)
from .seg_transforms import SegEvalTransform, SegTrainTransform
