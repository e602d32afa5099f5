"""--log-wandb (offline) and --log-tensorboard: the files they write hold summary.csv's numbers."""
import csv
import glob
import json
import os
import struct
import sys
import time

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from wandb.proto import wandb_internal_pb2

from tests.training_runs import run_fast
from utils.cli import UsageError

SUMMARY_COLUMNS = ('train_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'lr', 'epoch_time')


def wandb_records(path):
    """The protobuf records of a .wandb file: a 7-byte header, then LevelDB-style log blocks of
    32 KiB whose chunks (7-byte header: crc, length, type) are joined into records."""
    data = open(path, 'rb').read()
    assert data[:4] == b':W&B'
    block, pos, pending, records = 32768, 7, b'', []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer
            pos += left
            continue
        _, length, kind = struct.unpack('<IHB', data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b''
    return records


def wandb_file_records(run, history_rows, timeout=60):
    """(the run's .wandb files, the records of the one) once it holds `history_rows` history rows,
    or after `timeout` seconds: wandb's own core process writes the file, so a slow flush on a busy
    machine is waited for, not read as a missing row."""
    deadline = time.time() + timeout
    while True:
        files = glob.glob(os.path.join(run, 'wandb', 'offline-run-*', 'run-*.wandb'))
        try:
            records = wandb_records(files[0]) if len(files) == 1 else []
        except Exception:  # noqa: BLE001 - a record still being written fails to parse
            records = []
        if len(wandb_history(records)) >= history_rows or time.time() > deadline:
            return files, records
        time.sleep(0.2)


def wandb_history(records):
    return [{item.key or '/'.join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for r in records if r.WhichOneof('record_type') == 'history']


def test_wandb_offline_and_tensorboard_hold_the_summary(shapes, tmp_path, monkeypatch):
    monkeypatch.setenv('WANDB_MODE', 'offline')
    monkeypatch.setenv('WANDB_SILENT', 'true')
    tensorboard = tmp_path / 'tb'
    run = run_fast(shapes, tmp_path / 'out', '--epochs', '2', '--log-wandb', '--wandb-project', 'volo-tests',
                   '--wandb-tags', 'shapes', 'cpu', '--log-tensorboard', str(tensorboard))
    with open(os.path.join(run, 'summary.csv')) as f:
        rows = list(csv.DictReader(f))
    assert [r['epoch'] for r in rows] == ['0', '1']

    events = EventAccumulator(str(tensorboard))
    events.Reload()
    for column in SUMMARY_COLUMNS:
        logged = [(s.step, s.value) for s in events.Scalars(f'epoch/{column}')]
        assert logged == [(i, pytest.approx(float(r[column]), rel=1e-6)) for i, r in enumerate(rows)], column
    steps = events.Scalars('train/loss')
    assert [s.step for s in steps] == [1, 2, 3, 4, 5, 6]  # 3 steps an epoch
    for name in ('train/lr', 'train/images_per_s', 'train/data_time'):
        assert len(events.Scalars(name)) == 6

    files, records = wandb_file_records(run, history_rows=8)  # 3 steps, a row, 3 steps, a row
    assert len(files) == 1
    history = wandb_history(records)
    epochs = [h for h in history if 'epoch/epoch' in h]
    assert len(epochs) == 2
    for logged, row in zip(epochs, rows):
        assert logged['epoch/epoch'] == int(row['epoch'])
        for column in SUMMARY_COLUMNS:
            assert logged[f'epoch/{column}'] == float(row[column]), column  # doubles: exactly the CSV's
    step_rows = [h for h in history if 'train/loss' in h]
    assert [h['train/step'] for h in step_rows] == [1, 2, 3, 4, 5, 6]
    assert [h['train/loss'] for h in step_rows] == pytest.approx([s.value for s in steps], rel=1e-6)
    assert [h['_step'] for h in history] == list(range(8))  # 3 steps, a row, 3 steps, a row: none refused
    run_record = next(r.run for r in records if r.WhichOneof('record_type') == 'run')
    assert run_record.project == 'volo-tests' and list(run_record.tags) == ['shapes', 'cpu']

    log = open(os.path.join(run, 'train.log')).read()
    assert 'Train: 1 [   2/3' in log and 'Test: loss' in log and '\r' not in log


@pytest.mark.parametrize('flag, module, package', [(['--log-wandb'], 'wandb', 'wandb'),
                                                   (['--log-tensorboard', 'tb'], 'torch.utils.tensorboard',
                                                    'tensorboard')])
def test_a_missing_tracking_package_is_named_before_training(shapes, tmp_path, monkeypatch, flag, module, package):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.raises(UsageError, match=f'needs the {package} package: pip install {package}'):
        run_fast(shapes, tmp_path, '--epochs', '1', *flag)
    assert not os.path.exists(tmp_path / 'train')  # nothing started
