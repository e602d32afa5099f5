#!/usr/bin/env python3
"""Write Cityscapes' *_gtFine_labelTrainIds.png next to the released *_gtFine_labelIds.png with the
official mapping (19 train ids, everything else 255).

    python -m tools.cityscapes_train_ids /data/cityscapes            # all splits under gtFine/
    python -m tools.cityscapes_train_ids /data/cityscapes --overwrite

Files already written are skipped (an interrupted run resumes); each file is written under a
temporary name and renamed, so none is ever half written.
"""
import argparse
import glob
import os
import sys

import numpy as np
from PIL import Image
from tqdm import tqdm

from data.seg_dataset import CITYSCAPES_TRAIN_IDS
from engine import DiskFullError, save_image
from layers import IGNORE_INDEX


def train_id_table() -> np.ndarray:
    """labelId -> trainId lookup table over 0..255."""
    table = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for label_id, train_id in CITYSCAPES_TRAIN_IDS.items():
        table[label_id] = train_id
    return table


def convert(label_ids_path: str, table: np.ndarray, overwrite=False) -> bool:
    """Write the train-id PNG of one _labelIds.png; False when it existed already and was kept."""
    target = label_ids_path[:-len('_labelIds.png')] + '_labelTrainIds.png'
    if os.path.exists(target) and not overwrite:
        return False
    with Image.open(label_ids_path) as img:
        if img.mode not in ('L', 'P', 'I'):
            raise ValueError(f'{label_ids_path}: expected a single-channel label image, found mode {img.mode}')
        ids = np.array(img)
    if ids.min() < 0 or ids.max() > 255:
        raise ValueError(f'{label_ids_path}: label ids outside 0..255')
    save_image(Image.fromarray(table[ids.astype(np.int64)]), target)
    return True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('root', help='the Cityscapes root (holding gtFine/)')
    p.add_argument('--overwrite', action='store_true', help='rewrite train-id files that already exist')
    args = p.parse_args(argv)
    gt_dir = os.path.join(args.root, 'gtFine')
    if not os.path.isdir(gt_dir):
        p.error(f'{gt_dir}: folder not found (Cityscapes layout: gtFine/{{train,val,test}}/<city>/*_gtFine_labelIds.png)')
    files = sorted(glob.glob(os.path.join(gt_dir, '*', '*', '*_gtFine_labelIds.png')))
    if not files:
        p.error(f'{gt_dir}: no *_gtFine_labelIds.png files under gtFine/<split>/<city>/')
    for stale in glob.glob(os.path.join(gt_dir, '*', '*', '*.partial.png')):
        os.remove(stale)
    table = train_id_table()
    written = 0
    try:
        for path in tqdm(files, desc='labelTrainIds', disable=None):
            written += convert(path, table, args.overwrite)
    except (ValueError, DiskFullError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    print(f'{written} written, {len(files) - written} already present, under {gt_dir}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
