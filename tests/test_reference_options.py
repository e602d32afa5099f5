"""The reference main.py's options that this one had lacked (main.add_reference_options): they have the
reference's defaults (its YAML files and args.yaml load, runs recorded without them still resume),
those with a feature here do what they say, those that change nothing are shown to, and the others
stop in one line naming the option and what to use instead."""
import csv
import logging
import os

import pytest
import torch
import yaml
from timm.data.loader import PrefetchLoader
from timm.layers import DropBlock2d, DropPath

import main as train_script
from data.loader import create_train_loader
from engine.options import option_defaults, run_extending
from engine.runs import differences
from tests.training_runs import FAST, run_fast
from utils import safe_load
from utils.cli import UsageError

REFERENCE_DEFAULTS = dict(gp=None, drop_block=None, drop_connect=None, no_prefetcher=False,
                          use_multi_epochs_loader=False, tta=0, torchscript=False, save_images=False, bn_tf=False,
                          aug_splits=0, jsd=False, split_bn=False, resplit=False)


def _model(*extra, model='volo_test'):
    args = train_script.parse_args(['/d', '--model', model, '--img-size', '32', '--num-classes', '3', *extra])
    return train_script.build_model(args)


def _drop_path_rates(model):
    return [m.drop_prob for m in model.modules() if isinstance(m, DropPath)]


def _refused(argv, caplog, capsys):
    """main.py's command line on argv (one epoch, should it train): exit code 2 and exactly one error
    line; returns it and everything the command printed."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        train_script.cli([*argv, '--epochs', '1'])
    assert exit_info.value.code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and '\n' not in errors[0]
    printed = capsys.readouterr().err.splitlines()
    assert f'ERROR: {errors[0]}' in printed
    return errors[0], printed


def test_reference_defaults_load_its_configs_and_resume_older_runs(tmp_path):
    parser = train_script.get_parser()
    args = train_script.parse_args(['/d'], parser)
    assert {key: getattr(args, key) for key in REFERENCE_DEFAULTS} == REFERENCE_DEFAULTS
    config = tmp_path / 'args.yaml'  # the keys as the reference's args.yaml has them
    config.write_text(yaml.safe_dump(dict(REFERENCE_DEFAULTS, model='volo_d1', drop_path=0.1)))
    loaded = train_script.parse_args(['/d', '-c', str(config)])
    assert {key: getattr(loaded, key) for key in REFERENCE_DEFAULTS} == REFERENCE_DEFAULTS and loaded.drop_path == 0.1

    # a run recorded before these options existed matches today's command at their defaults, and
    # with the options that change nothing; not with one that changes the model
    recorded = {key: value for key, value in vars(args).items() if key not in REFERENCE_DEFAULTS}
    defaults, extends = option_defaults(parser), run_extending(parser)
    assert differences(recorded, vars(args), extends, defaults) == []
    same = train_script.parse_args(['/d', '--no-prefetcher', '--use-multi-epochs-loader', '--tta', '1'])
    assert differences(recorded, vars(same), extends, defaults) == []
    other = train_script.parse_args(['/d', '--drop-connect', '0.1'])
    assert differences(recorded, vars(other), extends, defaults) == ['drop_connect: run None, command 0.1',
                                                                     'drop_path: run None, command 0.1']


def test_options_that_change_nothing_here(shapes, tmp_path, caplog):
    base = run_fast(shapes, tmp_path / 'base', '--epochs', '1')
    with caplog.at_level('INFO'):
        same = run_fast(shapes, tmp_path / 'same', '--epochs', '1', '--no-prefetcher', '--use-multi-epochs-loader',
                        '--tta', '1', '--gp', 'token')
    assert '--no-prefetcher changes nothing here' in caplog.text
    assert '--use-multi-epochs-loader changes nothing here' in caplog.text
    first, second = (safe_load(os.path.join(run, 'last.pth.tar'))['state_dict'] for run in (base, same))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    rows = [list(csv.DictReader(open(os.path.join(run, 'summary.csv')))) for run in (base, same)]
    assert [(r['train_loss'], r['eval_loss']) for r in rows[0]] == [(r['train_loss'], r['eval_loss']) for r in rows[1]]
    # what the two lines say: the training loader is timm's prefetcher (device-side normalisation)
    # and its workers persist across epochs
    loader = create_train_loader(os.path.join(shapes, 'train'), 32, 8, num_workers=1)
    assert isinstance(loader, PrefetchLoader) and loader.loader.persistent_workers


def test_drop_connect_is_the_old_name_of_drop_path(caplog):
    with caplog.at_level('WARNING'):
        old = _model('--drop-connect', '0.1')
    assert '--drop-connect is the old name of --drop-path' in caplog.text
    rates = _drop_path_rates(_model('--drop-path', '0.1'))
    assert rates and max(rates) == pytest.approx(0.1) and _drop_path_rates(old) == rates
    caplog.clear()
    with caplog.at_level('WARNING'):  # as timm 0.4's create_model did: --drop-path wins
        both = _model('--drop-path', '0.2', '--drop-connect', '0.1')
    assert '--drop-connect 0.1 is ignored: --drop-path 0.2 is given' in caplog.text
    assert _drop_path_rates(both) == _drop_path_rates(_model('--drop-path', '0.2'))


def test_drop_block_where_the_model_has_it(shapes, tmp_path, caplog, capsys):
    blocks = [m.drop_prob for m in _model('--drop-block', '0.1', model='resnet18').modules()
              if isinstance(m, DropBlock2d)]
    assert blocks == [0.1] * 4  # layer3 and layer4, as in timm
    assert not [m for m in _model(model='resnet18').modules() if isinstance(m, DropBlock2d)]
    line, _ = _refused([shapes, *FAST, '--output', str(tmp_path), '--drop-block', '0.1'], caplog, capsys)
    assert line.startswith('--drop-block 0.1: volo_test has no DropBlock layers') and '--drop-path' in line
    assert not (tmp_path / 'train').exists()


def test_gp_names_the_models_own_pooling_only(shapes, tmp_path, caplog, capsys):
    assert _model('--gp', 'token').global_pool == 'token'
    assert _model('--gp', 'avg', model='resnet18').global_pool.pool_type == 'avg'
    with pytest.raises(UsageError, match=r"--gp max: main.py trains resnet18 with its own pooling, 'avg'"):
        _model('--gp', 'max', model='resnet18')
    line, _ = _refused([shapes, *FAST, '--output', str(tmp_path), '--gp', 'avg'], caplog, capsys)
    assert line.startswith("--gp avg: main.py trains volo_test with its own pooling, 'token'")
    assert line.endswith('drop --gp')


@pytest.mark.parametrize('extra, config, says', [
    (['--torchscript'], None, ['--torchscript:', 'torch.jit.script(model)', 'tools.export_onnx']),
    (['--save-images'], None, ['--save-images:', 'drop it']),
    (['--bn-tf'], None, ['--bn-tf:', '--bn-eps 1e-3 --bn-momentum 0.01']),
    ([], {'bn_tf': True}, ['--bn-tf:', '--bn-eps 1e-3 --bn-momentum 0.01']),
    (['--tta', '2'], None, ['--tta 2:', 'drop --tta']),
    (['--aug-splits', '2'], None, ['--aug-splits 2:', 'drop it', '--aa augmix-m5-w4-d2']),
    (['--jsd'], None, ['--jsd:', 'drop it', '--aa augmix-m5-w4-d2']),
    (['--split-bn'], None, ['--split-bn:', 'drop it']),
    (['--resplit'], None, ['--resplit:', 'drop it']),
    (['--aug-splits', '3', '--jsd', '--split-bn'], None, ['--aug-splits 3 --jsd --split-bn:', 'drop them']),
], ids=['torchscript', 'save-images', 'bn-tf', 'bn-tf-in-config', 'tta', 'aug-splits', 'jsd', 'split-bn', 'resplit',
        'augmix-together'])
def test_options_without_a_feature_here_say_what_to_use(shapes, tmp_path, caplog, capsys, extra, config, says):
    if config:
        (tmp_path / 'reference.yaml').write_text(yaml.safe_dump(config))
        extra = ['-c', str(tmp_path / 'reference.yaml')]
    line, printed = _refused([shapes, *FAST, '--output', str(tmp_path), *extra], caplog, capsys)
    assert printed == [f'ERROR: {line}']  # refused before anything else is done or said
    assert line.startswith(says[0]) and all(text in line for text in says[1:]), line
    assert not (tmp_path / 'train').exists()
