"""webdataset tar shards of an ImageNet-style folder (written by tools/make_shards.py), read as
epoch streams that give each rank and data-loader worker its own part of every epoch.

A split is `SHARD_ROOT/<split>/*.tar` plus `index.json` (sample counts per shard, class names,
token-label size). A sample is the members `<key>.<field>`: the encoded image as it was in the
folder (`jpeg`, `png`, ...), `cls` (the class index, text), `path.txt` (its path in the folder)
and, with token labels, `tokenlabel.pth` (the label file's bytes, read in safe mode).

With the counts of the index, an epoch is exact: the shards are put in a per-epoch order (the same
on every rank), their samples form one sequence, and each rank, then each worker, takes a
contiguous part of it, so no sample is read twice or left out (beyond the remainder that full
training batches leave, as with folders). A worker reads only its part of a shard: the members
before it are skipped without reading their data. Within a worker a shuffle buffer mixes the
samples; everything is seeded by (seed, epoch, rank, worker), so a resumed run can skip the batches
it already trained on and see exactly the rest of the epoch.
"""
import io
import json
import logging
import multiprocessing
import os
import random
import tarfile
from typing import List, NamedTuple, Optional

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from webdataset.shardlists import expand_urls

from .dataset import DataError, load_label_map
from .token_label import pack_sample_target

_logger = logging.getLogger(__name__)

INDEX_NAME = 'index.json'
INDEX_FORMAT = 'volo-shards'
IMAGE_FIELDS = ('jpg', 'jpeg', 'png', 'ppm', 'bmp', 'pgm', 'tif', 'tiff', 'webp')
CLASS_FIELDS = ('cls', 'cls.txt')
LABEL_FIELD = 'tokenlabel.pth'
PATH_FIELD = 'path.txt'
SPLIT_ALIASES = {'val': ('val', 'validation'), 'validation': ('validation', 'val')}


class ShardSplit(NamedTuple):
    """One split's shards: their paths, sample counts (None without an index) and what the index says."""
    urls: List[str]
    counts: Optional[List[int]]
    class_names: Optional[List[str]]
    label_size: Optional[tuple]  # token-label map size, None when the shards hold no token labels
    where: str                   # the folder or pattern, for messages

    @property
    def num_samples(self):
        return sum(self.counts) if self.counts is not None else None


def is_shard_pattern(text):
    return '{' in text or text.endswith('.tar')


def read_index(folder):
    """index.json of a shard folder, its fields checked, or None when there is none."""
    path = os.path.join(folder, INDEX_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            index = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise DataError(f'cannot read shard index {path}: {e}') from None
    if not isinstance(index, dict) or index.get('format') != INDEX_FORMAT or not isinstance(index.get('shards'), list):
        raise DataError(f'{path} is not a shard index written by tools/make_shards.py')

    def bad(field, expected, value):
        return DataError(f'{path}: field {field} must be {expected}, found {value!r}')

    for i, shard in enumerate(index['shards']):
        if not isinstance(shard, dict) or not isinstance(shard.get('name'), str) or not shard['name']:
            raise bad(f'shards[{i}]', 'an object with a file name', shard)
        count = shard.get('num_samples')
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise bad(f'shards[{i}].num_samples', 'a whole number >= 0', count)
    names = index.get('class_names')
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise bad('class_names', 'a list of strings', names)
    size = index.get('label_size')
    if size is not None and not (isinstance(size, list) and len(size) == 2 and
                                 all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in size)):
        raise bad('label_size', 'two positive whole numbers (the token-label map size) or null', size)
    return index


def _check_ended(tar, url, samples):
    """tarfile stops without an error at a damaged header: a shard must end with tar's end-of-
    archive blocks right after its last member."""
    tar.fileobj.seek(tar.offset)
    rest = tar.fileobj.read(1024)
    if len(rest) < 1024 or rest.count(0) != len(rest):
        raise DataError(f'shard {url} ends after {samples} samples at byte {tar.offset} without tar\'s end-of-archive '
                        f'blocks: a damaged member header, or a cut or changed file; make it again with '
                        f'tools/make_shards.py')


def _sample_key(member):
    folder, name = os.path.split(member.name)
    return os.path.join(folder, name.partition('.')[0])


def count_samples(url):
    """The samples of a shard, from its member headers (the data is seeked over, not read)."""
    try:
        with tarfile.open(url, 'r:') as tar:
            keys, last = 0, None
            for member in tar:
                if member.isfile() and _sample_key(member) != last:
                    keys, last = keys + 1, _sample_key(member)
            _check_ended(tar, url, keys)
    except (OSError, tarfile.TarError) as e:
        raise DataError(f'cannot read shard {url}: {e}') from None
    return keys


def find_shard_split(root, split=None):
    """The shards of `split`: `root/<split>/` (val and validation stand for each other), or a
    brace pattern (`split`, relative to root, or `root` itself), e.g. `train/train-{000000..000146}.tar`."""
    if split and is_shard_pattern(split):
        pattern = split if os.path.isabs(split) else os.path.join(root, split)
    elif is_shard_pattern(root):
        pattern = root
    else:
        pattern = None
    if pattern is not None:
        urls = list(expand_urls(pattern))
        folder = os.path.dirname(urls[0])
        where = pattern
    else:
        if not os.path.isdir(root):
            raise DataError(f'shard folder {root} does not exist')
        names = SPLIT_ALIASES.get(split, (split,)) if split else ()
        folder = next((os.path.join(root, n) for n in names if os.path.isdir(os.path.join(root, n))), None)
        if folder is None:
            if split:
                raise DataError(f'{root} has no "{split}" folder of shards (make them with tools/make_shards.py)')
            folder = root
        urls = None
        where = folder
    index = read_index(folder)
    if urls is None:
        if index is not None:
            urls = [os.path.join(folder, s['name']) for s in index['shards']]
        else:
            urls = sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith('.tar'))
        if not urls:
            raise DataError(f'no .tar shards in {folder}')
    missing = [u for u in urls if not os.path.isfile(u)]
    if missing:
        raise DataError(f'{len(missing)} of {len(urls)} shards of {where} do not exist: {", ".join(missing[:5])}'
                        f'{" ..." if len(missing) > 5 else ""}')
    counts = class_names = label_size = None
    if index is not None:
        known = {s['name']: s['num_samples'] for s in index['shards']}
        if all(os.path.basename(u) in known for u in urls):
            counts = [known[os.path.basename(u)] for u in urls]
            for url, count in zip(urls, counts):  # the index's claims against the tars themselves
                held = count_samples(url)
                if held != count:
                    raise DataError(f'{os.path.join(folder, INDEX_NAME)} counts {count} samples in '
                                    f'{os.path.basename(url)}, which holds {held}: the index does not belong to '
                                    f'these shards; make them again with tools/make_shards.py')
        class_names = index.get('class_names')
        label_size = tuple(index['label_size']) if index.get('label_size') else None
    return ShardSplit(urls, counts, class_names, label_size, where)


def shard_class_map(split: ShardSplit, class_names):
    """Stored class index -> index in `class_names` (the model's classes) for an evaluation split,
    or None when they are the same list. A class the model does not have is an error."""
    stored = split.class_names
    if stored is None or list(stored) == list(class_names)[:len(stored)]:
        return None
    position = {c: i for i, c in enumerate(class_names)}
    unknown = [c for c in stored if c not in position]
    if unknown:
        raise DataError(f'{split.where} has {len(unknown)} class(es) that the training classes do not have: '
                        f'{", ".join(unknown[:10])}{" ..." if len(unknown) > 10 else ""}')
    return [position[c] for c in stored]


def iter_shard(url, skip=0, take=None):
    """The samples [skip, skip + take) of a shard in stored order, as dicts {field: bytes} plus
    '__key__' and '__url__'; the data of skipped samples is not read (the tar is seeked over)."""
    try:
        tar = tarfile.open(url, 'r:')
    except (OSError, tarfile.TarError) as e:
        raise DataError(f'cannot open shard {url}: {e}') from None
    with tar:
        index, key, sample = -1, None, None
        try:
            for member in tar:
                if not member.isfile():
                    continue
                member_key = _sample_key(member)
                if member_key != key:
                    if sample is not None:
                        yield sample
                    key, index, sample = member_key, index + 1, None
                    if take is not None and index >= skip + take:
                        return
                if index < skip:
                    continue
                if sample is None:
                    sample = {'__key__': key, '__url__': url}
                sample[os.path.basename(member.name).partition('.')[2].lower()] = tar.extractfile(member).read()
        except (OSError, tarfile.TarError) as e:
            raise DataError(f'shard {url} is damaged near sample {index} ({key}): {e}') from None
        if sample is not None:
            yield sample
        if take is not None and index + 1 < skip + take:
            raise DataError(f'shard {url} ends after {index + 1} samples, its index counts at least {skip + take}: '
                            f'it is damaged or was changed; make it again with tools/make_shards.py')
        try:
            _check_ended(tar, url, index + 1)
        except OSError as e:
            raise DataError(f'shard {url}: {e}') from None


def sample_name(sample):
    path = sample.get(PATH_FIELD)
    where = f'{os.path.basename(sample["__url__"])}:{sample["__key__"]}'
    return f'{where} ({path.decode("utf-8", "replace")})' if path else where


def sample_class(sample, num_classes=None):
    field = next((f for f in CLASS_FIELDS if f in sample), None)
    if field is None:
        raise DataError(f'sample {sample_name(sample)} has no class ({" or ".join(CLASS_FIELDS)} member)')
    try:
        value = int(sample[field].decode().strip())
    except (UnicodeDecodeError, ValueError):
        raise DataError(f'sample {sample_name(sample)}: class {sample[field][:20]!r} is not a whole number') from None
    if value < 0 or (num_classes is not None and value >= num_classes):
        raise DataError(f'sample {sample_name(sample)}: class {value} is outside 0..{num_classes - 1}')
    return value


def sample_image(sample):
    """The decoded RGB image; OSError/ValueError when it does not decode."""
    field = next((f for f in IMAGE_FIELDS if f in sample), None)
    if field is None:
        raise DataError(f'sample {sample_name(sample)} has no image member ({", ".join(IMAGE_FIELDS)})')
    return Image.open(io.BytesIO(sample[field])).convert('RGB')


UNREADABLE = (OSError, ValueError, Image.DecompressionBombError)


class PlainDecoder:
    """(transformed image, class index) of a sample; `class_map` renumbers the stored classes."""

    def __init__(self, transform, num_classes=None, class_map=None):
        self.transform, self.num_classes, self.class_map = transform, num_classes, class_map

    def __call__(self, sample):
        target = sample_class(sample, None if self.class_map is not None else self.num_classes)
        if self.class_map is not None:
            if target >= len(self.class_map) or self.class_map[target] is None:
                raise DataError(f'sample {sample_name(sample)}: class {target} has no index in the model\'s classes')
            target = self.class_map[target]
        image = sample_image(sample)
        return (self.transform(image) if self.transform is not None else image), target


class TokenLabelDecoder:
    """(image, (3, 5, H, W) layout) of a sample with its token-label map: the same checks and
    label-aware transform as DatasetTokenLabel."""

    def __init__(self, transform, num_classes=None, label_size=None):
        self.transform, self.num_classes, self.label_size = transform, num_classes, label_size

    def __call__(self, sample):
        if LABEL_FIELD not in sample:
            raise DataError(f'sample {sample_name(sample)} has no token-label map ({LABEL_FIELD}); make the shards '
                            f'with --token-label-data')
        class_index = sample_class(sample, self.num_classes)
        label_map = load_label_map(f'shard sample {sample_name(sample)}', self.num_classes, self.label_size,
                                   data=sample[LABEL_FIELD])
        image = sample_image(sample)
        if self.transform is None:
            box = (0., 0., 1., 1.)
        else:
            image, label_map, box = self.transform(image, label_map)
        return image, pack_sample_target(label_map, box, class_index)


def split_evenly(total, parts):
    """Sizes of `parts` contiguous pieces of `total` items, differing by one at most."""
    return [total // parts + (i < total % parts) for i in range(parts)]


def worker_share(rank, world, worker, workers, counts_total, batch_size, training):
    """(start, length) of a worker's part of the epoch's sample sequence. Training: each rank gets
    whole batches of its N // world samples, dealt to its workers in the data loader's round-robin
    order (batch i from worker i % workers); evaluation: every sample, in near-equal parts."""
    if training:
        per_rank = counts_total // world
        batches = split_evenly(per_rank // batch_size, workers)
        start = rank * per_rank + batch_size * sum(batches[:worker])
        return start, batches[worker] * batch_size
    rank_sizes = split_evenly(counts_total, world)
    rank_start = sum(rank_sizes[:rank])
    sizes = split_evenly(rank_sizes[rank], workers)
    return rank_start + sum(sizes[:worker]), sizes[worker]


def batches_before(start_batch, worker, workers):
    """How many of the epoch's first `start_batch` batches came from `worker` (round-robin)."""
    return len(range(worker, start_batch, workers))


class ShardStream(torch.utils.data.IterableDataset):
    """One epoch of a split's samples for this rank and worker, decoded by `decode`.

    Training streams are shuffled (shard order per epoch, then a `shuffle_buffer`-sample buffer)
    and hold whole batches only; `set_epoch(epoch, start_batch)` picks the epoch and skips the
    batches a resumed run has already trained on. Without per-shard counts (shards not made by
    tools/make_shards.py), training needs `num_samples` (--train-num-samples): each worker then
    cycles through its own shards until it has its share; evaluation splits whole shards."""

    def __init__(self, split: ShardSplit, decode, batch_size, training=True, seed=0, shuffle_buffer=1000,
                 num_samples=None, rank=None, world_size=None):
        super().__init__()
        self.split, self.decode = split, decode
        self.batch_size, self.training = batch_size, training
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        if rank is None:
            distributed = dist.is_available() and dist.is_initialized()
            rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        self.rank, self.world_size = rank, world_size
        self.total = split.num_samples if num_samples is None else num_samples
        if training and self.total is None:
            raise DataError(f'{split.where}: the shards have no {INDEX_NAME} with their sample counts; give the '
                            f'epoch length with --train-num-samples N (or make them with tools/make_shards.py)')
        self.exact = split.counts is not None and num_samples is None
        # shared with the worker processes, which may outlive an epoch (persistent workers)
        self._epoch = multiprocessing.Value('i', 0)
        self._start_batch = multiprocessing.Value('i', 0)

    def set_epoch(self, epoch, start_batch=0):
        self._epoch.value, self._start_batch.value = epoch, start_batch

    def __len__(self):
        """Samples this rank yields in an epoch (training: whole batches)."""
        if self.training:
            return self.total // self.world_size // self.batch_size * self.batch_size
        return split_evenly(self.total, self.world_size)[self.rank] if self.total is not None else 0

    def _shard_order(self, epoch):
        if not self.training:
            return list(range(len(self.split.urls)))
        return list(np.random.default_rng([self.seed, epoch]).permutation(len(self.split.urls)))

    def _exact_samples(self, order, start, length):
        """The raw samples [start, start + length) of the sequence the shards form in `order`."""
        offset = 0
        for i in order:
            count = self.split.counts[i]
            lo, hi = max(start, offset), min(start + length, offset + count)
            if lo < hi:
                yield from iter_shard(self.split.urls[i], skip=lo - offset, take=hi - lo)
            offset += count
            if offset >= start + length:
                return

    def _cycled_samples(self, shards, length):
        """`length` raw samples from `shards` in turn, starting over when they run out (training
        without counts); all of their samples once when `length` is None (evaluation)."""
        produced = 0
        while shards:
            before = produced
            for i in shards:
                for sample in iter_shard(self.split.urls[i]):
                    if length is not None and produced >= length:
                        return
                    produced += 1
                    yield sample
            if length is None:
                return
            if produced == before:
                raise DataError(f'shards {", ".join(self.split.urls[i] for i in shards[:3])} hold no samples')

    def _shuffled(self, samples, rng):
        if not self.training or self.shuffle_buffer <= 1:
            yield from samples
            return
        buffer = []
        for sample in samples:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            j = rng.randrange(len(buffer))
            yield buffer[j]
            buffer[j] = sample
        rng.shuffle(buffer)
        yield from buffer

    def _decoded(self, samples):
        """Decoded samples. Training: an unreadable image is replaced by the worker's previous
        readable sample (the next one, at the start) so the epoch keeps its length; evaluation:
        it yields None, which collate_readable leaves out."""
        last, owed = None, 0
        for sample in samples:
            try:
                item = self.decode(sample)
            except UNREADABLE as e:
                _logger.warning('skipping unreadable image %s: %s', sample_name(sample), e)
                if not self.training:
                    yield None
                elif last is None:
                    owed += 1
                else:
                    yield last
                continue
            for _ in range(owed + 1):
                yield item
            last, owed = item, 0
        if owed:
            raise DataError(f'no readable image among the {owed} samples of a worker\'s share of {self.split.where}')

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, start_batch = self._epoch.value, self._start_batch.value
        # The data loader takes batch j of an iteration from worker j % workers. Resumed at batch s,
        # its batch j is the epoch's batch s + j, which worker (s + j) % workers held: so this
        # process plays that worker's part.
        worker = (worker + start_batch) % workers
        order = self._shard_order(epoch)
        if self.exact or not self.training and self.split.counts is not None:
            start, length = worker_share(self.rank, self.world_size, worker, workers, self.total, self.batch_size,
                                         self.training)
            raw = self._exact_samples(order, start, length)
        else:
            slot, slots = self.rank * workers + worker, self.world_size * workers
            if self.training and len(order) < slots:
                raise DataError(f'{self.split.where}: {len(order)} shards for {self.world_size} process(es) x '
                                f'{workers} worker(s); without an index every worker needs a shard of its own')
            length = worker_share(self.rank, self.world_size, worker, workers, self.total, self.batch_size,
                                  True)[1] if self.training else None
            raw = self._cycled_samples(order[slot::slots], length)
        rng = random.Random(f'{self.seed}-{epoch}-{self.rank}-{worker}')
        stream = self._shuffled(raw, rng)
        if self.training and start_batch:
            skip = batches_before(start_batch, worker, workers) * self.batch_size
            for _ in zip(range(skip), stream):  # already trained on: not decoded
                pass
        return self._decoded(stream)
