"""Faults and bad inputs: nothing lost, nothing silently wrong (each test reproduces its fault)."""
import errno
import glob
import gzip
import json
import logging
import os
import shutil
import signal
import time

import pytest
import timm
import torch
import yaml

import main as train_script
import models
import validate as validate_script
from tests.forked import run_forked, start_forked, wait_forked
from tests.training_runs import FAST
from tests.training_runs import copy_with_unreadable_image
from tests.training_runs import run_fast as _run
from data import DataError, DatasetTokenLabel
from utils import CheckpointError, load_pretrained_weights, safe_load
from engine.checkpoint_saver import CheckpointSaver, DiskFullError
from engine.runs import RunLock
from engine.summary import read_summary, write_summary
from utils.cli import UsageError


def _cli_error(argv, caplog, script=train_script):
    with pytest.raises(SystemExit) as exit_info:
        script.cli(argv)
    assert exit_info.value.code == 2
    return caplog.text


def _epochs(run):
    return [r['epoch'] for r in read_summary(os.path.join(run, 'summary.csv'))]


# ------------------------------------------------------------------ work that can be lost

def test_kill_before_the_rename_loses_nothing(shapes, tmp_path, caplog, monkeypatch):
    """SIGKILL right after epoch 0's checkpoint is written and before it takes any name (and before
    its summary row is written): --resume auto finds the complete file under its temporary name, and
    the summary row of epoch 0 comes back from it."""
    out = tmp_path / 'out'
    def killed_before_the_rename():
        real = os.replace

        def replace(src, dst, *args, **kwargs):
            log = os.path.join(os.path.dirname(dst), 'train.log')
            if dst.endswith('.pth.tar') and 'Train: 0 [   2/3' in open(log).read():
                os.kill(os.getpid(), signal.SIGKILL)  # the new checkpoint is complete under its temporary names
            return real(src, dst, *args, **kwargs)

        os.replace = replace  # in the forked process only
        train_script.cli([shapes, *FAST, '--output', str(out), '--epochs', '2', '--checkpoint-hist', '0'])

    [(code, output)] = run_forked([killed_before_the_rename], tmp_path / 'logs')
    assert code == -signal.SIGKILL, output[-2000:]
    run = glob.glob(str(out / 'train' / '*'))[0]
    assert sorted(os.listdir(run)) == ['.lock', 'args.yaml', 'last.pth.tar.partial', 'model_best.pth.tar.partial',
                                       'train.log']
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    with monkeypatch.context() as patch:  # the summary is rebuilt as soon as the run resumes
        patch.setattr(train_script, 'train_one_epoch', interrupted)
        with pytest.raises(KeyboardInterrupt):
            _run(shapes, out, '--epochs', '2', '--resume', 'auto', '--checkpoint-hist', '0')
    assert _epochs(run) == ['0']
    with caplog.at_level('INFO'):
        assert _run(shapes, out, '--epochs', '2', '--resume', 'auto', '--checkpoint-hist', '0') == run
    assert f'(the newest complete checkpoint of {run}, epoch 0)' in caplog.text
    assert 'continuing at epoch 1' in caplog.text
    assert _epochs(run) == ['0', '1']
    assert safe_load(os.path.join(run, 'last.pth.tar'))['epoch'] == 1
    assert not glob.glob(os.path.join(run, '*.partial'))


def test_resume_auto_takes_any_complete_checkpoint_and_matches_the_experiment(shapes, tmp_path, caplog):
    run = _run(shapes, tmp_path, '--epochs', '2')
    os.remove(os.path.join(run, 'last.pth.tar'))  # lost: checkpoint-1 still holds epoch 1
    with open(os.path.join(run, 'checkpoint-0.pth.tar'), 'r+b') as f:
        f.truncate(100)  # and an incomplete one is skipped
    os.utime(os.path.join(run, 'checkpoint-0.pth.tar'))
    with caplog.at_level('INFO'):
        again = _run(shapes, tmp_path, '--epochs', '3', '--resume', 'auto')
    assert again == run and 'checkpoint-1.pth.tar (the newest complete checkpoint' in caplog.text
    assert _epochs(run) == ['0', '1', '2']
    # another experiment's command never continues this run
    msg = _cli_error([shapes, *FAST, '--output', str(tmp_path), '--epochs', '4', '--resume', 'auto',
                      '--lr', '1e-3'], caplog)
    assert 'no run under' in msg and run in msg and "lr: run 0.0005, command 0.001" in msg
    assert _epochs(run) == ['0', '1', '2']


def test_a_second_process_on_the_same_run_is_refused(shapes, tmp_path, caplog):
    run = _run(shapes, tmp_path, '--epochs', '1')
    lock = RunLock(run)  # a training process holding the run
    try:
        msg = _cli_error([shapes, *FAST, '--output', str(tmp_path), '--epochs', '2', '--resume', 'auto'], caplog)
        assert 'is being written by pid' in msg
    finally:
        lock.release()
    assert _epochs(run) == ['0']


def test_summary_lines_that_are_partial_or_blank(tmp_path):
    path = tmp_path / 'summary.csv'
    path.write_text('epoch,train_loss,eval_top1\n0,1.5,40\n1,1.2,50\n\n2,1.1\n')
    assert [r['epoch'] for r in read_summary(str(path))] == ['0', '1']


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(2, 2)


def test_disk_full_names_the_file_and_keeps_earlier_checkpoints(tmp_path, monkeypatch):
    model = _Tiny()
    saver = CheckpointSaver(model, torch.optim.SGD(model.parameters(), lr=0.1), args=None,
                            checkpoint_dir=str(tmp_path))
    saver.save_checkpoint(0, metric=1.0)
    before = (tmp_path / 'last.pth.tar').read_bytes()

    def full_disk(obj, f, *a, **k):
        f.write(b'x' * 100)
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(torch, 'save', full_disk)
    with pytest.raises(DiskFullError, match=r'no space left on device while writing .*last\.pth\.tar\.partial'):
        saver.save_checkpoint(1, metric=2.0)
    assert (tmp_path / 'last.pth.tar').read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ['checkpoint-0.pth.tar', 'last.pth.tar', 'model_best.pth.tar']
    # the summary too: the old file stays, nothing partial is left
    summary = tmp_path / 'summary.csv'
    write_summary(str(summary), [{'epoch': 0, 'eval_top1': 50.0}])
    real_fsync = os.fsync

    def full_fsync(fd):
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(os, 'fsync', full_fsync)
    with pytest.raises(DiskFullError, match=r'no space left on device while writing .*summary\.csv\.partial'):
        write_summary(str(summary), [{'epoch': 0, 'eval_top1': 50.0}, {'epoch': 1, 'eval_top1': 60.0}])
    monkeypatch.setattr(os, 'fsync', real_fsync)
    assert [r['epoch'] for r in read_summary(str(summary))] == ['0'] and not (tmp_path / 'summary.csv.partial').exists()


# ------------------------------------------------------------------ results that are silently wrong

def test_validation_classes_come_from_the_training_split(shapes, tmp_path, caplog):
    root = tmp_path / 'data'
    shutil.copytree(shapes, root)
    run = _run(str(root), tmp_path / 'out', '--epochs', '1')
    ckpt = os.path.join(run, 'last.pth.tar')
    classes = sorted(os.listdir(root / 'val'))
    assert safe_load(ckpt)['class_names'] == classes
    # without its first class the others keep their indices: each image's result is unchanged
    shutil.rmtree(root / 'val' / classes[0])
    fewer = validate_script.main([str(root), '--checkpoint', ckpt, '-j', '0'])[0]
    model = timm.create_model('volo_test', img_size=32, num_classes=3)
    load_pretrained_weights(model, ckpt)
    from data import create_eval_loader, eval_class_indices
    loader = create_eval_loader(str(root / 'val'), 32, 16, crop_pct=0.96, num_workers=0, device='cpu',
                                class_to_idx=eval_class_indices(str(root / 'val'), classes))
    images, targets = next(iter(loader))
    assert set(targets.tolist()) == {1, 2}  # the training indices, not 0 and 1
    with torch.no_grad():
        logits = model.eval()(images)
    assert fewer['top1'] == pytest.approx(100. * (logits.argmax(1) == targets).float().mean().item(), abs=1e-3)
    assert fewer['loss'] == pytest.approx(torch.nn.functional.cross_entropy(logits, targets).item(), rel=1e-4)
    # an extra class is an error before any compute, in training and in validation
    (root / 'val' / 'zebra').mkdir()
    shutil.copy(sorted((root / 'val' / classes[1]).iterdir())[0], root / 'val' / 'zebra' / 'z.png')
    msg = _cli_error([str(root), '--checkpoint', ckpt, '-j', '0'], caplog, validate_script)
    assert 'zebra' in msg and 'training classes do not have' in msg
    msg = _cli_error([str(root), *FAST, '--output', str(tmp_path / 'o2'), '--epochs', '1'], caplog)
    assert 'zebra' in msg and not glob.glob(str(tmp_path / 'o2' / 'train' / '*' / '*.pth.tar'))


def test_token_label_names_that_collide_and_bad_label_maps(shapes, tmp_path):
    root = tmp_path / 'data'
    shutil.copytree(shapes, root)
    first = sorted((root / 'train').rglob('*.png'))[0]
    shutil.copy(first, first.with_suffix('.jpg').with_name(first.stem + '.jpg'))
    with pytest.raises(DataError, match=r'would be shared by several images.*\.png.*\.jpg|\.jpg.*\.png'):
        DatasetTokenLabel(str(root / 'train'), str(root / 'labels'))
    os.remove(first.with_name(first.stem + '.jpg'))
    dataset = DatasetTokenLabel(str(root / 'train'), str(root / 'labels'), num_classes=3)
    target = dataset.label_paths[1]
    good = torch.load(target)
    bad_maps = {
        'bool': (good != 0), 'fractional indices': torch.stack([good[0], good[1] + 0.5]),
        'out of range': torch.stack([good[0], good[1] + 3]), 'NaN': torch.stack([good[0] * float('nan'), good[1]]),
        'size': good[:, :, :4, :4],
    }
    messages = {}
    for name, bad in bad_maps.items():
        torch.save(bad.contiguous(), target)
        with pytest.raises(DataError) as err:
            dataset[1]
        messages[name] = str(err.value)
        assert target in messages[name], name
    assert 'half or float' in messages['bool'] and 'whole numbers in 0..2' in messages['fractional indices']
    assert 'whole numbers in 0..2' in messages['out of range'] and 'NaN' in messages['NaN']
    assert '4x4' in messages['size']


@pytest.mark.parametrize('entry,expected', [
    ({'model_ema': 'no'}, 'key model_ema: expected true or false'),
    ({'token_label': 'false'}, 'key token_label: expected true or false'),
    ({'amp_dtype': 'float8'}, "key amp_dtype: 'float8' is not one of"),
    ({'model': None}, 'key model: expected a string, got null'),
    ({'epochs': 1.5}, 'key epochs: expected a positive integer, got 1.5'),
    ({'batch_size': [4, 8]}, 'key batch_size: expected a positive integer, got list'),
    ({'batch_size': 0}, 'key batch_size: expected a positive integer'),
    ('epochs: [1\n', 'is not valid YAML at line'),
])
def test_yaml_values_pass_the_command_line_checks(tmp_path, capsys, entry, expected):
    cfg = tmp_path / 'recipe.yaml'
    cfg.write_text(entry if isinstance(entry, str) else yaml.safe_dump(entry))
    with pytest.raises(SystemExit):
        train_script.parse_args(['/data', '-c', str(cfg)])
    err = capsys.readouterr().err
    assert f'config file {cfg}' in err and expected in err


def test_arguments_that_would_void_training(shapes, tmp_path, caplog):
    base = [shapes, *FAST, '--output', str(tmp_path)]
    msg = _cli_error(base + ['--epochs', '1', '-b', '64'], caplog)
    assert '-b 64 is larger than the 24 training images' in msg
    run = _run(shapes, tmp_path, '--epochs', '1')
    msg = _cli_error(base + ['--epochs', '1', '--resume', os.path.join(run, 'last.pth.tar')], caplog)
    assert 'nothing to train: the run starts at epoch 1' in msg
    for bad in (['-b', '0'], ['-j', '-1'], ['--img-size', '0'], ['--eval-metric', 'top3'],
                ['--input-size', '3', '64', '64']):
        with pytest.raises(SystemExit):
            train_script.parse_args(base + bad)
    caplog.clear()
    with caplog.at_level('WARNING'):
        short = train_script.main([shapes, '--model', 'volo_test', '--img-size', '32', '-b', '8', '-j', '0', '--aa', '',
                                   '--reprob', '0', '--output', str(tmp_path / 'short'), '--epochs', '1',
                                   '--checkpoint-hist', '0'])
    assert '--warmup-epochs 20 is not shorter than --epochs 1: no warmup' in caplog.text
    assert '--cooldown-epochs 10 is not shorter than --epochs 1: no cooldown' in caplog.text
    assert _epochs(short) == ['0'] and not glob.glob(os.path.join(short, 'checkpoint-*'))


def test_non_finite_weights_are_an_error_naming_the_tensors(tmp_path):
    model = models.volo_d1(img_size=32, num_classes=3)
    state = model.state_dict()
    state['norm.weight'][0] = float('nan')
    state['head.bias'][1] = float('inf')
    path = tmp_path / 'nan.pth.tar'
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r'non-finite .* in 2 tensor\(s\): norm.weight, head.bias'):
        load_pretrained_weights(models.volo_d1(img_size=32, num_classes=3), str(path))
    load_pretrained_weights(models.volo_d1(img_size=32, num_classes=3), str(path), allow_non_finite=True)


# ------------------------------------------------------------------ messages

@pytest.mark.parametrize('content,looks_like', [
    (b'', 'an empty file'), (b'hello, not a checkpoint\n', 'a text file'), (bytes(range(7, 250)), 'binary data'),
    (gzip.compress(b'abc', mtime=0), 'gzip-compressed data'), (json.dumps({'a': 1}).encode(), 'JSON text')],
    ids=['empty', 'text', 'random', 'gzip', 'json'])
def test_files_that_are_not_checkpoints(tmp_path, content, looks_like):
    path = tmp_path / 'x.pth.tar'
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=f'is not a PyTorch checkpoint: it looks like .*{looks_like}'):
        safe_load(str(path))


def test_resume_from_another_variant_or_size_is_one_line(shapes, tmp_path, caplog):
    run = _run(shapes, tmp_path, '--epochs', '1', '--img-size', '64')
    msg = _cli_error([shapes, *FAST, '--output', str(tmp_path), '--epochs', '2', '--resume',
                      os.path.join(run, 'last.pth.tar')], caplog)
    error = [line for line in msg.splitlines() if 'pos_embed' in line]
    assert len(error) == 1 and 'file (1, 4, 4, 64) vs model (1, 2, 2, 64)' in error[0] and len(error[0]) < 600


def test_validate_reports_bad_inputs_clearly(shapes, tmp_path, caplog):
    run = _run(shapes, tmp_path, '--epochs', '1')
    (tmp_path / 'bad_dir').mkdir()
    shutil.copy(os.path.join(run, 'last.pth.tar'), tmp_path / 'bad_dir' / 'good.pth.tar')
    (tmp_path / 'bad_dir' / 'broken.pth.tar').write_bytes(b'\x80' + os.urandom(64))
    with pytest.raises(SystemExit) as exit_info:
        validate_script.cli([shapes, '--checkpoint', str(tmp_path / 'bad_dir'), '--model', 'volo_test',
                             '--img-size', '32', '-j', '0'])
    assert exit_info.value.code == 1
    rows = open(tmp_path / 'bad_dir' / 'validation_results.csv').read().splitlines()
    assert len(rows) == 2 and 'good.pth.tar' in rows[1]
    assert 'not evaluated: ' + str(tmp_path / 'bad_dir' / 'broken.pth.tar') in caplog.text
    msg = _cli_error([shapes, '--checkpoint', run, '-j', '0', '--results-file', str(tmp_path / 'no' / 'r.json')],
                     caplog, validate_script)
    assert 'does not exist' in msg and str(tmp_path / 'no') in msg
    msg = _cli_error([shapes, '--model', 'volo_d9', '-j', '0'], caplog, validate_script)
    assert '--model volo_d9' in msg


def test_corrupt_validation_image_is_skipped_not_replaced(shapes, tmp_path, caplog, monkeypatch):
    root, victim = copy_with_unreadable_image(shapes, tmp_path / 'data', 'val')
    built, real_create = [], timm.create_model  # the (randomly initialised) model validate.py builds
    monkeypatch.setattr(timm, 'create_model', lambda *a, **k: built.append(real_create(*a, **k)) or built[-1])
    torch.manual_seed(0)
    with caplog.at_level('INFO'):
        rows = validate_script.main([str(root), '--model', 'volo_test', '--img-size', '32', '--num-classes', '3',
                                     '-j', '0', '-b', '4'])
    monkeypatch.undo()
    assert str(victim) in caplog.text
    assert '(11 images' in caplog.text  # 12 in the folder, one unreadable, none counted twice
    # the metrics of the 11 readable images, each scored once, computed here (the loss tells each image's
    # logits and target apart where a random model's top-1 may not)
    from PIL import Image
    from timm.data import create_transform
    transform = create_transform(32, is_training=False, crop_pct=0.96, interpolation='bicubic')
    classes = sorted(os.listdir(root / 'val'))
    readable = [(path, index) for index, name in enumerate(classes) for path in sorted((root / 'val' / name).iterdir())
                if path != victim]
    images = torch.stack([transform(Image.open(path).convert('RGB')) for path, _ in readable])
    targets = torch.tensor([index for _, index in readable])
    with torch.no_grad():
        logits = built[-1].eval()(images)
    assert len(targets) == rows[0]['num_images'] == 11
    assert rows[0]['top1'] == pytest.approx(100. * (logits.argmax(1) == targets).float().mean().item(), abs=1e-3)
    assert rows[0]['loss'] == pytest.approx(torch.nn.functional.cross_entropy(logits, targets).item(), rel=1e-4)


def test_ctrl_c_with_workers_exits_promptly(shapes, tmp_path):
    argv = [shapes, *FAST[:-8], '-j', '2', '--aa', '', '--reprob', '0', '--output', str(tmp_path / 'out'),
            '--epochs', '50']

    def train():
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
        train_script.cli(argv)

    log = str(tmp_path / 'train.out')
    pid = start_forked(train, log)
    deadline = time.time() + 120
    while time.time() < deadline and 'Train: 1 [' not in open(log).read():
        time.sleep(0.05)
    assert 'Train: 1 [' in open(log).read(), open(log).read()[-3000:]
    os.kill(pid, signal.SIGINT)
    start = time.time()
    code = wait_forked(pid, log, timeout=60)  # well under a second on an idle 2-core machine
    assert code == 130 and time.time() - start < 60
    assert 'interrupted' in open(log).read()


def test_generator_topk_and_stale_temporaries(shapes, tmp_path, caplog):
    from tools import generate_token_labels
    out = tmp_path / 'labels'
    (out / 'c0').mkdir(parents=True)
    (out / 'c0' / 'img.pt.tmp4242').write_bytes(b'half')  # an older version's temporary name
    (out / 'c0' / 'other.pt.partial').write_bytes(b'half')
    argv = [os.path.join(shapes, 'train'), '--output', str(out), '--model', 'volo_d1', '--img-size', '32',
            '--num-classes', '3', '-b', '8', '-j', '0']
    assert generate_token_labels.cli(argv + ['--topk', '5']) == 2
    assert 'exceeds the model' in caplog.text
    assert not (out / 'c0' / 'img.pt.tmp4242').exists() and not (out / 'c0' / 'other.pt.partial').exists()


def test_a_kill_between_the_last_checkpoint_and_its_summary_row_is_repaired_on_resume(shapes, tmp_path, caplog):
    """The run's checkpoint holds its rows: resuming a run with nothing left to train still completes
    summary.csv (a run resumed to train on rebuilds it when its directory opens)."""
    caplog.set_level(logging.INFO)
    run = _run(shapes, tmp_path, '--epochs', '1')
    summary = os.path.join(run, 'summary.csv')
    rows = read_summary(summary)
    with open(summary) as f:
        header = f.readline()
    with open(summary, 'w') as f:  # as a kill after the checkpoint's rename, before the summary's, leaves it
        f.write(header)
    with pytest.raises(UsageError, match='nothing to train'):
        _run(shapes, tmp_path, '--epochs', '1', '--resume', 'auto')
    assert read_summary(summary) == rows and 'completed from its checkpoint' in caplog.text
