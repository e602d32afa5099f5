"""Shards (tools/make_shards.py, --dataset wds), Hugging Face datasets (--dataset hfds/...) and
mid-epoch resume, on the generated shapes dataset."""
import csv
import glob
import hashlib
import json
import os
import re
import shutil
import tarfile

import pytest
import torch
import webdataset as wds

import main as train_script
import validate as validate_script
from data import DataError, create_shard_train_loader, create_train_loader, find_shard_split, set_epoch
from data.shards import ShardStream, iter_shard
from engine import CheckpointSaver
from tests.forked import run_ranks
from tests.training_runs import FAST
from tools.make_shards import main as make_shards_cli
from tools.make_shards import make_shards
from torchvision.datasets.folder import find_classes


@pytest.fixture(scope='module')
def shards(shapes, tmp_path_factory):
    """The shapes dataset as shards of 5 samples, with its token labels."""
    out = str(tmp_path_factory.mktemp('shards'))
    make_shards(shapes, out, os.path.join(shapes, 'labels'), shard_size=5)
    return out


def md5s(folder):
    return {os.path.basename(p): hashlib.md5(open(p, 'rb').read()).hexdigest()
            for p in sorted(glob.glob(os.path.join(folder, '*.tar')))}


def summary(run):
    with open(os.path.join(run, 'summary.csv')) as f:
        return list(csv.DictReader(f))


def test_round_trip_through_webdataset_is_byte_identical(shapes, shards):
    classes = find_classes(os.path.join(shapes, 'train'))[0]
    for split, with_labels in (('train', True), ('val', False)):
        index = json.load(open(os.path.join(shards, split, 'index.json')))
        names = [s['name'] for s in index['shards']]
        assert names == [f'{split}-{i:06d}.tar' for i in range(len(names))]
        pattern = os.path.join(shards, split, f'{split}-{{000000..{len(names) - 1:06d}}}.tar')
        seen = []
        for sample in wds.WebDataset(pattern, shardshuffle=False):  # webdataset's own reader
            rel = sample['path.txt'].decode()
            seen.append(rel)
            assert sample['png'] == open(os.path.join(shapes, split, rel), 'rb').read()
            assert int(sample['cls']) == classes.index(os.path.dirname(rel))
            if with_labels:
                label = os.path.join(shapes, 'labels', rel[:-len('.png')] + '.pt')
                assert sample['tokenlabel.pth'] == open(label, 'rb').read()
            else:
                assert 'tokenlabel.pth' not in sample
        on_disk = sorted(os.path.relpath(p, os.path.join(shapes, split))
                         for p in glob.glob(os.path.join(shapes, split, '*', '*.png')))
        assert sorted(seen) == on_disk  # every image exactly once
        assert seen != on_disk  # stored shuffled: a shard mixes classes
        assert index['num_samples'] == len(on_disk) == sum(s['num_samples'] for s in index['shards'])
        assert index['class_names'] == classes
        assert index['label_size'] == ([6, 6] if with_labels else None)


def test_make_shards_is_deterministic_and_resumable(shapes, shards, tmp_path):
    again = str(tmp_path / 'again')
    make_shards_cli([shapes, '--token-label-data', os.path.join(shapes, 'labels'), '--output', again,
                     '--shard-size', '5'])
    expected = md5s(os.path.join(shards, 'train'))
    assert md5s(os.path.join(again, 'train')) == expected
    train = os.path.join(again, 'train')
    os.remove(os.path.join(train, 'train-000001.tar'))  # lost
    with open(os.path.join(train, 'train-000003.tar'), 'r+b') as f:  # cut short by a kill
        f.truncate(3000)
    kept = os.stat(os.path.join(train, 'train-000000.tar')).st_mtime_ns
    make_shards(shapes, again, os.path.join(shapes, 'labels'), shard_size=5)
    assert md5s(train) == expected
    assert os.stat(os.path.join(train, 'train-000000.tar')).st_mtime_ns == kept  # complete shards are kept
    assert not glob.glob(os.path.join(train, '*.partial'))


def test_make_shards_lists_images_without_label_files(shapes, tmp_path, capsys):
    labels = tmp_path / 'labels'
    shutil.copytree(os.path.join(shapes, 'labels'), labels)
    os.remove(labels / 'class_0_ellipse' / 'train_0_0003.pt')
    os.remove(labels / 'class_2_triangle' / 'train_2_0005.pt')
    assert make_shards_cli([shapes, '--token-label-data', str(labels), '--output', str(tmp_path / 'out')]) == 2
    err = capsys.readouterr().err
    assert '2 of 24 images' in err
    assert 'class_0_ellipse/train_0_0003.png' in err and 'class_2_triangle/train_2_0005.png' in err
    assert not os.path.exists(tmp_path / 'out')  # nothing written


def test_a_shard_is_read_from_any_sample_without_reading_the_others(shards):
    url = os.path.join(shards, 'train', 'train-000000.tar')
    everything = list(iter_shard(url))
    assert [s['__key__'] for s in everything] == [f'{i:08d}' for i in range(5)]
    assert [s['__key__'] for s in iter_shard(url, skip=2, take=2)] == ['00000002', '00000003']
    assert iter_shard(url, skip=2, take=2).__next__()['png'] == everything[2]['png']


def _sample_key(sample):
    return torch.tensor(int(sample['__key__'])), int(sample['cls'])


def _keys_seen_by_each_rank(shards, out):
    """One rank's loop over 2 epochs at batch sizes 4 and 5 (2 loader workers); rank 0 writes
    every rank's keys by epoch to `out`."""
    import torch.distributed as dist
    dist.init_process_group('gloo')
    split = find_shard_split(shards, 'train')
    results = {}
    for batch_size in (4, 5):
        stream = ShardStream(split, _sample_key, batch_size, training=True, seed=3, shuffle_buffer=4)
        loader = torch.utils.data.DataLoader(stream, batch_size=batch_size, num_workers=2, persistent_workers=True)
        epochs = []
        for epoch in range(2):
            stream.set_epoch(epoch)
            batches = [keys.tolist() for keys, _ in loader]
            assert all(len(b) == batch_size for b in batches), batches
            assert len(batches) == len(loader), (len(batches), len(loader))
            epochs.append([k for b in batches for k in b])
        gathered = [None, None]
        dist.all_gather_object(gathered, epochs)
        results[batch_size] = gathered
    if dist.get_rank() == 0:
        with open(out, 'w') as f:
            json.dump(results, f)
    dist.destroy_process_group()


def test_two_gloo_processes_see_each_sample_once_per_epoch(shards, tmp_path):
    """24 samples in shards of 5, 2 ranks x 2 workers: -b 4 covers all of them once; -b 5 leaves
    out the 4 that full batches cannot hold (as folders do), none twice."""
    out = tmp_path / 'keys.json'
    ranks = run_ranks(lambda: _keys_seen_by_each_rank(shards, out), tmp_path / 'logs')
    assert [code for code, _ in ranks] == [0, 0], ranks[0][1][-3000:] + ranks[1][1][-3000:]
    results = json.load(open(out))
    for batch_size, expected in (('4', 24), ('5', 20)):
        result = results[batch_size]
        for epoch in range(2):
            keys = result[0][epoch] + result[1][epoch]
            assert len(result[0][epoch]) == len(result[1][epoch]) == expected // 2
            assert len(set(keys)) == len(keys) == expected
            assert set(keys) <= set(range(24))
        assert result[0][0] != result[0][1]  # a new order every epoch


def test_shards_without_an_index_need_the_epoch_length(shards, tmp_path):
    foreign = tmp_path / 'foreign'
    shutil.copytree(os.path.join(shards, 'train'), foreign)
    os.remove(foreign / 'index.json')
    split = find_shard_split(str(foreign / 'train-{000000..000004}.tar'))
    assert split.counts is None
    with pytest.raises(DataError, match='--train-num-samples'):
        ShardStream(split, lambda s: s, 4, training=True)
    stream = ShardStream(split, lambda s: (torch.tensor(int(s['__key__'])), 0), 4, training=True, num_samples=16,
                         rank=0, world_size=1)
    loader = torch.utils.data.DataLoader(stream, batch_size=4, num_workers=2)
    keys = [k for b, _ in loader for k in b.tolist()]
    assert len(keys) == 16 and len(set(keys)) == 16  # 2 workers, each its own shards


def no_aug_loader(kind, shapes, shards, **kwargs):
    common = dict(scale=(1., 1.), ratio=(1., 1.), hflip=0., color_jitter=0., interpolation='bilinear', num_workers=2,
                  device='cpu', seed=5, persistent_workers=False, **kwargs)
    if kind == 'wds':
        return create_shard_train_loader(find_shard_split(shards, 'train'), 32, 4, token_labels=True, num_classes=3,
                                         shuffle_buffer=3, **common)
    return create_train_loader(os.path.join(shapes, 'train'), 32, 4, **common)


@pytest.mark.parametrize('kind', ['wds', 'folder'])
def test_a_resumed_epoch_yields_exactly_the_batches_not_yet_trained(shapes, shards, kind):
    loader = no_aug_loader(kind, shapes, shards)
    set_epoch(loader, 1)
    full = list(loader)
    assert len(full) == len(loader) == 6
    set_epoch(loader, 1, start_batch=3)  # 2 workers: 2 batches of worker 0 done, 1 of worker 1
    rest = list(loader)
    assert len(rest) == 3
    for (images, target), (expected_images, expected_target) in zip(rest, full[3:]):
        assert torch.equal(images, expected_images) and torch.equal(target, expected_target)
    set_epoch(loader, 2)
    epoch_2 = list(loader)
    assert not torch.equal(epoch_2[0][0], full[0][0])  # another epoch, another order
    if kind == 'folder':  # iterated again without set_epoch: the next epoch, as a shuffling loader would
        assert not torch.equal(list(loader)[0][0], epoch_2[0][0])


NO_AUG = ['--no-aug', '--train-interpolation', 'bilinear', '--token-label', '--token-label-size', '2',
          '--drop-path', '0', '--seed', '7']


def test_token_label_training_over_shards_equals_folders(shapes, shards, tmp_path):
    """Whole-dataset batches and no augmentation: the order does not matter, so the shards and the
    folders must give the same losses if they feed the same images, label maps and boxes."""
    common = [*FAST, '-b', '24', '--epochs', '1', *NO_AUG]  # one step: later ones differ by summation order
    folder = train_script.main([shapes, *common, '--output', str(tmp_path / 'folder'), '--token-label-data',
                                os.path.join(shapes, 'labels')])
    sharded = train_script.main([shards, *common, '--output', str(tmp_path / 'wds'), '--dataset', 'wds'])
    for a, b in zip(summary(folder), summary(sharded), strict=True):
        assert float(a['train_loss']) == pytest.approx(float(b['train_loss']), rel=1e-6)  # the same weights
        # after one AdamW step: the batch's order changes the gradient's float sums, ~1e-5 relative
        assert float(a['eval_loss']) == pytest.approx(float(b['eval_loss']), rel=1e-4)
        assert a['eval_top1'] == b['eval_top1']


def test_resume_mid_epoch_over_shards_continues_the_epoch(shards, tmp_path, monkeypatch, caplog):
    """A run stopped right after the recovery checkpoint of epoch 0, batch 2 and resumed trains
    the rest of that epoch: its losses equal those of a run that was never stopped."""
    common = [shards, *FAST, '-b', '4', '--epochs', '1', '--dataset', 'wds', '-j', '2', *NO_AUG,
              '--recovery-interval', '3']
    straight = train_script.main([*common, '--output', str(tmp_path / 'straight')])
    saver_class = CheckpointSaver
    original = saver_class.save_recovery

    def stop_after(self, epoch, batch_idx=0, mid_epoch=None):
        path = original(self, epoch, batch_idx=batch_idx, mid_epoch=mid_epoch)
        if (epoch, batch_idx) == (0, 2):
            raise KeyboardInterrupt
        return path

    with monkeypatch.context() as patch:
        patch.setattr(saver_class, 'save_recovery', stop_after)
        with pytest.raises(KeyboardInterrupt):
            train_script.main([*common, '--output', str(tmp_path / 'stopped')])
    with caplog.at_level('INFO'):
        resumed = train_script.main([*common, '--output', str(tmp_path / 'stopped'), '--resume', 'auto'])
    assert 'continuing at epoch 0, batch 3 of 6' in caplog.text
    after = caplog.text.split('batch 3 of 6')[1]
    assert 'Train: 0 [   3/6' in after and 'Train: 0 [   2/6' not in after
    rows, expected = summary(resumed), summary(straight)
    assert [r['epoch'] for r in rows] == ['0']
    for a, b in zip(rows, expected):
        assert float(a['train_loss']) == pytest.approx(float(b['train_loss']), rel=1e-5)
        assert float(a['eval_loss']) == pytest.approx(float(b['eval_loss']), rel=1e-5)


def test_validate_reads_shards_like_folders(shapes, shards, tmp_path):
    run = train_script.main([shapes, *FAST, '--epochs', '1', '--output', str(tmp_path)])
    folder = validate_script.main([shapes, '--checkpoint', run, '-j', '0'])
    sharded = validate_script.main([shards, '--dataset', 'wds', '--checkpoint', run, '-j', '2', '-b', '5'])
    pattern = validate_script.main([os.path.join(shards, 'val', 'val-{000000..000002}.tar'), '--dataset', 'wds',
                                    '--checkpoint', run, '-j', '0'])
    for rows in (sharded, pattern):
        assert [r['top1'] for r in rows] == [r['top1'] for r in folder]
        assert [r['loss'] for r in rows] == pytest.approx([r['loss'] for r in folder], rel=1e-6)


def test_bad_shard_inputs_are_named(shards, tmp_path, capsys):
    with pytest.raises(DataError, match='no "test" folder of shards'):
        find_shard_split(shards, 'test')
    with pytest.raises(DataError, match=r'5 of 10 shards .* do not exist'):
        find_shard_split(os.path.join(shards, 'train', 'train-{000000..000001}.tar').replace('000001', '000009'))
    broken = tmp_path / 'broken'
    shutil.copytree(shards, broken)
    with tarfile.open(broken / 'train' / 'train-000002.tar') as tar:
        offset = tar.getmembers()[6].offset
    with open(broken / 'train' / 'train-000002.tar', 'r+b') as f:
        f.seek(offset)
        f.write(b'\xff' * 512)  # a damaged header in the middle
    with pytest.raises(SystemExit) as exit_info:
        train_script.cli([str(broken), *FAST, '--dataset', 'wds', '--epochs', '1', '-j', '0', '--output',
                          str(tmp_path / 'out')])
    assert exit_info.value.code == 2
    assert 'train-000002.tar' in capsys.readouterr().err
    with open(broken / 'train' / 'train-000002.tar', 'r+b') as f:
        f.truncate(offset)  # cut short at a member boundary: a valid, shorter tar
    with pytest.raises(DataError, match=r'train-000002.tar ends after 2 samples, its index counts at least 5'):
        list(iter_shard(str(broken / 'train' / 'train-000002.tar'), take=5))
    with pytest.raises(SystemExit):
        train_script.cli([shards, *FAST, '--dataset', 'wds', '--token-label', '--token-label-data', shards])
    assert 'the maps come from the data' in capsys.readouterr().err


def test_hugging_face_dataset_trains_and_validates(shapes, tmp_path):
    local = tmp_path / 'hf'
    for split, name in (('train', 'train'), ('val', 'validation')):
        shutil.copytree(os.path.join(shapes, split), local / name)
    cache = str(tmp_path / 'cache')
    run = train_script.main([cache, '--dataset', f'hfds/{local}', *FAST, '--epochs', '1',
                             '--output', str(tmp_path / 'out')])
    rows = summary(run)
    assert len(rows) == 1
    checked = validate_script.main([cache, '--dataset', f'hfds/{local}', '--split', 'validation', '--checkpoint', run,
                                    '-j', '0'])
    folder = validate_script.main([shapes, '--checkpoint', run, '-j', '0'])
    assert checked[0]['top1'] == pytest.approx(float(rows[0]['eval_top1']), abs=1e-3) == folder[0]['top1']


def copy_split(shards, split, dest):
    shutil.copytree(os.path.join(shards, split), dest)
    return dest


def edit_index(folder, change):
    path = os.path.join(folder, 'index.json')
    index = json.load(open(path))
    change(index)
    json.dump(index, open(path, 'w'))


def test_an_index_that_disagrees_with_its_tars_is_named(shards, tmp_path):
    """Counts lower than the tars hold trained and evaluated a part of the set without a word."""
    folder = copy_split(shards, 'val', tmp_path / 'val')
    assert find_shard_split(str(folder)).num_samples == 12
    edit_index(folder, lambda index: index['shards'][1].update(num_samples=2))
    with pytest.raises(DataError, match=r'index\.json counts 2 samples in val-000001\.tar, which holds 5'):
        find_shard_split(str(folder))
    for field, value, expected in (('num_samples', -1, r'shards\[0\]\.num_samples must be a whole number >= 0'),
                                   ('num_samples', 'ten', r'shards\[0\]\.num_samples must be a whole number'),
                                   ('name', 7, r'shards\[0\] must be an object with a file name')):
        edit_index(folder, lambda index: index['shards'][0].update({field: value}))
        with pytest.raises(DataError, match=rf'{re.escape(str(folder))}.index\.json: field {expected}'):
            find_shard_split(str(folder))
        folder = copy_split(shards, 'val', tmp_path / f'val-{field}-{value}')
    edit_index(folder, lambda index: index['shards'][0].pop('num_samples'))
    with pytest.raises(DataError, match=r'field shards\[0\]\.num_samples must be a whole number >= 0, found None'):
        find_shard_split(str(folder))
    folder = copy_split(shards, 'train', tmp_path / 'train')
    edit_index(folder, lambda index: index.update(label_size='18x18'))
    with pytest.raises(DataError, match=r'field label_size must be two positive whole numbers'):
        find_shard_split(str(folder))
    edit_index(folder, lambda index: index.update(label_size=None, class_names='abc'))
    with pytest.raises(DataError, match=r'field class_names must be a list of strings'):
        find_shard_split(str(folder))


def test_a_damaged_header_without_an_index_is_an_error_not_a_smaller_set(shapes, shards, tmp_path, caplog):
    import models
    run = str(tmp_path / 'run')
    os.makedirs(run)
    torch.save(models.volo_d1(img_size=32, num_classes=3).state_dict(), os.path.join(run, 'last.pth.tar'))
    folder = copy_split(shards, 'val', tmp_path / 'val')
    os.remove(folder / 'index.json')
    results = tmp_path / 'results.json'
    [row] = validate_script.main([str(tmp_path), '--dataset', 'wds', '--checkpoint', os.path.join(run, 'last.pth.tar'),
                                  '--img-size', '32', '--num-classes', '3', '-j', '0', '--results-file', str(results)])
    assert row['num_images'] == 12 and json.load(open(results))['num_images'] == 12
    assert 'on 12 images' in caplog.text
    with tarfile.open(folder / 'val-000001.tar') as tar:
        offset = tar.getmembers()[6].offset
    with open(folder / 'val-000001.tar', 'r+b') as f:
        f.seek(offset)
        f.write(b'\xff' * 512)  # tarfile stops here without an error
    with pytest.raises(DataError, match=r'val-000001\.tar ends after 2 samples at byte \d+ without tar\'s '
                                        r'end-of-archive blocks'):
        validate_script.main([str(tmp_path), '--dataset', 'wds', '--checkpoint', os.path.join(run, 'last.pth.tar'),
                              '--img-size', '32', '--num-classes', '3', '-j', '0'])


def test_make_shards_rewrites_what_a_changed_plan_changes(shapes, tmp_path):
    from PIL import Image
    data = tmp_path / 'data'
    shutil.copytree(shapes, data, ignore=shutil.ignore_patterns('labels'))
    victim = sorted((data / 'train').rglob('*.png'))[0]
    Image.open(victim).convert('RGB').save(victim, compress_level=0)  # uncompressed: its size is fixed by its dims
    size = victim.stat().st_size
    out = tmp_path / 'shards'
    make_shards(str(data), str(out), None, shard_size=5, seed=0)
    train = out / 'train'

    def stored(folder):
        return {s['path.txt'].decode(): (os.path.basename(s['__url__']), s['png'])
                for s in wds.WebDataset(sorted(glob.glob(str(folder / '*.tar'))), shardshuffle=False)}

    before, times = stored(train), {p.name: p.stat().st_mtime_ns for p in train.glob('*.tar')}
    relative = os.path.relpath(victim, data / 'train')
    image = Image.open(victim).convert('RGB')
    image.putpixel((0, 0), tuple(255 - c for c in image.getpixel((0, 0))))
    image.save(victim, compress_level=0)  # other pixels, the same number of bytes
    assert victim.stat().st_size == size and victim.read_bytes() != before[relative][1]
    make_shards(str(data), str(out), None, shard_size=5, seed=0)
    after = stored(train)
    assert after[relative][1] == victim.read_bytes()  # the new pixels, not the old ones
    rewritten = {p.name for p in train.glob('*.tar') if p.stat().st_mtime_ns != times[p.name]}
    assert rewritten == {before[relative][0]}  # only the shard that holds it

    make_shards(str(data), str(out), None, shard_size=5, seed=1)
    reseeded = stored(train)
    assert json.load(open(train / 'index.json'))['seed'] == 1
    assert sorted(reseeded) == sorted(after) and [k for k in reseeded] != [k for k in after]  # another order
    order = [s['path.txt'].decode() for s in wds.WebDataset(sorted(glob.glob(str(train / '*.tar'))),
                                                            shardshuffle=False)]
    fresh = tmp_path / 'fresh'
    make_shards(str(data), str(fresh), None, shard_size=5, seed=1)
    assert md5s(train) == md5s(fresh / 'train')  # the same bytes as a first run with that seed
    assert order == [s['path.txt'].decode() for s in wds.WebDataset(sorted(glob.glob(str(fresh / 'train' / '*.tar'))),
                                                                    shardshuffle=False)]
