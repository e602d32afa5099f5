#!/usr/bin/env python3
"""Pack an ImageNet-style folder (and its token-label maps) into webdataset tar shards.

    python -m tools.make_shards /data/imagenet --token-label-data /data/label_top5_train_nfnet \
        --output /data/imagenet-shards --shard-size 1000

Every split present (train/, val/ or validation/) becomes SHARD_ROOT/<split>/<split>-NNNNNN.tar
plus index.json (sample counts per shard, class names, token-label map size). A sample holds the
image file's bytes as they are (no re-encoding), its class index (the training split's class
list, for every split) and, for the training split with --token-label-data, its label file's
bytes. Samples are stored in a shuffled order fixed by --seed, so a shard mixes classes.

The output is deterministic (fixed order, fixed tar headers) and the command resumable: shards
already complete with the planned contents are kept, the rest are written (each under a temporary
name until complete), and index.json comes last. Images without a label file are an error that
lists them, before anything is written, and so are images that do not decode.
"""
import argparse
import hashlib
import json
import logging
import os
import sys
import tarfile

import numpy as np
import webdataset as wds
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from data.dataset import DataError, describe_collisions, label_path, label_path_collisions, load_label_map
from data.images import decode_problem
from data.shards import INDEX_FORMAT, INDEX_NAME, LABEL_FIELD, PATH_FIELD
from engine import DiskFullError, write_atomically
from engine.files import write_staged
from utils.log import setup_logging

_logger = logging.getLogger('make_shards')
SPLITS = ('train', 'val', 'validation')
PARTIAL = '.partial'
PLAN_SUFFIX = '.plan'  # beside each shard: the digest of the plan it was written from
PLAN_VERSION = 1


def find_splits(root):
    if not os.path.isdir(root):
        raise DataError(f'data folder {root} does not exist')
    splits = [s for s in SPLITS if os.path.isdir(os.path.join(root, s))]
    if not splits:
        raise DataError(f'{root} has none of the folders {", ".join(SPLITS)}')
    return splits


def plan_split(root, split, class_names, label_root, seed):
    """The split's samples in stored order: dicts with key, path (relative), class index, image and
    label file. Images that do not decode (empty, truncated, not images, links to nothing) and
    missing or shared label files are an error listing them."""
    folder = os.path.join(root, split)
    found = find_classes(folder)[0]
    unknown = sorted(set(found) - set(class_names))
    if unknown:
        raise DataError(f'{folder} has class folders the training split does not have: {", ".join(unknown[:10])}')
    samples = make_dataset(folder, {c: i for i, c in enumerate(class_names) if c in found}, extensions=IMG_EXTENSIONS)
    if not samples:
        raise DataError(f'no images found under {folder}')
    damaged = [(path, problem) for path, problem in ((p, decode_problem(p)) for p, _ in samples) if problem]
    if damaged:
        shown = '\n  '.join(f'{os.path.relpath(p, folder)}: {problem}' for p, problem in damaged[:20])
        raise DataError(f'{len(damaged)} of {len(samples)} images under {folder} cannot be decoded (fix or remove '
                        f'them):\n  {shown}{chr(10) + "  ..." if len(damaged) > 20 else ""}')
    labels = [None] * len(samples)
    if label_root:
        labels = [label_path(label_root, path, folder) for path, _ in samples]
        collisions = label_path_collisions(labels, [p for p, _ in samples])
        if collisions:
            raise DataError(f'{folder}: ' + describe_collisions(collisions))
        missing = [(p, lab) for (p, _), lab in zip(samples, labels) if not os.path.isfile(lab)]
        if missing:
            shown = '\n  '.join(f'{os.path.relpath(p, folder)} (expected {lab})' for p, lab in missing[:20])
            raise DataError(f'{len(missing)} of {len(samples)} images under {folder} have no token-label file in '
                            f'{label_root}:\n  {shown}{chr(10) + "  ..." if len(missing) > 20 else ""}')
    order = np.random.default_rng(seed).permutation(len(samples))
    return [dict(key=f'{n:08d}', path=samples[i][0], rel=os.path.relpath(samples[i][0], folder),
                 cls=samples[i][1], label=labels[i]) for n, i in enumerate(order)]


def members(sample):
    """{field: bytes} of a sample (image bytes exactly as in the file)."""
    with open(sample['path'], 'rb') as f:
        fields = {os.path.splitext(sample['path'])[1][1:].lower(): f.read()}
    fields['cls'] = str(sample['cls']).encode()
    fields[PATH_FIELD] = sample['rel'].encode('utf-8')
    if sample['label'] is not None:
        with open(sample['label'], 'rb') as f:
            fields[LABEL_FIELD] = f.read()
    return fields


def expected_members(chunk):
    """[(member name, size)] a shard of `chunk` holds, in the order TarWriter writes them."""
    out = []
    for sample in chunk:
        sizes = {os.path.splitext(sample['path'])[1][1:].lower(): os.path.getsize(sample['path']),
                 'cls': len(str(sample['cls'])), PATH_FIELD: len(sample['rel'].encode('utf-8'))}
        if sample['label'] is not None:
            sizes[LABEL_FIELD] = os.path.getsize(sample['label'])
        out += [(f'{sample["key"]}.{field}', sizes[field]) for field in sorted(sizes)]
    return out


def plan_digest(chunk, seed):
    """What a shard must hold, as a hash: the seed and, for each sample, its key, path, class and
    the identity (size and modification time) of its image and label file. A shard whose recorded
    digest differs is written again, so that changed images (even of the same size), another
    --seed or other label files never leave stale shards behind."""
    digest = hashlib.sha256(f'{PLAN_VERSION}:{seed}'.encode())
    for sample in chunk:
        identity = [sample['key'], sample['rel'], sample['cls']]
        for path in (sample['path'], sample['label']):
            if path is not None:
                stat = os.stat(path)
                identity += [path, stat.st_size, stat.st_mtime_ns]
        digest.update(json.dumps(identity).encode())
    return digest.hexdigest()


def shard_is_complete(path, chunk, digest):
    """The shard exists with the members the plan gives it, and its recorded plan is this one."""
    try:
        with open(path + PLAN_SUFFIX) as f:
            if f.read().strip() != digest:
                return False
        with tarfile.open(path, 'r:') as tar:
            return [(m.name, m.size) for m in tar] == expected_members(chunk)
    except (OSError, tarfile.TarError):
        return False


def write_shard(path, chunk, label_size, digest):
    """The shard under a temporary name, renamed when complete; returns the label size found.
    Label maps are checked (shape, size, finite, whole class indices); their class indices are
    checked against the model's class count when training reads them (a teacher's classes may
    outnumber the folders)."""
    found = [label_size]

    def write(f):
        writer = wds.TarWriter(f, encoder=False, mtime=0, user='', group='', mode=0o444)
        for sample in chunk:
            fields = members(sample)
            if LABEL_FIELD in fields:  # a damaged label file is found now, not in the middle of training
                label = load_label_map(sample['label'], None, found[0], data=fields[LABEL_FIELD])
                found[0] = found[0] or tuple(label.shape[2:])
            writer.write({'__key__': sample['key'], **fields})
        writer.close()

    os.replace(write_staged(path, write, kept='the complete shards are kept (run again to continue)'), path)
    write_atomically(path + PLAN_SUFFIX, digest.encode())  # after the shard: its presence means complete
    return found[0]


def make_split(plan, root, split, output, class_names, label_root, shard_size, seed):
    out_dir = os.path.join(output, split)
    os.makedirs(out_dir, exist_ok=True)
    chunks = [plan[i:i + shard_size] for i in range(0, len(plan), shard_size)]
    names = [f'{split}-{i:06d}.tar' for i in range(len(chunks))]
    for stale in sorted(set(os.listdir(out_dir)) - set(names) - {n + PLAN_SUFFIX for n in names} - {INDEX_NAME}):
        if stale.endswith(('.tar', PARTIAL, PLAN_SUFFIX)):
            _logger.info('removing %s: not a shard of this plan', os.path.join(out_dir, stale))
            os.remove(os.path.join(out_dir, stale))
    label_size, kept = None, 0
    digests = [plan_digest(chunk, seed) for chunk in chunks]
    for name, chunk, digest in zip(names, chunks, digests):
        path = os.path.join(out_dir, name)
        if shard_is_complete(path, chunk, digest):
            kept += 1
            continue
        label_size = write_shard(path, chunk, label_size, digest)
        _logger.info('%s: %d samples', path, len(chunk))
    if label_root and label_size is None:  # every shard was kept: the size comes from the first map
        first = plan[0]['label']
        label_size = tuple(load_label_map(first).shape[2:])
    if kept:
        _logger.info('%s: kept %d complete shard(s) from an earlier run', out_dir, kept)
    index = dict(format=INDEX_FORMAT, version=1, split=split, source=os.path.abspath(os.path.join(root, split)),
                 num_samples=len(plan), num_classes=len(class_names), class_names=list(class_names),
                 label_size=list(label_size) if label_size else None,
                 token_label_data=os.path.abspath(label_root) if label_root else None, seed=seed,
                 shard_size=shard_size, shards=[dict(name=n, num_samples=len(c), plan=d) for n, c, d in zip(names, chunks, digests)])
    write_atomically(os.path.join(out_dir, INDEX_NAME), json.dumps(index, indent=1).encode())
    _logger.info('%s: %d samples in %d shards', out_dir, len(plan), len(names))
    return index


def make_shards(root, output, label_root=None, shard_size=1000, seed=0):
    """Shards of every split of `root`; returns {split: index}."""
    if shard_size <= 0:
        raise DataError(f'--shard-size must be positive, got {shard_size}')
    if label_root and not os.path.isdir(label_root):
        raise DataError(f'token-label folder {label_root} does not exist')
    splits = find_splits(root)
    class_names = find_classes(os.path.join(root, 'train' if 'train' in splits else splits[0]))[0]
    plans = {}
    for split in splits:  # every split's labels are checked before anything is written
        plans[split] = plan_split(root, split, class_names, label_root if split == 'train' else None, seed)
    return {split: make_split(plan, root, split, output, class_names, label_root if split == 'train' else None,
                              shard_size, seed) for split, plan in plans.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('data', metavar='DATA_ROOT', help='ImageNet-style root with train/ and val/ (or validation/)')
    p.add_argument('--token-label-data', default='', metavar='LABELS', help='token-label maps of the training split')
    p.add_argument('--output', required=True, metavar='SHARD_ROOT')
    p.add_argument('--shard-size', type=int, default=1000, metavar='N', help='samples per shard')
    p.add_argument('--seed', type=int, default=0, help='the stored (shuffled) order')
    args = p.parse_args(argv)
    setup_logging()
    try:
        make_shards(args.data, args.output, args.token_label_data or None, args.shard_size, args.seed)
    except (DataError, DiskFullError) as e:
        _logger.error('%s', e)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
