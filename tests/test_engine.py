"""The engine every trainer shares (engine/): a non-finite loss on one rank stops every rank with
one line, a failed evaluation loses no trained work, segmentation's tracking holds its summary,
and the option vocabulary is one for all scripts (renamed spellings still work)."""
import argparse
import glob
import logging
import os
import re
from unittest import mock

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import main as train_script
import predict
import train_det
import train_seg
import validate
import validate_det
import validate_seg
from data import DataError
from data.synthetic_seg import make_seg_dataset
from engine.summary import read_summary
from loss import SegmentationLoss, TokenLabelCrossEntropy
from tests.forked import run_ranks
from tests.test_tracking import wandb_history, wandb_records
from tests.training_runs import FAST

SEG_FAST = ['--model', 'volo_d1', '--crop-size', '32', '32', '-b', '2', '--warmup-iters', '1', '-j', '0',
            '--log-interval', '1', '--head-channels', '32', '--aux-channels', '16', '--drop-path', '0']
SEG_COLUMNS = ('train_loss', 'lr', 'eval_mIoU', 'eval_mAcc', 'eval_aAcc')


@pytest.fixture(scope='module')
def seg_data(tmp_path_factory):
    return make_seg_dataset(str(tmp_path_factory.mktemp('seg')), 'seg-folder', num_classes=4, train=4, val=2,
                            size=(48, 48))


def poison_second_loss_on_rank_1():
    """Rank 1's training loss turns NaN at its second step (the losses' forward is wrapped in this
    process only)."""
    rank = int(os.environ['RANK'])
    for cls in (TokenLabelCrossEntropy, SegmentationLoss):
        forward, calls = cls.forward, [0]

        def wrapped(self, *args, _forward=forward, _calls=calls, **kwargs):
            out = _forward(self, *args, **kwargs)
            _calls[0] += 1
            if rank == 1 and _calls[0] == 2:
                out = (out[0] * float('nan'), *out[1:]) if isinstance(out, tuple) else out * float('nan')
            return out

        cls.forward = wrapped


@pytest.mark.parametrize('script', ['main.py', 'train_seg.py'])
def test_nan_on_one_rank_stops_every_rank_with_one_line(shapes, seg_data, tmp_path, script):
    if script == 'main.py':
        cli, args = train_script.cli, [shapes, *FAST, '-b', '4', '--epochs', '2', '--output', str(tmp_path / 'out')]
        where = 'epoch 0, step 1'
    else:
        cli = train_seg.cli
        args = [seg_data, '--dataset', 'seg-folder', *SEG_FAST, '--iters', '4', '--eval-interval', '0',
                '--output', str(tmp_path / 'out')]
        where = 'iteration 1'

    def rank():
        poison_second_loss_on_rank_1()
        cli(args)

    for code, text in run_ranks(rank, tmp_path / 'logs'):
        assert code != 0
        errors = [line for line in text.splitlines() if line.startswith('ERROR')]
        assert len(errors) == 1, text[-3000:]
        assert re.fullmatch(rf'ERROR: non-finite loss rank 1 \(nan\) at {where}: stopping\..*', errors[0]), errors
        assert 'Traceback' not in text and 'Connection' not in text, text[-3000:]


def test_a_failed_evaluation_keeps_the_trained_iterations(seg_data, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    data = tmp_path / 'data'
    import shutil
    shutil.copytree(seg_data, data)
    victim = sorted((data / 'images' / 'val').iterdir())[1]
    good = victim.read_bytes()
    victim.write_bytes(b'not an image')
    out = tmp_path / 'out'
    argv = [str(data), '--dataset', 'seg-folder', *SEG_FAST, '--iters', '4', '--eval-interval', '2',
            '--eval-mode', 'whole', '--output', str(out)]
    with pytest.raises(DataError, match='not a readable image'):
        train_seg.main(argv)
    [run] = glob.glob(str(out / 'train_seg' / '*'))
    saved = torch.load(os.path.join(run, 'last.pth.tar'), weights_only=False)
    assert saved['iteration'] == 2 and 'metric' not in saved
    rows = read_summary(os.path.join(run, 'summary.csv'))
    assert [r['iteration'] for r in rows] == ['2'] and 'eval_mIoU' not in rows[0]
    assert 'the evaluation at iteration 2 failed: the trained state is saved in' in caplog.text

    victim.write_bytes(good)
    caplog.clear()
    assert train_seg.main(argv + ['--resume', 'auto']) == run
    assert 'continuing at iteration 2' in caplog.text
    rows = read_summary(os.path.join(run, 'summary.csv'))
    assert [r['iteration'] for r in rows] == ['2', '4'] and rows[1]['eval_mIoU']


def test_train_seg_tracking_holds_the_summary(seg_data, tmp_path, monkeypatch):
    monkeypatch.setenv('WANDB_MODE', 'offline')
    monkeypatch.setenv('WANDB_SILENT', 'true')
    tensorboard = tmp_path / 'tb'
    run = train_seg.main([seg_data, '--dataset', 'seg-folder', *SEG_FAST, '--iters', '4', '--eval-interval', '2',
                          '--eval-mode', 'whole', '--output', str(tmp_path / 'out'), '--log-wandb',
                          '--wandb-project', 'volo-seg-tests', '--log-tensorboard', str(tensorboard)])
    rows = read_summary(os.path.join(run, 'summary.csv'))
    assert [r['iteration'] for r in rows] == ['2', '4']

    events = EventAccumulator(str(tensorboard))
    events.Reload()
    for column in SEG_COLUMNS:
        logged = [(s.step, s.value) for s in events.Scalars(f'iteration/{column}')]
        assert logged == [(int(r['iteration']), pytest.approx(float(r[column]), rel=1e-6)) for r in rows], column
    assert [s.step for s in events.Scalars('train/loss')] == [1, 2, 3, 4]

    [events_file] = glob.glob(os.path.join(run, 'wandb', 'offline-run-*', 'run-*.wandb'))
    records = wandb_records(events_file)
    history = wandb_history(records)
    logged = [h for h in history if 'iteration/iteration' in h]
    assert [h['iteration/iteration'] for h in logged] == [2, 4]
    for entry, row in zip(logged, rows, strict=True):
        for column in SEG_COLUMNS:
            assert entry[f'iteration/{column}'] == float(row[column]), column  # doubles: exactly the CSV's
    assert [h['train/step'] for h in history if 'train/loss' in h] == [1, 2, 3, 4]
    run_record = next(r.run for r in records if r.WhichOneof('record_type') == 'run')
    assert run_record.project == 'volo-seg-tests'


def test_renamed_segmentation_options_keep_working_and_say_what_to_use(tmp_path, caplog):
    new = train_seg.parse_args(['/d', '--dataset', 'seg-folder', '--img-scale', '96', '64', '--backbone-checkpoint',
                                'x.pth'])
    assert 'is now' not in caplog.text
    old = train_seg.parse_args(['/d', '--dataset', 'folder', '--scale', '96', '64', '--pretrained', 'x.pth'])
    for args in (new, old):
        assert (args.dataset, args.img_scale, args.backbone_checkpoint) == ('seg-folder', [96, 64], 'x.pth')
    for said in ('--dataset folder is now --dataset seg-folder', '--scale is now --img-scale',
                 '--pretrained is now --backbone-checkpoint'):
        assert said in caplog.text
    assert not hasattr(old, 'scale') and not hasattr(old, 'pretrained')

    caplog.clear()
    config = tmp_path / 'old.yaml'
    config.write_text(yaml.safe_dump({'dataset': 'folder', 'scale': [96, 64], 'pretrained': 'x.pth'}))
    args = train_seg.parse_args(['/d', '-c', str(config)])
    assert (args.dataset, args.img_scale, args.backbone_checkpoint) == ('seg-folder', [96, 64], 'x.pth')
    assert 'key scale is now img-scale' in caplog.text and 'key pretrained is now backbone-checkpoint' in caplog.text
    assert validate_seg.parse_args(['/d', '--checkpoint', 'c', '--dataset', 'folder']).dataset == 'seg-folder'


def _parser_built_by(parse, argv):
    """The ArgumentParser that a script's parse_args(argv) builds and parses with."""
    built, real = [], argparse.ArgumentParser.parse_args

    def recording(self, args=None, namespace=None):
        built.append(self)
        return real(self, args, namespace)

    with mock.patch.object(argparse.ArgumentParser, 'parse_args', recording):
        parse(argv)
    return built[-1]


def _assert_has_the_shared_options(parser, reference, own_defaults, script):
    """Every option of `reference` (engine/options.py's) is in `parser` as defined there: same
    spellings, destination, kind, type, choices and markers; the same default unless the script
    sets its own (`own_defaults`)."""
    by_flags = {tuple(a.option_strings): a for a in parser._actions}
    for shared in reference._actions:
        if isinstance(shared, argparse._HelpAction):
            continue
        action = by_flags.get(tuple(shared.option_strings))
        assert action is not None, f'{script}: no {"/".join(shared.option_strings)}'
        for field in ('dest', 'nargs', 'const', 'type', 'choices', 'required'):
            assert getattr(action, field) == getattr(shared, field), (script, shared.option_strings, field)
        assert type(action) is type(shared), (script, shared.option_strings)
        for marker in ('extends_run', 'resolved_later'):
            assert getattr(action, marker, False) == getattr(shared, marker, False), (script, shared.dest, marker)
        if shared.dest not in own_defaults:
            assert action.default == shared.default, (script, shared.dest)


def test_one_option_vocabulary_for_every_script():
    from engine import add_amp_options, add_device_options, add_training_options, run_extending
    trainers = {'main.py': (train_script.get_parser(), train_script.parse_args),
                'train_seg.py': (train_seg.get_parser(), train_seg.parse_args),
                'train_det.py': (train_det.get_parser(), train_det.parse_args)}
    validators = {'validate.py': validate.parse_args, 'validate_seg.py': validate_seg.parse_args,
                  'validate_det.py': validate_det.parse_args, 'predict.py': predict.parse_args}
    shared_training = argparse.ArgumentParser()
    add_training_options(shared_training)
    shared_inference = argparse.ArgumentParser()
    add_device_options(shared_inference)
    add_amp_options(shared_inference)
    common = {'-c', '--device', '-j', '--amp', '--amp-dtype', '--apex-amp', '--native-amp', '--seed', '--output',
              '--resume', '--log-interval', '--log-wandb', '--wandb-project', '--wandb-tags', '--wandb-resume-id',
              '--log-tensorboard'}
    assert common <= {flag for action in shared_training._actions for flag in action.option_strings}
    for script, (parser, parse) in trainers.items():
        flags = {flag for action in parser._actions for flag in action.option_strings}
        assert flags >= common, (script, common - flags)
        _assert_has_the_shared_options(parser, shared_training, {'output', 'seed', 'log_interval', 'workers'}, script)
        assert run_extending(shared_training) <= run_extending(parser), script
        args = parse(['/d', '--device', 'cpu', '-j', '1', '--amp', '--amp-dtype', 'bfloat16', '--seed', '7',
                      '--output', '/o', '--resume', 'auto', '--log-interval', '3', '--log-tensorboard', '/tb'])
        assert (args.device, args.workers, args.amp, args.amp_dtype, args.seed, args.output, args.resume,
                args.log_interval, args.log_tensorboard) == ('cpu', 1, True, 'bfloat16', 7, '/o', 'auto', 3, '/tb')
    for script, parse in validators.items():
        argv = ['/d', '--checkpoint', 'c', '--device', 'cpu', '-j', '1', '--amp', '--amp-dtype', 'bfloat16']
        _assert_has_the_shared_options(_parser_built_by(parse, argv), shared_inference, {'workers'}, script)
        args = parse(argv)
        assert (args.device, args.workers, args.amp, args.amp_dtype) == ('cpu', 1, True, 'bfloat16'), script
        assert parse(['/d', '--checkpoint', 'c', '--native-amp', '--apex-amp']).native_amp, script
    for parse in [parse for _, parse in trainers.values()] + list(validators.values()):
        for wrong in (['-j', '-1'], ['--amp-dtype', 'float32']):  # the shared checks, on every script
            with pytest.raises(SystemExit):
                parse(['/d', '--checkpoint', 'c', *wrong] if parse in validators.values() else ['/d', *wrong])
    # --sync-bn: main.py's and train_seg.py's (train_det.py has none)
    assert train_script.parse_args(['/d']).sync_bn is False and train_script.parse_args(['/d', '--sync-bn']).sync_bn
    assert train_seg.parse_args(['/d']).sync_bn is True and not train_seg.parse_args(['/d', '--no-sync-bn']).sync_bn
    # what a resumed command may change is marked where the options are defined
    main_parser, seg_parser, det_parser = (parser for parser, _ in trainers.values())
    assert {'epochs', 'output', 'workers', 'log_wandb', 'resume'} <= run_extending(main_parser)
    assert {'iters', 'output', 'workers', 'log_tensorboard', 'eval_interval'} <= run_extending(seg_parser)
    assert {'epochs', 'output', 'workers', 'log_wandb', 'resume', 'eval_interval', 'checkpoint_hist'} <= \
        run_extending(det_parser)
    assert not {'lr', 'model', 'batch_size'} & (run_extending(main_parser) | run_extending(seg_parser)
                                                | run_extending(det_parser))
