"""Every path the published recipes take, run through the trainer that takes it, each checked for
what it does: the gradients the optimizer sees under --clip-grad (norm, value, agc), the EMA
weights, --dist-bn over two processes, channels-last inputs, gradient checkpointing, the float16
loss scaler's state across a resume, Faster R-CNN and RetinaNet, --backbone-checkpoint, resuming a
run directory from its newest state, and the loss read back to the host once a step."""
import contextlib
import logging
import os
import re
import shutil
import sys

import pytest
import torch
import torch.nn as nn
from timm.utils.agc import unitwise_norm
from torch.optim.optimizer import register_optimizer_step_pre_hook

import main as train_script
import train_det
import train_seg
from engine.summary import read_summary
from models.detection import detector_settings
from tests.forked import run_ranks
from tests.small_models import small_volo
from tests.test_det_training import FAST as DET_FAST, coco  # noqa: F401  (coco: the generated COCO set)
from tests.test_engine import SEG_FAST, seg_data  # noqa: F401  (seg_data: a generated folder dataset)
from tests.training_runs import FAST, run_fast

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(run, name='last.pth.tar'):
    return torch.load(os.path.join(run, name), map_location='cpu', weights_only=False)


@contextlib.contextmanager
def optimizer_steps(record):
    """record(optimizer) before every optimizer step of any optimizer (the gradients it is about to
    apply, unscaled and clipped)."""
    handle = register_optimizer_step_pre_hook(lambda optimizer, *_: record(optimizer))
    try:
        yield
    finally:
        handle.remove()


def gradients(optimizer):
    return [p for group in optimizer.param_groups for p in group['params'] if p.grad is not None]


@pytest.mark.parametrize('mode', ['norm', 'value', 'agc'])
def test_clip_grad_bounds_what_the_optimizer_applies(shapes, tmp_path, mode):
    clip = {'norm': 0.01, 'value': 1e-4, 'agc': 1e-3}[mode]
    seen = []

    def record(optimizer):
        params = gradients(optimizer)
        if mode == 'norm':
            seen.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item() / clip)
        elif mode == 'value':
            seen.append(max(p.grad.abs().max().item() for p in params) / clip)
        else:  # adaptive: each unit's gradient norm at most clip x its weight norm (at least 1e-3)
            seen.append(max((unitwise_norm(p.grad) / (unitwise_norm(p.detach()).clamp(min=1e-3) * clip)).max().item()
                            for p in params))

    with optimizer_steps(record):
        run_fast(shapes, tmp_path, '--epochs', '1', '--clip-grad', str(clip), '--clip-mode', mode)
    assert len(seen) == 3  # 24 images, -b 8
    # every step was clipped to the bound (these bounds are far below the unclipped gradients)
    assert all(ratio == pytest.approx(1.0, rel=1e-3) for ratio in seen), seen


def test_clip_grad_in_train_seg(seg_data, tmp_path):
    norms = []
    with optimizer_steps(lambda o: norms.append(torch.linalg.vector_norm(
            torch.stack([p.grad.norm() for p in gradients(o)])).item())):
        train_seg.main([seg_data, '--dataset', 'seg-folder', *SEG_FAST, '--iters', '2', '--eval-interval', '0',
                        '--clip-grad', '0.02', '--output', str(tmp_path)])
    assert norms == pytest.approx([0.02, 0.02], rel=1e-3)


@pytest.mark.parametrize('force_cpu', [False, True], ids=['ema', 'ema-force-cpu'])
def test_model_ema_is_the_decayed_average_of_the_weights(shapes, tmp_path, force_cpu):
    """One step from known weights w0 to w1: the EMA holds decay x w0 + (1 - decay) x w1."""
    torch.manual_seed(3)
    start = small_volo(num_classes=3).state_dict()
    torch.save({'state_dict': start}, tmp_path / 'start.pth')
    run = run_fast(shapes, tmp_path / 'out', '--epochs', '1', '-b', '24', '--initial-checkpoint',
                   str(tmp_path / 'start.pth'), '--model-ema', '--model-ema-decay', '0.25',
                   *(['--model-ema-force-cpu'] if force_cpu else []))
    checkpoint = load(run)
    trained, ema = checkpoint['state_dict'], checkpoint['state_dict_ema']
    weights = [k for k, v in start.items() if v.is_floating_point() and 'running' not in k]
    assert len(weights) > 50 and any(not torch.equal(trained[k], start[k]) for k in weights)
    for k in weights:
        torch.testing.assert_close(ema[k], 0.25 * start[k] + 0.75 * trained[k], rtol=1e-5, atol=1e-6)


def bn_buffers(model):
    return {name: buffer.detach().clone() for name, buffer in model.named_buffers() if 'running' in name}


@pytest.mark.parametrize('dist_bn', ['reduce', 'broadcast'])
def test_dist_bn_over_two_processes(shapes, tmp_path, dist_bn):
    """After each epoch every rank's BatchNorm statistics are the mean of the ranks' (reduce) or
    rank 0's (broadcast); the ranks' own statistics differed before."""
    logs = tmp_path / 'logs'

    def rank():
        import timm.utils
        rank_id = os.environ['RANK']

        def recorded(model, world_size, reduce=False):
            torch.save(bn_buffers(model), logs / f'before{rank_id}.pt')
            timm.utils.distribute_bn(model, world_size, reduce)
            torch.save(bn_buffers(model), logs / f'after{rank_id}.pt')

        train_script.distribute_bn = recorded
        train_script.cli([shapes, *FAST, '--epochs', '1', '--dist-bn', dist_bn, '--output', str(tmp_path / 'out')])

    for code, text in run_ranks(rank, logs):
        assert code in (0, None), text[-3000:]
    before = [torch.load(logs / f'before{r}.pt') for r in (0, 1)]
    after = [torch.load(logs / f'after{r}.pt') for r in (0, 1)]
    assert before[0] and any(not torch.equal(before[0][k], before[1][k]) for k in before[0])
    for k in before[0]:
        expected = (before[0][k] + before[1][k]) / 2 if dist_bn == 'reduce' else before[0][k]
        for r in (0, 1):
            torch.testing.assert_close(after[r][k], expected)


def conv_inputs_channels_last(run):
    layouts = []

    def hook(module, inputs):
        if isinstance(module, nn.Conv2d) and module.training:
            layouts.append(inputs[0].is_contiguous(memory_format=torch.channels_last) and
                           module.weight.is_contiguous(memory_format=torch.channels_last))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        run()
    finally:
        handle.remove()
    return layouts


def test_channels_last_reaches_the_convolutions(shapes, tmp_path):
    plain = conv_inputs_channels_last(lambda: run_fast(shapes, tmp_path / 'a', '--epochs', '1'))
    last = conv_inputs_channels_last(lambda: run_fast(shapes, tmp_path / 'b', '--epochs', '1', '--channels-last'))
    assert plain and not any(plain)
    assert last and all(last)


def checkpointed_calls(monkeypatch, run):
    import models.volo
    calls = []
    original = models.volo.checkpoint

    def counting(function, *args, **kwargs):
        calls.append(type(function).__name__)
        return original(function, *args, **kwargs)

    monkeypatch.setattr(models.volo, 'checkpoint', counting)
    run()
    return calls


@pytest.mark.parametrize('trainer', ['main', 'train_seg'])
def test_grad_checkpointing_recomputes_the_blocks(shapes, seg_data, tmp_path, monkeypatch, trainer):
    def run(*extra):
        if trainer == 'main':
            return lambda: run_fast(shapes, tmp_path / str(len(extra)), '--epochs', '1', *extra)
        return lambda: train_seg.main([seg_data, '--dataset', 'seg-folder', *SEG_FAST, '--iters', '1',
                                       '--eval-interval', '0', '--output', str(tmp_path / str(len(extra))), *extra])

    assert checkpointed_calls(monkeypatch, run()) == []
    calls = checkpointed_calls(monkeypatch, run('--grad-checkpointing'))
    assert 'Outlooker' in calls and 'Transformer' in calls


def test_float16_loss_scaler_state_is_saved_and_restored(shapes, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    run = run_fast(shapes, tmp_path, '--epochs', '1', '--amp', '--amp-dtype', 'float16')
    assert 'Mixed precision: native float16' in caplog.text
    checkpoint = load(run)
    assert checkpoint['amp_scaler']['scale'] > 1  # the scaler's state, written with every checkpoint
    checkpoint['amp_scaler'] = dict(checkpoint['amp_scaler'], scale=4096.0, _growth_tracker=0)
    torch.save(checkpoint, os.path.join(run, 'last.pth.tar'))
    resumed = run_fast(shapes, tmp_path, '--epochs', '2', '--amp', '--amp-dtype', 'float16', '--resume', run)
    assert resumed == run
    assert load(run)['amp_scaler']['scale'] == 4096.0  # restored (3 steps: no growth, no overflow)


def test_resuming_a_run_directory_continues_its_newest_state_not_its_best(shapes, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    run = run_fast(shapes, tmp_path, '--epochs', '1')
    first = os.path.join(tmp_path, 'epoch0.pth.tar')
    shutil.copyfile(os.path.join(run, 'last.pth.tar'), first)
    run_fast(shapes, tmp_path, '--epochs', '2', '--resume', 'auto')
    best = os.path.join(run, 'model_best.pth.tar')  # make epoch 0 the best, older than last
    os.remove(best)
    shutil.copyfile(first, best)
    os.utime(best, (0, 0))
    caplog.clear()
    run_fast(shapes, tmp_path, '--epochs', '3', '--resume', run)
    assert 'its newest complete checkpoint, epoch 1' in caplog.text
    assert 'continuing at epoch 2' in caplog.text and 'Train: 1 [' not in caplog.text  # epoch 1 is not retrained
    assert [int(row['epoch']) for row in read_summary(os.path.join(run, 'summary.csv'))] == [0, 1, 2]


@pytest.mark.parametrize('detector, losses', [('faster_rcnn', ('classifier', 'box_reg', 'objectness', 'rpn_box_reg')),
                                              ('retinanet', ('classification', 'bbox_regression'))])
def test_faster_rcnn_and_retinanet_train_through_train_det(coco, tmp_path, caplog, detector, losses):
    caplog.set_level(logging.INFO)
    run = train_det.main([coco, *DET_FAST, '--detector', detector, '--epochs', '1', '--lr-steps',
                          '--output', str(tmp_path)])
    assert detector_settings(load(run)['state_dict'])['kind'] == detector
    logged = [line for line in caplog.text.splitlines() if 'epoch 0 [' in line]
    assert logged and all(re.search(rf'\b{name} \d', logged[-1]) for name in losses) and 'mask' not in logged[-1]
    row = read_summary(os.path.join(run, 'summary.csv'))[-1]
    assert 'eval_bbox_AP' in row and 'eval_segm_AP' not in row


@pytest.mark.parametrize('trainer', ['train_seg', 'train_det'])
def test_backbone_checkpoint_initialises_the_backbone(seg_data, coco, tmp_path, trainer):
    import models
    torch.manual_seed(5)
    classifier = models.volo_d1(num_classes=7)
    torch.save({'state_dict': classifier.state_dict()}, tmp_path / 'backbone.pth')
    expected = {k: v for k, v in classifier.state_dict().items() if not k.startswith(('head', 'aux_head'))}

    def backbone(*extra):  # one step at lr 0: the weights stay what they started as
        out = str(tmp_path / f'out{len(extra)}')
        if trainer == 'train_seg':
            run = train_seg.main([seg_data, '--dataset', 'seg-folder', *SEG_FAST, '--iters', '1', '--eval-interval',
                                  '0', '--lr', '0', '--output', out, *extra])
            prefix = 'backbone.'
        else:
            run = train_det.main([coco, *DET_FAST, '--epochs', '1', '--lr-steps', '--lr', '0', '--eval-interval', '0',
                                  '--output', out, *extra])
            prefix = 'backbone.body.'
        return {k[len(prefix):]: v for k, v in load(run)['state_dict'].items() if k.startswith(prefix)}

    loaded, fresh = backbone('--backbone-checkpoint', str(tmp_path / 'backbone.pth')), backbone()
    compared = [k for k in expected if k in loaded and loaded[k].shape == expected[k].shape and 'running' not in k
                and 'num_batches' not in k]
    assert len(compared) > 100
    assert all(torch.equal(loaded[k], expected[k]) for k in compared)
    assert not any(torch.equal(fresh[k], expected[k]) for k in compared if expected[k].ndim >= 2)


# reading a tensor back to the host: each of these waits for the GPU
HOST_READS = ('item', 'tolist', '__float__', '__bool__', '__int__')
COUNTED = tuple(os.path.join(REPO, p) for p in ('main.py', 'train_seg.py', 'train_det.py', 'engine' + os.sep,
                                                 'loss' + os.sep, 'utils' + os.sep))


@contextlib.contextmanager
def counting_host_reads(monkeypatch, evaluators):
    """Counts the calls of HOST_READS made from the trainers, engine/, loss/ and utils/ while training
    (not inside the functions `evaluators`: (module, name) pairs, whose evaluation is not a step)."""
    counts = {'reads': 0, 'paused': 0}
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            if not counts['paused'] and sys._getframe(1).f_code.co_filename.startswith(COUNTED):
                counts['reads'] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    for module, name in evaluators:
        evaluate = getattr(module, name)

        def paused(*args, _evaluate=evaluate, **kwargs):
            counts['paused'] += 1
            try:
                return _evaluate(*args, **kwargs)
            finally:
                counts['paused'] -= 1

        monkeypatch.setattr(module, name, paused)
    yield counts
    monkeypatch.undo()


def test_the_loss_is_read_back_once_a_step(shapes, seg_data, coco, tmp_path, monkeypatch):
    runs = {
        'main': (lambda: train_script.main([shapes, *FAST, '-b', '1', '--log-interval', '50', '--epochs', '1',
                                            '--recovery-interval', '12', '--output', str(tmp_path / 'c')]),
                 24, [(train_script, 'evaluate')]),
        'train_seg': (lambda: train_seg.main([seg_data, '--dataset', 'seg-folder', *SEG_FAST, '--iters', '12',
                                              '--log-interval', '50', '--eval-interval', '0',
                                              '--output', str(tmp_path / 's')]),
                      12, [(train_seg, 'evaluate')]),
        'train_det': (lambda: train_det.main([coco, *DET_FAST, '-b', '1', '--epochs', '2', '--lr-steps',
                                              '--log-interval', '50', '--eval-interval', '0',
                                              '--output', str(tmp_path / 'd')]),
                      10, [(train_det, 'evaluate')]),
    }
    for name, (run, steps, evaluators) in runs.items():
        with counting_host_reads(monkeypatch, evaluators) as counts:
            run()
        assert steps <= counts['reads'] <= 1.2 * steps, (name, counts['reads'], steps)
