import csv
import glob
import json
import os
import re
import subprocess
import sys

import pytest
import timm
import torch
import yaml

import main as train_script
import utils.checkpoint
import validate as validate_script
from tests.training_runs import FAST, FAST_D1
from tests.training_runs import copy_with_unreadable_image
from tests.training_runs import run_fast as _run
from data.synthetic import make_shapes_dataset
from utils import load_pretrained_weights, safe_load

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def shapes_five(tmp_path_factory):
    return make_shapes_dataset(str(tmp_path_factory.mktemp('shapes5')), num_classes=5, train_per_class=4,
                               val_per_class=2, img_size=48, label_size=6, seed=1)


def _token_args(shapes, size=2):
    return ['--token-label', '--token-label-size', str(size), '--token-label-data', os.path.join(shapes, 'labels')]


def _summary(run_dir):
    with open(os.path.join(run_dir, 'summary.csv')) as f:
        return list(csv.DictReader(f))


def test_token_label_training_writes_loadable_outputs(shapes, tmp_path):
    run = _run(shapes, tmp_path, '--epochs', '2', *_token_args(shapes))
    assert re.search(r'train/\d{8}-\d{6}-volo_test-32$', run)
    files = set(os.listdir(run))
    assert {'args.yaml', 'summary.csv', 'last.pth.tar', 'model_best.pth.tar', 'checkpoint-0.pth.tar',
            'checkpoint-1.pth.tar'} <= files
    assert not [f for f in files if f.endswith('.partial')]
    rows = _summary(run)
    assert [r['epoch'] for r in rows] == ['0', '1']
    assert list(rows[0]) == ['epoch', 'train_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'lr', 'epoch_time']
    assert float(rows[0]['lr']) == pytest.approx(5e-4) and float(rows[1]['epoch_time']) > 0
    log = open(os.path.join(run, 'train.log')).read()  # from the first line on, before the run folder existed
    assert '3 classes in' in log and 'Train: 1 [' in log and 'Output: ' + run in log
    ckpt = safe_load(os.path.join(run, 'last.pth.tar'))
    assert ckpt['epoch'] == 1 and ckpt['args'].token_label_size == 2
    model = timm.create_model('volo_test', img_size=32, num_classes=3)
    load_pretrained_weights(model, os.path.join(run, 'model_best.pth.tar'))
    args = yaml.safe_load(open(os.path.join(run, 'args.yaml')))
    assert args['model'] == 'volo_test' and args['token_label'] is True


def test_resume_continues_epoch_and_optimizer_state(shapes, tmp_path, caplog):
    run = _run(shapes, tmp_path, '--epochs', '1', '--model-ema', '--model-ema-decay', '0.5', *_token_args(shapes))
    first = safe_load(os.path.join(run, 'last.pth.tar'))
    steps = int(next(iter(first['optimizer']['state'].values()))['step'])
    assert 'state_dict_ema' in first
    with caplog.at_level('INFO'):
        resumed = _run(shapes, tmp_path, '--epochs', '2', '--resume', os.path.join(run, 'last.pth.tar'),
                       '--model-ema', '--model-ema-decay', '0.5', *_token_args(shapes))
    assert 'continuing at epoch 1' in caplog.text and 'no EMA weights' not in caplog.text
    assert resumed == run  # continues in the run directory
    assert [r['epoch'] for r in _summary(run)] == ['0', '1']
    second = safe_load(os.path.join(run, 'last.pth.tar'))
    assert second['epoch'] == 1
    assert int(next(iter(second['optimizer']['state'].values()))['step']) == 2 * steps


def test_finetune_from_run_directory_to_new_size_and_classes(shapes, shapes_five, tmp_path):
    run = _run(shapes, tmp_path / 'base', '--epochs', '1', '--img-size', '64', *_token_args(shapes, 4))
    ft = _run(shapes_five, tmp_path / 'ft', '--epochs', '1', '--img-size', '96', '--finetune', run,
              '--lr', '1e-5', '--ground-truth', *_token_args(shapes_five, 6))
    ckpt = safe_load(os.path.join(ft, 'last.pth.tar'))
    assert ckpt['state_dict']['pos_embed'].shape == (1, 6, 6, 64)
    assert ckpt['state_dict']['head.weight'].shape == (5, 64)
    base = safe_load(os.path.join(run, 'model_best.pth.tar'))['state_dict']
    # a finetuned layer moved only a little from the base checkpoint (it was loaded, not re-initialised)
    diff = (ckpt['state_dict']['network.0.0.mlp.fc1.weight'] - base['network.0.0.mlp.fc1.weight']).abs().max()
    assert diff < 1e-3


def _how_mixed(before, after):
    """How the batch `after` was made from `before` and its batch-reversed copy, worked out from the
    pixels: ('mixup', lam) when every pixel is lam * before + (1 - lam) * reversed, ('cutmix', (y1, y2,
    x1, x2)) when a box comes from the reversed batch and the rest is unchanged, None when unchanged."""
    reversed_batch = before.flip(0)
    if torch.equal(after, before):
        return None
    changed = (after != before).any(1).any(0)  # (H, W)
    rows, cols = changed.any(1).nonzero()[:, 0].tolist(), changed.any(0).nonzero()[:, 0].tolist()
    y1, y2, x1, x2 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    box = torch.zeros_like(changed)
    box[y1:y2, x1:x2] = True
    if torch.equal(after, torch.where(box, reversed_batch, before)):
        return 'cutmix', (y1, y2, x1, x2)
    difference = before - reversed_batch
    lam = float(((after - reversed_batch) * difference).sum() / difference.square().sum())
    torch.testing.assert_close(after, lam * before + (1 - lam) * reversed_batch, rtol=1e-5, atol=1e-5)
    return 'mixup', lam


def _smoothed_one_hot(labels, num_classes, smoothing):
    y = torch.full((len(labels), num_classes), smoothing / num_classes)
    y[torch.arange(len(labels)), labels] += 1 - smoothing
    return y


@pytest.mark.parametrize('labels', ['token', 'plain'])
def test_mixup_paths(shapes, tmp_path, monkeypatch, labels):
    """The model trains on the mixed images and the loss gets the matching mixed targets: each
    step's batch before and after mixing (recorded around the mixing call), the images the model's
    patch embedding receives and the targets the loss receives, checked against a mixing worked out
    here from the pixels."""
    from timm.data import Mixup
    from data import TokenLabelMixup, create_token_label_target
    mixer = TokenLabelMixup if labels == 'token' else Mixup
    mixed, seen_images, seen_targets = [], [], []
    real_call, real_build, real_loss = mixer.__call__, train_script.build_model, train_script.build_train_loss

    def call(self, x, target):
        before = (x.clone(), target.clone())
        out = real_call(self, x, target)
        mixed.append((*before, out[0].clone(), out[1].clone()))
        return out

    def build_model(*args, **kwargs):
        model = real_build(*args, **kwargs)
        model.patch_embed.register_forward_pre_hook(
            lambda module, args: seen_images.append(args[0].detach().clone()) if module.training else None)
        return model

    def build_train_loss(*args, **kwargs):
        loss = real_loss(*args, **kwargs)
        return lambda output, target: seen_targets.append(target.detach().clone()) or loss(output, target)

    monkeypatch.setattr(mixer, '__call__', call)
    monkeypatch.setattr(train_script, 'build_model', build_model)
    monkeypatch.setattr(train_script, 'build_train_loss', build_train_loss)
    extra = _token_args(shapes) if labels == 'token' else []
    run = _run(shapes, tmp_path, '--epochs', '1', '--mixup', '0.8', '--cutmix', '1.0', *extra)
    monkeypatch.undo()
    assert len(_summary(run)) == 1
    assert len(mixed) == len(seen_images) == len(seen_targets) == 3  # 24 training images, -b 8
    ways = []
    for (images, targets, images_out, targets_out), model_input, loss_target in zip(mixed, seen_images, seen_targets):
        assert torch.equal(model_input, images_out), 'the model did not get the mixed images'
        assert torch.equal(loss_target, targets_out), 'the loss did not get the mixed targets'
        how = _how_mixed(images, images_out)
        ways.append(how and how[0])
        if labels == 'plain':  # (B,) class indices: smoothed one-hot (--smoothing 0.1), mixed by the pasted area
            unmixed = _smoothed_one_hot(targets, 3, 0.1)
        else:  # token-label layouts: the class, image and token slots (checked in test_token_label.py), mixed here
            unmixed = create_token_label_target(targets, num_classes=3, smoothing=0.1, label_size=2)
        if how is None:
            expected = unmixed
        elif how[0] == 'mixup':
            expected = how[1] * unmixed + (1 - how[1]) * unmixed.flip(0)
        else:
            (y1, y2, x1, x2), (h, w) = how[1], images.shape[2:]
            area = 1 - (y2 - y1) * (x2 - x1) / (h * w)
            expected = area * unmixed + (1 - area) * unmixed.flip(0)
            if labels == 'token':  # each token's label from the image its centre shows
                for i in range(2):
                    for j in range(2):
                        if y1 <= (i + 0.5) * h / 2 < y2 and x1 <= (j + 0.5) * w / 2 < x2:
                            expected[:, :, 2 + i * 2 + j] = unmixed.flip(0)[:, :, 2 + i * 2 + j]
                        else:
                            expected[:, :, 2 + i * 2 + j] = unmixed[:, :, 2 + i * 2 + j]
        torch.testing.assert_close(targets_out, expected, rtol=1e-5, atol=1e-5)
    assert all(ways), ways  # --mixup-prob 1: every batch is mixed (by mixup or by cutmix)


def test_yaml_config_and_command_line_precedence(shapes, tmp_path):
    cfg = tmp_path / 'cfg.yaml'
    cfg.write_text(yaml.safe_dump({'epochs': 1, 'lr': 0.123, 'smoothing': 0.2, 'model': 'volo_d1'}))
    args = train_script.parse_args([shapes, '-c', str(cfg), '--lr', '0.5'])
    assert args.epochs == 1 and args.smoothing == 0.2 and args.lr == 0.5
    run = _run(shapes, tmp_path, '-c', str(cfg), '--lr', '1e-4')
    saved = yaml.safe_load(open(os.path.join(run, 'args.yaml')))
    assert saved['lr'] == 1e-4 and saved['smoothing'] == 0.2 and saved['epochs'] == 1
    cfg.write_text(yaml.safe_dump({'epochz': 1}))
    with pytest.raises(SystemExit):
        train_script.parse_args([shapes, '-c', str(cfg)])


def test_distributed_train_sh_on_cpu(shapes, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHON=sys.executable)
    cmd = [os.path.join(REPO, 'distributed_train.sh'), '2', shapes, *FAST_D1, '--output', str(tmp_path), '--epochs', '1',
           '-b', '4', *_token_args(shapes)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    runs = glob.glob(str(tmp_path / 'train' / '*'))
    assert len(runs) == 1 and len(_summary(runs[0])) == 1
    seen = {int(r): eval(ids) for r, ids in re.findall(r'Rank (\d): epoch 0, \d+ training samples, first (\[[^\]]*\])',
                                                          log)}
    assert set(seen) == {0, 1} and not set(seen[0]) & set(seen[1])
    assert 'Process 1 of 2 on cpu' in log


def test_distributed_train_sh_hands_the_script_and_its_arguments_to_torchrun(tmp_path):
    """What the script runs, with PYTHON=echo; the runs themselves: the test above (torchrun, main.py)
    and the scripts' two-rank tests (tests/forked.py)."""
    script = os.path.join(REPO, 'distributed_train.sh')

    def launch(*args):
        done = subprocess.run([script, *args], capture_output=True, text=True, cwd=tmp_path, timeout=60,
                              env=dict(os.environ, PYTHON='echo'))
        return done.returncode, done.stdout.strip(), done.stderr.strip()

    torchrun = '-m torch.distributed.run --standalone --nproc_per_node='
    assert launch('2', '/data', '-b', '4') == (0, f'{torchrun}2 {REPO}/main.py /data -b 4', '')
    assert launch('8', '--script', 'train_det.py', '/coco', '--amp') == (0, f'{torchrun}8 {REPO}/train_det.py /coco --amp', '')
    assert launch('2', '--script', str(tmp_path / 'mine.py'))[2] == f'{script}: --script {tmp_path}/mine.py: no such file'
    code, _, err = launch('2', '--script', 'nope.py')
    assert code == 2 and err.endswith('nope.py: no such file')
    assert launch('2', '--script')[0] == launch()[0] == 2


def _direct_metrics(model, folder, img_size, crop_pct, amp=False):
    """top-1, top-5 (every class of 3) and loss of `model` on the class folders in `folder`, all
    images in one batch (amp: under CPU autocast to bfloat16, as validate.py --amp on a CPU)."""
    from data.dataset import ImageFolderDataset
    from timm.data import create_transform
    t = create_transform(img_size, is_training=False, crop_pct=crop_pct, interpolation='bicubic')
    ds = ImageFolderDataset(folder, transform=t)
    xs = torch.stack([ds[i][0] for i in range(len(ds))])
    ys = torch.tensor([ds[i][1] for i in range(len(ds))])
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp):
        out = model.eval()(xs).float()
    top5 = out.topk(3, 1).indices  # 3 classes: top-5 is every class
    return dict(classes_predicted=len(set(top5[:, 0].tolist())), top1=100. * (top5[:, 0] == ys).float().mean().item(),
                top5=100. * (top5 == ys[:, None]).any(1).float().mean().item(),
                loss=torch.nn.functional.cross_entropy(out, ys).item())


def test_validate_matches_direct_computation(shapes, tmp_path, monkeypatch):
    run = _run(shapes, tmp_path, '--epochs', '1', '--img-size', '64', *_token_args(shapes, 4))
    ckpt = os.path.join(run, 'last.pth.tar')
    results = tmp_path / 'r.json'
    reads, real_load = [], utils.checkpoint.safe_load
    monkeypatch.setattr(utils.checkpoint, 'safe_load', lambda path: reads.append(path) or real_load(path))
    validate_script.main([shapes, '--model', 'volo_test', '--checkpoint', ckpt, '--img-size', '64', '-b', '5', '-j', '0',
                          '--results-file', str(results)])
    assert reads == [ckpt]  # the head size and the weights from one read of the file
    monkeypatch.undo()
    got = json.loads(results.read_text())
    model = timm.create_model('volo_test', img_size=64, num_classes=3)
    load_pretrained_weights(model, ckpt)
    expected = _direct_metrics(model, os.path.join(shapes, 'val'), 64, 0.96)
    assert got['top1'] == pytest.approx(expected['top1'], abs=1e-3)
    assert got['top5'] == pytest.approx(expected['top5'], abs=1e-3)
    assert got['loss'] == pytest.approx(expected['loss'], rel=1e-4)
    assert got['img_size'] == 64 and got['crop_pct'] == 0.96
    assert got['param_count'] == sum(p.numel() for p in model.parameters())
    assert got['images_per_s'] > 0
    # a 64-px checkpoint at 96 px, through the split folder itself
    validate_script.main([os.path.join(shapes, 'val'), '--model', 'volo_test', '--checkpoint', ckpt, '--img-size', '96',
                          '-b', '6', '-j', '0', '--crop-pct', '1.0', '--results-file', str(results), '--no-test-pool'])
    model96 = timm.create_model('volo_test', img_size=96, num_classes=3)
    load_pretrained_weights(model96, ckpt)
    got96 = json.loads(results.read_text())
    assert got96['img_size'] == 96
    assert got96['loss'] == pytest.approx(_direct_metrics(model96, os.path.join(shapes, 'val'), 96, 1.0)['loss'],
                                          rel=1e-4)
    # the run's own settings: model, 64 px, 3 classes, crop; said so in the output and in validate.log
    rows = validate_script.main([shapes, '--checkpoint', ckpt, '-b', '5', '-j', '0'])
    assert (rows[0]['model'], rows[0]['img_size'], rows[0]['crop_pct']) == ('volo_test', 64, 0.96)
    assert rows[0]['loss'] == pytest.approx(expected['loss'], rel=1e-4)
    log = open(os.path.join(run, 'validate.log')).read()
    assert 'model=volo_test, img_size=64, num_classes=3 from the checkpoint' in log
    rows = validate_script.main([shapes, '--checkpoint', ckpt, '--img-size', '96', '--crop-pct', '1.0', '-j', '0'])
    assert rows[0]['loss'] == pytest.approx(got96['loss'], rel=1e-4)
    assert 'the command line overrides the checkpoint: --img-size 96 (trained with 64)' in \
        open(os.path.join(run, 'validate.log')).read()
    # directory mode: every checkpoint, sorted by top-1, as CSV
    validate_script.main([shapes, '--model', 'volo_test', '--checkpoint', run, '--img-size', '64', '-j', '0'])
    rows = list(csv.DictReader(open(os.path.join(run, 'validation_results.csv'))))
    assert {os.path.basename(r['checkpoint']) for r in rows} >= {'last.pth.tar', 'model_best.pth.tar',
                                                                  'checkpoint-0.pth.tar'}
    top1 = [float(r['top1']) for r in rows]
    assert top1 == sorted(top1, reverse=True)


# ---------------------------------------------------------------- guards

def _cli_error(argv, capsys_or_caplog):
    with pytest.raises(SystemExit) as exit_info:
        train_script.cli(argv)
    assert exit_info.value.code == 2
    return capsys_or_caplog.text


def test_guards_before_any_compute(shapes, tmp_path, caplog):
    base = [*FAST, '--output', str(tmp_path), '--epochs', '1']
    msg = _cli_error([str(tmp_path / 'missing'), *base], caplog)
    assert 'does not exist' in msg
    msg = _cli_error([shapes, *base, '--train-split', 'nosuchsplit'], caplog)
    assert 'no "nosuchsplit" folder' in msg
    msg = _cli_error([shapes, *base, '--img-size', '40'], caplog)
    assert 'multiple of 16' in msg
    msg = _cli_error([shapes, *base, '--img-size', '64', *_token_args(shapes, 2)], caplog)
    assert 'use --token-label-size 4' in msg
    msg = _cli_error([shapes, *base, '--aa', 'original', *_token_args(shapes)], caplog)
    assert 'token-label maps follow RandAugment' in msg
    msg = _cli_error([shapes, *base, '--model', 'resnet18', '--token-label'], caplog)
    assert 'needs a model with a dense' in msg
    assert not glob.glob(str(tmp_path / 'train' / '*'))  # nothing was started


def test_non_finite_loss_stops_with_epoch_and_step(shapes, tmp_path, caplog):
    run = _run(shapes, tmp_path, '--epochs', '1')
    good = open(os.path.join(run, 'last.pth.tar'), 'rb').read()
    msg = _cli_error([shapes, *FAST, '--output', str(tmp_path), '--epochs', '2', '--smoothing', 'nan',
                      '--resume', os.path.join(run, 'last.pth.tar')], caplog)
    assert re.search(r'non-finite loss .* at epoch 1, step \d', msg)
    assert open(os.path.join(run, 'last.pth.tar'), 'rb').read() == good


def test_corrupt_training_image_is_skipped(shapes, tmp_path, caplog):
    root, victim = copy_with_unreadable_image(shapes, tmp_path / 'data', 'train', index=2)
    with caplog.at_level('WARNING'):
        run = train_script.main([str(root), *FAST, '--output', str(tmp_path), '--epochs', '1',
                                 '--token-label', '--token-label-size', '2', '--token-label-data',
                                 str(root / 'labels')])
    assert str(victim) in caplog.text
    assert len(_summary(run)) == 1


def test_plot_summary(shapes, tmp_path):
    run = _run(shapes, tmp_path, '--epochs', '2')
    out = tmp_path / 'curves.png'
    from tools import plot_summary
    assert plot_summary.main([run, '--out', str(out)])
    from PIL import Image
    with Image.open(out) as im:
        assert im.size[0] > 300 and im.size[1] > 200
    assert plot_summary.main([os.path.join(run, 'summary.csv')]) and os.path.isfile(os.path.join(run, 'summary.png'))
    import importlib
    import matplotlib
    before = matplotlib.get_backend()
    try:  # importing the tool leaves a notebook's backend alone
        matplotlib.use('pdf')
        importlib.reload(plot_summary)
        assert matplotlib.get_backend() == 'pdf'
    finally:
        matplotlib.use(before)


@pytest.mark.parametrize('config', sorted(glob.glob(os.path.join(REPO, 'configs', '*.yaml'))))
def test_recipes_parse_and_match_the_reference(config):
    args = train_script.parse_args(['/data', '-c', config])
    name = os.path.basename(config)
    if name == 'demo.yaml':
        assert args.token_label and args.img_size == 64
        return
    from timm.scheduler import create_scheduler_v2
    model, res = name[:-5].rsplit('_', 1)
    assert args.model == model and args.img_size == int(res) and args.token_label_size == int(res) // 16
    assert args.aa == 'rand-m9-mstd0.5-inc1' and args.reprob == 0.25 and args.smoothing == 0.1
    assert args.dense_weight == 0.5 and args.mixup == 0 and args.cutmix == 0
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=args.lr)
    _, epochs = create_scheduler_v2(optimizer, sched=args.sched, num_epochs=args.epochs, min_lr=args.min_lr,
                                    warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs,
                                    cooldown_epochs=args.cooldown_epochs)
    if res == '224':
        expected_lr = {'volo_d1': 1.6e-3, 'volo_d5': 8e-4}.get(model, 1e-3)
        assert (args.lr, args.weight_decay, epochs, args.warmup_epochs) == (expected_lr, 0.05, 310, 20)
        assert args.drop_path == {'volo_d1': 0.1, 'volo_d2': 0.2, 'volo_d5': 0.75}.get(model, 0.5)
    else:
        assert (args.lr, args.min_lr, args.weight_decay, epochs, args.warmup_epochs) == (8e-6, 4e-6, 1e-8, 40, 5)
        assert args.ground_truth


def test_apex_amp_falls_back_to_native_bf16_on_cpu(shapes, tmp_path, caplog):
    with caplog.at_level('INFO'):
        run = _run(shapes, tmp_path, '--epochs', '2', '--apex-amp', '--channels-last', *_token_args(shapes))
    assert 'NVIDIA apex is not installed; using native torch.amp' in caplog.text
    assert 'Mixed precision: native' in caplog.text and 'bfloat16' in caplog.text
    assert float(_summary(run)[0]['train_loss']) > 0
    ckpt = os.path.join(run, 'last.pth.tar')
    rows = validate_script.main([shapes, '--model', 'volo_test', '--checkpoint', ckpt, '--img-size', '32', '-j', '0',
                                 '--amp', '--channels-last'])
    model = timm.create_model('volo_test', img_size=32, num_classes=3)
    load_pretrained_weights(model, ckpt)
    expected = _direct_metrics(model, os.path.join(shapes, 'val'), 32, 0.96, amp=True)
    assert expected['classes_predicted'] > 1  # a model that predicts one class would hide a wrong top-1
    assert rows[0]['crop_pct'] == 0.96 and rows[0]['num_images'] == 12
    assert rows[0]['top1'] == pytest.approx(expected['top1'], abs=1e-3)
    assert rows[0]['loss'] == pytest.approx(expected['loss'], rel=1e-3)


def test_one_log_line_per_message_and_no_progress_bar_when_redirected(shapes, tmp_path, capfd):
    """demo.py runs main.py and validate.py in one process: each message once, no bar garbage."""
    run = _run(shapes, tmp_path, '--epochs', '1')
    for _ in range(2):
        validate_script.main([shapes, '--checkpoint', run, '-j', '0'])
    err = capfd.readouterr().err
    assert err.count('Output: ' + run) == 1
    results = [line for line in err.splitlines() if 'model_best.pth.tar: top1' in line]
    assert len(results) == 2  # one per validate call, not one per handler
    assert '\r' not in err and 'batch/s' not in err and 'it/s' not in err


def test_batchnorm_options_and_dataset_choice(shapes):
    args = train_script.parse_args([shapes, '--model', 'volo_d1', '--img-size', '32', '--num-classes', '3',
                                       '--bn-momentum', '0.01', '--bn-eps', '1e-3'])
    model = train_script.build_model(args)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 3 and all(m.momentum == 0.01 and m.eps == 1e-3 for m in norms)
    args = train_script.parse_args([shapes, '--dataset', 'folder'])
    assert args.dataset == 'folder'
    with pytest.raises(SystemExit):
        train_script.parse_args([shapes, '--dataset', 'imagenet'])
